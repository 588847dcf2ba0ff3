//! The writing pass's flush-free path: a block whose inputs provably make every
//! flush of its step change nothing runs the same arithmetic without the flushes.
//!
//! The flush rule (SPEC.md §1.3) costs more than the rest of the element
//! arithmetic on a CPU (two vector instructions after each of about twenty
//! operations), yet on a typical block it changes nothing: it acts only on a
//! subnormal result or on `−0`. This module proves, per block, that it acts
//! on no subnormal, and the flush-free kernel then gives SPEC's bits:
//!
//! - **Zeros.** Call a computed value and SPEC's value *alike* when they are
//!   equal or are the two zeros. IEEE addition, subtraction, multiplication,
//!   square root, division by a non-zero divisor and `dare::clamp` map alike
//!   operands to alike results, and a flush maps a zero to `+0`. So a kernel
//!   that skips every flush whose argument is never subnormal computes, at
//!   every step, a value alike SPEC's; the stored outputs pass through
//!   `x + 0`, which turns `−0` into `+0` and changes nothing else.
//!   The keep decisions compare integers and are unaffected.
//! - **Subnormals.** [`holds`] follows the step's operations on sets of values
//!   ([`Values`]: a range of non-zero magnitudes, whether zero and which signs
//!   may occur), starting from the block's inputs ([`Span`]), and fails where a
//!   non-zero result could be smaller than the smallest normal `2^-126`. A
//!   product's magnitude is bounded by the product of its operands' bounds. A
//!   sum of operands of opposite signs may cancel, but both operands are
//!   binary32 values: if the larger lower bound is `M`, either one operand is
//!   at least twice the other (the sum is at least `M/2`) or both are at least
//!   `M/2`, so both are multiples of `2^(k−23)` with `2^k > M/4`, and so is
//!   their sum, which is `0` or at least `M·2^-25`. Every bound is widened by
//!   `2^-20` per operation, more than binary32's rounding (`2^-24`) and
//!   binary64's rounding of the bound itself together.
//!
//! The blocks must also lie under the check pass's bound ([`crate::finite`]),
//! so every value is finite and the flush-free kernel skips the non-finite
//! tests too. A block that fails either test runs the SPEC kernel.

use crate::dare::DareVariant;
use crate::finite::ABS;
use crate::hyper::AdamForm;
use crate::step::{MergePlan, Phase, Rescale, TensorStep};

/// `2^-126`, the smallest normal binary32 magnitude.
const MIN_NORMAL: f64 = 1.175_494_350_822_287_5e-38;
/// The widening of every bound per operation.
const DOWN: f64 = 1.0 - 1.0 / (1u64 << 20) as f64;
const UP: f64 = 1.0 + 1.0 / (1u64 << 20) as f64;
/// `2^-25`: the cancellation bound's factor.
const CANCEL: f64 = 1.0 / (1u64 << 25) as f64;

/// The magnitude bits of one input over a block: the smallest non-zero one
/// minus one (`u32::MAX` when every value is a zero), and the largest bits of
/// `x & mask` (the magnitude, or for the second moment the whole word, so that
/// a negative value exceeds every finite bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    least: u32,
    most: u32,
}

impl Span {
    /// The span of `xs` in magnitude.
    #[inline(always)]
    pub(crate) fn of(xs: &[f32]) -> Span {
        Span::masked(xs, ABS)
    }

    /// The span of `xs`, `most` over the whole word: above any finite bound
    /// when a value is negative (or `−0`).
    #[inline(always)]
    pub(crate) fn of_non_negative(xs: &[f32]) -> Span {
        Span::masked(xs, u32::MAX)
    }

    #[inline(always)]
    fn masked(xs: &[f32], mask: u32) -> Span {
        let (mut least, mut most) = (u32::MAX, 0u32);
        for x in xs {
            let b = x.to_bits();
            // Zero's magnitude, less one, wraps to the top and never is the least.
            least = least.min((b & ABS).wrapping_sub(1));
            most = most.max(b & mask);
        }
        Span { least, most }
    }

    /// Whether every value is at most `limit` (magnitude bits) and no value is
    /// subnormal.
    #[inline(always)]
    pub(crate) fn normal_within(&self, limit: u32) -> bool {
        // A subnormal's magnitude bits, less one, are below 0x7f_ffff.
        self.most <= limit && self.least >= 0x7f_ffff
    }

    /// The values the span allows, of either sign unless `non_negative`.
    fn values(&self, non_negative: bool) -> Values {
        if self.least == u32::MAX {
            return Values::ZERO;
        }
        let lo = f64::from(f32::from_bits(self.least + 1));
        let hi = f64::from(f32::from_bits(self.most & ABS));
        Values { lo, hi, zero: true, pos: true, neg: !non_negative }
    }

    /// Whether every value `self` allows, `wider` allows too.
    fn within(&self, wider: &Span) -> bool {
        self.least >= wider.least && self.most <= wider.most
    }

    /// The span with its least magnitude `2^WIDEN` times smaller (but normal)
    /// and its largest `2^WIDEN` times larger (but at most `limit`).
    fn widened(&self, limit: u32) -> Span {
        const STEP: u32 = WIDEN << 23;
        let least = if self.least == u32::MAX { u32::MAX } else { self.least.saturating_sub(STEP).max(0x7f_ffff) };
        let most = if self.most == 0 { 0 } else { self.most.saturating_add(STEP).min(limit.max(self.most)) };
        Span { least, most }
    }
}

/// A set of binary32 values: the non-zero ones lie in `lo ..= hi` in magnitude
/// and have the signs allowed by `pos` and `neg`; `zero`: a zero may occur.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Values {
    lo: f64,
    hi: f64,
    zero: bool,
    pos: bool,
    neg: bool,
}

impl Values {
    const ZERO: Values = Values { lo: f64::INFINITY, hi: 0.0, zero: true, pos: false, neg: false };

    fn constant(c: f32) -> Values {
        if c == 0.0 {
            return Values::ZERO;
        }
        let a = f64::from(c).abs();
        Values { lo: a, hi: a, zero: false, pos: c > 0.0, neg: c < 0.0 }
    }

    fn non_zero(&self) -> bool {
        self.pos || self.neg
    }

    fn negated(self) -> Values {
        Values { pos: self.neg, neg: self.pos, ..self }
    }

    /// Either of two sets (a select).
    fn or(self, o: Values) -> Values {
        Values { lo: self.lo.min(o.lo), hi: self.hi.max(o.hi), zero: self.zero || o.zero, pos: self.pos || o.pos, neg: self.neg || o.neg }
    }
}

/// The operations of the step on [`Values`]; `ok` turns false at the first
/// result that may be subnormal (or a division that may divide by zero).
struct Bounds {
    ok: bool,
}

impl Bounds {
    /// Records whether `x`'s non-zero values are all normal (a NaN bound fails).
    fn result(&mut self, x: Values) -> Values {
        if x.non_zero() && (x.lo.is_nan() || x.lo < MIN_NORMAL) {
            self.ok = false;
        }
        x
    }

    fn mul(&mut self, a: Values, b: Values) -> Values {
        let zero = a.zero || b.zero;
        let (pos, neg) = ((a.pos && b.pos) || (a.neg && b.neg), (a.pos && b.neg) || (a.neg && b.pos));
        if !(pos || neg) {
            return Values { zero, ..Values::ZERO };
        }
        self.result(Values { lo: a.lo * b.lo * DOWN, hi: a.hi * b.hi * UP, zero, pos, neg })
    }

    /// `a ⊗ a`: one value times itself, never negative.
    fn square(&mut self, a: Values) -> Values {
        let x = self.mul(a, a);
        Values { pos: x.non_zero(), neg: false, ..x }
    }

    fn add(&mut self, a: Values, b: Values) -> Values {
        let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
        // One operand zero: the other is the result.
        if b.zero {
            (lo, hi) = (lo.min(a.lo), hi.max(a.hi));
        }
        if a.zero {
            (lo, hi) = (lo.min(b.lo), hi.max(b.hi));
        }
        let both = a.non_zero() && b.non_zero();
        let cancel = both && ((a.pos && b.neg) || (a.neg && b.pos));
        if both {
            let larger = a.lo.max(b.lo);
            lo = lo.min(if cancel { larger * CANCEL } else { larger } * DOWN);
            hi = hi.max((a.hi + b.hi) * UP);
        }
        let zero = (a.zero && b.zero) || cancel;
        let (pos, neg) = (a.pos || b.pos, a.neg || b.neg);
        if !(pos || neg) {
            return Values { zero, ..Values::ZERO };
        }
        self.result(Values { lo, hi, zero, pos, neg })
    }

    fn sub(&mut self, a: Values, b: Values) -> Values {
        self.add(a, b.negated())
    }

    fn div(&mut self, a: Values, b: Values) -> Values {
        if b.zero || !b.non_zero() {
            self.ok = false;
            return a;
        }
        let (pos, neg) = ((a.pos && b.pos) || (a.neg && b.neg), (a.pos && b.neg) || (a.neg && b.pos));
        if !(pos || neg) {
            return Values { zero: a.zero, ..Values::ZERO };
        }
        self.result(Values { lo: a.lo / b.hi * DOWN, hi: a.hi / b.lo * UP, zero: a.zero, pos, neg })
    }

    fn sqrt(&mut self, a: Values) -> Values {
        if a.neg {
            self.ok = false;
        }
        self.result(Values { lo: libm::sqrt(a.lo) * DOWN, hi: libm::sqrt(a.hi) * UP, neg: false, ..a })
    }

    /// `dare::clamp` to `±c`, `c > 0`.
    fn clamp(&mut self, a: Values, c: f32) -> Values {
        let c = f64::from(c);
        self.result(Values { lo: a.lo.min(c), hi: a.hi.min(c), ..a })
    }
}

/// One block's inputs, as the writing pass reads them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Inputs {
    pub grad: Span,
    pub theta: Span,
    pub m: Span,
    /// Taken with [`Span::of_non_negative`].
    pub v: Span,
    /// `None` without a cached delta.
    pub cached: Option<Span>,
    /// `None` for a step that reads no task vector.
    pub tau: Option<Span>,
    /// The OnTIES update the scan stored, where the write reads it instead of
    /// computing it ([`crate::step::TensorStep::write_chunk_from_update`]).
    pub update: Option<Span>,
}

impl Inputs {
    /// The spans of a block's inputs (`tau`: `None` for a step that reads no task vector).
    #[inline(always)]
    pub(crate) fn of(grad: &[f32], state: &crate::step::StateRef<'_>, tau: Option<&[f32]>) -> Inputs {
        Inputs {
            grad: Span::of(grad),
            theta: Span::of(state.theta),
            m: Span::of(state.m),
            v: Span::of_non_negative(state.v),
            cached: state.cached.map(Span::of),
            tau: tau.map(Span::of),
            update: None,
        }
    }

    /// These inputs, with the update the write reads.
    #[inline(always)]
    pub(crate) fn with_update(self, update: &[f32]) -> Inputs {
        Inputs { update: Some(Span::of(update)), ..self }
    }

    /// Whether every input lies within the check pass's `limit` and none is subnormal.
    #[inline(always)]
    pub(crate) fn normal_within(&self, limit: u32) -> bool {
        [Some(self.grad), Some(self.theta), Some(self.m), Some(self.v), self.cached, self.tau, self.update].iter().flatten().all(|s| s.normal_within(limit))
    }

    fn pairs(&self, o: &Inputs) -> [(Option<Span>, Option<Span>); 7] {
        [(Some(self.grad), Some(o.grad)), (Some(self.theta), Some(o.theta)), (Some(self.m), Some(o.m)), (Some(self.v), Some(o.v)), (self.cached, o.cached), (self.tau, o.tau), (self.update, o.update)]
    }

    fn within(&self, wider: &Inputs) -> bool {
        self.pairs(wider).iter().all(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => a.within(b),
            (None, None) => true,
            _ => false,
        })
    }

    fn widened(&self, limit: u32) -> Inputs {
        let w = |s: Span| s.widened(limit);
        Inputs { grad: w(self.grad), theta: w(self.theta), m: w(self.m), v: w(self.v), cached: self.cached.map(w), tau: self.tau.map(w), update: self.update.map(w) }
    }
}

/// Binades by which [`Memory`] widens a block's inputs before analysing them.
const WIDEN: u32 = 8;

/// What a writing pass remembers from block to block of a chunk (one step):
/// inputs the analysis has passed. The analysis is monotone (fewer possible
/// inputs give fewer possible values at every operation), so a block whose
/// inputs lie within them passes too, without running it. The first analysis
/// runs on the block's inputs widened by [`WIDEN`] binades each way, so that
/// it usually covers the blocks that follow; if that fails, the first block's
/// own inputs that pass are remembered instead, and each block runs at most
/// one analysis.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    passed: Option<Inputs>,
    widening_failed: bool,
}

impl Memory {
    /// Whether the block with these inputs may run the flush-free kernel: its
    /// inputs lie within the check pass's `limit`, none is subnormal, and
    /// [`holds`] passes for them.
    pub(crate) fn flush_free(&mut self, step: &TensorStep<'_>, limit: u32, inputs: &Inputs) -> bool {
        if !inputs.normal_within(limit) {
            return false;
        }
        if let Some(passed) = &self.passed
            && inputs.within(passed)
        {
            return true;
        }
        if self.passed.is_none() && !self.widening_failed {
            let wide = inputs.widened(limit);
            if holds(step, &wide) {
                self.passed = Some(wide);
                return true;
            }
            self.widening_failed = true;
        }
        let passes = holds(step, inputs);
        if passes && self.passed.is_none() {
            self.passed = Some(*inputs);
        }
        passes
    }
}

/// Whether, for every block whose inputs lie in `inputs`, no operation of the
/// writing pass's step has a subnormal result: then the flush-free kernel gives
/// SPEC's bits. The writing pass's kernels have a flush-free form (plain AdamW,
/// OnDARE, OnTIES with its threshold, step-K's accumulating steps), and so
/// has OnTIES's scan (before its threshold is known), whose operations are a
/// prefix of its write's. The operations are those of `TensorStep::compute`,
/// in its order.
pub(crate) fn holds(step: &TensorStep<'_>, inputs: &Inputs) -> bool {
    let s = &step.scalars;
    let torch = s.form == AdamForm::Torch;
    let k = Values::constant;
    let mut b = Bounds { ok: true };
    let (g, m, v) = (inputs.grad.values(false), inputs.m.values(false), inputs.v.values(true));
    let theta_in = inputs.theta.values(false);
    let absent = |x: Option<Span>| x.map_or(Values::ZERO, |s| s.values(false));
    let (c, tau) = (absent(inputs.cached), absent(inputs.tau));
    let cached = inputs.cached.is_some();

    let (x, y) = (b.mul(k(s.beta1), m), b.mul(k(s.one_minus_beta1), g));
    let m1 = b.add(x, y);
    let g2 = b.square(g);
    let (x, y) = (b.mul(k(s.beta2), v), b.mul(k(s.one_minus_beta2), g2));
    let v1 = b.add(x, y);
    // The OnTIES write from the kept update reads `D` (the rollback included)
    // instead of computing it.
    let update = inputs.update.map(|u| u.values(false));
    let delta = match update {
        Some(d) => d,
        None => {
            let mut root = b.sqrt(v1);
            if torch {
                root = b.div(root, k(s.bc2_sqrt));
            }
            let divisor = b.add(root, k(s.eps));
            let quotient = b.div(m1, divisor);
            b.mul(k(s.neg_step_size), quotient)
        }
    };
    let theta = if torch { b.mul(theta_in, k(s.decay_before)) } else { theta_in };
    let theta1 = match step.phase {
        Phase::Accumulate => {
            if cached {
                b.add(c, delta);
            }
            b.add(theta, delta)
        }
        Phase::Merge => {
            let (theta0, d) = match (cached, update) {
                (true, None) => (b.sub(theta, c), b.add(delta, c)),
                (true, Some(_)) => (b.sub(theta, c), delta),
                (false, _) => (theta, delta),
            };
            let rescaled = |b: &mut Bounds, sp: Values| match step.rescale {
                Rescale::Off => sp,
                Rescale::Apply { factor, clip } => {
                    let x = b.mul(sp, k(factor));
                    b.clamp(x, clip)
                }
            };
            match step.merge {
                MergePlan::None => b.add(theta0, d),
                MergePlan::Dare { params, .. } => {
                    let (alpha, omega) = (k(params.alpha), k(params.one_minus_alpha));
                    // The paper variant sparsifies with a scale of 1 (`params.scale` is 1 there too).
                    let scale = if params.variant == DareVariant::Paper { 1.0 } else { params.scale };
                    let kept = b.mul(d, k(scale));
                    let applied = rescaled(&mut b, kept.or(Values::ZERO));
                    match params.variant {
                        DareVariant::Reference => {
                            let t = b.mul(alpha, tau);
                            let x = b.add(theta0, t);
                            let y = b.mul(omega, applied);
                            b.add(x, y)
                        }
                        DareVariant::Paper => {
                            let t = b.mul(alpha, tau.or(Values::ZERO));
                            let y = b.mul(omega, applied);
                            let x = b.add(t, y);
                            b.add(theta0, x)
                        }
                    }
                }
                MergePlan::Ties { variant, alpha, one_minus_alpha, selection: Some(selection), .. } => {
                    // Trimmed: `D ⊗ ρ` where kept, else `+0`.
                    let kept = b.mul(d, k(selection.factor)).or(Values::ZERO);
                    let (alpha, omega) = (k(alpha), k(one_minus_alpha));
                    let u = match variant {
                        crate::onties::Variant::Reference => {
                            // The election compares `τ' ⊕ D'` with zero, where a
                            // flushed subnormal would vote otherwise.
                            b.add(tau, kept);
                            let x = b.mul(alpha, tau).or(Values::ZERO);
                            let y = b.mul(omega, kept).or(Values::ZERO);
                            b.add(x, y)
                        }
                        crate::onties::Variant::Paper => {
                            // Either term alone (opposite signs), or their sum.
                            let (x, y) = (b.mul(alpha, tau), b.mul(omega, kept));
                            b.add(x, y).or(x).or(y)
                        }
                    };
                    b.add(theta0, u)
                }
                // Before its threshold is known, OnTIES only scans its update
                // `D` (the rollback included): nothing follows it.
                MergePlan::Ties { selection: None, .. } => return b.ok,
            }
        }
    };
    if !torch {
        let x = b.mul(k(s.decay_after), theta1);
        b.sub(theta1, x);
    }
    b.ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::is_non_finite;
    use crate::dare::DareConfig;
    use crate::dtype::Src;
    use crate::hyper::{AdamConfig, AdamForm};
    use crate::optim::{Merge, OnlineConfig, Optimizer, StepJob, TiesConfig};
    use crate::reference;
    use crate::rng::SplitMix64;
    use crate::step::{BLOCK, StateMut};
    use std::vec;
    use std::vec::Vec;

    extern crate std;

    fn subnormal(x: f32) -> bool {
        x != 0.0 && x.to_bits() & crate::arith::EXP_MASK == 0
    }

    /// A random set of normal values: magnitudes in a random range of binades
    /// between 2^-126 and 2^20 (often narrow, so that operands meet near the
    /// edges), random signs and zero.
    fn random_values(rng: &mut SplitMix64) -> Values {
        let lo_exp = 1 + rng.below(150) as u32;
        let hi_exp = (lo_exp + rng.pick(&[0u32, 1, 3, 30])).min(150);
        let (lo, hi) = (rng.spread_f32(lo_exp, lo_exp).abs(), rng.spread_f32(hi_exp, hi_exp).abs());
        let (lo, hi) = (f64::from(lo.min(hi)), f64::from(lo.max(hi)));
        let signs = rng.below(3);
        Values { lo, hi, zero: rng.below(2) == 0, pos: signs != 1, neg: signs != 0 }
    }

    /// A member of `x` (`None` when `x` is empty): the ends of its range, a
    /// zero, or a random magnitude between them.
    fn member(rng: &mut SplitMix64, x: &Values) -> Option<f32> {
        if !x.non_zero() {
            return x.zero.then_some(0.0);
        }
        if x.zero && rng.below(8) == 0 {
            return Some(if rng.below(2) == 0 { 0.0 } else { -0.0 });
        }
        let (lo, hi) = (x.lo as f32, x.hi as f32);
        let bits = match rng.below(4) {
            0 => lo.to_bits(),
            1 => hi.to_bits(),
            _ => lo.to_bits() + (rng.next_u64() % u64::from(hi.to_bits() - lo.to_bits() + 1)) as u32,
        };
        let negative = x.neg && (!x.pos || rng.below(2) == 0);
        Some(f32::from_bits(bits | if negative { 1 << 31 } else { 0 }))
    }

    /// Whether `r` is a value the set allows.
    fn allows(x: &Values, r: f32) -> bool {
        // Overflow is outside the analysis: the blocks it serves lie under the
        // check pass's bound.
        if r.is_infinite() && x.hi * UP > f64::from(f32::MAX) {
            return if r > 0.0 { x.pos } else { x.neg };
        }
        if r == 0.0 {
            return x.zero;
        }
        let a = f64::from(r).abs();
        let sign = if r > 0.0 { x.pos } else { x.neg };
        sign && x.lo <= a && a <= x.hi && !subnormal(r)
    }

    /// Each operation's set holds every result of its operands' members, and
    /// an operation that passes never yields a subnormal. The second operand is
    /// often drawn close to the negated first, so that sums cancel.
    #[test]
    fn every_operation_holds_its_results() {
        let mut rng = SplitMix64::new(0x0f1a_54ee);
        let mut passed = [0u32; 6];
        for case in 0..40_000 {
            let (a, b) = (random_values(&mut rng), random_values(&mut rng));
            let c = rng.spread_f32(1, 150).abs();
            let op = case % 6;
            let mut bounds = Bounds { ok: true };
            let r = match op {
                0 => bounds.mul(a, b),
                1 => bounds.add(a, b),
                2 => bounds.sub(a, b),
                3 => bounds.div(a, b),
                4 => bounds.sqrt(a),
                _ => {
                    let x = bounds.square(a);
                    bounds.clamp(x, c)
                }
            };
            if !bounds.ok {
                continue;
            }
            passed[op] += 1;
            for _ in 0..64 {
                let Some(x) = member(&mut rng, &a) else { break };
                let near = f32::from_bits((-x).to_bits().wrapping_add(rng.below(5) as u32).wrapping_sub(2));
                let y = match member(&mut rng, &b) {
                    Some(_) if op <= 2 && allows(&b, if op == 2 { -near } else { near }) && rng.below(2) == 0 => if op == 2 { -near } else { near },
                    Some(y) => y,
                    None => break,
                };
                let got = match op {
                    0 => x * y,
                    1 => x + y,
                    2 => x - y,
                    3 => x / y,
                    4 => x.sqrt(),
                    _ => crate::dare::clamp(x * x, c),
                };
                assert!(allows(&r, got), "op {op}: {x:e}, {y:e} gave {got:e}, outside {r:?} from {a:?}, {b:?}");
            }
        }
        // Every operation passes on many sets.
        assert!(passed.iter().all(|&n| n > 1000), "{passed:?}");
    }

    /// Values of magnitude `2^e`, `e` in `lo ..= hi` (biased exponents), random
    /// sign and significand; a zero of either sign now and then.
    fn draw(rng: &mut SplitMix64, n: usize, lo: u32, hi: u32, non_negative: bool) -> Vec<f32> {
        (0..n)
            .map(|_| match rng.below(16) {
                0 => 0.0,
                1 if !non_negative => -0.0,
                _ => {
                    let x = rng.spread_f32(lo, hi);
                    if non_negative { x.abs() } else { x }
                }
            })
            .collect()
    }

    /// Blocks the analysis passes give the bits of the plain transcription of
    /// SPEC (`reference::step`), over scalars and inputs that put products and
    /// cancelling sums near the subnormal range: tiny learning rates, `ε` and
    /// weight decays, inputs spread over wide exponent ranges down to 2^-126.
    /// Plain AdamW, both OnDARE and both OnTIES variants with and without the
    /// rescale (OnTIES written both from a recomputed and from the scanned
    /// update), both forms, online and step-K. Many blocks pass the analysis and
    /// many fail it.
    #[test]
    fn flush_free_blocks_give_the_reference_bits() {
        let mut rng = SplitMix64::new(0x5eb_4e11);
        let (mut flush_free, mut total) = (0u32, 0u32);
        for case in 0..6000 {
            let form = rng.pick(&[AdamForm::HuggingFace, AdamForm::Torch]);
            let adam = AdamConfig {
                form,
                lr: rng.pick(&[1e-3, 1e-6, 1e-20, 1e-30]),
                eps: rng.pick(&[1e-8, 1e-20, 1e-37]),
                weight_decay: rng.pick(&[0.0, 0.01, 1e-10]),
                ..AdamConfig::default()
            };
            let merge = match rng.below(5) {
                0 => Merge::None,
                1 | 2 => Merge::Ties(TiesConfig {
                    variant: rng.pick(&[crate::onties::Variant::Reference, crate::onties::Variant::Paper]),
                    p: rng.pick(&[0.5, 0.05]),
                    alpha: rng.pick(&[1e-7, 0.25, 1e-30]),
                    rescale: rng.below(4) == 0,
                    ..TiesConfig::default()
                }),
                _ => Merge::Dare(DareConfig {
                    variant: rng.pick(&[crate::dare::DareVariant::Reference, crate::dare::DareVariant::Paper]),
                    p: rng.pick(&[0.5, 0.01]),
                    alpha: rng.pick(&[1e-7, 0.25, 1e-30]),
                    rescale: rng.below(4) == 0,
                    clip: rng.pick(&[1.0, 1e-30]),
                }),
            };
            let k = rng.pick(&[1u32, 3]);
            let cfg = OnlineConfig { adam, merge, k, seed: rng.next_u64() };
            let step_number = 1 + rng.below(4);
            let plan = Optimizer::new(cfg).unwrap().plan(step_number).unwrap();
            // Mostly one short block; every tenth tensor has several blocks (the
            // kernels remember what passed from block to block).
            let n = if case % 10 == 0 { BLOCK * (2 + rng.below(4) as usize) + rng.below(BLOCK as u64) as usize } else { 1 + rng.below(40) as usize };
            // Each input spans a random range of binades ending at or below 2^0,
            // drawn afresh for each block; half the time a block's range lies
            // within the first block's.
            let mut input = |non_negative: bool| {
                let mut out = Vec::with_capacity(n);
                let (mut first_lo, mut first_hi) = (0, 0);
                for b in 0..n.div_ceil(BLOCK) {
                    let (lo, hi) = if b > 0 && rng.below(2) == 0 {
                        let lo = first_lo + rng.below(u64::from(first_hi - first_lo) + 1) as u32;
                        (lo, lo + rng.below(u64::from(first_hi - lo) + 1) as u32)
                    } else {
                        let hi = 60 + rng.below(68) as u32;
                        (hi.saturating_sub(rng.pick(&[0u32, 4, 20, 60])).max(1), hi)
                    };
                    if b == 0 {
                        (first_lo, first_hi) = (lo, hi);
                    }
                    out.extend(draw(&mut rng, BLOCK.min(n - b * BLOCK), lo, hi, non_negative));
                }
                out
            };
            let (g, theta, m, v, cached, tau) = (input(false), input(false), input(false), input(true), input(false), input(false));
            let cached_in = (k > 1).then_some(&cached[..]);
            let mut step = plan.tensor("t", n as u64).unwrap();
            // OnTIES writes with the threshold that the reference selects.
            let mut selection = None;
            if matches!(merge, Merge::Ties(_)) && step_number.is_multiple_of(u64::from(k)) {
                let old = crate::step::StateRef { theta: &theta, m: &m, v: &v, cached: cached_in };
                let mut update = vec![0.0f32; n];
                reference::update(&cfg, step_number, &g, old, &mut update).unwrap();
                if update.iter().any(|&x| is_non_finite(x)) {
                    continue;
                }
                let Ok(sel) = reference::ties_selection(&cfg, &[&update]) else { continue };
                selection = Some((sel, 0));
                if let MergePlan::Ties { selection, .. } = &mut step.merge {
                    *selection = Some(sel);
                }
            }
            let tau_in = matches!(merge, Merge::Dare(_) | Merge::Ties(_)).then_some(&tau[..]);
            let mut memory = Memory::default();
            for b in (0..n).step_by(BLOCK) {
                let r = b..n.min(b + BLOCK);
                let state = crate::step::StateRef { theta: &theta[r.clone()], m: &m[r.clone()], v: &v[r.clone()], cached: cached_in.map(|c| &c[r.clone()]) };
                total += 1;
                if let Some(limit) = step.flush_free_limit()
                    && memory.flush_free(&step, limit, &Inputs::of(&g[r.clone()], &state, tau_in.map(|t| &t[r.clone()])))
                {
                    flush_free += 1;
                }
            }

            let mut want = (theta.clone(), m.clone(), v.clone(), cached.clone());
            let state = StateMut { theta: &mut want.0, m: &mut want.1, v: &mut want.2, cached: (k > 1).then_some(&mut want.3[..]) };
            reference::step(&cfg, step_number, "t", &g, state, &tau, selection).unwrap();
            // The transcription stores what it computes; the kernels refuse a
            // non-finite value and write nothing.
            let refused = [&want.0, &want.1, &want.2, &want.3].iter().any(|x| x.iter().any(|&x| is_non_finite(x)));
            // An OnTIES merge step is written both as the threads' per-tensor
            // path writes it (recomputing Adam, through write_chunk) and as
            // `step_tensors` does (from the scanned update).
            for recompute in if selection.is_some() { &[true, false][..] } else { &[false] } {
                let mut got = (theta.clone(), m.clone(), v.clone(), cached.clone());
                let mut scratch = vec![0.0f32; n];
                let mut jobs = [StepJob {
                    name: "t",
                    grad: &g,
                    state: StateMut { theta: &mut got.0, m: &mut got.1, v: &mut got.2, cached: (k > 1).then_some(&mut got.3[..]) },
                    tau: Src::F32(&tau),
                    scratch: &mut scratch,
                }];
                let result = if *recompute {
                    let [job] = &mut jobs;
                    let state = job.state.reborrow();
                    step.check_chunk(0, &g, state.as_ref(), Src::F32(&tau)).and_then(|()| step.write_chunk(0, &g, state, Src::F32(&tau)))
                } else {
                    plan.step_tensors(&mut jobs)
                };
                let how = if *recompute { "write_chunk" } else { "step_tensors" };
                if refused {
                    assert!(result.is_err(), "{cfg:?} step {step_number}, {how}");
                    assert_eq!((&got.0, &got.1, &got.2), (&theta, &m, &v));
                    continue;
                }
                assert_eq!(result, Ok(()), "{cfg:?} step {step_number}, {how}");
                for (what, got, want) in [("theta", &got.0, &want.0), ("m", &got.1, &want.1), ("v", &got.2, &want.2), ("cached", &got.3, &want.3)] {
                    if let Some(j) = (0..n).find(|&j| got[j].to_bits() != want[j].to_bits()) {
                        panic!("{what}[{j}]: {:e}, reference {:e}; {cfg:?} step {step_number}, {how}", got[j], want[j]);
                    }
                }
            }
        }
        std::eprintln!("{flush_free} of {total} blocks flush-free");
        assert!(flush_free > total / 5 && flush_free < total * 4 / 5, "{flush_free} of {total} blocks flush-free");
    }

    /// The OnTIES scan's update (its own kernel, without the merge) is SPEC's
    /// update bit for bit (`reference::update`), over the same kinds of tiny
    /// scalars and wide-ranging inputs as above, where flushes act; both
    /// variants, both forms, online and step-K's merge steps.
    #[test]
    fn the_onties_scan_gives_the_reference_update() {
        let mut rng = SplitMix64::new(0x71e5_5ca4);
        for case in 0..3000 {
            let adam = AdamConfig {
                form: rng.pick(&[AdamForm::HuggingFace, AdamForm::Torch]),
                lr: rng.pick(&[1e-3, 1e-6, 1e-20, 1e-30]),
                eps: rng.pick(&[1e-8, 1e-20, 1e-37]),
                weight_decay: rng.pick(&[0.0, 0.01, 1e-10]),
                ..AdamConfig::default()
            };
            let variant = rng.pick(&[crate::onties::Variant::Reference, crate::onties::Variant::Paper]);
            let merge = Merge::Ties(TiesConfig { variant, p: 0.1, alpha: rng.pick(&[1e-7, 0.25]), ..TiesConfig::default() });
            let k = rng.pick(&[1u32, 3]);
            let cfg = OnlineConfig { adam, merge, k, seed: rng.next_u64() };
            // A merge step: the scan and the rollback of the cached delta.
            let step_number = u64::from(k) * (1 + rng.below(3));
            let plan = Optimizer::new(cfg).unwrap().plan(step_number).unwrap();
            let n = if case % 10 == 0 { BLOCK * (2 + rng.below(3) as usize) + rng.below(BLOCK as u64) as usize } else { 1 + rng.below(40) as usize };
            let mut input = |non_negative: bool| {
                let mut out = Vec::with_capacity(n);
                for b in 0..n.div_ceil(BLOCK) {
                    let hi = 60 + rng.below(68) as u32;
                    let lo = hi.saturating_sub(rng.pick(&[0u32, 4, 20, 60])).max(1);
                    out.extend(draw(&mut rng, BLOCK.min(n - b * BLOCK), lo, hi, non_negative));
                }
                out
            };
            let (g, theta, m, v, cached, tau) = (input(false), input(false), input(false), input(true), input(false), input(false));
            let state = crate::step::StateRef { theta: &theta, m: &m, v: &v, cached: (k > 1).then_some(&cached[..]) };
            let step = plan.tensor("t", n as u64).unwrap();
            let mut got = vec![f32::NAN; n];
            let result = step.scan_chunk(0, &g, state, Src::F32(&tau), None, Some(&mut got));
            let mut want = vec![0.0f32; n];
            reference::update(&cfg, step_number, &g, state, &mut want).unwrap();
            if want.iter().any(|&x| is_non_finite(x)) {
                assert!(result.is_err(), "{cfg:?} step {step_number}");
                continue;
            }
            assert!(result.is_ok(), "{cfg:?} step {step_number}: {result:?}");
            if let Some(j) = (0..n).find(|&j| got[j].to_bits() != want[j].to_bits()) {
                panic!("update[{j}]: {:e}, reference {:e}; {cfg:?} step {step_number}", got[j], want[j]);
            }
        }
    }

    /// A random span of normal values with magnitudes in a random range of binades.
    fn random_span(rng: &mut SplitMix64, non_negative: bool) -> Span {
        let lo = 1 + rng.below(140) as u32;
        let hi = (lo + rng.below(40) as u32).min(140);
        let xs = draw(rng, 64, lo, hi, non_negative);
        if non_negative { Span::of_non_negative(&xs) } else { Span::of(&xs) }
    }

    /// Inputs within inputs that pass, pass: what lets [`Memory`] skip the
    /// analysis for them.
    #[test]
    fn the_analysis_is_monotone() {
        let mut rng = SplitMix64::new(0x3070_7011e);
        let mut checked = 0;
        for _ in 0..20_000 {
            let merge = rng.pick(&[Merge::None, Merge::Dare(DareConfig::default()), Merge::Dare(DareConfig { variant: crate::dare::DareVariant::Paper, alpha: 0.25, ..DareConfig::default() })]);
            let form = rng.pick(&[AdamForm::HuggingFace, AdamForm::Torch]);
            let adam = AdamConfig { form, lr: rng.pick(&[1e-3, 1e-12, 1e-25]), weight_decay: rng.pick(&[0.0, 0.01]), eps: rng.pick(&[1e-8, 1e-30]), ..AdamConfig::default() };
            let k = rng.pick(&[1u32, 3]);
            let step = Optimizer::new(OnlineConfig { adam, merge, k, seed: 1 }).unwrap().plan(1 + rng.below(3)).unwrap().tensor("w", 64).unwrap();
            let wide = Inputs {
                grad: random_span(&mut rng, false),
                theta: random_span(&mut rng, false),
                m: random_span(&mut rng, false),
                v: random_span(&mut rng, true),
                cached: (k > 1).then(|| random_span(&mut rng, false)),
                tau: Some(random_span(&mut rng, false)),
                update: None,
            };
            if !holds(&step, &wide) {
                continue;
            }
            checked += 1;
            let mut narrow = |s: Span| {
                let least = s.least + rng.below(u64::from(s.most.saturating_sub(s.least)) + 1) as u32;
                Span { least, most: least + rng.below(u64::from(s.most.saturating_sub(least)) + 1) as u32 }
            };
            let inner = Inputs { grad: narrow(wide.grad), theta: narrow(wide.theta), m: narrow(wide.m), v: narrow(wide.v), cached: wide.cached.map(&mut narrow), tau: wide.tau.map(&mut narrow), update: None };
            assert!(inner.within(&wide));
            assert!(holds(&step, &inner), "{inner:?} within {wide:?}");
        }
        assert!(checked > 2000, "{checked}");
    }

    /// Usual training magnitudes pass: the path serves real steps (OnTIES's
    /// scan here, before its threshold is known).
    #[test]
    fn usual_blocks_run_flush_free() {
        let mut rng = SplitMix64::new(7);
        for merge in [Merge::None, Merge::Dare(DareConfig::default()), Merge::Ties(TiesConfig::default())] {
            for form in [AdamForm::HuggingFace, AdamForm::Torch] {
                let cfg = OnlineConfig { adam: AdamConfig { form, lr: 1e-6, weight_decay: 0.01, ..AdamConfig::default() }, merge, k: 1, seed: 1 };
                let step = Optimizer::new(cfg).unwrap().plan(10).unwrap().tensor("w", 256).unwrap();
                // Biased exponents: gradients 2^-40 .. 2^-10, weights 2^-25 .. 2^-1,
                // moments 2^-50 .. 2^-13 and 2^-70 .. 2^-20, task vector 2^-40 .. 2^-10.
                let g = draw(&mut rng, 256, 87, 117, false);
                let theta = draw(&mut rng, 256, 102, 126, false);
                let m = draw(&mut rng, 256, 77, 114, false);
                let v = draw(&mut rng, 256, 57, 107, true);
                let tau = draw(&mut rng, 256, 87, 117, false);
                let inputs = Inputs { grad: Span::of(&g), theta: Span::of(&theta), m: Span::of(&m), v: Span::of_non_negative(&v), cached: None, tau: Some(Span::of(&tau)), update: None };
                assert!(holds(&step, &inputs), "{merge:?} {form:?} {inputs:?}");
            }
        }
    }
}
