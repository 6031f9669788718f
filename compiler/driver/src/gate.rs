//! The fidelity gate: bounds every output of the result must meet against the original's, and
//! the one place that decides the default gate of a level.

use wcc_runtime::OutputFidelity;

use crate::level::Level;

/// The default gate of `-O compress` when the user gives none: every output's cosine
/// similarity to the original at least 0.99. A conservative choice of wcc's; the sublayer scores
/// it gates come from LLM-Drop ("What Matters in Transformers? Not All Attention is Needed",
/// He, Sun, Shen & Li, arXiv 2406.15786).
pub const DEFAULT_COMPRESS_MIN_COSINE: f64 = 0.99;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Gate {
    /// Every output's cosine similarity to the original must be at least this.
    pub min_cosine: Option<f64>,
    /// Every output's relative L2 error against the original must be at most this.
    pub max_rel_error: Option<f64>,
}

impl Gate {
    /// Whether any bound is set.
    pub fn is_set(&self) -> bool {
        self.min_cosine.is_some() || self.max_rel_error.is_some()
    }

    /// The gate a level works under: the user's, else the level's default (`-O compress`:
    /// `--min-cosine 0.99`; the lossless levels: none).
    pub fn for_level(self, level: Level) -> Gate {
        self.for_lossy(level.lossy())
    }

    /// The gate of a run that does (`lossy`) or does not run lossy passes: the user's, else
    /// `--min-cosine 0.99` for a lossy one (`-O compress`, `--int4`), none for a lossless one.
    pub fn for_lossy(self, lossy: bool) -> Gate {
        if self.is_set() || !lossy {
            self
        } else {
            Gate {
                min_cosine: Some(DEFAULT_COMPRESS_MIN_COSINE),
                max_rel_error: None,
            }
        }
    }

    /// The gate that allows `f` of this one's loss: `1 − cos` scaled by `f`, the relative error
    /// by `√f` (it is first order where `1 − cos` is second).
    pub fn share(&self, f: f64) -> Gate {
        Gate {
            min_cosine: self.min_cosine.map(|c| 1.0 - (1.0 - c) * f),
            max_rel_error: self.max_rel_error.map(|r| r * f.sqrt()),
        }
    }

    /// The first violation, if any, naming the output (NaN fails every bound).
    pub fn check(&self, fidelity: &[OutputFidelity]) -> Option<String> {
        for f in fidelity {
            if let Some(min) = self.min_cosine {
                if f.cosine.is_nan() || f.cosine < min {
                    return Some(format!(
                        "output '{}': cosine {:.6} < --min-cosine {min}",
                        f.name, f.cosine
                    ));
                }
            }
            if let Some(max) = self.max_rel_error {
                if f.rel_l2_error.is_nan() || f.rel_l2_error > max {
                    return Some(format!(
                        "output '{}': relative error {:.3e} > --max-rel-error {max}",
                        f.name, f.rel_l2_error
                    ));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fid(name: &str, cosine: f64, rel: f64) -> OutputFidelity {
        OutputFidelity {
            name: name.into(),
            max_abs_error: 0.0,
            rel_l2_error: rel,
            cosine,
            bitwise_equal: false,
        }
    }

    #[test]
    fn the_default_gate_is_decided_by_the_level() {
        assert_eq!(
            Gate::default().for_level(Level::Compress).min_cosine,
            Some(DEFAULT_COMPRESS_MIN_COSINE)
        );
        assert!(!Gate::default().for_level(Level::O1).is_set());
        let user = Gate {
            min_cosine: None,
            max_rel_error: Some(0.1),
        };
        assert_eq!(user.for_level(Level::Compress), user);
    }

    #[test]
    fn check_names_the_first_violation() {
        let g = Gate {
            min_cosine: Some(0.99),
            max_rel_error: Some(1e-3),
        };
        assert_eq!(g.check(&[fid("a", 1.0, 0.0)]), None);
        let e = g.check(&[fid("a", 1.0, 0.0), fid("b", 0.5, 0.0)]).unwrap();
        assert!(e.contains("'b'") && e.contains("--min-cosine"), "{e}");
        let e = g.check(&[fid("c", 1.0, 0.5)]).unwrap();
        assert!(e.contains("'c'") && e.contains("--max-rel-error"), "{e}");
        assert!(g.check(&[fid("n", f64::NAN, 0.0)]).is_some());
    }
}
