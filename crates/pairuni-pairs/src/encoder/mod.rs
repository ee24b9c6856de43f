//! Image features for pairing (METHOD.md §2 step 2): the [`ImageEncoder`] trait, its implementations (the toy
//! descriptor, ResNet-50) and the on-disk feature cache that lets a resumed build skip encoding.

pub mod resnet;
pub mod toy;

use crate::error::{PairsError, Result};
use crate::linalg::l2_normalize_rows;
use image::RgbImage;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Maps images to L2-normalised f32 feature rows.
pub trait ImageEncoder: Send + Sync {
    /// Identifies the encoder and its weights; part of the feature-cache key.
    fn id(&self) -> String;
    /// Feature dimension.
    fn dim(&self) -> usize;
    /// Encodes a batch: `images.len() × dim` floats, row-major, each row of unit norm (or zero).
    fn encode_batch(&self, images: &[RgbImage]) -> Result<Vec<f32>>;
}

/// Loads an image file as RGB.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    image::open(path)
        .map(|i| i.to_rgb8())
        .map_err(|e| PairsError::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Encodes every image in `paths` in batches of `batch_size` (decoding in parallel); `on_batch(done)` after
/// each batch.
pub fn encode_paths(
    encoder: &dyn ImageEncoder,
    paths: &[PathBuf],
    batch_size: usize,
    on_batch: &dyn Fn(usize),
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(paths.len() * encoder.dim());
    for chunk in paths.chunks(batch_size.max(1)) {
        let images: Vec<RgbImage> = chunk
            .par_iter()
            .map(|p| load_rgb(p))
            .collect::<Result<_>>()?;
        let mut rows = encoder.encode_batch(&images)?;
        if rows.len() != images.len() * encoder.dim() {
            return Err(PairsError::Config(format!(
                "encoder {} returned {} floats for {} images of dim {}",
                encoder.id(),
                rows.len(),
                images.len(),
                encoder.dim()
            )));
        }
        // Normalise again: cheap, and makes every encoder's contract hold even if it forgets.
        l2_normalize_rows(&mut rows, encoder.dim());
        out.extend_from_slice(&rows);
        on_batch(chunk.len());
    }
    Ok(out)
}

/// The cache file for a pool file's features under `dir`: keyed by the pool file's content hash and the
/// encoder id, so an edited pool or another encoder never reuses stale features.
pub fn feature_cache_path(dir: &Path, pool_file: &Path, encoder_id: &str) -> Result<PathBuf> {
    let bytes = std::fs::read(pool_file).map_err(|e| PairsError::io(pool_file, e))?;
    let mut h = Sha256::new();
    h.update(&bytes);
    h.update([0]);
    h.update(encoder_id.as_bytes());
    let stem = pool_file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("pool");
    Ok(dir.join(format!(
        "{stem}-{}.safetensors",
        &hex::encode(h.finalize())[..24]
    )))
}

/// Writes a feature matrix as a safetensors file with one tensor `features` [n, dim] (atomically).
pub fn save_features(path: &Path, data: &[f32], dim: usize) -> Result<()> {
    let n = data.len().checked_div(dim).unwrap_or(0);
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![n, dim], &bytes).map_err(|e| {
        PairsError::FeatureCache {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    })?;
    let out = safetensors::serialize([("features", view)], None).map_err(|e| {
        PairsError::FeatureCache {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| PairsError::io(dir, e))?;
    }
    pairuni_data::atomic::write_atomic_bytes(path, &out)?;
    Ok(())
}

/// Reads a file written by [`save_features`]: (data, n, dim).
pub fn load_features(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    let bytes = std::fs::read(path).map_err(|e| PairsError::io(path, e))?;
    let err = |message: String| PairsError::FeatureCache {
        path: path.to_path_buf(),
        message,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
    let t = st.tensor("features").map_err(|e| err(e.to_string()))?;
    if t.dtype() != Dtype::F32 || t.shape().len() != 2 {
        return Err(err(format!(
            "tensor `features` must be F32 [n, dim], got {:?} {:?}",
            t.dtype(),
            t.shape()
        )));
    }
    let (n, dim) = (t.shape()[0], t.shape()[1]);
    let data: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((data, n, dim))
}

/// Features of a pool's images, from the cache when present (and of the right shape), else encoded and cached.
pub fn encode_pool_cached(
    encoder: &dyn ImageEncoder,
    pool_file: &Path,
    paths: &[PathBuf],
    cache_dir: &Path,
    batch_size: usize,
    on_batch: &dyn Fn(usize),
) -> Result<Vec<f32>> {
    let cache = feature_cache_path(cache_dir, pool_file, &encoder.id())?;
    if cache.exists() {
        match load_features(&cache) {
            Ok((data, n, dim)) if n == paths.len() && dim == encoder.dim() => {
                tracing::info!(path = %cache.display(), "features from cache");
                on_batch(n);
                return Ok(data);
            }
            Ok((_, n, dim)) => {
                tracing::warn!(path = %cache.display(), n, dim, "feature cache has the wrong shape; recomputing")
            }
            Err(e) => tracing::warn!(error = %e, "unreadable feature cache; recomputing"),
        }
    }
    let data = encode_paths(encoder, paths, batch_size, on_batch)?;
    save_features(&cache, &data, encoder.dim())?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Mean colour per channel: a trivial encoder that counts its calls.
    struct MeanColour(AtomicUsize);

    impl ImageEncoder for MeanColour {
        fn id(&self) -> String {
            "mean-colour".into()
        }
        fn dim(&self) -> usize {
            3
        }
        fn encode_batch(&self, images: &[RgbImage]) -> Result<Vec<f32>> {
            self.0.fetch_add(images.len(), Ordering::SeqCst);
            Ok(images
                .iter()
                .flat_map(|im| {
                    let n = (im.width() * im.height()) as f32;
                    let mut s = [0f32; 3];
                    for p in im.pixels() {
                        for c in 0..3 {
                            s[c] += p[c] as f32 / n;
                        }
                    }
                    s
                })
                .collect())
        }
    }

    #[test]
    fn features_are_cached_per_pool_file_and_encoder() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = vec![];
        for (i, c) in [[255u8, 0, 0], [0, 0, 255], [30, 40, 0]].iter().enumerate() {
            let p = dir.path().join(format!("{i}.png"));
            RgbImage::from_pixel(4, 4, image::Rgb(*c)).save(&p).unwrap();
            paths.push(p);
        }
        let pool = dir.path().join("pool.jsonl");
        std::fs::write(&pool, "{}\n").unwrap();
        let enc = MeanColour(AtomicUsize::new(0));
        let cache = dir.path().join("features");
        let a = encode_pool_cached(&enc, &pool, &paths, &cache, 2, &|_| {}).unwrap();
        assert_eq!(enc.0.load(Ordering::SeqCst), 3);
        assert_eq!(&a[..3], &[1.0, 0.0, 0.0]);
        assert!(
            (a[6] - 0.6).abs() < 1e-6 && (a[7] - 0.8).abs() < 1e-6,
            "rows are normalised"
        );
        let b = encode_pool_cached(&enc, &pool, &paths, &cache, 2, &|_| {}).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            enc.0.load(Ordering::SeqCst),
            3,
            "second call must come from the cache"
        );
        std::fs::write(&pool, "{} \n").unwrap();
        encode_pool_cached(&enc, &pool, &paths, &cache, 2, &|_| {}).unwrap();
        assert_eq!(
            enc.0.load(Ordering::SeqCst),
            6,
            "an edited pool file is re-encoded"
        );
    }

    #[test]
    fn unreadable_image_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.png");
        std::fs::write(&p, b"not a png").unwrap();
        let e = load_rgb(&p).unwrap_err().to_string();
        assert!(e.contains("bad.png"), "{e}");
    }
}
