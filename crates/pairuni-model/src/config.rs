//! Configuration of this stage: the `[model]` section of a pairuni TOML file.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::device::{default_dtype, parse_device, parse_dtype};
use crate::error::{ModelError, Result};
use crate::janus::Janus;

/// Which kernels sampling forwards use (docs/GPU.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FusedSampling {
    /// candle's fused RMSNorm, rotary and softmax kernels on accelerators, the composed ops on the CPU.
    #[default]
    Auto,
    /// The fused kernels on every device.
    On,
    /// The differentiable compositions of basic ops that training uses, on every device.
    Off,
}

/// On which device and in which dtype the commands run the model, and the toy model's codebook size. Which
/// checkpoint runs is each stage's own key (`sft.init`, `train.init`, `eval --model`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Device: `cpu`, `cuda` or `cuda:N`; a command's `--device` wins over it (default `cpu`).
    pub device: String,
    /// Weight dtype: `auto` (bf16 on CUDA, f32 on the CPU), `f32`, `bf16` or `f16`; logits and log-probs are
    /// always f32, and trained bf16/f16 weights keep f32 master copies. A command's `--dtype` wins over it
    /// (default `auto`).
    pub dtype: String,
    /// Codes in the toy patch codebook, at most (TOYWORLD.md: K ≈ 512), when SFT builds the toy model
    /// (default 512).
    pub toy_codebook_size: usize,
    /// Kernels of the sampling forwards: `auto` (fused on accelerators, composed on the CPU), `on` or `off`;
    /// `off` is the escape hatch should a fused kernel misbehave on some GPU (default `auto`).
    pub fused_sampling: FusedSampling,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            dtype: "auto".into(),
            toy_codebook_size: 512,
            fused_sampling: FusedSampling::Auto,
        }
    }
}

impl ModelConfig {
    /// The device and weight dtype to run on: `device` / `dtype` from the command line when given, else this
    /// section's; errors name where the bad value came from.
    pub fn resolve(&self, device: Option<&str>, dtype: Option<&str>) -> Result<(Device, DType)> {
        let dev = match device {
            Some(d) => parse_device(d).map_err(|e| ModelError::input(e.to_string()))?,
            None => parse_device(&self.device)
                .map_err(|e| ModelError::input(format!("[model] device: {e}")))?,
        };
        let dtype = match dtype {
            Some(d) => parse_dtype(d).map_err(|e| ModelError::input(e.to_string()))?,
            None if self.dtype == "auto" => default_dtype(&dev),
            None => parse_dtype(&self.dtype)
                .map_err(|e| ModelError::input(format!("[model] dtype: {e}")))?,
        };
        Ok((dev, dtype))
    }
}

impl ModelConfig {
    /// Applies the settings that live on a loaded model (the sampling kernels).
    pub fn configure(&self, model: &mut Janus) {
        match self.fused_sampling {
            FusedSampling::Auto => {}
            FusedSampling::On => model.set_fused_sampling(true),
            FusedSampling::Off => model.set_fused_sampling(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_sampling_setting_reaches_the_model() {
        let cfg = crate::JanusConfig::toy(16, 8);
        let mut m = Janus::new_random(&cfg, None, None, 1, &Device::Cpu, DType::F32).unwrap();
        let mut c = ModelConfig::default();
        c.configure(&mut m);
        assert!(!m.fused_sampling(), "auto keeps the CPU's composed kernels");
        c.fused_sampling = FusedSampling::On;
        c.configure(&mut m);
        assert!(m.fused_sampling());
        c.fused_sampling = FusedSampling::Off;
        c.configure(&mut m);
        assert!(!m.fused_sampling());
        let parsed: ModelConfig = toml::from_str("fused_sampling = \"on\"").unwrap();
        assert_eq!(parsed.fused_sampling, FusedSampling::On);
    }

    #[test]
    fn the_command_line_wins_and_bad_values_name_their_source() {
        let c = ModelConfig::default();
        let (dev, dtype) = c.resolve(None, None).unwrap();
        assert!(dev.is_cpu());
        assert_eq!(dtype, DType::F32);
        let half = ModelConfig {
            dtype: "bf16".into(),
            ..c.clone()
        };
        assert_eq!(half.resolve(None, None).unwrap().1, DType::BF16);
        assert_eq!(half.resolve(None, Some("f32")).unwrap().1, DType::F32);
        let bad = ModelConfig {
            dtype: "f8".into(),
            device: "gpu".into(),
            ..c
        };
        let err = bad.resolve(None, Some("f32")).unwrap_err().to_string();
        assert!(err.contains("[model] device"), "{err}");
        let err = bad.resolve(Some("cpu"), None).unwrap_err().to_string();
        assert!(err.contains("[model] dtype"), "{err}");
        // A bad command-line value is not blamed on the config.
        let err = bad
            .resolve(Some("cpu"), Some("f8"))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("[model]") && err.contains("f8"), "{err}");
    }
}
