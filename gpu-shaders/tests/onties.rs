//! GPU OnTIES against a direct composition of merge-core's parts (adam, topk,
//! onties, reduce), bit for bit: both variants, per-tensor and global trimming,
//! the L1 rescale, step-K, 16-bit task vectors, heavy ties in the update.

mod common;

use common::{ctx_with, Rng};
use gpu_shaders::optim::{GpuOptimizer, TensorInit, TiesConfig};
use gpu_shaders::GpuOptions;
use merge_core::adam;
use merge_core::arith::{add, flush, sub};
use merge_core::dtype::{bf16_to_f32, f32_to_bf16, Dtype, Src};
use merge_core::hyper::{AdamConfig, AdamForm};
use merge_core::onties::{self, Variant};
use merge_core::optim::{Merge, OnlineConfig};
use merge_core::reduce::l1_norm;
use merge_core::topk::{keep_count, select, Threshold};

struct T {
    name: String,
    theta: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    c: Vec<f32>,
    tau: Vec<f32>,
}

/// The CPU side: SPEC §5.3 from merge-core's element functions.
fn cpu_step(ts: &mut [T], grads: &[Vec<f32>], adam_cfg: &AdamConfig, k: u64, kk: u64, tc: &TiesConfig) {
    let s = adam_cfg.scalars(k).unwrap();
    let torch = adam_cfg.form == AdamForm::Torch;
    let merge = k % kk == 0;
    let alpha = flush(tc.alpha as f32);
    let omega = sub(1.0, alpha);
    // D for every element.
    let mut ds: Vec<Vec<f32>> = Vec::new();
    let mut news = Vec::new();
    for (t, g) in ts.iter().zip(grads) {
        let mut d = Vec::new();
        let mut nw = Vec::new();
        for i in 0..g.len() {
            let theta = if torch { adam::decay_before::<true>(&s, flush(t.theta[i])) } else { flush(t.theta[i]) };
            let (m1, v1) = adam::moments(&s, flush(g[i]), flush(t.m[i]), flush(t.v[i]));
            let delta = if torch { adam::delta::<true>(&s, m1, v1) } else { adam::delta::<false>(&s, m1, v1) };
            d.push(if merge { add(delta, t.c[i]) } else { delta });
            nw.push((theta, m1, v1, delta));
        }
        ds.push(d);
        news.push(nw);
    }
    let p = tc.p as f32;
    let thresholds: Vec<Threshold> = if tc.global {
        let all: Vec<&[f32]> = ds.iter().map(|d| d.as_slice()).collect();
        let n: u64 = ds.iter().map(|d| d.len() as u64).sum();
        let t = select("global", &all, keep_count("p", p, n).unwrap()).unwrap();
        vec![t; ts.len()]
    } else {
        ds.iter().map(|d| select("t", &[d], keep_count("p", p, d.len() as u64).unwrap()).unwrap()).collect()
    };
    let mut off = 0u64;
    for (ti, t) in ts.iter_mut().enumerate() {
        let d = &ds[ti];
        let base = if tc.global { off } else { 0 };
        let factor = if tc.rescale && merge {
            let kept: Vec<f32> = d.iter().enumerate().map(|(i, &x)| onties::trim(x, base + i as u64, &thresholds[ti])).collect();
            onties::rescale_factor(l1_norm(d), l1_norm(&kept))
        } else {
            1.0
        };
        for i in 0..d.len() {
            let (theta, m1, v1, delta) = news[ti][i];
            let theta1 = if merge {
                let theta0 = sub(theta, t.c[i]);
                let kept = onties::trim(d[i], base + i as u64, &thresholds[ti]);
                let sp = if kept != 0.0 { merge_core::arith::mul(kept, factor) } else { 0.0 };
                t.c[i] = 0.0;
                add(theta0, onties::combine(tc.variant, t.tau[i], sp, alpha, omega))
            } else {
                t.c[i] = add(t.c[i], delta);
                add(theta, delta)
            };
            t.theta[i] = if torch { theta1 } else { adam::decay_after::<false>(&s, theta1) };
            t.m[i] = m1;
            t.v[i] = v1;
        }
        off += d.len() as u64;
    }
}

fn run(tc: TiesConfig, form: AdamForm, kk: u32, dtype: Dtype, sizes: &[usize], steps: u64, chunk: Option<u64>) {
    let adam_cfg = AdamConfig { form, lr: 1e-3, weight_decay: 0.01, ..AdamConfig::default() };
    let config = OnlineConfig { adam: adam_cfg, merge: Merge::None, k: kk, seed: 9 };
    let mut rng = Rng(0x7135 ^ sizes.len() as u64);
    let names: Vec<String> = (0..sizes.len()).map(|i| format!("m.{}", (5 * i) % 7)).collect();
    let base: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| rng.f32_scaled(0.5)).collect()).collect();
    // Quantised task vectors: many ties among |τ|.
    let sft: Vec<Vec<f32>> = base
        .iter()
        .map(|b| b.iter().map(|&x| x + (rng.below(9) as f32 - 4.0) * 0.0078125).collect())
        .collect();
    let inits: Vec<TensorInit> = (0..sizes.len())
        .map(|i| TensorInit { name: &names[i], theta: &sft[i], task: Some((Src::F32(&base[i]), Src::F32(&sft[i]))), tau_dtype: dtype })
        .collect();
    let mut gpu = GpuOptimizer::new_onties(ctx_with(&GpuOptions { max_chunk_bytes: chunk, ..Default::default() }), config, tc, &inits).unwrap();

    // CPU task vectors: trimmed τ, then through the storage dtype.
    let mut ts: Vec<T> = (0..sizes.len())
        .map(|i| T {
            name: names[i].clone(),
            theta: sft[i].clone(),
            m: vec![0.0; sizes[i]],
            v: vec![0.0; sizes[i]],
            c: vec![0.0; sizes[i]],
            tau: base[i].iter().zip(&sft[i]).map(|(&b, &s)| sub(flush(s), flush(b))).collect(),
        })
        .collect();
    ts.sort_by(|a, b| a.name.cmp(&b.name));
    let p = tc.p as f32;
    if tc.global {
        let all: Vec<&[f32]> = ts.iter().map(|t| t.tau.as_slice()).collect();
        let n: u64 = ts.iter().map(|t| t.tau.len() as u64).sum();
        let thr = select("global", &all, keep_count("p", p, n).unwrap()).unwrap();
        let mut off = 0;
        for t in &mut ts {
            for (i, x) in t.tau.iter_mut().enumerate() {
                *x = onties::trim(*x, off + i as u64, &thr);
            }
            off += t.tau.len() as u64;
        }
    } else {
        for t in &mut ts {
            let thr = select("t", &[&t.tau], keep_count("p", p, t.tau.len() as u64).unwrap()).unwrap();
            for (i, x) in t.tau.iter_mut().enumerate() {
                *x = onties::trim(*x, i as u64, &thr);
            }
        }
    }
    if dtype == Dtype::Bf16 {
        for t in &mut ts {
            for x in &mut t.tau {
                *x = flush(bf16_to_f32(f32_to_bf16(*x).unwrap()));
            }
        }
    }
    for step in 1..=steps {
        let grads: Vec<Vec<f32>> = ts
            .iter()
            .map(|t| (0..t.theta.len()).map(|i| if (i + step as usize) % 3 == 0 { 0.0 } else { rng.f32_scaled(1e-2) }).collect())
            .collect();
        cpu_step(&mut ts, &grads, &adam_cfg, step, u64::from(kk), &tc);
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
            if let Some(gc) = &st.cached {
                assert!(gc.iter().zip(&t.c).all(|(a, b)| a.to_bits() == b.to_bits()), "step {step} cached {}", t.name);
            }
        }
    }
}

const SIZES: [usize; 5] = [1, 255, 257, 1000, 4099];

#[test]
fn onties_per_tensor_both_variants_with_and_without_rescale() {
    for variant in [Variant::Reference, Variant::Paper] {
        for rescale in [false, true] {
            let tc = TiesConfig { variant, p: 0.3, alpha: 0.05, rescale, global: false };
            run(tc, AdamForm::HuggingFace, 1, Dtype::F32, &SIZES, 3, None);
        }
    }
}

#[test]
fn onties_global_scope_ties_and_tiny_chunks() {
    for variant in [Variant::Reference, Variant::Paper] {
        let tc = TiesConfig { variant, p: 0.5, alpha: 0.01, rescale: false, global: true };
        run(tc, AdamForm::Torch, 1, Dtype::Bf16, &SIZES, 3, Some(1024));
    }
}

#[test]
fn onties_step_k() {
    let tc = TiesConfig { variant: Variant::Reference, p: 0.1, alpha: 0.02, rescale: true, global: false };
    run(tc, AdamForm::HuggingFace, 3, Dtype::F32, &SIZES, 6, Some(2048));
}
