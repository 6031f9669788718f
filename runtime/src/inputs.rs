//! Model inputs: seeded random inputs that fit the model (symbolic dims from `--dim` or from how the
//! graph relates them, integer inputs kept inside the table they index, masks set to ones, position
//! ids after the past tokens, nonzero divisors), or arrays from an .npz file; and .npz writing.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{NpzReader, NpzWriter};
use wcc_ir::eval::Array;
use wcc_ir::infer::{infer_graph, TypeMap};
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

/// The names in a symbolic dim (`past_seq + seq` → past_seq, seq); numbers and operators dropped.
fn atoms(expr: &str) -> Vec<String> {
    tokens(expr)
        .into_iter()
        .filter(|t| !matches!(t.as_str(), "+" | "-" | "*") && t.parse::<i64>().is_err())
        .collect()
}

fn tokens(expr: &str) -> Vec<String> {
    expr.replace('+', " + ")
        .replace('-', " - ")
        .replace('*', " * ")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A symbolic dim that is a single name (not an expression).
fn single_atom(d: &Dim) -> Option<&str> {
    match d {
        Dim::Sym(s) if tokens(s).len() == 1 && s.trim().parse::<i64>().is_err() => Some(s.trim()),
        _ => None,
    }
}

/// `d` when it is one of `names`.
fn input_atom<'d>(d: &'d Dim, names: &[String]) -> Option<&'d str> {
    single_atom(d).filter(|s| names.iter().any(|x| x == s))
}

/// The values of the inputs' symbolic dims: `--dim` first, then what the graph implies (a dim
/// that must equal another, or a sum of others), then the default.
struct Dims<'a> {
    spec: &'a InputSpec,
    /// name → the expression it equals, in the order found.
    derived: Vec<(String, String)>,
}

impl Dims<'_> {
    fn atom(&self, name: &str, depth: usize) -> i64 {
        if let Some(v) = self.spec.dims.get(name) {
            return *v;
        }
        if depth < 16 {
            if let Some((_, e)) = self.derived.iter().find(|(a, _)| a == name) {
                return self.eval(e, depth + 1);
            }
        }
        self.spec.default_dim
    }

    /// Evaluates a name, or an expression of names and integers with + - * (as the dynamo
    /// exporter writes, e.g. `past_seq + seq`).
    fn eval(&self, expr: &str, depth: usize) -> i64 {
        if let Some(v) = self.spec.dims.get(expr.trim()) {
            return *v;
        }
        let tokens = tokens(expr);
        if tokens.iter().any(|t| t.contains(['(', ')', '/'])) {
            return self.spec.default_dim;
        }
        let atom = |t: &str| t.parse::<i64>().unwrap_or_else(|_| self.atom(t, depth));
        // Sum of products, left to right.
        let (mut total, mut term, mut sign) = (0i64, None::<i64>, 1i64);
        let mut pending_mul = false;
        for t in &tokens {
            match t.as_str() {
                "+" | "-" => {
                    total = total.saturating_add(sign * term.unwrap_or(0));
                    term = None;
                    sign = if t == "+" { 1 } else { -1 };
                }
                "*" => pending_mul = true,
                a => {
                    let v = atom(a);
                    term = Some(if pending_mul {
                        term.unwrap_or(1).saturating_mul(v)
                    } else {
                        v
                    });
                    pending_mul = false;
                }
            }
        }
        total.saturating_add(sign * term.unwrap_or(0)).max(0)
    }

    fn dim(&self, d: &Dim) -> i64 {
        match d {
            Dim::Known(v) if *v >= 0 => *v,
            Dim::Sym(s) => self.eval(s, 0),
            _ => self.spec.default_dim,
        }
    }

    /// Whether `expr` depends on `name` (directly or through derived names).
    fn depends_on(&self, expr: &str, name: &str, depth: usize) -> bool {
        depth > 16
            || atoms(expr).iter().any(|a| {
                a == name
                    || self
                        .derived
                        .iter()
                        .find(|(d, _)| d == a)
                        .is_some_and(|(_, e)| self.depends_on(e, name, depth + 1))
            })
    }

    /// Records `name = expr` unless `name` is given, already derived, or the relation is circular.
    fn derive(&mut self, name: &str, expr: &str) -> bool {
        if self.spec.dims.contains_key(name)
            || self.derived.iter().any(|(a, _)| a == name)
            || self.depends_on(expr, name, 0)
        {
            return false;
        }
        self.derived.push((name.to_string(), expr.to_string()));
        true
    }
}

/// What the shapes of the graph say about the inputs' symbolic dims.
struct ShapeFacts {
    /// Pairs of dims that must be equal: operands of broadcasting ops and of MatMul's contraction,
    /// Concat's other axes, and a declared output type against the length a Concat computes.
    equal: Vec<(Dim, Dim)>,
    /// Lengths that Concat computes as a sum of symbolic dims: the cache length of a KV-cache
    /// decoder, `past_seq + seq`, where the past keys meet the new ones.
    sums: Vec<String>,
}

fn shape_facts(model: &Model, types: &TypeMap) -> ShapeFacts {
    let g = &model.graph;
    // Concat lengths computed here (shape inference leaves a symbolic sum unknown).
    let mut concat: HashMap<String, Vec<Dim>> = HashMap::new();
    let mut facts = ShapeFacts {
        equal: vec![],
        sums: vec![],
    };
    let shape = |concat: &HashMap<String, Vec<Dim>>, name: &str| -> Option<Vec<Dim>> {
        concat
            .get(name)
            .cloned()
            .or_else(|| types.shape(name).cloned())
    };
    let pair = |facts: &mut ShapeFacts, a: &Dim, b: &Dim| {
        let trivial = |d: &Dim| matches!(d, Dim::Unknown | Dim::Known(1));
        if a != b && !trivial(a) && !trivial(b) {
            facts.equal.push((a.clone(), b.clone()));
        }
    };
    for n in g.nodes.iter().filter(|n| n.domain.is_empty()) {
        match n.op_type.as_str() {
            // Inputs broadcast together (the op registry says which ops do).
            _ if wcc_ir::ops::broadcasts(n) => {
                let shapes: Vec<Vec<Dim>> = n
                    .present_inputs()
                    .filter_map(|i| shape(&concat, i))
                    .collect();
                for s in shapes.iter().skip(1) {
                    let (a, b) = (&shapes[0], s);
                    for k in 1..=a.len().min(b.len()) {
                        pair(&mut facts, &a[a.len() - k], &b[b.len() - k]);
                    }
                }
            }
            "MatMul" => {
                if let (Some(a), Some(b)) = (
                    n.inputs.first().and_then(|i| shape(&concat, i)),
                    n.inputs.get(1).and_then(|i| shape(&concat, i)),
                ) {
                    if a.len() >= 2 && b.len() >= 2 {
                        pair(&mut facts, &a[a.len() - 1], &b[b.len() - 2]);
                    }
                }
            }
            "Concat" => {
                let shapes: Option<Vec<Vec<Dim>>> =
                    n.inputs.iter().map(|i| shape(&concat, i)).collect();
                let Some(shapes) = shapes.filter(|s| !s.is_empty()) else {
                    continue;
                };
                let r = shapes[0].len();
                let axis = n.attr_i("axis").unwrap_or(0);
                let axis = if axis < 0 { axis + r as i64 } else { axis };
                if !(0..r as i64).contains(&axis) || shapes.iter().any(|s| s.len() != r) {
                    continue;
                }
                let axis = axis as usize;
                for s in &shapes[1..] {
                    for i in (0..r).filter(|i| *i != axis) {
                        pair(&mut facts, &shapes[0][i], &s[i]);
                    }
                }
                let mut terms: Vec<String> = vec![];
                let mut known = 0i64;
                for s in &shapes {
                    match &s[axis] {
                        Dim::Known(v) => known += v,
                        Dim::Sym(x) => terms.push(x.clone()),
                        Dim::Unknown => {
                            terms.clear();
                            known = -1;
                            break;
                        }
                    }
                }
                if known < 0 || terms.is_empty() {
                    continue;
                }
                if terms.len() >= 2 && known == 0 && !facts.sums.contains(&terms.join(" + ")) {
                    facts.sums.push(terms.join(" + "));
                }
                if known > 0 {
                    terms.push(known.to_string());
                }
                let mut out = shapes[0].clone();
                out[axis] = Dim::Sym(terms.join(" + "));
                if let Some(o) = n.outputs.first() {
                    concat.insert(o.clone(), out);
                }
            }
            _ => {}
        }
    }
    for v in g.outputs.iter().chain(&g.value_info) {
        if let (Some(declared), Some(computed)) = (
            v.tensor_type().and_then(|t| t.shape.as_ref()),
            concat.get(&v.name),
        ) {
            if declared.len() == computed.len() {
                for (a, b) in declared.iter().zip(computed) {
                    pair(&mut facts, a, b);
                }
            }
        }
    }
    facts
}

/// How the graph uses an input's values.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    /// Exclusive upper bound: the smallest table axis it indexes (Gather indices), directly or
    /// through Cast/Reshape/Unsqueeze/….
    index_bound: Option<i64>,
    /// Read as a mask: cast to bool, `1 - m`, Not/And/Or/Where's condition.
    mask: bool,
    /// Cast to a float type and computed with (rotary angles from position ids).
    numeric: bool,
    /// The divisor of a Div or Mod: must not be zero.
    divisor: bool,
}

/// A scalar constant (initializer or Constant node) as f64.
fn scalar_constant(g: &wcc_ir::Graph, name: &str) -> Option<f64> {
    let one = |v: Vec<f64>| (v.len() == 1).then(|| v[0]);
    if let Some(t) = g.initializer(name) {
        return (t.numel() == 1)
            .then(|| t.to_f64_vec().ok().and_then(one))
            .flatten();
    }
    let n = g
        .nodes
        .iter()
        .find(|n| n.op_type == "Constant" && n.outputs.first().is_some_and(|o| o == name))?;
    if let Some(t) = n.attr("value").and_then(|a| a.t.as_ref()) {
        return wcc_ir::Tensor::from_proto(t.clone())
            .ok()?
            .to_f64_vec()
            .ok()
            .and_then(one);
    }
    n.attr_f("value_float")
        .map(f64::from)
        .or_else(|| n.attr_i("value_int").map(|v| v as f64))
}

/// value name → (node, input position) of every standard-domain node that reads it.
type Readers<'a> = HashMap<&'a str, Vec<(&'a wcc_ir::Node, usize)>>;

fn readers(g: &wcc_ir::Graph) -> Readers<'_> {
    let mut r: Readers = HashMap::new();
    for n in g.nodes.iter().filter(|n| n.domain.is_empty()) {
        for (k, x) in n.inputs.iter().enumerate() {
            r.entry(x.as_str()).or_default().push((n, k));
        }
    }
    r
}

fn usage(model: &Model, types: &TypeMap, readers: &Readers, input: &str) -> Usage {
    let g = &model.graph;
    let mut u = Usage::default();
    // (value, whether it has been cast to a float type)
    let mut values = vec![(input.to_string(), false)];
    let mut i = 0;
    while i < values.len() && values.len() < 256 {
        let (cur, float) = values[i].clone();
        i += 1;
        for &(n, k) in readers.get(cur.as_str()).into_iter().flatten() {
            let follow = |values: &mut Vec<(String, bool)>, float: bool| {
                for o in n.outputs.iter().filter(|o| !o.is_empty()) {
                    if !values.iter().any(|(v, _)| v == o) {
                        values.push((o.clone(), float));
                    }
                }
            };
            // Indices into another input (Gather's ids into an embedding table): the op
            // registry says which input addresses which axis.
            if let Some((d, _, axis)) = wcc_ir::ops::index_inputs(n).filter(|f| f.1 == k) {
                let data = &n.inputs[d];
                let shape: Option<Vec<Dim>> = g
                    .initializer(data)
                    .map(|t| t.dims().iter().map(|d| Dim::Known(*d)).collect())
                    .or_else(|| types.shape(data).cloned());
                let axis = shape
                    .as_ref()
                    .and_then(|s| wcc_ir::ops::util::norm_axis(axis, s.len()));
                if let (Some(s), Some(a)) = (&shape, axis) {
                    if let Dim::Known(rows) = s[a] {
                        u.index_bound = Some(u.index_bound.map_or(rows, |b| b.min(rows)));
                    }
                }
                continue;
            }
            match (n.op_type.as_str(), k) {
                ("Cast", 0) => match types.dtype(&n.outputs[0]) {
                    Some(DataType::Bool) => u.mask = true,
                    Some(d) if d.is_float() => follow(&mut values, true),
                    _ => follow(&mut values, float),
                },
                ("Not" | "And" | "Or" | "Xor", _) | ("Where", 0) => u.mask = true,
                ("Sub", 1) if scalar_constant(g, &n.inputs[0]) == Some(1.0) => u.mask = true,
                ("Div" | "Mod", 1) => u.divisor = true,
                ("Mul" | "MatMul" | "Add" | "Sub" | "Div" | "Sin" | "Cos", _) if float => {
                    u.numeric = true
                }
                (
                    "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" | "Identity" | "Expand"
                    | "Transpose" | "Tile" | "Slice",
                    0,
                )
                | ("Concat", _) => follow(&mut values, float),
                _ => {}
            }
        }
    }
    u
}

/// Seeded random inputs for every graph input that is not an initializer, shaped and valued so
/// the model can run: symbolic dims from `--dim`, else from how the graph relates them (the
/// attention mask of a KV-cache decoder covers past and new tokens, `past_seq + seq`), else the
/// default; integer inputs that index a table stay inside it; masks are ones; position ids run
/// from the past length on (and stay below a table they index); divisors are nonzero. The graph
/// decides what an input is; its name is only a hint (`mask`, `position`).
pub fn random_inputs(model: &Model, spec: &InputSpec) -> Result<NamedArrays, String> {
    let g = &model.graph;
    let inits: std::collections::HashSet<&str> = g.initializers.iter().map(|t| t.name()).collect();
    let inputs: Vec<&wcc_ir::ValueInfo> = g
        .inputs
        .iter()
        .filter(|v| !inits.contains(v.name.as_str()))
        .collect();
    let shape_of = |v: &wcc_ir::ValueInfo| -> Vec<Dim> {
        v.tensor_type()
            .and_then(|t| t.shape.clone())
            .unwrap_or_default()
    };
    let types = infer_graph(g, model.default_opset(), None);
    let readers = readers(g);
    let usages: Vec<Usage> = inputs
        .iter()
        .map(|v| usage(model, &types, &readers, &v.name))
        .collect();
    let is_mask =
        |v: &wcc_ir::ValueInfo, u: &Usage| u.mask || v.name.to_lowercase().contains("mask");

    // Symbolic dims: relations the graph implies between the inputs' names.
    let input_atoms: Vec<String> = inputs
        .iter()
        .flat_map(|v| shape_of(v))
        .flat_map(|d| match d {
            Dim::Sym(s) => atoms(&s),
            _ => vec![],
        })
        .fold(vec![], |mut acc, a| {
            if !acc.contains(&a) {
                acc.push(a);
            }
            acc
        });
    let order = |a: &str| input_atoms.iter().position(|x| x == a);
    let facts = shape_facts(model, &types);
    let mut dims = Dims {
        spec,
        derived: vec![],
    };
    for (a, b) in &facts.equal {
        let ours = |d| input_atom(d, &input_atoms);
        let expr_of = |d: &Dim| match d {
            Dim::Known(v) => Some(v.to_string()),
            Dim::Sym(s) if atoms(s).iter().all(|x| order(x).is_some()) => Some(s.clone()),
            _ => None,
        };
        // Derive a name from the other side; of two names, the one the inputs mention later.
        let (x, y) = match (ours(a), ours(b)) {
            (Some(p), Some(q)) if order(p) < order(q) => (b, a),
            (Some(_), _) => (a, b),
            (None, Some(_)) => (b, a),
            (None, None) => continue,
        };
        if let (Some(name), Some(expr)) = (ours(x), expr_of(y)) {
            if !dims.derive(name, &expr) {
                // The other direction, when this side is fixed.
                if let (Some(name), Some(expr)) = (ours(y), expr_of(x)) {
                    dims.derive(name, &expr);
                }
            }
        }
    }
    // A mask's own length (one no other input shares) is the cache length of a KV-cache
    // decoder: it masks past and new tokens.
    if let Some(total) = facts.sums.first() {
        for (v, u) in inputs.iter().zip(&usages) {
            if !is_mask(v, u) {
                continue;
            }
            for d in shape_of(v) {
                let Some(name) = single_atom(&d) else {
                    continue;
                };
                let shared = inputs.iter().zip(&usages).any(|(w, wu)| {
                    !is_mask(w, wu)
                        && shape_of(w).iter().any(|e| match e {
                            Dim::Sym(s) => atoms(s).iter().any(|x| x == name),
                            _ => false,
                        })
                });
                if !shared && atoms(total).iter().all(|x| order(x).is_some()) {
                    dims.derive(name, total);
                }
            }
        }
    }

    let mut rng = Rng::new(spec.seed);
    let mut out = vec![];
    for (v, u) in inputs.iter().zip(&usages) {
        let t = v.tensor_type().ok_or_else(|| {
            format!(
                "input '{}' is not a tensor: give its values with --inputs FILE.npz",
                v.name
            )
        })?;
        let dtype = t
            .dtype
            .ok_or_else(|| format!("input '{}' has no element type", v.name))?;
        let declared = t.shape.as_ref().ok_or_else(|| {
            format!(
                "input '{}' has no shape: give its values with --inputs FILE.npz",
                v.name
            )
        })?;
        let shape: Vec<usize> = declared.iter().map(|d| dims.dim(d) as usize).collect();
        let n = shape
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .filter(|n| *n <= 1 << 28)
            .ok_or_else(|| {
                format!(
                    "input '{}' would have shape {shape:?}, too large for random inputs: set its \
                     dims with --dim",
                    v.name
                )
            })?;
        let sh = IxDyn(&shape);
        let lname = v.name.to_lowercase();
        let mask = is_mask(v, u);
        let integer = matches!(
            dtype,
            DataType::I64 | DataType::I32 | DataType::I8 | DataType::U8
        );
        let position = integer
            && !mask
            && !shape.is_empty()
            && (lname.contains("position") || lname.contains("pos_id") || u.numeric);
        // Positions continue after the past tokens: the length the sequence dim is added to.
        let offset = match declared.last().and_then(single_atom) {
            Some(seq) if position => facts
                .sums
                .iter()
                .chain(dims.derived.iter().map(|(_, e)| e))
                .find(|e| atoms(e).iter().any(|a| a == seq) && tokens(e).contains(&"+".into()))
                .map(|e| (dims.eval(e, 0) - dims.eval(seq, 0)).max(0))
                .unwrap_or(0),
            _ => 0,
        };
        let arr = match dtype {
            DataType::F32 | DataType::F64 | DataType::F16 if mask => {
                let ones = ArrayD::from_elem(sh, 1.0f64);
                match dtype {
                    DataType::F32 => Array::F32(ones.mapv(|x| x as f32)),
                    DataType::F64 => Array::F64(ones),
                    _ => Array::F16(ones.mapv(half::f16::from_f64)),
                }
            }
            DataType::F32 => Array::F32(ArrayD::from_shape_simple_fn(sh, || rng.normal() as f32)),
            DataType::F64 => Array::F64(ArrayD::from_shape_simple_fn(sh, || rng.normal())),
            DataType::F16 => Array::F16(ArrayD::from_shape_simple_fn(sh, || {
                half::f16::from_f64(rng.normal())
            })),
            DataType::Bool => Array::Bool(ArrayD::from_shape_simple_fn(sh, || {
                mask || rng.range(0, 2) == 1
            })),
            _ if integer => {
                let hi = u.index_bound.unwrap_or(2);
                let vals = if mask {
                    ArrayD::from_elem(sh, 1i64)
                } else if position {
                    let last = *shape.last().expect("rank checked above");
                    let pos: Vec<i64> = (0..n)
                        .map(|k| {
                            let p = offset + (k % last.max(1)) as i64;
                            match u.index_bound {
                                Some(b) if b > 0 => p % b,
                                _ => p,
                            }
                        })
                        .collect();
                    ArrayD::from_shape_vec(sh, pos).map_err(|e| e.to_string())?
                } else if u.divisor {
                    ArrayD::from_shape_simple_fn(sh, || rng.range(1, hi.max(2)))
                } else {
                    ArrayD::from_shape_simple_fn(sh, || rng.range(0, hi))
                };
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

#[cfg(test)]
mod tests {
    use super::*;
    use wcc_ir::{Graph, Node, TensorType, ValueInfo};

    fn fixture(stem: &str) -> Model {
        let p =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../fixtures/models/{stem}.onnx"));
        wcc_ir::import::load(&p).unwrap()
    }

    fn get<'a>(arrays: &'a NamedArrays, name: &str) -> &'a Array {
        &arrays.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn kv_cache_inputs_fit_the_model() {
        // Legacy names the mask's length `total_seq` (and the present outputs say it is the
        // concatenation of the past and the new keys); dynamo only concatenates them.
        for stem in ["llama_kv.legacy", "llama_kv.dynamo", "llama_drop_kv.legacy"] {
            let m = fixture(stem);
            let spec = InputSpec::default();
            let a = random_inputs(&m, &spec).unwrap();
            let d = spec.default_dim as usize;
            assert_eq!(get(&a, "input_ids").shape(), [d, d], "{stem}");
            assert_eq!(
                get(&a, "past_key_values.0.key").shape(),
                [d, 2, d, 12],
                "{stem}"
            );
            let mask = get(&a, "attention_mask");
            assert_eq!(mask.shape(), [d, 2 * d], "{stem}: past_seq + seq");
            assert!(mask.as_i64s().unwrap().iter().all(|v| *v == 1), "{stem}");
            // Position ids continue after the past tokens, on every row.
            let pos = get(&a, "position_ids").as_i64s().unwrap();
            let row: Vec<i64> = (d as i64..2 * d as i64).collect();
            assert_eq!(pos, row.repeat(d), "{stem}");
            // Token ids stay inside the embedding table.
            assert!(get(&a, "input_ids")
                .as_i64s()
                .unwrap()
                .iter()
                .all(|v| (0..128).contains(v)));
            // --dim still decides, and the mask follows it.
            let spec = InputSpec {
                dims: parse_dims("past_seq=6,seq=1").unwrap(),
                ..Default::default()
            };
            let a = random_inputs(&m, &spec).unwrap();
            assert_eq!(get(&a, "attention_mask").shape(), [d, 7], "{stem}");
            assert_eq!(get(&a, "position_ids").as_i64s().unwrap(), vec![6; d]);
            // The same seed gives the same inputs.
            assert_eq!(a, random_inputs(&m, &spec).unwrap());
        }
    }

    #[test]
    fn encoder_masks_are_ones_and_token_types_stay_in_their_table() {
        let m = fixture("bert.legacy");
        let a = random_inputs(&m, &InputSpec::default()).unwrap();
        assert!(get(&a, "attention_mask")
            .as_i64s()
            .unwrap()
            .iter()
            .all(|v| *v == 1));
        assert!(get(&a, "token_type_ids")
            .as_i64s()
            .unwrap()
            .iter()
            .all(|v| (0..2).contains(v)));
    }

    fn model(graph: Graph) -> Model {
        Model {
            ir_version: 8,
            opset_imports: vec![(String::new(), 17)],
            graph,
            functions: vec![],
            rest: Default::default(),
            sources: vec![],
            escaped_strings: false,
        }
    }

    #[test]
    fn divisors_are_never_zero_and_masks_are_found_by_their_use() {
        // y = 12 / n; z = Where(Cast<bool>(keep), x, x): `keep` is a mask by how it is used.
        let i64s = |name: &str, dims: &[i64]| {
            ValueInfo::tensor(name, TensorType::known(DataType::I64, dims))
        };
        let twelve =
            wcc_ir::Tensor::from_raw("twelve", DataType::I64, &[], 12i64.to_le_bytes().to_vec())
                .unwrap();
        let mut cast = Node::new("c", "Cast", vec!["keep".into()], vec!["b".into()]);
        cast.attributes.push(wcc_ir::Attribute::int("to", 9));
        let g = Graph {
            inputs: vec![
                i64s("n", &[64]),
                i64s("keep", &[64]),
                ValueInfo::tensor("x", TensorType::known(DataType::F32, &[64])),
            ],
            outputs: vec![i64s("y", &[64])],
            initializers: vec![twelve],
            nodes: vec![
                Node::new(
                    "d",
                    "Div",
                    vec!["twelve".into(), "n".into()],
                    vec!["y".into()],
                ),
                cast,
                Node::new(
                    "w",
                    "Where",
                    vec!["b".into(), "x".into(), "x".into()],
                    vec!["z".into()],
                ),
            ],
            ..Default::default()
        };
        let m = model(g);
        for seed in 0..8 {
            let a = random_inputs(
                &m,
                &InputSpec {
                    seed,
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(get(&a, "n").as_i64s().unwrap().iter().all(|v| *v != 0));
            assert!(get(&a, "keep").as_i64s().unwrap().iter().all(|v| *v == 1));
        }
    }
}
