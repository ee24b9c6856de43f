//! Writers of the world's files: training pools and held-out benchmarks (layout in `docs/TOYWORLD.md` and the
//! team brief).
//!
//! ```text
//! DIR/understanding.jsonl  DIR/generation.jsonl  DIR/images/{u,g}NNNNNN.png
//! DIR/bench/geneval/evaluation_metadata.jsonl  DIR/bench/geneval/references/NNNNN.png
//! DIR/bench/pope/toy_pope_{random,popular,adversarial}.json  DIR/bench/pope/images/NNNNN.png
//! DIR/bench/mcq/questions.jsonl  DIR/bench/mcq/images/NNNNN.png
//! ```
//! Every item draws from its own RNG seeded by (world seed, stream, index), so output does not depend on
//! thread scheduling. Pools only use [`Split::Pool`] scenes and benchmarks only [`Split::Bench`] scenes, so
//! they never share a scene.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use image::RgbImage;
use pairuni_data::{GenerationSample, UnderstandingSample};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;
use crate::config::WorldConfig;
use crate::render::{render, MIN_SIZE};
use crate::scene::{Cell, Kind, Object, Scene, Shape, Split};
use crate::text::{random_question, PromptSpec, TASKS};

/// Progress report passed to the callback of [`generate_world`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Items (samples, prompts, images, questions) written so far.
    pub done: u64,
    /// Items in all.
    pub total: u64,
}

/// What [`generate_world`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorldSummary {
    /// Understanding samples.
    pub understanding: usize,
    /// Generation samples.
    pub generation: usize,
    /// Toy-GenEval prompt lines.
    pub geneval: usize,
    /// Toy-POPE images.
    pub pope_images: usize,
    /// Toy-POPE questions per split.
    pub pope_questions: usize,
    /// Toy-MCQ questions.
    pub mcq: usize,
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A configuration value is out of range.
    #[error("invalid [world] config: {0}")]
    Config(String),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// No scene of the required split was found (cannot happen with the built-in split rule).
    #[error("no {0} scene found after many tries")]
    NoScene(&'static str),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GenerateError + '_ {
    move |source| GenerateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One toy-POPE line, in the field order and types of the real POPE files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopeLine {
    /// 1-based question number within the file.
    pub question_id: u64,
    /// Image file name, relative to `bench/pope/images/`.
    pub image: String,
    /// "Is there a red circle in the image?"
    pub text: String,
    /// "yes" or "no".
    pub label: String,
}

/// One toy-MCQ line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McqLine {
    /// Unique id.
    pub question_id: String,
    /// Image path relative to `bench/mcq/`.
    pub image: String,
    /// Question with inline options.
    pub question: String,
    /// The four option texts.
    pub options: Vec<String>,
    /// Answer letter.
    pub answer: String,
    /// Question category ("color", "shape", "count", "relation").
    pub category: String,
}

/// Stream ids: one independent RNG family per kind of item.
const UNDERSTANDING: u64 = 1;
const GENERATION: u64 = 2;
const GENEVAL: u64 = 3;
const POPE: u64 = 4;
const MCQ: u64 = 5;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The RNG of item `index` of `stream` under `seed`.
pub fn item_rng(seed: u64, stream: u64, index: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(splitmix(splitmix(seed ^ splitmix(stream)) ^ index))
}

/// Number of threads generation runs on (rayon's global pool; `RAYON_NUM_THREADS` sets it).
pub fn worker_threads() -> usize {
    rayon::current_num_threads()
}

/// Draws scenes from `draw` until one lies in `split` (bounded; ~1.25 draws expected for the pool).
fn scene_in<R: Rng>(
    rng: &mut R,
    split: Split,
    mut draw: impl FnMut(&mut R) -> Scene,
) -> Result<Scene, GenerateError> {
    for _ in 0..10_000 {
        let s = draw(rng);
        if s.split() == split {
            return Ok(s);
        }
    }
    Err(GenerateError::NoScene(if split == Split::Pool {
        "pool"
    } else {
        "benchmark"
    }))
}

fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .expect("PNG encoding into memory cannot fail");
    buf.into_inner()
}

fn write_png(path: &Path, scene: &Scene, size: u32) -> Result<(), GenerateError> {
    let img = render(scene, size).map_err(|e| GenerateError::Config(e.to_string()))?;
    write_atomic(path, &png_bytes(&img), false).map_err(io(path))
}

fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<(), GenerateError> {
    let mut out = Vec::with_capacity(rows.len() * 128);
    for r in rows {
        serde_json::to_writer(&mut out, r).expect("records serialise");
        out.push(b'\n');
    }
    write_atomic(path, &out, true).map_err(io(path))
}

/// A uniformly random pool or MCQ scene in `split`.
pub fn world_scene<R: Rng>(
    cfg: &WorldConfig,
    rng: &mut R,
    split: Split,
) -> Result<Scene, GenerateError> {
    scene_in(rng, split, |r| {
        Scene::random(r, cfg.min_objects, cfg.max_objects)
    })
}

/// The understanding sample `i` of the pool with its scene.
pub fn understanding_sample(
    cfg: &WorldConfig,
    i: usize,
) -> Result<(UnderstandingSample, Scene), GenerateError> {
    let mut rng = item_rng(cfg.seed, UNDERSTANDING, i as u64);
    let scene = world_scene(cfg, &mut rng, Split::Pool)?;
    let asked = random_question(&scene, false, &mut rng);
    let id = format!("u{i:06}");
    let sample = UnderstandingSample {
        image_path: format!("images/{id}.png"),
        id,
        question: asked.text,
        answer: asked.answer,
        options: (!asked.options.is_empty()).then_some(asked.options),
        tag: asked.question.category().to_string(),
    };
    Ok((sample, scene))
}

/// The generation sample `i` of the pool with its reference scene.
pub fn generation_sample(
    cfg: &WorldConfig,
    i: usize,
) -> Result<(GenerationSample, Scene), GenerateError> {
    let mut rng = item_rng(cfg.seed, GENERATION, i as u64);
    let tag = TASKS[rng.random_range(0..TASKS.len())];
    let spec = *PromptSpec::all_of(tag)
        .choose(&mut rng)
        .expect("every task has prompts");
    let scene = scene_in(&mut rng, Split::Pool, |r| spec.reference_scene(r))?;
    let id = format!("g{i:06}");
    let sample = GenerationSample {
        image_path: format!("images/{id}.png"),
        id,
        prompt: spec.text(),
        tag: tag.to_string(),
    };
    Ok((sample, scene))
}

/// The toy-GenEval prompts: `n` lines spread evenly over the six tasks (earlier tasks get the remainder),
/// grouped by task like the real file; within a task, distinct prompts in seeded order, cycling if `n` asks
/// for more than exist.
pub fn geneval_prompts(seed: u64, n: usize) -> Vec<PromptSpec> {
    let mut out = Vec::with_capacity(n);
    for (t, tag) in TASKS.iter().enumerate() {
        let k = n / TASKS.len() + usize::from(t < n % TASKS.len());
        let mut all = PromptSpec::all_of(tag);
        all.shuffle(&mut item_rng(seed, GENEVAL, 1_000_000 + t as u64));
        out.extend(all.iter().cycle().take(k).copied());
    }
    out
}

/// The reference scene of toy-GenEval line `i`: satisfies the prompt, benchmark split.
pub fn geneval_reference(seed: u64, i: usize, spec: &PromptSpec) -> Result<Scene, GenerateError> {
    let mut rng = item_rng(seed, GENEVAL, i as u64);
    scene_in(&mut rng, Split::Bench, |r| spec.reference_scene(r))
}

/// The toy-POPE scene of image `i`: 3–4 objects with at least three distinct kinds. Kinds are skewed
/// (Zipf-like weights over a seeded ranking) and an object shares a colour with an earlier one half of the
/// time, so "popular" and "adversarial" (co-occurring) negatives differ from random ones, as in POPE.
pub fn pope_scene(seed: u64, i: usize) -> Result<Scene, GenerateError> {
    let mut ranking: Vec<Kind> = Kind::all().collect();
    ranking.shuffle(&mut item_rng(seed, POPE, u64::MAX));
    let weights: Vec<f64> = (0..ranking.len()).map(|r| 1.0 / (r as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let mut rng = item_rng(seed, POPE, i as u64);
    scene_in(&mut rng, Split::Bench, |rng| loop {
        let n = rng.random_range(3..=4);
        let mut cells: Vec<Cell> = Cell::all().collect();
        cells.shuffle(rng);
        let mut objects: Vec<Object> = Vec::new();
        for &cell in &cells[..n] {
            let kind = if !objects.is_empty() && rng.random_bool(0.5) {
                let colour = objects.choose(rng).expect("non-empty").colour;
                Kind {
                    colour,
                    shape: Shape::ALL[rng.random_range(0..3)],
                }
            } else {
                let mut x = rng.random_range(0.0..total);
                let mut pick = ranking[ranking.len() - 1];
                for (k, w) in ranking.iter().zip(&weights) {
                    if x < *w {
                        pick = *k;
                        break;
                    }
                    x -= w;
                }
                pick
            };
            objects.push(Object {
                shape: kind.shape,
                colour: kind.colour,
                cell,
            });
        }
        let scene = Scene::new(objects).expect("distinct cells");
        if scene.kinds().len() >= 3 {
            return scene;
        }
    })
}

/// The three toy-POPE splits (random, popular, adversarial) over `scenes`, as in the POPE paper: per image
/// three present kinds ("yes") alternate with three absent ones ("no") chosen uniformly, by overall frequency,
/// or by co-occurrence with the image's kinds.
pub fn pope_splits(seed: u64, scenes: &[Scene]) -> [Vec<PopeLine>; 3] {
    let nk = Kind::all().count();
    let mut freq = vec![0usize; nk];
    let mut cooc = vec![vec![0usize; nk]; nk];
    for s in scenes {
        let ks = s.kinds();
        for a in &ks {
            freq[a.index()] += 1;
            for b in &ks {
                if a != b {
                    cooc[a.index()][b.index()] += 1;
                }
            }
        }
    }
    let kinds: Vec<Kind> = Kind::all().collect();
    let mut out: [Vec<PopeLine>; 3] = Default::default();
    for (i, s) in scenes.iter().enumerate() {
        let mut rng = item_rng(seed, POPE, 2_000_000 + i as u64);
        let present = s.kinds();
        let positives: Vec<Kind> = present.choose_multiple(&mut rng, 3).copied().collect();
        let absent: Vec<Kind> = kinds
            .iter()
            .copied()
            .filter(|k| !present.contains(k))
            .collect();
        let random: Vec<Kind> = absent.choose_multiple(&mut rng, 3).copied().collect();
        let ranked = |score: &dyn Fn(&Kind) -> usize| -> Vec<Kind> {
            let mut v = absent.clone();
            v.sort_by_key(|k| (std::cmp::Reverse(score(k)), k.index()));
            v.truncate(3);
            v
        };
        let popular = ranked(&|k| freq[k.index()]);
        let adversarial = ranked(&|k| present.iter().map(|p| cooc[p.index()][k.index()]).sum());
        for (split, negatives) in out.iter_mut().zip([random, popular, adversarial]) {
            for (pos, neg) in positives.iter().zip(&negatives) {
                for (kind, label) in [(pos, "yes"), (neg, "no")] {
                    split.push(PopeLine {
                        question_id: split.len() as u64 + 1,
                        image: format!("{i:05}.png"),
                        text: format!("Is there {} in the image?", kind.with_article()),
                        label: label.to_string(),
                    });
                }
            }
        }
    }
    out
}

/// The toy-MCQ question `i` with its scene (benchmark split, multiple-choice kinds only).
pub fn mcq_item(cfg: &WorldConfig, i: usize) -> Result<(McqLine, Scene), GenerateError> {
    let mut rng = item_rng(cfg.seed, MCQ, i as u64);
    let scene = world_scene(cfg, &mut rng, Split::Bench)?;
    let asked = random_question(&scene, true, &mut rng);
    let line = McqLine {
        question_id: format!("mcq{i:05}"),
        image: format!("images/{i:05}.png"),
        question: asked.text,
        options: asked.options,
        answer: asked.answer,
        category: asked.question.category().to_string(),
    };
    Ok((line, scene))
}

fn validate(cfg: &WorldConfig) -> Result<(), GenerateError> {
    if cfg.size < MIN_SIZE {
        return Err(GenerateError::Config(format!(
            "size = {} is below the minimum {MIN_SIZE}",
            cfg.size
        )));
    }
    if !(1..=4).contains(&cfg.min_objects)
        || cfg.max_objects < cfg.min_objects
        || cfg.max_objects > 9
    {
        return Err(GenerateError::Config(format!(
            "min_objects = {}, max_objects = {}: need 1 <= min_objects <= 4 and min_objects <= max_objects <= 9",
            cfg.min_objects, cfg.max_objects
        )));
    }
    Ok(())
}

/// Writes the pools and the benchmarks under `out`; `progress` is called (from worker threads) as items finish.
pub fn generate_world(
    cfg: &WorldConfig,
    out: &Path,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<WorldSummary, GenerateError> {
    validate(cfg)?;
    let dirs = [
        "images",
        "bench/geneval/references",
        "bench/pope/images",
        "bench/mcq/images",
    ];
    for d in dirs {
        let p = out.join(d);
        std::fs::create_dir_all(&p).map_err(io(&p))?;
    }
    let pope_images = cfg.bench.div_ceil(6);
    let total = (cfg.understanding + cfg.generation + cfg.bench + pope_images + cfg.bench) as u64;
    let done = AtomicU64::new(0);
    let tick = || {
        progress(Progress {
            done: done.fetch_add(1, Ordering::Relaxed) + 1,
            total,
        })
    };

    let understanding: Vec<UnderstandingSample> = (0..cfg.understanding)
        .into_par_iter()
        .map(|i| {
            let (sample, scene) = understanding_sample(cfg, i)?;
            write_png(&out.join(&sample.image_path), &scene, cfg.size)?;
            tick();
            Ok(sample)
        })
        .collect::<Result<_, GenerateError>>()?;
    write_jsonl(&out.join("understanding.jsonl"), &understanding)?;

    let generation: Vec<GenerationSample> = (0..cfg.generation)
        .into_par_iter()
        .map(|i| {
            let (sample, scene) = generation_sample(cfg, i)?;
            write_png(&out.join(&sample.image_path), &scene, cfg.size)?;
            tick();
            Ok(sample)
        })
        .collect::<Result<_, GenerateError>>()?;
    write_jsonl(&out.join("generation.jsonl"), &generation)?;

    let prompts = geneval_prompts(cfg.seed, cfg.bench);
    let geneval_dir = out.join("bench/geneval");
    prompts.par_iter().enumerate().try_for_each(|(i, spec)| {
        let scene = geneval_reference(cfg.seed, i, spec)?;
        write_png(
            &geneval_dir.join(format!("references/{i:05}.png")),
            &scene,
            cfg.size,
        )?;
        tick();
        Ok::<_, GenerateError>(())
    })?;
    let lines: Vec<_> = prompts.iter().map(PromptSpec::geneval_line).collect();
    write_jsonl(&geneval_dir.join("evaluation_metadata.jsonl"), &lines)?;

    let pope_dir = out.join("bench/pope");
    let scenes: Vec<Scene> = (0..pope_images)
        .into_par_iter()
        .map(|i| {
            let scene = pope_scene(cfg.seed, i)?;
            write_png(
                &pope_dir.join(format!("images/{i:05}.png")),
                &scene,
                cfg.size,
            )?;
            tick();
            Ok(scene)
        })
        .collect::<Result<_, GenerateError>>()?;
    let splits = pope_splits(cfg.seed, &scenes);
    for (name, mut lines) in ["random", "popular", "adversarial"].into_iter().zip(splits) {
        lines.truncate(cfg.bench);
        write_jsonl(&pope_dir.join(format!("toy_pope_{name}.json")), &lines)?;
    }

    let mcq_dir = out.join("bench/mcq");
    let mcq: Vec<McqLine> = (0..cfg.bench)
        .into_par_iter()
        .map(|i| {
            let (line, scene) = mcq_item(cfg, i)?;
            write_png(&mcq_dir.join(&line.image), &scene, cfg.size)?;
            tick();
            Ok(line)
        })
        .collect::<Result<_, GenerateError>>()?;
    write_jsonl(&mcq_dir.join("questions.jsonl"), &mcq)?;

    Ok(WorldSummary {
        understanding: understanding.len(),
        generation: generation.len(),
        geneval: prompts.len(),
        pope_images,
        pope_questions: cfg.bench.min(pope_images * 6),
        mcq: mcq.len(),
    })
}
