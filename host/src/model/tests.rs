//! Finite-difference gradient checks for every layer and for the whole model,
//! plus consistency checks between the training forward, the KV-cache forward
//! and generation.
//!
//! The objective is always a random linear functional of the outputs, summed in
//! f64; central differences in f32 with step 1e-2..1e-3 leave noise around 1e-4
//! relative, so the tolerances below are a few times that and a wrong term in a
//! backward (a missing factor, a transposed index) fails by orders of magnitude.

use super::layers::{self, AttnShape, Rope};
use super::*;
use crate::params::ParamSet;

fn rand_vec(rng: &mut SplitMix64, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.next_normal() * scale) as f32).collect()
}

fn functional(r: &[f32], y: &[f32]) -> f64 {
    r.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Compares `grad` with central differences of `f` at `x`: along a random
/// direction over all elements, and at the three largest-gradient coordinates.
fn check_grad(what: &str, x: &[f32], grad: &[f32], eps: f32, tol: f64, f: &dyn Fn(&[f32]) -> f64) {
    check_grad_floor(what, x, grad, eps, tol, 1e-2, f)
}

/// [`check_grad`] where errors are judged relative to at least `floor`: the
/// whole-model objective sums f32 log-probs of size ~30, so differences of it
/// carry absolute noise near 1e-3 that tiny gradients cannot be checked below.
fn check_grad_floor(what: &str, x: &[f32], grad: &[f32], eps: f32, tol: f64, floor: f64, f: &dyn Fn(&[f32]) -> f64) {
    let mut rng = SplitMix64::new(0x5eed ^ x.len() as u64);
    let dir: Vec<f32> = (0..x.len()).map(|_| if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 }).collect();
    let shifted = |s: f32| -> Vec<f32> { x.iter().zip(&dir).map(|(&a, &d)| a + s * d).collect() };
    let numeric = (f(&shifted(eps)) - f(&shifted(-eps))) / (2.0 * eps as f64);
    let analytic: f64 = grad.iter().zip(&dir).map(|(&g, &d)| g as f64 * d as f64).sum();
    let scale = analytic.abs().max(numeric.abs()).max(floor);
    assert!(
        (numeric - analytic).abs() <= tol * scale,
        "{what}: directional derivative analytic {analytic:.6e} vs numeric {numeric:.6e}"
    );
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
    for &i in order.iter().take(3) {
        let mut xp = x.to_vec();
        xp[i] += eps;
        let mut xm = x.to_vec();
        xm[i] -= eps;
        let numeric = (f(&xp) - f(&xm)) / (2.0 * eps as f64);
        let analytic = grad[i] as f64;
        let scale = analytic.abs().max(numeric.abs()).max(floor);
        assert!(
            (numeric - analytic).abs() <= tol * scale,
            "{what}[{i}]: analytic {analytic:.6e} vs numeric {numeric:.6e}"
        );
    }
}

#[test]
fn linear_gradients() {
    let (t, ic, oc) = (5, 12, 7);
    let mut rng = SplitMix64::new(1);
    let x = rand_vec(&mut rng, t * ic, 1.0);
    let w = rand_vec(&mut rng, oc * ic, 0.5);
    let b = rand_vec(&mut rng, oc, 0.5);
    let r = rand_vec(&mut rng, t * oc, 1.0);
    let run = |x: &[f32], w: &[f32], b: &[f32]| {
        let mut y = vec![0f32; t * oc];
        layers::linear_forward(&mut y, x, layers::Weight::Hf(w), Some(b), ic, oc, 1);
        functional(&r, &y)
    };
    let (mut dx, mut dw, mut db) = (vec![0f32; t * ic], vec![0f32; oc * ic], vec![0f32; oc]);
    layers::linear_backward(Some(&mut dx), &mut dw, &r, &x, &w, ic, oc, 1);
    layers::bias_backward(&mut db, &r);
    check_grad("linear dx", &x, &dx, 1e-2, 1e-3, &|v| run(v, &w, &b));
    check_grad("linear dw", &w, &dw, 1e-2, 1e-3, &|v| run(&x, v, &b));
    check_grad("linear db", &b, &db, 1e-2, 1e-3, &|v| run(&x, &w, v));
}

#[test]
fn linear_forward_rows_agree_across_blocking() {
    // Rows computed in the four-row block and in the remainder loop must round
    // identically, or the KV-cache forward would drift from the training forward.
    let (ic, oc) = (19, 6);
    let mut rng = SplitMix64::new(2);
    let x = rand_vec(&mut rng, 7 * ic, 1.0);
    let w = rand_vec(&mut rng, oc * ic, 1.0);
    let mut all = vec![0f32; 7 * oc];
    layers::linear_forward(&mut all, &x, layers::Weight::Hf(&w), None, ic, oc, 1);
    for t in 0..7 {
        let mut one = vec![0f32; oc];
        layers::linear_forward(&mut one, &x[t * ic..(t + 1) * ic], layers::Weight::Hf(&w), None, ic, oc, 1);
        assert_eq!(one, all[t * oc..(t + 1) * oc], "row {t}");
    }
}

/// (rows, n, n_src) of the product tests: widths that leave tails at every
/// vector size, and 2.3M multiply-adds, above the threading threshold; 13 rows
/// fill a tall fused tile, a tile of four and a single row; the inner dimension
/// ends in a partial group of four.
const PRODUCT_SHAPE: (usize, usize, usize) = (13, 4 * 64 + 37, 603);

/// The products' cache blocking, and one that cuts [`PRODUCT_SHAPE`] into runs
/// of 64 terms (the last a partial group of four), runs of 8 rows, chunks of
/// one run for the packed coefficients, and groups of two tiles.
const BLOCKINGS: [layers::Blocking; 2] = [layers::Blocking::CACHES, layers::Blocking { k: 64, rows: 8, panel_bytes: 16 << 10, coef_bytes: 2 << 10 }];

/// The product tests' source (values of mixed magnitude, so that reassociation
/// would show), the same operand stored as [n, n_src] (how weights are kept) and
/// read as its transpose, and the coefficients.
fn product_operands(seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (rows, n, n_src) = PRODUCT_SHAPE;
    let mut rng = SplitMix64::new(seed);
    let src: Vec<f32> = (0..n * n_src).map(|i| (rng.next_normal() * if i % 7 == 0 { 1e3 } else { 1e-2 }) as f32).collect();
    let coef = rand_vec(&mut rng, rows * n_src, 1.0);
    let src_t = layers::transpose(&src, n, n_src);
    (src, src_t, coef)
}

#[test]
fn matrix_products_give_the_same_bits_at_every_vector_level() {
    let (rows, n, n_src) = PRODUCT_SHAPE;
    let (src, src_t, coef) = product_operands(3);
    let run = |level: simd::Level, blocking: layers::Blocking, threads: usize, src: layers::Src<'_>| {
        let mut out = vec![0.5f32; rows * n];
        layers::accumulate_rows_at(level, simd::Math::Portable, blocking, &mut out, n, src, n_src, threads, layers::Coefs::rows(&coef, n_src));
        out
    };
    let reference = run(simd::Level::Baseline, layers::Blocking::CACHES, 1, layers::Src::Rows(&src));
    let levels: Vec<_> = simd::Level::ALL.into_iter().filter(|&l| l <= simd::detected()).collect();
    for &level in &levels {
        for blocking in BLOCKINGS {
            for threads in [1, 2, 3] {
                for (layout, src) in [("rows", layers::Src::Rows(&src)), ("columns", layers::Src::Cols(&src_t))] {
                    let out = run(level, blocking, threads, src);
                    let same = out.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{} {blocking:?} with {threads} threads from {layout} differs from the baseline", level.name());
                }
            }
        }
    }
    // what the test covered, in the test log: on a CPU without AVX-512 only the
    // narrower copies can run here
    println!("compared levels: {:?}", levels);
}

#[test]
fn fused_products_are_one_fma_per_term_at_every_fused_level() {
    let (rows, n, n_src) = PRODUCT_SHAPE;
    let (src, src_t, coef) = product_operands(4);
    // the coefficients also as [n_src, rows], read transposed (as a weight's gradient reads dy)
    let coef_t = layers::transpose(&coef, n_src, rows);
    let run_with = |level: simd::Level, math: simd::Math, blocking: layers::Blocking, threads: usize, src: layers::Src<'_>, coefs: layers::Coefs<'_>| {
        let mut out = vec![0.5f32; rows * n];
        layers::accumulate_rows_at(level, math, blocking, &mut out, n, src, n_src, threads, coefs);
        out
    };
    let run = |level, math, blocking, threads, src| run_with(level, math, blocking, threads, src, layers::Coefs::rows(&coef, n_src));
    // the definition, element by element: y ← fma(a, x, y) for k ascending
    let mut expected = vec![0.5f32; rows * n];
    for r in 0..rows {
        for c in 0..n {
            let y = &mut expected[r * n + c];
            for k in 0..n_src {
                *y = coef[r * n_src + k].mul_add(src[k * n + c], *y);
            }
        }
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let portable = run(simd::Level::Baseline, simd::Math::Portable, layers::Blocking::CACHES, 1, layers::Src::Rows(&src));
    assert_ne!(bits(&portable), bits(&expected), "the inputs should tell fused from portable rounding");
    let mut fused_levels = Vec::new();
    for level in simd::Level::ALL.into_iter().filter(|&l| l <= simd::detected()) {
        // a level without a fused kernel (or a CPU without FMA) keeps the portable bits
        let want = if simd::fuses_at(level) { &expected } else { &portable };
        for blocking in BLOCKINGS {
            for threads in [1, 2, 3] {
                for (layout, src) in [("rows", layers::Src::Rows(&src)), ("columns", layers::Src::Cols(&src_t))] {
                    let out = run(level, simd::Math::Fused, blocking, threads, src);
                    assert!(bits(&out) == bits(want), "{} fused {blocking:?} with {threads} threads from {layout}", level.name());
                    let out = run_with(level, simd::Math::Fused, blocking, threads, src, layers::Coefs::cols(&coef_t, rows));
                    assert!(bits(&out) == bits(want), "{} fused {blocking:?} with {threads} threads from {layout}, coefficients transposed", level.name());
                }
            }
        }
        if simd::fuses_at(level) {
            fused_levels.push(level);
        }
    }
    println!("fused levels compared with the fma definition: {fused_levels:?}");
}

/// SPEC §10's attention as plain loops, one (position, head) row at a time and
/// in the order the SPEC fixes: the definition the tiled and blocked kernels
/// must match bit for bit. Returns `out, dq, dk, dv`.
fn attention_by_definition(q: &[f32], k: &[f32], v: &[f32], dout: &[f32], s: AttnShape) -> [Vec<f32>; 4] {
    let (nh, nkv, hd, tq) = (s.heads, s.kv_heads, s.head_dim, s.tq);
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let row = |x: &[f32], at: usize| x[at * hd..(at + 1) * hd].to_vec();
    let (mut out, mut dq) = (vec![0f32; tq * nh * hd], vec![0f32; tq * nh * hd]);
    let (mut dk, mut dv) = (vec![0f32; tq * nkv * hd], vec![0f32; tq * nkv * hd]);
    let mut probs = vec![Vec::new(); tq * nh];
    for t in 0..tq {
        for h in 0..nh {
            let (g, qr) = (h / group, row(q, t * nh + h));
            let scores: Vec<f32> = (0..=t).map(|j| layers::dot(&qr, &row(k, j * nkv + g)) * scale).collect();
            let mx = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let e: Vec<f32> = scores.iter().map(|&x| crate::model::math::exp_f32(x - mx)).collect();
            let inv = 1.0 / e.iter().fold(0f32, |a, &x| a + x);
            let p: Vec<f32> = e.iter().map(|&x| x * inv).collect();
            for (j, &pj) in p.iter().enumerate() {
                layers::axpy(&mut out[(t * nh + h) * hd..(t * nh + h + 1) * hd], pj, &row(v, j * nkv + g));
            }
            probs[t * nh + h] = p;
        }
    }
    // the backward's order: key/value head, position, head, key
    for g in 0..nkv {
        for t in 0..tq {
            for h in g * group..(g + 1) * group {
                let (p, dor, qr) = (&probs[t * nh + h], row(dout, t * nh + h), row(q, t * nh + h));
                let dp: Vec<f32> = (0..=t).map(|j| layers::dot(&dor, &row(v, j * nkv + g))).collect();
                let pdp = p.iter().zip(&dp).fold(0f32, |a, (&pj, &dpj)| a + pj * dpj);
                for (j, &pj) in p.iter().enumerate() {
                    layers::axpy(&mut dv[(j * nkv + g) * hd..(j * nkv + g + 1) * hd], pj, &dor);
                }
                for j in 0..=t {
                    let ds = p[j] * (dp[j] - pdp) * scale;
                    if ds != 0.0 {
                        layers::axpy(&mut dq[(t * nh + h) * hd..(t * nh + h + 1) * hd], ds, &row(k, j * nkv + g));
                        layers::axpy(&mut dk[(j * nkv + g) * hd..(j * nkv + g + 1) * hd], ds, &qr);
                    }
                }
            }
        }
    }
    [out, dq, dk, dv]
}

#[test]
fn attention_gives_the_definitions_bits_at_every_vector_level_and_from_either_tape() {
    // Long enough for the vector levels' blocks of keys and the backward's tiles
    // of positions, with tails of keys and of dimensions (36 and 68 are not
    // multiples of 8 and 16), grouped queries.
    for (heads, kv_heads, head_dim, tq) in [(4, 2, 40, 9), (4, 2, 68, 37), (3, 1, 36, 21), (2, 2, 64, 16), (2, 1, 64, 70)] {
        let s = AttnShape { heads, kv_heads, head_dim, pos0: 0, tq };
        let (qd, kvd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let mut rng = SplitMix64::new(4);
        let q = rand_vec(&mut rng, s.tq * qd, 3.0);
        let k = rand_vec(&mut rng, s.tq * kvd, 3.0);
        let v = rand_vec(&mut rng, s.tq * kvd, 1.0);
        let dout = rand_vec(&mut rng, s.tq * qd, 1.0);
        let bits = |t: &[f32]| t.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let reference = attention_by_definition(&q, &k, &v, &dout, s).map(|t| bits(&t));
        // Both tapes: the kept weights, and the row statistics the backward
        // recomputes them from, which must give the same bits.
        for level in simd::Level::ALL.into_iter().filter(|&l| l <= simd::detected()) {
            for (tape, mut saved) in [("probabilities", layers::AttnSaved::probs(s)), ("row statistics", layers::AttnSaved::row_stats(s))] {
                let mut out = vec![0f32; s.tq * qd];
                layers::attention_forward_at(level, &mut out, Some(&mut saved), &q, &k, &v, s);
                let (mut dq, mut dk, mut dv) = (vec![0f32; s.tq * qd], vec![0f32; s.tq * kvd], vec![0f32; s.tq * kvd]);
                layers::attention_backward_at(level, &mut dq, &mut dk, &mut dv, &dout, &saved, &q, &k, &v, s);
                for (name, (got, want)) in ["out", "dq", "dk", "dv"].iter().zip([out, dq, dk, dv].iter().zip(&reference)) {
                    assert!(&bits(got) == want, "{name} at {} from {tape} differs from the definition ({heads}/{kv_heads} heads of {head_dim}, {tq} positions)", level.name());
                }
            }
        }
    }
}

#[test]
fn attention_leaves_out_the_terms_whose_score_gradient_is_zero() {
    // With dout zero every ds is +0: the definition leaves those terms out of
    // dq and dk, which so keep a -0.0 they started from, while dv takes its
    // p · 0 terms and becomes +0.0. Bit for bit at every level, with whole
    // vectors of dimensions (64) and tails (36).
    for (heads, kv_heads, head_dim, tq) in [(2, 1, 64, 40), (3, 1, 36, 21)] {
        let s = AttnShape { heads, kv_heads, head_dim, pos0: 0, tq };
        let (qd, kvd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let mut rng = SplitMix64::new(9);
        let (q, k, v) = (rand_vec(&mut rng, s.tq * qd, 3.0), rand_vec(&mut rng, s.tq * kvd, 3.0), rand_vec(&mut rng, s.tq * kvd, 1.0));
        let dout = vec![0f32; s.tq * qd];
        for level in simd::Level::ALL.into_iter().filter(|&l| l <= simd::detected()) {
            let mut saved = layers::AttnSaved::probs(s);
            let mut out = vec![0f32; s.tq * qd];
            layers::attention_forward_at(level, &mut out, Some(&mut saved), &q, &k, &v, s);
            let (mut dq, mut dk, mut dv) = (vec![-0f32; s.tq * qd], vec![-0f32; s.tq * kvd], vec![-0f32; s.tq * kvd]);
            layers::attention_backward_at(level, &mut dq, &mut dk, &mut dv, &dout, &saved, &q, &k, &v, s);
            let all = |t: &[f32], bits: u32| t.iter().all(|x| x.to_bits() == bits);
            assert!(all(&dq, 0x8000_0000) && all(&dk, 0x8000_0000), "dq or dk took a zero term at {} ({head_dim} dims)", level.name());
            assert!(all(&dv, 0), "dv left out a term at {} ({head_dim} dims)", level.name());
        }
    }
}

#[test]
fn embedding_gradients() {
    let (v, c) = (6, 4);
    let tokens = [3u32, 1, 3, 0, 5];
    let mut rng = SplitMix64::new(3);
    let table = rand_vec(&mut rng, v * c, 1.0);
    let r = rand_vec(&mut rng, tokens.len() * c, 1.0);
    let run = |tab: &[f32]| {
        let mut x = vec![0f32; tokens.len() * c];
        layers::embedding_forward(&mut x, &tokens, tab, c);
        functional(&r, &x)
    };
    let mut dt = vec![0f32; v * c];
    layers::embedding_backward(&mut dt, &r, &tokens, c);
    check_grad("embedding", &table, &dt, 1e-2, 1e-3, &run);
    // rows of tokens that never occur get nothing
    assert!(dt[2 * c..3 * c].iter().all(|&g| g == 0.0));
}

#[test]
fn rmsnorm_gradients() {
    let (t, c) = (4, 10);
    let eps = 1e-5;
    let mut rng = SplitMix64::new(4);
    let x = rand_vec(&mut rng, t * c, 1.0);
    let w = rand_vec(&mut rng, c, 1.0);
    let r = rand_vec(&mut rng, t * c, 1.0);
    let run = |x: &[f32], w: &[f32]| {
        let (mut y, mut rs) = (vec![0f32; t * c], vec![0f32; t]);
        layers::rmsnorm_forward(&mut y, &mut rs, x, w, eps, c);
        functional(&r, &y)
    };
    let (mut y, mut rs) = (vec![0f32; t * c], vec![0f32; t]);
    layers::rmsnorm_forward(&mut y, &mut rs, &x, &w, eps, c);
    let (mut dx, mut dw) = (vec![0f32; t * c], vec![0f32; c]);
    layers::rmsnorm_backward(&mut dx, &mut dw, &r, &x, &w, &rs, c);
    check_grad("rmsnorm dx", &x, &dx, 1e-3, 5e-3, &|v| run(v, &w));
    check_grad("rmsnorm dw", &w, &dw, 1e-2, 1e-3, &|v| run(&x, v));
}

#[test]
fn rope_gradients_and_convention() {
    let (t, heads, hd) = (5, 3, 8);
    let rope = Rope::new(hd, 10000.0, RopeScaling::None, 0, t);
    let mut rng = SplitMix64::new(5);
    let x = rand_vec(&mut rng, t * heads * hd, 1.0);
    let r = rand_vec(&mut rng, x.len(), 1.0);
    let run = |x: &[f32]| {
        let mut y = x.to_vec();
        layers::rope_forward(&mut y, &rope, heads);
        functional(&r, &y)
    };
    let mut dx = r.clone();
    layers::rope_backward(&mut dx, &rope, heads);
    check_grad("rope", &x, &dx, 1e-2, 1e-3, &run);

    // HF rotate_half: at position 1, element 0 pairs with element hd/2 and
    // rotates by angle 1 rad (inv_freq of pair 0 is 1).
    let mut v = vec![0f32; t * heads * hd];
    v[heads * hd] = 1.0; // position 1, head 0, element 0
    layers::rope_forward(&mut v, &rope, heads);
    let base = heads * hd;
    assert!((v[base] - 1f32.cos()).abs() < 1e-6);
    assert!((v[base + hd / 2] - 1f32.sin()).abs() < 1e-6);
    assert!(v[base + 1] == 0.0);
}

fn attention_case(heads: usize, kv_heads: usize) {
    let (t, hd) = (6, 4);
    let s = AttnShape {
        heads,
        kv_heads,
        head_dim: hd,
        pos0: 0,
        tq: t,
    };
    let mut rng = SplitMix64::new(6 + heads as u64 * 10 + kv_heads as u64);
    let q = rand_vec(&mut rng, t * heads * hd, 1.0);
    let k = rand_vec(&mut rng, t * kv_heads * hd, 1.0);
    let v = rand_vec(&mut rng, t * kv_heads * hd, 1.0);
    let r = rand_vec(&mut rng, t * heads * hd, 1.0);
    let run = |q: &[f32], k: &[f32], v: &[f32]| {
        let mut out = vec![0f32; t * heads * hd];
        layers::attention_forward(&mut out, None, q, k, v, s);
        functional(&r, &out)
    };
    let mut out = vec![0f32; t * heads * hd];
    let mut saved = layers::AttnSaved::probs(s);
    layers::attention_forward(&mut out, Some(&mut saved), &q, &k, &v, s);
    let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
    layers::attention_backward(&mut dq, &mut dk, &mut dv, &r, &saved, &q, &k, &v, s);
    let tag = format!("attention {heads}/{kv_heads}");
    check_grad(&format!("{tag} dq"), &q, &dq, 1e-2, 2e-3, &|x| run(x, &k, &v));
    check_grad(&format!("{tag} dk"), &k, &dk, 1e-2, 2e-3, &|x| run(&q, x, &v));
    check_grad(&format!("{tag} dv"), &v, &dv, 1e-2, 2e-3, &|x| run(&q, &k, x));
}

#[test]
fn attention_gradients_multi_head() {
    attention_case(2, 2);
}

#[test]
fn attention_gradients_grouped_query() {
    attention_case(4, 2);
    attention_case(3, 1);
}

#[test]
fn attention_is_causal() {
    let (t, hd) = (5, 4);
    let s = AttnShape {
        heads: 1,
        kv_heads: 1,
        head_dim: hd,
        pos0: 0,
        tq: t,
    };
    let mut rng = SplitMix64::new(7);
    let q = rand_vec(&mut rng, t * hd, 1.0);
    let k = rand_vec(&mut rng, t * hd, 1.0);
    let mut v = rand_vec(&mut rng, t * hd, 1.0);
    let mut a = vec![0f32; t * hd];
    layers::attention_forward(&mut a, None, &q, &k, &v, s);
    v[(t - 1) * hd] += 10.0; // the last value only reaches the last query
    let mut b = vec![0f32; t * hd];
    layers::attention_forward(&mut b, None, &q, &k, &v, s);
    assert_eq!(a[..(t - 1) * hd], b[..(t - 1) * hd]);
    assert_ne!(a[(t - 1) * hd..], b[(t - 1) * hd..]);
}

#[test]
fn swiglu_gradients() {
    let n = 20;
    let mut rng = SplitMix64::new(8);
    let g = rand_vec(&mut rng, n, 2.0);
    let u = rand_vec(&mut rng, n, 1.0);
    let r = rand_vec(&mut rng, n, 1.0);
    let run = |g: &[f32], u: &[f32]| {
        let mut h = vec![0f32; n];
        layers::swiglu_forward(&mut h, g, u);
        functional(&r, &h)
    };
    let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
    layers::swiglu_backward(&mut dg, &mut du, &r, &g, &u);
    check_grad("swiglu dgate", &g, &dg, 1e-2, 1e-3, &|x| run(x, &u));
    check_grad("swiglu dup", &u, &du, 1e-2, 1e-3, &|x| run(&g, x));
}

/// The exponentials vectorize at each level; the bits are the baseline's.
#[test]
fn swiglu_and_log_softmax_give_the_same_bits_at_every_vector_level() {
    let mut rng = SplitMix64::new(10);
    // Odd lengths: tails of every vector width and of the log-softmax's runs.
    for n in [1usize, 7, 61, 1000] {
        let g = rand_vec(&mut rng, n, 4.0);
        let u = rand_vec(&mut rng, n, 1.0);
        let dh = rand_vec(&mut rng, n, 1.0);
        let logits = rand_vec(&mut rng, n, 8.0);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        let run = |level| {
            let mut h = vec![0f32; n];
            layers::swiglu_forward_at(level, &mut h, &g, &u);
            let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
            layers::swiglu_backward_at(level, &mut dg, &mut du, &dh, &g, &u);
            let mut p = vec![0f32; n];
            let lp = layers::log_softmax_row_at(level, &logits, n / 2, &mut p);
            (bits(&h), bits(&dg), bits(&du), bits(&p), lp.to_bits())
        };
        let baseline = run(simd::Level::Baseline);
        for level in simd::Level::ALL.into_iter().filter(|&l| l <= simd::detected()) {
            assert!(run(level) == baseline, "{} differs from the baseline ({n} elements)", level.name());
        }
    }
}

#[test]
fn log_softmax_gradients() {
    let v = 9;
    let mut rng = SplitMix64::new(9);
    let logits = rand_vec(&mut rng, v, 2.0);
    let run = |l: &[f32]| {
        let mut p = vec![0f32; v];
        layers::log_softmax_row(l, 4, &mut p) as f64 * -0.7
    };
    let mut p = vec![0f32; v];
    let lp = layers::log_softmax_row(&logits, 4, &mut p);
    let direct = {
        let m = logits.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
        logits[4] as f64 - m - logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    };
    assert!((lp as f64 - direct).abs() < 1e-6);
    let mut d = vec![0f32; v];
    layers::log_softmax_backward(&mut d, &p, 4, -0.7);
    check_grad("log_softmax", &logits, &d, 1e-2, 1e-3, &run);
}

// ------------------------------------------------------------ whole model

fn tiny(family: Family, tied: bool, attention_bias: bool, heads: usize, kv_heads: usize) -> LlamaConfig {
    let mut c = LlamaConfig::tiny(11, 8, 12, 2, heads, kv_heads);
    c.family = family;
    c.tie_word_embeddings = tied;
    c.attention_bias = attention_bias;
    c.rms_norm_eps = 1e-6;
    c
}

fn batch() -> Vec<Sequence> {
    vec![
        Sequence::full(vec![1, 5, 2, 9, 3, 3, 7]),
        Sequence::completion(&[4, 0, 10], &[6, 2, 8]),
        Sequence::completion(&[2], &[5]),
    ]
}

/// Every tensor of the model: analytic gradient of `Σ_b c_b logp_b` against
/// finite differences of the whole forward.
fn model_case(cfg: LlamaConfig, what: &str) {
    let mut model = LlamaModel::init(cfg, 42).unwrap();
    // random norms and biases, so their gradients are generic, not at 1 and 0
    let mut rng = SplitMix64::new(77);
    for t in &mut model.params.tensors {
        if t.name.ends_with(".bias") || t.name.ends_with("norm.weight") {
            let base = if t.name.ends_with(".bias") { 0.0 } else { 1.0 };
            for x in &mut t.data {
                *x = base + (rng.next_normal() * 0.3) as f32;
            }
        } else {
            // larger weights than init so every path carries signal
            for x in &mut t.data {
                *x *= 15.0;
            }
        }
    }
    let seqs = batch();
    let coefs = [0.8f32, -1.3, 0.5];
    let fwd = model.forward(&seqs).unwrap();
    let mut grads = model.zero_grads();
    model.backward(&fwd, &coefs, &mut grads).unwrap();
    let params = model.params.clone();
    let objective = |name: &str, data: &[f32]| -> f64 {
        let mut p = params.clone();
        p.get_mut(name).unwrap().data.copy_from_slice(data);
        let m = LlamaModel::from_params(model.config.clone(), p).unwrap();
        let lps = m.sequence_logps(&seqs).unwrap();
        lps.iter().zip(&coefs).map(|(&l, &c)| l as f64 * c as f64).sum()
    };
    for (t, g) in params.tensors.iter().zip(&grads.tensors) {
        assert!(g.data.iter().any(|&x| x != 0.0), "{what}: gradient of {} is all zero", t.name);
        check_grad_floor(&format!("{what}: {}", t.name), &t.data, &g.data, 2e-3, 2e-2, 0.1, &|v| objective(&t.name, v));
    }
}

#[test]
fn model_gradients_untied_gqa() {
    model_case(tiny(Family::Llama, false, false, 4, 2), "llama untied gqa");
}

#[test]
fn model_gradients_tied() {
    model_case(tiny(Family::Llama, true, false, 2, 2), "llama tied");
}

#[test]
fn model_gradients_qwen2_qkv_bias() {
    model_case(tiny(Family::Qwen2, false, false, 2, 1), "qwen2 bias");
}

#[test]
fn model_gradients_llama_attention_bias() {
    model_case(tiny(Family::Llama, true, true, 4, 1), "llama attention_bias");
}

#[test]
fn kept_and_recomputed_head_and_attention_give_the_same_gradients() {
    let mut model = LlamaModel::init(tiny(Family::Llama, false, true, 4, 2), 5).unwrap();
    let seqs = batch();
    let grads = |model: &LlamaModel| {
        let fwd = model.forward(&seqs).unwrap();
        let mut g = model.zero_grads();
        model.backward(&fwd, &[1.0, 2.0, -1.0], &mut g).unwrap();
        (fwd.logps, g)
    };
    let kept = grads(&model);
    model.head_kept_max = 0;
    let recomputed = grads(&model);
    assert_eq!(kept.0, recomputed.0);
    assert_eq!(kept.1, recomputed.1, "the recomputed LM head changed a gradient");
    model.attn_probs_kept_max = 0;
    let recomputed = grads(&model);
    assert_eq!(kept.0, recomputed.0);
    assert_eq!(kept.1, recomputed.1, "attention weights recomputed from row statistics changed a gradient");
}

#[test]
fn head_stats_match_an_f64_recomputation_from_the_logits() {
    let mut model = LlamaModel::init(tiny(Family::Llama, false, false, 4, 2), 9).unwrap();
    // larger weights, so the softmax is far from uniform and argmax hits happen
    for t in &mut model.params.tensors {
        t.data.iter_mut().for_each(|x| *x *= 30.0);
    }
    let seqs = batch();
    let fwd = model.forward(&seqs).unwrap();
    let by_logps = model.sequence_logps_and_head(&seqs).unwrap();
    let vocab = model.config.vocab_size;
    let mut hits = 0;
    for (b, seq) in seqs.iter().enumerate() {
        let logits = model.logits(&seq.tokens).unwrap();
        let mut want = HeadStats::default();
        for p in (1..seq.tokens.len()).filter(|&p| seq.mask[p]) {
            let row: Vec<f64> = logits[(p - 1) * vocab..p * vocab].iter().map(|&l| l as f64).collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|l| (l - m).exp()).sum();
            let entropy: f64 = row.iter().map(|l| (l - m).exp() / z).filter(|&q| q > 0.0).map(|q| -q * q.ln()).sum();
            let first_max = row.iter().position(|&l| l == m).unwrap();
            want.tokens += 1;
            want.mean_logit_sum += row.iter().sum::<f64>() / vocab as f64;
            want.entropy_sum += entropy;
            want.argmax_hits += usize::from(first_max == seq.tokens[p] as usize);
        }
        for got in [fwd.head[b], by_logps.1[b]] {
            assert_eq!((got.tokens, got.argmax_hits), (want.tokens, want.argmax_hits), "sequence {b}");
            let close = |a: f64, w: f64| (a - w).abs() <= 1e-5 * w.abs().max(1.0);
            assert!(close(got.mean_logit_sum, want.mean_logit_sum), "sequence {b}: mean logits {got:?} vs {want:?}");
            assert!(close(got.entropy_sum, want.entropy_sum), "sequence {b}: entropy {got:?} vs {want:?}");
        }
        hits += want.argmax_hits;
    }
    assert!(hits > 0 && hits < seqs.iter().map(Sequence::scored).sum(), "the case should have both hits and misses ({hits})");
}

#[test]
fn backward_accumulates_and_ignores_thread_count() {
    let mut model = LlamaModel::init(tiny(Family::Llama, false, true, 4, 2), 3).unwrap();
    let seqs = batch();
    let fwd = model.forward(&seqs).unwrap();
    let mut g1 = model.zero_grads();
    model.backward(&fwd, &[1.0, 2.0, -1.0], &mut g1).unwrap();
    model.set_threads(3);
    let fwd3 = model.forward(&seqs).unwrap();
    assert_eq!(fwd.logps, fwd3.logps);
    let mut g3 = model.zero_grads();
    model.backward(&fwd3, &[1.0, 2.0, -1.0], &mut g3).unwrap();
    model.set_threads(1);
    let mut g1b = model.zero_grads();
    model.backward(&fwd3, &[1.0, 2.0, -1.0], &mut g1b).unwrap();
    assert_eq!(g1b, g3, "gradients depend on the thread count");
    assert_eq!(g1, g3);
    // accumulation: a second backward into the same set doubles it (up to the
    // rounding of the different summation order)
    model.backward(&fwd3, &[1.0, 2.0, -1.0], &mut g1b).unwrap();
    for (a, b) in g1b.tensors.iter().zip(&g3.tensors) {
        let big = b.data.iter().fold(0f32, |m, &y| m.max(y.abs()));
        assert!(a.data.iter().zip(&b.data).all(|(&x, &y)| (x - 2.0 * y).abs() <= 1e-5 * big), "{}", a.name);
    }
}

#[test]
fn cross_entropy_matches_logps_and_logits() {
    let model = LlamaModel::init(tiny(Family::Qwen2, true, false, 2, 1), 9).unwrap();
    let seq = Sequence::full(vec![3, 1, 4, 1, 5, 9, 2, 6]);
    let logits = model.logits(&seq.tokens).unwrap();
    let v = model.config.vocab_size;
    let mut expect = 0f64;
    for p in 1..seq.tokens.len() {
        let mut probs = vec![0f32; v];
        expect += layers::log_softmax_row(&logits[(p - 1) * v..p * v], seq.tokens[p] as usize, &mut probs) as f64;
    }
    let ce = model.cross_entropy(std::slice::from_ref(&seq)).unwrap();
    assert_eq!(ce.tokens, 7);
    assert!((ce.nll_sum + expect).abs() < 1e-4, "{} vs {}", ce.nll_sum, -expect);
    let mut g = model.zero_grads();
    let ce2 = model.cross_entropy_backward(std::slice::from_ref(&seq), 1.0 / 7.0, &mut g).unwrap();
    assert_eq!(ce, ce2);
}

#[test]
fn kv_cache_generation_matches_full_forward() {
    let model = LlamaModel::init(tiny(Family::Llama, false, true, 4, 2), 5).unwrap();
    let prompt = vec![1u32, 2, 3];
    let opts = GenerateOptions {
        max_new_tokens: 6,
        sampling: Sampling::Greedy,
        stop_token: None,
        seed: 0,
    };
    let out = model.generate(&prompt, &opts).unwrap();
    assert_eq!(out.len(), 6);
    // greedy tokens must be the argmax of the full (cache-free) forward at each step
    let mut seq = prompt.clone();
    let v = model.config.vocab_size;
    for &tok in &out {
        let logits = model.logits(&seq).unwrap();
        let last = &logits[(seq.len() - 1) * v..];
        let best = (0..v).fold(0, |b, i| if last[i] > last[b] { i } else { b });
        assert_eq!(tok as usize, best);
        seq.push(tok);
    }
}

#[test]
fn sampling_is_seeded_and_stops() {
    let model = LlamaModel::init(tiny(Family::Llama, false, false, 2, 2), 5).unwrap();
    let prompts = vec![vec![1u32, 2], vec![3u32], vec![4u32, 4, 4]];
    let opts = GenerateOptions {
        max_new_tokens: 20,
        sampling: Sampling::Temperature { temperature: 1.5, top_k: 0 },
        stop_token: None,
        seed: 11,
    };
    let a = model.generate_batch(&prompts, &opts).unwrap();
    let b = model.generate_batch(&prompts, &opts).unwrap();
    assert_eq!(a, b);
    let c = model.generate_batch(&prompts, &GenerateOptions { seed: 12, ..opts }).unwrap();
    assert_ne!(a, c, "a different seed should sample differently");
    // stopping on the first token that was sampled with the same seed
    let first = a[0][0];
    let stopped = model
        .generate_batch(
            &prompts[..1],
            &GenerateOptions {
                stop_token: Some(first),
                ..opts
            },
        )
        .unwrap();
    assert!(stopped[0].is_empty());
    // top_k = 1 is greedy
    let g = model
        .generate_batch(
            &prompts,
            &GenerateOptions {
                sampling: Sampling::Greedy,
                ..opts
            },
        )
        .unwrap();
    let k1 = model
        .generate_batch(
            &prompts,
            &GenerateOptions {
                sampling: Sampling::Temperature { temperature: 1.0, top_k: 1 },
                ..opts
            },
        )
        .unwrap();
    assert_eq!(g, k1);
}

#[test]
fn bad_inputs_are_named() {
    let model = LlamaModel::init(tiny(Family::Llama, false, false, 2, 2), 5).unwrap();
    let err = model.forward(&[Sequence::full(vec![1, 2]), Sequence::full(vec![1, 99])]).err().unwrap();
    assert_eq!(
        err,
        ModelError::TokenOutOfRange {
            sequence: 1,
            position: 1,
            id: 99,
            vocab_size: 11
        }
    );
    let err = model
        .forward(&[Sequence {
            tokens: vec![1, 2],
            mask: vec![true, true],
        }])
        .err()
        .unwrap();
    assert!(err.to_string().contains("sequence 0"), "{err}");
    let mut params = model.params.clone();
    params.tensors.retain(|t| t.name != "model.norm.weight");
    let err = LlamaModel::from_params(model.config.clone(), params).err().unwrap();
    assert!(err.to_string().contains("model.norm.weight"), "{err}");
    let mut bad = model.config.clone();
    bad.num_key_value_heads = 3;
    let err = LlamaModel::init(bad, 1).err().unwrap();
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    let mut wrong = ParamSet::new(vec![]);
    let fwd = model.forward(&batch()).unwrap();
    assert!(matches!(model.backward(&fwd, &[1.0; 3], &mut wrong), Err(ModelError::GradientLayout { .. })));
    let mut grads = model.zero_grads();
    let err = model.backward(&fwd, &[1.0, f32::NAN, 0.0], &mut grads).err().unwrap();
    assert!(err.to_string().contains("dlogps[1]"), "{err}");
    assert!(grads.tensors.iter().all(|t| t.data.iter().all(|&g| g == 0.0)), "nothing is written on error");
}

/// Grouped-query attention means what transformers' `repeat_kv` means: query head
/// `h` reads key/value head `h / (heads / kv_heads)`. So a GQA model equals the
/// multi-head model whose k/v projections repeat each group's rows.
#[test]
fn grouped_query_attention_is_repeated_kv() {
    let mut gqa = LlamaModel::init(tiny(Family::Qwen2, false, false, 4, 2), 21).unwrap();
    // random biases, so the bias rows are checked too
    let mut rng = SplitMix64::new(22);
    for t in gqa.params.tensors.iter_mut().filter(|t| t.name.ends_with(".bias")) {
        t.data = rand_vec(&mut rng, t.data.len(), 0.5);
    }
    let mut mha_cfg = gqa.config.clone();
    mha_cfg.num_key_value_heads = 4;
    let hd = gqa.config.head_dim;
    let mut tensors = Vec::new();
    for t in &gqa.params.tensors {
        let mut t = t.clone();
        if t.name.contains("k_proj") || t.name.contains("v_proj") {
            let row = t.data.len() / (2 * hd); // elements per output unit (1 for biases)
            let groups: Vec<&[f32]> = t.data.chunks(hd * row).collect();
            t.data = (0..4).flat_map(|h| groups[h / 2].to_vec()).collect();
            t.shape[0] = 4 * hd;
        }
        tensors.push(t);
    }
    let mha = LlamaModel::from_params(mha_cfg, ParamSet::new(tensors)).unwrap();
    let tokens = [3u32, 7, 1, 9, 4, 4];
    assert_eq!(gqa.logits(&tokens).unwrap(), mha.logits(&tokens).unwrap());
}

/// Splitting a product's columns among threads changes nothing but the time.
#[test]
fn linear_products_ignore_thread_count() {
    let (t, ic, oc) = (67, 130, 203); // above the parallel threshold, odd remainders everywhere
    let mut rng = SplitMix64::new(31);
    let x = rand_vec(&mut rng, t * ic, 1.0);
    let w = rand_vec(&mut rng, oc * ic, 1.0);
    let b = rand_vec(&mut rng, oc, 1.0);
    let dy = rand_vec(&mut rng, t * oc, 1.0);
    let wt = layers::transpose(&w, ic, oc);
    let run = |threads: usize| {
        let mut y = vec![0f32; t * oc];
        layers::linear_forward(&mut y, &x, layers::Weight::Transposed(&wt), Some(&b), ic, oc, threads);
        let (mut dx, mut dw) = (vec![0f32; t * ic], vec![0f32; oc * ic]);
        layers::linear_backward(Some(&mut dx), &mut dw, &dy, &x, &w, ic, oc, threads);
        (y, dx, dw)
    };
    let one = run(1);
    for threads in [2, 3] {
        assert!(run(threads) == one, "{threads} threads");
    }
}


#[test]
fn a_recycled_gradient_comes_back_zero_in_the_same_buffers() {
    let model = LlamaModel::init(tiny(Family::Llama, true, false, 4, 2), 9).unwrap();
    let mut g = model.zeroed_grads();
    for t in &mut g.tensors {
        t.data.fill(1.5);
    }
    let before: Vec<*const f32> = g.tensors.iter().map(|t| t.data.as_ptr()).collect();
    model.recycle_grads(g);
    let again = model.zeroed_grads();
    assert_eq!(again.tensors.iter().map(|t| t.data.as_ptr()).collect::<Vec<_>>(), before);
    assert_eq!(again, model.zero_grads());
    // taken once: the next one is fresh
    assert_ne!(model.zeroed_grads().tensors[0].data.as_ptr(), before[0]);
}

#[test]
fn reused_buffers_give_the_same_gradients_kept_or_recomputed() {
    let mut model = LlamaModel::init(tiny(Family::Llama, false, true, 4, 2), 5).unwrap();
    let seqs = batch();
    let grads = |model: &LlamaModel| {
        let fwd = model.forward(&seqs).unwrap();
        let mut g = model.zeroed_grads();
        model.backward(&fwd, &[1.0, 2.0, -1.0], &mut g).unwrap();
        let logps = fwd.logps.clone();
        model.recycle_forward(fwd);
        (logps, g)
    };
    let fresh = grads(&model);
    assert!(!model.buffers.lock().unwrap().is_empty(), "the step's buffers are kept for reuse");
    // later runs take the earlier ones' activation and head buffers, holding their values
    for (head_max, attn_max) in [(usize::MAX, usize::MAX), (0, usize::MAX), (usize::MAX, 0), (0, 0)] {
        model.head_kept_max = head_max;
        model.attn_probs_kept_max = attn_max;
        let again = grads(&model);
        assert_eq!(again.0, fresh.0);
        assert_eq!(again.1, fresh.1, "head kept up to {head_max}, attention weights up to {attn_max}");
    }
    // on one thread the same step takes and gives the same buffers: none is added
    model.set_threads(1);
    grads(&model);
    let kept = model.buffers.lock().unwrap().len();
    assert_eq!(grads(&model), fresh);
    assert_eq!(model.buffers.lock().unwrap().len(), kept);
}
