//! The IR: a model is a graph of nodes over named values (ONNX's own SSA naming), with everything
//! wcc does not rewrite kept as the protobuf it came in (the `rest` fields), so export loses nothing.

use onnx_protobuf::{
    AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, TypeProto, ValueInfoProto,
};

use crate::dtype::DataType;
use crate::tensor::Tensor;

/// One dimension of a tensor shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Known(i64),
    /// A named symbolic dimension (`dim_param`), e.g. `batch`.
    Sym(String),
    /// Unknown and unnamed.
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Known(v) => write!(f, "{v}"),
            Dim::Sym(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A tensor's element type and (optionally) shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorType {
    pub dtype: Option<DataType>,
    /// None: rank unknown.
    pub shape: Option<Vec<Dim>>,
}

impl TensorType {
    pub fn new(dtype: DataType, shape: Vec<Dim>) -> Self {
        TensorType {
            dtype: Some(dtype),
            shape: Some(shape),
        }
    }
    pub fn known(dtype: DataType, dims: &[i64]) -> Self {
        Self::new(dtype, dims.iter().map(|d| Dim::Known(*d)).collect())
    }
    pub fn unknown() -> Self {
        TensorType {
            dtype: None,
            shape: None,
        }
    }
    /// Static dims when every dim is known.
    pub fn static_dims(&self) -> Option<Vec<i64>> {
        self.shape
            .as_ref()?
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

/// The declared type of a graph input, output or `value_info` entry.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueType {
    Tensor(TensorType),
    /// Sequence, map, optional, sparse, or a tensor type with denotations: kept as it came.
    Other(TypeProto),
    /// No type given.
    Missing,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub ty: ValueType,
    /// doc_string and metadata_props (name and type cleared).
    pub rest: ValueInfoProto,
}

impl ValueInfo {
    pub fn tensor(name: &str, ty: TensorType) -> Self {
        ValueInfo {
            name: name.to_string(),
            ty: ValueType::Tensor(ty),
            rest: Default::default(),
        }
    }
    pub fn tensor_type(&self) -> Option<&TensorType> {
        match &self.ty {
            ValueType::Tensor(t) => Some(t),
            _ => None,
        }
    }
}

/// A node attribute. Subgraph attributes (If/Loop/Scan bodies) are IR graphs, so passes reach them.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    /// The attribute as read, with `g`/`graphs` emptied when `graphs` below holds them.
    pub proto: AttributeProto,
    pub graphs: Vec<Graph>,
}

impl Attribute {
    pub fn name(&self) -> &str {
        &self.proto.name
    }
    pub fn int(name: &str, v: i64) -> Self {
        use onnx_protobuf::attribute_proto::AttributeType;
        Attribute {
            proto: AttributeProto {
                name: name.into(),
                i: v,
                type_: AttributeType::INT.into(),
                ..Default::default()
            },
            graphs: vec![],
        }
    }
    pub fn ints(name: &str, v: &[i64]) -> Self {
        use onnx_protobuf::attribute_proto::AttributeType;
        Attribute {
            proto: AttributeProto {
                name: name.into(),
                ints: v.to_vec(),
                type_: AttributeType::INTS.into(),
                ..Default::default()
            },
            graphs: vec![],
        }
    }
    pub fn string(name: &str, v: &str) -> Self {
        use onnx_protobuf::attribute_proto::AttributeType;
        Attribute {
            proto: AttributeProto {
                name: name.into(),
                s: v.as_bytes().to_vec(),
                type_: AttributeType::STRING.into(),
                ..Default::default()
            },
            graphs: vec![],
        }
    }
    pub fn tensor(name: &str, t: &Tensor) -> Self {
        use onnx_protobuf::attribute_proto::AttributeType;
        Attribute {
            proto: AttributeProto {
                name: name.into(),
                t: protobuf::MessageField::some(t.to_embedded_proto().unwrap_or_default()),
                type_: AttributeType::TENSOR.into(),
                ..Default::default()
            },
            graphs: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// "" is the default ONNX domain ("ai.onnx" is normalised to "").
    pub domain: String,
    /// Input value names; "" is an omitted optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<Attribute>,
    /// doc_string, overload, metadata_props and unknown fields.
    pub rest: NodeProto,
}

impl Node {
    pub fn new(name: &str, op_type: &str, inputs: Vec<String>, outputs: Vec<String>) -> Self {
        Node {
            name: name.into(),
            op_type: op_type.into(),
            domain: String::new(),
            inputs,
            outputs,
            attributes: vec![],
            rest: Default::default(),
        }
    }
    pub fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attributes
            .iter()
            .find(|a| a.proto.name == name)
            .map(|a| &a.proto)
    }
    pub fn attr_i(&self, name: &str) -> Option<i64> {
        self.attr(name).map(|a| a.i)
    }
    pub fn attr_f(&self, name: &str) -> Option<f32> {
        self.attr(name).map(|a| a.f)
    }
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }
    pub fn attr_s(&self, name: &str) -> Option<&[u8]> {
        self.attr(name).map(|a| a.s.as_slice())
    }
    /// True for ops of the default ONNX domain with this type.
    pub fn is(&self, op_type: &str) -> bool {
        self.domain.is_empty() && self.op_type == op_type
    }
    pub fn has_subgraphs(&self) -> bool {
        self.attributes.iter().any(|a| !a.graphs.is_empty())
    }
    /// The non-empty inputs.
    pub fn present_inputs(&self) -> impl Iterator<Item = &str> {
        self.inputs
            .iter()
            .map(|s| s.as_str())
            .filter(|s| !s.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub value_info: Vec<ValueInfo>,
    pub initializers: Vec<Tensor>,
    /// doc_string, sparse_initializer, quantization_annotation, metadata_props, unknown fields.
    pub rest: GraphProto,
}

impl Graph {
    pub fn initializer(&self, name: &str) -> Option<&Tensor> {
        self.initializers.iter().find(|t| t.name() == name)
    }
    /// Names of the initializers that are constants: those no graph input of the same name can
    /// override (ONNX lets an input replace an initializer, which is then only a default). This
    /// is the one definition of "constant" every pass uses.
    pub fn constants(&self) -> std::collections::HashSet<String> {
        let inputs: std::collections::HashSet<&str> =
            self.inputs.iter().map(|v| v.name.as_str()).collect();
        self.initializers
            .iter()
            .map(|t| t.name())
            .filter(|n| !inputs.contains(n))
            .map(str::to_string)
            .collect()
    }
    /// The initializer `name` when it is a constant (see `constants`).
    pub fn constant(&self, name: &str) -> Option<&Tensor> {
        if self.inputs.iter().any(|v| v.name == name) {
            return None;
        }
        self.initializer(name)
    }
    /// Names of values produced inside this graph or given to it (inputs and initializers).
    pub fn defined_names(&self) -> std::collections::HashSet<String> {
        let mut s: std::collections::HashSet<String> =
            self.inputs.iter().map(|v| v.name.clone()).collect();
        s.extend(self.initializers.iter().map(|t| t.name().to_string()));
        for n in &self.nodes {
            s.extend(n.outputs.iter().filter(|o| !o.is_empty()).cloned());
        }
        s
    }
    /// Visits this graph and every subgraph below it, depth first.
    pub fn for_each_graph(&self, f: &mut dyn FnMut(&Graph)) {
        f(self);
        for n in &self.nodes {
            for a in &n.attributes {
                for g in &a.graphs {
                    g.for_each_graph(f);
                }
            }
        }
    }
    /// Visits this graph and every subgraph below it, depth first, mutably.
    pub fn for_each_graph_mut(&mut self, f: &mut dyn FnMut(&mut Graph)) {
        f(self);
        for n in &mut self.nodes {
            for a in &mut n.attributes {
                for g in &mut a.graphs {
                    g.for_each_graph_mut(f);
                }
            }
        }
    }
    /// Node count including nodes in subgraphs.
    pub fn total_nodes(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| {
                1 + n
                    .attributes
                    .iter()
                    .flat_map(|a| &a.graphs)
                    .map(|g| g.total_nodes())
                    .sum::<usize>()
            })
            .sum()
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub ir_version: i64,
    /// (domain, version); "" is the default domain.
    pub opset_imports: Vec<(String, i64)>,
    pub graph: Graph,
    /// Model-local functions, kept as read.
    pub functions: Vec<FunctionProto>,
    /// producer, doc_string, metadata_props, training_info, unknown fields (graph/opsets cleared).
    pub rest: ModelProto,
    /// Canonical paths of the files this model was read from (the model and its external data):
    /// output paths that collide with them are refused.
    pub sources: Vec<std::path::PathBuf>,
    /// Some string fields were not UTF-8 and are held escaped (see `rawstr`); export restores
    /// their bytes.
    pub escaped_strings: bool,
}

impl Model {
    /// Equality of everything but `sources` (used by round-trip tests).
    pub fn same_ir(&self, other: &Model) -> bool {
        self.ir_version == other.ir_version
            && self.opset_imports == other.opset_imports
            && self.graph == other.graph
            && self.functions == other.functions
            && self.rest == other.rest
    }

    /// The opset version of the default ONNX domain.
    pub fn default_opset(&self) -> i64 {
        self.opset_imports
            .iter()
            .find(|(d, _)| d.is_empty() || d == "ai.onnx")
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.rest
            .metadata_props
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.value.as_str())
    }
    /// Sets (replacing) one metadata_props entry.
    pub fn set_metadata(&mut self, key: &str, value: &str) {
        if let Some(p) = self.rest.metadata_props.iter_mut().find(|p| p.key == key) {
            p.value = value.to_string();
        } else {
            self.rest
                .metadata_props
                .push(onnx_protobuf::StringStringEntryProto {
                    key: key.into(),
                    value: value.into(),
                    ..Default::default()
                });
        }
    }
}

/// Ops whose results are not a function of their inputs: never folded, merged or evaluated.
pub fn is_nondeterministic(op: &str) -> bool {
    matches!(
        op,
        "RandomNormal"
            | "RandomNormalLike"
            | "RandomUniform"
            | "RandomUniformLike"
            | "Multinomial"
            | "Bernoulli"
    )
}
