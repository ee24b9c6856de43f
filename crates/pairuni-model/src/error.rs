//! Errors of this crate: each says what was being done and on which file.

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Everything that can go wrong loading, running or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed (shape mismatch, device, dtype).
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    /// Bad config.json.
    #[error("config {path}: {msg}")]
    Config {
        /// File that was read.
        path: String,
        /// What is wrong, with the field.
        msg: String,
    },
    /// A checkpoint file is missing, unreadable or lacks a tensor.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// File or folder concerned.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Caller passed something unusable (empty batch, wrong lengths, unknown ids).
    #[error("invalid input: {0}")]
    Input(String),
    /// The accelerator failed outside a tensor op (a CUDA graph's capture or replay).
    #[error("device: {0}")]
    Device(String),
    /// File system error with the path.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

impl ModelError {
    /// Wraps an io error with its path.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
    /// Invalid-input error.
    pub fn input(msg: impl Into<String>) -> Self {
        Self::Input(msg.into())
    }
}
