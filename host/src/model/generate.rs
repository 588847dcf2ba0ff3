//! Inference: logits at every position and generation with a KV cache, greedy or
//! sampled with a seeded generator per prompt.

use super::error::ModelError;
use super::layers::{self, Rope};
use super::config::LlamaConfig;
use super::llama::{LlamaModel, Pass, SplitMix64};
use super::sequence::{Sequence, check_sequences};
use super::threads::par_map;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// Highest logit; ties go to the lowest token id.
    Greedy,
    /// Softmax of `logits / temperature`, restricted to the `top_k` highest
    /// logits (`0` = all), sampled with the seeded generator.
    Temperature { temperature: f32, top_k: usize },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation ends after this token; it is not included in the output.
    pub stop_token: Option<u32>,
    pub seed: u64,
}

impl LlamaModel {
    fn infer(&self, pass: &Pass, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
        let cfg = &self.config;
        let c = cfg.hidden_size;
        let t = tokens.len();
        let pos0 = cache.len;
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, pos0, t);
        let mut x = vec![0f32; t * c];
        layers::embedding_forward(&mut x, tokens, self.w(self.idx.embed), c);
        for l in 0..cfg.num_hidden_layers {
            x = self.block_forward(pass, l, x, pos0, &rope, Some(&mut cache.layers[l])).1;
        }
        cache.len += t;
        let mut nf = vec![0f32; t * c];
        let mut rstd = vec![0f32; t];
        layers::rmsnorm_forward(&mut nf, &mut rstd, &x, self.w(self.idx.norm), cfg.rms_norm_eps, c);
        nf
    }

    fn new_cache(&self) -> KvCache {
        KvCache {
            len: 0,
            layers: (0..self.config.num_hidden_layers).map(|_| KvLayer { k: Vec::new(), v: Vec::new() }).collect(),
        }
    }

    /// Logits `[tokens.len(), vocab_size]` at every position.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.check_sequences(&[Sequence {
            tokens: tokens.to_vec(),
            mask: vec![false; tokens.len()],
        }])?;
        let (c, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let pass = self.pass(1, 0);
        let nf = self.infer(&pass, &mut self.new_cache(), tokens);
        let mut logits = vec![0f32; tokens.len() * vocab];
        layers::linear_forward(&mut logits, &nf, self.weight(&pass, self.idx.head), None, c, vocab, pass.par);
        Ok(logits)
    }

    /// Continues `prompt` (non-empty) with a KV cache; returns the new tokens only.
    pub fn generate(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<Vec<u32>, ModelError> {
        Ok(self.generate_batch(&[prompt.to_vec()], opts)?.pop().expect("one prompt in, one completion out"))
    }

    /// [`Self::generate`] for many prompts in parallel. Prompt `i` samples with
    /// its own generator seeded from `(opts.seed, i)`, so results do not depend on
    /// thread count or scheduling.
    pub fn generate_batch(&self, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<Vec<Vec<u32>>, ModelError> {
        check_generation(&self.config, prompts, opts)?;
        let pass = self.pass(prompts.len(), 0);
        Ok(par_map(self.threads, prompts.len(), |i| self.generate_one(&pass, &prompts[i], opts, i as u64)))
    }

    fn generate_one(&self, pass: &Pass, prompt: &[u32], opts: &GenerateOptions, index: u64) -> Vec<u32> {
        let (c, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let mut completion = Completion::new(opts, index, prompt.len(), self.config.max_position_embeddings);
        let mut cache = self.new_cache();
        let mut logits = vec![0f32; vocab];
        let mut feed = prompt.to_vec();
        while !completion.done {
            let nf = self.infer(pass, &mut cache, &feed);
            layers::linear_forward(&mut logits, &nf[nf.len() - c..], self.weight(pass, self.idx.head), None, c, vocab, pass.par);
            match completion.next(&logits, cache.len) {
                Some(tok) => feed = vec![tok],
                None => break,
            }
        }
        completion.out
    }
}

/// What every backend checks before generating: a sampling temperature that
/// is a positive finite number, and prompts the model accepts.
pub(crate) fn check_generation(config: &LlamaConfig, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Result<(), ModelError> {
    if let Sampling::Temperature { temperature, .. } = opts.sampling
        && !(temperature.is_finite() && temperature > 0.0)
    {
        return Err(ModelError::BadArgument {
            argument: "temperature",
            reason: format!("{temperature} is not a positive finite number"),
        });
    }
    let seqs: Vec<Sequence> = prompts
        .iter()
        .map(|p| Sequence {
            tokens: p.clone(),
            mask: vec![false; p.len()],
        })
        .collect();
    check_sequences(config, &seqs)
}

/// One prompt's generation as a sequence of decisions, shared by the CPU and
/// GPU models so that both stop, sample and seed identically: after each
/// forward, [`Completion::next`] takes the last position's logits and says
/// which token to feed next, if any.
pub(crate) struct Completion {
    rng: SplitMix64,
    sampling: Sampling,
    stop_token: Option<u32>,
    max_new_tokens: usize,
    max_positions: usize,
    pub(crate) out: Vec<u32>,
    /// Nothing more to sample (also true from the start when the budget is
    /// zero or the prompt fills the context).
    pub(crate) done: bool,
}

impl Completion {
    /// Prompt `index` of a batch samples with its own generator, seeded from
    /// `(opts.seed, index)`.
    pub(crate) fn new(opts: &GenerateOptions, index: u64, prompt_len: usize, max_positions: usize) -> Completion {
        Completion {
            rng: SplitMix64::new(opts.seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03)),
            sampling: opts.sampling,
            stop_token: opts.stop_token,
            max_new_tokens: opts.max_new_tokens,
            max_positions,
            out: Vec::new(),
            done: opts.max_new_tokens == 0 || prompt_len >= max_positions,
        }
    }

    /// Chooses the token after the `cached` positions whose last logits these
    /// are; returns it when it must be fed back (another token will follow).
    pub(crate) fn next(&mut self, logits: &[f32], cached: usize) -> Option<u32> {
        let tok = sample(logits, self.sampling, &mut self.rng);
        if Some(tok) == self.stop_token {
            self.done = true;
            return None;
        }
        self.out.push(tok);
        self.done = self.out.len() >= self.max_new_tokens || cached + 1 >= self.max_positions;
        (!self.done).then_some(tok)
    }
}

/// One layer's keys and values of every position so far (rotated keys).
pub(super) struct KvLayer {
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
}

pub(super) struct KvCache {
    len: usize,
    layers: Vec<KvLayer>,
}

fn sample(logits: &[f32], sampling: Sampling, rng: &mut SplitMix64) -> u32 {
    let argmax = || logits.iter().enumerate().fold(0, |best, (i, &l)| if l > logits[best] { i } else { best });
    match sampling {
        Sampling::Greedy => argmax() as u32,
        Sampling::Temperature { temperature, top_k } => {
            let mut order: Vec<usize> = (0..logits.len()).collect();
            if top_k > 0 && top_k < logits.len() {
                order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
                order.truncate(top_k);
            }
            let mx = logits[argmax()] as f64;
            let weights: Vec<f64> = order.iter().map(|&i| libm::exp((logits[i] as f64 - mx) / temperature as f64)).collect();
            let total: f64 = weights.iter().sum();
            let mut u = rng.unit() * total;
            for (&i, &w) in order.iter().zip(&weights) {
                if u < w {
                    return i as u32;
                }
                u -= w;
            }
            // rounding left `u` a hair above the last weight
            *order.last().expect("vocabulary is non-empty") as u32
        }
    }
}
