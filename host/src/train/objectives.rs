//! The trainer's objectives on the Llama model: next-token cross-entropy
//! (pretraining, SFT) and the DPO family against a frozen reference.
//!
//! The policy's forward and backward run on the CPU model, or on a GPU
//! ([`LmObjective::on_gpu`], [`DpoObjective::on_gpu`]): then the weights are
//! uploaded once per step, the gradients read back after every micro-batch,
//! and every N-th step recomputed on the CPU model from the same weights and
//! batch and compared ([`model_check`](super::model_check)).

use std::cell::Cell;
use std::time::Instant;

use gpu_shaders::GpuContext;

use crate::loss::{BatchLoss, DpoLoss};
use crate::model::gpu::GpuLlama;
use crate::model::{HeadStats, LlamaModel, Sequence};
use crate::params::ParamSet;

use super::model_check::{compare_gradients, compare_logps, compare_loss};
use super::run::{Objective, PrefSums, Stats};
use super::{Result, TrainError};


fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The policy on a GPU and when its steps are cross-checked.
struct GpuPolicy {
    model: GpuLlama,
    device: String,
    /// Recompute every N-th step on the CPU model (0: never).
    cross_check_every: u64,
    /// The step whose weights the device holds: the optimizer changes them only
    /// between steps, so the micro-batches of one step upload them once.
    weights_of_step: Cell<Option<u64>>,
}

impl GpuPolicy {
    fn new(ctx: &GpuContext, policy: &LlamaModel, cross_check_every: u64) -> Result<Self> {
        let model = GpuLlama::new(ctx, policy).map_err(TrainError::gpu("uploading the policy"))?;
        Ok(Self::with_model(ctx, model, cross_check_every))
    }

    fn with_model(ctx: &GpuContext, model: GpuLlama, cross_check_every: u64) -> Self {
        Self { model, device: gpu_shaders::context::describe(ctx.adapter_info()), cross_check_every, weights_of_step: Cell::new(None) }
    }

    fn checks(&self, step: u64) -> bool {
        self.cross_check_every > 0 && step.is_multiple_of(self.cross_check_every)
    }

    /// The optimizer's weights of `step` on the device, gradients cleared.
    fn start(&self, step: u64, params: &ParamSet) -> Result<()> {
        if self.weights_of_step.get() != Some(step) {
            self.upload(params)?;
            self.weights_of_step.set(Some(step));
        }
        self.model.zero_grads();
        Ok(())
    }

    /// Weights from outside the step sequence (evaluation, the reference model).
    fn upload(&self, params: &ParamSet) -> Result<()> {
        self.weights_of_step.set(None);
        self.model.upload(params).map_err(TrainError::gpu("uploading the weights"))
    }

    fn read_grads(&self) -> Result<ParamSet> {
        self.model.read_grads().map_err(TrainError::gpu("reading the gradients"))
    }

    /// The model, when `step`'s gradient may stay on the device (not cross-checked).
    fn resident(&self, step: u64) -> Option<&GpuLlama> {
        (!self.checks(step)).then_some(&self.model)
    }

    /// Ready to add a micro-batch of `step` into the device gradients: the weights
    /// of `step` on the device (uploaded from `params` unless they are there
    /// already), the gradients cleared when `first`.
    fn begin_accumulate(&self, step: u64, params: Option<&ParamSet>, first: bool) -> Result<()> {
        if self.weights_of_step.get() != Some(step) {
            let params = params.ok_or_else(|| {
                TrainError::msg(format!("step {step}: the GPU holds another step's weights and none were given (a bug)"))
            })?;
            self.upload(params)?;
            self.weights_of_step.set(Some(step));
        }
        if first {
            self.model.zero_grads();
        }
        Ok(())
    }

    /// Forward, coefficients from the log-probs, backward added into the device
    /// gradients; the log-probs come back.
    fn accumulate(&self, seqs: &[Sequence], coefs: impl Fn(&[f32]) -> Result<Vec<f32>>) -> Result<(Vec<f32>, Vec<HeadStats>)> {
        let fwd = self.model.forward(seqs).map_err(TrainError::gpu("policy forward"))?;
        let c = coefs(&fwd.logps)?;
        self.model.backward(&fwd, &c).map_err(TrainError::gpu("policy backward"))?;
        Ok((fwd.logps, fwd.head))
    }
}

/// Mean next-token cross-entropy over the scored tokens of a batch.
pub struct LmObjective {
    model: LlamaModel,
    gpu: Option<GpuPolicy>,
    train: Vec<Sequence>,
    eval: Vec<Sequence>,
}

impl LmObjective {
    /// `model` supplies the architecture (its weights are replaced by the
    /// optimizer's at every step). Sequences with no scored token are refused.
    pub fn new(model: LlamaModel, train: Vec<Sequence>, eval: Vec<Sequence>) -> Result<Self> {
        for (split, seqs) in [("training", &train), ("evaluation", &eval)] {
            if let Some(i) = seqs.iter().position(|s| s.scored() == 0) {
                return Err(TrainError::msg(format!("{split} example {i} has no scored token (too short)")));
            }
        }
        Ok(Self { model, gpu: None, train, eval })
    }

    /// Runs the forward and backward on `ctx`, and every `cross_check_every`-th
    /// step (0: never) on the CPU model too, compared.
    pub fn on_gpu(mut self, ctx: &GpuContext, cross_check_every: u64) -> Result<Self> {
        self.gpu = Some(GpuPolicy::new(ctx, &self.model, cross_check_every)?);
        Ok(self)
    }
}

/// The CPU model's per-sequence log-probs and gradients of `Σ coefs[b]·logp_b`.
fn cpu_backward(model: &LlamaModel, seqs: &[Sequence], coefs: impl Fn(&[f32]) -> Result<Vec<f32>>) -> Result<(Vec<f32>, ParamSet, Vec<HeadStats>)> {
    let mut fwd = model.forward(seqs).map_err(TrainError::arch("policy forward"))?;
    let coefs = coefs(&fwd.logps)?;
    let mut grads = model.zeroed_grads();
    model.backward(&fwd, &coefs, &mut grads).map_err(TrainError::arch("policy backward"))?;
    let (logps, head) = (std::mem::take(&mut fwd.logps), std::mem::take(&mut fwd.head));
    model.recycle_forward(fwd);
    Ok((logps, grads, head))
}

/// The same on the GPU model, whose device weights must be current.
fn gpu_backward(gpu: &GpuPolicy, seqs: &[Sequence], coefs: impl Fn(&[f32]) -> Result<Vec<f32>>) -> Result<(Vec<f32>, ParamSet, Vec<HeadStats>)> {
    let fwd = gpu.model.forward(seqs).map_err(TrainError::gpu("policy forward"))?;
    let c = coefs(&fwd.logps)?;
    gpu.model.backward(&fwd, &c).map_err(TrainError::gpu("policy backward"))?;
    Ok((fwd.logps, gpu.read_grads()?, fwd.head))
}

/// Mean negative log-likelihood per scored token.
fn mean_nll(logps: &[f32], tokens: usize) -> f64 {
    logps.iter().map(|&l| -f64::from(l)).sum::<f64>() / tokens.max(1) as f64
}

impl Objective for LmObjective {
    fn num_examples(&self) -> usize {
        self.train.len()
    }

    fn gradient(&mut self, step: u64, params: &ParamSet, examples: &[usize]) -> Result<(ParamSet, Stats)> {
        let seqs: Vec<Sequence> = examples.iter().map(|&i| self.train[i].clone()).collect();
        let tokens: usize = seqs.iter().map(Sequence::scored).sum();
        // d(mean nll)/d logp_b = −1 / (scored tokens of the batch), the same for every sequence
        let coefs = |_: &[f32]| Ok(vec![-1.0 / tokens as f32; seqs.len()]);
        let mut cross_check_ms = 0.0;
        let mut cross_checked = false;
        let (logps, grads) = match &self.gpu {
            None => {
                self.model.params.clone_from(params);
                let (logps, grads, _) = cpu_backward(&self.model, &seqs, coefs)?;
                (logps, grads)
            }
            Some(gpu) => {
                gpu.start(step, params)?;
                let (logps, grads, _) = gpu_backward(gpu, &seqs, coefs)?;
                if gpu.checks(step) {
                    let t = Instant::now();
                    self.model.params.clone_from(params);
                    let (cpu_logps, cpu_grads, _) = cpu_backward(&self.model, &seqs, coefs)?;
                    compare_logps(step, "policy", &logps, &cpu_logps)?;
                    compare_loss(step, mean_nll(&logps, tokens), mean_nll(&cpu_logps, tokens))?;
                    compare_gradients(step, &grads, &cpu_grads)?;
                    cross_check_ms = ms_since(t);
                    cross_checked = true;
                }
                (logps, grads)
            }
        };
        let n = examples.len();
        Ok((grads, Stats { count: n, loss_sum: mean_nll(&logps, tokens) * n as f64, pref: None, cross_checked, cross_check_ms }))
    }

    fn evaluate(&mut self, params: &ParamSet) -> Result<Option<Stats>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let ce = match &self.gpu {
            None => {
                self.model.params.clone_from(params);
                self.model.cross_entropy(&self.eval).map_err(TrainError::arch("evaluation"))?
            }
            Some(gpu) => {
                gpu.upload(params)?;
                gpu.model.cross_entropy(&self.eval).map_err(TrainError::gpu("evaluation"))?
            }
        };
        let mean = ce.nll_sum / ce.tokens.max(1) as f64;
        Ok(Some(Stats { count: self.eval.len(), loss_sum: mean * self.eval.len() as f64, ..Default::default() }))
    }

    fn model_device(&self) -> String {
        self.gpu.as_ref().map_or_else(|| "cpu".to_string(), |g| g.device.clone())
    }

    fn example_tokens(&self, example: usize) -> usize {
        self.train[example].tokens.len()
    }

    fn recycle_gradient(&mut self, grads: ParamSet) {
        self.model.recycle_grads(grads);
    }

    fn resident_model(&self, step: u64) -> Option<&GpuLlama> {
        self.gpu.as_ref()?.resident(step)
    }

    fn gpu_model(&self) -> Option<&GpuLlama> {
        self.gpu.as_ref().map(|g| &g.model)
    }

    fn accumulate_on_device(&mut self, step: u64, params: Option<&ParamSet>, examples: &[usize], scale: f32, first: bool) -> Result<Stats> {
        let gpu = self.gpu.as_ref().ok_or_else(|| TrainError::msg(format!("step {step}: the model is not on a GPU")))?;
        gpu.begin_accumulate(step, params, first)?;
        let seqs: Vec<Sequence> = examples.iter().map(|&i| self.train[i].clone()).collect();
        let tokens: usize = seqs.iter().map(Sequence::scored).sum();
        let (logps, _) = gpu.accumulate(&seqs, |_: &[f32]| Ok(vec![-scale / tokens as f32; seqs.len()]))?;
        let n = examples.len();
        Ok(Stats { count: n, loss_sum: mean_nll(&logps, tokens) * n as f64, ..Default::default() })
    }

    fn device_weights_are(&self, step: u64) {
        if let Some(gpu) = &self.gpu {
            gpu.weights_of_step.set(Some(step));
        }
    }
}

/// A preference pair as model inputs: `prompt ++ chosen` and `prompt ++ rejected`,
/// completions scored.
#[derive(Clone, Debug, PartialEq)]
pub struct PairSeqs {
    pub chosen: Sequence,
    pub rejected: Sequence,
}

/// DPO / IPO / hinge against reference log-probs computed once from the frozen
/// reference model (it never changes, so computing them up front is exact and
/// saves a forward pass per step).
pub struct DpoObjective {
    policy: LlamaModel,
    gpu: Option<GpuPolicy>,
    /// The reference on the CPU, kept when GPU steps are cross-checked: a checked
    /// step recomputes its batch's reference log-probs too.
    reference: Option<LlamaModel>,
    loss: DpoLoss,
    train: Vec<PairSeqs>,
    train_ref: Vec<(f32, f32)>,
    eval: Vec<PairSeqs>,
    eval_ref: Vec<(f32, f32)>,
}

/// Each pair's chosen and rejected sequence, in that order.
fn pair_seqs(pairs: &[PairSeqs]) -> Vec<Sequence> {
    pairs.iter().flat_map(|p| [p.chosen.clone(), p.rejected.clone()]).collect()
}

/// Summed (or, for IPO, length-averaged) log-probs of each pair's completions,
/// from the summed log-probs `lp` of [`pair_seqs`].
fn pair_logps(pairs: &[PairSeqs], lp: &[f32], normalize: bool) -> Vec<(f32, f32)> {
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (c, r) = (lp[2 * i], lp[2 * i + 1]);
            if normalize { (c / p.chosen.scored() as f32, r / p.rejected.scored() as f32) } else { (c, r) }
        })
        .collect()
}

fn flat(pairs: &[(f32, f32)]) -> Vec<f32> {
    pairs.iter().flat_map(|&(c, r)| [c, r]).collect()
}

/// TRL's preference sums of `n` pairs; `head` is the LM head's statistics of
/// [`pair_seqs`]' sequences.
fn pref_sums(n: usize, m: &crate::loss::DpoMetrics, head: &[HeadStats]) -> PrefSums {
    let sum = |parity: usize| head.iter().skip(parity).step_by(2).fold(HeadStats::default(), |a, &b| a + b);
    let head = (sum(0), sum(1));
    let n = n as f64;
    PrefSums {
        head,
        rewards_chosen: m.rewards_chosen * n,
        rewards_rejected: m.rewards_rejected * n,
        // An exact count again (the mean is count / n, correctly rounded).
        correct: (m.rewards_accuracies * n).round(),
        logps_chosen: m.logps_chosen * n,
        logps_rejected: m.logps_rejected * n,
    }
}

/// The loss of a batch of pairs (`seqs` as [`pair_seqs`] lays them out) from the
/// policy's summed log-probs, and d loss / d logp of every sequence.
fn dpo_batch(loss: &DpoLoss, seqs: &[Sequence], logps: &[f32], refs: &[(f32, f32)]) -> Result<(BatchLoss, Vec<f32>)> {
    let norm = loss.length_normalized();
    let scale = |j: usize| if norm { 1.0 / seqs[j].scored() as f32 } else { 1.0 };
    let pairs = refs.len();
    let pc: Vec<f32> = (0..pairs).map(|b| logps[2 * b] * scale(2 * b)).collect();
    let pr: Vec<f32> = (0..pairs).map(|b| logps[2 * b + 1] * scale(2 * b + 1)).collect();
    let rc: Vec<f32> = refs.iter().map(|r| r.0).collect();
    let rr: Vec<f32> = refs.iter().map(|r| r.1).collect();
    let bl = loss.batch(&pc, &pr, &rc, &rr)?;
    let mut dlogps = Vec::with_capacity(seqs.len());
    for b in 0..pairs {
        dlogps.push(bl.d_chosen[b] * scale(2 * b));
        dlogps.push(bl.d_rejected[b] * scale(2 * b + 1));
    }
    Ok((bl, dlogps))
}

/// The backward coefficients of [`dpo_batch`], for [`cpu_backward`] / [`gpu_backward`].
fn dpo_coefs<'a>(loss: &'a DpoLoss, seqs: &'a [Sequence], refs: &'a [(f32, f32)]) -> impl Fn(&[f32]) -> Result<Vec<f32>> + 'a {
    move |logps| Ok(dpo_batch(loss, seqs, logps, refs)?.1)
}

impl DpoObjective {
    pub fn new(policy: LlamaModel, reference: &LlamaModel, loss: DpoLoss, train: Vec<PairSeqs>, eval: Vec<PairSeqs>) -> Result<Self> {
        check_pairs(&train, &eval)?;
        let norm = loss.length_normalized();
        let logps = |pairs: &[PairSeqs]| -> Result<Vec<(f32, f32)>> {
            let lp = reference.sequence_logps(&pair_seqs(pairs)).map_err(TrainError::arch("reference model"))?;
            Ok(pair_logps(pairs, &lp, norm))
        };
        let (train_ref, eval_ref) = (logps(&train)?, logps(&eval)?);
        Self::with_reference_logps(policy, loss, train, train_ref, eval, eval_ref)
    }

    /// Like [`Self::new`] with the policy's forward and backward on `ctx` and
    /// every `cross_check_every`-th step (0: never) on the CPU model too,
    /// compared. The reference log-probs are computed on `ctx` as well, once,
    /// by the same GPU model holding the reference's weights first (the two
    /// share an architecture, so its kernels and buffers serve both).
    pub fn on_gpu(
        policy: LlamaModel,
        reference: &LlamaModel,
        loss: DpoLoss,
        train: Vec<PairSeqs>,
        eval: Vec<PairSeqs>,
        ctx: &GpuContext,
        cross_check_every: u64,
    ) -> Result<Self> {
        check_pairs(&train, &eval)?;
        let norm = loss.length_normalized();
        let gpu = GpuLlama::new(ctx, reference).map_err(TrainError::gpu("uploading the reference model"))?;
        let logps = |pairs: &[PairSeqs]| -> Result<Vec<(f32, f32)>> {
            let lp = gpu.sequence_logps(&pair_seqs(pairs)).map_err(TrainError::gpu("reference model"))?;
            Ok(pair_logps(pairs, &lp, norm))
        };
        let (train_ref, eval_ref) = (logps(&train)?, logps(&eval)?);
        gpu.upload(&policy.params).map_err(TrainError::gpu("uploading the policy"))?;
        let mut obj = Self::with_reference_logps(policy, loss, train, train_ref, eval, eval_ref)?;
        obj.gpu = Some(GpuPolicy::with_model(ctx, gpu, cross_check_every));
        if cross_check_every > 0 {
            let copy = LlamaModel::from_params(reference.config.clone(), reference.params.clone()).map_err(TrainError::arch("reference model"))?;
            obj.reference = Some(copy);
        }
        Ok(obj)
    }

    /// With reference log-probs given per pair (TRL's `ref_chosen_logps` /
    /// `ref_rejected_logps`, precomputed): summed for sigmoid and hinge,
    /// length-averaged for IPO, exactly as the loss consumes them.
    pub fn with_reference_logps(
        policy: LlamaModel,
        loss: DpoLoss,
        train: Vec<PairSeqs>,
        train_ref: Vec<(f32, f32)>,
        eval: Vec<PairSeqs>,
        eval_ref: Vec<(f32, f32)>,
    ) -> Result<Self> {
        check_pairs(&train, &eval)?;
        for (split, pairs, refs) in [("training", &train, &train_ref), ("evaluation", &eval, &eval_ref)] {
            if pairs.len() != refs.len() {
                return Err(TrainError::msg(format!("{split}: {} pairs but {} reference log-prob pairs", pairs.len(), refs.len())));
            }
            if let Some(i) = refs.iter().position(|r| !r.0.is_finite() || !r.1.is_finite()) {
                return Err(TrainError::msg(format!("{split} pair {i}: reference log-prob {:?} is not finite", refs[i])));
            }
        }
        Ok(Self { policy, gpu: None, reference: None, loss, train, train_ref, eval, eval_ref })
    }

    /// Moves the policy's forward and backward to `ctx` (the reference log-probs
    /// stay as they are), checked every `cross_check_every`-th step (0: never).
    pub fn policy_on_gpu(mut self, ctx: &GpuContext, cross_check_every: u64) -> Result<Self> {
        self.gpu = Some(GpuPolicy::new(ctx, &self.policy, cross_check_every)?);
        Ok(self)
    }
}

fn check_pairs(train: &[PairSeqs], eval: &[PairSeqs]) -> Result<()> {
    for (split, pairs) in [("training", train), ("evaluation", eval)] {
        if let Some(i) = pairs.iter().position(|p| p.chosen.scored() == 0 || p.rejected.scored() == 0) {
            return Err(TrainError::msg(format!("{split} pair {i}: empty chosen or rejected completion")));
        }
    }
    Ok(())
}

impl Objective for DpoObjective {
    fn num_examples(&self) -> usize {
        self.train.len()
    }

    fn gradient(&mut self, step: u64, params: &ParamSet, examples: &[usize]) -> Result<(ParamSet, Stats)> {
        let pairs: Vec<PairSeqs> = examples.iter().map(|&i| self.train[i].clone()).collect();
        let seqs = pair_seqs(&pairs);
        let refs: Vec<(f32, f32)> = examples.iter().map(|&i| self.train_ref[i]).collect();
        let loss = &self.loss;
        let mut cross_check_ms = 0.0;
        let mut cross_checked = false;
        let (logps, grads, head) = match &self.gpu {
            None => {
                self.policy.params.clone_from(params);
                cpu_backward(&self.policy, &seqs, dpo_coefs(loss, &seqs, &refs))?
            }
            Some(gpu) => {
                gpu.start(step, params)?;
                let (logps, grads, head) = gpu_backward(gpu, &seqs, dpo_coefs(loss, &seqs, &refs))?;
                if gpu.checks(step) {
                    let t = Instant::now();
                    let cpu_refs = match &self.reference {
                        Some(reference) => {
                            let lp = reference.sequence_logps(&seqs).map_err(TrainError::arch("reference model"))?;
                            let cpu_refs = pair_logps(&pairs, &lp, loss.length_normalized());
                            compare_logps(step, "reference", &flat(&refs), &flat(&cpu_refs))?;
                            cpu_refs
                        }
                        None => refs.clone(),
                    };
                    self.policy.params.clone_from(params);
                    let (cpu_logps, cpu_grads, _) = cpu_backward(&self.policy, &seqs, dpo_coefs(loss, &seqs, &cpu_refs))?;
                    compare_logps(step, "policy", &logps, &cpu_logps)?;
                    let (gpu_loss, cpu_loss) = (dpo_batch(loss, &seqs, &logps, &refs)?.0, dpo_batch(loss, &seqs, &cpu_logps, &cpu_refs)?.0);
                    compare_loss(step, gpu_loss.loss, cpu_loss.loss)?;
                    compare_gradients(step, &grads, &cpu_grads)?;
                    cross_check_ms = ms_since(t);
                    cross_checked = true;
                }
                (logps, grads, head)
            }
        };
        let (bl, _) = dpo_batch(loss, &seqs, &logps, &refs)?;
        let n = examples.len();
        let pref = pref_sums(n, &bl.metrics, &head);
        Ok((grads, Stats { count: n, loss_sum: bl.loss * n as f64, pref: Some(pref), cross_checked, cross_check_ms }))
    }

    fn evaluate(&mut self, params: &ParamSet) -> Result<Option<Stats>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let seqs = pair_seqs(&self.eval);
        let (lp, head) = match &self.gpu {
            None => {
                self.policy.params.clone_from(params);
                self.policy.sequence_logps_and_head(&seqs).map_err(TrainError::arch("policy evaluation"))?
            }
            Some(gpu) => {
                gpu.upload(params)?;
                let (lp, head) = gpu.model.sequence_logps_and_head(&seqs).map_err(TrainError::gpu("policy evaluation"))?;
                (lp, head)
            }
        };
        let lp = pair_logps(&self.eval, &lp, self.loss.length_normalized());
        let pc: Vec<f32> = lp.iter().map(|x| x.0).collect();
        let pr: Vec<f32> = lp.iter().map(|x| x.1).collect();
        let rc: Vec<f32> = self.eval_ref.iter().map(|x| x.0).collect();
        let rr: Vec<f32> = self.eval_ref.iter().map(|x| x.1).collect();
        let bl = self.loss.batch(&pc, &pr, &rc, &rr)?;
        let n = self.eval.len();
        let pref = pref_sums(n, &bl.metrics, &head);
        Ok(Some(Stats { count: n, loss_sum: bl.loss * n as f64, pref: Some(pref), cross_checked: false, cross_check_ms: 0.0 }))
    }

    fn model_device(&self) -> String {
        self.gpu.as_ref().map_or_else(|| "cpu".to_string(), |g| g.device.clone())
    }

    fn example_tokens(&self, example: usize) -> usize {
        let pair = &self.train[example];
        pair.chosen.tokens.len() + pair.rejected.tokens.len()
    }

    fn recycle_gradient(&mut self, grads: ParamSet) {
        self.policy.recycle_grads(grads);
    }

    fn resident_model(&self, step: u64) -> Option<&GpuLlama> {
        self.gpu.as_ref()?.resident(step)
    }

    fn gpu_model(&self) -> Option<&GpuLlama> {
        self.gpu.as_ref().map(|g| &g.model)
    }

    fn accumulate_on_device(&mut self, step: u64, params: Option<&ParamSet>, examples: &[usize], scale: f32, first: bool) -> Result<Stats> {
        let gpu = self.gpu.as_ref().ok_or_else(|| TrainError::msg(format!("step {step}: the policy is not on a GPU")))?;
        gpu.begin_accumulate(step, params, first)?;
        let pairs: Vec<PairSeqs> = examples.iter().map(|&i| self.train[i].clone()).collect();
        let seqs = pair_seqs(&pairs);
        let refs: Vec<(f32, f32)> = examples.iter().map(|&i| self.train_ref[i]).collect();
        let loss = &self.loss;
        let coefs = |logps: &[f32]| -> Result<Vec<f32>> {
            Ok(dpo_batch(loss, &seqs, logps, &refs)?.1.into_iter().map(|c| c * scale).collect())
        };
        let (logps, head) = gpu.accumulate(&seqs, coefs)?;
        let (bl, _) = dpo_batch(loss, &seqs, &logps, &refs)?;
        let n = examples.len();
        Ok(Stats { count: n, loss_sum: bl.loss * n as f64, pref: Some(pref_sums(n, &bl.metrics, &head)), ..Default::default() })
    }

    fn device_weights_are(&self, step: u64) {
        if let Some(gpu) = &self.gpu {
            gpu.weights_of_step.set(Some(step));
        }
    }
}
