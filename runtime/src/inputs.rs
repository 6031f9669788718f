//! Model inputs: seeded random (integer inputs kept inside the embedding table they index, masks
//! set to ones, symbolic dims from `--dim`), or arrays from an .npz file; and .npz writing.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{NpzReader, NpzWriter};
use wcc_ir::eval::Array;
use wcc_ir::{DataType, Dim, Model};

use crate::rng::Rng;

/// Named arrays, in a fixed order (graph order for inputs and outputs).
pub type NamedArrays = Vec<(String, Array)>;

#[derive(Debug, Clone)]
pub struct InputSpec {
    pub seed: u64,
    /// Values for symbolic dims (`--dim batch=8,seq=128`).
    pub dims: HashMap<String, i64>,
    /// Used for symbolic dims not given in `dims`.
    pub default_dim: i64,
}

impl Default for InputSpec {
    fn default() -> Self {
        InputSpec {
            seed: 0,
            dims: HashMap::new(),
            default_dim: 4,
        }
    }
}

/// Parses `batch=8,seq=128`.
pub fn parse_dims(s: &str) -> Result<HashMap<String, i64>, String> {
    let mut m = HashMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("--dim '{part}': expected NAME=VALUE"))?;
        let v: i64 = v
            .trim()
            .parse()
            .map_err(|_| format!("--dim '{part}': '{v}' is not an integer"))?;
        if v < 0 {
            return Err(format!("--dim '{part}': dims cannot be negative"));
        }
        m.insert(k.trim().to_string(), v);
    }
    Ok(m)
}

/// Evaluates a symbolic dim: a name, or an expression of names and integers with + - * (as the
/// dynamo exporter writes, e.g. `past_seq + seq`).
fn eval_dim(expr: &str, spec: &InputSpec) -> i64 {
    if let Some(v) = spec.dims.get(expr) {
        return *v;
    }
    let tokens: Vec<String> = expr
        .replace('+', " + ")
        .replace('-', " - ")
        .replace('*', " * ")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if tokens.len() == 1 {
        return spec.default_dim;
    }
    let atom = |t: &str| {
        t.parse::<i64>()
            .ok()
            .or_else(|| spec.dims.get(t).copied())
            .unwrap_or(spec.default_dim)
    };
    // Sum of products, left to right.
    let (mut total, mut term, mut sign) = (0i64, None::<i64>, 1i64);
    let mut pending_mul = false;
    for t in &tokens {
        match t.as_str() {
            "+" | "-" => {
                total += sign * term.unwrap_or(0);
                term = None;
                sign = if t == "+" { 1 } else { -1 };
            }
            "*" => pending_mul = true,
            a => {
                let v = atom(a);
                term = Some(if pending_mul {
                    term.unwrap_or(1) * v
                } else {
                    v
                });
                pending_mul = false;
            }
        }
    }
    (total + sign * term.unwrap_or(0)).max(0)
}

/// Upper bound (exclusive) for an integer input: the smallest embedding table it indexes directly
/// or through Cast/Reshape/Unsqueeze/Squeeze/Flatten/Identity.
fn index_bound(model: &Model, input: &str) -> Option<i64> {
    let g = &model.graph;
    let mut names = vec![input.to_string()];
    let mut bound: Option<i64> = None;
    let mut i = 0;
    while i < names.len() {
        let cur = names[i].clone();
        i += 1;
        for n in &g.nodes {
            if !n.domain.is_empty() {
                continue;
            }
            match n.op_type.as_str() {
                "Gather" if n.inputs.get(1) == Some(&cur) && n.attr_i("axis").unwrap_or(0) == 0 => {
                    if let Some(t) = g.initializer(&n.inputs[0]) {
                        if let Some(&rows) = t.dims().first() {
                            bound = Some(bound.map_or(rows, |b| b.min(rows)));
                        }
                    }
                }
                "Cast" | "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" | "Identity"
                    if n.inputs.first() == Some(&cur) && names.len() < 64 =>
                {
                    names.extend(n.outputs.iter().cloned());
                }
                _ => {}
            }
        }
    }
    bound
}

/// Seeded random inputs for every graph input that is not an initializer.
pub fn random_inputs(model: &Model, spec: &InputSpec) -> Result<NamedArrays, String> {
    let g = &model.graph;
    let inits: std::collections::HashSet<&str> = g.initializers.iter().map(|t| t.name()).collect();
    let mut rng = Rng::new(spec.seed);
    let mut out = vec![];
    for v in g.inputs.iter().filter(|v| !inits.contains(v.name.as_str())) {
        let t = v.tensor_type().ok_or_else(|| {
            format!(
                "input '{}' is not a tensor: give its values with --inputs FILE.npz",
                v.name
            )
        })?;
        let dtype = t
            .dtype
            .ok_or_else(|| format!("input '{}' has no element type", v.name))?;
        let shape: Vec<usize> = t
            .shape
            .as_ref()
            .ok_or_else(|| {
                format!(
                    "input '{}' has no shape: give its values with --inputs FILE.npz",
                    v.name
                )
            })?
            .iter()
            .map(|d| match d {
                Dim::Known(v) => *v as usize,
                Dim::Sym(s) => eval_dim(s, spec) as usize,
                Dim::Unknown => spec.default_dim as usize,
            })
            .collect();
        let n: usize = shape.iter().product();
        if n > 1 << 28 {
            return Err(format!(
                "input '{}' would have {n} elements: set its dims with --dim",
                v.name
            ));
        }
        let sh = IxDyn(&shape);
        let lname = v.name.to_lowercase();
        let is_mask = lname.contains("mask");
        let arr = match dtype {
            DataType::F32 => Array::F32(ArrayD::from_shape_simple_fn(sh, || rng.normal() as f32)),
            DataType::F64 => Array::F64(ArrayD::from_shape_simple_fn(sh, || rng.normal())),
            DataType::F16 => Array::F16(ArrayD::from_shape_simple_fn(sh, || {
                half::f16::from_f64(rng.normal())
            })),
            DataType::Bool => Array::Bool(ArrayD::from_shape_simple_fn(sh, || {
                is_mask || rng.range(0, 2) == 1
            })),
            DataType::I64 | DataType::I32 | DataType::I8 | DataType::U8 => {
                let hi = if is_mask {
                    2
                } else {
                    index_bound(model, &v.name).unwrap_or(2)
                };
                let vals =
                    ArrayD::from_shape_simple_fn(sh, || if is_mask { 1 } else { rng.range(0, hi) });
                match dtype {
                    DataType::I64 => Array::I64(vals),
                    DataType::I32 => Array::I32(vals.mapv(|x| x as i32)),
                    DataType::I8 => Array::I8(vals.mapv(|x| x as i8)),
                    _ => Array::U8(vals.mapv(|x| x as u8)),
                }
            }
            other => {
                return Err(format!(
                    "input '{}': cannot generate {other} values; use --inputs FILE.npz",
                    v.name
                ))
            }
        };
        out.push((v.name.clone(), arr));
    }
    Ok(out)
}

/// Reads every array of an .npz file (names as stored, `.npy` stripped), in file order.
pub fn load_npz(path: &Path) -> Result<NamedArrays, String> {
    let f = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut r =
        NpzReader::new(f).map_err(|e| format!("{} is not an .npz file: {e}", path.display()))?;
    let names = r.names().map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = vec![];
    for name in names {
        macro_rules! try_ty {
            ($t:ty, $v:ident) => {
                if let Ok(a) = r.by_name::<ndarray::OwnedRepr<$t>, IxDyn>(&name) {
                    out.push((name.clone(), Array::$v(a)));
                    continue;
                }
            };
        }
        try_ty!(f32, F32);
        try_ty!(i64, I64);
        try_ty!(f64, F64);
        try_ty!(i32, I32);
        try_ty!(bool, Bool);
        try_ty!(i8, I8);
        try_ty!(u8, U8);
        return Err(format!(
            "{}: array '{name}' has an element type wcc cannot read (f32 f64 i64 i32 i8 u8 bool)",
            path.display()
        ));
    }
    Ok(out)
}

/// Writes arrays to an .npz file (uncompressed).
pub fn save_npz(path: &Path, arrays: &NamedArrays) -> Result<(), String> {
    let f = File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut w = NpzWriter::new(f);
    for (name, a) in arrays {
        let r = match a {
            Array::F32(x) => w.add_array(name.as_str(), x),
            Array::F64(x) => w.add_array(name.as_str(), x),
            Array::I64(x) => w.add_array(name.as_str(), x),
            Array::I32(x) => w.add_array(name.as_str(), x),
            Array::I8(x) => w.add_array(name.as_str(), x),
            Array::U8(x) => w.add_array(name.as_str(), x),
            Array::Bool(x) => w.add_array(name.as_str(), x),
            Array::F16(x) => w.add_array(name.as_str(), &x.mapv(|v| v.to_f32())),
        };
        r.map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    w.finish()
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// The arrays of `given` that `model` takes as inputs (a model with a dropped layer's cache takes
/// fewer than the original it is compared with).
pub fn own_inputs(model: &Model, given: &NamedArrays) -> NamedArrays {
    given
        .iter()
        .filter(|(n, _)| model.graph.inputs.iter().any(|v| v.name == *n))
        .cloned()
        .collect()
}

/// Orders and checks `given` against the model's inputs: every non-initializer input must be present.
pub fn match_inputs(model: &Model, given: NamedArrays) -> Result<NamedArrays, String> {
    let g = &model.graph;
    let inits: std::collections::HashSet<&str> = g.initializers.iter().map(|t| t.name()).collect();
    let mut by_name: HashMap<String, Array> = given.into_iter().collect();
    let mut out = vec![];
    for v in g.inputs.iter().filter(|v| !inits.contains(v.name.as_str())) {
        let a = by_name.remove(&v.name).ok_or_else(|| {
            format!(
                "the inputs file has no array named '{}' (a graph input)",
                v.name
            )
        })?;
        if let Some(d) = v.tensor_type().and_then(|t| t.dtype) {
            if d != a.dtype() {
                return Err(format!(
                    "input '{}' is {d} in the model but {} in the inputs file",
                    v.name,
                    a.dtype()
                ));
            }
        }
        out.push((v.name.clone(), a));
    }
    Ok(out)
}
