//! The other commands of `wcc`, as functions: read and validate, print, inspect, structure, run,
//! verify two models, bench, list the passes.

use std::path::Path;
use std::time::Instant;

use wcc_ir::{import, print as printer, validate, Model};
use wcc_runtime::NamedArrays;

use crate::compress::removed_by_drop;
use crate::error::Error;
use crate::exec::{check_budget, run_on, ExecOptions};
use crate::gate::Gate;
use crate::pipeline::{self, PassInfo};
use crate::render;
use crate::report::{BenchReport, InspectReport, VerifyReport};
use crate::verify::{run_and_compare, Failure};
use crate::Structure;

/// Reads and validates a model.
pub fn load(path: &Path) -> Result<Model, Error> {
    let m = import::load(path)?;
    validate::validate(&m)?;
    Ok(m)
}

/// `wcc print`: the canonical text form.
pub fn print(path: &Path) -> Result<String, Error> {
    Ok(printer::print_model(&load(path)?))
}

/// `wcc inspect`.
pub fn inspect(path: &Path) -> Result<InspectReport, Error> {
    Ok(InspectReport::of(&load(path)?))
}

/// `wcc inspect --structure`: the transformer structure of the model after `-O1` cleanup.
pub fn structure(path: &Path) -> Result<Structure, Error> {
    let mut m = load(path)?;
    wcc_passes::optimize(
        &mut m,
        wcc_passes::pipeline(crate::Level::O1.passes_level()),
    )?;
    Ok(wcc_passes::structure::discover(&m))
}

/// `wcc passes`.
pub fn passes() -> Vec<PassInfo> {
    pipeline::list()
}

/// `wcc run`: the model's outputs on `--inputs` or seeded random inputs.
pub fn run(path: &Path, exec: &ExecOptions) -> Result<NamedArrays, Error> {
    let m = load(path)?;
    let (inputs, _) = exec.inputs(&m)?;
    run_on(&exec.backend_for(&m), &m, &inputs).map_err(|e| Error::Run(e.to_string()))
}

/// Writes arrays to an .npz file.
pub fn write_npz(path: &Path, arrays: &NamedArrays) -> Result<(), Error> {
    wcc_runtime::save_npz(path, arrays).map_err(Error::Input)
}

/// `wcc verify A B`: runs both on the same inputs (made for A) and compares every output of A
/// with B's. A cannot be run: error (exit 2). B cannot be run while A can, lacks an output of
/// A, or fails the gate: `Error::Gate` (exit 1), with the figures as details when there are any.
/// Outputs that wcc's layer dropping removed from B on purpose (the KV cache of a sublayer its
/// `wcc.dropped` names) are listed, not failed.
pub fn verify_models(
    reference: &Path,
    candidate: &Path,
    exec: &ExecOptions,
    gate: Gate,
) -> Result<VerifyReport, Error> {
    let a = load(reference)?;
    let b = load(candidate)?;
    // A quantized candidate (4- or 8-bit MatMulNBits, int4 tensors) is checked where it runs.
    let backend = exec.backend_for_result(&a, &b);
    let label = backend.label();
    let (inputs, described) = exec.inputs(&a)?;
    let removed = removed_by_drop(&a, &b);
    let outputs = run_and_compare(&backend, &a, &b, &inputs, &removed).map_err(|f| match f {
        Failure::OriginalCannotRun(e) => {
            Error::Run(format!("{label} cannot run {}: {e}", reference.display()))
        }
        Failure::ResultCannotRun(e) => Error::gate(format!(
            "verification failed: {} cannot be run by {label} while {} can: {e}",
            candidate.display(),
            reference.display()
        )),
        Failure::Mismatch(e) => Error::gate(format!("verification failed: {e}")),
    })?;
    let report = VerifyReport {
        backend: label,
        inputs: described,
        outputs,
        removed_outputs: removed,
    };
    match gate.check(&report.outputs) {
        Some(msg) => Err(Error::Gate {
            message: format!("fidelity gate failed: {msg}"),
            details: Some(render::verify(&report)),
        }),
        None => Ok(report),
    }
}

/// `wcc bench`: load time, then latency over `runs` timed runs after `warmup` untimed ones.
pub fn bench(
    path: &Path,
    exec: &ExecOptions,
    warmup: usize,
    runs: usize,
) -> Result<BenchReport, Error> {
    let m = load(path)?;
    let (inputs, _) = exec.inputs(&m)?;
    let inputs = wcc_runtime::inputs::own_inputs(&m, &inputs);
    check_budget(&m, &inputs).map_err(|e| Error::Run(e.to_string()))?;
    let bytes = wcc_ir::export::to_bytes(&m)?;
    let backend = exec.backend_for(&m);
    let t0 = Instant::now();
    let mut prepared = backend
        .prepare_optimized(&bytes, &inputs)
        .map_err(|e| Error::Run(e.to_string()))?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let latency = wcc_runtime::bench::measure(prepared.as_mut(), &inputs, warmup, runs)
        .map_err(|e| Error::Run(e.to_string()))?;
    Ok(BenchReport {
        model: path.to_path_buf(),
        backend: backend.label(),
        load_ms,
        latency,
    })
}
