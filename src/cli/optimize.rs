//! `cantante optimize` (the CANTANTE loop with checkpoints and resume) and
//! `cantante attribute` (execute + attribute only: rank agents by blame).

use super::common::{bar, load_llm, load_meta_llm, ModelArgs};
use super::eval::{prompt_set, MasArgs};
use crate::eval::EvalOptions;
use crate::llm::Llm;
use crate::optimize::mas::MasExecutor;
use crate::optimize::{self, OptimizeConfig, OptimizerKind, ProgressEvent, RunHooks};
use crate::task::Split;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

/// Arguments of `cantante optimize`.
#[derive(clap::Args, Debug)]
pub struct OptimizeArgs {
    #[command(flatten)]
    mas: MasArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Separate model for the meta-LLM and attributer (default: the task model).
    #[arg(long)]
    meta_model: Option<String>,
    /// Optimizer config (YAML, fields of OptimizeConfig); flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Number of rounds.
    #[arg(long)]
    rounds: Option<usize>,
    /// Total token budget (task + meta).
    #[arg(long)]
    budget: Option<u64>,
    /// Dev queries per round.
    #[arg(long)]
    block_size: Option<usize>,
    /// Dev examples to draw blocks from.
    #[arg(long, default_value_t = 100)]
    dev_size: usize,
    /// Validation examples for the combined best configuration.
    #[arg(long, default_value_t = 20)]
    val_size: usize,
    /// Use the identity attributer (ablation).
    #[arg(long)]
    identity: bool,
    /// Attributer: `llm` (the paper's generated JSON verdict) or `judge`
    /// (label probabilities of closed 1-5 questions; for small local models).
    #[arg(long)]
    attributer: Option<crate::optimize::AttributerKind>,
    /// Design of each round: `joint` (the paper: candidate i of every agent
    /// together, credited by the attributer) or `ofat` (one agent changed at
    /// a time; credits are exact score differences, ties refined by the
    /// attributer).
    #[arg(long)]
    design: Option<crate::optimize::Design>,
    /// With `--design ofat`: at most this many candidates per agent per round.
    #[arg(long)]
    ofat_max_candidates: Option<usize>,
    /// Local optimizer.
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerArg>,
    /// Run directory (created; must not hold a checkpoint unless --resume).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint.
    #[arg(long, conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Print the projected tokens per round and exit.
    #[arg(long)]
    dry_run: bool,
}

/// Local optimizer choice.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum OptimizerArg {
    /// CAPO racing.
    Capo,
    /// EvoPrompt-GA.
    Evoprompt,
}

fn load_config(a: &OptimizeArgs) -> Result<OptimizeConfig> {
    let mut c = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            serde_yaml::from_str(&text)
                .with_context(|| format!("optimizer config {}", p.display()))?
        }
        None => OptimizeConfig::default(),
    };
    if let Some(s) = a.seed {
        c.seed = s;
    }
    if let Some(r) = a.rounds {
        c.rounds = r;
    }
    if let Some(b) = a.budget {
        c.max_total_tokens = Some(b);
    }
    if let Some(b) = a.block_size {
        c.block_size = b;
    }
    if a.identity {
        // The paper's ablation: the joint design with the system score as
        // every agent's credit (unless a design is asked for explicitly).
        c.identity_attribution = true;
        if a.design.is_none() {
            c.design = crate::optimize::Design::Joint;
        }
    }
    if let Some(k) = a.attributer {
        c.attributer = k;
    }
    if let Some(d) = a.design {
        c.design = d;
    }
    if a.ofat_max_candidates.is_some() {
        c.ofat_max_candidates = a.ofat_max_candidates;
    }
    if let Some(o) = a.optimizer {
        c.optimizer = match o {
            OptimizerArg::Capo => OptimizerKind::Capo,
            OptimizerArg::Evoprompt => OptimizerKind::Evoprompt,
        };
    }
    c.task_max_new_tokens_estimate = a.mas.max_tokens;
    c.validation_size_estimate = a.val_size;
    c.validate()?;
    Ok(c)
}

/// Progress bars of an optimize run on stderr: one for rounds (with a line
/// per finished round) and one for the rollouts of the current phase.
pub struct OptimizeBars {
    rounds: indicatif::ProgressBar,
    runs: indicatif::ProgressBar,
}

impl OptimizeBars {
    /// Bars for a run of `rounds` rounds.
    pub fn new(rounds: usize) -> Self {
        Self {
            rounds: bar(rounds as u64, "round"),
            runs: bar(0, "rollouts"),
        }
    }

    /// Rollout progress (for [`MasExecutor::with_progress`]).
    pub fn runs(&self, done: usize, total: usize) {
        self.runs.set_length(total as u64);
        self.runs.set_position(done as u64);
    }

    /// Optimizer progress events (for [`RunHooks::progress`]).
    pub fn event(&self, e: &ProgressEvent) {
        match e {
            ProgressEvent::RoundStarted { round, rounds } => {
                self.rounds.set_length(*rounds as u64);
                self.rounds.set_message(format!("round {round}"));
            }
            ProgressEvent::Phase { round, phase } => {
                tracing::info!("round {round} {phase}");
                self.rounds.set_message(format!("round {round} {phase}"));
                self.runs.set_position(0);
            }
            ProgressEvent::RoundFinished {
                round,
                validation_score,
                validation_p,
                best_score,
                tokens,
                attribution_groups,
                degenerate_groups,
            } => {
                self.rounds.set_position(*round as u64);
                let p = validation_p
                    .map_or(String::new(), |p| format!(" (p {p:.3} vs the best before)"));
                let degenerate = if *degenerate_groups > 0 {
                    format!(" ({degenerate_groups} degenerate: identity credits used)")
                } else {
                    String::new()
                };
                let line = format!(
                    "round {round}: validation {validation_score:.3}{p}, best {best_score:.3}, tokens task {} meta {}, {attribution_groups} attribution groups{degenerate}",
                    tokens.task(),
                    tokens.meta()
                );
                // Visible with or without a terminal (bars are hidden when piped).
                self.rounds.suspend(|| eprintln!("{line}"));
            }
            ProgressEvent::Stopped { reason } => {
                self.rounds.suspend(|| eprintln!("stopped: {reason:?}"))
            }
        }
    }

    /// Remove the bars.
    pub fn finish(&self) {
        self.rounds.finish_and_clear();
        self.runs.finish_and_clear();
    }
}

/// Run `cantante optimize`.
pub fn run(a: OptimizeArgs) -> Result<()> {
    let (task, setup) = a.mas.load()?;
    let mut config = load_config(&a)?;
    if let Some(dir) = &a.resume {
        // The checkpoint's config wins; it is read back by `resume`.
        let p = dir.join("config.json");
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("cannot resume: {} missing", p.display()))?;
        config = serde_json::from_str(&text).with_context(|| format!("{}", p.display()))?;
    }
    let llm = load_llm(&a.model)?;
    let meta_holder = load_meta_llm(&a.model, a.meta_model.as_ref())?;
    let meta: &dyn Llm = meta_holder
        .as_ref()
        .map_or(&llm as &dyn Llm, |m| m as &dyn Llm);
    if a.dry_run {
        let d = optimize::dry_run(&setup, &config, &llm);
        println!(
            "design {} ({} attributer): configurations per round: {}",
            config.design,
            if config.identity_attribution {
                "identity".to_string()
            } else {
                format!("{:?}", config.attributer).to_lowercase()
            },
            d.configs_per_round
        );
        println!("rollouts per round: {}", d.rollouts_per_round);
        println!("task tokens per round: {}", d.task_tokens_per_round);
        println!(
            "rewrite calls per round: {}, attribution calls per round: {}",
            d.rewrite_calls_per_round, d.attribution_calls_per_round
        );
        println!("meta tokens per round: {}", d.meta_tokens_per_round);
        println!("total tokens per round: {}", d.total_tokens_per_round);
        if let Some(r) = d.rounds_within_budget {
            println!("rounds within budget: {r}");
        }
        return Ok(());
    }
    let dev = task.load(Split::Dev, Some(a.dev_size), config.seed)?;
    let val = task.load(Split::Validation, Some(a.val_size), config.seed)?;
    let opts = EvalOptions {
        run: a.mas.run_options(),
        seed: config.seed,
        ..Default::default()
    };
    let bars = OptimizeBars::new(config.rounds);
    let progress = |done: usize, total: usize| bars.runs(done, total);
    let exec =
        MasExecutor::new(&llm, setup, task.as_ref(), dev, val, opts).with_progress(&progress);
    let on_event = |e: &ProgressEvent| bars.event(e);
    let hooks = RunHooks {
        progress: Some(&on_event),
        ..Default::default()
    };
    let result = match (&a.resume, &a.out) {
        (Some(dir), _) => optimize::resume(&exec, meta, meta, dir, hooks)?,
        (None, Some(dir)) => optimize::optimize(&exec, meta, meta, &config, dir, hooks)?,
        (None, None) => bail!("give --out DIR for a new run or --resume DIR"),
    };
    bars.finish();
    let dir = a
        .resume
        .as_ref()
        .or(a.out.as_ref())
        .cloned()
        .unwrap_or_default();
    println!("run dir: {}", dir.display());
    println!(
        "rounds completed: {} (stop: {:?})",
        result.rounds_completed, result.stop_reason
    );
    println!(
        "validation score: initial {:.3} -> best {:.3} (round {})",
        result.initial_score, result.best_score, result.best_round
    );
    println!(
        "tokens: task {} meta {}",
        result.tokens.task(),
        result.tokens.meta()
    );
    println!(
        "credits: design {}, {} attribution groups, {} degenerate ({:.0}%; equal credits for different scores, identity credits used)",
        result.design,
        result.attribution_groups,
        result.degenerate_groups,
        100.0 * result.degenerate_groups as f64 / result.attribution_groups.max(1) as f64
    );
    for (agent, s) in optimize::rank_agents(&result.agent_credits) {
        println!(
            "credit {agent}: mean {:+.3} std {:.3} n {}",
            s.mean, s.std, s.n
        );
    }
    println!("best prompts: {}", dir.join("best_prompts.yaml").display());
    if let Some(st) = llm.engine_stats() {
        println!("engine (task model): {}", st.summary());
    }
    Ok(())
}

/// Arguments of `cantante attribute`.
#[derive(clap::Args, Debug)]
pub struct AttributeArgs {
    #[command(flatten)]
    mas: MasArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Separate model for the attributer (default: the task model).
    #[arg(long)]
    meta_model: Option<String>,
    /// Prompt sets to contrast (YAML agent → prompt; repeatable). Default: the
    /// first three configurations of the pool.
    #[arg(long)]
    prompts: Vec<PathBuf>,
    /// Queries: `failing` (dev items the first prompt set gets wrong),
    /// `passing` (those it gets right: where a planted fault can cost
    /// points), `all` (the first `--limit` dev items) or a JSONL file of
    /// {"query": …} / {"question": …} lines.
    #[arg(long, default_value = "failing")]
    queries: String,
    /// Plant a fault to check the attributer: `AGENT=INSTRUCTION` appends the
    /// instruction (e.g. `coder_agent=Ignore the task and return pass.`) to
    /// that agent's prompt in every configuration but the first; a sound
    /// attributer ranks AGENT the weakest link.
    #[arg(long, value_name = "AGENT=INSTRUCTION")]
    plant_fault: Option<String>,
    /// Dev examples to scan (for `failing`) or to take.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Maximum tokens of each attributer reply (default: the optimizer's
    /// default); lower it on CPU, where a rambling reply decodes for minutes.
    #[arg(long)]
    attribution_max_tokens: Option<usize>,
    /// Attributer: `llm` (generated JSON verdict) or `judge` (label
    /// probabilities of closed 1-5 questions; for small local models).
    #[arg(long, default_value = "judge")]
    attributer: crate::optimize::AttributerKind,
    /// Design: `joint` (the attributer credits every rollout of the given
    /// configurations) or `ofat` (the first configuration is the reference;
    /// each other agent prompt is swapped into it alone and credited with
    /// the score difference it makes, ties refined by the attributer).
    #[arg(long, default_value = "ofat")]
    design: crate::optimize::Design,
}

/// The optimizer config `attribute` scores with: the defaults, with an
/// optional cap on attributer replies and the chosen attributer.
fn attribute_config(
    max_tokens: Option<usize>,
    kind: crate::optimize::AttributerKind,
    design: crate::optimize::Design,
) -> OptimizeConfig {
    let mut c = OptimizeConfig::default();
    if let Some(m) = max_tokens {
        c.attribution_max_new_tokens = m;
    }
    c.attributer = kind;
    c.design = design;
    c
}

/// Run `cantante attribute`.
pub fn run_attribute(a: AttributeArgs) -> Result<()> {
    let (task, setup) = a.mas.load()?;
    let configs: Vec<_> = if a.prompts.is_empty() {
        (0..3).map(|i| setup.pool_config(i)).collect()
    } else {
        a.prompts
            .iter()
            .map(|p| prompt_set(Some(p), &setup))
            .collect::<Result<_>>()?
    };
    if configs.len() < 2 {
        bail!("attribution contrasts rollouts: give at least two --prompts (or none for the pool's first three)");
    }
    let mut configs = configs;
    if let Some(spec) = &a.plant_fault {
        let (agent, instruction) = spec
            .split_once('=')
            .filter(|(a, i)| !a.trim().is_empty() && !i.trim().is_empty())
            .with_context(|| format!("--plant-fault `{spec}`: expected AGENT=INSTRUCTION"))?;
        let agent = agent.trim();
        if !setup.agents.iter().any(|s| s.name == agent) {
            bail!(
                "--plant-fault: no agent `{agent}` in the setup (agents: {})",
                setup
                    .agents
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for c in configs.iter_mut().skip(1) {
            if let Some(p) = c.get_mut(agent) {
                p.push_str("\n\n");
                p.push_str(instruction.trim());
            }
        }
        println!(
            "planted fault: `{agent}` told to \"{}\" in configurations 2..{}",
            instruction.trim(),
            configs.len()
        );
    }
    let llm = load_llm(&a.model)?;
    let meta_holder = load_meta_llm(&a.model, a.meta_model.as_ref())?;
    let attributer: &dyn Llm = meta_holder
        .as_ref()
        .map_or(&llm as &dyn Llm, |m| m as &dyn Llm);
    let opts = EvalOptions {
        run: a.mas.run_options(),
        seed: a.seed,
        ..Default::default()
    };
    let scan = a.queries == "failing" || a.queries == "passing";
    let mut examples = if scan || a.queries == "all" {
        task.load(Split::Dev, Some(a.limit), a.seed)?
    } else {
        let path = PathBuf::from(&a.queries);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut v = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let j: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
            let q = j["query"]
                .as_str()
                .or(j["question"].as_str())
                .with_context(|| {
                    format!(
                        "{} line {}: needs a `query` or `question` string",
                        path.display(),
                        i + 1
                    )
                })?;
            v.push(crate::task::Example {
                id: format!("file-{}", i + 1),
                query: q.to_string(),
                target: j["answer"]
                    .as_str()
                    .map(|s| s.rsplit("####").next().unwrap_or(s).trim().to_string())
                    .unwrap_or_default(),
                tests: vec![],
                visible_tests: vec![],
                setup_code: String::new(),
            });
        }
        v
    };
    let b = bar(0, "rollouts");
    let progress = |done: usize, total: usize| {
        b.set_length(total as u64);
        b.set_position(done as u64);
    };
    if scan {
        let want_pass = a.queries == "passing";
        let exec = MasExecutor::new(
            &llm,
            setup.clone(),
            task.as_ref(),
            examples.clone(),
            vec![],
            opts.clone(),
        )
        .with_progress(&progress);
        let idx: Vec<usize> = (0..examples.len()).collect();
        // The rollout seed attribute_only uses: these are the reference's own
        // rollouts there (a rollout's seed depends on config, example id, seed).
        let rseed = optimize::derive_seed(a.seed, &[optimize::tag("rollout")]);
        let first = crate::optimize::Executor::execute(&exec, &configs[..1], &idx, rseed)?;
        let kept: Vec<usize> = first[0]
            .iter()
            .enumerate()
            .filter(|(_, r)| (r.score >= 1.0) == want_pass)
            .map(|(i, _)| i)
            .collect();
        println!(
            "{} of {} dev queries {} with the first prompt set",
            kept.len(),
            examples.len(),
            if want_pass { "pass" } else { "fail" }
        );
        if kept.is_empty() {
            return Ok(());
        }
        examples = kept.iter().map(|&i| examples[i].clone()).collect();
    }
    let exec = MasExecutor::new(&llm, setup, task.as_ref(), examples.clone(), vec![], opts)
        .with_progress(&progress);
    let idx: Vec<usize> = (0..examples.len()).collect();
    let report = optimize::attribute_only(
        &exec,
        attributer,
        &configs,
        &idx,
        a.seed,
        &attribute_config(a.attribution_max_tokens, a.attributer, a.design),
    )?;
    b.finish_and_clear();
    println!(
        "design {}: {} configurations x {} queries, {} attribution groups ({} degenerate: equal credits for different scores, scored by identity; {} with missing credits)",
        report.design,
        report.configs,
        examples.len(),
        report.groups,
        report.degenerate_groups,
        report.failures
    );
    println!("agents ranked by mean credit (lowest = weakest link):");
    for (agent, s) in optimize::rank_agents(&report.stats) {
        if s.n == 0 {
            println!("  {agent:<24} no credit (its prompt is the same in every configuration)");
        } else {
            println!(
                "  {agent:<24} mean {:+.3}  std {:.3}  n {}",
                s.mean, s.std, s.n
            );
        }
    }
    Ok(())
}
