//! Command-line interface: parses arguments into typed plans and dispatches to
//! the library. The only module (with `report`) that prints to stdout.

pub mod sandbox;

use clap::{Parser, Subcommand};

/// cantante: optimize the prompts of a multi-agent LLM pipeline, offline.
#[derive(Parser, Debug)]
#[command(name = "cantante", version, about)]
pub struct Cli {
    /// Subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a Python file (and optional tests) in the code sandbox and print the verdict.
    Sandbox(sandbox::SandboxArgs),
}

/// Entry point used by `main.rs`; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Sandbox(a) => sandbox::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
