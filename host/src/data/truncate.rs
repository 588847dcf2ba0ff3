//! Truncation of tokenized examples as TRL 1.16 does it: `max_length` (default
//! 1024) cuts each sequence (`prompt ++ chosen` and `prompt ++ rejected`
//! separately) to its first (`keep_start`, the default) or last (`keep_end`)
//! tokens, the completion mask cut with it. `max_prompt_length` (TRL before 1.0;
//! off by default) first keeps the prompt's last tokens.
//!
//! TRL silently drops a `keep_start` example whose prompt alone fills
//! `max_length`; here it is refused and named, since dropping data changes what a
//! run trains on without saying so.

use crate::model::Sequence;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TruncationMode {
    KeepStart,
    KeepEnd,
}

impl std::str::FromStr for TruncationMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep_start" | "keep-start" => Ok(TruncationMode::KeepStart),
            "keep_end" | "keep-end" => Ok(TruncationMode::KeepEnd),
            _ => Err(format!("`{s}`: expected keep_start or keep_end")),
        }
    }
}

/// TRL's `DPOConfig.max_length` and `SFTConfig.max_length` default.
pub const DEFAULT_MAX_LENGTH: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncation {
    /// None: no truncation.
    pub max_length: Option<usize>,
    /// None: the prompt is kept whole.
    pub max_prompt_length: Option<usize>,
    pub mode: TruncationMode,
}

impl Truncation {
    pub const NONE: Truncation = Truncation { max_length: None, max_prompt_length: None, mode: TruncationMode::KeepStart };

    /// `prompt ++ completion`, only the completion scored, truncated; refused
    /// (with the reason) when no completion token would be left.
    pub fn completion(&self, prompt: &[u32], completion: &[u32]) -> Result<Sequence, String> {
        let prompt = match self.max_prompt_length {
            Some(m) if prompt.len() > m => &prompt[prompt.len() - m..],
            _ => prompt,
        };
        if let (Some(max), TruncationMode::KeepStart) = (self.max_length, self.mode)
            && prompt.len() >= max
        {
            return Err(format!(
                "the prompt alone is {} tokens, so --max-length {max} (keep_start) leaves no completion token \
                 (TRL drops such examples): shorten it, raise --max-length, or set --max-prompt-length",
                prompt.len()
            ));
        }
        let whole = prompt.len() + completion.len();
        let seq = self.cut(Sequence::completion(prompt, completion));
        if seq.scored() == 0 && seq.tokens.len() < whole {
            return Err(format!(
                "--max-length {} ({}) leaves no completion token to score",
                self.max_length.unwrap_or(whole),
                if self.mode == TruncationMode::KeepStart { "keep_start" } else { "keep_end" }
            ));
        }
        Ok(seq)
    }

    /// An SFT sequence built by a tokenizer: its prompt is the leading unscored run.
    pub fn sft(&self, seq: Sequence) -> Result<Sequence, String> {
        let prompt_len = seq.mask.iter().position(|&m| m).unwrap_or(seq.tokens.len());
        let (prompt, completion) = seq.tokens.split_at(prompt_len);
        self.completion(prompt, completion)
    }

    /// A pretraining sequence (every token after the first scored).
    pub fn full(&self, seq: Sequence) -> Sequence {
        self.cut(seq)
    }

    /// `seq` cut to `max_length` tokens; the first kept token is never scored (it
    /// has no predecessor), as in TRL, whose labels are the inputs shifted by one.
    fn cut(&self, mut seq: Sequence) -> Sequence {
        let Some(max) = self.max_length else { return seq };
        if seq.tokens.len() > max {
            let range = match self.mode {
                TruncationMode::KeepStart => 0..max,
                TruncationMode::KeepEnd => seq.tokens.len() - max..seq.tokens.len(),
            };
            seq.tokens = seq.tokens[range.clone()].to_vec();
            seq.mask = seq.mask[range].to_vec();
            seq.mask[0] = false;
        }
        seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(max_length: Option<usize>, max_prompt_length: Option<usize>, mode: TruncationMode) -> Truncation {
        Truncation { max_length, max_prompt_length, mode }
    }

    /// The cases of TRL's `DataCollatorForPreference` (prompt [1,2,3], chosen [4,5]).
    #[test]
    fn sequences_are_cut_as_trls_collator_cuts_them() {
        let (p, c) = ([1, 2, 3], [4, 5]);
        let s = t(Some(4), None, TruncationMode::KeepStart).completion(&p, &c).unwrap();
        assert_eq!((s.tokens, s.mask), (vec![1, 2, 3, 4], vec![false, false, false, true]));
        let s = t(Some(3), None, TruncationMode::KeepEnd).completion(&p, &c).unwrap();
        assert_eq!((s.tokens, s.mask), (vec![3, 4, 5], vec![false, true, true]));
        // keep_end may cut into the completion: its first kept token has no predecessor.
        let s = t(Some(2), None, TruncationMode::KeepEnd).completion(&p, &c).unwrap();
        assert_eq!((s.tokens, s.mask), (vec![4, 5], vec![false, true]));
        let err = t(Some(1), None, TruncationMode::KeepEnd).completion(&p, &c).unwrap_err();
        assert!(err.contains("leaves no completion token to score"), "{err}");
        let s = t(None, Some(2), TruncationMode::KeepStart).completion(&p, &c).unwrap();
        assert_eq!((s.tokens, s.mask), (vec![2, 3, 4, 5], vec![false, false, true, true]));
        let s = Truncation::NONE.completion(&p, &c).unwrap();
        assert_eq!(s.tokens, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_prompt_that_fills_max_length_is_refused_under_keep_start_only() {
        let err = t(Some(3), None, TruncationMode::KeepStart).completion(&[1, 2, 3], &[4]).unwrap_err();
        assert!(err.contains("the prompt alone is 3 tokens") && err.contains("--max-length 3"), "{err}");
        assert!(t(Some(3), Some(2), TruncationMode::KeepStart).completion(&[1, 2, 3], &[4]).is_ok());
        assert!(t(Some(3), None, TruncationMode::KeepEnd).completion(&[1, 2, 3], &[4]).is_ok());
    }

    #[test]
    fn sft_sequences_find_their_prompt_from_the_mask() {
        let seq = Sequence::completion(&[7, 8, 9], &[10, 11]);
        let s = t(Some(4), Some(1), TruncationMode::KeepStart).sft(seq).unwrap();
        assert_eq!((s.tokens, s.mask), (vec![9, 10, 11], vec![false, true, true]));
        let s = t(Some(2), None, TruncationMode::KeepStart).full(Sequence::full(vec![1, 2, 3]));
        assert_eq!((s.tokens, s.mask), (vec![1, 2], vec![false, true]));
    }
}
