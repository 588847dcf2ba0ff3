//! Rotary position embeddings in place, forward and backward (`rope.wgsl`).

use super::{dispatch, groups, kernel, GpuVec};
use crate::context::{GpuContext, GpuError};
use crate::kernel::Kernel;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeParams {
    rows: u32,
    heads: u32,
    half: u32,
    sign: f32,
    first: u32,
    pad: [u32; 3],
}

/// The rotation for one table of angles: `cos` and `sin` are `[positions, half]`,
/// row `t` for the position of row `t` of the rotated arrays, which may have
/// fewer rows than the tables (one table serves every shorter sequence). The
/// tables carry the rope variant (base frequency, scaling), so the kernel needs
/// nothing else.
pub struct Rope {
    ctx: GpuContext,
    kernel: Kernel,
    half: usize,
    cos: GpuVec,
    sin: GpuVec,
}

impl Rope {
    pub fn new(ctx: &GpuContext, half: usize, cos: &[f32], sin: &[f32]) -> Result<Rope, GpuError> {
        if half == 0 || cos.len() != sin.len() || !cos.len().is_multiple_of(half) {
            return Err(GpuError::Invalid(format!("rope tables of {} cos and {} sin values for rows of {half} angles", cos.len(), sin.len())));
        }
        Ok(Rope {
            ctx: ctx.clone(),
            kernel: kernel(ctx, "rope", include_str!("rope.wgsl"), "rope"),
            half,
            cos: GpuVec::from_f32(ctx, "rope cos", cos)?,
            sin: GpuVec::from_f32(ctx, "rope sin", sin)?,
        })
    }

    /// Positions the tables cover: the most rows an array may have.
    pub fn positions(&self) -> usize {
        self.cos.len() / self.half
    }

    /// Rotates every head of `x` (`[rows, heads, 2·half]`, `rows ≤ positions()`) in place.
    pub fn forward(&self, x: &GpuVec, heads: usize) -> Result<(), GpuError> {
        self.rotate(x, heads, 0, 1.0)
    }

    /// [`Self::forward`] for rows at positions `first ..` (generation's new
    /// tokens after a cached prefix): row `t` takes the tables' row `first + t`.
    pub fn forward_at(&self, x: &GpuVec, heads: usize, first: usize) -> Result<(), GpuError> {
        self.rotate(x, heads, first, 1.0)
    }

    /// The inverse rotation of a gradient, in place.
    pub fn backward(&self, dx: &GpuVec, heads: usize) -> Result<(), GpuError> {
        self.rotate(dx, heads, 0, -1.0)
    }

    fn rotate(&self, x: &GpuVec, heads: usize, first: usize, sign: f32) -> Result<(), GpuError> {
        let width = heads * 2 * self.half;
        if width == 0 || !x.len().is_multiple_of(width) || first + x.len() / width > self.positions() {
            return Err(GpuError::Invalid(format!(
                "rope input of {} elements is not rows of {heads} heads × {} for positions {first}.. up to {}",
                x.len(),
                2 * self.half,
                self.positions()
            )));
        }
        let rows = x.len() / width;
        let p = RopeParams { rows: rows as u32, heads: heads as u32, half: self.half as u32, sign, first: first as u32, pad: [0; 3] };
        dispatch(&self.ctx, &self.kernel, &p, &[(1, &self.cos), (2, &self.sin), (3, x)], groups(x.len() / 2))
    }
}
