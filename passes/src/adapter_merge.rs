//! Adapter merge from a PEFT directory (`wcc optimize base.onnx --adapter DIR`): LoRA, rsLoRA,
//! DoRA, per-module `rank_pattern`/`alpha_pattern`, and MiSS/Bone (default, "mini" and "bat"),
//! added into the base model's weights, as PEFT's `tuners/lora` and `tuners/miss` merge them. Papers:
//! LoRA (Hu et al., arXiv 2106.09685), DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank
//! Adaptation", arXiv 2402.09353), Bone/MiSS (Kang, arXiv 2409.15371).
//!
//! Math, with `W ∈ R^{out×in}` (PyTorch's Linear layout):
//! - LoRA: `W' = W + s·B·A`, `s = α/r` (rsLoRA: `α/√r`), r and α per module from the patterns.
//! - DoRA: `V = W + s·B·A`, `W' = diag(m / ‖V‖_row)·V` (row norms of the merged V).
//! - MiSS/Bone: `W'[:, jr:(j+1)r] += Bᵀ` for every block of the input (the last one partial);
//!   "mini" repeats `B ∈ R^{r×mini_r}` across the outputs; "bat": `W'_ij = W_ij(I + B_i) + B_i`.
//!
//! Keys (`base_model.model.<module>.lora_A.weight`, …) map to initializers through the consuming
//! node: an initializer named `<module>.weight`, or the weight input of the MatMul/Gemm named after
//! the module (`/model/layers.0/self_attn/q_proj/MatMul`). The layout comes from that consumer
//! (MatMul B is `in×out`, through a Transpose or Gemm `transB=1` it is `out×in`), never from the
//! shape. A weight shared with other nodes is copied before it is edited. A key that maps to
//! nothing, or a shape that does not fit, is an error naming it.
//! May touch: the target initializers (and copies of shared ones). Exact up to f32 rounding.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ndarray::{s, Array2, ArrayD, Axis, Ix2};
use wcc_ir::pass::{Pass, PassOutcome};
use wcc_ir::{Graph, IrError, Model, Result};

use crate::graph_util::fresh_name;

pub struct AdapterMerge {
    pub dir: PathBuf,
}

#[derive(Default)]
struct ModuleWeights {
    a: Option<ArrayD<f32>>,
    b: Option<ArrayD<f32>>,
    magnitude: Option<ArrayD<f32>>,
    block: Option<ArrayD<f32>>,
}

/// Where a module's weight lives in the graph.
struct Target {
    init: String,
    /// Stored as `out×in` (PyTorch layout); otherwise `in×out`.
    out_in: bool,
    /// The node that reads it (input index), for copying a shared weight.
    consumer: (usize, usize),
}

impl Pass for AdapterMerge {
    fn name(&self) -> &'static str {
        "adapter-merge"
    }
    fn description(&self) -> &'static str {
        "adds a PEFT adapter directory (LoRA, rsLoRA, DoRA, MiSS/Bone) into the base weights (--adapter)"
    }
    fn run_once(&self) -> bool {
        true
    }
    fn run(&self, model: &mut Model) -> Result<PassOutcome> {
        let dir = &self.dir;
        let err = |m: String| IrError::Other(format!("adapter {}: {m}", dir.display()));
        let cfg_path = dir.join("adapter_config.json");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .map_err(|e| err(format!("cannot read adapter_config.json: {e}")))?,
        )
        .map_err(|e| err(format!("adapter_config.json: {e}")))?;
        let st = dir.join("adapter_model.safetensors");
        if !st.is_file() {
            return Err(err(
                "no adapter_model.safetensors (only the safetensors format is supported)".into(),
            ));
        }
        let weights = wcc_ir::safetensors::read_f32(&st)?;
        let peft_type = cfg["peft_type"].as_str().unwrap_or("");
        let mut modules: BTreeMap<String, ModuleWeights> = BTreeMap::new();
        for (key, arr) in weights {
            let k = key.strip_prefix("base_model.model.").unwrap_or(&key);
            let (module, slot) = [
                (".lora_A.weight", 0),
                (".lora_B.weight", 1),
                (".lora_magnitude_vector.weight", 2),
                (".lora_magnitude_vector", 2),
                (".miss_block", 3),
                (".bone_block", 3),
            ]
            .iter()
            .find_map(|(suffix, slot)| k.strip_suffix(suffix).map(|m| (m.to_string(), *slot)))
            .ok_or_else(|| {
                err(format!(
                    "key '{key}' is not a LoRA, DoRA or MiSS/Bone weight wcc can merge"
                ))
            })?;
            let w = modules.entry(module).or_default();
            match slot {
                0 => w.a = Some(arr),
                1 => w.b = Some(arr),
                2 => w.magnitude = Some(arr),
                _ => w.block = Some(arr),
            }
        }
        let g = &mut model.graph;
        let mut notes = vec![];
        for (module, w) in &modules {
            let target = locate(g, module).map_err(|m| err(format!("module '{module}': {m}")))?;
            let t = g.initializer(&target.init).expect("located").clone();
            let dtype = t.dtype()?;
            let stored = wcc_ir::eval::Array::from_tensor(&t)
                .and_then(|a| a.cast_f32())
                .ok_or_else(|| {
                    err(format!(
                        "module '{module}': weight '{}' is {dtype}, which wcc cannot merge into",
                        target.init
                    ))
                })?;
            let stored: Array2<f32> = stored.into_dimensionality::<Ix2>().map_err(|_| {
                err(format!(
                    "module '{module}': weight '{}' is not a matrix ({:?})",
                    target.init,
                    t.dims()
                ))
            })?;
            let w_torch = if target.out_in {
                stored
            } else {
                stored.t().to_owned()
            };
            let merged = match peft_type {
                "LORA" => merge_lora(&cfg, module, w, w_torch),
                "MISS" | "BONE" => merge_miss(&cfg, w, w_torch),
                other => Err(format!(
                    "peft_type '{other}' is not supported (LORA, MISS, BONE)"
                )),
            }
            .map_err(|m| err(format!("module '{module}': {m}")))?;
            let store = if target.out_in {
                merged
            } else {
                merged.t().to_owned()
            };
            let new_t = wcc_ir::eval::Array::F32(store.into_dyn())
                .cast_to(dtype)
                .ok_or_else(|| err(format!("cannot store {dtype}")))?;
            // A weight read elsewhere too (tied embeddings, shared projections) is copied first.
            let readers = g
                .nodes
                .iter()
                .flat_map(|n| n.inputs.iter())
                .filter(|i| **i == target.init)
                .count();
            let name = if readers > 1 {
                let copy = fresh_name(g, &format!("{}.adapted", target.init));
                let (ni, ii) = target.consumer;
                g.nodes[ni].inputs[ii] = copy.clone();
                copy
            } else {
                target.init.clone()
            };
            let mut tensor = new_t.to_tensor(&name);
            tensor.proto.doc_string = t.proto.doc_string.clone();
            match g.initializers.iter().position(|x| x.name() == name) {
                Some(i) => g.initializers[i] = tensor,
                None => g.initializers.push(tensor),
            }
            notes.push(format!(
                "{module} → {name}{}",
                if readers > 1 {
                    " (copied: shared weight)"
                } else {
                    ""
                }
            ));
        }
        Ok(PassOutcome {
            changes: modules.len(),
            notes: vec![format!(
                "merged {} module(s) from {}: {}",
                modules.len(),
                dir.display(),
                notes.join(", ")
            )],
            details: None,
        })
    }
}

fn matrix(a: &ArrayD<f32>, what: &str) -> std::result::Result<Array2<f32>, String> {
    a.clone()
        .into_dimensionality::<Ix2>()
        .map_err(|_| format!("{what} is not a matrix ({:?})", a.shape()))
}

/// r or α for a module: the pattern entry whose key matches the module (exactly or as a
/// dotted suffix), else the default.
fn per_module(cfg: &serde_json::Value, pattern: &str, default: &str, module: &str) -> Option<f64> {
    if let Some(p) = cfg[pattern].as_object() {
        for (k, v) in p {
            if module == k || module.ends_with(&format!(".{k}")) {
                return v.as_f64();
            }
        }
    }
    cfg[default].as_f64()
}

fn merge_lora(
    cfg: &serde_json::Value,
    module: &str,
    w: &ModuleWeights,
    wt: Array2<f32>,
) -> std::result::Result<Array2<f32>, String> {
    let a = matrix(w.a.as_ref().ok_or("lora_A.weight is missing")?, "lora_A")?;
    let b = matrix(w.b.as_ref().ok_or("lora_B.weight is missing")?, "lora_B")?;
    let (out, inp) = wt.dim();
    let r = a.nrows();
    if a.ncols() != inp || b.nrows() != out || b.ncols() != r {
        return Err(format!(
            "lora_A {:?} and lora_B {:?} do not fit a weight of {out}×{inp}",
            a.shape(),
            b.shape()
        ));
    }
    let rank = per_module(cfg, "rank_pattern", "r", module).unwrap_or(r as f64);
    if rank as usize != r {
        return Err(format!(
            "the config gives rank {rank} but lora_A has {r} rows"
        ));
    }
    let alpha =
        per_module(cfg, "alpha_pattern", "lora_alpha", module).ok_or("lora_alpha is missing")?;
    let scale = if cfg["use_rslora"].as_bool().unwrap_or(false) {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    } as f32;
    let v = wt + b.dot(&a) * scale;
    if !cfg["use_dora"].as_bool().unwrap_or(false) {
        return Ok(v);
    }
    let m = w
        .magnitude
        .as_ref()
        .ok_or("use_dora is set but lora_magnitude_vector is missing")?;
    let m: Vec<f32> = m.iter().copied().collect();
    if m.len() != out {
        return Err(format!(
            "lora_magnitude_vector has {} entries for {out} outputs",
            m.len()
        ));
    }
    let mut v = v;
    for (o, mut row) in v.axis_iter_mut(Axis(0)).enumerate() {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.mapv_inplace(|x| x * (m[o] / norm));
    }
    Ok(v)
}

fn merge_miss(
    cfg: &serde_json::Value,
    w: &ModuleWeights,
    mut wt: Array2<f32>,
) -> std::result::Result<Array2<f32>, String> {
    let block = w.block.as_ref().ok_or("miss_block/bone_block is missing")?;
    let (out, inp) = wt.dim();
    match cfg["init_weights"].as_str() {
        Some("bat") => {
            let b = block
                .clone()
                .into_dimensionality::<ndarray::Ix3>()
                .map_err(|_| format!("a bat block must be 3-D, got {:?}", block.shape()))?;
            let r = b.shape()[1];
            if b.shape()[2] != r
                || r == 0
                || out % r != 0
                || inp % r != 0
                || b.shape()[0] != out / r
            {
                return Err(format!(
                    "bat block {:?} does not fit a weight of {out}×{inp}",
                    b.shape()
                ));
            }
            let eye = Array2::<f32>::eye(r);
            let mut res = wt.clone();
            for i in 0..out / r {
                let bi = b.index_axis(Axis(0), i).to_owned();
                let factor = &eye + &bi;
                for j in 0..inp / r {
                    let wij = wt.slice(s![i * r..(i + 1) * r, j * r..(j + 1) * r]);
                    let new = wij.dot(&factor) + &bi;
                    res.slice_mut(s![i * r..(i + 1) * r, j * r..(j + 1) * r])
                        .assign(&new);
                }
            }
            Ok(res)
        }
        other => {
            let b = matrix(block, "miss_block")?;
            let r = b.nrows();
            // "mini": B is r×mini_r, repeated across the outputs.
            let b = if other == Some("mini") {
                let mini = b.ncols();
                if mini == 0 || out % mini != 0 {
                    return Err(format!(
                        "mini block {:?} does not divide {out} outputs",
                        b.shape()
                    ));
                }
                Array2::from_shape_fn((r, out), |(k, o)| b[[k, o % mini]])
            } else {
                b
            };
            if b.ncols() != out || r == 0 {
                return Err(format!(
                    "block {:?} does not fit a weight of {out}×{inp}",
                    b.shape()
                ));
            }
            let bt = b.t();
            let mut j = 0;
            while j < inp {
                let width = r.min(inp - j);
                let mut cols = wt.slice_mut(s![.., j..j + width]);
                cols += &bt.slice(s![.., ..width]);
                j += r;
            }
            Ok(wt)
        }
    }
}

/// Finds the weight a module's adapter applies to.
fn locate(g: &Graph, module: &str) -> std::result::Result<Target, String> {
    let readers = |name: &str| -> Vec<(usize, usize)> {
        g.nodes
            .iter()
            .enumerate()
            .flat_map(|(ni, n)| {
                n.inputs
                    .iter()
                    .enumerate()
                    .filter(move |(_, x)| *x == name)
                    .map(move |(ii, _)| (ni, ii))
            })
            .collect()
    };
    // How a node uses the initializer as a weight: (stored out×in?).
    let layout_of = |ni: usize, ii: usize| -> Option<bool> {
        let n = &g.nodes[ni];
        match (n.op_type.as_str(), ii) {
            ("MatMul", 1) => Some(false),
            ("Gemm", 1) => Some(n.attr_i("transB").unwrap_or(0) != 0),
            ("Transpose", 0) if n.attr_ints("perm").is_none_or(|p| p == [1, 0]) => {
                // Transposed, then used as MatMul B.
                let out = &n.outputs[0];
                let users = readers(out);
                users
                    .iter()
                    .all(|(ui, uii)| g.nodes[*ui].op_type == "MatMul" && *uii == 1)
                    .then_some(true)
                    .filter(|_| !users.is_empty())
            }
            _ => None,
        }
    };
    let by_name = format!("{module}.weight");
    if g.initializer(&by_name).is_some() {
        let uses = readers(&by_name);
        let mut found = None;
        for (ni, ii) in &uses {
            if let Some(out_in) = layout_of(*ni, *ii) {
                if found.is_some() {
                    return Err(format!(
                        "initializer '{by_name}' is used as a weight by several nodes"
                    ));
                }
                found = Some(Target {
                    init: by_name.clone(),
                    out_in,
                    consumer: (*ni, *ii),
                });
            }
        }
        return found
            .ok_or_else(|| format!("initializer '{by_name}' is not used as a MatMul/Gemm weight"));
    }
    // By node name: `/model/layers.0/self_attn/q_proj/MatMul` ↔ `model.layers.0.self_attn.q_proj`.
    let mut cands = vec![];
    for (ni, n) in g.nodes.iter().enumerate() {
        if !(n.is("MatMul") || n.is("Gemm")) {
            continue;
        }
        let path = n.name.trim_start_matches('/').replace('/', ".");
        let Some((prefix, _op)) = path.rsplit_once('.') else {
            continue;
        };
        let prefix = prefix.strip_suffix(".base_layer").unwrap_or(prefix);
        if prefix != module && !prefix.ends_with(&format!(".{module}")) {
            continue;
        }
        let wname = &n.inputs[1];
        if g.initializer(wname).is_some() {
            cands.push(Target {
                init: wname.clone(),
                out_in: n.is("Gemm") && n.attr_i("transB").unwrap_or(0) != 0,
                consumer: (ni, 1),
            });
        } else if let Some((ti, t)) = g
            .nodes
            .iter()
            .enumerate()
            .find(|(_, t)| t.is("Transpose") && t.outputs[0] == *wname)
        {
            if g.initializer(&t.inputs[0]).is_some()
                && t.attr_ints("perm").is_none_or(|p| p == [1, 0])
            {
                cands.push(Target {
                    init: t.inputs[0].clone(),
                    out_in: true,
                    consumer: (ti, 0),
                });
            }
        }
    }
    match cands.len() {
        1 => Ok(cands.pop().unwrap()),
        0 => Err(format!("no initializer '{by_name}' and no MatMul/Gemm named after the module with a constant weight")),
        n => Err(format!("{n} MatMul/Gemm nodes are named after the module: ambiguous")),
    }
}

/// f32 helpers on the evaluator's arrays.
trait F32Cast {
    fn cast_f32(self) -> Option<ArrayD<f32>>;
}

impl F32Cast for wcc_ir::eval::Array {
    fn cast_f32(self) -> Option<ArrayD<f32>> {
        match self {
            wcc_ir::eval::Array::F32(a) => Some(a),
            wcc_ir::eval::Array::F16(a) => Some(a.mapv(|v| v.to_f32())),
            wcc_ir::eval::Array::F64(a) => Some(a.mapv(|v| v as f32)),
            _ => None,
        }
    }
}
