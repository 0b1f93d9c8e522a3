//! `cantante serve`: the in-process engine behind an OpenAI-compatible HTTP
//! API, so other tools (e.g. DSPy's MIPROv2 and GEPA, the paper's baselines)
//! can use exactly the local model we optimize with.
//!
//! HTTP worker threads (tiny_http) parse and validate each request and put
//! its [`Request`]s on a channel; the engine runs [`Llm::serve`] on that
//! channel, so concurrent HTTP requests join the same continuous batch at the
//! next decode step. Answers go back through a per-request channel.
//!
//! Endpoints: `POST /v1/completions` (a raw `prompt`, no chat template; the
//! same sampling fields), `POST /v1/chat/completions` (with `n`, `seed`, `stop`,
//! `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `top_k`;
//! `stream: true` answers as server-sent events with one content chunk, then
//! the finish chunk, then `[DONE]`), `GET /v1/models`, `GET /health`.
//! `logprobs: true` with `top_logprobs` (≤ 20) is served for the next token
//! only (`max_tokens` 1, `n` 1): the engine's [`Llm::top_logprobs`], answered
//! greedily whatever the temperature, with `continue_final_message: true`
//! taking a final assistant message as the start of the reply (vLLM's
//! extension) — what the judge attributer of a remote cantante needs. A
//! request without `seed` gets a fresh one, returned in the response's
//! `cantante.seed`; the same request with the same seed gives the same text
//! whatever else is in flight. `usage` holds the engine's exact counts.
//! Errors have OpenAI's shape `{"error": {"message", "type", "param",
//! "code"}}`: bad JSON, wrong field types, an empty message list, too many
//! tokens and unsupported features (tools, response formats, grammars) are
//! 400s that say what is wrong; a body over the limit is 413,
//! a missing or wrong API key 401, an unknown path 404. SIGINT/SIGTERM stop
//! accepting requests and finish the ones in flight.

use crate::llm::{
    Generation, Llm, LlmError, Message, Next, NextTokenRequest, Request, RequestQueue, Sampling,
    StopReason,
};
use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Interface to bind (loopback by default).
    pub host: String,
    /// Port; 0 picks a free one.
    pub port: u16,
    /// Model name in responses and `/v1/models`.
    pub model_name: String,
    /// API key clients must send as `Authorization: Bearer …`, if any.
    pub api_key: Option<String>,
    /// HTTP worker threads (concurrent requests being parsed or waited on).
    pub http_threads: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Largest `max_tokens` accepted.
    pub max_tokens_limit: usize,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Seconds a request may wait for its answer (then 504).
    pub request_timeout_secs: u64,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            model_name: "cantante".into(),
            api_key: None,
            http_threads: 64,
            default_max_tokens: 512,
            max_tokens_limit: 32768,
            max_body_bytes: 4 << 20,
            request_timeout_secs: 600,
        }
    }
}

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {message}")]
    Bind {
        /// Address.
        addr: String,
        /// Why.
        message: String,
    },
    /// The engine failed as a whole.
    #[error("engine: {0}")]
    Engine(#[from] LlmError),
}

/// One engine job: a request and where its answer goes.
struct Job {
    req: Request,
    reply: mpsc::SyncSender<crate::llm::Result<Generation>>,
}

/// The engine's side of the job channel.
struct JobQueue<'a> {
    rx: mpsc::Receiver<Job>,
    stop: &'a AtomicBool,
    replies: HashMap<usize, mpsc::SyncSender<crate::llm::Result<Generation>>>,
    next_id: usize,
}

impl RequestQueue for JobQueue<'_> {
    fn next(&mut self, block: bool) -> Next {
        loop {
            let job = if block {
                match self.rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(j) => Some(j),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Next::Closed,
                }
            } else {
                match self.rx.try_recv() {
                    Ok(j) => Some(j),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => return Next::Closed,
                }
            };
            match job {
                Some(j) => {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.replies.insert(id, j.reply);
                    return Next::Ready(id, j.req);
                }
                None if self.stop.load(Ordering::SeqCst) && self.replies.is_empty() => {
                    return Next::Closed
                }
                None if block => continue,
                None => return Next::Wait,
            }
        }
    }

    fn done(&mut self, id: usize, result: crate::llm::Result<Generation>) {
        if let Some(tx) = self.replies.remove(&id) {
            let _ = tx.send(result);
        }
    }
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Make SIGINT and SIGTERM request a graceful stop (see [`serve`]).
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Run the server until `stop` is set (or a signal arrives after
/// [`install_signal_handlers`]); `ready` gets the bound address first.
/// Requests in flight when it stops are finished.
pub fn serve(
    llm: &dyn Llm,
    opts: &ServeOptions,
    stop: &AtomicBool,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let addr = format!("{}:{}", opts.host, opts.port);
    let http = tiny_http::Server::http(&addr).map_err(|e| ServeError::Bind {
        addr: addr.clone(),
        message: e.to_string(),
    })?;
    let bound = http.server_addr().to_ip().ok_or_else(|| ServeError::Bind {
        addr: addr.clone(),
        message: "not an IP address".into(),
    })?;
    let http = Arc::new(http);
    let (tx, rx) = mpsc::sync_channel::<Job>(4096);
    let ids = AtomicU64::new(0);
    let stopping = || stop.load(Ordering::SeqCst) || SIGNALLED.load(Ordering::SeqCst);
    let halt = AtomicBool::new(false);
    ready(bound);
    std::thread::scope(|s| {
        let mut workers = Vec::new();
        for _ in 0..opts.http_threads.max(1) {
            let http = Arc::clone(&http);
            let tx = tx.clone();
            let (ids, halt) = (&ids, &halt);
            workers.push(s.spawn(move || {
                while !halt.load(Ordering::SeqCst) {
                    match http.recv_timeout(Duration::from_millis(100)) {
                        Ok(Some(req)) => handle(req, llm, &tx, opts, ids),
                        Ok(None) => {}
                        Err(_) => return,
                    }
                }
            }));
        }
        drop(tx);
        // Watch for the stop request; then stop the HTTP workers (each
        // finishes its current request) and let the engine drain.
        let watcher = s.spawn(|| {
            while !stopping() && !halt.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            halt.store(true, Ordering::SeqCst);
            http.unblock();
        });
        let mut q = JobQueue {
            rx,
            stop: &halt,
            replies: HashMap::new(),
            next_id: 0,
        };
        let res = llm.serve(&mut q);
        // The engine has returned (drained after a stop, or failed): stop
        // the watcher and the HTTP workers either way.
        halt.store(true, Ordering::SeqCst);
        drop(q);
        let _ = watcher.join();
        for w in workers {
            let _ = w.join();
        }
        res.map_err(ServeError::from)
    })
}

/// An OpenAI-shaped error.
#[derive(Debug)]
struct ApiError {
    status: u16,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

fn bad(message: impl Into<String>, param: Option<&str>) -> ApiError {
    ApiError {
        status: 400,
        message: message.into(),
        kind: "invalid_request_error",
        param: param.map(String::from),
        code: None,
    }
}

fn server_error(status: u16, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        message: message.into(),
        kind: "server_error",
        param: None,
        code: None,
    }
}

fn respond_json(req: tiny_http::Request, status: u16, body: &serde_json::Value) {
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
        .expect("static header");
    let r = tiny_http::Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(header);
    let _ = req.respond(r);
}

fn respond_error(req: tiny_http::Request, e: ApiError) {
    let body = serde_json::json!({"error": {
        "message": e.message, "type": e.kind, "param": e.param, "code": e.code,
    }});
    respond_json(req, e.status, &body);
}

fn handle(
    mut req: tiny_http::Request,
    llm: &dyn Llm,
    tx: &mpsc::SyncSender<Job>,
    opts: &ServeOptions,
    ids: &AtomicU64,
) {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let method = req.method().clone();
    if path == "/health" {
        return respond_json(req, 200, &serde_json::json!({"status": "ok"}));
    }
    if let Some(key) = &opts.api_key {
        let want = format!("Bearer {key}");
        let got = req
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .map(|h| h.value.as_str().to_string())
            .unwrap_or_default();
        if !constant_time_eq(got.as_bytes(), want.as_bytes()) {
            return respond_error(
                req,
                ApiError {
                    status: 401,
                    message: "missing or wrong API key (Authorization: Bearer …)".into(),
                    kind: "authentication_error",
                    param: None,
                    code: Some("invalid_api_key"),
                },
            );
        }
    }
    match (method, path.as_str()) {
        (tiny_http::Method::Get, "/v1/models") => respond_json(
            req,
            200,
            &serde_json::json!({"object": "list", "data": [
                {"id": opts.model_name, "object": "model", "created": 0, "owned_by": "cantante"}
            ]}),
        ),
        (tiny_http::Method::Post, p @ ("/v1/chat/completions" | "/v1/completions")) => {
            let text_api = p == "/v1/completions";
            let mut body = Vec::new();
            let limit = opts.max_body_bytes;
            if req
                .as_reader()
                .take(limit as u64 + 1)
                .read_to_end(&mut body)
                .is_err()
            {
                return respond_error(req, bad("cannot read the request body", None));
            }
            if body.len() > limit {
                return respond_error(
                    req,
                    ApiError {
                        status: 413,
                        message: format!("request body larger than {limit} bytes"),
                        kind: "invalid_request_error",
                        param: None,
                        code: None,
                    },
                );
            }
            let answer = if text_api {
                completion(&body, tx, opts, ids).map(|v| (v, false))
            } else {
                chat(&body, llm, tx, opts, ids)
            };
            match answer {
                Ok((v, stream)) => {
                    if stream {
                        respond_stream(req, &v)
                    } else {
                        respond_json(req, 200, &v)
                    }
                }
                Err(e) => respond_error(req, e),
            }
        }
        (_, p) => respond_error(
            req,
            ApiError {
                status: 404,
                message: format!(
                    "no route {p} (served: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health)"
                ),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_found"),
            },
        ),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server-sent events: one content chunk, the finish chunk with usage, `[DONE]`.
fn respond_stream(req: tiny_http::Request, v: &serde_json::Value) {
    let mut out = String::new();
    let choices = v["choices"].as_array().cloned().unwrap_or_default();
    for c in &choices {
        let chunk = serde_json::json!({"id": v["id"], "object": "chat.completion.chunk", "created": v["created"],
            "model": v["model"], "choices": [{"index": c["index"], "delta": {"role": "assistant", "content": c["message"]["content"]}, "finish_reason": null}]});
        out.push_str(&format!("data: {chunk}\n\n"));
    }
    for c in &choices {
        let chunk = serde_json::json!({"id": v["id"], "object": "chat.completion.chunk", "created": v["created"],
            "model": v["model"], "choices": [{"index": c["index"], "delta": {}, "finish_reason": c["finish_reason"]}],
            "usage": v["usage"], "cantante": v["cantante"]});
        out.push_str(&format!("data: {chunk}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"text/event-stream"[..])
        .expect("static header");
    let _ = req.respond(tiny_http::Response::from_string(out).with_header(header));
}

fn fresh_seed(ids: &AtomicU64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = t ^ ids.fetch_add(1, Ordering::Relaxed).rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The requests of one chat-completion body (one per `n`), its base seed and
/// whether it asks for streaming.
pub fn parse_chat_request(
    v: &serde_json::Value,
    opts: &ServeOptions,
    default_seed: u64,
) -> Result<(Vec<Request>, u64, bool), String> {
    let field_err = |f: &str, what: &str| format!("`{f}` must be {what}");
    if !v.is_object() {
        return Err("the request body must be a JSON object".into());
    }
    for unsupported in [
        "tools",
        "functions",
        "tool_choice",
        "guided_choice",
        "grammar",
    ] {
        if !v[unsupported].is_null() {
            return Err(format!(
                "`{unsupported}` is not supported by cantante serve (grammars: `response_format`, `guided_regex`, `guided_grammar` in Lark, `guided_json`)"
            ));
        }
    }
    let msgs = v["messages"]
        .as_array()
        .ok_or_else(|| field_err("messages", "a non-empty array of {role, content}"))?;
    if msgs.is_empty() {
        return Err("`messages` must not be empty".into());
    }
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = m["role"]
            .as_str()
            .ok_or_else(|| field_err(&format!("messages[{i}].role"), "a string"))?;
        let content = match &m["content"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(parts) => parts
                .iter()
                .map(|p| p["text"].as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    field_err(&format!("messages[{i}].content"), "a string or text parts")
                })?
                .join(""),
            _ => return Err(field_err(&format!("messages[{i}].content"), "a string")),
        };
        messages.push(match role {
            "system" | "developer" => Message::system(content),
            "user" => Message::user(content),
            "assistant" => Message::assistant(content),
            "tool" => Message::tool(content),
            r => {
                return Err(format!(
                    "`messages[{i}].role` {r:?} is not system, user, assistant or tool"
                ))
            }
        });
    }
    let uint = |f: &str| -> Result<Option<u64>, String> {
        match &v[f] {
            serde_json::Value::Null => Ok(None),
            x => x
                .as_u64()
                .map(Some)
                .ok_or_else(|| field_err(f, "a non-negative integer")),
        }
    };
    let num = |f: &str, default: f64| -> Result<f64, String> {
        match &v[f] {
            serde_json::Value::Null => Ok(default),
            x => x.as_f64().ok_or_else(|| field_err(f, "a number")),
        }
    };
    let max = uint("max_completion_tokens")?
        .or(uint("max_tokens")?)
        .map_or(opts.default_max_tokens, |m| m as usize);
    if max == 0 || max > opts.max_tokens_limit {
        return Err(format!(
            "`max_tokens` must be in 1..={} (got {max})",
            opts.max_tokens_limit
        ));
    }
    let temperature = num("temperature", 1.0)?;
    let top_p = num("top_p", 1.0)?;
    if !(0.0..=2.0).contains(&temperature) {
        return Err("`temperature` must be in [0, 2]".into());
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err("`top_p` must be in (0, 1]".into());
    }
    let top_k = match &v["top_k"] {
        serde_json::Value::Null => 0,
        x => match x.as_i64() {
            Some(k) if k <= 0 => 0,
            Some(k) => k as usize,
            None => return Err(field_err("top_k", "an integer")),
        },
    };
    let n = uint("n")?.unwrap_or(1) as usize;
    if !(1..=16).contains(&n) {
        return Err("`n` must be in 1..=16".into());
    }
    let seed = match v
        .get("cantante_seed")
        .filter(|s| !s.is_null())
        .unwrap_or(&v["seed"])
    {
        serde_json::Value::Null => default_seed,
        x => x
            .as_u64()
            .or_else(|| x.as_i64().map(|i| i as u64))
            .ok_or_else(|| field_err("seed", "an integer"))?,
    };
    let stop: Vec<String> = match &v["stop"] {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| field_err("stop", "a string or an array of strings"))?,
        _ => return Err(field_err("stop", "a string or an array of strings")),
    };
    if stop.len() > 16 || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err("`stop` takes at most 16 non-empty strings of at most 256 bytes".into());
    }
    let stream = v["stream"].as_bool().unwrap_or(false);
    let grammar = crate::llm::grammar::from_openai_body(v)?;
    let reqs = (0..n)
        .map(|k| Request {
            messages: messages.clone(),
            max_new_tokens: max,
            sampling: Sampling {
                temperature,
                top_p,
                top_k,
            },
            seed: seed.wrapping_add(k as u64),
            stop: stop.clone(),
            constraint: None,
            grammar: grammar.clone(),
            raw_prompt: None,
        })
        .collect();
    Ok((reqs, seed, stream))
}

/// What a `logprobs` request asks for: the next-token question and how
/// many top tokens to return (0: only the chosen token's logprob).
#[derive(Debug, PartialEq)]
pub struct LogprobsAsk {
    /// The conversation and assistant prefix to score.
    pub next: NextTokenRequest,
    /// `top_logprobs` (0..=20).
    pub top: usize,
}

/// The logprobs part of a chat-completion body, checked against the rest of
/// it (`reqs` as [`parse_chat_request`] returned them); `None` without
/// `logprobs: true`.
pub fn parse_logprobs(
    v: &serde_json::Value,
    reqs: &[Request],
    stream: bool,
) -> Result<Option<LogprobsAsk>, String> {
    let wants = match &v["logprobs"] {
        serde_json::Value::Null => false,
        serde_json::Value::Bool(b) => *b,
        _ => return Err("`logprobs` must be a boolean".into()),
    };
    let cont = match &v["continue_final_message"] {
        serde_json::Value::Null => false,
        serde_json::Value::Bool(b) => *b,
        _ => return Err("`continue_final_message` must be a boolean".into()),
    };
    let top = match &v["top_logprobs"] {
        serde_json::Value::Null => None,
        x => match x.as_u64() {
            Some(k) if k <= 20 => Some(k as usize),
            _ => return Err("`top_logprobs` must be an integer in 0..=20".into()),
        },
    };
    if !wants {
        if top.is_some() {
            return Err("`top_logprobs` needs `logprobs: true`".into());
        }
        if cont {
            return Err(
                "`continue_final_message` is supported together with `logprobs: true` only".into(),
            );
        }
        return Ok(None);
    }
    let r = &reqs[0];
    if reqs.len() != 1 || r.max_new_tokens != 1 || stream {
        return Err("`logprobs` are served for the next token only: send `max_tokens` (or `max_completion_tokens`) 1, `n` 1 and no `stream`".into());
    }
    let mut messages = r.messages.clone();
    let mut prefix = String::new();
    if cont {
        match messages.last() {
            Some(m) if m.role == crate::llm::Role::Assistant => {
                prefix = messages.pop().map(|m| m.content).unwrap_or_default();
            }
            _ => {
                return Err(
                    "`continue_final_message` needs a final assistant message to continue".into(),
                )
            }
        }
        if messages.is_empty() {
            return Err("`messages` must hold more than the assistant message to continue".into());
        }
    }
    let top = top.unwrap_or(0);
    Ok(Some(LogprobsAsk {
        next: NextTokenRequest {
            messages,
            assistant_prefix: prefix,
            top: top.max(1),
        },
        top,
    }))
}

/// A one-token completion with its logprobs (see [`parse_logprobs`]).
fn logprobs_answer(
    llm: &dyn Llm,
    ask: LogprobsAsk,
    opts: &ServeOptions,
    id: u64,
    created: u64,
    seed: u64,
) -> Result<serde_json::Value, ApiError> {
    let answer = llm
        .top_logprobs(std::slice::from_ref(&ask.next))
        .map_err(|e| match e {
            LlmError::BadRequest { message, .. } => bad(message, Some("messages")),
            LlmError::Unsupported(m) => bad(m, Some("logprobs")),
            e => server_error(500, e.to_string()),
        })?
        .pop()
        .ok_or_else(|| server_error(500, "the engine returned no logprobs"))?;
    let entry = |t: &crate::llm::TokenLogprob| {
        let bytes = (!t.token.contains('\u{FFFD}')).then(|| t.token.as_bytes().to_vec());
        serde_json::json!({"token": t.token, "logprob": t.logprob, "bytes": bytes})
    };
    let chosen = answer
        .top
        .first()
        .ok_or_else(|| server_error(500, "the engine returned no tokens"))?;
    let mut first = entry(chosen);
    first["top_logprobs"] = answer.top.iter().take(ask.top).map(entry).collect();
    Ok(serde_json::json!({
        "id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": created,
        "model": opts.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": chosen.token},
            "logprobs": {"content": [first]}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": 1,
            "total_tokens": answer.prompt_tokens + 1},
        "cantante": {"seed": seed, "stop_reason": "length", "stop_reasons": ["length"]},
    }))
}

/// The requests of a text-completion body: the chat fields' rules, with a
/// raw `prompt` (a string, or a list of one string) instead of `messages`;
/// `echo`, `suffix`, `logprobs` and `stream` are refused.
pub fn parse_completion_request(
    v: &serde_json::Value,
    opts: &ServeOptions,
    default_seed: u64,
) -> Result<(Vec<Request>, u64), String> {
    if !v.is_object() {
        return Err("the request body must be a JSON object".into());
    }
    if !v["messages"].is_null() {
        return Err("`messages` belongs to /v1/chat/completions; send `prompt`".into());
    }
    for (f, ok) in [
        ("echo", v["echo"].as_bool() != Some(true)),
        ("suffix", v["suffix"].is_null()),
        ("logprobs", v["logprobs"].is_null()),
        (
            "best_of",
            v["best_of"].is_null() || v["best_of"].as_u64() == Some(1),
        ),
        ("stream", v["stream"].as_bool() != Some(true)),
    ] {
        if !ok {
            return Err(format!(
                "`{f}` is not supported on /v1/completions by cantante serve"
            ));
        }
    }
    let prompt = match &v["prompt"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        serde_json::Value::Array(_) => {
            return Err("`prompt` as a list must hold exactly one string".into())
        }
        _ => return Err("`prompt` must be a non-empty string".into()),
    };
    if prompt.is_empty() {
        return Err("`prompt` must be a non-empty string".into());
    }
    let mut as_chat = v.clone();
    as_chat["messages"] = serde_json::json!([{"role": "user", "content": ""}]);
    if let Some(o) = as_chat.as_object_mut() {
        o.remove("prompt");
    }
    let (mut reqs, seed, _) = parse_chat_request(&as_chat, opts, default_seed)?;
    for r in &mut reqs {
        r.messages.clear();
        r.raw_prompt = Some(prompt.clone());
    }
    Ok((reqs, seed))
}

/// Send `reqs` to the engine and wait for every answer.
fn run_jobs(
    reqs: Vec<Request>,
    tx: &mpsc::SyncSender<Job>,
    opts: &ServeOptions,
) -> Result<Vec<Generation>, ApiError> {
    let mut waits = Vec::with_capacity(reqs.len());
    for req in reqs {
        let (rtx, rrx) = mpsc::sync_channel(1);
        tx.send(Job { req, reply: rtx })
            .map_err(|_| server_error(503, "the server is shutting down"))?;
        waits.push(rrx);
    }
    let deadline = Instant::now() + Duration::from_secs(opts.request_timeout_secs.max(1));
    let mut gens = Vec::with_capacity(waits.len());
    for w in waits {
        let left = deadline.saturating_duration_since(Instant::now());
        match w.recv_timeout(left) {
            Ok(Ok(g)) => gens.push(g),
            Ok(Err(LlmError::BadRequest { message, .. })) => {
                let context = message.contains("exceeds the model context");
                let param = if message.contains("grammar") {
                    "response_format"
                } else {
                    "messages"
                };
                return Err(ApiError {
                    status: 400,
                    message,
                    kind: "invalid_request_error",
                    param: Some(param.into()),
                    code: context.then_some("context_length_exceeded"),
                });
            }
            Ok(Err(LlmError::Unsupported(message))) => {
                return Err(ApiError {
                    status: 400,
                    message,
                    kind: "invalid_request_error",
                    param: Some("response_format".into()),
                    code: None,
                })
            }
            Ok(Err(e)) => return Err(server_error(500, e.to_string())),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(server_error(
                    504,
                    format!("no answer within {} s", opts.request_timeout_secs),
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(server_error(503, "the server stopped before answering"))
            }
        }
    }
    Ok(gens)
}

fn check_model(v: &serde_json::Value, opts: &ServeOptions) -> Result<(), ApiError> {
    if let Some(m) = v["model"].as_str() {
        if m != opts.model_name {
            return Err(ApiError {
                status: 404,
                message: format!("model `{m}` does not exist (served: {})", opts.model_name),
                kind: "invalid_request_error",
                param: Some("model".into()),
                code: Some("model_not_found"),
            });
        }
    }
    Ok(())
}

/// A response's id number and creation time (Unix seconds).
fn stamp(ids: &AtomicU64) -> (u64, u64) {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (ids.fetch_add(1, Ordering::Relaxed), created)
}

fn finish_reason(g: &Generation) -> &'static str {
    if g.stop_reason == StopReason::Length {
        "length"
    } else {
        "stop"
    }
}

fn stop_reason_name(g: &Generation) -> &'static str {
    match g.stop_reason {
        StopReason::Eos => "eos",
        StopReason::StopString => "stop_string",
        StopReason::Length => "length",
        StopReason::Constraint => "constraint",
    }
}

/// `/v1/completions`: raw prompt in, text out (same engine, seeds and usage).
fn completion(
    body: &[u8],
    tx: &mpsc::SyncSender<Job>,
    opts: &ServeOptions,
    ids: &AtomicU64,
) -> Result<serde_json::Value, ApiError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON: {e}"), None))?;
    check_model(&v, opts)?;
    let (reqs, seed) =
        parse_completion_request(&v, opts, fresh_seed(ids)).map_err(|m| bad(m, None))?;
    let gens = run_jobs(reqs, tx, opts)?;
    let (id, created) = stamp(ids);
    let choices: Vec<serde_json::Value> = gens
        .iter()
        .enumerate()
        .map(|(i, g)| {
            serde_json::json!({"index": i, "text": g.text, "logprobs": null,
                "finish_reason": finish_reason(g)})
        })
        .collect();
    let prompt: usize = gens.first().map_or(0, |g| g.prompt_tokens);
    let completion: usize = gens.iter().map(|g| g.completion_tokens).sum();
    let reasons: Vec<&str> = gens.iter().map(stop_reason_name).collect();
    Ok(serde_json::json!({
        "id": format!("cmpl-{id}"), "object": "text_completion", "created": created,
        "model": opts.model_name, "choices": choices,
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        "cantante": {"seed": seed, "stop_reason": reasons.first().copied().unwrap_or("eos"), "stop_reasons": reasons},
    }))
}

fn chat(
    body: &[u8],
    llm: &dyn Llm,
    tx: &mpsc::SyncSender<Job>,
    opts: &ServeOptions,
    ids: &AtomicU64,
) -> Result<(serde_json::Value, bool), ApiError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON: {e}"), None))?;
    check_model(&v, opts)?;
    let (reqs, seed, stream) =
        parse_chat_request(&v, opts, fresh_seed(ids)).map_err(|m| bad(m, None))?;
    if let Some(ask) = parse_logprobs(&v, &reqs, stream).map_err(|m| bad(m, Some("logprobs")))? {
        let (id, created) = stamp(ids);
        return Ok((logprobs_answer(llm, ask, opts, id, created, seed)?, false));
    }
    let gens = run_jobs(reqs, tx, opts)?;
    let (id, created) = stamp(ids);
    let choices: Vec<serde_json::Value> = gens
        .iter()
        .enumerate()
        .map(|(i, g)| {
            serde_json::json!({"index": i, "message": {"role": "assistant", "content": g.text},
                "finish_reason": finish_reason(g)})
        })
        .collect();
    let prompt: usize = gens.first().map_or(0, |g| g.prompt_tokens);
    let completion: usize = gens.iter().map(|g| g.completion_tokens).sum();
    let reasons: Vec<&str> = gens.iter().map(stop_reason_name).collect();
    Ok((
        serde_json::json!({
            "id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": created,
            "model": opts.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "cantante": {"seed": seed, "stop_reason": reasons.first().copied().unwrap_or("eos"), "stop_reasons": reasons},
        }),
        stream,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_requests_are_validated_with_clear_messages() {
        let o = ServeOptions::default();
        let ok = serde_json::json!({"messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 5, "seed": 3, "n": 2, "stop": "x"});
        let (reqs, seed, stream) = parse_chat_request(&ok, &o, 99).unwrap();
        assert_eq!((reqs.len(), seed, stream), (2, 3, false));
        assert_eq!(
            (reqs[0].seed, reqs[1].seed, reqs[0].max_new_tokens),
            (3, 4, 5)
        );
        assert_eq!(reqs[0].stop, ["x"]);
        let none = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
        let (reqs, seed, _) = parse_chat_request(&none, &o, 99).unwrap();
        assert_eq!((seed, reqs[0].max_new_tokens), (99, 512));
        for (body, needle) in [
            (serde_json::json!({"messages": []}), "must not be empty"),
            (serde_json::json!({}), "`messages`"),
            (
                serde_json::json!({"messages": [{"role": 3, "content": "x"}]}),
                "messages[0].role",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}),
                "`max_tokens`",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}),
                "max_tokens",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "x"}], "tools": []}),
                "not supported",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "x"}], "n": 40}),
                "`n`",
            ),
            (
                serde_json::json!({"messages": [{"role": "wizard", "content": "x"}]}),
                "wizard",
            ),
        ] {
            let e = parse_chat_request(&body, &o, 1).unwrap_err();
            assert!(e.contains(needle), "{body}: {e}");
        }
        // logprobs: the next token only, a prefix through continue_final_message.
        let ask = |v: serde_json::Value| {
            let (reqs, _, stream) = parse_chat_request(&v, &o, 1).unwrap();
            parse_logprobs(&v, &reqs, stream)
        };
        let user = serde_json::json!({"role": "user", "content": "Rate it."});
        let got = ask(
            serde_json::json!({"messages": [user, {"role": "assistant", "content": "Rating: "}],
            "logprobs": true, "top_logprobs": 5, "max_tokens": 1, "continue_final_message": true}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (got.top, got.next.top, got.next.assistant_prefix.as_str()),
            (5, 5, "Rating: ")
        );
        assert_eq!(got.next.messages, vec![Message::user("Rate it.")]);
        let plain = ask(serde_json::json!({"messages": [user], "logprobs": true, "max_tokens": 1}))
            .unwrap()
            .unwrap();
        assert_eq!((plain.top, plain.next.top), (0, 1));
        assert_eq!(ask(serde_json::json!({"messages": [user]})).unwrap(), None);
        for (body, needle) in [
            (
                serde_json::json!({"messages": [user], "logprobs": true}),
                "next token only",
            ),
            (
                serde_json::json!({"messages": [user], "logprobs": true, "max_tokens": 1, "n": 2}),
                "next token only",
            ),
            (
                serde_json::json!({"messages": [user], "logprobs": "yes", "max_tokens": 1}),
                "boolean",
            ),
            (
                serde_json::json!({"messages": [user], "top_logprobs": 3, "max_tokens": 1}),
                "needs `logprobs",
            ),
            (
                serde_json::json!({"messages": [{"role": "assistant", "content": "x"}], "logprobs": true, "max_tokens": 1, "continue_final_message": true}),
                "more than",
            ),
        ] {
            let e = ask(body.clone()).unwrap_err();
            assert!(e.contains(needle), "{body}: {e}");
        }
    }
}
