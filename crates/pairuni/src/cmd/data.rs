//! `pairuni data …`: checks of pool and PairUG files.

use std::path::PathBuf;
use std::process::ExitCode;

use pairuni_data::{validate_file, Format, ValidateOptions, ValidationReport};

/// Arguments of `pairuni data`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DataCommand {
    /// Check JSONL files: every malformed line, missing/unknown/mistyped/empty field, duplicate id and
    /// missing or undecodable image, each as FILE:LINE: field PATH: message, then counts per file.
    /// Exits with status 1 if any problem was found.
    Check(CheckArgs),
}

/// Arguments of `pairuni data check`.
#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// JSONL files: understanding pools, generation pools or PairUG pair files.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// The files' format; `auto` guesses it per file from the keys of the first record.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    format: FormatArg,
    /// Do not check that referenced images exist and decode (faster on large pools).
    #[arg(long)]
    no_images: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FormatArg {
    /// Guess from the first record's keys.
    Auto,
    /// Understanding pool: id, image_path, question, answer, options?, tag.
    Understanding,
    /// Generation pool: id, prompt, image_path, tag.
    Generation,
    /// PairUG: similarity, generate_ann{…}, understand_ann{…}.
    Pairs,
}

impl FormatArg {
    fn format(self) -> Option<Format> {
        match self {
            FormatArg::Auto => None,
            FormatArg::Understanding => Some(Format::Understanding),
            FormatArg::Generation => Some(Format::Generation),
            FormatArg::Pairs => Some(Format::Pairs),
        }
    }
}

/// Runs `pairuni data`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        DataCommand::Check(check) => run_check(check),
    }
}

fn run_check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let options = ValidateOptions {
        format: args.format.format(),
        check_images: !args.no_images,
    };
    let mut records = 0;
    let mut problems = 0;
    for file in &args.files {
        tracing::debug!(file = %file.display(), "checking");
        let report = validate_file(file, &options);
        for problem in &report.problems {
            println!("{problem}");
        }
        println!("{}", summary(&report, options.check_images));
        records += report.records;
        problems += report.problems.len();
    }
    if args.files.len() > 1 {
        println!(
            "total: {} files, {records} records, {problems} problems",
            args.files.len()
        );
    }
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One line per file: `FILE: FORMAT, N records, M ok, K problems (kind n, …), I images checked`.
fn summary(report: &ValidationReport, check_images: bool) -> String {
    let format = report.format.map_or("unknown format", Format::name);
    let mut line = format!(
        "{}: {format}, {} records, {} ok, {} problems",
        report.path.display(),
        report.records,
        report.ok,
        report.problems.len()
    );
    if !report.counts.is_empty() {
        let counts: Vec<String> = report
            .counts
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        line.push_str(&format!(" ({})", counts.join(", ")));
    }
    if check_images {
        line.push_str(&format!(", {} images checked", report.images_checked));
    }
    line
}
