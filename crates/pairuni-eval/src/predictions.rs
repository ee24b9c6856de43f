//! Predictions files: what a model (any model, any harness) answered, one JSON object per line.
//!
//! Format (documented in docs/EVAL.md): `{"question_id": "…" | 123, "output": "raw model output"}`. The
//! output is the raw text; scorers parse it with the benchmark's own rule. `text` and `answer` are accepted as
//! aliases of `output` so LLaVA-style answer files score as they are; other fields are ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pairuni_data::jsonl::JsonlReader;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// One answer: the question it answers and the model's raw output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Id of the gold question (string, or integer in files that use integers).
    #[serde(deserialize_with = "crate::util::id_string")]
    pub question_id: String,
    /// The model's raw output, unparsed.
    #[serde(alias = "text", alias = "answer")]
    pub output: String,
}

/// The predictions of one file, by question id.
#[derive(Debug, Clone, Default)]
pub struct Predictions {
    path: PathBuf,
    by_id: HashMap<String, (usize, String)>,
}

impl Predictions {
    /// Builds a set from in-memory predictions (e.g. fresh from the runner); `path` only labels errors.
    pub fn from_vec(path: impl Into<PathBuf>, preds: Vec<Prediction>) -> Result<Self> {
        let path = path.into();
        let mut by_id = HashMap::with_capacity(preds.len());
        for (i, p) in preds.into_iter().enumerate() {
            if by_id.contains_key(&p.question_id) {
                return Err(EvalError::field(
                    &path,
                    i + 1,
                    "question_id",
                    format!("duplicate question_id {:?}", p.question_id),
                ));
            }
            by_id.insert(p.question_id, (i + 1, p.output));
        }
        Ok(Predictions { path, by_id })
    }

    /// The file these predictions came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of predictions.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The raw output for `question_id`, if predicted.
    pub fn get(&self, question_id: &str) -> Option<&str> {
        self.by_id.get(question_id).map(|(_, o)| o.as_str())
    }

    /// The raw output for a gold question, or an error naming the gold line that has no prediction.
    pub fn require(&self, question_id: &str, gold: &Path, gold_line: usize) -> Result<&str> {
        self.get(question_id).ok_or_else(|| {
            EvalError::field(
                gold,
                gold_line,
                "question_id",
                format!(
                    "no prediction for question_id {question_id:?} in {}",
                    self.path.display()
                ),
            )
        })
    }
}

/// Reads a predictions JSONL file; a duplicate question id is an error naming both lines.
pub fn read_predictions(path: impl AsRef<Path>) -> Result<Predictions> {
    let path = path.as_ref();
    let mut by_id: HashMap<String, (usize, String)> = HashMap::new();
    for item in JsonlReader::<Prediction>::open(path)? {
        let (line, p) = item?;
        if let Some((first, _)) = by_id.get(&p.question_id) {
            return Err(EvalError::field(
                path,
                line,
                "question_id",
                format!(
                    "duplicate question_id {:?} (first on line {first})",
                    p.question_id
                ),
            ));
        }
        by_id.insert(p.question_id, (line, p.output));
    }
    Ok(Predictions {
        path: path.to_path_buf(),
        by_id,
    })
}

/// Writes predictions atomically, one object per line, in the given order.
pub fn write_predictions(path: impl AsRef<Path>, preds: &[Prediction]) -> Result<()> {
    pairuni_data::jsonl::write_jsonl(path, preds)?;
    Ok(())
}
