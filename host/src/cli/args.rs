//! Command-line flags shared by the training subcommands.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::train::config::{AdamForm, Algorithm, OptimConfig, ScheduleKind, Scope, Variant};

/// Where the optimizer step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// A hardware GPU if one works (a software adapter only when MERGE_GPU_ADAPTER names it), else merge-core on the CPU (said once on stderr).
    Auto,
    /// A wgpu adapter; fail if none works.
    Gpu,
    /// merge-core on the CPU.
    Cpu,
}

#[derive(Args, Clone, Debug)]
pub struct OptimArgs {
    /// Optimizer.
    #[arg(long = "optimizer", value_enum, default_value = "adamw")]
    pub algorithm: Algorithm,
    /// AdamW form: `torch` (torch.optim.AdamW) or `hf` (the Hugging Face AdamW the official code uses).
    #[arg(long, value_enum, default_value = "hf")]
    pub adam_form: AdamForm,
    /// OnDARE / OnTIES variant: `reference` (the official code) or `paper` (the printed equations).
    #[arg(long, value_enum, default_value = "reference")]
    pub variant: Variant,
    /// Peak learning rate.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-6)]
    pub lr: f64,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.999)]
    pub beta2: f64,
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-8)]
    pub eps: f64,
    /// Decoupled weight decay λ.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Reserve rate p: DARE keep probability / TIES keep fraction, in (0, 1].
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.01)]
    pub p: f64,
    /// Merge weight α of the SFT delta, in [0, 1].
    #[arg(long, allow_negative_numbers = true, default_value_t = 1e-7)]
    pub alpha: f64,
    /// Merge every K-th step (plain Adam steps in between, paper Alg. 2); 1 = online merging.
    #[arg(long, default_value_t = 1)]
    pub k: u32,
    /// L1-rescale the sparsified update to the norm of the dense one.
    #[arg(long)]
    pub rescale: bool,
    /// Clamp bound c for the DARE-rescaled deltas.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub clip: f64,
    /// OnTIES trimming scope.
    #[arg(long, value_enum, default_value = "per-tensor")]
    pub scope: Scope,
    #[arg(long, value_enum, default_value = "constant")]
    pub schedule: ScheduleKind,
    /// Linear warmup steps of `--schedule warmup-cosine`.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Where the training step runs: the model's forward and backward and the optimizer step.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// With a GPU backend, recompute every N-th step on the CPU: the optimizer step with merge-core, compared bit for bit,
    /// and the model's forward and backward on the CPU model, compared within tolerances (0: never).
    #[arg(long, default_value_t = 1)]
    pub cross_check_every: u64,
}

impl OptimArgs {
    /// The optimizer configuration for a run of `total_steps` with RNG seed `seed`.
    pub fn config(&self, seed: u64, total_steps: u64) -> OptimConfig {
        OptimConfig {
            algorithm: self.algorithm,
            adam_form: self.adam_form,
            variant: self.variant,
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            p: self.p,
            alpha: self.alpha,
            k: self.k,
            seed,
            rescale: self.rescale,
            clip: self.clip,
            scope: self.scope,
            schedule: self.schedule,
            warmup_steps: self.warmup_steps,
            total_steps,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct LoopArgs {
    /// Optimizer steps (default: one epoch, or as many as --epochs needs).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Epochs over the training data (used when --steps is not given).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Seed for data order, the optimizer's masks and model initialization.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate on held-out data every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Complete checkpoints to keep.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Output directory: model/, checkpoints/, metrics.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue from the newest checkpoint under --out.
    #[arg(long)]
    pub resume: bool,
}

impl LoopArgs {
    /// Total optimizer steps for `n` training examples; errors name the flag.
    pub fn total_steps(&self, n: usize) -> Result<u64, String> {
        if self.batch_size == 0 {
            return Err("--batch-size = 0: expected an integer >= 1".to_string());
        }
        if self.grad_accum == 0 {
            return Err("--grad-accum = 0: expected an integer >= 1".to_string());
        }
        match (self.steps, self.epochs) {
            (Some(_), Some(_)) => Err("--steps and --epochs: give one, not both".to_string()),
            (Some(0), _) => Err("--steps = 0: expected an integer >= 1".to_string()),
            (Some(s), None) => Ok(s),
            (None, Some(0)) => Err("--epochs = 0: expected an integer >= 1".to_string()),
            (None, e) => {
                let per_step = (self.batch_size * self.grad_accum) as u64;
                Ok((e.unwrap_or(1) * n as u64).div_ceil(per_step).max(1))
            }
        }
    }
}
