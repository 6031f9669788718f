//! Query-key fused form (opt-in, `--enable qk-fuse`): OFQ's query-key reparameterization (QKR,
//! Liu et al., "Oscillation-free Quantization for Low-bit Vision Transformers", ICML 2023,
//! arXiv 2302.02210) as an exact float fold. Per head h, with `W_q^h, W_k^h`
//! the head's columns of the stored `C×(H·d)` projections:
//!
//! `scores_h[i,j] = (x_i W_q^h + b_q^h)·(x_j W_k^h + b_k^h) = (x_i M_h + u_h)·x_j + (terms constant in j)`
//!
//! with `M_h = W_q^h (W_k^h)ᵀ ∈ R^{C×C}` and `u_h = W_k^h b_q^h`; the key bias and every term
//! constant in j drop out under the softmax over keys. The graph computes
//! `Q' = Reshape(X·[M_1 … M_H] + [u_1 … u_H], [0,0,H,C])ᵀ` and uses `X` itself as every head's key.
//! Valid only without rotary embeddings (the rotation sits between W_q and W_k): the pass refuses,
//! naming the node, when it finds one. It costs parameters (`H·C²` instead of `2·C·H·d`) and
//! score FLOPs (C instead of d per head); the note reports both.
//! May touch: the query/key projections of matched attention blocks (new Q' path; the old Q and K
//! paths are left to DCE).

use std::collections::HashMap;

use ndarray::{s, Array1, Array2, Ix1, Ix2};
use wcc_ir::eval::Array;
use wcc_ir::infer::infer_graph;
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{Attribute, DataType, Dim, Graph, Model, Node, Result, Tensor};

use crate::graph_util::fresh_name;

pub struct QkFuse;

/// One matched attention block.
struct Match {
    scores: usize,
    x: String,
    wq: String,
    bq: Option<String>,
    wk: String,
    heads: usize,
    head_dim: usize,
}

fn producer(g: &Graph) -> HashMap<&str, usize> {
    g.nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.as_str(), i)))
        .collect()
}

/// `Add(MatMul(X, W), b)` / `Add(b, MatMul(X, W))` / `MatMul(X, W)` with constant W (and b):
/// (X, W, b).
fn linear(
    g: &Graph,
    prod: &HashMap<&str, usize>,
    v: &str,
) -> std::result::Result<(String, String, Option<String>), String> {
    let n = &g.nodes[*prod
        .get(v)
        .ok_or_else(|| format!("'{v}' is not computed by a node"))?];
    let is_const = |x: &str| g.constant(x).is_some();
    let mm = |name: &str| -> Option<(String, String)> {
        let m = &g.nodes[*prod.get(name)?];
        (m.is("MatMul") && is_const(&m.inputs[1]))
            .then(|| (m.inputs[0].clone(), m.inputs[1].clone()))
    };
    if n.is("MatMul") && is_const(&n.inputs[1]) {
        return Ok((n.inputs[0].clone(), n.inputs[1].clone(), None));
    }
    if n.is("Add") {
        for (a, b) in [(0, 1), (1, 0)] {
            if is_const(&n.inputs[b]) {
                if let Some((x, w)) = mm(&n.inputs[a]) {
                    return Ok((x, w, Some(n.inputs[b].clone())));
                }
            }
        }
    }
    Err(format!(
        "node '{}' ({}) is not a projection X·W + b with constant W, b",
        n.name, n.op_type
    ))
}

/// The head split `Transpose(Reshape(v, [b, s, H, d]), perm)`: (v, H, d).
fn head_split(
    g: &Graph,
    prod: &HashMap<&str, usize>,
    types: &wcc_ir::infer::TypeMap,
    v: &str,
    perm: &[i64],
) -> std::result::Result<(String, usize, usize), String> {
    let t = &g.nodes[*prod
        .get(v)
        .ok_or_else(|| format!("'{v}' is not computed by a node"))?];
    if !t.is("Transpose") || t.attr_ints("perm") != Some(perm) {
        return Err(format!(
            "node '{}' ({}) is not the head split Transpose{perm:?}",
            t.name, t.op_type
        ));
    }
    let r = &g.nodes[*prod
        .get(t.inputs[0].as_str())
        .ok_or("no Reshape before the head split")?];
    if !r.is("Reshape") {
        return Err(format!(
            "node '{}' ({}) is not the head split Reshape",
            r.name, r.op_type
        ));
    }
    match types.shape(&r.outputs[0]).map(|s| s.as_slice()) {
        Some([_, _, Dim::Known(h), Dim::Known(d)]) => {
            Ok((r.inputs[0].clone(), *h as usize, *d as usize))
        }
        other => Err(format!(
            "Reshape '{}' does not split into known [.., .., heads, head_dim] ({other:?})",
            r.name
        )),
    }
}

/// Whether `v` depends on a Sin or Cos (rotary position embedding), looking back a few nodes.
fn rotary_near(g: &Graph, prod: &HashMap<&str, usize>, v: &str, depth: usize) -> Option<String> {
    let n = &g.nodes[*prod.get(v)?];
    if n.is("Sin") || n.is("Cos") {
        return Some(n.name.clone());
    }
    if depth == 0 {
        return None;
    }
    n.present_inputs()
        .find_map(|i| rotary_near(g, prod, i, depth - 1))
}

fn find(g: &Graph, opset: i64) -> (Vec<Match>, Vec<String>) {
    let types = infer_graph(g, opset, None);
    let prod = producer(g);
    let (mut found, mut why) = (vec![], vec![]);
    for n in g.nodes.iter().filter(|n| n.is("Softmax")) {
        let axis = n.attr_i("axis").unwrap_or(-1);
        let rank = types
            .shape(&n.inputs[0])
            .map(|s| s.len() as i64)
            .unwrap_or(4);
        if axis != -1 && axis != rank - 1 {
            why.push(format!("Softmax '{}': not over the last axis", n.name));
            continue;
        }
        // Back from the Softmax through the mask Add and the scale Mul/Div to the scores MatMul.
        let mut v = n.inputs[0].clone();
        let mut scores = None;
        for _ in 0..4 {
            let Some(&i) = prod.get(v.as_str()) else {
                break;
            };
            let m = &g.nodes[i];
            if m.is("MatMul") {
                scores = Some(i);
                break;
            } else if m.is("Add") || m.is("Mul") || m.is("Div") {
                v = m.inputs[0].clone();
            } else {
                break;
            }
        }
        let Some(si) = scores else {
            why.push(format!("Softmax '{}': no Q·Kᵀ MatMul before it", n.name));
            continue;
        };
        let sm = &g.nodes[si];
        if let Some(r) = sm
            .inputs
            .iter()
            .find_map(|side| rotary_near(g, &prod, side, 12))
        {
            why.push(format!(
                "attention at '{}' has rotary position embeddings (node '{r}' computes the rotation between W_q and W_k): the query-key product cannot be fused",
                sm.name
            ));
            continue;
        }
        let r = (|| -> std::result::Result<Match, String> {
            let (ql, heads, head_dim) = head_split(g, &prod, &types, &sm.inputs[0], &[0, 2, 1, 3])?;
            let (kl, kh, kd) = head_split(g, &prod, &types, &sm.inputs[1], &[0, 2, 3, 1])?;
            if (kh, kd) != (heads, head_dim) {
                return Err("query and key heads differ (grouped-query attention)".into());
            }
            let (xq, wq, bq) = linear(g, &prod, &ql)?;
            let (xk, wk, _bk) = linear(g, &prod, &kl)?;
            if xq != xk {
                return Err("query and key read different inputs (cross-attention)".into());
            }
            if types.shape(&xq).map(|s| s.len()) != Some(3) {
                return Err(format!(
                    "the projections' input '{xq}' is not [batch, seq, C]"
                ));
            }
            Ok(Match {
                scores: si,
                x: xq,
                wq,
                bq,
                wk,
                heads,
                head_dim,
            })
        })();
        match r {
            Ok(m) => found.push(m),
            Err(e) => why.push(format!("attention at '{}': {e}", sm.name)),
        }
    }
    (found, why)
}

fn f32_matrix(t: &Tensor) -> Option<Array2<f32>> {
    match Array::from_tensor(t)? {
        Array::F32(a) => a.into_dimensionality::<Ix2>().ok(),
        _ => None,
    }
}

fn f32_vector(t: &Tensor) -> Option<Array1<f32>> {
    match Array::from_tensor(t)? {
        Array::F32(a) => a.into_dimensionality::<Ix1>().ok(),
        _ => None,
    }
}

fn i64_tensor(name: &str, v: &[i64]) -> Tensor {
    Tensor::from_raw(
        name,
        DataType::I64,
        &[v.len() as i64],
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
    .expect("consistent")
}

impl Pass for QkFuse {
    fn name(&self) -> &'static str {
        "qk-fuse"
    }
    fn description(&self) -> &'static str {
        "opt-in: fuses W_q·W_kᵀ per head (OFQ's QKR, float); exact; refuses on rotary embeddings"
    }
    fn run_once(&self) -> bool {
        true
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        let opset = model.default_opset();
        let g = &mut model.graph;
        let (mut found, why) = find(g, opset);
        // Rewrite from the last block back, so inserting nodes keeps earlier indices valid.
        found.sort_by_key(|m| std::cmp::Reverse(m.scores));
        let mut out = PassOutcome::default();
        out.notes.extend(why.iter().cloned());
        let (mut params_before, mut params_after, mut flops_before, mut flops_after) =
            (0usize, 0usize, 0usize, 0usize);
        for m in &found {
            let (Some(wq), Some(wk)) = (
                g.constant(&m.wq).and_then(f32_matrix),
                g.constant(&m.wk).and_then(f32_matrix),
            ) else {
                out.notes.push(format!(
                    "attention at '{}': weights are not f32 matrices",
                    g.nodes[m.scores].name
                ));
                continue;
            };
            let bq = match &m.bq {
                Some(b) => match g.constant(b).and_then(f32_vector) {
                    Some(v) => v,
                    None => continue,
                },
                None => Array1::zeros(wq.ncols()),
            };
            let (c, hd, h) = (wq.nrows(), m.head_dim, m.heads);
            if wq.ncols() != h * hd || wk.dim() != wq.dim() || bq.len() != h * hd {
                out.notes.push(format!(
                    "attention at '{}': projection shapes do not match {h} heads of {hd}",
                    g.nodes[m.scores].name
                ));
                continue;
            }
            // M_h = Wq_h · Wk_hᵀ, u_h = Wk_h · bq_h, computed in f64.
            let wq64 = wq.mapv(|v| v as f64);
            let wk64 = wk.mapv(|v| v as f64);
            let bq64 = bq.mapv(|v| v as f64);
            let mut mcat = Array2::<f32>::zeros((c, h * c));
            let mut ucat = Array1::<f32>::zeros(h * c);
            for head in 0..h {
                let qh = wq64.slice(s![.., head * hd..(head + 1) * hd]);
                let kh = wk64.slice(s![.., head * hd..(head + 1) * hd]);
                let mh = qh.dot(&kh.t());
                let uh = kh.dot(&bq64.slice(s![head * hd..(head + 1) * hd]));
                mcat.slice_mut(s![.., head * c..(head + 1) * c])
                    .assign(&mh.mapv(|v| v as f32));
                ucat.slice_mut(s![head * c..(head + 1) * c])
                    .assign(&uh.mapv(|v| v as f32));
            }
            params_before += 2 * c * h * hd + h * hd * 2;
            params_after += h * c * c + h * c;
            flops_before += 2 * 2 * c * h * hd + 2 * h * hd; // per token: two projections, per key: scores
            flops_after += 2 * c * h * c + 2 * h * c;
            let base = g.nodes[m.scores].name.clone();
            let mname = fresh_name(g, &format!("{base}/qk_fused_weight"));
            let uname = fresh_name(g, &format!("{base}/qk_fused_bias"));
            g.initializers
                .push(Array::F32(mcat.into_dyn()).to_tensor(&mname));
            g.initializers
                .push(Array::F32(ucat.into_dyn()).to_tensor(&uname));
            let shape = fresh_name(g, &format!("{base}/qk_fused_shape"));
            g.initializers
                .push(i64_tensor(&shape, &[0, 0, h as i64, c as i64]));
            let axes = fresh_name(g, &format!("{base}/qk_fused_axes"));
            g.initializers.push(i64_tensor(&axes, &[1]));
            let v = |g: &Graph, s: &str| fresh_name(g, &format!("{base}/{s}"));
            let (qp, qb, qr, qt, kt, ku) = (
                v(g, "qk_q"),
                v(g, "qk_q_bias"),
                v(g, "qk_q_heads"),
                v(g, "qk_q_t"),
                v(g, "qk_x_t"),
                v(g, "qk_keys"),
            );
            let mut nodes = vec![
                Node::new(&qp, "MatMul", vec![m.x.clone(), mname], vec![qp.clone()]),
                Node::new(&qb, "Add", vec![qp.clone(), uname], vec![qb.clone()]),
                Node::new(&qr, "Reshape", vec![qb.clone(), shape], vec![qr.clone()]),
                Node::new(&qt, "Transpose", vec![qr.clone()], vec![qt.clone()]),
                Node::new(&kt, "Transpose", vec![m.x.clone()], vec![kt.clone()]),
                Node::new(&ku, "Unsqueeze", vec![kt.clone(), axes], vec![ku.clone()]),
            ];
            nodes[3]
                .attributes
                .push(Attribute::ints("perm", &[0, 2, 1, 3]));
            nodes[4]
                .attributes
                .push(Attribute::ints("perm", &[0, 2, 1]));
            let at = m.scores;
            g.nodes[at].inputs = vec![qt, ku];
            for (k, n) in nodes.into_iter().enumerate() {
                g.nodes.insert(at + k, n);
            }
            out.changes += 1;
        }
        if out.changes > 0 {
            wcc_ir::validate::topo_sort(g);
            out.notes.push(format!(
                "fused {} attention block(s): query/key parameters {params_before} → {params_after} ({:+.0}%), per-token projection+score FLOPs (per key) {flops_before} → {flops_after}",
                out.changes,
                100.0 * (params_after as f64 / params_before.max(1) as f64 - 1.0)
            ));
        } else if out.notes.is_empty() {
            out.notes
                .push("no attention block found (no Softmax over Q·Kᵀ)".into());
        }
        Ok(out)
    }
}
