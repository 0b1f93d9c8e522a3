//! A scripted [`Llm`] for tests: answers come from a closure, tokens are
//! whitespace-separated words. Every optimizer and runtime test runs against it
//! so their outcomes are exactly known.

use super::{ChoiceRequest, ChoiceScores, Generation, Llm, LlmError, Request, Result, StopReason};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

type Script = dyn Fn(&Request) -> String + Send + Sync;
type Scores = dyn Fn(&ChoiceRequest) -> Vec<f64> + Send + Sync;

/// An [`Llm`] whose replies are produced by a function of the request.
#[derive(Clone)]
pub struct ScriptedLlm {
    script: Arc<Script>,
    scores: Option<Arc<Scores>>,
    calls: Arc<AtomicUsize>,
    batches: Arc<AtomicUsize>,
    name: String,
}

impl ScriptedLlm {
    /// Build from a reply function.
    pub fn new(f: impl Fn(&Request) -> String + Send + Sync + 'static) -> Self {
        Self {
            script: Arc::new(f),
            scores: None,
            calls: Arc::new(AtomicUsize::new(0)),
            batches: Arc::new(AtomicUsize::new(0)),
            name: "scripted".into(),
        }
    }
    /// Answer [`Llm::score_choices`] from a table: `f` gives each choice's
    /// log-probability (without it, scoring is unsupported).
    pub fn with_choice_scores(
        mut self,
        f: impl Fn(&ChoiceRequest) -> Vec<f64> + Send + Sync + 'static,
    ) -> Self {
        self.scores = Some(Arc::new(f));
        self
    }
    /// Set the model id reported by [`Llm::model_id`].
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }
    /// Number of requests answered so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    /// Number of `generate` calls (batches) so far.
    pub fn batches(&self) -> usize {
        self.batches.load(Ordering::SeqCst)
    }
}

/// Count whitespace-separated words (the scripted model's "tokens").
pub fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

impl Llm for ScriptedLlm {
    fn generate(&self, requests: &[Request]) -> Result<Vec<Generation>> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        Ok(requests
            .iter()
            .map(|r| {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let mut text = (self.script)(r);
                let mut stop_reason = StopReason::Eos;
                for s in &r.stop {
                    if let Some(i) = text.find(s.as_str()) {
                        text.truncate(i);
                        stop_reason = StopReason::StopString;
                    }
                }
                let words: Vec<&str> = text.split_whitespace().collect();
                if words.len() > r.max_new_tokens {
                    text = words[..r.max_new_tokens].join(" ");
                    stop_reason = StopReason::Length;
                }
                let prompt_tokens = r.messages.iter().map(|m| word_count(&m.content)).sum();
                Generation {
                    completion_tokens: word_count(&text),
                    text,
                    prompt_tokens,
                    cut_off: stop_reason == StopReason::Length,
                    stop_reason,
                    forced: Vec::new(),
                }
            })
            .collect())
    }

    fn score_choices(&self, requests: &[ChoiceRequest]) -> Result<Vec<ChoiceScores>> {
        let Some(f) = &self.scores else {
            return Err(LlmError::Unsupported(
                "this scripted model has no score table".into(),
            ));
        };
        requests
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let mut seen = std::collections::BTreeSet::new();
                if let Some(c) = r.choices.iter().find(|c| !seen.insert(c.as_str())) {
                    return Err(LlmError::BadRequest {
                        index,
                        message: format!("choice {c:?} duplicates another choice"),
                    });
                }
                if let Some(c) = r.choices.iter().find(|c| word_count(c) != 1) {
                    return Err(LlmError::BadRequest {
                        index,
                        message: format!("choice {c:?} is not exactly one token"),
                    });
                }
                let lp = f(r);
                if lp.len() != r.choices.len() {
                    return Err(LlmError::Other(format!(
                        "score table gave {} values for {} choices",
                        lp.len(),
                        r.choices.len()
                    )));
                }
                Ok(ChoiceScores::from_logprobs(lp))
            })
            .collect()
    }

    fn count_tokens(&self, text: &str) -> usize {
        word_count(text)
    }

    fn truncate_tokens(&self, text: &str, max_tokens: usize) -> String {
        let mut count = 0;
        let mut in_word = false;
        for (i, c) in text.char_indices() {
            if c.is_whitespace() {
                in_word = false;
            } else if !in_word {
                in_word = true;
                count += 1;
                if count > max_tokens {
                    return text[..i].trim_end().to_string();
                }
            }
        }
        text.to_string()
    }

    fn model_id(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_and_counts() {
        let l = ScriptedLlm::new(|_| "a b c d".into());
        assert_eq!(l.truncate_tokens("one two  three four", 2), "one two");
        assert_eq!(l.truncate_tokens("one two", 5), "one two");
        let r = Request::user("x y", 3);
        let g = l.generate(&[r]).unwrap();
        assert_eq!(g[0].text, "a b c");
        assert_eq!(g[0].stop_reason, StopReason::Length);
        assert_eq!(g[0].prompt_tokens, 2);
    }
}
