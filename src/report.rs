//! Run report: reads an optimization run directory written by
//! [`crate::optimize::optimize`] (`config.json`, `rounds.jsonl`,
//! `summary.json`, or `checkpoint.yaml` for a run that has not finished) and
//! writes `report.md` with three SVG charts: validation and block scores per
//! round, a heatmap of each agent's mean credit per round, and cumulative
//! task vs meta tokens. The Markdown also holds a per-round table, per-agent
//! credit statistics with the credit-correlation analysis of the paper (spec
//! §9.5: Spearman's ρ between an agent's credit and the block score of the
//! configuration, via [`crate::optimize::analysis::credit_correlation`]) and
//! the best prompts.
//!
//! The charts are written by a small SVG writer in this module (no plotting
//! crate, no fonts): text is left to the viewer's sans-serif font, every data
//! mark carries a `class` (`point`, `cell`) and a `<title>` tooltip with its
//! value.

use crate::graph::PromptSet;
use crate::optimize::analysis::credit_correlation;
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
    write(&paths.scores_svg, &scores_chart(&data.summary, &rows))?;
    write(&paths.credits_svg, &credit_heatmap(&agents, &rows))?;
    write(&paths.tokens_svg, &tokens_chart(&data.summary, &rows))?;
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
        "- Settings: optimizer {:?}, seed {}, block size {}, group size {}, {} attribution",
        c.optimizer,
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
    let _ = writeln!(
        md,
        "| round | validation | incumbent block | best candidate block | configs | task tokens | meta tokens | attribution failures | rejections |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.round,
            fmt_score(r.validation),
            fmt_opt(r.incumbent_block),
            fmt_opt(r.best_candidate_block),
            r.configs,
            r.task_tokens,
            r.meta_tokens,
            r.attribution_failures,
            r.rejections
        );
    }

    let _ = writeln!(md, "\n## Agent credits\n");
    let _ = writeln!(
        md,
        "Credit statistics over all attributed rollouts, and Spearman's ρ between an \
         agent's mean credit in an evaluated joint configuration and that \
         configuration's block score (spec §9.5; n = configurations with credits). \
         A moderate, agent-specific ρ means the credits are not an echo of the \
         system score; it does not show that they are correct.\n"
    );
    let corr = credit_correlation(&data.rounds);
    let _ = writeln!(
        md,
        "| agent | mean credit | std | n | Spearman ρ vs block score | configs |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for a in agents {
        let st = s.agent_credits.get(a).copied().unwrap_or_default();
        let (rho, n_cfg) = corr.get(a).copied().unwrap_or((None, 0));
        let (mean, std) = if st.n == 0 {
            ("—".to_string(), "—".to_string())
        } else {
            (fmt_score(st.mean), fmt_score(st.std))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            md_cell(a),
            mean,
            std,
            st.n,
            rho.map_or_else(
                || "n/a (fewer than 3 configs or constant)".into(),
                |r| format!("{r:+.3}")
            ),
            n_cfg
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

const FONT: &str = "font-family=\"sans-serif\"";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// "Nice" tick positions covering [lo, hi] (about `target` ticks).
fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil();
    let mut ticks = Vec::new();
    for k in 0..100 {
        let v = (first + k as f64) * step;
        if v > hi + step * 1e-6 {
            break;
        }
        ticks.push(if v.abs() < step * 1e-6 { 0.0 } else { v });
    }
    ticks
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim_num(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim_num(v / 1e3))
    } else {
        trim_num(v)
    }
}

fn trim_num(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// One line of a line chart.
struct Series<'a> {
    name: &'a str,
    color: &'a str,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

struct Frame {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
}

impl Frame {
    fn plot_w(&self) -> f64 {
        self.w - self.left - self.right
    }
    fn plot_h(&self) -> f64 {
        self.h - self.top - self.bottom
    }
}

fn svg_open(out: &mut String, w: f64, h: f64, title: &str) {
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">"
    );
    let _ = writeln!(out, "<title>{}</title>", esc(title));
    let _ = writeln!(
        out,
        "<rect class=\"background\" x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"white\"/>"
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\" {FONT}>{}</text>",
        w / 2.0,
        esc(title)
    );
}

/// A line chart with integer x (rounds), axes, grid, ticks and a legend on the right.
fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_zero: bool,
) -> String {
    let longest = series
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(0);
    let right = (longest as f64 * 7.0 + 60.0).max(120.0);
    let f = Frame {
        w: 560.0 + right,
        h: 420.0,
        left: 72.0,
        right,
        top: 44.0,
        bottom: 56.0,
    };
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (mut y0, mut y1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    if all.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if y_zero {
        y0 = y0.min(0.0);
    }
    // Rounds are integers: pad a quarter round on each side (half with one point).
    let xpad = if x1 - x0 < 1.0 { 0.5 } else { 0.25 };
    x0 -= xpad;
    x1 += xpad;
    if y1 - y0 < 1e-9 {
        y0 -= 0.5;
        y1 += 0.5;
    } else {
        let pad = (y1 - y0) * 0.05;
        y1 += pad;
        if !y_zero || y0 < 0.0 {
            y0 -= pad;
        }
    }
    let sx = |x: f64| f.left + (x - x0) / (x1 - x0) * f.plot_w();
    let sy = |y: f64| f.top + f.plot_h() - (y - y0) / (y1 - y0) * f.plot_h();
    let mut o = String::new();
    svg_open(&mut o, f.w, f.h, title);
    // Grid and y ticks.
    for t in nice_ticks(y0, y1, 6) {
        let y = sy(t);
        let _ = writeln!(
            o,
            "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/>",
            f.left,
            f.left + f.plot_w()
        );
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"12\" {FONT}>{}</text>",
            f.left - 6.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    // X ticks: integers only.
    let xstep = nice_ticks(0.0, x1 - x0, 10)
        .get(1)
        .copied()
        .unwrap_or(1.0)
        .ceil()
        .max(1.0);
    let xt: Vec<f64> = (0..200)
        .map(|k| (x0 / xstep).ceil() * xstep + k as f64 * xstep)
        .take_while(|t| *t <= x1)
        .collect();
    for t in xt {
        let x = sx(t);
        let base = f.top + f.plot_h();
        let _ = writeln!(
            o,
            "<line x1=\"{x:.1}\" y1=\"{base:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
            base + 5.0
        );
        let _ = writeln!(
            o,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"12\" {FONT}>{}</text>",
            base + 19.0,
            trim_num(t)
        );
    }
    // Axes.
    let _ = writeln!(
        o,
        "<polyline points=\"{l:.1},{t:.1} {l:.1},{b:.1} {r:.1},{b:.1}\" fill=\"none\" stroke=\"black\"/>",
        l = f.left,
        t = f.top,
        b = f.top + f.plot_h(),
        r = f.left + f.plot_w()
    );
    let _ = writeln!(
        o,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"13\" {FONT}>{}</text>",
        f.left + f.plot_w() / 2.0,
        f.h - 14.0,
        esc(x_label)
    );
    let (lx, ly) = (18.0, f.top + f.plot_h() / 2.0);
    let _ = writeln!(
        o,
        "<text x=\"{lx}\" y=\"{ly:.1}\" text-anchor=\"middle\" font-size=\"13\" transform=\"rotate(-90 {lx} {ly:.1})\" {FONT}>{}</text>",
        esc(y_label)
    );
    // Series.
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let dash = if s.dashed {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        if pts.len() > 1 {
            let coords: Vec<String> = pts
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let _ = writeln!(
                o,
                "<polyline class=\"series\" points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash}/>",
                coords.join(" "),
                s.color
            );
        }
        for &(x, y) in &pts {
            let _ = writeln!(
                o,
                "<circle class=\"point\" data-series=\"{}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{}\"><title>{}: round {}, {}</title></circle>",
                esc(s.name),
                sx(x),
                sy(y),
                s.color,
                esc(s.name),
                trim_num(x),
                trim_num(y)
            );
        }
        // Legend entry.
        let ly = f.top + 10.0 + i as f64 * 22.0;
        let lx = f.w - f.right + 16.0;
        let _ = writeln!(
            o,
            "<line x1=\"{lx:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{}\" stroke-width=\"2\"{dash}/>",
            lx + 24.0,
            s.color
        );
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" {FONT}>{}</text>",
            lx + 30.0,
            ly + 4.0,
            esc(s.name)
        );
    }
    o.push_str("</svg>\n");
    o
}

fn scores_chart(summary: &OptimizeResult, rows: &[RoundRow]) -> String {
    let mut validation = vec![(0.0, summary.initial_score)];
    validation.extend(rows.iter().map(|r| (r.round as f64, r.validation)));
    let incumbent = rows
        .iter()
        .filter_map(|r| r.incumbent_block.map(|v| (r.round as f64, v)))
        .collect();
    let best = rows
        .iter()
        .filter_map(|r| r.best_candidate_block.map(|v| (r.round as f64, v)))
        .collect();
    line_chart(
        "Scores per round",
        "round",
        "score",
        &[
            Series {
                name: "validation (combined best)",
                color: "#1b7837",
                dashed: false,
                points: validation,
            },
            Series {
                name: "block: incumbent",
                color: "#2166ac",
                dashed: true,
                points: incumbent,
            },
            Series {
                name: "block: best candidate",
                color: "#d6604d",
                dashed: false,
                points: best,
            },
        ],
        true,
    )
}

fn tokens_chart(summary: &OptimizeResult, rows: &[RoundRow]) -> String {
    // Before round 1 only the initial validation has been paid (task tokens).
    let initial = summary
        .validations
        .iter()
        .find(|v| v.round == 0)
        .map_or(0.0, |v| v.tokens as f64);
    let mut task = vec![(0.0, initial)];
    task.extend(
        rows.iter()
            .map(|r| (r.round as f64, r.cum_task_tokens as f64)),
    );
    let mut meta = vec![(0.0, 0.0)];
    meta.extend(
        rows.iter()
            .map(|r| (r.round as f64, r.cum_meta_tokens as f64)),
    );
    line_chart(
        "Cumulative tokens",
        "round",
        "tokens",
        &[
            Series {
                name: "task (rollouts, validation)",
                color: "#2166ac",
                dashed: false,
                points: task,
            },
            Series {
                name: "meta (attribution, rewriting)",
                color: "#b2182b",
                dashed: false,
                points: meta,
            },
        ],
        true,
    )
}

/// Diverging color for a credit in [-1, 1]: blue (−1) → light gray (0) → red (1).
pub fn credit_color(v: f64) -> String {
    let v = v.clamp(-1.0, 1.0);
    let mid = [247.0, 247.0, 247.0];
    let end = if v < 0.0 {
        [33.0, 102.0, 172.0]
    } else {
        [178.0, 24.0, 43.0]
    };
    let t = v.abs();
    let c: Vec<u8> = (0..3)
        .map(|i| (mid[i] + (end[i] - mid[i]) * t).round() as u8)
        .collect();
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

fn credit_heatmap(agents: &[String], rows: &[RoundRow]) -> String {
    let longest = agents.iter().map(|a| a.chars().count()).max().unwrap_or(4);
    let left = (longest as f64 * 7.5 + 20.0).clamp(70.0, 260.0);
    let n = rows.len().max(1) as f64;
    let cell_w = (560.0 / n).clamp(6.0, 64.0);
    let cell_h = 34.0;
    let (top, right, bottom) = (44.0, 130.0, 56.0);
    let plot_w = cell_w * n;
    let plot_h = cell_h * agents.len().max(1) as f64;
    let bar_h = plot_h.clamp(120.0, 200.0);
    let w = (left + plot_w + right).max(380.0);
    let h = top + plot_h.max(bar_h + 30.0) + bottom;
    let mut o = String::new();
    svg_open(&mut o, w, h, "Mean credit per agent and round");
    let label_every = ((n / 20.0).ceil() as usize).max(1);
    for (j, r) in rows.iter().enumerate() {
        let x = left + j as f64 * cell_w;
        // Every `label_every`-th round, and the last one where it does not crowd its neighbour.
        let last = j + 1 == rows.len() && (j % label_every) as f64 * cell_w >= 24.0;
        if j % label_every == 0 || last {
            let _ = writeln!(
                o,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"12\" {FONT}>{}</text>",
                x + cell_w / 2.0,
                top + plot_h + 18.0,
                r.round
            );
        }
        for (i, a) in agents.iter().enumerate() {
            let y = top + i as f64 * cell_h;
            let (mean, count) = r.mean_credit.get(a).copied().unwrap_or((None, 0));
            let (fill, tip) = match mean {
                Some(m) => (
                    credit_color(m),
                    format!("{a}, round {}: mean credit {m:.3} (n = {count})", r.round),
                ),
                None => (
                    "#bdbdbd".to_string(),
                    format!("{a}, round {}: no credits", r.round),
                ),
            };
            let _ = writeln!(
                o,
                "<rect class=\"cell\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{cell_w:.1}\" height=\"{cell_h:.1}\" fill=\"{fill}\" stroke=\"white\" stroke-width=\"1\"><title>{}</title></rect>",
                esc(&tip)
            );
            if cell_w >= 38.0 {
                let (text, color) = match mean {
                    Some(m) => (
                        format!("{m:.2}"),
                        if m.abs() > 0.6 { "white" } else { "black" },
                    ),
                    None => ("n/a".into(), "black"),
                };
                let _ = writeln!(
                    o,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"{color}\" {FONT}>{text}</text>",
                    x + cell_w / 2.0,
                    y + cell_h / 2.0 + 4.0
                );
            }
        }
    }
    for (i, a) in agents.iter().enumerate() {
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"12\" {FONT}>{}</text>",
            left - 8.0,
            top + i as f64 * cell_h + cell_h / 2.0 + 4.0,
            esc(a)
        );
    }
    let _ = writeln!(
        o,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"13\" {FONT}>round</text>",
        left + plot_w / 2.0,
        top + plot_h + 40.0
    );
    // Legend: vertical gradient bar from +1 (top) to -1 (bottom), and the n/a swatch.
    let lx = left + plot_w + 30.0;
    let _ = writeln!(
        o,
        "<defs><linearGradient id=\"credit-scale\" x1=\"0\" y1=\"0\" x2=\"0\" y2=\"1\">\
         <stop offset=\"0\" stop-color=\"{}\"/><stop offset=\"0.5\" stop-color=\"{}\"/>\
         <stop offset=\"1\" stop-color=\"{}\"/></linearGradient></defs>",
        credit_color(1.0),
        credit_color(0.0),
        credit_color(-1.0)
    );
    let _ = writeln!(
        o,
        "<rect class=\"legend\" x=\"{lx:.1}\" y=\"{top:.1}\" width=\"16\" height=\"{bar_h:.1}\" fill=\"url(#credit-scale)\" stroke=\"#555\"/>"
    );
    for (v, frac) in [
        (1.0, 0.0),
        (0.5, 0.25),
        (0.0, 0.5),
        (-0.5, 0.75),
        (-1.0, 1.0),
    ] {
        let y = top + frac * bar_h;
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" {FONT}>{}</text>",
            lx + 22.0,
            y + 4.0,
            trim_num(v)
        );
    }
    let _ = writeln!(
        o,
        "<text x=\"{lx:.1}\" y=\"{:.1}\" font-size=\"11\" {FONT}>credit</text>",
        top - 8.0
    );
    let sy = top + bar_h + 14.0;
    let _ = writeln!(
        o,
        "<rect class=\"legend\" x=\"{lx:.1}\" y=\"{sy:.1}\" width=\"16\" height=\"12\" fill=\"#bdbdbd\"/>"
    );
    let _ = writeln!(
        o,
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" {FONT}>no credit</text>",
        lx + 22.0,
        sy + 10.0
    );
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ticks_cover_range() {
        let t = nice_ticks(0.0, 1.0, 5);
        let want = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];
        assert_eq!(t.len(), want.len());
        assert!(t.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-9));
        let t = nice_ticks(0.0, 12_345.0, 6);
        assert_eq!(t.first(), Some(&0.0));
        assert!(t.windows(2).all(|w| (w[1] - w[0] - 2500.0).abs() < 1e-9));
        assert!(*t.last().unwrap() <= 12_345.0);
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(fmt_tick(0.6000000000000001), "0.6");
        assert_eq!(fmt_tick(25_000.0), "25k");
        assert_eq!(fmt_tick(5_000.0), "5k");
        assert_eq!(fmt_tick(500.0), "500");
        assert_eq!(fmt_tick(1_500_000.0), "1.5M");
        assert_eq!(fmt_tick(-0.0), "0");
    }

    #[test]
    fn colors_span_the_diverging_scale() {
        assert_eq!(credit_color(-1.0), "#2166ac");
        assert_eq!(credit_color(0.0), "#f7f7f7");
        assert_eq!(credit_color(1.0), "#b2182b");
        assert_eq!(credit_color(7.0), credit_color(1.0));
    }

    #[test]
    fn fences_outgrow_backticks_in_prompts() {
        assert_eq!(fence_for("plain"), "```");
        assert_eq!(fence_for("use ```python\ncode```"), "````");
    }

    #[test]
    fn escaping_and_markdown_cells() {
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
        assert_eq!(md_cell("a|b\nc"), "a\\|b c");
    }

    fn row(round: usize, credits: &[(&str, Option<f64>)]) -> RoundRow {
        RoundRow {
            round,
            validation: 0.5,
            incumbent_block: Some(0.4),
            best_candidate_block: None,
            configs: 1,
            task_tokens: 10,
            meta_tokens: 20,
            cum_task_tokens: 10 * round as u64,
            cum_meta_tokens: 20 * round as u64,
            attribution_failures: 0,
            rejections: 0,
            mean_credit: credits
                .iter()
                .map(|(a, m)| (a.to_string(), (*m, usize::from(m.is_some()))))
                .collect(),
        }
    }

    #[test]
    fn heatmap_has_one_cell_per_agent_and_round_and_marks_missing() {
        let agents: Vec<String> = ["planner", "a_very_long_agent_name_for_layout", "x&y"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let rows: Vec<RoundRow> = (1..=30)
            .map(|r| {
                let v = (r as f64 / 15.0) - 1.0;
                row(
                    r,
                    &[
                        ("planner", Some(v)),
                        ("a_very_long_agent_name_for_layout", Some(-v)),
                        ("x&y", if r % 7 == 0 { None } else { Some(0.1) }),
                    ],
                )
            })
            .collect();
        let svg = credit_heatmap(&agents, &rows);
        if let Ok(p) = std::env::var("CANTANTE_REPORT_DUMP") {
            let _ = std::fs::write(p, &svg);
        }
        assert_eq!(svg.matches("class=\"cell\"").count(), 90);
        assert_eq!(svg.matches("no credits</title>").count(), 4);
        assert!(svg.contains(">x&amp;y<") && !svg.contains(">x&y<"));
        assert!(svg.contains("round 30: mean credit 1.000"));
        // Round labels are thinned out (every 2nd of 30 rounds); the last one
        // is left out here because it would touch the label of round 29.
        assert!(svg.contains(">29</text>") && !svg.contains(">28</text>"));
        assert!(!svg.contains(">30</text>"));
    }

    #[test]
    fn line_chart_handles_single_points_and_nan() {
        let svg = line_chart(
            "t",
            "round",
            "score",
            &[Series {
                name: "s",
                color: "black",
                dashed: false,
                points: vec![(1.0, f64::NAN), (2.0, 0.5)],
            }],
            true,
        );
        assert_eq!(svg.matches("class=\"point\"").count(), 1);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert!(!svg.contains("class=\"series\""), "one point draws no line");
    }
}
