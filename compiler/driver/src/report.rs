//! The reports: what `wcc optimize` did (written as JSON with `--report`) and what `wcc inspect`
//! finds in a model.

use std::path::PathBuf;

use serde::Serialize;
use wcc_ir::pass::PassRecord;
use wcc_ir::stats::GraphStats;
use wcc_ir::Model;

use wcc_runtime::bench::Latency;
use wcc_runtime::OutputFidelity;

use crate::compress::LayerDropReport;
use crate::verify::{RemovedOutput, Verification};

#[derive(Debug, Clone, Serialize)]
pub struct OptimizeReport {
    pub wcc_version: &'static str,
    pub input: PathBuf,
    pub output: PathBuf,
    /// `-O0`, `-O1` or `-O compress`.
    pub level: String,
    /// `--target`, when not portable.
    #[serde(skip_serializing_if = "is_portable")]
    pub target: crate::Target,
    pub passes: Vec<PassRecord>,
    pub before: GraphStats,
    pub after: GraphStats,
    pub optimize_ms: f64,
    /// Original and result run and compared (None: not verified, or nothing to verify at -O0).
    pub verification: Option<Verification>,
    /// Why the result was written without verification (the original cannot be run, no gate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_verified: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_drop: Option<LayerDropReport>,
    /// `-O compress`'s search over shared attention atoms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_search: Option<crate::share::ShareSearch>,
    /// `-O compress`'s weight quantization plan.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<crate::planner::PlanReport>,
    pub output_bytes: u64,
    pub external_data_bytes: u64,
    /// Of `external_data_bytes`, those the passes had written already and that stayed where
    /// they were (wcc's scratch file became the data file): not copied.
    #[serde(skip_serializing_if = "is_zero")]
    pub external_data_in_place_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_data_file: Option<PathBuf>,
}

fn is_portable(t: &crate::Target) -> bool {
    *t == crate::Target::Portable
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `wcc inspect`: a model's interface, opsets, and statistics.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub ir_version: i64,
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    /// (name, type) of each graph input, e.g. `i64[batch,seq]`.
    pub inputs: Vec<(String, String)>,
    pub outputs: Vec<(String, String)>,
    pub stats: GraphStats,
    pub functions: usize,
    pub external_tensors: usize,
}

impl InspectReport {
    pub fn of(m: &Model) -> Self {
        let ty = |v: &wcc_ir::ValueInfo| match v.tensor_type() {
            Some(t) => format!(
                "{}[{}]",
                t.dtype.map(|d| d.name()).unwrap_or("?"),
                t.shape
                    .as_ref()
                    .map(|s| s
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(","))
                    .unwrap_or("..".into())
            ),
            None => "<non-tensor>".into(),
        };
        InspectReport {
            ir_version: m.ir_version,
            opsets: m
                .opset_imports
                .iter()
                .map(|(d, v)| {
                    (
                        if d.is_empty() {
                            "ai.onnx".into()
                        } else {
                            d.clone()
                        },
                        *v,
                    )
                })
                .collect(),
            producer: format!("{} {}", m.rest.producer_name, m.rest.producer_version)
                .trim()
                .to_string(),
            inputs: m
                .graph
                .inputs
                .iter()
                .map(|v| (v.name.clone(), ty(v)))
                .collect(),
            outputs: m
                .graph
                .outputs
                .iter()
                .map(|v| (v.name.clone(), ty(v)))
                .collect(),
            stats: GraphStats::of(m),
            functions: m.functions.len(),
            external_tensors: m
                .graph
                .initializers
                .iter()
                .filter(|t| t.is_external())
                .count(),
        }
    }
}

/// `wcc verify A B`: the backend both ran on and, per output of A, B's fidelity to it.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub backend: String,
    pub inputs: String,
    pub outputs: Vec<OutputFidelity>,
    /// Outputs of A that B lost on purpose (a sublayer wcc dropped took its KV cache along).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed_outputs: Vec<RemovedOutput>,
}

/// `wcc bench`: latency on a backend.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: PathBuf,
    pub backend: String,
    pub load_ms: f64,
    pub latency: Latency,
}
