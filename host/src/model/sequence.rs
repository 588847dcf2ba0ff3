//! A token sequence with its scored positions, and the checks every entry point
//! runs on the sequences it is given.

use super::config::LlamaConfig;
use super::error::ModelError;

/// A token sequence and which of its tokens are scored. `mask[t]` says token `t`
/// is a target, predicted from positions `..t`; `mask[0]` must be false since
/// nothing predicts the first token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
}

impl Sequence {
    /// Every token after the first is scored (pretraining).
    pub fn full(tokens: Vec<u32>) -> Self {
        let mask = (0..tokens.len()).map(|t| t > 0).collect();
        Self { tokens, mask }
    }

    /// `prompt ++ completion`, only the completion scored (SFT, DPO). An empty
    /// prompt scores the completion from its second token.
    pub fn completion(prompt: &[u32], completion: &[u32]) -> Self {
        let mut tokens = prompt.to_vec();
        tokens.extend_from_slice(completion);
        let mask = (0..tokens.len()).map(|t| t >= prompt.len() && t > 0).collect();
        Self { tokens, mask }
    }

    pub fn scored(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }
}

/// Every sequence non-empty, within the context, its mask as long as its tokens
/// and its first token unscored, every id inside the vocabulary.
pub(super) fn check_sequences(config: &LlamaConfig, seqs: &[Sequence]) -> Result<(), ModelError> {
    let vocab = config.vocab_size;
    for (s, seq) in seqs.iter().enumerate() {
        if seq.tokens.is_empty() {
            return Err(ModelError::BadSequence {
                sequence: s,
                reason: "no tokens".into(),
            });
        }
        if seq.tokens.len() > config.max_position_embeddings {
            return Err(ModelError::BadSequence {
                sequence: s,
                reason: format!(
                    "{} tokens exceed max_position_embeddings = {}",
                    seq.tokens.len(),
                    config.max_position_embeddings
                ),
            });
        }
        if seq.mask.len() != seq.tokens.len() {
            return Err(ModelError::BadSequence {
                sequence: s,
                reason: format!("mask has {} entries for {} tokens", seq.mask.len(), seq.tokens.len()),
            });
        }
        if seq.mask[0] {
            return Err(ModelError::BadSequence {
                sequence: s,
                reason: "the first token cannot be scored: nothing predicts it".into(),
            });
        }
        if let Some((p, &id)) = seq.tokens.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange {
                sequence: s,
                position: p,
                id,
                vocab_size: vocab,
            });
        }
    }
    Ok(())
}
