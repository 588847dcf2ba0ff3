//! `config.json`: the fields of LlamaForCausalLM, Qwen2ForCausalLM and
//! MistralForCausalLM configs, read with every problem named by its field, and
//! written in the form transformers writes.

use std::fs;
use std::path::Path;

use merge_core::dtype::Dtype;
use serde_json::{Map, Value, json};

use super::{HfConfig, HfError, atomic_write, dtype_name, io_err, parse_dtype};
use crate::model::{Family, LlamaConfig, RopeScaling};

pub fn read_config(path: &Path) -> Result<HfConfig, HfError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    parse_config(path, &text)
}

/// Parses config.json text; `path` only labels errors.
pub fn parse_config(path: &Path, text: &str) -> Result<HfConfig, HfError> {
    let whole = |reason: String| HfError::Config { path: path.to_path_buf(), field: "(whole file)".into(), reason };
    let text = crate::data::jsonl::strip_bom(text);
    let v: Value = serde_json::from_str(text).map_err(|e| whole(format!("not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| whole("not a JSON object".into()))?;
    let f = Fields { path, obj };
    let family = family(&f)?;
    refuse_unsupported(&f, family)?;
    let (rope_theta, rope_scaling) = rope(&f)?;
    let dtype = match f.string("torch_dtype")?.map(|s| ("torch_dtype", s)).or(f.string("dtype")?.map(|s| ("dtype", s))) {
        None => Dtype::F32,
        Some((field, s)) => parse_dtype(s).ok_or_else(|| f.err(field, format!("`{s}` is not supported (float32, bfloat16, float16)")))?,
    };
    let hidden_size = f.req("hidden_size")?;
    let heads = f.req("num_attention_heads")?;
    let config = LlamaConfig {
        family,
        vocab_size: f.req("vocab_size")?,
        hidden_size,
        intermediate_size: f.req("intermediate_size")?,
        num_hidden_layers: f.req("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: f.uint("num_key_value_heads")?.unwrap_or(heads),
        head_dim: match f.uint("head_dim")? {
            Some(h) => h,
            None if heads > 0 && hidden_size % heads == 0 => hidden_size / heads,
            None if heads > 0 => {
                return Err(f.err(
                    "num_attention_heads",
                    format!("{heads} does not divide hidden_size = {hidden_size}, and there is no head_dim to say the head size"),
                ));
            }
            None => 0,
        },
        rms_norm_eps: f.float("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        rope_theta,
        rope_scaling,
        tie_word_embeddings: f.boolean("tie_word_embeddings", false)?,
        max_position_embeddings: f.uint("max_position_embeddings")?.unwrap_or(default_context(family)),
        attention_bias: f.boolean("attention_bias", false)?,
        bos_token_id: f.token("bos_token_id")?,
        eos_token_id: f.token("eos_token_id")?,
    };
    config.validate().map_err(|e| f.err(e.field, e.reason))?;
    Ok(HfConfig { config, dtype })
}

/// transformers' `max_position_embeddings` default for each family.
fn default_context(family: Family) -> usize {
    match family {
        Family::Llama => 2048,
        Family::Mistral | Family::Qwen2 => 32768,
    }
}

/// The fields of one config.json object, each read with an error that names it;
/// `null` counts as absent, as transformers treats it.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, reason: String) -> HfError {
        HfError::Config { path: self.path.to_path_buf(), field: field.to_string(), reason }
    }

    fn present(&self, k: &str) -> Option<&'a Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }

    fn uint(&self, k: &str) -> Result<Option<usize>, HfError> {
        match self.present(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| self.err(k, format!("expected a non-negative integer, found {v}"))),
        }
    }

    fn req(&self, k: &str) -> Result<usize, HfError> {
        self.uint(k)?.ok_or_else(|| self.err(k, "missing".into()))
    }

    fn boolean(&self, k: &str, default: bool) -> Result<bool, HfError> {
        match self.present(k) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(k, format!("expected true or false, found {v}"))),
        }
    }

    fn float(&self, k: &str) -> Result<Option<f64>, HfError> {
        match self.present(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(k, format!("expected a number, found {v}"))),
        }
    }

    fn string(&self, k: &str) -> Result<Option<&'a str>, HfError> {
        match self.present(k) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(k, format!("expected a string, found {v}"))),
        }
    }

    /// A token id; Llama 3 writes a list of end-of-sequence ids, whose first is
    /// the one generation emits.
    fn token(&self, k: &str) -> Result<Option<u32>, HfError> {
        let v = match self.present(k) {
            None => return Ok(None),
            Some(Value::Array(a)) => match a.first() {
                None => return Ok(None),
                Some(x) => x,
            },
            Some(v) => v,
        };
        v.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| Some(n as u32)).ok_or_else(|| self.err(k, format!("expected a token id, found {v}")))
    }
}

/// The family `model_type` names, checked against `architectures` (either may
/// be absent, not both).
fn family(f: &Fields<'_>) -> Result<Family, HfError> {
    let arch = match f.present("architectures") {
        None => None,
        Some(Value::Array(a)) if !a.is_empty() => Some(a[0].as_str().ok_or_else(|| f.err("architectures", format!("expected strings, found {}", a[0])))?),
        Some(v) => return Err(f.err("architectures", format!("expected a non-empty list, found {v}"))),
    };
    let family = match f.string("model_type")? {
        Some("llama") => Some(Family::Llama),
        Some("qwen2") => Some(Family::Qwen2),
        Some("mistral") => Some(Family::Mistral),
        Some(other) => return Err(f.err("model_type", format!("`{other}` is not supported (llama, qwen2, mistral)"))),
        None => None,
    };
    let arch_family = match arch {
        Some("LlamaForCausalLM") => Some(Family::Llama),
        Some("Qwen2ForCausalLM") => Some(Family::Qwen2),
        Some("MistralForCausalLM") => Some(Family::Mistral),
        // Another architecture under a supported model_type would load as that
        // type and be rewritten as it.
        Some(other) => {
            return Err(f.err("architectures", format!("`{other}` is not supported (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)")));
        }
        None => None,
    };
    match (family, arch_family) {
        (Some(t), Some(a)) if t != a => Err(f.err(
            "architectures",
            format!("`{}` does not match model_type `{}` (expected {})", a.architecture(), t.model_type(), t.architecture()),
        )),
        (Some(f), _) | (None, Some(f)) => Ok(f),
        (None, None) => Err(f.err("model_type", "missing (and no `architectures` to infer it from)".into())),
    }
}

/// Refuses the options this model does not implement, rather than computing
/// another function than transformers would.
fn refuse_unsupported(f: &Fields<'_>, family: Family) -> Result<(), HfError> {
    if let Some(act) = f.string("hidden_act")?
        && act != "silu"
    {
        return Err(f.err("hidden_act", format!("`{act}` is not supported (the MLP is SwiGLU with silu)")));
    }
    if f.boolean("mlp_bias", false)? {
        return Err(f.err("mlp_bias", "MLP biases are not supported".into()));
    }
    if f.boolean("use_sliding_window", false)? {
        return Err(f.err("use_sliding_window", "sliding-window attention is not supported".into()));
    }
    // Mistral's window binds only when a sequence can be longer than it.
    if family == Family::Mistral
        && let Some(window) = f.uint("sliding_window")?
        && let max = f.uint("max_position_embeddings")?.unwrap_or(default_context(family))
        && window < max
    {
        return Err(f.err(
            "sliding_window",
            format!("{window} is below max_position_embeddings = {max}: sliding-window attention is not supported (null, or at least the context, is)"),
        ));
    }
    Ok(())
}

/// The rotary base and scaling: transformers ≥ 4.56 keeps both in
/// `rope_parameters`; older configs have `rope_theta` and an optional
/// `rope_scaling`.
fn rope(f: &Fields<'_>) -> Result<(f64, RopeScaling), HfError> {
    let scaling = match (f.present("rope_parameters"), f.present("rope_scaling")) {
        (Some(Value::Object(rp)), _) => rope_scaling(f, rp, "rope_parameters")?,
        (_, Some(Value::Object(rs))) => rope_scaling(f, rs, "rope_scaling")?,
        (_, Some(v)) => return Err(f.err("rope_scaling", format!("expected an object, found {v}"))),
        (_, None) => RopeScaling::None,
    };
    let theta = match f.present("rope_parameters") {
        Some(Value::Object(rp)) => match rp.get("rope_theta") {
            Some(t) => Some(t.as_f64().ok_or_else(|| f.err("rope_parameters.rope_theta", format!("expected a number, found {t}")))?),
            None => f.float("rope_theta")?,
        },
        Some(v) => return Err(f.err("rope_parameters", format!("expected an object, found {v}"))),
        None => f.float("rope_theta")?,
    };
    Ok((theta.unwrap_or(10000.0), scaling))
}

/// The scaling a `rope_parameters` / `rope_scaling` object names; a type this
/// model does not implement is refused naming the field.
fn rope_scaling(f: &Fields<'_>, obj: &Map<String, Value>, field: &str) -> Result<RopeScaling, HfError> {
    let kind = obj.get("rope_type").or_else(|| obj.get("type"));
    let number = |k: &str| -> Result<f64, HfError> {
        obj.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| f.err(&format!("{field}.{k}"), format!("expected a number, found {}", obj.get(k).map_or("nothing".into(), Value::to_string))))
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
        Some(other) => Err(f.err(
            &format!("{field}.rope_type"),
            format!("`{other}` is not supported (default, linear and llama3 are; dynamic, yarn and longrope are not)"),
        )),
    }
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
