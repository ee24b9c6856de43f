//! Diagnostic for the toy SFT: does the model read the image yet?
//!
//! Trains `SftTrainer` on a world folder (from `pairuni world generate`) and every `EVERY` steps prints:
//! held-out greedy answer accuracy per question kind and the most frequent answers; the held-out answer NLL with
//! the true image and with another sample's image (equal ⇒ the model ignores the image); the same pair of NLLs
//! for the teacher's captions of the first 100 PairUG records (`PAIRS`); toy-GenEval (dense, binary) of images
//! sampled for the last `NGEN` generation prompts at each temperature in `TEMPS`. `MODE=roundtrip` instead
//! checks that the patch codebook's encode → decode keeps every scene. docs/TRAINING.md has the findings.
//!
//! ```sh
//! WORLD=/tmp/w PAIRS=/tmp/w/pairs/pairs.jsonl STEPS=1500 BU=48 LR=5e-4 \
//!     cargo run --release -p pairuni-rl --example sft_probe
//! ```
//!
//! Knobs (environment): WORLD, PAIRS (SFT source = pairs when set), STEPS, EVERY, SEED, NEVAL (held-out
//! understanding samples, kept out of SFT when the source is the pools), NGEN, TEMPS, CFG, BU, BG, WA, WC, WI
//! (loss weights), LR, WARM, SAVE (folder for the first 16 sampled images of every evaluation).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use pairuni_data::jsonl::{read_generation_pool, read_understanding_pool};
use pairuni_data::RgbImage;
use pairuni_model::{ImageSampling, Janus, TextRollout, TextSampling};
use pairuni_rl::config::{SftConfig, SftSource};
use pairuni_rl::reward::{answer_correct, Reward, RewardInput, ToyGenEval};
use pairuni_rl::sft::{initial_model, SftData, SftTrainer, CAPTION_QUESTION};
use rand::SeedableRng;

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (image, prompt text, target text) examples scored by teacher forcing.
struct Probe {
    images: Vec<RgbImage>,
    questions: Vec<String>,
    targets: Vec<String>,
}

impl Probe {
    /// Mean NLL per target token (stop token included) when example k sees image k + shift.
    fn nll(&self, model: &Janus, shift: usize) -> anyhow::Result<f64> {
        let mut rolls = Vec::with_capacity(self.images.len());
        for k in 0..self.images.len() {
            let mut answer_ids = model.encode_text(&self.targets[k])?;
            answer_ids.push(model.eos_token());
            rolls.push(TextRollout {
                image: model.preprocess_image(&self.images[(k + shift) % self.images.len()])?,
                prompt_ids: model.understanding_prompt(&self.questions[k])?,
                answer_ids,
                logprobs: Vec::new(),
                text: String::new(),
            });
        }
        let (mut total, mut count) = (0.0, 0.0);
        for chunk in rolls.chunks(50) {
            let (lp, mask) = model.answer_logprobs(chunk)?;
            total -= f64::from((lp * &mask)?.sum_all()?.to_scalar::<f32>()?);
            count += f64::from(mask.sum_all()?.to_scalar::<f32>()?);
        }
        Ok(total / count.max(1.0))
    }
}

fn load(base: &Path, rel: &str) -> anyhow::Result<RgbImage> {
    let path = base.join(rel);
    pairuni_data::load_rgb(&path).with_context(|| format!("reading {}", path.display()))
}

fn roundtrip(model: &Janus, world: &Path, cfg: &SftConfig) -> anyhow::Result<()> {
    let gen = read_generation_pool(&cfg.generation)?;
    let reward = ToyGenEval::new(false);
    let (mut same, mut passed, mut total) = (0, 0, 0);
    for g in gen.iter().rev().take(300) {
        let img = load(world, &g.image_path)?;
        let back = model
            .decode_codes(&[model.encode_image_codes(&img)?])?
            .remove(0);
        same += usize::from(
            pairuni_toyworld::read_scene(&img).objects()
                == pairuni_toyworld::read_scene(&back).objects(),
        );
        let score = reward.score(&[RewardInput::Image {
            image: &back,
            prompt: &g.prompt,
        }])?;
        passed += usize::from(score[0] == 1.0);
        total += 1;
    }
    println!("codebook round trip: scene kept {same}/{total}, GenEval binary {passed}/{total}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let world = PathBuf::from(std::env::var("WORLD").context("set WORLD to a world folder")?);
    let steps: usize = env("STEPS", 300);
    let every: usize = env("EVERY", 50);
    let seed: u64 = env("SEED", 0);
    let n_eval: usize = env("NEVAL", 200);
    let n_gen: usize = env("NGEN", 48);
    let pairs = std::env::var("PAIRS").ok().map(PathBuf::from);
    let defaults = SftConfig::default();
    let mut cfg = SftConfig {
        understanding: world.join("understanding.jsonl"),
        generation: world.join("generation.jsonl"),
        holdout: n_eval,
        source: if pairs.is_some() {
            SftSource::Pairs
        } else {
            SftSource::Pools
        },
        pairs: pairs.clone().unwrap_or(defaults.pairs.clone()),
        steps,
        batch_understanding: env("BU", 16),
        batch_generation: env("BG", 16),
        answer_weight: env("WA", 1.0),
        caption_weight: env("WC", 1.0),
        image_weight: env("WI", 1.0),
        codebook_images: 300,
        ..defaults
    };
    cfg.optim.lr = env("LR", 5e-4);
    cfg.optim.warmup_steps = env("WARM", 20);
    let model = initial_model(&cfg, seed, &pairuni_model::Device::Cpu)?;
    if std::env::var("MODE").as_deref() == Ok("roundtrip") {
        return roundtrip(&model, &world, &cfg);
    }
    let mut trainer = SftTrainer::new(cfg.clone(), seed, model, SftData::load(&cfg)?)?;

    let und = read_understanding_pool(&cfg.understanding)?;
    let held = &und[und.len().saturating_sub(n_eval)..];
    let answers = Probe {
        images: held
            .iter()
            .map(|s| load(&world, &s.image_path))
            .collect::<anyhow::Result<_>>()?,
        questions: held.iter().map(|s| s.question.clone()).collect(),
        targets: held.iter().map(|s| s.answer.clone()).collect(),
    };
    let mut captions = Probe {
        images: Vec::new(),
        questions: Vec::new(),
        targets: Vec::new(),
    };
    if let Some(path) = &pairs {
        let base = path.parent().unwrap_or(Path::new("."));
        for record in pairuni_data::jsonl::read_pairs(path)?.iter().take(100) {
            let side = &record.understand_ann;
            captions.images.push(load(base, &side.image_path)?);
            captions.questions.push(CAPTION_QUESTION.to_string());
            captions.targets.push(side.prompt.clone());
        }
    }
    let gen = read_generation_pool(&cfg.generation)?;
    let prompts: Vec<String> = gen[gen.len().saturating_sub(n_gen)..]
        .iter()
        .map(|g| g.prompt.clone())
        .collect();
    let temps: Vec<f64> = std::env::var("TEMPS")
        .unwrap_or_else(|_| "1.0".into())
        .split(',')
        .map(|t| t.parse().context("TEMPS: comma-separated numbers"))
        .collect::<anyhow::Result<_>>()?;
    let cfg_weight: f64 = env("CFG", 3.0);
    let started = std::time::Instant::now();
    let mut losses = [0.0f64; 3];
    let mut since = 0usize;
    for step in 1..=steps {
        let m = trainer.step()?;
        for (slot, key) in losses
            .iter_mut()
            .zip(["loss/answer", "loss/caption", "loss/image"])
        {
            *slot += m.get(key).and_then(|v| v.as_f64()).unwrap_or(0.0);
        }
        since += 1;
        if step % every != 0 && step != steps {
            continue;
        }
        let model = trainer.model();
        let n = since as f64;
        let mut line = format!(
            "step {step:5} {:6.0}s | loss answer {:.3} caption {:.3} image {:.3}",
            started.elapsed().as_secs_f64(),
            losses[0] / n,
            losses[1] / n,
            losses[2] / n
        );
        losses = [0.0; 3];
        since = 0;
        line += &format!(
            " | answer NLL true/other image {:.4}/{:.4}",
            answers.nll(model, 0)?,
            answers.nll(model, 1)?
        );
        if !captions.images.is_empty() {
            line += &format!(
                " | caption NLL {:.4}/{:.4}",
                captions.nll(model, 0)?,
                captions.nll(model, 1)?
            );
        }
        let greedy = TextSampling {
            greedy: true,
            max_new_tokens: 4,
            ..Default::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut per_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut said: BTreeMap<String, usize> = BTreeMap::new();
        for (samples, images) in held.chunks(50).zip(answers.images.chunks(50)) {
            let questions: Vec<String> = samples.iter().map(|s| s.question.clone()).collect();
            let outs = model.sample_answers(images, &questions, &greedy, &mut rng)?;
            for (s, o) in samples.iter().zip(outs) {
                let entry = per_kind.entry(s.tag.clone()).or_default();
                entry.0 += usize::from(answer_correct(&o.text, &s.question, &s.answer));
                entry.1 += 1;
                *said.entry(o.text.trim().to_string()).or_default() += 1;
            }
        }
        let (right, all) = per_kind
            .values()
            .fold((0, 0), |acc, v| (acc.0 + v.0, acc.1 + v.1));
        line += &format!(" | acc {:.3}", right as f64 / all.max(1) as f64);
        for (kind, (r, a)) in &per_kind {
            line += &format!(" {kind}={:.2}", *r as f64 / (*a).max(1) as f64);
        }
        let mut said: Vec<_> = said.into_iter().collect();
        said.sort_by_key(|s| std::cmp::Reverse(s.1));
        line += &format!(" | top {:?}", &said[..said.len().min(4)]);
        for &temperature in &temps {
            if prompts.is_empty() {
                break;
            }
            let sampling = ImageSampling {
                cfg_weight,
                temperature,
                top_p: 1.0,
            };
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
            let rolls = model.sample_images(&prompts, &sampling, &mut rng)?;
            let codes: Vec<Vec<u32>> = rolls.into_iter().map(|r| r.codes).collect();
            let pictures = model.decode_codes(&codes)?;
            let inputs: Vec<RewardInput> = pictures
                .iter()
                .zip(&prompts)
                .map(|(image, prompt)| RewardInput::Image { image, prompt })
                .collect();
            let mean = |v: Vec<f32>| v.iter().sum::<f32>() / v.len().max(1) as f32;
            line += &format!(
                " | GenEval T{temperature} dense {:.3} binary {:.3}",
                mean(ToyGenEval::new(true).score(&inputs)?),
                mean(ToyGenEval::new(false).score(&inputs)?)
            );
            if let Ok(dir) = std::env::var("SAVE") {
                std::fs::create_dir_all(&dir)?;
                for (k, picture) in pictures.iter().enumerate().take(16) {
                    picture.save(format!("{dir}/step{step}_t{temperature}_{k}.png"))?;
                }
            }
        }
        println!("{line}");
    }
    Ok(())
}
