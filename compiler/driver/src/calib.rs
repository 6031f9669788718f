//! Calibration inputs for the passes that measure the model (sublayer scores, the compress
//! search): `--calib FILE.npz`, else `--inputs`, else seeded random batches.

use std::path::Path;

use wcc_ir::Model;
use wcc_runtime::NamedArrays;

use crate::error::Error;
use crate::exec::{npz_inputs, ExecOptions};

/// Random calibration batches when no file is given (seeds `seed`, `seed + 1`, …).
pub const RANDOM_BATCHES: u64 = 4;

/// The calibration batches for `model`, and a description for the report.
pub fn batches(
    model: &Model,
    calib: Option<&Path>,
    exec: &ExecOptions,
) -> Result<(Vec<NamedArrays>, String), Error> {
    if let Some(p) = calib.or(exec.inputs.as_deref()) {
        return Ok((vec![npz_inputs(model, p)?], p.display().to_string()));
    }
    let batches = (0..RANDOM_BATCHES)
        .map(|k| exec.random(model, exec.seed + k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::Input)?;
    Ok((
        batches,
        format!(
            "{RANDOM_BATCHES} seeded random batches (seed {})",
            exec.seed
        ),
    ))
}
