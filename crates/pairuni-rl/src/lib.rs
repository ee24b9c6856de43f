//! pairuni-rl: the trainers. PairGRPO (METHOD.md §3) and the supervised warm-up.
//!
//! `config` holds the `[sft]` and `[train]` sections. `loss` is the objective, one function per step of the
//! method (advantages, pair weight, ratio, clip, KL, aggregation); `optim` is AdamW with checkpointable moments
//! and the learning-rate schedule; `reward` turns rollouts into numbers (answer parsers, toy-GenEval); `data`
//! draws batches of pairs with a resumable cursor; `run` holds run folders, checkpoints and metrics files;
//! `grpo` and `sft` put these together around a `pairuni_model::Janus`, and `run_loop` drives either through a
//! whole run (resume, metrics, checkpoints, final model).

pub mod config;
pub mod data;
pub mod fused_adamw;
pub mod grpo;
pub mod loss;
pub mod optim;
pub mod passes;
pub mod reward;
pub mod run;
pub mod run_loop;
pub mod sft;

pub use grpo::{train, GrpoTrainer, StepReport};
pub use run_loop::{EvalHook, RunEvaluator, RunOptions, TrainSummary};
pub use sft::{sft, SftTrainer};

/// Everything that can stop a trainer, with the file, field or step concerned.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A config value that cannot work.
    #[error("config: {0}")]
    Config(String),
    /// Reading pools, pairs or images failed.
    #[error("data: {0}")]
    Data(String),
    /// The model failed (shapes, tokenizer, checkpoint).
    #[error("model: {0}")]
    Model(#[from] pairuni_model::ModelError),
    /// A tensor operation in the loss or optimiser failed.
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    /// A reward could not score a rollout.
    #[error("reward: {0}")]
    Reward(#[from] reward::RewardError),
    /// The run folder could not be read or written.
    #[error("run folder: {0}")]
    Run(#[from] run::RunError),
    /// A checkpoint does not fit the model.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The held-out evaluation of a run (`eval_every`) failed.
    #[error("held-out evaluation after step {step}: {message}")]
    Eval {
        /// Steps done when it ran.
        step: usize,
        /// What went wrong.
        message: String,
    },
    /// Too many consecutive steps had a non-finite loss, gradient or reward.
    #[error(
        "step {step}: {streak} consecutive steps with a non-finite {what}; stopping. Lower the learning rate \
         (`optim.lr`), enable gradient clipping (`optim.max_grad_norm`) or check the rewards"
    )]
    NonFinite {
        /// Step at which the run stopped.
        step: usize,
        /// Consecutive skipped steps.
        streak: usize,
        /// What was non-finite last.
        what: String,
    },
}

/// A progress bar with ETA (hidden when `show` is false, e.g. in tests).
pub fn progress_bar(show: bool, total: usize, start: usize, label: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(label.to_string());
    bar.set_position(start as u64);
    bar
}
