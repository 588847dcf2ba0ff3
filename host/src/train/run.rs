//! The step loop, independent of what is being trained: an [`Objective`] turns
//! parameters and example indices into gradients and statistics; the loop handles
//! data order, gradient accumulation, the optimizer, evaluation, metrics and
//! checkpoints.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::{self, Checkpoint, InputHash, TrainerState};
use super::metrics::{MetricsLog, Record};
use super::optim::Optimizer;
use super::order::DataOrder;
use super::{Result, TrainError};
use crate::model::{GpuLlama, HeadStats};
use crate::params::ParamSet;

/// Sums over examples of the preference statistics TRL logs (divided by the count
/// when logged).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PrefSums {
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    /// Examples whose chosen reward exceeds the rejected one.
    pub correct: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    /// The LM head's statistics of the chosen and of the rejected completions.
    pub head: (HeadStats, HeadStats),
}

/// Statistics of a batch: sums over its `count` examples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    pub count: usize,
    pub loss_sum: f64,
    pub pref: Option<PrefSums>,
    /// Whether the batch was recomputed on the CPU model and compared.
    pub cross_checked: bool,
    /// Time spent recomputing the batch on the CPU model and comparing.
    pub cross_check_ms: f64,
}

impl Stats {
    pub fn merge(&mut self, o: &Stats) {
        self.count += o.count;
        self.loss_sum += o.loss_sum;
        self.cross_check_ms += o.cross_check_ms;
        self.cross_checked |= o.cross_checked;
        self.pref = match (self.pref, o.pref) {
            (Some(a), Some(b)) => Some(PrefSums {
                rewards_chosen: a.rewards_chosen + b.rewards_chosen,
                rewards_rejected: a.rewards_rejected + b.rewards_rejected,
                correct: a.correct + b.correct,
                logps_chosen: a.logps_chosen + b.logps_chosen,
                logps_rejected: a.logps_rejected + b.logps_rejected,
                head: (a.head.0 + b.head.0, a.head.1 + b.head.1),
            }),
            (a, b) => a.or(b),
        };
    }

    /// Fills a metrics record's loss and TRL preference fields with the means.
    pub fn to_record(&self, step: u64, split: &str) -> Record {
        let n = self.count.max(1) as f64;
        let mut r = Record { step, split: split.to_string(), loss: self.loss_sum / n, ..Default::default() };
        if let Some(p) = self.pref {
            r.rewards_chosen = Some(p.rewards_chosen / n);
            r.rewards_rejected = Some(p.rewards_rejected / n);
            r.rewards_accuracies = Some(p.correct / n);
            r.rewards_margins = Some((p.rewards_chosen - p.rewards_rejected) / n);
            r.logps_chosen = Some(p.logps_chosen / n);
            r.logps_rejected = Some(p.logps_rejected / n);
            // TRL's token-weighted means (0 without tokens, as TRL)
            let (c, rj) = p.head;
            let per = |sum: f64, tokens: usize| if tokens > 0 { sum / tokens as f64 } else { 0.0 };
            r.logits_chosen = Some(per(c.mean_logit_sum, c.tokens));
            r.logits_rejected = Some(per(rj.mean_logit_sum, rj.tokens));
            r.entropy = Some(per(c.entropy_sum + rj.entropy_sum, c.tokens + rj.tokens));
            r.mean_token_accuracy = Some(per(c.argmax_hits as f64, c.tokens));
        }
        r
    }
}

/// What is being trained (language modelling, DPO, ...).
pub trait Objective {
    /// Number of training examples (one epoch).
    fn num_examples(&self) -> usize;
    /// Gradient of the mean loss over `examples` at `params` (same names and shapes
    /// as `params`), and the batch's statistics. `step` is the optimizer step the
    /// gradient is for (a model on a GPU is cross-checked on some steps), and the
    /// time of any such check goes in [`Stats::cross_check_ms`].
    fn gradient(&mut self, step: u64, params: &ParamSet, examples: &[usize]) -> Result<(ParamSet, Stats)>;
    /// Statistics on held-out data, if the objective has any.
    fn evaluate(&mut self, params: &ParamSet) -> Result<Option<Stats>>;
    /// Where the forward and backward run: the GPU adapter's description, or `cpu`.
    fn model_device(&self) -> String;
    /// Tokens training example `example` feeds the model (both sequences of a pair).
    fn example_tokens(&self, example: usize) -> usize;
    /// Takes back a gradient [`Objective::gradient`] returned, once the optimizer
    /// has used it, so the next step can reuse its memory.
    fn recycle_gradient(&mut self, _grads: ParamSet) {}
    /// The GPU model whose gradients can stay on the device for `step`: `Some`
    /// when the model runs on a GPU and `step` is not cross-checked. The loop then
    /// calls [`Objective::accumulate_on_device`] instead of `gradient`, and the
    /// optimizer takes the gradients from this model's buffers and writes the
    /// stepped weights back into them ([`Objective::device_weights_are`]).
    fn resident_model(&self, _step: u64) -> Option<&GpuLlama> {
        None
    }
    /// The model on the GPU, if it is there: the optimizer then steps its buffers
    /// in place ([`crate::train::optim::Optimizer::sharing`]).
    fn gpu_model(&self) -> Option<&GpuLlama> {
        None
    }
    /// Adds `scale` × the gradient of the mean loss over `examples` into the
    /// resident model's gradients (cleared first when `first`). `params` are the
    /// weights of `step`, needed only when the device does not hold them already.
    fn accumulate_on_device(&mut self, step: u64, _params: Option<&ParamSet>, _examples: &[usize], _scale: f32, _first: bool) -> Result<Stats> {
        Err(TrainError::msg(format!("step {step}: this objective's model is not on a GPU")))
    }
    /// The optimizer wrote the weights of `step` into the resident model.
    fn device_weights_are(&self, _step: u64) {}
}

/// Writes the policy as a model directory for a checkpoint (the HF writer).
pub type ModelWriter<'a> = &'a dyn Fn(&ParamSet, &std::path::Path) -> Result<()>;

/// The loop's settings.
pub struct LoopSpec {
    /// Optimizer steps in the whole run (including steps done before a resume).
    pub steps: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub data_seed: u64,
    /// Evaluate every N steps (0: never).
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only at the end).
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    pub checkpoint_root: Option<PathBuf>,
    /// The task's settings, recorded in checkpoints and compared on resume.
    pub run_config: serde_json::Value,
    /// Content hashes of the inputs, recorded in checkpoints and compared on resume.
    pub inputs: Vec<InputHash>,
    /// Resume even when an input's content changed since the checkpoint (warned).
    pub resume_anyway: bool,
    /// Show a progress bar (it hides itself anyway when stderr is not a terminal).
    pub progress: bool,
}

impl LoopSpec {
    /// A run with no evaluation, no checkpoints, no recorded settings and no
    /// progress bar: the in-process runs of `verify` and `bench`.
    pub fn quiet(steps: u64, batch_size: usize, grad_accum: usize, data_seed: u64) -> Self {
        LoopSpec {
            steps,
            batch_size,
            grad_accum,
            data_seed,
            eval_every: 0,
            checkpoint_every: 0,
            keep_checkpoints: 1,
            checkpoint_root: None,
            run_config: serde_json::Value::Null,
            inputs: Vec::new(),
            resume_anyway: false,
            progress: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, v: &dyn std::fmt::Display, want: &str| Err(TrainError::msg(format!("{flag} = {v}: expected {want}")));
        if self.steps == 0 {
            return bad("--steps", &self.steps, "an integer >= 1");
        }
        if self.batch_size == 0 {
            return bad("--batch-size", &self.batch_size, "an integer >= 1");
        }
        if self.grad_accum == 0 {
            return bad("--grad-accum", &self.grad_accum, "an integer >= 1");
        }
        let per_step = (self.batch_size as u64).checked_mul(self.grad_accum as u64);
        if per_step.and_then(|p| p.checked_mul(self.steps)).is_none() {
            return Err(TrainError::msg(format!(
                "--steps {} x --batch-size {} x --grad-accum {}: the run's data position overflows 64 bits",
                self.steps, self.batch_size, self.grad_accum
            )));
        }
        Ok(())
    }

    /// Also refuses a micro-batch larger than the data: it would only repeat
    /// examples, and its activations grow with it until memory runs out.
    pub fn validate_for(&self, num_examples: usize) -> Result<()> {
        self.validate()?;
        if num_examples == 0 {
            return Err(TrainError::msg("the training data has no examples"));
        }
        if self.batch_size > num_examples {
            return Err(TrainError::msg(format!(
                "--batch-size = {}: larger than the {num_examples} training examples; expected at most {num_examples}",
                self.batch_size
            )));
        }
        Ok(())
    }

    /// Never overflows once `validate` passed.
    fn examples_per_step(&self) -> u64 {
        (self.batch_size as u64).saturating_mul(self.grad_accum as u64)
    }
}

/// Where a run starts: fresh, or from a checkpoint's trainer state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Start {
    pub step: u64,
    pub data_position: u64,
}

/// Checks a checkpoint against the current run before resuming from it; the error
/// lists every differing setting.
pub fn check_resume(state: &TrainerState, opt_cfg: &super::config::OptimConfig, spec: &LoopSpec) -> Result<()> {
    let mut diffs = opt_cfg.differing_fields(&state.optim);
    if state.run != spec.run_config {
        diffs.push(format!("run settings: saved {}, given {}", state.run, spec.run_config));
    }
    if Some(state.data_position) != state.step.checked_mul(spec.examples_per_step()) {
        diffs.push(format!(
            "data position {} is not step {} x {} examples per step (--batch-size x --grad-accum)",
            state.data_position,
            state.step,
            spec.examples_per_step()
        ));
    }
    if state.step > spec.steps {
        diffs.push(format!("checkpoint is at step {}, beyond --steps {}", state.step, spec.steps));
    }
    let changed = changed_inputs(&state.inputs, &spec.inputs);
    if spec.resume_anyway {
        for c in &changed {
            eprintln!("warning: --resume-anyway: {c}");
        }
    } else if !changed.is_empty() {
        diffs.extend(changed);
        diffs.push("(pass --resume-anyway to continue with the changed inputs)".into());
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(TrainError::msg(format!("cannot resume: the checkpoint was written by a different run:\n  {}", diffs.join("\n  "))))
    }
}

/// One line per input whose content differs between the checkpoint and this run.
fn changed_inputs(saved: &[InputHash], given: &[InputHash]) -> Vec<String> {
    let mut out = Vec::new();
    for g in given {
        match saved.iter().find(|s| s.flag == g.flag) {
            Some(s) if s.hash == g.hash => {}
            Some(s) => out.push(format!(
                "{} {}: content changed since the checkpoint (hash {}, now {})",
                g.flag,
                g.path.display(),
                s.hash,
                g.hash
            )),
            None => out.push(format!("{} {}: not an input of the checkpointed run", g.flag, g.path.display())),
        }
    }
    for s in saved.iter().filter(|s| !given.iter().any(|g| g.flag == s.flag)) {
        out.push(format!("{} {}: an input of the checkpointed run, not given now", s.flag, s.path.display()));
    }
    out
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// `acc += g` element-wise (same layout), in a fixed order so accumulation is
/// reproducible.
fn add_into(acc: &mut ParamSet, g: &ParamSet) -> Result<()> {
    if acc.tensors.len() != g.tensors.len() {
        return Err(TrainError::msg(format!("gradient has {} tensors, parameters have {}", g.tensors.len(), acc.tensors.len())));
    }
    for (a, b) in acc.tensors.iter_mut().zip(&g.tensors) {
        if a.name != b.name || a.data.len() != b.data.len() {
            return Err(TrainError::msg(format!(
                "gradient tensor `{}` ({} elements) does not match parameter `{}` ({} elements)",
                b.name,
                b.data.len(),
                a.name,
                a.data.len()
            )));
        }
        for (x, y) in a.data.iter_mut().zip(&b.data) {
            *x += *y;
        }
    }
    Ok(())
}

/// Runs steps `start.step + 1 ..= spec.steps`. Returns the final master weights.
pub fn train(
    spec: &LoopSpec,
    objective: &mut dyn Objective,
    opt: &mut Optimizer,
    start: Start,
    log: &mut MetricsLog,
    model_writer: Option<ModelWriter<'_>>,
) -> Result<ParamSet> {
    let n = objective.num_examples();
    spec.validate_for(n)?;
    let mut order = DataOrder::new(spec.data_seed, n);
    let mut position = start.data_position;
    let bar = if spec.progress { ProgressBar::new(spec.steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} steps {elapsed}<{eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message("training");
    bar.set_position(start.step);
    let inv_accum = 1.0 / spec.grad_accum as f32;
    let model_device = objective.model_device();
    // TRL's num_tokens counts from the start of the run, so a resumed run replays
    // the data order up to where it stopped.
    let tokens_of = |objective: &dyn Objective, examples: &[usize]| examples.iter().map(|&i| objective.example_tokens(i) as u64).sum::<u64>();
    let mut num_tokens = tokens_of(&*objective, &DataOrder::new(spec.data_seed, n).take(0, start.data_position as usize));

    for step in start.step + 1..=spec.steps {
        let t_model = Instant::now();
        let mut stats = Stats::default();
        let resident = opt.can_step_resident() && objective.resident_model(step).is_some();
        let (gnorm, report, model_ms) = if resident {
            // Gradients stay on the device: each micro-batch adds its share
            // (scaled by 1/grad_accum through the loss coefficients), the optimizer
            // copies them in and its weights back out; only scalars come back.
            for i in 0..spec.grad_accum {
                let examples = order.take(position, spec.batch_size);
                position += spec.batch_size as u64;
                num_tokens += tokens_of(&*objective, &examples);
                stats.merge(&objective.accumulate_on_device(step, opt.fresh_params(), &examples, inv_accum, i == 0)?);
            }
            let model_ms = ms(t_model);
            let model = objective.resident_model(step).expect("checked above");
            let (report, gnorm) = opt.step_resident(model)?;
            objective.device_weights_are(step + 1);
            (gnorm, report, model_ms)
        } else {
            opt.sync_params()?;
            let mut grads: Option<ParamSet> = None;
            for _ in 0..spec.grad_accum {
                let examples = order.take(position, spec.batch_size);
                position += spec.batch_size as u64;
                num_tokens += tokens_of(&*objective, &examples);
                let (g, st) = objective.gradient(step, opt.params(), &examples)?;
                stats.merge(&st);
                match grads.as_mut() {
                    None => grads = Some(g),
                    Some(acc) => {
                        add_into(acc, &g)?;
                        objective.recycle_gradient(g);
                    }
                }
            }
            let mut grads = grads.expect("grad_accum >= 1");
            if spec.grad_accum > 1 {
                for t in &mut grads.tensors {
                    for x in &mut t.data {
                        *x *= inv_accum;
                    }
                }
            }
            let model_ms = ms(t_model) - stats.cross_check_ms;
            let report = opt.step(&grads)?;
            let gnorm = grads.norm(opt.threads());
            objective.recycle_gradient(grads);
            (gnorm, report, model_ms)
        };

        let mut rec = stats.to_record(step, "train");
        rec.grad_norm = Some(gnorm);
        rec.num_tokens = Some(num_tokens);
        rec.learning_rate = Some(f64::from(report.learning_rate));
        rec.model_ms = Some(model_ms);
        rec.optimizer_ms = Some(report.optimizer_ms);
        rec.cross_check_ms = Some(report.cross_check_ms + stats.cross_check_ms);
        rec.optimizer_checked = Some(report.cross_checked);
        rec.model_checked = Some(stats.cross_checked);
        rec.model_device = Some(model_device.clone());
        rec.optimizer_device = Some(opt.device());
        rec.resident = Some(resident);
        log.log(&rec)?;
        bar.set_position(step);
        bar.set_message(format!("loss {:.4}", rec.loss));

        let eval_due = spec.eval_every > 0 && step % spec.eval_every == 0;
        let due = step == spec.steps || (spec.checkpoint_every > 0 && step % spec.checkpoint_every == 0);
        if eval_due || (due && spec.checkpoint_root.is_some()) {
            opt.sync_params()?;
        }
        if eval_due && let Some(ev) = objective.evaluate(opt.params())? {
            let mut rec = ev.to_record(step, "eval");
            rec.model_device = Some(model_device.clone());
            rec.optimizer_device = Some(opt.device());
            log.log(&rec)?;
        }
        if due && let Some(root) = &spec.checkpoint_root {
            let ckpt = Checkpoint {
                state: TrainerState {
                    format: checkpoint::FORMAT,
                    step,
                    data_position: position,
                    optim: opt.config().clone(),
                    run: spec.run_config.clone(),
                    inputs: spec.inputs.clone(),
                    weights_hash: String::new(),
                    optim_state_hashes: Default::default(),
                },
                params: opt.params().clone(),
                optim_state: opt.export_state()?,
            };
            let params = opt.params();
            let writer = model_writer.map(|w| move |dir: &std::path::Path| w(params, dir));
            checkpoint::write(root, &ckpt, writer.as_ref().map(|w| w as &dyn Fn(&std::path::Path) -> Result<()>))?;
            checkpoint::prune(root, spec.keep_checkpoints)?;
        }
    }
    bar.finish_and_clear();
    opt.sync_params()?;
    Ok(opt.params().clone())
}

/// Loads the checkpoint `LATEST` names under `root`, or, when that one is damaged,
/// the newest older one that is intact (said on stderr); checks it against this
/// run, and restores the optimizer from it. Returns where to continue.
pub fn resume(root: &std::path::Path, opt: &mut Optimizer, spec: &LoopSpec) -> Result<Start> {
    let ckpt = load_newest_intact(root)?;
    check_resume(&ckpt.state, opt.config(), spec)?;
    opt.restore(ckpt.state.step, ckpt.params, ckpt.optim_state)?;
    Ok(Start { step: ckpt.state.step, data_position: ckpt.state.data_position })
}

/// The checkpoint to resume from: the committed one (`LATEST`), else the newest
/// intact one committed before it. A `LATEST` that names no checkpoint directory
/// (edited, or damaged) is not followed: then every complete checkpoint counts.
fn load_newest_intact(root: &std::path::Path) -> Result<Checkpoint> {
    let Some(latest) = checkpoint::read_latest_name(root)? else {
        return Err(TrainError::msg(format!(
            "--resume: no checkpoint under {} (no LATEST file): a run stopped before its first checkpoint \
             completed has nothing to resume; run the same command without --resume to start it again",
            root.display()
        )));
    };
    let committed = checkpoint::parse_dir_name(&latest);
    if committed.is_none() {
        eprintln!(
            "warning: {} names `{latest}`, which is not a checkpoint directory; ignoring it",
            root.join("LATEST").display()
        );
    }
    let candidates: Vec<String> = checkpoint::complete_names(root)?
        .into_iter()
        .filter(|n| committed.is_none_or(|c| checkpoint::parse_dir_name(n).is_some_and(|s| s <= c)))
        .collect();
    let mut damaged = Vec::new();
    for name in candidates {
        match checkpoint::load(&root.join(&name)) {
            Ok(ckpt) => {
                if !damaged.is_empty() {
                    eprintln!("warning: resuming from the older intact checkpoint {name} instead");
                }
                return Ok(ckpt);
            }
            Err(e) => {
                eprintln!("warning: checkpoint {name} is damaged: {e}");
                damaged.push(format!("{name}: {e}"));
            }
        }
    }
    Err(TrainError::msg(format!(
        "--resume: no intact checkpoint under {}{}",
        root.display(),
        damaged.iter().map(|d| format!("\n  {d}")).collect::<String>()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{LayoutDifference, Tensor};
    use crate::train::TrainError;
    use crate::train::config::{AdamForm, Algorithm, OptimConfig, ScheduleKind, Scope, Variant};
    use crate::train::metrics;

    /// `loss = ½‖θ − target(example)‖²` summed over tensors: gradients that depend on
    /// the parameters and on which examples a batch holds, so data order and weights
    /// both shape the result.
    struct Quadratic {
        n: usize,
    }

    impl Objective for Quadratic {
        fn num_examples(&self) -> usize {
            self.n
        }

        fn gradient(&mut self, _step: u64, params: &ParamSet, examples: &[usize]) -> Result<(ParamSet, Stats)> {
            let mut g = params.zeros_like();
            let mut loss = 0.0f64;
            for &e in examples {
                for (gt, pt) in g.tensors.iter_mut().zip(&params.tensors) {
                    for (j, (gx, px)) in gt.data.iter_mut().zip(&pt.data).enumerate() {
                        let target = ((e * 7 + j * 3) % 11) as f32 * 0.1 - 0.5;
                        let d = *px - target;
                        *gx += d / examples.len() as f32;
                        loss += 0.5 * f64::from(d) * f64::from(d);
                    }
                }
            }
            Ok((g, Stats { count: examples.len(), loss_sum: loss, ..Default::default() }))
        }

        fn evaluate(&mut self, params: &ParamSet) -> Result<Option<Stats>> {
            let (_, st) = self.gradient(0, params, &[0, 1])?;
            Ok(Some(st))
        }

        fn model_device(&self) -> String {
            "cpu".to_string()
        }

        fn example_tokens(&self, example: usize) -> usize {
            example + 1
        }
    }

    fn params() -> ParamSet {
        ParamSet::new(vec![
            Tensor { name: "w".into(), shape: vec![3, 5], data: (0..15).map(|i| i as f32 * 0.05 - 0.3).collect() },
            Tensor { name: "b".into(), shape: vec![4], data: vec![0.1, -0.2, 0.3, 0.0] },
        ])
    }

    fn cfg(algorithm: Algorithm, k: u32) -> OptimConfig {
        OptimConfig {
            algorithm,
            adam_form: AdamForm::Hf,
            variant: Variant::Reference,
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            p: 0.5,
            alpha: 0.3,
            k,
            seed: 5,
            rescale: false,
            clip: 1.0,
            scope: Scope::PerTensor,
            schedule: ScheduleKind::WarmupCosine,
            warmup_steps: 2,
            total_steps: 8,
        }
    }

    fn spec(root: &std::path::Path, steps: u64) -> LoopSpec {
        LoopSpec {
            steps,
            batch_size: 3,
            grad_accum: 2,
            data_seed: 11,
            eval_every: 2,
            checkpoint_every: 3,
            keep_checkpoints: 2,
            checkpoint_root: Some(root.join("checkpoints")),
            run_config: serde_json::json!({"task": "quadratic"}),
            inputs: Vec::new(),
            resume_anyway: false,
            progress: false,
        }
    }

    fn optimizer(c: &OptimConfig) -> Optimizer {
        let base = params();
        let mut sft = params();
        for t in &mut sft.tensors {
            for (j, x) in t.data.iter_mut().enumerate() {
                *x += (j as f32 - 2.0) * 0.01;
            }
        }
        Optimizer::new(c.clone(), sft.clone(), Some((&base, &sft))).unwrap()
    }

    fn gpu_optimizer(c: &OptimConfig, every: u64) -> Optimizer {
        let base = params();
        let sft = optimizer(c).params().clone();
        let task = (c.algorithm != Algorithm::Adamw).then_some((&base, &sft));
        let backend = crate::train::optim::BackendRequest::Gpu { adapter: None };
        Optimizer::with_backend(c.clone(), sft.clone(), task, &backend, every).unwrap()
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("host-run-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Stops after `stop` steps (as a kill after the checkpoint of that step would),
    /// resumes in a fresh optimizer, and compares the final weights and logged losses
    /// with an uninterrupted run.
    fn resume_matches_uninterrupted(algorithm: Algorithm, k: u32, stop: u64) {
        resume_matches_uninterrupted_with(cfg(algorithm, k), stop);
    }

    fn resume_matches_uninterrupted_with(c: OptimConfig, stop: u64) {
        let (algorithm, k) = (c.algorithm, c.k);
        let a = tmp(&format!("a{algorithm:?}{k}{stop}"));
        let mut log = MetricsLog::create(&a.join("m.jsonl")).unwrap();
        let mut opt = optimizer(&c);
        let whole = train(&spec(&a, 8), &mut Quadratic { n: 10 }, &mut opt, Start { step: 0, data_position: 0 }, &mut log, None)
            .unwrap();
        assert_eq!(opt.steps(), 8);

        let b = tmp(&format!("b{algorithm:?}{k}{stop}"));
        let mut first = spec(&b, 8);
        first.steps = stop;
        let mut log = MetricsLog::create(&b.join("m.jsonl")).unwrap();
        let mut opt = optimizer(&c);
        // Stopping at `stop` writes its checkpoint (the loop checkpoints at its last step).
        train(&first, &mut Quadratic { n: 10 }, &mut opt, Start { step: 0, data_position: 0 }, &mut log, None).unwrap();
        let s = spec(&b, 8);
        let mut opt = optimizer(&c);
        let start = resume(s.checkpoint_root.as_ref().unwrap(), &mut opt, &s).unwrap();
        assert_eq!(start.step, stop);
        let mut log = MetricsLog::resume(&b.join("m.jsonl"), start.step).unwrap();
        let resumed = train(&s, &mut Quadratic { n: 10 }, &mut opt, start, &mut log, None).unwrap();
        assert_eq!(crate::train::weights_hash(&resumed), crate::train::weights_hash(&whole), "{algorithm:?} k={k}");
        assert_ne!(crate::train::weights_hash(&whole), crate::train::weights_hash(&optimizer(&c).params().clone()));
        let logged = |dir: &std::path::Path| -> Vec<_> {
            metrics::read(&dir.join("m.jsonl")).unwrap().into_iter().map(|r| (r.step, r.split, r.loss.to_bits(), r.num_tokens)).collect()
        };
        let (la, lb) = (logged(&a), logged(&b));
        assert_eq!(la, lb);
        // num_tokens counts every example fed so far (Quadratic's example e has e + 1 tokens)
        let eighth = la.iter().find(|r| r.0 == 8 && r.1 == "train").unwrap();
        let mut order = DataOrder::new(spec(&a, 8).data_seed, 10);
        let fed: u64 = order.take(0, 8 * spec(&a, 8).batch_size * spec(&a, 8).grad_accum).iter().map(|&e| e as u64 + 1).sum();
        assert_eq!(eighth.3, Some(fed));
        std::fs::remove_dir_all(&a).unwrap();
        std::fs::remove_dir_all(&b).unwrap();
    }

    #[test]
    fn resume_is_bit_identical_adamw() {
        resume_matches_uninterrupted(Algorithm::Adamw, 1, 3);
    }

    #[test]
    fn resume_is_bit_identical_ondare_step_k() {
        // Stop between merge steps, so Δ_c is non-zero in the checkpoint.
        resume_matches_uninterrupted(Algorithm::Ondare, 3, 4);
        resume_matches_uninterrupted(Algorithm::Ondare, 1, 5);
    }

    #[test]
    fn resume_is_bit_identical_onties_both_scopes() {
        let mut c = cfg(Algorithm::Onties, 2);
        resume_matches_uninterrupted_with(c.clone(), 3);
        c.scope = Scope::Global;
        c.variant = Variant::Paper;
        c.rescale = true;
        resume_matches_uninterrupted_with(c, 4);
    }

    #[test]
    fn resume_refuses_changed_hyperparameters_and_models() {
        let root = tmp("mismatch");
        let c = cfg(Algorithm::Ondare, 1);
        let mut s = spec(&root, 8);
        s.steps = 2;
        let mut log = MetricsLog::create(&root.join("m.jsonl")).unwrap();
        train(&s, &mut Quadratic { n: 10 }, &mut optimizer(&c), Start { step: 0, data_position: 0 }, &mut log, None).unwrap();
        let s = spec(&root, 8);
        let ckroot = s.checkpoint_root.clone().unwrap();
        let mut other = cfg(Algorithm::Ondare, 1);
        other.alpha = 0.4;
        let err = resume(&ckroot, &mut optimizer(&other), &s).unwrap_err().to_string();
        assert!(err.contains("alpha: saved 0.3"), "{err}");
        let mut bigger = spec(&root, 8);
        bigger.batch_size = 4;
        let err = resume(&ckroot, &mut optimizer(&c), &bigger).unwrap_err().to_string();
        assert!(err.contains("--batch-size"), "{err}");
        // Same hyperparameters, different base model: τ' differs.
        let base = params();
        let err = match Optimizer::new(c.clone(), base.clone(), Some((&base, &params()))) {
            Ok(mut o) => resume(&ckroot, &mut o, &s).unwrap_err().to_string(),
            Err(e) => panic!("{e}"),
        };
        assert!(err.contains("task vector differs"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn resume_without_a_committed_checkpoint_says_how_to_start_again() {
        let root = tmp("nothing-committed");
        let s = spec(&root, 8);
        let ckroot = s.checkpoint_root.clone().unwrap();
        // What a run killed while writing its first checkpoint leaves: a partial
        // directory and no LATEST.
        std::fs::create_dir_all(ckroot.join("step-00000002.partial-1")).unwrap();
        let err = resume(&ckroot, &mut optimizer(&cfg(Algorithm::Ondare, 1)), &s).unwrap_err().to_string();
        assert!(err.contains("no LATEST file") && err.contains("without --resume"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn non_finite_gradient_names_tensor_and_changes_nothing() {
        let c = cfg(Algorithm::Ondare, 1);
        let mut opt = optimizer(&c);
        let before = opt.params().clone();
        let mut g = before.zeros_like();
        g.tensors[1].data[7] = f32::NAN;
        let err = opt.step(&g).unwrap_err();
        assert!(matches!(&err, TrainError::NonFiniteGradient { step: 1, tensor, index: 7, .. } if tensor == "w"), "{err}");
        assert_eq!(opt.params(), &before);
        assert_eq!(opt.steps(), 0);
        let mut short = before.zeros_like();
        short.tensors[0].data.pop();
        short.tensors[0].shape = vec![3];
        let err = opt.step(&short).unwrap_err();
        assert!(matches!(&err, TrainError::Layout { difference: LayoutDifference::Shape { tensor, .. }, .. } if tensor == "b"), "{err}");
        assert!(err.to_string().contains("tensor `b` has shape [4] in the policy but [3] in the step 1 gradient"), "{err}");
    }

    /// On the GPU (lavapipe in CI) with the cross-check on every step and on every
    /// other step, across a resume: the final weights are the CPU run's bits.
    #[test]
    fn gpu_run_matches_cpu_run_across_resume() {
        for (algorithm, k, scope) in
            [(Algorithm::Adamw, 1, Scope::PerTensor), (Algorithm::Ondare, 2, Scope::PerTensor), (Algorithm::Onties, 1, Scope::Global)]
        {
            let c = OptimConfig { scope, ..cfg(algorithm, k) };
            let a = tmp(&format!("gpu-a{algorithm:?}"));
            let mut log = MetricsLog::create(&a.join("m.jsonl")).unwrap();
            let mut cpu = optimizer(&c);
            let want = train(&spec(&a, 8), &mut Quadratic { n: 10 }, &mut cpu, Start { step: 0, data_position: 0 }, &mut log, None)
                .unwrap();
            for every in [1, 2] {
                let b = tmp(&format!("gpu-b{algorithm:?}{every}"));
                let mut first = spec(&b, 8);
                first.steps = 5;
                let mut log = MetricsLog::create(&b.join("m.jsonl")).unwrap();
                let mut opt = gpu_optimizer(&c, every);
                assert!(opt.backend_name().starts_with("gpu: "), "{}", opt.backend_name());
                train(&first, &mut Quadratic { n: 10 }, &mut opt, Start { step: 0, data_position: 0 }, &mut log, None).unwrap();
                let s = spec(&b, 8);
                let mut opt = gpu_optimizer(&c, every);
                let start = resume(s.checkpoint_root.as_ref().unwrap(), &mut opt, &s).unwrap();
                let mut log = MetricsLog::resume(&b.join("m.jsonl"), start.step).unwrap();
                let got = train(&s, &mut Quadratic { n: 10 }, &mut opt, start, &mut log, None).unwrap();
                assert_eq!(crate::train::weights_hash(&got), crate::train::weights_hash(&want), "{algorithm:?} every {every}");
                let recs = metrics::read(&b.join("m.jsonl")).unwrap();
                let checked: Vec<bool> = recs.iter().filter(|r| r.split == "train").map(|r| r.optimizer_checked.unwrap()).collect();
                assert_eq!(checked.len(), 8);
                if every == 2 {
                    assert!(!checked[0] && checked[1], "{checked:?}");
                }
                std::fs::remove_dir_all(&b).unwrap();
            }
            std::fs::remove_dir_all(&a).unwrap();
        }
    }
}
