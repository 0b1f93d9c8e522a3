//! Task loading through the public API, against the shared datasets.

use cantante::task::{load_task, Split, TaskError};
use std::path::{Path, PathBuf};

fn data_dir() -> PathBuf {
    let dir = match std::env::var_os("CANTANTE_DATA") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets"),
    };
    assert!(
        dir.join("gsm8k/test.jsonl").is_file(),
        "test data not found in {}: set CANTANTE_DATA (see datasets/README.md)",
        dir.display()
    );
    dir
}

#[test]
fn missing_data_gives_a_helpful_error() {
    let d = tempfile::tempdir().unwrap();
    for name in ["gsm8k", "mbpp"] {
        let err = load_task(name, Some(d.path())).err().expect("must fail");
        assert!(matches!(err, TaskError::Missing { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("datasets/README.md") && msg.contains(".jsonl"),
            "{msg}"
        );
    }
}

#[test]
fn gsm8k_through_the_trait() {
    let t = load_task("gsm8k", Some(&data_dir())).unwrap();
    assert_eq!(t.name(), "gsm8k");
    let dev = t.load(Split::Dev, Some(5), 42).unwrap();
    assert_eq!(dev.len(), 5);
    assert!(t.tool_env(&dev[0]).is_none());
    assert!(t.initial_state(&dev[0]).is_empty());
    let ex = &dev[0];
    assert_eq!(
        t.score(ex, &format!("The answer is {}.", ex.target), None),
        1.0
    );
    assert_eq!(t.score(ex, "The answer is 123456789.", None), 0.0);
}

#[test]
fn mbpp_through_the_trait() {
    let t = load_task("MBPP", Some(&data_dir())).unwrap();
    assert_eq!(t.name(), "mbpp");
    let test = t.load(Split::Test, Some(3), 7).unwrap();
    assert_eq!(test.len(), 3);
    let ex = &test[0];
    let mut env = t.tool_env(ex).unwrap();
    assert_eq!(env.tool_names(), t.tool_names());
    env.call("write_code", &serde_json::json!({"code": ex.target}));
    let report = env.call("check_tests", &serde_json::json!({}));
    assert!(report.starts_with("Passed 3/3"), "{}: {report}", ex.id);
    assert_eq!(t.score(ex, "", Some(env.as_ref())), 1.0);
    assert_eq!(t.score(ex, "print('hi')", None), 0.0);
}
