//! The architecture hyperparameters of a Llama-family decoder, named as in
//! Hugging Face `config.json` (LlamaForCausalLM, Qwen2ForCausalLM).

use std::fmt;

/// Which Hugging Face family the checkpoint belongs to. It decides where the
/// attention biases are: Llama's `attention_bias` puts a bias on q, k, v *and* o;
/// Qwen2 always has q, k, v biases and never an o bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    /// Mistral without a binding sliding window: the Llama computation without
    /// attention biases, under Mistral's names.
    Mistral,
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Mistral => "mistral",
        }
    }

    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Mistral => "MistralForCausalLM",
        }
    }
}

/// More layers than any published model by far; the bound keeps the list of
/// expected tensors (built before any weight is compared) small.
pub const MAX_LAYERS: usize = 1 << 16;

/// Elements of one tensor: below 2^32, the GPU runtime's limit.
pub const MAX_TENSOR_ELEMENTS: usize = (1 << 32) - 1;

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    /// How the rotary frequencies are scaled for long contexts (transformers'
    /// `rope_type`).
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Llama only (Qwen2 ignores it: its q/k/v biases are unconditional).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// The rotary-frequency scalings transformers names `default`, `linear` and
/// `llama3` (`modeling_rope_utils`): each maps the unscaled inverse frequency
/// `θ^(−2i/d)` of pair `i` to the one the model rotates by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (every inverse frequency divided by it).
    Linear { factor: f64 },
    /// Llama 3.1: wavelengths above `original_max_position_embeddings /
    /// low_freq_factor` divided by `factor`, below `… / high_freq_factor` kept,
    /// and smoothly interpolated between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

impl RopeScaling {
    /// transformers' `rope_type` name.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::None => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }

    /// The scaled inverse frequency of an unscaled one.
    pub fn inv_freq(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::None => inv_freq,
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                if wavelen < old / high_freq_factor {
                    inv_freq
                } else if wavelen > old / low_freq_factor {
                    inv_freq / factor
                } else {
                    let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, reason: String| Err(ConfigError { field, reason });
        let positive = |x: f64| x.is_finite() && x > 0.0;
        match *self {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } if !positive(factor) => bad("rope_scaling.factor", format!("{factor} is not a positive finite number")),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                for (field, v) in [
                    ("rope_scaling.factor", factor),
                    ("rope_scaling.low_freq_factor", low_freq_factor),
                    ("rope_scaling.high_freq_factor", high_freq_factor),
                    ("rope_scaling.original_max_position_embeddings", original_max_position_embeddings),
                ] {
                    if !positive(v) {
                        return bad(field, format!("{v} is not a positive finite number"));
                    }
                }
                if low_freq_factor >= high_freq_factor {
                    return bad(
                        "rope_scaling.high_freq_factor",
                        format!("{high_freq_factor} is not above low_freq_factor {low_freq_factor}"),
                    );
                }
                Ok(())
            }
            RopeScaling::Linear { .. } => Ok(()),
        }
    }
}

/// A hyperparameter that cannot describe a working model.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config field `{}`: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

impl LlamaConfig {
    /// A small Llama config; `head_dim = hidden / heads`, untied head, no biases.
    pub fn tiny(vocab_size: usize, hidden_size: usize, intermediate_size: usize, layers: usize, heads: usize, kv_heads: usize) -> Self {
        Self {
            family: Family::Llama,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden_size.checked_div(heads).unwrap_or(0),
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            tie_word_embeddings: false,
            max_position_embeddings: 2048,
            attention_bias: false,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// q, k and v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        match self.family {
            Family::Llama => self.attention_bias,
            Family::Qwen2 => true,
            Family::Mistral => false,
        }
    }

    /// The o projection carries a bias.
    pub fn o_bias(&self) -> bool {
        match self.family {
            Family::Llama => self.attention_bias,
            Family::Qwen2 | Family::Mistral => false,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(ConfigError {
                    field,
                    reason: "must be positive".into(),
                });
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(ConfigError {
                field: "num_key_value_heads",
                reason: format!(
                    "{} does not divide num_attention_heads = {} (grouped-query attention needs whole groups)",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            });
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ConfigError {
                field: "head_dim",
                reason: format!("{} is odd; rotary embeddings rotate pairs", self.head_dim),
            });
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(ConfigError {
                field: "rms_norm_eps",
                reason: format!("{} is not a positive finite number", self.rms_norm_eps),
            });
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(ConfigError {
                field: "rope_theta",
                reason: format!("{} is not a finite number above 1", self.rope_theta),
            });
        }
        self.rope_scaling.validate()?;
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(ConfigError {
                field: "num_hidden_layers",
                reason: format!("{} is more than {MAX_LAYERS}", self.num_hidden_layers),
            });
        }
        // Every tensor's element count, and the total, must be computable; a tensor
        // must also fit the GPU runtime and safetensors offsets comfortably.
        let dims = [
            ("num_attention_heads", self.num_attention_heads.checked_mul(self.head_dim)),
            ("num_key_value_heads", self.num_key_value_heads.checked_mul(self.head_dim)),
        ];
        for (field, dim) in dims {
            if dim.is_none() {
                return Err(ConfigError { field, reason: format!("{field} x head_dim overflows") });
            }
        }
        let (q, kv) = (self.q_dim(), self.kv_dim());
        let tensors = [
            ("vocab_size", self.vocab_size.checked_mul(self.hidden_size)),
            ("num_attention_heads", q.checked_mul(self.hidden_size)),
            ("num_key_value_heads", kv.checked_mul(self.hidden_size)),
            ("intermediate_size", self.intermediate_size.checked_mul(self.hidden_size)),
        ];
        for (field, elements) in tensors {
            if elements.is_none_or(|n| n > MAX_TENSOR_ELEMENTS) {
                return Err(ConfigError {
                    field,
                    reason: format!("makes a tensor of more than {MAX_TENSOR_ELEMENTS} elements (hidden_size {})", self.hidden_size),
                });
            }
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(ConfigError {
                field: "vocab_size",
                reason: "does not fit token ids in u32".into(),
            });
        }
        for (field, id) in [("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)] {
            if let Some(id) = id
                && id as usize >= self.vocab_size
            {
                return Err(ConfigError {
                    field,
                    reason: format!("{id} is outside the vocabulary (vocab_size {})", self.vocab_size),
                });
            }
        }
        Ok(())
    }

    /// Every parameter's Hugging Face name and shape, in canonical (name-sorted) order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (qd, kvd) = (self.q_dim(), self.kv_dim());
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), vec![v, c]),
            ("model.norm.weight".to_string(), vec![c]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, c]));
        }
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            out.push((format!("{p}input_layernorm.weight"), vec![c]));
            out.push((format!("{p}post_attention_layernorm.weight"), vec![c]));
            out.push((format!("{p}self_attn.q_proj.weight"), vec![qd, c]));
            out.push((format!("{p}self_attn.k_proj.weight"), vec![kvd, c]));
            out.push((format!("{p}self_attn.v_proj.weight"), vec![kvd, c]));
            out.push((format!("{p}self_attn.o_proj.weight"), vec![c, qd]));
            if self.qkv_bias() {
                out.push((format!("{p}self_attn.q_proj.bias"), vec![qd]));
                out.push((format!("{p}self_attn.k_proj.bias"), vec![kvd]));
                out.push((format!("{p}self_attn.v_proj.bias"), vec![kvd]));
            }
            if self.o_bias() {
                out.push((format!("{p}self_attn.o_proj.bias"), vec![c]));
            }
            out.push((format!("{p}mlp.gate_proj.weight"), vec![i, c]));
            out.push((format!("{p}mlp.up_proj.weight"), vec![i, c]));
            out.push((format!("{p}mlp.down_proj.weight"), vec![c, i]));
        }
        out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        out
    }

    pub fn num_params(&self) -> usize {
        self.param_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}
