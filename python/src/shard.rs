//! One optimizer step of tensors sharded across processes (FSDP, ZeRO): each
//! process holds a contiguous range of every tensor's flattened elements and
//! steps it with global indices, so the masks are the single-process masks. What
//! needs the whole tensor is exchanged by the Python side between the calls:
//!
//! 1. the L1 norms (OnDARE and OnTIES rescale): each process sums its range as
//!    maximal aligned blocks of `2^l` elements, complete subtrees of SPEC.md §3's
//!    fixed tree ([`ShardedStep::norm_blocks`]); every process pushes all blocks
//!    in index order into one tree ([`ShardedStep::set_norm_blocks`]), which is the
//!    tree one process would have summed, bit for bit;
//! 2. the OnTIES threshold: radix-select histograms of the local update with
//!    global indices, summed over processes (integers, exact), drive the same
//!    passes one process would run ([`ShardedStep::histograms`], [`ShardedStep::add_histograms`]);
//! 3. the verdict: every process validates its range ([`ShardedStep::check`]) and
//!    writes only once all processes passed ([`ShardedStep::write`]).

use merge_core::onties::{self, TiesSelection};
use merge_core::optim::StepPlan;
use merge_core::reduce::TreeSum;
use merge_core::step::{ChunkPasses, MergePlan, Norms, Rescale, StateMut, StateRef, TensorStep};
use merge_core::topk::{self, RadixSelect};
use merge_simd::Cpu;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::{Range, core_error, f32_mut, f32_ref, src};

/// One norm block as exchanged: (scope, first index in the scope, level, the two
/// L1 sums as bits).
type NormBlock = (usize, u64, u32, u32, u32);

/// One process's range of one tensor.
pub(crate) struct Shard {
    pub name: String,
    /// Elements in the whole tensor.
    pub full: u64,
    /// Global index of the range's first element.
    pub offset: u64,
    pub len: usize,
    /// The tensor's first index in the OnTIES global scope (0 for other scopes).
    pub scope_offset: u64,
    pub grad: Range,
    pub theta: Range,
    pub m: Range,
    pub v: Range,
    pub cached: Option<Range>,
    pub tau: Option<Range>,
}

/// A step in progress over sharded tensors; see the module docs for the order
/// of calls.
#[pyclass(module = "merge_core._merge_core")]
pub struct ShardedStep {
    pub(crate) plan: StepPlan,
    pub(crate) shards: Vec<Shard>,
    /// OnTIES: `p` and whether the trimmed update is L1-rescaled.
    pub(crate) ties: Option<(f32, bool)>,
    /// The scopes: OnTIES global scope is one scope over every tensor, else one
    /// scope per tensor.
    pub(crate) global: bool,
    pub(crate) zero_tau: Vec<f32>,
    rescale: Vec<Rescale>,
    selection: Vec<Option<TiesSelection>>,
    updates: Vec<Vec<f32>>,
    selects: Vec<RadixSelect>,
}

impl ShardedStep {
    pub(crate) fn new(plan: StepPlan, shards: Vec<Shard>, ties: Option<(f32, bool)>, global: bool) -> Self {
        let n = shards.len();
        let longest = shards.iter().map(|s| s.len).max().unwrap_or(0);
        ShardedStep {
            plan,
            shards,
            ties,
            global,
            zero_tau: vec![0.0; longest],
            rescale: vec![Rescale::Off; n],
            selection: vec![None; n],
            updates: Vec::new(),
            selects: Vec::new(),
        }
    }

    fn scopes(&self) -> usize {
        if self.global { 1 } else { self.shards.len() }
    }

    fn scope_of(&self, tensor: usize) -> usize {
        if self.global { 0 } else { tensor }
    }

    fn scope_len(&self, scope: usize) -> u64 {
        if self.global { self.shards.iter().map(|s| s.full).sum() } else { self.shards[scope].full }
    }

    fn scope_name(&self, scope: usize) -> &str {
        if self.global { "all tensors (global scope)" } else { &self.shards[scope].name }
    }

    fn tensor_step(&self, t: usize) -> Result<TensorStep<'_>, merge_core::Error> {
        let s = &self.shards[t];
        let mut step = self.plan.tensor(&s.name, s.full)?;
        step.rescale = self.rescale[t];
        if let MergePlan::Ties { selection, offset, .. } = &mut step.merge {
            *selection = self.selection[t];
            *offset = s.scope_offset;
        }
        Ok(step)
    }

    fn tau<'a>(&'a self, s: &Shard) -> merge_core::dtype::Src<'a> {
        match &s.tau {
            Some(r) => src(r),
            None => merge_core::dtype::Src::F32(&self.zero_tau[..s.len]),
        }
    }

    fn state<'a>(s: &Shard) -> StateRef<'a> {
        StateRef { theta: f32_ref(&s.theta), m: f32_ref(&s.m), v: f32_ref(&s.v), cached: s.cached.as_ref().map(f32_ref) }
    }

    /// Which norms the next exchange carries: OnDARE's before the step, OnTIES's
    /// once its threshold is known.
    fn norms_due(&self) -> bool {
        match self.ties {
            None => self.plan.needs_norms(),
            Some((_, rescale)) => rescale && self.plan.needs_update_scratch() && self.selects.is_empty() && !self.updates.is_empty(),
        }
    }
}

/// The maximal aligned blocks `(start, level)` of `[start, end)`.
fn dyadic_blocks(mut start: u64, end: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    while start < end {
        let mut level = 0u32;
        while level < 63 && start.is_multiple_of(1u64 << (level + 1)) && start + (1u64 << (level + 1)) <= end {
            level += 1;
        }
        out.push((start, level));
        start += 1u64 << level;
    }
    out
}

#[pymethods]
impl ShardedStep {
    /// Whether a norms exchange is due now (`norm_blocks`, then `set_norm_blocks`).
    fn needs_norms(&self) -> bool {
        self.norms_due()
    }

    /// This process's norm blocks: `(scope, start, level, ‖·‖₁ bits, ‖·‖₁ bits)`
    /// with `start` the block's first index in its scope; for OnDARE the update
    /// and the sparsified update, for OnTIES the update and the trimmed update.
    fn norm_blocks(&self) -> PyResult<Vec<NormBlock>> {
        let mut out = Vec::new();
        for (t, s) in self.shards.iter().enumerate() {
            let step = self.tensor_step(t).map_err(core_error)?;
            let first = s.scope_offset + s.offset;
            for (start, level) in dyadic_blocks(first, first + s.len as u64) {
                let lo = (start - first) as usize;
                let hi = lo + (1usize << level);
                let (a, b) = if self.ties.is_some() {
                    let sel = self.selection[t].ok_or_else(|| PyValueError::new_err("OnTIES norms before the threshold"))?;
                    let update = &self.updates[t][lo..hi];
                    let (mut full, mut kept) = (TreeSum::new(), TreeSum::new());
                    full.push_abs_slice(update);
                    let trimmed: Vec<f32> = update.iter().enumerate().map(|(j, &x)| onties::trim(x, start + j as u64, &sel.threshold)).collect();
                    kept.push_abs_slice(&trimmed);
                    (full.finish(), kept.finish())
                } else {
                    let mut norms = Norms::default();
                    let st = Self::state(s);
                    let view = StateRef { theta: &st.theta[lo..hi], m: &st.m[lo..hi], v: &st.v[lo..hi], cached: st.cached.map(|c| &c[lo..hi]) };
                    Cpu::detect().scan_chunk(&step, s.offset + lo as u64, &f32_ref(&s.grad)[lo..hi], view, self.tau(s).slice(lo, hi - lo), Some(&mut norms), None).map_err(core_error)?;
                    (norms.update.finish(), norms.sparse.finish())
                };
                out.push((self.scope_of(t), start, level, a.to_bits(), b.to_bits()));
            }
        }
        Ok(out)
    }

    /// Every process's norm blocks (any order): joined per scope in index order,
    /// then the rescale they call for.
    fn set_norm_blocks(&mut self, mut blocks: Vec<NormBlock>) -> PyResult<()> {
        blocks.sort_by_key(|b| (b.0, b.1));
        let mut sums: Vec<(TreeSum, TreeSum)> = (0..self.scopes()).map(|_| (TreeSum::new(), TreeSum::new())).collect();
        for &(scope, start, level, a, b) in &blocks {
            let (x, y) = sums.get_mut(scope).ok_or_else(|| PyValueError::new_err(format!("norm block for scope {scope}, which does not exist")))?;
            if x.len() != start || !(x.push_block(f32::from_bits(a), level) && y.push_block(f32::from_bits(b), level)) {
                return Err(PyValueError::new_err(format!("scope `{}`: norm blocks missing or overlapping at index {start}", self.scope_name(scope))));
            }
        }
        for (scope, (x, _)) in sums.iter().enumerate() {
            if x.len() != self.scope_len(scope) {
                return Err(PyValueError::new_err(format!("scope `{}`: norm blocks cover {} of {} elements", self.scope_name(scope), x.len(), self.scope_len(scope))));
            }
        }
        for t in 0..self.shards.len() {
            let (full, part) = &sums[self.scope_of(t)];
            if self.ties.is_some() {
                let (full, kept) = (full.finish(), part.finish());
                for (x, what) in [(full, "L1 norm before trimming"), (kept, "L1 norm after trimming")] {
                    if !x.is_finite() {
                        return Err(core_error(merge_core::Error::NonFiniteReduction { tensor: merge_core::error::tensor_name(self.scope_name(self.scope_of(t))), what }));
                    }
                }
                if let Some(sel) = &mut self.selection[t] {
                    sel.factor = onties::rescale_factor(full, kept);
                }
            } else {
                let norms = Norms { update: full.clone(), sparse: part.clone() };
                self.rescale[t] = norms.rescale(&self.shards[t].name, self.plan.scalars().eps, self.plan.clip()).map_err(core_error)?;
            }
        }
        self.updates.clear();
        Ok(())
    }

    /// Whether this step trims (OnTIES on a merge step): then `histograms` /
    /// `add_histograms` until the threshold is known.
    fn trims(&self) -> bool {
        self.ties.is_some() && self.plan.needs_update_scratch()
    }

    /// The local counts of the current radix-select pass of every unfinished
    /// scope, concatenated; `None` once every threshold is known. The first call
    /// computes the local update.
    fn histograms(&mut self) -> PyResult<Option<Vec<u64>>> {
        let Some((p, _)) = self.ties else { return Ok(None) };
        if self.updates.is_empty() && self.selection.iter().all(Option::is_none) {
            let mut updates = Vec::with_capacity(self.shards.len());
            for (t, s) in self.shards.iter().enumerate() {
                let mut update = vec![0.0f32; s.len];
                let step = self.tensor_step(t).map_err(core_error)?;
                Cpu::detect().scan_chunk(&step, s.offset, f32_ref(&s.grad), Self::state(s), self.tau(s), None, Some(&mut update)).map_err(core_error)?;
                updates.push(update);
            }
            self.updates = updates;
            for scope in 0..self.scopes() {
                let n = self.scope_len(scope);
                let k = topk::keep_count("p (reserve rate)", p, n).map_err(core_error)?;
                self.selects.push(RadixSelect::new(self.scope_name(scope), n, k).map_err(core_error)?);
            }
        }
        let mut out = Vec::new();
        for (scope, sel) in self.selects.iter().enumerate() {
            let Some(pass) = sel.pass() else { continue };
            let mut counts = vec![0u64; pass.buckets()];
            for (t, s) in self.shards.iter().enumerate() {
                if self.scope_of(t) != scope {
                    continue;
                }
                let first = s.scope_offset + s.offset;
                for (j, &x) in self.updates[t].iter().enumerate() {
                    if let Some(b) = pass.bucket(topk::magnitude_key(x), first + j as u64) {
                        counts[b] += 1;
                    }
                }
            }
            out.extend(counts);
        }
        Ok(if self.selects.iter().all(|s| s.pass().is_none()) { None } else { Some(out) })
    }

    /// The counts of `histograms` summed over every process: ends the pass; once
    /// every threshold is known the selections are set.
    fn add_histograms(&mut self, counts: Vec<u64>) -> PyResult<()> {
        let mut rest = &counts[..];
        for sel in self.selects.iter_mut() {
            let Some(pass) = sel.pass() else { continue };
            if rest.len() < pass.buckets() {
                return Err(PyValueError::new_err("fewer histogram counts than the pass has buckets"));
            }
            let (mine, tail) = rest.split_at(pass.buckets());
            let narrow: Vec<u32> = mine.iter().map(|&c| u32::try_from(c).map_err(|_| PyValueError::new_err("a histogram count above 2^32"))).collect::<PyResult<_>>()?;
            sel.add_histogram(&narrow).map_err(core_error)?;
            sel.finish_pass().map_err(core_error)?;
            rest = tail;
        }
        if self.selects.iter().all(|s| s.threshold().is_some()) {
            for t in 0..self.shards.len() {
                let threshold = self.selects[self.scope_of(t)].threshold().unwrap();
                self.selection[t] = Some(TiesSelection { threshold, factor: 1.0 });
            }
            self.selects.clear();
            if !matches!(self.ties, Some((_, true))) {
                self.updates.clear();
            }
        }
        Ok(())
    }

    /// Validates this process's ranges; the error's message, or `None`.
    fn check(&self) -> Option<String> {
        let run = || -> Result<(), merge_core::Error> {
            for (t, s) in self.shards.iter().enumerate() {
                Cpu::detect().check_chunk(&self.tensor_step(t)?, s.offset, f32_ref(&s.grad), Self::state(s), self.tau(s))?;
            }
            Ok(())
        };
        run().err().map(|e| e.to_string())
    }

    /// Writes this process's ranges: call only after every process's `check` passed.
    fn write(&self) -> PyResult<()> {
        for (t, s) in self.shards.iter().enumerate() {
            let state = StateMut { theta: f32_mut(&s.theta), m: f32_mut(&s.m), v: f32_mut(&s.v), cached: s.cached.as_ref().map(f32_mut) };
            self.tensor_step(t).and_then(|step| Cpu::detect().write_chunk(&step, s.offset, f32_ref(&s.grad), state, self.tau(s), None)).map_err(core_error)?;
        }
        Ok(())
    }
}
