//! Command-line interface: parses arguments into typed plans and dispatches to
//! the library. The only module (with `report`) that prints to stdout.

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
pub enum Command {}

/// Entry point used by `main.rs`; returns the process exit code.
pub fn main() -> i32 {
    let _ = Cli::parse();
    0
}
