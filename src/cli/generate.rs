//! `cantante generate`: run the local engine on one prompt or a JSONL file of
//! prompts and print the completions plus a throughput line.

use super::common::{load_llm, ModelArgs};
use crate::llm::{Llm, Message, Request, Sampling};
use anyhow::{bail, Context, Result};
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `cantante generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A single prompt (user message).
    #[arg(long, conflicts_with = "prompts")]
    prompt: Option<String>,
    /// JSONL file: one object per line with `prompt` (string) or `messages`
    /// ([{role, content}]), optional `system`, `max_tokens`, `seed`, `temperature`.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Optional system message for --prompt.
    #[arg(long)]
    system: Option<String>,
    /// Samples per prompt (each with seed + i).
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Top-k sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Base seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Maximum new tokens per completion.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Output tags every reply must contain (comma-separated, e.g.
    /// `answer`): the reply cannot end before `<answer>…</answer>` is
    /// closed, the tags are forced when the token budget runs out, and the
    /// reply ends after the last one.
    #[arg(long, value_delimiter = ',')]
    require_tags: Vec<String>,
    /// The whole reply must match this regular expression (enforced while
    /// decoding; needs the `grammar` feature, on by default).
    #[arg(long, conflicts_with_all = ["require_tags", "grammar_lark", "json_schema"])]
    grammar_regex: Option<String>,
    /// The whole reply must match the Lark grammar in this file
    /// (llguidance's dialect; needs the `grammar` feature).
    #[arg(long, conflicts_with_all = ["require_tags", "json_schema"])]
    grammar_lark: Option<PathBuf>,
    /// The reply must be JSON matching the JSON schema in this file (needs
    /// the `grammar` feature).
    #[arg(long, conflicts_with = "require_tags")]
    json_schema: Option<PathBuf>,
    /// Print results as JSONL instead of text.
    #[arg(long)]
    json: bool,
}

fn constraint(a: &GenerateArgs) -> Option<crate::llm::OutputConstraint> {
    (!a.require_tags.is_empty())
        .then(|| crate::llm::OutputConstraint::tags(a.require_tags.iter().cloned()))
}

/// The grammar the options ask for, read from its file.
fn grammar(a: &GenerateArgs) -> Result<Option<crate::llm::Grammar>> {
    use crate::llm::Grammar;
    if let Some(rx) = &a.grammar_regex {
        return Ok(Some(Grammar::Regex(rx.clone())));
    }
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    if let Some(p) = &a.grammar_lark {
        return Ok(Some(Grammar::Lark(read(p)?)));
    }
    if let Some(p) = &a.json_schema {
        let v: serde_json::Value = serde_json::from_str(&read(p)?)
            .with_context(|| format!("{}: not a JSON schema (not JSON)", p.display()))?;
        return Ok(Some(Grammar::JsonSchema(v)));
    }
    Ok(None)
}

fn parse_line(
    line: &str,
    lineno: usize,
    a: &GenerateArgs,
    grammar: &Option<crate::llm::Grammar>,
) -> Result<Request> {
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("line {lineno}: not JSON"))?;
    let mut messages = Vec::new();
    if let Some(s) = v["system"].as_str().or(a.system.as_deref()) {
        messages.push(Message::system(s));
    }
    if let Some(p) = v["prompt"].as_str() {
        messages.push(Message::user(p));
    } else if v["messages"].is_array() {
        let m: Vec<Message> = serde_json::from_value(v["messages"].clone()).with_context(|| {
            format!("line {lineno}: field `messages` must be [{{role, content}}]")
        })?;
        messages.extend(m);
    } else {
        bail!("line {lineno}: needs a `prompt` string or a `messages` array");
    }
    Ok(Request {
        messages,
        max_new_tokens: v["max_tokens"]
            .as_u64()
            .map(|x| x as usize)
            .unwrap_or(a.max_tokens),
        sampling: Sampling {
            temperature: v["temperature"].as_f64().unwrap_or(a.temperature),
            top_p: a.top_p,
            top_k: a.top_k,
        },
        seed: v["seed"].as_u64().unwrap_or(a.seed),
        stop: a.stop.clone(),
        constraint: constraint(a),
        grammar: grammar.clone(),
        raw_prompt: None,
    })
}

/// Run the command.
pub fn run(a: GenerateArgs) -> Result<()> {
    let mut base = Vec::new();
    let g = grammar(&a)?;
    if let Some(p) = &a.prompt {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(Message::system(s.clone()));
        }
        messages.push(Message::user(p.clone()));
        base.push(Request {
            messages,
            max_new_tokens: a.max_tokens,
            sampling: Sampling {
                temperature: a.temperature,
                top_p: a.top_p,
                top_k: a.top_k,
            },
            seed: a.seed,
            stop: a.stop.clone(),
            constraint: constraint(&a),
            grammar: g.clone(),
            raw_prompt: None,
        });
    } else if let Some(path) = &a.prompts {
        let f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.with_context(|| format!("cannot read {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            base.push(
                parse_line(&line, i + 1, &a, &g)
                    .with_context(|| format!("in {}", path.display()))?,
            );
        }
    } else {
        bail!("give --prompt TEXT or --prompts FILE.jsonl");
    }
    let mut reqs = Vec::new();
    for r in &base {
        for i in 0..a.n.max(1) {
            let mut r = r.clone();
            r.seed = r.seed.wrapping_add(i as u64);
            reqs.push(r);
        }
    }
    let llm = load_llm(&a.model)?;
    let bar = super::common::bar(reqs.len() as u64, "generating");
    let t0 = Instant::now();
    let gens = {
        // Batches of the engine's max batch so the bar moves on long files.
        let chunk = a.model.max_batch.max(1) * 4;
        let mut out = Vec::new();
        for c in reqs.chunks(chunk) {
            out.extend(llm.generate(c)?);
            bar.inc(c.len() as u64);
        }
        out
    };
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    for (i, g) in gens.iter().enumerate() {
        if a.json {
            println!(
                "{}",
                serde_json::to_string(
                    &serde_json::json!({"index": i, "text": g.text, "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens, "stop_reason": g.stop_reason, "forced": g.forced})
                )?
            );
        } else {
            if gens.len() > 1 {
                println!(
                    "--- [{i}] ({} prompt + {} new tokens, {:?})",
                    g.prompt_tokens, g.completion_tokens, g.stop_reason
                );
            }
            println!("{}", g.text);
        }
    }
    let pt: usize = gens.iter().map(|g| g.prompt_tokens).sum();
    let ct: usize = gens.iter().map(|g| g.completion_tokens).sum();
    eprintln!(
        "{} completions, {pt} prompt + {ct} generated tokens in {secs:.2}s: {:.1} generated tok/s, {:.1} total tok/s ({})",
        gens.len(),
        ct as f64 / secs,
        (pt + ct) as f64 / secs,
        llm.model_id()
    );
    Ok(())
}
