//! RMSNorm forward (saving `rstd` per row) and backward (`rmsnorm.wgsl`).

use super::{dispatch, expect_len, groups, kernel, GpuVec};
use crate::context::{GpuContext, GpuError};
use crate::kernel::Kernel;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    rows: u32,
    cols: u32,
    eps: f32,
    pad: u32,
}

pub struct RmsNorm {
    ctx: GpuContext,
    forward: Kernel,
    backward_input: Kernel,
    backward_weight: Kernel,
}

impl RmsNorm {
    pub fn new(ctx: &GpuContext) -> RmsNorm {
        let src = include_str!("rmsnorm.wgsl");
        RmsNorm {
            ctx: ctx.clone(),
            forward: kernel(ctx, "rmsnorm_forward", src, "rmsnorm_forward"),
            backward_input: kernel(ctx, "rmsnorm_backward_input", src, "rmsnorm_backward_input"),
            backward_weight: kernel(ctx, "rmsnorm_backward_weight", src, "rmsnorm_backward_weight"),
        }
    }

    fn params(x: &GpuVec, w: &GpuVec, rstd: &GpuVec, eps: f32) -> Result<NormParams, GpuError> {
        let (rows, cols) = (rstd.len(), w.len());
        expect_len("rmsnorm input", x, rows * cols)?;
        Ok(NormParams { rows: rows as u32, cols: cols as u32, eps, pad: 0 })
    }

    /// `y = x / √(mean(x²) + eps) · w` over rows of `w.len()` columns; `rstd`
    /// (one per row) is written for the backward pass.
    pub fn forward(&self, y: &GpuVec, rstd: &GpuVec, x: &GpuVec, w: &GpuVec, eps: f32) -> Result<(), GpuError> {
        let p = Self::params(x, w, rstd, eps)?;
        expect_len("rmsnorm output", y, x.len())?;
        dispatch(&self.ctx, &self.forward, &p, &[(1, x), (2, w), (3, rstd), (4, y)], p.rows)
    }

    /// `dx += rstd (dy⊙w − n · mean(dy⊙w⊙n))`, `dw += Σ_t dy ⊙ n`, `n = x·rstd`.
    pub fn backward(&self, dx: &GpuVec, dw: &GpuVec, dy: &GpuVec, x: &GpuVec, w: &GpuVec, rstd: &GpuVec) -> Result<(), GpuError> {
        let p = Self::params(x, w, rstd, 0.0)?;
        expect_len("rmsnorm output gradient", dy, x.len())?;
        expect_len("rmsnorm input gradient", dx, x.len())?;
        expect_len("rmsnorm weight gradient", dw, w.len())?;
        dispatch(&self.ctx, &self.backward_input, &p, &[(1, x), (2, w), (3, rstd), (5, dy), (6, dx)], p.rows)?;
        dispatch(&self.ctx, &self.backward_weight, &p, &[(1, x), (3, rstd), (5, dy), (7, dw)], groups(w.len()))
    }
}
