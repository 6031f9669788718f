//! No-op removal: Identity, Dropout in inference, Cast to the type it already has, Reshape /
//! Transpose / Expand that change nothing, single-input Concat. Each removed node's output is
//! replaced by its input; when the output is a graph output, the producer is renamed instead.
//! May touch: node lists and value names; never tensor data.

use wcc_ir::infer::{infer_graph, TypeMap};
use wcc_ir::ops::util::Perm;
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{Dim, Graph, Model, Node, Result};

use std::collections::{HashMap, HashSet};

use crate::graph_util::{output_names, rename_all, resolve_chains};

pub struct RemoveNoOps;

impl Pass for RemoveNoOps {
    fn name(&self) -> &'static str {
        "remove-noops"
    }
    fn description(&self) -> &'static str {
        "removes Identity, inference Dropout, same-type Cast, Reshape/Transpose/Expand that change nothing"
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        let opset = model.default_opset();
        let mut changes = 0;
        run_graph(&mut model.graph, opset, None, &mut changes);
        Ok(PassOutcome::changed(changes))
    }
}

fn same_static(a: Option<&Vec<Dim>>, b: Option<&Vec<Dim>>) -> bool {
    // Equal and fully determined (symbolic names count: both sides name the same dim).
    matches!((a, b), (Some(a), Some(b)) if a == b && a.iter().all(|d| !matches!(d, Dim::Unknown)))
}

/// The input that a no-op node passes through, if the node is a no-op.
fn passthrough(n: &Node, types: &TypeMap, consts: &HashSet<String>, g: &Graph) -> Option<usize> {
    if !n.domain.is_empty() || n.outputs.is_empty() || n.inputs.is_empty() || n.inputs[0].is_empty()
    {
        return None;
    }
    let first_out_only = n.outputs.iter().skip(1).all(|o| o.is_empty());
    let inp = &n.inputs[0];
    let out = &n.outputs[0];
    let yes = match n.op_type.as_str() {
        "Identity" => true,
        "Dropout" => {
            // Inference unless training_mode is given and not a constant false.
            let training = n.inputs.get(2).filter(|s| !s.is_empty());
            let training_off = match training {
                None => true,
                Some(t) => {
                    consts.contains(t.as_str())
                        && g.initializer(t)
                            .and_then(|t| t.to_f64_vec().ok())
                            .is_some_and(|v| v.iter().all(|x| *x == 0.0))
                }
            };
            training_off && first_out_only
        }
        "Cast" => types.dtype(inp).is_some() && types.dtype(inp) == types.dtype(out),
        "Reshape" | "Expand" => {
            types.dtype(inp).is_some() && same_static(types.shape(inp), types.shape(out))
        }
        "Transpose" => match n.attr_ints("perm") {
            Some(p) => Perm::new(p).is_ok_and(|p| p.is_identity()),
            None => types.shape(inp).is_some_and(|s| s.len() <= 1),
        },
        "Concat" => n.inputs.len() == 1,
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "And" | "Or" if n.inputs.len() == 2 => {
            return identity_operand(n, types, consts, g);
        }
        _ => false,
    };
    yes.then_some(0)
}

/// For `x op c` (or `c op x` when op commutes) where constant `c` is op's identity element and
/// broadcasting does not change `x`: the index of `x`.
fn identity_operand(
    n: &Node,
    types: &TypeMap,
    consts: &HashSet<String>,
    g: &Graph,
) -> Option<usize> {
    let identity = match n.op_type.as_str() {
        "Add" | "Sub" | "Or" => 0.0,
        _ => 1.0,
    };
    let commutes = matches!(n.op_type.as_str(), "Add" | "Mul" | "And" | "Or");
    let out = &n.outputs[0];
    for (c, x) in [(1usize, 0usize), (0, 1)] {
        if c == 0 && !commutes {
            continue;
        }
        let is_identity = consts.contains(&n.inputs[c])
            && g.initializer(&n.inputs[c])
                // Only small constants are read: an identity element as large as a weight is
                // not worth reading a weight in full to find.
                .filter(|t| t.numel() <= 4096)
                .and_then(|t| t.to_f64_vec().ok())
                .is_some_and(|v| v.iter().all(|e| *e == identity));
        // Broadcasting leaves x's shape alone when the constant is a scalar, or has all-1 dims
        // and no more axes than x.
        let neutral_shape = g.initializer(&n.inputs[c]).is_some_and(|t| {
            t.dims().iter().all(|d| *d == 1)
                && types
                    .shape(&n.inputs[x])
                    .map_or(t.dims().is_empty(), |s| t.dims().len() <= s.len())
        });
        if is_identity
            && types.dtype(&n.inputs[x]).is_some()
            && types.dtype(&n.inputs[x]) == types.dtype(&n.inputs[c])
            && (neutral_shape || same_static(types.shape(&n.inputs[x]), types.shape(out)))
        {
            return Some(x);
        }
    }
    None
}

fn run_graph(g: &mut Graph, opset: i64, outer: Option<&TypeMap>, changes: &mut usize) {
    let types = infer_graph(g, opset, outer);
    for n in &mut g.nodes {
        for a in &mut n.attributes {
            for sg in &mut a.graphs {
                run_graph(sg, opset, Some(&types), changes);
            }
        }
    }
    let consts = crate::graph_util::constant_initializers(g);
    let outputs = output_names(g);
    let graph_inputs: HashSet<&str> = g.inputs.iter().map(|v| v.name.as_str()).collect();
    // Which nodes are no-ops, and the value each passes through. One decision per node, one
    // rename sweep at the end: linear in the graph, however long a chain of no-ops is.
    let mut removed = vec![false; g.nodes.len()];
    let mut subst: HashMap<String, String> = HashMap::new();
    let mut at_output: Vec<(usize, String, String)> = vec![];
    for (i, n) in g.nodes.iter().enumerate() {
        let Some(k) = passthrough(n, &types, &consts, g) else {
            continue;
        };
        let (inp, out) = (n.inputs[k].clone(), n.outputs[0].clone());
        if outputs.contains(&out) {
            at_output.push((i, inp, out));
        } else {
            subst.insert(out, inp);
            removed[i] = true;
        }
    }
    resolve_chains(&mut subst);
    // A no-op whose output is a graph output: the value it passes through is renamed to the
    // output instead, when a node that stays makes that value and it is neither a graph input nor
    // a graph output (and no other output claimed it first).
    let made_by_kept: HashSet<&str> = g
        .nodes
        .iter()
        .zip(&removed)
        .filter(|(_, r)| !**r)
        .flat_map(|(n, _)| n.outputs.iter().map(String::as_str))
        .collect();
    let mut claimed: HashMap<String, String> = HashMap::new();
    for (i, inp, out) in at_output {
        let root = subst.get(&inp).cloned().unwrap_or(inp);
        if outputs.contains(&root)
            || graph_inputs.contains(root.as_str())
            || claimed.contains_key(&root)
            || !made_by_kept.contains(root.as_str())
        {
            continue;
        }
        claimed.insert(root, out);
        removed[i] = true;
    }
    for to in subst.values_mut() {
        if let Some(out) = claimed.get(to) {
            *to = out.clone();
        }
    }
    subst.extend(claimed.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut keep = removed.iter().map(|r| !r);
    g.nodes.retain(|_| keep.next().unwrap_or(true));
    for n in &mut g.nodes {
        for o in &mut n.outputs {
            if let Some(to) = claimed.get(o.as_str()) {
                *o = to.clone();
            }
        }
    }
    for v in &mut g.value_info {
        if let Some(to) = claimed.get(&v.name) {
            v.name = to.clone();
        }
    }
    rename_all(g, &subst);
    *changes += removed.iter().filter(|r| **r).count();
    if *changes > 0 {
        wcc_ir::validate::topo_sort(g);
    }
}
