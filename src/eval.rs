//! Evaluation of joint prompt configurations: runs (configuration × example)
//! through the MAS runtime as one batched workload, scores each run with the
//! task metric, and summarises accuracy, tokens per query, per-agent format
//! failures and wall time (the reference's test protocol, §3.3, without its
//! defects: seeds per rollout, traces kept, no silent fallbacks).

use crate::graph::runtime::{run_batch, write_trace_jsonl, RunOptions, RunResult, RunSpec};
use crate::graph::{GraphError, PromptSet, Setup};
use crate::llm::Llm;
use crate::task::{Example, Task};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Errors of the evaluation layer.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The MAS runtime failed.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// A prompt-set file is unreadable or does not fit the setup.
    #[error("prompt set {path}: {message}")]
    PromptSet {
        /// File.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Writing results failed.
    #[error("cannot write {path}: {message}")]
    Write {
        /// File.
        path: String,
        /// What went wrong.
        message: String,
    },
}

/// FNV-1a 64-bit: a stable hash for seeds and content ids.
pub fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.iter() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Stable content id of a prompt set (agent names and prompts).
pub fn config_id(config: &PromptSet) -> String {
    let mut parts: Vec<&[u8]> = Vec::new();
    for (k, v) in config {
        parts.push(k.as_bytes());
        parts.push(v.as_bytes());
    }
    format!("{:016x}", fnv64(&parts))
}

/// Seed of one rollout: depends only on the run seed and the example id —
/// never on batch composition or position, and not on the configuration.
/// Every configuration meets a query with the same random numbers (common
/// random numbers): an agent whose prompt and inputs are unchanged writes
/// the same reply under every configuration, so the score difference of two
/// configurations on one query comes from the agents that differ (the
/// one-factor design's counterfactual credit, CAPO's paired races) and not
/// from resampling the others.
pub fn rollout_seed(seed: u64, example_id: &str) -> u64 {
    fnv64(&[&seed.to_le_bytes(), example_id.as_bytes()])
}

/// One scored run.
#[derive(Debug)]
pub struct ScoredRun {
    /// Index of the configuration.
    pub config: usize,
    /// Index of the example.
    pub example: usize,
    /// Task score in [0, 1].
    pub score: f64,
    /// The run itself (state, trace, tokens).
    pub result: RunResult,
}

/// Options of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Runtime options (sampling, token limits, caps).
    pub run: RunOptions,
    /// Run seed.
    pub seed: u64,
    /// Runs per runtime call (bounds memory and paces progress); 0 = all at once.
    pub chunk_runs: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            run: RunOptions::default(),
            seed: 0,
            chunk_runs: 256,
        }
    }
}

/// Run every configuration on every example and score the runs. Results are
/// indexed `[config][example]`. `progress` receives the number of runs finished.
pub fn execute(
    llm: &dyn Llm,
    setup: &Setup,
    task: &dyn Task,
    configs: &[PromptSet],
    examples: &[Example],
    opts: &EvalOptions,
    progress: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<Vec<Vec<ScoredRun>>, EvalError> {
    let mut jobs: Vec<(usize, usize)> = Vec::new();
    for c in 0..configs.len() {
        for e in 0..examples.len() {
            jobs.push((c, e));
        }
    }
    let arcs: Vec<Arc<PromptSet>> = configs.iter().map(|c| Arc::new(c.clone())).collect();
    let chunk = if opts.chunk_runs == 0 {
        jobs.len().max(1)
    } else {
        opts.chunk_runs
    };
    let mut scored: Vec<ScoredRun> = Vec::with_capacity(jobs.len());
    for part in jobs.chunks(chunk) {
        let specs: Vec<RunSpec> = part
            .iter()
            .map(|&(c, e)| {
                let ex = &examples[e];
                RunSpec {
                    prompts: arcs[c].clone(),
                    query: ex.query.clone(),
                    init: task.initial_state(ex),
                    few_shots: Vec::new(),
                    tools: task.tool_env(ex),
                    seed: rollout_seed(opts.seed, &ex.id),
                }
            })
            .collect();
        let done_before = scored.len();
        let cb = |n: usize| {
            if let Some(p) = progress {
                p(done_before + n)
            }
        };
        let results = run_batch(llm, setup, specs, &opts.run, Some(&cb))?;
        let mut part_scored: Vec<ScoredRun> = results
            .into_par_iter()
            .zip(part.par_iter())
            .map(|(result, &(c, e))| {
                let score = task.score(&examples[e], &result.prediction, result.tools.as_deref());
                ScoredRun {
                    config: c,
                    example: e,
                    score,
                    result,
                }
            })
            .collect();
        scored.append(&mut part_scored);
    }
    let mut out: Vec<Vec<ScoredRun>> = (0..configs.len())
        .map(|_| Vec::with_capacity(examples.len()))
        .collect();
    for s in scored {
        out[s.config].push(s);
    }
    Ok(out)
}

/// Summary of one configuration's evaluation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalSummary {
    /// Number of examples.
    pub n: usize,
    /// Mean score.
    pub accuracy: f64,
    /// Mean input tokens per query (all agent calls).
    pub mean_input_tokens: f64,
    /// Mean output tokens per query.
    pub mean_output_tokens: f64,
    /// Per agent: fraction of its calls with at least one output tag still
    /// missing at the end of the call (after any format-repair turns).
    pub format_failure_rate: BTreeMap<String, f64>,
    /// Per agent: fraction of its calls whose reply lacked tags that a
    /// format-repair turn recovered (empty when repair is off).
    #[serde(default)]
    pub format_repair_rate: BTreeMap<String, f64>,
    /// Per agent: fraction of its calls whose final reply stopped at the
    /// `max_new_tokens` limit ([`AgentCall::truncated`](crate::graph::AgentCall::truncated)).
    #[serde(default)]
    pub truncation_rate: BTreeMap<String, f64>,
    /// Per agent: its output tags (calls × output variables) written by the
    /// model, forced by the tag guard when the budget ran out, and missing.
    #[serde(default)]
    pub tags: BTreeMap<String, TagCounts>,
    /// Runs that ended abnormally (step limit, rejected request).
    pub run_errors: usize,
    /// Wall time in seconds (filled by the caller).
    pub wall_secs: f64,
    /// The backend's work counters during this evaluation (decode batch fill,
    /// prefix reuse), when the backend keeps them (filled by the caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::llm::EngineStats>,
}

/// Output tags of one agent's calls, by who wrote them.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagCounts {
    /// Tags the model wrote itself (in its reply or a repair answer).
    pub written: usize,
    /// Tags whose opening or closing literal the tag guard forced.
    pub forced: usize,
    /// Tags still missing at the end of the call (format failures).
    pub missing: usize,
    /// Outputs taken from a code fence instead of their guard-opened tag
    /// (`fenced_outputs`; counted in `forced` too).
    #[serde(default)]
    pub from_fence: usize,
}

/// Summarise the runs of one configuration.
pub fn summarize(runs: &[ScoredRun]) -> EvalSummary {
    let n = runs.len();
    let nf = n.max(1) as f64;
    let mut calls: BTreeMap<String, (usize, usize, usize, usize)> = BTreeMap::new();
    let mut tags: BTreeMap<String, TagCounts> = BTreeMap::new();
    for r in runs {
        for c in &r.result.calls {
            let e = calls.entry(c.agent.clone()).or_default();
            e.0 += 1;
            e.1 += usize::from(!c.format_failures.is_empty());
            e.2 += usize::from(!c.repaired.is_empty());
            e.3 += usize::from(c.truncated);
            let t = tags.entry(c.agent.clone()).or_default();
            let forced = c
                .outputs
                .keys()
                .filter(|k| c.forced_tags.contains(k))
                .count();
            t.forced += forced;
            t.written += c.outputs.len() - forced;
            t.missing += c.format_failures.len();
            t.from_fence += c.from_fence.len();
        }
    }
    let rate = |n: usize, t: usize| n as f64 / t.max(1) as f64;
    EvalSummary {
        n,
        accuracy: runs.iter().map(|r| r.score).sum::<f64>() / nf,
        mean_input_tokens: runs
            .iter()
            .map(|r| r.result.input_tokens as f64)
            .sum::<f64>()
            / nf,
        mean_output_tokens: runs
            .iter()
            .map(|r| r.result.output_tokens as f64)
            .sum::<f64>()
            / nf,
        format_failure_rate: calls
            .iter()
            .map(|(k, &(t, f, _, _))| (k.clone(), rate(f, t)))
            .collect(),
        format_repair_rate: calls
            .iter()
            .filter(|(_, &(_, _, r, _))| r > 0)
            .map(|(k, &(t, _, r, _))| (k.clone(), rate(r, t)))
            .collect(),
        truncation_rate: calls
            .iter()
            .map(|(k, &(t, _, _, c))| (k.clone(), rate(c, t)))
            .collect(),
        tags,
        run_errors: runs.iter().filter(|r| r.result.error.is_some()).count(),
        wall_secs: 0.0,
        engine: None,
    }
}

/// Write the traces of runs as JSONL, each record tagged with the example id,
/// target, score and configuration id.
pub fn write_traces(
    path: &Path,
    runs: Vec<ScoredRun>,
    examples: &[Example],
    configs: &[PromptSet],
) -> Result<(), EvalError> {
    let mut extra = Vec::with_capacity(runs.len());
    let mut results = Vec::with_capacity(runs.len());
    for r in runs {
        let mut m = serde_json::Map::new();
        m.insert("example_id".into(), examples[r.example].id.clone().into());
        m.insert("target".into(), examples[r.example].target.clone().into());
        m.insert("score".into(), r.score.into());
        m.insert("config_id".into(), config_id(&configs[r.config]).into());
        extra.push(m);
        results.push(r.result);
    }
    Ok(write_trace_jsonl(path, &results, &extra)?)
}

/// Load a prompt set (YAML map agent → prompt) and check it covers the setup's agents.
pub fn load_prompt_set(path: &Path, setup: &Setup) -> Result<PromptSet, EvalError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::PromptSet {
        path: p.clone(),
        message: e.to_string(),
    })?;
    let set: PromptSet = serde_yaml::from_str(&text).map_err(|e| EvalError::PromptSet {
        path: p.clone(),
        message: e.to_string(),
    })?;
    for a in &setup.agents {
        let Some(t) = set.get(&a.name) else {
            return Err(EvalError::PromptSet {
                path: p,
                message: format!("no prompt for agent `{}`", a.name),
            });
        };
        let missing = crate::prompt::missing_placeholders(t, &a.input_vars);
        if !missing.is_empty() {
            return Err(EvalError::PromptSet {
                path: p,
                message: format!(
                    "prompt of agent `{}` lacks placeholders {missing:?}",
                    a.name
                ),
            });
        }
    }
    if let Some(k) = set.keys().find(|k| setup.agent(k).is_none()) {
        return Err(EvalError::PromptSet {
            path: p,
            message: format!("agent `{k}` is not in the setup"),
        });
    }
    Ok(set)
}
