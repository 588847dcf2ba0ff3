//! Checkpoints that survive a kill at any instant.
//!
//! Layout under the run's checkpoint root:
//! ```text
//! LATEST                      one line: the name of the newest complete checkpoint
//! step-00000010/
//!     trainer_state.json      step, data position, optimizer config, run config, the
//!                             inputs' content hashes, hashes of weights and optimizer state
//!     optimizer.safetensors   f32 master weights (`param/<name>`) and optimizer state
//!                             (`<kind>/<name>`, e.g. `exp_avg/…`, `delta_c/…`, `tau_ref/…`)
//!     model/                  the policy as a Hugging Face directory (for users; resume
//!                             reads the f32 master copy above, which is exact)
//! ```
//! A checkpoint is written into `step-N.partial-<pid>`, every file fsynced, the
//! directory renamed to `step-N`, and only then is `LATEST` replaced atomically. A
//! kill before that last rename leaves `LATEST` naming the previous, intact checkpoint.
//! Every tensor of `optimizer.safetensors` is covered by a hash in the state file,
//! so a damaged checkpoint is recognized on loading and a resume falls back to an
//! older one (`train::run::resume`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use super::config::OptimConfig;
use super::fsx::{sync_dir, write_atomic, write_synced};
use super::{Result, TrainError, weights_hash};
use crate::params::{ParamSet, Tensor};

/// Bumped whenever the on-disk layout changes, so that an old checkpoint is refused
/// with a clear message instead of being misread.
pub const FORMAT: u32 = 2;

const STATE_FILE: &str = "trainer_state.json";
const OPTIM_FILE: &str = "optimizer.safetensors";
const LATEST: &str = "LATEST";

/// Everything a resumed run needs besides the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Examples consumed so far in the run's data order (which is a pure function of
    /// the seed and the epoch), so a resumed run sees the same batches.
    pub data_position: u64,
    pub optim: OptimConfig,
    /// The task's settings (loss, beta, batch size, data source, ...), compared on
    /// resume field by field.
    pub run: serde_json::Value,
    /// Content hashes of the run's inputs (data files, models), compared on resume.
    pub inputs: Vec<InputHash>,
    /// `weights_hash` of the master weights, checked when loading.
    pub weights_hash: String,
    /// `weights_hash` of each kind of optimizer state (moments, step-K cache, task
    /// vector), checked when loading.
    pub optim_state_hashes: BTreeMap<String, String>,
}

/// The content hash of one input of a run, named by the flag that gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputHash {
    pub flag: String,
    pub path: PathBuf,
    pub hash: String,
}

/// A checkpoint's full content.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub state: TrainerState,
    /// f32 master weights.
    pub params: ParamSet,
    /// Optimizer state by kind (e.g. `exp_avg`), each laid out like the parameters
    /// or, for state that is not per-parameter, with its own tensor names.
    pub optim_state: BTreeMap<String, ParamSet>,
}

/// The checkpoint root's directory name for a step.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a checkpoint directory name, `None` for any other name (so `LATEST`
/// can only ever name a directory inside the root).
pub fn parse_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&step| dir_name(step) == name)
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serializes named f32 tensors into safetensors bytes.
pub fn to_safetensors(entries: &[(String, &Tensor)]) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = entries.iter().map(|(_, t)| f32_bytes(&t.data)).collect();
    let mut views = Vec::with_capacity(entries.len());
    for ((key, t), b) in entries.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), b)
            .map_err(|e| TrainError::msg(format!("tensor `{}`: shape {:?} does not fit its data: {e}", t.name, t.shape)))?;
        views.push((key.clone(), view));
    }
    safetensors::serialize(views, None).map_err(|e| TrainError::msg(format!("serializing safetensors: {e}")))
}

/// Reads every tensor of an f32 safetensors file, naming the file and tensor in errors.
pub fn from_safetensors(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| TrainError::msg(format!("{}: not a valid safetensors file: {e}", path.display())))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(TrainError::msg(format!(
                "{}: tensor `{name}` has dtype {:?}, expected F32",
                path.display(),
                view.dtype()
            )));
        }
        let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.insert(name.clone(), Tensor { name, shape: view.shape().to_vec(), data });
    }
    Ok(out)
}

/// Fills a directory (the checkpoint's `model/`).
pub type DirWriter<'a> = &'a dyn Fn(&Path) -> Result<()>;

/// Writes `ckpt` under `root` as described in the module docs. `write_model` (if
/// given) fills the `model/` subdirectory; it runs before the commit point, so a
/// failure there leaves the previous checkpoint current. Returns the new directory.
pub fn write(
    root: &Path,
    ckpt: &Checkpoint,
    write_model: Option<DirWriter<'_>>,
) -> Result<PathBuf> {
    fs::create_dir_all(root).map_err(|e| TrainError::io("creating checkpoint root", root, e))?;
    let step = ckpt.state.step;
    let final_dir = root.join(dir_name(step));
    let partial = root.join(format!("{}.partial-{}", dir_name(step), std::process::id()));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(|e| TrainError::io("removing stale partial checkpoint", &partial, e))?;
    }
    fs::create_dir(&partial).map_err(|e| TrainError::io("creating", &partial, e))?;

    let mut entries: Vec<(String, &Tensor)> = ckpt.params.tensors.iter().map(|t| (format!("param/{}", t.name), t)).collect();
    for (kind, set) in &ckpt.optim_state {
        if kind == "param" || kind.contains('/') {
            return Err(TrainError::msg(format!("optimizer state kind `{kind}` is reserved or contains '/'")));
        }
        entries.extend(set.tensors.iter().map(|t| (format!("{kind}/{}", t.name), t)));
    }
    let optim_bytes = to_safetensors(&entries)?;
    write_synced(&partial.join(OPTIM_FILE), &optim_bytes, Some(step))?;
    if let Some(w) = write_model {
        let model_dir = partial.join("model");
        fs::create_dir(&model_dir).map_err(|e| TrainError::io("creating", &model_dir, e))?;
        w(&model_dir)?;
        sync_dir(&model_dir)?;
    }
    let mut state = ckpt.state.clone();
    state.format = FORMAT;
    state.weights_hash = weights_hash(&ckpt.params);
    state.optim_state_hashes = ckpt.optim_state.iter().map(|(kind, set)| (kind.clone(), weights_hash(set))).collect();
    let json = serde_json::to_vec_pretty(&state).expect("TrainerState serializes");
    write_synced(&partial.join(STATE_FILE), &json, Some(step))?;
    sync_dir(&partial)?;

    // A directory of this name can only be left over from a run that was killed after
    // renaming it but before updating LATEST, i.e. one that never became current.
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(|e| TrainError::io("removing uncommitted checkpoint", &final_dir, e))?;
    }
    fs::rename(&partial, &final_dir).map_err(|e| TrainError::io("renaming checkpoint into place", &final_dir, e))?;
    sync_dir(root)?;
    let latest = root.join(LATEST);
    if super::fsx::abort_requested(LATEST, step) {
        eprintln!("HOST_ABORT_WRITING: aborting before replacing {}", latest.display());
        std::process::abort();
    }
    write_atomic(&latest, format!("{}\n", dir_name(step)).as_bytes())?;
    Ok(final_dir)
}

/// Removes complete checkpoints other than the newest `keep` (never the current one)
/// and any partial directories left by killed runs.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let current = read_latest_name(root)?;
    let mut complete = Vec::new();
    for e in fs::read_dir(root).map_err(|e| TrainError::io("listing", root, e))? {
        let e = e.map_err(|e| TrainError::io("listing", root, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".partial-") {
            fs::remove_dir_all(e.path()).map_err(|err| TrainError::io("removing", &e.path(), err))?;
        } else if name.starts_with("step-") {
            complete.push(name);
        }
    }
    complete.sort();
    let n = complete.len();
    for name in complete.into_iter().take(n.saturating_sub(keep.max(1))) {
        if Some(&name) != current.as_ref() {
            let p = root.join(&name);
            fs::remove_dir_all(&p).map_err(|e| TrainError::io("removing old checkpoint", &p, e))?;
        }
    }
    Ok(())
}

/// The raw content of `LATEST` (not yet checked to name a checkpoint).
pub fn read_latest_name(root: &Path) -> Result<Option<String>> {
    let p = root.join(LATEST);
    match fs::read_to_string(&p) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError::io("reading", &p, e)),
    }
}

/// The directory `LATEST` points to, if any checkpoint was ever committed. A
/// `LATEST` that names anything but a checkpoint directory is an error.
pub fn latest_dir(root: &Path) -> Result<Option<PathBuf>> {
    match read_latest_name(root)? {
        None => Ok(None),
        Some(n) if parse_dir_name(&n).is_some() => Ok(Some(root.join(n))),
        Some(n) => Err(TrainError::msg(format!("{}: names `{n}`, which is not a checkpoint directory", root.join(LATEST).display()))),
    }
}

/// The names of the complete checkpoint directories under `root`, newest first.
pub fn complete_names(root: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(root).map_err(|e| TrainError::io("listing", root, e))? {
        let e = e.map_err(|e| TrainError::io("listing", root, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = parse_dir_name(&name) {
            names.push((step, name));
        }
    }
    names.sort();
    Ok(names.into_iter().rev().map(|(_, n)| n).collect())
}

/// Loads the checkpoint in `dir`, checking its format and the weight hash.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    let raw = fs::read(&state_path).map_err(|e| TrainError::io("reading", &state_path, e))?;
    let state: TrainerState = serde_json::from_slice(&raw)
        .map_err(|e| TrainError::msg(format!("{}: malformed trainer state: {e}", state_path.display())))?;
    if state.format != FORMAT {
        return Err(TrainError::msg(format!(
            "{}: checkpoint format {} is not the supported format {FORMAT}",
            state_path.display(),
            state.format
        )));
    }
    let optim_path = dir.join(OPTIM_FILE);
    let bytes = fs::read(&optim_path).map_err(|e| TrainError::io("reading", &optim_path, e))?;
    let tensors = from_safetensors(&optim_path, &bytes)?;
    let mut params = Vec::new();
    let mut by_kind: BTreeMap<String, Vec<Tensor>> = BTreeMap::new();
    for (key, mut t) in tensors {
        let Some((kind, name)) = key.split_once('/') else {
            return Err(TrainError::msg(format!("{}: tensor `{key}` has no `<kind>/` prefix", optim_path.display())));
        };
        t.name = name.to_string();
        if kind == "param" { params.push(t) } else { by_kind.entry(kind.to_string()).or_default().push(t) }
    }
    let params = ParamSet::new(params);
    let hash = weights_hash(&params);
    if hash != state.weights_hash {
        return Err(TrainError::msg(format!(
            "{}: master weights hash {hash} does not match {} recorded in {}",
            optim_path.display(),
            state.weights_hash,
            state_path.display()
        )));
    }
    let optim_state: BTreeMap<String, ParamSet> = by_kind.into_iter().map(|(k, v)| (k, ParamSet::new(v))).collect();
    let found: Vec<&String> = optim_state.keys().collect();
    let recorded: Vec<&String> = state.optim_state_hashes.keys().collect();
    if found != recorded {
        return Err(TrainError::msg(format!(
            "{}: optimizer state kinds {found:?} are not the {recorded:?} recorded in {}",
            optim_path.display(),
            state_path.display()
        )));
    }
    for (kind, set) in &optim_state {
        let hash = weights_hash(set);
        if hash != state.optim_state_hashes[kind] {
            return Err(TrainError::msg(format!(
                "{}: optimizer state `{kind}` hash {hash} does not match {} recorded in {}",
                optim_path.display(),
                state.optim_state_hashes[kind],
                state_path.display()
            )));
        }
    }
    Ok(Checkpoint { state, params, optim_state })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::{AdamForm, Algorithm, OptimConfig, ScheduleKind, Scope, Variant};

    fn sample(step: u64) -> Checkpoint {
        let params = ParamSet::new(vec![
            Tensor { name: "b".into(), shape: vec![3], data: vec![1.0, -2.0, step as f32] },
            Tensor { name: "a".into(), shape: vec![2, 1], data: vec![0.5, f32::from_bits(1)] },
        ]);
        let mut optim_state = BTreeMap::new();
        optim_state.insert("exp_avg".to_string(), params.zeros_like());
        Checkpoint {
            state: TrainerState {
                format: FORMAT,
                step,
                data_position: step * 4,
                optim: OptimConfig {
                    algorithm: Algorithm::Adamw,
                    adam_form: AdamForm::Torch,
                    variant: Variant::Reference,
                    lr: 1e-3,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.0,
                    p: 1.0,
                    alpha: 0.0,
                    k: 1,
                    seed: 1,
                    rescale: false,
                    clip: 1.0,
                    scope: Scope::PerTensor,
                    schedule: ScheduleKind::Constant,
                    warmup_steps: 0,
                    total_steps: 10,
                },
                run: serde_json::json!({"loss": "sigmoid"}),
                inputs: vec![InputHash { flag: "--data".into(), path: "d.jsonl".into(), hash: "0123".into() }],
                weights_hash: String::new(),
                optim_state_hashes: BTreeMap::new(),
            },
            params,
            optim_state,
        }
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("host-ckpt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trip_is_bit_exact_and_latest_advances() {
        let root = tmp("rt");
        write(&root, &sample(2), None).unwrap();
        write(&root, &sample(4), None).unwrap();
        let dir = latest_dir(&root).unwrap().unwrap();
        assert!(dir.ends_with("step-00000004"));
        let back = load(&dir).unwrap();
        let mut want = sample(4);
        want.state.weights_hash = weights_hash(&want.params);
        want.state.optim_state_hashes.insert("exp_avg".into(), weights_hash(&want.optim_state["exp_avg"]));
        assert_eq!(back, want);
        prune(&root, 1).unwrap();
        assert!(!root.join("step-00000002").exists());
        assert!(root.join("step-00000004").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn corrupted_weights_are_refused_with_the_file_named() {
        let root = tmp("bad");
        let dir = write(&root, &sample(1), None).unwrap();
        let p = dir.join(OPTIM_FILE);
        let mut b = fs::read(&p).unwrap();
        let n = b.len();
        b[n - 1] ^= 0x40;
        fs::write(&p, &b).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("optimizer.safetensors") && err.contains("hash"), "{err}");
        fs::write(&p, &b[..n / 2]).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors"), "{err}");
        fs::remove_dir_all(&root).unwrap();
    }

    /// A flipped sign or exponent bit in a moment changes no master weight, so
    /// only the state's own hash can see it.
    #[test]
    fn flipped_bits_in_optimizer_state_are_refused_with_the_kind_named() {
        let root = tmp("state-bits");
        let mut ck = sample(1);
        ck.optim_state.insert("exp_avg_sq".into(), ck.params.zeros_like());
        let dir = write(&root, &ck, None).unwrap();
        let p = dir.join(OPTIM_FILE);
        let clean = fs::read(&p).unwrap();
        let header_len = u64::from_le_bytes(clean[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&clean[8..8 + header_len]).unwrap();
        let start = 8 + header_len + header["exp_avg_sq/a"]["data_offsets"][0].as_u64().unwrap() as usize;
        for bit in [0x80u8, 0x40] {
            let mut b = clean.clone();
            b[start + 3] ^= bit;
            fs::write(&p, &b).unwrap();
            let err = load(&dir).unwrap_err().to_string();
            assert!(err.contains("optimizer state `exp_avg_sq` hash"), "{err}");
        }
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn only_checkpoint_names_parse() {
        assert_eq!(parse_dir_name("step-00000012"), Some(12));
        assert_eq!(parse_dir_name(&dir_name(123_456_789_012)), Some(123_456_789_012));
        for bad in ["../../../etc", "step-12", "step-0000001x", "step-000000012", "step-00000012/..", ""] {
            assert_eq!(parse_dir_name(bad), None, "{bad}");
        }
    }
}
