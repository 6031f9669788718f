//! The pass trait and the pass manager: pipelines by `-O` level or by name, per-pass statistics and
//! timings, validation after every pass (so a broken rewrite is caught at the pass that made it),
//! and dumps of the graph between passes.

use std::time::Instant;

use serde::Serialize;

use crate::error::{IrError, Result};
use crate::model::Model;
use crate::stats::GraphStats;

/// What a pass reports about one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassOutcome {
    /// Number of rewrites the pass made (0: nothing fired).
    pub changes: usize,
    /// Human-readable notes: what fired, and why something did not.
    pub notes: Vec<String>,
    /// Structured statistics for the report (e.g. e-graph sizes, rules fired).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl PassOutcome {
    pub fn changed(n: usize) -> Self {
        PassOutcome {
            changes: n,
            ..Default::default()
        }
    }
}

/// One rewrite over the IR.
pub trait Pass {
    /// Stable name used by `--passes` and reports.
    fn name(&self) -> &'static str;
    /// One line saying what the pass does.
    fn description(&self) -> &'static str;
    /// Whether the pass preserves outputs exactly (up to float reassociation).
    fn lossless(&self) -> bool {
        true
    }
    /// Passes that must not run twice (e.g. adding an adapter into weights) run only in the first
    /// round of the pipeline's fixed point.
    fn run_once(&self) -> bool {
        false
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome>;
}

/// Statistics of one pass execution.
#[derive(Debug, Clone, Serialize)]
pub struct PassRecord {
    pub pass: String,
    pub changes: usize,
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    pub millis: f64,
    pub before: GraphStats,
    pub after: GraphStats,
}

/// Receives (pass name, model) for `--dump-after`.
pub type DumpFn = Box<dyn FnMut(&str, &Model)>;

pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    /// Repeat the whole pipeline until no pass changes anything (at most this many rounds).
    pub max_rounds: usize,
    /// Called with (pass name, model) after each pass whose name matches.
    pub dump_after: Option<(String, DumpFn)>,
}

impl PassManager {
    pub fn new(passes: Vec<Box<dyn Pass>>) -> Self {
        PassManager {
            passes,
            max_rounds: 4,
            dump_after: None,
        }
    }

    pub fn pass_names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Runs the pipeline to a fixed point (bounded by `max_rounds`), validating after each pass
    /// that reports changes, and once more at the end (a pass that changed the graph without
    /// saying so is caught there).
    ///
    /// The fixed point is reached as soon as every pass that may still run has run, without
    /// changes, on the graph as it is now: a round stops there instead of running the passes
    /// that already found nothing to do once more.
    pub fn run(&mut self, model: &mut Model) -> Result<Vec<PassRecord>> {
        let mut records = vec![];
        let invalid = |who: &str, e: IrError| {
            IrError::Other(format!(
                "internal error: {who} produced an invalid graph: {e}"
            ))
        };
        let mut stats = GraphStats::of(model);
        // clean[i]: pass i ran on the current graph and changed nothing.
        let mut clean = vec![false; self.passes.len()];
        let converged = |clean: &[bool], passes: &[Box<dyn Pass>]| {
            passes.iter().zip(clean).all(|(p, &c)| c || p.run_once())
        };
        'rounds: for round in 0..self.max_rounds.max(1) {
            for (i, p) in self.passes.iter().enumerate() {
                if round > 0 && p.run_once() {
                    continue;
                }
                if round > 0 && converged(&clean, &self.passes) {
                    break 'rounds;
                }
                let before = stats.clone();
                let t0 = Instant::now();
                let out = p.run(model)?;
                let millis = t0.elapsed().as_secs_f64() * 1e3;
                if out.changes > 0 {
                    crate::validate::validate(model)
                        .map_err(|e| invalid(&format!("pass '{}'", p.name()), e))?;
                    stats = GraphStats::of(model);
                    clean.iter_mut().for_each(|c| *c = false);
                }
                clean[i] = out.changes == 0;
                let after = stats.clone();
                if let Some((name, f)) = &mut self.dump_after {
                    if name == p.name() || name == "all" {
                        f(p.name(), model);
                    }
                }
                records.push(PassRecord {
                    pass: p.name().to_string(),
                    changes: out.changes,
                    notes: out.notes,
                    details: out.details,
                    millis,
                    before,
                    after,
                });
            }
        }
        crate::validate::validate(model).map_err(|e| invalid("the pipeline", e))?;
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Reports `changes` on its first `times` runs, then nothing; counts its runs.
    struct Counting {
        name: &'static str,
        times: usize,
        runs: Cell<usize>,
    }

    impl Pass for Counting {
        fn name(&self) -> &'static str {
            self.name
        }
        fn description(&self) -> &'static str {
            "test pass"
        }
        fn run(&self, _: &mut Model) -> Result<PassOutcome> {
            let n = self.runs.get();
            self.runs.set(n + 1);
            Ok(PassOutcome::changed(usize::from(n < self.times)))
        }
    }

    fn pass(name: &'static str, times: usize) -> Box<dyn Pass> {
        Box::new(Counting {
            name,
            times,
            runs: Cell::new(0),
        })
    }

    fn order(passes: Vec<Box<dyn Pass>>) -> Vec<(String, usize)> {
        let mut pm = PassManager::new(passes);
        let mut proto = onnx_protobuf::ModelProto::new();
        proto.ir_version = 8;
        let mut opset = onnx_protobuf::OperatorSetIdProto::new();
        opset.version = 17;
        proto.opset_import.push(opset);
        proto.graph = Some(onnx_protobuf::GraphProto::new()).into();
        let mut model = crate::import::from_proto(proto, None, std::path::Path::new("m")).unwrap();
        let records = pm.run(&mut model).unwrap();
        records.into_iter().map(|r| (r.pass, r.changes)).collect()
    }

    #[test]
    fn the_fixed_point_stops_once_every_pass_saw_the_current_graph() {
        // a changes once; b, c never: after a's second run everything saw the graph unchanged.
        let got = order(vec![pass("a", 1), pass("b", 0), pass("c", 0)]);
        let want = [("a", 1), ("b", 0), ("c", 0), ("a", 0)];
        assert_eq!(got, want.map(|(p, n)| (p.to_string(), n)));
        // c changes twice: a and b must run after c's last change, c once more after that.
        let got = order(vec![pass("a", 0), pass("b", 0), pass("c", 2)]);
        let want = [
            ("a", 0),
            ("b", 0),
            ("c", 1),
            ("a", 0),
            ("b", 0),
            ("c", 1),
            ("a", 0),
            ("b", 0),
            ("c", 0),
        ];
        assert_eq!(got, want.map(|(p, n)| (p.to_string(), n)));
    }
}
