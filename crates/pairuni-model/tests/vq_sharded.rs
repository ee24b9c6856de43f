//! The VQ loads from a transformers-style sharded checkpoint (index + 2 shards) with the same result.
//!
//! Only the index is committed (tests/fixtures/janus/sharded); the shards are rebuilt here from
//! model.safetensors by following the index's weight_map, as docs/FIXTURES.md describes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use pairuni_model::vq::{JanusVq, JanusVqConfig};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/janus")
}

/// Writes the shard files named by `index.json`'s weight_map into `out`; returns their paths.
fn write_shards(out: &Path) -> Vec<PathBuf> {
    let dir = fixture_dir();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("sharded/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let all = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(
        map.len(),
        all.len(),
        "index and model.safetensors list different tensors"
    );
    let mut shards: BTreeMap<String, HashMap<String, Tensor>> = BTreeMap::new();
    for (name, file) in map {
        let t = all[name].clone();
        shards
            .entry(file.as_str().unwrap().to_string())
            .or_default()
            .insert(name.clone(), t);
    }
    std::fs::copy(
        dir.join("sharded/model.safetensors.index.json"),
        out.join("model.safetensors.index.json"),
    )
    .unwrap();
    shards
        .into_iter()
        .map(|(file, tensors)| {
            let p = out.join(file);
            candle_core::safetensors::save(&tensors, &p).unwrap();
            p
        })
        .collect()
}

#[test]
fn sharded_checkpoint_decodes_like_the_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let files = write_shards(tmp.path());
    assert_eq!(files.len(), 2);
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    // The VQ weights straddle both shards in this split, so loading needs both files.
    let text = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cfg: JanusVqConfig = serde_json::from_value(v["vq_config"].clone()).unwrap();
    // SAFETY: the files were just written by this test and are not modified while mapped.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.unwrap();
    let vq = JanusVq::new(&cfg, vb.pp("model.vqmodel")).unwrap();
    let fx =
        candle_core::safetensors::load(fixture_dir().join("fixtures.safetensors"), &Device::Cpu)
            .unwrap();
    let px = vq.decode_codes(&fx["vq.decode_codes"]).unwrap();
    let diff = (&px - &fx["vq.decode_pixels"]).unwrap().abs().unwrap();
    let diff = diff
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "max abs diff {diff}");
    // Each shard alone is not enough.
    let one = unsafe { VarBuilder::from_mmaped_safetensors(&files[..1], DType::F32, &Device::Cpu) }
        .unwrap();
    let two = unsafe { VarBuilder::from_mmaped_safetensors(&files[1..], DType::F32, &Device::Cpu) }
        .unwrap();
    assert!(JanusVq::new(&cfg, one.pp("model.vqmodel")).is_err());
    assert!(JanusVq::new(&cfg, two.pp("model.vqmodel")).is_err());
}
