//! The optimizer front for hosts: one configuration, one plan per step, and
//! `step_tensors`, which validates every tensor before writing any.
//!
//! ```
//! use merge_core::dare::DareConfig;
//! use merge_core::dtype::{Dst, Src};
//! use merge_core::optim::{Merge, OnlineConfig, Optimizer, StepJob};
//! use merge_core::step::StateMut;
//!
//! // OnDARE with the paper's defaults (p = 0.01, α = 1e-7), HF-form AdamW, lr 1e-6.
//! let mut opt = Optimizer::new(OnlineConfig { merge: Merge::Dare(DareConfig::default()), seed: 42, ..OnlineConfig::default() })?;
//! let (base, sft) = ([0.5f32, -0.25, 1.0], [0.5f32, -0.20, 1.5]);
//! let mut tau = [0.0f32; 3]; // τ' = DARE(θ_sft − θ_base), once
//! opt.init_task_vector("layer.w", Src::F32(&base), Src::F32(&sft), &mut Dst::F32(&mut tau))?;
//! let (mut theta, mut m, mut v) = (sft, [0.0f32; 3], [0.0f32; 3]);
//! let grad = [0.1f32, -0.2, 0.3];
//! let plan = opt.begin_step()?; // step 1: scalars, masks' keys
//! let state = StateMut { theta: &mut theta, m: &mut m, v: &mut v, cached: None };
//! plan.step_tensors(&mut [StepJob { name: "layer.w", grad: &grad, state, tau: Src::F32(&tau), scratch: &mut [] }])?;
//! assert!(theta.iter().zip(&sft).any(|(a, b)| a != b));
//! # Ok::<(), merge_core::Error>(())
//! ```

use crate::arith::{is_non_finite, mul, sub};
use crate::dare::{self, DareConfig, DareParams, validate_alpha, validate_p};
use crate::dtype::{Dst, Src, store_error};
use crate::error::{Error, tensor_name};
use crate::hyper::{AdamConfig, StepScalars, invalid};
use crate::onties::{self, TiesSelection};
use crate::rng::{MaskKey, check_extent, tensor_id};
use crate::step::{ChunkPasses, MergePlan, Norms, Phase, Portable, Rescale, StateMut, StateRef, TensorStep};
use crate::topk;

/// What is merged into each update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Merge {
    /// Plain AdamW.
    None,
    /// OnDARE.
    Dare(DareConfig),
    /// OnTIES.
    Ties(TiesConfig),
}

/// Where OnTIES trims (SPEC.md §4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Each tensor keeps its own `⌈p·n⌉` largest magnitudes (the official code).
    PerTensor,
    /// One threshold over all tensors, concatenated in bytewise name order.
    Global,
}

/// OnTIES hyperparameters as the user gives them (SPEC.md §5.3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TiesConfig {
    pub variant: onties::Variant,
    /// Reserve rate `p ∈ (0, 1]`: the fraction of largest magnitudes kept.
    pub p: f64,
    /// Merge weight `α ∈ [0, 1]`.
    pub alpha: f64,
    /// L1 rescale of the trimmed values (no `ε`, no clamp).
    pub rescale: bool,
    pub scope: Scope,
}

impl Default for TiesConfig {
    /// The paper's defaults: `p = 0.01`, `α = 1e-7`, per tensor, no rescale.
    fn default() -> Self {
        TiesConfig { variant: onties::Variant::Reference, p: 0.01, alpha: 1e-7, rescale: false, scope: Scope::PerTensor }
    }
}

/// OnTIES hyperparameters after validation, as the arithmetic uses them (SPEC.md
/// §5.3): a GPU or other runtime reads them here instead of deriving them again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TiesParams {
    pub variant: onties::Variant,
    /// `p₃₂ = RN(p)`, not flushed (SPEC.md §1.6); `⌈p₃₂·n⌉` is the keep count.
    pub p: f32,
    /// `α₃₂ = F(RN(α))`.
    pub alpha: f32,
    /// `F(RN(1 − α))`.
    pub one_minus_alpha: f32,
    pub rescale: bool,
    pub scope: Scope,
}

impl TiesConfig {
    fn params(&self) -> Result<TiesParams, Error> {
        let p = validate_p(self.p)?;
        // k = ⌈p·n⌉ is computed from p's bits, which must be a normal binary32.
        topk::keep_count("p (reserve rate)", p, 1)?;
        let (alpha, one_minus_alpha) = validate_alpha(self.alpha)?;
        Ok(TiesParams { variant: self.variant, p, alpha, one_minus_alpha, rescale: self.rescale, scope: self.scope })
    }
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
    Ties(TiesParams),
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
            Merge::Ties(t) => MergeParams::Ties(t.params()?),
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

    /// Sets the steps taken: a caller that plans step `k` with [`Optimizer::plan`]
    /// records it here once the step has succeeded, and a resumed run records its
    /// checkpoint's count. The count is the caller's one step counter.
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// OnTIES's validated hyperparameters (`None` for the other merges).
    pub fn ties(&self) -> Option<&TiesParams> {
        match &self.merge {
            MergeParams::Ties(t) => Some(t),
            _ => None,
        }
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
        let phase = if k.is_multiple_of(u64::from(self.config.k)) { Phase::Merge } else { Phase::Accumulate };
        Ok(StepPlan { k, scalars, phase, seed: self.config.seed, merge: self.merge, need_cached: self.needs_cached_delta() })
    }

    /// Computes a tensor's stored task vector `τ'` from its base and SFT weights
    /// (SPEC.md §5.2, §5.3); validated before anything is written. OnTIES needs a
    /// binary32 scratch for `τ`: use [`Optimizer::init_task_vectors`].
    pub fn init_task_vector(&self, name: &str, base: Src<'_>, sft: Src<'_>, out: &mut Dst<'_>) -> Result<(), Error> {
        match self.merge {
            MergeParams::Dare(p) => dare::init_tau(&p, self.config.seed, name, base, sft, out),
            MergeParams::Ties(_) => Err(Error::LengthMismatch { tensor: tensor_name(name), what: "task-vector scratch (OnTIES: use init_task_vectors)", expected: out.len() as u64, found: 0 }),
            MergeParams::None => Err(Error::Misuse { what: "a task vector needs a merge method (plain AdamW has none)" }),
        }
    }

    /// Computes the stored task vectors of several tensors: for OnTIES with global
    /// scope the tensors must come in bytewise ascending name order (the scope's
    /// sequence, SPEC.md §4.4) and all share one threshold. Every tensor is
    /// validated before any is written.
    pub fn init_task_vectors(&self, jobs: &mut [TaskVectorJob<'_>]) -> Result<(), Error> {
        let t = match self.merge {
            MergeParams::Ties(t) => t,
            _ => {
                for job in jobs.iter_mut() {
                    self.init_task_vector(job.name, job.base, job.sft, &mut job.out)?;
                }
                return Ok(());
            }
        };
        if t.scope == Scope::Global {
            check_name_order(jobs.iter().map(|j| j.name))?;
        }
        // τ = θ_sft ⊖ θ_base into each scratch, validated.
        for job in jobs.iter_mut() {
            let n = job.out.len();
            for (what, len) in [("base weights", job.base.len()), ("SFT weights", job.sft.len()), ("task-vector scratch", job.scratch.len())] {
                if len != n {
                    return Err(Error::LengthMismatch { tensor: tensor_name(job.name), what, expected: n as u64, found: len as u64 });
                }
            }
            check_extent(job.name, 0, n)?;
            for i in 0..n {
                let (b, f) = (job.base.get(i), job.sft.get(i));
                for (x, what) in [(b, "base weights"), (f, "SFT weights")] {
                    if is_non_finite(x) {
                        return Err(Error::NonFinite { tensor: tensor_name(job.name), what, index: i as u64 });
                    }
                }
                let tau = sub(f, b);
                if is_non_finite(tau) {
                    return Err(Error::NonFinite { tensor: tensor_name(job.name), what: "task vector (SFT - base)", index: i as u64 });
                }
                job.scratch[i] = tau;
            }
        }
        // Selections: one per tensor, or one over the whole sequence.
        let mut global = None;
        if t.scope == Scope::Global {
            global = Some(onties::select(t.p, t.rescale, "all tensors (global scope)", jobs.iter().map(|j| &*j.scratch))?);
        }
        for pass in [false, true] {
            let mut offset = 0u64;
            for job in jobs.iter_mut() {
                let sel = match global {
                    Some(g) => g,
                    None => onties::select(t.p, t.rescale, job.name, core::iter::once(&*job.scratch))?,
                };
                let local = if t.scope == Scope::Global { offset } else { 0 };
                for i in 0..job.scratch.len() {
                    let kept = onties::trim(job.scratch[i], local + i as u64, &sel.threshold);
                    let value = mul(kept, sel.factor);
                    let dtype = job.out.dtype();
                    if pass {
                        job.out.store(i, value).map_err(|e| store_error(job.name, "task vector", i as u64, e, dtype))?;
                    } else {
                        job.out.check(value).map_err(|e| store_error(job.name, "task vector", i as u64, e, dtype))?;
                    }
                }
                offset += job.scratch.len() as u64;
            }
        }
        Ok(())
    }
}

/// One tensor's inputs and output for [`Optimizer::init_task_vectors`].
#[derive(Debug)]
pub struct TaskVectorJob<'a> {
    pub name: &'a str,
    pub base: Src<'a>,
    pub sft: Src<'a>,
    pub out: Dst<'a>,
    /// Binary32 room for `τ` (OnTIES; may be empty for OnDARE).
    pub scratch: &'a mut [f32],
}

/// Global scope needs the tensors in bytewise ascending name order, each once.
fn check_name_order<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), Error> {
    let mut prev: Option<&str> = None;
    for name in names {
        if let Some(p) = prev && p.as_bytes() >= name.as_bytes() {
            return Err(Error::Misuse { what: "global-scope tensors in strictly ascending bytewise name order" });
        }
        prev = Some(name);
    }
    Ok(())
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

    /// The chunk-level plan of one tensor (rescale and OnTIES selection not yet
    /// known: see [`StepPlan::needs_norms`], [`Norms::rescale`] and
    /// [`StepPlan::step_tensors`]).
    pub fn tensor<'n>(&self, name: &'n str, len: u64) -> Result<TensorStep<'n>, Error> {
        check_extent(name, 0, len.min(usize::MAX as u64) as usize)?;
        let merge = match self.merge {
            MergeParams::None => MergePlan::None,
            MergeParams::Dare(params) => MergePlan::Dare { params, key: MaskKey::new(self.seed, tensor_id(name), self.k as u32) },
            MergeParams::Ties(t) => MergePlan::Ties { variant: t.variant, alpha: t.alpha, one_minus_alpha: t.one_minus_alpha, selection: None, offset: 0 },
        };
        Ok(TensorStep { name, len, scalars: self.scalars, phase: self.phase, merge, rescale: Rescale::Off })
    }

    /// Whether this step needs the OnDARE L1 norms pass before the rescale is known.
    pub fn needs_norms(&self) -> bool {
        matches!(self.merge, MergeParams::Dare(p) if p.rescale) && self.phase == Phase::Merge
    }

    /// Whether this step trims the update (OnTIES on a merge step): it then needs
    /// each tensor's update in a scratch slice before anything is written.
    pub fn needs_update_scratch(&self) -> bool {
        matches!(self.merge, MergeParams::Ties(_)) && self.phase == Phase::Merge
    }

    /// Whether this step trims the update and rescales what it keeps (OnTIES with
    /// `rescale`, on a merge step): the factor needs every value of the update.
    #[cfg(feature = "std")]
    pub(crate) fn ties_rescales(&self) -> bool {
        matches!(self.merge, MergeParams::Ties(t) if t.rescale) && self.phase == Phase::Merge
    }

    /// Whether tensors need a cached-delta slice (`Δ_c`, step-K with `k > 1`).
    pub fn needs_cached_delta(&self) -> bool {
        self.need_cached
    }

    /// Whether this step trims the update over all tensors at once (OnTIES with
    /// global scope on a merge step).
    pub fn trims_globally(&self) -> bool {
        matches!(self.merge, MergeParams::Ties(t) if t.scope == Scope::Global) && self.phase == Phase::Merge
    }

    /// The clip value the OnDARE rescale clamps to.
    pub fn clip(&self) -> f32 {
        match self.merge {
            MergeParams::Dare(p) => p.clip,
            MergeParams::None | MergeParams::Ties(_) => 0.0,
        }
    }

    /// Steps several tensors in place; the one entry that serves every merge and
    /// scope (a single tensor is a one-element slice). No tensor is written unless
    /// every tensor passes: every tensor is validated, in the order given, both
    /// stages of a tensor before the next (SPEC.md §5.6), and only then are they
    /// written. With OnTIES and global scope the jobs must come in bytewise
    /// ascending name order and share one threshold; on its merge steps every
    /// job's `scratch` holds its update (same length as the tensor).
    ///
    /// A tensor's plan is not kept between the two rounds (nothing is allocated),
    /// so the writing round derives it again: free for AdamW and OnDARE, one more
    /// radix select over the kept update for per-tensor OnTIES, and one more norms
    /// pass for the OnDARE rescale. A single job runs in one round.
    ///
    /// `crate::parallel::step_tensors` (feature `std`) is the same entry on several threads (with
    /// 16-bit parameters and packed task vectors); the chunk passes of
    /// [`TensorStep`] serve callers that drive the passes themselves.
    pub fn step_tensors(&self, jobs: &mut [StepJob<'_>]) -> Result<(), Error> {
        self.step_tensors_with(jobs, &Portable)
    }

    /// [`StepPlan::step_tensors`] with its chunk passes run by `passes` (e.g.
    /// the `merge-simd` crate's widest copy for this CPU); the bits are the same.
    pub fn step_tensors_with(&self, jobs: &mut [StepJob<'_>], passes: &dyn ChunkPasses) -> Result<(), Error> {
        let t = match self.merge {
            MergeParams::Ties(t) if self.trims_globally() => t,
            _ => {
                if let [job] = jobs {
                    return self.step_one(job, passes);
                }
                for job in jobs.iter_mut() {
                    let st = job.state.as_ref();
                    let plan = self.per_tensor_plan(job.name, job.grad, &st, job.tau, job.scratch, passes)?;
                    if self.needs_update_scratch() {
                        passes.check_chunk_from_update(&plan, 0, st, job.tau, job.scratch)?;
                    } else {
                        passes.check_chunk(&plan, 0, job.grad, st, job.tau)?;
                    }
                }
                for job in jobs.iter_mut() {
                    let plan = if self.needs_update_scratch() {
                        // The first round left this tensor's update in its scratch.
                        self.with_own_threshold(self.tensor(job.name, job.grad.len() as u64)?, job.scratch)?
                    } else {
                        self.prepare(job.name, job.grad, &job.state.as_ref(), job.tau, job.scratch, passes)?
                    };
                    let st = job.state.reborrow();
                    if self.needs_update_scratch() {
                        passes.write_chunk_from_update(&plan, 0, job.grad, st, job.tau, job.scratch, None)?;
                    } else {
                        passes.write_chunk(&plan, 0, job.grad, st, job.tau, None)?;
                    }
                }
                return Ok(());
            }
        };
        check_name_order(jobs.iter().map(|j| j.name))?;
        for job in jobs.iter_mut() {
            self.prepare(job.name, job.grad, &job.state.as_ref(), job.tau, job.scratch, passes)?;
        }
        let selection = onties::select(t.p, t.rescale, "all tensors (global scope)", jobs.iter().map(|j| &*j.scratch))?;
        for write in [false, true] {
            let mut offset = 0u64;
            for job in jobs.iter_mut() {
                let mut plan = self.tensor(job.name, job.grad.len() as u64)?;
                if let MergePlan::Ties { selection: s, offset: o, .. } = &mut plan.merge {
                    *s = Some(selection);
                    *o = offset;
                }
                if write {
                    passes.write_chunk_from_update(&plan, 0, job.grad, job.state.reborrow(), job.tau, job.scratch, None)?;
                } else {
                    passes.check_chunk_from_update(&plan, 0, job.state.as_ref(), job.tau, job.scratch)?;
                }
                offset += job.grad.len() as u64;
            }
        }
        Ok(())
    }

    /// One tensor (per-tensor scope): the norms or update pass where the merge
    /// needs one, then the validating pass, then the writing pass.
    fn step_one(&self, job: &mut StepJob<'_>, passes: &dyn ChunkPasses) -> Result<(), Error> {
        let plan = self.per_tensor_plan(job.name, job.grad, &job.state.as_ref(), job.tau, job.scratch, passes)?;
        if self.needs_update_scratch() {
            passes.check_chunk_from_update(&plan, 0, job.state.as_ref(), job.tau, job.scratch)?;
            passes.write_chunk_from_update(&plan, 0, job.grad, job.state.reborrow(), job.tau, job.scratch, None)
        } else {
            passes.check_chunk(&plan, 0, job.grad, job.state.as_ref(), job.tau)?;
            passes.write_chunk(&plan, 0, job.grad, job.state.reborrow(), job.tau, None)
        }
    }

    /// [`StepPlan::prepare`], then for per-tensor OnTIES the tensor's own threshold.
    fn per_tensor_plan<'n>(&self, name: &'n str, grad: &[f32], st: &StateRef<'_>, tau: Src<'_>, scratch: &mut [f32], passes: &dyn ChunkPasses) -> Result<TensorStep<'n>, Error> {
        let plan = self.prepare(name, grad, st, tau, scratch, passes)?;
        self.with_own_threshold(plan, scratch)
    }

    /// On an OnTIES merge step, sets the threshold of the tensor's own update
    /// (`update`, which `prepare` filled); other plans are returned as they are.
    fn with_own_threshold<'n>(&self, mut plan: TensorStep<'n>, update: &[f32]) -> Result<TensorStep<'n>, Error> {
        if let (true, MergeParams::Ties(t), MergePlan::Ties { selection, .. }) = (self.needs_update_scratch(), self.merge, &mut plan.merge) {
            *selection = Some(onties::select(t.p, t.rescale, plan.name, core::iter::once(update))?);
        }
        Ok(plan)
    }

    /// The OnTIES selection of this step's updates over one scope: one tensor's
    /// update, or every tensor's in bytewise name order for global scope. For
    /// callers that run the chunk passes themselves; set the result into the
    /// tensor plan's `MergePlan::Ties` with the tensor's offset in the scope.
    pub fn ties_selection(&self, scope: &str, updates: &[&[f32]]) -> Result<TiesSelection, Error> {
        self.ties_selection_after(scope, updates, |_| Ok(()))
    }

    /// The radix select [`StepPlan::ties_selection_after`] starts from over a
    /// scope of `n` elements ([`onties::start_select`]); `None` when it runs none.
    pub fn ties_start_select(&self, scope: &str, n: u64) -> Result<Option<crate::topk::RadixSelect>, Error> {
        match self.merge {
            MergeParams::Ties(t) => onties::start_select(t.p, scope, n),
            _ => Err(Error::Misuse { what: "an OnTIES optimizer (only OnTIES trims the update)" }),
        }
    }

    /// [`StepPlan::ties_selection`] with the radix select's first passes run by
    /// `early_passes`, as [`onties::select_after`] says.
    pub fn ties_selection_after(&self, scope: &str, updates: &[&[f32]], early_passes: impl FnOnce(&mut crate::topk::RadixSelect) -> Result<(), Error>) -> Result<TiesSelection, Error> {
        match self.merge {
            MergeParams::Ties(t) => onties::select_after(t.p, t.rescale, scope, updates.iter().copied(), early_passes),
            _ => Err(Error::Misuse { what: "an OnTIES optimizer (only OnTIES trims the update)" }),
        }
    }

    /// The tensor's plan after the passes it needs before checking: the OnDARE
    /// norms (rescale), or the OnTIES update written into `scratch`.
    fn prepare<'n>(&self, name: &'n str, grad: &[f32], st: &StateRef<'_>, tau: Src<'_>, scratch: &mut [f32], passes: &dyn ChunkPasses) -> Result<TensorStep<'n>, Error> {
        if self.need_cached && st.cached.is_none() {
            return Err(Error::LengthMismatch { tensor: tensor_name(name), what: "cached delta (required when k > 1)", expected: grad.len() as u64, found: 0 });
        }
        let mut plan = self.tensor(name, grad.len() as u64)?;
        if self.needs_norms() {
            let mut norms = Norms::default();
            passes.scan_chunk(&plan, 0, grad, *st, tau, Some(&mut norms), None)?;
            plan.rescale = norms.rescale(name, self.scalars.eps, self.clip())?;
        }
        if self.needs_update_scratch() {
            if scratch.len() != grad.len() {
                return Err(Error::LengthMismatch { tensor: tensor_name(name), what: "update scratch (OnTIES)", expected: grad.len() as u64, found: scratch.len() as u64 });
            }
            passes.scan_chunk(&plan, 0, grad, *st, tau, None, Some(scratch))?;
        }
        Ok(plan)
    }
}

/// One tensor of [`StepPlan::step_tensors`].
#[derive(Debug)]
pub struct StepJob<'a> {
    pub name: &'a str,
    pub grad: &'a [f32],
    /// `θ`, `m`, `v` and `Δ_c` (required when `k > 1`), updated in place.
    pub state: StateMut<'a>,
    /// The stored task vector `τ'` (unused by plain AdamW and by step-K's
    /// accumulating steps, which accept an empty one).
    pub tau: Src<'a>,
    /// Room for the update (OnTIES merge steps; may be empty otherwise).
    pub scratch: &'a mut [f32],
}
