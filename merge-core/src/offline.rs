//! Offline merges with mergekit's semantics (SPEC.md §6): linear, the generalized
//! task arithmetic family (task arithmetic, TIES, DARE linear, DARE-TIES), SLERP,
//! and the paper's SFT↔RLHF interpolation.
//!
//! Every function works on one chunk of one tensor: `offset` is the index of the
//! chunk's first element in the full tensor, so DARE masks, TIES thresholds and the
//! reported index of a bad value do not depend on how the tensor was cut. Inputs
//! are checked and every result is validated against the output dtype before
//! anything is written to `out`. Sums over models run in model order, left to
//! right, starting from the first term; sums over elements are SPEC.md §3 tree sums.

use core::cell::Cell;

use crate::arith::{add, div, flush, is_non_finite, mul, sqrt, sub};
use crate::dtype::{Dst, Src, write_all};
use crate::error::{Error, tensor_name};
use crate::hyper::invalid;
use crate::reduce::TreeSum;
use crate::rng::{Keep, MaskKey, check_extent, stream, tensor_id};
use crate::topk::{RadixSelect, Threshold, keep_count, magnitude_key};

/// Most models one merge can take: per-model state lives in fixed arrays.
pub const MAX_MODELS: usize = 16;

/// Names of the model inputs in errors (errors carry `&'static str`).
const MODEL_NAMES: [&str; MAX_MODELS] = [
    "model 0 weights", "model 1 weights", "model 2 weights", "model 3 weights",
    "model 4 weights", "model 5 weights", "model 6 weights", "model 7 weights",
    "model 8 weights", "model 9 weights", "model 10 weights", "model 11 weights",
    "model 12 weights", "model 13 weights", "model 14 weights", "model 15 weights",
];

/// A hyperparameter rounded once to binary32 (then `F`); it must stay finite.
fn to_f32(name: &'static str, x: f64) -> Result<f32, Error> {
    let y = x as f32;
    if !x.is_finite() || is_non_finite(y) {
        return Err(invalid(name, x, "a finite binary32 value"));
    }
    Ok(flush(y))
}

fn check_models(name: &str, n: usize, models: &[Src<'_>], params: usize) -> Result<(), Error> {
    if models.is_empty() || models.len() > MAX_MODELS {
        return Err(invalid("number of models", models.len() as f64, "1 to 16 models"));
    }
    if params != models.len() {
        return Err(Error::LengthMismatch {
            tensor: tensor_name(name),
            what: "per-model parameters (one per model)",
            expected: models.len() as u64,
            found: params as u64,
        });
    }
    for (m, src) in models.iter().enumerate() {
        if src.len() != n {
            return Err(Error::LengthMismatch {
                tensor: tensor_name(name),
                what: MODEL_NAMES[m],
                expected: n as u64,
                found: src.len() as u64,
            });
        }
    }
    Ok(())
}

fn check_len(name: &str, what: &'static str, n: usize, src: &Src<'_>) -> Result<(), Error> {
    if src.len() != n {
        return Err(Error::LengthMismatch { tensor: tensor_name(name), what, expected: n as u64, found: src.len() as u64 });
    }
    Ok(())
}

/// Element `j` of `src`, refused if non-finite (`index` is its full-tensor index).
#[inline(always)]
fn load(name: &str, what: &'static str, src: &Src<'_>, j: usize, index: u64) -> Result<f32, Error> {
    let x = src.get(j);
    if is_non_finite(x) {
        return Err(Error::NonFinite { tensor: tensor_name(name), what, index });
    }
    Ok(x)
}

/// Linear merge (mergekit `linear`): `Σ w_i ⊗ x_i`, divided by `Σ w_i` when
/// `normalize` (mergekit's default). Weights are rounded once to binary32; with
/// `normalize` their sum must not be zero.
pub fn linear(
    name: &str,
    offset: u64,
    models: &[Src<'_>],
    weights: &[f64],
    normalize: bool,
    out: &mut Dst<'_>,
) -> Result<(), Error> {
    check_models(name, out.len(), models, weights.len())?;
    let mut w = [0.0f32; MAX_MODELS];
    for (wi, &x) in w.iter_mut().zip(weights) {
        *wi = to_f32("weight", x)?;
    }
    let w = &w[..models.len()];
    let wsum = w[1..].iter().fold(w[0], |acc, &x| add(acc, x));
    if normalize && wsum == 0.0 {
        return Err(invalid("weight", weights[0], "weights whose binary32 sum is not zero (normalize divides by it)"));
    }
    write_all(name, "merged weights", offset, out, |j| {
        let index = offset + j as u64;
        let mut acc = mul(w[0], load(name, MODEL_NAMES[0], &models[0], j, index)?);
        for m in 1..models.len() {
            acc = add(acc, mul(w[m], load(name, MODEL_NAMES[m], &models[m], j, index)?));
        }
        Ok(if normalize { div(acc, wsum) } else { acc })
    })
}

/// The paper's SFT↔RLHF interpolation: `θ = θ_sft ⊕ w ⊗ (θ_rlhf ⊖ θ_sft)`, `w ∈ [0, 1]`
/// (0 gives the SFT model, 1 the RLHF model).
pub fn interpolate(
    name: &str,
    offset: u64,
    sft: Src<'_>,
    rlhf: Src<'_>,
    weight: f64,
    out: &mut Dst<'_>,
) -> Result<(), Error> {
    if !(0.0..=1.0).contains(&weight) {
        return Err(invalid("interpolation weight", weight, "0 <= w <= 1"));
    }
    let w = flush(weight as f32);
    write_pair(name, offset, ("SFT weights", sft), ("RLHF weights", rlhf), out, |s, r| add(s, mul(w, sub(r, s))))
}

/// `out[j] = f(a[j], b[j])` over two inputs of `out`'s length, each labelled for
/// its errors: validated and written as [`write_all`] does.
fn write_pair(
    name: &str,
    offset: u64,
    (what_a, a): (&'static str, Src<'_>),
    (what_b, b): (&'static str, Src<'_>),
    out: &mut Dst<'_>,
    f: impl Fn(f32, f32) -> f32,
) -> Result<(), Error> {
    check_len(name, what_a, out.len(), &a)?;
    check_len(name, what_b, out.len(), &b)?;
    write_all(name, "merged weights", offset, out, |j| {
        let index = offset + j as u64;
        Ok(f(load(name, what_a, &a, j, index)?, load(name, what_b, &b, j, index)?))
    })
}

/// `x` if `keep`, else `+0`, without a branch: DARE's keep decisions and TIES'
/// sign agreements are coin flips a branch predictor cannot learn.
#[inline(always)]
fn kept_or_zero(keep: bool, x: f32) -> f32 {
    f32::from_bits(x.to_bits() & u32::from(keep).wrapping_neg())
}

/// How task vectors are sparsified before they are mixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsify {
    /// Every element kept.
    None,
    /// TIES trim: the `⌈density·n⌉` largest magnitudes kept (SPEC.md §4 tie rule).
    Magnitude,
    /// DARE: kept with probability `density` (SPEC.md §2, stream `2 + model index`,
    /// step 0), kept values multiplied by `RN(1/density)`.
    Random,
}

/// mergekit's generalized task arithmetic: sparsify each task vector, weight it,
/// optionally elect a sign per element and keep only agreeing terms, optionally
/// divide by the (agreeing) weights, scale by `λ`, add to the base.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gta {
    pub sparsify: Sparsify,
    /// TIES sign election ("sum" consensus).
    pub consensus: bool,
    pub normalize: bool,
    pub lambda: f64,
}

impl Gta {
    /// `θ_b + λ Σ w_i τ_i`.
    pub const TASK_ARITHMETIC: Gta = Gta { sparsify: Sparsify::None, consensus: false, normalize: false, lambda: 1.0 };
    /// Trim, elect sign, disjoint mean (mergekit's default `normalize: true`).
    pub const TIES: Gta = Gta { sparsify: Sparsify::Magnitude, consensus: true, normalize: true, lambda: 1.0 };
    /// DARE drop-and-rescale, then task arithmetic.
    pub const DARE_LINEAR: Gta = Gta { sparsify: Sparsify::Random, consensus: false, normalize: false, lambda: 1.0 };
    /// DARE drop-and-rescale, then TIES sign election (mergekit's default `normalize: false`).
    pub const DARE_TIES: Gta = Gta { sparsify: Sparsify::Random, consensus: true, normalize: false, lambda: 1.0 };
}

/// One model's mergekit tensor parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelParams {
    pub weight: f64,
    /// Fraction kept by the sparsification, in `(0, 1]` (ignored by `Sparsify::None`).
    pub density: f64,
}

/// Validates a density; returns it in binary32.
fn density_f32(density: f64) -> Result<f32, Error> {
    let d = density as f32;
    if !(density > 0.0 && density <= 1.0) || d.to_bits() & crate::arith::EXP_MASK == 0 {
        return Err(invalid("density", density, "0 < density <= 1 (a normal binary32 value)"));
    }
    Ok(d)
}

/// Feeds the magnitude keys of the task vector `τ = θ_model ⊖ θ_base` of elements
/// `offset ..` into a top-k select (the TIES trim of one model).
pub fn feed_task_vector(sel: &mut RadixSelect, name: &str, offset: u64, base: Src<'_>, model: Src<'_>) -> Result<(), Error> {
    check_len(name, "model weights", base.len(), &model)?;
    let mut keys = [0u32; 256];
    let mut start = 0usize;
    while start < base.len() {
        let len = (base.len() - start).min(keys.len());
        for (j, key) in keys[..len].iter_mut().enumerate() {
            let i = start + j;
            let index = offset + i as u64;
            let b = load(name, "base weights", &base, i, index)?;
            let m = load(name, "model weights", &model, i, index)?;
            *key = magnitude_key(sub(m, b));
        }
        sel.feed_keys(offset + start as u64, &keys[..len])?;
        start += len;
    }
    Ok(())
}

/// The TIES trim threshold of one model: the `⌈density·n⌉` largest `|θ_model ⊖ θ_base|`
/// over `bases[t]`/`models[t]` concatenated (one tensor for per-tensor scope; the
/// model's tensors in name order for global scope).
pub fn task_vector_threshold(scope: &str, density: f64, bases: &[Src<'_>], models: &[Src<'_>]) -> Result<Threshold, Error> {
    if bases.len() != models.len() {
        return Err(Error::LengthMismatch {
            tensor: tensor_name(scope),
            what: "model tensors (one per base tensor)",
            expected: bases.len() as u64,
            found: models.len() as u64,
        });
    }
    let n: u64 = bases.iter().map(|b| b.len() as u64).sum();
    let k = keep_count("density", density_f32(density)?, n)?;
    let mut sel = RadixSelect::new(scope, n, k)?;
    while sel.pass().is_some() {
        let mut offset = 0u64;
        for (b, m) in bases.iter().zip(models) {
            feed_task_vector(&mut sel, scope, offset, *b, *m)?;
            offset += b.len() as u64;
        }
        sel.finish_pass()?;
    }
    Ok(sel.threshold().unwrap_or(Threshold::NOTHING))
}

#[derive(Clone, Copy, Debug)]
struct ModelPlan {
    weight: f32,
    /// Random: the keep decision and `RN(1/density)`.
    keep: Keep,
    scale: f32,
    /// Magnitude: the trim threshold.
    threshold: Threshold,
}

/// A generalized task arithmetic merge of one tensor with its scalars derived once.
#[derive(Clone, Debug)]
pub struct GtaPlan {
    config: Gta,
    models: heapless::Vec<ModelPlan, MAX_MODELS>,
    lambda: f32,
    /// Without consensus: `Σ w_i`, replaced by 1 when `|Σ w_i| < 1e-8` (mergekit).
    divisor: f32,
    mask_key: MaskKey,
    scope_start: u64,
}

impl GtaPlan {
    /// `name` is the tensor's name (its identity for the DARE masks); `seed` the
    /// user's seed; `thresholds` one TIES trim threshold per model
    /// ([`task_vector_threshold`]) for `Sparsify::Magnitude`, empty otherwise;
    /// `scope_start` the index of the tensor's first element in the trim's scope
    /// (0 for per-tensor scope, the tensor's start in the concatenation for global).
    pub fn new(
        config: &Gta,
        name: &str,
        seed: u64,
        models: &[ModelParams],
        thresholds: &[Threshold],
        scope_start: u64,
    ) -> Result<GtaPlan, Error> {
        if models.is_empty() || models.len() > MAX_MODELS {
            return Err(invalid("number of models", models.len() as f64, "1 to 16 models"));
        }
        let want_thresholds = if config.sparsify == Sparsify::Magnitude { models.len() } else { 0 };
        if thresholds.len() != want_thresholds {
            return Err(Error::LengthMismatch {
                tensor: tensor_name(name),
                what: "TIES thresholds (one per model for magnitude trimming, none otherwise)",
                expected: want_thresholds as u64,
                found: thresholds.len() as u64,
            });
        }
        let lambda = to_f32("lambda", config.lambda)?;
        let mut plans = heapless::Vec::new();
        for (i, m) in models.iter().enumerate() {
            let weight = to_f32("weight", m.weight)?;
            let (keep, scale) = match config.sparsify {
                Sparsify::Random => {
                    let d = density_f32(m.density)?;
                    (Keep::new(d)?, (1.0 / f64::from(d)) as f32)
                }
                Sparsify::Magnitude => {
                    density_f32(m.density)?;
                    (Keep::new(1.0)?, 1.0)
                }
                Sparsify::None => (Keep::new(1.0)?, 1.0),
            };
            if is_non_finite(scale) {
                return Err(invalid("density", m.density, "1/density finite in binary32"));
            }
            let threshold = thresholds.get(i).copied().unwrap_or(Threshold::all(u64::MAX));
            // Capacity is MAX_MODELS and models.len() <= MAX_MODELS was checked.
            let _ = plans.push(ModelPlan { weight, keep, scale, threshold });
        }
        let divisor = {
            let s = plans[1..].iter().fold(plans[0].weight, |acc, p| add(acc, p.weight));
            if f64::from(s).abs() < 1e-8 { 1.0 } else { s }
        };
        Ok(GtaPlan {
            config: *config,
            models: plans,
            lambda,
            divisor,
            mask_key: MaskKey::new(seed, tensor_id(name), 0),
            scope_start,
        })
    }

    /// `τ'_i` of model `m` for element `index`: trimmed, dropped or kept.
    /// `pair` remembers model `m`'s last Threefry block: elements `2k` and `2k + 1`
    /// share one (SPEC.md §2.3), so each block is computed once, not per element.
    #[inline(always)]
    fn sparsified(&self, m: usize, tau: f32, index: u64, pair: &Cell<(u32, [u32; 2])>) -> f32 {
        let p = &self.models[m];
        match self.config.sparsify {
            Sparsify::None => tau,
            Sparsify::Magnitude => {
                kept_or_zero(p.threshold.keeps(magnitude_key(tau), self.scope_start + index), tau)
            }
            Sparsify::Random => {
                // check_extent guarantees index < 2^32, so the block index is below
                // 2^31 and never equals the cache's empty marker, u32::MAX.
                let block = (index >> 1) as u32;
                let (cached, words) = pair.get();
                let words = if cached == block {
                    words
                } else {
                    let w = self.mask_key.pair(block, stream::OFFLINE_BASE + m as u32);
                    pair.set((block, w));
                    w
                };
                kept_or_zero(p.keep.keeps(words[(index & 1) as usize]), mul(tau, p.scale))
            }
        }
    }

    /// Merges one chunk: `offset` is the index of `out[0]` in the full tensor.
    pub fn apply(&self, name: &str, offset: u64, base: Src<'_>, models: &[Src<'_>], out: &mut Dst<'_>) -> Result<(), Error> {
        check_models(name, out.len(), models, self.models.len())?;
        check_len(name, "base weights", out.len(), &base)?;
        if self.config.sparsify == Sparsify::Random {
            check_extent(name, offset, out.len())?;
        }
        let count = models.len();
        let pairs: [Cell<(u32, [u32; 2])>; MAX_MODELS] = core::array::from_fn(|_| Cell::new((u32::MAX, [0; 2])));
        write_all(name, "merged weights", offset, out, |j| {
            let index = offset + j as u64;
            let b = load(name, "base weights", &base, j, index)?;
            let mut x = [0.0f32; MAX_MODELS];
            for m in 0..count {
                let tau = sub(load(name, MODEL_NAMES[m], &models[m], j, index)?, b);
                x[m] = mul(self.models[m].weight, self.sparsified(m, tau, index, &pairs[m]));
            }
            let x = &x[..count];
            let (mixed, divisor) = if self.config.consensus {
                let sum = x[1..].iter().fold(x[0], |acc, &v| add(acc, v));
                let positive = sum >= 0.0;
                // Terms that disagree add +0, which changes no flushed sum; adding
                // it rather than branching keeps the loop free of a branch on the
                // random signs.
                let mut mixed = 0.0f32;
                let mut divisor = 0.0f32;
                for (m, &v) in x.iter().enumerate() {
                    let agrees = v != 0.0 && (v > 0.0) == positive;
                    mixed = add(mixed, kept_or_zero(agrees, v));
                    divisor = add(divisor, kept_or_zero(agrees, self.models[m].weight));
                }
                (mixed, if divisor == 0.0 { 1.0 } else { divisor })
            } else {
                (x[1..].iter().fold(x[0], |acc, &v| add(acc, v)), self.divisor)
            };
            let mixed = if self.config.normalize { div(mixed, divisor) } else { mixed };
            Ok(add(b, mul(self.lambda, mixed)))
        })
    }
}

/// SLERP pass 1 (mergekit `slerp`): the L2 norms of both tensors. Feed every chunk
/// in index order (the norms are streamed tree sums).
#[derive(Clone, Debug)]
pub struct SlerpNorms {
    a: TreeSum,
    b: TreeSum,
}

/// SLERP pass 2: the dot product of the normalized tensors.
#[derive(Clone, Debug)]
pub struct SlerpDot {
    norm_a: f32,
    norm_b: f32,
    dot: TreeSum,
}

/// The SLERP result scalars: `θ = s0 ⊗ a ⊕ s1 ⊗ b`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlerpScalars {
    pub s0: f32,
    pub s1: f32,
    /// The tensors were (anti)parallel, `|dot| > 0.9995`: `s0 = 1 ⊖ t`, `s1 = t`.
    pub lerp: bool,
}

/// mergekit's `normalize`: divide by the norm only when it exceeds `1e-8`.
fn normalizer(norm: f32) -> f32 {
    if f64::from(norm) > 1e-8 { norm } else { 1.0 }
}

impl Default for SlerpNorms {
    fn default() -> Self {
        Self::new()
    }
}

impl SlerpNorms {
    pub const fn new() -> SlerpNorms {
        SlerpNorms { a: TreeSum::new(), b: TreeSum::new() }
    }

    pub fn feed(&mut self, name: &str, offset: u64, a: Src<'_>, b: Src<'_>) -> Result<(), Error> {
        check_len(name, "second model's weights", a.len(), &b)?;
        for j in 0..a.len() {
            let index = offset + j as u64;
            let x = load(name, "first model's weights", &a, j, index)?;
            let y = load(name, "second model's weights", &b, j, index)?;
            self.a.push(mul(x, x));
            self.b.push(mul(y, y));
        }
        Ok(())
    }

    /// `‖a‖ = √tree_sum(a_i ⊗ a_i)`, likewise `‖b‖`.
    pub fn finish(&self, name: &str) -> Result<SlerpDot, Error> {
        let (na, nb) = (sqrt(self.a.finish()), sqrt(self.b.finish()));
        if is_non_finite(na) || is_non_finite(nb) {
            return Err(Error::NonFiniteReduction { tensor: tensor_name(name), what: "SLERP L2 norm" });
        }
        Ok(SlerpDot { norm_a: normalizer(na), norm_b: normalizer(nb), dot: TreeSum::new() })
    }
}

impl SlerpDot {
    pub fn feed(&mut self, name: &str, offset: u64, a: Src<'_>, b: Src<'_>) -> Result<(), Error> {
        check_len(name, "second model's weights", a.len(), &b)?;
        for j in 0..a.len() {
            let index = offset + j as u64;
            let x = load(name, "first model's weights", &a, j, index)?;
            let y = load(name, "second model's weights", &b, j, index)?;
            self.dot.push(mul(div(x, self.norm_a), div(y, self.norm_b)));
        }
        Ok(())
    }

    /// The scalars for interpolation factor `t ∈ [0, 1]`, computed once in binary64
    /// with fdlibm's `acos` and `sin` (Rust's `libm`), each rounded once to binary32.
    pub fn finish(&self, name: &str, t: f64) -> Result<SlerpScalars, Error> {
        if !(0.0..=1.0).contains(&t) {
            return Err(invalid("t (SLERP factor)", t, "0 <= t <= 1"));
        }
        let dot = self.dot.finish();
        if is_non_finite(dot) {
            return Err(Error::NonFiniteReduction { tensor: tensor_name(name), what: "SLERP dot product" });
        }
        let d = f64::from(dot);
        let t32 = flush(t as f32);
        if d.abs() > 0.9995 {
            return Ok(SlerpScalars { s0: sub(1.0, t32), s1: t32, lerp: true });
        }
        // Every use of t takes its binary32 value, as the GPU receives it.
        let t = f64::from(t32);
        let theta0 = libm::acos(d);
        let sin0 = libm::sin(theta0);
        let theta_t = theta0 * t;
        let s0 = flush((libm::sin(theta0 - theta_t) / sin0) as f32);
        let s1 = flush((libm::sin(theta_t) / sin0) as f32);
        Ok(SlerpScalars { s0, s1, lerp: false })
    }
}

/// SLERP pass 3: `θ = s0 ⊗ a ⊕ s1 ⊗ b` on the original (unnormalized) tensors.
pub fn slerp_apply(name: &str, offset: u64, a: Src<'_>, b: Src<'_>, s: &SlerpScalars, out: &mut Dst<'_>) -> Result<(), Error> {
    write_pair(name, offset, ("first model's weights", a), ("second model's weights", b), out, |x, y| add(mul(s.s0, x), mul(s.s1, y)))
}

/// SLERP of a whole in-memory tensor: the three passes in one call.
pub fn slerp(name: &str, a: Src<'_>, b: Src<'_>, t: f64, out: &mut Dst<'_>) -> Result<SlerpScalars, Error> {
    let mut norms = SlerpNorms::new();
    norms.feed(name, 0, a, b)?;
    let mut dot = norms.finish(name)?;
    dot.feed(name, 0, a, b)?;
    let s = dot.finish(name, t)?;
    slerp_apply(name, 0, a, b, &s, out)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::rng::SplitMix64;
    use std::vec::Vec;

    fn f(xs: &[f32]) -> Src<'_> {
        Src::F32(xs)
    }

    fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.uniform_f32(1.0)).collect()
    }

    /// Runs `merge` over random chunk boundaries and returns the concatenated output.
    fn chunked(rng: &mut SplitMix64, n: usize, merge: impl Fn(usize, usize, &mut [f32])) -> Vec<f32> {
        let mut out = std::vec![0.0f32; n];
        let mut start = 0;
        while start < n {
            let len = 1 + (rng.next_u32() as usize % 37).min(n - start - 1);
            merge(start, len, &mut out[start..start + len]);
            start += len;
        }
        out
    }

    fn bits(xs: &[f32]) -> Vec<u32> {
        xs.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn linear_weights_and_normalization() {
        let a = [1.0f32, -2.0, 4.0];
        let b = [3.0f32, 2.0, 0.0];
        let mut out = [0.0f32; 3];
        linear("w", 0, &[f(&a), f(&b)], &[0.25, 0.75], true, &mut Dst::F32(&mut out)).unwrap();
        assert_eq!(out, [2.5, 1.0, 1.0]);
        // Σw = 2: normalize divides by it.
        linear("w", 0, &[f(&a), f(&b)], &[1.0, 1.0], true, &mut Dst::F32(&mut out)).unwrap();
        assert_eq!(out, [2.0, 0.0, 2.0]);
        linear("w", 0, &[f(&a), f(&b)], &[1.0, 1.0], false, &mut Dst::F32(&mut out)).unwrap();
        assert_eq!(out, [4.0, 0.0, 4.0]);
        // Weight 1 on one model returns it bit for bit.
        let mut rng = SplitMix64::new(21);
        let x = random(&mut rng, 500);
        let mut y = std::vec![0.0f32; 500];
        linear("w", 0, &[f(&x)], &[1.0], true, &mut Dst::F32(&mut y)).unwrap();
        assert_eq!(bits(&x), bits(&y));
        assert!(matches!(
            linear("w", 0, &[f(&a), f(&b)], &[1.0, -1.0], true, &mut Dst::F32(&mut out)),
            Err(Error::InvalidHyperparameter { name: "weight", .. })
        ));
    }

    #[test]
    fn interpolation_between_sft_and_rlhf() {
        let s = [1.0f32, -1.0, 0.5];
        let r = [3.0f32, 1.0, 0.5];
        let mut out = [0.0f32; 3];
        interpolate("w", 0, f(&s), f(&r), 0.25, &mut Dst::F32(&mut out)).unwrap();
        assert_eq!(out, [1.5, -0.5, 0.5]);
        interpolate("w", 0, f(&s), f(&r), 0.0, &mut Dst::F32(&mut out)).unwrap();
        assert_eq!(out, s);
        interpolate("w", 0, f(&s), f(&r), 1.0, &mut Dst::F32(&mut out)).unwrap();
        assert_eq!(out, r);
        assert!(matches!(
            interpolate("w", 0, f(&s), f(&r), 1.5, &mut Dst::F32(&mut out)),
            Err(Error::InvalidHyperparameter { name: "interpolation weight", .. })
        ));
    }

    fn gta(config: &Gta, base: &[f32], models: &[&[f32]], params: &[ModelParams], seed: u64) -> Vec<f32> {
        let srcs: Vec<Src<'_>> = models.iter().map(|m| f(m)).collect();
        let thresholds: Vec<Threshold> = if config.sparsify == Sparsify::Magnitude {
            models.iter().zip(params).map(|(m, p)| task_vector_threshold("w", p.density, &[f(base)], &[f(m)]).unwrap()).collect()
        } else {
            Vec::new()
        };
        let plan = GtaPlan::new(config, "w", seed, params, &thresholds, 0).unwrap();
        let mut out = std::vec![0.0f32; base.len()];
        plan.apply("w", 0, f(base), &srcs, &mut Dst::F32(&mut out)).unwrap();
        out
    }

    fn mp(weight: f64, density: f64) -> ModelParams {
        ModelParams { weight, density }
    }

    #[test]
    fn task_arithmetic_adds_weighted_task_vectors() {
        let base = [1.0f32, 1.0, 1.0];
        let m0 = [2.0f32, 0.0, 1.0]; // τ0 = [1, -1, 0]
        let m1 = [1.0f32, 3.0, 0.0]; // τ1 = [0, 2, -1]
        let out = gta(&Gta::TASK_ARITHMETIC, &base, &[&m0, &m1], &[mp(0.5, 1.0), mp(0.25, 1.0)], 0);
        assert_eq!(out, [1.5, 1.0, 0.75]);
        let cfg = Gta { lambda: 2.0, ..Gta::TASK_ARITHMETIC };
        assert_eq!(gta(&cfg, &base, &[&m0, &m1], &[mp(0.5, 1.0), mp(0.25, 1.0)], 0), [2.0, 1.0, 0.5]);
        // normalize: divide by Σw = 0.75.
        let cfg = Gta { normalize: true, ..Gta::TASK_ARITHMETIC };
        let out = gta(&cfg, &base, &[&m0, &m1], &[mp(0.5, 1.0), mp(0.25, 1.0)], 0);
        assert_eq!(out, [add(1.0, div(0.5, 0.75)), 1.0, add(1.0, div(-0.25, 0.75))]);
    }

    #[test]
    fn ties_trims_elects_and_takes_the_disjoint_mean() {
        let base = [0.0f32; 6];
        // Task vectors equal the models (base 0). Density 0.5 keeps 3 of 6 per model.
        let m0 = [4.0f32, -1.0, 3.0, 0.5, -2.0, 0.25]; // keeps 4, 3, -2
        let m1 = [-1.0f32, 5.0, -6.0, 0.1, 1.0, 0.2]; // keeps 5, -6, 1
        let m2 = [2.0f32, -3.0, 0.0, 1.0, 0.0, 0.0]; // keeps 2, -3, 1 (index 3)
        let p = [mp(1.0, 0.5), mp(1.0, 0.5), mp(1.0, 0.5)];
        let out = gta(&Gta::TIES, &base, &[&m0, &m1, &m2], &p, 0);
        // 0: trimmed [4, 0, 2] → sum + → mean of 4, 2 = 3
        // 1: [0, 5, -3] → + → 5
        // 2: [3, -6, 0] → − → -6
        // 3: [0, 0, 1] → + → 1
        // 4: [-2, 1, 0] → − → -2
        // 5: [0, 0, 0] → nothing agrees, divisor 1 → 0
        assert_eq!(out, [3.0, 5.0, -6.0, 1.0, -2.0, 0.0]);
        // Weights enter the election and the mean: with weights (1, 3, 1) at index 1,
        // [0, 15, -3] → + → 15 / 3.
        let p = [mp(1.0, 0.5), mp(3.0, 0.5), mp(1.0, 0.5)];
        let out = gta(&Gta::TIES, &base, &[&m0, &m1, &m2], &p, 0);
        assert_eq!(out[1], 5.0);
        // index 2: [3, -18, 0] → −: -18 / 3 = -6; index 0: [4, 0, 2] → 6 / 2 = 3
        assert_eq!(out[0], 3.0);
        assert_eq!(out[2], -6.0);
        // Without normalize: the sum of agreeing weighted terms.
        let cfg = Gta { normalize: false, ..Gta::TIES };
        assert_eq!(gta(&cfg, &base, &[&m0, &m1, &m2], &p, 0)[0], 6.0);
        // An exact cancellation elects +.
        let out = gta(&Gta::TIES, &[0.0], &[&[1.0], &[-1.0]], &[mp(1.0, 1.0), mp(1.0, 1.0)], 0);
        assert_eq!(out, [1.0]);
    }

    #[test]
    fn dare_with_density_one_is_task_arithmetic_and_ties() {
        let mut rng = SplitMix64::new(22);
        let base = random(&mut rng, 777);
        let m0 = random(&mut rng, 777);
        let m1 = random(&mut rng, 777);
        let p = [mp(0.7, 1.0), mp(-0.2, 1.0)];
        let ta = gta(&Gta::TASK_ARITHMETIC, &base, &[&m0, &m1], &p, 5);
        assert_eq!(bits(&gta(&Gta::DARE_LINEAR, &base, &[&m0, &m1], &p, 5)), bits(&ta));
        let ties = gta(&Gta::TIES, &base, &[&m0, &m1], &p, 5);
        let dare_ties = gta(&Gta { normalize: true, ..Gta::DARE_TIES }, &base, &[&m0, &m1], &p, 5);
        assert_eq!(bits(&dare_ties), bits(&ties));
    }

    #[test]
    fn dare_drops_with_the_offline_streams_and_rescales() {
        let n = 1 << 16;
        let base = std::vec![0.0f32; n];
        let m0 = std::vec![1.0f32; n];
        let m1 = std::vec![-1.0f32; n];
        let p = [mp(1.0, 0.25), mp(1.0, 0.5)];
        let out = gta(&Gta::DARE_LINEAR, &base, &[&m0, &m1], &p, 9);
        let key = MaskKey::new(9, tensor_id("w"), 0);
        let (k0, k1) = (Keep::new(0.25).unwrap(), Keep::new(0.5).unwrap());
        let mut kept0 = 0;
        for (i, &o) in out.iter().enumerate() {
            let a = k0.keeps(key.uniform(i as u32, stream::OFFLINE_BASE));
            let b = k1.keeps(key.uniform(i as u32, stream::OFFLINE_BASE + 1));
            let want = add(if a { 4.0 } else { 0.0 }, if b { -2.0 } else { 0.0 });
            assert_eq!(o, want, "element {i}");
            kept0 += a as usize;
        }
        // Keep fraction near the density (six standard deviations of a binomial).
        let (mean, sd) = (n as f64 * 0.25, libm::sqrt(n as f64 * 0.25 * 0.75));
        assert!((kept0 as f64 - mean).abs() < 6.0 * sd);
        // Another seed or tensor name draws other masks.
        assert_ne!(bits(&gta(&Gta::DARE_LINEAR, &base, &[&m0, &m1], &p, 10)), bits(&out));
    }

    #[test]
    fn every_merge_is_chunk_invariant() {
        let mut rng = SplitMix64::new(23);
        let n = 1000;
        let base = random(&mut rng, n);
        let ms: Vec<Vec<f32>> = (0..3).map(|_| random(&mut rng, n)).collect();
        let p = [mp(0.5, 0.3), mp(0.3, 0.6), mp(0.2, 0.9)];
        for config in [Gta::TASK_ARITHMETIC, Gta::TIES, Gta::DARE_LINEAR, Gta::DARE_TIES] {
            let refs: Vec<&[f32]> = ms.iter().map(|m| m.as_slice()).collect();
            let whole = gta(&config, &base, &refs, &p, 77);
            let thresholds: Vec<Threshold> = if config.sparsify == Sparsify::Magnitude {
                ms.iter().zip(&p).map(|(m, q)| task_vector_threshold("w", q.density, &[f(&base)], &[f(m)]).unwrap()).collect()
            } else {
                Vec::new()
            };
            let plan = GtaPlan::new(&config, "w", 77, &p, &thresholds, 0).unwrap();
            let parts = chunked(&mut rng, n, |s, l, out| {
                let srcs: Vec<Src<'_>> = ms.iter().map(|m| f(&m[s..s + l])).collect();
                plan.apply("w", s as u64, f(&base[s..s + l]), &srcs, &mut Dst::F32(out)).unwrap();
            });
            assert_eq!(bits(&parts), bits(&whole), "{config:?}");
        }
        let mut whole = std::vec![0.0f32; n];
        linear("w", 0, &[f(&ms[0]), f(&ms[1])], &[0.3, 0.9], true, &mut Dst::F32(&mut whole)).unwrap();
        let parts = chunked(&mut rng, n, |s, l, out| {
            linear("w", s as u64, &[f(&ms[0][s..s + l]), f(&ms[1][s..s + l])], &[0.3, 0.9], true, &mut Dst::F32(out)).unwrap();
        });
        assert_eq!(bits(&parts), bits(&whole));
    }

    #[test]
    fn global_scope_trims_over_the_concatenation() {
        // Two tensors, one model: density 0.5 over 8 elements keeps the 4 largest of
        // all 8, which may all lie in one tensor.
        let (b0, b1) = ([0.0f32; 4], [0.0f32; 4]);
        let (m0, m1) = ([1.0f32, 2.0, 3.0, 4.0], [10.0f32, 20.0, 0.5, 30.0]);
        let t = task_vector_threshold("<global>", 0.5, &[f(&b0), f(&b1)], &[f(&m0), f(&m1)]).unwrap();
        let params = [mp(1.0, 0.5)];
        let cfg = Gta { normalize: false, ..Gta::TIES };
        let mut o0 = [0.0f32; 4];
        let mut o1 = [0.0f32; 4];
        GtaPlan::new(&cfg, "a", 0, &params, &[t], 0).unwrap().apply("a", 0, f(&b0), &[f(&m0)], &mut Dst::F32(&mut o0)).unwrap();
        GtaPlan::new(&cfg, "b", 0, &params, &[t], 4).unwrap().apply("b", 0, f(&b1), &[f(&m1)], &mut Dst::F32(&mut o1)).unwrap();
        assert_eq!(o0, [0.0, 0.0, 0.0, 4.0]);
        assert_eq!(o1, [10.0, 20.0, 0.0, 30.0]);
    }

    #[test]
    fn slerp_follows_mergekit() {
        // Orthogonal unit vectors: θ0 = π/2, halfway both weights are sin(π/4).
        let a = [1.0f32, 0.0];
        let b = [0.0f32, 1.0];
        let mut out = [0.0f32; 2];
        let s = slerp("w", f(&a), f(&b), 0.5, &mut Dst::F32(&mut out)).unwrap();
        let h = core::f64::consts::FRAC_1_SQRT_2 as f32;
        assert!(!s.lerp);
        assert_eq!((s.s0, s.s1), (h, h));
        assert_eq!(out, [h, h]);
        // Norms do not matter for the angle, only for the result.
        let a2 = [4.0f32, 0.0];
        slerp("w", f(&a2), f(&b), 0.5, &mut Dst::F32(&mut out)).unwrap();
        assert_eq!(out, [mul(h, 4.0), h]);
        // t = 0 and t = 1 return the end points.
        let mut rng = SplitMix64::new(24);
        let x = random(&mut rng, 300);
        let y = random(&mut rng, 300);
        let mut o = std::vec![0.0f32; 300];
        assert!(!slerp("w", f(&x), f(&y), 0.0, &mut Dst::F32(&mut o)).unwrap().lerp);
        assert_eq!(bits(&o), bits(&x));
        slerp("w", f(&x), f(&y), 1.0, &mut Dst::F32(&mut o)).unwrap();
        assert_eq!(bits(&o), bits(&y));
        // Parallel vectors: lerp with 1 ⊖ t and t.
        let c = [1.0f32, 2.0];
        let d = [2.0f32, 4.0];
        let s = slerp("w", f(&c), f(&d), 0.25, &mut Dst::F32(&mut out)).unwrap();
        assert!(s.lerp);
        assert_eq!(out, [1.25, 2.5]);
        assert!(matches!(
            slerp("w", f(&c), f(&d), -0.1, &mut Dst::F32(&mut out)),
            Err(Error::InvalidHyperparameter { .. })
        ));
    }

    #[test]
    fn bad_inputs_are_named() {
        let a = [1.0f32, f32::NAN, 2.0, f32::INFINITY];
        let b = [1.0f32, 1.0, f32::INFINITY, 1.0];
        let mut out = [7.0f32; 4];
        let e = linear("layer.w", 10, &[f(&b), f(&a)], &[1.0, 1.0], false, &mut Dst::F32(&mut out)).unwrap_err();
        assert_eq!(
            e,
            Error::NonFinite { tensor: tensor_name("layer.w"), what: "model 1 weights", index: 11 }
        );
        // Nothing was written.
        assert_eq!(out, [7.0; 4]);
        let e = interpolate("t", 0, f(&b), f(&a[..3]), 0.5, &mut Dst::F32(&mut out)).unwrap_err();
        assert!(matches!(e, Error::LengthMismatch { what: "SFT weights", .. } | Error::LengthMismatch { what: "RLHF weights", .. }));
        // Overflow of the output dtype names the element.
        let big = [3.0e38f32, 1.0];
        let mut o16 = [0u16; 2];
        let e = linear("t", 0, &[f(&big), f(&big)], &[1.0, 1.0], false, &mut Dst::Bf16(&mut o16)).unwrap_err();
        assert!(matches!(e, Error::NonFinite { index: 0, .. } | Error::StorageOverflow { index: 0, .. }));
        // Hyperparameters.
        let p = [mp(1.0, 0.0)];
        assert!(matches!(GtaPlan::new(&Gta::DARE_LINEAR, "t", 0, &p, &[], 0), Err(Error::InvalidHyperparameter { name: "density", .. })));
        let p = [mp(f64::NAN, 0.5)];
        assert!(matches!(GtaPlan::new(&Gta::TASK_ARITHMETIC, "t", 0, &p, &[], 0), Err(Error::InvalidHyperparameter { name: "weight", .. })));
        let p = [mp(1.0, 0.5)];
        assert!(matches!(GtaPlan::new(&Gta::TIES, "t", 0, &p, &[], 0), Err(Error::LengthMismatch { .. })));
        assert!(matches!(
            GtaPlan::new(&Gta { lambda: f64::INFINITY, ..Gta::TASK_ARITHMETIC }, "t", 0, &p, &[], 0),
            Err(Error::InvalidHyperparameter { name: "lambda", .. })
        ));
        assert!(matches!(linear("t", 0, &[], &[], true, &mut Dst::F32(&mut out)), Err(Error::InvalidHyperparameter { .. })));
        // DARE masks address at most 2^32 elements.
        let plan = GtaPlan::new(&Gta::DARE_LINEAR, "t", 0, &p, &[], 0).unwrap();
        let one = [1.0f32];
        assert!(matches!(
            plan.apply("t", 1 << 32, f(&one), &[f(&one)], &mut Dst::F32(&mut out[..1])),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn bf16_models_merge_through_binary32() {
        // bf16 inputs are widened exactly, merged in binary32, rounded once on store.
        let a: Vec<u16> = [1.0f32, 2.0, -3.0].iter().map(|x| (x.to_bits() >> 16) as u16).collect();
        let b: Vec<u16> = [3.0f32, 2.0, 1.0].iter().map(|x| (x.to_bits() >> 16) as u16).collect();
        let mut out = [0u16; 3];
        linear("t", 0, &[Src::Bf16(&a), Src::Bf16(&b)], &[0.5, 0.5], false, &mut Dst::Bf16(&mut out)).unwrap();
        let got: Vec<f32> = out.iter().map(|&h| f32::from_bits(u32::from(h) << 16)).collect();
        assert_eq!(got, [2.0, 2.0, -1.0]);
    }
}
