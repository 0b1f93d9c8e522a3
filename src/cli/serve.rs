//! `cantante serve`: the local engine behind an OpenAI-compatible HTTP API.

use super::common::{load_engine, ModelArgs};
use crate::serve::{install_signal_handlers, serve, ServeOptions};
use anyhow::{bail, Context, Result};
use std::sync::atomic::AtomicBool;

/// Arguments of `cantante serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Interface to bind; anything but loopback exposes the model to the network.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Model name clients send and `/v1/models` lists.
    #[arg(long, default_value = "cantante")]
    served_model_name: String,
    /// Environment variable holding the API key clients must send (optional).
    #[arg(long)]
    api_key_env: Option<String>,
    /// HTTP worker threads (concurrent requests).
    #[arg(long, default_value_t = 64)]
    http_threads: usize,
    /// `max_tokens` of requests that give none.
    #[arg(long, default_value_t = 512)]
    default_max_tokens: usize,
}

/// Run the command.
pub fn run(a: ServeArgs) -> Result<()> {
    let spec = a
        .model
        .model
        .clone()
        .or_else(|| std::env::var("CANTANTE_MODEL").ok())
        .unwrap_or_else(|| super::common::default_model_path().display().to_string());
    if crate::llm::remote::is_remote(&spec) {
        bail!("`serve` runs a local model; `{spec}` is a server already");
    }
    let api_key = match &a.api_key_env {
        Some(v) => {
            Some(std::env::var(v).with_context(|| format!("--api-key-env {v}: variable not set"))?)
        }
        None => None,
    };
    let llm = load_engine(&a.model, &spec)?;
    let opts = ServeOptions {
        host: a.host.clone(),
        port: a.port,
        model_name: a.served_model_name.clone(),
        api_key,
        http_threads: a.http_threads.max(1),
        default_max_tokens: a.default_max_tokens.max(1),
        max_tokens_limit: llm.model().config().max_position,
        ..ServeOptions::default()
    };
    install_signal_handlers();
    let stop = AtomicBool::new(false);
    let name = opts.model_name.clone();
    serve(&llm, &opts, &stop, |addr| {
        println!(
            "serving {name} ({}) on http://{addr}/v1",
            crate::llm::Llm::model_id(&llm)
        );
    })?;
    if let Some(st) = crate::llm::Llm::engine_stats(&llm) {
        println!("stopped; engine: {}", st.summary());
    }
    Ok(())
}
