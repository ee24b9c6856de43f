//! Seeded mini-batch K-means (Sculley 2010) and the per-cluster medoid selection of METHOD.md §2 step 3.
//!
//! Hand-written rather than linfa-clustering: at the paper's scale (≈10^5 points, K ≈ 4,800, 2,048-d
//! features) the cost is the point-to-centre distances, which we compute as one GEMM per block
//! (‖x‖² − 2x·c + ‖c‖²) with the same kernels as retrieval; linfa computes them point by point over ndarray
//! and would add the ndarray stack just for this step.

use crate::linalg::{dot, matmul_abt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Settings of one K-means run.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansParams {
    /// Number of clusters.
    pub k: usize,
    /// Points per mini-batch.
    pub batch_size: usize,
    /// Mini-batch iterations.
    pub iterations: usize,
    /// Points sampled for the k-means++ initialisation.
    pub init_sample: usize,
    /// Seed of every random choice.
    pub seed: u64,
}

/// The outcome of a K-means run.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansResult {
    /// Row-major centroids, k × dim.
    pub centroids: Vec<f32>,
    /// Feature dimension.
    pub dim: usize,
    /// Cluster of each point.
    pub assignment: Vec<usize>,
    /// Per cluster, the member with the largest inner product with the centroid (None for an empty cluster).
    pub medoids: Vec<Option<usize>>,
}

/// Rows processed per GEMM block when assigning points (bounds the score buffer to block × k floats).
const BLOCK: usize = 2048;

/// Runs seeded mini-batch K-means over `data` (row-major, n × dim) and picks each cluster's medoid.
///
/// Deterministic for a given seed and thread count independent input. `k` is clamped to the number of points.
pub fn kmeans(data: &[f32], dim: usize, params: &KMeansParams) -> KMeansResult {
    let n = data.len().checked_div(dim).unwrap_or(0);
    let k = params.k.min(n);
    if k == 0 {
        return KMeansResult {
            centroids: vec![],
            dim,
            assignment: vec![0; n],
            medoids: vec![],
        };
    }
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let mut centroids = init_plus_plus(data, n, dim, k, params.init_sample.max(k), &mut rng);
    let mut counts = vec![0u64; k];
    let batch = params.batch_size.max(1).min(n);
    let mut idx = vec![0usize; batch];
    let mut xb = vec![0f32; batch * dim];
    for _ in 0..params.iterations {
        for (slot, row) in idx.iter_mut().zip(xb.chunks_mut(dim)) {
            *slot = rng.random_range(0..n);
            row.copy_from_slice(&data[*slot * dim..(*slot + 1) * dim]);
        }
        let (near, _) = nearest(&xb, batch, &centroids, k, dim);
        // Sculley's per-centre learning rate 1/count makes each centre the running mean of its batch members.
        for (row, &c) in xb.chunks(dim).zip(&near) {
            counts[c] += 1;
            let lr = 1.0 / counts[c] as f32;
            let centre = &mut centroids[c * dim..(c + 1) * dim];
            for (cv, xv) in centre.iter_mut().zip(row) {
                *cv += lr * (xv - *cv);
            }
        }
    }
    let (assignment, _) = nearest(data, n, &centroids, k, dim);
    let medoids = medoids(data, dim, &centroids, k, &assignment);
    KMeansResult {
        centroids,
        dim,
        assignment,
        medoids,
    }
}

/// k-means++ seeding (D² sampling) on a seeded subsample of at most `sample` points.
fn init_plus_plus(
    data: &[f32],
    n: usize,
    dim: usize,
    k: usize,
    sample: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let pool: Vec<usize> = if n <= sample {
        (0..n).collect()
    } else {
        rand::seq::index::sample(rng, n, sample).into_vec()
    };
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let mut centroids = Vec::with_capacity(k * dim);
    let first = pool[rng.random_range(0..pool.len())];
    centroids.extend_from_slice(row(first));
    let mut d2: Vec<f32> = pool.iter().map(|&i| sq_dist(row(i), row(first))).collect();
    for _ in 1..k {
        let total: f64 = d2.iter().map(|&v| v as f64).sum();
        let pick = if total <= 0.0 {
            // Fewer distinct points than clusters: any point will do; the cluster stays empty or duplicate.
            rng.random_range(0..pool.len())
        } else {
            let mut target = rng.random::<f64>() * total;
            let mut chosen = pool.len() - 1;
            for (j, &v) in d2.iter().enumerate() {
                target -= v as f64;
                if target < 0.0 {
                    chosen = j;
                    break;
                }
            }
            chosen
        };
        let c = row(pool[pick]).to_vec();
        for (j, &i) in pool.iter().enumerate() {
            let d = sq_dist(row(i), &c);
            if d < d2[j] {
                d2[j] = d;
            }
        }
        centroids.extend_from_slice(&c);
    }
    centroids
}

fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Nearest centroid of each row of `x` (m × dim) by squared Euclidean distance, with that distance minus ‖x‖².
/// Ties go to the lower centroid index.
pub fn nearest(
    x: &[f32],
    m: usize,
    centroids: &[f32],
    k: usize,
    dim: usize,
) -> (Vec<usize>, Vec<f32>) {
    let cnorm: Vec<f32> = centroids.chunks(dim).map(|c| dot(c, c)).collect();
    let mut best = vec![0usize; m];
    let mut best_d = vec![f32::INFINITY; m];
    let mut scores = vec![0f32; BLOCK.min(m) * k];
    for start in (0..m).step_by(BLOCK) {
        let rows = BLOCK.min(m - start);
        let buf = &mut scores[..rows * k];
        matmul_abt(
            &x[start * dim..(start + rows) * dim],
            rows,
            centroids,
            k,
            dim,
            buf,
        );
        for r in 0..rows {
            let line = &buf[r * k..(r + 1) * k];
            let (mut bi, mut bd) = (0usize, f32::INFINITY);
            for (c, &s) in line.iter().enumerate() {
                let d = cnorm[c] - 2.0 * s;
                if d < bd {
                    bd = d;
                    bi = c;
                }
            }
            best[start + r] = bi;
            best_d[start + r] = bd;
        }
    }
    (best, best_d)
}

/// Per cluster, the member with the largest inner product with its centroid (ties → lower index).
pub fn medoids(
    data: &[f32],
    dim: usize,
    centroids: &[f32],
    k: usize,
    assignment: &[usize],
) -> Vec<Option<usize>> {
    let mut best: Vec<Option<(usize, f32)>> = vec![None; k];
    for (i, &c) in assignment.iter().enumerate() {
        let s = dot(
            &data[i * dim..(i + 1) * dim],
            &centroids[c * dim..(c + 1) * dim],
        );
        match best[c] {
            Some((_, bs)) if bs >= s => {}
            _ => best[c] = Some((i, s)),
        }
    }
    best.into_iter().map(|b| b.map(|(i, _)| i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    fn blobs(centres: &[Vec<f32>], per: usize, sigma: f32, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let noise = Normal::new(0.0f32, sigma).unwrap();
        let mut out = Vec::new();
        for _ in 0..per {
            for c in centres {
                out.extend(c.iter().map(|v| v + noise.sample(&mut rng)));
            }
        }
        out
    }

    #[test]
    fn recovers_gaussian_blob_centres() {
        let dim = 6;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let centres: Vec<Vec<f32>> = (0..8)
            .map(|_| (0..dim).map(|_| rng.random_range(-10.0f32..10.0)).collect())
            .collect();
        let data = blobs(&centres, 300, 0.3, 11);
        let params = KMeansParams {
            k: 8,
            batch_size: 256,
            iterations: 200,
            init_sample: 10_000,
            seed: 3,
        };
        let res = kmeans(&data, dim, &params);
        for c in &centres {
            let best = res
                .centroids
                .chunks(dim)
                .map(|f| sq_dist(f, c).sqrt())
                .fold(f32::INFINITY, f32::min);
            assert!(
                best < 0.15,
                "centre {c:?} not recovered: nearest centroid at distance {best}"
            );
        }
        // Every blob lands in one cluster: points generated round-robin, so i and i+8 share a blob.
        for i in 0..data.len() / dim - 8 {
            assert_eq!(res.assignment[i], res.assignment[i + 8]);
        }
        for (c, m) in res.medoids.iter().enumerate() {
            let m = m.expect("no cluster is empty");
            assert_eq!(res.assignment[m], c);
        }
    }

    #[test]
    fn same_seed_same_result_and_seed_matters() {
        let dim = 3;
        let centres = vec![
            vec![0.0, 0.0, 0.0],
            vec![1.0, 1.0, 1.0],
            vec![-1.0, 2.0, 0.0],
        ];
        let data = blobs(&centres, 100, 0.8, 5);
        let p = KMeansParams {
            k: 5,
            batch_size: 32,
            iterations: 20,
            init_sample: 1000,
            seed: 1,
        };
        let a = kmeans(&data, dim, &p);
        let b = kmeans(&data, dim, &p);
        assert_eq!(a, b);
        let c = kmeans(&data, dim, &KMeansParams { seed: 2, ..p });
        assert_ne!(a.centroids, c.centroids);
    }

    #[test]
    fn medoid_is_member_with_largest_inner_product() {
        let data = vec![1.0, 0.0, 0.9, 0.1, 0.0, 1.0, 0.2, 0.8];
        let centroids = vec![1.0, 0.0, 0.0, 1.0];
        let assignment = vec![0, 0, 1, 1];
        assert_eq!(
            medoids(&data, 2, &centroids, 2, &assignment),
            vec![Some(0), Some(2)]
        );
        let assignment = vec![0, 0, 0, 0];
        assert_eq!(
            medoids(&data, 2, &centroids, 2, &assignment),
            vec![Some(0), None]
        );
    }

    #[test]
    fn k_larger_than_n_is_clamped() {
        let data = vec![0.0, 1.0, 2.0];
        let p = KMeansParams {
            k: 10,
            batch_size: 8,
            iterations: 3,
            init_sample: 8,
            seed: 0,
        };
        let r = kmeans(&data, 1, &p);
        assert_eq!(r.centroids.len(), 3);
        assert_eq!(r.medoids.iter().flatten().count(), 3);
    }
}
