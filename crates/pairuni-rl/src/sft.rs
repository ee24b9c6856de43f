//! Supervised warm-up: cross-entropy on answers (image + question → answer), captions (image → caption) and
//! image codes (prompt → the image tokenizer's codes of the reference image), mixed in every step.
//!
//! Used to bring the toy model from random weights to a deliberately imperfect starting point for PairGRPO.
//! Examples come from the pools or from both sides of PairUG records. Batches are drawn with the trainer's
//! own generator, whose state is checkpointed, so a resumed run continues exactly.

use std::path::Path;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use pairuni_data::{GenerationSample, RgbImage, UnderstandingSample};
use pairuni_model::config::Placement;
use pairuni_model::{CfgLogprobPolicy, ImageRollout, Janus, TextRollout};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use crate::config::{SftConfig, SftSource};
use crate::data::Cursor;
use crate::grpo::{param_selection, ImageCache};
use crate::optim::{accumulate_grads, learning_rate, AdamW};
use crate::passes::{bind_device, concurrent_passes, run_in_order, Merged};
use crate::run::{restore_vars, RngState, RunDir, TrainState};
use crate::run_loop::{self, RunOptions, Stepper, TrainSummary};
use crate::TrainError;

/// The question used for caption examples (every word is in the toy vocabulary).
pub const CAPTION_QUESTION: &str = "What is in the image?";

/// Image + question → target text.
struct TextExample {
    pixels: Tensor,
    prompt_ids: Vec<u32>,
    target_ids: Vec<u32>,
}

/// Prompt → image codes (plus the unconditional prompt row for CFG dropout).
struct CodeExample {
    prompt_ids: Vec<u32>,
    uncond_ids: Vec<u32>,
    codes: Vec<u32>,
}

/// The SFT trainer state.
pub struct SftTrainer {
    cfg: SftConfig,
    model: Janus,
    answers: Vec<TextExample>,
    captions: Vec<TextExample>,
    codes: Vec<CodeExample>,
    opt: AdamW,
    rng: ChaCha8Rng,
    /// Completed steps.
    pub step: usize,
    nonfinite_streak: usize,
    nonfinite_total: usize,
}

/// Raw examples before tokenisation: (image, question, target) and (prompt, image).
#[derive(Default)]
pub struct SftData {
    /// (image, question, answer).
    pub answers: Vec<(RgbImage, String, String)>,
    /// (image, caption).
    pub captions: Vec<(RgbImage, String)>,
    /// (prompt, reference image).
    pub generations: Vec<(String, RgbImage)>,
}

impl SftData {
    /// Reads the examples `cfg.source` names.
    pub fn load(cfg: &SftConfig) -> Result<Self, TrainError> {
        let mut images = ImageCache::default();
        let mut data = SftData::default();
        let data_err = |e: pairuni_data::DataError| TrainError::Data(e.to_string());
        let folder = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
        match cfg.source {
            SftSource::Pools => {
                let und: Vec<UnderstandingSample> =
                    pairuni_data::jsonl::read_understanding_pool(&cfg.understanding)
                        .map_err(data_err)?;
                let keep = und.len().saturating_sub(cfg.holdout);
                let base = folder(&cfg.understanding);
                for s in &und[..keep] {
                    data.answers.push((
                        images.get(&base, &s.image_path)?,
                        s.question.clone(),
                        s.answer.clone(),
                    ));
                }
                let gen: Vec<GenerationSample> =
                    pairuni_data::jsonl::read_generation_pool(&cfg.generation).map_err(data_err)?;
                let base = folder(&cfg.generation);
                for s in &gen {
                    let img = images.get(&base, &s.image_path)?;
                    data.captions.push((img.clone(), s.prompt.clone()));
                    data.generations.push((s.prompt.clone(), img));
                }
            }
            SftSource::Pairs => {
                let pairs = crate::grpo::read_pairs(&cfg.pairs)?;
                let base = folder(&cfg.pairs);
                for p in &pairs {
                    for side in [&p.understand_ann, &p.generate_ann] {
                        let img = images.get(&base, &side.image_path)?;
                        data.answers.push((
                            img.clone(),
                            side.question.clone(),
                            side.answer.clone(),
                        ));
                        data.captions.push((img.clone(), side.prompt.clone()));
                    }
                    let g = &p.generate_ann;
                    data.generations
                        .push((g.prompt.clone(), images.get(&base, &g.image_path)?));
                }
            }
        }
        Ok(data)
    }
}

/// The unconditional CFG row of a generation prompt: every token but the first and last becomes pad
/// (METHOD.md §3), matching what the sampler feeds the unconditional branch.
pub fn uncond_prompt(ids: &[u32], pad: u32) -> Vec<u32> {
    let last = ids.len().saturating_sub(1);
    ids.iter()
        .enumerate()
        .map(|(i, &t)| if i == 0 || i == last { t } else { pad })
        .collect()
}

impl SftTrainer {
    /// Tokenises the examples (image codes through the model's image tokenizer) and sets up AdamW.
    pub fn new(
        cfg: SftConfig,
        seed: u64,
        mut model: Janus,
        data: SftData,
    ) -> Result<Self, TrainError> {
        if data.answers.is_empty() && data.generations.is_empty() {
            return Err(TrainError::Config(
                "SFT has no examples: check `sft.understanding` / `sft.generation` / `sft.pairs`"
                    .into(),
            ));
        }
        let eos = model.eos_token();
        let pad = model.tokenizer().map(|t| t.pad).unwrap_or(0);
        let text = |img: &RgbImage, q: &str, target: &str| -> Result<TextExample, TrainError> {
            let mut target_ids = model.encode_text(target)?;
            target_ids.push(eos);
            Ok(TextExample {
                pixels: model.preprocess_image(img)?,
                prompt_ids: model.understanding_prompt(q)?,
                target_ids,
            })
        };
        let answers = data
            .answers
            .iter()
            .map(|(img, q, a)| text(img, q, a))
            .collect::<Result<Vec<_>, _>>()?;
        let captions = if cfg.caption_weight > 0.0 {
            data.captions
                .iter()
                .map(|(img, c)| text(img, CAPTION_QUESTION, c))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        let codes = data
            .generations
            .iter()
            .map(|(p, img)| {
                let prompt_ids = model.generation_prompt(p)?;
                Ok(CodeExample {
                    uncond_ids: uncond_prompt(&prompt_ids, pad),
                    prompt_ids,
                    codes: model.encode_image_codes(img)?,
                })
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        let vars = model.select_trained(&param_selection(&cfg.optim.trainable));
        if vars.is_empty() {
            return Err(TrainError::Config(
                "`sft.optim.trainable` selects no parameter".into(),
            ));
        }
        let opt = AdamW::new(vars, &cfg.optim)?;
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x7366_7400),
            cfg,
            model,
            answers,
            captions,
            codes,
            opt,
            step: 0,
            nonfinite_streak: 0,
            nonfinite_total: 0,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &Janus {
        &self.model
    }

    fn state(&self) -> TrainState {
        TrainState {
            step: self.step,
            cursor: Cursor::default(),
            rng: RngState::of(&self.rng),
            optimizer_t: self.opt.t,
            nonfinite_streak: self.nonfinite_streak,
            nonfinite_total: self.nonfinite_total,
        }
    }

    /// Restores the latest checkpoint of `run`, if any; returns the step resumed from.
    pub fn resume(&mut self, run: &RunDir) -> Result<Option<usize>, TrainError> {
        let Some(ck) = run.latest_checkpoint(self.model.device())? else {
            return Ok(None);
        };
        restore_vars(&self.model.all_vars(), &ck.weights).map_err(TrainError::Checkpoint)?;
        self.opt.load_state(&ck.optimizer, ck.state.optimizer_t)?;
        self.rng = ck
            .state
            .rng
            .restore()
            .ok_or_else(|| TrainError::Checkpoint("state.json: unreadable rng state".into()))?;
        self.step = ck.state.step;
        self.nonfinite_streak = ck.state.nonfinite_streak;
        self.nonfinite_total = ck.state.nonfinite_total;
        Ok(Some(self.step))
    }

    fn text_rollouts(&mut self, pool: Pool, n: usize) -> Vec<TextRollout> {
        let len = match pool {
            Pool::Answers => self.answers.len(),
            Pool::Captions => self.captions.len(),
        };
        if len == 0 || n == 0 {
            return Vec::new();
        }
        (0..n)
            .map(|_| {
                let i = self.rng.random_range(0..len);
                let ex = match pool {
                    Pool::Answers => &self.answers[i],
                    Pool::Captions => &self.captions[i],
                };
                TextRollout {
                    image: ex.pixels.clone(),
                    prompt_ids: ex.prompt_ids.clone(),
                    answer_ids: ex.target_ids.clone(),
                    logprobs: Vec::new(),
                    text: String::new(),
                }
            })
            .collect()
    }

    /// The step's loss in one pass per kind: Σ weight × token-mean negative log-likelihood of answers, captions
    /// and image codes (`loss/<kind>` metrics are the unweighted means).
    fn whole_batch_loss(
        &self,
        answers: &[TextRollout],
        captions: &[TextRollout],
        images: &[ImageRollout],
        m: &mut Map<String, Value>,
    ) -> Result<Tensor, TrainError> {
        let cfg = &self.cfg;
        let dev = self.model.device().clone();
        let mut total = Tensor::zeros((), candle_core::DType::F32, &dev)?;
        for (name, batch, w) in [
            ("answer", answers, cfg.answer_weight),
            ("caption", captions, cfg.caption_weight),
        ] {
            if batch.is_empty() || w == 0.0 {
                continue;
            }
            let (lp, mask) = self.model.answer_logprobs(batch)?;
            let nll = ((lp * &mask)?.sum_all()?
                / mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?
                .neg()?;
            m.insert(format!("loss/{name}"), json!(nll.to_scalar::<f32>()?));
            total = (total + (nll * w)?)?;
        }
        if !images.is_empty() {
            let lp = self
                .model
                .image_logprobs(images, CfgLogprobPolicy::Conditional)?;
            let nll = lp.mean_all()?.neg()?;
            m.insert("loss/image".into(), json!(nll.to_scalar::<f32>()?));
            total = (total + (nll * cfg.image_weight)?)?;
        }
        Ok(total)
    }

    /// The same loss as [`SftTrainer::whole_batch_loss`], scored `micro_batch` examples at a time with a backward
    /// pass each: every micro-batch's sum is divided by its kind's token count over the whole step, so the
    /// micro-batches add up to the step's loss and their gradients to its gradient. Returns the loss and the
    /// summed gradients (`None` once a micro-batch's loss is not finite). Passes run `concurrent_passes` at a time
    /// and are merged in order ([`crate::passes`]).
    fn micro_batch_gradients(
        &self,
        answers: &[TextRollout],
        captions: &[TextRollout],
        images: &[ImageRollout],
        m: &mut Map<String, Value>,
    ) -> Result<(f32, Option<GradStore>), TrainError> {
        let cfg = &self.cfg;
        let size = cfg.micro_batch.max(1);
        // The sum of the real tokens' log-probs of examples `rows` of a kind (answers, captions: text; else codes).
        let chunk_sum = |text: Option<&[TextRollout]>, rows: std::ops::Range<usize>| {
            let sum = match text {
                Some(batch) => {
                    let (lp, mask) = self.model.answer_logprobs(&batch[rows])?;
                    (lp * &mask)?.sum_all()?
                }
                None => self
                    .model
                    .image_logprobs(&images[rows], CfgLogprobPolicy::Conditional)?
                    .sum_all()?,
            };
            Ok::<Tensor, TrainError>(sum)
        };
        /// One micro-batch pass: its kind (an index into `kinds`), the kind's examples (`None`: image codes) and
        /// weight, the kind's real tokens over the step (every chunk's denominator) and the pass's rows.
        struct Pass<'a> {
            kind: usize,
            text: Option<&'a [TextRollout]>,
            weight: f64,
            count: usize,
            rows: std::ops::Range<usize>,
        }
        let mut passes = Vec::new();
        let mut kinds = Vec::new();
        for (name, text, w) in [
            ("answer", Some(answers), cfg.answer_weight),
            ("caption", Some(captions), cfg.caption_weight),
            ("image", None, cfg.image_weight),
        ] {
            // The kind's real tokens over the whole step: every chunk's denominator.
            let (n, count) = match text {
                Some(batch) => (batch.len(), batch.iter().map(|r| r.answer_ids.len()).sum()),
                None => (
                    images.len(),
                    images.iter().map(|r| r.codes.len()).sum::<usize>(),
                ),
            };
            if n == 0 || (text.is_some() && w == 0.0) {
                continue;
            }
            for start in (0..n).step_by(size) {
                passes.push(Pass {
                    kind: kinds.len(),
                    text,
                    weight: w,
                    count,
                    rows: start..n.min(start + size),
                });
            }
            kinds.push((name, 0f32, passes.len()));
        }
        let vars = self.opt.vars();
        let dev = self.model.device();
        let mut grads = GradStore::default();
        let (mut loss, mut nonfinite) = (0f32, None);
        let mut merged = 0;
        run_in_order(
            passes.len(),
            concurrent_passes(cfg.concurrent_passes, dev),
            bind_device(dev),
            // A pass reads nothing back (as PairGRPO's): its backward is queued at once, and the merge reads the
            // loss and drops the gradients of a non-finite one.
            |i| -> Result<(Tensor, GradStore), TrainError> {
                let p = &passes[i];
                let sum = chunk_sum(p.text, p.rows.clone())?;
                let nll = (sum / p.count.max(1) as f64)?.neg()?;
                let mut own = GradStore::default();
                accumulate_grads(&mut own, (&nll * p.weight)?.backward()?, vars)?;
                Ok((nll.detach(), own))
            },
            |i, (nll, g)| {
                let value = nll.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
                if !value.is_finite() {
                    nonfinite = Some(value);
                    return Ok(Merged::Stop);
                }
                let p = &passes[i];
                kinds[p.kind].1 += value;
                loss += value * p.weight as f32;
                accumulate_grads(&mut grads, g, vars)?;
                merged = i + 1;
                Ok(Merged::Continue)
            },
        )?;
        // A kind's loss is reported once all its passes are in (on a non-finite pass, the kinds before it).
        for (name, nll, end) in kinds {
            if end <= merged {
                m.insert(format!("loss/{name}"), json!(nll));
            }
        }
        if let Some(value) = nonfinite {
            return Ok((value, None));
        }
        Ok((loss, Some(grads)))
    }

    /// One supervised step; returns its metrics.
    pub fn step(&mut self) -> Result<Map<String, Value>, TrainError> {
        let t0 = Instant::now();
        let cfg = self.cfg.clone();
        let answers = self.text_rollouts(Pool::Answers, cfg.batch_understanding);
        let n_cap = if cfg.caption_weight > 0.0 {
            cfg.batch_understanding.div_ceil(2)
        } else {
            0
        };
        let captions = self.text_rollouts(Pool::Captions, n_cap);
        let mut images = Vec::new();
        if !self.codes.is_empty() && cfg.image_weight > 0.0 {
            for _ in 0..cfg.batch_generation {
                let ex = &self.codes[self.rng.random_range(0..self.codes.len())];
                let uncond = self.rng.random::<f64>() < cfg.uncond_prob;
                images.push(ImageRollout {
                    prompt_ids: if uncond {
                        ex.uncond_ids.clone()
                    } else {
                        ex.prompt_ids.clone()
                    },
                    codes: ex.codes.clone(),
                    logprobs: Vec::new(),
                });
            }
        }
        let mut m = Map::new();
        let (loss, grads) = if cfg.micro_batch == 0 {
            let total = self.whole_batch_loss(&answers, &captions, &images, &mut m)?;
            let loss = total.to_scalar::<f32>()?;
            let grads = if loss.is_finite() {
                Some(total.backward()?)
            } else {
                None
            };
            (loss, grads)
        } else {
            self.micro_batch_gradients(&answers, &captions, &images, &mut m)?
        };
        let lr = learning_rate(&cfg.optim, self.step, cfg.steps);
        let mut skipped = None;
        if let Some(grads) = grads.filter(|_| loss.is_finite()) {
            let norm = self.opt.grad_norm(&grads)?;
            m.insert("grad_norm".into(), json!(norm));
            if norm.is_finite() {
                self.opt.step_with_norm(&grads, lr, norm)?;
            } else {
                skipped = Some("gradient");
            }
        } else {
            skipped = Some("loss");
        }
        self.step += 1;
        if let Some(what) = skipped {
            self.nonfinite_streak += 1;
            self.nonfinite_total += 1;
            tracing::warn!(
                step = self.step,
                what,
                "non-finite {what}: SFT step skipped"
            );
            if self.nonfinite_streak >= 3 {
                return Err(TrainError::NonFinite {
                    step: self.step,
                    streak: self.nonfinite_streak,
                    what: what.into(),
                });
            }
        } else {
            self.nonfinite_streak = 0;
        }
        m.insert("loss".into(), json!(loss));
        m.insert("learning_rate".into(), json!(lr));
        m.insert("nonfinite_skipped".into(), json!(self.nonfinite_total));
        m.insert("time/train".into(), json!(t0.elapsed().as_secs_f64()));
        m.insert("step".into(), json!(self.step));
        Ok(m)
    }
}

#[derive(Clone, Copy)]
enum Pool {
    Answers,
    Captions,
}

/// The whole SFT run: open (or resume) `cfg.out_dir`, train to `cfg.steps`, checkpoint, save `final/`.
pub fn sft(
    cfg: &SftConfig,
    seed: u64,
    model: Janus,
    opts: &RunOptions,
) -> Result<TrainSummary, TrainError> {
    let data = SftData::load(cfg)?;
    let mut trainer = SftTrainer::new(cfg.clone(), seed, model, data)?;
    run_loop::run(&mut trainer, &cfg.out_dir, cfg.schedule(), opts)
}

impl Stepper for SftTrainer {
    const LABEL: &'static str = "SFT";
    fn steps_done(&self) -> usize {
        self.step
    }
    fn run_step(&mut self) -> Result<Map<String, Value>, TrainError> {
        self.step()
    }
    fn resume_from(&mut self, run: &RunDir) -> Result<Option<usize>, TrainError> {
        self.resume(run)
    }
    fn checkpoint(&self, run: &RunDir) -> Result<(), TrainError> {
        run.save_checkpoint(
            &self.model.all_vars(),
            &self.opt.state_tensors(),
            &self.state(),
        )?;
        Ok(())
    }
    fn model(&self) -> &Janus {
        &self.model
    }
    fn progress_message(m: &Map<String, Value>) -> String {
        format!("loss {:.3}", run_loop::metric(m, "loss"))
    }
}

/// The model an SFT run starts from: `cfg.init` loaded if set, else a new toy model (seeded random weights,
/// tokenizer from `pairuni_toyworld::text::vocabulary()`, patch codebook fitted on the first
/// `cfg.codebook_images` images of the generation pool).
pub fn initial_model(
    cfg: &SftConfig,
    seed: u64,
    device: &pairuni_model::Device,
) -> Result<Janus, TrainError> {
    let codebook = pairuni_model::config::ModelConfig::default().toy_codebook_size;
    initial_model_in(cfg, seed, &Placement::f32_on(device), codebook)
}

/// [`initial_model`] at `placement` (the toy model is built in f32, then cast) with a toy patch codebook of at
/// most `toy_codebook_size` codes.
pub fn initial_model_in(
    cfg: &SftConfig,
    seed: u64,
    placement: &Placement,
    toy_codebook_size: usize,
) -> Result<Janus, TrainError> {
    if let Some(dir) = &cfg.init {
        return Ok(placement.load(dir)?);
    }
    let pool = pairuni_data::jsonl::read_generation_pool(&cfg.generation)
        .map_err(|e| TrainError::Data(e.to_string()))?;
    let base = cfg
        .generation
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut cache = ImageCache::default();
    let images = pool
        .iter()
        .take(cfg.codebook_images.max(1))
        .map(|s| cache.get(&base, &s.image_path))
        .collect::<Result<Vec<_>, _>>()?;
    let words = pairuni_toyworld::text::vocabulary();
    let jcfg = pairuni_model::JanusConfig::toy(words.len(), toy_codebook_size);
    let model = Janus::new_toy(&jcfg, &words, &images, seed, &placement.device)?;
    Ok(placement.adopt(model)?)
}
