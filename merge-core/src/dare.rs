//! OnDARE (SPEC.md §5.2): hyperparameters, the once-computed task vector `τ'`, and
//! the per-element merge, in the `reference` variant (what the official code does)
//! and the `paper` variant (the equations as printed).

use crate::arith::{add_with, is_non_finite, mul_with, sub};
use crate::dtype::{Dst, Src, write_all};
use crate::error::{Error, tensor_name};
use crate::hyper::invalid;
use crate::rng::{Keep, MaskKey, check_extent, stream, tensor_id};

/// Which OnDARE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DareVariant {
    /// The official code: `τ' = clamp(τ ⊙ M_ref / p, ±c)` once; each step
    /// `Δ' = Δ ⊙ M_k / p`; `θ ← (θ + α τ') + (1−α) Δ'`.
    Reference,
    /// The paper's equations: no `1/p`, no clamp of `τ`, a fresh mask of `τ` every
    /// step (stream 1), `θ ← θ + (α τ̃ + (1−α) Δ̃)`.
    Paper,
}

/// OnDARE hyperparameters as the user gives them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DareConfig {
    pub variant: DareVariant,
    /// Reserve (keep) rate `p ∈ (0, 1]`.
    pub p: f64,
    /// Merge weight `α ∈ [0, 1]`.
    pub alpha: f64,
    /// L1 rescale of the sparsified update (then clamp to `±clip`).
    pub rescale: bool,
    /// Clip value `c > 0` (the official default is 1).
    pub clip: f64,
}

impl Default for DareConfig {
    /// The paper's defaults: `p = 0.01`, `α = 1e-7`, no rescale, clip 1.
    fn default() -> Self {
        DareConfig { variant: DareVariant::Reference, p: 0.01, alpha: 1e-7, rescale: false, clip: 1.0 }
    }
}

/// The binary32 scalars OnDARE needs, derived once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DareParams {
    pub variant: DareVariant,
    pub keep: Keep,
    /// Reference: `s = RN(1/p)` (multiplied, as `F.dropout` does); paper: 1.
    pub scale: f32,
    /// `α₃₂ = F(RN(α))`.
    pub alpha: f32,
    /// `F(RN(1 − α))`, `1 − α` taken in binary64.
    pub one_minus_alpha: f32,
    pub clip: f32,
    pub rescale: bool,
}

/// Validates `p` (shared with OnTIES): `0 < p <= 1` in binary64 and after rounding.
pub(crate) fn validate_p(p: f64) -> Result<f32, Error> {
    let p32 = p as f32;
    if !(p > 0.0 && p <= 1.0 && p32 > 0.0) {
        return Err(invalid("p (reserve rate)", p, "0 < p <= 1 (and p >= 2^-149 in binary32)"));
    }
    Ok(p32)
}

/// Validates `α` (shared with OnTIES) and returns `(F(RN(α)), F(RN(1 − α)))`,
/// `1 − α` taken in binary64 (SPEC.md §5.3).
pub(crate) fn validate_alpha(alpha: f64) -> Result<(f32, f32), Error> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(invalid("alpha", alpha, "0 <= alpha <= 1"));
    }
    Ok((crate::arith::flush(alpha as f32), crate::arith::flush((1.0 - alpha) as f32)))
}

impl DareConfig {
    pub fn params(&self) -> Result<DareParams, Error> {
        let p32 = validate_p(self.p)?;
        let (alpha, one_minus_alpha) = validate_alpha(self.alpha)?;
        let clip = self.clip as f32;
        if !(self.clip > 0.0 && clip.is_finite() && clip.to_bits() & crate::arith::EXP_MASK != 0) {
            return Err(invalid("clip", self.clip, "> 0 and a normal finite binary32 value"));
        }
        let scale = match self.variant {
            DareVariant::Reference => {
                let s = (1.0 / f64::from(p32)) as f32;
                if !s.is_finite() {
                    return Err(invalid("p (reserve rate)", self.p, "1/p finite in binary32 (p > 2^-128)"));
                }
                s
            }
            DareVariant::Paper => 1.0,
        };
        Ok(DareParams {
            variant: self.variant,
            keep: Keep::new(p32)?,
            scale,
            alpha,
            one_minus_alpha,
            clip,
            rescale: self.rescale,
        })
    }
}

/// `min(max(x, −c), c)`.
#[inline(always)]
pub fn clamp(x: f32, c: f32) -> f32 {
    let lo = if x < -c { -c } else { x };
    if lo > c { c } else { lo }
}

/// Reference-variant update sparsification: `Δ' = Δ ⊗ s` if kept, else `+0`.
#[inline(always)]
pub fn sparsify(d: f32, kept: bool, scale: f32) -> f32 {
    sparsify_with::<true>(d, kept, scale)
}

/// Reference merge (the official code's two in-place adds): `(θ ⊕ α⊗τ') ⊕ ω⊗Δ'`.
#[inline(always)]
pub fn merge_reference(theta: f32, tau: f32, d: f32, alpha: f32, omega: f32) -> f32 {
    merge_reference_with::<true>(theta, tau, d, alpha, omega)
}

/// Paper merge: `θ ⊕ ((α⊗τ̃) ⊕ (ω⊗Δ̃))`.
#[inline(always)]
pub fn merge_paper(theta: f32, tau: f32, d: f32, alpha: f32, omega: f32) -> f32 {
    merge_paper_with::<true>(theta, tau, d, alpha, omega)
}

/// [`sparsify`], flushed only when `FLUSH` ([`crate::arith::settle`]).
#[inline(always)]
pub fn sparsify_with<const FLUSH: bool>(d: f32, kept: bool, scale: f32) -> f32 {
    if kept { mul_with::<FLUSH>(d, scale) } else { 0.0 }
}

/// [`merge_reference`], flushed only when `FLUSH`.
#[inline(always)]
pub fn merge_reference_with<const FLUSH: bool>(theta: f32, tau: f32, d: f32, alpha: f32, omega: f32) -> f32 {
    let (add, mul) = (add_with::<FLUSH>, mul_with::<FLUSH>);
    add(add(theta, mul(alpha, tau)), mul(omega, d))
}

/// [`merge_paper`], flushed only when `FLUSH`.
#[inline(always)]
pub fn merge_paper_with<const FLUSH: bool>(theta: f32, tau: f32, d: f32, alpha: f32, omega: f32) -> f32 {
    let (add, mul) = (add_with::<FLUSH>, mul_with::<FLUSH>);
    add(theta, add(mul(alpha, tau), mul(omega, d)))
}

/// Computes the stored task vector of one tensor (SPEC.md §5.2): reference
/// `τ' = clamp(τ ⊗ s, ±c)` where kept by `M_ref` (step 0, stream 0), else `+0`;
/// paper `τ' = τ`; with `τ = θ_sft ⊖ θ_base`. The whole tensor is validated
/// before anything is written to `out`.
pub fn init_tau(params: &DareParams, seed: u64, name: &str, base: Src<'_>, sft: Src<'_>, out: &mut Dst<'_>) -> Result<(), Error> {
    let n = out.len();
    for (what, len) in [("base weights", base.len()), ("SFT weights", sft.len())] {
        if len != n {
            return Err(Error::LengthMismatch { tensor: tensor_name(name), what, expected: n as u64, found: len as u64 });
        }
    }
    check_extent(name, 0, n)?;
    let key = MaskKey::new(seed, tensor_id(name), 0);
    let value = |i: usize| -> Result<f32, Error> {
        let (b, s) = (base.get(i), sft.get(i));
        if is_non_finite(b) {
            return Err(Error::NonFinite { tensor: tensor_name(name), what: "base weights", index: i as u64 });
        }
        if is_non_finite(s) {
            return Err(Error::NonFinite { tensor: tensor_name(name), what: "SFT weights", index: i as u64 });
        }
        let tau = sub(s, b);
        let t = match params.variant {
            DareVariant::Reference => {
                let kept = params.keep.keeps(key.uniform(i as u32, stream::UPDATE));
                clamp(sparsify(tau, kept, params.scale), params.clip)
            }
            DareVariant::Paper => tau,
        };
        if is_non_finite(t) {
            return Err(Error::NonFinite { tensor: tensor_name(name), what: "task vector (SFT - base)", index: i as u64 });
        }
        Ok(t)
    };
    write_all(name, "task vector", 0, out, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_validate_and_derive() {
        let p = DareConfig::default().params().unwrap();
        assert_eq!(p.scale, (1.0 / f64::from(0.01f32)) as f32);
        assert_eq!(p.one_minus_alpha, (1.0 - 1e-7f64) as f32);
        assert_eq!(DareConfig { variant: DareVariant::Paper, ..DareConfig::default() }.params().unwrap().scale, 1.0);
        let bad = [
            (DareConfig { p: 0.0, ..DareConfig::default() }, "p (reserve rate)"),
            (DareConfig { p: 1.01, ..DareConfig::default() }, "p (reserve rate)"),
            (DareConfig { p: 1e-300, ..DareConfig::default() }, "p (reserve rate)"),
            (DareConfig { p: 1e-40, ..DareConfig::default() }, "p (reserve rate)"),
            (DareConfig { alpha: -0.1, ..DareConfig::default() }, "alpha"),
            (DareConfig { alpha: f64::NAN, ..DareConfig::default() }, "alpha"),
            (DareConfig { clip: 0.0, ..DareConfig::default() }, "clip"),
            (DareConfig { clip: f64::INFINITY, ..DareConfig::default() }, "clip"),
        ];
        for (c, want) in bad {
            match c.params() {
                Err(Error::InvalidHyperparameter { name, .. }) => assert_eq!(name, want, "{c:?}"),
                other => panic!("{c:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn clamp_and_sparsify_edges() {
        assert_eq!(clamp(3.0, 1.0), 1.0);
        assert_eq!(clamp(-3.0, 1.0), -1.0);
        assert_eq!(clamp(0.5, 1.0), 0.5);
        assert_eq!(sparsify(2.0, false, 100.0).to_bits(), 0);
        assert_eq!(sparsify(2.0, true, 100.0), 200.0);
        // A product that underflows is flushed to +0, not kept as a subnormal.
        assert_eq!(sparsify(-1e-30, true, 1e-10).to_bits(), 0);
    }

    #[test]
    fn init_tau_reference_masks_scales_and_clamps() {
        let params = DareConfig { p: 0.5, clip: 1.5, ..DareConfig::default() }.params().unwrap();
        let base = [0.0f32, 1.0, -2.0, 0.25, 4.0, 0.0, 1.0, 1.0];
        let sft = [1.0f32, 1.5, -2.0, -0.5, 0.0, 1e-3, 1.0, 3.0];
        let mut out = [9.0f32; 8];
        init_tau(&params, 5, "w", Src::F32(&base), Src::F32(&sft), &mut Dst::F32(&mut out)).unwrap();
        let key = MaskKey::new(5, tensor_id("w"), 0);
        for i in 0..8 {
            let tau = sft[i] - base[i];
            let kept = key.uniform(i as u32, 0) < (1u32 << 31);
            let want = if kept { (tau * 2.0).clamp(-1.5, 1.5) + 0.0 } else { 0.0 };
            assert_eq!(out[i].to_bits(), want.to_bits(), "i={i}");
        }
    }

    #[test]
    fn init_tau_refuses_bad_input_and_writes_nothing() {
        let params = DareConfig { variant: DareVariant::Paper, ..DareConfig::default() }.params().unwrap();
        let base = [0.0f32, 0.0, f32::NAN, f32::INFINITY];
        let sft = [1.0f32, 1.0, 1.0, 1.0];
        let mut out = [7.0f32; 4];
        let err = init_tau(&params, 1, "layer.w", Src::F32(&base), Src::F32(&sft), &mut Dst::F32(&mut out)).unwrap_err();
        assert_eq!(err, Error::NonFinite { tensor: tensor_name("layer.w"), what: "base weights", index: 2 });
        assert_eq!(out, [7.0; 4]);
        // A value that overflows binary16 storage.
        let base = [0.0f32, -60000.0];
        let sft = [0.0f32, 60000.0];
        let mut out16 = [0u16; 2];
        let err = init_tau(&params, 1, "e", Src::F32(&base), Src::F32(&sft), &mut Dst::F16(&mut out16)).unwrap_err();
        assert!(matches!(err, Error::StorageOverflow { index: 1, .. }), "{err:?}");
        assert_eq!(out16, [0, 0]);
        let err = init_tau(&params, 1, "e", Src::F32(&base[..1]), Src::F32(&sft), &mut Dst::F16(&mut out16)).unwrap_err();
        assert!(matches!(err, Error::LengthMismatch { what: "base weights", .. }));
    }
}
