//! Multi-agent system (MAS) runtime: the setup file's data model (agents, edges,
//! prompt pools), the per-query tool environment seam, and the batched
//! super-step executor (reference spec §1: graph semantics and the agent call).

mod continuous;
pub mod runtime;
pub mod setup;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use runtime::{
    run_batch, write_trace_jsonl, AgentCall, RunOptions, RunResult, RunSpec, Schedule,
    ToolCallRecord, TraceRecord,
};
pub use setup::Validation;

/// Errors of the MAS layer: setup loading/validation and graph execution.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// The setup file could not be read.
    #[error("cannot read setup file {path}: {source}")]
    Io {
        /// File that failed.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The setup file is not valid YAML of the expected shape.
    #[error("setup file {path}: {message}")]
    Parse {
        /// File that failed.
        path: String,
        /// Parser message (with line and column).
        message: String,
    },
    /// The setup is well-formed YAML but describes an invalid MAS.
    #[error("{file}: {}field `{field}`: {message}", agent_prefix(.agent))]
    Invalid {
        /// Setup file (or `<setup>` when it did not come from a file).
        file: String,
        /// Agent concerned, if any.
        agent: Option<String>,
        /// Offending field, e.g. `input_vars`, `edges[2].to`, `init_agent_prompt_pool[3]`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A run specification does not fit the setup (e.g. a prompt set lacking an agent).
    #[error("run {run}: {message}")]
    BadRun {
        /// Index of the run in the batch.
        run: usize,
        /// What is wrong.
        message: String,
    },
    /// The language model failed (see [`runtime::run_batch`]).
    #[error("LLM failed in super-step {step}: {source}")]
    Llm {
        /// Super-step (0-based) in which the batch failed.
        step: usize,
        /// Underlying error.
        source: crate::llm::LlmError,
    },
    /// A trace file could not be written.
    #[error("cannot write trace {path}: {source}")]
    Trace {
        /// File that failed.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

fn agent_prefix(agent: &Option<String>) -> String {
    agent
        .as_ref()
        .map(|a| format!("agent `{a}`, "))
        .unwrap_or_default()
}

impl GraphError {
    /// Attach a file name to an [`GraphError::Invalid`] error (other errors are returned unchanged).
    pub fn in_file(self, path: impl AsRef<std::path::Path>) -> Self {
        match self {
            GraphError::Invalid {
                agent,
                field,
                message,
                ..
            } => GraphError::Invalid {
                file: path.as_ref().display().to_string(),
                agent,
                field,
                message,
            },
            e => e,
        }
    }
}

/// A joint prompt configuration: agent name → prompt template.
pub type PromptSet = BTreeMap<String, String>;

/// Pseudo-node where every run starts.
pub const START: &str = "__start__";
/// Pseudo-node where a run ends.
pub const END: &str = "__end__";

/// One edge of the agent graph (reference YAML shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSpec {
    /// Source node (`__start__` or an agent name).
    pub from: String,
    /// Target node (`__end__` or an agent name).
    pub to: String,
    /// State variable whose truth value makes this conditional edge fire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition_fix: Option<String>,
    /// How many times a conditional edge may fire per run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Where to go when the condition is false or retries are exhausted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_target: Option<String>,
}

impl EdgeSpec {
    /// Whether this edge is conditional.
    pub fn is_conditional(&self) -> bool {
        self.condition_fix.is_some()
    }
}

/// One agent of the MAS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Node id and prompt-pool key.
    pub name: String,
    /// What the agent does; shown to the meta-LLM only, never to the task LLM.
    #[serde(default)]
    pub task_description: String,
    /// State variables the agent's prompt reads (`{var}` placeholders).
    #[serde(default)]
    pub input_vars: Vec<String>,
    /// State variables the agent writes (`<var>…</var>` tags in its reply).
    #[serde(default)]
    pub output_vars: Vec<String>,
    /// Names of tools the agent may call.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Maximum tool-loop iterations (0 = no tool loop).
    #[serde(default)]
    pub max_tool_calls: u32,
    /// What some output variables must hold (`var: {regex: …}`,
    /// `{json_schema: …}` or `{lark: …}`): with a constraining backend (the
    /// local engine built with the `grammar` feature) the agent's reply is
    /// decoded under a grammar of its tags in order, each such tag holding a
    /// match. Not for agents with tools.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub output_grammars: BTreeMap<String, crate::llm::Grammar>,
    /// Output variables that hold code (e.g. MBPP's `code`). When the tag
    /// guard had to open such a variable's tag (the model ended its reply
    /// without it) and the reply before that point holds a markdown code
    /// fence, the variable is the last fenced block, not what the model wrote
    /// inside the forced tag: small models that answer in a fence and are
    /// then made to open the tag rewrite the code worse (flattened lines, cut
    /// bodies). Recorded in [`runtime::AgentCall::from_fence`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fenced_outputs: Vec<String>,
}

/// A MAS setup file: graph, agents and initial prompt pools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// Graph edges.
    pub edges: Vec<EdgeSpec>,
    /// Agents, in file order.
    pub agents: Vec<AgentSpec>,
    /// Agent name → initial prompt templates.
    pub init_agent_prompt_pool: BTreeMap<String, Vec<String>>,
}

impl Setup {
    /// The agent named `name`, if any.
    pub fn agent(&self, name: &str) -> Option<&AgentSpec> {
        self.agents.iter().find(|a| a.name == name)
    }
    /// The joint configuration made of each agent's `i`-th pool prompt (clamped).
    pub fn pool_config(&self, i: usize) -> PromptSet {
        self.agents
            .iter()
            .filter_map(|a| {
                let pool = self.init_agent_prompt_pool.get(&a.name)?;
                let p = pool.get(i.min(pool.len().saturating_sub(1)))?;
                Some((a.name.clone(), p.clone()))
            })
            .collect()
    }
}

/// A per-run tool environment (e.g. MBPP's code store and test runner).
/// Each (configuration, query) run gets its own fresh environment.
pub trait ToolEnv: Send {
    /// Names of the tools this environment offers.
    fn tool_names(&self) -> Vec<String>;
    /// One-line description of a tool (the tool declaration of an agent's
    /// system message, [`runtime::tool_declaration`]).
    fn describe(&self, name: &str) -> Option<String>;
    /// JSON Schema of a tool's arguments object (the declaration's
    /// `parameters`). Default: an object with no properties.
    fn parameters(&self, _name: &str) -> serde_json::Value {
        serde_json::json!({"type": "object", "properties": {}})
    }
    /// Execute a tool; the result (or error text) is returned to the agent.
    fn call(&mut self, name: &str, args: &serde_json::Value) -> String;
    /// Called with every output variable an agent produced in this run, so an
    /// environment can track state written through tags rather than tools
    /// (e.g. MBPP stores a `code` output as the current program). Default: ignore.
    fn observe(&mut self, _var: &str, _value: &str) {}
    /// The environment's final artifact, if any (e.g. MBPP's last written code).
    fn artifact(&self) -> Option<String> {
        None
    }
}
