//! Sublayer dropping (LLM-Drop: He, Sun, Shen & Li, "What Matters in Transformers? Not All
//! Attention is Needed", arXiv 2406.15786). A dropped
//! sublayer becomes a residual passthrough: every reader of its residual Add reads the stream
//! that entered it (`h' = h`), and whatever only the branch used (its norm, projections, RoPE,
//! Softmax, KV Concat) goes with DCE. For KV-cache decoders the dropped layer's past inputs and
//! present outputs leave the interface, and the kept-layer map goes to metadata_props
//! (`wcc.kv_layers`). Post-LN blocks (BERT: `h = LN(x + f(x))`) cannot lose their LN: the branch
//! is zeroed (`h = LN(x)`) and the report says so. Scoring lives with the caller (it needs to run
//! the model); this module is the graph surgery. Lossy.

use wcc_ir::{Model, Node, Result};

use crate::graph_util::rename_uses;
use crate::structure::{Structure, Sublayer};

/// Which sublayers to drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Attention,
    Mlp,
    Joint,
}

/// `--drop attn:N`, `attn:25%`, `mlp:N`, `joint:N`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropSpec {
    pub target: Target,
    pub count: Option<usize>,
    pub fraction: Option<f64>,
}

impl std::str::FromStr for DropSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (t, n) = s
            .split_once(':')
            .ok_or_else(|| format!("--drop '{s}': expected attn:N, attn:P%, mlp:N or joint:N"))?;
        let target = match t {
            "attn" | "attention" => Target::Attention,
            "mlp" => Target::Mlp,
            "joint" | "all" => Target::Joint,
            _ => return Err(format!("--drop '{s}': '{t}' is not attn, mlp or joint")),
        };
        if let Some(p) = n.strip_suffix('%') {
            let f: f64 = p
                .parse()
                .map_err(|_| format!("--drop '{s}': '{p}' is not a percentage"))?;
            if !(0.0..=100.0).contains(&f) {
                return Err(format!("--drop '{s}': percentage out of range"));
            }
            Ok(DropSpec {
                target,
                count: None,
                fraction: Some(f / 100.0),
            })
        } else {
            let c: usize = n
                .parse()
                .map_err(|_| format!("--drop '{s}': '{n}' is not a count"))?;
            Ok(DropSpec {
                target,
                count: Some(c),
                fraction: None,
            })
        }
    }
}

impl DropSpec {
    /// How many of `available` sublayers to drop.
    pub fn count_of(&self, available: usize) -> usize {
        match (self.count, self.fraction) {
            (Some(c), _) => c.min(available),
            (_, Some(f)) => ((available as f64) * f).floor() as usize,
            _ => 0,
        }
    }
}

/// A sublayer's identity in reports: "attn 3" / "mlp 1".
pub fn label(block: usize, s: &Sublayer) -> String {
    format!(
        "{} {block}",
        if s.kind == "attention" { "attn" } else { "mlp" }
    )
}

/// The sublayers of `st` a target chooses from, as (block, sublayer).
pub fn candidates(st: &Structure, target: Target) -> Vec<(usize, &Sublayer)> {
    let mut v = vec![];
    for b in &st.blocks {
        if matches!(target, Target::Attention | Target::Joint) {
            if let Some(a) = &b.attention {
                v.push((b.index, a));
            }
        }
        if matches!(target, Target::Mlp | Target::Joint) {
            if let Some(m) = &b.mlp {
                v.push((b.index, m));
            }
        }
    }
    v
}

/// Turns each given sublayer into a passthrough, then removes what only it used. Returns notes.
pub fn drop_sublayers(
    model: &mut Model,
    st: &Structure,
    drop: &[(usize, Sublayer)],
) -> Result<Vec<String>> {
    let mut notes = vec![];
    let g = &mut model.graph;
    for (block, s) in drop {
        let Some(i) = g.nodes.iter().position(|n| {
            n.name == s.residual
                && (n.outputs.first() == Some(&s.stream_out) || n.domain == "com.microsoft")
        }) else {
            notes.push(format!(
                "{}: residual Add '{}' not found (already dropped?)",
                label(*block, s),
                s.residual
            ));
            continue;
        };
        if g.nodes[i].domain == "com.microsoft" {
            // Fused residual + norm: keep the norm on the stream alone, LN(x).
            let n = &g.nodes[i];
            if n.outputs.iter().skip(1).take(2).any(|o| !o.is_empty()) {
                notes.push(format!(
                    "{}: '{}' exposes its mean/inv-std outputs; not dropped",
                    label(*block, s),
                    n.name
                ));
                continue;
            }
            let mut ln = Node::new(
                &n.name,
                if n.op_type.contains("Simplified") {
                    "SimplifiedLayerNormalization"
                } else {
                    "LayerNormalization"
                },
                vec![s.stream_in.clone(), n.inputs[2].clone()],
                vec![n.outputs[0].clone()],
            );
            if !n.op_type.contains("Simplified") {
                if let Some(beta) = n.inputs.get(3).filter(|b| !b.is_empty()) {
                    ln.inputs.push(beta.clone());
                }
            }
            ln.attributes = n
                .attributes
                .iter()
                .filter(|a| a.name() == "epsilon")
                .cloned()
                .collect();
            ln.attributes.push(wcc_ir::Attribute::int("axis", -1));
            let sum = n.outputs.get(3).filter(|o| !o.is_empty()).cloned();
            g.nodes[i] = ln;
            if let Some(sum) = sum {
                rename_uses(g, &sum, &s.stream_in);
            }
            notes.push(format!("{}: fused SkipLayerNormalization replaced by a norm of the stream alone (h = LN(x))", label(*block, s)));
            continue;
        }
        let out = s.stream_out.clone();
        if g.outputs.iter().any(|o| o.name == out) {
            g.nodes[i] = Node::new(
                &s.residual,
                "Identity",
                vec![s.stream_in.clone()],
                vec![out],
            );
        } else {
            g.nodes.remove(i);
            rename_uses(g, &out, &s.stream_in);
        }
        // The dropped attention's cache leaves the interface.
        for (past, present) in &s.kv_cache {
            g.outputs.retain(|o| o.name != *present);
            notes.push(format!(
                "{}: removed cache {past} / {present}",
                label(*block, s)
            ));
        }
        if st.norm_placement == "post-LN" {
            notes.push(format!(
                "{}: post-LN block, the norm after it stays: branch zeroed (h = LN(x))",
                label(*block, s)
            ));
        } else {
            notes.push(format!("{}: dropped (h' = h)", label(*block, s)));
        }
    }
    // What only the dropped branches used, then the cache inputs nothing reads any more.
    let dce = crate::dce::DeadCodeElimination;
    wcc_ir::pass::Pass::run(&dce, model)?;
    let g = &mut model.graph;
    let pasts: Vec<&String> = drop
        .iter()
        .flat_map(|(_, s)| s.kv_cache.iter().map(|(p, _)| p))
        .collect();
    let read: std::collections::HashSet<String> = g
        .nodes
        .iter()
        .flat_map(|n| n.inputs.iter().cloned())
        .collect();
    g.inputs
        .retain(|v| !pasts.contains(&&v.name) || read.contains(&v.name));
    // The kept-layer map for runtimes that allocate the cache.
    let cached: Vec<usize> = st
        .blocks
        .iter()
        .filter(|b| b.attention.as_ref().is_some_and(|a| !a.kv_cache.is_empty()))
        .map(|b| b.index)
        .collect();
    if !cached.is_empty() {
        let dropped: Vec<usize> = drop
            .iter()
            .filter(|(_, s)| s.kind == "attention")
            .map(|(b, _)| *b)
            .collect();
        let kept: Vec<String> = cached
            .iter()
            .filter(|b| !dropped.contains(b))
            .map(|b| b.to_string())
            .collect();
        model.set_metadata("wcc.kv_layers", &kept.join(","));
    }
    let names: Vec<String> = drop.iter().map(|(b, s)| label(*b, s)).collect();
    model.set_metadata("wcc.dropped", &names.join(","));
    Ok(notes)
}
