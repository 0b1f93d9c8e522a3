//! `cantante data fetch|check`: get and verify the benchmark data.

use crate::task::fetch::{check_all, fetch_all, Fetched, MIRROR_ENV};
use crate::task::resolve_data_dir;
use anyhow::Result;
use std::path::PathBuf;

/// Arguments of `cantante data`.
#[derive(clap::Args, Debug)]
pub struct DataArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: DataAction,
}

/// `data` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum DataAction {
    /// Download GSM8K and MBPP from their pinned upstream commits (or a
    /// mirror), verify their SHA-256 sums and write them to the data dir.
    Fetch {
        /// Data directory (default: $CANTANTE_DATA, else datasets/).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Base URL of a mirror holding gsm8k/… and mbpp/… (default: $CANTANTE_DATA_MIRROR, else upstream).
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Verify the data files in the data dir.
    Check {
        /// Data directory (default: $CANTANTE_DATA, else datasets/).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// Run the command.
pub fn run(a: DataArgs) -> Result<()> {
    match a.action {
        DataAction::Fetch { data_dir, mirror } => {
            let dir = resolve_data_dir(data_dir.as_deref());
            let mirror =
                mirror.or_else(|| std::env::var(MIRROR_ENV).ok().filter(|m| !m.is_empty()));
            for f in fetch_all(&dir, mirror.as_deref())? {
                match f {
                    Fetched::Cached(p) => println!("ok (already verified): {}", p.display()),
                    Fetched::Downloaded(p, url) => {
                        println!("fetched and verified: {} <- {url}", p.display())
                    }
                }
            }
            println!("data ready in {}", dir.display());
        }
        DataAction::Check { data_dir } => {
            let dir = resolve_data_dir(data_dir.as_deref());
            check_all(&dir)?;
            println!("all data files verified in {}", dir.display());
        }
    }
    Ok(())
}
