//! The "done when": the default `wcc optimize M -O1 -o OUT` succeeds and verifies on every
//! bundled fixture with no `--inputs` (random inputs fit the model, KV caches included), and
//! `wcc run` / `wcc verify` work on the KV-cache fixtures with default inputs. And the
//! never-crash contract: a backend that panics is an error naming it (exit 2), never a panic.

mod common;

use common::*;

const KV_FIXTURES: [&str; 3] = ["llama_kv.legacy", "llama_kv.dynamo", "llama_drop_kv.legacy"];

fn assert_no_crash(stderr: &str) {
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("internal error"), "{stderr}");
}

#[test]
fn default_optimize_verifies_every_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = vec![];
    for stem in fixture_stems() {
        let out = dir.path().join(format!("{stem}.onnx"));
        let report = dir.path().join(format!("{stem}.json"));
        let o = wcc()
            .arg("optimize")
            .arg(fixture_path(&stem))
            .args(["-O1", "-o"])
            .arg(&out)
            .arg("--report")
            .arg(&report)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_no_crash(&err);
        if o.status.code() != Some(0) {
            failures.push(format!("{stem}: exit {:?}: {err}", o.status.code()));
            continue;
        }
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let v = &r["verification"];
        // Checked region by region, a result with no changed region has nothing to compare.
        let nothing_changed = v["regions"]["regions"] == 0;
        if v.is_null() || v["outputs"].as_array().is_none_or(|a| a.is_empty()) && !nothing_changed {
            failures.push(format!("{stem}: not verified: {}", r["not_verified"]));
            continue;
        }
        // -O1 is lossless: every output of the original is there and matches.
        for f in v["outputs"].as_array().unwrap() {
            if f["rel_l2_error"].as_f64().is_none_or(|e| e > 1e-4) {
                failures.push(format!("{stem}: {f}"));
            }
        }
        println!("{stem}: verified on {}", v["backend"]);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn run_and_verify_work_on_the_kv_cache_fixtures_with_default_inputs() {
    let dir = tempfile::tempdir().unwrap();
    for stem in KV_FIXTURES {
        let out = dir.path().join(format!("{stem}.npz"));
        let o = wcc()
            .arg("run")
            .arg(fixture_path(stem))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_no_crash(&err);
        assert_eq!(o.status.code(), Some(0), "{stem}: {err}");
        let outs = wcc_runtime::load_npz(&out).unwrap();
        let m = load(stem);
        assert_eq!(outs.len(), m.graph.outputs.len(), "{stem}");

        let o = wcc()
            .arg("verify")
            .arg(fixture_path(stem))
            .arg(fixture_path(stem))
            .args(["--max-rel-error", "0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_no_crash(&err);
        assert_eq!(o.status.code(), Some(0), "{stem}: {err}");
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains("present.1.key") && text.contains("bitwise equal"),
            "{text}"
        );
    }
}

/// The fixture's own inputs with an attention mask too short for its cache: tract indexes past
/// its end and panics inside.
fn mask_too_short(dir: &std::path::Path) -> std::path::PathBuf {
    let mut arrays = inputs("llama_kv.legacy", "inputs");
    for (name, a) in &mut arrays {
        if name == "attention_mask" {
            let batch = a.shape()[0];
            *a = wcc_ir::eval::Array::I64(ndarray::ArrayD::from_elem(
                ndarray::IxDyn(&[batch, 1]),
                1,
            ));
        }
    }
    let p = dir.join("short_mask.npz");
    wcc_runtime::save_npz(&p, &arrays).unwrap();
    p
}

#[test]
fn a_backend_that_panics_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let bad = mask_too_short(dir.path());
    let o = wcc()
        .arg("run")
        .arg(fixture_path("llama_kv.legacy"))
        .arg("--inputs")
        .arg(&bad)
        .arg("-o")
        .arg(dir.path().join("o.npz"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_no_crash(&err);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.starts_with("error: tract crashed"), "{err}");
    // Without a gate, optimize writes the result and says plainly that it is not verified…
    let out = dir.path().join("o.onnx");
    let report = dir.path().join("r.json");
    let o = wcc()
        .arg("optimize")
        .arg(fixture_path("llama_kv.legacy"))
        .arg("--inputs")
        .arg(&bad)
        .arg("-o")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_no_crash(&err);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning: not verified") && err.contains("tract crashed"),
        "{err}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["verification"].is_null());
    assert!(r["not_verified"].as_str().unwrap().contains("tract"));
    // …and with a gate it is an error: nothing could be checked, nothing is written.
    std::fs::remove_file(&out).unwrap();
    let o = wcc()
        .arg("optimize")
        .arg(fixture_path("llama_kv.legacy"))
        .arg("--inputs")
        .arg(&bad)
        .args(["--min-cosine", "0.99", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_no_crash(&err);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot check the fidelity gate"), "{err}");
    assert!(!out.exists());
}

#[test]
fn verify_lists_the_caches_layer_dropping_removed() {
    // -O compress on the KV-cache fixture with default inputs (tract, random), then `wcc verify`
    // of the original against the result: the dropped layer's cache is listed, not failed.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dkv.onnx");
    let o = wcc()
        .arg("optimize")
        .arg(fixture_path("llama_drop_kv.legacy"))
        .args(["-O", "compress", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_no_crash(&err);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("output present.2.key removed on purpose: KV cache of the dropped attn 2"),
        "{err}"
    );
    let o = wcc()
        .arg("verify")
        .arg(fixture_path("llama_drop_kv.legacy"))
        .arg(&out)
        .args(["--min-cosine", "0.99"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("present.2.value: removed on purpose (KV cache of the dropped attn 2)"),
        "{text}"
    );
}

#[test]
fn a_model_over_the_verification_budget_is_written_and_said_unverified() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.onnx");
    let report = dir.path().join("r.json");
    let run_on = |stem: &str, extra: &[&str]| {
        let _ = std::fs::remove_file(&out);
        wcc()
            .arg("optimize")
            .arg(fixture_path(stem))
            .args(extra)
            .arg("-o")
            .arg(&out)
            .arg("--report")
            .arg(&report)
            .output()
            .unwrap()
    };
    let run = |extra: &[&str]| run_on("bert.legacy", extra);
    let o = run(&["--verify-whole", "--verify-memory", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_no_crash(&err);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning: not verified") && err.contains("--verify-memory budget"),
        "{err}"
    );
    assert!(out.is_file());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["verification"].is_null());
    assert!(r["not_verified"]
        .as_str()
        .unwrap()
        .contains("--verify-memory"));
    // With a gate, a verification that cannot run is an error, and nothing is written.
    let o = run(&["--verify-memory", "0", "--min-cosine", "0.99"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_no_crash(&err);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--verify-memory budget"), "{err}");
    assert!(!out.exists());
    // Under the default budget the same model verifies (region by region: -O1 is lossless).
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(0));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["not_verified"].is_null() && !r["verification"].is_null());
    assert!(r["verification"]["regions"]["regions"].as_u64().unwrap() > 0);
    // Region by region, only what changed regions read counts: BERT's -O1 changes no node that
    // reads a weight, so a budget of 1 MiB verifies it...
    let o = run(&["--verify-memory", "0.001"]);
    assert_eq!(o.status.code(), Some(0));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["not_verified"].is_null() && !r["verification"]["regions"].is_null());
    // ...while a ResNet whose BatchNorms fold into its convolutions' weights does not.
    let o = run_on("resnet_bn.legacy", &["--verify-memory", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning: not verified") && err.contains("the changed region that computes"),
        "{err}"
    );
}
