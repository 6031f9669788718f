//! The canonical text form (`wcc print`): stable, diff-friendly, one line per value or node.
//! Tensors appear as dtype, shape and content hash (tiny ones also by value), never dumped.

use std::fmt::Write;

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::AttributeProto;

use crate::infer::{infer_graph, TypeMap};
use crate::model::{Dim, Graph, Model, TensorType, ValueInfo, ValueType};
use crate::tensor::Tensor;

/// Tensors with at most this many elements are printed with their values.
const SHOW_VALUES_UP_TO: u64 = 8;

pub fn print_model(model: &Model) -> String {
    let mut s = String::new();
    let opsets: Vec<String> = model
        .opset_imports
        .iter()
        .map(|(d, v)| format!("{}:{v}", if d.is_empty() { "ai.onnx" } else { d }))
        .collect();
    let _ = writeln!(
        s,
        "model ir_version={} opsets=[{}]",
        model.ir_version,
        opsets.join(", ")
    );
    if !model.rest.producer_name.is_empty() {
        let _ = writeln!(
            s,
            "producer {:?} {:?}",
            model.rest.producer_name, model.rest.producer_version
        );
    }
    for p in &model.rest.metadata_props {
        let _ = writeln!(s, "metadata {:?} = {:?}", p.key, p.value);
    }
    for f in &model.functions {
        let _ = writeln!(
            s,
            "function {}::{} ({} nodes)",
            f.domain,
            f.name,
            f.node.len()
        );
    }
    print_graph(&mut s, &model.graph, model.default_opset(), None, 0);
    s
}

fn ty_str(t: &TensorType) -> String {
    let d = t.dtype.map(|d| d.name()).unwrap_or("?");
    match &t.shape {
        None => format!("{d}[..]"),
        Some(sh) => format!(
            "{d}[{}]",
            sh.iter().map(Dim::to_string).collect::<Vec<_>>().join(",")
        ),
    }
}

fn value_ty(v: &ValueInfo) -> String {
    match &v.ty {
        ValueType::Tensor(t) => ty_str(t),
        ValueType::Other(_) => "<non-tensor>".into(),
        ValueType::Missing => "<untyped>".into(),
    }
}

pub fn tensor_summary(t: &Tensor) -> String {
    let d = t.dtype().map(|d| d.name()).unwrap_or("?");
    let dims = t
        .dims()
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut s = format!("{d}[{dims}] #{:016x}", t.content_hash());
    if t.numel() <= SHOW_VALUES_UP_TO {
        if let Ok(v) = t.to_f64_vec() {
            let _ = write!(s, " {v:?}");
        }
    }
    s
}

fn attr_str(a: &AttributeProto) -> String {
    let v = match a.type_.enum_value() {
        Ok(AttributeType::FLOAT) => format!("{:?}", a.f),
        Ok(AttributeType::INT) => a.i.to_string(),
        Ok(AttributeType::STRING) => format!("{:?}", String::from_utf8_lossy(&a.s)),
        Ok(AttributeType::FLOATS) => format!("{:?}", a.floats),
        Ok(AttributeType::INTS) => format!("{:?}", a.ints),
        Ok(AttributeType::STRINGS) => format!(
            "{:?}",
            a.strings
                .iter()
                .map(|s| String::from_utf8_lossy(s))
                .collect::<Vec<_>>()
        ),
        Ok(AttributeType::TENSOR) => match a.t.as_ref().map(|t| Tensor::from_proto(t.clone())) {
            Some(Ok(t)) => tensor_summary(&t),
            _ => "<tensor>".into(),
        },
        Ok(AttributeType::GRAPH) | Ok(AttributeType::GRAPHS) => "<graph>".into(),
        _ => "<other>".into(),
    };
    if a.ref_attr_name.is_empty() {
        format!("{}={v}", a.name)
    } else {
        format!("{}=@{}", a.name, a.ref_attr_name)
    }
}

fn print_graph(s: &mut String, g: &Graph, opset: i64, outer: Option<&TypeMap>, depth: usize) {
    let ind = "  ".repeat(depth);
    let types = infer_graph(g, opset, outer);
    let _ = writeln!(s, "{ind}graph {:?}", g.name);
    let ind = "  ".repeat(depth + 1);
    for v in &g.inputs {
        let _ = writeln!(s, "{ind}input {}: {}", v.name, value_ty(v));
    }
    for t in &g.initializers {
        let _ = writeln!(s, "{ind}init {}: {}", t.name(), tensor_summary(t));
    }
    for n in &g.nodes {
        let op = if n.domain.is_empty() {
            n.op_type.clone()
        } else {
            format!("{}::{}", n.domain, n.op_type)
        };
        let mut attrs: Vec<&AttributeProto> = n.attributes.iter().map(|a| &a.proto).collect();
        attrs.sort_by(|a, b| a.name.cmp(&b.name));
        let attrs: Vec<String> = attrs.into_iter().map(attr_str).collect();
        let outs: Vec<String> = n
            .outputs
            .iter()
            .map(|o| match types.get(o) {
                Some(t) if !o.is_empty() => format!("{o}: {}", ty_str(t)),
                _ => o.clone(),
            })
            .collect();
        let _ = writeln!(
            s,
            "{ind}{op}{} {:?} ({}) -> ({})",
            if attrs.is_empty() {
                String::new()
            } else {
                format!(" [{}]", attrs.join(", "))
            },
            n.name,
            n.inputs.join(", "),
            outs.join(", ")
        );
        for a in &n.attributes {
            for sg in &a.graphs {
                let _ = writeln!(s, "{ind}  attribute {}:", a.name());
                print_graph(s, sg, opset, Some(&types), depth + 2);
            }
        }
    }
    for v in &g.outputs {
        let _ = writeln!(s, "{ind}output {}: {}", v.name, value_ty(v));
    }
}
