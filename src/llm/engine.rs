//! The in-process Candle engine: loads a model (GGUF file, safetensors folder,
//! or a hub id when online), renders chat templates, and serves batched
//! [`Llm::generate`] calls with continuous batching over a packed ragged
//! forward, per-sequence KV caches under a memory bound, reuse of shared
//! prompt prefixes, and per-request seeded sampling.

use super::chat::{ChatTemplate, CHATML_TEMPLATE};
use super::gguf_tokenizer;
use super::grammar;
use super::guard::{Action, TagGuard};
use super::model::{Chunk, Model, SeqKv, WeightFormat};
use super::profile::{time, Phase};
use super::sampling;
use super::tokenizer::Tokenizer;
pub use super::EngineStats;
use super::{
    ChoiceRequest, ChoiceScores, Generation, Llm, LlmError, Next, NextTokenRequest, NextTokens,
    Request, RequestQueue, Result, StopReason, TokenLogprob,
};
use candle_core::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Run on CUDA device 0 (needs the `cuda` feature).
    pub cuda: bool,
    /// How matmul weights are held (`None` = int8 kernels on CPU, the file's own format on GPU).
    pub weights: Option<WeightFormat>,
    /// Maximum sequences decoded together.
    pub max_batch: usize,
    /// Memory bound for KV caches of running sequences, in bytes.
    pub kv_budget_bytes: usize,
    /// Maximum tokens in one packed forward (chunked prefill beyond that).
    pub max_step_tokens: usize,
    /// Reuse the KV cache of prompt prefixes shared by several requests.
    pub prefix_reuse: bool,
    /// Minimum shared prefix length (tokens) worth reusing.
    pub min_prefix_tokens: usize,
    /// Number of cached prefixes kept between calls.
    pub prefix_cache_entries: usize,
    /// Memory bound of the cached prefixes' KV, in bytes.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            cuda: false,
            weights: None,
            max_batch: 32,
            kv_budget_bytes: 4 << 30,
            max_step_tokens: 2048,
            prefix_reuse: true,
            min_prefix_tokens: 16,
            prefix_cache_entries: 256,
            prefix_cache_bytes: 2 << 30,
        }
    }
}

struct PrefixEntry {
    tokens: Vec<u32>,
    kv: SeqKv,
    /// Logical time of the last insertion or use (least recently used goes first).
    last_used: u64,
}

/// A model served in-process through Candle.
pub struct CandleLlm {
    model: Model,
    tokenizer: Tokenizer,
    chat: ChatTemplate,
    eos: Vec<u32>,
    opts: EngineOptions,
    id: String,
    stats: Mutex<EngineStats>,
    prefixes: Mutex<Vec<PrefixEntry>>,
    clock: std::sync::atomic::AtomicU64,
    /// Grammar compiler for this tokenizer, built on the first request with
    /// a grammar (its error, if the tokenizer cannot be mapped to bytes).
    grammars: std::sync::OnceLock<std::result::Result<grammar::Compiler, String>>,
}

fn io_err(path: &Path, source: std::io::Error) -> LlmError {
    LlmError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Verify `file` against a sibling `<file>.sha256` (first hex word) when present.
pub fn verify_sidecar_checksum(file: &Path) -> Result<()> {
    let side = PathBuf::from(format!("{}.sha256", file.display()));
    let Ok(expected) = std::fs::read_to_string(&side) else {
        return Ok(());
    };
    let expected = expected
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_lowercase();
    let mut f = std::fs::File::open(file).map_err(|e| io_err(file, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| io_err(file, e))?;
    let got = hex::encode(h.finalize());
    if got != expected {
        return Err(LlmError::BadModel {
            path: file.display().to_string(),
            message: format!(
                "sha256 mismatch: expected {expected} (from {}), got {got}",
                side.display()
            ),
        });
    }
    Ok(())
}

fn device(opts: &EngineOptions) -> Result<Device> {
    if opts.cuda {
        #[cfg(feature = "cuda")]
        {
            return Ok(Device::new_cuda(0)?);
        }
        #[cfg(not(feature = "cuda"))]
        return Err(LlmError::Other(
            "CUDA requested but cantante was built without the `cuda` feature".into(),
        ));
    }
    Ok(Device::Cpu)
}

impl CandleLlm {
    /// Load a model from a GGUF file, a HuggingFace folder, or (with the `hub`
    /// feature, online) a hub repository id such as `Qwen/Qwen2.5-0.5B-Instruct`.
    pub fn load(spec: &str, opts: EngineOptions) -> Result<Self> {
        let path = PathBuf::from(spec);
        if path.is_file() {
            return Self::load_gguf(&path, opts);
        }
        if path.is_dir() {
            return Self::load_dir(&path, opts);
        }
        #[cfg(feature = "hub")]
        if spec.contains('/') && !spec.starts_with('.') && !spec.starts_with('/') {
            let dir = hub_download(spec)?;
            return Self::load_dir(&dir, opts);
        }
        Err(LlmError::Io {
            path: spec.to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such model file or folder (run models/fetch.sh for the default models)",
            ),
        })
    }

    /// Load a GGUF file (quantized weights, tokenizer and chat template from metadata).
    pub fn load_gguf(path: &Path, opts: EngineOptions) -> Result<Self> {
        let p = path.display().to_string();
        verify_sidecar_checksum(path)?;
        let mut file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        let ct = candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| {
            LlmError::BadModel {
                path: p.clone(),
                message: format!("not a readable GGUF file: {e}"),
            }
        })?;
        let dev = device(&opts)?;
        let format = opts.weights.unwrap_or(if dev.is_cpu() {
            WeightFormat::Int8
        } else {
            WeightFormat::Native
        });
        let model = Model::from_gguf(&ct, &mut file, &p, &dev, format)?;
        let sibling = path.with_file_name("tokenizer.json");
        let (tokenizer, special) = if sibling.is_file() {
            (
                Tokenizer::from_file(&sibling)?,
                gguf_tokenizer::tokenizer_json_from_gguf(&ct, &p)
                    .map(|x| x.1)
                    .unwrap_or_default(),
            )
        } else {
            let (json, special) = gguf_tokenizer::tokenizer_json_from_gguf(&ct, &p)?;
            (Tokenizer::from_json_str(&json.to_string())?, special)
        };
        let template = gguf_tokenizer::chat_template_from_gguf(&ct);
        let name = ct
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| {
                path.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        Self::assemble(
            model,
            tokenizer,
            template,
            special.eos,
            special.bos,
            opts,
            format!("{name} ({})", file_tag(path)),
        )
    }

    /// Load a HuggingFace folder: config.json, *.safetensors, tokenizer.json
    /// and (for the chat template) tokenizer_config.json.
    pub fn load_dir(dir: &Path, opts: EngineOptions) -> Result<Self> {
        let dev = device(&opts)?;
        let format = opts.weights.unwrap_or(if dev.is_cpu() {
            WeightFormat::Int8
        } else {
            WeightFormat::Native
        });
        let model = Model::from_safetensors_dir(dir, &dev, format)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let tc_path = dir.join("tokenizer_config.json");
        let mut template = None;
        let mut eos = None;
        let mut bos = None;
        if let Ok(text) = std::fs::read_to_string(&tc_path) {
            let j: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LlmError::BadModel {
                    path: tc_path.display().to_string(),
                    message: e.to_string(),
                })?;
            template = j["chat_template"].as_str().map(String::from);
            let tok_of = |k: &str| -> Option<u32> {
                let v = &j[k];
                let s = v.as_str().or_else(|| v["content"].as_str())?;
                tokenizer.token_to_id(s)
            };
            eos = tok_of("eos_token");
            bos = tok_of("bos_token");
        }
        Self::assemble(
            model,
            tokenizer,
            template,
            eos,
            bos,
            opts,
            dir.display().to_string(),
        )
    }

    fn assemble(
        model: Model,
        tokenizer: Tokenizer,
        template: Option<String>,
        eos: Option<u32>,
        bos: Option<u32>,
        opts: EngineOptions,
        id: String,
    ) -> Result<Self> {
        let tok_str = |id: Option<u32>| {
            id.and_then(|i| tokenizer.decode(&[i], false).ok())
                .unwrap_or_default()
        };
        let chat = ChatTemplate::new(
            template.as_deref().unwrap_or(CHATML_TEMPLATE),
            &tok_str(bos),
            &tok_str(eos),
        )?;
        let mut eos_ids: Vec<u32> = eos.into_iter().collect();
        for s in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"] {
            if let Some(i) = tokenizer.token_to_id(s) {
                if !eos_ids.contains(&i) {
                    eos_ids.push(i);
                }
            }
        }
        Ok(Self {
            model,
            tokenizer,
            chat,
            eos: eos_ids,
            opts,
            id,
            stats: Mutex::new(EngineStats::default()),
            prefixes: Mutex::new(Vec::new()),
            clock: std::sync::atomic::AtomicU64::new(0),
            grammars: std::sync::OnceLock::new(),
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model, mutably (e.g. to pick a kernel tier).
    pub fn model_mut(&mut self) -> &mut Model {
        &mut self.model
    }

    /// Engine options in force.
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// Change the batch limit (e.g. 1 to measure sequential decoding).
    pub fn set_max_batch(&mut self, n: usize) {
        self.opts.max_batch = n.max(1);
    }

    /// Enable or disable prefix reuse (clears the prefix cache).
    pub fn set_prefix_reuse(&mut self, on: bool) {
        self.opts.prefix_reuse = on;
        self.clear_prefix_cache();
    }

    /// Forget cached prefixes.
    pub fn clear_prefix_cache(&self) {
        if let Ok(mut p) = self.prefixes.lock() {
            p.clear();
        }
    }

    /// Work counters since load (or the last [`Self::reset_stats`]).
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Reset the work counters.
    pub fn reset_stats(&self) {
        if let Ok(mut s) = self.stats.lock() {
            *s = EngineStats::default();
        }
    }

    /// The exact prompt text a request is turned into.
    pub fn render(&self, req: &Request) -> Result<String> {
        match &req.raw_prompt {
            Some(p) => Ok(p.clone()),
            None => self.chat.render(&req.messages),
        }
    }

    fn plan_prefixes(&self, prompts: &[&[u32]]) -> Result<()> {
        let min = self.opts.min_prefix_tokens.max(1);
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by(|&a, &b| prompts[a].cmp(&prompts[b]));
        // Clusters of lexicographic neighbours sharing >= min tokens.
        let mut wanted: Vec<Vec<u32>> = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let mut j = i + 1;
            let mut common = usize::MAX;
            while j < order.len() {
                let l = lcp(&prompts[order[j - 1]], &prompts[order[j]]);
                let c = common.min(l);
                if c < min {
                    break;
                }
                common = c;
                j += 1;
            }
            if j - i >= 2 {
                let shortest = order[i..j]
                    .iter()
                    .map(|&k| prompts[k].len())
                    .min()
                    .unwrap_or(0);
                let n = common.min(shortest.saturating_sub(1));
                if n >= min {
                    wanted.push(prompts[order[i]][..n].to_vec());
                }
            }
            i = j.max(i + 1);
        }
        let mut store = self
            .prefixes
            .lock()
            .map_err(|_| LlmError::Other("prefix cache poisoned".into()))?;
        wanted.retain(|w| !store.iter().any(|e| lcp(&e.tokens, w) >= w.len()));
        if wanted.is_empty() {
            return Ok(());
        }
        let mut kvs: Vec<SeqKv> = wanted
            .iter()
            .map(|_| SeqKv::new(self.model.config().n_layers))
            .collect();
        // Prefill the shared prefixes themselves, packed together within the step budget.
        let mut start = 0;
        while start < wanted.len() {
            let mut end = start;
            let mut toks = 0;
            while end < wanted.len()
                && (end == start || toks + wanted[end].len() <= self.opts.max_step_tokens)
            {
                toks += wanted[end].len();
                end += 1;
            }
            let mut chunks: Vec<Chunk> = kvs[start..end]
                .iter_mut()
                .zip(&wanted[start..end])
                .map(|(kv, t)| Chunk {
                    kv,
                    tokens: t.as_slice(),
                })
                .collect();
            self.model.forward(&mut chunks)?;
            if let Ok(mut s) = self.stats.lock() {
                s.prefill_computed += toks;
                s.forwards += 1;
            }
            start = end;
        }
        for (tokens, kv) in wanted.into_iter().zip(kvs) {
            self.insert_prefix(&mut store, tokens, kv);
        }
        Ok(())
    }

    fn start_kv(&self, prompt: &[u32]) -> Result<(SeqKv, usize)> {
        let n_layers = self.model.config().n_layers;
        if !self.opts.prefix_reuse {
            return Ok((SeqKv::new(n_layers), 0));
        }
        let mut store = self
            .prefixes
            .lock()
            .map_err(|_| LlmError::Other("prefix cache poisoned".into()))?;
        // At least the last prompt token is always computed (it yields the logits).
        let usable = prompt.len().saturating_sub(1);
        let best = store
            .iter()
            .enumerate()
            .map(|(i, e)| (lcp(&e.tokens, prompt).min(e.kv.len()).min(usable), i))
            .max_by_key(|(l, _)| *l);
        match best {
            Some((l, i)) if l >= self.opts.min_prefix_tokens.max(1) => {
                let tick = self.tick();
                let e = &mut store[i];
                e.last_used = tick;
                Ok((e.kv.prefix(l)?, l))
            }
            _ => Ok((SeqKv::new(n_layers), 0)),
        }
    }
}

fn file_tag(path: &Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Apply each decoding sequence's grammar mask to its logits row, in
/// parallel (every mask depends on its own request's tokens only). Returns
/// the error of each sequence whose grammar failed, by position in `active`
/// (empty, without allocating, when no sequence has a grammar).
fn mask_grammars(
    active: &mut [Seq],
    feed_rows: &[(usize, Vec<u32>, bool)],
    logits: &mut [Vec<f32>],
) -> Vec<Option<LlmError>> {
    use rayon::prelude::*;
    if active.iter().all(|s| s.grammar.is_none()) {
        return Vec::new();
    }
    let mut errors: Vec<Option<LlmError>> = (0..active.len()).map(|_| None).collect();
    let mut row_of = vec![None; active.len()];
    for (row, (k, _, produces)) in feed_rows.iter().enumerate() {
        if *produces {
            row_of[*k] = Some(row);
        }
    }
    let mut rows: Vec<Option<&mut Vec<f32>>> = logits.iter_mut().map(Some).collect();
    let jobs: Vec<(usize, &mut grammar::Matcher, &mut Vec<f32>)> = active
        .iter_mut()
        .enumerate()
        .filter_map(|(k, s)| {
            let m = s.grammar.as_mut()?;
            let l = rows[row_of[k]?].take()?;
            Some((k, m, l))
        })
        .collect();
    let failed: Vec<(usize, LlmError)> = jobs
        .into_par_iter()
        .filter_map(|(k, m, l)| m.mask(l).err().map(|e| (k, e)))
        .collect();
    for (k, e) in failed {
        errors[k] = Some(e);
    }
    errors
}

/// A request ended by an error of its own (its grammar failed mid-reply):
/// rejected, so the rest of the batch goes on.
fn rejected(id: usize, e: LlmError) -> LlmError {
    LlmError::BadRequest {
        index: id,
        message: e.to_string(),
    }
}

/// The answer of a finished sequence (forced tag literals read from its guard).
fn finished(s: &Seq, text: String, stop_reason: StopReason) -> Generation {
    Generation {
        text,
        prompt_tokens: s.prompt.len(),
        completion_tokens: s.generated.len(),
        forced: s
            .guard
            .as_ref()
            .map(|g| g.forced_literals().to_vec())
            .unwrap_or_default(),
        cut_off: stop_reason == StopReason::Length
            || s.guard.as_ref().is_some_and(TagGuard::budget_hit),
        stop_reason,
    }
}

/// Log-softmax of `logits` at the choice tokens (f64 accumulation).
fn choice_scores(logits: &[f32], choices: &[u32]) -> ChoiceScores {
    let max = logits
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let lp = choices
        .iter()
        .map(|&t| {
            logits
                .get(t as usize)
                .map_or(f64::NEG_INFINITY, |&x| x as f64 - lse)
        })
        .collect();
    ChoiceScores::from_logprobs(lp)
}

/// The `k` largest log-softmax values of `logits` as (token id, logprob),
/// most likely first, ties by lower id (f64 accumulation, as [`choice_scores`]).
fn top_tokens(logits: &[f32], k: usize) -> Vec<(u32, f64)> {
    let ids: Vec<u32> = (0..logits.len() as u32).collect();
    let all = choice_scores(logits, &ids).logprobs;
    let mut order: Vec<u32> = ids
        .into_iter()
        .filter(|&t| all[t as usize].is_finite())
        .collect();
    let k = k.min(order.len());
    let cmp = |a: &u32, b: &u32| all[*b as usize].total_cmp(&all[*a as usize]).then(a.cmp(b));
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, cmp);
        order.truncate(k);
    }
    order.sort_by(cmp);
    order.into_iter().map(|t| (t, all[t as usize])).collect()
}

fn lcp(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(feature = "hub")]
fn hub_download(repo: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::Api::new().map_err(|e| LlmError::Other(format!("hub: {e}")))?;
    let r = api.model(repo.to_string());
    let hub = |f: &str| {
        r.get(f)
            .map_err(|e| LlmError::Other(format!("hub download of {repo}/{f} failed: {e}")))
    };
    let cfg = hub("config.json")?;
    hub("tokenizer.json")?;
    let _ = hub("tokenizer_config.json");
    if hub("model.safetensors").is_err() {
        let idx = hub("model.safetensors.index.json")?;
        let text = std::fs::read_to_string(&idx).map_err(|e| io_err(&idx, e))?;
        let j: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| LlmError::Other(e.to_string()))?;
        let mut files: Vec<String> = j["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.dedup();
        for f in files {
            hub(&f)?;
        }
    }
    Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default())
}

struct Seq {
    id: usize,
    /// The request's output constraint in force, if any.
    guard: Option<TagGuard>,
    /// The request's grammar state, if it has a grammar.
    grammar: Option<grammar::Matcher>,
    req: Request,
    kv: SeqKv,
    prompt: Vec<u32>,
    fed: usize,
    generated: Vec<u32>,
    rng: ChaCha8Rng,
}

/// A validated request waiting for a slot: its id, the request, its prompt
/// tokens and its compiled grammar.
struct Admitted {
    id: usize,
    req: Request,
    prompt: Vec<u32>,
    grammar: Option<grammar::Matcher>,
}

/// Where the scheduler loop gets requests and leaves answers.
trait Feed {
    /// Newly arrived requests (validated); `None` once no more will come. With
    /// `block`, the loop has nothing to run and waits for at least one.
    fn pull(&mut self, engine: &CandleLlm, block: bool) -> Result<Option<Vec<Admitted>>>;
    /// A finished request.
    fn done(&mut self, id: usize, result: Result<Generation>);
    /// Whether arrivals are a whole batch known in advance (not timing-dependent groups).
    fn whole_batch(&self) -> bool {
        false
    }
}

/// The whole batch of a [`Llm::generate`] call, validated up front.
struct BatchFeed {
    items: Option<Vec<Admitted>>,
    out: Vec<Option<Result<Generation>>>,
}

impl Feed for BatchFeed {
    fn pull(&mut self, _: &CandleLlm, _: bool) -> Result<Option<Vec<Admitted>>> {
        Ok(self.items.take())
    }
    fn done(&mut self, id: usize, result: Result<Generation>) {
        self.out[id] = Some(result);
    }
    fn whole_batch(&self) -> bool {
        true
    }
}

/// A caller's [`RequestQueue`] of a [`Llm::serve`] call.
struct QueueFeed<'q> {
    queue: &'q mut dyn RequestQueue,
    closed: bool,
}

impl Feed for QueueFeed<'_> {
    fn pull(&mut self, engine: &CandleLlm, block: bool) -> Result<Option<Vec<Admitted>>> {
        if self.closed {
            return Ok(None);
        }
        let mut got = Vec::new();
        loop {
            match self.queue.next(block && got.is_empty()) {
                Next::Ready(id, req) => match engine.admit(id, req) {
                    Ok(a) => got.push(a),
                    Err((e, id)) => self.queue.done(id, Err(e)),
                },
                Next::Wait => {
                    if block && got.is_empty() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        continue;
                    }
                    break;
                }
                Next::Closed => {
                    self.closed = true;
                    break;
                }
            }
        }
        if got.is_empty() && self.closed {
            return Ok(None);
        }
        Ok(Some(got))
    }
    fn done(&mut self, id: usize, result: Result<Generation>) {
        self.queue.done(id, result);
    }
}

impl Llm for CandleLlm {
    fn generate(&self, requests: &[Request]) -> Result<Vec<Generation>> {
        let mut items = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            items.push(self.admit(i, r.clone()).map_err(|e| e.0)?);
        }
        let mut feed = BatchFeed {
            items: Some(items),
            out: (0..requests.len()).map(|_| None).collect(),
        };
        self.schedule(&mut feed)?;
        feed.out
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                g.unwrap_or_else(|| {
                    Err(LlmError::Other(format!(
                        "request {i} produced no generation"
                    )))
                })
            })
            .collect()
    }

    fn serve(&self, queue: &mut dyn RequestQueue) -> Result<()> {
        self.schedule(&mut QueueFeed {
            queue,
            closed: false,
        })
    }

    fn engine_stats(&self) -> Option<super::EngineStats> {
        Some(self.stats())
    }

    fn score_choices(&self, requests: &[ChoiceRequest]) -> Result<Vec<ChoiceScores>> {
        // Validate: the prompt ids and each choice's single token id.
        let mut items: Vec<(Vec<u32>, Vec<u32>)> = Vec::with_capacity(requests.len());
        for (index, r) in requests.iter().enumerate() {
            let bad = |message: String| LlmError::BadRequest { index, message };
            if r.messages.is_empty() {
                return Err(bad("no messages".into()));
            }
            if r.choices.is_empty() {
                return Err(bad("no choices".into()));
            }
            let text = format!("{}{}", self.chat.render(&r.messages)?, r.assistant_prefix);
            let ids = self.prompt_ids(index, &text)?;
            let mut toks = Vec::with_capacity(r.choices.len());
            for c in &r.choices {
                let with = self.tokenizer.encode(&format!("{text}{c}"))?;
                if with.len() != ids.len() + 1 || with[..ids.len()] != ids[..] {
                    return Err(bad(format!(
                        "choice {c:?} is not exactly one token after the prefix {:?}",
                        r.assistant_prefix
                    )));
                }
                let t = with[ids.len()];
                if toks.contains(&t) {
                    return Err(bad(format!("choice {c:?} duplicates another choice")));
                }
                toks.push(t);
            }
            items.push((ids, toks));
        }
        let prompts: Vec<Vec<u32>> = items.iter().map(|i| i.0.clone()).collect();
        self.at_prompt_ends(&prompts, |i, logits| choice_scores(logits, &items[i].1))
    }

    fn top_logprobs(&self, requests: &[NextTokenRequest]) -> Result<Vec<NextTokens>> {
        let mut prompts = Vec::with_capacity(requests.len());
        for (index, r) in requests.iter().enumerate() {
            if r.messages.is_empty() || r.top == 0 {
                return Err(LlmError::BadRequest {
                    index,
                    message: "no messages, or top = 0".into(),
                });
            }
            let text = format!("{}{}", self.chat.render(&r.messages)?, r.assistant_prefix);
            prompts.push(self.prompt_ids(index, &text)?);
        }
        let top = self.at_prompt_ends(&prompts, |i, logits| top_tokens(logits, requests[i].top))?;
        top.into_iter()
            .zip(&prompts)
            .map(|(row, p)| {
                let top = row
                    .into_iter()
                    .map(|(id, logprob)| {
                        Ok(TokenLogprob {
                            token: self.tokenizer.decode(&[id], false)?,
                            logprob,
                        })
                    })
                    .collect::<Result<_>>()?;
                Ok(NextTokens {
                    prompt_tokens: p.len(),
                    top,
                })
            })
            .collect()
    }

    fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer.count(text)
    }

    fn truncate_tokens(&self, text: &str, max_tokens: usize) -> String {
        self.tokenizer.truncate(text, max_tokens)
    }

    fn model_id(&self) -> String {
        self.id.clone()
    }
}

impl CandleLlm {
    /// Tokenize a scored prompt, checking it fits the context.
    fn prompt_ids(&self, index: usize, text: &str) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode(text)?;
        if ids.is_empty() || ids.len() >= self.model.config().max_position {
            return Err(LlmError::BadRequest {
                index,
                message: format!(
                    "prompt of {} tokens does not fit the model context of {}",
                    ids.len(),
                    self.model.config().max_position
                ),
            });
        }
        Ok(ids)
    }

    /// Prefill each prompt (batched, with prefix reuse) and map the logits at
    /// its last position through `f`; the cache keeps each prompt as a prefix.
    fn at_prompt_ends<T>(
        &self,
        prompts: &[Vec<u32>],
        f: impl Fn(usize, &[f32]) -> T,
    ) -> Result<Vec<T>> {
        if let Ok(mut s) = self.stats.lock() {
            s.prompt_tokens += prompts.iter().map(|p| p.len()).sum::<usize>();
        }
        if self.opts.prefix_reuse && prompts.len() > 1 {
            let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
            self.plan_prefixes(&refs)?;
        }
        let mut out: Vec<Option<T>> = (0..prompts.len()).map(|_| None).collect();
        let max_batch = self.opts.max_batch.max(1);
        let all: Vec<usize> = (0..prompts.len()).collect();
        for group in all.chunks(max_batch) {
            let mut seqs: Vec<(usize, SeqKv, usize)> = Vec::with_capacity(group.len());
            for &i in group {
                let (kv, reused) = self.start_kv(&prompts[i])?;
                if let Ok(mut s) = self.stats.lock() {
                    s.prefix_reused += reused;
                }
                seqs.push((i, kv, reused));
            }
            loop {
                let mut budget = self.opts.max_step_tokens.max(1);
                let mut rows: Vec<(usize, usize)> = Vec::new(); // (seq position, tokens fed)
                let mut chunks = Vec::new();
                for (k, (i, kv, fed)) in seqs.iter_mut().enumerate() {
                    let ids = &prompts[*i];
                    if *fed >= ids.len() || budget == 0 {
                        continue;
                    }
                    let n = (ids.len() - *fed).min(budget);
                    budget -= n;
                    rows.push((k, n));
                    chunks.push(Chunk {
                        kv,
                        tokens: &ids[*fed..*fed + n],
                    });
                }
                if chunks.is_empty() {
                    break;
                }
                let logits = self.model.forward(&mut chunks)?;
                drop(chunks);
                if let Ok(mut st) = self.stats.lock() {
                    st.prefill_computed += rows.iter().map(|r| r.1).sum::<usize>();
                    st.forwards += 1;
                }
                for (row, &(k, n)) in rows.iter().enumerate() {
                    let (i, _, fed) = &mut seqs[k];
                    *fed += n;
                    if *fed == prompts[*i].len() {
                        out[*i] = Some(f(*i, &logits[row]));
                    }
                }
            }
            for (i, kv, _) in seqs {
                self.keep_prefix(prompts[i].clone(), kv);
            }
        }
        out.into_iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| LlmError::Other(format!("prompt {i} was not scored"))))
            .collect()
    }

    /// Validate request `id` and compile its grammar (the error comes back
    /// with the id).
    fn admit(&self, id: usize, req: Request) -> std::result::Result<Admitted, (LlmError, usize)> {
        let prompt = self.validate(id, &req).map_err(|e| (e, id))?;
        let grammar = match &req.grammar {
            None => None,
            Some(g) => {
                let bad = |message: String| (LlmError::BadRequest { index: id, message }, id);
                if req.constraint.is_some() {
                    return Err(bad(
                        "a request takes a grammar or an output constraint, not both".into(),
                    ));
                }
                let compiler = self
                    .grammars
                    .get_or_init(|| {
                        grammar::Compiler::new(
                            &self.tokenizer,
                            &self.eos,
                            self.model.config().vocab_size,
                        )
                        .map_err(|e| e.to_string())
                    })
                    .as_ref()
                    .map_err(|e| bad(e.clone()))?;
                Some(compiler.matcher(g).map_err(|e| match e {
                    LlmError::Unsupported(_) => (e, id),
                    e => bad(e.to_string()),
                })?)
            }
        };
        Ok(Admitted {
            id,
            req,
            prompt,
            grammar,
        })
    }

    /// Render and tokenize request `index`, checking it fits the context.
    fn validate(&self, index: usize, r: &Request) -> Result<Vec<u32>> {
        if r.messages.is_empty() && r.raw_prompt.is_none() {
            return Err(LlmError::BadRequest {
                index,
                message: "no messages".into(),
            });
        }
        let text = self.render(r)?;
        let ids = self.tokenizer.encode(&text)?;
        if ids.is_empty() {
            return Err(LlmError::BadRequest {
                index,
                message: "empty prompt".into(),
            });
        }
        if ids.len() + r.max_new_tokens.max(1) > self.model.config().max_position {
            return Err(LlmError::BadRequest {
                index,
                message: format!(
                    "prompt of {} tokens + {} new tokens exceeds the model context of {}",
                    ids.len(),
                    r.max_new_tokens,
                    self.model.config().max_position
                ),
            });
        }
        Ok(ids)
    }

    /// The continuous-batching loop: requests join the running batch at the
    /// next step (admission bounded by `max_batch` and the KV budget), each
    /// step packs one token per decoding sequence plus prompt chunks, and a
    /// finished sequence's answer leaves at once.
    fn schedule(&self, feed: &mut dyn Feed) -> Result<()> {
        let kv_per_tok = self.model.config().kv_bytes_per_token().max(1);
        let budget_tokens = self.opts.kv_budget_bytes / kv_per_tok;
        let max_batch = self.opts.max_batch.max(1);
        let mut pending: VecDeque<Admitted> = VecDeque::new();
        let mut active: Vec<Seq> = Vec::new();
        let mut reserved = 0usize;
        let mut open = true;
        loop {
            if open {
                let idle = active.is_empty() && pending.is_empty();
                match feed.pull(self, idle)? {
                    None => open = false,
                    Some(arrived) => {
                        if let Ok(mut s) = self.stats.lock() {
                            s.prompt_tokens +=
                                arrived.iter().map(|a| a.prompt.len()).sum::<usize>();
                            s.max_batch = max_batch;
                        }
                        // Shared prefixes of a group of arrivals are computed once. With an
                        // executor that is not batch-invariant this only happens for a whole
                        // `generate` batch, so streamed text never depends on arrival timing.
                        if self.opts.prefix_reuse
                            && arrived.len() > 1
                            && (self.model.batch_invariant() || feed.whole_batch())
                        {
                            let prompts: Vec<&[u32]> =
                                arrived.iter().map(|a| a.prompt.as_slice()).collect();
                            self.plan_prefixes(&prompts)?;
                        }
                        for a in arrived {
                            if a.req.max_new_tokens == 0 {
                                let g = Generation {
                                    text: String::new(),
                                    prompt_tokens: a.prompt.len(),
                                    completion_tokens: 0,
                                    stop_reason: StopReason::Length,
                                    forced: Vec::new(),
                                    cut_off: true,
                                };
                                feed.done(a.id, Ok(g));
                            } else {
                                pending.push_back(a);
                            }
                        }
                    }
                }
            }
            while active.len() < max_batch {
                let Some(a) = pending.front() else { break };
                let need = a.prompt.len() + a.req.max_new_tokens;
                if !active.is_empty() && reserved + need > budget_tokens {
                    break;
                }
                let Some(a) = pending.pop_front() else { break };
                reserved += need;
                let (kv, reused) = self.start_kv(&a.prompt)?;
                if let Ok(mut s) = self.stats.lock() {
                    s.prefix_reused += reused;
                }
                let guard = a.req.constraint.as_ref().map(|c| {
                    TagGuard::new(c, a.req.max_new_tokens, &|t| {
                        self.tokenizer.encode(t).unwrap_or_default()
                    })
                });
                active.push(Seq {
                    id: a.id,
                    guard,
                    grammar: a.grammar,
                    rng: ChaCha8Rng::seed_from_u64(a.req.seed),
                    req: a.req,
                    kv,
                    prompt: a.prompt,
                    fed: reused,
                    generated: Vec::new(),
                });
            }
            if active.is_empty() {
                if open || !pending.is_empty() {
                    continue;
                }
                return Ok(());
            }
            // Build this step's chunks within the token budget: decodes first (1 token
            // each), then prompt remainders (chunked prefill).
            let mut budget = self.opts.max_step_tokens.max(active.len());
            let mut feed_rows: Vec<(usize, Vec<u32>, bool)> = Vec::new(); // (active pos, tokens, produces logits)
            for (k, s) in active.iter().enumerate() {
                if s.fed >= s.prompt.len() {
                    let last = *s.generated.last().unwrap_or(&s.prompt[s.prompt.len() - 1]);
                    feed_rows.push((k, vec![last], true));
                    budget -= 1;
                }
            }
            let decoding = feed_rows.len();
            for (k, s) in active.iter().enumerate() {
                if s.fed < s.prompt.len() && budget > 0 {
                    let n = (s.prompt.len() - s.fed).min(budget);
                    budget -= n;
                    feed_rows.push((
                        k,
                        s.prompt[s.fed..s.fed + n].to_vec(),
                        s.fed + n == s.prompt.len(),
                    ));
                }
            }
            feed_rows.sort_by_key(|f| f.0);
            let mut logits = {
                let mut chunks = Vec::with_capacity(feed_rows.len());
                let mut fi = feed_rows.iter().peekable();
                for (k, s) in active.iter_mut().enumerate() {
                    if let Some(f) = fi.peek() {
                        if f.0 == k {
                            chunks.push(Chunk {
                                kv: &mut s.kv,
                                tokens: &f.1,
                            });
                            fi.next();
                        }
                    }
                }
                self.model.forward(&mut chunks)?
            };
            let mut grammar_errors = time(Phase::Sampling, || {
                mask_grammars(&mut active, &feed_rows, &mut logits)
            });
            let mut computed = 0;
            let mut finished = Vec::new();
            for (row, (k, toks, produces)) in feed_rows.iter().enumerate() {
                let s = &mut active[*k];
                if s.fed < s.prompt.len() {
                    s.fed += toks.len();
                    computed += toks.len();
                }
                if !produces {
                    continue;
                }
                let action = s.guard.as_mut().map(TagGuard::next_action);
                let tok = match action {
                    // Forced tag tokens draw no randomness.
                    Some(Action::Force(t)) => t,
                    Some(Action::Sample { ban_eos }) if ban_eos => {
                        let l = &mut logits[row];
                        for &e in &self.eos {
                            if let Some(x) = l.get_mut(e as usize) {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                        time(Phase::Sampling, || {
                            sampling::sample(l, &s.req.sampling, &mut s.rng)
                        })
                    }
                    _ => {
                        // A grammar's forbidden tokens are already masked out.
                        if let Some(e) = grammar_errors.get_mut(*k).and_then(Option::take) {
                            finished.push((*k, Err(rejected(s.id, e))));
                            continue;
                        }
                        time(Phase::Sampling, || {
                            sampling::sample(&logits[row], &s.req.sampling, &mut s.rng)
                        })
                    }
                };
                // An end-of-sequence while tags are missing wraps the reply up.
                let tok = match s.guard.as_mut() {
                    Some(g) => g.replace_eos(tok, self.eos.contains(&tok)),
                    None => tok,
                };
                s.generated.push(tok);
                if let Some(m) = s.grammar.as_mut() {
                    if let Err(e) = m.consume(tok) {
                        finished.push((*k, Err(rejected(s.id, e))));
                        continue;
                    }
                }
                if let Some(g) = time(Phase::Tokenizer, || self.check_finished(s))? {
                    finished.push((*k, Ok(g)));
                }
            }
            if let Ok(mut st) = self.stats.lock() {
                st.prefill_computed += computed;
                st.forwards += 1;
                if decoding > 0 {
                    st.decode_steps += 1;
                    st.decode_rows += decoding;
                    if decoding >= max_batch {
                        st.full_steps += 1;
                    }
                }
            }
            finished.sort_by_key(|f| std::cmp::Reverse(f.0));
            for (k, g) in finished {
                let s = active.swap_remove(k);
                reserved -= s.prompt.len() + s.req.max_new_tokens;
                if let Ok(mut st) = self.stats.lock() {
                    st.generated += s.generated.len();
                }
                let ok = g.is_ok();
                feed.done(s.id, g);
                if ok {
                    self.keep_finished(s);
                }
            }
        }
    }

    /// Keep a finished sequence's KV cache (its prompt and reply) as a
    /// reusable prefix: a follow-up turn of the same conversation (tool
    /// result, format repair, next agent over the same history) starts from
    /// it. Only for executors whose results do not depend on how a sequence
    /// was split into forwards (the int8 kernels), so reuse never changes text.
    fn keep_finished(&self, s: Seq) {
        let n = s.kv.len();
        let mut tokens = s.prompt;
        tokens.extend_from_slice(&s.generated);
        tokens.truncate(n);
        self.keep_prefix(tokens, s.kv);
    }

    /// Keep `kv` (the cache of `tokens`) as a reusable prefix, when reuse
    /// cannot change text (batch-invariant executor) and it is long enough.
    fn keep_prefix(&self, tokens: Vec<u32>, kv: SeqKv) {
        if !self.opts.prefix_reuse
            || !self.model.batch_invariant()
            || kv.len() < self.opts.min_prefix_tokens.max(1)
        {
            return;
        }
        if let Ok(mut store) = self.prefixes.lock() {
            self.insert_prefix(&mut store, tokens, kv);
        }
    }

    /// Add a prefix entry (dropping entries it extends), then evict the least
    /// recently used entries beyond the entry and byte limits.
    fn insert_prefix(&self, store: &mut Vec<PrefixEntry>, tokens: Vec<u32>, kv: SeqKv) {
        if store
            .iter()
            .any(|e| e.tokens.len() >= tokens.len() && e.tokens[..tokens.len()] == tokens[..])
        {
            return;
        }
        store.retain(|e| {
            !(e.tokens.len() < tokens.len() && tokens[..e.tokens.len()] == e.tokens[..])
        });
        let tick = self.tick();
        store.push(PrefixEntry {
            tokens,
            kv,
            last_used: tick,
        });
        let per_tok = self.model.config().kv_bytes_per_token().max(1);
        let cap = self.opts.prefix_cache_entries.max(1);
        let max_bytes = self.opts.prefix_cache_bytes;
        loop {
            let bytes: usize = store.iter().map(|e| e.kv.len() * per_tok).sum();
            if store.len() <= cap && bytes <= max_bytes {
                break;
            }
            let Some(oldest) = store
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            store.swap_remove(oldest);
        }
    }

    fn tick(&self) -> u64 {
        self.clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn check_finished(&self, s: &mut Seq) -> Result<Option<Generation>> {
        let last = *s.generated.last().unwrap_or(&0);
        let n = s.generated.len();
        if self.eos.contains(&last) {
            let text = self.tokenizer.decode(&s.generated[..n - 1], true)?;
            return Ok(Some(finished(s, text, StopReason::Eos)));
        }
        if !s.req.stop.is_empty() || s.guard.is_some() {
            let text = self.tokenizer.decode(&s.generated, true)?;
            if let Some(pos) = s
                .req
                .stop
                .iter()
                .filter_map(|st| text.find(st.as_str()))
                .min()
            {
                return Ok(Some(finished(
                    s,
                    text[..pos].to_string(),
                    StopReason::StopString,
                )));
            }
            let remaining = s.req.max_new_tokens.saturating_sub(n);
            if let Some(g) = s.guard.as_mut() {
                if g.observe(&text, remaining) {
                    return Ok(Some(finished(s, text, StopReason::Constraint)));
                }
            }
        }
        if s.grammar.as_ref().is_some_and(grammar::Matcher::is_stopped) {
            let text = self.tokenizer.decode(&s.generated, true)?;
            return Ok(Some(finished(s, text, StopReason::Constraint)));
        }
        if n >= s.req.max_new_tokens {
            let text = self.tokenizer.decode(&s.generated, true)?;
            return Ok(Some(finished(s, text, StopReason::Length)));
        }
        Ok(None)
    }
}
