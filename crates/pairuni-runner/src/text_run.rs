//! Answering text benchmarks: batches of (image, question) through the model's sampler.

use std::path::Path;

use pairuni_data::image::{in_record, load_rgb};
use pairuni_eval::predictions::Prediction;
use pairuni_model::{Janus, TextSampling};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{stream_seed, EvalRecipe, Progress, Result};

/// One question to answer.
pub(crate) struct Item {
    /// Prediction key.
    pub key: String,
    /// Line in the gold file (for errors).
    pub line: usize,
    /// Image path relative to the image base folder.
    pub image: Option<String>,
    /// The question as given to the model.
    pub question: String,
}

/// Answers every item; a missing or unreadable image is an error naming `gold:line` and field `image`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn answer_all(
    model: &Janus,
    gold: &Path,
    image_base: &Path,
    items: &[Item],
    recipe: &EvalRecipe,
    stream: u64,
    stage: &str,
    progress: &mut dyn Progress,
) -> Result<Vec<Prediction>> {
    let sampling = TextSampling {
        max_new_tokens: recipe.max_new_tokens,
        temperature: if recipe.greedy_text() {
            1.0
        } else {
            recipe.text_temperature
        },
        top_p: recipe.top_p,
        greedy: recipe.greedy_text(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(recipe.seed, stream));
    let mut out = Vec::with_capacity(items.len());
    progress.stage(stage, items.len());
    for batch in items.chunks(recipe.batch_size) {
        let mut images = Vec::with_capacity(batch.len());
        for item in batch {
            let rel = item.image.as_deref().ok_or_else(|| {
                pairuni_eval::EvalError::field(
                    gold,
                    item.line,
                    "image",
                    "the model needs an image for every question",
                )
            })?;
            let path = image_base.join(rel);
            images.push(load_rgb(&path).map_err(|e| in_record(e, gold, item.line, "image"))?);
        }
        let questions: Vec<String> = batch.iter().map(|i| i.question.clone()).collect();
        let rollouts = model.sample_answers(&images, &questions, &sampling, &mut rng)?;
        for (item, r) in batch.iter().zip(rollouts) {
            out.push(Prediction {
                question_id: item.key.clone(),
                output: r.text,
            });
        }
        progress.advance(batch.len());
    }
    progress.finish();
    tracing::info!(stage, answered = out.len(), "benchmark answered");
    Ok(out)
}
