//! Content hashes of a run's inputs, recorded in its checkpoints so that `--resume`
//! notices a data file edited or a model directory replaced since the kill (paths
//! alone would not).

use std::path::Path;

use crate::hf;
use crate::model::LlamaModel;
use crate::tokenizer::pretrained::{CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};
use crate::train::checkpoint::InputHash;
use crate::train::{Result, TrainError, weights_hash};

/// The hash of a file's bytes.
pub fn file_hash(flag: &str, path: &Path) -> Result<InputHash> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io("reading", path, e))?;
    Ok(InputHash { flag: flag.into(), path: path.to_path_buf(), hash: format!("{:016x}", crate::hash::fnv1a64(&bytes)) })
}

/// The hash of a loaded model: its tensors (as f32, so a bf16 and an f32 file of
/// the same values agree) and its architecture.
pub fn model_hash(flag: &str, dir: &Path, model: &LlamaModel) -> InputHash {
    let config = crate::hash::fnv1a64(hf::config_json(&model.config, merge_core::dtype::Dtype::F32).as_bytes());
    InputHash { flag: flag.into(), path: dir.to_path_buf(), hash: format!("{}-{config:016x}", weights_hash(&model.params)) }
}

/// The hashes of the tokenizer files a model folder has, each under its own flag
/// (`--model tokenizer.json`), so that `--resume` names the file that changed.
pub fn tokenizer_hashes(flag: &str, dir: &Path) -> Result<Vec<InputHash>> {
    [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE]
        .into_iter()
        .map(|name| dir.join(name))
        .filter(|path| path.exists())
        .map(|path| file_hash(&format!("{flag} {}", path.file_name().expect("joined a name").to_string_lossy()), &path))
        .collect()
}
