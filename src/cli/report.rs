//! `cantante report DIR`: write a Markdown report with SVG charts for an
//! optimization run directory (see [`crate::report`]).

use anyhow::Result;
use std::path::PathBuf;

/// Arguments of `cantante report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Run directory written by `cantante optimize`.
    pub dir: PathBuf,
    /// Output directory for report.md and the SVG charts (default: the run directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Write the report and print the paths written.
pub fn run(a: ReportArgs) -> Result<()> {
    // The error already names the file concerned.
    let paths = crate::report::write_report(&a.dir, a.out.as_deref())?;
    for p in paths.all() {
        println!("{}", p.display());
    }
    Ok(())
}
