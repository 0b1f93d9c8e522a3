//! Run report: reads an optimization run directory written by
//! [`crate::optimize::optimize`] (`config.json`, `rounds.jsonl`,
//! `summary.json`, or `checkpoint.yaml` for a run that has not finished) and
//! writes `report.md` with three SVG charts: validation and block scores per
//! round, a heatmap of each agent's mean credit per round, and cumulative
//! task vs meta tokens. The Markdown also holds a per-round table, per-agent
//! credit statistics with the credit-correlation analysis of the paper (spec
//! §9.5: Spearman's ρ between an agent's credit and the block score of the
//! configuration, via [`crate::optimize::analysis::credit_correlation`]),
//! per changed agent the block queries its candidates won and lost against
//! the incumbent ([`crate::optimize::analysis::candidate_outcomes`]) and the
//! best prompts.
//!
//! The charts are drawn by plotters' SVG backend ([`charts`]; no system
//! fonts needed).

pub mod charts;

use crate::graph::PromptSet;
use crate::optimize::analysis::{
    candidate_outcomes, counterfactual_correlation, credit_correlation,
};
use crate::optimize::checkpoint;
use crate::optimize::{OptimizeConfig, OptimizeResult, RoundRecord, StopReason};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// File name of the Markdown report.
pub const REPORT_MD: &str = "report.md";
/// File name of the score chart.
pub const SCORES_SVG: &str = "scores.svg";
/// File name of the credit heatmap.
pub const CREDITS_SVG: &str = "credits.svg";
/// File name of the token chart.
pub const TOKENS_SVG: &str = "tokens.svg";

/// Errors of [`write_report`] and [`load_run`]; each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A required file (or the directory itself) does not exist.
    #[error("{}: not found (is this an optimization run directory?)", path.display())]
    Missing {
        /// The missing path.
        path: PathBuf,
    },
    /// A file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file could not be parsed.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (with the line number for `rounds.jsonl`).
        message: String,
    },
    /// `rounds.jsonl` holds no completed round.
    #[error("{}: the run has no completed rounds; nothing to report", path.display())]
    NoRounds {
        /// The rounds file.
        path: PathBuf,
    },
    /// An output file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A chart could not be drawn.
    #[error(transparent)]
    Chart(#[from] charts::ChartError),
}

/// Paths written by [`write_report`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportPaths {
    /// The Markdown report.
    pub markdown: PathBuf,
    /// Validation / block scores per round.
    pub scores_svg: PathBuf,
    /// Mean credit per agent and round.
    pub credits_svg: PathBuf,
    /// Cumulative task and meta tokens per round.
    pub tokens_svg: PathBuf,
}

impl ReportPaths {
    /// All written paths, Markdown first.
    pub fn all(&self) -> [&Path; 4] {
        [
            &self.markdown,
            &self.scores_svg,
            &self.credits_svg,
            &self.tokens_svg,
        ]
    }
}

/// The contents of a run directory.
#[derive(Clone, Debug)]
pub struct RunData {
    /// Resolved configuration (`config.json`).
    pub config: OptimizeConfig,
    /// One record per completed round (`rounds.jsonl`), in order.
    pub rounds: Vec<RoundRecord>,
    /// Final result (`summary.json`), or for a run that has not finished
    /// (no `summary.json`, or one older than `rounds.jsonl` after a resume)
    /// the same figures rebuilt from `checkpoint.yaml`.
    pub summary: OptimizeResult,
    /// Whether `summary` comes from an up-to-date `summary.json`.
    pub finished: bool,
}

fn read_text(path: &Path) -> Result<String, ReportError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ReportError::Missing {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(ReportError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ReportError> {
    serde_json::from_str(&read_text(path)?).map_err(|e| ReportError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Read `config.json`, `rounds.jsonl` and `summary.json` of a run directory.
/// Errors name the missing or malformed file; a run without a completed
/// round is [`ReportError::NoRounds`].
pub fn load_run(run_dir: &Path) -> Result<RunData, ReportError> {
    if !run_dir.is_dir() {
        return Err(ReportError::Missing {
            path: run_dir.to_path_buf(),
        });
    }
    let config: OptimizeConfig = read_json(&run_dir.join("config.json"))?;
    let rounds_path = run_dir.join("rounds.jsonl");
    let mut rounds = Vec::new();
    for (i, line) in read_text(&rounds_path)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: RoundRecord = serde_json::from_str(line).map_err(|e| ReportError::Parse {
            path: rounds_path.clone(),
            message: format!("line {}: {e}", i + 1),
        })?;
        rounds.push(rec);
    }
    if rounds.is_empty() {
        return Err(ReportError::NoRounds { path: rounds_path });
    }
    let summary_path = run_dir.join("summary.json");
    let ckpt_path = run_dir.join(checkpoint::CHECKPOINT);
    let summary: Option<OptimizeResult> = if summary_path.exists() {
        Some(read_json(&summary_path)?)
    } else {
        None
    };
    let (summary, finished) = match summary {
        Some(s) if s.rounds_completed >= rounds.len() || !ckpt_path.exists() => (s, true),
        None if !ckpt_path.exists() => return Err(ReportError::Missing { path: summary_path }),
        _ => (summary_from_checkpoint(run_dir, &ckpt_path)?, false),
    };
    Ok(RunData {
        config,
        rounds,
        summary,
        finished,
    })
}

/// The figures of `summary.json` for a run still in progress, from its checkpoint.
fn summary_from_checkpoint(run_dir: &Path, path: &Path) -> Result<OptimizeResult, ReportError> {
    let st = checkpoint::load(run_dir).map_err(|e| ReportError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let reason = st.stop_reason.clone().unwrap_or(StopReason::Interrupted);
    Ok(crate::optimize::run::result_of(&st, reason))
}

/// Per-round numbers shown in the table and the charts.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundRow {
    /// Round number.
    pub round: usize,
    /// Validation score of the combined best after the round.
    pub validation: f64,
    /// Sign-test p-value of that validation against the best before it.
    pub validation_p: Option<f64>,
    /// Block-mean score of the incumbent (configuration 0).
    pub incumbent_block: Option<f64>,
    /// Best block-mean score among the candidates (configurations 1..).
    pub best_candidate_block: Option<f64>,
    /// Joint configurations raced.
    pub configs: usize,
    /// Task tokens spent in the round.
    pub task_tokens: u64,
    /// Meta tokens spent in the round.
    pub meta_tokens: u64,
    /// Cumulative task tokens after the round.
    pub cum_task_tokens: u64,
    /// Cumulative meta tokens after the round.
    pub cum_meta_tokens: u64,
    /// Attribution groups without credits.
    pub attribution_failures: usize,
    /// Generated prompts rejected (all agents).
    pub rejections: usize,
    /// Mean non-missing credit per agent over all rollouts of the round, with its count.
    pub mean_credit: BTreeMap<String, (Option<f64>, usize)>,
}

impl RoundRow {
    /// Summarize one record of `rounds.jsonl`.
    pub fn from_record(rec: &RoundRecord) -> Self {
        let mean_credit = rec
            .credits
            .iter()
            .map(|(agent, per_config)| {
                let vals: Vec<f64> = per_config.iter().flatten().flatten().copied().collect();
                let mean = (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64);
                (agent.clone(), (mean, vals.len()))
            })
            .collect();
        let best_candidate_block = rec
            .block_scores
            .iter()
            .skip(1)
            .copied()
            .filter(|v| v.is_finite())
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        Self {
            round: rec.round,
            validation: rec.validation_score,
            validation_p: rec.validation_p,
            incumbent_block: rec.block_scores.first().copied(),
            best_candidate_block,
            configs: rec.configs.len(),
            task_tokens: rec.task_tokens,
            meta_tokens: rec.meta_tokens,
            cum_task_tokens: rec.tokens.task(),
            cum_meta_tokens: rec.tokens.meta(),
            attribution_failures: rec.attribution_failures,
            rejections: rec.rejections.values().sum(),
            mean_credit,
        }
    }
}

/// Candidates against the incumbent, query by query: per changed agent, how
/// often a candidate configuration solved a block query the incumbent of its
/// round missed, and the reverse (nothing for runs without `changed`).
fn write_candidate_outcomes(md: &mut String, data: &RunData) {
    let outcomes = candidate_outcomes(&data.rounds);
    if outcomes.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n### Candidates against the incumbent\n");
    let _ = writeln!(
        md,
        "Per block query, a candidate configuration's score against the incumbent's (configuration 0 of the same round), keyed by the agent the candidate changed. A prompt can only be adopted for a win here; with none, no selection rule had a better prompt to find.\n"
    );
    let _ = writeln!(
        md,
        "| changed | configurations | queries won | lost | tied |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for (agent, o) in &outcomes {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            md_cell(agent),
            o.configs,
            o.won,
            o.lost,
            o.tied
        );
    }
    let (won, lost) = outcomes
        .values()
        .fold((0, 0), |(w, l), o| (w + o.won, l + o.lost));
    if won == 0 {
        let _ = writeln!(
            md,
            "\nNo candidate solved a query its incumbent missed ({lost} queries lost)."
        );
    }
}

/// Why the rewriter's prompts were rejected: per agent and reason, how many
/// replies over all rounds (nothing when no round recorded a reason).
fn write_rejection_reasons(md: &mut String, data: &RunData) {
    let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for rec in &data.rounds {
        for (agent, reasons) in &rec.rejection_reasons {
            for r in reasons {
                *counts.entry((agent.as_str(), r.as_str())).or_default() += 1;
            }
        }
    }
    if counts.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n### Rejected prompts\n");
    let _ = writeln!(md, "| agent | reason | replies |");
    let _ = writeln!(md, "|---|---|---:|");
    for ((agent, reason), n) in counts {
        let _ = writeln!(md, "| {agent} | {} | {n} |", md_cell(reason));
    }
}

/// Agents of the run, in name order: those with credits or prompts anywhere.
fn agents_of(data: &RunData) -> Vec<String> {
    let mut set: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    set.extend(data.summary.best_prompts.keys().cloned());
    set.extend(data.summary.agent_credits.keys().cloned());
    for r in &data.rounds {
        set.extend(r.credits.keys().cloned());
    }
    set.into_iter().collect()
}

/// Read the run in `run_dir` and write `report.md`, `scores.svg`,
/// `credits.svg` and `tokens.svg` into `out_dir` (default: `run_dir`,
/// created if needed). Returns the paths written.
pub fn write_report(run_dir: &Path, out_dir: Option<&Path>) -> Result<ReportPaths, ReportError> {
    let data = load_run(run_dir)?;
    let out = out_dir.unwrap_or(run_dir);
    std::fs::create_dir_all(out).map_err(|source| ReportError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let rows: Vec<RoundRow> = data.rounds.iter().map(RoundRow::from_record).collect();
    let agents = agents_of(&data);
    let paths = ReportPaths {
        markdown: out.join(REPORT_MD),
        scores_svg: out.join(SCORES_SVG),
        credits_svg: out.join(CREDITS_SVG),
        tokens_svg: out.join(TOKENS_SVG),
    };
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|source| ReportError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    write(
        &paths.scores_svg,
        &charts::scores_chart(&data.summary, &rows)?,
    )?;
    write(&paths.credits_svg, &charts::credit_heatmap(&agents, &rows)?)?;
    write(
        &paths.tokens_svg,
        &charts::tokens_chart(&data.summary, &rows)?,
    )?;
    write(
        &paths.markdown,
        &markdown(run_dir, &data, &rows, &agents, &paths),
    )?;
    Ok(paths)
}

// ---------------------------------------------------------------- Markdown

fn fmt_score(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "—".into()
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), fmt_score)
}

/// Human-readable stop reason.
pub fn describe_stop(reason: &StopReason) -> String {
    match reason {
        StopReason::Completed => "completed all configured rounds".into(),
        StopReason::Budget {
            cap,
            batch,
            spent,
            projected,
            limit,
        } => format!(
            "token budget: the `{batch}` batch (projected {projected}) would have exceeded the \
             {cap} cap ({spent} spent of {limit})"
        ),
        StopReason::StopFile => "a STOP file appeared in the run directory".into(),
        StopReason::Interrupted => "interrupted by the caller".into(),
    }
}

/// A code fence longer than any backtick run in `text`.
fn fence_for(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        if c == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    "`".repeat((longest + 1).max(3))
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn markdown(
    run_dir: &Path,
    data: &RunData,
    rows: &[RoundRow],
    agents: &[String],
    paths: &ReportPaths,
) -> String {
    let s = &data.summary;
    let c = &data.config;
    let mut md = String::new();
    let _ = writeln!(md, "# CANTANTE optimization report\n");
    let _ = writeln!(md, "Run directory: `{}`\n", run_dir.display());
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "- Rounds completed: {} of {} configured",
        s.rounds_completed, c.rounds
    );
    if data.finished {
        let _ = writeln!(md, "- Stop reason: {}", describe_stop(&s.stop_reason));
    } else {
        let _ = writeln!(
            md,
            "- Stop reason: none yet (run in progress or killed; no up-to-date summary.json, \
             figures from checkpoint.yaml)"
        );
    }
    let _ = writeln!(
        md,
        "- Validation score: {} (initial) → {} (best, after round {})",
        fmt_score(s.initial_score),
        fmt_score(s.best_score),
        s.best_round
    );
    let _ = writeln!(
        md,
        "- Tokens: {} task + {} meta = {} total; {} rollouts executed",
        s.tokens.task(),
        s.tokens.meta(),
        s.tokens.total(),
        s.tokens.rollouts
    );
    let _ = writeln!(
        md,
        "- Settings: optimizer {:?}, design {}, seed {}, block size {}, group size {}, {} attribution",
        c.optimizer,
        c.design,
        c.seed,
        c.block_size,
        c.group_size,
        if c.identity_attribution {
            "identity (ablation)"
        } else if c.attributer == crate::optimize::AttributerKind::Judge {
            "judge (label probabilities)"
        } else {
            "LLM"
        }
    );
    let _ = writeln!(
        md,
        "\n![Scores per round]({})\n",
        file_name(&paths.scores_svg)
    );

    let _ = writeln!(md, "## Rounds\n");
    let gate = match data.config.validation_alpha {
        Some(a) => {
            format!("this run's `validation_alpha` is {a}: only p below it replaced the best")
        }
        None => "this run has no `validation_alpha`: a higher mean replaced the best".into(),
    };
    let _ = writeln!(
        md,
        "`p vs best before`: one-sided sign test of the round's per-item validation scores against the best validated configuration before it (`–` without per-item scores); {gate}.\n"
    );
    let _ = writeln!(
        md,
        "| round | validation | p vs best before | incumbent block | best candidate block | configs | task tokens | meta tokens | attribution failures | rejections |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.round,
            fmt_score(r.validation),
            r.validation_p
                .map_or("–".to_string(), |p| format!("{p:.3}")),
            fmt_opt(r.incumbent_block),
            fmt_opt(r.best_candidate_block),
            r.configs,
            r.task_tokens,
            r.meta_tokens,
            r.attribution_failures,
            r.rejections
        );
    }

    write_candidate_outcomes(&mut md, data);
    write_rejection_reasons(&mut md, data);

    let _ = writeln!(md, "\n## Agent credits\n");
    let _ = writeln!(
        md,
        "Credit statistics over all attributed rollouts, and Spearman's ρ between an \
         agent's mean credit in an evaluated joint configuration and that \
         configuration's block score (spec §9.5; n = configurations with credits). \
         A moderate, agent-specific ρ means the credits are not an echo of the \
         system score; it does not show that they are correct. The counterfactual \
         column correlates the credit with the measured gain of configurations \
         that changed only that agent (what the `ofat` design runs; n/a for the \
         joint design).\n"
    );
    let groups: usize = data.rounds.iter().map(|r| r.attribution_groups).sum();
    let degenerate: usize = data.rounds.iter().map(|r| r.degenerate_groups).sum();
    let design = data.rounds.first().map(|r| r.design).unwrap_or_default();
    let _ = writeln!(
        md,
        "Design: `{design}`; {groups} attribution groups, {degenerate} degenerate \
         ({:.0}%: every agent credited the same while the scores differed; \
         identity credits used instead).\n",
        100.0 * degenerate as f64 / groups.max(1) as f64
    );
    let corr = credit_correlation(&data.rounds);
    let cf = counterfactual_correlation(&data.rounds);
    let _ = writeln!(
        md,
        "| agent | mean credit | std | n | Spearman ρ vs block score | configs | ρ vs counterfactual gain | configs |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for a in agents {
        let st = s.agent_credits.get(a).copied().unwrap_or_default();
        let (rho, n_cfg) = corr.get(a).copied().unwrap_or((None, 0));
        let (cf_rho, cf_n) = cf.get(a).copied().unwrap_or((None, 0));
        let (mean, std) = if st.n == 0 {
            ("—".to_string(), "—".to_string())
        } else {
            (fmt_score(st.mean), fmt_score(st.std))
        };
        let shown = |r: Option<f64>| {
            r.map_or_else(
                || "n/a (fewer than 3 configs or constant)".to_string(),
                |r| format!("{r:+.3}"),
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            md_cell(a),
            mean,
            std,
            st.n,
            shown(rho),
            n_cfg,
            shown(cf_rho),
            cf_n
        );
    }
    let _ = writeln!(
        md,
        "\n![Mean credit per agent and round]({})\n",
        file_name(&paths.credits_svg)
    );

    let _ = writeln!(md, "## Token usage\n");
    let _ = writeln!(
        md,
        "Task tokens: rollouts and validations; meta tokens: attribution and prompt rewriting.\n"
    );
    let _ = writeln!(
        md,
        "![Cumulative tokens per round]({})\n",
        file_name(&paths.tokens_svg)
    );

    let _ = writeln!(md, "## Best prompts\n");
    let _ = writeln!(
        md,
        "Validation score {} (after round {}).\n",
        fmt_score(s.best_score),
        s.best_round
    );
    write_prompts(&mut md, &s.best_prompts);
    md
}

fn write_prompts(md: &mut String, prompts: &PromptSet) {
    for (agent, prompt) in prompts {
        let fence = fence_for(prompt);
        let _ = writeln!(md, "### {agent}\n\n{fence}text\n{prompt}\n{fence}\n");
    }
}

// ---------------------------------------------------------------- SVG

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_outgrow_backticks_in_prompts() {
        assert_eq!(fence_for("plain"), "```");
        assert_eq!(fence_for("use ```python\ncode```"), "````");
    }

    #[test]
    fn escaping_and_markdown_cells() {
        assert_eq!(md_cell("a|b\nc"), "a\\|b c");
    }
}
