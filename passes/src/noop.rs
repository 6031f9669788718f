//! No-op removal: Identity, Dropout in inference, Cast to the type it already has, Reshape /
//! Transpose / Expand that change nothing, single-input Concat. Each removed node's output is
//! replaced by its input; when the output is a graph output, the producer is renamed instead.
//! May touch: node lists and value names; never tensor data.

use wcc_ir::infer::{infer_graph, TypeMap};
use wcc_ir::ops::util::Perm;
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{Dim, Graph, Model, Node, Result};

use crate::graph_util::{output_names, rename_uses};

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
fn passthrough(
    n: &Node,
    types: &TypeMap,
    consts: &std::collections::HashSet<String>,
    g: &Graph,
) -> Option<usize> {
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
    consts: &std::collections::HashSet<String>,
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
    let graph_inputs: std::collections::HashSet<String> =
        g.inputs.iter().map(|v| v.name.clone()).collect();
    let mut i = 0;
    while i < g.nodes.len() {
        let n = &g.nodes[i];
        let Some(k) = passthrough(n, &types, &consts, g) else {
            i += 1;
            continue;
        };
        let inp = n.inputs[k].clone();
        let out = n.outputs[0].clone();
        if !outputs.contains(&out) {
            g.nodes.remove(i);
            rename_uses(g, &out, &inp);
            *changes += 1;
            continue;
        }
        // The output is a graph output: rename the producer of `inp` to `out`, if `inp` is a node
        // output that is not itself a graph output.
        let producer = g.nodes.iter().position(|m| m.outputs.contains(&inp));
        if let Some(p) =
            producer.filter(|_| !outputs.contains(&inp) && !graph_inputs.contains(&inp))
        {
            g.nodes.remove(i);
            let p = if p > i { p - 1 } else { p };
            for o in &mut g.nodes[p].outputs {
                if *o == inp {
                    *o = out.clone();
                }
            }
            rename_uses(g, &inp, &out);
            for v in &mut g.value_info {
                if v.name == inp {
                    v.name = out.clone();
                }
            }
            *changes += 1;
            continue;
        }
        i += 1;
    }
    if *changes > 0 {
        wcc_ir::validate::topo_sort(g);
    }
}
