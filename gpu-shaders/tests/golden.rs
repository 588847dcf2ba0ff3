//! The optimizer golden vectors of tests/golden/ (written by merge-core, checked
//! by the NumPy oracle) reproduced by the GPU: every case of op "optimizer",
//! outputs bit for bit, rejected inputs with the same error.

mod common;

use std::collections::BTreeMap;

use common::ctx;
use golden_runner::{evaluate, Array, Case, Outcome};
use gpu_shaders::optim::{GpuOptimizer, TensorInit, TensorStateData};
use gpu_shaders::GpuError;
use merge_core::dare::{DareConfig, DareVariant};
use merge_core::dtype::{Dtype, Src};
use merge_core::hyper::{AdamConfig, AdamForm, Schedule};
use merge_core::onties;
use merge_core::optim::{Merge, OnlineConfig, Scope, TiesConfig};

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
    let inits: Vec<TensorInit> = names
        .iter()
        .map(|(name, p)| TensorInit {
            name,
            theta: case.f32s(&format!("{p}theta")).unwrap(),
            task: merging.then(|| (src(case.input(&format!("{p}base")).unwrap()), src(case.input(&format!("{p}sft")).unwrap()))),
            tau_dtype,
        })
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
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden/optimizer.json");
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
