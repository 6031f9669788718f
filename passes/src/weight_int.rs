//! Weight-only 4-bit quantization, block-wise round-to-nearest (RTN): the baseline that VQ
//! codebooks are compared against, in the form ONNX Runtime's own 4-bit quantizer writes
//! (`MatMulNBits`, see "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
//! Transformers", Frantar et al., arXiv 2210.17323, §2 for RTN as the baseline).
//!
//! # Math
//! A constant weight `W[K, N]` of `Y = X·W` is cut, column by column, into blocks of
//! `b = block_size` consecutive rows (the reduction axis K; the last block may be short). For
//! block `j` of column `n`, let `m` be its entry of largest magnitude, sign kept. Then
//! `s = m / −8` (0 for an all-zero block) and every entry becomes
//! `q = clamp(round(w / s), −8, 7)`, stored as the code `q + 8 ∈ [0, 15]`: `m` itself is `−8`
//! exactly, the other entries are within `|s|/2` of their value except an entry of the opposite
//! sign above `7.5·|s|`, clamped to 7 (error at most `|s| = |m|/8`). This is symmetric (zero point
//! 8, not stored), which is what TensorRT's int4 accepts too. Scales have the weight's type; with
//! an f16 weight the codes are chosen for the f16-rounded scale, so what runs is what was
//! measured.
//!
//! # Emission
//! `MatMul(X, W)` becomes `com.microsoft::MatMulNBits(X, B, scales)` with `K`, `N`, `bits = 4`,
//! `block_size`: `B` is `uint8 [N, ⌈K/b⌉, b/2]` (two codes a byte, the first in the low nibble),
//! `scales` `[N·⌈K/b⌉]`. `Gemm(X, B, C)` with `alpha = beta = 1`, `transA = 0` becomes the same,
//! `C` as the bias input when it is a constant `[N]`, else an `Add` after. A table `E[V, D]` that
//! `Gather(E, ids)` (axis 0) reads, such as a word embedding, is quantized the same way row by
//! row (each row is a "column" of D values, D a multiple of b) and becomes
//! `com.microsoft::GatherBlockQuantized(codes [V, D/2], ids, scales [V, D/b])`, which dequantizes
//! only the rows it gathers, so the dense table never exists at run time. ONNX Runtime (CPU,
//! CUDA) runs both with its 4-bit kernels and never constant-folds them (com.microsoft ops), so
//! the saving holds in session memory as on disk; tract runs them too. Bits per weight:
//! `4 + 8·sizeof(scale)/b` (5 for f32 at b = 32, 4.5 for f16).
//!
//! With `IntForm::DequantizeLinear` (the default where the model's opset is 21 or more) the same
//! codes are written as standard ONNX instead: an `INT4` initializer of the weight's own shape
//! (`q`, two's complement, two a byte), its scales `[⌈K/b⌉, N]` (or `[N, ⌈K/b⌉]` for a Gemm with
//! transB = 1), and `DequantizeLinear(x, scales, axis, block_size)` feeding the unchanged
//! MatMul/Gemm: symmetric, as TensorRT requires; ONNX Runtime does not constant-fold
//! DequantizeLinear. Tables stay float in this form.
//!
//! # What it touches
//! Only `MatMul`/`Gemm` nodes of the top-level graph whose weight is a constant (not overridable
//! by an input) 2-D f32/f16 initializer of at least `min_elements`, finite, whose `X` has a known
//! rank of 2 or more; and (with `tables`) axis-0 `Gather`s of such a table. A weight several such
//! nodes read the same way is quantized once and shared; one read two ways (a tied embedding
//! gathered and multiplied) is left in float. The float original is left for DCE once nothing
//! else reads it. Every node's output keeps its name.

use rayon::prelude::*;
use serde::Serialize;
use wcc_ir::model::Attribute;
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{DataType, Graph, Model, Node, Result, Tensor};

use crate::gptq::{self, ColumnRounding, Gram};
use crate::graph_util::fresh_name;
use crate::linear_weights::{
    self, find_sites, float_bytes, gram_of, heldout_error, k_n, read_nk, rel_error, to_f32,
    Figures, Layout, Site, Sources, Totals, Walk,
};

/// The domain of ONNX Runtime's contrib ops.
const MS_DOMAIN: &str = "com.microsoft";

/// How many bits a code has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum IntBits {
    /// Levels −8..=7, two codes a byte.
    #[default]
    #[serde(rename = "4")]
    Four,
    /// Levels −128..=127, a code a byte.
    #[serde(rename = "8")]
    Eight,
}

impl IntBits {
    pub fn bits(self) -> usize {
        match self {
            IntBits::Four => 4,
            IntBits::Eight => 8,
        }
    }
    /// The code of 0 (`2^(bits−1)`, ONNX Runtime's default zero point).
    fn zero(self) -> i32 {
        1 << (self.bits() - 1)
    }
    /// The lowest level, `−2^(bits−1)`; the highest is `−lowest − 1`.
    fn lowest(self) -> f64 {
        -(self.zero() as f64)
    }
    /// A byte of codes that are all 0.
    fn zero_byte(self) -> u8 {
        match self {
            IntBits::Four => 0x88,
            IntBits::Eight => 0x80,
        }
    }
    /// The signed integer type DequantizeLinear's form stores.
    fn signed(self) -> DataType {
        match self {
            IntBits::Four => DataType::I4,
            IntBits::Eight => DataType::I8,
        }
    }
    /// `q` (a level) rounded from `v / s` and clamped to the levels.
    fn level(self, x: f64) -> f64 {
        x.round().clamp(self.lowest(), -self.lowest() - 1.0)
    }
}

/// What `--int4` quantizes and how.
#[derive(Debug, Clone)]
pub struct IntOptions {
    /// 4 or 8 bits a weight.
    pub bits: IntBits,
    /// Rows of a block along K (a power of two, 16 or more; ONNX Runtime's default is 32).
    pub block_size: usize,
    /// Which weights (embedding tables by default too).
    pub scope: crate::Scope,
    /// Told as weights are done.
    pub progress: crate::LayerProgress,
    /// What the quantized weights become.
    pub form: IntForm,
    /// How the codes are chosen.
    pub method: IntMethod,
    /// Calibration statistics: GPTQ needs them.
    pub stats: crate::Statistics,
}

/// How the int4 codes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IntMethod {
    /// Round every value to the nearest level of its block.
    #[default]
    Rtn,
    /// GPTQ: column by column along K, each column's rounding error spread over the columns not
    /// yet quantized, weighted by the calibration inputs (see `gptq`). Gathered tables, which no
    /// calibration input multiplies, stay round-to-nearest.
    Gptq,
}

impl IntMethod {
    /// The report's name for it.
    fn label(self) -> &'static str {
        match self {
            IntMethod::Rtn => "round-to-nearest",
            IntMethod::Gptq => "gptq",
        }
    }
}

impl std::str::FromStr for IntMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "rtn" => Ok(IntMethod::Rtn),
            "gptq" => Ok(IntMethod::Gptq),
            _ => Err(format!("unknown int4 method '{s}' (rtn or gptq)")),
        }
    }
}

/// The ONNX a quantized weight becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IntForm {
    /// `DequantizeLinear` where the model's opset is 21 or more, else `MatMulNBits`.
    #[default]
    Auto,
    /// ONNX Runtime's `com.microsoft::MatMulNBits` (and `GatherBlockQuantized` for tables).
    MatMulNBits,
    /// Standard opset-21 `DequantizeLinear` of an int4 weight with `block_size`, before the
    /// unchanged MatMul/Gemm (what TensorRT takes; tables stay in float).
    DequantizeLinear,
}

impl std::str::FromStr for IntForm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(IntForm::Auto),
            "nbits" | "matmulnbits" => Ok(IntForm::MatMulNBits),
            "dq" | "dequantizelinear" => Ok(IntForm::DequantizeLinear),
            _ => Err(format!("unknown int4 form '{s}' (auto, nbits or dq)")),
        }
    }
}

impl IntForm {
    /// The form for a model whose default-domain opset is `opset`.
    pub fn resolve(self, opset: i64) -> std::result::Result<IntForm, String> {
        match self {
            IntForm::Auto if opset >= DQ_OPSET => Ok(IntForm::DequantizeLinear),
            IntForm::Auto => Ok(IntForm::MatMulNBits),
            IntForm::DequantizeLinear if opset < DQ_OPSET => Err(format!(
                "the DequantizeLinear form needs opset {DQ_OPSET} (int4 with block_size); the \
                 model is opset {opset} (use the MatMulNBits form, or re-export at opset \
                 {DQ_OPSET})"
            )),
            f => Ok(f),
        }
    }

    fn label(self) -> &'static str {
        match self {
            IntForm::DequantizeLinear => "DequantizeLinear",
            _ => "MatMulNBits, GatherBlockQuantized",
        }
    }
}

/// The first opset whose DequantizeLinear takes int4 and `block_size`.
pub const DQ_OPSET: i64 = 21;

impl IntOptions {
    /// What the pass looks at in `form`: tables only in MatMulNBits' form, rows a multiple of
    /// the block.
    fn select(&self, form: IntForm) -> crate::Scope {
        crate::Scope {
            tables: self.scope.tables && form != IntForm::DequantizeLinear,
            ..self.scope.clone()
        }
    }
}

impl Default for IntOptions {
    fn default() -> Self {
        IntOptions {
            bits: IntBits::Four,
            block_size: 32,
            scope: crate::Scope {
                tables: true,
                ..crate::Scope::default()
            },
            progress: crate::LayerProgress::default(),
            form: IntForm::Auto,
            method: IntMethod::Rtn,
            stats: crate::Statistics::default(),
        }
    }
}

pub struct WeightInt {
    pub opts: IntOptions,
}

/// One quantized weight, for the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IntLayer {
    /// Bytes after: the codes and scales.
    #[serde(flatten)]
    pub figures: Figures,
    pub block_size: usize,
    /// How its codes were chosen (a table stays `rtn` under GPTQ).
    pub method: IntMethod,
}

/// The pass's report (`PassOutcome::details`).
#[derive(Debug, Clone, Serialize)]
pub struct IntReport {
    pub bits: IntBits,
    pub method: &'static str,
    pub form: &'static str,
    #[serde(flatten)]
    pub sources: Sources,
    pub layers: Vec<IntLayer>,
    #[serde(flatten)]
    pub totals: Totals,
    /// Weights looked at and left in float, with why.
    pub skipped: Vec<String>,
}

/// A weight's codes and scales, in MatMulNBits' layout.
pub struct Quantized {
    pub bits: IntBits,
    /// `[N, n_blocks, block_size / 2]`.
    pub codes: Vec<u8>,
    /// `[N · n_blocks]`, rounded to the weight's type.
    pub scales: Vec<f32>,
    pub rel_error: f64,
    pub method: IntMethod,
    pub output_rel_error: Option<f64>,
    pub heldout_output_rel_error: Option<f64>,
}

impl WeightInt {
    /// The pass's name in reports and `wcc.passes`, by bits.
    pub fn name_for(bits: IntBits) -> &'static str {
        match bits {
            IntBits::Four => "weight-int4",
            IntBits::Eight => "weight-int8",
        }
    }
}

impl Pass for WeightInt {
    fn name(&self) -> &'static str {
        Self::name_for(self.opts.bits)
    }
    fn description(&self) -> &'static str {
        "weight-only 4- or 8-bit block-wise quantization of MatMul/Gemm weights (MatMulNBits) and \
         gathered tables (GatherBlockQuantized)"
    }
    fn lossless(&self) -> bool {
        false
    }
    fn run_once(&self) -> bool {
        true
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        self.apply(model).map(|(out, _)| out)
    }
}

impl WeightInt {
    /// Runs the pass: what it did, and its report (also the outcome's details).
    pub fn apply(&self, model: &mut Model) -> Result<(PassOutcome, IntReport)> {
        let (b, bits) = (self.opts.block_size, self.opts.bits);
        if b < 16 || !b.is_power_of_two() {
            return Err(wcc_ir::IrError::Other(format!(
                "int{} block size {b} is not a power of two of 16 or more",
                self.opts.bits.bits()
            )));
        }
        let opset = model.default_opset();
        let form = self
            .opts
            .form
            .resolve(opset)
            .map_err(wcc_ir::IrError::Other)?;
        let g = &mut model.graph;
        let (sites, mut skipped) =
            find_sites(g, opset, &self.opts.select(form), self.opts.block_size);
        if self.opts.scope.tables && form == IntForm::DequantizeLinear {
            skipped.push("gathered tables stay float in the DequantizeLinear form".into());
        }
        // Quantize the weights a few at a time (in parallel, each read band by band) and hand
        // each group's codes to new tensors (which go to the scratch file when large) before the
        // next: what is resident is a group's codes, not the model's.
        let weights: Vec<(String, Vec<Site>)> = sites.into_iter().collect();
        let group = 2 * rayon::current_num_threads().max(1);
        let mut layers = vec![];
        let mut changes = 0;
        let list: Vec<(&str, &[Site])> = weights
            .iter()
            .map(|(w, s)| (w.as_str(), s.as_slice()))
            .collect();
        let mut walk = Walk::new(g, &list, group, &self.opts.stats);
        let mut done = 0;
        for range in walk.groups() {
            let grams = walk.grams(model, &list, range.clone())?;
            let g = &mut model.graph;
            for sub in walk.chunks(range) {
                let chunk = &weights[sub];
                let quantized: Vec<Result<Option<(Quantized, usize, usize)>>> = chunk
                    .par_iter()
                    .map(|(name, s)| {
                        let t = g.initializer(name).expect("found as a constant");
                        let gram = grams.as_ref().and_then(|h| gram_of(g, s, h));
                        let held = self
                            .opts
                            .stats
                            .heldout_grams
                            .as_ref()
                            .and_then(|h| gram_of(g, s, h));
                        let grams = (gram.as_ref(), held.as_ref());
                        match (self.opts.method, &gram) {
                            (IntMethod::Gptq, Some(h)) if h.k == k_n(t, s[0].layout).0 => {
                                quantize_gptq(
                                    t,
                                    s[0].layout,
                                    (b, bits),
                                    grams,
                                    self.opts.stats.damp,
                                )
                            }
                            _ => quantize_tensor(t, s[0].layout, (b, bits), grams),
                        }
                    })
                    .collect();
                for ((name, s), q) in chunk.iter().zip(quantized) {
                    match q? {
                        Some((q, k, n)) => {
                            changes += s.len();
                            layers.push(emit(g, name, s, q, k, n, b, form)?);
                        }
                        None => skipped.push(format!("{name}: not finite")),
                    }
                }
                done += chunk.len();
                self.opts.progress.tick(done, weights.len());
            }
        }
        let g = &mut model.graph;
        // Gemm's bias becomes an Add after; nodes were appended, so put the graph in order.
        wcc_ir::validate::topo_sort(g);
        if changes > 0 && !model.opset_imports.iter().any(|(d, _)| d == MS_DOMAIN) {
            model.opset_imports.push((MS_DOMAIN.into(), 1));
        }
        if self.opts.method == IntMethod::Gptq {
            let rtn: Vec<&str> = layers
                .iter()
                .filter(|l| l.method == IntMethod::Rtn)
                .map(|l| l.figures.weight.as_str())
                .collect();
            if !rtn.is_empty() {
                skipped.push(format!(
                    "round-to-nearest, no calibration input multiplies them: {}",
                    rtn.join(", ")
                ));
            }
        }
        let report = IntReport {
            bits,
            method: self.opts.method.label(),
            form: form.label(),
            sources: Sources::of(&self.opts.stats, &self.opts.scope, &walk),
            totals: Totals::of(layers.iter().map(|l| &l.figures)),
            layers,
            skipped,
        };
        let mut out = PassOutcome::changed(changes);
        if !report.layers.is_empty() {
            // What a deployment needs to know, in the file: ONNX Runtime folds constant float
            // subgraphs at session start, but never com.microsoft ops, so no option is needed.
            model.set_metadata(
                &format!("wcc.int{}", bits.bits()),
                &format!(
                    "{}, symmetric, block {b}: {} weights, {:.2} bits per weight, as \
                     {} (ONNX Runtime does not constant-fold these back to float: its default \
                     session options keep the weights {}-bit in memory)",
                    report.method,
                    report.layers.len(),
                    report.totals.bits_per_weight,
                    form.label(),
                    bits.bits()
                ),
            );
            out.notes.push(format!(
                "{} (block {b}, {}, symmetric)",
                report.totals.summary(report.layers.len()),
                report.method
            ));
        }
        out.details = Some(serde_json::to_value(&report).expect("serializable"));
        Ok((out, report))
    }
}

/// Adds `name`'s codes and scales to `g` and rewrites the nodes at `sites` to read them.
#[allow(clippy::too_many_arguments)]
fn emit(
    g: &mut Graph,
    name: &str,
    sites: &[Site],
    q: Quantized,
    k: usize,
    n: usize,
    b: usize,
    form: IntForm,
) -> Result<IntLayer> {
    let t = g.initializer(name).expect("found as a constant");
    let dtype = t.dtype()?;
    let dims = t.dims().to_vec();
    let bytes_before = t.byte_size();
    let n_blocks = k.div_ceil(b);
    let bits = q.bits.bits();
    let tag = format!("int{bits}");
    let layer = |bytes_after: u64, nodes: Vec<String>| IntLayer {
        figures: Figures::new(
            name,
            nodes,
            (k, n),
            (bytes_before, bytes_after),
            q.rel_error,
            (q.output_rel_error, q.heldout_output_rel_error),
        ),
        block_size: b,
        method: q.method,
    };
    if form == IntForm::DequantizeLinear {
        // One DequantizeLinear per weight, read by every node that read the weight.
        let kn = sites[0].layout == Layout::KN;
        let (x, scales) = dq_layout(&q, k, n, b, kn);
        let scale_bytes = float_bytes(&scales, dtype);
        let bytes_after = (x.len() + scale_bytes.len()) as u64;
        let x_name = fresh_name(g, &format!("{name}_{tag}"));
        g.initializers
            .push(Tensor::from_raw(&x_name, q.bits.signed(), &dims, x)?);
        let (axis, scale_dims) = if kn {
            (0, [n_blocks as i64, n as i64])
        } else {
            (1, [n as i64, n_blocks as i64])
        };
        let s_name = fresh_name(g, &format!("{name}_{tag}_scales"));
        g.initializers
            .push(Tensor::from_raw(&s_name, dtype, &scale_dims, scale_bytes)?);
        let w = fresh_name(g, &format!("{name}_dequantized"));
        let mut dq = Node::new(
            &w,
            "DequantizeLinear",
            vec![x_name, s_name],
            vec![w.clone()],
        );
        dq.attributes = vec![
            Attribute::int("axis", axis),
            Attribute::int("block_size", b as i64),
        ];
        let nodes = sites
            .iter()
            .map(|s| {
                g.nodes[s.node].inputs[1] = w.clone();
                g.nodes[s.node].name.clone()
            })
            .collect();
        g.nodes.push(dq);
        return Ok(layer(bytes_after, nodes));
    }
    let scale_bytes = float_bytes(&q.scales, dtype);
    let bytes_after = (q.codes.len() + scale_bytes.len()) as u64;
    // MatMulNBits: [N, blocks, b/2] and [N·blocks]; GatherBlockQuantized: the table's shape
    // with the last axis packed, [V, D/2] and [V, D/b].
    let (codes_dims, scales_dims) = if sites[0].layout == Layout::Rows {
        (
            vec![n as i64, (k * bits / 8) as i64],
            vec![n as i64, n_blocks as i64],
        )
    } else {
        (
            vec![n as i64, n_blocks as i64, (b * bits / 8) as i64],
            vec![(n * n_blocks) as i64],
        )
    };
    let codes_name = fresh_name(g, &format!("{name}_{tag}_codes"));
    let codes = Tensor::from_raw(&codes_name, DataType::U8, &codes_dims, q.codes)?;
    g.initializers.push(codes);
    let scales_name = fresh_name(g, &format!("{name}_{tag}_scales"));
    let scales = Tensor::from_raw(&scales_name, dtype, &scales_dims, scale_bytes)?;
    g.initializers.push(scales);
    let mut nodes = vec![];
    for site in sites {
        nodes.push(g.nodes[site.node].name.clone());
        rewrite(g, site.node, &codes_name, &scales_name, [k, n, b, bits]);
    }
    Ok(layer(bytes_after, nodes))
}

/// MatMulNBits' codes and scales in DequantizeLinear's layout: the weight's own shape (`[K, N]`
/// when `kn`, else `[N, K]`), the levels as two's complement int4 (two a byte in row-major
/// order, the first in the low nibble) or int8; scales `[⌈K/b⌉, N]` (blocks along axis 0) or
/// `[N, ⌈K/b⌉]` (axis 1).
fn dq_layout(q: &Quantized, k: usize, n: usize, b: usize, kn: bool) -> (Vec<u8>, Vec<f32>) {
    let n_blocks = k.div_ceil(b);
    let mut x = vec![0u8; (k * n * q.bits.bits()).div_ceil(8)];
    let mut scales = vec![0f32; n * n_blocks];
    for col in 0..n {
        for r in 0..k {
            let level = q.level(k, b, col, r) as u8;
            let at = if kn { r * n + col } else { col * k + r };
            match q.bits {
                IntBits::Eight => x[at] = level,
                IntBits::Four if at.is_multiple_of(2) => x[at / 2] |= level & 15,
                IntBits::Four => x[at / 2] |= (level & 15) << 4,
            }
        }
        for j in 0..n_blocks {
            let at = if kn { j * n + col } else { col * n_blocks + j };
            scales[at] = q.scales[col * n_blocks + j];
        }
    }
    (x, scales)
}

/// Replaces node `i` by MatMulNBits (and an Add for a Gemm's C that is not an `[N]` constant),
/// or a Gather by GatherBlockQuantized.
fn rewrite(g: &mut Graph, i: usize, codes: &str, scales: &str, [k, n, b, bits]: [usize; 4]) {
    let old = g.nodes[i].clone();
    if old.is("Gather") {
        let inputs = vec![codes.into(), old.inputs[1].clone(), scales.into()];
        let mut node = Node::new(
            &old.name,
            "GatherBlockQuantized",
            inputs,
            old.outputs.clone(),
        );
        node.domain = MS_DOMAIN.into();
        node.attributes = vec![
            Attribute::int("bits", bits as i64),
            Attribute::int("block_size", b as i64),
            Attribute::int("gather_axis", 0),
            Attribute::int("quantize_axis", 1),
        ];
        g.nodes[i] = node;
        return;
    }
    let mut inputs = vec![old.inputs[0].clone(), codes.into(), scales.into()];
    let mut add = None;
    if old.is("Gemm") {
        if let Some(c) = old.inputs.get(2).filter(|c| !c.is_empty()) {
            let is_bias = g.constant(c).is_some_and(|t| {
                t.dims() == [n as i64]
                    && t.dtype().ok() == g.initializer(&old.inputs[1]).and_then(|w| w.dtype().ok())
            });
            if is_bias {
                inputs.extend(["".into(), "".into(), c.clone()]);
            } else {
                add = Some(c.clone());
            }
        }
    }
    let y = old.outputs[0].clone();
    let mm_out = match &add {
        Some(_) => fresh_name(g, &format!("{y}_int{bits}_mm")),
        None => y.clone(),
    };
    let mut node = Node::new(&old.name, "MatMulNBits", inputs, vec![mm_out.clone()]);
    node.domain = MS_DOMAIN.into();
    node.attributes = vec![
        Attribute::int("K", k as i64),
        Attribute::int("N", n as i64),
        Attribute::int("bits", bits as i64),
        Attribute::int("block_size", b as i64),
    ];
    g.nodes[i] = node;
    if let Some(c) = add {
        let name = fresh_name(g, &format!("{}_bias", old.name));
        g.nodes
            .push(Node::new(&name, "Add", vec![mm_out, c], vec![y]));
    }
}

/// Quantizes `t` (read as `[K, N]` or `[N, K]`): `None` when it holds a non-finite value.
fn quantize_tensor(
    t: &Tensor,
    layout: Layout,
    (b, bits): (usize, IntBits),
    (gram, held): (Option<&Gram>, Option<&Gram>),
) -> Result<Option<(Quantized, usize, usize)>> {
    let dtype = t.dtype()?;
    let (d0, d1) = (t.dims()[0] as usize, t.dims()[1] as usize);
    let (k, n) = k_n(t, layout);
    let elem = if dtype == DataType::F16 { 2 } else { 4 };
    let n_blocks = k.div_ceil(b);
    let blob = b * bits.bits() / 8;
    let mut q = Quantizer::new(k, n, b, dtype, bits);
    if let Some(h) = gram {
        // The output error needs the whole weight: read it once, as [N, K].
        let Some(w0) = read_nk(t, layout)? else {
            return Ok(None);
        };
        for (col, w) in w0.chunks_exact(k).enumerate() {
            q.column(col, w);
        }
        let mut q = q.finish();
        let w_hat = dequantize(&q, k, b);
        q.output_rel_error = Some(h.output_error(&w0)(&w_hat));
        q.heldout_output_rel_error = heldout_error(&w0, &w_hat, held);
        return Ok(Some((q, k, n)));
    }
    // Read a band of rows at a time: `b` rows of K for [K, N] (one block of every column), a few
    // whole rows (columns of W) for [N, K].
    let rows_per_read = match layout {
        Layout::KN => b,
        Layout::NK | Layout::Rows => (1 << 20) / (k * elem).max(1) + 1,
    };
    let mut row = 0;
    while row < d0 {
        let rows = rows_per_read.min(d0 - row);
        let bytes = t.read_range(row * d1 * elem, rows * d1 * elem)?;
        let vals = to_f32(&bytes, dtype);
        if vals.iter().any(|v| !v.is_finite()) {
            return Ok(None);
        }
        match layout {
            Layout::KN => q.block_of_rows(row / b, &vals),
            Layout::NK | Layout::Rows => {
                for (r, col) in vals.chunks_exact(k).enumerate() {
                    q.column(row + r, col);
                }
            }
        }
        row += rows;
    }
    debug_assert_eq!(q.codes.len(), n * n_blocks * blob);
    Ok(Some((q.finish(), k, n)))
}

/// The weights `q` stands for, `[N, K]`.
fn dequantize(q: &Quantized, k: usize, b: usize) -> Vec<f32> {
    let nb = k.div_ceil(b);
    let n = q.scales.len() / nb;
    (0..n * k)
        .map(|i| {
            let (col, r) = (i / k, i % k);
            q.level(k, b, col, r) as f32 * q.scales[col * nb + r / b]
        })
        .collect()
}

/// GPTQ with int4 blocks: each block's scale is chosen when GPTQ enters it, from the weights as
/// the error of the columns before left them.
fn quantize_gptq(
    t: &Tensor,
    layout: Layout,
    (b, bits): (usize, IntBits),
    (gram, held): (Option<&Gram>, Option<&Gram>),
    damp: f64,
) -> Result<Option<(Quantized, usize, usize)>> {
    let gram = gram.expect("GPTQ runs with a Gram");
    let dtype = t.dtype()?;
    let Some(w0) = read_nk(t, layout)? else {
        return Ok(None);
    };
    let k = gram.k;
    let n = w0.len() / k;
    let mut w = w0.clone();
    let mut rounding = IntGptq {
        q: Quantizer::new(k, n, b, dtype, bits),
        current: vec![0.0; n],
    };
    gptq::quantize(&mut w, n, gram, damp, &mut rounding).map_err(wcc_ir::IrError::Other)?;
    let mut q = rounding.q.finish();
    q.method = IntMethod::Gptq;
    // The error against the float weight, as RTN reports it (`w` ends holding GPTQ's rounded
    // weights).
    q.rel_error = rel_error(&w0, &w);
    let w_hat = dequantize(&q, k, b);
    q.output_rel_error = Some(gram.output_error(&w0)(&w_hat));
    q.heldout_output_rel_error = heldout_error(&w0, &w_hat, held);
    Ok(Some((q, k, n)))
}

/// Int4 blocks as GPTQ's rounding rule: the codes go to `q`.
struct IntGptq {
    q: Quantizer,
    /// The current block's scale, per output row.
    current: Vec<f32>,
}

impl ColumnRounding for IntGptq {
    fn group_size(&self) -> usize {
        self.q.b
    }
    fn start_group(&mut self, g: usize, w: &[f32]) {
        let (k, b) = (self.q.k, self.q.b);
        let cols = g * b..((g + 1) * b).min(k);
        for (row, s) in self.current.iter_mut().enumerate() {
            let m = w[row * k + cols.start..row * k + cols.end]
                .iter()
                .fold(0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
            *s = self.q.scale_for(m);
            self.q.set_scale(row, g, *s);
        }
    }
    fn round(&mut self, i: usize, col: &mut [f64]) {
        for (row, v) in col.iter_mut().enumerate() {
            let s = self.current[row];
            let q = if s == 0.0 {
                0.0
            } else {
                self.q.bits.level(*v / s as f64)
            };
            self.q.put(row, i, q as i32);
            *v = q * s as f64;
        }
    }
}

/// The values the MatMul/Gemm weights `--int4` would quantize multiply: what GPTQ's
/// calibration must expose.
pub fn calibration_inputs(model: &Model, opts: &IntOptions) -> Vec<String> {
    let Ok(form) = opts.form.resolve(model.default_opset()) else {
        return vec![];
    };
    let (sites, _) = find_sites(
        &model.graph,
        model.default_opset(),
        &opts.select(form),
        opts.block_size,
    );
    linear_weights::calibration_inputs(&model.graph, &sites)
}

/// The byte of MatMulNBits' codes (`[N, ⌈K/b⌉, b·bits/8]`) that holds column `col`, row `r`:
/// with 4 bits, the low nibble for even `r`, the high one for odd (`b` is even).
fn code_byte(k: usize, b: usize, col: usize, r: usize, bits: IntBits) -> usize {
    ((col * k.div_ceil(b) + r / b) * b + r % b) * bits.bits() / 8
}

impl Quantized {
    /// The code (`bits.zero()` is zero) of column `col`, row `r`.
    fn code(&self, k: usize, b: usize, col: usize, r: usize) -> u8 {
        let byte = self.codes[code_byte(k, b, col, r, self.bits)];
        match self.bits {
            IntBits::Eight => byte,
            IntBits::Four if r.is_multiple_of(2) => byte & 15,
            IntBits::Four => byte >> 4,
        }
    }

    /// The level (code − zero) of column `col`, row `r`.
    fn level(&self, k: usize, b: usize, col: usize, r: usize) -> i32 {
        self.code(k, b, col, r) as i32 - self.bits.zero()
    }
}

/// Block-wise symmetric RTN into MatMulNBits' layout.
pub struct Quantizer {
    bits: IntBits,
    k: usize,
    n: usize,
    b: usize,
    dtype: DataType,
    codes: Vec<u8>,
    scales: Vec<f32>,
    sq_err: f64,
    sq_norm: f64,
}

impl Quantizer {
    pub fn new(k: usize, n: usize, b: usize, dtype: DataType, bits: IntBits) -> Self {
        let n_blocks = k.div_ceil(b);
        Quantizer {
            bits,
            k,
            n,
            b,
            dtype,
            // The padding of a short last block dequantizes to 0.
            codes: vec![bits.zero_byte(); n * n_blocks * b * bits.bits() / 8],
            scales: vec![0.0; n * n_blocks],
            sq_err: 0.0,
            sq_norm: 0.0,
        }
    }

    /// The scale of a block whose largest-magnitude entry is `m`, as the weight's type holds it.
    fn scale_for(&self, m: f32) -> f32 {
        let s = m / self.bits.lowest() as f32;
        match self.dtype {
            DataType::F16 => half::f16::from_f32(s).to_f32(),
            _ => s,
        }
    }

    /// Block `j` of column `col`: `w` holds its entries (at most `b`).
    fn block(&mut self, col: usize, j: usize, w: impl Iterator<Item = f32> + Clone) {
        let m = w
            .clone()
            .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let s = self.scale_for(m);
        self.set_scale(col, j, s);
        for (i, v) in w.enumerate() {
            let q = if s == 0.0 {
                0.0
            } else {
                self.bits.level((v / s) as f64) as f32
            };
            self.put(col, j * self.b + i, q as i32);
            let e = (v - q * s) as f64;
            self.sq_err += e * e;
            self.sq_norm += (v as f64) * (v as f64);
        }
    }

    /// Sets the scale of block `j` of column `col`.
    fn set_scale(&mut self, col: usize, j: usize, s: f32) {
        let n_blocks = self.k.div_ceil(self.b);
        self.scales[col * n_blocks + j] = s;
    }

    /// Stores level `q` (`bits.lowest()..`) for row `r` of column `col`.
    fn put(&mut self, col: usize, r: usize, q: i32) {
        let code = (q + self.bits.zero()) as u8;
        let byte = &mut self.codes[code_byte(self.k, self.b, col, r, self.bits)];
        *byte = match self.bits {
            IntBits::Eight => code,
            IntBits::Four if r.is_multiple_of(2) => (*byte & 0xF0) | code,
            IntBits::Four => (*byte & 0x0F) | (code << 4),
        };
    }

    /// Rows `j·b ..` of a `[K, N]` weight, row-major (`rows · N` values): block `j` of every
    /// column.
    pub fn block_of_rows(&mut self, j: usize, rows: &[f32]) {
        let n = self.n;
        for col in 0..n {
            self.block(col, j, rows.iter().skip(col).step_by(n).copied());
        }
    }

    /// All K values of column `col`.
    pub fn column(&mut self, col: usize, w: &[f32]) {
        for (j, blk) in w.chunks(self.b).enumerate() {
            self.block(col, j, blk.iter().copied());
        }
    }

    pub fn finish(self) -> Quantized {
        Quantized {
            bits: self.bits,
            codes: self.codes,
            scales: self.scales,
            rel_error: if self.sq_norm > 0.0 {
                (self.sq_err / self.sq_norm).sqrt()
            } else {
                0.0
            },
            method: IntMethod::Rtn,
            output_rel_error: None,
            heldout_output_rel_error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dequantized value of (column n, row k), read back from the layout as ONNX Runtime's
    /// MatMulNBits documents it.
    fn deq(q: &Quantized, k_all: usize, b: usize, n: usize, k: usize) -> f32 {
        let n_blocks = k_all.div_ceil(b);
        let byte = q.codes[(n * n_blocks + k / b) * b / 2 + (k % b) / 2];
        let code = if k.is_multiple_of(2) {
            byte & 15
        } else {
            byte >> 4
        };
        (code as f32 - 8.0) * q.scales[n * n_blocks + k / b]
    }

    #[test]
    fn every_value_is_within_its_blocks_bound_and_the_largest_is_exact() {
        let (k, n, b) = (40, 3, 16); // a short last block of 8
        let w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 13.0)
            .collect();
        let mut qz = Quantizer::new(k, n, b, DataType::F32, IntBits::Four);
        for j in 0..k.div_ceil(b) {
            let rows = &w[j * b * n..((j + 1) * b).min(k) * n];
            qz.block_of_rows(j, rows);
        }
        let q = qz.finish();
        for col in 0..n {
            for blk in 0..k.div_ceil(b) {
                let vals: Vec<f32> = (blk * b..((blk + 1) * b).min(k))
                    .map(|r| w[r * n + col])
                    .collect();
                let m = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                let mut exact_largest = false;
                for r in blk * b..((blk + 1) * b).min(k) {
                    let err = (w[r * n + col] - deq(&q, k, b, col, r)).abs();
                    assert!(
                        err <= m / 8.0 + 1e-6,
                        "({r},{col}) err {err} bound {}",
                        m / 8.0
                    );
                    exact_largest |= w[r * n + col].abs() == m && err < 1e-6;
                }
                assert!(
                    exact_largest,
                    "column {col} block {blk}: its largest entry is -8 x scale"
                );
            }
        }
        assert!(q.rel_error > 0.0 && q.rel_error < 0.1, "{}", q.rel_error);
        // The same weight read as [N, K] columns gives the same bytes.
        let mut qt = Quantizer::new(k, n, b, DataType::F32, IntBits::Four);
        for col in 0..n {
            let c: Vec<f32> = (0..k).map(|r| w[r * n + col]).collect();
            qt.column(col, &c);
        }
        let qt = qt.finish();
        assert_eq!(qt.codes, q.codes);
        assert_eq!(qt.scales, q.scales);
    }

    #[test]
    fn an_all_zero_block_is_zero_and_f16_scales_are_what_is_stored() {
        let mut qz = Quantizer::new(32, 1, 32, DataType::F16, IntBits::Four);
        let w: Vec<f32> = (0..32)
            .map(|i| if i < 16 { 0.0 } else { 0.1 * i as f32 })
            .collect();
        qz.column(0, &w);
        let q = qz.finish();
        assert_eq!(
            q.scales[0],
            half::f16::from_f32(q.scales[0]).to_f32(),
            "the scale is an f16 value"
        );
        let mut z = Quantizer::new(16, 1, 16, DataType::F32, IntBits::Four);
        z.column(0, &[0.0; 16]);
        let z = z.finish();
        assert_eq!(z.scales, vec![0.0]);
        assert!(z.codes.iter().all(|b| *b == 0x88));
    }
}
