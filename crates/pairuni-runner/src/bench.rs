//! Finding the benchmark files in a benchmark folder.
//!
//! Layout (the toy world's, also used for real files with their images):
//! ```text
//! BENCH/mcq/questions.jsonl          multiple choice, images relative to BENCH/mcq/
//! BENCH/pope/*.json                  POPE splits (one JSON object per line), images in BENCH/pope/images/
//! BENCH/mme/questions.jsonl          MME (format in pairuni_eval::mme), images relative to BENCH/mme/
//! BENCH/geneval/evaluation_metadata.jsonl   GenEval prompts + requirements
//! ```
//! `BENCH` may also be a world folder that holds `bench/`. Absent benchmarks are skipped; none at all is an error.

use std::path::{Path, PathBuf};

use pairuni_eval::EvalError;

/// The benchmark files found in a folder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BenchFiles {
    /// The folder the layout was found in.
    pub root: PathBuf,
    /// `mcq/questions.jsonl`.
    pub mcq: Option<PathBuf>,
    /// `pope/*.json`, sorted by name.
    pub pope: Vec<PathBuf>,
    /// `mme/questions.jsonl`.
    pub mme: Option<PathBuf>,
    /// `geneval/evaluation_metadata.jsonl`.
    pub geneval: Option<PathBuf>,
}

impl BenchFiles {
    /// The folder POPE images are read from.
    pub fn pope_images(&self) -> PathBuf {
        self.root.join("pope/images")
    }
}

/// Finds the benchmark files under `dir` (or `dir/bench`).
pub fn discover(dir: &Path) -> Result<BenchFiles, EvalError> {
    if !dir.is_dir() {
        return Err(EvalError::file(dir, "benchmark folder not found"));
    }
    let root = if dir.join("bench").is_dir() {
        dir.join("bench")
    } else {
        dir.to_path_buf()
    };
    let file = |rel: &str| Some(root.join(rel)).filter(|p| p.is_file());
    let mut pope = Vec::new();
    let pope_dir = root.join("pope");
    if pope_dir.is_dir() {
        let entries = std::fs::read_dir(&pope_dir)
            .map_err(|e| EvalError::file(&pope_dir, format!("cannot list: {e}")))?;
        for entry in entries {
            let path = entry
                .map_err(|e| EvalError::file(&pope_dir, format!("cannot list: {e}")))?
                .path();
            if path.is_file() && path.extension().is_some_and(|x| x == "json") {
                pope.push(path);
            }
        }
        pope.sort();
    }
    let files = BenchFiles {
        mcq: file("mcq/questions.jsonl"),
        mme: file("mme/questions.jsonl"),
        geneval: file("geneval/evaluation_metadata.jsonl"),
        pope,
        root,
    };
    if files.mcq.is_none()
        && files.mme.is_none()
        && files.geneval.is_none()
        && files.pope.is_empty()
    {
        return Err(EvalError::file(
            dir,
            "no benchmark found: expected mcq/questions.jsonl, pope/*.json, mme/questions.jsonl or \
             geneval/evaluation_metadata.jsonl (directly or under bench/)",
        ));
    }
    Ok(files)
}
