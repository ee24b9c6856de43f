//! Configuration of the trainers: the `[sft]` and `[train]` sections of a pairuni TOML file.
//!
//! Every open choice of METHOD.md §3 is a field here with the default stated there. Defaults that METHOD.md
//! leaves to us (step counts, learning rate, group sizes) are chosen for the toy world on a 2-core CPU; the
//! paper's Janus-Pro values are given in each field's doc comment and in `configs/janus-pro-*.toml`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::run_loop::Schedule;

/// Where a trainer reads its examples from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SftSource {
    /// The understanding and generation pools (`understanding.jsonl`, `generation.jsonl`).
    Pools,
    /// Both sides of every PairUG record.
    Pairs,
}

/// Learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The peak rate at every step (after the warm-up, if any).
    Constant,
    /// Linear warm-up to the peak, then cosine decay to `min_lr_ratio × peak` at the last step.
    Cosine,
}

/// Which parameters receive gradient updates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trainable {
    /// The language model only; vision encoder, VQ / patch codebook, aligners and generation head stay frozen.
    LanguageModel,
    /// Every parameter.
    All,
    /// Parameters whose names start with one of these prefixes.
    Custom(Vec<String>),
}

/// Optimiser and schedule, shared by SFT and PairGRPO. Both sections use the same defaults so that a partial
/// `[sft.optim]` / `[train.optim]` table never silently changes an unset key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate of AdamW. Default 1e-3 (toy model from scratch); the paper used 1e-6 on Janus-Pro.
    pub lr: f64,
    /// AdamW β₁. Default 0.9.
    pub beta1: f64,
    /// AdamW β₂. Default 0.999.
    pub beta2: f64,
    /// AdamW ε. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay (Loshchilov & Hutter), applied as `θ ← θ − lr·wd·θ`. Default 0.0.
    pub weight_decay: f64,
    /// Clip the global gradient L2 norm to this value; 0 disables clipping. Default 1.0.
    pub max_grad_norm: f64,
    /// Learning-rate schedule: `constant` | `cosine` (warm-up then cosine). Default `constant`.
    pub schedule: LrSchedule,
    /// Linear warm-up steps from 0 to the peak rate (both schedules). Default 0.
    pub warmup_steps: usize,
    /// Cosine floor as a fraction of the peak rate. Default 0.1.
    pub min_lr_ratio: f64,
    /// Trained parameters: `"language_model"` | `"all"` | `{ custom = ["prefix", …] }`. Default `all` (the toy
    /// model is small); METHOD.md's default for Janus-Pro is `language_model`. Encoders left frozen (vision
    /// tower and aligner, code embeddings and aligner) are not differentiated at all (`Janus::select_trained`).
    pub trainable: Trainable,
    /// Keep an f32 master copy of every trained weight stored in bf16/f16 and apply the updates to it, rounding
    /// to the weight's dtype after each step: an update of lr 1e-6 is far below bf16's spacing (≈ 1.2e-4 at a
    /// weight of 0.02), so without it most steps round back to the old weight. Costs 4 bytes per trained
    /// parameter; no effect on f32 weights. Default true.
    pub master_weights: bool,
    /// Each variable's update as one CUDA kernel, in place, with the same arithmetic as the composed update
    /// (`pairuni_rl::fused_adamw`; its first call is checked against the composition): `auto` | `on` | `off`.
    /// `auto` is on (measured on an H200, docs/GPU.md: the composed update ran the Janus-Pro-1B step out of the
    /// card's memory); it acts on CUDA devices only. Default `auto`.
    pub fused: pairuni_model::config::Toggle,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
            min_lr_ratio: 0.1,
            trainable: Trainable::All,
            master_weights: true,
            fused: pairuni_model::config::Toggle::Auto,
        }
    }
}

/// Supervised warm-up (`pairuni sft`): cross-entropy on answers, captions and image codes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Data source: `pools` | `pairs`. Default `pools`.
    pub source: SftSource,
    /// Understanding pool (JSONL of UnderstandingSample). Default `runs/toy/world/understanding.jsonl`.
    pub understanding: PathBuf,
    /// Generation pool (JSONL of GenerationSample). Default `runs/toy/world/generation.jsonl`.
    pub generation: PathBuf,
    /// PairUG file, used when `source = "pairs"`. Default `runs/toy/pairs.jsonl`.
    pub pairs: PathBuf,
    /// Run folder (config.toml, metrics.jsonl, checkpoints/, final/). Default `runs/toy/sft`.
    pub out_dir: PathBuf,
    /// Model folder to start from; absent (default) = a new toy model with seeded random weights, its
    /// word-level tokenizer built from the toy world's vocabulary and its patch codebook fitted on pool images.
    pub init: Option<PathBuf>,
    /// Pool images the new toy model's patch codebook is fitted on (the first ones of the generation pool).
    /// Default 1000.
    pub codebook_images: usize,
    /// Optimiser steps. Default 300.
    pub steps: usize,
    /// Understanding examples (answer or caption) per step. Default 16.
    pub batch_understanding: usize,
    /// Generation examples (prompt → image codes) per step. Default 16.
    pub batch_generation: usize,
    /// Loss weight of answer tokens (image + question → answer). Default 1.0.
    pub answer_weight: f64,
    /// Loss weight of caption tokens (image + "describe" → caption); 0 disables captions. Default 0.5.
    pub caption_weight: f64,
    /// Loss weight of image-code tokens (prompt → codes of the reference image). Default 1.0.
    pub image_weight: f64,
    /// Probability that a generation example's prompt is blanked (unconditional row), so that classifier-free
    /// guidance has a trained unconditional branch. Default 0.1.
    pub uncond_prob: f64,
    /// Hold back this many understanding samples (the pool's last ones) from SFT, for held-out checks. Default 0.
    pub holdout: usize,
    /// Optimiser and schedule (the `[sft.optim]` table; defaults as [`OptimConfig`]).
    pub optim: OptimConfig,
    /// Examples per forward and backward pass of each kind (answers, captions, image codes); the micro-batches'
    /// gradients are summed to the step's (gradient accumulation, with the step's token counts as denominators).
    /// 0 scores each kind in one pass. Default 24: the toy recipe's 48 answers, 24 captions and 16 code sequences
    /// make four passes, which run side by side on the CPU's cores (docs/BENCHMARKS.md "CPU passes"). The size
    /// changes the order of the gradient sums, the thread count never.
    pub micro_batch: usize,
    /// Micro-batch passes in flight at once, each from its own host thread, merged in pass order (as
    /// `[train] concurrent_passes`). 0 = auto: 1 on accelerators; on the CPU one per rayon thread when candle's
    /// element-wise ops run on the calling thread (`CANDLE_NUM_THREADS=1`, which the `pairuni` binary sets), else 1.
    /// Default 0.
    pub concurrent_passes: usize,
    /// Write a checkpoint every this many steps (and at the end); 0 = only at the end. Default 100.
    pub checkpoint_every: usize,
    /// Evaluate on the held-out benchmarks of `eval_bench` before the first step, every this many steps and
    /// after the last (`eval.jsonl` and `eval/step-NNNNNN/` in the run folder, with the `[eval]` recipe); 0 = never.
    /// Default 0.
    pub eval_every: usize,
    /// Benchmark folder of those evaluations (as `pairuni eval --bench` takes); needed when `eval_every` is set.
    pub eval_bench: Option<PathBuf>,
}

impl SftConfig {
    /// When the run checkpoints and evaluates.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            steps: self.steps,
            checkpoint_every: self.checkpoint_every,
            eval_every: self.eval_every,
        }
    }
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            source: SftSource::Pools,
            understanding: PathBuf::from("runs/toy/world/understanding.jsonl"),
            generation: PathBuf::from("runs/toy/world/generation.jsonl"),
            pairs: PathBuf::from("runs/toy/pairs.jsonl"),
            out_dir: PathBuf::from("runs/toy/sft"),
            init: None,
            codebook_images: 1000,
            steps: 300,
            batch_understanding: 16,
            batch_generation: 16,
            answer_weight: 1.0,
            caption_weight: 0.5,
            image_weight: 1.0,
            uncond_prob: 0.1,
            holdout: 0,
            optim: OptimConfig::default(),
            micro_batch: 24,
            concurrent_passes: 0,
            checkpoint_every: 100,
            eval_every: 0,
            eval_bench: None,
        }
    }
}

/// How understanding and generation sides are put together in a batch (baselines of METHOD.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pairing {
    /// PairUG pairs as built: both sides of a pair enter the same update with the pair weight.
    Paired,
    /// Understanding and generation sides are shuffled independently every epoch (no pair structure; weight 1).
    Unpaired,
    /// One fixed random matching of understanding to generation sides, drawn once from the seed (weight 1).
    Random,
}

/// Which PairUG records are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subset {
    /// Every record.
    All,
    /// Aligned pairs only.
    Aligned,
    /// Retrieved pairs only.
    Retrieved,
}

/// Pair weight w_p of a retrieved pair with similarity s (aligned pairs always get 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairWeighting {
    /// w = √s (the paper).
    Sqrt,
    /// w = s.
    Linear,
    /// w = 1.
    None,
}

/// Normalisation of rewards inside a task group before they become advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardScaling {
    /// A = (r − mean) / (std + 1e-4) (GRPO).
    Std,
    /// A = r − mean (Dr.GRPO).
    None,
}

/// How per-token losses are reduced to one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// Token mean within each modality (text answers, image codes), then the sum of the two, so that 64/576 image
    /// codes do not drown a short answer.
    ModalityTokenMean,
    /// One token mean over every token of the batch (DAPO).
    TokenMean,
    /// Mean over sequences of each sequence's token mean (original GRPO).
    SequenceMean,
    /// Dr.GRPO: per modality, token sum divided by (sequences × that modality's maximum length), then summed.
    DrGrpo,
}

/// KL estimator between policy and reference, per token (Schulman's k1/k2/k3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// k1 = log π − log π_ref.
    K1,
    /// k2 = ½ (log π − log π_ref)².
    K2,
    /// k3 = π_ref/π − log(π_ref/π) − 1 (GRPO's choice).
    K3,
}

/// Which distribution the image-code log-probs are read from when images were sampled with CFG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogprobPolicy {
    /// The conditional branch (T2I-R1, CoRL).
    Conditional,
    /// The guided mix l_u + w (l_c − l_u) actually sampled from.
    GuidedMix,
}

/// Reward functions available to PairGRPO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// Understanding: 1 if the parsed answer (letter or yes/no) equals the gold answer.
    Accuracy,
    /// Understanding: multiple-choice accuracy only (0 for yes/no samples).
    McqAccuracy,
    /// Understanding: yes/no accuracy only (0 for multiple-choice samples).
    YesNoAccuracy,
    /// Generation: toy-GenEval binary verdict (every clause holds).
    GenevalBinary,
    /// Generation: toy-GenEval dense score, the fraction of satisfied clauses.
    GenevalDense,
}

/// One weighted reward term.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardTerm {
    /// The reward function.
    pub kind: RewardKind,
    /// Its weight in the sum.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// PairGRPO (`pairuni train`), METHOD.md §3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// PairUG file to train on. Default `runs/toy/pairs.jsonl`.
    pub pairs: PathBuf,
    /// Model folder to start from (a `Janus::load` folder, e.g. the SFT run's `final/`). Default
    /// `runs/toy/sft/final`.
    pub init: PathBuf,
    /// Run folder (config.toml, metrics.jsonl, checkpoints/, final/). Default `runs/toy/train`.
    pub out_dir: PathBuf,
    /// Optimiser steps (one rollout batch each). Default 60; the paper ran ≤ 1,200.
    pub steps: usize,
    /// Pairs per rollout batch (the batch unit is pairs). Default 8; the paper's global batch was 16.
    pub batch_pairs: usize,
    /// G_u: text rollouts per understanding side. Default 8 (paper: 8 at 1B, 4 at 7B).
    pub group_size_und: usize,
    /// G_g: image rollouts per generation side. Default 8 (paper: 8 at 1B, 4 at 7B).
    pub group_size_gen: usize,
    /// Sampling temperature of answers. Default 1.0 (paper).
    pub temperature: f64,
    /// Sampling temperature of image codes. Default 1.0 (paper).
    pub image_temperature: f64,
    /// Nucleus threshold for both modalities; 1.0 disables it. Default 1.0.
    pub top_p: f64,
    /// Longest sampled answer in tokens (the stop token included). Default 8 (toy answers are one word).
    pub max_new_tokens: usize,
    /// Classifier-free guidance weight of image rollouts. Default 5.0 (paper).
    pub cfg_weight: f64,
    /// Image-code log-probs under CFG: `conditional` | `guided_mix`. Default `conditional`.
    pub logprob_policy: LogprobPolicy,
    /// μ: optimiser updates per rollout batch; old log-probs are kept from the first. Default 1.
    pub updates_per_batch: usize,
    /// Rollouts per forward and backward pass of each modality when updating; the micro-batches' gradients are
    /// summed to the whole batch's (gradient accumulation, with the batch's loss denominators). 0 scores each
    /// modality in one pass, which holds every activation of the batch's 16·(G_u + G_g) rollouts at once: at
    /// Janus-Pro shapes use G (8) or fewer. Default 16: several passes, which run side by side on the CPU's cores
    /// (docs/BENCHMARKS.md "CPU passes") and two at a time on a GPU. The size changes the order of the gradient
    /// sums, the thread count never.
    pub micro_batch: usize,
    /// Micro-batch passes in flight at once, each issued from its own host thread (on a GPU onto the device's
    /// stream, as a GPU pass is bound by its host; on the CPU each on a core of its own); their results are merged
    /// in pass order, so the update is the same whatever the number. 0 = auto: 1 on accelerators; on the CPU one
    /// per rayon thread when candle's element-wise ops run on the calling thread (`CANDLE_NUM_THREADS=1`, which the
    /// `pairuni` binary sets), else 1. Acts with several passes (`micro_batch` > 0). Default 0.
    pub concurrent_passes: usize,
    /// Lower clip range ε_low (ratio floor 1 − ε_low). Default 0.2.
    pub epsilon_low: f64,
    /// Upper clip range ε_high (ratio ceiling 1 + ε_high, DAPO's clip-higher). Default 0.28.
    pub epsilon_high: f64,
    /// KL coefficient β; 0 builds no reference model. Default 0.0 (paper).
    pub beta: f64,
    /// KL estimator when β > 0: `k1` | `k2` | `k3`. Default `k3`.
    pub kl_estimator: KlEstimator,
    /// Loss aggregation: `modality_token_mean` | `token_mean` | `sequence_mean` | `dr_grpo`. Default
    /// `modality_token_mean`.
    pub loss_aggregation: LossAggregation,
    /// Reward scaling inside a task group: `std` | `none`. Default `std`.
    pub scale_rewards: RewardScaling,
    /// Baseline switch: `paired` | `unpaired` | `random`. Default `paired`.
    pub pairing: Pairing,
    /// Baseline switch: `all` | `aligned` | `retrieved`. Default `all`.
    pub subset: Subset,
    /// Baseline switch: pair weight of retrieved pairs `sqrt` | `linear` | `none`. Default `sqrt`.
    pub pair_weight: PairWeighting,
    /// Understanding reward terms, summed with their weights. Default `[{ kind = "accuracy", weight = 1.0 }]`.
    pub und_rewards: Vec<RewardTerm>,
    /// Generation reward terms, summed with their weights. Default `[{ kind = "geneval_dense", weight = 1.0 }]`
    /// (dense gives a usable signal to a weak toy model; the paper used HPSv2.1).
    pub gen_rewards: Vec<RewardTerm>,
    /// Optimiser and schedule (the `[train.optim]` table; defaults as [`OptimConfig`]: lr 1e-3 constant, clip 1.0,
    /// all parameters — the toy model; the paper used lr 1e-6 on Janus-Pro).
    pub optim: OptimConfig,
    /// Write a checkpoint every this many steps (and at the end); 0 = only at the end. Default 20.
    pub checkpoint_every: usize,
    /// Evaluate on the held-out benchmarks of `eval_bench` before the first step, every this many steps and
    /// after the last (`eval.jsonl` and `eval/step-NNNNNN/` in the run folder, with the `[eval]` recipe); 0 = never.
    /// Default 0.
    pub eval_every: usize,
    /// Benchmark folder of those evaluations (as `pairuni eval --bench` takes); needed when `eval_every` is set.
    pub eval_bench: Option<PathBuf>,
    /// Consecutive non-finite steps (loss, gradient or reward) that stop the run. Default 3.
    pub max_nonfinite_steps: usize,
}

impl TrainConfig {
    /// When the run checkpoints and evaluates.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            steps: self.steps,
            checkpoint_every: self.checkpoint_every,
            eval_every: self.eval_every,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            pairs: PathBuf::from("runs/toy/pairs.jsonl"),
            init: PathBuf::from("runs/toy/sft/final"),
            out_dir: PathBuf::from("runs/toy/train"),
            steps: 60,
            batch_pairs: 8,
            group_size_und: 8,
            group_size_gen: 8,
            temperature: 1.0,
            image_temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 8,
            cfg_weight: 5.0,
            logprob_policy: LogprobPolicy::Conditional,
            updates_per_batch: 1,
            micro_batch: 16,
            concurrent_passes: 0,
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            beta: 0.0,
            kl_estimator: KlEstimator::K3,
            loss_aggregation: LossAggregation::ModalityTokenMean,
            scale_rewards: RewardScaling::Std,
            pairing: Pairing::Paired,
            subset: Subset::All,
            pair_weight: PairWeighting::Sqrt,
            und_rewards: vec![RewardTerm {
                kind: RewardKind::Accuracy,
                weight: 1.0,
            }],
            gen_rewards: vec![RewardTerm {
                kind: RewardKind::GenevalDense,
                weight: 1.0,
            }],
            optim: OptimConfig::default(),
            checkpoint_every: 20,
            eval_every: 0,
            eval_bench: None,
            max_nonfinite_steps: 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    struct File {
        sft: SftConfig,
        train: TrainConfig,
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = toml::to_string_pretty(&File::default()).unwrap();
        let back: File = toml::from_str(&text).unwrap();
        assert_eq!(back, File::default());
    }

    #[test]
    fn every_knob_is_settable_from_toml() {
        let text = r#"
            [train]
            pairing = "random"
            subset = "retrieved"
            pair_weight = "linear"
            loss_aggregation = "dr_grpo"
            scale_rewards = "none"
            kl_estimator = "k2"
            beta = 0.04
            logprob_policy = "guided_mix"
            updates_per_batch = 2
            und_rewards = [{ kind = "mcq_accuracy", weight = 0.5 }, { kind = "yes_no_accuracy" }]
            gen_rewards = [{ kind = "geneval_binary" }]
            [train.optim]
            schedule = "cosine"
            trainable = { custom = ["model.language_model."] }
            [sft]
            source = "pairs"
            init = "runs/x/final"
        "#;
        let f: File = toml::from_str(text).unwrap();
        assert_eq!(f.train.pairing, Pairing::Random);
        assert_eq!(f.train.subset, Subset::Retrieved);
        assert_eq!(f.train.pair_weight, PairWeighting::Linear);
        assert_eq!(f.train.loss_aggregation, LossAggregation::DrGrpo);
        assert_eq!(f.train.scale_rewards, RewardScaling::None);
        assert_eq!(f.train.kl_estimator, KlEstimator::K2);
        assert_eq!(f.train.logprob_policy, LogprobPolicy::GuidedMix);
        assert_eq!(
            f.train.und_rewards[1],
            RewardTerm {
                kind: RewardKind::YesNoAccuracy,
                weight: 1.0
            }
        );
        assert_eq!(
            f.train.optim.trainable,
            Trainable::Custom(vec!["model.language_model.".into()])
        );
        assert_eq!(
            f.train.optim.lr,
            OptimConfig::default().lr,
            "unset keys keep their defaults"
        );
        assert_eq!(f.sft.source, SftSource::Pairs);
        assert_eq!(f.sft.init, Some(PathBuf::from("runs/x/final")));
        let err = toml::from_str::<File>("[train]\nepsilon = 0.2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `epsilon`"), "{err}");
    }
}
