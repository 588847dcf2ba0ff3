//! DPO-family preference losses on summed completion log-probabilities, with
//! TRL's formulas and metric names (`trl.DPOTrainer`).
//!
//! With `h = (π_c − π_r) − (ref_c − ref_r)` (policy and reference log-probs of the
//! chosen and rejected completions):
//! - `sigmoid` (DPO; with label smoothing ε it is cDPO):
//!   `−(1−ε)·logσ(βh) − ε·logσ(−βh)`
//! - `ipo`: `(h − 1/(2β))²`. TRL feeds IPO *length-averaged* log-probs; see
//!   [`DpoLoss::length_normalized`].
//! - `hinge` (SLiC): `max(0, 1 − βh)`
//!
//! Everything is computed in f64; gradients are returned as f32 coefficients for
//! the model's backward pass.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    Sigmoid,
    Ipo,
    Hinge,
}

impl LossKind {
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Sigmoid => "sigmoid",
            LossKind::Ipo => "ipo",
            LossKind::Hinge => "hinge",
        }
    }
}

impl FromStr for LossKind {
    type Err = LossError;
    fn from_str(s: &str) -> Result<Self, LossError> {
        match s {
            "sigmoid" => Ok(LossKind::Sigmoid),
            "ipo" => Ok(LossKind::Ipo),
            "hinge" => Ok(LossKind::Hinge),
            other => Err(LossError::Hyperparameter {
                name: "loss_type",
                reason: format!("`{other}` is not one of sigmoid, ipo, hinge"),
            }),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum LossError {
    Hyperparameter {
        name: &'static str,
        reason: String,
    },
    /// A log-probability that is NaN or infinite, or slices of different lengths.
    Input {
        reason: String,
    },
}

impl fmt::Display for LossError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossError::Hyperparameter { name, reason } => write!(f, "hyperparameter `{name}`: {reason}"),
            LossError::Input { reason } => write!(f, "loss input: {reason}"),
        }
    }
}

impl std::error::Error for LossError {}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpoLoss {
    pub kind: LossKind,
    pub beta: f64,
    pub label_smoothing: f64,
}

/// One preference pair: the loss, its derivatives with respect to the policy's
/// chosen and rejected log-probs, and the implicit rewards `β(π − ref)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairLoss {
    pub loss: f64,
    pub d_chosen: f64,
    pub d_rejected: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}

/// Batch means, named as TRL logs them (see [`DpoMetrics::entries`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DpoMetrics {
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

impl DpoMetrics {
    pub fn entries(&self) -> [(&'static str, f64); 6] {
        [
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
    }
}

/// Mean loss over a batch and its gradient with respect to each pair's policy
/// log-probs (`d_chosen[i] = ∂ mean_loss / ∂ π_c[i]`).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchLoss {
    pub loss: f64,
    pub d_chosen: Vec<f32>,
    pub d_rejected: Vec<f32>,
    pub metrics: DpoMetrics,
}

/// `log σ(x)` without overflow for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - libm::log1p(libm::exp(-x.abs()))
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + libm::exp(-x))
    } else {
        let e = libm::exp(x);
        e / (1.0 + e)
    }
}

impl DpoLoss {
    /// `beta > 0`; `label_smoothing ∈ [0, 0.5)` and only with `sigmoid` (TRL's
    /// conservative DPO; 0.5 would make the loss constant).
    pub fn new(kind: LossKind, beta: f64, label_smoothing: f64) -> Result<Self, LossError> {
        if !(beta.is_finite() && beta > 0.0) {
            return Err(LossError::Hyperparameter {
                name: "beta",
                reason: format!("{beta} is not a positive finite number"),
            });
        }
        if !(0.0..0.5).contains(&label_smoothing) {
            return Err(LossError::Hyperparameter {
                name: "label_smoothing",
                reason: format!("{label_smoothing} is outside [0, 0.5)"),
            });
        }
        if label_smoothing != 0.0 && kind != LossKind::Sigmoid {
            return Err(LossError::Hyperparameter {
                name: "label_smoothing",
                reason: format!("{label_smoothing} given, but it only applies to the sigmoid loss, not {}", kind.name()),
            });
        }
        Ok(Self { kind, beta, label_smoothing })
    }

    /// IPO is defined on length-averaged log-probs (TRL divides each completion's
    /// summed log-prob by its token count before this loss); the caller should
    /// pass averages, and scale each sequence's backward coefficient by
    /// `1 / tokens`, when this is true.
    pub fn length_normalized(&self) -> bool {
        self.kind == LossKind::Ipo
    }

    pub fn pair(&self, policy_chosen: f64, policy_rejected: f64, ref_chosen: f64, ref_rejected: f64) -> PairLoss {
        let b = self.beta;
        let h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected);
        let (loss, dh) = match self.kind {
            LossKind::Sigmoid => {
                let (z, e) = (b * h, self.label_smoothing);
                let loss = -(1.0 - e) * log_sigmoid(z) - e * log_sigmoid(-z);
                // d/dz: −(1−ε)σ(−z) + εσ(z)
                (loss, b * (-(1.0 - e) * sigmoid(-z) + e * sigmoid(z)))
            }
            LossKind::Ipo => {
                let d = h - 1.0 / (2.0 * b);
                (d * d, 2.0 * d)
            }
            LossKind::Hinge => {
                let m = 1.0 - b * h;
                // relu's derivative at 0 is 0, as in torch
                if m > 0.0 { (m, -b) } else { (0.0, 0.0) }
            }
        };
        PairLoss {
            loss,
            d_chosen: dh,
            d_rejected: -dh,
            reward_chosen: b * (policy_chosen - ref_chosen),
            reward_rejected: b * (policy_rejected - ref_rejected),
        }
    }

    pub fn batch(&self, policy_chosen: &[f32], policy_rejected: &[f32], ref_chosen: &[f32], ref_rejected: &[f32]) -> Result<BatchLoss, LossError> {
        let n = policy_chosen.len();
        if n == 0 {
            return Err(LossError::Input { reason: "empty batch".into() });
        }
        for (what, s) in [("policy_rejected", policy_rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)] {
            if s.len() != n {
                return Err(LossError::Input {
                    reason: format!("{what} has {} values, policy_chosen has {n}", s.len()),
                });
            }
        }
        for (what, s) in [
            ("policy_chosen", policy_chosen),
            ("policy_rejected", policy_rejected),
            ("ref_chosen", ref_chosen),
            ("ref_rejected", ref_rejected),
        ] {
            if let Some(i) = s.iter().position(|x| !x.is_finite()) {
                return Err(LossError::Input {
                    reason: format!("{what}[{i}] = {} is not finite", s[i]),
                });
            }
        }
        let inv = 1.0 / n as f64;
        let mut out = BatchLoss {
            loss: 0.0,
            d_chosen: Vec::with_capacity(n),
            d_rejected: Vec::with_capacity(n),
            metrics: DpoMetrics::default(),
        };
        let m = &mut out.metrics;
        // Counted, not summed in steps of 1/n, which drifts past 1.0.
        let mut correct = 0usize;
        for i in 0..n {
            let (pc, pr) = (policy_chosen[i] as f64, policy_rejected[i] as f64);
            let p = self.pair(pc, pr, ref_chosen[i] as f64, ref_rejected[i] as f64);
            out.loss += p.loss * inv;
            out.d_chosen.push((p.d_chosen * inv) as f32);
            out.d_rejected.push((p.d_rejected * inv) as f32);
            m.rewards_chosen += p.reward_chosen * inv;
            m.rewards_rejected += p.reward_rejected * inv;
            correct += usize::from(p.reward_chosen > p.reward_rejected);
            m.rewards_margins += (p.reward_chosen - p.reward_rejected) * inv;
            m.logps_chosen += pc * inv;
            m.logps_rejected += pr * inv;
        }
        m.rewards_accuracies = correct as f64 / n as f64;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_values() {
        // h = (−10 − −14) − (−11 − −12) = 4 − 1 = 3, β = 0.1 → z = 0.3
        let (pc, pr, rc, rr) = (-10.0, -14.0, -11.0, -12.0);
        let s = DpoLoss::new(LossKind::Sigmoid, 0.1, 0.0).unwrap().pair(pc, pr, rc, rr);
        let expect = (1.0 + (-0.3f64).exp()).ln(); // −log σ(0.3) = 0.554355...
        assert!((s.loss - expect).abs() < 1e-15 && (s.loss - 0.554355244468527).abs() < 1e-12, "{}", s.loss);
        assert!((s.d_chosen - (-0.1 / (1.0 + 0.3f64.exp()))).abs() < 1e-15);
        assert_eq!(s.d_rejected, -s.d_chosen);
        assert!((s.reward_chosen - 0.1).abs() < 1e-15 && (s.reward_rejected - -0.2).abs() < 1e-15);

        let c = DpoLoss::new(LossKind::Sigmoid, 0.1, 0.2).unwrap().pair(pc, pr, rc, rr);
        let expect = 0.8 * (1.0 + (-0.3f64).exp()).ln() + 0.2 * (1.0 + 0.3f64.exp()).ln();
        assert!((c.loss - expect).abs() < 1e-15);

        let i = DpoLoss::new(LossKind::Ipo, 0.1, 0.0).unwrap().pair(pc, pr, rc, rr);
        assert!((i.loss - 4.0).abs() < 1e-12, "(3 − 5)² = 4, got {}", i.loss); // 1/(2β) = 5
        assert!((i.d_chosen - -4.0).abs() < 1e-12);

        let h = DpoLoss::new(LossKind::Hinge, 0.1, 0.0).unwrap().pair(pc, pr, rc, rr);
        assert!((h.loss - 0.7).abs() < 1e-12 && (h.d_chosen - -0.1).abs() < 1e-15);
        let flat = DpoLoss::new(LossKind::Hinge, 1.0, 0.0).unwrap().pair(pc, pr, rc, rr);
        assert_eq!((flat.loss, flat.d_chosen), (0.0, 0.0)); // 1 − 3 < 0
    }

    #[test]
    fn derivatives_match_finite_differences() {
        let cases = [
            (LossKind::Sigmoid, 0.1, 0.0),
            (LossKind::Sigmoid, 0.5, 0.3),
            (LossKind::Ipo, 0.2, 0.0),
            (LossKind::Hinge, 0.1, 0.0),
        ];
        let points = [
            (-10.0, -14.0, -11.0, -12.0),
            (-30.0, -5.0, -29.0, -6.5),
            (-3.0, -3.0, -3.0, -3.0),
            (-200.0, -900.0, -210.0, -880.0),
        ];
        for (kind, beta, ls) in cases {
            let l = DpoLoss::new(kind, beta, ls).unwrap();
            for &(pc, pr, rc, rr) in &points {
                let p = l.pair(pc, pr, rc, rr);
                let e = 1e-5;
                let nc = (l.pair(pc + e, pr, rc, rr).loss - l.pair(pc - e, pr, rc, rr).loss) / (2.0 * e);
                let nr = (l.pair(pc, pr + e, rc, rr).loss - l.pair(pc, pr - e, rc, rr).loss) / (2.0 * e);
                assert!((nc - p.d_chosen).abs() < 1e-7 * (1.0 + nc.abs()), "{kind:?} at {pc}: {nc} vs {}", p.d_chosen);
                assert!(
                    (nr - p.d_rejected).abs() < 1e-7 * (1.0 + nr.abs()),
                    "{kind:?} at {pc}: {nr} vs {}",
                    p.d_rejected
                );
                assert!(p.loss.is_finite());
            }
        }
    }

    /// Summing 1/n per correct pair gave 0.9999999999999999 for ten pairs, and
    /// over several batches 1.0000000000000013.
    #[test]
    fn accuracy_of_all_correct_pairs_is_exactly_one() {
        let l = DpoLoss::new(LossKind::Sigmoid, 0.1, 0.0).unwrap();
        for n in [3, 6, 10, 49] {
            let (pc, pr, rc, rr) = (vec![-1.0f32; n], vec![-3.0f32; n], vec![-2.0f32; n], vec![-2.0f32; n]);
            assert_eq!(l.batch(&pc, &pr, &rc, &rr).unwrap().metrics.rewards_accuracies, 1.0, "{n} pairs");
        }
    }

    #[test]
    fn batch_means_and_metrics() {
        let l = DpoLoss::new(LossKind::Sigmoid, 0.1, 0.0).unwrap();
        let (pc, pr, rc, rr) = ([-10.0f32, -5.0], [-14.0f32, -4.0], [-11.0f32, -6.0], [-12.0f32, -4.0]);
        let b = l.batch(&pc, &pr, &rc, &rr).unwrap();
        let p0 = l.pair(-10.0, -14.0, -11.0, -12.0);
        let p1 = l.pair(-5.0, -4.0, -6.0, -4.0);
        assert!((b.loss - (p0.loss + p1.loss) / 2.0).abs() < 1e-15);
        assert_eq!(b.d_chosen, vec![(p0.d_chosen / 2.0) as f32, (p1.d_chosen / 2.0) as f32]);
        let m = b.metrics;
        assert!((m.rewards_chosen - 0.1).abs() < 1e-12); // (0.1 + 0.1) / 2
        assert!((m.rewards_rejected - -0.1).abs() < 1e-12); // (−0.2 + 0) / 2
        assert_eq!(m.rewards_accuracies, 1.0);
        assert!((m.rewards_margins - 0.2).abs() < 1e-12);
        assert_eq!((m.logps_chosen, m.logps_rejected), (-7.5, -9.0));
        let names: Vec<_> = m.entries().iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            [
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "rewards/margins",
                "logps/chosen",
                "logps/rejected"
            ]
        );
    }

    #[test]
    fn bad_inputs_are_named() {
        let e = DpoLoss::new(LossKind::Sigmoid, 0.0, 0.0).err().unwrap().to_string();
        assert!(e.contains("`beta`"), "{e}");
        let e = DpoLoss::new(LossKind::Hinge, 0.1, 0.1).err().unwrap().to_string();
        assert!(e.contains("`label_smoothing`") && e.contains("hinge"), "{e}");
        let e = DpoLoss::new(LossKind::Sigmoid, 0.1, 0.5).err().unwrap().to_string();
        assert!(e.contains("`label_smoothing`"), "{e}");
        let e = "kto".parse::<LossKind>().err().unwrap().to_string();
        assert!(e.contains("loss_type") && e.contains("kto"), "{e}");
        let l = DpoLoss::new(LossKind::Ipo, 0.1, 0.0).unwrap();
        let e = l.batch(&[0.0, f32::NAN], &[0.0; 2], &[0.0; 2], &[0.0; 2]).err().unwrap().to_string();
        assert!(e.contains("policy_chosen[1]"), "{e}");
        assert!(l.batch(&[0.0], &[0.0; 2], &[0.0], &[0.0]).is_err());
        assert!(l.length_normalized());
    }

    #[test]
    fn extreme_margins_stay_finite() {
        let l = DpoLoss::new(LossKind::Sigmoid, 1.0, 0.1).unwrap();
        for h in [-1e4, 1e4] {
            let p = l.pair(h, 0.0, 0.0, 0.0);
            assert!(p.loss.is_finite() && p.d_chosen.is_finite(), "{h}: {p:?}");
        }
        // at +∞-ish margin the smoothed loss grows linearly: ε·βh
        let p = l.pair(1e4, 0.0, 0.0, 0.0);
        assert!((p.loss - 0.1 * 1e4).abs() < 1e-6);
    }
}
