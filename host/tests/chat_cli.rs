//! `align` and `sft` on a model folder with its own tokenizer and chat template:
//! a tiny model written by `pretrain`, the Qwen2 fixture tokenizer of
//! tests/fixtures/tokenizers (whose token ids tests/tokenizer_parity.rs checks
//! against transformers) and TRL conversational data; and each bad input named by
//! file and line with nothing written.

use std::path::{Path, PathBuf};

use host::hf;
use host::model::config::LlamaConfig;
use host::model::LlamaModel;
use merge_core::dtype::Dtype;

mod common;
use common::{host, stderr, tmp};

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers").join(family)
}

/// `host pretrain` on the built-in data with a vocabulary as large as the fixture
/// tokenizer's, then the tokenizer files copied in: the README's example folder.
fn model_with_tokenizer(dir: &Path, family: &str) -> PathBuf {
    let config = dir.join("config.json");
    hf::write_config(&config, &LlamaConfig::tiny(400, 32, 64, 1, 2, 1), Dtype::F32).unwrap();
    let out = dir.join("pretrained");
    let o = host(
        &[
            "pretrain", "--model-config", config.to_str().unwrap(), "--builtin", "16", "--steps", "2", "--batch-size", "4",
            "--backend", "cpu", "--out", out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let model = out.join("model");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture(family).join(file), model.join(file)).unwrap();
    }
    model
}

const CONVERSATIONAL: &str = r#"{"prompt": [{"role": "user", "content": "Q: 2+3"}], "chosen": [{"role": "assistant", "content": "Sure, 5!"}], "rejected": [{"role": "assistant", "content": "5"}]}
{"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "Q: 23+45"}], "chosen": [{"role": "assistant", "content": "Sure, 68!"}], "rejected": [{"role": "assistant", "content": "68"}]}
{"chosen": [{"role": "user", "content": "Q: 1+1"}, {"role": "assistant", "content": "Sure, 2!"}], "rejected": [{"role": "user", "content": "Q: 1+1"}, {"role": "assistant", "content": "2"}]}
{"prompt": [{"role": "user", "content": "日本語 🎉?"}], "chosen": [{"role": "assistant", "content": "Sure, はい!"}], "rejected": [{"role": "assistant", "content": "はい"}]}
"#;

fn align(model: &Path, data: &Path, out: &Path) -> std::process::Output {
    host(
        &[
            "align", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--steps", "2", "--batch-size", "2",
            "--lr", "1e-3", "--backend", "cpu", "--out", out.to_str().unwrap(),
        ],
        &[],
    )
}

#[test]
fn align_and_sft_run_on_trl_conversations_with_the_models_chat_template() {
    let d = tmp("chat-align");
    let model = model_with_tokenizer(&d, "qwen2");
    let data = d.join("trl_conversational.jsonl");
    std::fs::write(&data, CONVERSATIONAL).unwrap();
    let out = d.join("aligned");
    let o = align(&model, &data, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().filter(|l| l.contains("\"rewards/margins\"")).count() >= 2, "{metrics}");
    assert!(!stderr(&o).contains("tokenizer_class"), "{}", stderr(&o));

    // A model-specific tokenizer_class: transformers 5 may rebuild that tokenizer, so the run says so.
    let config_path = model.join("tokenizer_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["tokenizer_class"] = "Qwen2Tokenizer".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let o = align(&model, &data, &d.join("aligned-noted"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("tokenizer_class Qwen2Tokenizer: transformers 5 may rebuild"), "{}", stderr(&o));

    let sft_data = d.join("sft.jsonl");
    std::fs::write(
        &sft_data,
        concat!(
            r#"{"messages": [{"role": "user", "content": "Q: 2+3"}, {"role": "assistant", "content": "5"}]}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "Q: 1+1"}], "completion": [{"role": "assistant", "content": "2"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let sft_out = d.join("sft");
    let o = host(
        &[
            "sft", "--model", model.to_str().unwrap(), "--data", sft_data.to_str().unwrap(), "--steps", "1", "--batch-size", "2",
            "--backend", "cpu", "--out", sft_out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(&d).unwrap();
}

/// Each refusal names the file (and the line, where there is one) and leaves no
/// output folder behind.
#[test]
fn bad_tokenizers_templates_and_records_are_named_and_nothing_is_written() {
    let d = tmp("chat-bad");
    let qwen = model_with_tokenizer(&d, "qwen2");
    let data = d.join("prefs.jsonl");
    let mut case = 0;
    let mut refused = |model: &Path, records: &str, want: &[&str]| {
        std::fs::write(&data, records).unwrap();
        case += 1;
        let out = d.join(format!("out{case}"));
        let o = align(model, &data, &out);
        assert!(!o.status.success(), "accepted: {records}");
        for w in want {
            assert!(stderr(&o).contains(w), "wanted {w:?} in: {}", stderr(&o));
        }
        assert!(!out.exists(), "{} was written", out.display());
    };
    let good = CONVERSATIONAL.lines().next().unwrap();
    let role = r#"{"prompt": [{"role": "usr", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#;
    refused(&qwen, &format!("{good}\n{role}\n"), &["prefs.jsonl:2: field `prompt[0].role`: `usr` is not a role"]);
    let mixed = r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}"#;
    refused(&qwen, &format!("{good}\n\n{mixed}\n"), &["prefs.jsonl:3: field `chosen`: a string where a list of messages is expected"]);
    refused(&qwen, &format!("{good}\n{{\"prompt\": [\n"), &["prefs.jsonl:2: not valid JSON"]);

    // Mistral's template refuses a system message: the record's line and the template's words.
    let mistral = d.join("mistral");
    std::fs::create_dir_all(&mistral).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(qwen.join(file), mistral.join(file)).unwrap();
    }
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("mistral").join(file), mistral.join(file)).unwrap();
    }
    let system = CONVERSATIONAL.lines().nth(1).unwrap();
    refused(&mistral, &format!("{good}\n{system}\n"), &["prefs.jsonl:2: ", "raised", "Conversation roles must alternate"]);

    // A chat_template.jinja beside tokenizer_config.json is the one used, as in transformers.
    std::fs::write(mistral.join("chat_template.jinja"), "{{ raise_exception('from the .jinja file') }}").unwrap();
    refused(&mistral, &format!("{good}\n"), &["prefs.jsonl:1: ", "chat_template.jinja", "from the .jinja file"]);
    std::fs::write(mistral.join("chat_template.jinja"), "{% for m in messages %}{{ m.content }\n").unwrap();
    refused(&mistral, &format!("{good}\n"), &["chat_template.jinja: chat template (template line 1)"]);
    // strftime_now (the clock, in transformers) exists only with a pinned --chat-date
    let dated = "{{ strftime_now('%d %b %Y') }}{% for m in messages %}{{ m.content }}{% endfor %}";
    std::fs::write(mistral.join("chat_template.jinja"), dated).unwrap();
    refused(&mistral, &format!("{good}\n"), &["prefs.jsonl:1: ", "strftime_now", "--chat-date YYYY-MM-DD"]);
    std::fs::write(&data, format!("{good}\n")).unwrap();
    let run = |date: &str, out: &Path| {
        let mut args = vec!["align", "--model", mistral.to_str().unwrap(), "--data", data.to_str().unwrap(), "--steps", "1"];
        args.extend(["--batch-size", "1", "--backend", "cpu", "--chat-date", date, "--out", out.to_str().unwrap()]);
        host(&args, &[])
    };
    let o = run("2024-02-30", &d.join("bad-date"));
    assert!(!o.status.success() && stderr(&o).contains("--chat-date \"2024-02-30\": no such day"), "{}", stderr(&o));
    assert!(!d.join("bad-date").exists());
    let o = run("2024-07-26", &d.join("dated"));
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_file(mistral.join("chat_template.jinja")).unwrap();

    // A broken tokenizer.json names the file and where the JSON breaks.
    let text = std::fs::read_to_string(mistral.join("tokenizer.json")).unwrap();
    std::fs::write(mistral.join("tokenizer.json"), &text[..text.len() / 2]).unwrap();
    refused(&mistral, &format!("{good}\n"), &["tokenizer.json: not a tokenizer the `tokenizers` library reads", "line"]);
    std::fs::write(mistral.join("tokenizer.json"), text).unwrap();

    // A special token the vocabulary lacks, and a list of templates with no default.
    let config_path = mistral.join("tokenizer_config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json["eos_token"] = "<|nope|>".into();
    std::fs::write(&config_path, json.to_string()).unwrap();
    refused(&mistral, &format!("{good}\n"), &["tokenizer_config.json: `eos_token` `<|nope|>` is not a token of tokenizer.json"]);
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json["chat_template"] = serde_json::json!([{"name": "tool_use", "template": "x"}]);
    std::fs::write(&config_path, json.to_string()).unwrap();
    refused(&mistral, &format!("{good}\n"), &["tokenizer_config.json: `chat_template`: a list of templates without one named `default` (found: tool_use)"]);
    std::fs::write(&config_path, "{\"eos_token\": \"</s>\",\n\"chat_template\": 3,}").unwrap();
    refused(&mistral, &format!("{good}\n"), &["tokenizer_config.json: not valid JSON", "line 2"]);

    // A model whose embedding has fewer rows than the tokenizer has ids.
    let small = d.join("small");
    hf::save_model(&small, &LlamaModel::init(LlamaConfig::tiny(300, 32, 64, 1, 2, 1), 1).unwrap(), Dtype::F32).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("qwen2").join(file), small.join(file)).unwrap();
    }
    refused(&small, &format!("{good}\n"), &["the model's vocab_size 300 is smaller than its tokenizer's 400"]);
    std::fs::remove_dir_all(&d).unwrap();
}

/// What `align` writes is a complete model folder: the source's config.json with
/// every field kept (a list-valued `eos_token_id`, fields this trainer does not
/// read), its tokenizer and generation files byte for byte, the source's dtype
/// by default, and shards with an index above `--max-shard-size`.
#[test]
fn the_written_model_folder_keeps_the_source_folder() {
    let d = tmp("chat-folder");
    let model = model_with_tokenizer(&d, "qwen2");
    let config_path = model.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["eos_token_id"] = serde_json::json!([2, 5]);
    config["pad_token_id"] = 0.into();
    config["sliding_window"] = serde_json::Value::Null;
    config["initializer_range"] = 0.02.into();
    config["torch_dtype"] = "bfloat16".into();
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let generation = "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": [2, 5],\n  \"temperature\": 0.7\n}\n";
    std::fs::write(model.join("generation_config.json"), generation).unwrap();
    std::fs::write(model.join("chat_template.jinja"), "{{ messages }}").unwrap();
    let data = d.join("trl_conversational.jsonl");
    std::fs::write(&data, CONVERSATIONAL).unwrap();

    let out = d.join("aligned");
    let mut args = vec![
        "align", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--steps", "2", "--batch-size", "2",
        "--lr", "1e-3", "--backend", "cpu", "--out", out.to_str().unwrap(), "--max-shard-size", "20KB",
    ];
    let o = host(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let written = out.join("model");
    let read = |dir: &Path, f: &str| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()));
    let written_config: serde_json::Value = serde_json::from_slice(&read(&written, "config.json")).unwrap();
    assert_eq!(written_config, config, "config.json changed although only the dtype could have");
    for f in ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        assert_eq!(read(&written, f), read(&model, f), "{f} was not copied byte for byte");
    }
    assert!(!written.join("model.safetensors").exists());
    let index: serde_json::Value = serde_json::from_slice(&read(&written, "model.safetensors.index.json")).unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() > 1 && shards.iter().all(|s| written.join(s).is_file()), "{shards:?}");
    let (reloaded, dtype) = hf::load_model(&written).unwrap();
    assert_eq!(dtype, Dtype::Bf16);
    let bf16 = |x: f32| f32::from_bits(x.to_bits() & 0xffff_0000);
    assert!(reloaded.params.tensors.iter().all(|t| t.data.iter().all(|&x| bf16(x) == x)), "weights are not bf16 values");

    // --save-dtype overrides the source's; under the limit the weights are one file.
    let out2 = d.join("aligned-f32");
    let out2_str = out2.to_str().unwrap().to_string();
    let value_of = |args: &[&str], flag: &str| args.iter().position(|a| *a == flag).unwrap() + 1;
    let (i, j) = (value_of(&args, "--out"), value_of(&args, "--max-shard-size"));
    args[i] = &out2_str;
    args[j] = "50GB";
    args.extend(["--save-dtype", "f32"]);
    let o = host(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let written_config: serde_json::Value = serde_json::from_slice(&read(&out2.join("model"), "config.json")).unwrap();
    assert_eq!(written_config["torch_dtype"], "float32");
    assert!(out2.join("model/model.safetensors").is_file() && !out2.join("model/model.safetensors.index.json").exists());
    std::fs::remove_dir_all(&d).unwrap();
}
