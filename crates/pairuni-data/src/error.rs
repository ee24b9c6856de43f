//! The one error type of this crate: every problem names the file, and where it applies the line and field.

use std::fmt;
use std::path::{Path, PathBuf};

/// What kind of problem a [`DataError`] is; `pairuni data check` counts problems by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemKind {
    /// The file (or an image) could not be read or written.
    Io,
    /// A line is not valid JSON (or not UTF-8).
    MalformedJson,
    /// A required field is absent.
    MissingField,
    /// A field the format does not have (pools deny unknown fields).
    UnknownField,
    /// A field has the wrong type or an impossible value.
    InvalidField,
    /// A required string field is empty.
    EmptyField,
    /// A pool id that an earlier line already used.
    DuplicateId,
    /// A referenced image file does not exist.
    MissingImage,
    /// A referenced image exists but cannot be read or decoded.
    BadImage,
    /// The file's format could not be recognised from its records.
    UnknownFormat,
}

impl ProblemKind {
    /// Stable kebab-case name, used in summaries.
    pub fn name(self) -> &'static str {
        match self {
            ProblemKind::Io => "io",
            ProblemKind::MalformedJson => "malformed-json",
            ProblemKind::MissingField => "missing-field",
            ProblemKind::UnknownField => "unknown-field",
            ProblemKind::InvalidField => "invalid-field",
            ProblemKind::EmptyField => "empty-field",
            ProblemKind::DuplicateId => "duplicate-id",
            ProblemKind::MissingImage => "missing-image",
            ProblemKind::BadImage => "bad-image",
            ProblemKind::UnknownFormat => "unknown-format",
        }
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The field-level problems, kept apart so a [`DataError::Field`] cannot claim to be a file-level one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldProblem {
    /// The field is absent.
    Missing,
    /// The field is not part of the format.
    Unknown,
    /// Wrong type or impossible value.
    Invalid,
    /// Empty where a value is required.
    Empty,
    /// Duplicate id.
    Duplicate,
}

/// A problem with a data file, formatted like a compiler diagnostic: `FILE:LINE: field PATH: message`.
///
/// Line numbers are 1-based; field paths are dotted (`generate_ann.prompt`, `options[2]`).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read, created or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A line that is not JSON (or not UTF-8).
    #[error("{}:{line}: malformed JSON: {message}", path.display())]
    Malformed {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What the parser said, with the column.
        message: String,
    },
    /// A field that is missing, unknown, of the wrong type, empty or duplicated.
    #[error("{}:{line}: field {field}: {message}", path.display())]
    Field {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Dotted field path within the record.
        field: String,
        /// Which field problem it is.
        problem: FieldProblem,
        /// Human-readable detail.
        message: String,
    },
    /// A record names an image that does not exist.
    #[error("{}:{line}: field {field}: image not found: {}", path.display(), image.display())]
    MissingImage {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Dotted field path of the image path (`understand_ann.image_path`).
        field: String,
        /// The image path as resolved against the JSONL file's folder.
        image: PathBuf,
    },
    /// A record names an image that exists but cannot be read or decoded.
    #[error("{}:{line}: field {field}: cannot read image {}: {message}", path.display(), image.display())]
    BadImage {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Dotted field path of the image path.
        field: String,
        /// The image path as resolved against the JSONL file's folder.
        image: PathBuf,
        /// What the decoder said.
        message: String,
    },
    /// The record's keys match none of the known formats.
    #[error("{}:{line}: unknown format: {message}", path.display())]
    UnknownFormat {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line of the record the format was guessed from.
        line: usize,
        /// Which keys were seen.
        message: String,
    },
    /// An image file (outside any record) that cannot be decoded or encoded.
    #[error("{}: {message}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What the codec said.
        message: String,
    },
}

impl DataError {
    /// An [`DataError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// The problem's kind, for counting.
    pub fn kind(&self) -> ProblemKind {
        match self {
            DataError::Io { .. } => ProblemKind::Io,
            DataError::Malformed { .. } => ProblemKind::MalformedJson,
            DataError::Field { problem, .. } => match problem {
                FieldProblem::Missing => ProblemKind::MissingField,
                FieldProblem::Unknown => ProblemKind::UnknownField,
                FieldProblem::Invalid => ProblemKind::InvalidField,
                FieldProblem::Empty => ProblemKind::EmptyField,
                FieldProblem::Duplicate => ProblemKind::DuplicateId,
            },
            DataError::MissingImage { .. } => ProblemKind::MissingImage,
            DataError::BadImage { .. } | DataError::Image { .. } => ProblemKind::BadImage,
            DataError::UnknownFormat { .. } => ProblemKind::UnknownFormat,
        }
    }

    /// The file the problem is in (the JSONL file, or the image for [`DataError::Image`]).
    pub fn path(&self) -> &Path {
        match self {
            DataError::Io { path, .. }
            | DataError::Malformed { path, .. }
            | DataError::Field { path, .. }
            | DataError::MissingImage { path, .. }
            | DataError::BadImage { path, .. }
            | DataError::UnknownFormat { path, .. }
            | DataError::Image { path, .. } => path,
        }
    }

    /// The 1-based line, when the problem belongs to one record.
    pub fn line(&self) -> Option<usize> {
        match self {
            DataError::Malformed { line, .. }
            | DataError::Field { line, .. }
            | DataError::MissingImage { line, .. }
            | DataError::BadImage { line, .. }
            | DataError::UnknownFormat { line, .. } => Some(*line),
            DataError::Io { .. } | DataError::Image { .. } => None,
        }
    }

    /// The dotted field path, when the problem belongs to one field.
    pub fn field(&self) -> Option<&str> {
        match self {
            DataError::Field { field, .. }
            | DataError::MissingImage { field, .. }
            | DataError::BadImage { field, .. } => Some(field),
            _ => None,
        }
    }
}
