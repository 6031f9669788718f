//! wcc's e-graph engine on `egg`: a language over the algebraic ONNX ops (everything else opaque
//! but connected), an analysis carrying dtype, shape and constant-ness, rules loaded from data
//! files (built-in and user `--rules`), and extraction by a separate cost model (FLOPs at expected
//! shapes plus parameter bytes, shared subterms counted once) under node/iteration/time limits.

pub mod analysis;
pub mod engine;
pub mod extract;
pub mod lang;
pub mod rules;

pub use engine::{run_graph, Limits, Stats};
pub use extract::CostModel;
pub use rules::{load_rules, load_rules_with, parse_rules, Rule, ATTENTION_SCALE};
