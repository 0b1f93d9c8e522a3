//! Rebuilds a HuggingFace tokenizer from GGUF metadata (`tokenizer.ggml.*`):
//! byte-level BPE vocabulary and merges, the family's pre-tokenizer split
//! regex (selected by `tokenizer.ggml.pre`), and the special tokens. Models
//! shipped only as GGUF (the default Qwen2.5-Coder) carry no tokenizer.json.

use super::{LlmError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Value as Json};

/// Special-token facts read from GGUF metadata.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence id.
    pub eos: Option<u32>,
    /// Whether a BOS token is prepended to prompts.
    pub add_bos: bool,
}

/// The qwen2 / Qwen2.5 pre-tokenizer split regex.
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The llama-3 pre-tokenizer split regex (`llama-bpe`).
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn md<'a>(ct: &'a Content, key: &str, path: &str) -> Result<&'a Value> {
    ct.metadata.get(key).ok_or_else(|| LlmError::BadModel {
        path: path.to_string(),
        message: format!("GGUF metadata has no `{key}` (cannot rebuild the tokenizer)"),
    })
}

fn bad(path: &str, message: String) -> LlmError {
    LlmError::BadModel {
        path: path.to_string(),
        message,
    }
}

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The pre-tokenizer JSON for a GGUF `tokenizer.ggml.pre` value.
pub fn pre_tokenizer_for(pre: &str) -> Option<Json> {
    let seq = |v: Vec<Json>| json!({"type": "Sequence", "pretokenizers": v});
    Some(match pre {
        "qwen2" | "deepseek-r1-qwen" => seq(vec![split(QWEN2_REGEX), byte_level(false)]),
        "llama-bpe" | "llama3" | "smaug-bpe" => seq(vec![split(LLAMA3_REGEX), byte_level(false)]),
        "smollm" | "starcoder" | "refact" => seq(vec![
            json!({"type": "Digits", "individual_digits": true}),
            byte_level(true),
        ]),
        "gpt2" | "default" | "gpt-2" => seq(vec![byte_level(true)]),
        _ => return None,
    })
}

/// Build the `tokenizer.json` document and special-token facts from GGUF metadata.
pub fn tokenizer_json_from_gguf(ct: &Content, path: &str) -> Result<(Json, SpecialTokens)> {
    let model = md(ct, "tokenizer.ggml.model", path)?
        .to_string()
        .map_err(|e| bad(path, e.to_string()))?;
    if model != "gpt2" {
        return Err(bad(
            path,
            format!("tokenizer model `{model}` is not supported (only byte-level BPE `gpt2`); provide a tokenizer.json"),
        ));
    }
    let pre = match ct.metadata.get("tokenizer.ggml.pre") {
        Some(v) => v.to_string().map_err(|e| bad(path, e.to_string()))?.clone(),
        None => "default".to_string(),
    };
    let pre_tok = pre_tokenizer_for(&pre).ok_or_else(|| {
        bad(
            path,
            format!("unsupported pre-tokenizer type `{pre}` in tokenizer.ggml.pre"),
        )
    })?;
    let tokens = md(ct, "tokenizer.ggml.tokens", path)?
        .to_vec()
        .map_err(|e| bad(path, e.to_string()))?;
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| bad(path, e.to_string()))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let merges = md(ct, "tokenizer.ggml.merges", path)?
        .to_vec()
        .map_err(|e| bad(path, e.to_string()))?;
    let tokens: Vec<String> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| {
            t.to_string()
                .cloned()
                .map_err(|e| bad(path, format!("token {id}: {e}")))
        })
        .collect::<Result<_>>()?;
    let merges: Vec<String> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.to_string()
                .cloned()
                .map_err(|e| bad(path, format!("merge {i}: {e}")))
        })
        .collect::<Result<_>>()?;
    let doc = tokenizer_json(&tokens, &types, &merges, pre_tok).map_err(|m| bad(path, m))?;
    let get_id = |k: &str| ct.metadata.get(k).and_then(|v| v.to_u32().ok());
    let special = SpecialTokens {
        bos: get_id("tokenizer.ggml.bos_token_id"),
        eos: get_id("tokenizer.ggml.eos_token_id"),
        add_bos: ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
    };
    Ok((doc, special))
}

/// Build a `tokenizer.json` document for a byte-level BPE vocabulary.
/// `types` follow GGUF token types (3 = control, 4 = user-defined become added tokens).
pub fn tokenizer_json(
    tokens: &[String],
    types: &[i32],
    merges: &[String],
    pre_tokenizer: Json,
) -> std::result::Result<Json, String> {
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(id));
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(json!({
                "id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3
            }));
        }
    }
    let mut merge_list = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m
            .split_once(' ')
            .ok_or_else(|| format!("merge {i} `{m}` is not `a b`"))?;
        merge_list.push(json!([a, b]));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "",
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merge_list
        }
    }))
}

/// The chat template stored in GGUF metadata, if any.
pub fn chat_template_from_gguf(ct: &Content) -> Option<String> {
    ct.metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned())
}
