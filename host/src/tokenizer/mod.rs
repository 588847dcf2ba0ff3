//! Tokenizers: the byte-level one of the built-in data (`byte`), a model folder's
//! own Hugging Face tokenizer (`pretrained`) and its chat template (`chat`).

pub mod byte;
pub mod chat;
pub mod pretrained;

pub use byte::ByteTokenizer;
pub use pretrained::{PretrainedTokenizer, TokenizerError};
