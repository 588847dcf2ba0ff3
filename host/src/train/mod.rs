//! Training: the optimizer driver (GPU with merge-core cross-check, or merge-core
//! alone), the step loop, checkpoints with bit-exact resume, and the metrics log.

pub mod checkpoint;
pub mod config;
pub mod fsx;
pub mod metrics;
pub mod model_check;
pub mod objectives;
pub mod optim;
pub mod order;
pub mod outdir;
pub mod run;

use std::path::{Path, PathBuf};

use crate::params::{LayoutDifference, ParamSet};

/// A failure of training, evaluation or the CLI around them. The kinds a caller
/// may act on are variants with their fields; the rest is `Other`, whose text
/// already names the file, line, tensor or flag it concerns.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A flag the user got wrong (merge-core's validation, named by the flag).
    #[error(transparent)]
    Flag(#[from] config::BadFlag),
    /// merge-core refused its inputs (the tensor and element are in the error).
    /// The large payloads are boxed, so that a `Result` stays small.
    #[error(transparent)]
    Core(Box<merge_core::Error>),
    /// A model folder or safetensors file could not be read or written.
    #[error(transparent)]
    Model(Box<crate::hf::HfError>),
    /// A data file (JSONL) is unreadable or malformed (the line is in the error).
    #[error(transparent)]
    Data(#[from] crate::data::jsonl::DataError),
    /// The loss refused its hyperparameters or inputs.
    #[error(transparent)]
    Loss(#[from] crate::loss::LossError),
    /// `merge` refused its configuration or models.
    #[error(transparent)]
    Merge(Box<crate::merge::MergeError>),
    /// The model refused its inputs or weights; `context` says which model or pass.
    #[error("{context}: {source}")]
    Arch { context: String, source: crate::model::ModelError },
    /// merge-core refused optimizer step `step` (the tensor and element are in
    /// `source`); nothing was updated.
    #[error("step {step}: {source}")]
    Step { step: u64, source: Box<merge_core::Error> },
    /// The GPU optimizer failed; `context` says doing what.
    #[error("{context}: {source}")]
    Device { context: String, source: Box<gpu_shaders::GpuError> },
    /// The GPU model failed or refused its inputs; `context` says doing what.
    #[error("{context} on the GPU: {source}")]
    Gpu { context: String, source: Box<crate::model::GpuModelError> },
    /// Reading or writing `path` failed.
    #[error("{action} {}: {source}", path.display())]
    Io { action: String, path: PathBuf, source: std::io::Error },
    /// A set of tensors (gradient, base or SFT model, checkpoint) does not have the
    /// policy's layout.
    #[error("{}", difference.describe("the policy", what))]
    Layout { what: String, difference: LayoutDifference },
    /// A gradient element is NaN or infinite; nothing was updated.
    #[error("step {step}: gradient of tensor `{tensor}` is non-finite at element {index} (bits 0x{bits:08x}); nothing was updated")]
    NonFiniteGradient { step: u64, tensor: String, index: usize, bits: u32 },
    /// The GPU optimizer's result differs from merge-core's recomputation.
    #[error(
        "cross-check FAILED at step {step} on {adapter}: {what} of tensor `{tensor}` differs first at element {index}: \
         merge-core 0x{cpu:08x} ({:e}), GPU 0x{gpu:08x} ({:e})",
        f32::from_bits(*cpu),
        f32::from_bits(*gpu)
    )]
    CrossCheck { step: u64, adapter: String, what: String, tensor: String, index: usize, cpu: u32, gpu: u32 },
    /// The GPU model's forward or backward disagrees with the CPU model's beyond
    /// the stated tolerance.
    #[error("step {step}: the GPU model disagrees with the CPU model: {what}: error {error:.3e} exceeds the tolerance {tolerance:.0e}")]
    ModelMismatch { step: u64, what: String, error: f64, tolerance: f64 },
    /// Everything else, in words.
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    pub fn msg(s: impl Into<String>) -> Self {
        Self::Other(s.into())
    }

    pub fn io(action: &str, path: &Path, source: std::io::Error) -> Self {
        Self::Io { action: action.to_string(), path: path.to_path_buf(), source }
    }

    /// For `map_err`: the model's error, doing `context`.
    pub fn arch(context: &str) -> impl Fn(crate::model::ModelError) -> Self + '_ {
        move |source| Self::Arch { context: context.to_string(), source }
    }

    /// For `map_err`: the GPU optimizer's error, doing `context`.
    pub fn device(context: String) -> impl Fn(gpu_shaders::GpuError) -> Self {
        move |source| Self::Device { context: context.clone(), source: Box::new(source) }
    }

    /// For `map_err`: the GPU model's error, doing `context`.
    pub fn gpu(context: &str) -> impl Fn(crate::model::GpuModelError) -> Self + '_ {
        move |source| Self::Gpu { context: context.to_string(), source: Box::new(source) }
    }
}

impl From<merge_core::Error> for TrainError {
    fn from(e: merge_core::Error) -> Self {
        Self::Core(Box::new(e))
    }
}

impl From<crate::hf::HfError> for TrainError {
    fn from(e: crate::hf::HfError) -> Self {
        Self::Model(Box::new(e))
    }
}

impl From<crate::merge::MergeError> for TrainError {
    fn from(e: crate::merge::MergeError) -> Self {
        Self::Merge(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// FNV-1a-64 over every tensor's name, shape and element bits, in canonical order:
/// a fingerprint to compare weights across runs, backends and machines (not a
/// defence against deliberate tampering).
pub fn weights_hash(params: &ParamSet) -> String {
    let mut h = crate::hash::Fnv1a64::default();
    for t in &params.tensors {
        h.eat(t.name.as_bytes());
        h.eat(&[0]);
        for &d in &t.shape {
            h.eat(&(d as u64).to_le_bytes());
        }
        for x in &t.data {
            h.eat(&x.to_bits().to_le_bytes());
        }
    }
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Tensor;

    #[test]
    fn hash_sees_every_bit_name_and_shape() {
        let base = ParamSet::new(vec![Tensor { name: "w".into(), shape: vec![2], data: vec![0.0, 1.0] }]);
        let h = weights_hash(&base);
        let mut neg_zero = base.clone();
        neg_zero.tensors[0].data[0] = -0.0;
        let mut renamed = base.clone();
        renamed.tensors[0].name = "v".into();
        let mut reshaped = base.clone();
        reshaped.tensors[0].shape = vec![1, 2];
        for other in [neg_zero, renamed, reshaped] {
            assert_ne!(weights_hash(&other), h);
        }
        assert_eq!(weights_hash(&base.clone()), h);
    }
}
