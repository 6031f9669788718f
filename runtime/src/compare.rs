//! Output comparison: per output, max absolute error, relative L2 error and cosine similarity.

use serde::Serialize;
use wcc_ir::eval::Array;

use crate::inputs::NamedArrays;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutputFidelity {
    pub name: String,
    pub max_abs_error: f64,
    /// ‖a − b‖₂ / ‖a‖₂ (0 when both are zero).
    pub rel_l2_error: f64,
    /// a·b / (‖a‖ ‖b‖) (1 when both are zero).
    pub cosine: f64,
    /// Every element bitwise equal.
    pub bitwise_equal: bool,
}

/// Compares `b` (candidate) against `a` (reference): both must have the same outputs, with the
/// same shapes and element types. A mismatch is an error naming the output.
pub fn compare_outputs(a: &NamedArrays, b: &NamedArrays) -> Result<Vec<OutputFidelity>, String> {
    if a.len() != b.len() {
        return Err(format!(
            "the models have {} and {} outputs",
            a.len(),
            b.len()
        ));
    }
    compare_by_name(a, b, &|_| false)
}

/// Compares every output of `reference` with the `result` output of the same name. An output
/// for which `may_be_missing` says yes may be absent from `result`; any other missing output, or
/// a shape or element type that differs, is an error naming it.
pub fn compare_by_name(
    reference: &NamedArrays,
    result: &NamedArrays,
    may_be_missing: &dyn Fn(&str) -> bool,
) -> Result<Vec<OutputFidelity>, String> {
    let mut out = vec![];
    for (name, a) in reference {
        let Some((_, b)) = result.iter().find(|(n, _)| n == name) else {
            if may_be_missing(name) {
                continue;
            }
            return Err(format!(
                "output '{name}' of the original is missing from the result"
            ));
        };
        if a.shape() != b.shape() {
            return Err(format!(
                "output '{name}' has shape {:?} in the original but {:?} in the result",
                a.shape(),
                b.shape()
            ));
        }
        if a.dtype() != b.dtype() {
            return Err(format!(
                "output '{name}' is {} in the original but {} in the result",
                a.dtype(),
                b.dtype()
            ));
        }
        out.push(fidelity(name, a, b));
    }
    Ok(out)
}

pub fn fidelity(name: &str, a: &Array, b: &Array) -> OutputFidelity {
    let bitwise_equal = a == b || bitwise(a, b);
    let (va, vb) = (a.to_f64_vec(), b.to_f64_vec());
    let (mut max_abs, mut diff2, mut na2, mut nb2, mut dot) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (x, y) in va.iter().zip(&vb) {
        let d = (x - y).abs();
        if d.is_nan() || d > max_abs {
            max_abs = if d.is_nan() { f64::NAN } else { d };
        }
        diff2 += (x - y) * (x - y);
        na2 += x * x;
        nb2 += y * y;
        dot += x * y;
    }
    let rel = if na2 == 0.0 {
        if diff2 == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (diff2 / na2).sqrt()
    };
    let cosine = if na2 == 0.0 && nb2 == 0.0 {
        1.0
    } else if na2 == 0.0 || nb2 == 0.0 {
        0.0
    } else {
        dot / (na2.sqrt() * nb2.sqrt())
    };
    OutputFidelity {
        name: name.to_string(),
        max_abs_error: max_abs,
        rel_l2_error: rel,
        cosine,
        bitwise_equal,
    }
}

fn bitwise(a: &Array, b: &Array) -> bool {
    match (a, b) {
        (Array::F32(x), Array::F32(y)) => x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
        (Array::F64(x), Array::F64(y)) => x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
        _ => false,
    }
}
