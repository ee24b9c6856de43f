//! `pairuni bench gpu-step` and `pairuni bench gpu-parity`: the GPU path's two measurements (docs/GPU.md).
//!
//! `gpu-step` times one PairGRPO step at Janus-Pro-1B shapes with random weights through the same library calls
//! the trainer makes (CFG image rollouts, text rollouts, VQ decode, teacher-forced log-probs, GRPO loss, backward,
//! AdamW on the language model). `scripts/torch_step_bench.py` does the same step in PyTorch, and
//! `scripts/device-bench.sh` runs both on one card. `gpu-parity` loads the committed Janus fixture checkpoint on
//! a device in f32 and bf16 and compares its outputs with the fixture's reference values.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::backprop::GradStore;
use pairuni_model::config::{Placement, Toggle};
use pairuni_model::device::{default_dtype, next_tensor_id, parse_dtype, DeviceSpec};
use pairuni_model::graphs::GraphReport;
use pairuni_model::image_codec::{vq_config, ImageCodec};
use pairuni_model::llama::WIDTH_STEP;
use pairuni_model::vq::JanusVq;
use pairuni_model::{
    CfgLogprobPolicy, DType, Device, ImageRollout, ImageSampling, Janus, JanusConfig, KvCache,
    ParamSelection, SamplerSite, SharedScoring, Tensor, TextRollout, TextSampling,
};
use pairuni_rl::config::{LossAggregation, OptimConfig, RewardScaling};
use pairuni_rl::loss::{
    clipped_surrogate, group_advantages, micro_batch_loss, ratio, Counts, Tokens,
};
use pairuni_rl::optim::{accumulate_grads, AdamW};
use pairuni_rl::passes::{bind_device, concurrent_passes, run_in_order, Merged, PassThreads};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// Where the image rollout mixes and draws (`auto`: on the device unless it is the CPU).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerArg {
    /// The library's choice.
    Auto,
    /// Logits to the host every step.
    Host,
    /// Draw and log-prob on the device (after the CFG mix, for images); image codes read back once, answer
    /// tokens each step.
    Device,
}

impl SamplerArg {
    fn site(self) -> SamplerSite {
        match self {
            Self::Auto => SamplerSite::Auto,
            Self::Host => SamplerSite::Host,
            Self::Device => SamplerSite::Device,
        }
    }
    /// The site `auto` resolves to on `dev` (top-p is off in this benchmark).
    fn resolved(self, dev: &Device) -> &'static str {
        match self {
            Self::Auto if dev.is_cpu() => "host",
            Self::Auto | Self::Device => "device",
            Self::Host => "host",
        }
    }
}

/// Model shapes for the step benchmark.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shapes {
    /// Janus-Pro-1B: LLaMA 2048 wide, 24 layers, 16 heads, FFN 5632, vocab 102400; SigLIP-L 384 px; VQ 16384×8.
    #[value(name = "janus-pro-1b")]
    JanusPro1b,
    /// A toy of the same structure (seconds on a CPU; for testing the benchmark itself).
    Tiny,
}

impl Shapes {
    fn name(self) -> &'static str {
        match self {
            Self::JanusPro1b => "janus-pro-1b",
            Self::Tiny => "tiny",
        }
    }

    /// The architecture, written as the config.json transformers would read (same numbers as torch_step_bench.py).
    pub fn config(self) -> anyhow::Result<JanusConfig> {
        let text = match self {
            Self::JanusPro1b => json!({
                "text_config": {
                    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 16384,
                    "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                    "bos_token_id": 100000, "eos_token_id": 100001, "pad_token_id": 100002
                },
                "vision_config": {
                    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 384,
                    "patch_size": 16, "projection_dim": 2048, "num_image_tokens": 576
                },
                "vq_config": {
                    "embed_dim": 8, "num_embeddings": 16384, "projection_dim": 2048, "image_token_embed_dim": 2048
                },
                "image_token_id": 100581,
                "tie_word_embeddings": false
            }),
            // Heads of 32, the smallest the one-query attention kernel takes, so that a CPU run with the kernels
            // emulated (`PAIRUNI_EMULATE_KERNELS=1`) goes through it too.
            Self::Tiny => json!({
                "text_config": {
                    "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                    "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 999
                },
                "vision_config": {
                    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64,
                    "patch_size": 16, "projection_dim": 64, "num_image_tokens": 16
                },
                "vq_config": {
                    "embed_dim": 8, "num_embeddings": 64, "base_channels": 32,
                    "channel_multiplier": [1, 1, 2, 2, 4], "num_res_blocks": 1, "latent_channels": 32,
                    "projection_dim": 64, "image_token_embed_dim": 64
                },
                "image_token_id": 1000,
                "tie_word_embeddings": false
            }),
        };
        Ok(JanusConfig::from_json_str(&text.to_string(), self.name())?)
    }
}

/// Arguments of `pairuni bench gpu-step`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchGpuStepArgs {
    /// Device: cpu | cuda | cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Model shapes (weights are random either way).
    #[arg(long, value_enum, default_value = "janus-pro-1b")]
    pub shapes: Shapes,
    /// Language-model layers instead of the shapes' own (e.g. `--shapes tiny --text-layers 24` on the CPU counts
    /// the tensors a Janus-Pro step creates, which depend on the layer count, not the widths).
    #[arg(long)]
    pub text_layers: Option<usize>,
    /// Weight/activation dtype: f32 | bf16 | f16 (default bf16 on CUDA, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Pairs per step (each pair = one generation task + one understanding task).
    #[arg(long, default_value_t = 2)]
    pub pairs: usize,
    /// Rollouts per task.
    #[arg(long, default_value_t = 8)]
    pub group: usize,
    /// Answer length in tokens (sampling stops early only if the model samples end-of-sequence).
    #[arg(long, default_value_t = 64)]
    pub answer_tokens: usize,
    /// Generation prompt length, including BOS and begin-of-image.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Question tokens around the image placeholder run.
    #[arg(long, default_value_t = 32)]
    pub question_len: usize,
    /// Classifier-free guidance weight.
    #[arg(long, default_value_t = 5.0)]
    pub cfg_weight: f64,
    /// Sampling temperature (also used for the teacher-forced log-probs).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Top-p nucleus of both rollouts' draws, in (0, 1] (1 = off; on a device only the draw kernel keeps to it
    /// without reading the logits back).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// After the step, time the image and answer rollouts once more with this top-p (reported as
    /// `top_p_compare`; not fatal): what the nucleus costs.
    #[arg(long)]
    pub compare_top_p: Option<f64>,
    /// Rollouts per forward/backward in the train step (gradients are accumulated).
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    /// Micro-batch passes in flight at once, each from its own host thread (`[train] concurrent_passes`; 0 =
    /// auto: 1 on accelerators, one per core on the CPU).
    #[arg(long, default_value_t = 0)]
    pub concurrent_passes: usize,
    /// After the timed step, run its train phase again with each of `--compare-pass-counts` other than the
    /// step's own, and report them (`train_others`; `train_other` is the first).
    #[arg(long)]
    pub compare_concurrent_passes: bool,
    /// The thread counts `--compare-concurrent-passes` runs the train phase with (one thread also reports its
    /// split into parts).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4])]
    pub compare_pass_counts: Vec<usize>,
    /// After the timed step, run its train phase again with each of these micro-batch sizes (rollouts per pass;
    /// the step's own thread count), reported as `train_micro_batches`: on a host-bound device, twice the rows
    /// per pass is half the passes and about half the ops.
    #[arg(long, value_delimiter = ',')]
    pub compare_micro_batches: Vec<usize>,
    /// The training kernels' RMSNorm backward as one CUDA kernel (`[model] norm_kernel`, checked against the
    /// composed backward at its first call): on | off (auto: the model's default, on CUDA devices).
    #[arg(long, default_value = "auto")]
    pub norm_kernel: Toggle,
    /// Each variable's AdamW update as one CUDA kernel (`[*.optim] fused`, checked against the composed update at
    /// its first call): on | off (auto: on; it acts on CUDA devices only).
    #[arg(long, default_value = "auto")]
    pub fused_adamw: Toggle,
    /// AdamW learning rate (the paper's 1e-6 at 1B).
    #[arg(long, default_value_t = 1e-6)]
    pub lr: f64,
    /// Seed of the weights, prompts, sampling and rewards.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip the untimed warm-up (kernel loading, cuBLAS handles) before the timed step.
    #[arg(long)]
    pub no_warmup: bool,
    /// Before the step, time this many CFG image decode steps split into device forward, logits download and
    /// host sampling (0 = skip).
    #[arg(long, default_value_t = 32)]
    pub probe_steps: usize,
    /// Where the image rollout samples: auto (device unless CPU) | host | device.
    #[arg(long, value_enum, default_value_t = SamplerArg::Auto)]
    pub image_sampler: SamplerArg,
    /// Where the answer rollout draws: auto (device unless CPU) | host | device.
    #[arg(long, value_enum, default_value_t = SamplerArg::Auto)]
    pub text_sampler: SamplerArg,
    /// Kernels of the sampling forwards: auto (fused unless CPU) | on | off. The probe times both either way.
    #[arg(long, default_value = "auto")]
    pub fused_sampling: Toggle,
    /// With the fused kernels, run q/k/v and gate/up as one stacked batched matmul each: on | off (auto: on).
    #[arg(long, default_value = "auto")]
    pub stack_projections: Toggle,
    /// Teacher-forced passes (the train phase) through candle's fused RMSNorm, rotary and softmax kernels with
    /// hand-written backwards: on | off (auto: the model's default, on accelerators).
    #[arg(long, default_value = "auto")]
    pub fused_training: Toggle,
    /// One-query attention of fused-kernel decode steps as one CUDA kernel (checked against an f32 reference at
    /// its first call, and turned off if they differ): on | off (auto: the model's default, on CUDA devices).
    #[arg(long, default_value = "auto")]
    pub attention_kernel: Toggle,
    /// Residual add + RMSNorm, SiLU · gate and rotary + cache write of sampling forwards as one CUDA kernel each (checked
    /// against candle's ops at their first call): on | off (auto: the model's default, on CUDA devices).
    #[arg(long, default_value = "auto")]
    pub layer_kernels: Toggle,
    /// The VQ's k×k convolutions as one hand-written im2col kernel and one batched matmul (checked against
    /// candle's conv2d at its first call): on | off (auto: on; it acts on CUDA devices only).
    #[arg(long, default_value = "auto")]
    pub conv_kernel: Toggle,
    /// The device samplers' draws (CFG mix or banned-token bias, Gumbel noise made from a counter, argmax, the
    /// drawn class's log-prob) as one CUDA kernel (checked against candle's ops on the same noise at its first
    /// call): on | off (auto: the model's default, on CUDA devices).
    #[arg(long, default_value = "auto")]
    pub draw_kernel: Toggle,
    /// The training kernels' SiLU · gate and attention softmax backwards as one CUDA kernel each (checked against
    /// the composed backwards at their first call): on | off (auto: the model's default, on CUDA devices).
    #[arg(long, default_value = "auto")]
    pub backward_kernels: Toggle,
    /// Image and answer rollouts in fixed-shape steps captured as CUDA graphs: on | off | auto, which is on for
    /// the step when the graph check before it passes (a CUDA device, every width captured, the codes and the
    /// answer tokens bit-identical to the same steps run eagerly) and off otherwise.
    #[arg(long, default_value = "auto")]
    pub cuda_graphs: Toggle,
    /// After the step, time the image and answer rollouts once more with the other `--cuda-graphs` setting
    /// (reported as `rollout_image_other`; a failure there is reported, not fatal).
    #[arg(long)]
    pub compare_graphs: bool,
    /// Answer rollouts of one question share its prompt's forward in the rollout's prefill and the teacher-forced
    /// pass: on | off | auto (the model's default: on accelerators).
    #[arg(long, default_value = "auto")]
    pub prompt_sharing: Toggle,
    /// After the step, time the answer rollout and the answers' teacher-forced pass (forward and backward, no
    /// optimiser step) with prompt sharing on and off (reported as `prompt_sharing_compare`; not fatal).
    #[arg(long)]
    pub compare_sharing: bool,
    /// After the step, time the image and answer rollouts once more with the decode-attention kernel switched the
    /// other way (reported as `attention_kernel_compare`; not fatal).
    #[arg(long)]
    pub compare_attention_kernel: bool,
    /// After the step, time the image and answer rollouts once more with the layer kernels switched the other
    /// way (reported as `layer_kernels_compare`; not fatal).
    #[arg(long)]
    pub compare_layer_kernels: bool,
    /// After the step, time the VQ decode of as many images once more with the convolution kernel switched the
    /// other way (reported as `conv_kernel_compare`; not fatal).
    #[arg(long)]
    pub compare_conv_kernel: bool,
    /// After the step, time the image and answer rollouts once more with the draw kernel switched the other way
    /// (reported as `draw_kernel_compare`; not fatal).
    #[arg(long)]
    pub compare_draw_kernel: bool,
    /// Phases of the step (rollout_image, rollout_text, decode_vq, train) to hand to a kernel profiler started
    /// with profiling off (`ncu --profile-from-start off`): each runs between cuProfilerStart and cuProfilerStop,
    /// opening with one `usqrt_f64` kernel that marks where its kernels begin.
    #[arg(long, value_delimiter = ',')]
    pub profile_phases: Vec<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl BenchGpuStepArgs {
    /// The image rollouts' sampling settings.
    fn image_sampling(&self) -> ImageSampling {
        ImageSampling {
            cfg_weight: self.cfg_weight,
            temperature: self.temperature,
            top_p: self.top_p,
        }
    }

    /// The answer rollouts' sampling settings for `max_new_tokens`.
    fn text_sampling(&self, max_new_tokens: usize) -> TextSampling {
        TextSampling {
            max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            greedy: false,
        }
    }
}

/// Phase timer that synchronises the device so that queued kernels are counted in the phase that queued them.
struct Phases {
    device: Device,
    ms: Vec<(&'static str, f64)>,
    /// Phases run inside a profiler range.
    profiled: Vec<String>,
}

impl Phases {
    /// No phase timed yet on `device`; none of them in a profiler range.
    fn on(device: &Device) -> Self {
        Self {
            device: device.clone(),
            ms: Vec::new(),
            profiled: Vec::new(),
        }
    }

    fn time<T>(
        &mut self,
        name: &'static str,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let profiled = self.profiled.iter().any(|p| p == name);
        self.device.synchronize()?;
        if profiled {
            profiler_range(&self.device, true)?;
        }
        let t0 = Instant::now();
        tracing::info!(phase = name, "start");
        let out = f().with_context(|| format!("phase {name}"))?;
        self.device.synchronize()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if profiled {
            profiler_range(&self.device, false)?;
        }
        tracing::info!(phase = name, ms = format!("{ms:.1}"), "done");
        self.ms.push((name, ms));
        Ok(out)
    }

    fn get(&self, name: &str) -> f64 {
        self.ms
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, m)| m)
            .sum()
    }
}

/// Starts (with its marker kernel) or stops a profiler range; nothing off CUDA.
fn profiler_range(device: &Device, start: bool) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
        if start {
            profiler_start().context("cuProfilerStart")?;
            // A kernel no step launches, so that a profile's kernels can be split by phase.
            Tensor::new(&[2f64], device)?.sqrt()?;
        } else {
            device.synchronize()?;
            profiler_stop().context("cuProfilerStop")?;
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (device, start);
    Ok(())
}

fn random_ids(rng: &mut ChaCha8Rng, n: usize, lo: u32, hi: u32) -> Vec<u32> {
    (0..n).map(|_| lo + rng.next_u32() % (hi - lo)).collect()
}

/// Prompts and images of one step: `pairs` tasks per side, each repeated `group` times.
struct StepInputs {
    gen_prompts: Vec<Vec<u32>>,
    und_prompts: Vec<Vec<u32>>,
    pixels: Vec<Tensor>,
}

fn step_inputs(
    cfg: &JanusConfig,
    a: &BenchGpuStepArgs,
    dev: &Device,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<StepInputs> {
    let t = &cfg.text_config;
    let bos = t.bos_token_id.unwrap_or(1);
    // Ordinary text ids: clear of the specials Janus keeps at the top of its vocabulary and of the image id.
    let hi = (cfg.image_token_id.min(t.vocab_size as u32))
        .saturating_sub(1)
        .min(100_000);
    let lo = 10;
    let boi = lo - 1; // a fixed id standing in for <begin_of_image>
    let n_img = cfg.vision_config.num_image_tokens;
    let size = cfg.vision_config.image_size;
    let (mut gen_prompts, mut und_prompts, mut pixels) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.pairs {
        let mut g = vec![bos];
        g.extend(random_ids(rng, a.prompt_len.saturating_sub(2), lo, hi));
        g.push(boi);
        let q = random_ids(rng, a.question_len, lo, hi);
        let split = q.len().min(4);
        let mut u = vec![bos];
        u.extend_from_slice(&q[..split]);
        u.extend(std::iter::repeat_n(cfg.image_token_id, n_img));
        u.extend_from_slice(&q[split..]);
        let px: Vec<f32> = (0..3 * size * size)
            .map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0)
            .collect();
        let px = Tensor::from_vec(px, (3, size, size), dev)?;
        for _ in 0..a.group {
            gen_prompts.push(g.clone());
            und_prompts.push(u.clone());
            pixels.push(px.clone());
        }
    }
    Ok(StepInputs {
        gen_prompts,
        und_prompts,
        pixels,
    })
}

/// Random-weight model with a random-weight Janus VQ (its values do not change the work done).
///
/// The VQ runs in the model's dtype on CUDA (bf16 convolutions, as PyTorch's side does) and in f32 on CPU, whose
/// candle convolutions have no bf16 kernel.
fn build_model(cfg: &JanusConfig, seed: u64, dev: &Device, dtype: DType) -> anyhow::Result<Janus> {
    let vm = candle_nn::VarMap::new();
    let vq_dtype = if dev.is_cpu() { DType::F32 } else { dtype };
    let vb = candle_nn::VarBuilder::from_varmap(&vm, vq_dtype, dev);
    let vq =
        JanusVq::new(&vq_config(cfg), vb.pp("model.vqmodel")).context("building the random VQ")?;
    Ok(Janus::new_random(
        cfg,
        None,
        Some(ImageCodec::Vq(Box::new(vq))),
        seed,
        dev,
        dtype,
    )?)
}

/// Where the train phase's host time goes: milliseconds of host time and tensors created (about one kernel launch
/// each) per part, summed over micro-batches. Nothing is synchronised at a mark, so the phase keeps the overlap of
/// host and device it has without the split: host milliseconds that add up to about the phase's time say it is
/// bound by the host (candle's per-op cost), a phase much longer than their sum says the device.
struct TrainSplit {
    last: Instant,
    last_id: usize,
    parts: Vec<(&'static str, f64, usize)>,
}

impl TrainSplit {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            last: Instant::now(),
            last_id: next_tensor_id()?,
            parts: Vec::new(),
        })
    }

    /// Books the host time and tensors since the previous mark to `part`.
    fn mark(&mut self, part: &'static str) -> anyhow::Result<()> {
        let id = next_tensor_id()?;
        let ms = self.last.elapsed().as_secs_f64() * 1e3;
        let tensors = id.saturating_sub(self.last_id + 1);
        match self.parts.iter_mut().find(|(p, _, _)| *p == part) {
            Some(entry) => {
                entry.1 += ms;
                entry.2 += tensors;
            }
            None => self.parts.push((part, ms, tensors)),
        }
        self.last = Instant::now();
        self.last_id = id;
        Ok(())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.parts
                .iter()
                .map(|(p, ms, n)| {
                    (
                        p.to_string(),
                        json!({ "host_ms": round1(*ms), "tensors": n }),
                    )
                })
                .collect(),
        )
    }
}

/// What one timed step produced besides timings.
struct StepOutcome {
    /// The step itself (rollouts, decode, train), without the comparisons run after it on the same rollouts.
    step_ms: f64,
    /// The device pool's high-water marks at the step's end (CUDA only): the process's peak up to then, as
    /// PyTorch's `max_memory_allocated` is its script's.
    pool_memory: Option<pairuni_model::device::PoolMemory>,
    /// The train phase, part by part (one thread only).
    train_split: serde_json::Value,
    /// Micro-batch passes in flight at once in the train phase.
    concurrent_passes: usize,
    /// The train phase again with the first other thread count (`--compare-concurrent-passes`).
    train_other: serde_json::Value,
    /// The train phase again with each other thread count.
    train_others: serde_json::Value,
    /// The train phase again with each other micro-batch size (`--compare-micro-batches`).
    train_micro_batches: serde_json::Value,
    image_tokens: usize,
    answer_tokens_mean: f64,
    grad_norm: f32,
    params_with_grad: usize,
    params_trained: usize,
    loss: f32,
    images: usize,
    /// How far the sampling-time log-probs are from the teacher-forced ones, per modality.
    gap_image: LogprobGap,
    gap_text: LogprobGap,
}

/// |log-prob at sampling − teacher-forced log-prob| over the tokens of a step: the two are the same
/// distribution computed two ways (one token at a time through the sampler's kernels and cache, and all at once
/// through the differentiable ops), so on a correct path they differ by rounding only (≈ 1e-5 in f32, a few 1e-2
/// in bf16); a fault in a sampling path shows up as a gap of nats.
#[derive(Debug, Default, Clone, Copy)]
struct LogprobGap {
    sum: f64,
    count: usize,
    max: f32,
}

impl LogprobGap {
    /// The gap over micro-batches of (teacher-forced, sampled, mask) [b, t], mask 1 on the tokens.
    fn of(scored: &[(Tensor, Tensor, Tensor)]) -> anyhow::Result<Self> {
        let mut gap = Self::default();
        for (lp, old, mask) in scored {
            let diff = (lp - old)?.abs()?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let mask = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (d, m) in diff.iter().flatten().zip(mask.iter().flatten()) {
                if *m > 0.0 {
                    gap.sum += f64::from(*d);
                    gap.count += 1;
                    gap.max = gap.max.max(*d);
                }
            }
        }
        Ok(gap)
    }

    fn json(&self) -> serde_json::Value {
        json!({ "mean": self.sum / self.count.max(1) as f64, "max": self.max, "tokens": self.count })
    }
}

fn run_step(
    model: &Janus,
    opt: &mut AdamW,
    inputs: &StepInputs,
    a: &BenchGpuStepArgs,
    max_answer: usize,
    rng: &mut ChaCha8Rng,
    ph: &mut Phases,
) -> anyhow::Result<StepOutcome> {
    let cfg = model.config().clone();
    let img_s = a.image_sampling();
    let txt_s = a.text_sampling(max_answer);
    let t_step = Instant::now();
    let images: Vec<ImageRollout> = ph.time("rollout_image", || {
        Ok(model.sample_image_codes_at(
            &inputs.gen_prompts,
            &img_s,
            model.image_tokens_per_image(),
            a.image_sampler.site(),
            rng,
        )?)
    })?;
    let mut answers: Vec<TextRollout> = ph.time("rollout_text", || {
        Ok(model.sample_answers_ids_at(
            &inputs.pixels,
            &inputs.und_prompts,
            &txt_s,
            a.text_sampler.site(),
            rng,
        )?)
    })?;
    clear_image_ids(&mut answers, cfg.image_token_id);
    let decoded = ph.time("decode_vq", || {
        let codes: Vec<Vec<u32>> = images.iter().map(|r| r.codes.clone()).collect();
        Ok(model.decode_codes(&codes)?)
    })?;
    // Rewards come from reward models in training; random here (their cost is not what this measures).
    let r_img: Vec<f32> = (0..images.len())
        .map(|_| (rng.next_u32() % 1000) as f32 / 1000.0)
        .collect();
    let r_txt: Vec<f32> = (0..answers.len())
        .map(|_| (rng.next_u32() % 2) as f32)
        .collect();
    let a_img = group_advantages(&r_img, a.group, RewardScaling::Std).values;
    let a_txt = group_advantages(&r_txt, a.group, RewardScaling::Std).values;

    let threads = concurrent_passes(a.concurrent_passes, model.device()).count;
    let train = ph.time("train", || {
        train_phase(model, opt, &images, &answers, (&a_img, &a_txt), a, threads)
    })?;
    // `Phases::time` synchronised the device after the train phase, so this is the step's wall time; the
    // comparisons below must stay out of it (until the eighteenth session they were in, inflating the total).
    let step_ms = t_step.elapsed().as_secs_f64() * 1e3;
    let pool_memory = pairuni_model::device::pool_memory(model.device());
    if let Some(split) = &train.split {
        tracing::info!(%split, "train phase split");
    }
    // With `--compare-concurrent-passes`, the train phase again on the same rollouts with each other thread count
    // (each its own optimiser step: the weights move by one more step of lr).
    let mut train_others = Vec::new();
    if a.compare_concurrent_passes {
        let mut counts: Vec<usize> = Vec::new();
        for &c in &a.compare_pass_counts {
            if c >= 1 && c != threads && !counts.contains(&c) {
                counts.push(c);
            }
        }
        for other in counts {
            model.device().synchronize()?;
            let t0 = Instant::now();
            let again = train_phase(model, opt, &images, &answers, (&a_img, &a_txt), a, other)?;
            model.device().synchronize()?;
            train_others.push(json!({
                "concurrent_passes": other,
                "train": round1(t0.elapsed().as_secs_f64() * 1e3),
                "train_split": again.split.unwrap_or(serde_json::Value::Null),
            }));
        }
    }
    // With `--compare-micro-batches`, the same with other micro-batch sizes.
    let mut train_micro_batches = Vec::new();
    for &mb in &a.compare_micro_batches {
        if mb == 0 || mb == a.micro_batch {
            continue;
        }
        let with_mb = BenchGpuStepArgs {
            micro_batch: mb,
            ..a.clone()
        };
        model.device().synchronize()?;
        let t0 = Instant::now();
        train_phase(
            model,
            opt,
            &images,
            &answers,
            (&a_img, &a_txt),
            &with_mb,
            threads,
        )?;
        model.device().synchronize()?;
        train_micro_batches.push(json!({
            "micro_batch": mb,
            "concurrent_passes": threads,
            "train": round1(t0.elapsed().as_secs_f64() * 1e3),
        }));
    }
    Ok(StepOutcome {
        step_ms,
        pool_memory,
        train_micro_batches: serde_json::Value::Array(train_micro_batches),
        train_split: train.split.unwrap_or(serde_json::Value::Null),
        concurrent_passes: threads,
        train_other: train_others
            .first()
            .cloned()
            .unwrap_or(serde_json::Value::Null),
        train_others: serde_json::Value::Array(train_others),
        gap_image: LogprobGap::of(&train.scored_image)?,
        gap_text: LogprobGap::of(&train.scored_text)?,
        image_tokens: images.first().map_or(0, |r| r.codes.len()),
        answer_tokens_mean: answers.iter().map(|r| r.answer_ids.len()).sum::<usize>() as f64
            / answers.len().max(1) as f64,
        grad_norm: train.grad_norm,
        params_with_grad: train.params_with_grad,
        params_trained: opt.vars().len(),
        loss: train.loss,
        images: decoded.len(),
    })
}

/// What the train phase produced.
struct TrainOutcome {
    loss: f32,
    grad_norm: f32,
    params_with_grad: usize,
    /// (teacher-forced, sampled, mask) per micro-batch of each modality, compared after the timed phase.
    scored_image: Vec<(Tensor, Tensor, Tensor)>,
    scored_text: Vec<(Tensor, Tensor, Tensor)>,
    /// Host time and tensors per part (one thread only: the parts of concurrent passes interleave).
    split: Option<serde_json::Value>,
}

/// One micro-batch pass's results.
struct PassResult {
    /// The pass's loss, on the device until the merge reads it.
    loss: Tensor,
    grads: GradStore,
    image: bool,
    scored: (Tensor, Tensor, Tensor),
}

/// The PairGRPO update on the step's rollouts, as `[train]` runs it: micro-batches of `--micro-batch` rollouts per
/// modality, each a forward and a backward pass (with the batch's loss denominators), `threads` passes in
/// flight at once and merged in pass order ([`pairuni_rl::passes`]), then one AdamW step.
fn train_phase(
    model: &Janus,
    opt: &mut AdamW,
    images: &[ImageRollout],
    answers: &[TextRollout],
    (a_img, a_txt): (&[f32], &[f32]),
    a: &BenchGpuStepArgs,
    threads: usize,
) -> anyhow::Result<TrainOutcome> {
    let vars = opt.vars().to_vec();
    let dev = model.device().clone();
    let mb = a.micro_batch.max(1);
    // The batch's counts, which fix each micro-batch's share of the loss.
    let n_img = Counts {
        tokens: images.iter().map(|r| r.codes.len()).sum::<usize>() as f32,
        rows: images.len(),
    };
    let n_txt = Counts {
        tokens: answers.iter().map(|r| r.answer_ids.len()).sum::<usize>() as f32,
        rows: answers.len(),
    };
    let per_modality = LossAggregation::ModalityTokenMean;
    // Passes: image micro-batches, then answer micro-batches, as (image?, index of the micro-batch).
    let passes: Vec<(bool, usize)> = (0..images.len().div_ceil(mb))
        .map(|i| (true, i))
        .chain((0..answers.len().div_ceil(mb)).map(|i| (false, i)))
        .collect();
    let split = if threads == 1 {
        Some(Mutex::new(TrainSplit::new()?))
    } else {
        None
    };
    let mark = |part: &'static str| -> anyhow::Result<()> {
        match &split {
            Some(s) => s
                .lock()
                .map_err(|_| anyhow::anyhow!("the train split's lock was poisoned"))?
                .mark(part),
            None => Ok(()),
        }
    };
    let run_pass = |k: usize| -> anyhow::Result<PassResult> {
        let (image, i) = passes[k];
        // Per-modality token mean (METHOD.md default); micro-batch losses are scaled so that their gradients sum
        // to the full batch's.
        let (lp, old, mask, adv, n) = if image {
            let chunk = &images[i * mb..((i + 1) * mb).min(images.len())];
            let lp =
                model.image_logprobs_at(chunk, CfgLogprobPolicy::Conditional, a.temperature)?;
            mark("image_forward")?;
            let old = old_logprobs(
                chunk.iter().map(|r| r.logprobs.as_slice()),
                lp.dims2()?,
                &dev,
            )?;
            let adv = Tensor::new(&a_img[i * mb..i * mb + chunk.len()], &dev)?;
            let mask = lp.ones_like()?;
            (lp, old, mask, adv, n_img)
        } else {
            let chunk = &answers[i * mb..((i + 1) * mb).min(answers.len())];
            let (lp, mask) = model.answer_logprobs_at(chunk, a.temperature)?;
            mark("text_forward")?;
            let old = old_logprobs(
                chunk.iter().map(|r| r.logprobs.as_slice()),
                lp.dims2()?,
                &dev,
            )?;
            let adv = Tensor::new(&a_txt[i * mb..i * mb + chunk.len()], &dev)?;
            (lp, old, mask, adv, n_txt)
        };
        let s = clipped_surrogate(&ratio(&lp, &old)?, &adv, 0.2, 0.28)?;
        let part = Tokens {
            values: &s.loss,
            mask: &mask,
            max_len: lp.dim(1)?,
        };
        let loss = micro_batch_loss(&part, per_modality, n, n_img + n_txt)?;
        mark(if image { "image_loss" } else { "text_loss" })?;
        let mut grads = GradStore::default();
        accumulate_grads(&mut grads, loss.backward()?, &vars)?;
        mark(if image {
            "image_backward"
        } else {
            "text_backward"
        })?;
        // As the trainer does: nothing is read back in the pass; the merge reads the loss.
        Ok(PassResult {
            loss: loss.detach(),
            grads,
            image,
            scored: (lp.detach(), old, mask),
        })
    };
    let mut grads = GradStore::default();
    let (mut loss, mut scored_image, mut scored_text) = (0f32, Vec::new(), Vec::new());
    run_in_order(
        passes.len(),
        PassThreads::on(&dev, threads),
        bind_device(&dev),
        run_pass,
        |_, pass| {
            loss += pass.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            accumulate_grads(&mut grads, pass.grads, &vars)?;
            if pass.image {
                scored_image.push(pass.scored);
            } else {
                scored_text.push(pass.scored);
            }
            Ok(Merged::Continue)
        },
    )?;
    let params_with_grad = vars
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
        .count();
    mark("grad_count")?;
    let info = opt.step(&grads, a.lr)?;
    mark("optimizer")?;
    let split = match split {
        Some(s) => Some(
            s.into_inner()
                .map_err(|_| anyhow::anyhow!("the train split's lock was poisoned"))?
                .json(),
        ),
        None => None,
    };
    Ok(TrainOutcome {
        loss,
        grad_norm: info.grad_norm,
        params_with_grad,
        scored_image,
        scored_text,
        split,
    })
}

/// Swaps the image placeholder id out of sampled answers: a random-weight model can sample it (p ≈ 1e-5 per token),
/// and teacher forcing would then read it as an image slot; a trained model never does.
fn clear_image_ids(answers: &mut [TextRollout], image_token_id: u32) {
    for r in answers {
        for t in &mut r.answer_ids {
            if *t == image_token_id {
                *t = 10;
            }
        }
    }
}

/// Sampling-time log-probs as a [B, T] f32 tensor (rows shorter than T padded with 0; the mask drops them).
fn old_logprobs<'a>(
    rows: impl Iterator<Item = &'a [f32]>,
    (b, t): (usize, usize),
    dev: &Device,
) -> anyhow::Result<Tensor> {
    let mut flat = Vec::with_capacity(b * t);
    for r in rows {
        flat.extend(r.iter().take(t));
        flat.extend(std::iter::repeat_n(0f32, t.saturating_sub(r.len())));
    }
    Ok(Tensor::from_vec(flat, (b, t), dev)?)
}

/// Runs `pairuni bench gpu-step`.
pub fn run_bench_gpu_step(a: BenchGpuStepArgs) -> anyhow::Result<ExitCode> {
    if a.pairs == 0 || a.group < 2 {
        bail!("--pairs must be ≥ 1 and --group ≥ 2 (advantages need a group)");
    }
    if a.prompt_len < 2 || a.answer_tokens == 0 {
        bail!("--prompt-len must be ≥ 2 and --answer-tokens ≥ 1");
    }
    for (flag, p) in [
        ("--top-p", Some(a.top_p)),
        ("--compare-top-p", a.compare_top_p),
    ] {
        if p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            bail!("{flag} must be in (0, 1], got {}", p.unwrap_or_default());
        }
    }
    let spec: DeviceSpec = a.device.parse()?;
    let dev = spec.open()?;
    let dtype = match &a.dtype {
        Some(s) => parse_dtype(s)?,
        None => default_dtype(&dev),
    };
    let mut cfg = a.shapes.config()?;
    if let Some(n) = a.text_layers {
        cfg.text_config.num_hidden_layers = n;
    }
    let answer_tokens = if a.shapes == Shapes::Tiny {
        a.answer_tokens.min(8)
    } else {
        a.answer_tokens
    };
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);

    let t0 = Instant::now();
    let mut model = build_model(&cfg, a.seed, &dev, dtype)?;
    Placement {
        device: dev.clone(),
        dtype,
        fused_sampling: a.fused_sampling,
        cuda_graphs: a.cuda_graphs,
        prompt_sharing: a.prompt_sharing,
        fused_training: a.fused_training,
        attention_kernel: a.attention_kernel,
        norm_kernel: a.norm_kernel,
        layer_kernels: a.layer_kernels,
        conv_kernel: a.conv_kernel,
        draw_kernel: a.draw_kernel,
        backward_kernels: a.backward_kernels,
    }
    .configure(&mut model);
    if let Some(on) = a.stack_projections.forced() {
        model.set_stack_projections(on);
    }
    dev.synchronize()?;
    let init_ms = t0.elapsed().as_secs_f64() * 1e3;
    tracing::info!(
        ms = format!("{init_ms:.0}"),
        "random {} model built",
        a.shapes.name()
    );
    let vars = model.select_trained(&ParamSelection::LanguageModel);
    let optim = OptimConfig {
        lr: a.lr,
        fused: a.fused_adamw,
        ..OptimConfig::default()
    };
    let mut opt = AdamW::new(vars, &optim)?;
    let inputs = step_inputs(&cfg, &a, &dev, &mut rng)?;

    if !a.no_warmup {
        // Loads every kernel module and creates the cuBLAS handles outside the timed step, and runs one train
        // phase at the step's sizes so that the timed one finds its memory pooled (PyTorch's script warms up with
        // a whole step). A whole warm-up step would double the run; the rollouts here are short ones.
        let t = Instant::now();
        let threads = concurrent_passes(a.concurrent_passes, model.device()).count;
        warmup(&model, &mut opt, &inputs, &a, answer_tokens, threads)?;
        tracing::info!(
            ms = format!("{:.0}", t.elapsed().as_secs_f64() * 1e3),
            "warm-up done"
        );
    }

    let probe = if a.probe_steps > 0 {
        let p = probe_image_step(&mut model, &inputs.gen_prompts, a.cfg_weight, a.probe_steps)?;
        tracing::info!(probe = %p, "image decode step split");
        p
    } else {
        serde_json::Value::Null
    };

    // The check runs on every device (it is cheap at tiny shapes, and CI exercises it); only a CUDA device can
    // pass it, since elsewhere nothing is captured.
    let graph_check = check_graphs(&mut model, &inputs, &a)?;
    if a.cuda_graphs == Toggle::Auto {
        model.set_static_decode(graph_check["pass"] == true);
    }
    let mut ph = Phases {
        profiled: a.profile_phases.clone(),
        ..Phases::on(&dev)
    };
    let out = run_step(
        &model,
        &mut opt,
        &inputs,
        &a,
        answer_tokens,
        &mut rng,
        &mut ph,
    )?;
    let total = out.step_ms;
    let per_step = ph.get("rollout_image") / out.image_tokens.max(1) as f64;
    let graphs_in_step = model.static_decode();
    let step_graph_report = graph_report_json(&model);
    let step_answer_graph_report = json!(model.last_answer_graph_report());
    if a.compare_graphs {
        // The comparison runs code that a GPU has not run before: the step's numbers go to the log first.
        tracing::info!(
            total_ms = format!("{total:.1}"),
            rollout_image_ms = format!("{:.1}", ph.get("rollout_image")),
            ms_per_image_step = format!("{per_step:.3}"),
            "step measured; timing the rollouts with the other --cuda-graphs setting"
        );
    }
    // The rollouts again with one switch flipped, for each comparison asked for.
    let mut flipped = |asked: bool, switch: Switch| {
        if asked {
            rollouts_with_switch_flipped(&mut model, &inputs, &a, answer_tokens, &mut rng, switch)
        } else {
            serde_json::Value::Null
        }
    };
    let other = flipped(a.compare_graphs, GRAPHS);
    let attention_compare = flipped(a.compare_attention_kernel, ATTENTION_KERNEL);
    let layer_compare = flipped(a.compare_layer_kernels, LAYER_KERNELS);
    let draw_compare = flipped(a.compare_draw_kernel, DRAW_KERNEL);
    let top_p_compare = match a.compare_top_p {
        Some(top_p) => {
            let at = BenchGpuStepArgs { top_p, ..a.clone() };
            let mut out = time_rollouts(&mut model, &inputs, &at, answer_tokens, &mut rng);
            out["top_p"] = json!(top_p);
            out
        }
        None => serde_json::Value::Null,
    };
    let conv_compare = if a.compare_conv_kernel {
        decode_with_conv_kernel_flipped(&model, a.pairs * a.group)
    } else {
        serde_json::Value::Null
    };
    let sharing_compare = if a.compare_sharing {
        use SharedScoring::{Auto, Cached};
        let mut with = |on, how| {
            answers_with_sharing(&mut model, &inputs, &a, answer_tokens, &mut rng, on, how)
        };
        json!({
            // Scored packed at the benchmark's shapes (`Janus::shared_scoring`'s auto), then in the cached form.
            "on": with(true, Auto),
            "on_cached": with(true, Cached),
            "off": with(false, Auto),
        })
    } else {
        serde_json::Value::Null
    };
    let result = json!({
        "impl": "candle",
        // Whether convolutions (the VQ decoder, the vision patch embedding) went through cuDNN.
        "cudnn": cfg!(feature = "cudnn"),
        // Whether a CUDA device's memory pool keeps freed memory (`PAIRUNI_CUDA_POOL=release` turns it off).
        "pool_keeps_memory": dev.is_cuda() && pairuni_model::device::pool_keeps_memory(),
        // GiB, as PyTorch's `peak_mem_gib`: `used_high` is its like (live tensors), `reserved_high` what the card
        // shows in use (the pool keeps what it frees).
        "pool_memory": out.pool_memory.map(|m| {
            let gib = |b: u64| (b as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0;
            json!({
                "used_high_gib": gib(m.used_high),
                "reserved_high_gib": gib(m.reserved_high),
                "reserved_now_gib": gib(m.reserved_now),
            })
        }),
        // How the linked candle's backward starts each gradient ("first contribution" in the CUDA builds, whose
        // candle scripts/patch-candle.sh patches; "zeros" as published or under PAIRUNI_GRAD_ACCUMULATE=zeros).
        "grad_accumulation": pairuni_model::device::grad_accumulation()?.to_string(),
        "device": device_name(&dev),
        "shapes": a.shapes.name(),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "pairs": a.pairs,
        "group": a.group,
        "image_tokens": out.image_tokens,
        "image_tokens_full": cfg.image_tokens_per_image(),
        "answer_tokens": answer_tokens,
        "answer_tokens_mean": out.answer_tokens_mean,
        "rollout_image": round1(ph.get("rollout_image")),
        "rollout_text": round1(ph.get("rollout_text")),
        "decode_vq": round1(ph.get("decode_vq")),
        "train": round1(ph.get("train")),
        "total": round1(total),
        "total_full_estimate": round1(total),
        "ms_per_image_step": (per_step * 1000.0).round() / 1000.0,
        "init_ms": round1(init_ms),
        "images": out.images,
        "loss": out.loss,
        "grad_norm": out.grad_norm,
        "logprob_gap": { "image": out.gap_image.json(), "text": out.gap_text.json() },
        "train_split": out.train_split,
        "concurrent_passes": out.concurrent_passes,
        // The fused AdamW kernel after the step: unchecked (it did not run), trusted (its check passed) or off.
        "fused_adamw": pairuni_rl::fused_adamw::TRUST.status(),
        "fused_adamw_report": pairuni_rl::fused_adamw::TRUST.report(),
        // The RMSNorm backward kernel: whether it was asked for, and its state after the step.
        "norm_kernel": model.norm_kernel(),
        "norm_kernel_status": pairuni_model::norm_kernel::TRUST.status(),
        "norm_kernel_report": pairuni_model::norm_kernel::TRUST.report(),
        "train_other": out.train_other,
        "micro_batch": a.micro_batch,
        "train_others": out.train_others,
        "train_micro_batches": out.train_micro_batches,
        "params_with_grad": format!("{}/{}", out.params_with_grad, out.params_trained),
        "image_sampler": a.image_sampler.resolved(&dev),
        "text_sampler": a.text_sampler.resolved(&dev),
        "fused_sampling": model.fused_sampling(),
        "stack_projections": model.stack_projections(),
        "attention_kernel": model.attention_kernel(),
        "fused_training": model.fused_training(),
        "attention_kernel_report": pairuni_model::decode_attention::report(),
        "attention_kernel_compare": attention_compare,
        // The layer kernels: whether they were asked for, and each one's state and first-check difference.
        "layer_kernels": model.layer_kernels(),
        "layer_kernels_status": {
            "add_rms_norm": pairuni_model::layer_kernels::ADD_NORM.report(),
            "silu_mul": pairuni_model::layer_kernels::SILU_MUL.report(),
            "rope_store": pairuni_model::layer_kernels::ROPE_STORE.report(),
        },
        "layer_kernels_compare": layer_compare,
        "draw_kernel": model.draw_kernel(),
        "draw_kernel_report": pairuni_model::draw_kernel::TRUST.report(),
        "draw_kernel_compare": draw_compare,
        "top_p": a.top_p,
        "top_p_compare": top_p_compare,
        "backward_kernels": model.backward_kernels(),
        "backward_kernels_status": {
            "silu_mul": pairuni_model::backward_kernels::SILU_MUL.report(),
            "softmax": pairuni_model::backward_kernels::SOFTMAX.report(),
        },
        // The VQ's convolution kernel: whether it was asked for, its state, and decode_vq the other way.
        "conv_kernel": pairuni_model::conv_kernel::enabled(),
        "conv_kernel_report": pairuni_model::conv_kernel::IM2COL.report(),
        "conv_kernel_compare": conv_compare,
        "cuda_graphs": graphs_in_step,
        "prompt_sharing": model.prompt_sharing(),
        "prompt_sharing_compare": sharing_compare,
        "graph_report": step_graph_report,
        "answer_graph_report": step_answer_graph_report,
        "rollout_image_other": other,
        "graph_check": graph_check,
        "image_step_probe": probe,
    });
    if a.json {
        println!("{result}");
    } else {
        println!(
            "PairGRPO step, candle, {} on {} ({dtype:?})",
            a.shapes.name(),
            device_name(&dev)
        );
        for k in [
            "rollout_image",
            "rollout_text",
            "decode_vq",
            "train",
            "total",
        ] {
            println!(
                "  {k:<16} {:>10.1} ms",
                result[k].as_f64().unwrap_or(f64::NAN)
            );
        }
        println!(
            "  image step       {per_step:>10.3} ms  ({} codes, CFG batch {}, sampled on the {})",
            out.image_tokens,
            2 * a.pairs * a.group,
            a.image_sampler.resolved(&dev)
        );
        println!(
            "  grad norm        {:>10.4}  ({}/{} trained tensors got a gradient)",
            out.grad_norm, out.params_with_grad, out.params_trained
        );
        println!(
            "  gradients start from: {}",
            result["grad_accumulation"].as_str().unwrap_or("?")
        );
        // Each hand-written kernel asked for: its state after the step (the JSON has the check's difference).
        let kernels = [
            (
                "attention kernel",
                model.attention_kernel(),
                "attention_kernel_report",
            ),
            (
                "layer kernels",
                model.layer_kernels(),
                "layer_kernels_status",
            ),
            (
                "conv kernel",
                pairuni_model::conv_kernel::enabled(),
                "conv_kernel_report",
            ),
            ("draw kernel", model.draw_kernel(), "draw_kernel_report"),
            (
                "backward kernels",
                model.backward_kernels(),
                "backward_kernels_status",
            ),
        ];
        for (name, on, key) in kernels {
            if on {
                println!("  {name}: {}", result[key]);
            }
        }
        for (key, label) in [
            ("rollout_image_other", "rollouts, graphs the other way"),
            (
                "attention_kernel_compare",
                "rollouts, attention kernel the other way",
            ),
            (
                "layer_kernels_compare",
                "rollouts, layer kernels the other way",
            ),
            (
                "conv_kernel_compare",
                "decode_vq, conv kernel the other way",
            ),
            ("draw_kernel_compare", "rollouts, draw kernel the other way"),
            ("top_p_compare", "rollouts, another top-p"),
        ] {
            if !result[key].is_null() {
                println!("  {label}: {}", result[key]);
            }
        }
    }
    if !a.json && !probe.is_null() {
        println!("  image step probe {probe}");
    }
    if out.params_with_grad != out.params_trained || !out.grad_norm.is_finite() {
        eprintln!("error: not every trained tensor received a finite gradient");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The last image sampling call's graph report as JSON (null when it ran no static decode).
fn graph_report_json(model: &Janus) -> serde_json::Value {
    json!(model.last_graph_report())
}

/// One of the model's on/off switches: its JSON key, getter and setter.
type Switch = (&'static str, fn(&Janus) -> bool, fn(&mut Janus, bool));

/// The step's rollouts again with one of the model's switches the other way (`get`/`set`; restored after),
/// reported as `key`: the time of each (and the image rollout's per code) with its graph report, or the error it
/// ended with (so that a failing capture, replay or kernel does not cost the device call the step's own
/// measurement). The switches compared: `cuda_graphs`, `attention_kernel`, `layer_kernels` and `draw_kernel`.
fn rollouts_with_switch_flipped(
    model: &mut Janus,
    inputs: &StepInputs,
    a: &BenchGpuStepArgs,
    answer_tokens: usize,
    rng: &mut ChaCha8Rng,
    (key, get, set): Switch,
) -> serde_json::Value {
    let chosen = get(model);
    set(model, !chosen);
    let mut out = time_rollouts(model, inputs, a, answer_tokens, rng);
    set(model, chosen);
    out[key] = json!(!chosen);
    out
}

/// The CUDA-graph switch, for [`rollouts_with_switch_flipped`].
const GRAPHS: Switch = (
    "cuda_graphs",
    Janus::static_decode,
    Janus::set_static_decode,
);

/// The decode-attention kernel's switch, for [`rollouts_with_switch_flipped`].
const ATTENTION_KERNEL: Switch = (
    "attention_kernel",
    Janus::attention_kernel,
    Janus::set_attention_kernel,
);

/// The layer kernels' switch, for [`rollouts_with_switch_flipped`].
const LAYER_KERNELS: Switch = (
    "layer_kernels",
    Janus::layer_kernels,
    Janus::set_layer_kernels,
);

/// The draw kernel's switch, for [`rollouts_with_switch_flipped`].
const DRAW_KERNEL: Switch = ("draw_kernel", Janus::draw_kernel, Janus::set_draw_kernel);

/// The VQ decode of `images` code grids timed with the convolution kernel switched the other way (restored
/// after); a failure is reported, not fatal. The codes are a fixed pattern: the decode's time does not depend on
/// them.
fn decode_with_conv_kernel_flipped(model: &Janus, images: usize) -> serde_json::Value {
    use pairuni_model::conv_kernel;
    let chosen = conv_kernel::enabled();
    let k = model.config().vq_config.num_embeddings.max(1);
    let n = model.image_tokens_per_image();
    let codes: Vec<Vec<u32>> = (0..images)
        .map(|i| (0..n).map(|j| ((i * n + j) * 7919 % k) as u32).collect())
        .collect();
    let mut ph = Phases::on(model.device());
    let decoded = conv_kernel::with_enabled(!chosen, || {
        ph.time("decode_vq", || Ok(model.decode_codes(&codes)?))
    });
    match decoded {
        Ok(_) => json!({"conv_kernel": !chosen, "decode_vq": round1(ph.get("decode_vq"))}),
        Err(e) => json!({"conv_kernel": !chosen, "error": format!("{e:#}")}),
    }
}

/// The step's image and answer rollouts timed as the model is now set, with their graph reports; a failure is
/// reported, not fatal.
fn time_rollouts(
    model: &mut Janus,
    inputs: &StepInputs,
    a: &BenchGpuStepArgs,
    answer_tokens: usize,
    rng: &mut ChaCha8Rng,
) -> serde_json::Value {
    let n = model.image_tokens_per_image();
    let mut ph = Phases::on(model.device());
    let image = ph.time("rollout_image", || {
        let (s, site) = (a.image_sampling(), a.image_sampler.site());
        Ok(model.sample_image_codes_at(&inputs.gen_prompts, &s, n, site, rng)?)
    });
    let report = graph_report_json(model);
    let text = ph.time("rollout_text", || {
        let (s, site) = (a.text_sampling(answer_tokens), a.text_sampler.site());
        Ok(model.sample_answers_ids_at(&inputs.pixels, &inputs.und_prompts, &s, site, rng)?)
    });
    let answer_report = json!(model.last_answer_graph_report());
    let mut out = json!({
        "graph_report": report,
        "answer_graph_report": answer_report,
    });
    match image {
        Ok(_) => {
            let ms = ph.get("rollout_image");
            out["rollout_image"] = json!(round1(ms));
            out["ms_per_image_step"] = json!((ms / n.max(1) as f64 * 1000.0).round() / 1000.0);
        }
        Err(e) => out["error"] = json!(format!("{e:#}")),
    }
    match text {
        Ok(_) => out["rollout_text"] = json!(round1(ph.get("rollout_text"))),
        Err(e) => out["text_error"] = json!(format!("{e:#}")),
    }
    out
}

/// The step's answer rollout and its answers' teacher-forced pass (micro-batches of `--micro-batch`, forward and
/// backward of the summed log-probs, no optimiser step) timed with prompt sharing `on` and shared scoring `how`
/// (both restored after), or the error it ended with.
fn answers_with_sharing(
    model: &mut Janus,
    inputs: &StepInputs,
    a: &BenchGpuStepArgs,
    answer_tokens: usize,
    rng: &mut ChaCha8Rng,
    on: bool,
    how: SharedScoring,
) -> serde_json::Value {
    let (chosen, chosen_how) = (model.prompt_sharing(), model.shared_scoring());
    model.set_prompt_sharing(on);
    model.set_shared_scoring(how);
    let mut ph = Phases::on(model.device());
    let timed = (|| -> anyhow::Result<()> {
        let mut answers = ph.time("rollout_text", || {
            let (s, site) = (a.text_sampling(answer_tokens), a.text_sampler.site());
            Ok(model.sample_answers_ids_at(&inputs.pixels, &inputs.und_prompts, &s, site, rng)?)
        })?;
        clear_image_ids(&mut answers, model.config().image_token_id);
        ph.time("score_text", || {
            for chunk in answers.chunks(a.micro_batch.max(1)) {
                let (lp, mask) = model.answer_logprobs_at(chunk, a.temperature)?;
                drop((lp * mask)?.sum_all()?.backward()?);
            }
            Ok(())
        })
    })();
    model.set_prompt_sharing(chosen);
    model.set_shared_scoring(chosen_how);
    match timed {
        Ok(()) => json!({
            "rollout_text": round1(ph.get("rollout_text")),
            "score_text": round1(ph.get("score_text")),
        }),
        Err(e) => json!({ "error": format!("{e:#}") }),
    }
}

/// Codes of a CFG image rollout long enough to cross two attention widths, drawn with the static decode's
/// steps captured as CUDA graphs and again with the same steps run eagerly, from one seed: a graph replays the
/// kernels the eager step launches, so the codes must be bit-identical. The same for the answers of two of the
/// step's questions, long enough to cross a width (`answers`). `pass` needs both equal and graphs actually
/// captured (a CUDA device) without a failure. The model's settings are restored.
fn check_graphs(
    model: &mut Janus,
    inputs: &StepInputs,
    a: &BenchGpuStepArgs,
) -> anyhow::Result<serde_json::Value> {
    let steps = (2 * WIDTH_STEP + 2).min(model.image_tokens_per_image());
    let chosen = model.static_decode();
    model.set_static_decode(true);
    let image = compare_captured_with_eager(model, |m| {
        let rolls = m.sample_image_codes_at(
            &inputs.gen_prompts,
            &a.image_sampling(),
            steps,
            SamplerSite::Device,
            &mut ChaCha8Rng::seed_from_u64(17),
        )?;
        let report = m.last_graph_report().unwrap_or_default();
        Ok((
            rolls.into_iter().map(|r| (r.codes, r.logprobs)).collect(),
            report,
        ))
    });
    let rows = inputs.und_prompts.len().min(2);
    let tokens = WIDTH_STEP + 2;
    let answers = compare_captured_with_eager(model, |m| {
        let rolls = m.sample_answers_ids_at(
            &inputs.pixels[..rows],
            &inputs.und_prompts[..rows],
            &a.text_sampling(tokens),
            SamplerSite::Device,
            &mut ChaCha8Rng::seed_from_u64(18),
        )?;
        let report = m.last_answer_graph_report().unwrap_or_default();
        Ok((
            rolls
                .into_iter()
                .map(|r| (r.answer_ids, r.logprobs))
                .collect(),
            report,
        ))
    });
    model.set_static_decode(chosen);
    let (mut image, mut answers) = (image?, answers?);
    let pass = image["pass"] == true && answers["pass"] == true;
    image["steps"] = json!(steps);
    answers["max_new_tokens"] = json!(tokens);
    answers["rows"] = json!(rows);
    image["answers"] = answers;
    image["pass"] = json!(pass);
    Ok(image)
}

/// Runs `sample` (ids and log-probs per row, and the graph report) with the static steps captured, then run
/// eagerly, and compares: the ids must be equal (`codes_equal`), and the captured run must have captured graphs
/// without a failure. An error in either run is reported, not returned. Leaves graph capture on.
fn compare_captured_with_eager(
    model: &mut Janus,
    sample: impl Fn(&Janus) -> anyhow::Result<(Vec<(Vec<u32>, Vec<f32>)>, GraphReport)>,
) -> anyhow::Result<serde_json::Value> {
    model.set_graph_capture(true);
    let graphed = sample(model);
    model.set_graph_capture(false);
    let eager = sample(model);
    model.set_graph_capture(true);
    let ((graphed, report), (eager, _)) = match (graphed, eager) {
        (Ok(g), Ok(e)) => (g, e),
        (Err(e), _) | (_, Err(e)) => {
            return Ok(json!({ "pass": false, "error": format!("{e:#}") }))
        }
    };
    let codes_equal = graphed.iter().zip(&eager).all(|(g, e)| g.0 == e.0);
    let max_lp_diff = graphed
        .iter()
        .zip(&eager)
        .flat_map(|(g, e)| g.1.iter().zip(&e.1))
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    Ok(json!({
        "codes_equal": codes_equal,
        "max_abs_logprob_diff": max_lp_diff,
        "pass": codes_equal && report.captured > 0 && report.failure.is_none(),
        "graph_report": report,
    }))
}

/// Times `steps` CFG image decode steps the way `Janus::sample_images_ids` takes them on the host path (device
/// forward and generation head, logits to the host, CFG mix + log-softmax + draw on the host), each part on its
/// own clock, so that the benchmark says where a decode step's time goes. Starts right after the prompt's
/// prefill. The cache is preallocated as the library's sampler does; the same forwards through a cache that grows
/// by concatenation (the old path) are timed too (`forward_grown_cache_ms`). The device-sampled steps run with
/// the composed and with the fused sampling kernels, each with its count of tensors created per step.
fn probe_image_step(
    model: &mut Janus,
    prompts: &[Vec<u32>],
    cfg_weight: f64,
    steps: usize,
) -> anyhow::Result<serde_json::Value> {
    let dev = model.device().clone();
    let b = prompts.len();
    // The unconditional rows' content does not change the work; their count does.
    let rows: Vec<Vec<u32>> = prompts.iter().chain(prompts.iter()).cloned().collect();
    let emb = model.token_embeddings(&rows)?;
    let t = emb.dim(1)?;
    let (h, cache) = model.decoder_step(
        &emb,
        &vec![vec![true; t]; 2 * b],
        &model.empty_cache_with_capacity(2 * b, t + steps),
    )?;
    let mut cache = cache.detach();
    let mut last = h.narrow(1, t - 1, 1)?.squeeze(1)?.detach();
    let valid = vec![vec![true]; 2 * b];
    let (mut fwd, mut down, mut host) = (0f64, 0f64, 0f64);
    let w = cfg_weight as f32;
    for _ in 0..steps {
        dev.synchronize()?;
        let t0 = Instant::now();
        let logits = model.gen_head(&last)?;
        dev.synchronize()?;
        let t1 = Instant::now();
        let l = logits.to_vec2::<f32>()?;
        let t2 = Instant::now();
        let mut codes = Vec::with_capacity(b);
        for r in 0..b {
            let mixed: Vec<f32> = l[r]
                .iter()
                .zip(&l[b + r])
                .map(|(&c, &u)| u + w * (c - u))
                .collect();
            let lp_mixed = host_log_softmax(&mixed);
            let lp_cond = host_log_softmax(&l[r]);
            // Inverse-CDF draw at a fixed point: the same passes over the row as a random one.
            let mut acc = 0f64;
            let mut pick = lp_mixed.len() - 1;
            for (i, &x) in lp_mixed.iter().enumerate() {
                acc += x.exp();
                if acc > 0.5 {
                    pick = i;
                    break;
                }
            }
            std::hint::black_box(lp_cond[pick]);
            codes.push(pick as u32);
        }
        let t3 = Instant::now();
        let both: Vec<u32> = codes.iter().chain(codes.iter()).copied().collect();
        let ct = Tensor::from_vec(both, (2 * b, 1), &dev)?;
        let e = model.code_embeddings(&ct)?.to_dtype(model.dtype())?;
        let (h, c) = model.decoder_step(&e, &valid, &cache)?;
        cache = c.detach();
        last = h.squeeze(1)?.detach();
        dev.synchronize()?;
        let t4 = Instant::now();
        fwd += (t1 - t0 + (t4 - t3)).as_secs_f64();
        down += (t2 - t1).as_secs_f64();
        host += (t3 - t2).as_secs_f64();
    }
    let per = |x: f64| (x * 1e3 / steps as f64 * 1000.0).round() / 1000.0;
    let chosen = (model.fused_sampling(), model.stack_projections());
    let mut device_sampled = 0.0;
    let mut kernels = serde_json::Map::new();
    // The stacking of projections only matters with the fused kernels.
    for (name, set) in [
        ("composed", (false, chosen.1)),
        ("fused", (true, true)),
        ("fused_unstacked", (true, false)),
    ] {
        model.set_fused_sampling(set.0);
        model.set_stack_projections(set.1);
        let used = set == chosen;
        let run = device_sampled_steps(model, &emb, b, cfg_weight, steps)
            .and_then(|secs| Ok((secs, tensors_per_decode_step(model, &emb, b, cfg_weight)?)));
        let entry = match run {
            Ok((secs, tensors)) => {
                if used {
                    device_sampled = secs;
                }
                json!({ "device_sampling_total_ms": per(secs), "tensors_per_step": tensors })
            }
            // The kernel set the step does not use may fail without costing the device call its measurement.
            Err(e) if !used => json!({ "error": format!("{e:#}") }),
            Err(e) => {
                model.set_fused_sampling(chosen.0);
                model.set_stack_projections(chosen.1);
                return Err(e.context(format!(
                    "device-sampled decode steps with the {name} kernels"
                )));
            }
        };
        kernels.insert(name.into(), entry);
    }
    model.set_fused_sampling(chosen.0);
    model.set_stack_projections(chosen.1);
    let grown = grown_cache_forwards(model, &emb, b, steps)?;
    Ok(json!({
        "steps": steps,
        "cache_len_start": t,
        "forward_ms": per(fwd),
        "forward_grown_cache_ms": per(grown),
        "logits_to_host_ms": per(down),
        "host_sampling_ms": per(host),
        "total_ms": per(fwd + down + host),
        "device_sampling_total_ms": per(device_sampled),
        "fused_sampling": chosen.0,
        "stack_projections": chosen.1,
        "sampling_kernels": kernels,
    }))
}

/// Tensor values candle creates in one device-sampled CFG decode step after a prefill (generation head, draw,
/// code embedding, decoder), views included: an upper bound on the kernels the step launches.
fn tensors_per_decode_step(
    model: &Janus,
    prompt_emb: &Tensor,
    b: usize,
    cfg_weight: f64,
) -> anyhow::Result<usize> {
    let t = prompt_emb.dim(1)?;
    let start = model.empty_cache_with_capacity(2 * b, t + 1);
    let (h, cache) = model.decoder_step(prompt_emb, &vec![vec![true; t]; 2 * b], &start)?;
    let (cache, last) = (cache.detach(), h.narrow(1, t - 1, 1)?.squeeze(1)?.detach());
    let mut noise = pairuni_model::sampling::GumbelNoise::new(model.device(), 0)?;
    let before = next_tensor_id()?;
    let step = device_decode_step(model, &last, &cache, |logits| {
        Ok(pairuni_model::sampling::device_cfg_draw(
            &logits.narrow(0, 0, b)?,
            &logits.narrow(0, b, b)?,
            &ImageSampling {
                cfg_weight,
                ..ImageSampling::default()
            },
            &mut noise,
        )?
        .0)
    })?;
    let after = next_tensor_id()?;
    std::hint::black_box(step);
    // The second probe tensor is counted by the difference too.
    Ok(after - before - 1)
}

/// One CFG decode step from the hidden states `last` [2b, H] through `cache`: generation head, `pick` on the
/// [2b, K] logits (a code per prompt, [b, 1] on the device), the code fed to both rows. Returns the code, the
/// next hidden states and the extended cache.
fn device_decode_step(
    model: &Janus,
    last: &Tensor,
    cache: &KvCache,
    pick: impl FnOnce(&Tensor) -> anyhow::Result<Tensor>,
) -> anyhow::Result<(Tensor, Tensor, KvCache)> {
    let code = pick(&model.gen_head(last)?)?.detach();
    let both = Tensor::cat(&[&code, &code], 0)?;
    let e = model.code_embeddings(&both)?.to_dtype(model.dtype())?;
    let valid = vec![vec![true]; both.dim(0)?];
    let (h, c) = model.decoder_step(&e, &valid, cache)?;
    Ok((code, h.squeeze(1)?.detach(), c.detach()))
}

/// `steps` decode forwards (decoder and generation head, code fed back) through a cache that grows by
/// concatenation, as every step did before the preallocated cache; seconds.
fn grown_cache_forwards(
    model: &Janus,
    prompt_emb: &Tensor,
    b: usize,
    steps: usize,
) -> anyhow::Result<f64> {
    let t = prompt_emb.dim(1)?;
    let start = model.empty_cache(2 * b);
    timed_device_steps(model, prompt_emb, b, steps, start, |logits| {
        Ok(logits
            .narrow(0, 0, b)?
            .argmax_keepdim(candle_core::D::Minus1)?)
    })
    .map(|(secs, _)| secs)
    .with_context(|| format!("grown-cache forwards after a {t}-token prefill"))
}

/// Prefills `prompt_emb` (2b rows) into `start`, then times `steps` decode steps whose codes `pick` chooses on
/// the device from the [2b, K] generation logits; returns the seconds and the picked codes [b, steps].
fn timed_device_steps(
    model: &Janus,
    prompt_emb: &Tensor,
    b: usize,
    steps: usize,
    start: KvCache,
    mut pick: impl FnMut(&Tensor) -> anyhow::Result<Tensor>,
) -> anyhow::Result<(f64, Tensor)> {
    let dev = model.device().clone();
    let t = prompt_emb.dim(1)?;
    let (h, cache) = model.decoder_step(prompt_emb, &vec![vec![true; t]; 2 * b], &start)?;
    let mut cache = cache.detach();
    let mut last = h.narrow(1, t - 1, 1)?.squeeze(1)?.detach();
    let mut codes = Vec::with_capacity(steps);
    dev.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..steps {
        let code;
        (code, last, cache) = device_decode_step(model, &last, &cache, &mut pick)?;
        codes.push(code);
    }
    let codes = Tensor::cat(&codes, 1)?;
    dev.synchronize()?;
    Ok((t0.elapsed().as_secs_f64(), codes))
}

/// The same decode steps with CFG mix, Gumbel-max draw and the conditional log-prob computed on the device and
/// the codes never read back until the end: no host round trip per token (what `SamplerSite::Device` does
/// in the library). Returns the wall time in seconds. The draw is from the same distribution as the host
/// sampler's, not the same stream.
fn device_sampled_steps(
    model: &Janus,
    prompt_emb: &Tensor,
    b: usize,
    cfg_weight: f64,
    steps: usize,
) -> anyhow::Result<f64> {
    let t = prompt_emb.dim(1)?;
    let mut noise = pairuni_model::sampling::GumbelNoise::new(model.device(), 0)?;
    let mut lps = Vec::with_capacity(steps);
    let start = model.empty_cache_with_capacity(2 * b, t + steps);
    let (decode_secs, codes) = timed_device_steps(model, prompt_emb, b, steps, start, |logits| {
        let (code, lp) = pairuni_model::sampling::device_cfg_draw(
            &logits.narrow(0, 0, b)?,
            &logits.narrow(0, b, b)?,
            &ImageSampling {
                cfg_weight,
                ..ImageSampling::default()
            },
            &mut noise,
        )?;
        lps.push(lp);
        Ok(code)
    })?;
    // One read at the end, as a device sampler would hand the codes over; it counts in the time.
    let t0 = Instant::now();
    let codes = codes.to_vec2::<u32>()?;
    let lps = Tensor::cat(&lps, 1)?.to_vec2::<f32>()?;
    std::hint::black_box((codes, lps));
    Ok(decode_secs + t0.elapsed().as_secs_f64())
}

/// log-softmax in f64, as the library's host sampler computes it.
fn host_log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - max - lse).collect()
}

/// Runs the VQ decode and the answer sampler once, then one train phase on rollouts of the step's sizes (made up, not
/// sampled), whose optimiser step moves the weights by one step of lr as PyTorch's warm-up step does.
fn warmup(
    model: &Janus,
    opt: &mut AdamW,
    inputs: &StepInputs,
    a: &BenchGpuStepArgs,
    answer_tokens: usize,
    threads: usize,
) -> anyhow::Result<()> {
    let temperature = a.temperature;
    let mut rng = ChaCha8Rng::seed_from_u64(u64::MAX);
    let n = model.image_tokens_per_image();
    let k = model.config().vq_config.num_embeddings as u32;
    let codes: Vec<u32> = (0..n).map(|i| i as u32 % k).collect();
    let images: Vec<ImageRollout> = inputs
        .gen_prompts
        .iter()
        .map(|p| ImageRollout {
            prompt_ids: p.clone(),
            codes: codes.clone(),
            logprobs: vec![0.0; n],
        })
        .collect();
    model.decode_codes(&[codes])?;
    let s = TextSampling {
        max_new_tokens: 2,
        temperature,
        top_p: 1.0,
        greedy: false,
    };
    model.sample_answers_ids(&inputs.pixels[..1], &inputs.und_prompts[..1], &s, &mut rng)?;

    // The teacher-forced passes and their backwards run in the train phase below, at the step's sizes.
    // Ordinary text ids from the prompts themselves, so none is the image placeholder.
    let answer_ids: Vec<u32> = inputs.gen_prompts[0][1..]
        .iter()
        .copied()
        .cycle()
        .take(answer_tokens)
        .collect();
    let answers: Vec<TextRollout> = inputs
        .pixels
        .iter()
        .zip(&inputs.und_prompts)
        .map(|(px, p)| TextRollout {
            image: px.clone(),
            prompt_ids: p.clone(),
            answer_ids: answer_ids.clone(),
            logprobs: vec![0.0; answer_ids.len()],
            text: String::new(),
        })
        .collect();
    let alternate = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect()
    };
    let (a_img, a_txt) = (alternate(images.len()), alternate(answers.len()));
    train_phase(model, opt, &images, &answers, (&a_img, &a_txt), a, threads)?;
    model.device().synchronize()?;
    Ok(())
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn device_name(dev: &Device) -> String {
    match dev {
        Device::Cpu => "cpu".into(),
        other => format!("{:?}", other.location()),
    }
}

/// Arguments of `pairuni bench gpu-kernels`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchGpuKernelsArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One kernel module's NVRTC compilation: its PTX size and compile time, or why it failed.
#[derive(Debug, serde::Serialize)]
struct KernelCompile {
    module: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ptx_bytes: Option<usize>,
    compile_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Compiles each hand-written kernel module as its first launch would.
fn compile_kernels() -> Vec<KernelCompile> {
    pairuni_model::nvrtc::modules()
        .into_iter()
        .chain([pairuni_rl::fused_adamw::module()])
        .map(|m| {
            let t0 = Instant::now();
            let compiled = m.compile();
            let compile_ms = round1(t0.elapsed().as_secs_f64() * 1e3);
            let (ptx_bytes, error) = match compiled {
                Ok(n) => (Some(n), None),
                Err(e) => (None, Some(e)),
            };
            KernelCompile {
                module: m.name(),
                ptx_bytes,
                compile_ms,
                error,
            }
        })
        .collect()
}

/// Compiles every hand-written CUDA kernel module with NVRTC, as their first launches would, and prints each
/// module's PTX size or error; fails when any did not compile. Needs a CUDA build and NVRTC, not a GPU, so a
/// session without one can check that the kernels a device call relies on will build there.
pub fn run_bench_gpu_kernels(a: BenchGpuKernelsArgs) -> anyhow::Result<ExitCode> {
    let modules = compile_kernels();
    let failed = modules.iter().filter(|m| m.error.is_some()).count();
    if a.json {
        println!(
            "{}",
            json!({ "modules": modules, "pass": failed == 0 && !modules.is_empty() })
        );
    } else {
        println!("{:<28}{:>12}{:>12}", "kernel module", "ptx bytes", "ms");
        for m in &modules {
            match (&m.ptx_bytes, &m.error) {
                (Some(n), _) => println!("{:<28}{n:>12}{:>12.1}", m.module, m.compile_ms),
                (_, Some(e)) => println!("{:<28}failed: {e}", m.module),
                _ => {}
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} kernel modules did not compile",
            modules.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `pairuni bench gpu-parity`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchGpuParityArgs {
    /// The fixture checkpoint folder (config.json + model.safetensors + reference outputs).
    #[arg(long, default_value = "tests/fixtures/janus")]
    pub fixtures: PathBuf,
    /// Device to check against the fixture's reference values.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Largest accepted max|Δ|/max|ref| in f32.
    #[arg(long, default_value_t = 1e-3)]
    pub tol_f32: f64,
    /// Largest accepted max|Δ|/max|ref| in bf16 (8-bit mantissa: ≈ 4e-3 per rounding, compounded over layers).
    #[arg(long, default_value_t = 5e-2)]
    pub tol_bf16: f64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// max |a − ref| / max |ref| over the whole tensor (the fixtures' metric, docs/FIXTURES.md).
fn rel_err(a: &Tensor, reference: &Tensor) -> anyhow::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let r = reference.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    if a.shape() != r.shape() {
        bail!("shape {:?} vs reference {:?}", a.shape(), r.shape());
    }
    let diff = (a - &r)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = r.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30);
    Ok(diff / scale)
}

fn id_rows(t: &Tensor) -> anyhow::Result<Vec<Vec<u32>>> {
    Ok(t.to_dtype(DType::I64)?
        .to_vec2::<i64>()?
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect())
}

/// Generation-head logits [B, L+N, K] of prompts followed by codes, computed the way sampling computes them: the
/// prompts prefilled into a preallocated cache, then one code per decode step (the fused sampling kernels where
/// the model uses them). Equal to the one-pass `gen_logits`.
fn decoded_gen_logits(
    m: &Janus,
    prompts: &[Vec<u32>],
    codes: &[Vec<u32>],
    static_steps: bool,
) -> anyhow::Result<Tensor> {
    let (b, l) = (prompts.len(), prompts.first().map_or(0, Vec::len));
    let n = codes.first().map_or(0, Vec::len);
    let dev = m.device();
    let emb = m.token_embeddings(prompts)?;
    let cache = m.empty_cache_with_capacity(b, l + n);
    let (h, mut cache) = m.decoder_step(&emb, &vec![vec![true; l]; b], &cache)?;
    let mut hidden = vec![h];
    let mut steps = Vec::with_capacity(n);
    for i in 0..n {
        let step: Vec<u32> = codes.iter().map(|c| c[i]).collect();
        steps.push(
            m.code_embeddings(&Tensor::from_vec(step, (b, 1), dev)?)?
                .to_dtype(m.dtype())?,
        );
    }
    if static_steps {
        hidden.extend(m.static_decoder_steps(cache, &steps)?);
    } else {
        for e in &steps {
            let (h, c) = m.decoder_step(e, &vec![vec![true]; b], &cache)?;
            cache = c.detach();
            hidden.push(h);
        }
    }
    Ok(m.gen_head(&Tensor::cat(&hidden, 1)?)?)
}

/// The fixture's generation logits computed the way sampling computes them, through a preallocated cache one code
/// at a time and in the captured form's static steps, with the model's kernels; `labelled` names them as the
/// hand-written kernels' rows.
fn decoded_rows(
    m: &Janus,
    f: &std::collections::HashMap<String, Tensor>,
    labelled: bool,
) -> anyhow::Result<Vec<(&'static str, &'static str, Tensor)>> {
    let get = |k: &str| {
        f.get(k)
            .with_context(|| format!("fixtures.safetensors has no tensor `{k}`"))
    };
    let prompts = id_rows(get("gen.prompt_ids")?)?;
    let codes = id_rows(get("gen.codes")?)?;
    let (cached, fixed) = if labelled {
        (
            "gen.logits (cached decode, hand-written kernels)",
            "gen.logits (static decode, hand-written kernels)",
        )
    } else {
        ("gen.logits (cached decode)", "gen.logits (static decode)")
    };
    Ok(vec![
        (
            cached,
            "gen.logits",
            decoded_gen_logits(m, &prompts, &codes, false)?,
        ),
        (
            fixed,
            "gen.logits",
            decoded_gen_logits(m, &prompts, &codes, true)?,
        ),
    ])
}

/// The fixture's VQ decode with the convolution kernel on (the CPU runs candle's conv2d either way), against the
/// same reference as the plain row.
fn conv_kernel_row(
    m: &Janus,
    f: &std::collections::HashMap<String, Tensor>,
) -> anyhow::Result<(&'static str, &'static str, Tensor)> {
    use pairuni_model::conv_kernel;
    let codes = f
        .get("vq.decode_codes")
        .context("fixtures.safetensors has no tensor `vq.decode_codes`")?
        .to_dtype(DType::U32)?
        .to_device(m.device())?;
    let vq = m
        .image_tokenizer()
        .context("fixture checkpoint has no VQ")?;
    let decoded = conv_kernel::with_enabled(true, || vq.decode_tensor(&codes));
    Ok((
        "vq.decode_pixels (conv kernel)",
        "vq.decode_pixels",
        decoded?,
    ))
}

/// Every fixture output of `m`: (what it is, the fixture's reference tensor, the output).
fn fixture_outputs(
    m: &Janus,
    f: &std::collections::HashMap<String, Tensor>,
) -> anyhow::Result<Vec<(&'static str, &'static str, Tensor)>> {
    let dev = m.device();
    let get = |k: &str| {
        f.get(k)
            .with_context(|| format!("fixtures.safetensors has no tensor `{k}`"))
    };
    let px = get("und.pixel_values")?.to_device(dev)?;
    let ids = id_rows(get("und.input_ids")?)?;
    let prompts = id_rows(get("gen.prompt_ids")?)?;
    let codes = id_rows(get("gen.codes")?)?;
    let vq = m
        .image_tokenizer()
        .context("fixture checkpoint has no VQ")?;
    let dcodes = get("vq.decode_codes")?
        .to_dtype(DType::U32)?
        .to_device(dev)?;
    let same = |name: &'static str, t: Tensor| (name, name, t);
    Ok(vec![
        same("vision.last_hidden_state", m.vision_hidden(&px)?),
        same("vision.image_embeds", m.image_features(&px)?),
        same("und.logits", m.text_logits(&ids, Some(&px))?),
        same(
            "gen.code_embeds",
            m.code_embeddings(&Tensor::new(codes.clone(), dev)?)?,
        ),
        same("gen.logits", m.gen_logits(&prompts, &codes)?),
        same("vq.decode_pixels", vq.decode_tensor(&dcodes)?),
    ]
    .into_iter()
    .chain(decoded_rows(m, f, false)?)
    .collect())
}

/// Runs `pairuni bench gpu-parity`.
pub fn run_bench_gpu_parity(a: BenchGpuParityArgs) -> anyhow::Result<ExitCode> {
    let spec: DeviceSpec = a.device.parse()?;
    let dev = spec.open()?;
    let fx_path = a.fixtures.join("fixtures.safetensors");
    let f = candle_core::safetensors::load(&fx_path, &Device::Cpu)
        .with_context(|| format!("reading {}", fx_path.display()))?;
    // The CPU f32 run is the baseline the device runs are also compared with (CPU-vs-GPU parity).
    let cpu = Janus::load(&a.fixtures, &Device::Cpu, DType::F32)?;
    let mut cpu_out = fixture_outputs(&cpu, &f)?;
    // The hand-written kernels' rows: on the CPU they run candle's ops, the rows they are compared with.
    cpu_out.extend(decoded_rows(&cpu, &f, true)?);
    cpu_out.push(conv_kernel_row(&cpu, &f)?);
    let mut rows = Vec::new();
    let mut ok = true;
    for (dtype, tol) in [(DType::F32, a.tol_f32), (DType::BF16, a.tol_bf16)] {
        let mut m = Janus::load(&a.fixtures, &dev, dtype)
            .with_context(|| format!("loading {} on {}", a.fixtures.display(), spec))?;
        // The plain rows run candle's ops alone, though a CUDA device takes the hand-written kernels by default.
        m.set_attention_kernel(false);
        m.set_layer_kernels(false);
        let mut out = pairuni_model::conv_kernel::with_enabled(false, || fixture_outputs(&m, &f))?;
        // The same decodes through the hand-written decode kernels, against the same reference: the attention
        // kernel where it covers the head dimension, and the layer kernels.
        m.set_attention_kernel(true);
        m.set_layer_kernels(true);
        out.extend(decoded_rows(&m, &f, true)?);
        out.push(conv_kernel_row(&m, &f)?);
        for ((name, key, t), (_, _, c)) in out.iter().zip(&cpu_out) {
            let vs_ref = rel_err(t, &f[*key])?;
            let vs_cpu = rel_err(t, c)?;
            let pass = vs_ref <= tol && vs_ref.is_finite();
            ok &= pass;
            rows.push(json!({
                "tensor": name, "device": spec.to_string(), "dtype": format!("{dtype:?}").to_lowercase(),
                "fused_sampling": m.fused_sampling(),
                "rel_err_vs_reference": vs_ref, "rel_err_vs_cpu_f32": vs_cpu, "tolerance": tol, "pass": pass,
            }));
        }
    }
    if a.json {
        println!(
            "{}",
            json!({
                "device": device_name(&dev),
                "pass": ok,
                "checks": rows,
                // What the hand-written decode kernels did in the rows that name them (their first-call checks
                // ran there).
                "kernels": {
                    "attention": pairuni_model::decode_attention::report(),
                    "add_rms_norm": pairuni_model::layer_kernels::ADD_NORM.report(),
                    "silu_mul": pairuni_model::layer_kernels::SILU_MUL.report(),
                    "rope_store": pairuni_model::layer_kernels::ROPE_STORE.report(),
                    "conv": pairuni_model::conv_kernel::IM2COL.report(),
                },
            })
        );
    } else {
        println!(
            "{:<28}{:>8}{:>8}{:>14}{:>14}{:>10}",
            "tensor", "device", "dtype", "vs reference", "vs cpu f32", "result"
        );
        for r in &rows {
            println!(
                "{:<28}{:>8}{:>8}{:>14.3e}{:>14.3e}{:>10}",
                r["tensor"].as_str().unwrap_or("?"),
                r["device"].as_str().unwrap_or("?"),
                r["dtype"].as_str().unwrap_or("?"),
                r["rel_err_vs_reference"].as_f64().unwrap_or(f64::NAN),
                r["rel_err_vs_cpu_f32"].as_f64().unwrap_or(f64::NAN),
                if r["pass"].as_bool() == Some(true) {
                    "ok"
                } else {
                    "FAIL"
                },
            );
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny-shape random model on the CPU, its step inputs and the rng that drew them, from `seed`.
    fn tiny_model(a: &BenchGpuStepArgs, seed: u64) -> (Janus, StepInputs, ChaCha8Rng) {
        let cfg = a.shapes.config().unwrap();
        let model = build_model(&cfg, seed, &Device::Cpu, DType::F32).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let inputs = step_inputs(&cfg, a, &Device::Cpu, &mut rng).unwrap();
        (model, inputs, rng)
    }

    fn tiny_args() -> BenchGpuStepArgs {
        BenchGpuStepArgs {
            device: "cpu".into(),
            shapes: Shapes::Tiny,
            text_layers: None,
            dtype: None,
            pairs: 1,
            group: 2,
            answer_tokens: 4,
            prompt_len: 8,
            question_len: 6,
            cfg_weight: 5.0,
            temperature: 1.0,
            top_p: 1.0,
            compare_top_p: None,
            micro_batch: 1,
            concurrent_passes: 0,
            compare_concurrent_passes: false,
            compare_pass_counts: vec![1, 4],
            compare_micro_batches: Vec::new(),
            fused_adamw: Toggle::Auto,
            norm_kernel: Toggle::Auto,
            lr: 1e-2,
            seed: 3,
            no_warmup: true,
            probe_steps: 2,
            image_sampler: SamplerArg::Auto,
            text_sampler: SamplerArg::Auto,
            fused_sampling: Toggle::Auto,
            stack_projections: Toggle::Auto,
            cuda_graphs: Toggle::Auto,
            compare_graphs: false,
            prompt_sharing: Toggle::Auto,
            compare_sharing: false,
            compare_attention_kernel: false,
            compare_layer_kernels: false,
            compare_conv_kernel: false,
            compare_draw_kernel: false,
            profile_phases: Vec::new(),
            attention_kernel: Toggle::Auto,
            layer_kernels: Toggle::Auto,
            conv_kernel: Toggle::Auto,
            draw_kernel: Toggle::Auto,
            backward_kernels: Toggle::Auto,
            fused_training: Toggle::Auto,
            json: true,
        }
    }

    #[test]
    fn janus_pro_1b_shapes_match_the_pytorch_baseline() {
        let c = Shapes::JanusPro1b.config().unwrap();
        let t = &c.text_config;
        assert_eq!(
            (t.hidden_size, t.num_hidden_layers, t.num_attention_heads),
            (2048, 24, 16)
        );
        assert_eq!((t.intermediate_size, t.vocab_size), (5632, 102400));
        assert_eq!(c.vision_config.image_size, 384);
        assert_eq!(c.vision_config.num_image_tokens, 576);
        assert_eq!(c.image_tokens_per_image(), 576);
        assert_eq!(c.vq_config.num_embeddings, 16384);
        assert!(!c.tie_word_embeddings);
        let tiny = Shapes::Tiny.config().unwrap();
        assert_eq!(
            tiny.image_tokens_per_image(),
            tiny.vision_config.num_image_tokens
        );
    }

    #[test]
    fn janus_pro_1b_shapes_match_the_real_checkpoint_manifest() {
        // Every tensor shape of the real Janus-Pro-1B checkpoint, committed by the VQ work.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/janus/janus_pro_1b_shapes.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let shapes: std::collections::BTreeMap<String, Vec<usize>> =
            serde_json::from_str(&text).unwrap();
        let c = Shapes::JanusPro1b.config().unwrap();
        let (t, v, q) = (&c.text_config, &c.vision_config, &c.vq_config);
        let layers = |prefix: &str| {
            let ids: std::collections::BTreeSet<&str> = shapes
                .keys()
                .filter_map(|k| k.strip_prefix(prefix)?.split('.').next())
                .collect();
            ids.len()
        };
        assert_eq!(layers("model.language_model.layers."), t.num_hidden_layers);
        assert_eq!(
            layers("model.vision_model.encoder.layers."),
            v.num_hidden_layers
        );
        let s = |k: &str| {
            shapes
                .get(k)
                .unwrap_or_else(|| panic!("manifest lacks {k}"))
                .clone()
        };
        assert_eq!(s("lm_head.weight"), vec![t.vocab_size, t.hidden_size]);
        assert_eq!(
            s("model.language_model.layers.0.mlp.gate_proj.weight"),
            vec![t.intermediate_size, t.hidden_size]
        );
        assert_eq!(
            s("model.language_model.layers.0.self_attn.k_proj.weight"),
            vec![t.hidden_size, t.hidden_size]
        );
        assert_eq!(
            s("model.vision_model.embeddings.position_embedding.weight"),
            vec![v.num_image_tokens, v.hidden_size]
        );
        assert_eq!(
            s("model.aligner.fc1.weight"),
            vec![v.projection_dim, v.hidden_size]
        );
        assert_eq!(
            s("model.generation_embeddings.weight"),
            vec![q.num_embeddings, q.embed_dim]
        );
        assert_eq!(
            s("model.generation_head.vision_head.weight"),
            vec![q.num_embeddings, q.projection_dim]
        );
        assert_eq!(
            s("model.vqmodel.quantize.embedding.weight"),
            vec![q.num_embeddings, q.embed_dim]
        );
    }

    #[test]
    fn tiny_step_on_cpu_trains_every_language_model_tensor() {
        // Both sites of both samplers: the device ones run on the CPU too when asked.
        // And the device samplers in static steps, and the answers sharing their prompts' forwards.
        for (sampler, fixed, sharing) in [
            (SamplerArg::Host, false, false),
            (SamplerArg::Device, false, false),
            (SamplerArg::Device, true, false),
            (SamplerArg::Device, true, true),
        ] {
            tiny_step(sampler, fixed, sharing);
        }
    }

    /// One timed step of `a` on the CPU from its seed: the step's inputs, what it produced and its phases.
    fn tiny_run(
        a: &BenchGpuStepArgs,
        model: &Janus,
        opt: &mut AdamW,
    ) -> (StepInputs, StepOutcome, Phases) {
        let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
        let inputs = step_inputs(&a.shapes.config().unwrap(), a, &Device::Cpu, &mut rng).unwrap();
        let mut ph = Phases::on(&Device::Cpu);
        let out = run_step(model, opt, &inputs, a, a.answer_tokens, &mut rng, &mut ph).unwrap();
        (inputs, out, ph)
    }

    /// One timed step of `a` on a fresh tiny model and optimiser: what it produced.
    fn fresh_tiny_step(a: &BenchGpuStepArgs) -> StepOutcome {
        let cfg = a.shapes.config().unwrap();
        let mut model = build_model(&cfg, a.seed, &Device::Cpu, DType::F32).unwrap();
        let vars = model.select_trained(&ParamSelection::LanguageModel);
        let mut opt = AdamW::new(vars, &OptimConfig::default()).unwrap();
        tiny_run(a, &model, &mut opt).1
    }

    /// The `key` of each entry of a JSON array of objects, read by `read` (`as_u64`, `as_f64`).
    fn json_column<T>(
        list: &serde_json::Value,
        key: &str,
        read: fn(&serde_json::Value) -> Option<T>,
    ) -> Vec<T> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|o| read(&o[key]).unwrap())
            .collect()
    }

    fn json_ints(list: &serde_json::Value, key: &str) -> Vec<u64> {
        json_column(list, key, serde_json::Value::as_u64)
    }

    #[test]
    fn the_train_phase_is_compared_at_each_other_thread_count() {
        let a = BenchGpuStepArgs {
            concurrent_passes: 2,
            compare_concurrent_passes: true,
            compare_pass_counts: vec![1, 2, 4, 1],
            ..tiny_args()
        };
        let t0 = Instant::now();
        let out = fresh_tiny_step(&a);
        let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
        // The step's time and the comparisons' are disjoint parts of the call: were the comparisons counted in
        // the step (as they were until the eighteenth session), the two would add up to more than the call took.
        let compared_ms: f64 = json_column(&out.train_others, "train", serde_json::Value::as_f64)
            .iter()
            .sum();
        assert!(out.step_ms > 0.0);
        assert!(
            out.step_ms + compared_ms <= wall_ms,
            "step {} + comparisons {compared_ms} > call {wall_ms}",
            out.step_ms
        );
        // The step's own count and repeats are skipped; one thread brings its split.
        assert_eq!(json_ints(&out.train_others, "concurrent_passes"), [1, 4]);
        assert_eq!(out.train_other, out.train_others[0]);
        assert!(out.train_others[0]["train_split"].is_object());
        assert!(out.train_others[1]["train_split"].is_null());
        assert!(out.train_others[1]["train"].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn the_train_phase_is_compared_at_other_micro_batch_sizes() {
        let a = BenchGpuStepArgs {
            compare_micro_batches: vec![4, 1, 2],
            ..tiny_args()
        };
        assert_eq!(a.micro_batch, 1);
        let out = fresh_tiny_step(&a);
        // The step's own size is skipped.
        assert_eq!(json_ints(&out.train_micro_batches, "micro_batch"), [4, 2]);
        assert!(out.train_micro_batches[0]["train"].as_f64().unwrap() > 0.0);
    }

    /// The bench's step with `concurrent_passes` threads: its loss, gradient norm and a trained weight after it.
    fn step_with_passes(concurrent_passes: usize) -> (f32, f32, Vec<f32>) {
        let a = BenchGpuStepArgs {
            concurrent_passes,
            ..tiny_args()
        };
        let cfg = a.shapes.config().unwrap();
        let mut model = build_model(&cfg, a.seed, &Device::Cpu, DType::F32).unwrap();
        let vars = model.select_trained(&ParamSelection::LanguageModel);
        let var = vars[vars.len() / 2].1.clone();
        let mut opt = AdamW::new(vars, &OptimConfig::default()).unwrap();
        let (_, out, _) = tiny_run(&a, &model, &mut opt);
        assert_eq!(out.concurrent_passes, concurrent_passes);
        // The split is kept from one thread only: concurrent passes interleave its parts.
        assert_eq!(out.train_split.is_null(), concurrent_passes > 1);
        let w = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (out.loss, out.grad_norm, w)
    }

    #[test]
    fn the_train_phase_from_two_threads_is_the_one_thread_phase_bit_for_bit() {
        // Micro-batches of one rollout: two image and two answer passes, merged in pass order.
        let one = step_with_passes(1);
        assert_eq!(step_with_passes(2), one);
        assert!(one.1 > 0.0);
    }

    fn tiny_step(sampler: SamplerArg, static_decode: bool, sharing: bool) {
        let a = BenchGpuStepArgs {
            image_sampler: sampler,
            text_sampler: sampler,
            ..tiny_args()
        };
        let dev = Device::Cpu;
        let cfg = a.shapes.config().unwrap();
        let mut model = build_model(&cfg, a.seed, &dev, DType::F32).unwrap();
        model.set_static_decode(static_decode);
        model.set_prompt_sharing(sharing);
        let vars = model.select_trained(&ParamSelection::LanguageModel);
        // A decoder weight: both sides' losses reach it (lm_head gets nothing when a text group's rewards tie).
        let (name, var) = vars
            .iter()
            .find(|(n, _)| n.contains("layers.0.self_attn.q_proj"))
            .unwrap()
            .clone();
        let before = var.as_tensor().copy().unwrap();
        let mut opt = AdamW::new(
            vars.clone(),
            &OptimConfig {
                lr: 1e-2,
                ..OptimConfig::default()
            },
        )
        .unwrap();
        let (inputs, out, ph) = tiny_run(&a, &model, &mut opt);
        assert_eq!(inputs.gen_prompts.len(), 2);
        assert_eq!(
            inputs.und_prompts[0].len(),
            1 + a.question_len + cfg.vision_config.num_image_tokens
        );
        assert_eq!(out.image_tokens, 16);
        assert_eq!(out.images, 2);
        assert_eq!(out.params_with_grad, out.params_trained);
        assert!(out.params_trained > 10, "{}", out.params_trained);
        assert!(out.grad_norm.is_finite() && out.grad_norm > 0.0);
        for k in ["rollout_image", "rollout_text", "decode_vq", "train"] {
            assert!(ph.get(k) > 0.0, "{k} not timed");
        }
        // Sampling and teacher forcing agree on every token's log-prob (f32 on the CPU).
        for (gap, tokens) in [
            (out.gap_image, out.images * out.image_tokens),
            (out.gap_text, 2),
        ] {
            assert!(gap.count >= tokens, "{gap:?}");
            assert!(
                gap.max < 1e-4,
                "{sampler:?} static {static_decode}: {gap:?}"
            );
        }
        // The optimizer step moved the weights.
        let moved = rel_err(var.as_tensor(), &before).unwrap();
        assert!(moved > 1e-4, "AdamW did not update {name}: {moved}");
    }

    #[test]
    fn the_other_graph_setting_times_the_static_rollout_and_restores_the_model() {
        let a = BenchGpuStepArgs {
            image_sampler: SamplerArg::Device,
            text_sampler: SamplerArg::Device,
            ..tiny_args()
        };
        let (mut model, inputs, mut rng) = tiny_model(&a, 2);
        let other = rollouts_with_switch_flipped(&mut model, &inputs, &a, 3, &mut rng, GRAPHS);
        assert_eq!(other["cuda_graphs"], true, "{other}");
        assert!(other["rollout_image"].as_f64().unwrap() > 0.0, "{other}");
        assert!(other["rollout_text"].as_f64().unwrap() > 0.0, "{other}");
        // No graphs on the CPU: every one of the 16 image steps ran eagerly, and the answers' steps too (3,
        // or fewer if every row drew eos).
        assert_eq!(other["graph_report"]["eager"], 16, "{other}");
        assert_eq!(other["graph_report"]["captured"], 0, "{other}");
        let text_steps = other["answer_graph_report"]["eager"].as_u64().unwrap();
        assert!((1..=3).contains(&text_steps), "{other}");
        assert_eq!(other["answer_graph_report"]["captured"], 0, "{other}");
        assert!(
            !model.static_decode(),
            "the model's own setting is restored"
        );
    }

    #[test]
    fn answers_are_timed_with_and_without_prompt_sharing_and_the_model_restored() {
        let a = tiny_args();
        let (mut model, inputs, mut rng) = tiny_model(&a, 2);
        assert!(!model.prompt_sharing());
        for (on, how) in [
            (true, SharedScoring::Auto),
            (true, SharedScoring::Cached),
            (false, SharedScoring::Auto),
        ] {
            let t = answers_with_sharing(&mut model, &inputs, &a, 3, &mut rng, on, how);
            assert!(t["rollout_text"].as_f64().unwrap() > 0.0, "{t}");
            assert!(t["score_text"].as_f64().unwrap() > 0.0, "{t}");
            assert!(
                !model.prompt_sharing() && model.shared_scoring() == SharedScoring::Auto,
                "the model's own settings are restored"
            );
        }
    }

    #[test]
    fn every_kernel_module_is_compiled_and_a_cpu_build_says_it_cannot() {
        let modules = compile_kernels();
        let names: std::collections::BTreeSet<_> = modules.iter().map(|m| m.module).collect();
        // Each module once, the trainer's AdamW among them.
        assert_eq!(names.len(), 7);
        assert_eq!(modules.len(), 7);
        assert!(names.contains("pairuni_fused_adamw") && names.contains("pairuni_draw"));
        if cfg!(feature = "cuda") {
            return;
        }
        for m in &modules {
            let e = m.error.as_deref().unwrap_or_default();
            assert!(e.contains("built without CUDA"), "{}: {e}", m.module);
            assert!(m.ptx_bytes.is_none());
        }
        let err = run_bench_gpu_kernels(BenchGpuKernelsArgs { json: true }).unwrap_err();
        assert!(err.to_string().contains("7 of 7"), "{err}");
    }

    #[test]
    fn the_graph_check_compares_captured_with_eager_steps_and_fails_without_cuda() {
        let a = tiny_args();
        let (mut model, inputs, _) = tiny_model(&a, 3);
        let c = check_graphs(&mut model, &inputs, &a).unwrap();
        // Both runs are eager on the CPU, so they agree bit for bit, but nothing was captured: no pass.
        assert_eq!(c["steps"], 16, "{c}");
        assert_eq!(c["codes_equal"], true, "{c}");
        assert_eq!(c["max_abs_logprob_diff"], 0.0, "{c}");
        let report = &c["graph_report"];
        assert_eq!(
            (report["captured"].as_u64(), report["eager"].as_u64()),
            (Some(0), Some(16)),
            "{c}"
        );
        let answers = &c["answers"];
        assert_eq!(answers["rows"], 2, "{c}");
        assert_eq!(answers["codes_equal"], true, "{c}");
        assert_eq!(answers["max_abs_logprob_diff"], 0.0, "{c}");
        let steps = answers["graph_report"]["eager"].as_u64().unwrap();
        assert!((1..=66).contains(&steps), "{c}");
        assert_eq!(answers["graph_report"]["captured"], 0, "{c}");
        assert_eq!(answers["pass"], false, "{c}");
        assert_eq!(c["pass"], false, "{c}");
        assert!(!model.static_decode(), "the model's setting is restored");
    }

    #[test]
    fn probe_splits_a_decode_step() {
        let a = tiny_args();
        let (mut model, inputs, _) = tiny_model(&a, 1);
        let p = probe_image_step(&mut model, &inputs.gen_prompts, 5.0, 3).unwrap();
        assert_eq!(p["steps"], 3);
        assert_eq!(p["cache_len_start"], a.prompt_len);
        assert!(p["forward_ms"].as_f64().unwrap() > 0.0);
        assert!(p["device_sampling_total_ms"].as_f64().unwrap() > 0.0);
        assert!(p["forward_grown_cache_ms"].as_f64().unwrap() > 0.0);
        // The probe tries every kernel set and leaves the model's choice as it found it (composed on the CPU,
        // stacking on). Their tensor counts are checked in tests/bench_cli.rs, in a process of their own:
        // candle's id counter is global, and the other tests here create tensors at the same time.
        assert_eq!(p["fused_sampling"], false);
        assert_eq!(p["stack_projections"], true);
        assert!(!model.fused_sampling() && model.stack_projections());
        for k in ["composed", "fused", "fused_unstacked"] {
            assert!(p["sampling_kernels"][k]["tensors_per_step"].is_u64(), "{p}");
        }
    }

    #[test]
    fn cached_and_static_decodes_reproduce_the_fixture_logits_with_either_kernel_set() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/janus");
        let f =
            candle_core::safetensors::load(dir.join("fixtures.safetensors"), &Device::Cpu).unwrap();
        let mut m = Janus::load(&dir, &Device::Cpu, DType::F32).unwrap();
        for (fused, layer_kernels) in [(false, false), (true, false), (true, true)] {
            m.set_fused_sampling(fused);
            m.set_layer_kernels(layer_kernels);
            let out = decoded_rows(&m, &f, layer_kernels).unwrap();
            assert_eq!(out.len(), 2, "the cached and the static decode");
            for (name, key, t) in &out {
                let e = rel_err(t, &f[*key]).unwrap();
                assert!(e < 1e-4, "{name}, fused {fused}: rel err {e}");
            }
        }
        // A static decode fed the wrong codes is far off: the rows compare what the steps compute.
        let codes = id_rows(&f["gen.codes"]).unwrap();
        let shifted: Vec<Vec<u32>> = codes
            .iter()
            .map(|r| r.iter().map(|c| (c + 1) % 16).collect())
            .collect();
        let prompts = id_rows(&f["gen.prompt_ids"]).unwrap();
        let wrong = decoded_gen_logits(&m, &prompts, &shifted, true).unwrap();
        assert!(rel_err(&wrong, &f["gen.logits"]).unwrap() > 1e-2);
    }

    #[test]
    fn old_logprobs_pad_short_rows_and_rel_err_measures_relative_error() {
        let rows: Vec<&[f32]> = vec![&[-1.0, -2.0], &[-3.0]];
        let t = old_logprobs(rows.into_iter(), (2, 2), &Device::Cpu).unwrap();
        assert_eq!(
            t.to_vec2::<f32>().unwrap(),
            vec![vec![-1.0, -2.0], vec![-3.0, 0.0]]
        );
        let r = Tensor::new(&[2f32, -4.0], &Device::Cpu).unwrap();
        let a = Tensor::new(&[2f32, -3.0], &Device::Cpu).unwrap();
        assert!((rel_err(&a, &r).unwrap() - 0.25).abs() < 1e-12);
        assert!(rel_err(&a, &Tensor::new(&[1f32], &Device::Cpu).unwrap()).is_err());
        let lp = host_log_softmax(&[0.0, 0.0]);
        assert!((lp[0] - (0.5f64).ln()).abs() < 1e-12);
    }
}
