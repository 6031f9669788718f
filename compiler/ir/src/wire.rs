//! The protobuf wire format, just enough to keep large tensor bytes out of the protobuf crate.
//!
//! A model's weights are almost all of its bytes, and the protobuf crate would copy each of them
//! into a `Vec` on parsing and again into the message on writing. Instead:
//! - on import, `split_raw_data` copies the model's bytes *without* the `raw_data` of the main
//!   graph's large initializers (a few hundred KB for a 90 MB model) and says where each of those
//!   lies in the file; the tensors then borrow their bytes from the file's mmap;
//! - on export, `Skeleton` cuts a message serialized with a one-byte placeholder in place of
//!   each such `raw_data` into pieces, between which the real bytes are streamed (lengths of the
//!   enclosing messages fixed up), so the output is byte-identical to serializing the whole
//!   message at once (or, with `Skeleton::lead`, the same message with some initializers first).
//!
//! Every read is bounds-checked; anything unexpected (a group, a repeated singular field) makes
//! the caller fall back to the protobuf crate's own path.

/// Fields of the messages this module looks into (from onnx.proto).
const MODEL_GRAPH: u32 = 7;
const GRAPH_INITIALIZER: u32 = 5;
const TENSOR_RAW_DATA: u32 = 9;
const TENSOR_EXTERNAL_DATA: u32 = 13;
const TENSOR_DATA_LOCATION: u32 = 14;
const LEN: u64 = 2;

pub(crate) fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One field of a message: its number, wire type, the whole field's range and (for
/// length-delimited fields) the payload's range, all relative to the message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    pub number: u32,
    pub wire: u64,
    pub start: usize,
    pub body: usize,
    pub end: usize,
}

/// The top-level fields of message `b`, or None when it is not well-formed (groups included).
pub(crate) fn fields(b: &[u8]) -> Option<Vec<Field>> {
    let mut out = vec![];
    let mut pos = 0;
    while pos < b.len() {
        let start = pos;
        let key = varint(b, &mut pos)?;
        let (number, wire) = (u32::try_from(key >> 3).ok()?, key & 7);
        let body;
        match wire {
            0 => {
                varint(b, &mut pos)?;
                body = pos;
            }
            1 | 5 => {
                body = pos;
                pos = pos.checked_add(if wire == 1 { 8 } else { 4 })?;
            }
            2 => {
                let len = usize::try_from(varint(b, &mut pos)?).ok()?;
                body = pos;
                pos = pos.checked_add(len)?;
            }
            _ => return None,
        }
        if pos > b.len() {
            return None;
        }
        out.push(Field {
            number,
            wire,
            start,
            body,
            end: pos,
        });
    }
    Some(out)
}

fn put_len_field(out: &mut Vec<u8>, number: u32, len: u64) {
    put_varint(out, (u64::from(number) << 3) | LEN);
    put_varint(out, len);
}

/// Where the `raw_data` of the main graph's `index`-th initializer lies in the model's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSlot {
    pub index: usize,
    pub offset: usize,
    pub len: usize,
}

/// `model` (a serialized ModelProto) without the `raw_data` of the main graph's initializers of
/// at least `min_len` bytes, and where those bytes are. None when the bytes are not a message this
/// module can rewrite safely (the caller then parses them whole).
pub fn split_raw_data(model: &[u8], min_len: usize) -> Option<(Vec<u8>, Vec<RawSlot>)> {
    let top = fields(model)?;
    if top
        .iter()
        .filter(|f| f.number == MODEL_GRAPH && f.wire == LEN)
        .count()
        != 1
    {
        return None;
    }
    let mut slots = vec![];
    let mut out = Vec::with_capacity(64 << 10);
    for f in &top {
        if !(f.number == MODEL_GRAPH && f.wire == LEN) {
            out.extend_from_slice(&model[f.start..f.end]);
            continue;
        }
        let g = &model[f.body..f.end];
        let mut graph = Vec::with_capacity(64 << 10);
        let mut index = 0usize;
        for gf in fields(g)? {
            if !(gf.number == GRAPH_INITIALIZER && gf.wire == LEN) {
                graph.extend_from_slice(&g[gf.start..gf.end]);
                continue;
            }
            let t = &g[gf.body..gf.end];
            let tf = fields(t)?;
            let raw: Vec<&Field> = tf
                .iter()
                .filter(|x| x.number == TENSOR_RAW_DATA && x.wire == LEN)
                .collect();
            let external = tf
                .iter()
                .any(|x| x.number == TENSOR_EXTERNAL_DATA || x.number == TENSOR_DATA_LOCATION);
            match raw.as_slice() {
                [r] if !external && r.end - r.body >= min_len => {
                    let mut tensor = Vec::with_capacity(t.len() - (r.end - r.start));
                    tensor.extend_from_slice(&t[..r.start]);
                    tensor.extend_from_slice(&t[r.end..]);
                    put_len_field(&mut graph, GRAPH_INITIALIZER, tensor.len() as u64);
                    graph.extend_from_slice(&tensor);
                    slots.push(RawSlot {
                        index,
                        offset: f.body + gf.body + r.body,
                        len: r.end - r.body,
                    });
                }
                _ => graph.extend_from_slice(&g[gf.start..gf.end]),
            }
            index += 1;
        }
        put_len_field(&mut out, MODEL_GRAPH, graph.len() as u64);
        out.extend_from_slice(&graph);
    }
    Some((out, slots))
}

/// A serialized ModelProto whose main-graph initializers listed in `holes` carry a one-byte
/// placeholder `raw_data`, and the true length of each; `pieces` lists what to write to stream
/// the model with the real bytes in place.
pub struct Skeleton<'a> {
    pub bytes: &'a [u8],
    /// (initializer index, real raw_data length), sorted by index.
    pub holes: &'a [(usize, u64)],
    /// Initializers (indices) to write first in the graph, in this order, before its other
    /// fields (protobuf parsers take a message's fields in any order and append a repeated
    /// field's entries in the order they come). When there are any, the graph's length is a
    /// varint of `GRAPH_LEN_WIDTH` bytes (padded with continuation bits, as protobuf allows), so
    /// that a writer can start on them before the rest of the graph, and its length, are known
    /// (`export::WriteAhead`). Empty: the message as the protobuf crate serialized it.
    pub lead: &'a [usize],
}

/// Bytes of the fixed-width graph length written when a skeleton has lead initializers: a
/// 5-byte varint holds up to 2^35 - 1, past protobuf's 2 GiB limit.
pub const GRAPH_LEN_WIDTH: usize = 5;

/// The field header of a graph of `len` bytes with a fixed-width length (`Skeleton::lead`).
pub fn graph_head(len: u64) -> [u8; 1 + GRAPH_LEN_WIDTH] {
    let mut h = [0u8; 1 + GRAPH_LEN_WIDTH];
    h[0] = ((MODEL_GRAPH << 3) as u8) | LEN as u8;
    for (i, b) in h[1..].iter_mut().enumerate() {
        *b = ((len >> (7 * i)) & 0x7f) as u8 | if i + 1 < GRAPH_LEN_WIDTH { 0x80 } else { 0 };
    }
    h
}

/// One piece of a serialized model (`Skeleton::pieces`).
#[derive(Debug)]
pub enum Piece<'a> {
    Bytes(&'a [u8]),
    Owned(Vec<u8>),
    /// The raw bytes of initializer `k` (a hole).
    Data(usize),
    /// The graph's field header with a fixed-width length (`graph_head`) of this many bytes.
    GraphHead(u64),
}

impl Piece<'_> {
    pub fn len(&self, holes: &[(usize, u64)]) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::Owned(b) => b.len() as u64,
            Piece::Data(k) => holes
                .binary_search_by_key(k, |h| h.0)
                .map(|i| holes[i].1)
                .unwrap_or(0),
            Piece::GraphHead(_) => 1 + GRAPH_LEN_WIDTH as u64,
        }
    }
}

impl Skeleton<'_> {
    /// The model as pieces to write in order: bytes of the skeleton, fixed-up headers, and the
    /// holes' data; and the index of the first piece after the lead initializers' (0 without
    /// lead). None when the skeleton is not what `holes` and `lead` say.
    pub fn pieces(&self) -> Option<(Vec<Piece<'_>>, usize)> {
        let b = self.bytes;
        let holes = self.holes;
        let mut out: Vec<Piece> = vec![];
        let mut lead_end = 0;
        for f in fields(b)? {
            if !(f.number == MODEL_GRAPH && f.wire == LEN) {
                out.push(Piece::Bytes(&b[f.start..f.end]));
                continue;
            }
            let g = &b[f.body..f.end];
            let gfields = fields(g)?;
            // The graph's fields, each with its initializer index (None for other fields).
            let mut index = 0usize;
            let numbered: Vec<(Field, Option<usize>)> = gfields
                .into_iter()
                .map(|gf| {
                    let is_init = gf.number == GRAPH_INITIALIZER && gf.wire == LEN;
                    index += usize::from(is_init);
                    (gf, is_init.then(|| index - 1))
                })
                .collect();
            let inits: Vec<Field> = numbered
                .iter()
                .filter(|(_, i)| i.is_some())
                .map(|x| x.0)
                .collect();
            let mut is_lead = vec![false; inits.len()];
            let mut graph: Vec<Piece> = vec![];
            for &k in self.lead {
                if std::mem::replace(is_lead.get_mut(k)?, true) {
                    return None;
                }
                initializer_pieces(g, &inits[k], k, holes, &mut graph)?;
            }
            let lead_pieces = graph.len();
            for (gf, i) in &numbered {
                match i {
                    Some(k) if is_lead[*k] => {}
                    Some(k) => initializer_pieces(g, gf, *k, holes, &mut graph)?,
                    None => graph.push(Piece::Bytes(&g[gf.start..gf.end])),
                }
            }
            let glen: u64 = graph.iter().map(|p| p.len(holes)).sum();
            if self.lead.is_empty() {
                let mut head = vec![];
                put_len_field(&mut head, MODEL_GRAPH, glen);
                out.push(Piece::Owned(head));
            } else {
                out.push(Piece::GraphHead(glen));
                lead_end = out.len() + lead_pieces;
            }
            out.extend(graph);
        }
        Some((out, lead_end))
    }
}

/// The pieces of initializer field `gf` (the `k`-th) of graph `g`: as it is, or, for a hole, with
/// its `raw_data` placeholder replaced by the data and the lengths fixed up.
fn initializer_pieces<'a>(
    g: &'a [u8],
    gf: &Field,
    k: usize,
    holes: &[(usize, u64)],
    graph: &mut Vec<Piece<'a>>,
) -> Option<()> {
    if holes.binary_search_by_key(&k, |h| h.0).is_err() {
        graph.push(Piece::Bytes(&g[gf.start..gf.end]));
        return Some(());
    }
    let t = &g[gf.body..gf.end];
    let tf = fields(t)?;
    let raw = tf
        .iter()
        .find(|x| x.number == TENSOR_RAW_DATA && x.wire == LEN)?;
    let mut tensor = vec![Piece::Bytes(&t[..raw.start])];
    let mut head = vec![];
    put_len_field(&mut head, TENSOR_RAW_DATA, Piece::Data(k).len(holes));
    tensor.push(Piece::Owned(head));
    tensor.push(Piece::Data(k));
    tensor.push(Piece::Bytes(&t[raw.end..]));
    let tlen: u64 = tensor.iter().map(|p| p.len(holes)).sum();
    let mut head = vec![];
    put_len_field(&mut head, GRAPH_INITIALIZER, tlen);
    graph.push(Piece::Owned(head));
    graph.extend(tensor);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use onnx_protobuf::{GraphProto, Message, ModelProto, TensorProto};

    /// Writes `sk`'s pieces to `out`, each hole's bytes from `raws` (export writes them through
    /// `export::write_pieces`).
    fn write(sk: &Skeleton, out: &mut Vec<u8>, raws: &[Vec<u8>]) {
        for p in sk.pieces().unwrap().0 {
            match p {
                Piece::Bytes(b) => out.extend_from_slice(b),
                Piece::Owned(b) => out.extend_from_slice(&b),
                Piece::Data(k) => out.extend_from_slice(&raws[k]),
                Piece::GraphHead(len) => out.extend_from_slice(&graph_head(len)),
            }
        }
    }

    fn model(raws: &[Vec<u8>]) -> ModelProto {
        ModelProto {
            ir_version: 8,
            producer_name: "t".into(),
            graph: protobuf::MessageField::some(GraphProto {
                name: "g".into(),
                initializer: raws
                    .iter()
                    .enumerate()
                    .map(|(i, r)| TensorProto {
                        name: format!("w{i}"),
                        data_type: 2,
                        dims: vec![r.len() as i64],
                        raw_data: r.clone(),
                        doc_string: "after raw_data".into(),
                        ..Default::default()
                    })
                    .collect(),
                doc_string: "graph doc".into(),
                ..Default::default()
            }),
            doc_string: "model doc".into(),
            ..Default::default()
        }
    }

    #[test]
    fn split_and_splice_round_trip_byte_for_byte() {
        // Sizes around varint boundaries (127/128, 16383/16384) change the enclosing lengths.
        let raws: Vec<Vec<u8>> = [3usize, 127, 128, 300, 16_383, 16_384, 70_000]
            .iter()
            .map(|n| (0..*n).map(|i| (i * 7 % 251) as u8).collect())
            .collect();
        let whole = model(&raws).write_to_bytes().unwrap();
        let (skel, slots) = split_raw_data(&whole, 128).unwrap();
        assert_eq!(slots.len(), 5, "tensors of 128 bytes and more are split");
        for s in &slots {
            assert_eq!(&whole[s.offset..s.offset + s.len], &raws[s.index][..]);
        }
        // The stripped model parses, with the split tensors' raw_data empty.
        let parsed = ModelProto::parse_from_bytes(&skel).unwrap();
        assert_eq!(parsed.graph.initializer[0].raw_data.len(), 3);
        assert!(parsed.graph.initializer[6].raw_data.is_empty());
        assert_eq!(parsed.graph.initializer[6].doc_string, "after raw_data");

        // Writing: placeholders of one byte, real lengths given, bytes streamed in place.
        let mut m = model(&raws);
        let mut holes = vec![];
        for s in &slots {
            m.graph.as_mut().unwrap().initializer[s.index].raw_data = vec![0];
            holes.push((s.index, s.len as u64));
        }
        let placeholder = m.write_to_bytes().unwrap();
        let sk = Skeleton {
            bytes: &placeholder,
            holes: &holes,
            lead: &[],
        };
        let mut out = vec![];
        write(&sk, &mut out, &raws);
        assert_eq!(out, whole);
    }

    #[test]
    fn malformed_input_is_refused_not_misread() {
        let whole = model(&[vec![1; 200]]).write_to_bytes().unwrap();
        for cut in [1, 5, whole.len() / 2, whole.len() - 1] {
            assert!(split_raw_data(&whole[..cut], 16).is_none(), "cut at {cut}");
        }
        // Two graph fields (protobuf would merge them): not rewritten.
        let mut twice = whole.clone();
        twice.extend_from_slice(&whole);
        assert!(split_raw_data(&twice, 16).is_none());
    }

    #[test]
    fn lead_initializers_come_first_under_a_fixed_width_graph_length() {
        let raws: Vec<Vec<u8>> = [300usize, 5, 20_000, 70_000]
            .iter()
            .map(|n| (0..*n).map(|i| (i * 3 % 251) as u8).collect())
            .collect();
        let mut m = model(&raws);
        let holes = vec![(0, 300), (2, 20_000), (3, 70_000)];
        for &(k, _) in &holes {
            m.graph.as_mut().unwrap().initializer[k].raw_data = vec![0];
        }
        let placeholder = m.write_to_bytes().unwrap();
        let lead = [3usize, 0];
        let sk = Skeleton {
            bytes: &placeholder,
            holes: &holes,
            lead: &lead,
        };
        let (pieces, lead_end) = sk.pieces().unwrap();
        assert!(matches!(pieces[lead_end - 1], Piece::Bytes(_)));
        assert!(matches!(pieces[lead_end - 2], Piece::Data(0)));
        let mut out = vec![];
        write(&sk, &mut out, &raws);
        // The same message, initializers reordered: 3, 0, then 1, 2.
        let parsed = ModelProto::parse_from_bytes(&out).unwrap();
        let mut want = model(&raws);
        let g = want.graph.as_mut().unwrap();
        let (a, b) = (g.initializer[3].clone(), g.initializer[0].clone());
        g.initializer = vec![a, b, g.initializer[1].clone(), g.initializer[2].clone()];
        assert_eq!(parsed, want);
        // The graph's length is 5 bytes, and reads back as the graph's size.
        let f = fields(&out).unwrap();
        let graph = f.iter().find(|f| f.number == MODEL_GRAPH).unwrap();
        assert_eq!(graph.body - graph.start, 1 + GRAPH_LEN_WIDTH);
        // A lead index that is not an initializer, or twice: refused.
        for bad in [&[4usize][..], &[3, 3]] {
            let sk = Skeleton {
                bytes: &placeholder,
                holes: &holes,
                lead: bad,
            };
            assert!(sk.pieces().is_none(), "{bad:?}");
        }
    }
}
