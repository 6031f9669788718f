//! The weights of linear layers that the weight passes (int4, VQ) replace: which MatMul, Gemm
//! and Gather nodes read a constant 2-D weight, how (`[K, N]` or `[N, K]`), reading it as
//! `[N, K]`, and the calibration statistics of what multiplies it. One place for what those
//! passes may touch.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use wcc_ir::infer::infer_graph;
use wcc_ir::{DataType, Graph, Result, Tensor};

use crate::gptq::Gram;

/// Weights by name, each with the nodes that read it.
pub(crate) type Sites = BTreeMap<String, Vec<Site>>;

/// Which weights a weight pass (`weight_int`, `weight_vq`) takes: the options both share.
#[derive(Debug, Clone)]
pub struct Scope {
    /// Also the tables axis-0 Gathers read (embeddings).
    pub tables: bool,
    /// Weights with fewer elements are left in float (biases, tiny projections).
    pub min_elements: u64,
    /// The user's include/exclude patterns (`--quant-include`, `--quant-exclude`).
    pub names: NameFilter,
    /// Only these weights (by initializer name), when given: how a planner quantizes weight by
    /// weight. The others are left as they are, unreported.
    pub only: Option<std::sync::Arc<std::collections::BTreeSet<String>>>,
}

impl Default for Scope {
    fn default() -> Self {
        Scope {
            tables: false,
            min_elements: 4096,
            names: NameFilter::default(),
            only: None,
        }
    }
}

/// The calibration statistics a weight pass fits with and reports by: the options both share.
#[derive(Debug, Clone)]
pub struct Statistics {
    /// `H = XᵀX` of the calibration inputs, by the name of the value a weight multiplies (see
    /// `calibration_inputs`).
    pub grams: Option<std::sync::Arc<HashMap<String, Gram>>>,
    /// Instead of `grams`: statistics gathered a group of weights at a time as the pass goes
    /// (bounded memory; see [`GramSource`]).
    pub gram_source: Option<GramSource>,
    /// `H = XᵀX` of calibration inputs the fit does not use: each layer's output error on them
    /// is reported too (what `-O compress`'s planner judges by).
    pub heldout_grams: Option<std::sync::Arc<HashMap<String, Gram>>>,
    /// Where the calibration inputs came from, for the report.
    pub calibration: Option<String>,
    /// GPTQ's damping (a fraction of the Hessian's mean diagonal).
    pub damp: f64,
}

impl Default for Statistics {
    fn default() -> Self {
        Statistics {
            grams: None,
            gram_source: None,
            heldout_grams: None,
            calibration: None,
            damp: crate::gptq::DEFAULT_DAMP,
        }
    }
}

impl Statistics {
    /// Whether the fit has calibration statistics (given, or gathered as it goes).
    pub(crate) fn calibrated(&self) -> bool {
        self.grams.is_some() || self.gram_source.is_some()
    }
}

/// What a [`GramSource`] computes: `H = XᵀX` of the values named, on the model as it is.
pub type GramFn = dyn Fn(&wcc_ir::Model, &[String]) -> std::result::Result<HashMap<String, Gram>, String>
    + Send
    + Sync;

/// Calibration statistics gathered a group of weights at a time, as a weight pass goes, instead
/// of all at once beforehand: what is held is a group's `H` (`K²` values per input), not the
/// model's. The weights are grouped, in order, so that a group's statistics take at most `cap`
/// bytes (one weight at least); each group's are computed on the model as the pass has left it,
/// earlier groups quantized (as GPTQ calibrates layer after layer).
#[derive(Clone)]
pub struct GramSource {
    get: std::sync::Arc<GramFn>,
    cap: u64,
}

impl GramSource {
    pub fn new(
        cap: u64,
        get: impl Fn(&wcc_ir::Model, &[String]) -> std::result::Result<HashMap<String, Gram>, String>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        GramSource {
            get: std::sync::Arc::new(get),
            cap,
        }
    }
}

impl std::fmt::Debug for GramSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GramSource(cap {} bytes)", self.cap)
    }
}

/// The inputs a weight's sites multiply and their widths `K` (a table's Gathers: none).
fn input_widths(g: &Graph, w: &str, sites: &[Site]) -> Vec<(String, usize)> {
    let Some(t) = g.initializer(w) else {
        return vec![];
    };
    let mut out: Vec<(String, usize)> = sites
        .iter()
        .filter(|s| s.layout != Layout::Rows)
        .map(|s| (g.nodes[s.node].inputs[0].clone(), k_n(t, s.layout).0))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What both weight passes' reports say of where their weights and statistics came from
/// (flattened into each report).
#[derive(Debug, Clone, Serialize)]
pub struct Sources {
    /// Where the calibration inputs came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<String>,
    /// The user's name patterns, when given (`--quant-include`, `--quant-exclude`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub names: Option<String>,
    /// How the calibration statistics were gathered, when group by group (`gram_source`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statistics: Option<String>,
}

impl Sources {
    pub(crate) fn of(stats: &Statistics, scope: &Scope, walk: &Walk) -> Self {
        Sources {
            calibration: stats.calibration.clone(),
            names: scope.names.describe(),
            statistics: walk.describe(),
        }
    }
}

/// The most values of weights coded at once (see `Walk::chunks`): 2²⁵, a 4096 × 8192 layer.
const CHUNK_VALUES: u64 = 1 << 25;

/// How a weight pass walks its weights (`weights`: name and sites, in order): groups of
/// `size`, each with the statistics it uses: `grams` as given, or with a `source` groups whose
/// statistics fit its cap, computed as the walk reaches them.
pub(crate) struct Walk<'a> {
    groups: Vec<std::ops::Range<usize>>,
    /// Each weight's values, for `chunks`.
    sizes: Vec<u64>,
    size: usize,
    grams: Option<std::sync::Arc<HashMap<String, Gram>>>,
    source: Option<&'a GramSource>,
    /// Groups computed by the source, and the most bytes of statistics held at once.
    pub computed: usize,
    pub most_bytes: u64,
}

impl<'a> Walk<'a> {
    pub(crate) fn new(
        g: &Graph,
        weights: &[(&str, &[Site])],
        size: usize,
        stats: &'a Statistics,
    ) -> Self {
        let (grams, source) = (stats.grams.as_ref(), stats.gram_source.as_ref());
        let mut groups = vec![];
        match source {
            None => {
                let mut at = 0;
                while at < weights.len() {
                    let end = (at + size.max(1)).min(weights.len());
                    groups.push(at..end);
                    at = end;
                }
            }
            Some(src) => {
                let (mut start, mut bytes) = (0, 0u64);
                let mut seen = std::collections::BTreeSet::new();
                let gram_bytes = |x: &[(String, usize)]| -> u64 {
                    x.iter().map(|(_, k)| (k * k * 8) as u64).sum()
                };
                for (i, (w, s)) in weights.iter().enumerate() {
                    let inputs = input_widths(g, w, s);
                    // What it adds: the statistics of inputs the group does not have yet (a
                    // weight that shares its input with the group's adds nothing).
                    let new: Vec<(String, usize)> = inputs
                        .iter()
                        .filter(|(x, _)| !seen.contains(x))
                        .cloned()
                        .collect();
                    let add = gram_bytes(&new);
                    if i > start && add > 0 && bytes + add > src.cap {
                        groups.push(start..i);
                        (start, bytes) = (i, 0);
                        seen.clear();
                    }
                    bytes += gram_bytes(
                        &inputs
                            .iter()
                            .filter(|(x, _)| !seen.contains(x))
                            .cloned()
                            .collect::<Vec<_>>(),
                    );
                    seen.extend(inputs.into_iter().map(|(x, _)| x));
                }
                if start < weights.len() {
                    groups.push(start..weights.len());
                }
            }
        }
        Walk {
            groups,
            sizes: weights
                .iter()
                .map(|(w, _)| g.initializer(w).map_or(0, |t| t.numel()))
                .collect(),
            size,
            grams: grams.cloned(),
            source,
            computed: 0,
            most_bytes: 0,
        }
    }

    /// The groups, in order.
    pub(crate) fn groups(&self) -> Vec<std::ops::Range<usize>> {
        self.groups.clone()
    }

    /// `group` cut into the runs of weights worked on at once (in parallel): at most `size`
    /// weights and `CHUNK_VALUES` values (one weight at least), so that the float copies a
    /// weight's coding holds (a few of its size) stay bounded by the largest weight, not by
    /// `size` of them.
    pub(crate) fn chunks(&self, group: std::ops::Range<usize>) -> Vec<std::ops::Range<usize>> {
        let mut out = vec![];
        let (mut start, mut values) = (group.start, 0u64);
        for i in group.clone() {
            let n = self.sizes[i];
            if i > start && (i - start >= self.size || values + n > CHUNK_VALUES) {
                out.push(start..i);
                (start, values) = (i, 0);
            }
            values += n;
        }
        if start < group.end {
            out.push(start..group.end);
        }
        out
    }

    /// The statistics for `group` of `weights`: those given, or the source's for its inputs, on
    /// `model` as it is now.
    pub(crate) fn grams(
        &mut self,
        model: &wcc_ir::Model,
        weights: &[(&str, &[Site])],
        group: std::ops::Range<usize>,
    ) -> Result<Option<std::sync::Arc<HashMap<String, Gram>>>> {
        let Some(src) = self.source else {
            return Ok(self.grams.clone());
        };
        let mut names: Vec<String> = weights[group]
            .iter()
            .flat_map(|(w, s)| input_widths(&model.graph, w, s))
            .map(|(x, _)| x)
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Ok(None);
        }
        let grams = (src.get)(model, &names).map_err(wcc_ir::IrError::Other)?;
        let bytes: u64 = grams.values().map(|h| (h.h.len() * 8) as u64).sum();
        self.computed += 1;
        self.most_bytes = self.most_bytes.max(bytes);
        Ok(Some(std::sync::Arc::new(grams)))
    }

    /// For the report: how the statistics were gathered, when a source gathered them.
    pub(crate) fn describe(&self) -> Option<String> {
        self.source.map(|_| {
            format!(
                "gathered in {} groups of weights, at most {:.1} MB of statistics at once",
                self.computed,
                self.most_bytes as f64 / 1e6
            )
        })
    }
}

/// Called by a weight pass as it finishes weights: (done, of). For a progress bar.
#[derive(Clone, Default)]
pub struct LayerProgress(Option<std::sync::Arc<dyn Fn(usize, usize) + Send + Sync>>);

impl LayerProgress {
    pub fn new(f: impl Fn(usize, usize) + Send + Sync + 'static) -> Self {
        LayerProgress(Some(std::sync::Arc::new(f)))
    }

    pub(crate) fn tick(&self, done: usize, of: usize) {
        if let Some(f) = &self.0 {
            f(done, of);
        }
    }
}

impl std::fmt::Debug for LayerProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "LayerProgress(on)"
        } else {
            "LayerProgress(off)"
        })
    }
}

/// Which weights the user lets the weight passes touch (`--quant-include`, `--quant-exclude`):
/// glob patterns (`*` any run of characters, `/` and `.` included; `?` one; `[ab]` a class)
/// matched against a weight's initializer name and the names of the nodes that read it. A weight
/// is taken when some name matches an include pattern (or none is given) and none matches an
/// exclude pattern.
#[derive(Debug, Clone, Default)]
pub struct NameFilter {
    include: Vec<String>,
    exclude: Vec<String>,
    sets: Option<(globset::GlobSet, globset::GlobSet)>,
}

impl NameFilter {
    /// The filter of these patterns; an error names a pattern that is not a glob.
    pub fn new(include: &[String], exclude: &[String]) -> std::result::Result<Self, String> {
        if include.is_empty() && exclude.is_empty() {
            return Ok(Self::default());
        }
        let set = |pats: &[String]| {
            let mut b = globset::GlobSetBuilder::new();
            for p in pats {
                b.add(globset::Glob::new(p).map_err(|e| format!("pattern '{p}': {e}"))?);
            }
            b.build().map_err(|e| e.to_string())
        };
        Ok(NameFilter {
            include: include.to_vec(),
            exclude: exclude.to_vec(),
            sets: Some((set(include)?, set(exclude)?)),
        })
    }

    /// `p` when it is a glob pattern, else why not (for a command line's parser).
    pub fn pattern(p: &str) -> std::result::Result<String, String> {
        globset::Glob::new(p)
            .map(|_| p.to_string())
            .map_err(|e| format!("'{p}' is not a glob pattern: {e}"))
    }

    /// Whether the weight known by `names` is taken, and which include patterns matched it.
    fn admits<'a>(&self, names: impl Iterator<Item = &'a str> + Clone) -> (bool, Vec<usize>) {
        let Some((inc, exc)) = &self.sets else {
            return (true, vec![]);
        };
        let mut hits: Vec<usize> = names.clone().flat_map(|n| inc.matches(n)).collect();
        hits.sort_unstable();
        hits.dedup();
        let excluded = names.into_iter().any(|n| exc.is_match(n));
        (
            (self.include.is_empty() || !hits.is_empty()) && !excluded,
            hits,
        )
    }

    /// The patterns, for a report: `include a, b; exclude c`.
    pub fn describe(&self) -> Option<String> {
        let mut parts = vec![];
        if !self.include.is_empty() {
            parts.push(format!("include {}", self.include.join(", ")));
        }
        if !self.exclude.is_empty() {
            parts.push(format!("exclude {}", self.exclude.join(", ")));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// How a node reads its weight.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Layout {
    /// `W[K, N]` (MatMul, Gemm with transB = 0).
    KN,
    /// `W[N, K]` (Gemm with transB = 1).
    NK,
    /// `E[V, D]` gathered by row (Gather on axis 0): quantized as `[N = V, K = D]`.
    Rows,
}

pub(crate) struct Site {
    pub node: usize,
    pub layout: Layout,
}

/// The MatMul/Gemm (and, with `sel.tables`, Gather) nodes whose constant weight a pass may
/// replace, by weight name (sorted, so the order is the same every run), and the weights looked
/// at and left alone with why: a 2-D f32/f16 constant of at least `sel.min_elements`, read by a
/// MatMul, a Gemm with alpha = beta = 1 and transA = 0 whose input has a known rank of 2 or
/// more, or an axis-0 Gather whose rows are a multiple of `row_multiple`; a weight read
/// both as `[K, N]` and as `[N, K]` is left alone.
pub(crate) fn find_sites(
    g: &Graph,
    opset: i64,
    sel: &Scope,
    row_multiple: usize,
) -> (Sites, Vec<String>) {
    let types = infer_graph(g, opset, None);
    let consts = g.constants();
    let mut sites = Sites::new();
    let mut skipped = vec![];
    let mut conflicting = std::collections::BTreeSet::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let layout = if n.is("MatMul") {
            Layout::KN
        } else if n.is("Gather") && sel.tables && matches!(n.attr_i("axis").unwrap_or(0), 0 | -2) {
            Layout::Rows
        } else if n.is("Gemm")
            && n.attr_f("alpha").unwrap_or(1.0) == 1.0
            && n.attr_f("beta").unwrap_or(1.0) == 1.0
            && n.attr_i("transA").unwrap_or(0) == 0
        {
            if n.attr_i("transB").unwrap_or(0) == 1 {
                Layout::NK
            } else {
                Layout::KN
            }
        } else {
            continue;
        };
        let (w, x) = match layout {
            Layout::Rows => (&n.inputs[0], &n.inputs[1]),
            _ => (&n.inputs[1], &n.inputs[0]),
        };
        if !consts.contains(w) || sel.only.as_ref().is_some_and(|o| !o.contains(w)) {
            continue;
        }
        let t = g.initializer(w).expect("a constant is an initializer");
        let dtype = t.dtype().ok();
        if !matches!(dtype, Some(DataType::F32 | DataType::F16)) || t.dims().len() != 2 {
            continue;
        }
        if t.numel() == 0 || t.numel() < sel.min_elements {
            continue;
        }
        if layout == Layout::Rows {
            if t.dims()[1] % row_multiple.max(1) as i64 != 0 {
                skipped.push(format!(
                    "{w}: rows of {} values, not a multiple of {}",
                    t.dims()[1],
                    row_multiple
                ));
                continue;
            }
        } else if types.shape(x).is_none_or(|s| s.len() < 2) || types.dtype(x) != dtype {
            skipped.push(format!(
                "{w}: the input of {} has no known rank of 2 or more",
                n.name
            ));
            continue;
        }
        let at = sites.entry(w.clone()).or_default();
        if at.first().is_some_and(|s| s.layout != layout) {
            conflicting.insert(w.clone());
        }
        at.push(Site { node: i, layout });
    }
    for w in conflicting {
        sites.remove(&w);
        skipped.push(format!("{w}: read both as [K, N] and as [N, K]"));
    }
    // The user's patterns; an include pattern no candidate matched is said.
    let mut matched = std::collections::BTreeSet::new();
    sites.retain(|w, at| {
        let names =
            std::iter::once(w.as_str()).chain(at.iter().map(|s| g.nodes[s.node].name.as_str()));
        let (keep, hits) = sel.names.admits(names);
        matched.extend(hits);
        keep
    });
    for (i, p) in sel.names.include.iter().enumerate() {
        // (With `only`, a planner's subset, the others are not looked at.)
        if !matched.contains(&i) && sel.only.is_none() {
            skipped.push(format!(
                "--quant-include '{p}' matches no weight this pass could take"
            ));
        }
    }
    (sites, skipped)
}

/// (K, N) of a weight read with `layout`.
pub(crate) fn k_n(t: &Tensor, layout: Layout) -> (usize, usize) {
    let (d0, d1) = (t.dims()[0] as usize, t.dims()[1] as usize);
    match layout {
        Layout::KN => (d0, d1),
        Layout::NK | Layout::Rows => (d1, d0),
    }
}

/// The weight as `[N, K]` f32 (one row per output), whole; `None` when it is not finite. Read
/// in chunks straight into place (external data with positioned reads, not through the mmap):
/// what is held is the f32 weight, not also its bytes or an untransposed copy.
pub(crate) fn read_nk(t: &Tensor, layout: Layout) -> Result<Option<Vec<f32>>> {
    let dtype = t.dtype()?;
    let (d0, d1) = (t.dims()[0] as usize, t.dims()[1] as usize);
    let mut out = vec![0f32; d0 * d1];
    let (mut at, mut finite) = (0usize, true);
    t.for_each_chunk(&mut |bytes| {
        // Chunks hold whole elements (4 MiB at a time); a count short of the whole is an error.
        for x in to_f32(bytes, dtype) {
            finite &= x.is_finite();
            let i = match layout {
                // Element (r, c) of [K, N] is (c, r) of [N, K].
                Layout::KN => (at % d1) * d0 + at / d1,
                Layout::NK | Layout::Rows => at,
            };
            if let Some(o) = out.get_mut(i) {
                *o = x;
            }
            at += 1;
        }
        Ok(())
    })?;
    if at != d0 * d1 {
        return Err(wcc_ir::IrError::tensor(
            t.name(),
            format!("read {at} values of {}", d0 * d1),
        ));
    }
    Ok(finite.then_some(out))
}

/// The calibration Gram of the value `sites` multiply (summed over distinct ones, for a weight
/// several nodes read); `None` for a table, or when one has none.
pub(crate) fn gram_of(g: &Graph, sites: &[Site], grams: &HashMap<String, Gram>) -> Option<Gram> {
    let mut xs: Vec<&str> = vec![];
    for s in sites {
        if s.layout == Layout::Rows {
            return None;
        }
        let x = g.nodes[s.node].inputs[0].as_str();
        if !xs.contains(&x) {
            xs.push(x);
        }
    }
    let mut sum: Option<Gram> = None;
    for x in xs {
        let h = grams.get(x)?;
        match &mut sum {
            None => sum = Some(h.clone()),
            Some(acc) if acc.k == h.k => {
                acc.h.iter_mut().zip(&h.h).for_each(|(a, b)| *a += b);
                acc.rows += h.rows;
            }
            Some(_) => return None,
        }
    }
    sum
}

/// The values the nodes at `sites` multiply by their weights (not tables): what calibration
/// must expose for their statistics.
pub(crate) fn calibration_inputs(g: &Graph, sites: &Sites) -> Vec<String> {
    let mut names: Vec<String> = sites
        .values()
        .flatten()
        .filter(|s| s.layout != Layout::Rows)
        .map(|s| g.nodes[s.node].inputs[0].clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

pub(crate) fn to_f32(bytes: &[u8], dtype: DataType) -> Vec<f32> {
    match dtype {
        DataType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// `v` as little-endian bytes of `dtype` (f16 or f32).
pub(crate) fn float_bytes(scales: &[f32], dtype: DataType) -> Vec<u8> {
    match dtype {
        DataType::F16 => scales
            .iter()
            .flat_map(|s| half::f16::from_f32(*s).to_le_bytes())
            .collect(),
        _ => scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
    }
}

/// The layer's output error `‖(W − Ŵ)X‖ / ‖WX‖` (`w0`, `w_hat` `[N, K]`) on the calibration
/// inputs `X` of `held`, those the fit did not see, when given.
pub(crate) fn heldout_error(w0: &[f32], w_hat: &[f32], held: Option<&Gram>) -> Option<f64> {
    let k = held?.k;
    (w0.len() == w_hat.len() && w0.len().is_multiple_of(k.max(1)))
        .then(|| held.expect("checked").output_error(w0)(w_hat))
}

/// `‖W − Ŵ‖_F / ‖W‖_F` (0 for an all-zero `W`).
pub(crate) fn rel_error(w0: &[f32], w_hat: &[f32]) -> f64 {
    let (err, norm) = w0.iter().zip(w_hat).fold((0f64, 0f64), |(e, s), (a, b)| {
        (e + ((a - b) as f64).powi(2), s + (*a as f64).powi(2))
    });
    if norm > 0.0 {
        (err / norm).sqrt()
    } else {
        0.0
    }
}

/// What a weight pass did to one weight, as its report's line gives it (flattened into the
/// pass's own line, beside what only that pass has).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Figures {
    pub weight: String,
    /// The nodes that read it.
    pub nodes: Vec<String>,
    pub k: usize,
    pub n: usize,
    /// Bytes of the float weight.
    pub bytes_before: u64,
    /// Bytes of what replaces it, as the file holds them.
    pub bytes_after: u64,
    /// `8 · bytes_after / (K·N)`.
    pub bits_per_weight: f64,
    /// `‖W − Ŵ‖_F / ‖W‖_F`.
    pub rel_error: f64,
    /// With calibration inputs: the layer's output error on them, `‖(W − Ŵ)X‖ / ‖WX‖` (what was
    /// written)…
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_rel_error: Option<f64>,
    /// …and on held-out calibration inputs (`heldout_grams`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_output_rel_error: Option<f64>,
}

impl Figures {
    /// The line for `weight` (`(K, N)`), replaced by `bytes_after` bytes; errors as above.
    pub(crate) fn new(
        weight: &str,
        nodes: Vec<String>,
        (k, n): (usize, usize),
        (bytes_before, bytes_after): (u64, u64),
        rel_error: f64,
        (output_rel_error, heldout_output_rel_error): (Option<f64>, Option<f64>),
    ) -> Self {
        Figures {
            weight: weight.to_string(),
            nodes,
            k,
            n,
            bytes_before,
            bytes_after,
            bits_per_weight: 8.0 * bytes_after as f64 / (k * n) as f64,
            rel_error,
            output_rel_error,
            heldout_output_rel_error,
        }
    }
}

/// A weight pass's totals over the weights it replaced, for its report (flattened into it).
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    /// Values replaced.
    pub weights: u64,
    pub bytes_before: u64,
    /// What replaces them (codes, scales, codebooks), as the file holds it.
    pub bytes_after: u64,
    /// `8 · bytes_after / weights`.
    pub bits_per_weight: f64,
}

impl Totals {
    /// Over every replaced weight's figures.
    pub(crate) fn of<'a>(layers: impl Iterator<Item = &'a Figures>) -> Self {
        let (mut weights, mut bytes_before, mut bytes_after) = (0, 0, 0);
        for f in layers {
            weights += (f.k * f.n) as u64;
            bytes_before += f.bytes_before;
            bytes_after += f.bytes_after;
        }
        Totals {
            weights,
            bytes_before,
            bytes_after,
            bits_per_weight: if weights == 0 {
                0.0
            } else {
                8.0 * bytes_after as f64 / weights as f64
            },
        }
    }

    /// "N weight(s), V values: X MB -> Y MB, B bits per weight".
    pub(crate) fn summary(&self, layers: usize) -> String {
        format!(
            "{layers} weight(s), {} values: {:.2} MB -> {:.2} MB, {:.2} bits per weight",
            self.weights,
            self.bytes_before as f64 / 1e6,
            self.bytes_after as f64 / 1e6,
            self.bits_per_weight
        )
    }
}

#[cfg(test)]
mod tests {
    use super::NameFilter;

    fn f(inc: &[&str], exc: &[&str]) -> NameFilter {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        NameFilter::new(&v(inc), &v(exc)).unwrap()
    }

    #[test]
    fn patterns_match_the_weight_or_a_node_that_reads_it_and_exclusion_wins() {
        let names = [
            "onnx::MatMul_7",
            "/encoder/layer.1/intermediate/dense/MatMul",
        ];
        let take = |n: &NameFilter| n.admits(names.iter().copied()).0;
        assert!(take(&NameFilter::default()));
        // `*` crosses `/` and `.`; the node's name matches where the weight's does not.
        assert!(take(&f(&["*/intermediate/*"], &[])));
        assert!(take(&f(&["onnx::MatMul_?"], &[])));
        assert!(!take(&f(&["*attention*"], &[])));
        assert!(!take(&f(&["*intermediate*"], &["*layer.1*"])));
        assert!(!take(&f(&[], &["onnx::*"])));
        // Which include patterns matched.
        assert_eq!(
            f(&["x", "*dense*", "onnx*"], &[])
                .admits(names.iter().copied())
                .1,
            vec![1, 2]
        );
        assert_eq!(
            f(&["a", "b"], &["c"]).describe().as_deref(),
            Some("include a, b; exclude c")
        );
        assert!(NameFilter::pattern("[").is_err() && NameFilter::pattern("*.weight").is_ok());
    }
}
