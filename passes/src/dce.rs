//! Dead-code elimination: nodes none of whose outputs are read (in this graph, its subgraphs or
//! its outputs), initializers nobody reads, and value_info entries for values that no longer exist.
//! Graph inputs are never removed (they are the model's interface). Recurses into subgraphs.

use std::collections::HashSet;

use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::validate::collect_outer_reads;
use wcc_ir::{Graph, Model, Result};

pub struct DeadCodeElimination;

impl Pass for DeadCodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }
    fn description(&self) -> &'static str {
        "removes nodes, initializers and value_info entries that nothing reads"
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        let mut changes = 0;
        run_graph(&mut model.graph, &mut changes);
        Ok(PassOutcome::changed(changes))
    }
}

fn run_graph(g: &mut Graph, changes: &mut usize) {
    for n in &mut g.nodes {
        for a in &mut n.attributes {
            for sg in &mut a.graphs {
                run_graph(sg, changes);
            }
        }
    }
    // Walk backwards from the outputs.
    let mut live: HashSet<String> = g.outputs.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate().rev() {
        if n.outputs.iter().any(|o| !o.is_empty() && live.contains(o)) {
            keep[i] = true;
            live.extend(n.present_inputs().map(str::to_string));
            for a in &n.attributes {
                for sg in &a.graphs {
                    collect_outer_reads(sg, &mut |x| {
                        live.insert(x.to_string());
                    });
                }
            }
        }
    }
    let before = g.nodes.len();
    let mut k = keep.into_iter();
    g.nodes.retain(|_| k.next().unwrap());
    *changes += before - g.nodes.len();

    let before = g.initializers.len();
    g.initializers.retain(|t| live.contains(t.name()));
    *changes += before - g.initializers.len();

    let defined = g.defined_names();
    g.value_info.retain(|v| defined.contains(&v.name));
}
