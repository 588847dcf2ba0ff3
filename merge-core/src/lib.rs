#![no_std]
#![forbid(unsafe_code)]
// An error names its tensor inline (`TensorName`, no allocator), which makes
// `Result<_, Error>` larger than clippy's default limit; a deliberate trade.
#![allow(clippy::result_large_err)]

// `std` lends the vectorizable square root (see `arith::sqrt`) and threads
// (`parallel`); the rest of the crate never allocates.
#[cfg(feature = "std")]
extern crate std;

pub mod adam;
pub mod arith;
pub mod dare;
pub mod dtype;
pub mod error;
mod finite;
mod flushless;
pub mod hyper;
pub mod isa;
pub mod offline;
pub mod onties;
pub mod optim;
#[cfg(feature = "std")]
pub mod parallel;
pub mod reduce;
pub mod reference;
pub mod rng;
pub mod step;
pub mod topk;

pub use error::Error;

#[cfg(test)]
mod step_tests;
#[cfg(test)]
mod testutil;
