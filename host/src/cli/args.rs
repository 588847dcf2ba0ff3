//! Command-line flags shared by the training subcommands.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::data::DataArgs;
use crate::model::config::LlamaConfig;
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

impl BackendChoice {
    pub fn request(self) -> crate::train::optim::BackendRequest {
        use crate::train::optim::BackendRequest;
        match self {
            BackendChoice::Auto => BackendRequest::Auto,
            BackendChoice::Cpu => BackendRequest::Cpu,
            BackendChoice::Gpu => BackendRequest::Gpu { adapter: None },
        }
    }
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
    /// Continue from the newest intact checkpoint under --out (refused when a data
    /// file or an input model changed since it was written).
    #[arg(long)]
    pub resume: bool,
    /// With --resume: continue even though a data file or input model changed since
    /// the checkpoint (each change is named in a warning).
    #[arg(long)]
    pub resume_anyway: bool,
    /// Threads for the model's forward and backward passes and the optimizer step
    /// (default: all cores). The results do not depend on it, bit for bit.
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub math: MathArgs,
}

/// The CPU model's rounding, shared by every command that runs the model.
#[derive(Args, Clone, Copy, Debug)]
pub struct MathArgs {
    /// Round the CPU model's matrix products the same way on every machine (each multiply and add on its own, in a fixed tree) instead of fusing each multiply-add where the CPU has FMA, whose products run up to twice as fast but give bits that depend on whether the CPU has FMA (never on threads or vector width). The optimizer step is the same either way.
    #[arg(long)]
    pub portable_math: bool,
}

impl MathArgs {
    /// Sets the process's rounding (before any model runs) and returns what the
    /// products will actually use on this CPU.
    pub fn apply(self) -> crate::model::simd::Math {
        use crate::model::simd::{self, Math};
        simd::set_math(if self.portable_math { Math::Portable } else { Math::Fused });
        simd::effective_math()
    }
}

/// A `--threads` flag's value, or every core.
pub fn threads(flag: Option<usize>) -> Result<usize, String> {
    match flag {
        Some(0) => Err("--threads = 0: expected an integer >= 1".to_string()),
        Some(n) => Ok(n),
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

impl LoopArgs {
    /// `--threads`, or every core.
    pub fn threads(&self) -> Result<usize, String> {
        threads(self.threads)
    }

    /// Total optimizer steps for `n` training examples; errors name the flag and
    /// the limit. Checked before anything is allocated: a micro-batch holds at most
    /// every example once (a larger one would only repeat examples, and its
    /// activations grow without bound), and the run's data position
    /// (`steps x --batch-size x --grad-accum`) must fit in 64 bits.
    pub fn total_steps(&self, n: usize) -> Result<u64, String> {
        if self.batch_size == 0 {
            return Err("--batch-size = 0: expected an integer >= 1".to_string());
        }
        if self.grad_accum == 0 {
            return Err("--grad-accum = 0: expected an integer >= 1".to_string());
        }
        if self.batch_size > n {
            return Err(format!(
                "--batch-size = {}: larger than the {n} training examples; expected at most {n}",
                self.batch_size
            ));
        }
        let per_step = (self.batch_size as u64).checked_mul(self.grad_accum as u64).ok_or_else(|| {
            format!("--batch-size {} x --grad-accum {}: more than 2^64 examples per step", self.batch_size, self.grad_accum)
        })?;
        let steps = match (self.steps, self.epochs) {
            (Some(_), Some(_)) => return Err("--steps and --epochs: give one, not both".to_string()),
            (Some(0), _) => return Err("--steps = 0: expected an integer >= 1".to_string()),
            (Some(s), None) => s,
            (None, Some(0)) => return Err("--epochs = 0: expected an integer >= 1".to_string()),
            (None, e) => {
                let epochs = e.unwrap_or(1);
                let examples = epochs.checked_mul(n as u64).ok_or_else(|| {
                    format!("--epochs = {epochs}: {epochs} x {n} examples overflows; expected at most {}", u64::MAX / n as u64)
                })?;
                examples.div_ceil(per_step).max(1)
            }
        };
        if steps.checked_mul(per_step).is_none() {
            return Err(format!(
                "--steps = {steps}: {steps} steps x {per_step} examples per step overflows the data position; expected at most {}",
                u64::MAX / per_step
            ));
        }
        Ok(steps)
    }
}

/// Refuses flags that would be accepted but do nothing, or that ask for what the
/// task lacks.
pub fn check_flag_combinations(task: &str, has_task_vector: bool, data: &DataArgs, lp: &LoopArgs, op: &OptimArgs) -> Result<(), String> {
    if op.algorithm != Algorithm::Adamw && !has_task_vector {
        let algorithm = op.algorithm.to_possible_value().expect("no variant is skipped").get_name().to_string();
        return Err(if task == "align" {
            format!("--optimizer {algorithm} merges the task vector SFT − base: give the pretrained model as --base")
        } else {
            format!("--optimizer {algorithm}: {task} has no task vector to merge (only align takes --base); use --optimizer adamw")
        });
    }
    if op.warmup_steps > 0 && op.schedule != ScheduleKind::WarmupCosine {
        return Err(format!(
            "--warmup-steps = {} has no effect with --schedule {}: add --schedule warmup-cosine",
            op.warmup_steps,
            op.schedule.to_possible_value().expect("no variant is skipped").get_name()
        ));
    }
    if lp.eval_every > 0 && data.eval_data.is_none() && data.builtin_eval == 0 {
        return Err(format!(
            "--eval-every = {}: there is no evaluation data; give --eval-data FILE (or --builtin-eval N)",
            lp.eval_every
        ));
    }
    if lp.resume_anyway && !lp.resume {
        return Err("--resume-anyway: only means something with --resume".to_string());
    }
    Ok(())
}

/// f32 copies of every parameter a training run holds at once: the model, its
/// gradients and their accumulator, the optimizer's master weights, two moments,
/// the task vector and the step-K cache.
const TRAINING_COPIES: u64 = 8;

/// Bytes this machine can still give a process (Linux's `MemAvailable`); `None`
/// where that is not known, and then nothing is refused.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = info.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    kib.checked_mul(1024)
}

/// Refuses a fresh model whose training state cannot fit in `available` bytes,
/// before any of it is allocated (the size flags used to abort on allocation).
pub fn check_training_memory(config: &LlamaConfig, available: Option<u64>) -> Result<(), String> {
    let Some(available) = available else { return Ok(()) };
    let needed = (config.num_params() as u64).saturating_mul(4 * TRAINING_COPIES);
    if needed > available {
        return Err(format!(
            "the model's {} parameters need about {} MiB to train (--hidden-size, --intermediate-size, --layers); \
             this machine has {} MiB available",
            config.num_params(),
            needed >> 20,
            available >> 20
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loop_args(batch_size: usize, grad_accum: usize, steps: Option<u64>, epochs: Option<u64>) -> LoopArgs {
        LoopArgs {
            steps,
            epochs,
            batch_size,
            grad_accum,
            seed: 0,
            eval_every: 0,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            out: PathBuf::from("out"),
            resume: false,
            resume_anyway: false,
            threads: None,
            math: MathArgs { portable_math: false },
        }
    }

    #[test]
    fn sizes_beyond_the_data_or_64_bits_name_the_flag_and_limit() {
        let cases = [
            (loop_args(usize::MAX, 1, Some(1), None), "--batch-size = 18446744073709551615: larger than the 60 training examples"),
            (loop_args(1_000_000, 1, Some(1), None), "expected at most 60"),
            (loop_args(60, usize::MAX, Some(1), None), "more than 2^64 examples per step"),
            (loop_args(8, 1, None, Some(307_445_734_561_825_861)), "--epochs = 307445734561825861"),
            (loop_args(8, 4, Some(u64::MAX / 8), None), "--steps = 2305843009213693951"),
        ];
        for (a, want) in cases {
            let err = a.total_steps(60).unwrap_err();
            assert!(err.contains(want), "{err} (wanted {want})");
        }
        assert_eq!(loop_args(8, 1, None, Some(3)).total_steps(60), Ok(23));
        assert_eq!(loop_args(60, 1, None, None).total_steps(60), Ok(1));
    }

    #[test]
    fn a_model_that_cannot_train_in_memory_is_refused_with_both_sizes() {
        let config = LlamaConfig::tiny(259, 64, 176, 2, 4, 2);
        let needed = config.num_params() as u64 * 4 * TRAINING_COPIES;
        check_training_memory(&config, Some(needed)).unwrap();
        check_training_memory(&config, None).unwrap();
        let err = check_training_memory(&config, Some(needed - 1)).unwrap_err();
        assert!(err.contains(&format!("{} parameters", config.num_params())) && err.contains("MiB available"), "{err}");
    }
}
