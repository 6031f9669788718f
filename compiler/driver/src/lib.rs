//! What `wcc optimize` (and the other `wcc` commands) do, as a library: optimization levels and
//! the pipeline built from them, fidelity gates, verification (running original and result and
//! comparing them), the choice of verification and calibration inputs and of the backend, the
//! `-O compress` search (sublayer dropping under the gate, then the weight quantization planner),
//! and the reports. The `wcc` binary parses arguments into [`OptimizeOptions`] and friends, calls
//! this crate, and prints.
//!
//! Modules depend one way: `error`, `level`, `gate`, `pipeline` ← `exec` ← `calib`, `verify` ←
//! `compress`, `quantize`, `planner` ← `report` ← `render` ← `commands` ← `optimize`.

pub mod calib;
pub mod commands;
pub mod compress;
pub mod error;
pub mod exec;
pub mod gate;
pub mod level;
pub mod optimize;
pub mod pipeline;
pub mod planner;
pub mod quantize;
pub mod regions;
pub mod render;
pub mod report;
pub mod share;
pub mod target;
pub mod verify;

pub use commands::{bench, inspect, load, passes, print, run, structure, verify_models, write_npz};
pub use error::Error;
pub use exec::{BackendChoice, ExecOptions, Provider};
pub use gate::Gate;
pub use level::Level;
pub use optimize::{optimize, DumpFn, OptimizeOptions, Optimized, Stage};
pub use pipeline::{EgraphLimits, PassInfo, PipelineConfig};
pub use report::{BenchReport, InspectReport, OptimizeReport, VerifyReport};
pub use target::Target;
pub use verify::{RemovedOutput, Verification};
/// `--drop SPEC`: which sublayers, how many.
pub use wcc_passes::layer_drop::DropSpec;
/// What `--vq-bits` quantizes and how.
pub use wcc_passes::shared_atoms::{AtomSpec, GroupSpec, RankSpec, ShareEmit, ShareOptions};
/// What structure discovery found (`wcc inspect --structure`).
pub use wcc_passes::structure::Structure;
/// What `--int4` quantizes and how.
pub use wcc_passes::weight_int::{IntBits, IntForm, IntMethod, IntOptions};
pub use wcc_passes::weight_vq::VqOptions;
/// Which weights the weight passes may take (`--quant-include`, `--quant-exclude`).
pub use wcc_passes::{NameFilter, Scope};
/// A panic's message and where it was raised (for the binary's last-resort report).
pub use wcc_runtime::guard::describe as describe_panic;
/// Per-output fidelity figures.
pub use wcc_runtime::OutputFidelity;

/// wcc's version, as recorded in reports and in the output's metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
