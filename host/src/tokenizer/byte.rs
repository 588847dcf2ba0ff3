//! The byte-level tokenizer of the built-in data and of model folders without a
//! `tokenizer.json`: ids 0..=255 are the UTF-8 bytes, then three special tokens.
//! Any text round-trips, and no vocabulary file is needed.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const BOS: u32 = 256;
    pub const EOS: u32 = 257;
    pub const PAD: u32 = 258;
    pub const VOCAB_SIZE: usize = 259;

    /// The UTF-8 bytes of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// Decodes byte ids; special tokens are skipped, invalid UTF-8 (a completion
    /// cut mid-character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// `[BOS] ++ bytes(prompt)`: every prompt starts with BOS so that even an empty
    /// prompt gives the first completion token something to be predicted from.
    pub fn encode_prompt(&self, prompt: &str) -> Vec<u32> {
        let mut ids = vec![Self::BOS];
        ids.extend(prompt.bytes().map(u32::from));
        ids
    }

    /// `bytes(completion) ++ [EOS]`: the model learns where to stop.
    pub fn encode_completion(&self, completion: &str) -> Vec<u32> {
        let mut ids = self.encode(completion);
        ids.push(Self::EOS);
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_specials() {
        let t = ByteTokenizer;
        let s = "héllo, 世界\n";
        let ids = t.encode(s);
        assert_eq!(ids.len(), s.len());
        assert!(ids.iter().all(|&i| i < 256));
        assert_eq!(t.decode(&ids), s);
        let p = t.encode_prompt("ab");
        assert_eq!(p, vec![256, 97, 98]);
        let c = t.encode_completion("c");
        assert_eq!(c, vec![99, 257]);
        assert_eq!(t.decode(&[p, c].concat()), "abc");
        // a cut multi-byte character is replaced, not a panic
        assert_eq!(t.decode(&ids[..2]), "h\u{FFFD}");
    }
}
