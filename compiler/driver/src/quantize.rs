//! Weight quantization, the last lossy step of `wcc optimize`: `--int4` (block-wise int4, RTN or
//! GPTQ) or `--vq-bits` (VPTQ-style codebooks). Gathers the calibration statistics a method needs
//! (`H = XᵀX` of every quantized layer's input, run on the backend), then runs the pass and DCE.

use std::path::Path;

use wcc_ir::pass::{Pass, PassManager, PassRecord};
use wcc_ir::Model;
use wcc_passes::weight_int::{IntMethod, IntOptions, WeightInt};
use wcc_passes::weight_vq::{VqOptions, WeightVq};
use wcc_passes::GramSource;

use crate::calib;
use crate::error::Error;
use crate::exec::ExecOptions;

/// Which weight quantization to run.
#[derive(Debug, Clone)]
pub enum Quantize {
    Int(IntOptions),
    Vq(VqOptions),
}

impl Quantize {
    /// The pass's name (for `wcc.passes`).
    pub fn name(&self) -> &'static str {
        match self {
            Quantize::Int(o) => WeightInt::name_for(o.bits),
            Quantize::Vq(_) => WeightVq::NAME,
        }
    }
}

/// Quantizes `model`'s weights. Calibration statistics are gathered when the method needs them
/// (GPTQ) or when the user gave calibration inputs (`calib_file`): every layer's output error
/// on them is then reported, and VQ weights its k-means and corrects its assignment with them.
/// They are gathered as the pass goes, in groups of weights whose statistics (`K²` values per
/// input) take at most `stats_bytes` (`--calib-memory`), each on the model as earlier groups
/// left it: one group, before anything changes, when they all fit.
pub fn run(
    model: &mut Model,
    q: &Quantize,
    calib_file: Option<&Path>,
    exec: &ExecOptions,
    stats_bytes: u64,
    progress: &mut dyn FnMut(crate::Stage),
) -> Result<Vec<PassRecord>, Error> {
    let wants = match q {
        Quantize::Int(o) => o.method == IntMethod::Gptq || calib_file.is_some(),
        Quantize::Vq(_) => calib_file.is_some(),
    };
    let mut stats = None;
    if wants {
        progress(crate::Stage::Calibrating);
        let (batches, calibration) = calib::batches(model, calib_file, exec)?;
        // Each group's statistics on the model as it is then, on the backend that runs what
        // the pass has made of it so far.
        let (before, exec) = (model.clone(), exec.clone());
        let source = GramSource::new(stats_bytes, move |m: &Model, names: &[String]| {
            let mut m = m.clone();
            wcc_ir::validate::topo_sort(&mut m.graph);
            let backend = exec.backend_for_result(&before, &m);
            calib::grams(&m, &backend, &batches, names).map_err(|e| e.to_string())
        });
        stats = Some((source, calibration));
    }
    let pass = q.name();
    let q = q.clone();
    // The pass runs on its own thread so that its progress reaches `progress` as it goes.
    let records = crate::optimize::with_layer_progress(
        move |tick| {
            let pass: Box<dyn Pass> = match q {
                Quantize::Int(mut o) => {
                    if let Some((g, c)) = stats {
                        o.stats.gram_source = Some(g);
                        o.stats.calibration = Some(c);
                    }
                    o.progress = tick;
                    Box::new(WeightInt { opts: o })
                }
                Quantize::Vq(mut o) => {
                    if let Some((g, c)) = stats {
                        o.stats.gram_source = Some(g);
                        o.stats.calibration = Some(c);
                    }
                    o.progress = tick;
                    Box::new(WeightVq { opts: o })
                }
            };
            let pm = PassManager::new(vec![pass, Box::new(wcc_passes::dce::DeadCodeElimination)]);
            wcc_passes::optimize_with(model, pm)
        },
        &mut |done, of| progress(crate::Stage::Quantizing { pass, done, of }),
    )?;
    Ok(records)
}
