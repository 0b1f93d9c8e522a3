//! `cantante serve` and the OpenAI-compatible backend, on a tiny model over
//! loopback: HTTP answers equal the in-process engine's, concurrent clients
//! share batches, bad requests get OpenAI-shaped 400s while the server keeps
//! serving, and a flaky server is survived by retries.

use cantante::llm::engine::{CandleLlm, EngineOptions};
use cantante::llm::remote::{OpenAiLlm, RemoteOptions};
use cantante::llm::tiny::{write_tiny_gguf, TinySpec};
use cantante::llm::{Llm, Request, Sampling};
use cantante::serve::{serve, ServeOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

fn engine(p: &std::path::Path) -> CandleLlm {
    CandleLlm::load(
        p.to_str().unwrap(),
        EngineOptions {
            max_batch: 16,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Raw HTTP call: (status, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    auth: Option<&str>,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = auth
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn serve_answers_like_the_engine_batches_clients_and_rejects_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_gguf(&p, TinySpec::default()).unwrap();
    let local = engine(&p);
    let served = engine(&p);
    let stop = AtomicBool::new(false);
    let opts = ServeOptions {
        port: 0,
        model_name: "tiny".into(),
        api_key: Some("sekret".into()),
        ..ServeOptions::default()
    };
    let (atx, arx) = mpsc::channel();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve(&served, &opts, &stop, move |a| atx.send(a).unwrap()));
        let addr: SocketAddr = arx.recv().unwrap();
        std::env::set_var("CANTANTE_TEST_KEY", "sekret");
        let remote = OpenAiLlm::connect(RemoteOptions {
            api_key_env: Some("CANTANTE_TEST_KEY".into()),
            tokenizer: Some(p.clone()),
            ..RemoteOptions::new(format!("http://{addr}/v1"))
        })
        .unwrap();
        assert!(remote.model_id().contains("tiny"));
        // 16 requests, greedy and seeded sampling, stop strings: same answers.
        let reqs: Vec<Request> = (0..16)
            .map(|i| {
                let r = Request::chat(
                    "Be brief.",
                    &format!("Item {i}: {}", "words ".repeat(i)),
                    4 + i % 5,
                );
                if i % 2 == 0 {
                    r
                } else {
                    r.with_sampling(Sampling::temperature(0.9))
                        .with_seed(u64::MAX - i as u64)
                }
            })
            .collect();
        let want = local.generate(&reqs).unwrap();
        let before = served.stats();
        let got = remote.generate(&reqs).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.text, w.text, "request {i}");
            assert_eq!(
                (g.prompt_tokens, g.completion_tokens),
                (w.prompt_tokens, w.completion_tokens),
                "request {i}"
            );
        }
        let st = served.stats().since(&before);
        assert!(
            st.decode_rows > st.decode_steps,
            "16 concurrent clients never shared a decode step: {st:?}"
        );
        assert_eq!(
            remote.count_tokens("hello world"),
            local.count_tokens("hello world")
        );
        // Errors: OpenAI-shaped, and the server keeps serving.
        let (c, b) = http(
            addr,
            "POST",
            "/v1/chat/completions",
            "{not json",
            Some("sekret"),
        );
        assert_eq!(c, 400, "{b}");
        assert!(b.contains("\"error\"") && b.contains("invalid JSON"), "{b}");
        let (c, b) = http(
            addr,
            "POST",
            "/v1/chat/completions",
            r#"{"messages": []}"#,
            Some("sekret"),
        );
        assert_eq!(c, 400);
        assert!(b.contains("must not be empty"), "{b}");
        let (c, _) = http(
            addr,
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role":"user","content":"x"}]}"#,
            None,
        );
        assert_eq!(c, 401);
        let words: String = (0..3000).map(|i| format!("x{i} ")).collect();
        let long =
            format!(r#"{{"messages": [{{"role":"user","content":"{words}"}}], "max_tokens": 10}}"#);
        let (c, b) = http(addr, "POST", "/v1/chat/completions", &long, Some("sekret"));
        assert_eq!(c, 400, "{b}");
        assert!(b.contains("context"), "{b}");
        let (c, _) = http(addr, "GET", "/nope", "", Some("sekret"));
        assert_eq!(c, 404);
        let (c, b) = http(addr, "GET", "/health", "", None);
        assert_eq!((c, b.contains("ok")), (200, true));
        // n = 3 with one seed: three different seeds, reported.
        let (c, b) = http(
            addr,
            "POST",
            "/v1/chat/completions",
            r#"{"model": "tiny", "messages": [{"role":"user","content":"hi"}], "n": 3, "max_completion_tokens": 3, "temperature": 1.0, "seed": 5, "stream": true}"#,
            Some("sekret"),
        );
        assert_eq!(c, 200, "{b}");
        assert!(b.trim_end().ends_with("data: [DONE]"), "{b}");
        assert!(b.contains("\"seed\":5"), "{b}");
        // Still serving after all that.
        assert_eq!(remote.generate(&reqs[..2]).unwrap()[0].text, want[0].text);
        stop.store(true, Ordering::SeqCst);
        server.join().unwrap().unwrap();
    });
}

/// A server that answers /v1/models, then fails chat calls in turn with a
/// 429, a dropped connection and a 503 before answering.
#[test]
fn flaky_server_is_survived_with_retries_counted() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let chats = AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // Read the head and the body (Content-Length).
                loop {
                    let n = stream.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if let Some(h) = text.find("\r\n\r\n") {
                        let len = text[..h]
                            .lines()
                            .find_map(|l| l.to_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                            .unwrap_or(0);
                        if got.len() >= h + 4 + len {
                            break;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&got).to_string();
                let reply = |status: &str, body: &str| {
                    format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                };
                if text.starts_with("GET /v1/models") {
                    let _ = stream.write_all(reply("200 OK", r#"{"data":[{"id":"flaky"}]}"#).as_bytes());
                    continue;
                }
                if text.contains("\"quit\"") {
                    let _ = stream.write_all(reply("200 OK", "{}").as_bytes());
                    return;
                }
                let k = chats.fetch_add(1, Ordering::SeqCst);
                match k % 4 {
                    0 => {
                        let _ = stream.write_all(reply("429 Too Many Requests", r#"{"error":{"message":"slow down"}}"#).as_bytes());
                    }
                    1 => drop(stream),
                    2 => {
                        let _ = stream.write_all(reply("503 Service Unavailable", "{}").as_bytes());
                    }
                    _ => {
                        let body = r#"{"choices":[{"message":{"content":"fine"},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":1}}"#;
                        let _ = stream.write_all(reply("200 OK", body).as_bytes());
                    }
                }
            }
        });
        let remote = OpenAiLlm::connect(RemoteOptions {
            retries: 4,
            ..RemoteOptions::new(format!("http://{addr}/v1"))
        })
        .unwrap();
        let base = remote.retries_done();
        let g = remote.generate(&[Request::user("q", 3)]).unwrap();
        assert_eq!(g[0].text, "fine");
        assert_eq!(
            remote.retries_done() - base,
            3,
            "429, dropped connection, 503"
        );
        // With fewer retries than failures, the error names the request.
        let strict = OpenAiLlm::connect(RemoteOptions {
            retries: 1,
            ..RemoteOptions::new(format!("http://{addr}/v1"))
        })
        .unwrap();
        let e = strict
            .generate(&[Request::user("a", 3), Request::user("b", 3)])
            .unwrap_err();
        assert!(e.to_string().contains("request "), "{e}");
        // Stop the stand-in server.
        let _ =
            ureq::post(&format!("http://{addr}/v1/chat/completions")).send_string(r#"{"quit":1}"#);
    });
}
