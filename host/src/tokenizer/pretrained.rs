//! A model folder's own Hugging Face tokenizer: `tokenizer.json` (read by the
//! `tokenizers` library), the special tokens of `tokenizer_config.json`, and the
//! chat template (`chat_template.jinja`, which `transformers` prefers, or
//! `chat_template` in `tokenizer_config.json`). Text is encoded as `transformers`
//! 5's `AutoTokenizer` encodes it (`tokenizer(text)`), and conversations as its
//! `apply_chat_template(..., tokenize=True)` does.
//!
//! `add_bos_token` and `add_eos_token` are not read: `transformers` 5 drops them
//! when the folder has a `tokenizer.json`, whose own post-processor decides which
//! special tokens `tokenizer(text)` adds (Llama-3's adds BOS, Qwen2's nothing). The
//! Mistral fixture of `tests/tokenizer_parity.rs` sets `add_bos_token` and shows it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use super::chat::{ChatDate, ChatTemplate};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// A file of the tokenizer and what is wrong with it.
#[derive(Debug)]
pub struct TokenizerError {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for TokenizerError {}

/// The special tokens a chat template may refer to, by their template variable.
const SPECIAL_TOKEN_NAMES: [&str; 4] = ["bos_token", "eos_token", "pad_token", "unk_token"];

#[derive(Debug)]
pub struct PretrainedTokenizer {
    tokenizer: Tokenizer,
    /// `(template variable, token text)` of each special token the config names.
    special_tokens: Vec<(&'static str, String)>,
    chat_template: Option<ChatTemplate>,
    /// Where the chat template came from, to name it in errors.
    chat_template_path: PathBuf,
    /// `tokenizer_class` of `tokenizer_config.json`.
    class: Option<String>,
}

/// The classes with which transformers 5 takes `tokenizer.json` as it is. Others
/// (`Qwen2Tokenizer`, `LlamaTokenizer`, ...) may rebuild its normalizer or
/// pre-tokenizer from the class's own defaults: with `Qwen2Tokenizer` on the
/// fixture tokenizer, `tokenizer(text)` gives other ids than the file alone.
const AS_IS_CLASSES: [&str; 2] = ["PreTrainedTokenizerFast", "TokenizersBackend"];

impl PretrainedTokenizer {
    /// The tokenizer of a model folder, or `None` when it has no `tokenizer.json`
    /// (then the byte-level tokenizer is used).
    pub fn load(dir: &Path) -> Result<Option<Self>, TokenizerError> {
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        if !tokenizer_path.exists() {
            return Ok(None);
        }
        let err = |path: &Path, reason: String| TokenizerError { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(&tokenizer_path).map_err(|e| err(&tokenizer_path, e.to_string()))?;
        let tokenizer: Tokenizer = text
            .parse()
            .map_err(|e| err(&tokenizer_path, format!("not a tokenizer the `tokenizers` library reads: {e}")))?;

        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| err(&config_path, e.to_string()))?;
            match serde_json::from_str::<Value>(&text).map_err(|e| err(&config_path, format!("not valid JSON: {e}")))? {
                Value::Object(map) => map,
                _ => return Err(err(&config_path, "expected a JSON object".into())),
            }
        } else {
            Map::new()
        };
        let mut special_tokens = Vec::new();
        for name in SPECIAL_TOKEN_NAMES {
            if let Some(token) = special_token(&config, name).map_err(|reason| err(&config_path, reason))? {
                if tokenizer.token_to_id(&token).is_none() {
                    return Err(err(&config_path, format!("`{name}` `{token}` is not a token of {TOKENIZER_FILE}")));
                }
                special_tokens.push((name, token));
            }
        }
        let template_file = dir.join(CHAT_TEMPLATE_FILE);
        let (source, chat_template_path) = if template_file.exists() {
            let text = std::fs::read_to_string(&template_file).map_err(|e| err(&template_file, e.to_string()))?;
            (Some(text), template_file)
        } else {
            (config_template(&config).map_err(|reason| err(&config_path, reason))?, config_path.clone())
        };
        let chat_template = source
            .map(|s| ChatTemplate::new(&s).map_err(|reason| err(&chat_template_path, reason)))
            .transpose()?;
        let class = config.get("tokenizer_class").and_then(Value::as_str).map(str::to_string);
        Ok(Some(PretrainedTokenizer { tokenizer, special_tokens, chat_template, chat_template_path, class }))
    }

    /// One more than the largest token id, added tokens included: every id it
    /// produces is below it (a count of the tokens would not be, were ids skipped).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab(true).values().max().map_or(0, |&id| id as usize + 1)
    }

    /// A `tokenizer_class` with which transformers may not take `tokenizer.json` as
    /// it is, while this reads the file alone: the ids may differ, and the user
    /// should know.
    pub fn class_caveat(&self) -> Option<String> {
        let class = self.class.as_deref().filter(|c| !AS_IS_CLASSES.contains(c))?;
        Some(format!(
            "tokenizer_config.json names tokenizer_class {class}: transformers 5 may rebuild parts of that tokenizer \
             from the class's defaults; host uses tokenizer.json as it is (set tokenizer_class to \
             PreTrainedTokenizerFast to make transformers do the same)"
        ))
    }

    /// The text of the special token named like the template variable (`eos_token`).
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.iter().find(|(n, _)| *n == name).map(|(_, t)| t.as_str())
    }

    /// `tokenizer(text)`: with the special tokens the post-processor adds (BOS for
    /// most models) when `add_special_tokens`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        let encoding = self.tokenizer.encode(text, add_special_tokens).map_err(|e| format!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Pins the date the chat template's `strftime_now` renders (see
    /// [`ChatTemplate::set_date`]); without a template there is nothing to pin.
    pub fn set_chat_date(&mut self, date: ChatDate) {
        if let Some(t) = &mut self.chat_template {
            t.set_date(date);
        }
    }

    /// `apply_chat_template(messages, add_generation_prompt=..., tokenize=False)`.
    pub fn render_chat(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String, String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            format!(
                "the model's tokenizer has no chat template (neither {CHAT_TEMPLATE_FILE} nor `chat_template` in {})",
                self.chat_template_path.display()
            )
        })?;
        let specials: Vec<(&str, &str)> = self.special_tokens.iter().map(|(n, t)| (*n, t.as_str())).collect();
        template
            .render(messages, add_generation_prompt, &specials)
            .map_err(|e| format!("{}: {e}", self.chat_template_path.display()))
    }

    /// `apply_chat_template(messages, add_generation_prompt=..., tokenize=True)`:
    /// the rendered text encoded without adding special tokens, since the template
    /// writes them itself.
    pub fn encode_chat(&self, messages: &[Value], add_generation_prompt: bool) -> Result<Vec<u32>, String> {
        self.encode(&self.render_chat(messages, add_generation_prompt)?, false)
    }
}

/// A special token as `tokenizer_config.json` gives it: a string, or an added-token
/// object with its text in `content`.
fn special_token(config: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match config.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(format!("`{name}`: an object without a string `content`")),
        },
        Some(other) => Err(format!("`{name}`: expected a string or an object with `content`, found {other}")),
    }
}

/// `chat_template` of `tokenizer_config.json`: one template, or a list of named
/// ones of which `transformers` uses the one named `default`.
fn config_template(config: &Map<String, Value>) -> Result<Option<String>, String> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let mut names = Vec::new();
            for (k, entry) in list.iter().enumerate() {
                let name = entry.get("name").and_then(Value::as_str);
                let template = entry.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => return Err(format!("`chat_template[{k}]`: expected an object with string `name` and `template`")),
                }
            }
            Err(format!("`chat_template`: a list of templates without one named `default` (found: {})", names.join(", ")))
        }
        Some(other) => Err(format!("`chat_template`: expected a string or a list of named templates, found {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_list_of_templates_gives_the_default_one() {
        let list = json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(config_template(&config(list)).unwrap().as_deref(), Some("D"));
        assert_eq!(config_template(&config(json!({"chat_template": "S"}))).unwrap().as_deref(), Some("S"));
        assert_eq!(config_template(&config(json!({}))).unwrap(), None);
        let e = config_template(&config(json!({"chat_template": [{"name": "a"}]}))).unwrap_err();
        assert!(e.starts_with("`chat_template[0]`: expected an object"), "{e}");
    }

    #[test]
    fn special_tokens_are_strings_or_added_token_objects() {
        let c = config(json!({"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>", "pad_token": null, "unk_token": 5}));
        assert_eq!(special_token(&c, "bos_token").unwrap().as_deref(), Some("<s>"));
        assert_eq!(special_token(&c, "eos_token").unwrap().as_deref(), Some("</s>"));
        assert_eq!(special_token(&c, "pad_token").unwrap(), None);
        assert!(special_token(&c, "unk_token").unwrap_err().starts_with("`unk_token`: expected a string"));
    }
}
