//! The `cantante` binary end to end on a tiny generated model: generate, eval,
//! optimize (one round) + resume refusal, and one-line errors naming the file.

use cantante::llm::tiny::{write_tiny_gguf, TinySpec};
use std::path::PathBuf;
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cantante"));
    c.env("CANTANTE_DATA", crate::data_dir());
    c
}

fn tiny() -> (tempfile::TempDir, String) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("tiny.gguf");
    write_tiny_gguf(&p, TinySpec::default()).unwrap();
    let s = p.display().to_string();
    (d, s)
}

fn run(c: &mut Command) -> (bool, String, String) {
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn generate_prints_completions_and_throughput() {
    let (d, model) = tiny();
    let (ok, out, err) = run(bin().args([
        "generate",
        "--model",
        &model,
        "--prompt",
        "hello",
        "--max-tokens",
        "5",
        "--n",
        "3",
        "--temperature",
        "0.8",
    ]));
    assert!(ok, "{err}");
    assert_eq!(out.matches("--- [").count(), 3, "{out}");
    assert!(err.contains("tok/s"), "{err}");
    let jl = d.path().join("p.jsonl");
    std::fs::write(&jl, "{\"prompt\": \"a\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"b\"}], \"max_tokens\": 3}\n").unwrap();
    let (ok, out, err) = run(bin().args([
        "generate",
        "--model",
        &model,
        "--prompts",
        jl.to_str().unwrap(),
        "--json",
    ]));
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2);
    std::fs::write(&jl, "{\"nope\": 1}\n").unwrap();
    let (ok, _, err) = run(bin().args([
        "generate",
        "--model",
        &model,
        "--prompts",
        jl.to_str().unwrap(),
    ]));
    assert!(!ok);
    assert!(
        err.starts_with("error:") && err.contains("p.jsonl") && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn bad_model_path_is_one_clear_error() {
    let (ok, _, err) = run(bin().args([
        "generate",
        "--model",
        "/no/such/model.gguf",
        "--prompt",
        "x",
    ]));
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/no/such/model.gguf"), "{err}");
}

#[test]
fn eval_and_optimize_on_tiny_model() {
    let (d, model) = tiny();
    let setup = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/gsm8k.yaml");
    let out = d.path().join("eval");
    let (ok, stdout, err) = run(bin().args([
        "eval",
        "--setup",
        setup.to_str().unwrap(),
        "--model",
        &model,
        "--limit",
        "2",
        "--max-tokens",
        "6",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(ok, "{err}");
    assert!(stdout.contains("accuracy: 0.000 (0 / 2)"), "{stdout}");
    assert!(
        stdout.contains("format failures consensus_agent: 100.0%"),
        "{stdout}"
    );
    // 6-token replies of a random model are cut off: the eval says so.
    assert!(
        stdout.contains("replies hit --max-tokens 6; raise it"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("traces.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    let run_dir = d.path().join("opt");
    let cfg = d.path().join("opt.yaml");
    std::fs::write(
        &cfg,
        "rounds: 1\nblock_size: 2\nmeta_max_new_tokens: 12\nattribution_max_new_tokens: 12\nvalidation_alpha: 0.1\nsticky_incumbent: true\n",
    )
    .unwrap();
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "optimize",
            "--setup",
            setup.to_str().unwrap(),
            "--model",
            &model,
            "--config",
            cfg.to_str().unwrap(),
            "--max-tokens",
            "6",
            "--dev-size",
            "4",
            "--val-size",
            "2",
            "--seed",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let (ok, stdout, err) = run(bin().args(args(&["--dry-run"])));
    assert!(ok, "{err}");
    assert!(stdout.contains("rollouts per round"), "{stdout}");
    let (ok, stdout, err) = run(bin().args(args(&["--out", run_dir.to_str().unwrap()])));
    assert!(ok, "{err}");
    assert!(stdout.contains("rounds completed: 1"), "{stdout}");
    // The round line gives the validation's sign test against the best before
    // it (a random model solves nothing: no item won, p = 1).
    assert!(
        err.contains("round 1: validation 0.000 (p 1.000 vs the best before)"),
        "{err}"
    );
    for f in [
        "config.json",
        "rounds.jsonl",
        "best_prompts.yaml",
        "summary.json",
        "checkpoint.yaml",
    ] {
        assert!(run_dir.join(f).is_file(), "{f} missing");
    }
    // The best prompt set is loadable by eval.
    let (ok, _, err) = run(bin().args([
        "eval",
        "--setup",
        setup.to_str().unwrap(),
        "--model",
        &model,
        "--limit",
        "1",
        "--max-tokens",
        "4",
        "--prompts",
        run_dir.join("best_prompts.yaml").to_str().unwrap(),
    ]));
    assert!(ok, "{err}");
    // A second run into the same dir is refused (resume it instead).
    let (ok, _, err) = run(bin().args(args(&["--out", run_dir.to_str().unwrap()])));
    assert!(!ok && err.contains("resume"), "{err}");
}
