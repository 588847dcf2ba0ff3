//! The golden cases: inputs built here (edge values plus a seeded spread over the
//! whole binary32 range from merge-core's SplitMix64), expected outputs filled in by merge-core when a
//! file is written. `salt = 0` gives the committed files; other salts give fresh
//! inputs of the same shapes, on which the oracle must agree with merge-core too.

use golden_runner::{Array, Case, f32_param, f64_param};
use merge_core::dtype::{bf16_to_f32, f16_to_f32};
use merge_core::rng::SplitMix64;

/// Values every element-wise path must meet: zeros of both signs, subnormals at
/// both ends, the normal boundary, ones, huge and tiny magnitudes.
const EDGES: [u32; 16] = [
    0x0000_0000, 0x8000_0000, // ±0
    0x0000_0001, 0x807f_ffff, // smallest and largest subnormal
    0x0080_0000, 0x8080_0000, // ±smallest normal
    0x0080_0001, 0x3f80_0000, 0xbf80_0000, // just above it, ±1
    0x3f7f_ffff, 0x4b80_0000, // just below 1, 2^24
    0x7f7f_ffff, 0xff7f_ffff, // ±largest finite
    0x1e3c_e508, 0x6c4e_cb8f, 0x3a83_126f, // 1e-20, 1e27, 1e-3
];

fn edges() -> Vec<f32> {
    EDGES.iter().map(|&b| f32::from_bits(b)).collect()
}

fn arith_cases(salt: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut rng = SplitMix64::new(1 ^ salt);
    // Every pair of edge values, then random operands across all exponents.
    let e = edges();
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    for &x in &e {
        for &y in &e {
            ea.push(x);
            eb.push(y);
        }
    }
    // Products that land at the normal boundary: 2^-126 - 2^-150 rounds (ties to
    // even) up to the smallest normal and survives F; 2^-126 - 2^-149 is the
    // largest subnormal and is flushed.
    let half = f32::from_bits(0x1f00_0000); // 2^-63
    ea.extend([half, half, -half]);
    eb.extend([f32::from_bits(0x1eff_ffff), f32::from_bits(0x1eff_fffe), f32::from_bits(0x1eff_ffff)]);
    let ra: Vec<f32> = (0..512).map(|_| rng.spread_f32(0, 254)).collect();
    let rb: Vec<f32> = (0..512).map(|_| rng.spread_f32(0, 254)).collect();
    for f in ["add", "sub", "mul", "div"] {
        for (tag, a, b) in [("edges", &ea, &eb), ("spread", &ra, &rb)] {
            // Division by zero never happens in the merge path (SPEC.md §1.5), and
            // 0/0 would give a NaN whose bits are platform-specific.
            let (a, b): (Vec<f32>, Vec<f32>) = if f == "div" {
                a.iter().zip(b.iter()).filter(|&(_, y)| y.to_bits() & 0x7f80_0000 != 0).map(|(&x, &y)| (x, y)).unzip()
            } else {
                (a.clone(), b.clone())
            };
            let mut c = Case::new(&format!("{f}_{tag}"), "arith");
            c.params.insert("fn".into(), f.into());
            c.inputs.insert("a".into(), Array::F32(a));
            c.inputs.insert("b".into(), Array::F32(b));
            cases.push(c);
        }
    }
    // sqrt of negative values is NaN (platform-specific bits) and never happens.
    let mut sq: Vec<f32> = e.iter().map(|x| x.abs()).collect();
    sq.extend((0..512).map(|_| rng.spread_f32(0, 254).abs()));
    let mut c = Case::new("sqrt", "arith");
    c.params.insert("fn".into(), "sqrt".into());
    c.inputs.insert("a".into(), Array::F32(sq));
    cases.push(c);
    let mut c = Case::new("flush", "arith");
    c.params.insert("fn".into(), "flush".into());
    let mut fl = e.clone();
    fl.extend((0..256).map(|_| rng.spread_f32(0, 2)));
    c.inputs.insert("a".into(), Array::F32(fl));
    cases.push(c);
    cases
}

/// Tensor names as the trainer produces them, plus non-ASCII bytes for FNV-1a.
const NAMES: [&str; 4] = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight", "", "ü-名前"];

fn rng_cases(salt: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    // Random123's known answers (kat_vectors) and a spread of counters.
    let kats: [([u32; 2], [u32; 2]); 3] = [
        ([0, 0], [0, 0]),
        ([u32::MAX, u32::MAX], [u32::MAX, u32::MAX]),
        ([0x1319_8a2e, 0x0370_7344], [0x243f_6a88, 0x85a3_08d3]),
    ];
    for (i, (key, ctr)) in kats.into_iter().enumerate() {
        let mut c = Case::new(&format!("threefry_kat{i}"), "threefry");
        c.inputs.insert("key".into(), Array::U32(key.to_vec()));
        c.inputs.insert("c0".into(), Array::U32(vec![ctr[0]]));
        c.inputs.insert("c1".into(), Array::U32(vec![ctr[1]]));
        cases.push(c);
    }
    let mut r = SplitMix64::new(2 ^ salt);
    let mut c = Case::new("threefry_spread", "threefry");
    c.inputs.insert("key".into(), Array::U32(vec![r.next_u64() as u32, r.next_u64() as u32]));
    c.inputs.insert("c0".into(), Array::U32((0..256).map(|_| r.next_u64() as u32).collect()));
    c.inputs.insert("c1".into(), Array::U32((0..256).map(|_| r.next_u64() as u32).collect()));
    cases.push(c);

    // Keep probabilities: everything, the paper's 0.01 and 5e-4, one half, the
    // largest p below 1, and a p so small that T = 0 keeps nothing.
    let ps: [(&str, f32); 6] = [("p1", 1.0), ("p0.5", 0.5), ("p0.01", 0.01), ("p5e-4", 5e-4), ("pmax", f32::from_bits(0x3f7f_ffff)), ("ptiny", 1e-12)];
    let seeds: [u64; 3] = [0, 0x0123_4567_89ab_cdef, u64::MAX];
    for (ni, name) in NAMES.iter().enumerate() {
        for (pi, (ptag, p)) in ps.iter().enumerate() {
            let seed = seeds[(ni + pi) % 3];
            // Steps: the reference mask (0), first step, a large step; streams 0, 1, 2+j.
            let step = [0u64, 1, 4_000_000_000][pi % 3];
            let stream = [0u64, 1, 2, 5][ni % 4];
            let offset = [0u64, 1, 12_345, (1 << 32) - 300][(ni + pi) % 4];
            let mut c = Case::new(&format!("mask_{ni}_{ptag}"), "mask");
            c.tensor = Some(name.to_string());
            c.seed = Some(seed);
            c.step = Some(step);
            c.params.insert("p".into(), f32_param(*p));
            c.params.insert("stream".into(), stream.into());
            c.params.insert("offset".into(), offset.into());
            c.params.insert("n".into(), 300u64.into());
            cases.push(c);
        }
    }
    // Rejected: p outside (0, 1], and indices past 2^32 - 1.
    for (tag, p, offset) in [("p_zero", 0.0f32, 0u64), ("p_above_one", 1.5, 0), ("p_negative", -0.25, 0), ("p_subnormal", 1e-40, 0), ("past_2^32", 0.5, (1 << 32) - 10)] {
        let mut c = Case::new(&format!("mask_rejects_{tag}"), "mask");
        c.tensor = Some("w".into());
        c.seed = Some(7);
        c.step = Some(1);
        c.params.insert("p".into(), f32_param(p));
        c.params.insert("stream".into(), 0u64.into());
        c.params.insert("offset".into(), offset.into());
        c.params.insert("n".into(), 20u64.into());
        cases.push(c);
    }
    cases
}

fn tree_sum_cases(salt: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut r = SplitMix64::new(3 ^ salt);
    // Sizes around powers of two (the tree's padding) and one spanning several
    // 256-element blocks; values from all binades that cannot overflow a sum.
    for n in [0usize, 1, 2, 3, 5, 255, 256, 257, 1000, 4097] {
        let mut c = Case::new(&format!("tree_sum_n{n}"), "tree_sum");
        c.inputs.insert("x".into(), Array::F32((0..n).map(|_| r.spread_f32(0, 200)).collect()));
        cases.push(c);
    }
    // Order matters: 2^24 + 1 + 1 + 1 sums to 2^24 + 2 in the tree, 2^24 left to right.
    let mut c = Case::new("tree_sum_shape", "tree_sum");
    c.inputs.insert("x".into(), Array::F32(vec![16_777_216.0, 1.0, 1.0, 1.0, -16_777_216.0, 0.5, 0.25, 0.125]));
    cases.push(c);
    let mut c = Case::new("tree_sum_edges", "tree_sum");
    c.inputs.insert("x".into(), Array::F32(edges()[..11].to_vec()));
    cases.push(c);
    // Magnitudes near the top: the sum overflows to +Inf (reported by callers, not here).
    let mut c = Case::new("tree_sum_overflow", "tree_sum");
    c.inputs.insert("x".into(), Array::F32(vec![f32::MAX, f32::MAX, 1.0]));
    cases.push(c);
    cases
}

fn topk_cases(salt: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut r = SplitMix64::new(4 ^ salt);
    let one = |name: &str, x: Vec<f32>, p: f32| {
        let mut c = Case::new(name, "topk");
        c.params.insert("p".into(), f32_param(p));
        c.params.insert("scope".into(), name.into());
        c.inputs.insert("w".into(), Array::F32(x));
        c
    };
    // Ties: equal magnitudes of both signs; -0, +0 and subnormals all have key 0.
    let ties: Vec<f32> = [1.0f32, -1.0, 2.0, -2.0, 1.0, -1.0, 2.0, 0.5, -0.5, 1.0].repeat(3);
    for (tag, p) in [("k1", 0.01f32), ("k3", 0.1), ("k7", 0.2), ("k15", 0.5), ("k29", 0.95), ("kall", 1.0)] {
        cases.push(one(&format!("topk_ties_{tag}"), ties.clone(), p));
    }
    let zeros: Vec<f32> = [0.0f32, -0.0, 1e-45, -1e-45, 1.0e-39, 0.0, 3.0, -0.0].to_vec();
    for (tag, p) in [("k1", 0.125f32), ("k2", 0.25), ("k5", 0.625), ("kall", 1.0)] {
        cases.push(one(&format!("topk_zeros_{tag}"), zeros.clone(), p));
    }
    // ⌈p·n⌉ exactly on the binary32 p: 0.1f32 is slightly above 1/10, so 2 of 10.
    cases.push(one("topk_exact_ceiling", (1..=10).map(|i| i as f32).collect(), 0.1));
    let spread: Vec<f32> = (0..1500).map(|_| r.spread_f32(0, 254)).collect();
    for (tag, p) in [("p0.01", 0.01f32), ("p5e-4", 5e-4), ("p0.3", 0.3), ("ptiny", 1e-30)] {
        cases.push(one(&format!("topk_spread_{tag}"), spread.clone(), p));
    }
    // Quantized magnitudes: many ties at the threshold, spread over the indices.
    let coarse: Vec<f32> = (0..2000).map(|_| (r.next_u64() % 16) as f32 * if r.next_u64() & 1 == 0 { 1.0 } else { -1.0 }).collect();
    cases.push(one("topk_coarse_p0.3", coarse, 0.3));
    // Global scope: three tensors trimmed together, concatenated in bytewise name
    // order ("B" < "a" < "a.b"), not insertion order.
    let mut c = Case::new("topk_global", "topk");
    c.params.insert("p".into(), f32_param(0.2));
    c.params.insert("scope".into(), "global".into());
    for name in ["a.b", "B", "a"] {
        c.inputs.insert(name.into(), Array::F32((0..97).map(|_| (r.next_u64() % 8) as f32 - 3.5).collect()));
    }
    cases.push(c);
    // Rejected keep fractions.
    for (tag, p) in [("p_zero", 0.0f32), ("p_above_one", 1.25), ("p_subnormal", 1e-40)] {
        cases.push(one(&format!("topk_rejects_{tag}"), vec![1.0, 2.0], p));
    }
    cases
}

/// Random bf16 / f16 bit patterns: every sign, subnormals included, no Inf or NaN.
fn half_bits(r: &mut SplitMix64, n: usize, bf16: bool) -> Vec<u16> {
    (0..n)
        .map(|_| {
            let x = r.next_u64();
            if bf16 {
                // Exponents 100..=140 (about 1e-8 .. 1e4), and some zeros/subnormals.
                let e = if x.is_multiple_of(17) { 0 } else { 100 + (x >> 8) as u16 % 41 };
                ((x >> 40) as u16 & 0x8000) | e << 7 | ((x >> 20) as u16 & 0x7f)
            } else {
                let e = (x >> 8) as u16 % 31;
                ((x >> 40) as u16 & 0x8000) | e << 10 | ((x >> 20) as u16 & 0x3ff)
            }
        })
        .collect()
}

/// One tensor's starting point: base and SFT weights (SFT = base + a small delta),
/// policy at SFT, zero moments; `n` elements with edge values in the first slots.
struct Fixture {
    base: Vec<f32>,
    sft: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

fn fixture(r: &mut SplitMix64, n: usize, steps: usize) -> Fixture {
    let base: Vec<f32> = (0..n).map(|_| r.spread_f32(110, 128)).collect();
    let mut sft: Vec<f32> = base.iter().map(|&b| b + r.spread_f32(100, 122)).collect();
    // Edge deltas: zero, the sign of zero, subnormal differences, equal weights.
    let edge_sft = [0.0f32, -0.0, 1e-45, 0.0, 1e-39, -1e-39];
    for (i, &e) in edge_sft.iter().enumerate().take(n) {
        sft[i] = e;
    }
    let grads = (0..steps)
        .map(|_| {
            let mut g: Vec<f32> = (0..n).map(|_| r.spread_f32(100, 135)).collect();
            // Gradient edges whose squares stay finite: ±0, subnormals, the smallest
            // normal, tiny and large magnitudes, ties in magnitude.
            let edge_g = [0.0f32, -0.0, 1e-45, -1e-40, f32::MIN_POSITIVE, 1e-20, 1.0, -1.0, 16_777_216.0, 1e-3];
            for (i, &e) in edge_g.iter().enumerate() {
                if 6 + i < n {
                    g[6 + i] = e;
                }
            }
            g
        })
        .collect();
    Fixture { base, sft, grads }
}

struct Opt<'a> {
    name: &'a str,
    form: &'a str,
    schedule: (&'a str, u64, u64),
    lr: f64,
    wd: f64,
    merge: &'a str,
    variant: &'a str,
    p: f64,
    alpha: f64,
    rescale: bool,
    k: u64,
    tau_dtype: &'a str,
    scope: &'a str,
    clip: f64,
}

const ADAMW: Opt<'static> = Opt {
    name: "",
    form: "hf",
    schedule: ("constant", 0, 0),
    lr: 1e-3,
    wd: 0.0,
    merge: "none",
    variant: "reference",
    p: 1.0,
    alpha: 0.0,
    rescale: false,
    k: 1,
    tau_dtype: "f32",
    scope: "tensor",
    clip: 1.0,
};

fn optimizer_case(o: &Opt, fx: &Fixture, base_dtype: &str, seed: u64) -> Case {
    let mut c = Case::new(o.name, "optimizer");
    c.tensor = Some(format!("model.layers.{}.self_attn.q_proj.weight", seed % 7));
    c.seed = Some(seed);
    c.params.insert("form".into(), o.form.into());
    c.params.insert("schedule".into(), o.schedule.0.into());
    if o.schedule.0 != "constant" {
        c.params.insert("warmup".into(), o.schedule.1.into());
        c.params.insert("total".into(), o.schedule.2.into());
    }
    c.params.insert("lr".into(), f64_param(o.lr));
    c.params.insert("beta1".into(), f64_param(0.9));
    c.params.insert("beta2".into(), f64_param(0.999));
    c.params.insert("eps".into(), f64_param(1e-8));
    c.params.insert("weight_decay".into(), f64_param(o.wd));
    c.params.insert("merge".into(), o.merge.into());
    if o.merge != "none" {
        c.params.insert("variant".into(), o.variant.into());
        c.params.insert("p".into(), f64_param(o.p));
        c.params.insert("alpha".into(), f64_param(o.alpha));
        c.params.insert("rescale".into(), o.rescale.into());
        if o.merge == "dare" {
            c.params.insert("clip".into(), f64_param(o.clip));
        } else {
            c.params.insert("scope".into(), o.scope.into());
        }
    }
    c.params.insert("k".into(), o.k.into());
    c.params.insert("tau_dtype".into(), o.tau_dtype.into());
    let (base, sft) = match base_dtype {
        "f32" => (Array::F32(fx.base.clone()), Array::F32(fx.sft.clone())),
        // Narrow weights: drawn directly as bit patterns (subnormals included).
        other => {
            let bf = other == "bf16";
            let mut r = SplitMix64::new(seed ^ 0x55);
            let b = half_bits(&mut r, fx.base.len(), bf);
            let s = half_bits(&mut r, fx.base.len(), bf);
            if bf { (Array::Bf16(b), Array::Bf16(s)) } else { (Array::F16(b), Array::F16(s)) }
        }
    };
    c.inputs.insert("base".into(), base);
    // The policy starts at the SFT weights (in f32).
    let theta: Vec<f32> = match &sft {
        Array::F32(v) => v.clone(),
        Array::Bf16(v) => v.iter().map(|&h| bf16_to_f32(h)).collect(),
        Array::F16(v) => v.iter().map(|&h| f16_to_f32(h)).collect(),
        _ => unreachable!("weights are float arrays"),
    };
    c.inputs.insert("sft".into(), sft);
    let n = theta.len();
    c.inputs.insert("theta".into(), Array::F32(theta));
    c.inputs.insert("m".into(), Array::F32(vec![0.0; n]));
    c.inputs.insert("v".into(), Array::F32(vec![0.0; n]));
    for (i, g) in fx.grads.iter().enumerate() {
        c.inputs.insert(format!("grad.{}", i + 1), Array::F32(g.clone()));
    }
    c
}

fn optimizer_cases(salt: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut r = SplitMix64::new(5 ^ salt);
    let fx = fixture(&mut r, 100, 4);
    let long = fixture(&mut r, 65, 8);
    let cos = ("warmup_cosine", 2, 6);
    let dare = Opt { merge: "dare", p: 0.3, alpha: 0.1, ..ADAMW };
    let ties = Opt { merge: "ties", p: 0.2, alpha: 0.3, ..ADAMW };
    let runs: Vec<(Opt, &Fixture, &str)> = vec![
        (Opt { name: "adamw_hf", wd: 0.01, ..ADAMW }, &fx, "f32"),
        (Opt { name: "adamw_torch", form: "torch", wd: 0.01, ..ADAMW }, &fx, "f32"),
        (Opt { name: "adamw_hf_cosine", schedule: cos, ..ADAMW }, &long, "f32"),
        (Opt { name: "adamw_torch_cosine", form: "torch", schedule: cos, wd: 0.1, ..ADAMW }, &long, "f32"),
        (Opt { name: "ondare_reference", ..dare }, &fx, "f32"),
        (Opt { name: "ondare_reference_rescale", rescale: true, ..dare }, &fx, "f32"),
        (Opt { name: "ondare_reference_paper_defaults", p: 0.01, alpha: 1e-7, lr: 1e-6, ..dare }, &fx, "f32"),
        (Opt { name: "ondare_reference_torch_decay", form: "torch", wd: 0.05, ..dare }, &fx, "f32"),
        (Opt { name: "ondare_reference_tau_bf16", tau_dtype: "bf16", ..dare }, &fx, "bf16"),
        (Opt { name: "ondare_reference_tau_f16", tau_dtype: "f16", ..dare }, &fx, "f16"),
        (Opt { name: "ondare_reference_p1_alpha0", p: 1.0, alpha: 0.0, ..dare }, &fx, "f32"),
        (Opt { name: "ondare_paper", variant: "paper", ..dare }, &fx, "f32"),
        (Opt { name: "ondare_paper_rescale", variant: "paper", rescale: true, ..dare }, &fx, "f32"),
        (Opt { name: "ondare_paper_tau_bf16", variant: "paper", tau_dtype: "bf16", ..dare }, &fx, "bf16"),
        (Opt { name: "ondare_paper_f16_weights_tau_f32", variant: "paper", ..dare }, &fx, "f16"),
        (Opt { name: "stepk3_ondare_reference", k: 3, ..dare }, &long, "f32"),
        (Opt { name: "stepk3_ondare_paper_rescale", k: 3, variant: "paper", rescale: true, schedule: cos, ..dare }, &long, "f32"),
        (Opt { name: "stepk2_adamw_torch", k: 2, form: "torch", wd: 0.01, ..ADAMW }, &long, "f32"),
        // Clamping: a small clip bites on τ' (reference) and, with a large rate, on
        // the rescaled update; a tiny rate makes ‖D‖₁ < 1e-8, which skips the rescale.
        (Opt { name: "ondare_reference_clip_small", clip: 0.01, rescale: true, lr: 0.5, ..dare }, &fx, "f32"),
        (Opt { name: "ondare_paper_clip_small", variant: "paper", clip: 0.01, rescale: true, lr: 0.5, ..dare }, &fx, "f32"),
        (Opt { name: "ondare_reference_rescale_tiny_norm", rescale: true, lr: 1e-12, ..dare }, &fx, "f32"),
        (Opt { name: "onties_reference", ..ties }, &fx, "f32"),
        (Opt { name: "onties_reference_rescale_tiny_norm", rescale: true, lr: 1e-12, ..ties }, &fx, "f32"),
        (Opt { name: "onties_reference_rescale", rescale: true, ..ties }, &fx, "f32"),
        (Opt { name: "onties_reference_paper_defaults", p: 0.01, alpha: 1e-7, lr: 1e-6, ..ties }, &fx, "f32"),
        (Opt { name: "onties_reference_p1_alpha0", p: 1.0, alpha: 0.0, ..ties }, &fx, "f32"),
        (Opt { name: "onties_reference_tau_bf16_torch", tau_dtype: "bf16", form: "torch", wd: 0.05, ..ties }, &fx, "bf16"),
        (Opt { name: "onties_paper", variant: "paper", ..ties }, &fx, "f32"),
        (Opt { name: "onties_paper_rescale", variant: "paper", rescale: true, ..ties }, &fx, "f32"),
        (Opt { name: "onties_paper_tau_f16", variant: "paper", tau_dtype: "f16", ..ties }, &fx, "f16"),
        (Opt { name: "onties_paper_p1_alpha0", variant: "paper", p: 1.0, alpha: 0.0, ..ties }, &fx, "f32"),
        (Opt { name: "stepk3_onties_reference_cosine", k: 3, schedule: cos, ..ties }, &long, "f32"),
    ];
    for (i, (o, f, dt)) in runs.iter().enumerate() {
        cases.push(optimizer_case(o, f, dt, (1000 + i as u64) ^ salt));
    }
    // Global scope: three tensors trimmed with one threshold over their
    // concatenation in bytewise name order.
    for (tag, variant, rescale) in [("reference", "reference", false), ("paper_rescale", "paper", true)] {
        let o = Opt { name: "", variant, rescale, scope: "global", ..ties };
        let mut c = optimizer_case(&Opt { name: &format!("onties_global_{tag}"), ..o }, &fx, "f32", 90);
        let names = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"];
        c.tensor = None;
        c.params.insert("tensors".into(), serde_json::Value::Array(names.iter().map(|&n| n.into()).collect()));
        let inputs = std::mem::take(&mut c.inputs);
        for (j, _) in names.iter().enumerate() {
            let f = fixture(&mut r, 40 + 7 * j, 3);
            let mut one = optimizer_case(&o, &f, "f32", 91);
            for (k, a) in std::mem::take(&mut one.inputs) {
                c.inputs.insert(format!("t{j}/{k}"), a);
            }
        }
        drop(inputs);
        cases.push(c);
    }
    // Rejected inputs: the first non-finite element is named with its index.
    let mut bad = optimizer_case(&Opt { name: "rejects_nan_gradient", ..dare }, &fx, "f32", 77);
    if let Some(Array::F32(g)) = bad.inputs.get_mut("grad.2") {
        g[61] = f32::NAN;
        g[90] = f32::INFINITY;
    }
    cases.push(bad);
    let mut bad = optimizer_case(&Opt { name: "rejects_inf_sft", ..dare }, &fx, "f32", 78);
    if let Some(Array::F32(s)) = bad.inputs.get_mut("sft") {
        s[42] = f32::NEG_INFINITY;
    }
    cases.push(bad);
    let mut bad = optimizer_case(&Opt { name: "rejects_nan_theta", ..ADAMW }, &fx, "f32", 79);
    if let Some(Array::F32(t)) = bad.inputs.get_mut("theta") {
        t[3] = f32::from_bits(0x7fc0_0001);
    }
    cases.push(bad);
    // g = 1e27: g² overflows binary32 in the second moment.
    let mut bad = optimizer_case(&Opt { name: "rejects_overflowing_moment", ..ADAMW }, &fx, "f32", 80);
    if let Some(Array::F32(g)) = bad.inputs.get_mut("grad.1") {
        g[70] = 1e27;
    }
    cases.push(bad);
    // τ too large for binary16 storage.
    let mut bad = optimizer_case(&Opt { name: "rejects_tau_f16_overflow", variant: "paper", tau_dtype: "f16", ..dare }, &fx, "f32", 81);
    if let Some(Array::F32(s)) = bad.inputs.get_mut("sft") {
        s[7] = 1e6;
    }
    cases.push(bad);
    for o in [
        Opt { name: "rejects_negative_lr", lr: -1e-3, ..ADAMW },
        Opt { name: "rejects_p_zero", p: 0.0, ..dare },
        Opt { name: "rejects_alpha_above_one", alpha: 1.5, ..dare },
        Opt { name: "rejects_k_zero", k: 0, ..dare },
    ] {
        cases.push(optimizer_case(&o, &fx, "f32", 82));
    }
    cases
}

fn dtype_cases(salt: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut r = SplitMix64::new(6 ^ salt);
    // Rounding boundaries of both formats: exact halves (ties to even), just above
    // and below, the largest finite values, the binary16 subnormal range.
    let mut x: Vec<f32> = edges()[..11].to_vec();
    x.extend(
        [0x3f80_8000u32, 0x3f81_8000, 0x3f80_8001, 0x3f80_7fff, 0x7f7f_7fff, 0x3f80_1000, 0x3f80_3000, 0x3f80_1001, 0x477f_efff, 0x477f_e000, 0x3380_0000, 0x3300_0001, 0x3300_0000, 0x387f_c000, 0x3880_0000, 0xb3c0_0000]
            .map(f32::from_bits),
    );
    x.extend((0..400).map(|_| r.spread_f32(90, 160)));
    let store = |name: &str, dt: &str, x: Vec<f32>| {
        let mut c = Case::new(name, "store");
        c.tensor = Some("embed_tokens.weight".into());
        c.params.insert("dtype".into(), dt.into());
        c.inputs.insert("x".into(), Array::F32(x));
        c
    };
    // binary16 overflows above 65504; these stay inside its range.
    let small: Vec<f32> = x.iter().copied().filter(|v| v.abs() < 65_504.0).collect();
    cases.push(store("store_bf16", "bf16", x.clone()));
    cases.push(store("store_f16", "f16", small));
    cases.push(store("store_f32", "f32", x));
    // Rejected: values that round to Inf in the target format, and non-finite values.
    cases.push(store("store_bf16_rejects_overflow", "bf16", vec![1.0, f32::from_bits(0x7f7f_8000), 2.0]));
    cases.push(store("store_f16_rejects_overflow", "f16", vec![1.0, 65_504.0, 65_520.0, 1e6]));
    cases.push(store("store_f32_rejects_nan", "f32", vec![1.0, 2.0, f32::NAN]));
    cases.push(store("store_bf16_rejects_inf", "bf16", vec![f32::NEG_INFINITY]));
    // Loads: every bf16 sign/exponent with a few significands, and every binary16
    // pattern class (zeros, subnormals, normals); Inf/NaN are never stored.
    let bf: Vec<u16> = (0..0xff_u16).flat_map(|e| [0u16, 1, 0x7f, 0x40].map(move |m| (e << 7) | m)).flat_map(|h| [h, h | 0x8000]).collect();
    let f16: Vec<u16> = (0..0x1f_u16).flat_map(|e| [0u16, 1, 0x3ff, 0x200, 0x155].map(move |m| (e << 10) | m)).flat_map(|h| [h, h | 0x8000]).collect();
    let mut c = Case::new("load_bf16", "load");
    c.inputs.insert("h".into(), Array::Bf16(bf));
    cases.push(c);
    let mut c = Case::new("load_f16", "load");
    c.inputs.insert("h".into(), Array::F16(f16));
    cases.push(c);
    cases
}

fn offline_cases(salt: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut r = SplitMix64::new(7 ^ salt);
    let n = 160;
    let base: Vec<f32> = (0..n).map(|_| r.spread_f32(115, 128)).collect();
    // Three fine-tuned models: base plus deltas of mixed signs; edge deltas at the
    // front (no change, sign-of-zero and subnormal differences, ties).
    let models: Vec<Vec<f32>> = (0..3)
        .map(|m| {
            let mut x: Vec<f32> = base.iter().map(|&b| b + r.spread_f32(105, 124)).collect();
            x[0] = base[0];
            x[1] = -0.0;
            x[2] = 1e-40;
            x[3] = base[3] + if m == 1 { -0.5 } else { 0.5 };
            x
        })
        .collect();
    let f64s = |v: &[f64]| serde_json::Value::Array(v.iter().map(|&x| f64_param(x)).collect());
    let case = |name: &str, method: &str, k: usize, with_base: bool| {
        let mut c = Case::new(name, "offline");
        c.tensor = Some("model.layers.3.mlp.down_proj.weight".into());
        c.seed = Some(0x5eed);
        c.params.insert("method".into(), method.into());
        c.params.insert("out_dtype".into(), "f32".into());
        for (i, m) in models.iter().take(k).enumerate() {
            c.inputs.insert(format!("model.{i}"), Array::F32(m.clone()));
        }
        if with_base {
            c.inputs.insert("base".into(), Array::F32(base.clone()));
        }
        c
    };
    for (tag, w, norm) in [("normalized", [0.5, 0.3, 0.2], true), ("raw", [1.0, -0.5, 0.25], false)] {
        let mut c = case(&format!("linear_{tag}"), "linear", 3, false);
        c.params.insert("weights".into(), f64s(&w));
        c.params.insert("normalize".into(), norm.into());
        cases.push(c);
    }
    for w in [0.0, 0.3, 1.0] {
        let mut c = case(&format!("interpolate_w{w}"), "interpolate", 2, false);
        c.params.insert("weight".into(), f64_param(w));
        cases.push(c);
    }
    for t in [0.0, 0.25, 0.5, 1.0] {
        let mut c = case(&format!("slerp_t{t}"), "slerp", 2, false);
        c.params.insert("t".into(), f64_param(t));
        cases.push(c);
    }
    // Parallel tensors (b = 2a): |dot| > 0.9995 switches SLERP to linear interpolation.
    let mut c = case("slerp_parallel", "slerp", 1, false);
    c.inputs.insert("model.1".into(), Array::F32(models[0].iter().map(|x| x * 2.0).collect()));
    c.params.insert("t".into(), f64_param(0.4));
    cases.push(c);
    let gta = [
        ("task_arithmetic", "none", false, false, 1.0),
        ("ties", "magnitude", true, true, 1.0),
        ("ties_lambda", "magnitude", true, true, 0.7),
        ("dare_linear", "random", false, false, 1.0),
        ("dare_ties", "random", true, false, 1.0),
        ("dare_ties_normalized", "random", true, true, 0.5),
    ];
    for (tag, sparsify, consensus, normalize, lambda) in gta {
        let mut c = case(&format!("gta_{tag}"), "gta", 3, true);
        c.params.insert("sparsify".into(), sparsify.into());
        c.params.insert("consensus".into(), consensus.into());
        c.params.insert("normalize".into(), normalize.into());
        c.params.insert("lambda".into(), f64_param(lambda));
        c.params.insert("weights".into(), f64s(&[0.5, 0.3, 0.4]));
        c.params.insert("densities".into(), f64s(&[0.3, 0.5, 0.9]));
        cases.push(c);
    }
    // bf16 inputs and output.
    let mut c = case("gta_ties_bf16", "gta", 2, true);
    for key in ["base", "model.0", "model.1"] {
        let bits = half_bits(&mut r, n, true);
        c.inputs.insert(key.into(), Array::Bf16(bits));
    }
    c.params.insert("out_dtype".into(), "bf16".into());
    c.params.insert("sparsify".into(), "magnitude".into());
    c.params.insert("consensus".into(), true.into());
    c.params.insert("normalize".into(), true.into());
    c.params.insert("lambda".into(), f64_param(1.0));
    c.params.insert("weights".into(), f64s(&[1.0, 1.0]));
    c.params.insert("densities".into(), f64s(&[0.2, 0.2]));
    cases.push(c);
    // Global trimming: each model's threshold over its three tensors concatenated
    // in bytewise name order; sizes differ so the offsets matter.
    let mut c = Case::new("ties_global", "ties_global");
    let names = ["lm_head.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"];
    c.params.insert("tensors".into(), serde_json::Value::Array(names.iter().map(|&n| n.into()).collect()));
    c.params.insert("lambda".into(), f64_param(1.0));
    c.params.insert("weights".into(), f64s(&[0.6, 0.4]));
    c.params.insert("densities".into(), f64s(&[0.25, 0.1]));
    for (j, len) in [37usize, 64, 19].into_iter().enumerate() {
        let base: Vec<f32> = (0..len).map(|_| r.spread_f32(115, 128)).collect();
        for i in 0..2 {
            // Tensor j's deltas scaled by 4^j so the global threshold keeps unevenly.
            let scale = (1 << (2 * j)) as f32;
            let m: Vec<f32> = base.iter().map(|&b| b + scale * r.spread_f32(105, 118)).collect();
            c.inputs.insert(format!("t{j}/model.{i}"), Array::F32(m));
        }
        c.inputs.insert(format!("t{j}/base"), Array::F32(base));
    }
    cases.push(c);
    // Rejected inputs.
    let mut c = case("rejects_nan_model", "linear", 3, false);
    if let Some(Array::F32(x)) = c.inputs.get_mut("model.1") {
        x[77] = f32::NAN;
    }
    c.params.insert("weights".into(), f64s(&[0.5, 0.3, 0.2]));
    c.params.insert("normalize".into(), true.into());
    cases.push(c);
    let mut c = case("rejects_zero_weight_sum", "linear", 2, false);
    c.params.insert("weights".into(), f64s(&[0.5, -0.5]));
    c.params.insert("normalize".into(), true.into());
    cases.push(c);
    let mut c = case("rejects_interpolation_weight", "interpolate", 2, false);
    c.params.insert("weight".into(), f64_param(1.5));
    cases.push(c);
    let mut c = case("rejects_f16_overflow", "linear", 2, false);
    c.params.insert("weights".into(), f64s(&[1e5, 1.0]));
    c.params.insert("normalize".into(), false.into());
    c.params.insert("out_dtype".into(), "f16".into());
    cases.push(c);
    let mut c = case("rejects_density_zero", "gta", 2, true);
    c.params.insert("sparsify".into(), "random".into());
    c.params.insert("consensus".into(), false.into());
    c.params.insert("normalize".into(), false.into());
    c.params.insert("lambda".into(), f64_param(1.0));
    c.params.insert("weights".into(), f64s(&[1.0, 1.0]));
    c.params.insert("densities".into(), f64s(&[0.5, 0.0]));
    cases.push(c);
    cases
}

fn ties_combine_cases(salt: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut r = SplitMix64::new(8 ^ salt);
    // Pairs (τ', D'): exact cancellation (elects +1), one or both zero, subnormals
    // (flushed: no sign), sums that flush to zero, equal weighted magnitudes of
    // opposite signs (paper: the positive one), then random pairs.
    let mut tau = vec![1.0f32, -1.0, 0.0, 0.0, -0.0, 2.0, -2.0, 1e-40, -1e-40, 1.5e-38, -3.0, 3.0, 0.25, -0.25, 1e30];
    let mut d = vec![-1.0f32, 1.0, 0.0, -5.0, 5.0, -0.0, 1e-42, -1.0, 1.0, -1.4e-38, 3.0, -3.0, -0.25, 0.25, -1e30];
    for _ in 0..200 {
        tau.push(r.spread_f32(110, 140));
        d.push(if r.next_u64().is_multiple_of(4) { -tau[tau.len() - 1] } else { r.spread_f32(110, 140) });
    }
    for variant in ["reference", "paper"] {
        for (tag, alpha, omega) in [("half", 0.5f32, 0.5f32), ("skewed", 0.3, 0.7), ("paper_defaults", 1e-7, 0.9999999)] {
            let mut c = Case::new(&format!("ties_combine_{variant}_{tag}"), "ties_combine");
            c.params.insert("variant".into(), variant.into());
            c.params.insert("alpha".into(), f32_param(alpha));
            c.params.insert("omega".into(), f32_param(omega));
            c.inputs.insert("tau".into(), Array::F32(tau.clone()));
            c.inputs.insert("d".into(), Array::F32(d.clone()));
            cases.push(c);
        }
    }
    cases
}

/// Every golden file: (file name, what it covers, its cases).
pub fn golden_sets(salt: u64) -> Vec<(&'static str, &'static str, Vec<Case>)> {
    vec![
        ("arith.json", "SPEC.md §1.3-§1.5: + - * / sqrt on binary32, each followed by the flush rule", arith_cases(salt)),
        ("rng.json", "SPEC.md §2: FNV-1a tensor identities, Threefry-2x32-20, mask keys, draws and keep decisions", rng_cases(salt)),
        ("tree_sum.json", "SPEC.md §3: the fixed-tree sum and the L1 norm", tree_sum_cases(salt)),
        ("topk.json", "SPEC.md §4: k = ceil(p n), the threshold (T, c) with the tie rule, per tensor and global", topk_cases(salt)),
        ("dtype.json", "SPEC.md §7: bf16 / f16 / f32 storage: round-to-nearest-even stores, overflow refused, exact loads then F", dtype_cases(salt)),
        ("offline.json", "SPEC.md §6: linear, SFT-RLHF interpolation, SLERP, task arithmetic, TIES, DARE linear, DARE-TIES, rejected inputs", offline_cases(salt)),
        ("ties_combine.json", "SPEC.md §5.3 combine: sign election and the paper's larger-magnitude rule on crafted pairs", ties_combine_cases(salt)),
        ("optimizer.json", "SPEC.md §5: AdamW (hf, torch), OnDARE (reference, paper), step-K, schedules, task-vector dtypes, rejected inputs", optimizer_cases(salt)),
    ]
}
