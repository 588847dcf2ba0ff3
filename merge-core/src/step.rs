//! One optimizer step of one tensor, in chunks (SPEC.md §5): the building blocks
//! the whole-tensor front (`optim`) and the GPU runtime both follow.
//!
//! A step runs up to three passes over the tensor, each in chunks cut anywhere:
//! 1. `scan` (only with the L1 rescale, or to fill a scratch `Δ` for OnTIES):
//!    feeds `‖Δ‖₁` and `‖Δ'‖₁` and validates everything but the new parameter;
//! 2. `check`: computes every output and validates it, writes nothing;
//! 3. `write`: computes again and stores.
//!
//! Every pass works in blocks of [`BLOCK`] elements: loads into local arrays,
//! computes with no per-element branch, ORs the non-finite tests, and only then
//! stores; the slow path that names the lowest offending index runs only when a
//! block fails. Masks use the element's index in the full tensor, so the cut
//! points never change a bit.

use crate::adam;
use crate::arith::{add, is_non_finite, mul, sub};
use crate::dare::{self, DareParams, DareVariant};
use crate::dtype::Src;
use crate::error::{Error, tensor_name};
use crate::hyper::{AdamForm, StepScalars};
use crate::reduce::TreeSum;
use crate::rng::{MaskKey, check_extent, stream};

/// Elements per block.
pub const BLOCK: usize = 64;

/// What the step does with the Adam update `Δ` (after rollback, `D = Δ ⊕ Δ_c`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MergePlan {
    /// Plain AdamW: `θ ← θ ⊕ D`.
    None,
    /// OnDARE with the tensor's mask key for this step.
    Dare { params: DareParams, key: MaskKey },
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

/// One chunk of a tensor's optimizer state, to be updated in place.
#[derive(Debug)]
pub struct StateMut<'a> {
    pub theta: &'a mut [f32],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
    pub cached: Option<&'a mut [f32]>,
}

impl StateMut<'_> {
    pub fn as_ref(&self) -> StateRef<'_> {
        StateRef { theta: self.theta, m: self.m, v: self.v, cached: self.cached.as_deref() }
    }
}

/// Kernels, picked once per chunk.
const PLAIN: u8 = 0;
const DARE_REF: u8 = 1;
const DARE_PAPER: u8 = 2;

/// Inputs of one block, flushed.
struct BlockIn {
    n: usize,
    g: [f32; BLOCK],
    theta: [f32; BLOCK],
    m: [f32; BLOCK],
    v: [f32; BLOCK],
    cached: [f32; BLOCK],
    tau: [f32; BLOCK],
    /// Uniforms of streams 0 and 1 (only filled for the kernels that use them).
    u0: [u32; BLOCK],
    u1: [u32; BLOCK],
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
            g: [0.0; BLOCK],
            theta: [0.0; BLOCK],
            m: [0.0; BLOCK],
            v: [0.0; BLOCK],
            cached: [0.0; BLOCK],
            tau: [0.0; BLOCK],
            u0: [0; BLOCK],
            u1: [0; BLOCK],
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
    let mut pairs = [0u32; BLOCK + 2];
    let shift = (start & 1) as usize;
    let first_pair = (start >> 1) as u32;
    let count = (shift + n).div_ceil(2);
    for p in 0..count {
        let [a, b] = key.pair(first_pair.wrapping_add(p as u32), stream);
        pairs[2 * p] = a;
        pairs[2 * p + 1] = b;
    }
    u[..n].copy_from_slice(&pairs[shift..shift + n]);
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
            (Phase::Accumulate, _) | (Phase::Merge, MergePlan::None) => PLAIN,
            (Phase::Merge, MergePlan::Dare { params, .. }) => match params.variant {
                DareVariant::Reference => DARE_REF,
                DareVariant::Paper => DARE_PAPER,
            },
        }
    }

    fn check_lengths(&self, offset: u64, grad: &[f32], s: &StateRef<'_>, tau: &Src<'_>) -> Result<(), Error> {
        let n = grad.len();
        let mut lens = [("parameter", s.theta.len()), ("exp_avg", s.m.len()), ("exp_avg_sq", s.v.len()), ("cached delta", n), ("task vector", n)];
        if let Some(c) = s.cached {
            lens[3].1 = c.len();
        }
        if self.kind() != PLAIN {
            lens[4].1 = tau.len();
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

    /// Pass 1: streams `‖D‖₁` and `‖D'‖₁` into `norms` (if given) and `D` into
    /// `delta_out` (if given, same length as the chunk); writes nothing else.
    pub fn scan_chunk(&self, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>, mut norms: Option<&mut Norms>, mut delta_out: Option<&mut [f32]>) -> Result<(), Error> {
        self.check_lengths(offset, grad, &state, &tau)?;
        if let Some(d) = delta_out.as_deref() {
            if d.len() != grad.len() {
                return Err(Error::LengthMismatch { tensor: tensor_name(self.name), what: "delta scratch", expected: grad.len() as u64, found: d.len() as u64 });
            }
        }
        self.run(Pass::Scan, offset, grad, &state, &tau, |start, out, n| {
            if let Some(norms) = norms.as_deref_mut() {
                norms.update.push_abs_slice(&out.d[..n]);
                norms.sparse.push_abs_slice(&out.sparse[..n]);
            }
            if let Some(d) = delta_out.as_deref_mut() {
                d[start..start + n].copy_from_slice(&out.d[..n]);
            }
        })
    }

    /// Pass 2: computes every output of the chunk and validates it; writes nothing.
    pub fn check_chunk(&self, offset: u64, grad: &[f32], state: StateRef<'_>, tau: Src<'_>) -> Result<(), Error> {
        self.check_lengths(offset, grad, &state, &tau)?;
        self.run(Pass::Check, offset, grad, &state, &tau, |_, _, _| {})
    }

    /// Pass 3: computes and stores. Each block is validated before it is stored, so
    /// an error leaves the failing block and everything after it untouched; run
    /// [`TensorStep::check_chunk`] over the whole tensor first so that a failing
    /// tensor is not written at all (as `optim::Optimizer::step_tensor` does).
    pub fn write_chunk(&self, offset: u64, grad: &[f32], state: StateMut<'_>, tau: Src<'_>) -> Result<(), Error> {
        self.check_lengths(offset, grad, &state.as_ref(), &tau)?;
        let StateMut { theta, m, v, mut cached } = state;
        let n = grad.len();
        let mut start = 0;
        while start < n {
            let len = BLOCK.min(n - start);
            let out = {
                let view = StateRef {
                    theta: &theta[start..start + len],
                    m: &m[start..start + len],
                    v: &v[start..start + len],
                    cached: cached.as_deref().map(|c| &c[start..start + len]),
                };
                self.block(Pass::Write, offset + start as u64, &grad[start..start + len], &view, &tau.slice(start, len))?
            };
            theta[start..start + len].copy_from_slice(&out.theta[..len]);
            m[start..start + len].copy_from_slice(&out.m[..len]);
            v[start..start + len].copy_from_slice(&out.v[..len]);
            if let Some(c) = cached.as_deref_mut() {
                c[start..start + len].copy_from_slice(&out.cached[..len]);
            }
            start += len;
        }
        Ok(())
    }

    fn run(&self, pass: Pass, offset: u64, grad: &[f32], state: &StateRef<'_>, tau: &Src<'_>, mut sink: impl FnMut(usize, &BlockOut, usize)) -> Result<(), Error> {
        let n = grad.len();
        let mut start = 0;
        while start < n {
            let len = BLOCK.min(n - start);
            let view = StateRef {
                theta: &state.theta[start..start + len],
                m: &state.m[start..start + len],
                v: &state.v[start..start + len],
                cached: state.cached.map(|c| &c[start..start + len]),
            };
            let out = self.block(pass, offset + start as u64, &grad[start..start + len], &view, &tau.slice(start, len))?;
            sink(start, &out, len);
            start += len;
        }
        Ok(())
    }

    /// Loads, computes and validates one block.
    #[inline]
    fn block(&self, pass: Pass, index: u64, grad: &[f32], state: &StateRef<'_>, tau: &Src<'_>) -> Result<BlockOut, Error> {
        let mut inp = BlockIn::new();
        let n = grad.len();
        inp.n = n;
        load(&mut inp.g, grad);
        load(&mut inp.theta, state.theta);
        load(&mut inp.m, state.m);
        load(&mut inp.v, state.v);
        if let Some(c) = state.cached {
            load(&mut inp.cached, c);
        }
        let kind = self.kind();
        if kind != PLAIN {
            tau.load_into(0, &mut inp.tau[..n]);
        }
        if let MergePlan::Dare { key, .. } = self.merge {
            if kind != PLAIN {
                uniforms(&key, stream::UPDATE, index, n, &mut inp.u0);
            }
            if kind == DARE_PAPER {
                uniforms(&key, stream::TAU_PAPER, index, n, &mut inp.u1);
            }
        }
        let mut out = BlockOut::new();
        let torch = self.scalars.form == AdamForm::Torch;
        let bad = match (torch, kind) {
            (false, PLAIN) => self.compute::<false, PLAIN>(pass, &inp, &mut out),
            (true, PLAIN) => self.compute::<true, PLAIN>(pass, &inp, &mut out),
            (false, DARE_REF) => self.compute::<false, DARE_REF>(pass, &inp, &mut out),
            (true, DARE_REF) => self.compute::<true, DARE_REF>(pass, &inp, &mut out),
            (false, _) => self.compute::<false, DARE_PAPER>(pass, &inp, &mut out),
            (true, _) => self.compute::<true, DARE_PAPER>(pass, &inp, &mut out),
        };
        if bad {
            return Err(self.first_non_finite(pass, index, &inp, &out, state, grad, tau));
        }
        Ok(out)
    }

    /// The block's arithmetic; returns whether any checked value is non-finite.
    #[inline(always)]
    fn compute<const TORCH: bool, const KIND: u8>(&self, pass: Pass, inp: &BlockIn, out: &mut BlockOut) -> bool {
        let s = &self.scalars;
        let accumulate = self.phase == Phase::Accumulate;
        let (dp, rescale) = match self.merge {
            MergePlan::Dare { params, .. } => (params, if pass == Pass::Scan { Rescale::Off } else { self.rescale }),
            MergePlan::None => (DARE_NEUTRAL, Rescale::Off),
        };
        let (factor, clip, do_rescale) = match rescale {
            Rescale::Off => (1.0, 0.0, false),
            Rescale::Apply { factor, clip } => (factor, clip, true),
        };
        let mut bad = 0u32;
        for j in 0..BLOCK {
            let theta = adam::decay_before::<TORCH>(s, inp.theta[j]);
            let (m1, v1) = adam::moments(s, inp.g[j], inp.m[j], inp.v[j]);
            let delta = adam::delta::<TORCH>(s, m1, v1);
            let c = inp.cached[j];
            let (theta1, cached1, d, sparse) = if KIND == PLAIN && accumulate {
                (add(theta, delta), add(c, delta), delta, delta)
            } else {
                let theta0 = sub(theta, c);
                let d = add(delta, c);
                match KIND {
                    PLAIN => (add(theta0, d), 0.0, d, d),
                    DARE_REF => {
                        let sp = dare::sparsify(d, dp.keep.keeps(inp.u0[j]), dp.scale);
                        let applied = if do_rescale { dare::clamp(mul(sp, factor), clip) } else { sp };
                        (dare::merge_reference(theta0, inp.tau[j], applied, dp.alpha, dp.one_minus_alpha), 0.0, d, sp)
                    }
                    _ => {
                        let sp = dare::sparsify(d, dp.keep.keeps(inp.u0[j]), 1.0);
                        let tau = if dp.keep.keeps(inp.u1[j]) { inp.tau[j] } else { 0.0 };
                        let applied = if do_rescale { dare::clamp(mul(sp, factor), clip) } else { sp };
                        (dare::merge_paper(theta0, tau, applied, dp.alpha, dp.one_minus_alpha), 0.0, d, sp)
                    }
                }
            };
            let theta2 = adam::decay_after::<TORCH>(s, theta1);
            out.theta[j] = theta2;
            out.m[j] = m1;
            out.v[j] = v1;
            out.cached[j] = cached1;
            out.d[j] = d;
            out.sparse[j] = sparse;
            let inputs = nf(inp.g[j]) | nf(inp.theta[j]) | nf(inp.m[j]) | nf(inp.v[j]) | nf(c) | nf(inp.tau[j]);
            let outputs = nf(m1) | nf(v1) | nf(d) | nf(sparse) | nf(cached1);
            let final_theta = if pass == Pass::Scan { 0 } else { nf(theta2) };
            // Lanes past the block's end hold zeros and never fail.
            bad |= inputs | outputs | final_theta;
        }
        bad != 0
    }

    /// Slow path: the lowest index in the block and which value failed.
    #[cold]
    #[allow(clippy::too_many_arguments)]
    fn first_non_finite(&self, pass: Pass, index: u64, inp: &BlockIn, out: &BlockOut, state: &StateRef<'_>, grad: &[f32], tau: &Src<'_>) -> Error {
        let uses_tau = self.kind() != PLAIN;
        for j in 0..inp.n {
            let checks = [
                (grad[j], "gradient"),
                (state.theta[j], "parameter"),
                (state.m[j], "exp_avg"),
                (state.v[j], "exp_avg_sq"),
                (state.cached.map_or(0.0, |c| c[j]), "cached delta"),
                (if uses_tau { tau.get(j) } else { 0.0 }, "task vector"),
                (out.m[j], "updated exp_avg"),
                (out.v[j], "updated exp_avg_sq"),
                (out.d[j], "update"),
                (out.sparse[j], "sparsified update"),
                (out.cached[j], "updated cached delta"),
                (if pass == Pass::Scan { 0.0 } else { out.theta[j] }, "updated parameter"),
            ];
            for (x, what) in checks {
                if is_non_finite(x) {
                    return Error::NonFinite { tensor: tensor_name(self.name), what, index: index + j as u64 };
                }
            }
        }
        unreachable!("a block flagged non-finite has a non-finite value")
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

#[inline(always)]
fn nf(x: f32) -> u32 {
    u32::from(is_non_finite(x))
}
