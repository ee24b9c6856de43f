//! The toy patch-codebook image tokenizer: learning, exact round trips, determinism, files.

use candle_core::Device;
use pairuni_data::RgbImage;
use pairuni_model::image_tokenizer::{pixels_to_rgb, ImageTokenizer};
use pairuni_model::patch_codebook::{
    count_distinct_patches, PatchCodebook, PatchCodebookConfig, FILE_NAME,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Toy-world-like renders: a flat background with flat-colour rectangles and discs at unaligned positions
/// (edges cut through patches), so few distinct 4×4 patches.
fn toy_images(n: usize, seed: u64) -> Vec<RgbImage> {
    let palette = [
        [240, 240, 235],
        [200, 30, 40],
        [30, 60, 190],
        [40, 170, 60],
        [230, 200, 30],
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut img = RgbImage::from_pixel(32, 32, image::Rgb(palette[0]));
            for _ in 0..2 {
                let col = image::Rgb(palette[rng.random_range(1..palette.len())]);
                let (cx, cy, r) = (
                    rng.random_range(6..26i32),
                    rng.random_range(6..26i32),
                    rng.random_range(3..6i32),
                );
                let disc = rng.random_bool(0.5);
                for (x, y, p) in img.enumerate_pixels_mut() {
                    let (dx, dy) = (x as i32 - cx, y as i32 - cy);
                    let inside = if disc {
                        dx * dx + dy * dy <= r * r
                    } else {
                        dx.abs() <= r && dy.abs() <= r
                    };
                    if inside {
                        *p = col;
                    }
                }
            }
            img
        })
        .collect()
}

fn noise_images(n: usize, seed: u64) -> Vec<RgbImage> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            RgbImage::from_fn(32, 32, |_, _| {
                image::Rgb([rng.random(), rng.random(), rng.random()])
            })
        })
        .collect()
}

#[test]
fn toy_renders_round_trip_exactly() {
    let imgs = toy_images(40, 1);
    let cb = PatchCodebook::train(&imgs, &PatchCodebookConfig::default(), &Device::Cpu).unwrap();
    assert!(
        cb.codebook_size() < 512,
        "toy renders should have fewer distinct patches than K"
    );
    assert!(
        cb.codebook_size() > 5,
        "edges make more patches than the flat colours alone"
    );
    assert_eq!(cb.grid(), (8, 8));
    assert_eq!(cb.image_size(), 32);
    let codes = cb.encode_batch(&imgs).unwrap();
    assert!(codes.iter().all(|c| c.len() == 64));
    assert_eq!(cb.decode(&codes).unwrap(), imgs);
    // Identical patches get identical codes: the background patch is the most common code everywhere.
    assert_eq!(codes[0][0], codes[1][0]);
}

#[test]
fn decode_tensor_agrees_with_decode() {
    let imgs = toy_images(10, 2);
    let cb = PatchCodebook::train(&imgs, &PatchCodebookConfig::default(), &Device::Cpu).unwrap();
    let codes = cb.encode_batch(&imgs[..3]).unwrap();
    let t = cb.codes_to_tensor(&codes).unwrap();
    let px = cb.decode_tensor(&t).unwrap();
    assert_eq!(px.dims(), &[3, 3, 32, 32]);
    assert_eq!(pixels_to_rgb(&px).unwrap(), cb.decode(&codes).unwrap());
    assert_eq!(pixels_to_rgb(&px).unwrap(), imgs[..3].to_vec());
}

#[test]
fn kmeans_is_seeded_and_respects_k() {
    let imgs = noise_images(4, 3);
    let cfg = PatchCodebookConfig {
        k: 16,
        max_iters: 10,
        ..Default::default()
    };
    let a = PatchCodebook::train(&imgs, &cfg, &Device::Cpu).unwrap();
    let b = PatchCodebook::train(&imgs, &cfg, &Device::Cpu).unwrap();
    assert_eq!(a.codebook_size(), 16);
    assert!(count_distinct_patches(&imgs, 4).unwrap() > 16);
    assert_eq!(a.centroids(), b.centroids());
    let c = PatchCodebook::train(
        &imgs,
        &PatchCodebookConfig {
            seed: 7,
            ..cfg.clone()
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_ne!(a.centroids(), c.centroids());
    // Lossy now, but every code is used by some patch (no dead clusters) and decode is the centroid.
    let codes = a.encode_batch(&imgs).unwrap();
    let used: std::collections::HashSet<u32> = codes.iter().flatten().copied().collect();
    assert_eq!(used.len(), 16);
    let back = a.decode(&codes).unwrap();
    let centroid0 = &a.centroids()[codes[0][0] as usize * 48..][..12];
    let row0: Vec<u8> = back[0].as_raw()[..12].to_vec();
    assert_eq!(
        row0,
        centroid0
            .iter()
            .map(|v| v.round() as u8)
            .collect::<Vec<_>>()
    );
}

#[test]
fn kmeans_lowers_distortion_versus_its_start() {
    // More Lloyd steps cannot make the fit worse than one step from the same seeded start.
    let imgs = noise_images(3, 5);
    let err = |iters| {
        let cfg = PatchCodebookConfig {
            k: 12,
            max_iters: iters,
            ..Default::default()
        };
        let cb = PatchCodebook::train(&imgs, &cfg, &Device::Cpu).unwrap();
        let back = cb.decode(&cb.encode_batch(&imgs).unwrap()).unwrap();
        imgs.iter()
            .zip(&back)
            .flat_map(|(a, b)| {
                a.as_raw()
                    .iter()
                    .zip(b.as_raw())
                    .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            })
            .sum::<f64>()
    };
    let (one, many) = (err(1), err(25));
    assert!(
        many < one,
        "distortion after 25 steps {many} is not below 1 step {one}"
    );
}

#[test]
fn save_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let imgs = toy_images(12, 4);
    let cb = PatchCodebook::train(&imgs, &PatchCodebookConfig::default(), &Device::Cpu).unwrap();
    cb.save(&path).unwrap();
    let back = PatchCodebook::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.centroids(), cb.centroids());
    assert_eq!(back.patch_size(), 4);
    assert_eq!(
        back.encode_batch(&imgs).unwrap(),
        cb.encode_batch(&imgs).unwrap()
    );
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let e = PatchCodebook::load(&missing, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.safetensors"), "{e}");

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"definitely not safetensors").unwrap();
    let e = PatchCodebook::load(&garbage, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("garbage.safetensors") && e.contains("not a safetensors file"),
        "{e}"
    );

    // A valid safetensors file that is not a codebook (no format metadata).
    let other = dir.path().join("other.safetensors");
    let t = candle_core::Tensor::zeros((2, 48), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("centroids".to_string(), t)]),
        &other,
    )
    .unwrap();
    let e = PatchCodebook::load(&other, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("other.safetensors") && e.contains("format"),
        "{e}"
    );
}

#[test]
fn bad_inputs_are_errors() {
    let cb = PatchCodebook::train(
        &toy_images(3, 6),
        &PatchCodebookConfig::default(),
        &Device::Cpu,
    )
    .unwrap();
    let e = cb.encode(&RgbImage::new(16, 16)).unwrap_err().to_string();
    assert!(e.contains("16x16"), "{e}");
    let k = cb.codebook_size() as u32;
    let e = cb.decode(&[vec![k; 64]]).unwrap_err().to_string();
    assert!(e.contains("out of range"), "{e}");
    assert!(PatchCodebook::train(&[], &PatchCodebookConfig::default(), &Device::Cpu).is_err());
    let mixed = vec![RgbImage::new(32, 32), RgbImage::new(36, 36)];
    assert!(PatchCodebook::train(&mixed, &PatchCodebookConfig::default(), &Device::Cpu).is_err());
}
