//! MME: two yes/no questions per image; per subtask accuracy and accuracy+, summed into Perception/Cognition.
//!
//! Gold format we accept (JSONL, one question per line), the columns of the `lmms-lab/MME` release with its
//! images written to files:
//! `{"question_id": "existence/000000006040.jpg", "image": "images/…jpg", "question": "Is there a … ? Please
//! answer yes or no.", "answer": "Yes", "category": "existence", "id": "optional unique id"}`.
//! `question_id` names the image and is shared by its two questions (that is how lmms-eval pairs them for
//! accuracy+); `image` is relative to the JSONL file's folder. Each prediction is keyed by `id` when the gold
//! line has one, else by `<question_id>#1` / `<question_id>#2` (first / second occurrence in the file).
//!
//! Scoring follows lmms-eval's `mme_aggregate_results`: per subtask, accuracy = correct questions / questions
//! ×100, accuracy+ = images with both questions right / images ×100, subtask score = accuracy + accuracy+
//! (max 200); MME-Perception = sum over its 10 subtasks (max 2000), MME-Cognition = sum over the other 4
//! (max 800). Outputs are parsed with lmms-eval's rule ([`crate::parse::parse_yes_no_mme`]); unparsed = wrong.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use pairuni_data::jsonl::JsonlReader;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::parse::parse_yes_no_mme;
use crate::predictions::Predictions;

/// The 10 Perception subtasks, with the official names (as in the MME release and lmms-eval).
pub const MME_PERCEPTION: [&str; 10] = [
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
];

/// The 4 Cognition subtasks.
pub const MME_COGNITION: [&str; 4] = [
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
];

/// One MME line as written in the gold file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmeRecord {
    /// Image key shared by the image's two questions.
    #[serde(deserialize_with = "crate::util::id_string")]
    pub question_id: String,
    /// Image path relative to the gold file's folder.
    pub image: String,
    /// The question.
    pub question: String,
    /// "Yes" or "No".
    pub answer: String,
    /// Subtask name (one of [`MME_PERCEPTION`] or [`MME_COGNITION`]).
    pub category: String,
    /// Optional unique id of this question (the prediction key when present).
    #[serde(
        default,
        deserialize_with = "crate::util::opt_id_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub id: Option<String>,
}

/// A parsed MME question.
#[derive(Debug, Clone, PartialEq)]
pub struct MmeQuestion {
    /// Key its prediction is looked up by (see the module doc).
    pub key: String,
    /// Image key (pairs the two questions).
    pub question_id: String,
    /// Image path relative to the gold file's folder.
    pub image: String,
    /// The question.
    pub question: String,
    /// Gold answer (true = yes).
    pub answer: bool,
    /// Subtask.
    pub category: String,
    /// 1-based line in the gold file.
    pub line: usize,
}

/// A whole MME gold file.
#[derive(Debug, Clone, PartialEq)]
pub struct MmeGold {
    /// The file.
    pub path: PathBuf,
    /// Questions in file order.
    pub questions: Vec<MmeQuestion>,
}

/// Reads an MME gold file and checks the pairing: exactly two questions per (category, question_id).
pub fn read_mme(path: impl AsRef<Path>) -> Result<MmeGold> {
    let path = path.as_ref();
    let mut questions = Vec::new();
    let mut per_image: HashMap<(String, String), Vec<usize>> = HashMap::new();
    let mut keys: HashMap<String, usize> = HashMap::new();
    for item in JsonlReader::<MmeRecord>::open(path)? {
        let (line, r) = item?;
        let answer = crate::util::gold_yes_no(&r.answer).ok_or_else(|| {
            EvalError::field(
                path,
                line,
                "answer",
                format!("expected \"Yes\" or \"No\", found {:?}", r.answer),
            )
        })?;
        if !MME_PERCEPTION.contains(&r.category.as_str())
            && !MME_COGNITION.contains(&r.category.as_str())
        {
            return Err(EvalError::field(
                path,
                line,
                "category",
                format!(
                    "unknown MME subtask {:?}; expected one of {} or {}",
                    r.category,
                    MME_PERCEPTION.join(", "),
                    MME_COGNITION.join(", ")
                ),
            ));
        }
        let lines = per_image
            .entry((r.category.clone(), r.question_id.clone()))
            .or_default();
        lines.push(line);
        if lines.len() > 2 {
            return Err(EvalError::field(
                path,
                line,
                "question_id",
                format!(
                    "third question for image {:?} in {} (lines {:?}); MME has exactly two per image",
                    r.question_id, r.category, lines
                ),
            ));
        }
        let key =
            r.id.clone()
                .unwrap_or_else(|| format!("{}#{}", r.question_id, lines.len()));
        if let Some(first) = keys.insert(key.clone(), line) {
            return Err(EvalError::field(
                path,
                line,
                "id",
                format!("prediction key {key:?} already used on line {first}"),
            ));
        }
        questions.push(MmeQuestion {
            key,
            question_id: r.question_id,
            image: r.image,
            question: r.question,
            answer,
            category: r.category,
            line,
        });
    }
    if questions.is_empty() {
        return Err(EvalError::file(path, "no questions in MME file"));
    }
    for ((cat, qid), lines) in &per_image {
        if lines.len() != 2 {
            return Err(EvalError::field(
                path,
                lines[0],
                "question_id",
                format!("image {qid:?} in {cat} has one question; MME needs exactly two per image"),
            ));
        }
    }
    Ok(MmeGold {
        path: path.to_path_buf(),
        questions,
    })
}

/// Scores of one subtask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmeSubtask {
    /// Number of images (question pairs).
    pub images: usize,
    /// Number of questions.
    pub questions: usize,
    /// Correctly answered questions.
    pub correct: usize,
    /// Images with both questions correct.
    pub both_correct: usize,
    /// correct / questions × 100.
    pub accuracy: f64,
    /// both_correct / images × 100.
    pub accuracy_plus: f64,
    /// accuracy + accuracy_plus (max 200): the number MME tables report per subtask.
    pub score: f64,
}

/// MME report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmeMetrics {
    /// Per subtask present in the gold file.
    pub subtasks: BTreeMap<String, MmeSubtask>,
    /// Sum of Perception subtask scores (max 2000 when all 10 are present).
    pub perception: f64,
    /// Sum of Cognition subtask scores (max 800 when all 4 are present).
    pub cognition: f64,
    /// Perception subtasks absent from the gold file (their sum is then partial).
    pub missing_perception: Vec<String>,
    /// Cognition subtasks absent from the gold file.
    pub missing_cognition: Vec<String>,
    /// Outputs the lmms-eval rule could not read (scored wrong).
    pub unparsed: usize,
}

/// Scores MME predictions; a gold question without a prediction is an error naming its line.
pub fn score_mme(gold: &MmeGold, preds: &Predictions) -> Result<MmeMetrics> {
    // (category → image → [right?])
    let mut by_cat: BTreeMap<&str, BTreeMap<&str, Vec<bool>>> = BTreeMap::new();
    let mut unparsed = 0;
    for q in &gold.questions {
        let out = preds.require(&q.key, &gold.path, q.line)?;
        let parsed = parse_yes_no_mme(out);
        if parsed.is_none() {
            unparsed += 1;
        }
        by_cat
            .entry(&q.category)
            .or_default()
            .entry(&q.question_id)
            .or_default()
            .push(parsed == Some(q.answer));
    }
    let mut subtasks = BTreeMap::new();
    for (cat, images) in by_cat {
        let questions: usize = images.values().map(Vec::len).sum();
        let correct: usize = images.values().flatten().filter(|&&r| r).count();
        let both_correct = images.values().filter(|r| r.iter().all(|&x| x)).count();
        let accuracy = 100.0 * correct as f64 / questions as f64;
        let accuracy_plus = 100.0 * both_correct as f64 / images.len() as f64;
        subtasks.insert(
            cat.to_owned(),
            MmeSubtask {
                images: images.len(),
                questions,
                correct,
                both_correct,
                accuracy,
                accuracy_plus,
                score: accuracy + accuracy_plus,
            },
        );
    }
    let sum = |names: &[&str]| -> f64 {
        names
            .iter()
            .filter_map(|n| subtasks.get(*n))
            .map(|s| s.score)
            .sum()
    };
    let missing = |names: &[&str]| -> Vec<String> {
        names
            .iter()
            .filter(|n| !subtasks.contains_key(**n))
            .map(|n| (*n).to_owned())
            .collect()
    };
    Ok(MmeMetrics {
        perception: sum(&MME_PERCEPTION),
        cognition: sum(&MME_COGNITION),
        missing_perception: missing(&MME_PERCEPTION),
        missing_cognition: missing(&MME_COGNITION),
        subtasks,
        unparsed,
    })
}
