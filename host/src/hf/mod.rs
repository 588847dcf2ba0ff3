//! Hugging Face model directories: `config.json` (LlamaForCausalLM or
//! Qwen2ForCausalLM fields) and `model.safetensors` (f32, bf16 or f16 on disk),
//! read with every problem named (file, field, tensor) and written atomically.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use merge_core::dtype::Dtype;

use crate::model::{LlamaConfig, LlamaModel};
use crate::params::{LayoutDifference, ParamSet};

mod config;
mod weights;

pub use config::{config_json, parse_config, read_config, write_config};
pub use weights::{INDEX_FILE, encode_tensors, encode_weights, parse_weights, read_sharded, read_weights, write_weights};

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
    use merge_core::dtype::{StoreError, bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
    use safetensors::tensor::{Dtype as StDtype, TensorView};
    use serde_json::{Map, json};

    use super::*;
    use crate::model::{Family, LlamaConfig, RopeScaling};
    use crate::params::Tensor;

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
