//! Every level this CPU has gives the portable build's bits, for every kernel
//! of the step (AdamW in both forms, step-K's accumulating and merging steps,
//! OnDARE and OnTIES in both variants, the L1 rescale, global scope), binary32
//! and bfloat16 parameters, dense and packed task vectors, on 1 and 2 threads;
//! and a non-finite value is named the same and writes nothing. The one-thread
//! entry `StepPlan::step_tensors_with` is compared the same way.

#![allow(clippy::result_large_err)] // merge-core's errors name their tensor inline, as merge-core allows

use merge_core::dare::{DareConfig, DareVariant};
use merge_core::dtype::{Src, f32_to_bf16};
use merge_core::hyper::{AdamConfig, AdamForm};
use merge_core::onties::Variant;
use merge_core::optim::{Merge, OnlineConfig, Optimizer, Scope, StepJob, StepPlan, TiesConfig};
use merge_core::parallel::{CHUNK, ParallelJob, Param, TaskVector, step_tensors};
use merge_core::step::{ChunkPasses, Portable, StateMut};
use merge_core::rng::SplitMix64;
use merge_simd::{Cpu, Level};

/// Sizes around the chunk and block boundaries, in ascending name order (global scope).
const TENSORS: [(&str, usize); 3] = [("a.bias", 7), ("b.weight", CHUNK + 3), ("c.weight", 2 * CHUNK + 301)];

#[derive(Clone, PartialEq, Debug)]
struct State {
    theta: Vec<f32>,
    bf16: Vec<u16>,
    m: Vec<f32>,
    v: Vec<f32>,
    cached: Vec<f32>,
    tau: Vec<f32>,
}

/// Values with the flush rule's edge cases mixed in: subnormals, `-0.0`, and
/// magnitudes whose products underflow.
fn draw(rng: &mut SplitMix64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 97 {
            0 => f32::from_bits(0x0000_0400),
            1 => -0.0,
            2 => f32::from_bits(0x8060_0000),
            3 => 1e-30 * scale,
            _ => rng.uniform_f32(1.0) * scale,
        })
        .collect()
}

fn states() -> Vec<State> {
    let mut rng = SplitMix64::new(11);
    TENSORS
        .iter()
        .map(|&(_, n)| {
            let theta = draw(&mut rng, n, 0.5);
            let bf16 = theta.iter().map(|&x| f32_to_bf16(x).unwrap()).collect();
            let tau = draw(&mut rng, n, 1e-3).iter().enumerate().map(|(i, &x)| if i % 3 == 0 { x } else { 0.0 }).collect();
            State { theta, bf16, m: vec![0.0; n], v: vec![0.0; n], cached: vec![0.0; n], tau }
        })
        .collect()
}

fn configs() -> Vec<(String, OnlineConfig)> {
    let dare = |variant, rescale| Merge::Dare(DareConfig { variant, p: 0.3, alpha: 0.1, rescale, clip: 1e-3 });
    let ties = |variant, rescale, scope| Merge::Ties(TiesConfig { variant, p: 0.05, alpha: 0.1, rescale, scope });
    let merges = [
        ("adamw", Merge::None),
        ("dare", dare(DareVariant::Reference, false)),
        ("dare-rescale", dare(DareVariant::Reference, true)),
        ("dare-paper", dare(DareVariant::Paper, false)),
        ("dare-paper-rescale", dare(DareVariant::Paper, true)),
        ("ties", ties(Variant::Reference, false, Scope::PerTensor)),
        ("ties-paper-rescale", ties(Variant::Paper, true, Scope::PerTensor)),
        ("ties-global-rescale", ties(Variant::Reference, true, Scope::Global)),
    ];
    let mut out = Vec::new();
    for form in [AdamForm::HuggingFace, AdamForm::Torch] {
        let adam = AdamConfig { form, lr: 1e-3, weight_decay: 0.01, ..AdamConfig::default() };
        for (name, merge) in merges {
            for k in [1, 2] {
                out.push((format!("{name} {form:?} k={k}"), OnlineConfig { adam, merge, k, seed: 5 }));
            }
        }
    }
    out
}

/// `τ'` without its `+0` entries: the stored-element bits and the values.
fn pack(tau: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut stored = vec![0u8; tau.len().div_ceil(8)];
    let mut values = Vec::new();
    for (i, &x) in tau.iter().enumerate() {
        if x.to_bits() != 0 {
            stored[i / 8] |= 1 << (i % 8);
            values.push(x);
        }
    }
    (stored, values)
}

struct Run {
    threads: usize,
    packed: bool,
    bf16: bool,
}

fn step(plan: &StepPlan, st: &mut [State], g: &[Vec<f32>], k: u32, run: &Run, passes: &dyn ChunkPasses) -> Result<(), merge_core::Error> {
    let packs: Vec<(Vec<u8>, Vec<f32>)> = st.iter().map(|s| pack(&s.tau)).collect();
    let mut jobs: Vec<ParallelJob<'_>> = st
        .iter_mut()
        .zip(g)
        .zip(TENSORS)
        .zip(&packs)
        .map(|(((s, g), (name, _)), (stored, values))| ParallelJob {
            name,
            grad: Src::F32(g),
            theta: if run.bf16 { Param::Bf16(&mut s.bf16) } else { Param::F32(&mut s.theta) },
            m: &mut s.m,
            v: &mut s.v,
            cached: (k > 1).then_some(&mut s.cached[..]),
            tau: if run.packed { TaskVector::Packed { stored, values } } else { TaskVector::Dense(Src::F32(&s.tau)) },
        })
        .collect();
    step_tensors(plan, &mut jobs, run.threads, passes)
}

fn levels() -> Vec<Cpu> {
    let mut out: Vec<Cpu> = Level::ALL.into_iter().map(Cpu::at_most).collect();
    out.dedup();
    out
}

#[test]
fn every_level_gives_the_portable_bits() {
    let levels = levels();
    eprintln!("levels on this CPU: {:?}", levels.iter().map(|c| c.level().name()).collect::<Vec<_>>());
    let runs = [Run { threads: 1, packed: false, bf16: false }, Run { threads: 2, packed: true, bf16: true }];
    for (label, cfg) in configs() {
        for run in &runs {
            let mut opt = Optimizer::new(cfg).unwrap();
            let mut want = states();
            let mut got: Vec<Vec<State>> = levels.iter().map(|_| states()).collect();
            let mut rng = SplitMix64::new(2);
            for _ in 0..3 {
                let plan = opt.begin_step().unwrap();
                let g: Vec<Vec<f32>> = TENSORS.iter().map(|&(_, n)| draw(&mut rng, n, 1e-2)).collect();
                step(&plan, &mut want, &g, cfg.k, run, &Portable).unwrap();
                for (st, cpu) in got.iter_mut().zip(&levels) {
                    step(&plan, st, &g, cfg.k, run, cpu).unwrap();
                    let same = st.iter().zip(&want).all(|(a, b)| bits(&a.theta) == bits(&b.theta) && a.bf16 == b.bf16 && bits(&a.m) == bits(&b.m) && bits(&a.v) == bits(&b.v) && bits(&a.cached) == bits(&b.cached));
                    assert!(same, "{label}: {} differs from the portable build at step {} ({} threads)", cpu.level().name(), plan.step(), run.threads);
                }
            }
            let moved = if run.bf16 { want[2].bf16 != states()[2].bf16 } else { bits(&want[2].theta) != bits(&states()[2].theta) };
            assert!(moved, "{label}: the step changed nothing");
        }
    }
}

/// `StepPlan::step_tensors_with` on the caller's thread: every level gives the
/// bits of `step_tensors` (the portable passes).
#[test]
fn the_one_thread_entry_gives_the_portable_bits_at_every_level() {
    let one = |plan: &StepPlan, st: &mut [State], g: &[Vec<f32>], k: u32, passes: &dyn ChunkPasses| {
        let mut scratch: Vec<Vec<f32>> = g.iter().map(|x| vec![0.0; x.len()]).collect();
        let mut jobs: Vec<StepJob<'_>> = st
            .iter_mut()
            .zip(g)
            .zip(TENSORS)
            .zip(scratch.iter_mut())
            .map(|(((s, g), (name, _)), scratch)| StepJob {
                name,
                grad: g,
                state: StateMut { theta: &mut s.theta, m: &mut s.m, v: &mut s.v, cached: (k > 1).then_some(&mut s.cached[..]) },
                tau: Src::F32(&s.tau),
                scratch,
            })
            .collect();
        plan.step_tensors_with(&mut jobs, passes).unwrap();
    };
    for (label, cfg) in configs() {
        let mut opt = Optimizer::new(cfg).unwrap();
        let mut want = states();
        let mut got: Vec<Vec<State>> = levels().iter().map(|_| states()).collect();
        let mut rng = SplitMix64::new(4);
        for _ in 0..2 {
            let plan = opt.begin_step().unwrap();
            let g: Vec<Vec<f32>> = TENSORS.iter().map(|&(_, n)| draw(&mut rng, n, 1e-2)).collect();
            one(&plan, &mut want, &g, cfg.k, &Portable);
            for (st, cpu) in got.iter_mut().zip(levels()) {
                one(&plan, st, &g, cfg.k, &cpu);
                let same = st.iter().zip(&want).all(|(a, b)| bits(&a.theta) == bits(&b.theta) && bits(&a.m) == bits(&b.m) && bits(&a.v) == bits(&b.v) && bits(&a.cached) == bits(&b.cached));
                assert!(same, "{label}: {} differs from the portable passes at step {}", cpu.level().name(), plan.step());
            }
        }
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn a_non_finite_gradient_is_named_alike_and_nothing_is_written() {
    for (label, cfg) in configs().into_iter().filter(|(_, c)| c.k == 1) {
        let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
        let mut g: Vec<Vec<f32>> = TENSORS.iter().map(|&(_, n)| vec![1e-3; n]).collect();
        g[2][2 * CHUNK + 7] = f32::NAN;
        g[2][CHUNK + 9] = f32::INFINITY;
        let run = Run { threads: 2, packed: false, bf16: false };
        let want = step(&plan, &mut states(), &g, 1, &run, &Portable).unwrap_err();
        for cpu in levels() {
            let mut st = states();
            assert_eq!(step(&plan, &mut st, &g, 1, &run, &cpu).unwrap_err(), want, "{label} at {}", cpu.level().name());
            assert!(st == states(), "{label}: {} wrote after an error", cpu.level().name());
        }
    }
}

#[test]
fn a_level_is_never_wider_than_the_cpu() {
    for limit in Level::ALL {
        let cpu = Cpu::at_most(limit);
        assert!(cpu.level() <= limit && cpu.level() <= Level::detected());
    }
    assert_eq!(Cpu::detect().level(), Level::detected());
    assert_eq!(Level::parse("avx512"), Some(Level::Avx512));
    assert_eq!(Level::parse("sse"), None);
}

#[test]
fn the_largest_bits_are_the_same_at_every_level() {
    let mut rng = SplitMix64::new(9);
    let mut values = draw(&mut rng, 1000, 3.0);
    for (at, x) in [(0, -0.0), (17, f32::NEG_INFINITY), (999, -1e-40)] {
        let mut v = values.clone();
        v[at] = x;
        values.extend(v);
    }
    values.push(f32::NAN);
    for len in [0, 1, 15, 16, 17, 1000, 2000, values.len()] {
        for mask in [0x7fff_ffff, u32::MAX] {
            let want = values[..len].iter().map(|x| x.to_bits() & mask).max().unwrap_or(0);
            for cpu in levels() {
                assert_eq!(cpu.largest_bits(&values[..len], mask), want, "{len} values, mask {mask:#x}, {}", cpu.level().name());
            }
        }
    }
}
