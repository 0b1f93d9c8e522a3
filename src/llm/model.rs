//! Transformer forward for the supported decoder families (llama incl.
//! SmolLM2, qwen2 incl. Qwen2.5/Qwen2.5-Coder) written for *packed ragged
//! batches*: the new tokens of many sequences are concatenated into one
//! `(T, hidden)` matrix so every weight matmul is one large GEMM, while each
//! sequence keeps its own KV cache, positions and causal mask. Prefill and
//! decode are the same call (a decode chunk has one token), which is what the
//! continuous-batching scheduler in [`super::engine`] builds on.

use super::cpu::{Int8Layer, Int8Model, Proj, RawChunk, RawKv};
use super::kernels::QMatrix;
use super::{LlmError, Result};
use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::kv_cache::KvCache;
use std::path::Path;

/// How matmul weights are held in memory and which executor runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WeightFormat {
    /// The file's quantized blocks, converted losslessly (4/5-bit values stay
    /// packed, 6/8-bit become bytes, scales keep their f16 or integer form) and
    /// run by cantante's CPU executor and int8 kernels (about the GGUF size in
    /// memory; f32/f16 files are quantized to Q8_0-style blocks). Default on CPU.
    #[default]
    Int8,
    /// Dense f32 through candle (about 4 bytes per weight).
    F32,
    /// Whatever the GGUF file stores, through candle's quantized kernels (default on CUDA).
    Native,
}

/// A weight as the file holds it: quantized blocks or a dense tensor.
enum WSrc {
    Q(candle_core::quantized::QTensor),
    T(Tensor),
}

impl WSrc {
    fn rows(&self) -> usize {
        match self {
            WSrc::Q(q) => q.shape().dims()[0],
            WSrc::T(t) => t.dims()[0],
        }
    }

    fn dense(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            WSrc::Q(q) => q.dequantize(device)?,
            WSrc::T(t) => t.clone(),
        })
    }

    fn candle(self, format: WeightFormat, device: &Device) -> Result<QMatMul> {
        Ok(match (self, format) {
            (WSrc::Q(q), WeightFormat::Native) => QMatMul::from_qtensor(q)?,
            (w, _) => QMatMul::Tensor(w.dense(device)?),
        })
    }

    fn int8(&self) -> Result<QMatrix> {
        Ok(match self {
            WSrc::Q(q) => QMatrix::from_qtensor(q)?,
            WSrc::T(t) => {
                let (r, c) = t.dims2()?;
                let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                QMatrix::quantize_f32(&v, r, c)
            }
        })
    }
}

/// One block's weights as loaded from a file, before choosing an executor.
struct RawLayer {
    attn_norm: Tensor,
    wq: WSrc,
    wk: WSrc,
    wv: WSrc,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    wo: WSrc,
    ffn_norm: Tensor,
    gate: WSrc,
    up: WSrc,
    down: WSrc,
}

/// A model's weights as loaded from a file.
struct RawModel {
    embed: WSrc,
    layers: Vec<RawLayer>,
    norm: Tensor,
    /// `None` = tied to the embedding.
    lm_head: Option<WSrc>,
}

/// Model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama / SmolLM2 (no attention biases).
    Llama,
    /// Qwen2 / Qwen2.5 (q/k/v biases).
    Qwen2,
}

/// Shape hyper-parameters of a model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Feed-forward inner size.
    pub intermediate: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Maximum context length.
    pub max_position: usize,
    /// Interleaved (GPT-J) rotary layout, as llama GGUF files use after conversion.
    pub rope_interleaved: bool,
}

impl ModelConfig {
    /// Bytes of KV cache per token (all layers, f32).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.head_dim * 4
    }

    /// Multiply-accumulate weights touched per generated token (all matmuls incl.
    /// the output head); FLOPs per token are about twice this.
    pub fn matmul_params(&self) -> usize {
        let attn = self.hidden * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
            + self.n_heads * self.head_dim * self.hidden;
        let mlp = 3 * self.hidden * self.intermediate;
        self.n_layers * (attn + mlp) + self.vocab_size * self.hidden
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// Per-sequence KV cache (one per layer) and its length.
#[derive(Clone)]
pub struct SeqKv {
    layers: Vec<KvCache>,
    raw: Vec<RawKv>,
    len: usize,
}

impl SeqKv {
    /// An empty cache for a model with `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| KvCache::new(2, 256)).collect(),
            raw: vec![RawKv::default(); n_layers],
            len: 0,
        }
    }
    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// A new cache holding a copy of the first `n` cached tokens.
    pub fn prefix(&self, n: usize) -> Result<Self> {
        let n = n.min(self.len);
        let mut out = Self::new(self.layers.len());
        if n == 0 {
            return Ok(out);
        }
        for (dst, src) in out.raw.iter_mut().zip(&self.raw) {
            let per_tok = src.k.len() / self.len;
            dst.k.extend_from_slice(&src.k[..n * per_tok]);
            dst.v.extend_from_slice(&src.v[..n * per_tok]);
        }
        for (dst, src) in out.layers.iter_mut().zip(&self.layers) {
            if let (Some(k), Some(v)) = (src.k()?, src.v()?) {
                dst.append(
                    &k.narrow(2, 0, n)?.contiguous()?,
                    &v.narrow(2, 0, n)?.contiguous()?,
                )?;
            }
        }
        out.len = n;
        Ok(out)
    }
}

/// One sequence's slice of a packed forward: its cache and its new tokens.
pub struct Chunk<'a> {
    /// The sequence's KV cache (extended by this forward).
    pub kv: &'a mut SeqKv,
    /// New tokens (the prompt remainder for prefill, one token for decode).
    pub tokens: &'a [u32],
}

/// The candle executor's weights (CUDA, `--weights f32|native`).
struct CandleWeights {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: QMatMul,
    cos: Tensor,
    sin: Tensor,
}

enum Exec {
    Candle(CandleWeights),
    Int8(Int8Model),
}

/// A loaded decoder-only transformer.
pub struct Model {
    cfg: ModelConfig,
    exec: Exec,
    device: Device,
}

fn bad(path: &str, message: impl Into<String>) -> LlmError {
    LlmError::BadModel {
        path: path.to_string(),
        message: message.into(),
    }
}

fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1f32 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / cfg.head_dim as f32))
        .collect();
    let n = cfg.max_position;
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, n as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?;
    let freqs = pos.matmul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

impl Model {
    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Load from a parsed GGUF file, holding matmul weights in `format`.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        path: &str,
        device: &Device,
        format: WeightFormat,
    ) -> Result<Self> {
        let arch_name = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| bad(path, "GGUF metadata has no general.architecture"))?;
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(bad(
                    path,
                    format!("unsupported architecture `{other}` (supported: llama, qwen2)"),
                ))
            }
        };
        let get = |k: &str| -> Result<&gguf_file::Value> {
            ct.metadata
                .get(&format!("{arch_name}.{k}"))
                .ok_or_else(|| bad(path, format!("GGUF metadata has no `{arch_name}.{k}`")))
        };
        let u = |k: &str| -> Result<usize> {
            get(k)?
                .to_u32()
                .map(|v| v as usize)
                .map_err(|e| bad(path, format!("{k}: {e}")))
        };
        let hidden = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = u("attention.head_count_kv").unwrap_or(n_heads);
        let rms_eps = get("attention.layer_norm_rms_epsilon")?
            .to_f32()
            .map_err(|e| bad(path, e.to_string()))? as f64;
        let rope_theta = get("rope.freq_base")
            .and_then(|v| v.to_f32().map_err(|e| bad(path, e.to_string())))
            .unwrap_or(10000.0) as f64;
        let head_dim = u("attention.key_length").unwrap_or(hidden / n_heads);
        let mut load = |name: &str| -> Result<candle_core::quantized::QTensor> {
            ct.tensor(reader, name, device)
                .map_err(|e| bad(path, format!("tensor `{name}`: {e}")))
        };
        let embed = load("token_embd.weight")?;
        let vocab_size = embed.shape().dims()[0];
        let n_layers = u("block_count")?;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let p = format!("blk.{i}");
            let (mut bq, mut bk, mut bv) = (None, None, None);
            if arch == Arch::Qwen2 {
                bq = Some(load(&format!("{p}.attn_q.bias"))?.dequantize(device)?);
                bk = Some(load(&format!("{p}.attn_k.bias"))?.dequantize(device)?);
                bv = Some(load(&format!("{p}.attn_v.bias"))?.dequantize(device)?);
            }
            let mut w =
                |n: &str| -> Result<WSrc> { Ok(WSrc::Q(load(&format!("{p}.{n}.weight"))?)) };
            layers.push(RawLayer {
                wq: w("attn_q")?,
                wk: w("attn_k")?,
                wv: w("attn_v")?,
                wo: w("attn_output")?,
                gate: w("ffn_gate")?,
                up: w("ffn_up")?,
                down: w("ffn_down")?,
                bq,
                bk,
                bv,
                attn_norm: load(&format!("{p}.attn_norm.weight"))?.dequantize(device)?,
                ffn_norm: load(&format!("{p}.ffn_norm.weight"))?.dequantize(device)?,
            });
        }
        let norm = load("output_norm.weight")?.dequantize(device)?;
        let lm_head = if ct.tensor_infos.contains_key("output.weight") {
            Some(WSrc::Q(load("output.weight")?))
        } else {
            None
        };
        let max_position = u("context_length").unwrap_or(4096).min(32768);
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            intermediate: layers.first().map(|l| l.up.rows()).unwrap_or(0),
            rms_eps,
            rope_theta,
            max_position,
            rope_interleaved: arch == Arch::Llama,
        };
        let raw = RawModel {
            embed: WSrc::Q(embed),
            layers,
            norm,
            lm_head,
        };
        Self::build(cfg, raw, format, device).map_err(|e| bad(path, e.to_string()))
    }

    /// Load from a HuggingFace folder (`config.json` + `*.safetensors`).
    pub fn from_safetensors_dir(dir: &Path, device: &Device, format: WeightFormat) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| LlmError::Io {
            path: cfg_path.display().to_string(),
            source,
        })?;
        let p = cfg_path.display().to_string();
        let j: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&p, e.to_string()))?;
        let arch = match j["model_type"].as_str().unwrap_or("") {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(bad(
                    &p,
                    format!("unsupported model_type `{other}` (supported: llama, qwen2)"),
                ))
            }
        };
        let num = |k: &str| -> Result<usize> {
            j[k].as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| bad(&p, format!("missing or invalid field `{k}`")))
        };
        let hidden = num("hidden_size")?;
        let n_heads = num("num_attention_heads")?;
        let cfg = ModelConfig {
            arch,
            vocab_size: num("vocab_size")?,
            hidden,
            n_layers: num("num_hidden_layers")?,
            n_heads,
            n_kv_heads: num("num_key_value_heads").unwrap_or(n_heads),
            head_dim: num("head_dim").unwrap_or(hidden / n_heads),
            intermediate: num("intermediate_size")?,
            rms_eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta: j["rope_theta"].as_f64().unwrap_or(10000.0),
            max_position: num("max_position_embeddings").unwrap_or(4096).min(32768),
            rope_interleaved: false,
        };
        let tied = j["tie_word_embeddings"].as_bool().unwrap_or(false);
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|source| LlmError::Io {
                path: dir.display().to_string(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(bad(
                &dir.display().to_string(),
                "no *.safetensors file in the folder",
            ));
        }
        let mut tensors = std::collections::HashMap::new();
        for f in &files {
            let loaded = candle_core::safetensors::load(f, device)
                .map_err(|e| bad(&f.display().to_string(), e.to_string()))?;
            tensors.extend(loaded);
        }
        let dpath = dir.display().to_string();
        let mut get = |name: &str| -> Result<Tensor> {
            tensors
                .remove(name)
                .ok_or_else(|| bad(&dpath, format!("missing tensor `{name}`")))
                .and_then(|t| Ok(t.to_dtype(DType::F32)?))
        };
        let embed = get("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let mut bias = |n: &str| -> Result<Option<Tensor>> {
                if arch == Arch::Qwen2 {
                    Ok(Some(get(&format!("{p}.self_attn.{n}.bias"))?))
                } else {
                    Ok(None)
                }
            };
            let (bq, bk, bv) = (bias("q_proj")?, bias("k_proj")?, bias("v_proj")?);
            let mut w = |n: &str| -> Result<WSrc> { Ok(WSrc::T(get(&format!("{p}.{n}.weight"))?)) };
            layers.push(RawLayer {
                wq: w("self_attn.q_proj")?,
                wk: w("self_attn.k_proj")?,
                wv: w("self_attn.v_proj")?,
                wo: w("self_attn.o_proj")?,
                gate: w("mlp.gate_proj")?,
                up: w("mlp.up_proj")?,
                down: w("mlp.down_proj")?,
                bq,
                bk,
                bv,
                attn_norm: get(&format!("{p}.input_layernorm.weight"))?,
                ffn_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
            });
        }
        let norm = get("model.norm.weight")?;
        let lm_head = match get("lm_head.weight") {
            Ok(t) => Some(WSrc::T(t)),
            Err(e) if !tied => return Err(e),
            Err(_) => None,
        };
        let raw = RawModel {
            embed: WSrc::T(embed),
            layers,
            norm,
            lm_head,
        };
        Self::build(cfg, raw, format, device).map_err(|e| bad(&dpath, e.to_string()))
    }

    /// Choose the executor and hold the weights in its format.
    fn build(
        cfg: ModelConfig,
        raw: RawModel,
        format: WeightFormat,
        device: &Device,
    ) -> Result<Self> {
        let exec = if format == WeightFormat::Int8 {
            if !device.is_cpu() {
                return Err(LlmError::Other(
                    "--weights int8 runs on the CPU executor only; use --weights native or f32 with --cuda".into(),
                ));
            }
            let vec = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
            };
            let mut layers = Vec::with_capacity(raw.layers.len());
            for l in raw.layers {
                let qkv_bias = match (&l.bq, &l.bk, &l.bv) {
                    (Some(q), Some(k), Some(v)) => Some([vec(q)?, vec(k)?, vec(v)?].concat()),
                    _ => None,
                };
                layers.push(Int8Layer {
                    attn_norm: vec(&l.attn_norm)?,
                    qkv: Proj::fuse(vec![l.wq.int8()?, l.wk.int8()?, l.wv.int8()?]),
                    qkv_bias,
                    wo: Proj::fuse(vec![l.wo.int8()?]),
                    ffn_norm: vec(&l.ffn_norm)?,
                    gate_up: Proj::fuse(vec![l.gate.int8()?, l.up.int8()?]),
                    down: Proj::fuse(vec![l.down.int8()?]),
                });
            }
            let lm_head = raw.lm_head.as_ref().map(WSrc::int8).transpose()?;
            Exec::Int8(Int8Model::new(
                &cfg,
                layers,
                raw.embed.int8()?,
                vec(&raw.norm)?,
                lm_head,
            ))
        } else {
            let embed = raw.embed.dense(device)?;
            let lm_head = match raw.lm_head {
                Some(w) => w.candle(format, device)?,
                None => raw.embed.candle(format, device)?,
            };
            let mut layers = Vec::with_capacity(raw.layers.len());
            for l in raw.layers {
                layers.push(Layer {
                    attn_norm: l.attn_norm,
                    wq: l.wq.candle(format, device)?,
                    wk: l.wk.candle(format, device)?,
                    wv: l.wv.candle(format, device)?,
                    bq: l.bq,
                    bk: l.bk,
                    bv: l.bv,
                    wo: l.wo.candle(format, device)?,
                    ffn_norm: l.ffn_norm,
                    gate: l.gate.candle(format, device)?,
                    up: l.up.candle(format, device)?,
                    down: l.down.candle(format, device)?,
                });
            }
            let (cos, sin) = rope_tables(&cfg, device)?;
            Exec::Candle(CandleWeights {
                embed,
                layers,
                norm: raw.norm,
                lm_head,
                cos,
                sin,
            })
        };
        Ok(Self {
            cfg,
            exec,
            device: device.clone(),
        })
    }

    /// Bytes of matmul weights the int8 executor reads per forward (`None` for candle).
    pub fn int8_weight_bytes(&self) -> Option<usize> {
        match &self.exec {
            Exec::Candle(_) => None,
            Exec::Int8(m) => Some(m.streamed_weight_bytes()),
        }
    }

    /// Run the int8 executor on another kernel tier (no effect on candle or on a
    /// tier this CPU lacks); every tier gives the same bits.
    pub fn set_kernel_tier(&mut self, tier: super::kernels::Tier) {
        if let Exec::Int8(m) = &mut self.exec {
            m.set_tier(tier);
        }
    }

    /// Whether a sequence's logits are bit for bit the same however its tokens
    /// are split into forwards and whatever else is in the batch (true for the
    /// int8 kernels; candle's matmuls may change reduction order with shape).
    pub fn batch_invariant(&self) -> bool {
        matches!(self.exec, Exec::Int8(_))
    }

    /// The executor in use, for logs and benchmarks (e.g. `int8 kernels (avx2)`).
    pub fn executor(&self) -> String {
        match &self.exec {
            Exec::Candle(_) => "candle".into(),
            Exec::Int8(m) => format!("int8 kernels ({})", m.tier().name()),
        }
    }

    /// Packed forward over several sequences. Appends each chunk's tokens to its
    /// cache and returns the logits of each chunk's last token, shape `(chunks, vocab)`.
    pub fn forward(&self, chunks: &mut [Chunk<'_>]) -> Result<Vec<Vec<f32>>> {
        for c in chunks.iter() {
            if c.tokens.is_empty() {
                return Err(LlmError::Other("empty chunk in forward".into()));
            }
            if c.kv.len + c.tokens.len() > self.cfg.max_position {
                return Err(LlmError::Other(format!(
                    "sequence of {} tokens exceeds the model context of {}",
                    c.kv.len + c.tokens.len(),
                    self.cfg.max_position
                )));
            }
        }
        let w = match &self.exec {
            Exec::Candle(w) => w,
            Exec::Int8(m) => {
                let mut raw: Vec<RawChunk> = chunks
                    .iter_mut()
                    .map(|c| RawChunk {
                        past: c.kv.len,
                        kv: &mut c.kv.raw,
                        tokens: c.tokens,
                    })
                    .collect();
                let logits = m.forward(&self.cfg, &mut raw);
                for c in chunks.iter_mut() {
                    c.kv.len += c.tokens.len();
                }
                return Ok(logits);
            }
        };
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let groups = nh / nkv;
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut last = Vec::with_capacity(chunks.len());
        for c in chunks.iter() {
            ids.extend_from_slice(c.tokens);
            pos.extend((c.kv.len..c.kv.len + c.tokens.len()).map(|p| p as u32));
            last.push((ids.len() - 1) as u32);
        }
        let t = ids.len();
        let dev = &self.device;
        let ids_t = Tensor::from_vec(ids, t, dev)?;
        let pos_t = Tensor::from_vec(pos, t, dev)?;
        let cos = w.cos.index_select(&pos_t, 0)?.contiguous()?;
        let sin = w.sin.index_select(&pos_t, 0)?.contiguous()?;
        let mut x = w.embed.index_select(&ids_t, 0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // causal masks per distinct (len, total) pair
        let mut masks: std::collections::HashMap<(usize, usize), Tensor> = Default::default();
        for (li, layer) in w.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps as f32)?;
            let mut q = layer.wq.forward(&h)?;
            let mut k = layer.wk.forward(&h)?;
            let mut v = layer.wv.forward(&h)?;
            if let (Some(bq), Some(bk), Some(bv)) = (&layer.bq, &layer.bk, &layer.bv) {
                q = q.broadcast_add(bq)?;
                k = k.broadcast_add(bk)?;
                v = v.broadcast_add(bv)?;
            }
            let to_heads = |x: Tensor, n: usize| -> Result<Tensor> {
                Ok(x.reshape((t, n, hd))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)?)
            };
            let q = to_heads(q, nh)?;
            let k = to_heads(k, nkv)?;
            let v = to_heads(v, nkv)?;
            let (q, k) = if cfg.rope_interleaved {
                (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                )
            } else {
                (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                )
            };
            let mut outs = Vec::with_capacity(chunks.len());
            let mut off = 0;
            for c in chunks.iter_mut() {
                let l = c.tokens.len();
                let qi = q.narrow(2, off, l)?;
                let ki = k.narrow(2, off, l)?.contiguous()?;
                let vi = v.narrow(2, off, l)?.contiguous()?;
                off += l;
                let cache = &mut c.kv.layers[li];
                let (kf, vf) = cache.append(&ki, &vi)?;
                let s = kf.dim(2)?;
                let kf = kf.squeeze(0)?.contiguous()?; // (nkv, s, hd)
                let vf = vf.squeeze(0)?.contiguous()?;
                let qg = qi.reshape((nkv, groups * l, hd))?;
                let mut att = (qg.matmul(&kf.t()?)? * scale)?; // (nkv, g*l, s)
                if l > 1 {
                    let mask = match masks.get(&(l, s)) {
                        Some(m) => m.clone(),
                        None => {
                            let past = s - l;
                            let m: Vec<f32> = (0..l)
                                .flat_map(|i| {
                                    (0..s).map(move |j| {
                                        if j <= past + i {
                                            0.0
                                        } else {
                                            f32::NEG_INFINITY
                                        }
                                    })
                                })
                                .collect();
                            let m = Tensor::from_vec(m, (l, s), dev)?;
                            masks.insert((l, s), m.clone());
                            m
                        }
                    };
                    att = att
                        .reshape((nkv, groups, l, s))?
                        .broadcast_add(&mask)?
                        .reshape((nkv, groups * l, s))?;
                }
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let y = att.matmul(&vf)?; // (nkv, g*l, hd)
                let y = y
                    .reshape((nh, l, hd))?
                    .transpose(0, 1)?
                    .reshape((l, nh * hd))?;
                outs.push(y);
            }
            let y = if outs.len() == 1 {
                outs.swap_remove(0)
            } else {
                Tensor::cat(&outs, 0)?
            };
            let x1 = (&x + layer.wo.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, cfg.rms_eps as f32)?;
            let g = candle_nn::ops::silu(&layer.gate.forward(&h)?)?;
            let m = layer.down.forward(&(g * layer.up.forward(&h)?)?)?;
            x = (x1 + m)?;
        }
        for c in chunks.iter_mut() {
            c.kv.len += c.tokens.len();
        }
        let last_t = Tensor::from_vec(last, chunks.len(), dev)?;
        let xl = x.index_select(&last_t, 0)?;
        let xl = candle_nn::ops::rms_norm(&xl, &w.norm, cfg.rms_eps as f32)?;
        let logits = w.lm_head.forward(&xl)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }
}
