//! Contrastive credit attribution (paper §3, reference spec §4.3 and §6.3).
//!
//! For one query, the attributer is shown a small group of rollouts of
//! *different* joint configurations side by side (system score, final
//! prediction and every agent's outputs) and asked how much each agent helped
//! or hurt in each rollout, as a credit in [-1, 1]. Those per-query credits are
//! what each agent's local optimizer races its candidates on.
//!
//! Differences from the reference (fixes of spec §10): groups always contrast
//! new candidates with the incumbent configuration ([`contrast_groups`],
//! shuffled with a seeded RNG instead of fixed index chunks); a reply that
//! cannot be parsed is retried once with another seed and then gives
//! **missing** credits (`None`), never 0; the attribution prompt is our own.
//!
//! Three implementations of the [`Attributer`] trait: [`LlmAttributer`] (the
//! method: a generated JSON verdict, for strong or remote models),
//! [`JudgeAttributer`] (for small local models: one closed 1–5 question per
//! agent and rollout, credit from the label probabilities read off the
//! logits; not in the paper) and [`IdentityAttributer`] (the ablation: every
//! agent gets the system score, mapped from [0, 1] to [-1, 1] as `2·score − 1`).

use crate::llm::{ChoiceRequest, ChoiceScores, Llm, LlmError, Message, Request, Sampling};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One rollout: a joint configuration run on one query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// System score of the final prediction (in [0, 1] for the shipped tasks).
    pub score: f64,
    /// The final prediction that was scored.
    pub prediction: String,
    /// Agent → output variable → value, from the final state.
    pub agent_outputs: BTreeMap<String, BTreeMap<String, String>>,
    /// Task-model prompt tokens spent on this rollout.
    pub input_tokens: usize,
    /// Task-model completion tokens spent on this rollout.
    pub output_tokens: usize,
}

/// Credits of one rollout: agent → credit in [-1, 1], `None` when missing
/// (the attributer's answer could not be parsed or omitted the agent).
pub type AgentCredits = BTreeMap<String, Option<f64>>;

/// Errors of the attribution module.
#[derive(Debug, thiserror::Error)]
pub enum AttributionError {
    /// The attributer LLM failed as a whole.
    #[error("attributer LLM: {0}")]
    Llm(#[from] LlmError),
    /// The caller's budget check refused to dispatch a batch.
    #[error("budget refused an attribution batch of {projected} projected tokens")]
    BudgetRefused {
        /// Projected tokens of the refused batch (plus tokens already spent by this call).
        projected: u64,
        /// Prompt tokens already spent by this call (an earlier batch).
        input_tokens: usize,
        /// Completion tokens already spent by this call.
        output_tokens: usize,
    },
    /// The LLM returned a different number of generations than requests.
    #[error("attributer LLM returned {got} generations for {expected} requests")]
    BatchSize {
        /// Requests sent.
        expected: usize,
        /// Generations received.
        got: usize,
    },
}

/// One attribution request: `rollouts` of different configurations on the
/// same query, shown side by side.
#[derive(Clone, Debug)]
pub struct AttributionGroup {
    /// The query text.
    pub query: String,
    /// The rollouts to contrast, in display order.
    pub rollouts: Vec<Rollout>,
    /// Seed of this group's LLM call (derived by the caller from run seed,
    /// round, query and group index); the retry uses a seed derived from it.
    pub seed: u64,
    /// Only this agent's credits are needed (e.g. a one-factor comparison):
    /// attributers that ask per agent ([`JudgeAttributer`]) ask only about
    /// it; the others credit every agent as usual.
    pub focus: Option<String>,
}

/// Result of attributing a batch of groups.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AttributionOutcome {
    /// `credits[group][rollout]`: per-agent credits of each rollout of each group.
    pub credits: Vec<Vec<AgentCredits>>,
    /// Prompt tokens spent (real counts from the LLM's generations).
    pub input_tokens: usize,
    /// Completion tokens spent.
    pub output_tokens: usize,
    /// Number of LLM requests sent (first attempts and retries).
    pub calls: usize,
    /// Groups whose first answer could not be parsed (and were retried).
    pub retries: usize,
    /// Groups whose credits are missing after the retry.
    pub failures: usize,
    /// Raw replies of the last attempt per group (for logging and debugging).
    pub raw_replies: Vec<String>,
}

/// Budget gate called before each LLM batch with its projected tokens (plus
/// the tokens this call has already spent); `false` refuses the batch.
pub type BudgetGate<'a> = &'a mut dyn FnMut(u64) -> bool;

/// Assigns per-agent credits to the rollouts of each group.
pub trait Attributer: Sync {
    /// Attribute every group; all first attempts go out as one LLM batch, the
    /// retries of unparseable answers as a second one. `allow` is asked before
    /// each batch; a refusal returns [`AttributionError::BudgetRefused`].
    fn attribute(
        &self,
        agents: &[String],
        groups: &[AttributionGroup],
        allow: BudgetGate,
    ) -> Result<AttributionOutcome, AttributionError>;
    /// Upper estimate of the tokens `attribute` would spend (for the budget).
    fn project_tokens(&self, agents: &[String], groups: &[AttributionGroup]) -> usize;
    /// Whether this attributer calls an LLM (false for the identity ablation).
    fn uses_llm(&self) -> bool;
}

/// An attributer that hands over to a second one, for the rest of the run,
/// once the first reports its backend cannot serve it
/// ([`LlmError::Unsupported`]: e.g. the judge on a server without logprobs).
/// The switch is logged once; every other error goes to the caller.
pub struct FallbackAttributer<'a> {
    /// Tried first.
    pub primary: Box<dyn Attributer + 'a>,
    /// Used after the primary's backend said it cannot.
    pub fallback: Box<dyn Attributer + 'a>,
    /// Set once the fallback is in use.
    pub switched: std::sync::atomic::AtomicBool,
}

impl<'a> FallbackAttributer<'a> {
    /// `primary`, falling back to `fallback`.
    pub fn new(primary: Box<dyn Attributer + 'a>, fallback: Box<dyn Attributer + 'a>) -> Self {
        Self {
            primary,
            fallback,
            switched: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn current(&self) -> &dyn Attributer {
        if self.switched.load(std::sync::atomic::Ordering::Relaxed) {
            self.fallback.as_ref()
        } else {
            self.primary.as_ref()
        }
    }
}

impl Attributer for FallbackAttributer<'_> {
    fn attribute(
        &self,
        agents: &[String],
        groups: &[AttributionGroup],
        allow: BudgetGate,
    ) -> Result<AttributionOutcome, AttributionError> {
        if !self.switched.load(std::sync::atomic::Ordering::Relaxed) {
            match self.primary.attribute(agents, groups, &mut *allow) {
                Err(AttributionError::Llm(LlmError::Unsupported(why))) => {
                    tracing::warn!(
                        "attributer unsupported by the backend ({why}); using the generative attributer for the rest of the run"
                    );
                    self.switched
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                other => return other,
            }
        }
        self.fallback.attribute(agents, groups, allow)
    }
    fn project_tokens(&self, agents: &[String], groups: &[AttributionGroup]) -> usize {
        self.current().project_tokens(agents, groups)
    }
    fn uses_llm(&self) -> bool {
        self.current().uses_llm()
    }
}

/// The ablation attributer: every agent of a rollout gets the rollout's system
/// score mapped from [0, 1] to [-1, 1] (`2·score − 1`, clamped). The map is
/// affine, so rankings and t-tests are the same as on the raw score; it keeps
/// credits on the same scale as the LLM attributer's.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityAttributer;

impl Attributer for IdentityAttributer {
    fn attribute(
        &self,
        agents: &[String],
        groups: &[AttributionGroup],
        _allow: BudgetGate,
    ) -> Result<AttributionOutcome, AttributionError> {
        let credits = groups
            .iter()
            .map(|g| {
                g.rollouts
                    .iter()
                    .map(|r| {
                        let c = if r.score.is_finite() {
                            Some((2.0 * r.score - 1.0).clamp(-1.0, 1.0))
                        } else {
                            None
                        };
                        agents.iter().map(|a| (a.clone(), c)).collect()
                    })
                    .collect()
            })
            .collect();
        Ok(AttributionOutcome {
            credits,
            ..Default::default()
        })
    }
    fn project_tokens(&self, _agents: &[String], _groups: &[AttributionGroup]) -> usize {
        0
    }
    fn uses_llm(&self) -> bool {
        false
    }
}

/// The LLM attributer (the paper's `unconstrained` attributer, our prompt).
pub struct LlmAttributer<'a> {
    /// The attributer model.
    pub llm: &'a dyn Llm,
    /// Token cap of every string field shown (query, prediction, outputs).
    pub field_cap: usize,
    /// Maximum new tokens of the attributer's reply.
    pub max_new_tokens: usize,
    /// Sampling temperature of the attributer.
    pub temperature: f64,
}

impl<'a> LlmAttributer<'a> {
    /// An attributer with the default caps (256-token fields, 1024-token replies, temperature 0.1).
    pub fn new(llm: &'a dyn Llm) -> Self {
        Self {
            llm,
            field_cap: 256,
            max_new_tokens: 1024,
            temperature: 0.1,
        }
    }

    fn cap(&self, s: &str) -> String {
        cap_shown(self.llm, s, self.field_cap)
    }

    /// The attribution prompt for one group.
    pub fn build_prompt(&self, agents: &[String], group: &AttributionGroup) -> String {
        let executions: Vec<serde_json::Value> = group
            .rollouts
            .iter()
            .map(|r| {
                let mut outs = serde_json::Map::new();
                for a in agents {
                    let mut vars = serde_json::Map::new();
                    if let Some(vs) = r.agent_outputs.get(a) {
                        for (k, v) in vs {
                            vars.insert(k.clone(), serde_json::Value::String(self.cap(v)));
                        }
                    }
                    outs.insert(a.clone(), serde_json::Value::Object(vars));
                }
                serde_json::json!({
                    "system_score": r.score,
                    "final_prediction": self.cap(&r.prediction),
                    "agent_outputs": outs,
                })
            })
            .collect();
        let payload =
            serde_json::json!({ "query": self.cap(&group.query), "executions": executions });
        let payload = serde_json::to_string_pretty(&payload).unwrap_or_default();
        render_attribution_prompt(agents, group.rollouts.len(), &payload)
    }

    fn requests(&self, prompts: &[String], seeds: &[u64]) -> Vec<Request> {
        prompts
            .iter()
            .zip(seeds)
            .map(|(p, s)| {
                Request::user(p.clone(), self.max_new_tokens)
                    .with_sampling(Sampling::temperature(self.temperature))
                    .with_seed(*s)
            })
            .collect()
    }
}

/// `s` cut to `cap` tokens, marked `…[truncated]` when cut (fields shown to attributers).
fn cap_shown(llm: &dyn Llm, s: &str, cap: usize) -> String {
    let t = llm.truncate_tokens(s, cap);
    if t.len() < s.len() {
        format!("{t} …[truncated]")
    } else {
        t
    }
}

/// Seed of the retry of a request whose first answer was unusable.
pub fn retry_seed(seed: u64) -> u64 {
    splitmix64(seed ^ 0x5EED_0F_2E72_u64)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Attributer for LlmAttributer<'_> {
    fn attribute(
        &self,
        agents: &[String],
        groups: &[AttributionGroup],
        allow: BudgetGate,
    ) -> Result<AttributionOutcome, AttributionError> {
        let mut out = AttributionOutcome::default();
        if groups.is_empty() {
            return Ok(out);
        }
        let prompts: Vec<String> = groups
            .iter()
            .map(|g| self.build_prompt(agents, g))
            .collect();
        let project = |ps: &[String]| -> u64 {
            ps.iter()
                .map(|p| (self.llm.count_tokens(p) + self.max_new_tokens) as u64)
                .sum()
        };
        let projected = project(&prompts);
        if !allow(projected) {
            return Err(AttributionError::BudgetRefused {
                projected,
                input_tokens: 0,
                output_tokens: 0,
            });
        }
        let seeds: Vec<u64> = groups.iter().map(|g| g.seed).collect();
        let gens = self.llm.generate(&self.requests(&prompts, &seeds))?;
        if gens.len() != prompts.len() {
            return Err(AttributionError::BatchSize {
                expected: prompts.len(),
                got: gens.len(),
            });
        }
        out.calls += gens.len();
        let mut results: Vec<Option<Vec<AgentCredits>>> = Vec::with_capacity(groups.len());
        for (g, gen) in groups.iter().zip(&gens) {
            out.input_tokens += gen.prompt_tokens;
            out.output_tokens += gen.completion_tokens;
            out.raw_replies.push(gen.text.clone());
            results.push(parse_attribution(&gen.text, agents, g.rollouts.len()).ok());
        }
        let failed: Vec<usize> = (0..groups.len())
            .filter(|&i| results[i].is_none())
            .collect();
        if !failed.is_empty() {
            out.retries = failed.len();
            tracing::debug!(failed = failed.len(), "retrying unparseable attributions");
            let p2: Vec<String> = failed.iter().map(|&i| prompts[i].clone()).collect();
            let projected = project(&p2) + (out.input_tokens + out.output_tokens) as u64;
            if !allow(projected) {
                return Err(AttributionError::BudgetRefused {
                    projected,
                    input_tokens: out.input_tokens,
                    output_tokens: out.output_tokens,
                });
            }
            let s2: Vec<u64> = failed.iter().map(|&i| retry_seed(groups[i].seed)).collect();
            let gens2 = self.llm.generate(&self.requests(&p2, &s2))?;
            if gens2.len() != p2.len() {
                return Err(AttributionError::BatchSize {
                    expected: p2.len(),
                    got: gens2.len(),
                });
            }
            out.calls += gens2.len();
            for (&i, gen) in failed.iter().zip(&gens2) {
                out.input_tokens += gen.prompt_tokens;
                out.output_tokens += gen.completion_tokens;
                out.raw_replies[i] = gen.text.clone();
                results[i] = parse_attribution(&gen.text, agents, groups[i].rollouts.len()).ok();
            }
        }
        for (g, r) in groups.iter().zip(results) {
            match r {
                Some(c) => out.credits.push(c),
                None => {
                    out.failures += 1;
                    let missing: AgentCredits = agents.iter().map(|a| (a.clone(), None)).collect();
                    out.credits.push(vec![missing; g.rollouts.len()]);
                }
            }
        }
        Ok(out)
    }

    fn project_tokens(&self, agents: &[String], groups: &[AttributionGroup]) -> usize {
        groups
            .iter()
            .map(|g| self.llm.count_tokens(&self.build_prompt(agents, g)) + self.max_new_tokens)
            .sum()
    }

    fn uses_llm(&self) -> bool {
        true
    }
}

/// Our attribution meta-prompt (written for this crate; same output contract
/// as the reference: `<attribution>{"executions":[{"agent_credits":{…}}]}</attribution>`).
pub fn render_attribution_prompt(agents: &[String], n: usize, payload: &str) -> String {
    let names = agents
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    // A placeholder, not a number: small models copy example values verbatim
    // (every credit came back as the example's 0.0).
    let example_credits = agents
        .iter()
        .map(|a| format!("\"{a}\": <credit>"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "You are judging a team of cooperating AI agents. The same question was answered {n} times \
by the same team workflow, but each run used different instructions for some of the agents. \
Your job is to decide, for every run, how much each agent's work helped or hurt that run's result.\n\n\
How to judge:\n\
- Compare the runs with each other: look at which runs got a higher system_score and what the agents did differently in them.\n\
- Look at the final_prediction and at each agent's outputs: did the agent contribute correct, useful work, \
did it introduce a mistake, pass on someone else's mistake, or fix one?\n\
- Two runs with the same score can still differ in how well each agent did its part; judge the work itself.\n\
- Use a number between -1 and 1 for each agent in each run: 1 means the agent clearly helped, \
-1 means it clearly caused harm, 0 means no visible effect or you cannot tell.\n\n\
Input fields: system_score is the reward given by the evaluator (higher is better); final_prediction is the answer \
that was scored; agent_outputs maps each agent to the values it produced.\n\n\
The runs:\n{payload}\n\n\
First write a few sentences comparing the runs. Then give your verdict inside <attribution> tags as JSON with a single \
key \"executions\": a list with exactly {n} entries, one per run in the order shown, each of the form \
{{\"agent_credits\": {{{example_credits}}}}}, where each <credit> is your own number in [-1, 1] for that agent in that run \
(written as a plain JSON number). The agents are: {names}. \
Put nothing but the JSON inside the tags and do not use code fences there.\n"
    )
}

/// The judge attributer for small local models: instead of generating JSON,
/// it asks one closed question per (rollout, agent) — "how well did this agent
/// do its part in this run, 1–5?" — and reads the label probabilities from
/// the model ([`Llm::score_choices`]). The credit is the probability-weighted
/// rating mapped to [-1, 1] (`(E[rating] − 3) / 2`); when the model puts less
/// than [`JudgeAttributer::min_coverage`] of its probability on the labels the
/// credit is missing (`None`), never 0. The question shows the run's score
/// beside the other runs' scores of the same query, so the judge contrasts
/// them as the paper's attributer does. No sampling, so it is deterministic.
pub struct JudgeAttributer<'a> {
    /// The judge model (must support [`Llm::score_choices`]).
    pub llm: &'a dyn Llm,
    /// Token cap of every string field shown.
    pub field_cap: usize,
    /// Minimum total probability on the labels for a credit to count.
    pub min_coverage: f64,
}

/// The rating labels and what they mean (1 = clearly hurt … 5 = clearly helped).
pub const JUDGE_SCALE: [(&str, &str); 5] = [
    ("1", "its work clearly caused or passed on a mistake"),
    ("2", "its work mostly hurt"),
    ("3", "no visible effect, or you cannot tell"),
    ("4", "its work mostly helped"),
    ("5", "it clearly did correct, useful work"),
];

impl<'a> JudgeAttributer<'a> {
    /// A judge with 256-token fields and a coverage threshold of 0.5.
    pub fn new(llm: &'a dyn Llm) -> Self {
        Self {
            llm,
            field_cap: 256,
            min_coverage: 0.5,
        }
    }

    fn cap(&self, s: &str) -> String {
        cap_shown(self.llm, s, self.field_cap)
    }

    /// The question about `agent` in rollout `k` of `group` (the shared part
    /// first, so the questions about one rollout share a cached prefix).
    pub fn question(
        &self,
        agents: &[String],
        group: &AttributionGroup,
        k: usize,
        agent: &str,
    ) -> String {
        let r = &group.rollouts[k];
        let others: Vec<String> = group
            .rollouts
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != k)
            .map(|(_, o)| format!("{:.2}", o.score))
            .collect();
        let mut outs = String::new();
        if let Some(vs) = r.agent_outputs.get(agent) {
            for (var, v) in vs {
                outs.push_str(&format!("<{var}>\n{}\n</{var}>\n", self.cap(v)));
            }
        }
        if outs.is_empty() {
            outs.push_str("(no output)\n");
        }
        let scale: Vec<String> = JUDGE_SCALE
            .iter()
            .map(|(l, m)| format!("{l} = {m}"))
            .collect();
        format!(
            "A team of AI agents ({}) worked on this task:\n{}\n\n\
This run's final answer: {}\n\
Its score from the evaluator: {:.2} (higher is better). Other runs of the same task, with different \
instructions for some agents, scored: {}.\n\n\
In this run the agent \"{agent}\" produced:\n{outs}\n\
How well did the agent \"{agent}\" do its part in this run? Answer with one digit: {}.",
            agents.join(", "),
            self.cap(&group.query),
            self.cap(&r.prediction),
            r.score,
            if others.is_empty() { "none".to_string() } else { others.join(", ") },
            scale.join("; ")
        )
    }

    fn requests(&self, agents: &[String], groups: &[AttributionGroup]) -> Vec<ChoiceRequest> {
        let mut out = Vec::new();
        for g in groups {
            for k in 0..g.rollouts.len() {
                for a in asked(agents, g) {
                    out.push(ChoiceRequest {
                        messages: vec![Message::user(self.question(agents, g, k, a))],
                        assistant_prefix: "Rating: ".into(),
                        choices: JUDGE_SCALE.iter().map(|(l, _)| l.to_string()).collect(),
                    });
                }
            }
        }
        out
    }
}

/// The agents a per-agent attributer asks about in `g`: its focus when it
/// names one of `agents`, else all of them.
fn asked<'a>(agents: &'a [String], g: &AttributionGroup) -> &'a [String] {
    match g
        .focus
        .as_ref()
        .and_then(|f| agents.iter().position(|a| a == f))
    {
        Some(i) => &agents[i..=i],
        None => agents,
    }
}

/// The judge's credit from its label probabilities: `(E[rating] − 3) / 2`,
/// missing when the coverage is below `min_coverage`.
pub fn judge_credit(s: &ChoiceScores, min_coverage: f64) -> Option<f64> {
    if !(s.coverage >= min_coverage) {
        return None;
    }
    let e = s.expectation(&[1.0, 2.0, 3.0, 4.0, 5.0]);
    Some(((e - 3.0) / 2.0).clamp(-1.0, 1.0))
}

impl Attributer for JudgeAttributer<'_> {
    fn attribute(
        &self,
        agents: &[String],
        groups: &[AttributionGroup],
        allow: BudgetGate,
    ) -> Result<AttributionOutcome, AttributionError> {
        let mut out = AttributionOutcome::default();
        if groups.is_empty() {
            return Ok(out);
        }
        let reqs = self.requests(agents, groups);
        let prompt_tokens: Vec<usize> = reqs
            .iter()
            .map(|r| self.llm.count_tokens(&r.messages[0].content) + 8)
            .collect();
        let projected: u64 = prompt_tokens.iter().map(|&t| t as u64).sum();
        if !allow(projected) {
            return Err(AttributionError::BudgetRefused {
                projected,
                input_tokens: 0,
                output_tokens: 0,
            });
        }
        let scores = self.llm.score_choices(&reqs)?;
        if scores.len() != reqs.len() {
            return Err(AttributionError::BatchSize {
                expected: reqs.len(),
                got: scores.len(),
            });
        }
        out.calls = reqs.len();
        out.input_tokens = prompt_tokens.iter().sum();
        let mut it = scores.iter();
        for g in groups {
            let mut per_group = Vec::with_capacity(g.rollouts.len());
            let mut missing_any = false;
            let mut summary = Vec::new();
            for _ in &g.rollouts {
                let mut credits = AgentCredits::new();
                for a in asked(agents, g) {
                    let sc = it.next().ok_or(AttributionError::BatchSize {
                        expected: reqs.len(),
                        got: scores.len(),
                    })?;
                    let c = judge_credit(sc, self.min_coverage);
                    missing_any |= c.is_none();
                    summary.push(format!(
                        "{a}: coverage {:.2} probs {:?} credit {:?}",
                        sc.coverage,
                        sc.probs
                            .iter()
                            .map(|p| (p * 100.0).round() / 100.0)
                            .collect::<Vec<_>>(),
                        c
                    ));
                    credits.insert(a.clone(), c);
                }
                per_group.push(credits);
            }
            if missing_any {
                out.failures += 1;
            }
            out.raw_replies.push(summary.join("\n"));
            out.credits.push(per_group);
        }
        Ok(out)
    }

    fn project_tokens(&self, agents: &[String], groups: &[AttributionGroup]) -> usize {
        self.requests(agents, groups)
            .iter()
            .map(|r| self.llm.count_tokens(&r.messages[0].content) + 8)
            .sum()
    }

    fn uses_llm(&self) -> bool {
        true
    }
}

/// Parse an attributer reply into per-rollout credits for `n` rollouts.
///
/// Tolerant of code fences, text around the JSON and trailing commas; values
/// are clamped to [-1, 1]; numeric strings are accepted; unknown agent names
/// are ignored; agents absent from an entry get `None`. A reply without a
/// JSON object holding `executions`, or with a number of executions other than
/// `n`, is an error.
pub fn parse_attribution(
    reply: &str,
    agents: &[String],
    n: usize,
) -> Result<Vec<AgentCredits>, String> {
    let candidates = attribution_spans(reply);
    let mut last_err = String::from("no <attribution> block or JSON object found");
    for span in candidates {
        match parse_span(span, agents, n) {
            Ok(c) => return Ok(c),
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

/// Candidate text spans to parse, best first: the `<attribution>` blocks (last
/// one first, since a model may echo the format before answering), then the
/// whole reply.
fn attribution_spans(reply: &str) -> Vec<&str> {
    const OPEN: &str = "<attribution>";
    const CLOSE: &str = "</attribution>";
    let mut spans = Vec::new();
    let mut pos = 0;
    while let Some(i) = reply[pos..].find(OPEN) {
        let start = pos + i + OPEN.len();
        let end = reply[start..]
            .find(CLOSE)
            .map(|j| start + j)
            .unwrap_or(reply.len());
        spans.push(&reply[start..end]);
        pos = start;
    }
    spans.reverse();
    spans.push(reply);
    spans
}

fn parse_span(span: &str, agents: &[String], n: usize) -> Result<Vec<AgentCredits>, String> {
    let text = span
        .replace("```json", "")
        .replace("```JSON", "")
        .replace("```", "");
    let start = text.find('{').ok_or("no JSON object")?;
    let end = text.rfind('}').ok_or("no JSON object end")?;
    if end < start {
        return Err("no JSON object".into());
    }
    let json = &text[start..=end];
    let value: serde_json::Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(_) => {
            let re = regex::Regex::new(r",(\s*[}\]])").map_err(|e| e.to_string())?;
            let fixed = re.replace_all(json, "$1");
            serde_json::from_str(&fixed).map_err(|e| format!("invalid JSON: {e}"))?
        }
    };
    let execs = value
        .get("executions")
        .and_then(|e| e.as_array())
        .ok_or("missing \"executions\" list")?;
    if execs.len() != n {
        return Err(format!("expected {n} executions, got {}", execs.len()));
    }
    execs
        .iter()
        .map(|e| {
            let map = e
                .get("agent_credits")
                .and_then(|m| m.as_object())
                .or_else(|| e.as_object())
                .ok_or("execution is not an object")?;
            Ok(agents
                .iter()
                .map(|a| {
                    let v = map.get(a).and_then(|v| match v {
                        serde_json::Value::Number(x) => x.as_f64(),
                        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
                        _ => None,
                    });
                    (
                        a.clone(),
                        v.filter(|x| x.is_finite()).map(|x| x.clamp(-1.0, 1.0)),
                    )
                })
                .collect())
        })
        .collect()
}

/// Attribution groups for one query: every group holds the incumbent
/// configuration plus up to `group_size − 1` others, drawn from a seeded
/// shuffle; the order inside each group is shuffled too. With no other
/// configuration, a single group holding only the incumbent is returned.
pub fn contrast_groups(
    num_configs: usize,
    incumbent: usize,
    group_size: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut others: Vec<usize> = (0..num_configs).filter(|&c| c != incumbent).collect();
    if others.is_empty() {
        return if incumbent < num_configs {
            vec![vec![incumbent]]
        } else {
            Vec::new()
        };
    }
    others.shuffle(&mut rng);
    let per = group_size.max(2) - 1;
    others
        .chunks(per)
        .map(|chunk| {
            let mut g = chunk.to_vec();
            g.push(incumbent);
            g.shuffle(&mut rng);
            g
        })
        .collect()
}

/// Attribution groups without an incumbent: a seeded shuffle cut into groups
/// of `group_size`; a leftover single configuration joins the previous group
/// so that no judgement is contrast-free.
pub fn shuffled_groups(num_configs: usize, group_size: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..num_configs).collect();
    idx.shuffle(&mut rng);
    let mut groups: Vec<Vec<usize>> = idx.chunks(group_size.max(2)).map(|c| c.to_vec()).collect();
    if groups.len() > 1 && groups.last().map(|g| g.len()) == Some(1) {
        if let Some(last) = groups.pop() {
            if let Some(prev) = groups.last_mut() {
                prev.extend(last);
            }
        }
    }
    groups
}

/// Mean, sample standard deviation (ddof = 1; 0 when n < 2) and count of credits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CreditStats {
    /// Mean credit.
    pub mean: f64,
    /// Sample standard deviation.
    pub std: f64,
    /// Number of (non-missing) credits.
    pub n: usize,
}

impl CreditStats {
    /// Statistics of a list of credits.
    pub fn from_values(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return Self::default();
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Self { mean, std, n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::ScriptedLlm;

    fn agents() -> Vec<String> {
        vec!["planner".into(), "solver".into()]
    }

    #[test]
    fn parses_valid_reply_with_prose_and_fences() {
        let reply = "Run 1 was better.\n<attribution>```json\n{\"executions\":[{\"agent_credits\":{\"planner\":0.5,\"solver\":-0.25}},{\"agent_credits\":{\"planner\":1,\"solver\":0}}]}\n```</attribution> done";
        let c = parse_attribution(reply, &agents(), 2).unwrap();
        assert_eq!(c[0]["planner"], Some(0.5));
        assert_eq!(c[0]["solver"], Some(-0.25));
        assert_eq!(c[1]["planner"], Some(1.0));
        assert_eq!(c[1]["solver"], Some(0.0));
    }

    #[test]
    fn tolerates_trailing_commas_clamps_and_ignores_unknown_agents() {
        let reply = "<attribution>{\"executions\":[{\"agent_credits\":{\"planner\":3.5,\"ghost\":0.3,\"solver\":\"-7\",},},]}</attribution>";
        let c = parse_attribution(reply, &agents(), 1).unwrap();
        assert_eq!(c[0]["planner"], Some(1.0));
        assert_eq!(c[0]["solver"], Some(-1.0));
        assert!(!c[0].contains_key("ghost"));
    }

    #[test]
    fn missing_agent_is_none_not_zero() {
        let reply =
            "<attribution>{\"executions\":[{\"agent_credits\":{\"planner\":0.2}}]}</attribution>";
        let c = parse_attribution(reply, &agents(), 1).unwrap();
        assert_eq!(c[0]["planner"], Some(0.2));
        assert_eq!(c[0]["solver"], None);
    }

    #[test]
    fn malformed_and_wrong_count_are_errors() {
        assert!(parse_attribution("no json here", &agents(), 1).is_err());
        assert!(parse_attribution(
            "<attribution>{\"executions\": [</attribution>",
            &agents(),
            1
        )
        .is_err());
        let two = "<attribution>{\"executions\":[{\"agent_credits\":{}},{\"agent_credits\":{}}]}</attribution>";
        assert!(parse_attribution(two, &agents(), 3).is_err());
        assert!(parse_attribution(two, &agents(), 2).is_ok());
    }

    #[test]
    fn echoed_format_then_answer_takes_the_answer() {
        let reply = "Format: <attribution>{\"executions\":[...]}</attribution>\nAnswer: <attribution>{\"executions\":[{\"agent_credits\":{\"planner\":-0.5,\"solver\":0.5}}]}</attribution>";
        let c = parse_attribution(reply, &agents(), 1).unwrap();
        assert_eq!(c[0]["planner"], Some(-0.5));
    }

    #[test]
    fn contrast_groups_always_hold_the_incumbent_and_are_seeded() {
        for seed in 0..20u64 {
            let g = contrast_groups(8, 0, 3, seed);
            // 7 others in chunks of 2 -> 4 groups
            assert_eq!(g.len(), 4);
            let mut seen: Vec<usize> = Vec::new();
            for grp in &g {
                assert!(grp.contains(&0), "group {grp:?} lacks the incumbent");
                assert!(grp.len() >= 2 && grp.len() <= 3);
                seen.extend(grp.iter().copied().filter(|&c| c != 0));
            }
            seen.sort();
            assert_eq!(seen, (1..8).collect::<Vec<_>>());
            assert_eq!(g, contrast_groups(8, 0, 3, seed));
        }
        assert_ne!(contrast_groups(10, 0, 3, 1), contrast_groups(10, 0, 3, 2));
        assert_eq!(contrast_groups(1, 0, 3, 5), vec![vec![0]]);
    }

    #[test]
    fn shuffled_groups_have_no_singletons() {
        let g = shuffled_groups(7, 3, 4);
        assert_eq!(g.iter().map(|x| x.len()).sum::<usize>(), 7);
        assert!(g.iter().all(|x| x.len() >= 2));
    }

    fn rollout(score: f64, out: &str) -> Rollout {
        let mut m = BTreeMap::new();
        m.insert(
            "solver".to_string(),
            [("answer".to_string(), out.to_string())].into(),
        );
        Rollout {
            score,
            prediction: out.into(),
            agent_outputs: m,
            input_tokens: 1,
            output_tokens: 1,
        }
    }

    #[test]
    fn llm_attributer_retries_once_then_reports_missing() {
        // Answers garbage on the first seed of each group, a valid answer on the retry
        // for group "good", garbage forever for group "bad".
        let llm = ScriptedLlm::new(|r| {
            let p = &r.messages[0].content;
            if p.contains("bad-query") || r.seed < 1000 {
                "I cannot decide".to_string()
            } else {
                "<attribution>{\"executions\":[{\"agent_credits\":{\"planner\":0.1,\"solver\":0.9}},{\"agent_credits\":{\"planner\":0.1,\"solver\":-0.9}}]}</attribution>".to_string()
            }
        });
        let att = LlmAttributer::new(&llm);
        let groups = vec![
            AttributionGroup {
                focus: None,
                query: "good-query".into(),
                rollouts: vec![rollout(1.0, "4"), rollout(0.0, "5")],
                seed: 1,
            },
            AttributionGroup {
                focus: None,
                query: "bad-query".into(),
                rollouts: vec![rollout(1.0, "4"), rollout(0.0, "5")],
                seed: 2,
            },
        ];
        // retry seeds are large (splitmix output), first seeds are < 1000
        assert!(retry_seed(1) >= 1000 && retry_seed(2) >= 1000);
        let out = att.attribute(&agents(), &groups, &mut |_| true).unwrap();
        assert_eq!(out.calls, 4);
        assert_eq!(out.retries, 2);
        assert_eq!(out.failures, 1);
        assert_eq!(out.credits[0][0]["solver"], Some(0.9));
        assert_eq!(out.credits[0][1]["solver"], Some(-0.9));
        assert_eq!(out.credits[1][0]["solver"], None);
        assert_eq!(
            llm.batches(),
            2,
            "first attempts in one batch, retries in another"
        );
        assert!(out.input_tokens > 0);
        // A gate that refuses the retry batch stops before dispatching it.
        let mut asked = 0;
        let r = att.attribute(&agents(), &groups, &mut |_| {
            asked += 1;
            asked == 1
        });
        assert!(matches!(r, Err(AttributionError::BudgetRefused { .. })));
        assert_eq!(llm.batches(), 3);
    }

    #[test]
    fn prompt_caps_fields_and_lists_agents() {
        let llm = ScriptedLlm::new(|_| String::new());
        let mut att = LlmAttributer::new(&llm);
        att.field_cap = 3;
        let g = AttributionGroup {
            focus: None,
            query: "one two three four five".into(),
            rollouts: vec![rollout(1.0, "a b c d e f g")],
            seed: 0,
        };
        let p = att.build_prompt(&agents(), &g);
        assert!(p.contains("one two three …[truncated]"));
        assert!(!p.contains("four five"));
        assert!(p.contains("\"planner\", \"solver\""));
        assert!(p.contains("exactly 1 entries"));
    }

    #[test]
    fn identity_maps_scores() {
        let g = AttributionGroup {
            focus: None,
            query: "q".into(),
            rollouts: vec![rollout(1.0, "x"), rollout(0.0, "y")],
            seed: 0,
        };
        let out = IdentityAttributer
            .attribute(&agents(), &[g], &mut |_| false)
            .unwrap();
        assert_eq!(out.credits[0][0]["planner"], Some(1.0));
        assert_eq!(out.credits[0][1]["solver"], Some(-1.0));
    }

    #[test]
    fn credit_stats() {
        let s = CreditStats::from_values(&[1.0, 2.0, 3.0]);
        assert_eq!(s.mean, 2.0);
        assert!((s.std - 1.0).abs() < 1e-12);
        assert_eq!(s.n, 3);
    }

    /// A planted fault: the scripted judge rates an agent 1 when its output
    /// says WRONG and 5 otherwise; the credits must say exactly that.
    #[test]
    fn judge_credits_follow_label_probabilities_and_low_coverage_is_missing() {
        let llm = ScriptedLlm::new(|_| String::new()).with_choice_scores(|r| {
            let q = &r.messages[0].content;
            assert_eq!(r.choices, ["1", "2", "3", "4", "5"]);
            assert_eq!(r.assistant_prefix, "Rating: ");
            let part = q.split("In this run the agent").nth(1).unwrap();
            if q.contains("unsure-query") {
                // Little probability on any label: unreliable.
                return vec![(0.02f64).ln(); 5];
            }
            if part.contains("WRONG") {
                vec![(0.9f64).ln(), (0.1f64).ln(), -30.0, -30.0, -30.0]
            } else {
                vec![-30.0, -30.0, -30.0, (0.2f64).ln(), (0.8f64).ln()]
            }
        });
        let att = JudgeAttributer::new(&llm);
        let mut bad = rollout(0.0, "WRONG answer");
        bad.agent_outputs.insert(
            "planner".into(),
            [("plan".to_string(), "a fine plan".to_string())].into(),
        );
        let good = rollout(1.0, "42");
        let groups = vec![
            AttributionGroup {
                focus: None,
                query: "q".into(),
                rollouts: vec![bad.clone(), good.clone()],
                seed: 1,
            },
            AttributionGroup {
                focus: None,
                query: "unsure-query".into(),
                rollouts: vec![good],
                seed: 2,
            },
        ];
        let out = att.attribute(&agents(), &groups, &mut |_| true).unwrap();
        let c = &out.credits[0];
        // solver wrote WRONG in rollout 0: E = 1.1 → credit −0.95.
        assert!((c[0]["solver"].unwrap() + 0.95).abs() < 1e-6, "{c:?}");
        assert!((c[0]["planner"].unwrap() - 0.9).abs() < 1e-6, "{c:?}");
        assert!((c[1]["solver"].unwrap() - 0.9).abs() < 1e-6, "{c:?}");
        // Coverage 0.1 < 0.5: missing, never 0.
        assert_eq!(out.credits[1][0]["solver"], None);
        assert_eq!(out.failures, 1);
        assert_eq!(out.calls, 2 * 2 + 2);
        assert!(out.input_tokens > 0);
        // The question contrasts the run's score with the other runs'.
        let q = att.question(&agents(), &groups[0], 0, "solver");
        assert!(q.contains("scored: 1.00"), "{q}");
        assert!(q.contains("WRONG answer"));
        // A backend without probabilities is a clear error, not zero credits.
        let plain = ScriptedLlm::new(|_| String::new());
        let e = JudgeAttributer::new(&plain)
            .attribute(&agents(), &groups, &mut |_| true)
            .unwrap_err();
        assert!(e.to_string().contains("unsupported"), "{e}");
        // Wrapped in a fallback, the same backend is attributed by the
        // generative attributer (and stays with it).
        let writer = ScriptedLlm::new(|_| {
            "<attribution>{\"executions\":[{\"agent_credits\":{\"planner\":0.5,\"solver\":-0.5}},{\"agent_credits\":{\"planner\":0.5,\"solver\":0.5}}]}</attribution>".to_string()
        });
        let fb = FallbackAttributer::new(
            Box::new(JudgeAttributer::new(&writer)),
            Box::new(LlmAttributer::new(&writer)),
        );
        let two = &groups[..1];
        let out = fb.attribute(&agents(), two, &mut |_| true).unwrap();
        assert_eq!(out.credits[0][0]["solver"], Some(-0.5));
        assert!(fb.switched.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(
            fb.project_tokens(&agents(), two),
            LlmAttributer::new(&writer).project_tokens(&agents(), two)
        );
        // A judge that can score is never replaced.
        let fb = FallbackAttributer::new(
            Box::new(JudgeAttributer::new(&llm)),
            Box::new(LlmAttributer::new(&writer)),
        );
        fb.attribute(&agents(), two, &mut |_| true).unwrap();
        assert!(!fb.switched.load(std::sync::atomic::Ordering::Relaxed));
    }

    #[test]
    fn attribution_prompt_has_no_number_to_copy() {
        let p = render_attribution_prompt(&agents(), 2, "{}");
        assert!(!p.contains("0.0"), "{p}");
        assert!(p.contains("<credit>"));
    }
}
