//! Token embedding gather and its deterministic scatter-add (`embedding.wgsl`).

use super::{dispatch, expect_len, groups, kernel, GpuVec};
use crate::context::{GpuContext, GpuError};
use crate::kernel::Kernel;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    tokens: u32,
    cols: u32,
    vocab: u32,
    nan_bits: u32,
}

pub struct Embedding {
    ctx: GpuContext,
    forward: Kernel,
    links: Kernel,
    backward: Kernel,
}

impl Embedding {
    pub fn new(ctx: &GpuContext) -> Embedding {
        let src = include_str!("embedding.wgsl");
        Embedding {
            ctx: ctx.clone(),
            forward: kernel(ctx, "embedding_forward", src, "embedding_forward"),
            links: kernel(ctx, "embedding_links", src, "embedding_links"),
            backward: kernel(ctx, "embedding_backward", src, "embedding_backward"),
        }
    }

    fn params(tokens: &GpuVec, table: usize, cols: usize) -> Result<EmbedParams, GpuError> {
        if cols == 0 || !table.is_multiple_of(cols) {
            return Err(GpuError::Invalid(format!("embedding table of {table} elements is not a whole number of rows of {cols}")));
        }
        Ok(EmbedParams { tokens: tokens.len() as u32, cols: cols as u32, vocab: (table / cols) as u32, nan_bits: f32::NAN.to_bits() })
    }

    /// `x[t, :] = table[tokens[t], :]` (`x [tokens, cols]`); an id outside the
    /// table gives a row of NaN.
    pub fn forward(&self, x: &GpuVec, tokens: &GpuVec, table: &GpuVec, cols: usize) -> Result<(), GpuError> {
        let p = Self::params(tokens, table.len(), cols)?;
        expect_len("embedding output", x, tokens.len() * cols)?;
        dispatch(&self.ctx, &self.forward, &p, &[(1, tokens), (2, table), (3, x)], groups(x.len()))
    }

    /// `dtable[tokens[t], :] += dx[t, :]` for t in ascending order.
    pub fn backward(&self, dtable: &GpuVec, dx: &GpuVec, tokens: &GpuVec, cols: usize) -> Result<(), GpuError> {
        let p = Self::params(tokens, dtable.len(), cols)?;
        expect_len("embedding output gradient", dx, tokens.len() * cols)?;
        let links = GpuVec::zeros(&self.ctx, "embedding links", 2 * tokens.len())?;
        dispatch(&self.ctx, &self.links, &p, &[(1, tokens), (4, &links)], groups(tokens.len()))?;
        dispatch(&self.ctx, &self.backward, &p, &[(1, tokens), (4, &links), (5, dx), (6, dtable)], groups(dx.len()))
    }
}
