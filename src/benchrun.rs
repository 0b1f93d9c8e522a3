//! Reproducible benchmark runs (reference spec §3.3 test protocol, §8 grid,
//! §9 results): the [`Protocol`] files of `configs/protocols/`, the part
//! records a `cantante bench-run` directory holds per (task, seed), and the
//! results table built from whatever parts are finished — initial
//! configuration, CANTANTE and the identity-attribution ablation (spec §9.4),
//! each as mean ± std (ddof = 1) over seeds, with test tokens per query,
//! optimization tokens, wall time, rounds, the credit-correlation check
//! (spec §9.5) and the candidates' per-query record against their incumbents,
//! next to the paper's reference numbers.
//!
//! Directory layout (`DIR/<task>/seed<S>/`): `initial_test.json`,
//! `cantante/` (an optimize run directory plus `timing.json`),
//! `cantante_test.json`, `identity/`, `identity_test.json`. The table logic
//! ([`build_table`], [`render_markdown`]) is pure; [`load_seed`] reads one
//! seed directory and reports unreadable parts instead of failing.

use crate::eval::EvalSummary;
use crate::graph::PromptSet;
use crate::optimize::analysis::{
    candidate_outcomes, counterfactual_correlation, credit_correlation, Outcomes,
};
use crate::optimize::{OptimizeConfig, OptimizeResult, RoundRecord, StopReason};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The `paper` protocol file, embedded.
pub const PAPER_YAML: &str = include_str!("../configs/protocols/paper.yaml");
/// The `cpu-small` protocol file, embedded.
pub const CPU_SMALL_YAML: &str = include_str!("../configs/protocols/cpu-small.yaml");

/// Errors of benchmark runs; each names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A file could not be parsed.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// A protocol value is out of range.
    #[error("protocol {name}: field `{field}`: {message}")]
    Protocol {
        /// Protocol name or file.
        name: String,
        /// The offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Per-task overrides of a protocol (e.g. MBPP's longer code turns).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskOverride {
    /// Maximum new tokens per agent turn.
    pub max_new_tokens: Option<usize>,
    /// Token cap on each state field filled into a prompt.
    pub field_cap: Option<usize>,
    /// Token cap of each field shown to the attributer.
    pub attribution_field_cap: Option<usize>,
}

/// A benchmark protocol (`configs/protocols/*.yaml`): data sizes, agent
/// sampling and the optimizer's hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    /// One-line description.
    #[serde(default)]
    pub description: String,
    /// Dev examples blocks are drawn from.
    pub dev_size: usize,
    /// Validation examples for the combined best configuration.
    pub val_size: usize,
    /// Test examples (seeded sample per seed, shared by all methods).
    pub test_size: usize,
    /// Maximum new tokens per agent turn.
    pub max_new_tokens: usize,
    /// Token cap on each state field filled into a prompt.
    pub field_cap: usize,
    /// Agent sampling temperature.
    pub temperature: f64,
    /// System prompt of every agent call.
    #[serde(default = "default_system")]
    pub system: String,
    /// Format-repair turns per agent call (`RunOptions::format_repairs`);
    /// 0 (the reference behaviour) when absent.
    #[serde(default)]
    pub format_repairs: usize,
    /// Enforce agents' output tags while decoding (`RunOptions::tag_guard`);
    /// off (the reference behaviour) when absent.
    #[serde(default)]
    pub tag_guard: bool,
    /// Declare each agent's tools in its system message
    /// (`RunOptions::declare_tools`); off (the behaviour of the protocols
    /// written before it) when absent.
    #[serde(default)]
    pub declare_tools: bool,
    /// Maximum rounds of the identity ablation, which stops at the CANTANTE
    /// run's total token spend; default: 3 × `optimizer.rounds`.
    #[serde(default)]
    pub identity_rounds: Option<usize>,
    /// Per-task overrides, keyed by task name.
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskOverride>,
    /// Optimizer settings (fields of [`OptimizeConfig`]; `seed` is replaced
    /// by each run seed).
    #[serde(default)]
    pub optimizer: OptimizeConfig,
}

fn default_system() -> String {
    "You are a helpful assistant.".into()
}

impl Protocol {
    /// Parse a protocol from YAML text; `name` is used in errors.
    pub fn from_yaml(text: &str, name: &str) -> Result<Self, BenchError> {
        let p: Protocol = serde_yaml::from_str(text).map_err(|e| BenchError::Format {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        p.validate(name)?;
        Ok(p)
    }

    /// A built-in protocol by name (`paper`, `cpu-small`), else a YAML file path.
    pub fn resolve(spec: &str) -> Result<(String, Self), BenchError> {
        match spec {
            "paper" => Ok(("paper".into(), Self::from_yaml(PAPER_YAML, "paper")?)),
            "cpu-small" => Ok((
                "cpu-small".into(),
                Self::from_yaml(CPU_SMALL_YAML, "cpu-small")?,
            )),
            path => {
                let p = Path::new(path);
                let text = std::fs::read_to_string(p).map_err(io_err(p))?;
                let name = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.to_string());
                Ok((name, Self::from_yaml(&text, path)?))
            }
        }
    }

    /// Check value ranges; the error names the field.
    pub fn validate(&self, name: &str) -> Result<(), BenchError> {
        let bad = |field: &str, message: &str| {
            Err(BenchError::Protocol {
                name: name.into(),
                field: field.into(),
                message: message.into(),
            })
        };
        for (field, v) in [
            ("dev_size", self.dev_size),
            ("val_size", self.val_size),
            ("test_size", self.test_size),
            ("max_new_tokens", self.max_new_tokens),
            ("field_cap", self.field_cap),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be a finite number >= 0");
        }
        if self.identity_rounds == Some(0) {
            return bad("identity_rounds", "must be at least 1");
        }
        if self.dev_size < self.optimizer.block_size {
            return bad("dev_size", "must be at least optimizer.block_size");
        }
        self.optimizer.validate().map_err(|e| BenchError::Protocol {
            name: name.into(),
            field: "optimizer".into(),
            message: e.to_string(),
        })
    }

    fn over(&self, task: &str) -> TaskOverride {
        self.tasks.get(task).cloned().unwrap_or_default()
    }

    /// Maximum new tokens per agent turn for `task`.
    pub fn max_new_tokens(&self, task: &str) -> usize {
        self.over(task)
            .max_new_tokens
            .unwrap_or(self.max_new_tokens)
    }

    /// Field token cap for `task`.
    pub fn field_cap(&self, task: &str) -> usize {
        self.over(task).field_cap.unwrap_or(self.field_cap)
    }

    /// The CANTANTE run's optimizer configuration for `task` and `seed`.
    pub fn optimizer_config(&self, task: &str, seed: u64) -> OptimizeConfig {
        let mut c = self.optimizer.clone();
        c.seed = seed;
        c.task_max_new_tokens_estimate = self.max_new_tokens(task);
        c.validation_size_estimate = self.val_size;
        if let Some(f) = self.over(task).attribution_field_cap {
            c.attribution_field_cap = f;
        }
        c
    }

    /// The identity ablation's configuration: the CANTANTE configuration with
    /// the identity attributer on the paper's joint design, capped at `cantante_total_tokens` (equal
    /// budget) and at most [`Protocol::identity_rounds`] rounds.
    pub fn identity_config(
        &self,
        task: &str,
        seed: u64,
        cantante_total_tokens: u64,
    ) -> OptimizeConfig {
        let mut c = self.optimizer_config(task, seed);
        c.identity_attribution = true;
        c.design = crate::optimize::Design::Joint;
        c.rounds = self
            .identity_rounds
            .unwrap_or(3 * self.optimizer.rounds)
            .max(1);
        c.max_total_tokens = Some(
            c.max_total_tokens
                .map_or(cantante_total_tokens, |m| m.min(cantante_total_tokens)),
        );
        c
    }
}

/// The machine a part ran on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model (from /proc/cpuinfo).
    pub cpu: String,
    /// Logical cores available to the process.
    pub cores: usize,
    /// Total RAM in GiB (from /proc/meminfo).
    pub ram_gib: u64,
    /// Accelerator (`cuda`) or `cpu`.
    pub device: String,
    /// Model id of the task (and meta) model.
    pub model: String,
}

impl Machine {
    /// Describe this machine; unreadable /proc files give `unknown`/0.
    pub fn detect(model: &str, device: &str) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let ram_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map(|kib| (kib + (1 << 19)) >> 20)
            .unwrap_or(0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            ram_gib,
            device: device.into(),
            model: model.into(),
        }
    }

    /// One-line description.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} cores, {} GiB RAM, {}), model {}",
            self.cpu, self.cores, self.ram_gib, self.device, self.model
        )
    }
}

/// The three compared methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The first prompt of each agent's pool.
    Initial,
    /// CANTANTE (LLM attribution).
    Cantante,
    /// CANTANTE with the identity attributer at equal token budget.
    Identity,
}

impl Method {
    /// All methods, in table order.
    pub const ALL: [Method; 3] = [Method::Initial, Method::Cantante, Method::Identity];

    /// Short name (file prefixes).
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Initial => "initial",
            Method::Cantante => "cantante",
            Method::Identity => "identity",
        }
    }

    /// Label in the table.
    pub fn label(&self) -> &'static str {
        match self {
            Method::Initial => "Initial",
            Method::Cantante => "CANTANTE",
            Method::Identity => "Identity attribution (equal budget)",
        }
    }

    /// File of the method's test evaluation in a seed directory.
    pub fn test_file(&self) -> String {
        format!("{}_test.json", self.as_str())
    }

    /// File of the rollouts of the method's test evaluation (one JSON line
    /// per query, with its `example_id` and `score`).
    pub fn traces_file(&self) -> String {
        format!("{}_test_traces.jsonl", self.as_str())
    }

    /// File of the per-item scores of the method's test evaluation (a JSON
    /// map example id → score): what the paired comparisons read, small
    /// enough to commit when the traces are left behind
    /// (`benches/keep-run.sh`).
    pub fn scores_file(&self) -> String {
        format!("{}_test_scores.json", self.as_str())
    }
}

/// A finished test evaluation (`<method>_test.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestRecord {
    /// Method evaluated.
    pub method: Method,
    /// Task name.
    pub task: String,
    /// Seed (test sample and rollouts).
    pub seed: u64,
    /// Content id of the evaluated prompt set.
    pub config_id: String,
    /// The evaluated prompt set.
    pub prompts: PromptSet,
    /// Accuracy, tokens and wall time.
    pub summary: EvalSummary,
    /// Where it ran.
    pub machine: Machine,
    /// Set when this record copies another method's evaluation of the same
    /// prompt set on the same test sample and seed (rollouts depend only on
    /// seed, prompts and query, so re-running would give the same result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<Method>,
}

/// Wall time of an optimize run (`timing.json` in its run directory),
/// accumulated over resumed sessions and updated after every round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Seconds spent so far (a round cut short by a crash is not counted).
    pub wall_secs: f64,
    /// Where the last session ran.
    pub machine: Machine,
}

/// A finished (or partial) optimize run of one seed.
#[derive(Clone, Debug, PartialEq)]
pub struct OptPart {
    /// `summary.json`, when the run is finished.
    pub summary: Option<OptimizeResult>,
    /// Records of `rounds.jsonl` (also of unfinished runs).
    pub rounds: Vec<RoundRecord>,
    /// `timing.json`, when present.
    pub timing: Option<Timing>,
}

/// Everything found for one (task, seed).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct SeedParts {
    /// Task name.
    pub task: String,
    /// Seed.
    pub seed: u64,
    /// Test evaluations by method.
    pub tests: BTreeMap<Method, TestRecord>,
    /// Optimize runs by method (cantante, identity).
    pub runs: BTreeMap<Method, OptPart>,
    /// Per-item test scores by method (example id → score), from
    /// `<method>_test_scores.json` or `<method>_test_traces.jsonl`, for the
    /// paired comparisons.
    pub item_scores: BTreeMap<Method, BTreeMap<String, f64>>,
    /// External baselines on the same items (`dspy_<optimizer>.json`).
    pub baselines: Vec<BaselineRecord>,
}

/// Whether an optimize summary marks a finished run (all rounds, or the
/// budget); a run stopped by a `STOP` file or interrupted is continued.
pub fn is_finished(s: &OptimizeResult) -> bool {
    matches!(
        s.stop_reason,
        StopReason::Completed | StopReason::Budget { .. }
    )
}

/// Directory of one seed: `DIR/<task>/seed<S>`.
pub fn seed_dir(out: &Path, task: &str, seed: u64) -> PathBuf {
    out.join(task).join(format!("seed{seed}"))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, BenchError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| BenchError::Format {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

/// Read the `rounds.jsonl` of a run directory (missing file = no rounds).
pub fn read_rounds(run_dir: &Path) -> Result<Vec<RoundRecord>, BenchError> {
    let path = run_dir.join("rounds.jsonl");
    if !path.is_file() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| BenchError::Format {
                path: format!("{} line {}", path.display(), i + 1),
                message: e.to_string(),
            })
        })
        .collect()
}

/// Per-item scores of a test evaluation's traces (example id → score; None
/// when the file is absent). An item evaluated more than once keeps its mean.
pub fn load_item_scores(path: &Path) -> Result<Option<BTreeMap<String, f64>>, BenchError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |message: String| BenchError::Format {
            path: format!("{} line {}", path.display(), i + 1),
            message,
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let id = match &v["example_id"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err(bad("no `example_id`".into())),
        };
        let score = v["score"]
            .as_f64()
            .ok_or_else(|| bad("no numeric `score`".into()))?;
        let e = sums.entry(id).or_default();
        e.0 += score;
        e.1 += 1;
    }
    Ok(Some(
        sums.into_iter()
            .map(|(k, (s, n))| (k, s / n as f64))
            .collect(),
    ))
}

/// Write `<method>_test_scores.json` in a seed directory from the method's
/// traces. Returns false (and writes nothing) when there are no traces.
pub fn write_item_scores(dir: &Path, method: Method) -> Result<bool, BenchError> {
    let Some(scores) = load_item_scores(&dir.join(method.traces_file()))? else {
        return Ok(false);
    };
    let path = dir.join(method.scores_file());
    let text = serde_json::to_string_pretty(&scores).map_err(|e| BenchError::Format {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    crate::optimize::checkpoint::write_atomic(&path, text.as_bytes()).map_err(|e| {
        BenchError::Format {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    })?;
    Ok(true)
}

/// Per-item test scores of a method in a seed directory: its
/// `<method>_test_scores.json`, else its traces (None when neither exists).
pub fn load_method_scores(
    dir: &Path,
    method: Method,
) -> Result<Option<BTreeMap<String, f64>>, BenchError> {
    match read_json(&dir.join(method.scores_file()))? {
        Some(s) => Ok(Some(s)),
        None => load_item_scores(&dir.join(method.traces_file())),
    }
}

/// Load a finished test record (None when absent).
pub fn load_test(path: &Path) -> Result<Option<TestRecord>, BenchError> {
    read_json(path)
}

/// Load a run's `summary.json` only when it marks a finished run.
pub fn load_finished_summary(run_dir: &Path) -> Result<Option<OptimizeResult>, BenchError> {
    Ok(read_json::<OptimizeResult>(&run_dir.join("summary.json"))?.filter(is_finished))
}

/// Load a run's `timing.json` (None when absent).
pub fn load_timing(run_dir: &Path) -> Result<Option<Timing>, BenchError> {
    read_json(&run_dir.join("timing.json"))
}

/// Read one seed directory. Unreadable parts are left out and returned as
/// errors beside the parts that could be read.
pub fn load_seed(out: &Path, task: &str, seed: u64) -> (SeedParts, Vec<BenchError>) {
    let dir = seed_dir(out, task, seed);
    let mut parts = SeedParts {
        task: task.into(),
        seed,
        ..Default::default()
    };
    let mut errors = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("dspy_") && n.ends_with(".json"))
            })
            .collect();
        files.sort();
        for f in files {
            match read_json::<BaselineRecord>(&f) {
                Ok(Some(b)) => parts.baselines.push(b),
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
    }
    for m in Method::ALL {
        match load_test(&dir.join(m.test_file())) {
            Ok(Some(t)) => {
                parts.tests.insert(m, t);
                match load_method_scores(&dir, m) {
                    Ok(Some(scores)) => {
                        parts.item_scores.insert(m, scores);
                    }
                    Ok(None) => {}
                    Err(e) => errors.push(e),
                }
            }
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
        if m == Method::Initial {
            continue;
        }
        let run_dir = dir.join(m.as_str());
        if !run_dir.is_dir() {
            continue;
        }
        let summary = load_finished_summary(&run_dir).unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        let timing = load_timing(&run_dir).unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        let rounds = read_rounds(&run_dir).unwrap_or_else(|e| {
            errors.push(e);
            vec![]
        });
        parts.runs.insert(
            m,
            OptPart {
                summary,
                rounds,
                timing,
            },
        );
    }
    (parts, errors)
}

/// Mean, sample standard deviation (ddof = 1; None for one value) and count.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation; None with fewer than two values.
    pub std: Option<f64>,
    /// Number of values.
    pub n: usize,
}

impl MeanStd {
    /// Statistics of `values`; None when empty. Non-finite values are skipped.
    pub fn of(values: &[f64]) -> Option<Self> {
        let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let std = (n > 1)
            .then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
        Some(MeanStd { mean, std, n })
    }

    /// `mean ± std` with `digits` decimals after scaling by `scale`; `–` for a missing std.
    pub fn fmt(&self, scale: f64, digits: usize) -> String {
        let std = self
            .std
            .map(|s| format!("{:.*}", digits, s * scale))
            .unwrap_or_else(|| "–".into());
        format!("{:.*} ± {}", digits, self.mean * scale, std)
    }
}

/// One (task, method) row of the results table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MethodRow {
    /// Task.
    pub task: String,
    /// Method.
    pub method: Method,
    /// Seeds with a finished test evaluation.
    pub seeds: Vec<u64>,
    /// Per-seed test accuracy (in [0, 1]), by seed.
    pub per_seed_accuracy: BTreeMap<u64, f64>,
    /// Test accuracy over seeds (in [0, 1]).
    pub accuracy: Option<MeanStd>,
    /// Test tokens per query (input + output).
    pub tokens_per_query: Option<MeanStd>,
    /// Optimization task tokens (finished runs).
    pub opt_task_tokens: Option<MeanStd>,
    /// Optimization meta tokens (finished runs).
    pub opt_meta_tokens: Option<MeanStd>,
    /// Share of optimization tokens spent on meta calls (in [0, 1]).
    pub meta_share: Option<MeanStd>,
    /// Optimization wall time in seconds.
    pub opt_wall_secs: Option<MeanStd>,
    /// Test evaluation wall time in seconds.
    pub test_wall_secs: Option<MeanStd>,
    /// Completed rounds (finished runs).
    pub rounds: Option<MeanStd>,
    /// Per agent: the share of its test-evaluation replies cut off at the
    /// protocol's `max_new_tokens` (over the seeds' test evaluations).
    #[serde(default)]
    pub truncation: BTreeMap<String, MeanStd>,
}

/// Credit correlation of one agent (spec §9.5) over the CANTANTE runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreditRow {
    /// Task.
    pub task: String,
    /// Agent.
    pub agent: String,
    /// Per seed: (Spearman ρ, configurations used).
    pub per_seed: BTreeMap<u64, (Option<f64>, usize)>,
    /// ρ over the seeds where it is defined.
    pub rho: Option<MeanStd>,
    /// Per seed: (Spearman ρ between credit and counterfactual gain,
    /// single-agent configurations used).
    #[serde(default)]
    pub counterfactual_per_seed: BTreeMap<u64, (Option<f64>, usize)>,
    /// That ρ over the seeds where it is defined.
    #[serde(default)]
    pub counterfactual_rho: Option<MeanStd>,
}

/// Candidate configurations of one CANTANTE run against their round's
/// incumbent, query by query, for one changed agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateRow {
    /// Task.
    pub task: String,
    /// Seed.
    pub seed: u64,
    /// The agent the candidates changed (or `(several agents)`).
    pub changed: String,
    /// Block queries won, lost and tied against the incumbent.
    pub outcomes: Outcomes,
}

/// A paired comparison of two methods over the (seed, test item) pairs both
/// evaluated: the same items, so item difficulty cancels out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairedRow {
    /// Task.
    pub task: String,
    /// The method compared (its label).
    pub method: String,
    /// What it is compared against: a method's label or an external
    /// baseline's name (e.g. `DSPy MIPROv2`).
    pub baseline: String,
    /// The comparison itself.
    pub stat: PairedStat,
}

/// An external baseline's result on one seed's test items
/// (`DIR/<task>/seed<S>/dspy_<optimizer>.json`, written by
/// `benches/dspy/baseline.py`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaselineRecord {
    /// Optimizer (`mipro`, `gepa`, `none`).
    pub optimizer: String,
    /// DSPy version.
    #[serde(default)]
    pub dspy_version: String,
    /// Served model name.
    #[serde(default)]
    pub model: String,
    /// The model that wrote the optimizer's own calls (MIPROv2's proposals,
    /// GEPA's reflections) when it was not the task model (`--meta-api-base`).
    #[serde(default)]
    pub meta_model: Option<String>,
    /// Test accuracy in [0, 1].
    pub accuracy: f64,
    /// Per-item scores (example id → score).
    pub item_scores: BTreeMap<String, f64>,
    /// Optimization tokens (input, output) from the server's usage.
    #[serde(default)]
    pub opt_tokens: BTreeMap<String, u64>,
    /// Test tokens (input, output).
    #[serde(default)]
    pub test_tokens: BTreeMap<String, u64>,
    /// Optimization wall time.
    #[serde(default)]
    pub opt_wall_secs: f64,
}

impl BaselineRecord {
    /// Display name, e.g. `DSPy MIPROv2`, or `DSPy MIPROv2 (meta model
    /// qwen2.5-coder-1.5b-instruct)` when a second model wrote its proposals.
    pub fn label(&self) -> String {
        let o = match self.optimizer.as_str() {
            "mipro" => "MIPROv2",
            "gepa" => "GEPA",
            "none" => "unoptimized",
            o => o,
        };
        match &self.meta_model {
            Some(m) => format!("DSPy {o} (meta model {m})"),
            None => format!("DSPy {o}"),
        }
    }
}

/// One (task, external baseline) row of the results table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BaselineRow {
    /// Task.
    pub task: String,
    /// Display name.
    pub name: String,
    /// Seeds with a result.
    pub seeds: Vec<u64>,
    /// Test accuracy over seeds.
    pub accuracy: Option<MeanStd>,
    /// Test tokens per query (input + output).
    pub tokens_per_query: Option<MeanStd>,
    /// Optimization tokens (input + output).
    pub opt_tokens: Option<MeanStd>,
    /// Optimization wall time in seconds.
    pub opt_wall_secs: Option<MeanStd>,
}

/// Paired statistics of per-item scores `a` vs `b` (see [`paired_stat`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairedStat {
    /// Pairs (seed, item).
    pub n: usize,
    /// Seeds contributing pairs.
    pub seeds: Vec<u64>,
    /// Mean of `a − b` (in [−1, 1]).
    pub mean_diff: f64,
    /// 95% paired-bootstrap interval of the mean difference (2.5%, 97.5%).
    pub ci95: (f64, f64),
    /// Items `a` solved and `b` did not (score ≥ 0.5 counts as solved).
    pub only_a: usize,
    /// Items `b` solved and `a` did not.
    pub only_b: usize,
    /// Exact two-sided McNemar p-value on those discordant pairs.
    pub mcnemar_p: f64,
}

/// Bootstrap resamples of [`paired_stat`].
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// Paired comparison of scores `(a, b)` per item: the mean difference, a 95%
/// paired-bootstrap interval (resampling items with replacement,
/// [`BOOTSTRAP_RESAMPLES`] times from a fixed seed, so the table is
/// reproducible) and the exact McNemar test on the discordant pairs
/// (`p = min(1, 2·P[X ≤ min(b, c)])`, X ~ Binomial(b + c, ½)). None for no pairs.
pub fn paired_stat(pairs: &[(f64, f64)], seeds: Vec<u64>) -> Option<PairedStat> {
    use rand::{Rng, SeedableRng};
    let n = pairs.len();
    if n == 0 {
        return None;
    }
    let d: Vec<f64> = pairs.iter().map(|(a, b)| a - b).collect();
    let mean_diff = d.iter().sum::<f64>() / n as f64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5EED_B007);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| (0..n).map(|_| d[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (means.len() - 1) as f64).round() as usize).min(means.len() - 1)];
    let solved = |x: f64| x >= 0.5;
    let only_a = pairs
        .iter()
        .filter(|(a, b)| solved(*a) && !solved(*b))
        .count();
    let only_b = pairs
        .iter()
        .filter(|(a, b)| !solved(*a) && solved(*b))
        .count();
    Some(PairedStat {
        n,
        seeds,
        mean_diff,
        ci95: (at(0.025), at(0.975)),
        only_a,
        only_b,
        mcnemar_p: mcnemar_exact(only_a, only_b),
    })
}

/// Exact two-sided McNemar p-value for `b` and `c` discordant pairs.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let m = b + c;
    if m == 0 {
        return 1.0;
    }
    // P[X ≤ k] for X ~ Binomial(m, 1/2), in log space (m can be large).
    let k = b.min(c);
    let ln_half_m = -(m as f64) * std::f64::consts::LN_2;
    let mut ln_choose = 0.0f64; // ln C(m, 0)
    let mut cdf = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((m - i + 1) as f64).ln() - (i as f64).ln();
        }
        cdf += (ln_choose + ln_half_m).exp();
    }
    (2.0 * cdf).min(1.0)
}

/// Pairs (method score, baseline score) over every seed's items both have;
/// `b` picks the baseline's per-item scores of a seed.
fn pairs_of<'a>(
    seeds: &[&'a SeedParts],
    a: Method,
    b: impl Fn(&'a SeedParts) -> Option<&'a BTreeMap<String, f64>>,
) -> (Vec<(f64, f64)>, Vec<u64>) {
    let mut pairs = Vec::new();
    let mut used = Vec::new();
    for p in seeds {
        let (Some(sa), Some(sb)) = (p.item_scores.get(&a), b(p)) else {
            continue;
        };
        let before = pairs.len();
        pairs.extend(sa.iter().filter_map(|(id, x)| sb.get(id).map(|y| (*x, *y))));
        if pairs.len() > before {
            used.push(p.seed);
        }
    }
    (pairs, used)
}

/// A number reported by the paper (spec §9).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// Task.
    pub task: String,
    /// Method.
    pub method: Method,
    /// Test accuracy in %.
    pub accuracy_pct: f64,
    /// Its std over seeds (None for one run).
    pub std_pct: Option<f64>,
    /// Test tokens per query in thousands.
    pub tokens_k: f64,
    /// Seeds.
    pub seeds: String,
}

/// The paper's reference numbers (spec §9.1, §9.2, §9.4), with much larger
/// API models (Qwen3-30B-A3B task model, gpt-oss-120b meta model).
pub fn paper_reference() -> Vec<Reference> {
    let r = |task: &str, method, acc, std, tok, seeds: &str| Reference {
        task: task.into(),
        method,
        accuracy_pct: acc,
        std_pct: std,
        tokens_k: tok,
        seeds: seeds.into(),
    };
    vec![
        r(
            "gsm8k",
            Method::Initial,
            59.20,
            Some(10.73),
            1.81,
            "7, 42, 47",
        ),
        r(
            "gsm8k",
            Method::Cantante,
            82.33,
            Some(4.35),
            1.74,
            "7, 42, 47",
        ),
        r(
            "gsm8k",
            Method::Identity,
            79.6,
            None,
            1.66,
            "42 (vs 84.0 CANTANTE)",
        ),
        r("mbpp", Method::Initial, 5.54, Some(1.62), 2.11, "7, 42, 47"),
        r(
            "mbpp",
            Method::Cantante,
            41.89,
            Some(7.56),
            1.99,
            "7, 42, 47",
        ),
    ]
}

/// The paper's credit correlations per agent (spec §9.5; seeds 7 / 42 / 47).
pub fn paper_credit_reference() -> Vec<(&'static str, &'static str, [f64; 3])> {
    vec![
        ("gsm8k", "executor_1", [0.03, 0.01, -0.08]),
        ("gsm8k", "executor_2", [0.13, 0.32, 0.41]),
        ("gsm8k", "executor_3", [0.55, 0.37, 0.22]),
        ("gsm8k", "consensus", [0.13, 0.26, 0.28]),
        ("mbpp", "planner", [0.10, 0.00, 0.09]),
        ("mbpp", "coder", [-0.09, 0.18, 0.14]),
        ("mbpp", "validator", [0.29, 0.33, 0.35]),
    ]
}

/// The results table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultsTable {
    /// Protocol name.
    pub protocol: String,
    /// The protocol's settings (test items per seed, rounds, tokens per turn,
    /// optimizer), as the run directory recorded them; `None` when unknown.
    #[serde(default)]
    pub settings: Option<Protocol>,
    /// Distinct machines the parts ran on (with the model each used).
    pub machines: Vec<Machine>,
    /// One row per (task, method), tasks in input order.
    pub rows: Vec<MethodRow>,
    /// Credit correlation per (task, agent).
    pub credit: Vec<CreditRow>,
    /// Per (task, seed, changed agent): the CANTANTE run's candidates
    /// against their incumbents, query by query.
    #[serde(default)]
    pub candidates: Vec<CandidateRow>,
    /// CANTANTE vs the initial prompts and vs the identity ablation, paired
    /// over (seed, test item).
    #[serde(default)]
    pub paired: Vec<PairedRow>,
    /// External baselines (DSPy) on the same test items.
    #[serde(default)]
    pub baselines: Vec<BaselineRow>,
    /// The paper's numbers.
    pub reference: Vec<Reference>,
    /// Remarks on the rows, e.g. test evaluations reused between methods.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// The note for a run its token budget stopped mid-round: `rounds` counts
/// finished rounds only, and the unfinished round's work is spent but not
/// recorded, so the table would otherwise read as if nothing ran. `None` for
/// runs that stopped otherwise.
fn budget_stop_note(task: &str, seed: u64, m: Method, s: &OptimizeResult) -> Option<String> {
    let StopReason::Budget {
        cap,
        batch,
        spent,
        projected,
        limit,
    } = &s.stop_reason
    else {
        return None;
    };
    let round = s.rounds_completed + 1;
    let what = if batch == "validate" && s.validations.is_empty() {
        "the budget stopped it before the initial prompts' validation, so no round ran".to_string()
    } else if batch == "validate" {
        format!(
            "round {round} ran its block, then the budget stopped it before validating \
             the configuration it moved to, which was therefore not adopted"
        )
    } else {
        format!("the budget stopped round {round} before its `{batch}` batch")
    };
    Some(format!(
        "{task} seed {seed}: {} run: {what} ({cap} tokens: {spent} spent, {projected} more \
         projected, cap {limit}). Its rounds column counts the {} finished round(s) only.",
        m.label(),
        s.rounds_completed
    ))
}

/// Build the results table from the loaded parts (pure).
pub fn build_table(protocol: &str, parts: &[SeedParts]) -> ResultsTable {
    let mut tasks: Vec<String> = Vec::new();
    for p in parts {
        if !tasks.contains(&p.task) {
            tasks.push(p.task.clone());
        }
    }
    let mut machines = BTreeSet::new();
    let mut rows = Vec::new();
    let mut credit = Vec::new();
    let mut candidates = Vec::new();
    let mut paired = Vec::new();
    let mut baselines = Vec::new();
    let mut notes = Vec::new();
    for task in &tasks {
        let seeds: Vec<&SeedParts> = parts.iter().filter(|p| &p.task == task).collect();
        for baseline in [Method::Initial, Method::Identity] {
            let (pairs, used) =
                pairs_of(&seeds, Method::Cantante, |p| p.item_scores.get(&baseline));
            if let Some(stat) = paired_stat(&pairs, used) {
                paired.push(PairedRow {
                    task: task.clone(),
                    method: Method::Cantante.label().into(),
                    baseline: baseline.label().into(),
                    stat,
                });
            }
        }
        let mut names: Vec<String> = Vec::new();
        for p in &seeds {
            for b in &p.baselines {
                if !names.contains(&b.label()) {
                    names.push(b.label());
                }
            }
        }
        for name in names {
            let of = |p: &SeedParts| p.baselines.iter().find(|b| b.label() == name).cloned();
            let recs: Vec<(u64, BaselineRecord)> = seeds
                .iter()
                .filter_map(|p| of(p).map(|b| (p.seed, b)))
                .collect();
            let stat = |f: &dyn Fn(&BaselineRecord) -> f64| {
                MeanStd::of(&recs.iter().map(|(_, b)| f(b)).collect::<Vec<_>>())
            };
            let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>() as f64;
            baselines.push(BaselineRow {
                task: task.clone(),
                name: name.clone(),
                seeds: recs.iter().map(|(s, _)| *s).collect(),
                accuracy: stat(&|b| b.accuracy),
                tokens_per_query: stat(&|b| {
                    sum(&b.test_tokens) / b.item_scores.len().max(1) as f64
                }),
                opt_tokens: stat(&|b| sum(&b.opt_tokens)),
                opt_wall_secs: stat(&|b| b.opt_wall_secs),
            });
            let (pairs, used) = pairs_of(&seeds, Method::Cantante, |p| {
                p.baselines
                    .iter()
                    .find(|b| b.label() == name)
                    .map(|b| &b.item_scores)
            });
            if let Some(stat) = paired_stat(&pairs, used) {
                paired.push(PairedRow {
                    task: task.clone(),
                    method: Method::Cantante.label().into(),
                    baseline: name.clone(),
                    stat,
                });
            }
        }
        for m in Method::ALL {
            let tests: Vec<(u64, &TestRecord)> = seeds
                .iter()
                .filter_map(|p| p.tests.get(&m).map(|t| (p.seed, t)))
                .collect();
            for (seed, t) in &tests {
                if let Some(from) = t.reused_from {
                    notes.push(format!(
                        "{task} seed {seed}: the {} result is the {} prompt set; its test \
                         evaluation is the {} one (identical rollouts, not re-run).",
                        m.label(),
                        from.label(),
                        from.label()
                    ));
                }
            }
            machines.extend(tests.iter().map(|(_, t)| t.machine.clone()));
            let runs: Vec<&OptPart> = seeds.iter().filter_map(|p| p.runs.get(&m)).collect();
            machines.extend(
                runs.iter()
                    .filter_map(|r| r.timing.as_ref().map(|t| t.machine.clone())),
            );
            for p in &seeds {
                if let Some(s) = p.runs.get(&m).and_then(|r| r.summary.as_ref()) {
                    notes.extend(budget_stop_note(task, p.seed, m, s));
                }
            }
            let finished: Vec<&OptimizeResult> =
                runs.iter().filter_map(|r| r.summary.as_ref()).collect();
            let col = |f: &dyn Fn(&OptimizeResult) -> f64| {
                MeanStd::of(&finished.iter().map(|s| f(s)).collect::<Vec<_>>())
            };
            rows.push(MethodRow {
                task: task.clone(),
                method: m,
                seeds: tests.iter().map(|(s, _)| *s).collect(),
                per_seed_accuracy: tests
                    .iter()
                    .map(|(s, t)| (*s, t.summary.accuracy))
                    .collect(),
                accuracy: MeanStd::of(
                    &tests
                        .iter()
                        .map(|(_, t)| t.summary.accuracy)
                        .collect::<Vec<_>>(),
                ),
                tokens_per_query: MeanStd::of(
                    &tests
                        .iter()
                        .map(|(_, t)| t.summary.mean_input_tokens + t.summary.mean_output_tokens)
                        .collect::<Vec<_>>(),
                ),
                truncation: {
                    let mut by_agent: BTreeMap<String, Vec<f64>> = BTreeMap::new();
                    for (_, t) in &tests {
                        for (a, &v) in &t.summary.truncation_rate {
                            by_agent.entry(a.clone()).or_default().push(v);
                        }
                    }
                    by_agent
                        .into_iter()
                        .filter_map(|(a, v)| MeanStd::of(&v).map(|m| (a, m)))
                        .collect()
                },
                opt_task_tokens: col(&|s| s.tokens.task() as f64),
                opt_meta_tokens: col(&|s| s.tokens.meta() as f64),
                meta_share: col(&|s| {
                    let t = s.tokens.total();
                    if t == 0 {
                        f64::NAN
                    } else {
                        s.tokens.meta() as f64 / t as f64
                    }
                }),
                opt_wall_secs: MeanStd::of(
                    &runs
                        .iter()
                        .filter(|r| r.summary.is_some())
                        .filter_map(|r| r.timing.as_ref().map(|t| t.wall_secs))
                        .collect::<Vec<_>>(),
                ),
                test_wall_secs: MeanStd::of(
                    &tests
                        .iter()
                        .map(|(_, t)| t.summary.wall_secs)
                        .collect::<Vec<_>>(),
                ),
                rounds: col(&|s| s.rounds_completed as f64),
            });
        }
        type PerSeed = BTreeMap<u64, (Option<f64>, usize)>;
        let mut per_agent: BTreeMap<String, (PerSeed, PerSeed)> = BTreeMap::new();
        for p in &seeds {
            let Some(run) = p.runs.get(&Method::Cantante) else {
                continue;
            };
            if run.rounds.is_empty() {
                continue;
            }
            let groups: usize = run.rounds.iter().map(|r| r.attribution_groups).sum();
            let degenerate: usize = run.rounds.iter().map(|r| r.degenerate_groups).sum();
            if degenerate > 0 {
                notes.push(format!(
                    "{task} seed {}: {degenerate} of {groups} CANTANTE attribution groups \
                     were degenerate (every agent credited the same while the scores \
                     differed) and were scored with identity credits.",
                    p.seed
                ));
            }
            for (agent, v) in credit_correlation(&run.rounds) {
                per_agent.entry(agent).or_default().0.insert(p.seed, v);
            }
            for (agent, v) in counterfactual_correlation(&run.rounds) {
                per_agent.entry(agent).or_default().1.insert(p.seed, v);
            }
            for (changed, outcomes) in candidate_outcomes(&run.rounds) {
                candidates.push(CandidateRow {
                    task: task.clone(),
                    seed: p.seed,
                    changed,
                    outcomes,
                });
            }
        }
        for (agent, (per_seed, cf)) in per_agent {
            let rhos: Vec<f64> = per_seed.values().filter_map(|(r, _)| *r).collect();
            let cf_rhos: Vec<f64> = cf.values().filter_map(|(r, _)| *r).collect();
            credit.push(CreditRow {
                task: task.clone(),
                agent,
                rho: MeanStd::of(&rhos),
                per_seed,
                counterfactual_rho: MeanStd::of(&cf_rhos),
                counterfactual_per_seed: cf,
            });
        }
    }
    ResultsTable {
        protocol: protocol.into(),
        settings: None,
        machines: machines.into_iter().collect(),
        rows,
        credit,
        candidates,
        paired,
        baselines,
        reference: paper_reference()
            .into_iter()
            .filter(|r| tasks.is_empty() || tasks.contains(&r.task))
            .collect(),
        notes,
    }
}

fn opt(v: &Option<MeanStd>, scale: f64, digits: usize) -> String {
    v.as_ref()
        .map(|m| m.fmt(scale, digits))
        .unwrap_or_else(|| "–".into())
}

/// Render the table as Markdown (`results.md`).
pub fn render_markdown(t: &ResultsTable) -> String {
    let mut s = String::new();
    s.push_str("# cantante bench-run results\n\n");
    s.push_str(&format!("Protocol: `{}`.\n\n", t.protocol));
    if let Some(p) = &t.settings {
        let o = &p.optimizer;
        s.push_str(&format!(
            "Settings: {} test items per seed, dev {}, validation {}; rounds: {} ({} design, \
             {} attributer, blocks of {}{}); {} new tokens per turn, tag guard {}, \
             tools declared in the system message: {}, {} format-repair turns; \
             temperature {}.\n\n",
            p.test_size,
            p.dev_size,
            p.val_size,
            o.rounds,
            format!("{:?}", o.design).to_lowercase(),
            format!("{:?}", o.attributer).to_lowercase(),
            o.block_size,
            [
                (o.edit_deletions > 0).then(|| format!(
                    ", {} sentence-deletion offspring per step",
                    o.edit_deletions
                )),
                (o.edit_shots > 0).then(|| format!(
                    ", {} few-shot offspring per step (up to {} examples)",
                    o.edit_shots, o.max_shots
                )),
                o.sticky_incumbent
                    .then(|| ", sticky incumbent (moves only on a clear win)".to_string()),
                o.validation_alpha.map(|a| format!(
                    ", validation gate: a sign test p < {a} against the best before"
                )),
            ]
            .into_iter()
            .flatten()
            .collect::<String>(),
            p.max_new_tokens,
            if p.tag_guard { "on" } else { "off" },
            if p.declare_tools { "yes" } else { "no" },
            p.format_repairs,
            p.temperature,
        ));
    }
    if t.machines.is_empty() {
        s.push_str("Machine: no finished part yet.\n\n");
    } else {
        s.push_str("Machine(s):\n\n");
        for m in &t.machines {
            s.push_str(&format!("- {}\n", m.describe()));
        }
        s.push('\n');
    }
    s.push_str(
        "Mean ± std (ddof = 1) over the seeds listed; `–` = not available (std: one seed). \
         Accuracy and tokens per query on the held-out test sample of each seed; \
         optimization tokens, wall time and rounds over finished runs.\n\n",
    );
    s.push_str("| task | method | n seeds | seeds | test acc (%) | tokens / test query | opt tokens task | opt tokens meta | meta share (%) | opt wall (s) | test wall (s) | rounds |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in &t.rows {
        let seeds = r
            .seeds
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.task,
            r.method.label(),
            r.seeds.len(),
            if seeds.is_empty() {
                "–".into()
            } else {
                seeds
            },
            opt(&r.accuracy, 100.0, 2),
            opt(&r.tokens_per_query, 1.0, 0),
            opt(&r.opt_task_tokens, 1.0, 0),
            opt(&r.opt_meta_tokens, 1.0, 0),
            opt(&r.meta_share, 100.0, 1),
            opt(&r.opt_wall_secs, 1.0, 0),
            opt(&r.test_wall_secs, 1.0, 0),
            opt(&r.rounds, 1.0, 1),
        ));
    }
    if !t.notes.is_empty() {
        s.push('\n');
        for n in &t.notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    if t.rows.iter().any(|r| !r.truncation.is_empty()) {
        s.push_str(
            "\n### Replies cut off at the token limit\n\nPer agent, the share (%) of its replies in \
             the test evaluations that stopped at the protocol's new-token limit (mean over the \
             seeds): how much room the limit leaves for complete answers.\n\n\
             | task | method | replies cut off (%) |\n|---|---|---|\n",
        );
        for r in t.rows.iter().filter(|r| !r.truncation.is_empty()) {
            let cells: Vec<String> = r
                .truncation
                .iter()
                .map(|(a, m)| match m.std {
                    Some(_) => format!("{a} {}", m.fmt(100.0, 0)),
                    None => format!("{a} {:.0}", 100.0 * m.mean),
                })
                .collect();
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                r.task,
                r.method.label(),
                cells.join(", ")
            ));
        }
    }
    s.push_str("\n## External baselines on the same test items\n\n");
    if t.baselines.is_empty() {
        s.push_str(
            "None yet: `benches/dspy/baseline.py --out DIR/<task>/seed<S>/dspy_<optimizer>.json` \
             (DSPy MIPROv2 / GEPA through `cantante serve` with the same model) adds them.\n",
        );
    } else {
        s.push_str("| task | baseline | n seeds | seeds | test acc (%) | tokens / test query | opt tokens | opt wall (s) |\n|---|---|---|---|---|---|---|---|\n");
        for b in &t.baselines {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                b.task,
                b.name,
                b.seeds.len(),
                b.seeds
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                opt(&b.accuracy, 100.0, 2),
                opt(&b.tokens_per_query, 1.0, 0),
                opt(&b.opt_tokens, 1.0, 0),
                opt(&b.opt_wall_secs, 1.0, 0),
            ));
        }
    }
    s.push_str("\n## Paired comparison over (seed, test item)\n\n");
    if t.paired.is_empty() {
        s.push_str("No method pair has per-item test results yet.\n");
    } else {
        s.push_str(&format!(
            "Both methods on the same test items of the same seeds. Difference in accuracy \
             points with a 95% paired-bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples of the \
             items, fixed seed); McNemar's exact test on the items only one of the two solved. \
             An interval that excludes 0 is a difference this sample can show.\n\n"
        ));
        s.push_str("| task | comparison | pairs | seeds | difference (points) | 95% CI | solved only by the first / only by the second | McNemar p |\n|---|---|---|---|---|---|---|---|\n");
        for r in &t.paired {
            let st = &r.stat;
            s.push_str(&format!(
                "| {} | {} vs {} | {} | {} | {:+.1} | [{:+.1}, {:+.1}] | {} / {} | {:.3} |\n",
                r.task,
                r.method,
                r.baseline,
                st.n,
                st.seeds
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                st.mean_diff * 100.0,
                st.ci95.0 * 100.0,
                st.ci95.1 * 100.0,
                st.only_a,
                st.only_b,
                st.mcnemar_p
            ));
        }
    }
    s.push_str("\n## Credit check (spec §9.5)\n\n");
    s.push_str(
        "Spearman ρ between an agent's mean credit in an evaluated joint configuration and \
         that configuration's block score, over the CANTANTE run's rounds.jsonl. Moderate, \
         agent-specific values mean credits are not an echo of the system score; they do not \
         show that credits are correct. `–` = undefined: the agent's credits or the block \
         scores were constant across configurations (e.g. an attributer that gives every \
         agent 0). The counterfactual ρ compares an agent's credit with the measured gain \
         of configurations that changed only that agent (the `ofat` design's; none in the \
         joint design).\n\n",
    );
    if t.credit.is_empty() {
        s.push_str("No CANTANTE rounds yet.\n");
    } else {
        s.push_str(
            "| task | agent | ρ mean ± std | per seed: ρ (configurations) | counterfactual ρ mean ± std | per seed |\n|---|---|---|---|---|---|\n",
        );
        let per = |m: &BTreeMap<u64, (Option<f64>, usize)>| {
            m.iter()
                .map(|(seed, (r, n))| {
                    let r = r.map(|r| format!("{r:+.2}")).unwrap_or_else(|| "–".into());
                    format!("seed {seed}: {r} ({n})")
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        for c in &t.credit {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                c.task,
                c.agent,
                opt(&c.rho, 1.0, 2),
                per(&c.per_seed),
                opt(&c.counterfactual_rho, 1.0, 2),
                per(&c.counterfactual_per_seed)
            ));
        }
    }
    if !t.candidates.is_empty() {
        s.push_str("\n## Candidates against the incumbent\n\n");
        s.push_str(
            "Per CANTANTE run, block queries on which a candidate configuration scored above \
             (won), below (lost) or the same as (tied) its round's incumbent, keyed by the agent \
             the candidate changed. A prompt can only be adopted for a win; with none, no \
             selection rule had a better prompt to find.\n\n\
             | task | seed | changed | configurations | won | lost | tied |\n|---|---|---|---|---|---|---|\n",
        );
        for c in &t.candidates {
            let o = c.outcomes;
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                c.task, c.seed, c.changed, o.configs, o.won, o.lost, o.tied
            ));
        }
    }
    s.push_str("\n## Paper reference (spec §9)\n\n");
    s.push_str(
        "Reference implementation with API models (task: Qwen3-30B-A3B, meta/attribution: \
         gpt-oss-120b), 300 dev and 500 test items per seed, 10M-token budget. Not directly \
         comparable with small local models.\n\n",
    );
    s.push_str("| task | method | test acc (%) | tokens / test query (k) | seeds |\n|---|---|---|---|---|\n");
    for r in &t.reference {
        let std = r.std_pct.map(|x| format!(" ± {x:.2}")).unwrap_or_default();
        s.push_str(&format!(
            "| {} | {} | {:.2}{} | {:.2} | {} |\n",
            r.task,
            r.method.label(),
            r.accuracy_pct,
            std,
            r.tokens_k,
            r.seeds
        ));
    }
    let tasks: BTreeSet<&str> = t.reference.iter().map(|r| r.task.as_str()).collect();
    let refs: Vec<_> = paper_credit_reference()
        .into_iter()
        .filter(|(task, _, _)| tasks.contains(task))
        .collect();
    if !refs.is_empty() {
        s.push_str("\nPaper credit correlations (ρ, seeds 7 / 42 / 47):\n\n");
        for (task, agent, v) in refs {
            s.push_str(&format!(
                "- {task} {agent}: {:+.2} / {:+.2} / {:+.2}\n",
                v[0], v[1], v[2]
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimize::TokenCounters;

    fn machine() -> Machine {
        Machine {
            cpu: "Test CPU".into(),
            cores: 2,
            ram_gib: 24,
            device: "cpu".into(),
            model: "tiny".into(),
        }
    }

    fn test_rec(method: Method, seed: u64, acc: f64, tokens: f64) -> TestRecord {
        TestRecord {
            method,
            task: "gsm8k".into(),
            seed,
            config_id: "x".into(),
            prompts: PromptSet::new(),
            summary: EvalSummary {
                n: 10,
                accuracy: acc,
                mean_input_tokens: tokens - 100.0,
                mean_output_tokens: 100.0,
                format_failure_rate: BTreeMap::new(),
                format_repair_rate: BTreeMap::new(),
                truncation_rate: BTreeMap::new(),
                tags: BTreeMap::new(),
                run_errors: 0,
                wall_secs: 5.0,
                engine: None,
            },
            machine: machine(),
            reused_from: None,
        }
    }

    fn summary(task_tokens: u64, meta: u64, rounds: usize) -> OptimizeResult {
        OptimizeResult {
            best_prompts: PromptSet::new(),
            best_score: 0.5,
            best_round: 1,
            initial_score: 0.2,
            rounds_completed: rounds,
            stop_reason: StopReason::Completed,
            tokens: TokenCounters {
                task_input: task_tokens,
                attribution_input: meta,
                ..Default::default()
            },
            validations: vec![],
            rejections: BTreeMap::new(),
            agent_credits: BTreeMap::new(),
            populations: BTreeMap::new(),
            design: Default::default(),
            attribution_groups: 0,
            degenerate_groups: 0,
        }
    }

    fn record(block_scores: Vec<f64>, credits_a: Vec<f64>, credits_b: Vec<f64>) -> RoundRecord {
        let n = block_scores.len();
        let mut credits: BTreeMap<String, Vec<Vec<Option<f64>>>> = BTreeMap::new();
        credits.insert(
            "a".to_string(),
            credits_a.into_iter().map(|c| vec![Some(c)]).collect(),
        );
        credits.insert(
            "b".to_string(),
            credits_b.into_iter().map(|c| vec![Some(c)]).collect(),
        );
        let j = serde_json::json!({
            "round": 1, "configs": vec![PromptSet::new(); n], "config_hashes": vec!["h"; n],
            "block": [0], "scores": block_scores.iter().map(|s| vec![*s]).collect::<Vec<_>>(),
            "block_scores": block_scores, "credits": credits, "attribution_failures": 0,
            "rejections": {}, "task_tokens": 0, "meta_tokens": 0, "tokens": TokenCounters::default(),
            "incumbent": {}, "validation_score": 0.0,
        });
        serde_json::from_value(j).expect("a RoundRecord")
    }

    #[test]
    fn mean_std_uses_ddof_1_and_dash_for_one_value() {
        let m = MeanStd::of(&[0.6, 0.7, 0.8]).unwrap();
        assert!((m.mean - 0.7).abs() < 1e-12);
        assert!((m.std.unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(m.fmt(100.0, 2), "70.00 ± 10.00");
        let one = MeanStd::of(&[0.5]).unwrap();
        assert_eq!(one.std, None);
        assert_eq!(one.fmt(100.0, 1), "50.0 ± –");
        assert_eq!(MeanStd::of(&[]), None);
        assert_eq!(MeanStd::of(&[f64::NAN, 1.0]).unwrap().n, 1);
    }

    #[test]
    fn mcnemar_and_paired_bootstrap_match_hand_computed_values() {
        // b = 10, c = 2: p = 2·(C(12,0) + C(12,1) + C(12,2)) / 2^12 = 158 / 4096.
        assert!((mcnemar_exact(10, 2) - 158.0 / 4096.0).abs() < 1e-12);
        assert!((mcnemar_exact(2, 10) - 158.0 / 4096.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(3, 3), 1.0);
        // Large counts stay finite and tiny.
        let p = mcnemar_exact(400, 100);
        assert!(p > 0.0 && p < 1e-30, "{p}");
        // 50 items: the method solves 12 the baseline misses, the baseline 2.
        let mut pairs = vec![(1.0, 0.0); 12];
        pairs.extend(vec![(0.0, 1.0); 2]);
        pairs.extend(vec![(1.0, 1.0); 20]);
        pairs.extend(vec![(0.0, 0.0); 16]);
        let st = paired_stat(&pairs, vec![7]).unwrap();
        assert_eq!((st.n, st.only_a, st.only_b), (50, 12, 2));
        assert!((st.mean_diff - 0.2).abs() < 1e-12);
        assert!(
            st.ci95.0 > 0.0 && st.ci95.0 < 0.2 && st.ci95.1 > 0.2,
            "{:?}",
            st.ci95
        );
        assert!((st.mcnemar_p - mcnemar_exact(12, 2)).abs() < 1e-15);
        // Reproducible (fixed bootstrap seed); no difference → interval around 0.
        assert_eq!(paired_stat(&pairs, vec![7]).unwrap(), st);
        let same = paired_stat(&[(1.0, 1.0), (0.0, 0.0)], vec![1]).unwrap();
        assert_eq!(
            (same.mean_diff, same.ci95, same.mcnemar_p),
            (0.0, (0.0, 0.0), 1.0)
        );
        assert_eq!(paired_stat(&[], vec![]), None);
    }

    #[test]
    fn paired_rows_use_the_items_both_methods_evaluated() {
        let dir = tempfile::tempdir().unwrap();
        let traces = dir.path().join("cantante_test_traces.jsonl");
        std::fs::write(
            &traces,
            "{\"example_id\": \"a\", \"score\": 1.0}\n{\"example_id\": 7, \"score\": 0.0}\n\n{\"example_id\": \"a\", \"score\": 0.0}\n",
        )
        .unwrap();
        let got = load_item_scores(&traces).unwrap().unwrap();
        assert_eq!(got, BTreeMap::from([("a".into(), 0.5), ("7".into(), 0.0)]));
        std::fs::write(&traces, "{\"score\": 1.0}\n").unwrap();
        assert!(load_item_scores(&traces)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        assert_eq!(
            load_item_scores(&dir.path().join("none.jsonl")).unwrap(),
            None
        );
        let scores = |v: &[(&str, f64)]| v.iter().map(|(k, s)| (k.to_string(), *s)).collect();
        let mut s7 = SeedParts {
            task: "gsm8k".into(),
            seed: 7,
            ..Default::default()
        };
        s7.item_scores.insert(
            Method::Initial,
            scores(&[("q1", 0.0), ("q2", 1.0), ("q3", 0.0)]),
        );
        s7.item_scores.insert(
            Method::Cantante,
            scores(&[("q1", 1.0), ("q2", 1.0), ("q4", 1.0)]),
        );
        let mut s42 = s7.clone();
        s42.seed = 42;
        s42.item_scores.remove(&Method::Initial);
        let t = build_table("cpu-small", &[s7, s42]);
        assert_eq!(t.paired.len(), 1, "no identity scores: one comparison");
        let r = &t.paired[0];
        assert_eq!(
            (r.baseline.as_str(), r.stat.n, r.stat.seeds.clone()),
            ("Initial", 2, vec![7])
        );
        assert_eq!((r.stat.only_a, r.stat.only_b), (1, 0));
        let md = render_markdown(&t);
        assert!(md.contains("CANTANTE vs Initial | 2 | 7 | +50.0"), "{md}");
        // A DSPy result in the seed directory: its own row and a paired row.
        let seed_dir = seed_dir(dir.path(), "gsm8k", 7);
        std::fs::create_dir_all(&seed_dir).unwrap();
        std::fs::write(
            seed_dir.join("dspy_mipro.json"),
            r#"{"optimizer": "mipro", "dspy_version": "3.4.1", "accuracy": 0.5,
                "item_scores": {"q1": 0.0, "q2": 1.0, "q9": 1.0},
                "opt_tokens": {"input": 900, "output": 100},
                "test_tokens": {"input": 200, "output": 100}, "opt_wall_secs": 12.0}"#,
        )
        .unwrap();
        std::fs::write(seed_dir.join("dspy_gepa.json"), "{broken").unwrap();
        let (mut loaded, errors) = load_seed(dir.path(), "gsm8k", 7);
        assert_eq!(errors.len(), 1, "the broken file is reported: {errors:?}");
        assert_eq!(loaded.baselines.len(), 1);
        loaded.item_scores.insert(
            Method::Cantante,
            scores(&[("q1", 1.0), ("q2", 1.0), ("q4", 1.0)]),
        );
        let t = build_table("cpu-small", &[loaded]);
        assert_eq!(t.baselines.len(), 1);
        let b = &t.baselines[0];
        assert_eq!(
            (b.name.as_str(), b.seeds.clone()),
            ("DSPy MIPROv2", vec![7])
        );
        assert_eq!(b.opt_tokens.unwrap().mean, 1000.0);
        assert_eq!(b.tokens_per_query.unwrap().mean, 100.0);
        let r = t
            .paired
            .iter()
            .find(|r| r.baseline == "DSPy MIPROv2")
            .unwrap();
        assert_eq!((r.stat.n, r.stat.only_a, r.stat.only_b), (2, 1, 0));
        let md = render_markdown(&t);
        assert!(
            md.contains("| gsm8k | DSPy MIPROv2 | 1 | 7 | 50.00 ± –"),
            "{md}"
        );
        // The same optimizer with a meta model for its proposals: a row of its own.
        std::fs::write(
            seed_dir.join("dspy_mipro_meta.json"),
            r#"{"optimizer": "mipro", "meta_model": "big", "accuracy": 1.0,
                "item_scores": {"q1": 1.0, "q2": 1.0}}"#,
        )
        .unwrap();
        let (loaded, _) = load_seed(dir.path(), "gsm8k", 7);
        let t = build_table("cpu-small", &[loaded]);
        let names: Vec<&str> = t.baselines.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["DSPy MIPROv2", "DSPy MIPROv2 (meta model big)"]);
    }

    #[test]
    fn item_scores_survive_without_the_traces() {
        let dir = tempfile::tempdir().unwrap();
        let traces = dir.path().join(Method::Initial.traces_file());
        std::fs::write(
            &traces,
            "{\"example_id\": \"q1\", \"score\": 1.0}\n{\"example_id\": 2, \"score\": 0.0}\n",
        )
        .unwrap();
        assert!(write_item_scores(dir.path(), Method::Initial).unwrap());
        let from_traces = load_method_scores(dir.path(), Method::Initial).unwrap();
        std::fs::remove_file(&traces).unwrap();
        let kept = load_method_scores(dir.path(), Method::Initial).unwrap();
        assert_eq!(kept, from_traces);
        assert_eq!(
            kept.unwrap(),
            BTreeMap::from([("q1".into(), 1.0), ("2".into(), 0.0)])
        );
        // No traces: nothing written, nothing loaded.
        assert!(!write_item_scores(dir.path(), Method::Cantante).unwrap());
        assert!(!dir.path().join(Method::Cantante.scores_file()).exists());
        assert_eq!(
            load_method_scores(dir.path(), Method::Cantante).unwrap(),
            None
        );
        // A broken scores file is reported with its path, not skipped.
        std::fs::write(dir.path().join(Method::Identity.scores_file()), "[1").unwrap();
        let e = load_method_scores(dir.path(), Method::Identity).unwrap_err();
        assert!(e.to_string().contains("identity_test_scores.json"), "{e}");
    }

    #[test]
    fn partial_runs_give_a_table_with_seed_counts() {
        // Seed 7: everything finished; seed 42: only the initial evaluation.
        let mut s7 = SeedParts {
            task: "gsm8k".into(),
            seed: 7,
            ..Default::default()
        };
        s7.tests
            .insert(Method::Initial, test_rec(Method::Initial, 7, 0.5, 1000.0));
        s7.tests
            .insert(Method::Cantante, test_rec(Method::Cantante, 7, 0.8, 900.0));
        s7.tests
            .insert(Method::Identity, test_rec(Method::Identity, 7, 0.6, 950.0));
        s7.runs.insert(
            Method::Cantante,
            OptPart {
                summary: Some(summary(3000, 1000, 2)),
                rounds: vec![],
                timing: Some(Timing {
                    wall_secs: 60.0,
                    machine: machine(),
                }),
            },
        );
        // An unfinished identity run: no summary, so no token/round columns.
        s7.runs.insert(
            Method::Identity,
            OptPart {
                summary: None,
                rounds: vec![],
                timing: None,
            },
        );
        let mut s42 = SeedParts {
            task: "gsm8k".into(),
            seed: 42,
            ..Default::default()
        };
        s42.tests
            .insert(Method::Initial, test_rec(Method::Initial, 42, 0.7, 1200.0));
        let t = build_table("cpu-small", &[s7, s42]);
        assert_eq!(t.rows.len(), 3);
        let init = &t.rows[0];
        assert_eq!(init.method, Method::Initial);
        assert_eq!(init.seeds, vec![7, 42]);
        let acc = init.accuracy.unwrap();
        assert!((acc.mean - 0.6).abs() < 1e-12);
        assert!((acc.std.unwrap() - (0.02f64).sqrt()).abs() < 1e-12);
        assert!((init.tokens_per_query.unwrap().mean - 1100.0).abs() < 1e-9);
        assert_eq!(init.opt_task_tokens, None);
        let c = &t.rows[1];
        assert_eq!(c.seeds, vec![7]);
        assert_eq!(c.accuracy.unwrap().std, None);
        assert_eq!(c.opt_task_tokens.unwrap().mean, 3000.0);
        assert_eq!(c.opt_meta_tokens.unwrap().mean, 1000.0);
        assert!((c.meta_share.unwrap().mean - 0.25).abs() < 1e-12);
        assert_eq!(c.opt_wall_secs.unwrap().mean, 60.0);
        assert_eq!(c.rounds.unwrap().mean, 2.0);
        let id = &t.rows[2];
        assert_eq!(id.seeds, vec![7]);
        assert_eq!(id.rounds, None);
        assert_eq!(t.machines, vec![machine()]);
        let md = render_markdown(&t);
        assert!(
            md.contains("| gsm8k | Initial | 2 | 7, 42 | 60.00 ± 14.14 |"),
            "{md}"
        );
        assert!(
            md.contains("| gsm8k | CANTANTE | 1 | 7 | 80.00 ± – |"),
            "{md}"
        );
        assert!(md.contains("Identity attribution (equal budget)"), "{md}");
        assert!(
            md.contains("Test CPU (2 cores, 24 GiB RAM, cpu), model tiny"),
            "{md}"
        );
        assert!(md.contains("82.33 ± 4.35"), "{md}");
        // MBPP reference rows are left out of a GSM8K-only table.
        assert!(!md.contains("41.89"), "{md}");
    }

    #[test]
    fn truncation_rates_are_averaged_per_agent_and_listed() {
        let part = |seed: u64, cut: &[(&str, f64)]| {
            let mut rec = test_rec(Method::Initial, seed, 0.5, 1000.0);
            rec.summary.truncation_rate = cut.iter().map(|(a, v)| (a.to_string(), *v)).collect();
            let mut p = SeedParts {
                task: "gsm8k".into(),
                seed,
                ..Default::default()
            };
            p.tests.insert(Method::Initial, rec);
            p
        };
        let t = build_table(
            "cpu-small",
            &[
                part(7, &[("executor_1", 0.1), ("consensus", 0.0)]),
                part(42, &[("executor_1", 0.3), ("consensus", 0.0)]),
            ],
        );
        let row = &t.rows[0];
        assert!((row.truncation["executor_1"].mean - 0.2).abs() < 1e-12);
        assert_eq!(row.truncation["consensus"].mean, 0.0);
        let md = render_markdown(&t);
        assert!(
            md.contains("### Replies cut off at the token limit"),
            "{md}"
        );
        assert!(
            md.contains("| gsm8k | Initial | consensus 0 ± 0, executor_1 20 ± 14 |"),
            "{md}"
        );
        // Rows without rates (older run directories) add no section.
        let bare = build_table("cpu-small", &[part(7, &[])]);
        assert!(!render_markdown(&bare).contains("cut off at the token limit"));
    }

    #[test]
    fn settings_line_names_the_selection_rules() {
        let mut t = build_table("cpu-gate", &[]);
        let (_, gate) = Protocol::resolve("configs/protocols/cpu-gate.yaml").unwrap();
        t.settings = Some(gate);
        let md = render_markdown(&t);
        assert!(
            md.contains("blocks of 4, sticky incumbent (moves only on a clear win), validation gate: a sign test p < 0.1 against the best before)"),
            "{md}"
        );
        let (_, val) = Protocol::resolve("configs/protocols/cpu-val.yaml").unwrap();
        t.settings = Some(val);
        let md = render_markdown(&t);
        assert!(md.contains("blocks of 4); 512 new tokens"), "{md}");
    }

    #[test]
    fn empty_input_gives_an_empty_table() {
        let t = build_table("paper", &[]);
        assert!(t.rows.is_empty() && t.credit.is_empty());
        let md = render_markdown(&t);
        assert!(md.contains("no finished part yet"));
    }

    /// A GSM8K seed whose only part is an unfinished CANTANTE run with `rounds`.
    fn cantante_rounds(seed: u64, rounds: Vec<RoundRecord>) -> SeedParts {
        let mut p = SeedParts {
            task: "gsm8k".into(),
            seed,
            ..Default::default()
        };
        p.runs.insert(
            Method::Cantante,
            OptPart {
                summary: None,
                rounds,
                timing: None,
            },
        );
        p
    }

    #[test]
    fn credit_columns_from_rounds() {
        // Agent a's credit rises with the block score (ρ = 1), b's falls (ρ = -1).
        let rec = record(
            vec![0.1, 0.5, 0.9],
            vec![0.0, 0.4, 1.0],
            vec![1.0, 0.5, 0.2],
        );
        let mk = |seed| cantante_rounds(seed, vec![rec.clone()]);
        let t = build_table("x", &[mk(7), mk(42)]);
        assert_eq!(t.credit.len(), 2);
        let a = &t.credit[0];
        assert_eq!(a.agent, "a");
        assert_eq!(a.per_seed[&7], (Some(1.0), 3));
        let rho = a.rho.unwrap();
        assert_eq!((rho.mean, rho.std, rho.n), (1.0, Some(0.0), 2));
        assert_eq!(t.credit[1].rho.unwrap().mean, -1.0);
        let md = render_markdown(&t);
        assert!(
            md.contains("| gsm8k | a | 1.00 ± 0.00 | seed 7: +1.00 (3); seed 42: +1.00 (3) |"),
            "{md}"
        );
    }

    #[test]
    fn candidate_rows_from_rounds() {
        let mut rec = record(vec![0.5, 1.0, 0.0], vec![0.0; 3], vec![0.0; 3]);
        rec.changed = vec![vec![], vec!["a".into()], vec!["a".into(), "b".into()]];
        let t = build_table("x", &[cantante_rounds(7, vec![rec.clone(), rec])]);
        let won = Outcomes {
            configs: 2,
            won: 2,
            lost: 0,
            tied: 0,
        };
        let lost = Outcomes {
            won: 0,
            lost: 2,
            ..won
        };
        let got: Vec<(&str, u64, Outcomes)> = t
            .candidates
            .iter()
            .map(|c| (c.changed.as_str(), c.seed, c.outcomes))
            .collect();
        assert_eq!(
            got,
            vec![
                (crate::optimize::analysis::SEVERAL_AGENTS, 7, lost),
                ("a", 7, won)
            ]
        );
        let md = render_markdown(&t);
        assert!(md.contains("| gsm8k | 7 | a | 2 | 2 | 0 | 0 |"), "{md}");
        // Old results.json files (without the field) still load.
        let mut j = serde_json::to_value(&t).unwrap();
        j.as_object_mut().unwrap().remove("candidates");
        let old: ResultsTable = serde_json::from_value(j).unwrap();
        assert!(old.candidates.is_empty());
    }

    #[test]
    fn both_protocol_files_parse_and_cpu_small_is_smaller() {
        let (_, paper) = Protocol::resolve("paper").unwrap();
        let (name, small) = Protocol::resolve("cpu-small").unwrap();
        assert_eq!(name, "cpu-small");
        // paper = the reference's settings (spec §5).
        assert_eq!(
            (paper.dev_size, paper.test_size, paper.max_new_tokens),
            (300, 500, 512)
        );
        let o = &paper.optimizer;
        assert_eq!(
            (
                o.block_size,
                o.group_size,
                o.crossovers_per_round,
                o.max_blocks
            ),
            (10, 3, 3, 5)
        );
        assert_eq!((o.alpha, o.length_penalty), (0.2, 0.05));
        assert_eq!(o.max_total_tokens, Some(10_000_000));
        assert_eq!(o.population, None);
        assert_eq!(paper.max_new_tokens("mbpp"), 1024);
        assert_eq!(paper.optimizer_config("mbpp", 7).attribution_field_cap, 512);
        assert_eq!(
            paper.optimizer_config("gsm8k", 7).attribution_field_cap,
            128
        );
        // cpu-small: the differences its header lists.
        assert_eq!(
            (small.dev_size, small.val_size, small.test_size),
            (30, 4, 20)
        );
        assert_eq!((small.format_repairs, paper.format_repairs), (1, 0));
        assert_eq!(small.max_new_tokens("gsm8k"), 128);
        assert_eq!(small.max_new_tokens("mbpp"), 256);
        let s = &small.optimizer;
        assert_eq!(
            (s.rounds, s.block_size, s.crossovers_per_round, s.max_blocks),
            (1, 3, 1, 2)
        );
        assert_eq!(
            (s.meta_max_new_tokens, s.attribution_max_new_tokens),
            (256, 256)
        );
        // ... and the same where it says so.
        assert_eq!(
            (s.group_size, s.alpha, s.length_penalty),
            (o.group_size, o.alpha, o.length_penalty)
        );
        assert_eq!(small.temperature, paper.temperature);
        for field in [
            "dev_size 30",
            "val_size 4",
            "test_size 20",
            "format_repairs 1",
            "optimizer.rounds 1",
            "optimizer.block_size 3",
            "optimizer.crossovers_per_round 1",
            "max_new_tokens 128",
        ] {
            assert!(
                CPU_SMALL_YAML.contains(field),
                "cpu-small.yaml header lacks `{field}`"
            );
        }
    }

    #[test]
    fn protocol_configs_set_seed_and_identity_budget() {
        let (_, p) = Protocol::resolve("cpu-small").unwrap();
        let c = p.optimizer_config("gsm8k", 47);
        assert_eq!(c.seed, 47);
        assert!(!c.identity_attribution);
        assert_eq!(c.task_max_new_tokens_estimate, 128);
        let i = p.identity_config("gsm8k", 47, 12345);
        assert!(i.identity_attribution);
        assert_eq!(i.max_total_tokens, Some(12345));
        assert_eq!(i.rounds, 2);
        // Everything else equals the CANTANTE configuration.
        let mut same = i.clone();
        same.identity_attribution = false;
        same.max_total_tokens = c.max_total_tokens;
        same.rounds = c.rounds;
        assert_eq!(same, c);
    }

    #[test]
    fn every_protocol_file_parses_and_each_evidence_protocol_changes_one_setting() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/protocols");
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let (name, p) = Protocol::resolve(path.to_str().unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            files.insert(name, p);
        }
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            [
                "cpu-1.5b",
                "cpu-blocks",
                "cpu-edits",
                "cpu-edits-greedy",
                "cpu-evidence",
                "cpu-gate",
                "cpu-gate-val80",
                "cpu-small",
                "cpu-val",
                "paper"
            ]
        );
        let (first, evidence) = (&files["cpu-1.5b"], &files["cpu-evidence"]);
        assert_eq!((first.val_size, evidence.val_size), (4, 10));
        // The one difference its header states (and the description).
        let mut same = evidence.clone();
        same.val_size = first.val_size;
        same.description = first.description.clone();
        assert_eq!(&same, first);
        // cpu-blocks: cpu-evidence with blocks of 4 instead of 2.
        let blocks = &files["cpu-blocks"];
        assert_eq!(
            (evidence.optimizer.block_size, blocks.optimizer.block_size),
            (2, 4)
        );
        let mut same = blocks.clone();
        same.optimizer.block_size = evidence.optimizer.block_size;
        same.description = evidence.description.clone();
        assert_eq!(&same, evidence);
        // cpu-edits: cpu-blocks with deletions, every offspring run, one block per race.
        let edits = &files["cpu-edits"];
        let (b, e) = (&blocks.optimizer, &edits.optimizer);
        assert_eq!(
            (b.edit_deletions, b.ofat_max_candidates, b.max_blocks),
            (0, Some(1), 2)
        );
        assert_eq!(
            (e.edit_deletions, e.ofat_max_candidates, e.max_blocks),
            (2, Some(3), 1)
        );
        let mut same = edits.clone();
        same.optimizer.edit_deletions = 0;
        same.optimizer.ofat_max_candidates = b.ofat_max_candidates;
        same.optimizer.max_blocks = b.max_blocks;
        same.description = blocks.description.clone();
        assert_eq!(&same, blocks);
        // cpu-edits-greedy: cpu-edits with temperature 0.
        let greedy = &files["cpu-edits-greedy"];
        assert_eq!((edits.temperature, greedy.temperature), (0.7, 0.0));
        let mut same = greedy.clone();
        same.temperature = edits.temperature;
        same.description = edits.description.clone();
        assert_eq!(&same, edits);
        // cpu-val: cpu-blocks with validation 40, greedy decoding, a 3M cap.
        let val = &files["cpu-val"];
        assert_eq!(
            (
                val.val_size,
                val.temperature,
                val.optimizer.max_total_tokens
            ),
            (40, 0.0, Some(3_000_000))
        );
        let mut same = val.clone();
        same.val_size = blocks.val_size;
        same.temperature = blocks.temperature;
        same.optimizer.max_total_tokens = blocks.optimizer.max_total_tokens;
        same.description = blocks.description.clone();
        assert_eq!(&same, blocks);
        // cpu-gate: cpu-val with the validation gate and a sticky incumbent.
        let gate = &files["cpu-gate"];
        assert_eq!(
            (
                val.optimizer.validation_alpha,
                gate.optimizer.validation_alpha
            ),
            (None, Some(0.1))
        );
        assert!(!val.optimizer.sticky_incumbent && gate.optimizer.sticky_incumbent);
        let mut same = gate.clone();
        same.optimizer.validation_alpha = None;
        same.optimizer.sticky_incumbent = false;
        same.description = val.description.clone();
        assert_eq!(&same, val);
        // cpu-gate-val80: cpu-gate with 80 validation items instead of 40.
        let val80 = &files["cpu-gate-val80"];
        assert_eq!((gate.val_size, val80.val_size), (40, 80));
        let mut same = val80.clone();
        same.val_size = gate.val_size;
        same.description = gate.description.clone();
        assert_eq!(&same, gate);
    }

    #[test]
    fn bad_protocols_name_the_field() {
        let e = Protocol::from_yaml("dev_size: 0\nval_size: 1\ntest_size: 1\nmax_new_tokens: 1\nfield_cap: 1\ntemperature: 0.7\n", "p.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.yaml") && e.contains("dev_size"), "{e}");
        let e = Protocol::from_yaml("dev_size: 4\nval_size: 1\ntest_size: 1\nmax_new_tokens: 1\nfield_cap: 1\ntemperature: 0.7\noptimizer:\n  group_size: 1\n  block_size: 2\n", "q.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("q.yaml") && e.contains("group_size"), "{e}");
        let e = Protocol::from_yaml("dev_size: 4\nbogus: 1\n", "r.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.yaml") && e.contains("bogus"), "{e}");
        let e = Protocol::resolve("/no/such/protocol.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/no/such/protocol.yaml"), "{e}");
    }

    #[test]
    fn finished_means_completed_or_budget() {
        let mut s = summary(1, 1, 1);
        assert!(is_finished(&s));
        s.stop_reason = StopReason::Interrupted;
        assert!(!is_finished(&s));
        s.stop_reason = StopReason::StopFile;
        assert!(!is_finished(&s));
    }

    #[test]
    fn budget_stops_are_explained_in_the_notes() {
        let budget = |batch: &str| StopReason::Budget {
            cap: "total".into(),
            batch: batch.into(),
            spent: 800,
            projected: 170,
            limit: 866,
        };
        let part = |seed: u64, m: Method, rounds: usize, reason: StopReason| {
            let mut s = summary(800, 20, rounds);
            s.stop_reason = reason;
            // Seed 8's run never finished its initial validation.
            if seed != 8 {
                s.validations
                    .push(crate::optimize::checkpoint::ValidationPoint {
                        round: 0,
                        config: PromptSet::new(),
                        score: 0.2,
                        tokens: 100,
                        item_scores: vec![],
                    });
            }
            let mut p = cantante_rounds(seed, vec![]);
            p.runs.remove(&Method::Cantante);
            p.runs.insert(
                m,
                OptPart {
                    summary: Some(s),
                    rounds: vec![],
                    timing: None,
                },
            );
            p
        };
        let t = build_table(
            "x",
            &[
                part(42, Method::Identity, 0, budget("validate")),
                part(47, Method::Identity, 2, budget("execute")),
                part(7, Method::Cantante, 3, StopReason::Completed),
                part(8, Method::Cantante, 0, budget("validate")),
            ],
        );
        let notes: Vec<&String> = t.notes.iter().filter(|n| n.contains("budget")).collect();
        assert_eq!(notes.len(), 3, "{:?}", t.notes);
        assert!(
            notes[0].starts_with("gsm8k seed 8: CANTANTE")
                && notes[0].contains("before the initial prompts' validation, so no round ran"),
            "{}",
            notes[0]
        );
        let notes = &notes[1..];
        assert!(
            notes[0].starts_with("gsm8k seed 42: Identity")
                && notes[0].contains("round 1 ran its block")
                && notes[0].contains("not adopted")
                && notes[0].contains("800 spent, 170 more projected, cap 866")
                && notes[0].contains("0 finished round(s)"),
            "{}",
            notes[0]
        );
        assert!(
            notes[1].starts_with("gsm8k seed 47: Identity")
                && notes[1].contains("stopped round 3 before its `execute` batch"),
            "{}",
            notes[1]
        );
        assert!(render_markdown(&t).contains(notes[0].as_str()));
    }
}
