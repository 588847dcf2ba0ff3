//! The stored task vectors `τ'`: computed once by merge-core, on the host, and
//! handed to [`GpuOptimizer::new`](super::GpuOptimizer::new), which uploads each
//! in its storage dtype, dense or as its non-zero entries.

use merge_core::dtype::{Dst, Dtype, Src};
use merge_core::optim::{OnlineConfig, Optimizer, TaskVectorJob};

use crate::context::{GpuContext, GpuError};
use crate::tensor::{GpuArray, Storage, load_f32};

/// The task vector as the kernels read it: dense in its dtype, or (when smaller,
/// as for the sparse τ' of OnDARE-reference and OnTIES) only its non-zero entries.
pub(super) fn upload(ctx: &GpuContext, tau: Src<'_>) -> GpuArray {
    // The compact form holds the stored values read back as binary32 and flushed.
    let values = load_f32(&tau);
    let dense = match tau {
        Src::F32(v) => GpuArray::from_f32(ctx, "task vector", v),
        Src::Bf16(bits) | Src::F16(bits) => GpuArray::from_u16(ctx, "task vector", Storage::from(tau.dtype()), bits),
    };
    if GpuArray::compact_bytes(ctx, &values) < dense.device_bytes() { GpuArray::compact(ctx, "task vector", &values) } else { dense }
}

/// A stored task vector `τ'` in its storage dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum StoredTau {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
}

impl StoredTau {
    fn zeros(dtype: Dtype, n: usize) -> Self {
        match dtype {
            Dtype::F32 => StoredTau::F32(vec![0.0; n]),
            Dtype::Bf16 => StoredTau::Bf16(vec![0; n]),
            Dtype::F16 => StoredTau::F16(vec![0; n]),
        }
    }

    /// The values as [`TensorInit::tau`](super::TensorInit::tau) takes them.
    pub fn src(&self) -> Src<'_> {
        match self {
            StoredTau::F32(v) => Src::F32(v),
            StoredTau::Bf16(v) => Src::Bf16(v),
            StoredTau::F16(v) => Src::F16(v),
        }
    }

    fn dst(&mut self) -> Dst<'_> {
        match self {
            StoredTau::F32(v) => Dst::F32(v),
            StoredTau::Bf16(v) => Dst::Bf16(v),
            StoredTau::F16(v) => Dst::F16(v),
        }
    }
}

/// One tensor's inputs to [`task_vectors`].
#[derive(Clone, Copy, Debug)]
pub struct TaskInput<'a> {
    pub name: &'a str,
    pub base: Src<'a>,
    pub sft: Src<'a>,
    /// The storage dtype of `τ'`.
    pub dtype: Dtype,
}

/// `τ'` of every tensor, by merge-core's `init_task_vectors` (every tensor in
/// one call, as OnTIES's global scope needs), in the order given: for callers of
/// [`GpuOptimizer`](super::GpuOptimizer) that do not compute their own. Every
/// tensor is validated before any is written.
pub fn task_vectors(config: OnlineConfig, inputs: &[TaskInput<'_>]) -> Result<Vec<StoredTau>, GpuError> {
    let cpu = Optimizer::new(config)?;
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by(|&a, &b| inputs[a].name.as_bytes().cmp(inputs[b].name.as_bytes()));
    let mut outs: Vec<StoredTau> = inputs.iter().map(|t| StoredTau::zeros(t.dtype, t.sft.len())).collect();
    // OnTIES holds τ before trimming it; OnDARE needs no room.
    let ties = cpu.ties().is_some();
    let mut scratch: Vec<Vec<f32>> = inputs.iter().map(|t| if ties { vec![0.0; t.sft.len()] } else { Vec::new() }).collect();
    let mut slots: Vec<Option<(&mut StoredTau, &mut Vec<f32>)>> = outs.iter_mut().zip(scratch.iter_mut()).map(Some).collect();
    let mut jobs = Vec::with_capacity(inputs.len());
    for &i in &order {
        let (out, scratch) = slots[i].take().expect("each index once");
        let t = &inputs[i];
        jobs.push(TaskVectorJob { name: t.name, base: t.base, sft: t.sft, out: out.dst(), scratch });
    }
    cpu.init_task_vectors(&mut jobs)?;
    drop(jobs);
    Ok(outs)
}
