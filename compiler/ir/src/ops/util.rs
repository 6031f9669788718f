//! Helpers the op families share, each defined once: axes, permutations, broadcasting, Shape's
//! range, Slice's lengths, MatMul's shape.

use crate::model::{Dim, Node};

/// Small integer tensors (rank ≤ 1, at most this many elements) are propagated by inference.
pub const MAX_PROPAGATED_INTS: u64 = 64;

/// The largest rank inference builds a shape for (a shape tensor with more elements than this
/// gives an unknown shape instead of an allocation the size of its declared length).
pub const MAX_RANK: i64 = 64;

pub fn known(v: i64) -> Dim {
    Dim::Known(v)
}

/// `axis` in `[-rank, rank)` as an index.
pub fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = i64::try_from(rank).ok()?;
    let a = if axis < 0 { axis.checked_add(r)? } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

/// Axes normalized against `rank`, sorted and without duplicates; None when one is out of range
/// or one is repeated.
pub fn norm_axes(axes: &[i64], rank: usize) -> Option<Vec<usize>> {
    let mut v: Vec<usize> = axes
        .iter()
        .map(|a| norm_axis(*a, rank))
        .collect::<Option<_>>()?;
    v.sort_unstable();
    let n = v.len();
    v.dedup();
    (v.len() == n).then_some(v)
}

/// An op's axes: its `axes` attribute (older opsets), else what its axes input holds.
pub fn axes_of(n: &Node, input: impl FnOnce() -> Option<Vec<i64>>) -> Option<Vec<i64>> {
    match n.attr_ints("axes") {
        Some(a) => Some(a.to_vec()),
        None => input(),
    }
}

/// A checked permutation of `0..len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Perm(Vec<usize>);

impl Perm {
    /// Checks that `p` is a permutation of `0..p.len()`.
    pub fn new(p: &[i64]) -> Result<Perm, String> {
        let n = p.len();
        let mut seen = vec![false; n];
        let mut out = Vec::with_capacity(n);
        for &v in p {
            let i = usize::try_from(v)
                .ok()
                .filter(|i| *i < n)
                .ok_or_else(|| format!("perm {p:?} is not a permutation (value {v})"))?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(format!("perm {p:?} is not a permutation ({v} repeats)"));
            }
            out.push(i);
        }
        Ok(Perm(out))
    }
    /// The reversal `[r-1, …, 0]` (Transpose without `perm`).
    pub fn reversed(rank: usize) -> Perm {
        Perm((0..rank).rev().collect())
    }
    /// A node's `perm` attribute, or the reversal of `rank` axes.
    pub fn of_transpose(n: &Node, rank: usize) -> Option<Perm> {
        match n.attr_ints("perm") {
            Some(p) => Perm::new(p).ok().filter(|p| p.len() == rank),
            None => Some(Perm::reversed(rank)),
        }
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }
    /// `items` permuted: `out[i] = items[perm[i]]` (None when the lengths differ).
    pub fn apply<T: Clone>(&self, items: &[T]) -> Option<Vec<T>> {
        (items.len() == self.0.len()).then(|| self.0.iter().map(|&i| items[i].clone()).collect())
    }
    /// The permutation of `Transpose(Transpose(x, first), self)`: `out[j] = first[self[j]]`.
    pub fn after(&self, first: &Perm) -> Option<Perm> {
        (self.0.len() == first.0.len()).then(|| Perm(self.0.iter().map(|&k| first.0[k]).collect()))
    }
    pub fn is_identity(&self) -> bool {
        self.0.iter().enumerate().all(|(i, &p)| i == p)
    }
    pub fn to_i64(&self) -> Vec<i64> {
        self.0.iter().map(|&i| i as i64).collect()
    }
}

/// Numpy broadcasting of symbolic shapes.
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Vec<Dim> {
    let n = a.len().max(b.len());
    let one = Dim::Known(1);
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n {
                &a[i + a.len() - n]
            } else {
                &one
            };
            let db = if i + b.len() >= n {
                &b[i + b.len() - n]
            } else {
                &one
            };
            match (da, db) {
                (x, y) if x == y => x.clone(),
                (Dim::Known(1), y) => y.clone(),
                (x, Dim::Known(1)) => x.clone(),
                (Dim::Known(x), _) => Dim::Known(*x),
                (_, Dim::Known(y)) => Dim::Known(*y),
                // An unknown dim is 1 or equal to the other (anything else is an invalid model).
                (Dim::Sym(s), Dim::Unknown) | (Dim::Unknown, Dim::Sym(s)) => Dim::Sym(s.clone()),
                _ => Dim::Unknown,
            }
        })
        .collect()
}

/// Numpy broadcasting of concrete shapes (None when they do not broadcast).
pub fn broadcast_static(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
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

/// MatMul's output shape (numpy matmul rules; ranks ≥ 1).
pub fn matmul_shape(a: &[Dim], b: &[Dim]) -> Vec<Dim> {
    if a.is_empty() || b.is_empty() {
        return vec![];
    }
    let a2: Vec<Dim> = if a.len() == 1 {
        vec![known(1), a[0].clone()]
    } else {
        a.to_vec()
    };
    let b2: Vec<Dim> = if b.len() == 1 {
        vec![b[0].clone(), known(1)]
    } else {
        b.to_vec()
    };
    let mut out = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
    if a.len() > 1 {
        out.push(a2[a2.len() - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1].clone());
    }
    out
}

/// The product of dims (Unknown when one is not known).
pub fn prod(dims: &[Dim]) -> Dim {
    let mut p = 1i64;
    for d in dims {
        match d {
            Dim::Known(v) => match p.checked_mul(*v) {
                Some(x) => p = x,
                None => return Dim::Unknown,
            },
            _ => return Dim::Unknown,
        }
    }
    Dim::Known(p)
}

/// The [start, end) range of dims a Shape node returns.
pub fn shape_range(n: &Node, rank: usize) -> (usize, usize) {
    let r = rank as i64;
    let clamp = |v: i64| -> usize {
        let v = if v < 0 { v.saturating_add(r) } else { v };
        v.clamp(0, r) as usize
    };
    let s = clamp(n.attr_i("start").unwrap_or(0));
    let e = n.attr_i("end").map(clamp).unwrap_or(rank);
    (s, e.max(s))
}

/// Element count along one axis after Slice (ONNX clamping rules); `step` must not be 0.
pub fn slice_len(d: i64, start: i64, end: i64, step: i64) -> i64 {
    slice_bounds(d, start, end, step).map_or(0, |(_, len)| len)
}

/// (first index, element count) of a Slice along a dim of size `d` (None for step 0).
pub fn slice_bounds(d: i64, start: i64, end: i64, step: i64) -> Option<(i64, i64)> {
    if step == 0 || d < 0 {
        return None;
    }
    let wrap = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
    let (s, e) = if step > 0 {
        (wrap(start).clamp(0, d), wrap(end).clamp(0, d))
    } else {
        (wrap(start).clamp(-1, d - 1), wrap(end).clamp(-1, d - 1))
    };
    let len = if step > 0 {
        let span = (e - s).max(0) as i128;
        ((span + step as i128 - 1) / step as i128) as i64
    } else {
        let span = (s - e).max(0) as i128;
        ((span + (-(step as i128)) - 1) / (-(step as i128))) as i64
    };
    Some((s.max(0), len))
}

/// Conv/Pool output size along one spatial axis: floor((in + pads - effective kernel) / stride) + 1
/// (ceil with `ceil_mode`), never below 0. None for a non-positive stride or dilation.
pub fn window_out(
    input: i64,
    kernel: i64,
    stride: i64,
    dilation: i64,
    pad_total: i64,
    ceil_mode: bool,
) -> Option<i64> {
    if stride <= 0 || dilation <= 0 || kernel <= 0 {
        return None;
    }
    let ek = dilation.checked_mul(kernel - 1)?.checked_add(1)?;
    let span = input.checked_add(pad_total)?.checked_sub(ek)?;
    let q = if ceil_mode {
        span.div_euclid(stride) + i64::from(span.rem_euclid(stride) != 0)
    } else {
        span.div_euclid(stride)
    };
    Some((q + 1).max(0))
}
