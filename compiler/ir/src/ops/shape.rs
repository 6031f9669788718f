//! Shape and data movement: Shape, Size, Reshape, Flatten, Unsqueeze, Squeeze, Transpose, Concat,
//! Split, Slice, Expand, Tile, ConstantOfShape, Range, Constant, EyeLike, Pad, Trilu, CumSum,
//! Resize.

use ndarray::{ArrayD, Axis, IxDyn, Slice};

use super::util::{
    broadcast, broadcast_static, known, norm_axes, norm_axis, prod, shape_range, slice_bounds,
    Perm, MAX_PROPAGATED_INTS, MAX_RANK,
};
use super::AttrKind::*;
use super::{opt, req, EvalCx, InferCx, OpDef, MANY};
use crate::dtype::DataType;
use crate::eval::{each, each_opt, fits, reshape, Array, MAX_EVAL_ELEMENTS};
use crate::model::{Dim, Node, TensorType};
use crate::tensor::Tensor;

fn same(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.same_as_input())
}

/// `n` unknown dims, when `n` is a plausible rank.
fn unknown_dims(n: i64) -> Option<Vec<Dim>> {
    (0..=MAX_RANK)
        .contains(&n)
        .then(|| vec![Dim::Unknown; n as usize])
}

/// Passes the symbolic contents of input 0 through when the output has rank ≤ 1 (Identity-like
/// reshapes of shape vectors).
fn propagate_reshaping(cx: &InferCx) -> Option<Vec<Dim>> {
    let out_rank = cx
        .node
        .outputs
        .first()
        .and_then(|o| cx.types.shape(o))
        .map(|s| s.len());
    out_rank
        .is_none_or(|r| r <= 1)
        .then(|| cx.symv(0).cloned())
        .flatten()
}

// ---- Shape, Size ----

fn infer_shape(cx: &InferCx) -> Option<Vec<TensorType>> {
    let len = cx.rank(0).map(|r| {
        let (s, e) = shape_range(cx.node, r);
        (e - s) as i64
    });
    Some(cx.out1(Some(DataType::I64), len.map(|l| vec![known(l)])))
}

fn propagate_shape(cx: &InferCx) -> Option<Vec<Dim>> {
    let s = cx.sh(0)?;
    let (a, b) = shape_range(cx.node, s.len());
    Some(s[a..b].to_vec())
}

fn eval_shape(cx: &EvalCx) -> Option<Vec<Array>> {
    let s = cx.x(0)?.shape();
    let (a, b) = shape_range(cx.node, s.len());
    let v: Vec<i64> = s[a..b].iter().map(|d| *d as i64).collect();
    Some(vec![Array::I64(
        ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).ok()?,
    )])
}

fn infer_size(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.out1(Some(DataType::I64), Some(vec![])))
}

fn propagate_size(cx: &InferCx) -> Option<Vec<Dim>> {
    Some(vec![prod(&cx.sh(0)?)])
}

fn eval_size(cx: &EvalCx) -> Option<Vec<Array>> {
    Some(vec![Array::I64(ArrayD::from_elem(
        IxDyn(&[]),
        cx.x(0)?.len() as i64,
    ))])
}

// ---- Reshape, Flatten ----

/// Reshape's output shape from a symbolic target.
pub fn reshape_shape(input: Option<&[Dim]>, target: &[Dim], allowzero: bool) -> Vec<Dim> {
    let mut out: Vec<Dim> = target
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Dim::Known(0) if !allowzero => input
                .and_then(|s| s.get(i).cloned())
                .unwrap_or(Dim::Unknown),
            Dim::Known(v) if *v < 0 => Dim::Unknown,
            v => v.clone(),
        })
        .collect();
    if let (Some(pos), Some(inp)) = (target.iter().position(|v| *v == known(-1)), input) {
        // Resolve -1 when the input's element count and the other dims are known, or when the
        // symbolic dims cancel (same multiset of symbols on both sides).
        let (mut num, mut syms_in) = (1i64, vec![]);
        for d in inp {
            match d {
                Dim::Known(v) => match num.checked_mul(*v) {
                    Some(x) => num = x,
                    None => return out,
                },
                Dim::Sym(s) => syms_in.push(s.clone()),
                Dim::Unknown => return out,
            }
        }
        let (mut den, mut syms_out) = (1i64, vec![]);
        for (i, d) in out.iter().enumerate() {
            if i == pos {
                continue;
            }
            match d {
                Dim::Known(v) => match den.checked_mul(*v) {
                    Some(x) => den = x,
                    None => return out,
                },
                Dim::Sym(s) => syms_out.push(s.clone()),
                Dim::Unknown => return out,
            }
        }
        for s in syms_out {
            match syms_in.iter().position(|x| *x == s) {
                Some(i) => {
                    syms_in.remove(i);
                }
                None => return out,
            }
        }
        if den > 0 && num >= 0 && num % den == 0 {
            syms_in.sort();
            match syms_in.as_slice() {
                [] => out[pos] = known(num / den),
                [s] if num == den => out[pos] = Dim::Sym(s.clone()),
                // Flattened symbolic dims get a product name (`batch*seq`).
                [_, ..] if num == den => out[pos] = Dim::Sym(syms_in.join("*")),
                _ => {}
            }
        }
    }
    out
}

fn infer_reshape(cx: &InferCx) -> Option<Vec<TensorType>> {
    let allowzero = cx.node.attr_i("allowzero").unwrap_or(0) != 0;
    let s = match cx.symv(1) {
        Some(target) => Some(reshape_shape(cx.sh(0).as_deref(), target, allowzero)),
        // Rank known from the target's length.
        None => cx.sh(1).and_then(|s| match s.as_slice() {
            [Dim::Known(r)] => unknown_dims(*r),
            _ => None,
        }),
    };
    Some(cx.out1(cx.dt(0), s))
}

/// The concrete target of a Reshape (None when it is invalid for this input).
fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> Option<Vec<usize>> {
    let total: usize = input.iter().try_fold(1usize, |a, d| a.checked_mul(*d))?;
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1)
            }
            0 if !allowzero => out.push(*input.get(i)?),
            t if t >= 0 => out.push(usize::try_from(t).ok()?),
            _ => return None,
        }
    }
    let rest = out.iter().try_fold(1usize, |a, d| a.checked_mul(*d))?;
    if let Some(i) = infer {
        if rest == 0 || !total.is_multiple_of(rest) {
            return None;
        }
        out[i] = total / rest;
    }
    (out.iter().try_fold(1usize, |a, d| a.checked_mul(*d)) == Some(total)).then_some(out)
}

fn eval_reshape(cx: &EvalCx) -> Option<Vec<Array>> {
    let a = cx.x(0)?;
    let target = reshape_target(
        a.shape(),
        &cx.ints(1)?,
        cx.node.attr_i("allowzero").unwrap_or(0) != 0,
    )?;
    Some(vec![each_opt!(a, v => reshape(v, &target))])
}

fn flatten_axis(n: &Node, rank: usize) -> Option<usize> {
    let a = n.attr_i("axis").unwrap_or(1);
    let r = rank as i64;
    let a = if a < 0 { a.checked_add(r)? } else { a };
    (0..=r).contains(&a).then_some(a as usize)
}

fn infer_flatten(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = cx.sh(0).and_then(|s| {
        let a = flatten_axis(cx.node, s.len())?;
        Some(vec![prod(&s[..a]), prod(&s[a..])])
    });
    Some(cx.out1(cx.dt(0), s))
}

fn eval_flatten(cx: &EvalCx) -> Option<Vec<Array>> {
    let a = cx.x(0)?;
    let ax = flatten_axis(cx.node, a.shape().len())?;
    let target = [
        a.shape()[..ax].iter().product::<usize>(),
        a.shape()[ax..].iter().product(),
    ];
    Some(vec![each_opt!(a, v => reshape(v, &target))])
}

// ---- Unsqueeze, Squeeze ----

fn unsqueezed(shape: &[Dim], axes: &[i64]) -> Option<Vec<Dim>> {
    let r = shape.len() + axes.len();
    let ax = norm_axes(axes, r)?;
    let mut it = shape.iter().cloned();
    (0..r)
        .map(|i| {
            if ax.contains(&i) {
                Some(known(1))
            } else {
                it.next()
            }
        })
        .collect()
}

fn infer_unsqueeze(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = match (cx.sh(0), cx.axes(1)) {
        (Some(s), Some(axes)) => unsqueezed(&s, &axes),
        _ => None,
    };
    Some(cx.out1(cx.dt(0), s))
}

fn eval_unsqueeze(cx: &EvalCx) -> Option<Vec<Array>> {
    let a = cx.x(0)?;
    let dims: Vec<Dim> = a.shape().iter().map(|d| known(*d as i64)).collect();
    let shape: Vec<usize> = unsqueezed(&dims, &cx.axes(1)?)?
        .iter()
        .map(|d| match d {
            Dim::Known(v) => *v as usize,
            _ => 0,
        })
        .collect();
    Some(vec![each_opt!(a, v => reshape(v, &shape))])
}

fn infer_squeeze(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = cx.sh(0).and_then(|s| match cx.axes(1) {
        Some(axes) => {
            let ax = norm_axes(&axes, s.len())?;
            Some(
                s.iter()
                    .enumerate()
                    .filter(|(i, _)| !ax.contains(i))
                    .map(|(_, d)| d.clone())
                    .collect(),
            )
        }
        None if !cx.has_input(1) => {
            if s.iter().all(|d| matches!(d, Dim::Known(_))) {
                Some(s.into_iter().filter(|d| *d != known(1)).collect())
            } else {
                None
            }
        }
        None => None,
    });
    Some(cx.out1(cx.dt(0), s))
}

fn eval_squeeze(cx: &EvalCx) -> Option<Vec<Array>> {
    let a = cx.x(0)?;
    let mut shape = a.shape().to_vec();
    match cx.axes(1) {
        Some(axes) => {
            for i in norm_axes(&axes, shape.len())?.into_iter().rev() {
                if shape[i] != 1 {
                    return None;
                }
                shape.remove(i);
            }
        }
        None if cx.node.inputs.get(1).is_none_or(|s| s.is_empty()) => shape.retain(|d| *d != 1),
        None => return None,
    }
    Some(vec![each_opt!(a, v => reshape(v, &shape))])
}

// ---- Transpose ----

fn check_transpose(n: &Node) -> Result<(), String> {
    match n.attr_ints("perm") {
        Some(p) => Perm::new(p).map(|_| ()),
        None => Ok(()),
    }
}

fn infer_transpose(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = cx
        .sh(0)
        .and_then(|s| Perm::of_transpose(cx.node, s.len())?.apply(&s));
    Some(cx.out1(cx.dt(0), s))
}

fn eval_transpose(cx: &EvalCx) -> Option<Vec<Array>> {
    let a = cx.x(0)?;
    let perm = Perm::of_transpose(cx.node, a.shape().len())?;
    let p = perm.as_slice();
    Some(vec![
        each!(a, v => v.clone().permuted_axes(IxDyn(p)).as_standard_layout().to_owned()),
    ])
}

// ---- Concat ----

fn infer_concat(cx: &InferCx) -> Option<Vec<TensorType>> {
    let axis = cx.node.attr_i("axis").unwrap_or(0);
    let shapes: Option<Vec<Vec<Dim>>> = (0..cx.node.inputs.len()).map(|i| cx.sh(i)).collect();
    let s = shapes.and_then(|shapes| {
        let r = shapes.first()?.len();
        let a = norm_axis(axis, r)?;
        let mut out = shapes[0].clone();
        let mut total = Some(0i64);
        for s in &shapes {
            if s.len() != r {
                return None;
            }
            total = match (total, &s[a]) {
                (Some(t), Dim::Known(v)) => t.checked_add(*v),
                _ => None,
            };
            for (i, d) in s.iter().enumerate() {
                if i != a && matches!(out[i], Dim::Unknown) {
                    out[i] = d.clone();
                }
            }
        }
        out[a] = total.map(Dim::Known).unwrap_or(Dim::Unknown);
        Some(out)
    });
    Some(cx.out1(cx.dt(0), s))
}

fn propagate_concat(cx: &InferCx) -> Option<Vec<Dim>> {
    let mut out = vec![];
    for i in 0..cx.node.inputs.len() {
        out.extend(cx.symv(i)?.iter().cloned());
        if out.len() as u64 > MAX_PROPAGATED_INTS {
            return None;
        }
    }
    Some(out)
}

fn eval_concat(cx: &EvalCx) -> Option<Vec<Array>> {
    let arrs: Vec<&Array> = (0..cx.inputs.len())
        .map(|i| cx.x(i))
        .collect::<Option<_>>()?;
    let first = *arrs.first()?;
    let ax = norm_axis(cx.node.attr_i("axis")?, first.shape().len())?;
    // Same rank, same dims off the axis (ndarray's concatenate asserts it).
    let agrees = |a: &&Array| {
        a.shape().len() == first.shape().len()
            && a.shape()
                .iter()
                .zip(first.shape())
                .enumerate()
                .all(|(i, (x, y))| i == ax || x == y)
    };
    if !arrs.iter().all(agrees) {
        return None;
    }
    macro_rules! cat {
        ($v:ident) => {{
            let views: Vec<_> = arrs
                .iter()
                .map(|a| {
                    if let Array::$v(b) = a {
                        Some(b.view())
                    } else {
                        None
                    }
                })
                .collect::<Option<_>>()?;
            Array::$v(ndarray::concatenate(Axis(ax), &views).ok()?)
        }};
    }
    Some(vec![match first {
        Array::F32(_) => cat!(F32),
        Array::F64(_) => cat!(F64),
        Array::F16(_) => cat!(F16),
        Array::I64(_) => cat!(I64),
        Array::I32(_) => cat!(I32),
        Array::I8(_) => cat!(I8),
        Array::U8(_) => cat!(U8),
        Array::Bool(_) => cat!(Bool),
    }])
}

// ---- Split ----

fn split_sizes(cx: &InferCx) -> Option<Vec<i64>> {
    match cx.node.attr_ints("split") {
        Some(s) => Some(s.to_vec()),
        None => cx.ints(1),
    }
}

fn infer_split(cx: &InferCx) -> Option<Vec<TensorType>> {
    let axis = cx.node.attr_i("axis").unwrap_or(0);
    let split = split_sizes(cx);
    let k = cx.node.outputs.len();
    Some(
        (0..k)
            .map(|j| {
                let s = cx.sh(0).and_then(|s| {
                    let a = norm_axis(axis, s.len())?;
                    let mut o = s.clone();
                    o[a] = match (&split, &s[a]) {
                        (Some(sp), _) if sp.len() == k && sp[j] >= 0 => known(sp[j]),
                        (None, Dim::Known(v)) if v % k as i64 == 0 => known(v / k as i64),
                        _ => Dim::Unknown,
                    };
                    Some(o)
                });
                TensorType {
                    dtype: cx.dt(0),
                    shape: s,
                }
            })
            .collect(),
    )
}

fn check_split(n: &Node) -> Result<(), String> {
    if let Some(k) = n.attr_i("num_outputs") {
        if k <= 0 {
            return Err(format!("Split num_outputs {k} must be positive"));
        }
    }
    if let Some(s) = n.attr_ints("split") {
        if s.iter().any(|v| *v < 0) {
            return Err(format!("Split sizes {s:?} must not be negative"));
        }
    }
    Ok(())
}

// ---- Slice ----

/// (starts, ends, axes, steps) of a Slice node.
type SliceParams = (Vec<i64>, Vec<i64>, Option<Vec<i64>>, Option<Vec<i64>>);

/// (starts, ends, axes, steps) of a Slice node, from inputs (opset ≥ 10) or attributes.
fn slice_params(
    n: &Node,
    ints: &dyn Fn(usize) -> Option<Vec<i64>>,
    present: &dyn Fn(usize) -> bool,
) -> Option<SliceParams> {
    if let (Some(s), Some(e)) = (n.attr_ints("starts"), n.attr_ints("ends")) {
        return Some((
            s.to_vec(),
            e.to_vec(),
            n.attr_ints("axes").map(|a| a.to_vec()),
            None,
        ));
    }
    let axes = if present(3) { Some(ints(3)?) } else { None };
    let steps = if present(4) { Some(ints(4)?) } else { None };
    Some((ints(1)?, ints(2)?, axes, steps))
}

/// Per sliced axis: (axis, start, end, step); None when the parameters disagree in length, an
/// axis is out of range or repeated, or a step is 0.
fn slice_plan(
    rank: usize,
    (starts, ends, axes, steps): SliceParams,
) -> Option<Vec<(usize, i64, i64, i64)>> {
    let k = starts.len();
    let axes = axes.unwrap_or_else(|| (0..k as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; k]);
    if ends.len() != k || axes.len() != k || steps.len() != k || steps.contains(&0) {
        return None;
    }
    let ax: Vec<usize> = axes
        .iter()
        .map(|a| norm_axis(*a, rank))
        .collect::<Option<_>>()?;
    let mut sorted = ax.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != k {
        return None;
    }
    Some(
        (0..k)
            .map(|i| (ax[i], starts[i], ends[i], steps[i]))
            .collect(),
    )
}

fn infer_slice(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = cx.sh(0).map(|s| {
        let params = slice_params(cx.node, &|i| cx.ints(i), &|i| cx.has_input(i));
        match params.and_then(|p| slice_plan(s.len(), p)) {
            None => vec![Dim::Unknown; s.len()],
            Some(plan) => {
                let mut out = s.clone();
                for (a, st, en, step) in plan {
                    out[a] = match &s[a] {
                        Dim::Known(d) => {
                            slice_bounds(*d, st, en, step).map_or(Dim::Unknown, |(_, l)| known(l))
                        }
                        // A full slice of a symbolic dim keeps it.
                        d if st == 0 && en >= i32::MAX as i64 && step == 1 => d.clone(),
                        _ => Dim::Unknown,
                    };
                }
                out
            }
        }
    });
    Some(cx.out1(cx.dt(0), s))
}

fn propagate_slice(cx: &InferCx) -> Option<Vec<Dim>> {
    let data = cx.symv(0)?;
    let params = slice_params(cx.node, &|i| cx.ints(i), &|i| cx.has_input(i))?;
    let plan = slice_plan(1, params)?;
    let [(0, st, en, 1)] = plan.as_slice() else {
        return None;
    };
    let (first, len) = slice_bounds(data.len() as i64, *st, *en, 1)?;
    let (a, b) = (first as usize, (first + len) as usize);
    data.get(a..b).map(|s| s.to_vec())
}

fn slice_array<T: Clone>(a: &ArrayD<T>, plan: &[(usize, i64, i64, i64)]) -> Option<ArrayD<T>> {
    let mut v = a.view();
    for &(ax, st, en, step) in plan {
        let d = v.shape()[ax] as i64;
        let (first, len) = slice_bounds(d, st, en, step)?;
        if len == 0 {
            v.slice_axis_inplace(Axis(ax), Slice::new(0, Some(0), 1));
            continue;
        }
        let last = first + (len - 1) * step;
        let (lo, hi) = if step > 0 {
            (first, last + 1)
        } else {
            (last, first + 1)
        };
        v.slice_axis_inplace(
            Axis(ax),
            Slice::new(lo as isize, Some(hi as isize), step as isize),
        );
    }
    Some(v.to_owned())
}

fn eval_slice(cx: &EvalCx) -> Option<Vec<Array>> {
    let a = cx.x(0)?;
    let params = slice_params(cx.node, &|i| cx.ints(i), &|i| cx.x(i).is_some())?;
    let plan = slice_plan(a.shape().len(), params)?;
    Some(vec![each_opt!(a, v => slice_array(v, &plan))])
}

// ---- Expand, Tile ----

fn infer_expand(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = match (cx.sh(0), cx.symv(1)) {
        (Some(a), Some(target)) => Some(broadcast(&a, target)),
        (_, Some(target)) => Some(
            target
                .iter()
                .map(|v| {
                    if *v == known(1) {
                        Dim::Unknown
                    } else {
                        v.clone()
                    }
                })
                .collect(),
        ),
        _ => None,
    };
    Some(cx.out1(cx.dt(0), s))
}

fn expand<T: Clone>(a: &ArrayD<T>, shape: &[i64]) -> Option<ArrayD<T>> {
    let target: Vec<usize> = shape
        .iter()
        .map(|v| usize::try_from(*v).ok())
        .collect::<Option<_>>()?;
    let sh = broadcast_static(a.shape(), &target)?;
    if !fits(&sh) {
        return None;
    }
    Some(a.broadcast(IxDyn(&sh))?.to_owned())
}

fn eval_expand(cx: &EvalCx) -> Option<Vec<Array>> {
    let shape = cx.ints(1)?;
    Some(vec![each_opt!(cx.x(0)?, v => expand(v, &shape))])
}

fn infer_tile(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = match (cx.sh(0), cx.ints(1)) {
        (Some(a), Some(r)) if a.len() == r.len() => Some(
            a.iter()
                .zip(&r)
                .map(|(d, k)| match d {
                    Dim::Known(v) if *k >= 0 => v.checked_mul(*k).map_or(Dim::Unknown, known),
                    d if *k == 1 => d.clone(),
                    _ => Dim::Unknown,
                })
                .collect(),
        ),
        _ => None,
    };
    Some(cx.out1(cx.dt(0), s))
}

fn tile<T: Clone>(a: &ArrayD<T>, reps: &[i64]) -> Option<ArrayD<T>> {
    if reps.len() != a.ndim() {
        return None;
    }
    let out_shape: Vec<usize> = a
        .shape()
        .iter()
        .zip(reps)
        .map(|(d, r)| d.checked_mul(usize::try_from(*r).ok()?))
        .collect::<Option<_>>()?;
    if !fits(&out_shape) {
        return None;
    }
    let dims = a.shape().to_vec();
    Some(ArrayD::from_shape_fn(IxDyn(&out_shape), |ix| {
        let src: Vec<usize> = (0..dims.len()).map(|k| ix[k] % dims[k]).collect();
        a[IxDyn(&src)].clone()
    }))
}

fn eval_tile(cx: &EvalCx) -> Option<Vec<Array>> {
    let reps = cx.ints(1)?;
    Some(vec![each_opt!(cx.x(0)?, v => tile(v, &reps))])
}

// ---- ConstantOfShape ----

fn value_attr(n: &Node) -> Option<Tensor> {
    n.attr("value")
        .and_then(|a| a.t.as_ref())
        .and_then(|t| Tensor::from_proto(t.clone()).ok())
}

fn infer_constant_of_shape(cx: &InferCx) -> Option<Vec<TensorType>> {
    let dtype = match cx.node.attr("value").and_then(|a| a.t.as_ref()) {
        Some(t) => DataType::from_code(t.data_type, "").ok(),
        None => Some(DataType::F32),
    };
    let s = cx.symv(0).cloned().or_else(|| {
        cx.sh(0).and_then(|s| match s.first() {
            Some(Dim::Known(r)) => unknown_dims(*r),
            _ => None,
        })
    });
    Some(cx.out1(dtype, s))
}

fn propagate_constant_of_shape(cx: &InferCx) -> Option<Vec<Dim>> {
    let shape = cx.ints(0)?;
    let [len] = shape.as_slice() else {
        return None;
    };
    if !(0..=MAX_PROPAGATED_INTS as i64).contains(len) {
        return None;
    }
    // Float zeros are not shape arithmetic.
    let value = *value_attr(cx.node)?.to_i64_vec()?.first()?;
    Some(vec![known(value); *len as usize])
}

fn eval_constant_of_shape(cx: &EvalCx) -> Option<Vec<Array>> {
    let shape: Vec<usize> = cx
        .ints(0)?
        .iter()
        .map(|v| usize::try_from(*v).ok())
        .collect::<Option<_>>()?;
    let value = match value_attr(cx.node) {
        Some(t) => Array::from_tensor(&t)?,
        None => Array::F32(ArrayD::from_elem(IxDyn(&[1]), 0.0)),
    };
    if value.len() != 1 || !fits(&shape) {
        return None;
    }
    Some(vec![
        each_opt!(&value, v => v.iter().next().map(|e| ArrayD::from_elem(IxDyn(&shape), *e))),
    ])
}

// ---- Range ----

/// Range's element count: max(ceil((limit - start) / delta), 0).
fn range_len(start: f64, limit: f64, delta: f64) -> Option<usize> {
    if delta == 0.0 || !delta.is_finite() || !start.is_finite() || !limit.is_finite() {
        return None;
    }
    let n = ((limit - start) / delta).ceil().max(0.0);
    (n <= MAX_EVAL_ELEMENTS as f64).then_some(n as usize)
}

fn infer_range(cx: &InferCx) -> Option<Vec<TensorType>> {
    let len = match (cx.ints(0), cx.ints(1), cx.ints(2)) {
        (Some(a), Some(b), Some(c)) => match (a.as_slice(), b.as_slice(), c.as_slice()) {
            ([a], [b], [c]) if *c != 0 => {
                let n = ((*b as i128 - *a as i128) as f64 / *c as f64)
                    .ceil()
                    .max(0.0);
                if n < i64::MAX as f64 {
                    known(n as i64)
                } else {
                    Dim::Unknown
                }
            }
            _ => Dim::Unknown,
        },
        _ => Dim::Unknown,
    };
    Some(cx.out1(cx.dt(0), Some(vec![len])))
}

fn scalar_f64(a: &Array) -> Option<f64> {
    (a.len() == 1).then(|| a.to_f64_vec().first().copied())?
}

fn eval_range(cx: &EvalCx) -> Option<Vec<Array>> {
    let (s, l, d) = (cx.x(0)?, cx.x(1)?, cx.x(2)?);
    if s.dtype() != l.dtype() || s.dtype() != d.dtype() {
        return None;
    }
    let n = range_len(scalar_f64(s)?, scalar_f64(l)?, scalar_f64(d)?)?;
    match s {
        Array::I64(_) | Array::I32(_) => {
            let (s, d) = (*s.as_i64s()?.first()?, *d.as_i64s()?.first()?);
            let v: Vec<i64> = (0..n as i64)
                .map(|i| s.checked_add(i.checked_mul(d)?))
                .collect::<Option<_>>()?;
            let arr = Array::I64(ArrayD::from_shape_vec(IxDyn(&[n]), v).ok()?);
            Some(vec![arr.cast_to(cx.x(0)?.dtype())?])
        }
        Array::F32(_) => {
            let (s, d) = (scalar_f64(s)? as f32, scalar_f64(d)? as f32);
            let v: Vec<f32> = (0..n).map(|i| s + i as f32 * d).collect();
            Some(vec![Array::F32(
                ArrayD::from_shape_vec(IxDyn(&[n]), v).ok()?,
            )])
        }
        _ => None,
    }
}

// ---- Constant ----

const CONSTANT_ATTRS: [&str; 8] = [
    "value",
    "sparse_value",
    "value_float",
    "value_floats",
    "value_int",
    "value_ints",
    "value_string",
    "value_strings",
];

fn check_constant(n: &Node) -> Result<(), String> {
    let k = n
        .attributes
        .iter()
        .filter(|a| CONSTANT_ATTRS.contains(&a.name()))
        .count();
    if k != 1 {
        return Err(format!(
            "Constant needs exactly one value attribute, this node has {k}"
        ));
    }
    Ok(())
}

fn constant_attr(n: &Node) -> Option<&crate::model::Attribute> {
    n.attributes
        .iter()
        .find(|a| CONSTANT_ATTRS.contains(&a.name()))
}

fn infer_constant(cx: &InferCx) -> Option<Vec<TensorType>> {
    let p = &constant_attr(cx.node)?.proto;
    let (dtype, shape) = match p.name.as_str() {
        "value" => {
            let t = p.t.as_ref()?;
            (
                DataType::from_code(t.data_type, "").ok(),
                t.dims.iter().map(|d| known(*d)).collect(),
            )
        }
        "value_float" => (Some(DataType::F32), vec![]),
        "value_floats" => (Some(DataType::F32), vec![known(p.floats.len() as i64)]),
        "value_int" => (Some(DataType::I64), vec![]),
        "value_ints" => (Some(DataType::I64), vec![known(p.ints.len() as i64)]),
        "value_string" => (Some(DataType::String), vec![]),
        "value_strings" => (Some(DataType::String), vec![known(p.strings.len() as i64)]),
        _ => return None,
    };
    Some(cx.out1(dtype, Some(shape)))
}

fn propagate_constant(cx: &InferCx) -> Option<Vec<Dim>> {
    let a = constant_value(cx.node)?;
    if a.shape().len() > 1 || a.len() as u64 > MAX_PROPAGATED_INTS {
        return None;
    }
    Some(a.as_i64s()?.into_iter().map(known).collect())
}

/// The value of a `Constant` node.
pub fn constant_value(n: &Node) -> Option<Array> {
    let p = &constant_attr(n)?.proto;
    Some(match p.name.as_str() {
        "value" => Array::from_tensor(&Tensor::from_proto(p.t.as_ref()?.clone()).ok()?)?,
        "value_float" => Array::F32(ArrayD::from_elem(IxDyn(&[]), p.f)),
        "value_floats" => {
            Array::F32(ArrayD::from_shape_vec(IxDyn(&[p.floats.len()]), p.floats.clone()).ok()?)
        }
        "value_int" => Array::I64(ArrayD::from_elem(IxDyn(&[]), p.i)),
        "value_ints" => {
            Array::I64(ArrayD::from_shape_vec(IxDyn(&[p.ints.len()]), p.ints.clone()).ok()?)
        }
        _ => return None,
    })
}

fn eval_constant(cx: &EvalCx) -> Option<Vec<Array>> {
    Some(vec![constant_value(cx.node)?])
}

// ---- EyeLike ----

fn infer_eye_like(cx: &InferCx) -> Option<Vec<TensorType>> {
    let dtype = match cx.node.attr_i("dtype") {
        Some(c) => i32::try_from(c)
            .ok()
            .and_then(|c| DataType::from_code(c, "").ok()),
        None => cx.dt(0),
    };
    Some(cx.out1(dtype, cx.sh(0)))
}

fn eval_eye_like(cx: &EvalCx) -> Option<Vec<Array>> {
    let shape = cx.x(0)?.shape().to_vec();
    if shape.len() != 2 || !fits(&shape) {
        return None;
    }
    let k = cx.node.attr_i("k").unwrap_or(0);
    let eye = ArrayD::from_shape_fn(IxDyn(&shape), |ix| {
        if ix[1] as i64 - ix[0] as i64 == k {
            1.0f64
        } else {
            0.0
        }
    });
    let to = match cx.node.attr_i("dtype") {
        Some(c) => DataType::from_code(i32::try_from(c).ok()?, "").ok()?,
        None => cx.x(0)?.dtype(),
    };
    Some(vec![Array::F64(eye).cast_to(to)?])
}

pub(super) const OPS: &[OpDef] = &[
    OpDef::new(
        "Shape",
        (1, 1),
        (1, 1),
        &[opt("start", Int), opt("end", Int)],
    )
    .infer(infer_shape)
    .propagate(propagate_shape)
    .eval(eval_shape),
    OpDef::new("Size", (1, 1), (1, 1), &[])
        .infer(infer_size)
        .propagate(propagate_size)
        .eval(eval_size),
    OpDef::new(
        "Reshape",
        (1, 2),
        (1, 1),
        &[opt("allowzero", Int), opt("shape", Ints)],
    )
    .shape_inputs(&[1])
    .infer(infer_reshape)
    .propagate(propagate_reshaping)
    .eval(eval_reshape),
    OpDef::new("Flatten", (1, 1), (1, 1), &[opt("axis", Int)])
        .infer(infer_flatten)
        .propagate(propagate_reshaping)
        .eval(eval_flatten),
    OpDef::new("Unsqueeze", (1, 2), (1, 1), &[opt("axes", Ints)])
        .shape_inputs(&[1])
        .infer(infer_unsqueeze)
        .propagate(propagate_reshaping)
        .eval(eval_unsqueeze),
    OpDef::new("Squeeze", (1, 2), (1, 1), &[opt("axes", Ints)])
        .shape_inputs(&[1])
        .infer(infer_squeeze)
        .propagate(propagate_reshaping)
        .eval(eval_squeeze),
    OpDef::new("Transpose", (1, 1), (1, 1), &[opt("perm", Ints)])
        .check(check_transpose)
        .infer(infer_transpose)
        .eval(eval_transpose),
    OpDef::new("Concat", (1, MANY), (1, 1), &[req("axis", Int)])
        .infer(infer_concat)
        .propagate(propagate_concat)
        .eval(eval_concat),
    OpDef::new(
        "Split",
        (1, 2),
        (1, MANY),
        &[
            opt("axis", Int),
            opt("split", Ints),
            opt("num_outputs", Int),
        ],
    )
    .shape_inputs(&[1])
    .check(check_split)
    .infer(infer_split),
    OpDef::new(
        "Slice",
        (1, 5),
        (1, 1),
        &[opt("starts", Ints), opt("ends", Ints), opt("axes", Ints)],
    )
    .shape_inputs(&[1, 2, 3, 4])
    .infer(infer_slice)
    .propagate(propagate_slice)
    .eval(eval_slice),
    OpDef::new("Expand", (2, 2), (1, 1), &[])
        .shape_inputs(&[1])
        .infer(infer_expand)
        .eval(eval_expand),
    OpDef::new("Tile", (2, 2), (1, 1), &[])
        .shape_inputs(&[1])
        .infer(infer_tile)
        .eval(eval_tile),
    OpDef::new(
        "ConstantOfShape",
        (1, 1),
        (1, 1),
        &[opt("value", TensorValue)],
    )
    .shape_inputs(&[0])
    .infer(infer_constant_of_shape)
    .propagate(propagate_constant_of_shape)
    .eval(eval_constant_of_shape),
    OpDef::new("Range", (3, 3), (1, 1), &[])
        .shape_inputs(&[0, 1, 2])
        .infer(infer_range)
        .eval(eval_range),
    OpDef::new(
        "Constant",
        (0, 0),
        (1, 1),
        &[
            opt("value", TensorValue),
            opt("value_float", Float),
            opt("value_floats", Floats),
            opt("value_int", Int),
            opt("value_ints", Ints),
            opt("value_string", Str),
            opt("value_strings", Strs),
        ],
    )
    .check(check_constant)
    .infer(infer_constant)
    .propagate(propagate_constant)
    .eval(eval_constant),
    OpDef::new(
        "EyeLike",
        (1, 1),
        (1, 1),
        &[opt("dtype", Int), opt("k", Int)],
    )
    .infer(infer_eye_like)
    .eval(eval_eye_like),
    OpDef::new(
        "Pad",
        (1, 4),
        (1, 1),
        &[opt("mode", Str), opt("pads", Ints), opt("value", Float)],
    )
    .shape_inputs(&[1, 3]),
    OpDef::new("Trilu", (1, 2), (1, 1), &[opt("upper", Int)]).infer(same),
    OpDef::new(
        "CumSum",
        (2, 2),
        (1, 1),
        &[opt("exclusive", Int), opt("reverse", Int)],
    )
    .infer(same),
    OpDef::new(
        "Resize",
        (1, 4),
        (1, 1),
        &[
            opt("mode", Str),
            opt("coordinate_transformation_mode", Str),
            opt("nearest_mode", Str),
            opt("cubic_coeff_a", Float),
            opt("exclude_outside", Int),
            opt("extrapolation_value", Float),
            opt("antialias", Int),
            opt("axes", Ints),
            opt("keep_aspect_ratio_policy", Str),
        ],
    )
    .shape_inputs(&[1, 2, 3]),
];
