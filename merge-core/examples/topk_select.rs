//! Cost of the top-k threshold (SPEC.md §4) on 16M-element tensors, one thread,
//! next to a memcpy of the same tensor, in this thread's CPU time (best of 5).
//!
//! `cargo run --release -p merge-core --example topk_select`
//!
//! Three value distributions: uniform magnitudes (few candidates after the first
//! pass), an Adam-like update `m/(√v + ε)` (many equal magnitudes, so index passes
//! run), and a first Adam step (almost every magnitude equal).

use merge_core::topk::{Candidate, RadixSelect, magnitude_key, select, select_with_scratch};
use std::hint::black_box;
use std::time::Instant;

const N: usize = 16 << 20;

fn on_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

/// Best of five, in milliseconds of this thread's CPU time (wall time where the
/// kernel does not report it).
fn best(mut f: impl FnMut()) -> f64 {
    f();
    (0..5)
        .map(|_| {
            let (t, c) = (Instant::now(), on_cpu_ns());
            f();
            match (c, on_cpu_ns()) {
                (Some(a), Some(b)) => (b - a) as f64 * 1e-6,
                _ => t.elapsed().as_secs_f64() * 1e3,
            }
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let mut s = 0x1234_5678_9abc_def0u64;
    let mut unit = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let uniform: Vec<f32> = (0..N).map(|_| unit() * 1e-3).collect();
    let adam_like: Vec<f32> = (0..N)
        .map(|_| {
            let (g1, g2) = (unit(), unit());
            let (m, v) = (0.1 * g1 + 0.09 * g2, 0.001 * g1 * g1 + 0.000999 * g2 * g2);
            1e-6 * m / (v.sqrt() + 1e-8)
        })
        .collect();
    let first_step: Vec<f32> = (0..N)
        .map(|_| {
            let g = unit();
            -1e-6 * (0.1 * g) / ((0.001f32 * g * g).sqrt() + 1e-8)
        })
        .collect();

    let src = vec![1.0f32; N];
    let mut dst = vec![0.0f32; N];
    let memcpy = best(|| {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    });
    println!("{N} elements, one thread, best of 5 (CPU time)");
    println!("memcpy 64 MiB: {memcpy:.1} ms");

    let mut scratch = vec![Candidate::default(); N / 4];
    for (name, v) in [("uniform", &uniform), ("Adam-like", &adam_like), ("first Adam step", &first_step)] {
        let k = N as u64 / 100; // p = 0.01, the paper's reserve rate
        let plain = best(|| {
            black_box(select("t", &[v], k).unwrap());
        });
        let gathered = best(|| {
            black_box(select_with_scratch("t", &[v], k, &mut scratch).unwrap());
        });
        let first_pass = best(|| {
            let mut sel = RadixSelect::new("t", N as u64, k).unwrap();
            sel.feed_values(0, v).unwrap();
            black_box(sel.finish_pass().unwrap());
        });
        let t = select_with_scratch("t", &[v], k, &mut scratch).unwrap();
        assert_eq!(t, select("t", &[v], k).unwrap());
        let keep = best(|| {
            let mut kept = 0u64;
            for (c, chunk) in v.chunks(4096).enumerate() {
                let local = t.local((c * 4096) as u64);
                let mut in_chunk = 0u32;
                for (j, &x) in chunk.iter().enumerate() {
                    in_chunk += u32::from(local.keeps(magnitude_key(x), j as u32));
                }
                kept += u64::from(in_chunk);
            }
            assert_eq!(black_box(kept), k);
        });
        println!(
            "{name:>16}, p = 0.01: select {plain:6.1} ms; with scratch for N/4 candidates {gathered:6.1} ms \
             (first pass alone {first_pass:5.1} ms); counting the kept {keep:5.1} ms"
        );
    }
}
