//! Chat templates, rendered as `transformers`' `apply_chat_template` renders them:
//! Jinja with `trim_blocks` and `lstrip_blocks`, loop controls, the globals
//! `raise_exception` and the filter `tojson` it adds, Python's string methods
//! (`.strip()`, `.startswith()`, ...) through minijinja-contrib's `pycompat`, and
//! the template variables `messages`, `add_generation_prompt` and the tokenizer's
//! special tokens (`bos_token`, `eos_token`, ...).
//!
//! `strftime_now(format)`, which transformers defines as today's date, is only
//! defined here once a date is pinned ([`ChatTemplate::set_date`], the CLI's
//! `--chat-date`): a run's tokens must not depend on the day it runs or
//! resumes. Without it, templates that test `strftime_now is defined` (Llama
//! 3.1 / 3.2) take their own fallback date, and templates that call it
//! unconditionally stop with an error that names the flag.

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

/// A calendar date (proleptic Gregorian), what `strftime_now` formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatDate {
    year: i32,
    month: u32,
    day: u32,
}

const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

impl ChatDate {
    /// `YYYY-MM-DD`, a real day.
    pub fn parse(s: &str) -> Result<ChatDate, String> {
        let bad = || format!("{s:?}: expected a date as YYYY-MM-DD");
        let mut parts = s.split('-');
        let (Some(y), Some(m), Some(d), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else { return Err(bad()) };
        if y.len() != 4 || m.len() != 2 || d.len() != 2 {
            return Err(bad());
        }
        let (year, month, day) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?, d.parse().map_err(|_| bad())?);
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return Err(format!("{s:?}: no such day"));
        }
        Ok(ChatDate { year, month, day })
    }

    /// Days since 1970-01-01 (H. Hinnant's `days_from_civil`).
    fn days(self) -> i64 {
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// Python's `strftime` at midnight of this day, for the directives that a
    /// date determines (`%Y %y %m %d %e %j %b %B %h %a %A %u %w %F %D %-d %-m %%`);
    /// any other directive is an error naming it.
    pub fn strftime(self, format: &str) -> Result<String, String> {
        let weekday = (self.days() + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
        let day_of_year = (self.days() - ChatDate { year: self.year, month: 1, day: 1 }.days() + 1) as u32;
        let mut out = String::new();
        let mut chars = format.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let mut directive = chars.next().ok_or("a lone % at the end of the format")?;
            let unpadded = directive == '-';
            if unpadded {
                directive = chars.next().ok_or("a lone %- at the end of the format")?;
            }
            let number = |n: u32, width: usize| if unpadded { n.to_string() } else { format!("{n:0width$}") };
            let text = match (directive, unpadded) {
                ('Y', false) => self.year.to_string(),
                ('y', false) => format!("{:02}", self.year.rem_euclid(100)),
                ('m', _) => number(self.month, 2),
                ('d', _) => number(self.day, 2),
                ('e', false) => format!("{:>2}", self.day),
                ('j', _) => number(day_of_year, 3),
                ('b' | 'h', false) => MONTHS[self.month as usize - 1][..3].to_string(),
                ('B', false) => MONTHS[self.month as usize - 1].to_string(),
                ('a', false) => WEEKDAYS[weekday][..3].to_string(),
                ('A', false) => WEEKDAYS[weekday].to_string(),
                ('u', false) => (weekday + 1).to_string(),
                ('w', false) => ((weekday + 1) % 7).to_string(),
                ('F', false) => format!("{}-{:02}-{:02}", self.year, self.month, self.day),
                ('D', false) => format!("{:02}/{:02}/{:02}", self.month, self.day, self.year.rem_euclid(100)),
                ('%', false) => "%".to_string(),
                (other, _) => {
                    let minus = if unpadded { "-" } else { "" };
                    return Err(format!("strftime_now: %{minus}{other} is not a date directive (the pinned date has no time of day)"));
                }
            };
            out.push_str(&text);
        }
        Ok(out)
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
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
        env.add_template_owned(TEMPLATE_NAME, without_generation_tags(source)).map_err(describe)?;
        Ok(ChatTemplate { env })
    }

    /// Defines `strftime_now` as `date` formatted (transformers: today's date).
    pub fn set_date(&mut self, date: ChatDate) {
        self.env.add_function("strftime_now", move |format: String| -> Result<Value, Error> {
            date.strftime(&format).map(Value::from).map_err(|e| Error::new(ErrorKind::InvalidOperation, e))
        });
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

/// `source` with transformers' `{% generation %}` … `{% endgeneration %}` block
/// (it marks the assistant's text for `return_assistant_tokens_mask` and renders
/// its body unchanged) written as `{% if true %}` … `{% endif %}`: the same
/// output, including the whitespace control of `{%-`/`-%}` and `trim_blocks`,
/// from a tag minijinja knows. The masks themselves are not produced.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // the closing `%}` after the opening `{%` (`{%}` does not close itself)
        let Some(end) = tag[2..].find("%}").map(|i| i + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let open_ctl = inner.strip_prefix(['-', '+']).map_or("", |_| &inner[..1]);
        let body = &inner[open_ctl.len()..];
        let close_ctl = body.strip_suffix(['-', '+']).map_or("", |_| &body[body.len() - 1..]);
        let word = body[..body.len() - close_ctl.len()].trim();
        let replacement = match word {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{open_ctl} {r} {close_ctl}%}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
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
        _ => {
            let detail = e.detail().map(str::to_string).unwrap_or_else(|| e.kind().to_string());
            let hint = match e.kind() {
                ErrorKind::UnknownFunction if e.to_string().contains("strftime_now") => {
                    " (strftime_now is today's date in transformers; pass --chat-date YYYY-MM-DD to pin the date the template renders)"
                }
                _ => "",
            };
            format!("chat template{place}: {detail}{hint}")
        }
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

    /// Llama 3.1's system header, as its published template computes the date.
    const LLAMA31_DATE: &str = "{%- if not date_string is defined %}{%- if strftime_now is defined %}{%- set date_string = strftime_now(\"%d %b %Y\") %}{%- else %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}{%- endif %}Today Date: {{ date_string }}";

    #[test]
    fn strftime_now_is_the_pinned_date_or_undefined() {
        let messages = [json!({"role": "user", "content": "a"})];
        let mut t = ChatTemplate::new(LLAMA31_DATE).unwrap();
        // unpinned: the template's own fallback, never the day the run happens on
        assert_eq!(t.render(&messages, false, &[]).unwrap(), "Today Date: 26 Jul 2024");
        t.set_date(ChatDate::parse("2026-03-05").unwrap());
        assert_eq!(t.render(&messages, false, &[]).unwrap(), "Today Date: 05 Mar 2026");

        let unguarded = ChatTemplate::new("{{ strftime_now('%Y') }}").unwrap();
        let err = unguarded.render(&messages, false, &[]).unwrap_err();
        assert!(err.contains("strftime_now") && err.contains("--chat-date"), "{err}");
    }

    #[test]
    fn generation_blocks_render_their_body() {
        // the shape of SmolLM3/Qwen3-style templates that mark assistant turns
        let marked = "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%}\n  <a>{{ m.content }}</a>\n{%- endgeneration %}\n{% else %}<u>{{ m.content }}</u>{% endif %}{% endfor %}";
        let plain = "{% for m in messages %}{% if m.role == 'assistant' %}{%- if true -%}\n  <a>{{ m.content }}</a>\n{%- endif %}\n{% else %}<u>{{ m.content }}</u>{% endif %}{% endfor %}";
        let messages = json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]);
        let out = render(marked, messages.clone(), false).unwrap();
        assert_eq!(out, render(plain, messages, false).unwrap());
        assert_eq!(out, "<u>q</u><a>r</a>");
        // other tags, and text that only looks like one, pass through
        assert_eq!(without_generation_tags("{%+ generation +%}x{%endgeneration%}{{ '{%' }}"), "{%+ if true +%}x{% endif %}{{ '{%' }}");
        // found by the fuzz test: a `{%}` whose `%}` overlaps its own opening
        assert_eq!(without_generation_tags("{%}{% endfor %}"), "{%}{% endfor %}");
        assert_eq!(without_generation_tags("{%-%}{%"), "{%-%}{%");
    }

    #[test]
    fn dates_format_as_python_strftime_does() {
        // Python: datetime.date(2024, 7, 26).strftime(...), and 2000-02-29, 1999-12-31
        let d = ChatDate::parse("2024-07-26").unwrap();
        assert_eq!(d.strftime("%d %b %Y|%B %-d, %Y|%A %a %u %w|%j|%y %m %e|%F %D %%").unwrap(), "26 Jul 2024|July 26, 2024|Friday Fri 5 5|208|24 07 26|2024-07-26 07/26/24 %");
        assert_eq!(ChatDate::parse("2000-02-29").unwrap().strftime("%A %j %-m").unwrap(), "Tuesday 060 2");
        assert_eq!(ChatDate::parse("1999-12-31").unwrap().strftime("%a %j %U").unwrap_err(), "strftime_now: %U is not a date directive (the pinned date has no time of day)");
        assert_eq!(ChatDate::parse("2023-01-01").unwrap().strftime("%A %w %u").unwrap(), "Sunday 0 7");
        for bad in ["2023-02-29", "2024-13-01", "2024-00-10", "24-01-01", "2024-1-01", "2024-01-01x", "today"] {
            assert!(ChatDate::parse(bad).is_err(), "{bad}");
        }
        assert!(d.strftime("%H:%M").unwrap_err().contains("%H"));
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
