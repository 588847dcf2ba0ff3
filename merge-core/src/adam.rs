//! The Adam element update of SPEC.md §5.1, in both forms. Every operation is one
//! of `⊕ ⊖ ⊗ ⊘ √` (flushed), in the order written; `TORCH` picks the form at
//! compile time so the hot loop has no per-element branch.

use crate::arith::{add_with, div_with, mul_with, sqrt_with, sub_with};
use crate::hyper::StepScalars;

/// `m' = β1⊗m ⊕ c1⊗g`, `v' = β2⊗v ⊕ c2⊗(g⊗g)`.
#[inline(always)]
pub fn moments(s: &StepScalars, g: f32, m: f32, v: f32) -> (f32, f32) {
    moments_with::<true>(s, g, m, v)
}

/// HF: `Δ = (−step)⊗(m' ⊘ (√v' ⊕ ε))`; torch: `Δ = (−step)⊗(m' ⊘ ((√v' ⊘ bc2) ⊕ ε))`.
#[inline(always)]
pub fn delta<const TORCH: bool>(s: &StepScalars, m1: f32, v1: f32) -> f32 {
    delta_with::<TORCH, true>(s, m1, v1)
}

/// torch decays before the update: `θ ⊗ RN(1 − ηλ)`.
#[inline(always)]
pub fn decay_before<const TORCH: bool>(s: &StepScalars, theta: f32) -> f32 {
    decay_before_with::<TORCH, true>(s, theta)
}

/// HF decays after the update: `θ ⊖ RN(ηλ)⊗θ`.
#[inline(always)]
pub fn decay_after<const TORCH: bool>(s: &StepScalars, theta: f32) -> f32 {
    decay_after_with::<TORCH, true>(s, theta)
}

/// [`moments`], flushed only when `FLUSH` ([`crate::arith::settle`]).
#[inline(always)]
pub fn moments_with<const FLUSH: bool>(s: &StepScalars, g: f32, m: f32, v: f32) -> (f32, f32) {
    let (add, mul) = (add_with::<FLUSH>, mul_with::<FLUSH>);
    let m1 = add(mul(s.beta1, m), mul(s.one_minus_beta1, g));
    let v1 = add(mul(s.beta2, v), mul(s.one_minus_beta2, mul(g, g)));
    (m1, v1)
}

/// [`delta`], flushed only when `FLUSH`.
#[inline(always)]
pub fn delta_with<const TORCH: bool, const FLUSH: bool>(s: &StepScalars, m1: f32, v1: f32) -> f32 {
    let root = sqrt_with::<FLUSH>(v1);
    let root = if TORCH { div_with::<FLUSH>(root, s.bc2_sqrt) } else { root };
    mul_with::<FLUSH>(s.neg_step_size, div_with::<FLUSH>(m1, add_with::<FLUSH>(root, s.eps)))
}

/// [`decay_before`], flushed only when `FLUSH`.
#[inline(always)]
pub fn decay_before_with<const TORCH: bool, const FLUSH: bool>(s: &StepScalars, theta: f32) -> f32 {
    if TORCH { mul_with::<FLUSH>(theta, s.decay_before) } else { theta }
}

/// [`decay_after`], flushed only when `FLUSH`.
#[inline(always)]
pub fn decay_after_with<const TORCH: bool, const FLUSH: bool>(s: &StepScalars, theta: f32) -> f32 {
    if TORCH { theta } else { sub_with::<FLUSH>(theta, mul_with::<FLUSH>(s.decay_after, theta)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hyper::{AdamConfig, AdamForm};

    /// The formulas in binary64-free plain f32 (no flush needed for these normal
    /// inputs), written independently of the helpers above.
    #[test]
    fn one_step_matches_the_formula() {
        let c = AdamConfig { lr: 1e-3, weight_decay: 0.01, ..AdamConfig::default() };
        let s = c.scalars(3).unwrap();
        let (g, m, v, th) = (0.25f32, 0.01f32, 0.002f32, 0.5f32);
        let m1 = 0.9f32 * m + s.one_minus_beta1 * g;
        let v1 = 0.999f32 * v + s.one_minus_beta2 * (g * g);
        let d = s.neg_step_size * (m1 / (libm::sqrtf(v1) + 1e-8f32));
        assert_eq!(moments(&s, g, m, v), (m1, v1));
        assert_eq!(delta::<false>(&s, m1, v1).to_bits(), d.to_bits());
        let th1 = th + d;
        assert_eq!(decay_after::<false>(&s, th1), th1 - s.decay_after * th1);

        let t = AdamConfig { form: AdamForm::Torch, ..c }.scalars(3).unwrap();
        let d = t.neg_step_size * (m1 / (libm::sqrtf(v1) / t.bc2_sqrt + 1e-8f32));
        assert_eq!(delta::<true>(&t, m1, v1).to_bits(), d.to_bits());
        assert_eq!(decay_before::<true>(&t, th), th * t.decay_before);
    }

    #[test]
    fn zero_gradient_from_zero_state_gives_positive_zero() {
        let s = AdamConfig::default().scalars(1).unwrap();
        let (m1, v1) = moments(&s, -0.0, 0.0, 0.0);
        assert_eq!((m1.to_bits(), v1.to_bits()), (0, 0));
        assert_eq!(delta::<false>(&s, m1, v1).to_bits(), 0);
        // A subnormal gradient is flushed: g⊗g and c1⊗g vanish the same way.
        let (m1, v1) = moments(&s, f32::from_bits(0x8000_0001), 0.0, 0.0);
        assert_eq!((m1.to_bits(), v1.to_bits()), (0, 0));
    }
}
