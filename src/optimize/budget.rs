//! Token budget (spec §4.7, fixes of §10.3): real token counts (generation
//! prompt/completion counts and rollout token counts, never word counts mixed
//! with tokens), split into task (rollouts, validation) and meta (attribution,
//! rewriting), with caps on each and on the total, checked **before** every
//! batch is dispatched against a projection of its cost. Also the dry-run
//! projection of one round's cost.

use super::meta::{crossover_prompt, mutation_prompt};
use super::{AttributerKind, Design, OptimizeConfig};
use crate::graph::Setup;
use crate::llm::Llm;
use serde::{Deserialize, Serialize};

/// Tokens spent so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounters {
    /// Task-model prompt tokens (rollouts).
    pub task_input: u64,
    /// Task-model completion tokens (rollouts).
    pub task_output: u64,
    /// Task tokens of validation runs.
    pub validation: u64,
    /// Rollouts actually executed (cache misses returned by the executor).
    pub rollouts: u64,
    /// Attributer prompt tokens.
    pub attribution_input: u64,
    /// Attributer completion tokens.
    pub attribution_output: u64,
    /// Meta-LLM (rewriting) prompt tokens.
    pub rewrite_input: u64,
    /// Meta-LLM (rewriting) completion tokens.
    pub rewrite_output: u64,
}

impl TokenCounters {
    /// Task tokens (rollouts + validation).
    pub fn task(&self) -> u64 {
        self.task_input + self.task_output + self.validation
    }
    /// Meta tokens (attribution + rewriting).
    pub fn meta(&self) -> u64 {
        self.attribution_input + self.attribution_output + self.rewrite_input + self.rewrite_output
    }
    /// All tokens.
    pub fn total(&self) -> u64 {
        self.task() + self.meta()
    }
}

/// Which kind of spending a batch is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spend {
    /// Task-model work (rollouts, validation).
    Task,
    /// Meta work (attribution, rewriting).
    Meta,
}

/// Why a run ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum StopReason {
    /// All configured rounds ran.
    Completed,
    /// A batch would have exceeded a token cap; it was not dispatched.
    Budget {
        /// The cap that would be exceeded: `total`, `task` or `meta`.
        cap: String,
        /// The batch that was not run (e.g. `execute`, `attribution`).
        batch: String,
        /// Tokens spent under that cap so far.
        spent: u64,
        /// Projected tokens of the batch.
        projected: u64,
        /// The cap.
        limit: u64,
    },
    /// A `STOP` file appeared in the run directory.
    StopFile,
    /// The caller asked to stop after a number of rounds (e.g. tests, time limits).
    Interrupted,
}

/// Check whether a batch of `projected` tokens of kind `spend` fits all caps.
pub fn check(
    config: &OptimizeConfig,
    spent: &TokenCounters,
    spend: Spend,
    projected: u64,
    batch: &str,
) -> Result<(), StopReason> {
    let over = |cap: &str, spent: u64, limit: Option<u64>| match limit {
        Some(limit) if spent.saturating_add(projected) > limit => Err(StopReason::Budget {
            cap: cap.into(),
            batch: batch.into(),
            spent,
            projected,
            limit,
        }),
        _ => Ok(()),
    };
    over("total", spent.total(), config.max_total_tokens)?;
    match spend {
        Spend::Task => over("task", spent.task(), config.max_task_tokens),
        Spend::Meta => over("meta", spent.meta(), config.max_meta_tokens),
    }
}

/// Projected cost of one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DryRun {
    /// Joint configurations per round (incumbent included; depends on the design).
    pub configs_per_round: usize,
    /// MAS rollouts per round.
    pub rollouts_per_round: usize,
    /// Projected task tokens per round (rollouts + one validation).
    pub task_tokens_per_round: u64,
    /// Meta-LLM rewriting calls per round (upper bound, first attempts).
    pub rewrite_calls_per_round: usize,
    /// Attribution requests per round (first attempts; judge: questions;
    /// ofat: the upper bound where every single-agent cell ties).
    pub attribution_calls_per_round: usize,
    /// Projected meta tokens per round.
    pub meta_tokens_per_round: u64,
    /// Projected total per round.
    pub total_tokens_per_round: u64,
    /// Rounds that fit the tightest cap (`None` without caps).
    pub rounds_within_budget: Option<u64>,
}

/// Project the tokens of one round from prompt lengths, block size, number of
/// configurations and the max-new-token estimates. `llm` counts tokens.
/// Assumes every agent proposes (a CAPO race start), the worst case.
pub fn dry_run(setup: &Setup, config: &OptimizeConfig, llm: &dyn Llm) -> DryRun {
    let mut race_sizes = Vec::new();
    let mut rewrite_calls = 0usize;
    let mut rewrite_tokens = 0u64;
    let mut prompt_tokens_per_rollout = 0u64;
    let mut outputs_per_rollout = 0usize;
    for agent in &setup.agents {
        let pool = match setup.init_agent_prompt_pool.get(&agent.name) {
            Some(p) if !p.is_empty() => p,
            _ => continue,
        };
        let longest = pool
            .iter()
            .max_by_key(|p| llm.count_tokens(p))
            .cloned()
            .unwrap_or_default();
        let avg = pool.iter().map(|p| llm.count_tokens(p) as u64).sum::<u64>() / pool.len() as u64;
        prompt_tokens_per_rollout += avg;
        outputs_per_rollout += agent.output_vars.len().max(1);
        let n = match config.optimizer {
            super::OptimizerKind::Capo => config.crossovers_per_round,
            super::OptimizerKind::Evoprompt => config.population.unwrap_or(pool.len()),
        };
        let k = config.population.unwrap_or(pool.len());
        race_sizes.push(match config.optimizer {
            super::OptimizerKind::Capo => {
                k.max(pool.len()) + n + config.edit_deletions + config.edit_shots
            }
            super::OptimizerKind::Evoprompt => n,
        });
        let cross = llm.count_tokens(&crossover_prompt(agent, &longest, &longest)) as u64;
        let mutate = llm.count_tokens(&mutation_prompt(agent, &longest)) as u64;
        let calls = match config.optimizer {
            super::OptimizerKind::Capo => 2 * n,
            super::OptimizerKind::Evoprompt => n,
        };
        rewrite_calls += calls;
        rewrite_tokens +=
            n as u64 * (cross + mutate) + calls as u64 * config.meta_max_new_tokens as u64;
    }
    let n_agents = race_sizes.len();
    let cap = config.ofat_max_candidates.unwrap_or(usize::MAX);
    let configs = match config.design {
        Design::Joint => race_sizes.iter().copied().max().unwrap_or(0) + 1,
        // One configuration per candidate besides each agent's incumbent.
        Design::Ofat => {
            1 + race_sizes
                .iter()
                .map(|&r| r.saturating_sub(1).min(cap))
                .sum::<usize>()
        }
    };
    let rollouts = configs * config.block_size;
    let per_rollout =
        prompt_tokens_per_rollout + (n_agents * config.task_max_new_tokens_estimate) as u64;
    let task = per_rollout * (rollouts + config.validation_size_estimate) as u64;
    let cap_tokens = config.attribution_field_cap as u64;
    // A judge question shows one agent's outputs of one rollout (≈ 3 fields).
    let judge_question = 300 + 3 * cap_tokens;
    let llm_call = |rollouts_shown: usize| {
        let shown = (1 + rollouts_shown * (1 + outputs_per_rollout)) as u64;
        400 + shown * cap_tokens + config.attribution_max_new_tokens as u64
    };
    let (attribution_calls, meta_attr) = if config.identity_attribution {
        (0, 0)
    } else {
        match config.design {
            Design::Joint => {
                let groups = (configs.saturating_sub(1))
                    .div_ceil(config.group_size.max(2) - 1)
                    .max(1)
                    * config.block_size;
                match config.attributer {
                    AttributerKind::Llm => (groups, groups as u64 * llm_call(config.group_size)),
                    AttributerKind::Judge => {
                        let q = groups * config.group_size * n_agents;
                        (q, q as u64 * judge_question)
                    }
                }
            }
            Design::Ofat if config.ofat_tie_weight > 0.0 => {
                // Upper bound: every single-agent cell ties.
                let pairs = configs.saturating_sub(1) * config.block_size;
                match config.attributer {
                    AttributerKind::Llm => (pairs, pairs as u64 * llm_call(2)),
                    AttributerKind::Judge => (2 * pairs, 2 * pairs as u64 * judge_question),
                }
            }
            Design::Ofat => (0, 0),
        }
    };
    let meta = rewrite_tokens + meta_attr;
    let total = task + meta;
    let fit = |cap: Option<u64>, per: u64| cap.map(|c| if per == 0 { u64::MAX } else { c / per });
    let rounds_within_budget = [
        fit(config.max_total_tokens, total),
        fit(config.max_task_tokens, task),
        fit(config.max_meta_tokens, meta),
    ]
    .into_iter()
    .flatten()
    .min();
    DryRun {
        configs_per_round: configs,
        rollouts_per_round: rollouts,
        task_tokens_per_round: task,
        rewrite_calls_per_round: rewrite_calls,
        attribution_calls_per_round: attribution_calls,
        meta_tokens_per_round: meta,
        total_tokens_per_round: total,
        rounds_within_budget,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::AgentSpec;
    use crate::llm::ScriptedLlm;

    #[test]
    fn caps_are_checked_against_projection() {
        let cfg = OptimizeConfig {
            max_total_tokens: Some(100),
            max_meta_tokens: Some(30),
            ..Default::default()
        };
        let spent = TokenCounters {
            task_input: 50,
            rewrite_input: 20,
            ..Default::default()
        };
        assert!(check(&cfg, &spent, Spend::Task, 30, "execute").is_ok());
        match check(&cfg, &spent, Spend::Task, 31, "execute") {
            Err(StopReason::Budget { cap, limit, .. }) => {
                assert_eq!((cap.as_str(), limit), ("total", 100))
            }
            other => panic!("{other:?}"),
        }
        match check(&cfg, &spent, Spend::Meta, 11, "attribution") {
            Err(StopReason::Budget { cap, batch, .. }) => {
                assert_eq!((cap.as_str(), batch.as_str()), ("meta", "attribution"))
            }
            other => panic!("{other:?}"),
        }
        assert!(check(&cfg, &spent, Spend::Meta, 10, "attribution").is_ok());
    }

    #[test]
    fn dry_run_scales_with_block_and_caps() {
        let llm = ScriptedLlm::new(|_| String::new());
        let agent = |n: &str| AgentSpec {
            name: n.into(),
            task_description: "x".into(),
            input_vars: vec!["query".into()],
            output_vars: vec!["answer".into()],
            tools: vec![],
            max_tool_calls: 0,
            output_grammars: Default::default(),
            fenced_outputs: Vec::new(),
        };
        let setup = Setup {
            edges: vec![],
            agents: vec![agent("a"), agent("b")],
            init_agent_prompt_pool: [
                ("a".to_string(), vec!["one two {query}".to_string(); 6]),
                ("b".to_string(), vec!["three {query}".to_string(); 6]),
            ]
            .into(),
        };
        let cfg = OptimizeConfig {
            max_total_tokens: Some(10_000_000),
            design: Design::Joint,
            attributer: AttributerKind::Llm,
            ..Default::default()
        };
        let d = dry_run(&setup, &cfg, &llm);
        assert_eq!(d.configs_per_round, 10); // 6 + 3 racing + incumbent
        assert_eq!(d.rollouts_per_round, 100);
        assert_eq!(d.rewrite_calls_per_round, 12);
        assert_eq!(d.attribution_calls_per_round, 50); // 9 others in pairs -> 5 groups x 10 queries
        assert_eq!(
            d.total_tokens_per_round,
            d.task_tokens_per_round + d.meta_tokens_per_round
        );
        assert_eq!(
            d.rounds_within_budget,
            Some(10_000_000 / d.total_tokens_per_round)
        );
        let d2 = dry_run(
            &setup,
            &OptimizeConfig {
                block_size: 20,
                ..cfg.clone()
            },
            &llm,
        );
        assert!(d2.task_tokens_per_round > d.task_tokens_per_round);
        let d3 = dry_run(
            &setup,
            &OptimizeConfig {
                identity_attribution: true,
                ..cfg
            },
            &llm,
        );
        assert_eq!(d3.attribution_calls_per_round, 0);
        // The default one-factor design: 8 candidates besides the incumbent
        // per agent, one configuration each; judged ties at most 2 questions
        // per (configuration, query).
        let ofat = OptimizeConfig {
            max_total_tokens: Some(10_000_000),
            ..Default::default()
        };
        let d4 = dry_run(&setup, &ofat, &llm);
        assert_eq!(d4.configs_per_round, 1 + 2 * 8);
        assert_eq!(d4.rollouts_per_round, 170);
        assert_eq!(d4.attribution_calls_per_round, 2 * 16 * 10);
        let capped = dry_run(
            &setup,
            &OptimizeConfig {
                ofat_max_candidates: Some(3),
                ofat_tie_weight: 0.0,
                ..ofat
            },
            &llm,
        );
        assert_eq!(capped.configs_per_round, 1 + 2 * 3);
        assert_eq!(capped.attribution_calls_per_round, 0);
    }
}
