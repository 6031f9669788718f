//! Vector quantization of linear weights with a learned codebook per layer, after VPTQ
//! ("VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large Language Models", Liu et
//! al., arXiv 2409.17066, §3–4).
//!
//! # Math
//! A layer `y = W x`, `W` `[N, K]` (a row per output), is cut along its outputs: for every input
//! column `q` and `j < N/v`, the vector `w_{q,j} = (W[j·v + t, q])_{t<v}`. A codebook `C` of `k`
//! centroids in `R^v` is fitted to all of them by weighted k-means (see `kmeans`), each vector
//! weighted by `H_qq` when calibration inputs give `H = XᵀX` (VPTQ's Hessian-weighted k-means), by
//! 1 without. Every vector becomes the index of a centroid: without calibration the nearest one;
//! with it, column by column along K with GPTQ's error feedback (see `gptq`), each column's
//! vectors mapped to their nearest centroid and the error spread over the columns not yet
//! quantized. `Ŵ[j·v + t, q] = C[idx[q, j], t]`.
//!
//! Three refinements of VPTQ's, each an option:
//! - *normalization*: every input column is coded as `W[·, q] = σ_q·W'[·, q] + μ_q` (its standard
//!   deviation and mean over the outputs), the codebook fitted to `W'`, each vector weighted by
//!   `H_qq·σ_q²` (what an error in `W'` costs in the output);
//! - *outlier columns*: the fraction `outliers` of the input columns whose errors cost the most
//!   (largest `H_qq·σ_q²`; without calibration, largest norm) is fitted and coded from its own
//!   `k/8` centroids of the codebook (`[k − k/8, k)`), the others from the rest, so the few
//!   columns a transformer's activation outliers make expensive neither take the codebook over
//!   nor are left with centroids fitted to the others;
//! - *residual*: a second codebook `C₂` of `k` centroids is fitted to what the first leaves
//!   (every vector at its nearest centroid), and each vector is coded by a pair, the first
//!   nearest in `C`, the second nearest to the rest in `C₂`: `Ŵ = C[idx] + C₂[idx₂]`, twice the
//!   index bits.
//!
//! Bits per weight: `(bytes of the indices + codebooks + norms) · 8 / (K·N)`, the indices stored
//! two to a byte for `k ≤ 16` (when a row holds an even number), as uint8 for `k ≤ 256`, else
//! uint16: `4/v`, `8/v` or `16/v` a codebook, plus the codebooks and two values per input column
//! when normalized, amortized over the layer.
//!
//! # Budget
//! `--vq-bits b` asks for `b` bits per weight over all the weights it quantizes, everything
//! counted. Each layer is fitted with the two vector lengths that divide its outputs and whose
//! bits per weight bracket `b` (with 256 centroids, `8/v` plus the codebook's and norms' share,
//! which is larger for a small layer); every layer starts at the shorter-bit one, and upgrades
//! are taken, most squared error removed per byte first (the layer's output error on the
//! calibration inputs, else its weight error), while the total stays within `b`. The fit costs
//! twice the time of a single vector length. Without a budget, every layer gets `vector`.
//!
//! # Emission
//! In standard ONNX, in the layer's own `[K, N]` orientation: per codebook, `idx` `[K, N/v]`
//! (uint8/uint16; packed, `[K, N/2v]` uint8 unpacked by `Concat(BitShift(BitShift(p, 4, LEFT), 4,
//! RIGHT), BitShift(p, 4, RIGHT))`, a row's first half in the low nibbles) → `Cast(to int32)` → `Gather(C [k, v], ·)` `[K, N/v, v]`; the two summed (`Add`)
//! with a residual codebook; → `Reshape([K, N])`; normalized, `Mul(σ [K, 1])` → `Add(μ [K, 1])`;
//! → the MatMul's (or Gemm's, then with `transB = 0`) weight input. A table `E[V, D]` that an
//! axis-0 Gather reads (with `tables`) is coded as the weight `[K = V, N = D]`, so its vectors run
//! along a row and `idx` `[V, D/v]` holds each row's codes; the Gather becomes two, the rows'
//! codes by id and then the codebook, `Gather(codes, ids) → Cast → Gather(C)`, reshaped to
//! `[ids…, D]` (`Concat(Shape(ids), [D])`) and, normalized, scaled and shifted by the gathered
//! rows' own `σ`, `μ`: only the gathered rows are decoded, the dense table never exists. ONNX
//! Runtime and tract run both as they are. ONNX Runtime constant-folds that chain into a dense weight when it creates a session
//! (the file stays small, the session's memory does not) unless constant folding is turned off,
//! which the `wcc.vq` metadata says.
//!
//! # What it touches
//! What `linear_weights::find_sites` selects: MatMul/Gemm weights whose N is a multiple of `v`,
//! and with `tables` axis-0 Gathers' tables whose rows are; every node that reads the weight
//! reads the decoded one.

use rayon::prelude::*;
use serde::Serialize;
use wcc_ir::model::Attribute;
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{DataType, Graph, Model, Node, Result, Tensor};

use crate::gptq::{self, ColumnRounding, Gram};
use crate::graph_util::fresh_name;
use crate::kmeans::{self, KMeans};
use crate::linear_weights::{
    find_sites, float_bytes, gram_of, heldout_error, k_n, read_nk, rel_error, Figures, Layout,
    Site, Sources, Totals, Walk,
};

/// What `--vq-bits` quantizes and how.
#[derive(Debug, Clone)]
pub struct VqOptions {
    /// Vector length `v` (every layer's, without a `budget`).
    pub vector: usize,
    /// Bits per weight, everything counted (indices, codebooks, norms): each layer's vector
    /// length is chosen to meet it over all the weights quantized (see the module doc, *Budget*).
    pub budget: Option<f64>,
    /// Centroids `k` (at most 65536).
    pub centroids: usize,
    /// A second codebook of `centroids` for what the first leaves (twice the index bits).
    pub residual: bool,
    /// Normalize every input column (its mean and standard deviation over the outputs) before
    /// fitting: a scale and a shift per column, applied after decoding.
    pub normalize: bool,
    /// This fraction of the input columns, the costliest (largest `H_qq·scale²`; without
    /// calibration the largest), is coded from its own eighth of the codebook.
    pub outliers: f64,
    /// Which weights: MatMul/Gemm weights, and with `scope.tables` the tables axis-0 Gathers
    /// read (embeddings), coded row by row and decoded by two Gathers (the rows' codes by id,
    /// then the codebook).
    pub scope: crate::Scope,
    /// Told as weights are done.
    pub progress: crate::LayerProgress,
    /// k-means: most Lloyd iterations, seed, most vectors fitted on.
    pub iters: usize,
    pub seed: u64,
    pub sample: usize,
    /// Calibration statistics: `H = XᵀX` weights the fit (see the module doc).
    pub stats: crate::Statistics,
}

impl VqOptions {
    /// The settings for a budget of `bits` per weight (indices only; the codebook adds a little):
    /// 256 centroids (uint8 indices) and the shortest vector with `8/v ≤ bits`.
    pub fn for_bits(bits: f64) -> std::result::Result<Self, String> {
        if !(bits.is_finite() && (1.0..=8.0).contains(&bits)) {
            return Err(format!(
                "--vq-bits {bits}: give a number of bits from 1 to 8"
            ));
        }
        let vector = (8.0 / bits).ceil() as usize;
        Ok(VqOptions {
            vector,
            budget: Some(bits),
            ..VqOptions::default()
        })
    }
}

impl VqOptions {
    /// A table's rows must be a multiple of this (any length, with a `budget`).
    fn row_multiple(&self) -> usize {
        if self.budget.is_some() {
            1
        } else {
            self.vector
        }
    }
}

impl VqOptions {
    /// The vector lengths a layer of `k × n` (`n` along the vectors) is fitted with: `vector`;
    /// with a budget of `b` bits, the two lengths dividing `n` (at most 8) whose bits per weight
    /// (`Coded::bytes_of`) bracket `b` most closely, one at or above it and one below (one when
    /// every length is on one side), shortest first. Empty when no length divides `n`.
    fn lengths(&self, k: usize, n: usize, dtype_bytes: usize) -> Vec<usize> {
        let Some(b) = self.budget else {
            return if n.is_multiple_of(self.vector) {
                vec![self.vector]
            } else {
                vec![]
            };
        };
        let books = 1 + usize::from(self.residual);
        let bits = |v: usize| {
            8.0 * Coded::bytes_of(k, n, v, self.centroids, books, self.normalize, dtype_bytes)
                as f64
                / (k * n) as f64
        };
        let valid: Vec<(usize, f64)> = (1..=8.min(n))
            .filter(|v| n.is_multiple_of(*v))
            .map(|v| (v, bits(v)))
            .collect();
        // Bits need not fall as `v` grows: the codebook's share grows with it.
        let above = valid
            .iter()
            .filter(|(_, x)| *x >= b)
            .min_by(|a, c| a.1.total_cmp(&c.1));
        let below = valid
            .iter()
            .filter(|(_, x)| *x < b)
            .max_by(|a, c| a.1.total_cmp(&c.1).then(c.0.cmp(&a.0)));
        let mut out: Vec<usize> = above.into_iter().chain(below).map(|(v, _)| *v).collect();
        out.sort_unstable();
        out
    }
}

impl Default for VqOptions {
    fn default() -> Self {
        VqOptions {
            vector: 4,
            budget: None,
            centroids: 256,
            residual: false,
            normalize: false,
            outliers: 0.0,
            scope: crate::Scope::default(),
            progress: crate::LayerProgress::default(),
            iters: 25,
            seed: 0,
            sample: 1 << 16,
            stats: crate::Statistics::default(),
        }
    }
}

pub struct WeightVq {
    pub opts: VqOptions,
}

/// One quantized weight, for the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VqLayer {
    /// Bytes after: the indices, codebooks and norms.
    #[serde(flatten)]
    pub figures: Figures,
    pub vector: usize,
    pub centroids: usize,
    /// A second codebook for what the first leaves.
    pub residual: bool,
    /// Input columns normalized (a scale and shift each).
    pub normalized: bool,
    /// Input columns coded from their own part of the codebook.
    pub outlier_columns: usize,
    /// With calibration: the output error on it with the same codebook, each vector simply
    /// mapped to its nearest centroid (`output_rel_error` is with error feedback, what was
    /// written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_rel_error_nearest: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VqReport {
    /// `--vq-bits`: the bits per weight each layer's vector length was chosen to meet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_bits: Option<f64>,
    /// Why the budget was not met, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_note: Option<String>,
    /// `k-means` or `hessian-weighted k-means + gptq`.
    pub mode: &'static str,
    #[serde(flatten)]
    pub sources: Sources,
    pub layers: Vec<VqLayer>,
    #[serde(flatten)]
    pub totals: Totals,
    pub skipped: Vec<String>,
}

/// A weight's codebook and indices.
struct Coded {
    k: usize,
    n: usize,
    /// The vector length and centroids of a codebook.
    v: usize,
    centroids: usize,
    /// Bytes of a value of the weight's type (the codebooks' and norms').
    dtype_bytes: usize,
    /// `[k, v]` each (see `Codec`).
    books: Vec<Vec<f32>>,
    /// Per codebook, the indices `[K, N/v]` as the file stores them (`index_tensor`): in the
    /// scratch store when large, so that coded weights waiting to be emitted hold no memory.
    codes: Vec<Tensor>,
    /// Per input column (scale, shift), when normalized.
    norm: Option<(Vec<f32>, Vec<f32>)>,
    outlier_columns: usize,
    rel_error: f64,
    output_rel_error: Option<f64>,
    output_rel_error_nearest: Option<f64>,
    heldout_output_rel_error: Option<f64>,
}

impl WeightVq {
    /// The pass's name in reports and `wcc.passes`.
    pub const NAME: &'static str = "weight-vq";
}

impl Pass for WeightVq {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn description(&self) -> &'static str {
        "vector quantization of MatMul/Gemm weights with a learned codebook per layer (VPTQ)"
    }
    fn lossless(&self) -> bool {
        false
    }
    fn run_once(&self) -> bool {
        true
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        self.apply(model).map(|(out, _)| out)
    }
}

impl WeightVq {
    /// Runs the pass: what it did, and its report (also the outcome's details).
    pub fn apply(&self, model: &mut Model) -> Result<(PassOutcome, VqReport)> {
        let o = &self.opts;
        if o.vector == 0
            || o.centroids == 0
            || o.centroids > 1 << 16
            || o.budget.is_some_and(|b| b.is_nan() || b <= 0.0)
        {
            return Err(wcc_ir::IrError::Other(format!(
                "vq: vector length {}, {} centroids (1 to 65536) and a budget of {:?} bits per \
                 weight do not make a codebook",
                o.vector, o.centroids, o.budget
            )));
        }
        let opset = model.default_opset();
        let g = &mut model.graph;
        let (sites, mut skipped) = find_sites(g, opset, &o.scope, o.row_multiple());
        // Each weight with the vector lengths it is fitted with.
        let mut weights: Vec<(String, Vec<Site>, Vec<usize>)> = vec![];
        for (w, s) in sites {
            let t = g
                .initializer(&w)
                .expect("a site's weight is an initializer");
            let (k, n) = k_n(t, s[0].layout);
            let dtype_bytes = if t.dtype()? == DataType::F16 { 2 } else { 4 };
            let lengths = o.lengths(k, n, dtype_bytes);
            if lengths.is_empty() {
                skipped.push(format!(
                    "{w}: {n} outputs, not a multiple of the vector length {}",
                    o.vector
                ));
            } else {
                weights.push((w, s, lengths));
            }
        }
        let group = 2 * rayon::current_num_threads().max(1);
        let mut layers = vec![];
        let mut changes = 0;
        // Without a budget every weight is emitted as soon as it is coded (a group at a time, so
        // memory stays bounded); with one, every candidate is kept until the choice is made.
        let mut candidates: Vec<(usize, Vec<Coded>)> = vec![];
        let list: Vec<(&str, &[Site])> = weights
            .iter()
            .map(|(w, s, _)| (w.as_str(), s.as_slice()))
            .collect();
        let mut walk = Walk::new(g, &list, group, &o.stats);
        let mut done = 0;
        for range in walk.groups() {
            let grams = walk.grams(model, &list, range.clone())?;
            let g = &mut model.graph;
            for sub in walk.chunks(range) {
                let chunk = &weights[sub.clone()];
                let coded: Vec<Result<Vec<Coded>>> = chunk
                    .par_iter()
                    .map(|(name, s, lengths)| {
                        let t = g.initializer(name).expect("found as a constant");
                        let gram = grams.as_ref().and_then(|h| gram_of(g, s, h));
                        let held = o
                            .stats
                            .heldout_grams
                            .as_ref()
                            .and_then(|h| gram_of(g, s, h));
                        let grams = (gram.as_ref(), held.as_ref());
                        Ok(code(t, s[0].layout, grams, o, lengths)?.unwrap_or_default())
                    })
                    .collect();
                for (i, c) in coded.into_iter().enumerate() {
                    let (c, at) = (c?, sub.start + i);
                    if c.is_empty() {
                        skipped.push(format!("{}: not finite", weights[at].0));
                    } else if o.budget.is_some() {
                        candidates.push((at, c));
                    } else {
                        let c = c.into_iter().next().expect("one length");
                        layers.push(self.emit_one(g, &weights[at], c, &mut changes)?);
                    }
                }
                done += chunk.len();
                o.progress.tick(done, weights.len());
            }
        }
        let g = &mut model.graph;
        let mut budget_note = None;
        if let Some(b) = o.budget {
            let (chosen, note) = choose(candidates, b);
            budget_note = note;
            for (at, c) in chosen {
                layers.push(self.emit_one(g, &weights[at], c, &mut changes)?);
            }
        }
        wcc_ir::validate::topo_sort(g);
        let report = VqReport {
            budget_bits: o.budget,
            budget_note,
            mode: if o.stats.calibrated() {
                "hessian-weighted k-means + gptq"
            } else {
                "k-means"
            },
            sources: Sources::of(&o.stats, &o.scope, &walk),
            totals: Totals::of(layers.iter().map(|l| &l.figures)),
            layers,
            skipped,
        };
        let mut out = PassOutcome::changed(changes);
        if !report.layers.is_empty() {
            let lengths: std::collections::BTreeMap<usize, usize> =
                report.layers.iter().fold(Default::default(), |mut m, l| {
                    *m.entry(l.vector).or_default() += 1;
                    m
                });
            let lengths: Vec<String> = lengths
                .iter()
                .map(|(v, c)| {
                    if lengths.len() == 1 {
                        format!("{v}")
                    } else {
                        format!("{v} ×{c}")
                    }
                })
                .collect();
            let line = format!(
                "{} (v {}, k {}, {})",
                report.totals.summary(report.layers.len()),
                lengths.join(", "),
                o.centroids,
                report.mode
            );
            model.set_metadata(
                "wcc.vq",
                &format!(
                    "{line}; decoded by Cast -> Gather(codebook) -> Reshape: ONNX Runtime folds \
                     that into a dense weight at session start unless constant folding is off \
                     (Python: InferenceSession(path, disabled_optimizers=['ConstantFolding']))"
                ),
            );
            out.notes.push(line);
        }
        if let Some(n) = &report.budget_note {
            out.notes.push(n.clone());
        }
        out.details = Some(serde_json::to_value(&report).expect("serializable"));
        Ok((out, report))
    }

    /// Emits `c` for `weight` (a table's Gathers or a MatMul/Gemm's weight): its report line.
    fn emit_one(
        &self,
        g: &mut Graph,
        (name, sites, _): &(String, Vec<Site>, Vec<usize>),
        c: Coded,
        changes: &mut usize,
    ) -> Result<VqLayer> {
        *changes += sites.len();
        if sites[0].layout == Layout::Rows {
            emit_table(g, name, sites, c)
        } else {
            emit(g, name, sites, c)
        }
    }
}

/// Chooses one of each weight's candidates (by bytes, ascending) for the most faithful model
/// within `bits` per weight: every weight starts at its smallest, then the upgrade that removes
/// the most squared error per byte (the output error on the calibration inputs, else the
/// weight's own) is taken while the total stays within the budget. A note when even the
/// smallest candidates exceed it. The choice in the weights' order.
fn choose(
    mut candidates: Vec<(usize, Vec<Coded>)>,
    bits: f64,
) -> (Vec<(usize, Coded)>, Option<String>) {
    let weights: u64 = candidates
        .iter()
        .map(|(_, c)| (c[0].k * c[0].n) as u64)
        .sum();
    let budget = bits * weights as f64 / 8.0;
    for (_, c) in &mut candidates {
        c.sort_by_key(|c| c.bytes());
    }
    let err = |c: &Coded| c.output_rel_error.unwrap_or(c.rel_error).powi(2);
    let mut pick = vec![0usize; candidates.len()];
    let mut total: u64 = candidates.iter().map(|(_, c)| c[0].bytes()).sum();
    let note = (total as f64 > budget).then(|| {
        format!(
            "--vq-bits {bits}: the longest vectors give {:.3} bits per weight, above the budget",
            8.0 * total as f64 / weights as f64
        )
    });
    loop {
        let best = candidates
            .iter()
            .enumerate()
            .filter_map(|(i, (_, c))| {
                let (now, next) = (c.get(pick[i])?, c.get(pick[i] + 1)?);
                let extra = next.bytes().saturating_sub(now.bytes());
                let gain = err(now) - err(next);
                (gain > 0.0 && (total + extra) as f64 <= budget)
                    .then(|| (i, gain / extra.max(1) as f64, extra))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        let Some((i, _, extra)) = best else { break };
        pick[i] += 1;
        total += extra;
    }
    let chosen = candidates
        .into_iter()
        .zip(pick)
        .map(|((at, c), p)| (at, c.into_iter().nth(p).expect("a candidate")))
        .collect();
    (chosen, note)
}

/// The vectors of `w` (`[N, K]`), each input column q normalized (`(w − shift_q) / scale_q`):
/// for column q, vector j is `w[j·v + t, q]`; in the order (q, j).
fn vectors(w: &[f32], n: usize, k: usize, v: usize, (shift, scale): (&[f32], &[f32])) -> Vec<f32> {
    let per = n / v;
    let mut out = Vec::with_capacity(n * k);
    for q in 0..k {
        for j in 0..per {
            for t in 0..v {
                out.push((w[(j * v + t) * k + q] - shift[q]) / scale[q]);
            }
        }
    }
    out
}

/// The vectors of some input columns of `w'` (laid out as `vectors` makes them), as k-means
/// sees them: each weighted by its column's cost (1 without calibration), none copied.
struct Columns<'a> {
    points: &'a [f32],
    columns: Vec<usize>,
    per: usize,
    v: usize,
    cost: Option<&'a [f64]>,
}

impl kmeans::Points for Columns<'_> {
    fn len(&self) -> usize {
        self.columns.len() * self.per
    }
    fn point(&self, i: usize) -> &[f32] {
        let at = self.columns[i / self.per] * self.per + i % self.per;
        &self.points[at * self.v..(at + 1) * self.v]
    }
    fn weight(&self, i: usize) -> f32 {
        self.cost
            .map_or(1.0, |c| c[self.columns[i / self.per]] as f32)
    }
}

/// How a layer's vectors are coded: its codebooks, which centroids of the first a column may
/// use, and each input column's normalization.
struct Codec {
    v: usize,
    /// `[k, v]`; with a residual codebook, a second `[k, v]` for what the first leaves.
    books: Vec<Vec<f32>>,
    /// The first codebook's centroids `[0, main)` serve the ordinary columns, `[main, k)` the
    /// outlier ones.
    main: usize,
    outlier: Vec<bool>,
    /// `w[·, q] = scale_q · w'[·, q] + shift_q` (1 and 0 without normalization).
    scale: Vec<f32>,
    shift: Vec<f32>,
    /// For the search: the first codebook's ordinary and outlier centroids, and the second
    /// codebook (see `Codec::searched`).
    search: [Option<kmeans::Book>; 3],
}

impl Codec {
    /// `self` with its search books laid out (after its codebooks change).
    fn searched(mut self) -> Self {
        let v = self.v;
        let k = self.books[0].len() / v;
        let part = |r: std::ops::Range<usize>| {
            (!r.is_empty()).then(|| kmeans::Book::new(&self.books[0][r.start * v..r.end * v], v))
        };
        self.search = [
            part(0..self.main),
            part(self.main..k),
            self.books.get(1).map(|b| kmeans::Book::new(b, v)),
        ];
        self
    }

    /// The centroid range of the first codebook column `q` draws from.
    fn range(&self, q: usize) -> std::ops::Range<usize> {
        if self.outlier[q] {
            self.main..self.books[0].len() / self.v
        } else {
            0..self.main
        }
    }

    /// Codes `x` (a normalized vector of column `q`): an index per codebook, and `x` becomes
    /// what they decode to.
    fn code(&self, q: usize, x: &mut [f32]) -> [u32; 2] {
        let v = self.v;
        let r = self.range(q);
        let book = self.search[usize::from(self.outlier[q])]
            .as_ref()
            .expect("a column's part of the codebook is not empty");
        let first = r.start + book.nearest(x).0;
        let c1 = &self.books[0][first * v..(first + 1) * v];
        let mut ids = [first as u32, 0];
        match (self.books.get(1), &self.search[2]) {
            (Some(b2), Some(book)) => {
                let rest: Vec<f32> = x.iter().zip(c1).map(|(a, b)| a - b).collect();
                let (second, _) = book.nearest(&rest);
                ids[1] = second as u32;
                for (t, y) in x.iter_mut().enumerate() {
                    *y = c1[t] + b2[second * v + t];
                }
            }
            _ => x.copy_from_slice(c1),
        }
        ids
    }

    /// The normalized vector `ids` stand for.
    fn value(&self, ids: [u32; 2], t: usize) -> f32 {
        let v = self.v;
        let mut y = self.books[0][ids[0] as usize * v + t];
        if let Some(b2) = self.books.get(1) {
            y += b2[ids[1] as usize * v + t];
        }
        y
    }

    /// `Ŵ` `[N, K]` from indices `[K, N/v]` per codebook.
    fn decode(&self, idx: &[Vec<u32>], n: usize, k: usize) -> Vec<f32> {
        let v = self.v;
        let per = n / v;
        let mut w = vec![0f32; n * k];
        for q in 0..k {
            for j in 0..per {
                let at = q * per + j;
                let ids = [idx[0][at], idx.get(1).map_or(0, |i| i[at])];
                for t in 0..v {
                    w[(j * v + t) * k + q] = self.value(ids, t) * self.scale[q] + self.shift[q];
                }
            }
        }
        w
    }

    /// `rel_error(w0, decode(idx))` without the decoded copy: the same values, summed in the
    /// same order.
    fn rel_error(&self, w0: &[f32], idx: &[Vec<u32>], n: usize, k: usize) -> f64 {
        let v = self.v;
        let per = n / v;
        let (mut err, mut norm) = (0f64, 0f64);
        for r in 0..n {
            let (j, t) = (r / v, r % v);
            for q in 0..k {
                let at = q * per + j;
                let ids = [idx[0][at], idx.get(1).map_or(0, |i| i[at])];
                let (a, b) = (
                    w0[r * k + q],
                    self.value(ids, t) * self.scale[q] + self.shift[q],
                );
                err += ((a - b) as f64).powi(2);
                norm += (a as f64).powi(2);
            }
        }
        if norm > 0.0 {
            (err / norm).sqrt()
        } else {
            0.0
        }
    }

    /// Every vector of `w'` (normalized, in `vectors`' order) coded to its nearest centroids.
    fn nearest(&self, points: &[f32], k: usize, per: usize) -> Vec<Vec<u32>> {
        let v = self.v;
        // Each codebook's indices, column by column (in parallel), straight into its own vector.
        let mut out = vec![vec![0u32; k * per]; self.books.len()];
        let mut cols: Vec<Vec<&mut [u32]>> = (0..k).map(|_| vec![]).collect();
        for idx in &mut out {
            for (q, c) in idx.chunks_mut(per).enumerate() {
                cols[q].push(c);
            }
        }
        cols.par_iter_mut()
            .zip(points.par_chunks(per * v))
            .enumerate()
            .for_each(|(q, (dst, col))| {
                let mut x = vec![0f32; v];
                for (j, p) in col.chunks_exact(v).enumerate() {
                    x.copy_from_slice(p);
                    let ids = self.code(q, &mut x);
                    for (b, d) in dst.iter_mut().enumerate() {
                        d[j] = ids[b];
                    }
                }
            });
        out
    }
}

/// Fits the codebooks of `t` and codes it, once per vector length in `lengths`; `None` when `t`
/// is not finite.
fn code(
    t: &Tensor,
    layout: Layout,
    (gram, held): (Option<&Gram>, Option<&Gram>),
    o: &VqOptions,
    lengths: &[usize],
) -> Result<Option<Vec<Coded>>> {
    // A table `E[V, D]` is coded as the weight `[K = V, N = D]`: its vectors run along a row, and
    // the indices `[K, N/v]` are the rows' codes.
    let layout = if layout == Layout::Rows {
        Layout::KN
    } else {
        layout
    };
    let Some(w0) = read_nk(t, layout)? else {
        return Ok(None);
    };
    let (k, n) = k_n(t, layout);
    let dtype_bytes = if t.dtype()? == DataType::F16 { 2 } else { 4 };
    let gram = gram.filter(|h| h.k == k);
    // Per input column: normalization, and how much its error costs (H_qq·scale², else 1); the
    // same for every vector length, like the weight itself, read once.
    let (scale, shift) = if o.normalize {
        column_norms(&w0, n, k)
    } else {
        (vec![1.0; k], vec![0.0; k])
    };
    let cost: Option<Vec<f64>> = gram.map(|h| column_costs(h, &scale));
    let mut out = vec![];
    for &v in lengths {
        let per = n / v;
        let points = vectors(&w0, n, k, v, (&shift, &scale));
        // Outlier columns: the costliest (else largest) `outliers` of them.
        let n_out = ((o.outliers * k as f64).ceil() as usize).min(k.saturating_sub(1));
        let mut outlier = vec![false; k];
        if n_out > 0 {
            let score: Vec<f64> = match &cost {
                Some(c) => c.clone(),
                None => (0..k)
                    .map(|q| (0..n).map(|r| (w0[r * k + q] as f64).powi(2)).sum())
                    .collect(),
            };
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|a, b| score[*b].total_cmp(&score[*a]).then(a.cmp(b)));
            order.iter().take(n_out).for_each(|q| outlier[*q] = true);
        }
        let k_out = if n_out > 0 {
            (o.centroids / 8).clamp(1, n_out * per)
        } else {
            0
        };
        let main = o.centroids - k_out;
        let fit = |keep: &dyn Fn(usize) -> bool, pts: &[f32], centroids: usize, seed: u64| {
            let view = Columns {
                points: pts,
                columns: (0..k).filter(|q| keep(*q)).collect(),
                per,
                v,
                cost: cost.as_deref(),
            };
            KMeans {
                k: centroids,
                dim: v,
                iters: o.iters,
                tol: 1e-4,
                seed,
                sample: o.sample,
            }
            .fit_points(&view)
            .centroids
        };
        let mut first = fit(&|q| !outlier[q], &points, main, o.seed);
        if k_out > 0 {
            first.extend(fit(&|q| outlier[q], &points, k_out, o.seed ^ 1));
        }
        let mut codec = Codec {
            v,
            books: vec![first],
            main,
            outlier,
            scale: scale.clone(),
            shift: shift.clone(),
            search: [None, None, None],
        }
        .searched();
        if o.residual {
            // The second codebook fits what the first leaves, every vector at its nearest.
            let ids = codec.nearest(&points, k, per);
            let mut rest = points.clone();
            for (i, x) in rest.chunks_exact_mut(v).enumerate() {
                let c = ids[0][i] as usize;
                for (t, y) in x.iter_mut().enumerate() {
                    *y -= codec.books[0][c * v + t];
                }
            }
            let second = fit(&|_| true, &rest, o.centroids, o.seed ^ 2);
            codec.books.push(second);
            codec = codec.searched();
        }
        let nearest = codec.nearest(&points, k, per);
        // What is held at once: the weight, its vectors and their indices, and one decoded or
        // error-fed copy (none without calibration: the error is taken as the codes decode).
        drop(points);
        let (idx, w_hat, out_err, out_err_nearest) = match gram {
            Some(h) => {
                let error = h.output_error(&w0);
                let e0 = error(&codec.decode(&nearest, n, k));
                drop(nearest);
                let mut w = w0.clone();
                let mut r = VqRounding {
                    codec: &codec,
                    idx: vec![vec![0; k * per]; codec.books.len()],
                };
                gptq::quantize(&mut w, n, h, o.stats.damp, &mut r)
                    .map_err(wcc_ir::IrError::Other)?;
                drop(w);
                let idx = r.idx;
                let w_hat = codec.decode(&idx, n, k);
                let e = error(&w_hat);
                (idx, Some(w_hat), Some(e), Some(e0))
            }
            None => {
                let w_hat = held.is_some().then(|| codec.decode(&nearest, n, k));
                (nearest, w_hat, None, None)
            }
        };
        let rel = match &w_hat {
            Some(w_hat) => rel_error(&w0, w_hat),
            None => codec.rel_error(&w0, &idx, n, k),
        };
        out.push(Coded {
            k,
            n,
            v,
            centroids: o.centroids,
            dtype_bytes,
            rel_error: rel,
            heldout_output_rel_error: w_hat.and_then(|w_hat| heldout_error(&w0, &w_hat, held)),
            outlier_columns: n_out,
            norm: o
                .normalize
                .then(|| (codec.scale.clone(), codec.shift.clone())),
            codes: idx
                .iter()
                .map(|i| index_tensor(i, k, per, o.centroids))
                .collect::<Result<_>>()?,
            books: codec.books,
            output_rel_error: out_err,
            output_rel_error_nearest: out_err_nearest,
        });
    }
    Ok(Some(out))
}

/// Per input column of `w` (`[N, K]`): its standard deviation over the outputs (1 for a constant
/// column) and its mean.
fn column_norms(w: &[f32], n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    let mut scale = vec![1f32; k];
    let mut shift = vec![0f32; k];
    for q in 0..k {
        let mean = (0..n).map(|r| w[r * k + q] as f64).sum::<f64>() / n.max(1) as f64;
        let var = (0..n)
            .map(|r| (w[r * k + q] as f64 - mean).powi(2))
            .sum::<f64>()
            / n.max(1) as f64;
        shift[q] = mean as f32;
        if var > 0.0 {
            scale[q] = var.sqrt() as f32;
        }
    }
    (scale, shift)
}

/// What an error in each input column of the normalized weight costs in the output:
/// `H_qq · scale_q²`, capped at `WEIGHT_CAP` times the median over the columns. A few input
/// features of a transformer's activations are orders of magnitude larger than the rest;
/// uncapped, their columns take nearly every centroid and the codebook fails every other column
/// (on MiniLM's MLP down projections, an output error of 0.9 on the calibration data itself).
/// Outlier columns (`VqOptions::outliers`) are the other answer: a codebook of their own.
fn column_costs(h: &Gram, scale: &[f32]) -> Vec<f64> {
    let k = h.k;
    let mut d: Vec<f64> = (0..k)
        .map(|q| h.h[q * k + q] * (scale[q] as f64).powi(2))
        .collect();
    let mut sorted = d.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[k / 2];
    if median > 0.0 {
        d.iter_mut().for_each(|x| *x = x.min(WEIGHT_CAP * median));
    }
    d
}

/// See `column_costs`.
const WEIGHT_CAP: f64 = 10.0;

/// The codec as GPTQ's rounding rule: column i's vectors (`col[j·v + t]`, in the weight's own
/// scale).
struct VqRounding<'a> {
    codec: &'a Codec,
    /// Per codebook, `[K, N/v]`.
    idx: Vec<Vec<u32>>,
}

impl ColumnRounding for VqRounding<'_> {
    fn group_size(&self) -> usize {
        1
    }
    fn start_group(&mut self, _: usize, _: &[f32]) {}
    fn round(&mut self, i: usize, col: &mut [f64]) {
        let c = self.codec;
        let v = c.v;
        let per = col.len() / v;
        let (s, m) = (c.scale[i] as f64, c.shift[i] as f64);
        let mut x = vec![0f32; v];
        for j in 0..per {
            for t in 0..v {
                x[t] = ((col[j * v + t] - m) / s) as f32;
            }
            let ids = c.code(i, &mut x);
            for (b, id) in ids.iter().take(c.books.len()).enumerate() {
                self.idx[b][i * per + j] = *id;
            }
            for t in 0..v {
                col[j * v + t] = x[t] as f64 * s + m;
            }
        }
    }
}

/// An initializer of `g` named after `base`, of `dtype` and `dims`: its name.
fn add(g: &mut Graph, base: &str, dtype: DataType, dims: &[i64], raw: Vec<u8>) -> Result<String> {
    let name = fresh_name(g, base);
    g.initializers
        .push(Tensor::from_raw(&name, dtype, dims, raw)?);
    Ok(name)
}

/// Adds the codebooks, indices and norms of `name` and the nodes that decode it; the nodes at
/// `sites` read the decoded weight.
fn emit(g: &mut Graph, name: &str, sites: &[Site], c: Coded) -> Result<VqLayer> {
    let t = g.initializer(name).expect("found as a constant");
    let dtype = t.dtype()?;
    let bytes_before = t.byte_size();
    let (k, n) = (c.k, c.n);
    let mut nodes_out = vec![];
    // Per codebook: idx → Cast(int32) → Gather(codebook) `[K, N/v, v]`; summed.
    let (books, mut bytes_after) = add_books(g, name, "idx", &c, dtype)?;
    let mut sum: Option<String> = None;
    for Book {
        idx: idx_name,
        book: book_name,
        tag,
        packed,
    } in books
    {
        let idx_name = match packed {
            Some(four) => unpack(
                g,
                &mut nodes_out,
                &format!("{name}_vq_idx{tag}"),
                idx_name,
                &four,
            ),
            None => idx_name,
        };
        let i32_name = fresh_name(g, &format!("{name}_vq_idx32{tag}"));
        let mut cast = Node::new(&i32_name, "Cast", vec![idx_name], vec![i32_name.clone()]);
        cast.attributes = vec![Attribute::int("to", DataType::I32.code() as i64)];
        let gathered = fresh_name(g, &format!("{name}_vq_vectors{tag}"));
        nodes_out.push(cast);
        nodes_out.push(Node::new(
            &gathered,
            "Gather",
            vec![book_name, i32_name],
            vec![gathered.clone()],
        ));
        sum = Some(match sum {
            None => gathered,
            Some(prev) => {
                let s = fresh_name(g, &format!("{name}_vq_sum{tag}"));
                nodes_out.push(Node::new(&s, "Add", vec![prev, gathered], vec![s.clone()]));
                s
            }
        });
    }
    let shape: Vec<u8> = [k as i64, n as i64]
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    let shape_name = add(g, &format!("{name}_vq_shape"), DataType::I64, &[2], shape)?;
    let mut decoded = fresh_name(g, &format!("{name}_vq"));
    nodes_out.push(Node::new(
        &decoded,
        "Reshape",
        vec![sum.expect("a codebook"), shape_name],
        vec![decoded.clone()],
    ));
    // Normalized: `[K, N] · scale[K, 1] + shift[K, 1]`.
    let (norms, norm_bytes) = add_norms(g, name, &c, dtype)?;
    bytes_after += norm_bytes;
    for Norm { what, name: p, op } in norms {
        let out = fresh_name(g, &format!("{name}_vq_{what}d"));
        nodes_out.push(Node::new(&out, op, vec![decoded, p], vec![out.clone()]));
        decoded = out;
    }
    let mut nodes = vec![];
    for s in sites {
        let node = &mut g.nodes[s.node];
        node.inputs[1] = decoded.clone();
        if s.layout == Layout::NK {
            // The decoded weight is [K, N].
            node.attributes.retain(|a| a.name() != "transB");
        }
        nodes.push(node.name.clone());
    }
    g.nodes.extend(nodes_out);
    Ok(c.layer(name, nodes, (k, n), (bytes_before, bytes_after)))
}

/// A codebook's initializers: its indices, its centroids, and the tag its names end with; when
/// the indices are packed two to a byte, the uint8 constant 4 that unpacks them (see `unpack`).
struct Book {
    idx: String,
    book: String,
    tag: String,
    packed: Option<String>,
}

/// Whether indices of `centroids` are packed, `per` a row: 4-bit (at most 16 centroids) and an
/// even number a row.
fn packs(centroids: usize, per: usize) -> bool {
    centroids <= 16 && per.is_multiple_of(2)
}

/// Indices `idx` (`[k, per]`) as the file stores them: two a byte (a row's first half in the low
/// nibbles, its second half in the high ones) for at most 16 centroids and an even `per`, a byte
/// each up to 256, else two (little-endian). Named later (`add_books`).
fn index_tensor(idx: &[u32], k: usize, per: usize, centroids: usize) -> Result<Tensor> {
    let (dtype, width, bytes): (DataType, usize, Vec<u8>) = if packs(centroids, per) {
        let h = per / 2;
        let bytes = idx
            .chunks_exact(per)
            .flat_map(|row| (0..h).map(move |j| row[j] as u8 | (row[j + h] as u8) << 4))
            .collect();
        (DataType::U8, h, bytes)
    } else if centroids <= 256 {
        (DataType::U8, per, idx.iter().map(|i| *i as u8).collect())
    } else {
        let bytes = idx.iter().flat_map(|i| (*i as u16).to_le_bytes()).collect();
        (DataType::U16, per, bytes)
    };
    Tensor::from_raw("vq_codes", dtype, &[k as i64, width as i64], bytes)
}

/// Appends to `chain` the nodes that unpack `packed` (`[…, h]` uint8, `h` half a row of codes:
/// low nibbles the row's first half, high nibbles its second) into `[…, 2h]` uint8 codes, with
/// standard ops of opset 11 that ONNX Runtime and tract run on uint8: `lo = (p << 4) >> 4`,
/// `hi = p >> 4`, `Concat(lo, hi, axis −1)`. Returns the codes' name.
fn unpack(g: &mut Graph, chain: &mut Vec<Node>, base: &str, packed: String, four: &str) -> String {
    let shift = |g: &mut Graph, chain: &mut Vec<Node>, x: String, dir: &str, what: &str| {
        let y = fresh_name(g, &format!("{base}_{what}"));
        let mut n = Node::new(&y, "BitShift", vec![x, four.to_string()], vec![y.clone()]);
        n.attributes = vec![Attribute::string("direction", dir)];
        chain.push(n);
        y
    };
    let hi = shift(g, chain, packed.clone(), "RIGHT", "hi");
    let up = shift(g, chain, packed, "LEFT", "lo_up");
    let lo = shift(g, chain, up, "RIGHT", "lo");
    let codes = fresh_name(g, &format!("{base}_codes"));
    let mut cat = Node::new(&codes, "Concat", vec![lo, hi], vec![codes.clone()]);
    cat.attributes = vec![Attribute::int("axis", -1)];
    chain.push(cat);
    codes
}

/// A norm's initializer: `scale` or `shift`, its name, and the op that applies it.
struct Norm {
    what: &'static str,
    name: String,
    op: &'static str,
}

/// Adds the indices (`<name>_vq_<what>`, `[K, N/v]`, uint8, or uint16 past 256 centroids) and
/// the codebook of every codebook of `c`: (indices, codebook, tag) each, and their bytes.
fn add_books(
    g: &mut Graph,
    name: &str,
    what: &str,
    c: &Coded,
    dtype: DataType,
) -> Result<(Vec<Book>, u64)> {
    let (v, per) = (c.v, c.n / c.v);
    let mut bytes = 0;
    let mut out = vec![];
    for (b, (book, codes)) in c.books.iter().zip(&c.codes).enumerate() {
        let tag = if b == 0 {
            String::new()
        } else {
            format!("{b}")
        };
        let book_bytes = float_bytes(book, dtype);
        bytes += codes.byte_size() + book_bytes.len() as u64;
        let idx_name = fresh_name(g, &format!("{name}_vq_{what}{tag}"));
        let mut codes = codes.clone();
        codes.proto.name = idx_name.clone();
        g.initializers.push(codes);
        let packed = match packs(c.centroids, per) {
            true => Some(add(
                g,
                &format!("{name}_vq_four"),
                DataType::U8,
                &[1],
                vec![4],
            )?),
            false => None,
        };
        let book_name = add(
            g,
            &format!("{name}_vq_codebook{tag}"),
            dtype,
            &[(book.len() / v) as i64, v as i64],
            book_bytes,
        )?;
        out.push(Book {
            idx: idx_name,
            book: book_name,
            tag,
            packed,
        });
    }
    Ok((out, bytes))
}

/// Adds `c`'s norms when normalized (`<name>_vq_scale`, `<name>_vq_shift`, `[K, 1]`): (what,
/// initializer, the op that applies it) each, and their bytes.
fn add_norms(g: &mut Graph, name: &str, c: &Coded, dtype: DataType) -> Result<(Vec<Norm>, u64)> {
    let mut bytes = 0;
    let mut out = vec![];
    if let Some((scale, shift)) = &c.norm {
        for (what, vals, op) in [("scale", scale, "Mul"), ("shift", shift, "Add")] {
            let raw = float_bytes(vals, dtype);
            bytes += raw.len() as u64;
            let p = add(
                g,
                &format!("{name}_vq_{what}"),
                dtype,
                &[c.k as i64, 1],
                raw,
            )?;
            out.push(Norm { what, name: p, op });
        }
    }
    Ok((out, bytes))
}

impl Coded {
    /// Bytes of what `add_books` and `add_norms` write for a `k × n` weight coded with vectors of
    /// `v`, `books` codebooks of `centroids`, values of `dtype_bytes`.
    fn bytes_of(
        k: usize,
        n: usize,
        v: usize,
        centroids: usize,
        books: usize,
        normalized: bool,
        dtype_bytes: usize,
    ) -> u64 {
        let per = n / v;
        let idx_bytes = if packs(centroids, per) {
            k * per / 2
        } else if centroids <= 256 {
            k * per
        } else {
            2 * k * per
        };
        let book = (idx_bytes + centroids * v * dtype_bytes) * books;
        (book + if normalized { 2 * k * dtype_bytes } else { 0 }) as u64
    }

    /// Bytes of what emitting `self` writes.
    fn bytes(&self) -> u64 {
        Self::bytes_of(
            self.k,
            self.n,
            self.v,
            self.centroids,
            self.books.len(),
            self.norm.is_some(),
            self.dtype_bytes,
        )
    }

    /// The report's line for the weight `name` (`(K, N)` as the report gives them).
    fn layer(
        &self,
        name: &str,
        nodes: Vec<String>,
        (k, n): (usize, usize),
        (bytes_before, bytes_after): (u64, u64),
    ) -> VqLayer {
        VqLayer {
            figures: Figures::new(
                name,
                nodes,
                (k, n),
                (bytes_before, bytes_after),
                self.rel_error,
                (self.output_rel_error, self.heldout_output_rel_error),
            ),
            vector: self.v,
            centroids: self.centroids,
            residual: self.books.len() > 1,
            normalized: self.norm.is_some(),
            outlier_columns: self.outlier_columns,
            output_rel_error_nearest: self.output_rel_error_nearest,
        }
    }
}

/// Adds the codes, codebooks and norms of the table `name` (coded as `[K = V, N = D]`: a row's
/// codes `[V, D/v]`) and replaces every Gather at `sites` by its decoding: per codebook
/// `Gather(codes, ids) → Cast(int32) → Gather(codebook)` `[ids…, D/v, v]`, summed;
/// `Reshape(Concat(Shape(ids), [D]))`; normalized, `· Gather(scale [V, 1], ids) + Gather(shift
/// [V, 1], ids)`. Only the gathered rows are decoded: the dense table never exists.
fn emit_table(g: &mut Graph, name: &str, sites: &[Site], c: Coded) -> Result<VqLayer> {
    let t = g.initializer(name).expect("found as a constant");
    let dtype = t.dtype()?;
    let bytes_before = t.byte_size();
    let (rows, d) = (c.k, c.n);
    // The initializers every site shares.
    let (books, book_bytes) = add_books(g, name, "codes", &c, dtype)?;
    let (norms, norm_bytes) = add_norms(g, name, &c, dtype)?;
    let bytes_after = book_bytes + norm_bytes;
    let width = add(
        g,
        &format!("{name}_vq_width"),
        DataType::I64,
        &[1],
        (d as i64).to_le_bytes().to_vec(),
    )?;
    let mut nodes = vec![];
    for s in sites {
        let old = g.nodes[s.node].clone();
        let (ids, y) = (old.inputs[1].clone(), old.outputs[0].clone());
        let mut chain = vec![];
        let fresh = |g: &mut Graph, what: &str| fresh_name(g, &format!("{}_vq_{what}", old.name));
        let mut sum: Option<String> = None;
        for Book {
            idx: codes,
            book,
            tag,
            packed,
        } in &books
        {
            let mut picked = fresh(g, &format!("codes{tag}"));
            chain.push(Node::new(
                &picked,
                "Gather",
                vec![codes.clone(), ids.clone()],
                vec![picked.clone()],
            ));
            if let Some(four) = packed {
                let base = format!("{}_vq_codes{tag}", old.name);
                picked = unpack(g, &mut chain, &base, picked, four);
            }
            let i32s = fresh(g, &format!("codes32{tag}"));
            let mut cast = Node::new(&i32s, "Cast", vec![picked], vec![i32s.clone()]);
            cast.attributes = vec![Attribute::int("to", DataType::I32.code() as i64)];
            chain.push(cast);
            let vecs = fresh(g, &format!("vectors{tag}"));
            chain.push(Node::new(
                &vecs,
                "Gather",
                vec![book.clone(), i32s],
                vec![vecs.clone()],
            ));
            sum = Some(match sum {
                None => vecs,
                Some(prev) => {
                    let a = fresh(g, &format!("sum{tag}"));
                    chain.push(Node::new(&a, "Add", vec![prev, vecs], vec![a.clone()]));
                    a
                }
            });
        }
        let shape = fresh(g, "ids_shape");
        chain.push(Node::new(
            &shape,
            "Shape",
            vec![ids.clone()],
            vec![shape.clone()],
        ));
        let target = fresh(g, "shape");
        let mut concat = Node::new(
            &target,
            "Concat",
            vec![shape, width.clone()],
            vec![target.clone()],
        );
        concat.attributes = vec![Attribute::int("axis", 0)];
        chain.push(concat);
        let mut value = fresh(g, "rows");
        let last = norms.is_empty();
        let out = if last { y.clone() } else { value.clone() };
        chain.push(Node::new(
            &value,
            "Reshape",
            vec![sum.clone().expect("a codebook"), target],
            vec![out.clone()],
        ));
        value = out;
        for (i, Norm { what, name: p, op }) in norms.iter().enumerate() {
            let picked = fresh(g, &format!("{what}_rows"));
            chain.push(Node::new(
                &picked,
                "Gather",
                vec![p.clone(), ids.clone()],
                vec![picked.clone()],
            ));
            let out = if i + 1 == norms.len() {
                y.clone()
            } else {
                fresh(g, &format!("{what}d"))
            };
            let node = fresh(g, &format!("{what}_node"));
            chain.push(Node::new(&node, op, vec![value, picked], vec![out.clone()]));
            value = out;
        }
        // The first node takes the Gather's place (its name stays); the rest are appended.
        let mut chain = chain.into_iter();
        let mut first = chain.next().expect("a chain");
        first.name = old.name.clone();
        g.nodes[s.node] = first;
        g.nodes.extend(chain);
        nodes.push(old.name.clone());
    }
    // As int4 reports a table: K = D (a row's values), N = V (rows).
    Ok(c.layer(name, nodes, (d, rows), (bytes_before, bytes_after)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_and_decode_are_inverse_along_the_outputs() {
        let (n, k, v) = (6, 4, 3);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let pts = vectors(&w, n, k, v, (&[0.0; 4], &[1.0; 4]));
        // Column 1's first vector is W[0..3, 1].
        assert_eq!(&pts[2 * v..3 * v], &[1.0, 5.0, 9.0]);
        // Each vector its own centroid decodes back to W.
        let idx: Vec<u32> = (0..(k * n / v) as u32).collect();
        let codec = Codec {
            v,
            main: pts.len() / v,
            books: vec![pts],
            outlier: vec![false; k],
            scale: vec![1.0; k],
            shift: vec![0.0; k],
            search: [None, None, None],
        };
        assert_eq!(codec.decode(&[idx], n, k), w);
    }

    #[test]
    fn a_budget_brackets_each_layer_between_two_lengths() {
        let o = VqOptions::for_bits(3.0).unwrap();
        // 384 × 384 in f32: v = 2 is 4.11 bits, v = 3 2.83.
        assert_eq!(o.lengths(384, 384, 4), vec![2, 3]);
        // 2 bits: v = 4 is 2.22 bits (the codebook's share), 5 does not divide 384, 6 is 1.67.
        assert_eq!(
            VqOptions::for_bits(2.0).unwrap().lengths(384, 384, 4),
            vec![4, 6]
        );
        // 4 bits: v = 2 is just above (4.11).
        assert_eq!(
            VqOptions::for_bits(4.0).unwrap().lengths(384, 384, 4),
            vec![2, 3]
        );
        // 64 × 7: only 1 and 7 divide 7, and the codebook outweighs the layer: v = 1 is 26 bits,
        // v = 7 129, both above; the fewer bits.
        assert_eq!(o.lengths(64, 7, 4), vec![1]);
        // Without a budget, the one length (when it divides).
        let fixed = VqOptions { budget: None, ..o };
        assert_eq!(fixed.lengths(384, 384, 4), vec![3]);
        assert!(fixed.lengths(384, 10, 4).is_empty());
    }

    /// A coded `k × n` weight with vectors of `v`, 256 centroids, and output error `e`.
    fn coded(k: usize, n: usize, v: usize, e: f64) -> Coded {
        Coded {
            k,
            n,
            v,
            centroids: 256,
            dtype_bytes: 4,
            books: vec![vec![0.0; 256 * v]],
            codes: vec![index_tensor(&vec![0; k * n / v], k, n / v, 256).unwrap()],
            norm: None,
            outlier_columns: 0,
            rel_error: 1.0,
            output_rel_error: Some(e),
            output_rel_error_nearest: None,
            heldout_output_rel_error: None,
        }
    }

    #[test]
    fn the_budget_buys_the_most_error_removed_per_byte() {
        // Three 384 × 384 layers at v = 3 (2.83 bits) or v = 2 (4.11 bits); 3.3 bits pays for
        // one upgrade. Layer 1 gains the most, layer 2 nothing (a longer vector no worse).
        let layers = |e: [(f64, f64); 3]| {
            e.iter()
                .enumerate()
                .map(|(i, (e3, e2))| (i, vec![coded(384, 384, 2, *e2), coded(384, 384, 3, *e3)]))
                .collect::<Vec<_>>()
        };
        let (chosen, note) = choose(layers([(0.2, 0.1), (0.3, 0.1), (0.2, 0.2)]), 3.3);
        assert!(note.is_none());
        let v: Vec<(usize, usize)> = chosen.iter().map(|(at, c)| (*at, c.v)).collect();
        assert_eq!(v, vec![(0, 3), (1, 2), (2, 3)]);
        // 4.2 bits pays for all three, but layer 2's would remove nothing: it stays.
        let (chosen, _) = choose(layers([(0.2, 0.1), (0.3, 0.1), (0.2, 0.2)]), 4.2);
        let v: Vec<usize> = chosen.iter().map(|(_, c)| c.v).collect();
        assert_eq!(v, vec![2, 2, 3]);
        // Below what the longest vectors give: all at their longest, and a note says so.
        let (chosen, note) = choose(layers([(0.2, 0.1), (0.3, 0.1), (0.2, 0.2)]), 2.5);
        assert!(chosen.iter().all(|(_, c)| c.v == 3));
        assert!(note.is_some_and(|n| n.contains("2.83")));
    }

    #[test]
    fn budgets_pick_the_vector_length() {
        assert_eq!(VqOptions::for_bits(2.0).unwrap().vector, 4);
        assert_eq!(VqOptions::for_bits(3.0).unwrap().vector, 3);
        assert_eq!(VqOptions::for_bits(4.0).unwrap().vector, 2);
        assert!(VqOptions::for_bits(0.5).is_err() && VqOptions::for_bits(f64::NAN).is_err());
    }
}
