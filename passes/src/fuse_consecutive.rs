//! Fusion of consecutive shape ops: Unsqueeze∘Unsqueeze → one Unsqueeze, Reshape∘Reshape → the
//! second Reshape (when its target has no 0 copying from the intermediate), Transpose∘Transpose →
//! one Transpose (or nothing, when the permutations cancel). Only when every reader of the
//! intermediate is such a node (each then reads the source directly). May touch: node inputs, attributes and initializers for new axes; no data.

use std::collections::HashMap;

use wcc_ir::infer::{infer_graph, TypeMap};
use wcc_ir::ops::util::{norm_axes, Perm};
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{Attribute, DataType, Graph, Model, Result, Tensor};

use crate::graph_util::{constant_initializers, fresh_name, output_names, rename_uses, use_counts};

pub struct FuseConsecutive;

impl Pass for FuseConsecutive {
    fn name(&self) -> &'static str {
        "fuse-consecutive"
    }
    fn description(&self) -> &'static str {
        "merges Unsqueeze→Unsqueeze, Reshape→Reshape and Transpose→Transpose chains"
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        let opset = model.default_opset();
        let mut changes = 0;
        run_graph(&mut model.graph, opset, None, &mut changes);
        Ok(PassOutcome::changed(changes))
    }
}

/// Positions of the inserted dims after two Unsqueezes on a rank-`r` input.
fn combined_unsqueeze_axes(r: usize, first: &[i64], second: &[i64]) -> Option<Vec<i64>> {
    let mut marks = vec![false; r];
    for axes in [first, second] {
        // Axes index the output; repeated axes are invalid (the model is left alone).
        let ax = norm_axes(axes, marks.len() + axes.len())?;
        for a in ax {
            if a > marks.len() {
                return None;
            }
            marks.insert(a, true);
        }
    }
    Some(
        marks
            .iter()
            .enumerate()
            .filter(|(_, m)| **m)
            .map(|(i, _)| i as i64)
            .collect(),
    )
}

fn run_graph(g: &mut Graph, opset: i64, outer: Option<&TypeMap>, changes: &mut usize) {
    if g.nodes.iter().any(|n| n.has_subgraphs()) {
        let types = infer_graph(g, opset, outer);
        for n in &mut g.nodes {
            for a in &mut n.attributes {
                for sg in &mut a.graphs {
                    run_graph(sg, opset, Some(&types), changes);
                }
            }
        }
    }
    let outputs = output_names(g);
    let mut local = 0;
    loop {
        // Candidates first, without types: an Unsqueeze/Reshape/Transpose whose every reader is
        // the same op reading it as its data input (most graphs have none left after a round).
        let uses = use_counts(g);
        let mut readers_of: HashMap<&str, Vec<usize>> = HashMap::new();
        for (j, n) in g.nodes.iter().enumerate() {
            for x in n.inputs.iter().filter(|x| !x.is_empty()) {
                let r = readers_of.entry(x.as_str()).or_default();
                if r.last() != Some(&j) {
                    r.push(j);
                }
            }
        }
        let candidates: Vec<(usize, &Vec<usize>)> = g
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.domain.is_empty()
                    && matches!(p.op_type.as_str(), "Unsqueeze" | "Reshape" | "Transpose")
                    && p.outputs.len() == 1
                    && !outputs.contains(&p.outputs[0])
            })
            .filter_map(|(i, p)| {
                let mid = &p.outputs[0];
                let readers = readers_of.get(mid.as_str())?;
                let fits = uses.get(mid).copied() == Some(readers.len())
                    && readers.iter().all(|&j| {
                        let n = &g.nodes[j];
                        n.domain.is_empty()
                            && n.op_type == p.op_type
                            && n.inputs[0] == *mid
                            && !n.inputs.iter().skip(1).any(|x| x == mid)
                    });
                fits.then_some((i, readers))
            })
            .collect();
        if candidates.is_empty() {
            break;
        }
        // Recomputed after every edit: edits add initializers and rewire inputs.
        let types = infer_graph(g, opset, outer);
        let consts = constant_initializers(g);
        let mut edit: Option<(usize, Vec<(usize, Rewrite)>)> = None;
        for (i, readers) in candidates {
            let p = &g.nodes[i];
            let mut rewrites = vec![];
            for &j in readers {
                let n = &g.nodes[j];
                let r = match n.op_type.as_str() {
                    "Unsqueeze" if opset >= 13 => {
                        let axes_known = |x: &str| consts.contains(x);
                        let (Some(x1), Some(x2)) = (p.inputs.get(1), n.inputs.get(1)) else {
                            break;
                        };
                        if !axes_known(x1) || !axes_known(x2) {
                            break;
                        }
                        let (Some(a1), Some(a2)) = (types.ints(x1), types.ints(x2)) else {
                            break;
                        };
                        let Some(r) = types.shape(&p.inputs[0]).map(|s| s.len()) else {
                            break;
                        };
                        let Some(axes) = combined_unsqueeze_axes(r, &a1, &a2) else {
                            break;
                        };
                        Rewrite::Axes(axes)
                    }
                    "Reshape" => {
                        let Some(t2) = n.inputs.get(1).and_then(|x| types.ints(x)) else {
                            break;
                        };
                        if t2.contains(&0) && n.attr_i("allowzero").unwrap_or(0) == 0 {
                            break;
                        }
                        Rewrite::Bypass
                    }
                    "Transpose" => {
                        let (Some(p1), Some(p2)) = (p.attr_ints("perm"), n.attr_ints("perm"))
                        else {
                            break;
                        };
                        let (Ok(p1), Ok(p2)) = (Perm::new(p1), Perm::new(p2)) else {
                            break;
                        };
                        let Some(p) = p2.after(&p1) else {
                            break;
                        };
                        Rewrite::Perm(p)
                    }
                    _ => break,
                };
                rewrites.push((j, r));
            }
            if rewrites.len() == readers.len() {
                edit = Some((i, rewrites));
                break;
            }
        }
        let Some((first, rewrites)) = edit else { break };
        let src = g.nodes[first].inputs[0].clone();
        let mut drop = vec![first];
        for (j, r) in rewrites {
            match r {
                Rewrite::Axes(axes) => {
                    let name = fresh_name(g, &format!("{}_axes", g.nodes[j].outputs[0]));
                    let raw = axes.iter().flat_map(|v| v.to_le_bytes()).collect();
                    g.initializers.push(
                        Tensor::from_raw(&name, DataType::I64, &[axes.len() as i64], raw)
                            .expect("consistent"),
                    );
                    g.nodes[j].inputs = vec![src.clone(), name];
                }
                Rewrite::Bypass => g.nodes[j].inputs[0] = src.clone(),
                Rewrite::Perm(perm) => {
                    let out = g.nodes[j].outputs[0].clone();
                    if perm.is_identity() && !outputs.contains(&out) {
                        rename_uses(g, &out, &src);
                        drop.push(j);
                    } else {
                        let n = &mut g.nodes[j];
                        n.inputs[0] = src.clone();
                        n.attributes.retain(|a| a.name() != "perm");
                        n.attributes.push(Attribute::ints("perm", &perm.to_i64()));
                    }
                }
            }
        }
        drop.sort_unstable();
        for d in drop.into_iter().rev() {
            g.nodes.remove(d);
        }
        local += 1;
    }
    *changes += local;
}

/// What happens to one reader of the fused intermediate.
enum Rewrite {
    /// Unsqueeze with these axes, straight from the source.
    Axes(Vec<i64>),
    /// Reshape straight from the source.
    Bypass,
    /// Transpose with this permutation from the source (removed when identity).
    Perm(Perm),
}

#[cfg(test)]
mod tests {
    use super::combined_unsqueeze_axes;

    #[test]
    fn unsqueeze_axes_compose() {
        // x:[a] → unsqueeze 0 → [1,a] → unsqueeze -1 → [1,a,1]
        assert_eq!(combined_unsqueeze_axes(1, &[0], &[-1]), Some(vec![0, 2]));
        // x:[a,b] → unsqueeze 1 → [a,1,b] → unsqueeze 1 → [a,1,1,b]
        assert_eq!(combined_unsqueeze_axes(2, &[1], &[1]), Some(vec![1, 2]));
        assert_eq!(combined_unsqueeze_axes(1, &[5], &[0]), None);
        // Repeated axes (invalid) are left alone instead of panicking.
        assert_eq!(combined_unsqueeze_axes(1, &[0, 0], &[0]), None);
    }

    /// Unsqueeze → Unsqueeze at opset 13 where one has no axes input, and Transpose →
    /// Transpose with a repeated perm: nothing to fuse, and no panic.
    #[test]
    fn malformed_chains_are_left_alone() {
        use wcc_ir::model::{Attribute, Graph, Node, TensorType, ValueInfo};
        use wcc_ir::{DataType, Model};
        let n = |op: &str, ins: &[&str], out: &str| {
            Node::new(
                out,
                op,
                ins.iter().map(|s| s.to_string()).collect(),
                vec![out.to_string()],
            )
        };
        let mut t1 = n("Transpose", &["x"], "t1");
        t1.attributes.push(Attribute::ints("perm", &[0, 0]));
        let mut t2 = n("Transpose", &["t1"], "t2");
        t2.attributes.push(Attribute::ints("perm", &[1, 0]));
        let g = Graph {
            inputs: vec![ValueInfo::tensor(
                "x",
                TensorType::known(DataType::F32, &[2, 3]),
            )],
            nodes: vec![
                n("Unsqueeze", &["x"], "u1"),
                n("Unsqueeze", &["u1"], "u2"),
                t1,
                t2,
            ],
            outputs: vec![
                ValueInfo::tensor("u2", TensorType::unknown()),
                ValueInfo::tensor("t2", TensorType::unknown()),
            ],
            ..Default::default()
        };
        let mut m = Model {
            ir_version: 8,
            opset_imports: vec![(String::new(), 13)],
            graph: g,
            functions: vec![],
            rest: Default::default(),
            sources: vec![],
            escaped_strings: false,
        };
        use wcc_ir::pass::Pass;
        let out = super::FuseConsecutive.run(&mut m).unwrap();
        assert_eq!(out.changes, 0);
    }
}
