//! The trainer binary end to end: align runs with each optimizer on a GPU adapter
//! (lavapipe in CI) with both cross-checks on (the optimizer's against merge-core,
//! the model's against the CPU model), resume bit-identity after a kill during a
//! checkpoint write, and bad inputs named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use host::hf;
use host::model::config::LlamaConfig;
use host::model::LlamaModel;
use host::tokenizer::ByteTokenizer;
use merge_core::dtype::Dtype;

mod common;
use common::{host, stderr, tmp};

/// A tiny base model and an SFT model near it, as Hugging Face directories.
fn models(dir: &Path) -> (PathBuf, PathBuf) {
    let config = LlamaConfig::tiny(ByteTokenizer::VOCAB_SIZE, 32, 64, 1, 2, 1);
    let base = LlamaModel::init(config.clone(), 3).unwrap();
    let other = LlamaModel::init(config, 4).unwrap();
    let mut sft = LlamaModel::from_params(base.config.clone(), base.params.clone()).unwrap();
    for (s, o) in sft.params.tensors.iter_mut().zip(&other.params.tensors) {
        for (x, y) in s.data.iter_mut().zip(&o.data) {
            *x += 0.05 * *y;
        }
    }
    let (b, s) = (dir.join("base"), dir.join("sft"));
    hf::save_model(&b, &base, Dtype::F32).unwrap();
    hf::save_model(&s, &sft, Dtype::F32).unwrap();
    (b, s)
}

fn align_args<'a>(base: &'a str, sft: &'a str, out: &'a str, optimizer: &'a str, backend: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "align", "--model", sft, "--base", base, "--builtin", "12", "--builtin-eval", "4", "--eval-every", "2", "--steps", steps,
        "--batch-size", "2", "--grad-accum", "2", "--optimizer", optimizer, "--p", "0.5", "--alpha", "0.1", "--lr", "1e-3",
        "--schedule", "warmup-cosine", "--warmup-steps", "1", "--weight-decay", "0.01", "--seed", "9", "--out", out,
        "--backend", backend, "--cross-check-every", "1", "--checkpoint-every", "2",
    ]
}

/// Every step of a GPU run is cross-checked (`--cross-check-every 1`): the
/// optimizer's bit for bit against merge-core, the model's forward and backward
/// within tolerances against the CPU model, so a run that succeeds agreed at each
/// step. The model's rounding differs from the CPU's, so the whole run is not the
/// CPU run's bits; its losses stay within 1e-3 of them (measured on lavapipe: under 5e-7).
#[test]
fn align_with_each_optimizer_on_gpu_passes_both_cross_checks_and_tracks_cpu() {
    let d = tmp("gpu");
    let (b, s) = models(&d);
    let (b, s) = (b.to_str().unwrap(), s.to_str().unwrap());
    for optimizer in ["adamw", "ondare", "onties"] {
        for extra in [&[][..], &["--k", "2", "--rescale", "--scope", "global", "--variant", "paper"][..]] {
            let mut weights = Vec::new();
            let mut losses = Vec::new();
            for backend in ["gpu", "cpu"] {
                let out = d.join(format!("{optimizer}-{backend}-{}", extra.len()));
                let mut args = align_args(b, s, out.to_str().unwrap(), optimizer, backend, "4");
                args.extend_from_slice(extra);
                let o = host(&args, &[]);
                assert!(o.status.success(), "{optimizer} {backend} {extra:?}: {}", stderr(&o));
                if backend == "gpu" {
                    assert!(stderr(&o).contains("optimizer on gpu: "), "{}", stderr(&o));
                }
                let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
                let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
                for key in [
                    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected", "grad_norm", "learning_rate", "model_ms", "optimizer_ms", "cross_check_ms",
                ] {
                    assert!(first.get(key).is_some(), "{key} missing in {first}");
                }
                for key in ["logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"] {
                    assert!(first[key].is_number(), "{key} with --backend {backend}: {first}");
                }
                assert_eq!(metrics.lines().filter(|l| l.contains("\"split\":\"eval\"")).count(), 2);
                let mut run_losses = Vec::new();
                for line in metrics.lines() {
                    let rec: serde_json::Value = serde_json::from_str(line).unwrap();
                    for key in ["model_device", "optimizer_device"] {
                        let device = rec[key].as_str().unwrap_or_else(|| panic!("{key} missing in {rec}"));
                        assert_eq!(device == "cpu", backend == "cpu", "{key}: {device}");
                    }
                    run_losses.push(rec["loss"].as_f64().unwrap());
                }
                losses.push(run_losses);
                weights.push(std::fs::read(out.join("model/model.safetensors")).unwrap());
            }
            assert_eq!(losses[0].len(), losses[1].len());
            for (step, (g, c)) in losses[0].iter().zip(&losses[1]).enumerate() {
                assert!((g - c).abs() <= 1e-3 * c.abs(), "{optimizer} {extra:?}: line {step}: GPU loss {g}, CPU loss {c}");
            }
            let sft_bytes = std::fs::read(Path::new(s).join("model.safetensors")).unwrap();
            assert_ne!(weights[0], sft_bytes, "{optimizer}: training changed nothing");
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

fn latest(out: &Path) -> String {
    std::fs::read_to_string(out.join("checkpoints/LATEST")).unwrap().trim().to_string()
}

#[test]
fn killed_during_checkpoint_then_resumed_is_bit_identical() {
    let d = tmp("kill");
    let (b, s) = models(&d);
    let (b, s) = (b.to_str().unwrap(), s.to_str().unwrap());
    let whole = d.join("whole");
    let o = host(&align_args(b, s, whole.to_str().unwrap(), "ondare", "cpu", "7").iter().chain(&["--k", "3"]).copied().collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = std::fs::read(whole.join("model/model.safetensors")).unwrap();

    // Killed half-way through the optimizer file of step 4's checkpoint, and (second
    // case) after step 4's directory is in place but before LATEST names it.
    for (file, tag) in [("optimizer.safetensors", "torn"), ("LATEST", "unnamed")] {
        let out = d.join(tag);
        let args: Vec<&str> = align_args(b, s, out.to_str().unwrap(), "ondare", "cpu", "7").into_iter().chain(["--k", "3"]).collect();
        let o = host(&args, &[("HOST_ABORT_WRITING", file), ("HOST_ABORT_AT_STEP", "4")]);
        assert!(!o.status.success(), "the abort hook did not fire: {}", stderr(&o));
        assert!(stderr(&o).contains("HOST_ABORT_WRITING"), "{}", stderr(&o));
        assert_eq!(latest(&out), "step-00000002", "{tag}");
        // The previous checkpoint is intact: it loads and its hash checks out.
        host::train::checkpoint::load(&out.join("checkpoints/step-00000002")).unwrap();
        assert!(!out.join("model").exists(), "{tag}: a final model was written by a killed run");

        let mut resume = args.clone();
        resume.push("--resume");
        let o = host(&resume, &[]);
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        assert!(stderr(&o).contains("resuming after step 2"), "{}", stderr(&o));
        assert_eq!(std::fs::read(out.join("model/model.safetensors")).unwrap(), want, "{tag}: resumed run differs");
        // The metrics log has each step once, as the uninterrupted run's.
        let steps = |p: &Path| -> Vec<(u64, String)> {
            host::train::metrics::read(&p.join("metrics.jsonl")).unwrap().into_iter().map(|r| (r.step, r.split)).collect()
        };
        assert_eq!(steps(&out), steps(&whole));
        let names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".partial-")), "{names:?}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn bad_inputs_are_named_and_nothing_written_is_lost() {
    let d = tmp("bad");
    let (b, s) = models(&d);
    let (bs, ss) = (b.to_str().unwrap(), s.to_str().unwrap());
    let out = d.join("run");
    let o_ = out.to_str().unwrap();
    // `extra` flags replace the defaults of the same name.
    let run = |extra: &[&str]| {
        let mut a = align_args(bs, ss, o_, "ondare", "cpu", "4");
        let mut i = 0;
        while i < extra.len() {
            let flag = extra[i];
            let value = extra.get(i + 1).filter(|v| !v.starts_with("--") || v.parse::<f64>().is_ok());
            match (a.iter().position(|x| *x == flag), value) {
                (Some(j), Some(v)) => a[j + 1] = v,
                (None, Some(v)) => a.extend([flag, *v]),
                (_, None) => a.push(flag),
            }
            i += if value.is_some() { 2 } else { 1 };
        }
        host(&a, &[])
    };
    for (extra, want) in [
        (&["--p", "1.5"][..], "--p = 1.5"),
        (&["--alpha", "-1"][..], "--alpha = -1"),
        (&["--k", "0"][..], "--k = 0"),
        (&["--lr", "nan"][..], "--lr = NaN"),
        (&["--beta", "0"][..], "--beta"),
        (&["--loss", "squared"][..], "--loss"),
        (&["--batch-size", "0"][..], "--batch-size = 0"),
        (&["--resume"][..], "no checkpoint"),
        (&["--schedule", "constant"][..], "--warmup-steps = 1 has no effect with --schedule constant"),
        (&["--builtin-eval", "0"][..], "--eval-every = 2: there is no evaluation data"),
        (&["--resume-anyway"][..], "--resume-anyway: only means something with --resume"),
    ] {
        let o = run(extra);
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert!(stderr(&o).contains(want), "{extra:?}: {}", stderr(&o));
    }
    // A finished run; then a resume with another alpha is refused and leaves it intact.
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = std::fs::read(out.join("model/model.safetensors")).unwrap();
    let o = run(&["--alpha", "0.2", "--resume"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("alpha: saved 0.1"), "{}", stderr(&o));
    let o = run(&[]);
    assert!(stderr(&o).contains("--resume"), "a second run over the same --out must be refused: {}", stderr(&o));
    assert_eq!(std::fs::read(out.join("model/model.safetensors")).unwrap(), before);

    // NaN in the base model's weights: named by tensor.
    let (mut model, _) = hf::load_model(&b).unwrap();
    let name = model.params.tensors[2].name.clone();
    model.params.tensors[2].data[5] = f32::NAN;
    let nan_base = d.join("nan-base");
    std::fs::create_dir_all(&nan_base).unwrap();
    std::fs::copy(b.join("config.json"), nan_base.join("config.json")).unwrap();
    // hf refuses to write NaN, so the file is assembled directly.
    let entries: Vec<(String, &host::params::Tensor)> = model.params.tensors.iter().map(|t| (t.name.clone(), t)).collect();
    std::fs::write(nan_base.join("model.safetensors"), host::train::checkpoint::to_safetensors(&entries).unwrap()).unwrap();
    let out2 = d.join("run2");
    let o = host(&align_args(nan_base.to_str().unwrap(), ss, out2.to_str().unwrap(), "ondare", "cpu", "2"), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&name) && stderr(&o).contains("element 5"), "{}", stderr(&o));

    // A truncated safetensors file and a malformed data line name the file.
    let trunc = d.join("trunc");
    std::fs::create_dir_all(&trunc).unwrap();
    std::fs::copy(s.join("config.json"), trunc.join("config.json")).unwrap();
    let w = std::fs::read(s.join("model.safetensors")).unwrap();
    std::fs::write(trunc.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    let o = host(&align_args(bs, trunc.to_str().unwrap(), d.join("run3").to_str().unwrap(), "ondare", "cpu", "2"), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("model.safetensors"), "{}", stderr(&o));
    let data = d.join("prefs.jsonl");
    std::fs::write(&data, "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\n{\"prompt\":\"a\",\"chosen\":\"b\"}\n").unwrap();
    let o = host(
        &["align", "--model", ss, "--data", data.to_str().unwrap(), "--steps", "1", "--out", d.join("run4").to_str().unwrap(), "--backend", "cpu"],
        &[],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("prefs.jsonl:2") && stderr(&o).contains("rejected"), "{}", stderr(&o));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn verify_prints_a_matching_table() {
    let o = host(&["verify", "--steps", "2"], &[]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", stderr(&o));
    assert!(stdout.contains("golden optimizer.json") && stdout.contains("cases match"), "{stdout}");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.ends_with(" yes")).collect();
    assert!(rows.iter().any(|l| l.starts_with("merge-core")), "{stdout}");
    assert!(rows.iter().any(|l| l.contains(" gpu ")), "no GPU row (CI has lavapipe): {stdout}");
    // Every row of one optimizer shows the same hash.
    for opt in ["adamw", "ondare", "onties"] {
        let hashes: std::collections::BTreeSet<&str> =
            rows.iter().filter(|l| l.contains(&format!(" {opt} "))).map(|l| l.split_whitespace().rev().nth(1).unwrap()).collect();
        assert_eq!(hashes.len(), 1, "{opt}: {stdout}");
    }
}

/// `auto` never runs the step on a software adapter unless it is named: lavapipe
/// computes on the same cores as merge-core, only slower. Named, it is used.
#[test]
fn auto_backend_takes_a_software_adapter_only_by_name() {
    let d = tmp("auto-software");
    let (b, s) = models(&d);
    let (bs, ss) = (b.to_str().unwrap(), s.to_str().unwrap());
    // Only lavapipe is visible, whatever GPUs this machine has: the Vulkan loader
    // is given lavapipe's driver file alone.
    let icd = std::fs::read_dir("/usr/share/vulkan/icd.d")
        .ok()
        .and_then(|dir| dir.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("lvp_icd"))))
        .expect("lavapipe's Vulkan driver file (/usr/share/vulkan/icd.d/lvp_icd.*.json): sudo apt-get install mesa-vulkan-drivers libvulkan1");
    let software_only = |name: &str, adapter: Option<&str>| {
        let out = d.join(name);
        let mut c = Command::new(env!("CARGO_BIN_EXE_host"));
        c.args(align_args(bs, ss, out.to_str().unwrap(), "ondare", "auto", "2"))
            .env("VK_DRIVER_FILES", &icd)
            .env("WGPU_BACKEND", "vulkan")
            .env_remove("MERGE_GPU_ADAPTER");
        if let Some(a) = adapter {
            c.env("MERGE_GPU_ADAPTER", a);
        }
        c.output().unwrap()
    };
    let o = software_only("auto", None);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("optimizer on cpu") && err.contains("only a software adapter"), "auto took the software adapter: {err}");
    let o = software_only("named", Some("llvmpipe"));
    assert!(o.status.success() && stderr(&o).contains("optimizer on gpu: llvmpipe"), "{}", stderr(&o));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn auto_backend_falls_back_to_merge_core_once_and_eval_reports_trl_metrics() {
    let d = tmp("auto");
    let (b, s) = models(&d);
    let (bs, ss) = (b.to_str().unwrap(), s.to_str().unwrap());
    let out = d.join("run");
    let args = align_args(bs, ss, out.to_str().unwrap(), "ondare", "auto", "2");
    let o = host(&args, &[("MERGE_GPU_ADAPTER", "no-such-adapter")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.matches("no usable GPU").count(), 1, "{err}");
    assert!(err.contains("running the model on the CPU and the optimizer on merge-core (CPU) alone"), "{err}");
    assert!(err.contains("no-such-adapter") && err.contains("optimizer on cpu: merge-core"), "{err}");
    // The same adapter request with --backend gpu is an error, not a fallback.
    let gpu_out = d.join("run-gpu");
    let gpu = align_args(bs, ss, gpu_out.to_str().unwrap(), "ondare", "gpu", "2");
    let o = host(&gpu, &[("MERGE_GPU_ADAPTER", "no-such-adapter")]);
    assert!(!o.status.success() && stderr(&o).contains("--backend gpu"), "{}", stderr(&o));

    let o = host(
        &["eval", "--model", out.join("model").to_str().unwrap(), "--ref-model", ss, "--builtin", "6", "--task", "preference"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rec: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    for key in [
        "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
        "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
    ] {
        assert!(rec[key].is_number(), "{key}: {rec}");
    }
    let entropy = rec["entropy"].as_f64().unwrap();
    assert!(entropy > 0.0 && entropy < (259f64).ln(), "entropy {entropy} outside (0, ln vocab)");
    assert_ne!(rec["rewards/margins"].as_f64().unwrap(), 0.0, "aligned model vs SFT reference: {rec}");
    assert_eq!(rec["model_device"], "cpu", "{rec}");
    // On one thread (the default is every core) the record is the same, bit for bit.
    let eval_on = |threads: &str| {
        host(
            &["eval", "--model", out.join("model").to_str().unwrap(), "--ref-model", ss, "--builtin", "6", "--task", "preference", "--threads", threads],
            &[],
        )
    };
    let o = eval_on("1");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(serde_json::from_str::<serde_json::Value>(String::from_utf8_lossy(&o.stdout).trim()).unwrap(), rec);
    let o = eval_on("0");
    assert!(!o.status.success() && stderr(&o).contains("--threads = 0"), "{}", stderr(&o));

    // The same evaluation with both models' forward passes on the GPU agrees to rounding.
    let o = host(
        &[
            "eval", "--model", out.join("model").to_str().unwrap(), "--ref-model", ss, "--builtin", "6", "--task", "preference",
            "--backend", "gpu",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let on_gpu: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_ne!(on_gpu["model_device"], "cpu", "{on_gpu}");
    for key in ["loss", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy"] {
        let (g, c) = (on_gpu[key].as_f64().unwrap(), rec[key].as_f64().unwrap());
        assert!((g - c).abs() <= 1e-4 * c.abs().max(1.0), "{key}: GPU {g}, CPU {c}");
    }
    assert_eq!(on_gpu["mean_token_accuracy"], rec["mean_token_accuracy"], "argmax hits: GPU {on_gpu}, CPU {rec}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// TRL's precomputed `ref_chosen_logps` / `ref_rejected_logps` in the data replace
/// the reference model: with the SFT model's own log-probs the run is bit-identical
/// to one that computes them from `--model`.
#[test]
fn precomputed_reference_logps_match_the_reference_model() {
    use host::model::Sequence;
    let d = tmp("reflogps");
    let (b, s) = models(&d);
    let (bs, ss) = (b.to_str().unwrap(), s.to_str().unwrap());
    let prefs = [("2+2?", "4", "five"), ("hi", "hello there", "go away"), ("", "a fine answer", "no"), ("x", "yy", "zzz")];
    let (sft, _) = hf::load_model(&s).unwrap();
    let tok = ByteTokenizer;
    let mut plain = String::new();
    let mut with_ref = String::new();
    for (p, c, r) in prefs {
        let prompt = tok.encode_prompt(p);
        let seqs = [
            Sequence::completion(&prompt, &tok.encode_completion(c)),
            Sequence::completion(&prompt, &tok.encode_completion(r)),
        ];
        let lp = sft.sequence_logps(&seqs).unwrap();
        let rec = serde_json::json!({"prompt": p, "chosen": c, "rejected": r});
        plain.push_str(&format!("{rec}\n"));
        let rec = serde_json::json!({"prompt": p, "chosen": c, "rejected": r, "ref_chosen_logps": lp[0], "ref_rejected_logps": lp[1]});
        with_ref.push_str(&format!("{rec}\n"));
    }
    let mut weights = Vec::new();
    for (tag, text) in [("plain", &plain), ("ref", &with_ref)] {
        let data = d.join(format!("{tag}.jsonl"));
        std::fs::write(&data, text).unwrap();
        let out = d.join(tag);
        let o = host(
            &[
                "align", "--model", ss, "--base", bs, "--data", data.to_str().unwrap(), "--steps", "3", "--batch-size", "2",
                "--optimizer", "ondare", "--p", "0.5", "--alpha", "0.1", "--lr", "1e-3", "--out", out.to_str().unwrap(),
                "--backend", "cpu",
            ],
            &[],
        );
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        assert_eq!(tag == "ref", stderr(&o).contains("reference log-probs given in the data"), "{}", stderr(&o));
        weights.push(std::fs::read(out.join("model/model.safetensors")).unwrap());
    }
    assert_eq!(weights[0], weights[1]);
    let torn = d.join("torn.jsonl");
    let mut lines: Vec<&str> = with_ref.lines().collect();
    lines[2] = plain.lines().nth(2).unwrap();
    std::fs::write(&torn, lines.join("\n")).unwrap();
    let o = host(&["align", "--model", ss, "--data", torn.to_str().unwrap(), "--steps", "1", "--out", d.join("t").to_str().unwrap()], &[]);
    assert!(!o.status.success() && stderr(&o).contains("torn.jsonl:3"), "{}", stderr(&o));
    std::fs::remove_dir_all(&d).unwrap();
}

/// Sizes beyond what the data or 64 bits can hold are named errors, raised before
/// anything is allocated (they used to panic, abort on allocation, exhaust memory,
/// or wrap the step count and train 11 steps).
#[test]
fn oversized_flags_are_named_errors_before_any_allocation() {
    let d = tmp("oversized");
    let out = d.join("run");
    let base = [
        "pretrain", "--hidden-size", "32", "--intermediate-size", "64", "--layers", "1", "--heads", "2",
        "--kv-heads", "1", "--backend", "cpu", "--out", out.to_str().unwrap(),
    ];
    for (extra, want) in [
        (&["--builtin", "60", "--batch-size", "18446744073709551615"][..], "--batch-size = 18446744073709551615: larger than the 60 training examples"),
        (&["--builtin", "60", "--batch-size", "1000000"][..], "expected at most 60"),
        (&["--builtin", "60", "--batch-size", "4294967296", "--grad-accum", "4294967296"][..], "--batch-size = 4294967296"),
        (&["--builtin", "60", "--batch-size", "8", "--steps", "18446744073709551615"][..], "overflows the data position"),
        (&["--builtin", "1000000000000"][..], "--builtin = 1000000000000: expected at most 1000000"),
        (&["--builtin", "60", "--builtin-eval", "1000000000000"][..], "--builtin-eval = 1000000000000: expected at most 1000000"),
        (&["--builtin", "60", "--epochs", "307445734561825861"][..], "--epochs = 307445734561825861"),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let o = host(&args, &[]);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{extra:?}: {}", stderr(&o));
        assert!(!out.join("metrics.jsonl").exists(), "{extra:?} started a run");
    }
    // 550 billion parameters: refused before a single one is allocated.
    let huge = [
        "pretrain", "--hidden-size", "32768", "--intermediate-size", "65536", "--layers", "64", "--heads", "4", "--kv-heads", "1",
        "--builtin", "60", "--backend", "cpu", "--out", out.to_str().unwrap(),
    ];
    let o = host(&huge, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("parameters need about") && stderr(&o).contains("MiB available"), "{}", stderr(&o));
    std::fs::remove_dir_all(&d).unwrap();
}

fn align_on_data<'a>(base: &'a str, sft: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "align", "--model", sft, "--base", base, "--data", data, "--steps", "4", "--batch-size", "2", "--optimizer", "ondare",
        "--p", "0.5", "--alpha", "0.1", "--lr", "1e-3", "--seed", "9", "--out", out, "--backend", "cpu", "--checkpoint-every", "2",
    ]
}

fn write_prefs(path: &Path, n: usize) {
    let text: String = (0..n).map(|i| format!("{{\"prompt\":\"{i}+1=\",\"chosen\":\"{}\",\"rejected\":\"no\"}}\n", i + 1)).collect();
    std::fs::write(path, text).unwrap();
}

/// Long examples are cut as TRL cuts them (--max-length, --truncation-mode,
/// --max-prompt-length); only one that truncation cannot fit is refused, named by
/// its line, with nothing written.
#[test]
fn long_examples_are_truncated_and_only_unfittable_ones_refused() {
    let d = tmp("truncation");
    let (b, s) = models(&d);
    let (bs, ss) = (b.to_str().unwrap(), s.to_str().unwrap());
    let data = d.join("prefs.jsonl");
    let long_prompt = "9".repeat(40);
    let mut text: String = (0..4).map(|i| format!("{{\"prompt\":\"{i}+1=\",\"chosen\":\"{}\",\"rejected\":\"no\"}}\n", i + 1)).collect();
    text.push_str(&format!("{{\"prompt\":\"{long_prompt}\",\"chosen\":\"yes\",\"rejected\":\"no\"}}\n"));
    std::fs::write(&data, &text).unwrap();
    let ds = data.to_str().unwrap();
    let run = |tag: &str, extra: &[&str]| {
        let out = d.join(tag);
        let mut args = align_on_data(bs, ss, ds, out.to_str().unwrap());
        args.extend_from_slice(extra);
        (host(&args, &[]), out)
    };

    let (o, out) = run("keep-start", &["--max-length", "20"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("prefs.jsonl:5: chosen: the prompt alone is 41 tokens"), "{}", stderr(&o));
    assert!(!out.exists(), "a refused run wrote {}", out.display());
    for (tag, extra) in [("keep-end", &["--max-length", "20", "--truncation-mode", "keep_end"][..]), ("prompt-cut", &["--max-length", "20", "--max-prompt-length", "8"][..])] {
        let (o, out) = run(tag, extra);
        assert!(o.status.success(), "{tag}: {}", stderr(&o));
        assert!(out.join("model/model.safetensors").is_file());
    }

    // Longer than the model's context even untruncated: the message says what to lower.
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(s.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = 32.into();
    std::fs::write(s.join("config.json"), config.to_string()).unwrap();
    let (o, _) = run("context", &["--max-length", "none"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("prefs.jsonl:5: the example is 45 tokens long after truncation, more than the model's max_position_embeddings 32: lower --max-length"), "{}", stderr(&o));
    let (o, _) = run("bad-mode", &["--truncation-mode", "middle"]);
    assert!(stderr(&o).contains("--truncation-mode `middle`: expected keep_start or keep_end"), "{}", stderr(&o));
    std::fs::remove_dir_all(&d).unwrap();
}

/// `--out` holding the model, the base or the data would have the run write over
/// its own input (the final model over `--model out/X/model`, say).
#[test]
fn an_out_that_holds_an_input_is_refused_and_the_input_kept() {
    let d = tmp("out-holds-input");
    let (b, s) = models(&d);
    let x = d.join("x");
    let (model, _) = hf::load_model(&s).unwrap();
    hf::save_model(&x.join("model"), &model, Dtype::F32).unwrap();
    let data = x.join("prefs.jsonl");
    write_prefs(&data, 4);
    let before = std::fs::read(x.join("model/model.safetensors")).unwrap();
    let (bs, xs, ds) = (b.to_str().unwrap(), x.to_str().unwrap(), data.to_str().unwrap());
    let inner = x.join("model").to_str().unwrap().to_string();
    let other_data = d.join("prefs.jsonl");
    write_prefs(&other_data, 4);
    for (args, want) in [
        (align_on_data(bs, &inner, ds, xs), "contains --model"),
        (align_on_data(bs, s.to_str().unwrap(), ds, xs), "contains --data"),
        (align_on_data(bs, s.to_str().unwrap(), other_data.to_str().unwrap(), d.to_str().unwrap()), "contains --model"),
    ] {
        let o = host(&args, &[]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains(want), "{want}: {}", stderr(&o));
    }
    assert_eq!(std::fs::read(x.join("model/model.safetensors")).unwrap(), before);
    assert!(!x.join("metrics.jsonl").exists() && !x.join("checkpoints").exists());
    std::fs::remove_dir_all(&d).unwrap();
}

/// One run per `--out` at a time: a second is refused before it writes anything,
/// so the first one's metrics keep every step; a lock left by a killed run is
/// taken over, and said so.
#[test]
fn an_out_is_locked_for_the_life_of_a_run() {
    let d = tmp("lock");
    let (b, s) = models(&d);
    let data = d.join("prefs.jsonl");
    write_prefs(&data, 6);
    let (bs, ss, ds) = (b.to_str().unwrap(), s.to_str().unwrap(), data.to_str().unwrap());

    let held = d.join("held");
    let lock = host::train::outdir::OutDirLock::acquire(&held).unwrap();
    let o = host(&align_on_data(bs, ss, ds, held.to_str().unwrap()), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("in use by another run (pid {},", std::process::id())), "{}", stderr(&o));
    assert!(!held.join("metrics.jsonl").exists());
    drop(lock);

    let stale = d.join("stale");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join(".lock"), "4000000000\n").unwrap();
    let o = host(&align_on_data(bs, ss, ds, stale.to_str().unwrap()), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("taking over the lock") && stderr(&o).contains("pid 4000000000"), "{}", stderr(&o));
    assert!(!stale.join(".lock").exists(), "a finished run leaves its lock behind");

    let both = d.join("both");
    let args = align_on_data(bs, ss, ds, both.to_str().unwrap());
    let spawn = || Command::new(env!("CARGO_BIN_EXE_host")).args(&args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let (first, second) = (spawn(), spawn());
    let results = [first.wait_with_output().unwrap(), second.wait_with_output().unwrap()];
    let ok: Vec<&Output> = results.iter().filter(|o| o.status.success()).collect();
    assert_eq!(ok.len(), 1, "{} | {}", stderr(&results[0]), stderr(&results[1]));
    let refused = results.iter().find(|o| !o.status.success()).unwrap();
    assert!(stderr(refused).contains("in use by another run") || stderr(refused).contains("--resume"), "{}", stderr(refused));
    let recs = host::train::metrics::read(&both.join("metrics.jsonl")).unwrap();
    assert_eq!(recs.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    std::fs::remove_dir_all(&d).unwrap();
}

/// The checkpoint records the content of the data and of every input model;
/// `--resume` names what changed and refuses, unless `--resume-anyway`. Stale
/// temporary files of the killed run are removed.
#[test]
fn resume_notices_changed_inputs_and_removes_stale_temporaries() {
    let d = tmp("resume-inputs");
    let (b, s) = models(&d);
    let data = d.join("prefs.jsonl");
    write_prefs(&data, 6);
    let reference = d.join("ref");
    let (sft_model, _) = hf::load_model(&s).unwrap();
    hf::save_model(&reference, &sft_model, Dtype::F32).unwrap();
    let out = d.join("run");
    let (bs, ss, ds, os) = (b.to_str().unwrap(), s.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    let mut args = align_on_data(bs, ss, ds, os);
    args.extend(["--ref-model", reference.to_str().unwrap()]);
    let o = host(&args, &[("HOST_ABORT_WRITING", "LATEST"), ("HOST_ABORT_AT_STEP", "4")]);
    assert!(!o.status.success() && latest(&out) == "step-00000002", "{}", stderr(&o));
    let resume: Vec<&str> = args.iter().copied().chain(["--resume"]).collect();

    let original = std::fs::read(&data).unwrap();
    std::fs::write(&data, String::from_utf8(original.clone()).unwrap().replace("\"3\"", "\"4\"")).unwrap();
    let o = host(&resume, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("--data {ds}: content changed since the checkpoint")), "{}", stderr(&o));
    assert!(stderr(&o).contains("--resume-anyway"), "{}", stderr(&o));
    std::fs::write(&data, &original).unwrap();

    let (base_model, _) = hf::load_model(&b).unwrap();
    hf::save_model(&reference, &base_model, Dtype::F32).unwrap();
    let o = host(&resume, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--ref-model") && stderr(&o).contains("content changed"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("--data "), "the restored data is reported as changed: {}", stderr(&o));

    let temps = [out.join("checkpoints/.LATEST.tmp-77777"), out.join("checkpoints/step-00000002/model/.model.safetensors.tmp-77777")];
    for t in &temps {
        std::fs::write(t, b"torn").unwrap();
    }
    let anyway: Vec<&str> = resume.iter().copied().chain(["--resume-anyway"]).collect();
    let o = host(&anyway, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: --resume-anyway: --ref-model"), "{}", stderr(&o));
    assert!(stderr(&o).contains("removed temporary files left by a killed run"), "{}", stderr(&o));
    for t in &temps {
        assert!(!t.exists(), "{} survived the resume", t.display());
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Flips one bit of `tensor`'s first element in a safetensors file.
fn flip_bit(file: &Path, tensor: &str, mask: u8) {
    let mut bytes = std::fs::read(file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let start = 8 + header_len + header[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[start + 3] ^= mask;
    std::fs::write(file, bytes).unwrap();
}

/// A damaged newest checkpoint (a flipped bit in a moment, a truncated file) is
/// named, and the resume falls back to the older intact one, bit-exactly; a LATEST
/// that names anything but a checkpoint is not followed.
#[test]
fn resume_falls_back_from_a_damaged_checkpoint_and_never_follows_a_bad_latest() {
    let d = tmp("fallback");
    let (b, s) = models(&d);
    let data = d.join("prefs.jsonl");
    write_prefs(&data, 6);
    let out = d.join("run");
    let args = align_on_data(b.to_str().unwrap(), s.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    let o = host(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = std::fs::read(out.join("model/model.safetensors")).unwrap();
    let resume: Vec<&str> = args.iter().copied().chain(["--resume"]).collect();
    let newest = out.join("checkpoints/step-00000004/optimizer.safetensors");
    let tensor = "exp_avg_sq/model.norm.weight";

    flip_bit(&newest, tensor, 0x40);
    let o = host(&resume, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("checkpoint step-00000004 is damaged") && err.contains("optimizer state `exp_avg_sq`"), "{err}");
    assert!(err.contains("older intact checkpoint step-00000002") && err.contains("resuming after step 2"), "{err}");
    assert_eq!(std::fs::read(out.join("model/model.safetensors")).unwrap(), want);

    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let o = host(&resume, &[]);
    assert!(o.status.success() && stderr(&o).contains("resuming after step 2"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("model/model.safetensors")).unwrap(), want);

    std::fs::write(out.join("checkpoints/LATEST"), "../../../etc\n").unwrap();
    let o = host(&resume, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("names `../../../etc`, which is not a checkpoint directory"), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming after step 4"), "{}", stderr(&o));
    std::fs::remove_dir_all(&d).unwrap();
}

/// Settings that used to be accepted without a word.
#[test]
fn silently_accepted_settings_are_named() {
    let d = tmp("silent");
    let (b, s) = models(&d);
    let (bs, ss) = (b.to_str().unwrap(), s.to_str().unwrap());
    let long = d.join("long.jsonl");
    let text = format!("{{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}}\n\n{{\"prompt\":\"{}\",\"chosen\":\"b\",\"rejected\":\"c\"}}\n", "x".repeat(2100));
    std::fs::write(&long, text).unwrap();
    let out = d.join("run");
    let os = out.to_str().unwrap();
    let pretrain = ["pretrain", "--builtin", "8", "--layers", "1", "--kv-heads", "1", "--backend", "cpu", "--out", os];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (pretrain.iter().copied().chain(["--hidden-size", "34", "--heads", "4"]).collect(), "--hidden-size = 34: not a multiple of --heads = 4"),
        (pretrain.iter().copied().chain(["--optimizer", "ondare"]).collect(), "pretrain has no task vector to merge"),
        (vec!["align", "--model", ss, "--builtin", "8", "--optimizer", "onties", "--backend", "cpu", "--out", os], "give the pretrained model as --base"),
        (align_on_data(bs, ss, long.to_str().unwrap(), os), "long.jsonl:3: chosen: the prompt alone is 2101 tokens"),
    ];
    for (args, want) in cases {
        let o = host(&args, &[]);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{want}: {}", stderr(&o));
        assert!(!stderr(&o).contains("merging needs"), "{}", stderr(&o));
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// `verify` fails when it checked less than it was asked to, and names why.
#[test]
fn verify_fails_when_it_checked_less_than_asked() {
    let d = tmp("verify-less");
    let missing = d.join("no-such-dir");
    let o = host(&["verify", "--steps", "1", "--cpu-only", "--golden", missing.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no-such-dir"), "{}", stderr(&o));
    let o = host(&["verify", "--steps", "1", "--cpu-only", "--golden", d.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no golden vector files"), "{}", stderr(&o));
    let stdout = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();
    for (env, hint) in [
        (("WGPU_BACKEND", ""), "WGPU_BACKEND=\"\" selects no backend"),
        (("VK_DRIVER_FILES", "/nonexistent/icd.json"), "VK_DRIVER_FILES names /nonexistent/icd.json"),
    ] {
        let o = host(&["verify", "--steps", "1"], &[env]);
        assert_eq!(o.status.code(), Some(1), "{env:?}: {}", stdout(&o));
        assert!(stdout(&o).contains(hint) && stdout(&o).contains("--allow-no-gpu"), "{env:?}: {}", stdout(&o));
        let o = host(&["verify", "--steps", "1", "--allow-no-gpu"], &[env]);
        assert!(o.status.success(), "{env:?}: {}", stdout(&o));
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Two adapters of one name (lavapipe is `llvmpipe` on Vulkan and on GL) are both
/// checked: verify opens adapters by position, not by name. Where wgpu finds no GL
/// adapter (no Mesa EGL installed) only the Vulkan half can be seen.
#[test]
fn verify_checks_two_adapters_of_the_same_name() {
    let stdout = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let gpu_rows = |text: &str, backend: &str| text.lines().filter(|l| l.contains(&format!("({backend}, ")) && l.ends_with(" yes")).count();
    let gl_only = host(&["verify", "--steps", "1", "--allow-no-gpu"], &[("WGPU_BACKEND", "gl")]);
    assert!(gl_only.status.success(), "{}", stdout(&gl_only));
    let o = host(&["verify", "--steps", "1"], &[("WGPU_BACKEND", "vulkan,gl")]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert_eq!(gpu_rows(&stdout(&o), "Vulkan"), 3, "{}", stdout(&o));
    assert_eq!(gpu_rows(&stdout(&o), "Gl"), gpu_rows(&stdout(&gl_only), "Gl"), "{}", stdout(&o));
}

#[test]
fn the_thread_count_never_changes_the_weights() {
    let d = tmp("threads");
    let (b, s) = models(&d);
    let (b, s) = (b.to_str().unwrap(), s.to_str().unwrap());
    for optimizer in ["onties", "ondare"] {
        let mut weights = Vec::new();
        for threads in ["1", "3"] {
            let out = d.join(format!("{optimizer}-{threads}"));
            let extra = ["--threads", threads, "--rescale"];
            let args: Vec<&str> = align_args(b, s, out.to_str().unwrap(), optimizer, "cpu", "3").into_iter().chain(extra).collect();
            let o = host(&args, &[]);
            assert!(o.status.success(), "{optimizer}, {threads} threads: {}", stderr(&o));
            weights.push(std::fs::read(out.join("model/model.safetensors")).unwrap());
        }
        assert!(weights[0] == weights[1], "{optimizer}: 1 and 3 threads differ");
    }
    let out = d.join("zero");
    let args: Vec<&str> = align_args(b, s, out.to_str().unwrap(), "ondare", "cpu", "3").into_iter().chain(["--threads", "0"]).collect();
    let o = host(&args, &[]);
    assert!(!o.status.success() && stderr(&o).contains("--threads = 0: expected an integer >= 1"), "{}", stderr(&o));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn the_math_mode_is_recorded_and_a_resume_may_not_switch_it() {
    let d = tmp("math");
    let (b, s) = models(&d);
    let (b, s) = (b.to_str().unwrap(), s.to_str().unwrap());
    // what this CPU does with fused math: FMA where it has it, else the portable products
    let fuses = host::model::simd::fuses_at(host::model::simd::detected());
    let mut weights = Vec::new();
    for (mode, extra) in [("fused", &[][..]), ("portable", &["--portable-math"][..])] {
        let out = d.join(mode);
        let args: Vec<&str> = align_args(b, s, out.to_str().unwrap(), "ondare", "cpu", "2").into_iter().chain(extra.iter().copied()).collect();
        let o = host(&args, &[]);
        assert!(o.status.success(), "{mode}: {}", stderr(&o));
        let used = if fuses && mode == "fused" { "fused" } else { "portable" };
        assert!(stderr(&o).contains(&format!("model on cpu ({used} math)")), "{mode}: {}", stderr(&o));
        weights.push(std::fs::read(out.join("model/model.safetensors")).unwrap());
    }
    // fused products round differently (on a CPU without FMA they are the portable ones)
    assert_eq!(weights[0] != weights[1], fuses, "fused and portable weights");
    if fuses {
        let out = d.join("fused");
        let args: Vec<&str> = align_args(b, s, out.to_str().unwrap(), "ondare", "cpu", "2").into_iter().chain(["--resume", "--portable-math"]).collect();
        let o = host(&args, &[]);
        assert!(!o.status.success() && stderr(&o).contains(r#""math":"fused""#), "{}", stderr(&o));
        assert_eq!(std::fs::read(out.join("model/model.safetensors")).unwrap(), weights[0], "the refused resume changed the model");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// `host bench --rounds N --torch PYTHON` runs host and the PyTorch side
/// alternately and ends with the median and range of the rounds' ratios. A
/// stand-in for Python prints the two lines `dpo_step_torch.py` prints.
#[cfg(unix)]
#[test]
fn bench_rounds_alternate_with_torch_and_summarize_the_ratios() {
    use std::os::unix::fs::PermissionsExt;
    let d = tmp("bench-rounds");
    let python = d.join("python");
    std::fs::write(&python, "#!/bin/sh\necho 'PyTorch stand-in DPO step'\necho 'torch  step ms 1.0  tokens/s 32000.0  peak resident memory 100 MiB'\n").unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let python = python.to_str().unwrap();
    let args = |rounds: &'static str| ["bench", "--shape", "tiny", "--seq", "16", "--pairs", "1", "--steps", "1", "--paths", "cpu", "--torch", python, "--rounds", rounds];
    let o = host(&args("3"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("round 3 of 3") && out.matches("PyTorch stand-in").count() == 3, "{out}");
    let mut ratios: Vec<f64> = out.lines().filter_map(|l| l.strip_prefix("host cpu / torch: step time ")).map(|r| r[..r.find('x').unwrap()].parse().unwrap()).collect();
    assert_eq!(ratios.len(), 3, "{out}");
    ratios.sort_by(f64::total_cmp);
    let summary = format!("host cpu / torch over 3 rounds: step time median {:.2}x, range {:.2}x to {:.2}x", ratios[1], ratios[0], ratios[2]);
    assert!(out.contains(&summary), "no `{summary}` in:\n{out}");
    let o = host(&args("0"), &[]);
    assert!(!o.status.success() && stderr(&o).contains("--rounds"), "{}", stderr(&o));
    std::fs::remove_dir_all(&d).unwrap();
}

/// `--objective pretrain` times the pretraining step and asks the PyTorch side
/// for the same one (the stand-in echoes the arguments it was given).
#[test]
fn bench_times_the_pretraining_step_beside_torch() {
    use std::os::unix::fs::PermissionsExt;
    let d = tmp("bench-pretrain");
    let python = d.join("python");
    std::fs::write(&python, "#!/bin/sh
echo \"PyTorch stand-in $*\"\necho 'torch  step ms 1.0  tokens/s 32000.0  peak resident memory 100 MiB'\n").unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = host(&["bench", "--shape", "tiny", "--seq", "16", "--pairs", "2", "--steps", "1", "--paths", "cpu", "--objective", "pretrain", "--torch", python.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("pretraining step, tiny") && out.contains("4 sequences x 16 tokens = 64 tokens per step"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("PyTorch stand-in") && l.contains("--objective pretrain") && l.contains("--pairs 2")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("cpu ")) && out.contains("host cpu / torch: step time"), "{out}");
    let o = host(&["bench", "--shape", "tiny", "--steps", "1", "--paths", "cpu", "--objective", "sft"], &[]);
    assert!(!o.status.success() && stderr(&o).contains("--objective"), "{}", stderr(&o));
    std::fs::remove_dir_all(&d).unwrap();
}
