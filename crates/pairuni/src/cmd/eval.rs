//! `pairuni eval …`: run a model over benchmark folders, or score predictions made elsewhere.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use pairuni_eval::config::EvalConfig;
use pairuni_eval::mcq::{read_mcq, score_mcq, ChoiceRule};
use pairuni_eval::mme::{read_mme, score_mme};
use pairuni_eval::pope::{read_pope, score_pope, YesNoRule};
use pairuni_eval::predictions::read_predictions;
use pairuni_model::config::ModelConfig;
use pairuni_runner::{evaluate_named, Progress};

/// Arguments of `pairuni eval`: either a model run (`--model --bench`) or the `score` subcommand.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<EvalCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand, Debug)]
enum EvalCommand {
    /// Score a predictions JSONL (`{"question_id", "output"}` per line, raw model output) against a benchmark's
    /// gold file without running a model; GenEval takes an images folder instead. Prints the metrics as JSON.
    Score(ScoreArgs),
}

/// Arguments of a model run.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Model checkpoint folder (config.json, model.safetensors, tokenizer.json, …).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Benchmark folder (mcq/, pope/, mme/, geneval/ — directly or under bench/).
    #[arg(long)]
    bench: Option<PathBuf>,
    /// Output folder for predictions, images, metrics.json and results.md.
    #[arg(long, default_value = "eval-out")]
    out: PathBuf,
    /// TOML configuration; its `[eval]` section is the recipe (seed, CFG weight, temperatures, limits…).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the recipe's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Device: cpu, cuda or cuda:N (default: the config's `[model] device`, cpu).
    #[arg(long)]
    device: Option<String>,
    /// Weight dtype (f32, bf16, f16) (default: the config's `[model] dtype`, bf16 on CUDA and f32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BenchKind {
    /// MME (yes/no, lmms-eval parsing, acc + acc+).
    Mme,
    /// POPE (one --gold/--predictions pair per split).
    Pope,
    /// Multiple choice, MMStar's rule by default.
    Mcq,
    /// Multiple choice with MMMU's rule (seeded random fallback).
    Mmmu,
    /// GenEval: --gold is evaluation_metadata.jsonl, --images the generated images.
    Geneval,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum RuleArg {
    /// POPE's official yes/no extraction (POPE default).
    PopeExtract,
    /// Exact "yes"/"no" match (lmms-eval's POPE task).
    ExactMatch,
    /// MMStar's letter rule (MCQ default).
    Mmstar,
    /// MMMU's parsing order with seeded random fallback (MMMU default).
    Mmmu,
}

/// Arguments of `pairuni eval score`.
#[derive(clap::Args, Debug)]
struct ScoreArgs {
    /// Which benchmark's reader and scorer to use.
    #[arg(long, value_enum)]
    bench: BenchKind,
    /// Gold file(s); POPE takes one per split, paired in order with --predictions.
    #[arg(long, required = true, num_args = 1..)]
    gold: Vec<PathBuf>,
    /// Predictions JSONL file(s), one per gold file (not for GenEval).
    #[arg(long, num_args = 1..)]
    predictions: Vec<PathBuf>,
    /// GenEval only: images folder in GenEval's layout, <prompt-index:05>/samples/*.png per prompt (or a single
    /// <prompt-index:05>.png per prompt).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Parsing rule (default: the benchmark's own).
    #[arg(long, value_enum)]
    rule: Option<RuleArg>,
    /// Seed of MMMU's random fallback.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs `pairuni eval`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(EvalCommand::Score(s)) => score(s),
        None => run_model(args.run),
    }
}

/// An indicatif bar per stage of an evaluation (also used by the demo pipeline).
#[derive(Default)]
pub struct Bars {
    bar: Option<ProgressBar>,
}

impl Progress for Bars {
    fn stage(&mut self, name: &str, total: usize) {
        if let Some(previous) = self.bar.take() {
            previous.finish();
        }
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} {elapsed_precise}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(name.to_owned());
        self.bar = Some(bar);
    }
    fn advance(&mut self, n: usize) {
        if let Some(b) = &self.bar {
            b.inc(n as u64);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

/// The recipe (`[eval]`) and the model placement (`[model]`) of `--config`, or their defaults.
fn load_recipe(config: Option<&Path>) -> anyhow::Result<(EvalConfig, ModelConfig)> {
    match config {
        Some(path) => {
            let cfg = crate::config::PairuniConfig::load(path)?;
            Ok((cfg.eval, cfg.model))
        }
        None => Ok((EvalConfig::default(), ModelConfig::default())),
    }
}

fn run_model(a: RunArgs) -> anyhow::Result<ExitCode> {
    let (Some(model_dir), Some(bench)) = (a.model, a.bench) else {
        bail!("pairuni eval needs --model DIR and --bench DIR (or use `pairuni eval score`)");
    };
    let (mut recipe, model_cfg) = load_recipe(a.config.as_deref())?;
    if let Some(seed) = a.seed {
        recipe.seed = seed;
    }
    let model = model_cfg
        .resolve(a.device.as_deref(), a.dtype.as_deref())?
        .load(&model_dir)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    let mut bars = Bars::default();
    let report = evaluate_named(
        &model,
        &model_dir.display().to_string(),
        &bench,
        &a.out,
        &recipe,
        &mut bars,
    )?;
    print!("{}", pairuni_runner::report::markdown(&report));
    eprintln!("wrote {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}

fn score(s: ScoreArgs) -> anyhow::Result<ExitCode> {
    let pairs = |s: &ScoreArgs| -> anyhow::Result<()> {
        if s.predictions.len() != s.gold.len() {
            bail!(
                "{} gold file(s) but {} predictions file(s): give one --predictions per --gold",
                s.gold.len(),
                s.predictions.len()
            );
        }
        Ok(())
    };
    let json = match s.bench {
        BenchKind::Pope => {
            pairs(&s)?;
            let rule = match s.rule {
                None | Some(RuleArg::PopeExtract) => YesNoRule::PopeExtract,
                Some(RuleArg::ExactMatch) => YesNoRule::ExactMatch,
                Some(r) => {
                    bail!("rule {r:?} does not apply to POPE (use pope-extract or exact-match)")
                }
            };
            let mut splits = Vec::new();
            for (g, p) in s.gold.iter().zip(&s.predictions) {
                splits.push((read_pope(g)?, read_predictions(p)?));
            }
            serde_json::to_value(score_pope(&splits, rule)?)?
        }
        BenchKind::Mme => {
            pairs(&s)?;
            if s.gold.len() != 1 {
                bail!("MME takes one --gold file");
            }
            if s.rule.is_some() {
                bail!("MME has one rule (lmms-eval's); drop --rule");
            }
            serde_json::to_value(score_mme(
                &read_mme(&s.gold[0])?,
                &read_predictions(&s.predictions[0])?,
            )?)?
        }
        BenchKind::Mcq | BenchKind::Mmmu => {
            pairs(&s)?;
            if s.gold.len() != 1 {
                bail!("multiple choice takes one --gold file");
            }
            let default = if s.bench == BenchKind::Mmmu {
                ChoiceRule::Mmmu
            } else {
                ChoiceRule::MmStar
            };
            let rule = match s.rule {
                None => default,
                Some(RuleArg::Mmstar) => ChoiceRule::MmStar,
                Some(RuleArg::Mmmu) => ChoiceRule::Mmmu,
                Some(r) => {
                    bail!("rule {r:?} does not apply to multiple choice (use mmstar or mmmu)")
                }
            };
            let gold = read_mcq(&s.gold[0])?;
            let preds = read_predictions(&s.predictions[0])?;
            serde_json::to_value(score_mcq(&gold, &preds, rule, s.seed)?)?
        }
        BenchKind::Geneval => {
            let Some(images) = &s.images else {
                bail!("GenEval scoring needs --images DIR (<prompt-index:05>/samples/*.png per prompt)");
            };
            if s.gold.len() != 1 || !s.predictions.is_empty() {
                bail!("GenEval takes one --gold metadata file and --images, no --predictions");
            }
            let (scorer, scores) = pairuni_runner::geneval_run::score_folder(&s.gold[0], images)?;
            serde_json::json!({ "scorer": scorer, "scores": scores })
        }
    };
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(ExitCode::SUCCESS)
}
