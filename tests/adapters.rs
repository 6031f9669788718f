//! Adapter merge-in and the e-graph engine: every unmerged LoRA/MiSS fixture, after -O1, has the
//! merged reference's node count and op histogram and its outputs (on ONNX Runtime); user rules
//! fire and bad ones are located; the engine stops within its limits and says so.

mod common;

use std::collections::BTreeMap;

use common::*;
use wcc_ir::pass::Pass;
use wcc_passes::OptLevel;

fn histogram(m: &wcc_ir::Model) -> BTreeMap<String, usize> {
    wcc_ir::stats::GraphStats::of(m).nodes_by_op
}

/// (unmerged fixture, merged reference)
const PAIRS: &[(&str, &str)] = &[
    ("bert_lora.legacy", "bert_lora.merged.legacy"),
    ("llama_lora.legacy", "llama_lora.merged.legacy"),
    ("llama_miss.legacy", "llama_miss.merged.legacy"),
    ("llama_dora.legacy", "llama_dora.merged.legacy"),
    ("llama_bat.legacy", "llama_bat.merged.legacy"),
    ("llama_rslora.legacy", "llama_rslora.merged.legacy"),
    ("gpt2_lora.legacy", "gpt2_lora.merged.legacy"),
    // A weight reparameterized in forward (weight compander) against the same weights folded.
    ("reparam.legacy", "reparam.folded.legacy"),
    // The dynamo export of the same LoRA model; its merged reference is the plain dynamo Llama
    // structure (same weights merged), so compare structure with llama.dynamo.
    ("llama_lora.dynamo", "llama.dynamo"),
];

#[test]
fn unmerged_adapters_merge_to_the_reference_structure() {
    for (unmerged, merged) in PAIRS {
        let a = optimized(unmerged, OptLevel::O1);
        let b = optimized(merged, OptLevel::O1);
        assert_eq!(histogram(&a), histogram(&b), "{unmerged} vs {merged}");
        assert_eq!(a.graph.total_nodes(), b.graph.total_nodes());
        // The adapter weights are gone: parameters equal the merged model's.
        assert_eq!(
            wcc_ir::stats::GraphStats::of(&a).parameters,
            wcc_ir::stats::GraphStats::of(&b).parameters,
            "{unmerged}"
        );
    }
}

#[test]
fn merged_adapters_compute_what_the_reference_merge_computes() {
    let ort = ort();
    for (unmerged, merged) in PAIRS.iter().filter(|(u, _)| !u.ends_with("dynamo")) {
        let a = optimized(unmerged, OptLevel::O1);
        let b = load(merged);
        for which in ["inputs", "alt.inputs"] {
            let inputs = inputs(unmerged, which);
            let ra = run(&ort, &a, &inputs).unwrap();
            let rb = run(&ort, &b, &inputs).unwrap();
            for f in wcc_runtime::compare_outputs(&rb, &ra).unwrap() {
                assert!(
                    f.rel_l2_error <= 1e-5,
                    "{unmerged} ({which}): {} rel {:e}",
                    f.name,
                    f.rel_l2_error
                );
            }
        }
    }
    // The dynamo LoRA export against its own unmerged form (same inputs, same outputs).
    let a = load("llama_lora.dynamo");
    let b = optimized("llama_lora.dynamo", OptLevel::O1);
    let inputs = inputs("llama_lora.dynamo", "inputs");
    for f in wcc_runtime::compare_outputs(
        &run(&ort, &a, &inputs).unwrap(),
        &run(&ort, &b, &inputs).unwrap(),
    )
    .unwrap()
    {
        assert!(
            f.rel_l2_error <= 1e-5,
            "llama_lora.dynamo: {} rel {:e}",
            f.name,
            f.rel_l2_error
        );
    }
}

/// y = Neg(Neg(x)) · W: nothing built in removes a double negation; a user rule does.
fn neg_matmul_model(dir: &std::path::Path) -> std::path::PathBuf {
    use onnx_protobuf::*;
    use protobuf::Message;
    let vi = |name: &str, dims: &[i64]| vi(name, 1, dims);
    let node = simple_node;
    let m = model17(
        vec![node("Neg", &["x"], "n1"), node("MatMul", &["n1", "w"], "y")],
        vec![TensorProto {
            name: "w".into(),
            data_type: 1,
            dims: vec![4, 2],
            float_data: (0..8).map(|v| v as f32).collect(),
            ..Default::default()
        }],
        vec![vi("x", &[3, 4])],
        vec![vi("y", &[3, 2])],
    );
    let p = dir.join("neg_matmul.onnx");
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    p
}

#[test]
fn a_user_rule_file_adds_a_rewrite_that_fires() {
    let dir = tempfile::tempdir().unwrap();
    let model = neg_matmul_model(dir.path());
    let rules = dir.path().join("mine.rules");
    std::fs::write(
        &rules,
        "# my rules\nneg-into-weight: (matmul (neg ?x) ?w) => (matmul ?x (neg ?w)) if const(?w)\n",
    )
    .unwrap();
    let run_with = |extra: &[&std::path::Path], out: &str| {
        let report = dir.path().join(format!("{out}.json"));
        let mut cmd = wcc();
        cmd.arg("optimize")
            .arg(&model)
            .arg("-o")
            .arg(dir.path().join(out))
            .arg("--report")
            .arg(&report);
        for r in extra {
            cmd.arg("--rules").arg(r);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
        let algebra = r["passes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pass"] == "algebra")
            .unwrap()
            .clone();
        (r["after"]["nodes_by_op"].clone(), algebra)
    };
    let (ops, _) = run_with(&[], "plain.onnx");
    assert_eq!(
        ops["Neg"], 1,
        "without the rule nothing moves the negation into the weight"
    );
    let (ops, algebra) = run_with(&[&rules], "ruled.onnx");
    assert!(ops.get("Neg").is_none(), "{ops}");
    assert_eq!(
        algebra["details"]["rules_fired"]["neg-into-weight"], 1,
        "{algebra}"
    );
    // The rewritten model computes the same (checked by tract during optimize; here by ONNX Runtime).
    let a = wcc_ir::import::load(&model).unwrap();
    let b = wcc_ir::import::load(&dir.path().join("ruled.onnx")).unwrap();
    let inputs = vec![(
        "x".to_string(),
        wcc_ir::eval::Array::F32(
            ndarray::Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32 - 5.0).into_dyn(),
        ),
    )];
    let ort = ort();
    assert!(
        wcc_runtime::compare_outputs(
            &run(&ort, &a, &inputs).unwrap(),
            &run(&ort, &b, &inputs).unwrap()
        )
        .unwrap()[0]
            .bitwise_equal
    );
}

#[test]
fn a_malformed_rule_file_gives_a_located_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = neg_matmul_model(dir.path());
    for (text, expect) in [
        (
            "ok: (neg (neg ?x)) => ?x\n\nbad: (neg ?x) => (neg ?y)\n",
            "bad.rules:3: right-hand side uses ?y",
        ),
        (
            "# c\nno-arrow (neg ?x)\n",
            "bad.rules:2: expected 'NAME: LHS => RHS'",
        ),
        (
            "r: (neg ?x) => ?x if fancy(?x)\n",
            "bad.rules:1: unknown condition 'fancy'",
        ),
        ("r: (neg ?x => ?x\n", "bad.rules:1: left-hand side"),
        (
            "factor-matmul: (neg ?x) => ?x\n",
            "has the name of a built-in rule",
        ),
    ] {
        let rules = dir.path().join("bad.rules");
        std::fs::write(&rules, text).unwrap();
        let out = dir.path().join("o.onnx");
        let o = wcc()
            .arg("optimize")
            .arg(&model)
            .arg("-o")
            .arg(&out)
            .arg("--rules")
            .arg(&rules)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(expect), "expected '{expect}' in: {err}");
        assert!(!out.exists());
    }
}

#[test]
fn the_engine_stops_within_its_limits_and_says_so() {
    // The largest fixture, by node count.
    let largest = fixture_stems()
        .into_iter()
        .max_by_key(|s| load(s).graph.total_nodes())
        .unwrap();
    let prepared = |m: &mut wcc_ir::Model| {
        // Bring the graph to where the algebra pass meets it in -O1.
        let early = wcc_passes::by_names(
            &[
                "remove-noops",
                "constant-fold",
                "fuse-consecutive",
                "miss-branch",
            ],
            &Default::default(),
        )
        .unwrap();
        wcc_passes::optimize(m, early).unwrap();
    };
    let mut m = load(&largest);
    prepared(&mut m);
    let algebra = wcc_passes::algebra::Algebra::new(&[]).unwrap();
    let out = algebra.run(&mut m).unwrap();
    let d = out.details.unwrap();
    assert_eq!(d["stop_reason"], "saturated", "{largest}: {d}");
    assert!(d["enodes"].as_u64().unwrap() < algebra.limits.nodes as u64);

    let mut small = wcc_passes::algebra::Algebra::new(&[]).unwrap();
    small.limits.nodes = 300;
    let mut m = load(&largest);
    prepared(&mut m);
    let before = wcc_ir::export::to_bytes(&m).unwrap();
    let out = small.run(&mut m).unwrap();
    let d = out.details.unwrap();
    assert!(
        d["stop_reason"].as_str().unwrap().starts_with("node limit"),
        "{d}"
    );
    assert!(
        out.notes[0].contains("stopped: node limit"),
        "{:?}",
        out.notes
    );
    // Whatever it found within the limit is still exact: the graph validates and, when it was
    // rewritten, computes the same.
    wcc_ir::validate::validate(&m).unwrap();
    if d["rewritten"] == true {
        let ort = ort();
        let inputs = inputs(&largest, "inputs");
        let orig = wcc_ir::import::load_bytes(&before).unwrap();
        for f in wcc_runtime::compare_outputs(
            &run(&ort, &orig, &inputs).unwrap(),
            &run(&ort, &m, &inputs).unwrap(),
        )
        .unwrap()
        {
            assert!(f.rel_l2_error <= 1e-5);
        }
    }
}

/// (base model, adapter directory, PEFT's merged export)
const PEFT_DIRS: &[(&str, &str, &str)] = &[
    (
        "bert_lora.base.legacy",
        "bert_lora",
        "bert_lora.merged.legacy",
    ),
    (
        "llama_lora.base.legacy",
        "llama_lora",
        "llama_lora.merged.legacy",
    ),
    (
        "llama_miss.base.legacy",
        "llama_miss",
        "llama_miss.merged.legacy",
    ),
];

fn with_adapter(base: &str, adapter: &str) -> wcc_ir::Model {
    let mut m = load(base);
    let opts = wcc_passes::PipelineOptions {
        adapter: Some(root().join("fixtures/adapters").join(adapter)),
        ..Default::default()
    };
    wcc_passes::optimize(
        &mut m,
        wcc_passes::pipeline_with(OptLevel::O1, &opts).unwrap(),
    )
    .unwrap();
    m
}

#[test]
fn adapter_directories_merge_like_peft() {
    let ort = ort();
    for (base, adapter, merged) in PEFT_DIRS {
        let a = with_adapter(base, adapter);
        let b = optimized(merged, OptLevel::O1);
        assert_eq!(histogram(&a), histogram(&b), "{base} + {adapter}");
        let reference = load(merged);
        for which in ["inputs", "alt.inputs"] {
            let inputs = inputs(merged, which);
            for f in wcc_runtime::compare_outputs(
                &run(&ort, &reference, &inputs).unwrap(),
                &run(&ort, &a, &inputs).unwrap(),
            )
            .unwrap()
            {
                assert!(
                    f.rel_l2_error <= 1e-5,
                    "{base} + {adapter} ({which}): {} rel {:e}",
                    f.name,
                    f.rel_l2_error
                );
            }
        }
        // And the adapter made a difference: the base alone computes something else.
        let inputs = inputs(merged, "inputs");
        let plain = wcc_runtime::compare_outputs(
            &run(&ort, &reference, &inputs).unwrap(),
            &run(&ort, &load(base), &inputs).unwrap(),
        )
        .unwrap();
        assert!(
            plain.iter().any(|f| f.rel_l2_error > 1e-3),
            "{adapter} changes nothing?"
        );
    }
}

/// (name, shape, values) of one f32 tensor.
type NamedF32<'a> = (&'a str, Vec<usize>, Vec<f32>);

/// Writes a one-tensor-per-entry f32 safetensors file.
fn write_safetensors(path: &std::path::Path, tensors: &[NamedF32]) {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = vec![];
    for (name, shape, vals) in tensors {
        let start = data.len();
        data.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(name.to_string(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn adapter_keys_that_do_not_fit_are_errors_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": false, "use_dora": false}"#;
    let cases: Vec<(&str, Vec<NamedF32>, &str)> = vec![
        (
            "nowhere",
            vec![
                (
                    "base_model.model.encoder.layer.9.attention.self.query.lora_A.weight",
                    vec![4, 32],
                    vec![0.1; 128],
                ),
                (
                    "base_model.model.encoder.layer.9.attention.self.query.lora_B.weight",
                    vec![32, 4],
                    vec![0.1; 128],
                ),
            ],
            "module 'encoder.layer.9.attention.self.query'",
        ),
        (
            "shape",
            vec![
                (
                    "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight",
                    vec![4, 31],
                    vec![0.1; 124],
                ),
                (
                    "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight",
                    vec![32, 4],
                    vec![0.1; 128],
                ),
            ],
            "lora_A [4, 31] and lora_B [32, 4] do not fit a weight of 32×32",
        ),
        (
            "key",
            vec![(
                "base_model.model.encoder.layer.0.attention.self.query.lora_E.weight",
                vec![1],
                vec![0.0],
            )],
            "key 'base_model.model.encoder.layer.0.attention.self.query.lora_E.weight'",
        ),
    ];
    for (name, tensors, expect) in cases {
        let ad = dir.path().join(name);
        std::fs::create_dir(&ad).unwrap();
        std::fs::write(ad.join("adapter_config.json"), cfg).unwrap();
        write_safetensors(&ad.join("adapter_model.safetensors"), &tensors);
        let out = dir.path().join(format!("{name}.onnx"));
        let o = wcc()
            .arg("optimize")
            .arg(fixture_path("bert_lora.base.legacy"))
            .arg("--adapter")
            .arg(&ad)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(expect), "{name}: expected '{expect}' in {err}");
        assert!(!out.exists());
    }
}

#[test]
fn the_attention_scale_folds_into_the_query_projection_when_enabled() {
    let ort = ort();
    for stem in ["bert.legacy", "vit.legacy"] {
        let mut m = load(stem);
        let opts = wcc_passes::PipelineOptions {
            enable: vec!["fold-attention-scale".into()],
            ..Default::default()
        };
        wcc_passes::optimize(
            &mut m,
            wcc_passes::pipeline_with(OptLevel::O1, &opts).unwrap(),
        )
        .unwrap();
        let plain = optimized(stem, OptLevel::O1);
        // One scale multiplication per layer (2 layers) leaves the scores.
        assert_eq!(
            histogram(&plain)["Mul"] - histogram(&m).get("Mul").copied().unwrap_or(0),
            2,
            "{stem}"
        );
        assert_eq!(
            histogram(&plain)["MatMul"],
            histogram(&m)["MatMul"],
            "{stem}: no product may be duplicated"
        );
        let inputs = inputs(stem, "inputs");
        for f in wcc_runtime::compare_outputs(
            &run(&ort, &load(stem), &inputs).unwrap(),
            &run(&ort, &m, &inputs).unwrap(),
        )
        .unwrap()
        {
            assert!(
                f.rel_l2_error <= 1e-5,
                "{stem}: {} rel {:e}",
                f.name,
                f.rel_l2_error
            );
        }
    }
    let bad = wcc_passes::PipelineOptions {
        enable: vec!["dce".into()],
        ..Default::default()
    };
    assert!(wcc_passes::pipeline_with(OptLevel::O1, &bad)
        .err()
        .unwrap()
        .contains("not an opt-in pass"));
}

#[test]
fn the_query_key_fused_form_is_exact_and_refuses_rotary_models() {
    let ort = ort();
    let opts = wcc_passes::PipelineOptions {
        enable: vec!["qk-fuse".into()],
        ..Default::default()
    };
    for stem in ["bert.legacy", "bert.dynamo", "vit.legacy", "vit.dynamo"] {
        let mut m = load(stem);
        let records = wcc_passes::optimize(
            &mut m,
            wcc_passes::pipeline_with(OptLevel::O1, &opts).unwrap(),
        )
        .unwrap();
        let qk = records.iter().find(|r| r.pass == "qk-fuse").unwrap();
        assert_eq!(qk.changes, 2, "{stem}: {:?}", qk.notes);
        assert!(
            qk.notes
                .iter()
                .any(|n| n.contains("query/key parameters") && n.contains("+100%")),
            "{:?}",
            qk.notes
        );
        for which in ["inputs", "alt.inputs"] {
            let inputs = inputs(stem, which);
            for f in wcc_runtime::compare_outputs(
                &run(&ort, &load(stem), &inputs).unwrap(),
                &run(&ort, &m, &inputs).unwrap(),
            )
            .unwrap()
            {
                assert!(
                    f.rel_l2_error <= 1e-5,
                    "{stem} ({which}): {} rel {:e}",
                    f.name,
                    f.rel_l2_error
                );
            }
        }
    }
    for stem in ["llama.legacy", "llama.dynamo"] {
        let mut m = load(stem);
        let before = optimized(stem, OptLevel::O1);
        let records = wcc_passes::optimize(
            &mut m,
            wcc_passes::pipeline_with(OptLevel::O1, &opts).unwrap(),
        )
        .unwrap();
        let qk = records.iter().find(|r| r.pass == "qk-fuse").unwrap();
        assert_eq!(qk.changes, 0, "{stem}");
        assert!(
            qk.notes
                .iter()
                .any(|n| n.contains("rotary position embeddings")),
            "{stem}: {:?}",
            qk.notes
        );
        assert_eq!(
            histogram(&m),
            histogram(&before),
            "{stem}: refusing must leave the graph alone"
        );
    }
}
