//! wcc's execution backends and what is built on them: input generation (seeded random or .npz),
//! running a model on tract (embedded) or ONNX Runtime (CPU/CUDA/TensorRT), output comparison, and
//! latency benchmarking. Every backend call runs behind a guard that turns a panic inside the
//! backend into an error (`guard`).

pub mod backend;
pub mod bench;
pub mod calibrate;
pub mod compare;
pub mod guard;
pub mod inputs;
pub mod ort_backend;
pub mod rng;
pub mod tract_backend;

pub use backend::{Backend, Provider, RunError};
pub use compare::{compare_outputs, OutputFidelity};
pub use inputs::{load_npz, save_npz, InputSpec, NamedArrays};
