//! Hyperparameters, their validation, and the per-step scalars of SPEC.md §1.6 and
//! §5.1: computed once per step in binary64, rounded once to binary32.

use crate::error::Error;

/// Which AdamW the optimizer reproduces (SPEC.md §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdamForm {
    /// `torch.optim.AdamW`: bias-corrected denominator, decay before the update.
    Torch,
    /// The older Hugging Face `transformers.AdamW` the official code builds on:
    /// bias corrections folded into the step size, decay after the update.
    HuggingFace,
}

/// Learning-rate schedule, evaluated at `s = k − 1` for the 1-based step `k` (the
/// Hugging Face convention: the scheduler advances after each optimizer step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// `transformers.get_cosine_schedule_with_warmup` with half a cycle: linear from
    /// 0 over `warmup` steps, then cosine down to 0 at `total`; 0 after `total`.
    WarmupCosine { warmup: u64, total: u64 },
}

/// The Adam part of the optimizer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub form: AdamForm,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
}

impl Default for AdamConfig {
    /// The paper's alignment setting (lr 1e-6, ε 1e-8) in the official code's form.
    fn default() -> Self {
        AdamConfig {
            form: AdamForm::HuggingFace,
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
        }
    }
}

pub(crate) fn invalid(name: &'static str, value: f64, expected: &'static str) -> Error {
    Error::InvalidHyperparameter { name, value, expected }
}

/// Largest step: the step enters the generator as a `u32` counter word.
pub const MAX_STEP: u64 = u32::MAX as u64;

impl AdamConfig {
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(invalid("lr", self.lr, "finite and >= 0"));
        }
        if !(self.beta1 >= 0.0 && self.beta1 < 1.0) {
            return Err(invalid("beta1", self.beta1, "0 <= beta1 < 1"));
        }
        if !(self.beta2 >= 0.0 && self.beta2 < 1.0) {
            return Err(invalid("beta2", self.beta2, "0 <= beta2 < 1"));
        }
        // ε must stay a normal binary32 value: the flush rule would turn a subnormal
        // ε into 0 and the denominator √v ⊕ ε could vanish.
        let eps32 = self.eps as f32;
        if !(self.eps > 0.0 && eps32.is_finite() && eps32.to_bits() & crate::arith::EXP_MASK != 0) {
            return Err(invalid("eps", self.eps, "> 0 and a normal binary32 value after rounding"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid("weight_decay", self.weight_decay, "finite and >= 0"));
        }
        if let Schedule::WarmupCosine { warmup, total } = self.schedule {
            if total == 0 {
                return Err(invalid("total_steps", total as f64, ">= 1"));
            }
            if warmup > total {
                return Err(invalid("warmup_steps", warmup as f64, "<= total_steps"));
            }
        }
        Ok(())
    }

    /// The learning rate `η_k` of 1-based step `k`, in binary64.
    pub fn lr_at(&self, k: u64) -> f64 {
        let s = k.saturating_sub(1);
        let factor = match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::WarmupCosine { warmup, total } => {
                if s < warmup {
                    s as f64 / warmup as f64
                } else {
                    let span = (total - warmup).max(1);
                    let progress = ((s - warmup) as f64 / span as f64).min(1.0);
                    0.5 * (1.0 + libm::cos(PI * progress))
                }
            }
        };
        self.lr * factor
    }

    /// The binary32 scalars of step `k` (SPEC.md §5.1).
    pub fn scalars(&self, k: u64) -> Result<StepScalars, Error> {
        self.validate()?;
        if k == 0 || k > MAX_STEP {
            return Err(invalid("step", k as f64, "1 <= step <= 2^32 - 1"));
        }
        let lr = self.lr_at(k);
        let bc1 = 1.0 - pow_by_squaring(self.beta1, k);
        let bc2 = 1.0 - pow_by_squaring(self.beta2, k);
        let decay = lr * self.weight_decay;
        let (neg_step_size, bc2_sqrt, decay_before, decay_after) = match self.form {
            AdamForm::HuggingFace => (-(lr * libm::sqrt(bc2) / bc1), 1.0, 1.0, decay),
            AdamForm::Torch => (-(lr / bc1), libm::sqrt(bc2), 1.0 - decay, 0.0),
        };
        // Every scalar is rounded once and then flushed, like every value in the
        // merge path, so a GPU that flushes its uniforms agrees.
        let rf = |x: f64| crate::arith::flush(x as f32);
        Ok(StepScalars {
            form: self.form,
            lr: rf(lr),
            beta1: rf(self.beta1),
            beta2: rf(self.beta2),
            one_minus_beta1: rf(1.0 - self.beta1),
            one_minus_beta2: rf(1.0 - self.beta2),
            eps: rf(self.eps),
            neg_step_size: rf(neg_step_size),
            bc2_sqrt: rf(bc2_sqrt),
            decay_before: rf(decay_before),
            decay_after: rf(decay_after),
        })
    }
}

/// SPEC.md §1.6: `π` as the binary64 constant 0x400921FB54442D18.
const PI: f64 = core::f64::consts::PI;

/// `β^k` by right-to-left binary exponentiation in binary64 (SPEC.md §1.6).
pub fn pow_by_squaring(beta: f64, mut k: u64) -> f64 {
    let mut r = 1.0;
    let mut b = beta;
    while k > 0 {
        if k & 1 == 1 {
            r *= b;
        }
        b *= b;
        k >>= 1;
    }
    r
}

/// The scalars one step of one tensor needs, as the bits every implementation uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepScalars {
    pub form: AdamForm,
    /// `η_k`, rounded (informational: the element arithmetic uses the scalars below).
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// `c1 = RN(1 − β1)`.
    pub one_minus_beta1: f32,
    /// `c2 = RN(1 − β2)`.
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// HF: `−RN(η·√(1−β2^k)/(1−β1^k))`; torch: `−RN(η/(1−β1^k))`.
    pub neg_step_size: f32,
    /// torch: `RN(√(1−β2^k))`; HF: 1 (unused).
    pub bc2_sqrt: f32,
    /// torch: `RN(1 − ηλ)`, the factor applied before the update; HF: 1 (unused).
    pub decay_before: f32,
    /// HF: `RN(ηλ)`, applied after the update as `θ ⊖ (ηλ)⊗θ`; torch: 0 (unused).
    pub decay_after: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow_is_exact_for_powers_of_two_and_matches_repeated_products() {
        assert_eq!(pow_by_squaring(0.5, 10), 1.0 / 1024.0);
        assert_eq!(pow_by_squaring(0.9, 0), 1.0);
        assert_eq!(pow_by_squaring(0.9, 1), 0.9);
        assert_eq!(pow_by_squaring(0.9, 3), (0.9 * 0.9) * 0.9);
        assert_eq!(pow_by_squaring(0.0, 5), 0.0);
    }

    #[test]
    fn first_step_scalars_hf_and_torch() {
        let hf = AdamConfig { lr: 1e-3, ..AdamConfig::default() };
        let s = hf.scalars(1).unwrap();
        // k = 1: √(1−β2)/(1−β1) = √0.001/0.1.
        let want = -(1e-3f64 * libm::sqrt(1.0 - 0.999) / (1.0 - 0.9)) as f32;
        assert_eq!(s.neg_step_size.to_bits(), want.to_bits());
        assert_eq!((s.bc2_sqrt, s.decay_before, s.decay_after), (1.0, 1.0, 0.0));
        assert_eq!(s.one_minus_beta2, (1.0f64 - 0.999) as f32);
        let torch = AdamConfig { form: AdamForm::Torch, weight_decay: 0.1, ..hf };
        let s = torch.scalars(1).unwrap();
        assert_eq!(s.neg_step_size, -(1e-3f64 / (1.0 - 0.9)) as f32);
        assert_eq!(s.bc2_sqrt, libm::sqrt(1.0 - 0.999) as f32);
        assert_eq!(s.decay_before, (1.0 - 1e-3 * 0.1) as f32);
        assert_eq!(s.decay_after, 0.0);
    }

    #[test]
    fn warmup_cosine_follows_the_hf_convention() {
        let c = AdamConfig { lr: 2.0, schedule: Schedule::WarmupCosine { warmup: 4, total: 12 }, ..AdamConfig::default() };
        assert_eq!(c.lr_at(1), 0.0); // s = 0
        assert_eq!(c.lr_at(3), 1.0); // s = 2 of 4
        assert_eq!(c.lr_at(5), 2.0); // s = 4: cos(0)
        assert_eq!(c.lr_at(9), 2.0 * 0.5 * (1.0 + libm::cos(PI * 0.5)));
        assert_eq!(c.lr_at(13), 0.0); // s = total: cos(π) = −1 exactly in binary64? close: 0.5·(1−1)
        assert_eq!(c.lr_at(100), c.lr_at(13));
        let z = AdamConfig { lr: 1.0, schedule: Schedule::WarmupCosine { warmup: 0, total: 1 }, ..AdamConfig::default() };
        assert_eq!(z.lr_at(1), 1.0);
    }

    #[test]
    fn bad_hyperparameters_are_named() {
        let base = AdamConfig::default();
        let cases: [(AdamConfig, &str); 10] = [
            (AdamConfig { lr: -1.0, ..base }, "lr"),
            (AdamConfig { lr: f64::NAN, ..base }, "lr"),
            (AdamConfig { beta1: 1.0, ..base }, "beta1"),
            (AdamConfig { beta2: -0.1, ..base }, "beta2"),
            (AdamConfig { eps: 0.0, ..base }, "eps"),
            (AdamConfig { eps: 1e-60, ..base }, "eps"),
            (AdamConfig { eps: 1e-40, ..base }, "eps"),
            (AdamConfig { weight_decay: -0.01, ..base }, "weight_decay"),
            (AdamConfig { schedule: Schedule::WarmupCosine { warmup: 5, total: 4 }, ..base }, "warmup_steps"),
            (AdamConfig { schedule: Schedule::WarmupCosine { warmup: 0, total: 0 }, ..base }, "total_steps"),
        ];
        for (c, want) in cases {
            match c.validate() {
                Err(Error::InvalidHyperparameter { name, .. }) => assert_eq!(name, want),
                other => panic!("{want}: {other:?}"),
            }
        }
        assert!(matches!(base.scalars(0), Err(Error::InvalidHyperparameter { name: "step", .. })));
        assert!(matches!(base.scalars(1 << 32), Err(Error::InvalidHyperparameter { name: "step", .. })));
    }
}
