//! Latency measurement: warm-up runs, then timed runs; median, min and p90 in milliseconds.

use std::time::Instant;

use serde::Serialize;

use crate::backend::{Prepared, RunError};
use crate::inputs::NamedArrays;

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub p90_ms: f64,
}

pub fn measure(
    model: &mut dyn Prepared,
    inputs: &NamedArrays,
    warmup: usize,
    runs: usize,
) -> Result<Latency, RunError> {
    for _ in 0..warmup {
        model.run(inputs)?;
    }
    let mut t = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        model.run(inputs)?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| t[((t.len() - 1) as f64 * q).round() as usize];
    Ok(Latency {
        runs: t.len(),
        median_ms: pick(0.5),
        min_ms: t[0],
        p90_ms: pick(0.9),
    })
}
