//! `pairuni bench retrieval`: exact and HNSW retrieval on synthetic clustered features of a chosen size.
//!
//! The data imitate image features: `n / cluster_size` random unit centres, understanding rows = centre +
//! noise, generation rows = a random understanding row + smaller noise (so each query has a true neighbour at
//! cosine ≈ 0.7–0.8, above δ = 0.6). Uniform random vectors would make nearest neighbours meaningless.

use crate::ann::{recall_at_1, AnnIndex, AnnParams};
use crate::error::Result;
use crate::linalg::l2_normalize_rows;
use crate::retrieval::{exact_candidates, greedy_match, MatchParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct RetrievalBenchParams {
    /// Understanding rows (database).
    pub n: usize,
    /// Generation rows (queries).
    pub queries: usize,
    /// Feature dimension.
    pub dim: usize,
    /// Rows per synthetic cluster.
    pub cluster_size: usize,
    /// Seed of the data.
    pub seed: u64,
    /// Also build and query the HNSW index.
    pub ann: Option<AnnParams>,
    /// Cosine threshold δ.
    pub delta: f32,
}

/// Timings and recall.
#[derive(Debug, Clone, Serialize)]
pub struct RetrievalBenchReport {
    /// Database rows.
    pub n: usize,
    /// Query rows.
    pub queries: usize,
    /// Dimension.
    pub dim: usize,
    /// rayon threads used.
    pub threads: usize,
    /// Seconds for exact top-k candidates (the GEMM part).
    pub exact_candidates_s: f64,
    /// Seconds for the greedy matching after exact candidates.
    pub exact_match_s: f64,
    /// GFLOP/s of the exact search (2·n·queries·dim flops).
    pub exact_gflops: f64,
    /// Pairs formed by exact retrieval.
    pub exact_pairs: usize,
    /// Seconds to build the HNSW index.
    pub ann_build_s: Option<f64>,
    /// Seconds to query it.
    pub ann_search_s: Option<f64>,
    /// Seconds for the greedy matching on ANN candidates.
    pub ann_match_s: Option<f64>,
    /// recall@1 of the ANN candidates against exact.
    pub ann_recall_at_1: Option<f64>,
    /// Fraction of exact pairs that the ANN path also forms.
    pub ann_pair_agreement: Option<f64>,
}

fn unit_rows(n: usize, dim: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n * dim).map(|_| StandardNormal.sample(rng)).collect();
    l2_normalize_rows(&mut v, dim);
    v
}

/// Builds the synthetic (queries, database) matrices.
pub fn synthetic_features(p: &RetrievalBenchParams) -> (Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let centres = unit_rows(p.n.div_ceil(p.cluster_size.max(1)).max(1), p.dim, &mut rng);
    let nc = centres.len() / p.dim;
    let noise = unit_rows(p.n, p.dim, &mut rng);
    let mut db = Vec::with_capacity(p.n * p.dim);
    for i in 0..p.n {
        let c = rng.random_range(0..nc);
        db.extend((0..p.dim).map(|t| centres[c * p.dim + t] + 0.8 * noise[i * p.dim + t]));
    }
    l2_normalize_rows(&mut db, p.dim);
    let qnoise = unit_rows(p.queries, p.dim, &mut rng);
    let mut q = Vec::with_capacity(p.queries * p.dim);
    for i in 0..p.queries {
        let j = rng.random_range(0..p.n);
        q.extend((0..p.dim).map(|t| db[j * p.dim + t] + 0.6 * qnoise[i * p.dim + t]));
    }
    l2_normalize_rows(&mut q, p.dim);
    (q, db)
}

/// Runs the benchmark.
pub fn run_retrieval_bench(
    p: &RetrievalBenchParams,
    on_stage: &dyn Fn(&str),
) -> Result<RetrievalBenchReport> {
    on_stage("generating synthetic features");
    let (q, db) = synthetic_features(p);
    let mp = MatchParams {
        delta: p.delta,
        top_n: 1,
        seed: p.seed,
    };
    let cap = 8;
    on_stage("exact search");
    let t = Instant::now();
    let exact = exact_candidates(&q, &db, p.dim, cap, p.delta);
    let exact_candidates_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let exact_pairs = greedy_match(&q, &db, p.dim, &exact, cap, &mp);
    let exact_match_s = t.elapsed().as_secs_f64();
    let flops = 2.0 * p.n as f64 * p.queries as f64 * p.dim as f64;
    let mut report = RetrievalBenchReport {
        n: p.n,
        queries: p.queries,
        dim: p.dim,
        threads: rayon::current_num_threads(),
        exact_candidates_s,
        exact_match_s,
        exact_gflops: flops / exact_candidates_s / 1e9,
        exact_pairs: exact_pairs.len(),
        ann_build_s: None,
        ann_search_s: None,
        ann_match_s: None,
        ann_recall_at_1: None,
        ann_pair_agreement: None,
    };
    if let Some(ap) = &p.ann {
        on_stage("building HNSW");
        let t = Instant::now();
        let index = AnnIndex::build(&db, p.dim, ap)?;
        report.ann_build_s = Some(t.elapsed().as_secs_f64());
        on_stage("querying HNSW");
        let t = Instant::now();
        let approx = index.candidates(&q, p.dim, cap, p.delta);
        report.ann_search_s = Some(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let ann_pairs = greedy_match(&q, &db, p.dim, &approx, cap, &mp);
        report.ann_match_s = Some(t.elapsed().as_secs_f64());
        report.ann_recall_at_1 = Some(recall_at_1(&exact, &approx));
        let exact_set: std::collections::HashSet<(usize, usize)> = exact_pairs
            .iter()
            .map(|m| (m.generation, m.understanding))
            .collect();
        let same = ann_pairs
            .iter()
            .filter(|m| exact_set.contains(&(m.generation, m.understanding)))
            .count();
        report.ann_pair_agreement = Some(same as f64 / exact_pairs.len().max(1) as f64);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_bench_runs_and_queries_find_their_source() {
        let p = RetrievalBenchParams {
            n: 600,
            queries: 300,
            dim: 64,
            cluster_size: 30,
            seed: 1,
            ann: Some(AnnParams {
                max_connections: 16,
                ef_construction: 64,
                ef_search: 64,
            }),
            delta: 0.6,
        };
        let r = run_retrieval_bench(&p, &|_| {}).unwrap();
        assert!(
            r.exact_pairs > 200,
            "most queries have a true neighbour above δ: {}",
            r.exact_pairs
        );
        assert!(r.ann_recall_at_1.unwrap() > 0.9, "{:?}", r.ann_recall_at_1);
    }
}
