//! The C ABI called as C would call it: the results are merge-core's bit for bit,
//! the step number alone decides a step, and every bad pointer, length, code or
//! name is refused with a status and a message before anything is read or written.

use core::ffi::{c_char, c_void};
use std::ptr::{null, null_mut};

use merge_core::dare::DareConfig;
use merge_core::dtype::{Dst, Src};
use merge_core::offline::Gta;
use merge_core::optim::{Merge, OnlineConfig, Optimizer, StepJob};
use merge_core::step::StateMut;
use merge_core_c::*;

const NAME: &str = "model.layers.0.mlp.up_proj.weight";

fn f32_src(x: &[f32]) -> McSrc {
    McSrc { dtype: MC_DTYPE_F32, data: x.as_ptr().cast() }
}

fn f32_dst(x: &mut [f32]) -> McDst {
    McDst { dtype: MC_DTYPE_F32, data: x.as_mut_ptr().cast() }
}

fn text(msg: &[u8]) -> String {
    let end = msg.iter().position(|&b| b == 0).expect("the message is NUL-terminated");
    String::from_utf8(msg[..end].to_vec()).unwrap()
}

/// OnDARE with p = 0.5 and a visible learning rate, so masks and merges show.
fn dare_config() -> McOnlineConfig {
    let mut c = mc_online_config_default();
    c.adam.lr = 1e-2;
    c.merge.p = 0.5;
    c.merge.alpha = 0.25;
    c.seed = 7;
    c
}

struct Tensor {
    grad: Vec<f32>,
    theta: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    tau: Vec<f32>,
}

impl Tensor {
    fn new(n: usize) -> Tensor {
        let x = |i: usize, s: f32| (i as f32 * 0.37 + s).sin() * 0.5;
        Tensor { grad: (0..n).map(|i| x(i, 1.0)).collect(), theta: (0..n).map(|i| x(i, 2.0)).collect(), m: vec![0.0; n], v: vec![0.0; n], tau: (0..n).map(|i| x(i, 3.0) * 1e-2).collect() }
    }

    /// `mc_step_tensor` on this tensor; the status and the message.
    fn step(&mut self, config: &McOnlineConfig, step: u64) -> (i32, String) {
        let mut msg = [0xffu8; 256];
        // SAFETY: every buffer is a live slice of n elements; msg has its length.
        let rc = unsafe {
            mc_step_tensor(
                config,
                step,
                NAME.as_ptr().cast(),
                NAME.len(),
                self.grad.as_ptr(),
                self.theta.as_mut_ptr(),
                self.m.as_mut_ptr(),
                self.v.as_mut_ptr(),
                null_mut(),
                f32_src(&self.tau),
                null_mut(),
                self.theta.len(),
                msg.as_mut_ptr().cast(),
                msg.len(),
            )
        };
        (rc, text(&msg))
    }
}

#[test]
fn the_version_is_the_crate_version() {
    // SAFETY: mc_version returns a static NUL-terminated string.
    let v = unsafe { std::ffi::CStr::from_ptr(mc_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn a_step_depends_on_its_number_not_on_the_calls_before_it() {
    let c = dare_config();
    let config = OnlineConfig { merge: Merge::Dare(DareConfig { p: 0.5, alpha: 0.25, ..DareConfig::default() }), seed: 7, adam: merge_core::hyper::AdamConfig { lr: 1e-2, ..Default::default() }, ..OnlineConfig::default() };
    let mut opt = Optimizer::new(config).unwrap();
    let mut want = Tensor::new(300);
    let mut got = Tensor::new(300);
    for k in 1..=3 {
        let plan = opt.begin_step().unwrap();
        let state = StateMut { theta: &mut want.theta, m: &mut want.m, v: &mut want.v, cached: None };
        plan.step_tensors(&mut [StepJob { name: NAME, grad: &want.grad, state, tau: Src::F32(&want.tau), scratch: &mut [] }]).unwrap();
        assert_eq!(got.step(&c, k), (MC_OK, String::new()));
    }
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got.theta), bits(&want.theta));
    assert_eq!(bits(&got.m), bits(&want.m));
    assert_eq!(bits(&got.v), bits(&want.v));
    // On a fresh state, a first call with step 3 is merge-core's step 3, not its step 1.
    let mut first = Tensor::new(300);
    assert_eq!(first.step(&c, 3).0, MC_OK);
    let mut want = Tensor::new(300);
    let state = StateMut { theta: &mut want.theta, m: &mut want.m, v: &mut want.v, cached: None };
    let job = StepJob { name: NAME, grad: &want.grad, state, tau: Src::F32(&want.tau), scratch: &mut [] };
    Optimizer::new(config).unwrap().plan(3).unwrap().step_tensors(&mut [job]).unwrap();
    assert_eq!(bits(&first.theta), bits(&want.theta));
    let mut one = Tensor::new(300);
    assert_eq!(one.step(&c, 1).0, MC_OK);
    assert_ne!(bits(&one.theta), bits(&first.theta));
}

#[test]
fn merge_core_errors_keep_their_kind_and_message_and_write_nothing() {
    let c = dare_config();
    let mut t = Tensor::new(64);
    t.grad[17] = f32::NAN;
    let before = t.theta.clone();
    assert_eq!(t.step(&c, 1), (MC_ERR_NON_FINITE, format!("tensor `{NAME}`: non-finite gradient at element 17")));
    assert_eq!(t.theta, before);
    let mut bad = dare_config();
    bad.merge.alpha = 2.0;
    assert_eq!(t.step(&bad, 1), (MC_ERR_INVALID_HYPERPARAMETER, "hyperparameter `alpha` = 2: expected 0 <= alpha <= 1".to_string()));
    assert_eq!(t.step(&dare_config(), 0).0, MC_ERR_INVALID_HYPERPARAMETER);
    // OnTIES with global scope needs the job array.
    let mut ties = dare_config();
    ties.merge.method = MC_MERGE_TIES;
    ties.merge.scope = MC_SCOPE_GLOBAL;
    let mut u = Tensor::new(8);
    let (rc, msg) = u.step(&ties, 1);
    assert_eq!(rc, MC_ERR_MISUSE, "{msg}");
    // step-K without the cached delta.
    let mut stepk = dare_config();
    stepk.k = 2;
    let (rc, msg) = u.step(&stepk, 1);
    assert_eq!(rc, MC_ERR_LENGTH_MISMATCH, "{msg}");
    assert!(msg.contains("cached delta"), "{msg}");
}

#[test]
fn unknown_codes_are_invalid_arguments_named_by_field() {
    let mut t = Tensor::new(4);
    type Change = fn(&mut McOnlineConfig);
    let cases: [(Change, &str); 5] = [
        (|c| c.adam.form = 2, "config.adam.form = 2"),
        (|c| c.adam.schedule = 9, "config.adam.schedule = 9"),
        (|c| c.merge.method = 3, "config.merge.method = 3"),
        (|c| c.merge.variant = 5, "config.merge.variant = 5"),
        (|c| {
            c.merge.method = MC_MERGE_TIES;
            c.merge.scope = 4;
        }, "config.merge.scope = 4"),
    ];
    for (change, field) in cases {
        let mut c = dare_config();
        change(&mut c);
        let (rc, msg) = t.step(&c, 1);
        assert_eq!(rc, MC_ERR_INVALID_ARGUMENT, "{msg}");
        assert!(msg.starts_with(&format!("invalid argument: {field}: expected")), "{msg}");
    }
    let tau = [0u16; 4];
    let mut msg = [0u8; 200];
    // SAFETY: valid buffers; the dtype code is what is wrong.
    let rc = unsafe {
        mc_step_tensor(&dare_config(), 1, NAME.as_ptr().cast(), NAME.len(), t.grad.as_ptr(), t.theta.as_mut_ptr(), t.m.as_mut_ptr(), t.v.as_mut_ptr(), null_mut(), McSrc { dtype: 3, data: tau.as_ptr().cast() }, null_mut(), 4, msg.as_mut_ptr().cast(), msg.len())
    };
    assert_eq!((rc, text(&msg).as_str()), (MC_ERR_INVALID_ARGUMENT, "invalid argument: tau: dtype 3 is none of MC_DTYPE_F32 (0), MC_DTYPE_BF16 (1), MC_DTYPE_F16 (2)"));
}

/// `mc_step_tensor` with raw pointers; the status and the message.
#[allow(clippy::too_many_arguments)]
fn raw_step(name: &[u8], grad: *const f32, theta: *mut f32, m: *mut f32, v: *mut f32, tau: *const c_void, n: usize) -> (i32, String) {
    let mut msg = [0xffu8; 300];
    // SAFETY: every pointer is null, points to n valid elements, or is refused
    // before it is read: what each test below sets up.
    let rc = unsafe { mc_step_tensor(&dare_config(), 1, name.as_ptr().cast(), name.len(), grad, theta, m, v, null_mut(), McSrc { dtype: MC_DTYPE_F32, data: tau }, null_mut(), n, msg.as_mut_ptr().cast(), msg.len()) };
    (rc, text(&msg))
}

#[test]
fn null_misaligned_oversized_and_overlapping_buffers_are_refused_unread() {
    let mut t = Tensor::new(16);
    let before = t.theta.clone();
    let (g, tau) = (t.grad.as_ptr(), t.tau.as_ptr().cast());
    let (theta, m, v) = (t.theta.as_mut_ptr(), t.m.as_mut_ptr(), t.v.as_mut_ptr());
    let name = NAME.as_bytes();
    assert_eq!(raw_step(name, null(), theta, m, v, tau, 16), (MC_ERR_INVALID_ARGUMENT, "invalid argument: grad is null (it should hold 16 elements)".to_string()));
    assert_eq!(raw_step(&[0xff, 0xfe], g, theta, m, v, tau, 16).0, MC_ERR_INVALID_ARGUMENT);
    assert!(raw_step(&[0xff, 0xfe], g, theta, m, v, tau, 16).1.starts_with("invalid argument: name is not UTF-8"));
    // One byte past an f32 boundary.
    let misaligned = theta.cast::<u8>().wrapping_add(1).cast::<f32>();
    assert_eq!(raw_step(name, g, misaligned, m, v, tau, 15), (MC_ERR_INVALID_ARGUMENT, "invalid argument: theta is not aligned to 4 bytes".to_string()));
    assert_eq!(raw_step(name, g, theta, m, v, tau, usize::MAX / 2).1, "invalid argument: grad: 9223372036854775807 elements do not fit in the address space");
    // Written buffers that share memory with another buffer, written or read.
    let (rc, msg) = raw_step(name, g, theta, theta.wrapping_add(8), v, tau, 16);
    assert_eq!(rc, MC_ERR_INVALID_ARGUMENT);
    assert_eq!(msg, "invalid argument: theta overlaps m; a buffer the call writes must not share memory with another");
    let (rc, msg) = raw_step(name, theta, theta, m, v, tau, 16);
    assert_eq!(rc, MC_ERR_INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("overlaps"), "{msg}");
    assert_eq!(t.theta, before);
    // The task vector may be left out for plain AdamW, and an empty tensor may be all nulls.
    let mut plain = dare_config();
    plain.merge.method = MC_MERGE_NONE;
    let mut msg = [0u8; 64];
    // SAFETY: n = 0: no buffer is read.
    let rc = unsafe { mc_step_tensor(&plain, 1, null(), 0, null(), null_mut(), null_mut(), null_mut(), null_mut(), McSrc { dtype: MC_DTYPE_F32, data: null() }, null_mut(), 0, msg.as_mut_ptr().cast(), msg.len()) };
    assert_eq!((rc, text(&msg).as_str()), (MC_OK, ""));
    // ... but OnDARE reads it, and says so.
    let (rc, msg) = raw_step(name, g, theta, m, v, null(), 16);
    assert_eq!(rc, MC_ERR_LENGTH_MISMATCH, "{msg}");
    assert!(msg.contains("task vector has 0 elements, expected 16"), "{msg}");
}

#[test]
fn the_message_is_cut_at_a_character_boundary_and_always_terminated() {
    let mut c = dare_config();
    c.merge.alpha = -1.0;
    let mut t = Tensor::new(4);
    let full = t.step(&c, 1).1;
    for cap in [1usize, 2, 11, 40] {
        let mut msg = vec![0xffu8; cap + 4];
        // SAFETY: valid buffers; msg has at least cap bytes.
        let rc = unsafe {
            mc_step_tensor(&c, 1, NAME.as_ptr().cast(), NAME.len(), t.grad.as_ptr(), t.theta.as_mut_ptr(), t.m.as_mut_ptr(), t.v.as_mut_ptr(), null_mut(), f32_src(&t.tau), null_mut(), 4, msg.as_mut_ptr().cast(), cap)
        };
        assert_eq!(rc, MC_ERR_INVALID_HYPERPARAMETER);
        assert_eq!(text(&msg), full[..cap - 1]);
        assert!(msg[cap..].iter().all(|&b| b == 0xff), "nothing past msg_cap");
    }
    // A name with a two-byte character cut in half by the cap.
    let name = "é".repeat(10);
    let mut theta = [f32::NAN; 2];
    let (grad, mut m, mut v, tau) = ([0.0f32; 2], [0.0f32; 2], [0.0f32; 2], [0.0f32; 2]);
    let mut msg = [0u8; 16];
    // SAFETY: valid buffers of 2 elements; msg has 16 bytes.
    let rc = unsafe { mc_step_tensor(&dare_config(), 1, name.as_ptr().cast(), name.len(), grad.as_ptr(), theta.as_mut_ptr(), m.as_mut_ptr(), v.as_mut_ptr(), null_mut(), f32_src(&tau), null_mut(), 2, msg.as_mut_ptr().cast(), msg.len()) };
    assert_eq!(rc, MC_ERR_NON_FINITE);
    assert_eq!(text(&msg), "tensor `ééé"); // 8 + 3·2 = 14 bytes; a fourth é would need 16 of the 15
    // A null message buffer is allowed.
    // SAFETY: as above, with no message buffer.
    let rc = unsafe { mc_step_tensor(&dare_config(), 1, name.as_ptr().cast(), name.len(), grad.as_ptr(), theta.as_mut_ptr(), m.as_mut_ptr(), v.as_mut_ptr(), null_mut(), f32_src(&tau), null_mut(), 2, null_mut::<c_char>(), 99) };
    assert_eq!(rc, MC_ERR_NON_FINITE);
}

#[test]
fn the_task_vector_and_the_merges_are_merge_cores() {
    let c = dare_config();
    let base: Vec<f32> = (0..50).map(|i| i as f32 * 0.01).collect();
    let sft: Vec<f32> = (0..50).map(|i| i as f32 * 0.011 - 0.1).collect();
    let mut tau = vec![0u16; 50];
    let mut msg = [0u8; 128];
    // SAFETY: slices of 50 elements; bf16 output as u16 bits.
    let rc = unsafe { mc_init_task_vector(&c, NAME.as_ptr().cast(), NAME.len(), f32_src(&base), f32_src(&sft), McDst { dtype: MC_DTYPE_BF16, data: tau.as_mut_ptr().cast() }, null_mut(), 50, msg.as_mut_ptr().cast(), msg.len()) };
    assert_eq!((rc, text(&msg).as_str()), (MC_OK, ""));
    let opt = Optimizer::new(OnlineConfig { merge: Merge::Dare(DareConfig { p: 0.5, alpha: 0.25, ..DareConfig::default() }), seed: 7, ..OnlineConfig::default() }).unwrap();
    let mut want = vec![0u16; 50];
    opt.init_task_vector(NAME, Src::F32(&base), Src::F32(&sft), &mut Dst::Bf16(&mut want)).unwrap();
    assert_eq!(tau, want);
    // Plain AdamW has no task vector.
    let mut plain = c;
    plain.merge.method = MC_MERGE_NONE;
    // SAFETY: as above.
    let rc = unsafe { mc_init_task_vector(&plain, NAME.as_ptr().cast(), NAME.len(), f32_src(&base), f32_src(&sft), McDst { dtype: MC_DTYPE_BF16, data: tau.as_mut_ptr().cast() }, null_mut(), 50, null_mut(), 0) };
    assert_eq!(rc, MC_ERR_MISUSE);
    // Nor does a global OnTIES scope over one tensor alone.
    let mut global = c;
    global.merge.method = MC_MERGE_TIES;
    global.merge.scope = MC_SCOPE_GLOBAL;
    let mut scratch = vec![0.0f32; 50];
    // SAFETY: as above, with a scratch of 50 floats.
    let rc = unsafe { mc_init_task_vector(&global, NAME.as_ptr().cast(), NAME.len(), f32_src(&base), f32_src(&sft), McDst { dtype: MC_DTYPE_BF16, data: tau.as_mut_ptr().cast() }, scratch.as_mut_ptr(), 50, msg.as_mut_ptr().cast(), msg.len()) };
    assert_eq!(rc, MC_ERR_MISUSE, "{}", text(&msg));

    // Linear: the same model twice may be passed (both only read).
    let models = [f32_src(&base), f32_src(&base), f32_src(&sft)];
    let weights = [0.25, 0.25, 0.5];
    let mut out = vec![0.0f32; 50];
    // SAFETY: three models and weights, 50 elements each.
    let rc = unsafe { mc_merge_linear(NAME.as_ptr().cast(), NAME.len(), models.as_ptr(), weights.as_ptr(), 3, true, f32_dst(&mut out), 50, null_mut(), 0) };
    assert_eq!(rc, MC_OK);
    let mut want = vec![0.0f32; 50];
    merge_core::offline::linear(NAME, 0, &[Src::F32(&base), Src::F32(&base), Src::F32(&sft)], &weights, true, &mut Dst::F32(&mut want)).unwrap();
    assert_eq!(out, want);
    // Writing over an input is refused: Rust slices may not alias.
    let models = [f32_src(&out)];
    // SAFETY: the call refuses the overlap before it reads or writes.
    let rc = unsafe { mc_merge_linear(NAME.as_ptr().cast(), NAME.len(), models.as_ptr(), weights.as_ptr(), 1, true, f32_dst(&mut out), 50, null_mut(), 0) };
    assert_eq!(rc, MC_ERR_INVALID_ARGUMENT);
}

#[test]
fn the_presets_are_merge_cores_and_global_trims_need_name_order() {
    for (code, preset) in [(MC_GTA_TASK_ARITHMETIC, Gta::TASK_ARITHMETIC), (MC_GTA_TIES, Gta::TIES), (MC_GTA_DARE_LINEAR, Gta::DARE_LINEAR), (MC_GTA_DARE_TIES, Gta::DARE_TIES)] {
        let mut c = McGtaConfig { sparsify: 99, consensus: false, normalize: false, lambda: 0.0 };
        // SAFETY: one writable McGtaConfig.
        assert_eq!(unsafe { mc_gta_preset(code, &mut c, null_mut(), 0) }, MC_OK);
        assert_eq!((c.consensus, c.normalize, c.lambda), (preset.consensus, preset.normalize, preset.lambda));
    }
    let mut c = McGtaConfig { sparsify: 0, consensus: false, normalize: false, lambda: 0.0 };
    // SAFETY: as above.
    assert_eq!(unsafe { mc_gta_preset(4, &mut c, null_mut(), 0) }, MC_ERR_INVALID_ARGUMENT);
    // SAFETY: as above.
    assert_eq!(unsafe { mc_gta_preset(MC_GTA_TIES, &mut c, null_mut(), 0) }, MC_OK);

    let base = [0.0f32; 4];
    let model = [1.0f32, -2.0, 3.0, -4.0];
    let models = [f32_src(&model)];
    let (mut out_a, mut out_b) = ([0.0f32; 4], [0.0f32; 4]);
    let params = [McModelParams { weight: 1.0, density: 0.5 }];
    let tensor = |name: &'static str, out: &mut [f32]| McGtaTensor { name: name.as_ptr().cast(), name_len: name.len(), n: 4, base: f32_src(&base), models: models.as_ptr(), out: f32_dst(out) };
    let tensors = [tensor("b", &mut out_b), tensor("a", &mut out_a)];
    let mut msg = [0u8; 128];
    // SAFETY: two tensors of 4 elements, one model each.
    let rc = unsafe { mc_merge_gta(&c, 0, params.as_ptr(), 1, MC_SCOPE_GLOBAL, tensors.as_ptr(), 2, msg.as_mut_ptr().cast(), msg.len()) };
    assert_eq!(rc, MC_ERR_MISUSE, "{}", text(&msg));
    assert_eq!(out_a, [0.0; 4]);
    let tensors = [tensor("a", &mut out_a), tensor("b", &mut out_b)];
    // SAFETY: as above.
    let rc = unsafe { mc_merge_gta(&c, 0, params.as_ptr(), 1, MC_SCOPE_GLOBAL, tensors.as_ptr(), 2, msg.as_mut_ptr().cast(), msg.len()) };
    assert_eq!(rc, MC_OK, "{}", text(&msg));
    // Density 0.5 over both tensors keeps the 4 largest of 8 magnitudes: 3, -4 of each.
    assert_eq!((out_a, out_b), ([0.0, 0.0, 3.0, -4.0], [0.0, 0.0, 3.0, -4.0]));
}
