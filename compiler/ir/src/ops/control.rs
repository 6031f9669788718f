//! Control flow: If, Loop, Scan. Their bodies are IR subgraphs (validated recursively); wcc
//! infers nothing through them and never evaluates them.

use super::AttrKind::*;
use super::{opt, req, OpDef, MANY};

pub(super) const OPS: &[OpDef] = &[
    OpDef::new(
        "If",
        (1, 1),
        (1, MANY),
        &[req("then_branch", Subgraph), req("else_branch", Subgraph)],
    ),
    OpDef::new("Loop", (0, MANY), (1, MANY), &[req("body", Subgraph)]),
    OpDef::new(
        "Scan",
        (1, MANY),
        (1, MANY),
        &[
            req("body", Subgraph),
            req("num_scan_inputs", Int),
            opt("scan_input_axes", Ints),
            opt("scan_input_directions", Ints),
            opt("scan_output_axes", Ints),
            opt("scan_output_directions", Ints),
        ],
    ),
];
