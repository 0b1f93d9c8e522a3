//! Command-line interface: parses arguments into typed plans and dispatches to
//! the library. The only module (with `report`) that prints to stdout.

use clap::{Parser, Subcommand};

pub mod bench_run;
pub mod common;
pub mod data;
pub mod eval;
pub mod generate;
pub mod optimize;
pub mod report;
pub mod sandbox;
pub mod serve;

/// cantante: optimize the prompts of a multi-agent LLM pipeline, offline.
#[derive(Parser, Debug)]
#[command(name = "cantante", version, about)]
pub struct Cli {
    /// Log level filter (e.g. info, debug, cantante=trace); also RUST_LOG.
    #[arg(long, global = true, default_value = "warn")]
    pub log: String,
    /// Subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate completions with the local engine.
    Generate(generate::GenerateArgs),
    /// Score a prompt set of a MAS setup on a benchmark split.
    Eval(eval::EvalArgs),
    /// Optimize the prompts of a MAS with CANTANTE (checkpointed, resumable).
    Optimize(optimize::OptimizeArgs),
    /// Execute + attribute only: rank agents by credit on (failing) queries.
    Attribute(optimize::AttributeArgs),
    /// Reproducible benchmark run: initial eval, CANTANTE and the identity
    /// ablation per seed, test evals, and a results table (resumable).
    BenchRun(bench_run::BenchRunArgs),
    /// Run a Python file (and optional tests) in the code sandbox and print the verdict.
    Sandbox(sandbox::SandboxArgs),
    /// Write a Markdown report with plots for an optimization run dir.
    Report(report::ReportArgs),
    /// Serve the local engine over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Fetch or check the benchmark data (GSM8K, MBPP).
    Data(data::DataArgs),
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Entry point used by `main.rs`; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_tracing(&cli.log);
    let result = match cli.command {
        Command::Generate(a) => generate::run(a).map(|_| 0),
        Command::Sandbox(a) => sandbox::run(&a),
        Command::Eval(a) => eval::run(a).map(|_| 0),
        Command::Optimize(a) => optimize::run(a).map(|_| 0),
        Command::Attribute(a) => optimize::run_attribute(a).map(|_| 0),
        Command::BenchRun(a) => bench_run::run(a).map(|_| 0),
        Command::Report(a) => report::run(a).map(|_| 0),
        Command::Serve(a) => serve::run(a).map(|_| 0),
        Command::Data(a) => data::run(a).map(|_| 0),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            1
        }
    }
}

/// Render an error and its causes on one line.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}
