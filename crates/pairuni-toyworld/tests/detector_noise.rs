//! Detector precision: patch-mosaic noise (what an untrained patch-codebook model draws) must yield almost no
//! confident detections, while near-clean renders (salt noise) are still read.

use std::collections::BTreeSet;

use pairuni_toyworld::{detect, render, scene_from_detections, Colour, RgbImage, Scene};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const PATCH: u32 = 4;

/// Every distinct aligned 4×4 patch of `n` seeded random renders at `size` px: the untrained model's
/// codebook stand-in (its k-means codebook is built from exactly such patches).
fn patch_set(n: usize, size: u32, seed: u64) -> Vec<Vec<[u8; 3]>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut set = BTreeSet::new();
    for _ in 0..n {
        let img = render(&Scene::random(&mut rng, 1, 4), size).unwrap();
        for py in 0..size / PATCH {
            for px in 0..size / PATCH {
                let patch: Vec<[u8; 3]> = (0..PATCH * PATCH)
                    .map(|i| {
                        img.get_pixel(px * PATCH + i % PATCH, py * PATCH + i / PATCH)
                            .0
                    })
                    .collect();
                set.insert(patch);
            }
        }
    }
    set.into_iter().collect()
}

/// A mosaic of patches drawn uniformly from `patches`: a random sample of the untrained model.
fn mosaic(patches: &[Vec<[u8; 3]>], size: u32, rng: &mut ChaCha8Rng) -> RgbImage {
    let mut img = RgbImage::new(size, size);
    for py in 0..size / PATCH {
        for px in 0..size / PATCH {
            let p = &patches[rng.random_range(0..patches.len())];
            for (i, rgb) in p.iter().enumerate() {
                let i = i as u32;
                img.put_pixel(
                    px * PATCH + i % PATCH,
                    py * PATCH + i / PATCH,
                    image::Rgb(*rgb),
                );
            }
        }
    }
    img
}

/// Confident (≥ 0.3, GenEval's threshold) and all detections per image over 200 mosaics.
fn noise_rates(size: u32) -> (f64, f64) {
    let patches = patch_set(300, size, 11);
    assert!(patches.len() > 50, "{} distinct patches", patches.len());
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (mut confident, mut all) = (0usize, 0usize);
    let n = 200;
    for _ in 0..n {
        let dets = detect(&mosaic(&patches, size, &mut rng));
        all += dets.len();
        confident += dets.iter().filter(|d| d.confidence >= 0.3).count();
    }
    (confident as f64 / n as f64, all as f64 / n as f64)
}

#[test]
fn patch_mosaics_give_few_confident_detections() {
    for size in [32, 64] {
        let (confident, all) = noise_rates(size);
        eprintln!(
            "{size}px mosaics: {confident:.3} confident (>= 0.3) of {all:.2} detections per image"
        );
        // Measured 0.005 at 32 px and 0 at 64 px (20.1 of 21.1 at 32 px before the precision fix). A false
        // confident object in one noise image of twenty passes a single-object prompt (1 shape in 3) in
        // under 2 % of images and a colour prompt (1 kind in 18) in under 0.3 %, so GenEval on noise stays
        // near zero; anything leakier fails.
        assert!(
            confident <= 0.05,
            "{size}px: {confident} confident detections per image"
        );
    }
}

/// Flips `fraction` of the pixels to a random palette colour, the background or a random RGB value.
fn salt(img: &mut RgbImage, fraction: f64, rng: &mut ChaCha8Rng) {
    let (w, h) = img.dimensions();
    let n = ((w * h) as f64 * fraction).round() as usize;
    for _ in 0..n {
        let (x, y) = (rng.random_range(0..w), rng.random_range(0..h));
        let rgb = match rng.random_range(0..3) {
            0 => Colour::ALL[rng.random_range(0..Colour::ALL.len())].rgb(),
            1 => pairuni_toyworld::scene::BACKGROUND,
            _ => [rng.random(), rng.random(), rng.random()],
        };
        img.put_pixel(x, y, image::Rgb(rgb));
    }
}

#[test]
fn salt_noise_on_two_percent_of_pixels_is_tolerated() {
    for size in [32, 64] {
        let mut rng = ChaCha8Rng::seed_from_u64(13 + u64::from(size));
        let (mut exact, mut min_conf, mut n_obj, mut conf_sum) = (0usize, 1.0f32, 0usize, 0.0f32);
        let trials = 500;
        for _ in 0..trials {
            let scene = Scene::random(&mut rng, 1, 4);
            let mut img = render(&scene, size).unwrap();
            salt(&mut img, 0.02, &mut rng);
            let dets: Vec<_> = detect(&img)
                .into_iter()
                .filter(|d| d.confidence >= 0.3)
                .collect();
            exact += usize::from(
                dets.len() == scene.len() && scene_from_detections(&dets, size, size) == scene,
            );
            for d in &dets {
                min_conf = min_conf.min(d.confidence);
                conf_sum += d.confidence;
                n_obj += 1;
            }
        }
        let rate = exact as f64 / trials as f64;
        eprintln!(
            "{size}px salt 2%: exact {rate:.3}, mean confidence {:.3}, min {min_conf:.3}",
            conf_sum / n_obj.max(1) as f32
        );
        assert!(
            rate >= 0.98,
            "{size}px: read exactly in {rate} of salted renders"
        );
    }
}
