//! The subcommands.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use serde::Serialize;
use wcc_ir::pass::{PassManager, PassRecord};
use wcc_ir::stats::GraphStats;
use wcc_ir::{export, import, print, validate, IrError, Model};
use wcc_passes::OptLevel;
use wcc_runtime::OutputFidelity;

use crate::cli::{Cli, Command, GateArgs, OptimizeArgs};
use crate::exec;

#[derive(Debug)]
pub enum CliError {
    /// Bad usage (exit 2).
    Usage(String),
    /// Bad input: unreadable or invalid model, bad inputs file (exit 2).
    Ir(IrError),
    Input(String),
    /// A model could not be run (exit 2).
    Run(String),
    /// A fidelity gate failed (exit 1).
    Gate(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(s) | CliError::Input(s) | CliError::Run(s) => f.write_str(s),
            CliError::Ir(e) => write!(f, "{e}"),
            CliError::Gate(s) => write!(f, "fidelity gate failed: {s}; no output written"),
        }
    }
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Gate(_) => 1,
            _ => 2,
        }
    }
}

impl From<IrError> for CliError {
    fn from(e: IrError) -> Self {
        CliError::Ir(e)
    }
}

pub fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Optimize(a) => optimize(*a),
        Command::Print { model } => {
            let m = load(&model)?;
            print!("{}", print::print_model(&m));
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            model,
            json,
            structure: true,
        } => {
            let mut m = load(&model)?;
            wcc_passes::optimize(&mut m, wcc_passes::pipeline(OptLevel::O1))?;
            let s = wcc_passes::structure::discover(&m);
            if json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap());
            } else {
                print!("{}", wcc_passes::structure::render(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            model,
            json,
            structure: false,
        } => {
            let m = load(&model)?;
            let r = crate::commands::inspect(&m);
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap());
            } else {
                print!("{}", inspect_text(&r));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            reference,
            candidate,
            exec: e,
            gate,
        } => {
            let a = load(&reference)?;
            let b = load(&candidate)?;
            let inputs = exec::inputs(&a, &e)?;
            let backend = exec::backend(&e);
            let fid = exec::compare(&backend, &a, &b, &inputs)?;
            println!("backend {}", backend.label());
            for f in &fid {
                println!(
                    "{}: max|Δ| {:.3e}  rel L2 {:.3e}  cosine {:.9}{}",
                    f.name,
                    f.max_abs_error,
                    f.rel_l2_error,
                    f.cosine,
                    if f.bitwise_equal {
                        "  bitwise equal"
                    } else {
                        ""
                    }
                );
            }
            match exec::gate_failure(&gate, &fid) {
                Some(msg) => Err(CliError::Gate(msg)),
                None => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Run {
            model,
            exec: e,
            output,
        } => {
            let m = load(&model)?;
            let inputs = exec::inputs(&m, &e)?;
            let bytes = export::to_bytes(&m)?;
            let outs = exec::backend(&e)
                .run(&bytes, &inputs)
                .map_err(|e| CliError::Run(e.to_string()))?;
            wcc_runtime::save_npz(&output, &outs).map_err(CliError::Input)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Passes => {
            println!("{:<22} {:<8} {:<6} description", "pass", "levels", "exact");
            for (p, levels) in wcc_passes::registry() {
                let mut l: Vec<String> = levels
                    .iter()
                    .map(|l| format!("{l:?}").replace('O', "-O"))
                    .collect();
                if l.is_empty() {
                    l.push("opt-in".into());
                }
                println!(
                    "{:<22} {:<8} {:<6} {}",
                    p.name(),
                    l.join(","),
                    if p.lossless() { "yes" } else { "no" },
                    p.description()
                );
            }
            println!("{:<22} {:<8} {:<6} adds a PEFT adapter directory into the base weights (--adapter DIR)", "adapter-merge", "any", "yes");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            model,
            exec: e,
            runs,
            warmup,
        } => {
            let m = load(&model)?;
            let inputs = exec::inputs(&m, &e)?;
            let bytes = export::to_bytes(&m)?;
            let backend = exec::backend(&e);
            let t0 = Instant::now();
            let mut prepared = backend
                .prepare(&bytes, &inputs)
                .map_err(|e| CliError::Run(e.to_string()))?;
            let load_ms = t0.elapsed().as_secs_f64() * 1e3;
            let lat = wcc_runtime::bench::measure(prepared.as_mut(), &inputs, warmup, runs)
                .map_err(|e| CliError::Run(e.to_string()))?;
            println!(
                "{} on {}: median {:.3} ms, min {:.3} ms, p90 {:.3} ms over {} runs (load {:.1} ms)",
                model.display(),
                backend.label(),
                lat.median_ms,
                lat.min_ms,
                lat.p90_ms,
                lat.runs,
                load_ms
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(path: &Path) -> Result<Model, CliError> {
    let m = import::load(path)?;
    validate::validate(&m)?;
    Ok(m)
}

#[derive(Serialize)]
struct Report {
    wcc_version: &'static str,
    input: PathBuf,
    output: PathBuf,
    level: String,
    passes: Vec<PassRecord>,
    before: GraphStats,
    after: GraphStats,
    optimize_ms: f64,
    verification: Option<Verification>,
    #[serde(skip_serializing_if = "Option::is_none")]
    layer_drop: Option<crate::compress::LayerDropReport>,
    output_bytes: u64,
    external_data_bytes: u64,
}

#[derive(Serialize)]
struct Verification {
    backend: String,
    outputs: Vec<OutputFidelity>,
    gate_min_cosine: Option<f64>,
    gate_max_rel_error: Option<f64>,
}

fn progress(msg: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K[wcc] {msg}…");
    }
}

fn progress_done() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

fn default_output(input: &Path) -> PathBuf {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    input.with_file_name(format!("{stem}.opt.onnx"))
}

fn optimize(a: OptimizeArgs) -> Result<ExitCode, CliError> {
    let gate_set = exec::gate_set(&a.gate);
    if a.no_verify && gate_set {
        return Err(CliError::Usage(
            "--no-verify cannot be combined with --min-cosine/--max-rel-error".into(),
        ));
    }
    let out_path = a.output.clone().unwrap_or_else(|| default_output(&a.model));
    progress("reading");
    let original = load(&a.model)?;
    // Refuse to write over the input before doing any work.
    if let (Ok(i), Some(parent)) = (a.model.canonicalize(), out_path.parent()) {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if let (Ok(p), Some(f)) = (parent.canonicalize(), out_path.file_name()) {
            if p.join(f) == i {
                return Err(CliError::Usage(format!(
                    "output {} is the input: refusing to overwrite it",
                    out_path.display()
                )));
            }
        }
    }
    let level = match a.level.as_str() {
        "0" => OptLevel::O0,
        _ => OptLevel::O1,
    };
    let opts = wcc_passes::PipelineOptions {
        adapter: a.adapter.clone(),
        enable: a.enable.clone(),
        rule_files: a.rules.clone(),
        egraph_limits: wcc_egraph::Limits {
            nodes: a.egraph_node_limit,
            iterations: a.egraph_iter_limit,
            time: std::time::Duration::from_secs_f64(a.egraph_time_limit),
        },
    };
    let passes = match &a.passes {
        Some(names) => {
            wcc_passes::by_names(&names.iter().map(String::as_str).collect::<Vec<_>>(), &opts)
                .map_err(CliError::Usage)?
        }
        None => wcc_passes::pipeline_with(level, &opts).map_err(CliError::Usage)?,
    };
    let pass_names: Vec<&str> = passes.iter().map(|p| p.name()).collect();
    let pass_list = pass_names.join(",");
    let mut model = original.clone();
    let before = GraphStats::of(&model);
    let mut pm = PassManager::new(passes);
    if let Some(d) = &a.dump_after {
        pm.dump_after = Some((
            d.clone(),
            Box::new(|name: &str, m: &Model| {
                eprintln!("--- after {name} ---\n{}", print::print_model(m))
            }),
        ));
    }
    progress("optimizing");
    let t0 = Instant::now();
    let records = wcc_passes::optimize_with(&mut model, pm)?;
    // Lossy: sublayer dropping (`--drop`, `-O compress`), on the -O1 result.
    let compress = a.level == "compress";
    let mut layer_drop = None;
    if compress || a.drop.is_some() {
        progress("calibrating");
        let r = crate::compress::run(&a, &mut model, compress)?;
        layer_drop = Some(r);
    }
    let gate = if compress && !gate_set && !a.no_verify {
        GateArgs {
            min_cosine: Some(crate::compress::DEFAULT_MIN_COSINE),
            max_rel_error: None,
        }
    } else {
        a.gate.clone()
    };
    let gate_set = exec::gate_set(&gate);
    let optimize_ms = t0.elapsed().as_secs_f64() * 1e3;
    if !pass_list.is_empty() {
        model.set_metadata("wcc.version", env!("CARGO_PKG_VERSION"));
        model.set_metadata("wcc.passes", &pass_list);
    }
    let after = GraphStats::of(&model);

    // Verification: run original and result on the same inputs.
    let mut verification = None;
    if !a.no_verify && (gate_set || !pass_list.is_empty()) {
        progress("verifying");
        let backend = exec::backend(&a.exec);
        let result = exec::inputs(&original, &a.exec)
            .and_then(|inputs| exec::compare(&backend, &original, &model, &inputs));
        match result {
            Ok(fid) => {
                if let Some(msg) = exec::gate_failure(&gate, &fid) {
                    progress_done();
                    eprint!(
                        "{}",
                        crate::table::summary(&records, &before, &after, Some(&fid))
                    );
                    if let Some(r) = &layer_drop {
                        eprint!("{}", crate::compress::summary(r));
                    }
                    return Err(CliError::Gate(msg));
                }
                verification = Some(Verification {
                    backend: backend.label(),
                    outputs: fid,
                    gate_min_cosine: gate.min_cosine,
                    gate_max_rel_error: gate.max_rel_error,
                });
            }
            Err(e) if gate_set => {
                return Err(CliError::Run(format!(
                    "cannot check the fidelity gate: {e}"
                )))
            }
            Err(e) => {
                progress_done();
                eprintln!("warning: not verified ({e}); pass --backend ort or --inputs to verify");
            }
        }
    }

    progress("writing");
    let summary = export::save(
        &model,
        &out_path,
        &export::SaveOptions {
            external_data: a.external_data,
        },
    )?;
    progress_done();
    eprint!(
        "{}",
        crate::table::summary(
            &records,
            &before,
            &after,
            verification.as_ref().map(|v| v.outputs.as_slice())
        )
    );
    if let Some(r) = &layer_drop {
        eprint!("{}", crate::compress::summary(r));
    }
    eprintln!(
        "wrote {} ({} bytes{})",
        out_path.display(),
        summary.model_bytes,
        match &summary.external_file {
            Some(f) => format!(
                ", external data {} bytes in {}",
                summary.external_bytes,
                f.display()
            ),
            None => String::new(),
        }
    );
    if let Some(rp) = &a.report {
        let report = Report {
            wcc_version: env!("CARGO_PKG_VERSION"),
            input: a.model.clone(),
            output: out_path.clone(),
            level: format!("-O{}", a.level),
            passes: records,
            before,
            after,
            optimize_ms,
            verification,
            layer_drop,
            output_bytes: summary.model_bytes,
            external_data_bytes: summary.external_bytes,
        };
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Usage(e.to_string()))?;
        std::fs::write(rp, text + "\n")
            .map_err(|e| CliError::Input(format!("cannot write report {}: {e}", rp.display())))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
pub struct InspectReport {
    ir_version: i64,
    opsets: Vec<(String, i64)>,
    producer: String,
    inputs: Vec<(String, String)>,
    outputs: Vec<(String, String)>,
    stats: GraphStats,
    functions: usize,
    external_tensors: usize,
}

pub fn inspect(m: &Model) -> InspectReport {
    let ty = |v: &wcc_ir::ValueInfo| match v.tensor_type() {
        Some(t) => format!(
            "{}[{}]",
            t.dtype.map(|d| d.name()).unwrap_or("?"),
            t.shape
                .as_ref()
                .map(|s| s
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or("..".into())
        ),
        None => "<non-tensor>".into(),
    };
    InspectReport {
        ir_version: m.ir_version,
        opsets: m
            .opset_imports
            .iter()
            .map(|(d, v)| {
                (
                    if d.is_empty() {
                        "ai.onnx".into()
                    } else {
                        d.clone()
                    },
                    *v,
                )
            })
            .collect(),
        producer: format!("{} {}", m.rest.producer_name, m.rest.producer_version)
            .trim()
            .to_string(),
        inputs: m
            .graph
            .inputs
            .iter()
            .map(|v| (v.name.clone(), ty(v)))
            .collect(),
        outputs: m
            .graph
            .outputs
            .iter()
            .map(|v| (v.name.clone(), ty(v)))
            .collect(),
        stats: GraphStats::of(m),
        functions: m.functions.len(),
        external_tensors: m
            .graph
            .initializers
            .iter()
            .filter(|t| t.is_external())
            .count(),
    }
}

fn inspect_text(r: &InspectReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "ir_version {}  producer {}", r.ir_version, r.producer);
    let _ = writeln!(
        s,
        "opsets {}",
        r.opsets
            .iter()
            .map(|(d, v)| format!("{d}:{v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (n, t) in &r.inputs {
        let _ = writeln!(s, "input  {n}: {t}");
    }
    for (n, t) in &r.outputs {
        let _ = writeln!(s, "output {n}: {t}");
    }
    let _ = writeln!(
        s,
        "nodes {}  initializers {}  parameters {}  bytes {}  functions {}  external tensors {}",
        r.stats.nodes,
        r.stats.initializers,
        r.stats.parameters,
        r.stats.bytes,
        r.functions,
        r.external_tensors
    );
    for (d, b) in &r.stats.bytes_by_dtype {
        let _ = writeln!(s, "bytes {d}: {b}");
    }
    let mut ops: Vec<(&String, &usize)> = r.stats.nodes_by_op.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, c) in ops {
        let _ = writeln!(s, "op {op}: {c}");
    }
    s
}
