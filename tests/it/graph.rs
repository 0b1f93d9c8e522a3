//! Graph runtime and setup files: the shipped configs load and validate, and
//! the batched executor's semantics hold on a scripted LLM.

use cantante::graph::{
    run_batch, write_trace_jsonl, GraphError, RunOptions, RunResult, RunSpec, Setup, ToolEnv,
    Validation,
};
use cantante::llm::{Generation, Llm, LlmError, Message, Request, Role, ScriptedLlm};
use cantante::prompt;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const MBPP_TOOLS: [&str; 4] = ["write_code", "read_code", "run_code", "check_tests"];

fn config(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
}

fn user_prompt(r: &Request) -> &str {
    &r.messages
        .iter()
        .find(|m| m.role == Role::User)
        .expect("a user message")
        .content
}

fn last(r: &Request) -> &Message {
    r.messages.last().expect("messages")
}

/// Assistant messages already in a request's history (earlier turns of the call).
fn assistant_turns(r: &Request) -> usize {
    r.messages
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .count()
}

fn opts() -> RunOptions {
    RunOptions {
        sampling: cantante::llm::Sampling::greedy(),
        ..RunOptions::default()
    }
}

fn specs(setup: &Setup, queries: &[&str]) -> Vec<RunSpec> {
    let p = Arc::new(setup.pool_config(0));
    queries
        .iter()
        .enumerate()
        .map(|(i, q)| RunSpec::new(p.clone(), *q, 100 + i as u64))
        .collect()
}

fn yaml(s: &str) -> Setup {
    let s = Setup::from_yaml(s, "test.yaml").unwrap();
    s.validate(&Validation::default()).unwrap();
    s
}

// ---------------------------------------------------------------------------
// Shipped configs

#[test]
fn gsm8k_config_loads_and_validates() {
    let s = Setup::load_validated(
        config("gsm8k.yaml"),
        &Validation::new::<&str, &str>(&[], &[]),
    )
    .unwrap();
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    let names: Vec<&str> = s.agents.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        ["executor_1", "executor_2", "executor_3", "consensus_agent"]
    );
    check_pools(&s);
}

#[test]
fn mbpp_config_loads_and_validates() {
    let rules = Validation::new(&["test_cases"], &MBPP_TOOLS);
    let s = Setup::load_validated(config("mbpp.yaml"), &rules).unwrap();
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    let cond: Vec<_> = s.edges.iter().filter(|e| e.is_conditional()).collect();
    assert_eq!(cond.len(), 1);
    assert_eq!(
        (
            cond[0].from.as_str(),
            cond[0].to.as_str(),
            cond[0].condition_fix.as_deref(),
            cond[0].max_retries
        ),
        (
            "validator_agent",
            "coder_agent",
            Some("fix_required"),
            Some(3)
        )
    );
    assert_eq!(
        s.agent("coder_agent").unwrap().tools,
        ["write_code", "run_code"]
    );
    assert_eq!(
        s.agent("validator_agent").unwrap().tools,
        ["read_code", "check_tests"]
    );
    assert!(s
        .agent("planner_agent")
        .unwrap()
        .input_vars
        .contains(&"test_cases".to_string()));
    assert!(s
        .agent("validator_agent")
        .unwrap()
        .input_vars
        .contains(&"test_cases".to_string()));
    // Without the task's test_cases the setup is rejected, naming the agent.
    let e = s
        .validate(&Validation::new::<&str, _>(&[], &MBPP_TOOLS))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("planner_agent") && e.contains("test_cases"),
        "{e}"
    );
    check_pools(&s);
    // Every tool-call example in a rendered prompt is a valid call to one of the agent's tools.
    for a in s.agents.iter().filter(|a| !a.tools.is_empty()) {
        for t in &s.init_agent_prompt_pool[&a.name] {
            let r = prompt::render(t, &BTreeMap::new(), &[] as &[&str], None);
            let mut rest = r.as_str();
            let mut n = 0;
            while let Some(i) = rest.find("<tool_call>") {
                let (name, _, end) =
                    cantante::graph::runtime::parse_tool_call(&rest[i..], &a.tools)
                        .expect("tool call")
                        .unwrap_or_else(|e| panic!("{}: {e} in\n{r}", a.name));
                assert!(a.tools.contains(&name), "{}: example calls {name}", a.name);
                rest = &rest[i + end..];
                n += 1;
            }
            assert!(n > 0, "{}: prompt shows no tool call:\n{r}", a.name);
        }
    }
}

/// ≥ 4 distinct prompts per agent, every input placeholder and output tag,
/// and a clean render with and without shots.
fn check_pools(s: &Setup) {
    for a in &s.agents {
        let pool = &s.init_agent_prompt_pool[&a.name];
        assert!(pool.len() >= 4, "{}: {} prompts", a.name, pool.len());
        let distinct: std::collections::BTreeSet<&String> = pool.iter().collect();
        assert_eq!(distinct.len(), pool.len(), "{}: duplicate prompts", a.name);
        for (i, t) in pool.iter().enumerate() {
            assert!(
                prompt::missing_placeholders(t, &a.input_vars).is_empty(),
                "{} #{i}",
                a.name
            );
            assert!(
                prompt::output_tags_present(t, &a.output_vars),
                "{} #{i}",
                a.name
            );
            assert!(
                t.contains("{few_shots}") && t.contains("<few_shots_section>"),
                "{} #{i}",
                a.name
            );
            let vars: BTreeMap<String, String> = a
                .input_vars
                .iter()
                .map(|v| (v.clone(), format!("VAL_{v}")))
                .collect();
            let plain = prompt::render(t, &vars, &[] as &[&str], None);
            assert!(
                !plain.contains("few_shots") && !plain.contains("VAL_few_shots"),
                "{} #{i}:\n{plain}",
                a.name
            );
            for v in a.input_vars.iter().filter(|v| *v != "few_shots") {
                assert!(
                    plain.contains(&format!("VAL_{v}")),
                    "{} #{i}: {v} not filled",
                    a.name
                );
                assert!(
                    !plain.contains(&format!("{{{v}}}")),
                    "{} #{i}: {v} left as placeholder",
                    a.name
                );
            }
            assert!(
                !plain.contains("\n\n\n"),
                "{} #{i}: blank lines left behind:\n{plain}",
                a.name
            );
            let shot = prompt::render(t, &vars, &["SHOT ONE {x}", "SHOT TWO"], None);
            assert!(
                shot.contains("SHOT ONE {x}\n\nSHOT TWO"),
                "{} #{i}:\n{shot}",
                a.name
            );
            assert!(!shot.contains("few_shots_section"), "{} #{i}", a.name);
        }
    }
}

// ---------------------------------------------------------------------------
// GSM8K: fan-out and join

/// Which GSM8K agent a request is for, from the tags its prompt mentions.
fn gsm8k_agent(r: &Request) -> String {
    let p = user_prompt(r);
    if p.contains("<prediction>") {
        return "consensus".into();
    }
    (1..=3)
        .find(|k| p.contains(&format!("<proposal_{k}>")))
        .map(|k| format!("e{k}"))
        .expect("executor")
}

#[test]
fn gsm8k_fan_out_and_join_in_two_batches() {
    let setup = Setup::load(config("gsm8k.yaml")).unwrap();
    let llm = ScriptedLlm::new(|r| {
        let who = gsm8k_agent(r);
        let p = user_prompt(r);
        // The query is "q<N>"; executors propose N*10+k, so all three differ and are traceable.
        let n: u64 = p
            .split("q")
            .filter_map(|s| s.split_whitespace().next()?.parse().ok())
            .next()
            .unwrap_or(0);
        match who.as_str() {
            "consensus" => format!("<prediction>{}</prediction>", n * 10 + 2),
            e => {
                let k: u64 = e[1..].parse().unwrap();
                format!("<justification_{k}>because {k}</justification_{k}>\n<proposal_{k}>{}</proposal_{k}>", n * 10 + k)
            }
        }
    });
    let n = 5;
    let queries: Vec<String> = (1..=n).map(|i| format!("q{i} ?")).collect();
    let qs: Vec<&str> = queries.iter().map(String::as_str).collect();
    for cfg in 0..4 {
        let before = llm.batches();
        let mut runs = specs(&setup, &qs);
        for r in &mut runs {
            r.prompts = Arc::new(setup.pool_config(cfg));
        }
        let out = run_batch(&llm, &setup, runs, &opts(), None).unwrap();
        assert_eq!(
            llm.batches() - before,
            2,
            "config {cfg}: one batch per super-step"
        );
        for (i, r) in out.iter().enumerate() {
            let q = i as u64 + 1;
            assert_eq!(r.error, None);
            assert_eq!(r.calls.len(), 4);
            assert_eq!(r.calls[3].agent, "consensus_agent");
            let cp = &r.calls[3].prompt;
            for k in 1..=3 {
                assert!(
                    cp.contains(&(q * 10 + k).to_string()),
                    "config {cfg}: join lacks proposal {k}:\n{cp}"
                );
                assert!(
                    cp.contains(&format!("because {k}")),
                    "config {cfg}: join lacks justification {k}"
                );
            }
            assert_eq!(r.prediction, (q * 10 + 2).to_string());
            assert_eq!(r.state["proposal_3"], (q * 10 + 3).to_string());
            assert!(r.calls.iter().all(|c| c.format_failures.is_empty()));
        }
    }
}

#[test]
fn join_waits_for_longer_branch() {
    // __start__ → a → b → j and __start__ → c → j: j runs once, after b.
    let setup = yaml(
        r#"
edges:
  - {from: __start__, to: a}
  - {from: __start__, to: c}
  - {from: a, to: b}
  - {from: b, to: j}
  - {from: c, to: j}
  - {from: j, to: __end__}
agents:
  - {name: a, input_vars: [query], output_vars: [x]}
  - {name: b, input_vars: [x], output_vars: [y]}
  - {name: c, input_vars: [query], output_vars: [z]}
  - {name: j, input_vars: [y, z], output_vars: [prediction]}
init_agent_prompt_pool:
  a: ["A {query}"]
  b: ["B {x}"]
  c: ["C {query}"]
  j: ["J {y} {z}"]
"#,
    );
    let llm = ScriptedLlm::new(|r| match &user_prompt(r)[..1] {
        "A" => "<x>xa</x>".into(),
        "B" => "<y>yb</y>".into(),
        "C" => "<z>zc</z>".into(),
        _ => format!("<prediction>{}</prediction>", user_prompt(r)),
    });
    let out = run_batch(&llm, &setup, specs(&setup, &["q"]), &opts(), None).unwrap();
    let agents: Vec<&str> = out[0].calls.iter().map(|c| c.agent.as_str()).collect();
    assert_eq!(agents, ["a", "c", "b", "j"]);
    assert_eq!(out[0].prediction, "J yb zc");
    assert_eq!(llm.batches(), 3);
}

// ---------------------------------------------------------------------------
// Conditional edges and the step limit

const LOOP: &str = r#"
edges:
  - {from: __start__, to: worker}
  - {from: worker, to: checker}
  - {from: checker, to: worker, condition_fix: fix, max_retries: 3, fallback_target: __end__}
agents:
  - {name: worker, input_vars: [query, attempt], output_vars: [attempt]}
  - {name: checker, input_vars: [query, attempt], output_vars: [fix, prediction]}
init_agent_prompt_pool:
  worker: ["W {query} attempt={attempt}"]
  checker: ["C {query} attempt={attempt}"]
"#;

/// Worker increments `attempt`; checker asks for a fix while attempt ≤ N (query "needN").
fn loop_llm() -> ScriptedLlm {
    ScriptedLlm::new(|r| {
        let p = user_prompt(r);
        let attempt: u32 = p
            .rsplit("attempt=")
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap_or(0);
        let need: u32 = p
            .split("need")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        if p.starts_with('W') {
            format!("<attempt>{}</attempt>", attempt + 1)
        } else {
            let fix = if attempt <= need { "True" } else { "no" };
            format!("<fix>{fix}</fix><prediction>done{attempt}</prediction>")
        }
    })
}

#[test]
fn retry_counters_are_per_run() {
    let setup = yaml(LOOP);
    let llm = loop_llm();
    let out = run_batch(
        &llm,
        &setup,
        specs(&setup, &["need1", "need2", "need0", "need9"]),
        &opts(),
        None,
    )
    .unwrap();
    let workers = |r: &RunResult| r.calls.iter().filter(|c| c.agent == "worker").count();
    assert_eq!(workers(&out[0]), 2);
    assert_eq!(out[0].prediction, "done2");
    assert_eq!(workers(&out[1]), 3);
    assert_eq!(out[1].prediction, "done3");
    assert_eq!(workers(&out[2]), 1);
    assert_eq!(out[2].prediction, "done1");
    // max_retries 3: the fourth "fix" goes to the fallback (__end__).
    assert_eq!(workers(&out[3]), 4);
    assert_eq!(out[3].prediction, "done4");
    assert_eq!(out[3].state["fix"], "True");
    assert!(out.iter().all(|r| r.error.is_none()));
    // 8 super-steps for the longest run, each one batch across all runs still going.
    assert_eq!(llm.batches(), 8);
    assert_eq!(llm.calls(), 4 + 6 + 2 + 8);
}

#[test]
fn step_limit_ends_run_with_error() {
    let setup = yaml(&LOOP.replace("max_retries: 3", "max_retries: 100"));
    let llm = loop_llm();
    let o = RunOptions {
        step_limit: 5,
        ..opts()
    };
    let out = run_batch(&llm, &setup, specs(&setup, &["need50", "need0"]), &o, None).unwrap();
    assert_eq!(out[0].calls.len(), 5);
    let e = out[0].error.as_deref().unwrap();
    assert!(
        e.contains("step limit of 5") && e.contains("checker"),
        "{e}"
    );
    assert_eq!(out[1].error, None);
    assert_eq!(out[1].calls.len(), 2);
}

// ---------------------------------------------------------------------------
// Output parsing

#[test]
fn missing_tag_is_a_format_failure_not_the_reply() {
    let setup = Setup::load(config("gsm8k.yaml")).unwrap();
    let llm = ScriptedLlm::new(|r| match gsm8k_agent(r).as_str() {
        "consensus" => "The answer is 42".into(),
        "e2" => "<justification_2>j</justification_2> no proposal here".into(),
        e => {
            let k = &e[1..];
            format!("<justification_{k}>j</justification_{k}><proposal_{k}>4{k}</proposal_{k}>")
        }
    });
    let out = run_batch(&llm, &setup, specs(&setup, &["q"]), &opts(), None).unwrap();
    let r = &out[0];
    assert_eq!(r.prediction, "");
    assert!(!r.state.contains_key("prediction"));
    assert!(!r.state.contains_key("proposal_2"));
    assert_eq!(r.calls[1].format_failures, ["proposal_2"]);
    assert_eq!(
        r.calls[1].outputs.keys().collect::<Vec<_>>(),
        ["justification_2"]
    );
    assert_eq!(r.calls[3].format_failures, ["prediction"]);
    assert_eq!(r.calls[3].reply, "The answer is 42");
    assert_eq!(r.format_failures(), 2);
    // The consensus saw an empty proposal 2, not a reply dump.
    assert!(!r.calls[3].prompt.contains("no proposal here"));
}

#[test]
fn format_repair_asks_only_for_missing_tags_and_never_overwrites() {
    let setup = Setup::load(config("gsm8k.yaml")).unwrap();
    let seen: Arc<Mutex<Vec<Request>>> = Arc::default();
    let log = seen.clone();
    let llm = ScriptedLlm::new(move |r| {
        let repair = last(r).content.contains("missing the required tag");
        if repair {
            log.lock().unwrap().push(r.clone());
        }
        let attempts = assistant_turns(r);
        match (gsm8k_agent(r).as_str(), repair) {
            ("consensus", false) => "I pick 42 of course".into(),
            // The consensus agent only complies on its second repair turn.
            ("consensus", true) if attempts < 2 => "still 42".into(),
            ("consensus", true) => "<prediction>42</prediction>".into(),
            ("e2", false) => "<justification_2>j</justification_2> the answer is 7".into(),
            ("e2", true) => {
                "<justification_2>overwrite</justification_2><proposal_2>7</proposal_2>".into()
            }
            (e, _) => {
                let k = &e[1..];
                format!("<justification_{k}>j</justification_{k}><proposal_{k}>4{k}</proposal_{k}>")
            }
        }
    });
    let run = |repairs: usize| {
        let before = llm.batches();
        let o = RunOptions {
            format_repairs: repairs,
            ..opts()
        };
        let out = run_batch(&llm, &setup, specs(&setup, &["q"]), &o, None).unwrap();
        (out, llm.batches() - before)
    };

    let (out, batches) = run(2);
    // 2 super-steps + 1 repair batch (executor_2) + 2 repair batches (consensus).
    assert_eq!(batches, 5);
    let r = &out[0];
    let e2 = &r.calls[1];
    assert_eq!(e2.repaired, ["proposal_2"]);
    assert!(e2.format_failures.is_empty());
    assert_eq!(e2.outputs["proposal_2"], "7");
    assert_eq!(
        e2.outputs["justification_2"], "j",
        "a found tag is never overwritten"
    );
    assert_eq!(e2.repair_replies.len(), 1);
    assert_eq!(r.state["proposal_2"], "7");
    let c = &r.calls[3];
    assert_eq!(c.repaired, ["prediction"]);
    assert_eq!(
        c.repair_replies,
        ["still 42", "<prediction>42</prediction>"]
    );
    assert_eq!(r.prediction, "42");
    assert!(
        r.calls[3].prompt.contains('7'),
        "the join saw the repaired proposal"
    );
    // Other executors complied: no repair turn.
    assert!(r.calls[0].repair_replies.is_empty() && r.calls[2].repair_replies.is_empty());
    // Repair turns are counted.
    assert!(c.output_tokens > cantante::llm::scripted::word_count("I pick 42 of course"));
    let reqs = seen.lock().unwrap().clone();
    let e2_req = reqs.iter().find(|q| gsm8k_agent(q) == "e2").unwrap();
    let ask = &last(e2_req).content;
    assert!(
        ask.contains("<proposal_2>") && !ask.contains("<justification_2>"),
        "{ask}"
    );
    // The history holds the original reply before the request.
    assert_eq!(
        e2_req.messages[e2_req.messages.len() - 2].content,
        "<justification_2>j</justification_2> the answer is 7"
    );

    let (out, batches) = run(1);
    assert_eq!(batches, 4);
    let c = &out[0].calls[3];
    assert_eq!(c.format_failures, ["prediction"]);
    assert!(c.repaired.is_empty());
    assert_eq!(out[0].prediction, "");
}

#[test]
fn cut_off_reply_is_flagged_in_the_trace_and_the_eval_summary() {
    let setup = Setup::load(config("gsm8k.yaml")).unwrap();
    let asks: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = asks.clone();
    let llm = ScriptedLlm::new(move |r| {
        let n_assistant = assistant_turns(r);
        match (gsm8k_agent(r).as_str(), n_assistant) {
            // Executor 1 rambles past the 12-token limit without any tag.
            ("e1", 0) => {
                "step one is to read the problem then step two is to add the numbers and then"
                    .into()
            }
            ("e1", _) => {
                log.lock().unwrap().push(last(r).content.clone());
                "so 41 <justification_1>j</justification_1><proposal_1>41</proposal_1>".into()
            }
            // Executor 2 stops on its own but forgets one tag.
            ("e2", 0) => "<justification_2>j</justification_2> 42".into(),
            ("e2", _) => {
                log.lock().unwrap().push(last(r).content.clone());
                "<proposal_2>42</proposal_2>".into()
            }
            ("consensus", _) => "<prediction>41</prediction>".into(),
            (e, _) => {
                let k = &e[1..];
                format!("<justification_{k}>j</justification_{k}><proposal_{k}>4{k}</proposal_{k}>")
            }
        }
    });
    let o = RunOptions {
        format_repairs: 1,
        max_new_tokens: 12,
        ..opts()
    };
    let out = run_batch(&llm, &setup, specs(&setup, &["q"]), &o, None).unwrap();
    let r = &out[0];
    assert!(r.calls[0].truncated, "executor 1 hit the token limit");
    assert!(r.calls.iter().skip(1).all(|c| !c.truncated));
    assert_eq!(r.calls[0].repaired, ["proposal_1", "justification_1"]);
    assert_eq!(r.state["proposal_1"], "41");
    assert_eq!(r.calls[1].repaired, ["proposal_2"]);
    // Both calls got the same repair request, naming only their missing tags.
    let asks = asks.lock().unwrap().clone();
    assert_eq!(asks.len(), 2);
    assert!(asks
        .iter()
        .any(|a| a.contains("<proposal_1>") && a.contains("<justification_1>")));
    assert!(asks
        .iter()
        .any(|a| a.contains("<proposal_2>") && !a.contains("<justification_2>")));
    // The trace keeps the flag; an untruncated call omits it.
    let j = serde_json::to_value(&r.calls[0]).unwrap();
    assert_eq!(j["truncated"], true);
    assert!(serde_json::to_value(&r.calls[1])
        .unwrap()
        .get("truncated")
        .is_none());
    // eval's summary reports the rate per agent.
    let scored = cantante::eval::ScoredRun {
        config: 0,
        example: 0,
        score: 1.0,
        result: out.into_iter().next().unwrap(),
    };
    let s = cantante::eval::summarize(&[scored]);
    assert_eq!(s.truncation_rate["executor_1"], 1.0);
    assert_eq!(s.truncation_rate["executor_2"], 0.0);
    assert_eq!(s.truncation_rate.len(), 4);
}

#[test]
fn missing_tag_clears_an_earlier_value() {
    let setup = yaml(LOOP);
    // First check writes a prediction and asks for a fix; the second check omits the tag.
    let llm = ScriptedLlm::new(|r| {
        let p = user_prompt(r);
        if p.starts_with('W') {
            let a: u32 = p
                .rsplit("attempt=")
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap_or(0);
            format!("<attempt>{}</attempt>", a + 1)
        } else if p.ends_with("attempt=1") {
            "<fix>yes</fix><prediction>early</prediction>".into()
        } else {
            "<fix>no</fix>".into()
        }
    });
    let out = run_batch(&llm, &setup, specs(&setup, &["need0"]), &opts(), None).unwrap();
    assert_eq!(out[0].calls.len(), 4);
    assert_eq!(out[0].prediction, "");
    assert_eq!(out[0].calls[3].format_failures, ["prediction"]);
}

// ---------------------------------------------------------------------------
// Tool loop

const TOOLS: &str = r#"
edges:
  - {from: __start__, to: doer}
  - {from: doer, to: __end__}
agents:
  - {name: doer, input_vars: [query], output_vars: [prediction], tools: [t1, t2], max_tool_calls: 2}
init_agent_prompt_pool:
  doer: ["D {query}"]
"#;

/// A tool environment that records its calls.
struct FakeEnv {
    log: Arc<Mutex<Vec<String>>>,
}

impl ToolEnv for FakeEnv {
    fn tool_names(&self) -> Vec<String> {
        vec!["t1".into(), "t2".into()]
    }
    fn describe(&self, _: &str) -> Option<String> {
        None
    }
    fn call(&mut self, name: &str, args: &serde_json::Value) -> String {
        self.log.lock().unwrap().push(format!("{name}{args}"));
        if name == "t2" {
            panic!("t2 is broken");
        }
        format!("result of {name} with {args}")
    }
    fn artifact(&self) -> Option<String> {
        Some(format!("{} calls", self.log.lock().unwrap().len()))
    }
}

type CallLog = Arc<Mutex<Vec<String>>>;

fn tool_runs(setup: &Setup, queries: &[&str]) -> (Vec<RunSpec>, Vec<CallLog>) {
    let mut runs = specs(setup, queries);
    let mut logs = Vec::new();
    for r in &mut runs {
        let log = Arc::new(Mutex::new(Vec::new()));
        r.tools = Some(Box::new(FakeEnv { log: log.clone() }));
        logs.push(log);
    }
    (runs, logs)
}

/// Query "callsN": the model calls t1 N times (one per turn), then answers.
/// The number of tool results already in the history tells the turn.
fn tool_llm(seen: Arc<Mutex<Vec<Request>>>) -> ScriptedLlm {
    ScriptedLlm::new(move |r| {
        seen.lock().unwrap().push(r.clone());
        let p = user_prompt(r);
        let want: usize = p
            .split("calls")
            .nth(1)
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let done = r
            .messages
            .iter()
            .filter(|m| m.content.starts_with("<tool_result>"))
            .count();
        if done < want {
            format!("thinking <tool_call>{{\"name\": \"t1\", \"arguments\": {{\"k\": {done}}}}}</tool_call> invented result")
        } else {
            format!("<prediction>after {done}</prediction>")
        }
    })
}

#[test]
fn tool_loop_is_bounded_and_batched_across_runs() {
    let setup = yaml(TOOLS);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let llm = tool_llm(seen.clone());
    let (runs, logs) = tool_runs(&setup, &["calls0", "calls1", "calls2", "calls5"]);
    // Super-step order: every turn of all runs is one batch.
    let lock = RunOptions {
        schedule: cantante::graph::Schedule::SuperStep,
        ..opts()
    };
    let out = run_batch(&llm, &setup, runs, &lock, None).unwrap();
    // Turn 0: 4 requests; turn 1: 3; turn 2: 2 (calls5 has used its budget of 2, its reply is final).
    assert_eq!(llm.batches(), 3);
    assert_eq!(llm.calls(), 9);
    let n_tools: Vec<usize> = out.iter().map(|r| r.calls[0].tool_calls.len()).collect();
    assert_eq!(n_tools, [0, 1, 2, 2]);
    assert_eq!(
        logs.iter()
            .map(|l| l.lock().unwrap().len())
            .collect::<Vec<_>>(),
        [0, 1, 2, 2]
    );
    assert_eq!(out[1].prediction, "after 1");
    assert_eq!(out[2].prediction, "after 2");
    // Budget exhausted: the last reply is final even though it is a tool call.
    assert_eq!(out[3].prediction, "");
    assert_eq!(out[3].calls[0].format_failures, ["prediction"]);
    assert!(out[3].calls[0].reply.contains("<tool_call>"));
    // The tool environment comes back with the result.
    assert_eq!(
        out[2].tools.as_ref().unwrap().artifact().as_deref(),
        Some("2 calls")
    );
    let rec = &out[2].calls[0].tool_calls[1];
    assert_eq!(
        (rec.tool.as_str(), rec.arguments["k"].as_i64()),
        ("t1", Some(1))
    );
    assert_eq!(rec.result, r#"result of t1 with {"k":1}"#);

    let seen = seen.lock().unwrap();
    // Tool turns stop at </tool_call>; the model's invented result never enters the history.
    let second: Vec<&Request> = seen
        .iter()
        .filter(|r| user_prompt(r) == "D calls2")
        .collect();
    assert_eq!(second.len(), 3);
    assert_eq!(second[0].stop, ["</tool_call>"]);
    let hist = &second[2].messages;
    assert_eq!(hist.len(), 6, "{hist:?}");
    assert_eq!(hist[2].role, Role::Assistant);
    assert_eq!(
        hist[2].content,
        r#"thinking <tool_call>{"name": "t1", "arguments": {"k": 0}}</tool_call>"#
    );
    assert_eq!(hist[3].role, Role::User);
    let payload = hist[3]
        .content
        .strip_prefix("<tool_result>")
        .unwrap()
        .strip_suffix("</tool_result>")
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(payload).unwrap();
    assert_eq!(v["name"], "t1");
    assert_eq!(v["argument_keys"], serde_json::json!(["k"]));
    assert_eq!(v["result"], r#"result of t1 with {"k":0}"#);
    // After the budget is used up, the request has no stop string (the reply is final).
    let fifth: Vec<&Request> = seen
        .iter()
        .filter(|r| user_prompt(r) == "D calls5")
        .collect();
    assert!(fifth[2].stop.is_empty());

    // Tokens: first prompt + tool-result messages in; all turns out (scripted tokens = words).
    let c = &out[2].calls[0];
    let first_prompt: usize = second[0]
        .messages
        .iter()
        .map(|m| m.content.split_whitespace().count())
        .sum();
    let results: usize = [&second[2].messages[3], &second[2].messages[5]]
        .iter()
        .map(|m| m.content.split_whitespace().count())
        .sum();
    assert_eq!(c.input_tokens, first_prompt + results);
    assert_eq!(
        c.output_tokens,
        6 + 6 + 2,
        "two tool-call turns (cut at the stop string) + answer"
    );
    assert_eq!(out[2].input_tokens, c.input_tokens);
}

#[test]
fn tool_calls_without_tools_unknown_tools_bad_json_and_panics() {
    // An agent without tools that emits a tool call: the reply is final.
    let setup = yaml(&TOOLS.replace("tools: [t1, t2], max_tool_calls: 2", "tools: []"));
    let llm = ScriptedLlm::new(|_| {
        r#"<tool_call>{"name": "t1", "arguments": {}}</tool_call><prediction>7</prediction>"#.into()
    });
    let (runs, logs) = tool_runs(&setup, &["q"]);
    let out = run_batch(&llm, &setup, runs, &opts(), None).unwrap();
    assert_eq!((out[0].prediction.as_str(), llm.batches()), ("7", 1));
    assert!(out[0].calls[0].tool_calls.is_empty() && logs[0].lock().unwrap().is_empty());
    // Tools listed but max_tool_calls 0: same.
    let setup0 = yaml(&TOOLS.replace("max_tool_calls: 2", "max_tool_calls: 0"));
    let out = run_batch(&llm, &setup0, tool_runs(&setup0, &["q"]).0, &opts(), None).unwrap();
    assert_eq!(out[0].prediction, "7");

    // Unknown tool, invalid JSON, a panicking tool, and a run without a tool environment.
    let setup = yaml(TOOLS);
    let llm = ScriptedLlm::new(|r| {
        let p = user_prompt(r);
        let results = r
            .messages
            .iter()
            .filter(|m| m.content.starts_with("<tool_result>"))
            .count();
        if results > 0 {
            return format!("<prediction>{}</prediction>", last(r).content);
        }
        match p {
            "D unknown" => r#"<tool_call>{"name": "t9", "arguments": {}}</tool_call>"#.into(),
            "D badjson" => "<tool_call>{name: t1}</tool_call><prediction>raw</prediction>".into(),
            _ => r#"<tool_call>{"name": "t2", "arguments": {}}</tool_call>"#.into(),
        }
    });
    let (mut runs, logs) = tool_runs(
        &setup,
        &["D unknown", "D badjson", "D panic", "D noenv"].map(|s| &s[2..]),
    );
    runs[3].tools = None;
    let out = run_batch(&llm, &setup, runs, &opts(), None).unwrap();
    let res = |i: usize| out[i].calls[0].tool_calls[0].result.clone();
    assert!(
        res(0).contains("unknown tool `t9`") && res(0).contains("t1, t2"),
        "{}",
        res(0)
    );
    assert!(logs[0].lock().unwrap().is_empty());
    // Invalid call JSON: the reply (cut at the stop string `</tool_call>`) is final.
    assert_eq!(out[1].calls[0].reply, "<tool_call>{name: t1}</tool_call>");
    assert_eq!(out[1].calls[0].format_failures, ["prediction"]);
    assert!(out[1].calls[0].tool_calls.is_empty());
    assert!(
        res(2).contains("Tool 't2' failed with error: t2 is broken"),
        "{}",
        res(2)
    );
    assert!(res(3).contains("no tool environment"), "{}", res(3));
    assert!(out.iter().all(|r| r.error.is_none()));
}

#[test]
fn tool_results_are_capped_like_fields() {
    struct Loud;
    impl ToolEnv for Loud {
        fn tool_names(&self) -> Vec<String> {
            vec!["t1".into()]
        }
        fn describe(&self, _: &str) -> Option<String> {
            None
        }
        fn call(&mut self, _: &str, _: &serde_json::Value) -> String {
            "w ".repeat(100)
        }
    }
    let setup = yaml(TOOLS);
    let llm = tool_llm(Arc::new(Mutex::new(Vec::new())));
    let mut runs = specs(&setup, &["calls1"]);
    runs[0].tools = Some(Box::new(Loud));
    let o = RunOptions {
        field_token_cap: 5,
        ..opts()
    };
    let out = run_batch(&llm, &setup, runs, &o, None).unwrap();
    assert_eq!(
        out[0].calls[0].tool_calls[0].result,
        "w w w w w ... [truncated]"
    );
}

// ---------------------------------------------------------------------------
// Seeds, caps, errors, traces, progress

#[test]
fn requests_do_not_depend_on_batch_composition() {
    let setup = yaml(TOOLS);
    let by_query = |reqs: &[Request], q: &str| -> Vec<Request> {
        reqs.iter()
            .filter(|r| user_prompt(r) == format!("D {q}"))
            .cloned()
            .collect()
    };
    let alone = Arc::new(Mutex::new(Vec::new()));
    let (mut runs, _) = tool_runs(&setup, &["calls2"]);
    runs[0].seed = 7;
    run_batch(&tool_llm(alone.clone()), &setup, runs, &opts(), None).unwrap();
    let mixed = Arc::new(Mutex::new(Vec::new()));
    let (mut runs, _) = tool_runs(&setup, &["calls1", "calls0", "calls2", "calls5"]);
    runs[2].seed = 7;
    run_batch(&tool_llm(mixed.clone()), &setup, runs, &opts(), None).unwrap();
    let a = by_query(&alone.lock().unwrap(), "calls2");
    let b = by_query(&mixed.lock().unwrap(), "calls2");
    assert_eq!(a.len(), 3);
    assert_eq!(a, b);
    let seeds: std::collections::BTreeSet<u64> = a.iter().map(|r| r.seed).collect();
    assert_eq!(seeds.len(), 3, "each turn has its own seed");

    // Same for a multi-agent graph: GSM8K run alone vs with others.
    let g = Setup::load(config("gsm8k.yaml")).unwrap();
    let log = Arc::new(Mutex::new(Vec::<Request>::new()));
    let l2 = log.clone();
    let llm = ScriptedLlm::new(move |r| {
        l2.lock().unwrap().push(r.clone());
        "x".into()
    });
    let mut one = specs(&g, &["target"]);
    one[0].seed = 3;
    run_batch(&llm, &g, one, &opts(), None).unwrap();
    let solo: Vec<Request> = log.lock().unwrap().drain(..).collect();
    let mut many = specs(&g, &["other", "target", "third"]);
    many[1].seed = 3;
    run_batch(&llm, &g, many, &opts(), None).unwrap();
    let batch: Vec<Request> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|r| user_prompt(r).contains("target"))
        .cloned()
        .collect();
    assert_eq!(solo, batch);
}

#[test]
fn field_and_prompt_caps() {
    let setup = yaml(
        r#"
edges:
  - {from: __start__, to: a}
agents:
  - {name: a, input_vars: [query], output_vars: [prediction]}
init_agent_prompt_pool:
  a: ["Q: {query} end of prompt"]
"#,
    );
    let llm = ScriptedLlm::new(|_| "<prediction>1</prediction>".into());
    let q = "one two three four five six";
    let o = RunOptions {
        field_token_cap: 3,
        system_prompt: String::new(),
        ..opts()
    };
    let out = run_batch(&llm, &setup, specs(&setup, &[q]), &o, None).unwrap();
    assert_eq!(
        out[0].calls[0].prompt,
        "Q: one two three ... [truncated] end of prompt"
    );
    let o = RunOptions {
        field_token_cap: 0,
        prompt_token_cap: Some(4),
        ..o
    };
    let out = run_batch(&llm, &setup, specs(&setup, &[q]), &o, None).unwrap();
    assert_eq!(out[0].calls[0].prompt, "Q: one two three");
    assert_eq!(out[0].input_tokens, 4, "no system message when it is empty");
}

/// Rejects requests that mention POISON, or fails whole batches.
struct Picky {
    inner: ScriptedLlm,
    fatal: bool,
}

impl Llm for Picky {
    fn generate(&self, reqs: &[Request]) -> cantante::llm::Result<Vec<Generation>> {
        if self.fatal {
            return Err(LlmError::Other("device lost".into()));
        }
        if let Some(i) = reqs.iter().position(|r| user_prompt(r).contains("POISON")) {
            return Err(LlmError::BadRequest {
                index: i,
                message: "too long".into(),
            });
        }
        self.inner.generate(reqs)
    }
    fn count_tokens(&self, t: &str) -> usize {
        self.inner.count_tokens(t)
    }
    fn truncate_tokens(&self, t: &str, n: usize) -> String {
        self.inner.truncate_tokens(t, n)
    }
    fn model_id(&self) -> String {
        "picky".into()
    }
}

/// Reports the literals between ⟨ ⟩ in its scripted replies as forced by the
/// tag guard (markers removed), like the engine's `Generation::forced`.
struct Guarded(ScriptedLlm);

impl Llm for Guarded {
    fn generate(&self, reqs: &[Request]) -> cantante::llm::Result<Vec<Generation>> {
        let mut out = self.0.generate(reqs)?;
        for g in &mut out {
            let mut text = String::new();
            for (i, part) in g.text.split(['⟨', '⟩']).enumerate() {
                if i % 2 == 1 {
                    g.forced.push(part.to_string());
                }
                text.push_str(part);
            }
            g.text = text;
        }
        Ok(out)
    }
    fn count_tokens(&self, t: &str) -> usize {
        self.0.count_tokens(t)
    }
    fn truncate_tokens(&self, t: &str, n: usize) -> String {
        self.0.truncate_tokens(t, n)
    }
    fn model_id(&self) -> String {
        "guarded".into()
    }
}

/// A fenced output is the reply's last code fence when the guard had to open
/// its tag, and what the tag holds otherwise.
#[test]
fn fenced_outputs_prefer_the_fence_over_a_guard_opened_tag() {
    const FENCED: &str = r#"
edges:
  - {from: __start__, to: coder}
  - {from: coder, to: __end__}
agents:
  - {name: coder, input_vars: [query], output_vars: [prediction], fenced_outputs: [prediction]}
init_agent_prompt_pool:
  coder: ["C {query}"]
"#;
    let llm = Guarded(ScriptedLlm::new(|r| {
        match user_prompt(r) {
            "C forced" => "Here:\n```python\ndef f():\n    return 1\n```\nDone.\n⟨<prediction>⟩def f(): return⟨</prediction>⟩",
            "C written" => "```python\nA\n```\n<prediction>B</prediction>",
            "C nofence" => "⟨<prediction>⟩B⟨</prediction>⟩",
            "C closeonly" => "```\nA\n```\n<prediction>B⟨</prediction>⟩",
            _ => "?",
        }
        .to_string()
    }));
    let queries = ["forced", "written", "nofence", "closeonly"];
    let setup = yaml(FENCED);
    let out = run_batch(&llm, &setup, specs(&setup, &queries), &opts(), None).unwrap();
    let preds: Vec<&str> = out.iter().map(|r| r.prediction.as_str()).collect();
    assert_eq!(preds, ["def f():\n    return 1", "B", "B", "B"]);
    assert_eq!(out[0].calls[0].from_fence, ["prediction"]);
    assert!(out[1..].iter().all(|r| r.calls[0].from_fence.is_empty()));
    // eval's summary counts them per agent.
    let scored: Vec<cantante::eval::ScoredRun> = out
        .into_iter()
        .enumerate()
        .map(|(i, result)| cantante::eval::ScoredRun {
            config: 0,
            example: i,
            score: 0.0,
            result,
        })
        .collect();
    assert_eq!(
        cantante::eval::summarize(&scored).tags["coder"].from_fence,
        1
    );
    // Without `fenced_outputs`, the guard-opened tag counts.
    let plain = yaml(&FENCED.replace(", fenced_outputs: [prediction]", ""));
    let out = run_batch(&llm, &plain, specs(&plain, &queries[..1]), &opts(), None).unwrap();
    assert_eq!(out[0].prediction, "def f(): return");
    // A fenced output must be an output variable.
    let bad = FENCED.replace("fenced_outputs: [prediction]", "fenced_outputs: [code]");
    let e = Setup::from_yaml(&bad, "t.yaml")
        .unwrap()
        .validate(&Validation::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("fenced_outputs") && e.contains("`code`"), "{e}");
}

#[test]
fn rejected_request_ends_only_its_run() {
    let setup = Setup::load(config("gsm8k.yaml")).unwrap();
    let inner = ScriptedLlm::new(|r| match gsm8k_agent(r).as_str() {
        "consensus" => "<prediction>5</prediction>".into(),
        e => format!(
            "<proposal_{0}>5</proposal_{0}><justification_{0}>j</justification_{0}>",
            &e[1..]
        ),
    });
    let llm = Picky {
        inner: inner.clone(),
        fatal: false,
    };
    let out = run_batch(
        &llm,
        &setup,
        specs(&setup, &["fine", "POISON", "also fine"]),
        &opts(),
        None,
    )
    .unwrap();
    assert_eq!(out[0].prediction, "5");
    assert_eq!(out[2].prediction, "5");
    let e = out[1].error.as_deref().unwrap();
    assert!(e.contains("executor_1") && e.contains("too long"), "{e}");
    assert_eq!(out[1].prediction, "");
    let fatal = Picky { inner, fatal: true };
    let e = run_batch(&fatal, &setup, specs(&setup, &["x"]), &opts(), None).unwrap_err();
    assert!(matches!(e, GraphError::Llm { step: 0, .. }), "{e}");
}

#[test]
fn missing_prompt_is_an_error() {
    let setup = Setup::load(config("gsm8k.yaml")).unwrap();
    let mut runs = specs(&setup, &["a", "b"]);
    let mut p = setup.pool_config(0);
    p.remove("executor_2");
    runs[1].prompts = Arc::new(p);
    let llm = ScriptedLlm::new(|_| String::new());
    let e = run_batch(&llm, &setup, runs, &opts(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("run 1") && e.contains("executor_2"), "{e}");
    assert_eq!(llm.calls(), 0);
}

#[test]
fn mbpp_pipeline_with_tools_and_repair() {
    let rules = Validation::new(&["test_cases"], &MBPP_TOOLS);
    let setup = Setup::load_validated(config("mbpp.yaml"), &rules).unwrap();

    /// Stores code; tests pass once the code says `good`.
    struct Store {
        code: String,
    }
    impl ToolEnv for Store {
        fn tool_names(&self) -> Vec<String> {
            MBPP_TOOLS.iter().map(|s| s.to_string()).collect()
        }
        fn describe(&self, _: &str) -> Option<String> {
            None
        }
        fn call(&mut self, name: &str, args: &serde_json::Value) -> String {
            match name {
                "write_code" => {
                    self.code = args["code"].as_str().unwrap_or_default().to_string();
                    "stored".into()
                }
                "read_code" => self.code.clone(),
                "check_tests" if self.code.contains("good") => "Passed 1/1".into(),
                "check_tests" => "Passed 0/1\nFAIL: assert f(1) == 2".into(),
                _ => "error".into(),
            }
        }
        fn artifact(&self) -> Option<String> {
            Some(self.code.clone())
        }
    }

    let llm = ScriptedLlm::new(|r| {
        let p = user_prompt(r);
        let tool_result = r
            .messages
            .last()
            .map(|m| m.content.clone())
            .filter(|c| c.starts_with("<tool_result>"));
        if p.contains("<fix_required>") {
            match tool_result {
                None => r#"<tool_call>{"name": "check_tests", "arguments": {}}</tool_call>"#.into(),
                Some(t) if t.contains("Passed 1/1") => {
                    "<fix_required>false</fix_required><fix_feedback></fix_feedback><prediction>def f(x): good</prediction>".into()
                }
                Some(_) => "<fix_required>true</fix_required><fix_feedback>f(1) must be 2</fix_feedback><prediction></prediction>".into(),
            }
        } else if p.contains("<code>") {
            assert!(
                p.contains("def f") || p.contains("plan:"),
                "coder sees the plan"
            );
            let code = if p.contains("f(1) must be 2") {
                "def f(x): good"
            } else {
                "def f(x): bad"
            };
            match tool_result {
                None => format!(
                    r#"<tool_call>{{"name": "write_code", "arguments": {{"code": "{code}"}}}}</tool_call>"#
                ),
                Some(_) => format!("<code>{code}</code>"),
            }
        } else {
            assert!(
                p.contains("assert f(1) == 2"),
                "planner sees the test cases:\n{p}"
            );
            "<plan>plan: def f(x)</plan>".into()
        }
    });
    let mut runs = specs(&setup, &["Write f."]);
    runs[0]
        .init
        .insert("test_cases".into(), "assert f(1) == 2".into());
    runs[0].tools = Some(Box::new(Store {
        code: String::new(),
    }));
    let out = run_batch(&llm, &setup, runs, &opts(), None).unwrap();
    let r = &out[0];
    let agents: Vec<&str> = r.calls.iter().map(|c| c.agent.as_str()).collect();
    assert_eq!(
        agents,
        [
            "planner_agent",
            "coder_agent",
            "validator_agent",
            "coder_agent",
            "validator_agent"
        ]
    );
    assert_eq!(r.prediction, "def f(x): good");
    assert_eq!(
        r.tools.as_ref().unwrap().artifact().as_deref(),
        Some("def f(x): good")
    );
    assert!(
        r.calls[2].prompt.contains("assert f(1) == 2"),
        "validator sees the test cases"
    );
    assert!(
        r.calls.iter().all(|c| c.format_failures.is_empty()),
        "{:?}",
        r.calls
    );
    assert_eq!(r.error, None);
}

#[test]
fn trace_and_progress() {
    let setup = yaml(LOOP);
    let llm = loop_llm();
    let seen = Mutex::new(Vec::new());
    let progress = |n: usize| seen.lock().unwrap().push(n);
    let out = run_batch(
        &llm,
        &setup,
        specs(&setup, &["need0", "need1", "need1"]),
        &opts(),
        Some(&progress),
    )
    .unwrap();
    // Continuous schedule: each run is reported as it finishes.
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3]);
    let lock = RunOptions {
        schedule: cantante::graph::Schedule::SuperStep,
        ..opts()
    };
    let seen_lock = Mutex::new(Vec::new());
    let progress = |n: usize| seen_lock.lock().unwrap().push(n);
    run_batch(
        &llm,
        &setup,
        specs(&setup, &["need0", "need1", "need1"]),
        &lock,
        Some(&progress),
    )
    .unwrap();
    // Super-step: reported after each super-step in which some run finished.
    assert_eq!(*seen_lock.lock().unwrap(), [1, 3]);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.jsonl");
    let mut extra = serde_json::Map::new();
    extra.insert("example_id".into(), "ex-0".into());
    write_trace_jsonl(&path, &out, &[extra]).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["example_id"], "ex-0");
    assert!(lines[1].get("example_id").is_none());
    assert_eq!(lines[1]["run"], 1);
    assert_eq!(lines[1]["prediction"], "done2");
    let calls = lines[1]["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 4);
    for key in [
        "agent",
        "prompt",
        "reply",
        "outputs",
        "input_tokens",
        "output_tokens",
        "format_failures",
        "tool_calls",
    ] {
        assert!(calls[0].get(key).is_some(), "{key}");
    }
    let back: cantante::graph::AgentCall = serde_json::from_value(calls[1].clone()).unwrap();
    assert_eq!(back, out[1].calls[1]);
}

/// A setup in the reference's exact YAML shape (quoted names, folded task
/// descriptions, flow sequences of double-quoted prompts with escapes, key
/// order of the conditional edge) loads unchanged. The prompt texts are ours.
#[test]
fn reference_shaped_setup_loads() {
    let text = r###"edges:
  - from: "__start__"
    to: "planner_agent"

  - from: "planner_agent"
    to: "coder_agent"

  - from: "coder_agent"
    to: "validator_agent"

  - from: "validator_agent"
    to: "coder_agent"
    condition_fix: "fix_required"
    fallback_target: "__end__"
    max_retries: 3

agents:
  - name: "planner_agent"
    task_description: >
      Plans.

      Output: a plan, wrapped as:
        <plan>...</plan>
    input_vars: ["query", "test_cases", "few_shots"]
    output_vars: ["plan"]
    tools: []
    max_tool_calls: 0

  - name: "coder_agent"
    task_description: >
      Codes. Invoked as:
        <tool_call>{{\"name\": \"write_code\", \"arguments\": {{...}}}}</tool_call>
    input_vars: ["query", "plan", "fix_feedback", "few_shots"]
    output_vars: ["code"]
    tools:
      - "write_code"
      - "run_code"
    max_tool_calls: 7

  - name: "validator_agent"
    task_description: >
      Validates.
    input_vars: ["query", "code", "test_cases", "few_shots"]
    output_vars: ["fix_required", "fix_feedback", "prediction"]
    tools:
      - "read_code"
      - "check_tests"
    max_tool_calls: 3


init_agent_prompt_pool:
  planner_agent: [
    "Plan for:\n- Query: {query}\n- Tests: {test_cases}\n<few_shots_section>\n- Examples: {few_shots}\n</few_shots_section>\n\nReturn <plan>...</plan>.",
    "## INPUTS\n| `{query}` | {query} |\n| `{test_cases}` | {test_cases} |\n<few_shots_section>{few_shots}</few_shots_section>\n<plan>"
  ]

  coder_agent: [
    "Code {query} from {plan}; feedback {fix_feedback}.\n<few_shots_section>{few_shots}</few_shots_section>\n<code>...</code>\n<tool_call>{{\"name\": \"<tool_name>\", \"arguments\": {{...}}}}</tool_call>"
  ]

  validator_agent: [
    "Check {query}\n{code}\n{test_cases}\n\n<few_shots_section>\n\n{few_shots}\n</few_shots_section>\n<fix_required> <fix_feedback> <prediction>"
  ]
"###;
    let s = Setup::from_yaml(text, "reference-shape.yaml").unwrap();
    s.validate(&Validation::new(&["test_cases"], &MBPP_TOOLS))
        .unwrap();
    assert_eq!(s.edges[3].max_retries, Some(3));
    assert!(s.agents[1].task_description.contains("<tool_call>"));
    let p = prompt::render(
        &s.init_agent_prompt_pool["coder_agent"][0],
        &BTreeMap::new(),
        &[] as &[&str],
        None,
    );
    assert!(
        p.ends_with(r#"<tool_call>{"name": "<tool_name>", "arguments": {...}}</tool_call>"#),
        "{p}"
    );
}

// ---------------------------------------------------------------------------
// Continuous schedule == super-step schedule

/// A backend that serves requests in a random order with random delays: it
/// pulls a random number of queued requests, answers a random one of those it
/// holds after a short sleep, and repeats. Its answers come from `inner`.
struct Shuffled {
    inner: ScriptedLlm,
    seed: u64,
}

impl Llm for Shuffled {
    fn generate(&self, requests: &[Request]) -> cantante::llm::Result<Vec<Generation>> {
        self.inner.generate(requests)
    }
    fn serve(&self, queue: &mut dyn cantante::llm::RequestQueue) -> cantante::llm::Result<()> {
        use cantante::llm::Next;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let mut held: Vec<(usize, Request)> = Vec::new();
        let mut closed = false;
        loop {
            let want = rng.random_range(0..4usize);
            let mut pulled = 0;
            while !closed && (pulled < want || held.is_empty()) {
                match queue.next(held.is_empty()) {
                    Next::Ready(id, r) => held.push((id, r)),
                    Next::Wait if held.is_empty() => {
                        std::thread::sleep(std::time::Duration::from_micros(100))
                    }
                    Next::Wait => break,
                    Next::Closed => closed = true,
                }
                pulled += 1;
            }
            if held.is_empty() {
                return Ok(());
            }
            let (id, r) = held.swap_remove(rng.random_range(0..held.len()));
            std::thread::sleep(std::time::Duration::from_micros(rng.random_range(0..300)));
            match self.inner.generate(std::slice::from_ref(&r)) {
                Ok(mut g) => queue.done(id, Ok(g.remove(0))),
                Err(e) => queue.done(id, Err(e)),
            }
        }
    }
    fn count_tokens(&self, text: &str) -> usize {
        self.inner.count_tokens(text)
    }
    fn truncate_tokens(&self, text: &str, max_tokens: usize) -> String {
        self.inner.truncate_tokens(text, max_tokens)
    }
    fn model_id(&self) -> String {
        self.inner.model_id()
    }
}

/// Traces (and tool artifacts) of a whole batch, as one JSON text.
fn traces_json(out: &[RunResult]) -> String {
    let lines: Vec<String> = out
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let art = r.tools.as_ref().and_then(|t| t.artifact());
            format!("{} {art:?}", serde_json::to_string(&r.trace(i)).unwrap())
        })
        .collect();
    lines.join("\n")
}

/// The super-step executor, the continuous one on a batch backend, and the
/// continuous one on backends answering in random orders give identical traces.
fn assert_schedules_agree(
    setup: &Setup,
    llm: &ScriptedLlm,
    make_runs: &dyn Fn() -> Vec<RunSpec>,
    o: &RunOptions,
) {
    use cantante::graph::Schedule;
    let lock = RunOptions {
        schedule: Schedule::SuperStep,
        ..o.clone()
    };
    let reference = traces_json(&run_batch(llm, setup, make_runs(), &lock, None).unwrap());
    let cont = RunOptions {
        schedule: Schedule::Continuous,
        ..o.clone()
    };
    let batch = traces_json(&run_batch(llm, setup, make_runs(), &cont, None).unwrap());
    assert_eq!(batch, reference, "continuous on a batch backend");
    for seed in 0..4 {
        let shuffled = Shuffled {
            inner: llm.clone(),
            seed,
        };
        let workers = RunOptions {
            tool_workers: 1 + seed as usize,
            ..cont.clone()
        };
        let got = traces_json(&run_batch(&shuffled, setup, make_runs(), &workers, None).unwrap());
        assert_eq!(got, reference, "continuous, random completion order {seed}");
    }
}

#[test]
fn continuous_schedule_gives_super_step_traces_in_any_completion_order() {
    // Fan-out and join, with replies that sometimes lack tags (format repair).
    let setup = Setup::load(config("gsm8k.yaml")).unwrap();
    let llm = ScriptedLlm::new(|r| {
        let who = gsm8k_agent(r);
        let p = user_prompt(r);
        let n = p.len() % 7;
        if r.seed % 3 == 0 && assistant_turns(r) == 0 {
            return format!("I think it is {n}");
        }
        match who.as_str() {
            "consensus" => format!("<prediction>{n}</prediction>"),
            e => {
                let k: u64 = e[1..].parse().unwrap();
                format!(
                    "<justification_{k}>j{k}</justification_{k}><proposal_{k}>{n}</proposal_{k}>"
                )
            }
        }
    });
    let qs: Vec<String> = (0..12)
        .map(|i| format!("q{i} {}", "x ".repeat(i)))
        .collect();
    let make = || {
        let q: Vec<&str> = qs.iter().map(String::as_str).collect();
        specs(&setup, &q)
    };
    let o = RunOptions {
        format_repairs: 1,
        ..opts()
    };
    assert_schedules_agree(&setup, &llm, &make, &o);

    // Conditional retry loops of different lengths per run and a step limit.
    let setup = yaml(LOOP);
    let make = || specs(&setup, &["need0", "need3", "need1", "need50", "need2"]);
    let o = RunOptions {
        step_limit: 6,
        ..opts()
    };
    assert_schedules_agree(&setup, &loop_llm(), &make, &o);

    // Tool loops of different lengths (a panicking tool included) with a
    // per-run environment whose call log is part of the trace.
    let setup = yaml(TOOLS);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let llm = tool_llm(seen);
    let make = || tool_runs(&setup, &["calls0", "calls2", "calls1", "calls5", "calls2"]).0;
    assert_schedules_agree(&setup, &llm, &make, &opts());
}

#[test]
fn continuous_schedule_isolates_rejected_requests() {
    let setup = yaml(LOOP);
    // A request whose history mentions need2 is rejected: that run ends with an
    // error, the others finish, in both schedules alike.
    let base = loop_llm();
    let picky = ScriptedLlm::new(move |r| {
        base.generate(std::slice::from_ref(r))
            .unwrap()
            .remove(0)
            .text
    });
    struct Reject(ScriptedLlm);
    impl Llm for Reject {
        fn generate(&self, reqs: &[Request]) -> cantante::llm::Result<Vec<Generation>> {
            if let Some(i) = reqs.iter().position(|r| {
                user_prompt(r).contains("need2") && user_prompt(r).contains("attempt=2")
            }) {
                return Err(LlmError::BadRequest {
                    index: i,
                    message: "too long".into(),
                });
            }
            self.0.generate(reqs)
        }
        fn count_tokens(&self, t: &str) -> usize {
            self.0.count_tokens(t)
        }
        fn truncate_tokens(&self, t: &str, n: usize) -> String {
            self.0.truncate_tokens(t, n)
        }
        fn model_id(&self) -> String {
            "reject".into()
        }
    }
    let llm = Reject(picky);
    let mut results = Vec::new();
    for schedule in [
        cantante::graph::Schedule::SuperStep,
        cantante::graph::Schedule::Continuous,
    ] {
        let o = RunOptions { schedule, ..opts() };
        let out = run_batch(
            &llm,
            &setup,
            specs(&setup, &["need0", "need2", "need1"]),
            &o,
            None,
        )
        .unwrap();
        assert!(
            out[1].error.as_deref().unwrap().contains("too long"),
            "{:?}",
            out[1].error
        );
        assert_eq!(out[0].error, None);
        assert_eq!(out[2].error, None);
        results.push(traces_json(&out));
    }
    assert_eq!(results[0], results[1]);
}

/// With `declare_tools` the system message declares the agent's tools, and a
/// bare JSON call (small Hermes-style models often drop the tag) runs like a
/// tagged one, for the agent's own tools only; what the model wrote after
/// the object never enters the history, and the tag guard steps aside once
/// a bare call opens. Without, the system message is the plain system prompt
/// and bare JSON is no call (the reference behaviour).
#[test]
fn bare_json_tool_calls_run_and_tools_are_declared() {
    let setup = yaml(TOOLS);
    for declare in [true, false] {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let llm = ScriptedLlm::new(move |r| {
            s2.lock().unwrap().push(r.clone());
            let results = r
                .messages
                .iter()
                .filter(|m| m.content.starts_with("<tool_result>"))
                .count();
            match (user_prompt(r), results) {
                ("D bare", 0) => {
                    "{\"name\": \"t1\", \"arguments\": {\"k\": 3}}\nIt returned 9.".into()
                }
                ("D other", 0) => {
                    "{\"name\": \"t7\", \"arguments\": {}} <prediction>x</prediction>".into()
                }
                (_, n) => format!("<prediction>after {n}</prediction>"),
            }
        });
        let o = RunOptions {
            declare_tools: declare,
            ..opts()
        };
        let (runs, logs) = tool_runs(&setup, &["bare", "other"]);
        let out = run_batch(&llm, &setup, runs, &o, None).unwrap();
        // An undeclared tool's bare JSON is no call: the reply is final.
        assert_eq!(out[1].prediction, "x");
        assert!(logs[1].lock().unwrap().is_empty());
        let seen = seen.lock().unwrap();
        let first = seen.iter().find(|r| user_prompt(r) == "D bare").unwrap();
        let escapes = &first.constraint.as_ref().unwrap().escapes;
        let last = seen
            .iter()
            .filter(|r| user_prompt(r) == "D bare")
            .last()
            .unwrap();
        if !declare {
            assert_eq!(escapes, &["<tool_call>"]);
            assert!(logs[0].lock().unwrap().is_empty());
            assert_eq!(out[0].calls[0].format_failures, ["prediction"]);
            assert_eq!(last.messages.len(), 2);
            assert_eq!(last.messages[0].content, "You are a helpful assistant.");
            continue;
        }
        assert_eq!(escapes.len(), 5);
        assert!(escapes.contains(&r#"{"name": "t2""#.to_string()));
        assert!(escapes.contains(&r#"{"name":"t1""#.to_string()));
        assert_eq!(out[0].prediction, "after 1");
        assert_eq!(*logs[0].lock().unwrap(), [r#"t1{"k":3}"#]);
        assert_eq!(last.messages.len(), 4, "{:?}", last.messages);
        assert_eq!(
            last.messages[2].content,
            r#"{"name": "t1", "arguments": {"k": 3}}"#
        );
        let system = &last.messages[0];
        assert_eq!(system.role, Role::System);
        let decl = "You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"t1\", \"description\": \"\", \"parameters\": {\"type\": \"object\", \"properties\": {}}}}\n{\"type\": \"function\", \"function\": {\"name\": \"t2\", \"description\": \"\", \"parameters\": {\"type\": \"object\", \"properties\": {}}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";
        assert_eq!(system.content, decl);
    }
}

#[test]
fn agent_turns_carry_the_tag_constraint_unless_the_guard_is_off() {
    let setup = yaml(TOOLS);
    for guard in [true, false] {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let llm = tool_llm(seen.clone());
        let o = RunOptions {
            tag_guard: guard,
            format_repairs: 1,
            ..opts()
        };
        run_batch(
            &llm,
            &setup,
            tool_runs(&setup, &["calls1", "calls5"]).0,
            &o,
            None,
        )
        .unwrap();
        let reqs = seen.lock().unwrap();
        assert!(!reqs.is_empty());
        for r in reqs.iter() {
            match (&r.constraint, guard) {
                (None, false) => {}
                (Some(c), true) => {
                    assert_eq!(c.tags, ["prediction"]);
                    if r.stop.is_empty() {
                        // Final or repair turn: no escape.
                        assert!(c.escapes.is_empty());
                    } else {
                        assert_eq!(c.escapes, ["<tool_call>"]);
                    }
                }
                other => panic!("guard {guard}: {other:?}"),
            }
        }
    }
}

#[test]
fn agents_with_output_grammars_get_a_tagged_grammar_instead_of_the_tag_guard() {
    use cantante::llm::Grammar;
    let mut setup = Setup::load_validated(
        config("gsm8k.yaml"),
        &Validation::new::<&str, &str>(&[], &[]),
    )
    .unwrap();
    let consensus = setup
        .agents
        .iter_mut()
        .find(|a| a.name == "consensus_agent")
        .unwrap();
    consensus
        .output_grammars
        .insert("prediction".into(), Grammar::Regex("-?[0-9]+".into()));
    setup.validate(&Validation::default()).unwrap();
    for guard in [true, false] {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let llm = ScriptedLlm::new(move |r: &Request| {
            log.lock().unwrap().push(r.clone());
            (1..=3)
                .map(|k| {
                    format!(
                        "<proposal_{k}>4</proposal_{k}><justification_{k}>x</justification_{k}>"
                    )
                })
                .collect::<String>()
                + "<prediction>4</prediction>"
        });
        let o = RunOptions {
            tag_guard: guard,
            ..opts()
        };
        let out = run_batch(&llm, &setup, specs(&setup, &["2+2?"]), &o, None).unwrap();
        assert_eq!(out[0].prediction, "4");
        let reqs = seen.lock().unwrap();
        assert_eq!(reqs.len(), 4);
        for r in reqs.iter() {
            let is_consensus = user_prompt(r).contains("<prediction>");
            match (&r.grammar, &r.constraint) {
                (Some(Grammar::Lark(src)), None) if guard && is_consensus => {
                    assert!(src.contains("t0_body: /-?[0-9]+/"), "{src}");
                    assert!(src.contains("t0_body \"</prediction>\""), "{src}");
                }
                (None, Some(c)) if guard && !is_consensus => {
                    assert_eq!(c.tags.len(), 2);
                }
                (None, None) if !guard => {}
                other => panic!("guard {guard}, consensus {is_consensus}: {other:?}"),
            }
        }
    }
    // Grammars only for the agent's own outputs, and not on tool agents.
    let mut bad = setup.clone();
    bad.agents[0]
        .output_grammars
        .insert("prediction".into(), Grammar::Regex("x".into()));
    let e = bad
        .validate(&Validation::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("output_grammars.prediction"), "{e}");
    #[cfg(feature = "grammar")]
    {
        let mut bad = setup.clone();
        let c = bad
            .agents
            .iter_mut()
            .find(|a| a.name == "consensus_agent")
            .unwrap();
        c.output_grammars
            .insert("prediction".into(), Grammar::Regex("([0-9]".into()));
        let e = bad
            .validate(&Validation::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("output_grammars.prediction") && e.contains("does not compile"),
            "{e}"
        );
    }
    let mut bad = yaml(TOOLS);
    let a = bad.agents.iter_mut().find(|a| !a.tools.is_empty()).unwrap();
    let v = a.output_vars[0].clone();
    a.output_grammars.insert(v, Grammar::Regex("x".into()));
    let e = bad
        .validate(&Validation::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("tools"), "{e}");
}
