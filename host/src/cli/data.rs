//! Training / evaluation data for the CLI: JSONL files (text, prompt/completion,
//! TRL preferences, or token ids) or the built-in generator.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::data::builtin::{Builtin, BuiltinConfig};
use crate::data::encode::TextTokenizer;
use crate::data::jsonl;
use crate::data::truncate::Truncation;
use crate::model::config::LlamaConfig;
use crate::model::Sequence;
use crate::tokenizer::ByteTokenizer;
use crate::tokenizer::chat::ChatDate;
use crate::train::objectives::PairSeqs;
use crate::train::{Result, TrainError};

#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Training data, JSONL: `{"text"}` or `{"input_ids"}` (pretrain), `{"prompt","completion"}` or
    /// `{"messages"}` (sft), TRL `{"prompt","chosen","rejected"}` (strings or conversations; without
    /// `prompt`, conversations sharing their first messages) or with --token-ids
    /// `{"prompt_ids","chosen_ids","rejected_ids"}` (align). Text goes through the model folder's
    /// tokenizer.json and chat template when it has them, else the byte tokenizer.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out data in the same format, for --eval-every.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Preference files hold token ids (another tokenizer's output) rather than text.
    #[arg(long)]
    pub token_ids: bool,
    /// Use N examples of the built-in generated data (seeded by --seed) instead of --data.
    #[arg(long)]
    pub builtin: Option<usize>,
    /// Held-out examples of the built-in data for evaluation.
    #[arg(long, default_value_t = 0)]
    pub builtin_eval: usize,
    /// Longest tokenized sequence (`prompt ++ completion`), as TRL's `max_length`;
    /// longer ones are cut as --truncation-mode says. `none`: no truncation.
    #[arg(long, default_value = "1024")]
    pub max_length: String,
    /// Keep only the prompt's last N tokens before --max-length applies (TRL before 1.0).
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// keep_start (TRL's default: the end is cut) or keep_end (the start is cut).
    #[arg(long, default_value = "keep_start")]
    pub truncation_mode: String,
    /// The date (YYYY-MM-DD) a chat template's `strftime_now` renders, which
    /// transformers takes from the clock. Without it `strftime_now` is undefined,
    /// so a run's tokens never depend on the day it runs or resumes: Llama 3.1/3.2
    /// templates then use their own fallback date.
    #[arg(long, value_name = "YYYY-MM-DD")]
    pub chat_date: Option<String>,
}

impl DataArgs {
    /// The data settings as recorded in checkpoints (resume must see the same data).
    pub fn describe(&self) -> serde_json::Value {
        let mut settings = serde_json::json!({
            "data": self.data, "eval_data": self.eval_data, "token_ids": self.token_ids,
            "builtin": self.builtin, "builtin_eval": self.builtin_eval,
            "max_length": self.max_length, "max_prompt_length": self.max_prompt_length, "truncation_mode": self.truncation_mode,
        });
        // only when given, so checkpoints written before the flag existed still resume
        if let Some(date) = &self.chat_date {
            settings["chat_date"] = date.as_str().into();
        }
        settings
    }

    /// `--chat-date`, parsed.
    pub fn chat_date(&self) -> Result<Option<ChatDate>> {
        self.chat_date.as_deref().map(|d| ChatDate::parse(d).map_err(|e| TrainError::msg(format!("--chat-date {e}")))).transpose()
    }

    /// The truncation the flags ask for.
    pub fn truncation(&self) -> Result<Truncation> {
        let max_length = match self.max_length.as_str() {
            "none" => None,
            s => match s.parse::<usize>() {
                Ok(n) if n >= 2 => Some(n),
                _ => return Err(TrainError::msg(format!("--max-length = {s}: expected an integer >= 2, or none"))),
            },
        };
        if self.max_prompt_length == Some(0) {
            return Err(TrainError::msg("--max-prompt-length = 0: expected an integer >= 1".to_string()));
        }
        let mode = self.truncation_mode.parse().map_err(|e| TrainError::msg(format!("--truncation-mode {e}")))?;
        Ok(Truncation { max_length, max_prompt_length: self.max_prompt_length, mode })
    }

    /// Content hashes of the data files (the built-in data is a function of its
    /// recorded size and seed).
    pub fn input_hashes(&self) -> Result<Vec<crate::train::checkpoint::InputHash>> {
        let files = [("--data", &self.data), ("--eval-data", &self.eval_data)];
        files.into_iter().filter_map(|(flag, p)| p.as_deref().map(|p| super::inputs::file_hash(flag, p))).collect()
    }

    fn source(&self) -> Result<Source<'_>> {
        for (flag, n) in [("--builtin", self.builtin.unwrap_or(0)), ("--builtin-eval", self.builtin_eval)] {
            if n > MAX_BUILTIN_EXAMPLES {
                return Err(TrainError::msg(format!(
                    "{flag} = {n}: expected at most {MAX_BUILTIN_EXAMPLES} (the built-in examples are generated in memory)"
                )));
            }
        }
        match (&self.data, self.builtin) {
            (Some(_), Some(_)) => Err(TrainError::msg("--data and --builtin: give one, not both")),
            (None, None) => Err(TrainError::msg("no training data: give --data FILE or --builtin N")),
            (Some(p), None) => Ok(Source::File(p)),
            (None, Some(0)) => Err(TrainError::msg("--builtin = 0: expected an integer >= 1")),
            (None, Some(n)) => Ok(Source::Builtin(n)),
        }
    }
}

/// The most built-in examples of one kind a run may ask for: about 200 bytes each
/// once tokenized, so the limit keeps the set near 200 MB.
pub const MAX_BUILTIN_EXAMPLES: usize = 1_000_000;

enum Source<'a> {
    File(&'a Path),
    Builtin(usize),
}

fn builtin(seed: u64) -> Result<Builtin> {
    Builtin::new(BuiltinConfig::default(), seed).map_err(TrainError::msg)
}

/// Text data goes through `tok`, whose ids must exist in the model.
fn need_vocab(tok: TextTokenizer, vocab: usize) -> Result<()> {
    match tok {
        TextTokenizer::Bytes if vocab < ByteTokenizer::VOCAB_SIZE => Err(TrainError::msg(format!(
            "the model's vocab_size {vocab} is smaller than the byte tokenizer's {}: bring token ids instead",
            ByteTokenizer::VOCAB_SIZE
        ))),
        TextTokenizer::Pretrained(t) if vocab < t.vocab_size() => Err(TrainError::msg(format!(
            "the model's vocab_size {vocab} is smaller than its tokenizer's {} (tokenizer.json, added tokens included)",
            t.vocab_size()
        ))),
        _ => Ok(()),
    }
}

/// Built-in data is made for the byte tokenizer.
fn text_seq(text: &str) -> Sequence {
    TextTokenizer::Bytes.text(text).expect("the byte tokenizer encodes any text")
}

fn completion_seq(prompt: &str, completion: &str) -> Sequence {
    let tok = ByteTokenizer;
    Sequence::completion(&tok.encode_prompt(prompt), &tok.encode_completion(completion))
}

/// Plain-text JSONL: each line an object with `text` (a string, tokenized by
/// `tok`) or `input_ids` (token ids, checked against `vocab`).
pub fn parse_lm(path: &Path, text: &str, tok: TextTokenizer, vocab: usize) -> Result<Vec<Sequence>> {
    let mut out = Vec::new();
    for (i, line) in jsonl::strip_bom(text).lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| TrainError::msg(format!("{}:{}: {msg}", path.display(), i + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        if let Some(t) = v.get("text") {
            let t = t.as_str().ok_or_else(|| at("field `text`: not a string".into()))?;
            need_vocab(tok, vocab)?;
            out.push(tok.text(t).map_err(at)?);
        } else if let Some(ids) = v.get("input_ids") {
            let arr = ids.as_array().ok_or_else(|| at("field `input_ids`: not a list".into()))?;
            let mut seq = Vec::with_capacity(arr.len());
            for (k, x) in arr.iter().enumerate() {
                match x.as_u64() {
                    Some(id) if (id as usize) < vocab => seq.push(id as u32),
                    _ => return Err(at(format!("field `input_ids` element {k}: {x} is not a token id below vocab_size {vocab}"))),
                }
            }
            if seq.len() < 2 {
                return Err(at("field `input_ids`: fewer than 2 tokens, nothing to predict".into()));
            }
            out.push(Sequence::full(seq));
        } else {
            return Err(at("expected a field `text` or `input_ids`".into()));
        }
    }
    if out.is_empty() {
        return Err(TrainError::msg(format!("{}: no records", path.display())));
    }
    Ok(out)
}

fn read(path: &Path) -> Result<String> {
    Ok(jsonl::read_text(path)?)
}

/// Refuses an example longer than the model's context after truncation (`lens` in
/// record order), naming its file and line; the model would only name its place
/// in a batch.
fn check_file_lengths(path: &Path, text: &str, lens: impl Iterator<Item = usize>, model: &LlamaConfig) -> Result<()> {
    let max = model.max_position_embeddings;
    match lens.zip(jsonl::record_lines(text)).find(|(len, _)| *len > max) {
        Some((len, line)) => Err(TrainError::msg(format!(
            "{}:{line}: the example is {len} tokens long after truncation, more than the model's \
             max_position_embeddings {max}: lower --max-length to {max} or less",
            path.display()
        ))),
        None => Ok(()),
    }
}

fn check_builtin_lengths(lens: impl Iterator<Item = usize>, model: &LlamaConfig) -> Result<()> {
    let max = model.max_position_embeddings;
    match lens.enumerate().find(|(_, len)| *len > max) {
        Some((i, len)) => Err(TrainError::msg(format!(
            "built-in example {i} is {len} tokens long after truncation, more than the model's \
             max_position_embeddings {max}: lower --max-length to {max} or less"
        ))),
        None => Ok(()),
    }
}

/// `f` over each item with its record's line, an error naming file and line.
fn per_record<R, T>(path: &Path, text: &str, items: Vec<R>, f: impl Fn(R) -> std::result::Result<T, String>) -> Result<Vec<T>> {
    items
        .into_iter()
        .zip(jsonl::record_lines(text))
        .map(|(r, line)| f(r).map_err(|e| TrainError::msg(format!("{}:{line}: {e}", path.display()))))
        .collect()
}

fn per_builtin<R, T>(items: Vec<R>, f: impl Fn(R) -> std::result::Result<T, String>) -> Result<Vec<T>> {
    items.into_iter().enumerate().map(|(i, r)| f(r).map_err(|e| TrainError::msg(format!("built-in example {i}: {e}")))).collect()
}

/// Tokenizes each record with `f`, an error naming the record's file and line.
fn encode_records<R, T>(path: &Path, text: &str, records: &[R], f: impl Fn(&R) -> std::result::Result<T, String>) -> Result<Vec<T>> {
    records
        .iter()
        .zip(jsonl::record_lines(text))
        .map(|(r, line)| f(r).map_err(|e| TrainError::msg(format!("{}:{line}: {e}", path.display()))))
        .collect()
}

/// Pretraining sequences (train, eval); `tok` for `{"text"}` files.
pub fn lm_sequences(a: &DataArgs, model: &LlamaConfig, tok: TextTokenizer, seed: u64) -> Result<(Vec<Sequence>, Vec<Sequence>)> {
    let vocab = model.vocab_size;
    let cut = a.truncation()?;
    if cut.max_prompt_length.is_some() {
        return Err(TrainError::msg("--max-prompt-length: pretraining text has no prompt to shorten".to_string()));
    }
    let file = |p: &Path| -> Result<Vec<Sequence>> {
        let text = read(p)?;
        let seqs: Vec<Sequence> = parse_lm(p, &text, tok, vocab)?.into_iter().map(|s| cut.full(s)).collect();
        check_file_lengths(p, &text, seqs.iter().map(|s| s.tokens.len()), model)?;
        Ok(seqs)
    };
    match a.source()? {
        Source::File(p) => Ok((file(p)?, a.eval_data.as_deref().map(file).transpose()?.unwrap_or_default())),
        Source::Builtin(n) => {
            need_vocab(TextTokenizer::Bytes, vocab)?;
            let b = builtin(seed)?;
            let train: Vec<Sequence> = b.pretrain_text(n).iter().map(|t| cut.full(text_seq(t))).collect();
            let eval: Vec<Sequence> = b.heldout_text(a.builtin_eval).iter().map(|t| cut.full(text_seq(t))).collect();
            check_builtin_lengths(train.iter().chain(&eval).map(|s| s.tokens.len()), model)?;
            Ok((train, eval))
        }
    }
}

/// SFT sequences (train, eval): prompt then completion, the completion scored;
/// `tok` for files.
pub fn sft_sequences(a: &DataArgs, model: &LlamaConfig, tok: TextTokenizer, seed: u64) -> Result<(Vec<Sequence>, Vec<Sequence>)> {
    let cut = a.truncation()?;
    let file = |p: &Path| -> Result<Vec<Sequence>> {
        need_vocab(tok, model.vocab_size)?;
        let text = read(p)?;
        let ex = jsonl::parse_sft(p, &text)?;
        let seqs = per_record(p, &text, encode_records(p, &text, &ex, |e| tok.sft(e))?, |s| cut.sft(s))?;
        check_file_lengths(p, &text, seqs.iter().map(|s| s.tokens.len()), model)?;
        Ok(seqs)
    };
    match a.source()? {
        Source::File(p) => Ok((file(p)?, a.eval_data.as_deref().map(file).transpose()?.unwrap_or_default())),
        Source::Builtin(n) => {
            need_vocab(TextTokenizer::Bytes, model.vocab_size)?;
            let b = builtin(seed)?;
            let all = b.sft(n + a.builtin_eval);
            let seqs = per_builtin(all.iter().map(|e| completion_seq(&e.prompt, &e.response)).collect(), |s| cut.sft(s))?;
            check_builtin_lengths(seqs.iter().map(|s| s.tokens.len()), model)?;
            let (train, eval) = seqs.split_at(n);
            Ok((train.to_vec(), eval.to_vec()))
        }
    }
}

/// TRL's precomputed reference log-probs (`ref_chosen_logps`, `ref_rejected_logps`)
/// of a preference file: on every line or on none (`None`).
pub fn reference_logps(path: &Path) -> Result<Option<Vec<(f32, f32)>>> {
    let text = read(path)?;
    let mut out = Vec::new();
    let mut lines = 0;
    for (i, line) in jsonl::strip_bom(&text).lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        let at = |msg: &str| TrainError::msg(format!("{}:{}: {msg}", path.display(), i + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| at(&format!("not JSON: {e}")))?;
        let field = |k: &str| v.get(k).map(|x| x.as_f64().ok_or_else(|| at(&format!("field `{k}`: not a number"))));
        match (field("ref_chosen_logps"), field("ref_rejected_logps")) {
            (Some(c), Some(r)) => out.push((c? as f32, r? as f32)),
            (None, None) if out.is_empty() => {}
            _ => return Err(at("expected both `ref_chosen_logps` and `ref_rejected_logps` (on every line or on none)")),
        }
    }
    Ok(match out.len() {
        0 => None,
        n if n == lines => Some(out),
        _ => return Err(TrainError::msg(format!("{}: some lines carry reference log-probs, others do not", path.display()))),
    })
}

/// A preference pair as TRL's collator builds it: each side truncated on its own.
fn pair(cut: &Truncation, prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> std::result::Result<PairSeqs, String> {
    let chosen = cut.completion(prompt, chosen).map_err(|e| format!("chosen: {e}"))?;
    let rejected = cut.completion(prompt, rejected).map_err(|e| format!("rejected: {e}"))?;
    Ok(PairSeqs { chosen, rejected })
}

fn pair_len(p: &PairSeqs) -> usize {
    p.chosen.tokens.len().max(p.rejected.tokens.len())
}

/// Preference pairs (train, eval); `tok` for text files.
pub fn preference_pairs(a: &DataArgs, model: &LlamaConfig, tok: TextTokenizer, seed: u64) -> Result<(Vec<PairSeqs>, Vec<PairSeqs>)> {
    let vocab = model.vocab_size;
    let cut = a.truncation()?;
    let file = |p: &Path| -> Result<Vec<PairSeqs>> {
        let text = read(p)?;
        let ids = if a.token_ids {
            jsonl::parse_preference_ids(p, &text, vocab)?
        } else {
            need_vocab(tok, vocab)?;
            let prefs = jsonl::parse_preferences(p, &text)?;
            encode_records(p, &text, &prefs, |x| tok.preference(x))?
        };
        let pairs = per_record(p, &text, ids, |x| pair(&cut, &x.prompt, &x.chosen, &x.rejected))?;
        check_file_lengths(p, &text, pairs.iter().map(pair_len), model)?;
        Ok(pairs)
    };
    match a.source()? {
        Source::File(p) => Ok((file(p)?, a.eval_data.as_deref().map(file).transpose()?.unwrap_or_default())),
        Source::Builtin(n) => {
            need_vocab(TextTokenizer::Bytes, vocab)?;
            let tok = ByteTokenizer;
            let b = builtin(seed)?;
            let conv = |v: Vec<crate::data::builtin::PreferencePair>| -> Result<Vec<PairSeqs>> {
                per_builtin(v, |p| {
                    pair(&cut, &tok.encode_prompt(&p.prompt), &tok.encode_completion(&p.chosen), &tok.encode_completion(&p.rejected))
                })
            };
            let (train, eval) = (conv(b.preferences(n))?, conv(b.heldout_preferences(a.builtin_eval))?);
            check_builtin_lengths(train.iter().chain(&eval).map(pair_len), model)?;
            Ok((train, eval))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lm_jsonl_errors_name_file_line_and_field() {
        let p = Path::new("corpus.jsonl");
        let ok = parse_lm(p, "{\"text\":\"ab\"}\n\n{\"input_ids\":[1,2,3]}\n", TextTokenizer::Bytes, 300).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].tokens, vec![ByteTokenizer::BOS, 97, 98, ByteTokenizer::EOS]);
        for (text, want) in [
            ("{\"text\":\"a\"}\n{\"text\":3}", "corpus.jsonl:2: field `text`"),
            ("{\"input_ids\":[1,400]}", "corpus.jsonl:1: field `input_ids` element 1"),
            ("{\"text\":\"a\"}\n{oops", "corpus.jsonl:2: not JSON"),
            ("{\"other\":1}", "corpus.jsonl:1: expected a field"),
            ("", "corpus.jsonl: no records"),
        ] {
            let err = parse_lm(p, text, TextTokenizer::Bytes, 300).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}");
        }
        let err = parse_lm(p, "{\"text\":\"a\"}", TextTokenizer::Bytes, 100).unwrap_err().to_string();
        assert!(err.contains("vocab_size 100"), "{err}");
    }
}
