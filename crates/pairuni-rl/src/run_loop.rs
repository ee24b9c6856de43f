//! The loop every training run shares (SFT and PairGRPO): open or resume the run folder, step to the end with
//! metrics appended and checkpoints written as configured, then save the final model. Keeping it in one place
//! keeps the resume and checkpoint rules the same for both trainers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

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
    /// The held-out evaluation run at the steps `eval_every` names; required when it is not 0.
    pub evaluator: Option<EvalHook>,
}

/// Held-out evaluation during a run (`eval_every`), like TRL's `eval_steps` or verl's `test_freq`. This crate
/// does not know the benchmarks; the `pairuni` binary supplies one that runs them (`pairuni_runner`).
pub trait RunEvaluator: Send + Sync {
    /// Evaluates `model` as it is after `step` steps, writing what it produces under `out_dir`; returns the
    /// numbers to record in the run's `eval.jsonl`. It must not change the model, and should draw its samples
    /// from a seed of its own, so that a run trains the same with and without it.
    fn evaluate(
        &self,
        model: &Janus,
        step: usize,
        out_dir: &Path,
    ) -> Result<Map<String, Value>, String>;
}

/// A shared [`RunEvaluator`] in [`RunOptions`].
#[derive(Clone)]
pub struct EvalHook(pub Arc<dyn RunEvaluator>);

impl std::fmt::Debug for EvalHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EvalHook(..)")
    }
}

/// When a run checkpoints and evaluates (`SftConfig::schedule`, `TrainConfig::schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Steps of the whole run.
    pub steps: usize,
    /// Checkpoint every this many steps (and at the end); 0 = only at the end.
    pub checkpoint_every: usize,
    /// Evaluate before the first step, every this many steps and after the last; 0 = never.
    pub eval_every: usize,
}

impl Schedule {
    /// Whether a checkpoint is written after `done` steps.
    pub fn checkpoints_at(&self, done: usize) -> bool {
        (self.checkpoint_every > 0 && done.is_multiple_of(self.checkpoint_every))
            || done == self.steps
    }

    /// Whether the held-out evaluation runs on the model after `done` steps (0: the model the run starts from).
    pub fn evaluates_at(&self, done: usize) -> bool {
        self.eval_every > 0 && (done.is_multiple_of(self.eval_every) || done == self.steps)
    }
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

/// Runs `trainer` in `out_dir` to `schedule.steps`, writing checkpoints and held-out evaluations as scheduled.
pub(crate) fn run<T: Stepper>(
    trainer: &mut T,
    out_dir: &Path,
    schedule: Schedule,
    opts: &RunOptions,
) -> Result<TrainSummary, TrainError> {
    let steps = schedule.steps;
    let evaluator = match (&opts.evaluator, schedule.eval_every) {
        (_, 0) => None,
        (Some(hook), _) => Some(hook.0.as_ref()),
        (None, every) => {
            return Err(TrainError::Config(format!(
                "`eval_every` = {every} asks for held-out evaluations, but no evaluator was given \
                 (`RunOptions::evaluator`; the `pairuni` binary builds one from `eval_bench`)"
            )))
        }
    };
    let run = RunDir::create(out_dir)?;
    if let Some(text) = &opts.config_toml {
        run.write_config(text)?;
    }
    let resumed_from = trainer.resume_from(&run)?.unwrap_or(0);
    run.truncate_metrics(resumed_from)?;
    let evaluated = run.truncate_evals(resumed_from)?;
    if resumed_from > 0 {
        tracing::info!(step = resumed_from, dir = %out_dir.display(), "resuming {} run", T::LABEL);
    }
    let bar = crate::progress_bar(opts.progress, steps, resumed_from, T::LABEL);
    // The model the run starts from (or a kill between a checkpoint and its evaluation) may be due one.
    if let Some(evaluator) = evaluator {
        if schedule.evaluates_at(resumed_from) && !evaluated.contains(&resumed_from) {
            evaluate(evaluator, trainer, &run, resumed_from, &bar)?;
        }
    }
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
        if schedule.checkpoints_at(done) {
            trainer.checkpoint(&run)?;
        }
        if let Some(evaluator) = evaluator.filter(|_| schedule.evaluates_at(done)) {
            evaluate(evaluator, trainer, &run, done, &bar)?;
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

/// One held-out evaluation after `step` steps, recorded in `eval.jsonl` with its time.
fn evaluate<T: Stepper>(
    evaluator: &dyn RunEvaluator,
    trainer: &T,
    run: &RunDir,
    step: usize,
    bar: &indicatif::ProgressBar,
) -> Result<(), TrainError> {
    bar.set_message(format!("held-out evaluation at step {step}"));
    let start = Instant::now();
    let mut line = evaluator
        .evaluate(trainer.model(), step, &run.eval_dir(step))
        .map_err(|message| TrainError::Eval { step, message })?;
    let seconds = start.elapsed().as_secs_f64();
    line.insert("step".into(), Value::from(step));
    line.insert("time/eval".into(), Value::from(seconds));
    run.append_eval(&Value::Object(line))?;
    tracing::info!(step, seconds, "{} held-out evaluation done", T::LABEL);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    #[test]
    fn evaluations_come_first_every_n_steps_and_last_checkpoints_every_n_and_last() {
        let schedule = Schedule {
            steps: 7,
            checkpoint_every: 2,
            eval_every: 3,
        };
        let evaluated: Vec<usize> = (0..=7).filter(|&s| schedule.evaluates_at(s)).collect();
        assert_eq!(evaluated, [0, 3, 6, 7]);
        let checkpointed: Vec<usize> = (1..=7).filter(|&s| schedule.checkpoints_at(s)).collect();
        assert_eq!(checkpointed, [2, 4, 6, 7]);
        let never = Schedule {
            eval_every: 0,
            checkpoint_every: 0,
            ..schedule
        };
        assert!((0..=7).all(|s| !never.evaluates_at(s)));
        assert_eq!(
            (1..=7)
                .filter(|&s| never.checkpoints_at(s))
                .collect::<Vec<_>>(),
            [7]
        );
    }
}
