//! Shared attention atoms (`--share-atoms`, MASA), judged against independent references: with
//! as many atoms as the blocks give, ONNX Runtime and tract reproduce the original on every
//! family; on a fixture whose attention weights PyTorch planted as combinations of three atoms
//! (`fixtures/make_planted_atoms.py`), the pass finds those atoms and the result computes what
//! PyTorch's noise-free shared model computes.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use wcc_driver::{Gate, OptimizeOptions, OptimizeReport, ShareEmit, ShareOptions};
use wcc_ir::eval::Array;
use wcc_ir::Model;
use wcc_runtime::{Backend, NamedArrays};

/// One fixture per family and exporter: BERT (legacy, dynamo, ONNX Runtime's fused Attention
/// with a packed QKV), GPT-2 (Conv1D's fused QKV), Llama (GQA: K and V narrower), ViT.
const FAMILIES: &[&str] = &[
    "bert.legacy",
    "bert.dynamo",
    "bert.ortfused",
    "gpt2.legacy",
    "gpt2.dynamo",
    "llama.legacy",
    "llama.dynamo",
    "vit.legacy",
    "vit.dynamo",
];

const PLANTED: &str = "llama_atoms.legacy";

fn share(
    stem: &str,
    dir: &Path,
    tag: &str,
    opts: ShareOptions,
    edit: impl FnOnce(&mut OptimizeOptions),
) -> (PathBuf, OptimizeReport) {
    let out = dir.join(format!("{stem}.{tag}.onnx"));
    let mut o = OptimizeOptions::new(fixture_path(stem));
    o.output = Some(out.clone());
    o.gate = Gate {
        min_cosine: Some(-1.0),
        max_rel_error: None,
    };
    if let Backend::Ort { lib, .. } = ort() {
        o.exec.ort_lib = lib;
    }
    o.share = Some(opts);
    edit(&mut o);
    match wcc_driver::optimize(o, &mut |_| {}) {
        Ok(done) => (out, done.report),
        Err(e) => panic!("{stem}: {e}"),
    }
}

fn atoms(spec: &str, refine: &str, mean: bool) -> ShareOptions {
    ShareOptions {
        atoms: spec.parse().unwrap(),
        refine: refine.parse().unwrap(),
        mean,
        ..Default::default()
    }
}

fn details(r: &OptimizeReport) -> &serde_json::Value {
    r.passes
        .iter()
        .find(|p| p.pass == "shared-atoms")
        .and_then(|p| p.details.as_ref())
        .expect("shared-atoms ran")
}

fn load_path(p: &Path) -> Model {
    wcc_ir::import::load(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn floats(a: &Array) -> Vec<f64> {
    a.to_f64_vec()
}

/// The largest relative L2 error of `b`'s outputs against `a`'s.
fn worst_rel(a: &NamedArrays, b: &NamedArrays) -> f64 {
    a.iter()
        .map(|(name, x)| {
            let y = &b.iter().find(|(n, _)| n == name).expect("same outputs").1;
            wcc_runtime::compare::fidelity(name, x, y).rel_l2_error
        })
        .fold(0.0, f64::max)
}

/// `out` computes what `original` does within 1e-5 relative, on ONNX Runtime and (but for ONNX
/// Runtime's fused Attention) tract.
fn assert_reproduces(stem: &str, tag: &str, original: &Model, out: &Path, inputs: &NamedArrays) {
    let result = load_path(out);
    let mut backends = vec![ort()];
    if stem != "bert.ortfused" {
        backends.push(Backend::Tract);
    }
    for b in backends {
        let want = run(&b, original, inputs).unwrap();
        let got = run(&b, &result, inputs)
            .unwrap_or_else(|e| panic!("{stem} ({tag}) on {}: {e}", b.label()));
        let rel = worst_rel(&want, &got);
        assert!(rel < 1e-5, "{stem} ({tag}) on {}: rel {rel}", b.label());
    }
}

/// With every atom the blocks give (the mean and L − 1, or L without it) the result is the
/// original up to rounding, on ONNX Runtime and on tract, for every family; the report counts
/// the types it found and the parameters.
#[test]
fn as_many_atoms_as_blocks_reproduce_every_family() {
    let dir = tempfile::tempdir().unwrap();
    for stem in FAMILIES {
        let inputs = inputs(stem, "inputs");
        let original = load(stem);
        for mean in [true, false] {
            let tag = if mean { "all-mean" } else { "all" };
            let (out, r) = share(stem, dir.path(), tag, atoms("all:64", "0", mean), |_| {});
            let d = details(&r);
            let kinds = d["kinds"].as_array().unwrap();
            assert!(!kinds.is_empty(), "{stem}: nothing shared: {d}");
            for k in kinds {
                let blocks = k["blocks"].as_u64().unwrap();
                let kept = k["atoms"].as_u64().unwrap();
                assert_eq!(kept, if mean { blocks - 1 } else { blocks }, "{stem}: {k}");
                assert!(
                    k["energy_kept"].as_f64().unwrap() > 1.0 - 1e-9,
                    "{stem}: {k}"
                );
            }
            assert_reproduces(stem, tag, &original, &out, &inputs);
        }
    }
}

/// Bytes reported are the file's: the atoms, coefficients and refinement factors the pass
/// added, in the weights' type; and the output is the same bytes every run.
#[test]
fn reported_bytes_match_the_file_and_the_output_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let (a, r) = share(PLANTED, dir.path(), "a", atoms("all:2", "4", true), |_| {});
    let (b, _) = share(PLANTED, dir.path(), "b", atoms("all:2", "4", true), |_| {});
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let m = load_path(&a);
    let added: u64 = m
        .graph
        .initializers
        .iter()
        .filter(|t| {
            let n = t.name();
            n.starts_with("shared_atoms_") && n.ends_with("_book")
                || n.ends_with("_atom_coeffs")
                || n.contains("_refine_")
        })
        .map(|t| t.byte_size())
        .sum();
    let d = details(&r);
    let reported: u64 = d["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["bytes_after"].as_u64().unwrap())
        .sum();
    assert_eq!(added, reported);
    assert_eq!(d["kinds"].as_array().unwrap().len(), 4, "{d}");
    // (The synthesis is constant: the metadata says how ONNX Runtime treats it.)
    assert!(m
        .metadata("wcc.shared_atoms")
        .is_some_and(|s| s.contains("ConstantFolding")));
}

/// The planted fixture: per type, the three atoms the pass keeps span PyTorch's planted ones,
/// its mean atom is the planted mean, and ONNX Runtime's outputs of the result are closer to
/// PyTorch's noise-free shared model than the original (with its noise) is.
#[test]
fn the_planted_atoms_are_recovered_and_the_outputs_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (out, r) = share(
        PLANTED,
        dir.path(),
        "planted",
        atoms("all:3", "0", true),
        |_| {},
    );
    let m = load_path(&out);
    let planted = wcc_runtime::load_npz(&models_dir().join(format!("{PLANTED}.atoms.npz")))
        .expect("the planted atoms");
    let get = |k: &str| {
        &planted
            .iter()
            .find(|(n, _)| n == k)
            .unwrap_or_else(|| panic!("{k} in the atoms npz"))
            .1
    };
    for t in ["q", "k", "v", "o"] {
        let book = m
            .graph
            .initializer(&format!("shared_atoms_{t}_book"))
            .unwrap_or_else(|| panic!("{t}'s atoms"));
        let numel = book.dims()[1] as usize;
        assert_eq!(book.dims()[0], 4, "{t}: the mean and 3 atoms");
        let raw = book.raw_bytes().unwrap();
        let book: Vec<f64> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect();
        // PyTorch's weights are [out, in]; the graph's are their transposes, [in, out].
        let shape = get(&format!("{t}.atoms")).shape().to_vec();
        let (out_d, in_d) = (shape[1], shape[2]);
        let transposed = |x: &[f64]| -> Vec<f64> {
            let mut y = vec![0.0; x.len()];
            for o in 0..out_d {
                for i in 0..in_d {
                    y[i * out_d + o] = x[o * in_d + i];
                }
            }
            y
        };
        let want_atoms = floats(get(&format!("{t}.atoms")));
        let mean = transposed(&floats(get(&format!("{t}.mean"))));
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let found: Vec<&[f64]> = (1..4).map(|s| &book[s * numel..(s + 1) * numel]).collect();
        for (s, f) in found.iter().enumerate() {
            assert!((dot(f, f) - 1.0).abs() < 1e-4, "{t}: atom {s} is not unit");
        }
        for s in 0..3 {
            let p = transposed(&want_atoms[s * numel..(s + 1) * numel]);
            let norm2 = dot(&p, &p);
            let inside: f64 = found.iter().map(|f| dot(f, &p).powi(2)).sum();
            assert!(
                inside / norm2 > 1.0 - 1e-4,
                "{t}: planted atom {s} is {:.2e} outside the atoms found",
                1.0 - inside / norm2
            );
        }
        let d: Vec<f64> = mean
            .iter()
            .zip(&book[..numel])
            .map(|(a, b)| a - b)
            .collect();
        let rel = (dot(&d, &d) / dot(&mean, &mean)).sqrt();
        assert!(
            rel < 1e-2,
            "{t}: the mean atom is {rel:.2e} off the planted mean"
        );
    }
    let d = details(&r);
    assert!(
        (d["attention_params_after"].as_f64().unwrap()
            / d["attention_params_before"].as_f64().unwrap())
            < 0.35,
        "{d}"
    );
    let shared_ref =
        wcc_runtime::load_npz(&models_dir().join(format!("{PLANTED}.shared_ref.npz"))).unwrap();
    let x = inputs(PLANTED, "inputs");
    let got = run(&ort(), &m, &x).unwrap();
    let original = run(&ort(), &load(PLANTED), &x).unwrap();
    let (to_ref, original_to_ref) = (
        worst_rel(&shared_ref, &got),
        worst_rel(&shared_ref, &original),
    );
    assert!(
        to_ref < original_to_ref,
        "result {to_ref:.2e} from PyTorch's shared model, the original {original_to_ref:.2e}"
    );
}

/// Too few atoms for the planted weights: the refinement puts back what they leave, and
/// whitened by calibration inputs, it is judged on held-out ones.
#[test]
fn refinement_lowers_the_error_the_atoms_leave() {
    let dir = tempfile::tempdir().unwrap();
    let calibrated = |o: &mut OptimizeOptions| {
        o.calib = Some(models_dir().join(format!("{PLANTED}.inputs.npz")));
        o.exec.inputs = Some(models_dir().join(format!("{PLANTED}.alt.inputs.npz")));
    };
    let (_, plain) = share(
        PLANTED,
        dir.path(),
        "s1",
        atoms("all:1", "0", true),
        calibrated,
    );
    let (_, refined) = share(
        PLANTED,
        dir.path(),
        "s1r",
        atoms("all:1", "8", true),
        calibrated,
    );
    let cos = |r: &OptimizeReport| r.verification.as_ref().expect("verified").outputs[0].cosine;
    assert!(
        cos(&refined) > cos(&plain),
        "{} vs {}",
        cos(&refined),
        cos(&plain)
    );
    let d = details(&refined);
    for k in d["kinds"].as_array().unwrap() {
        assert_eq!(
            k["refine_rank"].as_u64().unwrap(),
            if matches!(k["kind"].as_str(), Some("k" | "v")) {
                4
            } else {
                8
            }
        );
        for l in k["layers"].as_array().unwrap() {
            let (after, before) = (
                l["rel_error"].as_f64().unwrap(),
                l["rel_error_shared"].as_f64().unwrap(),
            );
            assert!(after < before, "{l}");
            assert!(l["output_rel_error"].as_f64().is_some(), "{l}");
        }
    }
}

/// Bad specs are usage errors (exit 2) naming the problem.
#[test]
fn bad_specs_exit_2() {
    for spec in ["x:2", "q:0", "q:1.5", ""] {
        let out = wcc()
            .args(["optimize"])
            .arg(fixture_path("bert.legacy"))
            .args(["-o", "/dev/null", "--share-atoms", spec])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{spec}: {:?}", out);
    }
    let without_atoms = [
        &["--share-refine-rank", "4"][..],
        &["--share-groups", "2"],
        &["--share-emit", "project"],
    ];
    let bad = [
        &["--share-atoms", "all:2", "--share-groups", "0"][..],
        &["--share-atoms", "all:2", "--share-groups", "x"],
        &["--share-atoms", "all:2", "--share-emit", "fold"],
    ];
    for args in without_atoms.iter().chain(&bad) {
        let out = wcc()
            .args(["optimize"])
            .arg(fixture_path("bert.legacy"))
            .args(["-o", "/dev/null"])
            .args(*args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
}

/// `-O compress` searches shared atoms per type: on the planted fixture it shares every type
/// with no more atoms than were planted (within a quarter of the default gate), and the result,
/// verified by the driver against the original, also stays within the gate of the original on
/// ONNX Runtime with the fixture's own inputs (not the calibration's).
#[test]
fn compress_finds_the_planted_sharing_within_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let (out, r) = share(
        PLANTED,
        dir.path(),
        "compress",
        ShareOptions::default(),
        |o| {
            o.share = None;
            o.level = wcc_driver::Level::Compress;
            o.gate = Gate::default();
        },
    );
    let s = r.share_search.as_ref().expect("the search ran");
    let json = serde_json::to_value(s).unwrap();
    assert_eq!(s.kinds.len(), 4, "{json}");
    for k in &s.kinds {
        let c = k
            .chosen
            .unwrap_or_else(|| panic!("{} not shared: {json}", k.kind.label()));
        assert!(
            c.atoms * c.groups <= 3,
            "{}: {c} for 3 planted",
            k.kind.label()
        );
    }
    let kept = s.tries.iter().find(|t| t.passed).expect("a kept try");
    assert!(kept.measured_share <= 0.25, "{json}");
    let d = details(&r);
    assert!(
        d["attention_params_after"].as_f64().unwrap()
            / d["attention_params_before"].as_f64().unwrap()
            < 0.35,
        "{d}"
    );
    let x = inputs(PLANTED, "inputs");
    let got = run(&ort(), &load_path(&out), &x).unwrap();
    let original = run(&ort(), &load(PLANTED), &x).unwrap();
    for (name, a) in &original {
        let b = &got.iter().find(|(n, _)| n == name).unwrap().1;
        let f = wcc_runtime::compare::fidelity(name, a, b);
        assert!(f.cosine >= 0.99, "{name}: cosine {}", f.cosine);
    }
}

/// Layer groups and the input-projection emission, with every atom each group gives, still
/// reproduce every family on ONNX Runtime and tract; each type's groups are runs of consecutive
/// blocks (at least two each) covering all of them; the projection is emitted wherever the
/// exporter wrote `MatMul(x, W)` (BERT and Llama legacy at least) and elsewhere the report says
/// why the weights were synthesized.
#[test]
fn groups_and_input_projection_reproduce_every_family() {
    let dir = tempfile::tempdir().unwrap();
    let mut projected = vec![];
    for stem in FAMILIES.iter().chain(&[PLANTED]) {
        let inputs = inputs(stem, "inputs");
        let original = load(stem);
        let opts = ShareOptions {
            groups: "2".parse().unwrap(),
            emit: ShareEmit::Project,
            ..atoms("all:64", "2", true)
        };
        let (out, r) = share(stem, dir.path(), "groups", opts, |_| {});
        for k in details(&r)["kinds"].as_array().unwrap() {
            let blocks: Vec<u64> = k["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["block"].as_u64().unwrap())
                .collect();
            let groups: Vec<Vec<u64>> = k["groups"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| serde_json::from_value(g["blocks"].clone()).unwrap())
                .collect();
            assert_eq!(groups.len(), blocks.len().min(4) / 2, "{stem}: {k}");
            assert_eq!(k["groups_asked"], 2, "{stem}: {k}");
            assert!(groups.iter().all(|g| g.len() >= 2), "{stem}: {k}");
            assert_eq!(groups.concat(), blocks, "{stem}: {k}");
            match k["emission"].as_str().unwrap() {
                "project" => projected.push(format!("{stem} {}", k["kind"])),
                _ => assert_eq!(k["cost"]["projectable"], false, "{stem}: {k}"),
            }
        }
        assert_reproduces(stem, "groups", &original, &out, &inputs);
    }
    for must in ["bert.legacy", "llama.legacy", PLANTED] {
        assert!(
            projected.iter().any(|p| p.starts_with(must)),
            "{must} not projected: {projected:?}"
        );
    }
}

/// The emission cost model: with the planted model's inputs fixed at one row per call (a
/// decoder step) projecting the input costs fewer multiply-adds than synthesizing the weights,
/// and `auto` projects every type; at 16 rows per call it synthesizes. Both results stay at the
/// planted noise level of the original (the driver's verification, on ONNX Runtime).
#[test]
fn the_cost_model_projects_one_row_calls_and_synthesizes_long_ones() {
    let dir = tempfile::tempdir().unwrap();
    for (seq, want) in [(1i64, "project"), (16, "synthesize")] {
        let mut m = load(PLANTED);
        for v in &mut m.graph.inputs {
            if let wcc_ir::ValueType::Tensor(t) = &mut v.ty {
                let rank = t.shape.as_ref().map_or(0, Vec::len);
                *t = wcc_ir::TensorType::known(t.dtype.unwrap(), &[1, seq][..rank.min(2)]);
            }
        }
        let path = dir.path().join(format!("static{seq}.onnx"));
        wcc_ir::export::save(&m, &path, &Default::default()).unwrap();
        let out = dir.path().join(format!("static{seq}.shared.onnx"));
        let mut o = OptimizeOptions::new(path);
        o.output = Some(out);
        if let Backend::Ort { lib, .. } = ort() {
            o.exec.ort_lib = lib;
        }
        o.share = Some(atoms("all:3", "0", true));
        let r = wcc_driver::optimize(o, &mut |_| {})
            .unwrap_or_else(|e| panic!("{seq} rows: {e}"))
            .report;
        let kinds = details(&r)["kinds"].as_array().unwrap();
        assert_eq!(kinds.len(), 4, "{seq} rows: q, k, v, o");
        for k in kinds {
            assert_eq!(k["emission"], want, "{seq} rows: {k}");
            let c = &k["cost"];
            assert_eq!(c["rows"], seq, "{seq} rows: {k}");
            let (p, s) = (
                c["project_macs"].as_u64().unwrap(),
                c["synthesize_macs"].as_u64().unwrap(),
            );
            assert_eq!(p < s, want == "project", "{seq} rows: {c}");
        }
        let cos = r.verification.as_ref().expect("verified").outputs[0].cosine;
        assert!(cos > 0.9999, "{seq} rows: cosine {cos}");
    }
}
