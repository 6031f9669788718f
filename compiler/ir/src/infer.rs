//! Shape and dtype inference for the ops transformer exports use, with symbolic dims. Unknown ops
//! give unknown types, never errors. Small integer constants (shape tensors) are propagated so
//! Reshape/Expand/ConstantOfShape targets resolve.

use std::collections::HashMap;

use crate::dtype::DataType;
use crate::model::{Dim, Graph, Node, TensorType};
use crate::tensor::Tensor;

/// Inferred types of every value of one graph (not its subgraphs).
#[derive(Debug, Default, Clone)]
pub struct TypeMap {
    pub types: HashMap<String, TensorType>,
    /// Contents of small integer/bool tensors of rank ≤ 1 (shape arithmetic), element by element:
    /// `Known` values, symbolic dims (`Sym`) or `Unknown`. Bools are 0/1.
    pub vals: HashMap<String, Vec<Dim>>,
}

impl TypeMap {
    pub fn get(&self, name: &str) -> Option<&TensorType> {
        self.types.get(name)
    }
    pub fn dtype(&self, name: &str) -> Option<DataType> {
        self.types.get(name).and_then(|t| t.dtype)
    }
    pub fn shape(&self, name: &str) -> Option<&Vec<Dim>> {
        self.types.get(name).and_then(|t| t.shape.as_ref())
    }
    /// The contents of `name` when every element is known.
    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.vals
            .get(name)?
            .iter()
            .map(|d| {
                if let Dim::Known(v) = d {
                    Some(*v)
                } else {
                    None
                }
            })
            .collect()
    }
}

const MAX_PROPAGATED_INTS: u64 = 64;

/// Infers types for `g` given the types of values from enclosing graphs (`outer`).
pub fn infer_graph(g: &Graph, opset: i64, outer: Option<&TypeMap>) -> TypeMap {
    let mut m = outer.cloned().unwrap_or_default();
    for v in g.inputs.iter().chain(&g.value_info).chain(&g.outputs) {
        if let Some(t) = v.tensor_type() {
            m.types.insert(v.name.clone(), t.clone());
        }
    }
    for t in &g.initializers {
        add_tensor(&mut m, t.name(), t);
    }
    for n in &g.nodes {
        let outs = infer_node(n, opset, &m);
        for (name, t) in n.outputs.iter().zip(outs) {
            if name.is_empty() {
                continue;
            }
            // Merge with a declared type (value_info), dim by dim, keeping the more specific.
            let merged = match m.types.get(name) {
                Some(d) => merge_types(&t, d),
                None => t,
            };
            m.types.insert(name.clone(), merged);
        }
        if let Some(v) = propagate_vals(n, &m) {
            if let Some(o) = n.outputs.first() {
                m.vals.insert(o.clone(), v);
            }
        }
    }
    m
}

fn add_tensor(m: &mut TypeMap, name: &str, t: &Tensor) {
    if let Ok(d) = t.dtype() {
        m.types
            .insert(name.to_string(), TensorType::known(d, t.dims()));
        if t.numel() <= MAX_PROPAGATED_INTS && t.dims().len() <= 1 {
            if let Some(v) = t.to_i64_vec() {
                m.vals
                    .insert(name.to_string(), v.into_iter().map(Dim::Known).collect());
            } else if t.dtype().ok() == Some(DataType::Bool) {
                if let Ok(v) = t.to_f64_vec() {
                    m.vals.insert(
                        name.to_string(),
                        v.into_iter().map(|x| Dim::Known(x as i64)).collect(),
                    );
                }
            }
        }
    }
}

/// Inferred type refined by a declared one: per dim, Known beats Sym beats Unknown; a conflict
/// between two different Known or Sym dims keeps the inferred one.
fn merge_types(inferred: &TensorType, declared: &TensorType) -> TensorType {
    let dtype = inferred.dtype.or(declared.dtype);
    let shape = match (&inferred.shape, &declared.shape) {
        (Some(a), Some(b)) if a.len() == b.len() => Some(
            a.iter()
                .zip(b)
                .map(|(x, y)| match (x, y) {
                    (Dim::Unknown, y) => y.clone(),
                    (Dim::Sym(_), Dim::Known(v)) => Dim::Known(*v),
                    (x, _) => x.clone(),
                })
                .collect(),
        ),
        (Some(a), _) => Some(a.clone()),
        (None, b) => b.clone(),
    };
    TensorType { dtype, shape }
}

fn known(v: i64) -> Dim {
    Dim::Known(v)
}

/// Numpy broadcasting of symbolic shapes.
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Vec<Dim> {
    let n = a.len().max(b.len());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let da = if i + a.len() >= n {
            &a[i + a.len() - n]
        } else {
            &Dim::Known(1)
        };
        let db = if i + b.len() >= n {
            &b[i + b.len() - n]
        } else {
            &Dim::Known(1)
        };
        out.push(match (da, db) {
            (x, y) if x == y => x.clone(),
            (Dim::Known(1), y) => y.clone(),
            (x, Dim::Known(1)) => x.clone(),
            (Dim::Known(x), _) => Dim::Known(*x),
            (_, Dim::Known(y)) => Dim::Known(*y),
            // An unknown dim is 1 or equal to the other (anything else is an invalid model).
            (Dim::Sym(s), Dim::Unknown) | (Dim::Unknown, Dim::Sym(s)) => Dim::Sym(s.clone()),
            _ => Dim::Unknown,
        });
    }
    out
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// Fully known integer contents of input `i`.
fn ints(n: &Node, i: usize, m: &TypeMap) -> Option<Vec<i64>> {
    n.inputs
        .get(i)
        .filter(|s| !s.is_empty())
        .and_then(|s| m.ints(s))
}

/// Symbolic contents of input `i` (shape vectors).
fn symv<'a>(n: &Node, i: usize, m: &'a TypeMap) -> Option<&'a Vec<Dim>> {
    n.inputs
        .get(i)
        .filter(|s| !s.is_empty())
        .and_then(|s| m.vals.get(s))
}

fn out1(dtype: Option<DataType>, shape: Option<Vec<Dim>>) -> Vec<TensorType> {
    vec![TensorType { dtype, shape }]
}

/// Output types of one node.
pub fn infer_node(n: &Node, opset: i64, m: &TypeMap) -> Vec<TensorType> {
    let unknown = || vec![TensorType::unknown(); n.outputs.len()];
    if n.domain == "com.microsoft" {
        return infer_ms(n, m).unwrap_or_else(unknown);
    }
    if !n.domain.is_empty() {
        return unknown();
    }
    let t = |i: usize| -> Option<&TensorType> {
        n.inputs
            .get(i)
            .filter(|s| !s.is_empty())
            .and_then(|s| m.get(s))
    };
    let dt = |i: usize| t(i).and_then(|x| x.dtype);
    let sh = |i: usize| t(i).and_then(|x| x.shape.clone());
    let rank = |i: usize| sh(i).map(|s| s.len());
    match n.op_type.as_str() {
        "Identity" | "Relu" | "Sigmoid" | "Tanh" | "Erf" | "Sqrt" | "Exp" | "Log" | "Neg"
        | "Abs" | "Reciprocal" | "Sin" | "Cos" | "Softmax" | "LogSoftmax" | "Gelu" | "Floor"
        | "Ceil" | "Round" | "Sign" | "Clip" | "CumSum" | "Trilu" | "HardSigmoid" | "LeakyRelu"
        | "Elu" | "Selu" | "Softplus" | "Mish" | "HardSwish" | "Celu" | "Swish"
        | "RMSNormalization" => {
            let mut v = out1(dt(0), sh(0));
            v.resize(n.outputs.len().max(1), TensorType::unknown());
            v
        }
        "Not" | "IsNaN" | "IsInf" => out1(Some(DataType::Bool), sh(0)),
        "Dropout" => {
            let mut v = out1(dt(0), sh(0));
            if n.outputs.len() > 1 {
                v.push(TensorType {
                    dtype: Some(DataType::Bool),
                    shape: sh(0),
                });
            }
            v
        }
        "LayerNormalization" => {
            let mut v = out1(dt(0), sh(0));
            if n.outputs.len() > 1 {
                let axis = n.attr_i("axis").unwrap_or(-1);
                let red = sh(0).and_then(|s| {
                    let a = norm_axis(axis, s.len())?;
                    Some(
                        s.iter()
                            .enumerate()
                            .map(|(i, d)| if i < a { d.clone() } else { known(1) })
                            .collect(),
                    )
                });
                v.push(TensorType {
                    dtype: Some(DataType::F32),
                    shape: red.clone(),
                });
                v.push(TensorType {
                    dtype: Some(DataType::F32),
                    shape: red,
                });
                v.truncate(n.outputs.len());
            }
            v
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "Max" | "Min" | "Sum" | "Mean"
        | "BitShift" | "PRelu" => {
            let mut s = sh(0);
            for i in 1..n.inputs.len() {
                s = match (s, sh(i)) {
                    (Some(a), Some(b)) => Some(broadcast(&a, &b)),
                    _ => None,
                };
            }
            out1(dt(0), s)
        }
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" => {
            let s = match (sh(0), sh(1)) {
                (Some(a), Some(b)) => Some(broadcast(&a, &b)),
                _ => None,
            };
            out1(Some(DataType::Bool), s)
        }
        "Where" => {
            let s = match (sh(0), sh(1), sh(2)) {
                (Some(a), Some(b), Some(c)) => Some(broadcast(&broadcast(&a, &b), &c)),
                _ => None,
            };
            out1(dt(1).or(dt(2)), s)
        }
        "Cast" => {
            let to = n
                .attr_i("to")
                .and_then(|c| DataType::from_code(c as i32, "").ok());
            out1(to, sh(0))
        }
        "CastLike" => out1(dt(1), sh(0)),
        "MatMul" => {
            let s = match (sh(0), sh(1)) {
                (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => Some(matmul_shape(&a, &b)),
                _ => None,
            };
            out1(dt(0), s)
        }
        "Gemm" => {
            let s = match (sh(0), sh(1)) {
                (Some(a), Some(b)) if a.len() == 2 && b.len() == 2 => {
                    let m_ = if n.attr_i("transA").unwrap_or(0) != 0 {
                        &a[1]
                    } else {
                        &a[0]
                    };
                    let n_ = if n.attr_i("transB").unwrap_or(0) != 0 {
                        &b[0]
                    } else {
                        &b[1]
                    };
                    Some(vec![m_.clone(), n_.clone()])
                }
                _ => None,
            };
            out1(dt(0), s)
        }
        "Transpose" => {
            let s = sh(0).map(|s| match n.attr_ints("perm") {
                Some(p) if p.len() == s.len() => p
                    .iter()
                    .map(|&i| s.get(i as usize).cloned().unwrap_or(Dim::Unknown))
                    .collect(),
                _ => s.into_iter().rev().collect(),
            });
            out1(dt(0), s)
        }
        "Reshape" => {
            let s = match symv(n, 1, m) {
                Some(target) => Some(reshape_shape(
                    sh(0).as_deref(),
                    target,
                    n.attr_i("allowzero").unwrap_or(0) != 0,
                )),
                // Rank known from the target's length.
                None => sh(1).and_then(|s| match s.as_slice() {
                    [Dim::Known(r)] => Some(vec![Dim::Unknown; *r as usize]),
                    _ => None,
                }),
            };
            out1(dt(0), s)
        }
        "Flatten" => {
            let s = sh(0).map(|s| {
                let a = n.attr_i("axis").unwrap_or(1);
                let a = if a < 0 { a + s.len() as i64 } else { a } as usize;
                vec![prod(&s[..a.min(s.len())]), prod(&s[a.min(s.len())..])]
            });
            out1(dt(0), s)
        }
        "Unsqueeze" => {
            let axes = if opset >= 13 {
                ints(n, 1, m)
            } else {
                n.attr_ints("axes").map(|a| a.to_vec())
            };
            let s = match (sh(0), axes) {
                (Some(s), Some(axes)) => {
                    let r = s.len() + axes.len();
                    let mut ax: Vec<usize> = axes.iter().filter_map(|a| norm_axis(*a, r)).collect();
                    ax.sort_unstable();
                    let mut out = Vec::with_capacity(r);
                    let mut it = s.into_iter();
                    for i in 0..r {
                        if ax.contains(&i) {
                            out.push(known(1));
                        } else {
                            out.push(it.next().unwrap_or(Dim::Unknown));
                        }
                    }
                    Some(out)
                }
                _ => None,
            };
            out1(dt(0), s)
        }
        "Squeeze" => {
            let axes = if opset >= 13 {
                ints(n, 1, m)
            } else {
                n.attr_ints("axes").map(|a| a.to_vec())
            };
            let s = sh(0).and_then(|s| match axes {
                Some(axes) => {
                    let ax: Vec<usize> =
                        axes.iter().filter_map(|a| norm_axis(*a, s.len())).collect();
                    Some(
                        s.iter()
                            .enumerate()
                            .filter(|(i, _)| !ax.contains(i))
                            .map(|(_, d)| d.clone())
                            .collect(),
                    )
                }
                None if n.inputs.len() < 2 || n.inputs[1].is_empty() => {
                    if s.iter().all(|d| matches!(d, Dim::Known(_))) {
                        Some(s.into_iter().filter(|d| *d != known(1)).collect())
                    } else {
                        None
                    }
                }
                None => None,
            });
            out1(dt(0), s)
        }
        "Concat" => {
            let axis = n.attr_i("axis").unwrap_or(0);
            let shapes: Option<Vec<Vec<Dim>>> = (0..n.inputs.len()).map(sh).collect();
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
                        (Some(t), Dim::Known(v)) => Some(t + v),
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
            out1(dt(0), s)
        }
        "Split" => {
            let axis = n.attr_i("axis").unwrap_or(0);
            let split = if opset >= 13 {
                ints(n, 1, m)
            } else {
                n.attr_ints("split").map(|a| a.to_vec())
            };
            let k = n.outputs.len();
            (0..k)
                .map(|j| {
                    let s = sh(0).and_then(|s| {
                        let a = norm_axis(axis, s.len())?;
                        let mut o = s.clone();
                        o[a] = match (&split, &s[a]) {
                            (Some(sp), _) if sp.len() == k => known(sp[j]),
                            (None, Dim::Known(v)) if v % k as i64 == 0 => known(v / k as i64),
                            _ => Dim::Unknown,
                        };
                        Some(o)
                    });
                    TensorType {
                        dtype: dt(0),
                        shape: s,
                    }
                })
                .collect()
        }
        "Slice" => {
            let s = sh(0).map(|s| {
                slice_shape(
                    &s,
                    ints(n, 1, m).as_ref(),
                    ints(n, 2, m).as_ref(),
                    ints(n, 3, m).as_ref(),
                    ints(n, 4, m).as_ref(),
                )
            });
            out1(dt(0), s)
        }
        "Gather" => {
            let s = match (sh(0), sh(1)) {
                (Some(d), Some(i)) => norm_axis(n.attr_i("axis").unwrap_or(0), d.len()).map(|a| {
                    let mut o = d[..a].to_vec();
                    o.extend(i);
                    o.extend_from_slice(&d[a + 1..]);
                    o
                }),
                _ => None,
            };
            out1(dt(0), s)
        }
        "GatherElements" => out1(dt(0), sh(1)),
        "Expand" => {
            let s = match (sh(0), symv(n, 1, m)) {
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
            out1(dt(0), s)
        }
        "Tile" => {
            let s = match (sh(0), ints(n, 1, m)) {
                (Some(a), Some(r)) if a.len() == r.len() => Some(
                    a.iter()
                        .zip(&r)
                        .map(|(d, k)| match d {
                            Dim::Known(v) => known(v * k),
                            d if *k == 1 => d.clone(),
                            _ => Dim::Unknown,
                        })
                        .collect(),
                ),
                _ => None,
            };
            out1(dt(0), s)
        }
        "ConstantOfShape" => {
            let dtype = n
                .attr("value")
                .and_then(|a| a.t.as_ref())
                .map(|t| DataType::from_code(t.data_type, "").ok())
                .unwrap_or(Some(DataType::F32));
            let s = symv(n, 0, m).cloned().or_else(|| {
                sh(0).and_then(|s| match s.first() {
                    Some(Dim::Known(r)) => Some(vec![Dim::Unknown; *r as usize]),
                    _ => None,
                })
            });
            out1(dtype, s)
        }
        "Shape" => {
            let len = rank(0).map(|r| {
                let (s, e) = shape_range(n, r);
                e.saturating_sub(s) as i64
            });
            out1(Some(DataType::I64), len.map(|l| vec![known(l)]))
        }
        "Size" => out1(Some(DataType::I64), Some(vec![])),
        "Range" => {
            let len = match (ints(n, 0, m), ints(n, 1, m), ints(n, 2, m)) {
                (Some(a), Some(b), Some(c))
                    if a.len() == 1 && b.len() == 1 && c.len() == 1 && c[0] != 0 =>
                {
                    known(((b[0] - a[0]) as f64 / c[0] as f64).ceil().max(0.0) as i64)
                }
                _ => Dim::Unknown,
            };
            out1(dt(0), Some(vec![len]))
        }
        "Constant" => {
            let Some(a) = n.attributes.first() else {
                return unknown();
            };
            let p = &a.proto;
            match p.name.as_str() {
                "value" => p.t.as_ref().map(|t| {
                    out1(
                        DataType::from_code(t.data_type, "").ok(),
                        Some(t.dims.iter().map(|d| known(*d)).collect()),
                    )
                }),
                "value_float" => Some(out1(Some(DataType::F32), Some(vec![]))),
                "value_floats" => Some(out1(
                    Some(DataType::F32),
                    Some(vec![known(p.floats.len() as i64)]),
                )),
                "value_int" => Some(out1(Some(DataType::I64), Some(vec![]))),
                "value_ints" => Some(out1(
                    Some(DataType::I64),
                    Some(vec![known(p.ints.len() as i64)]),
                )),
                _ => None,
            }
            .unwrap_or_else(unknown)
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL2"
        | "ReduceSumSquare" | "ArgMax" | "ArgMin" => {
            let arg = n.op_type.starts_with("Arg");
            let keep = n.attr_i("keepdims").unwrap_or(1) != 0;
            let axes: Option<Vec<i64>> = if arg {
                Some(vec![n.attr_i("axis").unwrap_or(0)])
            } else if let Some(a) = n.attr_ints("axes") {
                Some(a.to_vec())
            } else if n.inputs.len() > 1 && !n.inputs[1].is_empty() {
                ints(n, 1, m)
            } else {
                Some(vec![]) // all axes (noop_with_empty_axes aside)
            };
            let s = match (sh(0), axes) {
                (Some(s), Some(axes)) => {
                    let all = axes.is_empty();
                    let ax: Vec<usize> =
                        axes.iter().filter_map(|a| norm_axis(*a, s.len())).collect();
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
            out1(if arg { Some(DataType::I64) } else { dt(0) }, s)
        }
        "Conv" => {
            let s = match (sh(0), sh(1)) {
                (Some(x), Some(w)) if x.len() >= 3 && w.len() == x.len() => {
                    let sp = x.len() - 2;
                    let strides = n
                        .attr_ints("strides")
                        .map(|v| v.to_vec())
                        .unwrap_or(vec![1; sp]);
                    let dil = n
                        .attr_ints("dilations")
                        .map(|v| v.to_vec())
                        .unwrap_or(vec![1; sp]);
                    let pads = n
                        .attr_ints("pads")
                        .map(|v| v.to_vec())
                        .unwrap_or(vec![0; 2 * sp]);
                    let auto = n
                        .attr_s("auto_pad")
                        .map(|s| String::from_utf8_lossy(s).to_string())
                        .unwrap_or_default();
                    let mut o = vec![x[0].clone(), w[0].clone()];
                    for i in 0..sp {
                        o.push(match (&x[2 + i], &w[2 + i]) {
                            (Dim::Known(xi), Dim::Known(k))
                                if auto.is_empty() || auto == "NOTSET" =>
                            {
                                let ek = dil.get(i).copied().unwrap_or(1) * (k - 1) + 1;
                                let p = pads.get(i).copied().unwrap_or(0)
                                    + pads.get(i + sp).copied().unwrap_or(0);
                                known((xi + p - ek) / strides.get(i).copied().unwrap_or(1) + 1)
                            }
                            _ => Dim::Unknown,
                        });
                    }
                    Some(o)
                }
                _ => None,
            };
            out1(dt(0), s)
        }
        _ => unknown(),
    }
}

/// Output types of the com.microsoft ops ONNX Runtime's transformer optimizer emits.
fn infer_ms(n: &Node, m: &TypeMap) -> Option<Vec<TensorType>> {
    let t = |i: usize| {
        n.inputs
            .get(i)
            .filter(|s| !s.is_empty())
            .and_then(|s| m.get(s))
            .cloned()
    };
    let same = |k: usize| -> Option<Vec<TensorType>> {
        let x = t(0)?;
        let mut v = vec![x; k.max(1)];
        v.truncate(n.outputs.len().max(1));
        v.resize(n.outputs.len(), TensorType::unknown());
        Some(v)
    };
    match n.op_type.as_str() {
        "BiasGelu" | "FastGelu" | "Gelu" | "QuickGelu" | "BiasAdd" => same(1),
        "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization" => {
            let x = t(0)?;
            let stats = TensorType {
                dtype: Some(DataType::F32),
                shape: None,
            };
            let mut v = vec![x.clone(), stats.clone(), stats, x];
            v.truncate(n.outputs.len());
            Some(v)
        }
        "Attention" => {
            // [B, S, hidden] → [B, S, v_hidden]: the weight's columns are q + k + v.
            let x = t(0)?;
            let w = t(1)?.static_dims()?;
            let v_hidden = match n.attr_ints("qkv_hidden_sizes") {
                Some(q) if q.len() == 3 => q[2],
                _ => *w.get(1)? / 3,
            };
            let mut shape = x.shape?;
            *shape.last_mut()? = known(v_hidden);
            let mut v = vec![TensorType {
                dtype: x.dtype,
                shape: Some(shape),
            }];
            v.resize(n.outputs.len(), TensorType::unknown());
            Some(v)
        }
        "EmbedLayerNormalization" => {
            let ids = t(0)?.shape?;
            let table = t(2)?.static_dims()?;
            let mut shape = ids;
            shape.push(known(*table.get(1)?));
            let mut v = vec![TensorType {
                dtype: t(2)?.dtype,
                shape: Some(shape),
            }];
            v.resize(n.outputs.len(), TensorType::unknown());
            Some(v)
        }
        _ => None,
    }
}

fn prod(dims: &[Dim]) -> Dim {
    let mut p = 1i64;
    for d in dims {
        match d {
            Dim::Known(v) => p *= v,
            _ => return Dim::Unknown,
        }
    }
    Dim::Known(p)
}

/// The [start, end) range of dims a Shape node returns.
pub fn shape_range(n: &Node, rank: usize) -> (usize, usize) {
    let clamp = |v: i64| -> usize {
        let v = if v < 0 { v + rank as i64 } else { v };
        v.clamp(0, rank as i64) as usize
    };
    let s = clamp(n.attr_i("start").unwrap_or(0));
    let e = n.attr_i("end").map(clamp).unwrap_or(rank);
    (s, e.max(s))
}

pub fn matmul_shape(a: &[Dim], b: &[Dim]) -> Vec<Dim> {
    let a2: Vec<Dim> = if a.len() == 1 {
        vec![known(1), a[0].clone()]
    } else {
        a.to_vec()
    };
    let b2: Vec<Dim> = if b.len() == 1 {
        vec![b[0].clone(), known(1)]
    } else {
        b.to_vec()
    };
    let batch = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
    let mut out = batch;
    if a.len() > 1 {
        out.push(a2[a2.len() - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1].clone());
    }
    out
}

fn reshape_shape(input: Option<&[Dim]>, target: &[Dim], allowzero: bool) -> Vec<Dim> {
    let mut out: Vec<Dim> = target
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Dim::Known(0) if !allowzero => input
                .and_then(|s| s.get(i).cloned())
                .unwrap_or(Dim::Unknown),
            Dim::Known(-1) => Dim::Unknown,
            v => v.clone(),
        })
        .collect();
    if let (Some(pos), Some(inp)) = (target.iter().position(|v| *v == known(-1)), input) {
        // Resolve -1 when the input's element count and the other dims are known, or when the
        // symbolic dims cancel (same multiset of symbols on both sides).
        let (mut num, mut syms_in) = (1i64, vec![]);
        for d in inp {
            match d {
                Dim::Known(v) => num *= v,
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
                Dim::Known(v) => den *= v,
                Dim::Sym(s) => syms_out.push(s.clone()),
                Dim::Unknown => return out,
            }
        }
        // Cancel the symbols that appear on both sides.
        for s in syms_out {
            match syms_in.iter().position(|x| *x == s) {
                Some(i) => {
                    syms_in.remove(i);
                }
                None => return out,
            }
        }
        if den != 0 && num % den == 0 {
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

fn slice_shape(
    s: &[Dim],
    starts: Option<&Vec<i64>>,
    ends: Option<&Vec<i64>>,
    axes: Option<&Vec<i64>>,
    steps: Option<&Vec<i64>>,
) -> Vec<Dim> {
    let (Some(starts), Some(ends)) = (starts, ends) else {
        return vec![Dim::Unknown; s.len()];
    };
    let mut out = s.to_vec();
    for (k, (&st, &en)) in starts.iter().zip(ends).enumerate() {
        let axis = axes
            .map(|a| a.get(k).copied().unwrap_or(k as i64))
            .unwrap_or(k as i64);
        let Some(a) = norm_axis(axis, s.len()) else {
            return vec![Dim::Unknown; s.len()];
        };
        let step = steps.and_then(|v| v.get(k).copied()).unwrap_or(1);
        out[a] = match &s[a] {
            Dim::Known(d) if step != 0 => known(slice_len(*d, st, en, step)),
            // Full slice of a symbolic dim keeps it.
            d if st == 0 && en >= i32::MAX as i64 && step == 1 => d.clone(),
            _ => Dim::Unknown,
        };
    }
    out
}

/// Element count along one axis after Slice (ONNX clamping rules).
pub fn slice_len(d: i64, start: i64, end: i64, step: i64) -> i64 {
    let clampv = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
    let (s, e) = if step > 0 {
        let s = if start < 0 { start + d } else { start };
        let e = if end < 0 { end + d } else { end };
        (clampv(s, 0, d), clampv(e, 0, d))
    } else {
        let s = if start < 0 { start + d } else { start };
        let e = if end < 0 { end + d } else { end };
        (clampv(s, 0, d - 1), clampv(e, -1, d - 1))
    };
    if step > 0 {
        ((e - s).max(0) + step - 1) / step
    } else {
        ((s - e).max(0) + (-step) - 1) / (-step)
    }
}

/// Symbolic contents of a node's output (rank ≤ 1 integer/bool tensors): shape arithmetic.
fn propagate_vals(n: &Node, m: &TypeMap) -> Option<Vec<Dim>> {
    if !n.domain.is_empty() {
        return None;
    }
    let v = |i: usize| symv(n, i, m);
    match n.op_type.as_str() {
        "Shape" => {
            let s = m.shape(n.inputs.first()?)?;
            let (a, b) = shape_range(n, s.len());
            Some(s[a..b].to_vec())
        }
        "Size" => {
            let s = m.shape(n.inputs.first()?)?;
            Some(vec![prod(s)])
        }
        "Constant" => {
            let a = n.attributes.first()?;
            match a.name() {
                "value_int" => Some(vec![known(a.proto.i)]),
                "value_ints" => Some(a.proto.ints.iter().map(|v| known(*v)).collect()),
                "value" => {
                    let t = Tensor::from_proto(a.proto.t.as_ref()?.clone()).ok()?;
                    if t.numel() > MAX_PROPAGATED_INTS || t.dims().len() > 1 {
                        return None;
                    }
                    let vals = match t.to_i64_vec() {
                        Some(v) => v,
                        None if t.dtype().ok() == Some(DataType::Bool) => {
                            t.to_f64_vec().ok()?.into_iter().map(|x| x as i64).collect()
                        }
                        None => return None,
                    };
                    Some(vals.into_iter().map(known).collect())
                }
                _ => None,
            }
        }
        "Identity" | "Unsqueeze" | "Squeeze" | "Reshape" | "Flatten" => {
            let out_rank = m.shape(n.outputs.first()?).map(|s| s.len());
            (out_rank.is_none_or(|r| r <= 1))
                .then(|| v(0).cloned())
                .flatten()
        }
        "Cast" => {
            let to = n
                .attr_i("to")
                .and_then(|c| DataType::from_code(c as i32, "").ok())?;
            (to.is_integer() || to == DataType::Bool)
                .then(|| v(0).cloned())
                .flatten()
        }
        "Concat" => {
            let mut out = vec![];
            for i in 0..n.inputs.len() {
                out.extend(v(i)?.iter().cloned());
            }
            Some(out)
        }
        "Gather" if n.attr_i("axis").unwrap_or(0) == 0 => {
            let data = v(0)?;
            let idx = ints(n, 1, m)?;
            let len = data.len() as i64;
            idx.iter()
                .map(|&i| {
                    let i = if i < 0 { i + len } else { i };
                    (0..len).contains(&i).then(|| data[i as usize].clone())
                })
                .collect()
        }
        "Slice" => {
            let data = v(0)?;
            let (st, en) = (ints(n, 1, m)?, ints(n, 2, m)?);
            let step = ints(n, 4, m).map(|s| s[0]).unwrap_or(1);
            if st.len() != 1
                || en.len() != 1
                || step != 1
                || ints(n, 3, m).is_some_and(|a| a != [0] && a != [-1])
            {
                return None;
            }
            let len = data.len() as i64;
            let c = |x: i64| (if x < 0 { x + len } else { x }).clamp(0, len) as usize;
            let (a, b) = (c(st[0]), c(en[0]));
            Some(data[a..b.max(a)].to_vec())
        }
        "Add" | "Sub" | "Mul" | "Div" | "Max" | "Min" | "Equal" | "Less" | "Greater" => {
            let (a, b) = (v(0)?, v(1)?);
            let len = a.len().max(b.len());
            if (a.len() != len && a.len() != 1) || (b.len() != len && b.len() != 1) {
                return None;
            }
            let at = |x: &Vec<Dim>, i: usize| x[if x.len() == 1 { 0 } else { i }].clone();
            Some(
                (0..len)
                    .map(|i| sym_binary(&n.op_type, &at(a, i), &at(b, i)))
                    .collect(),
            )
        }
        "Where" => {
            let (c, a, b) = (v(0)?, v(1)?, v(2)?);
            let len = c.len().max(a.len()).max(b.len());
            if [c.len(), a.len(), b.len()]
                .iter()
                .any(|l| *l != len && *l != 1)
            {
                return None;
            }
            let at = |x: &Vec<Dim>, i: usize| x[if x.len() == 1 { 0 } else { i }].clone();
            Some(
                (0..len)
                    .map(|i| match at(c, i) {
                        Dim::Known(0) => at(b, i),
                        Dim::Known(_) => at(a, i),
                        _ => Dim::Unknown,
                    })
                    .collect(),
            )
        }
        "ConstantOfShape" => {
            let shape = ints(n, 0, m)?;
            if shape.len() != 1 || shape[0] as u64 > MAX_PROPAGATED_INTS {
                return None;
            }
            let value = match n.attr("value").and_then(|a| a.t.as_ref()) {
                Some(t) => Tensor::from_proto(t.clone())
                    .ok()?
                    .to_i64_vec()?
                    .first()
                    .copied()?,
                None => return None, // float zeros: not shape arithmetic
            };
            Some(vec![known(value); shape[0] as usize])
        }
        _ => None,
    }
}

/// One element of integer shape arithmetic on symbolic values.
fn sym_binary(op: &str, a: &Dim, b: &Dim) -> Dim {
    use Dim::*;
    match (op, a, b) {
        ("Add", Known(x), Known(y)) => Known(x + y),
        ("Sub", Known(x), Known(y)) => Known(x - y),
        ("Mul", Known(x), Known(y)) => Known(x * y),
        // Integer Div truncates toward zero, as ONNX Runtime does.
        ("Div", Known(x), Known(y)) if *y != 0 => Known(x / y),
        ("Max", Known(x), Known(y)) => Known(*x.max(y)),
        ("Min", Known(x), Known(y)) => Known(*x.min(y)),
        ("Equal", Known(x), Known(y)) => Known((x == y) as i64),
        ("Less", Known(x), Known(y)) => Known((x < y) as i64),
        ("Greater", Known(x), Known(y)) => Known((x > y) as i64),
        // Identities that keep a symbolic dim.
        ("Add" | "Sub", s @ Sym(_), Known(0)) | ("Add", Known(0), s @ Sym(_)) => s.clone(),
        ("Mul" | "Div", s @ Sym(_), Known(1)) | ("Mul", Known(1), s @ Sym(_)) => s.clone(),
        ("Equal", Sym(x), Sym(y)) if x == y => Known(1),
        // A dim is never negative.
        ("Equal", Sym(_), Known(v)) | ("Equal", Known(v), Sym(_)) if *v < 0 => Known(0),
        _ => Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Attribute, Graph, ValueInfo};

    fn sym(s: &str) -> Dim {
        Dim::Sym(s.into())
    }

    /// x:[batch,seq,48] → Shape → Gather(2) → Div 4 → Concat([0,0,4,?]) → Reshape
    #[test]
    fn symbolic_shape_arithmetic_resolves_reshape_targets() {
        let i64t = |name: &str, v: &[i64]| {
            Tensor::from_raw(
                name,
                DataType::I64,
                &[v.len() as i64],
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
            .unwrap()
        };
        let scalar =
            Tensor::from_raw("two", DataType::I64, &[], 2i64.to_le_bytes().to_vec()).unwrap();
        let four =
            Tensor::from_raw("four", DataType::I64, &[], 4i64.to_le_bytes().to_vec()).unwrap();
        let n = |op: &str, ins: &[&str], out: &str| {
            Node::new(
                out,
                op,
                ins.iter().map(|s| s.to_string()).collect(),
                vec![out.to_string()],
            )
        };
        let mut concat = n("Concat", &["zz", "four1", "hd"], "target");
        concat.attributes.push(Attribute::int("axis", 0));
        let g = Graph {
            inputs: vec![ValueInfo::tensor(
                "x",
                TensorType::new(
                    DataType::F32,
                    vec![sym("batch"), sym("seq"), Dim::Known(48)],
                ),
            )],
            initializers: vec![
                scalar,
                four,
                i64t("zz", &[0, 0]),
                i64t("four1", &[4]),
                i64t("ax0", &[0]),
            ],
            nodes: vec![
                n("Shape", &["x"], "s"),
                n("Gather", &["s", "two"], "d"),
                n("Div", &["d", "four"], "hd0"),
                n("Unsqueeze", &["hd0", "ax0"], "hd"),
                concat,
                n("Reshape", &["x", "target"], "y"),
            ],
            ..Default::default()
        };
        let m = infer_graph(&g, 17, None);
        assert_eq!(m.ints("hd"), Some(vec![12]));
        assert_eq!(
            m.shape("y"),
            Some(&vec![
                sym("batch"),
                sym("seq"),
                Dim::Known(4),
                Dim::Known(12)
            ])
        );
        assert_eq!(
            m.vals.get("s"),
            Some(&vec![sym("batch"), sym("seq"), Dim::Known(48)])
        );
    }

    #[test]
    fn reshape_minus_one_cancels_symbols() {
        let inp = [sym("batch"), sym("seq"), Dim::Known(32)];
        let out = reshape_shape(Some(&inp), &[Dim::Known(-1), Dim::Known(32)], false);
        assert_eq!(out, vec![sym("batch*seq"), Dim::Known(32)]);
        let out = reshape_shape(
            Some(&inp),
            &[Dim::Known(-1), sym("seq"), Dim::Known(32)],
            false,
        );
        assert_eq!(out, vec![sym("batch"), sym("seq"), Dim::Known(32)]);
        let out = reshape_shape(
            Some(&inp),
            &[sym("batch"), sym("seq"), Dim::Known(4), Dim::Known(-1)],
            false,
        );
        assert_eq!(out[3], Dim::Known(8));
    }

    #[test]
    fn broadcast_and_matmul_shapes() {
        assert_eq!(
            broadcast(&[sym("b"), Dim::Known(1)], &[Dim::Known(5)]),
            vec![sym("b"), Dim::Known(5)]
        );
        assert_eq!(
            matmul_shape(
                &[sym("b"), sym("s"), Dim::Known(8)],
                &[Dim::Known(8), Dim::Known(3)]
            ),
            vec![sym("b"), sym("s"), Dim::Known(3)]
        );
        assert_eq!(slice_len(10, -3, i64::MAX, 1), 3);
        assert_eq!(slice_len(10, -1, i64::MIN, -1), 10);
    }
}
