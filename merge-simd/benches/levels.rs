//! The threaded CPU step at each vector level this CPU has, on 1 and 2 threads:
//! 16M float32 parameters in one tensor, plain AdamW, OnDARE and OnTIES
//! (reference variants, per tensor), minimum wall time of 5 steps after a warm-up.
//! Every level gives the same bits (checked here on the final state, and by
//! `tests/levels.rs` for every kernel).
//!
//! `cargo bench -p merge-simd --bench levels [-- WORD]` (WORD: only the steps whose name contains it)

use std::time::Instant;

use merge_core::dare::DareConfig;
use merge_core::dtype::Src;
use merge_core::hyper::AdamConfig;
use merge_core::optim::{Merge, OnlineConfig, Optimizer, TiesConfig};
use merge_core::parallel::{ParallelJob, Param, TaskVector, step_tensors};
use merge_simd::{Cpu, Level};

const N: usize = 16 << 20;

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

fn main() {
    let g = fill(1, 1e-2);
    let tau = fill(2, 1e-3);
    let mut levels: Vec<Cpu> = Level::ALL.into_iter().map(Cpu::at_most).collect();
    levels.dedup();
    let adam = AdamConfig { lr: 1e-4, weight_decay: 0.01, ..AdamConfig::default() };
    let cases = [("AdamW", Merge::None), ("OnDARE", Merge::Dare(DareConfig::default())), ("OnTIES", Merge::Ties(TiesConfig::default()))];
    println!("{N} float32 parameters, one tensor; ms per step (min of 5), speed-up over baseline");
    print!("{:<8} {:>7}", "step", "threads");
    for cpu in &levels {
        print!(" {:>16}", cpu.level().name());
    }
    println!();
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    for (what, merge) in cases {
        if filter.as_deref().is_some_and(|f| !what.contains(f)) {
            continue;
        }
        let opt = Optimizer::new(OnlineConfig { adam, merge, k: 1, seed: 7 }).unwrap();
        let plan = opt.plan(10).unwrap();
        for threads in [1, 2] {
            print!("{what:<8} {threads:>7}");
            let mut base = None;
            let mut first_bits = None;
            for cpu in &levels {
                let (mut theta, mut m, mut v) = (fill(3, 1.0), vec![0.0f32; N], vec![0.0f32; N]);
                let mut best = f64::INFINITY;
                for rep in 0..6 {
                    let start = Instant::now();
                    let mut jobs = [ParallelJob { name: "model.layers.0.mlp.up_proj.weight", grad: Src::F32(&g), theta: Param::F32(&mut theta), m: &mut m, v: &mut v, cached: None, tau: TaskVector::Dense(Src::F32(&tau)) }];
                    step_tensors(&plan, &mut jobs, threads, cpu).unwrap();
                    if rep > 0 {
                        best = best.min(start.elapsed().as_secs_f64());
                    }
                }
                let bits: Vec<u32> = theta.iter().chain(&m).chain(&v).map(|x| x.to_bits()).collect();
                assert!(first_bits.get_or_insert_with(|| bits.clone()) == &bits, "{what}: {} gave other bits", cpu.level().name());
                let base = *base.get_or_insert(best);
                print!(" {:>8.1} ({:>4.2}x)", best * 1e3, base / best);
            }
            println!();
        }
    }
}
