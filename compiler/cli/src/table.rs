//! The stderr summary of `optimize`: per pass, then totals and nodes by op.

use std::collections::BTreeSet;
use std::fmt::Write;

use wcc_ir::pass::PassRecord;
use wcc_ir::stats::GraphStats;
use wcc_runtime::OutputFidelity;

fn human(n: u64) -> String {
    match n {
        n if n >= 10_000_000_000 => format!("{:.1}G", n as f64 / 1e9),
        n if n >= 10_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 100_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub fn summary(
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
