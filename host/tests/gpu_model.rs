//! `GpuLlama` (the decoder's forward and backward composed from the GPU model
//! kernels) against `LlamaModel` (the CPU decoder, whose gradients the
//! finite-difference checks of `host/src/model/tests.rs` cover), on the tiny
//! configurations those checks use: the loss, every per-sequence log-probability
//! and every gradient tensor; and two GPU runs for identical bits.
//!
//! Runs on lavapipe in CI: no adapter is a failure, never a skip.

use gpu_shaders::{GpuContext, GpuOptions};
use host::model::{Family, GenerateOptions, GpuLlama, HeadStats, LlamaConfig, LlamaModel, Sampling, Sequence, SplitMix64};
use host::params::ParamSet;

/// Relative L2 error (`‖gpu − cpu‖ / ‖cpu‖`) allowed per gradient tensor.
///
/// Each kernel alone agrees with its CPU layer to 1e-5 (`gpu_layers.rs`), most
/// to ~1e-6. The backward of a two-layer model chains about 40 of them, and an
/// error entering early is carried, not damped, to every later gradient:
/// compounding ~1e-6 per kernel over that chain gives a few 1e-5 at worst, and
/// tensors whose gradient is a difference of near-equal terms (the norms' and
/// biases' sums over rows) lose a little more relative to their small size.
/// 1e-4 sits above that; a wrong index, a dropped term, a missing bias or a
/// gradient landing in the wrong tensor gives 1e-2 and more.
const GRAD_TOL: f64 = 1e-4;

/// Relative error allowed on a sequence's summed log-probability and on the
/// loss: a forward only (no backward chain), sums of a handful of terms.
const LOGP_TOL: f64 = 1e-5;

fn ctx() -> GpuContext {
    match GpuContext::new(&GpuOptions::default()) {
        Ok(c) => c,
        Err(e) => panic!("no GPU adapter for the GPU model tests ({e}); install mesa-vulkan-drivers libvulkan1 (software Vulkan)"),
    }
}

/// The configurations of the CPU model's gradient checks.
fn tiny(family: Family, tied: bool, attention_bias: bool, heads: usize, kv_heads: usize) -> LlamaConfig {
    let mut c = LlamaConfig::tiny(11, 8, 12, 2, heads, kv_heads);
    c.family = family;
    c.tie_word_embeddings = tied;
    c.attention_bias = attention_bias;
    c.rms_norm_eps = 1e-6;
    c
}

fn batch() -> Vec<Sequence> {
    vec![
        Sequence::full(vec![1, 5, 2, 9, 3, 3, 7]),
        Sequence::completion(&[4, 0, 10], &[6, 2, 8]),
        Sequence::completion(&[2], &[5]),
    ]
}

/// A second micro-batch, for the loss path, with a longer sequence than any above.
fn second_batch() -> Vec<Sequence> {
    vec![Sequence::completion(&[3, 3, 1, 0, 4], &[9, 9, 2, 6, 5, 1, 10, 7, 8]), Sequence::full(vec![7, 2])]
}

/// Weights unlike the initialization: random norms and biases (their gradients
/// generic, not at 1 and 0) and larger matrices, so every path carries signal.
fn perturbed(params: &ParamSet) -> ParamSet {
    let mut p = params.clone();
    let mut rng = SplitMix64::new(77);
    for t in &mut p.tensors {
        if t.name.ends_with(".bias") || t.name.ends_with("norm.weight") {
            let base = if t.name.ends_with(".bias") { 0.0 } else { 1.0 };
            for x in &mut t.data {
                *x = base + (rng.next_normal() * 0.3) as f32;
            }
        } else {
            for x in &mut t.data {
                *x *= 15.0;
            }
        }
    }
    p
}

fn rel_l2(gpu: &[f32], cpu: &[f32]) -> f64 {
    let diff: f64 = gpu.iter().zip(cpu).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let norm: f64 = cpu.iter().map(|&b| (b as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

fn rel(gpu: f64, cpu: f64) -> f64 {
    (gpu - cpu).abs() / cpu.abs()
}

struct GpuStep {
    logps: Vec<f32>,
    head: Vec<HeadStats>,
    nll_sum: f64,
    grads: ParamSet,
}

const COEFS: [f32; 3] = [0.8, -1.3, 0.5];
const LOSS_SCALE: f32 = 1.0 / 16.0;

/// Two micro-batches into one gradient, as a training step does: a weighted
/// sum of log-probs (the DPO path) and a cross-entropy (pretraining, SFT).
fn gpu_step(gpu: &GpuLlama) -> GpuStep {
    gpu.zero_grads();
    let fwd = gpu.forward(&batch()).unwrap();
    gpu.backward(&fwd, &COEFS).unwrap();
    let ce = gpu.cross_entropy_backward(&second_batch(), LOSS_SCALE).unwrap();
    GpuStep { logps: fwd.logps, head: fwd.head, nll_sum: ce.nll_sum, grads: gpu.read_grads().unwrap() }
}

fn case(ctx: &GpuContext, cfg: LlamaConfig, what: &str) {
    // built from the initial weights, then given others: `upload` is what the
    // trainer calls after every optimizer step
    let init = LlamaModel::init(cfg.clone(), 42).unwrap();
    let gpu = GpuLlama::new(ctx, &init).unwrap();
    let cpu = LlamaModel::from_params(cfg, perturbed(&init.params)).unwrap();
    gpu.upload(&cpu.params).unwrap();

    let fwd = cpu.forward(&batch()).unwrap();
    let mut grads = cpu.zero_grads();
    cpu.backward(&fwd, &COEFS, &mut grads).unwrap();
    let ce = cpu.cross_entropy_backward(&second_batch(), LOSS_SCALE, &mut grads).unwrap();

    let step = gpu_step(&gpu);
    let mut worst = (0.0, String::new());
    for (i, (&g, &c)) in step.logps.iter().zip(&fwd.logps).enumerate() {
        let err = rel(g as f64, c as f64);
        assert!(err <= LOGP_TOL, "{what}: log-prob of sequence {i}: gpu {g}, cpu {c}, relative error {err:e} > {LOGP_TOL:e}");
    }
    // what TRL logs about the head: token counts and argmax hits exactly, the
    // sums of mean logits and entropies to the log-prob tolerance
    for (i, (g, c)) in step.head.iter().zip(&fwd.head).enumerate() {
        assert_eq!((g.tokens, g.argmax_hits), (c.tokens, c.argmax_hits), "{what}: head statistics of sequence {i}");
        for (name, gv, cv) in [("mean logits", g.mean_logit_sum, c.mean_logit_sum), ("entropy", g.entropy_sum, c.entropy_sum)] {
            assert!((gv - cv).abs() <= LOGP_TOL * cv.abs().max(1.0), "{what}: {name} of sequence {i}: gpu {gv}, cpu {cv}");
        }
    }
    let err = rel(step.nll_sum, ce.nll_sum);
    assert!(err <= LOGP_TOL, "{what}: loss: gpu {}, cpu {}, relative error {err:e} > {LOGP_TOL:e}", step.nll_sum, ce.nll_sum);
    let names = |p: &ParamSet| p.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&step.grads), names(&grads), "{what}: gradient tensors");
    for (g, c) in step.grads.tensors.iter().zip(&grads.tensors) {
        assert!(c.data.iter().any(|&x| x != 0.0), "{what}: the CPU gradient of {} is all zero", c.name);
        let err = rel_l2(&g.data, &c.data);
        assert!(err <= GRAD_TOL, "{what}: gradient of {}: relative L2 error {err:e} > {GRAD_TOL:e}", c.name);
        if err > worst.0 {
            worst = (err, c.name.clone());
        }
    }
    eprintln!("{what}: worst gradient error {:e} ({})", worst.0, worst.1);

    let again = gpu_step(&gpu);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&again.logps), bits(&step.logps), "{what}: log-probs differ between two GPU runs");
    assert_eq!(again.nll_sum.to_bits(), step.nll_sum.to_bits(), "{what}: loss differs between two GPU runs");
    for (a, b) in again.grads.tensors.iter().zip(&step.grads.tensors) {
        assert_eq!(bits(&a.data), bits(&b.data), "{what}: gradient of {} differs between two GPU runs", a.name);
    }
    assert_eq!(bits(&gpu.sequence_logps(&batch()).unwrap()), bits(&step.logps), "{what}: sequence_logps differs from forward");
}

#[test]
fn gpu_model_matches_cpu_on_every_tiny_config() {
    let ctx = ctx();
    case(&ctx, tiny(Family::Llama, false, false, 4, 2), "llama untied gqa");
    case(&ctx, tiny(Family::Llama, true, false, 2, 2), "llama tied");
    case(&ctx, tiny(Family::Qwen2, false, false, 2, 1), "qwen2 qkv bias");
    case(&ctx, tiny(Family::Llama, true, true, 4, 1), "llama attention_bias");
}

#[test]
fn gpu_model_refuses_what_the_cpu_model_refuses() {
    let ctx = ctx();
    let model = LlamaModel::init(tiny(Family::Llama, false, false, 2, 2), 5).unwrap();
    let gpu = GpuLlama::new(&ctx, &model).unwrap();
    let bad = [Sequence::full(vec![1, 11])];
    assert_eq!(gpu.forward(&bad).err().unwrap().to_string(), model.forward(&bad).err().unwrap().to_string());
    let fwd = gpu.forward(&batch()).unwrap();
    assert!(gpu.backward(&fwd, &[1.0]).is_err(), "one coefficient for three sequences");
    let other = LlamaModel::init(tiny(Family::Llama, true, false, 2, 2), 5).unwrap();
    assert!(gpu.upload(&other.params).is_err(), "tied weights into an untied model");
}

/// Generation on the device against the CPU model's: the same tokens for greedy
/// and for seeded sampling, the same stops (a stop token, the token budget, the
/// context's end), and identical tokens run to run.
fn generation_case(ctx: &GpuContext, mut cfg: LlamaConfig, prompts: &[Vec<u32>], what: &str) {
    // a short context, so that the longer prompts run into its end
    cfg.max_position_embeddings = 12;
    let init = LlamaModel::init(cfg.clone(), 3).unwrap();
    let model = LlamaModel::from_params(cfg, perturbed(&init.params)).unwrap();
    let gpu = GpuLlama::new(ctx, &model).unwrap();
    let greedy = GenerateOptions { max_new_tokens: 6, sampling: Sampling::Greedy, stop_token: None, seed: 5 };
    let sampled = GenerateOptions { sampling: Sampling::Temperature { temperature: 1.3, top_k: 6 }, max_new_tokens: 8, ..greedy };
    for (how, opts) in [("greedy", greedy), ("sampled", sampled)] {
        let cpu = model.generate_batch(prompts, &opts).unwrap();
        let on_gpu = gpu.generate_batch(prompts, &opts).unwrap();
        assert_eq!(on_gpu, cpu, "{what}, {how}: GPU and CPU tokens differ");
        assert_eq!(gpu.generate_batch(prompts, &opts).unwrap(), on_gpu, "{what}, {how}: two GPU runs differ");
        // the context's end stops a long prompt early, the budget the others
        for (p, out) in prompts.iter().zip(&on_gpu) {
            assert_eq!(out.len(), opts.max_new_tokens.min(12 - p.len()), "{what}, {how}: prompt {p:?} gave {out:?}");
        }
        // stopping on each prompt's own second token: it ends after one token
        // (unless the first was the same token), where the CPU model ends
        let stop = GenerateOptions { stop_token: Some(cpu[0][1]), ..opts };
        let stopped = gpu.generate_batch(prompts, &stop).unwrap();
        assert_eq!(stopped, model.generate_batch(prompts, &stop).unwrap(), "{what}, {how}: with a stop token");
        assert!(stopped[0].len() < cpu[0].len(), "{what}, {how}: the stop token did not stop prompt 0");
    }
    let none = GenerateOptions { max_new_tokens: 0, ..greedy };
    assert!(gpu.generate_batch(prompts, &none).unwrap().iter().all(Vec::is_empty));
}

#[test]
fn gpu_generation_gives_the_cpu_models_tokens() {
    let ctx = ctx();
    let prompts = vec![vec![1, 5, 2], vec![7], vec![3, 3, 1, 0, 4, 9, 9, 2, 6], vec![10, 0, 2, 2, 8, 1, 6, 4, 3, 7, 5, 9]];
    generation_case(&ctx, tiny(Family::Llama, false, false, 4, 2), &prompts, "llama untied gqa");
    generation_case(&ctx, tiny(Family::Qwen2, true, false, 2, 1), &prompts, "qwen2 tied qkv bias");
    // more prompts than one generation group: per-prompt seeds continue across groups
    let many: Vec<Vec<u32>> = (0..70u32).map(|i| vec![i % 11, (i * 7 + 3) % 11]).collect();
    generation_case(&ctx, tiny(Family::Llama, true, true, 4, 1), &many, "llama attention_bias, 70 prompts");
}

#[test]
fn gpu_generation_refuses_what_the_cpu_model_refuses() {
    let ctx = ctx();
    let model = LlamaModel::init(tiny(Family::Llama, false, false, 2, 2), 5).unwrap();
    let gpu = GpuLlama::new(&ctx, &model).unwrap();
    let opts = GenerateOptions { max_new_tokens: 3, sampling: Sampling::Temperature { temperature: 0.0, top_k: 0 }, stop_token: None, seed: 1 };
    let err = |r: Result<Vec<Vec<u32>>, String>| r.expect_err("refused");
    let cpu = |p: &[Vec<u32>], o| err(model.generate_batch(p, o).map_err(|e| e.to_string()));
    let dev = |p: &[Vec<u32>], o| err(gpu.generate_batch(p, o).map_err(|e| e.to_string()));
    assert_eq!(dev(&[vec![1]], &opts), cpu(&[vec![1]], &opts), "temperature 0");
    let greedy = GenerateOptions { sampling: Sampling::Greedy, ..opts };
    assert_eq!(dev(&[vec![1, 11]], &greedy), cpu(&[vec![1, 11]], &greedy), "a token outside the vocabulary");
    assert_eq!(dev(&[vec![]], &greedy), cpu(&[vec![]], &greedy), "an empty prompt");
}

#[test]
fn gpu_generation_with_an_unbounded_budget_stops_at_the_context_end() {
    let ctx = ctx();
    let mut cfg = tiny(Family::Llama, false, false, 4, 2);
    cfg.max_position_embeddings = 9;
    let init = LlamaModel::init(cfg.clone(), 3).unwrap();
    let model = LlamaModel::from_params(cfg, perturbed(&init.params)).unwrap();
    let gpu = GpuLlama::new(&ctx, &model).unwrap();
    let prompts = vec![vec![1, 5, 2], vec![7]];
    let opts = GenerateOptions { max_new_tokens: usize::MAX, sampling: Sampling::Greedy, stop_token: None, seed: 5 };
    let out = gpu.generate_batch(&prompts, &opts).unwrap();
    assert_eq!(out, model.generate_batch(&prompts, &opts).unwrap());
    assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), [6, 8], "each prompt fills the context");
}
