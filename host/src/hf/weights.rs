//! `model.safetensors` and sharded checkpoints: every tensor read as f32 (exact
//! from bf16 and f16) and checked against the config, written in any of the
//! three dtypes with overflow refused by tensor and element.

use std::fs;
use std::path::Path;

use merge_core::dtype::{Dtype, StoreError, bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use serde_json::Value;

use super::{HfError, atomic_write, dtype_name, io_err};
use crate::model::{LlamaConfig, ModelError, check_layout};
use crate::params::{ParamSet, Tensor};

/// Reads every tensor as f32 (exact from bf16/f16), checking the layout against
/// `config`: each expected tensor present with its shape, nothing unknown, all
/// values finite. With tied embeddings an `lm_head.weight` equal to the
/// embeddings is accepted and dropped (some exporters write it anyway).
pub fn read_weights(path: &Path, config: &LlamaConfig) -> Result<ParamSet, HfError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let mut params = parse_weights(path, &bytes)?;
    drop_tied_head(path, config, &mut params)?;
    check_against_config(path, config, &params)?;
    Ok(params)
}

fn drop_tied_head(path: &Path, config: &LlamaConfig, params: &mut ParamSet) -> Result<(), HfError> {
    if !config.tie_word_embeddings {
        return Ok(());
    }
    if let Some(pos) = params.tensors.iter().position(|t| t.name == "lm_head.weight") {
        let same = params
            .get("model.embed_tokens.weight")
            .is_some_and(|e| e.shape == params.tensors[pos].shape && e.data == params.tensors[pos].data);
        if !same {
            return Err(tensor_err(
                path,
                "lm_head.weight",
                "present and different from model.embed_tokens.weight, but config.json says tie_word_embeddings = true".into(),
            ));
        }
        params.tensors.remove(pos);
    }
    Ok(())
}

fn check_against_config(path: &Path, config: &LlamaConfig, params: &ParamSet) -> Result<(), HfError> {
    check_layout(config, params).map_err(|e| match e {
        ModelError::MissingTensor { tensor, expected } => tensor_err(path, &tensor, format!("missing (the config implies shape {expected:?})")),
        ModelError::ExtraTensor { tensor, shape } => tensor_err(path, &tensor, format!("shape {shape:?}: not part of the architecture config.json describes")),
        ModelError::ShapeMismatch { tensor, expected, found } => tensor_err(path, &tensor, format!("shape {found:?}, the config implies {expected:?}")),
        other => HfError::Safetensors {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

fn tensor_err(path: &Path, tensor: &str, reason: String) -> HfError {
    HfError::Tensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    }
}

/// Decodes a safetensors buffer into f32 tensors, without any layout check.
pub fn parse_weights(path: &Path, bytes: &[u8]) -> Result<ParamSet, HfError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| HfError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut tensors = Vec::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            StDtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            StDtype::BF16 => raw.chunks_exact(2).map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
            StDtype::F16 => raw.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
            other => return Err(tensor_err(path, &name, format!("dtype {other:?} is not supported (F32, BF16, F16)"))),
        };
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(tensor_err(path, &name, format!("element {i} is {} (weights must be finite)", data[i])));
        }
        tensors.push(Tensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    Ok(ParamSet::new(tensors))
}

/// safetensors bytes of `params` stored as `dtype` (round to nearest even).
/// Values that overflow the dtype, or are not finite, are an error naming the
/// tensor and element rather than a silent Inf in the file.
pub fn encode_weights(path: &Path, params: &ParamSet, dtype: Dtype) -> Result<Vec<u8>, HfError> {
    encode_tensors(path, &params.tensors.iter().collect::<Vec<_>>(), dtype)
}

/// The same for some of a set's tensors (one shard of a model).
pub fn encode_tensors(path: &Path, tensors: &[&Tensor], dtype: Dtype) -> Result<Vec<u8>, HfError> {
    let mut encoded: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for t in tensors {
        let mut bytes = Vec::with_capacity(t.data.len() * dtype.size_bytes());
        for (i, &x) in t.data.iter().enumerate() {
            let bad = |e: StoreError| tensor_err(path, &t.name, format!("element {i} = {x} cannot be stored as {}: {e:?}", dtype_name(dtype)));
            match dtype {
                Dtype::F32 => {
                    if !x.is_finite() {
                        return Err(bad(StoreError::NonFinite));
                    }
                    bytes.extend_from_slice(&x.to_le_bytes());
                }
                Dtype::Bf16 => bytes.extend_from_slice(&f32_to_bf16(x).map_err(bad)?.to_le_bytes()),
                Dtype::F16 => bytes.extend_from_slice(&f32_to_f16(x).map_err(bad)?.to_le_bytes()),
            }
        }
        let st = match dtype {
            Dtype::F32 => StDtype::F32,
            Dtype::Bf16 => StDtype::BF16,
            Dtype::F16 => StDtype::F16,
        };
        encoded.push((t.name.clone(), st, t.shape.clone(), bytes));
    }
    let mut views = Vec::with_capacity(encoded.len());
    for (name, st, shape, bytes) in &encoded {
        let view = TensorView::new(*st, shape.clone(), bytes).map_err(|e| tensor_err(path, name, format!("shape {shape:?} does not match its data: {e}")))?;
        views.push((name.as_str(), view));
    }
    // transformers refuses safetensors files without this metadata entry
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, Some(meta)).map_err(|e| HfError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

pub fn write_weights(path: &Path, params: &ParamSet, dtype: Dtype) -> Result<(), HfError> {
    let bytes = encode_weights(path, params, dtype)?;
    atomic_write(path, &bytes)
}

pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Reads the shards an index names and checks the union against `config`.
pub fn read_sharded(index: &Path, config: &LlamaConfig) -> Result<ParamSet, HfError> {
    let err = |field: &str, reason: String| HfError::Config {
        path: index.to_path_buf(),
        field: field.to_string(),
        reason,
    };
    let text = fs::read_to_string(index).map_err(io_err(index))?;
    let v: Value =
        serde_json::from_str(crate::data::jsonl::strip_bom(&text)).map_err(|e| err("(whole file)", format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| err("weight_map", "missing or not an object".into()))?;
    let mut shards: Vec<&str> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| err(&format!("weight_map.{name}"), format!("expected a file name, found {file}")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(err(&format!("weight_map.{name}"), format!("`{file}` is not a file in the model directory")));
        }
        if !shards.contains(&file) {
            shards.push(file);
        }
    }
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut tensors: Vec<Tensor> = Vec::new();
    for shard in shards {
        let path = dir.join(shard);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        for t in parse_weights(&path, &bytes)?.tensors {
            match map.get(&t.name).and_then(Value::as_str) {
                Some(f) if f == shard => {}
                _ => return Err(tensor_err(&path, &t.name, format!("not assigned to this file by {}", index.display()))),
            }
            tensors.push(t);
        }
    }
    if let Some(name) = map.keys().find(|n| !tensors.iter().any(|t| &t.name == *n)) {
        return Err(err(&format!("weight_map.{name}"), "names a tensor that its shard does not contain".into()));
    }
    let mut params = ParamSet::new(tensors);
    drop_tied_head(index, config, &mut params)?;
    check_against_config(index, config, &params)?;
    Ok(params)
}
