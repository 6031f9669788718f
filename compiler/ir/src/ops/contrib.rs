//! ONNX Runtime's com.microsoft ops that its transformer optimizer emits (Attention,
//! SkipLayerNormalization, EmbedLayerNormalization, BiasGelu, FastGelu…): schemas loose enough
//! for every version ONNX Runtime writes, and output types.

use super::util::known;
use super::AttrKind::*;
use super::{opt, InferCx, OpDef, MANY};
use crate::dtype::DataType;
use crate::model::TensorType;

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
];
