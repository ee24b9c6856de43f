//! pairuni-eval: benchmark readers, answer parsers and scorers — everything about evaluation that needs no
//! tensors, so the RL rewards can reuse the parsers cheaply.
//!
//! Each benchmark module (`mme`, `pope`, `mcq`) reads the benchmark's own gold file format into questions that
//! remember their file line, and scores a [`predictions::Predictions`] set (raw model outputs keyed by
//! question id) with the benchmark's published rule from [`parse`]. Errors ([`error::EvalError`]) name file,
//! line and field. `config` holds the `[eval]` section (sampling recipe, rules, limits); the runner crate
//! (`pairuni-runner`) produces predictions with a model and calls these scorers.
//! `geneval` judges generated images against GenEval's per-prompt requirements through the plug-in
//! [`detector::Detector`] (the toy world's exact detector is one implementation).

pub mod config;
pub mod detector;
pub mod error;
pub mod geneval;
pub mod mcq;
pub mod mme;
pub mod paired;
pub mod parse;
pub mod pope;
pub mod predictions;
mod util;

pub use error::{EvalError, Result};
pub use parse::{parse_choice, parse_yes_no};
