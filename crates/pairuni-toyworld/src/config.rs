//! Configuration of this stage: the `[world]` section of a pairuni TOML file.

use serde::{Deserialize, Serialize};

/// Toy-world generation settings (`pairuni world generate`, `pairuni demo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorldConfig {
    /// Seed of every random choice in the world: scenes, questions, prompts, benchmark sampling. Default 0.
    pub seed: u64,
    /// Number of understanding samples (image, question, answer) in the pool. Default 10000.
    pub understanding: usize,
    /// Number of generation samples (prompt, reference image) in the pool. Default 10000.
    pub generation: usize,
    /// Benchmark size: toy-GenEval prompt lines, toy-POPE questions per split (six per image), toy-MCQ
    /// questions. Default 600.
    pub bench: usize,
    /// Canvas side in pixels, at least 32. Default 32 (a 32×32 image is 64 patch codes of 4×4).
    pub size: u32,
    /// Fewest objects in a pool or MCQ scene (1..=4). Default 1.
    pub min_objects: usize,
    /// Most objects in a pool or MCQ scene (min_objects..=9). Default 4.
    pub max_objects: usize,
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            seed: 0,
            understanding: 10_000,
            generation: 10_000,
            bench: 600,
            size: 32,
            min_objects: 1,
            max_objects: 4,
        }
    }
}
