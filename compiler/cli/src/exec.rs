//! Running models for verification, gates and benchmarks.

use wcc_ir::Model;
use wcc_runtime::compare::{compare_outputs, OutputFidelity};
use wcc_runtime::inputs::{load_npz, match_inputs, parse_dims, random_inputs, InputSpec};
use wcc_runtime::{Backend, NamedArrays, Provider};

use crate::cli::{BackendKind, Ep, ExecArgs, GateArgs};
use crate::commands::CliError;

pub fn backend(a: &ExecArgs) -> Backend {
    let provider = match a.ep {
        Ep::Cpu => Provider::Cpu,
        Ep::Cuda => Provider::Cuda,
        Ep::Tensorrt => Provider::TensorRt,
    };
    if a.backend == BackendKind::Ort || provider != Provider::Cpu {
        Backend::Ort {
            lib: a.ort_lib.clone(),
            provider,
        }
    } else {
        Backend::Tract
    }
}

/// The inputs for `model`: from --inputs, else seeded random.
pub fn inputs(model: &Model, a: &ExecArgs) -> Result<NamedArrays, CliError> {
    match &a.inputs {
        Some(p) => npz_inputs(model, p),
        None => random(model, a, a.seed),
    }
}

/// Arrays for `model` from an .npz file (one per graph input).
pub fn npz_inputs(model: &Model, p: &std::path::Path) -> Result<NamedArrays, CliError> {
    match_inputs(model, load_npz(p).map_err(CliError::Input)?).map_err(CliError::Input)
}

/// Seeded random inputs with the dims of `--dim`.
pub fn random(model: &Model, a: &ExecArgs, seed: u64) -> Result<NamedArrays, CliError> {
    let dims = a
        .dim
        .as_deref()
        .map(parse_dims)
        .transpose()
        .map_err(CliError::Usage)?
        .unwrap_or_default();
    random_inputs(
        model,
        &InputSpec {
            seed,
            dims,
            ..Default::default()
        },
    )
    .map_err(CliError::Input)
}

/// Runs `m` on the arrays it takes from `inputs` (a model with a dropped layer's cache takes
/// fewer).
pub fn run_on(backend: &Backend, m: &Model, inputs: &NamedArrays) -> Result<NamedArrays, String> {
    let own = wcc_runtime::inputs::own_inputs(m, inputs);
    let bytes = wcc_ir::export::to_bytes(m).map_err(|e| e.to_string())?;
    backend.run(&bytes, &own).map_err(|e| e.to_string())
}

/// Compares the outputs `b` has with the same outputs of `a` (a dropped layer's cache outputs
/// are gone from `b`).
pub fn compare_common(a: &NamedArrays, b: &NamedArrays) -> Result<Vec<OutputFidelity>, String> {
    let a: NamedArrays = a
        .iter()
        .filter(|(n, _)| b.iter().any(|(m, _)| m == n))
        .cloned()
        .collect();
    compare_outputs(&a, b)
}

/// Runs both models on the same inputs and compares.
pub fn compare(
    backend: &Backend,
    a: &Model,
    b: &Model,
    inputs: &NamedArrays,
) -> Result<Vec<OutputFidelity>, CliError> {
    let ra = run_on(backend, a, inputs).map_err(|e| CliError::Run(format!("original: {e}")))?;
    let rb = run_on(backend, b, inputs).map_err(|e| CliError::Run(format!("result: {e}")))?;
    compare_common(&ra, &rb).map_err(CliError::Run)
}

/// The first gate violation, if any.
pub fn gate_failure(g: &GateArgs, fid: &[OutputFidelity]) -> Option<String> {
    for f in fid {
        if let Some(min) = g.min_cosine {
            if f.cosine.is_nan() || f.cosine < min {
                return Some(format!(
                    "output '{}': cosine {:.6} < --min-cosine {min}",
                    f.name, f.cosine
                ));
            }
        }
        if let Some(max) = g.max_rel_error {
            if f.rel_l2_error.is_nan() || f.rel_l2_error > max {
                return Some(format!(
                    "output '{}': relative error {:.3e} > --max-rel-error {max}",
                    f.name, f.rel_l2_error
                ));
            }
        }
    }
    None
}

pub fn gate_set(g: &GateArgs) -> bool {
    g.min_cosine.is_some() || g.max_rel_error.is_some()
}
