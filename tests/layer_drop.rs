//! Sublayer dropping (LLM-Drop: "What Matters in Transformers? Not All Attention is Needed",
//! arXiv 2406.15786) and `-O compress`, through the driver.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use wcc_driver::{BackendChoice, DropSpec, Error, Level, OptimizeOptions, OptimizeReport};
use wcc_passes::layer_drop::Target;

/// Optimizes `stem` into `dir/name` with the driver, `edit` setting the options; panics on error.
fn optimize(
    stem: &str,
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut OptimizeOptions),
) -> (PathBuf, OptimizeReport) {
    let out = dir.join(name);
    let mut opts = OptimizeOptions::new(fixture_path(stem));
    opts.output = Some(out.clone());
    edit(&mut opts);
    match wcc_driver::optimize(opts, &mut |_| {}) {
        Ok(done) => (out, done.report),
        Err(e) => panic!("{stem}: {e}"),
    }
}

/// ONNX Runtime as the backend, with the given inputs file and `--drop`.
fn on_ort(o: &mut OptimizeOptions, inputs: Option<&str>, drop: Option<&str>) {
    o.exec.backend = BackendChoice::Ort;
    if let wcc_runtime::Backend::Ort { lib, .. } = ort() {
        o.exec.ort_lib = lib;
    }
    o.exec.inputs = inputs.map(|stem| models_dir().join(format!("{stem}.inputs.npz")));
    o.drop = drop.map(|d| d.parse().unwrap());
}

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
    let (out, r) = optimize("llama_kv.legacy", dir.path(), "kv.onnx", |o| {
        on_ort(o, Some("llama_kv.legacy"), Some("attn:1"))
    });
    let ld = r.layer_drop.as_ref().unwrap();
    let dropped = ld.dropped[0].clone();
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
    // Verification knows the cache left on purpose, and says whose it was.
    let v = r.verification.as_ref().unwrap();
    let removed: Vec<&str> = v.removed_outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        removed,
        [
            format!("present.{layer}.key"),
            format!("present.{layer}.value")
        ]
    );
    assert!(v.removed_outputs[0].reason.contains(&dropped));
    assert_eq!(ld.removed_outputs, v.removed_outputs);
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
    let (_, r) = optimize("llama.legacy", dir.path(), "c.onnx", |o| {
        o.level = Level::Compress
    });
    let ld = r.layer_drop.as_ref().unwrap();
    assert!(ld.dropped.is_empty());
    assert!(!ld.tried[0].passed);
    assert_eq!(r.level, "-O compress");
    assert_eq!(r.verification.as_ref().unwrap().gate_min_cosine, Some(0.99));
    // A gate nothing can pass, even with nothing dropped, is a gate failure and writes nothing.
    let out2 = dir.path().join("c2.onnx");
    let mut opts = OptimizeOptions::new(fixture_path("llama.legacy"));
    opts.level = Level::Compress;
    opts.gate.min_cosine = Some(1.5);
    opts.output = Some(out2.clone());
    match wcc_driver::optimize(opts, &mut |_| {}) {
        Err(e @ Error::Gate { .. }) => {
            assert_eq!(e.exit_code(), 1);
            assert!(e.to_string().contains("--min-cosine 1.5"), "{e}");
        }
        Err(e) => panic!("expected a gate failure: {e}"),
        Ok(_) => panic!("expected a gate failure"),
    }
    assert!(!out2.exists());
}

#[test]
fn the_planted_redundant_attention_ranks_first_and_drops_like_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let (out, r) = optimize("llama_drop.legacy", dir.path(), "d.onnx", |o| {
        on_ort(o, Some("llama_drop.legacy"), Some("attn:1"))
    });
    let ld = r.layer_drop.as_ref().unwrap();
    // Layer 2's o_proj was scaled by 1e-3 before export: its attention changes the stream least.
    assert_eq!(ld.scores[0].sublayer, "attn 2", "{ld:?}");
    assert_eq!(ld.dropped, ["attn 2"]);
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
    let (_, r) = optimize("llama_drop.legacy", dir.path(), "c.onnx", |o| {
        on_ort(o, None, None);
        o.level = Level::Compress;
    });
    let ld = r.layer_drop.as_ref().unwrap();
    let dropped = ld.dropped.len();
    assert!(dropped >= 1, "{ld:?}");
    // Every count up to the chosen one passed, and one more failed (the search stopped there).
    for t in ld.tried.iter().take(dropped) {
        assert!(t.passed, "{t:?}");
    }
    let next = &ld.tried[dropped];
    assert_eq!(next.count, dropped + 1);
    assert!(!next.passed, "{next:?}");
    // Under -O compress's planner, drops may use a quarter of the gate (1 - 0.99): 0.9975.
    assert!(next.min_cosine < 0.9975);
    // The written model passes the default gate against the original.
    assert!(r.verification.as_ref().unwrap().outputs[0].cosine >= 0.99);

    // The same search on the KV-cache variant removes the dropped layer's cache, on its own
    // inputs and on the default (random) ones alike.
    for inputs in [Some("llama_drop_kv.legacy"), None] {
        let (out, r) = optimize("llama_drop_kv.legacy", dir.path(), "kv.onnx", |o| {
            on_ort(o, inputs, None);
            o.level = Level::Compress;
        });
        let m = wcc_ir::import::load(&out).unwrap();
        assert!(!m
            .graph
            .inputs
            .iter()
            .any(|v| v.name == "past_key_values.2.key"));
        assert_eq!(m.metadata("wcc.kv_layers"), Some("0,1,3"));
        let v = r.verification.as_ref().unwrap();
        assert!(v
            .removed_outputs
            .iter()
            .any(|o| o.name == "present.2.key" && o.reason.contains("attn 2")));
    }
}

#[test]
fn dropping_in_an_ort_fused_graph_matches_dropping_in_the_export() {
    // The same model exported plainly and after ONNX Runtime's fusions: the same sublayer ranks
    // first, and dropping it gives the same outputs (the fused SkipLayerNormalization becomes a
    // norm of the stream alone).
    let dir = tempfile::tempdir().unwrap();
    let mut dropped = vec![];
    for stem in ["bert.legacy", "bert.ortfused"] {
        let (out, r) = optimize(stem, dir.path(), &format!("{stem}.onnx"), |o| {
            on_ort(o, Some(stem), Some("attn:1"))
        });
        dropped.push((
            r.layer_drop.unwrap().dropped,
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
