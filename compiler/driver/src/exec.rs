//! How models are run: the backend (tract embedded, or ONNX Runtime), and the inputs
//! (`--inputs FILE.npz`, else seeded random inputs that fit the model).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use wcc_ir::Model;
use wcc_runtime::inputs::{load_npz, match_inputs, own_inputs, random_inputs, InputSpec};
use wcc_runtime::{Backend, NamedArrays, RunError};

use crate::error::Error;

/// ONNX Runtime's execution providers.
pub use wcc_runtime::Provider;

/// Which backend runs the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// tract, unless the model uses ONNX Runtime's contrib ops (`com.microsoft`, which tract
    /// cannot run) or a GPU provider was asked for: then ONNX Runtime.
    #[default]
    Auto,
    /// tract, embedded: needs nothing installed.
    Tract,
    /// ONNX Runtime (`ort`), the library loaded at run time.
    Ort,
}

/// How models are run (verification, gates, calibration, `run`, `bench`).
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub backend: BackendChoice,
    /// ONNX Runtime's execution provider; cuda or tensorrt imply ONNX Runtime.
    pub provider: Option<Provider>,
    /// ONNX Runtime's shared library (else `ORT_DYLIB_PATH`, else Python's onnxruntime).
    pub ort_lib: Option<PathBuf>,
    /// Inputs as an .npz file, one array per graph input (else seeded random).
    pub inputs: Option<PathBuf>,
    /// Values for symbolic dims of random inputs (`--dim batch=8,seq=128`).
    pub dims: HashMap<String, i64>,
    /// Seed for random inputs.
    pub seed: u64,
}

/// Parses `--dim batch=8,seq=128`.
pub fn parse_dims(s: &str) -> Result<HashMap<String, i64>, String> {
    wcc_runtime::inputs::parse_dims(s)
}

/// Whether the model has nodes in ONNX Runtime's contrib domain.
fn uses_contrib_ops(model: &Model) -> bool {
    fn any(g: &wcc_ir::Graph) -> bool {
        g.nodes.iter().any(|n| {
            n.domain == "com.microsoft" || n.attributes.iter().flat_map(|a| &a.graphs).any(any)
        })
    }
    any(&model.graph)
}

/// Whether only ONNX Runtime may run the model: it uses contrib ops or 4-bit tensors.
pub(crate) fn needs_ort(model: &Model) -> bool {
    uses_contrib_ops(model) || uses_4bit_tensors(model)
}

/// Whether the model holds 4-bit integer initializers (int4/uint4), which tract cannot read.
fn uses_4bit_tensors(model: &Model) -> bool {
    let mut found = false;
    model.graph.for_each_graph(&mut |g| {
        found |= g
            .initializers
            .iter()
            .any(|t| matches!(t.dtype(), Ok(wcc_ir::DataType::I4 | wcc_ir::DataType::U4)))
    });
    found
}

impl ExecOptions {
    /// The backend that runs `model` (the original: the result is run on the same one).
    pub fn backend_for(&self, model: &Model) -> Backend {
        let provider = self.provider.unwrap_or(Provider::Cpu);
        let ort = match self.backend {
            BackendChoice::Ort => true,
            BackendChoice::Tract => provider != Provider::Cpu,
            BackendChoice::Auto => provider != Provider::Cpu || uses_contrib_ops(model),
        };
        if ort {
            Backend::Ort {
                lib: self.ort_lib.clone(),
                provider,
            }
        } else {
            Backend::Tract
        }
    }

    /// The backend that checks `result` against `original`: `backend_for(original)`, except that
    /// with `--backend auto` on CPU, a result that gained ONNX Runtime's contrib ops (`--int4`'s
    /// and `--int8`'s MatMulNBits) or 4-bit tensors (the DequantizeLinear form) is checked on
    /// ONNX Runtime when its library can be found. tract has no 4-bit tensors; it runs 4-bit
    /// MatMulNBits only, and tract 0.23.9 fails on one whose K comes from merging attention heads
    /// of a width that is not a multiple of 32 ("EinSum: Invalid reshape"); ONNX Runtime is where
    /// such a model will run. `wcc verify` picks its backend the same way.
    pub fn backend_for_result(&self, original: &Model, result: &Model) -> Backend {
        let gained = self.backend == BackendChoice::Auto
            && self.provider.unwrap_or(Provider::Cpu) == Provider::Cpu
            && !needs_ort(original)
            && needs_ort(result);
        if gained && wcc_runtime::ort_backend::find_library(self.ort_lib.as_deref()).is_ok() {
            Backend::Ort {
                lib: self.ort_lib.clone(),
                provider: Provider::Cpu,
            }
        } else {
            self.backend_for(original)
        }
    }

    /// Why `backend_for` chose ONNX Runtime on its own, if it did (for messages).
    pub fn auto_reason(&self, model: &Model) -> Option<&'static str> {
        (self.backend == BackendChoice::Auto
            && self.provider.unwrap_or(Provider::Cpu) == Provider::Cpu
            && uses_contrib_ops(model))
        .then_some(
            "the model uses ONNX Runtime's contrib ops (com.microsoft), which tract cannot run",
        )
    }

    /// Seeded random inputs for `model` (`--dim`, seed `seed`).
    pub fn random(&self, model: &Model, seed: u64) -> Result<NamedArrays, String> {
        random_inputs(
            model,
            &InputSpec {
                seed,
                dims: self.dims.clone(),
                ..Default::default()
            },
        )
    }

    /// The inputs for `model`: `--inputs`, else seeded random; with a description for reports.
    /// An unusable inputs file is bad input; random inputs that cannot be made are `Err(Run)`
    /// (the model cannot be run without an inputs file).
    pub fn inputs(&self, model: &Model) -> Result<(NamedArrays, String), Error> {
        match &self.inputs {
            Some(p) => Ok((
                npz_inputs(model, p)?,
                format!("inputs from {}", p.display()),
            )),
            None => Ok((
                self.random(model, self.seed).map_err(Error::Run)?,
                format!("seeded random inputs (seed {})", self.seed),
            )),
        }
    }
}

/// Arrays for `model` from an .npz file (one per graph input).
pub fn npz_inputs(model: &Model, p: &Path) -> Result<NamedArrays, Error> {
    match_inputs(model, load_npz(p).map_err(Error::Input)?).map_err(Error::Input)
}

/// The most one value may take when a backend runs a model: a model that asks for more (with
/// the inputs it is given) is refused, naming the value, before a backend tries to allocate it.
pub const RUN_BUDGET_BYTES: u64 = 16 << 30;

/// Refuses to run `m` on `inputs` when shape inference sizes a value over `RUN_BUDGET_BYTES`.
pub fn check_budget(m: &Model, inputs: &NamedArrays) -> Result<(), RunError> {
    let shapes: Vec<(String, Vec<usize>)> = inputs
        .iter()
        .map(|(n, a)| (n.clone(), a.shape().to_vec()))
        .collect();
    wcc_ir::validate::check_run_budget(m, &shapes, RUN_BUDGET_BYTES)
        .map_err(|e| RunError::Setup(e.to_string()))
}

/// `m` run on every batch (what searches compare their candidates with), or an `Error::Run`
/// saying what could not be done (`doing`) and why.
pub fn run_each(
    backend: &Backend,
    m: &Model,
    batches: &[NamedArrays],
    doing: &str,
) -> Result<Vec<NamedArrays>, Error> {
    batches
        .iter()
        .map(|b| {
            run_on(backend, m, b).map_err(|e| {
                Error::Run(format!(
                    "cannot {doing}: {} cannot run the model: {e}",
                    backend.label()
                ))
            })
        })
        .collect()
}

/// Runs `m` on the arrays it takes from `inputs` (a model whose dropped layer's cache left its
/// interface takes fewer), within the budget.
pub fn run_on(backend: &Backend, m: &Model, inputs: &NamedArrays) -> Result<NamedArrays, RunError> {
    let own = own_inputs(m, inputs);
    check_budget(m, &own)?;
    backend.run_model(m, &own)
}
