//! The op registry: everything wcc knows about one ONNX op, in one place.
//!
//! Each op is an [`OpDef`] in the module of its family (elementwise, shape and data movement,
//! gather/scatter, reductions, matmul/conv/pool, norms, control flow, com.microsoft contrib ops).
//! An `OpDef` holds, side by side:
//! - its [`Schema`]: input/output arity, attributes with their types, and the inputs that must be
//!   known constants for its output shape to be known (shape inputs);
//! - a structural `check` of attribute values (a perm is a permutation, strides are positive…);
//! - shape/dtype inference, symbolic value propagation (shape arithmetic on rank ≤ 1 integer
//!   tensors) and evaluation on constant inputs (for folding).
//!
//! [`validate_node`] checks a node against its schema; validation runs on every model before any
//! pass or backend sees it, so passes may index the inputs a schema guarantees. An op the registry
//! does not know (another domain, or an ONNX op wcc has no facts about) stays opaque: it is never
//! assumed to have any arity, shape or value.

pub(crate) mod contrib;
pub(crate) mod control;
pub(crate) mod elementwise;
pub(crate) mod gather;
pub(crate) mod linalg;
pub(crate) mod norm;
pub(crate) mod reduce;
pub(crate) mod shape;
pub mod util;

use std::collections::HashMap;
use std::sync::OnceLock;

use onnx_protobuf::attribute_proto::AttributeType;

use crate::dtype::DataType;
use crate::eval::Array;
use crate::infer::TypeMap;
use crate::model::{Dim, Node, TensorType};

/// The domain an op belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Domain {
    /// The default ONNX domain ("" or "ai.onnx").
    Onnx,
    /// ONNX Runtime's contrib ops.
    Microsoft,
}

impl Domain {
    pub fn of(domain: &str) -> Option<Domain> {
        match domain {
            "" | "ai.onnx" => Some(Domain::Onnx),
            "com.microsoft" => Some(Domain::Microsoft),
            _ => None,
        }
    }
}

/// The type an attribute must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrKind {
    Int,
    Float,
    Str,
    Ints,
    Floats,
    Strs,
    TensorValue,
    Subgraph,
}

impl AttrKind {
    fn proto_type(self) -> AttributeType {
        match self {
            AttrKind::Int => AttributeType::INT,
            AttrKind::Float => AttributeType::FLOAT,
            AttrKind::Str => AttributeType::STRING,
            AttrKind::Ints => AttributeType::INTS,
            AttrKind::Floats => AttributeType::FLOATS,
            AttrKind::Strs => AttributeType::STRINGS,
            AttrKind::TensorValue => AttributeType::TENSOR,
            AttrKind::Subgraph => AttributeType::GRAPH,
        }
    }
}

/// One attribute an op declares.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub name: &'static str,
    pub kind: AttrKind,
    pub required: bool,
}

/// An optional attribute.
pub const fn opt(name: &'static str, kind: AttrKind) -> Attr {
    Attr {
        name,
        kind,
        required: false,
    }
}

/// A required attribute.
pub const fn req(name: &'static str, kind: AttrKind) -> Attr {
    Attr {
        name,
        kind,
        required: true,
    }
}

/// Unbounded arity (variadic).
pub const MANY: usize = usize::MAX;

/// What a node of this op must look like (the union over the opsets wcc reads, 7 to 23).
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// (min, max) inputs, counting omitted optional inputs ("") in the middle.
    pub inputs: (usize, usize),
    /// (min, max) outputs.
    pub outputs: (usize, usize),
    pub attrs: &'static [Attr],
    /// Inputs that must be known constants for the output's shape to be known (Reshape's shape,
    /// Slice's starts/ends…). Not an error when they are not: the shape is then unknown.
    pub shape_inputs: &'static [usize],
}

/// Inference context: one node and the types (and small integer contents) known so far.
pub struct InferCx<'a> {
    pub node: &'a Node,
    pub opset: i64,
    pub types: &'a TypeMap,
}

impl<'a> InferCx<'a> {
    /// The name of input `i` when present.
    pub fn input(&self, i: usize) -> Option<&'a str> {
        self.node
            .inputs
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
    pub fn has_input(&self, i: usize) -> bool {
        self.input(i).is_some()
    }
    pub fn ty(&self, i: usize) -> Option<&'a TensorType> {
        self.types.get(self.input(i)?)
    }
    pub fn dt(&self, i: usize) -> Option<DataType> {
        self.ty(i).and_then(|t| t.dtype)
    }
    pub fn sh(&self, i: usize) -> Option<Vec<Dim>> {
        self.ty(i).and_then(|t| t.shape.clone())
    }
    pub fn rank(&self, i: usize) -> Option<usize> {
        self.ty(i).and_then(|t| t.shape.as_ref()).map(|s| s.len())
    }
    /// Fully known integer contents of input `i`.
    pub fn ints(&self, i: usize) -> Option<Vec<i64>> {
        self.types.ints(self.input(i)?)
    }
    /// Symbolic contents of input `i` (shape vectors).
    pub fn symv(&self, i: usize) -> Option<&'a Vec<Dim>> {
        self.types.vals.get(self.input(i)?)
    }
    /// Axes from the `axes` attribute (older opsets) or from input `i` (newer).
    pub fn axes(&self, i: usize) -> Option<Vec<i64>> {
        util::axes_of(self.node, || self.ints(i))
    }
    /// One output of this type; any further outputs unknown.
    pub fn out1(&self, dtype: Option<DataType>, shape: Option<Vec<Dim>>) -> Vec<TensorType> {
        let mut v = vec![TensorType { dtype, shape }];
        v.resize(self.node.outputs.len().max(1), TensorType::unknown());
        v
    }
    /// The output has input 0's type.
    pub fn same_as_input(&self) -> Vec<TensorType> {
        self.out1(self.dt(0), self.sh(0))
    }
}

/// Evaluation context: one node and its constant inputs (`None` for an omitted optional input or
/// one that is not constant).
pub struct EvalCx<'a> {
    pub node: &'a Node,
    pub inputs: &'a [Option<&'a Array>],
    pub opset: i64,
}

impl<'a> EvalCx<'a> {
    pub fn x(&self, i: usize) -> Option<&'a Array> {
        self.inputs.get(i).copied().flatten()
    }
    pub fn ints(&self, i: usize) -> Option<Vec<i64>> {
        self.x(i)?.as_i64s()
    }
    /// Axes from the `axes` attribute (older opsets) or from input `i` (newer).
    pub fn axes(&self, i: usize) -> Option<Vec<i64>> {
        util::axes_of(self.node, || self.ints(i))
    }
}

pub type InferFn = fn(&InferCx) -> Option<Vec<TensorType>>;
pub type PropagateFn = fn(&InferCx) -> Option<Vec<Dim>>;
pub type EvalFn = fn(&EvalCx) -> Option<Vec<Array>>;
/// Checks attribute values (types are checked against the schema first).
pub type CheckFn = fn(&Node) -> Result<(), String>;
/// For an op with an index input: (data input, index input, the data axis the indices address).
pub type IndexFn = fn(&Node) -> Option<(usize, usize, i64)>;

/// Everything wcc knows about one op.
pub struct OpDef {
    pub name: &'static str,
    pub domain: Domain,
    pub schema: Schema,
    pub check: Option<CheckFn>,
    pub infer: Option<InferFn>,
    pub propagate: Option<PropagateFn>,
    pub eval: Option<EvalFn>,
    pub index: Option<IndexFn>,
    /// Elementwise over its inputs broadcast together (numpy rules; a one-input op such as Relu
    /// or Cast trivially): each output element depends only on the input elements at its index.
    pub broadcasts: bool,
}

impl OpDef {
    pub const fn new(
        name: &'static str,
        inputs: (usize, usize),
        outputs: (usize, usize),
        attrs: &'static [Attr],
    ) -> OpDef {
        OpDef {
            name,
            domain: Domain::Onnx,
            schema: Schema {
                inputs,
                outputs,
                attrs,
                shape_inputs: &[],
            },
            check: None,
            infer: None,
            propagate: None,
            eval: None,
            index: None,
            broadcasts: false,
        }
    }
    pub const fn microsoft(mut self) -> OpDef {
        self.domain = Domain::Microsoft;
        self
    }
    pub const fn infer(mut self, f: InferFn) -> OpDef {
        self.infer = Some(f);
        self
    }
    pub const fn propagate(mut self, f: PropagateFn) -> OpDef {
        self.propagate = Some(f);
        self
    }
    pub const fn eval(mut self, f: EvalFn) -> OpDef {
        self.eval = Some(f);
        self
    }
    pub const fn check(mut self, f: CheckFn) -> OpDef {
        self.check = Some(f);
        self
    }
    pub const fn shape_inputs(mut self, s: &'static [usize]) -> OpDef {
        self.schema.shape_inputs = s;
        self
    }
    pub const fn broadcasting(mut self) -> OpDef {
        self.broadcasts = true;
        self
    }
    pub const fn index(mut self, f: IndexFn) -> OpDef {
        self.index = Some(f);
        self
    }
}

fn registry() -> &'static HashMap<(Domain, &'static str), &'static OpDef> {
    static REG: OnceLock<HashMap<(Domain, &'static str), &'static OpDef>> = OnceLock::new();
    REG.get_or_init(|| {
        let mut m = HashMap::new();
        for family in [
            elementwise::OPS,
            shape::OPS,
            gather::OPS,
            reduce::OPS,
            linalg::OPS,
            norm::OPS,
            control::OPS,
            contrib::OPS,
        ] {
            for d in family {
                let prev = m.insert((d.domain, d.name), d);
                debug_assert!(prev.is_none(), "op {} registered twice", d.name);
            }
        }
        m
    })
}

/// The registry entry of a node's op, if wcc knows it.
pub fn lookup(domain: &str, op_type: &str) -> Option<&'static OpDef> {
    registry().get(&(Domain::of(domain)?, op_type)).copied()
}

/// The registry entry of `n`'s op.
pub fn def_of(n: &Node) -> Option<&'static OpDef> {
    lookup(&n.domain, &n.op_type)
}

/// Output types of one node (unknown for ops the registry does not know).
pub fn infer_node(n: &Node, opset: i64, types: &TypeMap) -> Vec<TensorType> {
    let unknown = || vec![TensorType::unknown(); n.outputs.len()];
    let Some(f) = def_of(n).and_then(|d| d.infer) else {
        return unknown();
    };
    let mut v = f(&InferCx {
        node: n,
        opset,
        types,
    })
    .unwrap_or_else(unknown);
    v.resize(n.outputs.len(), TensorType::unknown());
    v
}

/// Symbolic contents of a node's first output (rank ≤ 1 integer/bool tensors).
pub fn propagate_node(n: &Node, opset: i64, types: &TypeMap) -> Option<Vec<Dim>> {
    let f = def_of(n)?.propagate?;
    let v = f(&InferCx {
        node: n,
        opset,
        types,
    })?;
    (v.len() as u64 <= util::MAX_PROPAGATED_INTS).then_some(v)
}

/// Evaluates one node on constant inputs. None when the op, a dtype or an attribute is not
/// covered (the node is then left alone), never a wrong value.
pub fn eval_node(n: &Node, inputs: &[Option<&Array>], opset: i64) -> Option<Vec<Array>> {
    if n.has_subgraphs() || crate::model::is_nondeterministic(&n.op_type) {
        return None;
    }
    let f = def_of(n)?.eval?;
    let out = f(&EvalCx {
        node: n,
        inputs,
        opset,
    })?;
    (out.len() <= n.outputs.len().max(1)).then_some(out)
}

/// For an op whose input holds indices into another input (Gather: ids into an embedding table):
/// (data input, index input, axis).
pub fn index_inputs(n: &Node) -> Option<(usize, usize, i64)> {
    def_of(n)?.index.and_then(|f| f(n))
}

/// Whether `n` is elementwise over its inputs broadcast together (Add, Equal, Where, Relu, Cast…).
pub fn broadcasts(n: &Node) -> bool {
    def_of(n).is_some_and(|d| d.broadcasts)
}

/// Checks a node against its op's schema (arity, attribute types, required attributes) and the
/// op's own checks. Unknown ops pass (they are opaque).
pub fn validate_node(n: &Node) -> Result<(), String> {
    let Some(d) = def_of(n) else { return Ok(()) };
    let s = &d.schema;
    // Trailing omitted optional inputs do not count.
    let n_in = n
        .inputs
        .iter()
        .rposition(|s| !s.is_empty())
        .map_or(0, |p| p + 1);
    let range = |(lo, hi): (usize, usize)| {
        if hi == MANY {
            format!("at least {lo}")
        } else if lo == hi {
            format!("{lo}")
        } else {
            format!("{lo} to {hi}")
        }
    };
    if n_in < s.inputs.0 || n_in > s.inputs.1 {
        return Err(format!(
            "{} takes {} inputs, this node has {n_in}",
            d.name,
            range(s.inputs)
        ));
    }
    // Required inputs (the first `min`) must be present.
    if let Some(i) = n.inputs.iter().take(s.inputs.0).position(|x| x.is_empty()) {
        return Err(format!("{} input #{i} is required but empty", d.name));
    }
    let n_out = n.outputs.len();
    if n_out < s.outputs.0 || n_out > s.outputs.1 {
        return Err(format!(
            "{} has {} outputs, this node has {n_out}",
            d.name,
            range(s.outputs)
        ));
    }
    if s.outputs.0 > 0 && n.outputs.first().is_some_and(|o| o.is_empty()) {
        return Err(format!("{}'s first output has no name", d.name));
    }
    let mut seen = std::collections::HashSet::new();
    for a in &n.attributes {
        if !seen.insert(a.name()) {
            return Err(format!("attribute '{}' is given twice", a.name()));
        }
        let Some(spec) = s.attrs.iter().find(|x| x.name == a.name()) else {
            continue; // not declared: ignored (never read)
        };
        let got = a.proto.type_.enum_value_or(AttributeType::UNDEFINED);
        // Old files may leave the type unset; the field read must then hold the value.
        if got != AttributeType::UNDEFINED && got != spec.kind.proto_type() {
            return Err(format!(
                "attribute '{}' must be {:?}, it is {:?}",
                a.name(),
                spec.kind.proto_type(),
                got
            ));
        }
    }
    for spec in s.attrs.iter().filter(|x| x.required) {
        if n.attr(spec.name).is_none() {
            return Err(format!(
                "{} needs attribute '{}', which is missing",
                d.name, spec.name
            ));
        }
    }
    if let Some(check) = d.check {
        check(n)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Regression tests for inputs that used to crash inference or evaluation, and for the
    //! schema checks that keep passes safe.
    use ndarray::{ArrayD, IxDyn};

    use super::util::{window_out, Perm};
    use super::*;
    use crate::model::{Attribute, Graph, ValueInfo};

    fn node(op: &str, inputs: &[&str], attrs: Vec<Attribute>) -> Node {
        let mut n = Node::new(
            "n",
            op,
            inputs.iter().map(|s| s.to_string()).collect(),
            vec!["y".into()],
        );
        n.attributes = attrs;
        n
    }
    fn i64s(v: &[i64]) -> Array {
        Array::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
    }
    fn scalar(v: i64) -> Array {
        Array::I64(ArrayD::from_elem(IxDyn(&[]), v))
    }
    fn eval(n: &Node, inputs: &[Option<&Array>]) -> Option<Vec<Array>> {
        eval_node(n, inputs, 17)
    }

    #[test]
    fn perms_are_checked() {
        assert!(Perm::new(&[1, 0, 2]).is_ok());
        assert!(Perm::new(&[0, 0]).is_err());
        assert!(Perm::new(&[0, 5]).is_err());
        assert!(Perm::new(&[-1, 0]).is_err());
        let bad = node("Transpose", &["x"], vec![Attribute::ints("perm", &[0, 0])]);
        assert!(validate_node(&bad)
            .unwrap_err()
            .contains("not a permutation"));
        let x = Array::F32(ArrayD::zeros(IxDyn(&[2, 3])));
        assert!(eval(&bad, &[Some(&x)]).is_none());
        let p = Perm::new(&[1, 2, 0]).unwrap();
        assert_eq!(p.after(&p).unwrap().as_slice(), &[2, 0, 1]);
    }

    #[test]
    fn schemas_check_arity_and_attribute_types() {
        let mm = node("MatMul", &["a"], vec![]);
        assert!(validate_node(&mm).unwrap_err().contains("takes 2 inputs"));
        let mut t = node("Transpose", &["x"], vec![Attribute::int("perm", 1)]);
        assert!(validate_node(&t).unwrap_err().contains("must be INTS"));
        t.attributes.clear();
        assert!(validate_node(&t).is_ok());
        let conv = node(
            "Conv",
            &["x", "w"],
            vec![Attribute::ints("strides", &[0, 1])],
        );
        assert!(validate_node(&conv).unwrap_err().contains("strides"));
        // Passes index the inputs a schema guarantees (MiSS branch: MatMul's weight; layer
        // dropping: SkipLayerNormalization's gamma).
        let mut skip = node("SkipLayerNormalization", &["x", "skip"], vec![]);
        skip.domain = "com.microsoft".into();
        assert!(validate_node(&skip)
            .unwrap_err()
            .contains("takes 3 to 5 inputs"));
        let concat = node("Concat", &["a", "b"], vec![]);
        assert!(validate_node(&concat).unwrap_err().contains("'axis'"));
        // Unknown ops and domains are opaque.
        let mut u = node("MyOp", &[], vec![]);
        assert!(validate_node(&u).is_ok());
        u.domain = "com.example".into();
        u.op_type = "MatMul".into();
        assert!(validate_node(&u).is_ok());
    }

    #[test]
    fn conv_and_pool_output_dims_floor() {
        // (1 - 8) / 8 + 1 floors to 0, not 1.
        assert_eq!(window_out(1, 8, 8, 1, 0, false), Some(0));
        assert_eq!(window_out(7, 3, 2, 1, 0, false), Some(3));
        assert_eq!(window_out(8, 3, 2, 1, 0, true), Some(4));
        assert_eq!(window_out(5, 3, 0, 1, 0, false), None);
        let g = Graph {
            inputs: vec![
                ValueInfo::tensor("x", TensorType::known(DataType::F32, &[1, 1, 1, 1])),
                ValueInfo::tensor("w", TensorType::known(DataType::F32, &[2, 1, 8, 1])),
            ],
            nodes: vec![node(
                "Conv",
                &["x", "w"],
                vec![Attribute::ints("strides", &[8, 1])],
            )],
            ..Default::default()
        };
        let m = crate::infer::infer_graph(&g, 17, None);
        assert_eq!(
            m.shape("y"),
            Some(&vec![
                Dim::Known(1),
                Dim::Known(2),
                Dim::Known(0),
                Dim::Known(1)
            ])
        );
    }

    #[test]
    fn evaluation_never_panics_on_bad_values() {
        // Mod(i64::MIN, -1) wraps instead of overflowing; Mod by 0 is left to the runtime.
        let m = node("Mod", &["a", "b"], vec![]);
        let r = eval(&m, &[Some(&i64s(&[i64::MIN, -7])), Some(&i64s(&[-1, 3]))]).unwrap();
        assert_eq!(r[0], i64s(&[0, 2]));
        assert!(eval(&m, &[Some(&i64s(&[1])), Some(&i64s(&[0]))]).is_none());
        // Slice with more starts than the rank, a negative step over an empty dim, empty steps.
        let x = Array::F32(ArrayD::zeros(IxDyn(&[2])));
        let s = node("Slice", &["x", "s", "e"], vec![]);
        assert!(eval(&s, &[Some(&x), Some(&i64s(&[0, 0])), Some(&i64s(&[1, 1]))]).is_none());
        let empty = Array::F32(ArrayD::zeros(IxDyn(&[0])));
        let s = node("Slice", &["x", "s", "e", "a", "st"], vec![]);
        let r = eval(
            &s,
            &[
                Some(&empty),
                Some(&i64s(&[-1])),
                Some(&i64s(&[i64::MIN])),
                Some(&i64s(&[0])),
                Some(&i64s(&[-1])),
            ],
        )
        .unwrap();
        assert_eq!(r[0].shape(), &[0]);
        assert!(eval(
            &s,
            &[
                Some(&x),
                Some(&i64s(&[0])),
                Some(&i64s(&[1])),
                Some(&i64s(&[0])),
                Some(&i64s(&[]))
            ]
        )
        .is_none());
        // Concat of arrays of different ranks.
        let c = node("Concat", &["a", "b"], vec![Attribute::int("axis", 0)]);
        let m = Array::F32(ArrayD::zeros(IxDyn(&[2, 2])));
        assert!(eval(&c, &[Some(&i64s(&[1])), Some(&m)]).is_none());
        // Range with an empty operand, or a huge one.
        let r = node("Range", &["a", "b", "c"], vec![]);
        assert!(eval(&r, &[Some(&i64s(&[])), Some(&scalar(3)), Some(&scalar(1))]).is_none());
        assert!(eval(
            &r,
            &[Some(&scalar(0)), Some(&scalar(1 << 40)), Some(&scalar(1))]
        )
        .is_none());
        assert!(eval(
            &r,
            &[
                Some(&scalar(i64::MIN)),
                Some(&scalar(i64::MAX)),
                Some(&scalar(1))
            ]
        )
        .is_none());
        let ok = eval(&r, &[Some(&scalar(2)), Some(&scalar(5)), Some(&scalar(1))]).unwrap();
        assert_eq!(ok[0], i64s(&[2, 3, 4]));
    }

    #[test]
    fn huge_declared_ranks_give_unknown_shapes() {
        // A Reshape whose shape tensor claims 2^40 elements, and a ConstantOfShape likewise.
        let g = Graph {
            inputs: vec![
                ValueInfo::tensor("x", TensorType::known(DataType::F32, &[4])),
                ValueInfo::tensor("s", TensorType::known(DataType::I64, &[1 << 40])),
            ],
            nodes: vec![node("Reshape", &["x", "s"], vec![])],
            ..Default::default()
        };
        let m = crate::infer::infer_graph(&g, 17, None);
        assert_eq!(m.shape("y"), None);
        let mut g2 = g.clone();
        g2.nodes = vec![node("ConstantOfShape", &["s"], vec![])];
        let m = crate::infer::infer_graph(&g2, 17, None);
        assert_eq!(m.shape("y"), None);
    }

    #[test]
    fn gather_facts_live_together() {
        let d = lookup("", "Gather").unwrap();
        assert!(d.infer.is_some() && d.propagate.is_some() && d.eval.is_some());
        let n = node("Gather", &["table", "ids"], vec![Attribute::int("axis", 0)]);
        assert_eq!(index_inputs(&n), Some((0, 1, 0)));
    }
}
