//! Constant folding with a size guard. A node whose inputs are all constant (non-overridable
//! initializers, Constant nodes, earlier folded values) is evaluated by the IR's reference
//! evaluator; so is shape arithmetic whose dims are statically known (`Shape`, and `Gather`/`Slice`
//! of a partially known shape). Only values still read by the remaining graph become initializers.
//! Size guard: a folded value is stored only if it takes at most `max(2 × the bytes of the
//! initializers it is computed from, 64 KiB)`, so Tile, Expand or ConstantOfShape are never
//! materialized into tensors much larger than what made them, while a merged weight such as
//! `W + s·A·B` (as large as W) is. Intermediates are only transient (capped by the evaluator).
//! Random ops, other domains and nodes with subgraphs are never folded. Recurses into subgraphs
//! (which see small constants of the graphs around them).
//! May touch: nodes (removed), initializers (added). Lossless: values computed in the graph's dtype.

use std::collections::{BTreeSet, HashMap, HashSet};

use rayon::prelude::*;
use wcc_ir::eval::{eval_node, Array};
use wcc_ir::infer::{infer_graph, TypeMap};
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::validate::collect_outer_reads;
use wcc_ir::{Graph, Model, Result};

use crate::graph_util::{constant_initializers, is_nondeterministic};
use wcc_ir::Dim;

/// Folded values up to this size are always allowed (shape tensors, masks of static size, scalars).
pub const GUARD_SMALL_BYTES: u64 = 64 << 10;
/// Otherwise a folded value may be at most this many times the bytes of its inputs.
pub const GUARD_FACTOR: u64 = 2;
/// Constants of enclosing graphs up to this size are visible to folding inside subgraphs.
const OUTER_CONST_BYTES: u64 = 64 << 10;

pub struct ConstantFolding;

impl Pass for ConstantFolding {
    fn name(&self) -> &'static str {
        "constant-fold"
    }
    fn description(&self) -> &'static str {
        "evaluates constant subgraphs and known shape arithmetic, under a size guard"
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        let opset = model.default_opset();
        let mut out = PassOutcome::default();
        fold_graph(&mut model.graph, opset, None, &HashMap::new(), &mut out);
        Ok(out)
    }
}

/// Values at least this large are held as tensors between the nodes that read them.
const HOLD_AS_TENSOR_BYTES: u64 = wcc_ir::spill::SPILL_MIN_BYTES as u64;

/// A constant value during folding: in memory, or (large) as a tensor read back when used.
enum Held {
    Array(Array),
    Stored(Box<wcc_ir::Tensor>),
}

impl Held {
    /// A computed value: large ones become tensors now (to the scratch file when it is on).
    fn hold(a: Array, name: &str) -> Held {
        if a.byte_size() >= HOLD_AS_TENSOR_BYTES {
            Held::Stored(Box::new(a.to_tensor(name)))
        } else {
            Held::Array(a)
        }
    }

    /// An initializer: large ones are not loaded until a node reads them.
    fn initializer(t: &wcc_ir::Tensor) -> Option<Held> {
        if t.byte_size() >= HOLD_AS_TENSOR_BYTES {
            t.dtype()
                .is_ok_and(Array::covers)
                .then(|| Held::Stored(Box::new(t.clone())))
        } else {
            Array::from_tensor(t).map(Held::Array)
        }
    }

    fn byte_size(&self) -> u64 {
        match self {
            Held::Array(a) => a.byte_size(),
            Held::Stored(t) => t.byte_size(),
        }
    }

    /// The value as an initializer named `name`.
    fn to_tensor(&self, name: &str) -> wcc_ir::Tensor {
        match self {
            Held::Array(a) => a.to_tensor(name),
            Held::Stored(t) => {
                let mut t = (**t).clone();
                t.proto.name = name.to_string();
                t
            }
        }
    }
}

/// Bytes of the large input read per piece by `fold_streamed`.
const STREAM_PIECE_BYTES: usize = 256 << 10;

/// Folds an elementwise node (`ops::broadcasts`: Mul, Add, Relu, Cast…) whose one large input is
/// held as a tensor and whose other inputs are small arrays that broadcast into it: piece by
/// piece along its first axis longer than 1, each piece of the large input is read, evaluated by
/// the node's own evaluator and written to the result (to the scratch file when it is on), so
/// neither the whole input nor the whole result is in memory at once, and no wider copy of either
/// is made. Pieces are evaluated in parallel (rayon), each written at its place, so what is
/// resident is a piece per thread. None (the caller evaluates the node whole) when the node does
/// not have that form.
fn fold_streamed(
    n: &wcc_ir::Node,
    values: &HashMap<String, Held>,
    opset: i64,
) -> Option<wcc_ir::Tensor> {
    if !wcc_ir::ops::broadcasts(n) || n.outputs.len() != 1 || n.outputs[0].is_empty() {
        return None;
    }
    let big_names: BTreeSet<&str> = n
        .present_inputs()
        .filter(|i| matches!(values.get(*i), Some(Held::Stored(_))))
        .collect();
    let [big_name] = big_names.into_iter().collect::<Vec<_>>()[..] else {
        return None;
    };
    let Some(Held::Stored(big)) = values.get(big_name) else {
        return None;
    };
    let dtype = big.dtype().ok().filter(|d| Array::covers(*d))?;
    let shape: Vec<usize> = big
        .dims()
        .iter()
        .map(|d| usize::try_from(*d).ok())
        .collect::<Option<_>>()?;
    let rank = shape.len();
    // Every other input broadcasts into the large one's shape without growing it.
    let small = |i: &str| match values.get(i) {
        Some(Held::Array(a)) => Some(a),
        _ => None,
    };
    for i in n.present_inputs().filter(|i| *i != big_name) {
        let s = small(i)?.shape();
        if s.len() > rank
            || !s
                .iter()
                .zip(&shape[rank - s.len()..])
                .all(|(a, b)| *a == 1 || a == b)
        {
            return None;
        }
    }
    let ax = shape.iter().position(|d| *d > 1)?;
    let row_elems = shape[ax + 1..].iter().product::<usize>() as u64;
    let row_bytes = usize::try_from(dtype.storage_bytes(row_elems)?).ok()?;
    let rows = (STREAM_PIECE_BYTES / row_bytes.max(1)).max(1);
    let eval_piece = |r0: usize| -> Option<Array> {
        let r1 = (r0 + rows).min(shape[ax]);
        let mut piece_shape = shape.clone();
        piece_shape[ax] = r1 - r0;
        let bytes = big.read_range(r0 * row_bytes, (r1 - r0) * row_bytes).ok()?;
        let piece = Array::from_le_bytes(dtype, &piece_shape, &bytes)?;
        drop(bytes);
        // The other inputs' rows for this piece: sliced where they run along the axis.
        let sliced: Vec<Option<Array>> = n
            .inputs
            .iter()
            .map(|i| {
                let a = small(i)?;
                let k = (ax + a.shape().len()).checked_sub(rank)?;
                (a.shape()[k] == shape[ax]).then(|| a.slice_axis(k, r0, r1))?
            })
            .collect();
        let inputs: Vec<Option<&Array>> = n
            .inputs
            .iter()
            .zip(&sliced)
            .map(|(i, s)| match s {
                _ if i.is_empty() => None,
                _ if i == big_name => Some(&piece),
                Some(s) => Some(s),
                None => small(i),
            })
            .collect();
        let res = eval_node(n, &inputs, opset)?.pop()?;
        (res.shape() == piece_shape.as_slice()).then_some(res)
    };
    // The first piece says what the result's element type is, hence its size and row bytes.
    let first = eval_piece(0)?;
    let out_dtype = first.dtype();
    let out_row_bytes = usize::try_from(out_dtype.storage_bytes(row_elems)?).ok()?;
    let w =
        wcc_ir::spill::Writer::new(usize::try_from(out_dtype.storage_bytes(big.numel())?).ok()?)?;
    w.write_at(0, &first.as_le_bytes()).ok()?;
    drop(first);
    (rows..shape[ax])
        .into_par_iter()
        .step_by(rows)
        .try_for_each(|r0| {
            let res = eval_piece(r0).filter(|r| r.dtype() == out_dtype)?;
            w.write_at(r0 * out_row_bytes, &res.as_le_bytes()).ok()
        })?;
    w.finish(&n.outputs[0], out_dtype, big.dims()).ok()
}

fn guard_ok(out_bytes: u64, in_bytes: u64) -> bool {
    out_bytes <= GUARD_SMALL_BYTES.max(in_bytes.saturating_mul(GUARD_FACTOR))
}

fn fold_graph(
    g: &mut Graph,
    opset: i64,
    outer_types: Option<&TypeMap>,
    outer: &HashMap<String, Array>,
    out: &mut PassOutcome,
) {
    let types = infer_graph(g, opset, outer_types);
    let consts = constant_initializers(g);

    // Phase 1: evaluate every constant node. Intermediates are transient (the evaluator caps any
    // one array at 2^24 elements); the size guard applies to what gets stored, in phase 2.
    // Large values are held as tensors (a folded one goes to the scratch file at once, see
    // `wcc_ir::spill`; an initializer stays where it is) and read back only while a node that
    // reads them is evaluated, so folding every weight of a model holds about one at a time.
    let mut values: HashMap<String, Held> = HashMap::new();
    // Bytes of the initializers and Constant nodes each value is computed from (an upper bound).
    let mut src_bytes: HashMap<String, u64> = HashMap::new();
    let mut folded: BTreeSet<usize> = BTreeSet::new();
    for (idx, n) in g.nodes.iter().enumerate() {
        if !n.domain.is_empty()
            || n.has_subgraphs()
            || is_nondeterministic(&n.op_type)
            || n.outputs.is_empty()
        {
            continue;
        }
        // Shape arithmetic whose every element is known (from static dims).
        if let Some(a) = known_shape_value(n, &types) {
            src_bytes.insert(n.outputs[0].clone(), a.byte_size());
            values.insert(n.outputs[0].clone(), Held::hold(a, &n.outputs[0]));
            folded.insert(idx);
            continue;
        }
        // All present inputs constant? Asked before anything is loaded, so a weight read next to
        // a run-time value (a Gather's table, a MatMul's weight) is never copied for nothing.
        if !n
            .present_inputs()
            .all(|i| values.contains_key(i) || consts.contains(i) || outer.contains_key(i))
        {
            continue;
        }
        let mut ok = true;
        let mut src = 0u64;
        for i in n.present_inputs() {
            if !values.contains_key(i) {
                let held = if consts.contains(i) {
                    g.initializer(i).and_then(Held::initializer)
                } else {
                    outer.get(i).cloned().map(Held::Array)
                };
                match held {
                    Some(h) => {
                        src_bytes.insert(i.to_string(), h.byte_size());
                        values.insert(i.to_string(), h);
                    }
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
            src = src.saturating_add(src_bytes[i]);
        }
        if !ok {
            continue;
        }
        // An elementwise node over one large value is evaluated piece by piece.
        if let Some(t) = fold_streamed(n, &values, opset) {
            src_bytes.insert(n.outputs[0].clone(), src);
            values.insert(n.outputs[0].clone(), Held::Stored(Box::new(t)));
            folded.insert(idx);
            continue;
        }
        // Large inputs are read back for this node only.
        let mut loaded: HashMap<&str, Array> = HashMap::new();
        for i in n.present_inputs() {
            if let Some(Held::Stored(t)) = values.get(i) {
                if !loaded.contains_key(i) {
                    match Array::from_tensor(t) {
                        Some(a) => {
                            loaded.insert(i, a);
                        }
                        None => ok = false,
                    }
                }
            }
        }
        if !ok {
            continue;
        }
        let inputs: Vec<Option<&Array>> = n
            .inputs
            .iter()
            .map(|i| match values.get(i) {
                _ if i.is_empty() => None,
                Some(Held::Array(a)) => Some(a),
                Some(Held::Stored(_)) => loaded.get(i.as_str()),
                None => None,
            })
            .collect();
        let Some(results) = eval_node(n, &inputs, opset) else {
            continue;
        };
        drop(inputs);
        drop(loaded);
        if n.op_type == "Constant" {
            src = results.iter().map(|a| a.byte_size()).sum();
        }
        for (name, a) in n.outputs.iter().zip(results) {
            if !name.is_empty() {
                src_bytes.insert(name.clone(), src);
                values.insert(name.clone(), Held::hold(a, name));
            }
        }
        folded.insert(idx);
    }

    // Phase 2: the folded values the rest of the graph reads become initializers, unless one
    // would be much larger than what it is computed from: then its node stays (and that node's
    // own inputs are checked in turn), until nothing changes.
    let mut keep: BTreeSet<usize> = BTreeSet::new();
    let read = loop {
        let mut read: HashSet<String> = g.outputs.iter().map(|o| o.name.clone()).collect();
        for (idx, n) in g.nodes.iter().enumerate() {
            if folded.contains(&idx) && !keep.contains(&idx) {
                continue;
            }
            read.extend(n.present_inputs().map(str::to_string));
            for a in &n.attributes {
                for sg in &a.graphs {
                    collect_outer_reads(sg, &mut |x| {
                        read.insert(x.to_string());
                    });
                }
            }
        }
        let too_big: Vec<usize> = folded
            .iter()
            .copied()
            .filter(|idx| !keep.contains(idx))
            .filter(|idx| {
                g.nodes[*idx].outputs.iter().any(|o| {
                    read.contains(o)
                        && values.get(o).is_some_and(|a| {
                            !guard_ok(a.byte_size(), src_bytes.get(o).copied().unwrap_or(0))
                        })
                })
            })
            .collect();
        if too_big.is_empty() {
            break read;
        }
        keep.extend(too_big);
    };
    let removed: BTreeSet<usize> = folded.difference(&keep).copied().collect();
    if !removed.is_empty() {
        let mut new_inits = vec![];
        for &idx in &removed {
            for o in &g.nodes[idx].outputs {
                if !o.is_empty() && read.contains(o) {
                    if let Some(a) = values.get(o) {
                        new_inits.push(a.to_tensor(o));
                    }
                }
            }
        }
        let mut i = 0;
        g.nodes.retain(|_| {
            i += 1;
            !removed.contains(&(i - 1))
        });
        g.initializers.extend(new_inits);
        let names: HashSet<&str> = g.initializers.iter().map(|t| t.name()).collect();
        g.value_info.retain(|v| !names.contains(v.name.as_str()));
        out.changes += removed.len();
    }
    // Folding changes no value's type: the inference above still holds.
    out.changes += static_reshape_targets(g, &types);
    let guarded = keep.len();
    if guarded > 0 {
        out.notes.push(format!(
            "size guard kept {guarded} constant node(s) unfolded in graph '{}'",
            g.name
        ));
    }

    // Subgraphs see this graph's small constants.
    let has_sub = g.nodes.iter().any(|n| n.has_subgraphs());
    if has_sub {
        let mut visible = outer.clone();
        for t in &g.initializers {
            if consts.contains(t.name()) && t.byte_size() <= OUTER_CONST_BYTES {
                if let Some(a) = Array::from_tensor(t) {
                    visible.insert(t.name().to_string(), a);
                }
            }
        }
        for n in &mut g.nodes {
            for a in &mut n.attributes {
                for sg in &mut a.graphs {
                    fold_graph(sg, opset, Some(&types), &visible, out);
                }
            }
        }
    }
}

/// The value of a single-output integer/bool node of rank ≤ 1 when shape inference knows every
/// element (e.g. `Gather(Shape(x), 2)` where dim 2 of x is static).
fn known_shape_value(n: &wcc_ir::Node, types: &TypeMap) -> Option<Array> {
    if n.outputs.len() != 1 || n.op_type == "Constant" {
        return None;
    }
    let out = &n.outputs[0];
    // The rank must be inferred, not declared (a declared [1] on a scalar would change its rank).
    if types.declared_only.contains(out) {
        return None;
    }
    let vals = types.ints(out)?;
    let shape: Vec<usize> = types
        .get(out)?
        .static_dims()?
        .iter()
        .map(|d| *d as usize)
        .collect();
    if shape.len() > 1 || shape.iter().product::<usize>() != vals.len() {
        return None;
    }
    let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), vals).ok()?;
    Some(match types.dtype(out)? {
        wcc_ir::DataType::I64 => Array::I64(a),
        wcc_ir::DataType::I32 => Array::I32(a.mapv(|v| v as i32)),
        wcc_ir::DataType::Bool => Array::Bool(a.mapv(|v| v != 0)),
        _ => return None,
    })
}

/// Reshape targets computed at run time whose every element is either known or the input's own
/// dim at the same position (`Concat(Shape(x)[0:2], [-1])` reshaping `x`) become constants:
/// with `allowzero = 0` a 0 copies the input's dim, so `[0, 0, -1]` says the same for every input.
/// The shape arithmetic that computed the target is then dead. Returns the number of targets
/// replaced.
fn static_reshape_targets(g: &mut Graph, types: &TypeMap) -> usize {
    let consts = g.constants();
    let mut new_inits: Vec<wcc_ir::Tensor> = vec![];
    let mut changes = 0;
    let mut taken: HashSet<String> = g
        .initializers
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    for n in &mut g.nodes {
        if !n.is("Reshape") || n.attr_i("allowzero").unwrap_or(0) != 0 || n.inputs.len() != 2 {
            continue;
        }
        let target_name = &n.inputs[1];
        if consts.contains(target_name) || target_name.is_empty() {
            continue;
        }
        let (Some(target), Some(input)) = (types.vals.get(target_name), types.shape(&n.inputs[0]))
        else {
            continue;
        };
        let resolved: Option<Vec<i64>> = target
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Known(v) if *v >= -1 => Some(*v),
                Dim::Sym(s) if input.get(i) == Some(&Dim::Sym(s.clone())) => Some(0),
                _ => None,
            })
            .collect();
        let Some(resolved) = resolved else { continue };
        if resolved.iter().filter(|v| **v == -1).count() > 1 {
            continue;
        }
        let mut name = format!("{target_name}_static");
        while taken.contains(&name) {
            name.push('_');
        }
        taken.insert(name.clone());
        let t = Array::I64(
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[resolved.len()]), resolved)
                .expect("a vector of its own length"),
        )
        .to_tensor(&name);
        new_inits.push(t);
        n.inputs[1] = name;
        changes += 1;
    }
    g.initializers.extend(new_inits);
    changes
}
