//! The `wcc` command line: outputs, reports, gates, exit codes, and bad input of every kind
//! (a clear error naming the problem, exit 2, no output file, input untouched).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use onnx_protobuf::{
    tensor_proto::DataLocation, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, ValueInfoProto,
};
use protobuf::Message;

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn tensor_vi(name: &str, dims: &[i64]) -> ValueInfoProto {
    vi(name, 1, dims)
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A one-input model: y = Relu(x + w) with w an initializer the caller can spoil.
fn small_model(nodes: Vec<NodeProto>, w: TensorProto) -> ModelProto {
    model17(
        nodes,
        vec![w],
        vec![tensor_vi("x", &[4])],
        vec![tensor_vi("y", &[4])],
    )
}

fn good_w() -> TensorProto {
    TensorProto {
        name: "w".into(),
        data_type: 1,
        dims: vec![4],
        float_data: vec![1.0, -2.0, 3.0, -4.0],
        ..Default::default()
    }
}

fn good_nodes() -> Vec<NodeProto> {
    vec![
        node("Add", "add", &["x", "w"], &["s"]),
        node("Relu", "relu", &["s"], &["y"]),
    ]
}

fn external_w(location: &str) -> TensorProto {
    let entry = |k: &str, v: &str| StringStringEntryProto {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    };
    TensorProto {
        name: "w".into(),
        data_type: 1,
        dims: vec![4],
        data_location: DataLocation::EXTERNAL.into(),
        external_data: vec![
            entry("location", location),
            entry("offset", "0"),
            entry("length", "16"),
        ],
        ..Default::default()
    }
}

fn write_model(dir: &Path, name: &str, m: &ModelProto) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    p
}

/// Runs `wcc optimize` on a bad model and checks: exit 2, stderr mentions `expect`, no output.
fn assert_rejected(model: &Path, expect: &str) {
    let dir = model.parent().unwrap();
    let out = dir.join("out.onnx");
    let before = std::fs::read(model).unwrap();
    let o = wcc()
        .args(["optimize"])
        .arg(model)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2 for {}; stderr: {err}",
        model.display()
    );
    assert!(
        err.contains(expect),
        "stderr should mention '{expect}': {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "an output file was written");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".wcc-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
    assert_eq!(before, std::fs::read(model).unwrap(), "input changed");
}

#[test]
fn the_hand_made_model_is_valid() {
    // The malformed variants below differ from this one in exactly one way.
    let dir = tempfile::tempdir().unwrap();
    let p = write_model(
        dir.path(),
        "good.onnx",
        &small_model(good_nodes(), good_w()),
    );
    let out = dir.path().join("out.onnx");
    ok(&wcc()
        .args(["optimize"])
        .arg(&p)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap());
    assert!(out.is_file());
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture_path("bert.legacy")).unwrap();
    let p = dir.path().join("t.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    assert_rejected(&p, "not a valid ONNX model");
}

#[test]
fn cycle() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = vec![
        node("Add", "a", &["x", "b_out"], &["a_out"]),
        node("Relu", "b", &["a_out"], &["b_out"]),
        node("Relu", "c", &["b_out"], &["y"]),
    ];
    let p = write_model(dir.path(), "cycle.onnx", &small_model(nodes, good_w()));
    assert_rejected(&p, "cycle");
}

#[test]
fn undefined_input() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = vec![
        node("Add", "add", &["x", "nowhere"], &["s"]),
        node("Relu", "relu", &["s"], &["y"]),
    ];
    let p = write_model(dir.path(), "undef.onnx", &small_model(nodes, good_w()));
    assert_rejected(&p, "node 'add' (Add) reads 'nowhere', which is not defined");
}

#[test]
fn external_data_outside_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("model");
    std::fs::create_dir(&inner).unwrap();
    // A real file exists at ../x, so only the path check can refuse it.
    std::fs::write(dir.path().join("x"), [0u8; 16]).unwrap();
    let p = write_model(
        &inner,
        "up.onnx",
        &small_model(good_nodes(), external_w("../x")),
    );
    assert_rejected(&p, "leaves the model's folder");

    let abs = dir.path().join("x").to_string_lossy().to_string();
    let p = write_model(
        &inner,
        "abs.onnx",
        &small_model(good_nodes(), external_w(&abs)),
    );
    assert_rejected(&p, "is absolute");

    std::os::unix::fs::symlink(dir.path().join("x"), inner.join("link")).unwrap();
    let p = write_model(
        &inner,
        "link.onnx",
        &small_model(good_nodes(), external_w("link")),
    );
    assert_rejected(&p, "outside the model's folder");

    // The same model with the data inside the folder is accepted.
    std::fs::write(inner.join("w.bin"), [0u8; 16]).unwrap();
    let p = write_model(
        &inner,
        "fine.onnx",
        &small_model(good_nodes(), external_w("w.bin")),
    );
    let out = inner.join("fine.out.onnx");
    ok(&wcc()
        .args(["optimize"])
        .arg(&p)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap());
}

#[test]
fn absurd_dims() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = good_w();
    w.dims = vec![1 << 31, 1 << 31]; // 2^62 elements
    let p = write_model(dir.path(), "big.onnx", &small_model(good_nodes(), w));
    assert_rejected(&p, "absurd");
    let mut m = small_model(good_nodes(), good_w());
    m.graph.as_mut().unwrap().input[0] = tensor_vi("x", &[1 << 31, 1 << 31]);
    let p = write_model(dir.path(), "bigin.onnx", &m);
    assert_rejected(&p, "absurd");
}

#[test]
fn unknown_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = good_w();
    w.data_type = 99;
    w.float_data.clear();
    w.raw_data = vec![0; 16];
    let p = write_model(dir.path(), "dtype.onnx", &small_model(good_nodes(), w));
    assert_rejected(&p, "unknown element type code 99");
}

#[test]
fn not_a_file_and_output_over_input() {
    let dir = tempfile::tempdir().unwrap();
    assert_rejected_missing(&dir.path().join("missing.onnx"));
    let p = dir.path().join("m.onnx");
    std::fs::copy(fixture_path("bert.legacy"), &p).unwrap();
    let before = std::fs::read(&p).unwrap();
    let o = wcc()
        .args(["optimize"])
        .arg(&p)
        .arg("-o")
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));
    assert_eq!(before, std::fs::read(&p).unwrap());
}

fn assert_rejected_missing(p: &Path) {
    let o = wcc().args(["optimize"]).arg(p).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read"));
}

#[test]
fn optimize_writes_output_report_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert.opt.onnx");
    let report = dir.path().join("r.json");
    let o = wcc()
        .args(["optimize"])
        .arg(fixture_path("bert.legacy"))
        .args(["-O1", "-o"])
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .arg("--inputs")
        .arg(models_dir().join("bert.legacy.inputs.npz"))
        .args(["--max-rel-error", "1e-5"])
        .output()
        .unwrap();
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("constant-fold")
            && err.contains("total")
            && err.contains("fidelity last_hidden_state"),
        "{err}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let before = r["before"]["nodes"].as_u64().unwrap();
    let after = r["after"]["nodes"].as_u64().unwrap();
    assert!(after < before, "{before} → {after}");
    assert_eq!(
        after as usize,
        wcc_ir::import::load(&out).unwrap().graph.total_nodes()
    );
    assert!(r["passes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["pass"] == "constant-fold" && p["changes"].as_u64().unwrap() > 0));
    let fid = &r["verification"]["outputs"][0];
    assert!(fid["rel_l2_error"].as_f64().unwrap() <= 1e-5);
    // Provenance.
    let m = wcc_ir::import::load(&out).unwrap();
    assert_eq!(
        m.metadata("wcc.passes"),
        Some("remove-noops,constant-fold,conv-affine,fuse-consecutive,miss-branch,algebra,cse,dce")
    );

    // Same input and flags: byte-identical output.
    let out2 = dir.path().join("again.onnx");
    ok(&wcc()
        .args(["optimize"])
        .arg(fixture_path("bert.legacy"))
        .args(["-O1", "-o"])
        .arg(&out2)
        .arg("--no-verify")
        .output()
        .unwrap());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
}

#[test]
fn a_failed_gate_is_exit_1_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.onnx");
    // A cosine above 1 cannot be met by any model.
    let o = wcc()
        .args(["optimize"])
        .arg(fixture_path("vit.legacy"))
        .arg("-o")
        .arg(&out)
        .args(["--min-cosine", "1.5"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("fidelity gate failed"));
    assert!(!out.exists());
    // The output is written while verification runs: what was written is gone too.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");

    // verify: a LoRA-adapted model against its base differs, and the gate says so.
    let o = wcc()
        .args(["verify"])
        .arg(fixture_path("bert_lora.base.legacy"))
        .arg(fixture_path("bert_lora.legacy"))
        .arg("--inputs")
        .arg(models_dir().join("bert_lora.legacy.inputs.npz"))
        .args(["--min-cosine", "0.9999"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // …and the merged export matches the unmerged one.
    ok(&wcc()
        .args(["verify"])
        .arg(fixture_path("bert_lora.legacy"))
        .arg(fixture_path("bert_lora.merged.legacy"))
        .arg("--inputs")
        .arg(models_dir().join("bert_lora.legacy.inputs.npz"))
        .args(["--max-rel-error", "1e-5"])
        .output()
        .unwrap());
}

#[test]
fn o0_is_a_lossless_deterministic_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    for out in [&a, &b] {
        ok(&wcc()
            .args(["optimize"])
            .arg(fixture_path("gpt2.dynamo"))
            .args(["-O0", "-o"])
            .arg(out)
            .output()
            .unwrap());
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // The same protobuf message as the input (field encoding may differ from the exporter's).
    let parse =
        |p: &Path| onnx_protobuf::ModelProto::parse_from_bytes(&std::fs::read(p).unwrap()).unwrap();
    assert!(parse(&fixture_path("gpt2.dynamo")) == parse(&a));
}

#[test]
fn print_inspect_passes_run() {
    let p = fixture_path("llama.legacy");
    let a = ok(&wcc().arg("print").arg(&p).output().unwrap());
    assert_eq!(a, ok(&wcc().arg("print").arg(&p).output().unwrap()));
    assert!(
        a.contains("init model.embed_tokens.weight: f32[128,48] #"),
        "{}",
        &a[..500]
    );
    let i = ok(&wcc().arg("inspect").arg(&p).output().unwrap());
    assert!(
        i.contains("opsets ai.onnx:17") && i.contains("op MatMul:"),
        "{i}"
    );
    let j: serde_json::Value = serde_json::from_str(&ok(&wcc()
        .args(["inspect", "--json"])
        .arg(&p)
        .output()
        .unwrap()))
    .unwrap();
    assert!(j["stats"]["nodes"].as_u64().unwrap() > 100);
    let passes = ok(&wcc().arg("passes").output().unwrap());
    for name in [
        "remove-noops",
        "constant-fold",
        "fuse-consecutive",
        "miss-branch",
        "algebra",
        "cse",
        "dce",
    ] {
        assert!(passes.contains(name), "{passes}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.npz");
    ok(&wcc()
        .arg("run")
        .arg(&p)
        .arg("--inputs")
        .arg(models_dir().join("llama.legacy.inputs.npz"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap());
    let got = wcc_runtime::load_npz(&out).unwrap();
    let reference = wcc_runtime::load_npz(&models_dir().join("llama.legacy.ref.npz")).unwrap();
    for f in wcc_runtime::compare_outputs(&reference, &got).unwrap() {
        assert!(f.max_abs_error < 1e-4, "{}: {}", f.name, f.max_abs_error);
    }
}

#[test]
fn bad_usage_is_exit_2() {
    let o = wcc().args(["optimize", "-O9", "x.onnx"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = wcc()
        .args(["optimize"])
        .arg(fixture_path("bert.legacy"))
        .args(["--passes", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown pass 'nonsense'"));
}

/// `y = Relu(x + w)`, and also `z = x + w` when `two_outputs`; `op` replaces the Relu.
fn verify_model(dir: &Path, name: &str, op: (&str, &str), two_outputs: bool) -> PathBuf {
    let mut relu = node(op.1, "relu", &["s"], &["y"]);
    relu.domain = op.0.into();
    let mut nodes = vec![node("Add", "add", &["x", "w"], &["s"]), relu];
    let mut m = small_model(vec![], good_w());
    let g = m.graph.as_mut().unwrap();
    if two_outputs {
        nodes.push(node("Identity", "id", &["s"], &["z"]));
        g.output.push(tensor_vi("z", &[4]));
    }
    g.node = nodes;
    if !op.0.is_empty() {
        m.opset_import.push(OperatorSetIdProto {
            domain: op.0.into(),
            version: 1,
            ..Default::default()
        });
    }
    write_model(dir, name, &m)
}

#[test]
fn verification_fails_when_the_result_cannot_run_or_lacks_an_output() {
    let dir = tempfile::tempdir().unwrap();
    let good = verify_model(dir.path(), "good.onnx", ("", "Relu"), false);
    let both = verify_model(dir.path(), "both.onnx", ("", "Relu"), true);
    // An op no backend knows: wcc keeps it, tract cannot run it.
    let odd = verify_model(dir.path(), "odd.onnx", ("com.example", "Frobnicate"), false);
    let verify = |a: &Path, b: &Path| {
        let o = wcc().arg("verify").arg(a).arg(b).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (code, err) = verify(&good, &odd);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot be run by tract while") && err.contains("good.onnx can"),
        "{err}"
    );
    // The other way round nothing can be verified: an error, not a gate failure.
    let (code, err) = verify(&odd, &good);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("tract cannot run") && err.contains("odd.onnx"),
        "{err}"
    );
    // An output of the reference that the candidate lacks fails, naming it.
    let (code, err) = verify(&both, &good);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("output 'z' of the original is missing from the result"),
        "{err}"
    );
    // optimize on a model tract cannot run. -O1 changes nothing in it: region by region there
    // is nothing to run, and it says so.
    let out = dir.path().join("odd.opt.onnx");
    let optimize = |extra: &[&str]| {
        let _ = std::fs::remove_file(&out);
        let o = wcc()
            .arg("optimize")
            .arg(&odd)
            .args(extra)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (code, err) = optimize(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("no node changed what it computes"), "{err}");
    // Run whole: written, and the warning says what was not checked; with a gate, an error and
    // nothing written.
    let (code, err) = optimize(&["--verify-whole"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: not verified: the result's outputs were not compared"),
        "{err}"
    );
    std::fs::remove_file(&out).unwrap();
    let o = wcc()
        .arg("optimize")
        .arg(&odd)
        .args(["--max-rel-error", "0", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot check the fidelity gate"), "{err}");
    assert!(!out.exists());
}

#[test]
fn levels_and_gates_are_checked_before_any_work() {
    let o = wcc()
        .arg("optimize")
        .arg(fixture_path("bert.legacy"))
        .args(["-O", "fast"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("-O0, -O1 or -O compress"));
    let o = wcc()
        .arg("optimize")
        .arg(fixture_path("bert.legacy"))
        .args(["--no-verify", "--min-cosine", "0.9"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--no-verify cannot be combined"));
    let o = wcc()
        .arg("optimize")
        .arg(fixture_path("bert.legacy"))
        .args(["--egraph-time-limit", "-1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

#[test]
fn o_compress_from_the_command_line() {
    // The level parses as `-O compress`, gets its default gate, and reports itself.
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let o = wcc()
        .arg("optimize")
        .arg(fixture_path("llama.legacy"))
        .args(["-O", "compress", "-o"])
        .arg(dir.path().join("c.onnx"))
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("layer drop (attention, one-shot"), "{err}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["level"], "-O compress");
    assert_eq!(r["verification"]["gate_min_cosine"], 0.99);
}

#[test]
fn a_model_that_asks_for_too_much_memory_is_refused_before_it_runs() {
    // y = x + ConstantOfShape([2^17, 2^17, 4]): a 256 GiB intermediate for a 4-element input.
    let dir = tempfile::tempdir().unwrap();
    let shape = TensorProto {
        name: "shape".into(),
        data_type: 7,
        dims: vec![3],
        int64_data: vec![1 << 17, 1 << 17, 4],
        ..Default::default()
    };
    let mut m = small_model(
        vec![
            node("ConstantOfShape", "big", &["shape"], &["b"]),
            node("Add", "add", &["x", "b"], &["y"]),
        ],
        good_w(),
    );
    m.graph.as_mut().unwrap().initializer.push(shape);
    let p = write_model(dir.path(), "big.onnx", &m);
    let o = wcc()
        .arg("run")
        .arg(&p)
        .arg("-o")
        .arg(dir.path().join("o.npz"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("value 'b'") && err.contains("budget"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// x[1,320] → MatMul w0 → Relu → MatMul w1 → Mul 0.5 → Relu → MatMul w2 → y, with three 400 KB
/// weights (large enough for wcc to start writing them into the output while its passes run;
/// -O1 folds the scale into w1, so what was written ahead from w1 on must be replaced).
fn three_weight_model() -> ModelProto {
    let n = 320usize;
    let w = |name: &str, seed: usize| TensorProto {
        name: name.into(),
        data_type: 1,
        dims: vec![n as i64, n as i64],
        raw_data: (0..n * n)
            .flat_map(|i| ((((i * 7 + seed * 13) % 23) as f32 - 11.0) / 64.0).to_le_bytes())
            .collect(),
        ..Default::default()
    };
    let half = TensorProto {
        name: "half".into(),
        data_type: 1,
        float_data: vec![0.5],
        ..Default::default()
    };
    model17(
        vec![
            node("MatMul", "m0", &["x", "w0"], &["a0"]),
            node("Relu", "r0", &["a0"], &["b0"]),
            node("MatMul", "m1", &["b0", "w1"], &["a1"]),
            node("Mul", "s1", &["a1", "half"], &["c1"]),
            node("Relu", "r1", &["c1"], &["b1"]),
            node("MatMul", "m2", &["b1", "w2"], &["y"]),
        ],
        vec![w("w0", 0), w("w1", 1), half, w("w2", 2)],
        vec![tensor_vi("x", &[1, n as i64])],
        vec![tensor_vi("y", &[1, n as i64])],
    )
}

#[test]
fn an_output_written_ahead_holds_the_rewritten_weights_and_nothing_stale() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_model(dir.path(), "in.onnx", &three_weight_model());
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("report.json");
    ok(&wcc()
        .args(["optimize"])
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["verification"].is_object(), "{r}");
    std::fs::remove_file(&report).unwrap();
    let (a, b) = (
        wcc_ir::import::load(&input).unwrap(),
        wcc_ir::import::load(&out).unwrap(),
    );
    // The scale went into w1 (so the pass changed a weight written ahead), and the result
    // computes what the original does on ONNX Runtime.
    assert!(b.graph.nodes.iter().all(|n| n.op_type != "Mul"));
    let x: Vec<f32> = (0..320).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
    let inputs = vec![(
        "x".to_string(),
        wcc_ir::eval::Array::F32(ndarray::ArrayD::from_shape_vec(vec![1, 320], x).unwrap()),
    )];
    let ort = ort();
    let (ra, rb) = (
        run(&ort, &a, &inputs).unwrap(),
        run(&ort, &b, &inputs).unwrap(),
    );
    for f in wcc_runtime::compare_outputs(&ra, &rb).unwrap() {
        assert!(f.rel_l2_error <= 1e-6, "{f:?}");
    }
    // ONNX Runtime also loads the file as written (initializers first, padded graph length).
    let ort_file = ort.run(&std::fs::read(&out).unwrap(), &inputs).unwrap();
    for f in wcc_runtime::compare_outputs(&rb, &ort_file).unwrap() {
        assert!(f.bitwise_equal, "{f:?}");
    }
    // No stale bytes: the file is the canonical serialization of what it holds but for the
    // graph length's padding (a varint of 5 bytes instead of 3, there because the output was
    // written ahead).
    let canonical = wcc_ir::export::to_bytes(&b).unwrap().len();
    let len = std::fs::metadata(&out).unwrap().len() as usize;
    assert!(
        (canonical + 1..=canonical + 4).contains(&len),
        "{len} bytes written, {canonical} canonical"
    );
    // Same input and flags: the same bytes.
    let out2 = dir.path().join("out2.onnx");
    ok(&wcc()
        .args(["optimize"])
        .arg(&input)
        .arg("-o")
        .arg(&out2)
        .output()
        .unwrap());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());

    // A failed gate leaves nothing behind, what was written ahead included.
    let out3 = dir.path().join("out3.onnx");
    let o = wcc()
        .args(["optimize"])
        .arg(&input)
        .arg("-o")
        .arg(&out3)
        .args(["--min-cosine", "1.5"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(left, ["in.onnx", "out.onnx", "out2.onnx"]);
}
