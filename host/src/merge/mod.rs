//! `host merge CONFIG.yml OUT_DIR`: mergekit-style offline merges of model
//! folders, one tensor at a time, on merge-core or on a GPU cross-checked
//! against it.
//!
//! The run: read the YAML ([`config`]); open every model's safetensors headers
//! ([`stream`]) and check that all models hold the same tensors with the same
//! shapes; resolve every tensor's parameters and validate them with merge-core
//! before anything is written; then, in a staging folder beside `OUT_DIR`, write
//! each shard's header and stream the merged tensors into it, copy the tokenizer
//! source's config and tokenizer files, and rename the staging folder to
//! `OUT_DIR` only when everything succeeded. A failure leaves `OUT_DIR` as it was.

pub mod config;
pub mod stream;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use merge_core::dtype::{Dst, Dtype, Src};
use merge_core::offline::{self, Gta, GtaPlan, ModelParams, Sparsify};
use merge_core::topk::Threshold;

use crate::cli::args::BackendChoice;
use crate::hf::CONFIG_FILE;
use crate::params::LayoutDifference;
use crate::model_folder::{CARRIED_FILES, parse_size, with_dtype};
use config::{MergeConfig, Method, TokenizerSource, Value};
use stream::{Elements, ModelFiles, OutTensor, ShardWriter};

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// mergekit YAML: merge_method, base_model, models (with parameters), parameters, dtype, out_dtype, tokenizer_source.
    pub config: PathBuf,
    /// The output model folder; must not exist yet, or be empty.
    pub out_dir: PathBuf,
    /// Seed of the DARE masks (dare_linear, dare_ties); masks depend on the seed, the tensor's name and the element index only.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the arithmetic runs: auto (a hardware GPU if one works, else merge-core), gpu, or cpu.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// With a GPU: recompute every N-th tensor on merge-core and require identical bits (0: never).
    #[arg(long, default_value_t = 1)]
    pub cross_check_every: u64,
    /// Threads merging each tensor's pieces on the CPU (default: every core); the bits do not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Largest shard file, as transformers writes them (e.g. 5GB, 500MB, 2GiB, or bytes).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
}

/// Everything `merge` refuses, with the file, line, model or tensor it concerns.
#[derive(Debug)]
pub enum MergeError {
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    /// The YAML: its file and line.
    Config { file: PathBuf, line: usize, reason: String },
    /// A model folder as a whole.
    Model { dir: PathBuf, reason: String },
    Safetensors { file: PathBuf, reason: String },
    Tensor { file: PathBuf, tensor: String, reason: String },
    /// Models that must agree on a tensor do not.
    Mismatch { reference: String, other: String, difference: LayoutDifference },
    /// merge-core refused a value or hyperparameter; `inputs` says which model is
    /// "model i" in its message.
    Core { error: Box<merge_core::Error>, inputs: String },
    Gpu(String),
    /// The GPU result differs from merge-core's.
    CrossCheck { tensor: String, index: usize, gpu: u32, cpu: u32 },
    Usage(String),
}

impl MergeError {
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> MergeError {
        MergeError::Io { action, path: path.to_path_buf(), source }
    }
}

impl fmt::Display for MergeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MergeError::Io { action, path, source } => write!(f, "{action} {}: {source}", path.display()),
            MergeError::Config { file, line, reason } => write!(f, "{}:{line}: {reason}", file.display()),
            MergeError::Model { dir, reason } => write!(f, "model {}: {reason}", dir.display()),
            MergeError::Safetensors { file, reason } => write!(f, "{}: {reason}", file.display()),
            MergeError::Tensor { file, tensor, reason } => write!(f, "{}: tensor `{tensor}`: {reason}", file.display()),
            MergeError::Mismatch { reference, other, difference } => f.write_str(&difference.describe(reference, other)),
            MergeError::Core { error, inputs } => write!(f, "{error} ({inputs})"),
            MergeError::Gpu(e) => write!(f, "--backend gpu: {e}"),
            MergeError::CrossCheck { tensor, index, gpu, cpu } => write!(
                f,
                "tensor `{tensor}`: the GPU merge differs from merge-core at element {index} (bits {gpu:#010x} vs {cpu:#010x})"
            ),
            MergeError::Usage(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for MergeError {}

/// The role each model folder plays in the arithmetic.
struct Inputs {
    /// Folders in argument order of the arithmetic: for task-vector methods and
    /// slerp the base first, then the others; for linear the listed models.
    files: Vec<ModelFiles>,
    /// `models` index of each entry of `files` (None: the base, unlisted).
    entry: Vec<Option<usize>>,
    /// Whether `files[0]` is the base model.
    has_base: bool,
    /// Which `files` entry is the tokenizer source.
    tokenizer_source: usize,
}

impl Inputs {
    fn open(cfg: &MergeConfig) -> Result<Inputs, MergeError> {
        let mut files = Vec::new();
        let mut entry = Vec::new();
        let has_base = cfg.method != Method::Linear;
        if has_base {
            let base = cfg.base_model.as_ref().expect("MergeConfig::parse requires base_model for this method");
            files.push(ModelFiles::open(base)?);
            entry.push(cfg.models.iter().position(|m| &m.path == base));
        }
        for (i, m) in cfg.models.iter().enumerate() {
            if has_base && Some(i) == entry[0] {
                continue;
            }
            files.push(ModelFiles::open(&m.path)?);
            entry.push(Some(i));
        }
        let tokenizer_source = match cfg.tokenizer_source {
            TokenizerSource::Base => 0,
            TokenizerSource::Model(i) => entry.iter().position(|&e| e == Some(i)).unwrap_or(0),
        };
        Ok(Inputs { files, entry, has_base, tokenizer_source })
    }

    /// "model 0 = path, …": the legend for merge-core's numbered inputs.
    fn legend(&self) -> String {
        let start = usize::from(self.has_base);
        let mut parts = Vec::new();
        if self.has_base {
            parts.push(format!("base = {}", self.files[0].dir.display()));
        }
        for (i, f) in self.files[start..].iter().enumerate() {
            parts.push(format!("model {i} = {}", f.dir.display()));
        }
        parts.join(", ")
    }

    /// Every model holds exactly the reference model's tensors with its shapes.
    fn check_layout(&self) -> Result<(), MergeError> {
        let reference = &self.files[0];
        fn layout(f: &ModelFiles) -> impl Iterator<Item = (&str, Vec<usize>)> {
            f.tensors.iter().map(|(name, e)| (name.as_str(), e.shape.clone()))
        }
        for other in &self.files[1..] {
            if let Some(difference) = crate::params::layout_difference(layout(reference), layout(other)) {
                let (reference, other) = (reference.dir.display().to_string(), other.dir.display().to_string());
                return Err(MergeError::Mismatch { reference, other, difference });
            }
        }
        Ok(())
    }
}

/// Where a tensor sits among the layers for gradient parameters: mergekit's `t`,
/// `layer / (layers − 1)` inside `model.layers.N.`, 0 for every other tensor.
pub fn layer_t(name: &str, layers: usize) -> f64 {
    let Some(rest) = name.strip_prefix("model.layers.") else { return 0.0 };
    let Some(index) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) else { return 0.0 };
    if layers <= 1 { 0.0 } else { index as f64 / (layers - 1) as f64 }
}

/// One tensor's merge, every parameter resolved.
#[derive(Clone, Debug)]
enum TensorPlan {
    Linear { weights: Vec<f64>, normalize: bool },
    Gta { config: Gta, params: Vec<ModelParams> },
    Slerp { t: f64 },
}

fn number(cfg: &MergeConfig, name: &str, model: Option<usize>, tensor: &str, t: f64) -> Result<Option<f64>, MergeError> {
    match cfg.parameter(name, model, tensor, t) {
        None => Ok(None),
        Some(Value::Number(v)) => Ok(Some(v)),
        Some(Value::Bool(_)) => Err(MergeError::Usage(format!(
            "{}: parameter `{name}` for tensor `{tensor}` is a boolean; it must be a number",
            cfg.file.display()
        ))),
    }
}

fn flag(cfg: &MergeConfig, name: &str, tensor: &str, t: f64, default: bool) -> Result<bool, MergeError> {
    match cfg.parameter(name, None, tensor, t) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(b),
        // mergekit reads these through Python truthiness; 0 and 1 are the numbers people write.
        Some(Value::Number(v)) if v == 0.0 || v == 1.0 => Ok(v == 1.0),
        Some(Value::Number(v)) => Err(MergeError::Usage(format!(
            "{}: parameter `{name}` for tensor `{tensor}` is {v}; it must be true or false",
            cfg.file.display()
        ))),
    }
}

fn plan_tensor(cfg: &MergeConfig, inputs: &Inputs, tensor: &str, t: f64) -> Result<TensorPlan, MergeError> {
    let missing = |what: &str, model: &Path| {
        MergeError::Usage(format!(
            "{}: no `{what}` for model {} at tensor `{tensor}` (set it in the model's `parameters` or the global ones)",
            cfg.file.display(),
            model.display()
        ))
    };
    match cfg.method {
        Method::Linear => {
            let mut weights = Vec::new();
            for (f, e) in inputs.files.iter().zip(&inputs.entry) {
                weights.push(number(cfg, "weight", *e, tensor, t)?.ok_or_else(|| missing("weight", &f.dir))?);
            }
            Ok(TensorPlan::Linear { weights, normalize: flag(cfg, "normalize", tensor, t, true)? })
        }
        Method::Slerp => {
            let t_param = number(cfg, "t", None, tensor, t)?.ok_or_else(|| {
                MergeError::Usage(format!("{}: slerp needs the parameter `t` (none applies to tensor `{tensor}`)", cfg.file.display()))
            })?;
            Ok(TensorPlan::Slerp { t: t_param })
        }
        method => {
            // merge-core's presets carry mergekit's `normalize` defaults.
            let preset = match method {
                Method::TaskArithmetic => Gta::TASK_ARITHMETIC,
                Method::Ties => Gta::TIES,
                Method::DareLinear => Gta::DARE_LINEAR,
                _ => Gta::DARE_TIES,
            };
            let sparsify = preset.sparsify;
            // mergekit 0.1.5 rescales DARE's kept values to the task vector's L1
            // norm by default; merge-core multiplies by 1/density (the DARE paper's
            // rescale, equal in expectation). Neither `rescale` setting that asks
            // for something else can be honoured, so it is refused.
            let rescale = flag(cfg, "rescale", tensor, t, sparsify == Sparsify::Random)?;
            if rescale != (sparsify == Sparsify::Random) {
                let why = if rescale {
                    "merge-core has no L1-norm rescale for magnitude-trimmed or dense task vectors"
                } else {
                    "merge-core's DARE always multiplies kept values by 1/density"
                };
                return Err(MergeError::Usage(format!(
                    "{}: `rescale: {rescale}` for {} is not supported: {why}",
                    cfg.file.display(),
                    method.name()
                )));
            }
            let config = Gta {
                normalize: flag(cfg, "normalize", tensor, t, preset.normalize)?,
                lambda: number(cfg, "lambda", None, tensor, t)?.unwrap_or(preset.lambda),
                ..preset
            };
            let mut params = Vec::new();
            for (f, e) in inputs.files.iter().zip(&inputs.entry).skip(1) {
                let weight = number(cfg, "weight", *e, tensor, t)?.ok_or_else(|| missing("weight", &f.dir))?;
                let density = number(cfg, "density", *e, tensor, t)?.unwrap_or(1.0);
                params.push(ModelParams { weight, density });
            }
            Ok(TensorPlan::Gta { config, params })
        }
    }
}

fn empty_src(d: Dtype) -> Src<'static> {
    match d {
        Dtype::F32 => Src::F32(&[]),
        Dtype::Bf16 => Src::Bf16(&[]),
        Dtype::F16 => Src::F16(&[]),
    }
}

/// Runs merge-core on empty tensors: every hyperparameter is validated, with
/// merge-core's own error, before a byte is written.
fn validate_plan(name: &str, numel: usize, plan: &TensorPlan, inputs: &Inputs, seed: u64) -> Result<(), MergeError> {
    let core = |error| MergeError::Core { error: Box::new(error), inputs: inputs.legend() };
    let n = inputs.files.len();
    let empties: Vec<Src> = (0..n).map(|_| empty_src(Dtype::F32)).collect();
    let mut out = Dst::F32(&mut []);
    match plan {
        TensorPlan::Linear { weights, normalize } => offline::linear(name, 0, &empties, weights, *normalize, &mut out).map_err(core),
        TensorPlan::Gta { config, params } => {
            let thresholds = if config.sparsify == Sparsify::Magnitude { vec![Threshold::NOTHING; params.len()] } else { vec![] };
            GtaPlan::new(config, name, seed, params, &thresholds, 0).map_err(core)?;
            if config.sparsify == Sparsify::Random {
                // DARE masks index elements with 32 bits (SPEC.md §2).
                merge_core::rng::check_extent(name, 0, numel).map_err(core)?;
            }
            Ok(())
        }
        TensorPlan::Slerp { t } => {
            if (0.0..=1.0).contains(t) {
                Ok(())
            } else {
                Err(core(merge_core::Error::InvalidHyperparameter { name: "t", value: *t, expected: "0 <= t <= 1" }))
            }
        }
    }
}

/// merge-core computing one whole tensor on `threads` threads; `srcs[0]` is the
/// base where the method has one. The tensor-wide scalars (TIES thresholds, SLERP
/// norms) are computed once, then contiguous pieces of the output are merged in
/// parallel: merge-core's results do not depend on how a tensor is cut, so the
/// bits do not depend on `threads`. Errors name the inputs with `inputs`' legend.
// The closures pass on merge-core's `Error` as its functions return it.
#[allow(clippy::result_large_err)]
fn merge_on_cpu(
    name: &str,
    plan: &TensorPlan,
    seed: u64,
    inputs: &Inputs,
    srcs: &[Src<'_>],
    out: &mut Elements,
    threads: usize,
) -> Result<(), MergeError> {
    let core = |error| MergeError::Core { error: Box::new(error), inputs: inputs.legend() };
    let piece = |offset: u64, len: usize| -> Vec<Src<'_>> { srcs.iter().map(|s| s.slice(offset as usize, len)).collect() };
    match plan {
        TensorPlan::Linear { weights, normalize } => in_pieces(out, threads, |offset, dst| {
            offline::linear(name, offset, &piece(offset, dst.len()), weights, *normalize, dst)
        })
        .map_err(core),
        TensorPlan::Slerp { t } => {
            let mut norms = offline::SlerpNorms::default();
            norms.feed(name, 0, srcs[0], srcs[1]).map_err(core)?;
            let mut dot = norms.finish(name).map_err(core)?;
            dot.feed(name, 0, srcs[0], srcs[1]).map_err(core)?;
            let scalars = dot.finish(name, *t).map_err(core)?;
            in_pieces(out, threads, |offset, dst| {
                let p = piece(offset, dst.len());
                offline::slerp_apply(name, offset, p[0], p[1], &scalars, dst)
            })
            .map_err(core)
        }
        TensorPlan::Gta { config, params } => {
            let (base, models) = (srcs[0], &srcs[1..]);
            let mut thresholds = Vec::new();
            if config.sparsify == Sparsify::Magnitude {
                for (i, (m, p)) in models.iter().zip(params).enumerate() {
                    let t = offline::task_vector_threshold(name, p.density, &[base], &[*m]).map_err(|error| MergeError::Core {
                        error: Box::new(error),
                        inputs: format!("in the TIES trim of model {i} = {}; {}", inputs.files[i + 1].dir.display(), inputs.legend()),
                    })?;
                    thresholds.push(t);
                }
            }
            let gta = GtaPlan::new(config, name, seed, params, &thresholds, 0).map_err(core)?;
            in_pieces(out, threads, |offset, dst| {
                let p = piece(offset, dst.len());
                gta.apply(name, offset, p[0], &p[1..], dst)
            })
            .map_err(core)
        }
    }
}

/// Runs `merge(offset, piece)` over `threads` contiguous pieces of `out` at once.
/// The error reported is the first piece's that failed, so the lowest failing
/// index, as a single pass would report it.
#[allow(clippy::result_large_err)]
fn in_pieces(
    out: &mut Elements,
    threads: usize,
    merge: impl Fn(u64, &mut Dst<'_>) -> Result<(), merge_core::Error> + Sync,
) -> Result<(), merge_core::Error> {
    // Pieces below 64k elements cost more to hand to a thread than to merge.
    let chunk = out.len().div_ceil(threads.max(1)).max(1 << 16);
    let mut pieces = out.dst_chunks(chunk);
    if pieces.len() <= 1 {
        return pieces.iter_mut().try_for_each(|(offset, dst)| merge(*offset, dst));
    }
    let merge = &merge;
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = pieces.iter_mut().map(|(offset, dst)| s.spawn(move || merge(*offset, dst))).collect();
        handles.into_iter().map(|h| h.join().expect("a merge thread panicked")).collect()
    });
    results.into_iter().collect()
}

/// The GPU side: the merger and which tensors are recomputed on merge-core.
struct GpuSide {
    merger: gpu_shaders::offline::GpuMerger,
    adapter: String,
    cross_check_every: u64,
}

impl GpuSide {
    /// Whether this plan runs on the GPU: SLERP, and merges of more models than the
    /// kernel binds (linear's inputs are all models; task-vector methods bind
    /// the base apart), stay on merge-core.
    fn takes(plan: &TensorPlan, inputs: usize) -> bool {
        match plan {
            TensorPlan::Linear { .. } => inputs <= gpu_shaders::offline::GPU_MAX_MODELS,
            TensorPlan::Gta { .. } => inputs <= gpu_shaders::offline::GPU_MAX_MODELS + 1,
            TensorPlan::Slerp { .. } => false,
        }
    }

    fn merge(&self, name: &str, plan: &TensorPlan, seed: u64, inputs: &[Src<'_>], out: &mut Dst<'_>) -> Result<(), String> {
        let r = match plan {
            TensorPlan::Linear { weights, normalize } => self.merger.linear(name, inputs, weights, *normalize, out),
            TensorPlan::Gta { config, params } => {
                let (base, models) = (inputs[0], &inputs[1..]);
                let mut thresholds = Vec::new();
                if config.sparsify == Sparsify::Magnitude {
                    for (m, p) in models.iter().zip(params) {
                        thresholds.push(self.merger.task_vector_threshold(name, p.density, &[base], &[*m]).map_err(|e| e.to_string())?);
                    }
                }
                self.merger.gta(config, name, seed, params, &thresholds, 0, base, models, out)
            }
            TensorPlan::Slerp { .. } => unreachable!("GpuSide::takes keeps SLERP on merge-core"),
        };
        r.map_err(|e| e.to_string())
    }
}

fn open_gpu(args: &MergeArgs) -> Result<Option<GpuSide>, MergeError> {
    let ctx = crate::train::optim::open_device(&args.backend.request(), "merging on merge-core (CPU)").map_err(MergeError::Gpu)?;
    Ok(ctx.map(|ctx| {
        let adapter = gpu_shaders::context::describe(ctx.adapter_info());
        GpuSide { merger: gpu_shaders::offline::GpuMerger::new(ctx), adapter, cross_check_every: args.cross_check_every }
    }))
}

/// Refuses an output folder that holds anything, or that is or contains an input.
fn check_out_dir(out: &Path, inputs: &Inputs, config_file: &Path) -> Result<(), MergeError> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| MergeError::io("reading", out, e))?;
        if entries.next().is_some() {
            return Err(MergeError::Usage(format!(
                "{} exists and is not empty: merge writes a new model folder and overwrites nothing (choose a new path)",
                out.display()
            )));
        }
    }
    let out_abs = absolute(out);
    for f in &inputs.files {
        let dir = absolute(&f.dir);
        if dir == out_abs || dir.starts_with(&out_abs) {
            return Err(MergeError::Usage(format!("{} is an input model folder; choose another output folder", out.display())));
        }
    }
    if absolute(config_file).starts_with(&out_abs) {
        return Err(MergeError::Usage(format!("{} holds the merge config; choose another output folder", out.display())));
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
}

/// What a finished merge reports.
#[derive(Debug)]
pub struct MergeReport {
    pub tensors: usize,
    pub elements: u64,
    pub shards: usize,
    pub backend: String,
    pub cross_checked: usize,
    pub seconds: f64,
}

/// Runs the merge the YAML describes into `args.out_dir`.
pub fn run(args: &MergeArgs) -> Result<MergeReport, MergeError> {
    let started = Instant::now();
    let cfg = MergeConfig::read(&args.config)?;
    let max_shard = parse_size(&args.max_shard_size).ok_or_else(|| {
        MergeError::Usage(format!("--max-shard-size `{}`: expected a size such as 5GB, 500MB, 2GiB or a byte count", args.max_shard_size))
    })?;
    let inputs = Inputs::open(&cfg)?;
    check_out_dir(&args.out_dir, &inputs, &cfg.file)?;
    inputs.check_layout()?;
    let layers = inputs.files[0].num_layers()?;

    // Every tensor planned and validated before anything is written.
    let mut plans = Vec::new();
    let mut outs = Vec::new();
    for (name, e) in &inputs.files[0].tensors {
        let plan = plan_tensor(&cfg, &inputs, name, layer_t(name, layers))?;
        validate_plan(name, e.numel(), &plan, &inputs, args.seed)?;
        let dtype = cfg.out_dtype.or(cfg.dtype).unwrap_or(e.dtype);
        outs.push(OutTensor { name: name.clone(), dtype, shape: e.shape.clone() });
        plans.push(plan);
    }
    let gpu = open_gpu(args)?;
    if let Some(g) = &gpu
        && args.backend == BackendChoice::Gpu
        && plans.first().is_some_and(|p| !matches!(p, TensorPlan::Slerp { .. }) && !GpuSide::takes(p, inputs.files.len()))
    {
        return Err(MergeError::Gpu(format!(
            "{}: the GPU merge kernel takes at most {} models; use --backend cpu",
            g.adapter,
            gpu_shaders::offline::GPU_MAX_MODELS
        )));
    }

    let threads = match args.threads {
        Some(0) => return Err(MergeError::Usage("--threads 0: at least one thread merges".into())),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let staging = staging_dir(&args.out_dir);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| MergeError::io("creating", &staging, e))?;
    let result = write_model(&cfg, &inputs, &plans, &outs, max_shard, gpu.as_ref(), args.seed, threads, &staging)
        .and_then(|report| publish(&staging, &args.out_dir).map(|()| report));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    let (shards, cross_checked) = result?;
    Ok(MergeReport {
        tensors: outs.len(),
        elements: outs.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum(),
        shards,
        backend: gpu.as_ref().map_or_else(|| "cpu: merge-core".to_string(), |g| format!("gpu: {}", g.adapter)),
        cross_checked,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A hidden sibling of `out`, so the final rename stays on one file system.
fn staging_dir(out: &Path) -> PathBuf {
    let name = out.file_name().map_or_else(|| "merge".into(), |n| n.to_string_lossy().into_owned());
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    parent.join(format!(".{name}.merge-tmp-{}", std::process::id()))
}

/// Moves the finished staging folder to `out` (an empty `out` is replaced).
fn publish(staging: &Path, out: &Path) -> Result<(), MergeError> {
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| MergeError::io("replacing the empty folder", out, e))?;
    }
    std::fs::rename(staging, out).map_err(|e| MergeError::io("moving the merged model to", out, e))
}

#[allow(clippy::too_many_arguments)]
fn write_model(
    cfg: &MergeConfig,
    inputs: &Inputs,
    plans: &[TensorPlan],
    outs: &[OutTensor],
    max_shard: u64,
    gpu: Option<&GpuSide>,
    seed: u64,
    threads: usize,
    staging: &Path,
) -> Result<(usize, usize), MergeError> {
    let shards = stream::plan_shards(outs, max_shard);
    let names = crate::model_folder::shard_file_names(shards.len());
    let mut weight_map = serde_json::Map::new();
    let mut merged = 0u64;
    let mut cross_checked = 0usize;
    for (shard, file_name) in shards.iter().zip(&names) {
        let mut writer = ShardWriter::create(&staging.join(file_name), shard)?;
        for t in shard {
            // Shards hold the tensors in `outs` order, so `merged` indexes `plans`.
            let plan = &plans[merged as usize];
            let loaded =
                inputs.files.iter().map(|f| Elements::read(&f.tensors[&t.name])).collect::<Result<Vec<_>, _>>()?;
            let srcs: Vec<Src> = loaded.iter().map(Elements::src).collect();
            let n = t.shape.iter().product();
            let mut out = Elements::zeros(t.dtype, n);
            match gpu.filter(|_| GpuSide::takes(plan, srcs.len())) {
                Some(g) => {
                    g.merge(&t.name, plan, seed, &srcs, &mut out.dst()).map_err(MergeError::Gpu)?;
                    if g.cross_check_every > 0 && merged.is_multiple_of(g.cross_check_every) {
                        let mut check = Elements::zeros(t.dtype, n);
                        merge_on_cpu(&t.name, plan, seed, inputs, &srcs, &mut check, threads)?;
                        if let Some(i) = (0..n).find(|&i| out.bits(i) != check.bits(i)) {
                            return Err(MergeError::CrossCheck { tensor: t.name.clone(), index: i, gpu: out.bits(i), cpu: check.bits(i) });
                        }
                        cross_checked += 1;
                    }
                }
                None => merge_on_cpu(&t.name, plan, seed, inputs, &srcs, &mut out, threads)?,
            }
            drop(srcs);
            drop(loaded);
            writer.write(&t.name, out.into_le().as_bytes())?;
            weight_map.insert(t.name.clone(), serde_json::Value::String(file_name.clone()));
            merged += 1;
        }
        writer.finish()?;
    }
    if shards.len() > 1 {
        let total: u64 = outs.iter().map(|t| t.shape.iter().product::<usize>() as u64 * stream::dtype_bytes(t.dtype)).sum();
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = staging.join(stream::INDEX_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&index).expect("JSON serializes"))
            .map_err(|e| MergeError::io("writing", &path, e))?;
    }
    copy_model_files(cfg, inputs, outs, staging)?;
    Ok((shards.len(), cross_checked))
}

/// The tokenizer source's config.json (its dtype set to the output's when all
/// tensors share one) and tokenizer / generation files, and the merge config.
fn copy_model_files(cfg: &MergeConfig, inputs: &Inputs, outs: &[OutTensor], staging: &Path) -> Result<(), MergeError> {
    let source = &inputs.files[inputs.tokenizer_source].dir;
    let config_path = source.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| MergeError::io("reading", &config_path, e))?;
    let mut json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| MergeError::Safetensors { file: config_path.clone(), reason: format!("not JSON: {e}") })?;
    let first = outs[0].dtype;
    if outs.iter().all(|t| t.dtype == first) {
        json = with_dtype(json, first);
    }
    let out_config = staging.join(CONFIG_FILE);
    std::fs::write(&out_config, serde_json::to_string_pretty(&json).expect("JSON serializes") + "\n")
        .map_err(|e| MergeError::io("writing", &out_config, e))?;
    for file in CARRIED_FILES {
        let from = source.join(file);
        if from.is_file() {
            std::fs::copy(&from, staging.join(file)).map_err(|e| MergeError::io("copying", &from, e))?;
        }
    }
    std::fs::copy(&cfg.file, staging.join("mergekit_config.yml")).map_err(|e| MergeError::io("copying", &cfg.file, e))?;
    Ok(())
}
