//! Shape and dtype inference over a graph, with symbolic dims. What one op's outputs are is the op
//! registry's business (`crate::ops`); this module walks a graph in order, merges inferred types
//! with declared ones, and records the small integer contents of shape tensors so that
//! Reshape/Expand/ConstantOfShape targets resolve. Unknown ops give unknown types, never errors.

use std::collections::HashMap;

use crate::dtype::DataType;
use crate::model::{Dim, Graph, Node, TensorType};
use crate::ops::util::MAX_PROPAGATED_INTS;
pub use crate::ops::util::{broadcast, matmul_shape, shape_range, slice_len};
use crate::tensor::Tensor;

/// Inferred types of every value of one graph (not its subgraphs).
#[derive(Debug, Default, Clone)]
pub struct TypeMap {
    pub types: HashMap<String, TensorType>,
    /// Contents of small integer/bool tensors of rank ≤ 1 (shape arithmetic), element by element:
    /// `Known` values, symbolic dims (`Sym`) or `Unknown`. Bools are 0/1.
    pub vals: HashMap<String, Vec<Dim>>,
    /// Node outputs whose shape only a declaration (value_info, graph output) gave: inference
    /// could not compute it. Such a shape is a hint, not a fact: folding never trusts it.
    pub declared_only: std::collections::HashSet<String>,
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

/// Infers types for `g` given the types of values from enclosing graphs (`outer`).
pub fn infer_graph(g: &Graph, opset: i64, outer: Option<&TypeMap>) -> TypeMap {
    infer_graph_with_inputs(g, opset, outer, &[])
}

/// As `infer_graph`, with the given types in place of the declared types of those inputs (the
/// concrete shapes of a run). Given inputs, `value_info` is not read: it describes the symbolic
/// case, and every intermediate shape then follows from the inputs.
pub fn infer_graph_with_inputs(
    g: &Graph,
    opset: i64,
    outer: Option<&TypeMap>,
    inputs: &[(String, TensorType)],
) -> TypeMap {
    let mut m = outer.cloned().unwrap_or_default();
    let value_info = if inputs.is_empty() {
        &g.value_info[..]
    } else {
        &[]
    };
    for v in g.inputs.iter().chain(value_info).chain(&g.outputs) {
        if let Some(t) = v.tensor_type() {
            m.types.insert(v.name.clone(), t.clone());
        }
    }
    for (name, t) in inputs {
        m.types.insert(name.clone(), t.clone());
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
                Some(d) => {
                    if t.shape.is_none() && d.shape.is_some() {
                        m.declared_only.insert(name.clone());
                    }
                    merge_types(&t, d)
                }
                None => t,
            };
            m.types.insert(name.clone(), merged);
        }
        if let Some(v) = crate::ops::propagate_node(n, opset, &m) {
            if let Some(o) = n.outputs.first() {
                m.vals.insert(o.clone(), v);
            }
        }
    }
    m
}

/// Output types of one node (the op registry's inference; unknown for unknown ops).
pub fn infer_node(n: &Node, opset: i64, m: &TypeMap) -> Vec<TensorType> {
    crate::ops::infer_node(n, opset, m)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Attribute, Graph, ValueInfo};
    use crate::ops::shape::reshape_shape;

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
