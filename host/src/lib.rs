//! The trainer: a Llama-architecture causal LM with its own forward and backward
//! passes, DPO-family losses, and online merging optimizers run on the GPU and
//! cross-checked against merge-core.

pub mod bench;
pub mod cli;
pub mod data;
pub mod demo;
pub mod hash;
pub mod hf;
pub mod loss;
pub mod merge;
pub mod model;
pub mod model_folder;
pub mod params;
pub mod tokenizer;
pub mod train;
pub mod verify;
