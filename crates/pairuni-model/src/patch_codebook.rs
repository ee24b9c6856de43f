//! The toy world's image tokenizer: k-means over small RGB patches; a code is a patch, decoding is a lookup.
//!
//! A `S×S` image is cut into `(S/p)²` non-overlapping `p×p` patches (p = 4: a 32×32 image is 64 codes). The
//! codebook is learned from world images with seeded, count-weighted k-means (k-means++ start, Lloyd steps).
//! Toy renders have few distinct patches (flat colour and edges); when there are at most K of them, the
//! codebook is exactly that set and encode → decode reproduces the images bit for bit, so rewards measure the
//! model and not a lossy decoder. A centroid vector stores its patch row-major, RGB interleaved, as f32 in
//! 0..=255. Saved as `patch_codebook.safetensors` (tensor `centroids` `[K, p·p·3]` + metadata).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use pairuni_data::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::image_tokenizer::{
    check_codes, check_image_size, u8_to_model, ImageTokenizer, ImageTokenizerError, Result,
};

/// File name of a saved codebook inside a checkpoint folder.
pub const FILE_NAME: &str = "patch_codebook.safetensors";
/// The `format` metadata value that identifies a codebook file.
const FORMAT: &str = "pairuni-patch-codebook-v1";

/// How to learn a codebook.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchCodebookConfig {
    /// Maximum number of codes (default 512); fewer when the images have fewer distinct patches.
    pub k: usize,
    /// Patch side in pixels (default 4).
    pub patch_size: usize,
    /// Upper bound on Lloyd iterations (default 30); stops earlier once assignments settle.
    pub max_iters: usize,
    /// Seed of the k-means++ start (default 0).
    pub seed: u64,
}

impl Default for PatchCodebookConfig {
    fn default() -> Self {
        Self {
            k: 512,
            patch_size: 4,
            max_iters: 30,
            seed: 0,
        }
    }
}

/// A learned patch codebook (see the module docs).
#[derive(Debug, Clone)]
pub struct PatchCodebook {
    patch: usize,
    image_size: usize,
    /// `[K * dim]` row-major, values in 0..=255.
    centroids: Vec<f32>,
    /// The centroids rounded to u8, what decoding draws.
    rounded: Vec<u8>,
    /// `[K, dim]` f32 model-space table for batched tensor decoding.
    table: Tensor,
    device: Device,
}

impl PatchCodebook {
    /// Learns a codebook from `images` (all square, same size, a multiple of the patch size).
    pub fn train(images: &[RgbImage], cfg: &PatchCodebookConfig, device: &Device) -> Result<Self> {
        let first = images
            .first()
            .ok_or_else(|| invalid("cannot learn a patch codebook from zero images"))?;
        let size = first.width() as usize;
        let p = cfg.patch_size;
        if cfg.k == 0 || p == 0 {
            return Err(invalid("k and patch_size must be positive"));
        }
        if first.height() as usize != size || !size.is_multiple_of(p) {
            return Err(invalid(&format!(
                "images must be square with a side divisible by the patch size {p}; got {}x{}",
                first.width(),
                first.height()
            )));
        }
        let mut counts: HashMap<Vec<u8>, u64> = HashMap::new();
        for img in images {
            check_image_size(img, size)?;
            for patch in patches(img, p) {
                *counts.entry(patch).or_insert(0) += 1;
            }
        }
        // HashMap order is random; sort so that everything downstream depends only on the data and the seed.
        let mut distinct: Vec<(Vec<u8>, u64)> = counts.into_iter().collect();
        distinct.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let dim = p * p * 3;
        let centroids: Vec<f32> = if distinct.len() <= cfg.k {
            distinct
                .iter()
                .flat_map(|(v, _)| v.iter().map(|&x| x as f32))
                .collect()
        } else {
            let points: Vec<f32> = distinct
                .iter()
                .flat_map(|(v, _)| v.iter().map(|&x| x as f32))
                .collect();
            let weights: Vec<f64> = distinct.iter().map(|(_, c)| *c as f64).collect();
            kmeans(&points, &weights, dim, cfg.k, cfg.max_iters, cfg.seed)
        };
        Self::from_centroids(centroids, p, size, device)
    }

    /// Builds a codebook from centroid rows (`[K * p·p·3]`, values in 0..=255).
    pub fn from_centroids(
        centroids: Vec<f32>,
        patch: usize,
        image_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let dim = patch * patch * 3;
        if patch == 0 || image_size == 0 || !image_size.is_multiple_of(patch) {
            return Err(invalid(&format!(
                "image size {image_size} is not a positive multiple of patch size {patch}"
            )));
        }
        if centroids.is_empty() || !centroids.len().is_multiple_of(dim) {
            return Err(invalid(&format!(
                "{} centroid values is not a positive multiple of {dim}",
                centroids.len()
            )));
        }
        if let Some(i) = centroids
            .iter()
            .position(|v| !v.is_finite() || !(0.0..=255.0).contains(v))
        {
            return Err(invalid(&format!(
                "centroid value {} at index {i} is outside 0..=255",
                centroids[i]
            )));
        }
        let rounded: Vec<u8> = centroids.iter().map(|v| v.round() as u8).collect();
        let k = centroids.len() / dim;
        let model: Vec<f32> = rounded.iter().map(|&v| u8_to_model(v)).collect();
        let table = Tensor::from_vec(model, (k, dim), device)?;
        Ok(Self {
            patch,
            image_size,
            centroids,
            rounded,
            table,
            device: device.clone(),
        })
    }

    /// Patch side in pixels.
    pub fn patch_size(&self) -> usize {
        self.patch
    }

    /// Centroid rows `[K * p·p·3]` (row-major patch, RGB interleaved, 0..=255).
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    fn dim(&self) -> usize {
        self.patch * self.patch * 3
    }

    /// Index of the centroid nearest to `patch` (squared L2; ties → lowest index).
    fn nearest(&self, patch: &[u8]) -> u32 {
        let dim = self.dim();
        let mut best = (f32::INFINITY, 0u32);
        for (i, c) in self.centroids.chunks_exact(dim).enumerate() {
            let mut d = 0f32;
            for (&a, &b) in patch.iter().zip(c) {
                let t = a as f32 - b;
                d += t * t;
            }
            if d < best.0 {
                best = (d, i as u32);
                if d == 0.0 {
                    break;
                }
            }
        }
        best.1
    }

    /// Writes the codebook to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes: Vec<u8> = self
            .centroids
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let view = TensorView::new(Dtype::F32, vec![self.codebook_size(), self.dim()], &bytes)
            .map_err(|e| file_err(path, &e.to_string()))?;
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("patch_size".to_string(), self.patch.to_string()),
            ("image_size".to_string(), self.image_size.to_string()),
        ]);
        let data = safetensors::tensor::serialize([("centroids", view)], Some(meta))
            .map_err(|e| file_err(path, &e.to_string()))?;
        pairuni_data::write_atomic_bytes(path, &data).map_err(|e| file_err(path, &e.to_string()))
    }

    /// Reads a codebook written by [`Self::save`]; every problem is reported with the file name.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes =
            std::fs::read(path).map_err(|e| file_err(path, &format!("cannot read: {e}")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| file_err(path, &format!("not a safetensors file: {e}")))?;
        let (_, meta) =
            SafeTensors::read_metadata(&bytes).map_err(|e| file_err(path, &e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(file_err(
                path,
                &format!("metadata field `format` is not {FORMAT:?}"),
            ));
        }
        let num = |key: &str| -> Result<usize> {
            meta.get(key).and_then(|v| v.parse().ok()).ok_or_else(|| {
                file_err(
                    path,
                    &format!("metadata field `{key}` is missing or not a number"),
                )
            })
        };
        let (patch, image_size) = (num("patch_size")?, num("image_size")?);
        let t = st
            .tensor("centroids")
            .map_err(|_| file_err(path, "tensor `centroids` is missing"))?;
        let dim = patch * patch * 3;
        if t.dtype() != Dtype::F32 || t.shape().len() != 2 || t.shape()[1] != dim {
            return Err(file_err(
                path,
                &format!(
                    "tensor `centroids` must be F32 [K, {dim}], found {:?} {:?}",
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        let centroids: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Self::from_centroids(centroids, patch, image_size, device)
            .map_err(|e| file_err(path, &e.to_string()))
    }
}

impl ImageTokenizer for PatchCodebook {
    fn encode_batch(&self, imgs: &[RgbImage]) -> Result<Vec<Vec<u32>>> {
        imgs.iter()
            .map(|img| {
                check_image_size(img, self.image_size)?;
                Ok(patches(img, self.patch)
                    .iter()
                    .map(|p| self.nearest(p))
                    .collect())
            })
            .collect()
    }

    fn decode(&self, codes: &[Vec<u32>]) -> Result<Vec<RgbImage>> {
        check_codes(codes, self.tokens_per_image(), self.codebook_size())?;
        let (g, p, s, dim) = (
            self.image_size / self.patch,
            self.patch,
            self.image_size,
            self.dim(),
        );
        Ok(codes
            .iter()
            .map(|c| {
                let mut img = RgbImage::new(s as u32, s as u32);
                let raw: &mut [u8] = &mut img;
                for (n, &code) in c.iter().enumerate() {
                    let src = &self.rounded[code as usize * dim..][..dim];
                    let (gy, gx) = (n / g, n % g);
                    for dy in 0..p {
                        let dst = ((gy * p + dy) * s + gx * p) * 3;
                        raw[dst..dst + p * 3].copy_from_slice(&src[dy * p * 3..(dy + 1) * p * 3]);
                    }
                }
                img
            })
            .collect())
    }

    fn decode_tensor(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, n) = codes.dims2()?;
        let g = self.image_size / self.patch;
        if n != g * g {
            return Err(invalid(&format!(
                "expected {} codes per image, got {n}",
                g * g
            )));
        }
        let idx = codes
            .to_device(&self.device)?
            .to_dtype(DType::U32)?
            .flatten_all()?;
        if b > 0 {
            let max = idx.max(0)?.to_scalar::<u32>()?;
            if max as usize >= self.codebook_size() {
                return Err(invalid(&format!(
                    "code {max} is out of range (codebook size {})",
                    self.codebook_size()
                )));
            }
        }
        let p = self.patch;
        // [B, gy, gx, dy, dx, c] → [B, c, gy, dy, gx, dx] → [B, 3, S, S]
        let t = self
            .table
            .index_select(&idx, 0)?
            .reshape(vec![b, g, g, p, p, 3])?;
        let t = t.permute(vec![0, 5, 1, 3, 2, 4])?.contiguous()?;
        Ok(t.reshape((b, 3, self.image_size, self.image_size))?)
    }

    fn codebook_size(&self) -> usize {
        self.centroids.len() / self.dim()
    }

    fn grid(&self) -> (usize, usize) {
        let g = self.image_size / self.patch;
        (g, g)
    }

    fn image_size(&self) -> usize {
        self.image_size
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// Number of distinct `p×p` patches in `images` (square, side divisible by `p`): when it is at most K, a codebook
/// learned from them reconstructs them exactly; callers log it to see how lossy a smaller K would be.
pub fn count_distinct_patches(images: &[RgbImage], p: usize) -> Result<usize> {
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    for img in images {
        let s = img.width() as usize;
        if p == 0 || img.height() as usize != s || !s.is_multiple_of(p) {
            return Err(invalid(&format!(
                "image {}x{} is not square with a side divisible by {p}",
                img.width(),
                img.height()
            )));
        }
        seen.extend(patches(img, p));
    }
    Ok(seen.len())
}

fn invalid(msg: &str) -> ImageTokenizerError {
    ImageTokenizerError::Invalid(msg.to_string())
}

fn file_err(path: &Path, msg: &str) -> ImageTokenizerError {
    ImageTokenizerError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// The image's `p×p` patches in row-major grid order, each row-major with RGB interleaved.
fn patches(img: &RgbImage, p: usize) -> Vec<Vec<u8>> {
    let s = img.width() as usize;
    let raw: &[u8] = img.as_raw();
    let g = s / p;
    let mut out = Vec::with_capacity(g * g);
    for gy in 0..g {
        for gx in 0..g {
            let mut v = Vec::with_capacity(p * p * 3);
            for dy in 0..p {
                let start = ((gy * p + dy) * s + gx * p) * 3;
                v.extend_from_slice(&raw[start..start + p * 3]);
            }
            out.push(v);
        }
    }
    out
}

fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Index and squared distance of the nearest of `k` centroids.
fn nearest_of(point: &[f32], centroids: &[f32], dim: usize) -> (usize, f32) {
    let mut best = (0, f32::INFINITY);
    for (i, c) in centroids.chunks_exact(dim).enumerate() {
        let d = sq_dist(point, c);
        if d < best.1 {
            best = (i, d);
        }
    }
    best
}

/// Count-weighted k-means over distinct points (`n > k`): seeded k-means++ start, then Lloyd steps.
fn kmeans(
    points: &[f32],
    weights: &[f64],
    dim: usize,
    k: usize,
    max_iters: usize,
    seed: u64,
) -> Vec<f32> {
    let n = weights.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pick = |rng: &mut ChaCha8Rng, w: &[f64]| -> usize {
        let total: f64 = w.iter().sum();
        let mut r = rng.random::<f64>() * total;
        for (i, &x) in w.iter().enumerate() {
            if r < x {
                return i;
            }
            r -= x;
        }
        // Float round-off at the end of the scan: take the last point with weight.
        w.iter().rposition(|&x| x > 0.0).unwrap_or(0)
    };
    let mut chosen = HashSet::new();
    let first = pick(&mut rng, weights);
    chosen.insert(first);
    let mut centroids: Vec<f32> = points[first * dim..][..dim].to_vec();
    let mut d2: Vec<f64> = (0..n)
        .map(|i| sq_dist(&points[i * dim..][..dim], &centroids) as f64)
        .collect();
    while centroids.len() / dim < k {
        let w: Vec<f64> = (0..n)
            .map(|i| {
                if chosen.contains(&i) {
                    0.0
                } else {
                    weights[i] * d2[i]
                }
            })
            .collect();
        // All remaining points coincide with a centroid (cannot happen for distinct points, kept for safety).
        let next = if w.iter().any(|&x| x > 0.0) {
            pick(&mut rng, &w)
        } else {
            (0..n).find(|i| !chosen.contains(i)).unwrap_or(0)
        };
        chosen.insert(next);
        let c = points[next * dim..][..dim].to_vec();
        for i in 0..n {
            d2[i] = d2[i].min(sq_dist(&points[i * dim..][..dim], &c) as f64);
        }
        centroids.extend(c);
    }
    let mut assign = vec![usize::MAX; n];
    for _ in 0..max_iters {
        let mut changed = false;
        let mut dist = vec![0f32; n];
        for i in 0..n {
            let (a, d) = nearest_of(&points[i * dim..][..dim], &centroids, dim);
            dist[i] = d;
            if assign[i] != a {
                assign[i] = a;
                changed = true;
            }
        }
        if !changed {
            break;
        }
        let mut sums = vec![0f64; k * dim];
        let mut mass = vec![0f64; k];
        for i in 0..n {
            let a = assign[i];
            mass[a] += weights[i];
            for (s, &x) in sums[a * dim..][..dim]
                .iter_mut()
                .zip(&points[i * dim..][..dim])
            {
                *s += weights[i] * x as f64;
            }
        }
        for c in 0..k {
            if mass[c] > 0.0 {
                for (dst, s) in centroids[c * dim..][..dim]
                    .iter_mut()
                    .zip(&sums[c * dim..][..dim])
                {
                    *dst = (*s / mass[c]) as f32;
                }
            } else {
                // Empty cluster: move it onto the worst-served point (and stop that point being picked twice).
                let far = (0..n)
                    .max_by(|&a, &b| {
                        (weights[a] * dist[a] as f64).total_cmp(&(weights[b] * dist[b] as f64))
                    })
                    .unwrap_or(0);
                centroids[c * dim..][..dim].copy_from_slice(&points[far * dim..][..dim]);
                dist[far] = 0.0;
            }
        }
    }
    centroids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmeans_separates_two_obvious_clusters() {
        // 1-D points {0, 1, 100, 101}: two centroids land at 0.5 and 100.5 whatever the seed.
        let points = [0.0, 1.0, 100.0, 101.0];
        let weights = [1.0; 4];
        for seed in 0..5 {
            let mut c = kmeans(&points, &weights, 1, 2, 20, seed);
            c.sort_by(f32::total_cmp);
            assert_eq!(c, vec![0.5, 100.5], "seed {seed}");
        }
    }
}
