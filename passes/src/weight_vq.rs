//! Vector quantization of linear weights with a learned codebook per layer, after VPTQ
//! ("VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large Language Models", Liu et
//! al., arXiv 2409.17066, §3–4).
//!
//! # Math
//! A layer `y = W x`, `W` `[N, K]` (a row per output), is cut along its outputs: for every input
//! column `q` and `j < N/v`, the vector `w_{q,j} = (W[j·v + t, q])_{t<v}`. A codebook `C` of `k`
//! centroids in `R^v` is fitted to all of them by weighted k-means (see `kmeans`), each vector
//! weighted by `H_qq` when calibration inputs give `H = XᵀX` (VPTQ's Hessian-weighted k-means), by
//! 1 without. Every vector becomes the index of a centroid: without calibration the nearest one;
//! with it, column by column along K with GPTQ's error feedback (see `gptq`), each column's
//! vectors mapped to their nearest centroid and the error spread over the columns not yet
//! quantized. `Ŵ[j·v + t, q] = C[idx[q, j], t]`.
//!
//! Bits per weight: `(bytes of idx + bytes of C) · 8 / (K·N)`, the indices stored as uint8 for
//! `k ≤ 256`, else uint16: `8/v` (or `16/v`) plus the codebook, amortized over the layer.
//!
//! # Emission
//! In standard ONNX, in the layer's own `[K, N]` orientation: `idx` `[K, N/v]` (uint8/uint16) →
//! `Cast(to int32)` → `Gather(C [k, v], ·)` `[K, N/v, v]` → `Reshape([K, N])` → the MatMul's (or
//! Gemm's, then with `transB = 0`) weight input. ONNX Runtime and tract run it as is. ONNX
//! Runtime constant-folds that chain into a dense weight when it creates a session (the file
//! stays small, the session's memory does not) unless constant folding is turned off, which
//! the `wcc.vq` metadata says.
//!
//! # What it touches
//! What `linear_weights::find_sites` selects (MatMul/Gemm weights, no tables yet) whose N is a
//! multiple of `v`; every node that reads the weight reads the decoded one.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;
use serde::Serialize;
use wcc_ir::model::Attribute;
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{DataType, Graph, Model, Node, Result, Tensor};

use crate::gptq::{self, ColumnRounding, Gram};
use crate::graph_util::fresh_name;
use crate::kmeans::{self, KMeans};
use crate::linear_weights::{
    find_sites, float_bytes, gram_of, k_n, read_nk, rel_error, Layout, Select, Site, Totals,
};

/// What `--vq-bits` quantizes and how.
#[derive(Debug, Clone)]
pub struct VqOptions {
    /// Vector length `v`.
    pub vector: usize,
    /// Centroids `k` (at most 65536).
    pub centroids: usize,
    /// Weights with fewer elements are left in float.
    pub min_elements: u64,
    /// k-means: most Lloyd iterations, seed, most vectors fitted on.
    pub iters: usize,
    pub seed: u64,
    pub sample: usize,
    /// GPTQ's damping.
    pub damp: f64,
    /// `H = XᵀX` of the calibration inputs, by the name of the value a weight multiplies.
    pub grams: Option<Arc<HashMap<String, Gram>>>,
    /// Where the calibration inputs came from, for the report.
    pub calibration: Option<String>,
}

impl VqOptions {
    /// The settings for a budget of `bits` per weight (indices only; the codebook adds a little):
    /// 256 centroids (uint8 indices) and the shortest vector with `8/v ≤ bits`.
    pub fn for_bits(bits: f64) -> std::result::Result<Self, String> {
        if !(bits.is_finite() && (1.0..=8.0).contains(&bits)) {
            return Err(format!(
                "--vq-bits {bits}: give a number of bits from 1 to 8"
            ));
        }
        let vector = (8.0 / bits).ceil() as usize;
        Ok(VqOptions {
            vector,
            ..VqOptions::default()
        })
    }
}

impl VqOptions {
    /// What the pass looks at: MatMul/Gemm weights (no tables yet).
    fn select(&self) -> Select {
        Select {
            min_elements: self.min_elements,
            tables: false,
            row_multiple: 1,
        }
    }
}

impl Default for VqOptions {
    fn default() -> Self {
        VqOptions {
            vector: 4,
            centroids: 256,
            min_elements: 4096,
            iters: 25,
            seed: 0,
            sample: 1 << 16,
            damp: 0.01,
            grams: None,
            calibration: None,
        }
    }
}

pub struct WeightVq {
    pub opts: VqOptions,
}

/// One quantized weight, for the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VqLayer {
    pub weight: String,
    pub nodes: Vec<String>,
    pub k: usize,
    pub n: usize,
    pub vector: usize,
    pub centroids: usize,
    pub bytes_before: u64,
    /// Indices and codebook.
    pub bytes_after: u64,
    pub bits_per_weight: f64,
    /// `‖W − Ŵ‖_F / ‖W‖_F`.
    pub rel_error: f64,
    /// With calibration: `‖(W − Ŵ)X‖ / ‖WX‖` on it, with error feedback (what was written)…
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_rel_error: Option<f64>,
    /// …and with the same codebook, each vector simply mapped to its nearest centroid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_rel_error_nearest: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VqReport {
    /// `k-means` or `hessian-weighted k-means + gptq`.
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<String>,
    pub layers: Vec<VqLayer>,
    #[serde(flatten)]
    pub totals: Totals,
    pub skipped: Vec<String>,
}

/// A weight's codebook and indices.
struct Coded {
    k: usize,
    n: usize,
    /// `[k, v]`.
    codebook: Vec<f32>,
    /// `[K, N/v]`.
    idx: Vec<u32>,
    rel_error: f64,
    output_rel_error: Option<f64>,
    output_rel_error_nearest: Option<f64>,
}

impl WeightVq {
    /// The pass's name in reports and `wcc.passes`.
    pub const NAME: &'static str = "weight-vq";
}

impl Pass for WeightVq {
    fn name(&self) -> &'static str {
        Self::NAME
    }
    fn description(&self) -> &'static str {
        "vector quantization of MatMul/Gemm weights with a learned codebook per layer (VPTQ)"
    }
    fn lossless(&self) -> bool {
        false
    }
    fn run_once(&self) -> bool {
        true
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        let o = &self.opts;
        if o.vector == 0 || o.centroids == 0 || o.centroids > 1 << 16 {
            return Err(wcc_ir::IrError::Other(format!(
                "vq: vector length {} and {} centroids (1 to 65536) do not make a codebook",
                o.vector, o.centroids
            )));
        }
        let opset = model.default_opset();
        let g = &mut model.graph;
        let (sites, mut skipped) = find_sites(g, opset, &o.select());
        let mut weights: Vec<(String, Vec<Site>)> = vec![];
        for (w, s) in sites {
            let t = g
                .initializer(&w)
                .expect("a site's weight is an initializer");
            let (_, n) = k_n(t, s[0].layout);
            if !n.is_multiple_of(o.vector) {
                skipped.push(format!(
                    "{w}: {n} outputs, not a multiple of the vector length {}",
                    o.vector
                ));
            } else {
                weights.push((w, s));
            }
        }
        let group = 2 * rayon::current_num_threads().max(1);
        let mut layers = vec![];
        let mut changes = 0;
        for chunk in weights.chunks(group) {
            let coded: Vec<Result<Option<Coded>>> = chunk
                .par_iter()
                .map(|(name, s)| {
                    let t = g.initializer(name).expect("found as a constant");
                    let gram = o.grams.as_ref().and_then(|h| gram_of(g, s, h));
                    code(t, s[0].layout, gram.as_ref(), o)
                })
                .collect();
            for ((name, s), c) in chunk.iter().zip(coded) {
                match c? {
                    Some(c) => {
                        changes += s.len();
                        layers.push(emit(g, name, s, c, o)?);
                    }
                    None => skipped.push(format!("{name}: not finite")),
                }
            }
        }
        wcc_ir::validate::topo_sort(g);
        let report = VqReport {
            mode: if o.grams.is_some() {
                "hessian-weighted k-means + gptq"
            } else {
                "k-means"
            },
            calibration: o.calibration.clone(),
            totals: Totals::of(
                layers
                    .iter()
                    .map(|l| ((l.k * l.n) as u64, l.bytes_before, l.bytes_after)),
            ),
            layers,
            skipped,
        };
        let mut out = PassOutcome::changed(changes);
        if !report.layers.is_empty() {
            let line = format!(
                "{} (v {}, k {}, {})",
                report.totals.summary(report.layers.len()),
                o.vector,
                o.centroids,
                report.mode
            );
            model.set_metadata(
                "wcc.vq",
                &format!(
                    "{line}; decoded by Cast -> Gather(codebook) -> Reshape: ONNX Runtime folds \
                     that into a dense weight at session start unless constant folding is off \
                     (Python: InferenceSession(path, disabled_optimizers=['ConstantFolding']))"
                ),
            );
            out.notes.push(line);
        }
        out.details = Some(serde_json::to_value(&report).expect("serializable"));
        Ok(out)
    }
}

/// The values the weights `--vq-bits` would quantize multiply: what calibration must expose.
pub fn calibration_inputs(model: &Model, opts: &VqOptions) -> Vec<String> {
    let (sites, _) = find_sites(&model.graph, model.default_opset(), &opts.select());
    crate::linear_weights::calibration_inputs(&model.graph, &sites)
}

/// The vectors of `w` (`[N, K]`): for input column q, vector j is `w[j·v + t, q]`; in the
/// order (q, j).
fn vectors(w: &[f32], n: usize, k: usize, v: usize) -> Vec<f32> {
    let per = n / v;
    let mut out = Vec::with_capacity(n * k);
    for q in 0..k {
        for j in 0..per {
            for t in 0..v {
                out.push(w[(j * v + t) * k + q]);
            }
        }
    }
    out
}

/// `Ŵ` `[N, K]` from a codebook and indices `[K, N/v]`.
fn decode(codebook: &[f32], idx: &[u32], n: usize, k: usize, v: usize) -> Vec<f32> {
    let per = n / v;
    let mut w = vec![0f32; n * k];
    for q in 0..k {
        for j in 0..per {
            let c = idx[q * per + j] as usize;
            for t in 0..v {
                w[(j * v + t) * k + q] = codebook[c * v + t];
            }
        }
    }
    w
}

/// Fits the codebook of `t` and codes it; `None` when `t` is not finite.
fn code(t: &Tensor, layout: Layout, gram: Option<&Gram>, o: &VqOptions) -> Result<Option<Coded>> {
    let Some(w0) = read_nk(t, layout)? else {
        return Ok(None);
    };
    let (k, n) = k_n(t, layout);
    let v = o.vector;
    let gram = gram.filter(|h| h.k == k);
    let points = vectors(&w0, n, k, v);
    let per = n / v;
    let weights: Option<Vec<f32>> = gram.map(|h| column_weights(h, k, per));
    let fit = KMeans {
        k: o.centroids,
        dim: v,
        iters: o.iters,
        tol: 1e-4,
        seed: o.seed,
        sample: o.sample,
    }
    .fit(&points, weights.as_deref());
    let codebook = fit.centroids;
    let nearest = kmeans::assign(&points, &codebook, v);
    let (idx, w_hat, out_err, out_err_nearest) = match gram {
        Some(h) => {
            let plain = decode(&codebook, &nearest, n, k, v);
            let mut w = w0.clone();
            let mut r = VqRounding {
                codebook: &codebook,
                v,
                idx: vec![0; k * per],
            };
            gptq::quantize(&mut w, n, h, o.damp, &mut r).map_err(wcc_ir::IrError::Other)?;
            let idx = r.idx;
            let w_hat = decode(&codebook, &idx, n, k, v);
            let error = h.output_error(&w0);
            let (e, e0) = (error(&w_hat), error(&plain));
            (idx, w_hat, Some(e), Some(e0))
        }
        None => {
            let w_hat = decode(&codebook, &nearest, n, k, v);
            (nearest, w_hat, None, None)
        }
    };
    Ok(Some(Coded {
        k,
        n,
        rel_error: rel_error(&w0, &w_hat),
        codebook,
        idx,
        output_rel_error: out_err,
        output_rel_error_nearest: out_err_nearest,
    }))
}

/// Each vector's k-means weight: the Hessian diagonal `H_qq` of its input column, capped at
/// `WEIGHT_CAP` times the median over the columns. A few input features of a transformer's
/// activations are orders of magnitude larger than the rest; uncapped, their columns take
/// nearly every centroid and the codebook fails every other column (on MiniLM's MLP down
/// projections, an output error of 0.9 on the calibration data itself).
fn column_weights(h: &Gram, k: usize, per: usize) -> Vec<f32> {
    let mut d: Vec<f64> = (0..k).map(|q| h.h[q * k + q]).collect();
    let mut sorted = d.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[k / 2];
    if median > 0.0 {
        d.iter_mut().for_each(|x| *x = x.min(WEIGHT_CAP * median));
    }
    (0..k * per).map(|p| d[p / per] as f32).collect()
}

/// See `column_weights`.
const WEIGHT_CAP: f64 = 10.0;

/// The nearest centroid as GPTQ's rounding rule: column i's vectors (`col[j·v + t]`).
struct VqRounding<'a> {
    codebook: &'a [f32],
    v: usize,
    /// `[K, N/v]`.
    idx: Vec<u32>,
}

impl ColumnRounding for VqRounding<'_> {
    fn group_size(&self) -> usize {
        1
    }
    fn start_group(&mut self, _: usize, _: &[f32]) {}
    fn round(&mut self, i: usize, col: &mut [f64]) {
        let v = self.v;
        let per = col.len() / v;
        let mut x = vec![0f32; v];
        for j in 0..per {
            for t in 0..v {
                x[t] = col[j * v + t] as f32;
            }
            let (c, _) = kmeans::nearest(&x, self.codebook, v);
            self.idx[i * per + j] = c as u32;
            for t in 0..v {
                col[j * v + t] = self.codebook[c * v + t] as f64;
            }
        }
    }
}

/// Adds the codebook and indices of `name` and the nodes that decode it; the nodes at `sites`
/// read the decoded weight.
fn emit(g: &mut Graph, name: &str, sites: &[Site], c: Coded, o: &VqOptions) -> Result<VqLayer> {
    let t = g.initializer(name).expect("found as a constant");
    let dtype = t.dtype()?;
    let bytes_before = t.byte_size();
    let (k, n, v) = (c.k, c.n, o.vector);
    let per = n / v;
    let (idx_type, idx_bytes): (DataType, Vec<u8>) = if o.centroids <= 256 {
        (DataType::U8, c.idx.iter().map(|i| *i as u8).collect())
    } else {
        (
            DataType::U16,
            c.idx
                .iter()
                .flat_map(|i| (*i as u16).to_le_bytes())
                .collect(),
        )
    };
    let book_bytes = float_bytes(&c.codebook, dtype);
    let bytes_after = (idx_bytes.len() + book_bytes.len()) as u64;
    let idx_name = fresh_name(g, &format!("{name}_vq_idx"));
    g.initializers.push(Tensor::from_raw(
        &idx_name,
        idx_type,
        &[k as i64, per as i64],
        idx_bytes,
    )?);
    let book_name = fresh_name(g, &format!("{name}_vq_codebook"));
    g.initializers.push(Tensor::from_raw(
        &book_name,
        dtype,
        &[o.centroids as i64, v as i64],
        book_bytes,
    )?);
    let shape_name = fresh_name(g, &format!("{name}_vq_shape"));
    let shape: Vec<u8> = [k as i64, n as i64]
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    g.initializers
        .push(Tensor::from_raw(&shape_name, DataType::I64, &[2], shape)?);
    let i32_name = fresh_name(g, &format!("{name}_vq_idx32"));
    let mut cast = Node::new(&i32_name, "Cast", vec![idx_name], vec![i32_name.clone()]);
    cast.attributes = vec![Attribute::int("to", DataType::I32.code() as i64)];
    let gathered = fresh_name(g, &format!("{name}_vq_vectors"));
    let gather = Node::new(
        &gathered,
        "Gather",
        vec![book_name, i32_name],
        vec![gathered.clone()],
    );
    let decoded = fresh_name(g, &format!("{name}_vq"));
    let reshape = Node::new(
        &decoded,
        "Reshape",
        vec![gathered, shape_name],
        vec![decoded.clone()],
    );
    let mut nodes = vec![];
    for s in sites {
        let node = &mut g.nodes[s.node];
        node.inputs[1] = decoded.clone();
        if s.layout == Layout::NK {
            // The decoded weight is [K, N].
            node.attributes.retain(|a| a.name() != "transB");
        }
        nodes.push(node.name.clone());
    }
    g.nodes.extend([cast, gather, reshape]);
    Ok(VqLayer {
        weight: name.to_string(),
        nodes,
        k,
        n,
        vector: v,
        centroids: o.centroids,
        bytes_before,
        bytes_after,
        bits_per_weight: 8.0 * bytes_after as f64 / (k * n) as f64,
        rel_error: c.rel_error,
        output_rel_error: c.output_rel_error,
        output_rel_error_nearest: c.output_rel_error_nearest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_and_decode_are_inverse_along_the_outputs() {
        let (n, k, v) = (6, 4, 3);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let pts = vectors(&w, n, k, v);
        // Column 1's first vector is W[0..3, 1].
        assert_eq!(&pts[2 * v..3 * v], &[1.0, 5.0, 9.0]);
        // Each vector its own centroid decodes back to W.
        let idx: Vec<u32> = (0..(k * n / v) as u32).collect();
        assert_eq!(decode(&pts, &idx, n, k, v), w);
    }

    #[test]
    fn budgets_pick_the_vector_length() {
        assert_eq!(VqOptions::for_bits(2.0).unwrap().vector, 4);
        assert_eq!(VqOptions::for_bits(3.0).unwrap().vector, 3);
        assert_eq!(VqOptions::for_bits(4.0).unwrap().vector, 2);
        assert!(VqOptions::for_bits(0.5).is_err() && VqOptions::for_bits(f64::NAN).is_err());
    }
}
