//! Language-model layer: the batched [`Llm`] trait every other module talks to,
//! the request/generation types, a scripted implementation for tests, and the
//! in-process Candle engine ([`engine`]) that runs open-weight models.
//!
//! In the paper every agent call, attribution call and prompt rewrite goes to an
//! LLM; here all of them go through [`Llm::generate`], which takes a whole batch
//! of requests so the engine can run them as a few large forward passes.

pub mod chat;
pub mod cpu;
pub mod engine;
pub mod gguf_tokenizer;
pub mod kernels;
pub mod model;
pub mod profile;
pub mod sampling;
pub mod scripted;
pub mod team;
pub mod tiny;
pub mod tokenizer;

use serde::{Deserialize, Serialize};

pub use scripted::ScriptedLlm;

/// Errors raised by the language-model layer.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// A model or tokenizer file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File that failed.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A model file is malformed, truncated or of an unsupported architecture.
    #[error("model file {path}: {message}")]
    BadModel {
        /// File that failed.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The tokenizer could not be built or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A request is invalid (e.g. empty messages, prompt longer than the context).
    #[error("request {index}: {message}")]
    BadRequest {
        /// Position of the request in the batch.
        index: usize,
        /// What is wrong with it.
        message: String,
    },
    /// An error inside the tensor library.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// Any other failure (e.g. a scripted model refusing a prompt).
    #[error("{0}")]
    Other(String),
}

/// Result type of the LLM layer.
pub type Result<T> = std::result::Result<T, LlmError>;

/// Speaker of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System instruction.
    System,
    /// User turn.
    User,
    /// Model turn.
    Assistant,
    /// Tool result turn (rendered as a user turn by templates without tool support).
    Tool,
}

impl Role {
    /// The role's name as chat templates expect it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl Message {
    /// A system message.
    pub fn system(s: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: s.into(),
        }
    }
    /// A user message.
    pub fn user(s: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: s.into(),
        }
    }
    /// An assistant message.
    pub fn assistant(s: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: s.into(),
        }
    }
    /// A tool-result message.
    pub fn tool(s: impl Into<String>) -> Self {
        Self {
            role: Role::Tool,
            content: s.into(),
        }
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Softmax temperature; `0.0` means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling threshold in (0, 1]; `1.0` disables it.
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens; `0` disables it.
    pub top_k: usize,
}

impl Sampling {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
        }
    }
    /// Plain temperature sampling.
    pub fn temperature(t: f64) -> Self {
        Self {
            temperature: t,
            top_p: 1.0,
            top_k: 0,
        }
    }
    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

/// One generation request: a chat, how long to generate, how to sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The conversation so far; the model answers as the assistant.
    pub messages: Vec<Message>,
    /// Maximum number of new tokens.
    pub max_new_tokens: usize,
    /// Sampling parameters.
    pub sampling: Sampling,
    /// Seed of this request's own RNG (text never depends on batch composition).
    pub seed: u64,
    /// Generation stops when any of these strings appears in the output (it is cut before it).
    pub stop: Vec<String>,
}

impl Request {
    /// A greedy request with one user message.
    pub fn user(prompt: impl Into<String>, max_new_tokens: usize) -> Self {
        Self {
            messages: vec![Message::user(prompt)],
            max_new_tokens,
            sampling: Sampling::greedy(),
            seed: 0,
            stop: Vec::new(),
        }
    }
    /// A request from a system and a user message.
    pub fn chat(system: &str, user: &str, max_new_tokens: usize) -> Self {
        let mut messages = Vec::new();
        if !system.is_empty() {
            messages.push(Message::system(system));
        }
        messages.push(Message::user(user));
        Self {
            messages,
            max_new_tokens,
            sampling: Sampling::greedy(),
            seed: 0,
            stop: Vec::new(),
        }
    }
    /// Builder: set sampling.
    pub fn with_sampling(mut self, s: Sampling) -> Self {
        self.sampling = s;
        self
    }
    /// Builder: set seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Builder: add stop strings.
    pub fn with_stop(mut self, stop: Vec<String>) -> Self {
        self.stop = stop;
        self
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string appeared.
    StopString,
    /// `max_new_tokens` was reached.
    Length,
}

/// The answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Generated text (stop string and EOS excluded).
    pub text: String,
    /// Exact number of prompt tokens after the chat template.
    pub prompt_tokens: usize,
    /// Exact number of generated tokens (including a final EOS token if produced).
    pub completion_tokens: usize,
    /// Why generation ended.
    pub stop_reason: StopReason,
}

/// A batched language model. Implementations must return one generation per
/// request, in request order, and a request's text must not depend on the
/// other requests of the batch.
pub trait Llm: Send + Sync {
    /// Generate answers for a batch of requests.
    fn generate(&self, requests: &[Request]) -> Result<Vec<Generation>>;
    /// Number of tokens of `text` under this model's tokenizer (no special tokens).
    fn count_tokens(&self, text: &str) -> usize;
    /// Truncate `text` to at most `max_tokens` tokens (token boundary, lossless prefix).
    fn truncate_tokens(&self, text: &str, max_tokens: usize) -> String;
    /// A short identifier of the model (used in cache keys and reports).
    fn model_id(&self) -> String;
}
