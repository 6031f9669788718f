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

/// Calibration batches in two: what a fit sees, and what judges it (inputs the fit did not see).
pub struct Split {
    pub fit: Vec<NamedArrays>,
    pub judge: Vec<NamedArrays>,
    /// How it was split, for the report.
    pub how: String,
}

/// Splits `batches`: alternate batches when there are two or more, else the rows of the one
/// batch in halves (every input's first axis must be the same batch of two or more rows); a
/// batch that cannot be split both fits and judges, and `how` says so.
pub fn split(batches: &[NamedArrays]) -> Split {
    if batches.len() >= 2 {
        let pick =
            |r: usize| -> Vec<NamedArrays> { batches.iter().skip(r).step_by(2).cloned().collect() };
        return Split {
            fit: pick(0),
            judge: pick(1),
            how: format!(
                "fitted on batches 1, 3, … and judged on batches 2, 4, … of {}",
                batches.len()
            ),
        };
    }
    let rows: Vec<Option<usize>> = batches
        .iter()
        .flatten()
        .map(|(_, a)| a.shape().first().copied())
        .collect();
    if let [b] = batches {
        if let Some(Some(r)) = rows
            .first()
            .copied()
            .filter(|_| rows.windows(2).all(|w| w[0] == w[1]))
        {
            if r >= 2 {
                let half = |lo: usize, hi: usize| -> Option<NamedArrays> {
                    b.iter()
                        .map(|(n, a)| Some((n.clone(), a.slice_axis(0, lo, hi)?)))
                        .collect()
                };
                if let (Some(fit), Some(judge)) = (half(0, r / 2), half(r / 2, r)) {
                    return Split {
                        fit: vec![fit],
                        judge: vec![judge],
                        how: format!(
                            "fitted on rows 1-{} and judged on rows {}-{r} of the batch",
                            r / 2,
                            r / 2 + 1
                        ),
                    };
                }
            }
        }
    }
    Split {
        fit: batches.to_vec(),
        judge: batches.to_vec(),
        how: "fitted and judged on the same inputs (one batch whose rows cannot be split)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wcc_ir::eval::Array;

    fn batch(rows: usize) -> NamedArrays {
        let ids: Vec<i64> = (0..rows as i64 * 3).collect();
        vec![(
            "ids".to_string(),
            Array::I64(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[rows, 3]), ids).unwrap()),
        )]
    }

    #[test]
    fn calibration_splits_by_batches_else_by_rows_else_not_at_all() {
        let s = split(&[batch(2), batch(3), batch(4)]);
        assert_eq!((s.fit.len(), s.judge.len()), (2, 1));
        assert_eq!(s.judge[0][0].1.shape(), [3, 3]);
        let s = split(&[batch(4)]);
        assert_eq!(s.fit[0][0].1.shape(), [2, 3]);
        assert_eq!(s.judge[0][0].1.to_f64_vec()[0], 6.0, "rows 3-4");
        assert!(s.how.contains("rows"));
        let s = split(&[batch(1)]);
        assert_eq!(s.fit.len(), 1);
        assert!(s.how.contains("same inputs"));
    }
}
