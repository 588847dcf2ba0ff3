//! CPU step throughput on 16M-element tensors (issue 2 item 5): plain AdamW, OnDARE
//! and OnTIES, reported as bytes moved per second next to a memcpy of the same
//! number of bytes, on one thread, in one run.
//!
//! Bytes moved per element, counted once per step whatever the passes: AdamW
//! reads θ, m, v, g and writes θ, m, v (28 B); OnDARE and OnTIES also read τ'
//! (32 B). A memcpy of B bytes moves 2·B. "in place, validated" is
//! `step_tensor` (a validating pass, then the writing pass; OnTIES and the L1
//! rescale add their pass over the update); "one pass" is `step_tensor_into`.
//! Where the in-place step is check + write only, a second line gives the rate at
//! the bytes both passes really move (the inputs are read twice: 44 B for AdamW,
//! 52 B for OnDARE). `-- WORD` runs only the cases whose name contains WORD.
//! Times are this thread's CPU time (`/proc/thread-self/schedstat`), best of 5.
//! `cargo bench -p merge-core --bench cpu_step`

use merge_core::dare::{DareConfig, DareVariant};
use merge_core::dtype::Src;
use merge_core::hyper::AdamConfig;
use merge_core::onties;
use merge_core::optim::{Merge, OnlineConfig, Optimizer, TensorState, TiesConfig};
use merge_core::step::{StateMut, StateRef};
use std::hint::black_box;
use std::time::Instant;

const N: usize = 16 << 20;
const REPS: usize = 5;

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
/// time other processes take on a busy machine is not counted; wall time where
/// the kernel does not provide it.
fn on_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

/// Best of `REPS` runs, in seconds of this thread's CPU time.
fn best(mut f: impl FnMut()) -> f64 {
    f();
    (0..REPS)
        .map(|_| {
            let t = Instant::now();
            let c = on_cpu_ns();
            f();
            match (c, on_cpu_ns()) {
                (Some(a), Some(b)) => (b - a) as f64 * 1e-9,
                _ => t.elapsed().as_secs_f64(),
            }
        })
        .fold(f64::INFINITY, f64::min)
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
    // Ten copies per timing, so the timed span is as long as a step's.
    let memcpy = best(|| {
        for _ in 0..10 {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        }
    }) / 10.0;
    let memcpy_gbs = (2 * 4 * N) as f64 / memcpy / 1e9;
    println!("{N} elements, one thread, best of {REPS}");
    println!("{:<44} {:>8.2} ms  {memcpy_gbs:>7.2} GB/s  (read + write)", "memcpy 64 MiB", memcpy * 1e3);

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
    for (what, merge, bytes) in cases {
        if filter.as_deref().is_some_and(|f| !what.contains(f)) {
            continue;
        }
        let opt = Optimizer::new(OnlineConfig { adam, merge, k: 1, seed: 7 }).unwrap();
        let plan = opt.plan(10).unwrap();
        let in_place = best(|| {
            let state = TensorState { theta: &mut theta, m: &mut m, v: &mut v, cached: None, tau: Src::F32(&tau) };
            plan.step_tensor_with_scratch(name, &g, state, &mut scratch).unwrap();
        });
        report(&format!("{what}: in place, validated"), bytes, in_place, memcpy_gbs);
        if !plan.needs_norms() && !plan.needs_update_scratch() {
            // Check + write read every input twice: the bytes the memory system
            // actually moves are the nominal ones plus one more read of the inputs.
            let actual = bytes + (bytes - 12);
            let gbs = (actual * N) as f64 / in_place / 1e9;
            println!("{:<44} {:>11}  {gbs:>7.2} GB/s  {:>5.1}% of memcpy  (at the {actual} B/element both passes move)", "", "", 100.0 * gbs / memcpy_gbs);
            let one_pass = best(|| {
                let old = StateRef { theta: &theta, m: &m, v: &v, cached: None };
                let new = StateMut { theta: &mut theta2, m: &mut m2, v: &mut v2, cached: None };
                plan.step_tensor_into(name, &g, old, Src::F32(&tau), new).unwrap();
            });
            report(&format!("{what}: one pass, out of place"), bytes, one_pass, memcpy_gbs);
        }
    }
}
