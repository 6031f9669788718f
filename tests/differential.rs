//! Differential tests: every fixture after -O1 computes what the original computes, on ONNX
//! Runtime 1.31.1 (within 1e-5 relative L2 per output, on both input sets) and on tract where
//! tract runs the model; and the original agrees with PyTorch's reference outputs.

mod common;

use common::*;
use wcc_passes::OptLevel;
use wcc_runtime::{compare_outputs, Backend};

const LOSSLESS_REL: f64 = 1e-5;

fn check(backend: &Backend, stem: &str, which: &str) -> Result<(), String> {
    let a = load(stem);
    let b = optimized(stem, OptLevel::O1);
    let inputs = inputs(stem, which);
    let ra = run(backend, &a, &inputs)?;
    let rb = run(backend, &b, &inputs)?;
    for f in compare_outputs(&ra, &rb)? {
        assert!(
            f.rel_l2_error <= LOSSLESS_REL && f.cosine > 1.0 - 1e-9,
            "{stem} ({which}) on {}: output {} rel {:e} cos {}",
            backend.label(),
            f.name,
            f.rel_l2_error,
            f.cosine
        );
    }
    Ok(())
}

#[test]
fn o1_matches_original_on_onnx_runtime() {
    let ort = ort();
    for stem in fixture_stems() {
        for which in ["inputs", "alt.inputs"] {
            check(&ort, &stem, which).unwrap_or_else(|e| panic!("{stem}: {e}"));
        }
    }
}

#[test]
fn o1_output_loads_in_onnx_runtime_and_matches_pytorch() {
    let ort = ort();
    for stem in fixture_stems() {
        let b = optimized(&stem, OptLevel::O1);
        let out = run(&ort, &b, &inputs(&stem, "inputs")).unwrap();
        let reference =
            wcc_runtime::load_npz(&models_dir().join(format!("{stem}.ref.npz"))).unwrap();
        for f in compare_outputs(&reference, &out).unwrap() {
            assert!(
                f.max_abs_error < 1e-4,
                "{stem}: {} differs from PyTorch by {:e}",
                f.name,
                f.max_abs_error
            );
        }
    }
}

/// Fixtures tract can run: everything but ONNX Runtime's contrib ops (com.microsoft).
fn tract_fixtures() -> Vec<String> {
    fixture_stems()
        .into_iter()
        .filter(|s| {
            !load(s)
                .graph
                .nodes
                .iter()
                .any(|n| n.domain == "com.microsoft")
        })
        .collect()
}

#[test]
fn o1_matches_original_on_tract() {
    let mut ran = 0;
    for stem in tract_fixtures() {
        match check(&Backend::Tract, &stem, "inputs") {
            Ok(()) => ran += 1,
            Err(e) => eprintln!("tract does not run {stem}: {e}"),
        }
    }
    // tract runs every exporter's output we ship; a drop here is a regression to look at.
    assert_eq!(ran, tract_fixtures().len(), "tract ran only {ran} fixtures");
}

#[test]
fn tract_and_onnx_runtime_agree() {
    let ort = ort();
    for stem in tract_fixtures() {
        let m = optimized(&stem, OptLevel::O1);
        let inputs = inputs(&stem, "inputs");
        let a = run(&ort, &m, &inputs).unwrap();
        let b = run(&Backend::Tract, &m, &inputs).unwrap();
        for f in compare_outputs(&a, &b).unwrap() {
            assert!(
                f.rel_l2_error < 1e-4,
                "{stem}: {} rel {:e}",
                f.name,
                f.rel_l2_error
            );
        }
    }
}

/// Verification hands tract the large tensors (`Backend::run_model`: parsed as graph inputs, then
/// made constants read straight from where wcc holds them): the outputs are bit for bit those of
/// tract parsing the whole message.
#[test]
fn tract_reads_handed_over_tensors_as_it_parses_them() {
    let mut handed = 0;
    for stem in tract_fixtures() {
        let m = load(&stem);
        let inputs = inputs(&stem, "inputs");
        let (_, refs) =
            wcc_ir::export::to_bytes_with_refs(&m, wcc_runtime::backend::REF_MIN_BYTES).unwrap();
        handed += refs.len();
        let parsed = run(&Backend::Tract, &m, &inputs).unwrap();
        let resolved = Backend::Tract.run_model(&m, &inputs).unwrap();
        assert_eq!(parsed.len(), resolved.len(), "{stem}");
        for ((na, a), (nb, b)) in parsed.iter().zip(&resolved) {
            assert_eq!(na, nb, "{stem}");
            assert!(
                a == b,
                "{stem}: output {na} differs when tract resolves the weights"
            );
        }
    }
    assert!(
        handed > 10,
        "the fixtures' large weights are handed over ({handed})"
    );
}

/// Exporters before IR 4 list initializers among the graph inputs too. Handed over, such tensors
/// stay constants, and the inputs the caller feeds keep their places: listed first here, before
/// the real inputs, they would take the fed arrays' places if they stayed inputs.
#[test]
fn handed_over_tensors_listed_as_graph_inputs_stay_constants() {
    let mut checked = 0;
    for stem in tract_fixtures() {
        let mut m = load(&stem);
        let inputs = inputs(&stem, "inputs");
        let (_, refs) =
            wcc_ir::export::to_bytes_with_refs(&m, wcc_runtime::backend::REF_MIN_BYTES).unwrap();
        if refs.is_empty() {
            continue;
        }
        let parsed = run(&Backend::Tract, &m, &inputs).unwrap();
        for t in refs.iter().rev() {
            let ty = wcc_ir::TensorType::known(t.dtype().unwrap(), t.dims());
            m.graph
                .inputs
                .insert(0, wcc_ir::ValueInfo::tensor(t.name(), ty));
        }
        let resolved = Backend::Tract.run_model(&m, &inputs).unwrap();
        assert_eq!(parsed.len(), resolved.len(), "{stem}");
        for ((na, a), (nb, b)) in parsed.iter().zip(&resolved) {
            assert_eq!(na, nb, "{stem}");
            assert!(a == b, "{stem}: output {na} differs");
        }
        checked += 1;
    }
    assert!(checked > 2, "fixtures with handed-over weights ({checked})");
}

#[test]
fn o1_never_has_more_nodes_and_is_deterministic() {
    for stem in fixture_stems() {
        let a = load(&stem);
        let b = optimized(&stem, OptLevel::O1);
        assert!(
            b.graph.total_nodes() <= a.graph.total_nodes(),
            "{stem}: -O1 added nodes"
        );
        // Where the legacy exporter left Constant nodes, there is something to fold.
        if stem.contains("legacy") && a.graph.nodes.iter().any(|n| n.is("Constant")) {
            assert!(
                b.graph.total_nodes() < a.graph.total_nodes(),
                "{stem}: -O1 removed nothing"
            );
        }
        let again = optimized(&stem, OptLevel::O1);
        assert_eq!(
            wcc_ir::export::to_bytes(&b).unwrap(),
            wcc_ir::export::to_bytes(&again).unwrap(),
            "{stem}"
        );
    }
}

/// -O1 is at least as small as the better of onnxsim 0.8.1 and onnxslim 0.1.98 on every fixture
/// (their counts pinned in fixtures/simplifier_node_counts.json by the benchmark).
#[test]
fn o1_is_at_most_the_best_simplifier_on_every_fixture() {
    let table: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/simplifier_node_counts.json")).unwrap(),
    )
    .unwrap();
    let mut worse = vec![];
    for stem in fixture_stems() {
        let row = &table["fixtures"][&stem];
        let best = row["onnxsim"]
            .as_u64()
            .zip(row["onnxslim"].as_u64())
            .map(|(a, b)| a.min(b))
            .unwrap_or_else(|| panic!("{stem}: no simplifier counts (rerun the benchmark)"));
        let n = optimized(&stem, OptLevel::O1).graph.total_nodes() as u64;
        if n > best {
            worse.push(format!("{stem}: wcc {n} > {best}"));
        }
    }
    assert!(worse.is_empty(), "{}", worse.join("\n"));
}
