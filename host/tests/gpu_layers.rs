//! The model kernels of `gpu_shaders::model` against the CPU layers of
//! `host::model::layers` (whose gradients the finite-difference checks of
//! `host/src/model/tests.rs` cover) and the losses of `host::loss`, forward and
//! backward, on random inputs; and each kernel run twice for identical bits.
//!
//! Runs on lavapipe in CI: no adapter is a failure, never a skip.

use gpu_shaders::model::{
    Attention, AttentionShape, Elementwise, Embedding, GpuVec, HeadMetrics, HeadShape, Linear, LinearShape, LmHead, PairLogps, PreferenceLoss,
    PreferenceLossKind, RmsNorm, Rope, SequenceSum,
};
use gpu_shaders::{GpuContext, GpuOptions};
use host::loss::{DpoLoss, LossKind};
use host::model::layers::{self, AttnShape};
use merge_core::rng::SplitMix64;

/// Relative L2 error (`‖gpu − cpu‖ / ‖cpu‖`) allowed per output tensor.
///
/// Both sides compute in binary32 but sum in different orders (the CPU's
/// eight-lane dot products and blocks of four, the GPU's single running sums and
/// 256-lane trees), and the GPU's `exp`, `log`, `sqrt` and division are not
/// correctly rounded (a few ulp). Reordering a sum of K terms moves it by about
/// √K·2^-24 of the terms' magnitude on random data (K·2^-24 at worst): for the
/// K ≤ 300 here, ~1e-6 typical. 1e-5 leaves that a margin of ten, while a wrong
/// index, a dropped term or a wrong sign gives errors of 1e-2 and more.
const TOL: f64 = 1e-5;

/// The LM head's input gradient over a 152k vocabulary: each element is a sum of
/// 152k terms `coef·(onehot − p)·w` that cancel (the softmax sums to one), so
/// reordering moves it by ~√K·2^-24 ≈ 2e-5 of the terms' magnitude, more
/// relative to the small result. Lavapipe gives 4e-6; 1e-4 is the √K scaling of
/// [`TOL`]'s argument. (A skipped or misplaced chunk fails the lse and dw checks
/// by orders of magnitude.)
const LARGE_VOCAB_TOL: f64 = 1e-4;

fn ctx() -> GpuContext {
    match GpuContext::new(&GpuOptions::default()) {
        Ok(c) => c,
        Err(e) => panic!("no GPU adapter for the model kernel tests ({e}); install mesa-vulkan-drivers libvulkan1 (software Vulkan)"),
    }
}

/// `n` test inputs uniform in `[−scale, scale)`.
fn uniform_vec(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.uniform_f32(scale)).collect()
}

fn up(ctx: &GpuContext, data: &[f32]) -> GpuVec {
    GpuVec::from_f32(ctx, "test input", data).unwrap()
}

fn up_u32(ctx: &GpuContext, data: &[u32]) -> GpuVec {
    GpuVec::from_u32(ctx, "test ids", data).unwrap()
}

fn read(ctx: &GpuContext, v: &GpuVec) -> Vec<f32> {
    v.read_f32(ctx).unwrap()
}

fn rel_l2(gpu: &[f32], cpu: &[f32]) -> f64 {
    assert_eq!(gpu.len(), cpu.len());
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&g, &c) in gpu.iter().zip(cpu) {
        diff += (g as f64 - c as f64).powi(2);
        norm += (c as f64).powi(2);
    }
    assert!(norm > 0.0, "the CPU reference is all zeros: the comparison would prove nothing");
    (diff / norm).sqrt()
}

fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
    assert!(gpu.iter().all(|x| x.is_finite()), "{what}: the GPU result has a non-finite value");
    let e = rel_l2(gpu, cpu);
    assert!(e <= tol, "{what}: relative L2 error {e:.3e} exceeds {tol:.0e}");
}

/// Runs `run` twice on fresh buffers and checks every output came back with
/// identical bits; returns the first run's outputs.
fn deterministic(what: &str, run: impl Fn() -> Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    let first = run();
    let second = run();
    for (i, (a, b)) in first.iter().zip(&second).enumerate() {
        let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{what}: output {i} differs between two identical runs");
    }
    first
}

#[test]
fn linear_forward_and_backward_match_cpu() {
    let ctx = ctx();
    let linear = Linear::new(&ctx);
    let mut rng = SplitMix64::new(1);
    // sizes off the 16-wide tiles, so partial tiles are exercised in every dimension
    let s = LinearShape { rows: 19, inputs: 37, outputs: 45 };
    let x = uniform_vec(&mut rng, s.rows * s.inputs, 1.0);
    let w = uniform_vec(&mut rng, s.outputs * s.inputs, 0.5);
    let b = uniform_vec(&mut rng, s.outputs, 0.5);
    let dy = uniform_vec(&mut rng, s.rows * s.outputs, 1.0);
    // gradients start non-zero: the backward must accumulate, not overwrite
    let (dx0, dw0, db0) = (uniform_vec(&mut rng, x.len(), 1.0), uniform_vec(&mut rng, w.len(), 1.0), uniform_vec(&mut rng, b.len(), 1.0));

    for bias in [true, false] {
        let gpu = deterministic("linear", || {
            let (gx, gw, gb, gdy) = (up(&ctx, &x), up(&ctx, &w), up(&ctx, &b), up(&ctx, &dy));
            let gy = GpuVec::zeros(&ctx, "y", s.rows * s.outputs).unwrap();
            let (gdx, gdw, gdb) = (up(&ctx, &dx0), up(&ctx, &dw0), up(&ctx, &db0));
            linear.forward(&gy, &gx, &gw, bias.then_some(&gb), s).unwrap();
            linear.backward(Some(&gdx), &gdw, bias.then_some(&gdb), &gdy, &gx, &gw, s).unwrap();
            vec![read(&ctx, &gy), read(&ctx, &gdx), read(&ctx, &gdw), read(&ctx, &gdb)]
        });
        let mut y = vec![0f32; s.rows * s.outputs];
        layers::linear_forward(&mut y, &x, layers::Weight::Hf(&w), bias.then_some(&b[..]), s.inputs, s.outputs, 1);
        let (mut dx, mut dw, mut db) = (dx0.clone(), dw0.clone(), db0.clone());
        layers::linear_backward(Some(&mut dx), &mut dw, &dy, &x, &w, s.inputs, s.outputs, 1);
        if bias {
            layers::bias_backward(&mut db, &dy);
        }
        assert_close("linear y", &gpu[0], &y, TOL);
        assert_close("linear dx", &gpu[1], &dx, TOL);
        assert_close("linear dw", &gpu[2], &dw, TOL);
        assert_close("linear db", &gpu[3], &db, TOL);
    }
}

#[test]
fn rmsnorm_forward_and_backward_match_cpu() {
    let ctx = ctx();
    let norm = RmsNorm::new(&ctx);
    let mut rng = SplitMix64::new(2);
    // 300 columns: more than one lane stride of the 256-lane row sums
    let (rows, cols, eps) = (7, 300, 1e-5);
    let x = uniform_vec(&mut rng, rows * cols, 2.0);
    let w: Vec<f32> = uniform_vec(&mut rng, cols, 0.5).iter().map(|v| 1.0 + v).collect();
    let dy = uniform_vec(&mut rng, rows * cols, 1.0);
    let (dx0, dw0) = (uniform_vec(&mut rng, x.len(), 1.0), uniform_vec(&mut rng, cols, 1.0));
    let gpu = deterministic("rmsnorm", || {
        let (gx, gw, gdy) = (up(&ctx, &x), up(&ctx, &w), up(&ctx, &dy));
        let gy = GpuVec::zeros(&ctx, "y", x.len()).unwrap();
        let grstd = GpuVec::zeros(&ctx, "rstd", rows).unwrap();
        let (gdx, gdw) = (up(&ctx, &dx0), up(&ctx, &dw0));
        norm.forward(&gy, &grstd, &gx, &gw, eps).unwrap();
        norm.backward(&gdx, &gdw, &gdy, &gx, &gw, &grstd).unwrap();
        vec![read(&ctx, &gy), read(&ctx, &grstd), read(&ctx, &gdx), read(&ctx, &gdw)]
    });
    let (mut y, mut rstd) = (vec![0f32; x.len()], vec![0f32; rows]);
    layers::rmsnorm_forward(&mut y, &mut rstd, &x, &w, eps, cols);
    let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
    layers::rmsnorm_backward(&mut dx, &mut dw, &dy, &x, &w, &rstd, cols);
    assert_close("rmsnorm y", &gpu[0], &y, TOL);
    assert_close("rmsnorm rstd", &gpu[1], &rstd, TOL);
    assert_close("rmsnorm dx", &gpu[2], &dx, TOL);
    assert_close("rmsnorm dw", &gpu[3], &dw, TOL);
}

#[test]
fn embedding_gather_and_scatter_add_match_cpu() {
    let ctx = ctx();
    let embedding = Embedding::new(&ctx);
    let mut rng = SplitMix64::new(3);
    // 25 tokens over 11 ids: most ids repeat, some appear once, some never
    let (vocab, cols) = (11, 20);
    let tokens: Vec<u32> = (0..25).map(|_| rng.below(8) as u32 + 3).collect();
    let table = uniform_vec(&mut rng, vocab * cols, 1.0);
    let dx = uniform_vec(&mut rng, tokens.len() * cols, 1.0);
    let dtable0 = uniform_vec(&mut rng, table.len(), 1.0);
    let gpu = deterministic("embedding", || {
        let (gt, gtab, gdx, gdtab) = (up_u32(&ctx, &tokens), up(&ctx, &table), up(&ctx, &dx), up(&ctx, &dtable0));
        let gx = GpuVec::zeros(&ctx, "x", tokens.len() * cols).unwrap();
        embedding.forward(&gx, &gt, &gtab, cols).unwrap();
        embedding.backward(&gdtab, &gdx, &gt, cols).unwrap();
        vec![read(&ctx, &gx), read(&ctx, &gdtab)]
    });
    let mut x = vec![0f32; tokens.len() * cols];
    layers::embedding_forward(&mut x, &tokens, &table, cols);
    let mut dtable = dtable0.clone();
    layers::embedding_backward(&mut dtable, &dx, &tokens, cols);
    assert_eq!(gpu[0], x, "a gather copies values: it must be exact");
    assert_close("embedding dtable", &gpu[1], &dtable, TOL);
}

#[test]
fn rope_forward_and_backward_match_cpu() {
    let ctx = ctx();
    let mut rng = SplitMix64::new(4);
    let (t, heads, head_dim) = (9, 3, 8);
    let tables = layers::Rope::new(head_dim, 10000.0, host::model::RopeScaling::None, 0, t);
    let rope = Rope::new(&ctx, tables.half, &tables.cos, &tables.sin).unwrap();
    let x = uniform_vec(&mut rng, t * heads * head_dim, 1.0);
    let dx = uniform_vec(&mut rng, x.len(), 1.0);
    let gpu = deterministic("rope", || {
        let (gx, gdx) = (up(&ctx, &x), up(&ctx, &dx));
        rope.forward(&gx, heads).unwrap();
        rope.backward(&gdx, heads).unwrap();
        vec![read(&ctx, &gx), read(&ctx, &gdx)]
    });
    let (mut fx, mut bx) = (x.clone(), dx.clone());
    layers::rope_forward(&mut fx, &tables, heads);
    layers::rope_backward(&mut bx, &tables, heads);
    assert_close("rope forward", &gpu[0], &fx, TOL);
    assert_close("rope backward", &gpu[1], &bx, TOL);

    // tables for more positions than the array has rows: its rows take the first ones
    let long = layers::Rope::new(head_dim, 10000.0, host::model::RopeScaling::None, 0, 2 * t + 1);
    let long = Rope::new(&ctx, long.half, &long.cos, &long.sin).unwrap();
    let gx = up(&ctx, &x);
    long.forward(&gx, heads).unwrap();
    assert_eq!(read(&ctx, &gx).iter().map(|v| v.to_bits()).collect::<Vec<_>>(), gpu[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    assert!(rope.forward(&up(&ctx, &uniform_vec(&mut rng, (t + 1) * heads * head_dim, 1.0)), heads).is_err(), "more rows than positions");

    // generation: rows at positions 5.. take the tables' rows 5.., as the CPU's
    // tables built from position 5 give them
    let (first, rows) = (5, 3);
    let at = layers::Rope::new(head_dim, 10000.0, host::model::RopeScaling::None, first, rows);
    let xs = &x[..rows * heads * head_dim];
    let gx = up(&ctx, xs);
    long.forward_at(&gx, heads, first).unwrap();
    let mut fx = xs.to_vec();
    layers::rope_forward(&mut fx, &at, heads);
    assert_close("rope forward at position 5", &read(&ctx, &gx), &fx, TOL);
    assert!(long.forward_at(&up(&ctx, xs), heads, long.positions() - rows + 1).is_err(), "rows past the tables' last position");
}

fn check_attention(ctx: &GpuContext, attention: &Attention, s: AttentionShape, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let (qd, kvd) = (s.tokens * s.heads * s.head_dim, s.tokens * s.kv_heads * s.head_dim);
    let (q, k, v) = (uniform_vec(&mut rng, qd, 1.0), uniform_vec(&mut rng, kvd, 1.0), uniform_vec(&mut rng, kvd, 1.0));
    let dout = uniform_vec(&mut rng, qd, 1.0);
    let (dq0, dk0, dv0) = (uniform_vec(&mut rng, qd, 1.0), uniform_vec(&mut rng, kvd, 1.0), uniform_vec(&mut rng, kvd, 1.0));
    let what = format!("attention {s:?}");
    let gpu = deterministic(&what, || {
        let (gq, gk, gv, gdout) = (up(ctx, &q), up(ctx, &k), up(ctx, &v), up(ctx, &dout));
        let out = GpuVec::zeros(ctx, "out", qd).unwrap();
        let lse = GpuVec::zeros(ctx, "lse", s.heads * s.tokens).unwrap();
        let (gdq, gdk, gdv) = (up(ctx, &dq0), up(ctx, &dk0), up(ctx, &dv0));
        attention.forward(&out, &lse, &gq, &gk, &gv, s).unwrap();
        attention.backward(&gdq, &gdk, &gdv, &gdout, &out, &lse, &gq, &gk, &gv, s).unwrap();
        vec![read(ctx, &out), read(ctx, &gdq), read(ctx, &gdk), read(ctx, &gdv)]
    });
    let shape = AttnShape { heads: s.heads, kv_heads: s.kv_heads, head_dim: s.head_dim, pos0: 0, tq: s.tokens };
    let mut out = vec![0f32; qd];
    let mut saved = layers::AttnSaved::probs(shape);
    layers::attention_forward(&mut out, Some(&mut saved), &q, &k, &v, shape);
    let (mut dq, mut dk, mut dv) = (dq0.clone(), dk0.clone(), dv0.clone());
    layers::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &saved, &q, &k, &v, shape);
    assert_close(&format!("{what} out"), &gpu[0], &out, TOL);
    assert_close(&format!("{what} dq"), &gpu[1], &dq, TOL);
    assert_close(&format!("{what} dk"), &gpu[2], &dk, TOL);
    assert_close(&format!("{what} dv"), &gpu[3], &dv, TOL);
}

#[test]
fn attention_forward_and_backward_match_cpu() {
    let ctx = ctx();
    let attention = Attention::new(&ctx);
    // grouped (two query heads per key/value head), plain multi-head, and one
    // longer than a 256-key block so the blocked sums loop
    check_attention(&ctx, &attention, AttentionShape { tokens: 13, heads: 4, kv_heads: 2, head_dim: 8 }, 5);
    check_attention(&ctx, &attention, AttentionShape { tokens: 11, heads: 2, kv_heads: 2, head_dim: 16 }, 6);
    check_attention(&ctx, &attention, AttentionShape { tokens: 300, heads: 2, kv_heads: 1, head_dim: 8 }, 7);
}

/// Generation's attention: `tq` new queries at positions `past..` against a
/// cache (with spare rows) holding every position's keys and values, against the
/// CPU attention given the same `pos0`.
fn check_cached_attention(ctx: &GpuContext, attention: &Attention, s: AttentionShape, past: usize, spare: usize, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let (qd, kvd) = (s.tokens * s.heads * s.head_dim, (past + s.tokens) * s.kv_heads * s.head_dim);
    let (q, k, v) = (uniform_vec(&mut rng, qd, 1.0), uniform_vec(&mut rng, kvd, 1.0), uniform_vec(&mut rng, kvd, 1.0));
    // spare rows hold garbage that must never be read
    let with_spare = |x: &[f32]| [x, &vec![f32::NAN; spare * s.kv_heads * s.head_dim]].concat();
    let what = format!("cached attention {s:?} after {past}");
    let gpu = deterministic(&what, || {
        let out = GpuVec::zeros(ctx, "out", qd).unwrap();
        let lse = GpuVec::zeros(ctx, "lse", s.heads * s.tokens).unwrap();
        attention.forward_cached(&out, &lse, &up(ctx, &q), &up(ctx, &with_spare(&k)), &up(ctx, &with_spare(&v)), past, s).unwrap();
        vec![read(ctx, &out)]
    });
    let shape = AttnShape { heads: s.heads, kv_heads: s.kv_heads, head_dim: s.head_dim, pos0: past, tq: s.tokens };
    let mut out = vec![0f32; qd];
    layers::attention_forward(&mut out, None, &q, &k, &v, shape);
    assert_close(&what, &gpu[0], &out, TOL);
}

#[test]
fn cached_attention_matches_cpu_and_is_the_training_forward_without_a_cache() {
    let ctx = ctx();
    let attention = Attention::new(&ctx);
    // one new token after a prompt, a block of new tokens, and a history longer
    // than one 256-key block; grouped and plain heads
    check_cached_attention(&ctx, &attention, AttentionShape { tokens: 1, heads: 4, kv_heads: 2, head_dim: 8 }, 12, 7, 21);
    check_cached_attention(&ctx, &attention, AttentionShape { tokens: 5, heads: 2, kv_heads: 2, head_dim: 16 }, 6, 0, 22);
    check_cached_attention(&ctx, &attention, AttentionShape { tokens: 2, heads: 2, kv_heads: 1, head_dim: 8 }, 299, 3, 23);

    // past = 0 with exact sizes is the training forward, bit for bit
    let s = AttentionShape { tokens: 9, heads: 4, kv_heads: 2, head_dim: 8 };
    let mut rng = SplitMix64::new(24);
    let (q, k, v) = (uniform_vec(&mut rng, 9 * 4 * 8, 1.0), uniform_vec(&mut rng, 9 * 2 * 8, 1.0), uniform_vec(&mut rng, 9 * 2 * 8, 1.0));
    let run = |cached: bool| {
        let out = GpuVec::zeros(&ctx, "out", q.len()).unwrap();
        let lse = GpuVec::zeros(&ctx, "lse", 4 * 9).unwrap();
        let (gq, gk, gv) = (up(&ctx, &q), up(&ctx, &k), up(&ctx, &v));
        if cached {
            attention.forward_cached(&out, &lse, &gq, &gk, &gv, 0, s).unwrap();
        } else {
            attention.forward(&out, &lse, &gq, &gk, &gv, s).unwrap();
        }
        [read(&ctx, &out), read(&ctx, &lse)].concat().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(run(true), run(false));

    // a cache shorter than the positions it must cover is refused
    let short = up(&ctx, &k[..8 * 2 * 8]);
    let (out, lse) = (GpuVec::zeros(&ctx, "out", 4 * 8).unwrap(), GpuVec::zeros(&ctx, "lse", 4).unwrap());
    let one = AttentionShape { tokens: 1, ..s };
    assert!(attention.forward_cached(&out, &lse, &up(&ctx, &q[..32]), &short, &short, 8, one).is_err());
}

#[test]
fn swiglu_and_residual_match_cpu() {
    let ctx = ctx();
    let elementwise = Elementwise::new(&ctx);
    let mut rng = SplitMix64::new(8);
    let n = 1000;
    let (gate, upv, dh) = (uniform_vec(&mut rng, n, 4.0), uniform_vec(&mut rng, n, 1.0), uniform_vec(&mut rng, n, 1.0));
    let gpu = deterministic("swiglu and residual", || {
        let (gg, gu, gdh) = (up(&ctx, &gate), up(&ctx, &upv), up(&ctx, &dh));
        let h = GpuVec::zeros(&ctx, "h", n).unwrap();
        let (dgate, dup) = (GpuVec::zeros(&ctx, "dgate", n).unwrap(), GpuVec::zeros(&ctx, "dup", n).unwrap());
        elementwise.swiglu_forward(&h, &gg, &gu).unwrap();
        elementwise.swiglu_backward(&dgate, &dup, &gdh, &gg, &gu).unwrap();
        let sum = GpuVec::zeros(&ctx, "sum", n).unwrap();
        elementwise.add(&sum, &gg, &gu).unwrap();
        elementwise.add_assign(&gg, &gdh).unwrap();
        vec![read(&ctx, &h), read(&ctx, &dgate), read(&ctx, &dup), read(&ctx, &sum), read(&ctx, &gg)]
    });
    let mut h = vec![0f32; n];
    layers::swiglu_forward(&mut h, &gate, &upv);
    let (mut dgate, mut dup) = (vec![0f32; n], vec![0f32; n]);
    layers::swiglu_backward(&mut dgate, &mut dup, &dh, &gate, &upv);
    assert_close("swiglu h", &gpu[0], &h, TOL);
    assert_close("swiglu dgate", &gpu[1], &dgate, TOL);
    assert_close("swiglu dup", &gpu[2], &dup, TOL);
    let sum: Vec<f32> = gate.iter().zip(&upv).map(|(a, b)| a + b).collect();
    let acc: Vec<f32> = gate.iter().zip(&dh).map(|(a, b)| a + b).collect();
    assert_eq!(gpu[3], sum, "an addition is correctly rounded in WGSL: it must be exact");
    assert_eq!(gpu[4], acc, "an addition is correctly rounded in WGSL: it must be exact");
}

/// One LM-head problem: hidden rows `x`, head `w`, targets, per-row backward
/// coefficients, and the gradients' starting values.
struct HeadCase {
    s: HeadShape,
    x: Vec<f32>,
    w: Vec<f32>,
    targets: Vec<u32>,
    coef: Vec<f32>,
    dx0: Vec<f32>,
    dw0: Vec<f32>,
}

/// `[logp, lse, dx, dw, mean logit, entropy, argmax hit]`
type HeadResult = [Vec<f32>; 7];

impl HeadCase {
    /// The CPU head: logits, log-softmax (sums in f64), the target's log-prob,
    /// the row's log-sum-exp, and the backward of `Σ coef · logp`.
    fn cpu(&self) -> HeadResult {
        let s = self.s;
        let mut logits = vec![0f32; s.rows * s.vocab];
        layers::linear_forward(&mut logits, &self.x, layers::Weight::Hf(&self.w), None, s.hidden, s.vocab, 1);
        let mut probs = vec![0f32; s.vocab];
        let mut dlogits = vec![0f32; s.rows * s.vocab];
        let (mut logp, mut lse) = (Vec::new(), Vec::new());
        let (mut mean, mut entropy, mut hit) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..s.rows {
            let row = &logits[r * s.vocab..(r + 1) * s.vocab];
            let target = self.targets[r] as usize;
            logp.push(layers::log_softmax_row(row, target, &mut probs));
            let mx = row.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
            let z: f64 = row.iter().map(|&l| (l as f64 - mx).exp()).sum();
            lse.push((mx + z.ln()) as f32);
            layers::log_softmax_backward(&mut dlogits[r * s.vocab..(r + 1) * s.vocab], &probs, target, self.coef[r]);
            mean.push((row.iter().map(|&l| l as f64).sum::<f64>() / s.vocab as f64) as f32);
            let p = |l: f32| (l as f64 - mx).exp() / z;
            entropy.push(row.iter().map(|&l| p(l)).filter(|&q| q > 0.0).map(|q| -q * q.ln()).sum::<f64>() as f32);
            hit.push(if row.iter().position(|&l| l as f64 == mx) == Some(target) { 1.0 } else { 0.0 });
        }
        let (mut dx, mut dw) = (self.dx0.clone(), self.dw0.clone());
        layers::linear_backward(Some(&mut dx), &mut dw, &dlogits, &self.x, &self.w, s.hidden, s.vocab, 1);
        [logp, lse, dx, dw, mean, entropy, hit]
    }

    /// The row's first largest logit (as the CPU computes the logits).
    fn argmax(&self, r: usize) -> u32 {
        let s = self.s;
        let mut logits = vec![0f32; s.vocab];
        layers::linear_forward(&mut logits, &self.x[r * s.hidden..(r + 1) * s.hidden], layers::Weight::Hf(&self.w), None, s.hidden, s.vocab, 1);
        let mx = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
        logits.iter().position(|&l| l == mx).unwrap() as u32
    }

    fn gpu(&self, ctx: &GpuContext, head: &LmHead) -> Vec<Vec<f32>> {
        let s = self.s;
        let (x, w, targets, coef) = (up(ctx, &self.x), up(ctx, &self.w), up_u32(ctx, &self.targets), up(ctx, &self.coef));
        let logp = GpuVec::zeros(ctx, "logp", s.rows).unwrap();
        let lse = GpuVec::zeros(ctx, "lse", s.rows).unwrap();
        let (dx, dw) = (up(ctx, &self.dx0), up(ctx, &self.dw0));
        let m = HeadMetrics::zeros(ctx, s.rows).unwrap();
        head.forward(&logp, &lse, &m, &x, &w, &targets, s).unwrap();
        head.backward(&dx, &dw, &x, &w, &targets, &lse, &coef, s).unwrap();
        vec![read(ctx, &logp), read(ctx, &lse), read(ctx, &dx), read(ctx, &dw), read(ctx, &m.mean_logit), read(ctx, &m.entropy), read(ctx, &m.argmax_hit)]
    }
}

#[test]
fn lm_head_log_softmax_matches_cpu_whatever_the_vocab_chunk() {
    let ctx = ctx();
    let mut rng = SplitMix64::new(9);
    let s = HeadShape { rows: 6, hidden: 24, vocab: 300 };
    let mut case = HeadCase {
        s,
        x: uniform_vec(&mut rng, s.rows * s.hidden, 1.0),
        w: uniform_vec(&mut rng, s.vocab * s.hidden, 1.0),
        // targets in the first, a middle and the last (partial) chunk of 64
        targets: vec![0, 70, 150, 299, 256, 63],
        coef: uniform_vec(&mut rng, s.rows, 1.0),
        dx0: uniform_vec(&mut rng, s.rows * s.hidden, 1.0),
        dw0: uniform_vec(&mut rng, s.vocab * s.hidden, 0.01),
    };
    // two rows score their largest logit, so the argmax hit is seen both ways
    for r in [1, 4] {
        case.targets[r] = case.argmax(r);
    }
    let cpu = case.cpu();
    assert_eq!(cpu[6], [0.0, 1.0, 0.0, 0.0, 1.0, 0.0], "targets {:?}", case.targets);
    // 64: five passes, the last over 44 ids; 1024: the whole vocabulary in one
    for chunk in [64, 1024] {
        let head = LmHead::new(&ctx, chunk);
        let gpu = deterministic("lm head", || case.gpu(&ctx, &head));
        for (i, what) in ["logp", "lse", "dx", "dw", "mean logit", "entropy"].iter().enumerate() {
            assert_close(&format!("head {what} (chunk {chunk})"), &gpu[i], &cpu[i], TOL);
        }
        assert_eq!(gpu[6], cpu[6], "head argmax hits (chunk {chunk})");
    }
}

#[test]
fn lm_head_logits_row_matches_cpu_whatever_the_vocab_chunk() {
    let ctx = ctx();
    let mut rng = SplitMix64::new(11);
    let (rows, hidden, vocab) = (3, 24, 300);
    let x = uniform_vec(&mut rng, rows * hidden, 1.0);
    let w = uniform_vec(&mut rng, vocab * hidden, 1.0);
    let (gx, gw) = (up(&ctx, &x), up(&ctx, &w));
    for chunk in [64, 1024] {
        let head = LmHead::new(&ctx, chunk);
        // rows 2 and 0 of x into rows 0 and 1 of the output; row 2 keeps its values
        let out = up(&ctx, &vec![7.0; 3 * vocab]);
        head.logits_row(&out, 0, &gx, 2, &gw, hidden, vocab).unwrap();
        head.logits_row(&out, 1, &gx, 0, &gw, hidden, vocab).unwrap();
        let got = read(&ctx, &out);
        for (out_row, x_row) in [(0, 2), (1, 0)] {
            let mut cpu = vec![0f32; vocab];
            layers::linear_forward(&mut cpu, &x[x_row * hidden..(x_row + 1) * hidden], layers::Weight::Hf(&w), None, hidden, vocab, 1);
            assert_close(&format!("logits row {x_row} (chunk {chunk})"), &got[out_row * vocab..(out_row + 1) * vocab], &cpu, TOL);
        }
        assert!(got[2 * vocab..].iter().all(|&v| v == 7.0), "a row not asked for was written");
        assert!(head.logits_row(&out, 3, &gx, 0, &gw, hidden, vocab).is_err(), "output row out of range");
        assert!(head.logits_row(&out, 0, &gx, 3, &gw, hidden, vocab).is_err(), "input row out of range");
    }
}

#[test]
fn lm_head_handles_a_qwen2_sized_vocabulary() {
    let ctx = ctx();
    let mut rng = SplitMix64::new(10);
    let s = HeadShape { rows: 3, hidden: 16, vocab: 151_936 };
    let case = HeadCase {
        s,
        x: uniform_vec(&mut rng, s.rows * s.hidden, 1.0),
        w: uniform_vec(&mut rng, s.vocab * s.hidden, 1.0),
        targets: vec![5, 100_000, 151_935],
        coef: vec![0.5, -1.0, 0.25],
        dx0: vec![0.0; s.rows * s.hidden],
        dw0: vec![0.0; s.vocab * s.hidden],
    };
    let cpu = case.cpu();
    let head = LmHead::new(&ctx, 8192);
    // one run: the same kernels' run-twice check is the chunked test above, and
    // a second pass here would double the slowest test on lavapipe (~5 s a pass)
    let gpu = case.gpu(&ctx, &head);
    assert_close("head logp", &gpu[0], &cpu[0], TOL);
    assert_close("head lse", &gpu[1], &cpu[1], TOL);
    assert_close("head dx", &gpu[2], &cpu[2], LARGE_VOCAB_TOL);
    assert_close("head dw", &gpu[3], &cpu[3], TOL);
}

#[test]
fn sequence_sum_adds_the_scored_rows_into_their_slot() {
    let ctx = ctx();
    let sum = SequenceSum::new(&ctx);
    let mut rng = SplitMix64::new(12);
    // 600 rows: every lane of the 256-wide workgroup sums two or three of them
    let values = uniform_vec(&mut rng, 600, 8.0);
    let mask: Vec<u32> = (0..values.len()).map(|_| u32::from(rng.below(3) != 0)).collect();
    let mut with_nan = values.clone();
    for (v, &m) in with_nan.iter_mut().zip(&mask) {
        if m == 0 {
            // an unscored row is skipped, never multiplied by 0
            *v = f32::NAN;
        }
    }
    let expected: f64 = values.iter().zip(&mask).filter(|&(_, &m)| m != 0).map(|(&v, _)| v as f64).sum();
    let short = [1.5f32, -2.0, 4.0];
    let gpu = deterministic("sequence sum", || {
        let totals = up(&ctx, &[7.0, 7.0, 7.0]);
        sum.sum(&totals, 1, &up(&ctx, &with_nan), &up_u32(&ctx, &mask)).unwrap();
        sum.sum(&totals, 2, &up(&ctx, &short), &up_u32(&ctx, &[0, 1, 1])).unwrap();
        vec![read(&ctx, &totals)]
    });
    let totals = &gpu[0];
    assert_eq!(totals[0], 7.0, "a slot no sequence wrote changed");
    assert_close("sequence sum", &totals[1..2], &[expected as f32], TOL);
    assert_eq!(totals[2], 2.0, "three rows, the first unscored");
    assert!(sum.sum(&up(&ctx, &[0.0]), 1, &up(&ctx, &short), &up_u32(&ctx, &[0, 1, 1])).is_err(), "slot outside the totals");
}

#[test]
fn preference_loss_gradients_match_cpu() {
    let ctx = ctx();
    let mut rng = SplitMix64::new(11);
    let pairs = 9;
    let logps = |rng: &mut SplitMix64| -> Vec<f32> { (0..pairs).map(|_| -40.0 + rng.uniform_f32(30.0)).collect() };
    let (pc, pr, rc, rr) = (logps(&mut rng), logps(&mut rng), logps(&mut rng), logps(&mut rng));
    let cases = [
        (PreferenceLossKind::Sigmoid, LossKind::Sigmoid, 0.1, 0.0),
        (PreferenceLossKind::Sigmoid, LossKind::Sigmoid, 0.5, 0.2),
        (PreferenceLossKind::Ipo, LossKind::Ipo, 0.1, 0.0),
        // β = 0.05 puts some pairs on each side of the hinge
        (PreferenceLossKind::Hinge, LossKind::Hinge, 0.05, 0.0),
    ];
    for (gpu_kind, cpu_kind, beta, smoothing) in cases {
        let loss = PreferenceLoss::new(&ctx, gpu_kind, beta as f32, smoothing as f32).unwrap();
        let gpu = deterministic(&format!("{gpu_kind:?} loss"), || {
            let (a, b, c, d) = (up(&ctx, &pc), up(&ctx, &pr), up(&ctx, &rc), up(&ctx, &rr));
            let (dc, dr) = (GpuVec::zeros(&ctx, "dc", pairs).unwrap(), GpuVec::zeros(&ctx, "dr", pairs).unwrap());
            let mean = GpuVec::zeros(&ctx, "loss", 1).unwrap();
            let inputs = PairLogps { policy_chosen: &a, policy_rejected: &b, ref_chosen: &c, ref_rejected: &d };
            loss.batch(inputs, &dc, &dr, &mean).unwrap();
            vec![read(&ctx, &mean), read(&ctx, &dc), read(&ctx, &dr)]
        });
        let cpu = DpoLoss::new(cpu_kind, beta, smoothing).unwrap().batch(&pc, &pr, &rc, &rr).unwrap();
        let what = format!("{cpu_kind:?} β={beta} ε={smoothing}");
        assert_close(&format!("{what} loss"), &gpu[0], &[cpu.loss as f32], TOL);
        assert_close(&format!("{what} d_chosen"), &gpu[1], &cpu.d_chosen, TOL);
        assert_close(&format!("{what} d_rejected"), &gpu[2], &cpu.d_rejected, TOL);
    }
}

#[test]
fn ids_outside_the_vocabulary_give_nan_not_a_wrong_number() {
    let ctx = ctx();
    let (vocab, cols) = (5, 4);
    let table = up(&ctx, &vec![1.0; vocab * cols]);
    let x = GpuVec::zeros(&ctx, "x", 2 * cols).unwrap();
    Embedding::new(&ctx).forward(&x, &up_u32(&ctx, &[4, 5]), &table, cols).unwrap();
    let x = read(&ctx, &x);
    assert!(x[..cols].iter().all(|&v| v == 1.0) && x[cols..].iter().all(|v| v.is_nan()), "{x:?}");

    let s = HeadShape { rows: 2, hidden: cols, vocab };
    let (logp, lse) = (GpuVec::zeros(&ctx, "logp", 2).unwrap(), GpuVec::zeros(&ctx, "lse", 2).unwrap());
    let hidden = up(&ctx, &[0.5; 8]);
    let m = HeadMetrics::zeros(&ctx, 2).unwrap();
    LmHead::new(&ctx, 2).forward(&logp, &lse, &m, &hidden, &table, &up_u32(&ctx, &[4, 5]), s).unwrap();
    let logp = read(&ctx, &logp);
    // five equal logits: log p = −ln 5 for the id in range
    assert!((logp[0] + 5f32.ln()).abs() < 1e-6 && logp[1].is_nan(), "{logp:?}");
}
