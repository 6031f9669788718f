//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use wcc_ir::Model;
use wcc_passes::OptLevel;
use wcc_runtime::{Backend, NamedArrays, Provider};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn models_dir() -> PathBuf {
    root().join("fixtures/models")
}

/// Every committed fixture model, by stem (e.g. `bert.legacy`), sorted.
pub fn fixture_stems() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(models_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter_map(|n| n.strip_suffix(".onnx").map(str::to_string))
        .collect();
    v.sort();
    assert!(v.len() >= 20, "fixtures missing: found {}", v.len());
    v
}

pub fn fixture_path(stem: &str) -> PathBuf {
    models_dir().join(format!("{stem}.onnx"))
}

pub fn load(stem: &str) -> Model {
    let m = wcc_ir::import::load(&fixture_path(stem)).unwrap_or_else(|e| panic!("{stem}: {e}"));
    wcc_ir::validate::validate(&m).unwrap_or_else(|e| panic!("{stem}: {e}"));
    m
}

pub fn inputs(stem: &str, which: &str) -> NamedArrays {
    let m = load(stem);
    let given = wcc_runtime::load_npz(&models_dir().join(format!("{stem}.{which}.npz"))).unwrap();
    wcc_runtime::inputs::match_inputs(&m, given).unwrap()
}

pub fn optimized(stem: &str, level: OptLevel) -> Model {
    let mut m = load(stem);
    wcc_passes::optimize(&mut m, wcc_passes::pipeline(level))
        .unwrap_or_else(|e| panic!("{stem}: {e}"));
    m
}

/// Where the ONNX Runtime library should be: ORT_DYLIB_PATH, else `.ort/` (runtime/install-ort.sh).
pub fn ort_lib() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) => PathBuf::from(p),
        None => root().join(".ort/libonnxruntime.so.1.31.1"),
    }
}

/// The ONNX Runtime library: ORT_DYLIB_PATH, else the copy `runtime/install-ort.sh` puts in `.ort/`.
/// Missing is a test failure, not a skip: run `runtime/install-ort.sh` (tests/run.sh does).
pub fn ort() -> Backend {
    let lib = ort_lib();
    assert!(
        lib.is_file(),
        "ONNX Runtime library not found at {}: run runtime/install-ort.sh",
        lib.display()
    );
    Backend::Ort {
        lib: Some(lib),
        provider: Provider::Cpu,
    }
}

pub fn run(backend: &Backend, m: &Model, inputs: &NamedArrays) -> Result<NamedArrays, String> {
    let bytes = wcc_ir::export::to_bytes(m).map_err(|e| e.to_string())?;
    backend.run(&bytes, inputs).map_err(|e| e.to_string())
}

/// The `wcc` binary (only the `wcc` package's tests have it), with ONNX Runtime's library in
/// `ORT_DYLIB_PATH` (as tests/run.sh sets it) for models only ONNX Runtime runs.
pub fn wcc() -> std::process::Command {
    let Some(bin) = option_env!("CARGO_BIN_EXE_wcc") else {
        panic!("only the wcc package's tests have the wcc binary");
    };
    let mut c = std::process::Command::new(bin);
    let lib = ort_lib();
    if lib.is_file() {
        c.env("ORT_DYLIB_PATH", lib);
    }
    c
}

/// A tensor ValueInfoProto with static dims (elem: ONNX dtype code).
pub fn vi(name: &str, elem: i32, dims: &[i64]) -> onnx_protobuf::ValueInfoProto {
    use onnx_protobuf::{tensor_shape_proto, type_proto, TensorShapeProto, TypeProto};
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(*d)),
            ..Default::default()
        })
        .collect();
    onnx_protobuf::ValueInfoProto {
        name: name.into(),
        type_: protobuf::MessageField::some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem,
                shape: protobuf::MessageField::some(TensorShapeProto {
                    dim,
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A one-output node of the default domain, named after its output.
pub fn simple_node(op: &str, inputs: &[&str], output: &str) -> onnx_protobuf::NodeProto {
    onnx_protobuf::NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// A model of one graph "g" at IR 8, opset 17 (for small hand-built cases).
pub fn model17(
    nodes: Vec<onnx_protobuf::NodeProto>,
    initializer: Vec<onnx_protobuf::TensorProto>,
    input: Vec<onnx_protobuf::ValueInfoProto>,
    output: Vec<onnx_protobuf::ValueInfoProto>,
) -> onnx_protobuf::ModelProto {
    onnx_protobuf::ModelProto {
        ir_version: 8,
        opset_import: vec![onnx_protobuf::OperatorSetIdProto {
            version: 17,
            ..Default::default()
        }],
        graph: protobuf::MessageField::some(onnx_protobuf::GraphProto {
            name: "g".into(),
            node: nodes,
            initializer,
            input,
            output,
            ..Default::default()
        }),
        ..Default::default()
    }
}
