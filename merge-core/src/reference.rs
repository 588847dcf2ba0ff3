//! The optimizer step of SPEC.md §5 written as plainly as it can be: plain loops
//! over `f32` slices, one element at a time, the formulas in the order the spec
//! states them (in the style of llm.c's `gpt2_update`). No blocks, no generics,
//! no passes, no selection algorithm: the block kernels
//! ([`StepPlan::step_tensors`](crate::optim::StepPlan::step_tensors), and through
//! it `parallel` and the GPU) are tested against this bit for bit.
//!
//! Only SPEC.md §1's operations (`⊕ ⊖ ⊗ ⊘ √` and the flush `F`, [`crate::arith`]),
//! the step's scalars (§1.6, [`crate::hyper`]) and the counter-based generator
//! (§2, [`crate::rng`]'s Threefry and tensor ids) are shared with the kernels;
//! Adam, the masks' keep decision, the tree sum, the top-k threshold, the OnDARE
//! merge and the OnTIES `combine` are written out here again.
//!
//! It validates nothing (SPEC.md §5.6): on inputs a step accepts it computes what
//! that step writes, and it is slow (the tree sums recurse, the threshold is found
//! by bisection over the keys). For tests and for reading, not for training.

// Index loops on purpose: element i of every slice, as the spec writes it.
#![allow(clippy::needless_range_loop)]

use crate::arith::{add, div, flush, mul, sqrt, sub};
use crate::dare::DareVariant;
use crate::error::Error;
use crate::hyper::{AdamForm, StepScalars};
use crate::onties::{TiesSelection, Variant};
use crate::optim::{Merge, OnlineConfig};
use crate::rng::{MaskKey, stream, tensor_id};
use crate::step::{StateMut, StateRef};
use crate::topk::Threshold;

/// Whether step `k` merges (SPEC.md §5.4): `k mod K = 0`.
fn is_merge_step(config: &OnlineConfig, k: u64) -> bool {
    k.is_multiple_of(u64::from(config.k))
}

/// SPEC.md §5.1: `(m', v', Δ)` of one element from its loaded (flushed) `g`, `m`, `v`.
fn adam(s: &StepScalars, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
    let m1 = add(mul(s.beta1, m), mul(s.one_minus_beta1, g));
    let v1 = add(mul(s.beta2, v), mul(s.one_minus_beta2, mul(g, g)));
    let delta = match s.form {
        AdamForm::HuggingFace => mul(s.neg_step_size, div(m1, add(sqrt(v1), s.eps))),
        AdamForm::Torch => mul(s.neg_step_size, div(m1, add(div(sqrt(v1), s.bc2_sqrt), s.eps))),
    };
    (m1, v1, delta)
}

/// `D_i`: the update of element `i` (SPEC.md §5.1), after the step-K rollback on a
/// merge step (`D = Δ ⊕ Δ_c`, §5.4).
fn update_at(s: &StepScalars, merge_step: bool, grad: &[f32], state: &StateRef<'_>, i: usize) -> f32 {
    let (_, _, delta) = adam(s, flush(grad[i]), flush(state.m[i]), flush(state.v[i]));
    let c = state.cached.map_or(0.0, |c| flush(c[i]));
    if merge_step { add(delta, c) } else { delta }
}

/// SPEC.md §2.4: element with uniform `u` is kept with probability `p`.
fn keep(p: f32, u: u32) -> bool {
    p == 1.0 || u64::from(u) < (f64::from(p) * 4_294_967_296.0) as u64
}

/// `min(max(x, −c), c)`.
fn clamp(x: f32, c: f32) -> f32 {
    let x = if x < -c { -c } else { x };
    if x > c { c } else { x }
}

/// `|x|`: the sign bit cleared (SPEC.md §3.2).
fn abs(x: f32) -> f32 {
    f32::from_bits(x.to_bits() & 0x7fff_ffff)
}

/// SPEC.md §3.1: the perfect binary tree over `N = 2^⌈log2 n⌉` leaves (`N = 1` for
/// `n ≤ 1`), leaf `j` is `x(j)` for `j < n` and `+0` after, each node `left ⊕ right`.
fn tree_sum(n: usize, x: &dyn Fn(usize) -> f32) -> f32 {
    fn node(first: usize, leaves: usize, n: usize, x: &dyn Fn(usize) -> f32) -> f32 {
        if leaves == 1 {
            return if first < n { x(first) } else { 0.0 };
        }
        let half = leaves / 2;
        add(node(first, half, n, x), node(first + half, half, n, x))
    }
    let mut leaves = 1;
    while leaves < n {
        leaves *= 2;
    }
    node(0, leaves, n, x)
}

/// `key(x) = bits(F(x)) & 0x7fff_ffff` (SPEC.md §4).
fn key(x: f32) -> u32 {
    flush(x).to_bits() & 0x7fff_ffff
}

/// Element `i` of the concatenation of `parts`.
fn at(parts: &[&[f32]], mut i: usize) -> f32 {
    for part in parts {
        if i < part.len() {
            return part[i];
        }
        i -= part.len();
    }
    unreachable!("index inside the concatenation")
}

/// Writes `D` of one tensor (the update after the rollback on a merge step) into
/// `out`: what OnTIES trims, for [`ties_selection`].
pub fn update(config: &OnlineConfig, k: u64, grad: &[f32], state: StateRef<'_>, out: &mut [f32]) -> Result<(), Error> {
    let s = config.adam.scalars(k)?;
    let merge_step = is_merge_step(config, k);
    for i in 0..grad.len() {
        out[i] = update_at(&s, merge_step, grad, &state, i);
    }
    Ok(())
}

/// The OnTIES selection of SPEC.md §4 and §5.3 over `updates` concatenated (one
/// tensor, or every tensor of the global scope in bytewise name order): the
/// threshold `(T, c)` straight from its definition and, with `rescale`,
/// `ρ(D, D')`; otherwise a factor of 1.
pub fn ties_selection(config: &OnlineConfig, updates: &[&[f32]]) -> Result<TiesSelection, Error> {
    let Merge::Ties(t) = config.merge else {
        return Err(Error::Misuse { what: "an OnTIES configuration (only OnTIES trims the update)" });
    };
    let n: usize = updates.iter().map(|u| u.len()).sum();
    if n == 0 {
        return Ok(TiesSelection { threshold: Threshold::NOTHING, factor: 1.0 });
    }
    // §4.1: p = m·2^−s exactly, k = ⌈m·n / 2^s⌉ clamped to [1, n].
    let p = t.p as f32;
    let bits = p.to_bits();
    let m = u128::from((bits & 0x007f_ffff) | 0x0080_0000);
    let s = 150 - ((bits >> 23) & 0xff);
    let k = ((m * n as u128).div_ceil(1u128 << s) as usize).clamp(1, n);
    // §4.2: T is the k-th largest key: the largest t with #{key ≥ t} ≥ k.
    let at_least = |t: u32| (0..n).filter(|&i| key(at(updates, i)) >= t).count();
    let (mut lo, mut hi) = (0u32, 0x7fff_ffffu32);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if at_least(mid) >= k { lo = mid } else { hi = mid - 1 }
    }
    let big = lo;
    // r ties at T are kept, the lowest indices first; c is one past the r-th.
    let r = k - (0..n).filter(|&i| key(at(updates, i)) > big).count();
    let mut ties = 0;
    let mut cutoff = 0;
    for i in 0..n {
        if key(at(updates, i)) == big {
            ties += 1;
            if ties == r {
                cutoff = i + 1;
                break;
            }
        }
    }
    let threshold = Threshold { key: big, cutoff: cutoff as u64 };
    let mut factor = 1.0;
    if t.rescale {
        // §5.3: ρ = ‖D‖₁ ⊘ ‖D'‖₁ when ‖D‖₁ ≥ RN32(1e-8) and ‖D'‖₁ > 0.
        let kept = |i: usize| {
            let x = flush(at(updates, i));
            let k = key(x);
            if k > big || (k == big && i < cutoff) { x } else { 0.0 }
        };
        let full = tree_sum(n, &|i| abs(at(updates, i)));
        let part = tree_sum(n, &|i| abs(kept(i)));
        if full >= 1e-8f32 && part > 0.0 {
            factor = div(full, part);
        }
    }
    Ok(TiesSelection { threshold, factor })
}

/// OnTIES `combine(τ', D')` (SPEC.md §5.3), both variants.
fn combine(variant: Variant, tau: f32, d: f32, alpha: f32, omega: f32) -> f32 {
    match variant {
        Variant::Reference => {
            let positive = add(tau, d) >= 0.0;
            let agrees = |x: f32| x != 0.0 && (x > 0.0) == positive;
            let a = if agrees(tau) { mul(alpha, tau) } else { 0.0 };
            let b = if agrees(d) { mul(omega, d) } else { 0.0 };
            add(a, b)
        }
        Variant::Paper => {
            let a = mul(alpha, tau);
            let b = mul(omega, d);
            if a != 0.0 && b != 0.0 && (a > 0.0) != (b > 0.0) {
                if key(a) > key(b) {
                    a
                } else if key(b) > key(a) {
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

/// One step `k` (1-based) of one tensor named `name` (SPEC.md §5), in place: `θ`,
/// `m`, `v` and, when given, `Δ_c` (required for `K > 1`; `None` is `+0` for
/// online merging). `tau` is the stored task vector `τ'` as binary32 (unread by
/// plain AdamW and by accumulating steps). On an OnTIES merge step `ties` is the
/// selection over the tensor's scope ([`ties_selection`]) and the tensor's first
/// index in that scope (0 for per-tensor scope).
pub fn step(config: &OnlineConfig, k: u64, name: &str, grad: &[f32], state: StateMut<'_>, tau: &[f32], ties: Option<(TiesSelection, u64)>) -> Result<(), Error> {
    let s = config.adam.scalars(k)?;
    let torch = config.adam.form == AdamForm::Torch;
    let merge_step = is_merge_step(config, k);
    let n = grad.len();
    let StateMut { theta, m, v, mut cached } = state;
    let mask = MaskKey::new(config.seed, tensor_id(name), k as u32);
    let alpha_omega = |alpha: f64| (flush(alpha as f32), flush((1.0 - alpha) as f32));

    // OnDARE: `s`, and with the rescale `r = ‖D‖₁ ⊘ (‖D'‖₁ ⊕ ε)` over the whole
    // tensor (§5.2), from the state before anything is written.
    let mut dare_rescale = None;
    if let (true, Merge::Dare(d)) = (merge_step, config.merge) {
        let p = d.p as f32;
        let scale = if d.variant == DareVariant::Reference { (1.0 / f64::from(p)) as f32 } else { 1.0 };
        if d.rescale {
            let old = StateRef { theta: &*theta, m: &*m, v: &*v, cached: cached.as_deref() };
            let sparse = |i: usize| {
                let kept = keep(p, mask.uniform(i as u32, stream::UPDATE));
                if kept { mul(update_at(&s, true, grad, &old, i), scale) } else { 0.0 }
            };
            let org = tree_sum(n, &|i| abs(update_at(&s, true, grad, &old, i)));
            let new = tree_sum(n, &|i| abs(sparse(i)));
            if org >= 1e-8f32 {
                dare_rescale = Some(div(org, add(new, s.eps)));
            }
        }
    }

    for i in 0..n {
        // Every loaded value passes through F first.
        let g = flush(grad[i]);
        let mut th = flush(theta[i]);
        let c = cached.as_deref().map_or(0.0, |c| flush(c[i]));
        let (m1, v1, delta) = adam(&s, g, flush(m[i]), flush(v[i]));
        m[i] = m1;
        v[i] = v1;
        // §5.5: the torch form decays first.
        if torch {
            th = mul(th, s.decay_before);
        }
        let c1;
        if !merge_step {
            // §5.4, between merges.
            th = add(th, delta);
            c1 = add(c, delta);
        } else {
            // §5.4: roll the plain steps back, merge D, reset Δ_c.
            th = sub(th, c);
            let d = add(delta, c);
            c1 = 0.0;
            match config.merge {
                Merge::None => th = add(th, d),
                Merge::Dare(dare) => {
                    let p = dare.p as f32;
                    let (alpha, omega) = alpha_omega(dare.alpha);
                    let clip = dare.clip as f32;
                    let tau_i = flush(tau[i]);
                    let kept = keep(p, mask.uniform(i as u32, stream::UPDATE));
                    match dare.variant {
                        DareVariant::Reference => {
                            let scale = (1.0 / f64::from(p)) as f32;
                            let mut dp = if kept { mul(d, scale) } else { 0.0 };
                            if let Some(r) = dare_rescale {
                                dp = clamp(mul(dp, r), clip);
                            }
                            th = add(add(th, mul(alpha, tau_i)), mul(omega, dp));
                        }
                        DareVariant::Paper => {
                            let mut dp = if kept { d } else { 0.0 };
                            let tau_kept = if keep(p, mask.uniform(i as u32, stream::TAU_PAPER)) { tau_i } else { 0.0 };
                            if let Some(r) = dare_rescale {
                                dp = clamp(mul(dp, r), clip);
                            }
                            th = add(th, add(mul(alpha, tau_kept), mul(omega, dp)));
                        }
                    }
                }
                Merge::Ties(t) => {
                    let Some((sel, offset)) = ties else {
                        return Err(Error::Misuse { what: "the OnTIES selection of this merge step" });
                    };
                    let (alpha, omega) = alpha_omega(t.alpha);
                    let d = flush(d);
                    let kd = key(d);
                    let index = offset + i as u64;
                    let kept = kd > sel.threshold.key || (kd == sel.threshold.key && index < sel.threshold.cutoff);
                    let mut dp = if kept { d } else { 0.0 };
                    if t.rescale {
                        dp = mul(dp, sel.factor);
                    }
                    th = add(th, combine(t.variant, flush(tau[i]), dp, alpha, omega));
                }
            }
        }
        // §5.5: the Hugging Face form decays last.
        if !torch {
            th = sub(th, mul(s.decay_after, th));
        }
        theta[i] = th;
        if let Some(c) = cached.as_deref_mut() {
            c[i] = c1;
        }
    }
    Ok(())
}
