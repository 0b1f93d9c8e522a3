//! `cantante bench-run` end to end on a tiny generated model: one seed of
//! GSM8K through initial eval, CANTANTE, the identity ablation and both test
//! evals, the results table, then a re-run that skips every finished part.

use cantante::llm::tiny::{write_tiny_gguf, TinySpec};
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cantante"));
    c.env("CANTANTE_DATA", crate::data_dir());
    c
}

const PROTOCOL: &str = "\
description: tiny test protocol
dev_size: 4
val_size: 2
test_size: 2
max_new_tokens: 6
field_cap: 32
temperature: 0.7
identity_rounds: 1
optimizer:
  rounds: 1
  block_size: 2
  meta_max_new_tokens: 12
  attribution_max_new_tokens: 12
";

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .modified()
        .unwrap()
}

#[test]
fn bench_run_end_to_end_and_resume_skips_finished_parts() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny.gguf");
    write_tiny_gguf(&model, TinySpec::default()).unwrap();
    let proto = d.path().join("tiny-proto.yaml");
    std::fs::write(&proto, PROTOCOL).unwrap();
    let out = d.path().join("bench");
    let setups = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs");
    let args = [
        "bench-run",
        "--task",
        "gsm8k",
        "--protocol",
        proto.to_str().unwrap(),
        "--seeds",
        "5",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--setups",
        setups.to_str().unwrap(),
    ];
    let o = bin().args(args).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stdout}\n{stderr}");
    let seed = out.join("gsm8k/seed5");
    let parts = [
        "initial_test.json",
        "cantante/summary.json",
        "cantante/rounds.jsonl",
        "cantante/timing.json",
        "cantante_test.json",
        "identity/summary.json",
        "identity_test.json",
        "identity_test_traces.jsonl",
    ];
    for f in parts {
        assert!(seed.join(f).is_file(), "{f} missing\n{stdout}");
    }
    // The identity run used the identity attributer under the CANTANTE run's token spend.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(seed.join("identity/config.json")).unwrap())
            .unwrap();
    let can: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(seed.join("cantante/summary.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["identity_attribution"], true);
    let t = &can["tokens"];
    let total: u64 = [
        "task_input",
        "task_output",
        "validation",
        "attribution_input",
        "attribution_output",
        "rewrite_input",
        "rewrite_output",
    ]
    .iter()
    .map(|k| t[*k].as_u64().unwrap())
    .sum();
    assert_eq!(cfg["max_total_tokens"].as_u64(), Some(total));
    // Tables: all three methods, one seed each.
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    for row in [
        "| gsm8k | Initial | 1 | 5 |",
        "| gsm8k | CANTANTE | 1 | 5 |",
        "| gsm8k | Identity attribution (equal budget) | 1 | 5 |",
    ] {
        assert!(md.contains(row), "missing `{row}` in\n{md}");
    }
    assert!(md.contains("82.33 ± 4.35"), "{md}");
    let js: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let methods: Vec<&str> = js["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["initial", "cantante", "identity"]);
    assert_eq!(js["rows"][1]["rounds"]["mean"], 1.0);
    assert!(js["machines"][0]["cores"].as_u64().unwrap() >= 1);
    assert!(
        js["machines"][0]["model"]
            .as_str()
            .unwrap()
            .contains("tiny"),
        "{js}"
    );
    // The protocol's numbers travel with the results.
    let st = &js["settings"];
    assert_eq!(st["test_size"], 2, "{js}");
    assert_eq!(st["max_new_tokens"], 6);
    assert_eq!(st["optimizer"]["rounds"], 1);
    assert!(
        md.contains("Settings: 2 test items per seed, dev 4, validation 2; rounds: 1 ("),
        "{md}"
    );

    // A method whose best prompts are the initial ones reuses the initial
    // test evaluation instead of re-running it.
    let rec = |m: &str| -> serde_json::Value {
        let p = seed.join(format!("{m}_test.json"));
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
    };
    let init = rec("initial");
    assert!(init.get("reused_from").is_none());
    for m in ["cantante", "identity"] {
        let r = rec(m);
        if r["config_id"] == init["config_id"] {
            assert_eq!(r["reused_from"], "initial", "{m}");
            assert_eq!(r["summary"], init["summary"], "{m}");
            assert!(
                md.contains(&format!(
                    "seed 5: the {}",
                    if m == "cantante" {
                        "CANTANTE"
                    } else {
                        "Identity"
                    }
                )),
                "{md}"
            );
        } else {
            assert!(r.get("reused_from").is_none(), "{m}");
        }
    }

    // Re-run: nothing is recomputed, the model is not even loaded.
    let before: Vec<_> = parts.iter().map(|f| mtime(&seed.join(f))).collect();
    let o = bin().args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("skipped gsm8k seed 5: every part is finished"),
        "{stdout}"
    );
    let after: Vec<_> = parts.iter().map(|f| mtime(&seed.join(f))).collect();
    assert_eq!(before, after);

    // Remove the identity test and interrupt-mark the identity run: only those are redone.
    std::fs::remove_file(seed.join("identity_test.json")).unwrap();
    let o = bin().args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("skipped gsm8k seed 5 initial test"),
        "{stdout}"
    );
    assert!(
        stdout.contains("skipped gsm8k seed 5 cantante:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("skipped gsm8k seed 5 identity:"),
        "{stdout}"
    );
    assert!(seed.join("identity_test.json").is_file());
    assert_eq!(mtime(&seed.join("cantante_test.json")), before[4]);

    // Evaluating the initial prompts again in a new process reproduces the
    // record exactly (what makes reusing an evaluation sound).
    for m in ["initial", "cantante", "identity"] {
        std::fs::remove_file(seed.join(format!("{m}_test.json"))).unwrap();
    }
    let o = bin().args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let strip = |mut v: serde_json::Value| {
        v["summary"]["wall_secs"] = serde_json::Value::Null;
        v
    };
    assert_eq!(strip(rec("initial")), strip(init.clone()));

    // Another protocol into the same directory is refused.
    let mut other = args.map(String::from).to_vec();
    other[4] = "cpu-small".into();
    let o = bin().args(&other).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("protocol.json"),
        "{err}"
    );

    // An edited setup (another initial prompt) into the same directory is
    // refused before any work; a comment-only edit is not a change.
    let edited = d.path().join("setups");
    std::fs::create_dir_all(&edited).unwrap();
    let text = std::fs::read_to_string(setups.join("gsm8k.yaml")).unwrap();
    let with_args = |dir: &Path| {
        let mut v = args.map(String::from).to_vec();
        v[12] = dir.to_str().unwrap().into();
        v
    };
    std::fs::write(
        edited.join("gsm8k.yaml"),
        format!("# a new comment\n{text}"),
    )
    .unwrap();
    let o = bin().args(with_args(&edited)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(
        edited.join("gsm8k.yaml"),
        text.replacen(
            "Solve this math word problem.",
            "Solve this word problem.",
            1,
        ),
    )
    .unwrap();
    let o = bin().args(with_args(&edited)).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("setup.json") && err.contains("new --out"),
        "{err}"
    );
}

#[test]
fn bench_run_with_a_separate_meta_model() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny.gguf");
    write_tiny_gguf(&model, TinySpec::default()).unwrap();
    let proto = d.path().join("tiny-proto.yaml");
    std::fs::write(&proto, PROTOCOL).unwrap();
    let setups = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs");
    let run = |meta: &Path, out: &Path| {
        bin()
            .args(["bench-run", "--task", "gsm8k", "--seeds", "3", "--protocol"])
            .arg(&proto)
            .arg("--model")
            .arg(&model)
            .arg("--meta-model")
            .arg(meta)
            .arg("--out")
            .arg(out)
            .arg("--setups")
            .arg(&setups)
            .output()
            .unwrap()
    };
    // A missing meta model fails before any work, naming the file.
    let missing = d.path().join("no-such-meta.gguf");
    let o = run(&missing, &d.path().join("b0"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no-such-meta.gguf"),
        "{err}"
    );
    assert!(!d.path().join("b0/gsm8k/seed3/initial_test.json").exists());
    // A second (differently seeded) tiny model as attributer and rewriter.
    let meta = d.path().join("meta.gguf");
    write_tiny_gguf(
        &meta,
        TinySpec {
            seed: 99,
            ..TinySpec::default()
        },
    )
    .unwrap();
    let out = d.path().join("b1");
    let o = run(&meta, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("attributer and rewriter: "), "{md}");
    assert!(md.contains("| gsm8k | CANTANTE | 1 | 3 |"), "{md}");
}
