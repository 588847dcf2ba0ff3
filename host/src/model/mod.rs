//! A Llama-architecture decoder with hand-written forward and backward passes.
//!
//! Parameters live in a [`ParamSet`](crate::params::ParamSet) under their Hugging
//! Face names; gradients are a `ParamSet` of the same layout, accumulated with
//! `+=` so micro-batches add up. One training step, as the trainer drives it:
//!
//! ```
//! use host::loss::{DpoLoss, LossKind};
//! use host::model::{GenerateOptions, LlamaConfig, LlamaModel, Sampling, Sequence};
//!
//! let config = LlamaConfig::tiny(259, 16, 32, 2, 4, 2); // vocab, hidden, mlp, layers, heads, kv heads
//! let policy = LlamaModel::init(config.clone(), 1).unwrap();
//! let reference = LlamaModel::init(config, 1).unwrap();
//! let prompt = [256, 50, 43];
//! let (chosen, rejected) = (Sequence::completion(&prompt, &[52, 257]), Sequence::completion(&prompt, &[53, 257]));
//! let batch = [chosen, rejected];
//!
//! let refs = reference.sequence_logps(&batch).unwrap(); // frozen: no tape, no gradients
//! let fwd = policy.forward(&batch).unwrap(); // keeps activations for backward
//! let loss = DpoLoss::new(LossKind::Sigmoid, 0.1, 0.0).unwrap();
//! let out = loss.batch(&fwd.logps[..1], &fwd.logps[1..], &refs[..1], &refs[1..]).unwrap();
//! let mut grads = policy.zero_grads();
//! policy.backward(&fwd, &[out.d_chosen[0], out.d_rejected[0]], &mut grads).unwrap();
//! assert!((out.loss - std::f64::consts::LN_2).abs() < 1e-6); // policy == reference
//!
//! // pretraining / SFT: mean next-token cross-entropy over the scored tokens
//! let ce = policy.cross_entropy_backward(&batch, 1.0 / 4.0, &mut grads).unwrap();
//! assert_eq!(ce.tokens, 4);
//!
//! let opts = GenerateOptions { max_new_tokens: 5, sampling: Sampling::Greedy, stop_token: Some(257), seed: 0 };
//! let completion = policy.generate(&prompt, &opts).unwrap();
//! assert!(completion.len() <= 5);
//! ```

pub mod config;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod layers;
pub mod llama;
pub mod math;
pub mod sequence;
pub mod simd;
mod threads;

pub(crate) use threads::par_map;

pub use config::{ConfigError, Family, LlamaConfig, RopeScaling};
pub use gpu::{GpuForward, GpuLlama, GpuModelError};
pub use error::ModelError;
pub use generate::{GenerateOptions, Sampling};
pub use llama::{CrossEntropy, Forward, HeadStats, LlamaModel, SplitMix64, check_layout};
pub use sequence::Sequence;

#[cfg(test)]
mod tests;
