//! pairuni-runner: runs a model over benchmark folders and hands its outputs to the scorers.
//!
//! [`evaluate`] finds the benchmarks in a folder ([`bench::discover`]), asks the model for answers (text
//! benchmarks: MCQ, POPE, MME) or images (GenEval), writes what the model produced — predictions JSONL in the
//! format `pairuni eval score` reads, generated images and per-prompt grids — then scores everything with
//! `pairuni-eval` and writes `metrics.json` and `results.md`, each number next to the sampling recipe that
//! produced it ([`report`]). The scorers live in `pairuni-eval` (no tensors); this crate is the only part of
//! evaluation that needs the model.

pub mod bench;
pub mod geneval_run;
pub mod report;
mod text_run;

use std::path::{Path, PathBuf};

use pairuni_eval::config::EvalConfig;
use pairuni_eval::mcq::{read_mcq, score_mcq, McqMetrics};
use pairuni_eval::mme::{read_mme, score_mme, MmeMetrics};
use pairuni_eval::pope::{read_pope, score_pope, PopeMetrics};
use pairuni_eval::predictions::{write_predictions, Predictions};
use pairuni_eval::EvalError;
use pairuni_model::{Janus, ModelError};
use serde::{Deserialize, Serialize};

pub use geneval_run::GenevalOutcome;

/// The sampling recipe and benchmark settings of a run (the `[eval]` config section).
pub type EvalRecipe = EvalConfig;

/// Anything that went wrong while evaluating.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// A benchmark or predictions file problem (names file, line and field).
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// Reading an image or writing an output file.
    #[error(transparent)]
    Data(#[from] pairuni_data::DataError),
    /// The model failed.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// The recipe is invalid.
    #[error("eval config: {0}")]
    Config(String),
}

/// Result alias of this crate.
pub type Result<T, E = RunnerError> = std::result::Result<T, E>;

/// Progress reporting hooks (the CLI draws bars with them); every method has a no-op default.
pub trait Progress {
    /// A new stage with `total` steps begins.
    fn stage(&mut self, _name: &str, _total: usize) {}
    /// `n` more steps of the current stage are done.
    fn advance(&mut self, _n: usize) {}
    /// The current stage is over.
    fn finish(&mut self) {}
}

/// A [`Progress`] that reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}

/// Everything a run measured, as written to `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// What was evaluated (the caller's description, e.g. the model folder).
    pub model: String,
    /// The benchmark folder.
    pub bench_dir: PathBuf,
    /// The recipe every number below was produced with.
    pub recipe: EvalRecipe,
    /// Multiple-choice scores.
    pub mcq: Option<McqMetrics>,
    /// POPE scores.
    pub pope: Option<PopeMetrics>,
    /// MME scores.
    pub mme: Option<MmeMetrics>,
    /// GenEval scores and where the images are.
    pub geneval: Option<GenevalOutcome>,
    /// Files written, relative to the output folder.
    pub files: Vec<String>,
}

/// Seed of benchmark `stream`'s sampling RNG: benchmarks do not share a stream, so running one does not change
/// another's draws.
pub(crate) fn stream_seed(seed: u64, stream: u64) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03)
}

/// Runs `model` over every benchmark found in `bench_dir`, writes predictions, images, `metrics.json` and
/// `results.md` under `out_dir`, and returns the scores.
pub fn evaluate(
    model: &Janus,
    bench_dir: &Path,
    out_dir: &Path,
    recipe: &EvalRecipe,
    progress: &mut dyn Progress,
) -> Result<EvalReport> {
    evaluate_named(
        model,
        &bench_dir.display().to_string(),
        bench_dir,
        out_dir,
        recipe,
        progress,
    )
}

/// [`evaluate`] with an explicit model description for the report.
pub fn evaluate_named(
    model: &Janus,
    model_name: &str,
    bench_dir: &Path,
    out_dir: &Path,
    recipe: &EvalRecipe,
    progress: &mut dyn Progress,
) -> Result<EvalReport> {
    recipe.validate().map_err(RunnerError::Config)?;
    let files = bench::discover(bench_dir)?;
    let mut written = Vec::new();
    let mut report = EvalReport {
        model: model_name.to_owned(),
        bench_dir: bench_dir.to_path_buf(),
        recipe: recipe.clone(),
        mcq: None,
        pope: None,
        mme: None,
        geneval: None,
        files: Vec::new(),
    };

    if let Some(path) = &files.mcq {
        let mut gold = read_mcq(path)?;
        if let Some(n) = recipe.limits.mcq {
            gold.questions.truncate(n);
        }
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let items: Vec<text_run::Item> = gold
            .questions
            .iter()
            .map(|q| text_run::Item {
                key: q.question_id.clone(),
                line: q.line,
                image: q.image.clone(),
                question: q.question.clone(),
            })
            .collect();
        let preds = text_run::answer_all(model, path, &base, &items, recipe, 1, "mcq", progress)?;
        let out = out_dir.join("predictions/mcq.jsonl");
        write_predictions(&out, &preds)?;
        written.push("predictions/mcq.jsonl".to_owned());
        let preds = Predictions::from_vec(&out, preds)?;
        report.mcq = Some(score_mcq(&gold, &preds, recipe.mcq_rule, recipe.seed)?);
    }

    if !files.pope.is_empty() {
        let images = files.pope_images();
        let mut scored = Vec::new();
        for (i, path) in files.pope.iter().enumerate() {
            let mut split = read_pope(path)?;
            if let Some(n) = recipe.limits.pope {
                split.questions.truncate(n);
            }
            let items: Vec<text_run::Item> = split
                .questions
                .iter()
                .map(|q| text_run::Item {
                    key: q.question_id.clone(),
                    line: q.line,
                    image: Some(q.image.clone()),
                    question: q.text.clone(),
                })
                .collect();
            let stage = format!("pope {}", split.name);
            let stream = 100 + i as u64;
            let preds = text_run::answer_all(
                model, path, &images, &items, recipe, stream, &stage, progress,
            )?;
            let rel = format!("predictions/pope_{}.jsonl", split.name);
            let out = out_dir.join(&rel);
            write_predictions(&out, &preds)?;
            written.push(rel);
            scored.push((split, Predictions::from_vec(&out, preds)?));
        }
        report.pope = Some(score_pope(&scored, recipe.pope_rule)?);
    }

    if let Some(path) = &files.mme {
        let mut gold = read_mme(path)?;
        if let Some(n) = recipe.limits.mme {
            // Keep whole images: the first n distinct (category, image) pairs with both their questions.
            let mut kept = std::collections::HashSet::new();
            gold.questions.retain(|q| {
                let k = (q.category.clone(), q.question_id.clone());
                if kept.contains(&k) {
                    true
                } else if kept.len() < n {
                    kept.insert(k);
                    true
                } else {
                    false
                }
            });
        }
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let items: Vec<text_run::Item> = gold
            .questions
            .iter()
            .map(|q| text_run::Item {
                key: q.key.clone(),
                line: q.line,
                image: Some(q.image.clone()),
                question: q.question.clone(),
            })
            .collect();
        let preds = text_run::answer_all(model, path, &base, &items, recipe, 2, "mme", progress)?;
        let out = out_dir.join("predictions/mme.jsonl");
        write_predictions(&out, &preds)?;
        written.push("predictions/mme.jsonl".to_owned());
        let preds = Predictions::from_vec(&out, preds)?;
        report.mme = Some(score_mme(&gold, &preds)?);
    }

    if let Some(path) = &files.geneval {
        let outcome = geneval_run::run(model, path, out_dir, recipe, progress, &mut written)?;
        report.geneval = Some(outcome);
    }

    written.push("metrics.json".to_owned());
    written.push("results.md".to_owned());
    report.files = written;
    let json = serde_json::to_vec_pretty(&report)
        .map_err(|e| RunnerError::Config(format!("cannot serialise the report: {e}")))?;
    pairuni_data::write_atomic_bytes(out_dir.join("metrics.json"), &json)?;
    pairuni_data::write_atomic_bytes(
        out_dir.join("results.md"),
        report::markdown(&report).as_bytes(),
    )?;
    Ok(report)
}
