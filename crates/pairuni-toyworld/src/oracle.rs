//! The oracle teacher: completes samples from the detector's reading of the image, optionally wrong on
//! purpose, and the verifier that checks any completion (ours or an external teacher's) against the image.
//!
//! The oracle plays the paper's teacher (o3) in both jobs of METHOD.md §2: a caption for an understanding
//! sample and a multiple-choice question for a generation sample. Its knowledge of the scene comes from
//! [`crate::detect::read_scene`], which is exact on rendered images. With `error_rate > 0` it corrupts a
//! completion (a wrong colour or a missing object in a caption, a wrong answer letter in a question) and
//! records that it did, so tests can check that the verifier rejects exactly the corrupted ones.

use image::RgbImage;
use pairuni_data::{GenerationSample, UnderstandingSample};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::detect::read_scene;
use crate::scene::{Cell, Colour, Kind, Scene};
use crate::text::{
    ask, caption, format_mcq, parse_caption, parse_question, PromptSpec, Question, LETTERS,
};

/// A deliberate mistake the oracle made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Corruption {
    /// The caption gives the object in `cell` the colour `to` instead of `from`.
    WrongColour {
        /// Cell of the altered object.
        cell: Cell,
        /// Its true colour.
        from: Colour,
        /// The colour the caption claims.
        to: Colour,
    },
    /// The caption leaves out the object in `cell`.
    MissingObject {
        /// Cell of the omitted object.
        cell: Cell,
    },
    /// The question's answer letter is `given` instead of `correct`.
    WrongAnswer {
        /// Letter given.
        given: String,
        /// Correct letter.
        correct: String,
    },
}

/// A caption for an understanding sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptionCompletion {
    /// The caption text.
    pub caption: String,
    /// The deliberate mistake, if any.
    pub corruption: Option<Corruption>,
}

/// A multiple-choice question for a generation sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuestionCompletion {
    /// Question text with inline options.
    pub question: String,
    /// The four option texts in letter order.
    pub options: Vec<String>,
    /// Answer letter.
    pub answer: String,
    /// The deliberate mistake, if any.
    pub corruption: Option<Corruption>,
}

/// Why the oracle cannot complete a sample.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OracleError {
    /// The generation prompt is not in the world's grammar.
    #[error("sample {id}: {reason}")]
    Unparsable {
        /// Sample id.
        id: String,
        /// Parser message.
        reason: String,
    },
    /// The image does not hold what the prompt names, so no question has a defined answer.
    #[error("sample {id}: image cannot answer a question about its prompt: {reason}")]
    Unanswerable {
        /// Sample id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// Why a completion was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{reason}")]
pub struct Rejection {
    /// Human-readable reason.
    pub reason: String,
}

fn reject<T>(reason: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection {
        reason: reason.into(),
    })
}

/// The oracle teacher.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Oracle {
    /// Probability in [0, 1] of corrupting a completion on purpose.
    pub error_rate: f64,
    /// Seed of the corruption decisions.
    pub seed: u64,
}

/// FNV-1a: a stable hash (std's hasher may change between releases) to give every sample its own RNG stream.
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Oracle {
    /// An oracle that is wrong on purpose with probability `error_rate` (clamped to [0, 1]).
    pub fn new(error_rate: f64, seed: u64) -> Oracle {
        Oracle {
            error_rate: error_rate.clamp(0.0, 1.0),
            seed,
        }
    }

    /// The per-sample RNG: decisions depend on (seed, sample id) only, not on call order or threads.
    fn rng(&self, id: &str, job: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(
            self.seed ^ stable_hash(id) ^ job.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        )
    }

    /// Captions an understanding sample: every object with colour and cell, plus the sentence that answers the
    /// sample's question (when the question is in the world's grammar and the image answers it).
    pub fn caption(&self, sample: &UnderstandingSample, image: &RgbImage) -> CaptionCompletion {
        let truth = read_scene(image);
        let mut rng = self.rng(&sample.id, 1);
        let question = parse_question(&sample.question).ok().map(|(q, _)| q);
        let mut told = truth.clone();
        let mut corruption = None;
        if rng.random_bool(self.error_rate) && !truth.is_empty() {
            let victim = *truth.objects().choose(&mut rng).expect("non-empty");
            let mut objs = truth.objects().to_vec();
            if truth.len() >= 2 && rng.random_bool(0.5) {
                objs.retain(|o| o.cell != victim.cell);
                corruption = Some(Corruption::MissingObject { cell: victim.cell });
            } else {
                let others: Vec<Colour> = Colour::ALL
                    .into_iter()
                    .filter(|&c| c != victim.colour)
                    .collect();
                let to = *others.choose(&mut rng).expect("five other colours");
                for o in objs.iter_mut().filter(|o| o.cell == victim.cell) {
                    o.colour = to;
                }
                corruption = Some(Corruption::WrongColour {
                    cell: victim.cell,
                    from: victim.colour,
                    to,
                });
            }
            told = Scene::new(objs).expect("cells unchanged");
        }
        CaptionCompletion {
            caption: caption(&told, question.as_ref()),
            corruption,
        }
    }

    /// Writes a multiple-choice question about what the sample's prompt names, answered from the image.
    pub fn question_for(
        &self,
        sample: &GenerationSample,
        image: &RgbImage,
    ) -> Result<QuestionCompletion, OracleError> {
        let spec = PromptSpec::parse(&sample.prompt).map_err(|e| OracleError::Unparsable {
            id: sample.id.clone(),
            reason: e.0,
        })?;
        let scene = read_scene(image);
        let mut rng = self.rng(&sample.id, 2);
        let q = question_about(&spec, &mut rng);
        let asked = ask(q, &scene, &mut rng).map_err(|reason| OracleError::Unanswerable {
            id: sample.id.clone(),
            reason,
        })?;
        let mut answer = asked.answer.clone();
        let mut corruption = None;
        if rng.random_bool(self.error_rate) {
            let wrong: Vec<&str> = LETTERS
                .iter()
                .copied()
                .filter(|l| *l != asked.answer)
                .collect();
            answer = wrong
                .choose(&mut rng)
                .expect("three wrong letters")
                .to_string();
            corruption = Some(Corruption::WrongAnswer {
                given: answer.clone(),
                correct: asked.answer.clone(),
            });
        }
        Ok(QuestionCompletion {
            question: format_mcq(&q.stem(), &asked.options),
            options: asked.options,
            answer,
            corruption,
        })
    }
}

/// The question the oracle asks about a prompt: the colour of a named shape, the count of a counted shape, or
/// which object stands in the named relation.
fn question_about<R: Rng + ?Sized>(spec: &PromptSpec, rng: &mut R) -> Question {
    match *spec {
        PromptSpec::SingleObject(s) => Question::ColourOf(s),
        PromptSpec::TwoObject(a, b) => Question::ColourOf(if rng.random_bool(0.5) { a } else { b }),
        PromptSpec::Counting(s, _) => Question::Count {
            colour: None,
            shape: Some(s),
        },
        PromptSpec::Colors(k) => Question::ColourOf(k.shape),
        PromptSpec::Position { rel, b, .. } => Question::Which { rel, b },
        PromptSpec::ColorAttr(a, b) => Question::ColourOf(if rng.random_bool(0.5) {
            a.shape
        } else {
            b.shape
        }),
    }
}

/// The letter (or yes/no) that is correct for `q` with `options` in `scene`.
fn correct_answer(q: &Question, options: &[String], scene: &Scene) -> Result<String, Rejection> {
    let truth = q.truth(scene).map_err(|r| Rejection {
        reason: format!("the image cannot answer it: {r}"),
    })?;
    if !q.is_multiple_choice() {
        return Ok(truth);
    }
    match options.iter().position(|o| *o == truth) {
        Some(i) => Ok(LETTERS[i].to_string()),
        None => reject(format!(
            "no option is the true answer {truth:?} (options {options:?})"
        )),
    }
}

/// Verifies a caption for an understanding sample against the detector's reading of `image`: it must parse,
/// list exactly the objects in the image, make only true statements, and the sample's own gold answer must
/// agree with the image.
pub fn verify_caption(
    sample: &UnderstandingSample,
    image: &RgbImage,
    caption_text: &str,
) -> Result<(), Rejection> {
    let scene = read_scene(image);
    let claims = parse_caption(caption_text).map_err(|e| Rejection { reason: e.0 })?;
    if !claims
        .iter()
        .any(|c| matches!(c, crate::text::Claim::Listing(_)))
    {
        return reject("caption does not list the objects");
    }
    for c in &claims {
        c.check(&scene).map_err(|reason| Rejection { reason })?;
    }
    if let Ok((q, options)) = parse_question(&sample.question) {
        let options = if options.is_empty() {
            sample.options.clone().unwrap_or_default()
        } else {
            options
        };
        let gold = correct_answer(&q, &options, &scene)?;
        if !gold.eq_ignore_ascii_case(sample.answer.trim()) {
            return reject(format!(
                "sample answer {:?} disagrees with the image ({gold:?})",
                sample.answer
            ));
        }
    }
    Ok(())
}

/// Verifies a question completion for a generation sample: it must parse, have four options, answer correctly
/// from the detector's reading of `image`, and be about objects its prompt names (when the prompt parses).
pub fn verify_question(
    sample: &GenerationSample,
    image: &RgbImage,
    question: &str,
    answer: &str,
) -> Result<(), Rejection> {
    let (q, options) = parse_question(question).map_err(|e| Rejection { reason: e.0 })?;
    if !q.is_multiple_choice() || options.len() != 4 {
        return reject(format!(
            "not a four-option multiple-choice question: {question:?}"
        ));
    }
    if let Ok(spec) = PromptSpec::parse(&sample.prompt) {
        let named = named_shapes(&spec);
        let about = match q {
            Question::ColourOf(s) | Question::Count { shape: Some(s), .. } => Some(s),
            Question::Which { b, .. } => Some(b.shape),
            _ => None,
        };
        if about.is_some_and(|s| !named.contains(&s)) {
            return reject(format!(
                "question {question:?} is not about the prompt {:?}",
                sample.prompt
            ));
        }
    }
    let gold = correct_answer(&q, &options, &read_scene(image))?;
    if gold != answer.trim() {
        return reject(format!(
            "answer {answer:?} is wrong; the image says {gold:?}"
        ));
    }
    Ok(())
}

fn named_shapes(spec: &PromptSpec) -> Vec<crate::scene::Shape> {
    let k = |k: Kind| k.shape;
    match *spec {
        PromptSpec::SingleObject(s) | PromptSpec::Counting(s, _) => vec![s],
        PromptSpec::TwoObject(a, b) => vec![a, b],
        PromptSpec::Colors(a) => vec![k(a)],
        PromptSpec::Position { a, b, .. } | PromptSpec::ColorAttr(a, b) => vec![k(a), k(b)],
    }
}
