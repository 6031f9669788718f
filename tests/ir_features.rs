//! What the fixtures do not exercise: model-local functions, unknown domains, metadata, every
//! element type, denotations, If subgraphs (folded inside), the size guard, and loud provider errors.

mod common;

use common::*;
use onnx_protobuf::{
    attribute_proto::AttributeType, AttributeProto, FunctionProto, GraphProto, ModelProto,
    NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
};
use protobuf::Message;
use wcc_passes::OptLevel;

fn node(op: &str, domain: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        domain: domain.into(),
        name: format!("{op}_{}", outputs[0]),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn constant(out: &str, vals: &[f32]) -> NodeProto {
    let mut n = node("Constant", "", &[], &[out]);
    n.attribute.push(AttributeProto {
        name: "value".into(),
        type_: AttributeType::TENSOR.into(),
        t: protobuf::MessageField::some(TensorProto {
            data_type: 1,
            dims: vec![vals.len() as i64],
            float_data: vals.to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    });
    n
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::INT.into(),
        i,
        ..Default::default()
    }
}

fn graph_attr(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: AttributeType::GRAPH.into(),
        g: protobuf::MessageField::some(g),
        ..Default::default()
    }
}

fn opset(domain: &str, v: i64) -> OperatorSetIdProto {
    OperatorSetIdProto {
        domain: domain.into(),
        version: v,
        ..Default::default()
    }
}

/// y = If(cond, then: x + c1*c2, else: x - c3), with the constant product foldable inside.
fn if_model() -> ModelProto {
    let then_g = GraphProto {
        name: "then".into(),
        node: vec![
            constant("c1", &[1.0, 2.0, 3.0, 4.0]),
            constant("c2", &[0.5, 0.5, 2.0, -1.0]),
            node("Mul", "", &["c1", "c2"], &["p"]),
            node("Add", "", &["x", "p"], &["t_out"]),
        ],
        output: vec![vi("t_out", 1, &[4])],
        ..Default::default()
    };
    let else_g = GraphProto {
        name: "else".into(),
        node: vec![
            constant("c3", &[1.0, 1.0, 1.0, 1.0]),
            node("Identity", "", &["c3"], &["c3i"]),
            node("Sub", "", &["x", "c3i"], &["e_out"]),
        ],
        output: vec![vi("e_out", 1, &[4])],
        ..Default::default()
    };
    let mut if_node = node("If", "", &["cond"], &["y"]);
    if_node.attribute = vec![
        graph_attr("then_branch", then_g),
        graph_attr("else_branch", else_g),
    ];
    ModelProto {
        ir_version: 8,
        opset_import: vec![opset("", 17)],
        graph: protobuf::MessageField::some(GraphProto {
            name: "main".into(),
            node: vec![if_node],
            input: vec![vi("cond", 9, &[]), vi("x", 1, &[4])],
            output: vec![vi("y", 1, &[4])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tensor(name: &str, dtype: i32, dims: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: dtype,
        dims: dims.to_vec(),
        ..Default::default()
    }
}

/// Everything the importer must keep, in one model (not runnable: it has an unknown domain).
fn kitchen_sink() -> ModelProto {
    let mut m = if_model();
    m.producer_name = "hand".into();
    m.doc_string = "a model with everything".into();
    m.metadata_props.push(StringStringEntryProto {
        key: "k".into(),
        value: "v".into(),
        ..Default::default()
    });
    m.opset_import.push(opset("com.example", 1));
    m.opset_import.push(opset("local", 1));
    m.functions.push(FunctionProto {
        name: "MyRelu".into(),
        domain: "local".into(),
        input: vec!["a".into()],
        output: vec!["b".into()],
        node: vec![node("Relu", "", &["a"], &["b"])],
        opset_import: vec![opset("", 17)],
        ..Default::default()
    });
    let g = m.graph.as_mut().unwrap();
    g.node.push(node("MyRelu", "local", &["y"], &["r"]));
    let mut frob = node("Frobnicate", "com.example", &["r", "f16"], &["z"]);
    frob.doc_string = "unknown op".into();
    frob.attribute.push(AttributeProto {
        name: "mode".into(),
        type_: AttributeType::STRING.into(),
        s: b"fast".to_vec(),
        ..Default::default()
    });
    g.node.push(frob);
    g.output = vec![vi("z", 1, &[4])];
    let mut den = vi("y", 1, &[4]);
    den.type_.as_mut().unwrap().denotation = "TENSOR".into();
    g.value_info.push(den);
    // Every storage flavour of initializer.
    let mut f16 = tensor("f16", 10, &[2]);
    f16.raw_data = vec![0x00, 0x3c, 0x00, 0xc0];
    let mut bf16 = tensor("bf16", 16, &[2]);
    bf16.int32_data = vec![0x3f80, 0xc000];
    let mut i4 = tensor("i4", 22, &[3]);
    i4.raw_data = vec![0x21, 0x0f];
    let mut f8 = tensor("f8", 17, &[2]);
    f8.raw_data = vec![0x38, 0xb8];
    let mut s = tensor("s", 8, &[2]);
    s.string_data = vec![b"hello".to_vec(), b"".to_vec()];
    let mut u64t = tensor("u64", 13, &[1]);
    u64t.uint64_data = vec![u64::MAX];
    let mut f64t = tensor("f64", 11, &[1]);
    f64t.double_data = vec![std::f64::consts::PI];
    g.initializer = vec![f16, bf16, i4, f8, s, u64t, f64t];
    m
}

#[test]
fn everything_survives_a_round_trip() {
    let original = kitchen_sink();
    let model = wcc_ir::import::load_bytes(&original.write_to_bytes().unwrap()).unwrap();
    wcc_ir::validate::validate(&model).unwrap();
    assert!(wcc_ir::export::to_proto(&model).unwrap() == original);
    // -O1 keeps the function, the unknown op and its attribute, metadata and the denotation.
    let mut m = model.clone();
    wcc_passes::optimize(&mut m, wcc_passes::pipeline(OptLevel::O1)).unwrap();
    let p = wcc_ir::export::to_proto(&m).unwrap();
    assert_eq!(p.functions, original.functions);
    assert_eq!(p.metadata_props[0].value, "v");
    let frob = p
        .graph
        .node
        .iter()
        .find(|n| n.op_type == "Frobnicate")
        .unwrap();
    assert_eq!(
        (
            frob.domain.as_str(),
            frob.attribute[0].s.as_slice(),
            frob.doc_string.as_str()
        ),
        ("com.example", &b"fast"[..], "unknown op")
    );
    assert!(p
        .graph
        .node
        .iter()
        .any(|n| n.op_type == "MyRelu" && n.domain == "local"));
    assert_eq!(p.graph.value_info[0].type_.denotation, "TENSOR");
    // The initializer read by the unknown op stays with its bytes; the unused ones go.
    let f16 = p
        .graph
        .initializer
        .iter()
        .find(|t| t.name == "f16")
        .unwrap();
    assert_eq!(f16.raw_data, vec![0x00, 0x3c, 0x00, 0xc0]);
    // The printer shows every dtype by name.
    let text = wcc_ir::print::print_model(&model);
    for s in [
        "f16[2]",
        "bf16[2]",
        "i4[3]",
        "f8e4m3fn[2]",
        "string[2]",
        "u64[1]",
        "f64[1]",
        "com.example::Frobnicate",
        "local::MyRelu",
        "function local::MyRelu",
    ] {
        assert!(text.contains(s), "missing {s} in\n{text}");
    }
}

#[test]
fn o1_folds_inside_subgraphs_and_keeps_results() {
    let proto = if_model();
    let a = wcc_ir::import::load_bytes(&proto.write_to_bytes().unwrap()).unwrap();
    let mut b = a.clone();
    wcc_passes::optimize(&mut b, wcc_passes::pipeline(OptLevel::O1)).unwrap();
    let branch_nodes = |m: &wcc_ir::Model| -> Vec<usize> {
        m.graph.nodes[0]
            .attributes
            .iter()
            .map(|at| at.graphs[0].nodes.len())
            .collect()
    };
    assert_eq!(branch_nodes(&a), vec![4, 3]);
    // then: Constant, Constant, Mul folded into one initializer; else: Constant folded, Identity gone.
    assert_eq!(branch_nodes(&b), vec![1, 1]);
    let ort = ort();
    for cond in [true, false] {
        let inputs = vec![
            (
                "cond".to_string(),
                wcc_ir::eval::Array::Bool(ndarray::arr0(cond).into_dyn()),
            ),
            (
                "x".to_string(),
                wcc_ir::eval::Array::F32(ndarray::arr1(&[0.25f32, -1.0, 3.0, 8.0]).into_dyn()),
            ),
        ];
        let ra = run(&ort, &a, &inputs).unwrap();
        let rb = run(&ort, &b, &inputs).unwrap();
        assert!(
            wcc_runtime::compare_outputs(&ra, &rb)
                .unwrap()
                .iter()
                .all(|f| f.bitwise_equal),
            "cond={cond}"
        );
    }
}

/// A model whose constants would blow up if folded: ConstantOfShape / Expand / Tile to 2^24 floats.
#[test]
fn size_guard_keeps_large_constants_unfolded() {
    let int_t = |name: &str, vals: &[i64]| TensorProto {
        name: name.into(),
        data_type: 7,
        dims: vec![vals.len() as i64],
        int64_data: vals.to_vec(),
        ..Default::default()
    };
    let mut one = tensor("one", 1, &[1]);
    one.float_data = vec![1.0];
    let mut m = ModelProto {
        ir_version: 8,
        opset_import: vec![opset("", 17)],
        graph: protobuf::MessageField::some(GraphProto {
            name: "g".into(),
            node: vec![
                node("ConstantOfShape", "", &["big_shape"], &["zeros"]),
                node("Expand", "", &["one", "big_shape"], &["ones"]),
                node("Tile", "", &["one", "reps"], &["tiled"]),
                node("ConstantOfShape", "", &["small_shape"], &["small"]),
                // Each constant is read by a computation on the input, so it would have to be stored.
                node("Add", "", &["x", "zeros"], &["a1"]),
                node("Add", "", &["x", "ones"], &["a2"]),
                node("Add", "", &["x", "tiled"], &["a3"]),
                node("Add", "", &["x", "small"], &["a4"]),
                node("ReduceSum", "", &["a1"], &["s1"]),
                node("ReduceSum", "", &["a2"], &["s2"]),
                node("ReduceSum", "", &["a3"], &["s3"]),
                node("ReduceSum", "", &["a4"], &["s4"]),
                node("Sum", "", &["s1", "s2", "s3", "s4"], &["y"]),
            ],
            initializer: vec![
                int_t("big_shape", &[4096, 4096]),
                int_t("small_shape", &[4, 4]),
                int_t("reps", &[1 << 24]),
                one,
            ],
            input: vec![vi("x", 1, &[])],
            output: vec![vi("y", 1, &[])],
            ..Default::default()
        }),
        ..Default::default()
    };
    m.graph.as_mut().unwrap().node[8..12]
        .iter_mut()
        .for_each(|n| {
            n.attribute.push(AttributeProto {
                name: "keepdims".into(),
                type_: AttributeType::INT.into(),
                i: 0,
                ..Default::default()
            })
        });
    let a = wcc_ir::import::load_bytes(&m.write_to_bytes().unwrap()).unwrap();
    let mut b = a.clone();
    let records = wcc_passes::optimize(&mut b, wcc_passes::pipeline(OptLevel::O1)).unwrap();
    let ops: Vec<&str> = b.graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
    // The small ConstantOfShape folds; the three large producers stay.
    assert!(
        ops.contains(&"Expand")
            && ops.contains(&"Tile")
            && ops.iter().filter(|o| **o == "ConstantOfShape").count() == 1,
        "{ops:?}"
    );
    assert!(
        b.graph
            .initializers
            .iter()
            .all(|t| t.byte_size() <= 64 << 10),
        "a large constant was materialized"
    );
    assert!(
        records
            .iter()
            .flat_map(|r| &r.notes)
            .any(|n| n.contains("size guard")),
        "the guard should say it held"
    );
}

#[test]
fn an_unavailable_execution_provider_is_an_error_not_a_fallback() {
    let lib = match ort() {
        wcc_runtime::Backend::Ort { lib, .. } => lib.unwrap(),
        _ => unreachable!(),
    };
    let o = wcc()
        .arg("bench")
        .arg(fixture_path("bert.legacy"))
        .args(["--ep", "cuda", "--runs", "1", "--warmup", "0", "--ort-lib"])
        .arg(&lib)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("Cuda") || err.contains("CUDA"), "{err}");
}

/// y = Relu(x) with x declared `[dim_value: -1, 4]` (Paddle's exporter writes -1 for a dynamic
/// dim) and a Latin-1 doc string (proto2 `string` fields may hold any bytes).
fn paddle_style_model() -> Vec<u8> {
    use onnx_protobuf::{tensor_shape_proto, type_proto, TensorShapeProto, TypeProto};
    let mut x = vi("x", 1, &[4]);
    if let Some(type_proto::Value::TensorType(t)) = &mut x.type_.as_mut().unwrap().value {
        t.shape = protobuf::MessageField::some(TensorShapeProto {
            dim: [-1i64, 4]
                .iter()
                .map(|d| tensor_shape_proto::Dimension {
                    value: Some(tensor_shape_proto::dimension::Value::DimValue(*d)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    let _ = TypeProto::default();
    let m = ModelProto {
        ir_version: 8,
        opset_import: vec![opset("", 17)],
        doc_string: "PLACEHOLDER".into(),
        graph: protobuf::MessageField::some(GraphProto {
            name: "g".into(),
            node: vec![node("Relu", "", &["x"], &["y"])],
            input: vec![x.clone()],
            output: vec![vi("y", 1, &[4])],
            ..Default::default()
        }),
        ..Default::default()
    };
    // Swap the doc string's bytes for Latin-1 "café" (not UTF-8), same length.
    let bytes = m.write_to_bytes().unwrap();
    let at = bytes.windows(11).position(|w| w == b"PLACEHOLDER").unwrap();
    let mut out = bytes[..at].to_vec();
    out.extend_from_slice(b"caf\xe9 r\xe9sum\xe9");
    out.extend_from_slice(&bytes[at + 11..]);
    out
}

#[test]
fn negative_dims_and_non_utf8_strings_survive_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("paddle.onnx");
    std::fs::write(&p, paddle_style_model()).unwrap();
    // -O0 writes the file back byte for byte.
    let out = dir.path().join("o0.onnx");
    let o = wcc()
        .args(["optimize", "-O0"])
        .arg(&p)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&p).unwrap());
    // -O1 verifies (the -1 dim is an unknown dim for random inputs) and keeps both.
    let out1 = dir.path().join("o1.onnx");
    let o = wcc()
        .args(["optimize", "-O1"])
        .arg(&p)
        .arg("-o")
        .arg(&out1)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = std::fs::read(&out1).unwrap();
    assert!(b.windows(11).any(|w| w == b"caf\xe9 r\xe9sum\xe9"));
    // It was verified: backends get the escaped (UTF-8) form.
    assert!(!String::from_utf8_lossy(&o.stderr).contains("not verified"));
    let m = wcc_ir::import::load(&out1).unwrap();
    let x = m.graph.inputs[0].tensor_type().unwrap();
    assert_eq!(x.shape.as_ref().unwrap()[0], wcc_ir::Dim::Unknown);
    // The declared -1 is written back as it was.
    let raw = ModelProto::parse_from_bytes(&std::fs::read(&out).unwrap());
    assert!(raw.is_err(), "the Latin-1 doc string is still there");
    let escaped = wcc_ir::rawstr::escape(&b).unwrap();
    let back = ModelProto::parse_from_bytes(&escaped).unwrap();
    let input = &back.graph.input[0];
    let Some(onnx_protobuf::type_proto::Value::TensorType(t)) = &input.type_.value else {
        panic!("not a tensor")
    };
    assert_eq!(
        t.shape.dim[0].value,
        Some(onnx_protobuf::tensor_shape_proto::dimension::Value::DimValue(-1))
    );
}

#[test]
fn external_data_that_is_not_a_regular_file_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("w.bin");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut w = tensor("w", 1, &[4]);
    w.raw_data.clear();
    w.float_data.clear();
    w.data_location = onnx_protobuf::tensor_proto::DataLocation::EXTERNAL.into();
    w.external_data = vec![StringStringEntryProto {
        key: "location".into(),
        value: "w.bin".into(),
        ..Default::default()
    }];
    let m = ModelProto {
        ir_version: 8,
        opset_import: vec![opset("", 17)],
        graph: protobuf::MessageField::some(GraphProto {
            name: "g".into(),
            node: vec![node("Add", "", &["x", "w"], &["y"])],
            initializer: vec![w],
            input: vec![vi("x", 1, &[4])],
            output: vec![vi("y", 1, &[4])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let p = dir.path().join("m.onnx");
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    let t0 = std::time::Instant::now();
    let o = wcc().arg("print").arg(&p).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not a regular file"), "{err}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
}

/// A Range whose start is a folded shape value keeps it a scalar, even when a value_info
/// (wrongly) declares it `[1]`: folding trusts inferred ranks, not declared ones.
#[test]
fn folded_values_keep_their_rank() {
    let mut start = node("ReduceSum", "", &["sh"], &["start"]);
    start.attribute.push(int_attr("keepdims", 0));
    let m = ModelProto {
        ir_version: 8,
        opset_import: vec![opset("", 17)],
        graph: protobuf::MessageField::some(GraphProto {
            name: "g".into(),
            node: vec![
                node("Shape", "", &["x"], &["sh"]),
                start,
                node("Range", "", &["start", "limit", "delta"], &["r"]),
                node("Cast", "", &["r"], &["y"]),
            ],
            initializer: vec![
                TensorProto {
                    name: "limit".into(),
                    data_type: 7,
                    int64_data: vec![10],
                    ..Default::default()
                },
                TensorProto {
                    name: "delta".into(),
                    data_type: 7,
                    int64_data: vec![1],
                    ..Default::default()
                },
            ],
            input: vec![vi("x", 1, &[3])],
            output: vec![vi("y", 1, &[7])],
            value_info: vec![vi("start", 7, &[1])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut m = m;
    let g = m.graph.as_mut().unwrap();
    g.node[3].attribute.push(AttributeProto {
        name: "to".into(),
        type_: AttributeType::INT.into(),
        i: 1,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("range.onnx");
    std::fs::write(&p, m.write_to_bytes().unwrap()).unwrap();
    let out = dir.path().join("o.onnx");
    let o = wcc()
        .args(["optimize", "-O1", "--backend", "ort"])
        .arg(&p)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Whatever was folded, ONNX Runtime runs the result and it computes 3..10.
    let model = wcc_ir::import::load(&out).unwrap();
    let r = run(
        &ort(),
        &model,
        &vec![(
            "x".to_string(),
            wcc_ir::eval::Array::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[3]))),
        )],
    )
    .unwrap();
    assert_eq!(r[0].1.to_f64_vec(), vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
}

/// Large weights run through elementwise ops (per-column Mul, per-row Add, a Cast down to f16 and
/// back) fold piece by piece in the CLI (into the scratch file beside the output) to exactly what
/// ONNX Runtime computes from the original.
#[test]
fn large_weights_fold_piece_by_piece_exactly() {
    let (rows, cols) = (1500i64, 1200i64);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut w = tensor("w", 1, &[rows, cols]);
    w.raw_data = (0..rows * cols)
        .flat_map(|_| next().to_le_bytes())
        .collect();
    let mut c = tensor("c", 1, &[cols]);
    c.float_data = (0..cols).map(|_| next() * 3.0).collect();
    let mut r = tensor("r", 1, &[rows, 1]);
    r.float_data = (0..rows).map(|_| next()).collect();
    let cast = |inp: &str, out: &str, to: i64| {
        let mut n = node("Cast", "", &[inp], &[out]);
        n.attribute.push(int_attr("to", to));
        n
    };
    let m = ModelProto {
        ir_version: 8,
        opset_import: vec![opset("", 17)],
        graph: protobuf::MessageField::some(GraphProto {
            name: "g".into(),
            node: vec![
                node("Mul", "", &["w", "c"], &["a"]),
                node("Add", "", &["a", "r"], &["b"]),
                cast("b", "h", 10),
                cast("h", "wf", 1),
                node("Relu", "", &["wf"], &["p"]),
                node("Add", "", &["x", "p"], &["y"]),
            ],
            initializer: vec![w, c, r],
            input: vec![vi("x", 1, &[1, cols])],
            output: vec![vi("y", 1, &[rows, cols])],
            ..Default::default()
        }),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("m.onnx"), dir.path().join("o.onnx"));
    std::fs::write(&src, m.write_to_bytes().unwrap()).unwrap();
    let st = wcc()
        .args(["optimize", "-O1", "--no-verify"])
        .arg(&src)
        .arg("-o")
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let a = wcc_ir::import::load(&src).unwrap();
    let b = wcc_ir::import::load(&dst).unwrap();
    let ops: Vec<&str> = b.graph.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Add"], "the weight chain folds into one initializer");
    let x: Vec<f32> = (0..cols).map(|i| i as f32 * 0.01 - 5.0).collect();
    let inputs = vec![(
        "x".to_string(),
        wcc_ir::eval::Array::F32(
            ndarray::ArrayD::from_shape_vec(vec![1, cols as usize], x).unwrap(),
        ),
    )];
    let ort = ort();
    let (ra, rb) = (
        run(&ort, &a, &inputs).unwrap(),
        run(&ort, &b, &inputs).unwrap(),
    );
    let cmp = wcc_runtime::compare_outputs(&ra, &rb).unwrap();
    assert!(cmp.iter().all(|f| f.bitwise_equal), "{cmp:?}");

    // With external data, the scratch file a one-step fold (a scale) wrote into becomes the
    // data file: the folded weight is not copied, and reads back the same. (The chain above
    // leaves three dead intermediates in the scratch file: its output is copied, see
    // `export::adopt`.)
    let mut one = m.clone();
    let g = one.graph.as_mut().unwrap();
    g.node = vec![
        node("Mul", "", &["w", "c"], &["a"]),
        node("Add", "", &["x", "a"], &["y"]),
    ];
    let src = dir.path().join("one.onnx");
    std::fs::write(&src, one.write_to_bytes().unwrap()).unwrap();
    let a = wcc_ir::import::load(&src).unwrap();
    let ra = run(&ort, &a, &inputs).unwrap();
    let ext = dir.path().join("e.onnx");
    let st = wcc()
        .args(["optimize", "-O1", "--no-verify", "--external-data"])
        .arg(&src)
        .arg("-o")
        .arg(&ext)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "{out}");
    let folded = (rows * cols * 4) as u64;
    assert!(
        out.contains(&format!(
            "{folded} of them written by the passes, not copied"
        )),
        "{out}"
    );
    let e = wcc_ir::import::load(&ext).unwrap();
    let re = run(&ort, &e, &inputs).unwrap();
    let cmp = wcc_runtime::compare_outputs(&ra, &re).unwrap();
    assert!(cmp.iter().all(|f| f.bitwise_equal), "{cmp:?}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".wcc-")),
        "no temporary file is left: {names:?}"
    );
}
