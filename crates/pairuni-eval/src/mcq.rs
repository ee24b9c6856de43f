//! Multiple choice (MMStar-style and MMMU-style): per-category and overall accuracy under a named rule.
//!
//! Gold format (JSONL, one question per line) — the toy MCQ layout, which is also what MMStar and MMMU rows
//! become when written as JSONL:
//! `{"question_id": "…", "image": "images/…png", "question": "… A. x B. y C. z D. w", "options": ["x", "y",
//! "z", "w"], "answer": "B", "category": "…"}`.
//! `id` is accepted for `question_id` (MMMU's column name); `options` may also be a string holding a JSON
//! array or a Python list (MMMU's column as exported); `image`, `options` and `category` may be absent
//! (MMStar rows carry the options inside the question; MMMU's category is the subject inside its id,
//! `validation_Art_Theory_12` → `Art_Theory`, else "all"). Rows with `"question_type": "open"` (MMMU's
//! open questions) are not scored here and are counted in `skipped_open`. Unknown fields are ignored.
//!
//! Rules: [`ChoiceRule::MmStar`] scores with MMStar's `exact_match` ([`crate::parse::mmstar_matches`]);
//! [`ChoiceRule::Mmmu`] parses with MMMU's order and its seeded random fallback
//! ([`crate::parse::parse_choice_mmmu`]), and needs `options`. Accuracies are percentages.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pairuni_data::jsonl::JsonlReader;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::parse::{mmstar_matches, option_letters, parse_choice_mmmu, ChoiceParse};
use crate::predictions::Predictions;

/// One multiple-choice line as written in the gold file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McqRecord {
    /// Question id (`id` in MMMU).
    #[serde(alias = "id", deserialize_with = "crate::util::id_string")]
    pub question_id: String,
    /// Image path relative to the gold file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Question text (toy and MMStar: options inline).
    pub question: String,
    /// Option texts in letter order (a JSON array, or a string holding a JSON array or Python list).
    #[serde(
        default,
        deserialize_with = "crate::util::options_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub options: Option<Vec<String>>,
    /// Gold option letter.
    pub answer: String,
    /// Category label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// MMMU's "multiple-choice" or "open".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question_type: Option<String>,
}

/// A parsed multiple-choice question.
#[derive(Debug, Clone, PartialEq)]
pub struct McqQuestion {
    /// Question id.
    pub question_id: String,
    /// Image path relative to the gold file's folder.
    pub image: Option<String>,
    /// Question text.
    pub question: String,
    /// Option texts (empty when the file has none).
    pub options: Vec<String>,
    /// Gold letter, upper case.
    pub answer: char,
    /// Category label.
    pub category: String,
    /// 1-based line in the gold file.
    pub line: usize,
}

/// A multiple-choice gold file.
#[derive(Debug, Clone, PartialEq)]
pub struct McqGold {
    /// The file.
    pub path: PathBuf,
    /// Multiple-choice questions in file order.
    pub questions: Vec<McqQuestion>,
    /// Open (non-multiple-choice) rows that were skipped.
    pub skipped_open: usize,
}

/// Category from an MMMU id: the part between the split prefix and the trailing number.
fn mmmu_subject(id: &str) -> Option<String> {
    let (head, tail) = id.rsplit_once('_')?;
    if tail.is_empty() || !tail.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (_, subject) = head.split_once('_')?;
    (!subject.is_empty()).then(|| subject.to_owned())
}

/// Reads a multiple-choice gold file (see the module doc for the accepted fields).
pub fn read_mcq(path: impl AsRef<Path>) -> Result<McqGold> {
    let path = path.as_ref();
    let mut questions = Vec::new();
    let mut skipped_open = 0;
    let mut seen = std::collections::HashMap::new();
    for item in JsonlReader::<McqRecord>::open(path)? {
        let (line, r) = item?;
        if r.question_type.as_deref() == Some("open") {
            skipped_open += 1;
            continue;
        }
        let answer = crate::util::gold_letter(&r.answer).ok_or_else(|| {
            EvalError::field(
                path,
                line,
                "answer",
                format!("expected an option letter, found {:?}", r.answer),
            )
        })?;
        let options = r.options.unwrap_or_default();
        if !options.is_empty() && !option_letters(options.len()).any(|l| l == answer) {
            return Err(EvalError::field(
                path,
                line,
                "answer",
                format!("letter {answer} is beyond the {} options", options.len()),
            ));
        }
        if options.len() > 26 {
            return Err(EvalError::field(
                path,
                line,
                "options",
                "more than 26 options",
            ));
        }
        if let Some(first) = seen.insert(r.question_id.clone(), line) {
            return Err(EvalError::field(
                path,
                line,
                "question_id",
                format!(
                    "duplicate question_id {:?} (first on line {first})",
                    r.question_id
                ),
            ));
        }
        let category = r
            .category
            .or_else(|| mmmu_subject(&r.question_id))
            .unwrap_or_else(|| "all".to_owned());
        questions.push(McqQuestion {
            question_id: r.question_id,
            image: r.image,
            question: r.question,
            options,
            answer,
            category,
            line,
        });
    }
    if questions.is_empty() {
        return Err(EvalError::file(
            path,
            "no multiple-choice questions in file",
        ));
    }
    Ok(McqGold {
        path: path.to_path_buf(),
        questions,
        skipped_open,
    })
}

/// Which rule turns outputs into letters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChoiceRule {
    /// MMStar's `exact_match` (first character, "(X", "option X", "the answer is X").
    #[default]
    MmStar,
    /// MMMU's `parse_multi_choice_response` with the seeded random fallback.
    Mmmu,
}

impl ChoiceRule {
    /// The rule's name as written in reports.
    pub fn name(self) -> &'static str {
        match self {
            ChoiceRule::MmStar => "mmstar",
            ChoiceRule::Mmmu => "mmmu",
        }
    }
}

/// Correct over total, with the percentage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Correct answers.
    pub correct: usize,
    /// Questions.
    pub total: usize,
    /// correct / total × 100 (0 when empty).
    pub accuracy: f64,
}

impl Accuracy {
    fn push(&mut self, right: bool) {
        self.total += 1;
        self.correct += usize::from(right);
        self.accuracy = 100.0 * self.correct as f64 / self.total as f64;
    }
}

/// Multiple-choice report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McqMetrics {
    /// Rule used.
    pub rule: ChoiceRule,
    /// Seed of the MMMU fallback draws.
    pub seed: u64,
    /// Over all scored questions.
    pub overall: Accuracy,
    /// Per category.
    pub categories: BTreeMap<String, Accuracy>,
    /// MMMU rule: answers that fell back to a random letter.
    pub random_fallbacks: usize,
    /// Open questions skipped (MMMU).
    pub skipped_open: usize,
}

/// Whether one output is correct under `rule`; also says whether MMMU's random fallback was used.
pub fn judge_choice(q: &McqQuestion, output: &str, rule: ChoiceRule, seed: u64) -> (bool, bool) {
    match rule {
        ChoiceRule::MmStar => (mmstar_matches(output, q.answer), false),
        ChoiceRule::Mmmu => match parse_choice_mmmu(output, &q.options, seed, &q.question_id) {
            Some(ChoiceParse::Parsed(c)) => (c == q.answer, false),
            Some(ChoiceParse::Random(c)) => (c == q.answer, true),
            None => (false, false),
        },
    }
}

/// Scores predictions under `rule`; a missing prediction, or MMMU's rule on a question without options, is an
/// error naming the gold line.
pub fn score_mcq(
    gold: &McqGold,
    preds: &Predictions,
    rule: ChoiceRule,
    seed: u64,
) -> Result<McqMetrics> {
    let mut overall = Accuracy::default();
    let mut categories: BTreeMap<String, Accuracy> = BTreeMap::new();
    let mut random_fallbacks = 0;
    for q in &gold.questions {
        let out = preds.require(&q.question_id, &gold.path, q.line)?;
        if rule == ChoiceRule::Mmmu && q.options.is_empty() {
            return Err(EvalError::field(
                &gold.path,
                q.line,
                "options",
                "the MMMU rule needs the option texts; this line has none",
            ));
        }
        let (right, fell_back) = judge_choice(q, out, rule, seed);
        random_fallbacks += usize::from(fell_back);
        overall.push(right);
        categories
            .entry(q.category.clone())
            .or_default()
            .push(right);
    }
    Ok(McqMetrics {
        rule,
        seed,
        overall,
        categories,
        random_fallbacks,
        skipped_open: gold.skipped_open,
    })
}
