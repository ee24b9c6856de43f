//! `pairuni demo`: the main job on the built-in toy world, from one command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::PairuniConfig;
use crate::pipeline::{self, Headline, Layout};
use pairuni_eval::paired::PairedChange;

/// Arguments of `pairuni demo`.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Runs the whole PairUni pipeline on the built-in toy world: generates the world (pools and \
held-out benchmarks), builds PairUG pairs with the oracle teacher, warms up a toy Janus model by SFT, trains it \
with PairGRPO, evaluates the SFT checkpoint and the final model on toy-MCQ, toy-POPE and toy-GenEval, and writes \
OUT/report.html. Rerun with the same --out to resume after an interruption."
)]
pub struct Args {
    /// Output folder (world/, pairs/, sft/, train/, eval/, report.html).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// The CI-sized run (configs/toy-quick.toml): a few minutes on 2 cores, too short to learn much.
    #[arg(long)]
    quick: bool,
    /// Seed of every random choice (world, pairs, model init, rollouts, evaluation). Overrides the config's.
    #[arg(long)]
    seed: Option<u64>,
    /// A configuration file instead of the built-in configs/toy.toml (or toy-quick.toml with --quick).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N (default: the config's `[model] device`, cpu).
    #[arg(long)]
    device: Option<String>,
    /// Weight dtype (f32, bf16, f16) (default: the config's `[model] dtype`, bf16 on CUDA and f32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
}

/// Loads `--config`, else the built-in toy config.
pub fn load_config(path: Option<&PathBuf>, quick: bool) -> anyhow::Result<PairuniConfig> {
    match path {
        Some(p) => PairuniConfig::load(p),
        None if quick => {
            PairuniConfig::from_toml_str(pipeline::TOY_QUICK_CONFIG, "configs/toy-quick.toml")
        }
        None => PairuniConfig::from_toml_str(pipeline::TOY_CONFIG, "configs/toy.toml"),
    }
}

fn row(name: &str, before: f64, after: f64) -> String {
    format!(
        "| {name:<22} | {before:>8.3} | {after:>8.3} | {:>+8.3} |",
        after - before
    )
}

/// The before/after table printed at the end of a run.
pub fn table(sft: &Headline, last: &Headline) -> String {
    [
        "| metric                 |      SFT | PairGRPO |        Δ |".to_string(),
        "|------------------------|----------|----------|----------|".to_string(),
        row("toy-MCQ accuracy (%)", sft.mcq_accuracy, last.mcq_accuracy),
        row("toy-POPE F1 (%)", sft.pope_f1, last.pope_f1),
        row(
            "toy-GenEval overall",
            sft.geneval_overall,
            last.geneval_overall,
        ),
    ]
    .join("\n")
}

/// One line on which toy-MCQ answers PairGRPO changed, with the sign test's p-value.
pub fn change_line(c: &PairedChange) -> String {
    format!(
        "toy-MCQ answers changed by PairGRPO: {} wrong → right, {} right → wrong (one-sided sign test p = {:.3})",
        c.improved,
        c.regressed,
        c.sign_test_p()
    )
}

/// Runs `pairuni demo`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = load_config(args.config.as_ref(), args.quick)?;
    if let Some(seed) = args.seed {
        cfg.seed = seed;
    }
    let layout = Layout {
        root: args.out.clone(),
    };
    pipeline::place(&mut cfg, &layout);
    let placement = cfg
        .model
        .resolve(args.device.as_deref(), args.dtype.as_deref())?;
    let summary = pipeline::run_all(&cfg, &layout, &placement, true)
        .with_context(|| format!("demo in {}", args.out.display()))?;
    println!("{}", table(&summary.sft, &summary.last));
    if let Some(c) = &summary.mcq_change {
        println!("{}", change_line(c));
    }
    println!("report: {}", args.out.join("report.html").display());
    Ok(ExitCode::SUCCESS)
}
