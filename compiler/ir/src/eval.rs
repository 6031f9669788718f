//! Arrays for the reference evaluator that constant folding uses (f32/f64/f16/i64/i32/i8/u8/bool),
//! and the entry point `eval_node`. How each op evaluates lives with the op, in the op registry
//! (`crate::ops`). An op or a dtype it does not cover returns `None` (the node is left alone),
//! never a wrong value.

use std::borrow::Cow;

use ndarray::{ArrayD, IxDyn, Zip};

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
pub(crate) use each;

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
pub(crate) use each_opt;

/// Passes a value's bytes, in order and in pieces, to the function it is given; false when it
/// could not read them all.
type Feed<'a> = &'a mut dyn FnMut(&mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> bool;

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

    /// Whether the evaluator holds values of this dtype (what `from_tensor` reads).
    pub fn covers(d: DataType) -> bool {
        use DataType::*;
        matches!(d, F32 | F64 | F16 | I64 | I32 | I8 | U8 | Bool)
    }

    /// Reads a tensor (None for dtypes the evaluator does not cover), decoding its bytes chunk by
    /// chunk: data in a mapped file is read with positioned reads, so the only copy made is the
    /// array itself (the map's pages never become part of wcc's resident memory).
    pub fn from_tensor(t: &Tensor) -> Option<Array> {
        let dims = dims_of(t);
        Array::decode(t.dtype().ok()?, &dims, &mut |f| t.for_each_chunk(f).is_ok())
    }

    /// An array of `dtype` and `shape` from its little-endian bytes (None when they do not fit).
    pub fn from_le_bytes(dtype: DataType, shape: &[usize], bytes: &[u8]) -> Option<Array> {
        let want = dtype.storage_bytes(shape.iter().product::<usize>() as u64)?;
        if want != bytes.len() as u64 {
            return None;
        }
        Array::decode(dtype, shape, &mut |f| f(bytes).is_ok())
    }

    /// Decodes the bytes that `feed` passes, in order and in pieces, to the function it is given.
    fn decode(dtype: DataType, shape: &[usize], feed: Feed) -> Option<Array> {
        fn rd<T, const N: usize>(
            shape: &[usize],
            feed: Feed,
            conv: impl Fn([u8; N]) -> T,
        ) -> Option<ArrayD<T>> {
            let mut v: Vec<T> = Vec::new();
            v.try_reserve_exact(shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d))?)
                .ok()?;
            let mut ok = true;
            let fed = feed(&mut |c| {
                ok &= c.len() % N == 0;
                v.extend(c.chunks_exact(N).map(|e| conv(e.try_into().unwrap())));
                Ok(())
            });
            (fed && ok).then_some(())?;
            ArrayD::from_shape_vec(IxDyn(shape), v).ok()
        }
        Some(match dtype {
            DataType::F32 => Array::F32(rd(shape, feed, f32::from_le_bytes)?),
            DataType::F64 => Array::F64(rd(shape, feed, f64::from_le_bytes)?),
            DataType::F16 => Array::F16(rd(shape, feed, half::f16::from_le_bytes)?),
            DataType::I64 => Array::I64(rd(shape, feed, i64::from_le_bytes)?),
            DataType::I32 => Array::I32(rd(shape, feed, i32::from_le_bytes)?),
            DataType::I8 => Array::I8(rd(shape, feed, |c: [u8; 1]| c[0] as i8)?),
            DataType::U8 => Array::U8(rd(shape, feed, |c: [u8; 1]| c[0])?),
            DataType::Bool => Array::Bool(rd(shape, feed, |c: [u8; 1]| c[0] != 0)?),
            _ => return None,
        })
    }

    /// The values as little-endian bytes, in row-major order (a tensor's `raw_data`).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.as_le_bytes().into_owned()
    }

    /// As `to_le_bytes`, borrowed where the array's memory already holds exactly those bytes (a
    /// contiguous array on a little-endian machine), so writing it out copies nothing.
    pub fn as_le_bytes(&self) -> Cow<'_, [u8]> {
        /// The bytes of a contiguous array of `T`, one of the element types below: plain values
        /// without padding, whose in-memory bytes are their little-endian encoding on a
        /// little-endian machine (a bool is the byte 0 or 1).
        fn view<T: Copy>(a: &ArrayD<T>) -> Option<&[u8]> {
            let s = a.as_slice().filter(|_| cfg!(target_endian = "little"))?;
            // SAFETY: `s` is initialized memory of `size_of_val(s)` bytes, borrowed for as
            // long as `a`; every `T` here has no padding bytes.
            Some(unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) })
        }
        fn bytes<T: Copy, const N: usize>(a: &ArrayD<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            let mut out = Vec::with_capacity(a.len() * N);
            a.iter().for_each(|v| out.extend_from_slice(&f(*v)));
            out
        }
        let borrowed = match self {
            Array::F32(a) => view(a),
            Array::F64(a) => view(a),
            Array::F16(a) => view(a),
            Array::I64(a) => view(a),
            Array::I32(a) => view(a),
            Array::I8(a) => view(a),
            Array::U8(a) => view(a),
            Array::Bool(a) => view(a),
        };
        if let Some(b) = borrowed {
            return Cow::Borrowed(b);
        }
        Cow::Owned(match self {
            Array::F32(a) => bytes(a, f32::to_le_bytes),
            Array::F64(a) => bytes(a, f64::to_le_bytes),
            Array::F16(a) => bytes(a, half::f16::to_le_bytes),
            Array::I64(a) => bytes(a, i64::to_le_bytes),
            Array::I32(a) => bytes(a, i32::to_le_bytes),
            Array::I8(a) => bytes(a, |v: i8| [v as u8]),
            Array::U8(a) => bytes(a, |v: u8| [v]),
            Array::Bool(a) => bytes(a, |v: bool| [v as u8]),
        })
    }

    /// Writes the array as a tensor named `name`.
    pub fn to_tensor(&self, name: &str) -> Tensor {
        let dims: Vec<i64> = self.shape().iter().map(|d| *d as i64).collect();
        Tensor::from_raw(name, self.dtype(), &dims, self.to_le_bytes())
            .expect("evaluator output is consistent")
    }

    /// Indices `start..end` along `axis` (None when out of range).
    pub fn slice_axis(&self, axis: usize, start: usize, end: usize) -> Option<Array> {
        let n = *self.shape().get(axis)?;
        if start > end || end > n {
            return None;
        }
        let s = ndarray::Slice::from(start..end);
        Some(each!(self, a => a.slice_axis(ndarray::Axis(axis), s).to_owned()))
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

/// Whether an array of this shape is within `MAX_EVAL_ELEMENTS`.
pub(crate) fn fits(shape: &[usize]) -> bool {
    shape
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .is_some_and(|n| n <= MAX_EVAL_ELEMENTS)
}

/// `f` elementwise over two broadcast arrays.
pub(crate) fn zip2<A: Clone, B: Clone, R>(
    a: &ArrayD<A>,
    b: &ArrayD<B>,
    f: impl Fn(A, B) -> R,
) -> Option<ArrayD<R>> {
    let sh = crate::ops::util::broadcast_static(a.shape(), b.shape())?;
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

/// `a`'s elements in a new shape of the same size.
pub(crate) fn reshape<T: Clone>(a: &ArrayD<T>, shape: &[usize]) -> Option<ArrayD<T>> {
    let v: Vec<T> = a.iter().cloned().collect();
    ArrayD::from_shape_vec(IxDyn(shape), v).ok()
}

pub use crate::ops::shape::constant_value;

/// Evaluates one node on constant inputs (`None` for an omitted optional input). Returns one
/// array per output, or None when the op, an attribute or a dtype is not covered.
pub fn eval_node(n: &Node, inputs: &[Option<&Array>], opset: i64) -> Option<Vec<Array>> {
    crate::ops::eval_node(n, inputs, opset)
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
