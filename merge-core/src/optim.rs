//! The optimizer front for hosts: one configuration, one plan per step, and a
//! whole-tensor `step_tensor` that validates the whole tensor before writing it.

use crate::dare::{self, DareConfig, DareParams};
use crate::dtype::{Dst, Src};
use crate::error::{Error, tensor_name};
use crate::hyper::{AdamConfig, StepScalars, invalid};
use crate::rng::{MaskKey, check_extent, tensor_id};
use crate::step::{MergePlan, Norms, Phase, Rescale, StateMut, TensorStep};

/// What is merged into each update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Merge {
    /// Plain AdamW.
    None,
    /// OnDARE.
    Dare(DareConfig),
}

/// Everything that defines an online merging optimizer run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OnlineConfig {
    pub adam: AdamConfig,
    pub merge: Merge,
    /// Merge every `k` steps (step-K, SPEC.md §5.4); 1 is online merging.
    pub k: u32,
    /// Seed of every random mask.
    pub seed: u64,
}

impl Default for OnlineConfig {
    fn default() -> Self {
        OnlineConfig { adam: AdamConfig::default(), merge: Merge::Dare(DareConfig::default()), k: 1, seed: 0 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum MergeParams {
    None,
    Dare(DareParams),
}

/// A validated configuration and the number of steps taken.
#[derive(Clone, Debug)]
pub struct Optimizer {
    config: OnlineConfig,
    merge: MergeParams,
    steps: u64,
}

impl Optimizer {
    pub fn new(config: OnlineConfig) -> Result<Self, Error> {
        config.adam.validate()?;
        if config.k == 0 {
            return Err(invalid("k (merge every k steps)", 0.0, ">= 1"));
        }
        let merge = match config.merge {
            Merge::None => MergeParams::None,
            Merge::Dare(d) => MergeParams::Dare(d.params()?),
        };
        Ok(Optimizer { config, merge, steps: 0 })
    }

    pub fn config(&self) -> &OnlineConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Whether tensors need a cached-delta slice (`Δ_c`, step-K with `k > 1`).
    pub fn needs_cached_delta(&self) -> bool {
        self.config.k > 1
    }

    /// Starts the next step (1-based) and returns its plan.
    pub fn begin_step(&mut self) -> Result<StepPlan, Error> {
        let plan = self.plan(self.steps + 1)?;
        self.steps += 1;
        Ok(plan)
    }

    /// The plan of step `k` (1-based), independent of the steps taken.
    pub fn plan(&self, k: u64) -> Result<StepPlan, Error> {
        let scalars = self.config.adam.scalars(k)?;
        let phase = if k % u64::from(self.config.k) == 0 { Phase::Merge } else { Phase::Accumulate };
        Ok(StepPlan { k, scalars, phase, seed: self.config.seed, merge: self.merge, need_cached: self.needs_cached_delta() })
    }

    /// Computes a tensor's stored task vector `τ'` from its base and SFT weights
    /// (SPEC.md §5.2); validated before anything is written.
    pub fn init_task_vector(&self, name: &str, base: Src<'_>, sft: Src<'_>, out: &mut Dst<'_>) -> Result<(), Error> {
        match self.merge {
            MergeParams::Dare(p) => dare::init_tau(&p, self.config.seed, name, base, sft, out),
            MergeParams::None => Err(invalid("merge", 0.0, "a merge method (plain AdamW has no task vector)")),
        }
    }
}

/// One step of the optimizer, for every tensor.
#[derive(Clone, Copy, Debug)]
pub struct StepPlan {
    k: u64,
    scalars: StepScalars,
    phase: Phase,
    seed: u64,
    merge: MergeParams,
    need_cached: bool,
}

/// One tensor's slices for a whole-tensor step.
#[derive(Debug)]
pub struct TensorState<'a> {
    pub theta: &'a mut [f32],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
    /// `Δ_c`, required when `k > 1`.
    pub cached: Option<&'a mut [f32]>,
    /// The stored task vector `τ'` (unused by plain AdamW).
    pub tau: Src<'a>,
}

impl StepPlan {
    /// The 1-based step number.
    pub fn step(&self) -> u64 {
        self.k
    }

    pub fn scalars(&self) -> &StepScalars {
        &self.scalars
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The chunk-level plan of one tensor (rescale not yet known: see
    /// [`StepPlan::needs_norms`] and [`Norms::rescale`]).
    pub fn tensor<'n>(&self, name: &'n str, len: u64) -> Result<TensorStep<'n>, Error> {
        check_extent(name, 0, len.min(usize::MAX as u64) as usize)?;
        let merge = match self.merge {
            MergeParams::None => MergePlan::None,
            MergeParams::Dare(params) => MergePlan::Dare { params, key: MaskKey::new(self.seed, tensor_id(name), self.k as u32) },
        };
        Ok(TensorStep { name, len, scalars: self.scalars, phase: self.phase, merge, rescale: Rescale::Off })
    }

    /// Whether this step needs the L1 norms pass before the rescale is known.
    pub fn needs_norms(&self) -> bool {
        matches!(self.merge, MergeParams::Dare(p) if p.rescale) && self.phase == Phase::Merge
    }

    /// The clip value the rescale clamps to.
    pub fn clip(&self) -> f32 {
        match self.merge {
            MergeParams::Dare(p) => p.clip,
            MergeParams::None => 0.0,
        }
    }

    /// Steps one whole tensor in place: norms (if the rescale needs them), then a
    /// validating pass, then the writing pass. On error nothing is written.
    pub fn step_tensor(&self, name: &str, grad: &[f32], state: TensorState<'_>) -> Result<(), Error> {
        let TensorState { theta, m, v, cached, tau } = state;
        if self.need_cached && cached.is_none() {
            return Err(Error::LengthMismatch { tensor: tensor_name(name), what: "cached delta (required when k > 1)", expected: grad.len() as u64, found: 0 });
        }
        let mut plan = self.tensor(name, grad.len() as u64)?;
        let mut st = StateMut { theta, m, v, cached };
        if self.needs_norms() {
            let mut norms = Norms::default();
            plan.scan_chunk(0, grad, st.as_ref(), tau, Some(&mut norms), None)?;
            plan.rescale = norms.rescale(name, self.scalars.eps, self.clip())?;
        }
        plan.check_chunk(0, grad, st.as_ref(), tau)?;
        plan.write_chunk(0, grad, StateMut { theta: st.theta, m: st.m, v: st.v, cached: st.cached.as_deref_mut() }, tau)
    }
}
