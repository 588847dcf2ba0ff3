//! Whole-tensor optimizer steps on several threads (feature `std`).
//!
//! The same passes as [`StepPlan::step_tensors`], cut into chunks of [`CHUNK`]
//! elements that threads take in contiguous runs. A chunk's result depends only on
//! its own elements and the step's plan (masks use global indices, SPEC.md §2),
//! the chunks' L1 partial sums join in index order into the one fixed tree
//! ([`crate::reduce::TreeSum::append`], SPEC.md §3), and the OnTIES threshold is selected over
//! the whole update, so the bits do not depend on the number of threads: they are
//! those of [`StepPlan::step_tensors`].
//!
//! Parameters and gradients may be stored in bfloat16 or float16 (a model trained
//! in 16 bits): each chunk is widened into thread-local binary32 buffers, stepped,
//! and the new parameter rounded to its format (SPEC.md §7); a value that would
//! overflow the format is refused in the validating pass, so nothing is written.
//! The moments, the cached delta and the task vector's arithmetic stay binary32.
//!
//! The threads run the chunk passes through a [`ChunkPasses`]:
//! [`crate::step::Portable`] (the build's own vector width), or the `merge-simd`
//! crate's, which picks the widest copy of [`crate::isa`] the CPU has; the bits
//! are the same.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::vec::Vec;

use crate::dtype::{Dtype, Src, f32_to_bf16, f32_to_f16, store_error};
use crate::error::{Error, tensor_name};
use crate::finite::ABS;
use crate::optim::StepPlan;
use crate::step::{AtLeast, ChunkPasses, MergePlan, Norms, StateMut, StateRef, TensorStep};
pub use crate::step::StateBounds;
#[cfg(test)]
use crate::step::Portable;
use crate::onties::GATHERED;
use crate::topk::{Candidate, Pass, RadixSelect};

/// Elements per chunk: a power of two (so chunk sums are whole subtrees of the L1
/// tree) and a multiple of the step's block.
pub const CHUNK: usize = 1 << 16;

/// A parameter tensor, written in place in its own format.
#[derive(Debug)]
pub enum Param<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
    F16(&'a mut [u16]),
}

impl<'a> Param<'a> {
    pub fn len(&self) -> usize {
        match self {
            Param::F32(s) => s.len(),
            Param::Bf16(s) | Param::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            Param::F32(_) => Dtype::F32,
            Param::Bf16(_) => Dtype::Bf16,
            Param::F16(_) => Dtype::F16,
        }
    }

    fn as_src(&self) -> Src<'_> {
        match self {
            Param::F32(s) => Src::F32(s),
            Param::Bf16(s) => Src::Bf16(s),
            Param::F16(s) => Src::F16(s),
        }
    }

    fn chunks(&mut self) -> Vec<Param<'_>> {
        match self {
            Param::F32(s) => s.chunks_mut(CHUNK).map(Param::F32).collect(),
            Param::Bf16(s) => s.chunks_mut(CHUNK).map(Param::Bf16).collect(),
            Param::F16(s) => s.chunks_mut(CHUNK).map(Param::F16).collect(),
        }
    }
}

/// A stored task vector `τ'`.
#[derive(Clone, Copy, Debug)]
pub enum TaskVector<'a> {
    /// Every element, in any storage format; empty when the step does not read it.
    Dense(Src<'a>),
    /// Only the elements whose bits are not those of `+0`: bit `i % 8` of
    /// `stored[i / 8]` says element `i` is stored, and `values` holds the stored
    /// ones in index order. OnDARE and OnTIES keep a fraction `p` of `τ`, so this
    /// takes `n/8 + 4·p·n` bytes instead of `4·n`; the step sees the same values.
    Packed { stored: &'a [u8], values: &'a [f32] },
}

impl TaskVector<'_> {
    fn is_empty(&self) -> bool {
        match self {
            TaskVector::Dense(s) => s.is_empty(),
            TaskVector::Packed { stored, .. } => stored.is_empty(),
        }
    }
}

/// One tensor of [`step_tensors`].
#[derive(Debug)]
pub struct ParallelJob<'a> {
    pub name: &'a str,
    pub grad: Src<'a>,
    pub theta: Param<'a>,
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
    /// `Δ_c`, required when `k > 1`.
    pub cached: Option<&'a mut [f32]>,
    /// The stored task vector `τ'`; may be empty when the step does not read it
    /// (plain AdamW, step-K's accumulating steps).
    pub tau: TaskVector<'a>,
}

/// Steps several tensors on up to `threads` threads, with the bits and the
/// all-or-nothing contract of [`StepPlan::step_tensors`]: every tensor is
/// validated before any is written. OnTIES needs room for the update: one
/// binary32 buffer as large as the largest tensor (per-tensor scope) or as all of
/// them (global scope), allocated for the step ([`step_tensors_in`] keeps it
/// between steps). `passes` runs the chunks.
pub fn step_tensors(plan: &StepPlan, jobs: &mut [ParallelJob<'_>], threads: usize, passes: &dyn ChunkPasses) -> Result<(), Error> {
    step_tensors_in(plan, jobs, threads, passes, &mut Scratch::default())
}

/// Room a step needs beyond its tensors, kept by the caller between steps: the
/// OnTIES update (binary32, as large as the largest tensor, or as all of them for
/// global scope) and each thread's chunk buffers. A buffer that large is mapped
/// fresh by the allocator on every use, and faulting its pages in cost a
/// quarter of a two-thread OnTIES step on 16M parameters; kept, it is reused
/// (or, where the caller does not hold it, mapped its own way:
/// [`Scratch::with_room`]).
/// Steps other than OnTIES's hold only the threads' buffers (a few MB a thread
/// at most: the 16-bit widening copies, the unpacked `τ'` and the gathered
/// candidates of one chunk).
pub struct Scratch {
    update: Vec<f32>,
    workers: Vec<Buffers>,
    room: fn(usize) -> Vec<f32>,
}

impl Default for Scratch {
    fn default() -> Scratch {
        Scratch::with_room(zeroed_room)
    }
}

/// `len` zeros, left for the operating system to map (lazily zeroed pages).
fn zeroed_room(len: usize) -> Vec<f32> {
    std::vec![0.0; len]
}

impl core::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Scratch").field("bytes", &self.bytes()).finish()
    }
}

impl Scratch {
    /// A scratch whose update room, whenever it must grow to `len` elements, is
    /// `room(len)`: at least `len` elements of any values (every pass writes
    /// the room before reading it). For a caller that maps large buffers its own
    /// way, e.g. advising the operating system to back them with huge pages.
    pub fn with_room(room: fn(usize) -> Vec<f32>) -> Scratch {
        Scratch { update: Vec::new(), workers: Vec::new(), room }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.update.capacity() * core::mem::size_of::<f32>() + self.workers.iter().map(Buffers::bytes).sum::<usize>()
    }

    /// The room for the update, made when first asked for, and the buffers of
    /// `threads` threads.
    fn split(&mut self, threads: usize) -> (Room<'_>, &mut [Buffers]) {
        if self.workers.len() < threads {
            self.workers.resize_with(threads, Buffers::default);
        }
        (Room { update: &mut self.update, make: self.room }, &mut self.workers[..threads])
    }
}

/// A [`Scratch`]'s update room, for one step.
struct Room<'s> {
    update: &'s mut Vec<f32>,
    make: fn(usize) -> Vec<f32>,
}

impl<'s> Room<'s> {
    /// `len` elements, whose values are whatever a previous use left (every
    /// pass that reads them writes them first).
    fn get(&mut self, len: usize) -> Result<&mut [f32], Error> {
        if self.update.len() < len {
            // The old room goes first: both at once could need twice the memory.
            *self.update = Vec::new();
            *self.update = (self.make)(len);
            if self.update.len() < len {
                return Err(Error::Misuse { what: "a scratch room of the length asked for" });
            }
        }
        Ok(&mut self.update[..len])
    }

    /// [`Room::get`], for the rest of the step.
    fn take(mut self, len: usize) -> Result<&'s mut [f32], Error> {
        self.get(len)?;
        Ok(&mut self.update[..len])
    }
}

/// [`step_tensors`], with the step's room taken from (and left in) `scratch`.
/// The bits do not depend on what `scratch` held.
pub fn step_tensors_in(plan: &StepPlan, jobs: &mut [ParallelJob<'_>], threads: usize, passes: &dyn ChunkPasses, scratch: &mut Scratch) -> Result<(), Error> {
    step_tensors_tracked(plan, jobs, threads, passes, scratch, &mut [])
}

/// [`step_tensors_in`], keeping `bounds` of what it stores: empty (nothing
/// kept), or one per job. On entry `bounds[j]` is [`StateBounds::UNKNOWN`], or
/// what the previous successful call left for the same `θ`, `m`, `v` and `Δ_c`
/// buffers, which nothing else has written since: then the validating pass
/// does not read them (it still reads the gradient and `τ'`). On success each
/// holds the bounds of what was just stored; on error every one is
/// [`StateBounds::UNKNOWN`].
///
/// A promise that does not hold never changes a stored bit: the writing pass
/// validates every block before it stores it, so state outside the bounds is
/// refused there (or stepped, if it passes). Only the all-or-nothing contract
/// is lost, as with [`TensorStep::write_chunk`]: the chunks written before the
/// refused one keep their new values.
pub fn step_tensors_tracked(plan: &StepPlan, jobs: &mut [ParallelJob<'_>], threads: usize, passes: &dyn ChunkPasses, scratch: &mut Scratch, bounds: &mut [StateBounds]) -> Result<(), Error> {
    if !bounds.is_empty() && bounds.len() != jobs.len() {
        return Err(Error::Misuse { what: "one state bound per job, or none" });
    }
    let result = step_with_bounds(plan, jobs, threads, passes, scratch, bounds);
    if result.is_err() {
        bounds.fill(StateBounds::UNKNOWN);
    }
    result
}

fn step_with_bounds(plan: &StepPlan, jobs: &mut [ParallelJob<'_>], threads: usize, passes: &dyn ChunkPasses, scratch: &mut Scratch, bounds: &mut [StateBounds]) -> Result<(), Error> {
    let threads = threads.max(1);
    let (room, workers) = scratch.split(threads);
    let mut steps = Vec::with_capacity(jobs.len());
    for job in jobs.iter() {
        check_lengths(plan, job)?;
        steps.push(plan.tensor(job.name, job.m.len() as u64)?);
    }
    // Counted once per step: every pass cuts the tensors into the same chunks.
    let ranges: Vec<_> = jobs.iter().map(|job| chunk_value_ranges(job.tau)).collect();
    if plan.needs_norms() {
        let chunks = chunk_views(jobs, &ranges);
        let norms = run(workers, chunks, |c, buf| {
            let mut norms = Norms::default();
            let (grad, theta, tau) = buf.widen(c.grad, c.theta, c.tau);
            passes.scan_chunk(&steps[c.job], c.lo as u64, grad, c.state(theta), tau, Some(&mut norms), None)?;
            Ok((c.job, norms))
        })?;
        let mut joined: Vec<Norms> = steps.iter().map(|_| Norms::default()).collect();
        for (job, part) in norms {
            let into = &mut joined[job];
            if !(into.update.append(&part.update) && into.sparse.append(&part.sparse)) {
                return Err(Error::Misuse { what: "chunk norms joined in index order" });
            }
        }
        for (step, norms) in steps.iter_mut().zip(&joined) {
            step.rescale = norms.rescale(step.name, plan.scalars().eps, plan.clip())?;
        }
    }
    // OnTIES validates binary32 tensors from the scanned update (no Adam
    // arithmetic) as soon as their threshold is known; global scope keeps the
    // whole update, so its writes read it too.
    let (checked, global_update) = if plan.needs_update_scratch() {
        select_ties(plan, jobs, &ranges, &mut steps, bounds, workers, passes, room)?
    } else {
        (std::vec![false; jobs.len()], None)
    };
    // Validate everything, then write: a failing chunk anywhere writes nothing.
    let steps = &steps;
    check_chunks(jobs, &ranges, steps, |j| !checked[j], bounds, None, workers, passes).map_err(|(_, e)| e)?;
    // Each written chunk's bounds are taken while it is in cache, if kept.
    let tracked = !bounds.is_empty();
    let written = match global_update {
        Some(update) => {
            let starts = job_starts(jobs);
            run(workers, chunk_muts(jobs, &ranges), |c, buf| {
                if matches!(c.theta, Param::F32(_)) {
                    let at = starts[c.job] + c.lo;
                    let len = c.grad.len();
                    buf.write_from_update(passes, &steps[c.job], c, &update[at..at + len], tracked)
                } else {
                    buf.write(passes, &steps[c.job], c, tracked)
                }
            })?
        }
        None => run(workers, chunk_muts(jobs, &ranges), |c, buf| buf.write(passes, &steps[c.job], c, tracked))?,
    };
    if tracked {
        let mut stored = std::vec![StateBounds::NONE; jobs.len()];
        for (job, chunk) in written {
            stored[job] = stored[job].join(chunk);
        }
        bounds.copy_from_slice(&stored);
    }
    Ok(())
}

/// The check pass over the chunks of the jobs `which` selects, on up to
/// `threads` threads; `known`: the state bounds kept for each job, or none;
/// `scanned`: each chunk's largest input, where a scan recorded it
/// ([`AtLeast`]; a binary32 chunk within the limit passes unread, as
/// [`chunk_within`] would find). An error comes with its job.
#[allow(clippy::too_many_arguments)]
fn check_chunks(jobs: &[ParallelJob<'_>], ranges: &[ValueRanges], steps: &[TensorStep<'_>], which: impl Fn(usize) -> bool, known: &[StateBounds], scanned: Option<&ChunkBounds>, workers: &mut [Buffers], passes: &dyn ChunkPasses) -> Result<(), (usize, Error)> {
    let limits: Vec<Option<u32>> = steps.iter().enumerate().map(|(j, s)| if which(j) { crate::finite::input_limit(s, false) } else { None }).collect();
    let passed = |c: &ChunkView<'_>| matches!((c.grad, c.theta), (Src::F32(_), Src::F32(_))) && scanned.zip(limits[c.job]).is_some_and(|(b, limit)| b.of(c) <= limit);
    let chunks = chunk_views(jobs, ranges).into_iter().filter(|c| which(c.job) && !passed(c)).collect();
    let known = |job: usize| known.get(job).copied().unwrap_or(StateBounds::UNKNOWN);
    // The error returned is the lowest failing chunk's, and no chunk below it
    // failed: its job is the lowest that failed.
    let failed = AtomicUsize::new(usize::MAX);
    run(workers, chunks, |c, buf| {
        if limits[c.job].is_some_and(|limit| chunk_within(passes, &steps[c.job], &c, limit, known(c.job))) {
            return Ok(());
        }
        buf.check(passes, &steps[c.job], &c).inspect_err(|_| {
            failed.fetch_min(c.job, Ordering::Relaxed);
        })
    })
    .map(drop)
    .map_err(|e| (failed.into_inner(), e))
}

/// Whether a binary32 chunk would pass the check pass ([`TensorStep::check_chunk`])
/// because every input lies within its `limit` (`v` also not negative): then
/// every block passes the check's shortcut, and the chunk passes without its
/// blocks being visited or a packed `τ'` unpacked. Each input is scanned once,
/// at the CPU's vector width; a packed `τ'` by its stored values only. A chunk
/// whose lengths the check would refuse is left to it.
/// The parameter and state that `known` bounds within the limit are not read.
fn chunk_within(passes: &dyn ChunkPasses, step: &TensorStep<'_>, c: &ChunkView<'_>, limit: u32, known: StateBounds) -> bool {
    let (Src::F32(grad), Src::F32(theta)) = (c.grad, c.theta) else { return false };
    let (tau, tau_len) = match c.tau {
        TaskVector::Dense(Src::F32(t)) => (t, t.len()),
        // Unpacked, a packed τ' has the chunk's length (checked for the job).
        TaskVector::Packed { stored: [], .. } => (&[][..], 0),
        TaskVector::Packed { values, .. } => (values, c.len),
        TaskVector::Dense(_) => return false,
    };
    if !step.lengths_fit(c.lo as u64, grad, &c.state(theta), tau_len) {
        return false;
    }
    let within = |xs: &[f32], mask| passes.largest_bits(xs, mask) <= limit;
    let state_within = |xs: &[f32], mask, known: u32| known <= limit || within(xs, mask);
    within(grad, ABS) && state_within(theta, ABS, known.theta) && state_within(c.m, ABS, known.m) && state_within(c.v, u32::MAX, known.v) && c.cached.is_none_or(|x| state_within(x, ABS, known.cached)) && within(tau, ABS)
}

/// Each job's first index in the concatenation of all jobs (global scope's order).
fn job_starts(jobs: &[ParallelJob<'_>]) -> Vec<usize> {
    jobs.iter()
        .scan(0, |at, job| {
            let start = *at;
            *at += job.m.len();
            Some(start)
        })
        .collect()
}

/// Validates the chunks of the binary32 jobs `which` selects from their scanned
/// update (`update`, indexed from `starts[job]`), on up to `threads` threads;
/// marks them in `checked`.
#[allow(clippy::too_many_arguments)]
fn check_from_update(jobs: &[ParallelJob<'_>], ranges: &[ValueRanges], steps: &[TensorStep<'_>], update: &[f32], starts: &[usize], bounds: &ChunkBounds, which: impl Fn(usize) -> bool, workers: &mut [Buffers], passes: &dyn ChunkPasses, checked: &mut [bool]) -> Result<(), Error> {
    let chosen = |j: usize| which(j) && matches!(jobs[j].theta, Param::F32(_));
    let limits: Vec<Option<u32>> = steps.iter().enumerate().map(|(j, s)| if chosen(j) { crate::finite::input_limit(s, true) } else { None }).collect();
    // A chunk whose values all lie within the limit passes every block's
    // shortcut: it is known to pass without being read again.
    let chunks: Vec<_> = chunk_views(jobs, ranges).into_iter().filter(|c| chosen(c.job) && limits[c.job].is_none_or(|l| bounds.of(c) > l)).collect();
    run(workers, chunks, |c, buf| {
        let at = starts[c.job] + c.lo;
        buf.check_from_update(passes, &steps[c.job], &c, &update[at..at + c.len])
    })?;
    for (j, done) in checked.iter_mut().enumerate() {
        *done |= chosen(j);
    }
    Ok(())
}

fn check_lengths(plan: &StepPlan, job: &ParallelJob<'_>) -> Result<(), Error> {
    let n = job.m.len();
    let mismatch = |what, expected: usize, found: usize| Error::LengthMismatch { tensor: tensor_name(job.name), what, expected: expected as u64, found: found as u64 };
    for (what, len) in [("gradient", job.grad.len()), ("parameter", job.theta.len()), ("exp_avg_sq", job.v.len())] {
        if len != n {
            return Err(mismatch(what, n, len));
        }
    }
    // An empty task vector is named by the step's own check if the step reads one.
    match job.tau {
        TaskVector::Dense(t) if !t.is_empty() && t.len() != n => return Err(mismatch("task vector", n, t.len())),
        TaskVector::Packed { stored, values } if !stored.is_empty() => {
            if stored.len() != n.div_ceil(8) {
                return Err(mismatch("packed task vector's stored-element bits (bytes)", n.div_ceil(8), stored.len()));
            }
            let set = set_bits(stored);
            if set != values.len() || (!n.is_multiple_of(8) && stored[n / 8] >> (n % 8) != 0) {
                return Err(mismatch("packed task vector's values", set, values.len()));
            }
        }
        _ => {}
    }
    match (&job.cached, plan.needs_cached_delta()) {
        (Some(c), _) if c.len() != n => Err(Error::LengthMismatch { tensor: tensor_name(job.name), what: "cached delta", expected: n as u64, found: c.len() as u64 }),
        (None, true) => Err(Error::LengthMismatch { tensor: tensor_name(job.name), what: "cached delta (required when k > 1)", expected: n as u64, found: 0 }),
        _ => Ok(()),
    }
}

/// The OnTIES selections: the update is scanned into a buffer in parallel, then
/// trimmed over its scope (one tensor, or all of them in bytewise name order).
/// Returns which jobs it validated, and for global scope the whole update (in
/// the room for it). Per tensor, the tensors whose select can start from a
/// sampled bound ([`select_above_samples`]) need no room, and are checked
/// together by the check pass.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn select_ties<'s>(plan: &StepPlan, jobs: &mut [ParallelJob<'_>], ranges: &[ValueRanges], steps: &mut [TensorStep<'_>], known: &[StateBounds], workers: &mut [Buffers], passes: &dyn ChunkPasses, mut room: Room<'s>) -> Result<(Vec<bool>, Option<&'s [f32]>), Error> {
    let lens: Vec<usize> = jobs.iter().map(|j| j.m.len()).collect();
    let mut checked = std::vec![false; jobs.len()];
    if plan.trims_globally() {
        for pair in jobs.windows(2) {
            if pair[0].name.as_bytes() >= pair[1].name.as_bytes() {
                return Err(Error::Misuse { what: "global-scope tensors in strictly ascending bytewise name order" });
            }
        }
        let update = room.take(lens.iter().sum())?;
        const SCOPE: &str = "all tensors (global scope)";
        let first = plan.ties_start_select(SCOPE, update.len() as u64)?;
        let mut bounds = ChunkBounds::new(&lens);
        let counted = scan_updates(jobs, ranges, steps, update, None, first.as_ref(), workers, passes, &mut bounds)?;
        let update = &*update;
        let mut parts = Vec::with_capacity(jobs.len());
        let mut rest = update;
        for &n in &lens {
            let (head, tail) = rest.split_at(n);
            parts.push(head);
            rest = tail;
        }
        let selection = plan.ties_selection_after(SCOPE, &parts, |radix| later_radix_passes(radix, &counted, &parts, workers, passes))?;
        let mut offset = 0u64;
        for (step, &n) in steps.iter_mut().zip(&lens) {
            set_selection(step, selection, offset);
            offset += n as u64;
        }
        check_from_update(jobs, ranges, steps, update, &job_starts(jobs), &bounds, |_| true, workers, passes, &mut checked)?;
        Ok((checked, Some(update)))
    } else {
        // Each tensor's select, planned in order: a tensor whose plan is
        // refused is named after the tensors before it are validated.
        let mut firsts = Vec::with_capacity(jobs.len());
        let mut refused = Ok(());
        for (step, &n) in steps.iter().zip(&lens) {
            match plan.ties_start_select(step.name, n as u64) {
                Ok(first) => firsts.push(first),
                Err(e) => {
                    refused = Err(e);
                    break;
                }
            }
        }
        let (sampled, scanned) = if plan.ties_rescales() { (std::vec![None; firsts.len()], None) } else { select_above_samples(jobs, ranges, steps, &firsts, workers, passes).map(|(s, b)| (s, Some(b)))? };
        for (step, selection) in steps.iter_mut().zip(&sampled) {
            if let Some(selection) = selection {
                set_selection(step, *selection, 0);
            }
        }
        // The sampled tensors are validated together; an error among them is
        // named only if no tensor before it fails to select from its update.
        let sampled_check = check_chunks(jobs, ranges, steps, |j| sampled.get(j).is_some_and(Option::is_some), known, scanned.as_ref(), workers, passes);
        let before = sampled_check.as_ref().err().map_or(firsts.len(), |&(job, _)| job);
        let starts = std::vec![0; jobs.len()];
        let mut bounds = ChunkBounds::new(&lens);
        for (j, first) in firsts.iter().enumerate().take(before) {
            if sampled[j].is_some() {
                checked[j] = true;
                continue;
            }
            let n = lens[j];
            let update = room.get(n)?;
            let counted = scan_updates(jobs, ranges, steps, &mut update[..n], Some(j), first.as_ref(), workers, passes, &mut bounds)?;
            let part = [&update[..n]];
            let selection = plan.ties_selection_after(steps[j].name, &part, |radix| later_radix_passes(radix, &counted, &part, workers, passes))?;
            set_selection(&mut steps[j], selection, 0);
            check_from_update(jobs, ranges, steps, &update[..n], &starts, &bounds, |k| k == j, workers, passes, &mut checked)?;
        }
        sampled_check.map_err(|(_, e)| e)?;
        refused?;
        Ok((checked, None))
    }
}

/// Elements of a tensor whose update the sample computes: about one in
/// [`SAMPLE_EVERY`], and at least [`SAMPLE_LEAST`] (a tensor with fewer is
/// left to the select over the whole update). Each costs a cache miss per
/// input read, on one thread; at `p = 0.01` the fewest leave about 4% of the
/// elements in the list, 16 bytes each.
const SAMPLE_EVERY: usize = 4096;
const SAMPLE_LEAST: usize = 256;

/// OnTIES's selects over the tensors that `firsts` plans (per-tensor scope),
/// each without room for its update: the update of a sample of a tensor's
/// elements gives a key `L` that, with a wide margin, more than `k` elements
/// reach; one parallel scan over all these tensors then computes each chunk's
/// update (validating it as [`scan_updates`] does) and keeps, block by block,
/// the elements at or above their tensor's `L`
/// ([`TensorStep::scan_chunk_at_least`]), and each tensor's select runs over
/// its own list only ([`RadixSelect::finish_among`]), the tensors shared
/// among the threads. The threshold is the tensor's whatever `L` is, so the
/// sample decides speed, never a bit. A tensor's entry is `None` (nothing
/// decided, the caller selects from its whole update) where the sample gives
/// no such key, where fewer than `k` elements reach it or more than one in 8
/// (the room their list may take), or where the scan refuses one of its values.
/// Also returned: each scanned chunk's largest input ([`AtLeast`]), for the
/// check pass.
#[allow(clippy::type_complexity)]
fn select_above_samples(jobs: &[ParallelJob<'_>], ranges: &[ValueRanges], steps: &[TensorStep<'_>], firsts: &[Option<RadixSelect>], workers: &mut [Buffers], passes: &dyn ChunkPasses) -> Result<(Vec<Option<crate::onties::TiesSelection>>, ChunkBounds), Error> {
    // 16 bytes a candidate: a list of one in 8 takes half the update's room.
    let room = |j: usize| jobs[j].m.len() / 8;
    // The margin below leaves about 1.25 k + 4 √(k s / n) + 2 of the sample's s
    // elements at or above `L`; a tensor whose k is not well below that room
    // is left to the whole update.
    let eligible: Vec<(usize, &RadixSelect)> = firsts
        .iter()
        .enumerate()
        .filter_map(|(j, first)| first.as_ref().map(|radix| (j, radix)))
        .filter(|&(j, radix)| jobs[j].m.len() >= SAMPLE_LEAST && radix.rank() <= (room(j) / 2) as u64)
        .collect();
    let mut bounds = std::vec![None; firsts.len()];
    for (j, bound) in run(workers, eligible.clone(), |(j, radix), _| Ok((j, sampled_bound(&steps[j], &jobs[j], radix.rank()))))? {
        bounds[j] = bound;
    }
    let found: Vec<AtomicUsize> = firsts.iter().map(|_| AtomicUsize::new(0)).collect();
    let mut scanned = ChunkBounds::new(&jobs.iter().map(|job| job.m.len()).collect::<Vec<_>>());
    let failed: Vec<AtomicBool> = firsts.iter().map(|_| AtomicBool::new(false)).collect();
    let chunks: Vec<_> = chunk_views(jobs, ranges).into_iter().filter(|c| bounds[c.job].is_some()).collect();
    let lists = run(workers, chunks, |c, buf| {
        let j = c.job;
        // Past the room, or after an error, nothing more of the tensor is
        // scanned: the caller scans it all again (and so names any error as
        // the lowest chunk's, which these threads may not have reached).
        if failed[j].load(Ordering::Relaxed) || found[j].load(Ordering::Relaxed) > room(j) {
            return Ok((j, None, Vec::new()));
        }
        let Buffers { grad, theta, tau, candidates, .. } = buf;
        let (grad, theta, tau) = (widened(c.grad, grad), widened(c.theta, theta), unpacked(c.tau, c.len, tau));
        // Grown once: shrinking for a short chunk would make the next one write it again.
        if candidates.len() < c.len {
            candidates.resize(c.len, Candidate::default());
        }
        let Some(bound) = bounds[j] else { return Ok((j, None, Vec::new())) };
        match passes.scan_chunk_at_least(&steps[j], c.lo as u64, grad, c.state(theta), tau, bound, &mut candidates[..c.len]) {
            Ok(Some(AtLeast { found: len, largest_input })) => {
                found[j].fetch_add(len, Ordering::Relaxed);
                Ok((j, Some((c.lo / CHUNK, largest_input)), candidates[..len].to_vec()))
            }
            Ok(None) | Err(_) => {
                failed[j].store(true, Ordering::Relaxed);
                Ok((j, None, Vec::new()))
            }
        }
    })?;
    for &(j, chunk, _) in &lists {
        if let Some((c, largest_input)) = chunk {
            scanned.0[j][c] = largest_input;
        }
    }
    // Each tensor's list, in index order (the chunks came in job order).
    let mut joined: Vec<Vec<Candidate>> = firsts.iter().map(|_| Vec::new()).collect();
    let mut sizes = std::vec![0usize; firsts.len()];
    for (j, _, part) in &lists {
        sizes[*j] += part.len();
    }
    for (j, _, part) in lists {
        if joined[j].capacity() < sizes[j] {
            joined[j].reserve_exact(sizes[j]);
        }
        joined[j].extend(part);
    }
    let lists: Vec<(usize, &RadixSelect, Vec<Candidate>)> = eligible
        .into_iter()
        .filter(|&(j, radix)| !failed[j].load(Ordering::Relaxed) && (radix.rank()..=room(j) as u64).contains(&(sizes[j] as u64)))
        .map(|(j, radix)| (j, radix, core::mem::take(&mut joined[j])))
        .collect();
    // Each thread finishes the selects of a share of the tensors, the longest
    // lists first, each to the thread with the least so far.
    let mut shares: Vec<Vec<(usize, &RadixSelect, Vec<Candidate>)>> = workers.iter().map(|_| Vec::new()).collect();
    let mut loads = std::vec![0usize; shares.len()];
    let mut by_length = lists;
    by_length.sort_by_key(|(_, _, list)| core::cmp::Reverse(list.len()));
    for item in by_length {
        let least = (0..loads.len()).min_by_key(|&t| loads[t]).unwrap_or(0);
        loads[least] += item.2.len();
        shares[least].push(item);
    }
    let busy: Vec<_> = shares.into_iter().zip(workers.iter_mut()).filter(|(share, _)| !share.is_empty()).collect();
    let finished = each_on_a_thread(busy, |share, _| {
        share.into_iter().map(|(j, radix, mut list)| (j, radix.clone().finish_among(&mut list).ok())).collect::<Vec<_>>()
    });
    let mut selections = std::vec![None; firsts.len()];
    for (j, threshold) in finished.into_iter().flatten() {
        selections[j] = threshold.map(|threshold| crate::onties::TiesSelection { threshold, factor: 1.0 });
    }
    Ok((selections, scanned))
}

/// A key that, judging by the update of every `n / s`-th element (`s` the
/// sample's size), more than `k` of the tensor's `n` elements reach: the
/// sample's `r`-th largest key, `r` well above the `k s / n` expected, or
/// `None` where the sample is too small for that.
fn sampled_bound(step: &TensorStep<'_>, job: &ParallelJob<'_>, k: u64) -> Option<u32> {
    let n = job.m.len();
    // An odd stride crosses the rows of a matrix rather than following a column.
    let stride = (n / (n / SAMPLE_EVERY).max(SAMPLE_LEAST)).max(1) | 1;
    let mut g = [0.0f32; 1];
    let mut keys: Vec<u32> = (0..n)
        .step_by(stride)
        .map(|i| {
            job.grad.load_into(i, &mut g);
            let cached = job.cached.as_deref().map_or(0.0, |c| c[i]);
            crate::topk::magnitude_key(step.update_of(g[0], job.m[i], job.v[i], cached))
        })
        .collect();
    let expected = k as f64 * keys.len() as f64 / n as f64;
    let rank = (1.25 * expected + 4.0 * libm::sqrt(expected)) as usize + 2;
    if rank > keys.len() {
        return None;
    }
    let (_, &mut bound, _) = keys.select_nth_unstable_by(rank - 1, |a, b| b.cmp(a));
    // A bound of 0 (or a non-finite sample) would keep a list of everything.
    (bound > 0 && bound < 0x7f80_0000).then_some(bound)
}

/// The radix select over the scope `parts` (in scope order) on up to `threads`
/// threads, as far as it reads every element. Its first pass was counted while
/// the update was computed, into `counted` (copies of the select, added here).
/// A later pass over everything gives each thread a copy of the select to feed
/// its own contiguous run of chunks, and adds the copies' counts (integers, so
/// the threshold is the one-thread select's). Once the candidates are few (at
/// most one per 16 elements: 1 byte per element stored), the threads gather
/// them instead, in index order, and the remaining passes run over that list
/// only; a scope whose candidates stay many (large ties) keeps scanning
/// everything. A scope of one chunk whose candidates fit the select's own room
/// ([`GATHERED`]) is left to the select.
fn later_radix_passes(radix: &mut RadixSelect, counted: &[RadixSelect], parts: &[&[f32]], workers: &mut [Buffers], passes: &dyn ChunkPasses) -> Result<(), Error> {
    for copy in counted {
        radix.absorb(copy)?;
    }
    radix.finish_pass()?;
    let mut chunks: Vec<(u64, &[f32])> = Vec::new();
    let mut offset = 0u64;
    for part in parts {
        for (c, values) in part.chunks(CHUNK).enumerate() {
            chunks.push((offset + (c * CHUNK) as u64, values));
        }
        offset += part.len() as u64;
    }
    let per = chunks.len().div_ceil(workers.len().max(1)).max(1);
    let runs: Vec<&[(u64, &[f32])]> = chunks.chunks(per).collect();
    while let Some(Pass::Key { .. }) = radix.pass() {
        let left = radix.candidates();
        // A scope of one chunk is finished by the select itself, on this thread.
        if offset <= CHUNK as u64 && left <= GATHERED as u64 {
            break;
        }
        if left <= offset / 16 {
            let lists = on_threads(workers, &runs, |run, buf| gather_candidates(radix, run, passes, &mut buf.candidates))?;
            let candidates: Vec<Candidate> = lists.into_iter().flatten().collect();
            while radix.pass().is_some() {
                radix.feed_candidates(&candidates)?;
                radix.finish_pass()?;
            }
            return Ok(());
        }
        let copies = on_threads(workers, &runs, |run, _| {
            let mut copy = radix.clone();
            for &(offset, values) in run {
                passes.radix_feed(&mut copy, offset, values)?;
            }
            Ok(copy)
        })?;
        let mut fed = radix.clone();
        for copy in &copies {
            fed.absorb(copy)?;
        }
        *radix = fed;
        radix.finish_pass()?;
    }
    Ok(())
}

/// `work` over each run on its own thread, with a worker's buffers (at least
/// as many as runs); the results in run order, or the error of the lowest
/// failing run.
fn on_threads<'r, T: Sync, R: Send>(workers: &mut [Buffers], runs: &[&'r [T]], work: impl Fn(&'r [T], &mut Buffers) -> Result<R, Error> + Sync) -> Result<Vec<R>, Error> {
    each_on_a_thread(runs.iter().copied().zip(workers.iter_mut()).collect(), work).into_iter().collect()
}

/// `work(job, buffers)` for every job, each with its own worker's buffers: the
/// first on the calling thread (one thread fewer to start), every other on a
/// thread of its own; the results in job order.
fn each_on_a_thread<J: Send, R: Send>(jobs: Vec<(J, &mut Buffers)>, work: impl Fn(J, &mut Buffers) -> R + Sync) -> Vec<R> {
    let work = &work;
    let mut jobs = jobs.into_iter();
    let Some((first, first_buf)) = jobs.next() else { return Vec::new() };
    thread::scope(|s| {
        let handles: Vec<_> = jobs.map(|(job, buf)| s.spawn(move || work(job, buf))).collect();
        let first = work(first, first_buf);
        core::iter::once(first).chain(handles.into_iter().map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))).collect()
    })
}

/// The candidates of the select's current pass among the chunks `run`, in index order.
fn gather_candidates(radix: &RadixSelect, run: &[(u64, &[f32])], passes: &dyn ChunkPasses, found: &mut Vec<Candidate>) -> Result<Vec<Candidate>, Error> {
    let mut out = Vec::new();
    found.resize(CHUNK, Candidate::default());
    for &(offset, values) in run {
        match passes.radix_gather(radix, offset, values, found)? {
            Some(n) => out.extend_from_slice(&found[..n]),
            None => return Err(Error::Misuse { what: "room for a chunk's top-k candidates" }),
        }
    }
    Ok(out)
}

fn set_selection(step: &mut TensorStep<'_>, sel: crate::onties::TiesSelection, scope_offset: u64) {
    if let MergePlan::Ties { selection, offset, .. } = &mut step.merge {
        *selection = Some(sel);
        *offset = scope_offset;
    }
}

/// Per chunk of each job, the bits of the largest value a check reads,
/// recorded by a scan while the chunk is in cache: of the OnTIES check from
/// the update (`θ`, the update, `Δ_c`, `τ'`, in magnitude), or of the check
/// pass ([`AtLeast`]); `u32::MAX` (no bound) where not recorded.
struct ChunkBounds(Vec<Vec<u32>>);

impl ChunkBounds {
    fn new(lens: &[usize]) -> ChunkBounds {
        ChunkBounds(lens.iter().map(|&n| std::vec![u32::MAX; n.div_ceil(CHUNK)]).collect())
    }

    fn of(&self, c: &ChunkView<'_>) -> u32 {
        self.0[c.job][c.lo / CHUNK]
    }
}

/// Writes the update of one job (`only`) or of all jobs, concatenated, into `out`,
/// and records each chunk's bound in `bounds`.
/// With `first`, a radix select in its first pass over that scope, each thread
/// also counts the chunks it wrote into a copy of it while they are in cache;
/// the copies are returned, for [`RadixSelect::absorb`].
#[allow(clippy::too_many_arguments)]
fn scan_updates(jobs: &[ParallelJob<'_>], ranges: &[ValueRanges], steps: &[TensorStep<'_>], out: &mut [f32], only: Option<usize>, first: Option<&RadixSelect>, workers: &mut [Buffers], passes: &dyn ChunkPasses, bounds: &mut ChunkBounds) -> Result<Vec<RadixSelect>, Error> {
    let chunks: Vec<_> = chunk_views(jobs, ranges).into_iter().filter(|c| only.is_none_or(|j| c.job == j)).collect();
    let mut items = Vec::with_capacity(chunks.len());
    let (mut rest, mut at) = (out, 0u64);
    for c in chunks {
        let len = c.len;
        let (head, tail) = rest.split_at_mut(len);
        items.push((c, head, at));
        at += len as u64;
        rest = tail;
    }
    let (recorded, copies) = run_with(workers, items, || first.cloned(), |(c, out, at), buf, copy| {
        let (grad, theta, tau) = buf.widen(c.grad, c.theta, c.tau);
        let bound = passes.scan_chunk(&steps[c.job], c.lo as u64, grad, c.state(theta), tau, None, Some(&mut *out))?;
        if let Some(copy) = copy {
            passes.radix_feed(copy, at, out)?;
        }
        Ok((c.job, c.lo / CHUNK, bound))
    })?;
    for (job, chunk, bound) in recorded {
        bounds.0[job][chunk] = bound;
    }
    Ok(copies.into_iter().flatten().collect())
}

/// One chunk of one tensor, read-only.
struct ChunkView<'a> {
    job: usize,
    lo: usize,
    len: usize,
    grad: Src<'a>,
    theta: Src<'a>,
    m: &'a [f32],
    v: &'a [f32],
    cached: Option<&'a [f32]>,
    tau: TaskVector<'a>,
}

impl<'a> ChunkView<'a> {
    fn state<'s>(&self, theta: &'s [f32]) -> StateRef<'s>
    where
        'a: 's,
    {
        StateRef { theta, m: self.m, v: self.v, cached: self.cached }
    }
}

/// One chunk of one tensor, to be written.
struct ChunkMut<'a> {
    job: usize,
    lo: usize,
    grad: Src<'a>,
    theta: Param<'a>,
    m: &'a mut [f32],
    v: &'a mut [f32],
    cached: Option<&'a mut [f32]>,
    tau: TaskVector<'a>,
}

/// The chunk `lo .. lo + len` of a task vector; `values` is the range of its
/// stored values (packed form).
fn tau_chunk<'a>(tau: TaskVector<'a>, lo: usize, len: usize, values: core::ops::Range<usize>) -> TaskVector<'a> {
    if tau.is_empty() {
        return tau;
    }
    match tau {
        TaskVector::Dense(s) => TaskVector::Dense(s.slice(lo, len)),
        TaskVector::Packed { stored, values: all } => TaskVector::Packed { stored: &stored[lo / 8..(lo + len).div_ceil(8)], values: &all[values] },
    }
}

/// The range of stored values of each chunk of one task vector (packed form;
/// empty otherwise).
type ValueRanges = Vec<core::ops::Range<usize>>;

/// The [`ValueRanges`] of `tau`.
fn chunk_value_ranges(tau: TaskVector<'_>) -> ValueRanges {
    let mut out = Vec::new();
    if let TaskVector::Packed { stored, .. } = tau {
        let mut count = 0;
        for bytes in stored.chunks(CHUNK / 8) {
            let end = count + set_bits(bytes);
            out.push(count..end);
            count = end;
        }
    }
    out
}

/// The number of set bits, counted a 64-bit word at a time (a byte at a time
/// cost a few milliseconds per 16M-element step without the `popcnt` instruction).
fn set_bits(bytes: &[u8]) -> usize {
    words(bytes).map(|w| w.count_ones() as usize).sum()
}

/// `bytes` as little-endian 64-bit words, the last one padded with zero bits:
/// bit `i` of word `w` is element `64 w + i`.
fn words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    let full = bytes.chunks_exact(8);
    let tail = full.remainder();
    let last = (!tail.is_empty()).then(|| {
        let mut padded = [0u8; 8];
        padded[..tail.len()].copy_from_slice(tail);
        u64::from_le_bytes(padded)
    });
    full.map(|word| u64::from_le_bytes(word.try_into().expect("8 bytes"))).chain(last)
}

/// The jobs cut into chunks; `ranges` holds each job's [`ValueRanges`].
fn chunk_views<'a>(jobs: &'a [ParallelJob<'_>], ranges: &[ValueRanges]) -> Vec<ChunkView<'a>> {
    let mut out = Vec::new();
    for ((j, job), ranges) in jobs.iter().enumerate().zip(ranges) {
        let n = job.m.len();
        for (c, lo) in (0..n).step_by(CHUNK).enumerate() {
            let len = CHUNK.min(n - lo);
            out.push(ChunkView {
                job: j,
                lo,
                len,
                grad: job.grad.slice(lo, len),
                theta: job.theta.as_src().slice(lo, len),
                m: &job.m[lo..lo + len],
                v: &job.v[lo..lo + len],
                cached: job.cached.as_deref().map(|c| &c[lo..lo + len]),
                tau: tau_chunk(job.tau, lo, len, ranges.get(c).cloned().unwrap_or(0..0)),
            });
        }
    }
    out
}

/// [`chunk_views`], to be written.
fn chunk_muts<'a>(jobs: &'a mut [ParallelJob<'_>], ranges: &[ValueRanges]) -> Vec<ChunkMut<'a>> {
    let mut out = Vec::new();
    for ((j, job), ranges) in jobs.iter_mut().enumerate().zip(ranges) {
        let n = job.m.len();
        let mut cached = job.cached.as_deref_mut().map(|c| c.chunks_mut(CHUNK));
        let parts = job.theta.chunks().into_iter().zip(job.m.chunks_mut(CHUNK)).zip(job.v.chunks_mut(CHUNK));
        for (c, ((theta, m), v)) in parts.enumerate() {
            let lo = c * CHUNK;
            let len = CHUNK.min(n - lo);
            out.push(ChunkMut {
                job: j,
                lo,
                grad: job.grad.slice(lo, len),
                theta,
                m,
                v,
                cached: cached.as_mut().and_then(|it| it.next()),
                tau: tau_chunk(job.tau, lo, len, ranges.get(c).cloned().unwrap_or(0..0)),
            });
        }
    }
    out
}

/// One worker thread's binary32 room for chunks stored in 16 bits, for packed
/// task vectors and for the OnTIES select's gathered candidates; kept for the
/// step's every pass (and in a [`Scratch`], between steps), so that a pass does
/// not fault in fresh memory.
#[derive(Default)]
struct Buffers {
    grad: Vec<f32>,
    theta: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    cached: Vec<f32>,
    tau: Unpacked,
    candidates: Vec<Candidate>,
}

/// A packed task vector's chunk unpacked: `+0` but at the stored elements.
#[derive(Default)]
struct Unpacked {
    values: Vec<f32>,
    /// Where the last chunk stored values, to clear them for the next one
    /// (a fraction `p` of the chunk; clearing it all cost more than the unpacking).
    set: Vec<usize>,
}

/// `tau` as a source the step reads: itself, or unpacked into `buf`.
fn unpacked<'b>(tau: TaskVector<'b>, len: usize, buf: &'b mut Unpacked) -> Src<'b> {
    match tau {
        TaskVector::Dense(s) => s,
        TaskVector::Packed { stored: [], .. } => Src::F32(&[]),
        TaskVector::Packed { stored, values } => {
            let Unpacked { values: out, set } = buf;
            if out.len() == len {
                for &i in set.iter() {
                    out[i] = 0.0;
                }
            } else {
                out.clear();
                out.resize(len, 0.0);
            }
            set.clear();
            // Most words are 0 (a fraction p is stored): visit only the set bits.
            // check_lengths matched the bits with the values and cleared the tail.
            let mut next = values.iter();
            for (w, mut bits) in words(stored).enumerate() {
                while bits != 0 {
                    let i = w * 64 + bits.trailing_zeros() as usize;
                    out[i] = *next.next().expect("one value per set bit");
                    set.push(i);
                    bits &= bits - 1;
                }
            }
            Src::F32(out)
        }
    }
}

/// `src` as binary32: itself when it is, else widened into `buf`.
fn widened<'b>(src: Src<'b>, buf: &'b mut Vec<f32>) -> &'b [f32] {
    match src {
        Src::F32(s) => s,
        _ => {
            buf.resize(src.len(), 0.0);
            src.load_into(0, buf);
            buf
        }
    }
}

fn copied<'b>(src: &[f32], buf: &'b mut Vec<f32>) -> &'b mut [f32] {
    buf.clear();
    buf.extend_from_slice(src);
    buf
}

impl Buffers {
    /// Bytes held.
    fn bytes(&self) -> usize {
        let floats = [&self.grad, &self.theta, &self.m, &self.v, &self.cached, &self.tau.values].iter().map(|b| b.capacity()).sum::<usize>();
        floats * core::mem::size_of::<f32>() + self.tau.set.capacity() * core::mem::size_of::<usize>() + self.candidates.capacity() * core::mem::size_of::<Candidate>()
    }

    fn widen<'b>(&'b mut self, grad: Src<'b>, theta: Src<'b>, tau: TaskVector<'b>) -> (&'b [f32], &'b [f32], Src<'b>) {
        let len = grad.len();
        (widened(grad, &mut self.grad), widened(theta, &mut self.theta), unpacked(tau, len, &mut self.tau))
    }

    fn check(&mut self, passes: &dyn ChunkPasses, step: &TensorStep<'_>, c: &ChunkView<'_>) -> Result<(), Error> {
        let Buffers { grad, theta, m, v, cached, tau, .. } = self;
        let grad = widened(c.grad, grad);
        let tau = unpacked(c.tau, c.len, tau);
        let dtype = c.theta.dtype();
        if dtype == Dtype::F32 {
            let Src::F32(theta) = c.theta else { unreachable!() };
            return passes.check_chunk(step, c.lo as u64, grad, c.state(theta), tau);
        }
        // The new parameter must also fit its 16-bit format: step copies, then look.
        let theta = {
            theta.resize(c.len, 0.0);
            c.theta.load_into(0, theta);
            &mut theta[..]
        };
        let state = StateMut { theta, m: copied(c.m, m), v: copied(c.v, v), cached: c.cached.map(|s| copied(s, cached)) };
        passes.write_chunk(step, c.lo as u64, grad, state, tau, None)?;
        for (i, &x) in theta.iter().enumerate() {
            let fits = if dtype == Dtype::Bf16 { f32_to_bf16(x).map(|_| ()) } else { f32_to_f16(x).map(|_| ()) };
            fits.map_err(|e| store_error(step.name, "updated parameter", (c.lo + i) as u64, e, dtype))?;
        }
        Ok(())
    }

    /// A binary32 chunk's check from its scanned update.
    fn check_from_update(&mut self, passes: &dyn ChunkPasses, step: &TensorStep<'_>, c: &ChunkView<'_>, update: &[f32]) -> Result<(), Error> {
        let Src::F32(theta) = c.theta else { return Err(Error::Misuse { what: "a binary32 parameter for the check from the update" }) };
        let tau = unpacked(c.tau, c.len, &mut self.tau);
        passes.check_chunk_from_update(step, c.lo as u64, c.state(theta), tau, update)
    }

    /// A binary32 chunk's write from its scanned update; its job and, if
    /// `tracked`, the bounds of the state it stored.
    fn write_from_update(&mut self, passes: &dyn ChunkPasses, step: &TensorStep<'_>, c: ChunkMut<'_>, update: &[f32], tracked: bool) -> Result<(usize, StateBounds), Error> {
        let ChunkMut { job, lo, grad, theta: Param::F32(theta), m, v, cached, tau } = c else {
            return Err(Error::Misuse { what: "a binary32 parameter for the write from the update" });
        };
        let Buffers { grad: grad_buf, tau: tau_buf, .. } = self;
        let len = grad.len();
        let grad = widened(grad, grad_buf);
        let tau = unpacked(tau, len, tau_buf);
        let mut stored = StateBounds::NONE;
        passes.write_chunk_from_update(step, lo as u64, grad, StateMut { theta, m, v, cached }, tau, update, tracked.then_some(&mut stored))?;
        Ok((job, if tracked { stored } else { StateBounds::UNKNOWN }))
    }

    /// A chunk's write; its job and, if `tracked`, the bounds of the state it stored.
    fn write(&mut self, passes: &dyn ChunkPasses, step: &TensorStep<'_>, c: ChunkMut<'_>, tracked: bool) -> Result<(usize, StateBounds), Error> {
        let ChunkMut { job, lo, grad, theta, m, v, cached, tau } = c;
        let Buffers { grad: grad_buf, theta: theta_buf, tau: tau_buf, .. } = self;
        let len = grad.len();
        let grad = widened(grad, grad_buf);
        let tau = unpacked(tau, len, tau_buf);
        let offset = lo as u64;
        let dtype = theta.dtype();
        let mut stored = StateBounds::NONE;
        let record = tracked.then_some(&mut stored);
        match theta {
            Param::F32(theta) => passes.write_chunk(step, offset, grad, StateMut { theta, m, v, cached }, tau, record)?,
            Param::Bf16(out) | Param::F16(out) => {
                theta_buf.resize(out.len(), 0.0);
                if dtype == Dtype::Bf16 { Src::Bf16(out) } else { Src::F16(out) }.load_into(0, theta_buf);
                passes.write_chunk(step, offset, grad, StateMut { theta: theta_buf, m, v, cached }, tau, record)?;
                // The validating pass rounded these same values, so none can fail here.
                for (i, (o, &x)) in out.iter_mut().zip(theta_buf.iter()).enumerate() {
                    let rounded = if dtype == Dtype::Bf16 { f32_to_bf16(x) } else { f32_to_f16(x) };
                    *o = rounded.map_err(|e| store_error(step.name, "updated parameter", offset + i as u64, e, dtype))?;
                }
                // What was stored is the rounded parameter: not recorded.
                stored.forget_theta();
            }
        }
        Ok((job, if tracked { stored } else { StateBounds::UNKNOWN }))
    }
}

/// Runs `work` over `items` on up to `threads` threads, each taking a contiguous
/// run of about as many items (chunks are equal but for each tensor's last), and returns the results in item order. On failure
/// the error of the lowest failing item is returned (each run stops at its first).
fn run<T: Send, R: Send>(workers: &mut [Buffers], items: Vec<T>, work: impl Fn(T, &mut Buffers) -> Result<R, Error> + Sync) -> Result<Vec<R>, Error> {
    run_with(workers, items, || (), |it, buf, _| work(it, buf)).map(|(out, _)| out)
}

/// [`run`] where each worker also has a state of its own, made by `init` and
/// returned after the results, one per worker in run order.
fn run_with<T: Send, R: Send, S: Send>(workers: &mut [Buffers], items: Vec<T>, init: impl Fn() -> S + Sync, work: impl Fn(T, &mut Buffers, &mut S) -> Result<R, Error> + Sync) -> Result<(Vec<R>, Vec<S>), Error> {
    let threads = workers.len();
    assert!(threads > 0, "a run needs a worker");
    let per = items.len().div_ceil(threads).max(1);
    if threads == 1 || items.len() <= 1 {
        let (buf, mut state) = (&mut workers[0], init());
        let out = items.into_iter().map(|it| work(it, buf, &mut state)).collect::<Result<Vec<R>, Error>>()?;
        return Ok((out, std::vec![state]));
    }
    let mut runs: Vec<Vec<T>> = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        runs.push(items.by_ref().take(per).collect());
    }
    let (work, init) = (&work, &init);
    let one_run = move |run: Vec<T>, buf: &mut Buffers| {
        let mut state = init();
        let out = run.into_iter().map(|it| work(it, buf, &mut state)).collect::<Result<Vec<R>, Error>>();
        out.map(|out| (out, state))
    };
    // At most `threads` runs: one worker's buffers each.
    let (mut out, mut states) = (Vec::new(), Vec::new());
    for r in each_on_a_thread(runs.into_iter().zip(workers.iter_mut()).collect(), one_run) {
        let (part, state) = r?;
        out.extend(part);
        states.push(state);
    }
    Ok((out, states))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dare::{DareConfig, DareVariant};
    use crate::dtype::bf16_to_f32;
    use crate::hyper::AdamConfig;
    use crate::onties::Variant;
    use crate::optim::{Merge, OnlineConfig, Optimizer, Scope, StepJob, TiesConfig};
    use crate::rng::SplitMix64;
    use std::string::String;
    use std::vec;

    /// Sizes around the chunk boundary, with names out of insertion order.
    const TENSORS: [(&str, usize); 4] = [("a.bias", 1), ("b.weight", CHUNK + 3), ("c.weight", 2 * CHUNK + 300), ("d.empty", 0)];

    #[derive(Clone, PartialEq, Debug)]
    struct State {
        theta: Vec<f32>,
        m: Vec<f32>,
        v: Vec<f32>,
        cached: Vec<f32>,
        tau: Vec<f32>,
    }

    fn states(seed: u64) -> Vec<State> {
        let mut rng = SplitMix64::new(seed);
        TENSORS
            .iter()
            .map(|&(_, n)| {
                let mut draw = |scale: f32| (0..n).map(|_| rng.uniform_f32(1.0) * scale).collect::<Vec<f32>>();
                // τ' is sparse, as DARE and TIES leave it, with some -0 kept as
                // stored; which elements are stored differs from chunk to chunk, so
                // a stale value left from the previous chunk's unpacking would show.
                let stored = |i: usize| (i.wrapping_mul(0x9e37_79b1) >> 13) % 5;
                let tau = draw(1e-3).iter().enumerate().map(|(i, &x)| match stored(i) { 0 => x, 1 => -0.0, _ => 0.0 }).collect();
                State { theta: draw(0.5), m: vec![0.0; n], v: vec![0.0; n], cached: vec![0.0; n], tau }
            })
            .collect()
    }

    fn grads(rng: &mut SplitMix64) -> Vec<Vec<f32>> {
        TENSORS.iter().map(|&(_, n)| (0..n).map(|_| rng.uniform_f32(1.0) * 1e-2).collect()).collect()
    }

    fn configs() -> Vec<(String, OnlineConfig)> {
        let adam = AdamConfig { lr: 1e-3, weight_decay: 0.01, ..AdamConfig::default() };
        let dare = |variant, rescale| Merge::Dare(DareConfig { variant, p: 0.3, alpha: 0.1, rescale, clip: 1e-3 });
        let ties = |variant, rescale, scope| Merge::Ties(TiesConfig { variant, p: 0.05, alpha: 0.1, rescale, scope });
        let merges = [
            ("adamw", Merge::None),
            ("dare", dare(DareVariant::Reference, false)),
            ("dare-rescale", dare(DareVariant::Reference, true)),
            ("dare-paper-rescale", dare(DareVariant::Paper, true)),
            ("ties", ties(Variant::Reference, false, Scope::PerTensor)),
            ("ties-paper-rescale", ties(Variant::Paper, true, Scope::PerTensor)),
            ("ties-global-rescale", ties(Variant::Reference, true, Scope::Global)),
        ];
        let mut out = Vec::new();
        for (name, merge) in merges {
            for k in [1, 2] {
                out.push((std::format!("{name} k={k}"), OnlineConfig { adam, merge, k, seed: 5 }));
            }
        }
        out
    }

    fn sequential_step(plan: &StepPlan, st: &mut [State], g: &[Vec<f32>], k: u32) -> Result<(), Error> {
        let mut scratch: Vec<Vec<f32>> = g.iter().map(|x| vec![0.0; x.len()]).collect();
        let mut jobs: Vec<StepJob<'_>> = st
            .iter_mut()
            .zip(g)
            .zip(TENSORS)
            .zip(scratch.iter_mut())
            .map(|(((s, g), (name, _)), scratch)| StepJob {
                name,
                grad: g,
                state: StateMut { theta: &mut s.theta, m: &mut s.m, v: &mut s.v, cached: (k > 1).then_some(&mut s.cached[..]) },
                tau: Src::F32(&s.tau),
                scratch,
            })
            .collect();
        plan.step_tensors(&mut jobs)
    }

    /// `τ'` without its `+0` entries: the stored-element bits and the values.
    fn pack(tau: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let mut stored = vec![0u8; tau.len().div_ceil(8)];
        let mut values = Vec::new();
        for (i, &x) in tau.iter().enumerate() {
            if x.to_bits() != 0 {
                stored[i / 8] |= 1 << (i % 8);
                values.push(x);
            }
        }
        (stored, values)
    }

    fn parallel_step(plan: &StepPlan, st: &mut [State], g: &[Vec<f32>], k: u32, threads: usize, packed: bool) -> Result<(), Error> {
        parallel_step_in(plan, st, g, k, threads, packed, &mut Scratch::default(), &mut [])
    }

    #[allow(clippy::too_many_arguments)]
    fn parallel_step_in(plan: &StepPlan, st: &mut [State], g: &[Vec<f32>], k: u32, threads: usize, packed: bool, scratch: &mut Scratch, bounds: &mut [StateBounds]) -> Result<(), Error> {
        let packs: Vec<(Vec<u8>, Vec<f32>)> = st.iter().map(|s| pack(&s.tau)).collect();
        let mut jobs: Vec<ParallelJob<'_>> = st
            .iter_mut()
            .zip(g)
            .zip(TENSORS)
            .zip(&packs)
            .map(|(((s, g), (name, _)), (stored, values))| ParallelJob {
                name,
                grad: Src::F32(g),
                theta: Param::F32(&mut s.theta),
                m: &mut s.m,
                v: &mut s.v,
                cached: (k > 1).then_some(&mut s.cached[..]),
                tau: if packed { TaskVector::Packed { stored, values } } else { TaskVector::Dense(Src::F32(&s.tau)) },
            })
            .collect();
        step_tensors_tracked(plan, &mut jobs, threads, &Portable, scratch, bounds)
    }

    /// The bounds of each tensor's whole state, as a tracked step records them.
    fn bounds_of(st: &[State], k: u32) -> Vec<StateBounds> {
        st.iter()
            .map(|s| {
                let mut b = StateBounds::NONE;
                b.include(&s.theta, &s.m, &s.v, (k > 1).then_some(&s.cached[..]));
                b
            })
            .collect()
    }

    #[test]
    fn every_thread_count_gives_the_bits_of_step_tensors() {
        for (label, cfg) in configs() {
            let mut opt = Optimizer::new(cfg).unwrap();
            let mut want = states(1);
            let mut got: Vec<Vec<State>> = [1, 2, 3, 7].iter().map(|_| states(1)).collect();
            // Each thread count keeps its scratch across the steps, its room
            // (longer than asked) filled with NaNs: what a scratch holds never
            // shows in the bits.
            let mut scratches: Vec<Scratch> = [1, 2, 3, 7].iter().map(|_| Scratch::with_room(|n| vec![f32::NAN; n + 3])).collect();
            // Three and seven threads keep the bounds from step to step, so
            // their validating pass reads only the gradient and τ'.
            let mut bounds: Vec<Vec<StateBounds>> = [1, 2, 3, 7].iter().map(|&t| if t >= 3 { vec![StateBounds::UNKNOWN; TENSORS.len()] } else { Vec::new() }).collect();
            let mut rng = SplitMix64::new(2);
            for _ in 0..3 {
                let plan = opt.begin_step().unwrap();
                let g = grads(&mut rng);
                sequential_step(&plan, &mut want, &g, cfg.k).unwrap();
                for (((st, scratch), bounds), threads) in got.iter_mut().zip(&mut scratches).zip(&mut bounds).zip([1, 2, 3, 7]) {
                    // Odd thread counts read τ' packed: the same bits.
                    parallel_step_in(&plan, st, &g, cfg.k, threads, threads % 2 == 1, scratch, bounds).unwrap();
                    assert!(*st == want, "{label}, {threads} threads, step {}", plan.step());
                    if !bounds.is_empty() {
                        assert_eq!(*bounds, bounds_of(st, cfg.k), "{label}, {threads} threads, step {}: the recorded bounds", plan.step());
                    }
                }
            }
            assert!(want[2].theta != states(1)[2].theta, "{label}: the step changed nothing");
        }
    }

    #[test]
    fn a_room_shorter_than_asked_is_refused_before_anything_is_written() {
        let (_, cfg) = configs().into_iter().find(|(l, _)| l.starts_with("ties")).unwrap();
        let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
        let mut st = states(1);
        let err = parallel_step_in(&plan, &mut st, &grads(&mut SplitMix64::new(3)), cfg.k, 2, false, &mut Scratch::with_room(|n| vec![0.0; n - 1]), &mut []).unwrap_err();
        assert!(matches!(err, Error::Misuse { .. }), "{err}");
        assert!(st == states(1));
    }

    #[test]
    fn a_bad_element_anywhere_writes_nothing_and_names_the_first() {
        let (_, cfg) = configs().into_iter().find(|(l, _)| l == "dare-rescale k=1").unwrap();
        let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
        let mut g = grads(&mut SplitMix64::new(3));
        g[2][2 * CHUNK + 7] = f32::NAN;
        g[2][CHUNK + 9] = f32::INFINITY;
        let mut want = states(1);
        let want_err = sequential_step(&plan, &mut want, &g, 1).unwrap_err();
        for threads in [1, 2, 4] {
            let mut st = states(1);
            let err = parallel_step(&plan, &mut st, &g, 1, threads, threads == 2).unwrap_err();
            assert_eq!(err, want_err);
            assert!(st == states(1), "{threads} threads wrote after an error");
        }
        assert!(matches!(want_err, Error::NonFinite { index, .. } if index == (CHUNK + 9) as u64));
    }

    /// Kept bounds spare the validating pass the parameter and the state, and
    /// only those: a bad gradient is still refused before anything is written
    /// (and the bounds are forgotten), while a parameter or state that broke the
    /// promise (written behind the step's back) is refused by the writing pass,
    /// after the chunks before it were stored with SPEC's bits. Without bounds
    /// the same values write nothing.
    #[test]
    fn kept_bounds_spare_the_parameter_and_state_and_only_those() {
        let (_, cfg) = configs().into_iter().find(|(l, _)| l == "dare k=1").unwrap();
        let mut opt = Optimizer::new(cfg).unwrap();
        let mut rng = SplitMix64::new(4);
        let mut st = states(1);
        let mut bounds = vec![StateBounds::UNKNOWN; TENSORS.len()];
        let plan = opt.begin_step().unwrap();
        parallel_step_in(&plan, &mut st, &grads(&mut rng), 1, 2, false, &mut Scratch::default(), &mut bounds).unwrap();
        let kept = bounds.clone();
        assert!(kept.iter().all(|b| *b != StateBounds::UNKNOWN));

        let plan = opt.begin_step().unwrap();
        let mut g = grads(&mut rng);
        g[2][2 * CHUNK + 1] = f32::NAN;
        let start = st.clone();
        let err = parallel_step_in(&plan, &mut st, &g, 1, 2, false, &mut Scratch::default(), &mut bounds).unwrap_err();
        assert!(matches!(err, Error::NonFinite { index, .. } if index == (2 * CHUNK + 1) as u64), "{err}");
        assert!(st == start, "a bad gradient wrote");
        assert!(bounds.iter().all(|b| *b == StateBounds::UNKNOWN), "an error kept the bounds");

        let g = grads(&mut rng);
        type Element = fn(&mut State) -> &mut f32;
        let spoils: [(&str, Element); 2] = [("v", |s| &mut s.v[CHUNK + 9]), ("θ", |s| &mut s.theta[CHUNK + 9])];
        for (what, at) in spoils {
            let mut spoiled = start.clone();
            *at(&mut spoiled[2]) = f32::INFINITY;
            let mut want = spoiled.clone();
            let want_err = sequential_step(&plan, &mut want, &g, 1).unwrap_err();
            let mut untracked = spoiled.clone();
            assert_eq!(parallel_step(&plan, &mut untracked, &g, 1, 2, false).unwrap_err(), want_err, "{what}");
            assert!(untracked == spoiled, "{what}: without bounds a bad value wrote");
            let mut trusted = spoiled.clone();
            let mut promise = kept.clone();
            assert_eq!(parallel_step_in(&plan, &mut trusted, &g, 1, 1, false, &mut Scratch::default(), &mut promise).unwrap_err(), want_err, "{what}");
            let mut stepped = spoiled.clone();
            *at(&mut stepped[2]) = 0.0;
            sequential_step(&plan, &mut stepped, &g, 1).unwrap();
            for t in 0..2 {
                assert!(trusted[t] == stepped[t], "{what}, tensor {t}: the chunks before the refused one carry SPEC's bits");
            }
            assert!(trusted[2].theta[..CHUNK] == stepped[2].theta[..CHUNK] && trusted[2].theta[CHUNK..] == spoiled[2].theta[CHUNK..], "{what}");
        }
    }

    /// Puts a bad value into a step's states or gradients.
    type Spoil = dyn Fn(&mut [State], &mut [Vec<f32>]);

    /// Steps without a scan pass (plain AdamW, OnDARE without the rescale,
    /// step-K's accumulating steps) refuse in the checking pass, whose chunks
    /// within the finite bound are passed whole: a non-finite gradient (beside a
    /// parameter at the largest finite value) and a non-finite packed or dense
    /// τ' value are each named as the one-thread step names them, and
    /// nothing is written.
    #[test]
    fn the_checking_pass_refuses_alike_and_writes_nothing() {
        for label in ["adamw k=1", "adamw k=2", "dare k=1", "dare k=2"] {
            let (_, cfg) = configs().into_iter().find(|(l, _)| l == label).unwrap();
            // Step 1 accumulates (k = 2) and step 2 merges.
            for step in [1, 2] {
                let plan = Optimizer::new(cfg).unwrap().plan(step).unwrap();
                let reads_tau = label.starts_with("dare") && step % u64::from(cfg.k) == 0;
                let bad_grad = |st: &mut [State], g: &mut [Vec<f32>]| {
                    g[2][CHUNK + 9] = f32::INFINITY;
                    st[1].theta[CHUNK + 1] = f32::MAX;
                };
                // Infinite, not NaN: the states are compared with `==`.
                let bad_tau = |st: &mut [State], _: &mut [Vec<f32>]| st[2].tau[2 * CHUNK + 5] = f32::NEG_INFINITY;
                let cases: [(&str, &Spoil); 2] = [("gradient", &bad_grad), ("task vector", &bad_tau)];
                for (what, spoil) in cases {
                    let (mut start, mut g) = (states(1), grads(&mut SplitMix64::new(3)));
                    spoil(&mut start, &mut g);
                    let mut want = start.clone();
                    let want_err = sequential_step(&plan, &mut want, &g, cfg.k);
                    if what == "task vector" && !reads_tau {
                        assert!(want_err.is_ok(), "{label}, step {step}: an unread τ' refused");
                        continue;
                    }
                    let want_err = want_err.unwrap_err();
                    for threads in [1, 2, 3] {
                        let mut st = start.clone();
                        let err = parallel_step(&plan, &mut st, &g, cfg.k, threads, threads != 2).unwrap_err();
                        assert_eq!(err, want_err, "{label}, step {step}, {what}, {threads} threads");
                        assert!(st == start, "{label}, step {step}, {what}: {threads} threads wrote after an error");
                    }
                }
            }
        }
    }

    /// OnTIES validates binary32 tensors from the scanned update: a new parameter
    /// that overflows (found only after the threshold) is named as the
    /// one-thread step names it, per tensor and global, and nothing is written.
    #[test]
    fn an_onties_parameter_that_overflows_is_named_alike_and_writes_nothing() {
        for label in ["ties k=1", "ties-global-rescale k=1", "ties-paper-rescale k=1"] {
            let (_, cfg) = configs().into_iter().find(|(l, _)| l == label).unwrap();
            let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
            let g = grads(&mut SplitMix64::new(3));
            let mut start = states(1);
            for (t, at) in [(1, 5), (2, CHUNK + 11)] {
                start[t].theta[at] = f32::MAX;
                start[t].tau[at] = f32::MAX;
            }
            let mut want = start.clone();
            let want_err = sequential_step(&plan, &mut want, &g, 1).unwrap_err();
            assert!(matches!(want_err, Error::NonFinite { what: "updated parameter", .. }), "{label}: {want_err}");
            for threads in [1, 2, 3] {
                let mut st = start.clone();
                let err = parallel_step(&plan, &mut st, &g, 1, threads, threads == 2).unwrap_err();
                assert_eq!(err, want_err, "{label}, {threads} threads");
                assert!(st == start, "{label}: {threads} threads wrote after an error");
            }
        }
    }

    /// Per tensor, OnTIES checks the tensors selected from a sampled bound
    /// together, before the tensors that select from their whole update: an
    /// error is still the first in tensor order, as the one-thread step names
    /// it, whichever tensor takes which select, and nothing is written.
    #[test]
    fn onties_names_the_first_tensors_error_whichever_select_it_takes() {
        let (_, cfg) = configs().into_iter().find(|(l, _)| l == "ties k=1").unwrap();
        let cfg = OnlineConfig { merge: Merge::Ties(TiesConfig { p: 0.01, ..TiesConfig::default() }), ..cfg };
        let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
        for (sampled, tied) in [(1, 2), (2, 1)] {
            let mut g = grads(&mut SplitMix64::new(4));
            g[tied].fill(1e-2);
            let mut start = states(1);
            assert!(selects_from_a_sample(&plan, &mut start.clone(), &g, 1, sampled));
            assert!(!selects_from_a_sample(&plan, &mut start.clone(), &g, 1, tied));
            // Refused only by the check: the new parameter overflows.
            start[sampled].theta[CHUNK - 2] = f32::MAX;
            start[sampled].tau[CHUNK - 2] = f32::MAX;
            g[tied][CHUNK + 2] = f32::NAN;
            let mut want = start.clone();
            let want_err = sequential_step(&plan, &mut want, &g, 1).unwrap_err();
            let first = TENSORS[sampled.min(tied)].0;
            assert!(matches!(&want_err, Error::NonFinite { tensor, .. } if tensor.as_str() == first), "{want_err}");
            for threads in [1, 2, 3] {
                let mut st = start.clone();
                let err = parallel_step(&plan, &mut st, &g, 1, threads, threads == 2).unwrap_err();
                assert_eq!(err, want_err, "tensor {sampled} sampled, {threads} threads");
                assert!(st == start, "{threads} threads wrote after an error");
            }
        }
    }

    /// Updates of mostly one magnitude (equal gradients from a zero state) keep
    /// the radix select's candidates many: the threads scan every element in
    /// each key pass and the select breaks the ties by index, with the bits of
    /// the one-thread step, also when a few larger updates are kept outright.
    /// (Spread-out updates, which take the gathered path, are in
    /// `every_thread_count_gives_the_bits_of_step_tensors`.)
    #[test]
    fn onties_over_tied_updates_gives_the_bits_of_step_tensors() {
        for label in ["ties k=1", "ties-global-rescale k=1"] {
            let (_, cfg) = configs().into_iter().find(|(l, _)| l == label).unwrap();
            for spread in [0usize, 97] {
                let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
                let g: Vec<Vec<f32>> = TENSORS.iter().map(|&(_, n)| (0..n).map(|i| if spread > 0 && i % spread == 0 { 2e-2 } else { 1e-2 }).collect()).collect();
                let mut want = states(1);
                sequential_step(&plan, &mut want, &g, 1).unwrap();
                for threads in [1, 2, 3] {
                    let mut st = states(1);
                    parallel_step(&plan, &mut st, &g, 1, threads, threads == 3).unwrap();
                    assert!(st == want, "{label}, spread {spread}, {threads} threads");
                }
            }
        }
    }

    /// Updates spread over eight octaves leave a few thousand candidates after the
    /// radix select's first pass: the threads gather them and the remaining
    /// passes run over that list, with the bits of the one-thread step.
    /// Whether OnTIES selects tensor `job` from a sampled bound for this step.
    fn selects_from_a_sample(plan: &StepPlan, st: &mut [State], g: &[Vec<f32>], k: u32, job: usize) -> bool {
        let jobs: Vec<ParallelJob<'_>> = st
            .iter_mut()
            .zip(g)
            .zip(TENSORS)
            .map(|((s, g), (name, _))| ParallelJob { name, grad: Src::F32(g), theta: Param::F32(&mut s.theta), m: &mut s.m, v: &mut s.v, cached: (k > 1).then_some(&mut s.cached[..]), tau: TaskVector::Dense(Src::F32(&s.tau)) })
            .collect();
        let ranges: Vec<_> = jobs.iter().map(|j| chunk_value_ranges(j.tau)).collect();
        let steps: Vec<_> = jobs.iter().map(|j| plan.tensor(j.name, j.m.len() as u64).unwrap()).collect();
        let firsts: Vec<_> = jobs.iter().map(|j| plan.ties_start_select(j.name, j.m.len() as u64).unwrap()).collect();
        let mut workers: Vec<Buffers> = (0..2).map(|_| Buffers::default()).collect();
        select_above_samples(&jobs, &ranges, &steps, &firsts, &mut workers, &Portable).unwrap().0[job].is_some()
    }

    /// Per tensor, OnTIES selects from a sampled bound where the updates
    /// spread (here the two tensors of a chunk or more), and from the whole
    /// update where they tie (every element reaches any bound); the bits are
    /// those of the sequential step either way, tracked or not.
    #[test]
    fn onties_from_a_sampled_bound_gives_the_bits_of_step_tensors() {
        for label in ["ties k=1", "ties k=2"] {
            let (_, cfg) = configs().into_iter().find(|(l, _)| l == label).unwrap();
            let cfg = OnlineConfig { merge: Merge::Ties(TiesConfig { p: 0.01, ..TiesConfig::default() }), ..cfg };
            let k = cfg.k;
            let plan = Optimizer::new(cfg).unwrap().plan(u64::from(k)).unwrap();
            let mut rng = SplitMix64::new(3);
            let spread = grads(&mut rng);
            let tied: Vec<Vec<f32>> = TENSORS.iter().map(|&(_, n)| vec![1e-2; n]).collect();
            for (what, g, sampled) in [("spread", &spread, true), ("tied", &tied, false)] {
                let mut start = states(2);
                for st in &mut start {
                    st.cached = st.cached.iter().map(|_| if sampled { rng.uniform_f32(1.0) * 1e-4 } else { 1e-4 }).collect();
                }
                for job in [1, 2] {
                    assert_eq!(selects_from_a_sample(&plan, &mut start.clone(), g, k, job), sampled, "{label}, {what}, tensor {job}");
                }
                let mut want = start.clone();
                sequential_step(&plan, &mut want, g, k).unwrap();
                for threads in [1, 2, 3] {
                    let mut st = start.clone();
                    let mut bounds = if threads == 2 { bounds_of(&st, k) } else { Vec::new() };
                    parallel_step_in(&plan, &mut st, g, k, threads, threads == 3, &mut Scratch::default(), &mut bounds).unwrap();
                    assert!(st == want, "{label}, {what}, {threads} threads");
                }
            }
        }
    }

    #[test]
    fn onties_over_spread_updates_gathers_candidates_with_the_same_bits() {
        for label in ["ties k=1", "ties-global-rescale k=1"] {
            let (_, cfg) = configs().into_iter().find(|(l, _)| l == label).unwrap();
            let plan = Optimizer::new(cfg).unwrap().plan(3).unwrap();
            let mut rng = SplitMix64::new(8);
            let mut start = states(1);
            for st in &mut start {
                // `D` follows `m` when `v` is the same everywhere
                st.m = st.m.iter().map(|_| 1e-3 * libm::exp2f(-4.0 * (rng.uniform_f32(1.0) + 0.5))).collect();
                st.v = st.v.iter().map(|_| 1e-6).collect();
            }
            let g: Vec<Vec<f32>> = TENSORS.iter().map(|&(_, n)| vec![0.0; n]).collect();
            let mut want = start.clone();
            sequential_step(&plan, &mut want, &g, 1).unwrap();
            for threads in [1, 2, 3] {
                let mut st = start.clone();
                parallel_step(&plan, &mut st, &g, 1, threads, threads == 2).unwrap();
                assert!(st == want, "{label}, {threads} threads");
            }
        }
    }

    #[test]
    fn packed_task_vectors_whose_bits_and_values_disagree_are_refused() {
        let (_, cfg) = configs().into_iter().find(|(l, _)| l == "dare k=1").unwrap();
        let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
        let n = 20;
        let (grad, mut theta, mut m, mut v) = (vec![0.1f32; n], vec![1.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
        for (stored, values, what) in [
            (vec![0b101u8, 0, 0], vec![1.0f32], "packed task vector's values"),
            (vec![1u8, 0], vec![1.0f32], "packed task vector's stored-element bits (bytes)"),
            (vec![0u8, 0, 0b1_0000], vec![1.0f32], "packed task vector's values"),
        ] {
            let mut jobs = [ParallelJob { name: "w", grad: Src::F32(&grad), theta: Param::F32(&mut theta), m: &mut m, v: &mut v, cached: None, tau: TaskVector::Packed { stored: &stored, values: &values } }];
            let err = step_tensors(&plan, &mut jobs, 2, &Portable).unwrap_err();
            assert!(matches!(err, Error::LengthMismatch { what: w, .. } if w == what), "{err}");
        }
        assert!(theta.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn bf16_parameters_step_as_their_binary32_widening_then_round() {
        let (_, cfg) = configs().into_iter().find(|(l, _)| l == "ties-global-rescale k=1").unwrap();
        let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
        let g = grads(&mut SplitMix64::new(4));
        let base = states(1);
        let bits: Vec<Vec<u16>> = base.iter().map(|s| s.theta.iter().map(|&x| f32_to_bf16(x).unwrap()).collect()).collect();
        let g16: Vec<Vec<u16>> = g.iter().map(|x| x.iter().map(|&v| f32_to_bf16(v).unwrap()).collect()).collect();
        // Expected: the binary32 step of the widened parameters and gradients, rounded.
        let mut want = base.clone();
        for (s, b) in want.iter_mut().zip(&bits) {
            s.theta = b.iter().map(|&h| bf16_to_f32(h)).collect();
        }
        let g_wide: Vec<Vec<f32>> = g16.iter().map(|x| x.iter().map(|&h| bf16_to_f32(h)).collect()).collect();
        sequential_step(&plan, &mut want, &g_wide, 1).unwrap();
        for threads in [1, 3] {
            let mut st = base.clone();
            let mut theta = bits.clone();
            let mut jobs: Vec<ParallelJob<'_>> = st
                .iter_mut()
                .zip(theta.iter_mut())
                .zip(&g16)
                .zip(TENSORS)
                .map(|(((s, t), g), (name, _))| ParallelJob { name, grad: Src::Bf16(g), theta: Param::Bf16(t), m: &mut s.m, v: &mut s.v, cached: None, tau: TaskVector::Dense(Src::F32(&s.tau)) })
                .collect();
            step_tensors(&plan, &mut jobs, threads, &Portable).unwrap();
            drop(jobs);
            for ((t, w), s) in theta.iter().zip(&want).zip(&st) {
                let rounded: Vec<u16> = w.theta.iter().map(|&x| f32_to_bf16(x).unwrap()).collect();
                assert_eq!(*t, rounded);
                assert_eq!(s.m, w.m);
                assert_eq!(s.v, w.v);
            }
            assert!(theta[2] != bits[2], "the step changed nothing");
        }
    }

    #[test]
    fn a_parameter_that_would_overflow_bf16_is_refused_before_anything_is_written() {
        // θ = bf16's largest finite value plus an update of about 1e36 stays finite
        // in binary32 but rounds past bf16's range.
        let cfg = OnlineConfig { adam: AdamConfig { lr: 1e36, ..AdamConfig::default() }, merge: Merge::None, k: 1, seed: 0 };
        let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
        let n = CHUNK + 5;
        let mut theta = vec![0x3f80u16; n];
        theta[n - 1] = 0x7f7f;
        let before = theta.clone();
        let grad = vec![-1.0f32; n];
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        let mut jobs = [ParallelJob { name: "w", grad: Src::F32(&grad), theta: Param::Bf16(&mut theta), m: &mut m, v: &mut v, cached: None, tau: TaskVector::Dense(Src::F32(&[])) }];
        let err = step_tensors(&plan, &mut jobs, 2, &Portable).unwrap_err();
        assert!(matches!(err, Error::StorageOverflow { index, dtype: Dtype::Bf16, .. } if index == (n - 1) as u64), "{err}");
        assert_eq!(theta, before);
        assert!(m.iter().all(|&x| x == 0.0));
    }
}
