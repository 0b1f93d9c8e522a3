//! `cantante bench-run`: the reproducible benchmark run behind the paper's
//! main table (reference spec §3.3, §8, §9). Per task and seed: evaluate the
//! initial configuration on the held-out test sample, run CANTANTE, run the
//! identity-attribution ablation at the same token budget, evaluate both
//! results' best prompts on the same test sample, and rebuild
//! `DIR/results.md` + `DIR/results.json` after every finished part.
//!
//! Every part leaves a result file and is skipped when it is present; an
//! interrupted optimize run is continued with [`optimize::resume_with_config`]
//! (which also refuses a checkpoint written under different settings).

use super::common::{load_llm, load_meta_llm, ModelArgs};
use super::eval::{evaluate_config, prompt_set, MasArgs};
use super::optimize::OptimizeBars;
use crate::benchrun::{
    self, is_finished, load_finished_summary, load_seed, load_test, load_timing, seed_dir, Machine,
    Method, Protocol, ResultsTable, TestRecord, Timing,
};
use crate::eval::{self, EvalOptions};
use crate::graph::{PromptSet, Setup};
use crate::llm::Llm;
use crate::optimize::checkpoint::{write_atomic, ValidationPoint, CHECKPOINT};
use crate::optimize::mas::MasExecutor;
use crate::optimize::{self, OptimizeConfig, OptimizeResult, ProgressEvent, RunHooks};
use crate::task::{Example, Split, Task};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `cantante bench-run`.
#[derive(clap::Args, Debug)]
pub struct BenchRunArgs {
    /// Tasks, comma-separated: gsm8k, mbpp.
    #[arg(long, value_delimiter = ',', required = true)]
    pub task: Vec<String>,
    /// Protocol: `cpu-small`, `paper`, or a protocol YAML file
    /// (see configs/protocols/).
    #[arg(long, default_value = "cpu-small")]
    pub protocol: String,
    /// Seeds, comma-separated (each seed draws its own dev/val/test samples).
    #[arg(long, value_delimiter = ',', default_value = "7,42,47")]
    pub seeds: Vec<u64>,
    /// Model options (task model; also the meta and attribution model unless
    /// --meta-model is given).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Separate model for the attributer and the prompt rewriter (GGUF file,
    /// HuggingFace folder or hub id; same engine options as --model).
    #[arg(long)]
    pub meta_model: Option<String>,
    /// Output directory (re-running with the same directory resumes).
    #[arg(long)]
    pub out: PathBuf,
    /// Data directory (default: $CANTANTE_DATA, else datasets/).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory holding the MAS setup files `<task>.yaml`.
    #[arg(long, default_value = "configs")]
    pub setups: PathBuf,
    /// Only rebuild results.md and results.json from the finished parts.
    #[arg(long)]
    pub table_only: bool,
    /// How runs share the engine (continuous | super-step); never changes results.
    #[arg(long, default_value = "continuous")]
    pub schedule: crate::graph::Schedule,
    /// Threads executing tool calls while the engine decodes (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub tool_workers: usize,
}

/// What one (task, seed) needs: the loaded task, setup and options.
struct SeedCtx<'a> {
    llm: &'a dyn Llm,
    /// Attributer and prompt rewriter (the task model unless --meta-model).
    meta: &'a dyn Llm,
    task: &'a dyn Task,
    setup: &'a Setup,
    protocol: &'a Protocol,
    opts: EvalOptions,
    machine: Machine,
    dir: PathBuf,
    seed: u64,
}

impl SeedCtx<'_> {
    fn label(&self, what: &str) -> String {
        format!("{} seed {} {what}", self.task.name(), self.seed)
    }
}

/// Run the command.
pub fn run(a: BenchRunArgs) -> Result<()> {
    let (pname, protocol) = Protocol::resolve(&a.protocol)?;
    if a.seeds.is_empty() {
        bail!("--seeds: give at least one seed");
    }
    let mut tasks: Vec<String> = Vec::new();
    for t in &a.task {
        let t = t.trim().to_ascii_lowercase();
        if !t.is_empty() && !tasks.contains(&t) {
            tasks.push(t);
        }
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    check_protocol(&a.out, &pname, &protocol)?;
    if a.table_only {
        return finish_table(&a.out, &pname, &tasks, &a.seeds);
    }
    let device = if a.model.cuda { "cuda" } else { "cpu" };
    let mut llm: Option<Box<dyn crate::llm::Llm>> = None;
    let mut meta_llm: Option<Box<dyn crate::llm::Llm>> = None;
    for task_name in &tasks {
        let mas = MasArgs {
            setup: a.setups.join(format!("{task_name}.yaml")),
            task: Some(task_name.clone()),
            data_dir: a.data_dir.clone(),
            max_tokens: protocol.max_new_tokens(task_name),
            field_cap: protocol.field_cap(task_name),
            temperature: protocol.temperature,
            system: protocol.system.clone(),
            format_repairs: protocol.format_repairs,
            schedule: a.schedule,
            tool_workers: a.tool_workers,
            tag_guard: protocol.tag_guard,
            declare_tools: protocol.declare_tools,
        };
        let (task, setup) = mas.load()?;
        check_setup(&a.out.join(task_name), &mas.setup, &setup)?;
        for &seed in &a.seeds {
            let dir = seed_dir(&a.out, task_name, seed);
            if !seed_pending(&dir) {
                println!("skipped {task_name} seed {seed}: every part is finished");
                continue;
            }
            if llm.is_none() {
                llm = Some(load_llm(&a.model)?);
                meta_llm = load_meta_llm(&a.model, a.meta_model.as_ref())?;
            }
            let Some(l) = llm.as_ref() else {
                bail!("model not loaded");
            };
            let meta: &dyn Llm = meta_llm.as_ref().map_or(l as &dyn Llm, |m| m as &dyn Llm);
            let model_id = match &meta_llm {
                Some(m) => format!(
                    "{} (attributer and rewriter: {})",
                    l.model_id(),
                    m.model_id()
                ),
                None => l.model_id(),
            };
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let ctx = SeedCtx {
                llm: l,
                meta,
                task: task.as_ref(),
                setup: &setup,
                protocol: &protocol,
                opts: EvalOptions {
                    run: mas.run_options(),
                    seed,
                    ..Default::default()
                },
                machine: Machine::detect(&model_id, device),
                dir,
                seed,
            };
            let refresh = || finish_table(&a.out, &pname, &tasks, &a.seeds);
            run_seed(&ctx, &refresh)?;
        }
    }
    finish_table(&a.out, &pname, &tasks, &a.seeds)
}

/// Read a JSON file, naming it in errors.
fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
}

/// Refuse to mix MAS setups in one task directory (`DIR/<task>/setup.json`):
/// finished parts are skipped on a re-run, so results of an edited setup
/// (other prompts, agents or edges) would otherwise be silently mixed with the
/// old ones. The fingerprint covers the parsed setup, not comments or layout.
fn check_setup(task_dir: &Path, file: &Path, setup: &crate::graph::Setup) -> Result<()> {
    let fingerprint = format!(
        "{:016x}",
        crate::eval::fnv64(&[&serde_json::to_vec(setup)?])
    );
    let path = task_dir.join("setup.json");
    if path.is_file() {
        let j = read_json(&path)?;
        if j["fingerprint"].as_str() != Some(fingerprint.as_str()) {
            bail!(
                "{} was produced with another version of the setup (recorded in {}: {}); {} differs (prompts, agents or edges changed). Use a new --out, or restore that setup",
                task_dir.display(),
                path.display(),
                j["setup_file"].as_str().unwrap_or("?"),
                file.display()
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(task_dir)
        .with_context(|| format!("cannot create {}", task_dir.display()))?;
    let j =
        serde_json::json!({ "setup_file": file.display().to_string(), "fingerprint": fingerprint });
    write_atomic(&path, serde_json::to_string_pretty(&j)?.as_bytes())?;
    Ok(())
}

/// Refuse to mix protocols in one output directory (`DIR/protocol.json`).
fn check_protocol(out: &Path, name: &str, protocol: &Protocol) -> Result<()> {
    let path = out.join("protocol.json");
    if path.is_file() {
        let j = read_json(&path)?;
        let old: Protocol = serde_json::from_value(j["protocol"].clone())
            .with_context(|| format!("{}: field `protocol`", path.display()))?;
        if &old != protocol {
            bail!(
                "{} was started with protocol `{}` ({}); use the same protocol or a new --out",
                out.display(),
                j["name"].as_str().unwrap_or("?"),
                path.display()
            );
        }
        return Ok(());
    }
    let j = serde_json::json!({ "name": name, "protocol": protocol });
    write_atomic(&path, serde_json::to_string_pretty(&j)?.as_bytes())?;
    Ok(())
}

/// Whether any part of a seed directory is missing (the three test records
/// are written last, so they mark a finished seed).
fn seed_pending(dir: &Path) -> bool {
    Method::ALL
        .iter()
        .any(|m| !matches!(load_test(&dir.join(m.test_file())), Ok(Some(_))))
}

fn run_seed(ctx: &SeedCtx, refresh: &dyn Fn() -> Result<()>) -> Result<()> {
    let test = ctx
        .task
        .load(Split::Test, Some(ctx.protocol.test_size), ctx.seed)?;
    // (a) the initial configuration: the first prompt of each agent's pool.
    let initial = prompt_set(None, ctx.setup)?;
    test_part(ctx, Method::Initial, &initial, &test, refresh)?;
    // (b) CANTANTE, (c) identity attribution at the CANTANTE run's token spend,
    // (d) both results' best prompts on the same test sample.
    let cfg = ctx.protocol.optimizer_config(ctx.task.name(), ctx.seed);
    let cantante = optimize_part(ctx, Method::Cantante, &cfg, None, refresh)?;
    test_part(
        ctx,
        Method::Cantante,
        &cantante.best_prompts,
        &test,
        refresh,
    )?;
    let icfg = ctx
        .protocol
        .identity_config(ctx.task.name(), ctx.seed, cantante.tokens.total());
    // Same seed, executor and validation set: the initial validation is shared.
    let prior = cantante.validations.first().map(|p| (cfg.seed, p));
    let identity = optimize_part(ctx, Method::Identity, &icfg, prior, refresh)?;
    test_part(
        ctx,
        Method::Identity,
        &identity.best_prompts,
        &test,
        refresh,
    )?;
    Ok(())
}

/// When another method's finished test record on this seed evaluated the same
/// prompt set on the same number of items, copy it (and its traces) as this
/// method's record: rollouts depend only on seed, prompts and query, so
/// evaluating again would reproduce it. Returns the method copied from.
fn reuse_test(
    ctx: &SeedCtx,
    method: Method,
    config: &PromptSet,
    n: usize,
) -> Result<Option<Method>> {
    let id = eval::config_id(config);
    for other in Method::ALL.into_iter().filter(|m| *m != method) {
        let Ok(Some(rec)) = load_test(&ctx.dir.join(other.test_file())) else {
            continue;
        };
        if rec.config_id != id || rec.seed != ctx.seed || rec.summary.n != n {
            continue;
        }
        for file in [Method::traces_file, Method::scores_file] {
            let (from, to) = (ctx.dir.join(file(&other)), ctx.dir.join(file(&method)));
            if from.is_file() {
                std::fs::copy(&from, &to)
                    .with_context(|| format!("cannot copy {}", from.display()))?;
            }
        }
        let copy = TestRecord {
            method,
            // A copy of this method's own evaluation is that evaluation.
            reused_from: Some(rec.reused_from.unwrap_or(other)).filter(|m| *m != method),
            ..rec
        };
        write_atomic(
            &ctx.dir.join(method.test_file()),
            serde_json::to_string_pretty(&copy)?.as_bytes(),
        )?;
        return Ok(Some(other));
    }
    Ok(None)
}

fn test_part(
    ctx: &SeedCtx,
    method: Method,
    config: &PromptSet,
    test: &[Example],
    refresh: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let path = ctx.dir.join(method.test_file());
    match load_test(&path) {
        Ok(Some(_)) => {
            println!(
                "skipped {}: {} exists",
                ctx.label(&format!("{} test", method.as_str())),
                path.display()
            );
            return Ok(());
        }
        Ok(None) => {}
        Err(e) => eprintln!("warning: {e}; evaluating again"),
    }
    let label = ctx.label(&format!("{} test", method.as_str()));
    if let Some(from) = reuse_test(ctx, method, config, test.len())? {
        println!(
            "{label}: same prompts as {}, its evaluation reused",
            from.as_str()
        );
        return refresh();
    }
    let (runs, summary) = evaluate_config(
        ctx.llm, ctx.setup, ctx.task, config, test, &ctx.opts, &label,
    )?;
    println!(
        "{label}: accuracy {:.3} on {} items, {:.0} tokens per query, {:.1}s",
        summary.accuracy,
        summary.n,
        summary.mean_input_tokens + summary.mean_output_tokens,
        summary.wall_secs
    );
    if let Some(st) = &summary.engine {
        println!("{label} engine: {}", st.summary());
    }
    eval::write_traces(
        &ctx.dir.join(method.traces_file()),
        runs,
        test,
        std::slice::from_ref(config),
    )?;
    benchrun::write_item_scores(&ctx.dir, method)?;
    let rec = TestRecord {
        method,
        task: ctx.task.name().to_string(),
        seed: ctx.seed,
        config_id: eval::config_id(config),
        prompts: config.clone(),
        summary,
        machine: ctx.machine.clone(),
        reused_from: None,
    };
    // Written last: its presence marks the part as finished.
    write_atomic(&path, serde_json::to_string_pretty(&rec)?.as_bytes())?;
    refresh()
}

fn optimize_part(
    ctx: &SeedCtx,
    method: Method,
    cfg: &OptimizeConfig,
    prior_initial_validation: Option<(u64, &ValidationPoint)>,
    refresh: &dyn Fn() -> Result<()>,
) -> Result<OptimizeResult> {
    let run_dir = ctx.dir.join(method.as_str());
    let label = ctx.label(method.as_str());
    if let Some(s) = load_finished_summary(&run_dir)? {
        println!(
            "skipped {label}: {} is complete",
            run_dir.join("summary.json").display()
        );
        return Ok(s);
    }
    let dev = ctx
        .task
        .load(Split::Dev, Some(ctx.protocol.dev_size), ctx.seed)?;
    let val = ctx
        .task
        .load(Split::Validation, Some(ctx.protocol.val_size), ctx.seed)?;
    let bars = OptimizeBars::new(cfg.rounds);
    let progress = |done: usize, total: usize| bars.runs(done, total);
    let exec = MasExecutor::new(
        ctx.llm,
        ctx.setup.clone(),
        ctx.task,
        dev,
        val,
        ctx.opts.clone(),
    )
    .with_progress(&progress);
    let base = match load_timing(&run_dir) {
        Ok(t) => t.map(|t| t.wall_secs).unwrap_or(0.0),
        Err(e) => {
            eprintln!("warning: {e}; wall time restarts at 0");
            0.0
        }
    };
    let t0 = Instant::now();
    let timing_path = run_dir.join("timing.json");
    let write_timing = || -> Result<()> {
        let t = Timing {
            wall_secs: base + t0.elapsed().as_secs_f64(),
            machine: ctx.machine.clone(),
        };
        write_atomic(&timing_path, serde_json::to_string_pretty(&t)?.as_bytes())?;
        Ok(())
    };
    let on_event = |e: &ProgressEvent| {
        bars.event(e);
        if matches!(e, ProgressEvent::RoundFinished { .. }) {
            if let Err(err) = write_timing() {
                tracing::warn!("cannot write {}: {err:#}", timing_path.display());
            }
        }
    };
    let hooks = RunHooks {
        progress: Some(&on_event),
        stop_after_rounds: None,
        prior_initial_validation,
    };
    let result = if run_dir.join(CHECKPOINT).is_file() {
        println!("resuming {label} from {}", run_dir.display());
        optimize::resume_with_config(&exec, ctx.meta, ctx.meta, &run_dir, cfg, hooks)
    } else {
        println!("starting {label} in {}", run_dir.display());
        optimize::optimize(&exec, ctx.meta, ctx.meta, cfg, &run_dir, hooks)
    };
    bars.finish();
    let result = result.with_context(|| format!("{label} ({})", run_dir.display()))?;
    write_timing()?;
    if let Some(st) = ctx.llm.engine_stats() {
        println!("{label} engine (since load): {}", st.summary());
    }
    println!(
        "{label}: {} rounds ({:?}), validation {:.3} -> {:.3}, tokens task {} meta {}",
        result.rounds_completed,
        result.stop_reason,
        result.initial_score,
        result.best_score,
        result.tokens.task(),
        result.tokens.meta()
    );
    refresh()?;
    if !is_finished(&result) {
        bail!(
            "{label} stopped ({:?}); run bench-run again to continue it",
            result.stop_reason
        );
    }
    Ok(result)
}

/// Tasks and seeds to tabulate: the requested ones plus any `DIR/<task>/seed<S>`
/// already present.
fn tabulated(out: &Path, tasks: &[String], seeds: &[u64]) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = Vec::new();
    let mut push = |t: &str, s: u64| {
        if !v.iter().any(|(a, b)| a == t && *b == s) {
            v.push((t.to_string(), s));
        }
    };
    for t in tasks {
        for &s in seeds {
            push(t, s);
        }
    }
    let Ok(entries) = std::fs::read_dir(out) else {
        return v;
    };
    let mut found: Vec<(String, u64)> = Vec::new();
    for e in entries.flatten() {
        let t = e.file_name().to_string_lossy().into_owned();
        let Ok(sub) = std::fs::read_dir(e.path()) else {
            continue;
        };
        for s in sub.flatten() {
            let name = s.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("seed")
                .and_then(|n| n.parse::<u64>().ok())
            {
                found.push((t.clone(), n));
            }
        }
    }
    found.sort();
    for (t, s) in found {
        push(&t, s);
    }
    v
}

/// Build the table from the finished parts and write results.md / results.json.
fn finish_table(out: &Path, protocol: &str, tasks: &[String], seeds: &[u64]) -> Result<()> {
    let mut parts = Vec::new();
    for (t, s) in tabulated(out, tasks, seeds) {
        // Runs from before `<method>_test_scores.json` existed get theirs.
        let dir = seed_dir(out, &t, s);
        for m in Method::ALL {
            if dir.join(m.test_file()).is_file() && !dir.join(m.scores_file()).is_file() {
                if let Err(e) = benchrun::write_item_scores(&dir, m) {
                    eprintln!("warning: {e}");
                }
            }
        }
        let (p, errors) = load_seed(out, &t, s);
        for e in errors {
            eprintln!("warning: {e}; left out of the table");
        }
        parts.push(p);
    }
    let mut table: ResultsTable = benchrun::build_table(protocol, &parts);
    let recorded = out.join("protocol.json");
    if recorded.is_file() {
        let j = read_json(&recorded)?;
        table.settings = Some(
            serde_json::from_value(j["protocol"].clone())
                .with_context(|| format!("{}: field `protocol`", recorded.display()))?,
        );
    }
    let md = out.join("results.md");
    write_atomic(&md, benchrun::render_markdown(&table).as_bytes())?;
    let js = out.join("results.json");
    write_atomic(&js, serde_json::to_string_pretty(&table)?.as_bytes())?;
    println!("wrote {} and {}", md.display(), js.display());
    Ok(())
}
