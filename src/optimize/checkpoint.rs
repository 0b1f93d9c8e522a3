//! Run state, checkpoints and run-directory files (spec §4.8, fixes of its
//! resume bugs): the whole state needed to continue (populations, candidate
//! credit histories, incumbents, round number, token counters, rollout and
//! validation caches, rejections, validation history) is written atomically
//! (temporary file + rename) after every round. No RNG state is stored: every
//! random choice is re-derived from (run seed, round, agent, query, candidate).
//!
//! The checkpoint is YAML because serde_yaml writes floats with the shortest
//! round-trip representation and reads them back exactly (serde_json's default
//! float parser is not exact), so a resumed run is bit-identical.

use super::budget::{StopReason, TokenCounters};
use super::{AgentOptimizer, OptimizeConfig, OptimizeError, Rollout};
use crate::graph::PromptSet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Checkpoint file name inside the run directory.
pub const CHECKPOINT: &str = "checkpoint.yaml";
/// Format version of the checkpoint. Version 1 (before the one-factor
/// design and the judge became the defaults) is migrated on load: a config
/// without `design` / `attributer` keeps what those runs used (`joint`,
/// `llm`).
pub const VERSION: u32 = 2;

/// A validated joint configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationPoint {
    /// Round after which it was validated (0 = initial configuration).
    pub round: usize,
    /// The joint configuration.
    pub config: PromptSet,
    /// Mean validation score.
    pub score: f64,
    /// Task tokens of the validation (0 when served from the cache).
    pub tokens: usize,
    /// Score of every validation item, in the validation set's order (empty
    /// in checkpoints written before per-item scores were kept).
    #[serde(default)]
    pub item_scores: Vec<f64>,
}

impl ValidationPoint {
    /// Whether this point should replace `best` as the best validated
    /// configuration: a higher mean and, with `alpha`, a per-item gain that
    /// passes the one-sided sign test at that level (points without
    /// per-item scores on the same items cannot pass it).
    pub fn improves_on(&self, best: &ValidationPoint, alpha: Option<f64>) -> bool {
        if best.score >= self.score {
            return false;
        }
        match alpha {
            None => true,
            Some(_) if !best.score.is_finite() => true,
            Some(a) => self.p_against(best).is_some_and(|p| p < a),
        }
    }

    /// One-sided sign-test p-value of this point's per-item scores against
    /// `best`'s; `None` unless both have scores for the same items.
    pub fn p_against(&self, best: &ValidationPoint) -> Option<f64> {
        (!self.item_scores.is_empty() && self.item_scores.len() == best.item_scores.len())
            .then(|| super::capo::sign_test_greater(&self.item_scores, &best.item_scores))
    }
}

/// Running sums of an agent's credits (for summary statistics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CreditAccumulator {
    /// Sum of credits.
    pub sum: f64,
    /// Sum of squared credits.
    pub sum_sq: f64,
    /// Number of credits.
    pub n: usize,
    /// Number of missing credits.
    pub missing: usize,
}

impl CreditAccumulator {
    /// Add one credit (or a missing one).
    pub fn add(&mut self, c: Option<f64>) {
        match c {
            Some(x) => {
                self.sum += x;
                self.sum_sq += x * x;
                self.n += 1;
            }
            None => self.missing += 1,
        }
    }
    /// Mean, sample standard deviation and count.
    pub fn stats(&self) -> crate::attribution::CreditStats {
        if self.n == 0 {
            return Default::default();
        }
        let n = self.n as f64;
        let mean = self.sum / n;
        let std = if self.n > 1 {
            ((self.sum_sq - n * mean * mean) / (n - 1.0))
                .max(0.0)
                .sqrt()
        } else {
            0.0
        };
        crate::attribution::CreditStats {
            mean,
            std,
            n: self.n,
        }
    }
}

/// Everything a run needs to continue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Checkpoint format version.
    pub version: u32,
    /// The resolved configuration.
    pub config: OptimizeConfig,
    /// Optimized agents, in setup order.
    pub agents: Vec<String>,
    /// Local optimizer state per agent.
    pub optimizers: BTreeMap<String, AgentOptimizer>,
    /// Completed rounds.
    pub rounds_done: usize,
    /// Tokens spent.
    pub tokens: TokenCounters,
    /// Rollout cache: `config_hash:query:seed` → rollout.
    pub cache: BTreeMap<String, Rollout>,
    /// Validation cache: `config_hash:seed` → (score, tokens).
    pub validation_cache: BTreeMap<String, (f64, usize)>,
    /// Per-item scores of the cached validations, same keys (absent for
    /// validations cached before they were kept).
    #[serde(default)]
    pub validation_items: BTreeMap<String, Vec<f64>>,
    /// Rejected generated prompts per agent (cumulative).
    pub rejections: BTreeMap<String, usize>,
    /// Credits received per agent (cumulative).
    pub credits: BTreeMap<String, CreditAccumulator>,
    /// Validation of the combined best after each round (round 0 = initial).
    pub validations: Vec<ValidationPoint>,
    /// Why the run stopped, once it has.
    pub stop_reason: Option<StopReason>,
    /// Attribution groups sent so far.
    #[serde(default)]
    pub attribution_groups: usize,
    /// Degenerate attribution groups so far (replaced by identity credits).
    #[serde(default)]
    pub degenerate_groups: usize,
}

impl RunState {
    /// The best validated configuration so far: each validation in turn
    /// replaces the best before it when it [improves on](ValidationPoint::improves_on)
    /// it under the run's `validation_alpha` (earliest on ties).
    pub fn best(&self) -> Option<&ValidationPoint> {
        let alpha = self.config.validation_alpha;
        self.validations
            .iter()
            .fold(None, |best: Option<&ValidationPoint>, v| match best {
                Some(b) if !v.improves_on(b, alpha) => Some(b),
                _ => Some(v),
            })
    }
}

fn io_err(path: &Path, source: std::io::Error) -> OptimizeError {
    OptimizeError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Write `bytes` to `path` atomically (temporary file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OptimizeError> {
    let tmp: PathBuf = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// Save the checkpoint of `state` into `run_dir`.
pub fn save(run_dir: &Path, state: &RunState) -> Result<(), OptimizeError> {
    let path = run_dir.join(CHECKPOINT);
    let text = serde_yaml::to_string(state).map_err(|e| OptimizeError::Format {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    write_atomic(&path, text.as_bytes())
}

/// Load the checkpoint of `run_dir`.
pub fn load(run_dir: &Path) -> Result<RunState, OptimizeError> {
    let path = run_dir.join(CHECKPOINT);
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    let format = |e: serde_yaml::Error| OptimizeError::Format {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let mut value: serde_yaml::Value = serde_yaml::from_str(&text).map_err(format)?;
    migrate(&mut value);
    let state: RunState = serde_yaml::from_value(value).map_err(format)?;
    if state.version != VERSION {
        return Err(OptimizeError::Format {
            path: path.display().to_string(),
            message: format!("checkpoint version {} (expected {VERSION})", state.version),
        });
    }
    Ok(state)
}

/// Bring a version-1 checkpoint to the current version (see [`VERSION`]).
fn migrate(v: &mut serde_yaml::Value) {
    use serde_yaml::Value;
    if v.get("version").and_then(Value::as_u64) != Some(1) {
        return;
    }
    if let Some(Value::Mapping(config)) = v.get_mut("config") {
        for (field, old) in [("design", "joint"), ("attributer", "llm")] {
            let key = Value::String(field.into());
            if !config.contains_key(&key) {
                config.insert(key, Value::String(old.into()));
            }
        }
    }
    if let Value::Mapping(m) = v {
        m.insert(
            Value::String("version".into()),
            Value::Number(VERSION.into()),
        );
    }
}

/// Keep only the first `n` lines of a JSONL file (drops records of a round
/// that was killed before its checkpoint was written).
pub fn truncate_lines(path: &Path, n: usize) -> Result<(), OptimizeError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(path, e)),
    };
    let kept: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    write_atomic(path, kept.as_bytes())
}

/// Append one JSON line to a file.
pub fn append_line(path: &Path, line: &str) -> Result<(), OptimizeError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    writeln!(f, "{line}").map_err(|e| io_err(path, e))?;
    f.sync_data().map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_round_trip_exactly_through_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = RunState {
            version: VERSION,
            config: OptimizeConfig::default(),
            agents: vec!["a".into()],
            optimizers: BTreeMap::new(),
            rounds_done: 3,
            tokens: TokenCounters {
                task_input: 5,
                ..Default::default()
            },
            cache: BTreeMap::new(),
            validation_cache: BTreeMap::new(),
            validation_items: BTreeMap::new(),
            rejections: BTreeMap::new(),
            credits: BTreeMap::new(),
            validations: vec![],
            stop_reason: None,
            attribution_groups: 0,
            degenerate_groups: 0,
        };
        // Values with 17 significant digits that a fast float parser may misround.
        let tricky = [
            0.1 + 0.2,
            1.0 / 3.0,
            2.0f64.sqrt() * 1e-7,
            0.7333333333333334,
            9.999999999999998e22,
        ];
        for (i, x) in tricky.iter().enumerate() {
            state.validation_cache.insert(format!("k{i}"), (*x, i));
        }
        state.validations.push(ValidationPoint {
            round: 0,
            config: [("a".to_string(), "p: {query}\n  - \"quoted\"".to_string())].into(),
            score: 1.0 / 7.0,
            tokens: 1,
            item_scores: vec![0.0, 1.0 / 3.0, 1.0],
        });
        save(dir.path(), &state).unwrap();
        let back = load(dir.path()).unwrap();
        assert_eq!(back, state);
        for (i, x) in tricky.iter().enumerate() {
            assert_eq!(
                back.validation_cache[&format!("k{i}")].0.to_bits(),
                x.to_bits()
            );
        }
        assert!(!dir.path().join("checkpoint.tmp").exists());
    }

    fn point(round: usize, items: &[f64]) -> ValidationPoint {
        ValidationPoint {
            round,
            config: PromptSet::new(),
            score: items.iter().sum::<f64>() / items.len().max(1) as f64,
            tokens: 0,
            item_scores: items.to_vec(),
        }
    }

    #[test]
    fn best_needs_a_significant_gain_under_the_gate() {
        let initial = point(0, &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        // +2 items over the initial (2 won, 0 lost): p = 1/4.
        let small = point(1, &[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        // +5 over the initial (5 won, 0 lost): p = 1/32.
        let large = point(2, &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        let mut st = RunState {
            version: VERSION,
            config: OptimizeConfig::default(),
            agents: vec![],
            optimizers: BTreeMap::new(),
            rounds_done: 2,
            tokens: TokenCounters::default(),
            cache: BTreeMap::new(),
            validation_cache: BTreeMap::new(),
            validation_items: BTreeMap::new(),
            rejections: BTreeMap::new(),
            credits: BTreeMap::new(),
            validations: vec![initial.clone(), small.clone()],
            stop_reason: None,
            attribution_groups: 0,
            degenerate_groups: 0,
        };
        // The paper's rule: a higher mean wins.
        assert_eq!(st.best().unwrap().round, 1);
        st.config.validation_alpha = Some(0.1);
        assert_eq!(st.best().unwrap().round, 0);
        // Compared with the initial (the best so far), not with round 1.
        st.validations.push(large);
        assert_eq!(st.best().unwrap().round, 2);
        // Without per-item scores (an old checkpoint) nothing passes the gate.
        st.validations[2].item_scores.clear();
        assert_eq!(st.best().unwrap().round, 0);
        st.config.validation_alpha = None;
        assert_eq!(st.best().unwrap().round, 2);
    }

    #[test]
    fn truncates_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rounds.jsonl");
        for i in 0..3 {
            append_line(&p, &format!("{{\"round\":{i}}}")).unwrap();
        }
        truncate_lines(&p, 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"round\":0}\n{\"round\":1}\n"
        );
    }
}
