//! Round trip: import → export → import gives the same IR; -O0 output is byte-deterministic and
//! bitwise equal in outputs; external data round-trips.

mod common;

use common::*;
use wcc_ir::export::{save, to_bytes, SaveOptions};
use wcc_passes::OptLevel;

#[test]
fn import_export_import_gives_the_same_ir() {
    for stem in fixture_stems() {
        let a = load(&stem);
        let bytes = to_bytes(&a).unwrap();
        let b = wcc_ir::import::load_bytes(&bytes).unwrap();
        assert!(a.same_ir(&b), "{stem}: IR changed across export/import");
        // And a second export gives identical bytes.
        assert_eq!(
            bytes,
            to_bytes(&b).unwrap(),
            "{stem}: export is not deterministic"
        );
    }
}

#[test]
fn export_keeps_everything_the_file_had() {
    // Re-serializing what we read gives a protobuf equal to the original file's message.
    use protobuf::Message;
    for stem in fixture_stems() {
        let raw = std::fs::read(fixture_path(&stem)).unwrap();
        let original = onnx_protobuf::ModelProto::parse_from_bytes(&raw).unwrap();
        let exported = wcc_ir::export::to_proto(&load(&stem)).unwrap();
        assert!(
            original == exported,
            "{stem}: exported ModelProto differs from the input"
        );
    }
}

#[test]
fn o0_outputs_are_bitwise_equal_on_onnx_runtime() {
    let ort = ort();
    for stem in fixture_stems() {
        let a = load(&stem);
        let b = optimized(&stem, OptLevel::O0);
        let inputs = inputs(&stem, "inputs");
        let ra = run(&ort, &a, &inputs).unwrap();
        let rb = run(&ort, &b, &inputs).unwrap();
        for f in wcc_runtime::compare_outputs(&ra, &rb).unwrap() {
            assert!(
                f.bitwise_equal,
                "{stem}: output {} differs after -O0",
                f.name
            );
        }
    }
}

#[test]
fn external_data_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let stem = "llama.legacy";
    let a = load(stem);
    let out = dir.path().join("m.onnx");
    let s = save(
        &a,
        &out,
        &SaveOptions {
            external_data: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(s.external_bytes > 0 && s.external_file.as_ref().unwrap().is_file());
    // Tensors of 1 KiB and more move out; Constant nodes and small tensors stay inline.
    let whole = std::fs::metadata(fixture_path(stem)).unwrap().len();
    assert!(
        s.model_bytes * 2 < whole,
        "weights should be outside the model file ({} of {whole} bytes)",
        s.model_bytes
    );
    let b = wcc_ir::import::load(&out).unwrap();
    assert!(b.graph.initializers.iter().any(|t| t.is_external()));
    // Same tensors, same bytes.
    for (x, y) in a.graph.initializers.iter().zip(&b.graph.initializers) {
        assert_eq!(x.name(), y.name());
        assert_eq!(
            x.raw_bytes().unwrap(),
            y.raw_bytes().unwrap(),
            "{}",
            x.name()
        );
    }
    // ONNX Runtime reads the external file written beside the model and computes the same.
    let ort = ort();
    let inputs = inputs(stem, "inputs");
    let ra = run(&ort, &a, &inputs).unwrap();
    let rb = run(&ort, &b, &inputs).unwrap();
    for f in wcc_runtime::compare_outputs(&ra, &rb).unwrap() {
        assert!(f.bitwise_equal, "{}", f.name);
    }
    // Saving it again (reading from mmap) into another folder gives the same bytes.
    let dir2 = tempfile::tempdir().unwrap();
    let out2 = dir2.path().join("m.onnx");
    save(
        &b,
        &out2,
        &SaveOptions {
            external_data: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    assert_eq!(
        std::fs::read(dir.path().join("m.onnx.data")).unwrap(),
        std::fs::read(dir2.path().join("m.onnx.data")).unwrap()
    );
}

#[test]
fn saving_over_an_input_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    save(
        &load("bert.legacy"),
        &out,
        &SaveOptions {
            external_data: true,
            ..Default::default()
        },
    )
    .unwrap();
    let m = wcc_ir::import::load(&out).unwrap();
    let before = std::fs::read(dir.path().join("m.onnx.data")).unwrap();
    let e = save(&m, &out, &SaveOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("refusing to overwrite"), "{e}");
    assert_eq!(
        before,
        std::fs::read(dir.path().join("m.onnx.data")).unwrap()
    );
}

/// A model over protobuf's 2 GB limit reaches ONNX Runtime as a file with external data in a
/// temporary folder (`Backend::prepare_from_file`, what `prepare_model` does past the limit):
/// on a fixture it computes bit for bit what the serialized model computes, on two runs of the
/// same session (the folder outlives the load), and the folder is gone with the session.
#[test]
fn onnx_runtime_loads_a_model_from_a_file_with_external_data() {
    let backend = ort();
    for stem in ["bert.legacy", "llama.dynamo"] {
        let m = load(stem);
        let x = inputs(stem, "inputs");
        let want = backend.run_model(&m, &x).unwrap();
        let before = wcc_ort_folders();
        let mut prepared = backend.prepare_from_file(&m).unwrap();
        assert_eq!(
            wcc_ort_folders().len(),
            before.len() + 1,
            "{stem}: no folder"
        );
        for _ in 0..2 {
            let got = prepared.run(&x).unwrap();
            for f in wcc_runtime::compare_outputs(&want, &got).unwrap() {
                assert!(f.bitwise_equal, "{stem}: {}", f.name);
            }
        }
        drop(prepared);
        assert_eq!(
            wcc_ort_folders(),
            before,
            "{stem}: the folder outlived the session"
        );
    }
    assert!(wcc_runtime::Backend::Tract
        .prepare_from_file(&load("bert.legacy"))
        .is_err());
}

/// The temporary folders ONNX Runtime's file loads use, now.
fn wcc_ort_folders() -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("wcc-ort-"))
        })
        .collect();
    v.sort();
    v
}
