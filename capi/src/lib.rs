//! A C ABI over merge-core: the per-tensor optimizer step, task-vector init and
//! offline merges over plain pointers and lengths. `include/merge_core.h` is this
//! file as cbindgen renders it (`cbindgen.toml`); `tests/header.rs` fails when the
//! committed header is stale.
//!
//! Conventions of every function that returns an `int`:
//! - `MC_OK` (0) on success, a negative `MC_ERR_*` code otherwise: one per kind of
//!   merge-core error, `MC_ERR_INVALID_ARGUMENT` for a pointer, length, code or
//!   name this layer cannot use, `MC_ERR_PANIC` for a bug.
//! - `msg`, `msg_cap`: a buffer for the message (merge-core's, naming the tensor,
//!   element index or hyperparameter), always NUL-terminated, cut at a UTF-8
//!   character boundary to fit, empty on success; `msg` may be null.
//! - On failure nothing is written (except where a function says otherwise).
//! - A pointer with an element count must hold that many elements, aligned for
//!   its type; it may be null only when the count is 0 or the argument is
//!   documented as optional. No buffer the call writes may share memory with any
//!   other buffer of the call (refused as an invalid argument).
//! - Names are UTF-8 given as pointer and length (no NUL needed).
//! - No global state: calls on different buffers may run on different threads.
//! - The optimizer step runs, on the calling thread, the widest copy of its
//!   passes the CPU has (AVX-512F, AVX2 or the build's own; `merge-simd`), with
//!   the same bits at each.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]
// merge-core's `Error` names its tensor inline, and `Failure` carries it.
#![allow(clippy::result_large_err)]
// A C function takes its buffers as plain arguments.
#![allow(clippy::too_many_arguments)]

mod buffers;
mod status;

use core::ffi::{c_char, c_int, c_void};

use merge_core::dare::{DareConfig, DareVariant};
use merge_core::hyper::{AdamConfig, AdamForm, Schedule};
use merge_core::offline::{self, Gta, GtaPlan, ModelParams, Sparsify};
use merge_core::onties;
use merge_core::optim::{Merge, OnlineConfig, Optimizer, Scope, StepJob, StepPlan, TaskVectorJob, TiesConfig};
use merge_core::step::{Phase, StateMut};
use merge_core::{Error, topk::Threshold};
use merge_simd::Cpu;

use buffers::{Buffers, Input, InputSrc, Label, Output, OutputDst};
use status::{Failure, run};

/// Success.
pub const MC_OK: c_int = 0;
/// A non-finite input or result; the message names the tensor, the value and the lowest element index.
pub const MC_ERR_NON_FINITE: c_int = -1;
/// A hyperparameter out of its range; the message names it.
pub const MC_ERR_INVALID_HYPERPARAMETER: c_int = -2;
/// Tensors that must have equal lengths do not (e.g. a missing optional buffer the step needs).
pub const MC_ERR_LENGTH_MISMATCH: c_int = -3;
/// A result too large for its storage dtype.
pub const MC_ERR_STORAGE_OVERFLOW: c_int = -4;
/// A whole-tensor reduction (an L1 or L2 norm, a dot product) is not finite.
pub const MC_ERR_NON_FINITE_REDUCTION: c_int = -5;
/// An index or size the arithmetic cannot address (2^32 elements or more).
pub const MC_ERR_OUT_OF_RANGE: c_int = -6;
/// A call against merge-core's contract (e.g. global-scope tensors out of name order).
pub const MC_ERR_MISUSE: c_int = -7;
/// A null, misaligned or overlapping buffer, an unknown code, or a name that is not UTF-8.
pub const MC_ERR_INVALID_ARGUMENT: c_int = -8;
/// A bug in merge-core or this ABI; the panic was caught before it reached the caller.
pub const MC_ERR_PANIC: c_int = -9;

/// Storage dtype binary32 (`float`).
pub const MC_DTYPE_F32: u32 = 0;
/// Storage dtype bfloat16 (`uint16_t` bits).
pub const MC_DTYPE_BF16: u32 = 1;
/// Storage dtype IEEE binary16 (`uint16_t` bits).
pub const MC_DTYPE_F16: u32 = 2;

/// The Hugging Face `transformers.AdamW` the official code builds on.
pub const MC_ADAM_HUGGING_FACE: u32 = 0;
/// `torch.optim.AdamW`.
pub const MC_ADAM_TORCH: u32 = 1;

/// A constant learning rate.
pub const MC_SCHEDULE_CONSTANT: u32 = 0;
/// Linear warmup from 0 over `warmup` steps, then a half cosine down to 0 at `total`.
pub const MC_SCHEDULE_WARMUP_COSINE: u32 = 1;

/// Plain AdamW.
pub const MC_MERGE_NONE: u32 = 0;
/// OnDARE.
pub const MC_MERGE_DARE: u32 = 1;
/// OnTIES.
pub const MC_MERGE_TIES: u32 = 2;

/// What the official code does.
pub const MC_VARIANT_REFERENCE: u32 = 0;
/// The paper's equations.
pub const MC_VARIANT_PAPER: u32 = 1;

/// Top-k trimming ranks each tensor on its own.
pub const MC_SCOPE_PER_TENSOR: u32 = 0;
/// Top-k trimming ranks all tensors of the call at once, concatenated in bytewise
/// ascending name order (the tensors must be given in that order).
pub const MC_SCOPE_GLOBAL: u32 = 1;

/// Every task-vector element kept.
pub const MC_SPARSIFY_NONE: u32 = 0;
/// TIES trim: the `ceil(density * n)` largest magnitudes kept.
pub const MC_SPARSIFY_MAGNITUDE: u32 = 1;
/// DARE: each element kept with probability `density`, kept ones scaled by `1/density`.
pub const MC_SPARSIFY_RANDOM: u32 = 2;

/// mergekit `task_arithmetic`.
pub const MC_GTA_TASK_ARITHMETIC: u32 = 0;
/// mergekit `ties`.
pub const MC_GTA_TIES: u32 = 1;
/// mergekit `dare_linear`.
pub const MC_GTA_DARE_LINEAR: u32 = 2;
/// mergekit `dare_ties`.
pub const MC_GTA_DARE_TIES: u32 = 3;

/// The Adam part of the optimizer (SPEC.md §5.1). Codes are plain integers, not
/// C enums, so that any value a caller passes can be checked rather than trusted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct McAdamConfig {
    /// `MC_ADAM_HUGGING_FACE` or `MC_ADAM_TORCH`.
    pub form: u32,
    /// Peak learning rate, `>= 0`.
    pub lr: f64,
    /// `0 <= beta1 < 1`.
    pub beta1: f64,
    /// `0 <= beta2 < 1`.
    pub beta2: f64,
    /// `> 0` and a normal binary32 value after rounding.
    pub eps: f64,
    /// Decoupled weight decay `>= 0`.
    pub weight_decay: f64,
    /// `MC_SCHEDULE_CONSTANT` or `MC_SCHEDULE_WARMUP_COSINE`.
    pub schedule: u32,
    /// Warmup-cosine only: the warmup steps, `<= total`.
    pub warmup: u64,
    /// Warmup-cosine only: the step count at which the rate reaches 0, `>= 1`.
    pub total: u64,
}

/// What is merged into each update (SPEC.md §5.2, §5.3).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct McMergeConfig {
    /// `MC_MERGE_NONE`, `MC_MERGE_DARE` or `MC_MERGE_TIES`; the other fields are
    /// read only by the methods named on them.
    pub method: u32,
    /// OnDARE, OnTIES: `MC_VARIANT_REFERENCE` or `MC_VARIANT_PAPER`.
    pub variant: u32,
    /// OnDARE, OnTIES: the reserve rate `p` in `(0, 1]`.
    pub p: f64,
    /// OnDARE, OnTIES: the merge weight `alpha` in `[0, 1]`.
    pub alpha: f64,
    /// OnDARE, OnTIES: L1 rescale of the sparsified update.
    pub rescale: bool,
    /// OnDARE: the clip value `c > 0` of the task vector and the rescale.
    pub clip: f64,
    /// OnTIES: `MC_SCOPE_PER_TENSOR` or `MC_SCOPE_GLOBAL`.
    pub scope: u32,
}

/// Everything that defines an online merging optimizer run: merge-core's
/// `OnlineConfig`. Start from `mc_online_config_default()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct McOnlineConfig {
    /// AdamW.
    pub adam: McAdamConfig,
    /// The merge method.
    pub merge: McMergeConfig,
    /// Merge every `k` steps (step-K, SPEC.md §5.4), `>= 1`; 1 is online merging.
    pub k: u32,
    /// Seed of every random mask.
    pub seed: u64,
}

/// The binary32 scalars of one step (SPEC.md §5.1), as the element arithmetic uses them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct McStepScalars {
    /// The scheduled learning rate (informational).
    pub lr: f32,
    /// `beta1`, rounded.
    pub beta1: f32,
    /// `beta2`, rounded.
    pub beta2: f32,
    /// `RN(1 - beta1)`.
    pub one_minus_beta1: f32,
    /// `RN(1 - beta2)`.
    pub one_minus_beta2: f32,
    /// `eps`, rounded.
    pub eps: f32,
    /// The negated step size.
    pub neg_step_size: f32,
    /// torch: `RN(sqrt(1 - beta2^k))`; Hugging Face: 1 (unused).
    pub bc2_sqrt: f32,
    /// torch: `RN(1 - lr * weight_decay)`, applied before the update; Hugging Face: 1 (unused).
    pub decay_before: f32,
    /// Hugging Face: `RN(lr * weight_decay)`, applied after the update; torch: 0 (unused).
    pub decay_after: f32,
    /// Whether the step merges (`step % k == 0`) rather than only accumulating the cached delta.
    pub merge_step: bool,
}

/// A tensor the call reads, in one of the storage dtypes; its element count
/// comes with the call. `data` is `const float *` for `MC_DTYPE_F32`, `const
/// uint16_t *` (the bits) for `MC_DTYPE_BF16` and `MC_DTYPE_F16`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct McSrc {
    /// `MC_DTYPE_F32`, `MC_DTYPE_BF16` or `MC_DTYPE_F16`.
    pub dtype: u32,
    /// The elements.
    pub data: *const c_void,
}

/// A tensor the call writes, in one of the storage dtypes (as `McSrc`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct McDst {
    /// `MC_DTYPE_F32`, `MC_DTYPE_BF16` or `MC_DTYPE_F16`.
    pub dtype: u32,
    /// The elements.
    pub data: *mut c_void,
}

/// One tensor of `mc_step_tensors`: `n` elements in every buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct McStepJob {
    /// The tensor's name, UTF-8, `name_len` bytes: its identity in the random masks.
    pub name: *const c_char,
    /// Bytes of `name`.
    pub name_len: usize,
    /// Elements of every buffer below.
    pub n: usize,
    /// The gradient.
    pub grad: *const f32,
    /// The parameters, updated in place.
    pub theta: *mut f32,
    /// Adam's first moment, updated in place.
    pub m: *mut f32,
    /// Adam's second moment, updated in place.
    pub v: *mut f32,
    /// The cached delta of step-K (zeros before the first step), updated in place;
    /// required when `k > 1`, null otherwise.
    pub cached: *mut f32,
    /// The stored task vector from `mc_init_task_vector(s)`; `data` may be null
    /// for plain AdamW.
    pub tau: McSrc,
    /// Room for the update, required by OnTIES, may be null otherwise.
    pub scratch: *mut f32,
}

/// One tensor of `mc_init_task_vectors`: `n` elements in every buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct McTaskVectorJob {
    /// The tensor's name, UTF-8, `name_len` bytes.
    pub name: *const c_char,
    /// Bytes of `name`.
    pub name_len: usize,
    /// Elements of every buffer below.
    pub n: usize,
    /// The base (pretrained) weights.
    pub base: McSrc,
    /// The SFT weights.
    pub sft: McSrc,
    /// The stored task vector, written.
    pub out: McDst,
    /// Room for the unsparsified task vector, required by OnTIES, may be null otherwise.
    pub scratch: *mut f32,
}

/// Generalized task arithmetic (SPEC.md §6.2): merge-core's `offline::Gta`.
/// Start from `mc_gta_preset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct McGtaConfig {
    /// `MC_SPARSIFY_NONE`, `MC_SPARSIFY_MAGNITUDE` or `MC_SPARSIFY_RANDOM`.
    pub sparsify: u32,
    /// TIES sign election.
    pub consensus: bool,
    /// Divide by the (agreeing) weights.
    pub normalize: bool,
    /// The factor of the mixed task vectors.
    pub lambda: f64,
}

/// One model's weight and density in `mc_merge_gta`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct McModelParams {
    /// The model's weight.
    pub weight: f64,
    /// The fraction its sparsification keeps, in `(0, 1]` (unused by `MC_SPARSIFY_NONE`).
    pub density: f64,
}

/// One tensor of `mc_merge_gta`: `n` elements in every buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct McGtaTensor {
    /// The tensor's name, UTF-8, `name_len` bytes: its identity in the DARE masks.
    pub name: *const c_char,
    /// Bytes of `name`.
    pub name_len: usize,
    /// Elements of every buffer below.
    pub n: usize,
    /// The base model's weights.
    pub base: McSrc,
    /// One tensor per model, `model_count` of them.
    pub models: *const McSrc,
    /// The merged weights, written.
    pub out: McDst,
}

/// The SLERP result's factors: `out = s0 * a + s1 * b`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct McSlerpScalars {
    /// The factor of `a`.
    pub s0: f32,
    /// The factor of `b`.
    pub s1: f32,
    /// The tensors were (anti)parallel: linear interpolation was used.
    pub lerp: bool,
}

/// This library's version, a static NUL-terminated string.
#[unsafe(no_mangle)]
pub extern "C" fn mc_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// merge-core's default configuration: OnDARE with the paper's defaults
/// (`p = 0.01`, `alpha = 1e-7`, clip 1), Hugging Face AdamW with lr 1e-6,
/// `k = 1`, seed 0. Fields of the other methods hold their defaults too.
#[unsafe(no_mangle)]
pub extern "C" fn mc_online_config_default() -> McOnlineConfig {
    let OnlineConfig { adam, merge, k, seed } = OnlineConfig::default();
    let (dare, ties) = (DareConfig::default(), TiesConfig::default());
    let variant = |paper: bool| if paper { MC_VARIANT_PAPER } else { MC_VARIANT_REFERENCE };
    let scope = |s: Scope| match s {
        Scope::PerTensor => MC_SCOPE_PER_TENSOR,
        Scope::Global => MC_SCOPE_GLOBAL,
    };
    let mut mc_merge = McMergeConfig {
        method: MC_MERGE_NONE,
        variant: variant(dare.variant == DareVariant::Paper),
        p: dare.p,
        alpha: dare.alpha,
        rescale: dare.rescale,
        clip: dare.clip,
        scope: scope(ties.scope),
    };
    match merge {
        Merge::None => {}
        Merge::Dare(d) => {
            mc_merge = McMergeConfig { method: MC_MERGE_DARE, variant: variant(d.variant == DareVariant::Paper), p: d.p, alpha: d.alpha, rescale: d.rescale, clip: d.clip, ..mc_merge };
        }
        Merge::Ties(t) => {
            mc_merge = McMergeConfig { method: MC_MERGE_TIES, variant: variant(t.variant == onties::Variant::Paper), p: t.p, alpha: t.alpha, rescale: t.rescale, scope: scope(t.scope), ..mc_merge };
        }
    }
    let (schedule, warmup, total) = match adam.schedule {
        Schedule::Constant => (MC_SCHEDULE_CONSTANT, 0, 0),
        Schedule::WarmupCosine { warmup, total } => (MC_SCHEDULE_WARMUP_COSINE, warmup, total),
    };
    McOnlineConfig {
        adam: McAdamConfig {
            form: match adam.form {
                AdamForm::HuggingFace => MC_ADAM_HUGGING_FACE,
                AdamForm::Torch => MC_ADAM_TORCH,
            },
            lr: adam.lr,
            beta1: adam.beta1,
            beta2: adam.beta2,
            eps: adam.eps,
            weight_decay: adam.weight_decay,
            schedule,
            warmup,
            total,
        },
        merge: mc_merge,
        k,
        seed,
    }
}

/// A code that is none of those allowed for `field`.
fn unknown_code(field: &str, value: u32, expected: &str) -> Failure {
    Failure::argument(format!("{field} = {value}: expected {expected}"))
}

fn variant_is_paper(field: &str, code: u32) -> Result<bool, Failure> {
    match code {
        MC_VARIANT_REFERENCE => Ok(false),
        MC_VARIANT_PAPER => Ok(true),
        other => Err(unknown_code(field, other, "MC_VARIANT_REFERENCE (0) or MC_VARIANT_PAPER (1)")),
    }
}

fn scope(field: &str, code: u32) -> Result<Scope, Failure> {
    match code {
        MC_SCOPE_PER_TENSOR => Ok(Scope::PerTensor),
        MC_SCOPE_GLOBAL => Ok(Scope::Global),
        other => Err(unknown_code(field, other, "MC_SCOPE_PER_TENSOR (0) or MC_SCOPE_GLOBAL (1)")),
    }
}

/// The validated optimizer a configuration describes.
fn optimizer(c: &McOnlineConfig) -> Result<Optimizer, Failure> {
    let form = match c.adam.form {
        MC_ADAM_HUGGING_FACE => AdamForm::HuggingFace,
        MC_ADAM_TORCH => AdamForm::Torch,
        other => return Err(unknown_code("config.adam.form", other, "MC_ADAM_HUGGING_FACE (0) or MC_ADAM_TORCH (1)")),
    };
    let schedule = match c.adam.schedule {
        MC_SCHEDULE_CONSTANT => Schedule::Constant,
        MC_SCHEDULE_WARMUP_COSINE => Schedule::WarmupCosine { warmup: c.adam.warmup, total: c.adam.total },
        other => return Err(unknown_code("config.adam.schedule", other, "MC_SCHEDULE_CONSTANT (0) or MC_SCHEDULE_WARMUP_COSINE (1)")),
    };
    let a = &c.adam;
    let adam = AdamConfig { form, lr: a.lr, beta1: a.beta1, beta2: a.beta2, eps: a.eps, weight_decay: a.weight_decay, schedule };
    let m = &c.merge;
    let merge = match m.method {
        MC_MERGE_NONE => Merge::None,
        MC_MERGE_DARE => Merge::Dare(DareConfig {
            variant: if variant_is_paper("config.merge.variant", m.variant)? { DareVariant::Paper } else { DareVariant::Reference },
            p: m.p,
            alpha: m.alpha,
            rescale: m.rescale,
            clip: m.clip,
        }),
        MC_MERGE_TIES => Merge::Ties(TiesConfig {
            variant: if variant_is_paper("config.merge.variant", m.variant)? { onties::Variant::Paper } else { onties::Variant::Reference },
            p: m.p,
            alpha: m.alpha,
            rescale: m.rescale,
            scope: scope("config.merge.scope", m.scope)?,
        }),
        other => return Err(unknown_code("config.merge.method", other, "MC_MERGE_NONE (0), MC_MERGE_DARE (1) or MC_MERGE_TIES (2)")),
    };
    Ok(Optimizer::new(OnlineConfig { adam, merge, k: c.k, seed: c.seed })?)
}

/// Reads the configuration (copied, so the pointer is not held).
fn read_config<T: Copy>(buffers: &mut Buffers, config: *const T) -> Result<T, Failure> {
    let config = buffers.input(config, 1, Label::arg("config"))?;
    // SAFETY: `input` checked the pointer; the caller's contract makes it a valid
    // configuration, and it is copied before any buffer of the call is written.
    Ok(unsafe { config.slice()[0] })
}

/// The plan of step `step` under `config`.
fn plan(config: &McOnlineConfig, step: u64) -> Result<StepPlan, Failure> {
    Ok(optimizer(config)?.plan(step)?)
}

/// The scalars of step `step` (1-based) under `config`, and whether it merges.
///
/// # Safety
/// `config` and `out` point to one valid value each; `msg` is null or `msg_cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_step_scalars(config: *const McOnlineConfig, step: u64, out: *mut McStepScalars, msg: *mut c_char, msg_cap: usize) -> c_int {
    let body = || {
        let mut buffers = Buffers::default();
        let config = read_config(&mut buffers, config)?;
        let out = buffers.output(out, 1, Label::arg("out"))?;
        buffers.check_disjoint()?;
        let plan = plan(&config, step)?;
        let s = plan.scalars();
        let scalars = McStepScalars {
            lr: s.lr,
            beta1: s.beta1,
            beta2: s.beta2,
            one_minus_beta1: s.one_minus_beta1,
            one_minus_beta2: s.one_minus_beta2,
            eps: s.eps,
            neg_step_size: s.neg_step_size,
            bc2_sqrt: s.bc2_sqrt,
            decay_before: s.decay_before,
            decay_after: s.decay_after,
            merge_step: plan.phase() == Phase::Merge,
        };
        // SAFETY: `output` checked the pointer, `check_disjoint` that nothing else
        // of the call lies there; validity is the caller's contract.
        unsafe { out.slice()[0] = scalars };
        Ok(())
    };
    // SAFETY: `msg` and `msg_cap` are this function's contract.
    unsafe { run(msg, msg_cap, body) }
}

/// One step job's buffers, checked.
struct StepBuffers {
    name: Input<u8>,
    name_label: Label,
    grad: Input<f32>,
    theta: Output<f32>,
    m: Output<f32>,
    v: Output<f32>,
    cached: Option<Output<f32>>,
    tau: InputSrc,
    scratch: Output<f32>,
}

impl StepBuffers {
    fn claim(buffers: &mut Buffers, job: &McStepJob, list: Option<&'static str>, i: usize) -> Result<StepBuffers, Failure> {
        let at = |field| Label::of(list, i, field);
        let n = job.n;
        Ok(StepBuffers {
            name: buffers.name(job.name, job.name_len, at("name"))?,
            name_label: at("name"),
            grad: buffers.input(job.grad, n, at("grad"))?,
            theta: buffers.output(job.theta, n, at("theta"))?,
            m: buffers.output(job.m, n, at("m"))?,
            v: buffers.output(job.v, n, at("v"))?,
            cached: if job.cached.is_null() { None } else { Some(buffers.output(job.cached, n, at("cached"))?) },
            tau: buffers.optional_src(job.tau, n, at("tau"))?,
            scratch: buffers.optional_output(job.scratch, n, at("scratch"))?,
        })
    }

    /// # Safety
    /// The caller's buffers are valid for `'a` and `Buffers::check_disjoint` passed.
    unsafe fn job<'a>(self) -> Result<StepJob<'a>, Failure> {
        // SAFETY: forwarded to this function's contract.
        unsafe {
            Ok(StepJob {
                name: self.name.utf8(self.name_label)?,
                grad: self.grad.slice(),
                state: StateMut { theta: self.theta.slice(), m: self.m.slice(), v: self.v.slice(), cached: self.cached.map(|c| c.slice()) },
                tau: self.tau.src(),
                scratch: self.scratch.slice(),
            })
        }
    }
}

/// One optimizer step of one tensor, in place: step `step` (1-based) under
/// `config`. The result depends on `step`, not on how many calls came before,
/// so the caller keeps the count (SPEC.md §5).
///
/// `theta`, `m`, `v` (and `cached` for step-K) are updated in place. `cached`
/// (zeros before the first step) is required when `config->k > 1`, else null.
/// `tau` is the stored task vector (`tau.data` may be null for plain AdamW).
/// `scratch` (n floats) is required by OnTIES, may be null otherwise. OnTIES with
/// `MC_SCOPE_GLOBAL` needs every tensor at once: use `mc_step_tensors` (this
/// function refuses it with `MC_ERR_MISUSE`).
///
/// # Safety
/// `config` points to a valid configuration; `name` to `name_len` bytes; `grad`,
/// `theta`, `m`, `v`, and `cached`, `tau.data`, `scratch` when not null, to `n`
/// elements each; `msg` is null or `msg_cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_step_tensor(
    config: *const McOnlineConfig,
    step: u64,
    name: *const c_char,
    name_len: usize,
    grad: *const f32,
    theta: *mut f32,
    m: *mut f32,
    v: *mut f32,
    cached: *mut f32,
    tau: McSrc,
    scratch: *mut f32,
    n: usize,
    msg: *mut c_char,
    msg_cap: usize,
) -> c_int {
    let job = McStepJob { name, name_len, n, grad, theta, m, v, cached, tau, scratch };
    let body = || {
        let mut buffers = Buffers::default();
        let config = read_config(&mut buffers, config)?;
        let claim = StepBuffers::claim(&mut buffers, &job, None, 0)?;
        buffers.check_disjoint()?;
        // SAFETY: every buffer was claimed and found disjoint; validity for the
        // duration of the call is the caller's contract.
        let job = unsafe { claim.job()? };
        let plan = plan(&config, step)?;
        // `step_tensors` with this one job would trim it as a whole global OnTIES
        // scope; a single tensor is refused that scope instead.
        if plan.trims_globally() {
            return Err(Error::Misuse { what: "per-tensor scope for mc_step_tensor (global scope: use mc_step_tensors)" }.into());
        }
        Ok(plan.step_tensors_with(&mut [job], &Cpu::detect())?)
    };
    // SAFETY: `msg` and `msg_cap` are this function's contract.
    unsafe { run(msg, msg_cap, body) }
}

/// One optimizer step of `job_count` tensors, step `step` (1-based) under
/// `config`; each job as the arguments of `mc_step_tensor`. No tensor is written
/// unless every tensor passes. With OnTIES and `MC_SCOPE_GLOBAL` the jobs must
/// be in bytewise ascending name order and share one threshold.
///
/// # Safety
/// `config` points to a valid configuration, `jobs` to `job_count` jobs whose
/// pointers are valid as `mc_step_tensor` describes; `msg` is null or `msg_cap`
/// writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_step_tensors(config: *const McOnlineConfig, step: u64, jobs: *const McStepJob, job_count: usize, msg: *mut c_char, msg_cap: usize) -> c_int {
    let body = || {
        let mut buffers = Buffers::default();
        let config = read_config(&mut buffers, config)?;
        let jobs = buffers.input(jobs, job_count, Label::arg("jobs"))?;
        // SAFETY: `input` checked the array; the caller's contract makes it valid.
        // It is only read, and `check_disjoint` below refuses any written buffer
        // that overlaps it before one becomes a slice.
        let jobs = unsafe { jobs.slice() };
        let claims = jobs.iter().enumerate().map(|(i, job)| StepBuffers::claim(&mut buffers, job, Some("jobs"), i)).collect::<Result<Vec<_>, _>>()?;
        buffers.check_disjoint()?;
        // SAFETY: every buffer was claimed and found disjoint; validity for the
        // duration of the call is the caller's contract.
        let mut jobs = claims.into_iter().map(|c| unsafe { c.job() }).collect::<Result<Vec<_>, _>>()?;
        Ok(plan(&config, step)?.step_tensors_with(&mut jobs, &Cpu::detect())?)
    };
    // SAFETY: `msg` and `msg_cap` are this function's contract.
    unsafe { run(msg, msg_cap, body) }
}

/// One task-vector job's buffers, checked.
struct TaskVectorBuffers {
    name: Input<u8>,
    name_label: Label,
    base: InputSrc,
    sft: InputSrc,
    out: OutputDst,
    scratch: Output<f32>,
}

impl TaskVectorBuffers {
    fn claim(buffers: &mut Buffers, job: &McTaskVectorJob, list: Option<&'static str>, i: usize) -> Result<TaskVectorBuffers, Failure> {
        let at = |field| Label::of(list, i, field);
        let n = job.n;
        Ok(TaskVectorBuffers {
            name: buffers.name(job.name, job.name_len, at("name"))?,
            name_label: at("name"),
            base: buffers.src(job.base, n, at("base"))?,
            sft: buffers.src(job.sft, n, at("sft"))?,
            out: buffers.dst(job.out, n, at("out"))?,
            scratch: buffers.optional_output(job.scratch, n, at("scratch"))?,
        })
    }

    /// # Safety
    /// The caller's buffers are valid for `'a` and `Buffers::check_disjoint` passed.
    unsafe fn job<'a>(self) -> Result<TaskVectorJob<'a>, Failure> {
        // SAFETY: forwarded to this function's contract.
        unsafe {
            Ok(TaskVectorJob {
                name: self.name.utf8(self.name_label)?,
                base: self.base.src(),
                sft: self.sft.src(),
                out: self.out.dst(),
                scratch: self.scratch.slice(),
            })
        }
    }
}

/// Computes one tensor's stored task vector `tau'` from its base and SFT
/// weights (SPEC.md §5.2, §5.3), once before the first step, into `out` (any
/// storage dtype). `scratch` (n floats) is required by OnTIES, may be null
/// otherwise; OnTIES with `MC_SCOPE_GLOBAL` needs every tensor at once: use
/// `mc_init_task_vectors` (this function refuses it with `MC_ERR_MISUSE`).
/// Plain AdamW has no task vector (`MC_ERR_MISUSE`).
///
/// # Safety
/// `config` points to a valid configuration; `name` to `name_len` bytes;
/// `base.data`, `sft.data`, `out.data`, and `scratch` when not null, to `n`
/// elements each; `msg` is null or `msg_cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_init_task_vector(
    config: *const McOnlineConfig,
    name: *const c_char,
    name_len: usize,
    base: McSrc,
    sft: McSrc,
    out: McDst,
    scratch: *mut f32,
    n: usize,
    msg: *mut c_char,
    msg_cap: usize,
) -> c_int {
    let job = McTaskVectorJob { name, name_len, n, base, sft, out, scratch };
    let body = || {
        let mut buffers = Buffers::default();
        let config = read_config(&mut buffers, config)?;
        let claim = TaskVectorBuffers::claim(&mut buffers, &job, None, 0)?;
        buffers.check_disjoint()?;
        // SAFETY: every buffer was claimed and found disjoint; validity for the
        // duration of the call is the caller's contract.
        let mut job = unsafe { claim.job()? };
        let optimizer = optimizer(&config)?;
        // merge-core's one-tensor init has no OnTIES (it needs the scratch), so this
        // goes through the several-tensor one, which would take a global scope over
        // this tensor alone: refused, as the single-tensor step refuses it.
        if matches!(optimizer.config().merge, Merge::Ties(TiesConfig { scope: Scope::Global, .. })) {
            return Err(Error::Misuse { what: "per-tensor scope for mc_init_task_vector (global scope: use mc_init_task_vectors)" }.into());
        }
        Ok(optimizer.init_task_vectors(core::slice::from_mut(&mut job))?)
    };
    // SAFETY: `msg` and `msg_cap` are this function's contract.
    unsafe { run(msg, msg_cap, body) }
}

/// Computes the stored task vectors of `job_count` tensors, each job as the
/// arguments of `mc_init_task_vector`. With OnTIES no tensor is written unless
/// every one passes, and with `MC_SCOPE_GLOBAL` the jobs must be in bytewise
/// ascending name order and share one threshold. With OnDARE each tensor is
/// validated before it is written, in order, so on failure the tensors before
/// the one named in the message have been written.
///
/// # Safety
/// `config` points to a valid configuration, `jobs` to `job_count` jobs whose
/// pointers are valid as `mc_init_task_vector` describes; `msg` is null or
/// `msg_cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_init_task_vectors(config: *const McOnlineConfig, jobs: *const McTaskVectorJob, job_count: usize, msg: *mut c_char, msg_cap: usize) -> c_int {
    let body = || {
        let mut buffers = Buffers::default();
        let config = read_config(&mut buffers, config)?;
        let jobs = buffers.input(jobs, job_count, Label::arg("jobs"))?;
        // SAFETY: as in `mc_step_tensors`.
        let jobs = unsafe { jobs.slice() };
        let claims = jobs.iter().enumerate().map(|(i, job)| TaskVectorBuffers::claim(&mut buffers, job, Some("jobs"), i)).collect::<Result<Vec<_>, _>>()?;
        buffers.check_disjoint()?;
        // SAFETY: every buffer was claimed and found disjoint; validity for the
        // duration of the call is the caller's contract.
        let mut jobs = claims.into_iter().map(|c| unsafe { c.job() }).collect::<Result<Vec<_>, _>>()?;
        Ok(optimizer(&config)?.init_task_vectors(&mut jobs)?)
    };
    // SAFETY: `msg` and `msg_cap` are this function's contract.
    unsafe { run(msg, msg_cap, body) }
}

/// The mergekit defaults of a generalized task arithmetic method
/// (`MC_GTA_TASK_ARITHMETIC`, `MC_GTA_TIES`, `MC_GTA_DARE_LINEAR`,
/// `MC_GTA_DARE_TIES`) into `out`.
///
/// # Safety
/// `out` points to one writable `McGtaConfig`; `msg` is null or `msg_cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_gta_preset(method: u32, out: *mut McGtaConfig, msg: *mut c_char, msg_cap: usize) -> c_int {
    let body = || {
        let preset = match method {
            MC_GTA_TASK_ARITHMETIC => Gta::TASK_ARITHMETIC,
            MC_GTA_TIES => Gta::TIES,
            MC_GTA_DARE_LINEAR => Gta::DARE_LINEAR,
            MC_GTA_DARE_TIES => Gta::DARE_TIES,
            other => return Err(unknown_code("method", other, "MC_GTA_TASK_ARITHMETIC (0), MC_GTA_TIES (1), MC_GTA_DARE_LINEAR (2) or MC_GTA_DARE_TIES (3)")),
        };
        let config = McGtaConfig {
            sparsify: match preset.sparsify {
                Sparsify::None => MC_SPARSIFY_NONE,
                Sparsify::Magnitude => MC_SPARSIFY_MAGNITUDE,
                Sparsify::Random => MC_SPARSIFY_RANDOM,
            },
            consensus: preset.consensus,
            normalize: preset.normalize,
            lambda: preset.lambda,
        };
        let mut buffers = Buffers::default();
        let out = buffers.output(out, 1, Label::arg("out"))?;
        // SAFETY: `output` checked the pointer; it is the call's only buffer.
        unsafe { out.slice()[0] = config };
        Ok(())
    };
    // SAFETY: `msg` and `msg_cap` are this function's contract.
    unsafe { run(msg, msg_cap, body) }
}

/// Reads `count` tensors of `n` elements each from the array `srcs`.
fn claim_models(buffers: &mut Buffers, srcs: *const McSrc, count: usize, n: usize, label: Label) -> Result<Vec<InputSrc>, Failure> {
    let array = buffers.input(srcs, count, label)?;
    // SAFETY: `input` checked the array; it is only read, and copied here before
    // any buffer of the call is written.
    let srcs = unsafe { array.slice() };
    srcs.iter().enumerate().map(|(j, &src)| buffers.src(src, n, label.at(j))).collect()
}

/// Linear merge (mergekit `linear`, SPEC.md §6.1) of `model_count` tensors of
/// `n` elements: `sum(weights[i] * models[i])`, divided by `sum(weights)` when
/// `normalize`.
///
/// # Safety
/// `name` points to `name_len` bytes; `models` and `weights` to `model_count`
/// entries each; every `models[i].data` and `out.data` to `n` elements; `msg` is
/// null or `msg_cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_merge_linear(
    name: *const c_char,
    name_len: usize,
    models: *const McSrc,
    weights: *const f64,
    model_count: usize,
    normalize: bool,
    out: McDst,
    n: usize,
    msg: *mut c_char,
    msg_cap: usize,
) -> c_int {
    let body = || {
        let mut buffers = Buffers::default();
        let name = buffers.name(name, name_len, Label::arg("name"))?;
        let models = claim_models(&mut buffers, models, model_count, n, Label::arg("models"))?;
        let weights = buffers.input(weights, model_count, Label::arg("weights"))?;
        let out = buffers.dst(out, n, Label::arg("out"))?;
        buffers.check_disjoint()?;
        // SAFETY: every buffer was claimed and found disjoint; validity for the
        // duration of the call is the caller's contract.
        let (name, models, weights, mut out) = unsafe {
            (name.utf8(Label::arg("name"))?, models.into_iter().map(|m| m.src()).collect::<Vec<_>>(), weights.slice(), out.dst())
        };
        Ok(offline::linear(name, 0, &models, weights, normalize, &mut out)?)
    };
    // SAFETY: `msg` and `msg_cap` are this function's contract.
    unsafe { run(msg, msg_cap, body) }
}

/// The paper's SFT-to-RLHF interpolation (SPEC.md §6.4):
/// `out = sft + weight * (rlhf - sft)`, `weight` in `[0, 1]`.
///
/// # Safety
/// `name` points to `name_len` bytes; `sft.data`, `rlhf.data`, `out.data` to `n`
/// elements each; `msg` is null or `msg_cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_merge_interpolate(name: *const c_char, name_len: usize, sft: McSrc, rlhf: McSrc, weight: f64, out: McDst, n: usize, msg: *mut c_char, msg_cap: usize) -> c_int {
    let body = || {
        let mut buffers = Buffers::default();
        let name = buffers.name(name, name_len, Label::arg("name"))?;
        let sft = buffers.src(sft, n, Label::arg("sft"))?;
        let rlhf = buffers.src(rlhf, n, Label::arg("rlhf"))?;
        let out = buffers.dst(out, n, Label::arg("out"))?;
        buffers.check_disjoint()?;
        // SAFETY: every buffer was claimed and found disjoint; validity for the
        // duration of the call is the caller's contract.
        let (name, sft, rlhf, mut out) = unsafe { (name.utf8(Label::arg("name"))?, sft.src(), rlhf.src(), out.dst()) };
        Ok(offline::interpolate(name, 0, sft, rlhf, weight, &mut out)?)
    };
    // SAFETY: `msg` and `msg_cap` are this function's contract.
    unsafe { run(msg, msg_cap, body) }
}

/// SLERP (mergekit `slerp`, SPEC.md §6.3) between `a` and `b` with factor `t`
/// in `[0, 1]`; the factors it used go to `scalars` unless that is null.
///
/// # Safety
/// `name` points to `name_len` bytes; `a.data`, `b.data`, `out.data` to `n`
/// elements each; `scalars` is null or one writable `McSlerpScalars`; `msg` is
/// null or `msg_cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_merge_slerp(
    name: *const c_char,
    name_len: usize,
    a: McSrc,
    b: McSrc,
    t: f64,
    out: McDst,
    n: usize,
    scalars: *mut McSlerpScalars,
    msg: *mut c_char,
    msg_cap: usize,
) -> c_int {
    let body = || {
        let mut buffers = Buffers::default();
        let name = buffers.name(name, name_len, Label::arg("name"))?;
        let a = buffers.src(a, n, Label::arg("a"))?;
        let b = buffers.src(b, n, Label::arg("b"))?;
        let out = buffers.dst(out, n, Label::arg("out"))?;
        let scalars_out = buffers.optional_output(scalars, 1, Label::arg("scalars"))?;
        buffers.check_disjoint()?;
        // SAFETY: every buffer was claimed and found disjoint; validity for the
        // duration of the call is the caller's contract.
        let (name, a, b, mut out, scalars_out) = unsafe { (name.utf8(Label::arg("name"))?, a.src(), b.src(), out.dst(), scalars_out.slice()) };
        let s = offline::slerp(name, a, b, t, &mut out)?;
        if let Some(slot) = scalars_out.first_mut() {
            *slot = McSlerpScalars { s0: s.s0, s1: s.s1, lerp: s.lerp };
        }
        Ok(())
    };
    // SAFETY: `msg` and `msg_cap` are this function's contract.
    unsafe { run(msg, msg_cap, body) }
}

/// The error-message name of the scope of a global TIES trim, as merge-core's
/// optimizer front calls it.
const GLOBAL_SCOPE: &str = "all tensors (global scope)";

/// One tensor of a task arithmetic merge, as slices.
struct GtaInputs<'a> {
    name: &'a str,
    base: merge_core::dtype::Src<'a>,
    models: Vec<merge_core::dtype::Src<'a>>,
    out: merge_core::dtype::Dst<'a>,
}

/// The TIES trim thresholds of every tensor: one per model, over each tensor or
/// (global scope) over all tensors concatenated; and each tensor's start in its scope.
fn trim_thresholds(tensors: &[GtaInputs<'_>], params: &[ModelParams], scope: Scope) -> Result<Vec<(Vec<Threshold>, u64)>, Error> {
    match scope {
        Scope::PerTensor => tensors
            .iter()
            .map(|t| {
                let thresholds = t.models.iter().zip(params).map(|(m, p)| offline::task_vector_threshold(t.name, p.density, &[t.base], &[*m])).collect::<Result<_, _>>()?;
                Ok((thresholds, 0))
            })
            .collect(),
        Scope::Global => {
            if tensors.windows(2).any(|w| w[0].name.as_bytes() >= w[1].name.as_bytes()) {
                return Err(Error::Misuse { what: "global-scope tensors in strictly ascending bytewise name order" });
            }
            let bases: Vec<_> = tensors.iter().map(|t| t.base).collect();
            let mut thresholds = Vec::with_capacity(params.len());
            for (i, p) in params.iter().enumerate() {
                let models: Vec<_> = tensors.iter().map(|t| t.models[i]).collect();
                thresholds.push(offline::task_vector_threshold(GLOBAL_SCOPE, p.density, &bases, &models)?);
            }
            let mut start = 0u64;
            Ok(tensors
                .iter()
                .map(|t| {
                    let here = start;
                    start += t.base.len() as u64;
                    (thresholds.clone(), here)
                })
                .collect())
        }
    }
}

/// Generalized task arithmetic (mergekit's `task_arithmetic`, `ties`,
/// `dare_linear`, `dare_ties`; SPEC.md §6.2) of `tensor_count` tensors, each with
/// a base and `model_count` models weighted by `params`. `seed` draws the DARE
/// masks; `scope` says where `MC_SPARSIFY_MAGNITUDE` ranks (with
/// `MC_SCOPE_GLOBAL` the tensors must be in bytewise ascending name order).
///
/// Every hyperparameter and trim threshold is computed before anything is
/// written; then the tensors are merged in order, each validated before it is
/// written, so on failure the tensors before the one named in the message have
/// been written.
///
/// # Safety
/// `config` points to a valid `McGtaConfig`; `params` to `model_count` entries;
/// `tensors` to `tensor_count` entries whose `name` points to `name_len` bytes,
/// `models` to `model_count` `McSrc`, and whose `base.data`, `out.data` and
/// every model's `data` to `n` elements; `msg` is null or `msg_cap` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mc_merge_gta(
    config: *const McGtaConfig,
    seed: u64,
    params: *const McModelParams,
    model_count: usize,
    scope: u32,
    tensors: *const McGtaTensor,
    tensor_count: usize,
    msg: *mut c_char,
    msg_cap: usize,
) -> c_int {
    let body = || {
        let mut buffers = Buffers::default();
        let c = read_config(&mut buffers, config)?;
        let sparsify = match c.sparsify {
            MC_SPARSIFY_NONE => Sparsify::None,
            MC_SPARSIFY_MAGNITUDE => Sparsify::Magnitude,
            MC_SPARSIFY_RANDOM => Sparsify::Random,
            other => return Err(unknown_code("config.sparsify", other, "MC_SPARSIFY_NONE (0), MC_SPARSIFY_MAGNITUDE (1) or MC_SPARSIFY_RANDOM (2)")),
        };
        let gta = Gta { sparsify, consensus: c.consensus, normalize: c.normalize, lambda: c.lambda };
        let scope = self::scope("scope", scope)?;
        let params = buffers.input(params, model_count, Label::arg("params"))?;
        // SAFETY: `input` checked the array; it is copied before anything is written.
        let params: Vec<ModelParams> = unsafe { params.slice() }.iter().map(|p| ModelParams { weight: p.weight, density: p.density }).collect();
        let list = buffers.input(tensors, tensor_count, Label::arg("tensors"))?;
        // SAFETY: as for `params`.
        let list: Vec<McGtaTensor> = unsafe { list.slice() }.to_vec();
        let mut claims = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            let at = |field| Label::of(Some("tensors"), i, field);
            claims.push((
                buffers.name(t.name, t.name_len, at("name"))?,
                at("name"),
                buffers.src(t.base, t.n, at("base"))?,
                claim_models(&mut buffers, t.models, model_count, t.n, at("models"))?,
                buffers.dst(t.out, t.n, at("out"))?,
            ));
        }
        buffers.check_disjoint()?;
        let mut inputs = Vec::with_capacity(claims.len());
        for (name, label, base, models, out) in claims {
            // SAFETY: every buffer was claimed and found disjoint; validity for
            // the duration of the call is the caller's contract.
            inputs.push(unsafe { GtaInputs { name: name.utf8(label)?, base: base.src(), models: models.into_iter().map(|m| m.src()).collect(), out: out.dst() } });
        }
        let scopes = if sparsify == Sparsify::Magnitude { trim_thresholds(&inputs, &params, scope)? } else { inputs.iter().map(|_| (Vec::new(), 0)).collect() };
        let plans = inputs.iter().zip(&scopes).map(|(t, (thresholds, start))| GtaPlan::new(&gta, t.name, seed, &params, thresholds, *start)).collect::<Result<Vec<_>, _>>()?;
        for (t, plan) in inputs.iter_mut().zip(&plans) {
            plan.apply(t.name, 0, t.base, &t.models, &mut t.out)?;
        }
        Ok(())
    };
    // SAFETY: `msg` and `msg_cap` are this function's contract.
    unsafe { run(msg, msg_cap, body) }
}
