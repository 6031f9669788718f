//! The e-graph language. Algebra that rules talk about has named operators; every other ONNX node
//! is `(onnx TAG inputs…)`, opaque to the built-in rules but still connecting its operands, with
//! `(out K tuple)` selecting output K of a multi-output node.
//!
//! Leaves: `c:NAME` an initializer, `x:NAME` a graph input or a value of an enclosing graph,
//! `n:IDX` the tag of original node IDX, `perm:0,2,1,3` a transpose permutation, `none` an omitted
//! optional input. Integers are `Num`.

use egg::{define_language, Id, Symbol};

define_language! {
    pub enum Op {
        "matmul" = MatMul([Id; 2]),
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "mul" = Mul([Id; 2]),
        "div" = Div([Id; 2]),
        "neg" = Neg([Id; 1]),
        // (transpose PERM x)
        "transpose" = Transpose([Id; 2]),
        // (reshape x shape), ONNX Reshape without allowzero
        "reshape" = Reshape([Id; 2]),
        // (gemm a b c) = a·b + c: ONNX Gemm with alpha = beta = 1 and no transposes
        "gemm" = Gemm([Id; 3]),
        // (onnx TAG inputs...)
        "onnx" = Onnx(Box<[Id]>),
        // (out K tuple)
        "out" = Out([Id; 2]),
        Num(i64),
        Leaf(Symbol),
    }
}

pub fn leaf(kind: &str, name: &str) -> Op {
    Op::Leaf(Symbol::from(format!("{kind}:{name}")))
}

/// Splits a leaf symbol into (kind, name).
pub fn leaf_parts(s: &Symbol) -> (&str, &str) {
    let s = s.as_str();
    match s.split_once(':') {
        Some((k, n)) => (k, n),
        None => (s, ""),
    }
}

/// The permutation a `perm:` leaf carries.
pub fn parse_perm(s: &str) -> Option<Vec<i64>> {
    if s.is_empty() {
        return Some(vec![]);
    }
    s.split(',').map(|p| p.parse().ok()).collect()
}

pub fn perm_leaf(perm: &[i64]) -> Op {
    leaf(
        "perm",
        &perm
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(","),
    )
}
