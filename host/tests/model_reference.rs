//! The Rust forward pass against an independent NumPy transcription of
//! transformers' Llama and Qwen2 forward (`tests/reference/llama_forward.py`),
//! on checkpoints written by `hf::save_model`: the gradient checks prove the
//! backward matches the forward, this proves the forward is the architecture.

use std::path::PathBuf;
use std::process::Command;

use host::hf::save_model;
use host::model::{Family, LlamaConfig, LlamaModel, RopeScaling, SplitMix64};
use merge_core::dtype::Dtype;

fn require_numpy() {
    let probe = Command::new("python3").args(["-c", "import numpy"]).output();
    match probe {
        Err(e) => panic!("python3 not runnable ({e}): install Python 3 with NumPy (Debian: `apt-get install python3 python3-numpy`)"),
        Ok(o) if !o.status.success() => panic!("numpy is missing for python3: `pip install numpy`\n{}", String::from_utf8_lossy(&o.stderr)),
        Ok(_) => {}
    }
}

#[test]
fn forward_matches_transformers_reference() {
    require_numpy();
    let root = std::env::temp_dir().join(format!("model-reference-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut dirs: Vec<PathBuf> = Vec::new();
    // Llama with all four attention biases, untied head, GQA; Qwen2 with q/k/v
    // biases, tied head, and a head_dim that is not hidden/heads; then Llama 3.1's
    // rope scaling (its three frequency bands all present at head_dim 8, θ 5000
    // and an original context of 64) and linear scaling; Mistral (no biases)
    let llama3 = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 64.0 };
    for (name, family, tied, bias, heads, kv_heads, head_dim, scaling) in [
        ("llama", Family::Llama, false, true, 4, 2, 6, RopeScaling::None),
        ("qwen2", Family::Qwen2, true, false, 6, 2, 8, RopeScaling::None),
        ("llama3-rope", Family::Llama, true, false, 4, 2, 8, llama3),
        ("linear-rope", Family::Llama, false, false, 4, 1, 8, RopeScaling::Linear { factor: 3.0 }),
        ("mistral", Family::Mistral, false, false, 4, 2, 6, RopeScaling::None),
    ] {
        let mut c = LlamaConfig::tiny(37, 24, 40, 3, heads, kv_heads);
        c.family = family;
        c.tie_word_embeddings = tied;
        c.attention_bias = bias;
        c.head_dim = head_dim;
        c.rope_theta = 5000.0;
        c.rope_scaling = scaling;
        c.rms_norm_eps = 1e-5;
        let mut model = LlamaModel::init(c, 3).unwrap();
        // away from init's structure (norms at 1, zero biases), so every term shows
        let mut rng = SplitMix64::new(9);
        for t in &mut model.params.tensors {
            for x in &mut t.data {
                *x += (rng.next_normal() * 0.3) as f32;
            }
        }
        let dir = root.join(name);
        save_model(&dir, &model, Dtype::F32).unwrap();
        let tokens: Vec<u32> = vec![1, 5, 36, 2, 2, 17, 30, 0, 11, 36, 4];
        let logits = model.logits(&tokens).unwrap();
        std::fs::write(dir.join("out.json"), serde_json::json!({ "tokens": tokens, "logits": logits }).to_string()).unwrap();
        dirs.push(dir);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama_forward.py");
    let out = Command::new("python3").arg(&script).args(&dirs).output().expect("python3 runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert_eq!(text.lines().filter(|l| l.contains("max |diff|")).count(), 5, "{text}");
    std::fs::remove_dir_all(&root).unwrap();
}
