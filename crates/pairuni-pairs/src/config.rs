//! Configuration of this stage: the `[pairs]` section of a pairuni TOML file.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Pair-builder settings: teacher, encoder, K-means, retrieval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairsConfig {
    /// The teacher that completes samples into quadruples (default: the toy oracle).
    pub teacher: TeacherConfig,
    /// The image encoder whose features drive clustering and retrieval (default: the toy descriptor).
    pub encoder: EncoderConfig,
    /// K-means settings for the aligned pairs.
    pub kmeans: KMeansConfig,
    /// Cosine threshold δ for retrieved pairs (METHOD.md §2 step 4). Default 0.6.
    pub delta: f32,
    /// How many understanding samples each generation sample takes (n). Default 1.
    pub top_n: usize,
    /// Seed of every random choice of the builder (K-means, retrieval order). Default 0.
    pub seed: u64,
    /// Approximate nearest-neighbour index for retrieval; exact search when disabled (default).
    pub ann: AnnConfig,
}

impl Default for PairsConfig {
    fn default() -> Self {
        Self {
            teacher: TeacherConfig::default(),
            encoder: EncoderConfig::default(),
            kmeans: KMeansConfig::default(),
            delta: 0.6,
            top_n: 1,
            seed: 0,
            ann: AnnConfig::default(),
        }
    }
}

/// Which teacher implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TeacherKind {
    /// The toy world's oracle (knows the scene graph); needs toy-world image paths.
    Oracle,
    /// An OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama…).
    Openai,
}

/// Teacher settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherConfig {
    /// `oracle` or `openai`. Default `oracle`.
    pub kind: TeacherKind,
    /// Oracle only: probability that a completion is deliberately wrong (so verify has work). Default 0.0.
    pub error_rate: f64,
    /// OpenAI only: base URL, the part before `/chat/completions`. Default `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// OpenAI only: model name sent with each request. Default `gpt-4o-mini`.
    pub model: String,
    /// OpenAI only: NAME of the environment variable holding the API key (the key itself is never written
    /// anywhere). Empty = send no key (local servers). Default `OPENAI_API_KEY`.
    pub api_key_env: String,
    /// Number of requests in flight at once. Default 8.
    pub concurrency: usize,
    /// Per-request timeout in seconds (connect + whole reply). Default 60.
    pub timeout_s: f64,
    /// Transport retries on timeouts, 429 and 5xx, with exponential backoff and jitter. Default 4.
    pub max_retries: u32,
    /// First backoff delay in seconds; doubles each retry, with up to 50 % jitter. Default 1.0.
    pub backoff_s: f64,
    /// Completions re-generated after a failed verification before the sample is dropped. Default 2.
    pub verify_retries: u32,
    /// Sampling temperature sent with each request. Default 0.2.
    pub temperature: f64,
    /// SQLite cache of every teacher exchange; relative paths are relative to the output file's folder.
    /// Default `teacher_cache.sqlite`.
    pub cache: PathBuf,
    /// Folder of prompt templates overriding the built-in ones (`prompts/teacher/*.txt`). Default: built-in.
    pub templates_dir: Option<PathBuf>,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        Self {
            kind: TeacherKind::Oracle,
            error_rate: 0.0,
            base_url: "http://127.0.0.1:8000/v1".into(),
            model: "gpt-4o-mini".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            concurrency: 8,
            timeout_s: 60.0,
            max_retries: 4,
            backoff_s: 1.0,
            verify_retries: 2,
            temperature: 0.2,
            cache: PathBuf::from("teacher_cache.sqlite"),
            templates_dir: None,
        }
    }
}

/// Which image encoder to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    /// The toy world's fixed colour/layout descriptor.
    Toy,
    /// ResNet-50 without its classifier head (torchvision key names, safetensors).
    Resnet50,
}

/// Image-encoder settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderConfig {
    /// `toy` or `resnet50`. Default `toy`.
    pub kind: EncoderKind,
    /// ResNet-50 weights (safetensors with torchvision key names). Default: none (required for `resnet50`).
    pub weights: Option<PathBuf>,
    /// Images per forward pass. Default 32.
    pub batch_size: usize,
    /// Folder of cached feature files; relative to the output file's folder. Default `features`.
    pub cache_dir: PathBuf,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            kind: EncoderKind::Toy,
            weights: None,
            batch_size: 32,
            cache_dir: PathBuf::from("features"),
        }
    }
}

/// Mini-batch K-means settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KMeansConfig {
    /// Number of clusters; overrides `k_fraction` when set. Default: none.
    pub k: Option<usize>,
    /// K = round(k_fraction × N) over the union of both pools. Default 0.045.
    pub k_fraction: f64,
    /// Points per mini-batch. Default 1024.
    pub batch_size: usize,
    /// Mini-batch iterations. Default 100.
    pub iterations: usize,
    /// Points sampled for the k-means++ initialisation (bounds its cost on large pools). Default 20000.
    pub init_sample: usize,
}

impl Default for KMeansConfig {
    fn default() -> Self {
        Self {
            k: None,
            k_fraction: 0.045,
            batch_size: 1024,
            iterations: 100,
            init_sample: 20_000,
        }
    }
}

impl KMeansConfig {
    /// The number of clusters for `n` points: `k` if set, else round(k_fraction × n), at least 1 and ≤ n.
    pub fn k_for(&self, n: usize) -> usize {
        let k = self
            .k
            .unwrap_or_else(|| (self.k_fraction * n as f64).round() as usize);
        k.clamp(1.min(n), n)
    }
}

/// Which approximate index serves the reduced rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnnIndexKind {
    /// Inverted file: spherical K-means lists, GEMM coarse step, `probes` lists scanned per query.
    Ivf,
    /// HNSW graph (hnsw_rs): `max_connections`, `ef_construction`, `ef_search`.
    Hnsw,
}

/// Approximate retrieval: PCA reduction → IVF or HNSW index on the reduced, re-normalised rows → the `rerank`
/// best candidates of each query re-scored exactly in full dimension → top `candidates` with cosine ≥ δ → the
/// same greedy one-use matching as exact search. Every value is checked when the index is built; a bad one
/// (e.g. `reduce_dim` larger than the feature dimension, or 0) is an error naming the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnConfig {
    /// Use the approximate path instead of exact search. Default false.
    pub enabled: bool,
    /// `ivf` or `hnsw`. Default `ivf` (faster to build and to query on CPUs; see docs/BENCHMARKS.md).
    pub index: AnnIndexKind,
    /// Dimension the features are reduced to by PCA before indexing, in 1..=feature dimension; equal to the
    /// feature dimension = no reduction. Default 256.
    pub reduce_dim: usize,
    /// Database rows sampled (seeded) to fit the PCA. Default 4096.
    pub pca_sample: usize,
    /// Candidates per query taken from the index and re-scored exactly in full dimension; at least
    /// `candidates` (and `top_n`). Default 32.
    pub rerank: usize,
    /// IVF: number of lists. Default: 4·√(database rows).
    pub lists: Option<usize>,
    /// IVF: lists scanned per query. Default 24.
    pub probes: usize,
    /// HNSW: links per node (M), 1..=255. Default 24.
    pub max_connections: usize,
    /// HNSW: candidate-list width while building. Default 200.
    pub ef_construction: usize,
    /// HNSW: candidate-list width while searching. Default 128.
    pub ef_search: usize,
    /// Candidates kept per query after re-ranking, for the greedy one-use matching. Default 16.
    pub candidates: usize,
}

impl Default for AnnConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            index: AnnIndexKind::Ivf,
            reduce_dim: 256,
            pca_sample: 4096,
            rerank: 32,
            lists: None,
            probes: 24,
            max_connections: 24,
            ef_construction: 200,
            ef_search: 128,
            candidates: 16,
        }
    }
}
