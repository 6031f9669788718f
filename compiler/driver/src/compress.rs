//! Sublayer dropping on calibration data (LLM-Drop: "What Matters in Transformers? Not All
//! Attention is Needed", He, Sun, Shen & Li, arXiv 2406.15786): every candidate sublayer is
//! scored by the mean cosine between the residual stream entering and leaving it, and the most
//! redundant become passthroughs: an explicit `--drop SPEC`, or `-O compress`'s search for the
//! largest count whose result still passes the fidelity gate against the `-O1` model over every
//! calibration batch. The graph surgery is `wcc_passes::layer_drop`; the scores come from
//! `wcc_runtime::calibrate`.

use serde::Serialize;
use wcc_ir::Model;
use wcc_passes::layer_drop::{candidates, drop_sublayers, label, DropSpec, Target};
use wcc_passes::structure::{discover, Structure, Sublayer};
use wcc_runtime::{Backend, NamedArrays};

use crate::error::Error;
use crate::exec::{check_budget, run_each};
use crate::gate::Gate;
use crate::verify::{compare_with, Failure, RemovedOutput};

#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub sublayer: String,
    /// Mean cosine between the residual stream entering and leaving it (1 = changes nothing).
    pub similarity: f64,
}

/// One count the `-O compress` search tried.
#[derive(Debug, Clone, Serialize)]
pub struct Tried {
    pub count: usize,
    pub dropped: Vec<String>,
    pub min_cosine: f64,
    pub max_rel_error: f64,
    pub passed: bool,
    /// Why the candidate failed other than by its figures (it cannot be run, lacks an output).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerDropReport {
    pub target: String,
    pub mode: String,
    pub calibration: String,
    pub scores: Vec<Score>,
    pub dropped: Vec<String>,
    pub tried: Vec<Tried>,
    pub notes: Vec<String>,
    /// Outputs of the model that left with what was dropped (a dropped attention's KV cache).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed_outputs: Vec<RemovedOutput>,
}

/// What to drop and how to measure it.
pub struct Plan<'a> {
    /// `--drop`: the target and (without `search`) how many; with `search`, the most to try.
    pub spec: Option<DropSpec>,
    /// `-O compress`: search the largest count that passes `gate`.
    pub search: bool,
    /// Re-score after each dropped sublayer instead of scoring once.
    pub iterative: bool,
    pub backend: &'a Backend,
    pub batches: &'a [NamedArrays],
    /// Where the batches came from, for the report.
    pub calibration: String,
    pub gate: Gate,
}

/// A model's structure and its candidate sublayers, most redundant first.
struct Ranking {
    structure: Structure,
    /// (block, sublayer, similarity)
    order: Vec<(usize, Sublayer, f64)>,
}

/// Scores every candidate sublayer of `model`.
fn ranked(
    model: &Model,
    target: Target,
    backend: &Backend,
    batches: &[NamedArrays],
) -> Result<Ranking, Error> {
    let st = discover(model);
    if st.blocks.is_empty() {
        return Err(Error::Input(format!(
            "layer dropping: no transformer blocks found ({})",
            st.problems.join("; ")
        )));
    }
    let cands: Vec<(usize, Sublayer)> = candidates(&st, target)
        .into_iter()
        .map(|(b, s)| (b, s.clone()))
        .collect();
    let pairs: Vec<(String, String)> = cands
        .iter()
        .map(|(_, s)| (s.stream_in.clone(), s.stream_out.clone()))
        .collect();
    // Fused residual+norm nodes expose their pre-norm sum on the scoring copy.
    let scoring = wcc_passes::structure::with_sums(model);
    let mut checked: Vec<Vec<Vec<usize>>> = vec![];
    for b in batches {
        let own = wcc_runtime::inputs::own_inputs(&scoring, b);
        let shapes: Vec<Vec<usize>> = own.iter().map(|(_, a)| a.shape().to_vec()).collect();
        if !checked.contains(&shapes) {
            check_budget(&scoring, &own).map_err(|e| {
                Error::Run(format!("layer dropping: cannot score the sublayers: {e}"))
            })?;
            checked.push(shapes);
        }
    }
    let sims = wcc_runtime::calibrate::mean_row_cosine(&scoring, backend, batches, &pairs)
        .map_err(|e| Error::Run(format!("layer dropping: cannot score the sublayers: {e}")))?;
    let mut v: Vec<(usize, Sublayer, f64)> = cands
        .into_iter()
        .zip(sims)
        .map(|((b, s), c)| (b, s, c))
        .collect();
    // Most similar (least change) first; ties keep model order.
    v.sort_by(|x, y| y.2.total_cmp(&x.2));
    Ok(Ranking {
        structure: st,
        order: v,
    })
}

/// A model with sublayers dropped.
#[derive(Clone)]
struct Candidate {
    model: Model,
    dropped: Vec<String>,
    notes: Vec<String>,
    removed: Vec<RemovedOutput>,
}

/// `model` (the one `ranked` describes) with its `n` most redundant candidates dropped.
fn drop_first(model: &Model, ranked: &Ranking, n: usize) -> Result<Candidate, Error> {
    let mut m = model.clone();
    let chosen: Vec<(usize, Sublayer)> = ranked
        .order
        .iter()
        .take(n)
        .map(|(b, s, _)| (*b, s.clone()))
        .collect();
    let notes = drop_sublayers(&mut m, &ranked.structure, &chosen)?;
    // The outputs that left with a dropped attention's cache.
    let removed = chosen
        .iter()
        .flat_map(|(b, s)| {
            s.kv_cache.iter().map(move |(_, present)| RemovedOutput {
                name: present.clone(),
                reason: format!("KV cache of the dropped {}", label(*b, s)),
            })
        })
        .filter(|r| model.graph.outputs.iter().any(|o| o.name == r.name))
        .filter(|r| !m.graph.outputs.iter().any(|o| o.name == r.name))
        .collect();
    Ok(Candidate {
        dropped: chosen.iter().map(|(b, s)| label(*b, s)).collect(),
        model: m,
        notes,
        removed,
    })
}

/// `next` (one more sublayer dropped from `prev`'s model) with `prev`'s drops added (the
/// model's `wcc.dropped` names them all).
fn accumulate(prev: Option<&Candidate>, mut next: Candidate) -> Candidate {
    if let Some(p) = prev {
        next.dropped = [p.dropped.clone(), next.dropped].concat();
        next.notes = [p.notes.clone(), next.notes].concat();
        next.removed = [p.removed.clone(), next.removed].concat();
        next.model
            .set_metadata("wcc.dropped", &next.dropped.join(","));
    }
    next
}

/// The outputs of `original` that `result` lost on purpose: the KV caches of the sublayers wcc
/// dropped from it (named by its `wcc.dropped` metadata), found in `original`'s structure.
pub fn removed_by_drop(original: &Model, result: &Model) -> Vec<RemovedOutput> {
    let Some(dropped) = result.metadata("wcc.dropped") else {
        return vec![];
    };
    let names: Vec<&str> = dropped.split(',').map(str::trim).collect();
    // Structure is discovered on the -O1 form, as layer dropping does.
    let mut m = original.clone();
    if wcc_passes::optimize(&mut m, wcc_passes::pipeline(wcc_passes::OptLevel::O1)).is_err() {
        return vec![];
    }
    let st = discover(&m);
    candidates(&st, Target::Joint)
        .into_iter()
        .filter(|(b, s)| names.contains(&label(*b, s).as_str()))
        .flat_map(|(b, s)| {
            s.kv_cache.iter().map(move |(_, present)| RemovedOutput {
                name: present.clone(),
                reason: format!("KV cache of the dropped {}", label(b, s)),
            })
        })
        .filter(|r| !result.graph.outputs.iter().any(|o| o.name == r.name))
        .collect()
}

fn describe(f: Failure) -> String {
    match f {
        Failure::OriginalCannotRun(e) | Failure::ResultCannotRun(e) => {
            format!("cannot be run: {e}")
        }
        Failure::Mismatch(e) => e,
    }
}

/// Runs `--drop` or `-O compress` on the (already `-O1`-optimized) model.
pub fn run(model: &mut Model, plan: &Plan) -> Result<LayerDropReport, Error> {
    let (backend, batches) = (plan.backend, plan.batches);
    let target = plan.spec.map(|d| d.target).unwrap_or(Target::Attention);
    let ranked0 = ranked(model, target, backend, batches)?;
    let mut report = LayerDropReport {
        target: format!("{target:?}").to_lowercase(),
        mode: if plan.iterative {
            "iterative".into()
        } else {
            "one-shot".into()
        },
        calibration: plan.calibration.clone(),
        scores: ranked0
            .order
            .iter()
            .map(|(b, s, c)| Score {
                sublayer: label(*b, s),
                similarity: *c,
            })
            .collect(),
        dropped: vec![],
        tried: vec![],
        notes: vec![],
        removed_outputs: vec![],
    };
    let chosen = match (plan.spec, plan.search) {
        (Some(spec), false) => {
            let n = spec.count_of(ranked0.order.len());
            if plan.iterative {
                let mut acc: Option<Candidate> = None;
                for _ in 0..n {
                    let current = acc.as_ref().map_or(&*model, |c| &c.model);
                    let r = ranked(current, target, backend, batches)?;
                    let next = drop_first(current, &r, 1)?;
                    acc = Some(accumulate(acc.as_ref(), next));
                }
                acc
            } else {
                Some(drop_first(model, &ranked0, n)?)
            }
        }
        _ => search(model, &ranked0, target, plan, &mut report)?,
    };
    match chosen {
        Some(c) => {
            *model = c.model;
            report.dropped = c.dropped;
            report.notes = c.notes;
            report.removed_outputs = c.removed;
        }
        None => report
            .notes
            .push("no sublayer could be dropped within the gate".into()),
    }
    Ok(report)
}

/// `-O compress`: the largest count that passes the gate against `model` over every batch.
fn search(
    model: &Model,
    ranked0: &Ranking,
    target: Target,
    plan: &Plan,
    report: &mut LayerDropReport,
) -> Result<Option<Candidate>, Error> {
    let (backend, batches) = (plan.backend, plan.batches);
    let references = run_each(backend, model, batches, "search what to drop")?;
    // With --drop, its count is the most to try.
    let max = plan
        .spec
        .map(|d| d.count_of(ranked0.order.len()))
        .unwrap_or(ranked0.order.len());
    let mut best: Option<Candidate> = None;
    for n in 1..=max {
        let cand = if plan.iterative {
            let current = best.as_ref().map_or(model, |b| &b.model);
            let r = ranked(current, target, backend, batches)?;
            accumulate(best.as_ref(), drop_first(current, &r, 1)?)
        } else {
            drop_first(model, ranked0, n)?
        };
        let mut fid = vec![];
        let mut failure = None;
        for (b, reference) in batches.iter().zip(&references) {
            match compare_with(backend, reference, &cand.model, b, &cand.removed) {
                Ok(f) => fid.extend(f),
                Err(f) => {
                    failure = Some(describe(f));
                    break;
                }
            }
        }
        let passed = failure.is_none() && plan.gate.check(&fid).is_none();
        report.tried.push(Tried {
            count: n,
            dropped: cand.dropped.clone(),
            min_cosine: fid.iter().map(|f| f.cosine).fold(f64::INFINITY, f64::min),
            max_rel_error: fid.iter().map(|f| f.rel_l2_error).fold(0.0, f64::max),
            passed,
            failure,
        });
        if !passed {
            break;
        }
        best = Some(cand);
    }
    Ok(best)
}
