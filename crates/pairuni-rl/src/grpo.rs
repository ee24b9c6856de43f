//! The PairGRPO trainer (METHOD.md §3): for a batch of pairs, sample G_u answers and G_g images per pair,
//! score them, turn rewards into per-task-group advantages scaled by the pair weight, and take μ clipped
//! policy-gradient steps on the same rollouts.
//!
//! [`GrpoTrainer::step`] is one rollout batch (used by `pairuni bench step`); [`train`] is the whole run with a
//! run folder, checkpoints, resume and a progress bar.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use pairuni_data::{PairRecord, RgbImage};
use pairuni_model::{
    CfgLogprobPolicy, ImageRollout, ImageSampling, Janus, ParamSelection, TextRollout, TextSampling,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use crate::config::{LogprobPolicy, TrainConfig, Trainable};
use crate::data::PairLoader;
use crate::loss::{self, Counts, Tokens};
use crate::optim::{accumulate_grads, learning_rate, AdamW};
use crate::passes::{bind_device, concurrent_passes, run_in_order, Merged};
use crate::reward::{is_understanding_reward, RewardInput, Scored, WeightedSum};
use crate::run::{restore_vars, RngState, RunDir, TrainState};
use crate::run_loop::{self, RunOptions, Stepper, TrainSummary};
use crate::TrainError;

/// Maps the config's parameter selection onto the model's.
pub fn param_selection(t: &Trainable) -> ParamSelection {
    match t {
        Trainable::LanguageModel => ParamSelection::LanguageModel,
        Trainable::All => ParamSelection::All,
        Trainable::Custom(p) => ParamSelection::Custom(p.clone()),
    }
}

/// Loads images by path once (toy images are tiny and reused every epoch).
#[derive(Default)]
pub struct ImageCache {
    images: HashMap<PathBuf, RgbImage>,
}

impl ImageCache {
    /// The image at `base/rel`.
    pub fn get(&mut self, base: &Path, rel: &str) -> Result<RgbImage, TrainError> {
        let path = base.join(rel);
        if let Some(img) = self.images.get(&path) {
            return Ok(img.clone());
        }
        let img = pairuni_data::load_rgb(&path).map_err(|e| TrainError::Data(e.to_string()))?;
        self.images.insert(path, img.clone());
        Ok(img)
    }
}

/// What one step did; `metrics` uses TRL's names.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// 1-based step number.
    pub step: usize,
    /// Metric name → value (also written to metrics.jsonl).
    pub metrics: Map<String, Value>,
    /// Whether the update was skipped because something was not finite.
    pub skipped: bool,
}

/// Rollouts of one batch with their rewards and advantages.
struct Batch {
    text: Vec<TextRollout>,
    images: Vec<ImageRollout>,
    adv_text: Vec<f32>,
    adv_image: Vec<f32>,
}

/// PairGRPO state: policy, optional frozen reference, optimiser, data position, random generator.
pub struct GrpoTrainer {
    cfg: TrainConfig,
    policy: Janus,
    reference: Option<Janus>,
    loader: PairLoader,
    pairs_dir: PathBuf,
    images: ImageCache,
    und_reward: WeightedSum,
    gen_reward: WeightedSum,
    opt: AdamW,
    rng: ChaCha8Rng,
    /// Completed steps.
    pub step: usize,
    nonfinite_streak: usize,
    nonfinite_total: usize,
}

impl GrpoTrainer {
    /// A trainer at step 0. `pairs_dir` is the folder image paths of `pairs` are relative to.
    pub fn new(
        cfg: TrainConfig,
        seed: u64,
        mut policy: Janus,
        pairs: Vec<PairRecord>,
        pairs_dir: PathBuf,
    ) -> Result<Self, TrainError> {
        validate(&cfg)?;
        let loader = PairLoader::new(pairs, cfg.subset, cfg.pairing, cfg.pair_weight, seed)
            .ok_or_else(|| {
                TrainError::Config(format!(
                    "no pair is left after `train.subset = {:?}`",
                    cfg.subset
                ))
            })?;
        // β = 0 keeps no reference model at all (METHOD.md §3).
        let reference = if cfg.beta > 0.0 {
            Some(policy.clone_frozen()?)
        } else {
            None
        };
        let vars = policy.select_trained(&param_selection(&cfg.optim.trainable));
        if vars.is_empty() {
            return Err(TrainError::Config(
                "`train.optim.trainable` selects no parameter".into(),
            ));
        }
        let opt = AdamW::new(vars, &cfg.optim)?;
        Ok(Self {
            und_reward: WeightedSum::from_config(&cfg.und_rewards),
            gen_reward: WeightedSum::from_config(&cfg.gen_rewards),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6772_706f),
            cfg,
            policy,
            reference,
            loader,
            pairs_dir,
            images: ImageCache::default(),
            opt,
            step: 0,
            nonfinite_streak: 0,
            nonfinite_total: 0,
        })
    }

    /// The policy being trained.
    pub fn policy(&self) -> &Janus {
        &self.policy
    }

    /// Whether a frozen reference model is kept (only when β > 0).
    pub fn has_reference(&self) -> bool {
        self.reference.is_some()
    }

    /// Counters and positions for a checkpoint.
    pub fn state(&self) -> TrainState {
        TrainState {
            step: self.step,
            cursor: self.loader.cursor,
            rng: RngState::of(&self.rng),
            optimizer_t: self.opt.t,
            nonfinite_streak: self.nonfinite_streak,
            nonfinite_total: self.nonfinite_total,
        }
    }

    /// Writes a checkpoint of the current state into `run`.
    pub fn save_checkpoint(&self, run: &RunDir) -> Result<PathBuf, TrainError> {
        Ok(run.save_checkpoint(
            &self.policy.all_vars(),
            &self.opt.state_tensors(),
            &self.state(),
        )?)
    }

    /// Restores the latest checkpoint of `run`, if there is one; returns the step resumed from.
    pub fn resume(&mut self, run: &RunDir) -> Result<Option<usize>, TrainError> {
        let Some(ck) = run.latest_checkpoint(self.policy.device())? else {
            return Ok(None);
        };
        restore_vars(&self.policy.all_vars(), &ck.weights).map_err(TrainError::Checkpoint)?;
        self.opt.load_state(&ck.optimizer, ck.state.optimizer_t)?;
        self.rng = ck
            .state
            .rng
            .restore()
            .ok_or_else(|| TrainError::Checkpoint("state.json: unreadable rng state".into()))?;
        self.loader.cursor = ck.state.cursor;
        self.step = ck.state.step;
        self.nonfinite_streak = ck.state.nonfinite_streak;
        self.nonfinite_total = ck.state.nonfinite_total;
        Ok(Some(self.step))
    }

    fn text_sampling(&self) -> TextSampling {
        TextSampling {
            max_new_tokens: self.cfg.max_new_tokens,
            temperature: self.cfg.temperature,
            top_p: self.cfg.top_p,
            greedy: false,
        }
    }

    fn cfg_policy(&self) -> CfgLogprobPolicy {
        match self.cfg.logprob_policy {
            LogprobPolicy::Conditional => CfgLogprobPolicy::Conditional,
            LogprobPolicy::GuidedMix => CfgLogprobPolicy::GuidedMix {
                cfg_weight: self.cfg.cfg_weight,
            },
        }
    }

    /// One rollout batch and its μ updates.
    pub fn step(&mut self) -> Result<StepReport, TrainError> {
        let cfg = self.cfg.clone();
        let (gu, gg) = (cfg.group_size_und, cfg.group_size_gen);
        let items = self.loader.next_batch(cfg.batch_pairs);
        let mut m = Map::new();

        // ---- rollouts ----
        let t0 = Instant::now();
        let mut und_images = Vec::with_capacity(items.len() * gu);
        let mut questions = Vec::with_capacity(items.len() * gu);
        let mut prompts = Vec::with_capacity(items.len() * gg);
        for it in &items {
            let img = self.images.get(&self.pairs_dir, &it.und.image_path)?;
            for _ in 0..gu {
                und_images.push(img.clone());
                questions.push(it.und.question.clone());
            }
            for _ in 0..gg {
                prompts.push(it.gen.prompt.clone());
            }
        }
        let text = if gu > 0 {
            let raw = self.policy.sample_answers(
                &und_images,
                &questions,
                &self.text_sampling(),
                &mut self.rng,
            )?;
            sanitize_answers(&self.policy, raw)?
        } else {
            Vec::new()
        };
        let sampling = ImageSampling {
            cfg_weight: cfg.cfg_weight,
            temperature: cfg.image_temperature,
            top_p: cfg.top_p,
        };
        let images = if gg > 0 {
            self.policy
                .sample_images(&prompts, &sampling, &mut self.rng)?
        } else {
            Vec::new()
        };
        let decoded = if images.is_empty() {
            Vec::new()
        } else {
            self.policy
                .decode_codes(&images.iter().map(|r| r.codes.clone()).collect::<Vec<_>>())?
        };
        let time_rollout = t0.elapsed().as_secs_f64();

        // ---- rewards ----
        let t1 = Instant::now();
        let und_inputs: Vec<RewardInput> = text
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let side = &items[i / gu.max(1)].und;
                RewardInput::Answer {
                    completion: &r.text,
                    question: &side.question,
                    gold: &side.answer,
                }
            })
            .collect();
        let gen_inputs: Vec<RewardInput> = decoded
            .iter()
            .enumerate()
            .map(|(i, image)| RewardInput::Image {
                image,
                prompt: &items[i / gg.max(1)].gen.prompt,
            })
            .collect();
        let und_scores = self.und_reward.score(&und_inputs)?;
        let gen_scores = self.gen_reward.score(&gen_inputs)?;
        let time_reward = t1.elapsed().as_secs_f64();

        let adv_u = loss::group_advantages(&und_scores.total, gu, cfg.scale_rewards);
        let adv_g = loss::group_advantages(&gen_scores.total, gg, cfg.scale_rewards);
        let weights: Vec<f32> = items.iter().map(|p| p.weight).collect();
        let weighted = |adv: &[f32], g: usize| -> Vec<f32> {
            adv.iter()
                .enumerate()
                .map(|(i, a)| a * weights[i / g.max(1)])
                .collect()
        };
        let batch = Batch {
            adv_text: weighted(&adv_u.values, gu),
            adv_image: weighted(&adv_g.values, gg),
            text,
            images,
        };
        reward_metrics(&mut m, &und_scores, &gen_scores, &adv_u, &adv_g);
        m.insert("pair_weight/mean".into(), json!(mean(&weights)));
        let lens: Vec<f32> = batch
            .text
            .iter()
            .map(|r| r.answer_ids.len() as f32)
            .collect();
        m.insert("completions/mean_length".into(), json!(mean(&lens)));

        // ---- train ----
        let t2 = Instant::now();
        let rewards_finite = und_scores
            .total
            .iter()
            .chain(&gen_scores.total)
            .all(|r| r.is_finite());
        let lr = learning_rate(&cfg.optim, self.step, cfg.steps);
        let mut skipped = None;
        if !rewards_finite {
            skipped = Some("reward");
        } else {
            match self.update(&batch, lr, &mut m)? {
                None => {}
                Some(what) => skipped = Some(what),
            }
        }
        let time_train = t2.elapsed().as_secs_f64();
        self.step += 1;
        if let Some(what) = skipped {
            self.nonfinite_streak += 1;
            self.nonfinite_total += 1;
            tracing::warn!(
                step = self.step,
                what,
                streak = self.nonfinite_streak,
                "non-finite {what}: step skipped"
            );
            if self.nonfinite_streak >= cfg.max_nonfinite_steps.max(1) {
                return Err(TrainError::NonFinite {
                    step: self.step,
                    streak: self.nonfinite_streak,
                    what: what.to_string(),
                });
            }
        } else {
            self.nonfinite_streak = 0;
        }
        m.insert("learning_rate".into(), json!(lr));
        m.insert("nonfinite_skipped".into(), json!(self.nonfinite_total));
        let text_tokens: usize = batch.text.iter().map(|r| r.answer_ids.len()).sum();
        let image_tokens: usize = batch.images.iter().map(|r| r.codes.len()).sum();
        m.insert("tokens/text".into(), json!(text_tokens));
        m.insert("tokens/image".into(), json!(image_tokens));
        m.insert("time/rollout".into(), json!(time_rollout));
        m.insert("time/reward".into(), json!(time_reward));
        m.insert("time/train".into(), json!(time_train));
        m.insert("step".into(), json!(self.step));
        Ok(StepReport {
            step: self.step,
            metrics: m,
            skipped: skipped.is_some(),
        })
    }

    /// μ clipped updates on one rollout batch. Returns what was non-finite when the update was skipped.
    ///
    /// With `micro_batch` = 0 each modality is scored in one pass and both enter one backward pass; otherwise each
    /// modality is scored `micro_batch` rollouts at a time, each with its own backward pass, and the gradients are
    /// summed: every micro-batch's loss has the whole batch's denominators ([`loss::micro_batch_loss`]), so the
    /// sum is the batch's loss and gradient, with the activations of one micro-batch alive at a time.
    fn update(
        &mut self,
        b: &Batch,
        lr: f64,
        m: &mut Map<String, Value>,
    ) -> Result<Option<&'static str>, TrainError> {
        let cfg = &self.cfg;
        let pieces = pieces(b, cfg.micro_batch);
        if pieces.is_empty() {
            return Ok(None);
        }
        // One pass over every piece, or one pass per piece.
        let passes: Vec<Vec<usize>> = if cfg.micro_batch == 0 {
            vec![(0..pieces.len()).collect()]
        } else {
            (0..pieces.len()).map(|i| vec![i]).collect()
        };
        let counts = BatchCounts::of(b);
        // Reference log-probs once per batch (no gradient).
        let refs = pieces
            .iter()
            .map(|p| self.reference_logprobs(b, p))
            .collect::<Result<Vec<_>, _>>()?;
        // Old log-probs are the first pass's values: ρ ≡ 1 on-policy, exactly.
        let mut old: Vec<Option<Tensor>> = vec![None; pieces.len()];
        let mut stats = UpdateStats::default();
        let threads = concurrent_passes(cfg.concurrent_passes, self.policy.device());
        let scorer = Scorer {
            policy: &self.policy,
            temperature: cfg.temperature,
            image_temperature: cfg.image_temperature,
            cfg_policy: self.cfg_policy(),
        };
        // A copy of the variable list (Arc clones), so that the optimiser can step between updates.
        let (vars, dev) = (self.opt.vars().to_vec(), self.policy.device().clone());
        for update in 0..cfg.updates_per_batch.max(1) {
            let first = update == 0;
            let mut grads = GradStore::default();
            let mut loss_value = 0f32;
            let (mut low_high_n, mut kl_parts) = ((0f32, 0f32, 0f32), (0f32, 0f32));
            let mut skipped = None;
            let old_before = old.clone();
            // One pass: its pieces scored, its loss and (when finite) its gradients. Statistics are kept per piece
            // and summed by the merge in piece order, as a single thread sums them.
            let run_pass = |k: usize| -> Result<PassOutcome, TrainError> {
                let (mut pieces_stats, mut first_logprobs) = (Vec::new(), Vec::new());
                let mut scored = Vec::with_capacity(passes[k].len());
                for &i in &passes[k] {
                    let piece = &pieces[i];
                    let (lp, mask, ent) = scorer.score(b, piece)?;
                    let old_lp = match &old_before[i] {
                        Some(o) => o.clone(),
                        None => {
                            first_logprobs.push((i, lp.detach()));
                            lp.detach()
                        }
                    };
                    let adv = piece.advantages(b, &dev)?;
                    let (l, s, kl) = modality_loss(&lp, &old_lp, &adv, refs[i].as_ref(), cfg)?;
                    let entropy = first.then_some(&ent);
                    pieces_stats.push(PieceStats {
                        text: piece.text,
                        kl: kl.is_some(),
                        entropy: entropy.is_some(),
                        sums: piece_sums(&s, &mask, kl.as_ref(), entropy)?,
                    });
                    let max_len = if piece.text {
                        cfg.max_new_tokens
                    } else {
                        lp.dim(1)?
                    };
                    scored.push((l, mask, max_len, piece.text));
                }
                let parts: Vec<Tokens> = scored
                    .iter()
                    .map(|(v, mk, n, _)| Tokens {
                        values: v,
                        mask: mk,
                        max_len: *n,
                    })
                    .collect();
                let loss = if passes.len() == 1 {
                    loss::aggregate(&parts, cfg.loss_aggregation)?
                } else {
                    let modality = counts.modality(scored[0].3);
                    loss::micro_batch_loss(&parts[0], cfg.loss_aggregation, modality, counts.all())?
                };
                // The backward is queued before anything is read back, and the pass reads nothing: the loss
                // and statistics come back in one transfer on the merging thread, which drops the gradients
                // of a non-finite loss.
                let mut grads = GradStore::default();
                accumulate_grads(&mut grads, loss.backward()?, &vars)?;
                Ok(PassOutcome {
                    loss: loss.detach(),
                    grads,
                    pieces: pieces_stats,
                    first_logprobs,
                })
            };
            run_in_order(
                passes.len(),
                threads,
                bind_device(&dev),
                run_pass,
                |_, out| {
                    let (loss, sums) = out.read()?;
                    if !loss.is_finite() {
                        skipped = Some("loss");
                        return Ok(Merged::Stop);
                    }
                    loss_value += loss;
                    for (p, [low, high, n, kl, ent]) in out.pieces.iter().zip(sums) {
                        if p.kl {
                            kl_parts.0 += kl;
                            kl_parts.1 += n;
                        }
                        low_high_n.0 += low;
                        low_high_n.1 += high;
                        low_high_n.2 += n;
                        if p.entropy {
                            stats.add_entropy(p.text, (ent, n));
                        }
                    }
                    for (i, lp) in out.first_logprobs {
                        old[i] = Some(lp);
                    }
                    accumulate_grads(&mut grads, out.grads, &vars)?;
                    Ok(Merged::Continue)
                },
            )?;
            if let Some(what) = skipped {
                return Ok(Some(what));
            }
            if first {
                m.insert("loss".into(), json!(loss_value));
                stats.write_entropy(m);
            }
            let norm = self.opt.grad_norm(&grads)?;
            if first {
                m.insert("grad_norm".into(), json!(norm));
            }
            if !norm.is_finite() {
                return Ok(Some("gradient"));
            }
            self.opt.step_with_norm(&grads, lr, norm)?;
            stats.clip_low += low_high_n.0 / low_high_n.2.max(1.0);
            stats.clip_high += low_high_n.1 / low_high_n.2.max(1.0);
            stats.kl += kl_parts.0 / kl_parts.1.max(1.0);
        }
        let mu = cfg.updates_per_batch.max(1) as f32;
        m.insert("clip_ratio/low_mean".into(), json!(stats.clip_low / mu));
        m.insert("clip_ratio/high_mean".into(), json!(stats.clip_high / mu));
        m.insert(
            "clip_ratio/region_mean".into(),
            json!((stats.clip_low + stats.clip_high) / mu),
        );
        if cfg.beta > 0.0 {
            m.insert("kl".into(), json!(stats.kl / mu));
        }
        Ok(None)
    }

    /// The policy's log-probs [B, T] (with gradient), mask and per-token entropy of one piece of the batch.
    /// The frozen reference's log-probs of one piece (when β > 0 keeps a reference model).
    fn reference_logprobs(&self, b: &Batch, p: &Piece) -> Result<Option<Tensor>, TrainError> {
        let Some(r) = &self.reference else {
            return Ok(None);
        };
        let lp = if p.text {
            r.answer_logprobs_at(&b.text[p.rows.clone()], self.cfg.temperature)?
                .0
        } else {
            r.image_logprobs_at(
                &b.images[p.rows.clone()],
                self.cfg_policy(),
                self.cfg.image_temperature,
            )?
        };
        Ok(Some(lp.detach()))
    }
}

/// A run of consecutive rollouts of one modality, scored in one forward pass.
struct Piece {
    /// Answers (true) or images.
    text: bool,
    /// Which rollouts of that modality.
    rows: std::ops::Range<usize>,
}

impl Piece {
    /// The piece's advantages (pair weights included) as a [rows] tensor.
    fn advantages(&self, b: &Batch, dev: &candle_core::Device) -> candle_core::Result<Tensor> {
        let all = if self.text { &b.adv_text } else { &b.adv_image };
        Tensor::new(&all[self.rows.clone()], dev)
    }
}

/// The batch cut into pieces of at most `micro_batch` rollouts (0: one piece per modality), answers first.
fn pieces(b: &Batch, micro_batch: usize) -> Vec<Piece> {
    let size = if micro_batch == 0 {
        usize::MAX
    } else {
        micro_batch
    };
    [(true, b.text.len()), (false, b.images.len())]
        .into_iter()
        .flat_map(|(text, n)| {
            (0..n).step_by(size).map(move |start| Piece {
                text,
                rows: start..n.min(start.saturating_add(size)),
            })
        })
        .collect()
}

/// The real tokens and rows of each modality in a batch: the denominators of every micro-batch's loss.
struct BatchCounts {
    text: Counts,
    image: Counts,
}

impl BatchCounts {
    fn of(b: &Batch) -> Self {
        Self {
            text: Counts {
                tokens: b.text.iter().map(|r| r.answer_ids.len()).sum::<usize>() as f32,
                rows: b.text.len(),
            },
            image: Counts {
                tokens: b.images.iter().map(|r| r.codes.len()).sum::<usize>() as f32,
                rows: b.images.len(),
            },
        }
    }
    fn modality(&self, text: bool) -> Counts {
        if text {
            self.text
        } else {
            self.image
        }
    }
    fn all(&self) -> Counts {
        self.text + self.image
    }
}

/// Metrics summed over an update's passes.
#[derive(Default)]
struct UpdateStats {
    clip_low: f32,
    clip_high: f32,
    kl: f32,
    /// (Σ entropy over real tokens, real tokens) of answers and of images, from the first update.
    entropy_text: (f32, f32),
    entropy_image: (f32, f32),
}

impl UpdateStats {
    /// Adds one piece's (Σ entropy over real tokens, real tokens) from [`piece_sums`].
    fn add_entropy(&mut self, text: bool, (sum, n): (f32, f32)) {
        let acc = if text {
            &mut self.entropy_text
        } else {
            &mut self.entropy_image
        };
        acc.0 += sum;
        acc.1 += n;
    }

    /// `entropy` (answers) and `entropy/image`, for the modalities the batch has.
    fn write_entropy(&self, m: &mut Map<String, Value>) {
        for (key, (sum, n)) in [
            ("entropy", self.entropy_text),
            ("entropy/image", self.entropy_image),
        ] {
            if n > 0.0 {
                m.insert(key.into(), json!(sum / n));
            }
        }
    }
}

/// Cuts each answer at the first special token other than the stop token (an image placeholder, pad or
/// begin/end-of-image sampled as text): teacher forcing would read an extra placeholder as an image slot.
/// A cut answer keeps the tokens before it; an empty one becomes the stop token alone.
fn sanitize_answers(
    model: &Janus,
    rollouts: Vec<TextRollout>,
) -> Result<Vec<TextRollout>, TrainError> {
    let Some(tok) = model.tokenizer() else {
        return Ok(rollouts);
    };
    let special = [tok.image, tok.pad, tok.boi, tok.eoi, tok.bos];
    let eos = model.eos_token();
    rollouts
        .into_iter()
        .map(|mut r| {
            if let Some(cut) = r
                .answer_ids
                .iter()
                .position(|t| *t != eos && special.contains(t))
            {
                r.answer_ids.truncate(cut);
                r.logprobs.truncate(cut);
                if r.answer_ids.is_empty() {
                    r.answer_ids.push(eos);
                    r.logprobs.push(0.0);
                }
                let text_ids: Vec<u32> =
                    r.answer_ids.iter().copied().filter(|t| *t != eos).collect();
                r.text = model.decode_text(&text_ids)?;
            }
            Ok(r)
        })
        .collect()
}

/// Per-token loss of one modality: clipped surrogate plus β·KL; also the surrogate for clip metrics and the
/// per-token KL (detached) when it is part of the loss.
fn modality_loss(
    lp: &Tensor,
    old: &Tensor,
    adv: &Tensor,
    reference: Option<&Tensor>,
    cfg: &TrainConfig,
) -> Result<(Tensor, loss::Surrogate, Option<Tensor>), TrainError> {
    let ratio = loss::ratio(lp, old)?;
    let s = loss::clipped_surrogate(&ratio, adv, cfg.epsilon_low, cfg.epsilon_high)?;
    let mut per_token = s.loss.clone();
    let mut kl_detached = None;
    if let (Some(r), true) = (reference, cfg.beta > 0.0) {
        let kl = loss::kl_per_token(lp, r, cfg.kl_estimator)?;
        kl_detached = Some(kl.detach());
        per_token = (per_token + (kl * cfg.beta)?)?;
    }
    Ok((per_token, s, kl_detached))
}

/// One piece's statistics over its real tokens, left on the device: [Σ clipped low, Σ clipped high, real tokens,
/// Σ KL, Σ entropy] (0 for KL or entropy not computed).
fn piece_sums(
    s: &loss::Surrogate,
    mask: &Tensor,
    kl: Option<&Tensor>,
    entropy: Option<&Tensor>,
) -> Result<Tensor, TrainError> {
    let masked_sum = |t: &Tensor| (t * mask)?.sum_all()?.to_dtype(DType::F32);
    let zero = || Tensor::zeros((), DType::F32, mask.device());
    Ok(Tensor::stack(
        &[
            masked_sum(&s.clipped_low)?,
            masked_sum(&s.clipped_high)?,
            mask.sum_all()?.to_dtype(DType::F32)?,
            kl.map_or_else(zero, masked_sum)?,
            entropy.map_or_else(zero, |e| masked_sum(&e.detach()))?,
        ],
        0,
    )?)
}

/// What one pass of an update hands to the merge.
struct PassOutcome {
    /// The pass's loss (its share of the batch's loss), on the device.
    loss: Tensor,
    /// The trained variables' gradients (dropped by the merge when the loss is not finite).
    grads: GradStore,
    /// What each of the pass's pieces computed, in order.
    pieces: Vec<PieceStats>,
    /// The first update's log-probs of each piece (the old log-probs of the later updates).
    first_logprobs: Vec<(usize, Tensor)>,
}

impl PassOutcome {
    /// The loss and each piece's sums ([`piece_sums`]), read back in one transfer.
    fn read(&self) -> Result<(f32, Vec<[f32; 5]>), TrainError> {
        let mut parts = vec![self.loss.to_dtype(DType::F32)?.reshape(1)?];
        parts.extend(self.pieces.iter().map(|p| p.sums.clone()));
        let values = Tensor::cat(&parts, 0)?.to_vec1::<f32>()?;
        let sums = values[1..]
            .chunks_exact(5)
            .map(|c| [c[0], c[1], c[2], c[3], c[4]])
            .collect();
        Ok((values[0], sums))
    }
}

/// One piece's contribution to an update's statistics.
struct PieceStats {
    text: bool,
    /// Whether its KL entered the loss (β > 0 with a reference).
    kl: bool,
    /// Whether its entropy was computed (the first update).
    entropy: bool,
    /// [`piece_sums`], on the device until the merge reads them.
    sums: Tensor,
}

/// What scoring a piece needs of the trainer (shared by the pass threads).
struct Scorer<'a> {
    policy: &'a Janus,
    temperature: f64,
    image_temperature: f64,
    cfg_policy: CfgLogprobPolicy,
}

impl Scorer<'_> {
    /// The policy's log-probs, mask and entropy of one piece.
    fn score(&self, b: &Batch, p: &Piece) -> Result<(Tensor, Tensor, Tensor), TrainError> {
        if p.text {
            let text = &b.text[p.rows.clone()];
            return Ok(self
                .policy
                .answer_logprobs_entropy(text, self.temperature)?);
        }
        let images = &b.images[p.rows.clone()];
        let (lp, ent) =
            self.policy
                .image_logprobs_entropy(images, self.cfg_policy, self.image_temperature)?;
        let mask = lp.ones_like()?;
        Ok((lp, mask, ent))
    }
}

fn mean(v: &[f32]) -> f32 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f32>() / v.len() as f32
    }
}

fn reward_metrics(
    m: &mut Map<String, Value>,
    und: &Scored,
    gen: &Scored,
    adv_u: &loss::Advantages,
    adv_g: &loss::Advantages,
) {
    let all: Vec<f32> = und.total.iter().chain(&gen.total).copied().collect();
    m.insert("reward".into(), json!(mean(&all)));
    let stds: Vec<f32> = adv_u
        .group_std
        .iter()
        .chain(&adv_g.group_std)
        .copied()
        .collect();
    m.insert("reward_std".into(), json!(mean(&stds)));
    m.insert("reward/und".into(), json!(mean(&und.total)));
    m.insert("reward/gen".into(), json!(mean(&gen.total)));
    for (name, scores) in und.parts.iter().chain(&gen.parts) {
        m.insert(format!("rewards/{name}/mean"), json!(mean(scores)));
    }
    let groups = adv_u.groups + adv_g.groups;
    let zero = adv_u.zero_std_groups + adv_g.zero_std_groups;
    m.insert(
        "frac_reward_zero_std".into(),
        json!(zero as f32 / groups.max(1) as f32),
    );
}

/// Checks knob combinations that cannot work, naming the field.
pub fn validate(cfg: &TrainConfig) -> Result<(), TrainError> {
    let bad = |f: &str, why: &str| Err(TrainError::Config(format!("`train.{f}`: {why}")));
    if cfg.batch_pairs == 0 {
        return bad("batch_pairs", "must be at least 1");
    }
    if cfg.group_size_und + cfg.group_size_gen == 0 {
        return bad(
            "group_size_und",
            "both group sizes are 0: nothing to train on",
        );
    }
    if cfg.temperature <= 0.0 {
        return bad(
            "temperature",
            "must be > 0 (log-probs are read at the sampling temperature)",
        );
    }
    if cfg.image_temperature <= 0.0 {
        return bad(
            "image_temperature",
            "must be > 0 (argmax images have no policy gradient)",
        );
    }
    if cfg.max_new_tokens == 0 {
        return bad("max_new_tokens", "must be at least 1");
    }
    if cfg.beta < 0.0 {
        return bad("beta", "must be ≥ 0");
    }
    if cfg.epsilon_low < 0.0 || cfg.epsilon_low >= 1.0 || cfg.epsilon_high < 0.0 {
        return bad("epsilon_low", "need 0 ≤ ε_low < 1 and ε_high ≥ 0");
    }
    if let Some(t) = cfg
        .und_rewards
        .iter()
        .find(|t| !is_understanding_reward(t.kind))
    {
        return bad(
            "und_rewards",
            &format!("{:?} scores images, not answers", t.kind),
        );
    }
    if let Some(t) = cfg
        .gen_rewards
        .iter()
        .find(|t| is_understanding_reward(t.kind))
    {
        return bad(
            "gen_rewards",
            &format!("{:?} scores answers, not images", t.kind),
        );
    }
    Ok(())
}

/// Reads the PairUG file named in `cfg.pairs`.
pub fn read_pairs(path: &Path) -> Result<Vec<PairRecord>, TrainError> {
    pairuni_data::jsonl::read_pairs(path).map_err(|e| TrainError::Data(e.to_string()))
}

/// The whole PairGRPO run: open (or resume) `cfg.out_dir`, train to `cfg.steps`, checkpoint, save `final/`.
pub fn train(
    cfg: &TrainConfig,
    seed: u64,
    policy: Janus,
    opts: &RunOptions,
) -> Result<TrainSummary, TrainError> {
    let pairs = read_pairs(&cfg.pairs)?;
    let pairs_dir = cfg
        .pairs
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut trainer = GrpoTrainer::new(cfg.clone(), seed, policy, pairs, pairs_dir)?;
    run_loop::run(&mut trainer, &cfg.out_dir, cfg.schedule(), opts)
}

impl Stepper for GrpoTrainer {
    const LABEL: &'static str = "PairGRPO";
    fn steps_done(&self) -> usize {
        self.step
    }
    fn run_step(&mut self) -> Result<Map<String, Value>, TrainError> {
        Ok(self.step()?.metrics)
    }
    fn resume_from(&mut self, run: &RunDir) -> Result<Option<usize>, TrainError> {
        self.resume(run)
    }
    fn checkpoint(&self, run: &RunDir) -> Result<(), TrainError> {
        self.save_checkpoint(run).map(|_| ())
    }
    fn model(&self) -> &Janus {
        self.policy()
    }
    fn progress_message(m: &Map<String, Value>) -> String {
        format!(
            "reward und {:.3} gen {:.3}",
            run_loop::metric(m, "reward/und"),
            run_loop::metric(m, "reward/gen")
        )
    }
}

/// Mean of a metric over a slice of steps (None if absent everywhere).
pub fn metric_mean(metrics: &[Map<String, Value>], key: &str) -> Option<f64> {
    let v: Vec<f64> = metrics
        .iter()
        .filter_map(|m| m.get(key).and_then(Value::as_f64))
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}
