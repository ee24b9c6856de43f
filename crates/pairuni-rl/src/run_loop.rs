//! The loop every training run shares (SFT and PairGRPO): open or resume the run folder, step to the end with
//! metrics appended and checkpoints written as configured, then save the final model. Keeping it in one place
//! keeps the resume and checkpoint rules the same for both trainers.

use std::path::{Path, PathBuf};

use pairuni_model::Janus;
use serde_json::{Map, Value};

use crate::run::RunDir;
use crate::TrainError;

/// Options of a whole run that are not part of the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Show an indicatif progress bar.
    pub progress: bool,
    /// The resolved config to store as `config.toml`.
    pub config_toml: Option<String>,
    /// Stop after this many steps in this process (tests of resume: "killed" after N steps).
    pub stop_after: Option<usize>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Step the run started from (0 for a fresh run).
    pub resumed_from: usize,
    /// Completed steps.
    pub steps: usize,
    /// Metrics of the steps this process ran.
    pub metrics: Vec<Map<String, Value>>,
    /// The saved final model (when the run reached `cfg.steps`).
    pub final_dir: Option<PathBuf>,
}

/// A trainer the run loop drives.
pub(crate) trait Stepper {
    /// The progress bar's label.
    const LABEL: &'static str;
    /// Steps completed.
    fn steps_done(&self) -> usize;
    /// Runs one step; returns its metrics.
    fn run_step(&mut self) -> Result<Map<String, Value>, TrainError>;
    /// Restores the latest checkpoint of `run`, if any; returns the step resumed from.
    fn resume_from(&mut self, run: &RunDir) -> Result<Option<usize>, TrainError>;
    /// Writes a checkpoint of the current state into `run`.
    fn checkpoint(&self, run: &RunDir) -> Result<(), TrainError>;
    /// The model `final/` gets.
    fn model(&self) -> &Janus;
    /// The progress bar's message after a step with these metrics.
    fn progress_message(metrics: &Map<String, Value>) -> String;
}

/// The number under `key` in a step's metrics (NaN when absent), for progress messages.
pub(crate) fn metric(metrics: &Map<String, Value>, key: &str) -> f64 {
    metrics.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// Runs `trainer` in `out_dir` to `steps`, checkpointing every `checkpoint_every` steps (0: only at the end).
pub(crate) fn run<T: Stepper>(
    trainer: &mut T,
    out_dir: &Path,
    steps: usize,
    checkpoint_every: usize,
    opts: &RunOptions,
) -> Result<TrainSummary, TrainError> {
    let run = RunDir::create(out_dir)?;
    if let Some(text) = &opts.config_toml {
        run.write_config(text)?;
    }
    let resumed_from = trainer.resume_from(&run)?.unwrap_or(0);
    run.truncate_metrics(resumed_from)?;
    if resumed_from > 0 {
        tracing::info!(step = resumed_from, dir = %out_dir.display(), "resuming {} run", T::LABEL);
    }
    let bar = crate::progress_bar(opts.progress, steps, resumed_from, T::LABEL);
    let mut metrics = Vec::new();
    let mut ran = 0;
    while trainer.steps_done() < steps {
        if opts.stop_after.is_some_and(|n| ran >= n) {
            return Ok(TrainSummary {
                resumed_from,
                steps: trainer.steps_done(),
                metrics,
                final_dir: None,
            });
        }
        let m = trainer.run_step()?;
        run.append_metrics(&Value::Object(m.clone()))?;
        bar.set_position(trainer.steps_done() as u64);
        bar.set_message(T::progress_message(&m));
        metrics.push(m);
        ran += 1;
        let done = trainer.steps_done();
        if (checkpoint_every > 0 && done.is_multiple_of(checkpoint_every)) || done == steps {
            trainer.checkpoint(&run)?;
        }
    }
    bar.finish();
    let final_dir = run.final_dir();
    trainer.model().save(&final_dir)?;
    Ok(TrainSummary {
        resumed_from,
        steps: trainer.steps_done(),
        metrics,
        final_dir: Some(final_dir),
    })
}
