//! SwiGLU and the residual additions (`elementwise.wgsl`).

use super::{dispatch, expect_len, groups, kernel, GpuVec};
use crate::context::{GpuContext, GpuError};
use crate::kernel::Kernel;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ElemParams {
    n: u32,
    pad: [u32; 3],
}

pub struct Elementwise {
    ctx: GpuContext,
    swiglu_forward: Kernel,
    swiglu_backward: Kernel,
    add: Kernel,
    add_assign: Kernel,
}

impl Elementwise {
    pub fn new(ctx: &GpuContext) -> Elementwise {
        let src = include_str!("elementwise.wgsl");
        Elementwise {
            ctx: ctx.clone(),
            swiglu_forward: kernel(ctx, "swiglu_forward", src, "swiglu_forward"),
            swiglu_backward: kernel(ctx, "swiglu_backward", src, "swiglu_backward"),
            add: kernel(ctx, "add", src, "add"),
            add_assign: kernel(ctx, "add_assign", src, "add_assign"),
        }
    }

    fn params(what: &str, n: usize, others: &[&GpuVec]) -> Result<ElemParams, GpuError> {
        for v in others {
            expect_len(what, v, n)?;
        }
        Ok(ElemParams { n: n as u32, pad: [0; 3] })
    }

    /// `h = silu(gate) ⊙ up`.
    pub fn swiglu_forward(&self, h: &GpuVec, gate: &GpuVec, up: &GpuVec) -> Result<(), GpuError> {
        let p = Self::params("swiglu operand", h.len(), &[gate, up])?;
        dispatch(&self.ctx, &self.swiglu_forward, &p, &[(1, gate), (2, up), (4, h)], groups(h.len()))
    }

    /// `dup = dh ⊙ silu(gate)`, `dgate = dh ⊙ up ⊙ σ(gate)(1 + gate(1 − σ(gate)))`; overwrites both.
    pub fn swiglu_backward(&self, dgate: &GpuVec, dup: &GpuVec, dh: &GpuVec, gate: &GpuVec, up: &GpuVec) -> Result<(), GpuError> {
        let p = Self::params("swiglu operand", dh.len(), &[dgate, dup, gate, up])?;
        dispatch(&self.ctx, &self.swiglu_backward, &p, &[(1, gate), (2, up), (3, dh), (4, dgate), (5, dup)], groups(dh.len()))
    }

    /// `out = a + b` (a residual connection into a fresh array).
    pub fn add(&self, out: &GpuVec, a: &GpuVec, b: &GpuVec) -> Result<(), GpuError> {
        let p = Self::params("residual operand", out.len(), &[a, b])?;
        dispatch(&self.ctx, &self.add, &p, &[(1, a), (2, b), (4, out)], groups(out.len()))
    }

    /// `acc += x` (a residual connection in place, or a gradient reaching a
    /// stream from its second consumer).
    pub fn add_assign(&self, acc: &GpuVec, x: &GpuVec) -> Result<(), GpuError> {
        let p = Self::params("residual operand", acc.len(), &[x])?;
        dispatch(&self.ctx, &self.add_assign, &p, &[(1, x), (4, acc)], groups(acc.len()))
    }
}
