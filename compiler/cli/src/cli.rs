//! Command-line arguments, and the driver's options they fill.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use wcc_driver::{
    BackendChoice, DropSpec, EgraphLimits, ExecOptions, Gate, Level, OptimizeOptions,
    PipelineConfig, Provider,
};

#[derive(Parser, Debug)]
#[command(
    name = "wcc",
    version,
    about = "A compiler for trained ONNX models: rewrite, verify, write."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Rewrite a model with an optimization pipeline, verify it, and write it.
    Optimize(Box<OptimizeArgs>),
    /// Print the canonical text form of a model (stable, diff-friendly).
    Print { model: PathBuf },
    /// Summarize a model: ops, parameters and bytes by dtype, opsets, inputs and outputs.
    Inspect {
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Find the transformer structure (blocks, sublayers, projections, heads, RoPE, KV cache)
        /// of the model after -O1 cleanup, and say what was not found and why.
        #[arg(long)]
        structure: bool,
    },
    /// Run two models on the same inputs and compare their outputs.
    Verify {
        reference: PathBuf,
        candidate: PathBuf,
        #[command(flatten)]
        exec: ExecArgs,
        #[command(flatten)]
        gate: GateArgs,
    },
    /// Run a model and write its outputs to an .npz file.
    Run {
        model: PathBuf,
        #[command(flatten)]
        exec: ExecArgs,
        /// Where to write the outputs (.npz).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List the passes and the -O levels that include them.
    Passes,
    /// Measure a model's latency on a backend.
    Bench {
        model: PathBuf,
        #[command(flatten)]
        exec: ExecArgs,
        /// Timed runs.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Untimed warm-up runs.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// tract, or ONNX Runtime for a model with ONNX Runtime's contrib ops (com.microsoft).
    Auto,
    Tract,
    Ort,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Ep {
    Cpu,
    Cuda,
    Tensorrt,
}

/// How models are run (verification, gates, bench).
#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// Backend: tract (embedded), ort (ONNX Runtime), or auto: tract, unless the model uses
    /// ONNX Runtime's contrib ops (com.microsoft), which only ort runs.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendKind,
    /// Execution provider for --backend ort. Selecting cuda or tensorrt implies --backend ort.
    #[arg(long, value_enum, default_value = "cpu")]
    pub ep: Ep,
    /// ONNX Runtime shared library (else ORT_DYLIB_PATH, else Python's onnxruntime).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Inputs as an .npz file with one array per graph input (else seeded random inputs).
    #[arg(long)]
    pub inputs: Option<PathBuf>,
    /// Symbolic dims for random inputs, e.g. batch=8,seq=128.
    #[arg(long, value_parser = wcc_driver::exec::parse_dims)]
    pub dim: Option<HashMap<String, i64>>,
    /// Seed for random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Fidelity gates: failing one is exit 1 and no output.
#[derive(Args, Debug, Clone, Default)]
pub struct GateArgs {
    /// Every output's cosine similarity to the original must be at least this.
    #[arg(long)]
    pub min_cosine: Option<f64>,
    /// Every output's relative L2 error against the original must be at most this.
    #[arg(long)]
    pub max_rel_error: Option<f64>,
}

#[derive(Args, Debug)]
pub struct OptimizeArgs {
    pub model: PathBuf,
    /// Optimization level: 0 (round trip), 1 (lossless cleanup), compress (-O1, then sublayer
    /// dropping within a quarter of the fidelity gate and a per-weight plan of int8, int4 and VQ
    /// codebooks for the smallest model that keeps it on the calibration inputs; default gate
    /// --min-cosine 0.99).
    #[arg(short = 'O', default_value = "1", value_name = "0|1|compress")]
    pub level: Level,
    /// Drop sublayers scored on calibration data (LLM-Drop): attn:N, attn:25%, mlp:N, joint:N.
    /// With -O compress: what to search over and the most to drop.
    #[arg(long, value_name = "SPEC")]
    pub drop: Option<DropSpec>,
    /// Re-score after each dropped sublayer instead of scoring once.
    #[arg(long)]
    pub drop_iterative: bool,
    /// Weight-only 4-bit quantization of MatMul/Gemm weights and gathered tables (block-wise
    /// round-to-nearest, symmetric, emitted as ONNX Runtime's MatMulNBits and
    /// GatherBlockQuantized), after the level's passes; gated (default --min-cosine 0.99).
    #[arg(long, group = "int")]
    pub int4: bool,
    /// Weight-only 8-bit quantization, as --int4 does it with levels -128..127 (the --int4-*
    /// options apply to it too).
    #[arg(long, group = "int")]
    pub int8: bool,
    /// --int4/--int8's block size along the reduction axis (a power of two, 16 or more).
    #[arg(long, value_name = "N", default_value_t = 32, requires = "int", value_parser = block_size)]
    pub int4_block: usize,
    /// --int4 leaves the tables Gathers read (embeddings) in float: MatMul/Gemm weights only.
    #[arg(long, requires = "int")]
    pub int4_no_tables: bool,
    /// --int4's ONNX: dq (standard opset-21 DequantizeLinear of int4 weights, what TensorRT
    /// takes; tables stay float), nbits (ONNX Runtime's MatMulNBits and GatherBlockQuantized), or
    /// auto: dq where the model's opset is 21 or more, else nbits.
    #[arg(
        long,
        value_name = "auto|dq|nbits",
        default_value = "auto",
        requires = "int"
    )]
    pub int4_form: wcc_driver::IntForm,
    /// --int4's rounding: rtn (round to nearest) or gptq (GPTQ's error feedback, weighted by the
    /// calibration inputs: --calib, else --inputs, else seeded random batches).
    #[arg(long, value_name = "rtn|gptq", default_value = "rtn", requires = "int")]
    pub int4_method: wcc_driver::IntMethod,
    /// Vector quantization of MatMul/Gemm weights (VPTQ-style) at B bits per weight, indices,
    /// codebooks and norms counted: a codebook of 256 centroids per layer, each layer's vector
    /// length along the outputs (v weights per uint8 index) chosen between the two that bracket B
    /// so that the layers together meet it, the most faithful choice first; with --calib,
    /// Hessian-weighted k-means and GPTQ error feedback. Gated (default --min-cosine 0.99).
    #[arg(long, value_name = "B", conflicts_with = "int", value_parser = vq_bits)]
    pub vq_bits: Option<f64>,
    /// --vq-bits with a second (residual) codebook for what the first leaves: twice the index
    /// bits.
    #[arg(long, requires = "vq_bits")]
    pub vq_residual: bool,
    /// --vq-bits normalizing every input column (a scale and shift each) before fitting.
    #[arg(long, requires = "vq_bits")]
    pub vq_normalize: bool,
    /// --vq-bits coding this fraction of the input columns (the costliest) from their own eighth
    /// of the codebook (e.g. 0.01).
    #[arg(long, value_name = "FRACTION", requires = "vq_bits", value_parser = fraction)]
    pub vq_outliers: Option<f64>,
    /// --vq-bits also coding the tables Gathers read (embeddings), row by row, decoded by two
    /// Gathers (only the gathered rows are decoded).
    #[arg(long, requires = "vq_bits")]
    pub vq_tables: bool,
    /// --vq-bits' codebook size per layer (2 to 65536): 16 or fewer store 4-bit indices packed two
    /// to a byte (unpacked by BitShift and Concat), up to 256 a byte each, more two bytes each;
    /// the budget then picks vector lengths for those index bits.
    #[arg(long, value_name = "K", default_value_t = 256, requires = "vq_bits",
          value_parser = clap::value_parser!(u32).range(2..=65536))]
    pub vq_centroids: u32,
    /// Shared attention atoms (MASA): every block's Q, K, V and O projection (or fused QKV) as a
    /// combination of S matrix atoms shared by all the blocks, plus the blocks' mean. SPEC is
    /// `all:S` (or `S`) for every type, or per type `q:S,k:S,v:S,o:S,qkv:S`; S is a count or a
    /// fraction of the blocks (0.5). Gated (default --min-cosine 0.99).
    #[arg(long, value_name = "SPEC")]
    pub share_atoms: Option<wcc_driver::AtomSpec>,
    /// --share-atoms' per-block low-rank refinement of what the atoms leave, whitened by the
    /// calibration inputs (--calib, else random inputs): R for Q, O and QKV and ⌈R/2⌉ for K and
    /// V, or per type `q:R,k:R,…`; 0 (the default) for none.
    #[arg(long, value_name = "R", requires = "share_atoms")]
    pub share_refine_rank: Option<wcc_driver::RankSpec>,
    /// --share-atoms without the mean atom (the atoms then span the blocks' weights themselves,
    /// not their differences from the mean).
    #[arg(long, requires = "share_atoms")]
    pub share_no_mean: bool,
    /// --share-atoms in G runs of consecutive blocks, each with its own mean and S atoms (the
    /// split whose atoms leave the least of the weights): `G`, `all:G` or per type `q:G,o:G`.
    #[arg(long, value_name = "G", requires = "share_atoms")]
    pub share_groups: Option<wcc_driver::GroupSpec>,
    /// How --share-atoms' weights reach their projections: `synthesize` each block's weight
    /// from the atoms (ONNX Runtime folds it back at session start unless constant folding is
    /// off), `project` the input onto the atoms (no weight exists; S' times the multiply-adds),
    /// or `auto`: the fewer multiply-adds per call, counting the synthesis.
    #[arg(
        long,
        value_name = "FORM",
        default_value = "auto",
        requires = "share_atoms"
    )]
    pub share_emit: wcc_driver::ShareEmit,
    /// Where the result will run, which decides what it may contain: portable (standard ONNX;
    /// int4 as DequantizeLinear at opset 21, else MatMulNBits), ort-cpu and ort-cuda (ONNX
    /// Runtime's MatMulNBits/GatherBlockQuantized for int4/int8, fused 4-bit kernels on CUDA), or
    /// tensorrt (standard ONNX only: int4 as symmetric block DequantizeLinear, opset 21).
    /// --int4-form, when given, chooses instead.
    #[arg(
        long,
        value_name = "portable|ort-cpu|ort-cuda|tensorrt",
        default_value = "portable"
    )]
    pub target: wcc_driver::Target,
    /// With -O compress: plan the most faithful model whose tensors fit in this size (bytes:
    /// 20000000, 20MB, 19MiB; or a percentage of the input's tensors: 25%) instead of the smallest
    /// that keeps the gate; the gate is still checked (exit 1 when it fails).
    #[arg(long, value_name = "BYTES|P%")]
    pub target_size: Option<wcc_driver::planner::TargetSize>,
    /// Weights with fewer elements than this stay float (--int4, --int8, --vq-bits, -O compress).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 4096,
        alias = "int4-min-elements"
    )]
    pub quant_min_elements: u64,
    /// Quantize only the weights whose initializer name, or the name of a node that reads them,
    /// matches this glob (`*` any characters, `/` and `.` included), e.g.
    /// '/encoder/layer.*/intermediate/*'; repeatable (--int4, --int8, --vq-bits, -O compress).
    #[arg(long, value_name = "GLOB", value_parser = wcc_driver::NameFilter::pattern)]
    pub quant_include: Vec<String>,
    /// Leave in float the weights whose initializer name, or the name of a node that reads them,
    /// matches this glob, e.g. '*pooler*'; repeatable, and wins over --quant-include.
    #[arg(long, value_name = "GLOB", value_parser = wcc_driver::NameFilter::pattern)]
    pub quant_exclude: Vec<String>,
    /// The most memory, in GiB, the calibration statistics of --int4/--int8/--vq-bits may hold at
    /// once (K² values per layer input): past it they are gathered a group of weights at a time,
    /// each group on the model as the earlier ones left it (one calibration run per group).
    #[arg(long, value_name = "GIB", default_value_t = wcc_driver::optimize::DEFAULT_CALIB_MEMORY_GIB)]
    pub calib_memory: f64,
    /// Calibration inputs (.npz, one array per graph input); else --inputs, else seeded random.
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Output path (default: <input stem>.opt.onnx beside the input).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Run these passes (comma-separated, see `wcc passes`) instead of the level's pipeline.
    #[arg(long, value_delimiter = ',')]
    pub passes: Option<Vec<String>>,
    /// Write a JSON report (per-pass statistics, fidelity) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write tensors ≥ 1 KiB to <output>.data (automatic above 2 GB).
    #[arg(long)]
    pub external_data: bool,
    /// Print the graph after this pass (or `all`) to stderr.
    #[arg(long)]
    pub dump_after: Option<String>,
    /// Add opt-in passes to the level's pipeline (see `wcc passes`), e.g. fold-attention-scale.
    #[arg(long, value_delimiter = ',', value_name = "PASS")]
    pub enable: Vec<String>,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to merge into the
    /// model's weights first: LoRA, rsLoRA, DoRA, MiSS/Bone.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Extra rewrite rules for the algebra pass (egg pattern syntax, see README); repeatable.
    #[arg(long = "rules", value_name = "FILE")]
    pub rules: Vec<PathBuf>,
    /// E-graph limit: e-nodes.
    #[arg(long, default_value_t = 200_000)]
    pub egraph_node_limit: usize,
    /// E-graph limit: saturation iterations.
    #[arg(long, default_value_t = 12)]
    pub egraph_iter_limit: usize,
    /// E-graph limit: seconds of saturation per graph.
    #[arg(long, default_value = "10", value_parser = seconds, value_name = "S")]
    pub egraph_time_limit: std::time::Duration,
    /// Skip running original and result (no fidelity figures; not allowed with a gate).
    #[arg(long)]
    pub no_verify: bool,
    /// Run the original and the result whole, end to end, even for a lossless result (by
    /// default one is checked region by region on random inputs: each changed part of the graph
    /// beside the part of the original it replaces; gated runs and `--inputs` run whole).
    #[arg(long)]
    pub verify_whole: bool,
    /// Most memory verification may take, in GiB (about 3 times the weights it runs: those of
    /// the changed regions checked at once, or, run whole, the original's plus the result's
    /// changed ones); a model that needs more is written unverified, with a warning and
    /// `not_verified` in the report saying so.
    #[arg(long, value_name = "GIB", default_value_t = wcc_driver::optimize::DEFAULT_VERIFY_MEMORY_GIB)]
    pub verify_memory: f64,
    #[command(flatten)]
    pub exec: ExecArgs,
    #[command(flatten)]
    pub gate: GateArgs,
}

/// A number of bits per weight `--vq-bits` can meet.
fn vq_bits(s: &str) -> Result<f64, String> {
    let b: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    wcc_driver::VqOptions::for_bits(b)?;
    Ok(b)
}

/// A fraction in [0, 0.5].
fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=0.5).contains(&f) => Ok(f),
        _ => Err(format!("'{s}' is not a fraction from 0 to 0.5")),
    }
}

/// A power of two of 16 or more (what ONNX Runtime's MatMulNBits takes).
fn block_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(b) if b >= 16 && b.is_power_of_two() => Ok(b),
        _ => Err(format!("'{s}' is not a power of two of 16 or more")),
    }
}

/// A non-negative number of seconds.
fn seconds(s: &str) -> Result<std::time::Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    std::time::Duration::try_from_secs_f64(v).map_err(|_| format!("'{s}': not a duration"))
}

impl ExecArgs {
    pub fn options(&self) -> ExecOptions {
        ExecOptions {
            backend: match self.backend {
                BackendKind::Auto => BackendChoice::Auto,
                BackendKind::Tract => BackendChoice::Tract,
                BackendKind::Ort => BackendChoice::Ort,
            },
            provider: Some(match self.ep {
                Ep::Cpu => Provider::Cpu,
                Ep::Cuda => Provider::Cuda,
                Ep::Tensorrt => Provider::TensorRt,
            }),
            ort_lib: self.ort_lib.clone(),
            inputs: self.inputs.clone(),
            dims: self.dim.clone().unwrap_or_default(),
            seed: self.seed,
        }
    }
}

impl GateArgs {
    pub fn gate(&self) -> Gate {
        Gate {
            min_cosine: self.min_cosine,
            max_rel_error: self.max_rel_error,
        }
    }
}

impl OptimizeArgs {
    /// The driver's options (without `--dump-after`'s printer, which the caller adds).
    pub fn options(&self) -> OptimizeOptions {
        let scope = wcc_driver::Scope {
            min_elements: self.quant_min_elements,
            names: wcc_driver::NameFilter::new(&self.quant_include, &self.quant_exclude)
                .expect("patterns checked by clap"),
            ..Default::default()
        };
        OptimizeOptions {
            output: self.output.clone(),
            level: self.level,
            passes: self.passes.clone(),
            pipeline: PipelineConfig {
                adapter: self.adapter.clone(),
                enable: self.enable.clone(),
                rule_files: self.rules.clone(),
                egraph_limits: EgraphLimits {
                    nodes: self.egraph_node_limit,
                    iterations: self.egraph_iter_limit,
                    time: self.egraph_time_limit,
                },
            },
            drop: self.drop,
            drop_iterative: self.drop_iterative,
            int: (self.int4 || self.int8).then_some(wcc_driver::IntOptions {
                bits: if self.int8 {
                    wcc_driver::IntBits::Eight
                } else {
                    wcc_driver::IntBits::Four
                },
                block_size: self.int4_block,
                scope: wcc_driver::Scope {
                    tables: !self.int4_no_tables,
                    ..scope.clone()
                },
                form: self.int4_form,
                method: self.int4_method,
                ..Default::default()
            }),
            vq: self.vq_bits.map(|b| wcc_driver::VqOptions {
                residual: self.vq_residual,
                normalize: self.vq_normalize,
                outliers: self.vq_outliers.unwrap_or(0.0),
                centroids: self.vq_centroids as usize,
                scope: wcc_driver::Scope {
                    tables: self.vq_tables,
                    ..scope.clone()
                },
                ..wcc_driver::VqOptions::for_bits(b).expect("checked by clap")
            }),
            share: self
                .share_atoms
                .clone()
                .map(|atoms| wcc_driver::ShareOptions {
                    atoms,
                    mean: !self.share_no_mean,
                    refine: self.share_refine_rank.clone().unwrap_or_default(),
                    groups: self.share_groups.clone().unwrap_or_default(),
                    emit: self.share_emit,
                    ..Default::default()
                }),
            target: self.target,
            target_size: self.target_size,
            quant_scope: scope,
            calib_memory_bytes: (self.calib_memory.max(0.0) * (1u64 << 30) as f64) as u64,
            calib: self.calib.clone(),
            exec: self.exec.options(),
            gate: self.gate.gate(),
            verify: !self.no_verify,
            verify_memory_bytes: (self.verify_memory.max(0.0) * (1u64 << 30) as f64) as u64,
            verify_whole: self.verify_whole,
            external_data: self.external_data,
            ..OptimizeOptions::new(&self.model)
        }
    }
}
