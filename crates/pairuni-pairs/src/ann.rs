//! Optional approximate candidate search: an HNSW index (hnsw_rs) over the understanding features.
//!
//! It only replaces [`crate::retrieval::exact_candidates`]; the greedy one-use matching stays the same, so the
//! approximate path differs from the exact one only where the index misses a true neighbour. Its recall is
//! measured against exact search by `pairuni bench retrieval` and by a test.

use crate::error::{PairsError, Result};
use crate::retrieval::Candidates;
use hnsw_rs::prelude::{Distance, Hnsw};
use rayon::prelude::*;

/// HNSW settings (see `config::AnnConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnnParams {
    /// Links per node (M), at most 255.
    pub max_connections: usize,
    /// Candidate-list width while building.
    pub ef_construction: usize,
    /// Candidate-list width while searching.
    pub ef_search: usize,
}

/// 1 − cosine for unit rows, with eight independent accumulators so the compiler vectorises it (hnsw_rs's own
/// `DistDot` folds sequentially, several times slower at 2,048 dimensions).
#[derive(Debug, Default, Clone, Copy)]
pub struct FastDot;

impl Distance<f32> for FastDot {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        (1.0 - fast_dot(va, vb)).max(0.0)
    }
}

/// Dot product: AVX2+FMA when the CPU has it (checked once at run time), else eight lanes of partial sums.
pub fn fast_dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS_AVX2_FMA: OnceLock<bool> = OnceLock::new();
        if *HAS_AVX2_FMA
            .get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
        {
            // SAFETY: the features the function is compiled for were detected on this CPU just above.
            return unsafe { dot_avx2_fma(a, b) };
        }
    }
    portable_dot(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 ≤ n, so both 8-float loads at i and i + 8 are in bounds of both slices.
        unsafe {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                s1,
            );
        }
        i += 16;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds exactly 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(s0, s1)) };
    lanes.iter().sum::<f32>() + portable_dot(&a[i..n], &b[i..n])
}

/// Dot product with eight lanes of partial sums (the compiler vectorises it).
fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// An HNSW index over the rows of a feature matrix.
pub struct AnnIndex<'a> {
    hnsw: Hnsw<'a, f32, FastDot>,
    ef_search: usize,
}

impl<'a> AnnIndex<'a> {
    /// Builds the index over `db` (n × dim, unit rows), inserting in parallel.
    pub fn build(db: &'a [f32], dim: usize, params: &AnnParams) -> Result<Self> {
        if params.max_connections == 0 || params.max_connections > 255 {
            // hnsw_rs exits the process above 256, so refuse here with a clear message.
            return Err(PairsError::Config(format!(
                "ann.max_connections must be in 1..=255, got {}",
                params.max_connections
            )));
        }
        if dim == 0 {
            return Err(PairsError::Config("ann: feature dimension is 0".into()));
        }
        let n = db.len() / dim;
        let layers = 16usize.min(
            ((n.max(2) as f64).ln() / (params.max_connections as f64).ln()).ceil() as usize + 2,
        );
        let hnsw = Hnsw::new(
            params.max_connections,
            n.max(1),
            layers.max(1),
            params.ef_construction,
            FastDot,
        );
        let rows: Vec<(&[f32], usize)> = db.chunks(dim).enumerate().map(|(i, r)| (r, i)).collect();
        hnsw.parallel_insert_slice(&rows);
        Ok(Self {
            hnsw,
            ef_search: params.ef_search,
        })
    }

    /// Up to `cap` approximate nearest rows of each query with cosine ≥ `delta`, best first.
    pub fn candidates(
        &self,
        queries: &[f32],
        dim: usize,
        cap: usize,
        delta: f32,
    ) -> Vec<Candidates> {
        queries
            .par_chunks(dim)
            .map(|q| {
                let mut found: Candidates = self
                    .hnsw
                    .search(q, cap, self.ef_search.max(cap))
                    .into_iter()
                    .map(|nb| (nb.d_id, 1.0 - nb.distance))
                    .filter(|&(_, s)| s >= delta)
                    .collect();
                found.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                found.truncate(cap);
                found
            })
            .collect()
    }
}

/// Fraction of queries whose approximate best row equals the exact best row (recall@1); queries with no exact
/// candidate are skipped.
pub fn recall_at_1(exact: &[Candidates], approx: &[Candidates]) -> f64 {
    let mut total = 0usize;
    let mut hit = 0usize;
    for (e, a) in exact.iter().zip(approx) {
        if let Some(&(j, _)) = e.first() {
            total += 1;
            if a.first().map(|&(k, _)| k) == Some(j) {
                hit += 1;
            }
        }
    }
    if total == 0 {
        1.0
    } else {
        hit as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::l2_normalize_rows;
    use crate::retrieval::exact_candidates;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn fast_dot_matches_plain_dot() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.05).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((fast_dot(&a, &b) - want).abs() < 1e-3);
        assert!((portable_dot(&a, &b) - want).abs() < 1e-3);
        let long: Vec<f32> = (0..2048).map(|i| (i % 13) as f32 * 0.01).collect();
        let want: f32 = long.iter().map(|x| x * x).sum();
        assert!((fast_dot(&long, &long) - want).abs() / want < 1e-5);
    }

    #[test]
    fn hnsw_recall_is_high_on_near_duplicate_queries() {
        let (n, dim) = (2000, 32);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut db: Vec<f32> = (0..n * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        l2_normalize_rows(&mut db, dim);
        let mut q: Vec<f32> = (0..500)
            .flat_map(|i| {
                db[i * dim..(i + 1) * dim]
                    .iter()
                    .map(|v| v + 0.1 * rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            })
            .collect();
        l2_normalize_rows(&mut q, dim);
        let p = AnnParams {
            max_connections: 16,
            ef_construction: 100,
            ef_search: 64,
        };
        let index = AnnIndex::build(&db, dim, &p).unwrap();
        let approx = index.candidates(&q, dim, 4, -1.0);
        let exact = exact_candidates(&q, &db, dim, 4, -1.0);
        let r = recall_at_1(&exact, &approx);
        assert!(r >= 0.95, "recall@1 {r}");
    }

    #[test]
    fn rejects_too_many_connections() {
        let db = vec![1.0, 0.0];
        let p = AnnParams {
            max_connections: 300,
            ef_construction: 10,
            ef_search: 10,
        };
        assert!(matches!(
            AnnIndex::build(&db, 2, &p),
            Err(PairsError::Config(_))
        ));
    }
}
