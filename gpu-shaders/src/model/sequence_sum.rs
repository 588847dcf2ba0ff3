//! Masked per-sequence sums of per-token values (`sequence_sum.wgsl`): the
//! summed log-probability of a sequence's scored tokens, from the LM head's
//! per-row log-probabilities.

use super::{dispatch, expect_len, kernel, GpuVec};
use crate::context::{GpuContext, GpuError};
use crate::kernel::Kernel;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SumParams {
    rows: u32,
    slot: u32,
    pad: [u32; 2],
}

pub struct SequenceSum {
    ctx: GpuContext,
    kernel: Kernel,
}

impl SequenceSum {
    pub fn new(ctx: &GpuContext) -> SequenceSum {
        SequenceSum { ctx: ctx.clone(), kernel: kernel(ctx, "sequence_sum", include_str!("sequence_sum.wgsl"), "sequence_sum") }
    }

    /// `totals[slot] = Σ values[t]` over the rows `t` with `mask[t] ≠ 0` (u32
    /// words), in the fixed order of SPEC.md §9; the other slots are left as they are.
    pub fn sum(&self, totals: &GpuVec, slot: usize, values: &GpuVec, mask: &GpuVec) -> Result<(), GpuError> {
        expect_len("sequence mask", mask, values.len())?;
        if slot >= totals.len() {
            return Err(GpuError::Invalid(format!("sequence sum: slot {slot} of {} totals", totals.len())));
        }
        let p = SumParams { rows: values.len() as u32, slot: slot as u32, pad: [0; 2] };
        dispatch(&self.ctx, &self.kernel, &p, &[(1, values), (2, mask), (3, totals)], 1)
    }
}
