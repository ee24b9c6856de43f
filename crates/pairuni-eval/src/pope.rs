//! POPE: yes/no object-existence questions; accuracy, precision, recall, F1 (positive = "yes") and yes-ratio.
//!
//! Gold files are POPE's own (`coco_pope_{random,popular,adversarial}.json`): despite the `.json` name, one JSON
//! object per line, `{"question_id": int, "image": "COCO_val2014_….jpg", "text": "Is there a … in the
//! image?", "label": "yes"|"no"}`. The toy world writes the same format. Question ids repeat across split
//! files, so each split is scored against its own predictions file.
//!
//! Two parsing variants, named in every report: [`YesNoRule::PopeExtract`] (POPE's official `evaluate.py`
//! rule, the default) and [`YesNoRule::ExactMatch`] (lmms-eval's POPE task). Under exact match an unparsed
//! output is wrong for accuracy and counts in neither precision nor recall, as in lmms-eval. The yes-ratio is
//! POPE's: predicted "yes" over all questions. Metrics are percentages; a ratio whose denominator is zero is 0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pairuni_data::jsonl::JsonlReader;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::parse::{parse_yes_no_exact, parse_yes_no_pope};
use crate::predictions::Predictions;

/// One POPE question as written in the benchmark file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopeRecord {
    /// Question id (an integer in the official files).
    #[serde(deserialize_with = "crate::util::id_string")]
    pub question_id: String,
    /// Image file name, relative to the split's image folder.
    pub image: String,
    /// The question.
    pub text: String,
    /// Gold answer, "yes" or "no".
    pub label: String,
}

/// A POPE question with its parsed label and where it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct PopeQuestion {
    /// Question id.
    pub question_id: String,
    /// Image file name.
    pub image: String,
    /// The question text.
    pub text: String,
    /// Gold answer (true = yes).
    pub label: bool,
    /// 1-based line in the gold file.
    pub line: usize,
}

/// One split file.
#[derive(Debug, Clone, PartialEq)]
pub struct PopeSplit {
    /// Split name: the file stem without a `coco_pope_`/`toy_pope_` prefix ("random", "popular", …).
    pub name: String,
    /// The gold file.
    pub path: PathBuf,
    /// Its questions in file order.
    pub questions: Vec<PopeQuestion>,
}

/// Split name from a POPE file name.
pub fn pope_split_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for prefix in ["coco_pope_", "toy_pope_", "aokvqa_pope_", "gqa_pope_"] {
        if let Some(rest) = stem.strip_prefix(prefix) {
            return rest.to_owned();
        }
    }
    stem
}

/// Reads one POPE split file; bad JSON, a missing field, a label other than yes/no or a duplicate id is an
/// error naming file, line and field.
pub fn read_pope(path: impl AsRef<Path>) -> Result<PopeSplit> {
    let path = path.as_ref();
    let mut questions = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for item in JsonlReader::<PopeRecord>::open(path)? {
        let (line, r) = item?;
        let label = crate::util::gold_yes_no(&r.label).ok_or_else(|| {
            EvalError::field(
                path,
                line,
                "label",
                format!("expected \"yes\" or \"no\", found {:?}", r.label),
            )
        })?;
        if let Some(first) = seen.insert(r.question_id.clone(), line) {
            return Err(EvalError::field(
                path,
                line,
                "question_id",
                format!(
                    "duplicate question_id {} (first on line {first})",
                    r.question_id
                ),
            ));
        }
        questions.push(PopeQuestion {
            question_id: r.question_id,
            image: r.image,
            text: r.text,
            label,
            line,
        });
    }
    if questions.is_empty() {
        return Err(EvalError::file(path, "no questions in POPE file"));
    }
    Ok(PopeSplit {
        name: pope_split_name(path),
        path: path.to_path_buf(),
        questions,
    })
}

/// Which POPE parsing variant turns outputs into yes/no.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum YesNoRule {
    /// POPE's official rule ([`parse_yes_no_pope`]): never unparsed.
    #[default]
    PopeExtract,
    /// lmms-eval's exact match ([`parse_yes_no_exact`]): anything but "yes"/"no" is unparsed.
    ExactMatch,
}

impl YesNoRule {
    /// The variant's name as written in reports.
    pub fn name(self) -> &'static str {
        match self {
            YesNoRule::PopeExtract => "pope-extract",
            YesNoRule::ExactMatch => "exact-match",
        }
    }

    /// Parses one output (None = unparsed).
    pub fn parse(self, output: &str) -> Option<bool> {
        match self {
            YesNoRule::PopeExtract => Some(parse_yes_no_pope(output)),
            YesNoRule::ExactMatch => parse_yes_no_exact(output),
        }
    }
}

/// Confusion counts of one split (or pooled), positive = yes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopeCounts {
    /// Predicted yes, gold yes.
    pub tp: usize,
    /// Predicted yes, gold no.
    pub fp: usize,
    /// Predicted no, gold no.
    pub tn: usize,
    /// Predicted no, gold yes.
    pub fn_: usize,
    /// Outputs the rule could not read (exact match only).
    pub unparsed: usize,
}

impl PopeCounts {
    /// Number of questions.
    pub fn total(&self) -> usize {
        self.tp + self.fp + self.tn + self.fn_ + self.unparsed
    }

    fn add(&mut self, o: &PopeCounts) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.tn += o.tn;
        self.fn_ += o.fn_;
        self.unparsed += o.unparsed;
    }

    /// The five POPE metrics from these counts.
    pub fn scores(&self) -> PopeScores {
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let precision = ratio(self.tp, self.tp + self.fp);
        let recall = ratio(self.tp, self.tp + self.fn_);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        PopeScores {
            accuracy: 100.0 * ratio(self.tp + self.tn, self.total()),
            precision: 100.0 * precision,
            recall: 100.0 * recall,
            f1: 100.0 * f1,
            yes_ratio: 100.0 * ratio(self.tp + self.fp, self.total()),
            counts: *self,
        }
    }
}

/// POPE metrics, all in percent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PopeScores {
    /// (TP + TN) / all.
    pub accuracy: f64,
    /// TP / (TP + FP).
    pub precision: f64,
    /// TP / (TP + FN).
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Predicted yes / all.
    pub yes_ratio: f64,
    /// The counts behind them.
    pub counts: PopeCounts,
}

/// Unweighted mean over splits of each metric (the "average" row some papers report).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PopeMeans {
    /// Mean accuracy.
    pub accuracy: f64,
    /// Mean precision.
    pub precision: f64,
    /// Mean recall.
    pub recall: f64,
    /// Mean F1.
    pub f1: f64,
    /// Mean yes-ratio.
    pub yes_ratio: f64,
}

/// POPE report: per split, pooled over all questions (lmms-eval's convention) and mean over splits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopeMetrics {
    /// Parsing variant used.
    pub rule: YesNoRule,
    /// Per split, by split name.
    pub splits: BTreeMap<String, PopeScores>,
    /// All questions of all splits pooled.
    pub overall: PopeScores,
    /// Unweighted mean of the split metrics.
    pub mean_over_splits: PopeMeans,
}

/// Counts of one split against its predictions; a gold question without a prediction is an error.
pub fn count_pope(split: &PopeSplit, preds: &Predictions, rule: YesNoRule) -> Result<PopeCounts> {
    let mut c = PopeCounts::default();
    for q in &split.questions {
        let out = preds.require(&q.question_id, &split.path, q.line)?;
        match (rule.parse(out), q.label) {
            (Some(true), true) => c.tp += 1,
            (Some(true), false) => c.fp += 1,
            (Some(false), false) => c.tn += 1,
            (Some(false), true) => c.fn_ += 1,
            (None, _) => c.unparsed += 1,
        }
    }
    Ok(c)
}

/// Scores each split against its own predictions (paired by position) and pools them.
pub fn score_pope(splits: &[(PopeSplit, Predictions)], rule: YesNoRule) -> Result<PopeMetrics> {
    if splits.is_empty() {
        return Err(EvalError::Usage(
            "POPE scoring needs at least one split".into(),
        ));
    }
    let mut per = BTreeMap::new();
    let mut pooled = PopeCounts::default();
    for (split, preds) in splits {
        let c = count_pope(split, preds, rule)?;
        pooled.add(&c);
        if per.insert(split.name.clone(), c.scores()).is_some() {
            return Err(EvalError::file(
                &split.path,
                format!("split name {:?} given twice", split.name),
            ));
        }
    }
    let n = per.len() as f64;
    let mean = |f: fn(&PopeScores) -> f64| per.values().map(f).sum::<f64>() / n;
    let mean_over_splits = PopeMeans {
        accuracy: mean(|s| s.accuracy),
        precision: mean(|s| s.precision),
        recall: mean(|s| s.recall),
        f1: mean(|s| s.f1),
        yes_ratio: mean(|s| s.yes_ratio),
    };
    Ok(PopeMetrics {
        rule,
        splits: per,
        overall: pooled.scores(),
        mean_over_splits,
    })
}
