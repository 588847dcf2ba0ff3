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

use std::fmt;
use std::path::Path;

use crate::params::ParamSet;

/// A training failure, with the file / tensor / flag it concerns already in the text.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainError(pub String);

impl TrainError {
    pub fn msg(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn io(action: &str, path: &Path, e: std::io::Error) -> Self {
        Self(format!("{action} {}: {e}", path.display()))
    }
}

impl fmt::Display for TrainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TrainError {}

impl From<config::BadFlag> for TrainError {
    fn from(e: config::BadFlag) -> Self {
        Self(e.to_string())
    }
}

impl From<merge_core::Error> for TrainError {
    fn from(e: merge_core::Error) -> Self {
        Self(e.to_string())
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
