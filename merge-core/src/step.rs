//! One optimizer step of one tensor, in chunks (SPEC.md §5): the building blocks
//! the whole-tensor front (`optim`) and the GPU runtime both follow.
//!
//! A step runs up to three passes over the tensor, each in chunks cut anywhere:
//! 1. `scan` (only with the L1 rescale, or to fill a scratch `Δ` for OnTIES):
//!    feeds `‖Δ‖₁` and `‖Δ'‖₁` and validates everything but the new parameter;
//! 2. `check`: computes every output and validates it, writes nothing (a block
//!    whose inputs lie under `crate::finite`'s bound is known to pass and is
//!    not computed);
//! 3. `write`: computes again and stores.
//!
//! Every pass works in blocks of [`BLOCK`] elements: loads into local arrays,
//! computes with no per-element branch, ORs the non-finite tests, and only then
//! stores; the slow path that names the lowest offending index runs only when a
//! block fails. Masks use the element's index in the full tensor, so the cut
//! points never change a bit.
//!
//! Everything from the chunk passes down to the element arithmetic is
//! `#[inline(always)]`: [`crate::isa`] compiles the passes again with wider vector
//! instructions enabled, and only code inlined into those copies gets them.

use crate::adam;
use crate::arith::{add, add_with, flush, is_non_finite, mul, mul_with, settle, sub_with};
use crate::dare::{self, DareParams, DareVariant};
use crate::dtype::Src;
use crate::error::{Error, tensor_name};
use crate::hyper::{AdamForm, StepScalars};
use crate::reduce::TreeSum;
use crate::onties::{self, ElementMerge, TiesSelection};
use crate::rng::{MaskKey, check_extent, stream};
use crate::topk::{Candidate, RadixSelect, Threshold};

/// Elements per block.
pub const BLOCK: usize = 256;

/// How many blocks ahead the writing pass asks for its inputs
/// ([`TensorStep::write_chunk_prefetching`]): one was slower, four no faster
/// than two (one-thread OnDARE, 16M elements, Zen 5).
const AHEAD: usize = 2;

/// What the step does with the Adam update `Δ` (after rollback, `D = Δ ⊕ Δ_c`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MergePlan {
    /// Plain AdamW: `θ ← θ ⊕ D`.
    None,
    /// OnDARE with the tensor's mask key for this step.
    Dare { params: DareParams, key: MaskKey },
    /// OnTIES. `selection` is `None` until the update's threshold over the scope
    /// is known (the scan pass runs without it); `offset` is the tensor's first
    /// index in the scope's sequence (0 for per-tensor scope).
    Ties { variant: onties::Variant, alpha: f32, one_minus_alpha: f32, selection: Option<TiesSelection>, offset: u64 },
}

/// What the OnTIES passes from the scanned update need.
struct TiesCheck {
    alpha: f32,
    one_minus_alpha: f32,
    sel: TiesSelection,
    scope_offset: u64,
}

impl TiesCheck {
    /// The element formula's constants for the block at `start` of a chunk at `offset`.
    fn element(&self, offset: u64) -> ElementMerge {
        ElementMerge { alpha: self.alpha, one_minus_alpha: self.one_minus_alpha, factor: self.sel.factor, local: self.sel.threshold.local(self.scope_offset + offset) }
    }
}

/// The chunk passes of [`TensorStep`] as the whole-tensor entries call them
/// ([`crate::optim::StepPlan::step_tensors_with`], `crate::parallel`): [`Portable`],
/// or the same passes compiled for wider vectors ([`crate::isa`], chosen by the
/// `merge-simd` crate), with the same bits.
pub trait ChunkPasses: Sync {
    /// [`TensorStep::scan_chunk`].
    #[allow(clippy::too_many_arguments)]
    fn scan_chunk(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>, norms: Option<&mut Norms>, delta_out: Option<&mut [f32]>) -> Result<u32, Error>;
    /// [`TensorStep::check_chunk`].
    fn check_chunk(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>) -> Result<(), Error>;
    /// [`TensorStep::write_chunk`], recording into `stored` the bounds of what
    /// it stores (as [`TensorStep::write_chunk_prefetching`]).
    fn write_chunk(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, stored: Option<&mut StateBounds>) -> Result<(), Error>;
    /// [`TensorStep::check_chunk_from_update`].
    fn check_chunk_from_update(&self, step: &TensorStep<'_>, offset: u64, state: StateRef<'_>, tau: Src<'_>, update: &[f32]) -> Result<(), Error>;
    /// [`TensorStep::write_chunk_from_update`].
    #[allow(clippy::too_many_arguments)]
    fn write_chunk_from_update(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, update: &[f32], stored: Option<&mut StateBounds>) -> Result<(), Error>;
    /// [`RadixSelect::feed_values`] (the OnTIES select's passes over the update).
    fn radix_feed(&self, radix: &mut RadixSelect, offset: u64, values: &[f32]) -> Result<(), Error>;
    /// [`RadixSelect::gather_candidates`].
    fn radix_gather(&self, radix: &RadixSelect, offset: u64, values: &[f32], out: &mut [Candidate]) -> Result<Option<usize>, Error>;
    /// [`TensorStep::scan_chunk_at_least`].
    #[allow(clippy::too_many_arguments)]
    fn scan_chunk_at_least(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>, bound: u32, out: &mut [Candidate]) -> Result<Option<AtLeast>, Error>;
    /// The largest of `bits(x) & mask` over `values` (0 when empty): with the
    /// sign cleared, the largest magnitude; with the sign kept, also whether any
    /// is negative. For comparing a whole chunk with the check pass's bound.
    fn largest_bits(&self, values: &[f32], mask: u32) -> u32;
}

/// The passes as this build compiles them (SSE2 in a default x86-64 build).
#[derive(Clone, Copy, Debug, Default)]
pub struct Portable;

impl ChunkPasses for Portable {
    fn scan_chunk(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>, norms: Option<&mut Norms>, delta_out: Option<&mut [f32]>) -> Result<u32, Error> {
        step.scan_chunk(offset, grad, state, tau, norms, delta_out)
    }

    fn check_chunk(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>) -> Result<(), Error> {
        step.check_chunk(offset, grad, state, tau)
    }

    fn write_chunk(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, stored: Option<&mut StateBounds>) -> Result<(), Error> {
        step.write_chunk_prefetching(offset, grad, state, tau, |_| {}, stored)
    }

    fn check_chunk_from_update(&self, step: &TensorStep<'_>, offset: u64, state: StateRef<'_>, tau: Src<'_>, update: &[f32]) -> Result<(), Error> {
        step.check_chunk_from_update(offset, state, tau, update)
    }

    fn write_chunk_from_update(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, update: &[f32], stored: Option<&mut StateBounds>) -> Result<(), Error> {
        step.write_chunk_from_update(offset, grad, state, tau, update, stored)
    }

    fn radix_feed(&self, radix: &mut RadixSelect, offset: u64, values: &[f32]) -> Result<(), Error> {
        radix.feed_values(offset, values)
    }

    fn radix_gather(&self, radix: &RadixSelect, offset: u64, values: &[f32], out: &mut [Candidate]) -> Result<Option<usize>, Error> {
        radix.gather_candidates(offset, values, out)
    }

    fn scan_chunk_at_least(&self, step: &TensorStep<'_>, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>, bound: u32, out: &mut [Candidate]) -> Result<Option<AtLeast>, Error> {
        step.scan_chunk_at_least(offset, grad, state, tau, bound, out)
    }

    fn largest_bits(&self, values: &[f32], mask: u32) -> u32 {
        crate::finite::largest_bits(values, mask)
    }
}

/// What [`TensorStep::scan_chunk_at_least`] found in a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtLeast {
    /// Elements gathered, at the front of the output.
    pub found: usize,
    /// The largest input the check pass bounds ([`TensorStep::check_chunk`]), as bits:
    /// `g`, `θ`, `m`, `Δ_c` and a binary32 `τ'` in magnitude, `v` with its
    /// sign (a negative `v` is above any bound); `u32::MAX` for a `τ'` stored
    /// in 16 bits. A chunk at or below the check pass's limit passes it.
    pub largest_input: u32,
}

/// Step-K phase (SPEC.md §5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Online merging, or the K-th step: `θ ← (θ ⊖ Δ_c) ⊕ merged(Δ ⊕ Δ_c)`, `Δ_c ← +0`.
    Merge,
    /// A step between merges: `θ ← θ ⊕ Δ`, `Δ_c ← Δ_c ⊕ Δ`.
    Accumulate,
}

/// The L1 rescale of the sparsified update, once both norms are known.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rescale {
    /// No rescale and no clamp (option off, or `‖Δ‖₁ < RN(1e-8)` as in the official code).
    Off,
    /// `Δ' ← clamp(Δ' ⊗ factor, ±clip)`.
    Apply { factor: f32, clip: f32 },
}

/// The official code rescales only when `‖Δ‖₁ >= 1e-8` (compared in binary32).
pub const RESCALE_MIN_NORM: f32 = 1e-8;

/// Everything fixed for one step of one tensor.
#[derive(Clone, Copy, Debug)]
pub struct TensorStep<'n> {
    pub name: &'n str,
    /// Elements in the full tensor.
    pub len: u64,
    pub scalars: StepScalars,
    pub phase: Phase,
    pub merge: MergePlan,
    pub rescale: Rescale,
}

/// The two norms the rescale needs, streamed in pass 1.
#[derive(Clone, Debug, Default)]
pub struct Norms {
    /// `‖D‖₁`, the update before sparsification.
    pub update: TreeSum,
    /// `‖D'‖₁`, after sparsification (and the reference `1/p` scale).
    pub sparse: TreeSum,
}

impl Norms {
    /// The rescale the norms call for (SPEC.md §5.2): `factor = ‖D‖₁ ⊘ (‖D'‖₁ ⊕ ε)`.
    pub fn rescale(&self, name: &str, eps: f32, clip: f32) -> Result<Rescale, Error> {
        let org = self.update.finish();
        let new = self.sparse.finish();
        for (v, what) in [(org, "L1 norm of the update"), (new, "L1 norm of the sparsified update")] {
            if is_non_finite(v) {
                return Err(Error::NonFiniteReduction { tensor: tensor_name(name), what });
            }
        }
        if org >= RESCALE_MIN_NORM {
            Ok(Rescale::Apply { factor: crate::arith::div(org, add(new, eps)), clip })
        } else {
            Ok(Rescale::Off)
        }
    }
}

/// One chunk of a tensor's optimizer state, read-only.
#[derive(Clone, Copy, Debug)]
pub struct StateRef<'a> {
    pub theta: &'a [f32],
    pub m: &'a [f32],
    pub v: &'a [f32],
    /// `Δ_c` for step-K; `None` for online merging (treated as `+0`).
    pub cached: Option<&'a [f32]>,
}

/// The largest magnitudes of what writing passes stored (for a caller that
/// keeps them, `crate::parallel::step_tensors_tracked`): the parameter `θ`,
/// `m` and `Δ_c` as magnitude bits (sign cleared), `v` as its raw bits (so a
/// negative `v` counts as larger than any finite one). Taken block by block as
/// each is stored, from the values in registers and first-level cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateBounds {
    pub(crate) theta: u32,
    pub(crate) m: u32,
    pub(crate) v: u32,
    pub(crate) cached: u32,
}

impl StateBounds {
    /// Nothing known: a validating pass must read the parameter and the state.
    pub const UNKNOWN: StateBounds = StateBounds { theta: u32::MAX, m: u32::MAX, v: u32::MAX, cached: u32::MAX };

    /// The bounds of nothing stored yet, to record into.
    #[cfg(feature = "std")]
    pub(crate) const NONE: StateBounds = StateBounds { theta: 0, m: 0, v: 0, cached: 0 };

    /// `[θ, m, v, cached]`, for a caller that keeps the record outside Rust.
    pub fn to_bits(self) -> [u32; 4] {
        [self.theta, self.m, self.v, self.cached]
    }

    /// The record [`StateBounds::to_bits`] gave.
    pub fn from_bits([theta, m, v, cached]: [u32; 4]) -> StateBounds {
        StateBounds { theta, m, v, cached }
    }

    /// Both records together.
    pub(crate) fn join(self, other: StateBounds) -> StateBounds {
        StateBounds { theta: self.theta.max(other.theta), m: self.m.max(other.m), v: self.v.max(other.v), cached: self.cached.max(other.cached) }
    }

    /// Adds values to the record (`cached`: `None` where none is kept); the
    /// writing passes take theirs as they store ([`BlockOut::store_tracking`]).
    #[cfg(test)]
    pub(crate) fn include(&mut self, theta: &[f32], m: &[f32], v: &[f32], cached: Option<&[f32]>) {
        use crate::finite::{ABS, largest_bits};
        self.theta = self.theta.max(largest_bits(theta, ABS));
        self.m = self.m.max(largest_bits(m, ABS));
        self.v = self.v.max(largest_bits(v, u32::MAX));
        if let Some(c) = cached {
            self.cached = self.cached.max(largest_bits(c, ABS));
        }
    }

    /// The parameter's bound becomes unknown (it was stored in another format).
    #[cfg(feature = "std")]
    pub(crate) fn forget_theta(&mut self) {
        self.theta = u32::MAX;
    }
}

/// One chunk of a tensor's optimizer state, to be updated in place.
#[derive(Debug)]
pub struct StateMut<'a> {
    pub theta: &'a mut [f32],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
    pub cached: Option<&'a mut [f32]>,
}

impl<'a> StateRef<'a> {
    /// Elements `r` of every slice (one block of a chunk).
    fn range(&self, r: core::ops::Range<usize>) -> StateRef<'a> {
        StateRef { theta: &self.theta[r.clone()], m: &self.m[r.clone()], v: &self.v[r.clone()], cached: self.cached.map(|c| &c[r]) }
    }
}

impl StateMut<'_> {
    pub fn as_ref(&self) -> StateRef<'_> {
        StateRef { theta: self.theta, m: self.m, v: self.v, cached: self.cached.as_deref() }
    }

    /// Elements `r` of every slice, to store one block into.
    fn range(&mut self, r: core::ops::Range<usize>) -> StateMut<'_> {
        let cached = self.cached.as_deref_mut().map(|c| &mut c[r.clone()]);
        StateMut { theta: &mut self.theta[r.clone()], m: &mut self.m[r.clone()], v: &mut self.v[r], cached }
    }

    /// The same slices, borrowed again for a shorter time.
    pub fn reborrow(&mut self) -> StateMut<'_> {
        StateMut { theta: &mut *self.theta, m: &mut *self.m, v: &mut *self.v, cached: self.cached.as_deref_mut() }
    }
}

/// The values a step checks, in the order that decides which one an error names
/// when several are non-finite at the lowest index (SPEC.md §5.6). The GPU's
/// status words are numbered by this list.
pub const NON_FINITE_VALUES: [&str; 12] = [
    "gradient",
    "parameter",
    "exp_avg",
    "exp_avg_sq",
    "cached delta",
    "task vector",
    "updated exp_avg",
    "updated exp_avg_sq",
    "update",
    "sparsified update",
    "updated cached delta",
    "updated parameter",
];

/// Kernels, picked once per chunk.
const ACCUM: u8 = 0;
const PLAIN: u8 = 1;
const DARE_REF: u8 = 2;
const DARE_PAPER: u8 = 3;
const TIES: u8 = 4;
/// OnTIES, paper variant: the variant is part of the kernel, not a per-element
/// branch, so that the merge loop vectorizes.
const TIES_PAPER: u8 = 7;
/// The check pass of the OnDARE kernels without drawing the masks: every element
/// is checked both kept and dropped (and, for the paper variant, with `τ` kept
/// and dropped). All candidates finite means the masked values are finite, so
/// the Threefry blocks are only drawn for a block where some candidate fails.
const DARE_REF_ALL: u8 = 5;
const DARE_PAPER_ALL: u8 = 6;
/// The OnTIES scan before its threshold is known: the update `D` and the checks
/// of the values it reads. Every element is trimmed then (`+0`), so the merge
/// would compute a new `θ` the scan does not use.
const TIES_SCAN: u8 = 8;

/// Inputs of one block that need more than a flush, flushed: the gradient, `θ`,
/// `m`, `v` and a binary32 task vector are read from the caller's slices and
/// flushed in the compute loop, so that a block is not copied into a buffer
/// before the arithmetic; `tau` holds a converted binary16/bfloat16 task vector.
struct BlockIn {
    n: usize,
    cached: [f32; BLOCK],
    tau: [f32; BLOCK],
    /// Uniforms of streams 0 and 1 (only filled for the kernels that use them).
    u0: [u32; BLOCK],
    u1: [u32; BLOCK],
    /// Index of the block's first element in the tensor (OnTIES trims by index).
    first: u64,
}

/// Outputs of one block.
struct BlockOut {
    theta: [f32; BLOCK],
    m: [f32; BLOCK],
    v: [f32; BLOCK],
    cached: [f32; BLOCK],
    /// `D`, the update after rollback.
    d: [f32; BLOCK],
    /// `D'`, sparsified (before the rescale).
    sparse: [f32; BLOCK],
}

impl BlockIn {
    fn new() -> Self {
        BlockIn {
            n: 0,
            cached: [0.0; BLOCK],
            tau: [0.0; BLOCK],
            u0: [0; BLOCK],
            u1: [0; BLOCK],
            first: 0,
        }
    }
}

impl BlockOut {
    fn new() -> Self {
        BlockOut {
            theta: [0.0; BLOCK],
            m: [0.0; BLOCK],
            v: [0.0; BLOCK],
            cached: [0.0; BLOCK],
            d: [0.0; BLOCK],
            sparse: [0.0; BLOCK],
        }
    }
}

/// A block's inputs and outputs, reused from block to block, and what the
/// flush-free analysis has passed in this chunk.
struct Buffers {
    inp: BlockIn,
    out: BlockOut,
    flush_free: crate::flushless::Memory,
}

impl Buffers {
    fn new() -> Self {
        Buffers { inp: BlockIn::new(), out: BlockOut::new(), flush_free: Default::default() }
    }
}

impl BlockOut {
    /// Stores the validated block.
    #[inline]
    fn store(&self, dst: StateMut<'_>) {
        let n = dst.theta.len();
        dst.theta.copy_from_slice(&self.theta[..n]);
        dst.m.copy_from_slice(&self.m[..n]);
        dst.v.copy_from_slice(&self.v[..n]);
        if let Some(c) = dst.cached {
            c.copy_from_slice(&self.cached[..n]);
        }
    }

    /// [`BlockOut::store`], adding the stored values to `stored` in the same
    /// loop: one pass over values in registers, rather than a copy and then a
    /// scan of the copy.
    #[inline(always)]
    fn store_tracking(&self, dst: StateMut<'_>, stored: &mut StateBounds) {
        use crate::finite::ABS;
        stored.theta = stored.theta.max(store_largest(dst.theta, &self.theta, ABS));
        stored.m = stored.m.max(store_largest(dst.m, &self.m, ABS));
        stored.v = stored.v.max(store_largest(dst.v, &self.v, u32::MAX));
        if let Some(c) = dst.cached {
            stored.cached = stored.cached.max(store_largest(c, &self.cached, ABS));
        }
    }
}

/// Copies the first `dst.len()` values of `src` into `dst` and returns the
/// largest of `bits & mask` over them.
#[inline(always)]
fn store_largest(dst: &mut [f32], src: &[f32; BLOCK], mask: u32) -> u32 {
    let n = dst.len().min(BLOCK);
    let mut largest = 0u32;
    for (d, &x) in dst[..n].iter_mut().zip(&src[..n]) {
        *d = x;
        largest = largest.max(x.to_bits() & mask);
    }
    largest
}

#[inline(always)]
fn load(dst: &mut [f32; BLOCK], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = crate::arith::flush(s);
    }
}

/// Fills `u` with the uniforms of global indices `start .. start + n`, one Threefry
/// block per aligned pair.
#[inline(always)]
fn uniforms(key: &MaskKey, stream: u32, start: u64, n: usize, u: &mut [u32; BLOCK]) {
    const PAIRS: usize = BLOCK / 2;
    let mut even = [0u32; PAIRS + 1];
    let mut odd = [0u32; PAIRS + 1];
    let first_pair = (start >> 1) as u32;
    // Straight-line lanes: the Threefry rounds vectorize across pairs, a whole
    // number of vectors at every width, and the two halves of the block run
    // side by side (a single chain of rounds leaves the vector units idle).
    const HALF: usize = PAIRS / 2;
    for p in 0..HALF {
        let [lo, hi] = key.two_pairs(first_pair.wrapping_add(p as u32), first_pair.wrapping_add((p + HALF) as u32), stream);
        [even[p], odd[p]] = lo;
        [even[p + HALF], odd[p + HALF]] = hi;
    }
    if start & 1 == 0 {
        for (p, pair) in u.chunks_exact_mut(2).enumerate() {
            pair[0] = even[p];
            pair[1] = odd[p];
        }
    } else {
        // An odd start (a chunk cut at an odd index): element j is the element at
        // position j + 1 counted from the first pair's even half, so the block
        // reaches into one pair more.
        [even[PAIRS], odd[PAIRS]] = key.pair(first_pair.wrapping_add(PAIRS as u32), stream);
        for (j, slot) in u[..n].iter_mut().enumerate() {
            let k = j + 1;
            *slot = if k & 1 == 0 { even[k >> 1] } else { odd[k >> 1] };
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Scan,
    Check,
    Write,
}

impl TensorStep<'_> {
    fn kind(&self) -> u8 {
        match (self.phase, self.merge) {
            (Phase::Accumulate, _) => ACCUM,
            (Phase::Merge, MergePlan::None) => PLAIN,
            (Phase::Merge, MergePlan::Dare { params, .. }) => match params.variant {
                DareVariant::Reference => DARE_REF,
                DareVariant::Paper => DARE_PAPER,
            },
            (Phase::Merge, MergePlan::Ties { variant: onties::Variant::Paper, .. }) => TIES_PAPER,
            (Phase::Merge, MergePlan::Ties { .. }) => TIES,
        }
    }

    /// Whether this step reads the task vector (plain AdamW and step-K's
    /// accumulating steps do not, so their callers may pass an empty one).
    fn uses_tau(&self) -> bool {
        matches!(self.kind(), DARE_REF | DARE_PAPER | TIES | TIES_PAPER)
    }

    /// The task vector's elements `start .. start + len`, or an empty source when
    /// this step does not read it.
    fn tau_block<'t>(&self, tau: &Src<'t>, start: usize, len: usize) -> Src<'t> {
        if self.uses_tau() { tau.slice(start, len) } else { Src::F32(&[]) }
    }

    fn check_lengths(&self, offset: u64, grad: &[f32], s: &StateRef<'_>, tau_len: usize) -> Result<(), Error> {
        let n = grad.len();
        let mut lens = [("parameter", s.theta.len()), ("exp_avg", s.m.len()), ("exp_avg_sq", s.v.len()), ("cached delta", n), ("task vector", n)];
        if let Some(c) = s.cached {
            lens[3].1 = c.len();
        }
        if self.uses_tau() {
            lens[4].1 = tau_len;
        }
        for (what, len) in lens {
            if len != n {
                return Err(Error::LengthMismatch { tensor: tensor_name(self.name), what, expected: n as u64, found: len as u64 });
            }
        }
        check_extent(self.name, offset, n)?;
        if offset + n as u64 > self.len {
            return Err(Error::OutOfRange { tensor: tensor_name(self.name), what: "chunk end", value: offset + n as u64, limit: self.len });
        }
        Ok(())
    }

    /// Whether a chunk of these lengths (`tau_len`: the task vector's, unpacked)
    /// passes the length and extent checks every chunk pass starts with.
    #[cfg(feature = "std")]
    pub(crate) fn lengths_fit(&self, offset: u64, grad: &[f32], state: &StateRef<'_>, tau_len: usize) -> bool {
        self.check_lengths(offset, grad, state, tau_len).is_ok()
    }

    /// Pass 1: streams `‖D‖₁` and `‖D'‖₁` into `norms` (if given) and `D` into
    /// `delta_out` (if given, same length as the chunk); writes nothing else.
    /// With `delta_out`, returns the magnitude bits of the chunk's largest `θ`,
    /// `D`, `Δ_c` or `τ'` in magnitude (`u32::MAX` for a `τ'` not stored in
    /// binary32), read while each block is in cache: the OnTIES check from the
    /// update ([`TensorStep::check_chunk_from_update`]) reads nothing else, so a
    /// chunk within its bound needs no second look. Without, `u32::MAX`.
    #[inline(always)]
    pub fn scan_chunk(&self, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>, mut norms: Option<&mut Norms>, mut delta_out: Option<&mut [f32]>) -> Result<u32, Error> {
        use crate::finite::largest_magnitude;
        self.check_lengths(offset, grad, &state, tau.len())?;
        if let Some(d) = delta_out.as_deref() && d.len() != grad.len() {
            return Err(Error::LengthMismatch { tensor: tensor_name(self.name), what: "delta scratch", expected: grad.len() as u64, found: d.len() as u64 });
        }
        let mut largest = match tau {
            Src::F32(_) if delta_out.is_some() => 0,
            _ => u32::MAX,
        };
        // OnTIES's scan has a flush-free form; the norms' scan (OnDARE's rescale) has none.
        let limit = if matches!(self.merge, MergePlan::Ties { selection: None, .. }) { crate::finite::input_limit(self, false) } else { None };
        self.run(Pass::Scan, limit, offset, grad, &state, &tau, |start, out, n| {
            if let Some(norms) = norms.as_deref_mut() {
                norms.update.push_abs_slice(&out.d[..n]);
                norms.sparse.push_abs_slice(&out.sparse[..n]);
            }
            let Some(d) = delta_out.as_deref_mut() else { return };
            d[start..start + n].copy_from_slice(&out.d[..n]);
            let r = start..start + n;
            let inputs = largest_magnitude(&state.theta[r.clone()]).max(state.cached.map_or(0, |c| largest_magnitude(&c[r.clone()])));
            let tau = match tau {
                Src::F32(t) if !t.is_empty() => largest_magnitude(&t[r]),
                _ => 0,
            };
            largest = largest.max(inputs).max(tau).max(largest_magnitude(&out.d[..n]));
        })?;
        Ok(largest)
    }

    /// The scan pass of OnTIES before its threshold is known, validating as
    /// [`TensorStep::scan_chunk`] does, that keeps instead of the update the
    /// elements whose update reaches the magnitude key `bound`
    /// ([`crate::topk::gather_at_least`], each block once validated, while it
    /// is in cache):
    /// written to the front of `out` in index order (indices from `offset`),
    /// their count returned with the largest input ([`AtLeast`]); `None` when
    /// they do not fit.
    #[inline(always)]
    pub fn scan_chunk_at_least(&self, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>, bound: u32, out: &mut [Candidate]) -> Result<Option<AtLeast>, Error> {
        if !matches!(self.merge, MergePlan::Ties { selection: None, .. }) {
            return Err(Error::Misuse { what: "an OnTIES plan before its threshold is known" });
        }
        self.check_lengths(offset, grad, &state, tau.len())?;
        let limit = crate::finite::input_limit(self, false);
        let (mut len, mut fits, mut largest_input) = (0usize, true, 0u32);
        self.run(Pass::Scan, limit, offset, grad, &state, &tau, |start, block, n| {
            if !fits {
                return;
            }
            // The block passed its validation: its update is finite.
            match crate::topk::gather_finite_at_least(bound, offset + start as u64, &block.d[..n], &mut out[len..]) {
                Some(found) => len += found,
                None => fits = false,
            }
            // Read again while in cache: the check pass need not read them.
            use crate::finite::{largest_bits, largest_magnitude};
            let r = start..start + n;
            let tau = match tau {
                Src::F32(t) if !t.is_empty() => largest_magnitude(&t[r.clone()]),
                Src::F32(_) => 0,
                _ => u32::MAX,
            };
            let state = state.range(r.clone());
            let inputs = [largest_magnitude(&grad[r]), largest_magnitude(state.theta), largest_magnitude(state.m), largest_bits(state.v, u32::MAX), state.cached.map_or(0, largest_magnitude), tau];
            largest_input = inputs.into_iter().fold(largest_input, u32::max);
        })?;
        Ok(fits.then_some(AtLeast { found: len, largest_input }))
    }

    /// One element's update `D` (the rollback of `cached` included), as the scan
    /// computes it, from binary32 inputs; what the OnTIES select estimates its
    /// bound from (`crate::parallel`), never stored.
    #[cfg(feature = "std")]
    pub(crate) fn update_of(&self, g: f32, m: f32, v: f32, cached: f32) -> f32 {
        let s = &self.scalars;
        let (m1, v1) = adam::moments_with::<true>(s, flush(g), flush(m), flush(v));
        let d = if s.form == AdamForm::Torch { adam::delta_with::<true, true>(s, m1, v1) } else { adam::delta_with::<false, true>(s, m1, v1) };
        add(d, flush(cached))
    }

    /// Pass 2: computes every output of the chunk and validates it; writes nothing.
    #[inline(always)]
    pub fn check_chunk(&self, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>) -> Result<(), Error> {
        self.check_lengths(offset, grad, &state, tau.len())?;
        let limit = crate::finite::input_limit(self, false);
        self.run(Pass::Check, limit, offset, grad, &state, &tau, |_, _, _| {})
    }

    /// Pass 2 of OnTIES, from the update the scan pass left in `update` (the same
    /// chunk of `D`): the scan has validated the inputs, `m'`, `v'` and `D`, so
    /// only the trimmed update and the new parameter remain, and they need no
    /// Adam arithmetic. Writes nothing.
    #[inline(always)]
    pub fn check_chunk_from_update(&self, offset: u64, state: StateRef<'_>, tau: Src<'_>, update: &[f32]) -> Result<(), Error> {
        let MergePlan::Ties { variant, alpha, one_minus_alpha, selection: Some(sel), offset: scope_offset } = self.merge else {
            return Err(Error::Misuse { what: "an OnTIES plan with the update's threshold" });
        };
        self.check_lengths(offset, update, &state, tau.len())?;
        let ties = TiesCheck { alpha, one_minus_alpha, sel, scope_offset };
        // The variant is a compile-time parameter: a per-element branch on it keeps the loop scalar.
        let paper = variant == onties::Variant::Paper;
        match (self.scalars.form == AdamForm::Torch, state.cached.is_some(), paper) {
            (false, false, false) => self.check_from_update::<false, false, false>(&ties, offset, state, tau, update),
            (false, true, false) => self.check_from_update::<false, true, false>(&ties, offset, state, tau, update),
            (true, false, false) => self.check_from_update::<true, false, false>(&ties, offset, state, tau, update),
            (true, true, false) => self.check_from_update::<true, true, false>(&ties, offset, state, tau, update),
            (false, false, true) => self.check_from_update::<false, false, true>(&ties, offset, state, tau, update),
            (false, true, true) => self.check_from_update::<false, true, true>(&ties, offset, state, tau, update),
            (true, false, true) => self.check_from_update::<true, false, true>(&ties, offset, state, tau, update),
            (true, true, true) => self.check_from_update::<true, true, true>(&ties, offset, state, tau, update),
        }
    }

    #[inline(always)]
    fn check_from_update<const TORCH: bool, const CACHED: bool, const PAPER: bool>(&self, t: &TiesCheck, offset: u64, state: StateRef<'_>, tau: Src<'_>, update: &[f32]) -> Result<(), Error> {
        let n = update.len();
        let limit = crate::finite::input_limit(self, true);
        let (mut tau_buf, mut sp, mut theta2) = ([0.0f32; BLOCK], [0.0f32; BLOCK], [0.0f32; BLOCK]);
        let zeros = [0.0f32; BLOCK];
        let mut start = 0;
        while start < n {
            let len = BLOCK.min(n - start);
            let tau_in = tau_block_f32(&tau, start, len, &mut tau_buf);
            let e = t.element(offset + start as u64);
            let theta = &state.theta[start..start + len];
            let d = &update[start..start + len];
            let c = match state.cached {
                Some(c) if CACHED => &c[start..start + len],
                _ => &zeros[..len],
            };
            if let Some(limit) = limit
                && [theta, d, c, tau_in].into_iter().all(|x| crate::finite::magnitudes_within(limit, x))
            {
                start += len;
                continue;
            }
            let mut bad = 0u32;
            for j in 0..len {
                let (s, th2) = onties::merge_element::<TORCH, CACHED, PAPER>(&self.scalars, &e, j as u32, theta[j], c[j], d[j], flush(tau_in[j]));
                sp[j] = s;
                theta2[j] = th2;
                bad |= nf(s) | nf(th2);
            }
            if bad != 0 {
                for j in 0..len {
                    for (x, what) in [(sp[j], "sparsified update"), (theta2[j], "updated parameter")] {
                        if is_non_finite(x) {
                            return Err(Error::NonFinite { tensor: tensor_name(self.name), what, index: offset + (start + j) as u64 });
                        }
                    }
                }
            }
            start += len;
        }
        Ok(())
    }

    /// Pass 3 of OnTIES, from the update the scan pass left in `update` (as
    /// [`TensorStep::check_chunk_from_update`]): `m'` and `v'` are recomputed (two
    /// products and a sum each), `D` is read instead of recomputed, which saves the
    /// square root and the division. Stores in place, each block validated first as
    /// in [`TensorStep::write_chunk`]; the bits are those of `write_chunk`. With
    /// `stored`, records what it stores there, as `write_chunk_prefetching`.
    #[inline(always)]
    pub fn write_chunk_from_update(&self, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, update: &[f32], stored: Option<&mut StateBounds>) -> Result<(), Error> {
        let MergePlan::Ties { variant, alpha, one_minus_alpha, selection: Some(sel), offset: scope_offset } = self.merge else {
            return Err(Error::Misuse { what: "an OnTIES plan with the update's threshold" });
        };
        self.check_lengths(offset, grad, &state.as_ref(), tau.len())?;
        if update.len() != grad.len() {
            return Err(Error::LengthMismatch { tensor: tensor_name(self.name), what: "delta scratch", expected: grad.len() as u64, found: update.len() as u64 });
        }
        let ties = TiesCheck { alpha, one_minus_alpha, sel, scope_offset };
        let paper = variant == onties::Variant::Paper;
        match (self.scalars.form == AdamForm::Torch, state.cached.is_some(), paper) {
            (false, false, false) => self.write_from_update::<false, false, false>(&ties, offset, grad, state, tau, update, stored),
            (false, true, false) => self.write_from_update::<false, true, false>(&ties, offset, grad, state, tau, update, stored),
            (true, false, false) => self.write_from_update::<true, false, false>(&ties, offset, grad, state, tau, update, stored),
            (true, true, false) => self.write_from_update::<true, true, false>(&ties, offset, grad, state, tau, update, stored),
            (false, false, true) => self.write_from_update::<false, false, true>(&ties, offset, grad, state, tau, update, stored),
            (false, true, true) => self.write_from_update::<false, true, true>(&ties, offset, grad, state, tau, update, stored),
            (true, false, true) => self.write_from_update::<true, false, true>(&ties, offset, grad, state, tau, update, stored),
            (true, true, true) => self.write_from_update::<true, true, true>(&ties, offset, grad, state, tau, update, stored),
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn write_from_update<const TORCH: bool, const CACHED: bool, const PAPER: bool>(&self, t: &TiesCheck, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, update: &[f32], mut stored: Option<&mut StateBounds>) -> Result<(), Error> {
        let s = &self.scalars;
        let StateMut { theta, m, v, mut cached } = state;
        let n = update.len();
        let mut tau_buf = [0.0f32; BLOCK];
        let (mut theta2, mut m1s, mut v1s, mut sp) = ([0.0f32; BLOCK], [0.0f32; BLOCK], [0.0f32; BLOCK], [0.0f32; BLOCK]);
        let zeros = [0.0f32; BLOCK];
        // Blocks that provably need no flush run without ([`crate::flushless`]).
        let limit = crate::finite::input_limit(self, false);
        let mut memory = crate::flushless::Memory::default();
        let mut start = 0;
        while start < n {
            let len = BLOCK.min(n - start);
            let r = start..start + len;
            let tau_in = tau_block_f32(&tau, start, len, &mut tau_buf);
            let e = t.element(offset + start as u64);
            let (g, th, mm, vv, d) = (&grad[r.clone()], &theta[r.clone()], &m[r.clone()], &v[r.clone()], &update[r.clone()]);
            let c = match cached.as_deref() {
                Some(c) if CACHED => &c[r.clone()],
                _ => &zeros[..len],
            };
            let flush_free = limit.is_some_and(|limit| {
                let block = StateRef { theta: th, m: mm, v: vv, cached: CACHED.then_some(c) };
                memory.flush_free(self, limit, &crate::flushless::Inputs::of(g, &block, Some(tau_in)).with_update(d))
            });
            let outs = (&mut m1s, &mut v1s, &mut sp, &mut theta2);
            let bad = if flush_free {
                from_update_elements::<TORCH, CACHED, PAPER, false>(s, &e, [g, th, mm, vv, c, d, tau_in], outs)
            } else {
                from_update_elements::<TORCH, CACHED, PAPER, true>(s, &e, [g, th, mm, vv, c, d, tau_in], outs)
            };
            if bad != 0 {
                for j in 0..len {
                    let checks = [(m1s[j], "updated exp_avg"), (v1s[j], "updated exp_avg_sq"), (d[j], "update"), (sp[j], "sparsified update"), (theta2[j], "updated parameter")];
                    for (x, what) in checks {
                        if is_non_finite(x) {
                            return Err(Error::NonFinite { tensor: tensor_name(self.name), what, index: offset + (start + j) as u64 });
                        }
                    }
                }
            }
            // Stored with their bounds taken in the same loop, as `write_chunk` does.
            let record = StateBounds {
                theta: store_largest(&mut theta[r.clone()], &theta2, crate::finite::ABS),
                m: store_largest(&mut m[r.clone()], &m1s, crate::finite::ABS),
                v: store_largest(&mut v[r.clone()], &v1s, u32::MAX),
                // A merge step resets the cached delta, as `write_chunk` does.
                cached: 0,
            };
            if let Some(c) = cached.as_deref_mut() {
                c[r].fill(0.0);
            }
            if let Some(b) = stored.as_deref_mut() {
                *b = b.join(record);
            }
            start += len;
        }
        Ok(())
    }

    /// Pass 3: computes and stores in place. Each block is validated before it is
    /// stored, so an error leaves the failing block and everything after it
    /// untouched; run [`TensorStep::check_chunk`] over the whole tensor first so
    /// that a failing tensor is not written at all (as
    /// `optim::StepPlan::step_tensors` does), or use [`TensorStep::write_chunk_into`].
    #[inline(always)]
    pub fn write_chunk(&self, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>) -> Result<(), Error> {
        self.write_chunk_prefetching(offset, grad, state, tau, |_| {}, None)
    }

    /// [`TensorStep::write_chunk`], handing `prefetch` the inputs of the block
    /// [`AHEAD`] blocks on before each block, to be asked of the cache (the
    /// [`crate::isa`] passes give it the CPU's prefetch instruction), and adding
    /// to `stored` each stored block's bounds, taken from the values it stores
    /// (a separate pass would read the chunk again from the outer caches). Same
    /// bits; on error, `stored` covers the blocks stored before the failing one.
    #[inline(always)]
    pub fn write_chunk_prefetching(&self, offset: u64, grad: &[f32], mut state: StateMut<'_>, tau: Src<'_>, prefetch: impl Fn(&[f32]), mut stored: Option<&mut StateBounds>) -> Result<(), Error> {
        self.check_lengths(offset, grad, &state.as_ref(), tau.len())?;
        let mut bufs = Buffers::new();
        let limit = self.flush_free_limit();
        let n = grad.len();
        let mut start = 0;
        while start < n {
            let len = BLOCK.min(n - start);
            let r = start..start + len;
            let ahead = (start + AHEAD * BLOCK).min(n)..(start + (AHEAD + 1) * BLOCK).min(n);
            if !ahead.is_empty() {
                let s = state.as_ref();
                prefetch(&grad[ahead.clone()]);
                prefetch(&s.theta[ahead.clone()]);
                prefetch(&s.m[ahead.clone()]);
                prefetch(&s.v[ahead.clone()]);
                if let Some(c) = s.cached {
                    prefetch(&c[ahead.clone()]);
                }
                if let Src::F32(t) = tau
                    && t.len() == n
                {
                    prefetch(&t[ahead]);
                }
            }
            self.block(Pass::Write, limit, offset + start as u64, &grad[r.clone()], &state.as_ref().range(r.clone()), &self.tau_block(&tau, start, len), &mut bufs)?;
            match stored.as_deref_mut() {
                Some(b) => bufs.out.store_tracking(state.range(r), b),
                None => bufs.out.store(state.range(r)),
            }
            start += len;
        }
        Ok(())
    }

    /// The single-pass alternative: reads the state from `input`, writes the new
    /// state to `output` (separate buffers, e.g. ping-pong). On error `input` is
    /// untouched, so a caller that swaps buffers only on success never sees a
    /// partly updated tensor, with one pass instead of check + write.
    pub fn write_chunk_into(&self, offset: u64, grad: &[f32], input: StateRef<'_>, tau: Src<'_>, mut output: StateMut<'_>) -> Result<(), Error> {
        self.check_lengths(offset, grad, &input, tau.len())?;
        let out_ref = output.as_ref();
        let lens = [("new parameter", out_ref.theta.len()), ("new exp_avg", out_ref.m.len()), ("new exp_avg_sq", out_ref.v.len())];
        for (what, len) in lens {
            if len != grad.len() {
                return Err(Error::LengthMismatch { tensor: tensor_name(self.name), what, expected: grad.len() as u64, found: len as u64 });
            }
        }
        if out_ref.cached.map(|c| c.len()) != input.cached.map(|c| c.len()) {
            return Err(Error::LengthMismatch { tensor: tensor_name(self.name), what: "new cached delta", expected: input.cached.map_or(0, |c| c.len()) as u64, found: out_ref.cached.map_or(0, |c| c.len()) as u64 });
        }
        self.run(Pass::Write, self.flush_free_limit(), offset, grad, &input, &tau, |start, out, len| out.store(output.range(start..start + len)))
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn run(&self, pass: Pass, limit: Option<u32>, offset: u64, grad: &[f32], state: &StateRef<'_>, tau: &Src<'_>, mut sink: impl FnMut(usize, &BlockOut, usize)) -> Result<(), Error> {
        let mut bufs = Buffers::new();
        let n = grad.len();
        let mut start = 0;
        while start < n {
            let len = BLOCK.min(n - start);
            let r = start..start + len;
            self.block(pass, limit, offset + start as u64, &grad[r.clone()], &state.range(r.clone()), &self.tau_block(tau, start, len), &mut bufs)?;
            sink(start, &bufs.out, len);
            start += len;
        }
        Ok(())
    }

    /// The bound the writing pass hands to [`TensorStep::block`]: the check pass's
    /// ([`crate::finite`]) for the kernels that have a flush-free form
    /// ([`crate::flushless`]; OnTIES's once its threshold is known), `None`
    /// for the others.
    pub(crate) fn flush_free_limit(&self) -> Option<u32> {
        match (self.kind(), self.merge) {
            (ACCUM | PLAIN | DARE_REF | DARE_PAPER, _) | (TIES | TIES_PAPER, MergePlan::Ties { selection: Some(_), .. }) => crate::finite::input_limit(self, false),
            _ => None,
        }
    }

    /// Loads, computes and validates one block into `bufs.out`. With a `limit`,
    /// in the check pass a block whose inputs all lie within it is known to pass
    /// (`crate::finite`) and is not computed; in the writing pass a block whose
    /// inputs lie within it and make every flush an identity
    /// ([`crate::flushless`]) runs the flush-free kernel, and so does such a
    /// block of OnTIES's scan.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn block(&self, pass: Pass, limit: Option<u32>, index: u64, grad: &[f32], state: &StateRef<'_>, tau: &Src<'_>, bufs: &mut Buffers) -> Result<(), Error> {
        let Buffers { inp, out, flush_free: memory } = bufs;
        let n = grad.len();
        inp.n = n;
        let kind = self.kind();
        let dare = matches!(kind, DARE_REF | DARE_PAPER);
        let ties = matches!(kind, TIES | TIES_PAPER);
        let uses_tau = dare || ties;
        // A binary32 task vector is read in place like the state; the others are
        // converted into the block buffer first.
        if uses_tau && !matches!(tau, Src::F32(_)) {
            tau.load_into(0, &mut inp.tau[..n]);
        }
        if ties {
            if pass != Pass::Scan && !matches!(self.merge, MergePlan::Ties { selection: Some(_), .. }) {
                return Err(Error::Misuse { what: "the update's threshold, computed after the scan pass" });
            }
            inp.first = index;
        }
        let mut flush_free = false;
        if let Some(limit) = limit {
            let tau_in: &[f32] = match tau {
                Src::F32(t) => t,
                _ => &inp.tau[..n],
            };
            match pass {
                Pass::Check if inputs_within(limit, grad, state, uses_tau.then_some(tau_in)) => return Ok(()),
                Pass::Write => flush_free = memory.flush_free(self, limit, &crate::flushless::Inputs::of(grad, state, uses_tau.then_some(tau_in))),
                Pass::Scan if ties && matches!(self.merge, MergePlan::Ties { selection: None, .. }) => flush_free = memory.flush_free(self, limit, &crate::flushless::Inputs::of(grad, state, Some(tau_in))),
                _ => {}
            }
        }
        if let Some(c) = state.cached {
            load(&mut inp.cached, c);
        }
        if dare && pass == Pass::Check {
            let all = if kind == DARE_REF { DARE_REF_ALL } else { DARE_PAPER_ALL };
            if !self.kernel(all, pass, false, grad, state, tau, inp, out) {
                return Ok(());
            }
        }
        if let MergePlan::Dare { key, .. } = self.merge {
            if dare {
                uniforms(&key, stream::UPDATE, index, n, &mut inp.u0);
            }
            if kind == DARE_PAPER {
                uniforms(&key, stream::TAU_PAPER, index, n, &mut inp.u1);
            }
        }
        let unselected = pass == Pass::Scan && matches!(self.merge, MergePlan::Ties { selection: None, .. });
        let bad = self.kernel(if unselected { TIES_SCAN } else { kind }, pass, flush_free, grad, state, tau, inp, out);
        if bad {
            return Err(self.first_non_finite(pass, index, inp, out, state, grad, tau));
        }
        Ok(())
    }

    /// Runs the block's kernel `kind` over `inp` into `out`, flush-free if
    /// `flush_free` (only for the kinds [`TensorStep::flush_free_limit`] names);
    /// whether any value is non-finite (never, flush-free).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn kernel(&self, kind: u8, pass: Pass, flush_free: bool, grad: &[f32], state: &StateRef<'_>, tau: &Src<'_>, inp: &BlockIn, out: &mut BlockOut) -> bool {
        let n = inp.n;
        let uses_tau = matches!(kind, DARE_REF | DARE_PAPER | DARE_REF_ALL | DARE_PAPER_ALL | TIES | TIES_PAPER | TIES_SCAN);
        let tau_in: &[f32] = match tau {
            Src::F32(t) if uses_tau => t,
            _ => &inp.tau[..n],
        };
        match (self.scalars.form == AdamForm::Torch, state.cached.is_some()) {
            (false, false) => self.dispatch::<false, false>(kind, pass, flush_free, grad, state, tau_in, inp, out),
            (false, true) => self.dispatch::<false, true>(kind, pass, flush_free, grad, state, tau_in, inp, out),
            (true, false) => self.dispatch::<true, false>(kind, pass, flush_free, grad, state, tau_in, inp, out),
            (true, true) => self.dispatch::<true, true>(kind, pass, flush_free, grad, state, tau_in, inp, out),
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    fn dispatch<const TORCH: bool, const CACHED: bool>(&self, kind: u8, pass: Pass, flush_free: bool, grad: &[f32], state: &StateRef<'_>, tau: &[f32], inp: &BlockIn, out: &mut BlockOut) -> bool {
        match (kind, flush_free) {
            (ACCUM, true) => self.compute::<TORCH, ACCUM, CACHED, false>(pass, grad, state, tau, inp, out),
            (PLAIN, true) => self.compute::<TORCH, PLAIN, CACHED, false>(pass, grad, state, tau, inp, out),
            (DARE_REF, true) => self.compute::<TORCH, DARE_REF, CACHED, false>(pass, grad, state, tau, inp, out),
            (DARE_PAPER, true) => self.compute::<TORCH, DARE_PAPER, CACHED, false>(pass, grad, state, tau, inp, out),
            (TIES, true) => self.compute::<TORCH, TIES, CACHED, false>(pass, grad, state, tau, inp, out),
            (TIES_PAPER, true) => self.compute::<TORCH, TIES_PAPER, CACHED, false>(pass, grad, state, tau, inp, out),
            (TIES_SCAN, true) => self.compute::<TORCH, TIES_SCAN, CACHED, false>(pass, grad, state, tau, inp, out),
            (ACCUM, _) => self.compute::<TORCH, ACCUM, CACHED, true>(pass, grad, state, tau, inp, out),
            (PLAIN, _) => self.compute::<TORCH, PLAIN, CACHED, true>(pass, grad, state, tau, inp, out),
            (DARE_REF, _) => self.compute::<TORCH, DARE_REF, CACHED, true>(pass, grad, state, tau, inp, out),
            (DARE_PAPER, _) => self.compute::<TORCH, DARE_PAPER, CACHED, true>(pass, grad, state, tau, inp, out),
            (DARE_REF_ALL, _) => self.compute::<TORCH, DARE_REF_ALL, CACHED, true>(pass, grad, state, tau, inp, out),
            (DARE_PAPER_ALL, _) => self.compute::<TORCH, DARE_PAPER_ALL, CACHED, true>(pass, grad, state, tau, inp, out),
            (TIES_PAPER, _) => self.compute::<TORCH, TIES_PAPER, CACHED, true>(pass, grad, state, tau, inp, out),
            (TIES_SCAN, _) => self.compute::<TORCH, TIES_SCAN, CACHED, true>(pass, grad, state, tau, inp, out),
            _ => self.compute::<TORCH, TIES, CACHED, true>(pass, grad, state, tau, inp, out),
        }
    }

    /// The block's arithmetic; returns whether any value of the block is non-finite.
    ///
    /// The fast test looks only at values every non-finite input reaches: `g`, `m`
    /// reach `m'` (`c1 > 0`, and `0 ⊗ Inf` is NaN), `v` reaches `v'`, `Δ_c` reaches
    /// `D` (merge) or `Δ_c'` (accumulate), `θ`, the reference OnDARE `τ'` and the
    /// OnTIES `τ'` (through `combine`, where `0 ⊗ Inf` is NaN) reach the new `θ`.
    /// Only a masked-out paper `τ` can vanish, so it is tested itself, and the scan
    /// pass (which has no new `θ`) tests `θ` and `τ'` directly. The slow path
    /// then names the lowest index over every input and output.
    ///
    /// Without `FLUSH` (the flush-free kernel, [`crate::flushless`]; for the
    /// writing pass's kernels only) nothing is flushed or tested,
    /// and the stored outputs pass through `x + 0`, which makes a `−0` `+0`.
    #[inline(always)]
    fn compute<const TORCH: bool, const KIND: u8, const CACHED: bool, const FLUSH: bool>(&self, pass: Pass, grad: &[f32], state: &StateRef<'_>, tau: &[f32], inp: &BlockIn, out: &mut BlockOut) -> bool {
        // `n <= BLOCK` and equal-length inputs let the loops run without bounds checks.
        let n = inp.n.min(BLOCK);
        let (g_in, theta_in, m_in, v_in, tau_in) = (&grad[..n], &state.theta[..n], &state.m[..n], &state.v[..n], &tau[..n]);
        let s = &self.scalars;
        let scan = pass == Pass::Scan;
        let (dp, rescale) = match self.merge {
            MergePlan::Dare { params, .. } => (params, if scan { Rescale::Off } else { self.rescale }),
            MergePlan::None | MergePlan::Ties { .. } => (DARE_NEUTRAL, Rescale::Off),
        };
        let (factor, clip, do_rescale) = match rescale {
            Rescale::Off => (1.0, 0.0, false),
            Rescale::Apply { factor, clip } => (factor, clip, true),
        };
        let ties = match self.merge {
            MergePlan::Ties { alpha, one_minus_alpha, selection, offset, .. } => {
                let sel = selection.unwrap_or(TiesSelection { threshold: Threshold::NOTHING, factor: 1.0 });
                ElementMerge { alpha, one_minus_alpha, factor: sel.factor, local: sel.threshold.local(offset + inp.first) }
            }
            _ => ElementMerge { alpha: 0.0, one_minus_alpha: 1.0, factor: 1.0, local: Threshold::NOTHING.local(0) },
        };
        // Two simple loops rather than one long one: the Adam loop is the same for
        // every kernel, and short loop bodies vectorize reliably.
        let scan_mask = if scan { u32::MAX } else { 0 };
        let mut bad = 0u32;
        let settle = settle::<FLUSH>;
        let stored = |x: f32| if FLUSH { x } else { x + 0.0 };
        if KIND == TIES_SCAN && !FLUSH {
            // The flush-free scan keeps only `D`, the rollback included: every
            // value is known finite, and the parameter is not computed.
            for j in 0..n {
                let (m1, v1) = adam::moments_with::<false>(s, g_in[j], m_in[j], v_in[j]);
                let delta = adam::delta_with::<TORCH, false>(s, m1, v1);
                out.d[j] = stored(if CACHED { add_with::<false>(delta, inp.cached[j]) } else { delta });
            }
            return false;
        }
        for j in 0..n {
            let (m1, v1) = adam::moments_with::<FLUSH>(s, settle(g_in[j]), settle(m_in[j]), settle(v_in[j]));
            out.m[j] = stored(m1);
            out.v[j] = stored(v1);
            out.d[j] = adam::delta_with::<TORCH, FLUSH>(s, m1, v1);
            out.theta[j] = adam::decay_before_with::<TORCH, FLUSH>(s, settle(theta_in[j]));
            if FLUSH {
                bad |= nf(m1) | nf(v1);
            }
        }
        for j in 0..n {
            let tau_j = settle(tau_in[j]);
            let theta = out.theta[j];
            let delta = out.d[j];
            let c = inp.cached[j];
            // Without a cached delta the rollback is `θ ⊖ +0` and `Δ ⊕ +0`: identities.
            let (theta0, d) = if KIND != ACCUM && CACHED { (sub_with::<FLUSH>(theta, c), add_with::<FLUSH>(delta, c)) } else { (theta, delta) };
            let mut cached1 = 0.0;
            let (theta1, sparse) = match KIND {
                ACCUM => {
                    if CACHED {
                        cached1 = add_with::<FLUSH>(c, delta);
                    }
                    (add_with::<FLUSH>(theta, delta), delta)
                }
                PLAIN => (add_with::<FLUSH>(theta0, d), d),
                DARE_REF => {
                    let sp = dare::sparsify_with::<FLUSH>(d, dp.keep.keeps(inp.u0[j]), dp.scale);
                    let applied = if do_rescale { dare::clamp(mul_with::<FLUSH>(sp, factor), clip) } else { sp };
                    (dare::merge_reference_with::<FLUSH>(theta0, tau_j, applied, dp.alpha, dp.one_minus_alpha), sp)
                }
                DARE_REF_ALL => {
                    // Kept: `θ` with `D ⊗ s`; dropped: `θ` with `+0`.
                    let sp = mul(d, dp.scale);
                    let applied = if do_rescale { dare::clamp(mul(sp, factor), clip) } else { sp };
                    let kept = dare::merge_reference(theta0, tau_j, applied, dp.alpha, dp.one_minus_alpha);
                    let dropped = dare::merge_reference(theta0, tau_j, 0.0, dp.alpha, dp.one_minus_alpha);
                    cached1 = adam::decay_after::<TORCH>(s, dropped);
                    (kept, sp)
                }
                DARE_PAPER_ALL => {
                    let sp = d;
                    let applied = if do_rescale { dare::clamp(mul(sp, factor), clip) } else { sp };
                    let both = dare::merge_paper(theta0, tau_j, applied, dp.alpha, dp.one_minus_alpha);
                    let tau_only = dare::merge_paper(theta0, tau_j, 0.0, dp.alpha, dp.one_minus_alpha);
                    let d_only = dare::merge_paper(theta0, 0.0, applied, dp.alpha, dp.one_minus_alpha);
                    let neither = dare::merge_paper(theta0, 0.0, 0.0, dp.alpha, dp.one_minus_alpha);
                    let worst = nf(adam::decay_after::<TORCH>(s, tau_only)) | nf(adam::decay_after::<TORCH>(s, d_only)) | nf(adam::decay_after::<TORCH>(s, neither));
                    // Carried in `cached1` (unused by merge kernels): any failing candidate.
                    cached1 = if worst != 0 { f32::NAN } else { 0.0 };
                    (both, sp)
                }
                // The whole element, both decays included (the new θ, not θ₁).
                TIES => {
                    let (sp, theta2) = onties::merge_element_with::<TORCH, CACHED, false, FLUSH>(s, &ties, j as u32, theta_in[j], c, d, tau_j);
                    (theta2, sp)
                }
                TIES_PAPER => {
                    let (sp, theta2) = onties::merge_element_with::<TORCH, CACHED, true, FLUSH>(s, &ties, j as u32, theta_in[j], c, d, tau_j);
                    (theta2, sp)
                }
                TIES_SCAN => (theta0, 0.0),
                _ => {
                    let sp = dare::sparsify_with::<FLUSH>(d, dp.keep.keeps(inp.u0[j]), 1.0);
                    let tau = if dp.keep.keeps(inp.u1[j]) { tau_j } else { 0.0 };
                    let applied = if do_rescale { dare::clamp(mul_with::<FLUSH>(sp, factor), clip) } else { sp };
                    (dare::merge_paper_with::<FLUSH>(theta0, tau, applied, dp.alpha, dp.one_minus_alpha), sp)
                }
            };
            let theta2 = if KIND == TIES || KIND == TIES_PAPER || KIND == TIES_SCAN { theta1 } else { adam::decay_after_with::<TORCH, FLUSH>(s, theta1) };
            out.theta[j] = stored(theta2);
            if !FLUSH {
                // Only the stored outputs: the others serve the scan pass and errors.
                if CACHED {
                    out.cached[j] = stored(cached1);
                }
                continue;
            }
            out.cached[j] = cached1;
            out.d[j] = d;
            out.sparse[j] = sparse;
            let mut flags = nf(d);
            if KIND != ACCUM && KIND != PLAIN {
                flags |= nf(sparse);
            }
            if KIND == DARE_PAPER || KIND == DARE_PAPER_ALL {
                flags |= nf(tau_j);
            }
            if (KIND == ACCUM && CACHED) || KIND == DARE_REF_ALL || KIND == DARE_PAPER_ALL {
                flags |= nf(cached1);
            }
            // A mask, not a branch: a branch on the pass inside the loop keeps it scalar.
            flags |= (scan_mask & (nf(theta_in[j]) | nf(tau_j))) | (!scan_mask & nf(theta2));
            bad |= flags;
        }
        bad != 0
    }

    /// Slow path: the lowest index in the block and which value failed.
    #[cold]
    #[allow(clippy::too_many_arguments)]
    fn first_non_finite(&self, pass: Pass, index: u64, inp: &BlockIn, out: &BlockOut, state: &StateRef<'_>, grad: &[f32], tau: &Src<'_>) -> Error {
        let uses_tau = matches!(self.kind(), DARE_REF | DARE_PAPER | TIES | TIES_PAPER);
        for j in 0..inp.n {
            // In the order of NON_FINITE_VALUES.
            let values = [
                grad[j],
                state.theta[j],
                state.m[j],
                state.v[j],
                state.cached.map_or(0.0, |c| c[j]),
                if uses_tau { tau.get(j) } else { 0.0 },
                out.m[j],
                out.v[j],
                out.d[j],
                out.sparse[j],
                out.cached[j],
                if pass == Pass::Scan { 0.0 } else { out.theta[j] },
            ];
            for (x, what) in values.into_iter().zip(NON_FINITE_VALUES) {
                if is_non_finite(x) {
                    return Error::NonFinite { tensor: tensor_name(self.name), what, index: index + j as u64 };
                }
            }
        }
        unreachable!("a block flagged non-finite has a non-finite value")
    }
}

/// The elements of one block of [`TensorStep::write_chunk_from_update`] from
/// `[g, θ, m, v, Δ_c, D, τ']` into `(m', v', D', θ')`; the non-finite flags
/// (none without `FLUSH`, whose outputs pass through `x + 0`).
#[inline(always)]
#[allow(clippy::type_complexity)]
fn from_update_elements<const TORCH: bool, const CACHED: bool, const PAPER: bool, const FLUSH: bool>(s: &StepScalars, e: &ElementMerge, inputs: [&[f32]; 7], (m1s, v1s, sp, theta2): (&mut [f32; BLOCK], &mut [f32; BLOCK], &mut [f32; BLOCK], &mut [f32; BLOCK])) -> u32 {
    let [g, th, mm, vv, c, d, tau] = inputs;
    let n = g.len().min(BLOCK);
    let (g, th, mm, vv, c, d, tau) = (&g[..n], &th[..n], &mm[..n], &vv[..n], &c[..n], &d[..n], &tau[..n]);
    let settle = settle::<FLUSH>;
    let stored = |x: f32| if FLUSH { x } else { x + 0.0 };
    let mut bad = 0u32;
    for j in 0..n {
        let (m1, v1) = adam::moments_with::<FLUSH>(s, settle(g[j]), settle(mm[j]), settle(vv[j]));
        let (spj, th2) = onties::merge_element_with::<TORCH, CACHED, PAPER, FLUSH>(s, e, j as u32, th[j], c[j], d[j], settle(tau[j]));
        m1s[j] = stored(m1);
        v1s[j] = stored(v1);
        sp[j] = spj;
        theta2[j] = stored(th2);
        if FLUSH {
            bad |= nf(m1) | nf(v1) | nf(d[j]) | nf(spj) | nf(th2);
        }
    }
    bad
}

/// The task vector's elements `start .. start + len` as binary32: a binary32
/// task vector in place (not yet flushed), any other converted into `buf`.
#[inline(always)]
fn tau_block_f32<'b>(tau: &Src<'b>, start: usize, len: usize, buf: &'b mut [f32; BLOCK]) -> &'b [f32] {
    match *tau {
        Src::F32(t) => &t[start..start + len],
        _ => {
            tau.load_into(start, &mut buf[..len]);
            &buf[..len]
        }
    }
}

/// Used for the plain kernel, which never reads it.
const DARE_NEUTRAL: DareParams = DareParams {
    variant: DareVariant::Reference,
    keep: crate::rng::Keep::ALL,
    scale: 1.0,
    alpha: 0.0,
    one_minus_alpha: 1.0,
    clip: 1.0,
    rescale: false,
};

/// Whether a block's inputs all lie within `limit` (`crate::finite`): `g`, `θ`,
/// `m`, `Δ_c` and `τ'` in magnitude, `v` also not negative.
#[inline(always)]
fn inputs_within(limit: u32, grad: &[f32], state: &StateRef<'_>, tau: Option<&[f32]>) -> bool {
    use crate::finite::{magnitudes_within, non_negative_within};
    magnitudes_within(limit, grad)
        && magnitudes_within(limit, state.theta)
        && magnitudes_within(limit, state.m)
        && non_negative_within(limit, state.v)
        && state.cached.is_none_or(|c| magnitudes_within(limit, c))
        && tau.is_none_or(|t| magnitudes_within(limit, t))
}

#[inline(always)]
fn nf(x: f32) -> u32 {
    u32::from(is_non_finite(x))
}
