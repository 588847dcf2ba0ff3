//! A complete Hugging Face model folder written from trained (or merged) weights:
//! what `transformers`' `from_pretrained` and `AutoTokenizer` need, and nothing of
//! the source folder lost.
//!
//! The source folder's `config.json` is carried as it was (unknown fields, list-valued
//! `eos_token_id`, `rope_scaling` and all), with only its dtype set to the saved
//! one; its tokenizer, chat-template and generation files are copied byte for byte.
//! Weights above `max_shard_bytes` are split into shards with
//! `model.safetensors.index.json`, as `save_pretrained` does. Each file is written
//! atomically, the weights first, so a config never describes weights that are not
//! there yet.

use std::fs;
use std::path::{Path, PathBuf};

use merge_core::dtype::Dtype;
use serde_json::Value;

use crate::hf::{self, CONFIG_FILE, HfError, INDEX_FILE, WEIGHTS_FILE, atomic_write, dtype_name};
use crate::model::LlamaConfig;
use crate::params::{ParamSet, Tensor};

/// Files of a source folder copied beside the written weights, when present.
pub const CARRIED_FILES: [&str; 10] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// `save_pretrained`'s default shard limit (transformers 5: 50GB, decimal).
pub const DEFAULT_MAX_SHARD_SIZE: &str = "50GB";

/// `5GB` (10⁹), `500MB`, `2GiB` (2³⁰), `100KB` or plain bytes, as transformers parses it.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult).filter(|&b| b > 0)
}

/// Indices into `sizes` grouped into shards of at most `max_bytes` each, in order;
/// a tensor larger than the limit gets a shard of its own (transformers' rule).
pub fn plan_shards(sizes: &[u64], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, &b) in sizes.iter().enumerate() {
        if shards.is_empty() || (size + b > max_bytes && size > 0) {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("pushed above").push(i);
        size += b;
    }
    shards
}

/// File names transformers gives shards: `model.safetensors` for one, else
/// `model-00001-of-0000N.safetensors`.
pub fn shard_file_names(count: usize) -> Vec<String> {
    if count == 1 {
        return vec![WEIGHTS_FILE.to_string()];
    }
    (1..=count).map(|i| format!("model-{i:05}-of-{count:05}.safetensors")).collect()
}

/// `config` (a parsed config.json) with its dtype field set to `dtype`: `dtype`
/// when the file uses transformers 5's name only, else `torch_dtype`.
pub fn with_dtype(mut config: Value, dtype: Dtype) -> Value {
    if let Some(obj) = config.as_object_mut() {
        let key = if obj.contains_key("dtype") && !obj.contains_key("torch_dtype") { "dtype" } else { "torch_dtype" };
        obj.insert(key.into(), Value::String(dtype_name(dtype).into()));
    }
    config
}

/// How a trained model is written.
#[derive(Clone, Debug)]
pub struct FolderSpec {
    /// The folder the model was loaded from: its config.json and tokenizer and
    /// generation files are carried. None (a model trained from scratch): the
    /// config is written from `config`.
    pub source: Option<PathBuf>,
    pub config: LlamaConfig,
    pub dtype: Dtype,
    pub max_shard_bytes: u64,
}

impl FolderSpec {
    /// Writes `params` and the carried files into `dir` (created if missing).
    /// Weight files of another sharding left there by an earlier write are removed,
    /// so the folder never holds two sets of weights.
    pub fn write(&self, params: &ParamSet, dir: &Path) -> Result<(), HfError> {
        fs::create_dir_all(dir).map_err(|e| HfError::Io { path: dir.to_path_buf(), source: e })?;
        let sizes: Vec<u64> = params.tensors.iter().map(|t| (t.data.len() * self.dtype.size_bytes()) as u64).collect();
        let shards = plan_shards(&sizes, self.max_shard_bytes);
        let names = shard_file_names(shards.len());
        let mut weight_map = serde_json::Map::new();
        for (shard, name) in shards.iter().zip(&names) {
            let path = dir.join(name);
            let tensors: Vec<&Tensor> = shard.iter().map(|&i| &params.tensors[i]).collect();
            atomic_write(&path, &hf::encode_tensors(&path, &tensors, self.dtype)?)?;
            for t in tensors {
                weight_map.insert(t.name.clone(), Value::String(name.clone()));
            }
        }
        let index = dir.join(INDEX_FILE);
        if shards.len() > 1 {
            let total: u64 = sizes.iter().sum();
            let json = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
            atomic_write(&index, (serde_json::to_string_pretty(&json).expect("JSON serializes") + "\n").as_bytes())?;
        }
        remove_stale_weights(dir, &names)?;
        self.write_config(dir)?;
        if let Some(source) = &self.source {
            for file in CARRIED_FILES {
                let from = source.join(file);
                if from.is_file() {
                    let bytes = fs::read(&from).map_err(|e| HfError::Io { path: from.clone(), source: e })?;
                    atomic_write(&dir.join(file), &bytes)?;
                }
            }
        }
        Ok(())
    }

    fn write_config(&self, dir: &Path) -> Result<(), HfError> {
        let out = dir.join(CONFIG_FILE);
        let Some(source) = &self.source else {
            return atomic_write(&out, hf::config_json(&self.config, self.dtype).as_bytes());
        };
        let path = source.join(CONFIG_FILE);
        let text = fs::read_to_string(&path).map_err(|e| HfError::Io { path: path.clone(), source: e })?;
        let json: Value = serde_json::from_str(crate::data::jsonl::strip_bom(&text)).map_err(|e| HfError::Config {
            path: path.clone(),
            field: "(whole file)".into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let text = serde_json::to_string_pretty(&with_dtype(json, self.dtype)).expect("JSON serializes") + "\n";
        atomic_write(&out, text.as_bytes())
    }
}

/// Removes `model.safetensors`, the index and `model-*-of-*.safetensors` files that
/// are not among `written` (the files of this write).
fn remove_stale_weights(dir: &Path, written: &[String]) -> Result<(), HfError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| HfError::Io { path, source: e }
    };
    let entries = fs::read_dir(dir).map_err(io(dir))?;
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let weights = name == WEIGHTS_FILE || (name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors"));
        let stale = (weights && !written.contains(&name)) || (name == INDEX_FILE && written.len() == 1);
        if stale {
            fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("model-folder-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sizes_parse_as_transformers_does() {
        assert_eq!(parse_size("50GB"), Some(50_000_000_000));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("100KB"), Some(100_000));
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("5 parsecs"), None);
    }

    #[test]
    fn shards_fill_in_order_and_oversized_tensors_stand_alone() {
        assert_eq!(plan_shards(&[4, 4, 4, 20, 4], 10), vec![vec![0, 1], vec![2], vec![3], vec![4]]);
        assert_eq!(plan_shards(&[4, 4], 10), vec![vec![0, 1]]);
        assert_eq!(shard_file_names(2), ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
    }

    #[test]
    fn a_rewrite_with_other_sharding_leaves_one_set_of_weights() {
        let dir = temp_dir("stale");
        for f in ["model.safetensors", "model-00001-of-00002.safetensors", INDEX_FILE, "keep.txt"] {
            fs::write(dir.join(f), b"x").unwrap();
        }
        remove_stale_weights(&dir, &["model.safetensors".to_string()]).unwrap();
        let mut left: Vec<String> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["keep.txt", "model.safetensors"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
