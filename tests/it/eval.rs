//! `eval` end to end: on a scripted LLM whose answers make the accuracy exactly
//! known, and on the tiny model (plumbing real, accuracy meaningless).

use cantante::eval::{execute, summarize, EvalOptions};
use cantante::graph::setup::Validation;
use cantante::graph::Setup;
use cantante::llm::engine::{CandleLlm, EngineOptions};
use cantante::llm::tiny::{write_tiny_gguf, TinySpec};
use cantante::llm::{Llm, ScriptedLlm};
use cantante::task::{load_task, Split};
use std::collections::HashMap;
use std::path::PathBuf;

fn data() -> PathBuf {
    crate::data_dir()
}

fn setup_for(task: &dyn cantante::task::Task, name: &str) -> Setup {
    let rules = Validation::new(&task.provided_vars(), &task.tool_names());
    Setup::load_validated(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("configs")
            .join(name),
        &rules,
    )
    .unwrap()
}

#[test]
fn gsm8k_eval_on_scripted_llm_has_known_accuracy() {
    let task = load_task("gsm8k", Some(&data())).unwrap();
    let setup = setup_for(task.as_ref(), "gsm8k.yaml");
    let examples = task.load(Split::Test, Some(10), 3).unwrap();
    // Questions 0, 2, 4, ... are answered correctly, the others wrongly.
    let answers: HashMap<String, String> = examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            (
                e.query.clone(),
                if i % 2 == 0 {
                    e.target.clone()
                } else {
                    format!("{}1", e.target)
                },
            )
        })
        .collect();
    let llm = ScriptedLlm::new(move |r| {
        let text: String = r.messages.iter().map(|m| m.content.as_str()).collect();
        let ans = answers
            .iter()
            .find(|(q, _)| text.contains(q.as_str()))
            .map(|(_, a)| a.clone())
            .unwrap_or_default();
        let mut s = String::new();
        for k in 1..=3 {
            s += &format!(
                "<proposal_{k}>{ans}</proposal_{k}><justification_{k}>because</justification_{k}>"
            );
        }
        s + &format!("<prediction>{ans}</prediction>")
    });
    let config = setup.pool_config(0);
    let runs = execute(
        &llm,
        &setup,
        task.as_ref(),
        &[config],
        &examples,
        &EvalOptions::default(),
        None,
    )
    .unwrap();
    let s = summarize(&runs[0]);
    assert_eq!(s.n, 10);
    assert!((s.accuracy - 0.5).abs() < 1e-9, "accuracy {}", s.accuracy);
    assert!(
        s.format_failure_rate.values().all(|&r| r == 0.0),
        "{:?}",
        s.format_failure_rate
    );
    assert!(s.mean_input_tokens > 0.0 && s.mean_output_tokens > 0.0);
    // 4 agents per run, all runs batched per super-step: 2 batches in total.
    assert_eq!(llm.batches(), 2);
    assert_eq!(llm.calls(), 40);
}

/// The tiny model (in a temp dir that must outlive it), the GSM8K task and
/// setup, and `n` test examples.
fn tiny_gsm8k(
    n: usize,
) -> (
    tempfile::TempDir,
    CandleLlm,
    Box<dyn cantante::task::Task>,
    Setup,
    Vec<cantante::task::Example>,
) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_gguf(&p, TinySpec::default()).unwrap();
    let llm = CandleLlm::load(p.to_str().unwrap(), EngineOptions::default()).unwrap();
    let task = load_task("gsm8k", Some(&data())).unwrap();
    let setup = setup_for(task.as_ref(), "gsm8k.yaml");
    let examples = task.load(Split::Test, Some(n), 1).unwrap();
    (dir, llm, task, setup, examples)
}

#[test]
fn gsm8k_eval_on_tiny_model_runs_end_to_end() {
    let (_dir, llm, task, setup, examples) = tiny_gsm8k(3);
    let mut opts = EvalOptions::default();
    opts.run.max_new_tokens = 8;
    let runs = execute(
        &llm,
        &setup,
        task.as_ref(),
        &[setup.pool_config(0), setup.pool_config(1)],
        &examples,
        &opts,
        None,
    )
    .unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs.iter().flatten() {
        assert_eq!(r.result.calls.len(), 4);
        assert!(r.result.output_tokens > 0 && r.result.output_tokens <= 4 * 8);
        // Noise never contains the tags: every call is a recorded format failure.
        assert!(r.result.calls.iter().all(|c| !c.format_failures.is_empty()));
        assert_eq!(r.score, 0.0);
    }
    assert!(llm.count_tokens("hello world") > 0);
}

#[test]
fn configurations_meet_a_query_with_common_random_numbers() {
    // Sampled rollouts of two configurations that differ only in the
    // consensus prompt: the executors (same prompts, same inputs) write the
    // same replies under both, so a score difference is the consensus's.
    let (_dir, llm, task, setup, examples) = tiny_gsm8k(2);
    let mut opts = EvalOptions::default();
    opts.run.max_new_tokens = 12;
    // Free sampling (no tags forced), so every reply draws random numbers.
    opts.run.tag_guard = false;
    assert!(!opts.run.sampling.is_greedy());
    let a = setup.pool_config(0);
    let mut b = a.clone();
    b.get_mut("consensus_agent")
        .unwrap()
        .push_str("\nBe brief.");
    let runs = execute(&llm, &setup, task.as_ref(), &[a, b], &examples, &opts, None).unwrap();
    for q in 0..examples.len() {
        let (ra, rb) = (&runs[0][q].result, &runs[1][q].result);
        let reply = |r: &cantante::graph::RunResult, agent: &str| {
            r.calls
                .iter()
                .find(|c| c.agent == agent)
                .unwrap()
                .reply
                .clone()
        };
        for e in ["executor_1", "executor_2", "executor_3"] {
            assert_eq!(reply(ra, e), reply(rb, e), "query {q}, {e}");
        }
        assert_ne!(
            reply(ra, "consensus_agent"),
            reply(rb, "consensus_agent"),
            "query {q}: the changed agent's prompt changes its reply"
        );
    }
    // Different queries still get different random numbers.
    assert_ne!(
        cantante::eval::rollout_seed(7, &examples[0].id),
        cantante::eval::rollout_seed(7, &examples[1].id)
    );
}
