//! The optimizer driver: owns the master weights and the optimizer state, runs each
//! step on merge-core (the CPU reference), and exposes the state for checkpoints.

use std::collections::BTreeMap;
use std::time::Instant;

use merge_core::dare::{DareConfig, DareVariant};
use merge_core::dtype::{Dst, Src};
use merge_core::hyper::{AdamConfig, AdamForm as CoreAdamForm, Schedule};
use merge_core::optim::{Merge, OnlineConfig, Optimizer as CoreOptimizer, TensorState};

use super::config::{AdamForm, Algorithm, OptimConfig, ScheduleKind, Variant};
use super::{Result, TrainError};
use crate::params::ParamSet;

/// State kinds as stored in checkpoints (PyTorch's names where it has them).
pub const EXP_AVG: &str = "exp_avg";
pub const EXP_AVG_SQ: &str = "exp_avg_sq";
pub const DELTA_C: &str = "delta_c";
pub const TAU: &str = "tau_ref";

/// What one step cost and which learning rate it used.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepReport {
    pub learning_rate: f32,
    pub optimizer_ms: f64,
    pub cross_check_ms: f64,
}

/// The merge-core configuration of `cfg`.
pub fn core_config(cfg: &OptimConfig) -> Result<OnlineConfig> {
    let adam = AdamConfig {
        form: match cfg.adam_form {
            AdamForm::Torch => CoreAdamForm::Torch,
            AdamForm::Hf => CoreAdamForm::HuggingFace,
        },
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
        schedule: match cfg.schedule {
            ScheduleKind::Constant => Schedule::Constant,
            ScheduleKind::WarmupCosine => Schedule::WarmupCosine { warmup: cfg.warmup_steps, total: cfg.total_steps },
        },
    };
    let merge = match cfg.algorithm {
        Algorithm::Adamw => Merge::None,
        Algorithm::Ondare => Merge::Dare(DareConfig {
            variant: match cfg.variant {
                Variant::Reference => DareVariant::Reference,
                Variant::Paper => DareVariant::Paper,
            },
            p: cfg.p,
            alpha: cfg.alpha,
            rescale: cfg.rescale,
            clip: cfg.clip,
        }),
        Algorithm::Onties => {
            return Err(TrainError::msg(
                "--optimizer onties: merge-core's optimizer front (merge_core::optim::Merge) offers no OnTIES yet",
            ));
        }
    };
    Ok(OnlineConfig { adam, merge, k: cfg.k, seed: cfg.seed })
}

/// Checks that `other` has exactly the names and shapes of `params`; `what` names the
/// other set in the error (e.g. "gradient", "base model").
pub fn check_layout(params: &ParamSet, other: &ParamSet, what: &str) -> Result<()> {
    for t in &params.tensors {
        match other.get(&t.name) {
            None => return Err(TrainError::msg(format!("{what}: tensor `{}` is missing", t.name))),
            Some(o) if o.shape != t.shape || o.data.len() != t.data.len() => {
                return Err(TrainError::msg(format!(
                    "{what}: tensor `{}` has shape {:?}, the policy has {:?}",
                    t.name, o.shape, t.shape
                )));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = other.tensors.iter().find(|o| params.get(&o.name).is_none()) {
        return Err(TrainError::msg(format!("{what}: tensor `{}` is not a parameter of the policy", extra.name)));
    }
    Ok(())
}

/// Lowest non-finite element of any gradient tensor, checked before any tensor is
/// stepped so that a bad gradient leaves the whole model unchanged.
pub fn check_gradients(step: u64, grads: &ParamSet) -> Result<()> {
    for t in &grads.tensors {
        if let Some(i) = t.data.iter().position(|x| merge_core::arith::is_non_finite(*x)) {
            return Err(TrainError::msg(format!(
                "step {step}: gradient of tensor `{}` is non-finite at element {i} (bits 0x{:08x}); nothing was updated",
                t.name,
                t.data[i].to_bits()
            )));
        }
    }
    Ok(())
}

/// The optimizer and the state it owns, stepped by merge-core.
pub struct Optimizer {
    cfg: OptimConfig,
    core: CoreOptimizer,
    step: u64,
    params: ParamSet,
    m: ParamSet,
    v: ParamSet,
    cached: Option<ParamSet>,
    tau: Option<ParamSet>,
}

impl Optimizer {
    /// Starts at `params` (step 0). Merging optimizers need the task delta: `task`
    /// gives the base and SFT weights (same layout as `params`).
    pub fn new(cfg: OptimConfig, params: ParamSet, task: Option<(&ParamSet, &ParamSet)>) -> Result<Self> {
        cfg.validate()?;
        let core = CoreOptimizer::new(core_config(&cfg)?)?;
        let tau = match (cfg.algorithm, task) {
            (Algorithm::Adamw, _) => None,
            (_, None) => {
                return Err(TrainError::msg(format!(
                    "--optimizer {:?}: merging needs the base model (--base) and the SFT model",
                    cfg.algorithm
                )));
            }
            (_, Some((base, sft))) => {
                check_layout(&params, base, "base model")?;
                check_layout(&params, sft, "SFT model")?;
                let mut tau = params.zeros_like();
                for t in &mut tau.tensors {
                    let b = base.get(&t.name).expect("layout checked");
                    let s = sft.get(&t.name).expect("layout checked");
                    core.init_task_vector(&t.name, Src::F32(&b.data), Src::F32(&s.data), &mut Dst::F32(&mut t.data))?;
                }
                Some(tau)
            }
        };
        let cached = core.needs_cached_delta().then(|| params.zeros_like());
        Ok(Self { m: params.zeros_like(), v: params.zeros_like(), cached, tau, core, step: 0, params, cfg })
    }

    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Steps completed.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The current master weights.
    pub fn params(&self) -> &ParamSet {
        &self.params
    }

    /// Runs step `steps() + 1`. On error (non-finite gradient, shape mismatch, a
    /// non-finite result) the step is not counted; merge-core writes nothing for the
    /// failing tensor, and gradients are checked for all tensors up front.
    pub fn step(&mut self, grads: &ParamSet) -> Result<StepReport> {
        let k = self.step + 1;
        check_layout(&self.params, grads, &format!("step {k}: gradient"))?;
        check_gradients(k, grads)?;
        let t = Instant::now();
        let plan = self.core.plan(k)?;
        for (i, g) in grads.tensors.iter().enumerate() {
            // Plain AdamW has no τ', but merge-core slices the τ' source per block
            // even when it never reads it; the gradient has the right length.
            let tau = self.tau.as_ref().map_or(g.data.as_slice(), |t| t.tensors[i].data.as_slice());
            let state = TensorState {
                theta: &mut self.params.tensors[i].data,
                m: &mut self.m.tensors[i].data,
                v: &mut self.v.tensors[i].data,
                cached: self.cached.as_mut().map(|c| c.tensors[i].data.as_mut_slice()),
                tau: Src::F32(tau),
            };
            plan.step_tensor(&g.name, &g.data, state).map_err(|e| TrainError::msg(format!("step {k}: {e}")))?;
        }
        self.step = k;
        Ok(StepReport {
            learning_rate: plan.scalars().lr,
            optimizer_ms: t.elapsed().as_secs_f64() * 1e3,
            cross_check_ms: 0.0,
        })
    }

    /// The optimizer state by kind, for checkpoints.
    pub fn export_state(&self) -> Result<BTreeMap<String, ParamSet>> {
        let mut out = BTreeMap::new();
        out.insert(EXP_AVG.to_string(), self.m.clone());
        out.insert(EXP_AVG_SQ.to_string(), self.v.clone());
        if let Some(c) = &self.cached {
            out.insert(DELTA_C.to_string(), c.clone());
        }
        if let Some(t) = &self.tau {
            out.insert(TAU.to_string(), t.clone());
        }
        Ok(out)
    }

    /// Replaces weights and state with a checkpoint's, after checking that the saved
    /// state has exactly the kinds and layouts this configuration uses.
    pub fn restore(&mut self, step: u64, params: ParamSet, mut state: BTreeMap<String, ParamSet>) -> Result<()> {
        check_layout(&self.params, &params, "checkpoint weights")?;
        let expected = self.export_state()?;
        let want: Vec<&String> = expected.keys().collect();
        let have: Vec<&String> = state.keys().collect();
        if want != have {
            return Err(TrainError::msg(format!(
                "checkpoint optimizer state has kinds {have:?}, this optimizer configuration uses {want:?}"
            )));
        }
        for (kind, set) in &state {
            check_layout(&self.params, set, &format!("checkpoint optimizer state `{kind}`"))?;
        }
        let mut take = |k: &str| state.remove(k).expect("kinds checked");
        self.m = take(EXP_AVG);
        self.v = take(EXP_AVG_SQ);
        self.cached = self.cached.is_some().then(|| take(DELTA_C));
        if let Some(tau) = &self.tau {
            // τ' was just recomputed from the base and SFT models given now; the saved
            // one must be the same bits, or those models are not the ones the
            // checkpointed run merged with.
            let saved = take(TAU);
            if let Some((name, i)) = first_difference(tau, &saved) {
                return Err(TrainError::msg(format!(
                    "checkpoint task vector differs from the one computed from the given base and SFT models \
                     (tensor `{name}`, element {i}): resume with the same --base and SFT model"
                )));
            }
        }
        self.params = params;
        self.step = step;
        Ok(())
    }
}

/// The first tensor name and element index where two same-layout sets differ in bits.
pub fn first_difference(a: &ParamSet, b: &ParamSet) -> Option<(String, usize)> {
    a.tensors.iter().zip(&b.tensors).find_map(|(x, y)| {
        x.data.iter().zip(&y.data).position(|(p, q)| p.to_bits() != q.to_bits()).map(|i| (x.name.clone(), i))
    })
}
