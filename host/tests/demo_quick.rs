//! CI smoke test of the demo: the quick preset end to end, checking that every
//! output exists and parses and that the table covers every run.

use host::demo::pipeline::{run, DemoConfig, RunOptions};

fn parse_xml(path: &std::path::Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut elements = 0;
    for ev in xml::reader::EventReader::from_str(&text) {
        if let xml::reader::XmlEvent::StartElement { .. } = ev.unwrap_or_else(|e| panic!("{} is not XML: {e}", path.display())) {
            elements += 1;
        }
    }
    elements
}

#[test]
fn quick_demo_writes_every_output_and_is_reproducible() {
    let dir = std::env::temp_dir().join(format!("demo-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = DemoConfig::quick();
    let report = run(&cfg, &RunOptions { out_dir: dir.clone(), progress: false, gpu: None }).expect("quick demo runs");

    // SFT, AdamW, every merge setting, every interpolation weight. The full demo
    // lists a sweep setting that diverges instead of stopping; the quick preset's
    // settings are all expected to run.
    assert!(report.failed.is_empty(), "failed runs: {:?}", report.failed);
    let expected = 2 + cfg.merges.len() + cfg.interpolation_weights.len();
    assert_eq!(report.rows.len(), expected);

    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).expect("results.json parses");
    let rows = json["rows"].as_array().expect("rows array");
    assert_eq!(rows.len(), expected);
    for r in rows {
        for k in ["pref_accuracy", "judge", "capability"] {
            let v = r[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {r}"));
            assert!((0.0..=1.0).contains(&v), "{k} = {v}");
        }
        assert!(r["perplexity"].as_f64().unwrap() >= 1.0);
    }
    assert_eq!(rows[0]["kind"], "sft");

    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), expected + 1);
    let cols = lines[0].split(',').count();
    for l in &lines[1..] {
        assert_eq!(l.split(',').count(), cols, "{l}");
    }
    assert!(std::fs::read_to_string(dir.join("results.txt")).unwrap().contains("adamw"));
    for svg in ["reward_vs_capability_tax.svg", "margin_vs_perplexity_tax.svg"] {
        assert!(parse_xml(&dir.join(svg)) > 10, "{svg} has too few elements");
    }
    for log in ["pretrain", "sft", "align-adamw"] {
        let text = std::fs::read_to_string(dir.join("logs").join(format!("{log}.jsonl"))).unwrap();
        for line in text.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{log}.jsonl: {e}: {line}"));
        }
    }

    // Same seed, same numbers (threads do not change results).
    let again = run(&DemoConfig { threads: 1, ..cfg }, &RunOptions { out_dir: dir.join("again"), progress: false, gpu: None }).unwrap();
    for (a, b) in report.rows.iter().zip(&again.rows) {
        assert_eq!((a.capability, a.judge, a.perplexity, a.reward_margin), (b.capability, b.judge, b.perplexity, b.reward_margin), "{}", a.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A few steps of every stage: enough to run each code path of the demo on a
/// GPU (training, the reference log-probs, generation, scoring) within seconds
/// on lavapipe, where the quick preset takes over a minute.
fn micro() -> DemoConfig {
    use host::demo::pipeline::Phase;
    DemoConfig {
        pretrain_lines: 200,
        pretrain: Phase { steps: 6, batch_size: 4, lr: 3e-3, warmup_steps: 1 },
        sft_examples: 40,
        sft: Phase { steps: 3, batch_size: 4, lr: 1e-3, warmup_steps: 1 },
        preference_pairs: 20,
        align: Phase { steps: 2, batch_size: 2, lr: 2e-5, warmup_steps: 1 },
        eval_pairs: 6,
        eval_problems: 4,
        eval_judge_prompts: 4,
        eval_text_lines: 6,
        ..DemoConfig::quick()
    }
}

#[test]
fn demo_on_the_gpu_runs_every_stage_agrees_with_the_cpu_and_repeats_its_bits() {
    let gpu = match gpu_shaders::GpuContext::new(&gpu_shaders::GpuOptions::default()) {
        Ok(c) => c,
        Err(e) => panic!("no GPU adapter for the GPU demo test ({e}); install mesa-vulkan-drivers libvulkan1 (software Vulkan)"),
    };
    let dir = std::env::temp_dir().join(format!("demo-gpu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = micro();
    let on = |sub: &str, gpu: Option<gpu_shaders::GpuContext>| {
        run(&cfg, &RunOptions { out_dir: dir.join(sub), progress: false, gpu }).unwrap_or_else(|e| panic!("the demo on {sub}: {e}"))
    };
    let first = on("gpu", Some(gpu.clone()));
    let again = on("gpu-again", Some(gpu.clone()));
    let cpu = on("cpu", None);
    assert!(first.failed.is_empty(), "failed runs: {:?}", first.failed);
    assert_eq!(first.rows.len(), 2 + cfg.merges.len() + cfg.interpolation_weights.len());

    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("gpu").join("results.json")).unwrap()).unwrap();
    let device = json["settings"]["device"].as_str().expect("results.json names the device");
    assert_eq!(device, gpu_shaders::context::describe(gpu.adapter_info()));

    for ((a, b), c) in first.rows.iter().zip(&again.rows).zip(&cpu.rows) {
        // one adapter: the same bits run to run
        assert_eq!(
            (a.pref_accuracy.to_bits(), a.reward_margin.to_bits(), a.judge.to_bits(), a.capability.to_bits(), a.perplexity.to_bits()),
            (b.pref_accuracy.to_bits(), b.reward_margin.to_bits(), b.judge.to_bits(), b.capability.to_bits(), b.perplexity.to_bits()),
            "{}: two GPU runs differ",
            a.name
        );
        // the CPU: the same model to rounding. Perplexity is a mean over every
        // held-out token after a dozen steps, each of which carries the kernels'
        // ~1e-6 relative differences forward; 1e-4 is far above that and far
        // below what a wrong stage (an untrained or unloaded model) changes.
        let rel = (a.perplexity - c.perplexity).abs() / c.perplexity;
        assert!(rel < 1e-4, "{}: perplexity {} on the GPU, {} on the CPU", a.name, a.perplexity, c.perplexity);
        // generation decides discretely, and agrees token for token unless two
        // logits fall within rounding of each other: the counts agree here
        assert_eq!((a.capability, a.judge), (c.capability, c.judge), "{}: generation differs from the CPU's", a.name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
