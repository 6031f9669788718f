//! Backend selection and the common run interface.

use std::borrow::Cow;
use std::path::PathBuf;

use crate::guard::guarded;
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

/// Tensors this large or larger are handed to tract as tensors, not serialized
/// (`Backend::run_model`).
pub const REF_MIN_BYTES: u64 = 4 << 10;

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
    /// The backend panicked (caught by the guard every backend call runs behind).
    #[error("{backend} crashed on the model (a bug in {backend}, or a model it cannot handle): {message}")]
    Panic { backend: String, message: String },
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

    /// Runs `m` once on `inputs` (see [`Backend::prepare_model`]).
    pub fn run_model(
        &self,
        m: &wcc_ir::Model,
        inputs: &NamedArrays,
    ) -> Result<NamedArrays, RunError> {
        self.prepare_model(m, inputs)?.run(inputs)
    }

    /// Loads `m` for runs on inputs shaped as `inputs`. tract gets the model without its large
    /// tensors and reads those from where wcc holds them (one copy fewer of every weight, and no
    /// message holding them); ONNX Runtime gets the serialized model, or, when its tensors pass
    /// protobuf's 2 GB limit, a file with external data written to a temporary folder (kept while
    /// the session lives).
    pub fn prepare_model(
        &self,
        m: &wcc_ir::Model,
        inputs: &NamedArrays,
    ) -> Result<Box<dyn Prepared>, RunError> {
        let setup = |e: wcc_ir::IrError| RunError::Setup(e.to_string());
        match self {
            Backend::Tract => {
                let (bytes, refs) =
                    wcc_ir::export::to_bytes_with_refs(m, REF_MIN_BYTES).map_err(setup)?;
                self.prepare_with(Cow::Owned(bytes), refs, inputs, false)
            }
            Backend::Ort { .. } if needs_file(m) => self.prepare_from_file(m),
            Backend::Ort { .. } => self.prepare_with(
                Cow::Owned(wcc_ir::export::to_bytes(m).map_err(setup)?),
                vec![],
                inputs,
                false,
            ),
        }
    }

    /// As `run`, taking the serialized model: the backend frees it as soon as it holds the
    /// model its own way, so the bytes and the backend's copy of the weights are not both held
    /// for the whole load.
    pub fn run_owned(&self, model: Vec<u8>, inputs: &NamedArrays) -> Result<NamedArrays, RunError> {
        self.prepare_with(Cow::Owned(model), vec![], inputs, false)?
            .run(inputs)
    }

    /// The backend's name in errors: "tract" or "onnxruntime".
    fn name(&self) -> &'static str {
        match self {
            Backend::Tract => "tract",
            Backend::Ort { .. } => "onnxruntime",
        }
    }

    /// Loads the model for runs that check outputs (verification, calibration). Loading and
    /// every run happen behind the guard: a panic in the backend is a `RunError::Panic`.
    pub fn prepare(
        &self,
        model: &[u8],
        inputs: &NamedArrays,
    ) -> Result<Box<dyn Prepared>, RunError> {
        self.prepare_with(Cow::Borrowed(model), vec![], inputs, false)
    }

    /// As `prepare`, compiled for speed (benchmarks): tract's codegen is run.
    pub fn prepare_optimized(
        &self,
        model: &[u8],
        inputs: &NamedArrays,
    ) -> Result<Box<dyn Prepared>, RunError> {
        self.prepare_with(Cow::Borrowed(model), vec![], inputs, true)
    }

    /// `refs`: the tensors `model` refers to by index (`export::to_bytes_with_refs`), tract only.
    fn prepare_with(
        &self,
        model: Cow<'_, [u8]>,
        refs: Vec<wcc_ir::Tensor>,
        inputs: &NamedArrays,
        optimize: bool,
    ) -> Result<Box<dyn Prepared>, RunError> {
        let backend = self.name();
        let inner = guarded(backend, || -> Result<Box<dyn Prepared>, RunError> {
            Ok(match self {
                Backend::Tract => Box::new(crate::tract_backend::TractModel::load(
                    model, refs, inputs, optimize,
                )?),
                Backend::Ort { lib, provider } => Box::new(crate::ort_backend::OrtModel::load(
                    &model,
                    lib.as_deref(),
                    *provider,
                )?),
            })
        })?;
        Ok(Box::new(Guarded { backend, inner }))
    }
}

impl Backend {
    /// Loads `m` on ONNX Runtime from a file with external data written to a temporary folder
    /// (kept while the session lives): what [`Backend::prepare_model`] does for a model over
    /// protobuf's limit. tract is not loaded this way (it reads the tensors where wcc holds them).
    pub fn prepare_from_file(&self, m: &wcc_ir::Model) -> Result<Box<dyn Prepared>, RunError> {
        let Backend::Ort { lib, provider } = self else {
            return Err(RunError::Setup(
                "only ONNX Runtime loads a model from a file here".into(),
            ));
        };
        let dir = tempfile::Builder::new()
            .prefix("wcc-ort-")
            .tempdir()
            .map_err(|e| RunError::Setup(format!("a temporary folder: {e}")))?;
        let path = dir.path().join("model.onnx");
        let opts = wcc_ir::export::SaveOptions {
            external_data: true,
            ..Default::default()
        };
        wcc_ir::export::save(m, &path, &opts)
            .map_err(|e| RunError::Setup(format!("writing the model for ONNX Runtime: {e}")))?;
        let inner = guarded(self.name(), || {
            crate::ort_backend::OrtModel::load_file(&path, lib.as_deref(), *provider)
        })?;
        Ok(Box::new(Guarded {
            backend: self.name(),
            inner: Box::new(InFolder { inner, _dir: dir }),
        }))
    }
}

/// Whether `m` must reach ONNX Runtime as a file: its tensors pass protobuf's 2 GB limit.
fn needs_file(m: &wcc_ir::Model) -> bool {
    wcc_ir::export::tensor_bytes(m) > wcc_ir::export::AUTO_EXTERNAL_BYTES
}

/// A model ONNX Runtime loaded from a temporary folder, kept as long as the session.
struct InFolder<T> {
    inner: T,
    _dir: tempfile::TempDir,
}

impl<T: Prepared> Prepared for InFolder<T> {
    fn run(&mut self, inputs: &NamedArrays) -> Result<NamedArrays, RunError> {
        self.inner.run(inputs)
    }
}

/// A prepared model whose runs happen behind the guard.
struct Guarded {
    backend: &'static str,
    inner: Box<dyn Prepared>,
}

impl Prepared for Guarded {
    fn run(&mut self, inputs: &NamedArrays) -> Result<NamedArrays, RunError> {
        let inner = &mut self.inner;
        guarded(self.backend, || inner.run(inputs))
    }
}

/// A model loaded on a backend.
pub trait Prepared {
    fn run(&mut self, inputs: &NamedArrays) -> Result<NamedArrays, RunError>;
}
