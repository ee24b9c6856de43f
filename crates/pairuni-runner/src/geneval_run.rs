//! GenEval: generate `images_per_prompt` images per prompt, save them in GenEval's own layout, then score.
//!
//! Layout (GenEval's `generation/diffusers_generate.py` output, which `pairuni_eval::geneval::score_folder` and
//! `pairuni eval score --bench geneval --images DIR` read): `DIR/<index>/samples/<k>.png`, `DIR/<index>/grid.png`
//! (the prompt's images side by side, 4 per row) and `DIR/<index>/metadata.jsonl` (the prompt's metadata
//! line), with `<index>` the 0-based prompt index zero-padded to 5 digits and `<k>` to 4. Scoring uses the
//! GenEval rules of `pairuni_eval::geneval` with the toy world's detector (`ToyDetector`).

use std::path::{Path, PathBuf};

use pairuni_data::image::save_png_atomic;
use pairuni_data::RgbImage;
use pairuni_eval::detector::ToyDetector;
use pairuni_eval::geneval::{read_metadata, score_images, GenevalParams, GenevalReport};
use pairuni_eval::EvalError;
use pairuni_model::{ImageSampling, Janus};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{stream_seed, EvalRecipe, Progress, Result};

/// What a GenEval run produced and measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenevalOutcome {
    /// Name of the scorer (detector + rules) used.
    pub scorer: String,
    /// Prompts run.
    pub prompts: usize,
    /// Images generated per prompt.
    pub images_per_prompt: usize,
    /// Folder of the images (GenEval layout), relative to the output folder.
    pub images_dir: String,
    /// Scores as the GenEval scorer reports them (per task and overall, in [0, 1]).
    pub scores: serde_json::Value,
}

impl GenevalOutcome {
    /// (metric, value) rows for the results table: every number in `scores`, flattened with dotted names.
    pub fn rows(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        flatten("", &self.scores, &mut out);
        out
    }
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&name, v, out);
            }
        }
        serde_json::Value::Number(n) => {
            let text = match n.as_f64() {
                Some(f) if n.is_f64() => format!("{f:.4}"),
                _ => n.to_string(),
            };
            out.push((prefix.to_owned(), text));
        }
        _ => {}
    }
}

/// The folder of prompt `index` under the images folder.
pub fn prompt_dir(images_dir: &Path, index: usize) -> PathBuf {
    images_dir.join(format!("{index:05}"))
}

/// The path of image `k` of prompt `index` under the images folder.
pub fn image_path(images_dir: &Path, index: usize, k: usize) -> PathBuf {
    prompt_dir(images_dir, index).join(format!("samples/{k:04}.png"))
}

/// Images side by side, `cols` per row, 2-pixel white gaps.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    let gap = 2u32;
    let cols = cols.clamp(1, images.len().max(1));
    let rows = images.len().div_ceil(cols).max(1);
    let w = images.iter().map(|i| i.width()).max().unwrap_or(1);
    let h = images.iter().map(|i| i.height()).max().unwrap_or(1);
    let gw = cols as u32 * w + (cols as u32 - 1) * gap;
    let gh = rows as u32 * h + (rows as u32 - 1) * gap;
    let mut g = RgbImage::from_pixel(gw, gh, image::Rgb([255, 255, 255]));
    for (i, img) in images.iter().enumerate() {
        let x = (i % cols) as u32 * (w + gap);
        let y = (i / cols) as u32 * (h + gap);
        image::imageops::overlay(&mut g, img, i64::from(x), i64::from(y));
    }
    g
}

/// Name of the scorer in reports.
pub const SCORER: &str = "geneval-rules+toy-detector";

/// Generates, saves and scores GenEval images for the metadata file `meta`.
pub(crate) fn run(
    model: &Janus,
    meta: &Path,
    out_dir: &Path,
    recipe: &EvalRecipe,
    progress: &mut dyn Progress,
    written: &mut Vec<String>,
) -> Result<GenevalOutcome> {
    let mut metas = read_metadata(meta)?;
    if let Some(n) = recipe.limits.geneval {
        metas.truncate(n);
    }
    if metas.is_empty() {
        return Err(EvalError::file(meta, "no prompts in GenEval metadata").into());
    }
    let raw_lines = raw_records(meta)?;
    let k = recipe.images_per_prompt;
    let sampling = ImageSampling {
        cfg_weight: recipe.cfg_weight,
        temperature: recipe.image_temperature,
        top_p: recipe.top_p,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(recipe.seed, 3));
    let images_dir = out_dir.join("geneval");
    // Every (prompt, k) job in order; batches may cross prompt boundaries.
    let jobs: Vec<(usize, usize)> = (0..metas.len())
        .flat_map(|p| (0..k).map(move |j| (p, j)))
        .collect();
    let mut per_prompt: Vec<Vec<RgbImage>> = vec![Vec::new(); metas.len()];
    progress.stage("geneval", jobs.len());
    for batch in jobs.chunks(recipe.batch_size) {
        let texts: Vec<String> = batch
            .iter()
            .map(|&(p, _)| metas[p].prompt.clone())
            .collect();
        let rollouts = model.sample_images(&texts, &sampling, &mut rng)?;
        let codes: Vec<Vec<u32>> = rollouts.into_iter().map(|r| r.codes).collect();
        let images = model.decode_codes(&codes)?;
        for (&(p, j), img) in batch.iter().zip(images) {
            save_png_atomic(image_path(&images_dir, p, j), &img)?;
            per_prompt[p].push(img);
        }
        progress.advance(batch.len());
    }
    progress.finish();
    for (p, imgs) in per_prompt.iter().enumerate() {
        let dir = prompt_dir(&images_dir, p);
        save_png_atomic(dir.join("grid.png"), &grid(imgs, 4))?;
        let mut line = raw_lines.get(p).cloned().unwrap_or_default();
        line.push('\n');
        pairuni_data::write_atomic_bytes(dir.join("metadata.jsonl"), line.as_bytes())?;
    }
    written.push("geneval/".to_owned());
    let (_, report) = score_images(&metas, &per_prompt, &ToyDetector, &GenevalParams::default());
    Ok(GenevalOutcome {
        scorer: SCORER.to_owned(),
        prompts: metas.len(),
        images_per_prompt: k,
        images_dir: "geneval".into(),
        scores: to_json(&report)?,
    })
}

/// The non-blank lines of a JSONL file, verbatim (the per-prompt metadata copies).
fn raw_records(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| pairuni_data::DataError::io(path, e))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

fn to_json(report: &GenevalReport) -> Result<serde_json::Value> {
    serde_json::to_value(report).map_err(|e| {
        crate::RunnerError::Config(format!("cannot serialise the GenEval report: {e}"))
    })
}

/// Scores a folder of GenEval images (layout in the module doc; every prompt needs images) against the
/// metadata file with the toy detector; returns the scorer name and the report as JSON.
pub fn score_folder(meta: &Path, images_dir: &Path) -> Result<(String, serde_json::Value)> {
    let report = pairuni_eval::geneval::score_folder(
        meta,
        images_dir,
        &ToyDetector,
        &GenevalParams::default(),
    )?;
    Ok((SCORER.to_owned(), to_json(&report)?))
}
