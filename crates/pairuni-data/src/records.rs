//! The record types: samples, quadruples and PairUG pairs.

use serde::{Deserialize, Serialize};

/// An understanding sample: an image, a question about it and its gold answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnderstandingSample {
    /// Unique id within its pool.
    pub id: String,
    /// Image path, relative to the folder of the JSONL file that holds the record.
    pub image_path: String,
    /// The question, with its options inline ("… A. red B. blue …") when it is multiple choice.
    pub question: String,
    /// The gold answer: an option letter or "yes"/"no".
    pub answer: String,
    /// The option texts in letter order, when the question is multiple choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<String>>,
    /// Free-form category label (question kind, source data set…).
    #[serde(default)]
    pub tag: String,
}

/// A generation sample: a prompt and the reference image that goes with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSample {
    /// Unique id within its pool.
    pub id: String,
    /// The text-to-image prompt.
    pub prompt: String,
    /// Reference image path, relative to the folder of the JSONL file that holds the record.
    pub image_path: String,
    /// Free-form category label (GenEval task, source data set…).
    #[serde(default)]
    pub tag: String,
}

/// A sample completed to have both halves: (image, caption/prompt, question, answer).
///
/// This is exactly one side (`generate_ann` or `understand_ann`) of a PairUG record. Optional fields are ours;
/// the official files do not have them and official readers ignore them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quadruple {
    /// Image path, relative to the folder of the PairUG file.
    pub image_path: String,
    /// The caption (understanding side) or the prompt (generation side).
    pub prompt: String,
    /// A question about the image, options inline for multiple choice.
    pub question: String,
    /// The gold answer: an option letter or "yes"/"no".
    pub answer: String,
    /// Category label.
    pub tag: String,
    /// Id of the sample this side was completed from (ours, optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// How a pair was formed (METHOD.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairKind {
    /// One image's own quadruple on both sides (a K-means medoid); similarity 1.
    Aligned,
    /// A generation sample and its nearest remaining understanding sample; similarity = cosine.
    Retrieved,
}

/// One PairUG record: a generation side and an understanding side that enter the same PairGRPO update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    /// Image-feature similarity of the two sides (1 for aligned pairs).
    pub similarity: f64,
    /// The generation side.
    pub generate_ann: Quadruple,
    /// The understanding side.
    pub understand_ann: Quadruple,
    /// How the pair was formed (ours, optional; absent in official files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<PairKind>,
    /// Where the pair came from, e.g. the builder run (ours, optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl PairRecord {
    /// The pair's kind: the stored one, else inferred (similarity ≥ 1 − 1e-9 and the same image → aligned).
    pub fn effective_kind(&self) -> PairKind {
        match self.kind {
            Some(kind) => kind,
            None if self.similarity >= 1.0 - 1e-9
                && self.generate_ann.image_path == self.understand_ann.image_path =>
            {
                PairKind::Aligned
            }
            None => PairKind::Retrieved,
        }
    }
}
