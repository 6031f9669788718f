//! Verification region by region (`wcc_driver::regions`): a changed node or weight is caught in
//! its region, regions are checked in groups within the memory budget, and -O1's regions on real
//! exports agree.

mod common;

use common::*;
use wcc_driver::regions::{plan, RegionError};
use wcc_runtime::{Backend, NamedArrays};

fn inputs(m: &wcc_ir::Model) -> NamedArrays {
    wcc_driver::ExecOptions::default().random(m, 0).unwrap()
}

/// The model with the initializer `name` replaced by a copy whose first float is changed.
fn with_changed_weight(m: &wcc_ir::Model, name: &str) -> wcc_ir::Model {
    let mut r = m.clone();
    let t = r
        .graph
        .initializers
        .iter_mut()
        .find(|t| t.name() == name)
        .unwrap();
    let mut raw = t.raw_bytes().unwrap().into_owned();
    let v = f32::from_le_bytes(raw[..4].try_into().unwrap()) + 0.5;
    raw[..4].copy_from_slice(&v.to_le_bytes());
    let dims = t.dims().to_vec();
    *t = wcc_ir::Tensor::from_raw(name, wcc_ir::DataType::F32, &dims, raw).unwrap();
    r
}

/// The MatMul weights (2-D f32 initializers read by MatMul) of `m`, in graph order.
fn matmul_weights(m: &wcc_ir::Model) -> Vec<String> {
    m.graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "MatMul")
        .filter_map(|n| m.graph.initializer(&n.inputs[1]))
        .filter(|t| t.dims().len() == 2 && t.dtype().ok() == Some(wcc_ir::DataType::F32))
        .map(|t| t.name().to_string())
        .collect()
}

#[test]
fn a_changed_op_is_caught_in_its_region() {
    let a = load("bert.legacy");
    let mut b = a.clone();
    let k = b
        .graph
        .nodes
        .iter()
        .position(|n| n.op_type == "Add")
        .unwrap();
    b.graph.nodes[k].op_type = "Sub".into();
    let anchor = b.graph.nodes[k].outputs[0].clone();
    let ins = inputs(&a);
    let p = plan(&a, &b, &ins).unwrap();
    assert_eq!(p.regions(), 1);
    let (fid, summary) = p.check(&Backend::Tract, &ins, u64::MAX, 0).unwrap();
    assert_eq!((summary.regions, summary.nodes, summary.runs), (1, 1, 1));
    assert_eq!(fid.len(), 1);
    assert_eq!(fid[0].name, anchor);
    assert!(
        fid[0].max_abs_error > 0.1 && !fid[0].bitwise_equal,
        "{fid:?}"
    );
}

#[test]
fn a_changed_weight_is_caught_and_counted_against_the_budget() {
    let a = load("bert.legacy");
    let w = matmul_weights(&a);
    let b = with_changed_weight(&a, &w[3]);
    let ins = inputs(&a);
    let p = plan(&a, &b, &ins).unwrap();
    assert_eq!(p.regions(), 1);
    let (fid, _) = p.check(&Backend::Tract, &ins, u64::MAX, 0).unwrap();
    assert!(
        !fid[0].bitwise_equal && fid[0].max_abs_error > 0.0,
        "{fid:?}"
    );
    // The region reads the original's weight and its own.
    let bytes = 2 * a.graph.initializer(&w[3]).unwrap().byte_size();
    assert!(matches!(
        p.check(&Backend::Tract, &ins, bytes - 1, 0),
        Err(RegionError::OverBudget(b, _)) if b == bytes
    ));
    assert!(p.check(&Backend::Tract, &ins, bytes, 0).is_ok());
}

#[test]
fn regions_are_checked_in_groups_within_the_budget() {
    let a = load("bert.legacy");
    // Three weights of one size, in different layers.
    let size = |n: &String| a.graph.initializer(n).unwrap().byte_size();
    let w = matmul_weights(&a);
    let same: Vec<&String> = w.iter().filter(|n| size(n) == size(&w[0])).collect();
    let picked = [same[0], same[same.len() / 2], same[same.len() - 1]];
    let mut b = a.clone();
    for name in picked {
        b = with_changed_weight(&b, name);
    }
    let ins = inputs(&a);
    let p = plan(&a, &b, &ins).unwrap();
    assert_eq!(p.regions(), 3);
    let one = 2 * size(&w[0]);
    let (fid, s) = p.check(&Backend::Tract, &ins, one, 0).unwrap();
    assert_eq!(s.runs, 3, "one region per run");
    assert!(fid.iter().all(|f| !f.bitwise_equal));
    // Twice the budget: the same one-region groups, two at a time; the same report, in order.
    let (fid2, s2) = p.check(&Backend::Tract, &ins, 2 * one, 0).unwrap();
    assert_eq!(s2.runs, 3);
    let key = |f: &[wcc_runtime::OutputFidelity]| -> Vec<(String, u64)> {
        f.iter()
            .map(|f| (f.name.clone(), f.max_abs_error.to_bits()))
            .collect()
    };
    assert_eq!(
        key(&fid),
        key(&fid2),
        "concurrent groups report as sequential ones"
    );
    let (_, s) = p.check(&Backend::Tract, &ins, u64::MAX, 0).unwrap();
    assert_eq!(s.runs, 1);
}

#[test]
fn o1_regions_on_real_exports_match_and_read_no_weight_they_do_not_change() {
    for stem in [
        "bert.legacy",
        "gpt2.legacy",
        "llama.dynamo",
        "resnet_bn.legacy",
    ] {
        let a = load(stem);
        let b = optimized(stem, wcc_passes::OptLevel::O1);
        let ins = inputs(&a);
        let p = plan(&a, &b, &ins).unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert!(p.regions() > 0, "{stem}");
        let (fid, _) = p.check(&Backend::Tract, &ins, u64::MAX, 0).unwrap();
        assert!(
            fid.iter().all(|f| f.rel_l2_error <= 1e-5),
            "{stem}: {fid:?}"
        );
        // In BERT and Llama, -O1 changes no node that reads a weight: their regions read only
        // small constants (folded shapes), a few KiB. (GPT-2's Gemms become MatMuls and
        // ResNet's convolutions take the BatchNorms: those regions read weights.)
        if matches!(stem, "bert.legacy" | "llama.dynamo") {
            let small = p.check(&Backend::Tract, &ins, 16 << 10, 0);
            assert!(small.is_ok(), "{stem}: {:?}", small.err());
        }
    }
}

/// y = Identity(MatMul(x, W)) against y = MatMul(x, W) (what removing the Identity leaves): the
/// MatMul is the original's under another output name, so the only claim left is the Identity's,
/// which reads no weight.
#[test]
fn a_node_whose_output_was_renamed_is_matched_and_its_weight_not_loaded() {
    use onnx_protobuf::{NodeProto, TensorProto};
    use protobuf::Message;
    let node = simple_node;
    let model = |nodes: Vec<NodeProto>| {
        let w = TensorProto {
            name: "w".into(),
            data_type: 1,
            dims: vec![64, 32],
            float_data: (0..64 * 32).map(|i| (i % 7) as f32 - 3.0).collect(),
            ..Default::default()
        };
        let m = model17(
            nodes,
            vec![w],
            vec![vi("x", 1, &[2, 64])],
            vec![vi("y", 1, &[2, 32])],
        );
        wcc_ir::import::load_bytes(&m.write_to_bytes().unwrap()).unwrap()
    };
    let a = model(vec![
        node("MatMul", &["x", "w"], "t"),
        node("Identity", &["t"], "y"),
    ]);
    let b = model(vec![node("MatMul", &["x", "w"], "y")]);
    let ins = inputs(&a);
    let p = plan(&a, &b, &ins).unwrap();
    assert_eq!(p.regions(), 1);
    let (fid, s) = p.check(&Backend::Tract, &ins, 0, 0).unwrap();
    assert_eq!((s.regions, s.nodes), (1, 0));
    assert!(fid[0].name == "y" && fid[0].bitwise_equal, "{fid:?}");
    // Reading another weight, the MatMul is a changed region of its own, weight and all.
    let mut c = b.clone();
    let mut w2 = c.graph.initializers[0].clone();
    w2.proto.name = "w2".into();
    c.graph.initializers.push(w2);
    c.graph.nodes[0].inputs = vec!["x".into(), "w2".into()];
    let p = plan(&a, &c, &ins).unwrap();
    assert!(matches!(
        p.check(&Backend::Tract, &ins, 0, 0),
        Err(RegionError::OverBudget(..))
    ));
    let (fid, _) = p.check(&Backend::Tract, &ins, u64::MAX, 0).unwrap();
    assert!(
        fid[0].bitwise_equal,
        "the same weight under another name: {fid:?}"
    );
}
