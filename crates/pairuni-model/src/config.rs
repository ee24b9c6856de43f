//! Configuration of this stage: the `[model]` section of a pairuni TOML file.

use std::path::PathBuf;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::device::{parse_device, parse_dtype};
use crate::error::{ModelError, Result};
use crate::janus::Janus;

/// Which model to load, on which device and in which dtype.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Checkpoint folder to load (config.json + safetensors [+ tokenizer.json]); absent = the stage builds the
    /// toy model itself (default: absent).
    pub checkpoint: Option<PathBuf>,
    /// Device: `cpu`, `cuda` or `cuda:N` (default `cpu`).
    pub device: String,
    /// Weight dtype: `f32`, `bf16` or `f16`; logits and log-probs are always f32 (default `f32`).
    pub dtype: String,
    /// Codes in the toy patch codebook, at most (TOYWORLD.md: K ≈ 512) (default 512).
    pub toy_codebook_size: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            checkpoint: None,
            device: "cpu".into(),
            dtype: "f32".into(),
            toy_codebook_size: 512,
        }
    }
}

impl ModelConfig {
    /// The configured device.
    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device).map_err(|e| ModelError::input(format!("[model] device: {e}")))
    }

    /// The configured dtype.
    pub fn dtype(&self) -> Result<DType> {
        parse_dtype(&self.dtype).map_err(|e| ModelError::input(format!("[model] dtype: {e}")))
    }

    /// Loads `checkpoint` on the configured device and dtype; None when no checkpoint is configured.
    pub fn load_checkpoint(&self) -> Result<Option<Janus>> {
        match &self.checkpoint {
            None => Ok(None),
            Some(dir) => Ok(Some(Janus::load(dir, &self.device()?, self.dtype()?)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_bad_values_name_the_key() {
        let c = ModelConfig::default();
        assert!(c.device().unwrap().is_cpu());
        assert_eq!(c.dtype().unwrap(), DType::F32);
        assert!(c.load_checkpoint().unwrap().is_none());
        let bad = ModelConfig {
            dtype: "f8".into(),
            ..c.clone()
        };
        assert!(bad
            .dtype()
            .unwrap_err()
            .to_string()
            .contains("[model] dtype"));
        let missing = ModelConfig {
            checkpoint: Some("/nonexistent/ckpt".into()),
            ..c
        };
        assert!(missing
            .load_checkpoint()
            .err()
            .unwrap()
            .to_string()
            .contains("/nonexistent/ckpt"));
    }
}
