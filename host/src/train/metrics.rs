//! The metrics log: one JSON object per line, with TRL's key names so existing
//! plotting scripts for TRL logs read it unchanged.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Result, TrainError};

/// One logged step (training) or evaluation. Fields a task does not produce (the
/// preference metrics in pretraining, say) are left out of the line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub step: u64,
    /// `train` or `eval`.
    pub split: String,
    pub loss: f64,
    #[serde(rename = "rewards/chosen", skip_serializing_if = "Option::is_none", default)]
    pub rewards_chosen: Option<f64>,
    #[serde(rename = "rewards/rejected", skip_serializing_if = "Option::is_none", default)]
    pub rewards_rejected: Option<f64>,
    #[serde(rename = "rewards/accuracies", skip_serializing_if = "Option::is_none", default)]
    pub rewards_accuracies: Option<f64>,
    #[serde(rename = "rewards/margins", skip_serializing_if = "Option::is_none", default)]
    pub rewards_margins: Option<f64>,
    #[serde(rename = "logps/chosen", skip_serializing_if = "Option::is_none", default)]
    pub logps_chosen: Option<f64>,
    #[serde(rename = "logps/rejected", skip_serializing_if = "Option::is_none", default)]
    pub logps_rejected: Option<f64>,
    /// TRL's `logits/chosen` and `logits/rejected`: the logits' mean over the
    /// vocabulary, averaged over the completion tokens; `entropy`: the
    /// softmax's entropy (nats) averaged over chosen and rejected completion
    /// tokens; `mean_token_accuracy`: the share of chosen completion tokens whose
    /// largest logit is the target.
    #[serde(rename = "logits/chosen", skip_serializing_if = "Option::is_none", default)]
    pub logits_chosen: Option<f64>,
    #[serde(rename = "logits/rejected", skip_serializing_if = "Option::is_none", default)]
    pub logits_rejected: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entropy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mean_token_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    /// TRL's `num_tokens`: tokens (prompt and completion, chosen and rejected) the
    /// model has trained on so far, this step's included.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub num_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub learning_rate: Option<f64>,
    /// Forward + backward time of the step (all micro-batches).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub model_ms: Option<f64>,
    /// Optimizer step on the chosen backend, including the gradient upload.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub optimizer_ms: Option<f64>,
    /// The CPU recomputation and comparison of the step, the optimizer's (bit
    /// for bit against merge-core) and the model's (within tolerances); zero on
    /// unchecked steps.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cross_check_ms: Option<f64>,
    /// Whether this step's optimizer update was recomputed by merge-core and
    /// matched bit for bit (GPU runs, every `--cross-check-every` steps).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub optimizer_checked: Option<bool>,
    /// Whether this step's forward and backward were recomputed by the CPU model
    /// and matched within tolerances (GPU model runs).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub model_checked: Option<bool>,
    /// Where the forward and backward ran: the GPU adapter's description, or `cpu`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub model_device: Option<String>,
    /// Where the optimizer step ran: the GPU adapter's description, or `cpu`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub optimizer_device: Option<String>,
    /// Whether the step's gradients and weights stayed on the GPU (an unchecked
    /// step with model and optimizer there): only scalars came back.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resident: Option<bool>,
}

/// Appends records to a JSONL file, flushing each line so a killed run keeps every
/// line it logged.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Starts a fresh log (an existing file is replaced).
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::io("creating directory", dir, e))?;
        }
        let file = File::create(path).map_err(|e| TrainError::io("creating", path, e))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    /// Continues a log after resuming from `step`: lines of later steps (logged by the
    /// killed run after its last checkpoint) are dropped, because the resumed run logs
    /// those steps again. The trimmed file replaces the old one atomically.
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(TrainError::io("reading", path, e)),
        };
        let mut kept = String::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            // A torn last line (killed mid-write) is dropped; a torn line elsewhere
            // means the file is not ours.
            let rec: Record = match serde_json::from_str(line) {
                Ok(r) => r,
                Err(_) if i + 1 == text.lines().count() => continue,
                Err(e) => return Err(TrainError::msg(format!("{} line {}: not a metrics record: {e}", path.display(), i + 1))),
            };
            if rec.step <= step {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        super::fsx::write_atomic(path, kept.as_bytes())?;
        let file = OpenOptions::new().append(true).open(path).map_err(|e| TrainError::io("opening", path, e))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn log(&mut self, rec: &Record) -> Result<()> {
        let mut line = serde_json::to_string(rec).expect("Record serializes");
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| TrainError::io("writing", &self.path, e))?;
        self.file.flush().map_err(|e| TrainError::io("writing", &self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a whole metrics log.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io("reading", path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| TrainError::msg(format!("{} line {}: not a metrics record: {e}", path.display(), i + 1)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trl_names_and_resume_trimming() {
        let dir = std::env::temp_dir().join(format!("host-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("m.jsonl");
        let mut log = MetricsLog::create(&p).unwrap();
        for step in 1..=4 {
            log.log(&Record { step, split: "train".into(), loss: 0.5, rewards_margins: Some(0.1), ..Default::default() })
                .unwrap();
        }
        drop(log);
        let line = std::fs::read_to_string(&p).unwrap().lines().next().unwrap().to_string();
        assert!(line.contains("\"rewards/margins\":0.1") && !line.contains("rewards/chosen"), "{line}");
        // Simulate a kill mid-line.
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("{\"step\":5,\"spl");
        std::fs::write(&p, text).unwrap();
        let mut log = MetricsLog::resume(&p, 2).unwrap();
        log.log(&Record { step: 3, split: "train".into(), loss: 0.25, ..Default::default() }).unwrap();
        let recs = read(&p).unwrap();
        assert_eq!(recs.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(recs[2].loss, 0.25);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
