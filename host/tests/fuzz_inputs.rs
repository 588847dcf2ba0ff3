//! Seeded random fuzzing of every reader of user files: the JSON Lines readers,
//! config.json, the safetensors path (header, tensors, layout check against a
//! config), and chat templates and records through a model's own tokenizer. Each input is a mutation of a valid one; every reader must return
//! `Ok` or a named error, never panic. The test panics (and so fails) on the first
//! reader panic, printing the seed and input to reproduce it.
//!
//! CI runs a few seconds' worth (`DEFAULT_ITERS` per target); for a longer run:
//! `HOST_FUZZ_ITERS=2000000 HOST_FUZZ_SEED=7 cargo test --release -p host --test fuzz_inputs -- --nocapture`.

use std::path::Path;

use host::data::builtin::SplitMix64;
use host::data::encode::TextTokenizer;
use host::data::jsonl;
use host::hf;
use host::model::config::LlamaConfig;
use host::model::LlamaModel;
use host::params::{ParamSet, Tensor};
use host::tokenizer::PretrainedTokenizer;
use host::tokenizer::chat::ChatTemplate;
use merge_core::dtype::Dtype;

const DEFAULT_ITERS: u64 = 100_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Bytes that make JSON and its numbers interesting: structure, quotes, escapes,
/// signs, exponents, a BOM, a multi-byte character, and extreme numbers.
const TOKENS: &[&[u8]] = &[
    b"{", b"}", b"[", b"]", b"\"", b":", b",", b"\\", b"\\u0000", b"\\ud800", b"-", b"e999", b"1e-400", b"0", b"-1",
    b"18446744073709551616", b"4294967296", b"null", b"true", b"[]", b"{}", b"\n", b"\r\n", b" ", "\u{feff}".as_bytes(),
    "é".as_bytes(), b"\xff", b"NaN", b"9007199254740993", b"1.5",
];

fn mutate(rng: &mut SplitMix64, seed_inputs: &[Vec<u8>]) -> Vec<u8> {
    let mut b = seed_inputs[rng.below(seed_inputs.len() as u64) as usize].clone();
    for _ in 0..1 + rng.below(6) {
        let len = b.len() as u64;
        let at = |rng: &mut SplitMix64| rng.below(len + 1) as usize;
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = rng.below(len) as usize;
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len() as u64) as usize];
                let i = at(rng);
                b.splice(i..i, t.iter().copied());
            }
            2 if !b.is_empty() => {
                let i = rng.below(len) as usize;
                let j = (i + 1 + rng.below(16) as usize).min(b.len());
                b.drain(i..j);
            }
            3 => b.truncate(at(rng)),
            4 if !b.is_empty() => {
                let i = rng.below(len) as usize;
                let j = (i + 1 + rng.below(32) as usize).min(b.len());
                let piece = b[i..j].to_vec();
                let k = at(rng);
                b.splice(k..k, piece);
            }
            5 if !b.is_empty() => {
                // A number somewhere replaced by an extreme one.
                let i = rng.below(len) as usize;
                if b[i].is_ascii_digit() {
                    let t = TOKENS[15 + rng.below(2) as usize];
                    b.splice(i..i + 1, t.iter().copied());
                }
            }
            _ => {
                let i = at(rng);
                b.insert(i, rng.next_u64() as u8);
            }
        }
    }
    b
}

/// Runs `target` on `iters` mutations of `seeds`; on a panic, names the seed and input.
fn fuzz(name: &str, seeds: &[Vec<u8>], target: impl Fn(&[u8])) -> u64 {
    let iters = env_u64("HOST_FUZZ_ITERS", DEFAULT_ITERS);
    let seed = env_u64("HOST_FUZZ_SEED", 1);
    let mut rng = SplitMix64::new(seed ^ name.bytes().fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b)));
    for i in 0..iters {
        let input = mutate(&mut rng, seeds);
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input))) {
            let why = panic.downcast_ref::<String>().cloned().or(panic.downcast_ref::<&str>().map(|s| s.to_string()));
            panic!("{name}: reader panicked on iteration {i} (HOST_FUZZ_SEED={seed}): {why:?}\ninput: {:?}", String::from_utf8_lossy(&input));
        }
    }
    eprintln!("fuzz {name}: {iters} inputs, no panic");
    iters
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn jsonl_readers_never_panic() {
    let p = Path::new("fuzz.jsonl");
    let prefs = vec![
        br#"{"prompt": "2+2=", "chosen": "4", "rejected": "5"}
{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "Go."}]}
{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "rejected": [{"role": "user", "content": "Hi"}]}
"#
        .to_vec(),
    ];
    let sft = vec![
        br#"{"text": "once"}

{"prompt": "Q: 1+1", "completion": " 2"}
{"messages": [{"role": "user", "content": "Hi"}]}
"#
        .to_vec(),
    ];
    let ids = vec![b"{\"prompt_ids\": [1, 5], \"chosen_ids\": [7, 2], \"rejected_ids\": [9]}\n{\"input_ids\": [3, 4, 5]}\n".to_vec()];
    let lm = vec![b"{\"text\": \"ab\"}\n{\"input_ids\": [1, 2, 3]}\n".to_vec()];
    let n = fuzz("preferences", &prefs, |b| {
        let _ = jsonl::parse_preferences(p, &text(b));
    }) + fuzz("sft", &sft, |b| {
        let _ = jsonl::parse_sft(p, &text(b));
    }) + fuzz("preference-ids", &ids, |b| {
        let _ = jsonl::parse_preference_ids(p, &text(b), 300);
    }) + fuzz("lm", &lm, |b| {
        let _ = host::cli::data::parse_lm(p, &text(b), TextTokenizer::Bytes, 300);
        let _ = jsonl::record_lines(&text(b));
    });
    assert!(n >= 4 * env_u64("HOST_FUZZ_ITERS", DEFAULT_ITERS));
}

fn small_config() -> LlamaConfig {
    let mut c = LlamaConfig::tiny(16, 8, 12, 1, 2, 1);
    c.max_position_embeddings = 32;
    c
}

#[test]
fn config_json_never_panics() {
    let p = Path::new("fuzz/config.json");
    let mut qwen = small_config();
    qwen.family = host::model::config::Family::Qwen2;
    qwen.tie_word_embeddings = true;
    let seeds = vec![
        hf::config_json(&small_config(), Dtype::F32).into_bytes(),
        hf::config_json(&qwen, Dtype::Bf16).into_bytes(),
        br#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":32,"hidden_size":16,"intermediate_size":40,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rope_parameters":{"rope_theta":500000.0,
            "rope_type":"default"},"eos_token_id":[7,8],"bos_token_id":null,"rope_scaling":{"type":"default"}}"#
            .to_vec(),
    ];
    fuzz("config.json", &seeds, |b| {
        if let Ok(c) = hf::parse_config(p, &text(b)) {
            // What a load does next with a config: list its tensors.
            let _ = c.config.num_params();
        }
    });
}

#[test]
fn safetensors_path_never_panics() {
    let p = Path::new("fuzz/model.safetensors");
    let config = small_config();
    let model = LlamaModel::init(config.clone(), 1).unwrap();
    let mut seeds = Vec::new();
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
        seeds.push(hf::encode_weights(p, &model.params, dtype).unwrap());
    }
    let t = Tensor { name: "exp_avg/w".into(), shape: vec![2, 2], data: vec![1.0, -0.0, 3.5, 1e-40] };
    seeds.push(host::train::checkpoint::to_safetensors(&[("exp_avg/w".into(), &t)]).unwrap());
    // The header is where the lengths and offsets are: mutate it more often than
    // the tensor bytes by also seeding with header-only prefixes.
    let header_only: Vec<Vec<u8>> = seeds
        .iter()
        .map(|s| {
            let n = u64::from_le_bytes(s[..8].try_into().unwrap()) as usize;
            s[..8 + n].to_vec()
        })
        .collect();
    seeds.extend(header_only);
    fuzz("safetensors", &seeds, |b| {
        if let Ok(params) = hf::parse_weights(p, b) {
            let _ = LlamaModel::from_params(config.clone(), params.clone());
            let _ = ParamSet::new(params.tensors).numel();
        }
        let _ = host::train::checkpoint::from_safetensors(p, b);
    });
}

/// The published chat templates (mutated: a model folder's own template is a user
/// file too) rendered on a conversation, and preference and SFT records tokenized
/// with a model's tokenizer and template: a named error or a result, never a panic.
#[test]
fn chat_templates_and_records_through_a_model_tokenizer_never_panic() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers");
    let templates: Vec<Vec<u8>> = ["llama3", "qwen2", "mistral"]
        .iter()
        .map(|family| {
            let config = std::fs::read_to_string(fixtures.join(family).join("tokenizer_config.json")).unwrap();
            let config: serde_json::Value = serde_json::from_str(&config).unwrap();
            config["chat_template"].as_str().unwrap().as_bytes().to_vec()
        })
        .collect();
    let conversation = serde_json::json!([
        {"role": "system", "content": ""}, {"role": "user", "content": "Q: 2+3"}, {"role": "assistant", "content": " 5 "}
    ]);
    let messages = conversation.as_array().unwrap();
    let specials = [("bos_token", "<s>"), ("eos_token", "</s>")];
    let tokenizer = PretrainedTokenizer::load(&fixtures.join("qwen2")).unwrap().unwrap();
    let records = vec![
        br#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "Go."}]}
{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "rejected": [{"role": "user", "content": "Hi"}]}
{"prompt": "2+2=", "chosen": "4", "rejected": "5"}
"#
        .to_vec(),
        br#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
{"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]}
{"text": "once"}
"#
        .to_vec(),
    ];
    let p = Path::new("fuzz.jsonl");
    let tok = TextTokenizer::Pretrained(&tokenizer);
    fuzz("chat template", &templates, |b| {
        if let Ok(template) = ChatTemplate::new(&text(b)) {
            let _ = template.render(messages, true, &specials);
        }
    });
    fuzz("records through a model tokenizer", &records, |b| {
        for pref in jsonl::parse_preferences(p, &text(b)).unwrap_or_default() {
            let _ = tok.preference(&pref);
        }
        for example in jsonl::parse_sft(p, &text(b)).unwrap_or_default() {
            let _ = tok.sft(&example);
        }
    });
}
