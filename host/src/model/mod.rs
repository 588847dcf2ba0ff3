//! A Llama-architecture decoder with hand-written forward and backward passes.

pub mod config;
pub mod layers;
pub mod llama;

pub use config::{ConfigError, Family, LlamaConfig};
pub use llama::{CrossEntropy, Forward, GenerateOptions, LlamaModel, ModelError, Sampling, Sequence, SplitMix64, check_layout};

#[cfg(test)]
mod tests;
