//! Lossless algebra by equality saturation (egg): the rules in `compiler/egraph/rules/lossless.rules`
//! plus any `--rules FILE`, extracted by FLOPs-plus-parameter-bytes cost. This is what merges LoRA
//! branches `X·W + s·((X·A)·B)` into `X·(W + s·A·B)` (the constant part is then folded once by
//! constant folding), moves constant scales into weights and reassociates constant chains.
//! Paper: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., arXiv 2106.09685),
//! merged as PEFT's `merge_and_unload` does.
//! May touch: the main graph's nodes (rebuilt only when the extracted term is strictly cheaper).
//! Subgraphs are left alone.

use std::sync::Arc;

use wcc_egraph::{CostModel, Limits, Rule};
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{Model, Result};

pub struct Algebra {
    name: &'static str,
    description: &'static str,
    pub rules: Arc<Vec<Rule>>,
    pub limits: Limits,
    pub cost: CostModel,
}

impl Algebra {
    /// The built-in rules and the given rule files; an error names the file and line.
    pub fn new(rule_files: &[&std::path::Path]) -> std::result::Result<Self, String> {
        Ok(Algebra {
            name: "algebra",
            description: "e-graph rewriting with rules as data: merges LoRA/DoRA branches, folds scales into weights, reassociates constants",
            rules: Arc::new(wcc_egraph::load_rules(rule_files)?),
            limits: Limits::default(),
            cost: CostModel::default(),
        })
    }

    /// The same engine with the opt-in attention-scale rules (`fold-attention-scale`).
    pub fn with_attention_scale(
        rule_files: &[&std::path::Path],
    ) -> std::result::Result<Self, String> {
        Ok(Algebra {
            name: "fold-attention-scale",
            description: "opt-in: moves the attention scale (1/sqrt(d)) into the query projection (blocks ORT's attention fusion)",
            rules: Arc::new(wcc_egraph::load_rules_with(&[("built-in attention-scale.rules", wcc_egraph::ATTENTION_SCALE)], rule_files)?),
            limits: Limits::default(),
            cost: CostModel::default(),
        })
    }
}

impl Pass for Algebra {
    fn name(&self) -> &'static str {
        self.name
    }
    fn description(&self) -> &'static str {
        self.description
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        let opset = model.default_opset();
        let before = model.graph.nodes.len();
        let stats = wcc_egraph::run_graph(
            &mut model.graph,
            opset,
            &self.rules,
            &self.limits,
            &self.cost,
        );
        let mut out = PassOutcome::default();
        if stats.rewritten {
            out.changes = before.abs_diff(model.graph.nodes.len()).max(1);
        }
        let fired: Vec<String> = stats
            .rules_fired
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{r}×{n}"))
            .collect();
        out.notes.push(format!(
            "e-graph: {} e-nodes, {} classes, {} iterations, stopped: {}; fired: {}; cost {:.3e} → {:.3e}{}",
            stats.enodes,
            stats.classes,
            stats.iterations,
            stats.stop_reason,
            if fired.is_empty() { "none".to_string() } else { fired.join(", ") },
            stats.cost_before,
            stats.cost_after,
            if stats.rewritten { "" } else { " (graph unchanged)" }
        ));
        // A limit that cut the pass short is said, not only recorded.
        if stats.stop_reason.starts_with("time limit")
            || stats.stop_reason.starts_with("node limit")
        {
            out.notes.push(format!(
                "warning: e-graph saturation stopped at its {}; rewrites past it were not explored",
                stats.stop_reason
            ));
        }
        if let Some(why) = &stats.extract_stop {
            out.notes
                .push(format!("warning: e-graph extraction stopped: {why}"));
        }
        if stats.untried_alternatives > 0 {
            out.notes.push(format!(
                "warning: extraction's DAG refinement ran out of budget with {} alternatives untried",
                stats.untried_alternatives
            ));
        }
        out.details = serde_json::to_value(&stats).ok();
        Ok(out)
    }
}
