//! Chat templates, rendered as `transformers`' `apply_chat_template` renders them:
//! Jinja with `trim_blocks` and `lstrip_blocks`, loop controls, the globals
//! `raise_exception` and the filter `tojson` it adds, Python's string methods
//! (`.strip()`, `.startswith()`, ...) through minijinja-contrib's `pycompat`, and
//! the template variables `messages`, `add_generation_prompt` and the tokenizer's
//! special tokens (`bos_token`, `eos_token`, ...).

use std::collections::BTreeMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

/// The name the template is compiled under; minijinja puts it in error locations.
const TEMPLATE_NAME: &str = "chat_template";

/// One compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names the template's line.
    pub fn new(source: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(describe)?;
        Ok(ChatTemplate { env })
    }

    /// The text of `messages` (each a JSON object with at least `role` and
    /// `content`), with the assistant header after them when `add_generation_prompt`.
    /// `special_tokens` are the template variables such as `("bos_token", "<s>")`.
    pub fn render(&self, messages: &[Json], add_generation_prompt: bool, special_tokens: &[(&str, &str)]) -> Result<String, String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(describe)?;
        let mut context: BTreeMap<&str, Value> = special_tokens.iter().map(|&(name, token)| (name, Value::from(token))).collect();
        context.insert("messages", Value::from(minijinja::value::Serde(messages)));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));
        template.render(&context).map_err(describe)
    }
}

/// The error with the template line it happened on, and for `raise_exception` the
/// template's own message first.
fn describe(e: Error) -> String {
    let place = e.line().map(|l| format!(" (template line {l})")).unwrap_or_default();
    match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some_and(|d| d.starts_with(RAISED)) => {
            let message = e.detail().unwrap_or_default().trim_start_matches(RAISED);
            format!("the chat template raised an exception{place}: {message}")
        }
        _ => format!("chat template{place}: {}", e.detail().map(str::to_string).unwrap_or_else(|| e.kind().to_string())),
    }
}

const RAISED: &str = "raise_exception: ";

/// `raise_exception(message)`: how templates refuse a conversation they do not
/// support (roles that do not alternate, a system message, ...).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
}

/// Python's `json.dumps` as transformers' `tojson` calls it: `ensure_ascii=False`,
/// `", "` and `": "` separators, or newlines and `indent` spaces when given; keys
/// in insertion order unless `sort_keys`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(v: &Json, indent: Option<usize>, sort_keys: bool, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match v {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, sort_keys, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            let mut entries: Vec<_> = map.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                out.push_str(&Json::String(key.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, sort_keys, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: Json, add_generation_prompt: bool) -> Result<String, String> {
        let messages = messages.as_array().unwrap().clone();
        ChatTemplate::new(source)?.render(&messages, add_generation_prompt, &[("bos_token", "<s>"), ("eos_token", "</s>")])
    }

    #[test]
    fn blocks_are_trimmed_as_transformers_configures_jinja() {
        let source = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}>{% endif %}";
        let out = render(source, json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), true).unwrap();
        assert_eq!(out, "[a]\n>");
    }

    #[test]
    fn python_string_methods_and_loop_controls() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m.content.startswith('skip') %}{% continue %}{% endif %}{{ m.content.strip() | upper }}{{ eos_token }}{% endfor %}";
        let messages = json!([{"role": "user", "content": " hi "}, {"role": "user", "content": "skip me"}, {"role": "user", "content": "yo"}]);
        assert_eq!(render(source, messages, false).unwrap(), "<s>HI</s>YO</s>");
    }

    #[test]
    fn tojson_writes_what_pythons_json_dumps_writes() {
        let source = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ [] | tojson }}";
        let out = render(source, json!([{"role": "user", "content": "é\"\n", "n": [1, 2.5, null, true]}]), false).unwrap();
        // the keys in the record's order, as a Python dict keeps them
        let compact = r#"{"role": "user", "content": "é\"\n", "n": [1, 2.5, null, true]}"#;
        let indented = "{\n  \"role\": \"user\",\n  \"content\": \"é\\\"\\n\",\n  \"n\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}";
        assert_eq!(out, format!("{compact}|{indented}|[]"));
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_named() {
        let source = "{% for m in messages %}\n{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}";
        let e = render(source, json!([{"role": "system", "content": "x"}]), false).unwrap_err();
        assert_eq!(e, "the chat template raised an exception (template line 2): System role not supported");
        let e = ChatTemplate::new("{% for m in messages %}\n{{ m.content }").unwrap_err();
        assert!(e.starts_with("chat template (template line 2): "), "{e}");
    }
}
