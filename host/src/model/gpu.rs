//! The decoder's training forward and backward, and generation, on a GPU: the
//! same layers as [`LlamaModel`](super::LlamaModel), in the same order,
//! composed from the kernels of `gpu_shaders::model`.
//!
//! Weights are uploaded once and overwritten in place after each optimizer step
//! ([`GpuLlama::upload`]); gradients live on the device and accumulate (`+=`)
//! across sequences and calls until [`GpuLlama::zero_grads`], so micro-batches
//! add up as they do on the CPU. Sequences run one after another, in batch
//! order, each layer's kernels in the order below, so every gradient element is
//! summed in an order fixed by the batch alone (SPEC.md §9): two runs on one
//! adapter give the same bits. Another adapter, or the CPU model, agrees to
//! rounding only (the kernels use the hardware's `exp`, `log` and `sqrt`).
//!
//! Unlike the CPU model, the LM head scores every position of a sequence and
//! gives unscored ones a zero coefficient (exactly zero gradient): the kernels
//! then need no gather of scored rows. The per-sequence log-probability is the
//! masked sum of [`SequenceSum`].

// `GpuError` is gpu-shaders' error, large and returned only on the cold path;
// that crate allows the lint for the same reason.
#![allow(clippy::result_large_err)]

use std::fmt;
use std::sync::{Arc, Mutex};

use gpu_shaders::model::{
    Attention, AttentionShape, Elementwise, Embedding, GpuVec, HeadMetrics, HeadShape, Linear, LinearShape, LmHead, RmsNorm, Rope, SequenceSum,
};
use gpu_shaders::optim::NamedBuffer;
use gpu_shaders::{GpuContext, GpuError};

use super::config::LlamaConfig;
use super::layers;
use super::error::ModelError;
use super::generate::{check_generation, Completion, GenerateOptions};
use super::llama::{CrossEntropy, HeadStats, Index, LlamaModel};
use super::sequence::{Sequence, check_sequences};
use crate::params::{ParamSet, Tensor};

/// Vocabulary rows the LM head scores per pass: bounds its `[tokens, chunk]`
/// logits buffer; the head lowers it further where a binding would overflow.
const HEAD_VOCAB_CHUNK: usize = 8192;

#[derive(Debug)]
pub enum GpuModelError {
    /// The inputs are wrong whatever runs them (the CPU model's own checks).
    Model(ModelError),
    Device(GpuError),
}

impl fmt::Display for GpuModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuModelError::Model(e) => write!(f, "{e}"),
            GpuModelError::Device(e) => write!(f, "GPU: {e}"),
        }
    }
}

impl std::error::Error for GpuModelError {}

impl From<ModelError> for GpuModelError {
    fn from(e: ModelError) -> Self {
        GpuModelError::Model(e)
    }
}

impl From<GpuError> for GpuModelError {
    fn from(e: GpuError) -> Self {
        GpuModelError::Device(e)
    }
}

struct Kernels {
    linear: Linear,
    norm: RmsNorm,
    embedding: Embedding,
    attention: Attention,
    elementwise: Elementwise,
    head: LmHead,
    sum: SequenceSum,
}

pub struct GpuLlama {
    ctx: GpuContext,
    config: LlamaConfig,
    idx: Index,
    /// Name and shape of each tensor, in the model's [`ParamSet`] order, which
    /// `weights` and `grads` follow.
    layout: Vec<(String, Vec<usize>)>,
    weights: Vec<GpuVec>,
    grads: Vec<GpuVec>,
    kernels: Kernels,
    /// Rotation tables for positions `0..n`, serving every sequence up to `n`
    /// tokens; rebuilt, twice as long, when a longer one comes.
    rope: Mutex<Option<Arc<Rope>>>,
}

/// One layer's rotated keys and values of a generation's positions
/// `0..capacity` on the device, `[capacity, kv_heads, head_dim]` each.
struct GpuKvLayer {
    k: GpuVec,
    v: GpuVec,
}

struct GpuKvCache {
    /// Positions filled so far.
    len: usize,
    capacity: usize,
    layers: Vec<GpuKvLayer>,
}

/// Device memory the key/value caches of one group of prompts may take: the
/// prompts generate together, a group at a time.
const GENERATION_CACHE_BYTES: u64 = 256 << 20;
/// At most this many prompts generate together (one logits row each comes back per step).
const MAX_GENERATION_GROUP: usize = 64;

/// Activations of one decoder block for one sequence, kept for the backward pass.
struct LayerTape {
    x_in: GpuVec,
    n1: GpuVec,
    rstd1: GpuVec,
    /// q and k after rotation (what the attention scores saw).
    q: GpuVec,
    k: GpuVec,
    v: GpuVec,
    attn: GpuVec,
    /// Each attention row's log-sum-exp: the backward recomputes the softmax from it.
    attn_lse: GpuVec,
    x_mid: GpuVec,
    n2: GpuVec,
    rstd2: GpuVec,
    gate: GpuVec,
    up: GpuVec,
    h: GpuVec,
}

struct SeqTape {
    tokens: GpuVec,
    /// Row `t`'s target is token `t + 1` (0 for the last row, never scored).
    targets: GpuVec,
    /// Whether row `t`'s target is scored: `mask[t + 1]`.
    scored_rows: Vec<bool>,
    rope: Arc<Rope>,
    layers: Vec<LayerTape>,
    x_final: GpuVec,
    nf: GpuVec,
    rstdf: GpuVec,
    head_lse: GpuVec,
}

/// The result of [`GpuLlama::forward`]: per-sequence summed log-probabilities of
/// the scored tokens (read back), and the activations, left on the device, that
/// [`GpuLlama::backward`] needs.
pub struct GpuForward {
    pub logps: Vec<f32>,
    pub scored: Vec<usize>,
    /// What TRL logs about the head, per sequence (sums in f32 on the device).
    pub head: Vec<HeadStats>,
    tapes: Vec<SeqTape>,
}

/// Per-sequence totals on the device for a batch of `n`: log-probabilities at
/// slots `0..n`, then the head's mean-logit, entropy and argmax-hit sums at
/// `n..2n`, `2n..3n`, `3n..4n`, so one read brings all back.
struct SeqTotals {
    n: usize,
    buffer: GpuVec,
}

impl SeqTotals {
    fn read(&self, ctx: &GpuContext, seqs: &[Sequence]) -> Result<(Vec<f32>, Vec<HeadStats>), GpuError> {
        let v = self.buffer.read_f32(ctx)?;
        let n = self.n;
        let head = seqs
            .iter()
            .enumerate()
            .map(|(b, seq)| HeadStats {
                tokens: seq.scored(),
                mean_logit_sum: v[n + b] as f64,
                entropy_sum: v[2 * n + b] as f64,
                argmax_hits: v[3 * n + b].round() as usize,
            })
            .collect();
        Ok((v[..n].to_vec(), head))
    }
}

impl GpuLlama {
    /// Uploads `model`'s weights and zeroed gradients, and compiles the kernels.
    pub fn new(ctx: &GpuContext, model: &LlamaModel) -> Result<GpuLlama, GpuModelError> {
        let params = &model.params;
        let mut weights = Vec::with_capacity(params.tensors.len());
        let mut grads = Vec::with_capacity(params.tensors.len());
        for t in &params.tensors {
            weights.push(GpuVec::from_f32(ctx, &t.name, &t.data)?);
            grads.push(GpuVec::zeros(ctx, &format!("gradient of {}", t.name), t.data.len())?);
        }
        Ok(GpuLlama {
            ctx: ctx.clone(),
            config: model.config.clone(),
            idx: Index::new(&model.config, params),
            layout: params.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect(),
            weights,
            grads,
            kernels: Kernels {
                linear: Linear::new(ctx),
                norm: RmsNorm::new(ctx),
                embedding: Embedding::new(ctx),
                attention: Attention::new(ctx),
                elementwise: Elementwise::new(ctx),
                head: LmHead::new(ctx, HEAD_VOCAB_CHUNK),
                sum: SequenceSum::new(ctx),
            },
            rope: Mutex::new(None),
        })
    }

    /// Overwrites the device weights (after an optimizer step, a resume); `params`
    /// must have the model's layout.
    pub fn upload(&self, params: &ParamSet) -> Result<(), GpuModelError> {
        self.check_layout("the weights", params)?;
        for (w, t) in self.weights.iter().zip(&params.tensors) {
            w.write_f32(&self.ctx, &t.data)?;
        }
        Ok(())
    }

    pub fn zero_grads(&self) {
        for g in &self.grads {
            g.clear(&self.ctx);
        }
    }

    /// Device bytes the forward keeps per sequence of `tokens` tokens until the
    /// backward (a [`SeqTape`] with one [`LayerTape`] per block), so a batch of
    /// sequences holds the sum over its sequences. Excludes the backward's
    /// transient buffers (one block's activation gradients at a time) and the
    /// LM head's one vocabulary chunk of logits.
    pub fn tape_bytes(config: &LlamaConfig, tokens: usize) -> u64 {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let (q, kv) = (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim);
        // x_in, n1, x_mid, n2 [T, H]; q and attn [T, heads·d]; k, v [T, kv·d];
        // gate, up, h [T, I]; rstd1, rstd2 [T]; attn_lse [T, heads]
        let per_layer = 4 * h + 2 * q + 2 * kv + 3 * i + 2 + config.num_attention_heads;
        // tokens, targets, rstdf, head_lse [T]; x_final, nf [T, H]
        let per_sequence = config.num_hidden_layers * per_layer + 4 + 2 * h;
        4 * (tokens * per_sequence) as u64
    }

    /// The device this model lives on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Each tensor's name, weight buffer, gradient buffer and element count, in
    /// the model's order: for an optimizer that steps them in place.
    pub fn tensor_buffers(&self) -> Vec<(&str, &wgpu::Buffer, &wgpu::Buffer, usize)> {
        self.layout.iter().zip(self.weights.iter().zip(&self.grads)).map(|((name, _), (w, g))| (name.as_str(), w.buffer(), g.buffer(), w.len())).collect()
    }

    /// The gradient buffers by tensor name, for the optimizer to copy on the device.
    pub fn grad_buffers(&self) -> Vec<NamedBuffer<'_>> {
        self.layout.iter().zip(&self.grads).map(|((name, _), g)| (name.as_str(), g.buffer())).collect()
    }

    /// The weight buffers by tensor name, for the optimizer to write on the device.
    pub fn weight_buffers(&self) -> Vec<NamedBuffer<'_>> {
        self.layout.iter().zip(&self.weights).map(|((name, _), w)| (name.as_str(), w.buffer())).collect()
    }

    /// The accumulated gradients, laid out and named like the model's parameters.
    pub fn read_grads(&self) -> Result<ParamSet, GpuModelError> {
        let mut tensors = Vec::with_capacity(self.grads.len());
        for (g, (name, shape)) in self.grads.iter().zip(&self.layout) {
            tensors.push(Tensor { name: name.clone(), shape: shape.clone(), data: g.read_f32(&self.ctx)? });
        }
        Ok(ParamSet::new(tensors))
    }

    fn check_layout(&self, what: &str, params: &ParamSet) -> Result<(), ModelError> {
        let ours = self.layout.iter().map(|(name, shape)| (name.as_str(), shape.clone()));
        match crate::params::layout_difference(ours, params.layout()) {
            None => Ok(()),
            Some(d) => Err(ModelError::BadArgument { argument: "params", reason: d.describe("the GPU model", what) }),
        }
    }

    fn zeros(&self, label: &str, len: usize) -> Result<GpuVec, GpuError> {
        GpuVec::zeros(&self.ctx, label, len)
    }

    /// Tables covering `len` positions (`len ≤ max_position_embeddings`, checked
    /// with the sequences).
    fn rope(&self, len: usize) -> Result<Arc<Rope>, GpuError> {
        let mut rope = self.rope.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(r) = rope.as_ref().filter(|r| r.positions() >= len) {
            return Ok(r.clone());
        }
        let positions = len.next_power_of_two().min(self.config.max_position_embeddings);
        let tables = layers::Rope::new(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling, 0, positions);
        let r = Arc::new(Rope::new(&self.ctx, tables.half, &tables.cos, &tables.sin)?);
        *rope = Some(r.clone());
        Ok(r)
    }

    fn attention_shape(&self, tokens: usize) -> AttentionShape {
        let cfg = &self.config;
        AttentionShape { tokens, heads: cfg.num_attention_heads, kv_heads: cfg.num_key_value_heads, head_dim: cfg.head_dim }
    }

    // ------------------------------------------------------------ one block

    /// One decoder block on the `t` rows of `x_in`: positions `0..t` in
    /// training; with a `cache` holding `past` earlier positions, positions
    /// `past..past + t`, whose keys and values it appends to the cache.
    fn block_forward(&self, l: usize, x_in: GpuVec, rope: &Rope, cache: Option<(&GpuKvLayer, usize)>) -> Result<(LayerTape, GpuVec), GpuError> {
        let cfg = &self.config;
        let li = &self.idx.layers[l];
        let k = &self.kernels;
        let (c, im, qd, kvd) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        let t = x_in.len() / c;
        let w = |i: usize| &self.weights[i];
        let bias = |i: Option<usize>| i.map(|i| &self.weights[i]);
        let shape = |inputs, outputs| LinearShape { rows: t, inputs, outputs };

        // attention sub-block: x_mid = x_in + o(attn(rope(q(n1)), rope(k(n1)), v(n1)))
        let n1 = self.zeros("n1", t * c)?;
        let rstd1 = self.zeros("rstd1", t)?;
        k.norm.forward(&n1, &rstd1, &x_in, w(li.ln1), cfg.rms_norm_eps)?;
        let q = self.zeros("q", t * qd)?;
        let kk = self.zeros("k", t * kvd)?;
        let v = self.zeros("v", t * kvd)?;
        k.linear.forward(&q, &n1, w(li.q), bias(li.qb), shape(c, qd))?;
        k.linear.forward(&kk, &n1, w(li.k), bias(li.kb), shape(c, kvd))?;
        k.linear.forward(&v, &n1, w(li.v), bias(li.vb), shape(c, kvd))?;
        let past = cache.map_or(0, |(_, past)| past);
        rope.forward_at(&q, cfg.num_attention_heads, past)?;
        rope.forward_at(&kk, cfg.num_key_value_heads, past)?;
        let attn = self.zeros("attention output", t * qd)?;
        let attn_lse = self.zeros("attention log-sum-exp", cfg.num_attention_heads * t)?;
        match cache {
            None => k.attention.forward(&attn, &attn_lse, &q, &kk, &v, self.attention_shape(t))?,
            Some((layer, past)) => {
                layer.k.copy_from(&self.ctx, past * kvd, &kk)?;
                layer.v.copy_from(&self.ctx, past * kvd, &v)?;
                k.attention.forward_cached(&attn, &attn_lse, &q, &layer.k, &layer.v, past, self.attention_shape(t))?;
            }
        }
        let x_mid = self.zeros("x_mid", t * c)?;
        k.linear.forward(&x_mid, &attn, w(li.o), bias(li.ob), shape(qd, c))?;
        k.elementwise.add_assign(&x_mid, &x_in)?;

        // MLP sub-block: x_out = x_mid + down(silu(gate(n2)) * up(n2))
        let n2 = self.zeros("n2", t * c)?;
        let rstd2 = self.zeros("rstd2", t)?;
        k.norm.forward(&n2, &rstd2, &x_mid, w(li.ln2), cfg.rms_norm_eps)?;
        let gate = self.zeros("gate", t * im)?;
        let up = self.zeros("up", t * im)?;
        k.linear.forward(&gate, &n2, w(li.gate), None, shape(c, im))?;
        k.linear.forward(&up, &n2, w(li.up), None, shape(c, im))?;
        let h = self.zeros("swiglu", t * im)?;
        k.elementwise.swiglu_forward(&h, &gate, &up)?;
        let x_out = self.zeros("x_out", t * c)?;
        k.linear.forward(&x_out, &h, w(li.down), None, shape(im, c))?;
        k.elementwise.add_assign(&x_out, &x_mid)?;
        let tape = LayerTape { x_in, n1, rstd1, q, k: kk, v, attn, attn_lse, x_mid, n2, rstd2, gate, up, h };
        Ok((tape, x_out))
    }

    /// Backward of [`Self::block_forward`]: accumulates parameter gradients and
    /// returns d loss / d x_in.
    fn block_backward(&self, l: usize, a: &LayerTape, rope: &Rope, dx_out: GpuVec) -> Result<GpuVec, GpuError> {
        let cfg = &self.config;
        let li = &self.idx.layers[l];
        let k = &self.kernels;
        let (c, im, qd, kvd) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        let t = a.x_in.len() / c;
        let w = |i: usize| &self.weights[i];
        let g = |i: usize| &self.grads[i];
        let shape = |inputs, outputs| LinearShape { rows: t, inputs, outputs };

        // MLP sub-block
        let dh = self.zeros("dh", t * im)?;
        k.linear.backward(Some(&dh), g(li.down), None, &dx_out, &a.h, w(li.down), shape(im, c))?;
        let dgate = self.zeros("dgate", t * im)?;
        let dup = self.zeros("dup", t * im)?;
        k.elementwise.swiglu_backward(&dgate, &dup, &dh, &a.gate, &a.up)?;
        let dn2 = self.zeros("dn2", t * c)?;
        k.linear.backward(Some(&dn2), g(li.gate), None, &dgate, &a.n2, w(li.gate), shape(c, im))?;
        k.linear.backward(Some(&dn2), g(li.up), None, &dup, &a.n2, w(li.up), shape(c, im))?;
        let dx_mid = dx_out;
        k.norm.backward(&dx_mid, g(li.ln2), &dn2, &a.x_mid, w(li.ln2), &a.rstd2)?;

        // attention sub-block
        let dattn = self.zeros("dattn", t * qd)?;
        k.linear.backward(Some(&dattn), g(li.o), li.ob.map(g), &dx_mid, &a.attn, w(li.o), shape(qd, c))?;
        let dq = self.zeros("dq", t * qd)?;
        let dk = self.zeros("dk", t * kvd)?;
        let dv = self.zeros("dv", t * kvd)?;
        k.attention.backward(&dq, &dk, &dv, &dattn, &a.attn, &a.attn_lse, &a.q, &a.k, &a.v, self.attention_shape(t))?;
        rope.backward(&dq, cfg.num_attention_heads)?;
        rope.backward(&dk, cfg.num_key_value_heads)?;
        let dn1 = self.zeros("dn1", t * c)?;
        for (d, wi, bi, od) in [(&dq, li.q, li.qb, qd), (&dk, li.k, li.kb, kvd), (&dv, li.v, li.vb, kvd)] {
            k.linear.backward(Some(&dn1), g(wi), bi.map(g), d, &a.n1, w(wi), shape(c, od))?;
        }
        let dx_in = dx_mid;
        k.norm.backward(&dx_in, g(li.ln1), &dn1, &a.x_in, w(li.ln1), &a.rstd1)?;
        Ok(dx_in)
    }

    // ------------------------------------------------------------ whole sequence

    fn totals(&self, n: usize) -> Result<SeqTotals, GpuError> {
        Ok(SeqTotals { n, buffer: self.zeros("sequence totals", 4 * n.max(1))? })
    }

    /// The forward of one sequence; its summed log-probability and head
    /// statistics go to its `slot` of `totals`.
    fn forward_seq(&self, seq: &Sequence, totals: &SeqTotals, slot: usize) -> Result<SeqTape, GpuError> {
        let cfg = &self.config;
        let k = &self.kernels;
        let (c, t) = (cfg.hidden_size, seq.tokens.len());
        let rope = self.rope(t)?;
        let tokens = GpuVec::from_u32(&self.ctx, "tokens", &seq.tokens)?;
        let mut x = self.zeros("embeddings", t * c)?;
        k.embedding.forward(&x, &tokens, &self.weights[self.idx.embed], c)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let (tape, x_out) = self.block_forward(l, x, &rope, None)?;
            layers.push(tape);
            x = x_out;
        }
        let nf = self.zeros("final norm", t * c)?;
        let rstdf = self.zeros("final rstd", t)?;
        k.norm.forward(&nf, &rstdf, &x, &self.weights[self.idx.norm], cfg.rms_norm_eps)?;

        let targets: Vec<u32> = (0..t).map(|r| seq.tokens.get(r + 1).copied().unwrap_or(0)).collect();
        let scored_rows: Vec<bool> = (0..t).map(|r| seq.mask.get(r + 1).copied().unwrap_or(false)).collect();
        let targets = GpuVec::from_u32(&self.ctx, "targets", &targets)?;
        let row_logp = self.zeros("row log-probs", t)?;
        let head_lse = self.zeros("head log-sum-exp", t)?;
        let metrics = HeadMetrics::zeros(&self.ctx, t)?;
        let shape = HeadShape { rows: t, hidden: c, vocab: cfg.vocab_size };
        k.head.forward(&row_logp, &head_lse, &metrics, &nf, &self.weights[self.idx.head], &targets, shape)?;
        let mask: Vec<u32> = scored_rows.iter().map(|&s| u32::from(s)).collect();
        let mask = GpuVec::from_u32(&self.ctx, "scored rows", &mask)?;
        let n = totals.n;
        for (i, rows) in [&row_logp, &metrics.mean_logit, &metrics.entropy, &metrics.argmax_hit].into_iter().enumerate() {
            k.sum.sum(&totals.buffer, i * n + slot, rows, &mask)?;
        }
        Ok(SeqTape { tokens, targets, scored_rows, rope, layers, x_final: x, nf, rstdf, head_lse })
    }

    /// Accumulates the gradients of `coef · logp(seq)`.
    fn backward_seq(&self, tape: &SeqTape, coef: f32) -> Result<(), GpuError> {
        let cfg = &self.config;
        let k = &self.kernels;
        let (c, t) = (cfg.hidden_size, tape.scored_rows.len());
        let coefs: Vec<f32> = tape.scored_rows.iter().map(|&s| if s { coef } else { 0.0 }).collect();
        let coefs = GpuVec::from_f32(&self.ctx, "head coefficients", &coefs)?;
        let dnf = self.zeros("dnf", t * c)?;
        let (head, shape) = (self.idx.head, HeadShape { rows: t, hidden: c, vocab: cfg.vocab_size });
        k.head.backward(&dnf, &self.grads[head], &tape.nf, &self.weights[head], &tape.targets, &tape.head_lse, &coefs, shape)?;
        let mut dx = self.zeros("dx", t * c)?;
        let norm = self.idx.norm;
        k.norm.backward(&dx, &self.grads[norm], &dnf, &tape.x_final, &self.weights[norm], &tape.rstdf)?;
        for l in (0..cfg.num_hidden_layers).rev() {
            dx = self.block_backward(l, &tape.layers[l], &tape.rope, dx)?;
        }
        k.embedding.backward(&self.grads[self.idx.embed], &dx, &tape.tokens, c)
    }

    // ------------------------------------------------------------ generation

    /// Runs `tokens` through the model after the `cache.len` cached positions,
    /// appending their keys and values; returns the final norm of every row.
    fn infer(&self, cache: &mut GpuKvCache, tokens: &[u32], rope: &Rope) -> Result<GpuVec, GpuError> {
        let cfg = &self.config;
        let k = &self.kernels;
        let (c, t) = (cfg.hidden_size, tokens.len());
        let ids = GpuVec::from_u32(&self.ctx, "tokens", tokens)?;
        let mut x = self.zeros("embeddings", t * c)?;
        k.embedding.forward(&x, &ids, &self.weights[self.idx.embed], c)?;
        for (l, layer) in cache.layers.iter().enumerate() {
            x = self.block_forward(l, x, rope, Some((layer, cache.len)))?.1;
        }
        cache.len += t;
        let nf = self.zeros("final norm", t * c)?;
        let rstdf = self.zeros("final rstd", t)?;
        k.norm.forward(&nf, &rstdf, &x, &self.weights[self.idx.norm], cfg.rms_norm_eps)?;
        Ok(nf)
    }

    /// [`LlamaModel::generate_batch`] on the device, with the same tokens up to
    /// rounding: the same checks, stopping rule, sampler and per-prompt seeds
    /// ([`Completion`]), each prompt with its own key/value cache on the
    /// device. Prompts advance together a token at a time; per step the
    /// next-token logits of the prompts still going (a row of `vocab` each)
    /// come back for the host's sampler, and only the chosen token ids go up. Greedy
    /// decoding agrees with the CPU model unless two logits are within the
    /// kernels' rounding of each other.
    pub fn generate_batch(&self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>, GpuModelError> {
        check_generation(&self.config, prompts, opts)?;
        let mut outs = Vec::with_capacity(prompts.len());
        let per_prompt = self.cache_bytes(prompts.iter().map(Vec::len).max().unwrap_or(0).saturating_add(opts.max_new_tokens));
        let group = (GENERATION_CACHE_BYTES / per_prompt.max(1)).clamp(1, MAX_GENERATION_GROUP as u64) as usize;
        for (g, chunk) in prompts.chunks(group).enumerate() {
            outs.extend(self.generate_group(chunk, opts, g * group)?);
        }
        Ok(outs)
    }

    /// Device bytes of one prompt's key/value cache for `positions` positions.
    fn cache_bytes(&self, positions: usize) -> u64 {
        let cfg = &self.config;
        let positions = positions.min(cfg.max_position_embeddings);
        (2 * cfg.num_hidden_layers * positions * cfg.kv_dim() * 4) as u64
    }

    /// Generates for `prompts`, the batch's prompts `first..`.
    fn generate_group(&self, prompts: &[Vec<u32>], opts: &GenerateOptions, first: usize) -> Result<Vec<Vec<u32>>, GpuError> {
        let cfg = &self.config;
        let (c, vocab, max_pos) = (cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings);
        let mut states = Vec::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            let completion = Completion::new(opts, (first + i) as u64, prompt.len(), max_pos);
            let capacity = prompt.len().saturating_add(opts.max_new_tokens).min(max_pos);
            let cache = if completion.done { None } else { Some(self.new_cache(capacity)?) };
            states.push((completion, cache, prompt.clone()));
        }
        let longest = states.iter().filter_map(|(_, cache, _)| cache.as_ref().map(|c| c.capacity)).max().unwrap_or(0);
        if longest == 0 {
            return Ok(states.into_iter().map(|(completion, ..)| completion.out).collect());
        }
        let rope = self.rope(longest)?;
        let logits = self.zeros("next-token logits", prompts.len() * vocab)?;
        let head = &self.weights[self.idx.head];
        loop {
            let mut live = Vec::new();
            for (i, (completion, cache, feed)) in states.iter_mut().enumerate() {
                if let (false, Some(cache)) = (completion.done, cache.as_mut()) {
                    let nf = self.infer(cache, feed, &rope)?;
                    // the prompts still going take the first rows, so only those come back
                    self.kernels.head.logits_row(&logits, live.len(), &nf, feed.len() - 1, head, c, vocab)?;
                    live.push(i);
                    if feed.len() > 1 {
                        // a prompt's activations are freed only once its work is done:
                        // without the wait, every prompt's would be held until the readback
                        self.ctx.wait()?;
                    }
                }
            }
            if live.is_empty() {
                break;
            }
            let rows = logits.read_f32_prefix(&self.ctx, live.len() * vocab)?;
            for (row, i) in live.into_iter().enumerate() {
                let (completion, cache, feed) = &mut states[i];
                let cached = cache.as_ref().map_or(0, |c| c.len);
                if let Some(tok) = completion.next(&rows[row * vocab..(row + 1) * vocab], cached) {
                    *feed = vec![tok];
                }
            }
        }
        Ok(states.into_iter().map(|(completion, ..)| completion.out).collect())
    }

    fn new_cache(&self, capacity: usize) -> Result<GpuKvCache, GpuError> {
        let kvd = self.config.kv_dim();
        let layers = (0..self.config.num_hidden_layers)
            .map(|_| Ok(GpuKvLayer { k: self.zeros("key cache", capacity * kvd)?, v: self.zeros("value cache", capacity * kvd)? }))
            .collect::<Result<_, GpuError>>()?;
        Ok(GpuKvCache { len: 0, capacity, layers })
    }

    // ------------------------------------------------------------ batch API

    /// Training forward: per-sequence summed log-probabilities of the scored
    /// tokens, with the activations kept on the device for [`Self::backward`].
    pub fn forward(&self, seqs: &[Sequence]) -> Result<GpuForward, GpuModelError> {
        check_sequences(&self.config, seqs)?;
        let totals = self.totals(seqs.len())?;
        let mut tapes = Vec::with_capacity(seqs.len());
        for (slot, seq) in seqs.iter().enumerate() {
            tapes.push(self.forward_seq(seq, &totals, slot)?);
        }
        let (logps, head) = totals.read(&self.ctx, seqs)?;
        Ok(GpuForward { logps, scored: seqs.iter().map(Sequence::scored).collect(), head, tapes })
    }

    /// Accumulates `Σ_b dlogps[b] · ∂logp_b/∂θ` into the device gradients,
    /// sequence by sequence in batch order.
    pub fn backward(&self, fwd: &GpuForward, dlogps: &[f32]) -> Result<(), GpuModelError> {
        if dlogps.len() != fwd.tapes.len() {
            let reason = format!("{} values for {} sequences", dlogps.len(), fwd.tapes.len());
            return Err(ModelError::BadArgument { argument: "dlogps", reason }.into());
        }
        if let Some(i) = dlogps.iter().position(|d| !d.is_finite()) {
            let reason = format!("dlogps[{i}] = {} is not finite", dlogps[i]);
            return Err(ModelError::BadArgument { argument: "dlogps", reason }.into());
        }
        for (tape, &coef) in fwd.tapes.iter().zip(dlogps) {
            self.backward_seq(tape, coef)?;
        }
        // The dispatches are recorded and submitted in batches; waiting here ends
        // the backward's work inside this call, so the caller's model time covers
        // it and a device failure is this call's error. The optimizer, the next
        // user of the gradients, would wait for them anyway.
        self.ctx.wait()?;
        Ok(())
    }

    /// Per-sequence summed log-probabilities of the scored tokens, no gradients
    /// (the frozen reference model, evaluation).
    ///
    /// A whole data set can go through in one call: each sequence's activations
    /// are freed once it is scored.
    pub fn sequence_logps(&self, seqs: &[Sequence]) -> Result<Vec<f32>, GpuModelError> {
        Ok(self.sequence_logps_and_head(seqs)?.0)
    }

    /// [`Self::sequence_logps`] with each sequence's [`HeadStats`].
    pub fn sequence_logps_and_head(&self, seqs: &[Sequence]) -> Result<(Vec<f32>, Vec<HeadStats>), GpuModelError> {
        check_sequences(&self.config, seqs)?;
        let totals = self.totals(seqs.len())?;
        for (slot, seq) in seqs.iter().enumerate() {
            self.forward_seq(seq, &totals, slot)?;
            // the device frees a dropped buffer only once the work queued on it
            // is done; without the wait, every sequence's would be held until the end
            self.ctx.wait()?;
        }
        Ok(totals.read(&self.ctx, seqs)?)
    }

    /// Next-token cross-entropy over the scored tokens; accumulates
    /// `scale · ∂(Σ nll)/∂θ` into the device gradients, as
    /// [`LlamaModel::cross_entropy_backward`] does into its `grads`.
    pub fn cross_entropy_backward(&self, seqs: &[Sequence], scale: f32) -> Result<CrossEntropy, GpuModelError> {
        let fwd = self.forward(seqs)?;
        self.backward(&fwd, &vec![-scale; seqs.len()])?;
        Ok(CrossEntropy { nll_sum: fwd.logps.iter().map(|&l| -(l as f64)).sum(), tokens: fwd.scored.iter().sum() })
    }

    /// Next-token cross-entropy without gradients.
    pub fn cross_entropy(&self, seqs: &[Sequence]) -> Result<CrossEntropy, GpuModelError> {
        let logps = self.sequence_logps(seqs)?;
        Ok(CrossEntropy { nll_sum: logps.iter().map(|&l| -(l as f64)).sum(), tokens: seqs.iter().map(Sequence::scored).sum() })
    }
}
