//! The model's cross-check: a step's forward and backward on a GPU against the
//! same step recomputed on the CPU model, within tolerances. (The optimizer's
//! cross-check is exact, bit for bit; the model's cannot be: the two sides sum
//! in different orders and the GPU's `exp`, `log` and `sqrt` are not correctly
//! rounded, SPEC.md §9.)
//!
//! How the tolerances were chosen: on the tiny configurations of
//! `host/tests/gpu_model.rs` (lavapipe) the worst gradient tensor differs by
//! 5e-6 relative L2 and the log-probs by under 1e-6. Reordering a sum of K terms
//! moves it by about √K·2⁻²⁴ relative, so models with hidden sizes in the
//! thousands may reach a few 1e-5; and a DPO gradient is the difference of the
//! chosen and the rejected sequence's gradients, which share their prompt and
//! largely cancel, so its relative error can be several times that of either.
//! The tolerances sit above both effects with a margin; a wrong index, a dropped
//! term, a missing bias or a gradient in the wrong tensor errs by 1e-2 and more.

use super::{Result, TrainError};
use crate::params::ParamSet;

/// Relative L2 error `‖gpu − cpu‖ / ‖cpu‖` allowed per gradient tensor.
pub const GRADIENT_TOLERANCE: f64 = 1e-3;

/// Error allowed on a sequence's summed log-probability and on the loss:
/// relative, or absolute where the value is below 1 in magnitude (a confident
/// model's log-probs near 0 must not make a relative error explode).
pub const VALUE_TOLERANCE: f64 = 1e-4;

/// `|gpu − cpu| / max(|cpu|, 1)`.
fn value_error(gpu: f64, cpu: f64) -> f64 {
    (gpu - cpu).abs() / cpu.abs().max(1.0)
}

/// `error ≤ tolerance`, false for a NaN error (a NaN on either side).
fn within(error: f64, tolerance: f64) -> bool {
    error <= tolerance
}

/// `‖gpu − cpu‖ / ‖cpu‖`; 0 when both are zero, ∞ when only the CPU's is.
fn relative_l2(gpu: &[f32], cpu: &[f32]) -> f64 {
    let diff: f64 = gpu.iter().zip(cpu).map(|(&g, &c)| (f64::from(g) - f64::from(c)).powi(2)).sum();
    let norm: f64 = cpu.iter().map(|&c| f64::from(c).powi(2)).sum();
    if diff == 0.0 { 0.0 } else { (diff / norm).sqrt() }
}

fn mismatch(step: u64, what: &str, error: f64, tolerance: f64) -> TrainError {
    TrainError::ModelMismatch { step, what: what.to_string(), error, tolerance }
}

/// The loss of the batch.
pub fn compare_loss(step: u64, gpu: f64, cpu: f64) -> Result<()> {
    let e = value_error(gpu, cpu);
    if !within(e, VALUE_TOLERANCE) {
        return Err(mismatch(step, &format!("loss (gpu {gpu}, cpu {cpu})"), e, VALUE_TOLERANCE));
    }
    Ok(())
}

/// Per-sequence summed log-probabilities; `what` names them (policy, reference).
pub fn compare_logps(step: u64, what: &str, gpu: &[f32], cpu: &[f32]) -> Result<()> {
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let e = value_error(f64::from(g), f64::from(c));
        if !within(e, VALUE_TOLERANCE) {
            return Err(mismatch(step, &format!("{what} log-prob of sequence {i} of the batch (gpu {g}, cpu {c})"), e, VALUE_TOLERANCE));
        }
    }
    Ok(())
}

/// Every gradient tensor, by relative L2 error.
pub fn compare_gradients(step: u64, gpu: &ParamSet, cpu: &ParamSet) -> Result<()> {
    for (g, c) in gpu.tensors.iter().zip(&cpu.tensors) {
        if g.name != c.name || g.data.len() != c.data.len() {
            return Err(TrainError::msg(format!("step {step}: GPU gradient `{}` where the CPU model has `{}`", g.name, c.name)));
        }
        let e = relative_l2(&g.data, &c.data);
        if !within(e, GRADIENT_TOLERANCE) {
            return Err(mismatch(step, &format!("gradient of `{}` (relative L2)", c.name), e, GRADIENT_TOLERANCE));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Tensor;

    fn set(data: Vec<f32>) -> ParamSet {
        ParamSet::new(vec![Tensor { name: "model.norm.weight".into(), shape: vec![data.len()], data }])
    }

    #[test]
    fn a_mismatch_names_the_tensor_its_error_and_the_tolerance() {
        let cpu = set(vec![1.0, -2.0, 0.5]);
        compare_gradients(3, &set(vec![1.0, -2.0, 0.5]), &cpu).unwrap();
        compare_gradients(3, &set(vec![1.0001, -2.0, 0.5]), &cpu).unwrap();
        let err = compare_gradients(3, &set(vec![1.01, -2.0, 0.5]), &cpu).unwrap_err().to_string();
        assert!(err.contains("step 3") && err.contains("`model.norm.weight`") && err.contains("4.364e-3") && err.contains("1e-3"), "{err}");
        assert!(compare_gradients(1, &set(vec![f32::NAN, 0.0, 0.0]), &cpu).is_err());
        compare_gradients(1, &set(vec![0.0; 3]), &set(vec![0.0; 3])).unwrap();
        assert!(compare_gradients(1, &set(vec![1e-9, 0.0, 0.0]), &set(vec![0.0; 3])).is_err());
    }

    #[test]
    fn values_are_relative_above_one_and_absolute_below() {
        compare_loss(1, 0.50005, 0.50004).unwrap();
        assert!(compare_loss(1, 0.5003, 0.5001).is_err());
        compare_logps(1, "policy", &[-100.005, -0.00001], &[-100.0, -0.00002]).unwrap();
        let err = compare_logps(2, "reference", &[-100.0, -3.0], &[-100.0, -3.01]).unwrap_err().to_string();
        assert!(err.contains("reference log-prob of sequence 1"), "{err}");
        assert!(compare_loss(1, f64::NAN, 0.5).is_err());
    }
}
