//! Gather and scatter: Gather (inference, shape arithmetic, evaluation, and the fact that its
//! indices address axis `axis` of its data, which random inputs use), GatherElements, GatherND,
//! ScatterND, ScatterElements, OneHot, NonZero, TopK.

use ndarray::{ArrayD, Axis};

use super::util::norm_axis;
use super::AttrKind::*;
use super::{opt, EvalCx, InferCx, OpDef};
use crate::dtype::DataType;
use crate::eval::{each_opt, reshape, Array};
use crate::model::{Dim, Node, TensorType};

fn infer_gather(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = match (cx.sh(0), cx.sh(1)) {
        (Some(d), Some(i)) => norm_axis(cx.node.attr_i("axis").unwrap_or(0), d.len()).map(|a| {
            let mut o = d[..a].to_vec();
            o.extend(i);
            o.extend_from_slice(&d[a + 1..]);
            o
        }),
        _ => None,
    };
    Some(cx.out1(cx.dt(0), s))
}

/// `Gather(shape_vector, indices)` on symbolic shape vectors.
fn propagate_gather(cx: &InferCx) -> Option<Vec<Dim>> {
    if cx.node.attr_i("axis").unwrap_or(0) != 0 {
        return None;
    }
    let data = cx.symv(0)?;
    let len = data.len() as i64;
    cx.ints(1)?
        .iter()
        .map(|&i| {
            let i = if i < 0 { i + len } else { i };
            (0..len).contains(&i).then(|| data[i as usize].clone())
        })
        .collect()
}

fn gather<T: Clone>(
    a: &ArrayD<T>,
    axis: usize,
    idx: &[i64],
    idx_shape: &[usize],
) -> Option<ArrayD<T>> {
    let d = a.shape()[axis] as i64;
    let idx: Vec<usize> = idx
        .iter()
        .map(|&i| {
            let i = if i < 0 { i + d } else { i };
            (0..d).contains(&i).then_some(i as usize)
        })
        .collect::<Option<_>>()?;
    let sel = a.select(Axis(axis), &idx);
    let mut shape = a.shape()[..axis].to_vec();
    shape.extend_from_slice(idx_shape);
    shape.extend_from_slice(&a.shape()[axis + 1..]);
    reshape(&sel, &shape)
}

fn eval_gather(cx: &EvalCx) -> Option<Vec<Array>> {
    let (a, idx) = (cx.x(0)?, cx.x(1)?);
    let ax = norm_axis(cx.node.attr_i("axis").unwrap_or(0), a.shape().len())?;
    let iv = idx.as_i64s()?;
    let ish = idx.shape().to_vec();
    Some(vec![each_opt!(a, v => gather(v, ax, &iv, &ish))])
}

/// Gather's indices (input 1) address axis `axis` of its data (input 0).
fn gather_index(n: &Node) -> Option<(usize, usize, i64)> {
    Some((0, 1, n.attr_i("axis").unwrap_or(0)))
}

fn infer_gather_elements(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.out1(cx.dt(0), cx.sh(1)))
}

fn infer_scatter(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.same_as_input())
}

fn infer_nonzero(cx: &InferCx) -> Option<Vec<TensorType>> {
    let r = cx.rank(0).map(|r| vec![Dim::Known(r as i64), Dim::Unknown]);
    Some(cx.out1(Some(DataType::I64), r))
}

fn infer_topk(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = cx.sh(0).and_then(|mut s| {
        let a = norm_axis(cx.node.attr_i("axis").unwrap_or(-1), s.len())?;
        let k = match cx.node.attr_i("k") {
            Some(k) => Some(k),
            None => cx.ints(1).and_then(|v| v.first().copied()),
        };
        s[a] = k.filter(|k| *k >= 0).map_or(Dim::Unknown, Dim::Known);
        Some(s)
    });
    Some(vec![
        TensorType {
            dtype: cx.dt(0),
            shape: s.clone(),
        },
        TensorType {
            dtype: Some(DataType::I64),
            shape: s,
        },
    ])
}

const REDUCTION: super::Attr = opt("reduction", Str);

pub(super) const OPS: &[OpDef] = &[
    OpDef::new("Gather", (2, 2), (1, 1), &[opt("axis", Int)])
        .infer(infer_gather)
        .propagate(propagate_gather)
        .eval(eval_gather)
        .index(gather_index),
    OpDef::new("GatherElements", (2, 2), (1, 1), &[opt("axis", Int)]).infer(infer_gather_elements),
    OpDef::new("GatherND", (2, 2), (1, 1), &[opt("batch_dims", Int)]),
    OpDef::new("ScatterND", (3, 3), (1, 1), &[REDUCTION]).infer(infer_scatter),
    OpDef::new(
        "ScatterElements",
        (3, 3),
        (1, 1),
        &[opt("axis", Int), REDUCTION],
    )
    .infer(infer_scatter),
    OpDef::new("OneHot", (3, 3), (1, 1), &[opt("axis", Int)]),
    OpDef::new("NonZero", (1, 1), (1, 1), &[]).infer(infer_nonzero),
    OpDef::new(
        "TopK",
        (1, 2),
        (2, 2),
        &[
            opt("axis", Int),
            opt("k", Int),
            opt("largest", Int),
            opt("sorted", Int),
        ],
    )
    .shape_inputs(&[1])
    .infer(infer_topk),
];
