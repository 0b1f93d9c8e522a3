//! Tokenizer wrapper: loads a HuggingFace `tokenizer.json` (or one rebuilt from
//! GGUF metadata by [`super::gguf_tokenizer`]) and exposes exact encode/decode,
//! token counting and token-boundary truncation for budgets and field caps.

use super::{LlmError, Result};
use std::path::Path;

/// A text tokenizer with the model's special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab={})", self.vocab_size())
    }
}

fn tok_err(e: impl std::fmt::Display) -> LlmError {
    LlmError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Load a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| LlmError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|e| LlmError::BadModel {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Build from the text of a `tokenizer.json`.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(tok_err)?;
        Ok(Self { inner })
    }

    /// Encode text; special-token markup in the text (e.g. `<|im_start|>`) is recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids to text, keeping special tokens out of the output when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tok_err)
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Number of tokens of `text` (0 on tokenizer failure, which cannot happen for valid UTF-8).
    pub fn count(&self, text: &str) -> usize {
        self.encode(text).map(|v| v.len()).unwrap_or(0)
    }

    /// Longest prefix of `text` that encodes to at most `max_tokens` tokens, cut at a
    /// token boundary (offsets from the encoding, so no partial characters).
    pub fn truncate(&self, text: &str, max_tokens: usize) -> String {
        let Ok(enc) = self.inner.encode(text, false) else {
            return text.to_string();
        };
        if enc.len() <= max_tokens {
            return text.to_string();
        }
        if max_tokens == 0 {
            return String::new();
        }
        let offsets = enc.get_offsets();
        let end = offsets[max_tokens - 1].1.min(text.len());
        let mut end = end;
        while end > 0 && !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_string()
    }
}
