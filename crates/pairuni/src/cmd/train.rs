//! `pairuni sft`, `pairuni train` and `pairuni bench step`: thin wrappers over `pairuni_rl`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use pairuni_rl::grpo::{read_pairs, GrpoTrainer};
use pairuni_rl::RunOptions;
use serde_json::{json, Value};

use crate::config::PairuniConfig;

/// Arguments of `pairuni sft` and `pairuni train`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML configuration ([model], [sft], [train] sections; absent keys take their documented defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run folder; overrides `sft.out_dir` / `train.out_dir`. An existing run folder is resumed.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimiser steps; overrides `sft.steps` / `train.steps`.
    #[arg(long)]
    steps: Option<usize>,
    /// Seed; overrides the top-level `seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
    /// Device: cpu, cuda or cuda:N (default: the config's `[model] device`, cpu).
    #[arg(long)]
    device: Option<String>,
    /// Weight dtype (f32, bf16, f16) (default: the config's `[model] dtype`, bf16 on CUDA and f32 on CPU).
    /// Trained bf16/f16 weights keep f32 master copies (`optim.master_weights`).
    #[arg(long)]
    dtype: Option<String>,
    /// Evaluate on the held-out benchmarks of `--eval-bench` before the first step, every N steps and after the
    /// last; overrides `sft.eval_every` / `train.eval_every` (0: never).
    #[arg(long, value_name = "N")]
    eval_every: Option<usize>,
    /// Benchmark folder of those evaluations (as `pairuni eval --bench` takes); overrides `sft.eval_bench` /
    /// `train.eval_bench`. The `[eval]` section is the recipe.
    #[arg(long, value_name = "DIR")]
    eval_bench: Option<PathBuf>,
}

fn load(args: &Args) -> anyhow::Result<PairuniConfig> {
    let mut cfg = match &args.config {
        Some(p) => PairuniConfig::load(p)?,
        None => PairuniConfig::default(),
    };
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    Ok(cfg)
}

/// Runs `pairuni sft`: supervised warm-up of the toy model (or of `sft.init`).
pub fn run_sft(args: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = load(&args)?;
    if let Some(out) = &args.out {
        cfg.sft.out_dir = out.clone();
    }
    if let Some(n) = args.steps {
        cfg.sft.steps = n;
    }
    if let Some(n) = args.eval_every {
        cfg.sft.eval_every = n;
    }
    if let Some(dir) = &args.eval_bench {
        cfg.sft.eval_bench = Some(dir.clone());
    }
    let evaluator = crate::held_out::for_sft(&cfg)?;
    let placement = cfg
        .model
        .resolve(args.device.as_deref(), args.dtype.as_deref())?;
    let model = pairuni_rl::sft::initial_model_in(
        &cfg.sft,
        cfg.seed,
        &placement,
        cfg.model.toy_codebook_size,
    )
    .context("building the model")?;
    let opts = RunOptions {
        progress: !args.quiet,
        config_toml: Some(cfg.to_toml_string()?),
        stop_after: None,
        evaluator,
    };
    let summary = pairuni_rl::sft(&cfg.sft, cfg.seed, model, &opts)
        .with_context(|| format!("SFT run in {}", cfg.sft.out_dir.display()))?;
    println!(
        "{}",
        json!({
            "run": cfg.sft.out_dir,
            "resumed_from": summary.resumed_from,
            "steps": summary.steps,
            "final": summary.final_dir,
            "loss_last": summary.metrics.last().and_then(|m| m.get("loss")).cloned().unwrap_or(Value::Null),
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `pairuni train`: PairGRPO (and its baselines, by config) from `train.init`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = load(&args)?;
    if let Some(out) = &args.out {
        cfg.train.out_dir = out.clone();
    }
    if let Some(n) = args.steps {
        cfg.train.steps = n;
    }
    if let Some(n) = args.eval_every {
        cfg.train.eval_every = n;
    }
    if let Some(dir) = &args.eval_bench {
        cfg.train.eval_bench = Some(dir.clone());
    }
    let evaluator = crate::held_out::for_train(&cfg)?;
    let placement = cfg
        .model
        .resolve(args.device.as_deref(), args.dtype.as_deref())?;
    let model = placement
        .load(&cfg.train.init)
        .with_context(|| format!("loading `train.init` = {}", cfg.train.init.display()))?;
    let opts = RunOptions {
        progress: !args.quiet,
        config_toml: Some(cfg.to_toml_string()?),
        stop_after: None,
        evaluator,
    };
    let summary = pairuni_rl::train(&cfg.train, cfg.seed, model, &opts)
        .with_context(|| format!("PairGRPO run in {}", cfg.train.out_dir.display()))?;
    let k = summary.metrics.len().min(10);
    let tail = &summary.metrics[summary.metrics.len() - k..];
    println!(
        "{}",
        json!({
            "run": cfg.train.out_dir,
            "resumed_from": summary.resumed_from,
            "steps": summary.steps,
            "final": summary.final_dir,
            "reward_und_last10": pairuni_rl::grpo::metric_mean(tail, "reward/und"),
            "reward_gen_last10": pairuni_rl::grpo::metric_mean(tail, "reward/gen"),
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `pairuni bench step`.
#[derive(clap::Args, Debug)]
pub struct BenchStepArgs {
    /// TOML configuration; `[train]` gives the step's shape and `train.init` the model.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model folder; overrides `train.init`.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Measured steps after one warm-up step.
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Device: cpu, cuda or cuda:N (default: the config's `[model] device`, cpu).
    #[arg(long)]
    device: Option<String>,
    /// Weight dtype (f32, bf16, f16) (default: the config's `[model] dtype`, bf16 on CUDA and f32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
}

/// Runs `pairuni bench step`: PairGRPO steps with their time breakdown and tokens/s, as JSON.
pub fn run_bench_step(args: BenchStepArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = match &args.config {
        Some(p) => PairuniConfig::load(p)?,
        None => PairuniConfig::default(),
    };
    if let Some(init) = &args.init {
        cfg.train.init = init.clone();
    }
    let placement = cfg
        .model
        .resolve(args.device.as_deref(), args.dtype.as_deref())?;
    let model = placement
        .load(&cfg.train.init)
        .with_context(|| format!("loading `train.init` = {}", cfg.train.init.display()))?;
    let pairs = read_pairs(&cfg.train.pairs)?;
    let dir = cfg
        .train
        .pairs
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let prompt_sharing = model.prompt_sharing();
    let fused_training = model.fused_training();
    let passes_in_flight =
        pairuni_rl::passes::concurrent_passes(cfg.train.concurrent_passes, model.device()).count;
    let mut trainer = GrpoTrainer::new(cfg.train.clone(), cfg.seed, model, pairs, dir)?;
    trainer.step()?; // warm-up: caches, allocator
    let mut rows = Vec::new();
    let t = Instant::now();
    for _ in 0..args.steps.max(1) {
        rows.push(trainer.step()?.metrics);
    }
    let wall = t.elapsed().as_secs_f64() / rows.len() as f64;
    let avg = |k: &str| pairuni_rl::grpo::metric_mean(&rows, k).unwrap_or(0.0);
    let tokens = avg("tokens/text") + avg("tokens/image");
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "device": format!("{:?}", placement.device.location()),
            "dtype": format!("{:?}", placement.dtype).to_lowercase(),
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "batch_pairs": cfg.train.batch_pairs,
            "group_size_und": cfg.train.group_size_und,
            "group_size_gen": cfg.train.group_size_gen,
            "updates_per_batch": cfg.train.updates_per_batch,
            "micro_batch": cfg.train.micro_batch,
            "concurrent_passes": passes_in_flight,
            "prompt_sharing": prompt_sharing,
            "fused_training": fused_training,
            "measured_steps": rows.len(),
            "step_s": wall,
            "rollout_s": avg("time/rollout"),
            "reward_s": avg("time/reward"),
            "train_s": avg("time/train"),
            "text_tokens_per_step": avg("tokens/text"),
            "image_tokens_per_step": avg("tokens/image"),
            "rollout_tokens_per_s": tokens / avg("time/rollout").max(1e-9),
            "train_tokens_per_s": tokens * cfg.train.updates_per_batch.max(1) as f64 / avg("time/train").max(1e-9),
            "step_tokens_per_s": tokens / wall.max(1e-9),
        }))?
    );
    Ok(ExitCode::SUCCESS)
}
