//! Layer dropping driven from the command line: calibration inputs, LLM-Drop scores, an explicit
//! `--drop SPEC`, or `-O compress`'s search for the largest drop count that still passes the
//! fidelity gate. The graph surgery is `wcc_passes::layer_drop`; scores come from
//! `wcc_runtime::calibrate`.

use serde::Serialize;
use wcc_ir::Model;
use wcc_passes::layer_drop::{candidates, drop_sublayers, label, DropSpec, Target};
use wcc_passes::structure::{discover, Structure, Sublayer};
use wcc_runtime::{Backend, NamedArrays};

use crate::cli::{GateArgs, OptimizeArgs};
use crate::commands::CliError;
use crate::exec;

/// The gate `-O compress` uses when the user gives none.
pub const DEFAULT_MIN_COSINE: f64 = 0.99;
/// Random calibration batches when no file is given.
const RANDOM_BATCHES: u64 = 4;

#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub sublayer: String,
    /// Mean cosine between the residual stream entering and leaving it (1 = changes nothing).
    pub similarity: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tried {
    pub count: usize,
    pub dropped: Vec<String>,
    pub min_cosine: f64,
    pub max_rel_error: f64,
    pub passed: bool,
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
}

/// Calibration batches: `--calib`, else `--inputs`, else seeded random batches.
fn calibration(model: &Model, a: &OptimizeArgs) -> Result<(Vec<NamedArrays>, String), CliError> {
    if let Some(p) = a.calib.as_ref().or(a.exec.inputs.as_ref()) {
        return Ok((vec![exec::npz_inputs(model, p)?], p.display().to_string()));
    }
    let batches = (0..RANDOM_BATCHES)
        .map(|k| exec::random(model, &a.exec, a.exec.seed + k))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        batches,
        format!(
            "{RANDOM_BATCHES} seeded random batches (seed {})",
            a.exec.seed
        ),
    ))
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
) -> Result<Ranking, CliError> {
    let st = discover(model);
    if st.blocks.is_empty() {
        return Err(CliError::Input(format!(
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
    let sims = wcc_runtime::calibrate::mean_row_cosine(&scoring, backend, batches, &pairs)
        .map_err(CliError::Run)?;
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

/// `model` (the one `ranked` describes) with its `n` most redundant candidates dropped.
fn drop_first(
    model: &Model,
    ranked: &Ranking,
    n: usize,
) -> Result<(Model, Vec<String>, Vec<String>), CliError> {
    let mut m = model.clone();
    let st = &ranked.structure;
    let chosen: Vec<(usize, Sublayer)> = ranked
        .order
        .iter()
        .take(n)
        .map(|(b, s, _)| (*b, s.clone()))
        .collect();
    let notes = drop_sublayers(&mut m, st, &chosen)?;
    let names = chosen.iter().map(|(b, s)| label(*b, s)).collect();
    Ok((m, names, notes))
}

fn gate_of(g: &GateArgs, compress: bool) -> GateArgs {
    if compress && g.min_cosine.is_none() && g.max_rel_error.is_none() {
        GateArgs {
            min_cosine: Some(DEFAULT_MIN_COSINE),
            max_rel_error: None,
        }
    } else {
        g.clone()
    }
}

/// Runs `--drop` or `-O compress` on the (already -O1-optimized) model.
pub fn run(
    a: &OptimizeArgs,
    model: &mut Model,
    compress: bool,
) -> Result<LayerDropReport, CliError> {
    let backend = exec::backend(&a.exec);
    let (batches, calib) = calibration(model, a)?;
    let drop: Option<DropSpec> = a.drop.map(|d| d.0);
    let target = drop.map(|d| d.target).unwrap_or(Target::Attention);
    let ranked0 = ranked(model, target, &backend, &batches)?;
    let scores = ranked0
        .order
        .iter()
        .map(|(b, s, c)| Score {
            sublayer: label(*b, s),
            similarity: *c,
        })
        .collect();
    let mut report = LayerDropReport {
        target: format!("{target:?}").to_lowercase(),
        mode: if a.drop_iterative {
            "iterative".into()
        } else {
            "one-shot".into()
        },
        calibration: calib,
        scores,
        dropped: vec![],
        tried: vec![],
        notes: vec![],
    };
    match (drop, compress) {
        (Some(spec), false) => {
            let n = spec.count_of(ranked0.order.len());
            if a.drop_iterative {
                for _ in 0..n {
                    let r = ranked(model, target, &backend, &batches)?;
                    let (m, names, notes) = drop_first(model, &r, 1)?;
                    *model = m;
                    report.dropped.extend(names);
                    report.notes.extend(notes);
                }
            } else {
                let (m, names, notes) = drop_first(model, &ranked0, n)?;
                *model = m;
                report.dropped = names;
                report.notes = notes;
            }
        }
        _ => {
            // -O compress: the largest count that passes the gate against the -O1 model.
            let gate = gate_of(&a.gate, true);
            // The gate holds over every calibration batch.
            let references = batches
                .iter()
                .map(|b| exec::run_on(&backend, model, b).map_err(CliError::Run))
                .collect::<Result<Vec<_>, _>>()?;
            // With --drop, its count is the most to try.
            let max = drop
                .map(|d| d.count_of(ranked0.order.len()))
                .unwrap_or(ranked0.order.len());
            let mut best: Option<(Model, Vec<String>, Vec<String>)> = None;
            let mut current = model.clone();
            for n in 1..=max {
                let (cand, names, notes) = if a.drop_iterative {
                    let r = ranked(&current, target, &backend, &batches)?;
                    let (m, mut names, notes) = drop_first(&current, &r, 1)?;
                    let mut all = best.as_ref().map(|b| b.1.clone()).unwrap_or_default();
                    all.append(&mut names);
                    (m, all, notes)
                } else {
                    drop_first(model, &ranked0, n)?
                };
                let mut fid = vec![];
                for (b, reference) in batches.iter().zip(&references) {
                    let out = exec::run_on(&backend, &cand, b).map_err(CliError::Run)?;
                    fid.extend(exec::compare_common(reference, &out).map_err(CliError::Run)?);
                }
                let passed = exec::gate_failure(&gate, &fid).is_none();
                report.tried.push(Tried {
                    count: n,
                    dropped: names.clone(),
                    min_cosine: fid.iter().map(|f| f.cosine).fold(f64::INFINITY, f64::min),
                    max_rel_error: fid.iter().map(|f| f.rel_l2_error).fold(0.0, f64::max),
                    passed,
                });
                if !passed {
                    break;
                }
                current = cand.clone();
                best = Some((cand, names, notes));
            }
            match best {
                Some((m, names, notes)) => {
                    *model = m;
                    report.dropped = names;
                    report.notes = notes;
                }
                None => report
                    .notes
                    .push("no sublayer could be dropped within the gate".into()),
            }
        }
    }
    Ok(report)
}

/// The lines `optimize` prints about layer dropping.
pub fn summary(r: &LayerDropReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "layer drop ({}, {}; calibration: {}):",
        r.target, r.mode, r.calibration
    );
    for sc in &r.scores {
        let _ = writeln!(
            s,
            "  score {:<8} similarity {:.6}",
            sc.sublayer, sc.similarity
        );
    }
    for t in &r.tried {
        let _ = writeln!(
            s,
            "  try {} ({}): min cosine {:.6}, max rel error {:.3e} → {}",
            t.count,
            t.dropped.join(", "),
            t.min_cosine,
            t.max_rel_error,
            if t.passed { "passes" } else { "fails the gate" }
        );
    }
    let _ = writeln!(
        s,
        "  dropped: {}",
        if r.dropped.is_empty() {
            "nothing".to_string()
        } else {
            r.dropped.join(", ")
        }
    );
    for n in &r.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    s
}

impl std::str::FromStr for crate::cli::DropArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(crate::cli::DropArg(s.parse::<DropSpec>()?))
    }
}
