//! `-O compress`'s size planner: which weights to quantize, and how, for the smallest model whose
//! outputs keep the fidelity gate on the calibration inputs (or, with `--target-size`, the most
//! faithful model within a size).
//!
//! Every weight the weight passes can take (MatMul/Gemm weights, gathered tables) gets one
//! [`Treatment`]: float (as it is), int8 or int4 (block-wise, int4 with GPTQ: see
//! `wcc_passes::weight_int`), or a VQ codebook at about 3 or 2 bits a weight (see
//! `wcc_passes::weight_vq`). Mixed precision chosen from per-layer sensitivities that add up, as
//! in HAWQ ("HAWQ: Hessian AWare Quantization of Neural Networks with Mixed-Precision", Dong et
//! al., arXiv 1905.03696), measured here by running the model instead of from its Hessian:
//!
//! The calibration inputs are split in two (`calib::split`): the quantizers fit (GPTQ, k-means)
//! on one half, and every figure below is taken on the other, so that what a fit learned of its
//! own inputs does not count (on MiniLM with 32 sentences, int4 GPTQ scores 0.9955 on the
//! sentences it fitted and 0.9837 on others).
//!
//! 1. Every treatment runs over every weight once, on copies of the model: each (weight,
//!    treatment) gets its bytes as the file will hold them and its layer error `e`: on the
//!    judged half `‖(W − Ŵ)X‖ / ‖WX‖`, or `‖W − Ŵ‖ / ‖W‖` for a table no calibration input
//!    multiplies.
//! 2. Each weight's sensitivity `s`: the model with that weight alone in int4, run on the
//!    calibration batches against the unquantized model, as the *share* of the gate it uses: the
//!    worst over outputs and batches of `(1 − cos) / (1 − min_cosine)` and
//!    `(rel_error / max_rel_error)²` (a share of 1 is the gate exactly).
//! 3. Every other treatment's share is estimated as `s · (e_t / e_int4)²`: `1 − cos` and `rel²`
//!    are second order in a small perturbation of the output, which is, to first order, the
//!    layer's output error; shares of different weights add. (Measured on MiniLM's word
//!    embedding at VQ, 2 bits: 2.29 of the gate against 2.1 estimated from int4's 0.158.)
//! 4. A knapsack, solved greedily: from every weight's smallest treatment, the upgrade that buys
//!    the most share per byte is taken until the estimated total is within a budget `β`, then the
//!    downgrades that save the most bytes per share while it stays within (with `--target-size`:
//!    upgrades while they still fit in the size).
//! 5. That model is built and measured on the calibration batches. It is kept when its measured
//!    share is at most [`KEEP`] (a fifth of the gate held in reserve for inputs calibration did
//!    not see); `β` is then scaled by how far the measure was from `KEEP` and the plan tried
//!    again, at most [`TRIES`] times, keeping the smallest model that passed.
//!
//! What it chose and what each choice was estimated and measured to cost is the report.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;
use wcc_ir::pass::{Pass, PassManager, PassRecord};
use wcc_ir::Model;
use wcc_passes::gptq::Gram;
use wcc_passes::weight_int::{IntBits, IntMethod, IntOptions, WeightInt};
use wcc_passes::weight_vq::{VqOptions, WeightVq};
use wcc_passes::Figures;
use wcc_runtime::{NamedArrays, OutputFidelity};

use crate::error::Error;
use crate::exec::ExecOptions;
use crate::gate::Gate;
use crate::verify::{compare_with, RemovedOutput};

/// Calibration statistics by the name of the value a weight multiplies.
type Grams = Arc<std::collections::HashMap<String, Gram>>;

/// The most of the gate a kept plan may use on the calibration inputs.
pub const KEEP: f64 = 0.8;

/// Plans built and measured, at most.
pub const TRIES: usize = 4;

/// How one weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Treatment {
    /// As it is.
    Float,
    /// Block-wise int8 (round to nearest).
    Int8,
    /// Block-wise int4 (GPTQ where calibration inputs multiply the weight, else round to
    /// nearest).
    Int4,
    /// VQ, vectors of 3, 256 centroids, input columns normalized (about 2.9 bits a weight).
    Vq3,
    /// VQ, vectors of 4, 256 centroids, input columns normalized (about 2.2 bits a weight).
    Vq4,
}

impl Treatment {
    /// The lossy treatments, tried over every weight.
    const LOSSY: [Treatment; 4] = [
        Treatment::Int8,
        Treatment::Int4,
        Treatment::Vq3,
        Treatment::Vq4,
    ];

    /// The pass that applies it to `only` (every weight it can take when `None`).
    fn pass(
        self,
        only: Option<Arc<BTreeSet<String>>>,
        p: &PlanInputs,
        grams: (&Grams, &Grams),
    ) -> Option<Box<dyn TreatmentPass>> {
        self.pass_telling(only, p, grams, Default::default())
    }

    /// `pass`, telling `progress` as weights are done.
    fn pass_telling(
        self,
        only: Option<Arc<BTreeSet<String>>>,
        p: &PlanInputs,
        (grams, heldout): (&Grams, &Grams),
        progress: wcc_passes::LayerProgress,
    ) -> Option<Box<dyn TreatmentPass>> {
        let scope = wcc_passes::Scope {
            tables: true,
            only: only.clone(),
            ..p.scope.clone()
        };
        let stats = wcc_passes::Statistics {
            grams: Some(grams.clone()),
            heldout_grams: Some(heldout.clone()),
            calibration: Some(p.calibration.clone()),
            ..Default::default()
        };
        let int = |bits, method| {
            Box::new(WeightInt {
                opts: IntOptions {
                    bits,
                    method,
                    form: p.int_form,
                    scope: scope.clone(),
                    progress: progress.clone(),
                    stats: stats.clone(),
                    ..IntOptions::default()
                },
            }) as Box<dyn TreatmentPass>
        };
        let vq = |vector| {
            Box::new(WeightVq {
                opts: VqOptions {
                    vector,
                    normalize: true,
                    scope: scope.clone(),
                    progress: progress.clone(),
                    stats: stats.clone(),
                    ..VqOptions::default()
                },
            }) as Box<dyn TreatmentPass>
        };
        match self {
            Treatment::Float => None,
            Treatment::Int8 => Some(int(IntBits::Eight, IntMethod::Rtn)),
            Treatment::Int4 => Some(int(IntBits::Four, IntMethod::Gptq)),
            Treatment::Vq3 => Some(vq(3)),
            Treatment::Vq4 => Some(vq(4)),
        }
    }
}

/// A weight pass as the planner uses it: a pass, and what it did to each weight.
trait TreatmentPass: Pass {
    /// Runs the pass; per weight replaced: (name, bytes before, bytes after, layer error).
    fn layers(&self, model: &mut Model) -> wcc_ir::Result<Vec<LayerCost>>;
    fn boxed(self: Box<Self>) -> Box<dyn Pass>;
}

/// What a treatment did to one weight.
struct LayerCost {
    weight: String,
    bytes_before: u64,
    bytes_after: u64,
    /// The output error on the held-out calibration inputs, else on those fitted on, else the
    /// weight's.
    error: f64,
}

impl From<Figures> for LayerCost {
    /// The error is the output error held out, else fitted, else the weight's.
    fn from(f: Figures) -> Self {
        LayerCost {
            error: f
                .heldout_output_rel_error
                .or(f.output_rel_error)
                .unwrap_or(f.rel_error),
            weight: f.weight,
            bytes_before: f.bytes_before,
            bytes_after: f.bytes_after,
        }
    }
}

/// Both weight passes' reports give each layer's `Figures`.
macro_rules! treatment_pass {
    ($pass:ty) => {
        impl TreatmentPass for $pass {
            fn layers(&self, model: &mut Model) -> wcc_ir::Result<Vec<LayerCost>> {
                let (_, r) = self.apply(model)?;
                Ok(r.layers
                    .into_iter()
                    .map(|l| LayerCost::from(l.figures))
                    .collect())
            }
            fn boxed(self: Box<Self>) -> Box<dyn Pass> {
                self
            }
        }
    };
}

treatment_pass!(WeightInt);
treatment_pass!(WeightVq);

/// Where the planner is (for a progress line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Calibrating,
    /// Trying shared-atom setting `done` of `of` (see `share::search`).
    Sharing {
        done: usize,
        of: usize,
    },
    /// Running a treatment over every weight: `done` of `of`.
    Trying {
        treatment: Treatment,
        done: usize,
        of: usize,
    },
    /// Measuring weight `done` of `of`.
    Sensitivity {
        done: usize,
        of: usize,
    },
    /// Building and measuring plan `n`.
    Plan(usize),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Calibrating => f.write_str("calibrating"),
            Step::Sharing { done, of } => write!(f, "shared-atom setting {done}/{of}"),
            Step::Trying { treatment, .. } => write!(f, "{treatment:?} on every weight"),
            Step::Sensitivity { done, of } => write!(f, "sensitivity of weight {done}/{of}"),
            Step::Plan(n) => write!(f, "building plan {n}"),
        }
    }
}

/// What every treatment did to one weight: its bytes before, and per treatment its bytes after
/// and layer error.
struct WeightCosts {
    bytes_before: u64,
    by: Vec<(Treatment, u64, f64)>,
}

/// What the planner looks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// The smallest model within the gate.
    Smallest,
    /// The most faithful model of at most this many bytes of tensors.
    Size(u64),
}

/// `--target-size`: bytes, or a percentage of the input's tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetSize {
    Bytes(u64),
    Percent(f64),
}

impl std::str::FromStr for TargetSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("--target-size {s}: give bytes (20000000, 20MB, 19MiB) or a percentage (25%)")
        };
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            return if p > 0.0 && p <= 100.0 {
                Ok(TargetSize::Percent(p))
            } else {
                Err(bad())
            };
        }
        let units: [(&str, f64); 6] = [
            ("GiB", (1u64 << 30) as f64),
            ("MiB", (1u64 << 20) as f64),
            ("KiB", 1024.0),
            ("GB", 1e9),
            ("MB", 1e6),
            ("KB", 1e3),
        ];
        let (num, mul) = units
            .iter()
            .find_map(|(u, m)| s.strip_suffix(u).map(|n| (n, *m)))
            .unwrap_or((s.strip_suffix('B').unwrap_or(s), 1.0));
        let v: f64 = num.trim().parse().map_err(|_| bad())?;
        if !(v.is_finite() && v >= 1.0) {
            return Err(bad());
        }
        Ok(TargetSize::Bytes((v * mul) as u64))
    }
}

impl TargetSize {
    /// Bytes, for a model of `input` bytes of tensors.
    pub fn bytes(self, input: u64) -> u64 {
        match self {
            TargetSize::Bytes(b) => b,
            TargetSize::Percent(p) => (input as f64 * p / 100.0) as u64,
        }
    }
}

/// One treatment as an option for one weight.
#[derive(Debug, Clone, Serialize)]
pub struct PlanOption {
    pub treatment: Treatment,
    pub bytes: u64,
    /// The layer error `e` (see the module).
    pub error: f64,
    /// The estimated share of the gate it uses.
    pub share: f64,
}

/// One weight's options and what was chosen.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedWeight {
    pub weight: String,
    pub bytes_before: u64,
    /// Its measured share of the gate in int4 (`s`); `None` when that model could not be run.
    pub sensitivity: Option<f64>,
    /// Not dominated by a smaller option with no more error, smallest first.
    pub options: Vec<PlanOption>,
    pub chosen: Treatment,
}

/// One plan built and measured.
#[derive(Debug, Clone, Serialize)]
pub struct PlanTry {
    /// The budget of estimated share the plan was chosen under (none with `--target-size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<f64>,
    pub estimated_share: f64,
    pub measured_share: f64,
    pub min_cosine: f64,
    pub max_rel_error: f64,
    /// Tensor bytes of the planned model.
    pub bytes: u64,
    /// Weights by treatment.
    pub counts: BTreeMap<Treatment, usize>,
    pub passed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    /// `smallest within the gate` or `most faithful within N bytes`.
    pub objective: String,
    pub calibration: String,
    /// The share of the gate the model had before quantization (sublayers dropped).
    pub base_share: f64,
    /// The most share a kept plan may use.
    pub keep: f64,
    /// Tensor bytes before.
    pub bytes_before: u64,
    /// Tensor bytes of the chosen plan (`bytes_before` when none was kept).
    pub bytes_after: u64,
    pub weights: Vec<PlannedWeight>,
    pub tries: Vec<PlanTry>,
    /// The try that was kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen_try: Option<usize>,
    /// Seconds each stage took: calibration statistics, every treatment over every weight,
    /// sensitivities, building and measuring plans.
    pub seconds: Vec<(String, f64)>,
    pub notes: Vec<String>,
}

/// What the planner works with.
pub struct PlanInputs<'a> {
    /// The model before wcc changed it (what the result is checked against).
    pub original: &'a Model,
    pub exec: &'a ExecOptions,
    /// Calibration batches the quantizers fit on…
    pub fit: &'a [NamedArrays],
    /// …and those every choice is judged on (see `calib::split`).
    pub batches: &'a [NamedArrays],
    pub calibration: String,
    pub gate: Gate,
    pub objective: Objective,
    /// Which weights may be quantized (the least elements, the user's name patterns); each
    /// treatment says whether embedding tables are among them, and which weights it takes.
    pub scope: wcc_passes::Scope,
    /// The int4/int8 form the target takes (`Target::int_form`).
    pub int_form: wcc_passes::weight_int::IntForm,
    /// The outputs of the unquantized model on `batches` (the original's function).
    pub references: &'a [NamedArrays],
    /// Outputs the result lost on purpose (dropped KV caches).
    pub removed: &'a [RemovedOutput],
}

/// The share of the gate outputs `fid` use (see the module); infinite for a NaN.
pub fn share(gate: &Gate, fid: &[OutputFidelity]) -> f64 {
    // `lost` of `allowed`: 0 for nothing lost, infinite for NaN or a loss where none is allowed.
    let part = |lost: f64, allowed: f64| {
        if lost.is_nan() {
            f64::INFINITY
        } else if lost <= 0.0 {
            0.0
        } else if allowed > 0.0 {
            lost / allowed
        } else {
            f64::INFINITY
        }
    };
    let mut u: f64 = 0.0;
    for f in fid {
        if let Some(c) = gate.min_cosine {
            u = u.max(part(1.0 - f.cosine, 1.0 - c));
        }
        if let Some(r) = gate.max_rel_error {
            u = u.max(part(f.rel_l2_error.powi(2), r * r));
        }
    }
    u
}

/// A model run on every batch against the references: (share, min cosine, max rel error), or
/// why it could not be.
pub(crate) fn measure(cand: &Model, p: &PlanInputs) -> Result<(f64, f64, f64), String> {
    let backend = p.exec.backend_for_result(p.original, cand);
    let mut fid = vec![];
    for (b, r) in p.batches.iter().zip(p.references) {
        fid.extend(compare_with(&backend, r, cand, b, p.removed).map_err(|f| format!("{f:?}"))?);
    }
    Ok((
        share(&p.gate, &fid),
        fid.iter().map(|f| f.cosine).fold(f64::INFINITY, f64::min),
        fid.iter().map(|f| f.rel_l2_error).fold(0.0, f64::max),
    ))
}

/// Per weight, its options (smallest first, the float one last).
struct Table {
    weights: Vec<PlannedWeight>,
}

impl Table {
    /// The estimated share and the bytes of the weights with option `cur[i]` each.
    fn total(&self, cur: &[usize]) -> (f64, u64) {
        self.weights
            .iter()
            .zip(cur)
            .fold((0.0, 0), |(s, b), (w, &i)| {
                (s + w.options[i].share, b + w.options[i].bytes)
            })
    }

    /// The index of each weight's option under `budget` (`Objective::Smallest`) or within
    /// `size` bytes of weights (`Objective::Size`): the greedy knapsack of the module's step 4.
    fn choose(&self, budget: f64, size: Option<u64>) -> Vec<usize> {
        let mut cur = vec![0usize; self.weights.len()];
        loop {
            let (est, bytes) = self.total(&cur);
            if size.is_none() && est <= budget {
                return self.settle(cur, budget);
            }
            // The upgrade with the most share saved per byte added (that fits).
            let mut best: Option<(f64, usize, usize)> = None;
            for (wi, w) in self.weights.iter().enumerate() {
                let from = &w.options[cur[wi]];
                for (oi, o) in w.options.iter().enumerate().skip(cur[wi] + 1) {
                    let added = o.bytes.saturating_sub(from.bytes).max(1);
                    if size.is_some_and(|s| bytes + added > s) {
                        continue;
                    }
                    let ratio = (from.share - o.share) / added as f64;
                    if ratio > 0.0 && best.is_none_or(|(r, _, _)| ratio > r) {
                        best = Some((ratio, wi, oi));
                    }
                }
            }
            match best {
                Some((_, wi, oi)) => cur[wi] = oi,
                None => return cur,
            }
        }
    }

    /// With `cur` within `budget`: the downgrades (to smaller options) that save the most bytes
    /// per share added, while the estimate stays within it. Upgrading from the smallest options
    /// may overshoot (one costly weight's upgrade frees more than was needed); this takes the
    /// slack back.
    fn settle(&self, mut cur: Vec<usize>, budget: f64) -> Vec<usize> {
        loop {
            let (est, _) = self.total(&cur);
            let mut best: Option<(f64, usize, usize)> = None;
            for (wi, w) in self.weights.iter().enumerate() {
                let from = &w.options[cur[wi]];
                for (oi, o) in w.options.iter().enumerate().take(cur[wi]) {
                    let added = o.share - from.share;
                    let saved = from.bytes.saturating_sub(o.bytes);
                    if saved == 0 || est + added > budget {
                        continue;
                    }
                    let ratio = saved as f64 / added.max(1e-12);
                    if best.is_none_or(|(r, _, _)| ratio > r) {
                        best = Some((ratio, wi, oi));
                    }
                }
            }
            match best {
                Some((_, wi, oi)) => cur[wi] = oi,
                None => return cur,
            }
        }
    }
}

/// What the planner did.
pub struct Planned {
    /// The passes that ran (for `wcc.passes`), and their records.
    pub passes: Vec<&'static str>,
    pub records: Vec<PassRecord>,
    pub report: PlanReport,
}

/// Plans and applies the weight quantization of `-O compress` to `model` (already `-O1`, with
/// its sublayers dropped).
pub fn run(
    model: &mut Model,
    p: &PlanInputs,
    progress: &mut dyn FnMut(Step),
) -> Result<Planned, Error> {
    let none = |report| Planned {
        passes: vec![],
        records: vec![],
        report,
    };
    let bytes_before = wcc_ir::export::tensor_bytes(model);
    let mut report = PlanReport {
        objective: match p.objective {
            Objective::Smallest => "smallest within the gate".into(),
            Objective::Size(b) => format!("most faithful within {b} bytes of tensors"),
        },
        calibration: p.calibration.clone(),
        base_share: 0.0,
        keep: KEEP,
        bytes_before,
        bytes_after: bytes_before,
        weights: vec![],
        tries: vec![],
        chosen_try: None,
        seconds: vec![],
        notes: vec![],
    };
    let mut clock = std::time::Instant::now();
    let mut lap = |report: &mut PlanReport, stage: &str| {
        report
            .seconds
            .push((stage.to_string(), clock.elapsed().as_secs_f64()));
        clock = std::time::Instant::now();
    };
    let (base, _, _) = measure(model, p).map_err(|e| {
        Error::Run(format!(
            "cannot plan the compression: the model cannot be measured: {e}"
        ))
    })?;
    report.base_share = base;
    let room = KEEP - base;
    if p.objective == Objective::Smallest && room <= 0.0 {
        report
            .notes
            .push("no room left in the gate for weight quantization".into());
        return Ok(none(report));
    }
    // The calibration statistics every weight's error is measured with.
    progress(Step::Calibrating);
    let names = wcc_passes::weight_int::calibration_inputs(
        model,
        &IntOptions {
            scope: wcc_passes::Scope {
                tables: true,
                ..p.scope.clone()
            },
            ..IntOptions::default()
        },
    );
    let backend = p.exec.backend_for(p.original);
    let grams = Arc::new(crate::calib::grams(model, &backend, p.fit, &names)?);
    let heldout = Arc::new(crate::calib::grams(model, &backend, p.batches, &names)?);
    lap(&mut report, "calibration");
    // 1. Every treatment over every weight.
    let mut costs: BTreeMap<String, WeightCosts> = BTreeMap::new();
    for t in Treatment::LOSSY {
        progress(Step::Trying {
            treatment: t,
            done: 0,
            of: 0,
        });
        // On a thread of its own, so that its progress reaches `progress` as it goes.
        let (model, grams, heldout) = (&*model, &grams, &heldout);
        let layers = crate::optimize::with_layer_progress(
            |tick| {
                let pass = t
                    .pass_telling(None, p, (grams, heldout), tick)
                    .expect("a lossy treatment has a pass");
                pass.layers(&mut model.clone())
            },
            &mut |done, of| {
                progress(Step::Trying {
                    treatment: t,
                    done,
                    of,
                })
            },
        )?;
        for l in layers {
            let e = costs.entry(l.weight).or_insert_with(|| WeightCosts {
                bytes_before: l.bytes_before,
                by: vec![],
            });
            e.by.push((t, l.bytes_after, l.error));
        }
    }
    lap(&mut report, "treatments");
    if costs.is_empty() {
        report
            .notes
            .push("no weight the quantizers take (MatMul/Gemm weights, gathered tables)".into());
        return Ok(none(report));
    }
    // 2. Sensitivities: each weight alone in int4.
    let n = costs.len();
    for (
        i,
        (
            w,
            WeightCosts {
                bytes_before: before,
                by: opts,
            },
        ),
    ) in costs.iter().enumerate()
    {
        progress(Step::Sensitivity { done: i + 1, of: n });
        // The share of the model with this weight alone in treatment `t`.
        let alone = |t: Treatment| -> Result<Result<f64, String>, Error> {
            let only = Some(Arc::new(BTreeSet::from([w.clone()])));
            let pass = t
                .pass(only, p, (&grams, &heldout))
                .expect("a lossy treatment has a pass");
            let mut copy = model.clone();
            pass.layers(&mut copy)?;
            Ok(measure(&copy, p).map(|(u, _, _)| (u - base).max(0.0)))
        };
        let int4 = opts.iter().find(|o| o.0 == Treatment::Int4);
        let s = match int4 {
            Some(&(_, _, e4)) => match alone(Treatment::Int4)? {
                Ok(s4) => Some((s4, e4)),
                Err(e) => {
                    report.notes.push(format!(
                        "{w}: left in float, its int4 model cannot be run: {e}"
                    ));
                    None
                }
            },
            None => None,
        };

        // 3. Estimated shares; dominated options dropped.
        let mut options = vec![PlanOption {
            treatment: Treatment::Float,
            bytes: *before,
            error: 0.0,
            share: 0.0,
        }];
        if let Some((s4, e4)) = s {
            for &(t, bytes, e) in opts {
                let share = if e4 > 0.0 {
                    s4 * (e / e4).powi(2)
                } else if e > 0.0 {
                    f64::INFINITY
                } else {
                    0.0
                };
                if share.is_finite() && bytes < *before {
                    options.push(PlanOption {
                        treatment: t,
                        bytes,
                        error: e,
                        share,
                    });
                }
            }
        }
        options.sort_by(|a, b| a.bytes.cmp(&b.bytes).then(a.treatment.cmp(&b.treatment)));
        let keep: Vec<PlanOption> = options
            .iter()
            .filter(|o| {
                !options.iter().any(|x| {
                    x.bytes <= o.bytes
                        && x.share <= o.share
                        && (x.bytes < o.bytes || x.share < o.share)
                })
            })
            .cloned()
            .collect();
        report.weights.push(PlannedWeight {
            weight: w.clone(),
            bytes_before: *before,
            sensitivity: s.map(|(s, _)| s),
            chosen: keep[0].treatment,
            options: keep,
        });
    }
    lap(&mut report, "sensitivity");
    let table = Table {
        weights: std::mem::take(&mut report.weights),
    };
    let fixed = bytes_before - table.weights.iter().map(|w| w.bytes_before).sum::<u64>();
    if let Objective::Size(s) = p.objective {
        let least = fixed
            + table
                .weights
                .iter()
                .map(|w| w.options[0].bytes)
                .sum::<u64>();
        if least > s {
            return Err(Error::Gate {
                message: format!(
                    "--target-size {s} bytes cannot be reached: with every weight in its smallest \
                     form the model holds {least} bytes of tensors; no output written"
                ),
                details: None,
            });
        }
    }
    // 4-5. Choose, build, measure; adjust the budget.
    let mut best: Option<(usize, Built, Vec<usize>)> = None;
    let mut budget = room;
    let mut seen: Vec<Vec<usize>> = vec![];
    for attempt in 0..TRIES {
        let choice = match p.objective {
            Objective::Smallest => table.choose(budget, None),
            Objective::Size(s) => table.choose(0.0, Some(s.saturating_sub(fixed))),
        };
        if seen.contains(&choice) {
            break;
        }
        seen.push(choice.clone());
        progress(Step::Plan(attempt + 1));
        let built = build(model, &table, &choice, p, (&grams, &heldout))?;
        let cand = &built.0;
        let (estimated, _) = table.total(&choice);
        let bytes = wcc_ir::export::tensor_bytes(cand);
        let mut counts = BTreeMap::new();
        for (w, &i) in table.weights.iter().zip(&choice) {
            *counts.entry(w.options[i].treatment).or_insert(0) += 1;
        }
        let (u, cos, rel) = measure(cand, p).unwrap_or((f64::INFINITY, f64::NAN, f64::NAN));
        let passed = match p.objective {
            Objective::Smallest => u <= KEEP,
            Objective::Size(_) => u.is_finite(),
        };
        report.tries.push(PlanTry {
            budget: matches!(p.objective, Objective::Smallest).then_some(budget),
            estimated_share: estimated,
            measured_share: u,
            min_cosine: cos,
            max_rel_error: rel,
            bytes,
            counts,
            passed,
        });
        if passed
            && best
                .as_ref()
                .is_none_or(|b| bytes < report.tries[b.0].bytes)
        {
            best = Some((report.tries.len() - 1, built, choice));
        }
        if matches!(p.objective, Objective::Size(_)) {
            break;
        }
        // Scale the budget by how far the measure was from what may be kept.
        let used = (u - base).max(1e-12);
        let ratio = room / used;
        if passed && ratio < 1.25 {
            break;
        }
        if !passed && best.is_some() {
            break;
        }
        budget *= (0.9 * ratio).clamp(0.25, 4.0);
    }
    lap(&mut report, "plans");
    let mut weights = table.weights;
    match best {
        Some((at, (cand, passes, records), choice)) => {
            for (w, &i) in weights.iter_mut().zip(&choice) {
                w.chosen = w.options[i].treatment;
            }
            report.bytes_after = report.tries[at].bytes;
            report.chosen_try = Some(at);
            *model = cand;
            report.weights = weights;
            Ok(Planned {
                passes,
                records,
                report,
            })
        }
        None => {
            for w in &mut weights {
                w.chosen = Treatment::Float;
            }
            report.weights = weights;
            report.notes.push(
                "no plan kept the gate on the calibration inputs: weights left as they were".into(),
            );
            Ok(none(report))
        }
    }
}

/// A model built from a plan, the passes that ran and their records.
type Built = (Model, Vec<&'static str>, Vec<PassRecord>);

/// `model` with the chosen treatments (`choice`, an option index per weight): the passes run
/// through a pass manager, then DCE.
fn build(
    model: &Model,
    table: &Table,
    choice: &[usize],
    p: &PlanInputs,
    grams: (&Grams, &Grams),
) -> Result<Built, Error> {
    let mut sets: BTreeMap<Treatment, BTreeSet<String>> = BTreeMap::new();
    for (w, &i) in table.weights.iter().zip(choice) {
        let t = w.options[i].treatment;
        if t != Treatment::Float {
            sets.entry(t).or_default().insert(w.weight.clone());
        }
    }
    let mut passes: Vec<Box<dyn Pass>> = sets
        .into_iter()
        .filter_map(|(t, s)| t.pass(Some(Arc::new(s)), p, grams))
        .map(|p| p.boxed())
        .collect();
    passes.push(Box::new(wcc_passes::dce::DeadCodeElimination));
    let names = passes.iter().map(|p| p.name()).collect();
    let mut m = model.clone();
    let records = wcc_passes::optimize_with(&mut m, PassManager::new(passes))?;
    Ok((m, names, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fid(cosine: f64, rel: f64) -> OutputFidelity {
        OutputFidelity {
            name: "y".into(),
            max_abs_error: 0.0,
            rel_l2_error: rel,
            cosine,
            bitwise_equal: false,
        }
    }

    #[test]
    fn a_share_is_the_worst_output_in_units_of_the_gate() {
        let cos = Gate {
            min_cosine: Some(0.99),
            max_rel_error: None,
        };
        assert!((share(&cos, &[fid(0.995, 0.3)]) - 0.5).abs() < 1e-9);
        assert!((share(&cos, &[fid(0.999, 0.0), fid(0.98, 0.0)]) - 2.0).abs() < 1e-9);
        assert_eq!(share(&cos, &[fid(1.0, 0.0)]), 0.0);
        assert_eq!(share(&cos, &[fid(f64::NAN, 0.0)]), f64::INFINITY);
        let rel = Gate {
            min_cosine: None,
            max_rel_error: Some(0.1),
        };
        assert!((share(&rel, &[fid(0.0, 0.05)]) - 0.25).abs() < 1e-9);
    }

    #[test]
    fn target_sizes_parse_as_bytes_units_or_percentages() {
        let p = |s: &str| s.parse::<TargetSize>();
        assert_eq!(p("20000000"), Ok(TargetSize::Bytes(20_000_000)));
        assert_eq!(p("20MB"), Ok(TargetSize::Bytes(20_000_000)));
        assert_eq!(p("2MiB"), Ok(TargetSize::Bytes(2 << 20)));
        assert_eq!(p("25%"), Ok(TargetSize::Percent(25.0)));
        assert_eq!(TargetSize::Percent(25.0).bytes(1000), 250);
        for bad in ["", "0", "-5MB", "150%", "0%", "x", "NaN"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    fn weight(name: &str, options: &[(Treatment, u64, f64)]) -> PlannedWeight {
        PlannedWeight {
            weight: name.into(),
            bytes_before: options.last().unwrap().1,
            sensitivity: Some(0.0),
            options: options
                .iter()
                .map(|&(treatment, bytes, share)| PlanOption {
                    treatment,
                    bytes,
                    error: 0.0,
                    share,
                })
                .collect(),
            chosen: Treatment::Float,
        }
    }

    #[test]
    fn the_knapsack_buys_the_most_share_per_byte_first() {
        use Treatment::*;
        let table = Table {
            weights: vec![
                // Sensitive: int4 costs 0.6 of the gate, int8 0.05.
                weight("a", &[(Int4, 10, 0.6), (Int8, 20, 0.05), (Float, 80, 0.0)]),
                // Robust: int4 costs 0.1.
                weight("b", &[(Int4, 10, 0.1), (Int8, 20, 0.01), (Float, 80, 0.0)]),
            ],
        };
        // Within 0.8 everything stays int4.
        assert_eq!(table.choose(0.8, None), [0, 0]);
        // Within 0.5 the sensitive weight goes to int8 (0.55 saved for 10 bytes) first.
        assert_eq!(table.choose(0.5, None), [1, 0]);
        // With no room, all float.
        assert_eq!(table.choose(0.0, None), [2, 2]);
        // Within 30 bytes of weights: int8 for the sensitive one, int4 for the other.
        assert_eq!(table.choose(0.0, Some(30)), [1, 0]);
        // Within 20: nothing fits an upgrade.
        assert_eq!(table.choose(0.0, Some(20)), [0, 0]);
    }

    #[test]
    fn slack_left_by_a_large_upgrade_is_taken_back() {
        use Treatment::*;
        let table = Table {
            weights: vec![
                weight("a", &[(Vq4, 5, 3.0), (Int4, 15, 0.2), (Float, 80, 0.0)]),
                weight("b", &[(Vq4, 5, 0.5), (Int4, 6, 0.1), (Float, 80, 0.0)]),
            ],
        };
        // Upgrading b first (the best ratio) then a leaves 0.3 of 0.8: b goes back to VQ (0.7).
        assert_eq!(table.choose(0.8, None), [1, 0]);
    }
}
