//! Optimization levels: `-O0` (round trip), `-O1` (lossless cleanup and algebra) and
//! `-O compress` (`-O1`, then lossy sublayer dropping searched under the fidelity gate).

use wcc_passes::OptLevel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Level {
    /// Import and re-emit, nothing else.
    O0,
    /// Lossless cleanup and algebra.
    #[default]
    O1,
    /// `-O1`, then the lossy passes, each backed off until the fidelity gate holds.
    Compress,
}

impl Level {
    /// The passes' own level: the lossless pipeline this level runs first.
    pub fn passes_level(self) -> OptLevel {
        match self {
            Level::O0 => OptLevel::O0,
            Level::O1 | Level::Compress => OptLevel::O1,
        }
    }

    /// Whether the level runs lossy passes (which need a gate).
    pub fn lossy(self) -> bool {
        self == Level::Compress
    }
}

impl std::str::FromStr for Level {
    type Err = String;
    /// `0`, `1`, `compress` (as in `-O0`, `-O1`, `-O compress`), with or without the `-O`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let s = s
            .strip_prefix("-O")
            .or_else(|| s.strip_prefix('O'))
            .unwrap_or(s)
            .trim();
        match s {
            "0" => Ok(Level::O0),
            "1" => Ok(Level::O1),
            "compress" => Ok(Level::Compress),
            _ => Err(format!(
                "unknown optimization level '{s}' (-O0, -O1 or -O compress)"
            )),
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Level::O0 => "-O0",
            Level::O1 => "-O1",
            Level::Compress => "-O compress",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_print() {
        for (s, l) in [
            ("0", Level::O0),
            ("1", Level::O1),
            ("compress", Level::Compress),
            ("-O1", Level::O1),
            ("-O compress", Level::Compress),
        ] {
            assert_eq!(s.parse::<Level>().unwrap(), l);
            assert_eq!(l.to_string().parse::<Level>().unwrap(), l);
        }
        assert!("9".parse::<Level>().unwrap_err().contains("-O compress"));
        assert_eq!(Level::Compress.passes_level(), OptLevel::O1);
    }
}
