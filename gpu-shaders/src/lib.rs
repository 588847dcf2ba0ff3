//! WGSL kernels and a thin wgpu runtime that compute merge-core's arithmetic
//! bit for bit on any GPU (SPEC.md §8 describes how).

// `GpuError` wraps merge-core's `Error`, which names its tensor inline.
#![allow(clippy::result_large_err)]

pub mod bench;
pub mod context;
mod kernel;
pub mod model;
pub mod offline;
pub mod ops;
pub mod optim;
pub mod selftest;
pub mod tensor;
pub mod topk;

pub use context::{GpuContext, GpuError, GpuOptions, ADAPTER_ENV};
pub use kernel::COMMON_WGSL;
pub use selftest::{self_test, SelfTestReport};
