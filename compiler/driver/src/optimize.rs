//! `wcc optimize` as a function: read, run the level's pipeline, drop sublayers (`--drop`,
//! `-O compress`), verify the result against the original under the gate, write.

use std::path::{Path, PathBuf};
use std::time::Instant;

use wcc_ir::pass::PassManager;
use wcc_ir::stats::GraphStats;
use wcc_ir::{export, print, Model};

use crate::calib;
use crate::commands::load;
use crate::compress::{self, Plan};
use crate::error::Error;
use crate::exec::ExecOptions;
use crate::gate::Gate;
use crate::level::Level;
use crate::pipeline::{self, PipelineConfig};
use crate::render;
use crate::report::OptimizeReport;
use crate::verify::{run_and_compare, Failure, Verification};
use crate::DropSpec;

/// Receives (pass name, the graph's canonical text) after each pass `--dump-after` names.
pub type DumpFn = Box<dyn FnMut(&str, &str)>;

/// What `optimize` is doing (for a progress line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Reading,
    Optimizing,
    Calibrating,
    Verifying,
    Writing,
    /// `-O compress`'s planner, at this step.
    Planning(crate::planner::Step),
    /// A weight pass (`--int4`, `--vq-bits`…), `done` of `of` weights.
    Quantizing {
        pass: &'static str,
        done: usize,
        of: usize,
    },
}

impl Stage {
    /// How far along a stage that counts is: (done, of); for a progress bar.
    pub fn count(&self) -> Option<(usize, usize)> {
        match *self {
            Stage::Quantizing { done, of, .. }
            | Stage::Planning(crate::planner::Step::Sensitivity { done, of })
            | Stage::Planning(crate::planner::Step::Sharing { done, of })
            | Stage::Planning(crate::planner::Step::Trying { done, of, .. }) => Some((done, of)),
            _ => None,
        }
    }
}

/// Runs `work` on a scoped thread with a [`LayerProgress`] whose ticks reach `report` on this
/// thread as they come: how a weight pass (parallel inside) tells a caller's progress callback,
/// which need not be `Send`, how far it is.
///
/// [`LayerProgress`]: wcc_passes::LayerProgress
pub(crate) fn with_layer_progress<T: Send>(
    work: impl FnOnce(wcc_passes::LayerProgress) -> T + Send,
    report: &mut dyn FnMut(usize, usize),
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let tick = wcc_passes::LayerProgress::new(move |done, of| {
        let _ = tx.send((done, of));
    });
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            // The main thread's stack, for passes that recurse.
            .stack_size(8 << 20)
            .spawn_scoped(s, move || work(tick))
            .expect("a thread can be started");
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok((d, o)) => report(d, o),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !h.is_finished() => {}
                Err(_) => break,
            }
        }
        while let Ok((d, o)) = rx.try_recv() {
            report(d, o);
        }
        match h.join() {
            Ok(t) => t,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Reading => "reading",
            Stage::Optimizing => "optimizing",
            Stage::Calibrating => "calibrating",
            Stage::Verifying => "verifying",
            Stage::Writing => "writing",
            Stage::Planning(s) => return write!(f, "planning: {s}"),
            Stage::Quantizing { pass, .. } => return write!(f, "quantizing weights ({pass})"),
        })
    }
}

/// Everything `wcc optimize` takes.
pub struct OptimizeOptions {
    pub model: PathBuf,
    /// Default: `<input stem>.opt.onnx` beside the input.
    pub output: Option<PathBuf>,
    pub level: Level,
    /// Run these passes instead of the level's pipeline (`--passes`).
    pub passes: Option<Vec<String>>,
    pub pipeline: PipelineConfig,
    /// `--drop SPEC`: drop sublayers (with `-O compress`: what to search over, the most to drop).
    pub drop: Option<DropSpec>,
    /// Re-score after each dropped sublayer.
    pub drop_iterative: bool,
    /// `--int4`: weight-only 4-bit block-wise round-to-nearest of MatMul/Gemm weights, after the
    /// level's passes (and any sublayer dropping).
    pub int: Option<wcc_passes::weight_int::IntOptions>,
    /// `--vq-bits`: vector quantization of MatMul/Gemm weights with a codebook per layer.
    pub vq: Option<wcc_passes::weight_vq::VqOptions>,
    /// `--share-atoms`: attention projections as combinations of atoms shared across blocks.
    pub share: Option<wcc_passes::shared_atoms::ShareOptions>,
    /// `--target`: where the result will run (what it may contain).
    pub target: crate::Target,
    /// `--target-size`: `-O compress` plans the most faithful model within this size instead of
    /// the smallest within the gate.
    pub target_size: Option<crate::planner::TargetSize>,
    /// The weights `-O compress`'s planner may quantize: at least `min_elements`, let through by
    /// `names` (whether tables are among them is each treatment's to say).
    pub quant_scope: wcc_passes::Scope,
    /// The most bytes of calibration statistics `--int4`/`--vq-bits` hold at once
    /// (`--calib-memory`): past it they are gathered a group of weights at a time.
    pub calib_memory_bytes: u64,
    /// Calibration inputs (`--calib`); else `exec.inputs`, else seeded random batches.
    pub calib: Option<PathBuf>,
    pub exec: ExecOptions,
    /// The user's gate (`--min-cosine`, `--max-rel-error`); the level may add its default.
    pub gate: Gate,
    /// Run original and result and compare them (`--no-verify` turns it off).
    pub verify: bool,
    /// The most verification may hold (`--verify-memory`): see `verify_bytes`.
    pub verify_memory_bytes: u64,
    /// Run the original and the result whole even when regions could check a lossless result
    /// (`--verify-whole`).
    pub verify_whole: bool,
    /// Write tensors to a file beside the output (`--external-data`).
    pub external_data: bool,
    /// `--dump-after PASS|all`.
    pub dump_after: Option<(String, DumpFn)>,
}

impl OptimizeOptions {
    /// The defaults of `wcc optimize MODEL`: `-O1`, verified on the automatic backend.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        OptimizeOptions {
            model: model.into(),
            output: None,
            level: Level::O1,
            passes: None,
            pipeline: PipelineConfig::default(),
            drop: None,
            drop_iterative: false,
            int: None,
            vq: None,
            share: None,
            target: crate::Target::default(),
            target_size: None,
            quant_scope: wcc_passes::Scope::default(),
            calib_memory_bytes: (DEFAULT_CALIB_MEMORY_GIB * (1u64 << 30) as f64) as u64,
            calib: None,
            exec: ExecOptions::default(),
            gate: Gate::default(),
            verify: true,
            verify_memory_bytes: (DEFAULT_VERIFY_MEMORY_GIB * (1u64 << 30) as f64) as u64,
            verify_whole: false,
            external_data: false,
            dump_after: None,
        }
    }
}

/// `--calib-memory`'s default, in GiB.
pub const DEFAULT_CALIB_MEMORY_GIB: f64 = 2.0;

/// `--verify-memory`'s default, in GiB. A lossless result is checked region by region, a few
/// changed layers at a time within this (the 2.27 GB scale benchmark, whose every layer's weight
/// changes, verifies one layer at a time at 0.55-0.75 GB peak RSS); run whole (with a gate, given
/// inputs, or where regions cannot be used), models up to about 200 MB of weights fit. A
/// verification that does not fit is skipped with a warning saying so (an error with a gate),
/// instead of holding weights several times over.
pub const DEFAULT_VERIFY_MEMORY_GIB: f64 = 1.0;

/// How many times its weights a verification holds at its peak: the serialized model handed to
/// the backend, the backend's parsed copy, its tensors and the packed copies its matrix products
/// make, plus, run after run, what the allocator keeps for reuse (the `wcc` binary keeps freed
/// memory: see its `main`). Measured with tract: a 1.33 GB fp16 model run whole peaked at
/// 3.97 GB (before the backend freed the serialized model early); the 2.27 GB scale benchmark,
/// one region of 128 MB of weights at a time, at 0.55-0.75 GB.
const VERIFY_COPIES: u64 = 5;

/// How many times its weights a group of regions holds on `backend` at its peak, freed memory
/// the allocator keeps for the next group included. tract is handed the weights (no serialized
/// copy, each read straight into the tensor tract keeps): that tensor, the packed copy a matrix
/// product makes, and what the allocator keeps of the last group's for the next. Measured on
/// the 2.27 GB scale benchmark (two regions of 128 MB of weights in flight, the default 1 GiB
/// budget): 0.54-0.75 GB peak RSS. ONNX Runtime is handed the serialized model:
/// `VERIFY_COPIES`.
fn region_copies(backend: &wcc_runtime::Backend) -> u64 {
    match backend {
        wcc_runtime::Backend::Tract => 3,
        wcc_runtime::Backend::Ort { .. } => VERIFY_COPIES,
    }
}

/// What verifying `result` against `original` holds: `VERIFY_COPIES` times the original's
/// tensors and those of the result that are not the original's unchanged
/// (`verify::side_by_side` shares those). Activations at verification's small dims are left out.
pub fn verify_bytes(original: &Model, result: &Model) -> u64 {
    let orig = wcc_ir::export::tensor_bytes(original);
    let kept = crate::verify::kept_initializers(original, result);
    let changed: u64 = result
        .graph
        .initializers
        .iter()
        .filter(|t| !kept.contains(t.name()))
        .map(|t| t.byte_size())
        .sum();
    (orig + changed).saturating_mul(VERIFY_COPIES)
}

/// What `optimize` did: the report (also what `--report` writes) and the model it wrote.
pub struct Optimized {
    pub report: OptimizeReport,
    pub model: Model,
}

/// `<input stem>.opt.onnx` beside the input.
pub fn default_output(input: &Path) -> PathBuf {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    input.with_file_name(format!("{stem}.opt.onnx"))
}

/// Refuses an output path that is the input.
fn check_not_input(input: &Path, out: &Path) -> Result<(), Error> {
    if let (Ok(i), Some(parent)) = (input.canonicalize(), out.parent()) {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let (Ok(p), Some(f)) = (parent.canonicalize(), out.file_name()) {
            if p.join(f) == i {
                return Err(Error::Usage(format!(
                    "output {} is the input: refusing to overwrite it",
                    out.display()
                )));
            }
        }
    }
    Ok(())
}

/// What checking a result region by region came to.
enum RegionOutcome {
    Verified(Verification),
    NotVerified(String),
    /// Regions cannot say (why): run both models whole.
    Whole(String),
}

/// Checks `model` against `original` region by region (`regions`), within the verification
/// budget; `Whole` when the graphs cannot be compared so, or a region could not be run or
/// compared (running the models whole then says which side fails, or passes).
fn by_regions(
    opts: &OptimizeOptions,
    backend: &wcc_runtime::Backend,
    original: &Model,
    model: &Model,
) -> Result<RegionOutcome, Error> {
    let (inputs, described) = match opts.exec.inputs(original) {
        Ok(x) => x,
        Err(Error::Run(e)) => return Ok(RegionOutcome::Whole(e)),
        Err(e) => return Err(e),
    };
    let plan = match crate::regions::plan(original, model, &inputs) {
        Ok(p) => p,
        Err(e) => return Ok(RegionOutcome::Whole(e)),
    };
    let copies = region_copies(backend);
    let budget = opts.verify_memory_bytes / copies;
    match plan.check(backend, &inputs, budget, opts.exec.seed) {
        Ok((outputs, summary)) => Ok(RegionOutcome::Verified(Verification {
            backend: backend.label(),
            inputs: format!(
                "{described} for the graph inputs, region by region (random normal values at \
                 each changed region's boundary)"
            ),
            outputs,
            removed_outputs: vec![],
            gate_min_cosine: None,
            gate_max_rel_error: None,
            regions: Some(summary),
        })),
        Err(crate::regions::RegionError::OverBudget(bytes, anchor)) => {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            Ok(RegionOutcome::NotVerified(format!(
                "not verified: the result's outputs were not compared with the original's \
                 (the changed region that computes '{anchor}' and its original counterpart read \
                 {:.2} GiB of weights, \
                 held {copies} times by the backend: over the --verify-memory budget of \
                 {:.2} GiB); raise --verify-memory to verify",
                gib(bytes),
                gib(opts.verify_memory_bytes)
            )))
        }
        Err(crate::regions::RegionError::Run(e)) => Ok(RegionOutcome::Whole(format!(
            "a region could not be run: {e}"
        ))),
        Err(crate::regions::RegionError::Mismatch(e)) => Ok(RegionOutcome::Whole(format!(
            "a region's values could not be compared: {e}"
        ))),
    }
}

/// Runs `wcc optimize`. A failed gate or verification is `Error::Gate` (exit 1) and writes
/// nothing; bad input or usage is an error with exit code 2 and writes nothing.
pub fn optimize(
    mut opts: OptimizeOptions,
    progress: &mut dyn FnMut(Stage),
) -> Result<Optimized, Error> {
    if !opts.verify && opts.gate.is_set() {
        return Err(Error::Usage(
            "--no-verify cannot be combined with --min-cosine/--max-rel-error".into(),
        ));
    }
    // Weight quantization (`--int4`, `--vq-bits`): one of them, decided before any work.
    let quantize = match (&opts.int, &opts.vq) {
        (Some(_), Some(_)) => {
            return Err(Error::Usage(
                "--int4 and --vq-bits are two ways to quantize the same weights: give one".into(),
            ))
        }
        (Some(o), None) => Some(crate::quantize::Quantize::Int(
            wcc_passes::weight_int::IntOptions {
                form: opts.target.int_form(o.form).map_err(Error::Usage)?,
                ..o.clone()
            },
        )),
        (None, Some(o)) => Some(crate::quantize::Quantize::Vq(o.clone())),
        (None, None) => None,
    };
    let out_path = opts
        .output
        .clone()
        .unwrap_or_else(|| default_output(&opts.model));
    progress(Stage::Reading);
    let original = load(&opts.model)?;
    // The int form the target takes must exist at the model's opset (before any work).
    let int_form = match &quantize {
        Some(crate::quantize::Quantize::Int(o)) => Some(o.form),
        Some(_) => None,
        None => opts
            .level
            .lossy()
            .then_some(wcc_passes::weight_int::IntForm::Auto),
    };
    if let Some(f) = int_form {
        opts.target
            .int_form(f)
            .and_then(|f| f.resolve(original.default_opset()))
            .map_err(|e| Error::Usage(format!("--target {}: {e}", opts.target.label())))?;
    }
    // Refuse to write over the input before doing any work.
    check_not_input(&opts.model, &out_path)?;
    // Large tensors the passes make go to a scratch file beside the output (see wcc_ir::spill),
    // or in the temporary folder when the output's cannot take one; failing both, memory.
    let out_dir = match out_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if wcc_ir::spill::enable(&out_dir).is_err() {
        let _ = wcc_ir::spill::enable(&std::env::temp_dir());
    }
    // The output's large weights start going into its temporary file now, while the passes
    // run; what a pass changes is written again at the end (see `export::WriteAhead`).
    let ahead = export::WriteAhead::start(&original, &out_path, opts.external_data);
    let passes = pipeline::build(opts.level, opts.passes.as_deref(), &opts.pipeline)?;
    let mut pass_names: Vec<&'static str> = passes.iter().map(|p| p.name()).collect();
    let mut model = original.clone();
    let before = GraphStats::of(&model);
    let mut pm = PassManager::new(passes);
    if let Some((name, mut dump)) = opts.dump_after.take() {
        pm.dump_after = Some((
            name,
            Box::new(move |pass: &str, m: &Model| dump(pass, &print::print_model(m))),
        ));
    }
    progress(Stage::Optimizing);
    let t0 = Instant::now();
    let mut records = wcc_passes::optimize_with(&mut model, pm)?;
    // The gate the run works under: the user's, else the default of `-O compress` and of weight
    // quantization (an explicit `--drop` at -O1 is measured, not gated, unless the user gives a
    // gate).
    let gate = opts
        .gate
        .for_lossy(opts.level.lossy() || quantize.is_some() || opts.share.is_some());
    // Lossy: shared attention atoms (`--share-atoms`), first, on the -O1 result.
    if let Some(share) = &opts.share {
        pass_names.push(wcc_passes::shared_atoms::SharedAtoms::NAME);
        records.extend(crate::share::run(
            &mut model,
            share,
            opts.calib.as_deref(),
            &opts.exec,
            progress,
        )?);
    }
    let backend = opts.exec.backend_for(&original);
    // Lossy: sublayer dropping (`--drop`, `-O compress`), on the -O1 result; then, for
    // `-O compress` without `--int4`/`--vq-bits`, the planner's weight quantization.
    let mut layer_drop = None;
    let mut plan_report = None;
    let mut share_search = None;
    // A planned result calibrated on the user's inputs is verified on those held out from the
    // fit, unless `--inputs` are given (random inputs say little about a model of language).
    let mut verify_inputs: Option<(wcc_runtime::NamedArrays, String)> = None;
    let planned = opts.level.lossy() && quantize.is_none();
    if opts.target_size.is_some() && !planned {
        return Err(Error::Usage(
            "--target-size is -O compress's planner's: give it with -O compress and without \
             --int4/--int8/--vq-bits"
                .into(),
        ));
    }
    if opts.level.lossy() || opts.drop.is_some() {
        progress(Stage::Calibrating);
        let (batches, calibration) = calib::batches(&model, opts.calib.as_deref(), &opts.exec)?;
        // The planner fits on half the calibration inputs and judges on the other half.
        let split = calib::split(&batches);
        let references = if planned {
            crate::exec::run_each(&backend, &model, &split.judge, "plan the compression")?
        } else {
            vec![]
        };
        // Sublayer drops may use a quarter of the gate under the planner; the rest is the
        // weights'.
        let drop_gate = if planned { gate.share(0.25) } else { gate };
        let plan = Plan {
            spec: opts.drop,
            search: opts.level.lossy(),
            iterative: opts.drop_iterative,
            backend: &backend,
            batches: &batches,
            calibration: calibration.clone(),
            gate: drop_gate,
        };
        let dropped = compress::run(&mut model, &plan)?;
        if planned {
            let objective = match opts.target_size {
                Some(t) => crate::planner::Objective::Size(
                    t.bytes(wcc_ir::export::tensor_bytes(&original)),
                ),
                None => crate::planner::Objective::Smallest,
            };
            let inputs = crate::planner::PlanInputs {
                original: &original,
                exec: &opts.exec,
                fit: &split.fit,
                batches: &split.judge,
                calibration: format!("{calibration}, {}", split.how),
                gate,
                objective,
                scope: opts.quant_scope.clone(),
                int_form: opts
                    .target
                    .int_form(wcc_passes::weight_int::IntForm::Auto)
                    .map_err(Error::Usage)?,
                references: &references,
                removed: &dropped.removed_outputs,
            };
            // Shared atoms, unless the user chose them (`--share-atoms`): a quarter of the
            // gate at most, on what dropping left.
            if opts.share.is_none() {
                let (searched, shared) = crate::share::search(&mut model, &inputs, &mut |s| {
                    progress(Stage::Planning(s))
                })?;
                if !shared.is_empty() {
                    pass_names.push(wcc_passes::shared_atoms::SharedAtoms::NAME);
                    records.extend(shared);
                }
                share_search = Some(searched);
            }
            let planned =
                crate::planner::run(&mut model, &inputs, &mut |s| progress(Stage::Planning(s)))?;
            if opts.calib.is_some()
                && opts.exec.inputs.is_none()
                && planned.report.chosen_try.is_some()
            {
                if let Some(b) = split.judge.first() {
                    verify_inputs = Some((
                        b.clone(),
                        format!(
                            "the calibration inputs held out from the fit ({}; the planner chose \
                             on them too: give --inputs for an independent check)",
                            split.how
                        ),
                    ));
                }
            }
            pass_names.extend(planned.passes);
            records.extend(planned.records);
            plan_report = Some(planned.report);
        }
        layer_drop = Some(dropped);
    }
    // Lossy: weight quantization (`--int4`, `--vq-bits`), last, on what the passes and
    // dropping left; the result is checked where it will run (see `backend_for_result`).
    let mut backend = backend;
    if let Some(q) = &quantize {
        pass_names.push(q.name());
        records.extend(crate::quantize::run(
            &mut model,
            q,
            opts.calib.as_deref(),
            &opts.exec,
            opts.calib_memory_bytes,
            progress,
        )?);
    }
    if quantize.is_some() || plan_report.is_some() || opts.share.is_some() {
        backend = opts.exec.backend_for_result(&original, &model);
    }
    let pass_list = pass_names.join(",");
    // A lossy result is checked whole, end to end (regions check only exact rewrites).
    let lossy =
        layer_drop.is_some() || quantize.is_some() || plan_report.is_some() || opts.share.is_some();
    let optimize_ms = t0.elapsed().as_secs_f64() * 1e3;
    if !pass_list.is_empty() {
        model.set_metadata("wcc.version", crate::VERSION);
        model.set_metadata("wcc.passes", &pass_list);
    }
    let after = GraphStats::of(&model);
    let measured = |fid: Option<&[wcc_runtime::OutputFidelity]>| {
        render::table(&records, &before, &after, fid)
            + &render::lossy(
                layer_drop.as_ref(),
                share_search.as_ref(),
                plan_report.as_ref(),
            )
    };

    // Verification (run original and result on the same inputs) and writing go side by side:
    // the output is written to temporary files while the models run, and only put in place
    // once verification passed (dropped, the temporary files are deleted).
    let mut verify = || -> Result<(Option<Verification>, Option<String>), Error> {
        let mut verification = None;
        let mut not_verified = None;
        let wants_verify = opts.verify && (gate.is_set() || !pass_list.is_empty() || lossy);
        // A lossless result is checked region by region (see `regions`) on random inputs; a
        // gate is about the model's outputs, and inputs the user gives (`--inputs`) are to be
        // run, so gated results, given inputs and whatever regions cannot check run whole.
        let mut whole = wants_verify;
        let mut whole_because = None;
        if wants_verify
            && !gate.is_set()
            && !lossy
            && !opts.verify_whole
            && opts.exec.inputs.is_none()
        {
            progress(Stage::Verifying);
            match by_regions(&opts, &backend, &original, &model)? {
                RegionOutcome::Verified(v) => {
                    verification = Some(v);
                    whole = false;
                }
                RegionOutcome::NotVerified(why) => {
                    not_verified = Some(why);
                    whole = false;
                }
                RegionOutcome::Whole(why) => whole_because = Some(why),
            }
        }
        let need = if whole {
            verify_bytes(&original, &model)
        } else {
            0
        };
        if whole && need > opts.verify_memory_bytes {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            let why = format!(
                "verifying would take about {:.2} GiB (the original's weights and the result's \
                 changed ones, held {VERIFY_COPIES} times by the backend), over the --verify-memory \
                 budget of {:.2} GiB",
                gib(need),
                gib(opts.verify_memory_bytes)
            );
            if gate.is_set() {
                return Err(Error::Run(format!("cannot check the fidelity gate: {why}")));
            }
            not_verified = Some(format!(
                "not verified: the result's outputs were not compared with the original's ({why}); \
                 raise --verify-memory to verify"
            ));
        } else if whole {
            progress(Stage::Verifying);
            let removed = layer_drop
                .as_ref()
                .map(|r| r.removed_outputs.clone())
                .unwrap_or_default();
            let label = backend.label();
            let given = match &verify_inputs {
                Some(x) => Ok(x.clone()),
                None => opts.exec.inputs(&original),
            };
            let outcome = match given {
                Ok((inputs, described)) => {
                    run_and_compare(&backend, &original, &model, &inputs, &removed)
                        .map(|fid| (fid, described))
                }
                // Random inputs cannot be made for this model: it cannot be run without a file.
                Err(Error::Run(e)) => Err(Failure::OriginalCannotRun(e)),
                Err(e) => return Err(e),
            };
            match outcome {
                Ok((fid, mut inputs)) => {
                    if let Some(why) = &whole_because {
                        inputs = format!("{inputs}; run whole, not region by region ({why})");
                    }
                    if let Some(msg) = gate.check(&fid) {
                        return Err(Error::Gate {
                            message: format!("fidelity gate failed: {msg}; no output written"),
                            details: Some(measured(Some(&fid))),
                        });
                    }
                    verification = Some(Verification {
                        backend: label,
                        inputs,
                        outputs: fid,
                        removed_outputs: removed,
                        gate_min_cosine: gate.min_cosine,
                        gate_max_rel_error: gate.max_rel_error,
                        regions: None,
                    });
                }
                Err(Failure::OriginalCannotRun(e)) => {
                    let why = match opts.exec.auto_reason(&original) {
                        Some(r) => format!("{r}, and {label} cannot run it: {e}"),
                        None => format!("{label} cannot run the original model: {e}"),
                    };
                    if gate.is_set() {
                        return Err(Error::Run(format!("cannot check the fidelity gate: {why}")));
                    }
                    let hint = match backend {
                        wcc_runtime::Backend::Tract => "pass --backend ort",
                        wcc_runtime::Backend::Ort { .. } => {
                            "give ONNX Runtime's library (--ort-lib, ORT_DYLIB_PATH)"
                        }
                    };
                    not_verified = Some(format!(
                        "not verified: the result's outputs were not compared with the original's \
                         ({why}); {hint}, or --inputs FILE.npz with inputs the model takes"
                    ));
                }
                Err(Failure::ResultCannotRun(e)) => {
                    // A result only ONNX Runtime runs, checked on tract because its library
                    // was not found: say how to check it.
                    let hint = match backend {
                        wcc_runtime::Backend::Tract if crate::exec::needs_ort(&model) => {
                            " (the result holds 4-bit weights or ONNX Runtime ops: give ONNX \
                             Runtime's library with --ort-lib or ORT_DYLIB_PATH to verify it \
                             there)"
                        }
                        _ => "",
                    };
                    return Err(Error::Gate {
                        message: format!(
                            "verification failed: the result cannot be run by {label} while the \
                             original can: {e}{hint}; no output written"
                        ),
                        details: Some(measured(None)),
                    });
                }
                Err(Failure::Mismatch(e)) => {
                    return Err(Error::Gate {
                        message: format!("verification failed: {e}; no output written"),
                        details: Some(measured(None)),
                    })
                }
            }
        }
        Ok((verification, not_verified))
    };
    let save_opts = export::SaveOptions {
        external_data: opts.external_data,
        // What the passes wrote to the scratch file stays there: it becomes the output's data
        // file (when the output has one); later spills go to a fresh one.
        scratch: wcc_ir::spill::retire(),
    };
    let (staged, checked) = std::thread::scope(|s| {
        let writer = s.spawn(|| export::stage_with(&model, &out_path, &save_opts, ahead));
        let checked = verify();
        (writer.join(), checked)
    });
    let (verification, not_verified) = checked?;
    let staged =
        staged.map_err(|_| Error::Run("internal error: writing the output panicked".into()))??;

    progress(Stage::Writing);
    let summary = staged.commit()?;
    let report = OptimizeReport {
        target: opts.target,
        wcc_version: crate::VERSION,
        input: opts.model.clone(),
        output: out_path,
        level: opts.level.to_string(),
        passes: records,
        before,
        after,
        optimize_ms,
        verification,
        not_verified,
        layer_drop,
        share_search,
        plan: plan_report,
        output_bytes: summary.model_bytes,
        external_data_bytes: summary.external_bytes,
        external_data_in_place_bytes: summary.in_place_bytes,
        external_data_file: summary.external_file,
    };
    Ok(Optimized { report, model })
}
