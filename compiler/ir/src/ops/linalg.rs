//! Matrix products, convolutions and pooling: MatMul, Gemm, Einsum, Conv, ConvTranspose,
//! MaxPool, AveragePool, LpPool, GlobalAveragePool, GlobalMaxPool.

use ndarray::{ArrayD, Axis, IxDyn};

use super::util::{broadcast_static, known, matmul_shape, window_out};
use super::AttrKind::*;
use super::{opt, req, Attr, EvalCx, InferCx, OpDef, MANY};
use crate::eval::{fits, Array};
use crate::model::{Dim, Node, TensorType};

// ---- MatMul, Gemm ----

fn infer_matmul(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = match (cx.sh(0), cx.sh(1)) {
        (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => Some(matmul_shape(&a, &b)),
        _ => None,
    };
    Some(cx.out1(cx.dt(0), s))
}

fn matmul_f<T: ndarray::LinalgScalar>(a: &ArrayD<T>, b: &ArrayD<T>) -> Option<ArrayD<T>> {
    use ndarray::Ix2;
    let (ar, br) = (a.ndim(), b.ndim());
    if ar == 0 || br == 0 {
        return None;
    }
    let a3 = if ar == 1 {
        a.clone().insert_axis(Axis(0))
    } else {
        a.clone()
    };
    let b3 = if br == 1 {
        b.clone().insert_axis(Axis(1))
    } else {
        b.clone()
    };
    let (m, k) = (a3.shape()[a3.ndim() - 2], a3.shape()[a3.ndim() - 1]);
    let (k2, n) = (b3.shape()[b3.ndim() - 2], b3.shape()[b3.ndim() - 1]);
    if k != k2 {
        return None;
    }
    let batch = broadcast_static(&a3.shape()[..a3.ndim() - 2], &b3.shape()[..b3.ndim() - 2])?;
    let nb = batch.iter().try_fold(1usize, |p, d| p.checked_mul(*d))?;
    if !fits(&[nb, m, n]) || !fits(&[nb, m, k]) || !fits(&[nb, k, n]) {
        return None;
    }
    let mut ash = batch.clone();
    ash.extend([m, k]);
    let mut bsh = batch.clone();
    bsh.extend([k, n]);
    let av = a3.broadcast(IxDyn(&ash))?;
    let bv = b3.broadcast(IxDyn(&bsh))?;
    let av = av.to_shape(IxDyn(&[nb, m, k])).ok()?;
    let bv = bv.to_shape(IxDyn(&[nb, k, n])).ok()?;
    let mut out = Vec::with_capacity(nb * m * n);
    for i in 0..nb {
        let x = av
            .index_axis(Axis(0), i)
            .into_dimensionality::<Ix2>()
            .ok()?;
        let y = bv
            .index_axis(Axis(0), i)
            .into_dimensionality::<Ix2>()
            .ok()?;
        out.extend(x.dot(&y).iter().copied());
    }
    let mut osh = batch;
    if ar > 1 {
        osh.push(m);
    }
    if br > 1 {
        osh.push(n);
    }
    ArrayD::from_shape_vec(IxDyn(&osh), out).ok()
}

fn eval_matmul(cx: &EvalCx) -> Option<Vec<Array>> {
    Some(vec![match (cx.x(0)?, cx.x(1)?) {
        (Array::F32(a), Array::F32(b)) => Array::F32(matmul_f(a, b)?),
        (Array::F64(a), Array::F64(b)) => Array::F64(matmul_f(a, b)?),
        _ => return None,
    }])
}

fn infer_gemm(cx: &InferCx) -> Option<Vec<TensorType>> {
    let n = cx.node;
    let s = match (cx.sh(0), cx.sh(1)) {
        (Some(a), Some(b)) if a.len() == 2 && b.len() == 2 => {
            let m = if n.attr_i("transA").unwrap_or(0) != 0 {
                &a[1]
            } else {
                &a[0]
            };
            let k = if n.attr_i("transB").unwrap_or(0) != 0 {
                &b[0]
            } else {
                &b[1]
            };
            Some(vec![m.clone(), k.clone()])
        }
        _ => None,
    };
    Some(cx.out1(cx.dt(0), s))
}

// ---- Conv, pooling ----

/// Spatial attributes must be positive (strides, dilations, kernel) or non-negative (pads).
fn check_window(n: &Node) -> Result<(), String> {
    for (name, min) in [
        ("strides", 1),
        ("dilations", 1),
        ("kernel_shape", 1),
        ("pads", 0),
    ] {
        if let Some(v) = n.attr_ints(name) {
            if v.iter().any(|x| *x < min) {
                return Err(format!(
                    "{} {name} {v:?}: every value must be at least {min}",
                    n.op_type
                ));
            }
        }
    }
    if let Some(g) = n.attr_i("group") {
        if g < 1 {
            return Err(format!("{} group {g} must be positive", n.op_type));
        }
    }
    if let Some(p) = n.attr_ints("pads") {
        if let Some(k) = n.attr_ints("kernel_shape") {
            if p.len() != 2 * k.len() {
                return Err(format!(
                    "{} pads {p:?} must have twice as many values as kernel_shape {k:?}",
                    n.op_type
                ));
            }
        }
    }
    Ok(())
}

/// Output spatial dims of a Conv or pooling window over `x`'s spatial dims with kernel `k`.
fn window_dims(n: &Node, spatial: &[Dim], kernel: &[Option<i64>], ceil_mode: bool) -> Vec<Dim> {
    let sp = spatial.len();
    let get = |name: &str, i: usize, default: i64| {
        n.attr_ints(name)
            .and_then(|v| v.get(i).copied())
            .unwrap_or(default)
    };
    let auto = n
        .attr_s("auto_pad")
        .map(|s| String::from_utf8_lossy(s).to_string())
        .unwrap_or_default();
    (0..sp)
        .map(|i| {
            let (Dim::Known(x), Some(k)) = (&spatial[i], kernel.get(i).copied().flatten()) else {
                return Dim::Unknown;
            };
            let (s, d) = (get("strides", i, 1), get("dilations", i, 1));
            let out = match auto.as_str() {
                "" | "NOTSET" => {
                    let pads = get("pads", i, 0).checked_add(get("pads", i + sp, 0));
                    pads.and_then(|p| window_out(*x, k, s, d, p, ceil_mode))
                }
                "VALID" => window_out(*x, k, s, d, 0, false),
                // SAME_UPPER / SAME_LOWER: ceil(x / stride).
                _ if s > 0 => Some((x + s - 1).div_euclid(s)),
                _ => None,
            };
            out.map_or(Dim::Unknown, known)
        })
        .collect()
}

fn infer_conv(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = match (cx.sh(0), cx.sh(1)) {
        (Some(x), Some(w)) if x.len() >= 3 && w.len() == x.len() => {
            let kernel: Vec<Option<i64>> = match cx.node.attr_ints("kernel_shape") {
                Some(k) => k.iter().map(|v| Some(*v)).collect(),
                None => w[2..]
                    .iter()
                    .map(|d| match d {
                        Dim::Known(v) => Some(*v),
                        _ => None,
                    })
                    .collect(),
            };
            let mut o = vec![x[0].clone(), w[0].clone()];
            o.extend(window_dims(cx.node, &x[2..], &kernel, false));
            Some(o)
        }
        _ => None,
    };
    Some(cx.out1(cx.dt(0), s))
}

fn infer_pool(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = cx.sh(0).filter(|x| x.len() >= 3).map(|x| {
        let kernel: Vec<Option<i64>> = cx
            .node
            .attr_ints("kernel_shape")
            .map(|k| k.iter().map(|v| Some(*v)).collect())
            .unwrap_or_default();
        let ceil = cx.node.attr_i("ceil_mode").unwrap_or(0) != 0;
        let mut o = vec![x[0].clone(), x[1].clone()];
        if kernel.len() == x.len() - 2 {
            o.extend(window_dims(cx.node, &x[2..], &kernel, ceil));
        } else {
            o.extend(vec![Dim::Unknown; x.len() - 2]);
        }
        o
    });
    let mut v = cx.out1(cx.dt(0), s.clone());
    if v.len() > 1 {
        v[1] = TensorType {
            dtype: Some(crate::DataType::I64),
            shape: s,
        };
    }
    Some(v)
}

fn infer_global_pool(cx: &InferCx) -> Option<Vec<TensorType>> {
    let s = cx.sh(0).filter(|x| x.len() >= 2).map(|x| {
        let mut o = x[..2].to_vec();
        o.extend(vec![known(1); x.len() - 2]);
        o
    });
    Some(cx.out1(cx.dt(0), s))
}

const CONV_ATTRS: &[Attr] = &[
    opt("auto_pad", Str),
    opt("dilations", Ints),
    opt("group", Int),
    opt("kernel_shape", Ints),
    opt("pads", Ints),
    opt("strides", Ints),
];

const POOL_ATTRS: &[Attr] = &[
    opt("auto_pad", Str),
    opt("ceil_mode", Int),
    opt("count_include_pad", Int),
    opt("dilations", Ints),
    req("kernel_shape", Ints),
    opt("pads", Ints),
    opt("storage_order", Int),
    opt("strides", Ints),
    opt("p", Int),
];

pub(super) const OPS: &[OpDef] = &[
    OpDef::new("MatMul", (2, 2), (1, 1), &[])
        .infer(infer_matmul)
        .eval(eval_matmul),
    OpDef::new(
        "Gemm",
        (2, 3),
        (1, 1),
        &[
            opt("alpha", Float),
            opt("beta", Float),
            opt("transA", Int),
            opt("transB", Int),
        ],
    )
    .infer(infer_gemm),
    OpDef::new("Einsum", (1, MANY), (1, 1), &[req("equation", Str)]),
    OpDef::new("Conv", (2, 3), (1, 1), CONV_ATTRS)
        .check(check_window)
        .infer(infer_conv),
    OpDef::new(
        "ConvTranspose",
        (2, 3),
        (1, 1),
        &[
            opt("auto_pad", Str),
            opt("dilations", Ints),
            opt("group", Int),
            opt("kernel_shape", Ints),
            opt("output_padding", Ints),
            opt("output_shape", Ints),
            opt("pads", Ints),
            opt("strides", Ints),
        ],
    )
    .check(check_window),
    OpDef::new("MaxPool", (1, 1), (1, 2), POOL_ATTRS)
        .check(check_window)
        .infer(infer_pool),
    OpDef::new("AveragePool", (1, 1), (1, 1), POOL_ATTRS)
        .check(check_window)
        .infer(infer_pool),
    OpDef::new("LpPool", (1, 1), (1, 1), POOL_ATTRS)
        .check(check_window)
        .infer(infer_pool),
    OpDef::new("GlobalAveragePool", (1, 1), (1, 1), &[]).infer(infer_global_pool),
    OpDef::new("GlobalMaxPool", (1, 1), (1, 1), &[]).infer(infer_global_pool),
];
