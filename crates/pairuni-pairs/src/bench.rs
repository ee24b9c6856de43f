//! `pairuni bench retrieval`: exact and approximate (PCA → IVF/HNSW → exact re-rank) retrieval on synthetic
//! clustered features of a chosen size.
//!
//! The data imitate image features: `n / cluster_size` random unit centres, understanding rows = centre +
//! noise, generation rows = a random understanding row + smaller noise (so each query has a true neighbour at
//! cosine ≈ 0.7–0.8, above δ = 0.6). Uniform random vectors would make nearest neighbours meaningless.

use crate::ann::{recall_at_1, ApproxIndex, ApproxParams};
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
    /// Also run the approximate path with these settings.
    pub ann: Option<ApproxParams>,
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
    /// Seconds of exact retrieval in all (candidates + matching).
    pub exact_total_s: f64,
    /// CPU seconds (all threads) of exact retrieval; None off Linux.
    pub exact_cpu_s: Option<f64>,
    /// Approximate path: index kind, PCA dimension, re-rank width, IVF lists and probes, as run.
    pub ann_settings: Option<String>,
    /// Seconds to build the approximate index in all (PCA fit + database projection + index).
    pub ann_build_s: Option<f64>,
    /// Of which: fitting the PCA.
    pub ann_pca_fit_s: Option<f64>,
    /// Of which: projecting the database rows.
    pub ann_project_s: Option<f64>,
    /// Of which: building the IVF lists or HNSW graph on the reduced rows.
    pub ann_index_s: Option<f64>,
    /// Seconds to query it in all (query projection + reduced search + exact re-rank).
    pub ann_search_s: Option<f64>,
    /// Of which: the exact full-dimension re-rank.
    pub ann_rerank_s: Option<f64>,
    /// Seconds for the greedy matching on the approximate candidates.
    pub ann_match_s: Option<f64>,
    /// Seconds of approximate retrieval in all (build + search + matching).
    pub ann_total_s: Option<f64>,
    /// exact_total_s / ann_total_s.
    pub ann_speedup: Option<f64>,
    /// CPU seconds (all threads) of the approximate path in all (build + search + matching).
    pub ann_cpu_s: Option<f64>,
    /// exact_cpu_s / ann_cpu_s: the speed-up in work done, which other processes on a shared machine
    /// disturb much less than the wall-clock ratio.
    pub ann_cpu_speedup: Option<f64>,
    /// recall@1 of the approximate candidates against exact.
    pub ann_recall_at_1: Option<f64>,
    /// Fraction of exact pairs that the approximate path also forms.
    pub ann_pair_agreement: Option<f64>,
    /// Pairs formed by the approximate path.
    pub ann_pairs: Option<usize>,
}

/// CPU seconds this process has used so far (all threads, user + system), from /proc/self/stat; None where
/// that file does not exist.
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the parenthesised command name (which may contain spaces): state is the first of them,
    // so utime and stime (fields 14 and 15 of the file) are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // /proc reports in USER_HZ, which the kernel ABI fixes at 100.
    Some(ticks / 100.0)
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
    // Candidates kept per query for the matching, on both paths.
    let cap = 8;
    if let Some(ap) = &p.ann {
        // Refuse bad knobs before minutes of exact search, not after.
        ap.validate(p.dim)?;
        if cap > ap.rerank {
            return Err(crate::error::PairsError::Config(format!(
                "ann.rerank ({}) must be at least {cap}",
                ap.rerank
            )));
        }
    }
    on_stage("generating synthetic features");
    let (q, db) = synthetic_features(p);
    let mp = MatchParams {
        delta: p.delta,
        top_n: 1,
        seed: p.seed,
    };
    on_stage("exact search");
    let cpu0 = process_cpu_s();
    let t = Instant::now();
    let exact = exact_candidates(&q, &db, p.dim, cap, p.delta);
    let exact_candidates_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let exact_pairs = greedy_match(&q, &db, p.dim, &exact, cap, &mp);
    let exact_match_s = t.elapsed().as_secs_f64();
    let exact_cpu_s = cpu0.zip(process_cpu_s()).map(|(a, b)| b - a);
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
        exact_total_s: exact_candidates_s + exact_match_s,
        exact_cpu_s,
        ann_settings: None,
        ann_build_s: None,
        ann_pca_fit_s: None,
        ann_project_s: None,
        ann_index_s: None,
        ann_search_s: None,
        ann_rerank_s: None,
        ann_match_s: None,
        ann_total_s: None,
        ann_speedup: None,
        ann_cpu_s: None,
        ann_cpu_speedup: None,
        ann_recall_at_1: None,
        ann_pair_agreement: None,
        ann_pairs: None,
    };
    if let Some(ap) = &p.ann {
        on_stage("building the approximate index (PCA + index)");
        let cpu0 = process_cpu_s();
        let t = Instant::now();
        let index = ApproxIndex::build(&db, p.dim, ap)?;
        let build_s = t.elapsed().as_secs_f64();
        let bt = index.timings();
        on_stage("querying the approximate index and re-ranking");
        let t = Instant::now();
        let reduced = index.search_reduced(&q);
        let t_rerank = Instant::now();
        let approx = index.rerank(&q, &reduced, cap, p.delta);
        let rerank_s = t_rerank.elapsed().as_secs_f64();
        let search_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let ann_pairs = greedy_match(&q, &db, p.dim, &approx, cap, &mp);
        let match_s = t.elapsed().as_secs_f64();
        let ann_cpu_s = cpu0.zip(process_cpu_s()).map(|(a, b)| b - a);
        let total = build_s + search_s + match_s;
        report.ann_settings = Some(format!(
            "{:?}, reduce_dim {}, rerank {}, {}",
            ap.index,
            ap.reduce_dim,
            ap.rerank,
            match ap.index {
                crate::config::AnnIndexKind::Ivf => format!(
                    "lists {}, probes {}",
                    ap.ivf
                        .lists
                        .unwrap_or_else(|| crate::ivf::default_lists(p.n)),
                    ap.ivf.probes
                ),
                crate::config::AnnIndexKind::Hnsw => format!(
                    "M {}, ef_construction {}, ef_search {}",
                    ap.hnsw.max_connections, ap.hnsw.ef_construction, ap.hnsw.ef_search
                ),
            }
        ));
        report.ann_build_s = Some(build_s);
        report.ann_pca_fit_s = Some(bt.pca_fit_s);
        report.ann_project_s = Some(bt.project_s);
        report.ann_index_s = Some(bt.index_s);
        report.ann_search_s = Some(search_s);
        report.ann_rerank_s = Some(rerank_s);
        report.ann_match_s = Some(match_s);
        report.ann_total_s = Some(total);
        report.ann_speedup = Some(report.exact_total_s / total);
        report.ann_cpu_s = ann_cpu_s;
        report.ann_cpu_speedup = exact_cpu_s.zip(ann_cpu_s).map(|(e, a)| e / a.max(0.01));
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
        report.ann_pairs = Some(ann_pairs.len());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn cpu_time_is_read_and_grows_with_work() {
        let a = process_cpu_s().expect("/proc/self/stat");
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < 0.1 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let b = process_cpu_s().unwrap();
        assert!(a >= 0.0 && b >= a, "{a} then {b}");
    }

    #[test]
    fn small_bench_runs_and_queries_find_their_source() {
        let p = RetrievalBenchParams {
            n: 600,
            queries: 300,
            dim: 64,
            cluster_size: 30,
            seed: 1,
            ann: Some(ApproxParams::from_config(
                &crate::config::AnnConfig {
                    reduce_dim: 32,
                    ..Default::default()
                },
                1,
            )),
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
