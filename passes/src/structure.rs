//! Transformer structure discovery: blocks, their attention and MLP sublayers, the residual Adds
//! that close them, their norms (pre- or post-LN), the Q/K/V/O and MLP projections with their
//! weight layouts, heads and KV heads, rotary embeddings and KV-cache inputs/outputs. Found from
//! the graph's shape (residual Adds whose branch reads the stream, Softmax between two products,
//! products with constant weights); node names are only hints (the layer index they carry is
//! reported beside the position found). What is not found is reported with the reason.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::Serialize;
use wcc_ir::infer::{infer_graph, TypeMap};
use wcc_ir::{Dim, Graph, Model};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Projection {
    pub role: String,
    pub node: String,
    pub weight: String,
    /// "in×out" (MatMul B, Gemm transB=0) or "out×in" (Gemm transB=1, or through a Transpose).
    pub layout: String,
    pub shape: Vec<i64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sublayer {
    /// "attention" or "mlp".
    pub kind: String,
    /// The Add that closes the sublayer (stream + branch).
    pub residual: String,
    /// The residual stream entering the sublayer (the Add's stream input) and leaving it (the
    /// Add's output).
    pub stream_in: String,
    pub stream_out: String,
    /// The norm on the branch (pre-LN) or after the residual (post-LN).
    pub norm: Option<String>,
    pub projections: Vec<Projection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heads: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_heads: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    pub rope: bool,
    /// (past input, present output) pairs of a KV cache, key then value.
    pub kv_cache: Vec<(String, String)>,
    /// The Softmax of an attention sublayer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub softmax: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Block {
    pub index: usize,
    /// The layer index the node names carry, when they carry one.
    pub name_hint: Option<usize>,
    pub attention: Option<Sublayer>,
    pub mlp: Option<Sublayer>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Structure {
    /// "pre-LN", "post-LN" or "unknown".
    pub norm_placement: String,
    pub hidden: Option<i64>,
    pub blocks: Vec<Block>,
    /// What was not found, and why.
    pub problems: Vec<String>,
}

struct Ctx<'a> {
    g: &'a Graph,
    types: TypeMap,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
    consts: HashSet<String>,
}

impl<'a> Ctx<'a> {
    fn new(g: &'a Graph, opset: i64) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in g.nodes.iter().enumerate() {
            for o in &n.outputs {
                producer.insert(o.as_str(), i);
            }
            for x in n.present_inputs() {
                consumers.entry(x).or_default().push(i);
            }
        }
        let consts = g.constants();
        Ctx {
            g,
            types: infer_graph(g, opset, None),
            producer,
            consumers,
            consts,
        }
    }

    /// Nodes computing `y` that do not also compute `x` — the branch from `x` to `y` — or None
    /// when `x` does not reach `y`.
    fn branch(&self, x: &str, y: &str) -> Option<Vec<usize>> {
        let mut seen = HashSet::new();
        let mut q = VecDeque::from([y.to_string()]);
        let mut nodes = vec![];
        let mut reached = false;
        while let Some(v) = q.pop_front() {
            if v == x {
                reached = true;
                continue;
            }
            let Some(&p) = self.producer.get(v.as_str()) else {
                continue;
            };
            if !seen.insert(p) {
                continue;
            }
            nodes.push(p);
            for i in self.g.nodes[p].present_inputs() {
                q.push_back(i.to_string());
            }
        }
        // Drop what also feeds x (shared prefixes: masks, positions).
        let before_x = self.ancestors(x);
        reached.then(|| {
            nodes
                .into_iter()
                .filter(|n| !before_x.contains(n))
                .collect()
        })
    }

    fn ancestors(&self, v: &str) -> HashSet<usize> {
        let mut seen = HashSet::new();
        let mut q = VecDeque::from([v.to_string()]);
        while let Some(v) = q.pop_front() {
            if let Some(&p) = self.producer.get(v.as_str()) {
                if seen.insert(p) {
                    q.extend(self.g.nodes[p].present_inputs().map(str::to_string));
                }
            }
        }
        seen
    }

    fn last_dim(&self, v: &str) -> Option<Dim> {
        self.types.shape(v).and_then(|s| s.last().cloned())
    }

    /// A product with a constant weight: (weight name, layout, shape).
    fn projection(&self, i: usize) -> Option<(String, &'static str, Vec<i64>)> {
        let n = &self.g.nodes[i];
        let w = n.inputs.get(1)?;
        let dims = |name: &str| {
            self.g
                .initializer(name)
                .map(|t| t.dims().to_vec())
                .unwrap_or_default()
        };
        let through_transpose = || -> Option<String> {
            let t = &self.g.nodes[*self.producer.get(w.as_str())?];
            (t.is("Transpose") && self.consts.contains(&t.inputs[0])).then(|| t.inputs[0].clone())
        };
        if n.is("MatMul") || n.is("Gemm") {
            let trans_b = n.is("Gemm") && n.attr_i("transB").unwrap_or(0) != 0;
            if self.consts.contains(w) {
                return Some((
                    w.clone(),
                    if trans_b { "out×in" } else { "in×out" },
                    dims(w),
                ));
            }
            if let Some(src) = through_transpose() {
                return Some((src.clone(), "out×in", dims(&src)));
            }
        }
        None
    }

    /// The nearest constant-weight products above `v` (breadth first, within the branch).
    fn projections_above(&self, v: &str, branch: &HashSet<usize>, limit: usize) -> Vec<usize> {
        let mut out = vec![];
        let mut seen = HashSet::new();
        let mut q = VecDeque::from([v.to_string()]);
        while let Some(v) = q.pop_front() {
            let Some(&p) = self.producer.get(v.as_str()) else {
                continue;
            };
            if !branch.contains(&p) || !seen.insert(p) || seen.len() > 64 {
                continue;
            }
            if self.projection(p).is_some() {
                out.push(p);
                if out.len() >= limit {
                    break;
                }
                continue;
            }
            q.extend(self.g.nodes[p].present_inputs().map(str::to_string));
        }
        out
    }

    fn is_norm(&self, i: usize) -> bool {
        let n = &self.g.nodes[i];
        matches!(n.op_type.as_str(), "LayerNormalization" | "SimplifiedLayerNormalization" | "RMSNormalization" | "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization")
            // RMSNorm written out: Pow(x, 2) → ReduceMean.
            || (n.is("Pow") && n.outputs.first().and_then(|o| self.consumers.get(o.as_str())).is_some_and(|c| c.iter().any(|j| self.g.nodes[*j].is("ReduceMean"))))
            || (n.is("ReduceMean") && n.inputs.first().and_then(|x| self.producer.get(x.as_str())).is_some_and(|p| self.g.nodes[*p].is("Sub")))
    }
}

fn layer_hint(name: &str) -> Option<usize> {
    // `/layers.3/`, `layer.3`, `/h.3/`, `blocks.3`, `layers_3`
    let bytes = name.as_bytes();
    for key in [
        "layers.", "layer.", "h.", "blocks.", "block.", "layers_", "layer_",
    ] {
        let mut from = 0;
        while let Some(pos) = name[from..].find(key) {
            let start = from + pos;
            let ok_before = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
            let digits: String = name[start + key.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            if ok_before && !digits.is_empty() {
                return digits.parse().ok();
            }
            from = start + key.len();
        }
    }
    None
}

/// Finds the transformer structure of the main graph.
pub fn discover(model: &Model) -> Structure {
    let g = &model.graph;
    let cx = Ctx::new(g, model.default_opset());
    let mut problems = vec![];
    // Residual Adds: x + f(x), with f containing a constant-weight product.
    let mut residuals: Vec<(usize, String, String, Vec<usize>)> = vec![];
    for (i, n) in g.nodes.iter().enumerate() {
        // ONNX Runtime's fused residual + norm: SkipLayerNormalization(branch, skip = stream).
        if n.domain == "com.microsoft"
            && n.op_type.starts_with("Skip")
            && n.op_type.ends_with("LayerNormalization")
            && n.inputs.len() >= 2
        {
            if let Some(br) = cx.branch(&n.inputs[1], &n.inputs[0]) {
                if br.iter().any(|p| {
                    cx.projection(*p).is_some() || cx.g.nodes[*p].domain == "com.microsoft"
                }) {
                    residuals.push((i, n.inputs[1].clone(), n.inputs[0].clone(), br));
                }
            }
            continue;
        }
        if !n.is("Add") || n.inputs.len() != 2 || n.inputs.iter().any(|x| cx.consts.contains(x)) {
            continue;
        }
        let (a, b) = (&n.inputs[0], &n.inputs[1]);
        // The residual stream is [batch, seq, hidden] (or flattened [tokens, hidden]).
        let stream_like = |v: &str| {
            cx.types.shape(v).is_some_and(|s| {
                (2..=3).contains(&s.len()) && matches!(s.last(), Some(Dim::Known(_)))
            })
        };
        if !stream_like(a)
            || cx.types.shape(a) != cx.types.shape(b) && cx.last_dim(a) != cx.last_dim(b)
        {
            continue;
        }
        for (x, y) in [(a, b), (b, a)] {
            if let Some(br) = cx.branch(x, y) {
                if br.iter().any(|p| cx.projection(*p).is_some()) {
                    residuals.push((i, x.clone(), y.clone(), br));
                    break;
                }
            }
        }
    }
    // Drop Adds nested inside another residual's branch (none expected; keeps the outermost).
    let softmaxes: Vec<usize> = g
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.is("Softmax") || (n.domain == "com.microsoft" && n.op_type.contains("Attention"))
        })
        .map(|(i, _)| i)
        .collect();
    if softmaxes.is_empty() {
        problems.push(
            "no attention core: the graph has no Softmax (nor com.microsoft Attention)".into(),
        );
    }
    if residuals.is_empty() {
        problems.push("no residual Add of the form x + f(x) with a weight product in f".into());
    }
    let mut sublayers: Vec<(usize, Sublayer)> = vec![];
    let mut used_softmax = HashSet::new();
    let mut placements = vec![];
    for (add, x, _y, br) in &residuals {
        let brset: HashSet<usize> = br.iter().copied().collect();
        let soft = br.iter().copied().find(|p| softmaxes.contains(p));
        // Pre-LN: a norm reads x inside the branch. Post-LN: a norm reads the residual's output.
        let pre = cx
            .consumers
            .get(x.as_str())
            .into_iter()
            .flatten()
            .copied()
            .find(|c| brset.contains(c) && cx.is_norm(*c));
        let post = cx
            .consumers
            .get(g.nodes[*add].outputs[0].as_str())
            .into_iter()
            .flatten()
            .copied()
            .find(|c| cx.is_norm(*c));
        let fused = g.nodes[*add].domain == "com.microsoft";
        let norm = if fused {
            Some(g.nodes[*add].name.clone())
        } else {
            pre.or(post).map(|i| g.nodes[i].name.clone())
        };
        placements.push(if fused || (pre.is_none() && post.is_some()) {
            "post"
        } else if pre.is_some() {
            "pre"
        } else {
            "none"
        });
        // A fused SkipLayerNormalization's stream is its sum output; when the node does not
        // produce one, `sum_output_name` names the one a scoring copy adds (see `with_sums`).
        let stream_out = match g.nodes[*add].outputs.get(3) {
            Some(o) if fused && !o.is_empty() => o.clone(),
            _ if fused => sum_output_name(&g.nodes[*add].name),
            _ => g.nodes[*add].outputs[0].clone(),
        };
        let mut s = Sublayer {
            kind: if soft.is_some() {
                "attention".into()
            } else {
                "mlp".into()
            },
            residual: g.nodes[*add].name.clone(),
            stream_in: x.clone(),
            stream_out,
            norm,
            projections: vec![],
            heads: None,
            kv_heads: None,
            head_dim: None,
            rope: false,
            kv_cache: vec![],
            softmax: soft.map(|i| g.nodes[i].name.clone()),
        };
        let proj = |role: &str, i: usize| {
            let (w, layout, shape) = cx.projection(i).unwrap();
            Projection {
                role: role.into(),
                node: g.nodes[i].name.clone(),
                weight: w,
                layout: layout.into(),
                shape,
            }
        };
        match soft {
            // ONNX Runtime's fused Attention: packed QKV weight, heads as an attribute.
            Some(sm) if g.nodes[sm].domain == "com.microsoft" => {
                used_softmax.insert(sm);
                let an = &g.nodes[sm];
                let w = &an.inputs[1];
                let dims = g
                    .initializer(w)
                    .map(|t| t.dims().to_vec())
                    .unwrap_or_default();
                s.projections.push(Projection {
                    role: "qkv".into(),
                    node: an.name.clone(),
                    weight: w.clone(),
                    layout: "in×out".into(),
                    shape: dims.clone(),
                });
                let after: Vec<usize> = br
                    .iter()
                    .copied()
                    .filter(|p| {
                        cx.projection(*p).is_some() && !cx.ancestors(&an.outputs[0]).contains(p)
                    })
                    .collect();
                match after.as_slice() {
                    [o] => s.projections.push(proj("o", *o)),
                    other => problems.push(format!(
                        "attention '{}': expected one output projection after it, found {}",
                        an.name,
                        other.len()
                    )),
                }
                s.heads = an.attr_i("num_heads");
                if let (Some(h), Some(cols)) = (s.heads, dims.get(1)) {
                    if h > 0 && cols % (3 * h) == 0 {
                        s.head_dim = Some(cols / 3 / h);
                        s.kv_heads = Some(h);
                    }
                }
                s.rope = an.attr_i("do_rotary").unwrap_or(0) != 0;
            }
            Some(sm) => {
                used_softmax.insert(sm);
                // Scores: back from the Softmax to a product of two computed operands.
                let mut v = g.nodes[sm].inputs[0].clone();
                let mut scores = None;
                for _ in 0..6 {
                    let Some(&p) = cx.producer.get(v.as_str()) else {
                        break;
                    };
                    let pn = &g.nodes[p];
                    if pn.is("MatMul") && cx.projection(p).is_none() {
                        scores = Some(p);
                        break;
                    }
                    v = pn.inputs[0].clone();
                }
                // Context: forward from the Softmax to the product with V.
                let mut ctx_mm = None;
                let mut frontier = vec![g.nodes[sm].outputs[0].clone()];
                for _ in 0..4 {
                    let mut next = vec![];
                    for f in &frontier {
                        for c in cx.consumers.get(f.as_str()).into_iter().flatten() {
                            let cn = &g.nodes[*c];
                            if cn.is("MatMul") && cn.inputs[0] == *f {
                                ctx_mm = Some(*c);
                            } else {
                                next.extend(cn.outputs.iter().cloned());
                            }
                        }
                    }
                    if ctx_mm.is_some() {
                        break;
                    }
                    frontier = next;
                }
                match (scores, ctx_mm) {
                    (Some(sc), Some(cm)) => {
                        let q = cx.projections_above(&g.nodes[sc].inputs[0], &brset, 1);
                        let k = cx.projections_above(&g.nodes[sc].inputs[1], &brset, 1);
                        let vv = cx.projections_above(&g.nodes[cm].inputs[1], &brset, 1);
                        if q.is_empty() || k.is_empty() || vv.is_empty() {
                            problems.push(format!(
                                "attention '{}': cannot trace Q/K/V back to weight products",
                                g.nodes[sm].name
                            ));
                        } else if q == k && k == vv {
                            s.projections.push(proj("qkv", q[0]));
                        } else {
                            s.projections.push(proj("q", q[0]));
                            s.projections.push(proj("k", k[0]));
                            s.projections.push(proj("v", vv[0]));
                        }
                        // O: weight products after the context product, in the branch.
                        let after: Vec<usize> = br
                            .iter()
                            .copied()
                            .filter(|p| {
                                cx.projection(*p).is_some()
                                    && !q.contains(p)
                                    && !k.contains(p)
                                    && !vv.contains(p)
                                    && !cx.ancestors(&g.nodes[cm].outputs[0]).contains(p)
                            })
                            .collect();
                        match after.as_slice() {
                            [o] => s.projections.push(proj("o", *o)),
                            other => problems.push(format!("attention '{}': expected one output projection after the context product, found {}", g.nodes[sm].name, other.len())),
                        }
                        if let Some(sh) = cx.types.shape(&g.nodes[sc].outputs[0]) {
                            if let Some(Dim::Known(h)) = sh.get(sh.len().saturating_sub(3)) {
                                s.heads = Some(*h);
                            }
                        }
                        // Head dims from the projections' widths: d = q_out / heads, kv heads = k_out / d.
                        let out_dim = |p: &Projection| -> Option<i64> {
                            if p.shape.len() != 2 {
                                return None;
                            }
                            Some(if p.layout == "in×out" {
                                p.shape[1]
                            } else {
                                p.shape[0]
                            })
                        };
                        if let Some(h) = s.heads.filter(|h| *h > 0) {
                            let by_role = |r: &str| {
                                s.projections.iter().find(|p| p.role == r).and_then(out_dim)
                            };
                            let (q_out, k_out) = match (by_role("q"), by_role("k"), by_role("qkv"))
                            {
                                (Some(q), Some(k), _) => (Some(q), Some(k)),
                                (_, _, Some(qkv)) => (Some(qkv / 3), Some(qkv / 3)),
                                _ => (None, None),
                            };
                            if let (Some(q), Some(k)) = (q_out, k_out) {
                                if q % h == 0 && k % (q / h) == 0 {
                                    s.head_dim = Some(q / h);
                                    s.kv_heads = Some(k / (q / h));
                                }
                            }
                        }
                        s.rope = [&g.nodes[sc].inputs[0], &g.nodes[sc].inputs[1]]
                            .iter()
                            .any(|x| rotary(&cx, x, 14));
                        // KV cache: a Concat with a graph input on the K / V path, whose output leaves the graph.
                        for side in [&g.nodes[sc].inputs[1], &g.nodes[cm].inputs[1]] {
                            if let Some(pair) = kv_pair(&cx, side, &brset) {
                                s.kv_cache.push(pair);
                            }
                        }
                    }
                    _ => problems.push(format!(
                        "attention '{}': no Q·Kᵀ product before it or no product with V after it",
                        g.nodes[sm].name
                    )),
                }
            }
            None => {
                let mut ps: Vec<usize> = br
                    .iter()
                    .copied()
                    .filter(|p| cx.projection(*p).is_some())
                    .collect();
                ps.sort();
                // An attention-like product (two computed operands) without a Softmax.
                if let Some(p) = br
                    .iter()
                    .find(|p| g.nodes[**p].is("MatMul") && cx.projection(**p).is_none())
                {
                    problems.push(format!(
                        "sublayer closed by '{}': product '{}' of two computed values (Q·Kᵀ?) but no Softmax in the branch — the attention pattern is broken here",
                        g.nodes[*add].name, g.nodes[*p].name
                    ));
                }
                let gated = br.iter().any(|p| {
                    let n = &g.nodes[*p];
                    n.is("Mul")
                        && n.inputs
                            .iter()
                            .filter(|x| !cx.projections_above(x, &brset, 1).is_empty())
                            .count()
                            == 2
                        && cx.projections_above(&n.inputs[0], &brset, 1)
                            != cx.projections_above(&n.inputs[1], &brset, 1)
                });
                let roles: Vec<&str> = match (ps.len(), gated) {
                    (3, true) => vec!["gate", "up", "down"],
                    (2, _) => vec!["up", "down"],
                    _ => vec![],
                };
                for (k, p) in ps.iter().enumerate() {
                    let role = roles.get(k).copied().unwrap_or("proj");
                    s.projections.push(proj(role, *p));
                }
                if gated && roles.is_empty() {
                    problems.push(format!(
                        "MLP closed by '{}': gated but with {} projections",
                        g.nodes[*add].name,
                        ps.len()
                    ));
                }
            }
        }
        sublayers.push((*add, s));
    }
    for sm in &softmaxes {
        if !used_softmax.contains(sm) {
            problems.push(format!(
                "Softmax '{}' is not inside any residual branch x + f(x)",
                g.nodes[*sm].name
            ));
        }
    }
    // Blocks: an attention sublayer, then the MLP that follows it on the stream.
    sublayers.sort_by_key(|(add, _)| *add);
    let mut blocks: Vec<Block> = vec![];
    for (_, s) in sublayers {
        let hint = s
            .projections
            .first()
            .and_then(|p| layer_hint(&p.node))
            .or_else(|| layer_hint(&s.residual));
        match s.kind.as_str() {
            "attention" => blocks.push(Block {
                index: blocks.len(),
                name_hint: hint,
                attention: Some(s),
                mlp: None,
            }),
            _ => match blocks.last_mut() {
                Some(b) if b.mlp.is_none() => b.mlp = Some(s),
                _ => {
                    problems.push(format!(
                        "MLP closed by '{}' has no attention sublayer before it",
                        s.residual
                    ));
                    blocks.push(Block {
                        index: blocks.len(),
                        name_hint: hint,
                        attention: None,
                        mlp: Some(s),
                    });
                }
            },
        }
    }
    for b in &blocks {
        if let Some(h) = b.name_hint {
            if h != b.index {
                problems.push(format!(
                    "block {} carries layer index {h} in its node names",
                    b.index
                ));
            }
        }
        if b.mlp.is_none() {
            problems.push(format!(
                "block {}: no MLP sublayer after the attention",
                b.index
            ));
        }
    }
    let norm_placement = if placements.iter().all(|p| *p == "pre") && !placements.is_empty() {
        "pre-LN"
    } else if placements.iter().all(|p| *p == "post") && !placements.is_empty() {
        "post-LN"
    } else {
        "unknown"
    };
    let hidden = residuals
        .first()
        .and_then(|(_, x, _, _)| match cx.last_dim(x) {
            Some(Dim::Known(v)) => Some(v),
            _ => None,
        });
    Structure {
        norm_placement: norm_placement.into(),
        hidden,
        blocks,
        problems,
    }
}

/// The name given to a fused SkipLayerNormalization's sum output when a copy exposes it.
pub fn sum_output_name(node: &str) -> String {
    format!("{node}/wcc_skip_sum")
}

/// A copy of `model` whose fused SkipLayerNormalization nodes also output their pre-norm sum
/// (`input_skip_bias_sum`), so the stream leaving a fused sublayer can be measured.
pub fn with_sums(model: &Model) -> Model {
    let mut m = model.clone();
    for n in &mut m.graph.nodes {
        if n.domain == "com.microsoft"
            && n.op_type.starts_with("Skip")
            && n.op_type.ends_with("LayerNormalization")
            && n.outputs.get(3).is_none_or(|o| o.is_empty())
        {
            n.outputs.resize(3, String::new());
            let name = sum_output_name(&n.name);
            n.outputs.push(name);
        }
    }
    m
}

fn rotary(cx: &Ctx, v: &str, depth: usize) -> bool {
    let Some(&p) = cx.producer.get(v) else {
        return false;
    };
    let n = &cx.g.nodes[p];
    if n.is("Sin") || n.is("Cos") {
        return true;
    }
    depth > 0 && n.present_inputs().any(|i| rotary(cx, i, depth - 1))
}

/// (past input, present output) on a K or V path: a Concat joining a graph input, whose output
/// (or a value computed from it by shape ops) is a graph output.
fn kv_pair(cx: &Ctx, v: &str, branch: &HashSet<usize>) -> Option<(String, String)> {
    let inputs: HashSet<&str> = cx.g.inputs.iter().map(|x| x.name.as_str()).collect();
    let outputs: HashSet<&str> = cx.g.outputs.iter().map(|x| x.name.as_str()).collect();
    let mut v = v.to_string();
    for _ in 0..8 {
        let p = *cx.producer.get(v.as_str())?;
        let n = &cx.g.nodes[p];
        if n.is("Concat") && branch.contains(&p) {
            let past = n
                .inputs
                .iter()
                .find(|x| inputs.contains(x.as_str()))?
                .clone();
            let out = &n.outputs[0];
            let present = if outputs.contains(out.as_str()) {
                out.clone()
            } else {
                cx.consumers
                    .get(out.as_str())?
                    .iter()
                    .flat_map(|c| cx.g.nodes[*c].outputs.iter())
                    .find(|o| outputs.contains(o.as_str()))?
                    .clone()
            };
            return Some((past, present));
        }
        v = n.inputs.first()?.clone();
    }
    None
}

/// The text `wcc inspect --structure` prints.
pub fn render(s: &Structure) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "structure: {} blocks, {}, hidden {}",
        s.blocks.len(),
        s.norm_placement,
        s.hidden.map(|h| h.to_string()).unwrap_or("?".into())
    );
    for b in &s.blocks {
        let _ = writeln!(
            o,
            "block {}{}",
            b.index,
            b.name_hint
                .map(|h| format!(" (names say layer {h})"))
                .unwrap_or_default()
        );
        for s in [&b.attention, &b.mlp].into_iter().flatten() {
            let mut facts = vec![];
            if let Some(h) = s.heads {
                facts.push(format!("heads {h}"));
            }
            if let Some(h) = s.kv_heads {
                facts.push(format!("kv heads {h}"));
            }
            if let Some(d) = s.head_dim {
                facts.push(format!("head dim {d}"));
            }
            if s.kind == "attention" {
                facts.push(if s.rope {
                    "rope".into()
                } else {
                    "no rope".into()
                });
            } else if s.projections.iter().any(|p| p.role == "gate") {
                facts.push("gated".into());
            }
            let facts = if facts.is_empty() {
                String::new()
            } else {
                format!(" [{}]", facts.join(", "))
            };
            let norm = s
                .norm
                .as_deref()
                .map(|n| format!("'{n}'"))
                .unwrap_or("none".into());
            let _ = writeln!(
                o,
                "  {}{facts} residual '{}' norm {norm}",
                s.kind, s.residual
            );
            for p in &s.projections {
                let _ = writeln!(
                    o,
                    "    {:<5} '{}' weight '{}' {:?} {}",
                    p.role, p.node, p.weight, p.shape, p.layout
                );
            }
            for (past, present) in &s.kv_cache {
                let _ = writeln!(o, "    cache {past} → {present}");
            }
        }
    }
    for p in &s.problems {
        let _ = writeln!(o, "not found: {p}");
    }
    o
}
