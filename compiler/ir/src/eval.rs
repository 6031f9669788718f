//! A small reference evaluator for constant folding: the ops that shape arithmetic, constant
//! subgraphs and weight reparameterizations use, over f32/f64/f16/i64/i32/i8/u8/bool. An op or a
//! dtype it does not cover returns `None` (the node is left alone), never a wrong value.

use ndarray::{ArrayD, Axis, IxDyn, Slice, Zip};

use crate::dtype::DataType;
use crate::model::Node;
use crate::tensor::Tensor;

#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<half::f16>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    I8(ArrayD<i8>),
    U8(ArrayD<u8>),
    Bool(ArrayD<bool>),
}

macro_rules! each {
    ($v:expr, $a:ident => $body:expr) => {
        match $v {
            Array::F32($a) => Array::F32($body),
            Array::F64($a) => Array::F64($body),
            Array::F16($a) => Array::F16($body),
            Array::I64($a) => Array::I64($body),
            Array::I32($a) => Array::I32($body),
            Array::I8($a) => Array::I8($body),
            Array::U8($a) => Array::U8($body),
            Array::Bool($a) => Array::Bool($body),
        }
    };
}

macro_rules! each_opt {
    ($v:expr, $a:ident => $body:expr) => {
        match $v {
            Array::F32($a) => Array::F32($body?),
            Array::F64($a) => Array::F64($body?),
            Array::F16($a) => Array::F16($body?),
            Array::I64($a) => Array::I64($body?),
            Array::I32($a) => Array::I32($body?),
            Array::I8($a) => Array::I8($body?),
            Array::U8($a) => Array::U8($body?),
            Array::Bool($a) => Array::Bool($body?),
        }
    };
}

fn dims_of(t: &Tensor) -> Vec<usize> {
    t.dims().iter().map(|d| *d as usize).collect()
}

impl Array {
    pub fn dtype(&self) -> DataType {
        match self {
            Array::F32(_) => DataType::F32,
            Array::F64(_) => DataType::F64,
            Array::F16(_) => DataType::F16,
            Array::I64(_) => DataType::I64,
            Array::I32(_) => DataType::I32,
            Array::I8(_) => DataType::I8,
            Array::U8(_) => DataType::U8,
            Array::Bool(_) => DataType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Array::F32(a) => a.shape(),
            Array::F64(a) => a.shape(),
            Array::F16(a) => a.shape(),
            Array::I64(a) => a.shape(),
            Array::I32(a) => a.shape(),
            Array::I8(a) => a.shape(),
            Array::U8(a) => a.shape(),
            Array::Bool(a) => a.shape(),
        }
    }

    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn byte_size(&self) -> u64 {
        self.dtype().storage_bytes(self.len() as u64).unwrap_or(0)
    }

    /// Reads a tensor (None for dtypes the evaluator does not cover).
    pub fn from_tensor(t: &Tensor) -> Option<Array> {
        let b = t.raw_bytes().ok()?;
        let sh = IxDyn(&dims_of(t));
        macro_rules! rd {
            ($ty:ty, $n:expr, $conv:expr) => {
                ArrayD::from_shape_vec(sh, b.chunks_exact($n).map($conv).collect::<Vec<$ty>>())
                    .ok()?
            };
        }
        Some(match t.dtype().ok()? {
            DataType::F32 => Array::F32(rd!(f32, 4, |c| f32::from_le_bytes(c.try_into().unwrap()))),
            DataType::F64 => Array::F64(rd!(f64, 8, |c| f64::from_le_bytes(c.try_into().unwrap()))),
            DataType::F16 => Array::F16(rd!(half::f16, 2, |c| half::f16::from_le_bytes([
                c[0], c[1]
            ]))),
            DataType::I64 => Array::I64(rd!(i64, 8, |c| i64::from_le_bytes(c.try_into().unwrap()))),
            DataType::I32 => Array::I32(rd!(i32, 4, |c| i32::from_le_bytes(c.try_into().unwrap()))),
            DataType::I8 => Array::I8(rd!(i8, 1, |c| c[0] as i8)),
            DataType::U8 => Array::U8(rd!(u8, 1, |c| c[0])),
            DataType::Bool => Array::Bool(rd!(bool, 1, |c| c[0] != 0)),
            _ => return None,
        })
    }

    /// Writes the array as a tensor named `name`.
    pub fn to_tensor(&self, name: &str) -> Tensor {
        fn bytes<T: Copy, const N: usize>(a: &ArrayD<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            a.iter().flat_map(|v| f(*v)).collect()
        }
        let raw = match self {
            Array::F32(a) => bytes(a, f32::to_le_bytes),
            Array::F64(a) => bytes(a, f64::to_le_bytes),
            Array::F16(a) => bytes(a, half::f16::to_le_bytes),
            Array::I64(a) => bytes(a, i64::to_le_bytes),
            Array::I32(a) => bytes(a, i32::to_le_bytes),
            Array::I8(a) => bytes(a, |v: i8| [v as u8]),
            Array::U8(a) => bytes(a, |v: u8| [v]),
            Array::Bool(a) => bytes(a, |v: bool| [v as u8]),
        };
        let dims: Vec<i64> = self.shape().iter().map(|d| *d as i64).collect();
        Tensor::from_raw(name, self.dtype(), &dims, raw).expect("evaluator output is consistent")
    }

    /// Values as i64 (integer and bool arrays only).
    pub fn as_i64s(&self) -> Option<Vec<i64>> {
        Some(match self {
            Array::I64(a) => a.iter().copied().collect(),
            Array::I32(a) => a.iter().map(|v| *v as i64).collect(),
            Array::I8(a) => a.iter().map(|v| *v as i64).collect(),
            Array::U8(a) => a.iter().map(|v| *v as i64).collect(),
            Array::Bool(a) => a.iter().map(|v| *v as i64).collect(),
            _ => return None,
        })
    }

    /// Every element as f64 (bools as 0/1).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            Array::F32(a) => a.iter().map(|v| *v as f64).collect(),
            Array::F64(a) => a.iter().copied().collect(),
            Array::F16(a) => a.iter().map(|v| v.to_f64()).collect(),
            Array::I64(a) => a.iter().map(|v| *v as f64).collect(),
            Array::I32(a) => a.iter().map(|v| *v as f64).collect(),
            Array::I8(a) => a.iter().map(|v| *v as f64).collect(),
            Array::U8(a) => a.iter().map(|v| *v as f64).collect(),
            Array::Bool(a) => a.iter().map(|v| *v as u8 as f64).collect(),
        }
    }

    /// The array converted to another element type (None for types the evaluator lacks).
    pub fn cast_to(&self, to: DataType) -> Option<Array> {
        self.cast(to)
    }

    fn cast(&self, to: DataType) -> Option<Array> {
        if self.dtype() == to {
            return Some(self.clone());
        }
        let sh = IxDyn(self.shape());
        // Integer → integer casts go through i64 (exact); everything else through f64.
        if let (Some(ints), true) = (self.as_i64s(), to.is_integer() || to == DataType::Bool) {
            let mk = |v: Vec<i64>| ArrayD::from_shape_vec(sh.clone(), v).ok();
            return Some(match to {
                DataType::I64 => Array::I64(mk(ints)?),
                DataType::I32 => Array::I32(mk(ints)?.mapv(|v| v as i32)),
                DataType::I8 => Array::I8(mk(ints)?.mapv(|v| v as i8)),
                DataType::U8 => Array::U8(mk(ints)?.mapv(|v| v as u8)),
                DataType::Bool => Array::Bool(mk(ints)?.mapv(|v| v != 0)),
                _ => return None,
            });
        }
        let f = ArrayD::from_shape_vec(sh, self.to_f64_vec()).ok()?;
        Some(match to {
            DataType::F32 => Array::F32(f.mapv(|v| v as f32)),
            DataType::F64 => Array::F64(f),
            DataType::F16 => Array::F16(f.mapv(half::f16::from_f64)),
            // Float → int truncates toward zero (saturating), as ONNX Runtime does on x86.
            DataType::I64 => Array::I64(f.mapv(|v| v as i64)),
            DataType::I32 => Array::I32(f.mapv(|v| v as i32)),
            DataType::I8 => Array::I8(f.mapv(|v| v as i8)),
            DataType::U8 => Array::U8(f.mapv(|v| v as u8)),
            DataType::Bool => Array::Bool(f.mapv(|v| v != 0.0)),
            _ => return None,
        })
    }
}

/// The evaluator never allocates an array above this many elements (2^24): larger constants are
/// left to the runtime, whatever the folding pass's own size guard says.
pub const MAX_EVAL_ELEMENTS: usize = 1 << 24;

fn fits(shape: &[usize]) -> bool {
    shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .is_some_and(|n| n <= MAX_EVAL_ELEMENTS)
}

fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let x = if i + a.len() >= n {
                a[i + a.len() - n]
            } else {
                1
            };
            let y = if i + b.len() >= n {
                b[i + b.len() - n]
            } else {
                1
            };
            match (x, y) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

fn zip2<A: Clone, B: Clone, R>(
    a: &ArrayD<A>,
    b: &ArrayD<B>,
    f: impl Fn(A, B) -> R,
) -> Option<ArrayD<R>> {
    let sh = broadcast_shape(a.shape(), b.shape())?;
    if !fits(&sh) {
        return None;
    }
    let av = a.broadcast(IxDyn(&sh))?;
    let bv = b.broadcast(IxDyn(&sh))?;
    Some(
        Zip::from(&av)
            .and(&bv)
            .map_collect(|x, y| f(x.clone(), y.clone())),
    )
}

fn binary_arith(op: &str, a: &Array, b: &Array) -> Option<Array> {
    macro_rules! float {
        ($x:expr, $y:expr, $t:ty) => {{
            let f: fn($t, $t) -> $t = match op {
                "Add" => |x, y| x + y,
                "Sub" => |x, y| x - y,
                "Mul" => |x, y| x * y,
                "Div" => |x, y| x / y,
                "Pow" => |x, y| x.powf(y),
                "Max" => |x, y| {
                    if x.is_nan() || y.is_nan() {
                        <$t>::NAN
                    } else {
                        x.max(y)
                    }
                },
                "Min" => |x, y| {
                    if x.is_nan() || y.is_nan() {
                        <$t>::NAN
                    } else {
                        x.min(y)
                    }
                },
                _ => return None,
            };
            zip2($x, $y, f)?
        }};
    }
    macro_rules! int {
        ($x:expr, $y:expr, $t:ty) => {{
            if matches!(op, "Div" | "Mod") && $y.iter().any(|v| *v == 0) {
                return None;
            }
            let f: fn($t, $t) -> $t = match op {
                "Add" => |x, y| x.wrapping_add(y),
                "Sub" => |x, y| x.wrapping_sub(y),
                "Mul" => |x, y| x.wrapping_mul(y),
                "Div" => |x, y| x.wrapping_div(y),
                // ONNX Mod with fmod=0: the result takes the sign of the divisor.
                "Mod" => |x, y| ((x % y) + y) % y,
                "Max" => |x, y| x.max(y),
                "Min" => |x, y| x.min(y),
                "Pow" => |x, y| if y < 0 { 0 } else { x.wrapping_pow(y as u32) },
                _ => return None,
            };
            zip2($x, $y, f)?
        }};
    }
    Some(match (a, b) {
        (Array::F32(x), Array::F32(y)) => Array::F32(float!(x, y, f32)),
        (Array::F64(x), Array::F64(y)) => Array::F64(float!(x, y, f64)),
        (Array::I64(x), Array::I64(y)) => Array::I64(int!(x, y, i64)),
        (Array::I32(x), Array::I32(y)) => Array::I32(int!(x, y, i32)),
        // Pow with an integer exponent on floats.
        (Array::F32(_), _) | (Array::F64(_), _) if op == "Pow" => {
            binary_arith(op, a, &b.cast(a.dtype())?)?
        }
        _ => return None,
    })
}

fn compare(op: &str, a: &Array, b: &Array) -> Option<Array> {
    macro_rules! cmp {
        ($x:expr, $y:expr) => {{
            match op {
                "Equal" => zip2($x, $y, |x, y| x == y)?,
                "Less" => zip2($x, $y, |x, y| x < y)?,
                "Greater" => zip2($x, $y, |x, y| x > y)?,
                "LessOrEqual" => zip2($x, $y, |x, y| x <= y)?,
                "GreaterOrEqual" => zip2($x, $y, |x, y| x >= y)?,
                _ => return None,
            }
        }};
    }
    Some(Array::Bool(match (a, b) {
        (Array::F32(x), Array::F32(y)) => cmp!(x, y),
        (Array::F64(x), Array::F64(y)) => cmp!(x, y),
        (Array::I64(x), Array::I64(y)) => cmp!(x, y),
        (Array::I32(x), Array::I32(y)) => cmp!(x, y),
        (Array::Bool(x), Array::Bool(y)) if op == "Equal" => zip2(x, y, |x, y| x == y)?,
        _ => return None,
    }))
}

fn unary_float(op: &str, a: &Array) -> Option<Array> {
    macro_rules! un {
        ($x:expr, $t:ty) => {{
            let f: fn($t) -> $t = match op {
                "Neg" => |v| -v,
                "Abs" => |v| v.abs(),
                "Sqrt" => |v| v.sqrt(),
                "Reciprocal" => |v| 1.0 / v,
                "Exp" => |v| v.exp(),
                "Log" => |v| v.ln(),
                "Sin" => |v| v.sin(),
                "Cos" => |v| v.cos(),
                "Tanh" => |v| v.tanh(),
                "Floor" => |v| v.floor(),
                "Ceil" => |v| v.ceil(),
                "Relu" => |v| if v > 0.0 { v } else { 0.0 },
                "Sigmoid" => |v| 1.0 / (1.0 + (-v).exp()),
                // ONNX Sign(0) is 0 (Rust's signum gives 1).
                "Sign" => |v| {
                    if v > 0.0 {
                        1.0
                    } else if v < 0.0 {
                        -1.0
                    } else {
                        v
                    }
                },
                _ => return None,
            };
            $x.mapv(f)
        }};
    }
    Some(match a {
        Array::F32(x) => Array::F32(un!(x, f32)),
        Array::F64(x) => Array::F64(un!(x, f64)),
        Array::I64(x) if op == "Neg" => Array::I64(x.mapv(|v| v.wrapping_neg())),
        Array::I64(x) if op == "Abs" => Array::I64(x.mapv(|v| v.wrapping_abs())),
        Array::I32(x) if op == "Neg" => Array::I32(x.mapv(|v| v.wrapping_neg())),
        _ => return None,
    })
}

fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

fn reshape<T: Clone>(a: &ArrayD<T>, shape: &[usize]) -> Option<ArrayD<T>> {
    let v: Vec<T> = a.iter().cloned().collect();
    ArrayD::from_shape_vec(IxDyn(shape), v).ok()
}

fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> Option<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1)
            }
            0 if !allowzero => out.push(*input.get(i)?),
            t if t >= 0 => out.push(t as usize),
            _ => return None,
        }
    }
    if let Some(i) = infer {
        let rest: usize = out.iter().product();
        if rest == 0 || !total.is_multiple_of(rest) {
            return None;
        }
        out[i] = total / rest;
    }
    (out.iter().product::<usize>() == total).then_some(out)
}

fn gather<T: Clone>(
    a: &ArrayD<T>,
    axis: usize,
    idx: &[i64],
    idx_shape: &[usize],
) -> Option<ArrayD<T>> {
    let d = a.shape()[axis] as i64;
    let idx: Vec<usize> = idx
        .iter()
        .map(|&i| {
            let i = if i < 0 { i + d } else { i };
            (0..d).contains(&i).then_some(i as usize)
        })
        .collect::<Option<_>>()?;
    let sel = a.select(Axis(axis), &idx);
    let mut shape = a.shape()[..axis].to_vec();
    shape.extend_from_slice(idx_shape);
    shape.extend_from_slice(&a.shape()[axis + 1..]);
    reshape(&sel, &shape)
}

fn slice<T: Clone>(
    a: &ArrayD<T>,
    starts: &[i64],
    ends: &[i64],
    axes: &[usize],
    steps: &[i64],
) -> Option<ArrayD<T>> {
    let mut v = a.view();
    for k in 0..starts.len() {
        let ax = axes[k];
        let d = v.shape()[ax] as i64;
        let step = steps[k];
        if step == 0 {
            return None;
        }
        let len = crate::infer::slice_len(d, starts[k], ends[k], step);
        let s = if starts[k] < 0 {
            starts[k] + d
        } else {
            starts[k]
        };
        let s = if step > 0 {
            s.clamp(0, d)
        } else {
            s.clamp(0, d - 1)
        };
        if len == 0 {
            v.slice_axis_inplace(Axis(ax), Slice::new(0, Some(0), 1));
            continue;
        }
        let last = s + (len - 1) * step;
        let (lo, hi) = if step > 0 {
            (s, last + 1)
        } else {
            (last, s + 1)
        };
        v.slice_axis_inplace(
            Axis(ax),
            Slice::new(lo as isize, Some(hi as isize), step as isize),
        );
    }
    Some(v.to_owned())
}

fn expand<T: Clone>(a: &ArrayD<T>, shape: &[i64]) -> Option<ArrayD<T>> {
    let target: Vec<usize> = shape.iter().map(|v| (*v).max(0) as usize).collect();
    let sh = broadcast_shape(a.shape(), &target)?;
    if !fits(&sh) {
        return None;
    }
    Some(a.broadcast(IxDyn(&sh))?.to_owned())
}

fn tile<T: Clone>(a: &ArrayD<T>, reps: &[i64]) -> Option<ArrayD<T>> {
    if reps.len() != a.ndim() || reps.iter().any(|r| *r < 0) {
        return None;
    }
    let out_shape: Vec<usize> = a
        .shape()
        .iter()
        .zip(reps)
        .map(|(d, r)| d * *r as usize)
        .collect();
    if !fits(&out_shape) {
        return None;
    }
    let dims = a.shape().to_vec();
    Some(ArrayD::from_shape_fn(IxDyn(&out_shape), |ix| {
        let src: Vec<usize> = (0..dims.len()).map(|k| ix[k] % dims[k]).collect();
        a[IxDyn(&src)].clone()
    }))
}

fn matmul_f<T: ndarray::LinalgScalar>(a: &ArrayD<T>, b: &ArrayD<T>) -> Option<ArrayD<T>> {
    use ndarray::Ix2;
    let (ar, br) = (a.ndim(), b.ndim());
    if ar == 0 || br == 0 {
        return None;
    }
    let a3 = if ar == 1 {
        a.clone().insert_axis(Axis(0))
    } else {
        a.clone()
    };
    let b3 = if br == 1 {
        b.clone().insert_axis(Axis(1))
    } else {
        b.clone()
    };
    let (m, k) = (a3.shape()[a3.ndim() - 2], a3.shape()[a3.ndim() - 1]);
    let (k2, n) = (b3.shape()[b3.ndim() - 2], b3.shape()[b3.ndim() - 1]);
    if k != k2 {
        return None;
    }
    let batch = broadcast_shape(&a3.shape()[..a3.ndim() - 2], &b3.shape()[..b3.ndim() - 2])?;
    let mut ash = batch.clone();
    ash.extend([m, k]);
    let mut bsh = batch.clone();
    bsh.extend([k, n]);
    let av = a3.broadcast(IxDyn(&ash))?;
    let bv = b3.broadcast(IxDyn(&bsh))?;
    let nb: usize = batch.iter().product();
    if !fits(&[nb, m, n]) {
        return None;
    }
    let av = av.to_shape(IxDyn(&[nb, m, k])).ok()?;
    let bv = bv.to_shape(IxDyn(&[nb, k, n])).ok()?;
    let mut out = Vec::with_capacity(nb * m * n);
    for i in 0..nb {
        let x = av
            .index_axis(Axis(0), i)
            .into_dimensionality::<Ix2>()
            .ok()?;
        let y = bv
            .index_axis(Axis(0), i)
            .into_dimensionality::<Ix2>()
            .ok()?;
        out.extend(x.dot(&y).iter().copied());
    }
    let mut osh = batch;
    if ar > 1 {
        osh.push(m);
    }
    if br > 1 {
        osh.push(n);
    }
    ArrayD::from_shape_vec(IxDyn(&osh), out).ok()
}

fn reduce(
    op: &str,
    a: &Array,
    axes: Option<Vec<i64>>,
    keep: bool,
    noop_empty: bool,
) -> Option<Array> {
    let rank = a.shape().len();
    let mut ax: Vec<usize> = match axes {
        Some(v) if !v.is_empty() => v
            .iter()
            .map(|x| norm_axis(*x, rank))
            .collect::<Option<_>>()?,
        Some(_) if noop_empty => return Some(a.clone()),
        _ => (0..rank).collect(),
    };
    ax.sort_unstable();
    ax.dedup();
    macro_rules! red {
        ($x:expr, $t:ty) => {{
            let mut r = $x.clone();
            for &i in ax.iter().rev() {
                let n = r.shape()[i];
                r = match op {
                    "ReduceSum" => r.sum_axis(Axis(i)),
                    "ReduceMean" if n > 0 => r.sum_axis(Axis(i)).mapv(|v| v / (n as $t)),
                    "ReduceMax" if n > 0 => {
                        r.fold_axis(Axis(i), <$t>::NEG_INFINITY, |m, v| m.max(*v))
                    }
                    "ReduceMin" if n > 0 => r.fold_axis(Axis(i), <$t>::INFINITY, |m, v| m.min(*v)),
                    _ => return None,
                };
                if keep {
                    r = r.insert_axis(Axis(i));
                }
            }
            r
        }};
    }
    Some(match a {
        Array::F32(x) => Array::F32(red!(x, f32)),
        Array::F64(x) => Array::F64(red!(x, f64)),
        Array::I64(x) if op == "ReduceSum" => {
            let mut r = x.clone();
            for &i in ax.iter().rev() {
                r = r.sum_axis(Axis(i));
                if keep {
                    r = r.insert_axis(Axis(i));
                }
            }
            Array::I64(r)
        }
        _ => return None,
    })
}

/// The value of a `Constant` node.
pub fn constant_value(n: &Node) -> Option<Array> {
    let a = n.attributes.first()?;
    let p = &a.proto;
    Some(match p.name.as_str() {
        "value" => Array::from_tensor(&Tensor::from_proto(p.t.as_ref()?.clone()).ok()?)?,
        "value_float" => Array::F32(ArrayD::from_elem(IxDyn(&[]), p.f)),
        "value_floats" => {
            Array::F32(ArrayD::from_shape_vec(IxDyn(&[p.floats.len()]), p.floats.clone()).ok()?)
        }
        "value_int" => Array::I64(ArrayD::from_elem(IxDyn(&[]), p.i)),
        "value_ints" => {
            Array::I64(ArrayD::from_shape_vec(IxDyn(&[p.ints.len()]), p.ints.clone()).ok()?)
        }
        _ => return None,
    })
}

fn ints_of(x: Option<&Array>) -> Option<Vec<i64>> {
    x?.as_i64s()
}

/// Evaluates one default-domain node on constant inputs (`None` for an omitted optional input).
/// Returns one array per output, or None when the op, an attribute or a dtype is not covered.
pub fn eval_node(n: &Node, inputs: &[Option<&Array>], opset: i64) -> Option<Vec<Array>> {
    if !n.domain.is_empty() || n.has_subgraphs() {
        return None;
    }
    let x = |i: usize| inputs.get(i).copied().flatten();
    let op = n.op_type.as_str();
    let one = |a: Array| Some(vec![a]);
    match op {
        "Constant" => one(constant_value(n)?),
        "Identity" => one(x(0)?.clone()),
        "Cast" => one(x(0)?.cast(DataType::from_code(n.attr_i("to")? as i32, "").ok()?)?),
        "CastLike" => one(x(0)?.cast(x(1)?.dtype())?),
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" => {
            if op == "Mod" && n.attr_i("fmod").unwrap_or(0) != 0 {
                return None;
            }
            one(binary_arith(op, x(0)?, x(1)?)?)
        }
        "Max" | "Min" | "Sum" => {
            let mut acc = x(0)?.clone();
            for i in 1..inputs.len() {
                acc = binary_arith(if op == "Sum" { "Add" } else { op }, &acc, x(i)?)?;
            }
            one(acc)
        }
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" => {
            one(compare(op, x(0)?, x(1)?)?)
        }
        "Not" => match x(0)? {
            Array::Bool(a) => one(Array::Bool(a.mapv(|v| !v))),
            _ => None,
        },
        "And" | "Or" | "Xor" => match (x(0)?, x(1)?) {
            (Array::Bool(a), Array::Bool(b)) => one(Array::Bool(match op {
                "And" => zip2(a, b, |p, q| p && q)?,
                "Or" => zip2(a, b, |p, q| p || q)?,
                _ => zip2(a, b, |p, q| p ^ q)?,
            })),
            _ => None,
        },
        "Neg" | "Abs" | "Sqrt" | "Reciprocal" | "Exp" | "Log" | "Sin" | "Cos" | "Tanh"
        | "Floor" | "Ceil" | "Relu" | "Sigmoid" | "Sign" => one(unary_float(op, x(0)?)?),
        "Where" => {
            let Array::Bool(c) = x(0)? else { return None };
            macro_rules! wh {
                ($a:expr, $b:expr, $v:ident) => {{
                    let sh = broadcast_shape(&broadcast_shape(c.shape(), $a.shape())?, $b.shape())?;
                    if !fits(&sh) {
                        return None;
                    }
                    let (cv, av, bv) = (
                        c.broadcast(IxDyn(&sh))?,
                        $a.broadcast(IxDyn(&sh))?,
                        $b.broadcast(IxDyn(&sh))?,
                    );
                    Array::$v(Zip::from(&cv).and(&av).and(&bv).map_collect(|c, a, b| {
                        if *c {
                            a.clone()
                        } else {
                            b.clone()
                        }
                    }))
                }};
            }
            one(match (x(1)?, x(2)?) {
                (Array::F32(a), Array::F32(b)) => wh!(a, b, F32),
                (Array::F64(a), Array::F64(b)) => wh!(a, b, F64),
                (Array::I64(a), Array::I64(b)) => wh!(a, b, I64),
                (Array::I32(a), Array::I32(b)) => wh!(a, b, I32),
                (Array::Bool(a), Array::Bool(b)) => wh!(a, b, Bool),
                _ => return None,
            })
        }
        "Shape" => {
            let s = x(0)?.shape();
            let r = s.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let st = clamp(n.attr_i("start").unwrap_or(0));
            let en = n.attr_i("end").map(clamp).unwrap_or(s.len()).max(st);
            let v: Vec<i64> = s[st..en].iter().map(|d| *d as i64).collect();
            one(Array::I64(
                ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).ok()?,
            ))
        }
        "Size" => one(Array::I64(ArrayD::from_elem(
            IxDyn(&[]),
            x(0)?.len() as i64,
        ))),
        "Reshape" => {
            let a = x(0)?;
            let target = reshape_target(
                a.shape(),
                &ints_of(x(1))?,
                n.attr_i("allowzero").unwrap_or(0) != 0,
            )?;
            one(each_opt!(a, v => reshape(v, &target)))
        }
        "Flatten" => {
            let a = x(0)?;
            let r = a.shape().len() as i64;
            let ax = n.attr_i("axis").unwrap_or(1);
            let ax = (if ax < 0 { ax + r } else { ax }).clamp(0, r) as usize;
            let target = [
                a.shape()[..ax].iter().product::<usize>(),
                a.shape()[ax..].iter().product(),
            ];
            one(each_opt!(a, v => reshape(v, &target)))
        }
        "Unsqueeze" | "Squeeze" => {
            let a = x(0)?;
            let axes = if opset >= 13 {
                x(1).and_then(|v| v.as_i64s())
            } else {
                n.attr_ints("axes").map(|v| v.to_vec())
            };
            let mut shape = a.shape().to_vec();
            if op == "Unsqueeze" {
                let r = shape.len() + axes.as_ref()?.len();
                let mut ax: Vec<usize> = axes?
                    .iter()
                    .map(|v| norm_axis(*v, r))
                    .collect::<Option<_>>()?;
                ax.sort_unstable();
                for i in ax {
                    shape.insert(i, 1);
                }
            } else {
                match axes {
                    Some(axes) => {
                        let mut ax: Vec<usize> = axes
                            .iter()
                            .map(|v| norm_axis(*v, shape.len()))
                            .collect::<Option<_>>()?;
                        ax.sort_unstable();
                        for i in ax.into_iter().rev() {
                            if shape[i] != 1 {
                                return None;
                            }
                            shape.remove(i);
                        }
                    }
                    None => shape.retain(|d| *d != 1),
                }
            }
            one(each_opt!(a, v => reshape(v, &shape)))
        }
        "Transpose" => {
            let a = x(0)?;
            let r = a.shape().len();
            let perm: Vec<usize> = match n.attr_ints("perm") {
                Some(p) => p.iter().map(|v| *v as usize).collect(),
                None => (0..r).rev().collect(),
            };
            if perm.len() != r || perm.iter().any(|p| *p >= r) {
                return None;
            }
            one(
                each!(a, v => v.clone().permuted_axes(IxDyn(&perm)).as_standard_layout().to_owned()),
            )
        }
        "Concat" => {
            let arrs: Vec<&Array> = (0..inputs.len()).map(x).collect::<Option<_>>()?;
            let first = *arrs.first()?;
            let ax = norm_axis(n.attr_i("axis")?, first.shape().len())?;
            macro_rules! cat {
                ($v:ident) => {{
                    let views: Vec<_> = arrs
                        .iter()
                        .map(|a| {
                            if let Array::$v(b) = a {
                                Some(b.view())
                            } else {
                                None
                            }
                        })
                        .collect::<Option<_>>()?;
                    Array::$v(ndarray::concatenate(Axis(ax), &views).ok()?)
                }};
            }
            one(match first {
                Array::F32(_) => cat!(F32),
                Array::F64(_) => cat!(F64),
                Array::F16(_) => cat!(F16),
                Array::I64(_) => cat!(I64),
                Array::I32(_) => cat!(I32),
                Array::I8(_) => cat!(I8),
                Array::U8(_) => cat!(U8),
                Array::Bool(_) => cat!(Bool),
            })
        }
        "Gather" => {
            let a = x(0)?;
            let idx = x(1)?;
            let ax = norm_axis(n.attr_i("axis").unwrap_or(0), a.shape().len())?;
            let iv = idx.as_i64s()?;
            let ish = idx.shape().to_vec();
            one(each_opt!(a, v => gather(v, ax, &iv, &ish)))
        }
        "Slice" => {
            let a = x(0)?;
            let (starts, ends) = if opset >= 10 {
                (ints_of(x(1))?, ints_of(x(2))?)
            } else {
                (
                    n.attr_ints("starts")?.to_vec(),
                    n.attr_ints("ends")?.to_vec(),
                )
            };
            let r = a.shape().len();
            let axes: Vec<usize> = match if opset >= 10 {
                ints_of(x(3))
            } else {
                n.attr_ints("axes").map(|v| v.to_vec())
            } {
                Some(v) => v.iter().map(|i| norm_axis(*i, r)).collect::<Option<_>>()?,
                None => (0..starts.len()).collect(),
            };
            let steps = ints_of(x(4)).unwrap_or(vec![1; starts.len()]);
            if axes.len() != starts.len()
                || ends.len() != starts.len()
                || steps.len() != starts.len()
            {
                return None;
            }
            one(each_opt!(a, v => slice(v, &starts, &ends, &axes, &steps)))
        }
        "Expand" => {
            let shape = ints_of(x(1))?;
            one(each_opt!(x(0)?, v => expand(v, &shape)))
        }
        "Tile" => {
            let reps = ints_of(x(1))?;
            one(each_opt!(x(0)?, v => tile(v, &reps)))
        }
        "ConstantOfShape" => {
            let shape: Vec<usize> = ints_of(x(0))?
                .iter()
                .map(|v| (*v).max(0) as usize)
                .collect();
            let value = match n.attr("value").and_then(|a| a.t.as_ref()) {
                Some(t) => Array::from_tensor(&Tensor::from_proto(t.clone()).ok()?)?,
                None => Array::F32(ArrayD::from_elem(IxDyn(&[1]), 0.0)),
            };
            if value.len() != 1 || !fits(&shape) {
                return None;
            }
            one(
                each_opt!(&value, v => v.iter().next().map(|e| ArrayD::from_elem(IxDyn(&shape), *e))),
            )
        }
        "Range" => {
            let (s, l, d) = (x(0)?, x(1)?, x(2)?);
            match (s, l, d) {
                (Array::I64(_), Array::I64(_), Array::I64(_))
                | (Array::I32(_), Array::I32(_), Array::I32(_)) => {
                    let (s, l, d) = (s.as_i64s()?[0], l.as_i64s()?[0], d.as_i64s()?[0]);
                    if d == 0 {
                        return None;
                    }
                    let n = ((l - s) as f64 / d as f64).ceil().max(0.0) as i64;
                    if n as usize > MAX_EVAL_ELEMENTS {
                        return None;
                    }
                    let v: Vec<i64> = (0..n).map(|i| s + i * d).collect();
                    let arr = Array::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v).ok()?);
                    one(arr.cast(x(0)?.dtype())?)
                }
                (Array::F32(a), Array::F32(b), Array::F32(c)) => {
                    let (s, l, d) = (*a.iter().next()?, *b.iter().next()?, *c.iter().next()?);
                    if d == 0.0 {
                        return None;
                    }
                    let n = ((l - s) / d).ceil().max(0.0) as usize;
                    if n > MAX_EVAL_ELEMENTS {
                        return None;
                    }
                    let v: Vec<f32> = (0..n).map(|i| s + i as f32 * d).collect();
                    one(Array::F32(ArrayD::from_shape_vec(IxDyn(&[n]), v).ok()?))
                }
                _ => None,
            }
        }
        "MatMul" => one(match (x(0)?, x(1)?) {
            (Array::F32(a), Array::F32(b)) => Array::F32(matmul_f(a, b)?),
            (Array::F64(a), Array::F64(b)) => Array::F64(matmul_f(a, b)?),
            _ => return None,
        }),
        "EyeLike" => {
            let shape = x(0)?.shape().to_vec();
            if shape.len() != 2 || !fits(&shape) {
                return None;
            }
            let k = n.attr_i("k").unwrap_or(0);
            let eye = ArrayD::from_shape_fn(IxDyn(&shape), |ix| {
                if ix[1] as i64 - ix[0] as i64 == k {
                    1.0f64
                } else {
                    0.0
                }
            });
            let to = match n.attr_i("dtype") {
                Some(c) => DataType::from_code(c as i32, "").ok()?,
                None => x(0)?.dtype(),
            };
            one(Array::F64(eye).cast(to)?)
        }
        "ReduceL2" | "ReduceSumSquare" => {
            let axes = match n.attr_ints("axes") {
                Some(a) => Some(a.to_vec()),
                None => ints_of(x(1)),
            };
            let keep = n.attr_i("keepdims").unwrap_or(1) != 0;
            let noop = n.attr_i("noop_with_empty_axes").unwrap_or(0) != 0;
            let squared = match x(0)? {
                Array::F32(a) => Array::F32(a.mapv(|v| v * v)),
                Array::F64(a) => Array::F64(a.mapv(|v| v * v)),
                _ => return None,
            };
            let sum = reduce("ReduceSum", &squared, axes, keep, noop)?;
            one(if op == "ReduceL2" {
                unary_float("Sqrt", &sum)?
            } else {
                sum
            })
        }
        "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" => {
            let axes = match n.attr_ints("axes") {
                Some(a) => Some(a.to_vec()),
                None => ints_of(x(1)),
            };
            let keep = n.attr_i("keepdims").unwrap_or(1) != 0;
            let noop = n.attr_i("noop_with_empty_axes").unwrap_or(0) != 0;
            one(reduce(op, x(0)?, axes, keep, noop)?)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Attribute, Node};

    fn f32s(shape: &[usize], v: &[f32]) -> Array {
        Array::F32(ArrayD::from_shape_vec(IxDyn(shape), v.to_vec()).unwrap())
    }
    fn i64s(v: &[i64]) -> Array {
        Array::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
    }
    fn node(op: &str, attrs: Vec<Attribute>) -> Node {
        let mut n = Node::new("n", op, vec![], vec!["y".into()]);
        n.attributes = attrs;
        n
    }
    fn eval(op: &str, attrs: Vec<Attribute>, inputs: &[Option<&Array>]) -> Option<Array> {
        eval_node(&node(op, attrs), inputs, 17).map(|mut v| v.remove(0))
    }

    #[test]
    fn broadcasting_arithmetic_and_integer_division() {
        let a = f32s(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let b = f32s(&[2], &[10.0, 20.0]);
        assert_eq!(
            eval("Add", vec![], &[Some(&a), Some(&b)]),
            Some(f32s(&[2, 2], &[11.0, 22.0, 13.0, 24.0]))
        );
        // Integer Div truncates; division by zero is left to the runtime.
        assert_eq!(
            eval(
                "Div",
                vec![],
                &[Some(&i64s(&[-7, 7])), Some(&i64s(&[2, 2]))]
            ),
            Some(i64s(&[-3, 3]))
        );
        assert_eq!(
            eval("Div", vec![], &[Some(&i64s(&[1])), Some(&i64s(&[0]))]),
            None
        );
    }

    #[test]
    fn shape_ops() {
        let x = f32s(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let t = eval(
            "Transpose",
            vec![Attribute::ints("perm", &[1, 0])],
            &[Some(&x)],
        )
        .unwrap();
        assert_eq!(t, f32s(&[3, 2], &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]));
        let r = eval("Reshape", vec![], &[Some(&x), Some(&i64s(&[-1, 0]))]);
        assert_eq!(r.unwrap().shape(), &[2, 3]);
        let s = eval(
            "Slice",
            vec![],
            &[
                Some(&x),
                Some(&i64s(&[2])),
                Some(&i64s(&[0])),
                Some(&i64s(&[1])),
                Some(&i64s(&[-1])),
            ],
        );
        assert_eq!(s, Some(f32s(&[2, 2], &[2.0, 1.0, 5.0, 4.0])));
        let g = eval(
            "Gather",
            vec![Attribute::int("axis", 1)],
            &[Some(&x), Some(&Array::I64(ndarray::arr0(-1).into_dyn()))],
        );
        assert_eq!(g, Some(f32s(&[2], &[2.0, 5.0])));
        let c = eval(
            "Concat",
            vec![Attribute::int("axis", 0)],
            &[Some(&i64s(&[1, 2])), Some(&i64s(&[3]))],
        );
        assert_eq!(c, Some(i64s(&[1, 2, 3])));
        let sh = eval("Shape", vec![Attribute::int("start", -1)], &[Some(&x)]);
        assert_eq!(sh, Some(i64s(&[3])));
        let m = eval(
            "MatMul",
            vec![],
            &[Some(&x), Some(&f32s(&[3, 1], &[1.0, 1.0, 1.0]))],
        );
        assert_eq!(m, Some(f32s(&[2, 1], &[3.0, 12.0])));
        let u = eval("Unsqueeze", vec![], &[Some(&i64s(&[5])), Some(&i64s(&[0]))]).unwrap();
        assert_eq!(u.shape(), &[1, 1]);
    }

    #[test]
    fn oversized_results_are_refused() {
        let shape = i64s(&[1 << 13, 1 << 12]);
        assert!(eval("ConstantOfShape", vec![], &[Some(&shape)]).is_none());
        assert!(eval(
            "Range",
            vec![],
            &[
                Some(&i64s(&[0])),
                Some(&i64s(&[1 << 40])),
                Some(&i64s(&[1]))
            ]
        )
        .is_none());
    }

    #[test]
    fn uncovered_ops_and_domains_are_not_evaluated() {
        let x = f32s(&[1], &[1.0]);
        assert!(eval("Erf", vec![], &[Some(&x)]).is_none());
        let mut n = node("Relu", vec![]);
        n.domain = "com.example".into();
        assert!(eval_node(&n, &[Some(&x)], 17).is_none());
    }

    #[test]
    fn tensors_round_trip_through_arrays() {
        let a = f32s(&[2], &[1.5, -0.25]);
        let t = a.to_tensor("t");
        assert_eq!(Array::from_tensor(&t), Some(a));
    }
}
