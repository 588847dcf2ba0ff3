//! The trainer's optimizer configuration as the user states it (one field per CLI
//! flag). It is serialized into every checkpoint so that `--resume` can refuse a run
//! whose hyperparameters differ from the ones the saved state was produced with.

use merge_core::dare::{DareConfig, DareVariant};
use merge_core::hyper::{AdamConfig, AdamForm as CoreAdamForm, Schedule};
use merge_core::onties::Variant as TiesVariant;
use merge_core::optim::{Merge, OnlineConfig, Optimizer as CoreOptimizer, Scope as CoreScope, TiesConfig};
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

/// The CLI flag of each hyperparameter merge-core validates, by merge-core's name.
const FLAGS: [(&str, &str); 11] = [
    ("lr", "--lr"),
    ("beta1", "--beta1"),
    ("beta2", "--beta2"),
    ("eps", "--eps"),
    ("weight_decay", "--weight-decay"),
    ("total_steps", "--steps"),
    ("warmup_steps", "--warmup-steps"),
    ("p (reserve rate)", "--p"),
    ("alpha", "--alpha"),
    ("clip", "--clip"),
    ("k (merge every k steps)", "--k"),
];

impl OptimConfig {
    /// The merge-core configuration these flags describe (the host's enums mirror
    /// merge-core's only to carry clap and serde, which the `no_std` core has not).
    pub fn to_core(&self) -> OnlineConfig {
        let adam = AdamConfig {
            form: match self.adam_form {
                AdamForm::Torch => CoreAdamForm::Torch,
                AdamForm::Hf => CoreAdamForm::HuggingFace,
            },
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            schedule: match self.schedule {
                ScheduleKind::Constant => Schedule::Constant,
                ScheduleKind::WarmupCosine => Schedule::WarmupCosine { warmup: self.warmup_steps, total: self.total_steps },
            },
        };
        let merge = match self.algorithm {
            Algorithm::Adamw => Merge::None,
            Algorithm::Ondare => Merge::Dare(DareConfig {
                variant: match self.variant {
                    Variant::Reference => DareVariant::Reference,
                    Variant::Paper => DareVariant::Paper,
                },
                p: self.p,
                alpha: self.alpha,
                rescale: self.rescale,
                clip: self.clip,
            }),
            Algorithm::Onties => Merge::Ties(TiesConfig {
                variant: match self.variant {
                    Variant::Reference => TiesVariant::Reference,
                    Variant::Paper => TiesVariant::Paper,
                },
                p: self.p,
                alpha: self.alpha,
                rescale: self.rescale,
                scope: match self.scope {
                    Scope::PerTensor => CoreScope::PerTensor,
                    Scope::Global => CoreScope::Global,
                },
            }),
        };
        OnlineConfig { adam, merge, k: self.k, seed: self.seed }
    }

    /// Checks the hyperparameters where they are defined, in merge-core (so the CLI
    /// accepts exactly what the core does: e.g. `--lr 0`, and `--p` only where the
    /// algorithm uses it), and names the flag in the error. The one rule of the
    /// run itself: at least one step.
    pub fn validate(&self) -> Result<(), BadFlag> {
        check(self.total_steps >= 1, "--steps", self.total_steps, "an integer >= 1")?;
        match CoreOptimizer::new(self.to_core()) {
            Ok(_) => Ok(()),
            Err(merge_core::Error::InvalidHyperparameter { name, value, expected }) => {
                let flag = FLAGS.iter().find(|(core, _)| *core == name).map_or(name, |(_, flag)| *flag);
                Err(BadFlag { flag, value: value.to_string(), expected })
            }
            Err(e) => unreachable!("merge-core's optimizer constructor reports only hyperparameters, got: {e}"),
        }
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
            (|c| c.lr = -1e-3, "--lr"),
            (|c| c.lr = f64::NAN, "--lr"),
            (|c| c.total_steps = 0, "--steps"),
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
            (|c| c.clip = 0.0, "--clip"),
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
    fn the_cli_accepts_what_merge_core_accepts() {
        let mut c = sample();
        c.lr = 0.0;
        c.validate().unwrap();
        // Plain AdamW has no reserve rate, merge weight or clip to check.
        c.algorithm = Algorithm::Adamw;
        (c.p, c.alpha, c.clip) = (5.0, -1.0, 0.0);
        c.validate().unwrap();
        c.algorithm = Algorithm::Onties;
        assert_eq!(c.validate().unwrap_err().flag, "--p");
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
