//! The model-folder tokenizer and chat templates against what transformers 5.24
//! and TRL 1.16 give for the same folders and conversations, recorded by
//! `scripts/tokenizer_parity.py regenerate` in tests/fixtures/tokenizers/.

use std::path::{Path, PathBuf};

use host::data::encode::TextTokenizer;
use host::data::jsonl::{parse_preferences, parse_sft};
use host::tokenizer::PretrainedTokenizer;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn load(family: &str) -> PretrainedTokenizer {
    PretrainedTokenizer::load(&fixtures().join(family)).unwrap().unwrap()
}

const FAMILIES: [&str; 3] = ["llama3", "qwen2", "mistral"];

#[test]
fn plain_text_encodes_as_autotokenizer_does() {
    let all = expected();
    for family in FAMILIES {
        let tok = load(family);
        for case in all["families"][family]["encode"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(tok.encode(text, true).unwrap(), ids(&case["ids"]), "{family}: {text:?}");
        }
    }
}

#[test]
fn chat_templates_render_and_tokenize_as_apply_chat_template_does() {
    let all = expected();
    let mut checked = 0;
    for family in FAMILIES {
        let tok = load(family);
        for case in all["families"][family]["chat"].as_array().unwrap() {
            let conversation = all["conversations"][case["conversation"].as_str().unwrap()].as_array().unwrap();
            let messages = &conversation[..case["messages"].as_u64().unwrap() as usize];
            let generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
            let what = format!("{family}: {} add_generation_prompt={generation_prompt}", case["conversation"]);
            match case.get("error") {
                Some(error) => {
                    let ours = tok.render_chat(messages, generation_prompt).unwrap_err();
                    assert!(ours.contains(error.as_str().unwrap()) && ours.contains("raised"), "{what}: {ours}");
                }
                None => {
                    assert_eq!(tok.render_chat(messages, generation_prompt).unwrap(), case["text"].as_str().unwrap(), "{what}");
                    assert_eq!(tok.encode_chat(messages, generation_prompt).unwrap(), ids(&case["ids"]), "{what}");
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 3 * 4 * 2);
}

#[test]
fn preference_records_tokenize_as_trls_dpo_trainer_does() {
    let all = expected();
    for family in FAMILIES {
        let tok = load(family);
        for (name, record) in all["preferences"].as_object().unwrap() {
            let want = &all["families"][family]["preference"][name];
            let prefs = parse_preferences(Path::new("pref.jsonl"), &record.to_string()).unwrap();
            let got = TextTokenizer::Pretrained(&tok).preference(&prefs[0]);
            match want.get("error") {
                Some(error) => assert!(got.unwrap_err().contains(error.as_str().unwrap()), "{family} {name}"),
                None => {
                    let got = got.unwrap();
                    assert_eq!(got.prompt, ids(&want["prompt_ids"]), "{family} {name}: prompt");
                    assert_eq!(got.chosen, ids(&want["chosen_ids"]), "{family} {name}: chosen");
                    assert_eq!(got.rejected, ids(&want["rejected_ids"]), "{family} {name}: rejected");
                }
            }
        }
    }
}

#[test]
fn sft_records_tokenize_as_trls_sft_trainer_does() {
    let all = expected();
    for family in FAMILIES {
        let tok = load(family);
        for (name, record) in all["sft"].as_object().unwrap() {
            let want = &all["families"][family]["sft"][name];
            let examples = parse_sft(Path::new("sft.jsonl"), &record.to_string()).unwrap();
            let seq = TextTokenizer::Pretrained(&tok).sft(&examples[0]).unwrap();
            assert_eq!(seq.tokens, ids(&want["input_ids"]), "{family} {name}");
            // TRL's completion mask, less the first token, which nothing predicts
            let scored: Vec<bool> = ids(&want["completion_mask"]).iter().enumerate().map(|(t, &m)| m == 1 && t > 0).collect();
            assert_eq!(seq.mask, scored, "{family} {name}");
        }
    }
}
