//! Training and evaluation data.

pub mod builtin;
pub mod encode;
pub mod jsonl;
pub mod truncate;
