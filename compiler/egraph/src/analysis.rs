//! The e-class analysis: dtype and (symbolic) shape, constant-ness and scalar values. Rules check
//! these in their conditions; the cost model reads them. Tensor payloads never enter the e-graph:
//! constants are leaves that name initializers.

use std::collections::HashMap;

use egg::{Analysis, DidMerge, EGraph, Id, Symbol};
use wcc_ir::infer::{broadcast, matmul_shape};
use wcc_ir::{Dim, TensorType};

use crate::lang::{leaf_parts, parse_perm, Op};

#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub ty: TensorType,
    /// Computable at compile time (every leaf below it is an initializer).
    pub constant: bool,
    /// The value, when this is a constant scalar (or a one-element tensor) we know.
    pub scalar: Option<f64>,
    /// An attribute leaf (permutation, tag): not a tensor.
    pub attr: bool,
}

impl Info {
    fn unknown() -> Self {
        Info {
            ty: TensorType::unknown(),
            constant: false,
            scalar: None,
            attr: false,
        }
    }
}

/// What the analysis knows before saturation: types of leaves and of original nodes' outputs.
#[derive(Default)]
pub struct Facts {
    /// Leaf symbol → (type, constant, scalar value).
    pub leaves: HashMap<Symbol, (TensorType, bool, Option<f64>)>,
    /// Original node index → types of its outputs, and whether its op is deterministic.
    pub nodes: HashMap<usize, (Vec<TensorType>, bool)>,
}

impl Analysis<Op> for Facts {
    type Data = Info;

    fn make(egraph: &mut EGraph<Op, Self>, enode: &Op, _id: Id) -> Info {
        let d = |i: &Id| &egraph[*i].data;
        match enode {
            Op::Num(v) => Info {
                ty: TensorType {
                    dtype: Some(wcc_ir::DataType::I64),
                    shape: Some(vec![]),
                },
                constant: true,
                scalar: Some(*v as f64),
                attr: true,
            },
            Op::Leaf(s) => match egraph.analysis.leaves.get(s) {
                Some((ty, c, v)) => Info {
                    ty: ty.clone(),
                    constant: *c,
                    scalar: *v,
                    attr: false,
                },
                None => {
                    let (kind, _) = leaf_parts(s);
                    Info {
                        attr: kind != "x" && kind != "c",
                        constant: kind != "x",
                        ..Info::unknown()
                    }
                }
            },
            Op::MatMul([a, b]) => {
                let (a, b) = (d(a), d(b));
                let shape = match (&a.ty.shape, &b.ty.shape) {
                    (Some(x), Some(y)) if !x.is_empty() && !y.is_empty() => {
                        Some(matmul_shape(x, y))
                    }
                    _ => None,
                };
                Info {
                    ty: TensorType {
                        dtype: a.ty.dtype.or(b.ty.dtype),
                        shape,
                    },
                    constant: a.constant && b.constant,
                    scalar: None,
                    attr: false,
                }
            }
            Op::Add([a, b]) | Op::Sub([a, b]) | Op::Mul([a, b]) | Op::Div([a, b]) => {
                let (x, y) = (d(a), d(b));
                let shape = match (&x.ty.shape, &y.ty.shape) {
                    (Some(p), Some(q)) => Some(broadcast(p, q)),
                    _ => None,
                };
                let scalar = match (enode, x.scalar, y.scalar) {
                    (Op::Add(_), Some(p), Some(q)) => Some(p + q),
                    (Op::Sub(_), Some(p), Some(q)) => Some(p - q),
                    (Op::Mul(_), Some(p), Some(q)) => Some(p * q),
                    (Op::Div(_), Some(p), Some(q)) if q != 0.0 => Some(p / q),
                    _ => None,
                };
                let scalar = scalar.filter(|_| {
                    shape
                        .as_ref()
                        .is_some_and(|s| s.iter().all(|d| *d == Dim::Known(1)))
                });
                Info {
                    ty: TensorType {
                        dtype: x.ty.dtype.or(y.ty.dtype),
                        shape,
                    },
                    constant: x.constant && y.constant,
                    scalar,
                    attr: false,
                }
            }
            Op::Neg([a]) => {
                let x = d(a);
                Info {
                    ty: x.ty.clone(),
                    constant: x.constant,
                    scalar: x.scalar.map(|v| -v),
                    attr: false,
                }
            }
            Op::Transpose([p, x]) => {
                let perm = match &egraph[*p].nodes.first() {
                    Some(Op::Leaf(s)) => parse_perm(leaf_parts(s).1),
                    _ => None,
                };
                let x = d(x);
                let shape = match (&x.ty.shape, perm) {
                    (Some(s), Some(p)) => wcc_ir::ops::util::Perm::new(&p)
                        .ok()
                        .and_then(|p| p.apply(s)),
                    _ => None,
                };
                Info {
                    ty: TensorType {
                        dtype: x.ty.dtype,
                        shape,
                    },
                    constant: x.constant,
                    scalar: x.scalar,
                    attr: false,
                }
            }
            Op::Gemm([a, b, c]) => {
                let (a, b, c) = (d(a), d(b), d(c));
                let shape = match (&a.ty.shape, &b.ty.shape) {
                    (Some(x), Some(y)) if x.len() == 2 && y.len() == 2 => {
                        Some(vec![x[0].clone(), y[1].clone()])
                    }
                    _ => None,
                };
                Info {
                    ty: TensorType {
                        dtype: a.ty.dtype,
                        shape,
                    },
                    constant: a.constant && b.constant && c.constant,
                    scalar: None,
                    attr: false,
                }
            }
            Op::Reshape([x, _]) => {
                // The target shape is data; the class learns its type from the original node.
                let x = d(x);
                Info {
                    ty: TensorType {
                        dtype: x.ty.dtype,
                        shape: None,
                    },
                    constant: x.constant && d(&enode_child(enode, 1)).constant,
                    scalar: None,
                    attr: false,
                }
            }
            Op::Onnx(ch) => {
                let tag = ch.first().and_then(|t| match egraph[*t].nodes.first() {
                    Some(Op::Leaf(s)) => leaf_parts(s).1.parse::<usize>().ok(),
                    _ => None,
                });
                let (types, det) = tag
                    .and_then(|t| egraph.analysis.nodes.get(&t).cloned())
                    .unwrap_or_default();
                let constant = det && ch[1..].iter().all(|c| d(c).constant);
                // A single-output node's class is its value; multi-output ones are tuples.
                let ty = if types.len() == 1 {
                    types[0].clone()
                } else {
                    TensorType::unknown()
                };
                Info {
                    ty,
                    constant,
                    scalar: None,
                    attr: false,
                }
            }
            Op::Out([k, t]) => {
                let k = egraph[*k].data.scalar.unwrap_or(0.0) as usize;
                let tag = egraph[*t].nodes.iter().find_map(|n| match n {
                    Op::Onnx(ch) => ch.first().and_then(|t| match egraph[*t].nodes.first() {
                        Some(Op::Leaf(s)) => leaf_parts(s).1.parse::<usize>().ok(),
                        _ => None,
                    }),
                    _ => None,
                });
                let ty = tag
                    .and_then(|t| egraph.analysis.nodes.get(&t))
                    .and_then(|(ts, _)| ts.get(k).cloned())
                    .unwrap_or(TensorType::unknown());
                Info {
                    ty,
                    constant: d(t).constant,
                    scalar: None,
                    attr: false,
                }
            }
        }
    }

    fn merge(&mut self, a: &mut Info, b: Info) -> DidMerge {
        let before = a.clone();
        if a.ty.dtype.is_none() {
            a.ty.dtype = b.ty.dtype;
        }
        a.ty.shape = match (a.ty.shape.take(), b.ty.shape.clone()) {
            (Some(x), Some(y)) if x.len() == y.len() => Some(
                x.into_iter()
                    .zip(y)
                    .map(|(p, q)| match (&p, &q) {
                        (Dim::Unknown, _) => q,
                        (Dim::Sym(_), Dim::Known(_)) => q,
                        _ => p,
                    })
                    .collect(),
            ),
            (Some(x), _) => Some(x),
            (None, y) => y,
        };
        a.constant |= b.constant;
        a.attr |= b.attr;
        if a.scalar.is_none() {
            a.scalar = b.scalar;
        }
        DidMerge(*a != before, *a != b)
    }
}

fn enode_child(e: &Op, i: usize) -> Id {
    egg::Language::children(e)[i]
}
