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

use super::meta::prompt_problems;
use crate::graph::AgentSpec;
use rand::Rng;
use std::ops::Range;

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
    (prompt_problems(&edited, agent).is_empty() && edited != prompt.trim_end()).then_some(edited)
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
            assert!(prompt_problems(&edited, &agent()).is_empty(), "{edited}");
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
