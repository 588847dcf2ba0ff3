//! What leaves or enters the device as a whole: the parameters and the
//! optimizer state, read back for checkpoints and cross-checks and loaded from a
//! checkpoint.

use merge_core::error::tensor_name;

use super::GpuOptimizer;
use crate::context::GpuError;

/// Moments (and `Δ_c` for step-K) of one tensor, read back for a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorStateData {
    pub name: String,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub cached: Option<Vec<f32>>,
}

impl GpuOptimizer {
    /// Current parameters, by name, in name order.
    pub fn read_params(&self) -> Result<Vec<(String, Vec<f32>)>, GpuError> {
        self.slots.iter().map(|s| Ok((s.name.clone(), s.theta.read_f32(&self.ctx)?))).collect()
    }

    /// Moments and Δ_c, for checkpoints and cross-checks.
    pub fn read_state(&self) -> Result<Vec<TensorStateData>, GpuError> {
        self.slots
            .iter()
            .map(|s| {
                Ok(TensorStateData {
                    name: s.name.clone(),
                    m: s.m.read_f32(&self.ctx)?,
                    v: s.v.read_f32(&self.ctx)?,
                    cached: s.cached.as_ref().map(|c| c.read_f32(&self.ctx)).transpose()?,
                })
            })
            .collect()
    }

    /// Restores parameters, moments, Δ_c and the step count from a checkpoint
    /// (also clears a failed unvalidated step).
    pub fn load_state(&mut self, steps: u64, params: &[(&str, &[f32])], state: &[TensorStateData]) -> Result<(), GpuError> {
        for slot in &self.slots {
            let p = params
                .iter()
                .find(|(n, _)| *n == slot.name)
                .ok_or_else(|| GpuError::Invalid(format!("checkpoint lacks parameters of `{}`", slot.name)))?;
            let st = state
                .iter()
                .find(|s| s.name == slot.name)
                .ok_or_else(|| GpuError::Invalid(format!("checkpoint lacks optimizer state of `{}`", slot.name)))?;
            for (what, len) in [("parameter", p.1.len()), ("exp_avg", st.m.len()), ("exp_avg_sq", st.v.len())] {
                if len as u64 != slot.n {
                    return Err(GpuError::Core(merge_core::Error::LengthMismatch {
                        tensor: tensor_name(&slot.name),
                        what,
                        expected: slot.n,
                        found: len as u64,
                    }));
                }
            }
            slot.theta.write_f32(&self.ctx, p.1);
            slot.m.write_f32(&self.ctx, &st.m);
            slot.v.write_f32(&self.ctx, &st.v);
            match (&slot.cached, &st.cached) {
                (Some(c), Some(d)) if d.len() as u64 == slot.n => c.write_f32(&self.ctx, d),
                (None, None) => {}
                _ => {
                    return Err(GpuError::Invalid(format!(
                        "tensor `{}`: checkpoint's cached delta does not match k = {}",
                        slot.name,
                        self.cpu.config().k
                    )))
                }
            }
        }
        self.cpu.set_steps(steps);
        self.poisoned = None;
        self.ctx.wait()
    }
}
