//! Whole-file validation behind `pairuni data check`: every problem in a file, not only the first.
//!
//! A file is read line by line; each line is parsed, checked for empty required strings and duplicate ids, and
//! every image it references is resolved and decoded (each distinct image once). The format is given or guessed
//! from the keys of the first record.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

use crate::error::{DataError, FieldProblem, ProblemKind};
use crate::image::{in_record, load_rgb, resolve};
use crate::jsonl::{parse_value, require_object, JsonlValues};
use crate::records::{GenerationSample, PairRecord, Quadruple, UnderstandingSample};

/// The three JSONL formats of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Understanding pool: [`UnderstandingSample`] lines.
    Understanding,
    /// Generation pool: [`GenerationSample`] lines.
    Generation,
    /// PairUG pairs: [`PairRecord`] lines.
    Pairs,
}

impl Format {
    /// Stable lower-case name (as accepted by `--format`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Understanding => "understanding",
            Format::Generation => "generation",
            Format::Pairs => "pairs",
        }
    }

    /// Guesses the format from a record's keys; `None` if the value is not an object or matches none.
    pub fn detect(value: &Value) -> Option<Format> {
        let object = value.as_object()?;
        let has = |key: &str| object.contains_key(key);
        if has("similarity") || has("generate_ann") || has("understand_ann") {
            Some(Format::Pairs)
        } else if has("question") || has("answer") || has("options") {
            Some(Format::Understanding)
        } else if has("prompt") {
            Some(Format::Generation)
        } else {
            None
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "understanding" => Ok(Format::Understanding),
            "generation" => Ok(Format::Generation),
            "pairs" | "pairug" => Ok(Format::Pairs),
            other => Err(format!(
                "unknown format `{other}` (expected understanding, generation or pairs)"
            )),
        }
    }
}

/// What to validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidateOptions {
    /// The format to check against; `None` guesses it from the first record's keys.
    pub format: Option<Format>,
    /// Whether to check that every referenced image exists and decodes (default true).
    pub check_images: bool,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        ValidateOptions {
            format: None,
            check_images: true,
        }
    }
}

/// The outcome of validating one file.
#[derive(Debug)]
pub struct ValidationReport {
    /// The file.
    pub path: PathBuf,
    /// The format checked against (given or detected); `None` if it could not be determined.
    pub format: Option<Format>,
    /// Non-blank lines seen.
    pub records: usize,
    /// Records without any problem.
    pub ok: usize,
    /// Distinct images decoded.
    pub images_checked: usize,
    /// Every problem, in line order.
    pub problems: Vec<DataError>,
    /// Number of problems per kind.
    pub counts: BTreeMap<ProblemKind, usize>,
}

impl ValidationReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Validates every line of `path`, collecting all problems (never stops early, never panics on bad input).
pub fn validate_file(path: impl AsRef<Path>, options: &ValidateOptions) -> ValidationReport {
    let path = path.as_ref();
    let mut checker = Checker {
        path,
        options,
        format: options.format,
        problems: Vec::new(),
        seen_ids: HashMap::new(),
        images: HashMap::new(),
    };
    let mut records = 0;
    let mut ok = 0;
    match JsonlValues::open(path) {
        Ok(values) => {
            for (line, value) in values {
                records += 1;
                let before = checker.problems.len();
                match value {
                    Ok(value) => checker.check_record(line, value),
                    Err(e) => checker.problems.push(e),
                }
                if checker.problems.len() == before {
                    ok += 1;
                }
            }
        }
        Err(e) => checker.problems.push(e),
    }
    let mut counts = BTreeMap::new();
    for problem in &checker.problems {
        *counts.entry(problem.kind()).or_insert(0) += 1;
    }
    ValidationReport {
        path: path.to_path_buf(),
        format: checker.format,
        records,
        ok,
        images_checked: checker.images.len(),
        problems: checker.problems,
        counts,
    }
}

struct Checker<'a> {
    path: &'a Path,
    options: &'a ValidateOptions,
    format: Option<Format>,
    problems: Vec<DataError>,
    /// Pool id → first line that used it.
    seen_ids: HashMap<String, usize>,
    /// Resolved image → `Ok` or `(missing?, message)`, so an image shared by many records is decoded once.
    images: HashMap<PathBuf, Result<(), (bool, String)>>,
}

impl Checker<'_> {
    fn check_record(&mut self, line: usize, value: Value) {
        if let Err(e) = require_object(self.path, line, &value) {
            self.problems.push(e);
            return;
        }
        let format = match self.format.or_else(|| Format::detect(&value)) {
            Some(format) => format,
            None => {
                let keys: Vec<&str> = value
                    .as_object()
                    .map(|o| o.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                let keys = if keys.is_empty() {
                    "an empty object".to_owned()
                } else {
                    format!("keys {}", keys.join(", "))
                };
                self.problems.push(DataError::UnknownFormat {
                    path: self.path.to_path_buf(),
                    line,
                    message: format!(
                        "{keys}: not an understanding sample, generation sample or PairUG record"
                    ),
                });
                return;
            }
        };
        self.format = Some(format);
        match format {
            Format::Understanding => {
                match parse_value::<UnderstandingSample>(self.path, line, value) {
                    Ok(s) => {
                        self.require(line, "id", &s.id);
                        self.require(line, "image_path", &s.image_path);
                        self.require(line, "question", &s.question);
                        self.require(line, "answer", &s.answer);
                        if let Some(options) = &s.options {
                            if options.is_empty() {
                                self.field(
                                    line,
                                    "options",
                                    FieldProblem::Empty,
                                    "empty option list".into(),
                                );
                            }
                            for (i, option) in options.iter().enumerate() {
                                self.require(line, &format!("options[{i}]"), option);
                            }
                        }
                        self.unique_id(line, &s.id);
                        self.image(line, "image_path", &s.image_path);
                    }
                    Err(e) => self.problems.push(e),
                }
            }
            Format::Generation => match parse_value::<GenerationSample>(self.path, line, value) {
                Ok(s) => {
                    self.require(line, "id", &s.id);
                    self.require(line, "prompt", &s.prompt);
                    self.require(line, "image_path", &s.image_path);
                    self.unique_id(line, &s.id);
                    self.image(line, "image_path", &s.image_path);
                }
                Err(e) => self.problems.push(e),
            },
            Format::Pairs => match parse_value::<PairRecord>(self.path, line, value) {
                Ok(p) => {
                    // A cosine lives in [-1, 1]; allow rounding slack.
                    if !(-1.0 - 1e-6..=1.0 + 1e-6).contains(&p.similarity) {
                        let message = format!("{} is outside [-1, 1]", p.similarity);
                        self.field(line, "similarity", FieldProblem::Invalid, message);
                    }
                    // Only the halves PairGRPO uses must be filled: the generation prompt and the
                    // understanding question/answer (plus both images).
                    self.require(line, "generate_ann.image_path", &p.generate_ann.image_path);
                    self.require(line, "generate_ann.prompt", &p.generate_ann.prompt);
                    self.require(
                        line,
                        "understand_ann.image_path",
                        &p.understand_ann.image_path,
                    );
                    self.require(line, "understand_ann.question", &p.understand_ann.question);
                    self.require(line, "understand_ann.answer", &p.understand_ann.answer);
                    self.quadruple_image(line, "generate_ann", &p.generate_ann);
                    self.quadruple_image(line, "understand_ann", &p.understand_ann);
                }
                Err(e) => self.problems.push(e),
            },
        }
    }

    fn field(&mut self, line: usize, field: &str, problem: FieldProblem, message: String) {
        self.problems.push(DataError::Field {
            path: self.path.to_path_buf(),
            line,
            field: field.to_owned(),
            problem,
            message,
        });
    }

    fn require(&mut self, line: usize, field: &str, value: &str) {
        if value.trim().is_empty() {
            self.field(
                line,
                field,
                FieldProblem::Empty,
                "must not be empty".to_owned(),
            );
        }
    }

    fn unique_id(&mut self, line: usize, id: &str) {
        if id.is_empty() {
            return;
        }
        if let Some(&first) = self.seen_ids.get(id) {
            let message = format!("duplicate id `{id}` (first used on line {first})");
            self.field(line, "id", FieldProblem::Duplicate, message);
        } else {
            self.seen_ids.insert(id.to_owned(), line);
        }
    }

    fn quadruple_image(&mut self, line: usize, side: &str, q: &Quadruple) {
        self.image(line, &format!("{side}.image_path"), &q.image_path);
    }

    fn image(&mut self, line: usize, field: &str, rel: &str) {
        if !self.options.check_images || rel.trim().is_empty() {
            return;
        }
        let resolved = resolve(self.path, rel);
        let state = self
            .images
            .entry(resolved.clone())
            .or_insert_with(|| match load_rgb(&resolved) {
                Ok(_) => Ok(()),
                Err(DataError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Err((true, String::new()))
                }
                Err(DataError::Io { source, .. }) => Err((false, source.to_string())),
                Err(e) => Err((false, image_message(e))),
            })
            .clone();
        if let Err((missing, message)) = state {
            let err = if missing {
                DataError::Io {
                    path: resolved,
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                }
            } else {
                DataError::Image {
                    path: resolved,
                    message,
                }
            };
            self.problems.push(in_record(err, self.path, line, field));
        }
    }
}

fn image_message(err: DataError) -> String {
    match err {
        DataError::Image { message, .. } => message,
        other => other.to_string(),
    }
}
