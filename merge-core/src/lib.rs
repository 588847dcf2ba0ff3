#![no_std]
#![forbid(unsafe_code)]

pub mod arith;
pub mod error;

pub use error::Error;
