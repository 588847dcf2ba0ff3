//! `merge_core._merge_core`: merge-core's optimizer step and task-vector init over
//! the memory of CPU tensors, for the Python optimizers in `merge_core/optim.py`.
//!
//! Tensors cross as (address, dtype, length): the Python side takes them from
//! live, contiguous CPU tensors (`data_ptr()`) and keeps those alive for the call,
//! so nothing is copied. This module is private (`_merge_core`): its contract is
//! that every address names `length` elements of `dtype` that nobody else touches
//! during the call. It still refuses null or misaligned addresses and writable
//! ranges that overlap another range, so a slip in the Python layer is an
//! exception, not corrupted memory.

// merge-core's errors name their tensor inline (no allocator), so they are large;
// the same trade merge-core makes.
#![allow(clippy::result_large_err)]

use merge_core::dare::{DareConfig, DareVariant};
use merge_core::dtype::{Dst, Src};
use merge_core::hyper::{AdamConfig, AdamForm, Schedule};
use merge_core::onties;
use merge_core::optim::{Merge, OnlineConfig, Optimizer, Scope, TaskVectorJob, TiesConfig};
use merge_core::parallel::{self, ParallelJob, Param, StateBounds, TaskVector};
use merge_simd::Cpu;
use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

mod shard;

create_exception!(_merge_core, MergeCoreError, PyValueError, "A value merge-core refuses: the message names the tensor, the element index or the hyperparameter.");

pub(crate) fn core_error(e: merge_core::Error) -> PyErr {
    MergeCoreError::new_err(e.to_string())
}

/// Storage formats, numbered as `optim.py` numbers them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dtype {
    F32,
    Bf16,
    F16,
    /// The stored-element bits of a packed task vector.
    Bits,
}

impl Dtype {
    fn from_code(code: u8) -> PyResult<Dtype> {
        match code {
            0 => Ok(Dtype::F32),
            1 => Ok(Dtype::Bf16),
            2 => Ok(Dtype::F16),
            _ => Err(PyTypeError::new_err(format!("dtype code {code}: expected 0 (float32), 1 (bfloat16) or 2 (float16)"))),
        }
    }

    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::Bits => 1,
        }
    }
}

/// One memory range handed over for a call; all of a call's ranges are checked
/// together before any slice is made.
pub(crate) struct Range {
    tensor: String,
    what: &'static str,
    addr: usize,
    dtype: Dtype,
    len: usize,
    writable: bool,
}

impl Range {
    fn bytes(&self) -> (usize, usize) {
        (self.addr, self.addr + self.len * self.dtype.size())
    }
}

fn check_ranges(ranges: &[Range]) -> PyResult<()> {
    for r in ranges {
        if r.len == 0 {
            continue;
        }
        if r.addr == 0 || r.addr % r.dtype.size() != 0 {
            return Err(PyValueError::new_err(format!("tensor `{}`: {} at address {:#x} is null or misaligned", r.tensor, r.what, r.addr)));
        }
        if r.addr.checked_add(r.len * r.dtype.size()).is_none() {
            return Err(PyValueError::new_err(format!("tensor `{}`: {} of {} elements wraps the address space", r.tensor, r.what, r.len)));
        }
    }
    let mut spans: Vec<&Range> = ranges.iter().filter(|r| r.len > 0).collect();
    spans.sort_by_key(|r| r.addr);
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            if b.bytes().0 >= a.bytes().1 {
                break;
            }
            if a.writable || b.writable {
                return Err(PyValueError::new_err(format!(
                    "tensor `{}`: {} overlaps {} of tensor `{}` and one of them is written; pass separate tensors",
                    a.tensor, a.what, b.what, b.tensor
                )));
            }
        }
    }
    Ok(())
}

// SAFETY (for the six helpers below): `check_ranges` accepted the range
// (non-null, aligned, no overlap with a writable range), and the caller's
// contract (module docs) is that it names `len` live elements of this type,
// untouched by anyone else until the call returns. Empty ranges never touch
// their address.
pub(crate) fn src<'a>(r: &Range) -> Src<'a> {
    if r.len == 0 {
        return Src::F32(&[]);
    }
    match r.dtype {
        Dtype::F32 => Src::F32(unsafe { std::slice::from_raw_parts(r.addr as *const f32, r.len) }),
        Dtype::Bf16 => Src::Bf16(unsafe { std::slice::from_raw_parts(r.addr as *const u16, r.len) }),
        Dtype::F16 => Src::F16(unsafe { std::slice::from_raw_parts(r.addr as *const u16, r.len) }),
        Dtype::Bits => unreachable!("stored-element bits are read with `bytes`"),
    }
}

fn bytes<'a>(r: &Range) -> &'a [u8] {
    if r.len == 0 {
        return &[];
    }
    unsafe { std::slice::from_raw_parts(r.addr as *const u8, r.len) }
}

pub(crate) fn f32_ref<'a>(r: &Range) -> &'a [f32] {
    debug_assert!(r.dtype == Dtype::F32);
    if r.len == 0 {
        return &[];
    }
    unsafe { std::slice::from_raw_parts(r.addr as *const f32, r.len) }
}

pub(crate) fn f32_mut<'a>(r: &Range) -> &'a mut [f32] {
    debug_assert!(r.writable && r.dtype == Dtype::F32);
    if r.len == 0 {
        return &mut [];
    }
    unsafe { std::slice::from_raw_parts_mut(r.addr as *mut f32, r.len) }
}

fn dst<'a>(r: &Range) -> Dst<'a> {
    match param_mut(r) {
        Param::F32(s) => Dst::F32(s),
        Param::Bf16(s) => Dst::Bf16(s),
        Param::F16(s) => Dst::F16(s),
    }
}

fn param_mut<'a>(r: &Range) -> Param<'a> {
    if r.len == 0 {
        return Param::F32(&mut []);
    }
    match r.dtype {
        Dtype::F32 => Param::F32(f32_mut(r)),
        Dtype::Bf16 => Param::Bf16(unsafe { std::slice::from_raw_parts_mut(r.addr as *mut u16, r.len) }),
        Dtype::F16 => Param::F16(unsafe { std::slice::from_raw_parts_mut(r.addr as *mut u16, r.len) }),
        Dtype::Bits => unreachable!("stored-element bits are never written"),
    }
}

/// A validated optimizer configuration. The step number and learning rate come
/// with each call (they live in the Python optimizer's state and param groups;
/// torch's schedulers set the rate). `warmup_cosine=(warmup, total)` applies
/// merge-core's own schedule to that rate instead, as the golden vectors do.
#[pyclass(frozen, module = "merge_core._merge_core")]
struct Core {
    config: OnlineConfig,
}

/// One tensor of `Core.step`: name, length, gradient (address, dtype), parameter
/// (address, dtype), exp_avg, exp_avg_sq, cached delta (or None), task vector
/// (or None).
type StepTensor = (String, usize, (usize, u8), (usize, u8), usize, usize, Option<usize>, Option<TauArg>);

/// A task vector: dense (address, dtype), or packed (address of the
/// stored-element bits, address of the float32 values, number of values).
#[derive(FromPyObject)]
enum TauArg {
    Dense((usize, u8)),
    Packed((usize, usize, usize)),
}

/// One range of `Core.sharded_step` (see there).
type ShardTensor = (String, u64, u64, usize, usize, usize, usize, usize, Option<usize>, Option<usize>);

/// One tensor of `Core.init_task_vectors`: name, length, base (address, dtype),
/// SFT (address, dtype), output τ' (address, dtype).
type InitTensor = (String, usize, (usize, u8), (usize, u8), (usize, u8));

#[pymethods]
impl Core {
    #[new]
    #[pyo3(signature = (*, method, lr, beta1, beta2, eps, weight_decay, adam_form, p, alpha, rescale, clip, variant, scope, k, seed, warmup_cosine=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        method: &str,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        adam_form: &str,
        p: f64,
        alpha: f64,
        rescale: bool,
        clip: f64,
        variant: &str,
        scope: &str,
        k: u32,
        seed: u64,
        warmup_cosine: Option<(u64, u64)>,
    ) -> PyResult<Self> {
        let form = match adam_form {
            "hf" => AdamForm::HuggingFace,
            "torch" => AdamForm::Torch,
            _ => return Err(PyValueError::new_err(format!("adam_form {adam_form:?}: expected \"hf\" (the official code's) or \"torch\""))),
        };
        let paper = match variant {
            "reference" => false,
            "paper" => true,
            _ => return Err(PyValueError::new_err(format!("variant {variant:?}: expected \"reference\" or \"paper\""))),
        };
        let scope = match scope {
            "tensor" => Scope::PerTensor,
            "global" => Scope::Global,
            _ => return Err(PyValueError::new_err(format!("scope {scope:?}: expected \"tensor\" or \"global\""))),
        };
        let merge = match method {
            "adamw" => Merge::None,
            "dare" => Merge::Dare(DareConfig { variant: if paper { DareVariant::Paper } else { DareVariant::Reference }, p, alpha, rescale, clip }),
            "ties" => Merge::Ties(TiesConfig { variant: if paper { onties::Variant::Paper } else { onties::Variant::Reference }, p, alpha, rescale, scope }),
            _ => return Err(PyValueError::new_err(format!("method {method:?}: expected \"adamw\", \"dare\" or \"ties\""))),
        };
        let adam = AdamConfig { form, lr, beta1, beta2, eps, weight_decay, schedule: warmup_cosine.map_or(Schedule::Constant, |(warmup, total)| Schedule::WarmupCosine { warmup, total }) };
        let config = OnlineConfig { adam, merge, k, seed };
        Optimizer::new(config).map_err(core_error)?;
        Ok(Core { config })
    }

    /// Steps every tensor in place as step `step` (1-based) with learning rate
    /// `lr`, on `threads` threads; the bits do not depend on `threads`. Nothing is
    /// written unless every tensor passes. With a `scratch`, the step's room is
    /// taken from it and left in it for the next step. With `bounds` (one per
    /// tensor: what the previous step returned for the same, since unwritten,
    /// parameter and state tensors, or None), their bounds are returned for the next step
    /// (`merge_core::parallel::step_tensors_tracked`).
    #[pyo3(signature = (step, lr, tensors, threads, scratch=None, bounds=None))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn step(&self, py: Python<'_>, step: u64, lr: f64, tensors: Vec<StepTensor>, threads: usize, mut scratch: Option<PyRefMut<'_, Scratch>>, bounds: Option<Vec<Option<(u32, u32, u32, u32)>>>) -> PyResult<Option<Vec<(u32, u32, u32, u32)>>> {
        if bounds.as_ref().is_some_and(|b| b.len() != tensors.len()) {
            return Err(PyValueError::new_err("bounds: one entry (or None) per tensor"));
        }
        let config = OnlineConfig { adam: AdamConfig { lr, ..self.config.adam }, ..self.config };
        let plan = Optimizer::new(config).and_then(|o| o.plan(step)).map_err(core_error)?;
        let merging = !matches!(config.merge, Merge::None);
        let mut ranges = Vec::with_capacity(tensors.len() * 6);
        for (name, n, grad, theta, m, v, cached, tau) in &tensors {
            let r = |what, addr, dtype, writable| -> PyResult<Range> { Ok(Range { tensor: name.clone(), what, addr, dtype: Dtype::from_code(dtype)?, len: *n, writable }) };
            ranges.push(r("gradient", grad.0, grad.1, false)?);
            ranges.push(r("parameter", theta.0, theta.1, true)?);
            ranges.push(r("exp_avg", *m, 0, true)?);
            ranges.push(r("exp_avg_sq", *v, 0, true)?);
            if let Some(c) = cached {
                ranges.push(r("cached delta", *c, 0, true)?);
            }
            match tau {
                Some(TauArg::Dense((addr, dtype))) => ranges.push(r("task vector", *addr, *dtype, false)?),
                Some(TauArg::Packed((stored, values, count))) => {
                    ranges.push(Range { tensor: name.clone(), what: "task vector's stored-element bits", addr: *stored, dtype: Dtype::Bits, len: n.div_ceil(8), writable: false });
                    ranges.push(Range { tensor: name.clone(), what: "task vector's values", addr: *values, dtype: Dtype::F32, len: *count, writable: false });
                }
                None => {}
            }
        }
        check_ranges(&ranges)?;
        // Without a stored task vector (use_merge=False) the merge adds α ⊗ (+0).
        let zeros: Vec<Vec<f32>> = tensors.iter().map(|t| if merging && t.7.is_none() { vec![0.0; t.1] } else { Vec::new() }).collect();
        let mut jobs = Vec::with_capacity(tensors.len());
        let mut it = ranges.iter();
        for ((name, _, _, _, _, _, cached, tau), zero) in tensors.iter().zip(&zeros) {
            let (grad, theta, m, v) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
            let cached = cached.map(|_| f32_mut(it.next().unwrap()));
            let tau = match tau {
                Some(TauArg::Dense(_)) => TaskVector::Dense(src(it.next().unwrap())),
                Some(TauArg::Packed(_)) => TaskVector::Packed { stored: bytes(it.next().unwrap()), values: f32_ref(it.next().unwrap()) },
                None => TaskVector::Dense(Src::F32(zero)),
            };
            jobs.push(ParallelJob { name, grad: src(grad), theta: param_mut(theta), m: f32_mut(m), v: f32_mut(v), cached, tau });
        }
        let mut kept: Vec<StateBounds> = bounds.iter().flatten().map(|b| b.map_or(StateBounds::UNKNOWN, |(theta, m, v, c)| StateBounds::from_bits([theta, m, v, c]))).collect();
        let mut fresh = parallel::Scratch::with_room(update_room);
        let room = scratch.as_deref_mut().map_or(&mut fresh, |s| &mut s.room);
        py.detach(|| parallel::step_tensors_tracked(&plan, &mut jobs, threads, &Cpu::detect(), room, &mut kept)).map_err(core_error)?;
        Ok(bounds.map(|_| {
            kept.iter()
                .map(|b| {
                    let [theta, m, v, c] = b.to_bits();
                    (theta, m, v, c)
                })
                .collect()
        }))
    }

    /// Starts step `step` over this process's ranges of sharded float32 tensors:
    /// (name, elements in the whole tensor, global index of the range's first
    /// element, range length, gradient, parameter, exp_avg, exp_avg_sq, cached
    /// delta or None, task vector or None), each a float32 address. Every process
    /// passes every tensor (a range may be empty), in the same order: bytewise
    /// name order for OnTIES with global scope.
    fn sharded_step(&self, step: u64, lr: f64, tensors: Vec<ShardTensor>) -> PyResult<shard::ShardedStep> {
        let config = OnlineConfig { adam: AdamConfig { lr, ..self.config.adam }, ..self.config };
        let plan = Optimizer::new(config).and_then(|o| o.plan(step)).map_err(core_error)?;
        let (ties, global) = match config.merge {
            Merge::Ties(t) => (Some((t.p as f32, t.rescale)), t.scope == Scope::Global),
            _ => (None, false),
        };
        if global {
            for pair in tensors.windows(2) {
                if pair[0].0.as_bytes() >= pair[1].0.as_bytes() {
                    return Err(PyValueError::new_err("global scope: tensors must come in strictly ascending bytewise name order"));
                }
            }
        }
        let mut ranges = Vec::new();
        let mut shards = Vec::with_capacity(tensors.len());
        let mut scope_offset = 0u64;
        for (name, full, offset, len, grad, theta, m, v, cached, tau) in tensors {
            if offset.checked_add(len as u64).is_none_or(|end| end > full) {
                return Err(PyValueError::new_err(format!("tensor `{name}`: range {offset}+{len} exceeds its {full} elements")));
            }
            let r = |what, addr, writable| Range { tensor: name.clone(), what, addr, dtype: Dtype::F32, len, writable };
            let shard = shard::Shard {
                grad: r("gradient", grad, false),
                theta: r("parameter", theta, true),
                m: r("exp_avg", m, true),
                v: r("exp_avg_sq", v, true),
                cached: cached.map(|c| r("cached delta", c, true)),
                tau: tau.map(|t| r("task vector", t, false)),
                scope_offset: if global { scope_offset } else { 0 },
                name,
                full,
                offset,
                len,
            };
            scope_offset += full;
            for range in [&shard.grad, &shard.theta, &shard.m, &shard.v].into_iter().chain(shard.cached.as_ref()).chain(shard.tau.as_ref()) {
                ranges.push(Range { tensor: range.tensor.clone(), what: range.what, addr: range.addr, dtype: range.dtype, len: range.len, writable: range.writable });
            }
            shards.push(shard);
        }
        check_ranges(&ranges)?;
        Ok(shard::ShardedStep::new(plan, shards, ties, global))
    }

    /// Computes each tensor's stored task vector `τ'` (float32) from its base and
    /// SFT weights; OnTIES with global scope wants the tensors in bytewise name
    /// order. Nothing is written unless every tensor passes.
    fn init_task_vectors(&self, py: Python<'_>, tensors: Vec<InitTensor>) -> PyResult<()> {
        let opt = Optimizer::new(self.config).map_err(core_error)?;
        let mut ranges = Vec::with_capacity(tensors.len() * 3);
        for (name, n, base, sft, out) in &tensors {
            let r = |what, addr, dtype, writable| -> PyResult<Range> { Ok(Range { tensor: name.clone(), what, addr, dtype: Dtype::from_code(dtype)?, len: *n, writable }) };
            ranges.push(r("base weights", base.0, base.1, false)?);
            ranges.push(r("SFT weights", sft.0, sft.1, false)?);
            ranges.push(r("task vector", out.0, out.1, true)?);
        }
        check_ranges(&ranges)?;
        let ties = matches!(self.config.merge, Merge::Ties(_));
        let mut scratch: Vec<Vec<f32>> = tensors.iter().map(|t| if ties { vec![0.0; t.1] } else { Vec::new() }).collect();
        let mut jobs: Vec<TaskVectorJob<'_>> = tensors
            .iter()
            .zip(ranges.chunks(3))
            .zip(scratch.iter_mut())
            .map(|((t, r), scratch)| TaskVectorJob { name: &t.0, base: src(&r[0]), sft: src(&r[1]), out: dst(&r[2]), scratch })
            .collect();
        py.detach(|| opt.init_task_vectors(&mut jobs)).map_err(core_error)
    }
}

/// OnTIES's update room (`parallel::Scratch::with_room`), asking Linux to back
/// it with 2 MiB pages. Without `keep_scratch` a room above glibc's mapping
/// threshold (32 MB) is mapped afresh at every step, and faulting it in 4 KiB
/// pages took 42 ms for 64 MB on a Zen 5 VM, against 10 ms in 2 MiB pages (6 ms
/// to write it once mapped). Where transparent huge pages are off the advice
/// is refused, and the room is ordinary memory.
#[cfg(target_os = "linux")]
fn update_room(len: usize) -> Vec<f32> {
    const HUGE: usize = 1 << 21;
    let mut room = Vec::<f32>::with_capacity(len);
    let start = room.as_mut_ptr() as usize;
    let (first, end) = (start.next_multiple_of(HUGE), (start + len * size_of::<f32>()) / HUGE * HUGE);
    if end > first {
        // SAFETY: the range lies inside the allocation just made, which nothing
        // else can see yet; MADV_HUGEPAGE is advice, and changes no value.
        unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
    }
    room.resize(len, 0.0);
    room
}

#[cfg(not(target_os = "linux"))]
fn update_room(len: usize) -> Vec<f32> {
    vec![0.0; len]
}

/// Room a step reuses between steps: the OnTIES update, float32, as large as
/// the largest tensor stepped (or all of them, for global scope), and each
/// thread's chunk buffers.
#[pyclass(module = "merge_core._merge_core")]
struct Scratch {
    room: parallel::Scratch,
}

#[pymethods]
impl Scratch {
    #[new]
    fn new() -> Self {
        Scratch { room: parallel::Scratch::with_room(update_room) }
    }

    /// Bytes held.
    #[getter]
    fn nbytes(&self) -> usize {
        self.room.bytes()
    }
}

#[pymodule]
fn _merge_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Core>()?;
    m.add_class::<Scratch>()?;
    m.add_class::<shard::ShardedStep>()?;
    m.add("MergeCoreError", m.py().get_type::<MergeCoreError>())?;
    m.add("CHUNK", parallel::CHUNK)?;
    m.add("CPU_LEVEL", Cpu::detect().level().name())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
