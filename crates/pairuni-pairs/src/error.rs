//! The error type of the pair builder.

use std::path::PathBuf;

/// Everything that can stop the pair builder. Teacher replies that do not parse are NOT errors: they are
/// counted rejections (see `teacher::Rejection`).
#[derive(Debug, thiserror::Error)]
pub enum PairsError {
    /// Reading or writing a pool, pair or stats file failed.
    #[error(transparent)]
    Data(#[from] pairuni_data::DataError),
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An image could not be read or decoded.
    #[error("{path}: cannot read image: {message}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The teacher cache database failed.
    #[error("teacher cache {path}: {source}")]
    Cache {
        /// The SQLite file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },
    /// A prompt template is missing or malformed.
    #[error("prompt template {name}: {message}")]
    Template {
        /// The template's name or file.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Encoder weights are missing, malformed or of the wrong shape.
    #[error("encoder weights {path}: {message}")]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong (names the tensor key).
        message: String,
    },
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The feature cache is unreadable.
    #[error("feature cache {path}: {message}")]
    FeatureCache {
        /// The cache file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The configuration is inconsistent.
    #[error("config: {0}")]
    Config(String),
    /// Drawing the histogram failed.
    #[error("plot {path}: {message}")]
    Plot {
        /// The PNG file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl PairsError {
    /// Wraps an IO error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, PairsError>;
