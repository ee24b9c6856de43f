//! Configuration of this stage: the `[eval]` section of a pairuni TOML file.

use serde::{Deserialize, Serialize};

use crate::mcq::ChoiceRule;
use crate::pope::YesNoRule;

/// Evaluation settings: the sampling recipe, the parsing rules and how much of each benchmark to run.
///
/// Every number in `results.md` / `metrics.json` is written next to the recipe that produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Seed of every sampling draw and of MMMU's random fallback. Default 0.
    pub seed: u64,
    /// Classifier-free guidance weight for image generation (Janus-Pro's default). Default 5.0.
    pub cfg_weight: f64,
    /// Sampling temperature for text answers; 0 means greedy decoding. Default 0.0.
    pub text_temperature: f64,
    /// Sampling temperature for image tokens (Janus-Pro samples images at 1.0). Default 1.0.
    pub image_temperature: f64,
    /// Nucleus (top-p) threshold for both modalities; 1.0 disables it. Default 1.0.
    pub top_p: f64,
    /// Images generated per GenEval prompt (GenEval's protocol). Default 4.
    pub images_per_prompt: usize,
    /// Most answer tokens generated per question. Default 16.
    pub max_new_tokens: usize,
    /// Questions / prompts per model call. Default 8.
    pub batch_size: usize,
    /// How POPE outputs are read. Default "pope-extract" (POPE's official rule); or "exact-match".
    pub pope_rule: YesNoRule,
    /// How multiple-choice outputs are read. Default "mmstar"; or "mmmu".
    pub mcq_rule: ChoiceRule,
    /// Per-benchmark caps (first N items), for quick runs; absent = everything.
    pub limits: BenchLimits,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            seed: 0,
            cfg_weight: 5.0,
            text_temperature: 0.0,
            image_temperature: 1.0,
            top_p: 1.0,
            images_per_prompt: 4,
            max_new_tokens: 16,
            batch_size: 8,
            pope_rule: YesNoRule::default(),
            mcq_rule: ChoiceRule::default(),
            limits: BenchLimits::default(),
        }
    }
}

impl EvalConfig {
    /// Whether text answers are decoded greedily (temperature 0).
    pub fn greedy_text(&self) -> bool {
        self.text_temperature <= 0.0
    }

    /// Checks value ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.images_per_prompt == 0 {
            return Err("eval.images_per_prompt must be at least 1".into());
        }
        if self.max_new_tokens == 0 {
            return Err("eval.max_new_tokens must be at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("eval.batch_size must be at least 1".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("eval.top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.text_temperature < 0.0 || self.image_temperature <= 0.0 {
            return Err("eval.text_temperature must be >= 0 and eval.image_temperature > 0".into());
        }
        if !self.cfg_weight.is_finite() {
            return Err("eval.cfg_weight must be finite".into());
        }
        Ok(())
    }
}

/// First-N caps per benchmark (`[eval.limits]`); `None` runs the whole benchmark.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BenchLimits {
    /// Multiple-choice questions. Default: all.
    pub mcq: Option<usize>,
    /// Questions per POPE split. Default: all.
    pub pope: Option<usize>,
    /// MME images (each brings its two questions). Default: all.
    pub mme: Option<usize>,
    /// GenEval prompts. Default: all.
    pub geneval: Option<usize>,
}
