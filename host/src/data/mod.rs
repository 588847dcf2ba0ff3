//! Training and evaluation data.

pub mod builtin;
