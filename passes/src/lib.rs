//! wcc's rewrite passes, one module each, and the pipelines (`-O` levels) built from them.

pub mod adapter_merge;
pub mod algebra;
pub mod constant_fold;
pub mod conv_affine;
pub mod cse;
pub mod dce;
pub mod fuse_consecutive;
pub mod gptq;
pub mod graph_util;
pub mod kmeans;
pub mod layer_drop;
pub(crate) mod linear_weights;
/// What a weight pass reports of each weight it replaced.
pub use linear_weights::{Figures, GramSource, LayerProgress, NameFilter, Scope, Statistics};
pub mod miss_branch;
pub mod noop;
pub mod qk_fuse;
pub mod shared_atoms;
pub mod structure;
pub mod weight_int;
pub mod weight_vq;

use wcc_ir::pass::{Pass, PassManager, PassRecord};
use wcc_ir::{Model, Result};

/// An optimization level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptLevel {
    /// Import and re-emit.
    O0,
    /// Lossless cleanup.
    O1,
}

/// A pass and the `-O` levels that include it.
pub type Registered = (Box<dyn Pass>, &'static [OptLevel]);

/// What configures the passes: user rule files and the e-graph's limits.
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// Opt-in passes to add to the level's pipeline (`--enable`).
    pub enable: Vec<String>,
    /// A PEFT adapter directory to merge into the base weights first (`--adapter`).
    pub adapter: Option<std::path::PathBuf>,
    pub rule_files: Vec<std::path::PathBuf>,
    pub egraph_limits: wcc_egraph::Limits,
}

/// Every pass wcc has, with the levels that include it.
pub fn registry_with(opts: &PipelineOptions) -> std::result::Result<Vec<Registered>, String> {
    let files: Vec<&std::path::Path> = opts.rule_files.iter().map(|p| p.as_path()).collect();
    let mut algebra = algebra::Algebra::new(&files)?;
    algebra.limits = opts.egraph_limits.clone();
    let mut attention_scale = algebra::Algebra::with_attention_scale(&files)?;
    attention_scale.limits = opts.egraph_limits.clone();
    Ok(vec![
        (Box::new(noop::RemoveNoOps), &[OptLevel::O1]),
        (Box::new(constant_fold::ConstantFolding), &[OptLevel::O1]),
        (Box::new(conv_affine::ConvAffine), &[OptLevel::O1]),
        (Box::new(fuse_consecutive::FuseConsecutive), &[OptLevel::O1]),
        (Box::new(miss_branch::MissBranch), &[OptLevel::O1]),
        (Box::new(algebra), &[OptLevel::O1]),
        // Opt-in (`--enable`): in no level.
        (Box::new(attention_scale), &[]),
        (Box::new(qk_fuse::QkFuse), &[]),
        (
            Box::new(cse::CommonSubexpressionElimination),
            &[OptLevel::O1],
        ),
        (Box::new(dce::DeadCodeElimination), &[OptLevel::O1]),
    ])
}

/// The registry with default options.
pub fn registry() -> Vec<Registered> {
    registry_with(&PipelineOptions::default()).expect("the built-in rules parse")
}

/// The passes of one level, in pipeline order.
pub fn pipeline(level: OptLevel) -> Vec<Box<dyn Pass>> {
    pipeline_with(level, &PipelineOptions::default()).expect("the built-in rules parse")
}

pub fn pipeline_with(
    level: OptLevel,
    opts: &PipelineOptions,
) -> std::result::Result<Vec<Box<dyn Pass>>, String> {
    let mut passes: Vec<Box<dyn Pass>> = vec![];
    // The adapter is part of the model the user means: it is merged at every level, first.
    if let Some(dir) = &opts.adapter {
        passes.push(Box::new(adapter_merge::AdapterMerge { dir: dir.clone() }));
    }
    let registry = registry_with(opts)?;
    for name in &opts.enable {
        if !registry
            .iter()
            .any(|(p, l)| p.name() == name && l.is_empty())
        {
            let optin: Vec<&str> = registry
                .iter()
                .filter(|(_, l)| l.is_empty())
                .map(|(p, _)| p.name())
                .collect();
            return Err(format!(
                "--enable {name}: not an opt-in pass (opt-in: {})",
                optin.join(", ")
            ));
        }
    }
    passes.extend(
        registry
            .into_iter()
            .filter(|(p, l)| {
                (l.contains(&level) && level != OptLevel::O0)
                    || opts.enable.iter().any(|e| e == p.name())
            })
            .map(|(p, _)| p),
    );
    Ok(passes)
}

/// Passes by name (for `--passes a,b,c`); the error names the unknown pass.
pub fn by_names(
    names: &[&str],
    opts: &PipelineOptions,
) -> std::result::Result<Vec<Box<dyn Pass>>, String> {
    let mut all: Vec<Option<Box<dyn Pass>>> = registry_with(opts)?
        .into_iter()
        .map(|(p, _)| Some(p))
        .collect();
    names
        .iter()
        .map(|n| {
            all.iter_mut()
                .find(|p| p.as_ref().is_some_and(|p| p.name() == *n))
                .and_then(|p| p.take())
                .ok_or_else(|| format!("unknown pass '{n}' (see `wcc passes`)"))
        })
        .collect()
}

/// Runs a pipeline to its fixed point and leaves the graph sorted and validated: what
/// `wcc optimize` does between reading and writing.
pub fn optimize(model: &mut Model, passes: Vec<Box<dyn Pass>>) -> Result<Vec<PassRecord>> {
    optimize_with(model, PassManager::new(passes))
}

/// As `optimize`, with a configured manager (dumps between passes).
pub fn optimize_with(model: &mut Model, mut pm: PassManager) -> Result<Vec<PassRecord>> {
    let records = pm.run(model)?;
    wcc_ir::validate::topo_sort(&mut model.graph);
    wcc_ir::validate::validate(model)?;
    Ok(records)
}
