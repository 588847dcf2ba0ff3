//! The golden vectors of tests/golden/ (written by merge-core, checked by the
//! NumPy oracle) reproduced by the GPU: every optimizer case and every offline
//! merge but SLERP, outputs bit for bit, rejected inputs with the same error.

// `GpuError` wraps merge-core's `Error`, which names its tensor inline.
#![allow(clippy::result_large_err)]

mod common;

use std::collections::BTreeMap;

use common::ctx;
use golden_runner::{compare, evaluate, Array, Case, Outcome};
use gpu_shaders::offline::GpuMerger;
use gpu_shaders::optim::{GpuOptimizer, StoredTau, TaskInput, TensorInit, TensorStateData, Weights, task_vectors};
use gpu_shaders::GpuError;
use merge_core::dare::{DareConfig, DareVariant};
use merge_core::dtype::{Dst, Dtype, Src};
use merge_core::offline::{Gta, ModelParams, Sparsify};
use merge_core::hyper::{AdamConfig, AdamForm, Schedule};
use merge_core::onties;
use merge_core::optim::{Merge, OnlineConfig, Scope, TiesConfig};

/// `tests/golden`, or `GOLDEN_DIR` (a test binary run away from its checkout).
fn golden_dir() -> std::path::PathBuf {
    match std::env::var_os("GOLDEN_DIR") {
        Some(d) => d.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden"),
    }
}

/// The case's configuration, read as golden-runner's `online_config` reads it.
fn config(case: &Case) -> OnlineConfig {
    let form = match case.word("form").unwrap() {
        "torch" => AdamForm::Torch,
        _ => AdamForm::HuggingFace,
    };
    let schedule = match case.word("schedule").unwrap() {
        "warmup_cosine" => Schedule::WarmupCosine { warmup: case.int("warmup").unwrap(), total: case.int("total").unwrap() },
        _ => Schedule::Constant,
    };
    let adam = AdamConfig {
        form,
        lr: case.f64("lr").unwrap(),
        beta1: case.f64("beta1").unwrap(),
        beta2: case.f64("beta2").unwrap(),
        eps: case.f64("eps").unwrap(),
        weight_decay: case.f64("weight_decay").unwrap(),
        schedule,
    };
    let reference = || case.word("variant").unwrap() == "reference";
    let merge = match case.word("merge").unwrap() {
        "dare" => Merge::Dare(DareConfig {
            variant: if reference() { DareVariant::Reference } else { DareVariant::Paper },
            p: case.f64("p").unwrap(),
            alpha: case.f64("alpha").unwrap(),
            rescale: case.flag("rescale").unwrap(),
            clip: case.f64("clip").unwrap(),
        }),
        "ties" => Merge::Ties(TiesConfig {
            variant: if reference() { onties::Variant::Reference } else { onties::Variant::Paper },
            p: case.f64("p").unwrap(),
            alpha: case.f64("alpha").unwrap(),
            rescale: case.flag("rescale").unwrap(),
            scope: if case.word("scope").unwrap() == "global" { Scope::Global } else { Scope::PerTensor },
        }),
        _ => Merge::None,
    };
    OnlineConfig { adam, merge, k: case.int("k").unwrap() as u32, seed: case.seed.unwrap() }
}

fn src(a: &Array) -> Src<'_> {
    match a {
        Array::F32(v) => Src::F32(v),
        Array::Bf16(v) => Src::Bf16(v),
        Array::F16(v) => Src::F16(v),
        other => panic!("weights must be f32/bf16/f16, got {other:?}"),
    }
}

/// Runs the case on the GPU: outputs by name (as golden-runner names them), or the error.
fn gpu_run(ctx: &gpu_shaders::GpuContext, case: &Case) -> Result<BTreeMap<String, Vec<f32>>, GpuError> {
    let config = config(case);
    let names: Vec<(String, String)> = match case.params.get("tensors") {
        None => vec![(case.tensor_name().unwrap().to_string(), String::new())],
        Some(list) => list.as_array().unwrap().iter().enumerate().map(|(j, v)| (v.as_str().unwrap().to_string(), format!("t{j}/"))).collect(),
    };
    let tau_dtype = match case.word("tau_dtype").unwrap() {
        "bf16" => Dtype::Bf16,
        "f16" => Dtype::F16,
        _ => Dtype::F32,
    };
    let merging = !matches!(config.merge, Merge::None);
    let taus: Vec<Option<StoredTau>> = if merging {
        let inputs: Vec<TaskInput> = names
            .iter()
            .map(|(name, p)| TaskInput {
                name,
                base: src(case.input(&format!("{p}base")).unwrap()),
                sft: src(case.input(&format!("{p}sft")).unwrap()),
                dtype: tau_dtype,
            })
            .collect();
        task_vectors(config, &inputs)?.into_iter().map(Some).collect()
    } else {
        names.iter().map(|_| None).collect()
    };
    let inits: Vec<TensorInit> = names
        .iter()
        .zip(&taus)
        .map(|((name, p), tau)| TensorInit { name, theta: Weights::Host(case.f32s(&format!("{p}theta")).unwrap()), tau: tau.as_ref().map(StoredTau::src) })
        .collect();
    let mut gpu = GpuOptimizer::new(ctx.clone(), config, &inits)?;
    // The case starts from given moments (and a zero Δ_c).
    let params: Vec<(&str, &[f32])> = names.iter().map(|(n, p)| (n.as_str(), case.f32s(&format!("{p}theta")).unwrap())).collect();
    let state: Vec<TensorStateData> = names
        .iter()
        .map(|(n, p)| TensorStateData {
            name: n.clone(),
            m: case.f32s(&format!("{p}m")).unwrap().to_vec(),
            v: case.f32s(&format!("{p}v")).unwrap().to_vec(),
            cached: (config.k > 1).then(|| vec![0.0; case.f32s(&format!("{p}theta")).unwrap().len()]),
        })
        .collect();
    gpu.load_state(0, &params, &state)?;
    for step in 1.. {
        let grads: Vec<(&str, &[f32])> = names
            .iter()
            .filter_map(|(n, p)| match case.inputs.get(&format!("{p}grad.{step}")) {
                Some(Array::F32(g)) => Some((n.as_str(), g.as_slice())),
                _ => None,
            })
            .collect();
        if grads.is_empty() {
            break;
        }
        gpu.step(&grads)?;
    }
    let mut out = BTreeMap::new();
    let prefix: BTreeMap<&str, &str> = names.iter().map(|(n, p)| (n.as_str(), p.as_str())).collect();
    for (name, theta) in gpu.read_params()? {
        out.insert(format!("{}theta", prefix[name.as_str()]), theta);
    }
    for st in gpu.read_state()? {
        let p = prefix[st.name.as_str()];
        out.insert(format!("{p}m"), st.m);
        out.insert(format!("{p}v"), st.v);
        if let Some(c) = st.cached {
            out.insert(format!("{p}cached"), c);
        }
    }
    Ok(out)
}

#[test]
fn optimizer_golden_vectors_on_the_gpu() {
    let ctx = ctx();
    let path = golden_dir().join("optimizer.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    let mut failures = Vec::new();
    for c in file["cases"].as_array().unwrap() {
        let case = Case::from_json(c).unwrap();
        if case.op != "optimizer" {
            continue;
        }
        checked += 1;
        let cpu = evaluate(&case).unwrap();
        // The GPU is compared with merge-core's recomputation (below), and that with
        // the stored bits, so a stored bit flipped or a regenerated file fails here too.
        if let Err(d) = compare(&c["expected"], &cpu) {
            failures.push(format!("{}: merge-core differs from the stored bits: {}", case.name, d.trim_end()));
        }
        match (cpu, gpu_run(&ctx, &case)) {
            (Outcome::Outputs(want), Ok(got)) => {
                for (key, arr) in &want {
                    let Array::F32(w) = arr else { continue };
                    if key.starts_with("scalar.") || key.ends_with("tau") {
                        continue;
                    }
                    match got.get(key) {
                        Some(g) if g.iter().map(|x| x.to_bits()).eq(w.iter().map(|x| x.to_bits())) => {}
                        Some(g) => {
                            let i = (0..w.len()).find(|&i| g[i].to_bits() != w[i].to_bits()).unwrap_or(0);
                            failures.push(format!("{}: {key}[{i}] gpu {:e} cpu {:e}", case.name, g[i], w[i]));
                        }
                        None => failures.push(format!("{}: GPU has no output {key}", case.name)),
                    }
                }
            }
            (Outcome::Error(e), Err(g)) => {
                if GpuError::Core(e.clone()).to_string() != g.to_string() {
                    failures.push(format!("{}: error differs: cpu `{e}`, gpu `{g}`", case.name));
                }
            }
            (Outcome::Error(e), Ok(_)) => failures.push(format!("{}: cpu refused (`{e}`), gpu did not", case.name)),
            (Outcome::Outputs(_), Err(g)) => failures.push(format!("{}: gpu refused: {g}", case.name)),
        }
    }
    assert!(checked >= 30, "only {checked} optimizer cases found in {}", path.display());
    assert!(failures.is_empty(), "{} of {checked} golden cases differ on the GPU:\n{}", failures.len(), failures.join("\n"));
}

fn f64_list(case: &Case, key: &str) -> Vec<f64> {
    case.params[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| f64::from_bits(u64::from_str_radix(v["f64"].as_str().unwrap(), 16).unwrap()))
        .collect()
}

/// One offline case on the GPU: the merged tensor(s) as golden-runner names them.
fn gpu_offline(m: &GpuMerger, case: &Case) -> Result<BTreeMap<String, Array>, GpuError> {
    let mut out = BTreeMap::new();
    if case.op == "ties_global" {
        let names: Vec<&str> = case.params["tensors"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let weights = f64_list(case, "weights");
        let densities = f64_list(case, "densities");
        let params: Vec<ModelParams> = weights.iter().zip(&densities).map(|(&weight, &density)| ModelParams { weight, density }).collect();
        let config = Gta { lambda: case.f64("lambda").unwrap(), ..Gta::TIES };
        let bases: Vec<Src> = (0..names.len()).map(|j| src(case.input(&format!("t{j}/base")).unwrap())).collect();
        let models: Vec<Vec<Src>> = (0..params.len())
            .map(|i| (0..names.len()).map(|j| src(case.input(&format!("t{j}/model.{i}")).unwrap())).collect())
            .collect();
        let mut thresholds = Vec::new();
        for (p, list) in params.iter().zip(&models) {
            thresholds.push(m.task_vector_threshold("global", p.density, &bases, list)?);
        }
        let mut start = 0u64;
        for (j, name) in names.iter().enumerate() {
            let mut merged = vec![0f32; bases[j].len()];
            let tm: Vec<Src> = models.iter().map(|l| l[j]).collect();
            m.gta(&config, name, case.seed.unwrap_or(0), &params, &thresholds, start, bases[j], &tm, &mut Dst::F32(&mut merged))?;
            out.insert(format!("t{j}/merged"), Array::F32(merged));
            start += bases[j].len() as u64;
        }
        return Ok(out);
    }
    let name = case.tensor_name().unwrap();
    let mut models = Vec::new();
    while let Some(a) = case.inputs.get(&format!("model.{}", models.len())) {
        models.push(src(a));
    }
    let n = models[0].len();
    let (mut o32, mut o16) = (vec![0f32; n], vec![0u16; n]);
    let dt = case.word("out_dtype").unwrap();
    let mut dst = match dt {
        "bf16" => Dst::Bf16(&mut o16),
        "f16" => Dst::F16(&mut o16),
        _ => Dst::F32(&mut o32),
    };
    match case.word("method").unwrap() {
        "linear" => m.linear(name, &models, &f64_list(case, "weights"), case.flag("normalize").unwrap(), &mut dst)?,
        "interpolate" => m.interpolate(name, models[0], models[1], case.f64("weight").unwrap(), &mut dst)?,
        _ => {
            let config = Gta {
                sparsify: match case.word("sparsify").unwrap() {
                    "magnitude" => Sparsify::Magnitude,
                    "random" => Sparsify::Random,
                    _ => Sparsify::None,
                },
                consensus: case.flag("consensus").unwrap(),
                normalize: case.flag("normalize").unwrap(),
                lambda: case.f64("lambda").unwrap(),
            };
            let base = src(case.input("base").unwrap());
            let params: Vec<ModelParams> = f64_list(case, "weights")
                .into_iter()
                .zip(f64_list(case, "densities"))
                .map(|(weight, density)| ModelParams { weight, density })
                .collect();
            let mut thresholds = Vec::new();
            if config.sparsify == Sparsify::Magnitude {
                for (mm, p) in models.iter().zip(&params) {
                    thresholds.push(m.task_vector_threshold(name, p.density, &[base], &[*mm])?);
                }
            }
            m.gta(&config, name, case.seed.unwrap(), &params, &thresholds, 0, base, &models, &mut dst)?;
        }
    }
    out.insert(
        "merged".into(),
        match dt {
            "bf16" => Array::Bf16(o16),
            "f16" => Array::F16(o16),
            _ => Array::F32(o32),
        },
    );
    Ok(out)
}

#[test]
fn offline_golden_vectors_on_the_gpu() {
    let merger = GpuMerger::new(ctx());
    let path = golden_dir().join("offline.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (mut checked, mut slerp) = (0, 0);
    let mut failures = Vec::new();
    for c in file["cases"].as_array().unwrap() {
        let case = Case::from_json(c).unwrap();
        if case.op == "offline" && case.word("method").unwrap() == "slerp" {
            // SLERP stays on the CPU (its norms and angle are whole-tensor scalars).
            slerp += 1;
            continue;
        }
        if case.op != "offline" && case.op != "ties_global" {
            continue;
        }
        checked += 1;
        let cpu = evaluate(&case).unwrap();
        if let Err(d) = compare(&c["expected"], &cpu) {
            failures.push(format!("{}: merge-core differs from the stored bits: {}", case.name, d.trim_end()));
        }
        match (cpu, gpu_offline(&merger, &case)) {
            (Outcome::Outputs(want), Ok(got)) => {
                for (key, w) in &want {
                    if got.get(key) != Some(w) {
                        failures.push(format!("{}: {key} differs", case.name));
                    }
                }
            }
            (Outcome::Error(e), Err(g)) => {
                if GpuError::Core(e.clone()).to_string() != g.to_string() {
                    failures.push(format!("{}: error differs: cpu `{e}`, gpu `{g}`", case.name));
                }
            }
            (Outcome::Error(e), Ok(_)) => failures.push(format!("{}: cpu refused (`{e}`), gpu did not", case.name)),
            (Outcome::Outputs(_), Err(g)) => failures.push(format!("{}: gpu refused: {g}", case.name)),
        }
    }
    assert!(checked >= 15 && slerp > 0, "{checked} offline cases checked, {slerp} SLERP cases skipped");
    assert!(failures.is_empty(), "{} of {checked} offline golden cases differ on the GPU:\n{}", failures.len(), failures.join("\n"));
}
