//! Weighted k-means for vector-quantization codebooks: k-means++ seeding ("k-means++: The
//! Advantages of Careful Seeding", Arthur & Vassilvitskii, SODA 2007) and Lloyd iterations, with
//! a weight per point (VPTQ weights every sub-vector of input column q by the Hessian diagonal
//! `H_qq`: "VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large Language Models",
//! Liu et al., arXiv 2409.17066, §4).
//!
//! # Math
//! Points `x_p ∈ R^d` with weights `ω_p > 0`; centroids `c_1..c_k` minimise
//! `Σ_p ω_p ‖x_p − c_{a(p)}‖²` (the inertia), `a(p)` the nearest centroid. Seeding picks the first
//! centroid with probability ∝ ω_p and each next one with probability ∝ `ω_p · D(p)²`, `D` the
//! distance to the nearest centroid so far. A Lloyd iteration assigns every point to its nearest
//! centroid (ties to the lowest index) and moves each centroid to the weighted mean of its
//! points; the inertia never increases. An emptied centroid is moved onto the point that
//! contributes most to the inertia. Fitting runs on at most `sample` points (all of them when
//! there are fewer), a stratified sample: the `sample/8` points farthest from the weighted mean
//! (largest `ω_p‖x_p − μ‖²`) all, each with its own weight, and the others drawn uniformly
//! without replacement, each standing for `(m − top)/(sample − top)` of them (its weight scaled
//! by that), so the sample's inertia estimates the whole one without bias. What sampling holds
//! is the sample (a heap of the farthest, then the uniform draw by Floyd's algorithm), never a
//! value per point, so a layer's fit needs no copy of its points ([`Points`] is a view). A uniform draw alone
//! misses a weight's rare, far points: one element of 175σ in a 1536×384 layer of MiniLM is left
//! out of a 65536-point sample four times in five, and without a centroid of its own it is most
//! of the layer's output error. [`assign`] then labels every point.
//!
//! Deterministic: the random draws come from a seeded SplitMix64, and parallel work (rayon) is
//! cut into fixed chunks whose partial sums are added in chunk order, so the same points, weights
//! and options give the same centroids on any number of threads.

use rayon::prelude::*;

/// Points per parallel chunk (fixed, so sums are added in the same order on any thread count).
const CHUNK: usize = 4096;

#[derive(Debug, Clone)]
pub struct KMeans {
    /// Centroids.
    pub k: usize,
    /// Dimension of a point.
    pub dim: usize,
    /// Most Lloyd iterations.
    pub iters: usize,
    /// Stop when an iteration lowers the inertia by less than this fraction.
    pub tol: f64,
    pub seed: u64,
    /// Most points fitting looks at.
    pub sample: usize,
}

/// A fitted codebook.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    /// `[k, dim]`, row-major.
    pub centroids: Vec<f32>,
    /// Weighted inertia on the fitted points, after each iteration (non-increasing).
    pub inertia: Vec<f64>,
}

/// The points a fit sees, by index `0..len()`, each of `dim` values and with a weight.
pub trait Points: Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn point(&self, i: usize) -> &[f32];
    fn weight(&self, i: usize) -> f32;
}

/// Points stored one after another, with weights or without (1 each).
struct Slice<'a> {
    points: &'a [f32],
    weights: Option<&'a [f32]>,
    dim: usize,
}

impl Points for Slice<'_> {
    fn len(&self) -> usize {
        self.points.len() / self.dim
    }
    fn point(&self, i: usize) -> &[f32] {
        &self.points[i * self.dim..(i + 1) * self.dim]
    }
    fn weight(&self, i: usize) -> f32 {
        self.weights.map_or(1.0, |w| w[i])
    }
}

/// A point's spread and index, ordered so that the heap's greatest is the least far (smaller
/// spread, then higher index): the one `stratified` drops first.
struct Far(f64, usize);

impl PartialEq for Far {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o).is_eq()
    }
}
impl Eq for Far {}
impl PartialOrd for Far {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Far {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.0.total_cmp(&self.0).then(self.1.cmp(&o.1))
    }
}

/// SplitMix64: the seeded source of every random draw.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// An index drawn with probability ∝ `w[i]` (uniform when all are 0).
    fn weighted(&mut self, w: &[f64]) -> usize {
        let total: f64 = w.iter().sum();
        if total <= 0.0 || !total.is_finite() {
            return (self.next() % w.len() as u64) as usize;
        }
        let mut t = self.unit() * total;
        for (i, x) in w.iter().enumerate() {
            if t < *x {
                return i;
            }
            t -= x;
        }
        w.len() - 1
    }
}

fn dist2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y) as f64;
            d * d
        })
        .sum()
}

/// A codebook laid out for nearest-centroid search (the nearest centroid, ties to the lowest
/// index, and its squared distance): transposed (`[dim, k]`) with every
/// centroid's squared norm, so the search computes `‖c‖² − 2·x·c` for a block of centroids at
/// once, a loop the compiler vectorizes, rather than one distance after another.
#[derive(Debug, Clone)]
pub struct Book {
    dim: usize,
    k: usize,
    /// `[k, dim]`, as given.
    c: Vec<f32>,
    /// `[dim, k]`.
    t: Vec<f32>,
    norm: Vec<f32>,
}

/// Centroids scored at once (a stack buffer).
const BLOCK: usize = 64;

impl Book {
    pub fn new(centroids: &[f32], dim: usize) -> Self {
        let dim = dim.max(1);
        let k = centroids.len() / dim;
        let mut t = vec![0f32; dim * k];
        for (j, c) in centroids.chunks_exact(dim).enumerate() {
            for (d, x) in c.iter().enumerate() {
                t[d * k + j] = *x;
            }
        }
        let norm = centroids
            .chunks_exact(dim)
            .map(|c| c.iter().map(|x| x * x).sum())
            .collect();
        Book {
            dim,
            k,
            c: centroids[..k * dim].to_vec(),
            t,
            norm,
        }
    }

    /// The centroids, `[k, dim]`.
    pub fn centroids(&self) -> &[f32] {
        &self.c
    }

    /// The nearest centroid to `x`, ties to the lowest index, and its squared distance
    /// (computed exactly, in f64). `(0, ∞)` for an empty book.
    pub fn nearest(&self, x: &[f32]) -> (usize, f64) {
        let (dim, k) = (self.dim, self.k);
        let mut best = (0usize, f32::INFINITY);
        let mut acc = [0f32; BLOCK];
        let mut start = 0;
        while start < k {
            let len = BLOCK.min(k - start);
            let acc = &mut acc[..len];
            acc.copy_from_slice(&self.norm[start..start + len]);
            for (d, xd) in x.iter().enumerate().take(dim) {
                let a = -2.0 * xd;
                let row = &self.t[d * k + start..d * k + start + len];
                for (s, c) in acc.iter_mut().zip(row) {
                    *s += a * c;
                }
            }
            // The block's least score first (a reduction that vectorizes), its index only when
            // it beats the best so far.
            let least = acc.iter().fold(f32::INFINITY, |a, b| a.min(*b));
            if least < best.1 {
                let j = acc.iter().position(|s| *s == least).unwrap_or(0);
                best = (start + j, least);
            }
            start += len;
        }
        if k == 0 {
            return (0, f64::INFINITY);
        }
        let j = best.0;
        (j, dist2(x, &self.c[j * dim..(j + 1) * dim]))
    }
}

/// The nearest centroid of every point (`points` `[m, dim]`).
pub fn assign(points: &[f32], centroids: &[f32], dim: usize) -> Vec<u32> {
    let book = Book::new(centroids, dim);
    points
        .par_chunks(CHUNK * dim)
        .flat_map_iter(|chunk| {
            chunk
                .chunks_exact(dim)
                .map(|x| book.nearest(x).0 as u32)
                .collect::<Vec<_>>()
        })
        .collect()
}

impl KMeans {
    /// Fits `k` centroids to `points` (`[m, dim]`), weighted by `weights` (one per point; `None`:
    /// all 1).
    pub fn fit(&self, points: &[f32], weights: Option<&[f32]>) -> Fit {
        let dim = self.dim.max(1);
        self.fit_points(&Slice {
            points,
            weights,
            dim,
        })
    }

    /// `fit` on points seen through `pts` (a subset of a larger array, weights computed as
    /// asked): what is held is the sample, not a copy of the points.
    pub fn fit_points(&self, pts: &impl Points) -> Fit {
        let dim = self.dim.max(1);
        let m = pts.len();
        let mut rng = Rng(self.seed);
        // The fitting sample: every point, or the stratified sample of `sample` (see the module
        // doc), its indices sorted so the order is the points'.
        let weight = |i: usize| pts.weight(i).max(0.0) as f64;
        let (idx, w): (Vec<usize>, Vec<f64>) = if m <= self.sample {
            ((0..m).collect(), (0..m).map(weight).collect())
        } else {
            self.stratified(pts, &mut rng).into_iter().unzip()
        };
        let x: Vec<f32> = idx
            .iter()
            .flat_map(|&i| pts.point(i).iter().copied())
            .collect();
        let n = idx.len();
        if n == 0 {
            return Fit {
                centroids: vec![0.0; self.k * dim],
                inertia: vec![],
            };
        }
        let mut c = self.seed_plus_plus(&x, &w, dim, &mut rng);
        let mut inertia = vec![];
        for _ in 0..self.iters {
            let Sums {
                sums,
                counts,
                total,
                worst,
            } = lloyd_sums(&x, &w, &c, dim, self.k);
            let prev = inertia.last().copied();
            inertia.push(total);
            let mut moved = false;
            for j in 0..self.k {
                if counts[j] > 0.0 {
                    for t in 0..dim {
                        let v = (sums[j * dim + t] / counts[j]) as f32;
                        moved |= v != c[j * dim + t];
                        c[j * dim + t] = v;
                    }
                } else if let Some((p, _)) = worst {
                    // An emptied centroid takes the point that costs the most.
                    c[j * dim..(j + 1) * dim].copy_from_slice(&x[p * dim..(p + 1) * dim]);
                    moved = true;
                }
            }
            if !moved || prev.is_some_and(|p| p - total <= self.tol * p) {
                break;
            }
        }
        // The inertia of the centroids returned.
        let total = lloyd_sums(&x, &w, &c, dim, self.k).total;
        if inertia.last().is_none_or(|l| *l != total) {
            inertia.push(total);
        }
        Fit {
            centroids: c,
            inertia,
        }
    }

    /// The stratified sample of `sample` points out of more (see the module doc), by index, with
    /// each point's weight in it; sorted by index. Held: the sample, not a value per point.
    fn stratified(&self, pts: &impl Points, rng: &mut Rng) -> Vec<(usize, f64)> {
        let (dim, m) = (self.dim.max(1), pts.len());
        let weight = |i: usize| pts.weight(i).max(0.0) as f64;
        let top = self.sample / 8;
        let mut mean = vec![0f64; dim];
        let mut total = 0f64;
        for i in 0..m {
            let wi = weight(i);
            total += wi;
            for (a, x) in mean.iter_mut().zip(pts.point(i)) {
                *a += wi * *x as f64;
            }
        }
        if total > 0.0 {
            mean.iter_mut().for_each(|a| *a /= total);
        }
        // The `top` largest spreads (ties to the lower index), kept in a heap whose least is
        // the first to go.
        let mut far = std::collections::BinaryHeap::with_capacity(top + 1);
        for i in 0..m {
            let d: f64 = pts
                .point(i)
                .iter()
                .zip(&mean)
                .map(|(a, b)| (*a as f64 - b).powi(2))
                .sum();
            far.push(Far(weight(i) * d, i));
            if far.len() > top {
                far.pop();
            }
        }
        let mut tops: Vec<usize> = far.into_iter().map(|f| f.1).collect();
        tops.sort_unstable();
        // The rest: `sample − top` of the other `m − top` by rank among them, drawn without
        // replacement (Floyd's algorithm), then mapped to indices skipping the top ones.
        let rest = m - top;
        let draw = self.sample - top;
        let mut chosen = std::collections::HashSet::with_capacity(draw);
        for j in rest - draw..rest {
            let r = (rng.next() % (j + 1) as u64) as usize;
            if !chosen.insert(r) {
                chosen.insert(j);
            }
        }
        let mut ranks: Vec<usize> = chosen.into_iter().collect();
        ranks.sort_unstable();
        let scale = rest as f64 / draw as f64;
        let mut out: Vec<(usize, f64)> = tops.iter().map(|&i| (i, weight(i))).collect();
        let mut skipped = 0;
        for r in ranks {
            // The index of rank r among those not in `tops` (both ascending).
            while skipped < tops.len() && tops[skipped] <= r + skipped {
                skipped += 1;
            }
            let i = r + skipped;
            out.push((i, weight(i) * scale));
        }
        out.sort_unstable_by_key(|p| p.0);
        out
    }

    /// k-means++ seeding on the sample; fewer distinct points than `k` leaves the extra
    /// centroids on copies of them.
    fn seed_plus_plus(&self, x: &[f32], w: &[f64], dim: usize, rng: &mut Rng) -> Vec<f32> {
        let n = w.len();
        let mut c = Vec::with_capacity(self.k * dim);
        let first = rng.weighted(w);
        c.extend_from_slice(&x[first * dim..(first + 1) * dim]);
        let mut d2: Vec<f64> = (0..n)
            .map(|p| dist2(&x[p * dim..(p + 1) * dim], &c[..dim]))
            .collect();
        while c.len() < self.k * dim {
            let score: Vec<f64> = d2.iter().zip(w).map(|(d, w)| d * w).collect();
            let p = rng.weighted(&score);
            let new = x[p * dim..(p + 1) * dim].to_vec();
            for (q, d) in d2.iter_mut().enumerate() {
                *d = d.min(dist2(&x[q * dim..(q + 1) * dim], &new));
            }
            c.extend_from_slice(&new);
        }
        c
    }
}

/// What one assignment pass adds up.
struct Sums {
    /// Per centroid, the weighted sum of its points (`[k, dim]`).
    sums: Vec<f64>,
    /// Per centroid, the weight of its points.
    counts: Vec<f64>,
    /// The weighted inertia.
    total: f64,
    /// The point with the largest weighted distance, and that distance.
    worst: Option<(usize, f64)>,
}

impl Sums {
    fn new(k: usize, dim: usize) -> Self {
        Sums {
            sums: vec![0.0; k * dim],
            counts: vec![0.0; k],
            total: 0.0,
            worst: None,
        }
    }

    fn worse(&mut self, p: usize, d: f64) {
        if self.worst.is_none_or(|(_, b)| d > b) {
            self.worst = Some((p, d));
        }
    }
}

/// One assignment pass over the points, chunk by chunk, the chunks' sums added in order.
fn lloyd_sums(x: &[f32], w: &[f64], c: &[f32], dim: usize, k: usize) -> Sums {
    let book = Book::new(c, dim);
    let parts: Vec<Sums> = x
        .par_chunks(CHUNK * dim)
        .enumerate()
        .map(|(ci, chunk)| {
            let mut s = Sums::new(k, dim);
            for (i, p) in chunk.chunks_exact(dim).enumerate() {
                let at = ci * CHUNK + i;
                let (j, d) = book.nearest(p);
                let wd = w[at] * d;
                s.total += wd;
                s.worse(at, wd);
                s.counts[j] += w[at];
                for (acc, v) in s.sums[j * dim..(j + 1) * dim].iter_mut().zip(p) {
                    *acc += w[at] * *v as f64;
                }
            }
            s
        })
        .collect();
    let mut all = Sums::new(k, dim);
    for s in parts {
        all.sums.iter_mut().zip(&s.sums).for_each(|(a, b)| *a += b);
        all.counts
            .iter_mut()
            .zip(&s.counts)
            .for_each(|(a, b)| *a += b);
        all.total += s.total;
        if let Some((p, d)) = s.worst {
            all.worse(p, d);
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(k: usize, dim: usize) -> KMeans {
        KMeans {
            k,
            dim,
            iters: 50,
            tol: 0.0,
            seed: 7,
            sample: 1 << 20,
        }
    }

    /// `per` points around each of `centers` (`[_, 2]`), within ±0.05.
    fn blobs(centers: &[[f32; 2]], per: usize) -> Vec<f32> {
        let mut r = Rng(1);
        centers
            .iter()
            .flat_map(|c| {
                (0..per)
                    .flat_map(|_| {
                        [
                            c[0] + (r.unit() as f32 - 0.5) * 0.1,
                            c[1] + (r.unit() as f32 - 0.5) * 0.1,
                        ]
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn separated_blobs_are_found_and_the_inertia_never_rises() {
        let centers = [[0.0, 0.0], [5.0, 5.0], [-4.0, 6.0], [8.0, -3.0]];
        let x = blobs(&centers, 500);
        let fit = opts(4, 2).fit(&x, None);
        for c in &centers {
            let (_, d) = Book::new(&fit.centroids, 2).nearest(c);
            assert!(
                d < 0.01,
                "{c:?} has no centroid near it: {:?}",
                fit.centroids
            );
        }
        assert!(fit.inertia.windows(2).all(|w| w[1] <= w[0] * (1.0 + 1e-12)));
        // Every point is labelled with the centroid of its blob.
        let a = assign(&x, &fit.centroids, 2);
        for (b, chunk) in a.chunks(500).enumerate() {
            assert!(chunk.iter().all(|l| *l == chunk[0]), "blob {b} split");
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_codebook_on_any_thread_count() {
        let x: Vec<f32> = {
            let mut r = Rng(3);
            (0..20_000).map(|_| r.unit() as f32).collect()
        };
        let o = KMeans {
            sample: 6000,
            ..opts(16, 4)
        };
        let a = o.fit(&x, None);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = one.install(|| o.fit(&x, None));
        assert_eq!(a, b);
        let c = KMeans {
            seed: 8,
            ..o.clone()
        }
        .fit(&x, None);
        assert_ne!(a.centroids, c.centroids);
    }

    #[test]
    fn weights_pull_a_centroid_toward_heavy_points() {
        // One cluster: the centroid is the weighted mean.
        let x = [0.0f32, 0.0, 1.0, 0.0];
        let fit = opts(1, 2).fit(&x, Some(&[1.0, 3.0]));
        assert!(
            (fit.centroids[0] - 0.75).abs() < 1e-6,
            "{:?}",
            fit.centroids
        );
    }

    #[test]
    fn a_rare_far_point_gets_a_centroid_from_a_small_sample() {
        // 20 000 points near 0 and one far away; a sample of 1000 would miss it 19 times in 20
        // if drawn uniformly.
        let mut r = Rng(5);
        let mut x: Vec<f32> = (0..40_000).map(|_| r.unit() as f32 - 0.5).collect();
        x[2 * 12_345] = 40.0;
        for seed in 0..4 {
            let fit = KMeans {
                sample: 1000,
                seed,
                ..opts(8, 2)
            }
            .fit(&x, None);
            let (_, d) = Book::new(&fit.centroids, 2).nearest(&[40.0, x[2 * 12_345 + 1]]);
            assert!(d < 1e-6, "seed {seed}: {:?}", fit.centroids);
        }
    }

    #[test]
    fn more_centroids_than_points_and_no_points_are_handled() {
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let fit = opts(5, 2).fit(&x, None);
        assert_eq!(fit.centroids.len(), 10);
        assert_eq!(*fit.inertia.last().unwrap(), 0.0);
        let empty = opts(3, 2).fit(&[], None);
        assert_eq!(empty.centroids, vec![0.0; 6]);
    }
}
