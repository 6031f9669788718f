//! Folding of per-channel affine maps into the convolution before them.
//!
//! A Conv with constant weight `W[c_out, c_in/g, k…]` and bias `b` computes, per output channel
//! `o`, `y_o = W_o ⋆ x + b_o`. An affine map that acts on each channel separately,
//! `z_o = s_o · y_o + t_o`, is the same Conv with `W'_o = s_o · W_o` and `b'_o = s_o · b_o + t_o`,
//! exactly (up to float rounding of the folded products). The maps recognised are:
//!
//! - `Mul(y, c)` / `Mul(c, y)` (s = c, t = 0), `Div(y, c)` (s = 1/c), `Add(y, c)` / `Add(c, y)`
//!   (t = c) and `Sub(y, c)` (t = −c), where the constant `c` varies at most along the channel
//!   axis (shape `[]`, `[1]`, `[C,1,1]`, `[1,C,1,1]`…), so it does not broadcast `y` to a larger
//!   shape;
//! - inference-mode `BatchNormalization(y, γ, β, μ, σ², ε)`: s = γ/√(σ²+ε), t = β − μ·s
//!   (how Paddle and `training=PRESERVE` exports leave batch norm; Ioffe & Szegedy, "Batch
//!   Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift",
//!   arXiv 1502.03167).
//!
//! A chain (Conv → BN → Mul → Add) is composed into one map and folded once. It touches only a Conv
//! whose output has no other reader and is not a graph output, with f32/f64 constant weights; the
//! folded weights are new initializers (a weight shared with another node is never edited).

use std::collections::{HashMap, HashSet};

use ndarray::{ArrayD, Axis, IxDyn};
use wcc_ir::eval::Array;
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{DataType, Graph, Model, Node, Result};

use crate::graph_util::{fresh_name, output_names, use_counts};

pub struct ConvAffine;

impl Pass for ConvAffine {
    fn name(&self) -> &'static str {
        "conv-affine"
    }
    fn description(&self) -> &'static str {
        "folds per-channel Mul/Div/Add/Sub and BatchNormalization into the Conv before them"
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        let mut out = PassOutcome::default();
        model
            .graph
            .for_each_graph_mut(&mut |g| out.changes += fold_graph(g));
        if out.changes > 0 {
            out.notes
                .push(format!("{} affine map(s) folded into Conv", out.changes));
        }
        Ok(out)
    }
}

/// A per-channel affine map `z = s·y + t` over `c_out` channels (vectors of length `c_out`).
struct Affine {
    s: Vec<f64>,
    t: Vec<f64>,
}

/// The constant `name` as one value per channel, when it varies at most along axis 1 of a rank
/// `rank` output with `c_out` channels (and so does not broadcast `y` up).
fn per_channel(
    g: &Graph,
    consts: &HashSet<String>,
    name: &str,
    rank: usize,
    c_out: usize,
) -> Option<Vec<f64>> {
    if !consts.contains(name) {
        return None;
    }
    let t = g.initializer(name)?;
    let dims = t.dims();
    if dims.len() > rank {
        return None;
    }
    // Align to the output's trailing axes; the channel axis is 1.
    let offset = rank - dims.len();
    let mut varying = None;
    for (i, d) in dims.iter().enumerate() {
        let axis = offset + i;
        if *d == 1 {
            continue;
        }
        if axis == 1 && *d as usize == c_out {
            varying = Some(());
        } else {
            return None;
        }
    }
    let v = t.to_f64_vec().ok()?;
    Some(match varying {
        Some(()) => v,
        None if v.len() == 1 => vec![v[0]; c_out],
        None => return None,
    })
}

/// The affine map node `n` applies to its input `y` (rank `rank`, `c_out` channels).
fn affine_of(
    n: &Node,
    y: &str,
    g: &Graph,
    consts: &HashSet<String>,
    rank: usize,
    c_out: usize,
) -> Option<Affine> {
    if !n.domain.is_empty() || n.outputs.len() != 1 {
        return None;
    }
    let other = |i: usize| -> Option<&str> {
        (n.inputs.len() == 2 && n.inputs[i] == y).then(|| n.inputs[1 - i].as_str())
    };
    let pc = |name: &str| per_channel(g, consts, name, rank, c_out);
    let ones = vec![1.0; c_out];
    let zeros = vec![0.0; c_out];
    match n.op_type.as_str() {
        "Mul" => {
            let c = other(0).or_else(|| other(1))?;
            Some(Affine {
                s: pc(c)?,
                t: zeros,
            })
        }
        "Div" => {
            let c = pc(other(0)?)?;
            if c.contains(&0.0) {
                return None;
            }
            Some(Affine {
                s: c.iter().map(|v| 1.0 / v).collect(),
                t: zeros,
            })
        }
        "Add" => {
            let c = other(0).or_else(|| other(1))?;
            Some(Affine { s: ones, t: pc(c)? })
        }
        "Sub" => Some(Affine {
            s: ones,
            t: pc(other(0)?)?.iter().map(|v| -v).collect(),
        }),
        "BatchNormalization" => {
            if n.inputs.len() != 5
                || n.inputs[0] != y
                || n.attr_i("training_mode").unwrap_or(0) != 0
                || n.outputs.len() != 1
            {
                return None;
            }
            let vec_of = |name: &str| -> Option<Vec<f64>> {
                let t = g.initializer(name).filter(|_| consts.contains(name))?;
                let v = t.to_f64_vec().ok()?;
                (v.len() == c_out).then_some(v)
            };
            let (gamma, beta, mean, var) = (
                vec_of(&n.inputs[1])?,
                vec_of(&n.inputs[2])?,
                vec_of(&n.inputs[3])?,
                vec_of(&n.inputs[4])?,
            );
            let eps = n.attr_f("epsilon").unwrap_or(1e-5) as f64;
            let s: Vec<f64> = (0..c_out)
                .map(|o| gamma[o] / (var[o] + eps).sqrt())
                .collect();
            if s.iter().any(|v| !v.is_finite()) {
                return None;
            }
            let t = (0..c_out).map(|o| beta[o] - mean[o] * s[o]).collect();
            Some(Affine { s, t })
        }
        _ => None,
    }
}

impl Affine {
    /// `self` then `next`: `s₂·(s₁·y + t₁) + t₂`.
    fn then(self, next: &Affine) -> Affine {
        Affine {
            s: self.s.iter().zip(&next.s).map(|(a, b)| a * b).collect(),
            t: self
                .t
                .iter()
                .zip(&next.s)
                .zip(&next.t)
                .map(|((t1, s2), t2)| s2 * t1 + t2)
                .collect(),
        }
    }
}

/// What to fold into one Conv: the nodes of its affine chain, composed into one map.
struct Plan {
    conv: usize,
    chain: Vec<usize>,
    map: Affine,
}

/// One pass over the graph: each Conv's chain of affine readers is composed and folded once.
fn fold_graph(g: &mut Graph) -> usize {
    let plans = {
        let consts = g.constants();
        let uses = use_counts(g);
        let outputs = output_names(g);
        let mut reader: HashMap<&str, usize> = HashMap::new();
        for (j, n) in g.nodes.iter().enumerate() {
            for x in n.present_inputs() {
                reader.entry(x).or_insert(j);
            }
        }
        let mut plans = vec![];
        for (i, conv) in g.nodes.iter().enumerate() {
            if !conv.is("Conv") || conv.outputs.len() != 1 || conv.inputs.len() < 2 {
                continue;
            }
            let Some(w) = g.constant(&conv.inputs[1]) else {
                continue;
            };
            if !matches!(w.dtype(), Ok(DataType::F32 | DataType::F64)) {
                continue;
            }
            let bias = conv.inputs.get(2).filter(|b| !b.is_empty());
            if bias.is_some_and(|b| !consts.contains(b)) {
                continue;
            }
            let (rank, c_out) = (w.dims().len(), *w.dims().first().unwrap_or(&0) as usize);
            if rank < 3 || c_out == 0 {
                continue;
            }
            let (mut y, mut chain, mut map) = (&conv.outputs[0], vec![], None::<Affine>);
            while !outputs.contains(y) && uses.get(y).copied() == Some(1) {
                let Some(&j) = reader.get(y.as_str()) else {
                    break;
                };
                let Some(a) = affine_of(&g.nodes[j], y, g, &consts, rank, c_out) else {
                    break;
                };
                map = Some(match map {
                    None => a,
                    Some(m) => m.then(&a),
                });
                chain.push(j);
                y = &g.nodes[j].outputs[0];
            }
            if let Some(map) = map {
                plans.push(Plan {
                    conv: i,
                    chain,
                    map,
                });
            }
        }
        plans
    };
    let mut removed = HashSet::new();
    for p in &plans {
        if apply(g, p) {
            removed.extend(p.chain.iter().copied());
        }
    }
    let mut k = 0;
    g.nodes.retain(|_| {
        k += 1;
        !removed.contains(&(k - 1))
    });
    removed.len()
}

/// Rewrites the plan's Conv to compute its whole chain: new weight and bias initializers, and
/// the chain's last output. The chain's nodes are removed by the caller.
fn apply(g: &mut Graph, p: &Plan) -> bool {
    let a = &p.map;
    let conv = &g.nodes[p.conv];
    let (Some(w), bias_name) = (
        g.initializer(&conv.inputs[1]),
        conv.inputs.get(2).filter(|b| !b.is_empty()).cloned(),
    ) else {
        return false;
    };
    let Some(wa) = Array::from_tensor(w) else {
        return false;
    };
    let c_out = a.s.len();
    let bias: Vec<f64> = match &bias_name {
        Some(b) => match g.initializer(b).and_then(|t| t.to_f64_vec().ok()) {
            Some(v) if v.len() == c_out => v,
            _ => return false,
        },
        None => vec![0.0; c_out],
    };
    let scale = |x: &ArrayD<f64>| -> ArrayD<f64> {
        let mut x = x.clone();
        for (o, mut lane) in x.axis_iter_mut(Axis(0)).enumerate() {
            lane.mapv_inplace(|v| v * a.s[o]);
        }
        x
    };
    let new_w = match &wa {
        Array::F32(x) => Array::F32(scale(&x.mapv(|v| v as f64)).mapv(|v| v as f32)),
        Array::F64(x) => Array::F64(scale(x)),
        _ => return false,
    };
    let new_b: Vec<f64> = (0..c_out).map(|o| a.s[o] * bias[o] + a.t[o]).collect();
    let b_arr = ArrayD::from_shape_vec(IxDyn(&[c_out]), new_b).expect("length c_out");
    let new_b = match wa {
        Array::F32(_) => Array::F32(b_arr.mapv(|v| v as f32)),
        _ => Array::F64(b_arr),
    };
    let Some(&last) = p.chain.last() else {
        return false;
    };
    let out = g.nodes[last].outputs[0].clone();
    let w_name = fresh_name(g, &format!("{}_w", out));
    let b_name = fresh_name(g, &format!("{}_b", out));
    g.initializers.push(new_w.to_tensor(&w_name));
    g.initializers.push(new_b.to_tensor(&b_name));
    let conv = &mut g.nodes[p.conv];
    conv.inputs.truncate(1);
    conv.inputs.push(w_name);
    conv.inputs.push(b_name);
    conv.outputs[0] = out;
    true
}
