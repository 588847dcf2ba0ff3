//! `host bench`: tokens per second of a training step, DPO or pretraining, on
//! the CPU model and on the GPU, for one model shape and batch, in one run.
//!
//! A DPO step is what `align` runs per optimizer step with the reference
//! log-probs computed once up front (as TRL's `precompute_ref_log_probs`): the
//! policy's forward and backward over `2 · pairs` sequences of `seq` tokens
//! (prompt a quarter, completion the rest), the DPO sigmoid loss, and the
//! optimizer step. A pretraining step (`--objective pretrain`) is what
//! `pretrain` runs: the same number of sequences and tokens, every token after
//! the first scored, the mean next-token cross-entropy, and the optimizer step.
//! GPU steps are resident (`--cross-check-every 0`: gradients and weights stay
//! on the device). The first step is a warm-up and not counted; the figure is
//! the median of the others. `host/benches/dpo_step_torch.py` runs the same step
//! in PyTorch (transformers' `LlamaForCausalLM`, float32, eager attention) for
//! comparison on the same machine.

use std::path::PathBuf;

use clap::{Args, Parser, ValueEnum};

use crate::cli::args::OptimArgs;
use crate::loss::{DpoLoss, LossKind};
use crate::model::config::LlamaConfig;
use crate::model::{LlamaModel, Sequence};
use crate::model::simd;
use crate::train::metrics::MetricsLog;
use crate::train::objectives::{DpoObjective, LmObjective, PairSeqs};
use crate::train::optim::{self, Optimizer};
use crate::train::run::{self, LoopSpec, Objective, Start};
use crate::train::{Result, TrainError};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model shape: `smollm2-135m` (hidden 576, 30 layers, 9 heads, 3 KV heads,
    /// MLP 1536, vocab 49152, tied), `tiny` (hidden 64, 2 layers, vocab 259), or a
    /// Hugging Face config.json.
    #[arg(long, default_value = "smollm2-135m")]
    pub shape: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// Preference pairs per step (two sequences each; a pretraining step takes
    /// the same `2 · pairs` sequences).
    #[arg(long, default_value_t = 4)]
    pub pairs: usize,
    /// The step to time: `dpo` (the DPO sigmoid loss, reference log-probs
    /// computed once up front) or `pretrain` (next-token cross-entropy on every
    /// token).
    #[arg(long, value_enum, default_value_t = BenchObjective::Dpo)]
    pub objective: BenchObjective,
    /// Timed steps, after one warm-up step (0: print the memory plan only).
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    /// Paths to time: cpu, gpu or both.
    #[arg(long, default_value = "both")]
    pub paths: String,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Widest vector instructions the CPU model and optimizer step may use:
    /// baseline, avx2 or avx512 (default: what the CPU has). In portable math
    /// every level gives the same bits; in fused math avx2 and avx512 do, and
    /// the baseline runs the portable products.
    #[arg(long)]
    pub cpu_level: Option<String>,
    #[command(flatten)]
    pub math: crate::cli::args::MathArgs,
    /// Also run `host/benches/dpo_step_torch.py` with this Python (torch and
    /// transformers installed) on the CPU, same shape, batch and threads, and
    /// print the ratio of step times and of peak memory.
    #[arg(long, value_name = "PYTHON")]
    pub torch: Option<PathBuf>,
    /// Runs of the whole comparison, host then PyTorch, alternately; with
    /// more than one, the median and range of the rounds' ratios follow (on a
    /// shared machine whose speed drifts, one pair's ratio moves by ±20%).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
}

/// What `host bench` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchObjective {
    Dpo,
    Pretrain,
}

impl BenchObjective {
    fn step_name(self) -> &'static str {
        match self {
            BenchObjective::Dpo => "DPO step",
            BenchObjective::Pretrain => "pretraining step",
        }
    }
}

/// `--threads`, or every core (the same default as the training commands).
fn threads(a: &BenchArgs) -> usize {
    a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The model shapes the bench names.
pub fn shape(name: &str) -> Result<LlamaConfig> {
    let config = match name {
        "smollm2-135m" => {
            let mut c = LlamaConfig::tiny(49152, 576, 1536, 30, 9, 3);
            c.tie_word_embeddings = true;
            c.rope_theta = 100_000.0;
            c.max_position_embeddings = 8192;
            c
        }
        "tiny" => LlamaConfig::tiny(crate::tokenizer::ByteTokenizer::VOCAB_SIZE, 64, 176, 2, 4, 2),
        path => crate::hf::read_config(std::path::Path::new(path)).map_err(|e| TrainError::msg(format!("--shape: {e}")))?.config,
    };
    config.validate().map_err(|e| TrainError::msg(format!("--shape {name}: {e}")))?;
    Ok(config)
}

/// `pairs` preference pairs of random tokens, each sequence `seq` long.
fn random_pairs(vocab: usize, seq: usize, pairs: usize) -> Vec<PairSeqs> {
    let mut rng = crate::model::SplitMix64::new(0x5eed);
    let mut token = || rng.below(vocab as u64) as u32;
    let prompt_len = (seq / 4).max(1);
    (0..pairs)
        .map(|_| {
            let prompt: Vec<u32> = (0..prompt_len).map(|_| token()).collect();
            let chosen: Vec<u32> = (prompt_len..seq).map(|_| token()).collect();
            let rejected: Vec<u32> = (prompt_len..seq).map(|_| token()).collect();
            PairSeqs { chosen: Sequence::completion(&prompt, &chosen), rejected: Sequence::completion(&prompt, &rejected) }
        })
        .collect()
}

#[derive(Parser)]
struct OptimDefaults {
    #[command(flatten)]
    optim: OptimArgs,
}

/// One path's figures.
pub struct PathTiming {
    pub path: String,
    pub device: String,
    pub step_ms: f64,
    pub model_ms: f64,
    pub optimizer_ms: f64,
}

pub fn run(a: &BenchArgs) -> Result<Vec<PathTiming>> {
    let config = shape(&a.shape)?;
    if a.seq < 2 || a.seq > config.max_position_embeddings || a.pairs == 0 || a.steps == 0 {
        return Err(TrainError::msg(format!(
            "--seq {} (2..={}), --pairs {} and --steps {} (>= 1 each)",
            a.seq, config.max_position_embeddings, a.pairs, a.steps
        )));
    }
    let paths: &[&str] = match a.paths.as_str() {
        "both" => &["cpu", "gpu"],
        "cpu" => &["cpu"],
        "gpu" => &["gpu"],
        other => return Err(TrainError::msg(format!("--paths {other}: expected cpu, gpu or both"))),
    };
    crate::cli::args::check_training_memory(&config, crate::cli::args::available_memory()).map_err(TrainError::msg)?;
    let threads = threads(a);
    let mut out = Vec::new();
    for &path in paths {
        let mut policy = LlamaModel::init(config.clone(), 1).map_err(TrainError::arch("model init"))?;
        policy.set_threads(threads);
        let total = a.steps + 1;
        let defaults = OptimDefaults::parse_from(["bench", "--lr", "1e-5"]);
        let cfg = defaults.optim.config(1, total);
        let init = policy.params.clone();
        let gpu = if path == "gpu" {
            let ctx = optim::open_device(&crate::cli::args::BackendChoice::Gpu.request(), "")
                .map_err(|e| TrainError::msg(format!("--paths gpu: {e}")))?
                .ok_or_else(|| TrainError::msg("--paths gpu: no GPU adapter".to_string()))?;
            Some(ctx)
        } else {
            None
        };
        let (mut objective, batch): (Box<dyn Objective>, usize) = match a.objective {
            BenchObjective::Dpo => {
                let reference = LlamaModel::from_params(config.clone(), policy.params.clone()).map_err(TrainError::arch("the reference model"))?;
                let train = random_pairs(config.vocab_size, a.seq, a.pairs);
                let loss = DpoLoss::new(LossKind::Sigmoid, 0.1, 0.0)?;
                let obj = match &gpu {
                    Some(ctx) => DpoObjective::on_gpu(policy, &reference, loss, train, Vec::new(), ctx, 0)?,
                    None => DpoObjective::new(policy, &reference, loss, train, Vec::new())?,
                };
                (Box::new(obj), a.pairs)
            }
            BenchObjective::Pretrain => {
                let train = random_pairs(config.vocab_size, a.seq, a.pairs).into_iter().flat_map(|p| [p.chosen.tokens, p.rejected.tokens]).map(Sequence::full).collect();
                let obj = LmObjective::new(policy, train, Vec::new())?;
                let obj = match &gpu {
                    Some(ctx) => obj.on_gpu(ctx, 0)?,
                    None => obj,
                };
                (Box::new(obj), 2 * a.pairs)
            }
        };
        let mut opt = match objective.gpu_model() {
            Some(model) => Optimizer::sharing(cfg, init, None, model, 0)?,
            None => Optimizer::new(cfg, init, None)?,
        };
        opt.set_threads(threads);
        let spec = LoopSpec::quiet(total, batch, 1, 1);
        let log_path: PathBuf = std::env::temp_dir().join(format!("host-bench-{}-{path}.jsonl", std::process::id()));
        let mut log = MetricsLog::create(&log_path)?;
        run::train(&spec, objective.as_mut(), &mut opt, Start { step: 0, data_position: 0 }, &mut log, None)?;
        let records = crate::train::metrics::read(&log_path)?;
        let _ = std::fs::remove_file(&log_path);
        let timed: Vec<_> = records.iter().filter(|r| r.split == "train" && r.step > 1).collect();
        let median = |f: &dyn Fn(&crate::train::metrics::Record) -> f64| {
            let mut v: Vec<f64> = timed.iter().map(|r| f(r)).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let model_ms = median(&|r| r.model_ms.unwrap_or(0.0));
        let optimizer_ms = median(&|r| r.optimizer_ms.unwrap_or(0.0));
        let step_ms = median(&|r| r.model_ms.unwrap_or(0.0) + r.optimizer_ms.unwrap_or(0.0));
        out.push(PathTiming { path: path.to_string(), device: objective.model_device(), step_ms, model_ms, optimizer_ms });
    }
    Ok(out)
}

/// Device bytes a GPU DPO step holds, by owner: the model's weights and
/// gradients (which the optimizer steps in place), the optimizer's moments
/// (AdamW; the merging optimizers add their task vector), and the forward's
/// activations for the micro-batch (`2 · pairs` sequences of `seq` tokens).
pub fn device_memory(config: &LlamaConfig, seq: usize, pairs: usize) -> [(&'static str, u64); 3] {
    let n = config.num_params() as u64;
    [
        ("model weights + gradients", 8 * n),
        ("optimizer moments m, v", 8 * n),
        ("activations kept for the backward", 2 * pairs as u64 * crate::model::GpuLlama::tape_bytes(config, seq)),
    ]
}

/// Runs the bench and prints one line per path (`--steps 0`: the memory plan only).
pub fn bench(a: &BenchArgs) -> Result<()> {
    let config = shape(&a.shape)?;
    let tokens = 2 * a.pairs * a.seq;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let plan = device_memory(&config, a.seq, a.pairs);
    let total: u64 = plan.iter().map(|p| p.1).sum();
    println!("GPU memory of the step (computed from the shapes; plus the backward's transients and one LM-head chunk):");
    for (what, bytes) in plan {
        println!("  {what:<40} {:>9.0} MiB", mib(bytes));
    }
    println!("  {:<40} {:>9.0} MiB", "total", mib(total));
    if a.steps == 0 {
        return Ok(());
    }
    let batch = match a.objective {
        BenchObjective::Dpo => format!("{} pairs x 2 sequences", a.pairs),
        BenchObjective::Pretrain => format!("{} sequences", 2 * a.pairs),
    };
    println!(
        "{}, {} ({} parameters), {batch} x {} tokens = {tokens} tokens per step; median of {} steps after 1 warm-up",
        a.objective.step_name(),
        a.shape,
        config.num_params(),
        a.seq,
        a.steps
    );
    if let Some(level) = &a.cpu_level {
        let level = simd::Level::parse(level).ok_or_else(|| TrainError::msg(format!("--cpu-level {level}: expected baseline, avx2 or avx512")))?;
        simd::set_limit(level);
    }
    let math = a.math.apply();
    println!("CPU kernels (model and optimizer step): {} (this CPU has {}), {} math", simd::active().name(), simd::detected().name(), math.name());
    let mut ratios = Vec::new();
    for round in 1..=a.rounds {
        if a.rounds > 1 {
            println!("round {round} of {}", a.rounds);
        }
        if let Some(ratio) = bench_round(a, tokens)? {
            ratios.push(ratio);
        }
    }
    if ratios.len() > 1 {
        ratios.sort_by(f64::total_cmp);
        let median = if ratios.len() % 2 == 1 { ratios[ratios.len() / 2] } else { (ratios[ratios.len() / 2 - 1] + ratios[ratios.len() / 2]) / 2.0 };
        println!("host cpu / torch over {} rounds: step time median {median:.2}x, range {:.2}x to {:.2}x", ratios.len(), ratios[0], ratios[ratios.len() - 1]);
    }
    Ok(())
}

/// One round: every path's line, the process's peak, and with `--torch` the
/// PyTorch step and the ratios, of which the step time's is returned.
fn bench_round(a: &BenchArgs, tokens: usize) -> Result<Option<f64>> {
    println!("{:<5} {:>10} {:>10} {:>12} {:>12}  device", "path", "step ms", "model ms", "optimizer ms", "tokens/s");
    let timings = run(a)?;
    for t in &timings {
        println!(
            "{:<5} {:>10.1} {:>10.1} {:>12.1} {:>12.1}  {}",
            t.path,
            t.step_ms,
            t.model_ms,
            t.optimizer_ms,
            tokens as f64 / (t.step_ms / 1e3),
            t.device
        );
    }
    // The whole process's peak: both models, the data, the optimizer and the
    // step's transients (the GPU path's host side too, when it ran).
    let peak = peak_rss_mib();
    if let Some(peak) = peak {
        println!("peak resident memory of this process: {peak:.0} MiB");
    }
    let Some(python) = &a.torch else { return Ok(None) };
    let torch = run_torch(python, a)?;
    println!("{}", torch.banner);
    println!("torch {:>10.1} {:>10} {:>12} {:>12.1}  cpu; peak resident memory {:.0} MiB", torch.step_ms, "", "", tokens as f64 / (torch.step_ms / 1e3), torch.peak_mib);
    let Some(cpu) = timings.iter().find(|t| t.path == "cpu") else { return Ok(None) };
    let ratio = cpu.step_ms / torch.step_ms;
    print!("host cpu / torch: step time {ratio:.2}x");
    match peak {
        Some(peak) if a.paths == "cpu" => println!(", peak memory {:.2}x", peak / torch.peak_mib),
        _ => println!(),
    }
    Ok(Some(ratio))
}

/// `VmHWM` of this process, in MiB (Linux; `None` elsewhere).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

struct TorchTiming {
    banner: String,
    step_ms: f64,
    peak_mib: f64,
}

/// Runs the PyTorch side of the comparison in its own process (its peak memory
/// is then its own) and reads its two result lines.
fn run_torch(python: &std::path::Path, a: &BenchArgs) -> Result<TorchTiming> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/dpo_step_torch.py");
    let threads = threads(a);
    let out = std::process::Command::new(python)
        .arg(script)
        .args(["--shape", &a.shape, "--device", "cpu", "--objective", a.objective.to_possible_value().expect("no variant is skipped").get_name()])
        .args(["--seq", &a.seq.to_string(), "--pairs", &a.pairs.to_string(), "--steps", &a.steps.to_string(), "--threads", &threads.to_string()])
        .output()
        .map_err(|e| TrainError::msg(format!("--torch {}: {e}", python.display())))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(TrainError::msg(format!("--torch: {script} failed ({}):\n{}{}", out.status, stdout, String::from_utf8_lossy(&out.stderr))));
    }
    let field = |key: &str| -> Option<f64> {
        let line = stdout.lines().find(|l| l.starts_with("torch "))?;
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let (Some(step_ms), Some(peak_mib)) = (field("step ms"), field("peak resident memory")) else {
        return Err(TrainError::msg(format!("--torch: no `torch  step ms .. peak resident memory ..` line from {script}:\n{stdout}")));
    };
    let banner = stdout.lines().find(|l| l.starts_with("PyTorch")).unwrap_or("PyTorch").to_string();
    Ok(TorchTiming { banner, step_ms, peak_mib })
}
