//! CPU throughput of the model's layers and training step, printed, not
//! asserted: `cargo bench -p host --bench model_cpu [-- NAME...]` runs the named
//! benchmarks (all without names): `train_tokens_per_second`, `linear`,
//! `attention`, `train_mid`, `linear_threads`. Throughput is also given per CPU second, so a
//! figure can be judged on a machine shared with other jobs.

use host::model::{layers, simd};
use host::model::{GenerateOptions, LlamaConfig, LlamaModel, Sampling, Sequence, SplitMix64};

fn rand_vec(rng: &mut SplitMix64, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.next_normal() * scale) as f32).collect()
}

fn main() {
    let benches: [(&str, fn()); 5] = [
        ("train_tokens_per_second", bench_train_tokens_per_second),
        ("linear", bench_linear),
        ("attention", bench_attention),
        ("train_mid", bench_train_mid),
        ("linear_threads", bench_linear_threads),
    ];
    // cargo bench passes --bench; anything else is a name to run.
    let names: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    for (name, run) in benches {
        if names.is_empty() || names.iter().any(|n| n == name) {
            println!("== {name}");
            run();
        }
    }
}

/// Throughput of a training step (forward + backward) on a ~1M-parameter model.
fn bench_train_tokens_per_second() {
    let cfg = LlamaConfig::tiny(259, 128, 352, 4, 4, 2);
    let model = LlamaModel::init(cfg, 1).unwrap();
    println!("params: {}", model.config.num_params());
    let mut rng = SplitMix64::new(1);
    let seqs: Vec<Sequence> = (0..16)
        .map(|_| Sequence::full((0..128).map(|_| (rng.next_u64() % 256) as u32).collect()))
        .collect();
    let tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let mut g = model.zero_grads();
    let _ = model.cross_entropy_backward(&seqs, 1.0, &mut g).unwrap();
    let start = std::time::Instant::now();
    let cpu0 = cpu_seconds();
    let reps = 3;
    for _ in 0..reps {
        model.cross_entropy_backward(&seqs, 1.0, &mut g).unwrap();
    }
    let dt = start.elapsed().as_secs_f64() / reps as f64;
    let cpu = (cpu_seconds() - cpu0) / reps as f64;
    println!(
        "threads {}: train step {:.3} s wall for {tokens} tokens: {:.0} tokens/s wall, {:.0} tokens per CPU second",
        model.threads(),
        dt,
        tokens as f64 / dt,
        tokens as f64 / cpu
    );
    let (start, cpu0) = (std::time::Instant::now(), cpu_seconds());
    model.sequence_logps(&seqs).unwrap();
    let (dt, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    println!(
        "forward only: {:.0} tokens/s wall, {:.0} tokens per CPU second",
        tokens as f64 / dt,
        tokens as f64 / cpu
    );
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| vec![i as u32 + 1; 16]).collect();
    let (start, cpu0) = (std::time::Instant::now(), cpu_seconds());
    let out = model
        .generate_batch(
            &prompts,
            &GenerateOptions {
                max_new_tokens: 64,
                sampling: Sampling::Greedy,
                stop_token: None,
                seed: 0,
            },
        )
        .unwrap();
    let n: usize = out.iter().map(Vec::len).sum();
    let (dt, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    println!(
        "generation (KV cache, 8 prompts): {:.0} tokens/s wall, {:.0} tokens per CPU second",
        n as f64 / dt,
        n as f64 / cpu
    );
}

/// CPU seconds used by this process so far (user + system), so throughput can be
/// judged on a machine shared with other jobs.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    // fields 14 and 15 of stat (utime, stime), counted after the `)` of the name
    if f.len() > 13 { (f[11] + f[12]) / 100.0 } else { 0.0 }
}

/// CPU seconds this thread has run, to the nanosecond (the kernel's scheduler
/// statistics), for single-thread figures: [`cpu_seconds`] counts in ticks of
/// 10 ms, a tenth of one timed product.
fn thread_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|ns| ns.parse::<f64>().ok()).map_or_else(cpu_seconds, |ns| ns / 1e9)
}

/// Single-thread GFLOP/s of the linear layer at every vector level the CPU has
/// (the bits are the same at each), in portable math and, at the levels that
/// fuse, in fused math, at the demo model's sizes and at layers and the LM head
/// of the `llama-7m` and `llama-110m` bench shapes (the MLP's up product at the
/// bench's 512 tokens).
fn bench_linear() {
    let shapes = [
        ("demo mlp up", 128, 128, 352),
        ("7m mlp up", 256, 256, 704),
        ("7m head", 192, 256, 8192),
        ("110m mlp down", 256, 2048, 768),
        ("110m mlp up", 512, 768, 2048),
        ("110m head", 96, 768, 32000),
    ];
    let levels = simd::Level::ALL.into_iter().filter(|&l| l <= simd::detected());
    let runs = levels.flat_map(|l| [(l, simd::Math::Portable), (l, simd::Math::Fused)]).filter(|&(l, m)| m == simd::Math::Portable || simd::fuses_at(l));
    for (level, math) in runs {
        simd::set_limit(level);
        simd::set_math(math);
        for (name, t, ic, oc) in shapes {
            let mut rng = SplitMix64::new(1);
            let x = rand_vec(&mut rng, t * ic, 1.0);
            let w = rand_vec(&mut rng, oc * ic, 1.0);
            let dy = rand_vec(&mut rng, t * oc, 1.0);
            let mut y = vec![0f32; t * oc];
            let (mut dx, mut dw) = (vec![0f32; t * ic], vec![0f32; oc * ic]);
            let reps = (1e10 / (2.0 * (t * ic * oc) as f64)).ceil() as usize;
            let flops = 2.0 * (t * ic * oc) as f64 * reps as f64;
            let c0 = thread_cpu_seconds();
            for _ in 0..reps {
                layers::linear_forward(&mut y, &x, layers::Weight::Hf(&w), None, ic, oc, 1);
            }
            let c1 = thread_cpu_seconds();
            for _ in 0..reps {
                layers::linear_backward(Some(&mut dx), &mut dw, &dy, &x, &w, ic, oc, 1);
            }
            let c2 = thread_cpu_seconds();
            println!(
                "{:<8} {:<8} {name:<14} [{t}x{ic}]·[{ic}x{oc}]: forward {:.1} GFLOP/s, backward {:.1} GFLOP/s (per CPU second)",
                level.name(),
                math.name(),
                flops / (c1 - c0) / 1e9,
                2.0 * flops / (c2 - c1) / 1e9
            );
        }
    }
    simd::set_limit(simd::Level::Avx512);
    simd::set_math(simd::Math::Portable);
}

/// One layer's causal attention, forward (keeping the weights) and backward, at
/// the 110M shape's heads (12 of 64) and two sequence lengths, per vector level.
/// A query at position `t` sees `t + 1` keys: `hd · T(T+1)/2` multiply-adds for
/// the scores and as many for the weighted values; the backward has twice that.
fn bench_attention() {
    for level in simd::Level::ALL.into_iter().filter(|&l| l <= simd::detected()) {
        simd::set_limit(level);
        for t in [256, 512] {
            let s = layers::AttnShape { heads: 12, kv_heads: 12, head_dim: 64, pos0: 0, tq: t };
            let d = s.heads * s.head_dim;
            let mut rng = SplitMix64::new(1);
            let (q, k, v, dout) = (rand_vec(&mut rng, t * d, 1.0), rand_vec(&mut rng, t * d, 1.0), rand_vec(&mut rng, t * d, 1.0), rand_vec(&mut rng, t * d, 1.0));
            let mut out = vec![0f32; t * d];
            let (mut dq, mut dk, mut dv) = (vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * d]);
            let macs = (s.heads * s.head_dim * t * (t + 1)) as f64;
            let reps = (4e9 / (2.0 * macs)).ceil() as usize;
            let mut saved = layers::AttnSaved::probs(s);
            let c0 = thread_cpu_seconds();
            for _ in 0..reps {
                layers::attention_forward(&mut out, Some(&mut saved), &q, &k, &v, s);
            }
            let c1 = thread_cpu_seconds();
            for _ in 0..reps {
                layers::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &saved, &q, &k, &v, s);
            }
            let c2 = thread_cpu_seconds();
            println!(
                "{:<8} 12 heads x 64, T {t:<4}: forward {:.1} ms ({:.1} GFLOP/s), backward {:.1} ms ({:.1} GFLOP/s) (per CPU second)",
                level.name(),
                (c1 - c0) / reps as f64 * 1e3,
                2.0 * macs * reps as f64 / (c1 - c0) / 1e9,
                (c2 - c1) / reps as f64 * 1e3,
                4.0 * macs * reps as f64 / (c2 - c1) / 1e9
            );
        }
    }
    simd::set_limit(simd::Level::Avx512);
}

/// A ~58M-parameter Llama shape (32k vocabulary) to see how the CPU path scales.
fn bench_train_mid() {
    let cfg = LlamaConfig::tiny(32000, 512, 1376, 8, 8, 4);
    let model = LlamaModel::init(cfg, 1).unwrap();
    println!("params: {}", model.config.num_params());
    let mut rng = SplitMix64::new(1);
    let seqs: Vec<Sequence> = (0..2)
        .map(|_| Sequence::full((0..256).map(|_| (rng.next_u64() % 32000) as u32).collect()))
        .collect();
    let tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let mut g = model.zero_grads();
    let start = std::time::Instant::now();
    let cpu0 = cpu_seconds();
    model.cross_entropy_backward(&seqs, 1.0, &mut g).unwrap();
    let (dt, cpu) = (start.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    println!(
        "train step {dt:.2} s wall for {tokens} tokens: {:.0} tokens/s wall, {:.0} tokens per CPU second",
        tokens as f64 / dt,
        tokens as f64 / cpu
    );
    // one sequence alone: its matrix products are what use the second core
    let mut model = model;
    for threads in [1, 2] {
        model.set_threads(threads);
        let start = std::time::Instant::now();
        let lp = model.sequence_logps(&seqs[..1]).unwrap();
        println!(
            "one sequence forward, {threads} thread(s): {:.2} s wall ({lp:?})",
            start.elapsed().as_secs_f64()
        );
    }
}

/// Wall time of one large product on one and two threads.
fn bench_linear_threads() {
    let (t, ic, oc) = (256, 512, 1376);
    let mut rng = SplitMix64::new(1);
    let x = rand_vec(&mut rng, t * ic, 1.0);
    let wt = rand_vec(&mut rng, oc * ic, 1.0);
    let mut y = vec![0f32; t * oc];
    for threads in [1, 2, 1, 2] {
        let (start, cpu0) = (std::time::Instant::now(), cpu_seconds());
        for _ in 0..10 {
            layers::linear_forward(&mut y, &x, layers::Weight::Transposed(&wt), None, ic, oc, threads);
        }
        let (dt, cpu) = (start.elapsed().as_secs_f64() / 10.0, (cpu_seconds() - cpu0) / 10.0);
        println!(
            "{threads} thread(s): {:.1} ms wall, {:.1} ms CPU, {:.1} GFLOP/s wall",
            dt * 1e3,
            cpu * 1e3,
            2.0 * (t * ic * oc) as f64 / dt / 1e9
        );
    }
}
