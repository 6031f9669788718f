//! Reductions: ReduceSum/Mean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare and ArgMax/ArgMin.
//! Axes come from the `axes` attribute (older opsets) or the second input (newer).

use ndarray::Axis;

use super::util::{known, norm_axes, norm_axis};
use super::AttrKind::*;
use super::{opt, Attr, EvalCx, InferCx, OpDef};
use crate::dtype::DataType;
use crate::eval::Array;
use crate::model::TensorType;

fn is_arg(op: &str) -> bool {
    op.starts_with("Arg")
}

fn infer_reduce(cx: &InferCx) -> Option<Vec<TensorType>> {
    let n = cx.node;
    let arg = is_arg(&n.op_type);
    let keep = n.attr_i("keepdims").unwrap_or(1) != 0;
    let axes: Option<Vec<i64>> = if arg {
        Some(vec![n.attr_i("axis").unwrap_or(0)])
    } else if n.attr_ints("axes").is_some() || cx.has_input(1) {
        cx.axes(1)
    } else {
        Some(vec![]) // all axes
    };
    let noop = n.attr_i("noop_with_empty_axes").unwrap_or(0) != 0;
    let s = match (cx.sh(0), axes) {
        (Some(s), Some(axes)) if axes.is_empty() && noop && !arg => Some(s),
        (Some(s), Some(axes)) => {
            let all = axes.is_empty();
            let ax = if all {
                vec![]
            } else {
                norm_axes(&axes, s.len())?
            };
            Some(
                s.iter()
                    .enumerate()
                    .filter_map(|(i, d)| {
                        if all || ax.contains(&i) {
                            keep.then(|| known(1))
                        } else {
                            Some(d.clone())
                        }
                    })
                    .collect(),
            )
        }
        _ => None,
    };
    Some(cx.out1(if arg { Some(DataType::I64) } else { cx.dt(0) }, s))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reduction {
    Sum,
    Mean,
    Max,
    Min,
}

/// Reduces `a` over `axes` (all when None or empty, unless `noop_empty`).
fn reduce(
    r: Reduction,
    a: &Array,
    axes: Option<Vec<i64>>,
    keep: bool,
    noop_empty: bool,
) -> Option<Array> {
    let rank = a.shape().len();
    let ax: Vec<usize> = match axes {
        Some(v) if !v.is_empty() => v
            .iter()
            .map(|x| norm_axis(*x, rank))
            .collect::<Option<Vec<_>>>()
            .map(|mut v| {
                v.sort_unstable();
                v.dedup();
                v
            })?,
        Some(_) if noop_empty => return Some(a.clone()),
        _ => (0..rank).collect(),
    };
    macro_rules! red {
        ($x:expr, $t:ty) => {{
            let mut out = $x.clone();
            for &i in ax.iter().rev() {
                let n = out.shape()[i];
                out = match r {
                    Reduction::Sum => out.sum_axis(Axis(i)),
                    Reduction::Mean if n > 0 => out.sum_axis(Axis(i)).mapv(|v| v / (n as $t)),
                    Reduction::Max if n > 0 => {
                        out.fold_axis(Axis(i), <$t>::NEG_INFINITY, |m, v| m.max(*v))
                    }
                    Reduction::Min if n > 0 => {
                        out.fold_axis(Axis(i), <$t>::INFINITY, |m, v| m.min(*v))
                    }
                    _ => return None,
                };
                if keep {
                    out = out.insert_axis(Axis(i));
                }
            }
            out
        }};
    }
    Some(match a {
        Array::F32(x) => Array::F32(red!(x, f32)),
        Array::F64(x) => Array::F64(red!(x, f64)),
        Array::I64(x) if r == Reduction::Sum => {
            let mut out = x.clone();
            for &i in ax.iter().rev() {
                out = out.map_axis(Axis(i), |l| l.iter().fold(0i64, |s, v| s.wrapping_add(*v)));
                if keep {
                    out = out.insert_axis(Axis(i));
                }
            }
            Array::I64(out)
        }
        _ => return None,
    })
}

fn eval_reduce(cx: &EvalCx) -> Option<Vec<Array>> {
    let n = cx.node;
    let axes = if n.attr_ints("axes").is_some() || cx.x(1).is_some() {
        Some(cx.axes(1)?)
    } else if n.inputs.get(1).is_some_and(|s| !s.is_empty()) {
        return None; // axes given but not constant
    } else {
        None
    };
    let keep = n.attr_i("keepdims").unwrap_or(1) != 0;
    let noop = n.attr_i("noop_with_empty_axes").unwrap_or(0) != 0;
    let x = cx.x(0)?;
    let out = match n.op_type.as_str() {
        "ReduceSum" => reduce(Reduction::Sum, x, axes, keep, noop)?,
        "ReduceMean" => reduce(Reduction::Mean, x, axes, keep, noop)?,
        "ReduceMax" => reduce(Reduction::Max, x, axes, keep, noop)?,
        "ReduceMin" => reduce(Reduction::Min, x, axes, keep, noop)?,
        "ReduceL2" | "ReduceSumSquare" => {
            let squared = match x {
                Array::F32(a) => Array::F32(a.mapv(|v| v * v)),
                Array::F64(a) => Array::F64(a.mapv(|v| v * v)),
                _ => return None,
            };
            let sum = reduce(Reduction::Sum, &squared, axes, keep, noop)?;
            if n.op_type == "ReduceL2" {
                super::elementwise::unary("Sqrt", &sum)?
            } else {
                sum
            }
        }
        _ => return None,
    };
    Some(vec![out])
}

const REDUCE_ATTRS: &[Attr] = &[
    opt("axes", Ints),
    opt("keepdims", Int),
    opt("noop_with_empty_axes", Int),
];
const ARG_ATTRS: &[Attr] = &[
    opt("axis", Int),
    opt("keepdims", Int),
    opt("select_last_index", Int),
];

const fn reduce_op(name: &'static str) -> OpDef {
    OpDef::new(name, (1, 2), (1, 1), REDUCE_ATTRS)
        .shape_inputs(&[1])
        .infer(infer_reduce)
}

pub(super) const OPS: &[OpDef] = &[
    reduce_op("ReduceSum").eval(eval_reduce),
    reduce_op("ReduceMean").eval(eval_reduce),
    reduce_op("ReduceMax").eval(eval_reduce),
    reduce_op("ReduceMin").eval(eval_reduce),
    reduce_op("ReduceL2").eval(eval_reduce),
    reduce_op("ReduceSumSquare").eval(eval_reduce),
    reduce_op("ReduceProd"),
    reduce_op("ReduceL1"),
    reduce_op("ReduceLogSum"),
    reduce_op("ReduceLogSumExp"),
    OpDef::new("ArgMax", (1, 1), (1, 1), ARG_ATTRS).infer(infer_reduce),
    OpDef::new("ArgMin", (1, 1), (1, 1), ARG_ATTRS).infer(infer_reduce),
];
