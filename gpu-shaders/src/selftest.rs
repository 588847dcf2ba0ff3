//! Checks an adapter before trusting it (SPEC.md §8: WGSL does not promise
//! round-to-nearest-even, so the runtime measures it): every primitive of
//! common.wgsl on edge and random operands, and a short OnDARE run, each compared
//! bit for bit with merge-core on this CPU.

use merge_core::arith;
use merge_core::dare::{DareConfig, DareVariant};
use merge_core::dtype::{Dst, Src};
use merge_core::hyper::{AdamConfig, AdamForm};
use merge_core::optim::{Merge, OnlineConfig, Optimizer, StepJob};
use merge_core::step::StateMut;
use merge_core::rng::{tensor_id, threefry2x32_20, MaskKey, SplitMix64};

use crate::context::{describe, GpuContext, GpuError, GpuOptions};
use crate::ops::{Op, Ops, RngParams};
use crate::optim::{GpuOptimizer, TensorInit, Weights};

/// One check: how many cases, how many differed, the first difference.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub name: &'static str,
    pub cases: usize,
    pub mismatches: usize,
    pub first: Option<String>,
}

#[derive(Clone, Debug)]
pub struct SelfTestReport {
    pub adapter: String,
    pub checks: Vec<CheckResult>,
}

impl SelfTestReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.mismatches == 0)
    }
}

impl std::fmt::Display for SelfTestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "adapter: {}", self.adapter)?;
        for c in &self.checks {
            write!(f, "  {:<28} {:>8} cases  {:>6} mismatches", c.name, c.cases, c.mismatches)?;
            if let Some(x) = &c.first {
                write!(f, "  first: {x}")?;
            }
            writeln!(f)?;
        }
        write!(f, "{}", if self.passed() { "PASS: bit-identical to merge-core" } else { "FAIL" })
    }
}

/// Random sign and significand, exponent within 2^±spread (full range when spread ≥ 127),
/// from the fixed SplitMix64 inputs, so a report is reproducible.
fn f32_bits(mix: &mut SplitMix64, spread: u32) -> u32 {
    let r = mix.next_u32();
    let e = if spread >= 127 { r >> 24 } else { 127 - spread + (r >> 8) % (2 * spread) };
    (e << 23) | (mix.next_u32() & 0x807f_ffff)
}

const EDGES: [u32; 16] = [
    0, 0x8000_0000, 1, 0x807f_ffff, 0x0080_0000, 0x8080_0000, 0x7f7f_ffff, 0xff7f_ffff, 0x3f80_0000, 0xbf80_0000,
    0x3f7f_ffff, 0x3f80_0001, 0x00ff_ffff, 0x4000_0000, 0x0100_0000, 0x5f80_0000,
];

fn compare(name: &'static str, gpu: &[u32], cpu: &[u32], inputs: impl Fn(usize) -> String) -> CheckResult {
    let bad: Vec<usize> = (0..gpu.len().min(cpu.len())).filter(|&i| gpu[i] != cpu[i]).collect();
    CheckResult {
        name,
        cases: cpu.len(),
        mismatches: bad.len() + gpu.len().abs_diff(cpu.len()),
        first: bad.first().map(|&i| format!("[{i}] gpu {:#010x} cpu {:#010x} for {}", gpu[i], cpu[i], inputs(i))),
    }
}

/// Runs every check on the adapter `opts` selects.
pub fn self_test(opts: &GpuOptions) -> Result<SelfTestReport, GpuError> {
    let ctx = GpuContext::new(opts)?;
    let adapter = describe(ctx.adapter_info());
    let ops = Ops::new(&ctx);
    let mut mix = SplitMix64::new(0x5e1f_7e57);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for &x in &EDGES {
        for &y in &EDGES {
            a.push(x);
            b.push(y);
        }
    }
    for i in 0..1 << 16 {
        let spread = if i % 2 == 0 { 20 } else { 127 };
        a.push(f32_bits(&mut mix, spread));
        b.push(f32_bits(&mut mix, spread));
    }
    let fl = |x: u32| arith::flush(f32::from_bits(x));
    let mut checks = Vec::new();
    type Binary = (Op, &'static str, fn(f32, f32) -> f32);
    let binary: [Binary; 5] = [
        (Op::Add, "add", arith::add),
        (Op::Sub, "sub", arith::sub),
        (Op::Mul, "mul", arith::mul),
        (Op::MulAdd, "mul then add (no FMA)", |x, y| arith::add(arith::mul(x, y), y)),
        (Op::Div, "div (correctly rounded)", arith::div),
    ];
    for (op, name, f) in binary {
        let gpu = ops.eval(&ctx, op, &a, &b, RngParams::default())?;
        // Non-finite results only need to be non-finite (they are reported, never stored).
        let cpu: Vec<u32> = (0..a.len())
            .map(|i| {
                let r = f(fl(a[i]), fl(b[i]));
                if arith::is_non_finite(r) && arith::is_non_finite(f32::from_bits(gpu[i])) { gpu[i] } else { r.to_bits() }
            })
            .collect();
        checks.push(compare(name, &gpu, &cpu, |i| format!("{:#010x}, {:#010x}", a[i], b[i])));
    }
    let sq: Vec<u32> = a.iter().map(|&x| x & 0x7fff_ffff).collect();
    let gpu = ops.eval(&ctx, Op::Sqrt, &sq, &[], RngParams::default())?;
    let cpu: Vec<u32> = sq
        .iter()
        .zip(&gpu)
        .map(|(&x, &g)| {
            let r = arith::sqrt(fl(x));
            if arith::is_non_finite(r) && arith::is_non_finite(f32::from_bits(g)) { g } else { r.to_bits() }
        })
        .collect();
    checks.push(compare("sqrt (correctly rounded)", &gpu, &cpu, |i| format!("{:#010x}", sq[i])));

    let key = MaskKey::new(0xfeed_beef_0123_4567, tensor_id("self.test"), 9);
    let params = RngParams { k0: key.0[0], k1: key.0[1], ..Default::default() };
    let c0: Vec<u32> = (0..4096).map(|_| mix.next_u32()).collect();
    let c1: Vec<u32> = (0..4096).map(|_| mix.next_u32()).collect();
    let gpu = ops.eval(&ctx, Op::Threefry, &c0, &c1, params)?;
    let cpu: Vec<u32> = c0.iter().zip(&c1).flat_map(|(&x, &y)| threefry2x32_20(key.0, [x, y])).collect();
    checks.push(compare("threefry-2x32-20", &gpu, &cpu, |i| format!("ctr ({:#x}, {:#x})", c0[i / 2], c1[i / 2])));

    let all: Vec<u32> = (0..65536).collect();
    let gpu = ops.eval(&ctx, Op::F16ToF32, &all, &[], RngParams::default())?;
    let cpu: Vec<u32> = all.iter().map(|&h| merge_core::dtype::f16_to_f32(h as u16).to_bits()).collect();
    checks.push(compare("f16 -> f32", &gpu, &cpu, |i| format!("{i:#06x}")));
    checks.push(optimizer_check(opts)?);
    Ok(SelfTestReport { adapter, checks })
}

/// Four OnDARE steps (reference variant, L1 rescale, torch form with decay) on
/// two awkwardly sized tensors, GPU against merge-core.
fn optimizer_check(opts: &GpuOptions) -> Result<CheckResult, GpuError> {
    let dare = DareConfig { variant: DareVariant::Reference, p: 0.1, alpha: 1e-3, rescale: true, clip: 1e-3 };
    let adam = AdamConfig { form: AdamForm::Torch, lr: 1e-3, weight_decay: 0.01, ..AdamConfig::default() };
    let config = OnlineConfig { adam, merge: Merge::Dare(dare), k: 1, seed: 42 };
    let mut mix = SplitMix64::new(77);
    let sizes = [257usize, 1000];
    let names = ["a.weight", "b.weight"];
    let val = |m: &mut SplitMix64, s: f32| ((m.next_u32() >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * s;
    let base: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| val(&mut mix, 1.0)).collect()).collect();
    let sft: Vec<Vec<f32>> = base.iter().map(|b| b.iter().map(|&x| x + val(&mut mix, 0.01)).collect()).collect();
    let mut cpu = Optimizer::new(config)?;
    let mut theta = sft.clone();
    let mut m: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut v = m.clone();
    let mut tau = m.clone();
    for i in 0..2 {
        cpu.init_task_vector(names[i], Src::F32(&base[i]), Src::F32(&sft[i]), &mut Dst::F32(&mut tau[i]))?;
    }
    let inits: Vec<TensorInit> = (0..2).map(|i| TensorInit { name: names[i], theta: Weights::Host(&sft[i]), tau: Some(Src::F32(&tau[i])) }).collect();
    let mut gpu = GpuOptimizer::new(GpuContext::new(opts)?, config, &inits)?;
    drop(inits);
    for _ in 0..4 {
        let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| val(&mut mix, 0.02)).collect()).collect();
        let plan = cpu.begin_step()?;
        for i in 0..2 {
            let state = StateMut { theta: &mut theta[i], m: &mut m[i], v: &mut v[i], cached: None };
            plan.step_tensors(&mut [StepJob { name: names[i], grad: &grads[i], state, tau: Src::F32(&tau[i]), scratch: &mut [] }])?;
        }
        gpu.step(&[(names[0], &grads[0]), (names[1], &grads[1])])?;
    }
    let got: Vec<u32> = gpu.read_params()?.into_iter().flat_map(|(_, p)| p).map(f32::to_bits).collect();
    let want: Vec<u32> = theta.iter().flatten().map(|x| x.to_bits()).collect();
    Ok(compare("OnDARE step (4 steps)", &got, &want, |i| format!("parameter element {i}")))
}
