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
pub mod grammar;
pub mod guard;
pub mod kernels;
pub mod model;
pub mod profile;
pub mod remote;
pub mod sampling;
pub mod scripted;
pub mod team;
pub mod tiny;
pub mod tokenizer;

use serde::{Deserialize, Serialize};

pub use grammar::Grammar;
pub use guard::OutputConstraint;
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
    /// The backend cannot do this (e.g. label probabilities from a server
    /// without logprobs).
    #[error("unsupported by this backend: {0}")]
    Unsupported(String),
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
    /// Output contract enforced while decoding by backends that can
    /// ([`guard`]); others ignore it (their callers repair formats afterwards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<OutputConstraint>,
    /// A grammar the whole reply must match, enforced while decoding by the
    /// engine built with the `grammar` feature; a backend that cannot
    /// enforce it refuses the request. Exclusive with `constraint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<Grammar>,
    /// Raw prompt text used as is instead of rendering `messages` with the
    /// chat template (the completions API); `messages` are then ignored by
    /// the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_prompt: Option<String>,
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
            constraint: None,
            grammar: None,
            raw_prompt: None,
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
            constraint: None,
            grammar: None,
            raw_prompt: None,
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
    /// Builder: set the output grammar.
    pub fn with_grammar(mut self, g: Grammar) -> Self {
        self.grammar = Some(g);
        self
    }
    /// Builder: set the output constraint.
    pub fn with_constraint(mut self, c: OutputConstraint) -> Self {
        self.constraint = Some(c);
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
    /// The request's output constraint was met (the last required tag
    /// closed) or its grammar allows nothing more.
    Constraint,
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
    /// Tag literals the output constraint forced into the text (e.g.
    /// `</prediction>`), in order; empty when the model wrote them itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forced: Vec<String>,
    /// The reply ran into `max_new_tokens`: it stopped at the limit, or the
    /// output constraint had to force the missing tags to fit the budget
    /// (as opposed to wrapping up after the model chose to end).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cut_off: bool,
}

/// A closed question answered with one label token: the model's probability
/// of each choice as the next token after `messages` (rendered with the
/// assistant's turn opened) and `assistant_prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChoiceRequest {
    /// The conversation; the model answers as the assistant.
    pub messages: Vec<Message>,
    /// Text the assistant's reply starts with (e.g. `Answer:`), before the label.
    pub assistant_prefix: String,
    /// The labels; each must be exactly one token after the prefix, all distinct.
    pub choices: Vec<String>,
}

/// The model's probabilities of the choices of a [`ChoiceRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceScores {
    /// Log-probability of each choice token under the full vocabulary.
    pub logprobs: Vec<f64>,
    /// The choices' probabilities renormalised to sum to 1.
    pub probs: Vec<f64>,
    /// Total probability on the choices (how much the model "answers the
    /// question" at all; low coverage means the scores are unreliable).
    pub coverage: f64,
}

impl ChoiceScores {
    /// Scores from the choices' log-probabilities.
    pub fn from_logprobs(logprobs: Vec<f64>) -> Self {
        let p: Vec<f64> = logprobs.iter().map(|l| l.exp()).collect();
        let coverage: f64 = p.iter().sum();
        let probs = if coverage > 0.0 {
            p.iter().map(|x| x / coverage).collect()
        } else {
            vec![1.0 / p.len().max(1) as f64; p.len()]
        };
        Self {
            logprobs,
            probs,
            coverage,
        }
    }
    /// Probability-weighted mean of `values` (one per choice).
    pub fn expectation(&self, values: &[f64]) -> f64 {
        self.probs.iter().zip(values).map(|(p, v)| p * v).sum()
    }
}

/// The most likely next tokens after a conversation and an assistant prefix
/// ([`Llm::top_logprobs`]; what an OpenAI `top_logprobs` answer carries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextTokenRequest {
    /// The conversation; the model answers as the assistant.
    pub messages: Vec<Message>,
    /// Text the assistant's reply starts with, before the next token.
    pub assistant_prefix: String,
    /// How many of the most likely tokens to return (at least 1).
    pub top: usize,
}

/// One candidate next token and its log-probability under the full vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's text (U+FFFD for a token holding part of a character).
    pub token: String,
    /// Natural-log probability (no temperature applied).
    pub logprob: f64,
}

/// The answer to a [`NextTokenRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NextTokens {
    /// Tokens of the rendered prompt (conversation plus assistant prefix).
    pub prompt_tokens: usize,
    /// The most likely next tokens, most likely first.
    pub top: Vec<TokenLogprob>,
}

/// What [`RequestQueue::next`] hands to a serving backend.
#[derive(Debug)]
pub enum Next {
    /// A request to start now, under the caller's id.
    Ready(usize, Request),
    /// Nothing to start now; more requests may come later.
    Wait,
    /// No request will ever come again: finish what is running and return.
    Closed,
}

/// The two ends of a streaming [`Llm::serve`] call: the backend pulls requests
/// from [`RequestQueue::next`] while it runs, and hands each answer to
/// [`RequestQueue::done`] as soon as it is finished, so a caller can submit a
/// follow-up request (the next agent of a run) that joins the running batch.
pub trait RequestQueue {
    /// The next request to start. With `block` the backend has nothing else to
    /// do: the queue should wait until it has a request ([`Next::Ready`]) or
    /// knows none will come ([`Next::Closed`]); [`Next::Wait`] is then treated
    /// like a short sleep.
    fn next(&mut self, block: bool) -> Next;
    /// The answer to request `id`. A request the backend rejects gets
    /// `Err(LlmError::BadRequest)` here and the call goes on; any other error
    /// ends [`Llm::serve`] itself.
    fn done(&mut self, id: usize, result: Result<Generation>);
}

/// Counters of the work a serving backend did (for benchmarks and reports).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineStats {
    /// Prompt tokens of all requests.
    pub prompt_tokens: usize,
    /// Prompt tokens actually computed (the rest came from reused prefixes).
    pub prefill_computed: usize,
    /// Prompt tokens served from reused prefixes.
    pub prefix_reused: usize,
    /// Tokens generated.
    pub generated: usize,
    /// Packed forward passes run.
    pub forwards: usize,
    /// Forward passes that decoded at least one sequence.
    pub decode_steps: usize,
    /// Sum over decode steps of the sequences decoded in that step.
    pub decode_rows: usize,
    /// Decode steps that ran with as many sequences as the batch limit allows.
    pub full_steps: usize,
    /// The batch limit ([`engine::EngineOptions::max_batch`]).
    pub max_batch: usize,
}

impl EngineStats {
    /// Mean number of sequences per decode step.
    pub fn mean_batch(&self) -> f64 {
        self.decode_rows as f64 / self.decode_steps.max(1) as f64
    }
    /// Mean decode batch as a fraction of the batch limit.
    pub fn batch_fill(&self) -> f64 {
        self.mean_batch() / self.max_batch.max(1) as f64
    }
    /// Fraction of decode steps at the batch limit.
    pub fn full_fraction(&self) -> f64 {
        self.full_steps as f64 / self.decode_steps.max(1) as f64
    }
    /// Counters accumulated since `earlier` (same backend).
    pub fn since(&self, earlier: &EngineStats) -> EngineStats {
        EngineStats {
            prompt_tokens: self.prompt_tokens.saturating_sub(earlier.prompt_tokens),
            prefill_computed: self
                .prefill_computed
                .saturating_sub(earlier.prefill_computed),
            prefix_reused: self.prefix_reused.saturating_sub(earlier.prefix_reused),
            generated: self.generated.saturating_sub(earlier.generated),
            forwards: self.forwards.saturating_sub(earlier.forwards),
            decode_steps: self.decode_steps.saturating_sub(earlier.decode_steps),
            decode_rows: self.decode_rows.saturating_sub(earlier.decode_rows),
            full_steps: self.full_steps.saturating_sub(earlier.full_steps),
            max_batch: self.max_batch,
        }
    }
    /// One line for logs and CLI summaries.
    pub fn summary(&self) -> String {
        format!(
            "{} decode steps, mean batch {:.1} of {} ({:.0}% full), {:.0}% of steps at the limit; prompt tokens {} ({} computed, {} from reused prefixes), {} generated",
            self.decode_steps,
            self.mean_batch(),
            self.max_batch,
            100.0 * self.batch_fill(),
            100.0 * self.full_fraction(),
            self.prompt_tokens,
            self.prefill_computed,
            self.prefix_reused,
            self.generated
        )
    }
}

/// [`Llm::serve`] for a backend that only has [`Llm::generate`]: whatever the
/// queue holds is sent as one batch, answers are delivered, and the queue is
/// asked again (a request rejected with [`LlmError::BadRequest`] gets its
/// error and the rest of the batch is resent).
pub fn serve_in_batches<L: Llm + ?Sized>(llm: &L, queue: &mut dyn RequestQueue) -> Result<()> {
    loop {
        let mut ids = Vec::new();
        let mut reqs = Vec::new();
        let mut closed = false;
        loop {
            match queue.next(reqs.is_empty()) {
                Next::Ready(id, r) => {
                    ids.push(id);
                    reqs.push(r);
                }
                Next::Wait => {
                    if reqs.is_empty() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        continue;
                    }
                    break;
                }
                Next::Closed => {
                    closed = true;
                    break;
                }
            }
        }
        if !reqs.is_empty() {
            for (k, (id, g)) in ids
                .into_iter()
                .zip(generate_isolating(llm, reqs)?)
                .enumerate()
            {
                queue.done(
                    id,
                    g.map_err(|message| LlmError::BadRequest { index: k, message }),
                );
            }
        }
        if closed {
            return Ok(());
        }
    }
}

impl<L: Llm + ?Sized> Llm for Box<L> {
    fn generate(&self, requests: &[Request]) -> Result<Vec<Generation>> {
        (**self).generate(requests)
    }
    fn serve(&self, queue: &mut dyn RequestQueue) -> Result<()> {
        (**self).serve(queue)
    }
    fn engine_stats(&self) -> Option<EngineStats> {
        (**self).engine_stats()
    }
    fn score_choices(&self, requests: &[ChoiceRequest]) -> Result<Vec<ChoiceScores>> {
        (**self).score_choices(requests)
    }
    fn top_logprobs(&self, requests: &[NextTokenRequest]) -> Result<Vec<NextTokens>> {
        (**self).top_logprobs(requests)
    }
    fn count_tokens(&self, text: &str) -> usize {
        (**self).count_tokens(text)
    }
    fn truncate_tokens(&self, text: &str, max_tokens: usize) -> String {
        (**self).truncate_tokens(text, max_tokens)
    }
    fn model_id(&self) -> String {
        (**self).model_id()
    }
}

/// Generate a batch; a request the model rejects ([`LlmError::BadRequest`],
/// e.g. a history longer than the context) gets `Err(message)` and the rest
/// is resent. Any other error aborts.
pub fn generate_isolating<L: Llm + ?Sized>(
    llm: &L,
    mut reqs: Vec<Request>,
) -> Result<Vec<std::result::Result<Generation, String>>> {
    let mut alive: Vec<usize> = (0..reqs.len()).collect();
    let mut out: Vec<Option<std::result::Result<Generation, String>>> =
        (0..reqs.len()).map(|_| None).collect();
    while !reqs.is_empty() {
        match llm.generate(&reqs) {
            Ok(gens) => {
                if gens.len() != reqs.len() {
                    return Err(LlmError::Other(format!(
                        "model returned {} generations for {} requests",
                        gens.len(),
                        reqs.len()
                    )));
                }
                for (i, g) in alive.iter().zip(gens) {
                    out[*i] = Some(Ok(g));
                }
                break;
            }
            Err(LlmError::BadRequest { index, message }) if index < reqs.len() => {
                out[alive[index]] = Some(Err(message));
                alive.remove(index);
                reqs.remove(index);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err("no generation".into())))
        .collect())
}

/// A batched language model. Implementations must return one generation per
/// request, in request order, and a request's text must not depend on the
/// other requests of the batch.
pub trait Llm: Send + Sync {
    /// Generate answers for a batch of requests.
    fn generate(&self, requests: &[Request]) -> Result<Vec<Generation>>;
    /// Serve requests as they arrive (see [`RequestQueue`]); a request's text
    /// is the same as [`Llm::generate`] gives it alone. The default sends
    /// whatever is queued as one `generate` batch at a time; the in-process
    /// engine admits new requests into its running batch at every decode step.
    fn serve(&self, queue: &mut dyn RequestQueue) -> Result<()> {
        serve_in_batches(self, queue)
    }
    /// Work counters of the backend since it started, when it keeps them.
    fn engine_stats(&self) -> Option<EngineStats> {
        None
    }
    /// Label probabilities for closed questions (batched, deterministic, the
    /// same alone or in a batch). A choice that is not exactly one token after
    /// the prefix, or a duplicate, is a [`LlmError::BadRequest`]; backends
    /// without access to probabilities return [`LlmError::Unsupported`].
    fn score_choices(&self, requests: &[ChoiceRequest]) -> Result<Vec<ChoiceScores>> {
        let _ = requests;
        Err(LlmError::Unsupported(format!(
            "{} cannot score choices (no token probabilities)",
            self.model_id()
        )))
    }
    /// The `top` most likely next tokens of each request, most likely first
    /// (ties by token id); batched and deterministic like
    /// [`Llm::score_choices`]. Backends without probabilities return
    /// [`LlmError::Unsupported`].
    fn top_logprobs(&self, requests: &[NextTokenRequest]) -> Result<Vec<NextTokens>> {
        let _ = requests;
        Err(LlmError::Unsupported(format!(
            "{} cannot return token probabilities",
            self.model_id()
        )))
    }
    /// Number of tokens of `text` under this model's tokenizer (no special tokens).
    fn count_tokens(&self, text: &str) -> usize;
    /// Truncate `text` to at most `max_tokens` tokens (token boundary, lossless prefix).
    fn truncate_tokens(&self, text: &str, max_tokens: usize) -> String;
    /// A short identifier of the model (used in cache keys and reports).
    fn model_id(&self) -> String;
}
