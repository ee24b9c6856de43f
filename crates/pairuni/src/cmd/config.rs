//! `pairuni config …`: inspecting configuration files.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::PairuniConfig;

/// Arguments of `pairuni config`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ConfigCommand {
    /// Print a configuration fully resolved, every default filled in, as TOML. Unknown keys are an error
    /// naming the key, its line and the file.
    Show {
        /// The TOML file; without it, the built-in defaults are printed.
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

/// Runs `pairuni config`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        ConfigCommand::Show { file } => {
            let config = match file {
                Some(path) => PairuniConfig::load(&path)?,
                None => PairuniConfig::default(),
            };
            print!("{}", config.to_toml_string()?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
