//! Verification: run the original and the result on the same inputs and compare every output of
//! the original with the result's. An output the result lacks fails, unless a lossy pass removed
//! it on purpose (a dropped attention's KV cache), which is reported as such.

use std::collections::HashSet;

use serde::Serialize;
use wcc_ir::Model;
use wcc_runtime::{Backend, NamedArrays, OutputFidelity};

use crate::exec::run_on;

/// An output of the original that the result no longer has, on purpose.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemovedOutput {
    pub name: String,
    pub reason: String,
}

/// What verification measured (the report's `verification`).
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// The backend both models ran on.
    pub backend: String,
    /// The inputs they ran on.
    pub inputs: String,
    /// Per output of the result: its fidelity to the original's.
    pub outputs: Vec<OutputFidelity>,
    /// Outputs of the original that a lossy pass removed on purpose.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed_outputs: Vec<RemovedOutput>,
    pub gate_min_cosine: Option<f64>,
    pub gate_max_rel_error: Option<f64>,
    /// Verified region by region (`regions`): `outputs` are then the values each changed region
    /// computes (its anchors), not the model's outputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions: Option<crate::regions::RegionSummary>,
}

/// Why a verification could not pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The original cannot be run on the backend: nothing can be verified.
    OriginalCannotRun(String),
    /// The original runs and the result does not.
    ResultCannotRun(String),
    /// The result's outputs do not match the original's: one is missing, or has another shape
    /// or element type.
    Mismatch(String),
}

/// Compares every output of `reference` with the result's output of the same name. Outputs
/// named in `removed` may be missing; any other missing output, or a shape or element type that
/// differs, is an error naming it.
pub fn compare(
    reference: &NamedArrays,
    result: &NamedArrays,
    removed: &[RemovedOutput],
) -> Result<Vec<OutputFidelity>, String> {
    wcc_runtime::compare::compare_by_name(reference, result, &|name| {
        removed.iter().any(|r| r.name == name)
    })
}

/// Runs `original` and `result` on `inputs` (each takes the arrays it has inputs for) and
/// compares them.
///
/// Both run as one model (`side_by_side`): the result's graph beside the original's, reading the
/// same inputs and the same initializers wherever the result kept them, so the backend parses,
/// prepares and holds each unchanged weight once. Only when that combined model cannot run are
/// the two run apart, to say which of them fails.
pub fn run_and_compare(
    backend: &Backend,
    original: &Model,
    result: &Model,
    inputs: &NamedArrays,
    removed: &[RemovedOutput],
) -> Result<Vec<OutputFidelity>, Failure> {
    if let Some(joint) = side_by_side(original, result) {
        if let Ok(outs) = run_on(backend, &joint, inputs) {
            let (mut reference, mut got) = (vec![], vec![]);
            for (name, a) in outs {
                match name.strip_prefix(RESULT_PREFIX) {
                    Some(n) => got.push((n.to_string(), a)),
                    None => reference.push((name, a)),
                }
            }
            return compare(&reference, &got, removed).map_err(Failure::Mismatch);
        }
    }
    let reference =
        run_on(backend, original, inputs).map_err(|e| Failure::OriginalCannotRun(e.to_string()))?;
    compare_with(backend, &reference, result, inputs, removed)
}

/// What names of the result's graph start with in `side_by_side`.
const RESULT_PREFIX: &str = "wcc.result::";

/// One model that computes the original's outputs and, under `RESULT_PREFIX`-ed names, the
/// result's: the result's nodes and values are renamed (every name it defines, in subgraphs too),
/// except its graph inputs and the initializers it shares with the original unchanged. None when
/// the two differ in what the model around the graph says (IR version, opsets, functions) or the
/// result holds something renaming would not cover (sparse initializers).
pub fn side_by_side(original: &Model, result: &Model) -> Option<Model> {
    if original.ir_version != result.ir_version
        || original.opset_imports != result.opset_imports
        || original.functions != result.functions
        || !result.graph.rest.sparse_initializer.is_empty()
    {
        return None;
    }
    let mut keep: HashSet<String> = result.graph.inputs.iter().map(|v| v.name.clone()).collect();
    let shared = kept_initializers(original, result);
    keep.extend(shared.iter().cloned());
    let rename = |s: &str| -> String {
        if s.is_empty() || keep.contains(s) {
            s.to_string()
        } else {
            format!("{RESULT_PREFIX}{s}")
        }
    };
    let mut r = result.graph.clone();
    r.initializers.retain(|t| !shared.contains(t.name()));
    rename_graph(&mut r, &rename);
    let mut joint = original.clone();
    let g = &mut joint.graph;
    let known: HashSet<String> = g.inputs.iter().map(|v| v.name.clone()).collect();
    g.inputs
        .extend(r.inputs.into_iter().filter(|v| !known.contains(&v.name)));
    g.nodes.extend(r.nodes);
    g.initializers.extend(r.initializers);
    g.value_info.extend(r.value_info);
    g.outputs.extend(r.outputs);
    Some(joint)
}

/// The result's initializers that are the original's, unchanged (same name and storage).
pub fn kept_initializers(original: &Model, result: &Model) -> HashSet<String> {
    let by_name: std::collections::HashMap<&str, &wcc_ir::Tensor> = original
        .graph
        .initializers
        .iter()
        .map(|t| (t.name(), t))
        .collect();
    result
        .graph
        .initializers
        .iter()
        .filter(|t| by_name.get(t.name()).is_some_and(|o| o.same_storage(t)))
        .map(|t| t.name().to_string())
        .collect()
}

/// Applies `rename` to every value and node name of `g` and its subgraphs (graph inputs
/// included: a caller that keeps them says so through `rename`).
fn rename_graph(g: &mut wcc_ir::Graph, rename: &dyn Fn(&str) -> String) {
    for n in &mut g.nodes {
        n.name = rename(&n.name);
        for v in n.inputs.iter_mut().chain(n.outputs.iter_mut()) {
            *v = rename(v);
        }
        for a in &mut n.attributes {
            for sg in &mut a.graphs {
                rename_graph(sg, rename);
            }
        }
    }
    for v in g
        .inputs
        .iter_mut()
        .chain(g.outputs.iter_mut())
        .chain(g.value_info.iter_mut())
    {
        v.name = rename(&v.name);
    }
    for t in &mut g.initializers {
        t.proto.name = rename(&t.proto.name);
    }
}

/// Runs `result` on `inputs` and compares it with the original's outputs `reference`.
pub fn compare_with(
    backend: &Backend,
    reference: &NamedArrays,
    result: &Model,
    inputs: &NamedArrays,
    removed: &[RemovedOutput],
) -> Result<Vec<OutputFidelity>, Failure> {
    let got =
        run_on(backend, result, inputs).map_err(|e| Failure::ResultCannotRun(e.to_string()))?;
    compare(reference, &got, removed).map_err(Failure::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wcc_ir::eval::Array;

    fn arr(v: &[f32]) -> Array {
        Array::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[v.len()]), v.to_vec()).unwrap())
    }

    #[test]
    fn a_missing_output_fails_unless_removed_on_purpose() {
        let reference = vec![
            ("logits".to_string(), arr(&[1.0, 2.0])),
            ("present.1.key".to_string(), arr(&[3.0])),
        ];
        let result = vec![("logits".to_string(), arr(&[1.0, 2.0]))];
        let e = compare(&reference, &result, &[]).unwrap_err();
        assert!(
            e.contains("'present.1.key'") && e.contains("missing"),
            "{e}"
        );
        let removed = [RemovedOutput {
            name: "present.1.key".into(),
            reason: "KV cache of dropped attn 1".into(),
        }];
        let f = compare(&reference, &result, &removed).unwrap();
        assert_eq!(f.len(), 1);
        assert!(f[0].bitwise_equal);
        let other = vec![("logits".to_string(), arr(&[1.0]))];
        assert!(compare(&reference, &other, &removed)
            .unwrap_err()
            .contains("shape"));
    }
}
