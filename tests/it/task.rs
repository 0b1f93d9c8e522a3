//! Task loading through the public API, against the shared datasets.

use cantante::task::{load_task, Split, TaskError};
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    let dir = crate::data_dir();
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

/// `data fetch` against a mirror on 127.0.0.1 serving copies of the shared
/// data (MBPP without its final newline, as upstream has it): files are
/// fetched, verified and then kept; a corrupted copy is rejected and leaves
/// nothing behind; an unreachable mirror is an error naming URL and file.
#[test]
fn data_fetch_from_a_local_mirror_verifies_and_rejects_corrupt_copies() {
    use cantante::task::fetch::{fetch_all, Fetched};
    let shared = data_dir();
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = server.server_addr().to_ip().unwrap();
    let corrupt = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for req in server.incoming_requests() {
                let url = req.url().trim_start_matches('/').to_string();
                if url == "quit" {
                    let _ = req.respond(tiny_http::Response::from_string("bye"));
                    return;
                }
                let rel = url.trim_start_matches("good/").trim_start_matches("bad/");
                match std::fs::read(shared.join(rel)) {
                    Ok(mut b) => {
                        if rel.starts_with("mbpp") {
                            b.pop(); // upstream has no final newline
                        }
                        if url.starts_with("bad/")
                            && corrupt.load(std::sync::atomic::Ordering::SeqCst)
                        {
                            b[100] ^= 1;
                        }
                        let _ = req.respond(tiny_http::Response::from_data(b));
                    }
                    Err(_) => {
                        let _ = req.respond(tiny_http::Response::empty(404));
                    }
                }
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let good = format!("http://{addr}/good");
        let got = fetch_all(dir.path(), Some(&good)).unwrap();
        assert_eq!(got.len(), 3);
        assert!(
            got.iter().all(|f| matches!(f, Fetched::Downloaded(..))),
            "{got:?}"
        );
        cantante::task::fetch::check_all(dir.path()).unwrap();
        // Idempotent: nothing is downloaded again.
        let again = fetch_all(dir.path(), Some(&good)).unwrap();
        assert!(
            again.iter().all(|f| matches!(f, Fetched::Cached(_))),
            "{again:?}"
        );
        // A corrupted copy is rejected, naming the URL, and nothing is written.
        corrupt.store(true, std::sync::atomic::Ordering::SeqCst);
        let dir2 = tempfile::tempdir().unwrap();
        let e = fetch_all(dir2.path(), Some(&format!("http://{addr}/bad"))).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("sha256") && msg.contains("/bad/gsm8k/train.jsonl"),
            "{msg}"
        );
        assert!(!dir2.path().join("gsm8k/train.jsonl").exists());
        // A missing file on the mirror: HTTP 404 named.
        let e = fetch_all(dir2.path(), Some(&format!("http://{addr}/none"))).unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
        let _ = ureq::get(&format!("http://{addr}/quit")).call();
    });
    // Unreachable mirror: a clear download error.
    let dir3 = tempfile::tempdir().unwrap();
    let e = fetch_all(dir3.path(), Some("http://127.0.0.1:9/x")).unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot download http://127.0.0.1:9/x/gsm8k/train.jsonl"),
        "{e}"
    );
}
