//! Errors that say what is wrong: which tensor, which element, which hyperparameter.

use core::fmt;

/// A tensor's name as carried inside an error (no allocation: truncated to 96 bytes
/// at a character boundary).
pub type TensorName = heapless::String<96>;

/// Everything merge-core can refuse.
#[derive(Clone, Debug, PartialEq)]
pub enum Error {
    /// A non-finite value (SPEC.md §1.4): `what` says which input or output
    /// (e.g. "gradient", "updated parameter"), `index` is the lowest offending
    /// element index in the full tensor.
    NonFinite { tensor: TensorName, what: &'static str, index: u64 },
    /// A hyperparameter outside its valid range.
    InvalidHyperparameter { name: &'static str, value: f64, expected: &'static str },
    /// Slices that must have equal lengths do not.
    LengthMismatch { tensor: TensorName, what: &'static str, expected: u64, found: u64 },
    /// A value too large for the storage dtype it must be written in (SPEC.md §7).
    StorageOverflow { tensor: TensorName, what: &'static str, index: u64, dtype: crate::dtype::Dtype },
    /// A whole-tensor reduction (an L1 norm) overflowed to a non-finite value.
    NonFiniteReduction { tensor: TensorName, what: &'static str },
    /// An index or size the arithmetic cannot address (e.g. a tensor of 2^32 or more elements).
    OutOfRange { tensor: TensorName, what: &'static str, value: u64, limit: u64 },
    /// The API used against its contract (an entry point for another merge method
    /// or scope, tensors out of order, a pass run before the one it needs): a bug
    /// in the caller, not a bad value. `what` says what was expected.
    Misuse { what: &'static str },
}

/// Truncates `name` into a [`TensorName`].
pub fn tensor_name(name: &str) -> TensorName {
    let mut out = TensorName::new();
    for ch in name.chars() {
        if out.push(ch).is_err() {
            break;
        }
    }
    out
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NonFinite { tensor, what, index } => {
                write!(f, "tensor `{tensor}`: non-finite {what} at element {index}")
            }
            Error::InvalidHyperparameter { name, value, expected } => {
                write!(f, "hyperparameter `{name}` = {value}: expected {expected}")
            }
            Error::LengthMismatch { tensor, what, expected, found } => {
                write!(f, "tensor `{tensor}`: {what} has {found} elements, expected {expected}")
            }
            Error::StorageOverflow { tensor, what, index, dtype } => {
                write!(f, "tensor `{tensor}`: {what} at element {index} overflows {dtype:?}")
            }
            Error::NonFiniteReduction { tensor, what } => {
                write!(f, "tensor `{tensor}`: {what} is not finite")
            }
            Error::OutOfRange { tensor, what, value, limit } => {
                write!(f, "tensor `{tensor}`: {what} = {value} exceeds the limit {limit}")
            }
            Error::Misuse { what } => write!(f, "merge-core used against its contract: {what}"),
        }
    }
}

impl core::error::Error for Error {}
