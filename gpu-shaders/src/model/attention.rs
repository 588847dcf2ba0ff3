//! Causal grouped-query attention, forward and backward (`attention.wgsl`). The
//! forward saves one log-sum-exp per row instead of the softmax weights; the
//! backward recomputes them. [`Attention::forward_cached`] serves generation:
//! new queries against a key/value cache that also holds earlier positions.

use super::{dispatch, expect_len, groups, kernel, GpuVec};
use crate::context::{GpuContext, GpuError, WORKGROUP};
use crate::kernel::Kernel;

/// Queries, keys and values all cover positions `0 .. tokens`. Query head `h`
/// reads key/value head `h / (heads / kv_heads)`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnParams {
    tokens: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scale: f32,
    past: u32,
    pad: [u32; 2],
}

pub struct Attention {
    ctx: GpuContext,
    forward: Kernel,
    delta: Kernel,
    backward_query: Kernel,
    backward_key_value: Kernel,
}

impl AttentionShape {
    fn params(&self) -> Result<AttnParams, GpuError> {
        if self.kv_heads == 0 || self.heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(GpuError::Invalid(format!("attention: {} key/value heads do not divide {} heads", self.kv_heads, self.heads)));
        }
        // one lane of the row's workgroup per dimension
        if self.head_dim == 0 || self.head_dim > WORKGROUP as usize {
            return Err(GpuError::Invalid(format!("attention: head_dim {} is outside 1..={WORKGROUP}", self.head_dim)));
        }
        Ok(AttnParams {
            tokens: self.tokens as u32,
            heads: self.heads as u32,
            kv_heads: self.kv_heads as u32,
            head_dim: self.head_dim as u32,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            past: 0,
            pad: [0; 2],
        })
    }

    fn check(&self, q: &GpuVec, k: &GpuVec, v: &GpuVec, out: &GpuVec, lse: &GpuVec) -> Result<AttnParams, GpuError> {
        let p = self.params()?;
        let (qd, kvd) = (self.tokens * self.heads * self.head_dim, self.tokens * self.kv_heads * self.head_dim);
        expect_len("attention queries", q, qd)?;
        expect_len("attention keys", k, kvd)?;
        expect_len("attention values", v, kvd)?;
        expect_len("attention output", out, qd)?;
        expect_len("attention log-sum-exp", lse, self.heads * self.tokens)?;
        Ok(p)
    }
}

impl Attention {
    pub fn new(ctx: &GpuContext) -> Attention {
        let src = include_str!("attention.wgsl");
        Attention {
            ctx: ctx.clone(),
            forward: kernel(ctx, "attention_forward", src, "attention_forward"),
            delta: kernel(ctx, "attention_delta", src, "attention_delta"),
            backward_query: kernel(ctx, "attention_backward_query", src, "attention_backward_query"),
            backward_key_value: kernel(ctx, "attention_backward_key_value", src, "attention_backward_key_value"),
        }
    }

    /// `out[t, h] = Σ_{j ≤ t} softmax_j(q[t,h]·k[j,g] / √d) v[j,g]`; `lse`
    /// (`[heads, tokens]`) keeps each row's log-sum-exp for the backward pass.
    pub fn forward(&self, out: &GpuVec, lse: &GpuVec, q: &GpuVec, k: &GpuVec, v: &GpuVec, s: AttentionShape) -> Result<(), GpuError> {
        s.check(q, k, v, out, lse)?;
        self.forward_cached(out, lse, q, k, v, 0, s)
    }

    /// The forward for `s.tokens` queries at positions `past ..`: `k` and `v`
    /// are a cache of at least `past + s.tokens` rows whose rows `past ..` hold
    /// these positions' keys and values; query row `t` sees cache rows
    /// `0 ..= past + t`. Rows beyond are never read, so a cache sized for the
    /// whole generation serves every step. With `past = 0` and exact sizes this
    /// is [`Self::forward`], bit for bit.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cached(&self, out: &GpuVec, lse: &GpuVec, q: &GpuVec, k: &GpuVec, v: &GpuVec, past: usize, s: AttentionShape) -> Result<(), GpuError> {
        let mut p = s.params()?;
        let (qd, kvd) = (s.tokens * s.heads * s.head_dim, (past + s.tokens) * s.kv_heads * s.head_dim);
        expect_len("attention queries", q, qd)?;
        expect_len("attention output", out, qd)?;
        expect_len("attention log-sum-exp", lse, s.heads * s.tokens)?;
        for (what, cache) in [("attention key cache", k), ("attention value cache", v)] {
            if cache.len() < kvd || !cache.len().is_multiple_of(s.kv_heads * s.head_dim) {
                return Err(GpuError::Invalid(format!(
                    "`{what}` has {} elements: not rows of {} × {} covering {} positions",
                    cache.len(),
                    s.kv_heads,
                    s.head_dim,
                    past + s.tokens
                )));
            }
        }
        p.past = u32::try_from(past).map_err(|_| GpuError::Invalid(format!("attention: {past} cached positions do not fit 32 bits")))?;
        dispatch(&self.ctx, &self.forward, &p, &[(1, q), (2, k), (3, v), (4, out), (5, lse)], (s.tokens * s.heads) as u32)
    }

    /// `dq += ds k / √d`, `dk += dsᵀ q / √d`, `dv += pᵀ dout` with
    /// `ds = p ⊙ (dout·v − Σ p dout·v)`, from the forward's `out` and `lse`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dq: &GpuVec,
        dk: &GpuVec,
        dv: &GpuVec,
        dout: &GpuVec,
        out: &GpuVec,
        lse: &GpuVec,
        q: &GpuVec,
        k: &GpuVec,
        v: &GpuVec,
        s: AttentionShape,
    ) -> Result<(), GpuError> {
        let p = s.check(q, k, v, out, lse)?;
        expect_len("attention output gradient", dout, out.len())?;
        expect_len("attention query gradient", dq, q.len())?;
        expect_len("attention key gradient", dk, k.len())?;
        expect_len("attention value gradient", dv, v.len())?;
        let rows = s.tokens * s.heads;
        let delta = GpuVec::zeros(&self.ctx, "attention delta", rows)?;
        dispatch(&self.ctx, &self.delta, &p, &[(4, out), (6, dout), (7, &delta)], groups(rows))?;
        let inputs = [(1, q), (2, k), (3, v), (5, lse), (6, dout), (7, &delta)];
        let mut query = inputs.to_vec();
        query.push((8, dq));
        dispatch(&self.ctx, &self.backward_query, &p, &query, rows as u32)?;
        let mut key_value = inputs.to_vec();
        key_value.extend([(9, dk), (10, dv)]);
        dispatch(&self.ctx, &self.backward_key_value, &p, &key_value, (s.tokens * s.kv_heads) as u32)
    }
}
