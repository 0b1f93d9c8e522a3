//! Meta-prompts for prompt rewriting (spec §6.1, §6.2, §6.4 — our own text,
//! same `<prompt>…</prompt>` output contract), extraction and validation of
//! generated prompts, and the batched meta-call driver with one regeneration.
//!
//! Tool-call tags are shielded in meta prompts ([`shield`]): Qwen2.5's
//! `<tool_call>` is a token of its own, and a rewriter that reads one in a
//! template switches to tool-call mode — Qwen2.5-Coder-1.5B copied the MBPP
//! validator's template up to its `check_tests` call and ended its turn there,
//! 3 times out of 3, so such a rewrite lost its output tags and was rejected
//! (one cause of the MBPP rejections, `benches/results/ev15v3-mbpp-cpu-blocks.md`).
//!
//! The second cause: the rewriter often mirrors the request's `<template>` tag
//! instead of `<prompt>` (3 of 9 MBPP mutation probes); [`extract_prompt`]
//! reads that tag too.
//!
//! Fix of spec §10.6/§10.12: a reply without `<prompt>` tags is rejected
//! instead of becoming the prompt, and every generated prompt must keep all of
//! the agent's `{input}` placeholders (`few_shots` optional) and mention all of
//! its `<output>` tags; otherwise it is regenerated once and then dropped.

use super::budget::StopReason;
use super::{Interrupt, MetaJob, OptimizeError};
use crate::graph::AgentSpec;
use crate::llm::{Llm, Request, Sampling};

/// Input variable that a prompt may omit.
pub const OPTIONAL_INPUT: &str = "few_shots";

fn var_lists(agent: &AgentSpec) -> (String, String) {
    let ins = agent
        .input_vars
        .iter()
        .filter(|v| v.as_str() != OPTIONAL_INPUT)
        .map(|v| format!("{{{v}}}"))
        .collect::<Vec<_>>()
        .join(", ");
    let outs = agent
        .output_vars
        .iter()
        .map(|v| format!("<{v}>"))
        .collect::<Vec<_>>()
        .join(", ");
    (ins, outs)
}

fn contract(agent: &AgentSpec) -> String {
    let (ins, outs) = var_lists(agent);
    let shots = if agent.input_vars.iter().any(|v| v == OPTIONAL_INPUT) {
        format!("- The placeholder {{{OPTIONAL_INPUT}}} (worked examples, possibly empty) may be kept or left out.\n")
    } else {
        String::new()
    };
    format!(
        "Rules for the new template:\n\
- It must contain each of these input placeholders, written exactly like this, with single curly braces: {ins}. \
You may move them, but do not rename, remove or add placeholders.\n\
{shots}- It must tell the model to write each of these outputs inside its own pair of XML tags: {outs} \
(for example <{first}>...</{first}>).\n\
- Keep any tool-call syntax and doubled braces {{{{ }}}} exactly as they are.\n\
Reply with the new template only, between <prompt> and </prompt>.",
        first = agent.output_vars.first().map(String::as_str).unwrap_or("answer"),
    )
}

/// Tool-call tags as a meta prompt writes them, and as the runtime needs them.
const SHIELDS: [(&str, &str); 2] = [
    ("<tool_call>", "[tool_call]"),
    ("</tool_call>", "[/tool_call]"),
];

/// `text` with its tool-call tags written `[tool_call]` / `[/tool_call]`, so a
/// rewriter reads them as text, not as its own tool-call tokens.
pub fn shield(text: &str) -> String {
    SHIELDS.iter().fold(text.to_string(), |t, (tag, shielded)| {
        t.replace(tag, shielded)
    })
}

/// Inverse of [`shield`], applied to every generated prompt.
pub fn unshield(text: &str) -> String {
    SHIELDS.iter().fold(text.to_string(), |t, (tag, shielded)| {
        t.replace(shielded, tag)
    })
}

/// Mutation meta-prompt: rephrase one template, same meaning, slightly different style.
pub fn mutation_prompt(agent: &AgentSpec, instruction: &str) -> String {
    shield(&format!(
        "You improve instructions for one step of an AI pipeline.\n\
The step's job: {desc}\n\n\
Here is the current instruction template for this step:\n<template>\n{instruction}\n</template>\n\n\
Write a variant of it that keeps the same intent but changes the wording, emphasis or structure a little, \
so that the model doing this step is more likely to succeed.\n{rules}",
        desc = agent.task_description.trim(),
        rules = contract(agent),
    ))
}

/// Crossover meta-prompt: merge two parent templates into one.
pub fn crossover_prompt(agent: &AgentSpec, mother: &str, father: &str) -> String {
    shield(&format!(
        "You improve instructions for one step of an AI pipeline.\n\
The step's job: {desc}\n\n\
Two instruction templates for this step have worked reasonably well:\n\
<template_a>\n{mother}\n</template_a>\n<template_b>\n{father}\n</template_b>\n\n\
Combine them into a single coherent template that takes the strongest guidance from each and reads as one text.\n{rules}",
        desc = agent.task_description.trim(),
        rules = contract(agent),
    ))
}

/// EvoPrompt-GA meta-prompt: cross over two parents, then mutate the result, in one call.
pub fn ga_prompt(agent: &AgentSpec, p1: &str, p2: &str) -> String {
    shield(&format!(
        "You evolve instructions for one step of an AI pipeline.\n\
The step's job: {desc} The pipeline reads this step's results from the XML tags named below.\n\n\
Parent 1:\n<template_a>\n{p1}\n</template_a>\nParent 2:\n<template_b>\n{p2}\n</template_b>\n\n\
First cross the two parents over: build a child that mixes parts of both. Then mutate the child: \
change some of its wording so it differs from both parents. Output only the final child.\n{rules}",
        desc = agent.task_description.trim(),
        rules = contract(agent),
    ))
}

/// The prompt in a meta reply: the text after the last `<prompt>` up to the
/// next `</prompt>` (or the end of the reply), trimmed. A reply without
/// `<prompt>` that wraps its template in `<template>` — the tag the mutation
/// request shows the current template in — is read the same way:
/// Qwen2.5-Coder-1.5B answered 3 of 9 MBPP mutation probes so, and those
/// rewrites were rejected until this fallback. `None` without either tag or
/// when empty.
///
/// A body that is itself one wrapper block, `<template…>…</template…>`, is
/// unwrapped: the rewriter answered `<prompt><template>new</template></prompt>`,
/// and once (`ev15v9` seed 7) wrapped a good merge in a `<template_c>` of its
/// own invention.
pub fn extract_prompt(reply: &str) -> Option<String> {
    let body = tagged(reply, "prompt").or_else(|| tagged(reply, "template"))?;
    let unwrapped = WRAPPER_TAG
        .captures(&body)
        .filter(|c| c.get(0).is_some_and(|m| m.start() == 0) && !c[0].starts_with("</"))
        .and_then(|c| {
            body.strip_prefix(&c[0])?
                .strip_suffix(&format!("</{}>", &c[1]))
        })
        .map(str::trim)
        .filter(|inner| !inner.is_empty() && !WRAPPER_TAG.is_match(inner));
    Some(unwrapped.map_or(body.clone(), str::to_string))
}

/// The tags the meta prompts write around templates (`<prompt>`,
/// `<template>`, `<template_a>`, `<template_b>`) and the like (`<template_c>`),
/// opening or closing. A generated prompt that contains one (and whose
/// sources do not) is a copy of the request, not a template:
/// Qwen2.5-Coder-1.5B answered every GSM8K crossover of `ev15v8` seed 7 (7 of
/// 7 offspring) with both parents pasted one after the other,
/// `<template_a>`/`<template_b>` wrappers included.
static WRAPPER_TAG: std::sync::LazyLock<regex::Regex> =
    std::sync::LazyLock::new(|| regex::Regex::new(r"</?(prompt|template\w*)>").unwrap());

/// Text after the last `<tag>` up to the next `</tag>` or the end, trimmed;
/// `None` when absent or empty.
fn tagged(reply: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let i = reply.rfind(&open)?;
    let rest = &reply[i + open.len()..];
    let body = match rest.find(&close) {
        Some(j) => &rest[..j],
        None => rest,
    };
    let body = body.trim();
    (!body.is_empty()).then(|| body.to_string())
}

/// Problems of a generated prompt for `agent` (empty = valid): missing input
/// placeholders (`few_shots` is optional), output tags never mentioned, the
/// meta prompts' own wrapper tags ([`WRAPPER_TAG`]) and an input placeholder
/// written more often than in any of `sources`, the templates the prompt was
/// generated from (both mark a reply that pasted its parents together: the
/// pipeline would show the model the query twice). Tags and repeats that a
/// source already has are allowed; with no sources, each placeholder may
/// appear once.
pub fn prompt_problems(prompt: &str, agent: &AgentSpec, sources: &[&str]) -> Vec<String> {
    // The runtime's own placeholder parser, so an escaped `{{var}}` does not count.
    let mut problems: Vec<String> = crate::prompt::missing_placeholders(prompt, &agent.input_vars)
        .into_iter()
        .map(|v| format!("missing placeholder {{{v}}}"))
        .collect();
    problems.extend(
        crate::prompt::missing_output_tags(prompt, &agent.output_vars)
            .into_iter()
            .map(|v| format!("missing output tag <{v}>")),
    );
    let mut tags: Vec<&str> = Vec::new();
    for c in WRAPPER_TAG.captures_iter(prompt) {
        let tag = c.get(1).map_or("", |m| m.as_str());
        let foreign = !agent.output_vars.iter().any(|v| v == tag)
            && !sources
                .iter()
                .any(|s| s.contains(&format!("<{tag}>")) || s.contains(&format!("</{tag}>")));
        if foreign && !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    problems.extend(tags.iter().map(|tag| {
        format!(
            "contains the rewriting request's <{tag}> tag (a copy of the request, not a template)"
        )
    }));
    for v in &agent.input_vars {
        let n = crate::prompt::placeholder_count(prompt, v);
        let allowed = sources
            .iter()
            .map(|s| crate::prompt::placeholder_count(s, v))
            .max()
            .unwrap_or(0)
            .max(1);
        if n > allowed {
            problems.push(format!(
                "placeholder {{{v}}} written {n} times (at most {allowed} in the template it rewrites)"
            ));
        }
    }
    problems
}

/// Output of [`run_meta_jobs`].
#[derive(Clone, Debug, Default)]
pub struct MetaOutcome {
    /// Per job, the valid prompt or `None` (rejected twice).
    pub prompts: Vec<Option<String>>,
    /// Per job, how many generated prompts were rejected (0, 1 or 2).
    pub rejections: Vec<usize>,
    /// Per job, why each rejected reply was rejected (one line per reply,
    /// e.g. `missing output tag <answer>; cut off at 256 tokens`).
    pub reasons: Vec<Vec<String>>,
    /// Prompt tokens spent.
    pub input_tokens: usize,
    /// Completion tokens spent.
    pub output_tokens: usize,
    /// Set when the budget check refused a batch: the jobs are incomplete,
    /// and the token counts above are what was spent before the refusal.
    pub stopped: Option<StopReason>,
}

/// Seed of the regeneration of a rejected meta job.
pub fn regen_seed(seed: u64) -> u64 {
    super::derive_seed(seed, &[super::tag("regenerate")])
}

/// Run meta jobs (each for the agent at the same index of `agents`) as one
/// batch; rejected outputs are regenerated once, in a second batch, with
/// another seed. Before each batch, `check` is called with the batch's
/// projected tokens plus the tokens already spent by this call; an `Err`
/// stops before dispatching and is returned in [`MetaOutcome::stopped`].
pub fn run_meta_jobs(
    llm: &dyn Llm,
    jobs: &[MetaJob],
    agents: &[&AgentSpec],
    max_new_tokens: usize,
    temperature: f64,
    check: &mut dyn FnMut(u64) -> Result<(), StopReason>,
) -> Result<MetaOutcome, OptimizeError> {
    let mut out = MetaOutcome {
        prompts: vec![None; jobs.len()],
        rejections: vec![0; jobs.len()],
        reasons: vec![Vec::new(); jobs.len()],
        ..Default::default()
    };
    if jobs.is_empty() {
        return Ok(out);
    }
    let mut send = |idx: &[usize], seeds: &[u64], out: &mut MetaOutcome| -> Result<(), Interrupt> {
        let projected: u64 = idx
            .iter()
            .map(|&i| (llm.count_tokens(&jobs[i].prompt) + max_new_tokens) as u64)
            .sum();
        check(projected + (out.input_tokens + out.output_tokens) as u64)
            .map_err(Interrupt::Stop)?;
        let reqs: Vec<Request> = idx
            .iter()
            .zip(seeds)
            .map(|(&i, &s)| {
                Request::user(jobs[i].prompt.clone(), max_new_tokens)
                    .with_sampling(Sampling::temperature(temperature))
                    .with_seed(s)
            })
            .collect();
        let gens = llm
            .generate(&reqs)
            .map_err(|e| Interrupt::Error(e.into()))?;
        if gens.len() != reqs.len() {
            return Err(Interrupt::Error(OptimizeError::Shape {
                expected: format!("{} meta generations", reqs.len()),
                got: format!("{}", gens.len()),
            }));
        }
        for (&i, g) in idx.iter().zip(&gens) {
            out.input_tokens += g.prompt_tokens;
            out.output_tokens += g.completion_tokens;
            let problems = match extract_prompt(&g.text).map(|p| unshield(&p)) {
                Some(p) => {
                    let sources: Vec<&str> = jobs[i].sources.iter().map(String::as_str).collect();
                    let problems = prompt_problems(&p, agents[i], &sources);
                    if problems.is_empty() {
                        out.prompts[i] = Some(p);
                        continue;
                    }
                    problems
                }
                None => vec!["reply without <prompt> tags".to_string()],
            };
            let mut reason = problems.join("; ");
            if g.cut_off || g.stop_reason == crate::llm::StopReason::Length {
                reason.push_str(&format!("; cut off at {max_new_tokens} tokens"));
            }
            tracing::debug!(agent = %agents[i].name, %reason, "generated prompt rejected");
            out.rejections[i] += 1;
            out.reasons[i].push(reason);
        }
        Ok(())
    };
    let all: Vec<usize> = (0..jobs.len()).collect();
    let seeds: Vec<u64> = jobs.iter().map(|j| j.seed).collect();
    let stop = |r: Result<(), Interrupt>, out: &mut MetaOutcome| -> Result<bool, OptimizeError> {
        match r {
            Ok(()) => Ok(false),
            Err(Interrupt::Stop(reason)) => {
                out.stopped = Some(reason);
                Ok(true)
            }
            Err(Interrupt::Error(e)) => Err(e),
        }
    };
    let r = send(&all, &seeds, &mut out);
    if stop(r, &mut out)? {
        return Ok(out);
    }
    let again: Vec<usize> = all
        .into_iter()
        .filter(|&i| out.prompts[i].is_none())
        .collect();
    if !again.is_empty() {
        let seeds2: Vec<u64> = again.iter().map(|&i| regen_seed(jobs[i].seed)).collect();
        let r = send(&again, &seeds2, &mut out);
        stop(r, &mut out)?;
    }
    Ok(out)
}

/// Projected tokens of a batch of meta jobs (prompt tokens + the reply cap).
pub fn project_meta_tokens(llm: &dyn Llm, jobs: &[MetaJob], max_new_tokens: usize) -> usize {
    jobs.iter()
        .map(|j| llm.count_tokens(&j.prompt) + max_new_tokens)
        .sum()
}

#[cfg(test)]
mod tests {

    #[test]
    fn escaped_braces_do_not_count_as_placeholders() {
        let agent = crate::graph::AgentSpec {
            name: "a".into(),
            task_description: String::new(),
            input_vars: vec!["query".into(), "few_shots".into()],
            output_vars: vec!["answer".into()],
            tools: vec![],
            max_tool_calls: 0,
            output_grammars: Default::default(),
            fenced_outputs: Vec::new(),
        };
        assert!(
            prompt_problems("Solve {query}. Put it in <answer></answer>.", &agent, &[]).is_empty()
        );
        let p = prompt_problems("Solve {{query}}. Put it in <answer></answer>.", &agent, &[]);
        assert_eq!(p, vec!["missing placeholder {query}".to_string()]);
        let p = prompt_problems("Solve {query}.", &agent, &[]);
        assert_eq!(p, vec!["missing output tag <answer>".to_string()]);
    }

    use super::*;
    use crate::llm::ScriptedLlm;

    fn agent() -> AgentSpec {
        AgentSpec {
            name: "solver".into(),
            task_description: "Solve the math problem.".into(),
            input_vars: vec!["query".into(), "few_shots".into()],
            output_vars: vec!["answer".into()],
            tools: vec![],
            max_tool_calls: 0,
            output_grammars: Default::default(),
            fenced_outputs: Vec::new(),
        }
    }

    #[test]
    fn extracts_last_prompt_block() {
        assert_eq!(
            extract_prompt("x <prompt>a</prompt> y <prompt> b </prompt>"),
            Some("b".into())
        );
        assert_eq!(
            extract_prompt("<prompt>open ended"),
            Some("open ended".into())
        );
        assert_eq!(extract_prompt("no tags at all"), None);
        // The rewriter mirrored the request's <template> tag.
        assert_eq!(
            extract_prompt("<template>\nSolve {query}.\n</template>").as_deref(),
            Some("Solve {query}.")
        );
        // <prompt> wins when both appear.
        assert_eq!(
            extract_prompt("<template>old</template> <prompt>new</prompt>").as_deref(),
            Some("new")
        );
        assert_eq!(extract_prompt("<template_a>x</template_a>"), None);
        assert_eq!(extract_prompt("<prompt>  </prompt>"), None);
    }

    #[test]
    fn validates_placeholders_and_tags() {
        let a = agent();
        assert!(prompt_problems("Solve {query}. Put it in <answer>.", &a, &[]).is_empty());
        assert_eq!(
            prompt_problems("Solve it. <answer>", &a, &[]),
            vec!["missing placeholder {query}"]
        );
        assert_eq!(
            prompt_problems("Solve {query}.", &a, &[]),
            vec!["missing output tag <answer>"]
        );
    }

    /// The shape of every GSM8K crossover child of `ev15v8` seed 7: both
    /// parents pasted in their request wrappers, so the query appears twice.
    #[test]
    fn a_reply_that_pastes_its_parents_together_is_rejected() {
        let a = agent();
        let ma = "Solve {query}.\n<few_shots_section>{few_shots}</few_shots_section>\nAnswer in <answer></answer>.";
        let fa = "Problem: {query}\nThink step by step, then write <answer>the number</answer>.";
        let pasted = format!("<template>\n<template_a>\n{ma}\n</template_a>\n<template_b>\n{fa}\n</template_b>\n</template>");
        let reply = format!("<prompt>\n{pasted}\n</prompt>");
        let p = extract_prompt(&reply).unwrap();
        assert_eq!(
            prompt_problems(&p, &a, &[ma, fa]),
            vec![
                "contains the rewriting request's <template> tag (a copy of the request, not a template)",
                "contains the rewriting request's <template_a> tag (a copy of the request, not a template)",
                "contains the rewriting request's <template_b> tag (a copy of the request, not a template)",
                "placeholder {query} written 2 times (at most 1 in the template it rewrites)",
            ]
        );
        // Without the wrappers, the repeated query still gives it away.
        let joined = format!("{ma}\n\n{fa}");
        assert_eq!(
            prompt_problems(&joined, &a, &[ma, fa]),
            vec!["placeholder {query} written 2 times (at most 1 in the template it rewrites)"]
        );
        // A real combination passes, and so does a repeat or a tag that a
        // parent already had.
        let merged =
            "Problem: {query}\n{few_shots}\nThink step by step, then answer in <answer></answer>.";
        assert!(prompt_problems(merged, &a, &[ma, fa]).is_empty());
        let twice = "Read {query}. Again: {query}. <answer></answer> <prompt>";
        assert!(prompt_problems(twice, &a, &[twice]).is_empty());
        assert_eq!(prompt_problems(twice, &a, &[]).len(), 2);
        // An output variable named like a meta tag is the agent's own tag.
        let b = AgentSpec {
            output_vars: vec!["prompt".into()],
            ..agent()
        };
        assert!(prompt_problems("Rewrite {query} into <prompt></prompt>.", &b, &[]).is_empty());
    }

    #[test]
    fn a_prompt_wrapped_in_one_template_block_is_unwrapped() {
        assert_eq!(
            extract_prompt("<prompt>\n<template>\nSolve {query}.\n</template>\n</prompt>")
                .as_deref(),
            Some("Solve {query}.")
        );
        // A wrapper the rewriter invented.
        assert_eq!(
            extract_prompt("<prompt><template_c>\nSolve {query}.\n</template_c></prompt>")
                .as_deref(),
            Some("Solve {query}.")
        );
        assert_eq!(
            prompt_problems("<template_c>Solve {query} in <answer></answer>.", &agent(), &[]),
            vec!["contains the rewriting request's <template_c> tag (a copy of the request, not a template)"]
        );
        // Two blocks stay as they are (and are then rejected by their tags).
        let two = "<prompt><template>A</template><template>B</template></prompt>";
        assert_eq!(
            extract_prompt(two).as_deref(),
            Some("<template>A</template><template>B</template>")
        );
    }

    #[test]
    fn meta_prompts_carry_the_contract() {
        let a = agent();
        let m = mutation_prompt(&a, "Solve {query} into <answer></answer>");
        assert!(m.contains("Solve the math problem."));
        assert!(m.contains("curly braces: {query}."));
        assert!(m.contains("{few_shots} (worked examples"));
        assert!(m.contains("<answer>"));
        assert!(m.contains("<prompt>"));
        let c = crossover_prompt(&a, "AAA", "BBB");
        assert!(c.contains("AAA") && c.contains("BBB"));
    }

    #[test]
    fn tool_call_tags_are_shielded_in_meta_prompts_and_restored_in_replies() {
        let a = AgentSpec {
            name: "validator".into(),
            tools: vec!["check_tests".into()],
            ..agent()
        };
        let template = "Check {query}.\nFirst call <tool_call>{{\"name\": \"check_tests\"}}</tool_call>\nThen <answer></answer>.";
        for m in [
            mutation_prompt(&a, template),
            crossover_prompt(&a, template, template),
            ga_prompt(&a, template, template),
        ] {
            assert!(
                !m.contains("<tool_call>") && !m.contains("</tool_call>"),
                "{m}"
            );
            assert!(m.contains("[tool_call]{{\"name\": \"check_tests\"}}[/tool_call]"));
        }
        assert_eq!(unshield(&shield(template)), template);
        // A rewriter that copies the template between <template> tags: the
        // generated prompt gets its real tool-call tags back.
        let llm = ScriptedLlm::new(|r| {
            let p = &r.messages.last().unwrap().content;
            let body = &p[p.find("<template>").unwrap() + 10..p.find("</template>").unwrap()];
            format!("<prompt>{body}</prompt>")
        });
        let jobs = vec![MetaJob {
            prompt: mutation_prompt(&a, template),
            seed: 1,
            sources: vec![template.to_string()],
        }];
        let out = run_meta_jobs(&llm, &jobs, &[&a], 100, 0.1, &mut |_| Ok(())).unwrap();
        assert_eq!(out.prompts[0].as_deref(), Some(template));
    }

    #[test]
    fn rejected_output_is_regenerated_once_then_dropped() {
        // seed 1: always invalid; seed 2: invalid first, valid on regeneration; seed 3: valid.
        let r1 = regen_seed(1);
        let r2 = regen_seed(2);
        let llm = ScriptedLlm::new(move |r| match r.seed {
            3 => "<prompt>Solve {query} in <answer></answer></prompt>".into(),
            s if s == r2 => "<prompt>Think, then solve {query}; <answer></answer></prompt>".into(),
            s if s == r1 => "<prompt>forgot everything</prompt>".into(),
            _ => "no tags".into(),
        });
        let a = agent();
        let jobs: Vec<MetaJob> = [1u64, 2, 3]
            .iter()
            .map(|&s| MetaJob {
                prompt: "p".into(),
                seed: s,
                sources: vec![],
            })
            .collect();
        let out = run_meta_jobs(&llm, &jobs, &[&a, &a, &a], 100, 0.1, &mut |_| Ok(())).unwrap();
        assert_eq!(out.prompts[0], None);
        assert_eq!(
            out.prompts[1].as_deref(),
            Some("Think, then solve {query}; <answer></answer>")
        );
        assert_eq!(
            out.prompts[2].as_deref(),
            Some("Solve {query} in <answer></answer>")
        );
        assert_eq!(out.rejections, vec![2, 1, 0]);
        assert_eq!(
            out.reasons,
            vec![
                vec![
                    "reply without <prompt> tags".to_string(),
                    "missing placeholder {query}; missing output tag <answer>".to_string()
                ],
                vec!["reply without <prompt> tags".to_string()],
                vec![]
            ]
        );
        assert_eq!(llm.batches(), 2);
        assert_eq!(llm.calls(), 5);
        // A budget check that refuses the regeneration batch stops cleanly.
        let mut seen = Vec::new();
        let r = run_meta_jobs(&llm, &jobs, &[&a, &a, &a], 100, 0.1, &mut |p| {
            seen.push(p);
            if seen.len() > 1 {
                Err(StopReason::Interrupted)
            } else {
                Ok(())
            }
        });
        let r = r.unwrap();
        assert_eq!(r.stopped, Some(StopReason::Interrupted));
        assert!(r.input_tokens > 0, "tokens of the first batch are reported");
        assert_eq!(seen.len(), 2);
        assert!(seen[1] > 0);
    }
}
