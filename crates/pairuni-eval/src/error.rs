//! The error type of the scorers: every problem names the file, and where it applies the line and field.

use std::path::PathBuf;

use pairuni_data::DataError;

/// A problem reading benchmark or prediction files, or combining them.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading or parsing a JSONL file failed (the message names file, line and field).
    #[error(transparent)]
    Data(#[from] DataError),
    /// A record is well-formed JSON but breaks the benchmark's rules.
    #[error("{}:{line}: field {field}: {message}", path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Field name within the record.
        field: String,
        /// What is wrong and, where useful, what to do.
        message: String,
    },
    /// A problem with a whole file (empty benchmark, unreadable folder…).
    #[error("{}: {message}", path.display())]
    File {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Arguments that do not fit together (e.g. two gold files but one predictions file).
    #[error("{0}")]
    Usage(String),
}

impl EvalError {
    /// A [`EvalError::Field`] problem.
    pub fn field(
        path: impl Into<PathBuf>,
        line: usize,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        EvalError::Field {
            path: path.into(),
            line,
            field: field.into(),
            message: message.into(),
        }
    }

    /// A [`EvalError::File`] problem.
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        EvalError::File {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
