//! What the model refuses: a layout or config that is not the architecture's,
//! and sequences, gradients or arguments it cannot run.

use std::fmt;

use super::config::ConfigError;

#[derive(Debug, Clone, PartialEq)]
pub enum ModelError {
    Config(ConfigError),
    /// A tensor the config requires is absent.
    MissingTensor {
        tensor: String,
        expected: Vec<usize>,
    },
    /// A tensor the config does not know about.
    ExtraTensor {
        tensor: String,
        shape: Vec<usize>,
    },
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A gradient set whose layout is not the model's.
    GradientLayout {
        reason: String,
    },
    TokenOutOfRange {
        sequence: usize,
        position: usize,
        id: u32,
        vocab_size: usize,
    },
    BadSequence {
        sequence: usize,
        reason: String,
    },
    BadArgument {
        argument: &'static str,
        reason: String,
    },
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Config(e) => write!(f, "{e}"),
            ModelError::MissingTensor { tensor, expected } => write!(f, "tensor `{tensor}` (shape {expected:?}) is missing"),
            ModelError::ExtraTensor { tensor, shape } => write!(f, "tensor `{tensor}` (shape {shape:?}) is not part of this architecture"),
            ModelError::ShapeMismatch { tensor, expected, found } => write!(f, "tensor `{tensor}` has shape {found:?}, the config implies {expected:?}"),
            ModelError::GradientLayout { reason } => write!(f, "gradient set does not match the model: {reason}"),
            ModelError::TokenOutOfRange {
                sequence,
                position,
                id,
                vocab_size,
            } => {
                write!(
                    f,
                    "sequence {sequence}, position {position}: token id {id} is outside the vocabulary (vocab_size {vocab_size})"
                )
            }
            ModelError::BadSequence { sequence, reason } => write!(f, "sequence {sequence}: {reason}"),
            ModelError::BadArgument { argument, reason } => write!(f, "`{argument}`: {reason}"),
        }
    }
}

impl std::error::Error for ModelError {}

impl From<ConfigError> for ModelError {
    fn from(e: ConfigError) -> Self {
        ModelError::Config(e)
    }
}
