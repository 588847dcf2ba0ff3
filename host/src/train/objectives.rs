//! The trainer's objectives on the Llama model: next-token cross-entropy
//! (pretraining, SFT) and the DPO family against a frozen reference.

use crate::loss::DpoLoss;
use crate::model::llama::{LlamaModel, Sequence};
use crate::params::ParamSet;

use super::run::{Objective, PrefSums, Stats};
use super::{Result, TrainError};

fn model_err(what: &str) -> impl Fn(crate::model::llama::ModelError) -> TrainError + '_ {
    move |e| TrainError::msg(format!("{what}: {e}"))
}

/// Mean next-token cross-entropy over the scored tokens of a batch.
pub struct LmObjective {
    model: LlamaModel,
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
        Ok(Self { model, train, eval })
    }
}

impl Objective for LmObjective {
    fn num_examples(&self) -> usize {
        self.train.len()
    }

    fn gradient(&mut self, params: &ParamSet, examples: &[usize]) -> Result<(ParamSet, Stats)> {
        self.model.params.clone_from(params);
        let seqs: Vec<Sequence> = examples.iter().map(|&i| self.train[i].clone()).collect();
        let tokens: usize = seqs.iter().map(Sequence::scored).sum();
        let mut grads = self.model.zero_grads();
        let ce = self
            .model
            .cross_entropy_backward(&seqs, 1.0 / tokens as f32, &mut grads)
            .map_err(model_err("forward/backward"))?;
        let mean = ce.nll_sum / ce.tokens.max(1) as f64;
        Ok((grads, Stats { count: examples.len(), loss_sum: mean * examples.len() as f64, pref: None }))
    }

    fn evaluate(&mut self, params: &ParamSet) -> Result<Option<Stats>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        self.model.params.clone_from(params);
        let ce = self.model.cross_entropy(&self.eval).map_err(model_err("evaluation"))?;
        let mean = ce.nll_sum / ce.tokens.max(1) as f64;
        Ok(Some(Stats { count: self.eval.len(), loss_sum: mean * self.eval.len() as f64, pref: None }))
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
    loss: DpoLoss,
    train: Vec<PairSeqs>,
    train_ref: Vec<(f32, f32)>,
    eval: Vec<PairSeqs>,
    eval_ref: Vec<(f32, f32)>,
}

/// Summed (or, for IPO, length-averaged) log-probs of each pair's completions.
fn pair_logps(what: &str, model: &LlamaModel, pairs: &[PairSeqs], normalize: bool) -> Result<Vec<(f32, f32)>> {
    let seqs: Vec<Sequence> = pairs.iter().flat_map(|p| [p.chosen.clone(), p.rejected.clone()]).collect();
    let lp = model.sequence_logps(&seqs).map_err(model_err(what))?;
    Ok(pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (c, r) = (lp[2 * i], lp[2 * i + 1]);
            if normalize { (c / p.chosen.scored() as f32, r / p.rejected.scored() as f32) } else { (c, r) }
        })
        .collect())
}

fn pref_sums(n: usize, m: &crate::loss::DpoMetrics) -> PrefSums {
    let n = n as f64;
    PrefSums {
        rewards_chosen: m.rewards_chosen * n,
        rewards_rejected: m.rewards_rejected * n,
        // An exact count again (the mean is count / n, correctly rounded).
        correct: (m.rewards_accuracies * n).round(),
        logps_chosen: m.logps_chosen * n,
        logps_rejected: m.logps_rejected * n,
    }
}

impl DpoObjective {
    pub fn new(policy: LlamaModel, reference: &LlamaModel, loss: DpoLoss, train: Vec<PairSeqs>, eval: Vec<PairSeqs>) -> Result<Self> {
        for (split, pairs) in [("training", &train), ("evaluation", &eval)] {
            if let Some(i) = pairs.iter().position(|p| p.chosen.scored() == 0 || p.rejected.scored() == 0) {
                return Err(TrainError::msg(format!("{split} pair {i}: empty chosen or rejected completion")));
            }
        }
        let norm = loss.length_normalized();
        let train_ref = pair_logps("reference model", reference, &train, norm)?;
        let eval_ref = pair_logps("reference model", reference, &eval, norm)?;
        Self::with_reference_logps(policy, loss, train, train_ref, eval, eval_ref)
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
        for (split, pairs, refs) in [("training", &train, &train_ref), ("evaluation", &eval, &eval_ref)] {
            if pairs.len() != refs.len() {
                return Err(TrainError::msg(format!("{split}: {} pairs but {} reference log-prob pairs", pairs.len(), refs.len())));
            }
            if let Some(i) = pairs.iter().position(|p| p.chosen.scored() == 0 || p.rejected.scored() == 0) {
                return Err(TrainError::msg(format!("{split} pair {i}: empty chosen or rejected completion")));
            }
            if let Some(i) = refs.iter().position(|r| !r.0.is_finite() || !r.1.is_finite()) {
                return Err(TrainError::msg(format!("{split} pair {i}: reference log-prob {:?} is not finite", refs[i])));
            }
        }
        Ok(Self { policy, loss, train, train_ref, eval, eval_ref })
    }
}

impl Objective for DpoObjective {
    fn num_examples(&self) -> usize {
        self.train.len()
    }

    fn gradient(&mut self, params: &ParamSet, examples: &[usize]) -> Result<(ParamSet, Stats)> {
        self.policy.params.clone_from(params);
        let seqs: Vec<Sequence> =
            examples.iter().flat_map(|&i| [self.train[i].chosen.clone(), self.train[i].rejected.clone()]).collect();
        let fwd = self.policy.forward(&seqs).map_err(model_err("policy forward"))?;
        let norm = self.loss.length_normalized();
        let scale = |j: usize| if norm { 1.0 / seqs[j].scored() as f32 } else { 1.0 };
        let pc: Vec<f32> = (0..examples.len()).map(|b| fwd.logps[2 * b] * scale(2 * b)).collect();
        let pr: Vec<f32> = (0..examples.len()).map(|b| fwd.logps[2 * b + 1] * scale(2 * b + 1)).collect();
        let rc: Vec<f32> = examples.iter().map(|&i| self.train_ref[i].0).collect();
        let rr: Vec<f32> = examples.iter().map(|&i| self.train_ref[i].1).collect();
        let bl = self.loss.batch(&pc, &pr, &rc, &rr).map_err(|e| TrainError::msg(e.to_string()))?;
        let mut dlogps = Vec::with_capacity(seqs.len());
        for b in 0..examples.len() {
            dlogps.push(bl.d_chosen[b] * scale(2 * b));
            dlogps.push(bl.d_rejected[b] * scale(2 * b + 1));
        }
        let mut grads = self.policy.zero_grads();
        self.policy.backward(&fwd, &dlogps, &mut grads).map_err(model_err("policy backward"))?;
        let n = examples.len();
        Ok((grads, Stats { count: n, loss_sum: bl.loss * n as f64, pref: Some(pref_sums(n, &bl.metrics)) }))
    }

    fn evaluate(&mut self, params: &ParamSet) -> Result<Option<Stats>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        self.policy.params.clone_from(params);
        let lp = pair_logps("policy evaluation", &self.policy, &self.eval, self.loss.length_normalized())?;
        let pc: Vec<f32> = lp.iter().map(|x| x.0).collect();
        let pr: Vec<f32> = lp.iter().map(|x| x.1).collect();
        let rc: Vec<f32> = self.eval_ref.iter().map(|x| x.0).collect();
        let rr: Vec<f32> = self.eval_ref.iter().map(|x| x.1).collect();
        let bl = self.loss.batch(&pc, &pr, &rc, &rr).map_err(|e| TrainError::msg(e.to_string()))?;
        let n = self.eval.len();
        Ok(Some(Stats { count: n, loss_sum: bl.loss * n as f64, pref: Some(pref_sums(n, &bl.metrics)) }))
    }
}
