//! An inverted-file (IVF) index whose heavy steps are GEMMs: spherical K-means lists over unit rows, each query
//! scanning only the rows of its `probes` nearest lists.
//!
//! Chosen over HNSW for the reduced rows because on 2 cores the blocked GEMM runs at ~200 GFLOP/s while graph
//! search and construction are pointer-chasing at a few GFLOP/s: in 256 dimensions HNSW over 5·10^4 rows took
//! longer (build + search) than exact search in 2,048 dimensions. Here training, list assignment and the coarse
//! query step are GEMMs, and the fine step reads contiguous list blocks.

use crate::ann::fast_dot;
use crate::error::{PairsError, Result};
use crate::linalg::matmul_abt;
use crate::retrieval::{push_top, search_in_order, Candidates};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Rows per GEMM block in assignment and the coarse step (bounds the score buffer to BLOCK × lists floats).
const BLOCK: usize = 4096;
/// Lloyd iterations of the list training; the lists only need to be compact, not converged.
const TRAIN_ITERATIONS: usize = 6;
/// Training rows per list: K-means runs on a seeded sample of at most this many rows per list.
const TRAIN_ROWS_PER_LIST: usize = 32;

/// The default number of lists for `n` rows: 4·√n, which balances the coarse GEMM (queries × lists) against the
/// fine scan (probes × n / lists rows per query) while keeping lists small enough to stay in cache.
pub fn default_lists(n: usize) -> usize {
    ((4.0 * (n as f64).sqrt()).round() as usize).clamp(1, n.max(1))
}

/// IVF settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IvfParams {
    /// Number of lists; `None` = [`default_lists`].
    pub lists: Option<usize>,
    /// Lists scanned per query.
    pub probes: usize,
    /// Seed of the training sample and the initial centroids.
    pub seed: u64,
}

/// The index: list centroids and the rows regrouped list by list.
#[derive(Debug, Clone)]
pub struct IvfIndex {
    dim: usize,
    lists: usize,
    probes: usize,
    /// lists × dim unit centroids.
    centroids: Vec<f32>,
    /// List l holds packed rows offsets[l]..offsets[l + 1].
    offsets: Vec<usize>,
    /// Original row of each packed row.
    ids: Vec<usize>,
    /// List of each original row.
    list_of: Vec<u32>,
    /// The rows in list order (n × dim), so a list is one contiguous block.
    packed: Vec<f32>,
}

/// Index of the best score in each row of `scores` (rows of length `k`); ties go to the lower index.
fn argmax_rows(scores: &[f32], k: usize, out: &mut [usize]) {
    out.par_iter_mut()
        .zip(scores.par_chunks(k))
        .for_each(|(o, line)| {
            let mut best = 0;
            for (c, &s) in line.iter().enumerate() {
                if s > line[best] {
                    best = c;
                }
            }
            *o = best;
        });
}

/// Nearest centroid (largest dot product) of every row, by blocked GEMM.
fn assign(rows: &[f32], dim: usize, centroids: &[f32], k: usize) -> Vec<usize> {
    let n = rows.len() / dim;
    let mut out = vec![0usize; n];
    let mut buf = vec![0f32; BLOCK.min(n) * k];
    for start in (0..n).step_by(BLOCK) {
        let m = BLOCK.min(n - start);
        let b = &mut buf[..m * k];
        matmul_abt(
            &rows[start * dim..(start + m) * dim],
            m,
            centroids,
            k,
            dim,
            b,
        );
        argmax_rows(b, k, &mut out[start..start + m]);
    }
    out
}

impl IvfIndex {
    /// Trains the lists on a seeded sample of `db` (n × dim, unit rows) and files every row into its list.
    pub fn build(db: &[f32], dim: usize, params: &IvfParams) -> Result<Self> {
        if dim == 0 {
            return Err(PairsError::Config("ann: feature dimension is 0".into()));
        }
        if params.probes == 0 {
            return Err(PairsError::Config("ann.probes must be at least 1".into()));
        }
        if params.lists == Some(0) {
            return Err(PairsError::Config(
                "ann.lists must be at least 1 (omit it for the default 4·√n)".into(),
            ));
        }
        let n = db.len() / dim;
        let lists = params
            .lists
            .unwrap_or_else(|| default_lists(n))
            .min(n)
            .max(1);
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        let row = |i: usize| &db[i * dim..(i + 1) * dim];
        let train: Vec<usize> = if n <= TRAIN_ROWS_PER_LIST * lists {
            (0..n).collect()
        } else {
            let mut t =
                rand::seq::index::sample(&mut rng, n, TRAIN_ROWS_PER_LIST * lists).into_vec();
            t.sort_unstable();
            t
        };
        let train_rows: Vec<f32> = train.iter().flat_map(|&i| row(i).iter().copied()).collect();
        let mut centroids: Vec<f32> = Vec::with_capacity(lists * dim);
        if n > 0 {
            for &t in
                &rand::seq::index::sample(&mut rng, train.len(), lists.min(train.len())).into_vec()
            {
                centroids.extend_from_slice(row(train[t]));
            }
        }
        let mut sums = vec![0f32; lists * dim];
        let mut counts = vec![0usize; lists];
        for _ in 0..TRAIN_ITERATIONS {
            if n == 0 {
                break;
            }
            let near = assign(&train_rows, dim, &centroids, lists);
            sums.fill(0.0);
            counts.fill(0);
            for (r, &c) in train_rows.chunks(dim).zip(&near) {
                counts[c] += 1;
                sums[c * dim..(c + 1) * dim]
                    .iter_mut()
                    .zip(r)
                    .for_each(|(s, v)| *s += v);
            }
            for c in 0..lists {
                let centre = &mut centroids[c * dim..(c + 1) * dim];
                if counts[c] == 0 {
                    // An empty list would never be probed usefully: restart it at a random training row.
                    let t = rng.random_range(0..train.len());
                    centre.copy_from_slice(row(train[t]));
                    continue;
                }
                let s = &sums[c * dim..(c + 1) * dim];
                let norm = s.iter().map(|v| v * v).sum::<f32>().sqrt();
                if norm > 0.0 {
                    centre
                        .iter_mut()
                        .zip(s)
                        .for_each(|(cv, sv)| *cv = sv / norm);
                }
            }
        }
        let near = if n == 0 {
            Vec::new()
        } else {
            assign(db, dim, &centroids, lists)
        };
        let mut offsets = vec![0usize; lists + 1];
        for &c in &near {
            offsets[c + 1] += 1;
        }
        for c in 0..lists {
            offsets[c + 1] += offsets[c];
        }
        let mut fill = offsets.clone();
        let mut ids = vec![0usize; n];
        for (i, &c) in near.iter().enumerate() {
            ids[fill[c]] = i;
            fill[c] += 1;
        }
        let packed: Vec<f32> = ids.iter().flat_map(|&i| row(i).iter().copied()).collect();
        Ok(Self {
            dim,
            lists: if n == 0 { 0 } else { lists },
            probes: params.probes,
            centroids,
            offsets,
            ids,
            list_of: near.iter().map(|&c| c as u32).collect(),
            packed,
        })
    }

    /// Number of lists.
    pub fn lists(&self) -> usize {
        self.lists
    }

    /// The list database row `row` was filed into.
    pub fn list_of(&self, row: usize) -> usize {
        self.list_of[row] as usize
    }

    /// Up to `width` rows with the largest dot product with each query (nq × dim), best first, among the rows
    /// of the query's `probes` nearest lists.
    pub fn search(&self, queries: &[f32], width: usize) -> Vec<Candidates> {
        let dim = self.dim;
        let nq = queries.len() / dim;
        let k = self.lists;
        if nq == 0 || k == 0 || width == 0 {
            return vec![Candidates::new(); nq];
        }
        let probes = self.probes.min(k);
        // Coarse step: the probed lists of every query, nearest first.
        let mut probe = vec![0usize; nq * probes];
        let mut buf = vec![0f32; BLOCK.min(nq) * k];
        for start in (0..nq).step_by(BLOCK) {
            let m = BLOCK.min(nq - start);
            let b = &mut buf[..m * k];
            matmul_abt(
                &queries[start * dim..(start + m) * dim],
                m,
                &self.centroids,
                k,
                dim,
                b,
            );
            probe[start * probes..(start + m) * probes]
                .par_chunks_mut(probes)
                .zip(b.par_chunks(k))
                .for_each(|(out, line)| {
                    let mut top = Candidates::with_capacity(probes + 1);
                    for (c, &s) in line.iter().enumerate() {
                        push_top(&mut top, probes, (c, s));
                    }
                    for (o, (c, _)) in out.iter_mut().zip(top) {
                        *o = c;
                    }
                });
        }
        // Fine step, queries ordered by their nearest list so that consecutive queries (and the two threads)
        // scan mostly the same lists while those are still in cache.
        let mut order: Vec<usize> = (0..nq).collect();
        order.sort_by_key(|&q| (probe[q * probes], q));
        search_in_order(&order, |q| {
            let qrow = &queries[q * dim..(q + 1) * dim];
            let mut top = Candidates::with_capacity(width + 1);
            for &l in &probe[q * probes..(q + 1) * probes] {
                for p in self.offsets[l]..self.offsets[l + 1] {
                    let s = fast_dot(qrow, &self.packed[p * dim..(p + 1) * dim]);
                    push_top(&mut top, width, (self.ids[p], s));
                }
            }
            top
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::l2_normalize_rows;
    use crate::retrieval::exact_candidates;
    use rand_distr::{Distribution, StandardNormal};

    #[test]
    fn every_row_is_in_exactly_one_list_and_probing_all_lists_is_exact() {
        let (n, dim) = (700, 12);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut db: Vec<f32> = (0..n * dim)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        l2_normalize_rows(&mut db, dim);
        let mut q: Vec<f32> = (0..50 * dim)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        l2_normalize_rows(&mut q, dim);
        let p = IvfParams {
            lists: Some(20),
            probes: 20,
            seed: 1,
        };
        let index = IvfIndex::build(&db, dim, &p).unwrap();
        let mut ids = index.ids.clone();
        ids.sort_unstable();
        assert_eq!(ids, (0..n).collect::<Vec<_>>());
        let got = index.search(&q, dim.max(5));
        let want = exact_candidates(&q, &db, dim, dim.max(5), -2.0);
        for (g, w) in got.iter().zip(&want) {
            let gi: Vec<usize> = g.iter().map(|c| c.0).collect();
            let wi: Vec<usize> = w.iter().map(|c| c.0).collect();
            assert_eq!(gi, wi);
        }
    }

    #[test]
    fn zero_probes_or_lists_are_config_errors() {
        let db = vec![1.0f32, 0.0, 0.0, 1.0];
        let bad = [
            IvfParams {
                lists: Some(0),
                probes: 1,
                seed: 0,
            },
            IvfParams {
                lists: None,
                probes: 0,
                seed: 0,
            },
        ];
        for p in bad {
            assert!(matches!(
                IvfIndex::build(&db, 2, &p),
                Err(PairsError::Config(_))
            ));
        }
    }
}
