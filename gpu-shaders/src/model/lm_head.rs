//! The LM head, log-softmax and target gather, chunked over the vocabulary
//! (`lm_head.wgsl` plus [`Linear`]'s tiled product), so a 152k vocabulary never
//! needs a `[rows, vocab]` array. Tied embeddings: pass the embedding table as
//! the head weight and its gradient as the head's gradient.

use super::linear::{Product, Strided};
use super::{dispatch, expect_len, groups, kernel, GpuVec, Linear, Window};
use crate::context::{GpuContext, GpuError};
use crate::kernel::Kernel;

/// Rows of hidden states scored against a vocabulary; `w` is `[vocab, hidden]`.
#[derive(Clone, Copy, Debug)]
pub struct HeadShape {
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct HeadParams {
    rows: u32,
    cols: u32,
    first: u32,
    vocab: u32,
}

/// What TRL's trainers log about the head, per row: the logits' mean over the
/// vocabulary, the softmax's entropy (nats), and 1.0 when the first largest
/// logit is the row's target (else 0.0). Metrics only: nothing the gradient
/// uses, and outside the bit-exact contract like the rest of the model.
pub struct HeadMetrics {
    pub mean_logit: GpuVec,
    pub entropy: GpuVec,
    pub argmax_hit: GpuVec,
}

impl HeadMetrics {
    pub fn zeros(ctx: &GpuContext, rows: usize) -> Result<HeadMetrics, GpuError> {
        Ok(HeadMetrics {
            mean_logit: GpuVec::zeros(ctx, "head mean logits", rows)?,
            entropy: GpuVec::zeros(ctx, "head entropies", rows)?,
            argmax_hit: GpuVec::zeros(ctx, "head argmax hits", rows)?,
        })
    }
}

pub struct LmHead {
    ctx: GpuContext,
    linear: Linear,
    stats: Kernel,
    finish: Kernel,
    dlogits: Kernel,
    vocab_chunk: usize,
}

impl LmHead {
    /// `vocab_chunk`: vocabulary rows per pass (at least 1; lowered where a
    /// chunk's logits or weight rows would exceed one storage binding).
    pub fn new(ctx: &GpuContext, vocab_chunk: usize) -> LmHead {
        let src = include_str!("lm_head.wgsl");
        LmHead {
            ctx: ctx.clone(),
            linear: Linear::new(ctx),
            stats: kernel(ctx, "head_chunk_stats", src, "head_chunk_stats"),
            finish: kernel(ctx, "head_finish", src, "head_finish"),
            dlogits: kernel(ctx, "head_dlogits", src, "head_dlogits"),
            vocab_chunk: vocab_chunk.max(1),
        }
    }

    /// `(first id, columns)` of every chunk, in ascending order.
    fn chunks(&self, s: HeadShape) -> Vec<(usize, usize)> {
        let max_words = (self.ctx.limits().max_storage_buffer_binding_size / 4) as usize;
        let per_chunk = self.vocab_chunk.min(max_words / s.rows.max(1)).min(max_words / s.hidden.max(1)).max(1);
        (0..s.vocab).step_by(per_chunk).map(|v0| (v0, per_chunk.min(s.vocab - v0))).collect()
    }

    fn check(&self, s: HeadShape, x: &GpuVec, w: &GpuVec, targets: &GpuVec, lse: &GpuVec) -> Result<(), GpuError> {
        if s.rows == 0 || s.hidden == 0 || s.vocab == 0 {
            return Err(GpuError::Invalid(format!("LM head: empty shape {s:?}")));
        }
        expect_len("head input", x, s.rows * s.hidden)?;
        expect_len("head weight", w, s.vocab * s.hidden)?;
        expect_len("head targets", targets, s.rows)?;
        expect_len("head log-sum-exp", lse, s.rows)
    }

    /// logits of one chunk into `logits`: `x W[first .. first + cols]ᵀ`.
    fn chunk_logits(&self, logits: &GpuVec, x: &GpuVec, w: &GpuVec, s: HeadShape, chunk: (usize, usize)) -> Result<(), GpuError> {
        let (x, out) = (Window::rows(x, 0, s.rows, s.hidden), Window::rows(logits, 0, s.rows, chunk.1));
        self.chunk_product(out, x, s.rows, w, s.hidden, chunk)
    }

    /// `out = x W[first .. first + cols]ᵀ` for the `rows` rows of `x`, `out`
    /// row-major `[rows, cols]`.
    fn chunk_product(&self, out: Window<'_>, x: Window<'_>, rows: usize, w: &GpuVec, hidden: usize, (first, cols): (usize, usize)) -> Result<(), GpuError> {
        self.linear.matmul(Product {
            m: rows,
            n: cols,
            k: hidden,
            a: Strided { window: x, stride_r: hidden, stride_s: 1 },
            b: Strided { window: Window::rows(w, first, cols, hidden), stride_r: 1, stride_s: hidden },
            c: out,
            bias: None,
            accumulate: false,
        })
    }

    /// The whole vocabulary's logits of one row, for sampling:
    /// `out[out_row] = x[x_row] Wᵀ`, with `x [.., hidden]`, `w [vocab, hidden]`
    /// and `out [.., vocab]` (that row overwritten). Computed chunk by chunk as
    /// the forward's are, so a vocabulary larger than one binding still works;
    /// only the one row of `vocab` logits is materialised.
    #[allow(clippy::too_many_arguments)]
    pub fn logits_row(&self, out: &GpuVec, out_row: usize, x: &GpuVec, x_row: usize, w: &GpuVec, hidden: usize, vocab: usize) -> Result<(), GpuError> {
        if hidden == 0 || vocab == 0 {
            return Err(GpuError::Invalid(format!("LM head: empty shape (hidden {hidden}, vocab {vocab})")));
        }
        expect_len("head weight", w, vocab * hidden)?;
        for (what, v, row, width) in [("head input", x, x_row, hidden), ("logits", out, out_row, vocab)] {
            if !v.len().is_multiple_of(width) || row >= v.len() / width {
                return Err(GpuError::Invalid(format!("`{what}` of {} elements has no row {row} of {width}", v.len())));
            }
        }
        for chunk in self.chunks(HeadShape { rows: 1, hidden, vocab }) {
            let target = Window { vec: out, start: out_row * vocab + chunk.0, len: chunk.1 };
            self.chunk_product(target, Window::rows(x, x_row, 1, hidden), 1, w, hidden, chunk)?;
        }
        Ok(())
    }

    fn params(s: HeadShape, (first, cols): (usize, usize)) -> HeadParams {
        HeadParams { rows: s.rows as u32, cols: cols as u32, first: first as u32, vocab: s.vocab as u32 }
    }

    /// `logp[r] = log softmax(x[r] Wᵀ)[targets[r]]` (NaN for a target outside
    /// the vocabulary); `lse[r]` the row's log-sum-exp, which the backward pass
    /// needs; and per row what TRL logs ([`HeadMetrics`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(&self, logp: &GpuVec, lse: &GpuVec, metrics: &HeadMetrics, x: &GpuVec, w: &GpuVec, targets: &GpuVec, s: HeadShape) -> Result<(), GpuError> {
        self.check(s, x, w, targets, lse)?;
        expect_len("head log-probabilities", logp, s.rows)?;
        for (what, v) in [("head mean logits", &metrics.mean_logit), ("head entropies", &metrics.entropy), ("head argmax hits", &metrics.argmax_hit)] {
            expect_len(what, v, s.rows)?;
        }
        let chunks = self.chunks(s);
        let logits = GpuVec::zeros(&self.ctx, "head logits chunk", s.rows * chunks[0].1)?;
        // per row: the running maximum starts below any logit (exp(start − max)
        // is 0), the sum at 0, the target's logit at NaN so that a target outside
        // the vocabulary gives a NaN log-prob instead of a wrong number
        let mut init = vec![f32::MIN; s.rows];
        init.resize(2 * s.rows, 0.0);
        init.resize(3 * s.rows, f32::NAN);
        // Σ logits, Σ exp(l − max)·l and the argmax id start at 0
        init.resize(6 * s.rows, 0.0);
        let stats = GpuVec::from_f32(&self.ctx, "head running stats", &init)?;
        for &chunk in &chunks {
            self.chunk_logits(&logits, x, w, s, chunk)?;
            let p = Self::params(s, chunk);
            dispatch(&self.ctx, &self.stats, &p, &[(1, &logits), (2, targets), (3, &stats)], s.rows as u32)?;
        }
        let p = Self::params(s, (0, 0));
        let m = metrics;
        let buffers = [(2, targets), (3, &stats), (4, logp), (5, lse), (7, &m.mean_logit), (8, &m.entropy), (9, &m.argmax_hit)];
        dispatch(&self.ctx, &self.finish, &p, &buffers, groups(s.rows))
    }

    /// Gradients of `Σ_r coef[r] · logp[r]`: `dx += d·W`, `dw += dᵀ·x` with
    /// `d = coef · (onehot(target) − softmax)`, one vocabulary chunk at a time
    /// (chunks in ascending order, so every sum has a fixed order).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, dx: &GpuVec, dw: &GpuVec, x: &GpuVec, w: &GpuVec, targets: &GpuVec, lse: &GpuVec, coef: &GpuVec, s: HeadShape) -> Result<(), GpuError> {
        self.check(s, x, w, targets, lse)?;
        expect_len("head input gradient", dx, x.len())?;
        expect_len("head weight gradient", dw, w.len())?;
        expect_len("head coefficients", coef, s.rows)?;
        let chunks = self.chunks(s);
        let logits = GpuVec::zeros(&self.ctx, "head logits chunk", s.rows * chunks[0].1)?;
        for &chunk in &chunks {
            let (first, cols) = chunk;
            self.chunk_logits(&logits, x, w, s, chunk)?;
            let p = Self::params(s, chunk);
            dispatch(&self.ctx, &self.dlogits, &p, &[(1, &logits), (2, targets), (5, lse), (6, coef)], groups(s.rows * cols))?;
            self.linear.matmul(Product {
                m: s.rows,
                n: s.hidden,
                k: cols,
                a: Strided { window: Window::rows(&logits, 0, s.rows, cols), stride_r: cols, stride_s: 1 },
                b: Strided { window: Window::rows(w, first, cols, s.hidden), stride_r: s.hidden, stride_s: 1 },
                c: Window::rows(dx, 0, s.rows, s.hidden),
                bias: None,
                accumulate: true,
            })?;
            self.linear.matmul(Product {
                m: cols,
                n: s.hidden,
                k: s.rows,
                a: Strided { window: Window::rows(&logits, 0, s.rows, cols), stride_r: 1, stride_s: cols },
                b: Strided { window: Window::rows(x, 0, s.rows, s.hidden), stride_r: s.hidden, stride_s: 1 },
                c: Window::rows(dw, first, cols, s.hidden),
                bias: None,
                accumulate: true,
            })?;
        }
        Ok(())
    }
}
