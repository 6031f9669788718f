//! The pipeline a level (or `--passes`) runs, configured by the user's options; the list of passes
//! for `wcc passes`. Built on `wcc_passes::pipeline_with`, whose `OptLevel` stays the passes' own
//! notion of a level.

use std::path::PathBuf;

use wcc_ir::pass::Pass;
use wcc_passes::PipelineOptions;

use crate::error::Error;
use crate::level::Level;

/// The e-graph's limits on e-nodes, iterations and time.
pub use wcc_egraph::Limits as EgraphLimits;

/// What configures the passes.
#[derive(Debug, Clone, Default)]
pub struct PipelineConfig {
    /// A PEFT adapter directory to merge into the base weights first (`--adapter`).
    pub adapter: Option<PathBuf>,
    /// Opt-in passes added to the level's pipeline (`--enable`).
    pub enable: Vec<String>,
    /// Extra rule files for the algebra pass (`--rules`).
    pub rule_files: Vec<PathBuf>,
    pub egraph_limits: EgraphLimits,
}

impl PipelineConfig {
    fn options(&self) -> PipelineOptions {
        PipelineOptions {
            adapter: self.adapter.clone(),
            enable: self.enable.clone(),
            rule_files: self.rule_files.clone(),
            egraph_limits: self.egraph_limits.clone(),
        }
    }
}

/// The passes to run: those named (`--passes a,b,c`), else the level's pipeline.
pub fn build(
    level: Level,
    names: Option<&[String]>,
    config: &PipelineConfig,
) -> Result<Vec<Box<dyn Pass>>, Error> {
    let opts = config.options();
    match names {
        Some(names) => {
            wcc_passes::by_names(&names.iter().map(String::as_str).collect::<Vec<_>>(), &opts)
        }
        None => wcc_passes::pipeline_with(level.passes_level(), &opts),
    }
    .map_err(Error::Usage)
}

/// One line of `wcc passes`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PassInfo {
    pub name: String,
    /// The levels that include it (`-O1`); empty for opt-in passes (`--enable`).
    pub levels: Vec<String>,
    pub lossless: bool,
    pub description: String,
}

/// Every pass, with the levels that include it; the adapter merge (`--adapter`) last.
pub fn list() -> Vec<PassInfo> {
    let mut v: Vec<PassInfo> = wcc_passes::registry()
        .into_iter()
        .map(|(p, levels)| PassInfo {
            name: p.name().to_string(),
            levels: levels
                .iter()
                .map(|l| match l {
                    wcc_passes::OptLevel::O0 => Level::O0.to_string(),
                    wcc_passes::OptLevel::O1 => Level::O1.to_string(),
                })
                .collect(),
            lossless: p.lossless(),
            description: p.description().to_string(),
        })
        .collect();
    v.push(PassInfo {
        name: "adapter-merge".into(),
        levels: vec!["any".into()],
        lossless: true,
        description: "adds a PEFT adapter directory into the base weights (--adapter DIR)".into(),
    });
    v
}
