//! The CANTANTE round loop (spec §4.1–§4.7 with the fixes of §10.7–§10.10):
//! [`propose`], [`execute`], [`attribute`], [`update`], then the combined best
//! is [`validate`]d. Rounds are synchronous (one barrier per round), every
//! random choice is derived from (run seed, round, agent, query, candidate),
//! rollouts are cached by (configuration hash, query, seed), the budget is
//! checked before every batch, and a checkpoint is written after every round.
//!
//! Run directory: `config.json` (resolved configuration), `checkpoint.yaml`,
//! `rounds.jsonl` (one record per round), `best_prompts.yaml` (agent →
//! prompt), `summary.json`. A file named `STOP` ends the run after the
//! current round.

use super::budget::{self, Spend, StopReason, TokenCounters};
use super::checkpoint::{self, CreditAccumulator, RunState, ValidationPoint};
use super::design::{self, Design, Planned};
use super::meta::run_meta_jobs;
use super::{
    config_hash, derive_seed, rng_for, tag, AgentContext, AgentOptimizer, AttributerKind, Executor,
    Interrupt, LocalOptimizer, OptimizeConfig, OptimizeError, OptimizerKind, QueryCredits, Rollout,
    RunPriority,
};
use crate::attribution::{
    contrast_groups, shuffled_groups, AgentCredits, Attributer, AttributionGroup, CreditStats,
    FallbackAttributer, IdentityAttributer, JudgeAttributer, LlmAttributer,
};
use crate::graph::{AgentSpec, PromptSet};
use crate::llm::Llm;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Progress events (the CLI turns them into progress bars).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ProgressEvent {
    /// A round begins.
    RoundStarted {
        /// Round number (1-based).
        round: usize,
        /// Configured number of rounds.
        rounds: usize,
    },
    /// A phase of the round begins (`propose`, `execute`, `attribute`, `update`, `validate`).
    Phase {
        /// Round number.
        round: usize,
        /// Phase name.
        phase: &'static str,
    },
    /// A round completed and was checkpointed.
    RoundFinished {
        /// Round number.
        round: usize,
        /// Validation score of this round's combined best.
        validation_score: f64,
        /// Its sign-test p-value against the best before it (see
        /// [`RoundRecord::validation_p`]).
        validation_p: Option<f64>,
        /// Best validation score so far.
        best_score: f64,
        /// Tokens spent so far.
        tokens: TokenCounters,
        /// Attribution groups of this round.
        attribution_groups: usize,
        /// Of those, degenerate ones (replaced by identity credits).
        degenerate_groups: usize,
    },
    /// The run stopped.
    Stopped {
        /// Why.
        reason: StopReason,
    },
}

/// Caller hooks of a run.
#[derive(Default, Clone, Copy)]
pub struct RunHooks<'a> {
    /// Progress callback.
    pub progress: Option<&'a (dyn Fn(&ProgressEvent) + Sync)>,
    /// Stop (as [`StopReason::Interrupted`]) once this many rounds are complete.
    pub stop_after_rounds: Option<usize>,
    /// The initial validation of another run with the same seed, executor and
    /// validation set (e.g. the CANTANTE run beside an identity ablation):
    /// when its configuration is this run's initial one, its score is used and
    /// its tokens are charged instead of validating again (same seed, same
    /// rollouts). `(run seed, point)`; ignored when the seed differs.
    pub prior_initial_validation: Option<(u64, &'a ValidationPoint)>,
}

/// Result of a run (also written as `summary.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizeResult {
    /// The best validated joint configuration.
    pub best_prompts: PromptSet,
    /// Its validation score.
    pub best_score: f64,
    /// Round after which it was validated (0 = the initial configuration).
    pub best_round: usize,
    /// Validation score of the initial configuration.
    pub initial_score: f64,
    /// Completed rounds.
    pub rounds_completed: usize,
    /// Why the run stopped.
    pub stop_reason: StopReason,
    /// Tokens spent.
    pub tokens: TokenCounters,
    /// Validation of the combined best after every round.
    pub validations: Vec<ValidationPoint>,
    /// Rejected generated prompts per agent.
    pub rejections: BTreeMap<String, usize>,
    /// Credit statistics per agent over all attributed rollouts.
    pub agent_credits: BTreeMap<String, CreditStats>,
    /// Final population per agent, best first.
    pub populations: BTreeMap<String, Vec<String>>,
    /// The design of the rounds.
    #[serde(default)]
    pub design: Design,
    /// Attribution groups sent over all rounds.
    #[serde(default)]
    pub attribution_groups: usize,
    /// Of those, groups whose credits were all equal while their scores
    /// differed (replaced by identity credits).
    #[serde(default)]
    pub degenerate_groups: usize,
}

/// One line of `rounds.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number.
    pub round: usize,
    /// Joint configurations run (index 0 = the incumbent).
    pub configs: Vec<PromptSet>,
    /// Their content hashes.
    pub config_hashes: Vec<String>,
    /// The round's design.
    #[serde(default)]
    pub design: Design,
    /// `changed[c]`: agents whose prompt in configuration c differs from the
    /// incumbent's (empty for the incumbent; absent in old records).
    #[serde(default)]
    pub changed: Vec<Vec<String>>,
    /// Dev query indices of the block.
    pub block: Vec<usize>,
    /// `scores[c][q]`: system score of configuration c on block query q.
    pub scores: Vec<Vec<f64>>,
    /// Block-mean system score per configuration.
    pub block_scores: Vec<f64>,
    /// `credits[agent][c][q]` (mean over the groups the rollout appeared in; null = missing).
    pub credits: BTreeMap<String, Vec<Vec<Option<f64>>>>,
    /// Attribution groups whose credits are missing after the retry.
    pub attribution_failures: usize,
    /// Attribution groups sent this round (joint: all; ofat: the tied pairs refined).
    #[serde(default)]
    pub attribution_groups: usize,
    /// Groups whose credits were all equal while their scores differed
    /// (replaced by identity credits).
    #[serde(default)]
    pub degenerate_groups: usize,
    /// Generated prompts rejected this round, per agent.
    pub rejections: BTreeMap<String, usize>,
    /// Why each of them was rejected, per agent (one line per rejected
    /// reply; absent in old records and for agents with none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejection_reasons: BTreeMap<String, Vec<String>>,
    /// Task tokens spent this round.
    pub task_tokens: u64,
    /// Meta tokens spent this round.
    pub meta_tokens: u64,
    /// Cumulative counters after the round.
    pub tokens: TokenCounters,
    /// Combined best per agent after the update.
    pub incumbent: PromptSet,
    /// Its validation score.
    pub validation_score: f64,
    /// One-sided sign-test p-value of its per-item validation scores against
    /// the best validated configuration before this round (`None` when either
    /// lacks per-item scores). With `validation_alpha` set, it replaces that
    /// best only below the level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_p: Option<f64>,
}

struct Ctx<'a> {
    executor: &'a dyn Executor,
    meta_llm: &'a dyn Llm,
    attributer: Box<dyn Attributer + 'a>,
    run_dir: &'a Path,
    hooks: RunHooks<'a>,
    specs: Vec<AgentSpec>,
}

impl Ctx<'_> {
    fn emit(&self, e: ProgressEvent) {
        if let Some(p) = self.hooks.progress {
            p(&e);
        }
    }
}

fn make_attributer<'a>(config: &OptimizeConfig, llm: &'a dyn Llm) -> Box<dyn Attributer + 'a> {
    if config.identity_attribution {
        return Box::new(IdentityAttributer);
    }
    match config.attributer {
        AttributerKind::Llm => Box::new(LlmAttributer {
            llm,
            field_cap: config.attribution_field_cap,
            max_new_tokens: config.attribution_max_new_tokens,
            temperature: config.attribution_temperature,
        }),
        // A backend without token probabilities (a server without logprobs)
        // hands over to the generative attributer.
        AttributerKind::Judge => Box::new(FallbackAttributer::new(
            Box::new(JudgeAttributer {
                llm,
                field_cap: config.attribution_field_cap,
                min_coverage: config.judge_min_coverage,
            }),
            Box::new(LlmAttributer {
                llm,
                field_cap: config.attribution_field_cap,
                max_new_tokens: config.attribution_max_new_tokens,
                temperature: config.attribution_temperature,
            }),
        )),
    }
}

fn optimized_agents(executor: &dyn Executor) -> Result<Vec<AgentSpec>, OptimizeError> {
    let setup = executor.setup();
    if setup.agents.is_empty() {
        return Err(OptimizeError::Setup("the setup has no agents".into()));
    }
    for a in &setup.agents {
        match setup.init_agent_prompt_pool.get(&a.name) {
            Some(p) if !p.is_empty() => {}
            _ => {
                return Err(OptimizeError::Setup(format!(
                    "agent `{}` has no prompts in init_agent_prompt_pool",
                    a.name
                )))
            }
        }
    }
    if executor.num_dev() == 0 {
        return Err(OptimizeError::Setup(
            "the executor has no dev queries".into(),
        ));
    }
    Ok(setup.agents.clone())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OptimizeError + '_ {
    move |source| OptimizeError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn json<T: Serialize>(path: &Path, v: &T) -> Result<Vec<u8>, OptimizeError> {
    serde_json::to_vec_pretty(v).map_err(|e| OptimizeError::Format {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Start a run in `run_dir` (created if needed; must not hold a checkpoint).
pub fn optimize(
    executor: &dyn Executor,
    meta_llm: &dyn Llm,
    attributer_llm: &dyn Llm,
    config: &OptimizeConfig,
    run_dir: &Path,
    hooks: RunHooks,
) -> Result<OptimizeResult, OptimizeError> {
    config.validate()?;
    let specs = optimized_agents(executor)?;
    std::fs::create_dir_all(run_dir).map_err(io(run_dir))?;
    if run_dir.join(checkpoint::CHECKPOINT).exists() {
        return Err(OptimizeError::Config {
            field: "run_dir".into(),
            message: format!(
                "{} already holds a checkpoint; resume it instead",
                run_dir.display()
            ),
        });
    }
    let cfg_path = run_dir.join("config.json");
    checkpoint::write_atomic(&cfg_path, &json(&cfg_path, config)?)?;
    checkpoint::truncate_lines(&run_dir.join("rounds.jsonl"), 0)?;
    let pool = &executor.setup().init_agent_prompt_pool;
    let count = |s: &str| meta_llm.count_tokens(s);
    let optimizers = specs
        .iter()
        .map(|a| {
            let p = &pool[&a.name];
            let opt = match config.optimizer {
                OptimizerKind::Capo => {
                    AgentOptimizer::Capo(super::capo::Capo::new(p, config.population, &count))
                }
                OptimizerKind::Evoprompt => AgentOptimizer::Evoprompt(
                    super::evoprompt::EvoPrompt::new(p, config.population),
                ),
            };
            (a.name.clone(), opt)
        })
        .collect();
    let mut st = RunState {
        version: checkpoint::VERSION,
        config: config.clone(),
        agents: specs.iter().map(|a| a.name.clone()).collect(),
        optimizers,
        rounds_done: 0,
        tokens: TokenCounters::default(),
        cache: BTreeMap::new(),
        validation_cache: BTreeMap::new(),
        validation_items: BTreeMap::new(),
        rejections: specs.iter().map(|a| (a.name.clone(), 0)).collect(),
        credits: BTreeMap::new(),
        validations: vec![],
        stop_reason: None,
        attribution_groups: 0,
        degenerate_groups: 0,
    };
    let ctx = Ctx {
        executor,
        meta_llm,
        attributer: make_attributer(config, attributer_llm),
        run_dir,
        hooks,
        specs,
    };
    let initial = incumbent_config(&st);
    let prior = ctx.hooks.prior_initial_validation.filter(|(seed, p)| {
        *seed == st.config.seed && config_hash(&p.config) == config_hash(&initial)
    });
    if let Some((_, p)) = prior {
        let vseed = derive_seed(st.config.seed, &[tag("validate")]);
        st.tokens.validation += p.tokens as u64;
        let key = format!("{}:{vseed}", config_hash(&initial));
        st.validation_cache.insert(key.clone(), (p.score, p.tokens));
        if !p.item_scores.is_empty() {
            st.validation_items.insert(key, p.item_scores.clone());
        }
        tracing::info!(
            score = p.score,
            "initial validation reused from a run with the same seed"
        );
        st.validations.push(ValidationPoint {
            round: 0,
            config: initial,
            score: p.score,
            tokens: p.tokens,
            item_scores: p.item_scores.clone(),
        });
    } else {
        match validate(&ctx, &mut st, &initial, 0) {
            Ok(p) => st.validations.push(p),
            Err(Interrupt::Stop(reason)) => return finish(&ctx, st, reason),
            Err(Interrupt::Error(e)) => return Err(e),
        }
    }
    checkpoint::save(run_dir, &st)?;
    drive(&ctx, st)
}

/// Continue the run checkpointed in `run_dir` (same executor and models).
/// The result equals the one of an uninterrupted run with the same seed.
/// A `STOP` file left in the run directory is removed (resuming is the
/// explicit wish to continue).
pub fn resume(
    executor: &dyn Executor,
    meta_llm: &dyn Llm,
    attributer_llm: &dyn Llm,
    run_dir: &Path,
    hooks: RunHooks,
) -> Result<OptimizeResult, OptimizeError> {
    resume_inner(executor, meta_llm, attributer_llm, run_dir, None, hooks)
}

/// Like [`resume`], with a new configuration that may change only `rounds`
/// and the token caps (e.g. to extend a finished run or raise its budget);
/// any other difference is an error naming the field.
pub fn resume_with_config(
    executor: &dyn Executor,
    meta_llm: &dyn Llm,
    attributer_llm: &dyn Llm,
    run_dir: &Path,
    config: &OptimizeConfig,
    hooks: RunHooks,
) -> Result<OptimizeResult, OptimizeError> {
    resume_inner(
        executor,
        meta_llm,
        attributer_llm,
        run_dir,
        Some(config),
        hooks,
    )
}

fn resume_inner(
    executor: &dyn Executor,
    meta_llm: &dyn Llm,
    attributer_llm: &dyn Llm,
    run_dir: &Path,
    new_config: Option<&OptimizeConfig>,
    hooks: RunHooks,
) -> Result<OptimizeResult, OptimizeError> {
    let mut st = checkpoint::load(run_dir)?;
    let specs = optimized_agents(executor)?;
    let names: Vec<String> = specs.iter().map(|a| a.name.clone()).collect();
    if names != st.agents {
        return Err(OptimizeError::Setup(format!(
            "checkpoint agents {:?} differ from the setup's {:?}",
            st.agents, names
        )));
    }
    for a in &st.agents {
        let problem = match st.optimizers.get(a) {
            None => Some("no optimizer state".to_string()),
            Some(o) => o.check().err(),
        };
        if let Some(message) = problem {
            return Err(OptimizeError::Format {
                path: run_dir.join(checkpoint::CHECKPOINT).display().to_string(),
                message: format!("agent `{a}`: {message}"),
            });
        }
    }
    if let Some(c) = new_config {
        c.validate()?;
        let mut allowed = st.config.clone();
        allowed.rounds = c.rounds;
        allowed.max_total_tokens = c.max_total_tokens;
        allowed.max_task_tokens = c.max_task_tokens;
        allowed.max_meta_tokens = c.max_meta_tokens;
        if &allowed != c {
            let (a, b) = (
                serde_json::to_value(&allowed).unwrap_or_default(),
                serde_json::to_value(c).unwrap_or_default(),
            );
            let field = a
                .as_object()
                .and_then(|m| {
                    m.iter()
                        .find(|(k, v)| b.get(k.as_str()) != Some(v))
                        .map(|(k, _)| k.clone())
                })
                .unwrap_or_else(|| "?".into());
            return Err(OptimizeError::Config {
                field,
                message: "only rounds and token caps may change when resuming".into(),
            });
        }
        st.config = allowed;
        let cfg_path = run_dir.join("config.json");
        checkpoint::write_atomic(&cfg_path, &json(&cfg_path, &st.config)?)?;
    }
    let stop = run_dir.join("STOP");
    if stop.exists() {
        tracing::info!(path = %stop.display(), "removing STOP file on resume");
        std::fs::remove_file(&stop).map_err(io(&stop))?;
    }
    checkpoint::truncate_lines(&run_dir.join("rounds.jsonl"), st.rounds_done)?;
    st.stop_reason = None;
    let config = st.config.clone();
    let ctx = Ctx {
        executor,
        meta_llm,
        attributer: make_attributer(&config, attributer_llm),
        run_dir,
        hooks,
        specs,
    };
    if st.validations.is_empty() {
        let initial = incumbent_config(&st);
        match validate(&ctx, &mut st, &initial, 0) {
            Ok(p) => st.validations.push(p),
            Err(Interrupt::Stop(reason)) => return finish(&ctx, st, reason),
            Err(Interrupt::Error(e)) => return Err(e),
        }
        checkpoint::save(run_dir, &st)?;
    }
    drive(&ctx, st)
}

fn drive(ctx: &Ctx, mut st: RunState) -> Result<OptimizeResult, OptimizeError> {
    let mut reason = StopReason::Completed;
    while st.rounds_done < st.config.rounds {
        if ctx
            .hooks
            .stop_after_rounds
            .is_some_and(|n| st.rounds_done >= n)
        {
            reason = StopReason::Interrupted;
            break;
        }
        let round = st.rounds_done + 1;
        ctx.emit(ProgressEvent::RoundStarted {
            round,
            rounds: st.config.rounds,
        });
        let mut next = st.clone();
        match run_round(ctx, &mut next, round) {
            Ok(record) => {
                let line = serde_json::to_string(&record).map_err(|e| OptimizeError::Format {
                    path: "rounds.jsonl".into(),
                    message: e.to_string(),
                })?;
                checkpoint::append_line(&ctx.run_dir.join("rounds.jsonl"), &line)?;
                next.rounds_done = round;
                st = next;
                checkpoint::save(ctx.run_dir, &st)?;
                write_best(ctx.run_dir, &st)?;
                let best = st.best().map(|b| b.score).unwrap_or(f64::NAN);
                ctx.emit(ProgressEvent::RoundFinished {
                    round,
                    validation_score: record.validation_score,
                    validation_p: record.validation_p,
                    best_score: best,
                    tokens: st.tokens,
                    attribution_groups: record.attribution_groups,
                    degenerate_groups: record.degenerate_groups,
                });
                tracing::info!(
                    round,
                    validation = record.validation_score,
                    best,
                    total_tokens = st.tokens.total(),
                    "round done"
                );
                if ctx.run_dir.join("STOP").exists() {
                    reason = StopReason::StopFile;
                    break;
                }
            }
            Err(Interrupt::Stop(r)) => {
                // Keep what was paid for; the unfinished round itself is discarded.
                st.tokens = next.tokens;
                st.cache = next.cache;
                st.validation_cache = next.validation_cache;
                st.validation_items = next.validation_items;
                reason = r;
                break;
            }
            Err(Interrupt::Error(e)) => return Err(e),
        }
    }
    finish(ctx, st, reason)
}

fn finish(
    ctx: &Ctx,
    mut st: RunState,
    reason: StopReason,
) -> Result<OptimizeResult, OptimizeError> {
    tracing::info!(?reason, rounds = st.rounds_done, "run stopped");
    st.stop_reason = Some(reason.clone());
    checkpoint::save(ctx.run_dir, &st)?;
    let result = result_of(&st, reason.clone());
    let path = ctx.run_dir.join("summary.json");
    checkpoint::write_atomic(&path, &json(&path, &result)?)?;
    write_best(ctx.run_dir, &st)?;
    ctx.emit(ProgressEvent::Stopped { reason });
    Ok(result)
}

fn write_best(run_dir: &Path, st: &RunState) -> Result<(), OptimizeError> {
    let path = run_dir.join("best_prompts.yaml");
    if let Some(best) = st.best() {
        let text = serde_yaml::to_string(&best.config).map_err(|e| OptimizeError::Format {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        checkpoint::write_atomic(&path, text.as_bytes())?;
    }
    Ok(())
}

/// The result of a run state (what `summary.json` holds), stopped for `reason`.
pub fn result_of(st: &RunState, reason: StopReason) -> OptimizeResult {
    let best = st.best().cloned().unwrap_or(ValidationPoint {
        round: 0,
        config: incumbent_config(st),
        score: f64::NAN,
        tokens: 0,
        item_scores: vec![],
    });
    OptimizeResult {
        best_prompts: best.config.clone(),
        best_score: best.score,
        best_round: best.round,
        initial_score: st.validations.first().map(|v| v.score).unwrap_or(f64::NAN),
        rounds_completed: st.rounds_done,
        stop_reason: reason,
        tokens: st.tokens,
        validations: st.validations.clone(),
        rejections: st.rejections.clone(),
        agent_credits: st
            .credits
            .iter()
            .map(|(a, c)| (a.clone(), c.stats()))
            .collect(),
        populations: st
            .optimizers
            .iter()
            .map(|(a, o)| (a.clone(), o.population()))
            .collect(),
        design: st.config.design,
        attribution_groups: st.attribution_groups,
        degenerate_groups: st.degenerate_groups,
    }
}

fn incumbent_config(st: &RunState) -> PromptSet {
    st.optimizers
        .iter()
        .map(|(a, o)| (a.clone(), o.incumbent()))
        .collect()
}

fn run_round(ctx: &Ctx, st: &mut RunState, round: usize) -> Result<RoundRecord, Interrupt> {
    let before = st.tokens;
    ctx.emit(ProgressEvent::Phase {
        round,
        phase: "propose",
    });
    let (rejections, rejection_reasons) = propose(ctx, st, round)?;
    ctx.emit(ProgressEvent::Phase {
        round,
        phase: "execute",
    });
    let (planned, block, rollouts) = execute(ctx, st, round)?;
    ctx.emit(ProgressEvent::Phase {
        round,
        phase: "attribute",
    });
    let attributed = attribute(ctx, st, round, &planned, &block, &rollouts)?;
    st.attribution_groups += attributed.groups;
    st.degenerate_groups += attributed.degenerate;
    let credits = attributed.credits;
    let configs: Vec<PromptSet> = planned.iter().map(|p| p.config.clone()).collect();
    ctx.emit(ProgressEvent::Phase {
        round,
        phase: "update",
    });
    update(ctx, st, round, &configs, &block, &credits);
    ctx.emit(ProgressEvent::Phase {
        round,
        phase: "validate",
    });
    let incumbent = incumbent_config(st);
    let point = validate(ctx, st, &incumbent, round)?;
    let validation_score = point.score;
    let validation_p = st.best().and_then(|b| point.p_against(b));
    st.validations.push(point);
    let scores = design::score_matrix(&rollouts);
    Ok(RoundRecord {
        round,
        config_hashes: configs.iter().map(config_hash).collect(),
        design: st.config.design,
        changed: planned.into_iter().map(|p| p.changed).collect(),
        configs,
        block,
        block_scores: scores
            .iter()
            .map(|r| r.iter().sum::<f64>() / r.len().max(1) as f64)
            .collect(),
        scores,
        credits,
        attribution_failures: attributed.failures,
        attribution_groups: attributed.groups,
        degenerate_groups: attributed.degenerate,
        rejections,
        rejection_reasons,
        task_tokens: st.tokens.task() - before.task(),
        meta_tokens: st.tokens.meta() - before.meta(),
        tokens: st.tokens,
        incumbent,
        validation_score,
        validation_p,
    })
}

/// Propose: every agent's optimizer writes its candidates; the meta calls of
/// each phase (crossover, then mutation) go out as one batch over all agents.
/// Returns the number of rejected prompts per agent, and why each was
/// rejected (agents without rejections are left out of the second map).
fn propose(
    ctx: &Ctx,
    st: &mut RunState,
    round: usize,
) -> Result<(BTreeMap<String, usize>, BTreeMap<String, Vec<String>>), Interrupt> {
    let n = st.agents.len();
    let mut active = vec![true; n];
    let mut outputs: Vec<Vec<Option<String>>> = vec![Vec::new(); n];
    let mut rejections: BTreeMap<String, usize> =
        st.agents.iter().map(|a| (a.clone(), 0)).collect();
    let mut reasons: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let shots: Vec<Vec<super::edit::Shot>> = ctx
        .specs
        .iter()
        .map(|spec| {
            if st.config.edit_shots == 0 {
                return Vec::new();
            }
            super::edit::shot_records(
                spec,
                cached_dev_rollouts(st),
                |q| ctx.executor.query_text(q),
                st.config.max_shot_chars,
            )
        })
        .collect();
    for phase in 0..8 {
        let mut jobs = Vec::new();
        let mut owners = Vec::new();
        for i in 0..n {
            if !active[i] {
                continue;
            }
            let name = st.agents[i].clone();
            let actx = AgentContext {
                agent: &ctx.specs[i],
                run_seed: st.config.seed,
                round,
                config: &st.config,
                llm: ctx.meta_llm,
                shots: &shots[i],
            };
            let opt = st.optimizers.get_mut(&name).ok_or_else(|| {
                Interrupt::Error(OptimizeError::Setup(format!(
                    "no optimizer for agent `{name}`"
                )))
            })?;
            match opt.propose_phase(phase, &outputs[i], &actx) {
                None => active[i] = false,
                Some(js) => {
                    owners.extend(std::iter::repeat_n(i, js.len()));
                    jobs.extend(js);
                }
            }
        }
        if !active.iter().any(|&a| a) {
            break;
        }
        let specs: Vec<&AgentSpec> = owners.iter().map(|&i| &ctx.specs[i]).collect();
        let spent = st.tokens;
        let config = st.config.clone();
        let out = run_meta_jobs(
            ctx.meta_llm,
            &jobs,
            &specs,
            config.meta_max_new_tokens,
            config.meta_temperature,
            &mut |projected| budget::check(&config, &spent, Spend::Meta, projected, "rewrite"),
        );
        let out = out?;
        st.tokens.rewrite_input += out.input_tokens as u64;
        st.tokens.rewrite_output += out.output_tokens as u64;
        if let Some(reason) = out.stopped {
            return Err(Interrupt::Stop(reason));
        }
        for o in outputs.iter_mut() {
            o.clear();
        }
        for (((&i, p), rej), why) in owners
            .iter()
            .zip(out.prompts)
            .zip(out.rejections)
            .zip(out.reasons)
        {
            outputs[i].push(p);
            *rejections.entry(st.agents[i].clone()).or_default() += rej;
            *st.rejections.entry(st.agents[i].clone()).or_default() += rej;
            if !why.is_empty() {
                reasons
                    .entry(st.agents[i].clone())
                    .or_insert_with(Vec::new)
                    .extend(why);
            }
        }
    }
    Ok((rejections, reasons))
}

/// The dev rollouts of earlier rounds, `(query index, rollout)`, from the
/// rollout cache (keys `hash:query:seed`; validation never enters it).
fn cached_dev_rollouts(st: &RunState) -> impl Iterator<Item = (usize, &Rollout)> {
    st.cache.iter().filter_map(|(k, r)| {
        let q = k.split(':').nth(1)?.parse().ok()?;
        Some((q, r))
    })
}

type Executed = (Vec<Planned>, Vec<usize>, Vec<Vec<Rollout>>);

/// Execute: the round's configurations (the incumbent first; see
/// [`super::design::plan`]: candidate i of every agent together, or one agent
/// at a time; each agent's list is shuffled per round so pairings and the
/// capped subset vary) run on one seeded block in one executor call. Fully cached configurations are not sent; the others run on
/// the union of their missing queries (so a partly cached configuration may
/// recompute a cached cell, whose cached value is kept: rollouts are
/// deterministic in (configuration, query, seed)).
fn execute(ctx: &Ctx, st: &mut RunState, round: usize) -> Result<Executed, Interrupt> {
    let seed = st.config.seed;
    let incumbent = incumbent_config(st);
    let lists: Vec<(String, Vec<String>)> = st
        .agents
        .iter()
        .map(|a| {
            let opt = &st.optimizers[a];
            let (prompts, priority) = (opt.candidates_to_run(), opt.run_priority());
            debug_assert_eq!(prompts.len(), priority.len(), "run_priority is parallel");
            let mut list: Vec<(String, RunPriority)> = prompts.into_iter().zip(priority).collect();
            list.shuffle(&mut rng_for(seed, &[tag("align"), round as u64, tag(a)]));
            // A capped one-at-a-time round runs only the first few: the
            // least-evaluated (new offspring first); the shuffle breaks ties.
            if st.config.design == Design::Ofat && st.config.ofat_max_candidates.is_some() {
                list.sort_by_key(|(_, p)| *p);
            }
            (a.clone(), list.into_iter().map(|(p, _)| p).collect())
        })
        .collect();
    let planned = super::design::plan(
        st.config.design,
        &incumbent,
        &lists,
        st.config.ofat_max_candidates,
    );
    let configs: Vec<PromptSet> = planned.iter().map(|p| p.config.clone()).collect();
    let num_dev = ctx.executor.num_dev();
    let mut rng = rng_for(seed, &[tag("block"), round as u64]);
    let block =
        rand::seq::index::sample(&mut rng, num_dev, st.config.block_size.min(num_dev)).into_vec();

    let rseed = derive_seed(seed, &[tag("rollout")]);
    let hashes: Vec<String> = configs.iter().map(config_hash).collect();
    let key = |h: &str, q: usize| format!("{h}:{q}:{rseed}");
    let need: Vec<usize> = (0..configs.len())
        .filter(|&c| {
            block
                .iter()
                .any(|&q| !st.cache.contains_key(&key(&hashes[c], q)))
        })
        .collect();
    let queries: Vec<usize> = block
        .iter()
        .copied()
        .filter(|&q| {
            need.iter()
                .any(|&c| !st.cache.contains_key(&key(&hashes[c], q)))
        })
        .collect();
    if !need.is_empty() {
        let per_rollout = if st.tokens.rollouts > 0 {
            (st.tokens.task_input + st.tokens.task_output).div_ceil(st.tokens.rollouts)
        } else {
            incumbent
                .values()
                .map(|p| ctx.meta_llm.count_tokens(p) as u64)
                .sum::<u64>()
                + (incumbent.len() * st.config.task_max_new_tokens_estimate) as u64
        };
        let projected = per_rollout * (need.len() * queries.len()) as u64;
        budget::check(&st.config, &st.tokens, Spend::Task, projected, "execute")
            .map_err(Interrupt::Stop)?;
        let to_run: Vec<PromptSet> = need.iter().map(|&c| configs[c].clone()).collect();
        let out = ctx
            .executor
            .execute(&to_run, &queries, rseed)
            .map_err(|e| Interrupt::Error(OptimizeError::Executor(e)))?;
        if out.len() != to_run.len() || out.iter().any(|row| row.len() != queries.len()) {
            return Err(Interrupt::Error(OptimizeError::Shape {
                expected: format!("{}x{} rollouts", to_run.len(), queries.len()),
                got: format!(
                    "{} rows of lengths {:?}",
                    out.len(),
                    out.iter().map(Vec::len).collect::<Vec<_>>()
                ),
            }));
        }
        for (row, &c) in out.into_iter().zip(&need) {
            for (r, &q) in row.into_iter().zip(&queries) {
                st.tokens.task_input += r.input_tokens as u64;
                st.tokens.task_output += r.output_tokens as u64;
                st.tokens.rollouts += 1;
                st.cache.entry(key(&hashes[c], q)).or_insert(r);
            }
        }
    }
    let rollouts = hashes
        .iter()
        .map(|h| {
            block
                .iter()
                .map(|&q| st.cache[&key(h, q)].clone())
                .collect()
        })
        .collect();
    Ok((planned, block, rollouts))
}

type Credits = BTreeMap<String, Vec<Vec<Option<f64>>>>;

/// What the attribute phase produced.
struct Attributed {
    credits: Credits,
    /// Groups whose credits are missing after the retry.
    failures: usize,
    /// Groups sent to the attributer.
    groups: usize,
    /// Groups replaced by identity credits because they were degenerate.
    degenerate: usize,
}

/// Run the attributer on `groups` under the meta budget, charging its tokens.
fn run_attributer(
    ctx: &Ctx,
    st: &mut RunState,
    groups: &[AttributionGroup],
) -> Result<crate::attribution::AttributionOutcome, Interrupt> {
    let mut refused = None;
    let (config, spent) = (st.config.clone(), st.tokens);
    let result =
        ctx.attributer
            .attribute(&st.agents, groups, &mut |projected| match budget::check(
                &config,
                &spent,
                Spend::Meta,
                projected,
                "attribution",
            ) {
                Ok(()) => true,
                Err(reason) => {
                    refused = Some(reason);
                    false
                }
            });
    let out = match (result, refused) {
        (Ok(out), _) => out,
        (Err(e), Some(reason)) => {
            if let crate::attribution::AttributionError::BudgetRefused {
                input_tokens,
                output_tokens,
                ..
            } = e
            {
                st.tokens.attribution_input += input_tokens as u64;
                st.tokens.attribution_output += output_tokens as u64;
            }
            return Err(Interrupt::Stop(reason));
        }
        (Err(e), None) => return Err(Interrupt::Error(OptimizeError::Attribution(e))),
    };
    st.tokens.attribution_input += out.input_tokens as u64;
    st.tokens.attribution_output += out.output_tokens as u64;
    Ok(out)
}

/// Attribute: the joint design asks the attributer (see [`attribute_joint`]);
/// the one-factor-at-a-time design computes exact counterfactual credits
/// (see [`attribute_ofat`]).
fn attribute(
    ctx: &Ctx,
    st: &mut RunState,
    round: usize,
    planned: &[Planned],
    block: &[usize],
    rollouts: &[Vec<Rollout>],
) -> Result<Attributed, Interrupt> {
    match st.config.design {
        Design::Joint => attribute_joint(ctx, st, round, planned, block, rollouts),
        Design::Ofat => attribute_ofat(ctx, st, round, planned, block, rollouts),
    }
}

/// Joint design: per query, groups mixing the incumbent with candidates
/// (seeded shuffle); all groups of the round in one attributer batch. A
/// rollout seen in several groups (the incumbent) gets the mean of its
/// non-missing credits. A degenerate group ([`design::is_degenerate`]) gets
/// the identity credits instead.
fn attribute_joint(
    ctx: &Ctx,
    st: &mut RunState,
    round: usize,
    planned: &[Planned],
    block: &[usize],
    rollouts: &[Vec<Rollout>],
) -> Result<Attributed, Interrupt> {
    let seed = st.config.seed;
    let mut groups = Vec::new();
    let mut members = Vec::new();
    for (qi, &q) in block.iter().enumerate() {
        let text = ctx.executor.query_text(q);
        let gs = contrast_groups(
            rollouts.len(),
            0,
            st.config.group_size,
            derive_seed(seed, &[tag("groups"), round as u64, q as u64]),
        );
        for (j, g) in gs.into_iter().enumerate() {
            groups.push(AttributionGroup {
                query: text.clone(),
                rollouts: g.iter().map(|&c| rollouts[c][qi].clone()).collect(),
                seed: derive_seed(seed, &[tag("attribute"), round as u64, q as u64, j as u64]),
                focus: None,
            });
            members.push((qi, g));
        }
    }
    let out = run_attributer(ctx, st, &groups)?;
    let (nc, nq) = (rollouts.len(), block.len());
    let mut sums: BTreeMap<&String, Vec<Vec<(f64, usize)>>> = st
        .agents
        .iter()
        .map(|a| (a, vec![vec![(0.0, 0); nq]; nc]))
        .collect();
    let mut degenerate = 0;
    for (((qi, g), credits), group) in members.iter().zip(&out.credits).zip(&groups) {
        let scores: Vec<f64> = group.rollouts.iter().map(|r| r.score).collect();
        let (mut credits, replaced) = design::checked_credits(&st.agents, &scores, credits);
        degenerate += usize::from(replaced);
        if st.config.joint_split && ctx.attributer.uses_llm() {
            credits = split_group(
                &st.agents,
                g,
                planned,
                &scores,
                &credits,
                st.config.ofat_tie_weight,
            );
        }
        for (&c, ac) in g.iter().zip(&credits) {
            add_credits(&mut sums, ac, c, *qi);
        }
    }
    if degenerate > 0 {
        tracing::warn!(
            round,
            degenerate,
            groups = groups.len(),
            "attributer credited every agent the same in groups whose scores differ; identity credits used there"
        );
    }
    let credits: Credits = sums
        .into_iter()
        .map(|(a, m)| {
            let m = m
                .into_iter()
                .map(|row| {
                    row.into_iter()
                        .map(|(s, n)| if n > 0 { Some(s / n as f64) } else { None })
                        .collect()
                })
                .collect();
            (a.clone(), m)
        })
        .collect();
    Ok(Attributed {
        credits,
        failures: out.failures,
        groups: groups.len(),
        degenerate,
    })
}

/// A joint group's credits anchored on score differences
/// ([`design::split_credits`]): the incumbent's rollout (configuration 0)
/// gets 0 for every agent, each other rollout its difference split between
/// its changed agents. A group without the incumbent is left as it is.
fn split_group(
    agents: &[String],
    members: &[usize],
    planned: &[Planned],
    scores: &[f64],
    credits: &[AgentCredits],
    tie_weight: f64,
) -> Vec<AgentCredits> {
    let Some(inc) = members.iter().position(|&c| c == 0) else {
        return credits.to_vec();
    };
    members
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            if c == 0 {
                agents.iter().map(|a| (a.clone(), Some(0.0))).collect()
            } else {
                design::split_credits(
                    &planned[c].changed,
                    scores[k] - scores[inc],
                    &credits[k],
                    &credits[inc],
                    tie_weight,
                )
            }
        })
        .collect()
}

/// (agent, configuration, block position) of a tied comparison.
type TieSlot = (String, usize, usize);

/// The attribution groups of an ofat round's ties: for every single-agent
/// configuration and query whose counterfactual credit is exactly 0, the pair
/// (candidate rollout, incumbent rollout) focused on the changed agent.
fn tie_pairs(
    planned: &[Planned],
    credits: &Credits,
    queries: &[usize],
    rollouts: &[Vec<Rollout>],
    query_text: &dyn Fn(usize) -> String,
    seed: &dyn Fn(usize, usize, &str) -> u64,
) -> (Vec<AttributionGroup>, Vec<TieSlot>) {
    let mut groups = Vec::new();
    let mut slots = Vec::new();
    for (c, p) in planned.iter().enumerate().skip(1) {
        let [agent] = p.changed.as_slice() else {
            continue;
        };
        for (qi, &q) in queries.iter().enumerate() {
            if credits[agent][c][qi] != Some(0.0) {
                continue;
            }
            groups.push(AttributionGroup {
                query: query_text(q),
                rollouts: vec![rollouts[c][qi].clone(), rollouts[0][qi].clone()],
                seed: seed(q, c, agent),
                focus: Some(agent.clone()),
            });
            slots.push((agent.clone(), c, qi));
        }
    }
    (groups, slots)
}

/// Replace each tied 0 by its refinement where the attributer credited both rollouts.
fn apply_ties(
    credits: &mut Credits,
    slots: &[TieSlot],
    out: &crate::attribution::AttributionOutcome,
    weight: f64,
) {
    for ((agent, c, qi), pair) in slots.iter().zip(&out.credits) {
        let get = |k: usize| pair.get(k).and_then(|m| m.get(agent)).copied().flatten();
        if let (Some(r), Some(m)) = (
            design::tie_refinement(get(0), get(1), weight),
            credits.get_mut(agent),
        ) {
            m[*c][*qi] = Some(r);
        }
    }
}

/// One-factor-at-a-time design: the changed agent's credit is its exact
/// counterfactual score difference to the incumbent on the same query
/// ([`design::counterfactual_credits`]). Where it ties and
/// `ofat_tie_weight > 0`, the attributer compares the two rollouts (focused
/// on the changed agent, one batch for the round) and the difference of its
/// credits, weighted, refines the 0 ([`design::tie_refinement`]).
fn attribute_ofat(
    ctx: &Ctx,
    st: &mut RunState,
    round: usize,
    planned: &[Planned],
    block: &[usize],
    rollouts: &[Vec<Rollout>],
) -> Result<Attributed, Interrupt> {
    let scores = design::score_matrix(rollouts);
    let mut credits = design::counterfactual_credits(&st.agents, planned, &scores);
    let weight = st.config.ofat_tie_weight;
    let seed = st.config.seed;
    let (groups, slots) = if weight > 0.0 && ctx.attributer.uses_llm() {
        tie_pairs(
            planned,
            &credits,
            block,
            rollouts,
            &|q| ctx.executor.query_text(q),
            &|q, c, agent| {
                derive_seed(
                    seed,
                    &[tag("tie"), round as u64, q as u64, c as u64, tag(agent)],
                )
            },
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let mut failures = 0;
    if !groups.is_empty() {
        let out = run_attributer(ctx, st, &groups)?;
        apply_ties(&mut credits, &slots, &out, weight);
        failures = out.failures;
    }
    Ok(Attributed {
        credits,
        failures,
        groups: groups.len(),
        degenerate: 0,
    })
}

fn add_credits(
    sums: &mut BTreeMap<&String, Vec<Vec<(f64, usize)>>>,
    ac: &AgentCredits,
    c: usize,
    qi: usize,
) {
    for (a, v) in ac {
        if let (Some(m), Some(x)) = (sums.get_mut(a), v) {
            m[c][qi].0 += x;
            m[c][qi].1 += 1;
        }
    }
}

/// Update: each agent's optimizer gets, for each of its candidates, the
/// per-query credits of the configurations that used it (mean when several did).
fn update(
    ctx: &Ctx,
    st: &mut RunState,
    round: usize,
    configs: &[PromptSet],
    block: &[usize],
    credits: &Credits,
) {
    for i in 0..st.agents.len() {
        let a = st.agents[i].clone();
        let Some(agent_credits) = credits.get(&a) else {
            continue;
        };
        for row in agent_credits {
            for c in row {
                st.credits
                    .entry(a.clone())
                    .or_insert_with(CreditAccumulator::default)
                    .add(*c);
            }
        }
        let cands = st.optimizers[&a].candidates_to_run();
        let evals: Vec<QueryCredits> = cands
            .iter()
            .map(|p| {
                block
                    .iter()
                    .enumerate()
                    .map(|(qi, &q)| {
                        let vals: Vec<f64> = configs
                            .iter()
                            .enumerate()
                            .filter(|(_, cfg)| cfg.get(&a) == Some(p))
                            .filter_map(|(c, _)| agent_credits[c][qi])
                            .collect();
                        let v = if vals.is_empty() {
                            None
                        } else {
                            Some(vals.iter().sum::<f64>() / vals.len() as f64)
                        };
                        (q, v)
                    })
                    .collect()
            })
            .collect();
        let config = st.config.clone();
        let actx = AgentContext {
            agent: &ctx.specs[i],
            run_seed: config.seed,
            round,
            config: &config,
            llm: ctx.meta_llm,
            shots: &[],
        };
        if let Some(opt) = st.optimizers.get_mut(&a) {
            opt.update(round, &evals, &actx);
        }
    }
}

/// Validate the combined best so the reported best was actually run (cached by configuration).
fn validate(
    ctx: &Ctx,
    st: &mut RunState,
    config: &PromptSet,
    round: usize,
) -> Result<ValidationPoint, Interrupt> {
    let vseed = derive_seed(st.config.seed, &[tag("validate")]);
    let key = format!("{}:{vseed}", config_hash(config));
    if let Some(&(score, _)) = st.validation_cache.get(&key) {
        return Ok(ValidationPoint {
            round,
            config: config.clone(),
            score,
            tokens: 0,
            item_scores: st.validation_items.get(&key).cloned().unwrap_or_default(),
        });
    }
    let projected = st
        .validations
        .iter()
        .map(|v| v.tokens as u64)
        .max()
        .unwrap_or_else(|| {
            (config
                .values()
                .map(|p| ctx.meta_llm.count_tokens(p))
                .sum::<usize>()
                + config.len() * st.config.task_max_new_tokens_estimate) as u64
                * st.config.validation_size_estimate as u64
        });
    budget::check(&st.config, &st.tokens, Spend::Task, projected, "validate")
        .map_err(Interrupt::Stop)?;
    let (item_scores, tokens) = ctx
        .executor
        .validate(config, vseed)
        .map_err(|e| Interrupt::Error(OptimizeError::Executor(e)))?;
    if item_scores.is_empty() {
        return Err(Interrupt::Error(OptimizeError::Shape {
            expected: "a score per validation item".into(),
            got: "no validation scores".into(),
        }));
    }
    let score = item_scores.iter().sum::<f64>() / item_scores.len() as f64;
    st.tokens.validation += tokens as u64;
    st.validation_cache.insert(key.clone(), (score, tokens));
    st.validation_items.insert(key, item_scores.clone());
    Ok(ValidationPoint {
        round,
        config: config.clone(),
        score,
        tokens,
        item_scores,
    })
}

/// What [`attribute_only`] measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttributionReport {
    /// The design used.
    pub design: Design,
    /// Per-agent credit statistics (rank agents by mean credit: the lowest
    /// is the weak link).
    pub stats: BTreeMap<String, CreditStats>,
    /// Configurations run (joint: the given ones; ofat: the reference and
    /// every single-agent swap).
    pub configs: usize,
    /// Attribution groups sent (0 for ofat without tie refinement).
    pub groups: usize,
    /// Groups whose credits were all equal while their scores differed
    /// (joint; replaced by identity credits).
    pub degenerate_groups: usize,
    /// Groups whose credits are missing after the retry.
    pub failures: usize,
}

/// Run only the attribution on a set of configurations and queries.
///
/// `joint` design: every query's rollouts are contrasted in shuffled groups
/// of `config.group_size` (no incumbent) and each rollout's agents get the
/// attributer's credits. `ofat`: the first configuration is the reference;
/// every agent prompt of the others that differs from the reference's is
/// swapped into it alone, and that agent's credit is the swap's score
/// difference on the same query (ties refined by the attributer as in a
/// run); an agent's statistics are over its swaps, and an agent whose prompt
/// is the same everywhere gets none. Either way a low mean credit marks the
/// agent whose prompts hurt.
pub fn attribute_only(
    executor: &dyn Executor,
    attributer_llm: &dyn Llm,
    config_set: &[PromptSet],
    queries: &[usize],
    seed: u64,
    config: &OptimizeConfig,
) -> Result<AttributionReport, OptimizeError> {
    config.validate()?;
    let agents: Vec<String> = executor
        .setup()
        .agents
        .iter()
        .map(|a| a.name.clone())
        .collect();
    let planned = match config.design {
        Design::Joint => config_set
            .iter()
            .map(|c| Planned {
                config: c.clone(),
                changed: vec![],
            })
            .collect(),
        Design::Ofat => design::swaps(config_set),
    };
    let configs: Vec<PromptSet> = planned.iter().map(|p| p.config.clone()).collect();
    let rseed = derive_seed(seed, &[tag("rollout")]);
    let rollouts = executor
        .execute(&configs, queries, rseed)
        .map_err(OptimizeError::Executor)?;
    if rollouts.len() != configs.len() || rollouts.iter().any(|r| r.len() != queries.len()) {
        return Err(OptimizeError::Shape {
            expected: format!("{}x{} rollouts", configs.len(), queries.len()),
            got: format!("{} rows", rollouts.len()),
        });
    }
    let attributer = make_attributer(config, attributer_llm);
    let mut values: BTreeMap<String, Vec<f64>> =
        agents.iter().map(|a| (a.clone(), vec![])).collect();
    let mut report = AttributionReport {
        design: config.design,
        stats: BTreeMap::new(),
        configs: configs.len(),
        groups: 0,
        degenerate_groups: 0,
        failures: 0,
    };
    match config.design {
        Design::Joint => {
            let mut groups = Vec::new();
            for (qi, &q) in queries.iter().enumerate() {
                let text = executor.query_text(q);
                for (j, g) in shuffled_groups(
                    configs.len(),
                    config.group_size,
                    derive_seed(seed, &[tag("groups"), q as u64]),
                )
                .into_iter()
                .enumerate()
                {
                    groups.push(AttributionGroup {
                        query: text.clone(),
                        rollouts: g.iter().map(|&c| rollouts[c][qi].clone()).collect(),
                        seed: derive_seed(seed, &[tag("attribute"), q as u64, j as u64]),
                        focus: None,
                    });
                }
            }
            let out = attributer.attribute(&agents, &groups, &mut |_| true)?;
            report.groups = groups.len();
            report.failures = out.failures;
            for (group, credits) in groups.iter().zip(&out.credits) {
                let scores: Vec<f64> = group.rollouts.iter().map(|r| r.score).collect();
                let (credits, replaced) = design::checked_credits(&agents, &scores, credits);
                report.degenerate_groups += usize::from(replaced);
                for (a, v) in credits.iter().flatten() {
                    if let (Some(list), Some(x)) = (values.get_mut(a), v) {
                        list.push(*x);
                    }
                }
            }
        }
        Design::Ofat => {
            let scores = design::score_matrix(&rollouts);
            let mut credits = design::counterfactual_credits(&agents, &planned, &scores);
            if config.ofat_tie_weight > 0.0 && attributer.uses_llm() {
                let (groups, slots) = tie_pairs(
                    &planned,
                    &credits,
                    queries,
                    &rollouts,
                    &|q| executor.query_text(q),
                    &|q, c, agent| derive_seed(seed, &[tag("tie"), q as u64, c as u64, tag(agent)]),
                );
                if !groups.is_empty() {
                    let out = attributer.attribute(&agents, &groups, &mut |_| true)?;
                    report.groups = groups.len();
                    report.failures = out.failures;
                    apply_ties(&mut credits, &slots, &out, config.ofat_tie_weight);
                }
            }
            // The reference's own rollouts (all 0) would only dilute the
            // swaps' means: each agent's credits are those of its swaps.
            for (a, m) in &credits {
                if let Some(list) = values.get_mut(a) {
                    list.extend(m.iter().skip(1).flatten().flatten());
                }
            }
        }
    }
    report.stats = values
        .into_iter()
        .map(|(a, v)| (a, CreditStats::from_values(&v)))
        .collect();
    Ok(report)
}

/// The round records of a run directory (`rounds.jsonl`), in order.
pub fn read_rounds(run_dir: &Path) -> Result<Vec<RoundRecord>, OptimizeError> {
    let path = run_dir.join("rounds.jsonl");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| OptimizeError::Format {
                path: format!("{} line {}", path.display(), i + 1),
                message: e.to_string(),
            })
        })
        .collect()
}

/// Agents sorted by mean credit, weakest first (ties by name); agents
/// without any credit last.
pub fn rank_agents(stats: &BTreeMap<String, CreditStats>) -> Vec<(String, CreditStats)> {
    let mut v: Vec<(String, CreditStats)> = stats.iter().map(|(a, s)| (a.clone(), *s)).collect();
    v.sort_by(|x, y| {
        (x.1.n == 0)
            .cmp(&(y.1.n == 0))
            .then(x.1.mean.total_cmp(&y.1.mean))
    });
    v
}
