//! AdamW moments in checkpoints: they are saved as f32, and a checkpoint from before that change (moments in
//! the weights' dtype, bf16 on a GPU) still resumes, its moments converted to f32. bf16 weights also checkpoint
//! their f32 master copies, and a resumed bf16 run ends bit-identical to an uninterrupted one.

mod common;

use std::collections::HashMap;
use std::path::Path;

use pairuni_model::{DType, Device, Janus, Tensor};
use pairuni_rl::config::{OptimConfig, SftConfig, TrainConfig};
use pairuni_rl::run::{Checkpoint, RunDir};
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

/// The latest checkpoint of `run`.
fn latest(run: &Path) -> Checkpoint {
    RunDir::create(run)
        .unwrap()
        .latest_checkpoint(&Device::Cpu)
        .unwrap()
        .expect("a checkpoint")
}

fn moments(run: &Path) -> HashMap<String, Tensor> {
    latest(run).optimizer
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

/// The toy model with its weights stored in bf16 (as on a GPU).
fn bf16_model(dir: &Path) -> Janus {
    base_model().save(dir).unwrap();
    Janus::load(dir, &Device::Cpu, DType::BF16).unwrap()
}

/// Every weight of the last checkpoint of `run`, as f32 values by name.
fn final_weights(run: &Path) -> Vec<(String, Vec<f32>)> {
    common::f32_values(latest(run).weights)
}

#[test]
fn bf16_training_checkpoints_its_f32_master_weights_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    let sft = |out: &Path| SftConfig {
        optim: OptimConfig {
            lr: 3e-4,
            ..Default::default()
        },
        ..common::short_sft(out)
    };
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    let start = bf16_model(&model_dir);
    let initial = common::f32_values(
        start
            .all_vars()
            .into_iter()
            .map(|(k, var)| (k, var.as_tensor().clone())),
    );
    pairuni_rl::sft(&sft(&straight), 2, start, &RunOptions::default()).unwrap();
    let stop = RunOptions {
        stop_after: Some(2),
        ..Default::default()
    };
    pairuni_rl::sft(&sft(&split), 2, bf16_model(&model_dir), &stop).unwrap();
    let saved = moments(&split);
    let masters: Vec<&String> = saved.keys().filter(|k| k.starts_with("w.")).collect();
    assert!(
        !masters.is_empty(),
        "no master weights in {:?}",
        saved.keys()
    );
    assert!(masters.iter().all(|k| saved[*k].dtype() == DType::F32));
    let s = pairuni_rl::sft(
        &sft(&split),
        2,
        bf16_model(&model_dir),
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(s.resumed_from, 2);
    let (a, b) = (final_weights(&straight), final_weights(&split));
    // Same names in the same order, so each weight is compared with its own start.
    assert!(initial.iter().map(|(n, _)| n).eq(a.iter().map(|(n, _)| n)));
    // lr 3e-4 is a few bf16 spacings of a typical weight: the weights move, and where they land after the
    // resume depends on the master's bits below bf16's.
    assert!(
        a.iter().zip(&initial).any(|(x, y)| x != y),
        "training did not move the weights"
    );
    assert!(a == b, "the resumed bf16 run differs from the straight one");
}
