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
//! - **Layer groups** (`groups` = G > 1): G runs of consecutive blocks, each of at least two,
//!   with a mean and atoms of their own. The paper forms the groups where the blocks' hidden
//!   states are similar, a proxy for where the weights share; here the split is the one whose
//!   atoms leave the least of the stack, `Σ_g (tr G_g − Σ_{s≤S} λ_s(G_g))` with `G_g` the
//!   centred Gram of group `g` (double-centred from the one uncentred Gram), found exactly by
//!   dynamic programming over the split points.
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
//! so. Alternatively (`Emission::Project`) a `MatMul(x, W_l)` becomes
//! `Σ_s c_ls (x·D_s)`: `x` times the atoms side by side (`[K, S'·N]`), mixed by `c_l`, which
//! keeps the saving in memory under ONNX Runtime's defaults at `S'` times the multiply-adds; the
//! cost model ([`Cost`]) chooses it only when it also costs fewer multiply-adds per call than
//! the synthesis run every call (a handful of rows per call).
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

/// Layer groups of a type: runs of consecutive blocks with a dictionary each (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Groups(pub usize);

/// `--share-groups G`: layer groups per type (`all:G`, a bare `G`, or `q:G,…`).
pub type GroupSpec = PerKind<Groups>;

impl std::str::FromStr for PerKind<Groups> {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        PerKind::parse_with(
            s,
            |v| match v.parse::<usize>() {
                Ok(g) if g >= 1 => Ok(Groups(g)),
                _ => Err(format!("'{v}': not a number of layer groups (1 or more)")),
            },
            |_, g| g,
        )
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
    /// Runs of consecutive blocks with a dictionary each, per type (absent: one for all the
    /// blocks).
    pub groups: GroupSpec,
    /// How the weights reach their projections (the cost model's choice by default).
    pub emit: ShareEmit,
}

/// How a shared type's weights reach their projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Emission {
    /// Each block's weight computed from the atoms (`MatMul(c_l, D) → Reshape`), read by the
    /// projection as before.
    Synthesize,
    /// The projection's input multiplied by the atoms side by side, the products mixed by the
    /// block's coefficients: no block's weight exists, at `S'` times the multiply-adds.
    Project,
}

/// `--share-emit`: an emission, or the cost model's choice ([`Cost`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShareEmit {
    #[default]
    Auto,
    Synthesize,
    Project,
}

impl std::str::FromStr for ShareEmit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(ShareEmit::Auto),
            "synthesize" => Ok(ShareEmit::Synthesize),
            "project" => Ok(ShareEmit::Project),
            _ => Err(format!("'{s}': give auto, synthesize or project")),
        }
    }
}

/// The emission cost model: multiply-adds per call of a shared projection in each form, the
/// synthesis counted as run every call (constant folding off, the only way a synthesized form
/// keeps its saving in session memory; with folding on it is free and the weight dense).
/// With `T` rows of `x` per call, `S'` atoms (the mean included), refinement rank `r`:
/// synthesize `S'·K·N (+ r·K·N + K·N) + T·K·N`; project `T·K·S'·N + T·S'·N (+ T·r·(K+N) + T·N)`.
/// Projecting is cheaper only for a few rows per call (a decoder's one-token step) and is
/// chosen when it is; rows unknown (symbolic dims) or an input that cannot be projected
/// synthesize.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Cost {
    /// Whether every block's projection is a `MatMul(x, W)` with `x` of known rank ≥ 2.
    pub projectable: bool,
    /// Rows of `x` per call, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synthesize_macs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_macs: Option<u64>,
}

impl Cost {
    fn of(rows: Option<Option<u64>>, s: usize, k: usize, n: usize, r: usize) -> Cost {
        let (s, k, n, r) = (s as u64, k as u64, n as u64, r as u64);
        let t = rows.flatten();
        let refine = r > 0;
        Cost {
            projectable: rows.is_some(),
            rows: t,
            synthesize_macs: t
                .map(|t| s * k * n + if refine { r * k * n + k * n } else { 0 } + t * k * n),
            project_macs: t.map(|t| {
                t * k * s * n + t * s * n + if refine { t * r * (k + n) + t * n } else { 0 }
            }),
        }
    }

    /// The cheaper form (synthesize unless projecting is known to cost less).
    pub fn choice(&self) -> Emission {
        match (self.project_macs, self.synthesize_macs) {
            (Some(p), Some(s)) if p < s => Emission::Project,
            _ => Emission::Synthesize,
        }
    }

    /// Why: the figures the choice came from.
    pub fn why(&self) -> String {
        match (self.rows, self.project_macs, self.synthesize_macs) {
            _ if !self.projectable => NOT_PROJECTABLE.to_string(),
            (Some(t), Some(p), Some(s)) => format!(
                "{t} rows per call: project {p} multiply-adds, synthesize {s} (folding off)"
            ),
            _ => "rows per call unknown (symbolic dims)".to_string(),
        }
    }
}

/// One layer group of a shared type, for the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShareGroup {
    pub blocks: Vec<usize>,
    pub atoms: usize,
    pub energy_kept: f64,
}

impl Default for ShareOptions {
    fn default() -> Self {
        ShareOptions {
            atoms: PerKind::default(),
            mean: true,
            refine: PerKind::default(),
            stats: crate::Statistics::default(),
            groups: PerKind::default(),
            emit: ShareEmit::Auto,
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
    /// The layer groups (one when not grouped), each with its own atoms: as many as asked, or
    /// as make groups of two blocks.
    pub groups_asked: usize,
    pub groups: Vec<ShareGroup>,
    /// How the weights reach their projections, and the cost model's figures (the first
    /// group's).
    pub emission: Emission,
    pub cost: Cost,
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
                       disabled_optimizers=['ConstantFolding'])); a type emitted as an input \
                       projection has nothing to fold";

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
        ) + &self.describe_groups()
            + &format!(
                "; {}: {}",
                match self.emission {
                    Emission::Synthesize => "weights synthesized",
                    Emission::Project => "input projected onto the atoms",
                },
                self.cost.why()
            )
    }

    /// The layer groups, when more than one: `; groups 0-5 (3 atoms, 98.1%), 6-11 (…)`.
    fn describe_groups(&self) -> String {
        if self.groups.len() < 2 {
            return if self.groups_asked > 1 {
                format!(
                    "; one group ({} asked, groups need two blocks each)",
                    self.groups_asked
                )
            } else {
                String::new()
            };
        }
        let parts: Vec<String> = self
            .groups
            .iter()
            .map(|g| {
                format!(
                    "{}-{} ({} atoms, {:.1}%)",
                    g.blocks.first().copied().unwrap_or(0),
                    g.blocks.last().copied().unwrap_or(0),
                    g.atoms,
                    100.0 * g.energy_kept
                )
            })
            .collect();
        format!("; groups {}", parts.join(", "))
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
                    match k.groups.len() {
                        0 | 1 => k.atoms.to_string(),
                        g => {
                            let each: Vec<String> =
                                k.groups.iter().map(|x| x.atoms.to_string()).collect();
                            format!("{g} groups of {}", each.join("/"))
                        }
                    },
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

/// A refinement: `A` `[K, r]`, `B` `[r, N]` (row-major) and `r`.
type Factors = (Vec<f32>, Vec<f32>, usize);

/// One group's fit: its atoms (the mean first when kept), coefficients, refinements, report.
struct Fit {
    asked: usize,
    atoms: usize,
    /// Rows of the book: the atoms and the mean.
    rows: usize,
    /// `[rows, numel]` as stored (the weights' type), and as f32.
    book_bytes: Vec<u8>,
    book: Vec<f32>,
    coeffs: Vec<Vec<f32>>,
    /// `(A, B, r)` per block (as `[K, r]`, `[r, N]`), when refined.
    refinements: Vec<Option<Factors>>,
    kept: f64,
    trace: f64,
    layers: Vec<ShareLayer>,
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
    let layout_kn = kn_layout(g, &members[0].node, &members[0].weight);
    // Groups of at least two blocks: as many as asked, or as the blocks allow.
    let groups_asked = o.groups.get(kind).map_or(1, |g| g.0.max(1));
    let segments = if groups_asked.min(l / 2) > 1 {
        let tensors: Vec<&Tensor> = members
            .iter()
            .map(|m| g.initializer(&m.weight).expect("checked"))
            .collect();
        let (_, gram) = stack_gram(&tensors, dtype, numel, false)?;
        segment(&gram, l, groups_asked.min(l / 2), count, o.mean)?
    } else {
        std::iter::once(0..l).collect()
    };
    let (k, n) = (dims_k(&dims, layout_kn), numel / dims_k(&dims, layout_kn));
    let elem = if dtype == DataType::F16 { 2u64 } else { 4 };
    let (mut groups, mut layers) = (vec![], vec![]);
    let (mut params_after, mut kept, mut trace, mut asked, mut atoms) = (0u64, 0.0, 0.0, 0, 0);
    let mut emission = None;
    for (i, seg) in segments.iter().enumerate() {
        let part = &members[seg.clone()];
        let fit = fit_group(&model.graph, kind, part, count, o, &dims, dtype, layout_kn)?;
        let projectable = projection(model, part, layout_kn);
        let tokens = projectable.map(|p| p.rows);
        let r = fit
            .refinements
            .iter()
            .flatten()
            .map(|f| f.2)
            .max()
            .unwrap_or(0);
        let cost = Cost::of(tokens, fit.rows, k, n, r);
        let chosen = match o.emit {
            ShareEmit::Synthesize => Emission::Synthesize,
            // What cannot be projected is synthesized; the report says why.
            ShareEmit::Project if projectable.is_some() => Emission::Project,
            ShareEmit::Project => Emission::Synthesize,
            ShareEmit::Auto => cost.choice(),
        };
        let base = if segments.len() > 1 {
            format!("shared_atoms_{}_g{i}", kind.label())
        } else {
            format!("shared_atoms_{}", kind.label())
        };
        params_after += match chosen {
            Emission::Synthesize => {
                emit_synthesized(&mut model.graph, &base, part, &fit, &dims, dtype, layout_kn)?
            }
            Emission::Project => {
                let rank = projectable.expect("projected only when projectable").rank;
                emit_projected(&mut model.graph, &base, part, &fit, (k, n, rank), dtype)?
            }
        };
        emission.get_or_insert((chosen, cost));
        groups.push(ShareGroup {
            blocks: part.iter().map(|m| m.block).collect(),
            atoms: fit.atoms,
            energy_kept: if fit.trace > 0.0 {
                fit.kept / fit.trace
            } else {
                1.0
            },
        });
        kept += fit.kept;
        trace += fit.trace;
        asked += fit.asked;
        atoms += fit.atoms;
        layers.extend(fit.layers);
    }
    let (emission, cost) = emission.expect("at least one group");
    Ok(ShareKind {
        kind,
        blocks: l,
        shape: dims,
        atoms_asked: asked,
        atoms,
        mean: o.mean,
        refine_rank: o.refine.get(kind).unwrap_or(0),
        params_before: (l * numel) as u64,
        params_after,
        bytes_before: (l * numel) as u64 * elem,
        bytes_after: params_after * elem,
        energy_kept: if trace > 0.0 { kept / trace } else { 1.0 },
        groups_asked,
        groups,
        emission,
        cost,
        layers,
    })
}

/// The mean (when `centred`, else empty) and the `L×L` Gram of the (centred) stack of
/// `tensors`, a chunk of every block at a time.
fn stack_gram(
    tensors: &[&Tensor],
    dtype: DataType,
    numel: usize,
    centred: bool,
) -> Result<(Vec<f32>, Vec<f64>)> {
    let l = tensors.len();
    let mut mean = vec![0f32; if centred { numel } else { 0 }];
    let mut gram = vec![0f64; l * l];
    let mut at = 0;
    while at < numel {
        let len = CHUNK.min(numel - at);
        let mut rows = read_chunk(tensors, dtype, at, len)?;
        if centred {
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
    Ok((mean, gram))
}

/// The eigenpairs of the symmetric `n×n` `gram`, largest first.
fn eigen(gram: &[f64], n: usize) -> Result<Vec<(f64, Vec<f64>)>> {
    let gm = Mat::<f64>::from_fn(n, n, |i, j| gram[i * n + j]);
    let eig = gm
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| wcc_ir::IrError::Other(format!("shared atoms: eigendecomposition: {e:?}")))?;
    let (u, lambda) = (eig.U(), eig.S().column_vector());
    Ok((0..n)
        .rev()
        .map(|idx| (lambda[idx], (0..n).map(|b| u[(b, idx)]).collect()))
        .collect())
}

/// What `atoms` atoms (and the mean) leave of the stack of blocks `seg`, in squared Frobenius
/// norm, from the uncentred Gram of all `l` blocks (centred here, `G − r1ᵀ − 1rᵀ + t`).
fn tail_energy(
    gram: &[f64],
    l: usize,
    seg: std::ops::Range<usize>,
    atoms: usize,
    mean: bool,
) -> Result<f64> {
    let n = seg.len();
    let mut sub: Vec<f64> = (0..n * n)
        .map(|e| gram[(seg.start + e / n) * l + seg.start + e % n])
        .collect();
    if mean {
        let r: Vec<f64> = (0..n)
            .map(|i| sub[i * n..(i + 1) * n].iter().sum::<f64>() / n as f64)
            .collect();
        let t = r.iter().sum::<f64>() / n as f64;
        for i in 0..n {
            for j in 0..n {
                sub[i * n + j] += t - r[i] - r[j];
            }
        }
    }
    let trace: f64 = (0..n).map(|i| sub[i * n + i]).sum();
    let most = if mean { n - 1 } else { n };
    let kept: f64 = eigen(&sub, n)?
        .iter()
        .take(atoms.min(most))
        .map(|p| p.0.max(0.0))
        .sum();
    Ok((trace - kept).max(0.0))
}

/// Layer groups: the `groups` runs of consecutive blocks (each at least 2) whose own atoms
/// leave the least of the stack (the summed [`tail_energy`]), by dynamic programming over the
/// split points.
fn segment(
    gram: &[f64],
    l: usize,
    groups: usize,
    count: Count,
    mean: bool,
) -> Result<Vec<std::ops::Range<usize>>> {
    if l < 2 * groups {
        return Err(wcc_ir::IrError::Other(format!(
            "shared atoms: {l} blocks cannot make {groups} groups of at least 2"
        )));
    }
    let mut cost = vec![f64::INFINITY; (l + 1) * (l + 1)];
    for i in 0..l {
        for j in i + 2..=l {
            cost[i * (l + 1) + j] = tail_energy(gram, l, i..j, count.of(j - i), mean)?;
        }
    }
    // best[g][j]: the least for blocks 0..j in g groups; from[g][j] where the last one starts.
    let mut best = vec![vec![f64::INFINITY; l + 1]; groups + 1];
    let mut from = vec![vec![0usize; l + 1]; groups + 1];
    best[0][0] = 0.0;
    for g in 1..=groups {
        for j in 2 * g..=l {
            for i in 2 * (g - 1)..=j - 2 {
                let c = best[g - 1][i] + cost[i * (l + 1) + j];
                if c < best[g][j] {
                    best[g][j] = c;
                    from[g][j] = i;
                }
            }
        }
    }
    let mut out = vec![];
    let mut j = l;
    for g in (1..=groups).rev() {
        let i = from[g][j];
        out.push(i..j);
        j = i;
    }
    out.reverse();
    Ok(out)
}

/// Fits one group's atoms (matrix PCA of its blocks) and refinements.
#[allow(clippy::too_many_arguments)]
fn fit_group(
    g: &Graph,
    kind: Kind,
    members: &[Member],
    count: Count,
    o: &ShareOptions,
    dims: &[i64],
    dtype: DataType,
    layout_kn: bool,
) -> Result<Fit> {
    let l = members.len();
    let numel = dims.iter().product::<i64>() as usize;
    let tensors: Vec<&Tensor> = members
        .iter()
        .map(|m| g.initializer(&m.weight).expect("checked"))
        .collect();
    // Pass 1: the mean and the Gram of the centred stack.
    let (mean, gram) = stack_gram(&tensors, dtype, numel, o.mean)?;
    // The eigenpairs, largest first; atoms of (numerically) no weight are dropped.
    let trace: f64 = (0..l).map(|i| gram[i * l + i]).sum();
    let asked = count.of(l);
    let most = if o.mean { l - 1 } else { l };
    let picked: Vec<(f64, Vec<f64>)> = eigen(&gram, l)?
        .into_iter()
        .take(asked.min(most))
        .take_while(|(lam, _)| *lam > 1e-12 * trace.max(f64::MIN_POSITIVE))
        .collect();
    let kept = if trace > 0.0 {
        picked.iter().map(|p| p.0).sum::<f64>()
    } else {
        0.0
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
            .filter(|h| h.k == dims_k(dims, layout_kn));
        let rel = |w_hat: &[f32]| rel_error(&w, w_hat);
        let rel_error_shared = rel(&w_hat);
        let mut factors = None;
        if rank > 0 {
            let (a, bm) = refine(&w, &w_hat, dims, layout_kn, rank, gram, o.stats.damp)?;
            let r = a.len() / dims_k(dims, layout_kn);
            // Add A·B (as stored) to Ŵ.
            add_product(&mut w_hat, &a, &bm, dims, layout_kn, r);
            factors = Some((a, bm, r));
        }
        let output_rel_error = gram.map(|h| output_error(h, &w, &w_hat, dims, layout_kn));
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
    Ok(Fit {
        asked,
        atoms: s,
        rows: rows_d,
        book_bytes,
        book,
        coeffs,
        refinements,
        kept,
        trace,
        layers,
    })
}

/// Emits `fit` as synthesized weights: each block's weight initializer becomes
/// `MatMul(c_l, book) → Reshape` (`+ A·B`) under its own name. The parameters stored.
fn emit_synthesized(
    g: &mut Graph,
    base: &str,
    members: &[Member],
    fit: &Fit,
    dims: &[i64],
    dtype: DataType,
    layout_kn: bool,
) -> Result<u64> {
    let numel = fit.book.len() / fit.rows.max(1);
    let book_name = add(
        g,
        &format!("{base}_book"),
        dtype,
        &[fit.rows as i64, numel as i64],
        fit.book_bytes.clone(),
    )?;
    let shape_raw: Vec<u8> = dims.iter().flat_map(|d| d.to_le_bytes()).collect();
    let shape_name = add(g, &format!("{base}_shape"), DataType::I64, &[2], shape_raw)?;
    let mut params = (fit.rows * numel) as u64;
    for ((m, c), factors) in members.iter().zip(&fit.coeffs).zip(&fit.refinements) {
        let w = m.weight.clone();
        g.initializers.retain(|t| t.name() != w);
        let c_name = add_coeffs(g, &w, c, dtype)?;
        params += fit.rows as u64;
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
            params += (a.len() + bm.len()) as u64;
            // As stored: [K, N] = A·B; [N, K] = Bᵀ·Aᵀ.
            let r = *r;
            let (k, n) = (dims_k(dims, layout_kn), numel / dims_k(dims, layout_kn));
            let (left, right, ld, rd) = if layout_kn {
                (
                    a.clone(),
                    bm.clone(),
                    [k as i64, r as i64],
                    [r as i64, n as i64],
                )
            } else {
                (
                    transpose(bm, r, n),
                    transpose(a, k, r),
                    [n as i64, r as i64],
                    [r as i64, k as i64],
                )
            };
            let (ln, rn) = add_factors(g, &w, dtype, (&left, &ld), (&right, &rd))?;
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
    Ok(params)
}

/// Emits `fit` with the input projected onto the atoms: the atoms side by side as one
/// `[K, S'·N]` weight `D`, and each block's `y = x·W` as
/// `MatMul(c_l, Reshape(MatMul(x, D), [.., S', N])) → Reshape([.., N])` (`+ (x·A)·B`), which
/// replaces the block's MatMul. Nothing of it is constant but `D`: ONNX Runtime folds nothing.
/// Only for `MatMul(x, W)` with `x` of known rank ≥ 2 ([`projection`]; `rank` is x's). The
/// parameters stored.
fn emit_projected(
    g: &mut Graph,
    base: &str,
    members: &[Member],
    fit: &Fit,
    (k, n, rank): (usize, usize, usize),
    dtype: DataType,
) -> Result<u64> {
    let s = fit.rows;
    let numel = k * n;
    // D[k, a·N + c] = atom a's [k, c].
    let mut d = vec![0f32; numel * s];
    for a in 0..s {
        for row in 0..k {
            d[row * s * n + a * n..][..n].copy_from_slice(&fit.book[a * numel + row * n..][..n]);
        }
    }
    let d_name = add(
        g,
        &format!("{base}_atoms"),
        dtype,
        &[k as i64, (s * n) as i64],
        float_bytes(&d, dtype),
    )?;
    let lead = vec![0i64; rank - 1];
    let shape_of = |tail: &[i64]| -> Vec<u8> {
        lead.iter()
            .chain(tail)
            .flat_map(|d| d.to_le_bytes())
            .collect()
    };
    let split = add(
        g,
        &format!("{base}_split_shape"),
        DataType::I64,
        &[rank as i64 + 1],
        shape_of(&[s as i64, n as i64]),
    )?;
    let join = add(
        g,
        &format!("{base}_join_shape"),
        DataType::I64,
        &[rank as i64],
        shape_of(&[n as i64]),
    )?;
    let mut params = (s * numel) as u64;
    for ((m, c), factors) in members.iter().zip(&fit.coeffs).zip(&fit.refinements) {
        let w = m.weight.clone();
        g.initializers.retain(|t| t.name() != w);
        let at = g
            .nodes
            .iter()
            .position(|x| x.name == m.node)
            .expect("checked by projection");
        let node = g.nodes.remove(at);
        let y = node.outputs[0].clone();
        let c_name = add_coeffs(g, &w, c, dtype)?;
        params += s as u64;
        let name = |g: &Graph, what: &str| fresh_name(g, &format!("{}_{what}", m.node));
        let (p, p4, y4) = (
            name(g, "atoms_proj"),
            name(g, "atoms_split"),
            name(g, "atoms_mix"),
        );
        let combined = if factors.is_some() {
            name(g, "atoms_shared")
        } else {
            y.clone()
        };
        let mut nodes = vec![
            Node::new(
                &p,
                "MatMul",
                vec![m.input.clone(), d_name.clone()],
                vec![p.clone()],
            ),
            Node::new(
                &p4,
                "Reshape",
                vec![p.clone(), split.clone()],
                vec![p4.clone()],
            ),
            Node::new(&y4, "MatMul", vec![c_name, p4], vec![y4.clone()]),
            Node::new(
                &format!("{y4}_join"),
                "Reshape",
                vec![y4, join.clone()],
                vec![combined.clone()],
            ),
        ];
        if let Some((a, bm, r)) = factors {
            params += (a.len() + bm.len()) as u64;
            let (ln, rn) = add_factors(
                g,
                &w,
                dtype,
                (a, &[k as i64, *r as i64]),
                (bm, &[*r as i64, n as i64]),
            )?;
            let (xa, xab) = (name(g, "refine_in"), name(g, "refine"));
            nodes.push(Node::new(
                &xa,
                "MatMul",
                vec![m.input.clone(), ln],
                vec![xa.clone()],
            ));
            nodes.push(Node::new(&xab, "MatMul", vec![xa, rn], vec![xab.clone()]));
            nodes.push(Node::new(
                &format!("{xab}_add"),
                "Add",
                vec![combined, xab],
                vec![y.clone()],
            ));
        }
        g.nodes.extend(nodes);
    }
    Ok(params)
}

fn add_coeffs(g: &mut Graph, w: &str, c: &[f32], dtype: DataType) -> Result<String> {
    add(
        g,
        &format!("{w}_atom_coeffs"),
        dtype,
        &[1, c.len() as i64],
        float_bytes(c, dtype),
    )
}

/// The refinement's two factors as initializers (`(values, dims)` each).
fn add_factors(
    g: &mut Graph,
    w: &str,
    dtype: DataType,
    left: (&[f32], &[i64]),
    right: (&[f32], &[i64]),
) -> Result<(String, String)> {
    let ln = add(
        g,
        &format!("{w}_refine_a"),
        dtype,
        left.1,
        float_bytes(left.0, dtype),
    )?;
    let rn = add(
        g,
        &format!("{w}_refine_b"),
        dtype,
        right.1,
        float_bytes(right.0, dtype),
    )?;
    Ok((ln, rn))
}

const NOT_PROJECTABLE: &str = "only a MatMul(x, W) whose x has a known rank of at least 2 can \
                               have its input projected onto the atoms";

/// A group whose input can be projected onto its atoms: `x`'s rank, and its rows per call (the
/// product of its leading dims; `None` when one is symbolic).
#[derive(Clone, Copy)]
struct Projectable {
    rank: usize,
    rows: Option<u64>,
}

/// Whether every block's projection is a `MatMul(x, W)` with `x` of one known rank ≥ 2.
fn projection(model: &Model, members: &[Member], layout_kn: bool) -> Option<Projectable> {
    let g = &model.graph;
    if !layout_kn {
        return None;
    }
    let types = wcc_ir::infer::infer_graph(g, model.default_opset(), None);
    let rank = types.shape(&members.first()?.input)?.len();
    let mut rows: Option<Option<u64>> = None;
    for m in members {
        let node = g.nodes.iter().find(|n| n.name == m.node)?;
        if !node.is("MatMul") || node.inputs.get(1) != Some(&m.weight) {
            return None;
        }
        let shape = types.shape(&node.inputs[0])?;
        if shape.len() < 2 || shape.len() != rank {
            return None;
        }
        let lead: Option<u64> = shape[..shape.len() - 1]
            .iter()
            .map(|d| match d {
                wcc_ir::Dim::Known(v) if *v >= 0 => Some(*v as u64),
                _ => None,
            })
            .product();
        rows = Some(match rows {
            None => lead,
            Some(a) => a.zip(lead).map(|(a, b)| a.max(b)),
        });
    }
    Some(Projectable { rank, rows: rows? })
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

    /// Layer groups: blocks 0-3 are multiples of one matrix and 4-8 of another (plus a little
    /// of a third everywhere); with one atom per group and no mean the split found is 4 | 5,
    /// and it leaves almost nothing, where one dictionary of one atom leaves the second matrix.
    #[test]
    fn groups_split_where_the_blocks_change() {
        let (l, numel) = (9, 6);
        let a = [1.0, 2.0, 0.0, -1.0, 0.5, 0.0];
        let b = [0.0, -1.0, 3.0, 0.0, 1.0, 2.0];
        let c = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let w: Vec<Vec<f64>> = (0..l)
            .map(|i| {
                let (m, s) = if i < 4 {
                    (&a, 1.0 + i as f64)
                } else {
                    (&b, 2.0 - 0.1 * i as f64)
                };
                (0..numel)
                    .map(|e| s * m[e] + 1e-3 * i as f64 * c[e])
                    .collect()
            })
            .collect();
        let gram: Vec<f64> = (0..l * l)
            .map(|e| (0..numel).map(|x| w[e / l][x] * w[e % l][x]).sum())
            .collect();
        let segs = segment(&gram, l, 2, Count::Atoms(1), false).unwrap();
        assert_eq!(segs, vec![0..4, 4..9]);
        let grouped: f64 = segs
            .iter()
            .map(|s| tail_energy(&gram, l, s.clone(), 1, false).unwrap())
            .sum();
        let one = tail_energy(&gram, l, 0..l, 1, false).unwrap();
        assert!(grouped < 1e-3 * one, "{grouped} vs {one}");
        assert!(segment(&gram, l, 5, Count::Atoms(1), false).is_err());
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
