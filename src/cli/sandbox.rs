//! `cantante sandbox`: run a Python file (and optionally a file of test
//! assertions) in the task sandbox and print the verdict — a way to check by
//! hand what the MBPP metric and code tools do (reference spec §2.3, §3.2).

use crate::task::sandbox::{run_python, run_tests, shorten, SandboxLimits};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `cantante sandbox`.
#[derive(Args, Debug)]
pub struct SandboxArgs {
    /// Python file to run.
    #[arg(long)]
    pub code: PathBuf,
    /// File of test statements, one per line (e.g. MBPP `assert` lines); each runs after the code.
    #[arg(long)]
    pub tests: Option<PathBuf>,
    /// Setup code file run between the code and each test.
    #[arg(long)]
    pub setup: Option<PathBuf>,
    /// Wall-clock timeout in seconds (the CPU-time limit is one second above
    /// it, so a busy loop is reported as a timeout, not a CPU-limit kill).
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

/// Run the command; returns the process exit code (0 = program ran fine / all tests passed).
pub fn run(args: &SandboxArgs) -> anyhow::Result<i32> {
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        anyhow::bail!("--timeout must be a positive number of seconds");
    }
    let code = std::fs::read_to_string(&args.code)
        .with_context(|| format!("cannot read --code {}", args.code.display()))?;
    let limits = SandboxLimits {
        wall: Duration::from_secs_f64(args.timeout),
        // One second of slack: with equal limits a single-threaded busy loop hits
        // both at once and the reported status depended on which fired first.
        cpu_secs: args.timeout.ceil() as u64 + 1,
        ..Default::default()
    };
    if let Some(tp) = &args.tests {
        let text = std::fs::read_to_string(tp)
            .with_context(|| format!("cannot read --tests {}", tp.display()))?;
        let tests: Vec<String> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map(String::from)
            .collect();
        if tests.is_empty() {
            anyhow::bail!("--tests {} holds no test lines", tp.display());
        }
        let setup = match &args.setup {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --setup {}", p.display()))?,
            None => String::new(),
        };
        let report = run_tests(&code, &setup, &tests, &limits);
        println!("{}", report.summary());
        match report.isolation {
            Some(i) => println!("isolation: {i}"),
            None => println!("isolation: (no run started)"),
        }
        return Ok(if report.all_passed() { 0 } else { 1 });
    }
    let o = run_python(&code, &limits)?;
    println!("status: {}", o.status);
    println!("wall: {:.3}s", o.wall.as_secs_f64());
    println!("isolation: {}", o.isolation);
    if !o.stdout.is_empty() {
        println!("--- stdout ---\n{}", shorten(o.stdout.trim_end(), 4000));
    }
    if !o.stderr.is_empty() {
        println!("--- stderr ---\n{}", shorten(o.stderr.trim_end(), 4000));
    }
    if o.truncated {
        println!("(output truncated)");
    }
    Ok(if o.status.success() { 0 } else { 1 })
}
