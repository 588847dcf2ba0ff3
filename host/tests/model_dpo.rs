//! The model, the losses and the data readers used together the way the trainer
//! uses them: the chain rule through a DPO loss into the model's backward pass
//! agrees with finite differences of the whole pipeline, and a few plain
//! gradient steps move each objective the right way.

use std::path::Path;

use host::data::encode::TextTokenizer;
use host::data::jsonl::{parse_preferences, parse_sft};
use host::loss::{DpoLoss, LossKind};
use host::model::{LlamaConfig, LlamaModel, Sequence, SplitMix64};
use host::params::ParamSet;
use host::tokenizer::ByteTokenizer;

const PREFS: &str = r#"{"prompt": "2+2=", "chosen": "4", "rejected": "5"}
{"prompt": "3+1=", "chosen": "4", "rejected": "31"}
{"prompt": "color of sky: ", "chosen": "blue", "rejected": "green"}
"#;

fn config() -> LlamaConfig {
    LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE, 16, 24, 2, 4, 2)
}

fn pairs() -> (Vec<Sequence>, Vec<Sequence>) {
    let prefs = parse_preferences(Path::new("inline.jsonl"), PREFS).unwrap();
    prefs
        .iter()
        .map(|p| TextTokenizer::Bytes.preference(p).unwrap())
        .map(|p| (Sequence::completion(&p.prompt, &p.chosen), Sequence::completion(&p.prompt, &p.rejected)))
        .unzip()
}

/// Mean DPO loss of `policy` against fixed reference log-probs, and its gradient.
fn dpo(policy: &LlamaModel, loss: &DpoLoss, chosen: &[Sequence], rejected: &[Sequence], refs: &(Vec<f32>, Vec<f32>), grads: Option<&mut ParamSet>) -> f64 {
    let n = chosen.len();
    let all: Vec<Sequence> = chosen.iter().chain(rejected).cloned().collect();
    let fwd = policy.forward(&all).unwrap();
    let out = loss.batch(&fwd.logps[..n], &fwd.logps[n..], &refs.0, &refs.1).unwrap();
    if let Some(g) = grads {
        let d: Vec<f32> = out.d_chosen.iter().chain(&out.d_rejected).copied().collect();
        policy.backward(&fwd, &d, g).unwrap();
    }
    out.loss
}

fn with_params(model: &LlamaModel, params: ParamSet) -> LlamaModel {
    LlamaModel::from_params(model.config.clone(), params).unwrap()
}

#[test]
fn dpo_chain_rule_matches_finite_differences() {
    let (chosen, rejected) = pairs();
    let reference = LlamaModel::init(config(), 1).unwrap();
    // a policy that already differs from the reference, with weights large enough
    // for the loss to be far from its value at zero margin (much larger and the
    // loss is so curved along a whole-model direction that no f32 step size
    // gives a usable central difference)
    let mut params = reference.params.clone();
    let mut rng = SplitMix64::new(2);
    for t in &mut params.tensors {
        for x in &mut t.data {
            *x = *x * 3.0 + (rng.next_normal() * 0.05) as f32;
        }
    }
    let policy = with_params(&reference, params.clone());
    let refs = (reference.sequence_logps(&chosen).unwrap(), reference.sequence_logps(&rejected).unwrap());
    for (kind, beta, ls) in [
        (LossKind::Sigmoid, 0.1, 0.0),
        (LossKind::Sigmoid, 0.5, 0.2),
        (LossKind::Ipo, 0.5, 0.0),
        (LossKind::Hinge, 0.05, 0.0),
    ] {
        let loss = DpoLoss::new(kind, beta, ls).unwrap();
        let mut grads = policy.zero_grads();
        dpo(&policy, &loss, &chosen, &rejected, &refs, Some(&mut grads));
        // one random direction over every parameter at once
        let mut rng = SplitMix64::new(3);
        let dir: Vec<Vec<f32>> = params
            .tensors
            .iter()
            .map(|t| t.data.iter().map(|_| rng.next_normal() as f32).collect())
            .collect();
        let analytic: f64 = grads
            .tensors
            .iter()
            .zip(&dir)
            .flat_map(|(g, d)| g.data.iter().zip(d).map(|(&a, &b)| a as f64 * b as f64))
            .sum();
        let eps = 1e-4f32;
        let at = |s: f32| {
            let mut p = params.clone();
            for (t, d) in p.tensors.iter_mut().zip(&dir) {
                for (x, &dx) in t.data.iter_mut().zip(d) {
                    *x += s * dx;
                }
            }
            dpo(&with_params(&policy, p), &loss, &chosen, &rejected, &refs, None)
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        assert!(analytic.abs() > 1e-3, "{kind:?}: gradient vanished ({analytic})");
        assert!(
            (analytic - numeric).abs() <= 1e-2 * analytic.abs().max(numeric.abs()),
            "{kind:?} β={beta}: analytic {analytic:.6e} vs numeric {numeric:.6e}"
        );
    }
}

fn sgd(model: &mut LlamaModel, grads: &ParamSet, lr: f32) {
    for (p, g) in model.params.tensors.iter_mut().zip(&grads.tensors) {
        for (x, &d) in p.data.iter_mut().zip(&g.data) {
            *x -= lr * d;
        }
    }
}

#[test]
fn dpo_steps_raise_the_margin() {
    let (chosen, rejected) = pairs();
    let reference = LlamaModel::init(config(), 5).unwrap();
    let refs = (reference.sequence_logps(&chosen).unwrap(), reference.sequence_logps(&rejected).unwrap());
    let loss = DpoLoss::new(LossKind::Sigmoid, 0.1, 0.0).unwrap();
    let mut policy = with_params(&reference, reference.params.clone());
    let first = dpo(&policy, &loss, &chosen, &rejected, &refs, None);
    assert!((first - std::f64::consts::LN_2).abs() < 1e-6, "policy = reference gives log 2, got {first}");
    for _ in 0..30 {
        let mut g = policy.zero_grads();
        dpo(&policy, &loss, &chosen, &rejected, &refs, Some(&mut g));
        sgd(&mut policy, &g, 0.5);
    }
    let all: Vec<Sequence> = chosen.iter().chain(&rejected).cloned().collect();
    let lp = policy.sequence_logps(&all).unwrap();
    let out = loss.batch(&lp[..3], &lp[3..], &refs.0, &refs.1).unwrap();
    assert!(out.loss < first - 0.05, "loss {first} -> {}", out.loss);
    assert!(out.metrics.rewards_margins > 0.0 && out.metrics.rewards_accuracies == 1.0, "{:?}", out.metrics);
}

#[test]
fn sft_steps_lower_the_cross_entropy() {
    let text = "{\"text\": \"abcabcabcabc\"}\n{\"prompt\": \"Q: \", \"completion\": \"abc\"}\n";
    let seqs: Vec<Sequence> =
        parse_sft(Path::new("inline.jsonl"), text).unwrap().iter().map(|e| TextTokenizer::Bytes.sft(e).unwrap()).collect();
    let mut model = LlamaModel::init(config(), 6).unwrap();
    let tokens: usize = seqs.iter().map(Sequence::scored).sum();
    let before = model.cross_entropy(&seqs).unwrap();
    assert_eq!(before.tokens, tokens);
    // uniform over 259 tokens at init: about ln 259 per token
    assert!((before.nll_sum / tokens as f64 - (259f64).ln()).abs() < 0.1, "{before:?}");
    for _ in 0..40 {
        let mut g = model.zero_grads();
        model.cross_entropy_backward(&seqs, 1.0 / tokens as f32, &mut g).unwrap();
        sgd(&mut model, &g, 1.0);
    }
    let after = model.cross_entropy(&seqs).unwrap();
    assert!(after.nll_sum < 0.7 * before.nll_sum, "{before:?} -> {after:?}");
}
