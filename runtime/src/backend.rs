//! Backend selection and the common run interface.

use std::path::PathBuf;

use crate::inputs::NamedArrays;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda,
    TensorRt,
}

impl std::str::FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda),
            "tensorrt" | "trt" => Ok(Provider::TensorRt),
            _ => Err(format!(
                "unknown execution provider '{s}' (cpu | cuda | tensorrt)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Backend {
    /// tract, embedded: needs nothing installed.
    Tract,
    /// ONNX Runtime through `ort`, the library loaded at run time.
    Ort {
        lib: Option<PathBuf>,
        provider: Provider,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Setup(String),
    #[error("{backend} failed to run the model: {detail}")]
    Run { backend: String, detail: String },
}

impl Backend {
    pub fn label(&self) -> String {
        match self {
            Backend::Tract => "tract".into(),
            Backend::Ort { provider, .. } => format!("onnxruntime/{provider:?}").to_lowercase(),
        }
    }

    /// Runs the serialized model once on `inputs`; outputs in graph order.
    pub fn run(&self, model: &[u8], inputs: &NamedArrays) -> Result<NamedArrays, RunError> {
        self.prepare(model, inputs)?.run(inputs)
    }

    /// Loads and compiles the model for repeated runs (benchmarks).
    pub fn prepare(
        &self,
        model: &[u8],
        inputs: &NamedArrays,
    ) -> Result<Box<dyn Prepared>, RunError> {
        match self {
            Backend::Tract => Ok(Box::new(crate::tract_backend::TractModel::load(
                model, inputs,
            )?)),
            Backend::Ort { lib, provider } => Ok(Box::new(crate::ort_backend::OrtModel::load(
                model,
                lib.as_deref(),
                *provider,
            )?)),
        }
    }
}

/// A model loaded on a backend.
pub trait Prepared {
    fn run(&mut self, inputs: &NamedArrays) -> Result<NamedArrays, RunError>;
}
