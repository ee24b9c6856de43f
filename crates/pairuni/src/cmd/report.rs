//! `pairuni report RUN_DIR`

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `pairuni report`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A demo folder or a single run folder (with metrics.jsonl, eval/, pairs/ where present).
    run_dir: PathBuf,
}

/// Runs `pairuni report`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let summary = crate::report::write_report(&args.run_dir)?;
    println!(
        "wrote {} ({} charts, {} images)",
        summary.html.display(),
        summary.charts,
        summary.images
    );
    Ok(ExitCode::SUCCESS)
}
