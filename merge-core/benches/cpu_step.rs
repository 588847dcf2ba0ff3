//! CPU step throughput on 16M-element tensors (issue 2 item 5): plain AdamW, OnDARE
//! and OnTIES, reported as bytes moved per second next to a memcpy of the same
//! number of bytes, on one thread, in one run.
//!
//! Bytes moved per element, counted once per step whatever the passes: AdamW
//! reads θ, m, v, g and writes θ, m, v (28 B); OnDARE and OnTIES also read τ'
//! (32 B). A memcpy of B bytes moves 2·B. "in place, validated" is a one-tensor
//! `step_tensors` (a validating pass, then the writing pass; OnTIES and the L1
//! rescale add their pass over the update); "one pass" is the chunk API's
//! out-of-place `TensorStep::write_chunk_into` over the whole tensor.
//! Where the in-place step is check + write only, a second line gives the rate at
//! the bytes both passes really move (the inputs are read twice: 44 B for AdamW,
//! 52 B for OnDARE).
//!
//! The memory system's own limit for each access pattern is measured in the same
//! run: trivial loops (one add or multiply per output, no flush, no random
//! numbers) over OnDARE's streams, out of place, in place, and as check + write.
//! A step cannot beat its pattern's loop, and the loops show what a pattern costs
//! before any arithmetic: glibc's memcpy streams its stores past the cache, while
//! a store to a line not in cache first reads the line (out of place moves 44 B
//! for 32 B counted), which safe Rust cannot avoid.
//!
//! The arithmetic's own cost is split, over a tensor in L2, into the Threefry
//! uniforms and the element arithmetic, the latter also timed without the flush
//! rule (not SPEC arithmetic; it shows what the rule costs on this CPU).
//!
//! `-- WORD` runs only the cases whose name contains WORD. Each figure is the
//! best of 3 spans of this thread's CPU time (`/proc/thread-self/schedstat`), each
//! span repeating the operation for at least 0.4 s: the kernel updates that
//! counter only at scheduler ticks, so a span of one call would be off by up to
//! a tick (4 ms). Wall time where the kernel does not provide it.
//! `cargo bench -p merge-core --bench cpu_step`; with
//! `RUSTFLAGS="-C target-cpu=native"` for the vector width of the machine.

use merge_core::dare::{DareConfig, DareParams, DareVariant};
use merge_core::dtype::Src;
use merge_core::hyper::{AdamConfig, StepScalars};
use merge_core::onties;
use merge_core::optim::{Merge, OnlineConfig, Optimizer, StepJob, TiesConfig};
use merge_core::rng::{MaskKey, tensor_id};
use merge_core::step::{StateMut, StateRef};
use merge_core::{adam, arith, dare};
use std::hint::black_box;
use std::time::Instant;

const N: usize = 16 << 20;
/// Elements of the in-cache run: its eight streams take 512 KiB.
const IN_CACHE: usize = 16 << 10;

fn fill(seed: u32, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9) | 1;
    (0..N)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            ((x >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

/// Nanoseconds this thread has spent on a CPU (first field of schedstat), so that
/// time other processes take on a busy machine is not counted.
fn on_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

/// Seconds per call: the best of 3 spans of at least `SPAN` seconds each.
fn best(mut f: impl FnMut()) -> f64 {
    const SPAN: f64 = 0.4;
    let now = || on_cpu_ns().map_or_else(|| EPOCH.with(|e| e.elapsed().as_secs_f64()), |ns| ns as f64 * 1e-9);
    f();
    (0..3)
        .map(|_| {
            let start = now();
            let mut calls = 0u32;
            while calls == 0 || now() - start < SPAN {
                f();
                calls += 1;
            }
            (now() - start) / f64::from(calls)
        })
        .fold(f64::INFINITY, f64::min)
}

thread_local! {
    static EPOCH: Instant = Instant::now();
}

fn simd_level() -> &'static str {
    if cfg!(target_feature = "avx512f") {
        "compiled for AVX-512"
    } else if cfg!(target_feature = "avx2") {
        "compiled for AVX2"
    } else if cfg!(target_feature = "sse4.1") {
        "compiled for SSE4.1"
    } else if cfg!(target_feature = "sse2") {
        "compiled for SSE2 (the x86-64 default)"
    } else {
        "compiled for the target's default features"
    }
}

/// Seconds per call of the trivial loops over OnDARE's streams (read θ, m, v, g,
/// τ'; write θ, m, v), with adds only so no value drifts into subnormals.
struct PatternLimits {
    out_of_place: f64,
    in_place: f64,
    check_then_write: f64,
}

fn pattern_limits(g: &[f32], tau: &[f32], init: &[f32], memcpy_gbs: f64) -> PatternLimits {
    let (mut theta, mut m, mut v) = (init.to_vec(), init.to_vec(), init.to_vec());
    let (mut theta2, mut m2, mut v2) = (init.to_vec(), init.to_vec(), init.to_vec());
    let out_of_place = best(|| {
        for i in 0..N {
            theta2[i] = theta[i] + tau[i];
            m2[i] = m[i] + g[i];
            v2[i] = v[i] + g[i];
        }
        black_box((&mut theta2, &mut m2, &mut v2));
    });
    let write = |theta: &mut [f32], m: &mut [f32], v: &mut [f32]| {
        for i in 0..N {
            theta[i] += tau[i];
            m[i] += g[i];
            v[i] += g[i];
        }
    };
    let in_place = best(|| {
        write(&mut theta, &mut m, &mut v);
        black_box((&mut theta, &mut m, &mut v));
    });
    let check_then_write = best(|| {
        let mut bits = 0u32;
        for i in 0..N {
            bits |= (theta[i] + tau[i]).to_bits() | (m[i] + g[i]).to_bits() | (v[i] + g[i]).to_bits();
        }
        black_box(bits);
        write(&mut theta, &mut m, &mut v);
        black_box((&mut theta, &mut m, &mut v));
    });
    println!("limits of OnDARE's access pattern (32 B/element counted; trivial loops):");
    report("  out of place, one pass", 32, out_of_place, memcpy_gbs);
    report("  in place, one pass", 32, in_place, memcpy_gbs);
    report("  in place, check + write", 32, check_then_write, memcpy_gbs);
    PatternLimits { out_of_place, in_place, check_then_write }
}

/// OnDARE's in-cache cost split into its parts, per N elements: the Threefry
/// uniforms, and the element arithmetic (reference variant, HF form) with the
/// flush rule of SPEC.md §1.3 and, for comparison only, without it. The flush
/// after every operation is what lets a GPU that flushes subnormals agree.
fn arithmetic_parts(g: &[f32], tau: &[f32], init: &[f32], memcpy_gbs: f64) {
    let n = IN_CACHE;
    let (g, tau) = (&g[..n], &tau[..n]);
    let (mut theta, mut m, mut v) = (init[..n].to_vec(), vec![0.0f32; n], vec![0.0f32; n]);
    let s = AdamConfig { lr: 1e-4, weight_decay: 0.01, ..AdamConfig::default() }.scalars(10).unwrap();
    let dp = DareConfig::default().params().unwrap();
    let key = MaskKey::new(7, tensor_id("w"), 10);
    let mut u = vec![0u32; n];
    let uniforms = best(|| {
        for _ in 0..N / n {
            draw_uniforms(&key, &mut u);
        }
    });
    let mut run = |kernel: ElementKernel| {
        best(|| {
            for _ in 0..N / n {
                black_box(kernel(&s, &dp, g, tau, &u, &mut theta, &mut m, &mut v));
            }
        })
    };
    let (flushed, plain) = (run(ondare_flushed), run(ondare_unflushed));
    println!("parts of OnDARE's cost, {IN_CACHE} elements in L2 (x{}):", N / n);
    report("  Threefry-2x32-20 uniforms", 32, uniforms, memcpy_gbs);
    report("  element arithmetic, flush rule (SPEC)", 32, flushed, memcpy_gbs);
    report("  element arithmetic, no flush (not SPEC)", 32, plain, memcpy_gbs);
}

/// An OnDARE element step over a tensor: scalars, DARE parameters, g, τ', the
/// uniforms, then θ, m, v in place; returns the non-finite flag.
type ElementKernel = fn(&StepScalars, &DareParams, &[f32], &[f32], &[u32], &mut [f32], &mut [f32], &mut [f32]) -> u32;

/// One Threefry block per pair, the halves to even and odd elements.
#[inline(never)]
fn draw_uniforms(key: &MaskKey, u: &mut [u32]) {
    for (p, pair) in u.chunks_exact_mut(2).enumerate() {
        let [a, b] = key.pair(p as u32, 0);
        pair[0] = a;
        pair[1] = b;
    }
}

/// The OnDARE reference element step in place, through merge-core's flushed operations.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn ondare_flushed(s: &StepScalars, dp: &DareParams, g: &[f32], tau: &[f32], u: &[u32], theta: &mut [f32], m: &mut [f32], v: &mut [f32]) -> u32 {
    let n = g.len();
    let (tau, u, theta, m, v) = (&tau[..n], &u[..n], &mut theta[..n], &mut m[..n], &mut v[..n]);
    let mut bad = 0u32;
    for j in 0..n {
        let (m1, v1) = adam::moments(s, arith::flush(g[j]), arith::flush(m[j]), arith::flush(v[j]));
        let d = adam::delta::<false>(s, m1, v1);
        let sp = dare::sparsify(d, dp.keep.keeps(u[j]), dp.scale);
        let th = adam::decay_after::<false>(s, dare::merge_reference(arith::flush(theta[j]), arith::flush(tau[j]), sp, dp.alpha, dp.one_minus_alpha));
        bad |= u32::from(arith::is_non_finite(m1) | arith::is_non_finite(v1) | arith::is_non_finite(th));
        (theta[j], m[j], v[j]) = (th, m1, v1);
    }
    bad
}

/// The same operations in plain binary32, no flush: not SPEC arithmetic.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn ondare_unflushed(s: &StepScalars, dp: &DareParams, g: &[f32], tau: &[f32], u: &[u32], theta: &mut [f32], m: &mut [f32], v: &mut [f32]) -> u32 {
    let n = g.len();
    let (tau, u, theta, m, v) = (&tau[..n], &u[..n], &mut theta[..n], &mut m[..n], &mut v[..n]);
    let mut bad = 0u32;
    for j in 0..n {
        let m1 = s.beta1 * m[j] + s.one_minus_beta1 * g[j];
        let v1 = s.beta2 * v[j] + s.one_minus_beta2 * (g[j] * g[j]);
        let d = s.neg_step_size * (m1 / (v1.sqrt() + s.eps));
        let sp = if dp.keep.keeps(u[j]) { d * dp.scale } else { 0.0 };
        let th1 = (theta[j] + dp.alpha * tau[j]) + dp.one_minus_alpha * sp;
        let th = th1 - s.decay_after * th1;
        bad |= u32::from(arith::is_non_finite(m1) | arith::is_non_finite(v1) | arith::is_non_finite(th));
        (theta[j], m[j], v[j]) = (th, m1, v1);
    }
    bad
}

fn report(what: &str, bytes_per_elem: usize, secs: f64, memcpy_gbs: f64) {
    let gbs = (bytes_per_elem * N) as f64 / secs / 1e9;
    println!("{what:<44} {:>8.2} ms  {gbs:>7.2} GB/s  {:>5.1}% of memcpy", secs * 1e3, 100.0 * gbs / memcpy_gbs);
}

fn main() {
    let g = fill(1, 1e-2);
    let tau = fill(2, 1e-3);
    let mut theta = fill(3, 1.0);
    let mut m = vec![0.0f32; N];
    let mut v = vec![0.0f32; N];

    let src = fill(4, 1.0);
    let mut dst = vec![0.0f32; N];
    let memcpy = best(|| {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    });
    let memcpy_gbs = (2 * 4 * N) as f64 / memcpy / 1e9;
    println!("{N} elements, one thread, {}", simd_level());
    println!("{:<44} {:>8.2} ms  {memcpy_gbs:>7.2} GB/s  (read + write)", "memcpy 64 MiB", memcpy * 1e3);
    let limits = pattern_limits(&g, &tau, &src, memcpy_gbs);
    arithmetic_parts(&g, &tau, &src, memcpy_gbs);

    let adam = AdamConfig { lr: 1e-4, weight_decay: 0.01, ..AdamConfig::default() };
    let dare = |variant, rescale| Merge::Dare(DareConfig { variant, rescale, ..DareConfig::default() });
    let ties = |variant, rescale| Merge::Ties(TiesConfig { variant, rescale, ..TiesConfig::default() });
    let cases: [(&str, Merge, usize); 7] = [
        ("AdamW (HF form)", Merge::None, 28),
        ("OnDARE reference, p=0.01", dare(DareVariant::Reference, false), 32),
        ("OnDARE reference + L1 rescale", dare(DareVariant::Reference, true), 32),
        ("OnDARE paper", dare(DareVariant::Paper, false), 32),
        ("OnTIES reference, p=0.01, per tensor", ties(onties::Variant::Reference, false), 32),
        ("OnTIES reference + L1 rescale", ties(onties::Variant::Reference, true), 32),
        ("OnTIES paper", ties(onties::Variant::Paper, false), 32),
    ];
    let name = "model.layers.0.mlp.up_proj.weight";
    let mut scratch = vec![0.0f32; N];
    let (mut theta2, mut m2, mut v2) = (theta.clone(), m.clone(), v.clone());
    // `cargo bench ... -- WORD` runs only the cases whose name contains WORD
    // (cargo itself passes `--bench`, hence the dash filter).
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    // In-place times of the reference OnDARE and OnTIES, for the "OnTIES within 2x" target.
    let (mut dare_time, mut ties_time) = (None, None);
    for (what, merge, bytes) in cases {
        if filter.as_deref().is_some_and(|f| !what.contains(f)) {
            continue;
        }
        let opt = Optimizer::new(OnlineConfig { adam, merge, k: 1, seed: 7 }).unwrap();
        let plan = opt.plan(10).unwrap();
        let in_place = best(|| {
            let state = StateMut { theta: &mut theta, m: &mut m, v: &mut v, cached: None };
            plan.step_tensors(&mut [StepJob { name, grad: &g, state, tau: Src::F32(&tau), scratch: &mut scratch }]).unwrap();
        });
        report(&format!("{what}: in place, validated"), bytes, in_place, memcpy_gbs);
        match merge {
            Merge::Dare(d) if d.variant == DareVariant::Reference && !d.rescale => dare_time = Some(in_place),
            Merge::Ties(t) if t.variant == onties::Variant::Reference && !t.rescale => ties_time = Some(in_place),
            _ => {}
        }
        let dare_like = matches!(merge, Merge::Dare(_));
        if dare_like {
            println!("{:<44} {:>5.1}% of its pattern's check + write loop", "", 100.0 * limits.check_then_write / in_place);
        }
        if !plan.needs_norms() && !plan.needs_update_scratch() {
            // Check + write read every input twice: the bytes the memory system
            // actually moves are the nominal ones plus one more read of the inputs.
            let actual = bytes + (bytes - 12);
            let gbs = (actual * N) as f64 / in_place / 1e9;
            println!("{:<44} {:>11}  {gbs:>7.2} GB/s  {:>5.1}% of memcpy  (at the {actual} B/element both passes move)", "", "", 100.0 * gbs / memcpy_gbs);
            let one_pass = best(|| {
                let old = StateRef { theta: &theta, m: &m, v: &v, cached: None };
                let new = StateMut { theta: &mut theta2, m: &mut m2, v: &mut v2, cached: None };
                plan.tensor(name, N as u64).unwrap().write_chunk_into(0, &g, old, Src::F32(&tau), new).unwrap();
            });
            report(&format!("{what}: one pass, out of place"), bytes, one_pass, memcpy_gbs);
            if dare_like {
                println!(
                    "{:<44} {:>5.1}% of its pattern's out-of-place loop ({:.1}% of the in-place one)",
                    "",
                    100.0 * limits.out_of_place / one_pass,
                    100.0 * limits.in_place / one_pass
                );
                // The same step over a tensor that stays in L2, scaled to N: the
                // arithmetic's own cost, with memory taken out.
                let cached = best(|| {
                    for _ in 0..N / IN_CACHE {
                        let r = 0..IN_CACHE;
                        let old = StateRef { theta: &theta[r.clone()], m: &m[r.clone()], v: &v[r.clone()], cached: None };
                        let new = StateMut { theta: &mut theta2[r.clone()], m: &mut m2[r.clone()], v: &mut v2[r.clone()], cached: None };
                        plan.tensor(name, IN_CACHE as u64).unwrap().write_chunk_into(0, &g[r.clone()], old, Src::F32(&tau[r]), new).unwrap();
                    }
                });
                report(&format!("{what}: one pass, {IN_CACHE} in L2 (x{})", N / IN_CACHE), bytes, cached, memcpy_gbs);
            }
        }
    }
    if let (Some(d), Some(t)) = (dare_time, ties_time) {
        println!("OnTIES / OnDARE (reference, in place, validated): {:.2}x", t / d);
    }
}
