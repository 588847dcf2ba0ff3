//! OnTIES (SPEC.md §5.3): the element-wise merge of the trimmed task vector `τ'`
//! and the trimmed optimizer update `Δ'`, in the official code's `reference`
//! variant and the paper's `paper` variant: the selection over a scope
//! ([`select`], the threshold from [`crate::topk`] and the rescale factor), and the
//! element formula every block kernel runs ([`merge_element`], with [`combine`]).

use crate::adam;
use crate::arith::{add_with, div, flush, is_non_finite, mul_with, settle, sub_with};
use crate::error::{Error, tensor_name};
use crate::hyper::StepScalars;
use crate::reduce::TreeSum;
use crate::step::RESCALE_MIN_NORM;
use crate::topk::{self, LocalThreshold, Threshold, magnitude_key};

/// Which OnTIES to run; SPEC.md §5.3 has both side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The official `OTAdamW`: sign elected on the unweighted sum `τ' ⊕ Δ'`, every
    /// term that agrees with it added with its weight.
    Reference,
    /// The paper's equations: weighted terms `a = α ⊗ τ'`, `b = (1−α) ⊗ Δ'`; their
    /// sum when the signs agree, otherwise the larger magnitude alone.
    Paper,
}

/// The trimming of one scope's values (a step's update, or the task vectors) by
/// `TopP` (SPEC.md §5.3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TiesSelection {
    pub threshold: Threshold,
    /// `ρ(x, x')`, or 1 without the rescale.
    pub factor: f32,
}

/// The selection of `⌈p·n⌉` elements over the concatenated `values` (one tensor,
/// or every tensor of a global scope in bytewise name order), and with `rescale`
/// the factor `ρ` of the kept values; `scope` names the scope in errors.
pub fn select<'a>(p: f32, rescale: bool, scope: &str, values: impl Iterator<Item = &'a [f32]> + Clone) -> Result<TiesSelection, Error> {
    select_after(p, rescale, scope, values, |_| Ok(()))
}

/// Candidates the select keeps in memory: once a pass has at most this many, one
/// scan gathers them and the remaining passes run over that list only.
pub const GATHERED: usize = 2048;

/// The radix select [`select_after`] runs over a scope of `n` elements, in its
/// first pass, or `None` when it runs none (an empty scope keeps nothing; a keep
/// count of `n` keeps everything). A caller that counts the first pass itself
/// (fused with computing the values, in copies of this select) adds its counts
/// in `early_passes` with [`topk::RadixSelect::absorb`].
pub fn start_select(p: f32, scope: &str, n: u64) -> Result<Option<topk::RadixSelect>, Error> {
    let k = topk::keep_count("p (reserve rate)", p, n)?;
    if n == 0 || k == n {
        return Ok(None);
    }
    topk::RadixSelect::new(scope, n, k).map(Some)
}

/// [`select`], where `early_passes` may run the radix select's first passes
/// (each reads every value until at most [`GATHERED`] candidates remain) before
/// the rest runs here: for each pass, feed every element once, then
/// [`topk::RadixSelect::finish_pass`] (e.g. on several threads, joined with
/// [`topk::RadixSelect::absorb`]). Doing nothing leaves them to the select.
pub fn select_after<'a>(
    p: f32,
    rescale: bool,
    scope: &str,
    values: impl Iterator<Item = &'a [f32]> + Clone,
    early_passes: impl FnOnce(&mut topk::RadixSelect) -> Result<(), Error>,
) -> Result<TiesSelection, Error> {
    let n: u64 = values.clone().map(|v| v.len() as u64).sum();
    let threshold = match start_select(p, scope, n)? {
        Some(mut radix) => {
            // After the first pass the candidates usually fit here, and the remaining
            // passes run over them instead of over every update.
            let mut candidates = [topk::Candidate::default(); GATHERED];
            early_passes(&mut radix)?;
            radix.finish_in_memory(values.clone(), &mut candidates)?
        }
        None if n == 0 => Threshold::NOTHING,
        None => Threshold::all(n),
    };
    let factor = if rescale {
        let (mut full, mut kept) = (TreeSum::new(), TreeSum::new());
        let mut offset = 0u64;
        let mut chunk = [0.0f32; 256];
        for v in values.clone() {
            full.push_abs_slice(v);
            for (c, part) in v.chunks(256).enumerate() {
                for (j, &x) in part.iter().enumerate() {
                    chunk[j] = trim(x, offset + (c * 256 + j) as u64, &threshold);
                }
                kept.push_abs_slice(&chunk[..part.len()]);
            }
            offset += v.len() as u64;
        }
        let (full, kept) = (full.finish(), kept.finish());
        for (x, what) in [(full, "L1 norm before trimming"), (kept, "L1 norm after trimming")] {
            if is_non_finite(x) {
                return Err(Error::NonFiniteReduction { tensor: tensor_name(scope), what });
            }
        }
        rescale_factor(full, kept)
    } else {
        1.0
    };
    Ok(TiesSelection { threshold, factor })
}

/// What [`merge_element`] needs besides the element: `α₃₂`, `ω = F(RN(1 − α))`, the
/// selection's factor `ρ(D, D')` and its threshold seen from the element's block.
#[derive(Clone, Copy, Debug)]
pub struct ElementMerge {
    pub alpha: f32,
    pub one_minus_alpha: f32,
    pub factor: f32,
    pub local: LocalThreshold,
}

/// One element of an OnTIES merge step, the formula every block kernel runs
/// (SPEC.md §5.3, with the rollback of §5.4 and the decay of §5.5). From the
/// stored `θ`, `Δ_c` (read only when `CACHED`), the update `D` after the rollback
/// and `τ'`, with `j` the element's position in its block, returns `(D', θ')`:
/// `θ₀ = decay_before(F(θ)) ⊖ F(Δ_c)`; `D' = F(D) ⊗ ρ` if the threshold keeps
/// `j`, else `+0`; `θ' = decay_after(θ₀ ⊕ combine(τ', D'))`. `PAPER` picks the
/// variant at compile time, so the loops that call it vectorize.
#[inline(always)]
pub fn merge_element<const TORCH: bool, const CACHED: bool, const PAPER: bool>(s: &StepScalars, e: &ElementMerge, j: u32, theta: f32, cached: f32, d: f32, tau: f32) -> (f32, f32) {
    merge_element_with::<TORCH, CACHED, PAPER, true>(s, e, j, theta, cached, d, tau)
}

/// [`merge_element`], flushed only when `FLUSH` ([`crate::arith::settle`]; the
/// flush-free kernel of [`crate::flushless`]). The threshold compares
/// [`magnitude_key`]s, which flush, and the election compares with zero, where
/// the two zeros agree: alike values (equal, or the two zeros) decide alike.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn merge_element_with<const TORCH: bool, const CACHED: bool, const PAPER: bool, const FLUSH: bool>(s: &StepScalars, e: &ElementMerge, j: u32, theta: f32, cached: f32, d: f32, tau: f32) -> (f32, f32) {
    let theta = adam::decay_before_with::<TORCH, FLUSH>(s, settle::<FLUSH>(theta));
    let theta0 = if CACHED { sub_with::<FLUSH>(theta, settle::<FLUSH>(cached)) } else { theta };
    let d = settle::<FLUSH>(d);
    let sparse = if e.local.keeps(magnitude_key(d), j) { mul_with::<FLUSH>(d, e.factor) } else { 0.0 };
    let u = combine_with::<PAPER, FLUSH>(tau, sparse, e.alpha, e.one_minus_alpha);
    (sparse, adam::decay_after_with::<TORCH, FLUSH>(s, add_with::<FLUSH>(theta0, u)))
}

/// `τ'_i` or `Δ'_i`: the value if the threshold keeps element `index`, else `+0`.
#[inline(always)]
pub fn trim(x: f32, index: u64, threshold: &Threshold) -> f32 {
    let x = flush(x);
    if threshold.keeps(magnitude_key(x), index) { x } else { 0.0 }
}

/// The per-element update `u` (then `θ ← θ ⊕ u`, then weight decay) from the
/// already-trimmed values, `+0` meaning "not kept". `one_minus_alpha` is
/// `F(RN(1 − α))` with `1 − α` in binary64, computed once at validation.
///
/// `reference`: `s = +1` iff `τ' ⊕ Δ' ≥ 0` (so a sum that cancels to zero, or
/// flushes to zero, elects `+1`); `u = (α ⊗ τ')·[sign τ' = s] ⊕ ((1−α) ⊗ Δ')·[sign Δ' = s]`
/// where a zero has no sign and never agrees, and a dropped term is `+0`.
///
/// `paper`: `a = α ⊗ τ'`, `b = (1−α) ⊗ Δ'`. If `a` and `b` are both non-zero with
/// opposite signs, `u` is the one with the larger magnitude, and `max(a, b)` (the
/// positive one) when the magnitudes are equal, the same "`≥ 0` elects `+1`" rule
/// as the reference's election; otherwise `u = a ⊕ b`.
#[inline(always)]
pub fn combine(variant: Variant, tau_sel: f32, delta_sel: f32, alpha: f32, one_minus_alpha: f32) -> f32 {
    match variant {
        Variant::Reference => combine_with::<false, true>(tau_sel, delta_sel, alpha, one_minus_alpha),
        Variant::Paper => combine_with::<true, true>(tau_sel, delta_sel, alpha, one_minus_alpha),
    }
}

/// [`combine`] with the variant fixed at compile time (`PAPER`), flushed only
/// when `FLUSH`.
#[inline(always)]
pub fn combine_with<const PAPER: bool, const FLUSH: bool>(tau_sel: f32, delta_sel: f32, alpha: f32, one_minus_alpha: f32) -> f32 {
    let (add, mul) = (add_with::<FLUSH>, mul_with::<FLUSH>);
    let tau = settle::<FLUSH>(tau_sel);
    let delta = settle::<FLUSH>(delta_sel);
    match if PAPER { Variant::Paper } else { Variant::Reference } {
        Variant::Reference => {
            let positive = add(tau, delta) >= 0.0;
            let a = if tau != 0.0 && (tau > 0.0) == positive { mul(alpha, tau) } else { 0.0 };
            let b = if delta != 0.0 && (delta > 0.0) == positive { mul(one_minus_alpha, delta) } else { 0.0 };
            add(a, b)
        }
        Variant::Paper => {
            let a = mul(alpha, tau);
            let b = mul(one_minus_alpha, delta);
            if (a > 0.0 && b < 0.0) || (a < 0.0 && b > 0.0) {
                // Magnitudes compared on the bits: the order of |x| is the order of its key.
                let (ka, kb) = (magnitude_key(a), magnitude_key(b));
                if ka > kb {
                    a
                } else if kb > ka {
                    b
                } else if a > 0.0 {
                    a
                } else {
                    b
                }
            } else {
                add(a, b)
            }
        }
    }
}

/// The optional L1 rescale of a trimmed tensor (SPEC.md §5.3): every kept value
/// is multiplied by `ρ = ‖x‖₁ ⊘ ‖x'‖₁` (norms over the selection's scope, tree sums
/// of SPEC.md §3.2), or `ρ = 1` when `‖x‖₁ < 1e-8` or nothing non-zero was kept.
pub fn rescale_factor(l1_full: f32, l1_kept: f32) -> f32 {
    if l1_full >= RESCALE_MIN_NORM && l1_kept > 0.0 { div(l1_full, l1_kept) } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::{add, mul, sub};
    use crate::rng::SplitMix64;
    use crate::testutil::wide_f32;

    const R: Variant = Variant::Reference;
    const P: Variant = Variant::Paper;

    fn both(v: Variant, tau: f32, delta: f32, alpha: f32) -> f32 {
        combine(v, tau, delta, alpha, sub(1.0, alpha))
    }

    #[test]
    fn reference_elects_the_sign_of_the_unweighted_sum() {
        let al = 0.25f32;
        let om = 0.75f32;
        // Same sign: both terms.
        assert_eq!(both(R, 0.5, 0.25, al), 0.5 * al + 0.25 * om);
        assert_eq!(both(R, -0.5, -0.25, al), -0.5 * al - 0.25 * om);
        // Opposite signs: the sign of τ' + Δ' wins, whatever the weights.
        assert_eq!(both(R, 0.5, -0.25, al), 0.5 * al);
        assert_eq!(both(R, 0.25, -0.5, al), -0.5 * om);
        assert_eq!(both(R, -0.5, 0.25, al), -0.5 * al);
        // Exact cancellation: the sum is +0, which elects +1.
        assert_eq!(both(R, 0.5, -0.5, al), 0.5 * al);
        assert_eq!(both(R, -0.5, 0.5, al), 0.5 * om);
        // A zero term has no sign and is dropped; the other decides.
        assert_eq!(both(R, 0.0, -0.5, al), -0.5 * om);
        assert_eq!(both(R, -0.5, 0.0, al), -0.5 * al);
        assert_eq!(both(R, 0.0, 0.0, al).to_bits(), 0);
        assert_eq!(both(R, -0.0, -0.0, al).to_bits(), 0);
    }

    #[test]
    fn reference_election_flushes_a_subnormal_sum_to_plus() {
        // 1.5e-38 − 1.6e-38 = −1e-39 is subnormal: F makes it +0, so +1 is elected
        // and τ' survives although |Δ'| is larger.
        let (tau, delta) = (1.5e-38f32, -1.6e-38f32);
        assert!(tau.is_normal() && delta.is_normal());
        assert_eq!(both(R, tau, delta, 1.0).to_bits(), tau.to_bits());
        assert_eq!(both(R, tau, delta, 0.0).to_bits(), 0);
    }

    #[test]
    fn paper_elects_on_the_weighted_terms() {
        // The unweighted sum favours τ', the weighted terms favour Δ': the variants differ.
        let alpha = 1e-7f32;
        let om = sub(1.0, alpha);
        assert_eq!(both(R, 1e-3, -1e-4, alpha), mul(alpha, 1e-3));
        assert_eq!(both(P, 1e-3, -1e-4, alpha), mul(om, -1e-4));
        // Agreeing signs: the sum of the weighted terms, as in the reference.
        assert_eq!(both(P, 1e-3, 1e-4, alpha), add(mul(alpha, 1e-3), mul(om, 1e-4)));
        assert_eq!(both(P, 1e-3, 1e-4, alpha), both(R, 1e-3, 1e-4, alpha));
        // Larger weighted magnitude wins.
        assert_eq!(both(P, -1.0, 1e-8, alpha), mul(alpha, -1.0));
        // Equal magnitudes, opposite signs: the positive term.
        assert_eq!(both(P, 0.5, -0.5, 0.5), 0.25);
        assert_eq!(both(P, -0.5, 0.5, 0.5), 0.25);
        // Zeros.
        assert_eq!(both(P, 0.0, -0.5, 0.5), -0.25);
        assert_eq!(both(P, -0.0, 0.0, 0.5).to_bits(), 0);
        // A weighted term that flushes to zero is a zero: the other is added.
        assert_eq!(both(P, 1e-38, -0.5, 1e-7), mul(sub(1.0, 1e-7), -0.5));
    }

    #[test]
    fn alpha_zero_and_p_one_reduce_the_paper_variant_to_the_update() {
        // With p = 1 nothing is trimmed (τ' = τ, Δ' = Δ); with α = 0 the paper
        // variant's update is Δ bit for bit, so OnTIES-paper reduces to AdamW.
        let mut rng = SplitMix64::new(11);
        for _ in 0..100_000 {
            let (tau, delta) = (wide_f32(&mut rng), wide_f32(&mut rng));
            assert_eq!(both(P, tau, delta, 0.0).to_bits(), delta.to_bits());
            // The reference still elects on τ + Δ, so it only keeps Δ where Δ agrees
            // with that sign: it does NOT reduce to AdamW (the official code does the same).
            let r = both(R, tau, delta, 0.0);
            let s_pos = add(tau, delta) >= 0.0;
            let want = if (delta > 0.0) == s_pos { delta } else { 0.0 };
            assert_eq!(r.to_bits(), want.to_bits(), "tau={tau:e} delta={delta:e}");
        }
    }

    #[test]
    fn trim_keeps_what_the_threshold_keeps() {
        let t = Threshold { key: magnitude_key(2.0), cutoff: 5 };
        assert_eq!(trim(-3.0, 9, &t), -3.0);
        assert_eq!(trim(2.0, 4, &t), 2.0);
        assert_eq!(trim(-2.0, 5, &t).to_bits(), 0);
        assert_eq!(trim(1.0, 0, &t).to_bits(), 0);
        assert_eq!(trim(-1.0e-40, 0, &Threshold::all(1)).to_bits(), 0);
    }

    #[test]
    fn rescale_factor_follows_the_official_guard() {
        assert_eq!(rescale_factor(3.0, 2.0), 1.5);
        assert_eq!(rescale_factor(9e-9, 1e-9), 1.0);
        assert_eq!(rescale_factor(1e-8, 0.5e-8), 2.0);
        assert_eq!(rescale_factor(1.0, 0.0), 1.0);
    }
}
