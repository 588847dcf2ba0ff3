//! Hugging Face model directories: `config.json` (LlamaForCausalLM or
//! Qwen2ForCausalLM fields) and `model.safetensors` (f32, bf16 or f16 on disk),
//! read with every problem named (file, field, tensor) and written atomically.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use merge_core::dtype::{Dtype, StoreError, bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use serde_json::{Map, Value, json};

use crate::model::{Family, LlamaConfig, LlamaModel, ModelError, RopeScaling, check_layout};
use crate::params::{LayoutDifference, ParamSet, Tensor};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

#[derive(Debug)]
pub enum HfError {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// config.json is not JSON, or a field is missing, of the wrong type or unsupported.
    Config {
        path: PathBuf,
        field: String,
        reason: String,
    },
    /// The safetensors container itself is malformed or truncated.
    Safetensors {
        path: PathBuf,
        reason: String,
    },
    /// A tensor is missing, extra, misshaped, of an unsupported dtype, non-finite,
    /// or not representable in the dtype it is written as.
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// Two models that must share a layout (base, SFT, policy) do not.
    LayoutMismatch { a: String, b: String, difference: LayoutDifference },
}

impl fmt::Display for HfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HfError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            HfError::Config { path, field, reason } => write!(f, "{}: field `{field}`: {reason}", path.display()),
            HfError::Safetensors { path, reason } => write!(f, "{}: not a valid safetensors file: {reason}", path.display()),
            HfError::Tensor { path, tensor, reason } => write!(f, "{}: tensor `{tensor}`: {reason}", path.display()),
            HfError::LayoutMismatch { a, b, difference } => f.write_str(&difference.describe(a, b)),
        }
    }
}

impl std::error::Error for HfError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HfError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HfError + '_ {
    move |source| HfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The config plus the dtype the checkpoint declares (`torch_dtype`, or `dtype`
/// as newer transformers write it; f32 when absent).
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub config: LlamaConfig,
    pub dtype: Dtype,
}

pub fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "float32",
        Dtype::Bf16 => "bfloat16",
        Dtype::F16 => "float16",
    }
}

/// `float32`/`bfloat16`/`float16` (also `f32`/`bf16`/`f16`).
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    match s {
        "float32" | "f32" => Some(Dtype::F32),
        "bfloat16" | "bf16" => Some(Dtype::Bf16),
        "float16" | "f16" => Some(Dtype::F16),
        _ => None,
    }
}

// ------------------------------------------------------------ config.json

pub fn read_config(path: &Path) -> Result<HfConfig, HfError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    parse_config(path, &text)
}

/// The scaling a `rope_parameters` / `rope_scaling` object names; a type this
/// model does not implement is refused naming the field.
fn rope_scaling(obj: &Map<String, Value>, field: &str, err: &dyn Fn(&str, String) -> HfError) -> Result<RopeScaling, HfError> {
    let kind = obj.get("rope_type").or_else(|| obj.get("type"));
    let number = |k: &str| -> Result<f64, HfError> {
        obj.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| err(&format!("{field}.{k}"), format!("expected a number, found {}", obj.get(k).map_or("nothing".into(), Value::to_string))))
    };
    match kind.and_then(Value::as_str) {
        None | Some("default") => Ok(RopeScaling::None),
        Some("linear") => Ok(RopeScaling::Linear { factor: number("factor")? }),
        Some("llama3") => Ok(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        }),
        Some(other) => Err(err(
            &format!("{field}.rope_type"),
            format!("`{other}` is not supported (default, linear and llama3 are; dynamic, yarn and longrope are not)"),
        )),
    }
}

/// Parses config.json text; `path` only labels errors.
pub fn parse_config(path: &Path, text: &str) -> Result<HfConfig, HfError> {
    let err = |field: &str, reason: String| HfError::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason,
    };
    let text = crate::data::jsonl::strip_bom(text);
    let v: Value = serde_json::from_str(text).map_err(|e| err("(whole file)", format!("not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| err("(whole file)", "not a JSON object".into()))?;
    let present = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let uint = |k: &str| -> Result<Option<usize>, HfError> {
        match present(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| err(k, format!("expected a non-negative integer, found {v}"))),
        }
    };
    let req = |k: &str| -> Result<usize, HfError> { uint(k)?.ok_or_else(|| err(k, "missing".into())) };
    let boolean = |k: &str, default: bool| -> Result<bool, HfError> {
        match present(k) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| err(k, format!("expected true or false, found {v}"))),
        }
    };
    let float = |k: &str| -> Result<Option<f64>, HfError> {
        match present(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| err(k, format!("expected a number, found {v}"))),
        }
    };
    let string = |k: &str| -> Result<Option<&str>, HfError> {
        match present(k) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| err(k, format!("expected a string, found {v}"))),
        }
    };

    let arch = match present("architectures") {
        None => None,
        Some(Value::Array(a)) if !a.is_empty() => Some(a[0].as_str().ok_or_else(|| err("architectures", format!("expected strings, found {}", a[0])))?),
        Some(v) => return Err(err("architectures", format!("expected a non-empty list, found {v}"))),
    };
    let family = match string("model_type")? {
        Some("llama") => Some(Family::Llama),
        Some("qwen2") => Some(Family::Qwen2),
        Some("mistral") => Some(Family::Mistral),
        Some(other) => return Err(err("model_type", format!("`{other}` is not supported (llama, qwen2, mistral)"))),
        None => None,
    };
    let arch_family = match arch {
        Some("LlamaForCausalLM") => Some(Family::Llama),
        Some("Qwen2ForCausalLM") => Some(Family::Qwen2),
        Some("MistralForCausalLM") => Some(Family::Mistral),
        // Another architecture under a supported model_type would load as that
        // type and be rewritten as it.
        Some(other) => {
            return Err(err("architectures", format!("`{other}` is not supported (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)")));
        }
        None => None,
    };
    let family = match (family, arch_family) {
        (Some(t), Some(a)) if t != a => {
            return Err(err(
                "architectures",
                format!("`{}` does not match model_type `{}` (expected {})", a.architecture(), t.model_type(), t.architecture()),
            ));
        }
        (Some(f), _) | (None, Some(f)) => f,
        (None, None) => return Err(err("model_type", "missing (and no `architectures` to infer it from)".into())),
    };
    if let Some(act) = string("hidden_act")?
        && act != "silu"
    {
        return Err(err("hidden_act", format!("`{act}` is not supported (the MLP is SwiGLU with silu)")));
    }
    if boolean("mlp_bias", false)? {
        return Err(err("mlp_bias", "MLP biases are not supported".into()));
    }
    if boolean("use_sliding_window", false)? {
        return Err(err("use_sliding_window", "sliding-window attention is not supported".into()));
    }
    // Mistral's window binds only when a sequence can be longer than it.
    if family == Family::Mistral
        && let Some(window) = uint("sliding_window")?
        && let max = uint("max_position_embeddings")?.unwrap_or(32768)
        && window < max
    {
        return Err(err(
            "sliding_window",
            format!("{window} is below max_position_embeddings = {max}: sliding-window attention is not supported (null, or at least the context, is)"),
        ));
    }
    // transformers ≥ 4.56 moved the base and the scaling into `rope_parameters`;
    // older configs have `rope_theta` and an optional `rope_scaling`
    let rope_scaling = match (present("rope_parameters"), present("rope_scaling")) {
        (Some(Value::Object(rp)), _) => rope_scaling(rp, "rope_parameters", &err)?,
        (_, Some(Value::Object(rs))) => rope_scaling(rs, "rope_scaling", &err)?,
        (_, Some(v)) => return Err(err("rope_scaling", format!("expected an object, found {v}"))),
        (_, None) => RopeScaling::None,
    };
    let rope_theta = match present("rope_parameters") {
        Some(Value::Object(rp)) => {
            match rp.get("rope_theta") {
                Some(t) => Some(
                    t.as_f64()
                        .ok_or_else(|| err("rope_parameters.rope_theta", format!("expected a number, found {t}")))?,
                ),
                None => float("rope_theta")?,
            }
        }
        Some(v) => return Err(err("rope_parameters", format!("expected an object, found {v}"))),
        None => float("rope_theta")?,
    };
    let token = |k: &str| -> Result<Option<u32>, HfError> {
        // Llama 3 writes a list of end-of-sequence ids; the first is the one we emit.
        let v = match present(k) {
            None => return Ok(None),
            Some(Value::Array(a)) => match a.first() {
                None => return Ok(None),
                Some(x) => x,
            },
            Some(v) => v,
        };
        v.as_u64()
            .filter(|&n| n <= u32::MAX as u64)
            .map(|n| Some(n as u32))
            .ok_or_else(|| err(k, format!("expected a token id, found {v}")))
    };
    let dtype = match string("torch_dtype")?.map(|s| ("torch_dtype", s)).or(string("dtype")?.map(|s| ("dtype", s))) {
        None => Dtype::F32,
        Some((field, s)) => parse_dtype(s).ok_or_else(|| err(field, format!("`{s}` is not supported (float32, bfloat16, float16)")))?,
    };

    let hidden_size = req("hidden_size")?;
    let heads = req("num_attention_heads")?;
    let config = LlamaConfig {
        family,
        vocab_size: req("vocab_size")?,
        hidden_size,
        intermediate_size: req("intermediate_size")?,
        num_hidden_layers: req("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: uint("num_key_value_heads")?.unwrap_or(heads),
        head_dim: match uint("head_dim")? {
            Some(h) => h,
            None if heads > 0 && hidden_size % heads == 0 => hidden_size / heads,
            None if heads > 0 => {
                return Err(err(
                    "num_attention_heads",
                    format!("{heads} does not divide hidden_size = {hidden_size}, and there is no head_dim to say the head size"),
                ));
            }
            None => 0,
        },
        rms_norm_eps: float("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        rope_theta: rope_theta.unwrap_or(10000.0),
        rope_scaling,
        tie_word_embeddings: boolean("tie_word_embeddings", false)?,
        max_position_embeddings: uint("max_position_embeddings")?.unwrap_or(match family {
            Family::Llama => 2048,
            Family::Mistral => 32768,
            Family::Qwen2 => 32768,
        }),
        attention_bias: boolean("attention_bias", false)?,
        bos_token_id: token("bos_token_id")?,
        eos_token_id: token("eos_token_id")?,
    };
    config.validate().map_err(|e| err(e.field, e.reason))?;
    Ok(HfConfig { config, dtype })
}

/// config.json text for `config`, in the form transformers writes for the family.
pub fn config_json(config: &LlamaConfig, dtype: Dtype) -> String {
    // the f32 epsilon printed at its shortest, so 1e-5 stays 1e-5 in the file
    let eps: f64 = config.rms_norm_eps.to_string().parse().expect("a printed f32 parses as f64");
    let mut m = Map::new();
    m.insert("architectures".into(), json!([config.family.architecture()]));
    m.insert("model_type".into(), json!(config.family.model_type()));
    m.insert("vocab_size".into(), json!(config.vocab_size));
    m.insert("hidden_size".into(), json!(config.hidden_size));
    m.insert("intermediate_size".into(), json!(config.intermediate_size));
    m.insert("num_hidden_layers".into(), json!(config.num_hidden_layers));
    m.insert("num_attention_heads".into(), json!(config.num_attention_heads));
    m.insert("num_key_value_heads".into(), json!(config.num_key_value_heads));
    m.insert("head_dim".into(), json!(config.head_dim));
    m.insert("hidden_act".into(), json!("silu"));
    m.insert("rms_norm_eps".into(), json!(eps));
    m.insert("rope_theta".into(), json!(config.rope_theta));
    match config.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            m.insert("rope_scaling".into(), json!({ "rope_type": "linear", "factor": factor }));
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            m.insert(
                "rope_scaling".into(),
                json!({ "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                        "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings }),
            );
        }
    }
    m.insert("max_position_embeddings".into(), json!(config.max_position_embeddings));
    m.insert("tie_word_embeddings".into(), json!(config.tie_word_embeddings));
    match config.family {
        Family::Llama => {
            m.insert("attention_bias".into(), json!(config.attention_bias));
            m.insert("mlp_bias".into(), json!(false));
        }
        Family::Mistral => {
            m.insert("sliding_window".into(), Value::Null);
        }
        Family::Qwen2 => {}
    }
    m.insert("bos_token_id".into(), json!(config.bos_token_id));
    m.insert("eos_token_id".into(), json!(config.eos_token_id));
    m.insert("torch_dtype".into(), json!(dtype_name(dtype)));
    let mut s = serde_json::to_string_pretty(&Value::Object(m)).expect("a JSON map serializes");
    s.push('\n');
    s
}

pub fn write_config(path: &Path, config: &LlamaConfig, dtype: Dtype) -> Result<(), HfError> {
    atomic_write(path, config_json(config, dtype).as_bytes())
}

// ------------------------------------------------------------ model.safetensors

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

/// Writes `bytes` to a temporary file in the same directory, syncs it, renames it
/// over `path` and syncs the directory: a crash leaves the old file or the new
/// one, never a torn one.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), HfError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| HfError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let tmp = dir.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        // the rename itself is durable only once the directory entry is synced
        fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err(&dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

// ------------------------------------------------------------ whole directories

/// Loads `config.json` and the weights: `model.safetensors`, or, for checkpoints
/// that transformers saved in shards, every file named in
/// `model.safetensors.index.json`'s `weight_map`.
pub fn load_model(dir: &Path) -> Result<(LlamaModel, Dtype), HfError> {
    let cfg_path = dir.join(CONFIG_FILE);
    let HfConfig { config, dtype } = read_config(&cfg_path)?;
    let w_path = dir.join(WEIGHTS_FILE);
    let index = dir.join(INDEX_FILE);
    let params = if !w_path.exists() && index.exists() {
        read_sharded(&index, &config)?
    } else {
        read_weights(&w_path, &config)?
    };
    let model = LlamaModel::from_params(config, params).map_err(|e| HfError::Safetensors {
        path: w_path,
        reason: e.to_string(),
    })?;
    Ok((model, dtype))
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

/// Writes config.json and model.safetensors (each atomically; the weights first,
/// so a config never describes weights that are not there yet).
pub fn save_model(dir: &Path, model: &LlamaModel, dtype: Dtype) -> Result<(), HfError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    write_weights(&dir.join(WEIGHTS_FILE), &model.params, dtype)?;
    write_config(&dir.join(CONFIG_FILE), &model.config, dtype)
}

/// Base, SFT and policy must have the same tensor names and shapes for a merge to
/// mean anything; the error names the first tensor that differs and both shapes.
pub fn check_same_layout(a_label: &str, a: &ParamSet, b_label: &str, b: &ParamSet) -> Result<(), HfError> {
    match a.layout_difference(b) {
        None => Ok(()),
        Some(difference) => Err(HfError::LayoutMismatch { a: a_label.to_string(), b: b_label.to_string(), difference }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hf-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn small(tied: bool, family: Family) -> LlamaConfig {
        let mut c = LlamaConfig::tiny(13, 8, 12, 2, 4, 2);
        c.tie_word_embeddings = tied;
        c.family = family;
        c.rms_norm_eps = 1e-5;
        c.rope_theta = 500000.0;
        c.bos_token_id = Some(1);
        c.eos_token_id = Some(2);
        c
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let dir = temp_dir("f32");
        for (tied, fam) in [(false, Family::Llama), (true, Family::Qwen2)] {
            let model = LlamaModel::init(small(tied, fam), 7).unwrap();
            save_model(&dir, &model, Dtype::F32).unwrap();
            let (back, dtype) = load_model(&dir).unwrap();
            assert_eq!(dtype, Dtype::F32);
            assert_eq!(back.config, model.config);
            assert_eq!(back.params, model.params);
            // tied: the file has no lm_head.weight
            let raw = parse_weights(&dir.join(WEIGHTS_FILE), &fs::read(dir.join(WEIGHTS_FILE)).unwrap()).unwrap();
            assert_eq!(raw.get("lm_head.weight").is_some(), !tied);
            assert_eq!(raw.get("model.layers.0.self_attn.q_proj.bias").is_some(), fam == Family::Qwen2);
        }
        // no temporary files left behind
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn half_precision_round_trips() {
        let dir = temp_dir("half");
        let model = LlamaModel::init(small(false, Family::Llama), 8).unwrap();
        for (dtype, to, from) in [
            (Dtype::Bf16, f32_to_bf16 as fn(f32) -> Result<u16, StoreError>, bf16_to_f32 as fn(u16) -> f32),
            (Dtype::F16, f32_to_f16, f16_to_f32),
        ] {
            save_model(&dir, &model, dtype).unwrap();
            let (back, d) = load_model(&dir).unwrap();
            assert_eq!(d, dtype);
            for (a, b) in model.params.tensors.iter().zip(&back.params.tensors) {
                for (&x, &y) in a.data.iter().zip(&b.data) {
                    assert_eq!(y.to_bits(), from(to(x).unwrap()).to_bits(), "{} {x}", a.name);
                }
            }
            // a second trip through the same dtype changes nothing
            let first = fs::read(dir.join(WEIGHTS_FILE)).unwrap();
            save_model(&dir, &back, dtype).unwrap();
            assert_eq!(first, fs::read(dir.join(WEIGHTS_FILE)).unwrap());
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_and_garbage_files_are_named() {
        let dir = temp_dir("trunc");
        let model = LlamaModel::init(small(false, Family::Llama), 9).unwrap();
        save_model(&dir, &model, Dtype::F32).unwrap();
        let path = dir.join(WEIGHTS_FILE);
        let bytes = fs::read(&path).unwrap();
        for cut in [bytes.len() - 3, 100, 5] {
            fs::write(&path, &bytes[..cut]).unwrap();
            let e = load_model(&dir).err().unwrap();
            assert!(matches!(e, HfError::Safetensors { .. }), "cut {cut}: {e}");
            assert!(e.to_string().contains("model.safetensors"), "{e}");
        }
        let e = load_model(&temp_dir("empty")).err().unwrap();
        assert!(e.to_string().contains("config.json"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    fn write_raw(path: &Path, tensors: &[(&str, StDtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<_> = tensors.iter().map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap())).collect();
        fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    }

    #[test]
    fn layout_errors_name_the_tensor() {
        let dir = temp_dir("layout");
        let cfg = small(true, Family::Llama);
        let model = LlamaModel::init(cfg.clone(), 1).unwrap();
        let path = dir.join(WEIGHTS_FILE);

        let mut p = model.params.clone();
        p.tensors.retain(|t| t.name != "model.layers.1.mlp.up_proj.weight");
        write_weights(&path, &p, Dtype::F32).unwrap();
        let e = read_weights(&path, &cfg).err().unwrap().to_string();
        assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"), "{e}");

        let mut p = model.params.clone();
        p.tensors.push(Tensor {
            name: "model.layers.0.mlp.extra".into(),
            shape: vec![2],
            data: vec![0.0; 2],
        });
        write_weights(&path, &ParamSet::new(p.tensors), Dtype::F32).unwrap();
        let e = read_weights(&path, &cfg).err().unwrap().to_string();
        assert!(e.contains("model.layers.0.mlp.extra"), "{e}");

        let mut p = model.params.clone();
        let t = p.get_mut("model.norm.weight").unwrap();
        t.shape = vec![4, 2];
        write_weights(&path, &p, Dtype::F32).unwrap();
        let e = read_weights(&path, &cfg).err().unwrap().to_string();
        assert!(e.contains("model.norm.weight") && e.contains("[4, 2]") && e.contains("[8]"), "{e}");

        write_raw(&path, &[("model.norm.weight", StDtype::I64, vec![8], vec![0u8; 64])]);
        let e = read_weights(&path, &cfg).err().unwrap().to_string();
        assert!(e.contains("model.norm.weight") && e.contains("I64"), "{e}");

        write_raw(&path, &[("model.norm.weight", StDtype::F32, vec![1], f32::NAN.to_le_bytes().to_vec())]);
        let e = read_weights(&path, &cfg).err().unwrap().to_string();
        assert!(e.contains("model.norm.weight") && e.contains("element 0"), "{e}");

        // tied, but an lm_head that differs from the embeddings
        let mut p = model.params.clone();
        let mut head = p.get("model.embed_tokens.weight").unwrap().clone();
        head.name = "lm_head.weight".into();
        head.data[0] += 1.0;
        p.tensors.push(head);
        write_weights(&path, &ParamSet::new(p.tensors.clone()), Dtype::F32).unwrap();
        let e = read_weights(&path, &cfg).err().unwrap().to_string();
        assert!(e.contains("lm_head.weight") && e.contains("tie_word_embeddings"), "{e}");
        // ... and one equal to them is accepted
        let mut p2 = model.params.clone();
        let mut head = p2.get("model.embed_tokens.weight").unwrap().clone();
        head.name = "lm_head.weight".into();
        p2.tensors.push(head);
        write_weights(&path, &ParamSet::new(p2.tensors), Dtype::F32).unwrap();
        assert_eq!(read_weights(&path, &cfg).unwrap(), model.params);

        // a value bf16 cannot hold
        let mut p = model.params.clone();
        p.get_mut("model.norm.weight").unwrap().data[3] = 3.4e38;
        let e = write_weights(&path, &p, Dtype::Bf16).err().unwrap().to_string();
        assert!(e.contains("model.norm.weight") && e.contains("element 3"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_forms_and_errors() {
        let p = Path::new("m/config.json");
        let base = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":32,"hidden_size":16,
            "intermediate_size":40,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-05,"max_position_embeddings":128,"tie_word_embeddings":true,"torch_dtype":"bfloat16",
            "rope_parameters":{"rope_theta":500000.0,"rope_type":"default"},"eos_token_id":[7,8],"bos_token_id":null}"#;
        let c = parse_config(p, base).unwrap();
        assert_eq!(c.dtype, Dtype::Bf16);
        assert_eq!(c.config.rope_theta, 500000.0);
        assert_eq!(c.config.head_dim, 4);
        assert_eq!(c.config.eos_token_id, Some(7));
        assert_eq!(c.config.bos_token_id, None);
        assert!(c.config.tie_word_embeddings);
        assert_eq!(c.config.rms_norm_eps, 1e-5);
        // written form reads back identically
        let again = parse_config(p, &config_json(&c.config, c.dtype)).unwrap();
        assert_eq!(again, c);

        let top = base
            .replace(
                r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}"#,
                r#""rope_theta":1000.0,"dtype":"float16""#,
            )
            .replace(r#""torch_dtype":"bfloat16","#, "");
        let c = parse_config(p, &top).unwrap();
        assert_eq!((c.config.rope_theta, c.dtype), (1000.0, Dtype::F16));

        // Llama 3.1/3.2's scaling, in the new and the old form, and linear; each written form reads back.
        let llama3 = r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#;
        let c = parse_config(p, &base.replace(r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}"#, llama3)).unwrap();
        let want = RopeScaling::Llama3 { factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192.0 };
        assert_eq!((c.config.rope_scaling, c.config.rope_theta), (want, 500000.0));
        assert_eq!(parse_config(p, &config_json(&c.config, c.dtype)).unwrap(), c);
        let linear = r#""rope_theta":1000.0,"rope_scaling":{"type":"linear","factor":2.0}"#;
        let c = parse_config(p, &base.replace(r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}"#, linear)).unwrap();
        assert_eq!(c.config.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(parse_config(p, &config_json(&c.config, c.dtype)).unwrap(), c);
        for (scaling, field) in [
            (r#""rope_scaling":{"rope_type":"dynamic","factor":2.0}"#, "rope_scaling.rope_type"),
            (r#""rope_scaling":{"rope_type":"linear"}"#, "rope_scaling.factor"),
            (r#""rope_scaling":{"rope_type":"linear","factor":-1}"#, "rope_scaling.factor"),
            (r#""rope_scaling":{"rope_type":"llama3","factor":8,"low_freq_factor":4,"high_freq_factor":1,"original_max_position_embeddings":64}"#, "rope_scaling.high_freq_factor"),
        ] {
            let text = base.replace(r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}"#, scaling);
            let e = parse_config(p, &text).unwrap_err().to_string();
            assert!(e.contains(field), "{scaling}: {e}");
        }

        // Mistral loads when its window cannot bind, and is refused naming the field when it can.
        let mistral = r#"{"architectures":["MistralForCausalLM"],"model_type":"mistral","vocab_size":32,"hidden_size":16,"intermediate_size":40,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":64,"sliding_window":null}"#;
        let c = parse_config(p, mistral).unwrap();
        assert_eq!(c.config.family, Family::Mistral);
        assert!(!c.config.qkv_bias() && !c.config.o_bias());
        assert_eq!(parse_config(p, &config_json(&c.config, c.dtype)).unwrap(), c);
        assert!(parse_config(p, &mistral.replace(r#""sliding_window":null"#, r#""sliding_window":64"#)).is_ok());
        let e = parse_config(p, &mistral.replace(r#""sliding_window":null"#, r#""sliding_window":32"#)).unwrap_err().to_string();
        assert!(e.contains("sliding_window") && e.contains("32 is below max_position_embeddings = 64"), "{e}");

        let qwen = r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":32,"hidden_size":16,"intermediate_size":40,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"use_sliding_window":false}"#;
        let c = parse_config(p, qwen).unwrap();
        assert_eq!(c.config.family, Family::Qwen2);
        assert!(c.config.qkv_bias() && !c.config.o_bias());
        assert_eq!(c.config.head_dim, 8);

        for (from, to, field) in [
            (r#""hidden_size":16"#, r#""hidden_size":"big""#, "hidden_size"),
            (r#""vocab_size":32,"#, "", "vocab_size"),
            (r#""rope_type":"default""#, r#""rope_type":"yarn""#, "rope_parameters.rope_type"),
            (r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#, "num_key_value_heads"),
            (r#""model_type":"llama""#, r#""model_type":"gpt2""#, "model_type"),
            (r#""torch_dtype":"bfloat16""#, r#""torch_dtype":"int8""#, "torch_dtype"),
            (r#""rms_norm_eps":1e-05"#, r#""rms_norm_eps":-1"#, "rms_norm_eps"),
            (r#""LlamaForCausalLM""#, r#""MistralForCausalLM""#, "architectures"),
            (r#""LlamaForCausalLM""#, r#""Qwen2ForCausalLM""#, "architectures"),
            (r#""num_attention_heads":4"#, r#""num_attention_heads":3"#, "num_attention_heads"),
        ] {
            let text = base.replace(from, to);
            assert_ne!(text, base, "{from}");
            let e = parse_config(p, &text).err().unwrap().to_string();
            assert!(e.contains(&format!("`{field}`")) && e.contains("m/config.json"), "{field}: {e}");
        }
        let e = parse_config(p, "{ not json").err().unwrap().to_string();
        assert!(e.contains("m/config.json") && e.contains("JSON"), "{e}");
        assert_eq!(parse_config(p, &format!("\u{feff}{base}")).unwrap(), parse_config(p, base).unwrap());
    }

    #[test]
    fn same_layout_check_names_both_shapes() {
        let a = LlamaModel::init(small(false, Family::Llama), 1).unwrap().params;
        let mut b = a.clone();
        assert!(check_same_layout("base", &a, "sft", &b).is_ok());
        b.get_mut("model.norm.weight").unwrap().shape = vec![2, 4];
        let e = check_same_layout("base", &a, "sft", &b).err().unwrap().to_string();
        assert!(
            e.contains("tensor `model.norm.weight` has shape [8] in base but [2, 4] in sft"),
            "{e}"
        );
        let tied = LlamaModel::init(small(true, Family::Llama), 1).unwrap().params;
        let e = check_same_layout("policy", &tied, "sft", &a).err().unwrap().to_string();
        assert!(e.contains("tensor `lm_head.weight` (shape [13, 8]) is in sft but not in policy"), "{e}");
    }

    #[test]
    fn saved_model_computes_the_same_function() {
        use crate::model::Sequence;
        let dir = temp_dir("function");
        let model = LlamaModel::init(small(false, Family::Qwen2), 4).unwrap();
        let seqs = [Sequence::full(vec![1, 4, 9, 12, 3]), Sequence::completion(&[2, 2], &[7, 0, 5])];
        let want = model.sequence_logps(&seqs).unwrap();
        save_model(&dir, &model, Dtype::F32).unwrap();
        assert_eq!(load_model(&dir).unwrap().0.sequence_logps(&seqs).unwrap(), want);
        save_model(&dir, &model, Dtype::Bf16).unwrap();
        let got = load_model(&dir).unwrap().0.sequence_logps(&seqs).unwrap();
        for (g, w) in got.iter().zip(&want) {
            // bf16 keeps 8 bits of mantissa: the function moves, but only a little
            assert!(g != w && (g - w).abs() < 0.05 * w.abs(), "{g} vs {w}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sharded_checkpoints_load() {
        let dir = temp_dir("shards");
        let model = LlamaModel::init(small(true, Family::Llama), 12).unwrap();
        save_model(&dir, &model, Dtype::Bf16).unwrap();
        let (want, _) = load_model(&dir).unwrap();
        fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
        let (a, b): (Vec<Tensor>, Vec<Tensor>) = want.params.tensors.iter().cloned().partition(|t| t.name.contains("layers.1."));
        let mut map = Map::new();
        for (file, part) in [("model-00001-of-00002.safetensors", &a), ("model-00002-of-00002.safetensors", &b)] {
            write_weights(&dir.join(file), &ParamSet::new(part.clone()), Dtype::Bf16).unwrap();
            for t in part {
                map.insert(t.name.clone(), json!(file));
            }
        }
        let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
        fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        assert_eq!(load_model(&dir).unwrap().0.params, want.params);

        // an index entry whose shard lacks the tensor
        let mut bad = map.clone();
        bad.insert("model.norm.weight".into(), json!("model-00001-of-00002.safetensors"));
        fs::write(dir.join(INDEX_FILE), json!({"weight_map": bad}).to_string()).unwrap();
        let e = load_model(&dir).err().unwrap().to_string();
        assert!(e.contains("model.norm.weight") && e.contains("model-0000"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
