//! The decoder: parameters as a [`ParamSet`] with Hugging Face names, a training
//! forward that keeps a tape of activations, the backward that walks it, and an
//! inference forward with a KV cache for generation.
//!
//! Parallelism is across sequences: each worker runs whole sequences, and
//! per-sequence gradients are added into the caller's gradients in sequence
//! order. When a call has fewer sequences than threads, each sequence's matrix
//! products split their columns among the idle threads. Neither changes any
//! summation order, so results are the same bits whatever the number of threads.

use std::sync::Mutex;

use super::config::LlamaConfig;
use super::error::ModelError;
use super::generate::KvLayer;
use super::layers::{self, AttnSaved, AttnShape, Rope, Weight};
use super::sequence::{Sequence, check_sequences};
use super::simd;
use super::threads::{add_and_zero, par_map, zero};
use crate::params::{LayoutDifference, ParamSet, Tensor};

pub(super) struct LayerIdx {
    pub(super) ln1: usize,
    pub(super) ln2: usize,
    pub(super) q: usize,
    pub(super) k: usize,
    pub(super) v: usize,
    pub(super) o: usize,
    pub(super) qb: Option<usize>,
    pub(super) kb: Option<usize>,
    pub(super) vb: Option<usize>,
    pub(super) ob: Option<usize>,
    pub(super) gate: usize,
    pub(super) up: usize,
    pub(super) down: usize,
}

/// Positions of each weight in the name-sorted [`ParamSet`], computed once.
pub(super) struct Index {
    pub(super) embed: usize,
    pub(super) norm: usize,
    /// Same as `embed` when the embeddings are tied.
    pub(super) head: usize,
    pub(super) layers: Vec<LayerIdx>,
}

impl Index {
    /// Positions in `params`, whose layout [`check_layout`] has accepted.
    pub(super) fn new(config: &LlamaConfig, params: &ParamSet) -> Index {
        let pos = |name: &str| params.tensors.iter().position(|t| t.name == name).expect("layout checked above");
        let opt = |name: String, present: bool| present.then(|| pos(&name));
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}.");
                LayerIdx {
                    ln1: pos(&format!("{p}input_layernorm.weight")),
                    ln2: pos(&format!("{p}post_attention_layernorm.weight")),
                    q: pos(&format!("{p}self_attn.q_proj.weight")),
                    k: pos(&format!("{p}self_attn.k_proj.weight")),
                    v: pos(&format!("{p}self_attn.v_proj.weight")),
                    o: pos(&format!("{p}self_attn.o_proj.weight")),
                    qb: opt(format!("{p}self_attn.q_proj.bias"), config.qkv_bias()),
                    kb: opt(format!("{p}self_attn.k_proj.bias"), config.qkv_bias()),
                    vb: opt(format!("{p}self_attn.v_proj.bias"), config.qkv_bias()),
                    ob: opt(format!("{p}self_attn.o_proj.bias"), config.o_bias()),
                    gate: pos(&format!("{p}mlp.gate_proj.weight")),
                    up: pos(&format!("{p}mlp.up_proj.weight")),
                    down: pos(&format!("{p}mlp.down_proj.weight")),
                }
            })
            .collect();
        let embed = pos("model.embed_tokens.weight");
        Index {
            embed,
            norm: pos("model.norm.weight"),
            head: if config.tie_word_embeddings { embed } else { pos("lm_head.weight") },
            layers,
        }
    }
}

pub struct LlamaModel {
    pub config: LlamaConfig,
    pub params: ParamSet,
    pub(super) idx: Index,
    pub(super) threads: usize,
    /// [`HEAD_KEPT_MAX`] and [`ATTN_PROBS_KEPT_MAX`], lowered by the tests to
    /// take the recomputing paths.
    pub(super) head_kept_max: usize,
    pub(super) attn_probs_kept_max: usize,
    /// Zeroed gradient sets that [`Self::backward`] reuses, one per thread.
    grad_scratch: Mutex<Vec<ParamSet>>,
    /// A step's gradient given back by [`Self::recycle_grads`].
    spare_grads: Mutex<Option<ParamSet>>,
    /// Activation buffers, their gradients and the LM head's `[rows, vocab]`
    /// buffers (65 MB a sequence at a 32k vocabulary), kept between uses: a
    /// fresh buffer costs a page fault per 4 KiB, in which the kernel zeroes
    /// the page, one read before it is written (an accumulator) a second,
    /// copy-on-write, fault whose TLB flush interrupts the other threads, and
    /// a freed one gives its pages back to be faulted in again next step.
    pub(super) buffers: Mutex<Vec<Vec<f32>>>,
}

/// Activations of one decoder block for one sequence, kept for the backward pass.
pub(super) struct LayerActs {
    x_in: Vec<f32>,
    n1: Vec<f32>,
    rstd1: Vec<f32>,
    /// q and k after rotation (what the attention scores saw).
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: AttnSaved,
    ctx: Vec<f32>,
    x_mid: Vec<f32>,
    n2: Vec<f32>,
    rstd2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    h: Vec<f32>,
}

struct SeqTape {
    tokens: Vec<u32>,
    layers: Vec<LayerActs>,
    x_final: Vec<f32>,
    nf: Vec<f32>,
    rstdf: Vec<f32>,
    /// Positions whose next token is scored, and that next token.
    rows: Vec<(usize, u32)>,
    /// The LM head's input rows and softmax, when small enough to keep
    /// ([`HEAD_KEPT_MAX`]); otherwise the backward pass recomputes them, with
    /// identical results.
    head: Option<HeadTape>,
}

struct HeadTape {
    hsel: Vec<f32>,
    probs: Vec<f32>,
}

/// The most `rows · vocab` softmax values a sequence's tape keeps (256 MiB):
/// below it the backward pass reuses the forward's probabilities, above it (long
/// sequences with 150k-token vocabularies) it recomputes the head rather than
/// hold gigabytes.
const HEAD_KEPT_MAX: usize = 1 << 26;

/// The most `heads · T²` attention weights a layer's tape keeps (16 MiB):
/// above it (long sequences) the tape keeps two numbers per `(head, query)` row
/// and the backward recomputes the weights, with identical results
/// ([`AttnSaved::RowStats`]).
const ATTN_PROBS_KEPT_MAX: usize = 1 << 22;

/// The result of [`LlamaModel::forward`]: per-sequence summed log-probabilities
/// of the scored tokens, what TRL logs about their logits, and the tape that
/// [`LlamaModel::backward`] needs.
pub struct Forward {
    pub logps: Vec<f32>,
    pub scored: Vec<usize>,
    pub head: Vec<HeadStats>,
    tapes: Vec<SeqTape>,
}

/// What TRL's `DPOTrainer` logs about the LM head, summed over one sequence's
/// scored tokens (TRL divides by token counts): the logits' mean over the
/// vocabulary (`logits/chosen`, `logits/rejected`), the softmax's entropy in
/// nats (`entropy`), and whether the largest logit, the first on ties as
/// `torch.argmax`, is the target (`mean_token_accuracy`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HeadStats {
    pub tokens: usize,
    pub mean_logit_sum: f64,
    pub entropy_sum: f64,
    pub argmax_hits: usize,
}

impl std::ops::Add for HeadStats {
    type Output = HeadStats;

    fn add(self, o: HeadStats) -> HeadStats {
        HeadStats {
            tokens: self.tokens + o.tokens,
            mean_logit_sum: self.mean_logit_sum + o.mean_logit_sum,
            entropy_sum: self.entropy_sum + o.entropy_sum,
            argmax_hits: self.argmax_hits + o.argmax_hits,
        }
    }
}

impl HeadStats {
    /// Adds one scored token: its logits, softmax and `log p(target)`.
    fn add_token(&mut self, logits: &[f32], probs: &[f32], target: usize, logp: f32) {
        let (mut sum, mut p_dot_l, mut best) = (0f64, 0f64, 0);
        for (v, (&l, &p)) in logits.iter().zip(probs).enumerate() {
            sum += l as f64;
            p_dot_l += p as f64 * l as f64;
            if l > logits[best] {
                best = v;
            }
        }
        // −Σ p log p = lse − Σ p·l, with lse = logit(target) − log p(target)
        let lse = logits[target] as f64 - logp as f64;
        self.tokens += 1;
        self.mean_logit_sum += sum / logits.len() as f64;
        self.entropy_sum += lse - p_dot_l;
        self.argmax_hits += usize::from(best == target);
    }
}

/// Summed next-token negative log-likelihood over the scored tokens of a batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropy {
    pub nll_sum: f64,
    pub tokens: usize,
}

// SplitMix64: small, seedable, and the same stream on every platform; used for
// initialization and sampling, never for merge masks.
pub use crate::data::builtin::SplitMix64;

impl LlamaModel {
    /// A freshly initialized model: linear and embedding weights N(0, 0.02²), the
    /// two projections that write into the residual stream (o, down) scaled by
    /// 1/√(2·layers) as in GPT-2, norms 1, biases 0. Each tensor draws from its own
    /// stream keyed by its name, so the values do not depend on tensor order.
    pub fn init(config: LlamaConfig, seed: u64) -> Result<Self, ModelError> {
        config.validate()?;
        let resid_scale = 1.0 / (2.0 * config.num_hidden_layers as f64).sqrt();
        let tensors = config
            .param_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let data = if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
                    vec![1.0; n]
                } else if name.ends_with(".bias") {
                    vec![0.0; n]
                } else {
                    let std = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                        0.02 * resid_scale
                    } else {
                        0.02
                    };
                    let mut rng = SplitMix64::new(seed ^ crate::hash::fnv1a64(name.as_bytes()));
                    (0..n).map(|_| (rng.next_normal() * std) as f32).collect()
                };
                Tensor { name, shape, data }
            })
            .collect();
        Self::from_params(config, ParamSet::new(tensors))
    }

    /// Wraps existing weights; every tensor the config implies must be present with
    /// its shape, and nothing else.
    pub fn from_params(config: LlamaConfig, params: ParamSet) -> Result<Self, ModelError> {
        config.validate()?;
        let params = ParamSet::new(params.tensors);
        check_layout(&config, &params)?;
        let idx = Index::new(&config, &params);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self { config, params, idx, threads, head_kept_max: HEAD_KEPT_MAX, attn_probs_kept_max: ATTN_PROBS_KEPT_MAX, grad_scratch: Mutex::new(Vec::new()), spare_grads: Mutex::new(None), buffers: Mutex::new(Vec::new()) })
    }

    /// Worker threads for batch work. Results do not depend on it.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Zero gradients laid out like the parameters.
    pub fn zero_grads(&self) -> ParamSet {
        self.params.zeros_like()
    }

    /// [`Self::zero_grads`] in the buffers of the set last given to
    /// [`Self::recycle_grads`], if any, zeroed on the model's threads. A training
    /// step's gradient is as large as the model: fresh memory for it costs a
    /// page fault per 4 KiB and, once freed, a TLB shootdown on every core.
    pub fn zeroed_grads(&self) -> ParamSet {
        let spare = self.spare_grads.lock().unwrap_or_else(|e| e.into_inner()).take();
        match spare {
            Some(mut grads) if grads.layout_difference(&self.params).is_none() => {
                zero(&mut grads, self.threads);
                grads
            }
            _ => self.zero_grads(),
        }
    }

    /// Keeps `grads` (a step's gradient, no longer needed) for the next
    /// [`Self::zeroed_grads`].
    pub fn recycle_grads(&self, grads: ParamSet) {
        *self.spare_grads.lock().unwrap_or_else(|e| e.into_inner()) = Some(grads);
    }

    /// Keeps the activations of a [`Self::forward`] that [`Self::backward`]
    /// has used, for the next steps' buffers.
    pub fn recycle_forward(&self, fwd: Forward) {
        for tape in fwd.tapes {
            let SeqTape { tokens: _, layers, x_final, nf, rstdf, rows: _, head } = tape;
            for acts in layers {
                self.give_acts(acts);
            }
            for buffer in [x_final, nf, rstdf] {
                self.give(buffer);
            }
            if let Some(head) = head {
                self.give(head.hsel);
                self.give(head.probs);
            }
        }
    }

    /// `len` zeros, in the smallest kept buffer that holds them if there is one.
    pub(super) fn buffer(&self, len: usize) -> Vec<f32> {
        let kept = {
            let mut kept = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
            let fits = (0..kept.len()).filter(|&i| kept[i].capacity() >= len).min_by_key(|&i| kept[i].capacity());
            match fits {
                Some(i) => Some(kept.swap_remove(i)),
                None => {
                    // The largest kept buffer too small for this one is given
                    // back, so that buffers growing from step to step (longer
                    // sequences) replace the old ones rather than add to them.
                    let smaller = (0..kept.len()).max_by_key(|&i| kept[i].capacity());
                    drop(smaller.map(|i| kept.swap_remove(i)));
                    None
                }
            }
        };
        let mut buffer = kept.unwrap_or_default();
        buffer.clear();
        buffer.resize(len, 0.0);
        buffer
    }

    pub(super) fn give(&self, buffer: Vec<f32>) {
        if buffer.capacity() > 0 {
            self.buffers.lock().unwrap_or_else(|e| e.into_inner()).push(buffer);
        }
    }

    fn give_acts(&self, acts: LayerActs) {
        let LayerActs { x_in, n1, rstd1, q, k, v, attn, ctx, x_mid, n2, rstd2, gate, up, h } = acts;
        for buffer in [x_in, n1, rstd1, q, k, v, ctx, x_mid, n2, rstd2, gate, up, h] {
            self.give(buffer);
        }
        match attn {
            AttnSaved::Probs(probs) => self.give(probs),
            AttnSaved::RowStats { max, inv_sum } => {
                self.give(max);
                self.give(inv_sum);
            }
        }
    }

    /// The shared state of a call that runs `sequences` sequences in parallel,
    /// none longer than `max_len` tokens (0: the call keeps its own positions).
    pub(super) fn pass(&self, sequences: usize, max_len: usize) -> Pass {
        let untied_embed = (!self.config.tie_word_embeddings).then_some(self.idx.embed);
        // Above the baseline the products read weights in their own layout.
        let transpose = simd::active() == simd::Level::Baseline;
        let wt = self
            .params
            .tensors
            .iter()
            .enumerate()
            // the embedding table is only read by rows, unless it is also the head
            .map(|(i, t)| {
                if transpose && t.shape.len() == 2 && Some(i) != untied_embed {
                    layers::transpose(&t.data, t.shape[1], t.shape[0])
                } else {
                    Vec::new()
                }
            })
            .collect();
        let cfg = &self.config;
        Pass {
            wt,
            par: (self.threads / sequences.max(1)).max(1),
            rope: Rope::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, 0, max_len),
        }
    }

    pub(super) fn w(&self, i: usize) -> &[f32] {
        &self.params.tensors[i].data
    }

    /// Matrix `i` for [`layers::linear_forward`]: the pass's transposed copy
    /// when it made one, else the parameter itself.
    pub(super) fn weight<'a>(&'a self, pass: &'a Pass, i: usize) -> Weight<'a> {
        match pass.wt[i].is_empty() {
            true => Weight::Hf(self.w(i)),
            false => Weight::Transposed(&pass.wt[i]),
        }
    }

    pub(super) fn check_sequences(&self, seqs: &[Sequence]) -> Result<(), ModelError> {
        check_sequences(&self.config, seqs)
    }

    fn check_grads(&self, grads: &ParamSet) -> Result<(), ModelError> {
        if grads.tensors.len() != self.params.tensors.len() {
            return Err(ModelError::GradientLayout {
                reason: format!("{} tensors, the model has {}", grads.tensors.len(), self.params.tensors.len()),
            });
        }
        for (g, p) in grads.tensors.iter().zip(&self.params.tensors) {
            if g.name != p.name || g.data.len() != p.data.len() {
                return Err(ModelError::GradientLayout {
                    reason: format!(
                        "`{}` ({} elements) where the model has `{}` ({} elements)",
                        g.name,
                        g.data.len(),
                        p.name,
                        p.data.len()
                    ),
                });
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ one block

    /// One decoder block on `t` rows at positions `pos0..pos0+t`. With a cache,
    /// the new keys/values are appended to it and attention reads the whole cache;
    /// without, keys/values are just these rows (training).
    pub(super) fn block_forward(&self, pass: &Pass, l: usize, x_in: Vec<f32>, pos0: usize, rope: &Rope, cache: Option<&mut KvLayer>) -> (LayerActs, Vec<f32>) {
        let cfg = &self.config;
        let li = &self.idx.layers[l];
        let (c, im, qd, kvd) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        let t = x_in.len() / c;
        let bias = |i: Option<usize>| i.map(|i| self.w(i));

        // attention sub-block: x_mid = x_in + o(attn(rope(q(n1)), rope(k(n1)), v(n1)))
        let mut n1 = self.buffer(t * c);
        let mut rstd1 = self.buffer(t);
        layers::rmsnorm_forward(&mut n1, &mut rstd1, &x_in, self.w(li.ln1), cfg.rms_norm_eps, c);
        let mut q = self.buffer(t * qd);
        let mut k = self.buffer(t * kvd);
        let mut v = self.buffer(t * kvd);
        layers::linear_forward(&mut q, &n1, self.weight(pass, li.q), bias(li.qb), c, qd, pass.par);
        layers::linear_forward(&mut k, &n1, self.weight(pass, li.k), bias(li.kb), c, kvd, pass.par);
        layers::linear_forward(&mut v, &n1, self.weight(pass, li.v), bias(li.vb), c, kvd, pass.par);
        layers::rope_forward(&mut q, rope, cfg.num_attention_heads);
        layers::rope_forward(&mut k, rope, cfg.num_key_value_heads);
        let shape = AttnShape {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            pos0,
            tq: t,
        };
        let mut ctx = self.buffer(t * qd);
        let attn = match cache {
            Some(kv) => {
                kv.k.extend_from_slice(&k);
                kv.v.extend_from_slice(&v);
                layers::attention_forward(&mut ctx, None, &q, &kv.k, &kv.v, shape);
                AttnSaved::Probs(Vec::new())
            }
            None => {
                let rows = shape.heads * shape.tq;
                let mut saved = if cfg.num_attention_heads * t * t <= self.attn_probs_kept_max {
                    AttnSaved::Probs(self.buffer(rows * shape.tk()))
                } else {
                    AttnSaved::RowStats { max: self.buffer(rows), inv_sum: self.buffer(rows) }
                };
                layers::attention_forward(&mut ctx, Some(&mut saved), &q, &k, &v, shape);
                saved
            }
        };
        let mut x_mid = self.buffer(t * c);
        layers::linear_forward(&mut x_mid, &ctx, self.weight(pass, li.o), bias(li.ob), qd, c, pass.par);
        for (m, x) in x_mid.iter_mut().zip(&x_in) {
            *m += x;
        }

        // MLP sub-block: x_out = x_mid + down(silu(gate(n2)) * up(n2))
        let mut n2 = self.buffer(t * c);
        let mut rstd2 = self.buffer(t);
        layers::rmsnorm_forward(&mut n2, &mut rstd2, &x_mid, self.w(li.ln2), cfg.rms_norm_eps, c);
        let mut gate = self.buffer(t * im);
        let mut up = self.buffer(t * im);
        layers::linear_forward(&mut gate, &n2, self.weight(pass, li.gate), None, c, im, pass.par);
        layers::linear_forward(&mut up, &n2, self.weight(pass, li.up), None, c, im, pass.par);
        let mut h = self.buffer(t * im);
        layers::swiglu_forward(&mut h, &gate, &up);
        let mut x_out = self.buffer(t * c);
        layers::linear_forward(&mut x_out, &h, self.weight(pass, li.down), None, im, c, pass.par);
        for (o, m) in x_out.iter_mut().zip(&x_mid) {
            *o += m;
        }
        let acts = LayerActs {
            x_in,
            n1,
            rstd1,
            q,
            k,
            v,
            attn,
            ctx,
            x_mid,
            n2,
            rstd2,
            gate,
            up,
            h,
        };
        (acts, x_out)
    }

    /// Backward of [`Self::block_forward`] (no cache): accumulates parameter
    /// gradients into `g` and returns d loss / d x_in.
    fn block_backward(&self, pass: &Pass, l: usize, a: &LayerActs, rope: &Rope, dx_out: Vec<f32>, g: &mut ParamSet) -> Vec<f32> {
        let cfg = &self.config;
        let li = &self.idx.layers[l];
        let (c, im, qd, kvd) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
        let t = a.x_in.len() / c;

        // MLP sub-block
        let mut dh = self.buffer(t * im);
        layers::linear_backward(Some(&mut dh), &mut g.tensors[li.down].data, &dx_out, &a.h, self.w(li.down), im, c, pass.par);
        let mut dgate = self.buffer(t * im);
        let mut dup = self.buffer(t * im);
        layers::swiglu_backward(&mut dgate, &mut dup, &dh, &a.gate, &a.up);
        let mut dn2 = self.buffer(t * c);
        layers::linear_backward(Some(&mut dn2), &mut g.tensors[li.gate].data, &dgate, &a.n2, self.w(li.gate), c, im, pass.par);
        layers::linear_backward(Some(&mut dn2), &mut g.tensors[li.up].data, &dup, &a.n2, self.w(li.up), c, im, pass.par);
        let mut dx_mid = dx_out;
        layers::rmsnorm_backward(&mut dx_mid, &mut g.tensors[li.ln2].data, &dn2, &a.x_mid, self.w(li.ln2), &a.rstd2, c);

        // attention sub-block
        let mut dctx = self.buffer(t * qd);
        layers::linear_backward(Some(&mut dctx), &mut g.tensors[li.o].data, &dx_mid, &a.ctx, self.w(li.o), qd, c, pass.par);
        if let Some(ob) = li.ob {
            layers::bias_backward(&mut g.tensors[ob].data, &dx_mid);
        }
        let mut dq = self.buffer(t * qd);
        let mut dk = self.buffer(t * kvd);
        let mut dv = self.buffer(t * kvd);
        let shape = AttnShape {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            pos0: 0,
            tq: t,
        };
        layers::attention_backward(&mut dq, &mut dk, &mut dv, &dctx, &a.attn, &a.q, &a.k, &a.v, shape);
        layers::rope_backward(&mut dq, rope, cfg.num_attention_heads);
        layers::rope_backward(&mut dk, rope, cfg.num_key_value_heads);
        let mut dn1 = self.buffer(t * c);
        for (d, wi, bi, od) in [(&dq, li.q, li.qb, qd), (&dk, li.k, li.kb, kvd), (&dv, li.v, li.vb, kvd)] {
            layers::linear_backward(Some(&mut dn1), &mut g.tensors[wi].data, d, &a.n1, self.w(wi), c, od, pass.par);
            if let Some(bi) = bi {
                layers::bias_backward(&mut g.tensors[bi].data, d);
            }
        }
        let mut dx_in = dx_mid;
        layers::rmsnorm_backward(&mut dx_in, &mut g.tensors[li.ln1].data, &dn1, &a.x_in, self.w(li.ln1), &a.rstd1, c);
        for buffer in [dh, dgate, dup, dn2, dctx, dq, dk, dv, dn1] {
            self.give(buffer);
        }
        dx_in
    }

    // ------------------------------------------------------------ whole sequence

    /// The sequence's summed log-probability, its head statistics and its tape; `keep_tape` is false
    /// when the caller drops the tape (no gradient follows).
    fn forward_seq(&self, pass: &Pass, seq: &Sequence, keep_tape: bool) -> (f32, HeadStats, SeqTape) {
        let cfg = &self.config;
        let c = cfg.hidden_size;
        let t = seq.tokens.len();
        let mut x = self.buffer(t * c);
        layers::embedding_forward(&mut x, &seq.tokens, self.w(self.idx.embed), c);
        let mut acts = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let (a, x_out) = self.block_forward(pass, l, x, 0, &pass.rope, None);
            if keep_tape {
                acts.push(a);
            } else {
                self.give_acts(a);
            }
            x = x_out;
        }
        let mut nf = self.buffer(t * c);
        let mut rstdf = self.buffer(t);
        layers::rmsnorm_forward(&mut nf, &mut rstdf, &x, self.w(self.idx.norm), cfg.rms_norm_eps, c);

        let rows: Vec<(usize, u32)> = (1..t).filter(|&p| seq.mask[p]).map(|p| (p - 1, seq.tokens[p])).collect();
        let mut logp = 0f64;
        let keep = keep_tape && rows.len() * cfg.vocab_size <= self.head_kept_max;
        let mut stats = HeadStats::default();
        let head = self.head_rows(pass, &nf, &rows, keep, |r, logits, lp, probs| {
            logp += lp as f64;
            stats.add_token(logits, probs, rows[r].1 as usize, lp);
        });
        let tape = SeqTape {
            tokens: seq.tokens.clone(),
            layers: acts,
            x_final: x,
            nf,
            rstdf,
            rows,
            head: if keep {
                Some(head)
            } else {
                self.give(head.hsel);
                self.give(head.probs);
                None
            },
        };
        (logp as f32, stats, tape)
    }

    /// Runs the LM head on the rows of `nf` whose next token is scored (the others
    /// never need logits) and calls `f(row, logits, log p(target), softmax)` for each.
    /// Returns the head's input rows and, with `keep`, the `[rows, vocab]`
    /// probabilities (else that buffer holds logits).
    fn head_rows(&self, pass: &Pass, nf: &[f32], rows: &[(usize, u32)], keep: bool, mut f: impl FnMut(usize, &[f32], f32, &[f32])) -> HeadTape {
        let (c, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let mut hsel = self.buffer(rows.len() * c);
        for (row, &(p, _)) in hsel.chunks_exact_mut(c).zip(rows) {
            row.copy_from_slice(&nf[p * c..(p + 1) * c]);
        }
        let mut logits = self.buffer(rows.len() * vocab);
        layers::linear_forward(&mut logits, &hsel, self.weight(pass, self.idx.head), None, c, vocab, pass.par);
        let mut probs = vec![0f32; vocab];
        for (r, &(_, tgt)) in rows.iter().enumerate() {
            let row = &mut logits[r * vocab..(r + 1) * vocab];
            let lp = layers::log_softmax_row(row, tgt as usize, &mut probs);
            f(r, row, lp, &probs);
            if keep {
                row.copy_from_slice(&probs);
            }
        }
        HeadTape { hsel, probs: logits }
    }

    /// Gradients of `coef · logp(seq)` into `g`, which holds zeros.
    fn backward_seq(&self, pass: &Pass, tape: &SeqTape, coef: f32, g: &mut ParamSet) {
        let cfg = &self.config;
        let (c, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let t = tape.tokens.len();

        let r = tape.rows.len();
        let mut dlogits = self.buffer(r * vocab);
        let mut head_backward = |i: usize, probs: &[f32]| {
            layers::log_softmax_backward(&mut dlogits[i * vocab..(i + 1) * vocab], probs, tape.rows[i].1 as usize, coef)
        };
        let recomputed = match &tape.head {
            Some(head) => {
                for (i, probs) in head.probs.chunks_exact(vocab).enumerate() {
                    head_backward(i, probs);
                }
                None
            }
            None => Some(self.head_rows(pass, &tape.nf, &tape.rows, false, |i, _, _, probs| head_backward(i, probs))),
        };
        let hsel = &recomputed.as_ref().or(tape.head.as_ref()).expect("the head is kept or recomputed").hsel;
        let mut dhsel = self.buffer(r * c);
        layers::linear_backward(
            Some(&mut dhsel),
            &mut g.tensors[self.idx.head].data,
            &dlogits,
            hsel,
            self.w(self.idx.head),
            c,
            vocab,
            pass.par,
        );
        self.give(dlogits);
        if let Some(head) = recomputed {
            self.give(head.hsel);
            self.give(head.probs);
        }
        let mut dnf = self.buffer(t * c);
        for (i, &(p, _)) in tape.rows.iter().enumerate() {
            layers::axpy(&mut dnf[p * c..(p + 1) * c], 1.0, &dhsel[i * c..(i + 1) * c]);
        }
        self.give(dhsel);
        let mut dx = self.buffer(t * c);
        layers::rmsnorm_backward(
            &mut dx,
            &mut g.tensors[self.idx.norm].data,
            &dnf,
            &tape.x_final,
            self.w(self.idx.norm),
            &tape.rstdf,
            c,
        );
        self.give(dnf);
        for l in (0..cfg.num_hidden_layers).rev() {
            dx = self.block_backward(pass, l, &tape.layers[l], &pass.rope, dx, g);
        }
        layers::embedding_backward(&mut g.tensors[self.idx.embed].data, &dx, &tape.tokens, c);
        self.give(dx);
    }

    // ------------------------------------------------------------ batch API

    /// Training forward: per-sequence summed log-probabilities of the scored
    /// tokens, with the activations kept for [`Self::backward`].
    pub fn forward(&self, seqs: &[Sequence]) -> Result<Forward, ModelError> {
        self.check_sequences(seqs)?;
        let pass = self.pass(seqs.len(), seqs.iter().map(|q| q.tokens.len()).max().unwrap_or(0));
        let out = par_map(self.threads, seqs.len(), |i| self.forward_seq(&pass, &seqs[i], true));
        let scored = seqs.iter().map(Sequence::scored).collect();
        let (mut logps, mut head, mut tapes) = (Vec::new(), Vec::new(), Vec::new());
        for (lp, h, tape) in out {
            logps.push(lp);
            head.push(h);
            tapes.push(tape);
        }
        Ok(Forward { logps, scored, head, tapes })
    }

    /// Accumulates `Σ_b dlogps[b] · ∂logp_b/∂θ` into `grads` (`+=`, so micro-batches
    /// accumulate). Per-sequence gradients are added in sequence order.
    pub fn backward(&self, fwd: &Forward, dlogps: &[f32], grads: &mut ParamSet) -> Result<(), ModelError> {
        self.check_grads(grads)?;
        if dlogps.len() != fwd.tapes.len() {
            return Err(ModelError::BadArgument {
                argument: "dlogps",
                reason: format!("{} values for {} sequences", dlogps.len(), fwd.tapes.len()),
            });
        }
        if let Some(i) = dlogps.iter().position(|d| !d.is_finite()) {
            return Err(ModelError::BadArgument {
                argument: "dlogps",
                reason: format!("dlogps[{i}] = {} is not finite", dlogps[i]),
            });
        }
        let n = fwd.tapes.len();
        let pass = self.pass(n, fwd.tapes.iter().map(|t| t.tokens.len()).max().unwrap_or(0));
        let wave = self.threads.max(1).min(n);
        // Zeroed per-sequence gradient sets, kept between calls: fresh ones would
        // cost a page fault per 4 KiB and a TLB shootdown when freed.
        let mut scratch = std::mem::take(&mut *self.grad_scratch.lock().unwrap_or_else(|e| e.into_inner()));
        scratch.truncate(wave);
        while scratch.len() < wave {
            scratch.push(self.zero_grads());
        }
        let slots: Vec<Mutex<ParamSet>> = scratch.into_iter().map(Mutex::new).collect();
        let mut start = 0;
        while start < n {
            let end = (start + wave).min(n);
            par_map(self.threads, end - start, |i| {
                let mut g = slots[i].lock().unwrap_or_else(|e| e.into_inner());
                self.backward_seq(&pass, &fwd.tapes[start + i], dlogps[start + i], &mut g)
            });
            let mut parts: Vec<_> = slots[..end - start].iter().map(|m| m.lock().unwrap_or_else(|e| e.into_inner())).collect();
            add_and_zero(grads, &mut parts, self.threads);
            start = end;
        }
        *self.grad_scratch.lock().unwrap_or_else(|e| e.into_inner()) = slots.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).collect();
        Ok(())
    }

    /// Per-sequence summed log-probabilities of the scored tokens, no tape kept
    /// (the frozen reference model, evaluation).
    pub fn sequence_logps(&self, seqs: &[Sequence]) -> Result<Vec<f32>, ModelError> {
        Ok(self.sequence_logps_and_head(seqs)?.0)
    }

    /// [`Self::sequence_logps`] with each sequence's [`HeadStats`].
    pub fn sequence_logps_and_head(&self, seqs: &[Sequence]) -> Result<(Vec<f32>, Vec<HeadStats>), ModelError> {
        self.check_sequences(seqs)?;
        let pass = self.pass(seqs.len(), seqs.iter().map(|q| q.tokens.len()).max().unwrap_or(0));
        Ok(par_map(self.threads, seqs.len(), |i| {
            let (lp, head, _) = self.forward_seq(&pass, &seqs[i], false);
            (lp, head)
        })
        .into_iter()
        .unzip())
    }

    /// Next-token cross-entropy over the scored tokens; accumulates
    /// `scale · ∂(Σ nll)/∂θ` into `grads`. Pass `scale = 1 / total scored tokens`
    /// (over all micro-batches) for the usual mean loss.
    pub fn cross_entropy_backward(&self, seqs: &[Sequence], scale: f32, grads: &mut ParamSet) -> Result<CrossEntropy, ModelError> {
        let fwd = self.forward(seqs)?;
        let coefs = vec![-scale; seqs.len()];
        self.backward(&fwd, &coefs, grads)?;
        let loss = CrossEntropy {
            nll_sum: fwd.logps.iter().map(|&l| -(l as f64)).sum(),
            tokens: fwd.scored.iter().sum(),
        };
        self.recycle_forward(fwd);
        Ok(loss)
    }

    /// Next-token cross-entropy without gradients.
    pub fn cross_entropy(&self, seqs: &[Sequence]) -> Result<CrossEntropy, ModelError> {
        let logps = self.sequence_logps(seqs)?;
        Ok(CrossEntropy {
            nll_sum: logps.iter().map(|&l| -(l as f64)).sum(),
            tokens: seqs.iter().map(Sequence::scored).sum(),
        })
    }

}

/// What one batch call shares among its workers: at the baseline vector level,
/// the matrices in `[in, out]` layout ([`layers::transpose`], indexed like the
/// [`ParamSet`]; built per call, never cached on the model, so never stale after
/// the parameters change; empty above the baseline), and
/// how many threads each sequence's matrix products may use (the threads that
/// running sequences side by side leaves idle).
pub(super) struct Pass {
    wt: Vec<Vec<f32>>,
    pub(super) par: usize,
    /// Rotations for positions `0 .. max_len` (a position's values do not depend
    /// on the table's length, so every sequence reads its prefix).
    rope: Rope,
}


/// Every tensor the config implies, present with its shape, and no others, in
/// canonical (bytewise name) order.
pub fn check_layout(config: &LlamaConfig, params: &ParamSet) -> Result<(), ModelError> {
    let mut expected = config.param_shapes();
    expected.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    match crate::params::layout_difference(expected.iter().map(|(n, s)| (n.as_str(), s.clone())), params.layout()) {
        None => Ok(()),
        Some(LayoutDifference::Missing { tensor, shape }) => Err(ModelError::MissingTensor { tensor, expected: shape }),
        Some(LayoutDifference::Extra { tensor, shape }) => Err(ModelError::ExtraTensor { tensor, shape }),
        Some(LayoutDifference::Shape { tensor, ours, theirs }) => Err(ModelError::ShapeMismatch { tensor, expected: ours, found: theirs }),
        Some(d @ LayoutDifference::Order { .. }) => Err(ModelError::BadArgument { argument: "params", reason: d.describe("the config's layout", "the parameters") }),
    }
}
