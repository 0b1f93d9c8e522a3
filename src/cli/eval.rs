//! `cantante eval`: score a prompt set of a MAS setup on a benchmark split.

use super::common::{load_llm, ModelArgs};
use crate::eval::{self, EvalOptions};
use crate::graph::runtime::{RunOptions, Schedule};
use crate::graph::setup::Validation;
use crate::graph::{PromptSet, Setup};
use crate::llm::Sampling;
use crate::task::{load_task, Split};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options shared by commands that run the MAS (eval, optimize, attribute).
#[derive(clap::Args, Debug, Clone)]
pub struct MasArgs {
    /// MAS setup file (YAML, reference shape), e.g. configs/gsm8k.yaml.
    #[arg(long)]
    pub setup: PathBuf,
    /// Task (gsm8k | mbpp); default: the setup file's name.
    #[arg(long)]
    pub task: Option<String>,
    /// Data directory (default: $CANTANTE_DATA, else datasets/).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Maximum new tokens per agent turn.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Token cap on each state field filled into a prompt.
    #[arg(long, default_value_t = 256)]
    pub field_cap: usize,
    /// Agent sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// System prompt of every agent call.
    #[arg(long, default_value = "You are a helpful assistant.")]
    pub system: String,
    /// Follow-up turns asking an agent for the output tags its reply lacks
    /// (0 = off, as in the reference implementation).
    #[arg(long, default_value_t = 1)]
    pub format_repairs: usize,
    /// How runs share the engine: `continuous` (each run's next request joins
    /// the running batch at once) or `super-step` (all runs in lock-step, the
    /// reference's order). Both give the same traces.
    #[arg(long, default_value = "continuous")]
    pub schedule: Schedule,
    /// Threads executing tool calls (e.g. the MBPP sandbox) while the engine
    /// decodes; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    pub tool_workers: usize,
    /// Enforce each agent's output tags while decoding (true | false): no
    /// end of reply before the tags are closed, tags forced when the token
    /// budget runs out. `false` is the reference behaviour.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub tag_guard: bool,
    /// Declare each agent's tools in its system message, in the Hermes/Qwen
    /// format, and run bare JSON calls of them (true | false). `false` shows
    /// tools only where the prompts do (the reference behaviour).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub declare_tools: bool,
}

impl MasArgs {
    /// Runtime options from the arguments.
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            system_prompt: self.system.clone(),
            max_new_tokens: self.max_tokens,
            field_token_cap: self.field_cap,
            sampling: Sampling::temperature(self.temperature),
            format_repairs: self.format_repairs,
            schedule: self.schedule,
            tool_workers: self.tool_workers,
            tag_guard: self.tag_guard,
            declare_tools: self.declare_tools,
            ..RunOptions::default()
        }
    }

    /// Task name: explicit, else the setup file stem.
    pub fn task_name(&self) -> String {
        self.task.clone().unwrap_or_else(|| {
            self.setup
                .file_stem()
                .map(|s| s.to_string_lossy().to_lowercase())
                .unwrap_or_default()
        })
    }

    /// Load the task and the setup, validated against the task's variables and tools.
    pub fn load(&self) -> Result<(Box<dyn crate::task::Task>, Setup)> {
        let name = self.task_name();
        let task = load_task(&name, self.data_dir.as_deref())
            .with_context(|| format!("task `{name}` (choose with --task gsm8k|mbpp)"))?;
        let rules = Validation::new(&task.provided_vars(), &task.tool_names());
        let setup = Setup::load_validated(&self.setup, &rules)?;
        Ok((task, setup))
    }
}

/// Arguments of `cantante eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    mas: MasArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt set (YAML agent → prompt, e.g. a run's best_prompts.yaml);
    /// default: the first prompt of each agent's pool.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Split to evaluate.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    split: Split,
    /// Number of examples (seeded sample).
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Seed (sample and rollouts).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory for traces.jsonl and summary.json.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Load `--prompts` or the pool's first configuration.
pub fn prompt_set(path: Option<&Path>, setup: &Setup) -> Result<PromptSet> {
    match path {
        Some(p) => Ok(eval::load_prompt_set(p, setup)?),
        None => Ok(setup.pool_config(0)),
    }
}

/// Evaluate one prompt set on `examples` with a progress bar on stderr;
/// returns the scored runs and their summary (wall time filled in).
pub fn evaluate_config(
    llm: &dyn crate::llm::Llm,
    setup: &Setup,
    task: &dyn crate::task::Task,
    config: &PromptSet,
    examples: &[crate::task::Example],
    opts: &EvalOptions,
    label: &str,
) -> Result<(Vec<eval::ScoredRun>, eval::EvalSummary)> {
    let bar = super::common::bar(examples.len() as u64, label);
    let t0 = Instant::now();
    let before = llm.engine_stats();
    let cb = |n: usize| bar.set_position(n as u64);
    let mut runs = eval::execute(
        llm,
        setup,
        task,
        std::slice::from_ref(config),
        examples,
        opts,
        Some(&cb),
    )?;
    bar.finish_and_clear();
    let runs = runs.remove(0);
    let mut summary = eval::summarize(&runs);
    summary.wall_secs = t0.elapsed().as_secs_f64();
    summary.engine = llm
        .engine_stats()
        .map(|now| before.map_or(now.clone(), |b| now.since(&b)));
    Ok((runs, summary))
}

/// Run the command.
pub fn run(a: EvalArgs) -> Result<()> {
    let (task, setup) = a.mas.load()?;
    let config = prompt_set(a.prompts.as_deref(), &setup)?;
    let examples = task.load(a.split, Some(a.limit), a.seed)?;
    let llm = load_llm(&a.model)?;
    let opts = EvalOptions {
        run: a.mas.run_options(),
        seed: a.seed,
        ..Default::default()
    };
    let (runs, summary) = evaluate_config(
        &llm,
        &setup,
        task.as_ref(),
        &config,
        &examples,
        &opts,
        "runs",
    )?;
    println!(
        "task {} split {} n {} seed {} model {}",
        task.name(),
        a.split,
        summary.n,
        a.seed,
        llm_id(&llm)
    );
    println!(
        "accuracy: {:.3} ({} / {})",
        summary.accuracy,
        runs.iter().filter(|r| r.score >= 1.0).count(),
        summary.n
    );
    println!(
        "tokens per query: {:.0} input, {:.0} output",
        summary.mean_input_tokens, summary.mean_output_tokens
    );
    for (agent, rate) in &summary.format_failure_rate {
        let repaired = summary
            .format_repair_rate
            .get(agent)
            .copied()
            .unwrap_or(0.0);
        let cut = summary.truncation_rate.get(agent).copied().unwrap_or(0.0);
        let t = summary.tags.get(agent).copied().unwrap_or_default();
        println!(
            "format failures {agent}: {:.1}% (repaired by a follow-up turn: {:.1}%; replies cut off at --max-tokens: {:.1}%); output tags: {} written by the model, {} forced by the tag guard{}, {} missing",
            100.0 * rate,
            100.0 * repaired,
            100.0 * cut,
            t.written,
            t.forced,
            match t.from_fence {
                0 => String::new(),
                n => format!(" ({n} of them taken from a code fence)"),
            },
            t.missing
        );
    }
    let worst_cut = summary
        .truncation_rate
        .iter()
        .max_by(|x, y| x.1.total_cmp(y.1));
    if let Some((agent, &cut)) = worst_cut.filter(|(_, &r)| r >= 0.25) {
        println!(
            "note: {:.0}% of {agent}'s replies hit --max-tokens {}; raise it if their answers are incomplete",
            100.0 * cut,
            a.mas.max_tokens
        );
    }
    if summary.run_errors > 0 {
        println!("runs ended abnormally: {}", summary.run_errors);
    }
    println!("wall time: {:.1}s", summary.wall_secs);
    if let Some(st) = &summary.engine {
        println!("engine: {}", st.summary());
    }
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let j = serde_json::json!({
            "task": task.name(), "split": a.split, "seed": a.seed, "setup": a.mas.setup,
            "model": llm_id(&llm), "config_id": eval::config_id(&config), "prompts": config, "summary": summary,
        });
        let sp = out.join("summary.json");
        std::fs::write(&sp, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("cannot write {}", sp.display()))?;
        eval::write_traces(
            &out.join("traces.jsonl"),
            runs,
            &examples,
            std::slice::from_ref(&config),
        )?;
        println!(
            "wrote {} and {}",
            sp.display(),
            out.join("traces.jsonl").display()
        );
    }
    Ok(())
}

fn llm_id(l: &dyn crate::llm::Llm) -> String {
    l.model_id()
}
