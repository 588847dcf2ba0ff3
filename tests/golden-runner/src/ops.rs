//! The dispatch from a case's `op` to merge-core. Each op names the SPEC.md
//! section it exercises; the NumPy oracle has the same table in `check_golden.py`.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use alloc::{format, vec};

use merge_core::dare::{DareConfig, DareVariant};
use merge_core::dtype::{self, Dst, Src};
use merge_core::hyper::{AdamConfig, AdamForm, Schedule};
use merge_core::onties;
use merge_core::optim::{Merge, OnlineConfig, Optimizer, Scope, StepJob, TaskVectorJob, TiesConfig};
use merge_core::step::StateMut;
use merge_core::offline::{self, Gta, ModelParams, Sparsify};
use merge_core::{arith, reduce, rng, topk};

use crate::{Array, Case, Outcome};

fn outputs<const N: usize>(items: [(&str, Array); N]) -> Outcome {
    Outcome::Outputs(items.into_iter().map(|(k, a)| (k.to_string(), a)).collect())
}

/// Evaluates one case with merge-core. `Err` means the case itself is malformed
/// (a bad golden file), not that merge-core rejected its inputs: that is
/// `Ok(Outcome::Error(..))`.
pub fn evaluate(case: &Case) -> Result<Outcome, String> {
    match case.op.as_str() {
        "arith" => arith_op(case),
        "threefry" => threefry_op(case),
        "mask" => mask_op(case),
        "tree_sum" => tree_sum_op(case),
        "topk" => topk_op(case),
        "optimizer" => optimizer_op(case),
        "store" => store_op(case),
        "load" => load_op(case),
        "offline" => offline_op(case),
        "ties_combine" => ties_combine_op(case),
        "ties_global" => ties_global_op(case),
        other => Err(format!("case {:?}: unknown op {other:?}", case.name)),
    }
}

/// SPEC.md §1.3-§1.5: one element-wise operation followed by the flush rule.
fn arith_op(case: &Case) -> Result<Outcome, String> {
    let a = case.f32s("a")?;
    let f = case.word("fn")?;
    let out: Vec<f32> = match f {
        "flush" => a.iter().map(|&x| arith::flush(x)).collect(),
        "sqrt" => a.iter().map(|&x| arith::sqrt(arith::flush(x))).collect(),
        "add" | "sub" | "mul" | "div" => {
            let b = case.f32s("b")?;
            if b.len() != a.len() {
                return Err(format!("case {:?}: inputs a and b differ in length", case.name));
            }
            let op: fn(f32, f32) -> f32 = match f {
                "add" => arith::add,
                "sub" => arith::sub,
                "mul" => arith::mul,
                _ => arith::div,
            };
            // Operands are loaded from storage, so F applies to them first (§1.3).
            a.iter().zip(b).map(|(&x, &y)| op(arith::flush(x), arith::flush(y))).collect()
        }
        other => return Err(format!("case {:?}: unknown arith fn {other:?}", case.name)),
    };
    Ok(outputs([("out", Array::F32(out))]))
}

fn u32s<'a>(case: &'a Case, key: &str) -> Result<&'a [u32], String> {
    match case.input(key)? {
        Array::U32(v) => Ok(v),
        _ => Err(format!("case {:?}: input {key:?} is not u32", case.name)),
    }
}

/// SPEC.md §2.2: raw Threefry-2x32-20 blocks, key `(k0, k1)` and counters `(c0[i], c1[i])`.
fn threefry_op(case: &Case) -> Result<Outcome, String> {
    let key = u32s(case, "key")?;
    let (c0, c1) = (u32s(case, "c0")?, u32s(case, "c1")?);
    if key.len() != 2 || c0.len() != c1.len() {
        return Err(format!("case {:?}: key must have 2 words and c0, c1 equal lengths", case.name));
    }
    let out: Vec<[u32; 2]> = c0.iter().zip(c1).map(|(&a, &b)| rng::threefry2x32_20([key[0], key[1]], [a, b])).collect();
    Ok(outputs([("x0", Array::U32(out.iter().map(|x| x[0]).collect())), ("x1", Array::U32(out.iter().map(|x| x[1]).collect()))]))
}

/// SPEC.md §2.1-§2.4: tensor identity, mask key, the draws `u` and keep decisions of
/// elements `offset .. offset + n` of stream `stream` at step `step`.
fn mask_op(case: &Case) -> Result<Outcome, String> {
    let name = case.tensor_name()?;
    let seed = case.seed.ok_or_else(|| format!("case {:?}: missing seed", case.name))?;
    let step = u32::try_from(case.step.ok_or_else(|| format!("case {:?}: missing step", case.name))?).map_err(|e| e.to_string())?;
    let stream = u32::try_from(case.int("stream")?).map_err(|e| e.to_string())?;
    let offset = case.int("offset")?;
    let n = case.int("n")? as usize;
    let keep = match rng::Keep::new(case.f32("p")?) {
        Ok(k) => k,
        Err(e) => return Ok(Outcome::Error(e)),
    };
    if let Err(e) = rng::check_extent(name, offset, n) {
        return Ok(Outcome::Error(e));
    }
    let t = rng::tensor_id(name);
    let key = rng::MaskKey::new(seed, t, step);
    let u: Vec<u32> = (0..n as u64).map(|i| key.uniform((offset + i) as u32, stream)).collect();
    let kept: Vec<bool> = u.iter().map(|&x| keep.keeps(x)).collect();
    Ok(outputs([
        ("tensor_id", Array::U32(vec![t])),
        ("key", Array::U32(key.0.to_vec())),
        ("u", Array::U32(u)),
        ("keep", Array::Bool(kept)),
    ]))
}

/// SPEC.md §3: the fixed-tree sum and the L1 norm of `x`.
fn tree_sum_op(case: &Case) -> Result<Outcome, String> {
    let x = case.f32s("x")?;
    Ok(outputs([("sum", Array::F32(vec![reduce::tree_sum(x)])), ("l1", Array::F32(vec![reduce::l1_norm(x)]))]))
}

/// SPEC.md §4: `k = ⌈p·n⌉`, the threshold `(T, c)` over every input concatenated in
/// bytewise name order (one input: per-tensor scope; several: global scope), and
/// each input's keep mask `keep.<name>`.
fn topk_op(case: &Case) -> Result<Outcome, String> {
    let mut tensors: Vec<(&str, &[f32])> = Vec::new();
    for name in case.inputs.keys() {
        tensors.push((name, case.f32s(name)?));
    }
    let n: u64 = tensors.iter().map(|(_, t)| t.len() as u64).sum();
    let k = match topk::keep_count("p", case.f32("p")?, n) {
        Ok(k) => k,
        Err(e) => return Ok(Outcome::Error(e)),
    };
    let slices: Vec<&[f32]> = tensors.iter().map(|(_, t)| *t).collect();
    let th = match topk::select(case.word("scope")?, &slices, k) {
        Ok(t) => t,
        Err(e) => return Ok(Outcome::Error(e)),
    };
    let cutoff = u32::try_from(th.cutoff).map_err(|_| format!("case {:?}: cutoff {} needs more than 32 bits", case.name, th.cutoff))?;
    let mut outs: Vec<(String, Array)> = vec![
        ("k".into(), Array::U32(vec![k as u32])),
        ("T".into(), Array::U32(vec![th.key])),
        ("c".into(), Array::U32(vec![cutoff])),
    ];
    let mut offset = 0u64;
    for (name, t) in &tensors {
        let keep = t.iter().enumerate().map(|(i, &x)| th.keeps(topk::magnitude_key(x), offset + i as u64)).collect();
        outs.push((format!("keep.{name}"), Array::Bool(keep)));
        offset += t.len() as u64;
    }
    Ok(Outcome::Outputs(outs.into_iter().collect()))
}

/// The optimizer configuration a case describes (SPEC.md §5).
fn online_config(case: &Case) -> Result<OnlineConfig, String> {
    let form = match case.word("form")? {
        "torch" => AdamForm::Torch,
        "hf" => AdamForm::HuggingFace,
        other => return Err(format!("case {:?}: unknown AdamW form {other:?}", case.name)),
    };
    let schedule = match case.word("schedule")? {
        "constant" => Schedule::Constant,
        "warmup_cosine" => Schedule::WarmupCosine { warmup: case.int("warmup")?, total: case.int("total")? },
        other => return Err(format!("case {:?}: unknown schedule {other:?}", case.name)),
    };
    let adam = AdamConfig {
        form,
        lr: case.f64("lr")?,
        beta1: case.f64("beta1")?,
        beta2: case.f64("beta2")?,
        eps: case.f64("eps")?,
        weight_decay: case.f64("weight_decay")?,
        schedule,
    };
    let merge = match case.word("merge")? {
        "none" => Merge::None,
        "dare" => Merge::Dare(DareConfig {
            variant: match case.word("variant")? {
                "reference" => DareVariant::Reference,
                "paper" => DareVariant::Paper,
                other => return Err(format!("case {:?}: unknown OnDARE variant {other:?}", case.name)),
            },
            p: case.f64("p")?,
            alpha: case.f64("alpha")?,
            rescale: case.flag("rescale")?,
            clip: case.f64("clip")?,
        }),
        "ties" => Merge::Ties(TiesConfig {
            variant: match case.word("variant")? {
                "reference" => onties::Variant::Reference,
                "paper" => onties::Variant::Paper,
                other => return Err(format!("case {:?}: unknown OnTIES variant {other:?}", case.name)),
            },
            p: case.f64("p")?,
            alpha: case.f64("alpha")?,
            rescale: case.flag("rescale")?,
            scope: match case.word("scope")? {
                "tensor" => Scope::PerTensor,
                "global" => Scope::Global,
                other => return Err(format!("case {:?}: unknown scope {other:?}", case.name)),
            },
        }),
        other => return Err(format!("case {:?}: unknown merge {other:?}", case.name)),
    };
    let k = u32::try_from(case.int("k")?).map_err(|e| format!("case {:?}: k: {e}", case.name))?;
    Ok(OnlineConfig { adam, merge, k, seed: case.seed.ok_or_else(|| format!("case {:?}: missing seed", case.name))? })
}

fn src<'a>(case: &Case, a: &'a Array, what: &str) -> Result<Src<'a>, String> {
    match a {
        Array::F32(v) => Ok(Src::F32(v)),
        Array::Bf16(v) => Ok(Src::Bf16(v)),
        Array::F16(v) => Ok(Src::F16(v)),
        _ => Err(format!("case {:?}: {what} must be f32, bf16 or f16", case.name)),
    }
}

/// One tensor of an optimizer case: inputs are `theta`, `m`, `v`, `base`, `sft`,
/// `grad.1` .. `grad.S` for a single-tensor case, prefixed `t<j>/` when the case
/// lists several tensors in its `tensors` param (global OnTIES scope).
struct TensorRun {
    name: String,
    prefix: String,
    theta: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    cached: Option<Vec<f32>>,
    tau32: Vec<f32>,
    tau16: Vec<u16>,
    scratch: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

fn tau_src<'a>(dtype: &str, t32: &'a [f32], t16: &'a [u16]) -> Src<'a> {
    match dtype {
        "f32" => Src::F32(t32),
        "bf16" => Src::Bf16(t16),
        _ => Src::F16(t16),
    }
}

/// SPEC.md §5: a short run. The task vectors `τ'` are computed once from `base` and
/// `sft` and stored as `tau_dtype`; then steps 1..=S apply the gradients to `theta`,
/// `m`, `v` (and `Δ_c` for step-K). Outputs: each tensor's final state and `τ'`,
/// and every step's binary32 scalars (`scalar.<name>`, one value per step) that
/// SPEC.md §5.1 defines for the form.
fn optimizer_op(case: &Case) -> Result<Outcome, String> {
    let config = online_config(case)?;
    let names: Vec<(String, String)> = match case.params.get("tensors") {
        None => vec![(case.tensor_name()?.to_string(), String::new())],
        Some(list) => list
            .as_array()
            .ok_or_else(|| format!("case {:?}: \"tensors\" is not a list", case.name))?
            .iter()
            .enumerate()
            .map(|(j, v)| v.as_str().map(|s| (s.to_string(), format!("t{j}/"))).ok_or_else(|| format!("case {:?}: tensor names must be strings", case.name)))
            .collect::<Result<_, _>>()?,
    };
    let mut opt = match Optimizer::new(config) {
        Ok(o) => o,
        Err(e) => return Ok(Outcome::Error(e)),
    };
    let tau_dtype = case.word("tau_dtype")?;
    if !matches!(tau_dtype, "f32" | "bf16" | "f16") {
        return Err(format!("case {:?}: unknown tau_dtype {tau_dtype:?}", case.name));
    }
    let mut runs = Vec::new();
    for (name, prefix) in names {
        let theta = case.f32s(&format!("{prefix}theta"))?.to_vec();
        let n = theta.len();
        let mut grads = Vec::new();
        while let Some(g) = case.inputs.get(&format!("{prefix}grad.{}", grads.len() + 1)) {
            match g {
                Array::F32(g) => grads.push(g.clone()),
                _ => return Err(format!("case {:?}: gradients must be f32", case.name)),
            }
        }
        runs.push(TensorRun {
            m: case.f32s(&format!("{prefix}m"))?.to_vec(),
            v: case.f32s(&format!("{prefix}v"))?.to_vec(),
            cached: opt.needs_cached_delta().then(|| vec![0f32; n]),
            tau32: vec![0f32; n],
            tau16: vec![0u16; n],
            scratch: vec![0f32; n],
            theta,
            grads,
            name,
            prefix,
        });
    }
    let has_tau = !matches!(config.merge, Merge::None);
    if has_tau {
        let mut jobs = Vec::new();
        for r in runs.iter_mut() {
            let out = match tau_dtype {
                "f32" => Dst::F32(&mut r.tau32),
                "bf16" => Dst::Bf16(&mut r.tau16),
                _ => Dst::F16(&mut r.tau16),
            };
            jobs.push(TaskVectorJob {
                name: &r.name,
                base: src(case, case.input(&format!("{}base", r.prefix))?, "base")?,
                sft: src(case, case.input(&format!("{}sft", r.prefix))?, "sft")?,
                out,
                scratch: &mut r.scratch,
            });
        }
        if let Err(e) = opt.init_task_vectors(&mut jobs) {
            return Ok(Outcome::Error(e));
        }
    }
    let steps = runs.iter().map(|r| r.grads.len()).max().unwrap_or(0);
    let form_scalars: &[&str] = match config.adam.form {
        AdamForm::Torch => &["bc2_sqrt", "decay_before"],
        AdamForm::HuggingFace => &["decay_after"],
    };
    let mut scalars: Vec<(&str, Vec<f32>)> =
        ["lr", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "neg_step_size"].iter().chain(form_scalars).map(|&s| (s, Vec::new())).collect();
    for step in 0..steps {
        let plan = match opt.begin_step() {
            Ok(p) => p,
            Err(e) => return Ok(Outcome::Error(e)),
        };
        let sc = plan.scalars();
        for (key, vals) in scalars.iter_mut() {
            vals.push(match *key {
                "lr" => sc.lr,
                "one_minus_beta1" => sc.one_minus_beta1,
                "one_minus_beta2" => sc.one_minus_beta2,
                "beta1" => sc.beta1,
                "beta2" => sc.beta2,
                "eps" => sc.eps,
                "neg_step_size" => sc.neg_step_size,
                "bc2_sqrt" => sc.bc2_sqrt,
                "decay_before" => sc.decay_before,
                _ => sc.decay_after,
            });
        }
        let mut jobs: Vec<StepJob> = runs
            .iter_mut()
            .map(|r| StepJob {
                name: &r.name,
                grad: &r.grads[step],
                state: StateMut { theta: &mut r.theta, m: &mut r.m, v: &mut r.v, cached: r.cached.as_deref_mut() },
                tau: tau_src(tau_dtype, &r.tau32, &r.tau16),
                scratch: &mut r.scratch,
            })
            .collect();
        if let Err(e) = plan.step_tensors(&mut jobs) {
            return Ok(Outcome::Error(e));
        }
    }
    let mut outs: Vec<(String, Array)> = Vec::new();
    for r in runs {
        let p = &r.prefix;
        if has_tau {
            let tau = match tau_dtype {
                "f32" => Array::F32(r.tau32),
                "bf16" => Array::Bf16(r.tau16),
                _ => Array::F16(r.tau16),
            };
            outs.push((format!("{p}tau"), tau));
        }
        outs.push((format!("{p}theta"), Array::F32(r.theta)));
        outs.push((format!("{p}m"), Array::F32(r.m)));
        outs.push((format!("{p}v"), Array::F32(r.v)));
        if let Some(c) = r.cached {
            outs.push((format!("{p}cached"), Array::F32(c)));
        }
    }
    outs.extend(scalars.into_iter().map(|(k, v)| (format!("scalar.{k}"), Array::F32(v))));
    Ok(Outcome::Outputs(outs.into_iter().collect()))
}

/// SPEC.md §7: binary32 values stored as `dtype` (round to nearest even); the first
/// value that cannot be stored fails the whole tensor.
fn store_op(case: &Case) -> Result<Outcome, String> {
    let name = case.tensor_name()?;
    let x = case.f32s("x")?;
    let (mut out32, mut out16) = (vec![0f32; x.len()], vec![0u16; x.len()]);
    let dt = case.word("dtype")?;
    let (mut dst, dtype) = match dt {
        "f32" => (Dst::F32(&mut out32), dtype::Dtype::F32),
        "bf16" => (Dst::Bf16(&mut out16), dtype::Dtype::Bf16),
        "f16" => (Dst::F16(&mut out16), dtype::Dtype::F16),
        other => return Err(format!("case {:?}: unknown dtype {other:?}", case.name)),
    };
    for (i, &v) in x.iter().enumerate() {
        if let Err(e) = dst.store(i, v) {
            return Ok(Outcome::Error(dtype::store_error(name, "value", i as u64, e, dtype)));
        }
    }
    Ok(outputs([(
        "stored",
        match dt {
            "f32" => Array::F32(out32),
            "bf16" => Array::Bf16(out16),
            _ => Array::F16(out16),
        },
    )]))
}

/// SPEC.md §7: stored values loaded into binary32 (exact), then flushed (§1.3).
fn load_op(case: &Case) -> Result<Outcome, String> {
    let h = case.input("h")?;
    let s = src(case, h, "h")?;
    let mut out = vec![0f32; s.len()];
    s.load_into(0, &mut out);
    Ok(outputs([("x", Array::F32(out))]))
}

/// A list of binary64 hyperparameters (`{"f64": hex}` each).
fn f64_list(case: &Case, key: &str) -> Result<Vec<f64>, String> {
    let list = case.params.get(key).and_then(serde_json::Value::as_array).ok_or_else(|| format!("case {:?}: missing list param {key:?}", case.name))?;
    list.iter()
        .map(|v| {
            let hex = v.get("f64").and_then(serde_json::Value::as_str).ok_or_else(|| format!("case {:?}: {key:?} holds a non-f64", case.name))?;
            u64::from_str_radix(hex, 16).map(f64::from_bits).map_err(|e| format!("case {:?}: {key:?}: {e}", case.name))
        })
        .collect()
}

/// SPEC.md §6: one tensor merged offline. Models are the inputs `model.0`, `model.1`,
/// ...; `method` is linear, interpolate (SFT = model.0, RLHF = model.1), slerp
/// (a = model.0, b = model.1) or gta (base = `base`, per-tensor trimming).
fn offline_op(case: &Case) -> Result<Outcome, String> {
    let name = case.tensor_name()?;
    let mut models = Vec::new();
    while let Some(a) = case.inputs.get(&format!("model.{}", models.len())) {
        models.push(src(case, a, "model")?);
    }
    let n = models.first().map(|m| m.len()).ok_or_else(|| format!("case {:?}: no model.0", case.name))?;
    let out_dtype = case.word("out_dtype")?;
    let (mut out32, mut out16) = (vec![0f32; n], vec![0u16; n]);
    let mut dst = match out_dtype {
        "f32" => Dst::F32(&mut out32),
        "bf16" => Dst::Bf16(&mut out16),
        "f16" => Dst::F16(&mut out16),
        other => return Err(format!("case {:?}: unknown out_dtype {other:?}", case.name)),
    };
    let mut extra: Vec<(String, Array)> = Vec::new();
    let result = match case.word("method")? {
        "linear" => offline::linear(name, 0, &models, &f64_list(case, "weights")?, case.flag("normalize")?, &mut dst),
        "interpolate" => offline::interpolate(name, 0, models[0], models[1], case.f64("weight")?, &mut dst),
        "slerp" => offline::slerp(name, models[0], models[1], case.f64("t")?, &mut dst).map(|s| {
            extra.push(("s0".into(), Array::F32(vec![s.s0])));
            extra.push(("s1".into(), Array::F32(vec![s.s1])));
            extra.push(("lerp".into(), Array::Bool(vec![s.lerp])));
        }),
        "gta" => {
            let config = Gta {
                sparsify: match case.word("sparsify")? {
                    "none" => Sparsify::None,
                    "magnitude" => Sparsify::Magnitude,
                    "random" => Sparsify::Random,
                    other => return Err(format!("case {:?}: unknown sparsify {other:?}", case.name)),
                },
                consensus: case.flag("consensus")?,
                normalize: case.flag("normalize")?,
                lambda: case.f64("lambda")?,
            };
            let base = src(case, case.input("base")?, "base")?;
            let weights = f64_list(case, "weights")?;
            let densities = f64_list(case, "densities")?;
            let params: Vec<ModelParams> = weights.iter().zip(&densities).map(|(&weight, &density)| ModelParams { weight, density }).collect();
            let seed = case.seed.ok_or_else(|| format!("case {:?}: missing seed", case.name))?;
            let mut thresholds = Vec::new();
            let mut failed = None;
            if config.sparsify == Sparsify::Magnitude {
                for (m, p) in models.iter().zip(&params) {
                    match offline::task_vector_threshold(name, p.density, &[base], &[*m]) {
                        Ok(t) => thresholds.push(t),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            match failed {
                Some(e) => Err(e),
                None => offline::GtaPlan::new(&config, name, seed, &params, &thresholds, 0).and_then(|plan| plan.apply(name, 0, base, &models, &mut dst)),
            }
        }
        other => return Err(format!("case {:?}: unknown method {other:?}", case.name)),
    };
    if let Err(e) = result {
        return Ok(Outcome::Error(e));
    }
    let merged = match out_dtype {
        "f32" => Array::F32(out32),
        "bf16" => Array::Bf16(out16),
        _ => Array::F16(out16),
    };
    Ok(Outcome::Outputs(core::iter::once(("merged".to_string(), merged)).chain(extra).collect()))
}

/// SPEC.md §5.3 `combine`: the per-element OnTIES update from trimmed `τ'` and `D'`,
/// with `α₃₂` and `ω` given as binary32 (crafted edge cases the runs rarely meet).
fn ties_combine_op(case: &Case) -> Result<Outcome, String> {
    let (tau, d) = (case.f32s("tau")?, case.f32s("d")?);
    if tau.len() != d.len() {
        return Err(format!("case {:?}: tau and d differ in length", case.name));
    }
    let variant = match case.word("variant")? {
        "reference" => onties::Variant::Reference,
        "paper" => onties::Variant::Paper,
        other => return Err(format!("case {:?}: unknown variant {other:?}", case.name)),
    };
    let (alpha, omega) = (case.f32("alpha")?, case.f32("omega")?);
    let u = tau.iter().zip(d).map(|(&t, &x)| onties::combine(variant, t, x, alpha, omega)).collect();
    Ok(outputs([("u", Array::F32(u))]))
}

/// SPEC.md §6.2 with global trimming: TIES over the tensors listed in `tensors`
/// (bytewise ascending), each model trimmed with one threshold over all of its
/// tensors concatenated. Inputs `t<j>/base`, `t<j>/model.<i>`; outputs `t<j>/merged`.
fn ties_global_op(case: &Case) -> Result<Outcome, String> {
    let names: Vec<&str> = case
        .params
        .get("tensors")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| format!("case {:?}: missing \"tensors\"", case.name))?
        .iter()
        .map(|v| v.as_str().ok_or_else(|| format!("case {:?}: tensor names must be strings", case.name)))
        .collect::<Result<_, _>>()?;
    let weights = f64_list(case, "weights")?;
    let densities = f64_list(case, "densities")?;
    let params: Vec<ModelParams> = weights.iter().zip(&densities).map(|(&weight, &density)| ModelParams { weight, density }).collect();
    let config = Gta { lambda: case.f64("lambda")?, ..Gta::TIES };
    let mut bases = Vec::new();
    let mut models: Vec<Vec<Src>> = vec![Vec::new(); params.len()];
    for j in 0..names.len() {
        bases.push(src(case, case.input(&format!("t{j}/base"))?, "base")?);
        for (i, list) in models.iter_mut().enumerate() {
            list.push(src(case, case.input(&format!("t{j}/model.{i}"))?, "model")?);
        }
    }
    let mut thresholds = Vec::new();
    for (p, list) in params.iter().zip(&models) {
        match offline::task_vector_threshold("global", p.density, &bases, list) {
            Ok(t) => thresholds.push(t),
            Err(e) => return Ok(Outcome::Error(e)),
        }
    }
    let mut outs = Vec::new();
    let mut start = 0u64;
    for (j, name) in names.iter().enumerate() {
        let n = bases[j].len();
        let mut out = vec![0f32; n];
        let tensor_models: Vec<Src> = models.iter().map(|list| list[j]).collect();
        let plan = match offline::GtaPlan::new(&config, name, case.seed.unwrap_or(0), &params, &thresholds, start) {
            Ok(p) => p,
            Err(e) => return Ok(Outcome::Error(e)),
        };
        if let Err(e) = plan.apply(name, 0, bases[j], &tensor_models, &mut Dst::F32(&mut out)) {
            return Ok(Outcome::Error(e));
        }
        outs.push((format!("t{j}/merged"), Array::F32(out)));
        start += n as u64;
    }
    Ok(Outcome::Outputs(outs.into_iter().collect()))
}
