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

/// Sets the server's stop flag when dropped (also while a test unwinds).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Run `f` against `cantante serve` on `served` (ephemeral loopback port);
/// the server is stopped and joined afterwards, also when `f` panics.
fn with_server<R>(served: &CandleLlm, opts: ServeOptions, f: impl FnOnce(SocketAddr) -> R) -> R {
    let stop = AtomicBool::new(false);
    let opts = ServeOptions { port: 0, ..opts };
    let (atx, arx) = mpsc::channel();
    std::thread::scope(|s| {
        let server = s.spawn(|| serve(served, &opts, &stop, move |a| atx.send(a).unwrap()));
        let addr: SocketAddr = arx.recv().unwrap();
        let out = {
            let _stop = StopOnDrop(&stop);
            f(addr)
        };
        server.join().unwrap().unwrap();
        out
    })
}

/// Server options that name the served model `tiny`.
fn tiny_options() -> ServeOptions {
    ServeOptions {
        model_name: "tiny".into(),
        ..ServeOptions::default()
    }
}

/// The tiny model written to a temp dir, loaded twice: one engine for the
/// in-process reference, one behind the server.
fn tiny_pair() -> (tempfile::TempDir, std::path::PathBuf, CandleLlm, CandleLlm) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    write_tiny_gguf(&p, TinySpec::default()).unwrap();
    let (local, served) = (engine(&p), engine(&p));
    (dir, p, local, served)
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
    let (_dir, p, local, served) = tiny_pair();
    with_server(
        &served,
        ServeOptions {
            api_key: Some("sekret".into()),
            ..tiny_options()
        },
        |addr| {
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
            let long = format!(
                r#"{{"messages": [{{"role":"user","content":"{words}"}}], "max_tokens": 10}}"#
            );
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
        },
    );
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

/// The judge attributer's label probabilities over HTTP: `cantante serve`
/// answers `logprobs`/`top_logprobs` (with `continue_final_message` for the
/// assistant prefix) from the engine, so a remote `score_choices` equals the
/// in-process one for every choice among the top 20 tokens, and gives
/// probability 0 (never a made-up score) to the others.
#[test]
fn choice_scores_over_http_equal_the_engine() {
    use cantante::llm::{ChoiceRequest, Message, NextTokenRequest};
    let (_dir, _, local, served) = tiny_pair();
    with_server(&served, tiny_options(), |addr| {
        let remote = OpenAiLlm::connect(RemoteOptions::new(format!("http://{addr}/v1"))).unwrap();
        let asks: Vec<NextTokenRequest> = ["", "Rating: ", "The answer is"]
            .iter()
            .enumerate()
            .map(|(i, prefix)| NextTokenRequest {
                messages: vec![
                    Message::system("Judge."),
                    Message::user(format!("Rate item {i} {}", "of the list ".repeat(i))),
                ],
                assistant_prefix: prefix.to_string(),
                top: 20,
            })
            .collect();
        let want = local.top_logprobs(&asks).unwrap();
        let got = remote.top_logprobs(&asks).unwrap();
        assert_eq!(got, want, "top tokens over HTTP differ from the engine's");
        // Choices: three of the top tokens and one that is not among them.
        let reqs: Vec<ChoiceRequest> = asks
            .iter()
            .zip(&want)
            .map(|(a, w)| {
                let outside = (0..200)
                    .map(|k| format!("z{k}"))
                    .find(|c| w.top.iter().all(|t| &t.token != c) && local.count_tokens(c) == 1)
                    .unwrap_or_else(|| "zzzz".into());
                let mut choices: Vec<String> = Vec::new();
                for t in &w.top {
                    if choices.len() < 3
                        && !choices.contains(&t.token)
                        && !t.token.is_empty()
                        && !t.token.contains('\u{FFFD}')
                    {
                        choices.push(t.token.clone());
                    }
                }
                choices.push(outside);
                ChoiceRequest {
                    messages: a.messages.clone(),
                    assistant_prefix: a.assistant_prefix.clone(),
                    choices,
                }
            })
            .collect();
        let remote_scores = remote.score_choices(&reqs).unwrap();
        for (r, (rs, w)) in reqs.iter().zip(remote_scores.iter().zip(&want)) {
            for (c, lp) in r.choices.iter().zip(&rs.logprobs) {
                match w.top.iter().find(|t| &t.token == c) {
                    Some(t) => assert_eq!(*lp, t.logprob, "choice {c:?}"),
                    None => {
                        assert_eq!(*lp, f64::NEG_INFINITY, "choice {c:?} is not a top token")
                    }
                }
            }
            assert!(rs.coverage > 0.0 && rs.coverage <= 1.0 + 1e-9);
        }
        // Where every choice is a single engine token among the top 20, the
        // remote scores are the engine's own.
        let single: Vec<ChoiceRequest> = reqs
            .iter()
            .map(|r| ChoiceRequest {
                choices: r.choices[..r.choices.len() - 1].to_vec(),
                ..r.clone()
            })
            .collect();
        let mut compared = 0;
        for r in &single {
            // (a top token can fail the engine's one-token-after-the-prefix check)
            if let Ok(l) = local.score_choices(std::slice::from_ref(r)) {
                assert_eq!(remote.score_choices(std::slice::from_ref(r)).unwrap(), l);
                compared += 1;
            }
        }
        assert!(compared > 0, "no request had engine-valid choices");
        // Raw prompts go through /v1/completions and equal the engine's text.
        let raw: Vec<Request> = (0..4)
            .map(|i| {
                let mut r = Request::user("", 6).with_seed(40 + i);
                if i % 2 == 1 {
                    r = r.with_sampling(Sampling::temperature(0.8));
                }
                r.messages.clear();
                r.raw_prompt = Some(format!("Once upon a time {i}"));
                r
            })
            .collect();
        let want = local.generate(&raw).unwrap();
        let got = remote.generate(&raw).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(
                (&g.text, g.prompt_tokens, g.completion_tokens),
                (&w.text, w.prompt_tokens, w.completion_tokens)
            );
        }
        let (c, b) = http(
            addr,
            "POST",
            "/v1/completions",
            r#"{"prompt": ["Once upon a time 0"], "max_tokens": 6, "temperature": 0}"#,
            None,
        );
        assert_eq!(c, 200, "{b}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(
            v["choices"][0]["text"].as_str(),
            Some(want[0].text.as_str())
        );
        for (body, needle) in [
            (r#"{"prompt": "x", "echo": true}"#, "`echo`"),
            (r#"{"prompt": ""}"#, "non-empty"),
            (r#"{"prompt": ["a", "b"]}"#, "exactly one"),
            (
                r#"{"messages": [{"role":"user","content":"x"}]}"#,
                "chat/completions",
            ),
            (r#"{"prompt": "x", "max_tokens": -3}"#, "max_tokens"),
        ] {
            let (c, b) = http(addr, "POST", "/v1/completions", body, None);
            assert_eq!(c, 400, "{body}: {b}");
            assert!(b.contains(needle), "{needle}: {b}");
        }
        // Malformed logprobs requests are 400s naming the problem.
        for (body, needle) in [
            (
                r#"{"messages": [{"role":"user","content":"x"}], "logprobs": true, "max_tokens": 5}"#,
                "next token only",
            ),
            (
                r#"{"messages": [{"role":"user","content":"x"}], "logprobs": true, "max_tokens": 1, "top_logprobs": 99}"#,
                "0..=20",
            ),
            (
                r#"{"messages": [{"role":"user","content":"x"}], "continue_final_message": true, "max_tokens": 1}"#,
                "together with",
            ),
            (
                r#"{"messages": [{"role":"user","content":"x"}], "logprobs": true, "max_tokens": 1, "continue_final_message": true}"#,
                "final assistant message",
            ),
        ] {
            let (c, b) = http(addr, "POST", "/v1/chat/completions", body, None);
            assert_eq!(c, 400, "{b}");
            assert!(b.contains(needle), "{needle}: {b}");
        }
    });
}

/// `eval` through the OpenAI backend against `cantante serve` gives the
/// in-process run: the same states, predictions, scores and token counts
/// (seeded sampling, a format-repair turn; the tag guard off, since a remote
/// backend cannot constrain decoding).
#[test]
fn eval_over_http_equals_the_in_process_run() {
    use cantante::eval::{execute, EvalOptions};
    use cantante::graph::setup::Validation;
    use cantante::graph::Setup;
    use cantante::task::{load_task, Split};
    let (_dir, p, local, served) = tiny_pair();
    let task = load_task("gsm8k", Some(&crate::data_dir())).unwrap();
    let rules = Validation::new(&task.provided_vars(), &task.tool_names());
    let setup = Setup::load_validated(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/gsm8k.yaml"),
        &rules,
    )
    .unwrap();
    let examples = task.load(Split::Test, Some(2), 3).unwrap();
    let mut opts = EvalOptions::default();
    opts.run.max_new_tokens = 8;
    opts.run.format_repairs = 1;
    opts.run.tag_guard = false;
    let configs = [setup.pool_config(0), setup.pool_config(1)];
    let run = |llm: &dyn Llm| {
        execute(llm, &setup, task.as_ref(), &configs, &examples, &opts, None).unwrap()
    };
    let want = run(&local);
    with_server(&served, tiny_options(), |addr| {
        let remote = OpenAiLlm::connect(RemoteOptions {
            tokenizer: Some(p.clone()),
            ..RemoteOptions::new(format!("http://{addr}/v1"))
        })
        .unwrap();
        let got = run(&remote);
        assert_eq!(got.len(), want.len());
        let mut calls = 0;
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert_eq!(g.score, w.score);
            assert_eq!(g.result.state, w.result.state);
            assert_eq!(g.result.prediction, w.result.prediction);
            assert_eq!(
                (g.result.input_tokens, g.result.output_tokens),
                (w.result.input_tokens, w.result.output_tokens)
            );
            assert_eq!(g.result.calls.len(), w.result.calls.len());
            calls += g.result.calls.len();
        }
        assert!(calls >= 8, "every agent of every run was called: {calls}");
    });
}

#[cfg(feature = "grammar")]
#[test]
fn grammars_over_http_equal_the_engine_and_bad_ones_are_400s() {
    use cantante::llm::Grammar;
    let (_dir, p, local, served) = tiny_pair();
    with_server(&served, tiny_options(), |addr| {
        let remote = OpenAiLlm::connect(RemoteOptions {
            tokenizer: Some(p.clone()),
            ..RemoteOptions::new(format!("http://{addr}/v1"))
        })
        .unwrap();
        let grammars = [
            Grammar::Regex("[0-9]{1,4}".into()),
            Grammar::JsonSchema(serde_json::json!({
                "type": "object",
                "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["n"], "additionalProperties": false,
                "x-guidance": {"whitespace_flexible": false},
            })),
            Grammar::Lark("start: \"yes\" | \"no\"".into()),
        ];
        let reqs: Vec<Request> = grammars
            .iter()
            .enumerate()
            .map(|(i, g)| {
                Request::chat("Be brief.", &format!("Item {i}?"), 24)
                    .with_sampling(Sampling::temperature(1.0))
                    .with_seed(i as u64)
                    .with_grammar(g.clone())
            })
            .collect();
        let want = local.generate(&reqs).unwrap();
        let got = remote.generate(&reqs).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.text, w.text, "request {i}");
        }
        assert!(
            want[0].text.chars().all(|c| c.is_ascii_digit()),
            "{:?}",
            want[0].text
        );
        let v: serde_json::Value = serde_json::from_str(&want[1].text).unwrap();
        assert!(v["n"].as_u64().is_some_and(|n| n <= 99), "{v}");
        assert!(
            ["yes", "no"].contains(&want[2].text.as_str()),
            "{:?}",
            want[2].text
        );
        let (status, body) = http(
            addr,
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "guided_regex": "("}"#,
            None,
        );
        assert_eq!(status, 400, "{body}");
        assert!(
            body.contains("response_format") && body.contains("regex"),
            "{body}"
        );
        let (status, body) = http(
            addr,
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}"#,
            None,
        );
        assert_eq!(status, 400, "{body}");
    });
}
