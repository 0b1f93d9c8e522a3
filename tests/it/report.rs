//! `report::write_report` on a real run directory produced by a 2-round
//! optimization with a fake executor and scripted LLMs (the fixture of
//! `optimize.rs`): the score depends on the word "CAREFULLY" in the
//! solver prompt, the attributer credits the solver by its output and the
//! checker a flat 0.3.

use crate::optimize::{attributer_llm, meta_llm, read_records, FakeExecutor};
use cantante::optimize::{optimize, OptimizeConfig, RunHooks};
use cantante::report::{write_report, ReportError};
use std::path::Path;

/// Run a 2-round optimization into `dir`.
fn run_optimization(dir: &Path) -> cantante::optimize::OptimizeResult {
    let config = OptimizeConfig {
        seed: 11,
        rounds: 2,
        block_size: 6,
        max_blocks: 2,
        design: cantante::optimize::Design::Joint,
        attributer: cantante::optimize::AttributerKind::Llm,
        ..Default::default()
    };
    let exec = FakeExecutor::new();
    let (meta, att) = (meta_llm(), attributer_llm());
    optimize(&exec, &meta, &att, &config, dir, RunHooks::default()).unwrap()
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

fn assert_svg(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let head = text.trim_start();
    assert!(
        head.starts_with("<svg") || head.starts_with("<?xml"),
        "{}",
        path.display()
    );
    assert!(text.trim_end().ends_with("</svg>"), "{}", path.display());
    // Every opened element is closed or self-closing (a cheap well-formedness check).
    for tag in [
        "svg",
        "text",
        "title",
        "circle",
        "rect",
        "defs",
        "linearGradient",
    ] {
        let opened = count(&text, &format!("<{tag} ")) + count(&text, &format!("<{tag}>"));
        let closed = count(&text, &format!("</{tag}>"));
        let self_closed = text
            .split(&format!("<{tag} "))
            .skip(1)
            .filter(|rest| rest.split('>').next().is_some_and(|t| t.ends_with('/')))
            .count();
        assert_eq!(
            opened,
            closed + self_closed,
            "<{tag}> in {}",
            path.display()
        );
    }
    text
}

#[test]
fn report_of_a_two_round_run() {
    let dir = tempfile::tempdir().unwrap();
    let res = run_optimization(dir.path());
    let recs = read_records(dir.path());
    assert_eq!(recs.len(), 2);

    let paths = write_report(dir.path(), None).unwrap();
    for p in paths.all() {
        assert!(p.starts_with(dir.path()) && p.exists(), "{}", p.display());
    }
    let md = std::fs::read_to_string(&paths.markdown).unwrap();

    // Summary.
    assert!(md.contains("Rounds completed: 2 of 2"), "{md}");
    assert!(md.contains("completed all configured rounds"));
    assert!(md.contains(&format!(
        "{:.3} (initial) → {:.3} (best, after round {})",
        res.initial_score, res.best_score, res.best_round
    )));
    // One table row per round with its validation score, block scores and tokens.
    for rec in &recs {
        let best_cand = rec.block_scores[1..]
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let row = format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} |",
            rec.round,
            rec.validation_score,
            rec.validation_p
                .expect("per-item validation scores give a p-value"),
            rec.block_scores[0],
            best_cand,
            rec.configs.len(),
            rec.task_tokens,
            rec.meta_tokens,
            rec.attribution_failures
        );
        assert!(md.contains(&row), "missing row {row}\n{md}");
    }
    // Candidates against the incumbent, query by query, per changed agent.
    let outcomes = cantante::optimize::analysis::candidate_outcomes(&recs);
    assert!(!outcomes.is_empty());
    assert!(md.contains("### Candidates against the incumbent"), "{md}");
    for (agent, o) in &outcomes {
        let row = format!(
            "| {agent} | {} | {} | {} | {} |",
            o.configs, o.won, o.lost, o.tied
        );
        assert!(md.contains(&row), "missing {row}\n{md}");
    }
    let total: usize = outcomes.values().map(|o| o.won + o.lost + o.tied).sum();
    let expected: usize = recs
        .iter()
        .map(|r| r.scores[0].len() * r.changed.iter().skip(1).filter(|c| !c.is_empty()).count())
        .sum();
    assert!(expected > 0);
    assert_eq!(total, expected, "every candidate query is counted once");
    // Agents with statistics and the §9.5 correlation: the solver's credit tracks
    // the score, the checker's is constant so its ρ is undefined.
    let corr = cantante::optimize::analysis::credit_correlation(&recs);
    let (rho, n) = corr["solver"];
    let solver = &res.agent_credits["solver"];
    let solver_line = format!(
        "| solver | {:.3} | {:.3} | {} | {:+.3} | {} |",
        solver.mean,
        solver.std,
        solver.n,
        rho.unwrap(),
        n
    );
    assert!(md.contains(&solver_line), "missing {solver_line}\n{md}");
    assert!(rho.unwrap() > 0.5);
    assert!(md.contains("| checker | 0.300 | 0.000 |"), "{md}");
    assert!(md.contains("n/a (fewer than 3 configs or constant)"));
    assert!(md.contains("Spearman"));
    // Best prompts in fenced blocks, images linked relatively.
    for (agent, prompt) in &res.best_prompts {
        assert!(md.contains(&format!("### {agent}\n\n```text\n{prompt}\n```")));
    }
    for img in ["scores.svg", "credits.svg", "tokens.svg"] {
        assert!(md.contains(&format!("]({img})")), "{img}");
    }

    if let Ok(keep) = std::env::var("CANTANTE_REPORT_KEEP") {
        std::fs::create_dir_all(&keep).unwrap();
        for p in paths.all() {
            std::fs::copy(p, Path::new(&keep).join(p.file_name().unwrap())).unwrap();
        }
    }
    // Score chart: 3 initial+rounds validation points, 2 incumbent, 2 best candidate.
    let scores = assert_svg(&paths.scores_svg);
    assert_eq!(count(&scores, "<circle"), 3 + 2 + 2);
    assert!(has_text(&scores, "round") && has_text(&scores, "validation (combined best)"));
    // Heatmap: one cell per agent and round (the checker's constant 0.3 in
    // both rounds), agent labels, colour bar -1..1.
    let heat = assert_svg(&paths.credits_svg);
    let c = cantante::report::charts::credit_color(0.3);
    let checker_fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
    assert_eq!(count(&heat, &checker_fill), 2, "{heat}");
    assert!(has_text(&heat, "solver") && has_text(&heat, "checker"));
    assert!(has_text(&heat, "-1") && has_text(&heat, "1") && has_text(&heat, "credit"));
    assert!(has_text(&heat, "0.30"), "cell values are written");
    // Tokens: cumulative task and meta at round 0 (initial validation) and per round.
    let tokens = assert_svg(&paths.tokens_svg);
    assert_eq!(count(&tokens, "<circle"), 2 * 3);
    assert!(has_text(&tokens, "task (rollouts, validation)"));
    assert!(has_text(&tokens, "meta (attribution, rewriting)"));
}

/// Whether the SVG holds a text element with exactly `t` (plotters writes
/// the text on its own line).
fn has_text(svg: &str, t: &str) -> bool {
    svg.contains(&format!(">\n{t}\n</text>"))
}

#[test]
fn report_into_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    run_optimization(dir.path());
    let out = dir.path().join("nested/out");
    let paths = write_report(dir.path(), Some(&out)).unwrap();
    for p in paths.all() {
        assert!(p.starts_with(&out) && p.exists(), "{}", p.display());
    }
    assert!(!dir.path().join("report.md").exists());
}

#[test]
fn report_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = write_report(dir.path(), None).unwrap_err();
    assert!(matches!(err, ReportError::Missing { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");

    let missing = dir.path().join("nope");
    let err = write_report(&missing, None).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");

    // A run with a config but no completed round.
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let err = write_report(dir.path(), None).unwrap_err();
    assert!(err.to_string().contains("rounds.jsonl"), "{err}");
    std::fs::write(dir.path().join("rounds.jsonl"), "").unwrap();
    let err = write_report(dir.path(), None).unwrap_err();
    assert!(matches!(err, ReportError::NoRounds { .. }), "{err:?}");
    assert!(err.to_string().contains("no completed rounds"), "{err}");

    // Malformed line: the error names the file and the line.
    std::fs::write(dir.path().join("rounds.jsonl"), "{not json}\n").unwrap();
    let err = write_report(dir.path(), None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("rounds.jsonl") && msg.contains("line 1"),
        "{msg}"
    );
    assert!(!dir.path().join("report.md").exists());
}

#[test]
fn unfinished_run_is_reported_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let res = run_optimization(dir.path());
    let finished =
        std::fs::read_to_string(write_report(dir.path(), None).unwrap().markdown).unwrap();
    // A summary.json older than rounds.jsonl (a resumed run still going) is ignored.
    let path = dir.path().join("summary.json");
    let mut summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    summary["rounds_completed"] = 1.into();
    summary["best_score"] = (-1.0).into();
    std::fs::write(&path, summary.to_string()).unwrap();
    let md = std::fs::read_to_string(write_report(dir.path(), None).unwrap().markdown).unwrap();
    assert!(
        md.contains("Stop reason: none yet") && !md.contains("-1.000"),
        "{md}"
    );
    // A killed run has no summary.json: the figures come from checkpoint.yaml.
    std::fs::remove_file(dir.path().join("summary.json")).unwrap();
    let md = std::fs::read_to_string(write_report(dir.path(), None).unwrap().markdown).unwrap();
    assert!(md.contains("Stop reason: none yet"), "{md}");
    assert!(md.contains(&format!(
        "→ {:.3} (best, after round {})",
        res.best_score, res.best_round
    )));
    // Everything but the stop reason is the same as from summary.json.
    let strip = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with("- Stop reason"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&md), strip(&finished));
    // Without either file the error names summary.json.
    std::fs::remove_file(dir.path().join("checkpoint.yaml")).unwrap();
    let err = write_report(dir.path(), None).unwrap_err();
    assert!(matches!(err, ReportError::Missing { .. }), "{err:?}");
    assert!(err.to_string().contains("summary.json"), "{err}");
}
