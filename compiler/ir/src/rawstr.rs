//! String fields that are not UTF-8. proto2 `string` fields may hold any bytes (older exporters
//! wrote Latin-1 names and doc strings), but the protobuf crate refuses them. A model whose parse
//! fails for that reason is read again after each such field is escaped to a marker string
//! (`MARK` + hex of the bytes); export turns every marker back into its bytes, so the file
//! round-trips bit for bit. Only such models pay for the extra pass over their bytes.

/// The ONNX messages that hold strings or messages (onnx-protobuf is generated without
/// reflection, so the schema's string and message fields are listed here, from onnx.proto).
#[derive(Clone, Copy)]
enum Msg {
    Model,
    OpsetId,
    Entry,
    Graph,
    Node,
    Attribute,
    ValueInfo,
    Tensor,
    Sparse,
    Shape,
    Dim,
    Type,
    TypeTensor,
    TypeElem,
    TypeMap,
    Annotation,
    Training,
    Function,
    DeviceConfig,
    NodeDeviceConfig,
    Sharding,
    ShardedDim,
    SimpleSharded,
}

/// What field `n` of `m` holds: a string, a message, or anything else (None).
enum Field {
    Str,
    Message(Msg),
}

fn field_of(m: Msg, n: u32) -> Option<Field> {
    use Field::{Message as M, Str as S};
    use Msg::*;
    Some(match (m, n) {
        (Model, 2 | 3 | 4 | 6) => S,
        (Model, 7) => M(Graph),
        (Model, 8) => M(OpsetId),
        (Model, 14) => M(Entry),
        (Model, 20) => M(Training),
        (Model, 25) => M(Function),
        (Model, 26) => M(DeviceConfig),
        (OpsetId, 1) | (Entry, 1 | 2) => S,
        (Graph, 1) => M(Node),
        (Graph, 2 | 10) => S,
        (Graph, 5) => M(Tensor),
        (Graph, 15) => M(Sparse),
        (Graph, 11..=13) => M(ValueInfo),
        (Graph, 14) => M(Annotation),
        (Graph, 16) => M(Entry),
        (Node, 1 | 2 | 3 | 4 | 6 | 7 | 8) => S,
        (Node, 5) => M(Attribute),
        (Node, 9) => M(Entry),
        (Node, 10) => M(NodeDeviceConfig),
        (Attribute, 1 | 13 | 21) => S,
        (Attribute, 5 | 10) => M(Tensor),
        (Attribute, 6 | 11) => M(Graph),
        (Attribute, 22 | 23) => M(Sparse),
        (Attribute, 14 | 15) => M(Type),
        (ValueInfo, 1 | 3) => S,
        (ValueInfo, 2) => M(Type),
        (ValueInfo, 4) => M(Entry),
        (Tensor, 8 | 12) => S,
        (Tensor, 13 | 16) => M(Entry),
        (Sparse, 1 | 2) => M(Tensor),
        (Shape, 1) => M(Dim),
        (Dim, 2 | 3) => S,
        (Type, 1 | 8) => M(TypeTensor),
        (Type, 4 | 9) => M(TypeElem),
        (Type, 5) => M(TypeMap),
        (Type, 6) => S,
        (TypeTensor, 2) => M(Shape),
        (TypeElem, 1) => M(Type),
        (TypeMap, 2) => M(Type),
        (Annotation, 1) => S,
        (Annotation, 2) => M(Entry),
        (Training, 1 | 2) => M(Graph),
        (Training, 3 | 4) => M(Entry),
        (Function, 1 | 4 | 5 | 6 | 8 | 10 | 13) => S,
        (Function, 11) => M(Attribute),
        (Function, 7) => M(Node),
        (Function, 9) => M(OpsetId),
        (Function, 12) => M(ValueInfo),
        (Function, 14) => M(Entry),
        (DeviceConfig, 1 | 3) => S,
        (NodeDeviceConfig, 1) => S,
        (NodeDeviceConfig, 2) => M(Sharding),
        (Sharding, 1) => S,
        (Sharding, 4) => M(ShardedDim),
        (ShardedDim, 2) => M(SimpleSharded),
        (SimpleSharded, 2) => S,
        _ => return None,
    })
}

/// Starts an escaped string: U+10FFFF is a noncharacter no exporter writes.
pub const MARK: &str = "\u{10FFFF}wcc-bytes:";

/// Limits nesting (ONNX graphs nest through attributes).
const MAX_DEPTH: usize = 100;

use crate::wire::{put_varint, varint};

/// Copies message `b` of type `desc`, rewriting every string field with `f` (None: unchanged).
fn walk(
    b: &[u8],
    desc: Msg,
    f: &dyn Fn(&[u8]) -> Option<Vec<u8>>,
    depth: usize,
) -> Option<Vec<u8>> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut out = Vec::with_capacity(b.len());
    let mut pos = 0;
    while pos < b.len() {
        let start = pos;
        let key = varint(b, &mut pos)?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => {
                varint(b, &mut pos)?;
                out.extend_from_slice(&b[start..pos]);
            }
            1 | 5 => {
                pos = pos.checked_add(if wire == 1 { 8 } else { 4 })?;
                out.extend_from_slice(b.get(start..pos)?);
            }
            2 => {
                let len = usize::try_from(varint(b, &mut pos)?).ok()?;
                let end = pos.checked_add(len)?;
                let body = b.get(pos..end)?;
                let new = match field_of(desc, field) {
                    Some(Field::Str) => f(body),
                    Some(Field::Message(m)) => Some(walk(body, m, f, depth + 1)?),
                    None => None,
                };
                match new {
                    Some(nb) => {
                        put_varint(&mut out, key);
                        put_varint(&mut out, nb.len() as u64);
                        out.extend_from_slice(&nb);
                    }
                    None => out.extend_from_slice(&b[start..end]),
                }
                pos = end;
            }
            _ => return None, // groups (3, 4) are not used by ONNX
        }
    }
    Some(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `bytes` (a serialized ModelProto) with every non-UTF-8 string field escaped; None when the
/// bytes are not a well-formed message.
pub fn escape(bytes: &[u8]) -> Option<Vec<u8>> {
    walk(
        bytes,
        Msg::Model,
        &|s| match std::str::from_utf8(s) {
            Ok(_) => None,
            Err(_) => Some(format!("{MARK}{}", hex(s)).into_bytes()),
        },
        0,
    )
}

/// `bytes` (a serialized ModelProto) with every escaped string field back to its bytes.
pub fn unescape(bytes: &[u8]) -> Option<Vec<u8>> {
    walk(
        bytes,
        Msg::Model,
        &|s| {
            let s = std::str::from_utf8(s).ok()?;
            unhex(s.strip_prefix(MARK)?)
        },
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip() {
        use protobuf::Message;
        let m = onnx_protobuf::ModelProto {
            producer_name: "ok".into(),
            doc_string: format!("{MARK}{}", hex(b"caf\xe9")),
            ..Default::default()
        };
        let escaped = m.write_to_bytes().unwrap();
        let raw = unescape(&escaped).unwrap();
        assert!(raw.windows(4).any(|w| w == b"caf\xe9"));
        assert!(onnx_protobuf::ModelProto::parse_from_bytes(&raw).is_err());
        assert_eq!(escape(&raw).unwrap(), escaped);
    }
}
