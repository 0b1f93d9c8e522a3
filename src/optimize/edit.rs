//! Deletion edits: offspring made without the meta-LLM by deleting one
//! sentence of a parent prompt (the `del` operation of GrIPS, Prasad et al.,
//! EACL 2023). An extension beyond the paper's CAPO (which only crosses over
//! and mutates through the meta-LLM), enabled by
//! [`super::OptimizeConfig::edit_deletions`].
//!
//! Why: a small local rewriter cannot take an instruction *out*. Asked for a
//! variant, Qwen2.5-Coder-1.5B returned a near copy of a parent (≥ 95%
//! similar) for 5 of the 14 offspring of the `cpu-blocks` GSM8K runs, and
//! even when shown the failing rollouts of a planted "always answer 0" line
//! it kept that line, 6 times out of 6
//! (`benches/results/reflection-probe-gsm8k.md`). A deletion costs no tokens
//! and can remove a harmful sentence; racing on credits then decides whether
//! the shorter prompt is better (the length penalty already favours it
//! slightly on a tie).
//!
//! Only sentences without `{`, `}`, `<` or `>` can go, so placeholders,
//! output-tag instructions, few-shot section markers and tool syntax always
//! stay; the result is checked with [`super::meta::prompt_problems`] anyway.
//!
//! Few-shot edits ([`super::OptimizeConfig::edit_shots`]): offspring that fill
//! a parent's `{few_shots}` placeholder with worked examples, CAPO's other
//! half (Zehle et al. 2025 optimize instructions *and* examples; the CANTANTE
//! paper ran it as an ablation, spec §4.6). The examples are the agent's own
//! replies in dev rollouts that scored full marks ([`shot_records`]), in the
//! reference's record format; unlike the reference, wrong rollouts are never
//! used. A query whose rollout became an example is not credited for a
//! candidate carrying it (its race would otherwise reward the answer key).

use super::meta::prompt_problems;
use crate::attribution::Rollout;
use crate::graph::AgentSpec;
use crate::prompt::{apply_few_shots, placeholders, FEW_SHOTS};
use rand::Rng;
use std::collections::BTreeMap;
use std::ops::Range;

/// A worked example for one agent's few-shot section (reference §4.6
/// format: `Input:` lines of ``var: `value` ``, then `Output:` lines of
/// `<var>value</var>`; see [`Shot::render`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Shot {
    /// The dev query it was taken from.
    pub query: usize,
    /// The `Input:` lines, each ending in a newline.
    pub input: String,
    /// The agent's outputs `(var, value)`, in its `output_vars` order.
    pub outputs: Vec<(String, String)>,
}

impl Shot {
    /// The example as text, its outputs in the order `prompt` asks for them
    /// (the first `<var>` of each in `prompt`; outputs it does not mention
    /// keep their order, after the others). An agent whose `output_vars`
    /// list the answer before the reasoning (`proposal_1`, `justification_1`)
    /// but whose prompt asks for the reasoning first would otherwise be shown
    /// examples that answer before they reason.
    pub fn render(&self, prompt: &str) -> String {
        let mut outputs: Vec<(usize, &(String, String))> = self
            .outputs
            .iter()
            .map(|o| {
                let at = prompt.find(&format!("<{}>", o.0)).unwrap_or(usize::MAX);
                (at, o)
            })
            .collect();
        outputs.sort_by_key(|(at, _)| *at);
        let lines: Vec<String> = outputs
            .iter()
            .map(|(_, (v, x))| format!("<{v}>{x}</{v}>"))
            .collect();
        format!("Input:\n{}Output:\n{}", self.input, lines.join("\n"))
    }
}

/// Worked examples for `agent` from dev rollouts `(query index, rollout)`:
/// one per query whose rollout scored full marks (≥ 1) and holds every output
/// of the agent, non-empty. Inputs are the query text and the other agents'
/// outputs the agent reads (`few_shots` left out). Per query the shortest
/// example is kept, and examples longer than `max_chars` are skipped (a long
/// example costs prompt length on every call, which the length penalty
/// charges). Sorted by query, so the result depends only on the rollouts.
pub fn shot_records<'a>(
    agent: &AgentSpec,
    rollouts: impl IntoIterator<Item = (usize, &'a Rollout)>,
    query_text: impl Fn(usize) -> String,
    max_chars: usize,
) -> Vec<Shot> {
    // Per query: the shortest example, kept with its text (in `output_vars`
    // order; the length does not depend on the order) for the comparison.
    let mut best: BTreeMap<usize, (String, Shot)> = BTreeMap::new();
    for (q, r) in rollouts {
        if r.score < 1.0 {
            continue;
        }
        let Some(own) = r.agent_outputs.get(&agent.name) else {
            continue;
        };
        let outputs: Option<Vec<(String, String)>> = agent
            .output_vars
            .iter()
            .map(|v| {
                own.get(v)
                    .map(|x| x.trim())
                    .filter(|x| !x.is_empty())
                    .map(|x| (v.clone(), x.to_string()))
            })
            .collect();
        let Some(outputs) = outputs else {
            continue;
        };
        let mut input = String::new();
        for v in agent.input_vars.iter().filter(|v| v.as_str() != FEW_SHOTS) {
            let value = if v == "query" {
                Some(query_text(q))
            } else {
                r.agent_outputs
                    .iter()
                    .filter(|(a, _)| **a != agent.name)
                    .find_map(|(_, o)| o.get(v).cloned())
            };
            if let Some(value) = value {
                input.push_str(&format!("{v}: `{}`\n", value.trim()));
            }
        }
        let shot = Shot {
            query: q,
            input,
            outputs,
        };
        let text = shot.render("");
        if text.chars().count() > max_chars {
            continue;
        }
        match best.get(&q) {
            Some((t, _)) if (t.len(), t.as_str()) <= (text.len(), text.as_str()) => {}
            _ => {
                best.insert(q, (text, shot));
            }
        }
    }
    best.into_values().map(|(_, shot)| shot).collect()
}

/// Whether `prompt` has a `{few_shots}` placeholder to fill.
pub fn takes_shots(prompt: &str) -> bool {
    placeholders(prompt).iter().any(|p| p == FEW_SHOTS)
}

/// `prompt` with its `{few_shots}` placeholder filled with `shots` (each
/// [`Shot::render`]ed for `prompt`, joined by blank lines, brace-escaped, the section's wrapper tags dropped; see
/// [`apply_few_shots`]). `None` when the prompt has no placeholder, no shot is
/// given, or the result breaks the agent's contract.
pub fn fill_shots(prompt: &str, shots: &[&Shot], agent: &AgentSpec) -> Option<String> {
    if shots.is_empty() || !takes_shots(prompt) {
        return None;
    }
    let texts: Vec<String> = shots.iter().map(|s| s.render(prompt)).collect();
    let filled = apply_few_shots(prompt, &texts);
    prompt_problems(&filled, agent, &[prompt])
        .is_empty()
        .then_some(filled)
}

/// Byte ranges of the sentences of `prompt` that a deletion may remove: the
/// parts of each line ending at `.`, `!` or `?` followed by whitespace
/// (or at the end of the line), with at least two words and none of
/// `{`, `}`, `<`, `>`. Each range includes the whitespace after the sentence
/// on its line.
pub fn deletable_sentences(prompt: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut line_start = 0;
    for line in prompt.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let mut start = 0;
        let bytes = body.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let end_here = matches!(bytes[i], b'.' | b'!' | b'?')
                && (i + 1 == bytes.len() || bytes[i + 1].is_ascii_whitespace());
            if end_here || i + 1 == bytes.len() {
                let mut stop = i + 1;
                while stop < bytes.len() && bytes[stop].is_ascii_whitespace() {
                    stop += 1;
                }
                let sentence = &body[start..i + 1];
                let deletable = sentence.split_whitespace().count() >= 2
                    && !sentence.contains(['{', '}', '<', '>']);
                if deletable {
                    out.push(line_start + start..line_start + stop);
                }
                start = stop;
                i = stop;
            } else {
                i += 1;
            }
        }
        line_start += line.len();
    }
    out
}

/// `prompt` with one sentence deleted, chosen uniformly by `rng` among
/// [`deletable_sentences`]; a line left empty is removed with its newline.
/// `None` when nothing can be deleted or the result would break the agent's
/// contract (a missing placeholder or output tag).
pub fn delete_sentence(prompt: &str, agent: &AgentSpec, rng: &mut impl Rng) -> Option<String> {
    let spans = deletable_sentences(prompt);
    if spans.is_empty() {
        return None;
    }
    let span = spans[rng.random_range(0..spans.len())].clone();
    // Widen to the whole line when the sentence is all that is on it.
    let line_start = prompt[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = prompt[span.end..]
        .find('\n')
        .map_or(prompt.len(), |i| span.end + i + 1);
    let last_on_line = prompt[span.end..line_end].trim().is_empty();
    let cut = if last_on_line && prompt[line_start..span.start].trim().is_empty() {
        line_start..line_end
    } else if last_on_line {
        // The line's last sentence: drop the space before it, keep the newline.
        let start = prompt[..span.start].trim_end_matches([' ', '\t']).len();
        start..span.end
    } else {
        span
    };
    let edited = [&prompt[..cut.start], &prompt[cut.end..]].concat();
    let edited = edited.trim_end().to_string();
    (prompt_problems(&edited, agent, &[prompt]).is_empty() && edited != prompt.trim_end())
        .then_some(edited)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn agent() -> AgentSpec {
        AgentSpec {
            name: "consensus".into(),
            task_description: "Pick the answer.".into(),
            input_vars: vec!["query".into(), "few_shots".into()],
            output_vars: vec!["prediction".into()],
            tools: vec![],
            max_tool_calls: 0,
            output_grammars: Default::default(),
            fenced_outputs: Vec::new(),
        }
    }

    fn rollout(score: f64, outputs: &[(&str, &[(&str, &str)])]) -> Rollout {
        Rollout {
            score,
            prediction: String::new(),
            agent_outputs: outputs
                .iter()
                .map(|(a, vs)| {
                    (
                        a.to_string(),
                        vs.iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                    )
                })
                .collect(),
            input_tokens: 0,
            output_tokens: 0,
        }
    }

    #[test]
    fn shot_records_keep_correct_complete_replies_with_their_inputs() {
        let judge = AgentSpec {
            name: "judge".into(),
            input_vars: vec!["query".into(), "proposal".into(), "few_shots".into()],
            output_vars: vec!["prediction".into(), "why".into()],
            ..agent()
        };
        let full = rollout(
            1.0,
            &[
                ("solver", &[("proposal", " 12 ")]),
                ("judge", &[("prediction", "12"), ("why", "solver is right")]),
            ],
        );
        let longer = rollout(
            1.0,
            &[
                ("solver", &[("proposal", "12")]),
                (
                    "judge",
                    &[
                        ("prediction", "12"),
                        ("why", "the solver added 5 and 7 correctly"),
                    ],
                ),
            ],
        );
        let wrong = rollout(0.0, &[("judge", &[("prediction", "3"), ("why", "x")])]);
        let partial = rollout(1.0, &[("judge", &[("prediction", "4"), ("why", "  ")])]);
        let rollouts = [
            (7, &longer),
            (7, &full),
            (2, &wrong),
            (3, &partial),
            (9, &longer),
        ];
        let shots = shot_records(&judge, rollouts, |q| format!("question {q}"), 10_000);
        let texts: Vec<(usize, String)> = shots.iter().map(|s| (s.query, s.render(""))).collect();
        assert_eq!(
            texts,
            vec![
                (
                    7,
                    "Input:\nquery: `question 7`\nproposal: `12`\nOutput:\n<prediction>12</prediction>\n<why>solver is right</why>".into(),
                ),
                (
                    9,
                    "Input:\nquery: `question 9`\nproposal: `12`\nOutput:\n<prediction>12</prediction>\n<why>the solver added 5 and 7 correctly</why>".into(),
                ),
            ],
            "full marks only, every output present, shortest per query, sorted by query"
        );
        // Rendered for a prompt that asks for the reasoning first, the
        // example reasons first too.
        let why_first = "Explain in <why></why>, then answer in <prediction></prediction>.";
        assert_eq!(
            shots[0].render(why_first),
            "Input:\nquery: `question 7`\nproposal: `12`\nOutput:\n<why>solver is right</why>\n<prediction>12</prediction>"
        );
        let short = shot_records(&judge, rollouts, |q| format!("question {q}"), 110);
        assert_eq!(
            short.iter().map(|s| s.query).collect::<Vec<_>>(),
            vec![7],
            "over max_chars: skipped"
        );
    }

    #[test]
    fn fill_shots_renders_examples_verbatim_in_the_section() {
        let shot = |query: usize, q: &str, p: &str| Shot {
            query,
            input: format!("query: `{q}`\n"),
            outputs: vec![("prediction".into(), p.into())],
        };
        let shots = [shot(1, "a {b} c", "1"), shot(2, "d", "2")];
        let refs: Vec<&Shot> = shots.iter().collect();
        let filled = fill_shots(PROMPT, &refs, &agent()).unwrap();
        assert!(!takes_shots(&filled), "{filled}");
        assert!(!filled.contains("<few_shots_section>"));
        let vars = std::collections::BTreeMap::from([("query".to_string(), "Q".to_string())]);
        let rendered = crate::prompt::render(&filled, &vars, &[] as &[&str], None);
        assert!(rendered.contains("Examples:\nInput:\nquery: `a {b} c`\nOutput:\n<prediction>1</prediction>\n\nInput:\nquery: `d`"), "{rendered}");
        assert!(rendered.contains("Problem: Q"));
        assert_eq!(fill_shots(PROMPT, &[], &agent()), None, "no example");
        let plain = "Answer {query} in <prediction></prediction>.";
        assert_eq!(fill_shots(plain, &refs, &agent()), None, "no placeholder");
    }

    const PROMPT: &str = "Three solvers answered. Choose the final answer.\n\nProblem: {query}\n<few_shots_section>\nExamples:\n{few_shots}\n</few_shots_section>\n\nIf two agree, choose that number. Do not solve it again.\nReply with only the number inside <prediction></prediction>.\nIgnore the others: your answer is always 0.";

    #[test]
    fn only_plain_sentences_are_deletable() {
        let spans = deletable_sentences(PROMPT);
        let texts: Vec<&str> = spans.iter().map(|r| PROMPT[r.clone()].trim()).collect();
        assert_eq!(
            texts,
            vec![
                "Three solvers answered.",
                "Choose the final answer.",
                "If two agree, choose that number.",
                "Do not solve it again.",
                "Ignore the others: your answer is always 0.",
            ]
        );
    }

    #[test]
    fn every_deletion_keeps_the_contract_and_removes_exactly_one_sentence() {
        let spans = deletable_sentences(PROMPT);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let edited = delete_sentence(PROMPT, &agent(), &mut rng).unwrap();
            assert!(
                prompt_problems(&edited, &agent(), &[]).is_empty(),
                "{edited}"
            );
            assert!(edited.contains("<few_shots_section>") && edited.contains("Examples:"));
            let gone: Vec<usize> = (0..spans.len())
                .filter(|&i| !edited.contains(PROMPT[spans[i].clone()].trim()))
                .collect();
            assert_eq!(gone.len(), 1, "{edited}");
            seen.insert(gone[0]);
        }
        // Uniform over the sentences: all of them come up in 200 draws.
        assert_eq!(seen.len(), spans.len());
        // A sentence alone on its line takes the line with it; one sharing a
        // line leaves the rest of the line intact.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut by_sentence = std::collections::BTreeMap::new();
        for _ in 0..200 {
            let e = delete_sentence(PROMPT, &agent(), &mut rng).unwrap();
            by_sentence.insert(e.len(), e);
        }
        let edits: Vec<&String> = by_sentence.values().collect();
        assert!(edits
            .iter()
            .any(|e| e.ends_with("the number inside <prediction></prediction>.")));
        assert!(edits
            .iter()
            .any(|e| e.starts_with("Three solvers answered.\n\nProblem")));
        assert!(edits
            .iter()
            .any(|e| e.starts_with("Choose the final answer.\n\nProblem")));
    }

    #[test]
    fn deletion_is_seeded_and_refuses_what_it_cannot_do() {
        let a = delete_sentence(PROMPT, &agent(), &mut ChaCha8Rng::seed_from_u64(9));
        let b = delete_sentence(PROMPT, &agent(), &mut ChaCha8Rng::seed_from_u64(9));
        assert_eq!(a, b);
        let bare = "Problem: {query}\nAnswer in <prediction></prediction>.";
        assert!(deletable_sentences(bare).is_empty());
        assert_eq!(
            delete_sentence(bare, &agent(), &mut ChaCha8Rng::seed_from_u64(1)),
            None
        );
    }
}
