//! Whole-step properties: reductions to AdamW, chunk invariance, step-K, rescale,
//! and errors, against a direct transcription of SPEC.md §5 written without blocks,
//! generics or the chunk machinery.

use crate::arith::flush as fl;
use crate::dare::{DareConfig, DareVariant};
use crate::dtype::Src;
use crate::error::{Error, tensor_name};
use crate::hyper::{AdamConfig, AdamForm, Schedule};
use crate::onties;
use crate::reference;
use crate::optim::{Merge, OnlineConfig, Optimizer, Scope, StepJob, StepPlan, TaskVectorJob, TiesConfig};
use crate::dtype::Dst;
use crate::step::MergePlan;
use crate::topk::magnitude_key;
use crate::rng::{MaskKey, tensor_id};
use crate::step::{Norms, Phase, StateMut, StateRef};
use crate::rng::SplitMix64;
use crate::testutil::wide_f32;
use std::vec;
use std::vec::Vec;

extern crate std;

#[derive(Clone, Debug, PartialEq)]
struct State {
    theta: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    cached: Vec<f32>,
}

fn a(x: f32, y: f32) -> f32 { fl(x + y) }
fn s_(x: f32, y: f32) -> f32 { fl(x - y) }
fn m_(x: f32, y: f32) -> f32 { fl(x * y) }
fn d_(x: f32, y: f32) -> f32 { fl(x / y) }

fn l1(xs: &[f32]) -> f32 {
    // The definition: pad to a power of two, pairwise levels.
    let mut n = 1;
    while n < xs.len() { n *= 2; }
    let mut level: Vec<f32> = xs.iter().map(|x| fl(x.abs())).collect();
    level.resize(n, 0.0);
    while level.len() > 1 {
        level = level.chunks(2).map(|p| a(p[0], p[1])).collect();
    }
    level[0]
}

/// One step of one tensor (per-tensor scope) through the plain reference of
/// SPEC.md §5, `crate::reference`; the cached delta is always given.
fn reference_step(cfg: &OnlineConfig, k: u64, name: &str, g: &[f32], st: &mut State, tau: &[f32]) {
    let ties = if matches!(cfg.merge, Merge::Ties(_)) && k.is_multiple_of(u64::from(cfg.k)) {
        let mut d = vec![0.0f32; g.len()];
        reference::update(cfg, k, g, StateRef { theta: &st.theta, m: &st.m, v: &st.v, cached: Some(&st.cached) }, &mut d).unwrap();
        Some((reference::ties_selection(cfg, &[&d]).unwrap(), 0))
    } else {
        None
    };
    let state = StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached: Some(&mut st.cached) };
    reference::step(cfg, k, name, g, state, tau, ties).unwrap();
}

/// Which elements of the concatenation keep: the `⌈p·n⌉` largest keys, ties to
/// the lowest index, by sorting (independent of the radix select).
fn naive_top_k(parts: &[&[f32]], p: f32) -> Vec<bool> {
    let all: Vec<f32> = parts.iter().flat_map(|x| x.iter().copied()).collect();
    let n = all.len();
    let k = ((f64::from(p) * n as f64).ceil() as usize).clamp(1, n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (core::cmp::Reverse(magnitude_key(all[i])), i));
    let mut kept = vec![false; n];
    for &i in &order[..k] {
        kept[i] = true;
    }
    kept
}

fn random_state(rng: &mut SplitMix64, n: usize) -> (Vec<f32>, State, Vec<f32>) {
    let g: Vec<f32> = (0..n).map(|_| rng.uniform_f32(1.0) * 1e-2).collect();
    let theta: Vec<f32> = (0..n).map(|_| rng.uniform_f32(1.0)).collect();
    let tau: Vec<f32> = (0..n).map(|_| rng.uniform_f32(1.0) * 1e-3).collect();
    (g, State { theta, m: vec![0.0; n], v: vec![0.0; n], cached: vec![0.0; n] }, tau)
}

/// One tensor through the optimizer front: a one-element `step_tensors`.
trait StepOne {
    fn step_one(&self, name: &str, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, scratch: &mut [f32]) -> Result<(), Error>;
}

impl StepOne for StepPlan {
    fn step_one(&self, name: &str, grad: &[f32], state: StateMut<'_>, tau: Src<'_>, scratch: &mut [f32]) -> Result<(), Error> {
        self.step_tensors(&mut [StepJob { name, grad, state, tau, scratch }])
    }
}

/// Runs `steps` steps through the optimizer front, whole tensors.
fn run_front(cfg: &OnlineConfig, steps: u64, name: &str, grads: &[Vec<f32>], st: &mut State, tau: &[f32]) {
    let mut opt = Optimizer::new(*cfg).unwrap();
    for k in 0..steps {
        let plan = opt.begin_step().unwrap();
        let cached = if opt.needs_cached_delta() { Some(&mut st.cached[..]) } else { None };
        let mut scratch = vec![f32::NAN; tau.len()];
        plan.step_one(name, &grads[k as usize], StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached }, Src::F32(tau), &mut scratch).unwrap();
    }
}

fn configs() -> Vec<OnlineConfig> {
    let mut out = Vec::new();
    for form in [AdamForm::HuggingFace, AdamForm::Torch] {
        let adam = AdamConfig { form, lr: 1e-3, weight_decay: 0.01, schedule: Schedule::WarmupCosine { warmup: 2, total: 10 }, ..AdamConfig::default() };
        for variant in [DareVariant::Reference, DareVariant::Paper] {
            for rescale in [false, true] {
                for k in [1, 3] {
                    let dare = DareConfig { variant, p: 0.3, alpha: 0.25, rescale, clip: 1e-3 };
                    out.push(OnlineConfig { adam, merge: Merge::Dare(dare), k, seed: 0xdead_beef_0bad_cafe });
                }
            }
        }
        for variant in [onties::Variant::Reference, onties::Variant::Paper] {
            for rescale in [false, true] {
                for k in [1, 3] {
                    let ties = TiesConfig { variant, p: 0.3, alpha: 0.25, rescale, scope: Scope::PerTensor };
                    out.push(OnlineConfig { adam, merge: Merge::Ties(ties), k, seed: 5 });
                }
            }
        }
        out.push(OnlineConfig { adam, merge: Merge::None, k: 1, seed: 1 });
        out.push(OnlineConfig { adam, merge: Merge::None, k: 2, seed: 1 });
    }
    out
}

#[test]
fn the_front_matches_the_formulas_for_every_configuration() {
    let mut rng = SplitMix64::new(1);
    let n = 1000;
    for cfg in configs() {
        let (_, st0, tau) = random_state(&mut rng, n);
        let grads: Vec<Vec<f32>> = (0..7).map(|_| (0..n).map(|_| rng.uniform_f32(1.0) * 1e-2).collect()).collect();
        let mut got = st0.clone();
        run_front(&cfg, 7, "model.layers.3.w", &grads, &mut got, &tau);
        let mut want = st0.clone();
        for k in 1..=7 {
            reference_step(&cfg, k, "model.layers.3.w", &grads[k as usize - 1], &mut want, &tau);
        }
        if cfg.k == 1 {
            // Online steps never touch the cached delta.
            want.cached = st0.cached.clone();
        }
        assert_eq!(bits(&got.theta), bits(&want.theta), "{cfg:?}");
        assert_eq!(bits(&got.m), bits(&want.m), "{cfg:?}");
        assert_eq!(bits(&got.v), bits(&want.v), "{cfg:?}");
        assert_eq!(bits(&got.cached), bits(&want.cached), "{cfg:?}");
        assert_ne!(got.theta, st0.theta);
    }
}

fn bits(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn p_one_alpha_zero_is_adamw_bit_for_bit() {
    let mut rng = SplitMix64::new(2);
    let n = 777;
    for form in [AdamForm::HuggingFace, AdamForm::Torch] {
        let adam = AdamConfig { form, lr: 3e-3, weight_decay: 0.1, ..AdamConfig::default() };
        let plain = OnlineConfig { adam, merge: Merge::None, k: 1, seed: 9 };
        let (_, st0, tau) = random_state(&mut rng, n);
        let grads: Vec<Vec<f32>> = (0..4).map(|_| (0..n).map(|_| wide_f32(&mut rng)).collect()).collect();
        let mut want = st0.clone();
        run_front(&plain, 4, "t", &grads, &mut want, &tau);
        for variant in [DareVariant::Reference, DareVariant::Paper] {
            let dare = DareConfig { variant, p: 1.0, alpha: 0.0, rescale: false, clip: 1.0 };
            let mut got = st0.clone();
            run_front(&OnlineConfig { merge: Merge::Dare(dare), ..plain }, 4, "t", &grads, &mut got, &tau);
            assert_eq!(bits(&got.theta), bits(&want.theta), "{form:?} {variant:?}");
            assert_eq!(bits(&got.m), bits(&want.m));
        }
        // OnTIES: the paper variant reduces to AdamW (SPEC.md §5.3); the reference
        // variant does not, by design (it drops D where τ' wins the election).
        let ties = TiesConfig { variant: onties::Variant::Paper, p: 1.0, alpha: 0.0, rescale: false, scope: Scope::PerTensor };
        let mut got = st0.clone();
        run_front(&OnlineConfig { merge: Merge::Ties(ties), ..plain }, 4, "t", &grads, &mut got, &tau);
        assert_eq!(bits(&got.theta), bits(&want.theta), "{form:?} OnTIES paper");
    }
}

#[test]
fn k_equal_one_with_a_cached_slice_is_online_merging() {
    let mut rng = SplitMix64::new(3);
    let n = 300;
    let cfg = OnlineConfig { merge: Merge::Dare(DareConfig { p: 0.5, alpha: 0.1, rescale: true, ..DareConfig::default() }), ..OnlineConfig::default() };
    let (g, st0, tau) = random_state(&mut rng, n);
    let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
    assert_eq!(plan.phase(), Phase::Merge);
    let mut online = st0.clone();
    plan.step_one("w", &g, StateMut { theta: &mut online.theta, m: &mut online.m, v: &mut online.v, cached: None }, Src::F32(&tau), &mut []).unwrap();
    let mut with_cache = st0.clone();
    plan.step_one("w", &g, StateMut { theta: &mut with_cache.theta, m: &mut with_cache.m, v: &mut with_cache.v, cached: Some(&mut with_cache.cached) }, Src::F32(&tau), &mut []).unwrap();
    assert_eq!(bits(&online.theta), bits(&with_cache.theta));
    assert_eq!(with_cache.cached, vec![0.0; n]);
}

#[test]
fn step_k_rolls_back_to_the_direct_formula() {
    // K = 3, lr constant, no decay, p = 1, α = 0: two plain steps, then the third
    // rolls both back and applies Δ3 ⊕ (Δ1 ⊕ Δ2). The Adam deltas come from the
    // moments of a plain run.
    let mut rng = SplitMix64::new(4);
    let n = 64;
    let adam = AdamConfig { lr: 1e-2, ..AdamConfig::default() };
    let cfg = OnlineConfig { adam, merge: Merge::Dare(DareConfig { p: 1.0, alpha: 0.0, ..DareConfig::default() }), k: 3, seed: 0 };
    let (_, st0, tau) = random_state(&mut rng, n);
    let grads: Vec<Vec<f32>> = (0..3).map(|_| (0..n).map(|_| rng.uniform_f32(1.0)).collect()).collect();
    let mut got = st0.clone();
    run_front(&cfg, 3, "w", &grads, &mut got, &tau);
    // Direct: the Adam deltas of the three steps from the moments alone.
    let mut plain = st0.clone();
    let mut deltas = vec![vec![0.0f32; n]; 3];
    for k in 1..=3u64 {
        reference_step(&OnlineConfig { merge: Merge::None, k: 1, ..cfg }, k, "w", &grads[k as usize - 1], &mut plain, &tau);
        let s = adam.scalars(k).unwrap();
        for i in 0..n {
            let root = fl(libm::sqrtf(plain.v[i]));
            deltas[k as usize - 1][i] = m_(s.neg_step_size, d_(plain.m[i], a(root, s.eps)));
        }
    }
    for i in 0..n {
        let t1 = a(st0.theta[i], deltas[0][i]);
        let t2 = a(t1, deltas[1][i]);
        let c = a(deltas[0][i], deltas[1][i]);
        let want = a(s_(t2, c), a(deltas[2][i], c));
        assert_eq!(got.theta[i].to_bits(), want.to_bits(), "i={i}");
        assert_eq!(got.cached[i].to_bits(), 0);
    }
    // After two steps the cache holds Δ1 ⊕ Δ2 and θ has taken both plain steps.
    let mut two = st0.clone();
    run_front(&cfg, 2, "w", &grads, &mut two, &tau);
    for i in 0..n {
        assert_eq!(two.cached[i].to_bits(), a(deltas[0][i], deltas[1][i]).to_bits());
        assert_eq!(two.theta[i].to_bits(), a(a(st0.theta[i], deltas[0][i]), deltas[1][i]).to_bits());
    }
}

/// Runs one step through the chunk passes with the given cut points.
fn step_in_chunks(cfg: &OnlineConfig, k: u64, name: &str, g: &[f32], st: &mut State, tau: &[f32], cuts: &[usize]) {
    let opt = Optimizer::new(*cfg).unwrap();
    let plan = opt.plan(k).unwrap();
    let mut ts = plan.tensor(name, g.len() as u64).unwrap();
    let bounds: Vec<(usize, usize)> = {
        let mut b = Vec::new();
        let mut at = 0;
        for &c in cuts.iter().chain(core::iter::once(&g.len())) {
            if c > at { b.push((at, c)); at = c; }
        }
        b
    };
    let cached = opt.needs_cached_delta();
    if plan.needs_norms() {
        let mut norms = Norms::default();
        for &(lo, hi) in &bounds {
            let view = StateRef { theta: &st.theta[lo..hi], m: &st.m[lo..hi], v: &st.v[lo..hi], cached: cached.then(|| &st.cached[lo..hi]) };
            ts.scan_chunk(lo as u64, &g[lo..hi], view, Src::F32(&tau[lo..hi]), Some(&mut norms), None).unwrap();
        }
        ts.rescale = norms.rescale(name, plan.scalars().eps, plan.clip()).unwrap();
    }
    let mut update = None;
    if plan.needs_update_scratch() {
        let mut scratch = vec![0.0f32; g.len()];
        for &(lo, hi) in &bounds {
            let view = StateRef { theta: &st.theta[lo..hi], m: &st.m[lo..hi], v: &st.v[lo..hi], cached: cached.then(|| &st.cached[lo..hi]) };
            ts.scan_chunk(lo as u64, &g[lo..hi], view, Src::F32(&tau[lo..hi]), None, Some(&mut scratch[lo..hi])).unwrap();
        }
        let sel = plan.ties_selection(name, &[&scratch]).unwrap();
        if let MergePlan::Ties { selection, .. } = &mut ts.merge {
            *selection = Some(sel);
        }
        update = Some(scratch);
    }
    for &(lo, hi) in &bounds {
        let view = StateRef { theta: &st.theta[lo..hi], m: &st.m[lo..hi], v: &st.v[lo..hi], cached: cached.then(|| &st.cached[lo..hi]) };
        ts.check_chunk(lo as u64, &g[lo..hi], view, Src::F32(&tau[lo..hi])).unwrap();
    }
    for (i, &(lo, hi)) in bounds.iter().enumerate() {
        let State { theta, m, v, cached: c } = st;
        let view = StateMut { theta: &mut theta[lo..hi], m: &mut m[lo..hi], v: &mut v[lo..hi], cached: cached.then(|| &mut c[lo..hi]) };
        match &update {
            // With cut points, OnTIES alternates the two writers chunk by chunk (the
            // whole-tensor run uses `write_chunk`): the bits must not depend on which ran.
            Some(d) if !cuts.is_empty() && i % 2 == 0 => ts.write_chunk_from_update(lo as u64, &g[lo..hi], view, Src::F32(&tau[lo..hi]), &d[lo..hi], None).unwrap(),
            _ => ts.write_chunk(lo as u64, &g[lo..hi], view, Src::F32(&tau[lo..hi])).unwrap(),
        }
    }
}

#[test]
fn chunking_at_random_cut_points_changes_no_bit() {
    let mut rng = SplitMix64::new(5);
    let n = 2049;
    for cfg in configs() {
        let (g, st0, tau) = random_state(&mut rng, n);
        let k = if cfg.k == 3 { 3 } else { 2 };
        let mut whole = st0.clone();
        step_in_chunks(&cfg, k, "emb", &g, &mut whole, &tau, &[]);
        for _ in 0..4 {
            let mut cuts: Vec<usize> = (0..1 + rng.next_u32() % 12).map(|_| (rng.next_u32() as usize) % n).collect();
            cuts.sort();
            let mut chunked = st0.clone();
            step_in_chunks(&cfg, k, "emb", &g, &mut chunked, &tau, &cuts);
            assert_eq!(bits(&chunked.theta), bits(&whole.theta), "{cfg:?} cuts {cuts:?}");
            assert_eq!(bits(&chunked.m), bits(&whole.m), "{cfg:?} cuts {cuts:?}");
            assert_eq!(bits(&chunked.v), bits(&whole.v), "{cfg:?} cuts {cuts:?}");
            assert_eq!(bits(&chunked.cached), bits(&whole.cached));
        }
    }
}

#[test]
fn masks_keep_about_p_and_depend_on_step_and_name() {
    let n = 1 << 20;
    let cfg = OnlineConfig {
        adam: AdamConfig { lr: 1.0, ..AdamConfig::default() },
        merge: Merge::Dare(DareConfig { p: 0.01, alpha: 0.0, ..DareConfig::default() }),
        ..OnlineConfig::default()
    };
    let g = vec![1.0f32; n];
    let tau = vec![0.0f32; n];
    let moved = |name: &str, k: u64| -> Vec<bool> {
        let mut st = State { theta: vec![0.0; n], m: vec![0.0; n], v: vec![0.0; n], cached: vec![] };
        Optimizer::new(cfg).unwrap().plan(k).unwrap()
            .step_one(name, &g, StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached: None }, Src::F32(&tau), &mut [])
            .unwrap();
        st.theta.iter().map(|&t| t != 0.0).collect()
    };
    let a1 = moved("a", 1);
    let kept = a1.iter().filter(|&&b| b).count() as f64;
    let mean = 0.01 * n as f64;
    let sd = libm::sqrt(mean * 0.99);
    assert!((kept - mean).abs() < 6.0 * sd, "kept {kept} of {n}");
    assert_ne!(a1, moved("a", 2));
    assert_ne!(a1, moved("b", 1));
}

#[test]
fn non_finite_inputs_and_outputs_name_the_lowest_index_and_write_nothing() {
    let mut rng = SplitMix64::new(6);
    let n = 500;
    let cfg = OnlineConfig { merge: Merge::Dare(DareConfig { p: 0.5, ..DareConfig::default() }), ..OnlineConfig::default() };
    let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
    let cases: [(usize, &str, f32, usize, &str); 4] = [
        (0, "gradient", f32::NAN, 37, "gradient"),
        (1, "parameter", f32::INFINITY, 300, "parameter"),
        (2, "exp_avg_sq", f32::NEG_INFINITY, 499, "exp_avg_sq"),
        // A gradient whose square overflows: v' = Inf.
        (0, "gradient", 3e20, 130, "updated exp_avg_sq"),
    ];
    for (slot, _, bad, at, what) in cases {
        let (mut g, mut st, tau) = random_state(&mut rng, n);
        match slot {
            0 => g[at] = bad,
            1 => st.theta[at] = bad,
            _ => st.v[at] = bad,
        }
        // A second bad value later must not be the one reported.
        if at + 1 < n {
            g[n - 1] = f32::NAN;
        }
        let before = st.clone();
        let err = plan.step_one("blk.0", &g, StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached: None }, Src::F32(&tau), &mut []).unwrap_err();
        assert_eq!(err, Error::NonFinite { tensor: tensor_name("blk.0"), what, index: at as u64 });
        assert_eq!(st, before, "nothing written");
    }
}

#[test]
fn edge_values_stay_finite_flushed_and_positive_zero() {
    let cfg = OnlineConfig { merge: Merge::Dare(DareConfig { p: 1.0, alpha: 0.5, ..DareConfig::default() }), ..OnlineConfig::default() };
    let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
    let sub = f32::from_bits(0x0000_0001);
    let g = [0.0, -0.0, sub, -sub, 1e-30, -1e18, f32::MAX, f32::MIN_POSITIVE];
    let mut theta = [-0.0, 0.0, sub, 1.0, -1e-38, 1e38, 0.0, -sub];
    let mut m = [0.0f32; 8];
    let mut v = [0.0f32; 8];
    let tau = [-0.0, sub, 0.0, 0.0, 0.0, 0.0, 0.0, 1e-38];
    // f32::MAX squared overflows v: refused at index 6.
    let err = plan.step_one("e", &g, StateMut { theta: &mut theta, m: &mut m, v: &mut v, cached: None }, Src::F32(&tau), &mut []).unwrap_err();
    assert!(matches!(err, Error::NonFinite { index: 6, what: "updated exp_avg_sq", .. }), "{err:?}");
    let g = [0.0, -0.0, sub, -sub, 1e-30, -1e18, 1e18, f32::MIN_POSITIVE];
    plan.step_one("e", &g, StateMut { theta: &mut theta, m: &mut m, v: &mut v, cached: None }, Src::F32(&tau), &mut []).unwrap();
    for x in theta.iter().chain(&m).chain(&v) {
        assert!(x.is_finite());
        assert!(x.to_bits() == 0 || x.to_bits() & 0x7f80_0000 != 0, "no subnormal or -0: {:#x}", x.to_bits());
    }
    // ±0 and subnormal inputs with zero gradient leave +0.
    assert_eq!(theta[0].to_bits(), 0);
    assert_eq!(theta[2].to_bits(), 0);
}

#[test]
fn bad_configurations_are_named() {
    let e = Optimizer::new(OnlineConfig { k: 0, ..OnlineConfig::default() }).unwrap_err();
    assert!(matches!(e, Error::InvalidHyperparameter { name: "k (merge every k steps)", .. }));
    let e = Optimizer::new(OnlineConfig { merge: Merge::Dare(DareConfig { p: 2.0, ..DareConfig::default() }), ..OnlineConfig::default() }).unwrap_err();
    assert!(matches!(e, Error::InvalidHyperparameter { name: "p (reserve rate)", .. }));
    let opt = Optimizer::new(OnlineConfig { k: 2, ..OnlineConfig::default() }).unwrap();
    let plan = opt.plan(1).unwrap();
    let (mut t, mut m, mut v) = ([0.0f32; 3], [0.0f32; 3], [0.0f32; 3]);
    let e = plan.step_one("w", &[0.0; 3], StateMut { theta: &mut t, m: &mut m, v: &mut v, cached: None }, Src::F32(&[0.0; 3]), &mut []).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "cached delta (required when k > 1)", .. }));
    let e = plan.step_one("w", &[0.0; 3], StateMut { theta: &mut t, m: &mut m[..2], v: &mut v, cached: Some(&mut [0.0; 3]) }, Src::F32(&[0.0; 3]), &mut []).unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "exp_avg", expected: 3, found: 2, .. }));
}

#[test]
fn global_ties_trims_the_concatenation_in_name_order() {
    let mut rng = SplitMix64::new(8);
    let names = ["a.bias", "a.weight", "b.weight"];
    let sizes = [7usize, 300, 129];
    for variant in [onties::Variant::Reference, onties::Variant::Paper] {
        for rescale in [false, true] {
            let ties = TiesConfig { variant, p: 0.05, alpha: 0.3, rescale, scope: Scope::Global };
            let cfg = OnlineConfig { adam: AdamConfig { lr: 1e-3, ..AdamConfig::default() }, merge: Merge::Ties(ties), k: 1, seed: 3 };
            let opt = Optimizer::new(cfg).unwrap();
            let mut states: Vec<(Vec<f32>, State, Vec<f32>)> = sizes.iter().map(|&n| random_state(&mut rng, n)).collect();
            // Scale the tensors differently so the global threshold is not per-tensor.
            for (t, (g, _, _)) in states.iter_mut().enumerate() {
                for x in g.iter_mut() { *x *= [1.0, 0.01, 3.0][t]; }
            }
            let before: Vec<State> = states.iter().map(|s| s.1.clone()).collect();
            let mut scratches: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
            {
                let plan = opt.plan(1).unwrap();
                let mut jobs: Vec<StepJob<'_>> = states.iter_mut().zip(scratches.iter_mut()).zip(names).map(|(((g, st, tau), scr), name)| StepJob {
                    name, grad: g, state: StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached: None }, tau: Src::F32(tau), scratch: scr,
                }).collect();
                plan.step_tensors(&mut jobs).unwrap();
                // Out of order: refused.
                jobs.swap(0, 2);
                assert!(matches!(plan.step_tensors(&mut jobs), Err(Error::Misuse { .. })));
            }
            // Reference: the Adam deltas, one top-k over the concatenation.
            let s = cfg.adam.scalars(1).unwrap();
            let deltas: Vec<Vec<f32>> = states.iter().zip(&before).map(|((g, _, _), st)| {
                (0..g.len()).map(|i| {
                    let m1 = a(m_(s.beta1, st.m[i]), m_(s.one_minus_beta1, g[i]));
                    let v1 = a(m_(s.beta2, st.v[i]), m_(s.one_minus_beta2, m_(g[i], g[i])));
                    m_(s.neg_step_size, d_(m1, a(fl(libm::sqrtf(v1)), s.eps)))
                }).collect()
            }).collect();
            let parts: Vec<&[f32]> = deltas.iter().map(|d| &d[..]).collect();
            let kept = naive_top_k(&parts, 0.05);
            let all: Vec<f32> = parts.concat();
            let mut sel: Vec<f32> = all.iter().zip(&kept).map(|(&d, &k)| if k { d } else { 0.0 }).collect();
            if rescale {
                let r = d_(l1(&all), l1(&sel));
                for x in sel.iter_mut() { *x = m_(*x, r); }
            }
            let mut at = 0;
            for (t, (_, st, tau)) in states.iter().enumerate() {
                for i in 0..sizes[t] {
                    let u = onties::combine(variant, tau[i], sel[at + i], fl(0.3f32), fl((1.0 - 0.3f64) as f32));
                    let want = a(before[t].theta[i], u);
                    assert_eq!(st.theta[i].to_bits(), want.to_bits(), "{variant:?} {rescale} {} [{i}]", names[t]);
                }
                at += sizes[t];
            }
        }
    }
}

#[test]
fn ties_task_vectors_per_tensor_and_global() {
    let mut rng = SplitMix64::new(9);
    let sizes = [50usize, 200];
    let bases: Vec<Vec<f32>> = sizes.iter().map(|&n| (0..n).map(|_| rng.uniform_f32(1.0)).collect()).collect();
    let sfts: Vec<Vec<f32>> = bases.iter().map(|b| b.iter().map(|&x| x + rng.uniform_f32(1.0) * [1e-3, 1e-1][b.len() / 200]).collect()).collect();
    for scope in [Scope::PerTensor, Scope::Global] {
        let cfg = OnlineConfig { merge: Merge::Ties(TiesConfig { p: 0.1, scope, rescale: true, ..TiesConfig::default() }), ..OnlineConfig::default() };
        let opt = Optimizer::new(cfg).unwrap();
        let mut outs: Vec<Vec<u16>> = sizes.iter().map(|&n| vec![0u16; n]).collect();
        let mut scratches: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        let mut jobs: Vec<TaskVectorJob<'_>> = outs.iter_mut().zip(scratches.iter_mut()).enumerate().map(|(t, (o, s))| TaskVectorJob {
            name: ["x", "y"][t], base: Src::F32(&bases[t]), sft: Src::F32(&sfts[t]), out: Dst::Bf16(o), scratch: s,
        }).collect();
        opt.init_task_vectors(&mut jobs).unwrap();
        drop(jobs);
        let taus: Vec<Vec<f32>> = bases.iter().zip(&sfts).map(|(b, f)| b.iter().zip(f).map(|(&b, &f)| s_(f, b)).collect()).collect();
        let groups: Vec<Vec<usize>> = if scope == Scope::Global { vec![vec![0, 1]] } else { vec![vec![0], vec![1]] };
        for group in groups {
            let parts: Vec<&[f32]> = group.iter().map(|&t| &taus[t][..]).collect();
            let kept = naive_top_k(&parts, 0.1);
            let all: Vec<f32> = parts.concat();
            let sel: Vec<f32> = all.iter().zip(&kept).map(|(&x, &k)| if k { x } else { 0.0 }).collect();
            let r = d_(l1(&all), l1(&sel));
            let mut at = 0;
            for &t in &group {
                for i in 0..sizes[t] {
                    let want = half::bf16::from_f32(m_(sel[at + i], r)).to_bits();
                    assert_eq!(outs[t][i], want, "{scope:?} tensor {t} [{i}]");
                }
                at += sizes[t];
            }
        }
    }
}

#[test]
fn the_single_pass_out_of_place_chunk_equals_the_in_place_step_and_spares_the_input() {
    let mut rng = SplitMix64::new(10);
    let n = 999;
    for merge in [Merge::None, Merge::Dare(DareConfig { p: 0.4, alpha: 0.1, ..DareConfig::default() }), Merge::Dare(DareConfig { variant: DareVariant::Paper, p: 0.4, alpha: 0.1, ..DareConfig::default() })] {
        for k in [1u32, 2] {
            let cfg = OnlineConfig { merge, k, ..OnlineConfig::default() };
            let opt = Optimizer::new(cfg).unwrap();
            let (g, st0, tau) = random_state(&mut rng, n);
            for step in [1u64, 2] {
                let plan = opt.plan(step).unwrap();
                let mut inplace = st0.clone();
                let cached = (k > 1).then(|| &mut inplace.cached[..]);
                plan.step_one("w", &g, StateMut { theta: &mut inplace.theta, m: &mut inplace.m, v: &mut inplace.v, cached }, Src::F32(&tau), &mut []).unwrap();
                let mut out = State { theta: vec![f32::NAN; n], m: vec![f32::NAN; n], v: vec![f32::NAN; n], cached: vec![f32::NAN; n] };
                let old = StateRef { theta: &st0.theta, m: &st0.m, v: &st0.v, cached: (k > 1).then(|| &st0.cached[..]) };
                let new = StateMut { theta: &mut out.theta, m: &mut out.m, v: &mut out.v, cached: (k > 1).then(|| &mut out.cached[..]) };
                plan.tensor("w", n as u64).unwrap().write_chunk_into(0, &g, old, Src::F32(&tau), new).unwrap();
                if k == 1 {
                    out.cached = inplace.cached.clone();
                }
                assert_eq!(out, inplace, "{merge:?} k={k} step {step}");
            }
        }
    }
    // A failing step leaves the input alone and names the lowest index.
    let opt = Optimizer::new(OnlineConfig::default()).unwrap();
    let (mut g, st0, tau) = random_state(&mut rng, n);
    g[700] = f32::INFINITY;
    g[900] = f32::NAN;
    let mut out = st0.clone();
    let err = opt.plan(1).unwrap().tensor("w", n as u64).unwrap()
        .write_chunk_into(0, &g, StateRef { theta: &st0.theta, m: &st0.m, v: &st0.v, cached: None }, Src::F32(&tau), StateMut { theta: &mut out.theta, m: &mut out.m, v: &mut out.v, cached: None })
        .unwrap_err();
    assert_eq!(err, Error::NonFinite { tensor: tensor_name("w"), what: "gradient", index: 700 });
}

#[test]
fn a_dropped_element_whose_kept_value_would_overflow_is_no_error() {
    // s = RN(1/p) = 1e30 and |D| ≈ lr = 1e10: every kept D ⊗ s overflows, but
    // with p = 1e-30 the threshold is 0 and nothing is kept, so the step is fine;
    // the check pass must fall back to the real masks rather than refuse.
    let mut rng = SplitMix64::new(11);
    let n = 600;
    let cfg = OnlineConfig {
        adam: AdamConfig { lr: 1e10, ..AdamConfig::default() },
        merge: Merge::Dare(DareConfig { p: 1e-30, alpha: 0.0, ..DareConfig::default() }),
        ..OnlineConfig::default()
    };
    let (g, st0, tau) = random_state(&mut rng, n);
    let mut got = st0.clone();
    run_front(&cfg, 1, "w", std::slice::from_ref(&g), &mut got, &tau);
    let mut want = st0.clone();
    reference_step(&cfg, 1, "w", &g, &mut want, &tau);
    want.cached = st0.cached.clone();
    assert_eq!(got, want);
    assert_eq!(got.theta, st0.theta, "nothing kept, no decay: θ unchanged");
    // With p = 0.5 half the elements are kept and overflow: refused, lowest index.
    let cfg = OnlineConfig { merge: Merge::Dare(DareConfig { p: 0.5, alpha: 0.0, ..DareConfig::default() }), adam: AdamConfig { lr: 2e38, ..AdamConfig::default() }, ..cfg };
    let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
    let key = MaskKey::new(0, tensor_id("w"), 1);
    let first_kept = (0..n as u32).find(|&i| key.uniform(i, 0) < (1u32 << 31)).unwrap();
    let mut st = st0.clone();
    let err = plan.step_one("w", &g, StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached: None }, Src::F32(&tau), &mut []).unwrap_err();
    assert_eq!(err, Error::NonFinite { tensor: tensor_name("w"), what: "sparsified update", index: u64::from(first_kept) });
    assert_eq!(st, st0);
}

#[test]
fn ties_validates_the_new_parameter_before_writing() {
    let mut rng = SplitMix64::new(12);
    let n = 700;
    let ties = TiesConfig { p: 0.1, alpha: 1.0, ..TiesConfig::default() };
    let cfg = OnlineConfig { merge: Merge::Ties(ties), ..OnlineConfig::default() };
    let plan = Optimizer::new(cfg).unwrap().plan(1).unwrap();
    let (g, mut st0, mut tau) = random_state(&mut rng, n);
    // θ + α τ' overflows at 600 and 650 (α = 1, τ' elected: D' is +0 or small).
    for i in [650, 600] {
        st0.theta[i] = f32::MAX;
        tau[i] = 1e38;
    }
    let mut st = st0.clone();
    let mut scratch = vec![0.0f32; n];
    let err = plan
        .step_one("t", &g, StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached: None }, Src::F32(&tau), &mut scratch)
        .unwrap_err();
    assert_eq!(err, Error::NonFinite { tensor: tensor_name("t"), what: "updated parameter", index: 600 });
    assert_eq!(st, st0);
    // An update-stage failure (a non-finite gradient) is reported even at a higher
    // index: it is validated over the whole tensor before the trimming (SPEC.md §5.6).
    let mut g2 = g.clone();
    g2[690] = f32::NAN;
    let err = plan
        .step_one("t", &g2, StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached: None }, Src::F32(&tau), &mut scratch)
        .unwrap_err();
    assert_eq!(err, Error::NonFinite { tensor: tensor_name("t"), what: "gradient", index: 690 });
    assert_eq!(st, st0);
}

#[test]
fn steps_that_read_no_task_vector_accept_an_empty_one() {
    // Plain AdamW, and step-K's accumulating steps, never read τ': a host without
    // SFT/base models passes an empty one. A merging step still refuses it by name.
    let mut rng = SplitMix64::new(12);
    let n = 700;
    let (g, st0, tau) = random_state(&mut rng, n);
    let dare = Merge::Dare(DareConfig { p: 0.4, alpha: 0.1, ..DareConfig::default() });
    for (merge, k, step) in [(Merge::None, 1u32, 1u64), (Merge::None, 2, 1), (dare, 2, 1)] {
        let plan = Optimizer::new(OnlineConfig { merge, k, ..OnlineConfig::default() }).unwrap().plan(step).unwrap();
        let run = |tau: &[f32]| {
            let mut st = st0.clone();
            let cached = (k > 1).then(|| &mut st.cached[..]);
            plan.step_one("w", &g, StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached }, Src::F32(tau), &mut []).unwrap();
            let mut out = State { theta: vec![f32::NAN; n], m: vec![f32::NAN; n], v: vec![f32::NAN; n], cached: vec![f32::NAN; n] };
            let old = StateRef { theta: &st0.theta, m: &st0.m, v: &st0.v, cached: (k > 1).then(|| &st0.cached[..]) };
            let new = StateMut { theta: &mut out.theta, m: &mut out.m, v: &mut out.v, cached: (k > 1).then(|| &mut out.cached[..]) };
            plan.tensor("w", n as u64).unwrap().write_chunk_into(0, &g, old, Src::F32(tau), new).unwrap();
            (st, out)
        };
        let (full_inplace, full_into) = run(&tau);
        let (empty_inplace, empty_into) = run(&[]);
        assert_eq!(empty_inplace, full_inplace, "{merge:?} k={k}");
        assert_eq!(bits(&empty_into.theta), bits(&full_into.theta), "{merge:?} k={k}");
    }
    let plan = Optimizer::new(OnlineConfig { merge: dare, ..OnlineConfig::default() }).unwrap().plan(1).unwrap();
    let mut st = st0.clone();
    let err = plan.step_one("w", &g, StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached: None }, Src::F32(&[]), &mut []).unwrap_err();
    assert_eq!(err, Error::LengthMismatch { tensor: tensor_name("w"), what: "task vector", expected: n as u64, found: 0 });
    assert_eq!(st, st0);
}

/// Steps three tensors through `step_tensors` (names in bytewise order, each with
/// its own scratch); `Err` leaves the states as the call left them.
fn step_three(plan: &crate::optim::StepPlan, grads: &[Vec<f32>], states: &mut [State], taus: &[Vec<f32>], cached: bool) -> Result<(), Error> {
    const NAMES: [&str; 3] = ["a.w", "b.w", "c.w"];
    let mut scratches: Vec<Vec<f32>> = grads.iter().map(|g| vec![f32::NAN; g.len()]).collect();
    let mut jobs: Vec<StepJob<'_>> = states
        .iter_mut()
        .zip(scratches.iter_mut())
        .enumerate()
        .map(|(i, (st, scratch))| StepJob {
            name: NAMES[i],
            grad: &grads[i],
            state: StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached: if cached { Some(&mut st.cached[..]) } else { None } },
            tau: Src::F32(&taus[i]),
            scratch,
        })
        .collect();
    plan.step_tensors(&mut jobs)
}

#[test]
fn several_tensors_step_as_each_alone_and_a_late_failure_writes_none() {
    let mut rng = SplitMix64::new(12);
    let sizes = [300usize, 17, 1000];
    for cfg in configs() {
        let mut opt = Optimizer::new(cfg).unwrap();
        let cached = opt.needs_cached_delta();
        let plan = opt.begin_step().unwrap();
        let drawn: Vec<(Vec<f32>, State, Vec<f32>)> = sizes.iter().map(|&n| random_state(&mut rng, n)).collect();
        let grads: Vec<Vec<f32>> = drawn.iter().map(|d| d.0.clone()).collect();
        let states: Vec<State> = drawn.iter().map(|d| d.1.clone()).collect();
        let taus: Vec<Vec<f32>> = drawn.iter().map(|d| d.2.clone()).collect();

        let mut together = states.clone();
        step_three(&plan, &grads, &mut together, &taus, cached).unwrap();
        for (i, name) in ["a.w", "b.w", "c.w"].into_iter().enumerate() {
            let mut alone = states[i].clone();
            let mut scratch = vec![f32::NAN; sizes[i]];
            let c = if cached { Some(&mut alone.cached[..]) } else { None };
            plan.step_one(name, &grads[i], StateMut { theta: &mut alone.theta, m: &mut alone.m, v: &mut alone.v, cached: c }, Src::F32(&taus[i]), &mut scratch).unwrap();
            assert!(together[i] == alone, "{cfg:?}: {name} differs from its step alone");
        }

        // The last tensor's squared gradient overflows (every input is finite):
        // the first two, which pass, must not be written either.
        let mut failing = states.clone();
        let mut g = grads.clone();
        g[2][999] = 3e20;
        let before = failing.clone();
        let err = step_three(&plan, &g, &mut failing, &taus, cached).unwrap_err();
        assert_eq!(err, Error::NonFinite { tensor: tensor_name("c.w"), what: "updated exp_avg_sq", index: 999 }, "{cfg:?}");
        let written: Vec<usize> = (0..3).filter(|&i| failing[i] != before[i]).collect();
        assert!(written.is_empty(), "{cfg:?}: tensors {written:?} written by a failing step");
    }
}

/// Every configuration the block kernels serve: both forms; plain AdamW, OnDARE
/// and OnTIES in both variants with and without the rescale, OnTIES per tensor
/// and global; online merging and step-K.
fn all_configurations() -> Vec<OnlineConfig> {
    let mut out = Vec::new();
    for form in [AdamForm::HuggingFace, AdamForm::Torch] {
        let adam = AdamConfig { form, lr: 2e-3, weight_decay: 0.05, schedule: Schedule::WarmupCosine { warmup: 2, total: 8 }, ..AdamConfig::default() };
        let mut merges = vec![Merge::None];
        for variant in [DareVariant::Reference, DareVariant::Paper] {
            for rescale in [false, true] {
                merges.push(Merge::Dare(DareConfig { variant, p: 0.3, alpha: 0.25, rescale, clip: 2e-3 }));
            }
        }
        for variant in [onties::Variant::Reference, onties::Variant::Paper] {
            for rescale in [false, true] {
                for scope in [Scope::PerTensor, Scope::Global] {
                    merges.push(Merge::Ties(TiesConfig { variant, p: 0.3, alpha: 0.25, rescale, scope }));
                }
            }
        }
        for merge in merges {
            for k in [1, 3] {
                out.push(OnlineConfig { adam, merge, k, seed: 0x5eed_0bad_cafe });
            }
        }
    }
    out
}

/// A value of magnitude about `scale`, or now and then a zero of either sign or
/// a subnormal (which every load flushes).
fn input(rng: &mut SplitMix64, scale: f32) -> f32 {
    match rng.below(16) {
        0 => f32::from_bits(rng.next_u32() & 0x807f_ffff),
        1 => -0.0,
        2 => 0.0,
        _ => rng.uniform_f32(scale),
    }
}

#[test]
fn the_block_kernels_match_the_plain_reference_bit_for_bit() {
    let mut rng = SplitMix64::new(0x0efe_4e11);
    // Three tensors in bytewise name order (a global scope's sequence), none a
    // multiple of the block.
    let names = ["blk.0.a", "blk.0.b", "blk.1.a"];
    let lens = [1usize, 257, 700];
    for cfg in all_configurations() {
        let mut kernel: Vec<State> = lens
            .iter()
            .map(|&n| State {
                theta: (0..n).map(|_| input(&mut rng, 1.0)).collect(),
                m: (0..n).map(|_| input(&mut rng, 1e-3)).collect(),
                // The second moment is never negative.
                v: (0..n).map(|_| fl(input(&mut rng, 1e-5)).abs()).collect(),
                cached: (0..n).map(|_| if cfg.k > 1 { input(&mut rng, 1e-3) } else { 0.0 }).collect(),
            })
            .collect();
        let taus: Vec<Vec<f32>> = lens.iter().map(|&n| (0..n).map(|_| input(&mut rng, 1e-3)).collect()).collect();
        let mut reference = kernel.clone();
        let opt = Optimizer::new(cfg).unwrap();
        for k in 1..=4u64 {
            let grads: Vec<Vec<f32>> = lens.iter().map(|&n| (0..n).map(|_| input(&mut rng, 1e-2)).collect()).collect();
            let plan = opt.plan(k).unwrap();
            // The reference's OnTIES selections, from its own updates `D`. Where
            // `τ'` is set to `−D` the sum `τ' ⊕ D'` cancels to `+0`: the election's
            // tie (`≥ 0` elects `+1`) is met on every merge step.
            let mut taus = taus.clone();
            let mut selections = vec![None; lens.len()];
            if let (Merge::Ties(t), Phase::Merge) = (cfg.merge, plan.phase()) {
                let updates: Vec<Vec<f32>> = reference
                    .iter()
                    .zip(&grads)
                    .map(|(st, g)| {
                        let mut d = vec![0.0f32; g.len()];
                        let state = StateRef { theta: &st.theta, m: &st.m, v: &st.v, cached: (cfg.k > 1).then_some(&st.cached[..]) };
                        reference::update(&cfg, k, g, state, &mut d).unwrap();
                        d
                    })
                    .collect();
                let mut offset = 0u64;
                for (i, d) in updates.iter().enumerate() {
                    selections[i] = Some(if t.scope == Scope::Global {
                        let all: Vec<&[f32]> = updates.iter().map(|u| &u[..]).collect();
                        (reference::ties_selection(&cfg, &all).unwrap(), offset)
                    } else {
                        (reference::ties_selection(&cfg, &[d]).unwrap(), 0)
                    });
                    offset += d.len() as u64;
                    for j in (3..d.len()).step_by(7) {
                        taus[i][j] = -d[j];
                    }
                }
            }
            let mut scratch: Vec<Vec<f32>> = lens.iter().map(|&n| vec![f32::NAN; n]).collect();
            let mut jobs: Vec<StepJob<'_>> = kernel
                .iter_mut()
                .zip(&mut scratch)
                .enumerate()
                .map(|(i, (st, scratch))| StepJob {
                    name: names[i],
                    grad: &grads[i],
                    state: StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached: (cfg.k > 1).then_some(&mut st.cached[..]) },
                    tau: Src::F32(&taus[i]),
                    scratch,
                })
                .collect();
            plan.step_tensors(&mut jobs).unwrap();
            for (i, st) in reference.iter_mut().enumerate() {
                let state = StateMut { theta: &mut st.theta, m: &mut st.m, v: &mut st.v, cached: (cfg.k > 1).then_some(&mut st.cached[..]) };
                reference::step(&cfg, k, names[i], &grads[i], state, &taus[i], selections[i]).unwrap();
            }
            for (i, (got, want)) in kernel.iter().zip(&reference).enumerate() {
                for (value, got, want) in [("theta", &got.theta, &want.theta), ("m", &got.m, &want.m), ("v", &got.v, &want.v), ("cached delta", &got.cached, &want.cached)] {
                    if let Some(j) = (0..got.len()).find(|&j| got[j].to_bits() != want[j].to_bits()) {
                        panic!("{value}[{j}]: kernel {:e}, reference {:e}; {cfg:?} step {k} tensor {}", got[j], want[j], names[i]);
                    }
                }
            }
        }
    }
}
