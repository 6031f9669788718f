//! Errors of the IR layer. Every error names what it is about (a file, a node, a value, a tensor)
//! so the CLI can print it as it is and exit with status 2.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum IrError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid ONNX model: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("tensor '{tensor}': {detail}")]
    Tensor { tensor: String, detail: String },
    #[error("tensor '{tensor}': external data {detail}")]
    ExternalData { tensor: String, detail: String },
    #[error("invalid graph{}: {detail}", graph_suffix(.graph))]
    Invalid { graph: String, detail: String },
    #[error("cannot write {path}: {detail}")]
    Write { path: PathBuf, detail: String },
    #[error("{0}")]
    Other(String),
}

fn graph_suffix(graph: &str) -> String {
    if graph.is_empty() {
        String::new()
    } else {
        format!(" '{graph}'")
    }
}

pub type Result<T> = std::result::Result<T, IrError>;

impl IrError {
    pub fn tensor(tensor: impl Into<String>, detail: impl Into<String>) -> Self {
        IrError::Tensor {
            tensor: tensor.into(),
            detail: detail.into(),
        }
    }
    pub fn invalid(graph: impl Into<String>, detail: impl Into<String>) -> Self {
        IrError::Invalid {
            graph: graph.into(),
            detail: detail.into(),
        }
    }
}
