//! JSON Lines datasets: TRL's preference format (`prompt`, `chosen`, `rejected`
//! as strings, or in TRL's conversational form as lists of `{"role", "content"}`
//! messages, where the prompt may be left implicit), SFT/plain text (`{"text"}`,
//! `{"prompt", "completion"}` or a `{"messages"}` conversation), and token-id
//! preferences (`prompt_ids`, `chosen_ids`, `rejected_ids`) for data tokenized
//! elsewhere. Blank lines are skipped; every error names the file, the 1-based
//! line and the field. `data::encode` turns the records into token ids.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

#[derive(Debug)]
pub enum DataError {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Line {
        path: PathBuf,
        line: usize,
        field: Option<String>,
        reason: String,
    },
    Empty {
        path: PathBuf,
    },
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            DataError::Line {
                path,
                line,
                field: Some(field),
                reason,
            } => write!(f, "{}:{line}: field `{field}`: {reason}", path.display()),
            DataError::Line {
                path,
                line,
                field: None,
                reason,
            } => write!(f, "{}:{line}: {reason}", path.display()),
            DataError::Empty { path } => write!(f, "{}: no records", path.display()),
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DataError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A text field as the record gives it: a string, or a conversation (TRL's
/// conversational form), each message an object with a known `role` and a string
/// `content` (other keys are kept for the chat template).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Text(String),
    Conversation(Vec<Value>),
}

impl Content {
    /// The text the byte-level tokenizer sees: a string as it is; a prompt
    /// conversation as `role: content` lines then `assistant: ` to cue the answer;
    /// an answer conversation as its contents joined by newlines.
    pub fn byte_text(&self, as_prompt: bool) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Conversation(messages) => {
                let text = |m: &Value, key: &str| m[key].as_str().expect("checked when parsed").to_string();
                if as_prompt {
                    messages.iter().map(|m| format!("{}: {}\n", text(m, "role"), text(m, "content"))).collect::<String>() + "assistant: "
                } else {
                    messages.iter().map(|m| text(m, "content")).collect::<Vec<_>>().join("\n")
                }
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preference {
    pub prompt: Content,
    pub chosen: Content,
    pub rejected: Content,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferenceIds {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// One SFT record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SftExample {
    /// `{"text"}`: every token after the first is trained on.
    Text(String),
    /// `{"prompt", "completion"}`: only the completion is trained on.
    PromptCompletion { prompt: Content, completion: Content },
    /// `{"messages"}`: a whole conversation, rendered by the model's chat template.
    Messages(Vec<Value>),
}

/// Where a record came from, for error messages.
struct At<'a> {
    path: &'a Path,
    line: usize,
}

impl At<'_> {
    fn err(&self, field: Option<&str>, reason: impl Into<String>) -> DataError {
        DataError::Line {
            path: self.path.to_path_buf(),
            line: self.line,
            field: field.map(str::to_string),
            reason: reason.into(),
        }
    }
}

/// A data file's text, for the `parse_*` functions (which also get the path, to
/// name it in errors).
pub fn read_text(path: &Path) -> Result<String, DataError> {
    fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The text without the UTF-8 byte order mark some editors put at the start of a
/// file (JSON itself has no place for it).
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// The 1-based line number of each record of a JSON Lines text: its non-blank
/// lines, the ones every reader here parses, in order.
pub fn record_lines(text: &str) -> Vec<usize> {
    strip_bom(text).lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, _)| i + 1).collect()
}

/// Parses each non-blank line as a JSON object and hands it to `f`.
fn parse_lines<T>(path: &Path, text: &str, f: impl Fn(&At, &Map<String, Value>) -> Result<T, DataError>) -> Result<Vec<T>, DataError> {
    let mut out = Vec::new();
    for (i, line) in strip_bom(text).lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = At { path, line: i + 1 };
        let v: Value = serde_json::from_str(line).map_err(|e| at.err(None, format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| at.err(None, "expected a JSON object"))?;
        out.push(f(&at, obj)?);
    }
    if out.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    Ok(out)
}

fn field<'v>(at: &At, obj: &'v Map<String, Value>, name: &str) -> Result<&'v Value, DataError> {
    obj.get(name).ok_or_else(|| at.err(Some(name), "missing"))
}

/// The roles of TRL's conversational format; any other is most likely a typo that
/// would silently become part of the prompt text.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// A conversation: each message an object with a known `role` and a string `content`.
fn conversation(at: &At, name: &str, v: &[Value]) -> Result<Vec<Value>, DataError> {
    for (k, m) in v.iter().enumerate() {
        let get = |key: &str| {
            m.get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| at.err(Some(&format!("{name}[{k}].{key}")), "missing or not a string"))
        };
        get("content")?;
        let role = get("role")?;
        if !ROLES.contains(&role) {
            return Err(at.err(Some(&format!("{name}[{k}].role")), format!("`{role}` is not a role ({})", ROLES.join(", "))));
        }
    }
    Ok(v.to_vec())
}

fn content_field(at: &At, obj: &Map<String, Value>, name: &str, allow_empty: bool) -> Result<Content, DataError> {
    let content = match field(at, obj, name)? {
        Value::String(s) => Content::Text(s.clone()),
        Value::Array(a) => Content::Conversation(conversation(at, name, a)?),
        other => return Err(at.err(Some(name), format!("expected a string or a list of messages, found {other}"))),
    };
    let empty = match &content {
        Content::Text(s) => s.is_empty(),
        Content::Conversation(m) => m.is_empty(),
    };
    if empty && !allow_empty {
        return Err(at.err(Some(name), "empty"));
    }
    Ok(content)
}

/// TRL reads a record as conversational or as strings, never a mix: a string
/// where the other fields are conversations (or the reverse) is refused, naming it.
fn same_form(at: &At, fields: &[(&str, &Content)]) -> Result<(), DataError> {
    let (first_name, first) = fields[0];
    for &(name, content) in &fields[1..] {
        match (first, content) {
            (Content::Text(_), Content::Conversation(_)) => {
                return Err(at.err(Some(name), format!("a list of messages where a string is expected (`{first_name}` is a string)")));
            }
            (Content::Conversation(_), Content::Text(_)) => {
                return Err(at.err(Some(name), format!("a string where a list of messages is expected (`{first_name}` is a conversation)")));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A pair whose two answers are the same states no preference (its DPO gradient
/// is zero); it is almost always a data-preparation slip.
fn distinct<T: PartialEq>(at: &At, chosen: T, rejected: T, field: &str) -> Result<(T, T), DataError> {
    if chosen == rejected {
        return Err(at.err(Some(field), "identical to the chosen answer: the pair states no preference"));
    }
    Ok((chosen, rejected))
}

/// TRL's `extract_prompt` for a record without `prompt`: the prompt is the
/// messages `chosen` and `rejected` share up to the first that differs. When one
/// conversation is a prefix of the other, TRL's loop ends on its last index, so
/// the shared messages but the last make the prompt; that is kept.
fn implicit_prompt(chosen: &[Value], rejected: &[Value]) -> usize {
    let shortest = chosen.len().min(rejected.len());
    (0..shortest).find(|&i| chosen[i] != rejected[i]).unwrap_or(shortest.saturating_sub(1))
}

/// TRL preference records; `prompt` may be empty, `chosen`/`rejected` may not, nor
/// may they be equal. Without `prompt`, conversational `chosen`/`rejected` carry it
/// as their shared first messages.
pub fn parse_preferences(path: &Path, text: &str) -> Result<Vec<Preference>, DataError> {
    parse_lines(path, text, |at, obj| {
        let chosen = content_field(at, obj, "chosen", false)?;
        let rejected = content_field(at, obj, "rejected", false)?;
        if let (false, Content::Conversation(c), Content::Conversation(r)) = (obj.contains_key("prompt"), &chosen, &rejected) {
            let (c, r) = distinct(at, c, r, "rejected")?;
            let shared = implicit_prompt(c, r);
            return Ok(Preference {
                prompt: Content::Conversation(c[..shared].to_vec()),
                chosen: Content::Conversation(c[shared..].to_vec()),
                rejected: Content::Conversation(r[shared..].to_vec()),
            });
        }
        let prompt = content_field(at, obj, "prompt", true)?;
        same_form(at, &[("prompt", &prompt), ("chosen", &chosen), ("rejected", &rejected)])?;
        let (chosen, rejected) = distinct(at, chosen, rejected, "rejected")?;
        Ok(Preference { prompt, chosen, rejected })
    })
}

/// `{"text"}`, `{"prompt", "completion"}` (strings or conversations) or
/// `{"messages"}` records.
pub fn parse_sft(path: &Path, text: &str) -> Result<Vec<SftExample>, DataError> {
    parse_lines(path, text, |at, obj| {
        if obj.contains_key("text") {
            match content_field(at, obj, "text", false)? {
                Content::Text(t) => Ok(SftExample::Text(t)),
                Content::Conversation(_) => Err(at.err(Some("text"), "a list of messages where a string is expected (a conversation goes in `messages`)")),
            }
        } else if obj.contains_key("messages") {
            match content_field(at, obj, "messages", false)? {
                Content::Conversation(m) => Ok(SftExample::Messages(m)),
                Content::Text(_) => Err(at.err(Some("messages"), "a string where a list of messages is expected")),
            }
        } else if obj.contains_key("completion") {
            let prompt = content_field(at, obj, "prompt", true)?;
            let completion = content_field(at, obj, "completion", false)?;
            same_form(at, &[("prompt", &prompt), ("completion", &completion)])?;
            Ok(SftExample::PromptCompletion { prompt, completion })
        } else {
            Err(at.err(None, "expected a `text` field, `prompt` and `completion`, or `messages`"))
        }
    })
}

fn ids_field(at: &At, obj: &Map<String, Value>, name: &str, vocab_size: usize, allow_empty: bool) -> Result<Vec<u32>, DataError> {
    let arr = field(at, obj, name)?
        .as_array()
        .ok_or_else(|| at.err(Some(name), "expected a list of token ids"))?;
    let mut ids = Vec::with_capacity(arr.len());
    for (k, v) in arr.iter().enumerate() {
        match v.as_u64() {
            Some(id) if (id as usize) < vocab_size => ids.push(id as u32),
            Some(id) => {
                return Err(at.err(
                    Some(name),
                    format!("element {k}: token id {id} is outside the vocabulary (vocab_size {vocab_size})"),
                ));
            }
            None => return Err(at.err(Some(name), format!("element {k}: {v} is not a token id"))),
        }
    }
    if ids.is_empty() && !allow_empty {
        return Err(at.err(Some(name), "empty"));
    }
    Ok(ids)
}

/// Token-id preference records, each id checked against the model's vocabulary.
/// The ids are used as given: add BOS/EOS in the file if the model expects them.
pub fn parse_preference_ids(path: &Path, text: &str, vocab_size: usize) -> Result<Vec<PreferenceIds>, DataError> {
    parse_lines(path, text, |at, obj| {
        let prompt = ids_field(at, obj, "prompt_ids", vocab_size, true)?;
        let (chosen, rejected) = distinct(
            at,
            ids_field(at, obj, "chosen_ids", vocab_size, false)?,
            ids_field(at, obj, "rejected_ids", vocab_size, false)?,
            "rejected_ids",
        )?;
        Ok(PreferenceIds { prompt, chosen, rejected })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("data/prefs.jsonl")
    }

    #[test]
    fn string_and_conversational_preferences() {
        let text = concat!(
            r#"{"prompt": "2+2=", "chosen": "4", "rejected": "5", "extra": 1}"#,
            "\n\n",
            r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "#,
            r#""chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "Go away."}]}"#,
            "\n"
        );
        let r = parse_preferences(p(), text).unwrap();
        assert_eq!(r.len(), 2);
        let text = |s: &str| Content::Text(s.into());
        assert_eq!(
            r[0],
            Preference {
                prompt: text("2+2="),
                chosen: text("4"),
                rejected: text("5")
            }
        );
        assert_eq!(r[1].prompt.byte_text(true), "system: Be brief.\nuser: Hi\nassistant: ");
        assert_eq!((r[1].chosen.byte_text(false), r[1].rejected.byte_text(false)), ("Hello.".into(), "Go away.".into()));
    }

    /// TRL's `extract_prompt`: the shared first messages are the prompt, also
    /// when one conversation continues the other (then all shared but the last).
    #[test]
    fn an_implicit_prompt_is_the_shared_start_of_the_conversations() {
        let m = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
        let line = |chosen: &[Value], rejected: &[Value]| serde_json::json!({"chosen": chosen, "rejected": rejected}).to_string();
        let (sys, q, a, b) = (m("system", "S"), m("user", "Q"), m("assistant", "A"), m("assistant", "B"));
        let r = parse_preferences(p(), &line(&[sys.clone(), q.clone(), a.clone()], &[sys.clone(), q.clone(), b.clone()])).unwrap();
        assert_eq!(r[0].prompt, Content::Conversation(vec![sys.clone(), q.clone()]));
        assert_eq!((&r[0].chosen, &r[0].rejected), (&Content::Conversation(vec![a.clone()]), &Content::Conversation(vec![b.clone()])));
        let q2 = m("user", "Q2");
        let r = parse_preferences(p(), &line(&[q.clone(), a.clone()], &[q.clone(), a.clone(), q2.clone(), b.clone()])).unwrap();
        assert_eq!(r[0].prompt, Content::Conversation(vec![q.clone()]));
        assert_eq!(r[0].chosen, Content::Conversation(vec![a.clone()]));
        assert_eq!(r[0].rejected, Content::Conversation(vec![a, q2, b]));
        let e = parse_preferences(p(), &line(std::slice::from_ref(&q), std::slice::from_ref(&q))).err().unwrap().to_string();
        assert!(e.contains(":1: field `rejected`: identical"), "{e}");
        let e = parse_preferences(p(), "{\"chosen\": \"a\", \"rejected\": \"b\"}").err().unwrap().to_string();
        assert!(e.contains(":1: field `prompt`: missing"), "{e}");
    }

    #[test]
    fn strings_and_conversations_do_not_mix_in_a_record() {
        let conv = r#"[{"role": "user", "content": "Hi"}]"#;
        let cases = [
            (format!(r#"{{"prompt": {conv}, "chosen": "a", "rejected": {conv}}}"#), "field `chosen`: a string where a list of messages is expected"),
            (format!(r#"{{"prompt": "p", "chosen": "a", "rejected": {conv}}}"#), "field `rejected`: a list of messages where a string is expected"),
        ];
        for (text, want) in cases {
            let e = parse_preferences(p(), &text).err().unwrap().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
        let e = parse_sft(p(), &format!(r#"{{"prompt": "p", "completion": {conv}}}"#)).err().unwrap().to_string();
        assert!(e.contains(":1: field `completion`: a list of messages where a string is expected"), "{e}");
        let e = parse_sft(p(), r#"{"messages": "hello"}"#).err().unwrap().to_string();
        assert!(e.contains(":1: field `messages`: a string where a list of messages is expected"), "{e}");
        let e = parse_sft(p(), &format!(r#"{{"text": {conv}}}"#)).err().unwrap().to_string();
        assert!(e.contains(":1: field `text`: a list of messages where a string is expected"), "{e}");
    }

    #[test]
    fn preference_errors_name_line_and_field() {
        let cases = [
            (
                "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"rejected\": \"c\"}",
                ":2: field `chosen`: missing",
            ),
            (
                "{\"prompt\": \"a\", \"chosen\": 3, \"rejected\": \"c\"}",
                ":1: field `chosen`: expected a string",
            ),
            ("{\"prompt\": \"a\", \"chosen\": \"\", \"rejected\": \"c\"}", ":1: field `chosen`: empty"),
            ("\n\n{\"prompt\": \"a\", \"chosen\": \"b\"", ":3: not valid JSON"),
            ("[1, 2]", ":1: expected a JSON object"),
            (
                "{\"prompt\": [{\"role\": \"user\"}], \"chosen\": \"b\", \"rejected\": \"c\"}",
                ":1: field `prompt[0].content`",
            ),
        ];
        let unknown_role = "{\"prompt\": [{\"role\": \"usr\", \"content\": \"Hi\"}], \"chosen\": \"b\", \"rejected\": \"c\"}";
        let same = "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"b\"}";
        let cases = cases.into_iter().chain([
            (unknown_role, ":1: field `prompt[0].role`: `usr` is not a role"),
            (same, ":2: field `rejected`: identical to the chosen answer"),
        ]);
        for (text, want) in cases {
            let e = parse_preferences(p(), text).err().unwrap().to_string();
            assert!(e.starts_with("data/prefs.jsonl") && e.contains(want), "{e} (wanted {want})");
        }
        let e = parse_preferences(p(), "\n  \n").err().unwrap().to_string();
        assert!(e.contains("no records"), "{e}");
        let e = read_text(Path::new("/nonexistent/prefs.jsonl")).err().unwrap().to_string();
        assert!(e.contains("/nonexistent/prefs.jsonl"), "{e}");
    }

    #[test]
    fn sft_forms() {
        let text = "{\"text\": \"once upon a time\"}\n{\"prompt\": \"Q: 1+1\", \"completion\": \" 2\"}\n";
        let text = format!("{text}{}\n", r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}"#);
        let r = parse_sft(p(), &text).unwrap();
        assert_eq!(r[0], SftExample::Text("once upon a time".into()));
        assert_eq!(
            r[1],
            SftExample::PromptCompletion {
                prompt: Content::Text("Q: 1+1".into()),
                completion: Content::Text(" 2".into())
            }
        );
        assert_eq!(
            r[2],
            SftExample::Messages(vec![
                serde_json::json!({"role": "user", "content": "Hi"}),
                serde_json::json!({"role": "assistant", "content": "Yo"})
            ])
        );
        let e = parse_sft(p(), "{\"text\": \"a\"}\n{\"prompt\": \"x\"}").err().unwrap().to_string();
        assert!(e.contains(":2:") && e.contains("`text`"), "{e}");
    }

    #[test]
    fn token_id_preferences() {
        let text = "{\"prompt_ids\": [1, 5], \"chosen_ids\": [7, 2], \"rejected_ids\": [9]}\n";
        let r = parse_preference_ids(p(), text, 10).unwrap();
        assert_eq!(
            r[0],
            PreferenceIds {
                prompt: vec![1, 5],
                chosen: vec![7, 2],
                rejected: vec![9]
            }
        );
        let e = parse_preference_ids(p(), text, 9).err().unwrap().to_string();
        assert!(e.contains(":1: field `rejected_ids`: element 0: token id 9 is outside"), "{e}");
        let e = parse_preference_ids(p(), "{\"prompt_ids\": [1], \"chosen_ids\": [1.5], \"rejected_ids\": [1]}", 10)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`chosen_ids`: element 0: 1.5 is not a token id"), "{e}");
        let e = parse_preference_ids(p(), "{\"prompt_ids\": [1], \"chosen_ids\": [], \"rejected_ids\": [1]}", 10)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`chosen_ids`: empty"), "{e}");
        let e = parse_preference_ids(p(), "{\"prompt_ids\": [1], \"chosen_ids\": [3, 4], \"rejected_ids\": [3, 4]}", 10)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(":1: field `rejected_ids`: identical"), "{e}");
    }

    /// A byte order mark is not JSON, but editors write it; it used to be reported
    /// as invalid JSON at column 1 of line 1.
    #[test]
    fn a_byte_order_mark_at_the_start_is_skipped() {
        let text = "\u{feff}{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n";
        assert_eq!(parse_sft(p(), text).unwrap().len(), 2);
        assert_eq!(record_lines(text), vec![1, 3]);
        let e = parse_sft(p(), "{\"text\": \"a\"}\n\u{feff}{\"text\": \"b\"}").err().unwrap().to_string();
        assert!(e.contains(":2: not valid JSON"), "{e}");
    }
}
