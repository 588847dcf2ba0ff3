//! The stored task vectors `τ'`, computed by merge-core on the host and uploaded
//! in their storage dtype, dense or as their non-zero entries.

use merge_core::dtype::{Dst, Dtype, Src};
use merge_core::optim::{Optimizer, TaskVectorJob};

use super::TensorInit;
use crate::context::{GpuContext, GpuError};
use crate::tensor::{GpuArray, Storage, load_f32};

/// The task vector as the kernels read it: dense in its dtype, or (when smaller,
/// as for the sparse τ' of OnDARE-reference and OnTIES) only its non-zero entries.
/// `values` are the stored values read back as binary32 and flushed.
fn dense_or_compact(ctx: &GpuContext, values: &[f32], dense: impl FnOnce() -> GpuArray) -> GpuArray {
    let d = dense();
    if GpuArray::compact_bytes(ctx, values) < d.device_bytes() { GpuArray::compact(ctx, "task vector", values) } else { d }
}

/// OnDARE task vectors `τ'` of every tensor, by merge-core, on all CPU cores
/// (they are independent per tensor); the first failing tensor in name order
/// gives the error, as a sequential loop would.
pub(super) fn dare_task_vectors(cpu: &Optimizer, order: &[&TensorInit<'_>]) -> Result<Vec<HostTau>, GpuError> {
    let one = |t: &TensorInit<'_>| -> Result<HostTau, GpuError> {
        let (base, sft) =
            t.task.ok_or_else(|| GpuError::Invalid(format!("tensor `{}`: merging needs its base and SFT weights", t.name)))?;
        let n = t.theta.len();
        Ok(match t.tau_dtype {
            Dtype::F32 => {
                let mut out = vec![0f32; n];
                cpu.init_task_vector(t.name, base, sft, &mut Dst::F32(&mut out))?;
                HostTau::F32(out)
            }
            d => {
                let mut out = vec![0u16; n];
                let mut dst = if d == Dtype::Bf16 { Dst::Bf16(&mut out) } else { Dst::F16(&mut out) };
                cpu.init_task_vector(t.name, base, sft, &mut dst)?;
                HostTau::Half(d, out)
            }
        })
    };
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let per = order.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let one = &one;
        let handles: Vec<_> =
            order.chunks(per).map(|part| s.spawn(move || part.iter().map(|t| one(t)).collect::<Vec<_>>())).collect();
        // A panic in a worker is a bug; re-raise it here.
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// A task vector computed on the host, in its storage dtype.
pub(super) enum HostTau {
    F32(Vec<f32>),
    Half(Dtype, Vec<u16>),
}

impl HostTau {
    pub(super) fn upload(&self, ctx: &GpuContext) -> GpuArray {
        match self {
            HostTau::F32(v) => dense_or_compact(ctx, v, || GpuArray::from_f32(ctx, "task vector", v)),
            HostTau::Half(d, bits) => {
                let src = if *d == Dtype::F16 { Src::F16(bits) } else { Src::Bf16(bits) };
                let values = load_f32(&src);
                dense_or_compact(ctx, &values, || GpuArray::from_u16(ctx, "task vector", Storage::from(*d), bits))
            }
        }
    }
}

/// OnTIES task vectors `τ'` of every tensor (name order), by merge-core itself:
/// trimmed per tensor or globally, rescaled when asked, stored in each dtype.
pub(super) fn ties_task_vectors(cpu: &Optimizer, order: &[&TensorInit<'_>]) -> Result<Vec<HostTau>, GpuError> {
    let mut outs: Vec<HostTau> = order
        .iter()
        .map(|t| match t.tau_dtype {
            Dtype::F32 => HostTau::F32(vec![0.0; t.theta.len()]),
            d => HostTau::Half(d, vec![0; t.theta.len()]),
        })
        .collect();
    let mut scratch: Vec<Vec<f32>> = order.iter().map(|t| vec![0.0; t.theta.len()]).collect();
    let mut jobs = Vec::with_capacity(order.len());
    for ((t, out), sc) in order.iter().zip(outs.iter_mut()).zip(scratch.iter_mut()) {
        let (base, sft) = t
            .task
            .ok_or_else(|| GpuError::Invalid(format!("tensor `{}`: OnTIES needs its base and SFT weights", t.name)))?;
        let out = match out {
            HostTau::F32(v) => Dst::F32(v),
            HostTau::Half(Dtype::F16, v) => Dst::F16(v),
            HostTau::Half(_, v) => Dst::Bf16(v),
        };
        jobs.push(TaskVectorJob { name: t.name, base, sft, out, scratch: sc });
    }
    cpu.init_task_vectors(&mut jobs)?;
    drop(jobs);
    Ok(outs)
}
