//! Weight-only int4 (`--int4`: block-wise round-to-nearest emitted as ONNX Runtime's
//! MatMulNBits), judged against independent references: ONNX Runtime running the result against
//! a float model built here from the codes and scales, as MatMulNBits' documentation defines
//! them; tract running the same file; and the file's bytes against the report's.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use wcc_driver::{
    Gate, IntBits, IntMethod, IntOptions, OptimizeOptions, OptimizeReport, Scope, VqOptions,
};
use wcc_ir::{DataType, Graph, Model, Node, Tensor};
use wcc_runtime::{Backend, NamedArrays};

/// Fixtures from different exporters: MatMul (torch legacy and dynamo), Gemm with transB = 1
/// and a bias (ResNet's and GPT-2's classifier/projection), a ViT.
const STEMS: &[&str] = &[
    "bert.legacy",
    "gpt2.legacy",
    "llama.dynamo",
    "resnet.legacy",
    "vit.dynamo",
];

/// The fixtures whose int4 result tract 0.23.9 runs (see the test).
const TRACT_RUNS: &[&str] = &["llama.dynamo", "resnet.legacy"];

/// `stem` optimized by the driver into `dir` (`<stem>.<tag>.onnx`) under a loose gate (what is
/// tested here is the form, not the fidelity of a few bits on random-weight fixtures), `edit`
/// setting the rest; ONNX Runtime's library at hand, so `--backend auto` verifies there.
fn optimize(
    stem: &str,
    dir: &Path,
    tag: &str,
    min_cosine: f64,
    edit: impl FnOnce(&mut OptimizeOptions),
) -> (PathBuf, OptimizeReport) {
    let out = dir.join(format!("{stem}.{tag}.onnx"));
    let mut opts = OptimizeOptions::new(fixture_path(stem));
    opts.output = Some(out.clone());
    opts.gate = Gate {
        min_cosine: Some(min_cosine),
        max_rel_error: None,
    };
    if let Backend::Ort { lib, .. } = ort() {
        opts.exec.ort_lib = lib;
    }
    edit(&mut opts);
    match wcc_driver::optimize(opts, &mut |_| {}) {
        Ok(done) => (out, done.report),
        Err(e) => panic!("{stem}: {e}"),
    }
}

/// `--int4` (or `--int8`) through the driver; the fixtures' weights are small (32×32 and up): all
/// quantized.
fn int_n(stem: &str, dir: &Path, bits: IntBits) -> (PathBuf, OptimizeReport) {
    optimize(stem, dir, &format!("int{}", bits.bits()), 0.5, |o| {
        o.int = Some(IntOptions {
            bits,
            scope: every(true),
            ..IntOptions::default()
        })
    })
}

/// Calibration on the fixture's inputs, the gate on its held-out `alt` inputs.
fn calibrated(o: &mut OptimizeOptions, stem: &str) {
    o.calib = Some(models_dir().join(format!("{stem}.inputs.npz")));
    o.exec.inputs = Some(models_dir().join(format!("{stem}.alt.inputs.npz")));
}

fn int4_details(r: &OptimizeReport) -> &serde_json::Value {
    int_details(r, 4)
}

fn int_details(r: &OptimizeReport, bits: usize) -> &serde_json::Value {
    let pass = format!("weight-int{bits}");
    r.passes
        .iter()
        .find(|p| p.pass == pass)
        .and_then(|p| p.details.as_ref())
        .unwrap_or_else(|| panic!("{pass} ran"))
}

/// Code `i` of `codes` packed `bits` a code (4: two a byte, the low nibble first; 8: a byte).
fn code_at(codes: &[u8], i: usize, bits: usize) -> f32 {
    match bits {
        4 => {
            let byte = codes[i / 2];
            (if i.is_multiple_of(2) {
                byte & 15
            } else {
                byte >> 4
            }) as f32
                - 8.0
        }
        8 => codes[i] as f32 - 128.0,
        b => panic!("{b} bits"),
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_f64_vec().unwrap().iter().map(|v| *v as f32).collect()
}

/// The table a GatherBlockQuantized stands for, `[V, D]` row-major: row v, column d is
/// `(code − zero) · scale[v, d / block]`, the codes row-major packed as `code_at` reads them,
/// zero `2^(bits−1)`.
fn table_of(g: &Graph, n: &Node) -> (Vec<f32>, usize, usize) {
    assert_eq!(n.domain, "com.microsoft");
    let bits = n.attr_i("bits").unwrap() as usize;
    let b = n.attr_i("block_size").unwrap() as usize;
    let codes = g.initializer(&n.inputs[0]).unwrap();
    assert_eq!(codes.dtype().unwrap(), DataType::U8);
    let v = codes.dims()[0] as usize;
    let d = codes.dims()[1] as usize * 8 / bits;
    let codes = codes.raw_bytes().unwrap().to_vec();
    let scales = f32s(g.initializer(&n.inputs[2]).unwrap());
    assert_eq!(scales.len(), v * d.div_ceil(b));
    let table = (0..v * d)
        .map(|i| {
            let (r, c) = (i / d, i % d);
            code_at(&codes, i, bits) * scales[r * d.div_ceil(b) + c / b]
        })
        .collect();
    (table, v, d)
}

/// The weight a MatMulNBits stands for, `[K, N]` row-major: column n, row k is
/// `(code − zero) · scale[n, k / block]`, code number `(n·blocks + k/block)·block + k % block` as
/// `code_at` reads it (4 bits: byte `(n·blocks + k/block)·block/2 + (k % block)/2`, the low
/// nibble for even k), zero `2^(bits−1)`.
fn weight_of(g: &Graph, n: &Node) -> (Vec<f32>, usize, usize) {
    assert_eq!(n.domain, "com.microsoft");
    let (k, cols, b) = (
        n.attr_i("K").unwrap() as usize,
        n.attr_i("N").unwrap() as usize,
        n.attr_i("block_size").unwrap() as usize,
    );
    let bits = n.attr_i("bits").unwrap() as usize;
    let codes = g.initializer(&n.inputs[1]).unwrap();
    assert_eq!(codes.dtype().unwrap(), DataType::U8);
    let blocks = k.div_ceil(b);
    assert_eq!(
        codes.dims(),
        [cols as i64, blocks as i64, (b * bits / 8) as i64]
    );
    let codes = codes.raw_bytes().unwrap().to_vec();
    let scales = f32s(g.initializer(&n.inputs[2]).unwrap());
    assert_eq!(scales.len(), cols * blocks);
    assert!(
        n.inputs.get(3).is_none_or(|z| z.is_empty()),
        "no zero points"
    );
    let mut w = vec![0f32; k * cols];
    for c in 0..cols {
        for r in 0..k {
            let i = (c * blocks + r / b) * b + r % b;
            w[r * cols + c] = code_at(&codes, i, bits) * scales[c * blocks + r / b];
        }
    }
    (w, k, cols)
}

fn f32_tensor(name: &str, v: &[f32], dims: &[i64]) -> Tensor {
    let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Tensor::from_raw(name, DataType::F32, dims, raw).unwrap()
}

/// `m` with every MatMulNBits replaced by a MatMul on the weight it stands for (`weight_of`),
/// and every GatherBlockQuantized by a Gather on its table (`table_of`).
fn dequantized(m: &Model) -> Model {
    let mut m = m.clone();
    let g = &mut m.graph;
    let mut nodes = vec![];
    for n in std::mem::take(&mut g.nodes) {
        let x = n.inputs.first().cloned().unwrap_or_default();
        match n.op_type.as_str() {
            "GatherBlockQuantized" => {
                let (table, v, d) = table_of(g, &n);
                let name = format!("{}_dequantized", n.inputs[0]);
                g.initializers
                    .push(f32_tensor(&name, &table, &[v as i64, d as i64]));
                let ids = n.inputs[1].clone();
                nodes.push(Node::new(&n.name, "Gather", vec![name, ids], n.outputs));
            }
            "MatMulNBits" => {
                let (w, k, cols) = weight_of(g, &n);
                let name = format!("{}_dequantized", n.inputs[1]);
                g.initializers
                    .push(f32_tensor(&name, &w, &[k as i64, cols as i64]));
                let y = n.outputs[0].clone();
                match n.inputs.get(5).filter(|b| !b.is_empty()) {
                    Some(bias) => {
                        let mm = format!("{y}_mm");
                        nodes.push(Node::new(
                            &n.name,
                            "MatMul",
                            vec![x, name],
                            vec![mm.clone()],
                        ));
                        let add = format!("{}_bias", n.name);
                        nodes.push(Node::new(&add, "Add", vec![mm, bias.clone()], vec![y]));
                    }
                    None => nodes.push(Node::new(&n.name, "MatMul", vec![x, name], vec![y])),
                }
            }
            _ => nodes.push(n),
        }
    }
    g.nodes = nodes;
    m
}

/// Checks the weights a quantized node stands for against the float weights it replaced (in
/// `before`, the -O1 model): every value within its block's bound, `|m|/2^(bits−1)` for a block
/// whose largest magnitude is `|m|` (see the pass's doc), and the relative error the report
/// gives.
fn check_against_float(stem: &str, before: &Graph, after: &Graph, layer: &serde_json::Value) {
    let name = layer["weight"].as_str().unwrap();
    let node_name = layer["nodes"][0].as_str().unwrap();
    let node = after.nodes.iter().find(|n| n.name == node_name).unwrap();
    let orig = before.initializer(name).unwrap();
    let w0 = f32s(orig);
    // Both as [columns, K]: the unit the blocks run along.
    let (wq, cols, k) = match node.op_type.as_str() {
        "GatherBlockQuantized" => table_of(after, node),
        _ => {
            let (w, k, n) = weight_of(after, node);
            let t: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            (t, n, k)
        }
    };
    // The node it replaced read the float weight as [K, N] (MatMul, Gemm) or as [N, K] (Gemm
    // with transB = 1, Gather's table).
    let was = before.nodes.iter().find(|n| n.name == node_name).unwrap();
    let kn = was.op_type == "MatMul" || (was.op_type == "Gemm" && was.attr_i("transB") != Some(1));
    let w0: Vec<f32> = if kn {
        assert_eq!(orig.dims(), [k as i64, cols as i64]);
        (0..cols * k).map(|i| w0[(i % k) * cols + i / k]).collect()
    } else {
        assert_eq!(orig.dims(), [cols as i64, k as i64]);
        w0
    };
    let b = layer["block_size"].as_u64().unwrap() as usize;
    let levels = (1u32 << (node.attr_i("bits").unwrap() - 1)) as f32;
    let (mut err, mut norm) = (0f64, 0f64);
    for c in 0..cols {
        for blk in 0..k.div_ceil(b) {
            let range = c * k + blk * b..c * k + ((blk + 1) * b).min(k);
            let m = w0[range.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
            for i in range {
                let e = (w0[i] - wq[i]).abs();
                assert!(
                    e <= m / levels * 1.0001 + 1e-7,
                    "{stem} {name}: {e} > {m}/{levels}"
                );
                err += (e as f64).powi(2);
                norm += (w0[i] as f64).powi(2);
            }
        }
    }
    let rel = (err / norm).sqrt();
    let reported = layer["rel_error"].as_f64().unwrap();
    assert!(
        (rel - reported).abs() < 1e-4,
        "{stem} {name}: {rel} vs {reported}"
    );
    assert!(
        rel > 0.0 && rel < 0.2,
        "{stem} {name}: relative error {rel}"
    );
}

fn max_abs(a: &NamedArrays) -> f64 {
    a.iter()
        .flat_map(|(_, v)| v.to_f64_vec())
        .fold(0.0, |m, x| m.max(x.abs()))
}

fn max_diff(a: &NamedArrays, b: &NamedArrays) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            assert_eq!(va.shape(), vb.shape(), "{na}");
            va.to_f64_vec()
                .iter()
                .zip(vb.to_f64_vec())
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max)
        })
        .fold(0.0, f64::max)
}

#[test]
fn int4_results_run_as_onnx_runtime_computes_them_from_the_documented_layout() {
    layout_test(IntBits::Four);
}

#[test]
fn int8_results_run_as_onnx_runtime_computes_them_from_the_documented_layout() {
    layout_test(IntBits::Eight);
}

fn layout_test(bits: IntBits) {
    let dir = tempfile::tempdir().unwrap();
    let ort = ort();
    let nbits_of = bits.bits();
    for stem in STEMS {
        let (out, r) = int_n(stem, dir.path(), bits);
        let m = wcc_ir::import::load(&out).unwrap();
        let count = |op: &str| m.graph.nodes.iter().filter(|n| n.op_type == op).count();
        let nbits = count("MatMulNBits");
        // The language models' embedding tables: quantized, or left in float with the reason
        // (llama's rows are 48 wide, not a multiple of the block).
        let d = int_details(&r, nbits_of);
        assert_eq!(d["bits"], nbits_of.to_string());
        if ["bert", "gpt2", "llama"]
            .iter()
            .any(|p| stem.starts_with(p))
        {
            let skipped = d["skipped"].to_string();
            assert!(
                count("GatherBlockQuantized") >= 1 || skipped.contains("not a multiple of 32"),
                "{stem}: no table quantized ({skipped})"
            );
        }
        let layers = d["layers"].as_array().unwrap();
        assert!(
            nbits >= 1 && !layers.is_empty(),
            "{stem}: nothing quantized"
        );
        assert!(m
            .metadata(&format!("wcc.int{nbits_of}"))
            .is_some_and(|v| v.contains("bits per weight")));
        // The float weights that were replaced are gone from the file, and what stands for
        // them is within 4 bits' reach of them.
        let before = optimized(stem, wcc_passes::OptLevel::O1);
        for l in layers {
            let w = l["weight"].as_str().unwrap();
            assert!(m.graph.initializer(w).is_none(), "{stem}: {w} left behind");
            check_against_float(stem, &before.graph, &m.graph, l);
        }
        // The report's bytes are the file's: every MatMulNBits' and GatherBlockQuantized's codes
        // and scales.
        let mut file_bytes = 0u64;
        let mut seen = std::collections::HashSet::new();
        for n in &m.graph.nodes {
            let held = match n.op_type.as_str() {
                "MatMulNBits" => [&n.inputs[1], &n.inputs[2]],
                "GatherBlockQuantized" => [&n.inputs[0], &n.inputs[2]],
                _ => continue,
            };
            for t in held {
                if seen.insert(t.clone()) {
                    file_bytes += m.graph.initializer(t).unwrap().byte_size();
                }
            }
        }
        assert_eq!(d["bytes_after"].as_u64(), Some(file_bytes), "{stem}");
        let weights = d["weights"].as_u64().unwrap() as f64;
        let bpw = d["bits_per_weight"].as_f64().unwrap();
        assert!((bpw - 8.0 * file_bytes as f64 / weights).abs() < 1e-9);
        // What MatMulNBits holds: per column and block of 32, 32·bits/8 bytes of codes and an
        // f32 scale (a short last block is padded).
        let expected: u64 = layers
            .iter()
            .map(|l| {
                let (k, n) = (l["k"].as_u64().unwrap(), l["n"].as_u64().unwrap());
                n * k.div_ceil(32) * (32 * nbits_of as u64 / 8 + 4)
            })
            .sum();
        assert_eq!(file_bytes, expected, "{stem}");

        let inputs = inputs(stem, "inputs");
        let got = run(&ort, &m, &inputs).unwrap_or_else(|e| panic!("{stem} on ORT: {e}"));
        let want = run(&ort, &dequantized(&m), &inputs).unwrap();
        let scale = max_abs(&want).max(1.0);
        let d_ort = max_diff(&got, &want);
        assert!(
            d_ort <= 1e-4 * scale,
            "{stem}: MatMulNBits on ORT vs the dequantized float model: {d_ort} (max|y| {scale})"
        );
        // tract runs the same file and agrees (it keeps Q4_0 scales in f16, hence the looser
        // bound), except where tract 0.23.9 cannot: a MatMulNBits whose K comes from merging
        // attention heads 8 wide (these fixtures' head width; real models' 32, 64, 128 run).
        // tract 0.23.9 takes MatMulNBits and GatherBlockQuantized at 4 bits (and 2) only.
        match (run(&Backend::Tract, &m, &inputs), bits) {
            (Ok(tract), _) => {
                let d_tract = max_diff(&tract, &got);
                assert!(
                    d_tract <= 1e-3 * scale,
                    "{stem}: tract vs ORT on the int{nbits_of} model: {d_tract} (max|y| {scale})"
                );
                assert!(TRACT_RUNS.contains(stem), "{stem}: tract runs it now");
            }
            (Err(e), IntBits::Eight) => assert!(e.contains("only bits=4"), "{stem} on tract: {e}"),
            (Err(e), _) => assert!(
                !TRACT_RUNS.contains(stem) && e.contains("Invalid reshape"),
                "{stem} on tract: {e}"
            ),
        }
        // And the result is near the original, not merely runnable.
        let v = r.verification.as_ref().expect("verified");
        assert!(v
            .outputs
            .iter()
            .all(|o| o.cosine >= 0.5 && !o.bitwise_equal));
    }
}

#[test]
fn int4_output_is_deterministic_gated_and_refused_when_the_gate_fails() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_path("bert.legacy");
    let run_to = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let o = wcc()
            .args(["optimize", model.to_str().unwrap(), "--int4"])
            .args(["--int4-min-elements", "0", "-o"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        (out, o)
    };
    let (a, oa) = run_to("a.onnx", &["--min-cosine", "0.5"]);
    let (b, ob) = run_to("b.onnx", &["--min-cosine", "0.5"]);
    assert!(oa.status.success() && ob.status.success(), "{oa:?}");
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let stderr = String::from_utf8_lossy(&oa.stderr);
    assert!(stderr.contains("bits per weight"), "{stderr}");
    // Smaller than the input by about what the report says (protobuf framing aside).
    let before = std::fs::metadata(&model).unwrap().len();
    let after = std::fs::metadata(&a).unwrap().len();
    assert!(after < before, "{after} >= {before}");
    // A gate that 4 bits cannot keep: exit 1, no output.
    let (c, oc) = run_to("c.onnx", &["--min-cosine", "0.9999999"]);
    assert_eq!(oc.status.code(), Some(1), "{oc:?}");
    assert!(String::from_utf8_lossy(&oc.stderr).contains("fidelity gate failed"));
    assert!(!c.exists());
    // A block size MatMulNBits does not take: exit 2, no output.
    let (d, od) = run_to("d.onnx", &["--int4-block", "24"]);
    assert_eq!(od.status.code(), Some(2), "{od:?}");
    assert!(String::from_utf8_lossy(&od.stderr).contains("power of two"));
    assert!(!d.exists());
}

fn f32_proto(name: &str, dims: &[i64], v: &[f32]) -> onnx_protobuf::TensorProto {
    onnx_protobuf::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// Deterministic values in about [-1, 1], with a few larger ones (outliers a block must hold).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 33) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0;
            if i % 97 == 0 {
                4.0 * u
            } else {
                u
            }
        })
        .collect()
}

/// The float an int4 DequantizeLinear stands for: element i of `x` (row-major, two a byte, the
/// first in the low nibble, two's complement) times its block's scale, blocks of `b` along `axis`.
fn dequantize_linear(g: &Graph, n: &Node) -> Vec<f32> {
    let x = g.initializer(&n.inputs[0]).unwrap();
    assert_eq!(x.dtype().unwrap(), DataType::I4);
    let (rows, cols) = (x.dims()[0] as usize, x.dims()[1] as usize);
    let bytes = x.raw_bytes().unwrap().to_vec();
    assert_eq!(bytes.len(), (rows * cols).div_ceil(2));
    let scales = f32s(g.initializer(&n.inputs[1]).unwrap());
    let b = n.attr_i("block_size").unwrap() as usize;
    let axis = n.attr_i("axis").unwrap();
    assert!(
        n.inputs.get(2).is_none_or(|z| z.is_empty()),
        "symmetric: no zero point"
    );
    (0..rows * cols)
        .map(|i| {
            let byte = bytes[i / 2];
            let nib = if i % 2 == 0 { byte & 15 } else { byte >> 4 };
            let q = if nib >= 8 {
                nib as i32 - 16
            } else {
                nib as i32
            };
            let (r, c) = (i / cols, i % cols);
            let s = if axis == 0 {
                scales[(r / b) * cols + c]
            } else {
                scales[r * cols.div_ceil(b) + c / b]
            };
            q as f32 * s
        })
        .collect()
}

#[test]
fn at_opset_21_int4_is_standard_dequantize_linear_that_onnx_runtime_runs() {
    let dir = tempfile::tempdir().unwrap();
    // x [4, 80] -> MatMul W1 [80, 96] (K = 80: a short last block) -> Relu
    //   -> Gemm(W2 [10, 96], transB = 1, C [10]) -> y [4, 10]
    let (w1, w2, c) = (values(80 * 96, 1), values(10 * 96, 2), values(10, 3));
    let mut gemm = simple_node("Gemm", &["h", "w2", "c"], "y");
    gemm.attribute.push(onnx_protobuf::AttributeProto {
        name: "transB".into(),
        i: 1,
        type_: protobuf::EnumOrUnknown::new(onnx_protobuf::attribute_proto::AttributeType::INT),
        ..Default::default()
    });
    let mut mp = model17(
        vec![
            simple_node("MatMul", &["x", "w1"], "a"),
            simple_node("Relu", &["a"], "h"),
            gemm,
        ],
        vec![
            f32_proto("w1", &[80, 96], &w1),
            f32_proto("w2", &[10, 96], &w2),
            f32_proto("c", &[10], &c),
        ],
        vec![vi("x", 1, &[4, 80])],
        vec![vi("y", 1, &[4, 10])],
    );
    mp.ir_version = 10;
    mp.opset_import[0].version = 21;
    let src = dir.path().join("mlp21.onnx");
    std::fs::write(&src, protobuf::Message::write_to_bytes(&mp).unwrap()).unwrap();
    let out = dir.path().join("mlp21.int4.onnx");
    let report = dir.path().join("r.json");
    let o = wcc()
        .args([
            "optimize",
            src.to_str().unwrap(),
            "--int4",
            "--int4-min-elements",
            "0",
        ])
        .args([
            "--min-cosine",
            "0.9",
            "--report",
            report.to_str().unwrap(),
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    // Verified where it runs: tract has no int4 tensors.
    assert!(
        r["verification"]["backend"]
            .as_str()
            .unwrap()
            .starts_with("onnxruntime"),
        "{}",
        r["verification"]
    );
    let d = r["passes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pass"] == "weight-int4")
        .unwrap()["details"]
        .clone();
    assert_eq!(d["form"], "DequantizeLinear");
    let m = wcc_ir::import::load(&out).unwrap();
    let g = &m.graph;
    assert!(g.initializer("w1").is_none() && g.initializer("w2").is_none());
    let dqs: Vec<&Node> = g
        .nodes
        .iter()
        .filter(|n| n.is("DequantizeLinear"))
        .collect();
    assert_eq!(dqs.len(), 2);
    assert!(
        g.nodes.iter().all(|n| n.domain.is_empty()),
        "standard ONNX only"
    );
    // Each dequantized weight is within its block's |m|/8 of the float one, blocks along K.
    let mut file_bytes = 0;
    for dq in &dqs {
        let x = g.initializer(&dq.inputs[0]).unwrap();
        file_bytes += x.byte_size() + g.initializer(&dq.inputs[1]).unwrap().byte_size();
        let (orig, k_axis) = if x.dims() == [80, 96] {
            (&w1, 0)
        } else {
            (&w2, 1)
        };
        assert_eq!(dq.attr_i("axis"), Some(k_axis));
        let (rows, cols) = (x.dims()[0] as usize, x.dims()[1] as usize);
        let w = dequantize_linear(g, dq);
        for i in 0..rows * cols {
            let (r, c) = (i / cols, i % cols);
            let block: Vec<f32> = if k_axis == 0 {
                (r / 32 * 32..(r / 32 * 32 + 32).min(rows))
                    .map(|rr| orig[rr * cols + c])
                    .collect()
            } else {
                (c / 32 * 32..(c / 32 * 32 + 32).min(cols))
                    .map(|cc| orig[r * cols + cc])
                    .collect()
            };
            let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((orig[i] - w[i]).abs() <= m / 8.0 * 1.0001 + 1e-7, "{i}");
        }
    }
    assert_eq!(d["bytes_after"].as_u64(), Some(file_bytes));
    // 80·96 and 10·96 values: 4 bits each plus an f32 scale per 32.
    let weights = (80 * 96 + 10 * 96) as f64;
    let expected = (80 * 96 + 10 * 96) / 2 + 4 * (3 * 96 + 10 * 3);
    assert_eq!(file_bytes, expected as u64);
    assert!(
        (d["bits_per_weight"].as_f64().unwrap() - 8.0 * expected as f64 / weights).abs() < 1e-9
    );
    // ONNX Runtime runs it as a float model with those weights computes it.
    let mut float = m.clone();
    for dq in &dqs {
        let w = dequantize_linear(&m.graph, dq);
        let x = m.graph.initializer(&dq.inputs[0]).unwrap();
        float.graph.nodes.retain(|n| n.name != dq.name);
        float
            .graph
            .initializers
            .push(f32_tensor(&dq.outputs[0], &w, x.dims()));
    }
    let x: NamedArrays = vec![(
        "x".to_string(),
        wcc_ir::eval::Array::F32(
            ndarray::ArrayD::from_shape_vec(vec![4, 80], values(320, 9)).unwrap(),
        ),
    )];
    let got = run(&ort(), &m, &x).unwrap();
    let want = run(&ort(), &float, &x).unwrap();
    assert!(max_diff(&got, &want) <= 1e-5 * max_abs(&want).max(1.0));
    // Asked for at a lower opset, the form is refused, not converted: exit 2, no output.
    let o = wcc()
        .args(["optimize", fixture_path("bert.legacy").to_str().unwrap()])
        .args(["--int4", "--int4-form", "dq", "-o"])
        .arg(dir.path().join("no.onnx"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs opset 21"));
    assert!(!dir.path().join("no.onnx").exists());
    // --target decides the form the user left to it: ONNX Runtime's MatMulNBits for ort-cpu and
    // ort-cuda, DequantizeLinear for tensorrt (which refuses MatMulNBits, and needs opset 21).
    for (target, form, extra) in [
        ("ort-cuda", "MatMulNBits, GatherBlockQuantized", None),
        ("ort-cpu", "MatMulNBits, GatherBlockQuantized", None),
        ("tensorrt", "DequantizeLinear", None),
        ("ort-cuda", "DequantizeLinear", Some("dq")),
    ] {
        let (out, rep) = (dir.path().join("t.onnx"), dir.path().join("t.json"));
        let o = wcc()
            .args([
                "optimize",
                src.to_str().unwrap(),
                "--int4",
                "--target",
                target,
            ])
            .args(extra.map(|f| vec!["--int4-form", f]).unwrap_or_default())
            .args([
                "--quant-min-elements",
                "0",
                "--min-cosine",
                "0.9",
                "--report",
            ])
            .arg(&rep)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{target}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
        assert_eq!(r["target"], target);
        let d = r["passes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pass"] == "weight-int4")
            .unwrap();
        assert_eq!(d["details"]["form"], form, "{target}");
    }
    for (model, args, says) in [
        (&src, vec!["--int4-form", "nbits"], "standard ONNX only"),
        (&fixture_path("bert.legacy"), vec![], "needs opset 21"),
        (
            &fixture_path("bert.legacy"),
            vec!["-O", "compress"],
            "needs opset 21",
        ),
    ] {
        let o = wcc()
            .args(["optimize", model.to_str().unwrap(), "--target", "tensorrt"])
            .args(if args.first() == Some(&"-O") {
                args.clone()
            } else {
                [vec!["--int4"], args.clone()].concat()
            })
            .arg("-o")
            .arg(dir.path().join("no.onnx"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("--target tensorrt") && err.contains(says),
            "{err}"
        );
        assert!(!dir.path().join("no.onnx").exists());
    }
}

/// `--int4` with `method`, calibrated, on ONNX Runtime.
fn int4_calibrated(
    stem: &str,
    dir: &Path,
    method: IntMethod,
    tag: &str,
) -> (PathBuf, OptimizeReport) {
    optimize(stem, dir, tag, 0.5, |o| {
        o.int = Some(IntOptions {
            scope: every(true),
            method,
            ..IntOptions::default()
        });
        calibrated(o, stem);
        o.exec.backend = wcc_driver::BackendChoice::Ort;
    })
}

#[test]
fn gptq_beats_round_to_nearest_on_every_layers_calibration_outputs() {
    let dir = tempfile::tempdir().unwrap();
    for stem in ["bert.legacy", "gpt2.legacy", "llama.dynamo"] {
        let (_, rtn) = int4_calibrated(stem, dir.path(), IntMethod::Rtn, "rtn");
        let (a, gptq) = int4_calibrated(stem, dir.path(), IntMethod::Gptq, "gptq");
        let (b, _) = int4_calibrated(stem, dir.path(), IntMethod::Gptq, "gptq2");
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{stem}: deterministic"
        );
        let (dr, dg) = (int4_details(&rtn), int4_details(&gptq));
        assert_eq!(dg["method"], "gptq");
        assert!(dg["calibration"]
            .as_str()
            .unwrap()
            .contains(&format!("{stem}.inputs.npz")));
        let (lr, lg) = (
            dr["layers"].as_array().unwrap(),
            dg["layers"].as_array().unwrap(),
        );
        assert_eq!(lr.len(), lg.len());
        let mut compared = 0;
        for (r, g) in lr.iter().zip(lg) {
            assert_eq!(r["weight"], g["weight"]);
            // Tables (no calibration input multiplies them) stay round-to-nearest.
            if g["method"] == "rtn" {
                assert!(g.get("output_rel_error").is_none());
                continue;
            }
            let (er, eg) = (
                r["output_rel_error"].as_f64().unwrap(),
                g["output_rel_error"].as_f64().unwrap(),
            );
            assert!(eg < er, "{stem} {}: gptq {eg} vs rtn {er}", g["weight"]);
            compared += 1;
        }
        assert!(compared >= 5, "{stem}: {compared} layers compared");
        // The gate was checked on the held-out inputs, not the calibration ones.
        let v = gptq.verification.as_ref().unwrap();
        assert!(
            v.inputs.contains(&format!("{stem}.alt.inputs.npz")),
            "{}",
            v.inputs
        );
        // And what GPTQ wrote still runs on ONNX Runtime as the documented layout says.
        let m = wcc_ir::import::load(&a).unwrap();
        let inputs = inputs(stem, "alt.inputs");
        let got = run(&ort(), &m, &inputs).unwrap();
        let want = run(&ort(), &dequantized(&m), &inputs).unwrap();
        assert!(
            max_diff(&got, &want) <= 1e-4 * max_abs(&want).max(1.0),
            "{stem}"
        );
    }
}

/// `--vq-bits` with small codebooks (the fixtures' layers are small), gated on the held-out
/// inputs; with `calib`, calibrated on the fixture's inputs.
fn vq(stem: &str, dir: &Path, calib: bool, tag: &str) -> (PathBuf, OptimizeReport) {
    optimize(stem, dir, tag, 0.3, |o| {
        o.vq = Some(VqOptions {
            vector: 4,
            centroids: 16,
            scope: every(false),
            ..VqOptions::default()
        });
        calibrated(o, stem);
        if !calib {
            o.calib = None;
        }
    })
}

fn vq_details(r: &OptimizeReport) -> &serde_json::Value {
    r.passes
        .iter()
        .find(|p| p.pass == "weight-vq")
        .and_then(|p| p.details.as_ref())
        .expect("weight-vq ran")
}

/// Bytes of the 4-bit codes of a `k × n` weight in vectors of 4: two a byte when a row's `n/4`
/// codes are even, else a byte each.
fn codes_bytes(k: u64, n: u64) -> u64 {
    if (n / 4).is_multiple_of(2) {
        k * n / 8
    } else {
        k * n / 4
    }
}

/// The codes of `t` (`[rows, per]` uint8), and `per`; `packed`: two 4-bit codes a byte, a row's
/// first half in the low nibbles and its second half in the high ones (`[rows, per/2]`).
fn codes_of(t: &Tensor, packed: bool) -> (Vec<u8>, usize) {
    let raw = t.raw_bytes().unwrap().to_vec();
    if !packed {
        return (raw, t.dims()[1] as usize);
    }
    let h = t.dims()[1] as usize;
    let codes = raw
        .chunks_exact(h)
        .flat_map(|row| {
            let lo = row.iter().map(|b| b & 15);
            lo.chain(row.iter().map(|b| b >> 4)).collect::<Vec<_>>()
        })
        .collect();
    (codes, 2 * h)
}

/// `m` with every decoded weight replaced by the float weight it stands for, decoded here:
/// per codebook `Cast → Gather(codebook)`, summed by an `Add` when there are two (residual),
/// `→ Reshape` (`W[q, j·v + t] = Σ codebook[idx[q, j], t]`), then, normalized, `Mul(scale [K, 1])
/// → Add(shift [K, 1])`. Returns the model and the bytes the indices, codebooks and norms take.
fn vq_decoded(m: &Model) -> (Model, u64) {
    vq_decoded_telling(m).0
}

/// `vq_decoded`, and whether some codes were packed.
fn vq_decoded_telling(m: &Model) -> ((Model, u64), bool) {
    let mut any_packed = false;
    let mut out = m.clone();
    let g = &m.graph;
    let mut bytes = 0;
    let producer = |name: &str| g.nodes.iter().find(|n| n.outputs[0] == name).unwrap();
    for r in g
        .nodes
        .iter()
        .filter(|n| n.is("Reshape") && n.outputs[0].ends_with("_vq"))
    {
        let mut decoding = vec![r.name.clone()];
        let top = producer(&r.inputs[0]);
        let gathers: Vec<&Node> = if top.is("Add") {
            decoding.push(top.name.clone());
            top.inputs.iter().map(|i| producer(i)).collect()
        } else {
            vec![top]
        };
        let mut w: Vec<f32> = vec![];
        let (mut k, mut width) = (0, 0);
        for gather in gathers {
            assert!(gather.is("Gather"));
            let cast = producer(&gather.inputs[1]);
            assert!(cast.is("Cast"));
            // The codes: an initializer, or 4-bit codes packed two a byte and unpacked by
            // `Concat(BitShift(BitShift(p, 4, LEFT), 4, RIGHT), BitShift(p, 4, RIGHT))`.
            let (idx, packed) = match g.initializer(&cast.inputs[0]) {
                Some(t) => (t, false),
                None => {
                    let cat = producer(&cast.inputs[0]);
                    assert!(cat.is("Concat"));
                    let (lo, hi) = (producer(&cat.inputs[0]), producer(&cat.inputs[1]));
                    let up = producer(&lo.inputs[0]);
                    assert!([lo, hi, up].iter().all(|n| n.is("BitShift")));
                    assert_eq!(up.inputs[0], hi.inputs[0]);
                    decoding.extend([&cat.name, &lo.name, &hi.name, &up.name].map(String::from));
                    any_packed = true;
                    (g.initializer(&hi.inputs[0]).unwrap(), true)
                }
            };
            let book = g.initializer(&gather.inputs[0]).unwrap();
            assert_eq!(idx.dtype().unwrap(), DataType::U8);
            bytes += idx.byte_size() + book.byte_size();
            k = idx.dims()[0] as usize;
            let v = book.dims()[1] as usize;
            let (ids, per) = codes_of(idx, packed);
            width = per * v;
            let cb = f32s(book);
            w.resize(k * width, 0.0);
            for q in 0..k {
                for j in 0..per {
                    for t in 0..v {
                        w[q * width + j * v + t] += cb[ids[q * per + j] as usize * v + t];
                    }
                }
            }
            decoding.extend([cast.name.clone(), gather.name.clone()]);
        }
        // The norms, when normalized: scale then shift, a value per input column q.
        let mut name = r.outputs[0].clone();
        while let Some(n) = g.nodes.iter().find(|n| {
            n.inputs[0] == name && (n.is("Mul") || n.is("Add")) && n.outputs[0].contains("_vq_")
        }) {
            let p = g.initializer(&n.inputs[1]).unwrap();
            assert_eq!(p.dims(), [k as i64, 1]);
            bytes += p.byte_size();
            let p = f32s(p);
            for (i, x) in w.iter_mut().enumerate() {
                *x = if n.is("Mul") {
                    *x * p[i / width]
                } else {
                    *x + p[i / width]
                };
            }
            decoding.push(n.name.clone());
            name = n.outputs[0].clone();
        }
        out.graph.nodes.retain(|n| !decoding.contains(&n.name));
        out.graph
            .initializers
            .push(f32_tensor(&name, &w, &[k as i64, width as i64]));
    }
    ((out, bytes), any_packed)
}

#[test]
fn vq_refinements_run_as_decoded_and_a_residual_codebook_lowers_the_error() {
    let dir = tempfile::tempdir().unwrap();
    for stem in ["bert.legacy", "gpt2.legacy", "llama.dynamo"] {
        let (_, plain) = vq(stem, dir.path(), true, "vq-p");
        let plain = vq_details(&plain)["layers"].as_array().unwrap().clone();
        for (tag, edit) in [
            ("vq-n", (false, true, 0.0)),
            ("vq-o", (false, false, 0.1)),
            ("vq-r", (true, false, 0.0)),
            ("vq-all", (true, true, 0.1)),
        ] {
            // The form is tested here, not the fidelity of 16 centroids: no gate to speak of.
            let (out, r) = optimize(stem, dir.path(), tag, -1.0, |o| {
                o.vq = Some(VqOptions {
                    vector: 4,
                    centroids: 16,
                    scope: every(false),
                    residual: edit.0,
                    normalize: edit.1,
                    outliers: edit.2,
                    ..VqOptions::default()
                });
                calibrated(o, stem);
            });
            let d = vq_details(&r);
            let layers = d["layers"].as_array().unwrap();
            let m = wcc_ir::import::load(&out).unwrap();
            let (float, bytes) = vq_decoded(&m);
            assert_eq!(d["bytes_after"].as_u64(), Some(bytes), "{stem} {tag}");
            for (l, p) in layers.iter().zip(&plain) {
                assert_eq!(l["weight"], p["weight"]);
                assert_eq!(l["residual"], edit.0);
                assert_eq!(l["normalized"], edit.1);
                let k = l["k"].as_f64().unwrap();
                assert_eq!(
                    l["outlier_columns"].as_u64().unwrap(),
                    (edit.2 * k).ceil() as u64,
                    "{stem} {tag}"
                );
                // Indices, codebooks (16 centroids of 4 f32 each), norms: the reported bytes.
                let (kk, n) = (l["k"].as_u64().unwrap(), l["n"].as_u64().unwrap());
                let books = if edit.0 { 2 } else { 1 };
                let norms = if edit.1 { 2 * kk * 4 } else { 0 };
                assert_eq!(
                    l["bytes_after"].as_u64().unwrap(),
                    books * (codes_bytes(kk, n) + 16 * 4 * 4) + norms,
                    "{stem} {tag}"
                );
                // A second codebook for what the first leaves: a lower weight error.
                if edit == (true, false, 0.0) {
                    assert!(
                        l["rel_error"].as_f64().unwrap() < p["rel_error"].as_f64().unwrap(),
                        "{stem} {}",
                        l["weight"]
                    );
                }
            }
            runs_as_decoded(&format!("{stem} {tag}"), stem, &m, &float);
        }
    }
}

/// ONNX Runtime and tract run `m` as `float` (its weights decoded here) computes, on `stem`'s
/// `alt` inputs.
fn runs_as_decoded(what: &str, stem: &str, m: &Model, float: &Model) {
    let inputs = inputs(stem, "alt.inputs");
    let want = run(&ort(), float, &inputs).unwrap();
    let scale = max_abs(&want).max(1.0);
    for backend in [ort(), Backend::Tract] {
        let got = run(&backend, m, &inputs).unwrap_or_else(|e| panic!("{what}: {e}"));
        let diff = max_diff(&got, &want);
        assert!(
            diff <= 1e-4 * scale,
            "{what} on {}: {diff}",
            backend.label()
        );
    }
}

#[test]
fn vq_codebooks_run_as_decoded_and_error_feedback_beats_nearest_centroids() {
    let dir = tempfile::tempdir().unwrap();
    for stem in ["bert.legacy", "gpt2.legacy", "llama.dynamo", "vit.dynamo"] {
        let (a, plain) = vq(stem, dir.path(), false, "vq");
        let (b, _) = vq(stem, dir.path(), false, "vq2");
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{stem}: deterministic"
        );
        let d = vq_details(&plain);
        assert_eq!(d["mode"], "k-means");
        let layers = d["layers"].as_array().unwrap();
        assert!(layers.len() >= 4, "{stem}: {} layers", layers.len());
        let m = wcc_ir::import::load(&a).unwrap();
        assert!(m
            .metadata("wcc.vq")
            .is_some_and(|v| v.contains("ConstantFolding")));
        for l in layers {
            assert!(m.graph.initializer(l["weight"].as_str().unwrap()).is_none());
        }
        // The report's bytes are the file's: 4-bit indices (16 centroids), one per 4 weights,
        // packed two a byte, and 16 f32 centroids of 4 per layer.
        let ((float, bytes), packed) = vq_decoded_telling(&m);
        assert!(packed, "{stem}: 16 centroids pack their codes");
        assert_eq!(d["bytes_after"].as_u64(), Some(bytes), "{stem}");
        let expected: u64 = layers
            .iter()
            .map(|l| codes_bytes(l["k"].as_u64().unwrap(), l["n"].as_u64().unwrap()) + 16 * 4 * 4)
            .sum();
        assert_eq!(bytes, expected, "{stem}");
        // ONNX Runtime and tract compute what the decoded weights say.
        runs_as_decoded(stem, stem, &m, &float);
        // Calibrated: Hessian-weighted codebooks and GPTQ's assignment, whose output error on
        // the calibration data is below that of mapping each vector to its nearest centroid.
        let (_, cal) = vq(stem, dir.path(), true, "vq-cal");
        let d = vq_details(&cal);
        assert_eq!(d["mode"], "hessian-weighted k-means + gptq");
        for l in d["layers"].as_array().unwrap() {
            let (e, e0) = (
                l["output_rel_error"].as_f64().unwrap(),
                l["output_rel_error_nearest"].as_f64().unwrap(),
            );
            assert!(
                e < e0,
                "{stem} {}: feedback {e} vs nearest {e0}",
                l["weight"]
            );
        }
    }
}

#[test]
fn vq_bits_mix_vector_lengths_to_meet_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut mixed = vec![];
    for stem in ["bert.legacy", "gpt2.legacy", "llama.dynamo"] {
        let (out, r) = optimize(stem, dir.path(), "vqb", -1.0, |o| {
            o.vq = Some(VqOptions {
                centroids: 16,
                scope: every(false),
                ..VqOptions::for_bits(3.0).unwrap()
            });
        });
        let d = vq_details(&r);
        assert_eq!(d["budget_bits"].as_f64(), Some(3.0));
        let layers = d["layers"].as_array().unwrap();
        let weights: u64 = layers
            .iter()
            .map(|l| l["k"].as_u64().unwrap() * l["n"].as_u64().unwrap())
            .sum();
        // The file's bytes (indices, codebooks) are the report's, and within the budget unless
        // the report says even the longest vectors are above it.
        let m = wcc_ir::import::load(&out).unwrap();
        let (float, bytes) = vq_decoded(&m);
        assert_eq!(d["bytes_after"].as_u64(), Some(bytes), "{stem}");
        let bits = 8.0 * bytes as f64 / weights as f64;
        assert!(
            bits <= 3.0 || d["budget_note"].is_string(),
            "{stem}: {bits} bits"
        );
        let lengths: std::collections::BTreeSet<u64> = layers
            .iter()
            .map(|l| l["vector"].as_u64().unwrap())
            .collect();
        if lengths.len() > 1 && bits <= 3.0 {
            mixed.push(stem);
        }
        runs_as_decoded(stem, stem, &m, &float);
    }
    // Somewhere the budget falls between two lengths and both are used.
    assert!(!mixed.is_empty());
}

#[test]
fn name_patterns_choose_the_weights_every_quantizer_and_the_planner_take() {
    let dir = tempfile::tempdir().unwrap();
    let names = wcc_driver::NameFilter::new(
        &["*/intermediate/*".into(), "*/output/dense/*".into()],
        &["*layer.1*".into()],
    )
    .unwrap();
    // bert.legacy's node names, as torch's exporter writes them: layer 0's three.
    let want = [
        "/encoder/layer.0/attention/output/dense/MatMul",
        "/encoder/layer.0/intermediate/dense/MatMul",
        "/encoder/layer.0/output/dense/MatMul",
    ];
    let nodes = |d: &serde_json::Value| {
        let mut v: Vec<String> = d["layers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|l| l["nodes"].as_array().unwrap().clone())
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let (_, r) = optimize("bert.legacy", dir.path(), "names-int4", -1.0, |o| {
        o.int = Some(IntOptions {
            scope: Scope {
                names: names.clone(),
                ..every(true)
            },
            ..IntOptions::default()
        });
    });
    let d = int4_details(&r);
    assert_eq!(nodes(d), want);
    assert_eq!(
        d["names"],
        "include */intermediate/*, */output/dense/*; exclude *layer.1*"
    );
    let (_, r) = optimize("bert.legacy", dir.path(), "names-vq", -1.0, |o| {
        o.vq = Some(VqOptions {
            vector: 4,
            centroids: 16,
            scope: Scope {
                names: names.clone(),
                ..every(false)
            },
            ..VqOptions::default()
        });
    });
    assert_eq!(nodes(vq_details(&r)), want);
    // The planner plans only those weights.
    let (_, r) = compressed("bert.legacy", dir.path(), "names-c", |o| {
        o.quant_scope.names = names.clone();
    })
    .unwrap();
    let planned: Vec<&str> = r
        .plan
        .as_ref()
        .unwrap()
        .weights
        .iter()
        .map(|w| w.weight.as_str())
        .collect();
    assert_eq!(planned.len(), 3, "{planned:?}");
    let (_, all) = compressed("bert.legacy", dir.path(), "all-c", |_| {}).unwrap();
    assert!(all.plan.as_ref().unwrap().weights.len() > 3);
}

/// The groups and most MB of a report's `statistics` line.
fn groups_of(line: &str) -> (usize, f64) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = |w: &str| words.iter().position(|x| *x == w).unwrap();
    (
        words[at("in") + 1].parse().unwrap(),
        words[at("most") + 1].parse().unwrap(),
    )
}

#[test]
fn calibration_statistics_past_the_memory_cap_are_gathered_group_by_group() {
    let dir = tempfile::tempdir().unwrap();
    for stem in ["gpt2.legacy", "llama.dynamo"] {
        // (16 centroids are a form test, not a fidelity one: no gate for VQ.)
        let run = |tag: &str, cap: u64, vq: bool| {
            optimize(stem, dir.path(), tag, if vq { -1.0 } else { 0.5 }, |o| {
                if vq {
                    o.vq = Some(VqOptions {
                        vector: 4,
                        centroids: 16,
                        scope: every(false),
                        ..VqOptions::default()
                    });
                } else {
                    o.int = Some(IntOptions {
                        method: IntMethod::Gptq,
                        scope: every(true),
                        ..IntOptions::default()
                    });
                }
                calibrated(o, stem);
                o.calib_memory_bytes = cap;
            })
        };
        for vq in [false, true] {
            let details = |r: &OptimizeReport| {
                let d = if vq { vq_details(r) } else { int4_details(r) };
                d.clone()
            };
            let (whole_out, whole) = run(&format!("w{vq}"), u64::MAX, vq);
            let (a, streamed) = run(&format!("s{vq}"), 1, vq);
            let (b, _) = run(&format!("s2{vq}"), 1, vq);
            let (dw, ds) = (details(&whole), details(&streamed));
            // All at once: one group; capped at a byte: a group per weight, each calibrated on
            // the model as the earlier ones left it; the same weights either way.
            assert!(dw["statistics"]
                .as_str()
                .unwrap()
                .starts_with("gathered in 1 groups"));
            let layers = dw["layers"].as_array().unwrap().len();
            assert!(layers >= 4, "{stem}");
            // (Tables, which no calibration input multiplies, need no statistics.)
            let calibrated = dw["layers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|l| l["output_rel_error"].is_number())
                .count();
            // A group per weight, but for weights that share their input with the one before
            // (the same statistics, no more memory): more than one, at most one per weight
            // calibrated, each smaller than all of them at once.
            let (groups, most) = groups_of(ds["statistics"].as_str().unwrap());
            let (_, all) = groups_of(dw["statistics"].as_str().unwrap());
            assert!(
                groups > 1 && groups <= calibrated,
                "{stem}: {}",
                ds["statistics"]
            );
            assert!(most < all, "{stem}: {most} vs {all} MB");
            assert_eq!(ds["layers"].as_array().unwrap().len(), layers);
            assert_eq!(
                std::fs::read(&a).unwrap(),
                std::fs::read(&b).unwrap(),
                "{stem}"
            );
            assert_ne!(
                std::fs::read(&a).unwrap(),
                std::fs::read(&whole_out).unwrap(),
                "{stem}"
            );
            // Verified by the driver on the result (int4: gated at min cosine 0.5).
            assert!(streamed.verification.is_some());
        }
    }
}

/// `-O compress` on `stem`'s default (random) calibration, every weight a candidate.
fn compressed(
    stem: &str,
    dir: &Path,
    tag: &str,
    edit: impl FnOnce(&mut OptimizeOptions),
) -> Result<(PathBuf, OptimizeReport), wcc_driver::Error> {
    let out = dir.join(format!("{stem}.{tag}.onnx"));
    let mut opts = OptimizeOptions::new(fixture_path(stem));
    opts.output = Some(out.clone());
    opts.level = wcc_driver::Level::Compress;
    opts.quant_scope.min_elements = 0;
    if let Backend::Ort { lib, .. } = ort() {
        opts.exec.ort_lib = lib;
    }
    edit(&mut opts);
    wcc_driver::optimize(opts, &mut |_| {}).map(|d| (out, d.report))
}

/// The cosine of every output of `m` against `original`'s on `stem`'s own inputs and its `alt`
/// ones (neither seen by the planner, which calibrated on random batches), on ONNX Runtime.
fn cosines_on_fixture_inputs(stem: &str, m: &Model) -> Vec<f64> {
    let ort = ort();
    let original = wcc_ir::import::load(&fixture_path(stem)).unwrap();
    let mut out = vec![];
    for which in ["inputs", "alt.inputs"] {
        let x = inputs(stem, which);
        let (a, b) = (run(&ort, &original, &x).unwrap(), run(&ort, m, &x).unwrap());
        for f in wcc_runtime::compare_outputs(&a, &b).unwrap() {
            out.push(f.cosine);
        }
    }
    out
}

#[test]
fn o_compress_plans_each_weight_and_keeps_the_gate_on_inputs_it_did_not_see() {
    let dir = tempfile::tempdir().unwrap();
    for stem in ["bert.legacy", "gpt2.legacy", "llama.legacy"] {
        let (out, r) = compressed(stem, dir.path(), "c", |_| {}).unwrap_or_else(|e| panic!("{e}"));
        let p = r.plan.as_ref().expect("planned");
        let at = p.chosen_try.expect("a plan was kept");
        let kept = &p.tries[at];
        assert!(
            kept.passed && kept.measured_share <= wcc_driver::planner::KEEP,
            "{kept:?}"
        );
        // Every try's estimate kept to its budget, and a kept plan's estimate was near what was
        // measured (the share model of the planner's doc: within a factor of two here).
        for t in &p.tries {
            assert!(t.estimated_share <= t.budget.unwrap() + 1e-12, "{t:?}");
        }
        let ratio = kept.measured_share / kept.estimated_share;
        assert!((0.5..2.0).contains(&ratio), "{stem}: {kept:?}");
        // Smaller, and the report's bytes are the file's.
        let m = wcc_ir::import::load(&out).unwrap();
        assert_eq!(p.bytes_after, wcc_ir::export::tensor_bytes(&m), "{stem}");
        assert!(
            p.bytes_after * 2 < p.bytes_before,
            "{stem}: {}",
            p.bytes_after
        );
        // What was chosen is what the file holds: quantized weights gone, float ones kept; both
        // int8 and int4 were used.
        for w in &p.weights {
            let present = m.graph.initializer(&w.weight).is_some();
            assert_eq!(
                present,
                w.chosen == wcc_driver::planner::Treatment::Float,
                "{stem}: {w:?}"
            );
        }
        assert!(
            kept.counts
                .contains_key(&wcc_driver::planner::Treatment::Int4),
            "{kept:?}"
        );
        // On inputs the planner never saw, the result stays near the original.
        let cos = cosines_on_fixture_inputs(stem, &m);
        assert!(cos.iter().all(|c| *c >= 0.985), "{stem}: {cos:?}");
        let v = r.verification.as_ref().unwrap();
        assert_eq!(v.backend, "onnxruntime/cpu");
        assert!(v.outputs.iter().all(|o| o.cosine >= 0.99));
    }
    // The same input and flags give the same bytes.
    let (a, _) = compressed("gpt2.legacy", dir.path(), "a", |_| {}).unwrap();
    let (b, _) = compressed("gpt2.legacy", dir.path(), "b", |_| {}).unwrap();
    assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
}

#[test]
fn target_size_plans_the_most_faithful_model_that_fits_or_refuses() {
    use wcc_driver::planner::TargetSize;
    let dir = tempfile::tempdir().unwrap();
    let stem = "llama.legacy";
    let (out, r) = compressed(stem, dir.path(), "t", |o| {
        o.target_size = Some(TargetSize::Percent(40.0));
        o.gate.min_cosine = Some(0.9);
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let p = r.plan.as_ref().unwrap();
    assert!(
        p.objective.starts_with("most faithful within"),
        "{}",
        p.objective
    );
    let m = wcc_ir::import::load(&out).unwrap();
    let original = wcc_ir::import::load(&fixture_path(stem)).unwrap();
    let limit = wcc_ir::export::tensor_bytes(&original) * 40 / 100;
    assert!(wcc_ir::export::tensor_bytes(&m) <= limit);
    // A looser size is at least as faithful.
    let (_, r2) = compressed(stem, dir.path(), "t2", |o| {
        o.target_size = Some(TargetSize::Percent(60.0));
        o.gate.min_cosine = Some(0.9);
    })
    .unwrap();
    let (t1, t2) = (
        &p.tries[p.chosen_try.unwrap()],
        &r2.plan.as_ref().unwrap().tries[0],
    );
    assert!(
        t2.bytes > t1.bytes && t2.measured_share <= t1.measured_share,
        "{t1:?} {t2:?}"
    );
    // A size no plan reaches is refused, exit 1, nothing written.
    let e = compressed(stem, dir.path(), "t3", |o| {
        o.target_size = Some(TargetSize::Percent(1.0))
    })
    .expect_err("refused");
    assert_eq!(e.exit_code(), 1);
    assert!(e.to_string().contains("cannot be reached"), "{e}");
    assert!(!dir.path().join(format!("{stem}.t3.onnx")).exists());
}

/// `m` with every VQ-coded table's decoding (named after its Gather: `<gather>_vq_*`) replaced by
/// a Gather on the table decoded here from the initializers: row r is `Σ_b
/// codebook_b[codes_b[r, j], t]` at `j·v + t`, then `· scale[r] + shift[r]` when normalized.
fn vq_tables_decoded(m: &Model, tables: &[(&str, &str)]) -> Model {
    let mut out = m.clone();
    let g = &m.graph;
    for (table, gather) in tables {
        let find = |suffix: &str| g.initializer(&format!("{table}_vq_{suffix}"));
        let codes = find("codes").unwrap();
        let packed = find("four").is_some();
        let rows = codes.dims()[0] as usize;
        let per = codes_of(codes, packed).1;
        let v = find("codebook").unwrap().dims()[1] as usize;
        let d = per * v;
        let mut e = vec![0f32; rows * d];
        for tag in ["", "1"] {
            let (Some(codes), Some(book)) = (
                find(&format!("codes{tag}")),
                find(&format!("codebook{tag}")),
            ) else {
                continue;
            };
            let (ids, cb) = (codes_of(codes, packed).0, f32s(book));
            for r in 0..rows {
                for j in 0..per {
                    for t in 0..v {
                        e[r * d + j * v + t] += cb[ids[r * per + j] as usize * v + t];
                    }
                }
            }
        }
        if let (Some(scale), Some(shift)) = (find("scale"), find("shift")) {
            let (s, b) = (f32s(scale), f32s(shift));
            for (i, x) in e.iter_mut().enumerate() {
                *x = *x * s[i / d] + b[i / d];
            }
        }
        // The decoding chain's output is the Gather's.
        let first = g.nodes.iter().find(|n| n.name == *gather).unwrap();
        let ids = first.inputs[1].clone();
        let prefix = format!("{gather}_vq_");
        let chain: Vec<&Node> = g
            .nodes
            .iter()
            .filter(|n| n.name == *gather || n.name.starts_with(&prefix))
            .collect();
        let produced: Vec<&String> = chain.iter().flat_map(|n| &n.outputs).collect();
        // Every value the chain makes is named after it, but its output, which keeps the name.
        let y = produced
            .iter()
            .find(|o| !o.starts_with(&prefix))
            .map(|o| o.to_string())
            .unwrap();
        let name = format!("{table}_dense");
        out.graph
            .nodes
            .retain(|n| !(n.name == *gather || n.name.starts_with(&prefix)));
        out.graph
            .initializers
            .push(f32_tensor(&name, &e, &[rows as i64, d as i64]));
        out.graph
            .nodes
            .push(Node::new(gather, "Gather", vec![name, ids], vec![y]));
    }
    wcc_ir::validate::topo_sort(&mut out.graph);
    out
}

#[test]
fn vq_tables_are_decoded_row_by_row_by_two_gathers() {
    let dir = tempfile::tempdir().unwrap();
    for (stem, table) in [
        ("bert.legacy", "embeddings.word_embeddings.weight"),
        ("gpt2.legacy", "transformer.wte.weight"),
    ] {
        for (tag, (residual, normalize)) in [("vqt", (false, false)), ("vqt-nr", (true, true))] {
            let (out, r) = optimize(stem, dir.path(), tag, -1.0, |o| {
                o.vq = Some(VqOptions {
                    vector: 4,
                    centroids: 16,
                    scope: every(true),
                    residual,
                    normalize,
                    ..VqOptions::default()
                });
            });
            let d = vq_details(&r);
            let l = d["layers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["weight"] == table)
                .unwrap_or_else(|| panic!("{stem}: {table} coded"));
            let m = wcc_ir::import::load(&out).unwrap();
            assert!(
                m.graph.initializer(table).is_none(),
                "{stem}: the dense table is gone"
            );
            // Indices [V, D/4] (4-bit, packed), 16 centroids of 4 f32 per codebook, norms per
            // row.
            let (dd, rows) = (l["k"].as_u64().unwrap(), l["n"].as_u64().unwrap());
            let books = if residual { 2 } else { 1 };
            let norms = if normalize { 2 * rows * 4 } else { 0 };
            assert_eq!(
                l["bytes_after"].as_u64().unwrap(),
                books * (codes_bytes(rows, dd) + 16 * 4 * 4) + norms
            );
            let gathers: Vec<(&str, &str)> = l["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| (table, n.as_str().unwrap()))
                .collect();
            let (float, _) = vq_decoded(&vq_tables_decoded(&m, &gathers));
            runs_as_decoded(&format!("{stem} {tag}"), stem, &m, &float);
        }
    }
}

/// Every weight the pass can take, however small; embedding tables too when `tables`.
fn every(tables: bool) -> Scope {
    Scope {
        tables,
        min_elements: 0,
        ..Scope::default()
    }
}
