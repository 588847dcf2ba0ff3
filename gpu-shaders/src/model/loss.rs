//! DPO / IPO / hinge loss and its gradient w.r.t. the policy's summed
//! log-probabilities (`loss.wgsl`), so the step's loss stays on the device.

use super::{dispatch, expect_len, kernel, GpuVec};
use crate::context::{GpuContext, GpuError};
use crate::kernel::Kernel;

/// The losses of `host::loss::LossKind`, TRL's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreferenceLossKind {
    Sigmoid,
    Ipo,
    Hinge,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct LossParams {
    pairs: u32,
    kind: u32,
    beta: f32,
    label_smoothing: f32,
}

/// Summed log-probabilities of each pair's completions, one value per pair
/// (for IPO, length-averaged ones, as `host::loss::DpoLoss::length_normalized`
/// asks of its caller).
pub struct PairLogps<'a> {
    pub policy_chosen: &'a GpuVec,
    pub policy_rejected: &'a GpuVec,
    pub ref_chosen: &'a GpuVec,
    pub ref_rejected: &'a GpuVec,
}

pub struct PreferenceLoss {
    ctx: GpuContext,
    kernel: Kernel,
    kind: PreferenceLossKind,
    beta: f32,
    label_smoothing: f32,
}

impl PreferenceLoss {
    /// The hyperparameters `host::loss::DpoLoss::new` accepts: `beta > 0`,
    /// `label_smoothing ∈ [0, 0.5)` and only with the sigmoid loss.
    pub fn new(ctx: &GpuContext, kind: PreferenceLossKind, beta: f32, label_smoothing: f32) -> Result<PreferenceLoss, GpuError> {
        if !(beta.is_finite() && beta > 0.0) {
            return Err(GpuError::Invalid(format!("preference loss: beta {beta} is not a positive finite number")));
        }
        if !(0.0..0.5).contains(&label_smoothing) || (label_smoothing != 0.0 && kind != PreferenceLossKind::Sigmoid) {
            return Err(GpuError::Invalid(format!(
                "preference loss: label_smoothing {label_smoothing} must lie in [0, 0.5) and is only for the sigmoid loss ({kind:?} given)"
            )));
        }
        Ok(PreferenceLoss {
            ctx: ctx.clone(),
            kernel: kernel(ctx, "preference_loss", include_str!("loss.wgsl"), "preference_loss"),
            kind,
            beta,
            label_smoothing,
        })
    }

    /// The batch's mean loss into `mean_loss[0]`, and `d_chosen[i]`,
    /// `d_rejected[i]` = ∂ mean loss / ∂ policy log-prob of pair `i`.
    pub fn batch(&self, logps: PairLogps<'_>, d_chosen: &GpuVec, d_rejected: &GpuVec, mean_loss: &GpuVec) -> Result<(), GpuError> {
        let pairs = logps.policy_chosen.len();
        if pairs == 0 {
            return Err(GpuError::Invalid("preference loss: empty batch".into()));
        }
        for (what, v) in [
            ("policy_rejected", logps.policy_rejected),
            ("ref_chosen", logps.ref_chosen),
            ("ref_rejected", logps.ref_rejected),
            ("d_chosen", d_chosen),
            ("d_rejected", d_rejected),
        ] {
            expect_len(what, v, pairs)?;
        }
        expect_len("mean_loss", mean_loss, 1)?;
        let kind = match self.kind {
            PreferenceLossKind::Sigmoid => 0,
            PreferenceLossKind::Ipo => 1,
            PreferenceLossKind::Hinge => 2,
        };
        let p = LossParams { pairs: pairs as u32, kind, beta: self.beta, label_smoothing: self.label_smoothing };
        let bindings = [
            (1, logps.policy_chosen),
            (2, logps.policy_rejected),
            (3, logps.ref_chosen),
            (4, logps.ref_rejected),
            (5, d_chosen),
            (6, d_rejected),
            (7, mean_loss),
        ];
        dispatch(&self.ctx, &self.kernel, &p, &bindings, 1)
    }
}
