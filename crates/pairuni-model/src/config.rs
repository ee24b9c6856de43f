//! Configuration of this stage: the `[model]` section of a pairuni TOML file.

use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::device::{default_dtype, parse_device, parse_dtype};
use crate::error::{ModelError, Result};
use crate::janus::Janus;

/// A `[model]` switch whose `auto` leaves the choice to the model's per-device default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Toggle {
    /// The per-device default.
    #[default]
    Auto,
    /// On, on every device.
    On,
    /// Off, on every device.
    Off,
}

impl Toggle {
    /// `Some(on)` when the switch is forced, `None` for `auto`.
    pub fn forced(self) -> Option<bool> {
        match self {
            Self::Auto => None,
            Self::On => Some(true),
            Self::Off => Some(false),
        }
    }
}

impl FromStr for Toggle {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!("`{other}` is not auto, on or off")),
        }
    }
}

/// Where and how a command runs its model: device, weight dtype and sampling kernels, resolved from the command
/// line and the `[model]` section ([`ModelConfig::resolve`]).
#[derive(Debug, Clone)]
pub struct Placement {
    /// The device the model lives on.
    pub device: Device,
    /// The weights' dtype (trained bf16/f16 weights keep f32 master copies in the optimiser).
    pub dtype: DType,
    /// The kernels of sampling forwards: candle's fused ones (`auto`: on accelerators) or the compositions.
    pub fused_sampling: Toggle,
    /// Whether the device-side image and answer decodes take fixed-shape steps, captured as CUDA graphs on CUDA
    /// devices (`auto`: on CUDA devices, docs/GPU.md).
    pub cuda_graphs: Toggle,
    /// Whether answer rollouts of one image and question share the prompt's forward (`auto`: on accelerators).
    pub prompt_sharing: Toggle,
    /// The kernels of differentiable forwards: candle's fused ones with hand-written backwards (`auto`: on
    /// accelerators) or the compositions of basic ops.
    pub fused_training: Toggle,
    /// Whether a decode step's attention runs as one CUDA kernel (`auto`: on CUDA devices, measured on an H200;
    /// it acts on CUDA devices only).
    pub attention_kernel: Toggle,
    /// Whether the training kernels' RMSNorm backward runs as one CUDA kernel (`auto`: on CUDA devices, measured
    /// on an H200).
    pub norm_kernel: Toggle,
    /// Whether sampling forwards run residual add + RMSNorm, SiLU · gate and rotary + cache write as one CUDA
    /// kernel each (`auto`: on CUDA devices, measured on an H200).
    pub layer_kernels: Toggle,
    /// Whether the VQ's convolutions on a CUDA device run through the hand-written im2col kernel (process-wide;
    /// `auto`: on, measured on an H200; it acts on CUDA devices only).
    pub conv_kernel: Toggle,
    /// Whether the device samplers' draws run as one CUDA kernel with noise of its own (`auto`: on CUDA devices,
    /// measured on an H200).
    pub draw_kernel: Toggle,
    /// Whether the training kernels' SiLU · gate and softmax backwards run as one CUDA kernel each (`auto`: on
    /// CUDA devices, measured on an H200).
    pub backward_kernels: Toggle,
}

impl Placement {
    /// f32 weights on `device` with the per-device kernels (what the toy world's recorded results used).
    pub fn f32_on(device: &Device) -> Self {
        Self {
            device: device.clone(),
            dtype: DType::F32,
            fused_sampling: Toggle::Auto,
            cuda_graphs: Toggle::Auto,
            prompt_sharing: Toggle::Auto,
            fused_training: Toggle::Auto,
            attention_kernel: Toggle::Auto,
            norm_kernel: Toggle::Auto,
            layer_kernels: Toggle::Auto,
            conv_kernel: Toggle::Auto,
            draw_kernel: Toggle::Auto,
            backward_kernels: Toggle::Auto,
        }
    }

    /// Sets `model`'s sampling switches (`auto` keeps the model's per-device default).
    pub fn configure(&self, model: &mut Janus) {
        if let Some(on) = self.fused_sampling.forced() {
            model.set_fused_sampling(on);
        }
        if let Some(on) = self.cuda_graphs.forced() {
            model.set_static_decode(on);
        }
        if let Some(on) = self.prompt_sharing.forced() {
            model.set_prompt_sharing(on);
        }
        if let Some(on) = self.fused_training.forced() {
            model.set_fused_training(on);
        }
        if let Some(on) = self.attention_kernel.forced() {
            model.set_attention_kernel(on);
        }
        if let Some(on) = self.norm_kernel.forced() {
            model.set_norm_kernel(on);
        }
        if let Some(on) = self.layer_kernels.forced() {
            model.set_layer_kernels(on);
        }
        if let Some(on) = self.conv_kernel.forced() {
            crate::conv_kernel::set_enabled(on);
        }
        if let Some(on) = self.draw_kernel.forced() {
            model.set_draw_kernel(on);
        }
        if let Some(on) = self.backward_kernels.forced() {
            model.set_backward_kernels(on);
        }
    }

    /// Loads the checkpoint folder `dir` here.
    pub fn load(&self, dir: &Path) -> Result<Janus> {
        let mut model = Janus::load(dir, &self.device, self.dtype)?;
        self.configure(&mut model);
        Ok(model)
    }

    /// Takes a model built on this device in another dtype (the toy is built in f32) into this placement.
    pub fn adopt(&self, model: Janus) -> Result<Janus> {
        let mut model = if model.dtype() == self.dtype {
            model
        } else {
            model.with_dtype(self.dtype)?
        };
        self.configure(&mut model);
        Ok(model)
    }
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
    pub fused_sampling: Toggle,
    /// Rollouts sampled on the device in fixed-shape steps, each attention width's step captured once as a CUDA
    /// graph and replayed: `on`, `off`, or `auto` (on CUDA devices: measured on an H200, the captured steps match
    /// the eager ones bit for bit and halve the image rollout). It concerns the device-side samplers, the default
    /// on CUDA (images always, answers without top-p); the CPU samples on the host (default `auto`).
    pub cuda_graphs: Toggle,
    /// Answer rollouts of one image and question (a GRPO group) share the prompt's forward, in the sampler's
    /// prefill and in the teacher-forced pass: `auto` (on accelerators, where the prompt's 576 image slots are
    /// most of a rollout; off on the CPU, which keeps the recorded toy results bit for bit), `on` or `off`. The
    /// same values, computed once per prompt instead of once per rollout; the gradients differ by rounding only
    /// (default `auto`).
    pub prompt_sharing: Toggle,
    /// Teacher-forced passes (training) through candle's fused RMSNorm, rotary and softmax kernels with
    /// hand-written backwards: `auto` (on accelerators, where a third fewer ops is a third less host time; off
    /// on the CPU, which keeps the recorded toy results bit for bit), `on` or `off`. Values and gradients match
    /// the compositions to rounding (default `auto`).
    pub fused_training: Toggle,
    /// A decode step's attention as one CUDA kernel (scores, softmax and values in one launch, checked against
    /// an f32 reference at its first use and turned off if it disagrees): `on`, `off`, or `auto` (on CUDA
    /// devices, where an H200 measured it, docs/GPU.md) (default `auto`).
    pub attention_kernel: Toggle,
    /// The RMSNorm backward of training forwards (with `fused_training`) as one CUDA kernel, checked against the
    /// composed backward at its first use and turned off if it disagrees: `on`, `off`, or `auto` (on CUDA
    /// devices, where an H200 measured it, docs/GPU.md) (default `auto`).
    pub norm_kernel: Toggle,
    /// The residual adds with the RMSNorms after them, SiLU with the gate product, and a static decode step's
    /// rotary embedding with its cache writes, of sampling forwards (with `fused_sampling`) as one CUDA kernel each, checked against candle's ops at their first use and turned off
    /// if they disagree: `on`, `off`, or `auto` (on CUDA devices, where an H200 measured them, docs/GPU.md)
    /// (default `auto`).
    pub layer_kernels: Toggle,
    /// The VQ's k×k convolutions on a CUDA device as one hand-written im2col kernel and one batched matmul instead
    /// of candle's `conv2d` (process-wide; checked against candle's at its first use and turned off if it
    /// disagrees): `on`, `off`, or `auto` (on, where an H200 measured it, docs/GPU.md) (default `auto`).
    pub conv_kernel: Toggle,
    /// The device samplers' draws (CFG mix or banned-token bias, temperature, Gumbel noise, argmax, the drawn
    /// class's log-prob) as one CUDA kernel that makes its own noise from a counter, so that a captured decode
    /// step draws nothing between its graphs (checked against candle's ops on the same noise at its first use and
    /// turned off if it disagrees): `on`, `off`, or `auto` (on CUDA devices, where an H200 measured it,
    /// docs/GPU.md) (default `auto`).
    pub draw_kernel: Toggle,
    /// The SiLU · gate and attention softmax backwards of training forwards (with `fused_training`) as one CUDA
    /// kernel each, checked against the composed backwards at their first use and turned off if they disagree:
    /// `on`, `off`, or `auto` (on CUDA devices, where an H200 measured them, docs/GPU.md) (default `auto`).
    pub backward_kernels: Toggle,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            dtype: "auto".into(),
            toy_codebook_size: 512,
            fused_sampling: Toggle::Auto,
            cuda_graphs: Toggle::Auto,
            prompt_sharing: Toggle::Auto,
            fused_training: Toggle::Auto,
            attention_kernel: Toggle::Auto,
            norm_kernel: Toggle::Auto,
            layer_kernels: Toggle::Auto,
            conv_kernel: Toggle::Auto,
            draw_kernel: Toggle::Auto,
            backward_kernels: Toggle::Auto,
        }
    }
}

impl ModelConfig {
    /// Where to run: `device` / `dtype` from the command line when given, else this section's; errors name where
    /// the bad value came from.
    pub fn resolve(&self, device: Option<&str>, dtype: Option<&str>) -> Result<Placement> {
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
        Ok(Placement {
            device: dev,
            dtype,
            fused_sampling: self.fused_sampling,
            cuda_graphs: self.cuda_graphs,
            prompt_sharing: self.prompt_sharing,
            fused_training: self.fused_training,
            attention_kernel: self.attention_kernel,
            norm_kernel: self.norm_kernel,
            layer_kernels: self.layer_kernels,
            conv_kernel: self.conv_kernel,
            draw_kernel: self.draw_kernel,
            backward_kernels: self.backward_kernels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placement_reaches_the_model() {
        let cfg = crate::JanusConfig::toy(16, 8);
        let toy = || Janus::new_random(&cfg, None, None, 1, &Device::Cpu, DType::F32).unwrap();
        let mut c = ModelConfig::default();
        let m = c.resolve(None, None).unwrap().adopt(toy()).unwrap();
        assert!(!m.fused_sampling(), "auto keeps the CPU's composed kernels");
        assert!(!m.static_decode(), "auto takes graphs on CUDA devices only");
        assert!(!m.prompt_sharing(), "auto keeps the CPU's unshared passes");
        assert!(
            !m.fused_training(),
            "auto keeps the CPU's composed training kernels"
        );
        assert!(!m.attention_kernel(), "auto takes it on CUDA devices only");
        assert!(!m.norm_kernel(), "auto takes it on CUDA devices only");
        assert!(!m.layer_kernels(), "auto takes them on CUDA devices only");
        assert!(!m.draw_kernel(), "auto takes it on CUDA devices only");
        assert!(
            !m.backward_kernels(),
            "auto takes them on CUDA devices only"
        );
        assert_eq!(m.dtype(), DType::F32);
        c.fused_sampling = Toggle::On;
        c.cuda_graphs = Toggle::On;
        c.prompt_sharing = Toggle::On;
        c.fused_training = Toggle::On;
        c.attention_kernel = Toggle::On;
        c.norm_kernel = Toggle::On;
        c.layer_kernels = Toggle::On;
        c.conv_kernel = Toggle::On;
        c.draw_kernel = Toggle::On;
        c.backward_kernels = Toggle::On;
        let placed = c.resolve(None, Some("bf16")).unwrap();
        let m = placed.adopt(toy()).unwrap();
        // Process-wide: no other test sets it.
        assert!(crate::conv_kernel::enabled());
        assert!(m.fused_sampling());
        assert!(m.static_decode());
        assert!(m.prompt_sharing());
        assert!(m.fused_training());
        assert!(m.attention_kernel());
        assert!(m.norm_kernel());
        assert!(m.layer_kernels());
        assert!(m.draw_kernel());
        assert!(m.backward_kernels());
        assert_eq!(m.dtype(), DType::BF16);
        let mut m = m;
        Placement {
            fused_sampling: Toggle::Off,
            cuda_graphs: Toggle::Off,
            prompt_sharing: Toggle::Off,
            fused_training: Toggle::Off,
            attention_kernel: Toggle::Off,
            norm_kernel: Toggle::Off,
            layer_kernels: Toggle::Off,
            conv_kernel: Toggle::Off,
            draw_kernel: Toggle::Off,
            backward_kernels: Toggle::Off,
            ..placed
        }
        .configure(&mut m);
        assert!(!crate::conv_kernel::enabled());
        assert!(!m.fused_sampling());
        assert!(!m.static_decode());
        assert!(!m.prompt_sharing());
        assert!(!m.fused_training());
        assert!(!m.attention_kernel());
        assert!(!m.norm_kernel());
        assert!(!m.layer_kernels());
        assert!(!m.draw_kernel());
        assert!(!m.backward_kernels());
        let parsed: ModelConfig = toml::from_str(
            "fused_sampling = \"on\"\ncuda_graphs = \"off\"\nprompt_sharing = \"on\"\nfused_training = \"off\"\nconv_kernel = \"on\"\ndraw_kernel = \"on\"",
        )
        .unwrap();
        assert_eq!(parsed.conv_kernel, Toggle::On);
        assert_eq!(parsed.draw_kernel, Toggle::On);
        assert_eq!(parsed.fused_training, Toggle::Off);
        assert_eq!(parsed.fused_sampling, Toggle::On);
        assert_eq!(parsed.cuda_graphs, Toggle::Off);
        assert_eq!(parsed.prompt_sharing, Toggle::On);
        assert_eq!("off".parse::<Toggle>(), Ok(Toggle::Off));
        assert!("yes".parse::<Toggle>().unwrap_err().contains("yes"));
    }

    #[test]
    fn the_command_line_wins_and_bad_values_name_their_source() {
        let c = ModelConfig::default();
        let p = c.resolve(None, None).unwrap();
        assert!(p.device.is_cpu());
        assert_eq!(p.dtype, DType::F32);
        let half = ModelConfig {
            dtype: "bf16".into(),
            ..c.clone()
        };
        assert_eq!(half.resolve(None, None).unwrap().dtype, DType::BF16);
        assert_eq!(half.resolve(None, Some("f32")).unwrap().dtype, DType::F32);
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
