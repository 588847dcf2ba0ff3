//! `host verify`: what a user runs in CI to trust a machine. It recomputes the
//! golden vectors with merge-core, then trains a tiny model for a few seeded DPO
//! steps with each optimizer on merge-core and on every wgpu adapter (GPU steps
//! cross-checked against merge-core at every step), and compares the final
//! weights' hashes. Exit status 1 on any mismatch or failure, and when it checked
//! less than it was asked to: no golden file, or no GPU adapter (unless
//! `--allow-no-gpu` or `--cpu-only` says that is expected).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::data::builtin::{Builtin, BuiltinConfig};
use crate::loss::{DpoLoss, LossKind};
use crate::model::config::LlamaConfig;
use crate::model::{LlamaModel, Sequence};
use crate::params::ParamSet;
use crate::tokenizer::ByteTokenizer;
use crate::train::config::{AdamForm, Algorithm, OptimConfig, ScheduleKind, Scope, Variant};
use crate::train::metrics::MetricsLog;
use crate::train::objectives::{DpoObjective, PairSeqs};
use crate::train::optim::{BackendRequest, Optimizer};
use crate::train::run::{LoopSpec, Start, train};
use crate::train::{Result, TrainError, weights_hash};

#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Directory of golden vector files (*.json).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden"))]
    pub golden: PathBuf,
    /// Optimizer steps of the training run.
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Only the CPU run (no adapter is opened).
    #[arg(long)]
    pub cpu_only: bool,
    /// Pass when no GPU adapter is found, having checked merge-core alone (without
    /// it, finding no adapter fails: the GPU path would be unchecked).
    #[arg(long)]
    pub allow_no_gpu: bool,
}

/// One row of the result table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub adapter: String,
    pub backend: String,
    pub optimizer: String,
    /// Hash of the final weights, or the error.
    pub result: std::result::Result<String, String>,
    pub matches: bool,
}

/// One golden file's result: (file name, cases, failures).
pub type GoldenFile = (String, usize, Vec<String>);

/// Every golden file (`*.json`) of `dir`, checked.
pub fn golden(dir: &std::path::Path) -> Result<Vec<GoldenFile>> {
    let entries = std::fs::read_dir(dir).map_err(|e| TrainError::io("--golden: reading", dir, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| TrainError::io("reading", &f, e))?;
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match golden_runner::check_file(&text) {
            Ok(r) => out.push((name, r.cases, r.failures)),
            Err(e) => out.push((name, 0, vec![format!("unreadable: {e}")])),
        }
    }
    Ok(out)
}

/// The tiny seeded setup the training runs share: base, SFT, preference pairs.
struct Setup {
    config: LlamaConfig,
    base: ParamSet,
    sft: ParamSet,
    pairs: Vec<PairSeqs>,
}

fn setup(seed: u64) -> Result<Setup> {
    let config = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE, 32, 64, 1, 2, 1);
    let err = TrainError::arch("verify model");
    let base = LlamaModel::init(config.clone(), seed).map_err(&err)?.params;
    // An SFT model close to the base, so the task vector looks like a real one.
    let mut sft = base.clone();
    let other = LlamaModel::init(config.clone(), seed ^ 0x5f7).map_err(&err)?.params;
    for (s, o) in sft.tensors.iter_mut().zip(&other.tensors) {
        for (x, y) in s.data.iter_mut().zip(&o.data) {
            *x += 0.1 * *y;
        }
    }
    let tok = ByteTokenizer;
    let data = Builtin::new(BuiltinConfig::default(), seed).map_err(TrainError::msg)?;
    let pairs = data
        .preferences(8)
        .iter()
        .map(|p| {
            let prompt = tok.encode_prompt(&p.prompt);
            PairSeqs {
                chosen: Sequence::completion(&prompt, &tok.encode_completion(&p.chosen)),
                rejected: Sequence::completion(&prompt, &tok.encode_completion(&p.rejected)),
            }
        })
        .collect();
    Ok(Setup { config, base, sft, pairs })
}

fn optim_config(algorithm: Algorithm, seed: u64, steps: u64) -> OptimConfig {
    OptimConfig {
        algorithm,
        adam_form: AdamForm::Hf,
        variant: Variant::Reference,
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        p: 0.5,
        alpha: 0.1,
        k: 2,
        seed,
        rescale: true,
        clip: 1.0,
        scope: Scope::PerTensor,
        schedule: ScheduleKind::WarmupCosine,
        warmup_steps: 1,
        total_steps: steps,
    }
}

/// Trains on `backend`; returns (where it ran, final weights hash).
fn train_once(s: &Setup, algorithm: Algorithm, backend: &BackendRequest, args: &VerifyArgs) -> Result<(String, String)> {
    let cfg = optim_config(algorithm, args.seed, args.steps);
    let task = (algorithm != Algorithm::Adamw).then_some((&s.base, &s.sft));
    let mut opt = Optimizer::with_backend(cfg, s.sft.clone(), task, backend, 1)?;
    let err = TrainError::arch("verify model");
    let policy = LlamaModel::from_params(s.config.clone(), s.sft.clone()).map_err(&err)?;
    let reference = LlamaModel::from_params(s.config.clone(), s.sft.clone()).map_err(&err)?;
    let loss = DpoLoss::new(LossKind::Sigmoid, 0.1, 0.0)?;
    let mut obj = DpoObjective::new(policy, &reference, loss, s.pairs.clone(), Vec::new())?;
    let spec = LoopSpec::quiet(args.steps, 2, 2, args.seed);
    let log_path = std::env::temp_dir().join(format!("host-verify-{}.jsonl", std::process::id()));
    let mut log = MetricsLog::create(&log_path)?;
    let out = train(&spec, &mut obj, &mut opt, Start { step: 0, data_position: 0 }, &mut log, None);
    let _ = std::fs::remove_file(&log_path);
    Ok((opt.backend_name(), weights_hash(&out?)))
}

/// Every adapter wgpu lists, described; verify opens each by its position, since
/// names repeat (lavapipe is `llvmpipe` on Vulkan and on GL alike).
pub fn adapters() -> Vec<String> {
    gpu_shaders::context::enumerate_adapters().iter().map(|a| gpu_shaders::context::describe(&a.get_info())).collect()
}

/// Runs every check and returns the rows (CPU rows first, then per adapter).
pub fn training_rows(args: &VerifyArgs) -> Result<Vec<Row>> {
    let s = setup(args.seed)?;
    let algorithms = [Algorithm::Adamw, Algorithm::Ondare, Algorithm::Onties];
    let mut rows = Vec::new();
    let mut reference = Vec::new();
    for a in algorithms {
        let r = train_once(&s, a, &BackendRequest::Cpu, args).map(|x| x.1).map_err(|e| e.to_string());
        reference.push(r.clone());
        rows.push(Row {
            adapter: "merge-core".into(),
            backend: "cpu".into(),
            optimizer: format!("{a:?}").to_lowercase(),
            matches: r.is_ok(),
            result: r,
        });
    }
    if args.cpu_only {
        return Ok(rows);
    }
    for (index, name) in adapters().into_iter().enumerate() {
        for (a, want) in algorithms.iter().zip(&reference) {
            let r = train_once(&s, *a, &BackendRequest::GpuAt { index }, args);
            let (where_, result) = match r {
                Ok((w, h)) => (w, Ok(h)),
                Err(e) => (format!("gpu: {name}"), Err(e.to_string())),
            };
            rows.push(Row {
                adapter: where_.trim_start_matches("gpu: ").to_string(),
                backend: "gpu".into(),
                optimizer: format!("{a:?}").to_lowercase(),
                matches: result.is_ok() && want.as_ref().ok() == result.as_ref().ok(),
                result,
            });
        }
    }
    Ok(rows)
}

pub fn run(args: &VerifyArgs) -> Result<ExitCode> {
    let files = golden(&args.golden)?;
    if files.is_empty() {
        return Err(TrainError::msg(format!("--golden {}: no golden vector files (*.json) in it", args.golden.display())));
    }
    let mut ok = true;
    for (name, cases, failures) in files {
        if failures.is_empty() {
            println!("golden {name}: {cases} cases match");
        } else {
            ok = false;
            if cases == 0 {
                println!("golden {name}: FAIL");
            } else {
                println!("golden {name}: {} of {cases} cases FAIL", failures.len());
            }
            for f in failures.iter().take(5) {
                println!("  {f}");
            }
        }
    }
    let rows = training_rows(args)?;
    let w = rows.iter().map(|r| r.adapter.len()).max().unwrap_or(7).max(7);
    println!("{:<w$}  {:<7}  {:<9}  {:<16}  match", "adapter", "backend", "optimizer", "weights hash");
    for r in &rows {
        let result = match &r.result {
            Ok(h) => h.clone(),
            Err(e) => format!("error: {e}"),
        };
        println!("{:<w$}  {:<7}  {:<9}  {:<16}  {}", r.adapter, r.backend, r.optimizer, result, if r.matches { "yes" } else { "NO" });
        ok &= r.matches;
    }
    if rows.iter().all(|r| r.backend == "cpu") && !args.cpu_only {
        let why = gpu_shaders::context::GpuError::NoAdapter { wanted: None, found: Vec::new() };
        if args.allow_no_gpu {
            println!("({why}: only merge-core was checked, as --allow-no-gpu allows)");
        } else {
            println!("FAIL: {why}: only merge-core was checked; pass --allow-no-gpu to accept that");
            ok = false;
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
