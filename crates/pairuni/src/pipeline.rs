//! The whole method on one output folder: toy world → pairs → SFT → PairGRPO → evaluation → report.
//!
//! Every stage is resumable on its own terms: the world and the pairs are skipped when their outputs are
//! complete (each writes its files atomically and the world leaves a `DONE` marker last), SFT and PairGRPO
//! resume from their latest checkpoint, and an evaluation is skipped when its `metrics.json` exists. Rerunning
//! with the same folder therefore continues where a killed run stopped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use pairuni_eval::paired::PairedChange;
use pairuni_model::config::Placement;
use pairuni_rl::RunOptions;

use crate::config::PairuniConfig;

/// The built-in configurations, embedded so that `pairuni demo` works from any folder.
pub const TOY_CONFIG: &str = include_str!("../../../configs/toy.toml");
/// `--quick`: the same pipeline scaled down to run in CI.
pub const TOY_QUICK_CONFIG: &str = include_str!("../../../configs/toy-quick.toml");

/// Where each stage of a pipeline folder lives.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The pipeline folder.
    pub root: PathBuf,
}

impl Layout {
    /// The toy world (pools and benchmarks).
    pub fn world(&self) -> PathBuf {
        self.root.join("world")
    }
    /// The PairUG file.
    pub fn pairs(&self) -> PathBuf {
        self.root.join("pairs/pairs.jsonl")
    }
    /// The SFT run folder.
    pub fn sft(&self) -> PathBuf {
        self.root.join("sft")
    }
    /// The PairGRPO run folder.
    pub fn train(&self) -> PathBuf {
        self.root.join("train")
    }
    /// The world's held-out benchmarks.
    pub fn bench(&self) -> PathBuf {
        self.world().join("bench")
    }
    /// The evaluation folder of one checkpoint label (`sft`, `final`).
    pub fn eval(&self, label: &str) -> PathBuf {
        self.root.join("eval").join(label)
    }
}

/// Points every path of `cfg` into `layout` and makes every stage's seed the run seed.
pub fn place(cfg: &mut PairuniConfig, layout: &Layout) {
    let world = layout.world();
    cfg.world.seed = cfg.seed;
    cfg.pairs.seed = cfg.seed;
    cfg.eval.seed = cfg.seed;
    cfg.sft.understanding = world.join("understanding.jsonl");
    cfg.sft.generation = world.join("generation.jsonl");
    cfg.sft.pairs = layout.pairs();
    cfg.sft.out_dir = layout.sft();
    cfg.train.pairs = layout.pairs();
    cfg.train.init = layout.sft().join("final");
    cfg.train.out_dir = layout.train();
    cfg.sft.eval_bench = Some(layout.bench());
    cfg.train.eval_bench = Some(layout.bench());
}

fn stage_bar(name: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(name.to_string());
    bar
}

/// Stage 1: the toy world, unless a complete one is already there.
pub fn world_stage(cfg: &PairuniConfig, layout: &Layout) -> Result<()> {
    let dir = layout.world();
    let marker = dir.join("DONE");
    if marker.is_file() {
        tracing::info!(dir = %dir.display(), "toy world already generated");
        return Ok(());
    }
    let bar = stage_bar("world");
    pairuni_toyworld::generate::generate_world(&cfg.world, &dir, &|p| {
        bar.set_length(p.total);
        bar.set_position(p.done);
    })
    .with_context(|| format!("generating the toy world in {}", dir.display()))?;
    bar.finish();
    pairuni_data::atomic::write_atomic_bytes(&marker, b"complete\n")?;
    Ok(())
}

/// Stage 2: PairUG pairs with the configured teacher and encoder, unless the file exists.
pub fn pairs_stage(cfg: &PairuniConfig, layout: &Layout) -> Result<()> {
    let out = layout.pairs();
    if out.is_file() {
        tracing::info!(file = %out.display(), "pairs already built");
        return Ok(());
    }
    std::fs::create_dir_all(out.parent().expect("pairs file has a folder"))?;
    let paths = pairuni_pairs::builder::BuildPaths {
        understanding: layout.world().join("understanding.jsonl"),
        generation: layout.world().join("generation.jsonl"),
        out,
    };
    let teacher = pairuni_pairs::setup::teacher_from_config(&cfg.pairs, &paths)?;
    let encoder = pairuni_pairs::setup::encoder_from_config(&cfg.pairs.encoder)?;
    let built = pairuni_pairs::builder::build_and_write(
        &cfg.pairs,
        teacher.as_ref(),
        encoder.as_ref(),
        &paths,
        true,
    )?;
    tracing::info!(pairs = built.pairs.len(), "pairs built");
    Ok(())
}

/// Stage 3: SFT warm-up (resumes from its latest checkpoint); returns the final model folder.
pub fn sft_stage(cfg: &PairuniConfig, placement: &Placement) -> Result<PathBuf> {
    let final_dir = cfg.sft.out_dir.join("final");
    if final_dir.join("config.json").is_file() {
        tracing::info!(dir = %final_dir.display(), "SFT already finished");
        return Ok(final_dir);
    }
    let model = pairuni_rl::sft::initial_model_in(
        &cfg.sft,
        cfg.seed,
        placement,
        cfg.model.toy_codebook_size,
    )?;
    let opts = RunOptions {
        progress: true,
        config_toml: Some(cfg.to_toml_string()?),
        stop_after: None,
        evaluator: crate::held_out::for_sft(cfg)?,
    };
    let summary = pairuni_rl::sft::sft(&cfg.sft, cfg.seed, model, &opts)?;
    summary
        .final_dir
        .context("SFT stopped before its last step")
}

/// Stage 4: PairGRPO from the SFT model (resumes from its latest checkpoint); returns the final model folder.
pub fn train_stage(cfg: &PairuniConfig, placement: &Placement) -> Result<PathBuf> {
    let final_dir = cfg.train.out_dir.join("final");
    if final_dir.join("config.json").is_file() {
        tracing::info!(dir = %final_dir.display(), "PairGRPO already finished");
        return Ok(final_dir);
    }
    let policy = placement
        .load(&cfg.train.init)
        .with_context(|| format!("loading the SFT model {}", cfg.train.init.display()))?;
    let opts = RunOptions {
        progress: true,
        config_toml: Some(cfg.to_toml_string()?),
        stop_after: None,
        evaluator: crate::held_out::for_train(cfg)?,
    };
    let summary = pairuni_rl::grpo::train(&cfg.train, cfg.seed, policy, &opts)?;
    summary
        .final_dir
        .context("PairGRPO stopped before its last step")
}

/// Stage 5: evaluates a model folder on the world's held-out benchmarks into `out` (skipped when done). When
/// `same_evaluation` holds a finished evaluation of the same weights with the same recipe and benchmarks (the
/// PairGRPO run's own, before its first step and after its last), it is copied instead of computed again.
pub fn eval_stage(
    cfg: &PairuniConfig,
    layout: &Layout,
    model_dir: &Path,
    out: &Path,
    placement: &Placement,
    same_evaluation: Option<&Path>,
) -> Result<serde_json::Value> {
    let metrics = out.join("metrics.json");
    if let Some(done) = same_evaluation.filter(|d| d.join("metrics.json").is_file()) {
        if !metrics.is_file() {
            copy_folder_atomically(done, out)?;
            tracing::info!(from = %done.display(), to = %out.display(), "evaluation taken from the PairGRPO run");
        }
    }
    if !metrics.is_file() {
        let model = placement
            .load(model_dir)
            .with_context(|| format!("loading {}", model_dir.display()))?;
        let mut bars = crate::cmd::eval::Bars::default();
        pairuni_runner::evaluate_named(
            &model,
            &model_dir.display().to_string(),
            &layout.bench(),
            out,
            &cfg.eval,
            &mut bars,
        )?;
    }
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", metrics.display()))
}

/// Copies the folder `from` to `to` through a sibling `.partial` folder renamed into place, so that `to` is either
/// absent or complete (a partial `to` from a killed evaluation is replaced).
fn copy_folder_atomically(from: &Path, to: &Path) -> Result<()> {
    fn copy_tree(from: &Path, to: &Path) -> Result<()> {
        std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
        for entry in
            std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))?
        {
            let entry = entry.with_context(|| format!("listing {}", from.display()))?;
            let target = to.join(entry.file_name());
            let kind = entry
                .file_type()
                .with_context(|| format!("reading {}", entry.path().display()))?;
            if kind.is_dir() {
                copy_tree(&entry.path(), &target)?;
            } else {
                // Synced before the folder is renamed into place: a complete-looking copy must be complete.
                std::fs::copy(entry.path(), &target)
                    .and_then(|_| std::fs::File::open(&target)?.sync_all())
                    .with_context(|| {
                        format!("copying {} to {}", entry.path().display(), target.display())
                    })?;
            }
        }
        Ok(())
    }
    let mut partial = to.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    for stale in [&partial, &to.to_path_buf()] {
        if stale.exists() {
            std::fs::remove_dir_all(stale)
                .with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    copy_tree(from, &partial)?;
    std::fs::rename(&partial, to)
        .with_context(|| format!("renaming {} to {}", partial.display(), to.display()))?;
    // The rename itself is durable once the folder holding it is synced.
    let parent = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("syncing {}", parent.display()))
}

/// The PairGRPO run's own evaluation after `step` steps, when its schedule (`train.eval_every`) has one.
fn train_evaluation(cfg: &PairuniConfig, step: usize) -> Option<PathBuf> {
    cfg.train
        .schedule()
        .evaluates_at(step)
        .then(|| pairuni_rl::run::RunDir::at(&cfg.train.out_dir).eval_dir(step))
}

/// The three headline numbers of an evaluation: multiple-choice accuracy, POPE F1, GenEval overall.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Headline {
    /// Held-out toy-MCQ accuracy in percent (the scorer's unit, as MMStar reports it).
    pub mcq_accuracy: f64,
    /// Toy-POPE F1 pooled over the three splits, in percent.
    pub pope_f1: f64,
    /// Toy-GenEval overall score in [0, 1].
    pub geneval_overall: f64,
}

/// Reads the headline numbers out of a runner `metrics.json` (NaN where a benchmark is absent).
pub fn headline(metrics: &serde_json::Value) -> Headline {
    let flat = crate::report::flatten_numbers(metrics);
    let find = |candidates: &[&str]| {
        candidates
            .iter()
            .find_map(|k| flat.get(*k).copied())
            .unwrap_or(f64::NAN)
    };
    Headline {
        mcq_accuracy: find(&["mcq.overall.accuracy"]),
        pope_f1: find(&["pope.overall.f1"]),
        geneval_overall: find(&["geneval.scores.overall"]),
    }
}

/// Per-question comparison of two evaluations' toy-MCQ answers (None when the benchmark has no MCQ file).
pub fn mcq_change(
    cfg: &PairuniConfig,
    layout: &Layout,
    before: &Path,
    after: &Path,
) -> Result<Option<PairedChange>> {
    compare_mcq_files(
        &layout.world().join("bench/mcq/questions.jsonl"),
        before,
        after,
        cfg.eval.mcq_rule,
        cfg.eval.seed,
    )
}

/// Compares the `predictions/mcq.jsonl` of two evaluation folders on `gold` (None when a file is missing).
pub fn compare_mcq_files(
    gold: &Path,
    before: &Path,
    after: &Path,
    rule: pairuni_eval::mcq::ChoiceRule,
    seed: u64,
) -> Result<Option<PairedChange>> {
    let (b, a) = (
        before.join("predictions/mcq.jsonl"),
        after.join("predictions/mcq.jsonl"),
    );
    if !gold.is_file() || !b.is_file() || !a.is_file() {
        return Ok(None);
    }
    let gold = pairuni_eval::mcq::read_mcq(gold)?;
    let b = pairuni_eval::predictions::read_predictions(&b)?;
    let a = pairuni_eval::predictions::read_predictions(&a)?;
    Ok(Some(pairuni_eval::paired::compare_mcq(
        &gold, &b, &a, rule, seed,
    )))
}

/// What a whole pipeline run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineSummary {
    /// The seed.
    pub seed: u64,
    /// Scores of the SFT checkpoint.
    pub sft: Headline,
    /// Scores after PairGRPO.
    pub last: Headline,
    /// Toy-MCQ answers the PairGRPO model got right or wrong where the SFT model did not (None without MCQ).
    pub mcq_change: Option<PairedChange>,
    /// Wall-clock seconds of this process's work.
    pub seconds: f64,
}

/// Runs every stage into `layout` (SFT and the world shared with `shared` when given, for ablations).
pub fn run_all(
    cfg: &PairuniConfig,
    layout: &Layout,
    placement: &Placement,
    report: bool,
) -> Result<PipelineSummary> {
    let start = Instant::now();
    std::fs::create_dir_all(&layout.root)
        .with_context(|| format!("creating {}", layout.root.display()))?;
    pairuni_data::atomic::write_atomic_bytes(
        layout.root.join("config.toml"),
        cfg.to_toml_string()?.as_bytes(),
    )?;
    world_stage(cfg, layout)?;
    pairs_stage(cfg, layout)?;
    let sft_model = sft_stage(cfg, placement)?;
    let final_model = train_stage(cfg, placement)?;
    // The PairGRPO run starts from the SFT model and ends at the final one: its own evaluations of those two, when
    // it made them, are the ones the eval stage would make (same weights, recipe and benchmarks).
    let sft_metrics = eval_stage(
        cfg,
        layout,
        &sft_model,
        &layout.eval("sft"),
        placement,
        train_evaluation(cfg, 0).as_deref(),
    )?;
    let final_metrics = eval_stage(
        cfg,
        layout,
        &final_model,
        &layout.eval("final"),
        placement,
        train_evaluation(cfg, cfg.train.steps).as_deref(),
    )?;
    if report {
        crate::report::write_report(&layout.root)?;
    }
    let summary = PipelineSummary {
        seed: cfg.seed,
        sft: headline(&sft_metrics),
        last: headline(&final_metrics),
        mcq_change: mcq_change(cfg, layout, &layout.eval("sft"), &layout.eval("final"))?,
        seconds: start.elapsed().as_secs_f64(),
    };
    pairuni_data::atomic::write_atomic_bytes(
        layout.root.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copied_evaluation_replaces_a_partial_one_and_keeps_nested_files() {
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("train/eval/step-000000");
        std::fs::create_dir_all(from.join("predictions")).unwrap();
        std::fs::write(from.join("metrics.json"), "{}").unwrap();
        std::fs::write(from.join("predictions/mcq.jsonl"), "line\n").unwrap();
        // What a kill can leave: a half-written evaluation and a half-made copy.
        let to = tmp.path().join("eval/sft");
        std::fs::create_dir_all(to.join("predictions")).unwrap();
        std::fs::write(to.join("predictions/stale.jsonl"), "x").unwrap();
        std::fs::create_dir_all(tmp.path().join("eval/sft.partial")).unwrap();
        copy_folder_atomically(&from, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.join("metrics.json")).unwrap(),
            "{}"
        );
        assert_eq!(
            std::fs::read_to_string(to.join("predictions/mcq.jsonl")).unwrap(),
            "line\n"
        );
        assert!(!to.join("predictions/stale.jsonl").exists());
        assert!(!tmp.path().join("eval/sft.partial").exists());
    }

    #[test]
    fn the_runs_own_evaluations_are_found_where_its_schedule_puts_them() {
        let mut cfg = PairuniConfig::default();
        cfg.train.out_dir = PathBuf::from("r/train");
        cfg.train.steps = 25;
        cfg.train.eval_every = 10;
        assert_eq!(
            train_evaluation(&cfg, 0),
            Some(PathBuf::from("r/train/eval/step-000000"))
        );
        assert_eq!(
            train_evaluation(&cfg, 25),
            Some(PathBuf::from("r/train/eval/step-000025"))
        );
        assert_eq!(train_evaluation(&cfg, 15), None);
        cfg.train.eval_every = 0;
        assert_eq!(train_evaluation(&cfg, 0), None);
    }
}
