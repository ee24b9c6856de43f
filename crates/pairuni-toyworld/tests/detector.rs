//! Detector exactness over many seeded random scenes (issue 3 "done when").

use pairuni_toyworld::{detect, render, scene_from_detections, Scene};
use rand::SeedableRng;

fn exact_over(size: u32, n: usize, seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in 0..n {
        let scene = Scene::random(&mut rng, 1, 4);
        let img = render(&scene, size).unwrap();
        let dets = detect(&img);
        assert_eq!(
            dets.len(),
            scene.len(),
            "scene {i} at {size}px: {}",
            scene.key()
        );
        let read = scene_from_detections(&dets, size, size);
        assert_eq!(read, scene, "scene {i} at {size}px");
        assert!(
            dets.iter().all(|d| d.confidence == 1.0),
            "scene {i} at {size}px: {dets:?}"
        );
    }
}

#[test]
fn exact_on_10000_scenes_at_32px() {
    exact_over(32, 10_000, 32);
}

#[test]
fn exact_on_10000_scenes_at_64px() {
    exact_over(64, 10_000, 64);
}

#[test]
fn exact_on_full_grids_at_odd_sizes() {
    for size in [33, 40, 47, 96] {
        exact_over(size, 300, u64::from(size));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for _ in 0..300 {
        let scene = Scene::random(&mut rng, 9, 9);
        for size in [32, 64] {
            let img = render(&scene, size).unwrap();
            assert_eq!(scene_from_detections(&detect(&img), size, size), scene);
        }
    }
}
