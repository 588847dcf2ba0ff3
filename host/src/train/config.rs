//! The trainer's optimizer configuration as the user states it (one field per CLI
//! flag). It is serialized into every checkpoint so that `--resume` can refuse a run
//! whose hyperparameters differ from the ones the saved state was produced with.

use serde::{Deserialize, Serialize};

/// Which optimizer drives the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Adamw,
    Ondare,
    Onties,
}

/// The two AdamW forms of SPEC.md §5.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AdamForm {
    /// `torch.optim.AdamW`: decay before the update, `sqrt(v)/sqrt(1-β2^k) + ε`.
    Torch,
    /// The older Hugging Face AdamW the official merging code builds on.
    Hf,
}

/// Reference (what the official code does) or paper (the printed equations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Reference,
    Paper,
}

/// Top-k trimming scope for OnTIES.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    PerTensor,
    Global,
}

/// Learning-rate schedule shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    Constant,
    WarmupCosine,
}

/// Every optimizer hyperparameter, exactly as given on the command line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub algorithm: Algorithm,
    pub adam_form: AdamForm,
    pub variant: Variant,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Reserve rate `p` (keep probability / keep fraction).
    pub p: f64,
    /// Merge weight `α`.
    pub alpha: f64,
    /// Merge every K-th step (K = 1: online merging).
    pub k: u32,
    pub seed: u64,
    pub rescale: bool,
    pub clip: f64,
    pub scope: Scope,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    /// Steps the schedule spans (the run's total optimizer steps).
    pub total_steps: u64,
}

/// A hyperparameter the user got wrong, named by its flag.
#[derive(Debug, Clone, PartialEq)]
pub struct BadFlag {
    pub flag: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl std::fmt::Display for BadFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {}: expected {}", self.flag, self.value, self.expected)
    }
}

impl std::error::Error for BadFlag {}

fn check(ok: bool, flag: &'static str, value: impl std::fmt::Display, expected: &'static str) -> Result<(), BadFlag> {
    if ok { Ok(()) } else { Err(BadFlag { flag, value: value.to_string(), expected }) }
}

impl OptimConfig {
    /// Range checks on every field; the error names the CLI flag. Comparisons are
    /// written so that NaN fails them.
    pub fn validate(&self) -> Result<(), BadFlag> {
        check(self.lr.is_finite() && self.lr > 0.0, "--lr", self.lr, "a finite number > 0")?;
        check(self.beta1 >= 0.0 && self.beta1 < 1.0, "--beta1", self.beta1, "a number in [0, 1)")?;
        check(self.beta2 >= 0.0 && self.beta2 < 1.0, "--beta2", self.beta2, "a number in [0, 1)")?;
        check(
            self.eps > 0.0 && (self.eps as f32).is_normal(),
            "--eps",
            self.eps,
            "a number > 0 that is a normal binary32 value",
        )?;
        check(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay",
            self.weight_decay,
            "a finite number >= 0",
        )?;
        check(self.p > 0.0 && self.p <= 1.0, "--p", self.p, "a number in (0, 1]")?;
        check(self.alpha >= 0.0 && self.alpha <= 1.0, "--alpha", self.alpha, "a number in [0, 1]")?;
        check(self.k >= 1, "--k", self.k, "an integer >= 1")?;
        check(self.clip.is_finite() && self.clip > 0.0, "--clip", self.clip, "a finite number > 0")?;
        check(self.total_steps >= 1, "--steps", self.total_steps, "an integer >= 1")?;
        if self.schedule == ScheduleKind::WarmupCosine {
            check(
                self.warmup_steps <= self.total_steps,
                "--warmup-steps",
                self.warmup_steps,
                "at most --steps",
            )?;
        }
        Ok(())
    }

    /// Names of the fields that differ between `self` and `saved`, for the
    /// resume-mismatch error (compared through JSON so that every field counts,
    /// including ones added later).
    pub fn differing_fields(&self, saved: &OptimConfig) -> Vec<String> {
        let a = serde_json::to_value(self).expect("OptimConfig serializes");
        let b = serde_json::to_value(saved).expect("OptimConfig serializes");
        let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (a, b) else {
            unreachable!("OptimConfig is a struct")
        };
        a.iter()
            .filter(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, v)| format!("{k}: saved {}, given {v}", b.get(k.as_str()).cloned().unwrap_or_default()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> OptimConfig {
        OptimConfig {
            algorithm: Algorithm::Ondare,
            adam_form: AdamForm::Hf,
            variant: Variant::Reference,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            p: 0.5,
            alpha: 0.1,
            k: 1,
            seed: 7,
            rescale: false,
            clip: 1.0,
            scope: Scope::PerTensor,
            schedule: ScheduleKind::WarmupCosine,
            warmup_steps: 2,
            total_steps: 10,
        }
    }

    #[test]
    fn valid_sample_passes() {
        sample().validate().unwrap();
    }

    #[test]
    fn each_bad_value_names_its_flag() {
        type Case = (fn(&mut OptimConfig), &'static str);
        let cases: Vec<Case> = vec![
            (|c| c.lr = 0.0, "--lr"),
            (|c| c.lr = f64::NAN, "--lr"),
            (|c| c.beta1 = 1.0, "--beta1"),
            (|c| c.beta2 = -0.1, "--beta2"),
            (|c| c.eps = 0.0, "--eps"),
            (|c| c.eps = 1e-45, "--eps"),
            (|c| c.weight_decay = -1.0, "--weight-decay"),
            (|c| c.p = 0.0, "--p"),
            (|c| c.p = 1.5, "--p"),
            (|c| c.alpha = 2.0, "--alpha"),
            (|c| c.alpha = f64::NAN, "--alpha"),
            (|c| c.k = 0, "--k"),
            (|c| c.clip = f64::INFINITY, "--clip"),
            (|c| c.warmup_steps = 11, "--warmup-steps"),
        ];
        for (mutate, flag) in cases {
            let mut c = sample();
            mutate(&mut c);
            let err = c.validate().unwrap_err();
            assert_eq!(err.flag, flag, "{err}");
        }
    }

    #[test]
    fn differing_fields_lists_only_changes() {
        let a = sample();
        let mut b = sample();
        assert!(a.differing_fields(&b).is_empty());
        b.p = 0.25;
        b.seed = 8;
        let d = a.differing_fields(&b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().any(|s| s.starts_with("p:")));
        assert!(d.iter().any(|s| s.starts_with("seed:")));
    }
}
