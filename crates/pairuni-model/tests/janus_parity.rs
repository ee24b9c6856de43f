//! Parity with transformers' JanusForConditionalGeneration on the committed fixtures
//! (tests/fixtures/janus, made by scripts/make_janus_fixtures.py; references computed in f64).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::rel_err;
use pairuni_model::{DType, Device, Janus, Tensor};

const TOL: f32 = 1e-4;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/janus")
}

fn fixtures() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("fixtures.safetensors"), &Device::Cpu)
        .unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

#[test]
fn understanding_logits_and_vision_features_match_transformers() {
    let f = fixtures();
    let m = Janus::load(&fixture_dir(), &Device::Cpu, DType::F32).unwrap();
    let px = &f["und.pixel_values"];
    let e = rel_err(
        &m.vision_hidden(px).unwrap(),
        &f["vision.last_hidden_state"],
    );
    assert!(e <= TOL, "vision last_hidden_state rel err {e}");
    let e = rel_err(&m.image_features(px).unwrap(), &f["vision.image_embeds"]);
    assert!(e <= TOL, "aligner output rel err {e}");
    let ids = rows(&f["und.input_ids"]);
    let logits = m.text_logits(&ids, Some(px)).unwrap();
    let e = rel_err(&logits, &f["und.logits"]);
    assert!(e <= TOL, "understanding logits rel err {e}");
    // A wrong image must move the logits: the comparison above is not vacuous.
    let swapped = Tensor::cat(
        &[
            px.get(1).unwrap().unsqueeze(0).unwrap(),
            px.get(0).unwrap().unsqueeze(0).unwrap(),
        ],
        0,
    )
    .unwrap();
    let other = m.text_logits(&ids, Some(&swapped)).unwrap();
    assert!(rel_err(&other, &f["und.logits"]) > 1e-2);
}

#[test]
fn preprocessing_matches_janus_image_processor() {
    let f = fixtures();
    let m = Janus::load(&fixture_dir(), &Device::Cpu, DType::F32).unwrap();
    let u8s = f["und.images_u8"].to_dtype(DType::U32).unwrap();
    for b in 0..2 {
        let raw: Vec<u8> = u8s
            .get(b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
            .into_iter()
            .map(|v| v as u8)
            .collect();
        let img = pairuni_model::RgbImage::from_raw(32, 32, raw).unwrap();
        let px = m.preprocess_image(&img).unwrap();
        let e = rel_err(&px, &f["und.pixel_values"].get(b).unwrap());
        assert!(e <= 1e-6, "pixel preprocessing rel err {e}");
    }
}

#[test]
fn generation_head_logits_match_transformers() {
    let f = fixtures();
    let m = Janus::load(&fixture_dir(), &Device::Cpu, DType::F32).unwrap();
    let prompts = rows(&f["gen.prompt_ids"]);
    let codes = rows(&f["gen.codes"]);
    let ce = m
        .code_embeddings(&Tensor::new(codes.clone(), &Device::Cpu).unwrap())
        .unwrap();
    let e = rel_err(&ce, &f["gen.code_embeds"]);
    assert!(e <= TOL, "code embeddings rel err {e}");
    let logits = m.gen_logits(&prompts, &codes).unwrap();
    let e = rel_err(&logits, &f["gen.logits"]);
    assert!(e <= TOL, "gen-head logits rel err {e}");
    assert_eq!(m.image_tokens_per_image(), 64);
}

#[test]
fn vq_decode_through_the_checkpoint_matches_transformers() {
    let f = fixtures();
    let m = Janus::load(&fixture_dir(), &Device::Cpu, DType::F32).unwrap();
    let codes = rows(&f["vq.decode_codes"]);
    let imgs = m.decode_codes(&codes).unwrap();
    let want = pairuni_model::image_tokenizer::pixels_to_rgb(&f["vq.decode_pixels"]).unwrap();
    assert_eq!(imgs.len(), 2);
    for (a, b) in imgs.iter().zip(&want) {
        let max = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        assert!(max <= 1, "decoded pixels differ by {max} levels");
    }
}

#[test]
fn sharded_checkpoint_loads_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_dir();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::copy(
        src.join("sharded/model.safetensors.index.json"),
        dir.path().join("model.safetensors.index.json"),
    )
    .unwrap();
    let all = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(src.join("sharded/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut shards: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    for (name, file) in index["weight_map"].as_object().unwrap() {
        shards
            .entry(file.as_str().unwrap().to_string())
            .or_default()
            .insert(name.clone(), all[name].clone());
    }
    assert_eq!(shards.len(), 2);
    for (file, ts) in &shards {
        candle_core::safetensors::save(ts, dir.path().join(file)).unwrap();
    }
    let a = Janus::load(&src, &Device::Cpu, DType::F32).unwrap();
    let b = Janus::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(a.all_vars().len(), b.all_vars().len());
    let ids = vec![vec![0u32, 20, 41, 7, 99]];
    let e = rel_err(
        &a.text_logits(&ids, None).unwrap(),
        &b.text_logits(&ids, None).unwrap(),
    );
    assert_eq!(e, 0.0);
    // A shard that is listed but missing is reported by name.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = Janus::load(dir.path(), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn bf16_load_stays_close_to_f32() {
    let f = fixtures();
    let m = Janus::load(&fixture_dir(), &Device::Cpu, DType::BF16).unwrap();
    let prompts = rows(&f["gen.prompt_ids"]);
    let codes = rows(&f["gen.codes"]);
    let logits = m.gen_logits(&prompts, &codes).unwrap();
    assert_eq!(logits.dtype(), DType::F32);
    let e = rel_err(&logits, &f["gen.logits"]);
    assert!(e < 0.1, "bf16 gen logits rel err {e}");
}
