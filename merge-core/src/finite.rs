//! The check pass's shortcut: an input bound under which every value a step
//! checks (SPEC.md §5.6) is provably finite, so a block whose inputs all lie
//! under it passes without its arithmetic.
//!
//! Validating a tensor in place costs a second pass of the whole element
//! arithmetic before the writing pass (it must not write before every element
//! is known to be finite). But the step's values are sums, products and
//! quotients of the inputs with fixed scalars, and the only divisor is
//! `√v' ⊕ ε ≥ ε`. So, given the step's scalars, a magnitude `B` for the inputs
//! bounds every intermediate value: if that bound is below the largest finite
//! binary32 value, inputs no larger than `B` in magnitude (and `v ≥ 0`, so the
//! square root's argument is not negative) give finite values everywhere, and
//! the check of that block is the same as the arithmetic's. The test is one
//! integer maximum per input, about a fifth of the arithmetic's cost. A block
//! that fails it (a large or non-finite input) runs the full check, which finds
//! the error, if any, exactly as before: the shortcut never changes a result.
//!
//! The bound is computed in binary64 without rounding, and required to be at
//! most `2^126`, a quarter of binary32's range: each binary32 operation rounds
//! its exact result by a factor of at most `1 + 2^-24`, and no value passes
//! through more than 40 operations, so every computed value stays below
//! `2^126 · (1 + 2^-24)^40 < 2^127`. The flush rule only ever lowers a magnitude.

use crate::arith::{flush, is_non_finite};
use crate::step::{MergePlan, Phase, Rescale, TensorStep};

/// Magnitude bits (sign cleared) of a binary32 value.
pub(crate) const ABS: u32 = 0x7fff_ffff;

/// Largest value the bound may reach: `2^126`.
const LIMIT: f64 = 8.507_059_173_023_462e37;

/// The largest power of two `B` such that inputs with `|x| <= B` (and `v >= 0`)
/// make every checked value of the step finite, as the magnitude bits of `B`;
/// `None` when no such bound exists for these scalars (the check pass then
/// computes every block). `update_is_input`: the OnTIES check from the scanned
/// update, where `D` is read (already validated) rather than computed.
pub(crate) fn input_limit(step: &TensorStep<'_>, update_is_input: bool) -> Option<u32> {
    let s = &step.scalars;
    let torch = s.form == crate::hyper::AdamForm::Torch;
    let scalars = [s.beta1, s.beta2, s.one_minus_beta1, s.one_minus_beta2, s.eps, s.neg_step_size, s.bc2_sqrt, s.decay_before, s.decay_after];
    if scalars.iter().any(|&x| is_non_finite(x)) {
        return None;
    }
    // The divisor `√v' ⊕ ε` is at least `ε` only for a positive, normal `ε`, and
    // `v'` is not negative only when both of its factors are not.
    if flush(s.eps) <= 0.0 || s.beta2 < 0.0 || s.one_minus_beta2 < 0.0 || (torch && flush(s.bc2_sqrt) <= 0.0) {
        return None;
    }
    // The bound grows with `B`, so the largest exponent that keeps it under the
    // limit is found by bisection (the check pass asks once per chunk).
    let fits = |e: i32| worst_value(step, libm::ldexp(1.0, e), update_is_input).is_some_and(|w| w <= LIMIT);
    let (mut lo, mut hi) = (-126i32, 127i32);
    if !fits(lo) {
        return None;
    }
    // fits(lo) holds throughout; the answer is in lo ..= hi.
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        if fits(mid) { lo = mid } else { hi = mid - 1 }
    }
    Some(((lo + 127) as u32) << 23)
}

/// An upper bound on the magnitude of every value (intermediate or checked) of
/// the step when every input is at most `b` in magnitude, or `None` when a
/// scalar the step uses is not finite.
fn worst_value(step: &TensorStep<'_>, b: f64, update_is_input: bool) -> Option<f64> {
    let s = &step.scalars;
    let torch = s.form == crate::hyper::AdamForm::Torch;
    let a = |x: f32| f64::from(x).abs();
    let mut worst = b;
    let mut note = |x: f64| {
        worst = worst.max(x);
        x
    };
    // Adam: m' = β1⊗m ⊕ c1⊗g, v' = β2⊗v ⊕ c2⊗(g⊗g), D = (−step)⊗(m' ⊘ (√v' [⊘ bc2] ⊕ ε)).
    let m1 = note(a(s.beta1) * b + a(s.one_minus_beta1) * b);
    let g2 = note(b * b);
    let v1 = note(a(s.beta2) * b + a(s.one_minus_beta2) * g2);
    let root = note(libm::sqrt(v1) / if torch { a(flush(s.bc2_sqrt)) } else { 1.0 });
    note(root + a(s.eps));
    let quotient = note(m1 / a(flush(s.eps)));
    let delta = if update_is_input { b } else { note(a(s.neg_step_size) * quotient) };
    // The rollback of a cached delta: θ₀ = decay_before(θ) ⊖ Δ_c, D ⊕ Δ_c.
    let theta = note(b * if torch { a(s.decay_before).max(1.0) } else { 1.0 });
    let (theta0, d) = (note(theta + b), note(delta + b));
    // The new θ before the HF decay, from the merge's terms (a sum of
    // non-negative terms bounds each of them too).
    let theta1 = match (step.phase, step.merge) {
        (Phase::Accumulate, _) => note(theta + delta),
        (Phase::Merge, MergePlan::None) => note(theta0 + d),
        (Phase::Merge, MergePlan::Dare { params, .. }) => {
            let sparse = note(d * a(params.scale));
            let applied = match step.rescale {
                Rescale::Off => sparse,
                Rescale::Apply { factor, clip } => {
                    if is_non_finite(factor) || is_non_finite(clip) {
                        return None;
                    }
                    // clamp(x, c) is at most max(|x|, |c|) in magnitude.
                    note(sparse * a(factor)).max(a(clip))
                }
            };
            note(theta0 + a(params.alpha) * b + a(params.one_minus_alpha) * applied)
        }
        (Phase::Merge, MergePlan::Ties { alpha, one_minus_alpha, selection, .. }) => {
            let factor = selection.map_or(1.0, |sel| sel.factor);
            if is_non_finite(factor) {
                return None;
            }
            // combine returns α⊗τ', (1−α)⊗D' or their sum.
            let sparse = note(d * a(factor));
            note(theta0 + a(alpha) * b + a(one_minus_alpha) * sparse)
        }
    };
    note(theta1 + a(s.decay_after) * theta1);
    Some(worst)
}

/// Whether every value of `xs` is at most the limit in magnitude (non-finite
/// values never are: their magnitude bits exceed any finite limit).
#[inline(always)]
pub(crate) fn magnitudes_within(limit: u32, xs: &[f32]) -> bool {
    largest_magnitude(xs) <= limit
}

/// The magnitude bits of the largest value of `xs` in magnitude (0 when empty),
/// for comparing with a limit later.
#[inline(always)]
pub(crate) fn largest_magnitude(xs: &[f32]) -> u32 {
    largest_bits(xs, ABS)
}

/// The largest of `bits(x) & mask` over `xs` (0 when empty).
#[inline(always)]
pub(crate) fn largest_bits(xs: &[f32], mask: u32) -> u32 {
    xs.iter().fold(0u32, |w, x| w.max(x.to_bits() & mask))
}

/// Whether every value of `xs` is `+0`-signed or positive and at most the limit
/// (the second moment: a negative `v` could make `v'` negative).
#[inline(always)]
pub(crate) fn non_negative_within(limit: u32, xs: &[f32]) -> bool {
    xs.iter().fold(0u32, |w, x| w.max(x.to_bits())) <= limit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dare::{DareConfig, DareVariant};
    use crate::dtype::Src;
    use crate::hyper::{AdamConfig, AdamForm};
    use crate::onties::{self, TiesSelection};
    use crate::optim::{Merge, OnlineConfig, Optimizer, TiesConfig};
    use crate::rng::SplitMix64;
    use crate::step::{StateMut, StateRef};
    use crate::topk::Threshold;
    use std::vec;
    use std::vec::Vec;

    extern crate std;

    /// A configuration, the step number, and an OnDARE rescale (factor, clip) or
    /// an OnTIES selection factor.
    type Case = (OnlineConfig, u64, Option<(f32, f32)>);

    /// Steps over a wide range of scalars: tiny and huge learning rates, `ε`
    /// down to the smallest normal, large weight decay, `α` up to 1, `p` down to 2^-100
    /// (a reference scale of 2^100), rescale factors and clips, both forms,
    /// online merging and step-K's two phases.
    fn steps(rng: &mut SplitMix64) -> Vec<Case> {
        let mut out = Vec::new();
        for _ in 0..400 {
            let form = rng.pick(&[AdamForm::HuggingFace, AdamForm::Torch]);
            let (beta1, beta2) = rng.pick(&[(0.9, 0.999), (0.0, 0.0), (0.5, 0.99), (0.99, 0.5)]);
            let adam = AdamConfig {
                form,
                lr: rng.pick(&[1e-7, 1e-3, 1.0, 1e6, 1e20]),
                eps: rng.pick(&[1e-8, 1e-30, 1.2e-38, 1.0]),
                weight_decay: rng.pick(&[0.0, 0.01, 1.0, 100.0]),
                beta1,
                beta2,
                ..AdamConfig::default()
            };
            let p = rng.pick(&[1.0, 0.3, 0.01, libm::ldexp(1.0, -100)]);
            let alpha = rng.pick(&[0.0, 1e-7, 0.25, 1.0]);
            let merge = match rng.below(3) {
                0 => Merge::None,
                1 => Merge::Dare(DareConfig { variant: rng.pick(&[DareVariant::Reference, DareVariant::Paper]), p, alpha, rescale: false, clip: 1.0 }),
                _ => Merge::Ties(TiesConfig { variant: rng.pick(&[onties::Variant::Reference, onties::Variant::Paper]), p: 0.5, alpha, ..TiesConfig::default() }),
            };
            let k = rng.pick(&[1u32, 3]);
            // A rescale (OnDARE) or selection factor (OnTIES) and clip.
            let factor = (rng.below(2) == 0).then(|| (rng.pick(&[0.5f32, 3.0, 1e10]), rng.pick(&[1e-3f32, 1e20])));
            out.push((OnlineConfig { adam, merge, k, seed: rng.next_u64() }, rng.pick(&[1u64, 2, 3, 1000]), factor));
        }
        out
    }

    /// An input of magnitude at most `b`: often exactly `±b` or `0`, else a
    /// random fraction of `b`.
    fn corner(rng: &mut SplitMix64, b: f32) -> f32 {
        let x = match rng.below(4) {
            0 => b,
            1 => 0.0,
            _ => b * (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32,
        };
        if rng.below(2) == 0 { -x } else { x }
    }

    /// The soundness of the shortcut: for every step, inputs within its limit give
    /// a step whose every value is finite, found by the full arithmetic (the
    /// out-of-place write validates each block itself, without the shortcut).
    #[test]
    fn inputs_within_the_limit_give_finite_values() {
        let mut rng = SplitMix64::new(0xf1_417e);
        let n = 512;
        let (mut with_limit, mut without, mut refused) = (0, 0, 0);
        for (cfg, k, factor) in steps(&mut rng) {
            let Ok(plan) = Optimizer::new(cfg).and_then(|opt| opt.plan(k)) else {
                refused += 1;
                continue;
            };
            let mut step = plan.tensor("w", n as u64).unwrap();
            if let (Some((factor, clip)), MergePlan::Dare { .. }) = (factor, step.merge) {
                step.rescale = Rescale::Apply { factor, clip };
            }
            if let MergePlan::Ties { selection, .. } = &mut step.merge {
                *selection = Some(TiesSelection { threshold: Threshold::all(n as u64), factor: factor.map_or(1.0, |f| f.0) });
            }
            let Some(limit) = input_limit(&step, false) else {
                without += 1;
                continue;
            };
            with_limit += 1;
            let b = f32::from_bits(limit);
            for _ in 0..4 {
                let mut draw = |non_negative: bool| -> Vec<f32> { (0..n).map(|_| if non_negative { corner(&mut rng, b).abs() } else { corner(&mut rng, b) }).collect() };
                let (g, theta, m, v, cached, tau) = (draw(false), draw(false), draw(false), draw(true), draw(false), draw(false));
                let cached_in = (cfg.k > 1).then_some(&cached[..]);
                let input = StateRef { theta: &theta, m: &m, v: &v, cached: cached_in };
                let mut out = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
                let output = StateMut { theta: &mut out.0, m: &mut out.1, v: &mut out.2, cached: (cfg.k > 1).then_some(&mut out.3[..]) };
                let result = step.write_chunk_into(0, &g, input, Src::F32(&tau), output);
                assert_eq!(result, Ok(()), "limit {b:e}, {cfg:?} step {k}, factor {factor:?}");
                // OnTIES's check from the scanned update reads `D` as an input.
                if matches!(step.merge, MergePlan::Ties { .. }) && plan.phase() == Phase::Merge {
                    let b = f32::from_bits(input_limit(&step, true).unwrap());
                    let update: Vec<f32> = (0..n).map(|_| corner(&mut rng, b)).collect();
                    let theta: Vec<f32> = (0..n).map(|_| corner(&mut rng, b)).collect();
                    let input = StateRef { theta: &theta, m: &m, v: &v, cached: cached_in };
                    assert_eq!(step.check_chunk_from_update(0, input, Src::F32(&tau), &update), Ok(()), "from the update, limit {b:e}, {cfg:?}");
                }
            }
        }
        // Most of these steps have a limit (the others' scalars overflow at any
        // input), and few are refused as configurations.
        assert!(with_limit > 3 * without && with_limit > 3 * refused, "{with_limit} steps with a limit, {without} without, {refused} refused");
    }

    /// The shortcut must serve real steps: at usual scalars the limit is far
    /// above any trained weight, moment or gradient (`g ⊗ g` caps it near 2^63).
    #[test]
    fn usual_steps_have_a_wide_limit() {
        for merge in [Merge::None, Merge::Dare(DareConfig { p: 0.01, alpha: 1e-7, rescale: false, ..DareConfig::default() }), Merge::Ties(TiesConfig::default())] {
            for form in [AdamForm::HuggingFace, AdamForm::Torch] {
                let cfg = OnlineConfig { adam: AdamConfig { form, lr: 1e-5, weight_decay: 0.01, ..AdamConfig::default() }, merge, k: 1, seed: 1 };
                let mut step = Optimizer::new(cfg).unwrap().plan(1).unwrap().tensor("w", 8).unwrap();
                if let MergePlan::Ties { selection, .. } = &mut step.merge {
                    *selection = Some(TiesSelection { threshold: Threshold::all(8), factor: 1.0 });
                }
                let limit = f32::from_bits(input_limit(&step, false).unwrap());
                assert!(limit >= libm::ldexpf(1.0, 60), "{merge:?} {form:?}: limit {limit:e}");
            }
        }
    }
}
