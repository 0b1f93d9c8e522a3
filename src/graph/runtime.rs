//! Batched executor of the agent graph (reference spec §1.3, §1.4, with the
//! §10 defects fixed).
//!
//! [`run_batch`] executes many runs (one prompt configuration × one query
//! each) together. By default ([`Schedule::Continuous`], in
//! `graph/continuous.rs`) every run advances on its own and its requests
//! join the backend's running batch as soon as they are known; the
//! super-step order below is what each run follows, and
//! [`Schedule::SuperStep`] runs all runs in that lock-step (the reference's
//! order). Both give byte-identical traces. Every super-step, each run's ready agents are rendered
//! against the state as it was before the step, and **all ready agent calls of
//! all runs go to the model as one [`Llm::generate`] batch**; each further
//! tool-loop turn of the agents still talking to tools is again one batch.
//! After the step, every run applies its agents' outputs (in agent-file order,
//! last write wins) and follows its out-edges.
//!
//! # Graph semantics
//!
//! - Targets of `__start__` form the first super-step (parallel fan-out).
//! - An unconditional edge fires after its source ran.
//! - A *join* (a node with two or more distinct predecessors) scheduled while
//!   another scheduled node can still reach it waits, so it runs once, after
//!   every branch arrived (explicit barrier). If every scheduled node would
//!   wait, all run (no deadlock).
//! - A conditional edge reads `state[condition_fix]` after its source ran; the
//!   value is true when, lower-cased and stripped of spaces, quotes, `*`, `` ` ``
//!   and a trailing `.`, it is one of `true`, `y`, `1`, `yes`. When true and
//!   this run's counter for the edge is below `max_retries`, the counter is
//!   incremented and the run goes to `to`; otherwise the counter is reset and
//!   the run goes to `fallback_target`.
//! - A run ends when nothing is scheduled, or with an error note after
//!   [`RunOptions::step_limit`] super-steps.
//!
//! # Agent call
//!
//! Messages are `[system: RunOptions::system_prompt (omitted when empty), user:
//! rendered prompt]`. The prompt is rendered with [`crate::prompt::render`]
//! (few-shot section, then every state value capped to
//! [`RunOptions::field_token_cap`] tokens), then the whole prompt is cut to
//! [`RunOptions::prompt_token_cap`] tokens if set. Outputs are read from the
//! final reply's `<var>…</var>` tags; **a missing tag is recorded in
//! [`AgentCall::format_failures`] and leaves the variable unset** (it is
//! removed from the state), never filled with the whole reply.
//!
//! # Tool loop
//!
//! For an agent with tools and `max_tool_calls > 0`, a reply holding
//! `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, or a bare JSON
//! object `{"name": T, …}` naming one of the agent's tools (first match, see
//! [`parse_tool_call`]), is executed in the run's [`ToolEnv`]. With
//! [`RunOptions::declare_tools`] the agent's system message declares its tools
//! in the Hermes/Qwen format ([`tool_declaration`]). The model's turn is kept in the history
//! up to the end of the call, and the result comes back as a user message
//! `<tool_result>{"name", "argument_keys", "result"}</tool_result>` (the
//! result capped like a field). Requests of such agents stop at
//! `</tool_call>` (the tag is restored in the reply), so the model cannot
//! invent tool results. The loop ends when a reply has no tool call, when the
//! call's JSON is invalid (that reply is final), or after `max_tool_calls`
//! executed calls (the next reply is final whatever it holds). A tool call
//! from an agent without tools is simply a final reply. An unknown tool gets
//! an error result listing the agent's tools; a panicking tool an error text.
//! Tools of different runs execute in parallel.
//!
//! # Format repair
//!
//! With [`RunOptions::format_repairs`] > 0 (not in the reference), a final
//! reply that lacks some output tags gets a follow-up turn: the reply stays
//! in the history and a user message names the missing tags only and shows
//! their shape. Tags found in the answer fill only the missing variables
//! ([`AgentCall::repaired`]); what is still missing afterwards is a format
//! failure as above. All repair turns of a super-step are one batch per
//! attempt. Small models that reason well but ignore the tag format (e.g. a
//! final `\boxed{10}`) are then scored on their answer, not on their format.
//! A reply cut off at `max_new_tokens` is flagged ([`AgentCall::truncated`];
//! `eval` reports the rate per agent): its missing tags are usually a token
//! limit problem, which no repair turn fixes.
//!
//! # Tag guard
//!
//! With [`RunOptions::tag_guard`] (default; not in the reference) every agent
//! turn carries an [`OutputConstraint`] for the agent's output variables (a
//! repair turn: for the missing ones; a tool turn may escape it by opening a
//! `<tool_call>`). The in-process engine then never ends a reply before its
//! tags are closed and forces them when the budget runs out
//! ([`AgentCall::forced_tags`]); backends that cannot constrain ignore it.
//! An agent that declares [`super::AgentSpec::output_grammars`] gets a
//! [`Grammar`] instead ([`Grammar::tagged`]: its tags in order, declared
//! ones holding a match), which the engine enforces token by token.
//!
//! # Tokens
//!
//! Per agent call, `input_tokens` = the first turn's `prompt_tokens` (exact,
//! after the chat template) + the tokens of every tool-result and
//! format-repair message ([`Llm::count_tokens`]); `output_tokens` = the
//! `completion_tokens` of all turns (tool-call and repair turns included). Re-reading the growing history in later
//! turns is not counted again.
//!
//! # Seeds
//!
//! A request's seed is a hash of (run seed, agent name, index of the agent
//! call within the run, tool-loop turn), so a run produces the same requests
//! whatever else is in the batch.
//!
//! # Errors
//!
//! If the model rejects one request ([`LlmError::BadRequest`], e.g. a history
//! longer than the context), only that run ends, with
//! [`RunResult::error`] set; the rest of the batch is resent. Any other model
//! error aborts the whole call with [`GraphError::Llm`] and the partial results
//! are dropped (no run is silently reported as finished).

use super::{GraphError, PromptSet, Setup, ToolEnv, END, START};
use crate::llm::{
    generate_isolating, grammar::TaggedOutput, Generation, Grammar, Llm, Message, OutputConstraint,
    Request, Sampling, StopReason,
};
use crate::prompt;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// Opening tag of a tool call in a reply.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
/// Closing tag of a tool call in a reply.
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// One run: a prompt configuration applied to one query.
pub struct RunSpec {
    /// Agent name → prompt template (must cover every agent of the setup).
    pub prompts: Arc<PromptSet>,
    /// The task input (`query` state variable).
    pub query: String,
    /// Extra initial state variables, e.g. MBPP's `test_cases`.
    pub init: BTreeMap<String, String>,
    /// Few-shot examples inserted into every agent's few-shot section.
    pub few_shots: Vec<String>,
    /// This run's own tool environment (None for tasks without tools).
    pub tools: Option<Box<dyn ToolEnv>>,
    /// Seed from which every request seed of the run is derived.
    pub seed: u64,
}

impl RunSpec {
    /// A run without extra state, shots or tools.
    pub fn new(prompts: Arc<PromptSet>, query: impl Into<String>, seed: u64) -> Self {
        Self {
            prompts,
            query: query.into(),
            init: BTreeMap::new(),
            few_shots: Vec::new(),
            tools: None,
            seed,
        }
    }
}

/// How [`run_batch`] schedules the runs' model calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Every run advances on its own: a run's next request joins the
    /// backend's running batch as soon as it is known ([`Llm::serve`]); tool
    /// calls run on a worker pool meanwhile. Same traces as `super-step`.
    #[default]
    Continuous,
    /// Lock-step super-steps: the ready calls of all runs are one
    /// [`Llm::generate`] batch, and the next turn waits for the slowest reply
    /// (the reference's order; kept as a baseline and for comparison).
    SuperStep,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "continuous" => Ok(Self::Continuous),
            "super-step" | "superstep" => Ok(Self::SuperStep),
            _ => Err(format!(
                "unknown schedule `{s}` (expected continuous or super-step)"
            )),
        }
    }
}

/// Settings shared by all runs of a [`run_batch`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOptions {
    /// System message of every agent call (omitted when empty).
    pub system_prompt: String,
    /// Maximum new tokens per model turn.
    pub max_new_tokens: usize,
    /// Cap in tokens on every state value filled into a prompt and on every
    /// tool result (` ... [truncated]` is appended when cut); 0 = no cap.
    pub field_token_cap: usize,
    /// Cap in tokens on the whole rendered prompt; None = no cap.
    pub prompt_token_cap: Option<usize>,
    /// Sampling of every agent call.
    pub sampling: Sampling,
    /// Super-steps after which a run still going is stopped with an error note.
    pub step_limit: usize,
    /// Follow-up turns allowed per agent call whose final reply lacks some
    /// output tags (0 = none, the reference behaviour). Each turn appends the
    /// reply and a user message naming the missing tags only, and reads those
    /// tags from the answer; the original reply's tags are never overwritten.
    pub format_repairs: usize,
    /// How model calls of different runs are scheduled (never changes traces).
    pub schedule: Schedule,
    /// Threads executing tool calls under [`Schedule::Continuous`] (0 = one per core).
    pub tool_workers: usize,
    /// Ask the backend to enforce each agent's output tags while decoding
    /// ([`crate::llm::guard`]; not in the reference): end-of-sequence is
    /// banned until every output tag is closed, the tags are forced when the
    /// token budget runs out, and the reply ends after the last one. A tool
    /// turn may end with a `<tool_call>` instead. Backends that cannot
    /// constrain ignore it; format repair still covers them. Agents with
    /// output grammars get their grammar instead; `false` turns both off.
    pub tag_guard: bool,
    /// Declare each agent's tools in its system message, in the Hermes
    /// format Qwen's chat templates use (`# Tools` … `<tools>` one JSON
    /// function signature per line `</tools>` … how to write `<tool_call>`),
    /// built from the run's [`ToolEnv`] descriptions, and accept bare JSON
    /// calls of them ([`parse_tool_call`]). Not in the reference, which shows
    /// tools only inside the prompts. Off by default: it made the 0.5B
    /// Qwen2.5-Coder call tools but lose MBPP items (README).
    pub declare_tools: bool,
}

impl Default for RunOptions {
    /// Reference-like defaults with the input caps decoupled from the output limit:
    /// 512 new tokens, 512-token fields, no prompt cap, temperature 0.7, 30 steps.
    fn default() -> Self {
        Self {
            system_prompt: "You are a helpful assistant.".into(),
            max_new_tokens: 512,
            field_token_cap: 512,
            prompt_token_cap: None,
            sampling: Sampling::temperature(0.7),
            step_limit: 30,
            format_repairs: 0,
            schedule: Schedule::Continuous,
            tool_workers: 0,
            tag_guard: true,
            declare_tools: false,
        }
    }
}

/// One executed tool call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    /// Tool name as the model wrote it.
    pub tool: String,
    /// Arguments object as the model wrote it.
    pub arguments: serde_json::Value,
    /// Result text returned to the model (inside the `<tool_result>` JSON).
    pub result: String,
}

/// One agent call (node execution) of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentCall {
    /// Agent name.
    pub agent: String,
    /// Rendered user prompt (after field and prompt caps).
    pub prompt: String,
    /// Final reply (the one outputs are parsed from).
    pub reply: String,
    /// Parsed output variables (only those whose tag was found).
    pub outputs: BTreeMap<String, String>,
    /// Input tokens (see the module docs).
    pub input_tokens: usize,
    /// Output tokens of all turns.
    pub output_tokens: usize,
    /// Output variables still unset after the call: their `<var>…</var>` tag
    /// was missing from the reply and from every format-repair answer.
    pub format_failures: Vec<String>,
    /// Output variables missing from the reply but recovered by a
    /// format-repair turn ([`RunOptions::format_repairs`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<String>,
    /// Answers to the format-repair turns, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repair_replies: Vec<String>,
    /// The final reply stopped at `max_new_tokens` ([`StopReason::Length`]):
    /// it was cut off, usually before its output tags. A high rate of these
    /// means the token limit, not the prompt, is what fails.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Tool calls made during this agent call, in order.
    pub tool_calls: Vec<ToolCallRecord>,
    /// Output variables whose tag (opening or closing) the tag guard forced
    /// into the final reply because the token budget ran out
    /// ([`RunOptions::tag_guard`]); the others were written by the model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forced_tags: Vec<String>,
    /// Output variables taken from the reply's last markdown code fence
    /// instead of their guard-opened tag ([`super::AgentSpec::fenced_outputs`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_fence: Vec<String>,
}

/// The outcome of one run.
pub struct RunResult {
    /// Final state (unset variables are absent).
    pub state: BTreeMap<String, String>,
    /// `state["prediction"]`, or "" when unset.
    pub prediction: String,
    /// Agent calls in execution order.
    pub calls: Vec<AgentCall>,
    /// Sum of the calls' input tokens.
    pub input_tokens: usize,
    /// Sum of the calls' output tokens.
    pub output_tokens: usize,
    /// The run's tool environment, handed back for scoring (e.g. MBPP's last written code).
    pub tools: Option<Box<dyn ToolEnv>>,
    /// Why the run ended abnormally (step limit, rejected request), if it did.
    pub error: Option<String>,
}

impl std::fmt::Debug for RunResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunResult")
            .field("prediction", &self.prediction)
            .field("state", &self.state)
            .field("calls", &self.calls.len())
            .field("input_tokens", &self.input_tokens)
            .field("output_tokens", &self.output_tokens)
            .field("tools", &self.tools.is_some())
            .field("error", &self.error)
            .finish()
    }
}

impl RunResult {
    /// Agent calls that had at least one missing output tag.
    pub fn format_failures(&self) -> usize {
        self.calls
            .iter()
            .filter(|c| !c.format_failures.is_empty())
            .count()
    }
    /// The serializable trace of this run (index `run` in its batch).
    pub fn trace(&self, run: usize) -> TraceRecord<'_> {
        TraceRecord {
            run,
            prediction: &self.prediction,
            error: self.error.as_deref(),
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            state: &self.state,
            calls: &self.calls,
            extra: serde_json::Map::new(),
        }
    }
}

/// One line of a trace file: a run with every agent call (rendered prompt,
/// reply, parsed outputs, tokens, format failures, tool calls), plus
/// caller-supplied fields (e.g. example id, score, configuration id).
#[derive(Debug, Clone, Serialize)]
pub struct TraceRecord<'a> {
    /// Index of the run in its batch.
    pub run: usize,
    /// Final prediction.
    pub prediction: &'a str,
    /// Error note, if the run ended abnormally.
    pub error: Option<&'a str>,
    /// Input tokens of the run.
    pub input_tokens: usize,
    /// Output tokens of the run.
    pub output_tokens: usize,
    /// Final state.
    pub state: &'a BTreeMap<String, String>,
    /// Agent calls.
    pub calls: &'a [AgentCall],
    /// Extra fields, flattened into the record.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Write one JSON line per run to `path` (created or truncated). `extra[i]`
/// (if present) adds fields to run `i`'s record.
pub fn write_trace_jsonl(
    path: impl AsRef<Path>,
    results: &[RunResult],
    extra: &[serde_json::Map<String, serde_json::Value>],
) -> Result<(), GraphError> {
    let path = path.as_ref();
    let err = |source| GraphError::Trace {
        path: path.display().to_string(),
        source,
    };
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).map_err(err)?);
    for (i, r) in results.iter().enumerate() {
        let mut rec = r.trace(i);
        if let Some(x) = extra.get(i) {
            rec.extra = x.clone();
        }
        serde_json::to_writer(&mut w, &rec).map_err(|e| err(e.into()))?;
        w.write_all(b"\n").map_err(err)?;
    }
    w.flush().map_err(err)
}

// ---------------------------------------------------------------------------
// Graph preparation

/// Routing data derived once from the setup.
pub(super) struct Graph<'s> {
    pub(super) setup: &'s Setup,
    /// Out-edges per agent (indices into `setup.edges`).
    pub(super) out: Vec<Vec<usize>>,
    /// Out-edges of `__start__`.
    pub(super) start_out: Vec<usize>,
    /// Agents with two or more distinct predecessors.
    pub(super) join: Vec<bool>,
    /// `reach[x][j]`: agent `j` is reachable from agent `x`.
    pub(super) reach: Vec<Vec<bool>>,
    /// Every variable an agent reads or writes, plus `query`.
    pub(super) vars: BTreeSet<&'s str>,
}

/// A node index: an agent, or `__end__`.
fn node(setup: &Setup, name: &str) -> Option<Option<usize>> {
    if name == END {
        Some(None)
    } else {
        setup.agents.iter().position(|a| a.name == name).map(Some)
    }
}

impl<'s> Graph<'s> {
    fn new(setup: &'s Setup) -> Result<Self, GraphError> {
        let n = setup.agents.len();
        let bad = |i: usize, field: &str, name: &str| GraphError::Invalid {
            file: "<setup>".into(),
            agent: None,
            field: format!("edges[{i}].{field}"),
            message: format!("unknown node `{name}`"),
        };
        let mut out = vec![Vec::new(); n];
        let mut start_out = Vec::new();
        let mut preds: Vec<BTreeSet<String>> = vec![BTreeSet::new(); n];
        let mut succ: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, e) in setup.edges.iter().enumerate() {
            let from = if e.from == START {
                None
            } else {
                Some(
                    node(setup, &e.from)
                        .flatten()
                        .ok_or_else(|| bad(i, "from", &e.from))?,
                )
            };
            let mut targets = vec![node(setup, &e.to).ok_or_else(|| bad(i, "to", &e.to))?];
            if e.is_conditional() {
                let fb = e.fallback_target.as_deref().unwrap_or(END);
                targets.push(node(setup, fb).ok_or_else(|| bad(i, "fallback_target", fb))?);
            }
            match from {
                None => start_out.push(i),
                Some(f) => out[f].push(i),
            }
            for t in targets.into_iter().flatten() {
                preds[t].insert(e.from.clone());
                if let Some(f) = from {
                    succ[f].push(t);
                }
            }
        }
        let reach = (0..n)
            .map(|x| {
                let mut seen = vec![false; n];
                let mut stack = succ[x].clone();
                while let Some(y) = stack.pop() {
                    if !seen[y] {
                        seen[y] = true;
                        stack.extend(&succ[y]);
                    }
                }
                seen
            })
            .collect();
        let vars = setup
            .agents
            .iter()
            .flat_map(|a| {
                a.input_vars
                    .iter()
                    .chain(&a.output_vars)
                    .map(String::as_str)
            })
            .chain(["query"])
            .collect();
        Ok(Self {
            setup,
            out,
            start_out,
            join: preds.iter().map(|p| p.len() >= 2).collect(),
            reach,
            vars,
        })
    }

    /// The scheduled agents that run this super-step (joins wait for branches
    /// that can still reach them).
    fn runnable(&self, frontier: &[usize]) -> Vec<usize> {
        let ready: Vec<usize> = frontier
            .iter()
            .copied()
            .filter(|&j| !(self.join[j] && frontier.iter().any(|&x| x != j && self.reach[x][j])))
            .collect();
        if ready.is_empty() {
            frontier.to_vec()
        } else {
            ready
        }
    }
}

/// Whether a state value counts as true for a conditional edge.
pub fn truthy(v: &str) -> bool {
    let t = v
        .trim()
        .trim_matches(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '*' | '`'))
        .trim_end_matches('.')
        .to_lowercase();
    matches!(t.as_str(), "true" | "y" | "1" | "yes")
}

// ---------------------------------------------------------------------------
// Seeds

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed of turn `turn` of the `call_index`-th agent call of a run.
pub fn request_seed(run_seed: u64, agent: &str, call_index: usize, turn: usize) -> u64 {
    // FNV-1a over the agent name: stable across platforms and releases.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in agent.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    let mut s = splitmix(run_seed);
    s = splitmix(s ^ h);
    s = splitmix(s ^ call_index as u64);
    splitmix(s ^ turn as u64)
}

// ---------------------------------------------------------------------------
// Tool calls

/// Parse the first tool call of a reply. `None`: no tool call. `Some(Err)`:
/// a tool call whose JSON is unusable. `Some(Ok((name, args, end)))`: `end` is
/// the byte offset just after the call.
///
/// A call is a `<tool_call>…</tool_call>` block (`end` after the closing tag,
/// or the end of the reply when it is missing), or a bare JSON object
/// `{"name": T, "arguments": …}` naming one of `tools`, the agent's tools
/// (`end` after the object): small models given the Hermes/Qwen tool
/// declaration often write the call without its tag. A bare object that is
/// not valid JSON, has keys besides `name` and `arguments` or names no tool
/// of `tools` is not a call; callers pass the agent's tools only when they
/// are declared ([`RunOptions::declare_tools`]), else none. Lenient for small
/// models: a missing closing tag, trailing text, raw newlines inside JSON
/// strings, missing or JSON-string `arguments` are accepted.
pub fn parse_tool_call(
    reply: &str,
    tools: &[String],
) -> Option<Result<(String, serde_json::Value, usize), String>> {
    let bare = bare_tool_call(reply, tools);
    let open = match (reply.find(TOOL_CALL_OPEN), &bare) {
        (Some(open), Some((start, _))) if open < *start => open,
        (None, None) => return None,
        (Some(open), None) => open,
        (_, Some(_)) => return bare.map(|(_, call)| Ok(call)),
    };
    let body_start = open + TOOL_CALL_OPEN.len();
    let (body, end) = match reply[body_start..].find(TOOL_CALL_CLOSE) {
        Some(c) => (
            &reply[body_start..body_start + c],
            body_start + c + TOOL_CALL_CLOSE.len(),
        ),
        None => (&reply[body_start..], reply.len()),
    };
    Some(call_from_json(body).map(|(name, args)| (name, args, end)))
}

/// The first bare JSON tool call of a declared tool in `reply`: its start and
/// `(name, arguments, end)`.
fn bare_tool_call(
    reply: &str,
    tools: &[String],
) -> Option<(usize, (String, serde_json::Value, usize))> {
    if tools.is_empty() {
        return None;
    }
    reply.match_indices('{').find_map(|(i, _)| {
        if !reply[i + 1..].trim_start().starts_with("\"name\"") {
            return None;
        }
        let end = i + json_object_end(&reply[i..])?;
        let v = first_json_value(&reply[i..end])?;
        // A function signature echoed from the declaration is no call.
        if v.as_object()?
            .keys()
            .any(|k| k != "name" && k != "arguments")
        {
            return None;
        }
        let (name, args) = call_from_json(&reply[i..end]).ok()?;
        tools.contains(&name).then_some((i, (name, args, end)))
    })
}

/// Byte length of the JSON object at the start of `s` (brace matching outside
/// strings; raw control characters inside strings are tolerated). `None`: unclosed.
fn json_object_end(s: &str) -> Option<usize> {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, c) in s.char_indices() {
        if in_str {
            match c {
                _ if esc => esc = false,
                '\\' => esc = true,
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// A tool call's `(name, arguments)` from its JSON text.
fn call_from_json(body: &str) -> Result<(String, serde_json::Value), String> {
    let v = first_json_value(body.trim()).ok_or("tool call is not valid JSON")?;
    let obj = v.as_object().ok_or("tool call is not a JSON object")?;
    let name = obj
        .get("name")
        .and_then(|n| n.as_str())
        .ok_or("tool call has no string `name`")?;
    let args = match obj.get("arguments") {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        Some(a @ serde_json::Value::Object(_)) => a.clone(),
        Some(serde_json::Value::String(s)) => match first_json_value(s.trim()) {
            Some(a @ serde_json::Value::Object(_)) => a,
            _ => return Err("tool call `arguments` is not an object".into()),
        },
        Some(_) => return Err("tool call `arguments` is not an object".into()),
    };
    Ok((name.to_string(), args))
}

/// The Hermes/Qwen tool declaration of `tools` (a system-message section,
/// exactly as Qwen2.5's chat template writes it for a request's `tools`).
pub fn tool_declaration(tools: &[String], env: &dyn ToolEnv) -> String {
    let mut out = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in tools {
        // Key order as the template's `tojson` writes it (serde_json keeps
        // insertion order in this build; the declaration test pins it).
        let f = serde_json::json!({
            "type": "function",
            "function": {
                "name": t,
                "description": env.describe(t).unwrap_or_default(),
                "parameters": env.parameters(t),
            },
        });
        out.push('\n');
        out.push_str(&py_json(&f));
    }
    out.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    out
}

/// JSON as Python's `json.dumps` writes it (`", "` and `": "` separators),
/// which chat templates' `tojson` produce.
fn py_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(a) => {
            let items: Vec<String> = a.iter().map(py_json).collect();
            format!("[{}]", items.join(", "))
        }
        serde_json::Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", serde_json::Value::from(k.as_str()), py_json(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// The first JSON value at the start of `s` (trailing text ignored); retries
/// with raw control characters inside strings escaped.
fn first_json_value(s: &str) -> Option<serde_json::Value> {
    let parse = |t: &str| {
        serde_json::Deserializer::from_str(t)
            .into_iter::<serde_json::Value>()
            .next()?
            .ok()
    };
    parse(s).or_else(|| parse(&escape_controls_in_strings(s)))
}

fn escape_controls_in_strings(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    let (mut in_str, mut esc) = (false, false);
    for c in s.chars() {
        if in_str {
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            } else if c == '\n' {
                out.push_str("\\n");
                continue;
            } else if c == '\r' {
                out.push_str("\\r");
                continue;
            } else if c == '\t' {
                out.push_str("\\t");
                continue;
            }
        } else if c == '"' {
            in_str = true;
        }
        out.push(c);
    }
    out
}

/// Execute one tool call for an agent allowed `allowed` tools.
fn execute_tool(
    env: Option<&mut (dyn ToolEnv + '_)>,
    allowed: &[String],
    name: &str,
    args: &serde_json::Value,
) -> (String, bool) {
    if !allowed.iter().any(|t| t == name) {
        let mut avail: Vec<&String> = allowed.iter().collect();
        avail.sort();
        let list: Vec<&str> = avail.iter().map(|s| s.as_str()).collect();
        return (
            format!(
                "error: unknown tool `{name}`; available tools: {}",
                list.join(", ")
            ),
            false,
        );
    }
    let Some(env) = env else {
        return (
            format!("error: tool `{name}` is unavailable (this run has no tool environment)"),
            true,
        );
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| env.call(name, args))) {
        Ok(r) => (r, true),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            (format!("Tool '{name}' failed with error: {msg}"), true)
        }
    }
}

// ---------------------------------------------------------------------------
// Runs

pub(super) struct Run {
    pub(super) prompts: Arc<PromptSet>,
    pub(super) few_shots: Vec<String>,
    pub(super) tools: Option<Box<dyn ToolEnv>>,
    pub(super) seed: u64,
    pub(super) state: BTreeMap<String, String>,
    /// Scheduled agents, ascending.
    pub(super) frontier: Vec<usize>,
    pub(super) steps: usize,
    pub(super) n_calls: usize,
    /// Retry counter per conditional edge index.
    pub(super) retries: HashMap<usize, u32>,
    pub(super) calls: Vec<AgentCall>,
    pub(super) error: Option<String>,
    pub(super) done: bool,
}

/// An agent call in progress during a super-step.
pub(super) struct Pending {
    pub(super) run: usize,
    pub(super) agent: usize,
    pub(super) call_index: usize,
    pub(super) messages: Vec<Message>,
    pub(super) turn: usize,
    pub(super) tools_used: usize,
    pub(super) call: AgentCall,
    /// Output tags read from format-repair answers.
    pub(super) recovered: BTreeMap<String, String>,
    /// Values of fenced outputs taken from a code fence (see
    /// [`super::AgentSpec::fenced_outputs`]); they take precedence over the tag.
    pub(super) fenced: BTreeMap<String, String>,
    /// Set when a repair request was rejected: no further repair turns.
    pub(super) repair_closed: bool,
    pub(super) finished: bool,
    pub(super) failed: Option<String>,
}

pub(super) struct ToolJob {
    pub(super) pending: usize,
    pub(super) name: String,
    pub(super) args: serde_json::Value,
    pub(super) result: String,
}

/// Run every spec through the graph of `setup`, batching model calls across
/// runs super-step by super-step (see the module docs for the semantics).
/// `progress` is called with the number of finished runs whenever it grows.
/// Results come back in spec order.
pub fn run_batch(
    llm: &dyn Llm,
    setup: &Setup,
    runs: Vec<RunSpec>,
    opts: &RunOptions,
    progress: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<Vec<RunResult>, GraphError> {
    let g = Graph::new(setup)?;
    for (i, r) in runs.iter().enumerate() {
        if let Some(a) = setup
            .agents
            .iter()
            .find(|a| !r.prompts.contains_key(&a.name))
        {
            return Err(GraphError::BadRun {
                run: i,
                message: format!("prompt set has no prompt for agent `{}`", a.name),
            });
        }
    }
    let mut runs: Vec<Run> = runs
        .into_iter()
        .map(|s| {
            let mut state = s.init;
            state.insert("query".into(), s.query);
            Run {
                prompts: s.prompts,
                few_shots: s.few_shots,
                tools: s.tools,
                seed: s.seed,
                state,
                frontier: Vec::new(),
                steps: 0,
                n_calls: 0,
                retries: HashMap::new(),
                calls: Vec::new(),
                error: None,
                done: false,
            }
        })
        .collect();
    for r in &mut runs {
        let mut next = BTreeSet::new();
        route(&g, r, &g.start_out, &mut next);
        r.frontier = next.into_iter().collect();
        r.done = r.frontier.is_empty();
    }
    let mut finished = runs.iter().filter(|r| r.done).count();
    if finished > 0 {
        if let Some(p) = progress {
            p(finished);
        }
    }
    if opts.schedule == Schedule::Continuous {
        super::continuous::run_continuous(llm, &g, &mut runs, opts, progress)?;
    }
    let mut step = 0;
    while runs.iter().any(|r| !r.done) {
        super_step(llm, &g, &mut runs, opts, step)?;
        step += 1;
        let now = runs.iter().filter(|r| r.done).count();
        if now != finished {
            finished = now;
            if let Some(p) = progress {
                p(finished);
            }
        }
    }
    Ok(runs
        .into_iter()
        .map(|r| {
            let prediction = r.state.get("prediction").cloned().unwrap_or_default();
            RunResult {
                input_tokens: r.calls.iter().map(|c| c.input_tokens).sum(),
                output_tokens: r.calls.iter().map(|c| c.output_tokens).sum(),
                state: r.state,
                prediction,
                calls: r.calls,
                tools: r.tools,
                error: r.error,
            }
        })
        .collect())
}

/// Follow the out-edges `edges` of a node that just ran, adding targets to `next`.
fn route(g: &Graph<'_>, run: &mut Run, edges: &[usize], next: &mut BTreeSet<usize>) {
    for &ei in edges {
        let e = &g.setup.edges[ei];
        let target = match &e.condition_fix {
            None => e.to.as_str(),
            Some(var) => {
                let cond = run.state.get(var).is_some_and(|v| truthy(v));
                let count = run.retries.entry(ei).or_insert(0);
                if cond && *count < e.max_retries.unwrap_or(0) {
                    *count += 1;
                    e.to.as_str()
                } else {
                    *count = 0;
                    e.fallback_target.as_deref().unwrap_or(END)
                }
            }
        };
        if let Some(Some(t)) = node(g.setup, target) {
            next.insert(t);
        }
    }
}

/// Render the user prompt of `agent` for `run`.
fn render_prompt(
    llm: &dyn Llm,
    g: &Graph<'_>,
    run: &Run,
    agent: usize,
    opts: &RunOptions,
) -> String {
    let name = &g.setup.agents[agent].name;
    let template = run
        .prompts
        .get(name)
        .map(String::as_str)
        .unwrap_or_default();
    let mut vars: BTreeMap<String, String> = g
        .vars
        .iter()
        .map(|v| (v.to_string(), String::new()))
        .collect();
    vars.extend(run.state.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut p = prompt::render_with_llm(template, &vars, &run.few_shots, opts.field_token_cap, llm);
    if let Some(cap) = opts.prompt_token_cap {
        p = llm.truncate_tokens(&p, cap);
    }
    p
}

/// Output variables of `p`'s agent found neither in its reply nor in a repair answer.
fn missing_tags(g: &Graph<'_>, p: &Pending) -> Vec<String> {
    g.setup.agents[p.agent]
        .output_vars
        .iter()
        .filter(|v| {
            !p.recovered.contains_key(*v) && prompt::extract_tag(&p.call.reply, v).is_none()
        })
        .cloned()
        .collect()
}

/// The user message asking for the missing tags only.
fn repair_message(missing: &[String]) -> String {
    let names: Vec<String> = missing.iter().map(|v| format!("<{v}>")).collect();
    let shape: Vec<String> = missing.iter().map(|v| format!("<{v}>...</{v}>")).collect();
    format!(
        "Your reply is missing the required tag(s) {}. Reply again with only these tags, filled in from your answer above, exactly like this:\n{}",
        names.join(", "),
        shape.join("\n")
    )
}

/// The first-turn state of a call of `agent` in run `ri` (rendered against the
/// run's current state); counts the call in the run.
fn new_pending(
    llm: &dyn Llm,
    g: &Graph<'_>,
    run: &mut Run,
    ri: usize,
    agent: usize,
    opts: &RunOptions,
) -> Pending {
    let prompt = render_prompt(llm, g, run, agent, opts);
    let mut messages = Vec::with_capacity(2);
    let tools = &g.setup.agents[agent].tools;
    let system = match run.tools.as_deref() {
        Some(env) if opts.declare_tools && !tools.is_empty() => {
            let decl = tool_declaration(tools, env);
            if opts.system_prompt.is_empty() {
                decl
            } else {
                format!("{}\n\n{decl}", opts.system_prompt)
            }
        }
        _ => opts.system_prompt.clone(),
    };
    if !system.is_empty() {
        messages.push(Message::system(system));
    }
    messages.push(Message::user(prompt.clone()));
    let p = Pending {
        run: ri,
        agent,
        call_index: run.n_calls,
        messages,
        turn: 0,
        tools_used: 0,
        call: AgentCall {
            agent: g.setup.agents[agent].name.clone(),
            prompt,
            reply: String::new(),
            outputs: BTreeMap::new(),
            input_tokens: 0,
            output_tokens: 0,
            format_failures: Vec::new(),
            repaired: Vec::new(),
            repair_replies: Vec::new(),
            truncated: false,
            tool_calls: Vec::new(),
            forced_tags: Vec::new(),
            from_fence: Vec::new(),
        },
        recovered: BTreeMap::new(),
        fenced: BTreeMap::new(),
        repair_closed: false,
        finished: false,
        failed: None,
    };
    run.n_calls += 1;
    p
}

/// The calls a run starts this step (its ready agents, in agent order) and
/// the scheduled agents that wait (joins).
pub(super) fn start_step(
    llm: &dyn Llm,
    g: &Graph<'_>,
    run: &mut Run,
    ri: usize,
    opts: &RunOptions,
) -> (Vec<Pending>, Vec<usize>) {
    let ready = g.runnable(&run.frontier);
    let deferred = run
        .frontier
        .iter()
        .copied()
        .filter(|a| !ready.contains(a))
        .collect();
    let pend = ready
        .into_iter()
        .map(|agent| new_pending(llm, g, run, ri, agent, opts))
        .collect();
    (pend, deferred)
}

/// The output constraint of an agent turn requiring `tags` (none when the
/// guard is off or there is nothing to require). `escapes`: the strings that
/// free a tool turn ([`tool_escapes`]), empty otherwise.
fn guard(opts: &RunOptions, tags: &[String], escapes: Vec<String>) -> Option<OutputConstraint> {
    if !opts.tag_guard || tags.is_empty() {
        return None;
    }
    Some(OutputConstraint::tags(tags.iter().cloned()).with_escapes(escapes))
}

/// The tools an agent may call with bare JSON: its tools when they are
/// declared, else none (only the `<tool_call>` tag opens a call).
fn bare_call_tools<'a>(opts: &RunOptions, a: &'a super::AgentSpec) -> &'a [String] {
    if opts.declare_tools {
        &a.tools
    } else {
        &[]
    }
}

/// What opens a tool call in a reply: the tag, and the start of a bare JSON
/// call of each tool of `tools` (see [`parse_tool_call`]).
fn tool_escapes(tools: &[String]) -> Vec<String> {
    let mut out = vec![TOOL_CALL_OPEN.to_string()];
    for t in tools {
        out.push(format!("{{\"name\": \"{t}\""));
        out.push(format!("{{\"name\":\"{t}\""));
    }
    out
}

/// The output contract of an agent turn writing `tags`: a grammar when the
/// agent declares output grammars (its tags in order, each declared one
/// holding a match; never on a tool turn), else the tag guard's constraint.
/// Nothing when constraints are off.
fn output_contract(
    opts: &RunOptions,
    a: &super::AgentSpec,
    tags: &[String],
    tool_turn: bool,
) -> (Option<OutputConstraint>, Option<Grammar>) {
    if a.output_grammars.is_empty() || tool_turn || !opts.tag_guard || tags.is_empty() {
        let escapes = if tool_turn {
            tool_escapes(bare_call_tools(opts, a))
        } else {
            Vec::new()
        };
        return (guard(opts, tags, escapes), None);
    }
    let parts: Vec<TaggedOutput> = tags
        .iter()
        .map(|t| TaggedOutput {
            tag: t.clone(),
            grammar: a.output_grammars.get(t).cloned(),
        })
        .collect();
    (None, Some(Grammar::tagged(&parts)))
}

/// The next model turn of an unfinished call, and whether it is a tool turn
/// (the agent has tools and tool budget left: the request stops at `</tool_call>`).
pub(super) fn turn_request(
    g: &Graph<'_>,
    run_seed: u64,
    p: &Pending,
    opts: &RunOptions,
) -> (Request, bool) {
    let a = &g.setup.agents[p.agent];
    let tool_turn = !a.tools.is_empty() && p.tools_used < a.max_tool_calls as usize;
    let (constraint, grammar) = output_contract(opts, a, &a.output_vars, tool_turn);
    let req = Request {
        messages: p.messages.clone(),
        max_new_tokens: opts.max_new_tokens,
        sampling: opts.sampling,
        seed: request_seed(run_seed, &a.name, p.call_index, p.turn),
        stop: if tool_turn {
            vec![TOOL_CALL_CLOSE.to_string()]
        } else {
            Vec::new()
        },
        constraint,
        grammar,
        raw_prompt: None,
    };
    (req, tool_turn)
}

/// Take a turn's answer into its call. Returns the tool call to execute, if
/// the reply makes one; otherwise the call is finished (final reply, or the
/// request was rejected).
pub(super) fn absorb_turn(
    g: &Graph<'_>,
    opts: &RunOptions,
    p: &mut Pending,
    gen: Result<Generation, String>,
    tool_turn: bool,
) -> Option<(String, serde_json::Value)> {
    let gen = match gen {
        Ok(gen) => gen,
        Err(msg) => {
            p.failed = Some(msg);
            p.finished = true;
            return None;
        }
    };
    if p.turn == 0 {
        p.call.input_tokens += gen.prompt_tokens;
    }
    p.call.output_tokens += gen.completion_tokens;
    p.turn += 1;
    let mut text = gen.text;
    if tool_turn && gen.stop_reason == StopReason::StopString {
        text.push_str(TOOL_CALL_CLOSE);
    }
    let tools = bare_call_tools(opts, &g.setup.agents[p.agent]);
    match tool_turn.then(|| parse_tool_call(&text, tools)).flatten() {
        Some(Ok((name, args, end))) => {
            p.messages.push(Message::assistant(text[..end].to_string()));
            Some((name, args))
        }
        // No tool call, invalid call JSON, or no tool budget: final reply.
        _ => {
            for var in &g.setup.agents[p.agent].fenced_outputs {
                let open = format!("<{var}>");
                if !gen.forced.contains(&open) {
                    continue;
                }
                let before = text.find(&open).map_or(text.as_str(), |i| &text[..i]);
                if let Some(code) = last_fenced_block(before) {
                    p.fenced.insert(var.clone(), code);
                }
            }
            p.call.reply = text;
            p.call.truncated = gen.cut_off || gen.stop_reason == StopReason::Length;
            p.call.forced_tags = forced_vars(&gen.forced);
            p.finished = true;
            None
        }
    }
}

/// The body of the last complete markdown code fence of `text` (the line
/// after the opening fence, e.g. ```` ```python ````, up to the closing one),
/// if it is not blank.
pub fn last_fenced_block(text: &str) -> Option<String> {
    let marks: Vec<usize> = text.match_indices("```").map(|(i, _)| i).collect();
    let pair = marks.len() / 2;
    if pair == 0 {
        return None;
    }
    let (open, close) = (marks[2 * pair - 2], marks[2 * pair - 1]);
    let inner = &text[open + 3..close];
    // The opening line holds the language, if any.
    let body = match inner.find('\n') {
        Some(nl) => &inner[nl + 1..],
        None => inner,
    };
    let body = body.trim_end();
    (!body.trim().is_empty()).then(|| body.to_string())
}

/// Variable names of forced tag literals (`<v>` or `</v>`), deduplicated in order.
fn forced_vars(literals: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in literals {
        let v = l
            .trim_start_matches('<')
            .trim_start_matches('/')
            .trim_end_matches('>');
        if !out.iter().any(|x| x == v) {
            out.push(v.to_string());
        }
    }
    out
}

/// Execute a run's tool jobs of one turn, in order, in the run's environment.
pub(super) fn execute_jobs(
    g: &Graph<'_>,
    tools: Option<&mut (dyn ToolEnv + '_)>,
    agents: &[usize],
    jobs: &mut [ToolJob],
) {
    let mut tools = tools;
    for j in jobs.iter_mut() {
        let allowed = g.setup.agents[agents[j.pending]].tools.as_slice();
        let (r, _) = execute_tool(tools.as_deref_mut(), allowed, &j.name, &j.args);
        j.result = r;
    }
}

/// Hand an executed tool call's result back to its call as a user message.
pub(super) fn absorb_tool(llm: &dyn Llm, opts: &RunOptions, p: &mut Pending, j: ToolJob) {
    let result = prompt::cap_field(&j.result, opts.field_token_cap, &|t, n| {
        llm.truncate_tokens(t, n)
    });
    let mut keys: Vec<&String> = j
        .args
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    keys.sort();
    let payload = serde_json::json!({ "name": j.name, "argument_keys": keys, "result": result });
    let msg = format!("<tool_result>{payload}</tool_result>");
    p.call.input_tokens += llm.count_tokens(&msg);
    p.messages.push(Message::user(msg));
    p.call.tool_calls.push(ToolCallRecord {
        tool: j.name,
        arguments: j.args,
        result,
    });
    p.tools_used += 1;
}

/// The format-repair requests of one attempt: for every successful call of
/// `pend` still missing output tags, `(index in pend, missing tags, request)`.
pub(super) fn repair_requests(
    llm: &dyn Llm,
    g: &Graph<'_>,
    run_seed: &dyn Fn(usize) -> u64,
    pend: &mut [Pending],
    opts: &RunOptions,
) -> Vec<(usize, Vec<String>, Request)> {
    let mut out = Vec::new();
    for (i, p) in pend.iter_mut().enumerate() {
        if p.failed.is_some() || p.repair_closed {
            continue;
        }
        let missing = missing_tags(g, p);
        if missing.is_empty() {
            continue;
        }
        let last = p
            .call
            .repair_replies
            .last()
            .unwrap_or(&p.call.reply)
            .clone();
        let msg = repair_message(&missing);
        p.call.input_tokens += llm.count_tokens(&msg);
        p.messages.push(Message::assistant(last));
        p.messages.push(Message::user(msg));
        let (constraint, grammar) =
            output_contract(opts, &g.setup.agents[p.agent], &missing, false);
        let req = Request {
            messages: p.messages.clone(),
            max_new_tokens: opts.max_new_tokens,
            sampling: opts.sampling,
            seed: request_seed(run_seed(p.run), &p.call.agent, p.call_index, p.turn),
            stop: Vec::new(),
            constraint,
            grammar,
            raw_prompt: None,
        };
        p.turn += 1;
        out.push((i, missing, req));
    }
    out
}

/// Take a repair answer into its call. A rejected repair request (e.g.
/// context too long) just ends that call's repair.
pub(super) fn absorb_repair(p: &mut Pending, missing: &[String], gen: Result<Generation, String>) {
    let Ok(gen) = gen else {
        p.repair_closed = true;
        return;
    };
    p.call.output_tokens += gen.completion_tokens;
    for v in forced_vars(&gen.forced) {
        if !p.call.forced_tags.contains(&v) {
            p.call.forced_tags.push(v);
        }
    }
    for var in missing {
        if let Some(v) = prompt::extract_tag(&gen.text, var) {
            p.recovered.insert(var.clone(), v);
        }
    }
    p.call.repair_replies.push(gen.text);
}

/// One format-repair attempt for every successful call still missing output
/// tags, as one batch. Returns whether any request was sent.
fn repair_turn(
    llm: &dyn Llm,
    g: &Graph<'_>,
    runs: &[Run],
    pend: &mut [Pending],
    opts: &RunOptions,
    step: usize,
) -> Result<bool, GraphError> {
    let todo = repair_requests(llm, g, &|r| runs[r].seed, pend, opts);
    if todo.is_empty() {
        return Ok(false);
    }
    let (meta, reqs): (Vec<_>, Vec<_>) = todo.into_iter().map(|(i, m, r)| ((i, m), r)).unzip();
    let gens = generate_isolating(llm, reqs).map_err(|source| GraphError::Llm { step, source })?;
    for ((i, missing), gen) in meta.iter().zip(gens) {
        absorb_repair(&mut pend[*i], missing, gen);
    }
    Ok(true)
}

/// End a run's step: apply its calls' outputs (agent order, last write wins),
/// record the calls, then follow the out-edges of the agents that ran.
pub(super) fn finish_step(
    g: &Graph<'_>,
    run: &mut Run,
    pend: Vec<Pending>,
    deferred: &[usize],
    opts: &RunOptions,
) {
    let mut executed = Vec::with_capacity(pend.len());
    for mut p in pend {
        executed.push(p.agent);
        if let Some(msg) = p.failed.take() {
            if run.error.is_none() {
                run.error = Some(format!(
                    "agent `{}`: the model rejected the request: {msg}",
                    p.call.agent
                ));
            }
            run.done = true;
        } else {
            for var in &g.setup.agents[p.agent].output_vars {
                let fenced = p.fenced.remove(var);
                if fenced.is_some() {
                    p.call.from_fence.push(var.clone());
                }
                let found = fenced
                    .or_else(|| prompt::extract_tag(&p.call.reply, var))
                    .or_else(|| {
                        let v = p.recovered.remove(var)?;
                        p.call.repaired.push(var.clone());
                        Some(v)
                    });
                match found {
                    Some(v) => {
                        if let Some(t) = run.tools.as_mut() {
                            t.observe(var, &v);
                        }
                        run.state.insert(var.clone(), v.clone());
                        p.call.outputs.insert(var.clone(), v);
                    }
                    None => {
                        run.state.remove(var);
                        p.call.format_failures.push(var.clone());
                    }
                }
            }
        }
        run.calls.push(p.call);
    }
    if run.done {
        return;
    }
    run.steps += 1;
    let mut next: BTreeSet<usize> = deferred.iter().copied().collect();
    for a in executed {
        let edges = g.out[a].clone();
        route(g, run, &edges, &mut next);
    }
    run.frontier = next.into_iter().collect();
    if run.frontier.is_empty() {
        run.done = true;
    } else if run.steps >= opts.step_limit {
        let names: Vec<&str> = run
            .frontier
            .iter()
            .map(|&a| g.setup.agents[a].name.as_str())
            .collect();
        run.error = Some(format!(
            "step limit of {} super-steps reached (still scheduled: {})",
            opts.step_limit,
            names.join(", ")
        ));
        run.done = true;
    }
}

fn super_step(
    llm: &dyn Llm,
    g: &Graph<'_>,
    runs: &mut [Run],
    opts: &RunOptions,
    step: usize,
) -> Result<(), GraphError> {
    // 1. Ready calls of every live run, rendered against the pre-step state.
    let mut pend: Vec<Pending> = Vec::new();
    let mut deferred: Vec<Vec<usize>> = vec![Vec::new(); runs.len()];
    for (ri, run) in runs.iter_mut().enumerate() {
        if run.done {
            continue;
        }
        let (p, d) = start_step(llm, g, run, ri, opts);
        pend.extend(p);
        deferred[ri] = d;
    }

    // 2. Turns: every unfinished call of every run is one batch.
    loop {
        let live: Vec<usize> = (0..pend.len()).filter(|&i| !pend[i].finished).collect();
        if live.is_empty() {
            break;
        }
        let (reqs, tool_turn): (Vec<Request>, Vec<bool>) = live
            .iter()
            .map(|&i| turn_request(g, runs[pend[i].run].seed, &pend[i], opts))
            .unzip();
        let gens =
            generate_isolating(llm, reqs).map_err(|source| GraphError::Llm { step, source })?;
        let mut jobs: Vec<Vec<ToolJob>> = (0..runs.len()).map(|_| Vec::new()).collect();
        for ((&i, gen), tt) in live.iter().zip(gens).zip(tool_turn) {
            if let Some((name, args)) = absorb_turn(g, opts, &mut pend[i], gen, tt) {
                jobs[pend[i].run].push(ToolJob {
                    pending: i,
                    name,
                    args,
                    result: String::new(),
                });
            }
        }
        if jobs.iter().all(Vec::is_empty) {
            continue;
        }
        // Tools: sequential within a run, parallel across runs.
        let agents: Vec<usize> = pend.iter().map(|p| p.agent).collect();
        runs.par_iter_mut()
            .zip(jobs.par_iter_mut())
            .for_each(|(run, js)| execute_jobs(g, run.tools.as_deref_mut(), &agents, js));
        for j in jobs.into_iter().flatten() {
            let i = j.pending;
            absorb_tool(llm, opts, &mut pend[i], j);
        }
    }

    // 2b. Format repair: calls whose final reply lacks output tags, one batch per attempt.
    for _ in 0..opts.format_repairs {
        if !repair_turn(llm, g, runs, &mut pend, opts, step)? {
            break;
        }
    }

    // 3. Apply outputs (agent order within a run), then route.
    let mut by_run: Vec<Vec<Pending>> = (0..runs.len()).map(|_| Vec::new()).collect();
    for p in pend {
        by_run[p.run].push(p);
    }
    for (ri, (run, p)) in runs.iter_mut().zip(by_run).enumerate() {
        if !run.done {
            finish_step(g, run, p, &deferred[ri], opts);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truthiness() {
        for t in [
            "true", " True ", "YES", "y", "1", "**true**", "`true`", "\"yes\"", "true.",
        ] {
            assert!(truthy(t), "{t}");
        }
        for f in ["false", "no", "0", "", "maybe", "true because", "truee"] {
            assert!(!truthy(f), "{f}");
        }
    }

    #[test]
    fn tool_call_parsing() {
        let (n, a, end) = parse_tool_call(
            r#"x <tool_call>{"name": "t", "arguments": {"k": 1}}</tool_call> y"#,
            &[],
        )
        .unwrap()
        .unwrap();
        assert_eq!((n.as_str(), a["k"].as_i64(), end), ("t", Some(1), 61));
        // Missing arguments, missing close tag, trailing text.
        let (n, a, _) = parse_tool_call("<tool_call>\n{\"name\": \"t\"}\nthen", &[])
            .unwrap()
            .unwrap();
        assert_eq!((n.as_str(), a), ("t", serde_json::json!({})));
        // Raw newlines inside strings (small models).
        let (_, a, _) =
            parse_tool_call("<tool_call>{\"name\": \"w\", \"arguments\": {\"code\": \"def f():\n\treturn 1\"}}</tool_call>", &[])
                .unwrap()
                .unwrap();
        assert_eq!(a["code"], "def f():\n\treturn 1");
        // Arguments given as a JSON string.
        let (_, a, _) = parse_tool_call(
            r#"<tool_call>{"name": "w", "arguments": "{\"code\": \"x\"}"}</tool_call>"#,
            &[],
        )
        .unwrap()
        .unwrap();
        assert_eq!(a["code"], "x");
        assert!(parse_tool_call("no call", &[]).is_none());
        assert!(parse_tool_call("<tool_call>{not json}</tool_call>", &[])
            .unwrap()
            .is_err());
        assert!(
            parse_tool_call(r#"<tool_call>{"arguments": {}}</tool_call>"#, &[])
                .unwrap()
                .is_err()
        );
        assert!(parse_tool_call(
            r#"<tool_call>{"name": "t", "arguments": 3}</tool_call>"#,
            &[]
        )
        .unwrap()
        .is_err());
        // Bare JSON calls of declared tools (Hermes-style models dropping the tag).
        let tools = ["check_tests".to_string(), "write_code".to_string()];
        let r = "{\"name\": \"check_tests\", \"arguments\": {}}\nThen I answer.";
        let (n, a, end) = parse_tool_call(r, &tools).unwrap().unwrap();
        assert_eq!(
            (n.as_str(), a, &r[end..]),
            ("check_tests", serde_json::json!({}), "\nThen I answer.")
        );
        let r = "Saving:\n```json\n{\"name\":\"write_code\", \"arguments\": {\"code\": \"def f():\n    return '}'\"}}\n```";
        let (n, a, end) = parse_tool_call(r, &tools).unwrap().unwrap();
        assert_eq!(
            (n.as_str(), a["code"].as_str()),
            ("write_code", Some("def f():\n    return '}'"))
        );
        assert_eq!(&r[end..], "\n```");
        // Not calls: an undeclared name, a broken object, JSON of another shape.
        for r in [
            "{\"name\": \"run_code\", \"arguments\": {}}",
            "{\"name\": \"check_tests\", \"arguments\": {",
            "{\"answer\": 3}",
            // A function signature echoed from the declaration.
            "{\"name\": \"check_tests\", \"description\": \"Run the tests\"}",
        ] {
            assert!(parse_tool_call(r, &tools).is_none(), "{r}");
        }
        // The earlier of a tagged and a bare call wins.
        let r = "<tool_call>{\"name\": \"write_code\", \"arguments\": {\"code\": \"x\"}}</tool_call> {\"name\": \"check_tests\"}";
        assert_eq!(parse_tool_call(r, &tools).unwrap().unwrap().0, "write_code");
        let r = "{\"name\": \"check_tests\"} <tool_call>{\"name\": \"write_code\"}</tool_call>";
        assert_eq!(
            parse_tool_call(r, &tools).unwrap().unwrap().0,
            "check_tests"
        );
    }

    #[test]
    fn last_fenced_block_takes_the_last_complete_fence() {
        assert_eq!(
            last_fenced_block("a\n```python\nx = 1\n```\nb\n```\ny = 2\n\n```\n```open").as_deref(),
            Some("y = 2")
        );
        assert_eq!(
            last_fenced_block("```def f(): pass```").as_deref(),
            Some("def f(): pass")
        );
        assert_eq!(last_fenced_block("no fence"), None);
        assert_eq!(last_fenced_block("```python\n  \n```"), None);
        assert_eq!(last_fenced_block("```python\nunclosed"), None);
    }

    #[test]
    fn seeds_are_stable_and_distinct() {
        let a = request_seed(7, "coder_agent", 1, 0);
        assert_eq!(a, request_seed(7, "coder_agent", 1, 0));
        assert_ne!(a, request_seed(8, "coder_agent", 1, 0));
        assert_ne!(a, request_seed(7, "planner_agent", 1, 0));
        assert_ne!(a, request_seed(7, "coder_agent", 2, 0));
        assert_ne!(a, request_seed(7, "coder_agent", 1, 1));
    }
}
