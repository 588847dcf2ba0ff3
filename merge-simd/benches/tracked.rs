//! The Python package's step without Python: 17.3M float32 parameters in 47
//! Llama-shaped tensors (hidden 512, MLP 1024, 5 layers, vocabulary 4096: the
//! `16m-47` set of `python/benches/optimizer_step.py`), `τ'` packed with about 1%
//! of it stored, through `parallel::step_tensors_tracked` with the bounds kept
//! from step to step, at the CPU's widest level. Prints the minimum wall time
//! over the steps after the first, and a hash of the final parameters and
//! moments, so that two builds can be timed alternately and their bits compared.
//!
//! `cargo bench -p merge-simd --bench tracked -- [adamw|ondare] [THREADS] [STEPS]`
//! (defaults: ondare, 1, 20)

use std::time::Instant;

use merge_core::dare::DareConfig;
use merge_core::dtype::Src;
use merge_core::hyper::AdamConfig;
use merge_core::optim::{Merge, OnlineConfig, Optimizer};
use merge_core::parallel::{ParallelJob, Param, Scratch, StateBounds, TaskVector, step_tensors_tracked};
use merge_core::rng::SplitMix64;
use merge_simd::Cpu;

fn llama_shapes() -> Vec<(String, usize)> {
    let (hidden, mlp, layers, vocab) = (512, 1024, 5, 4096);
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vocab * hidden), ("lm_head.weight".to_string(), vocab * hidden)];
    for i in 0..layers {
        let pre = format!("model.layers.{i}.");
        for x in ["q", "k", "v", "o"] {
            shapes.push((format!("{pre}self_attn.{x}_proj.weight"), hidden * hidden));
        }
        for x in ["gate", "up", "down"] {
            shapes.push((format!("{pre}mlp.{x}_proj.weight"), mlp * hidden));
        }
        shapes.push((format!("{pre}input_layernorm.weight"), hidden));
        shapes.push((format!("{pre}post_attention_layernorm.weight"), hidden));
    }
    shapes
}

/// A uniform value in `[−scale/2, scale/2)`.
fn uniform(rng: &mut SplitMix64, scale: f32) -> f32 {
    ((rng.next_u64() >> 40) as f32 / (1u32 << 24) as f32 - 0.5) * scale
}

fn filled(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| uniform(&mut rng, scale)).collect()
}

/// `τ'` as the package keeps it: a bit per element, and the stored values.
fn packed_tau(seed: u64, n: usize) -> (Vec<u8>, Vec<f32>) {
    let mut rng = SplitMix64::new(seed);
    let mut stored = vec![0u8; n.div_ceil(8)];
    let mut values = Vec::new();
    for i in 0..n {
        if rng.next_u64().is_multiple_of(100) {
            stored[i / 8] |= 1 << (i % 8);
            // Never +0: a stored value is one whose bits are not +0's.
            values.push(uniform(&mut rng, 2e-3) + 1e-6);
        }
    }
    (stored, values)
}

fn main() {
    // cargo passes `--bench` first.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let kind = args.first().map_or("ondare", String::as_str);
    let threads: usize = args.get(1).map_or(1, |s| s.parse().expect("THREADS: a number"));
    let steps: u64 = args.get(2).map_or(20, |s| s.parse().expect("STEPS: a number"));
    let merge = match kind {
        "adamw" => Merge::None,
        "ondare" => Merge::Dare(DareConfig { p: 0.01, alpha: 1e-7, ..DareConfig::default() }),
        _ => panic!("the kind is adamw or ondare, not {kind}"),
    };
    let shapes = llama_shapes();
    let mut theta: Vec<Vec<f32>> = shapes.iter().zip(0..).map(|((_, n), i)| filled(i, *n, 0.04)).collect();
    let grads: Vec<Vec<f32>> = shapes.iter().zip(0..).map(|((_, n), i)| filled(100 + i, *n, 2e-3)).collect();
    let mut m: Vec<Vec<f32>> = shapes.iter().map(|(_, n)| vec![0.0; *n]).collect();
    let mut v: Vec<Vec<f32>> = shapes.iter().map(|(_, n)| vec![0.0; *n]).collect();
    let taus: Vec<(Vec<u8>, Vec<f32>)> = shapes.iter().zip(0..).map(|((_, n), i)| packed_tau(1000 + i, *n)).collect();
    let optimizer = Optimizer::new(OnlineConfig { adam: AdamConfig { lr: 1e-6, ..AdamConfig::default() }, merge, k: 1, seed: 1 }).unwrap();
    let cpu = Cpu::detect();
    let mut scratch = Scratch::with_room(|n| vec![0.0; n]);
    let mut bounds = vec![StateBounds::UNKNOWN; shapes.len()];
    let mut best = f64::INFINITY;
    for step in 1..=steps {
        let plan = optimizer.plan(step).unwrap();
        let mut jobs: Vec<ParallelJob> = Vec::with_capacity(shapes.len());
        for (i, ((theta, m), v)) in theta.iter_mut().zip(&mut m).zip(&mut v).enumerate() {
            let tau = match merge {
                Merge::None => TaskVector::Dense(Src::F32(&[])),
                _ => TaskVector::Packed { stored: &taus[i].0, values: &taus[i].1 },
            };
            jobs.push(ParallelJob { name: &shapes[i].0, grad: Src::F32(&grads[i]), theta: Param::F32(theta), m, v, cached: None, tau });
        }
        let start = Instant::now();
        step_tensors_tracked(&plan, &mut jobs, threads, &cpu, &mut scratch, &mut bounds).unwrap();
        if step > 1 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    // FNV-1a over the final bits.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for x in theta.iter().chain(&m).chain(&v).flatten() {
        hash = (hash ^ u64::from(x.to_bits())).wrapping_mul(0x0100_0000_01b3);
    }
    println!("{kind}, {threads} thread(s), {}: {:.2} ms (minimum of {} steps), state hash {hash:016x}", cpu.level().name(), best * 1e3, steps.saturating_sub(1));
}
