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
        Some(p) => {
            match_inputs(model, load_npz(p).map_err(CliError::Input)?).map_err(CliError::Input)
        }
        None => {
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
                    seed: a.seed,
                    dims,
                    ..Default::default()
                },
            )
            .map_err(CliError::Input)
        }
    }
}

/// Runs both models on the same inputs and compares.
pub fn compare(
    backend: &Backend,
    a: &Model,
    b: &Model,
    inputs: &NamedArrays,
) -> Result<Vec<OutputFidelity>, CliError> {
    let run = |m: &Model, which: &str, inputs: &NamedArrays| {
        let bytes = wcc_ir::export::to_bytes(m).map_err(CliError::Ir)?;
        backend
            .run(&bytes, inputs)
            .map_err(|e| CliError::Run(format!("{which}: {e}")))
    };
    // The result may take fewer inputs (a dropped layer's cache): give each model its own.
    let for_b: NamedArrays = inputs
        .iter()
        .filter(|(n, _)| b.graph.inputs.iter().any(|v| v.name == *n))
        .cloned()
        .collect();
    let ra = run(a, "original", inputs)?;
    let rb = run(b, "result", &for_b)?;
    // ...and give fewer outputs: compare the ones both have.
    let ra: NamedArrays = if ra.len() > rb.len() {
        ra.into_iter()
            .filter(|(n, _)| rb.iter().any(|(m, _)| m == n))
            .collect()
    } else {
        ra
    };
    compare_outputs(&ra, &rb).map_err(CliError::Run)
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
