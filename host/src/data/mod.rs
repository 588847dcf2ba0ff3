//! Training and evaluation data.

pub mod builtin;
pub mod jsonl;
