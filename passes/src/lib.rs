//! wcc's rewrite passes, one module each, and the pipelines (`-O` levels) built from them.

pub mod constant_fold;
pub mod cse;
pub mod dce;
pub mod fuse_consecutive;
pub mod graph_util;
pub mod noop;

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

/// Every pass wcc has, with the levels that include it.
pub fn registry() -> Vec<(Box<dyn Pass>, &'static [OptLevel])> {
    vec![
        (Box::new(noop::RemoveNoOps), &[OptLevel::O1]),
        (Box::new(constant_fold::ConstantFolding), &[OptLevel::O1]),
        (Box::new(fuse_consecutive::FuseConsecutive), &[OptLevel::O1]),
        (
            Box::new(cse::CommonSubexpressionElimination),
            &[OptLevel::O1],
        ),
        (Box::new(dce::DeadCodeElimination), &[OptLevel::O1]),
    ]
}

/// The passes of one level, in pipeline order.
pub fn pipeline(level: OptLevel) -> Vec<Box<dyn Pass>> {
    registry()
        .into_iter()
        .filter(|(_, l)| l.contains(&level))
        .map(|(p, _)| p)
        .collect()
}

/// Passes by name (for `--passes a,b,c`); the error names the unknown pass.
pub fn by_names(names: &[&str]) -> std::result::Result<Vec<Box<dyn Pass>>, String> {
    names
        .iter()
        .map(|n| {
            registry()
                .into_iter()
                .map(|(p, _)| p)
                .find(|p| p.name() == *n)
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
