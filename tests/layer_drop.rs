//! Sublayer dropping (LLM-Drop) and `-O compress`.

mod common;

use common::*;
use wcc_passes::layer_drop::{DropSpec, Target};

#[test]
fn drop_specs_parse() {
    let s: DropSpec = "attn:2".parse().unwrap();
    assert_eq!((s.target, s.count_of(8)), (Target::Attention, 2));
    let s: DropSpec = "attn:25%".parse().unwrap();
    assert_eq!(s.count_of(8), 2);
    let s: DropSpec = "mlp:9".parse().unwrap();
    assert_eq!((s.target, s.count_of(4)), (Target::Mlp, 4));
    assert_eq!("joint:3".parse::<DropSpec>().unwrap().target, Target::Joint);
    for bad in ["attn", "foo:1", "attn:x", "attn:150%"] {
        assert!(bad.parse::<DropSpec>().is_err(), "{bad}");
    }
}

#[test]
fn a_dropped_attention_takes_its_kv_cache_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let npz = models_dir().join("llama_kv.legacy.inputs.npz");
    let (out, r) = optimize_cli(
        &fixture_path("llama_kv.legacy"),
        &[
            "--drop",
            "attn:1",
            "--backend",
            "ort",
            "--inputs",
            npz.to_str().unwrap(),
        ],
        dir.path(),
        "kv.onnx",
    );
    let dropped = r["layer_drop"]["dropped"][0].as_str().unwrap().to_string();
    let layer: usize = dropped.strip_prefix("attn ").unwrap().parse().unwrap();
    let kept = 1 - layer;
    let m = wcc_ir::import::load(&out).unwrap();
    let inputs: Vec<&str> = m.graph.inputs.iter().map(|v| v.name.as_str()).collect();
    let outputs: Vec<&str> = m.graph.outputs.iter().map(|v| v.name.as_str()).collect();
    for kind in ["key", "value"] {
        assert!(
            !inputs.contains(&format!("past_key_values.{layer}.{kind}").as_str()),
            "{inputs:?}"
        );
        assert!(
            !outputs.contains(&format!("present.{layer}.{kind}").as_str()),
            "{outputs:?}"
        );
        assert!(inputs.contains(&format!("past_key_values.{kept}.{kind}").as_str()));
        assert!(outputs.contains(&format!("present.{kept}.{kind}").as_str()));
    }
    assert_eq!(m.metadata("wcc.kv_layers"), Some(kept.to_string().as_str()));
    assert_eq!(m.metadata("wcc.dropped"), Some(dropped.as_str()));
    // It runs in ONNX Runtime with the reduced cache, and the kept layer's cache is unchanged.
    let all = inputs_for("llama_kv.legacy");
    let given: wcc_runtime::NamedArrays = all
        .iter()
        .filter(|(n, _)| inputs.contains(&n.as_str()))
        .cloned()
        .collect();
    let outs = run(&ort(), &m, &given).unwrap();
    let reference = run(&ort(), &load("llama_kv.legacy"), &all).unwrap();
    let kept_key = format!("present.{kept}.key");
    let a = &outs.iter().find(|(n, _)| *n == kept_key).unwrap().1;
    let b = &reference.iter().find(|(n, _)| *n == kept_key).unwrap().1;
    if kept < layer {
        assert!(
            wcc_runtime::compare::fidelity("k", b, a).bitwise_equal,
            "a layer before the dropped one is untouched"
        );
    }
}

fn inputs_for(stem: &str) -> wcc_runtime::NamedArrays {
    inputs(stem, "inputs")
}

#[test]
fn o_compress_without_any_passing_drop_keeps_everything() {
    // Random-weight fixtures have no redundant attention: nothing passes the default gate.
    let dir = tempfile::tempdir().unwrap();
    let (_, r) = optimize_cli(
        &fixture_path("llama.legacy"),
        &["-O", "compress"],
        dir.path(),
        "c.onnx",
    );
    assert_eq!(r["layer_drop"]["dropped"].as_array().unwrap().len(), 0);
    assert_eq!(r["layer_drop"]["tried"][0]["passed"], false);
    assert_eq!(r["verification"]["gate_min_cosine"], 0.99);
    // A gate nothing can pass, even with nothing dropped, is an error and writes nothing.
    let out2 = dir.path().join("c2.onnx");
    let o = wcc()
        .arg("optimize")
        .arg(fixture_path("llama.legacy"))
        .args(["-O", "compress", "--min-cosine", "1.5", "-o"])
        .arg(&out2)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out2.exists());
}

#[test]
fn the_planted_redundant_attention_ranks_first_and_drops_like_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let npz = models_dir().join("llama_drop.legacy.inputs.npz");
    let (out, r) = optimize_cli(
        &fixture_path("llama_drop.legacy"),
        &[
            "--drop",
            "attn:1",
            "--backend",
            "ort",
            "--inputs",
            npz.to_str().unwrap(),
        ],
        dir.path(),
        "d.onnx",
    );
    // Layer 2's o_proj was scaled by 1e-3 before export: its attention changes the stream least.
    assert_eq!(
        r["layer_drop"]["scores"][0]["sublayer"], "attn 2",
        "{}",
        r["layer_drop"]
    );
    assert_eq!(r["layer_drop"]["dropped"], serde_json::json!(["attn 2"]));
    // The result computes what PyTorch computes with that sublayer removed.
    let m = wcc_ir::import::load(&out).unwrap();
    let reference = load("llama_drop.dropped.legacy");
    for which in ["inputs", "alt.inputs"] {
        let inputs = inputs("llama_drop.legacy", which);
        for f in wcc_runtime::compare_outputs(
            &run(&ort(), &reference, &inputs).unwrap(),
            &run(&ort(), &m, &inputs).unwrap(),
        )
        .unwrap()
        {
            assert!(
                f.rel_l2_error <= 1e-5,
                "{which}: {} rel {:e}",
                f.name,
                f.rel_l2_error
            );
        }
    }
    let softmaxes = m
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "Softmax")
        .count();
    assert_eq!(softmaxes, 3);
}

#[test]
fn o_compress_stops_at_the_largest_count_that_passes_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let (_, r) = optimize_cli(
        &fixture_path("llama_drop.legacy"),
        &["-O", "compress", "--backend", "ort"],
        dir.path(),
        "c.onnx",
    );
    let ld = &r["layer_drop"];
    let dropped = ld["dropped"].as_array().unwrap().len();
    assert!(dropped >= 1, "{ld}");
    let tried = ld["tried"].as_array().unwrap();
    // Every count up to the chosen one passed, and one more failed (the search stopped there).
    for t in tried.iter().take(dropped) {
        assert_eq!(t["passed"], true, "{t}");
    }
    let next = &tried[dropped];
    assert_eq!(next["count"], dropped + 1);
    assert_eq!(next["passed"], false, "{next}");
    assert!(next["min_cosine"].as_f64().unwrap() < 0.99);
    // The written model passes the default gate against the original.
    assert!(r["verification"]["outputs"][0]["cosine"].as_f64().unwrap() >= 0.99);

    // The same search on the KV-cache variant removes the dropped layer's cache.
    let out = dir.path().join("kv.onnx");
    let o = wcc()
        .arg("optimize")
        .arg(fixture_path("llama_drop_kv.legacy"))
        .args(["-O", "compress", "--backend", "ort", "--inputs"])
        .arg(models_dir().join("llama_drop_kv.legacy.inputs.npz"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = wcc_ir::import::load(&out).unwrap();
    assert!(!m
        .graph
        .inputs
        .iter()
        .any(|v| v.name == "past_key_values.2.key"));
    assert_eq!(m.metadata("wcc.kv_layers"), Some("0,1,3"));
}

#[test]
fn dropping_in_an_ort_fused_graph_matches_dropping_in_the_export() {
    // The same model exported plainly and after ONNX Runtime's fusions: the same sublayer ranks
    // first, and dropping it gives the same outputs (the fused SkipLayerNormalization becomes a
    // norm of the stream alone).
    let dir = tempfile::tempdir().unwrap();
    let mut dropped = vec![];
    for stem in ["bert.legacy", "bert.ortfused"] {
        let npz = models_dir().join(format!("{stem}.inputs.npz"));
        let args = [
            "--drop",
            "attn:1",
            "--backend",
            "ort",
            "--inputs",
            npz.to_str().unwrap(),
        ];
        let (out, r) = optimize_cli(
            &fixture_path(stem),
            &args,
            dir.path(),
            &format!("{stem}.onnx"),
        );
        dropped.push((
            r["layer_drop"]["dropped"].clone(),
            wcc_ir::import::load(&out).unwrap(),
        ));
    }
    assert_eq!(dropped[0].0, dropped[1].0);
    let inputs = inputs("bert.legacy", "inputs");
    let a = run(&ort(), &dropped[0].1, &inputs).unwrap();
    let b = run(&ort(), &dropped[1].1, &inputs).unwrap();
    for f in wcc_runtime::compare_outputs(&a, &b).unwrap() {
        assert!(f.rel_l2_error < 1e-5, "{}: {:e}", f.name, f.rel_l2_error);
    }
}
