//! Shared attention atoms (`--share-atoms`, MASA): gathers the calibration statistics the
//! refinement is whitened by (`H = XᵀX` of each refined projection's input, on the backend, from
//! `--calib` or random inputs), then runs the pass and DCE; and [`search`], `-O compress`'s choice
//! of atoms per projection type under the fidelity gate.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use wcc_ir::pass::{PassManager, PassRecord};
use wcc_ir::Model;
use wcc_passes::shared_atoms::{
    calibration_inputs, shareable, Count, Groups, Kind, PerKind, ShareOptions, ShareReport,
    SharedAtoms,
};
use wcc_passes::Statistics;

use crate::calib;
use crate::error::Error;
use crate::exec::ExecOptions;
use crate::planner::{PlanInputs, Step};

/// Shares the attention projections' atoms of `model` as `opts` says.
pub fn run(
    model: &mut Model,
    opts: &ShareOptions,
    calib_file: Option<&Path>,
    exec: &ExecOptions,
    progress: &mut dyn FnMut(crate::Stage),
) -> Result<Vec<PassRecord>, Error> {
    let mut opts = opts.clone();
    let names = wcc_passes::shared_atoms::calibration_inputs(model, &opts);
    if !names.is_empty() {
        progress(crate::Stage::Calibrating);
        let (batches, calibration) = calib::batches(model, calib_file, exec)?;
        let backend = exec.backend_for(model);
        opts.stats.grams = Some(Arc::new(calib::grams(model, &backend, &batches, &names)?));
        opts.stats.calibration = Some(calibration);
    }
    apply(model, opts)
}

/// The pass as `opts` says, through a pass manager (validated), then DCE: the records.
fn apply(model: &mut Model, opts: ShareOptions) -> Result<Vec<PassRecord>, Error> {
    let pm = PassManager::new(vec![
        Box::new(SharedAtoms { opts }),
        Box::new(wcc_passes::dce::DeadCodeElimination),
    ]);
    Ok(wcc_passes::optimize_with(model, pm)?)
}

/// The most of the gate `-O compress` lets shared atoms use (on top of what dropped sublayers
/// used); the rest is the weight planner's.
pub const SHARE_OF_GATE: f64 = 0.25;

/// A setting's share of the gate under which more atoms are not tried.
const NEGLIGIBLE: f64 = 0.01;

/// Tries at the combination of the types' choices, at most.
const COMBINED_TRIES: usize = 3;

/// A type's sharing: atoms per layer group, the refinement's rank, layer groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Setting {
    pub atoms: usize,
    pub refine_rank: usize,
    pub groups: usize,
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+mean r{}", self.atoms, self.refine_rank)?;
        if self.groups > 1 {
            write!(f, " ×{} groups", self.groups)?;
        }
        Ok(())
    }
}

/// One setting tried for one projection type, alone.
#[derive(Debug, Clone, Serialize)]
pub struct SettingTried {
    #[serde(flatten)]
    pub setting: Setting,
    pub bytes_after: u64,
    /// The share of the gate it uses alone, over what the model used before (`None`: it could
    /// not be run).
    pub share: Option<f64>,
}

/// What the search did with one projection type.
#[derive(Debug, Clone, Serialize)]
pub struct KindSearch {
    pub kind: Kind,
    pub blocks: usize,
    pub bytes_before: u64,
    pub tried: Vec<SettingTried>,
    /// The setting chosen, if any.
    pub chosen: Option<Setting>,
}

/// One combination of the types' choices, built and measured.
#[derive(Debug, Clone, Serialize)]
pub struct CombinedTry {
    pub budget: f64,
    /// `kind atoms rank` per type chosen.
    pub choice: Vec<String>,
    pub estimated_share: f64,
    pub measured_share: f64,
    pub bytes_saved: u64,
    pub passed: bool,
}

/// `-O compress`'s search over shared atoms, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct ShareSearch {
    /// The most of the gate sharing may add ([`SHARE_OF_GATE`]).
    pub budget: f64,
    /// The share of the gate the model used before (dropped sublayers).
    pub base_share: f64,
    pub calibration: String,
    pub kinds: Vec<KindSearch>,
    pub tries: Vec<CombinedTry>,
    /// What was shared (the pass's summary), when anything was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen: Option<String>,
    pub seconds: f64,
    /// Why a type, or everything, was left alone.
    pub notes: Vec<String>,
}

/// The settings worth trying for a type of `blocks` blocks of `shape`, each storing fewer
/// parameters than the blocks (atoms + mean per group, coefficients, refinement factors): one
/// dictionary, and two layer groups where the blocks make groups of three or more.
fn settings(blocks: usize, shape: &[i64]) -> Vec<Setting> {
    let (a, b) = match shape {
        [a, b] => (*a as u64, *b as u64),
        _ => return vec![],
    };
    let (l, numel) = (blocks as u64, a * b);
    let small = a.min(b);
    let mut ranks = vec![0, (small / 32).max(1), (small / 8).max(1)];
    ranks.dedup();
    let mut out = vec![];
    for g in [1u64, 2].into_iter().filter(|g| *g == 1 || blocks >= 6) {
        for s in 1..(blocks / g as usize).saturating_sub(1) {
            for &r in &ranks {
                let params = g * (s as u64 + 1) * numel + l * (s as u64 + 1) + l * r * (a + b);
                if params < l * numel {
                    out.push(Setting {
                        atoms: s,
                        refine_rank: r as usize,
                        groups: g as usize,
                    });
                }
            }
        }
    }
    out
}

/// The options that share every kind in `choice` as its setting says.
fn options_for(choice: &BTreeMap<Kind, Setting>, stats: &Statistics) -> ShareOptions {
    let mut atoms = BTreeMap::new();
    let mut refine = BTreeMap::new();
    let mut groups = BTreeMap::new();
    for (&k, s) in choice {
        atoms.insert(k, Count::Atoms(s.atoms));
        refine.insert(k, s.refine_rank);
        groups.insert(k, Groups(s.groups));
    }
    ShareOptions {
        atoms: PerKind(atoms),
        refine: PerKind(refine),
        groups: PerKind(groups),
        mean: true,
        stats: stats.clone(),
        ..Default::default()
    }
}

/// `model` shared as `choice` says, and the pass's report (what the search measures).
fn trial(
    model: &Model,
    choice: &BTreeMap<Kind, Setting>,
    stats: &Statistics,
) -> Result<(Model, ShareReport), Error> {
    let mut m = model.clone();
    let (_, report) = SharedAtoms {
        opts: options_for(choice, stats),
    }
    .run_reporting(&mut m)?;
    Ok((m, report))
}

/// `-O compress`'s choice of shared atoms, per projection type, under [`SHARE_OF_GATE`] of the
/// gate: the settings of [`settings`] are run for each type alone (per rank, atoms are added
/// only until a setting uses at most [`NEGLIGIBLE`] of the gate) on the planner's judged
/// calibration batches (the refinement whitened by the fitted half), its share of the gate
/// measured as the weight planner measures (`planner::share`, over what `model` already used);
/// a greedy knapsack then takes, across types, the setting that saves the most bytes per share
/// while the summed shares stay within the budget; the combination is built and measured, and
/// kept when its measured share is within the budget (else the budget is scaled down and it
/// tries again). Returns the records of the pass when something was shared.
pub fn search(
    model: &mut Model,
    p: &PlanInputs,
    progress: &mut dyn FnMut(Step),
) -> Result<(ShareSearch, Vec<PassRecord>), Error> {
    let t0 = std::time::Instant::now();
    let (base, _, _) = crate::planner::measure(model, p).map_err(|e| {
        Error::Run(format!(
            "cannot search shared atoms: the model cannot be measured: {e}"
        ))
    })?;
    let mut report = ShareSearch {
        budget: SHARE_OF_GATE,
        base_share: base,
        calibration: p.calibration.clone(),
        kinds: vec![],
        tries: vec![],
        chosen: None,
        seconds: 0.0,
        notes: vec![],
    };
    let done = |mut r: ShareSearch| {
        r.seconds = t0.elapsed().as_secs_f64();
        Ok((r, vec![]))
    };
    let mut able = vec![];
    for s in shareable(model) {
        match &s.why_not {
            Some(why) => report.notes.push(format!("{}: {why}", s.kind.label())),
            None => {
                let tries = settings(s.blocks, &s.shape);
                if tries.is_empty() {
                    report.notes.push(format!(
                        "{}: {} blocks: no number of atoms (with the mean) stores fewer \
                         parameters than the blocks",
                        s.kind.label(),
                        s.blocks
                    ));
                } else {
                    able.push((s, tries));
                }
            }
        }
    }
    if able.is_empty() {
        report
            .notes
            .push("no projection type can share atoms: none shared".into());
        return done(report);
    }
    if base >= crate::planner::KEEP {
        report.notes.push(format!(
            "the model already uses {:.1}% of the gate: none shared",
            base * 100.0
        ));
        return done(report);
    }
    // The refinement's statistics, on the half the fits use.
    let refined = Setting {
        atoms: 1,
        refine_rank: 1,
        groups: 1,
    };
    let every: BTreeMap<Kind, Setting> = able.iter().map(|(s, _)| (s.kind, refined)).collect();
    let names = calibration_inputs(model, &options_for(&every, &Statistics::default()));
    let backend = p.exec.backend_for(p.original);
    let stats = Statistics {
        grams: Some(Arc::new(calib::grams(model, &backend, p.fit, &names)?)),
        calibration: Some(p.calibration.clone()),
        ..Statistics::default()
    };
    // Every setting of every type, alone.
    let total: usize = able.iter().map(|(_, t)| t.len()).sum();
    let mut n = 0;
    for (s, tries) in &able {
        let mut k = KindSearch {
            kind: s.kind,
            blocks: s.blocks,
            bytes_before: 0,
            tried: vec![],
            chosen: None,
        };
        // Per rank and groups, more atoms only until one costs next to nothing of the gate.
        let mut settled = std::collections::BTreeSet::new();
        for &setting in tries {
            n += 1;
            progress(Step::Sharing { done: n, of: total });
            let family = (setting.refine_rank, setting.groups);
            if settled.contains(&family) {
                continue;
            }
            let one = BTreeMap::from([(s.kind, setting)]);
            let (cand, r) = trial(model, &one, &stats)?;
            let Some(rk) = r.kinds.first() else { continue };
            k.bytes_before = rk.bytes_before;
            let share = crate::planner::measure(&cand, p)
                .ok()
                .map(|(u, _, _)| (u - base).max(0.0));
            if share.is_some_and(|u| u <= NEGLIGIBLE) {
                settled.insert(family);
            }
            k.tried.push(SettingTried {
                setting,
                bytes_after: rk.bytes_after,
                share,
            });
        }
        report.kinds.push(k);
    }
    // The knapsack, then the combination measured.
    let mut budget = SHARE_OF_GATE;
    for _ in 0..COMBINED_TRIES {
        let choice = choose(&report.kinds, budget);
        if choice.is_empty() {
            let least = report
                .kinds
                .iter()
                .flat_map(|k| {
                    k.tried
                        .iter()
                        .filter_map(move |t| t.share.map(|s| (k, t, s)))
                })
                .min_by(|a, b| a.2.total_cmp(&b.2));
            report.notes.push(match least {
                Some((k, t, s)) => format!(
                    "none shared: the least costly setting ({} {}) alone uses {:.1}% of the \
                     gate, over the {:.1}% sharing may use",
                    k.kind.label(),
                    t.setting,
                    s * 100.0,
                    budget * 100.0
                ),
                None => "none shared: no setting could be run".into(),
            });
            break;
        }
        let picks: BTreeMap<Kind, Setting> =
            choice.iter().map(|&(k, t)| (k.kind, t.setting)).collect();
        let estimated: f64 = choice.iter().map(|(_, t)| t.share.unwrap_or(0.0)).sum();
        let (cand, r) = trial(model, &picks, &stats)?;
        let saved: u64 = r
            .kinds
            .iter()
            .map(|k| k.bytes_before - k.bytes_after.min(k.bytes_before))
            .sum();
        let measured = crate::planner::measure(&cand, p)
            .map(|(u, _, _)| (u - base).max(0.0))
            .unwrap_or(f64::INFINITY);
        let passed = measured <= SHARE_OF_GATE;
        report.tries.push(CombinedTry {
            budget,
            choice: picks
                .iter()
                .map(|(k, s)| format!("{} {s}", k.label()))
                .collect(),
            estimated_share: estimated,
            measured_share: measured,
            bytes_saved: saved,
            passed,
        });
        if passed {
            for k in &mut report.kinds {
                k.chosen = picks.get(&k.kind).copied();
            }
            report.chosen = Some(r.summary());
            let records = apply(model, options_for(&picks, &stats))?;
            report.seconds = t0.elapsed().as_secs_f64();
            return Ok((report, records));
        }
        budget *= (0.9 * SHARE_OF_GATE / measured).clamp(0.1, 0.9);
    }
    if report.chosen.is_none() && !report.tries.is_empty() {
        report
            .notes
            .push("none shared: no combination kept its measured share within the budget".into());
    }
    done(report)
}

/// Per type the setting the greedy knapsack takes under `budget` (types left alone absent):
/// from none, the move (to a smaller setting of one type) that saves the most bytes per share
/// added, while the summed shares stay within `budget`.
fn choose(kinds: &[KindSearch], budget: f64) -> Vec<(&KindSearch, &SettingTried)> {
    let mut cur: Vec<Option<&SettingTried>> = vec![None; kinds.len()];
    loop {
        let used: f64 = cur.iter().flatten().map(|t| t.share.unwrap_or(0.0)).sum();
        let mut best: Option<(f64, usize, &SettingTried)> = None;
        for (i, k) in kinds.iter().enumerate() {
            let (bytes, share) = cur[i].map_or((k.bytes_before, 0.0), |t| {
                (t.bytes_after, t.share.unwrap_or(0.0))
            });
            for t in &k.tried {
                let Some(s) = t.share else { continue };
                if t.bytes_after >= bytes || used - share + s > budget {
                    continue;
                }
                let ratio = (bytes - t.bytes_after) as f64 / (s - share).max(1e-9);
                if best.is_none_or(|(r, _, _)| ratio > r) {
                    best = Some((ratio, i, t));
                }
            }
        }
        match best {
            Some((_, i, t)) => cur[i] = Some(t),
            None => break,
        }
    }
    kinds
        .iter()
        .zip(cur)
        .filter_map(|(k, t)| t.map(|t| (k, t)))
        .collect()
}
