//! ONNX Runtime's com.microsoft ops that its transformer optimizer emits (Attention,
//! SkipLayerNormalization, EmbedLayerNormalization, BiasGelu, FastGelu…) and its quantizer emits
//! (MatMulNBits): schemas loose enough for every version ONNX Runtime writes, and output types.

use super::util::known;
use super::AttrKind::*;
use super::{opt, req, InferCx, OpDef, MANY};
use crate::dtype::DataType;
use crate::model::{Dim, Node, TensorType};

fn same(cx: &InferCx) -> Option<Vec<TensorType>> {
    Some(cx.same_as_input())
}

/// Output, mean, inv_std_var, input_skip_bias_sum.
fn infer_skip_norm(cx: &InferCx) -> Option<Vec<TensorType>> {
    let x = cx.ty(0)?.clone();
    let stats = TensorType {
        dtype: Some(DataType::F32),
        shape: None,
    };
    let mut v = vec![x.clone(), stats.clone(), stats, x];
    v.truncate(cx.node.outputs.len());
    Some(v)
}

/// [B, S, hidden] → [B, S, v_hidden]: the weight's columns are q + k + v.
fn infer_attention(cx: &InferCx) -> Option<Vec<TensorType>> {
    let x = cx.ty(0)?.clone();
    let w = cx.ty(1)?.static_dims()?;
    let v_hidden = match cx.node.attr_ints("qkv_hidden_sizes") {
        Some([_, _, v]) => *v,
        _ => *w.get(1)? / 3,
    };
    let mut shape = x.shape?;
    *shape.last_mut()? = known(v_hidden);
    Some(cx.out1(x.dtype, Some(shape)))
}

fn infer_embed_layer_norm(cx: &InferCx) -> Option<Vec<TensorType>> {
    let mut shape = cx.sh(0)?;
    let table = cx.ty(2)?.static_dims()?;
    shape.push(known(*table.get(1)?));
    Some(cx.out1(cx.dt(2), Some(shape)))
}

/// MatMulNBits: `Y = A · dequant(B)ᵀ (+ bias)`, A `[…, K]` → Y `[…, N]` of A's type. B is
/// `uint8 [N, ⌈K/block_size⌉, block_size·bits/8]`: for each output column n, its K weights in
/// blocks, `bits`-bit codes packed from the low bits of each byte up; `scales` (A's type) and the
/// optional packed `zero_points` (default `2^(bits-1)`) are per (n, block): `w = (code − zero) ·
/// scale`. Inputs: A, B, scales, zero_points, g_idx, bias.
fn infer_matmul_nbits(cx: &InferCx) -> Option<Vec<TensorType>> {
    let n = cx.node.attr_i("N")?;
    let mut shape = cx.sh(0)?;
    *shape.last_mut()? = known(n);
    Some(cx.out1(cx.dt(0), Some(shape)))
}

/// GatherBlockQuantized: `Gather` on a block-quantized table, dequantized on the way out
/// (`(code − zero) · scale`, zero 8 for 4-bit uint8 data). Inputs: data, indices, scales,
/// zero_points. With `gather_axis` 0 the output is `indices.shape + data.shape[1..]`, the
/// quantized axis unpacked (`8 / bits` values a uint8 byte), of the scales' type.
fn infer_gather_block_quantized(cx: &InferCx) -> Option<Vec<TensorType>> {
    if cx.node.attr_i("gather_axis").unwrap_or(0) != 0 {
        return Some(cx.out1(cx.dt(2), None));
    }
    let data = cx.sh(0)?;
    let mut shape = cx.sh(1)?;
    let mut rest: Vec<_> = data.get(1..)?.to_vec();
    if cx.dt(0) == Some(DataType::U8) {
        let per_byte = 8 / cx.node.attr_i("bits").unwrap_or(4).clamp(1, 8);
        let last = rest.last_mut()?;
        *last = match last {
            Dim::Known(v) => known(v.checked_mul(per_byte)?),
            _ => Dim::Unknown,
        };
    }
    shape.extend(rest);
    Some(cx.out1(cx.dt(2), Some(shape)))
}

fn check_matmul_nbits(n: &Node) -> Result<(), String> {
    for a in ["K", "N"] {
        if n.attr_i(a).is_some_and(|v| v <= 0) {
            return Err(format!("{a} must be positive"));
        }
    }
    let bits = n.attr_i("bits").unwrap_or(4);
    if !(2..=8).contains(&bits) {
        return Err(format!("bits {bits} is not in 2..=8"));
    }
    match n.attr_i("block_size") {
        Some(b) if b >= 16 && (b as u64).is_power_of_two() => Ok(()),
        Some(b) => Err(format!(
            "block_size {b} is not a power of two of 16 or more"
        )),
        None => Ok(()),
    }
}

const fn ms(name: &'static str, inputs: (usize, usize), outputs: (usize, usize)) -> OpDef {
    OpDef::new(name, inputs, outputs, &[]).microsoft()
}

pub(super) const OPS: &[OpDef] = &[
    ms("BiasGelu", (2, 2), (1, 1)).infer(same),
    ms("FastGelu", (1, 2), (1, 1)).infer(same),
    ms("Gelu", (1, 1), (1, 1)).infer(same),
    ms("QuickGelu", (1, 1), (1, 1)).infer(same),
    ms("BiasAdd", (3, 3), (1, 1)).infer(same),
    OpDef::new(
        "SkipLayerNormalization",
        (3, 5),
        (1, 4),
        &[opt("epsilon", Float)],
    )
    .microsoft()
    .infer(infer_skip_norm),
    OpDef::new(
        "SkipSimplifiedLayerNormalization",
        (3, 4),
        (1, 4),
        &[opt("epsilon", Float)],
    )
    .microsoft()
    .infer(infer_skip_norm),
    OpDef::new(
        "Attention",
        (2, MANY),
        (1, 3),
        &[opt("num_heads", Int), opt("qkv_hidden_sizes", Ints)],
    )
    .microsoft()
    .infer(infer_attention),
    OpDef::new(
        "EmbedLayerNormalization",
        (1, MANY),
        (1, 3),
        &[opt("epsilon", Float)],
    )
    .microsoft()
    .infer(infer_embed_layer_norm),
    OpDef::new(
        "MatMulNBits",
        (3, 6),
        (1, 1),
        &[
            req("K", Int),
            req("N", Int),
            opt("bits", Int),
            req("block_size", Int),
            opt("accuracy_level", Int),
        ],
    )
    .microsoft()
    .check(check_matmul_nbits)
    .infer(infer_matmul_nbits),
    OpDef::new(
        "GatherBlockQuantized",
        (3, 4),
        (1, 1),
        &[
            opt("bits", Int),
            opt("block_size", Int),
            opt("gather_axis", Int),
            opt("quantize_axis", Int),
        ],
    )
    .microsoft()
    .infer(infer_gather_block_quantized),
];
