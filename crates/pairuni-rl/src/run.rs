//! Run folders: resolved config, `metrics.jsonl`, and checkpoints that make a restarted run continue exactly.
//!
//! ```text
//! RUN/config.toml                 the resolved configuration (written by the caller)
//! RUN/metrics.jsonl               one JSON object per step
//! RUN/checkpoints/step-N/         weights.safetensors, optimizer.safetensors, state.json
//! RUN/checkpoints/latest          "step-N", written last: a checkpoint is complete once it is named here
//! RUN/final/                      the trained model (a `Janus::load` folder)
//! ```
//! A checkpoint folder is built under a temporary name, every file fsynced, then renamed into place; the
//! `latest` pointer is replaced atomically afterwards, so a crash at any moment leaves the previous checkpoint
//! usable.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::Cursor;

/// Run-folder failures, each naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// File or folder.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A checkpoint file is unreadable or inconsistent.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    pairuni_data::write_atomic_bytes(path, bytes).map_err(|e| RunError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// A ChaCha8 generator's exact position, storable as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte seed, hex.
    pub seed: String,
    /// Stream id.
    pub stream: u64,
    /// Word position (as a decimal string: it is a u128).
    pub word_pos: String,
}

impl RngState {
    /// Captures a generator.
    pub fn of(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// Rebuilds the generator at the stored position.
    pub fn restore(&self) -> Option<ChaCha8Rng> {
        use rand::SeedableRng;
        if self.seed.len() != 64 {
            return None;
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).ok()?;
        }
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse().ok()?);
        Some(rng)
    }
}

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Completed optimiser steps.
    pub step: usize,
    /// Data position.
    pub cursor: Cursor,
    /// The trainer's random generator.
    pub rng: RngState,
    /// AdamW update count.
    pub optimizer_t: u64,
    /// Consecutive non-finite steps so far.
    pub nonfinite_streak: usize,
    /// Non-finite steps skipped in the whole run.
    pub nonfinite_total: usize,
}

/// A run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// Its root.
    pub root: PathBuf,
}

/// A checkpoint read back.
pub struct Checkpoint {
    /// Model weights by variable name.
    pub weights: HashMap<String, Tensor>,
    /// Optimiser moments by name.
    pub optimizer: HashMap<String, Tensor>,
    /// Counters and positions.
    pub state: TrainState,
}

impl RunDir {
    /// Opens (creating it if needed) a run folder.
    pub fn create(root: &Path) -> Result<Self, RunError> {
        fs::create_dir_all(root.join("checkpoints")).map_err(io(root))?;
        Ok(Self::at(root))
    }

    /// The layout of the run folder `root`, without touching the disk (to find a run's files).
    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// `final/`.
    pub fn final_dir(&self) -> PathBuf {
        self.root.join("final")
    }

    /// Writes the resolved config; if one is already there and differs, the old one is kept as
    /// `config.previous.toml` so the change is visible.
    pub fn write_config(&self, toml_text: &str) -> Result<(), RunError> {
        let path = self.root.join("config.toml");
        if let Ok(old) = fs::read_to_string(&path) {
            if old == toml_text {
                return Ok(());
            }
            tracing::warn!(path = %path.display(), "run folder was started with a different config; resuming with the new one");
            write_atomic(&self.root.join("config.previous.toml"), old.as_bytes())?;
        }
        write_atomic(&path, toml_text.as_bytes())
    }

    /// Saves a checkpoint of step `state.step` and points `latest` at it.
    pub fn save_checkpoint(
        &self,
        vars: &[(String, Var)],
        optimizer: &HashMap<String, Tensor>,
        state: &TrainState,
    ) -> Result<PathBuf, RunError> {
        let ckdir = self.root.join("checkpoints");
        let name = format!("step-{}", state.step);
        let final_dir = ckdir.join(&name);
        let tmp = ckdir.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let weights: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let save = |map: &HashMap<String, Tensor>, file: &str| -> Result<(), RunError> {
            let path = tmp.join(file);
            candle_core::safetensors::save(map, &path).map_err(|e| RunError::Checkpoint {
                path: path.clone(),
                message: e.to_string(),
            })?;
            fsync(&path)
        };
        save(&weights, "weights.safetensors")?;
        save(optimizer, "optimizer.safetensors")?;
        let state_path = tmp.join("state.json");
        let json = serde_json::to_vec_pretty(state).expect("state serialises");
        let mut f = fs::File::create(&state_path).map_err(io(&state_path))?;
        f.write_all(&json).map_err(io(&state_path))?;
        f.sync_all().map_err(io(&state_path))?;
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
        }
        fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        if let Ok(d) = fs::File::open(&ckdir) {
            let _ = d.sync_all();
        }
        write_atomic(&ckdir.join("latest"), name.as_bytes())?;
        Ok(final_dir)
    }

    /// The checkpoint `latest` names, if any.
    pub fn latest_checkpoint(&self, device: &Device) -> Result<Option<Checkpoint>, RunError> {
        let pointer = self.root.join("checkpoints").join("latest");
        let name = match fs::read_to_string(&pointer) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&pointer)(e)),
        };
        let dir = self.root.join("checkpoints").join(&name);
        let load = |file: &str| -> Result<HashMap<String, Tensor>, RunError> {
            let path = dir.join(file);
            candle_core::safetensors::load(&path, device).map_err(|e| RunError::Checkpoint {
                path,
                message: e.to_string(),
            })
        };
        let state_path = dir.join("state.json");
        let text = fs::read_to_string(&state_path).map_err(io(&state_path))?;
        let state: TrainState = serde_json::from_str(&text).map_err(|e| RunError::Checkpoint {
            path: state_path.clone(),
            message: format!("line {}, column {}: {e}", e.line(), e.column()),
        })?;
        Ok(Some(Checkpoint {
            weights: load("weights.safetensors")?,
            optimizer: load("optimizer.safetensors")?,
            state,
        }))
    }

    /// Keeps the first `steps` lines of metrics.jsonl (the steps a resumed run does not redo).
    pub fn truncate_metrics(&self, steps: usize) -> Result<(), RunError> {
        let path = self.metrics_path();
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text.lines().take(steps).map(|l| format!("{l}\n")).collect();
        write_atomic(&path, kept.as_bytes())
    }

    /// Appends one metrics line.
    pub fn append_metrics(&self, line: &serde_json::Value) -> Result<(), RunError> {
        append_line(&self.metrics_path(), line)
    }

    /// `eval.jsonl`: one line per held-out evaluation (`eval_every`), with its `step`.
    pub fn evals_path(&self) -> PathBuf {
        self.root.join("eval.jsonl")
    }

    /// `eval/step-NNNNNN/`: what the held-out evaluation after `step` steps wrote (predictions, images, scores).
    pub fn eval_dir(&self, step: usize) -> PathBuf {
        self.root.join("eval").join(format!("step-{step:06}"))
    }

    /// Drops the evaluation lines of steps after `steps` (a run resumed from an earlier checkpoint evaluates them
    /// again) and any line that does not parse (an append cut short by a kill); returns the steps kept.
    pub fn truncate_evals(&self, steps: usize) -> Result<Vec<usize>, RunError> {
        let path = self.evals_path();
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(Vec::new());
        };
        let mut kept = String::new();
        let mut kept_steps = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let step = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
            match step.map(|s| s as usize) {
                Some(step) if step <= steps => {
                    kept.push_str(line);
                    kept.push('\n');
                    kept_steps.push(step);
                }
                Some(_) => {}
                // Said, not silently lost: its step's evaluation is redone if the schedule still has it.
                None => tracing::warn!(
                    file = %path.display(),
                    line = index + 1,
                    "dropping an evaluation line without a readable step (cut short by a kill?)"
                ),
            }
        }
        if kept.len() != text.len() {
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(kept_steps)
    }

    /// Appends one evaluation line (synced: an evaluation can take minutes to redo).
    pub fn append_eval(&self, line: &serde_json::Value) -> Result<(), RunError> {
        let path = self.evals_path();
        append_line(&path, line)?;
        fsync(&path)
    }
}

fn append_line(path: &Path, line: &serde_json::Value) -> Result<(), RunError> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    writeln!(f, "{line}").map_err(io(path))
}

fn fsync(path: &Path) -> Result<(), RunError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Copies checkpoint weights into the model's variables; every variable must be present with its shape.
pub fn restore_vars(
    vars: &[(String, Var)],
    weights: &HashMap<String, Tensor>,
) -> Result<(), String> {
    for (name, var) in vars {
        let t = weights
            .get(name)
            .ok_or_else(|| format!("checkpoint has no weight `{name}`"))?;
        if t.shape() != var.shape() {
            return Err(format!(
                "weight `{name}` has shape {:?} in the checkpoint, {:?} in the model",
                t.shape(),
                var.shape()
            ));
        }
        let t = t
            .to_dtype(var.dtype())
            .and_then(|t| t.to_device(var.device()))
            .map_err(|e| e.to_string())?;
        var.set(&t).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn rng_state_round_trips_mid_stream() {
        let mut a = ChaCha8Rng::seed_from_u64(42);
        for _ in 0..37 {
            a.random::<u32>();
        }
        let mut b = RngState::of(&a).restore().unwrap();
        let xs: Vec<u64> = (0..10).map(|_| a.random()).collect();
        let ys: Vec<u64> = (0..10).map(|_| b.random()).collect();
        assert_eq!(xs, ys);
    }

    #[test]
    fn checkpoint_round_trip_and_latest_pointer() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path()).unwrap();
        assert!(run.latest_checkpoint(&Device::Cpu).unwrap().is_none());
        let v = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), v.clone())];
        let mut opt = HashMap::new();
        opt.insert(
            "m.w".to_string(),
            Tensor::new(&[0.5f32, 0.25], &Device::Cpu).unwrap(),
        );
        let state = TrainState {
            step: 3,
            cursor: Cursor { epoch: 1, index: 2 },
            rng: RngState::of(&ChaCha8Rng::seed_from_u64(1)),
            optimizer_t: 3,
            nonfinite_streak: 0,
            nonfinite_total: 1,
        };
        run.save_checkpoint(&vars, &opt, &state).unwrap();
        v.set(&Tensor::new(&[9.0f32, 9.0], &Device::Cpu).unwrap())
            .unwrap();
        let ck = run.latest_checkpoint(&Device::Cpu).unwrap().unwrap();
        assert_eq!(ck.state, state);
        restore_vars(&vars, &ck.weights).unwrap();
        assert_eq!(v.as_tensor().to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        assert_eq!(ck.optimizer["m.w"].to_vec1::<f32>().unwrap(), [0.5, 0.25]);
        let other = vec![("missing".to_string(), v)];
        assert!(restore_vars(&other, &ck.weights)
            .unwrap_err()
            .contains("missing"));
        // No temp folders left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn metrics_truncate_to_the_resumed_step() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path()).unwrap();
        for s in 1..=5 {
            run.append_metrics(&serde_json::json!({ "step": s }))
                .unwrap();
        }
        run.truncate_metrics(3).unwrap();
        let text = fs::read_to_string(run.metrics_path()).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with("{\"step\":3}\n"));
    }

    #[test]
    fn evaluations_truncate_to_the_resumed_step_and_drop_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path()).unwrap();
        assert!(run.truncate_evals(10).unwrap().is_empty(), "no file yet");
        for s in [0, 10, 20, 30] {
            run.append_eval(&serde_json::json!({ "step": s, "mcq": 0.5 }))
                .unwrap();
        }
        // A kill in the middle of an append leaves a line that does not parse.
        let mut text = fs::read_to_string(run.evals_path()).unwrap();
        text.push_str("{\"step\": 40, \"mc");
        fs::write(run.evals_path(), &text).unwrap();
        assert_eq!(run.truncate_evals(20).unwrap(), vec![0, 10, 20]);
        let text = fs::read_to_string(run.evals_path()).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with("{\"mcq\":0.5,\"step\":20}\n"), "{text}");
        assert_eq!(run.eval_dir(20), dir.path().join("eval/step-000020"));
    }
}
