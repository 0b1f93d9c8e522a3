//! `cantante data fetch|check|sample`: get and verify the benchmark data, and
//! print the exact items a seed draws (what `eval`, `optimize` and
//! `bench-run` use), e.g. for baselines run outside cantante.

use crate::task::fetch::{check_all, fetch_all, Fetched, MIRROR_ENV};
use crate::task::{load_task, resolve_data_dir, Split};
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
    /// Print the items of a seeded sample as JSON lines (id, query, target,
    /// tests, visible_tests, setup_code): the same items `bench-run --seeds S`
    /// draws for that split and size.
    Sample {
        /// Task: gsm8k or mbpp.
        #[arg(long)]
        task: String,
        /// Split.
        #[arg(long, value_enum, default_value = "test")]
        split: Split,
        /// Items (the protocol's test_size / dev_size / val_size).
        #[arg(long)]
        n: usize,
        /// Seed (bench-run: the run seed).
        #[arg(long)]
        seed: u64,
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
        DataAction::Sample {
            task,
            split,
            n,
            seed,
            data_dir,
        } => {
            let t = load_task(&task, data_dir.as_deref())?;
            for e in t.load(split, Some(n), seed)? {
                println!("{}", serde_json::to_string(&e)?);
            }
        }
    }
    Ok(())
}
