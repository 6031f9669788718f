//! Calibration statistics: run the model on calibration inputs with chosen internal values
//! exposed as extra outputs of a temporary copy, and accumulate what a pass needs batch by batch
//! (only one batch's activations are held at a time).

use std::collections::HashMap;

use wcc_ir::eval::Array;
use wcc_ir::infer::infer_graph;
use wcc_ir::{Model, TensorType, ValueInfo};

use crate::backend::Backend;
use crate::inputs::NamedArrays;

/// A copy of `model` that also outputs `names` (in that order, after its own outputs).
pub fn expose(model: &Model, names: &[String]) -> Model {
    let mut m = model.clone();
    let types = infer_graph(&m.graph, m.default_opset(), None);
    for n in names {
        if m.graph.outputs.iter().any(|o| o.name == *n) {
            continue;
        }
        let dtype = types.dtype(n);
        m.graph
            .outputs
            .push(ValueInfo::tensor(n, TensorType { dtype, shape: None }));
    }
    m
}

/// A compiled model and the input shapes it was compiled for.
type PreparedModel = Box<dyn crate::backend::Prepared>;

fn rows(a: &Array) -> Option<(usize, Vec<f64>)> {
    let width = *a.shape().last()?;
    (width > 0).then(|| (width, a.to_f64_vec()))
}

/// Receives one calibration batch's outputs by name.
pub type BatchFn<'a> = dyn FnMut(&HashMap<String, Array>) -> Result<(), String> + 'a;

/// Runs `model` on every batch with `names` exposed as outputs and hands `f` each batch's
/// outputs by name (only one batch's values are held at a time). The model is compiled once, and
/// again only when a batch's input shapes differ from the last one's.
pub fn for_each_batch(
    model: &Model,
    backend: &Backend,
    batches: &[NamedArrays],
    names: &[String],
    f: &mut BatchFn,
) -> Result<(), String> {
    let probe = expose(model, names);
    let mut prepared: Option<(Vec<Vec<usize>>, PreparedModel)> = None;
    for batch in batches {
        let batch = crate::inputs::own_inputs(model, batch);
        let shapes: Vec<Vec<usize>> = batch.iter().map(|(_, a)| a.shape().to_vec()).collect();
        if prepared.as_ref().is_none_or(|(s, _)| *s != shapes) {
            prepared = Some((
                shapes,
                backend
                    .prepare_model(&probe, &batch)
                    .map_err(|e| e.to_string())?,
            ));
        }
        let (_, model_run) = prepared.as_mut().expect("prepared above");
        let outs: HashMap<String, Array> = model_run
            .run(&batch)
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        f(&outs)?;
    }
    Ok(())
}

/// For each pair (x, y) of same-shaped values: the mean over every token (every row of the last
/// axis, over all batches) of cos(x[t], y[t]) — LLM-Drop's similarity of a sublayer's input and
/// output residual stream.
pub fn mean_row_cosine(
    model: &Model,
    backend: &Backend,
    batches: &[NamedArrays],
    pairs: &[(String, String)],
) -> Result<Vec<f64>, String> {
    let mut names: Vec<String> = vec![];
    for (x, y) in pairs {
        for n in [x, y] {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let (mut sums, mut counts) = (vec![0f64; pairs.len()], vec![0u64; pairs.len()]);
    for_each_batch(model, backend, batches, &names, &mut |outs| {
        for (k, (x, y)) in pairs.iter().enumerate() {
            let (Some(a), Some(b)) = (outs.get(x), outs.get(y)) else {
                return Err(format!("calibration run did not return '{x}' and '{y}'"));
            };
            if a.shape() != b.shape() {
                return Err(format!(
                    "'{x}' {:?} and '{y}' {:?} differ in shape",
                    a.shape(),
                    b.shape()
                ));
            }
            let (Some((w, va)), Some((_, vb))) = (rows(a), rows(b)) else {
                continue;
            };
            for (ra, rb) in va.chunks(w).zip(vb.chunks(w)) {
                let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
                for (p, q) in ra.iter().zip(rb) {
                    dot += p * q;
                    na += p * p;
                    nb += q * q;
                }
                let cos = if na == 0.0 || nb == 0.0 {
                    if na == nb {
                        1.0
                    } else {
                        0.0
                    }
                } else {
                    dot / (na.sqrt() * nb.sqrt())
                };
                sums[k] += cos;
                counts[k] += 1;
            }
        }
        Ok(())
    })?;
    Ok(sums
        .iter()
        .zip(&counts)
        .map(|(s, c)| if *c == 0 { f64::NAN } else { s / *c as f64 })
        .collect())
}
