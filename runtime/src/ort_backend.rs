//! ONNX Runtime backend through `ort` with `load-dynamic`. The library comes from `--ort-lib`,
//! `ORT_DYLIB_PATH`, or an installed Python onnxruntime package. An asked-for execution provider
//! that cannot be registered is an error, never a silent CPU fallback.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use wcc_ir::eval::Array;

use crate::backend::{Prepared, Provider, RunError};
use crate::inputs::NamedArrays;

static INIT: OnceLock<Result<(PathBuf, Environment), String>> = OnceLock::new();

fn err(e: impl std::fmt::Display) -> RunError {
    RunError::Run {
        backend: "onnxruntime".into(),
        detail: e.to_string(),
    }
}

/// Finds the ONNX Runtime shared library: explicit path, `ORT_DYLIB_PATH`, then Python's package.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("--ort-lib {}: no such file", p.display()))
        };
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("ORT_DYLIB_PATH={}: no such file", p.display()))
        };
    }
    for py in ["python3", "python"] {
        let out = std::process::Command::new(py)
            .args(["-c", "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))"])
            .output();
        if let Ok(o) = out {
            if o.status.success() {
                let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    let mut libs: Vec<PathBuf> = rd
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| {
                            p.file_name().is_some_and(|n| {
                                n.to_string_lossy().starts_with("libonnxruntime.so")
                            })
                        })
                        .collect();
                    libs.sort();
                    if let Some(l) = libs.pop() {
                        return Ok(l);
                    }
                }
            }
        }
    }
    Err("ONNX Runtime library not found: pass --ort-lib PATH, set ORT_DYLIB_PATH, or `pip install onnxruntime`".into())
}

/// Loads the library once per process; later calls must agree on the path.
pub fn init(explicit: Option<&Path>) -> Result<&'static Environment, RunError> {
    let lib = find_library(explicit).map_err(RunError::Setup)?;
    let r = INIT.get_or_init(|| {
        let env = ort::init_from(&lib)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", lib.display()))?
            .with_name("wcc")
            .build()
            .map_err(|e| format!("ONNX Runtime environment: {e}"))?;
        Ok((lib.clone(), env))
    });
    match r {
        Ok((p, env)) if *p == lib => Ok(env),
        Ok((p, _)) => Err(RunError::Setup(format!(
            "ONNX Runtime already loaded from {}",
            p.display()
        ))),
        Err(e) => Err(RunError::Setup(e.clone())),
    }
}

pub struct OrtModel {
    session: Session,
    output_names: Vec<String>,
}

impl OrtModel {
    pub fn load(bytes: &[u8], lib: Option<&Path>, provider: Provider) -> Result<Self, RunError> {
        Self::with_session(Self::builder(lib, provider)?.commit_from_memory(bytes))
    }

    /// Loads the model file at `path` (its external data beside it): how a model over
    /// protobuf's 2 GB limit reaches ONNX Runtime.
    pub fn load_file(
        path: &Path,
        lib: Option<&Path>,
        provider: Provider,
    ) -> Result<Self, RunError> {
        Self::with_session(Self::builder(lib, provider)?.commit_from_file(path))
    }

    fn builder(
        lib: Option<&Path>,
        provider: Provider,
    ) -> Result<ort::session::builder::SessionBuilder, RunError> {
        let env = init(lib)?;
        let ep = match provider {
            Provider::Cpu => ort::ep::CPU::default().build().error_on_failure(),
            Provider::Cuda => ort::ep::CUDA::default().build().error_on_failure(),
            Provider::TensorRt => ort::ep::TensorRT::default().build().error_on_failure(),
        };
        Session::builder(env)
            .map_err(err)?
            .with_execution_providers([ep])
            .map_err(|e| {
                RunError::Setup(format!(
                    "execution provider {provider:?} cannot be registered: {e}"
                ))
            })
    }

    fn with_session(session: ort::Result<Session>) -> Result<Self, RunError> {
        let session = session.map_err(err)?;
        let output_names = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        Ok(OrtModel {
            session,
            output_names,
        })
    }
}

fn to_value(a: &Array) -> Result<DynValue, RunError> {
    Ok(match a {
        Array::F32(x) => Tensor::from_array(x.clone()).map_err(err)?.into_dyn(),
        Array::F64(x) => Tensor::from_array(x.clone()).map_err(err)?.into_dyn(),
        Array::F16(x) => Tensor::from_array(x.clone()).map_err(err)?.into_dyn(),
        Array::I64(x) => Tensor::from_array(x.clone()).map_err(err)?.into_dyn(),
        Array::I32(x) => Tensor::from_array(x.clone()).map_err(err)?.into_dyn(),
        Array::I8(x) => Tensor::from_array(x.clone()).map_err(err)?.into_dyn(),
        Array::U8(x) => Tensor::from_array(x.clone()).map_err(err)?.into_dyn(),
        Array::Bool(x) => Tensor::from_array(x.clone()).map_err(err)?.into_dyn(),
    })
}

fn from_value(v: &DynValue, name: &str) -> Result<Array, RunError> {
    let ty = match v.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => return Err(err(format!("output '{name}' is not a tensor ({other:?})"))),
    };
    Ok(match ty {
        TensorElementType::Float32 => {
            Array::F32(v.try_extract_array::<f32>().map_err(err)?.to_owned())
        }
        TensorElementType::Float64 => {
            Array::F64(v.try_extract_array::<f64>().map_err(err)?.to_owned())
        }
        TensorElementType::Float16 => {
            Array::F16(v.try_extract_array::<half::f16>().map_err(err)?.to_owned())
        }
        TensorElementType::Int64 => {
            Array::I64(v.try_extract_array::<i64>().map_err(err)?.to_owned())
        }
        TensorElementType::Int32 => {
            Array::I32(v.try_extract_array::<i32>().map_err(err)?.to_owned())
        }
        TensorElementType::Int8 => Array::I8(v.try_extract_array::<i8>().map_err(err)?.to_owned()),
        TensorElementType::Uint8 => Array::U8(v.try_extract_array::<u8>().map_err(err)?.to_owned()),
        TensorElementType::Bool => {
            Array::Bool(v.try_extract_array::<bool>().map_err(err)?.to_owned())
        }
        other => {
            return Err(err(format!(
                "output '{name}' has type {other:?}, which wcc cannot compare"
            )))
        }
    })
}

impl Prepared for OrtModel {
    fn run(&mut self, inputs: &NamedArrays) -> Result<NamedArrays, RunError> {
        let values: Vec<(String, DynValue)> = inputs
            .iter()
            .map(|(n, a)| Ok((n.clone(), to_value(a)?)))
            .collect::<Result<_, RunError>>()?;
        let outs = self.session.run(values).map_err(err)?;
        self.output_names
            .iter()
            .map(|n| Ok((n.clone(), from_value(&outs[n.as_str()], n)?)))
            .collect()
    }
}
