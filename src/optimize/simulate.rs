//! Planted-effect simulator: a world whose per-agent prompt effects are
//! known, to check that credits recover them (issue "credit checks that can
//! fail"; not in the paper).
//!
//! Every prompt of every agent has a true effect `e ∈ [-E, E]`, a hash of
//! (world seed, agent, prompt text) — initial pool prompts and every prompt
//! the meta-LLM writes alike. On query `q` an agent's work is *sound* with
//! probability `clamp(0.6 + e + 0.2·d_q)` (`d_q ∈ [-1, 1]` the query's ease),
//! drawn from a hash of (agent, prompt, query): an agent whose prompt did not
//! change does the same work, as a deterministic model given the same input
//! would. The system scores 1 when at most one agent's work is flawed. Each
//! agent writes `work: sound` or `work: flawed`; the scripted judge and the
//! scripted generative attributer read that line correctly with probability
//! `observation_accuracy` (a hash of what they are shown), so the LLM
//! attributers get a noisy but honest per-agent signal, the identity
//! ablation only the system score, and the one-factor design only score
//! differences.
//!
//! [`simulate`] runs the real optimizer loop ([`super::optimize`]) on this
//! world with scripted meta-LLM and attributers and measures, per round and
//! agent, Spearman's ρ between each raced candidate's mean credit and its
//! true effect, and whether the candidate with the highest mean credit is the
//! truly best one.

use super::{
    analysis::spearman, derive_seed, optimize, tag, AttributerKind, Design, Executor,
    OptimizeConfig, OptimizeError, Rollout, RoundRecord, RunHooks,
};
use crate::graph::{AgentSpec, PromptSet, Setup};
use crate::llm::{ChoiceRequest, Request, ScriptedLlm};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// A world with planted per-agent prompt effects (implements [`Executor`]).
pub struct PlantedWorld {
    setup: Setup,
    seed: u64,
    /// Largest absolute effect `E` of a prompt on its agent's success rate.
    pub effect_scale: f64,
    /// Probability that a scripted attributer reads an agent's work correctly.
    pub observation_accuracy: f64,
    dev: usize,
    val: usize,
}

fn unit(seed: u64, parts: &[u64]) -> f64 {
    (derive_seed(seed, parts) >> 11) as f64 / (1u64 << 53) as f64
}

const STYLES: [&str; 4] = [
    "Work on {query} using {context}.",
    "Read {query}; the previous step gave {context}. Do your part.",
    "Task: {query}\nInput: {context}\nThink it through, then answer.",
    "Given {context}, handle {query} carefully and briefly.",
];

impl PlantedWorld {
    /// A chain of `agents` agents (`agent_1` … ; each reads the query and the
    /// previous agent's output), four initial prompts each, 400 dev queries
    /// and 200 validation queries; effect scale 0.3, observation accuracy 0.8.
    pub fn new(seed: u64, agents: usize) -> Self {
        let mut specs = Vec::new();
        let mut pool = BTreeMap::new();
        for i in 1..=agents {
            let name = format!("agent_{i}");
            let out = format!("out_{i}");
            specs.push(AgentSpec {
                name: name.clone(),
                task_description: format!("Step {i} of the chain."),
                input_vars: vec!["query".into(), "context".into()],
                output_vars: vec![out.clone()],
                tools: vec![],
                max_tool_calls: 0,
                output_grammars: Default::default(),
                fenced_outputs: Vec::new(),
            });
            let prompts = STYLES
                .iter()
                .map(|s| format!("{s} Reply inside <{out}></{out}>."))
                .collect();
            pool.insert(name, prompts);
        }
        Self {
            setup: Setup {
                edges: vec![],
                agents: specs,
                init_agent_prompt_pool: pool,
            },
            seed,
            effect_scale: 0.3,
            observation_accuracy: 0.8,
            dev: 400,
            val: 200,
        }
    }

    /// The true effect of `prompt` for `agent`, in `[-E, E]`.
    pub fn effect(&self, agent: &str, prompt: &str) -> f64 {
        let u = unit(self.seed, &[tag("effect"), tag(agent), tag(prompt)]);
        (2.0 * u - 1.0) * self.effect_scale
    }

    /// Sum of the true effects of a configuration's prompts.
    pub fn total_effect(&self, config: &PromptSet) -> f64 {
        config.iter().map(|(a, p)| self.effect(a, p)).sum()
    }

    fn sound(&self, agent: &str, prompt: &str, q: usize) -> bool {
        let ease = 2.0 * unit(self.seed, &[tag("ease"), q as u64]) - 1.0;
        let p = (0.6 + self.effect(agent, prompt) + 0.2 * ease).clamp(0.02, 0.98);
        unit(self.seed, &[tag("work"), tag(agent), tag(prompt), q as u64]) < p
    }

    fn rollout(&self, config: &PromptSet, q: usize) -> Rollout {
        let mut outputs = BTreeMap::new();
        let mut flawed = 0;
        for a in &self.setup.agents {
            let prompt = config.get(&a.name).map(String::as_str).unwrap_or("");
            let ok = self.sound(&a.name, prompt, q);
            flawed += usize::from(!ok);
            let text = format!(
                "step notes for query {q}. work: {}",
                if ok { "sound" } else { "flawed" }
            );
            outputs.insert(a.name.clone(), [(a.output_vars[0].clone(), text)].into());
        }
        let score = if flawed <= 1 { 1.0 } else { 0.0 };
        Rollout {
            score,
            prediction: format!("answer {}", if score > 0.0 { "right" } else { "wrong" }),
            agent_outputs: outputs,
            input_tokens: 40 * self.setup.agents.len(),
            output_tokens: 10 * self.setup.agents.len(),
        }
    }

    /// Whether a scripted attributer reads `text` (what it was shown about
    /// one agent) correctly; the draw is a hash of the text and `salt`.
    fn reads_correctly(&self, text: &str, salt: &str) -> bool {
        unit(self.seed, &[tag("observe"), tag(text), tag(salt)]) < self.observation_accuracy
    }

    /// What a scripted attributer believes about an agent's work shown as `text`.
    fn believes_sound(&self, text: &str, salt: &str) -> bool {
        let sound = text.contains("work: sound");
        sound == self.reads_correctly(text, salt)
    }

    /// A scripted judge: its label distribution leans to 4–5 when it
    /// believes the agent's work was sound, to 1–2 otherwise.
    pub fn judge(self: &std::sync::Arc<Self>) -> ScriptedLlm {
        let w = self.clone();
        ScriptedLlm::new(|_| String::new())
            .with_choice_scores(move |r: &ChoiceRequest| {
                let text = &r.messages[0].content;
                let shown = text
                    .rsplit_once("\" produced:\n")
                    .map(|(_, t)| t)
                    .unwrap_or("");
                let shown = shown.split("How well did").next().unwrap_or("");
                let probs: [f64; 5] = if w.believes_sound(shown, text) {
                    [0.02, 0.06, 0.17, 0.4, 0.35]
                } else {
                    [0.35, 0.4, 0.17, 0.06, 0.02]
                };
                probs.iter().map(|p| p.ln()).collect()
            })
            .named("planted-judge")
    }

    /// A scripted generative attributer: for every run it is shown, credits
    /// +0.6 to an agent it believes did sound work and −0.6 otherwise.
    pub fn generative(self: &std::sync::Arc<Self>) -> ScriptedLlm {
        let w = self.clone();
        ScriptedLlm::new(move |r: &Request| {
            let p = &r.messages[0].content;
            let payload = between(p, "The runs:\n", "\n\nFirst write");
            let v: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
            let execs: Vec<String> = v["executions"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|e| {
                    let mut credits = serde_json::Map::new();
                    if let Some(outs) = e["agent_outputs"].as_object() {
                        for (agent, vars) in outs {
                            let shown = vars.to_string();
                            let c = if w.believes_sound(&shown, p) {
                                0.6
                            } else {
                                -0.6
                            };
                            credits.insert(agent.clone(), c.into());
                        }
                    }
                    serde_json::json!({ "agent_credits": credits }).to_string()
                })
                .collect();
            format!(
                "Compared.\n<attribution>{{\"executions\": [{}]}}</attribution>",
                execs.join(", ")
            )
        })
        .named("planted-attributer")
    }
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> &'a str {
    let i = text.find(open).map(|i| i + open.len()).unwrap_or(0);
    let j = text[i..].find(close).map(|j| i + j).unwrap_or(text.len());
    &text[i..j]
}

/// A scripted meta-LLM that writes new prompts (crossover keeps parent A, a
/// mutation appends a seeded phrase): their effects are new draws of the
/// world's hash, like untested rewrites.
pub fn planted_meta_llm() -> ScriptedLlm {
    ScriptedLlm::new(|r: &Request| {
        let p = &r.messages[0].content;
        if p.contains("<template_a>") {
            let a = between(p, "<template_a>", "</template_a>").trim();
            format!("<prompt>{a} (v{})</prompt>", r.seed % 997)
        } else {
            let t = between(p, "<template>", "</template>").trim();
            format!("<prompt>{t} Note {}.</prompt>", r.seed % 991)
        }
    })
    .named("planted-meta")
}

impl Executor for PlantedWorld {
    fn setup(&self) -> &Setup {
        &self.setup
    }
    fn num_dev(&self) -> usize {
        self.dev
    }
    fn query_text(&self, idx: usize) -> String {
        format!("Planted query {idx}.")
    }
    fn execute(
        &self,
        configs: &[PromptSet],
        queries: &[usize],
        _seed: u64,
    ) -> anyhow::Result<Vec<Vec<Rollout>>> {
        Ok(configs
            .iter()
            .map(|c| queries.iter().map(|&q| self.rollout(c, q)).collect())
            .collect())
    }
    fn validate(&self, config: &PromptSet, _seed: u64) -> anyhow::Result<(Vec<f64>, usize)> {
        let start = 1_000_000;
        let scores = (start..start + self.val)
            .map(|q| self.rollout(config, q).score)
            .collect();
        Ok((scores, 50 * self.val))
    }
}

/// One credit method of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Method {
    /// Short name for tables.
    pub name: &'static str,
    /// Design of the rounds.
    pub design: Design,
    /// The LLM attributer; `None` = identity credits (the ablation).
    pub attributer: Option<AttributerKind>,
    /// `ofat` (and `joint_split`): weight of the attributer's judgement on ties.
    pub tie_weight: f64,
    /// `joint`: credits anchored on score differences, split by the attributer.
    pub split: bool,
}

/// The methods compared by default: identity, generative and judge on the
/// joint design, the one-factor design with score differences only and with
/// judge-refined ties, and the joint design with score-anchored judge splits.
pub const METHODS: [Method; 6] = [
    Method {
        name: "identity (joint)",
        design: Design::Joint,
        attributer: None,
        tie_weight: 0.0,
        split: false,
    },
    Method {
        name: "generative (joint)",
        design: Design::Joint,
        attributer: Some(AttributerKind::Llm),
        tie_weight: 0.0,
        split: false,
    },
    Method {
        name: "judge (joint)",
        design: Design::Joint,
        attributer: Some(AttributerKind::Judge),
        tie_weight: 0.0,
        split: false,
    },
    Method {
        name: "ofat",
        design: Design::Ofat,
        attributer: None,
        tie_weight: 0.0,
        split: false,
    },
    Method {
        name: "ofat + judge ties",
        design: Design::Ofat,
        attributer: Some(AttributerKind::Judge),
        tie_weight: 0.25,
        split: false,
    },
    Method {
        name: "judge split (joint)",
        design: Design::Joint,
        attributer: Some(AttributerKind::Judge),
        tie_weight: 0.25,
        split: true,
    },
];

/// What one simulated run measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimOutcome {
    /// Mean over (round, agent) of Spearman's ρ(mean credit, true effect) of
    /// the raced candidates (pairs with an undefined ρ skipped).
    pub spearman: Option<f64>,
    /// (round, agent) pairs with a defined ρ.
    pub spearman_n: usize,
    /// Fraction of (round, agent) pairs whose highest-credited candidate is
    /// the truly best one.
    pub pick_rate: f64,
    /// True effect of the final best configuration minus the initial one's.
    pub true_gain: f64,
    /// Validation score of the best configuration minus the initial one's.
    pub validation_gain: f64,
    /// Rollouts run in the rounds (validation excluded).
    pub rollouts: u64,
    /// Attribution tokens spent.
    pub attribution_tokens: u64,
    /// Degenerate groups over all rounds.
    pub degenerate_groups: usize,
}

/// Candidate prompts of `agent` in a round with their mean credit.
fn candidate_credits(rec: &RoundRecord, agent: &str) -> Vec<(String, f64)> {
    let Some(per_config) = rec.credits.get(agent) else {
        return Vec::new();
    };
    let mut sums: BTreeMap<&String, (f64, usize)> = BTreeMap::new();
    for (cfg, row) in rec.configs.iter().zip(per_config) {
        let Some(p) = cfg.get(agent) else { continue };
        for v in row.iter().flatten() {
            let e = sums.entry(p).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(p, (s, n))| (p.clone(), s / n as f64))
        .collect()
}

/// Run `rounds` rounds of the optimizer with `method` on `world` in
/// `run_dir` (must not hold a checkpoint) and measure its credits. `base`
/// gives every other setting; its block size is what the joint design uses,
/// and the one-factor design gets the block that spends the same rollouts
/// in the first round (configurations × block, its configurations counted
/// under `base.ofat_max_candidates`).
pub fn simulate(
    world: &std::sync::Arc<PlantedWorld>,
    method: Method,
    base: &OptimizeConfig,
    run_dir: &Path,
) -> Result<SimOutcome, OptimizeError> {
    let mut config = base.clone();
    config.design = method.design;
    config.ofat_tie_weight = method.tie_weight;
    config.joint_split = method.split;
    config.identity_attribution = method.attributer.is_none();
    if let Some(k) = method.attributer {
        config.attributer = k;
    }
    let agents = world.setup.agents.len();
    let k = config.population.unwrap_or(STYLES.len());
    let per_agent = k + config.crossovers_per_round + config.edit_deletions + config.edit_shots;
    let joint_configs = 1 + per_agent;
    if method.design == Design::Ofat {
        let per_agent_run = config
            .ofat_max_candidates
            .map_or(per_agent - 1, |cap| cap.min(per_agent - 1));
        let ofat_configs = 1 + agents * per_agent_run;
        let block = (base.block_size * joint_configs) as f64 / ofat_configs as f64;
        config.block_size = (block.round() as usize).max(2);
    }
    let attributer = match method.attributer {
        Some(AttributerKind::Judge) => world.judge(),
        _ => world.generative(),
    };
    let result = optimize(
        world.as_ref(),
        &planted_meta_llm(),
        &attributer,
        &config,
        run_dir,
        RunHooks::default(),
    )?;
    let records = super::run::read_rounds(run_dir)?;
    let (mut rhos, mut picks, mut pairs) = (Vec::new(), 0usize, 0usize);
    for rec in &records {
        for a in &world.setup.agents {
            let cands = candidate_credits(rec, &a.name);
            if cands.len() < 2 {
                continue;
            }
            let credit: Vec<f64> = cands.iter().map(|c| c.1).collect();
            let truth: Vec<f64> = cands.iter().map(|c| world.effect(&a.name, &c.0)).collect();
            if let Some(r) = spearman(&credit, &truth) {
                rhos.push(r);
            }
            let best_credit = (0..cands.len())
                .max_by(|&i, &j| credit[i].total_cmp(&credit[j]))
                .unwrap_or(0);
            let best_truth = truth.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            picks += usize::from(truth[best_credit] >= best_truth);
            pairs += 1;
        }
    }
    let initial = world.setup.pool_config(0);
    Ok(SimOutcome {
        spearman: (!rhos.is_empty()).then(|| rhos.iter().sum::<f64>() / rhos.len() as f64),
        spearman_n: rhos.len(),
        pick_rate: if pairs > 0 {
            picks as f64 / pairs as f64
        } else {
            f64::NAN
        },
        true_gain: world.total_effect(&result.best_prompts) - world.total_effect(&initial),
        validation_gain: result.best_score - result.initial_score,
        rollouts: result.tokens.rollouts,
        attribution_tokens: result.tokens.attribution_input + result.tokens.attribution_output,
        degenerate_groups: records.iter().map(|r| r.degenerate_groups).sum(),
    })
}

/// Mean of [`SimOutcome`]s of several world seeds for one method.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimSummary {
    /// The method.
    pub method: Method,
    /// World seeds run.
    pub seeds: usize,
    /// Mean ρ over seeds (seeds with an undefined ρ skipped).
    pub spearman: Option<f64>,
    /// Mean pick rate.
    pub pick_rate: f64,
    /// Mean true gain of the best configuration.
    pub true_gain: f64,
    /// Mean validation gain.
    pub validation_gain: f64,
    /// Mean rollouts per run.
    pub rollouts: f64,
    /// Mean attribution tokens per run.
    pub attribution_tokens: f64,
}

/// Run every method on worlds of seeds `seeds` (`agents` agents each, the
/// attributers reading an agent's work correctly with probability
/// `accuracy`) and average; each run gets its own directory under `dir`.
pub fn compare(
    methods: &[Method],
    seeds: &[u64],
    agents: usize,
    accuracy: f64,
    base: &OptimizeConfig,
    dir: &Path,
) -> Result<Vec<SimSummary>, OptimizeError> {
    let mut out = Vec::new();
    for (mi, m) in methods.iter().enumerate() {
        let mut runs = Vec::new();
        for &s in seeds {
            let mut world = PlantedWorld::new(s, agents);
            world.observation_accuracy = accuracy;
            let world = std::sync::Arc::new(world);
            let run_dir = dir.join(format!(
                "m{mi}-s{s}-a{}-b{}-c{}",
                (accuracy * 100.0) as u32,
                base.block_size,
                base.ofat_max_candidates.unwrap_or(0)
            ));
            runs.push(simulate(&world, *m, base, &run_dir)?);
        }
        let n = runs.len().max(1) as f64;
        let rhos: Vec<f64> = runs.iter().filter_map(|r| r.spearman).collect();
        out.push(SimSummary {
            method: *m,
            seeds: runs.len(),
            spearman: (!rhos.is_empty()).then(|| rhos.iter().sum::<f64>() / rhos.len() as f64),
            pick_rate: runs.iter().map(|r| r.pick_rate).sum::<f64>() / n,
            true_gain: runs.iter().map(|r| r.true_gain).sum::<f64>() / n,
            validation_gain: runs.iter().map(|r| r.validation_gain).sum::<f64>() / n,
            rollouts: runs.iter().map(|r| r.rollouts as f64).sum::<f64>() / n,
            attribution_tokens: runs
                .iter()
                .map(|r| r.attribution_tokens as f64)
                .sum::<f64>()
                / n,
        });
    }
    Ok(out)
}

/// The comparison as a Markdown table.
pub fn markdown(rows: &[SimSummary]) -> String {
    let mut s = String::from(
        "| method | ρ(credit, true effect) | picks truly best | true gain of best | validation gain | rollouts | attribution tokens |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.0}% | {:+.3} | {:+.3} | {:.0} | {:.0} |\n",
            r.method.name,
            r.spearman.map_or("undefined".into(), |v| format!("{v:.2}")),
            100.0 * r.pick_rate,
            r.true_gain,
            r.validation_gain,
            r.rollouts,
            r.attribution_tokens
        ));
    }
    s
}
