//! Tiny models generated from a seed (2 layers, hidden 64, byte-level BPE
//! vocabulary with ChatML special tokens), written as GGUF or as a
//! HuggingFace safetensors folder. Their output is noise, but they exercise
//! every code path of the engine in seconds and need no download, so tests
//! and benchmarks use them.

use super::gguf_tokenizer::{pre_tokenizer_for, tokenizer_json};
use super::{LlmError, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// Which tiny model to generate.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    /// `"llama"` or `"qwen2"`.
    pub arch: &'static str,
    /// Weight seed.
    pub seed: u64,
    /// Store matmul weights as Q8_0 in GGUF (otherwise f32).
    pub quantized: bool,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            arch: "qwen2",
            seed: 42,
            quantized: true,
        }
    }
}

const HIDDEN: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FFN: usize = 128;
const CTX: usize = 4096;

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// GPT-2 byte → printable-unicode table used by byte-level BPE.
pub fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap_or('?');
    }
    table
}

/// The tiny vocabulary: 256 byte tokens, a few merges, three ChatML specials.
/// Returns (tokens, types, merges).
pub fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let table = byte_chars();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let sp = table[b' ' as usize];
    let pairs = [
        (format!("{sp}"), "t".to_string()),
        ("h".into(), "e".into()),
        ("i".into(), "n".into()),
        (format!("{sp}"), "a".into()),
        ("e".into(), "r".into()),
        ("o".into(), "n".into()),
        (format!("{sp}t"), "he".into()),
        ("r".into(), "e".into()),
        (format!("{sp}"), "s".into()),
        ("a".into(), "n".into()),
        ("e".into(), "d".into()),
        ("in".into(), "g".into()),
    ];
    let mut merges = Vec::new();
    for (a, b) in pairs {
        merges.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
    }
    let mut types = vec![1; tokens.len()];
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(s.to_string());
        types.push(3);
    }
    (tokens, types, merges)
}

struct Weights {
    tensors: Vec<(String, Tensor)>,
}

fn gen(arch: &str, seed: u64, vocab: usize) -> Result<Weights> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut mk = |shape: &[usize], scale: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let hd = HIDDEN / HEADS;
    let mut t = Vec::new();
    t.push(("embed".to_string(), mk(&[vocab, HIDDEN], 1.0)?));
    for i in 0..LAYERS {
        let p = |n: &str| format!("{i}.{n}");
        t.push((p("attn_norm"), mk(&[HIDDEN], 0.1)?.affine(1.0, 1.0)?));
        t.push((p("q"), mk(&[HEADS * hd, HIDDEN], 0.3)?));
        t.push((p("k"), mk(&[KV_HEADS * hd, HIDDEN], 0.3)?));
        t.push((p("v"), mk(&[KV_HEADS * hd, HIDDEN], 0.3)?));
        if arch == "qwen2" {
            t.push((p("bq"), mk(&[HEADS * hd], 0.1)?));
            t.push((p("bk"), mk(&[KV_HEADS * hd], 0.1)?));
            t.push((p("bv"), mk(&[KV_HEADS * hd], 0.1)?));
        }
        t.push((p("o"), mk(&[HIDDEN, HEADS * hd], 0.3)?));
        t.push((p("ffn_norm"), mk(&[HIDDEN], 0.1)?.affine(1.0, 1.0)?));
        t.push((p("gate"), mk(&[FFN, HIDDEN], 0.3)?));
        t.push((p("up"), mk(&[FFN, HIDDEN], 0.3)?));
        t.push((p("down"), mk(&[HIDDEN, FFN], 0.3)?));
    }
    t.push(("norm".to_string(), mk(&[HIDDEN], 0.1)?.affine(1.0, 1.0)?));
    t.push(("output".to_string(), mk(&[vocab, HIDDEN], 0.5)?));
    Ok(Weights { tensors: t })
}

fn gguf_name(n: &str) -> String {
    let map = |s: &str| match s {
        "attn_norm" => "attn_norm.weight",
        "q" => "attn_q.weight",
        "k" => "attn_k.weight",
        "v" => "attn_v.weight",
        "bq" => "attn_q.bias",
        "bk" => "attn_k.bias",
        "bv" => "attn_v.bias",
        "o" => "attn_output.weight",
        "ffn_norm" => "ffn_norm.weight",
        "gate" => "ffn_gate.weight",
        "up" => "ffn_up.weight",
        "down" => "ffn_down.weight",
        _ => "?",
    };
    match n {
        "embed" => "token_embd.weight".into(),
        "norm" => "output_norm.weight".into(),
        "output" => "output.weight".into(),
        _ => {
            let (i, s) = n.split_once('.').unwrap_or(("0", n));
            format!("blk.{i}.{}", map(s))
        }
    }
}

fn hf_name(n: &str) -> String {
    let map = |s: &str| match s {
        "attn_norm" => "input_layernorm.weight",
        "q" => "self_attn.q_proj.weight",
        "k" => "self_attn.k_proj.weight",
        "v" => "self_attn.v_proj.weight",
        "bq" => "self_attn.q_proj.bias",
        "bk" => "self_attn.k_proj.bias",
        "bv" => "self_attn.v_proj.bias",
        "o" => "self_attn.o_proj.weight",
        "ffn_norm" => "post_attention_layernorm.weight",
        "gate" => "mlp.gate_proj.weight",
        "up" => "mlp.up_proj.weight",
        "down" => "mlp.down_proj.weight",
        _ => "?",
    };
    match n {
        "embed" => "model.embed_tokens.weight".into(),
        "norm" => "model.norm.weight".into(),
        "output" => "lm_head.weight".into(),
        _ => {
            let (i, s) = n.split_once('.').unwrap_or(("0", n));
            format!("model.layers.{i}.{}", map(s))
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> LlmError + '_ {
    move |source| LlmError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Write a tiny model as a GGUF file (tokenizer and chat template in metadata).
pub fn write_tiny_gguf(path: &Path, spec: TinySpec) -> Result<()> {
    let (tokens, types, merges) = tiny_vocab();
    let w = gen(spec.arch, spec.seed, tokens.len())?;
    let a = spec.arch;
    use gguf_file::Value as V;
    let strs = |v: &[String]| V::Array(v.iter().map(|s| V::String(s.clone())).collect());
    let eos = tokens.iter().position(|t| t == "<|im_end|>").unwrap_or(0) as u32;
    let md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(a.into())),
        (
            "general.name".into(),
            V::String(format!("tiny-{a}-seed{}", spec.seed)),
        ),
        (format!("{a}.embedding_length"), V::U32(HIDDEN as u32)),
        (format!("{a}.block_count"), V::U32(LAYERS as u32)),
        (format!("{a}.attention.head_count"), V::U32(HEADS as u32)),
        (
            format!("{a}.attention.head_count_kv"),
            V::U32(KV_HEADS as u32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            V::F32(1e-6),
        ),
        (format!("{a}.rope.freq_base"), V::F32(10000.0)),
        (format!("{a}.context_length"), V::U32(CTX as u32)),
        (format!("{a}.feed_forward_length"), V::U32(FFN as u32)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), strs(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(types.iter().map(|t| V::I32(*t)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strs(&merges)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(eos)),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(eos)),
        ("tokenizer.chat_template".into(), V::String(CHATML.into())),
    ];
    let mut qs = Vec::new();
    for (n, t) in &w.tensors {
        let is_matrix = t.rank() == 2;
        let dt = if spec.quantized && is_matrix {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        };
        qs.push((gguf_name(n), QTensor::quantize(t, dt)?));
    }
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    Ok(())
}

/// Write a tiny model as a HuggingFace folder (config.json, model.safetensors,
/// tokenizer.json, tokenizer_config.json). Same weights as the GGUF of the same spec.
pub fn write_tiny_dir(dir: &Path, spec: TinySpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (tokens, types, merges) = tiny_vocab();
    let w = gen(spec.arch, spec.seed, tokens.len())?;
    let map: HashMap<String, Tensor> = w
        .tensors
        .iter()
        .map(|(n, t)| (hf_name(n), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    let cfg = serde_json::json!({
        "model_type": spec.arch, "vocab_size": tokens.len(), "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "intermediate_size": FFN, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": CTX, "tie_word_embeddings": false
    });
    let write = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).unwrap_or_default()).map_err(io(&p))
    };
    write("config.json", &cfg)?;
    let pre = pre_tokenizer_for("qwen2").unwrap_or_default();
    let tok = tokenizer_json(&tokens, &types, &merges, pre).map_err(LlmError::Tokenizer)?;
    write("tokenizer.json", &tok)?;
    write(
        "tokenizer_config.json",
        &serde_json::json!({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": null}),
    )?;
    Ok(())
}
