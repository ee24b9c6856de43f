//! Parity of the candle Janus VQ with transformers' `JanusVQVAE`, on the committed tiny fixtures
//! (tests/fixtures/janus, made by scripts/make_janus_fixtures.py; see docs/FIXTURES.md).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use pairuni_data::RgbImage;
use pairuni_model::image_tokenizer::{model_to_u8, ImageTokenizer};
use pairuni_model::vq::{JanusVq, JanusVqConfig};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/janus")
}

fn vq_config() -> JanusVqConfig {
    let text = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(v["vq_config"].clone()).unwrap()
}

fn weights() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu).unwrap()
}

fn load_vq() -> JanusVq {
    let vb = VarBuilder::from_tensors(weights(), DType::F32, &Device::Cpu);
    JanusVq::new(&vq_config(), vb.pp("model.vqmodel")).unwrap()
}

fn fixtures() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("fixtures.safetensors"), &Device::Cpu)
        .unwrap()
}

/// max |a − b| / max |b|
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        scale > 0.1,
        "reference is (near) zero: the comparison would be vacuous"
    );
    diff / scale
}

fn codes_u32(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

#[test]
fn config_matches_fixture_geometry() {
    let cfg = vq_config();
    assert_eq!(cfg.num_patches, 8);
    assert_eq!(cfg.downsample(), 4);
    assert_eq!(cfg.image_size(), 32);
    let vq = load_vq();
    assert_eq!(vq.grid(), (8, 8));
    assert_eq!(vq.tokens_per_image(), 64);
    assert_eq!(vq.codebook_size(), 64);
}

#[test]
fn encode_latent_and_codes_match_transformers() {
    let (vq, fx) = (load_vq(), fixtures());
    let latent = vq.encode_latent(&fx["und.pixel_values"]).unwrap();
    let e = rel_err(&latent, &fx["vq.encode_latent"]);
    eprintln!("vq.encode_latent relative error {e:.2e}");
    assert!(e <= 1e-4, "latent relative error {e}");
    let codes = vq.encode_pixels(&fx["und.pixel_values"]).unwrap();
    assert_eq!(codes_u32(&codes), codes_u32(&fx["vq.encode_codes"]));
}

#[test]
fn encode_from_rgb_images_matches_transformers() {
    // Goes through our own u8 → model-space preprocessing, so this also checks it against the reference's.
    let (vq, fx) = (load_vq(), fixtures());
    let u8s = &fx["und.images_u8"];
    let imgs: Vec<RgbImage> = (0..2)
        .map(|i| {
            let raw = u8s
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap();
            RgbImage::from_raw(32, 32, raw).unwrap()
        })
        .collect();
    let codes = vq.encode_batch(&imgs).unwrap();
    assert_eq!(codes, codes_u32(&fx["vq.encode_codes"]));
    assert_eq!(vq.encode(&imgs[1]).unwrap(), codes[1]);
}

#[test]
fn decode_pixels_match_transformers() {
    let (vq, fx) = (load_vq(), fixtures());
    for (codes, want) in [
        ("vq.decode_codes", "vq.decode_pixels"),
        ("vq.encode_codes", "vq.roundtrip_pixels"),
    ] {
        let px = vq.decode_codes(&fx[codes]).unwrap();
        let e = rel_err(&px, &fx[want]);
        eprintln!("{want} relative error {e:.2e}");
        assert!(e <= 1e-4, "{want}: relative error {e}");
    }
}

#[test]
fn decode_to_images_follows_the_pixels() {
    let (vq, fx) = (load_vq(), fixtures());
    let codes = codes_u32(&fx["vq.decode_codes"]);
    let imgs = vq.decode(&codes).unwrap();
    assert_eq!(imgs.len(), 2);
    let want = fx["vq.decode_pixels"]
        .get(1)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap();
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!((imgs[1].width(), imgs[1].height()), (32, 32));
    let mut far = 0;
    for (got, w) in imgs[1].as_raw().iter().zip(&want) {
        far += usize::from(got.abs_diff(model_to_u8(*w)) > 1);
    }
    assert_eq!(
        far, 0,
        "{far} channel values differ from the reference by more than one level"
    );
    // The untrained decoder saturates some pixels but not all: the images carry information.
    assert!(imgs[1].as_raw().iter().any(|&v| v > 10 && v < 245));
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let vq = load_vq();
    let e = vq.decode(&[vec![0; 63]]).unwrap_err().to_string();
    assert!(e.contains("expected 64 codes, got 63"), "{e}");
    let mut c = vec![0u32; 64];
    c[10] = 64;
    let e = vq.decode(&[c]).unwrap_err().to_string();
    assert!(e.contains("position 10") && e.contains("code 64"), "{e}");
    let e = vq.encode(&RgbImage::new(16, 32)).unwrap_err().to_string();
    assert!(e.contains("16x32") && e.contains("32x32"), "{e}");
}

#[test]
fn missing_weight_is_named() {
    let mut w = weights();
    w.remove("model.vqmodel.decoder.up.1.block.0.nin_shortcut.weight")
        .unwrap();
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let e = JanusVq::new(&vq_config(), vb.pp("model.vqmodel"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("decoder.up.1.block.0.nin_shortcut.weight"),
        "{e}"
    );
}

#[test]
fn config_without_groupnorm_multiple_is_rejected() {
    let cfg = JanusVqConfig {
        base_channels: 48,
        ..vq_config()
    };
    let vb = VarBuilder::from_tensors(weights(), DType::F32, &Device::Cpu);
    let e = JanusVq::new(&cfg, vb.pp("model.vqmodel"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of 32"), "{e}");
}
