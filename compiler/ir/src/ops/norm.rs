//! Normalizations: LayerNormalization, RMSNormalization, BatchNormalization,
//! InstanceNormalization, GroupNormalization, Softmax/LogSoftmax/Hardmax, LRN.

use super::util::{known, norm_axis};
use super::AttrKind::*;
use super::{opt, InferCx, OpDef};
use crate::dtype::DataType;
use crate::model::TensorType;

fn same(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.same_as_input())
}

/// LayerNormalization: Y like X; Mean and InvStdDev (optional outputs) reduced from `axis` on.
fn infer_layer_norm(cx: &InferCx) -> Option<Vec<TensorType>> {
    let mut v = cx.same_as_input();
    if v.len() > 1 {
        let axis = cx.node.attr_i("axis").unwrap_or(-1);
        let red = cx.sh(0).and_then(|s| {
            let a = norm_axis(axis, s.len())?;
            Some(
                s.iter()
                    .enumerate()
                    .map(|(i, d)| if i < a { d.clone() } else { known(1) })
                    .collect(),
            )
        });
        let stats = TensorType {
            dtype: Some(DataType::F32),
            shape: red,
        };
        for t in v.iter_mut().skip(1) {
            *t = stats.clone();
        }
    }
    Some(v)
}

fn check_epsilon(n: &crate::model::Node) -> Result<(), String> {
    match n.attr_f("epsilon") {
        Some(e) if !e.is_finite() || e < 0.0 => Err(format!(
            "{} epsilon {e} must be finite and non-negative",
            n.op_type
        )),
        _ => Ok(()),
    }
}

const AXIS: super::Attr = opt("axis", Int);
const EPS: super::Attr = opt("epsilon", Float);
const STASH: super::Attr = opt("stash_type", Int);

pub(super) const OPS: &[OpDef] = &[
    OpDef::new("LayerNormalization", (2, 3), (1, 3), &[AXIS, EPS, STASH])
        .check(check_epsilon)
        .infer(infer_layer_norm),
    OpDef::new("RMSNormalization", (2, 2), (1, 1), &[AXIS, EPS, STASH])
        .check(check_epsilon)
        .infer(same),
    OpDef::new(
        "BatchNormalization",
        (5, 5),
        (1, 3),
        &[
            EPS,
            opt("momentum", Float),
            opt("training_mode", Int),
            opt("spatial", Int),
        ],
    )
    .check(check_epsilon)
    .infer(same),
    OpDef::new("InstanceNormalization", (3, 3), (1, 1), &[EPS])
        .check(check_epsilon)
        .infer(same),
    OpDef::new(
        "GroupNormalization",
        (3, 3),
        (1, 1),
        &[EPS, opt("num_groups", Int), STASH],
    )
    .check(check_epsilon)
    .infer(same),
    OpDef::new("Softmax", (1, 1), (1, 1), &[AXIS]).infer(same),
    OpDef::new("LogSoftmax", (1, 1), (1, 1), &[AXIS]).infer(same),
    OpDef::new("Hardmax", (1, 1), (1, 1), &[AXIS]).infer(same),
    OpDef::new("LpNormalization", (1, 1), (1, 1), &[AXIS, opt("p", Int)]).infer(same),
    OpDef::new(
        "LRN",
        (1, 1),
        (1, 1),
        &[
            opt("alpha", Float),
            opt("beta", Float),
            opt("bias", Float),
            opt("size", Int),
        ],
    )
    .infer(same),
];
