//! Structure discovery (`wcc inspect --structure`): every block and sublayer of every fixture
//! family, from both exporters, and a named failure where the pattern is broken on purpose.

mod common;

use common::*;
use wcc_passes::structure::{discover, render};
use wcc_passes::OptLevel;

const FAMILIES: &[&str] = &[
    "bert.legacy",
    "bert.dynamo",
    "gpt2.legacy",
    "gpt2.dynamo",
    "llama.legacy",
    "llama.dynamo",
    "llama_kv.legacy",
    "llama_kv.dynamo",
    "vit.legacy",
    "vit.dynamo",
    "llama_lora.legacy",
    // ONNX Runtime's transformer optimizer output: Attention, SkipLayerNormalization, BiasGelu.
    "bert.ortfused",
];

#[test]
fn every_block_and_sublayer_is_found() {
    let mut settings = insta::Settings::clone_current();
    settings.set_prepend_module_to_snapshot(false);
    settings.set_snapshot_path(root().join("tests/snapshots"));
    settings.bind(|| {
        for stem in FAMILIES {
            let m = optimized(stem, OptLevel::O1);
            let s = discover(&m);
            assert!(s.problems.is_empty(), "{stem}: {:?}", s.problems);
            assert_eq!(s.blocks.len(), 2, "{stem}: the fixtures have 2 layers");
            let post = stem.starts_with("bert");
            assert_eq!(
                s.norm_placement,
                if post { "post-LN" } else { "pre-LN" },
                "{stem}"
            );
            for b in &s.blocks {
                let a = b
                    .attention
                    .as_ref()
                    .unwrap_or_else(|| panic!("{stem}: block {} has no attention", b.index));
                let m = b
                    .mlp
                    .as_ref()
                    .unwrap_or_else(|| panic!("{stem}: block {} has no MLP", b.index));
                let roles: Vec<&str> = a.projections.iter().map(|p| p.role.as_str()).collect();
                if stem.starts_with("gpt2") || stem.contains("ortfused") {
                    assert_eq!(roles, ["qkv", "o"], "{stem}");
                } else {
                    assert_eq!(roles, ["q", "k", "v", "o"], "{stem}");
                }
                assert_eq!(a.rope, stem.starts_with("llama"), "{stem}: rope");
                if stem.starts_with("llama") {
                    assert_eq!(
                        (a.heads, a.kv_heads, a.head_dim),
                        (Some(4), Some(2), Some(12)),
                        "{stem}: GQA 4/2 heads of 12"
                    );
                    assert_eq!(
                        m.projections
                            .iter()
                            .map(|p| p.role.as_str())
                            .collect::<Vec<_>>(),
                        ["gate", "up", "down"],
                        "{stem}"
                    );
                } else {
                    assert_eq!(a.heads, a.kv_heads, "{stem}");
                    assert_eq!(m.projections.len(), 2, "{stem}");
                }
                let cache: Vec<&str> = a.kv_cache.iter().map(|(p, _)| p.as_str()).collect();
                if stem.starts_with("llama_kv") {
                    let i = b.index;
                    assert_eq!(
                        cache,
                        [
                            format!("past_key_values.{i}.key"),
                            format!("past_key_values.{i}.value")
                        ],
                        "{stem}"
                    );
                } else {
                    assert!(cache.is_empty(), "{stem}");
                }
                assert!(b.name_hint.is_none_or(|h| h == b.index), "{stem}");
                if stem.contains("ortfused") {
                    assert_eq!(
                        a.norm.as_deref(),
                        Some(a.residual.as_str()),
                        "{stem}: the fused node is residual and norm"
                    );
                }
            }
            insta::assert_snapshot!(format!("structure__{stem}"), render(&s));
        }
    });
}

#[test]
fn a_broken_pattern_names_the_failure() {
    // Replace layer 1's Softmax with a Relu: its branch still multiplies Q by Kᵀ.
    let mut m = optimized("bert.legacy", OptLevel::O1);
    let sm = m
        .graph
        .nodes
        .iter_mut()
        .filter(|n| n.op_type == "Softmax")
        .nth(1)
        .unwrap();
    sm.op_type = "Relu".into();
    let s = discover(&m);
    let text = render(&s);
    assert!(
        s.problems
            .iter()
            .any(|p| p.contains("no Softmax in the branch")
                && p.contains("/encoder/layer.1/attention/self/MatMul")),
        "{text}"
    );
    // The CLI says the same.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.onnx");
    wcc_ir::export::save(&m, &p, &Default::default()).unwrap();
    let o = wcc()
        .args(["inspect", "--structure"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("not found: sublayer closed by") && out.contains("no Softmax"),
        "{out}"
    );
}
