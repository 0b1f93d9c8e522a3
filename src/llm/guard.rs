//! Tag guard: a per-request output constraint enforced while decoding, so a
//! small model never loses an agent's answer to format (not in the paper or
//! the reference, which parse `<var>…</var>` tags after the fact and fail
//! when they are missing; see `../shared/docs/attribution-and-constraints.md`
//! §3–§4c).
//!
//! The guard is a pure state machine over the request's own decoded reply and
//! its remaining token budget:
//!
//! - while some required tag is missing, end-of-sequence never ends the
//!   reply: when the model samples it, the guard wraps up instead — it
//!   forces the next tag boundary right there (the close of the open tag,
//!   else `<tag>` of the first missing one), so a model that has finished
//!   its answer in prose writes the missing tag next rather than rambling
//!   to the token limit; inside a just-opened tag with an empty body,
//!   end-of-sequence is banned (its logits set to −∞) until the body has a
//!   token;
//! - when the remaining budget only just fits the missing tags (their literal
//!   tokens plus [`OutputConstraint::body_min_tokens`] per tag not yet
//!   opened), the literal tokens of the next tag boundary are forced: the
//!   close of the open tag, else `<tag>` of the first missing one;
//! - the reply ends right after the last required tag closes;
//! - once an escape string appears (e.g. `<tool_call>` in a tool turn) the
//!   guard steps aside for the rest of the reply.
//!
//! A tag counts as written exactly when [`crate::prompt::extract_tag`] finds
//! it. Forced tokens draw no randomness, so a request's text depends only on
//! its own seed and history, alone or in any batch.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// What a reply must contain: every tag of `tags` as a complete
/// `<tag>…</tag>` pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OutputConstraint {
    /// Required tag names (e.g. an agent's output variables), in the order
    /// they are forced when the model does not write them.
    pub tags: Vec<String>,
    /// Once any of these strings appears, the reply is free (e.g.
    /// `<tool_call>`: a tool call is another valid end of a turn).
    #[serde(default)]
    pub escapes: Vec<String>,
    /// Tokens kept free for the body of each tag not yet opened when deciding
    /// to force it (the model writes the body; only the tags are forced).
    #[serde(default = "default_body")]
    pub body_min_tokens: usize,
}

fn default_body() -> usize {
    16
}

impl OutputConstraint {
    /// Require `tags`, no escapes, the default body reserve.
    pub fn tags<S: Into<String>>(tags: impl IntoIterator<Item = S>) -> Self {
        Self {
            tags: tags.into_iter().map(Into::into).collect(),
            escapes: Vec::new(),
            body_min_tokens: default_body(),
        }
    }
    /// Builder: strings after which the reply is unconstrained.
    pub fn with_escapes(mut self, escapes: Vec<String>) -> Self {
        self.escapes = escapes;
        self
    }
}

/// Where a reply stands against its constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagState {
    /// Every required tag is written: the reply is complete.
    Complete,
    /// An escape string appeared: no constraint any more.
    Escaped,
    /// Some tags are missing; `open` is the one whose `<tag>` is written but
    /// not closed, if any; `missing` lists the others not written, in order.
    Missing {
        /// Index of the open tag.
        open: Option<usize>,
        /// Indices of tags neither written nor open.
        unstarted: Vec<usize>,
    },
}

/// The guard's state for one sequence.
#[derive(Debug, Clone)]
pub struct TagGuard {
    c: OutputConstraint,
    /// `<tag>` of every required tag (checked on every token).
    open_lits: Vec<String>,
    open_ids: Vec<Vec<u32>>,
    open_nl_ids: Vec<Vec<u32>>,
    close_ids: Vec<Vec<u32>>,
    forced: VecDeque<u32>,
    forced_literals: Vec<String>,
    state: TagState,
    /// The reply so far is empty or ends with a newline.
    line_start: bool,
    /// A boundary was forced because the budget only just fit the missing tags.
    budget_hit: bool,
    /// The reply so far ends with the open literal of the open tag (empty body).
    empty_body: bool,
}

/// What to do for the next token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Emit this token without sampling.
    Force(u32),
    /// Sample; with `ban_eos` the end-of-sequence tokens are not allowed.
    /// Pass the sampled token through [`TagGuard::replace_eos`].
    Sample {
        /// Whether end-of-sequence must be masked.
        ban_eos: bool,
    },
}

impl TagGuard {
    /// A guard for `c` on a reply of at most `max_new_tokens` tokens, with
    /// `encode` giving the token ids of a literal (no special tokens).
    pub fn new(
        c: &OutputConstraint,
        max_new_tokens: usize,
        encode: &dyn Fn(&str) -> Vec<u32>,
    ) -> Self {
        let open_ids = c.tags.iter().map(|t| encode(&format!("<{t}>"))).collect();
        let open_nl_ids = c.tags.iter().map(|t| encode(&format!("\n<{t}>"))).collect();
        let close_ids = c.tags.iter().map(|t| encode(&format!("</{t}>"))).collect();
        let mut g = Self {
            open_lits: c.tags.iter().map(|t| format!("<{t}>")).collect(),
            c: c.clone(),
            open_ids,
            open_nl_ids,
            close_ids,
            forced: VecDeque::new(),
            forced_literals: Vec::new(),
            state: TagState::Complete,
            line_start: true,
            budget_hit: false,
            empty_body: false,
        };
        g.observe("", max_new_tokens);
        g
    }

    /// Where `text` stands against the constraint.
    pub fn classify(&self, text: &str) -> TagState {
        if self.c.escapes.iter().any(|e| text.contains(e.as_str())) {
            return TagState::Escaped;
        }
        let mut open = None;
        let mut unstarted = Vec::new();
        for (i, t) in self.c.tags.iter().enumerate() {
            if crate::prompt::extract_tag(text, t).is_some() {
                continue;
            }
            if open.is_none() && text.contains(self.open_lits[i].as_str()) {
                open = Some(i);
            } else {
                unstarted.push(i);
            }
        }
        if open.is_none() && unstarted.is_empty() {
            TagState::Complete
        } else {
            TagState::Missing { open, unstarted }
        }
    }

    /// Tokens the missing tags still need: the open tag's close, and for
    /// every unstarted tag its open and close literals plus the body reserve.
    fn reserve(&self, open: Option<usize>, unstarted: &[usize]) -> usize {
        open.map_or(0, |i| self.close_ids[i].len())
            + unstarted
                .iter()
                .map(|&i| {
                    self.open_nl_ids[i].len() + self.close_ids[i].len() + self.c.body_min_tokens
                })
                .sum::<usize>()
    }

    /// The next token's action (call before choosing it).
    pub fn next_action(&mut self) -> Action {
        if let Some(t) = self.forced.pop_front() {
            return Action::Force(t);
        }
        Action::Sample {
            ban_eos: self.active() && self.empty_body,
        }
    }

    /// The token to emit for a sampled one: an end-of-sequence token while
    /// tags are missing becomes the first token of the next tag boundary
    /// (which is forced from then on); anything else passes through.
    pub fn replace_eos(&mut self, token: u32, is_eos: bool) -> u32 {
        if !is_eos || !self.active() {
            return token;
        }
        if self.forced.is_empty() {
            self.force_boundary();
        }
        self.forced.pop_front().unwrap_or(token)
    }

    /// Queue the literal tokens of the next tag boundary: the close of the
    /// open tag, else the open of the first missing one.
    fn force_boundary(&mut self) {
        let TagState::Missing { open, unstarted } = &self.state else {
            return;
        };
        let (lit, ids) = match open {
            Some(i) => (format!("</{}>", self.c.tags[*i]), &self.close_ids[*i]),
            None => {
                let Some(&i) = unstarted.first() else {
                    return;
                };
                if self.line_start {
                    (self.open_lits[i].clone(), &self.open_ids[i])
                } else {
                    (self.open_lits[i].clone(), &self.open_nl_ids[i])
                }
            }
        };
        self.forced.extend(ids.iter().copied());
        self.forced_literals.push(lit);
    }

    /// Take the reply so far (`text`, decoded) and the tokens still allowed
    /// (`remaining`). Returns true when the reply is complete and must end.
    pub fn observe(&mut self, text: &str, remaining: usize) -> bool {
        self.state = self.classify(text);
        self.line_start = text.is_empty() || text.ends_with('\n');
        self.empty_body = match &self.state {
            TagState::Missing { open: Some(i), .. } => {
                text.trim_end().ends_with(self.open_lits[*i].as_str())
            }
            _ => false,
        };
        match &self.state {
            TagState::Complete => {
                self.forced.clear();
                true
            }
            TagState::Escaped => {
                self.forced.clear();
                false
            }
            TagState::Missing { open, unstarted } => {
                if self.forced.is_empty() && remaining <= self.reserve(*open, unstarted) {
                    self.budget_hit = true;
                    self.force_boundary();
                }
                false
            }
        }
    }

    /// Tag literals the guard forced so far (e.g. `</prediction>`), in order.
    pub fn forced_literals(&self) -> &[String] {
        &self.forced_literals
    }

    /// Whether a tag had to be forced because the token budget ran out (the
    /// reply was cut off), not because the model chose to end.
    pub fn budget_hit(&self) -> bool {
        self.budget_hit
    }

    /// Whether the reply is still held to the constraint (not complete, not escaped).
    pub fn active(&self) -> bool {
        matches!(self.state, TagState::Missing { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per byte.
    fn bytes(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    const EOS: u32 = 300;

    /// Decode with a model that always prefers EOS, then 'x': returns the text.
    fn run(c: &OutputConstraint, max_new: usize) -> (String, Vec<String>, bool) {
        let mut g = TagGuard::new(c, max_new, &bytes);
        let mut out: Vec<u8> = Vec::new();
        let mut ended_by_eos = false;
        for step in 0..max_new {
            let tok = match g.next_action() {
                Action::Force(t) => t,
                Action::Sample { ban_eos } => {
                    let sampled = if ban_eos { u32::from(b'x') } else { EOS };
                    g.replace_eos(sampled, sampled == EOS)
                }
            };
            if tok == EOS {
                ended_by_eos = true;
                break;
            }
            out.push(tok as u8);
            let text = String::from_utf8(out.clone()).unwrap();
            if g.observe(&text, max_new - step - 1) {
                break;
            }
        }
        (
            String::from_utf8(out).unwrap(),
            g.forced_literals().to_vec(),
            ended_by_eos,
        )
    }

    #[test]
    fn eos_loving_model_still_writes_every_tag_in_order() {
        let c = OutputConstraint::tags(["plan", "code"]);
        for max_new in [80, 200] {
            let (text, forced, eos) = run(&c, max_new);
            assert!(!eos, "EOS was allowed before the tags");
            let p = text.find("<plan>").unwrap();
            let q = text.find("<code>").unwrap();
            assert!(p < q, "{text}");
            assert!(
                crate::prompt::extract_tag(&text, "plan").is_some(),
                "{text}"
            );
            assert!(
                crate::prompt::extract_tag(&text, "code").is_some(),
                "{text}"
            );
            assert!(
                text.ends_with("</code>"),
                "ends right after the last tag: {text}"
            );
            assert_eq!(forced, ["<plan>", "</plan>", "<code>", "</code>"]);
            assert!(text.len() <= max_new);
        }
    }

    #[test]
    fn budget_barely_above_the_tags_still_parses() {
        let c = OutputConstraint::tags(["a", "bb"]);
        // Literals: "<a>" 3 + "</a>" 4 + "\n<bb>" 5 + "</bb>" 5 = 17 bytes.
        for max_new in 17..24 {
            let (text, _, _) = run(&c, max_new);
            assert!(
                crate::prompt::extract_tag(&text, "a").is_some(),
                "{max_new}: {text:?}"
            );
            assert!(
                crate::prompt::extract_tag(&text, "bb").is_some(),
                "{max_new}: {text:?}"
            );
        }
    }

    #[test]
    fn written_tags_are_not_forced_and_escape_frees_the_reply() {
        let c = OutputConstraint::tags(["p"]).with_escapes(vec!["<tool_call>".into()]);
        let mut g = TagGuard::new(&c, 100, &bytes);
        assert!(!g.observe("thinking <p>", 100));
        assert!(
            matches!(g.next_action(), Action::Sample { ban_eos: true }),
            "an empty body needs a token"
        );
        assert!(!g.observe("thinking <p>4", 99));
        assert!(matches!(g.next_action(), Action::Sample { ban_eos: false }));
        assert_eq!(g.replace_eos(7, false), 7, "other tokens pass through");
        // End-of-sequence inside the open tag wraps up: its close is forced.
        assert_eq!(g.replace_eos(EOS, true), u32::from(b'<'));
        assert!(matches!(g.next_action(), Action::Force(t) if t == u32::from(b'/')));
        assert_eq!(g.forced_literals(), ["</p>"]);
        assert!(g.observe("thinking <p>4</p>", 90));
        let mut g = TagGuard::new(&c, 100, &bytes);
        assert!(!g.observe("<tool_call>{", 5));
        assert!(matches!(g.next_action(), Action::Sample { ban_eos: false }));
        assert!(g.forced_literals().is_empty());
        // An open tag near the end of the budget gets its close forced.
        let mut g = TagGuard::new(&c, 100, &bytes);
        assert!(!g.observe("<p>41", 4));
        let forced: Vec<u32> = (0..4)
            .map(|_| match g.next_action() {
                Action::Force(t) => t,
                a => panic!("{a:?}"),
            })
            .collect();
        assert_eq!(forced, bytes("</p>"));
        assert_eq!(g.forced_literals(), ["</p>"]);
    }
}
