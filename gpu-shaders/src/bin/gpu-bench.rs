//! `cargo run --release -p gpu-shaders --bin gpu-bench [-- --sizes 16,64 --reps 5]`
//!
//! On whatever adapter the runtime picks (MERGE_GPU_ADAPTER to choose), for each
//! size in Mi parameters (one tensor): the device copy, the deterministic OnDARE
//! step (validated: check pass + write pass; unvalidated: write pass only; with
//! the L1 rescale), and the OnTIES step with its threshold passes, each as
//! effective bytes/s over the algorithm's minimal traffic and as a fraction of
//! the copy's bandwidth. Gradients are uploaded once and not timed. `--qwen` adds
//! the Qwen1.5-1.8B tensor set (needs ~35 GB of device memory).

// `GpuError` wraps merge-core's `Error`, which names its tensor inline.
#![allow(clippy::result_large_err)]

use std::time::Instant;

use gpu_shaders::optim::{GpuOptimizer, TaskInput, TensorInit, Weights, task_vectors};
use gpu_shaders::{bench, GpuContext, GpuError, GpuOptions};
use merge_core::dare::{DareConfig, DareVariant};
use merge_core::dtype::{Dtype, Src};
use merge_core::hyper::AdamConfig;
use merge_core::onties::Variant;
use merge_core::optim::{Merge, OnlineConfig, Scope, TiesConfig};

struct Args {
    sizes: Vec<u64>,
    reps: u32,
    qwen: bool,
}

/// Qwen1.5-1.8B's 218 tensors (hidden 2048, MLP 5504, 24 layers, vocab 151936,
/// untied embeddings; attention biases left out): 1.837B parameters.
fn qwen_shapes() -> Vec<usize> {
    let (h, m, layers, vocab) = (2048usize, 5504usize, 24, 151936usize);
    let mut s = vec![vocab * h, vocab * h];
    for _ in 0..layers {
        s.extend([h * h, h * h, h * h, h * h, m * h, m * h, h * m, h, h]);
    }
    s
}

fn parse() -> Result<Args, String> {
    let mut a = Args { sizes: vec![16, 64], reps: 5, qwen: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--qwen" {
            a.qwen = true;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            println!("usage: gpu-bench [--sizes 16,64] [--reps 5] [--qwen]\n  --sizes  tensor sizes in Mi parameters\n  --reps   timed repetitions per step\n  --qwen   add the Qwen1.5-1.8B tensor set (~35 GB of device memory)\nMERGE_GPU_ADAPTER=<substring> picks the adapter.");
            std::process::exit(0);
        }
        let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sizes" => {
                a.sizes = val
                    .split(',')
                    .map(|s| s.trim().parse::<u64>().map_err(|e| format!("--sizes {s:?}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--reps" => a.reps = val.parse().map_err(|e| format!("--reps {val:?}: {e}"))?,
            _ => return Err(format!("unknown flag {flag}; use --sizes 16,64 --reps 5 [--qwen]")),
        }
    }
    Ok(a)
}

#[derive(Clone, Copy)]
enum Method {
    Dare { rescale: bool },
    Ties { rescale: bool },
}

/// Builds one optimizer for `method` over `shapes`, then times the step without
/// and with validation. Returns (unvalidated s, validated s, memory note).
fn opt_step(shapes: &[usize], method: Method, reps: u32) -> Result<(f64, f64, String), GpuError> {
    let ctx = GpuContext::new(&GpuOptions::default())?;
    let names: Vec<String> = (0..shapes.len()).map(|i| format!("t{i:04}")).collect();
    let thetas: Vec<Vec<f32>> = shapes.iter().map(|&n| (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 1e-3).collect()).collect();
    let bases: Vec<Vec<f32>> = thetas.iter().map(|t| t.iter().map(|x| x * 0.999).collect()).collect();
    let merge = match method {
        Method::Dare { rescale } => Merge::Dare(DareConfig { variant: DareVariant::Reference, p: 0.01, alpha: 1e-7, rescale, clip: 1.0 }),
        Method::Ties { rescale } => {
            Merge::Ties(TiesConfig { variant: Variant::Reference, p: 0.01, alpha: 1e-7, rescale, scope: Scope::PerTensor })
        }
    };
    let config = OnlineConfig { adam: AdamConfig::default(), merge, k: 1, seed: 1 };
    let inputs: Vec<TaskInput> = (0..shapes.len())
        .map(|i| TaskInput { name: &names[i], base: Src::F32(&bases[i]), sft: Src::F32(&thetas[i]), dtype: Dtype::Bf16 })
        .collect();
    let taus = task_vectors(config, &inputs)?;
    drop(inputs);
    drop(bases);
    let inits: Vec<TensorInit> =
        (0..shapes.len()).map(|i| TensorInit { name: &names[i], theta: Weights::Host(&thetas[i]), tau: Some(taus[i].src()) }).collect();
    let mut opt = GpuOptimizer::new(ctx, config, &inits)?;
    drop(inits);
    drop(taus);
    let grads: Vec<Vec<f32>> = shapes.iter().map(|&n| (0..n).map(|i| ((i % 777) as f32 - 388.0) * 1e-4).collect()).collect();
    let named: Vec<(&str, &[f32])> = names.iter().zip(&grads).map(|(n, g)| (n.as_str(), g.as_slice())).collect();
    opt.upload_grads(&named)?;
    let mut times = [0.0; 2];
    for (slot, validate) in [false, true].into_iter().enumerate() {
        opt.set_validation(validate);
        opt.step_uploaded()?;
        let t = Instant::now();
        for _ in 0..reps {
            opt.step_uploaded()?;
        }
        times[slot] = t.elapsed().as_secs_f64() / f64::from(reps.max(1));
    }
    let params: u64 = shapes.iter().map(|&n| n as u64).sum();
    let extra = opt.device_bytes() as f64 - 16.0 * params as f64;
    let mem = format!(
        "{:.0} MiB on device, {:.1}% of parameter bytes beyond AdamW's θ, g, m, v",
        opt.device_bytes() as f64 / (1u64 << 20) as f64,
        100.0 * extra / (4.0 * params as f64)
    );
    Ok((times[0], times[1], mem))
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu-bench: {e}");
            std::process::exit(2);
        }
    };
    let ctx = match GpuContext::new(&GpuOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpu-bench: {e}");
            std::process::exit(1);
        }
    };
    println!("adapter: {}", gpu_shaders::context::describe(ctx.adapter_info()));
    println!("binding limit {} MiB, reps {}", (ctx.chunk_elems() * 4) >> 20, args.reps);
    let mut sets: Vec<(String, Vec<usize>)> =
        args.sizes.iter().map(|&mi| (format!("{mi}M params, one tensor"), vec![(mi << 20) as usize])).collect();
    if args.qwen {
        sets.push(("Qwen1.5-1.8B shapes".to_string(), qwen_shapes()));
    }
    for (label, shapes) in &sets {
        let n: usize = shapes.iter().sum();
        let copy = match bench::time_copy(&ctx, n as u64, args.reps) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("gpu-bench: copy of {n} elements: {e}");
                std::process::exit(1);
            }
        };
        let copy_bw = 8.0 * n as f64 / copy;
        println!("\n{label}: {n} f32 in {} tensors", shapes.len());
        println!("  {:<44} {:>9.3} ms {:>8.1} GB/s  1.00 of copy", "device copy (8 B/param)", copy * 1e3, copy_bw / 1e9);
        // Minimal traffic of one merged step: read g, θ, m, v, τ' (bf16) and write
        // θ, m, v; every figure below is that traffic over the measured time.
        let bytes = 30.0 * n as f64;
        for (what, method) in [
            ("OnDARE step", Method::Dare { rescale: false }),
            ("OnDARE + L1 rescale", Method::Dare { rescale: true }),
            ("OnTIES step incl. top-k passes", Method::Ties { rescale: false }),
        ] {
            match opt_step(shapes, method, args.reps) {
                Ok((fast, checked, mem)) => {
                    for (how, t) in [("unvalidated", fast), ("validated", checked)] {
                        let bw = bytes / t;
                        let label = format!("{what}, {how}");
                        println!("  {label:<44} {:>9.3} ms {:>8.1} GB/s  {:.2} of copy", t * 1e3, bw / 1e9, bw / copy_bw);
                    }
                    println!("    memory: {mem}");
                }
                Err(e) => println!("  {what:<44} failed: {e}"),
            }
        }
    }
}
