//! tract backend: embedded, pure Rust, needs nothing installed. Input facts come from the concrete
//! inputs, so symbolic dims are resolved before optimization.

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::prelude::*;
use wcc_ir::eval::Array;

use crate::backend::{Prepared, RunError};
use crate::inputs::NamedArrays;

pub struct TractModel {
    plan: Arc<TypedRunnableModel>,
    output_names: Vec<String>,
}

fn err(e: impl std::fmt::Display) -> RunError {
    RunError::Run {
        backend: "tract".into(),
        detail: format!("{e:#}"),
    }
}

fn to_tract(a: &Array) -> Tensor {
    match a {
        Array::F32(x) => Tensor::from(x.clone()),
        Array::F64(x) => Tensor::from(x.clone()),
        Array::F16(x) => Tensor::from(x.clone()),
        Array::I64(x) => Tensor::from(x.clone()),
        Array::I32(x) => Tensor::from(x.clone()),
        Array::I8(x) => Tensor::from(x.clone()),
        Array::U8(x) => Tensor::from(x.clone()),
        Array::Bool(x) => Tensor::from(x.clone()),
    }
}

fn from_tract(t: &Tensor) -> Result<Array, RunError> {
    let dt = t.datum_type();
    Ok(if dt == f32::datum_type() {
        Array::F32(t.to_plain_array_view::<f32>().map_err(err)?.to_owned())
    } else if dt == f64::datum_type() {
        Array::F64(t.to_plain_array_view::<f64>().map_err(err)?.to_owned())
    } else if dt == f16::datum_type() {
        Array::F16(t.to_plain_array_view::<f16>().map_err(err)?.to_owned())
    } else if dt == i64::datum_type() {
        Array::I64(t.to_plain_array_view::<i64>().map_err(err)?.to_owned())
    } else if dt == TDim::datum_type() {
        // Shape values (what `Shape` makes, and arithmetic on it) are symbolic dims in tract;
        // at concrete input dims they are numbers.
        let t = t.cast_to::<i64>().map_err(err)?;
        Array::I64(t.to_plain_array_view::<i64>().map_err(err)?.to_owned())
    } else if dt == i32::datum_type() {
        Array::I32(t.to_plain_array_view::<i32>().map_err(err)?.to_owned())
    } else if dt == i8::datum_type() {
        Array::I8(t.to_plain_array_view::<i8>().map_err(err)?.to_owned())
    } else if dt == u8::datum_type() {
        Array::U8(t.to_plain_array_view::<u8>().map_err(err)?.to_owned())
    } else if dt == bool::datum_type() {
        Array::Bool(t.to_plain_array_view::<bool>().map_err(err)?.to_owned())
    } else {
        return Err(err(format!(
            "output type {dt:?} is not supported by wcc's comparison"
        )));
    })
}

impl TractModel {
    /// Loads the model for these inputs' shapes; `optimize` runs tract's codegen (for
    /// benchmarks), else the model is only decluttered (for checks, see below).
    pub fn load(
        bytes: std::borrow::Cow<'_, [u8]>,
        refs: Vec<wcc_ir::Tensor>,
        inputs: &NamedArrays,
        optimize: bool,
    ) -> Result<Self, RunError> {
        // tract unifies declared shapes with the concrete input facts; symbolic dims in value_info
        // and output types (as the dynamo exporter writes them) would clash, so drop them: tract
        // infers every intermediate shape itself.
        let onnx = tract_onnx::onnx();
        // Decoded straight from the caller's bytes (tract's `proto_model_for_read` would copy
        // them into a buffer of its own first).
        let mut proto =
            <tract_onnx::pb::ModelProto as prost::Message>::decode(&*bytes).map_err(err)?;
        // Bytes the caller handed over are freed now: the protobuf holds the weights.
        drop(bytes);
        if let Some(g) = proto.graph.as_mut() {
            g.value_info.clear();
            for o in &mut g.output {
                o.r#type = None;
            }
        }
        // Tensors left out of the message (`export::to_bytes_with_refs`) are parsed as graph
        // inputs of their type, then made constants from tensors read straight from where wcc
        // holds them: one copy, into the buffer tract keeps (tract's external-data resolver
        // would read each into a zeroed buffer of its own, then copy that into the tensor).
        let held: HashMap<&str, usize> = refs
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name(), i))
            .collect();
        hold_out(&mut proto, &held);
        let mut model = onnx.model_for_proto_model(&proto).map_err(err)?;
        // The model holds what it needs of the message now.
        drop(proto);
        drop(onnx);
        if !held.is_empty() {
            model = with_constants(model, &refs, &held)?;
        }
        drop(held);
        drop(refs);
        for (i, (_, a)) in inputs.iter().enumerate() {
            let fact = InferenceFact::dt_shape_from_tensor(&to_tract(a));
            model = model.with_input_fact(i, fact).map_err(err)?;
        }
        let output_names = model
            .output_outlets()
            .map_err(err)?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        // Decluttered, not optimized: verification runs a model once or a few times, at small
        // dims, and tract's codegen (packing every weight for its kernels) costs more than it
        // saves there (MiniLM's verification: 0.45 s optimized, 0.40 s decluttered).
        let typed = model.into_typed().map_err(err)?;
        let typed = if optimize {
            typed.into_optimized()
        } else {
            typed.into_decluttered()
        };
        let plan = typed.map_err(err)?.into_runnable().map_err(err)?;
        Ok(TractModel { plan, output_names })
    }
}

/// Moves the initializers named in `held` (the tensors handed over) out of the graph's
/// initializers into its inputs, typed as the tensors are.
fn hold_out(proto: &mut tract_onnx::pb::ModelProto, held: &HashMap<&str, usize>) {
    use tract_onnx::pb;
    let Some(g) = proto.graph.as_mut().filter(|_| !held.is_empty()) else {
        return;
    };
    let mut moved = vec![];
    g.initializer.retain(|t| {
        let keep = !held.contains_key(t.name.as_str());
        if !keep {
            moved.push((t.name.clone(), t.data_type, t.dims.clone()));
        }
        keep
    });
    let listed: std::collections::HashSet<String> =
        g.input.iter().map(|v| v.name.clone()).collect();
    for (name, elem_type, dims) in moved.into_iter().filter(|m| !listed.contains(&m.0)) {
        let shape = pb::TensorShapeProto {
            dim: dims
                .iter()
                .map(|&d| pb::tensor_shape_proto::Dimension {
                    denotation: String::new(),
                    value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                })
                .collect(),
        };
        g.input.push(pb::ValueInfoProto {
            name,
            r#type: Some(pb::TypeProto {
                denotation: String::new(),
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type,
                    shape: Some(shape),
                })),
            }),
            doc_string: String::new(),
        });
    }
}

/// Turns the inputs `hold_out` made back into constants, each read from its tensor in `refs`
/// (`held`: index by name); the model's inputs are then the graph inputs the caller feeds, in
/// their order.
fn with_constants(
    mut model: InferenceModel,
    refs: &[wcc_ir::Tensor],
    held: &HashMap<&str, usize>,
) -> Result<InferenceModel, RunError> {
    let mut fed = vec![];
    for outlet in model.input_outlets().map_err(err)?.to_vec() {
        let node = model.node(outlet.node);
        let Some(&i) = held.get(node.name.as_str()) else {
            fed.push(outlet);
            continue;
        };
        let tensor = Arc::new(read_tensor(&refs[i])?);
        let fact = InferenceFact::from(TypedFact::try_from(tensor.clone()).map_err(err)?);
        let op = tract_onnx::tract_hir::ops::konst::Const::new(tensor).map_err(err)?;
        model.node_mut(outlet.node).op = Box::new(op);
        model.set_outlet_fact(outlet, fact).map_err(err)?;
    }
    model.set_input_outlets(&fed).map_err(err)?;
    Ok(model)
}

/// `t` as a tract tensor, its bytes read once into the tensor's own buffer (`Tensor::read_into`).
fn read_tensor(t: &wcc_ir::Tensor) -> Result<Tensor, RunError> {
    let code = tract_onnx::pb::tensor_proto::DataType::try_from(t.proto.data_type)
        .map_err(|e| err(format!("tensor {}: element type: {e}", t.name())))?;
    let dt: DatumType = code.try_into().map_err(err)?;
    if !dt.is_copy() {
        return Err(err(format!(
            "tensor {}: {dt:?} cannot be read as bytes",
            t.name()
        )));
    }
    let shape = t
        .dims()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(err)?;
    // SAFETY: a tensor of a plain (copy) type, seen below only as possibly uninitialized bytes
    // until `read_into` has written every one of them (it fails otherwise, and the tensor is
    // dropped unread).
    let mut tensor = unsafe { Tensor::uninitialized_dt(dt, &shape) }.map_err(err)?;
    let len = tensor.len() * dt.size_of();
    // SAFETY: the tensor's buffer holds `len` bytes, borrowed with the tensor.
    let dst = unsafe {
        std::slice::from_raw_parts_mut(
            tensor
                .as_ptr_mut_unchecked::<u8>()
                .cast::<std::mem::MaybeUninit<u8>>(),
            len,
        )
    };
    t.read_into(dst).map_err(err)?;
    Ok(tensor)
}

impl Prepared for TractModel {
    fn run(&mut self, inputs: &NamedArrays) -> Result<NamedArrays, RunError> {
        let tv: TVec<TValue> = inputs
            .iter()
            .map(|(_, a)| to_tract(a).into_tvalue())
            .collect();
        let outs = self.plan.run(tv).map_err(err)?;
        outs.iter()
            .zip(&self.output_names)
            .map(|(t, n)| Ok((n.clone(), from_tract(t)?)))
            .collect()
    }
}
