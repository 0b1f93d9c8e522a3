//! An [`Llm`] over an OpenAI-compatible HTTP server (vLLM, SGLang,
//! llama.cpp's `llama-server`, llama-cpp-python, Ollama, or `cantante serve`),
//! so the optimizer drives a serving cluster through the same trait as the
//! in-process engine (not in the paper, which calls hosted APIs the same way).
//!
//! Each [`Request`] is one `/v1/chat/completions` call (`/v1/completions`
//! for a request with a raw prompt); a batch is sent as
//! bounded concurrent requests (`concurrency`). Every sampling field is sent
//! explicitly so server defaults never leak in; `max_tokens` and
//! `max_completion_tokens` carry the same value; token counts come from the
//! server's `usage` (a response without it is an error). Connection errors,
//! 429 and 5xx are retried with exponential backoff; any other failure is an
//! error naming the request.
//!
//! Token counts before dispatch (field caps, budgets) use a local tokenizer
//! when one is given (`tokenizer`: a GGUF or tokenizer.json of the served
//! model), else an approximation of one token per 4 bytes of UTF-8
//! ([`approx_tokens`]), which [`OpenAiLlm::connect`] compares with the
//! server's count of a probe and logs.
//!
//! Label probabilities ([`Llm::score_choices`], the judge attributer) and
//! [`Llm::top_logprobs`] are one-token chat completions with `logprobs` and
//! `top_logprobs` ([`TOP_LOGPROBS`], OpenAI's maximum); an assistant prefix
//! is sent as a final assistant message with `continue_final_message: true`
//! and `add_generation_prompt: false` (vLLM's and SGLang's extension, which
//! `cantante serve` also implements). A choice the server does not list
//! among its top tokens gets probability 0 (so the judge sees low coverage,
//! never a made-up score); a server that answers without `logprobs`, or
//! rejects the request with a 4xx, makes these calls
//! [`LlmError::Unsupported`] and the optimizer falls back to the generative
//! attributer.
//!
//! Determinism: a request's text depends on the server. vLLM and SGLang batch
//! and cache without batch invariance by default, so the same seed can give a
//! different text; `model_id` carries the server's name so caches and reports
//! never mix remote and local runs.

use super::tokenizer::Tokenizer;
use super::{
    ChoiceRequest, ChoiceScores, Generation, Llm, LlmError, Message, NextTokenRequest, NextTokens,
    Request, Result, Role, StopReason, TokenLogprob,
};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Base URL ending in `/v1`, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// Served model name; `None` = the first of `/v1/models`.
    pub model: Option<String>,
    /// Name of the environment variable holding the API key, if any.
    pub api_key_env: Option<String>,
    /// Local tokenizer of the served model (GGUF or tokenizer.json).
    pub tokenizer: Option<std::path::PathBuf>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Seconds a single call may take.
    pub timeout_secs: u64,
    /// Retries of a call after a connection error, 429 or 5xx.
    pub retries: usize,
}

impl RemoteOptions {
    /// Defaults for `base_url`: first served model, no key, approximate
    /// counts, 16 concurrent requests, 600 s per call, 4 retries.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: None,
            api_key_env: None,
            tokenizer: None,
            concurrency: 16,
            timeout_secs: 600,
            retries: 4,
        }
    }
}

/// Whether a model argument names an OpenAI-compatible server.
pub fn is_remote(spec: &str) -> bool {
    spec.starts_with("http://") || spec.starts_with("https://")
}

/// Approximate token count without a tokenizer: one token per 4 bytes.
pub fn approx_tokens(text: &str) -> usize {
    text.len().div_ceil(4)
}

/// The OpenAI-compatible backend.
pub struct OpenAiLlm {
    agent: ureq::Agent,
    base: String,
    model: String,
    key: Option<String>,
    tokenizer: Option<Tokenizer>,
    concurrency: usize,
    retries: usize,
    retried: AtomicUsize,
    sent: AtomicUsize,
}

fn other(msg: String) -> LlmError {
    LlmError::Other(msg)
}

impl OpenAiLlm {
    /// Connect: read the key, load the tokenizer, pick the model from
    /// `/v1/models` (or check the requested one is served).
    pub fn connect(opts: RemoteOptions) -> Result<Self> {
        let key = match &opts.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                other(format!(
                    "--api-key-env {var}: the environment variable is not set"
                ))
            })?),
            None => None,
        };
        let tokenizer = match &opts.tokenizer {
            None => None,
            Some(p) => Some(load_tokenizer(p)?),
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(opts.timeout_secs.max(1)))
            .build();
        let mut me = Self {
            agent,
            base: opts.base_url.trim_end_matches('/').to_string(),
            model: String::new(),
            key,
            tokenizer,
            concurrency: opts.concurrency.max(1),
            retries: opts.retries,
            retried: AtomicUsize::new(0),
            sent: AtomicUsize::new(0),
        };
        let served = me.models()?;
        me.model = match opts.model {
            Some(m) if served.contains(&m) || served.is_empty() => m,
            Some(m) => {
                return Err(other(format!(
                    "{}: model `{m}` is not served (served: {})",
                    me.base,
                    served.join(", ")
                )))
            }
            None => served
                .first()
                .cloned()
                .ok_or_else(|| other(format!("{}/models lists no model", me.base)))?,
        };
        me.check_counts();
        Ok(me)
    }

    /// Names listed by `/v1/models`.
    pub fn models(&self) -> Result<Vec<String>> {
        let url = format!("{}/models", self.base);
        let v = self.call(&url, None, "GET /models")?;
        Ok(v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Calls retried so far (after 429, 5xx or a connection error).
    pub fn retries_done(&self) -> usize {
        self.retried.load(Ordering::Relaxed)
    }

    /// HTTP calls sent so far (retries included).
    pub fn calls_sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Compare the local count of a probe with the server's `usage`, and log it.
    fn check_counts(&self) {
        let probe = Request::user("Reply with one word: hello.", 1);
        let Ok(g) = self.chat(0, &probe) else {
            tracing::warn!(
                "{}: probe request failed; token counts unchecked",
                self.base
            );
            return;
        };
        let local = self.count_tokens(&probe.messages[0].content);
        tracing::info!(
            server_prompt_tokens = g.prompt_tokens,
            local_message_tokens = local,
            exact = self.tokenizer.is_some(),
            "remote token counts (the server's include the chat template)"
        );
    }

    fn call(
        &self,
        url: &str,
        body: Option<&serde_json::Value>,
        what: &str,
    ) -> Result<serde_json::Value> {
        self.call_status(url, body, what).map_err(|(_, e)| e)
    }

    /// [`OpenAiLlm::call`], telling a request the server rejected (4xx other
    /// than 429: `true`) from one that failed.
    fn call_status(
        &self,
        url: &str,
        body: Option<&serde_json::Value>,
        what: &str,
    ) -> std::result::Result<serde_json::Value, (bool, LlmError)> {
        let mut attempt = 0;
        loop {
            self.sent.fetch_add(1, Ordering::Relaxed);
            let mut req = match body {
                Some(_) => self.agent.post(url),
                None => self.agent.get(url),
            };
            if let Some(k) = &self.key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let res = match body {
                Some(b) => req.send_json(b.clone()),
                None => req.call(),
            };
            let retryable = match res {
                Ok(r) => {
                    return r.into_json::<serde_json::Value>().map_err(|e| {
                        (
                            false,
                            other(format!("{what}: unreadable response from {url}: {e}")),
                        )
                    })
                }
                Err(ureq::Error::Status(code, r)) => {
                    let text = r.into_string().unwrap_or_default();
                    if code == 429 || code >= 500 {
                        format!(
                            "HTTP {code}: {}",
                            text.chars().take(300).collect::<String>()
                        )
                    } else {
                        return Err((
                            true,
                            other(format!(
                                "{what}: {url} answered HTTP {code}: {}",
                                text.chars().take(500).collect::<String>()
                            )),
                        ));
                    }
                }
                Err(ureq::Error::Transport(t)) => format!("connection error: {t}"),
            };
            if attempt >= self.retries {
                return Err((
                    false,
                    other(format!(
                        "{what}: {url} failed after {} attempts: {retryable}",
                        attempt + 1
                    )),
                ));
            }
            attempt += 1;
            self.retried.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("{what}: {retryable}; retry {attempt} of {}", self.retries);
            std::thread::sleep(Duration::from_millis(200 << attempt.min(6)));
        }
    }

    /// One chat completion for request `index` (a text completion when the
    /// request carries a raw prompt).
    fn chat(&self, index: usize, r: &Request) -> Result<Generation> {
        let mut body = chat_body(&self.model, r);
        let url = match &r.raw_prompt {
            Some(p) => {
                if let Some(o) = body.as_object_mut() {
                    o.remove("messages");
                    o.remove("max_completion_tokens");
                }
                body["prompt"] = p.clone().into();
                format!("{}/completions", self.base)
            }
            None => format!("{}/chat/completions", self.base),
        };
        let v = self.call(&url, Some(&body), &format!("request {index}"))?;
        parse_chat_response(&v).map_err(|m| other(format!("request {index}: {m}")))
    }

    /// The most likely next tokens for request `index` (a one-token chat
    /// completion with `top_logprobs`).
    fn next_tokens(&self, index: usize, r: &NextTokenRequest) -> Result<NextTokens> {
        let body = logprobs_body(&self.model, r);
        let url = format!("{}/chat/completions", self.base);
        let what = format!("logprobs request {index}");
        let v = self
            .call_status(&url, Some(&body), &what)
            .map_err(|(rejected, e)| {
                if rejected {
                    LlmError::Unsupported(format!("{e} (the server rejects logprobs requests)"))
                } else {
                    e
                }
            })?;
        parse_top_logprobs(&v).map_err(|m| LlmError::Unsupported(format!("{what} to {url}: {m}")))
    }

    /// Run `f` on requests `0..n` with at most `concurrency` in flight;
    /// results in request order.
    fn in_parallel<T: Send>(
        &self,
        n: usize,
        f: impl Fn(usize) -> Result<T> + Sync,
    ) -> Vec<Result<T>> {
        let next = AtomicUsize::new(0);
        let mut slots: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
        let workers = self.concurrency.min(n).max(1);
        let results = std::sync::Mutex::new(&mut slots);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let g = f(i);
                    if let Ok(mut r) = results.lock() {
                        r[i] = Some(g);
                    }
                });
            }
        });
        slots
            .into_iter()
            .enumerate()
            .map(|(i, g)| g.unwrap_or_else(|| Err(other(format!("request {i} was not sent")))))
            .collect()
    }
}

/// `top_logprobs` asked of a server: OpenAI's maximum.
pub const TOP_LOGPROBS: usize = 20;

/// The JSON body of a one-token chat completion returning the `top` most
/// likely next tokens after `r`'s messages and assistant prefix.
pub fn logprobs_body(model: &str, r: &NextTokenRequest) -> serde_json::Value {
    let mut messages = r.messages.clone();
    let prefixed = !r.assistant_prefix.is_empty();
    if prefixed {
        messages.push(Message::assistant(r.assistant_prefix.clone()));
    }
    let probe = Request {
        messages,
        ..Request::user("", 1)
    };
    let mut body = chat_body(model, &probe);
    body["temperature"] = 0.0.into();
    body["top_p"] = 1.0.into();
    body["logprobs"] = true.into();
    body["top_logprobs"] = r.top.clamp(1, TOP_LOGPROBS).into();
    if prefixed {
        body["continue_final_message"] = true.into();
        body["add_generation_prompt"] = false.into();
    }
    body
}

/// The first generated token's `top_logprobs` and the prompt's token count
/// from a chat-completion response.
pub fn parse_top_logprobs(v: &serde_json::Value) -> std::result::Result<NextTokens, String> {
    let first = &v["choices"][0]["logprobs"]["content"][0];
    let top = first["top_logprobs"]
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| format!("response without top_logprobs: {}", short(v)))?;
    let top = top
        .iter()
        .map(|t| {
            Some(TokenLogprob {
                token: t["token"].as_str()?.to_string(),
                logprob: t["logprob"].as_f64()?,
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("malformed top_logprobs entry: {}", short(first)))?;
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
    Ok(NextTokens { prompt_tokens, top })
}

/// Choice scores from a backend's most likely next tokens: a choice's
/// log-probability is that of the token with exactly its text, and a choice
/// not among them gets probability 0 (lowering the coverage).
pub fn scores_from_top(choices: &[String], top: &[TokenLogprob]) -> ChoiceScores {
    let lp = choices
        .iter()
        .map(|c| {
            top.iter()
                .find(|t| &t.token == c)
                .map_or(f64::NEG_INFINITY, |t| t.logprob)
        })
        .collect();
    ChoiceScores::from_logprobs(lp)
}

fn load_tokenizer(p: &Path) -> Result<Tokenizer> {
    if p.extension().is_some_and(|e| e == "gguf") {
        let mut f = std::fs::File::open(p).map_err(|source| LlmError::Io {
            path: p.display().to_string(),
            source,
        })?;
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f).map_err(|e| {
            LlmError::BadModel {
                path: p.display().to_string(),
                message: format!("not a readable GGUF file: {e}"),
            }
        })?;
        let (json, _) =
            super::gguf_tokenizer::tokenizer_json_from_gguf(&ct, &p.display().to_string())?;
        Tokenizer::from_json_str(&json.to_string())
    } else {
        Tokenizer::from_file(p)
    }
}

/// The JSON body of a chat completion for `r` (every sampling field explicit).
pub fn chat_body(model: &str, r: &Request) -> serde_json::Value {
    let messages: Vec<serde_json::Value> = r
        .messages
        .iter()
        .map(|m| {
            // OpenAI tool messages need a tool_call_id; ours are plain results.
            let role = if m.role == Role::Tool {
                "user"
            } else {
                m.role.as_str()
            };
            serde_json::json!({ "role": role, "content": m.content })
        })
        .collect();
    let mut body = serde_json::json!({
        "model": model,
        "messages": messages,
        "max_tokens": r.max_new_tokens,
        "max_completion_tokens": r.max_new_tokens,
        "temperature": r.sampling.temperature,
        "top_p": r.sampling.top_p,
        // int64 for vLLM; `cantante serve` reads the full 64-bit seed from the
        // extension field (other servers ignore it), so its texts equal the
        // in-process engine's.
        "seed": r.seed & 0x7fff_ffff_ffff_ffff,
        "cantante_seed": r.seed,
    });
    if r.sampling.top_k > 0 {
        body["top_k"] = r.sampling.top_k.into();
    }
    if !r.stop.is_empty() {
        body["stop"] = r.stop.clone().into();
    }
    if let Some(g) = &r.grammar {
        g.to_openai_body(&mut body);
    }
    body
}

/// A [`Generation`] from a chat-completion response.
pub fn parse_chat_response(v: &serde_json::Value) -> std::result::Result<Generation, String> {
    let choice = v["choices"]
        .get(0)
        .ok_or_else(|| format!("response without choices: {}", short(v)))?;
    // Chat completions answer in `message.content`, text completions in `text`.
    let text = choice["message"]["content"]
        .as_str()
        .or(choice["text"].as_str())
        .unwrap_or("")
        .to_string();
    let usage = &v["usage"];
    let (Some(p), Some(c)) = (
        usage["prompt_tokens"].as_u64(),
        usage["completion_tokens"].as_u64(),
    ) else {
        return Err(format!("response without usage counts: {}", short(v)));
    };
    let stop_reason = match choice["finish_reason"].as_str() {
        Some("length") => StopReason::Length,
        _ => {
            // vLLM's `stop_reason` / SGLang's `matched_stop` name a matched stop string.
            let matched = choice["stop_reason"]
                .as_str()
                .or(choice["matched_stop"].as_str())
                .or(v["cantante"]["stop_reason"].as_str());
            match matched {
                Some("constraint") => StopReason::Constraint,
                Some("eos") | None => StopReason::Eos,
                Some(_) => StopReason::StopString,
            }
        }
    };
    let forced = v["cantante"]["forced"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    Ok(Generation {
        text,
        prompt_tokens: p as usize,
        completion_tokens: c as usize,
        cut_off: stop_reason == StopReason::Length,
        stop_reason,
        forced,
    })
}

fn short(v: &serde_json::Value) -> String {
    v.to_string().chars().take(300).collect()
}

impl Llm for OpenAiLlm {
    fn generate(&self, requests: &[Request]) -> Result<Vec<Generation>> {
        self.in_parallel(requests.len(), |i| self.chat(i, &requests[i]))
            .into_iter()
            .collect()
    }

    fn top_logprobs(&self, requests: &[NextTokenRequest]) -> Result<Vec<NextTokens>> {
        self.in_parallel(requests.len(), |i| self.next_tokens(i, &requests[i]))
            .into_iter()
            .collect()
    }

    fn score_choices(&self, requests: &[ChoiceRequest]) -> Result<Vec<ChoiceScores>> {
        for (index, r) in requests.iter().enumerate() {
            let mut seen = std::collections::BTreeSet::new();
            if r.choices.is_empty() {
                return Err(LlmError::BadRequest {
                    index,
                    message: "no choices".into(),
                });
            }
            if let Some(c) = r.choices.iter().find(|c| !seen.insert(c.as_str())) {
                return Err(LlmError::BadRequest {
                    index,
                    message: format!("choice {c:?} duplicates another choice"),
                });
            }
            if let Some(t) = &self.tokenizer {
                if let Some(c) = r.choices.iter().find(|c| t.count(c) != 1) {
                    return Err(LlmError::BadRequest {
                        index,
                        message: format!("choice {c:?} is not exactly one token"),
                    });
                }
            }
        }
        let asks: Vec<NextTokenRequest> = requests
            .iter()
            .map(|r| NextTokenRequest {
                messages: r.messages.clone(),
                assistant_prefix: r.assistant_prefix.clone(),
                top: TOP_LOGPROBS,
            })
            .collect();
        let tops = self.top_logprobs(&asks)?;
        Ok(requests
            .iter()
            .zip(&tops)
            .map(|(r, t)| scores_from_top(&r.choices, &t.top))
            .collect())
    }

    fn count_tokens(&self, text: &str) -> usize {
        match &self.tokenizer {
            Some(t) => t.count(text),
            None => approx_tokens(text),
        }
    }

    fn truncate_tokens(&self, text: &str, max_tokens: usize) -> String {
        match &self.tokenizer {
            Some(t) => t.truncate(text, max_tokens),
            None => {
                let mut end = text.len().min(max_tokens.saturating_mul(4));
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text[..end].to_string()
            }
        }
    }

    fn model_id(&self) -> String {
        format!("openai:{}@{}", self.model, self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_carries_every_sampling_field_and_both_token_caps() {
        let r = Request::user("hi", 7)
            .with_seed(u64::MAX)
            .with_stop(vec!["</x>".into()]);
        let b = chat_body("m", &r);
        assert_eq!(b["max_tokens"], 7);
        assert_eq!(b["max_completion_tokens"], 7);
        assert_eq!(b["temperature"], 0.0);
        assert_eq!(b["seed"], 0x7fff_ffff_ffff_ffffu64);
        assert_eq!(b["stop"][0], "</x>");
        assert!(b.get("top_k").is_none());
    }

    #[test]
    fn responses_map_finish_reasons_and_need_usage() {
        let ok = serde_json::json!({"choices": [{"message": {"content": "a"}, "finish_reason": "stop", "stop_reason": "</x>"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}});
        let g = parse_chat_response(&ok).unwrap();
        assert_eq!(
            (g.stop_reason, g.prompt_tokens),
            (StopReason::StopString, 3)
        );
        let eos = serde_json::json!({"choices": [{"message": {"content": null}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}});
        let g = parse_chat_response(&eos).unwrap();
        assert_eq!((g.stop_reason, g.text.as_str()), (StopReason::Eos, ""));
        let len = serde_json::json!({"choices": [{"message": {"content": "x"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 9}});
        assert_eq!(
            parse_chat_response(&len).unwrap().stop_reason,
            StopReason::Length
        );
        let no_usage = serde_json::json!({"choices": [{"message": {"content": "x"}}]});
        assert!(parse_chat_response(&no_usage)
            .unwrap_err()
            .contains("usage"));
    }
}
