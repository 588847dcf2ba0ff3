//! Training with the model's forward and backward on a GPU (`--backend gpu`,
//! lavapipe in CI): a DPO run cross-checked against the CPU model at every step,
//! two identical runs giving the same bits, and a run killed during a checkpoint
//! write then resumed ending bit-identical to an uninterrupted one; and the
//! language-modelling objective (pretraining, SFT) cross-checked the same way.
//!
//! Runs on lavapipe in CI: no adapter is a failure, never a skip.

use std::path::{Path, PathBuf};

use host::hf;
use host::model::{Family, LlamaConfig, LlamaModel};
use host::tokenizer::ByteTokenizer;
use merge_core::dtype::Dtype;

mod common;
use common::{host, stderr, tmp};

/// A tiny Qwen2-style policy (q/k/v biases, grouped-query attention, tied
/// embeddings) as a Hugging Face directory.
fn policy(dir: &Path) -> PathBuf {
    let mut config = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE, 32, 64, 1, 4, 2);
    config.family = Family::Qwen2;
    config.tie_word_embeddings = true;
    let model = LlamaModel::init(config, 3).unwrap();
    let p = dir.join("policy");
    hf::save_model(&p, &model, Dtype::F32).unwrap();
    p
}

fn align_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    align_args_with(model, out, "2", "1")
}

fn align_args_with<'a>(model: &'a str, out: &'a str, grad_accum: &'a str, cross_check_every: &'a str) -> Vec<&'a str> {
    vec![
        "align", "--model", model, "--builtin", "4", "--builtin-eval", "2", "--eval-every", "2", "--steps", "4", "--batch-size", "1", "--grad-accum", grad_accum, "--optimizer",
        "adamw", "--lr", "1e-2", "--seed", "4", "--out", out, "--backend", "gpu", "--cross-check-every", cross_check_every, "--checkpoint-every",
        "2",
    ]
}

fn weights(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("model/model.safetensors")).unwrap()
}

/// `train` lines and `eval` lines, every one saying it ran on the GPU, every
/// training step cross-checked.
fn check_metrics(out: &Path, train: usize, eval: usize) {
    let records = host::train::metrics::read(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(records.iter().filter(|r| r.split == "train").count(), train);
    assert_eq!(records.iter().filter(|r| r.split == "eval").count(), eval);
    for r in &records {
        let (model_device, optimizer_device) = (r.model_device.as_deref().unwrap(), r.optimizer_device.as_deref().unwrap());
        assert!(model_device != "cpu" && model_device == optimizer_device, "step {}: {model_device} / {optimizer_device}", r.step);
        if r.split == "train" {
            assert!(r.optimizer_checked == Some(true) && r.model_checked == Some(true), "step {} was not cross-checked", r.step);
        }
    }
}

#[test]
fn pretrain_on_gpu_is_cross_checked() {
    let d = tmp("pretrain");
    let out = d.join("run");
    let o = host(
        &[
            "pretrain", "--builtin", "4", "--builtin-eval", "2", "--eval-every", "2", "--steps", "2", "--batch-size", "2",
            "--hidden-size", "32", "--intermediate-size", "64", "--layers", "1", "--heads", "4", "--kv-heads", "1", "--lr", "1e-2",
            "--out", out.to_str().unwrap(), "--backend", "gpu", "--cross-check-every", "1",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    check_metrics(&out, 2, 1);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn align_on_gpu_is_cross_checked_reproducible_and_resumes_bit_identically() {
    let d = tmp("align");
    let model = policy(&d);
    let model = model.to_str().unwrap();

    let first = d.join("first");
    let o = host(&align_args(model, first.to_str().unwrap()), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    check_metrics(&first, 4, 2);
    assert_ne!(weights(&first), std::fs::read(Path::new(model).join("model.safetensors")).unwrap(), "training changed nothing");

    let second = d.join("second");
    let o = host(&align_args(model, second.to_str().unwrap()), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(weights(&second), weights(&first), "two identical GPU runs differ");

    // killed while writing step 4's optimizer state: step 2's checkpoint is the
    // newest, and the resumed run redoes steps 3 and 4 on the GPU
    let killed = d.join("killed");
    let args = align_args(model, killed.to_str().unwrap());
    let o = host(&args, &[("HOST_ABORT_WRITING", "optimizer.safetensors"), ("HOST_ABORT_AT_STEP", "4")]);
    assert!(!o.status.success() && stderr(&o).contains("HOST_ABORT_WRITING"), "the abort hook did not fire: {}", stderr(&o));
    let mut resume = args.clone();
    resume.push("--resume");
    let o = host(&resume, &[]);
    assert!(o.status.success() && stderr(&o).contains("resuming after step 2"), "{}", stderr(&o));
    assert_eq!(weights(&killed), weights(&first), "the resumed GPU run differs from the uninterrupted one");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Steps that are not cross-checked keep the gradients and weights on the device
/// (the optimizer copies them there; only the grad norm and the loss come back).
/// With one micro-batch per step that is the same arithmetic as the read-back
/// path, so an all-resident run gives the all-checked run's bits; with two, the
/// device adds the micro-batches in another order than the host, so the run is
/// reproducible and resumes bit-identically but only tracks the checked run.
#[test]
fn resident_steps_keep_gradients_on_the_device_and_stay_reproducible() {
    let d = tmp("resident");
    let model = policy(&d);
    let model = model.to_str().unwrap();
    let run = |tag: &str, accum: &str, every: &str, env: &[(&str, &str)], resume: bool| {
        let out = d.join(tag);
        let mut args = align_args_with(model, out.to_str().unwrap(), accum, every);
        if resume {
            args.push("--resume");
        }
        (host(&args, env), out)
    };
    let records = |out: &Path| host::train::metrics::read(&out.join("metrics.jsonl")).unwrap();

    let (o, checked) = run("checked", "1", "1", &[], false);
    assert!(o.status.success(), "{}", stderr(&o));
    let (o, resident) = run("resident", "1", "0", &[], false);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(weights(&resident), weights(&checked), "resident steps changed the arithmetic");
    for (r, c) in records(&resident).iter().zip(&records(&checked)).filter(|(r, _)| r.split == "train") {
        assert_eq!((r.optimizer_checked, r.model_checked, r.resident), (Some(false), Some(false), Some(true)), "step {}", r.step);
        assert_eq!(c.resident, Some(false), "step {}: a checked step reads the gradients back", c.step);
        assert_eq!(r.loss.to_bits(), c.loss.to_bits(), "step {} loss", r.step);
        let (gr, gc) = (r.grad_norm.unwrap(), c.grad_norm.unwrap());
        assert!((gr - gc).abs() <= 1e-5 * gc, "step {}: grad_norm {gr} on the device, {gc} on the host", r.step);
    }

    // Two micro-batches, every third step checked: steps 1, 2 and 4 resident.
    let (o, mixed) = run("mixed", "2", "3", &[], false);
    assert!(o.status.success(), "{}", stderr(&o));
    let flags: Vec<(Option<bool>, Option<bool>)> =
        records(&mixed).iter().filter(|r| r.split == "train").map(|r| (r.optimizer_checked, r.resident)).collect();
    let (unchecked, checked) = ((Some(false), Some(true)), (Some(true), Some(false)));
    assert_eq!(flags, [unchecked, unchecked, checked, unchecked]);
    let (o, again) = run("mixed-again", "2", "3", &[], false);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(weights(&again), weights(&mixed), "two identical resident runs differ");
    let abort = [("HOST_ABORT_WRITING", "optimizer.safetensors"), ("HOST_ABORT_AT_STEP", "4")];
    let (o, _) = run("mixed-killed", "2", "3", &abort, false);
    assert!(!o.status.success() && stderr(&o).contains("HOST_ABORT_WRITING"), "{}", stderr(&o));
    let (o, killed) = run("mixed-killed", "2", "3", &[], true);
    assert!(o.status.success() && stderr(&o).contains("resuming after step 2"), "{}", stderr(&o));
    assert_eq!(weights(&killed), weights(&mixed), "the resumed resident run differs from the uninterrupted one");

    let (o, all_checked) = run("accum-checked", "2", "1", &[], false);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (hf::load_model(&mixed.join("model")).unwrap().0, hf::load_model(&all_checked.join("model")).unwrap().0);
    for (x, y) in a.params.tensors.iter().zip(&b.params.tensors) {
        let diff = x.data.iter().zip(&y.data).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-4, "{}: the resident run is {diff} from the checked one", x.name);
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// `host bench` (a benchmark, not a timed test): both paths run the real
/// training loop on the tiny shape and print a positive rate; a bad shape is named.
#[test]
fn bench_runs_both_paths_and_prints_their_rates() {
    let o = host(&["bench", "--shape", "tiny", "--seq", "16", "--pairs", "1", "--steps", "1", "--paths", "both"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    for path in ["cpu", "gpu"] {
        let line = out.lines().find(|l| l.starts_with(&format!("{path} "))).unwrap_or_else(|| panic!("no {path} line: {out}"));
        let rate: f64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert!(rate > 0.0, "{line}");
    }
    assert!(out.contains("32 tokens per step"), "{out}");
    let o = host(&["bench", "--shape", "no-such.json", "--paths", "cpu"], &[]);
    assert!(!o.status.success() && stderr(&o).contains("--shape: "), "{}", stderr(&o));
}
