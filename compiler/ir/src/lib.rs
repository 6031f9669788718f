//! wcc's IR: lossless ONNX import/export, the graph model, shape inference, validation, a reference
//! evaluator for constant folding, the canonical printer and the pass manager.

pub mod dtype;
pub mod error;
pub mod eval;
pub mod export;
pub mod import;
pub mod infer;
pub mod model;
pub mod ops;
pub mod pass;
pub mod print;
pub mod rawstr;
pub mod safetensors;
pub mod spill;
pub mod stats;
pub mod tensor;
pub mod validate;
pub mod wire;

pub use dtype::DataType;
pub use error::{IrError, Result};
pub use model::{Attribute, Dim, Graph, Model, Node, TensorType, ValueInfo, ValueType};
pub use tensor::Tensor;
