//! JSON Lines datasets: TRL's preference format (`prompt`, `chosen`, `rejected`
//! as strings, or in TRL's conversational form as lists of `{"role", "content"}`
//! messages), SFT/plain text (`{"text"}` or `{"prompt", "completion"}`), and
//! token-id preferences (`prompt_ids`, `chosen_ids`, `rejected_ids`) for data
//! tokenized elsewhere. Blank lines are skipped; every error names the file, the
//! 1-based line and the field.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::tokenizer::ByteTokenizer;

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preference {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreferenceIds {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// One SFT example; plain `{"text"}` lines have an empty prompt (every token
/// after the first is trained on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftExample {
    pub prompt: String,
    pub completion: String,
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

/// How conversational messages become text for the byte-level tokenizer: each
/// prompt message as `role: content\n`, then `assistant: ` to cue the answer;
/// a completion is its messages' contents joined by newlines.
fn messages(at: &At, name: &str, v: &[Value], as_prompt: bool) -> Result<String, DataError> {
    let mut parts = Vec::with_capacity(v.len());
    for (k, m) in v.iter().enumerate() {
        let get = |key: &str| {
            m.get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| at.err(Some(&format!("{name}[{k}].{key}")), "missing or not a string"))
        };
        let content = get("content")?;
        if as_prompt || m.get("role").is_some() {
            let role = get("role")?;
            if !ROLES.contains(&role) {
                return Err(at.err(Some(&format!("{name}[{k}].role")), format!("`{role}` is not a role ({})", ROLES.join(", "))));
            }
        }
        parts.push(if as_prompt {
            format!("{}: {content}\n", get("role")?)
        } else {
            content.to_string()
        });
    }
    Ok(if as_prompt { parts.concat() + "assistant: " } else { parts.join("\n") })
}

fn text_field(at: &At, obj: &Map<String, Value>, name: &str, as_prompt: bool, allow_empty: bool) -> Result<String, DataError> {
    let s = match field(at, obj, name)? {
        Value::String(s) => s.clone(),
        Value::Array(a) => messages(at, name, a, as_prompt)?,
        other => return Err(at.err(Some(name), format!("expected a string or a list of messages, found {other}"))),
    };
    if s.is_empty() && !allow_empty {
        return Err(at.err(Some(name), "empty"));
    }
    Ok(s)
}

/// A pair whose two answers are the same states no preference (its DPO gradient
/// is zero); it is almost always a data-preparation slip.
fn distinct<T: PartialEq>(at: &At, chosen: T, rejected: T, field: &str) -> Result<(T, T), DataError> {
    if chosen == rejected {
        return Err(at.err(Some(field), "identical to the chosen answer: the pair states no preference"));
    }
    Ok((chosen, rejected))
}

/// TRL preference records; `prompt` may be empty, `chosen`/`rejected` may not, nor
/// may they be equal.
pub fn parse_preferences(path: &Path, text: &str) -> Result<Vec<Preference>, DataError> {
    parse_lines(path, text, |at, obj| {
        let prompt = text_field(at, obj, "prompt", true, true)?;
        let (chosen, rejected) =
            distinct(at, text_field(at, obj, "chosen", false, false)?, text_field(at, obj, "rejected", false, false)?, "rejected")?;
        Ok(Preference { prompt, chosen, rejected })
    })
}

/// `{"text"}` or `{"prompt", "completion"}` records (strings or message lists).
pub fn parse_sft(path: &Path, text: &str) -> Result<Vec<SftExample>, DataError> {
    parse_lines(path, text, |at, obj| {
        if obj.contains_key("text") {
            Ok(SftExample {
                prompt: String::new(),
                completion: text_field(at, obj, "text", false, false)?,
            })
        } else if obj.contains_key("completion") {
            Ok(SftExample {
                prompt: text_field(at, obj, "prompt", true, true)?,
                completion: text_field(at, obj, "completion", false, false)?,
            })
        } else {
            Err(at.err(None, "expected a `text` field, or `prompt` and `completion`"))
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

/// Byte-level tokenization: `BOS prompt` / `chosen EOS` / `rejected EOS`.
pub fn tokenize_preferences(tok: &ByteTokenizer, prefs: &[Preference]) -> Vec<PreferenceIds> {
    prefs
        .iter()
        .map(|p| PreferenceIds {
            prompt: tok.encode_prompt(&p.prompt),
            chosen: tok.encode_completion(&p.chosen),
            rejected: tok.encode_completion(&p.rejected),
        })
        .collect()
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
        assert_eq!(
            r[0],
            Preference {
                prompt: "2+2=".into(),
                chosen: "4".into(),
                rejected: "5".into()
            }
        );
        assert_eq!(r[1].prompt, "system: Be brief.\nuser: Hi\nassistant: ");
        assert_eq!((r[1].chosen.as_str(), r[1].rejected.as_str()), ("Hello.", "Go away."));
        let ids = tokenize_preferences(&ByteTokenizer, &r[..1]);
        assert_eq!(ids[0].prompt, vec![ByteTokenizer::BOS, 50, 43, 50, 61]);
        assert_eq!(ids[0].chosen, vec![52, ByteTokenizer::EOS]);
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
        let r = parse_sft(p(), text).unwrap();
        assert_eq!(
            r[0],
            SftExample {
                prompt: String::new(),
                completion: "once upon a time".into()
            }
        );
        assert_eq!(
            r[1],
            SftExample {
                prompt: "Q: 1+1".into(),
                completion: " 2".into()
            }
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
