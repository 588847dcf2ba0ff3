//! GPU OnTIES against merge-core's optimizer front, bit for bit: both variants,
//! per-tensor and global trimming, the L1 rescale, step-K, 16-bit task vectors,
//! heavy ties in the task vector and in the update.

mod common;

use common::{ctx_with, SplitMix64};
use gpu_shaders::optim::{GpuOptimizer, StoredTau, TensorInit, Weights};
use gpu_shaders::GpuOptions;
use merge_core::dtype::{Dst, Dtype, Src};
use merge_core::hyper::{AdamConfig, AdamForm};
use merge_core::onties::Variant;
use merge_core::optim::{Merge, OnlineConfig, Optimizer, Scope, StepJob, TaskVectorJob, TiesConfig};
use merge_core::step::StateMut;

struct T {
    name: String,
    theta: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    c: Option<Vec<f32>>,
    tau32: Vec<f32>,
    tau16: Vec<u16>,
    scratch: Vec<f32>,
}

fn run(tc: TiesConfig, form: AdamForm, kk: u32, dtype: Dtype, sizes: &[usize], steps: u64, chunk: Option<u64>) {
    let adam = AdamConfig { form, lr: 1e-3, weight_decay: 0.01, ..AdamConfig::default() };
    let config = OnlineConfig { adam, merge: Merge::Ties(tc), k: kk, seed: 9 };
    let mut rng = SplitMix64::new(0x7135 ^ sizes.len() as u64);
    let names: Vec<String> = (0..sizes.len()).map(|i| format!("m.{}", (5 * i) % 7)).collect();
    let base: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| rng.uniform_f32(0.5)).collect()).collect();
    // Quantised task vectors: many ties among |τ|.
    let sft: Vec<Vec<f32>> =
        base.iter().map(|b| b.iter().map(|&x| x + (rng.below(9) as f32 - 4.0) * 0.0078125).collect()).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let taus = common::taus(config, &name_refs, &common::f32_srcs(&base), &common::f32_srcs(&sft), dtype);
    let inits: Vec<TensorInit> =
        (0..sizes.len()).map(|i| TensorInit { name: &names[i], theta: Weights::Host(&sft[i]), tau: taus[i].as_ref().map(StoredTau::src) }).collect();
    let mut gpu = GpuOptimizer::new(ctx_with(&GpuOptions { max_chunk_bytes: chunk, ..Default::default() }), config, &inits).unwrap();

    let mut cpu = Optimizer::new(config).unwrap();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| names[a].cmp(&names[b]));
    let mut ts: Vec<T> = order
        .iter()
        .map(|&i| T {
            name: names[i].clone(),
            theta: sft[i].clone(),
            m: vec![0.0; sizes[i]],
            v: vec![0.0; sizes[i]],
            c: cpu.needs_cached_delta().then(|| vec![0.0; sizes[i]]),
            tau32: vec![0.0; sizes[i]],
            tau16: vec![0; sizes[i]],
            scratch: vec![0.0; sizes[i]],
        })
        .collect();
    {
        let mut jobs: Vec<TaskVectorJob> = ts
            .iter_mut()
            .zip(&order)
            .map(|(t, &i)| TaskVectorJob {
                name: &names[i],
                base: Src::F32(&base[i]),
                sft: Src::F32(&sft[i]),
                out: match dtype {
                    Dtype::F32 => Dst::F32(&mut t.tau32),
                    Dtype::Bf16 => Dst::Bf16(&mut t.tau16),
                    Dtype::F16 => Dst::F16(&mut t.tau16),
                },
                scratch: &mut t.scratch,
            })
            .collect();
        cpu.init_task_vectors(&mut jobs).unwrap();
    }
    for step in 1..=steps {
        let grads: Vec<Vec<f32>> = ts
            .iter()
            .map(|t| (0..t.theta.len()).map(|i| if (i + step as usize).is_multiple_of(3) { 0.0 } else { rng.uniform_f32(1e-2) }).collect())
            .collect();
        let plan = cpu.begin_step().unwrap();
        {
            let mut jobs: Vec<StepJob> = ts
                .iter_mut()
                .zip(&grads)
                .map(|(t, g)| StepJob {
                    name: &t.name,
                    grad: g,
                    state: StateMut { theta: &mut t.theta, m: &mut t.m, v: &mut t.v, cached: t.c.as_deref_mut() },
                    tau: match dtype {
                        Dtype::F32 => Src::F32(&t.tau32),
                        Dtype::Bf16 => Src::Bf16(&t.tau16),
                        Dtype::F16 => Src::F16(&t.tau16),
                    },
                    scratch: &mut t.scratch,
                })
                .collect();
            plan.step_tensors(&mut jobs).unwrap();
        }
        let named: Vec<(&str, &[f32])> = ts.iter().zip(&grads).map(|(t, g)| (t.name.as_str(), g.as_slice())).collect();
        gpu.step(&named).unwrap();
        let params = gpu.read_params().unwrap();
        let state = gpu.read_state().unwrap();
        for ((t, (_, p)), st) in ts.iter().zip(&params).zip(&state) {
            for (what, g, c) in [("theta", p, &t.theta), ("exp_avg", &st.m, &t.m), ("exp_avg_sq", &st.v, &t.v)] {
                if let Some(i) = (0..c.len()).find(|&i| g[i].to_bits() != c[i].to_bits()) {
                    panic!("step {step} {} {what}[{i}]/{}: gpu {:e} cpu {:e}; {tc:?} {form:?} k={kk} {dtype:?}", t.name, c.len(), g[i], c[i]);
                }
            }
            match (&st.cached, &t.c) {
                (Some(g), Some(c)) => assert!(g.iter().zip(c).all(|(a, b)| a.to_bits() == b.to_bits()), "step {step} cached {}", t.name),
                (None, None) => {}
                _ => panic!("cached delta presence differs"),
            }
        }
    }
}

const SIZES: [usize; 5] = [1, 255, 257, 1000, 4099];

#[test]
fn onties_per_tensor_both_variants_with_and_without_rescale() {
    for variant in [Variant::Reference, Variant::Paper] {
        for rescale in [false, true] {
            let tc = TiesConfig { variant, p: 0.3, alpha: 0.05, rescale, scope: Scope::PerTensor };
            run(tc, AdamForm::HuggingFace, 1, Dtype::F32, &SIZES, 3, None);
        }
    }
}

#[test]
fn onties_global_scope_ties_and_tiny_chunks() {
    for variant in [Variant::Reference, Variant::Paper] {
        let tc = TiesConfig { variant, p: 0.5, alpha: 0.01, rescale: false, scope: Scope::Global };
        run(tc, AdamForm::Torch, 1, Dtype::Bf16, &SIZES, 3, Some(1024));
    }
}

#[test]
fn onties_step_k_and_p_one() {
    let tc = TiesConfig { variant: Variant::Reference, p: 0.1, alpha: 0.02, rescale: true, scope: Scope::PerTensor };
    run(tc, AdamForm::HuggingFace, 3, Dtype::F16, &SIZES, 6, Some(2048));
    let tc = TiesConfig { variant: Variant::Paper, p: 1.0, alpha: 0.02, rescale: false, scope: Scope::Global };
    run(tc, AdamForm::HuggingFace, 2, Dtype::F32, &SIZES[..3], 4, None);
}

/// Global scope with the rescale: tree sums over 256-blocks of the concatenated
/// scope, which straddle tensors and chunks (sizes 1, 255, 257, … and 256-element
/// chunks put segment boundaries inside most blocks).
#[test]
fn onties_global_rescale_over_blocks_shared_by_tensors_and_chunks() {
    for variant in [Variant::Reference, Variant::Paper] {
        let tc = TiesConfig { variant, p: 0.2, alpha: 0.03, rescale: true, scope: Scope::Global };
        run(tc, AdamForm::HuggingFace, 1, Dtype::F32, &SIZES, 3, Some(1024));
        run(tc, AdamForm::Torch, 2, Dtype::Bf16, &[70000, 3, 130], 4, None);
    }
}

/// Steps GPU and CPU once over tensors "a" (300) and "b" (600) in 256-element
/// chunks, from `sft` (base = sft / 1.5, so τ = sft / 3) with `grads`: both must
/// refuse with the same error, and the GPU must write nothing.
fn same_refusal(tc: TiesConfig, form: AdamForm, sft: [&[f32]; 2], grads: [&[f32]; 2]) -> String {
    let adam = AdamConfig { form, lr: 1e-3, weight_decay: 0.01, ..AdamConfig::default() };
    let config = OnlineConfig { adam, merge: Merge::Ties(tc), k: 1, seed: 3 };
    let names = ["a", "b"];
    let base: Vec<Vec<f32>> = sft.iter().map(|s| s.iter().map(|x| x / 1.5).collect()).collect();
    let taus = common::taus(config, &names, &[Src::F32(&base[0]), Src::F32(&base[1])], &[Src::F32(sft[0]), Src::F32(sft[1])], Dtype::F32);
    let inits: Vec<TensorInit> = (0..2).map(|i| TensorInit { name: names[i], theta: Weights::Host(sft[i]), tau: taus[i].as_ref().map(StoredTau::src) }).collect();
    let mut gpu = GpuOptimizer::new(ctx_with(&GpuOptions { max_chunk_bytes: Some(1024), ..Default::default() }), config, &inits).unwrap();
    let before = gpu.read_params().unwrap();
    let gpu_err = gpu.step(&[("a", grads[0]), ("b", grads[1])]).unwrap_err().to_string();
    assert_eq!(gpu.read_params().unwrap(), before, "a refused step must not write");
    assert_eq!(gpu.steps(), 0);

    let mut cpu = Optimizer::new(config).unwrap();
    let mut taus: Vec<Vec<f32>> = sft.iter().map(|s| vec![0.0; s.len()]).collect();
    let mut scratch: Vec<Vec<f32>> = sft.iter().map(|s| vec![0.0; s.len()]).collect();
    {
        let mut jobs: Vec<TaskVectorJob> = taus
            .iter_mut()
            .zip(scratch.iter_mut())
            .enumerate()
            .map(|(i, (t, sc))| TaskVectorJob { name: names[i], base: Src::F32(&base[i]), sft: Src::F32(sft[i]), out: Dst::F32(t), scratch: sc })
            .collect();
        cpu.init_task_vectors(&mut jobs).unwrap();
    }
    let mut theta: Vec<Vec<f32>> = sft.iter().map(|s| s.to_vec()).collect();
    let mut m: Vec<Vec<f32>> = sft.iter().map(|s| vec![0.0; s.len()]).collect();
    let mut v = m.clone();
    let plan = cpu.begin_step().unwrap();
    let mut jobs: Vec<StepJob> = theta
        .iter_mut()
        .zip(m.iter_mut().zip(v.iter_mut()))
        .zip(scratch.iter_mut())
        .enumerate()
        .map(|(i, ((theta, (m, v)), scratch))| StepJob {
            name: names[i],
            grad: grads[i],
            state: StateMut { theta, m, v, cached: None },
            tau: Src::F32(&taus[i]),
            scratch,
        })
        .collect();
    let cpu_err = gpu_shaders::GpuError::Core(plan.step_tensors(&mut jobs).unwrap_err()).to_string();
    assert_eq!(gpu_err, cpu_err);
    gpu_err
}

/// Non-finite values found by the scan before the threshold passes (inputs, m',
/// v', D) and by the check after them (θ from the stored D): the tensor, value and
/// lowest index merge-core names, in its order, and nothing written.
#[test]
fn onties_non_finite_values_are_named_like_merge_core() {
    let (a, mut b) = (vec![0.5f32; 300], vec![0.25f32; 600]);
    let (ga, mut gb) = (vec![1e-3f32; 300], vec![-1e-3f32; 600]);
    // τ = 1e38 is kept, and θ + α·τ overflows: only the check can see it.
    b[410] = 3e38;
    b[520] = 3e38;
    for (scope, form) in [(Scope::PerTensor, AdamForm::HuggingFace), (Scope::Global, AdamForm::Torch)] {
        for variant in [Variant::Reference, Variant::Paper] {
            let tc = TiesConfig { variant, p: 0.5, alpha: 0.5, rescale: scope == Scope::Global, scope };
            let err = same_refusal(tc, form, [&a, &b], [&ga, &gb]);
            assert!(err.contains("`b`: non-finite updated parameter at element 410"), "{err}");
            // The scan's refusal comes first, though its index is higher.
            gb[555] = f32::NAN;
            let err = same_refusal(tc, form, [&a, &b], [&ga, &gb]);
            assert!(err.contains("`b`: non-finite gradient at element 555"), "{err}");
            gb[555] = -1e-3;
        }
    }
}
