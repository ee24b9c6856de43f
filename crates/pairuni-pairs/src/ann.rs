//! Approximate candidate search: PCA reduction, an index over the reduced rows, exact re-ranking.
//!
//! [`ApproxIndex`] fits a [`Pca`] on a seeded sample of the database, projects and re-normalises both sides,
//! indexes the reduced database with an [`IvfIndex`] (default) or an HNSW graph ([`AnnIndex`], hnsw_rs), takes
//! the `rerank` best reduced-space candidates of each query and re-scores them with exact full-dimension dot
//! products. It only replaces [`crate::retrieval::exact_candidates`]: the scores it hands on are exact, the
//! greedy one-use matching stays the same, so the approximate path differs from the exact one only where a true
//! neighbour is missing from a query's re-ranked list. Recall is measured against exact search by
//! `pairuni bench retrieval` and by tests.

use crate::config::{AnnConfig, AnnIndexKind};
use crate::error::{PairsError, Result};
use crate::ivf::{IvfIndex, IvfParams};
use crate::pca::Pca;
use crate::retrieval::{push_top, search_in_order, Candidates};
use hnsw_rs::prelude::{Distance, Hnsw};
use rayon::prelude::*;
use std::time::Instant;

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

/// An HNSW index over the rows of a feature matrix (hnsw_rs copies the rows, so the index owns its data).
pub struct AnnIndex {
    hnsw: Hnsw<'static, f32, FastDot>,
    ef_search: usize,
}

impl AnnIndex {
    /// Builds the index over `db` (n × dim, unit rows), inserting in parallel.
    pub fn build(db: &[f32], dim: usize, params: &AnnParams) -> Result<Self> {
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

    /// Up to `width` approximate nearest rows of each query with their cosines, best first, no threshold.
    pub fn search(&self, queries: &[f32], dim: usize, width: usize) -> Vec<Candidates> {
        queries
            .par_chunks(dim)
            .map(|q| {
                let mut found: Candidates = self
                    .hnsw
                    .search(q, width, self.ef_search.max(width))
                    .into_iter()
                    .map(|nb| (nb.d_id, 1.0 - nb.distance))
                    .collect();
                found.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                found.truncate(width);
                found
            })
            .collect()
    }

    /// Up to `cap` approximate nearest rows of each query with cosine ≥ `delta`, best first.
    pub fn candidates(
        &self,
        queries: &[f32],
        dim: usize,
        cap: usize,
        delta: f32,
    ) -> Vec<Candidates> {
        let mut found = self.search(queries, dim, cap);
        for f in &mut found {
            f.retain(|&(_, s)| s >= delta);
        }
        found
    }
}

/// Settings of the whole approximate path (see `config::AnnConfig` for meanings and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApproxParams {
    /// Which index serves the reduced rows.
    pub index: AnnIndexKind,
    /// PCA output dimension, 1..=feature dimension (equal = no reduction).
    pub reduce_dim: usize,
    /// Database rows sampled to fit the PCA.
    pub pca_sample: usize,
    /// Reduced-space candidates per query that are re-scored in full dimension.
    pub rerank: usize,
    /// IVF lists (`None` = 4·√n) and lists probed per query.
    pub ivf: IvfParams,
    /// HNSW settings.
    pub hnsw: AnnParams,
    /// Seed of the PCA sample and the IVF training.
    pub seed: u64,
}

impl ApproxParams {
    /// Checks every knob against the feature dimension `dim`, so a bad value fails before any work is done.
    pub fn validate(&self, dim: usize) -> Result<()> {
        let bad = |m: String| Err(PairsError::Config(m));
        if dim == 0 {
            return bad("ann: feature dimension is 0".into());
        }
        if self.reduce_dim == 0 || self.reduce_dim > dim {
            return bad(format!(
                "ann.reduce_dim must be in 1..={dim} (the feature dimension; equal = no reduction), got {}",
                self.reduce_dim
            ));
        }
        if self.rerank == 0 {
            return bad("ann.rerank must be at least 1".into());
        }
        if self.pca_sample == 0 {
            return bad("ann.pca_sample must be at least 1".into());
        }
        match self.index {
            AnnIndexKind::Ivf if self.ivf.probes == 0 => {
                bad("ann.probes must be at least 1".into())
            }
            AnnIndexKind::Ivf if self.ivf.lists == Some(0) => {
                bad("ann.lists must be at least 1 (omit it for the default 4·√n)".into())
            }
            AnnIndexKind::Hnsw
                if self.hnsw.max_connections == 0 || self.hnsw.max_connections > 255 =>
            {
                bad(format!(
                    "ann.max_connections must be in 1..=255, got {}",
                    self.hnsw.max_connections
                ))
            }
            _ => Ok(()),
        }
    }

    /// The parameters a pairs config asks for; `seed` is the builder's seed.
    pub fn from_config(c: &AnnConfig, seed: u64) -> Self {
        Self {
            index: c.index,
            reduce_dim: c.reduce_dim,
            pca_sample: c.pca_sample,
            rerank: c.rerank,
            ivf: IvfParams {
                lists: c.lists,
                probes: c.probes,
                seed,
            },
            hnsw: AnnParams {
                max_connections: c.max_connections,
                ef_construction: c.ef_construction,
                ef_search: c.ef_search,
            },
            seed,
        }
    }
}

enum Reduced {
    Ivf(IvfIndex),
    Hnsw(AnnIndex),
}

/// Where the build time went, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BuildTimings {
    /// Fitting the PCA on the sample.
    pub pca_fit_s: f64,
    /// Projecting and re-normalising the database rows.
    pub project_s: f64,
    /// Building the IVF lists or the HNSW graph.
    pub index_s: f64,
}

/// The approximate retriever over one database: PCA, reduced index and the full-dimension rows for re-ranking.
pub struct ApproxIndex<'a> {
    db: &'a [f32],
    dim: usize,
    pca: Pca,
    index: Reduced,
    rerank: usize,
    timings: BuildTimings,
}

impl<'a> ApproxIndex<'a> {
    /// Fits the PCA, reduces `db` (n × dim, unit rows) and builds the index; every parameter is checked.
    pub fn build(db: &'a [f32], dim: usize, p: &ApproxParams) -> Result<Self> {
        p.validate(dim)?;
        let t = Instant::now();
        let pca = Pca::fit(db, dim, p.reduce_dim, p.pca_sample, p.seed)?;
        let pca_fit_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let reduced = pca.project(db);
        let project_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let rd = pca.out_dim();
        let index = match p.index {
            AnnIndexKind::Ivf => Reduced::Ivf(IvfIndex::build(&reduced, rd, &p.ivf)?),
            AnnIndexKind::Hnsw => Reduced::Hnsw(AnnIndex::build(&reduced, rd, &p.hnsw)?),
        };
        let index_s = t.elapsed().as_secs_f64();
        Ok(Self {
            db,
            dim,
            pca,
            index,
            rerank: p.rerank,
            timings: BuildTimings {
                pca_fit_s,
                project_s,
                index_s,
            },
        })
    }

    /// Where the build time went.
    pub fn timings(&self) -> BuildTimings {
        self.timings
    }

    /// The `rerank` best rows of each query (nq × dim) in the reduced space, with reduced-space cosines.
    pub fn search_reduced(&self, queries: &[f32]) -> Vec<Candidates> {
        let rq = self.pca.project(queries);
        let rd = self.pca.out_dim();
        match &self.index {
            Reduced::Ivf(ix) => ix.search(&rq, self.rerank),
            Reduced::Hnsw(ix) => ix.search(&rq, rd, self.rerank),
        }
    }

    /// Re-scores reduced-space candidates with exact full-dimension dot products and keeps, per query, the
    /// best `cap` with score ≥ `delta`, best first (ties → lower row, as in exact search).
    pub fn rerank(
        &self,
        queries: &[f32],
        reduced: &[Candidates],
        cap: usize,
        delta: f32,
    ) -> Vec<Candidates> {
        let dim = self.dim;
        let nq = reduced.len();
        if cap == 0 {
            return vec![Candidates::new(); nq];
        }
        // Queries whose best reduced candidates lie in the same region of the database are re-ranked one after
        // the other, so the full-dimension rows they share are read from cache rather than from memory (the
        // re-rank reads `rerank` random 4·dim-byte rows per query and is otherwise memory-bound).
        let key = |q: usize| match (&self.index, reduced[q].first()) {
            (Reduced::Ivf(ix), Some(&(j, _))) => ix.list_of(j),
            (_, Some(&(j, _))) => j,
            (_, None) => usize::MAX,
        };
        let mut order: Vec<usize> = (0..nq).collect();
        order.sort_by_key(|&q| (key(q), q));
        search_in_order(&order, |q| {
            let qrow = &queries[q * dim..(q + 1) * dim];
            let mut top = Candidates::with_capacity(cap + 1);
            for &(j, _) in &reduced[q] {
                let s = fast_dot(qrow, &self.db[j * dim..(j + 1) * dim]);
                if s >= delta {
                    push_top(&mut top, cap, (j, s));
                }
            }
            top
        })
    }

    /// Reduced search then exact re-ranking: up to `cap` rows per query with exact cosine ≥ `delta`.
    ///
    /// `cap` may not exceed `rerank`: a list re-ranked from fewer candidates than it may hold would look
    /// complete to the greedy matching's fallback rule while it is not.
    pub fn candidates(&self, queries: &[f32], cap: usize, delta: f32) -> Result<Vec<Candidates>> {
        if cap > self.rerank {
            return Err(PairsError::Config(format!(
                "ann.rerank ({}) must be at least the candidates kept per query ({cap}: max of ann.candidates and top_n)",
                self.rerank
            )));
        }
        let reduced = self.search_reduced(queries);
        Ok(self.rerank(queries, &reduced, cap, delta))
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

    fn clustered_set(n: usize, dim: usize) -> (Vec<f32>, Vec<f32>) {
        crate::bench::synthetic_features(&crate::bench::RetrievalBenchParams {
            n,
            queries: n,
            dim,
            cluster_size: 50,
            seed: 11,
            ann: None,
            delta: 0.6,
        })
    }

    fn params(index: AnnIndexKind, reduce_dim: usize) -> ApproxParams {
        let mut p = ApproxParams::from_config(&AnnConfig::default(), 3);
        p.index = index;
        p.reduce_dim = reduce_dim;
        p
    }

    #[test]
    fn reduced_and_reranked_search_keeps_recall_on_clustered_data() {
        let dim = 256;
        let (q, db) = clustered_set(3000, dim);
        let exact = exact_candidates(&q, &db, dim, 8, 0.6);
        for index in [AnnIndexKind::Ivf, AnnIndexKind::Hnsw] {
            let ix = ApproxIndex::build(&db, dim, &params(index, 32)).unwrap();
            let approx = ix.candidates(&q, 8, 0.6).unwrap();
            let r = recall_at_1(&exact, &approx);
            assert!(r >= 0.99, "{index:?}: recall@1 {r}");
        }
    }

    #[test]
    fn reranked_scores_are_exact_full_dimension_cosines() {
        let dim = 256;
        let (q, db) = clustered_set(3000, dim);
        let exact = exact_candidates(&q, &db, dim, 8, 0.6);
        let ix = ApproxIndex::build(&db, dim, &params(AnnIndexKind::Ivf, 32)).unwrap();
        let approx = ix.candidates(&q, 8, 0.6).unwrap();
        let mut compared = 0;
        for (e, a) in exact.iter().zip(&approx) {
            for &(j, s) in a {
                if let Some(&(_, want)) = e.iter().find(|c| c.0 == j) {
                    assert!(
                        (s - want).abs() <= 1e-5 * want.abs(),
                        "row {j}: {s} vs {want}"
                    );
                    compared += 1;
                }
            }
        }
        assert!(compared > 2500, "only {compared} hits compared");
    }

    #[test]
    fn bad_knob_values_are_clear_config_errors() {
        let dim = 16;
        let (_, db) = clustered_set(200, dim);
        let msg = |p: ApproxParams| match ApproxIndex::build(&db, dim, &p) {
            Err(PairsError::Config(m)) => m,
            Err(e) => panic!("wrong error kind: {e}"),
            Ok(_) => panic!("accepted {p:?}"),
        };
        for bad in [0, dim + 1] {
            let m = msg(params(AnnIndexKind::Ivf, bad));
            assert!(m.contains("ann.reduce_dim") && m.contains("1..=16"), "{m}");
        }
        let mut p = params(AnnIndexKind::Ivf, 8);
        p.rerank = 0;
        assert!(msg(p).contains("ann.rerank"));
        let mut p = params(AnnIndexKind::Ivf, 8);
        p.ivf.probes = 0;
        assert!(msg(p).contains("ann.probes"));
        let mut p = params(AnnIndexKind::Ivf, 8);
        p.pca_sample = 0;
        assert!(msg(p).contains("ann.pca_sample"));
        let mut p = params(AnnIndexKind::Hnsw, 8);
        p.hnsw.max_connections = 0;
        assert!(msg(p).contains("ann.max_connections"));
        let ix = ApproxIndex::build(&db, dim, &params(AnnIndexKind::Ivf, dim)).unwrap();
        match ix.candidates(&db[..dim], 33, 0.6) {
            Err(PairsError::Config(m)) => assert!(m.contains("ann.rerank"), "{m}"),
            other => panic!("rerank < cap accepted: {:?}", other.map(|c| c.len())),
        }
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
