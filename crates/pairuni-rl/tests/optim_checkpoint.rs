//! AdamW moments in checkpoints: they are saved as f32, and a checkpoint from before that change (moments in
//! the weights' dtype, bf16 on a GPU) still resumes, its moments converted to f32.

mod common;

use std::collections::HashMap;
use std::path::Path;

use pairuni_model::{DType, Device, Janus, Tensor};
use pairuni_rl::config::{OptimConfig, SftConfig, TrainConfig};
use pairuni_rl::run::RunDir;
use pairuni_rl::RunOptions;

fn base_model() -> Janus {
    let w = common::world();
    let cfg = SftConfig {
        generation: w.join("generation.jsonl"),
        codebook_images: 64,
        ..SftConfig::default()
    };
    pairuni_rl::sft::initial_model(&cfg, 3, &Device::Cpu).unwrap()
}

fn cfg(out: &Path) -> TrainConfig {
    let w = common::world();
    TrainConfig {
        pairs: w.join("pairs.jsonl"),
        out_dir: out.to_path_buf(),
        steps: 4,
        batch_pairs: 1,
        group_size_und: 2,
        group_size_gen: 2,
        checkpoint_every: 2,
        optim: OptimConfig {
            lr: 1e-3,
            ..Default::default()
        },
        ..TrainConfig::default()
    }
}

fn moments(run: &Path) -> HashMap<String, Tensor> {
    RunDir::create(run)
        .unwrap()
        .latest_checkpoint(&Device::Cpu)
        .unwrap()
        .expect("a checkpoint")
        .optimizer
}

#[test]
fn moments_are_saved_as_f32_and_bf16_ones_from_older_checkpoints_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let opts = RunOptions {
        stop_after: Some(2),
        ..Default::default()
    };
    pairuni_rl::train(&cfg(&run), 4, base_model(), &opts).unwrap();
    let saved = moments(&run);
    assert!(!saved.is_empty());
    assert!(saved.values().all(|t| t.dtype() == DType::F32));
    assert!(saved.keys().any(|k| k.starts_with("m.")) && saved.keys().any(|k| k.starts_with("v.")));

    // Rewrite the checkpoint the way the old code stored moments of bf16 weights.
    let old: HashMap<String, Tensor> = saved
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::BF16).unwrap()))
        .collect();
    let file = run.join("checkpoints/step-2/optimizer.safetensors");
    candle_core::safetensors::save(&old, &file).unwrap();
    assert!(moments(&run).values().all(|t| t.dtype() == DType::BF16));

    let s = pairuni_rl::train(&cfg(&run), 4, base_model(), &RunOptions::default()).unwrap();
    assert_eq!((s.resumed_from, s.steps), (2, 4));
    let after = moments(&run);
    assert_eq!(after.len(), saved.len());
    assert!(after.values().all(|t| t.dtype() == DType::F32));
}
