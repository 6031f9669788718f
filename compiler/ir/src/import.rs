//! ONNX → IR. Reads the protobuf, resolves external data through mmap (paths must stay inside the
//! model's folder), and converts graphs recursively (subgraphs of If/Loop/Scan included).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, Message, ModelProto, NodeProto, TensorProto, TypeProto,
    ValueInfoProto,
};

use crate::dtype::DataType;
use crate::error::{IrError, Result};
use crate::model::{Attribute, Dim, Graph, Model, Node, TensorType, ValueInfo, ValueType};
use crate::tensor::{ExternalSlice, Tensor};

/// Files at least this large are read through an mmap, their large tensors in place.
const MAP_MIN_FILE: u64 = 1 << 20;
/// `raw_data` at least this large is read in place from the mmapped model file, not copied.
const MAP_MIN_TENSOR: usize = 4096;

/// Reads a model file. External data is resolved relative to the file's folder.
///
/// Memory: a file of `MAP_MIN_FILE` or more is mmapped, and the main graph's initializers of
/// `MAP_MIN_TENSOR` bytes or more stay in the file: the protobuf crate parses a copy of the model
/// without them (`wire::split_raw_data`), and each such tensor is a slice of the map, like
/// external data. So reading a model keeps only its structure and small tensors resident.
pub fn load(path: &Path) -> Result<Model> {
    let ioerr = |e: std::io::Error| IrError::Io {
        path: path.into(),
        source: e,
    };
    let file = open_regular(path).map_err(ioerr)?;
    let dir = path.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    });
    let size = file.metadata().map_err(ioerr)?.len();
    let mut model = match mapped(&file, size) {
        Some((map, skeleton, slots)) => {
            let (proto, escaped) =
                parse_model(ModelProto::parse_from_bytes(&skeleton), path, || {
                    Ok(skeleton.clone())
                })?;
            let (map, file) = (Arc::new(map), Arc::new(file));
            let top = slots
                .into_iter()
                .map(|s| {
                    let slice = ExternalSlice {
                        map: map.clone(),
                        file: file.clone(),
                        offset: s.offset,
                        len: s.len,
                        embedded: true,
                    };
                    (s.index, slice)
                })
                .collect();
            let mut m = from_proto_with(proto, dir, path, top)?;
            m.escaped_strings = escaped;
            m
        }
        None => {
            let mut reader = BufReader::with_capacity(1 << 20, file);
            let (proto, escaped) =
                parse_model(ModelProto::parse_from_reader(&mut reader), path, || {
                    std::fs::read(path).map_err(ioerr)
                })?;
            let mut m = from_proto(proto, dir, path)?;
            m.escaped_strings = escaped;
            m
        }
    };
    if let Ok(c) = path.canonicalize() {
        model.sources.insert(0, c);
    }
    Ok(model)
}

/// The mmapped file, the model without its large `raw_data`, and where those lie; None for small
/// files and for bytes `wire` does not rewrite (they are parsed whole).
fn mapped(file: &File, size: u64) -> Option<(Mmap, Vec<u8>, Vec<crate::wire::RawSlot>)> {
    if size < MAP_MIN_FILE {
        return None;
    }
    // SAFETY: the file is mapped read-only; wcc never writes to its inputs (output paths that
    // collide with an input are refused).
    let map = unsafe { Mmap::map(file) }.ok()?;
    let (skeleton, slots) = crate::wire::split_raw_data(&map, MAP_MIN_TENSOR)?;
    Some((map, skeleton, slots))
}

/// Parses a model from bytes; external data is an error (there is no folder to resolve it in).
pub fn load_bytes(bytes: &[u8]) -> Result<Model> {
    let here = Path::new("<memory>");
    let (proto, escaped) = parse_model(ModelProto::parse_from_bytes(bytes), here, || {
        Ok(bytes.to_vec())
    })?;
    let mut m = from_proto(proto, None, here)?;
    m.escaped_strings = escaped;
    Ok(m)
}

/// A parse's result; when it failed on a string field that is not UTF-8, the model parsed again
/// from `bytes()` with such fields escaped (see `rawstr`), and `true`.
fn parse_model(
    parsed: protobuf::Result<ModelProto>,
    path: &Path,
    bytes: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<(ModelProto, bool)> {
    let perr = |detail: String| IrError::Parse {
        path: path.into(),
        detail,
    };
    match parsed {
        Ok(p) => Ok((p, false)),
        Err(e) if e.to_string().contains("UTF-8") => {
            let escaped = crate::rawstr::escape(&bytes()?).ok_or_else(|| {
                perr("malformed protobuf (while escaping non-UTF-8 strings)".into())
            })?;
            let p = ModelProto::parse_from_bytes(&escaped).map_err(|e| perr(e.to_string()))?;
            Ok((p, true))
        }
        Err(e) => Err(perr(e.to_string())),
    }
}

/// Converts a parsed ModelProto. `dir` is where external data files are looked up.
pub fn from_proto(proto: ModelProto, dir: Option<&Path>, path: &Path) -> Result<Model> {
    from_proto_with(proto, dir, path, HashMap::new())
}

/// As `from_proto`; the main graph's initializers listed in `in_place` (by index) have their
/// `raw_data` in a mapped file instead of in the proto.
fn from_proto_with(
    mut proto: ModelProto,
    dir: Option<&Path>,
    path: &Path,
    in_place: HashMap<usize, ExternalSlice>,
) -> Result<Model> {
    let gp = proto.graph.take().ok_or_else(|| IrError::Parse {
        path: path.into(),
        detail: "the model has no graph".into(),
    })?;
    if proto.ir_version >= 3 && proto.opset_import.is_empty() {
        return Err(IrError::Parse {
            path: path.into(),
            detail: format!(
                "IR version {} requires opset_import, and it is empty",
                proto.ir_version
            ),
        });
    }
    let mut ctx = Importer {
        dir: dir.map(Path::to_path_buf),
        canonical_dir: None,
        maps: HashMap::new(),
        in_place,
    };
    let graph = ctx.graph(gp)?;
    let opset_imports = std::mem::take(&mut proto.opset_import)
        .into_iter()
        .map(|o| (normalize_domain(&o.domain), o.version))
        .collect();
    let functions = std::mem::take(&mut proto.functions);
    let mut sources: Vec<PathBuf> = ctx.maps.keys().cloned().collect();
    sources.sort();
    Ok(Model {
        ir_version: proto.ir_version,
        opset_imports,
        graph,
        functions,
        rest: proto,
        sources,
        escaped_strings: false,
    })
}

fn normalize_domain(d: &str) -> String {
    if d == "ai.onnx" {
        String::new()
    } else {
        d.to_string()
    }
}

struct Importer {
    dir: Option<PathBuf>,
    canonical_dir: Option<PathBuf>,
    maps: HashMap<PathBuf, (Arc<Mmap>, Arc<File>)>,
    /// The main graph's initializers whose `raw_data` is read in place (taken by the first,
    /// outermost `graph` call).
    in_place: HashMap<usize, ExternalSlice>,
}

impl Importer {
    fn graph(&mut self, mut g: GraphProto) -> Result<Graph> {
        let mut in_place = std::mem::take(&mut self.in_place);
        let nodes = std::mem::take(&mut g.node)
            .into_iter()
            .map(|n| self.node(n))
            .collect::<Result<_>>()?;
        let initializers = std::mem::take(&mut g.initializer)
            .into_iter()
            .enumerate()
            .map(|(i, t)| match in_place.remove(&i) {
                Some(slice) => Tensor::with_external(t, slice),
                None => self.tensor(t),
            })
            .collect::<Result<_>>()?;
        let inputs = std::mem::take(&mut g.input)
            .into_iter()
            .map(value_info)
            .collect::<Result<_>>()?;
        let outputs = std::mem::take(&mut g.output)
            .into_iter()
            .map(value_info)
            .collect::<Result<_>>()?;
        let value_info = std::mem::take(&mut g.value_info)
            .into_iter()
            .map(value_info)
            .collect::<Result<_>>()?;
        let name = std::mem::take(&mut g.name);
        Ok(Graph {
            name,
            nodes,
            inputs,
            outputs,
            value_info,
            initializers,
            rest: g,
        })
    }

    fn node(&mut self, mut n: NodeProto) -> Result<Node> {
        let attributes = std::mem::take(&mut n.attribute)
            .into_iter()
            .map(|a| self.attribute(a, &n.name))
            .collect::<Result<_>>()?;
        Ok(Node {
            name: std::mem::take(&mut n.name),
            op_type: std::mem::take(&mut n.op_type),
            domain: normalize_domain(&std::mem::take(&mut n.domain)),
            inputs: std::mem::take(&mut n.input),
            outputs: std::mem::take(&mut n.output),
            attributes,
            rest: n,
        })
    }

    fn attribute(&mut self, mut a: AttributeProto, node: &str) -> Result<Attribute> {
        let mut graphs = vec![];
        match a.type_.enum_value() {
            Ok(AttributeType::GRAPH) => {
                if let Some(g) = a.g.take() {
                    graphs.push(self.graph(g)?);
                }
            }
            Ok(AttributeType::GRAPHS) => {
                for g in std::mem::take(&mut a.graphs) {
                    graphs.push(self.graph(g)?);
                }
            }
            Ok(AttributeType::TENSOR) => {
                if let Some(t) = a.t.take() {
                    let t = self.tensor(t).map_err(|e| {
                        IrError::Other(format!("node '{node}', attribute '{}': {e}", a.name))
                    })?;
                    a.t = protobuf::MessageField::some(t.to_embedded_proto()?);
                }
            }
            _ => {}
        }
        Ok(Attribute { proto: a, graphs })
    }

    fn tensor(&mut self, t: TensorProto) -> Result<Tensor> {
        let external = t.data_location.enum_value() == Ok(DataLocation::EXTERNAL)
            || (!t.external_data.is_empty() && t.raw_data.is_empty());
        if !external {
            return Tensor::from_proto(t);
        }
        let slice = self.external_slice(&t)?;
        Tensor::with_external(t, slice)
    }

    fn external_slice(&mut self, t: &TensorProto) -> Result<ExternalSlice> {
        let err = |detail: String| IrError::ExternalData {
            tensor: t.name.clone(),
            detail,
        };
        let entry = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.as_str())
        };
        let location = entry("location").ok_or_else(|| err("has no 'location'".into()))?;
        let dir = self.dir.clone().ok_or_else(|| {
            err(format!(
                "'{location}' cannot be resolved: model was not read from a file"
            ))
        })?;
        let rel = Path::new(location);
        if location.is_empty() || rel.is_absolute() || rel.has_root() {
            return Err(err(format!(
                "location '{location}' is absolute: it must be relative to the model's folder"
            )));
        }
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(err(format!(
                "location '{location}' leaves the model's folder"
            )));
        }
        if self.canonical_dir.is_none() {
            self.canonical_dir = Some(
                dir.canonicalize()
                    .map_err(|e| err(format!("model folder: {e}")))?,
            );
        }
        let cdir = self.canonical_dir.as_ref().unwrap();
        let full = dir.join(rel);
        let canon = full
            .canonicalize()
            .map_err(|e| err(format!("file '{location}' cannot be opened: {e}")))?;
        if !canon.starts_with(cdir) {
            return Err(err(format!(
                "location '{location}' resolves to {} outside the model's folder (a link that leaves it)",
                canon.display()
            )));
        }
        let parse = |k: &str| -> Result<Option<u64>> {
            entry(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| err(format!("'{k}' is not a number: '{v}'")))
                })
                .transpose()
        };
        let offset = parse("offset")?.unwrap_or(0);
        let (map, file) = match self.maps.get(&canon) {
            Some(m) => m.clone(),
            None => {
                let f = open_regular(&canon).map_err(|e| err(format!("file '{location}': {e}")))?;
                // SAFETY: the file is mapped read-only; wcc never writes to its inputs (output paths
                // that collide with an input or its data files are refused).
                let m = Arc::new(
                    unsafe { Mmap::map(&f) }.map_err(|e| err(format!("mmap '{location}': {e}")))?,
                );
                let entry = (m, Arc::new(f));
                self.maps.insert(canon.clone(), entry.clone());
                entry
            }
        };
        let dtype = DataType::from_code(t.data_type, &t.name)?;
        let need = dtype
            .storage_bytes(crate::tensor::element_count(&t.dims, &t.name)?)
            .ok_or_else(|| err("string tensors cannot be external".into()))?;
        let length = parse("length")?.unwrap_or(need);
        offset
            .checked_add(length)
            .filter(|e| *e <= map.len() as u64)
            .ok_or_else(|| {
                err(format!(
                    "range {offset}+{length} runs past the end of '{location}' ({} bytes)",
                    map.len()
                ))
            })?;
        Ok(ExternalSlice {
            map,
            file,
            offset: offset as usize,
            len: length as usize,
            embedded: false,
        })
    }
}

fn value_info(mut v: ValueInfoProto) -> Result<ValueInfo> {
    let name = std::mem::take(&mut v.name);
    let ty = match v.type_.take() {
        None => ValueType::Missing,
        Some(tp) => match tensor_type(&tp, &name)? {
            Some(t) => {
                // A type wcc reads with a loss (negative dim_values become unknown dims) is kept
                // as read in `rest`, and written back as long as no pass changes the type.
                if has_negative_dim(&tp) {
                    v.type_ = protobuf::MessageField::some(tp);
                }
                ValueType::Tensor(t)
            }
            None => ValueType::Other(tp),
        },
    };
    Ok(ValueInfo { name, ty, rest: v })
}

fn has_negative_dim(tp: &TypeProto) -> bool {
    let Some(type_proto::Value::TensorType(tt)) = &tp.value else {
        return false;
    };
    tt.shape.as_ref().is_some_and(|s| {
        s.dim.iter().any(
            |d| matches!(d.value, Some(tensor_shape_proto::dimension::Value::DimValue(v)) if v < 0),
        )
    })
}

/// The type a ValueInfo had in the file, when wcc read it with a loss and no pass changed it.
pub(crate) fn original_type(v: &ValueInfo) -> Option<&TypeProto> {
    let tp = v.rest.type_.as_ref()?;
    let read = tensor_type(tp, &v.name).ok()??;
    (v.tensor_type() == Some(&read)).then_some(tp)
}

/// Opens a file that must be a regular file: a FIFO, a device or a folder would block or make no
/// sense as a model or its weights.
fn open_regular(path: &Path) -> std::io::Result<File> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    File::open(path)
}

/// A TypeProto as a TensorType, when it is a plain tensor type without denotations. A negative
/// `dim_value` (Paddle's exporter writes -1 for a dynamic dim, and ONNX Runtime accepts it) reads
/// as an unknown dim.
fn tensor_type(tp: &TypeProto, name: &str) -> Result<Option<TensorType>> {
    let Some(type_proto::Value::TensorType(tt)) = &tp.value else {
        return Ok(None);
    };
    if !tp.denotation.is_empty() {
        return Ok(None);
    }
    let dtype = if tt.elem_type == 0 {
        None
    } else {
        Some(DataType::from_code(tt.elem_type, name)?)
    };
    let shape = match tt.shape.as_ref() {
        None => None,
        Some(s) => {
            let mut dims = vec![];
            for d in &s.dim {
                if !d.denotation.is_empty() {
                    return Ok(None);
                }
                dims.push(match &d.value {
                    Some(tensor_shape_proto::dimension::Value::DimValue(v)) => {
                        if *v < 0 {
                            Dim::Unknown
                        } else {
                            Dim::Known(*v)
                        }
                    }
                    Some(tensor_shape_proto::dimension::Value::DimParam(p)) => Dim::Sym(p.clone()),
                    _ => Dim::Unknown,
                });
            }
            let static_dims: Vec<i64> = dims
                .iter()
                .filter_map(|d| {
                    if let Dim::Known(v) = d {
                        Some(*v)
                    } else {
                        None
                    }
                })
                .collect();
            crate::tensor::element_count(&static_dims, name)?;
            Some(dims)
        }
    };
    Ok(Some(TensorType { dtype, shape }))
}
