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

/// The weight quantizers' calibration statistics: `H = XᵀX` of every value in `names` (each flattened to rows
/// of its last axis) over all batches, run on `backend`.
pub fn grams(
    model: &Model,
    backend: &wcc_runtime::Backend,
    batches: &[NamedArrays],
    names: &[String],
) -> Result<std::collections::HashMap<String, wcc_passes::gptq::Gram>, Error> {
    let mut grams: std::collections::HashMap<String, wcc_passes::gptq::Gram> = Default::default();
    wcc_runtime::calibrate::for_each_batch(model, backend, batches, names, &mut |outs| {
        for name in names {
            let a = outs
                .get(name)
                .ok_or_else(|| format!("calibration run did not return '{name}'"))?;
            let Some(&k) = a.shape().last() else {
                continue;
            };
            if k == 0 {
                continue;
            }
            let g = grams
                .entry(name.clone())
                .or_insert_with(|| wcc_passes::gptq::Gram::new(k));
            if g.k != k {
                return Err(format!("'{name}' changed width between batches"));
            }
            g.add_rows(&a.to_f64_vec());
        }
        Ok(())
    })
    .map_err(|e| Error::Run(format!("calibrating the weight quantization: {e}")))?;
    Ok(grams)
}
