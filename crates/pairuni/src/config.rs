//! The whole-run configuration: one TOML file with a section per stage, each section owned by its crate.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// A pairuni configuration file, fully resolved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairuniConfig {
    /// Seed every random choice flows from.
    pub seed: u64,
    /// Toy-world generation (`pairuni world generate`, `pairuni demo`).
    pub world: pairuni_toyworld::config::WorldConfig,
    /// Pair building (`pairuni pairs build`).
    pub pairs: pairuni_pairs::config::PairsConfig,
    /// The model to build or load.
    pub model: pairuni_model::config::ModelConfig,
    /// Supervised warm-up (`pairuni sft`).
    pub sft: pairuni_rl::config::SftConfig,
    /// PairGRPO (`pairuni train`).
    pub train: pairuni_rl::config::TrainConfig,
    /// Evaluation (`pairuni eval`).
    pub eval: pairuni_eval::config::EvalConfig,
}

impl PairuniConfig {
    /// Reads a TOML file; absent keys take their defaults, unknown keys are an error naming key, file and line.
    pub fn load(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` (a file name) only labels errors.
    pub fn from_toml_str(text: &str, origin: &str) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|err| anyhow::anyhow!(describe(text, origin, &err)))
    }

    /// The configuration as TOML, every field written out (what `pairuni config show` prints and what a run
    /// folder's `config.toml` holds).
    pub fn to_toml_string(&self) -> anyhow::Result<String> {
        toml::to_string_pretty(self).context("cannot write the configuration as TOML")
    }
}

/// `FILE:LINE:COL: message (in [section])` — toml's message names the key (e.g. "unknown field `lr`, expected
/// one of …"); we add where it is, and which table, since the message alone does not say.
fn describe(text: &str, origin: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end();
    let Some(span) = err.span() else {
        return format!("{origin}: {message}");
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|header| format!(" (in {header})"))
        .unwrap_or_default();
    format!("{origin}:{line}:{column}: {message}{section}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = PairuniConfig::default().to_toml_string().unwrap();
        let back = PairuniConfig::from_toml_str(&text, "defaults").unwrap();
        assert_eq!(back, PairuniConfig::default());
    }

    #[test]
    fn absent_keys_take_defaults() {
        let config = PairuniConfig::from_toml_str("seed = 7\n", "x.toml").unwrap();
        assert_eq!(
            config,
            PairuniConfig {
                seed: 7,
                ..PairuniConfig::default()
            }
        );
    }

    #[test]
    fn unknown_top_level_key_names_key_file_and_line() {
        let err = PairuniConfig::from_toml_str("seed = 1\nsede = 2\n", "run.toml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("run.toml:2:1: unknown field `sede`"),
            "{text}"
        );
    }

    #[test]
    fn unknown_key_in_a_section_names_the_section() {
        let err = PairuniConfig::from_toml_str("seed = 1\n\n[world]\nbogus_knob = 3\n", "run.toml")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("run.toml:4:1: unknown field `bogus_knob`"),
            "{text}"
        );
        assert!(text.ends_with("(in [world])"), "{text}");
    }

    #[test]
    fn wrong_type_names_the_line() {
        let err = PairuniConfig::from_toml_str("seed = \"seven\"\n", "run.toml").unwrap_err();
        assert!(
            err.to_string().starts_with("run.toml:1:8: invalid type"),
            "{err}"
        );
    }
}
