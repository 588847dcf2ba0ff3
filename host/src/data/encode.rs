//! Records become token ids: with the byte-level tokenizer (the built-in data, and
//! model folders without a tokenizer), or with the model folder's own tokenizer
//! and chat template exactly as TRL 1.16 tokenizes them (`DPOTrainer`,
//! `SFTTrainer`): string completions get the EOS token appended when they do not
//! end with it; a prompt is tokenized alone (conversations with
//! `add_generation_prompt=True`) and the completion is what prompt + completion
//! tokenizes to after the longest prefix the two share.

use super::jsonl::{Content, Preference, PreferenceIds, SftExample};
use crate::model::Sequence;
use crate::tokenizer::{ByteTokenizer, PretrainedTokenizer};

/// The tokenizer text data goes through.
#[derive(Clone, Copy, Debug)]
pub enum TextTokenizer<'a> {
    Bytes,
    Pretrained(&'a PretrainedTokenizer),
}

impl TextTokenizer<'_> {
    /// Every id this tokenizer can produce is below this.
    pub fn vocab_size(&self) -> usize {
        match self {
            TextTokenizer::Bytes => ByteTokenizer::VOCAB_SIZE,
            TextTokenizer::Pretrained(t) => t.vocab_size(),
        }
    }

    /// `BOS prompt` / `chosen EOS` / `rejected EOS` with the byte tokenizer;
    /// TRL's `DPOTrainer` tokenization with a model's own.
    pub fn preference(&self, p: &Preference) -> Result<PreferenceIds, String> {
        let t = match self {
            TextTokenizer::Bytes => {
                let tok = ByteTokenizer;
                return Ok(PreferenceIds {
                    prompt: tok.encode_prompt(&p.prompt.byte_text(true)),
                    chosen: tok.encode_completion(&p.chosen.byte_text(false)),
                    rejected: tok.encode_completion(&p.rejected.byte_text(false)),
                });
            }
            TextTokenizer::Pretrained(t) => t,
        };
        let (prompt, with_chosen, with_rejected) = match (&p.prompt, &p.chosen, &p.rejected) {
            (Content::Conversation(prompt), Content::Conversation(chosen), Content::Conversation(rejected)) => (
                t.encode_chat(prompt, true)?,
                t.encode_chat(&[prompt.as_slice(), chosen].concat(), false)?,
                t.encode_chat(&[prompt.as_slice(), rejected].concat(), false)?,
            ),
            (Content::Text(prompt), Content::Text(chosen), Content::Text(rejected)) => {
                let eos = eos_token(t)?;
                (
                    t.encode(prompt, true)?,
                    t.encode(&format!("{prompt}{}", with_eos(chosen, eos)), true)?,
                    t.encode(&format!("{prompt}{}", with_eos(rejected, eos)), true)?,
                )
            }
            _ => return Err(MIXED.into()),
        };
        let shared = common_prefix(&prompt, &with_chosen).min(common_prefix(&prompt, &with_rejected));
        Ok(PreferenceIds {
            prompt: prompt[..shared].to_vec(),
            chosen: with_chosen[shared..].to_vec(),
            rejected: with_rejected[shared..].to_vec(),
        })
    }

    /// One SFT sequence: the byte tokenizer's `BOS prompt completion EOS`, or TRL's
    /// `SFTTrainer` tokenization; only completions are scored, `text` and
    /// `messages` entirely.
    pub fn sft(&self, e: &SftExample) -> Result<Sequence, String> {
        let t = match self {
            TextTokenizer::Bytes => {
                let tok = ByteTokenizer;
                let (prompt, completion) = match e {
                    SftExample::Text(text) => (String::new(), text.clone()),
                    SftExample::PromptCompletion { prompt, completion } => (prompt.byte_text(true), completion.byte_text(false)),
                    SftExample::Messages(_) => {
                        return Err("a `messages` conversation needs the model's own tokenizer and chat template \
                                    (tokenizer.json in the model folder)"
                            .into());
                    }
                };
                return Ok(Sequence::completion(&tok.encode_prompt(&prompt), &tok.encode_completion(&completion)));
            }
            TextTokenizer::Pretrained(t) => t,
        };
        let (prompt, whole) = match e {
            SftExample::Text(text) => return Ok(Sequence::full(t.encode(&with_eos(text, eos_token(t)?), true)?)),
            SftExample::Messages(messages) => return Ok(Sequence::full(t.encode_chat(messages, false)?)),
            SftExample::PromptCompletion { prompt: Content::Conversation(prompt), completion: Content::Conversation(completion) } => {
                (t.encode_chat(prompt, true)?, t.encode_chat(&[prompt.as_slice(), completion].concat(), false)?)
            }
            SftExample::PromptCompletion { prompt: Content::Text(prompt), completion: Content::Text(completion) } => {
                let eos = eos_token(t)?;
                (t.encode(prompt, true)?, t.encode(&format!("{prompt}{}", with_eos(completion, eos)), true)?)
            }
            SftExample::PromptCompletion { .. } => return Err(MIXED.into()),
        };
        let shared = common_prefix(&prompt, &whole);
        Ok(Sequence::completion(&whole[..shared], &whole[shared..]))
    }

    /// A pretraining text: `BOS text EOS` with the byte tokenizer; with a model's
    /// own, `tokenizer(text + eos_token)` as TRL's `SFTTrainer` reads `{"text"}`.
    pub fn text(&self, text: &str) -> Result<Sequence, String> {
        self.sft(&SftExample::Text(text.to_string()))
    }
}

/// What `jsonl` refuses when it parses; a record built in code may still mix them.
const MIXED: &str = "a record that mixes strings and conversations (TRL reads one form per record)";

fn eos_token(t: &PretrainedTokenizer) -> Result<&str, String> {
    t.special_token("eos_token")
        .ok_or_else(|| "the tokenizer has no `eos_token` (tokenizer_config.json), which TRL appends to string completions".into())
}

fn with_eos(text: &str, eos: &str) -> String {
    if text.ends_with(eos) { text.to_string() } else { format!("{text}{eos}") }
}

/// TRL's `common_prefix_length`: a template may render the prompt alone
/// differently than followed by an answer, and tokens may merge across the
/// boundary; the completion starts where the two tokenizations part.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
