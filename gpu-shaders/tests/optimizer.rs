//! GpuOptimizer against merge-core's CPU optimizer, bit for bit, over several
//! steps: both AdamW forms, plain AdamW, OnDARE reference and paper variants, L1
//! rescale, step-K, every task-vector dtype, awkward sizes and forced tiny chunks.

mod common;

use common::{ctx, ctx_with, SplitMix64, TestInputs};
use gpu_shaders::optim::{GpuOptimizer, StoredTau, TensorInit, Weights};
use gpu_shaders::{GpuError, GpuOptions};
use merge_core::dare::{DareConfig, DareVariant};
use merge_core::dtype::{Dst, Dtype, Src};
use merge_core::hyper::{AdamConfig, AdamForm, Schedule};
use merge_core::optim::{Merge, OnlineConfig, Optimizer, Scope, StepJob, TiesConfig};
use merge_core::step::StateMut;

struct CpuTensor {
    name: String,
    theta: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    cached: Option<Vec<f32>>,
    tau32: Vec<f32>,
    tau16: Vec<u16>,
    dtype: Dtype,
}

impl CpuTensor {
    fn tau(&self) -> Src<'_> {
        match self.dtype {
            Dtype::F32 => Src::F32(&self.tau32),
            Dtype::Bf16 => Src::Bf16(&self.tau16),
            Dtype::F16 => Src::F16(&self.tau16),
        }
    }
}

fn grad(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 97 {
            0 => 0.0,
            1 => -0.0,
            2 => f32::from_bits(0x0000_1234), // subnormal: flushed
            3 => rng.f32_exp(-40, -30),
            4 => rng.f32_exp(5, 12),
            _ => rng.uniform_f32(1e-2),
        })
        .collect()
}

/// Runs `steps` steps on CPU and GPU and compares every array after each.
fn cross_check(config: OnlineConfig, sizes: &[usize], dtype: Dtype, steps: u64, opts: &GpuOptions) {
    let mut rng = SplitMix64::new(config.seed ^ 0x5eed);
    let names: Vec<String> = sizes.iter().enumerate().map(|(i, _)| format!("layer.{}.w{}", (7 * i) % 10, i)).collect();
    let base: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| rng.uniform_f32(0.5)).collect()).collect();
    let sft: Vec<Vec<f32>> =
        base.iter().map(|b| b.iter().map(|&x| x + rng.uniform_f32(2e-2)).collect()).collect();
    let merging = !matches!(config.merge, Merge::None);
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let taus = common::taus(config, &name_refs, &common::f32_srcs(&base), &common::f32_srcs(&sft), dtype);
    let inits: Vec<TensorInit> =
        (0..sizes.len()).map(|i| TensorInit { name: &names[i], theta: Weights::Host(&sft[i]), tau: taus[i].as_ref().map(StoredTau::src) }).collect();
    let mut gpu = GpuOptimizer::new(ctx_with(opts), config, &inits).unwrap();

    let mut cpu = Optimizer::new(config).unwrap();
    let mut ts: Vec<CpuTensor> = (0..sizes.len())
        .map(|i| {
            let n = sizes[i];
            let mut t = CpuTensor {
                name: names[i].clone(),
                theta: sft[i].clone(),
                m: vec![0.0; n],
                v: vec![0.0; n],
                cached: cpu.needs_cached_delta().then(|| vec![0.0; n]),
                tau32: vec![0.0; n],
                tau16: vec![0; n],
                dtype,
            };
            if merging {
                let mut dst = match dtype {
                    Dtype::F32 => Dst::F32(&mut t.tau32),
                    Dtype::Bf16 => Dst::Bf16(&mut t.tau16),
                    Dtype::F16 => Dst::F16(&mut t.tau16),
                };
                cpu.init_task_vector(&names[i], Src::F32(&base[i]), Src::F32(&sft[i]), &mut dst).unwrap();
            }
            t
        })
        .collect();
    ts.sort_by(|a, b| a.name.cmp(&b.name));

    for step in 1..=steps {
        let grads: Vec<Vec<f32>> = ts.iter().map(|t| grad(&mut rng, t.theta.len())).collect();
        let plan = cpu.begin_step().unwrap();
        for (t, g) in ts.iter_mut().zip(&grads) {
            let tau32 = std::mem::take(&mut t.tau32);
            let tau16 = std::mem::take(&mut t.tau16);
            let tau = match t.dtype {
                Dtype::F32 => Src::F32(&tau32),
                Dtype::Bf16 => Src::Bf16(&tau16),
                Dtype::F16 => Src::F16(&tau16),
            };
            let state = StateMut { theta: &mut t.theta, m: &mut t.m, v: &mut t.v, cached: t.cached.as_deref_mut() };
            plan.step_tensors(&mut [StepJob { name: &t.name, grad: g, state, tau, scratch: &mut [] }]).unwrap();
            t.tau32 = tau32;
            t.tau16 = tau16;
        }
        let named: Vec<(&str, &[f32])> = ts.iter().zip(&grads).map(|(t, g)| (t.name.as_str(), g.as_slice())).collect();
        gpu.step(&named).unwrap();
        let params = gpu.read_params().unwrap();
        let state = gpu.read_state().unwrap();
        for ((t, (pn, p)), st) in ts.iter().zip(&params).zip(&state) {
            assert_eq!(&t.name, pn);
            let _ = t.tau();
            for (what, g, c) in [("theta", p, &t.theta), ("exp_avg", &st.m, &t.m), ("exp_avg_sq", &st.v, &t.v)] {
                if let Some(i) = (0..c.len()).find(|&i| g[i].to_bits() != c[i].to_bits()) {
                    panic!("step {step}, {}, {what}[{i}] of {}: gpu {:e} ({:#010x}) cpu {:e} ({:#010x}); config {config:?}",
                        t.name, c.len(), g[i], g[i].to_bits(), c[i], c[i].to_bits());
                }
            }
            match (&t.cached, &st.cached) {
                (Some(c), Some(g)) => assert!(c.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()), "step {step} {} cached", t.name),
                (None, None) => {}
                _ => panic!("cached delta presence differs"),
            }
        }
    }
}

const SIZES: [usize; 6] = [1, 255, 256, 257, 1000, 65537];

fn adam(form: AdamForm, wd: f64) -> AdamConfig {
    AdamConfig { form, lr: 1e-3, weight_decay: wd, ..AdamConfig::default() }
}

#[test]
fn plain_adamw_both_forms() {
    for form in [AdamForm::HuggingFace, AdamForm::Torch] {
        let config = OnlineConfig { adam: adam(form, 0.01), merge: Merge::None, k: 1, seed: 1 };
        cross_check(config, &SIZES, Dtype::F32, 3, &GpuOptions::default());
    }
}

#[test]
fn ondare_reference_every_dtype_and_tiny_chunks() {
    let dare = DareConfig { variant: DareVariant::Reference, p: 0.3, alpha: 0.01, rescale: false, clip: 1.0 };
    for (dtype, chunk) in [(Dtype::F32, None), (Dtype::Bf16, Some(1024)), (Dtype::F16, Some(2048))] {
        let config = OnlineConfig { adam: adam(AdamForm::HuggingFace, 0.0), merge: Merge::Dare(dare), k: 1, seed: 7 };
        cross_check(config, &SIZES, dtype, 3, &GpuOptions { max_chunk_bytes: chunk, ..Default::default() });
    }
}

#[test]
fn ondare_rescale_both_variants_torch_and_schedule() {
    for variant in [DareVariant::Reference, DareVariant::Paper] {
        let dare = DareConfig { variant, p: 0.05, alpha: 1e-3, rescale: true, clip: 0.002 };
        let a = AdamConfig {
            schedule: Schedule::WarmupCosine { warmup: 1, total: 5 },
            ..adam(AdamForm::Torch, 0.1)
        };
        let config = OnlineConfig { adam: a, merge: Merge::Dare(dare), k: 1, seed: 11 };
        cross_check(config, &SIZES, Dtype::F32, 4, &GpuOptions { max_chunk_bytes: Some(4096), ..Default::default() });
    }
}

#[test]
fn step_k_accumulates_and_rolls_back() {
    let dare = DareConfig { variant: DareVariant::Reference, p: 1.0, alpha: 0.05, rescale: true, clip: 1.0 };
    let config = OnlineConfig { adam: adam(AdamForm::HuggingFace, 0.01), merge: Merge::Dare(dare), k: 3, seed: 3 };
    cross_check(config, &SIZES, Dtype::Bf16, 7, &GpuOptions::default());
    let dare = DareConfig { variant: DareVariant::Paper, p: 0.5, alpha: 0.05, rescale: false, clip: 1.0 };
    let config = OnlineConfig { adam: adam(AdamForm::Torch, 0.0), merge: Merge::Dare(dare), k: 2, seed: 4 };
    cross_check(config, &SIZES[..4], Dtype::F16, 4, &GpuOptions { max_chunk_bytes: Some(1024), ..Default::default() });
}

/// A tensor above lavapipe's 128 MiB binding limit, split by the device's own limit.
#[test]
fn tensor_larger_than_one_binding() {
    let c = ctx();
    let limit = c.limits().max_storage_buffer_binding_size.min(c.limits().max_buffer_size);
    drop(c);
    let n = (limit / 4 + 4097).min(40 << 20) as usize;
    let dare = DareConfig { variant: DareVariant::Reference, p: 0.01, alpha: 1e-7, rescale: false, clip: 1.0 };
    let config = OnlineConfig { adam: adam(AdamForm::HuggingFace, 0.0), merge: Merge::Dare(dare), k: 1, seed: 5 };
    cross_check(config, &[n, 3], Dtype::Bf16, 1, &GpuOptions::default());
}

/// The sparse task vector is stored compactly and nothing else grows with the
/// tensors: at the paper's p = 0.01 OnDARE and OnTIES (both scopes) hold at most
/// 10% of the parameter bytes beyond AdamW's θ, g, m, v.
#[test]
fn optimizer_memory_beyond_adamw_within_ten_percent() {
    let n = 1 << 20;
    let theta = vec![0.5f32; n];
    let base: Vec<f32> = (0..n).map(|i| 0.5 - (i % 7) as f32 * 1e-3).collect();
    let dare = DareConfig { variant: DareVariant::Reference, p: 0.01, alpha: 1e-7, rescale: true, clip: 1.0 };
    let ties = |scope| TiesConfig { p: 0.01, rescale: true, scope, ..TiesConfig::default() };
    for merge in [Merge::Dare(dare), Merge::Ties(ties(Scope::PerTensor)), Merge::Ties(ties(Scope::Global))] {
        let config = OnlineConfig { adam: adam(AdamForm::HuggingFace, 0.0), merge, k: 1, seed: 5 };
        let taus = common::taus(config, &["w"], &[Src::F32(&base)], &[Src::F32(&theta)], Dtype::Bf16);
        let init = TensorInit { name: "w", theta: Weights::Host(&theta), tau: taus[0].as_ref().map(StoredTau::src) };
        let gpu = GpuOptimizer::new(ctx(), config, &[init]).unwrap();
        let extra = gpu.device_bytes() as f64 - 16.0 * n as f64;
        assert!(extra <= 0.1 * 4.0 * n as f64, "{merge:?}: {extra} bytes beyond AdamW for {n} parameters");
        assert!(extra > 0.0, "{merge:?}");
    }
}

#[test]
fn non_finite_gradient_is_named_and_nothing_is_written() {
    let config = OnlineConfig { adam: adam(AdamForm::HuggingFace, 0.0), merge: Merge::None, k: 1, seed: 1 };
    let a = vec![0.5f32; 300];
    let b = vec![0.25f32; 600];
    let inits = [
        TensorInit { name: "b", theta: Weights::Host(&b), tau: None },
        TensorInit { name: "a", theta: Weights::Host(&a), tau: None },
    ];
    let mut gpu = GpuOptimizer::new(ctx_with(&GpuOptions { max_chunk_bytes: Some(1024), ..Default::default() }), config, &inits).unwrap();
    let ga = vec![0.1f32; 300];
    let mut gb = vec![0.1f32; 600];
    gb[555] = f32::NAN;
    gb[300] = f32::INFINITY;
    let before = gpu.read_params().unwrap();
    let err = gpu.step(&[("a", &ga), ("b", &gb)]).unwrap_err();
    match &err {
        GpuError::Core(merge_core::Error::NonFinite { tensor, what, index }) => {
            assert_eq!((tensor.as_str(), *what, *index), ("b", "gradient", 300), "{err}");
        }
        other => panic!("expected a non-finite error, got {other}"),
    }
    assert_eq!(gpu.read_params().unwrap(), before, "a failed step must not write");
    assert_eq!(gpu.steps(), 0);
    // The same error as the CPU reference.
    let mut cpu = Optimizer::new(config).unwrap();
    let plan = cpu.begin_step().unwrap();
    let (mut t, mut m, mut v) = (b.clone(), vec![0.0; 600], vec![0.0; 600]);
    // merge-core slices the task vector even for plain AdamW, so give it one.
    let unused_tau = vec![0.0f32; 600];
    let state = StateMut { theta: &mut t, m: &mut m, v: &mut v, cached: None };
    let cpu_err = plan.step_tensors(&mut [StepJob { name: "b", grad: &gb, state, tau: Src::F32(&unused_tau), scratch: &mut [] }]).unwrap_err();
    assert_eq!(GpuError::Core(cpu_err).to_string(), err.to_string());
    // A gradient that overflows g² is an output error, caught before writing too.
    gb[555] = 1e30;
    gb[300] = 0.0;
    let err = gpu.step(&[("a", &ga), ("b", &gb)]).unwrap_err();
    assert!(err.to_string().contains("non-finite updated exp_avg_sq at element 555"), "{err}");
    gb[555] = 0.0;
    gpu.step(&[("a", &ga), ("b", &gb)]).unwrap();
    assert_eq!(gpu.steps(), 1);
}

/// Without validation a failing step writes, names the value like the validated
/// step, and refuses every later step until the state is reloaded; each step
/// starts from a clean record, so a good step after the reload succeeds.
#[test]
fn unvalidated_failure_poisons_until_load_state() {
    let config = OnlineConfig { adam: adam(AdamForm::HuggingFace, 0.0), merge: Merge::None, k: 1, seed: 1 };
    let theta = vec![0.5f32; 700];
    let init = TensorInit { name: "w", theta: Weights::Host(&theta), tau: None };
    let mut gpu = GpuOptimizer::new(ctx_with(&GpuOptions { max_chunk_bytes: Some(1024), ..Default::default() }), config, &[init]).unwrap();
    gpu.set_validation(false);
    let mut g = vec![0.1f32; 700];
    gpu.step(&[("w", &g)]).unwrap();
    let (params, state) = (gpu.read_params().unwrap(), gpu.read_state().unwrap());
    g[600] = f32::NAN;
    g[650] = f32::INFINITY;
    let err = gpu.step(&[("w", &g)]).unwrap_err();
    assert_eq!(err.to_string(), "tensor `w`: non-finite gradient at element 600");
    g[600] = 0.1;
    g[650] = 0.1;
    assert!(matches!(gpu.step(&[("w", &g)]), Err(GpuError::Poisoned(_))));
    let refs: Vec<(&str, &[f32])> = params.iter().map(|(n, p)| (n.as_str(), p.as_slice())).collect();
    gpu.load_state(1, &refs, &state).unwrap();
    gpu.step(&[("w", &g)]).unwrap();
    assert_eq!(gpu.steps(), 2);
}

/// The resident step's plumbing: gradients copied in on the device give the same
/// bits as uploaded ones, and so do a model's own buffers stepped in place
/// ([`Weights::Shared`]); parameters copied out are the optimizer's, and Σ g²
/// agrees with an f64 sum to f32 rounding. Small chunks make every tensor span
/// several chunk buffers, so the copies' offsets are exercised.
#[test]
fn device_side_gradients_and_parameters_match_the_uploaded_path() {
    use gpu_shaders::model::GpuVec;
    let dare = DareConfig { variant: DareVariant::Reference, p: 0.5, alpha: 0.01, rescale: true, clip: 1.0 };
    let config = OnlineConfig { adam: adam(AdamForm::HuggingFace, 0.01), merge: Merge::Dare(dare), k: 1, seed: 5 };
    let opts = GpuOptions { max_chunk_bytes: Some(4096), ..Default::default() };
    let mut rng = SplitMix64::new(17);
    let names = ["a.weight", "b.bias", "c.weight"];
    let sizes = [3000usize, 7, 5000];
    let base: Vec<Vec<f32>> = sizes.iter().map(|&n| grad(&mut rng, n)).collect();
    let sft: Vec<Vec<f32>> = base.iter().map(|b| b.iter().map(|x| x + 0.01).collect()).collect();
    let taus = common::taus(config, &names, &common::f32_srcs(&base), &common::f32_srcs(&sft), Dtype::F32);
    let init: Vec<TensorInit> = (0..3).map(|i| TensorInit { name: names[i], theta: Weights::Host(&sft[i]), tau: taus[i].as_ref().map(StoredTau::src) }).collect();
    let ctx = common::ctx_with(&opts);
    let mut uploaded = GpuOptimizer::new(ctx.clone(), config, &init).unwrap();
    let mut copied = GpuOptimizer::new(ctx.clone(), config, &init).unwrap();
    // A third steps a "model's" own weight and gradient buffers in place.
    let model_weights: Vec<GpuVec> = sft.iter().map(|w| GpuVec::from_f32(&ctx, "model weight", w).unwrap()).collect();
    let model_grads: Vec<GpuVec> = sizes.iter().map(|&n| GpuVec::zeros(&ctx, "model grad", n).unwrap()).collect();
    let shared_init: Vec<TensorInit> = (0..3)
        .map(|i| TensorInit {
            name: names[i],
            theta: Weights::Shared { weights: model_weights[i].buffer(), grads: model_grads[i].buffer(), len: sizes[i] },
            tau: taus[i].as_ref().map(StoredTau::src),
        })
        .collect();
    let mut shared = GpuOptimizer::new(ctx.clone(), config, &shared_init).unwrap();
    drop(shared_init);
    for _ in 0..2 {
        let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| grad(&mut rng, n)).collect();
        let named: Vec<(&str, &[f32])> = names.iter().zip(&grads).map(|(n, g)| (*n, g.as_slice())).collect();
        uploaded.step(&named).unwrap();
        for (v, g) in model_grads.iter().zip(&grads) {
            v.write_f32(&ctx, g).unwrap();
        }
        assert_eq!(shared.grad_sum_squares().unwrap(), uploaded.grad_sum_squares().unwrap());
        shared.step_uploaded().unwrap();
        let on_device: Vec<GpuVec> = grads.iter().map(|g| GpuVec::from_f32(&ctx, "model grad", g).unwrap()).collect();
        // Given in another order than the optimizer's: they are matched by name.
        let sources: Vec<(&str, &wgpu::Buffer)> = names.iter().zip(&on_device).rev().map(|(n, v)| (*n, v.buffer())).collect();
        copied.copy_grads_from(&sources).unwrap();
        let sums = copied.grad_sum_squares().unwrap();
        for (g, s) in grads.iter().zip(&sums) {
            let exact: f64 = g.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            assert!((s - exact).abs() <= 1e-6 * exact, "Σg² {s} vs {exact}");
        }
        copied.step_uploaded().unwrap();
    }
    let (a, b) = (uploaded.read_params().unwrap(), copied.read_params().unwrap());
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        common::assert_bits(name, &bits(y), &bits(x), |i| format!("element {i}"));
    }
    // The shared optimizer stepped the model's buffers themselves.
    for (((name, x), (_, y)), w) in a.iter().zip(&shared.read_params().unwrap()).zip(&model_weights) {
        common::assert_bits(name, &bits(y), &bits(x), |i| format!("element {i}"));
        common::assert_bits(name, &bits(&w.read_f32(&ctx).unwrap()), &bits(x), |i| format!("model's element {i}"));
    }
    let (owned_bytes, shared_bytes) = (uploaded.device_bytes(), shared.device_bytes());
    let weights_and_grads: u64 = sizes.iter().map(|&n| 8 * n as u64).sum();
    assert!(owned_bytes >= shared_bytes + weights_and_grads, "{owned_bytes} vs {shared_bytes}: shared weights are not held twice");
    let targets: Vec<GpuVec> = sizes.iter().map(|&n| GpuVec::zeros(&ctx, "model weight", n).unwrap()).collect();
    let named: Vec<(&str, &wgpu::Buffer)> = names.iter().zip(&targets).map(|(n, v)| (*n, v.buffer())).collect();
    copied.copy_params_to(&named).unwrap();
    for ((_, want), t) in b.iter().zip(&targets) {
        assert_eq!(&t.read_f32(&ctx).unwrap(), want);
    }
    let err = copied.copy_params_to(&named[..2]).unwrap_err().to_string();
    assert!(err.contains("no parameter buffer for tensor `c.weight`"), "{err}");
}

/// τ' comes from the caller, computed once: a merging optimizer without one, plain
/// AdamW with one, or one of the wrong length is refused naming the tensor.
#[test]
fn task_vectors_are_required_exactly_when_merging() {
    let theta = vec![0.5f32; 300];
    let tau = vec![0.0f32; 300];
    let dare = OnlineConfig { adam: adam(AdamForm::HuggingFace, 0.0), merge: Merge::Dare(DareConfig::default()), k: 1, seed: 1 };
    let plain = OnlineConfig { merge: Merge::None, ..dare };
    let refusal = |config, tau: Option<&[f32]>| match GpuOptimizer::new(ctx(), config, &[TensorInit { name: "w", theta: Weights::Host(&theta), tau: tau.map(Src::F32) }]) {
        Ok(_) => panic!("accepted {tau:?} with {config:?}"),
        Err(e) => e.to_string(),
    };
    assert!(refusal(dare, None).contains("tensor `w`: merging needs its task vector"), "{}", refusal(dare, None));
    assert!(refusal(plain, Some(&tau)).contains("tensor `w`: plain AdamW takes no task vector"));
    let short = refusal(dare, Some(&tau[..299]));
    assert!(short.contains("`w`") && short.contains("task vector") && short.contains("299"), "{short}");
    GpuOptimizer::new(ctx(), dare, &[TensorInit { name: "w", theta: Weights::Host(&theta), tau: Some(Src::F32(&tau)) }]).unwrap();
}
