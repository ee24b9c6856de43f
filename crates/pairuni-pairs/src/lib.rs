//! pairuni-pairs: builds PairUG pair files from an understanding pool and a generation pool (METHOD.md §1–2).
//!
//! A [`teacher::Teacher`] (the toy oracle, or any OpenAI-compatible server behind an SQLite cache) completes
//! every sample into a quadruple and verifies it. An [`encoder::ImageEncoder`] (the toy descriptor, or
//! ResNet-50 in candle) turns every image into an L2-normalised feature row, cached on disk. [`kmeans`] clusters
//! the union of both pools; each cluster's medoid becomes an aligned pair. [`retrieval`] (exact blocked GEMM,
//! or the [`ann`] path: [`pca`] reduction, an [`ivf`] or HNSW index, exact re-ranking) pairs each remaining
//! generation sample with its nearest unused understanding samples above δ. [`builder`] runs the whole chain and writes the PairUG JSONL, [`stats`] and a histogram;
//! [`toy`] holds the toy-world checks (shared-object rate of retrieved vs random pairs).

pub mod ann;
pub mod bench;
pub mod builder;
pub mod config;
pub mod encoder;
pub mod error;
pub mod ivf;
pub mod kmeans;
pub mod linalg;
pub mod pca;
pub mod retrieval;
pub mod setup;
pub mod stats;
pub mod teacher;
pub mod toy;

pub use builder::{build_and_write, build_pairs, BuildOutput, BuildPaths};
pub use config::PairsConfig;
pub use encoder::ImageEncoder;
pub use error::{PairsError, Result};
pub use teacher::Teacher;
