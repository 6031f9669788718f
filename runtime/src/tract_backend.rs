//! tract backend: embedded, pure Rust, needs nothing installed. Input facts come from the concrete
//! inputs, so symbolic dims are resolved before optimization.

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
        let mut onnx = tract_onnx::onnx();
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
        let mut model = if refs.is_empty() {
            onnx.model_for_proto_model(&proto).map_err(err)?
        } else {
            // Tensors left out of the message (`export::to_bytes_with_refs`) are read by tract's
            // external-data resolver, straight from where wcc holds them into the buffer tract
            // makes its tensor from. tract resolves an external location to a file inside the
            // model's folder before it asks the resolver: a folder with an empty file of that
            // name stands for it (the resolver finds each tensor by its index, the offset).
            let dir = tempfile::tempdir().map_err(err)?;
            std::fs::File::create(dir.path().join(wcc_ir::export::REFS_LOCATION)).map_err(err)?;
            let dir_str = dir
                .path()
                .to_str()
                .ok_or_else(|| err("temporary folder name"))?;
            onnx.provider = Arc::new(Refs(refs));
            let parsed = onnx.parse(&proto, Some(dir_str)).map_err(err)?;
            if !parsed.unresolved_inputs.is_empty() {
                return Err(err(format!(
                    "could not resolve inputs at top level: {:?}",
                    parsed.unresolved_inputs
                )));
            }
            parsed.model
        };
        // The model holds its own copies of the weights now.
        drop(proto);
        drop(onnx);
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

/// Serves the tensors of `export::to_bytes_with_refs` to tract: offset = index in the list.
struct Refs(Vec<wcc_ir::Tensor>);

impl tract_onnx::data_resolver::ModelDataResolver for Refs {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        _p: &std::path::Path,
        offset: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        let t = self
            .0
            .get(offset)
            .ok_or_else(|| TractError::msg(format!("no tensor #{offset} was handed to tract")))?;
        let len = usize::try_from(t.byte_size())?;
        if length.is_some_and(|l| l != len) {
            return Err(TractError::msg(format!(
                "tensor {} holds {len} bytes, not {length:?}",
                t.name()
            )));
        }
        buf.try_reserve_exact(len)?;
        match t.file_range() {
            // Read from the file (page cache to this buffer), not through wcc's mmap.
            Some((file, at, _)) => {
                use std::os::unix::fs::FileExt;
                buf.resize(len, 0);
                file.read_exact_at(buf, at)?;
            }
            None => buf.extend_from_slice(&t.raw_bytes()?),
        }
        Ok(())
    }
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
