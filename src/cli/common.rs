//! Shared CLI pieces: model arguments, model loading, progress bars.

use crate::llm::engine::{CandleLlm, EngineOptions};
use crate::llm::{remote, Llm};
use anyhow::{Context, Result};

/// Arguments selecting and configuring the local model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a GGUF file, a HuggingFace folder, or a hub id (online only).
    /// Default: $CANTANTE_MODEL, else the default model in the fetch cache.
    #[arg(long)]
    pub model: Option<String>,
    /// Run on CUDA (build with --features cuda).
    #[arg(long)]
    pub cuda: bool,
    /// Weight format: int8 (the file's quantized blocks on cantante's int8 CPU
    /// kernels), f32 (dense, through candle), native (the file's quantization through
    /// candle's kernels). Default: int8 on CPU, native on CUDA.
    #[arg(long, value_enum)]
    pub weights: Option<crate::llm::model::WeightFormat>,
    /// Maximum sequences decoded together.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// KV-cache memory bound in MiB.
    #[arg(long, default_value_t = 4096)]
    pub kv_mib: usize,
    /// Disable reuse of shared prompt prefixes.
    #[arg(long)]
    pub no_prefix_reuse: bool,
    /// With `--model http(s)://HOST:PORT/v1` (an OpenAI-compatible server):
    /// the served model to use (default: the first of /v1/models).
    #[arg(long)]
    pub remote_model: Option<String>,
    /// Environment variable holding the server's API key (never pass the
    /// key itself on the command line).
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Local tokenizer of the served model (GGUF or tokenizer.json) for exact
    /// token counts before dispatch; without it, 1 token ≈ 4 bytes.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// Concurrent requests to a remote server.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

/// Where models/fetch.sh caches the default model.
pub fn default_model_path() -> std::path::PathBuf {
    let base = std::env::var("CANTANTE_MODELS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into()))
                .join(".cache/cantante/models")
        });
    base.join("qwen2.5-coder-0.5b-instruct.gguf")
}

/// Load the model described by the arguments: an OpenAI-compatible server
/// for an `http(s)://` URL, else the in-process engine.
pub fn load_llm(m: &ModelArgs) -> Result<Box<dyn Llm>> {
    let spec = m
        .model
        .clone()
        .or_else(|| std::env::var("CANTANTE_MODEL").ok())
        .unwrap_or_else(|| default_model_path().display().to_string());
    if remote::is_remote(&spec) {
        let opts = remote::RemoteOptions {
            model: m.remote_model.clone(),
            api_key_env: m.api_key_env.clone(),
            tokenizer: m.tokenizer.clone(),
            concurrency: m.concurrency.max(1),
            ..remote::RemoteOptions::new(spec.clone())
        };
        tracing::info!("connecting to {spec}");
        let l = remote::OpenAiLlm::connect(opts)
            .with_context(|| format!("cannot use the server `{spec}`"))?;
        return Ok(Box::new(l));
    }
    Ok(Box::new(load_engine(m, &spec)?))
}

/// Load the in-process engine for `spec` with the arguments' settings.
pub fn load_engine(m: &ModelArgs, spec: &str) -> Result<CandleLlm> {
    let opts = EngineOptions {
        cuda: m.cuda,
        weights: m.weights,
        max_batch: m.max_batch.max(1),
        kv_budget_bytes: m.kv_mib << 20,
        prefix_reuse: !m.no_prefix_reuse,
        ..Default::default()
    };
    tracing::info!("loading model {spec}");
    CandleLlm::load(spec, opts).with_context(|| format!("cannot load model `{spec}`"))
}

/// Load the separate meta model (attributer and prompt rewriter) named by
/// `--meta-model`, with the task model's engine settings; `None` when none
/// was given (the task model then plays every role).
pub fn load_meta_llm(
    task: &ModelArgs,
    meta_model: Option<&String>,
) -> Result<Option<Box<dyn Llm>>> {
    meta_model
        .map(|m| {
            load_llm(&ModelArgs {
                model: Some(m.clone()),
                ..task.clone()
            })
        })
        .transpose()
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn bar(len: u64, msg: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    b
}
