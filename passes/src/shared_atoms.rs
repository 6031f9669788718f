//! Shared atoms: each attention projection type's weights, across the blocks, written as a
//! linear combination of a few matrix atoms shared by all of them ("Share Your Attention:
//! Transformer Weight Sharing via Matrix-based Dictionary Learning", Zhussip et al., arXiv
//! 2508.04581, MASA), training-free as the paper does it for pretrained models.
//!
//! # Math
//! For one projection type `t` (Q, K, V, O, or a fused QKV), the weights `W_1..W_L` of the `L`
//! blocks (same shape, as stored) are vectors of `R^{numel}` with the Frobenius inner product.
//! - **Mean atom** (`mean`, on by default): `M = (1/L) Σ_l W_l`, and `R_l = W_l − M`; without it
//!   `M = 0`.
//! - **Matrix PCA**: the `L×L` Gram `G_ij = ⟨R_i, R_j⟩` has eigenpairs `(λ_s, u_s)`, largest
//!   first. The `S` atoms are `D_s = Σ_l u_s[l] R_l / √λ_s` (orthonormal), the coefficients
//!   `c_ls = ⟨D_s, R_l⟩ = √λ_s u_s[l]`, and `Ŵ_l = M + Σ_{s≤S} c_ls D_s` is the best rank-`S`
//!   approximation of the stack in Frobenius norm (Eckart–Young). `S = L` (with the mean,
//!   `S = L − 1`) reproduces every weight up to rounding. Atoms with `λ_s ≤ 1e-12·tr G` are
//!   dropped (the stack has lower rank).
//! - **Local refinement** (`refine`, a rank per type): the residual `E_l = W_l − Ŵ_l`, as
//!   `[K, N]` (`y = x·W`), gets a rank-`r` correction that minimises the output error on the
//!   calibration inputs, `‖X (E_l − A B)‖_F`: with `H = XᵀX + δI = S Sᵀ` (Cholesky; `δ` GPTQ's
//!   damping), the SVD `Sᵀ E_l = U Σ Vᵀ` gives `A = S^{-T} U_r Σ_r` (`[K, r]`), `B = V_rᵀ`
//!   (`[r, N]`). Without calibration statistics `S = I` (plain truncated SVD). A single rank `R`
//!   gives Q, O and QKV rank `R` and K, V rank `⌈R/2⌉`, as the paper gives more of it to Q and O.
//!
//! Layer groups (the paper's optional grouping of consecutive blocks) are not implemented: one
//! dictionary spans all the blocks of a type.
//!
//! # What it touches
//! The constant weights of the projections `structure::discover` finds in attention sublayers,
//! grouped by role; a type is shared when at least two blocks have it, with the same shape and
//! element type (f32/f16), each weight an initializer read by that projection alone. Each
//! weight's initializer is replaced by nodes of the same output name that synthesize it:
//! `MatMul(c_l [1, S'], D [S', numel]) → Reshape(dims)`, `D` the mean (when kept) and the atoms,
//! plus `MatMul(A_l, B_l)` (transposed for a weight stored `[N, K]`) with refinement. The
//! consumers are untouched. Everything is constant: ONNX Runtime folds the synthesis at session
//! start (the saving is on disk) unless constant folding is off, and the model's metadata says
//! so.
//!
//! # Memory
//! The Gram and the atoms are computed in chunks of `CHUNK` values of every block's weight
//! (read with positioned reads), so what is held is the atoms (`S'` weights) and one block's
//! weight at a time for its residual, not the `L` weights.

use std::collections::{BTreeMap, HashMap};

use faer::{Mat, Side};
use serde::Serialize;

use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{DataType, Graph, Model, Node, Result, Tensor};

use crate::gptq::Gram;
use crate::graph_util::fresh_name;
use crate::linear_weights::{float_bytes, to_f32};

/// The projection types of an attention sublayer that can share atoms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Q,
    K,
    V,
    O,
    /// Q, K and V in one weight (ONNX Runtime's Attention, GPT-2's `c_attn`).
    Qkv,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Q, Kind::K, Kind::V, Kind::O, Kind::Qkv];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Q => "q",
            Kind::K => "k",
            Kind::V => "v",
            Kind::O => "o",
            Kind::Qkv => "qkv",
        }
    }

    /// The kind of a projection `structure` found with `role`.
    fn of_role(role: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.label() == role)
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Kind::of_role(s).ok_or_else(|| format!("'{s}': not a projection type (q, k, v, o, qkv)"))
    }
}

/// How many atoms: a count, or a fraction of the blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Count {
    Atoms(usize),
    Fraction(f64),
}

impl Count {
    /// The count for `layers` blocks: at least 1.
    fn of(self, layers: usize) -> usize {
        match self {
            Count::Atoms(s) => s.max(1),
            Count::Fraction(f) => ((f * layers as f64).round() as usize).max(1),
        }
    }
}

impl std::str::FromStr for Count {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Ok(n) = s.parse::<usize>() {
            return if n == 0 {
                Err("0 atoms: give at least 1".into())
            } else {
                Ok(Count::Atoms(n))
            };
        }
        match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 1.0 => Ok(Count::Fraction(f)),
            _ => Err(format!(
                "'{s}': give a number of atoms (≥ 1) or a fraction of the blocks in (0, 1]"
            )),
        }
    }
}

/// A value per projection type: `all:X` (or `X`) for every type, or `q:X,k:X,v:X,o:X,qkv:X`.
#[derive(Debug, Clone, PartialEq)]
pub struct PerKind<T>(pub BTreeMap<Kind, T>);

impl<T> Default for PerKind<T> {
    fn default() -> Self {
        PerKind(BTreeMap::new())
    }
}

impl<T: Copy> PerKind<T> {
    pub fn get(&self, k: Kind) -> Option<T> {
        self.0.get(&k).copied()
    }
}

impl<T: Copy> PerKind<T> {
    /// Parses the spec, each value with `value`; `all_of` gives each type's value from `all:X`
    /// (or a bare `X`).
    fn parse_with(
        s: &str,
        value: impl Fn(&str) -> std::result::Result<T, String>,
        all_of: impl Fn(Kind, T) -> T,
    ) -> std::result::Result<Self, String> {
        let mut out = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, v) = part.split_once(':').unwrap_or(("all", part));
            let v = value(v.trim())?;
            match kind.trim() {
                "all" => {
                    for k in Kind::ALL {
                        out.insert(k, all_of(k, v));
                    }
                }
                k => {
                    out.insert(k.parse()?, v);
                }
            }
        }
        if out.is_empty() {
            return Err(format!("'{s}': empty"));
        }
        Ok(PerKind(out))
    }
}

/// `--share-atoms SPEC`: atoms per type.
pub type AtomSpec = PerKind<Count>;

impl std::str::FromStr for PerKind<Count> {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        PerKind::parse_with(s, str::parse, |_, v| v)
    }
}

/// `--share-refine-rank R`: the refinement's rank per type (0: none). A single `R` gives Q, O and
/// QKV `R`, K and V `⌈R/2⌉`.
pub type RankSpec = PerKind<usize>;

impl std::str::FromStr for PerKind<usize> {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        PerKind::parse_with(
            s,
            |v| {
                v.parse::<usize>()
                    .map_err(|_| format!("'{v}': not a rank (a whole number, 0 for none)"))
            },
            |k, r| match k {
                Kind::K | Kind::V => r.div_ceil(2),
                _ => r,
            },
        )
    }
}

#[derive(Debug, Clone)]
pub struct ShareOptions {
    /// Atoms per type; types not named are left as they are.
    pub atoms: AtomSpec,
    /// The mean of the blocks' weights as an atom of its own (not counted in `atoms`).
    pub mean: bool,
    /// The refinement's rank per type (none when absent or 0).
    pub refine: RankSpec,
    /// Calibration statistics (`H = XᵀX` of each projection's input) that whiten the refinement.
    pub stats: crate::Statistics,
}

impl Default for ShareOptions {
    fn default() -> Self {
        ShareOptions {
            atoms: PerKind::default(),
            mean: true,
            refine: PerKind::default(),
            stats: crate::Statistics::default(),
        }
    }
}

pub struct SharedAtoms {
    pub opts: ShareOptions,
}

impl SharedAtoms {
    pub const NAME: &'static str = "shared-atoms";
}

/// One block's weight in a shared type, for the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShareLayer {
    pub block: usize,
    pub weight: String,
    pub node: String,
    /// `‖W − Ŵ‖/‖W‖` after sharing (and refinement).
    pub rel_error: f64,
    /// The same on the calibration inputs, `‖X(W − Ŵ)‖/‖XW‖`, when they were given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_rel_error: Option<f64>,
    /// Before refinement.
    pub rel_error_shared: f64,
}

/// One projection type, for the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShareKind {
    pub kind: Kind,
    pub blocks: usize,
    /// As stored, `[d0, d1]`.
    pub shape: Vec<i64>,
    /// Atoms asked for and kept (fewer when the stack has lower rank, or `S` was above what the
    /// blocks give).
    pub atoms_asked: usize,
    pub atoms: usize,
    pub mean: bool,
    pub refine_rank: usize,
    /// Parameters before (`L · numel`) and after (atoms, mean, coefficients, refinement
    /// factors).
    pub params_before: u64,
    pub params_after: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// The share of the eigenvalue mass (of the centred stack with the mean) the atoms keep.
    pub energy_kept: f64,
    pub layers: Vec<ShareLayer>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShareReport {
    pub kinds: Vec<ShareKind>,
    /// Attention parameters (of the types found) before and after, over all types.
    pub attention_params_before: u64,
    pub attention_params_after: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<String>,
    /// Types asked for and left alone, with why.
    pub skipped: Vec<String>,
    /// How ONNX Runtime treats the synthesis.
    pub folding: &'static str,
}

const FOLDING: &str = "every synthesized weight is constant: ONNX Runtime folds it into a dense \
                       weight at session start (the saving is on disk, not in session memory) \
                       unless constant folding is off (Python: InferenceSession(path, \
                       disabled_optimizers=['ConstantFolding']))";

/// Values of each block's weight read at once.
const CHUNK: usize = 1 << 18;

/// A type's blocks: (block index, projection node name, weight name, the value it multiplies).
struct Member {
    block: usize,
    node: String,
    weight: String,
    input: String,
}

impl Pass for SharedAtoms {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn description(&self) -> &'static str {
        "attention projections of every block as combinations of matrix atoms shared across \
         blocks, with a low-rank refinement per block (MASA)"
    }
    fn lossless(&self) -> bool {
        false
    }
    /// The synthesized weights are not initializers: a second round would find nothing new,
    /// and the atoms' own products look like projections to structure discovery.
    fn run_once(&self) -> bool {
        true
    }

    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        Ok(self.run_reporting(model)?.0)
    }
}

impl SharedAtoms {
    /// Runs the pass; the report is also the outcome's details.
    pub fn run_reporting(&self, model: &mut Model) -> Result<(PassOutcome, ShareReport)> {
        // Every type's blocks, looked at before anything changes (a type's rewrite leaves the
        // others' weights as they were).
        let found = self.find(&model.graph, &crate::structure::discover(model));
        let mut skipped = vec![];
        let mut kinds = vec![];
        let (mut before, mut after) = (0u64, 0u64);
        for (kind, members, params, check) in found {
            before += params;
            let Some(count) = self.opts.atoms.get(kind) else {
                after += params;
                continue;
            };
            match check {
                Err(why) => {
                    skipped.push(format!("{}: {why}", kind.label()));
                    after += params;
                }
                Ok(()) => {
                    let r = share_kind(model, kind, &members, count, &self.opts)?;
                    after += r.params_after;
                    kinds.push(r);
                }
            }
        }
        let report = ShareReport {
            kinds,
            attention_params_before: before,
            attention_params_after: after,
            calibration: self.opts.stats.calibration.clone(),
            skipped,
            folding: FOLDING,
        };
        let changes: usize = report.kinds.iter().map(|k| k.layers.len()).sum();
        let mut out = PassOutcome::changed(changes);
        if changes > 0 {
            wcc_ir::validate::topo_sort(&mut model.graph);
            let line = report.summary();
            model.set_metadata("wcc.shared_atoms", &format!("{line}; {FOLDING}"));
            out.notes.push(line);
            out.notes
                .extend(report.kinds.iter().map(ShareKind::describe));
        }
        out.notes.extend(report.skipped.iter().cloned());
        out.details = Some(serde_json::to_value(&report).expect("serializable"));
        Ok((out, report))
    }

    /// Per type: its blocks, their parameters, and whether they can share atoms (why not).
    #[allow(clippy::type_complexity)]
    fn find(
        &self,
        g: &Graph,
        s: &crate::structure::Structure,
    ) -> Vec<(Kind, Vec<Member>, u64, std::result::Result<(), String>)> {
        let mut by_kind: BTreeMap<Kind, Vec<Member>> = BTreeMap::new();
        let mut uses: HashMap<&str, usize> = HashMap::new();
        for n in &g.nodes {
            for x in n.present_inputs() {
                *uses.entry(x).or_default() += 1;
            }
        }
        for b in &s.blocks {
            let Some(att) = &b.attention else { continue };
            for p in &att.projections {
                let Some(kind) = Kind::of_role(&p.role) else {
                    continue;
                };
                let input = g
                    .nodes
                    .iter()
                    .find(|n| n.name == p.node)
                    .and_then(|n| n.inputs.first().cloned())
                    .unwrap_or_default();
                by_kind.entry(kind).or_default().push(Member {
                    block: b.index,
                    node: p.node.clone(),
                    weight: p.weight.clone(),
                    input,
                });
            }
        }
        let consts = g.constants();
        by_kind
            .into_iter()
            .map(|(kind, members)| {
                let params = members
                    .iter()
                    .map(|m| g.initializer(&m.weight).map_or(0, |t| t.numel()))
                    .sum();
                let check = Self::check(g, &consts, &uses, &members);
                (kind, members, params, check)
            })
            .collect()
    }

    /// Why `members` cannot share atoms, if they cannot.
    fn check(
        g: &Graph,
        consts: &std::collections::HashSet<String>,
        uses: &HashMap<&str, usize>,
        members: &[Member],
    ) -> std::result::Result<(), String> {
        if members.len() < 2 {
            return Err(format!("{} block, nothing to share across", members.len()));
        }
        let first = g
            .initializer(&members[0].weight)
            .ok_or_else(|| format!("'{}' is not an initializer", members[0].weight))?;
        let (dims, dtype) = (
            first.dims().to_vec(),
            first.dtype().map_err(|e| e.to_string())?,
        );
        if dims.len() != 2 || !matches!(dtype, DataType::F32 | DataType::F16) {
            return Err(format!("weights of {dims:?} {dtype}, not 2-D f32/f16"));
        }
        let mut seen = std::collections::HashSet::new();
        for m in members {
            let t = g
                .initializer(&m.weight)
                .filter(|_| consts.contains(&m.weight))
                .ok_or_else(|| format!("'{}' is not a constant initializer", m.weight))?;
            if t.dims() != dims.as_slice() || t.dtype().ok() != Some(dtype) {
                return Err(format!(
                    "'{}' is {:?}, another block's {dims:?}: the blocks differ in shape",
                    m.weight,
                    t.dims()
                ));
            }
            if !seen.insert(m.weight.as_str()) || uses.get(m.weight.as_str()) != Some(&1) {
                return Err(format!(
                    "'{}' is read by more than its projection (tied weights)",
                    m.weight
                ));
            }
        }
        Ok(())
    }
}

/// A projection type the model has, as the pass finds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Shareable {
    pub kind: Kind,
    pub blocks: usize,
    /// As stored, `[d0, d1]` (empty when the first block's weight is not an initializer).
    pub shape: Vec<i64>,
    /// Why its blocks cannot share atoms, if they cannot.
    pub why_not: Option<String>,
}

/// The projection types of `model`'s attention sublayers and whether each can share atoms: what
/// a search (`-O compress`) chooses among.
pub fn shareable(model: &Model) -> Vec<Shareable> {
    let pass = SharedAtoms {
        opts: ShareOptions::default(),
    };
    pass.find(&model.graph, &crate::structure::discover(model))
        .into_iter()
        .map(|(kind, members, _, check)| Shareable {
            kind,
            blocks: members.len(),
            shape: members
                .first()
                .and_then(|m| model.graph.initializer(&m.weight))
                .map(|t| t.dims().to_vec())
                .unwrap_or_default(),
            why_not: check.err(),
        })
        .collect()
}

/// The values the refined projections multiply (the types with a refinement rank that can
/// share): the calibration statistics the refinement is whitened by.
pub fn calibration_inputs(model: &Model, opts: &ShareOptions) -> Vec<String> {
    let pass = SharedAtoms { opts: opts.clone() };
    let mut names: Vec<String> = pass
        .find(&model.graph, &crate::structure::discover(model))
        .into_iter()
        .filter(|(kind, _, _, check)| {
            check.is_ok()
                && opts.atoms.get(*kind).is_some()
                && opts.refine.get(*kind).unwrap_or(0) > 0
        })
        .flat_map(|(_, members, _, _)| members.into_iter().map(|m| m.input))
        .filter(|x| !x.is_empty())
        .collect();
    names.sort();
    names.dedup();
    names
}

impl ShareKind {
    /// One line: the type's blocks, atoms, parameters and errors.
    pub fn describe(&self) -> String {
        let mean = |f: &dyn Fn(&ShareLayer) -> Option<f64>| -> Option<f64> {
            let v: Vec<f64> = self.layers.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let shared = mean(&|l| Some(l.rel_error_shared)).unwrap_or(0.0);
        let after = mean(&|l| Some(l.rel_error)).unwrap_or(0.0);
        let output = mean(&|l| l.output_rel_error)
            .map(|e| format!(", on the calibration inputs {e:.4}"))
            .unwrap_or_default();
        format!(
            "{}: {} blocks of {:?}, {} atoms{} ({:.1}% of the spread kept{}), refinement rank {}; \
             parameters {} → {} ({:.1}% removed); mean relative error {:.4} shared, {:.4} after{}",
            self.kind.label(),
            self.blocks,
            self.shape,
            self.atoms,
            if self.mean { " + mean" } else { "" },
            100.0 * self.energy_kept,
            if self.atoms < self.atoms_asked {
                format!("; {} asked", self.atoms_asked)
            } else {
                String::new()
            },
            self.refine_rank,
            self.params_before,
            self.params_after,
            100.0 * (1.0 - self.params_after as f64 / self.params_before.max(1) as f64),
            shared,
            after,
            output
        )
    }
}

impl ShareReport {
    /// One line: the types shared and the attention parameters removed.
    pub fn summary(&self) -> String {
        let kinds: Vec<String> = self
            .kinds
            .iter()
            .map(|k| {
                format!(
                    "{} {}{} atoms{}",
                    k.kind.label(),
                    k.atoms,
                    if k.mean { "+mean" } else { "" },
                    if k.refine_rank > 0 {
                        format!(" rank {}", k.refine_rank)
                    } else {
                        String::new()
                    }
                )
            })
            .collect();
        let removed =
            1.0 - self.attention_params_after as f64 / self.attention_params_before.max(1) as f64;
        format!(
            "shared atoms ({}): attention parameters {} → {} ({:.1}% removed)",
            kinds.join(", "),
            self.attention_params_before,
            self.attention_params_after,
            100.0 * removed
        )
    }
}

/// Values `at..at + len` of every block's weight, as f32.
fn read_chunk(
    tensors: &[&Tensor],
    dtype: DataType,
    at: usize,
    len: usize,
) -> Result<Vec<Vec<f32>>> {
    tensors
        .iter()
        .map(|t| read_values(t, dtype, at, len))
        .collect()
}

/// `rows` less `mean`, element by element.
fn centre(rows: &mut [Vec<f32>], mean: &[f32]) {
    for r in rows {
        r.iter_mut().zip(mean).for_each(|(x, m)| *x -= m);
    }
}

/// Reads values `at..at + len` of `t` as f32.
fn read_values(t: &Tensor, dtype: DataType, at: usize, len: usize) -> Result<Vec<f32>> {
    let elem = if dtype == DataType::F16 { 2 } else { 4 };
    Ok(to_f32(&t.read_range(at * elem, len * elem)?, dtype))
}

/// Shares atoms among `members` (checked) of `kind`, rewriting the graph: the type's report.
fn share_kind(
    model: &mut Model,
    kind: Kind,
    members: &[Member],
    count: Count,
    o: &ShareOptions,
) -> Result<ShareKind> {
    let g = &model.graph;
    let l = members.len();
    let first = g.initializer(&members[0].weight).expect("checked");
    let dims = first.dims().to_vec();
    let dtype = first.dtype()?;
    let numel = first.numel() as usize;
    let tensors: Vec<&Tensor> = members
        .iter()
        .map(|m| g.initializer(&m.weight).expect("checked"))
        .collect();
    // Pass 1: the mean and the Gram of the centred stack, a chunk of every block at a time.
    let mut mean = vec![0f32; if o.mean { numel } else { 0 }];
    let mut gram = vec![0f64; l * l];
    let mut at = 0;
    while at < numel {
        let len = CHUNK.min(numel - at);
        let mut rows = read_chunk(&tensors, dtype, at, len)?;
        if o.mean {
            let m = &mut mean[at..at + len];
            for e in 0..len {
                let s: f64 = rows.iter().map(|r| r[e] as f64).sum();
                m[e] = (s / l as f64) as f32;
            }
            centre(&mut rows, m);
        }
        for i in 0..l {
            for j in 0..=i {
                let d: f64 = rows[i]
                    .iter()
                    .zip(&rows[j])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                gram[i * l + j] += d;
                if i != j {
                    gram[j * l + i] += d;
                }
            }
        }
        at += len;
    }
    // The eigenpairs, largest first; atoms of (numerically) no weight are dropped.
    let gm = Mat::<f64>::from_fn(l, l, |i, j| gram[i * l + j]);
    let eig = gm
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| wcc_ir::IrError::Other(format!("shared atoms: eigendecomposition: {e:?}")))?;
    let (u, lambda) = (eig.U(), eig.S().column_vector());
    let trace: f64 = (0..l).map(|i| gram[i * l + i]).sum();
    let asked = count.of(l);
    let most = if o.mean { l - 1 } else { l };
    let mut picked: Vec<(f64, Vec<f64>)> = vec![];
    for idx in (0..l).rev().take(asked.min(most)) {
        let lam = lambda[idx];
        if lam <= 1e-12 * trace.max(f64::MIN_POSITIVE) {
            break;
        }
        picked.push((lam, (0..l).map(|b| u[(b, idx)]).collect()));
    }
    let energy_kept = if trace > 0.0 {
        picked.iter().map(|p| p.0).sum::<f64>() / trace
    } else {
        1.0
    };
    let s = picked.len();
    // Pass 2: the atoms, `[S', numel]` (the mean first when kept).
    let rows_d = s + usize::from(o.mean);
    let mut book = vec![0f32; rows_d * numel];
    if o.mean {
        book[..numel].copy_from_slice(&mean);
    }
    let mut at = 0;
    while at < numel {
        let len = CHUNK.min(numel - at);
        let mut rows = read_chunk(&tensors, dtype, at, len)?;
        if o.mean {
            centre(&mut rows, &mean[at..at + len]);
        }
        for (a, (lam, vec)) in picked.iter().enumerate() {
            let inv = 1.0 / lam.sqrt();
            let d = &mut book[(a + usize::from(o.mean)) * numel + at..][..len];
            for (e, y) in d.iter_mut().enumerate() {
                let v: f64 = vec.iter().zip(&rows).map(|(c, r)| c * r[e] as f64).sum();
                *y = (v * inv) as f32;
            }
        }
        at += len;
    }
    // The atoms as stored (rounded to the weights' type): the coefficients and residuals are
    // those of what the graph will compute.
    let book_bytes = float_bytes(&book, dtype);
    let book = to_f32(&book_bytes, dtype);
    let coeffs: Vec<Vec<f32>> = (0..l)
        .map(|b| {
            let mut c = vec![];
            if o.mean {
                c.push(1.0);
            }
            c.extend(picked.iter().map(|(lam, vec)| (lam.sqrt() * vec[b]) as f32));
            to_f32(&float_bytes(&c, dtype), dtype)
        })
        .collect();
    let rank = o.refine.get(kind).unwrap_or(0);
    // Per block: its synthesized weight's error, and the refinement's factors.
    let mut layers = vec![];
    let mut refinements = vec![];
    let layout_kn = kn_layout(g, &members[0].node, &members[0].weight);
    for (b, m) in members.iter().enumerate() {
        let w = read_values(tensors[b], dtype, 0, numel)?;
        let mut w_hat = vec![0f32; numel];
        for (a, c) in coeffs[b].iter().enumerate() {
            let d = &book[a * numel..(a + 1) * numel];
            w_hat.iter_mut().zip(d).for_each(|(y, x)| *y += c * x);
        }
        let gram = o
            .stats
            .grams
            .as_ref()
            .and_then(|h| h.get(&m.input))
            .filter(|h| h.k == if layout_kn { dims[0] } else { dims[1] } as usize);
        let rel = |w_hat: &[f32]| rel_error(&w, w_hat);
        let rel_error_shared = rel(&w_hat);
        let mut factors = None;
        if rank > 0 {
            let (a, bm) = refine(&w, &w_hat, &dims, layout_kn, rank, gram, o.stats.damp)?;
            let r = a.len() / dims_k(&dims, layout_kn);
            // Add A·B (as stored) to Ŵ.
            add_product(&mut w_hat, &a, &bm, &dims, layout_kn, r);
            factors = Some((a, bm, r));
        }
        let output_rel_error = gram.map(|h| output_error(h, &w, &w_hat, &dims, layout_kn));
        layers.push(ShareLayer {
            block: m.block,
            weight: m.weight.clone(),
            node: m.node.clone(),
            rel_error: rel(&w_hat),
            output_rel_error,
            rel_error_shared,
        });
        refinements.push(factors);
    }
    // Emission.
    let g = &mut model.graph;
    let base = format!("shared_atoms_{}", kind.label());
    let book_name = add(
        g,
        &format!("{base}_book"),
        dtype,
        &[rows_d as i64, numel as i64],
        book_bytes,
    )?;
    let shape_raw: Vec<u8> = dims.iter().flat_map(|d| d.to_le_bytes()).collect();
    let shape_name = add(g, &format!("{base}_shape"), DataType::I64, &[2], shape_raw)?;
    let elem = if dtype == DataType::F16 { 2u64 } else { 4 };
    let mut params_after = (rows_d * numel) as u64;
    for ((m, c), factors) in members.iter().zip(&coeffs).zip(refinements) {
        let w = m.weight.clone();
        g.initializers.retain(|t| t.name() != w);
        let c_name = add(
            g,
            &format!("{w}_atom_coeffs"),
            dtype,
            &[1, rows_d as i64],
            float_bytes(c, dtype),
        )?;
        params_after += rows_d as u64;
        let flat = fresh_name(g, &format!("{w}_synth_flat"));
        let mut nodes = vec![Node::new(
            &flat,
            "MatMul",
            vec![c_name, book_name.clone()],
            vec![flat.clone()],
        )];
        let shaped = if factors.is_some() {
            fresh_name(g, &format!("{w}_synth_shared"))
        } else {
            w.clone()
        };
        nodes.push(Node::new(
            &format!("{shaped}_reshape"),
            "Reshape",
            vec![flat, shape_name.clone()],
            vec![shaped.clone()],
        ));
        if let Some((a, bm, r)) = factors {
            params_after += (a.len() + bm.len()) as u64;
            // As stored: [K, N] = A·B; [N, K] = Bᵀ·Aᵀ.
            let (k, n) = (dims_k(&dims, layout_kn), numel / dims_k(&dims, layout_kn));
            let (left, right, ld, rd) = if layout_kn {
                (a, bm, [k as i64, r as i64], [r as i64, n as i64])
            } else {
                (
                    transpose(&bm, r, n),
                    transpose(&a, k, r),
                    [n as i64, r as i64],
                    [r as i64, k as i64],
                )
            };
            let ln = add(
                g,
                &format!("{w}_refine_a"),
                dtype,
                &ld,
                float_bytes(&left, dtype),
            )?;
            let rn = add(
                g,
                &format!("{w}_refine_b"),
                dtype,
                &rd,
                float_bytes(&right, dtype),
            )?;
            let ab = fresh_name(g, &format!("{w}_refine"));
            nodes.push(Node::new(&ab, "MatMul", vec![ln, rn], vec![ab.clone()]));
            nodes.push(Node::new(
                &format!("{w}_synth"),
                "Add",
                vec![shaped, ab],
                vec![w.clone()],
            ));
        }
        g.nodes.extend(nodes);
    }
    Ok(ShareKind {
        kind,
        blocks: l,
        shape: dims,
        atoms_asked: asked,
        atoms: s,
        mean: o.mean,
        refine_rank: rank,
        params_before: (l * numel) as u64,
        params_after,
        bytes_before: (l * numel) as u64 * elem,
        bytes_after: params_after * elem,
        energy_kept,
        layers,
    })
}

/// Whether the weight `w` read by `node` is stored `[K, N]` (MatMul's B, Gemm without transB,
/// ONNX Runtime's Attention) rather than `[N, K]`.
fn kn_layout(g: &Graph, node: &str, w: &str) -> bool {
    match g.nodes.iter().find(|n| n.name == node) {
        Some(n) if n.is("Gemm") => n.attr_i("transB").unwrap_or(0) == 0,
        Some(n) if n.inputs.iter().any(|x| x == w) => true,
        // Read through a Transpose (`[N, K]` stored).
        _ => false,
    }
}

/// K of a weight of `dims` stored `[K, N]` (`kn`) or `[N, K]`.
fn dims_k(dims: &[i64], kn: bool) -> usize {
    (if kn { dims[0] } else { dims[1] }) as usize
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

fn rel_error(w: &[f32], w_hat: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (a, b) in w.iter().zip(w_hat) {
        d += (*a as f64 - *b as f64).powi(2);
        n += (*a as f64).powi(2);
    }
    if n > 0.0 {
        (d / n).sqrt()
    } else {
        0.0
    }
}

/// `w` (as stored) as `[K, N]` f64.
fn as_kn(w: &[f32], dims: &[i64], kn: bool) -> Mat<f64> {
    let (d0, d1) = (dims[0] as usize, dims[1] as usize);
    if kn {
        Mat::from_fn(d0, d1, |i, j| w[i * d1 + j] as f64)
    } else {
        Mat::from_fn(d1, d0, |i, j| w[j * d1 + i] as f64)
    }
}

/// `‖X(W − Ŵ)‖/‖XW‖` on the calibration statistics.
fn output_error(h: &Gram, w: &[f32], w_hat: &[f32], dims: &[i64], kn: bool) -> f64 {
    let k = h.k;
    let hm = Mat::<f64>::from_fn(k, k, |i, j| h.h[i * k + j]);
    let quad = |m: &Mat<f64>| -> f64 {
        let hmm = &hm * m;
        let mut s = 0.0;
        for j in 0..m.ncols() {
            for i in 0..k {
                s += hmm[(i, j)] * m[(i, j)];
            }
        }
        s
    };
    let d: Vec<f32> = w.iter().zip(w_hat).map(|(a, b)| a - b).collect();
    let base = quad(&as_kn(w, dims, kn));
    if base > 0.0 {
        (quad(&as_kn(&d, dims, kn)).max(0.0) / base).sqrt()
    } else {
        0.0
    }
}

/// The rank-`rank` refinement of `w − w_hat` (see the module doc): `A` `[K, r]` and `B`
/// `[r, N]`, row-major, `r ≤ rank`.
fn refine(
    w: &[f32],
    w_hat: &[f32],
    dims: &[i64],
    kn: bool,
    rank: usize,
    gram: Option<&Gram>,
    damp: f64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let d: Vec<f32> = w.iter().zip(w_hat).map(|(a, b)| a - b).collect();
    let e = as_kn(&d, dims, kn);
    let (k, n) = (e.nrows(), e.ncols());
    let err = |what: &str| wcc_ir::IrError::Other(format!("shared atoms: refinement: {what}"));
    // The whitening factor S (H = S Sᵀ), damped as GPTQ damps.
    let chol = match gram {
        Some(h) => {
            let mean_diag = (0..k).map(|i| h.h[i * k + i]).sum::<f64>() / k.max(1) as f64;
            let delta = (damp * mean_diag).max(1e-12);
            let hm = Mat::<f64>::from_fn(k, k, |i, j| {
                h.h[i * k + j] + if i == j { delta } else { 0.0 }
            });
            Some(
                hm.llt(Side::Lower)
                    .map_err(|_| err("the calibration statistics are not positive definite"))?
                    .L()
                    .to_owned(),
            )
        }
        None => None,
    };
    let m = match &chol {
        Some(s) => s.transpose() * &e,
        None => e,
    };
    let svd = m.thin_svd().map_err(|_| err("the SVD did not converge"))?;
    let r = rank.min(k).min(n);
    let sv = svd.S().column_vector();
    let mut us = Mat::<f64>::from_fn(k, r, |i, j| svd.U()[(i, j)] * sv[j]);
    if let Some(s) = &chol {
        s.transpose().solve_upper_triangular_in_place(&mut us);
    }
    let a: Vec<f32> = (0..k)
        .flat_map(|i| (0..r).map(move |j| (i, j)))
        .map(|(i, j)| us[(i, j)] as f32)
        .collect();
    let v = svd.V();
    let b: Vec<f32> = (0..r)
        .flat_map(|j| (0..n).map(move |c| (j, c)))
        .map(|(j, c)| v[(c, j)] as f32)
        .collect();
    Ok((a, b))
}

/// `w_hat += A·B`, `A·B` `[K, N]` laid out as `w_hat` is stored.
fn add_product(w_hat: &mut [f32], a: &[f32], b: &[f32], dims: &[i64], kn: bool, r: usize) {
    let k = dims_k(dims, kn);
    let n = w_hat.len() / k.max(1);
    for i in 0..k {
        for c in 0..n {
            let v: f32 = (0..r).map(|j| a[i * r + j] * b[j * n + c]).sum();
            let at = if kn { i * n + c } else { c * k + i };
            w_hat[at] += v;
        }
    }
}

fn add(g: &mut Graph, base: &str, dtype: DataType, dims: &[i64], raw: Vec<u8>) -> Result<String> {
    let name = fresh_name(g, base);
    g.initializers
        .push(Tensor::from_raw(&name, dtype, dims, raw)?);
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_per_type_and_for_all() {
        let a: AtomSpec = "all:3".parse().unwrap();
        assert_eq!(a.get(Kind::Q), Some(Count::Atoms(3)));
        assert_eq!(a.get(Kind::Qkv), Some(Count::Atoms(3)));
        let a: AtomSpec = "q:2,o:0.5".parse().unwrap();
        assert_eq!(a.get(Kind::O), Some(Count::Fraction(0.5)));
        assert_eq!(a.get(Kind::K), None);
        assert!("q:0".parse::<AtomSpec>().is_err());
        assert!("x:2".parse::<AtomSpec>().is_err());
        assert!("q:1.5".parse::<AtomSpec>().is_err());
        let r: RankSpec = "8".parse().unwrap();
        assert_eq!(
            (r.get(Kind::Q), r.get(Kind::K), r.get(Kind::O)),
            (Some(8), Some(4), Some(8))
        );
        let r: RankSpec = "k:6".parse().unwrap();
        assert_eq!((r.get(Kind::K), r.get(Kind::Q)), (Some(6), None));
        assert!("q:-1".parse::<RankSpec>().is_err());
        assert_eq!(Count::Fraction(0.5).of(6), 3);
        assert_eq!(Count::Fraction(0.01).of(6), 1);
    }

    /// The whitened refinement lowers the output error on the statistics more than the plain
    /// one does, and the plain one is the truncated SVD (its error the tail singular values).
    #[test]
    fn whitening_favours_the_directions_the_inputs_use() {
        let (k, n) = (12, 10);
        let mut seed = 1u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32
        };
        let w: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
        let zero = vec![0f32; k * n];
        // Inputs that use the first columns far more than the others.
        let mut h = Gram::new(k);
        let x: Vec<f64> = (0..200 * k)
            .map(|i| rnd() as f64 * if i % k < 3 { 10.0 } else { 0.1 })
            .collect();
        h.add_rows(&x);
        let dims = [k as i64, n as i64];
        let score = |gram: Option<&Gram>| {
            let (a, b) = refine(&w, &zero, &dims, true, 3, gram, 0.01).unwrap();
            let mut w_hat = zero.clone();
            add_product(&mut w_hat, &a, &b, &dims, true, 3);
            (
                output_error(&h, &w, &w_hat, &dims, true),
                rel_error(&w, &w_hat),
            )
        };
        let (out_white, rel_white) = score(Some(&h));
        let (out_plain, rel_plain) = score(None);
        assert!(out_white < 0.5 * out_plain, "{out_white} vs {out_plain}");
        assert!(rel_plain < rel_white, "{rel_plain} vs {rel_white}");
    }
}
