//! The `host` command line: `pretrain`, `sft`, `align`, `eval`, `merge`, `verify`, `bench`, `demo`.
//!
//! Every training subcommand writes into `--out`: `model/` (Hugging Face layout),
//! `metrics.jsonl` (TRL names) and `checkpoints/` (see `train::checkpoint`);
//! `--resume` continues from the newest checkpoint there.
//!
//! To add a subcommand (e.g. `demo`): a variant in [`Command`] with its `Args`
//! struct, and an arm in [`run`].

pub mod args;
pub mod data;
pub mod inputs;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use gpu_shaders::GpuContext;
use merge_core::dtype::Dtype;

use crate::data::encode::TextTokenizer;
use crate::hf;
use crate::loss::{DpoLoss, LossKind};
use crate::model::config::LlamaConfig;
use crate::model::{LlamaModel, Sequence, simd};
use crate::model_folder::FolderSpec;
use crate::params::ParamSet;
use crate::tokenizer::PretrainedTokenizer;
use crate::train::metrics::MetricsLog;
use crate::train::objectives::{DpoObjective, LmObjective};
use crate::train::optim::{self, Optimizer};
use crate::train::run::{self, LoopSpec, Objective, Start};
use crate::train::{Result, TrainError};
use args::{LoopArgs, OptimArgs};
use data::DataArgs;

#[derive(Parser, Debug)]
#[command(name = "host", version, about = "DPO-family trainer with online merging optimizers (OnDARE, OnTIES), GPU cross-checked against merge-core")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Next-token pretraining of a new (or existing) model.
    Pretrain(PretrainArgs),
    /// Supervised fine-tuning on prompt/completion pairs (loss on the completion).
    Sft(SftArgs),
    /// Preference alignment (DPO sigmoid / IPO / hinge) with AdamW, OnDARE or OnTIES.
    Align(AlignArgs),
    /// Loss (and preference metrics) of a model on a data set.
    Eval(EvalArgs),
    /// mergekit-style offline merge of model folders (linear, task_arithmetic, ties, dare_linear, dare_ties, slerp), streamed tensor by tensor, seeded, on merge-core or a cross-checked GPU.
    Merge(crate::merge::MergeArgs),
    /// Golden vectors and a seeded training run on merge-core and on every GPU adapter.
    Verify(crate::verify::VerifyArgs),
    /// Tokens per second of a DPO training step on the CPU model and on the GPU (one model shape and batch, one run).
    Bench(crate::bench::BenchArgs),
    /// The paper's experiment in miniature on built-in data: pretrain, SFT, align with AdamW / OnDARE / OnTIES and offline interpolation; reward vs. tax table, CSV, JSON, SVG.
    Demo(crate::demo::cli::DemoArgs),
}

/// How the trained model folder is written (`model/` and each checkpoint's).
#[derive(Args, Debug, Clone)]
pub struct SaveArgs {
    /// dtype of the written weights: f32, bf16 or f16 (default: the input model's,
    /// f32 for a model trained from scratch).
    #[arg(long)]
    pub save_dtype: Option<String>,
    /// Largest weight file; larger models are sharded with model.safetensors.index.json,
    /// as transformers' save_pretrained does (e.g. 5GB, 500MB, 2GiB, or bytes).
    #[arg(long, default_value = crate::model_folder::DEFAULT_MAX_SHARD_SIZE)]
    pub max_shard_size: String,
}

impl SaveArgs {
    /// The folder spec for a model loaded from `source` (stored as `source_dtype`),
    /// or trained from scratch.
    fn spec(&self, config: &LlamaConfig, source: Option<(&Path, Dtype)>) -> Result<FolderSpec> {
        let dtype = match &self.save_dtype {
            Some(s) => hf::parse_dtype(s).ok_or_else(|| TrainError::msg(format!("--save-dtype = {s}: expected f32, bf16 or f16")))?,
            None => source.map_or(Dtype::F32, |(_, d)| d),
        };
        let max_shard_bytes = crate::model_folder::parse_size(&self.max_shard_size).ok_or_else(|| {
            TrainError::msg(format!("--max-shard-size = {}: expected a size such as 5GB, 500MB, 2GiB or a byte count", self.max_shard_size))
        })?;
        Ok(FolderSpec { source: source.map(|(p, _)| p.to_path_buf()), config: config.clone(), dtype, max_shard_bytes })
    }
}

/// Model architecture for a model trained from scratch.
#[derive(Args, Debug, Clone)]
pub struct ArchArgs {
    /// A Hugging Face config.json to take the architecture from (overrides the size flags).
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 176)]
    pub intermediate_size: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
}

#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// Continue from this Hugging Face model directory instead of a fresh model.
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub arch: ArchArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub train: LoopArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub save: SaveArgs,
}

#[derive(Args, Debug)]
pub struct SftArgs {
    /// The model to fine-tune (Hugging Face directory).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub train: LoopArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub save: SaveArgs,
}

#[derive(Args, Debug)]
pub struct AlignArgs {
    /// The SFT model: the policy's starting point and, unless --ref-model, the frozen reference.
    #[arg(long)]
    pub model: PathBuf,
    /// The pretrained base model; the task vector is SFT − base (needed by ondare/onties).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Frozen reference model for the DPO loss (default: --model).
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// DPO loss: sigmoid, ipo or hinge.
    #[arg(long, default_value = "sigmoid")]
    pub loss: String,
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub train: LoopArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub save: SaveArgs,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Reference model for preference metrics (default: --model itself, so rewards are 0).
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// What the data is: lm (plain text), sft (prompt/completion) or preference (TRL).
    #[arg(long, default_value = "preference")]
    pub task: String,
    #[arg(long, default_value = "sigmoid")]
    pub loss: String,
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    #[command(flatten)]
    pub data: DataArgs,
    /// Where the forward passes run (the policy's and the reference's), as for training.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: args::BackendChoice,
    /// Threads for the CPU forward passes (default: all cores). The results do
    /// not depend on it, bit for bit.
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub math: args::MathArgs,
}

/// Parses the command line, runs it, and turns errors into a message and exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn run(command: Command) -> Result<ExitCode> {
    // the CPU model's rounding is set before any model runs (a reference
    // model's log-probs are computed while the objective is built)
    let math = match &command {
        Command::Pretrain(a) => Some(a.train.math),
        Command::Sft(a) => Some(a.train.math),
        Command::Align(a) => Some(a.train.math),
        Command::Eval(a) => Some(a.math),
        // the demo's table is the same on every machine
        Command::Demo(_) => Some(args::MathArgs { portable_math: true }),
        // `bench` sets its own; `merge` runs no model, and `verify` compares
        // optimizer backends on the library default (portable)
        Command::Merge(_) | Command::Verify(_) | Command::Bench(_) => None,
    };
    if let Some(math) = math {
        math.apply();
    }
    match command {
        Command::Pretrain(a) => pretrain(a).map(|()| ExitCode::SUCCESS),
        Command::Sft(a) => sft(a).map(|()| ExitCode::SUCCESS),
        Command::Align(a) => align(a).map(|()| ExitCode::SUCCESS),
        Command::Eval(a) => eval(a).map(|()| ExitCode::SUCCESS),
        Command::Merge(a) => merge(&a).map(|()| ExitCode::SUCCESS),
        Command::Verify(a) => crate::verify::run(&a),
        Command::Demo(a) => crate::demo::cli::demo(&a).map(|()| ExitCode::SUCCESS),
        Command::Bench(a) => crate::bench::bench(&a).map(|()| ExitCode::SUCCESS),
    }
}

fn merge(args: &crate::merge::MergeArgs) -> Result<()> {
    let r = crate::merge::run(args)?;
    let checked = if r.cross_checked > 0 { format!(", {} cross-checked bit for bit on merge-core", r.cross_checked) } else { String::new() };
    println!(
        "merged {} tensors ({} elements) on {}{checked} in {:.1} s: {} ({} shard{})",
        r.tensors,
        r.elements,
        r.backend,
        r.seconds,
        args.out_dir.display(),
        r.shards,
        if r.shards == 1 { "" } else { "s" }
    );
    Ok(())
}

fn load(dir: &Path, flag: &str) -> Result<LlamaModel> {
    load_with_dtype(dir, flag).map(|(m, _)| m)
}

/// The model and the dtype its config.json declares (what the output keeps by default).
fn load_with_dtype(dir: &Path, flag: &str) -> Result<(LlamaModel, Dtype)> {
    hf::load_model(dir).map_err(|e| TrainError::msg(format!("{flag} {}: {e}", dir.display())))
}

/// The model folder's own tokenizer, if it has a `tokenizer.json`, and the content
/// hashes of its files (a changed tokenizer changes the data a resumed run sees).
fn load_tokenizer(dir: &Path, flag: &str, data: &DataArgs, hashes: &mut Vec<crate::train::checkpoint::InputHash>) -> Result<Option<PretrainedTokenizer>> {
    let mut tokenizer = PretrainedTokenizer::load(dir).map_err(|e| TrainError::msg(format!("{flag}: {e}")))?;
    if let (Some(t), Some(date)) = (&mut tokenizer, data.chat_date()?) {
        t.set_chat_date(date);
    }
    if let Some(t) = &tokenizer {
        hashes.extend(inputs::tokenizer_hashes(flag, dir)?);
        if let Some(caveat) = t.class_caveat() {
            eprintln!("note: {flag} {}: {caveat}", dir.display());
        }
    }
    Ok(tokenizer)
}

fn text_tokenizer(t: &Option<PretrainedTokenizer>) -> TextTokenizer<'_> {
    t.as_ref().map_or(TextTokenizer::Bytes, TextTokenizer::Pretrained)
}

/// The device `--backend` asks for, opened once and shared by the model and the
/// optimizer; `auto` without a usable hardware adapter runs both on the CPU and
/// says so once.
fn training_device(op: &OptimArgs) -> Result<Option<GpuContext>> {
    optim::open_device(&op.backend.request(), "running the model on the CPU and the optimizer on merge-core (CPU) alone")
        .map_err(|e| TrainError::msg(format!("--backend gpu: {e}")))
}

/// Shared driver of every training subcommand: checks the flags against the data
/// and the output directory, locks it, builds the optimizer (stepping the
/// model's own buffers when the objective's model is on a GPU), resumes if asked, runs the
/// loop with checkpoints, and writes the final model. `models` are the content
/// hashes of the input models, recorded so that `--resume` sees a change.
#[allow(clippy::too_many_arguments)]
fn fit(
    task: &str,
    init: ParamSet,
    merge_task: Option<(&ParamSet, &ParamSet)>,
    objective: &mut dyn Objective,
    data: &DataArgs,
    models: Vec<crate::train::checkpoint::InputHash>,
    lp: &LoopArgs,
    op: &OptimArgs,
    run_config: serde_json::Value,
    output: FolderSpec,
) -> Result<()> {
    let steps = lp.total_steps(objective.num_examples()).map_err(TrainError::msg)?;
    args::check_flag_combinations(task, merge_task.is_some(), data, lp, op).map_err(TrainError::msg)?;
    let mut inputs = models;
    inputs.extend(data.input_hashes()?);
    let input_paths: Vec<(&str, &Path)> = inputs.iter().map(|i| (i.flag.as_str(), i.path.as_path())).collect();
    crate::train::outdir::refuse_inputs_inside(&lp.out, &input_paths)?;
    let _lock = crate::train::outdir::OutDirLock::acquire(&lp.out)?;
    let stale = crate::train::outdir::remove_stale_temps(&lp.out)?;
    if !stale.is_empty() {
        let names: Vec<String> = stale.iter().map(|p| p.display().to_string()).collect();
        eprintln!("{task}: removed temporary files left by a killed run: {}", names.join(", "));
    }
    let cfg = op.config(lp.seed, steps);
    let math = simd::effective_math();
    let mut opt = match objective.gpu_model() {
        Some(model) => Optimizer::sharing(cfg, init, merge_task, model, op.cross_check_every)?,
        None => Optimizer::new(cfg, init, merge_task)?,
    };
    opt.set_threads(lp.threads().map_err(TrainError::msg)?);
    let model_math = if objective.gpu_model().is_some() { String::new() } else { format!(" ({} math)", math.name()) };
    eprintln!("{task}: {steps} steps, model on {}{model_math}, optimizer on {}", objective.model_device(), opt.backend_name());
    let spec = LoopSpec {
        steps,
        batch_size: lp.batch_size,
        grad_accum: lp.grad_accum,
        data_seed: lp.seed,
        eval_every: lp.eval_every,
        checkpoint_every: lp.checkpoint_every,
        keep_checkpoints: lp.keep_checkpoints,
        checkpoint_root: Some(lp.out.join("checkpoints")),
        // the CPU model's rounding is part of what a resumed run must repeat
        run_config: serde_json::json!({ "task": task, "settings": run_config, "save_dtype": hf::dtype_name(output.dtype), "math": math.name() }),
        inputs,
        resume_anyway: lp.resume_anyway,
        progress: true,
    };
    spec.validate()?;
    let metrics_path = lp.out.join("metrics.jsonl");
    let (start, mut log) = if lp.resume {
        let start = run::resume(spec.checkpoint_root.as_ref().expect("set above"), &mut opt, &spec)?;
        eprintln!("{task}: resuming after step {}", start.step);
        (start, MetricsLog::resume(&metrics_path, start.step)?)
    } else {
        if crate::train::checkpoint::latest_dir(spec.checkpoint_root.as_ref().expect("set above"))?.is_some() {
            return Err(TrainError::msg(format!(
                "{} already holds checkpoints of a run: pass --resume to continue it, or choose another --out",
                lp.out.display()
            )));
        }
        (Start { step: 0, data_position: 0 }, MetricsLog::create(&metrics_path)?)
    };
    let writer = |p: &ParamSet, dir: &Path| -> Result<()> { Ok(output.write(p, dir)?) };
    let final_params = run::train(&spec, objective, &mut opt, start, &mut log, Some(&writer))?;
    let model_dir = lp.out.join("model");
    std::fs::create_dir_all(&model_dir).map_err(|e| TrainError::io("creating", &model_dir, e))?;
    writer(&final_params, &model_dir)?;
    eprintln!(
        "{task}: done; model in {}, metrics in {}, weights hash {}",
        model_dir.display(),
        metrics_path.display(),
        crate::train::weights_hash(&final_params)
    );
    Ok(())
}

fn arch_config(a: &ArchArgs, vocab: usize) -> Result<LlamaConfig> {
    let config = match &a.model_config {
        Some(p) => hf::read_config(p)?.config,
        None if a.heads > 0 && !a.hidden_size.is_multiple_of(a.heads) => {
            return Err(TrainError::msg(format!(
                "--hidden-size = {}: not a multiple of --heads = {} (each head gets hidden-size / heads dimensions)",
                a.hidden_size, a.heads
            )));
        }
        None => LlamaConfig::tiny(vocab, a.hidden_size, a.intermediate_size, a.layers, a.heads, a.kv_heads),
    };
    config.validate().map_err(|e| TrainError::msg(format!("model architecture: {e}")))?;
    args::check_training_memory(&config, args::available_memory()).map_err(TrainError::msg)?;
    Ok(config)
}

fn pretrain(a: PretrainArgs) -> Result<()> {
    let mut models = Vec::new();
    let mut tokenizer = None;
    let mut source = None;
    let mut model = match &a.init {
        Some(dir) => {
            let (m, dtype) = load_with_dtype(dir, "--init")?;
            models.push(inputs::model_hash("--init", dir, &m));
            tokenizer = load_tokenizer(dir, "--init", &a.data, &mut models)?;
            source = Some((dir.as_path(), dtype));
            m
        }
        None => {
            if let Some(p) = &a.arch.model_config {
                models.push(inputs::file_hash("--model-config", p)?);
            }
            let config = arch_config(&a.arch, crate::tokenizer::ByteTokenizer::VOCAB_SIZE)?;
            LlamaModel::init(config, a.train.seed).map_err(TrainError::arch("model init"))?
        }
    };
    model.set_threads(a.train.threads().map_err(TrainError::msg)?);
    let (train, eval) = data::lm_sequences(&a.data, &model.config, text_tokenizer(&tokenizer), a.train.seed)?;
    let output = a.save.spec(&model.config, source)?;
    let init = model.params.clone();
    let gpu = training_device(&a.optim)?;
    let mut obj = lm_objective(model, train, eval, gpu.as_ref(), &a.optim)?;
    let settings = serde_json::json!({ "data": a.data.describe(), "init": a.init });
    fit("pretrain", init, None, &mut obj, &a.data, models, &a.train, &a.optim, settings, output)
}

fn lm_objective(model: LlamaModel, train: Vec<Sequence>, eval: Vec<Sequence>, gpu: Option<&GpuContext>, op: &OptimArgs) -> Result<LmObjective> {
    let obj = LmObjective::new(model, train, eval)?;
    match gpu {
        Some(ctx) => obj.on_gpu(ctx, op.cross_check_every),
        None => Ok(obj),
    }
}

fn sft(a: SftArgs) -> Result<()> {
    let (mut model, source_dtype) = load_with_dtype(&a.model, "--model")?;
    model.set_threads(a.train.threads().map_err(TrainError::msg)?);
    let mut models = vec![inputs::model_hash("--model", &a.model, &model)];
    let tokenizer = load_tokenizer(&a.model, "--model", &a.data, &mut models)?;
    let (train, eval) = data::sft_sequences(&a.data, &model.config, text_tokenizer(&tokenizer), a.train.seed)?;
    let output = a.save.spec(&model.config, Some((&a.model, source_dtype)))?;
    let init = model.params.clone();
    let gpu = training_device(&a.optim)?;
    let mut obj = lm_objective(model, train, eval, gpu.as_ref(), &a.optim)?;
    let settings = serde_json::json!({ "data": a.data.describe(), "model": a.model });
    fit("sft", init, None, &mut obj, &a.data, models, &a.train, &a.optim, settings, output)
}

fn dpo_loss(kind: &str, beta: f64, label_smoothing: f64) -> Result<DpoLoss> {
    let kind: LossKind = kind.parse().map_err(|e: crate::loss::LossError| TrainError::msg(format!("--loss: {e}")))?;
    DpoLoss::new(kind, beta, label_smoothing).map_err(|e| TrainError::msg(format!("--beta / --label-smoothing: {e}")))
}

fn align(a: AlignArgs) -> Result<()> {
    let loss = dpo_loss(&a.loss, a.beta, a.label_smoothing)?;
    let threads = a.train.threads().map_err(TrainError::msg)?;
    let (mut policy, source_dtype) = load_with_dtype(&a.model, "--model")?;
    let output = a.save.spec(&policy.config, Some((&a.model, source_dtype)))?;
    policy.set_threads(threads);
    let mut models = vec![inputs::model_hash("--model", &a.model, &policy)];
    let base = a.base.as_ref().map(|p| load(p, "--base")).transpose()?;
    if let (Some(b), Some(p)) = (&base, &a.base) {
        hf::check_same_layout("--model", &policy.params, "--base", &b.params)?;
        models.push(inputs::model_hash("--base", p, b));
    }
    let tokenizer = load_tokenizer(&a.model, "--model", &a.data, &mut models)?;
    let (train, eval) = data::preference_pairs(&a.data, &policy.config, text_tokenizer(&tokenizer), a.train.seed)?;
    let sft_params = policy.params.clone();
    let precomputed = match &a.data.data {
        Some(p) => data::reference_logps(p)?,
        None => None,
    };
    let gpu = training_device(&a.optim)?;
    let every = a.optim.cross_check_every;
    let mut obj = match precomputed {
        Some(train_ref) => {
            if a.ref_model.is_some() {
                return Err(TrainError::msg(format!(
                    "--ref-model and the reference log-probs in {}: give one, not both",
                    a.data.data.as_ref().expect("precomputed come from --data").display()
                )));
            }
            let eval_ref = match &a.data.eval_data {
                Some(p) => data::reference_logps(p)?.ok_or_else(|| {
                    TrainError::msg(format!("{}: --data carries reference log-probs, so must --eval-data", p.display()))
                })?,
                None => Vec::new(),
            };
            eprintln!("align: using the reference log-probs given in the data (no reference model)");
            let obj = DpoObjective::with_reference_logps(policy, loss, train, train_ref, eval, eval_ref)?;
            match &gpu {
                Some(ctx) => obj.policy_on_gpu(ctx, every)?,
                None => obj,
            }
        }
        None => {
            let mut reference = match &a.ref_model {
                Some(p) => {
                    let r = load(p, "--ref-model")?;
                    models.push(inputs::model_hash("--ref-model", p, &r));
                    r
                }
                None => load(&a.model, "--model")?,
            };
            reference.set_threads(threads);
            hf::check_same_layout("--model", &sft_params, "--ref-model", &reference.params)?;
            match &gpu {
                Some(ctx) => DpoObjective::on_gpu(policy, &reference, loss, train, eval, ctx, every)?,
                None => DpoObjective::new(policy, &reference, loss, train, eval)?,
            }
        }
    };
    let merge_task = base.as_ref().map(|b| (&b.params, &sft_params));
    let settings = serde_json::json!({
        "data": a.data.describe(), "model": a.model, "base": a.base, "ref_model": a.ref_model,
        "loss": a.loss, "beta": a.beta, "label_smoothing": a.label_smoothing,
    });
    fit("align", sft_params.clone(), merge_task, &mut obj, &a.data, models, &a.train, &a.optim, settings, output)
}

fn eval(a: EvalArgs) -> Result<()> {
    let threads = args::threads(a.threads).map_err(TrainError::msg)?;
    let mut model = load(&a.model, "--model")?;
    model.set_threads(threads);
    let tokenizer = load_tokenizer(&a.model, "--model", &a.data, &mut Vec::new())?;
    let tok = text_tokenizer(&tokenizer);
    let config = model.config.clone();
    let params = model.params.clone();
    let gpu = optim::open_device(&a.backend.request(), "evaluating on the CPU")
        .map_err(|e| TrainError::msg(format!("--backend gpu: {e}")))?;
    let mut objective: Box<dyn Objective> = match a.task.as_str() {
        "lm" | "sft" => {
            let (seqs, _) =
                if a.task == "lm" { data::lm_sequences(&a.data, &config, tok, 0)? } else { data::sft_sequences(&a.data, &config, tok, 0)? };
            let obj = LmObjective::new(model, Vec::new(), seqs)?;
            Box::new(match &gpu {
                Some(ctx) => obj.on_gpu(ctx, 0)?,
                None => obj,
            })
        }
        "preference" => {
            let loss = dpo_loss(&a.loss, a.beta, 0.0)?;
            let mut reference = match &a.ref_model {
                Some(p) => load(p, "--ref-model")?,
                None => load(&a.model, "--model")?,
            };
            reference.set_threads(threads);
            let (pairs, _) = data::preference_pairs(&a.data, &config, tok, 0)?;
            Box::new(match &gpu {
                Some(ctx) => DpoObjective::on_gpu(model, &reference, loss, Vec::new(), pairs, ctx, 0)?,
                None => DpoObjective::new(model, &reference, loss, Vec::new(), pairs)?,
            })
        }
        other => return Err(TrainError::msg(format!("--task = {other}: expected lm, sft or preference"))),
    };
    let stats = objective.evaluate(&params)?;
    let mut rec = stats.ok_or_else(|| TrainError::msg("no evaluation data"))?.to_record(0, "eval");
    rec.model_device = Some(objective.model_device());
    println!("{}", serde_json::to_string(&rec).expect("Record serializes"));
    Ok(())
}
