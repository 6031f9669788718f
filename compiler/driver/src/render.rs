//! The reports as terminal text: what `wcc` prints (the CLI prints, this renders).

use std::collections::BTreeSet;
use std::fmt::Write;

use wcc_ir::pass::PassRecord;
use wcc_ir::stats::GraphStats;
use wcc_runtime::OutputFidelity;

use crate::compress::LayerDropReport;
use crate::pipeline::PassInfo;
use crate::report::{BenchReport, InspectReport, OptimizeReport, VerifyReport};

fn human(n: u64) -> String {
    match n {
        n if n >= 10_000_000_000 => format!("{:.1}G", n as f64 / 1e9),
        n if n >= 10_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 100_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Per pass: changes, nodes, parameters and bytes before → after, time, notes; then totals, the
/// ops whose counts changed, and the fidelity measured.
pub fn table(
    records: &[PassRecord],
    before: &GraphStats,
    after: &GraphStats,
    fidelity: Option<&[OutputFidelity]>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<16} {:>7} {:>15} {:>19} {:>19} {:>9}",
        "pass", "changes", "nodes", "params", "bytes", "ms"
    );
    for r in records {
        let _ = writeln!(
            s,
            "{:<16} {:>7} {:>15} {:>19} {:>19} {:>9.1}",
            r.pass,
            r.changes,
            format!("{} → {}", r.before.nodes, r.after.nodes),
            format!(
                "{} → {}",
                human(r.before.parameters),
                human(r.after.parameters)
            ),
            format!("{} → {}", human(r.before.bytes), human(r.after.bytes)),
            r.millis
        );
        for n in &r.notes {
            let _ = writeln!(s, "  note: {n}");
        }
    }
    let total_ms: f64 = records.iter().map(|r| r.millis).sum();
    let _ = writeln!(
        s,
        "{:<16} {:>7} {:>15} {:>19} {:>19} {:>9.1}",
        "total",
        records.iter().map(|r| r.changes).sum::<usize>(),
        format!("{} → {}", before.nodes, after.nodes),
        format!("{} → {}", human(before.parameters), human(after.parameters)),
        format!("{} → {}", human(before.bytes), human(after.bytes)),
        total_ms
    );
    let ops: BTreeSet<&String> = before
        .nodes_by_op
        .keys()
        .chain(after.nodes_by_op.keys())
        .collect();
    let changed: Vec<String> = ops
        .into_iter()
        .filter_map(|op| {
            let (b, a) = (
                before.nodes_by_op.get(op).copied().unwrap_or(0),
                after.nodes_by_op.get(op).copied().unwrap_or(0),
            );
            (a != b).then(|| format!("{op} {b}→{a}"))
        })
        .collect();
    if !changed.is_empty() {
        let _ = writeln!(s, "ops changed: {}", changed.join(", "));
    }
    if let Some(f) = fidelity {
        for o in f {
            let _ = writeln!(
                s,
                "fidelity {}: max|Δ| {:.3e}, rel L2 {:.3e}, cosine {:.9}{}",
                o.name,
                o.max_abs_error,
                o.rel_l2_error,
                o.cosine,
                if o.bitwise_equal {
                    " (bitwise equal)"
                } else {
                    ""
                }
            );
        }
    }
    s
}

/// The lines about layer dropping: scores, the counts tried, what was dropped.
pub fn layer_drop(r: &LayerDropReport) -> String {
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
            match (&t.failure, t.passed) {
                (Some(f), _) => format!("fails: {f}"),
                (None, true) => "passes".into(),
                (None, false) => "fails the gate".into(),
            }
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

/// `-O compress`'s search over shared atoms: per type the settings tried alone, the
/// combinations measured, what was chosen or why nothing was.
pub fn share_search(r: &crate::share::ShareSearch) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "shared atoms search (calibration: {}; sharing may add {:.0}% of the gate, {:.1}% used \
         before; {:.1} s):",
        r.calibration,
        r.budget * 100.0,
        r.base_share * 100.0,
        r.seconds
    );
    for k in &r.kinds {
        let tried: Vec<String> = k
            .tried
            .iter()
            .map(|t| {
                format!(
                    "{}: {:.0}% of the bytes, {}",
                    t.setting,
                    100.0 * t.bytes_after as f64 / k.bytes_before.max(1) as f64,
                    t.share
                        .map(|u| format!("{:.1}% of the gate", u * 100.0))
                        .unwrap_or_else(|| "cannot run".into())
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "  {} ({} blocks): {} → {}",
            k.kind.label(),
            k.blocks,
            tried.join("; "),
            k.chosen
                .map(|c| c.to_string())
                .unwrap_or_else(|| "left alone".into())
        );
    }
    for (i, t) in r.tries.iter().enumerate() {
        let _ = writeln!(
            s,
            "  try {}: budget {:.1}%, [{}], estimated {:.1}%, measured {:.1}% of the gate, {:.2} \
             MB saved → {}",
            i + 1,
            t.budget * 100.0,
            t.choice.join(", "),
            t.estimated_share * 100.0,
            t.measured_share * 100.0,
            t.bytes_saved as f64 / 1e6,
            if t.passed { "kept" } else { "over" }
        );
    }
    if let Some(c) = &r.chosen {
        let _ = writeln!(s, "  chosen: {c}");
    }
    for n in &r.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    s
}

/// `-O compress`'s weight plan: its tries, what it chose per weight.
pub fn plan(r: &crate::planner::PlanReport) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "compress plan ({}; calibration: {}; a plan is kept at ≤ {:.0}% of the gate, {:.1}% used \
         before quantization):",
        r.objective,
        r.calibration,
        r.keep * 100.0,
        r.base_share * 100.0
    );
    for (i, t) in r.tries.iter().enumerate() {
        let counts: Vec<String> = t.counts.iter().map(|(k, n)| format!("{k:?} {n}")).collect();
        let _ =
            writeln!(
            s,
            "  try {}: {}estimated {:.1}%, measured {:.1}% of the gate (min cosine {:.5}, max rel \
             error {:.3e}), {:.2} MB [{}] → {}{}",
            i + 1,
            t.budget
                .map(|b| format!("budget {:.1}%, ", b * 100.0))
                .unwrap_or_default(),
            t.estimated_share * 100.0,
            t.measured_share * 100.0,
            t.min_cosine,
            t.max_rel_error,
            mb(t.bytes),
            counts.join(", ").to_lowercase(),
            if t.passed { "kept" } else { "over" },
            if r.chosen_try == Some(i) { " (chosen)" } else { "" }
        );
    }
    let secs: Vec<String> = r
        .seconds
        .iter()
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect();
    let _ = writeln!(
        s,
        "  tensors: {:.2} MB -> {:.2} MB ({:.3}x); seconds: {}",
        mb(r.bytes_before),
        mb(r.bytes_after),
        r.bytes_after as f64 / r.bytes_before.max(1) as f64,
        secs.join(", ")
    );
    for w in &r.weights {
        let o = w.options.iter().find(|o| o.treatment == w.chosen);
        let _ = writeln!(
            s,
            "  {:<48} {:>9} -> {:>9} B  {:<6} sensitivity {}",
            w.weight,
            w.bytes_before,
            o.map_or(w.bytes_before, |o| o.bytes),
            format!("{:?}", w.chosen).to_lowercase(),
            w.sensitivity
                .map(|x| format!("{:.2}%", x * 100.0))
                .unwrap_or_else(|| "-".into())
        );
    }
    for n in &r.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    s
}

/// One line for a region-by-region verification: how much was checked and the worst figures.
fn regions_line(f: &[OutputFidelity], g: &crate::regions::RegionSummary) -> String {
    if g.regions == 0 {
        return "fidelity: no node changed what it computes: nothing to run\n".into();
    }
    let worst = |k: fn(&OutputFidelity) -> f64| f.iter().map(k).fold(0.0f64, f64::max);
    let min_cos = f.iter().map(|o| o.cosine).fold(1.0f64, f64::min);
    let exact = f.iter().filter(|o| o.bitwise_equal).count();
    format!(
        "fidelity: {} value(s) of {} changed region(s) ({} nodes, {} run(s)): max|Δ| {:.3e}, \
         rel L2 {:.3e}, cosine ≥ {:.9}; {exact} bitwise equal\n",
        f.len(),
        g.regions,
        g.nodes,
        g.runs,
        worst(|o| o.max_abs_error),
        worst(|o| o.rel_l2_error),
        min_cos
    )
}

/// `-O compress`'s sections, in the order they ran: layer dropping, the shared-atoms search, the
/// weight plan.
pub fn lossy(
    ld: Option<&crate::compress::LayerDropReport>,
    ss: Option<&crate::share::ShareSearch>,
    pr: Option<&crate::planner::PlanReport>,
) -> String {
    let mut s = String::new();
    if let Some(ld) = ld {
        s += &layer_drop(ld);
    }
    if let Some(ss) = ss {
        s += &share_search(ss);
    }
    if let Some(pr) = pr {
        s += &plan(pr);
    }
    s
}

/// What `wcc optimize` prints after writing: the table, layer dropping, outputs removed on
/// purpose, the verification (or why there was none), and where the result went.
pub fn optimize(r: &OptimizeReport) -> String {
    let by_regions = r.verification.as_ref().and_then(|v| v.regions.as_ref());
    let mut s = table(
        &r.passes,
        &r.before,
        &r.after,
        r.verification
            .as_ref()
            .filter(|_| by_regions.is_none())
            .map(|v| v.outputs.as_slice()),
    );
    if let (Some(v), Some(g)) = (&r.verification, by_regions) {
        s += &regions_line(&v.outputs, g);
    }
    s += &lossy(
        r.layer_drop.as_ref(),
        r.share_search.as_ref(),
        r.plan.as_ref(),
    );
    if let Some(v) = &r.verification {
        for o in &v.removed_outputs {
            let _ = writeln!(s, "output {} removed on purpose: {}", o.name, o.reason);
        }
        let _ = writeln!(s, "verified on {}, {}", v.backend, v.inputs);
    }
    if let Some(why) = &r.not_verified {
        let _ = writeln!(s, "warning: {why}");
    }
    let _ = writeln!(
        s,
        "wrote {} ({} bytes{})",
        r.output.display(),
        r.output_bytes,
        match &r.external_data_file {
            Some(f) => format!(
                ", external data {} bytes in {}{}",
                r.external_data_bytes,
                f.display(),
                match r.external_data_in_place_bytes {
                    0 => String::new(),
                    n => format!(", {n} of them written by the passes, not copied"),
                }
            ),
            None => String::new(),
        }
    );
    s
}

pub fn inspect(r: &InspectReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "ir_version {}  producer {}", r.ir_version, r.producer);
    let _ = writeln!(
        s,
        "opsets {}",
        r.opsets
            .iter()
            .map(|(d, v)| format!("{d}:{v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (n, t) in &r.inputs {
        let _ = writeln!(s, "input  {n}: {t}");
    }
    for (n, t) in &r.outputs {
        let _ = writeln!(s, "output {n}: {t}");
    }
    let _ = writeln!(
        s,
        "nodes {}  initializers {}  parameters {}  bytes {}  functions {}  external tensors {}",
        r.stats.nodes,
        r.stats.initializers,
        r.stats.parameters,
        r.stats.bytes,
        r.functions,
        r.external_tensors
    );
    for (d, b) in &r.stats.bytes_by_dtype {
        let _ = writeln!(s, "bytes {d}: {b}");
    }
    let mut ops: Vec<(&String, &usize)> = r.stats.nodes_by_op.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, c) in ops {
        let _ = writeln!(s, "op {op}: {c}");
    }
    s
}

/// `wcc inspect --structure`.
pub fn structure(s: &crate::Structure) -> String {
    wcc_passes::structure::render(s)
}

/// `wcc verify`: the backend, then one line per output.
pub fn verify(r: &VerifyReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "backend {}", r.backend);
    for f in &r.outputs {
        let _ = writeln!(
            s,
            "{}: max|Δ| {:.3e}  rel L2 {:.3e}  cosine {:.9}{}",
            f.name,
            f.max_abs_error,
            f.rel_l2_error,
            f.cosine,
            if f.bitwise_equal {
                "  bitwise equal"
            } else {
                ""
            }
        );
    }
    for o in &r.removed_outputs {
        let _ = writeln!(s, "{}: removed on purpose ({})", o.name, o.reason);
    }
    s
}

/// `wcc passes`.
pub fn passes(list: &[PassInfo]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:<8} {:<6} description",
        "pass", "levels", "exact"
    );
    for p in list {
        let levels = if p.levels.is_empty() {
            "opt-in".to_string()
        } else {
            p.levels.join(",")
        };
        let _ = writeln!(
            s,
            "{:<22} {:<8} {:<6} {}",
            p.name,
            levels,
            if p.lossless { "yes" } else { "no" },
            p.description
        );
    }
    s
}

/// `wcc bench`.
pub fn bench(r: &BenchReport) -> String {
    format!(
        "{} on {}: median {:.3} ms, min {:.3} ms, p90 {:.3} ms over {} runs (load {:.1} ms)\n",
        r.model.display(),
        r.backend,
        r.latency.median_ms,
        r.latency.min_ms,
        r.latency.p90_ms,
        r.latency.runs,
        r.load_ms
    )
}
