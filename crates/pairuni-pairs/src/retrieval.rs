//! Retrieved pairs (METHOD.md §2 step 4): cosine top-n with threshold δ and greedy one-use matching.
//!
//! Candidates come from exact blocked GEMM search ([`exact_candidates`]) or the approximate path of
//! [`crate::ann`] (PCA-reduced IVF or HNSW index, candidates re-ranked with exact full-dimension scores).
//! [`greedy_match`] then walks the generation samples in a seeded random order; each takes its best unused
//! understanding samples with cosine ≥ δ. When a query's candidate list is used up while it may hide more
//! matches above δ, the query falls back to a scan of every understanding row, so the exact path gives exactly
//! the brute-force result whatever the candidate-list length.

use crate::linalg::{dot, matmul_abt};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Settings of the greedy matching.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchParams {
    /// Cosine threshold δ: pairs below it are never formed.
    pub delta: f32,
    /// Understanding samples each generation sample takes (n).
    pub top_n: usize,
    /// Seed of the order in which generation samples choose.
    pub seed: u64,
}

/// One retrieved pair: indices into the query (generation) and database (understanding) matrices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Match {
    /// Row of the generation sample.
    pub generation: usize,
    /// Row of the understanding sample.
    pub understanding: usize,
    /// Their cosine similarity.
    pub score: f32,
}

/// A candidate list: (database row, score), best first, only scores ≥ δ.
pub type Candidates = Vec<(usize, f32)>;

/// Bounds the score block to about 64 MiB whatever the database size.
const BLOCK_FLOATS: usize = 16 << 20;

/// Orders candidates best first; equal scores go to the lower row so every path agrees on ties.
fn better(a: (usize, f32), b: (usize, f32)) -> bool {
    a.1 > b.1 || (a.1 == b.1 && a.0 < b.0)
}

/// Inserts `c` into the sorted list `top` holding at most `cap` entries.
pub(crate) fn push_top(top: &mut Candidates, cap: usize, c: (usize, f32)) {
    if top.len() == cap && !better(c, top[cap - 1]) {
        return;
    }
    let pos = top.iter().position(|&t| better(c, t)).unwrap_or(top.len());
    top.insert(pos, c);
    top.truncate(cap);
}

/// Runs `search` for every query in parallel, visiting them in `order` (a permutation of 0..n chosen so that
/// neighbouring queries read the same database rows), and returns the results indexed by query.
pub(crate) fn search_in_order(
    order: &[usize],
    search: impl Fn(usize) -> Candidates + Sync,
) -> Vec<Candidates> {
    let found: Vec<(usize, Candidates)> = order
        .par_iter()
        .with_min_len(64)
        .map(|&q| (q, search(q)))
        .collect();
    let mut out = vec![Candidates::new(); order.len()];
    for (q, top) in found {
        out[q] = top;
    }
    out
}

/// Exact top-`cap` database rows (score ≥ `delta`) of every query row, by blocked GEMM in parallel.
///
/// `queries` is nq × dim, `db` is nd × dim, both row-major and L2-normalised (scores are cosines).
pub fn exact_candidates(
    queries: &[f32],
    db: &[f32],
    dim: usize,
    cap: usize,
    delta: f32,
) -> Vec<Candidates> {
    let nq = queries.len().checked_div(dim).unwrap_or(0);
    let nd = db.len().checked_div(dim).unwrap_or(0);
    let mut out = vec![Candidates::new(); nq];
    if nq == 0 || nd == 0 || cap == 0 {
        return out;
    }
    let rows = (BLOCK_FLOATS / nd).clamp(1, nq);
    let mut scores = vec![0f32; rows * nd];
    for (b, chunk) in out.chunks_mut(rows).enumerate() {
        let start = b * rows;
        let m = chunk.len();
        let buf = &mut scores[..m * nd];
        matmul_abt(
            &queries[start * dim..(start + m) * dim],
            m,
            db,
            nd,
            dim,
            buf,
        );
        chunk
            .par_iter_mut()
            .zip(buf.par_chunks(nd))
            .for_each(|(top, line)| {
                for (j, &s) in line.iter().enumerate() {
                    if s >= delta {
                        push_top(top, cap, (j, s));
                    }
                }
            });
    }
    out
}

/// Greedy one-use matching over precomputed candidate lists (see the module doc for the fallback rule).
///
/// `cap` is the length the candidate lists were asked for: a list shorter than `cap` is known to hold every
/// row above δ, so no fallback scan is needed for it.
pub fn greedy_match(
    queries: &[f32],
    db: &[f32],
    dim: usize,
    candidates: &[Candidates],
    cap: usize,
    params: &MatchParams,
) -> Vec<Match> {
    let nq = candidates.len();
    let nd = db.len().checked_div(dim).unwrap_or(0);
    let mut order: Vec<usize> = (0..nq).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(params.seed));
    let mut used = vec![false; nd];
    let mut out = Vec::new();
    for q in order {
        let mut taken = 0;
        for &(j, s) in &candidates[q] {
            if taken == params.top_n {
                break;
            }
            if !used[j] {
                used[j] = true;
                taken += 1;
                out.push(Match {
                    generation: q,
                    understanding: j,
                    score: s,
                });
            }
        }
        let may_hide_more = candidates[q].len() >= cap;
        if taken < params.top_n && may_hide_more {
            let qrow = &queries[q * dim..(q + 1) * dim];
            let need = params.top_n - taken;
            let mut top = Candidates::new();
            for (j, row) in db.chunks(dim).enumerate() {
                if !used[j] {
                    let s = dot(qrow, row);
                    if s >= params.delta {
                        push_top(&mut top, need, (j, s));
                    }
                }
            }
            for (j, s) in top {
                used[j] = true;
                out.push(Match {
                    generation: q,
                    understanding: j,
                    score: s,
                });
            }
        }
    }
    out
}

/// Exact retrieval: candidate lists of length `max(top_n, 8)` by GEMM, then greedy matching.
pub fn retrieve_exact(queries: &[f32], db: &[f32], dim: usize, params: &MatchParams) -> Vec<Match> {
    let cap = params.top_n.max(8);
    let cands = exact_candidates(queries, db, dim, cap, params.delta);
    greedy_match(queries, db, dim, &cands, cap, params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::l2_normalize_rows;
    use rand::Rng;

    fn random_unit(n: usize, dim: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        l2_normalize_rows(&mut v, dim);
        v
    }

    /// Queries near database rows so that many pairs clear δ and competition for rows is fierce.
    fn clustered(nq: usize, nd: usize, dim: usize, noise: f32, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let db = random_unit(nd, dim, &mut rng);
        let mut q = Vec::with_capacity(nq * dim);
        for _ in 0..nq {
            let j = rng.random_range(0..nd);
            q.extend(
                db[j * dim..(j + 1) * dim]
                    .iter()
                    .map(|v| v + noise * rng.random_range(-1.0f32..1.0)),
            );
        }
        l2_normalize_rows(&mut q, dim);
        (q, db)
    }

    /// The specification, literally: seeded order; each query scans all remaining rows in f64.
    fn brute_force(q: &[f32], db: &[f32], dim: usize, p: &MatchParams) -> Vec<(usize, usize)> {
        let nq = q.len() / dim;
        let nd = db.len() / dim;
        let mut order: Vec<usize> = (0..nq).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(p.seed));
        let mut used = vec![false; nd];
        let mut out = vec![];
        for qi in order {
            let mut scored: Vec<(usize, f64)> = (0..nd)
                .filter(|&j| !used[j])
                .map(|j| {
                    let s: f64 = (0..dim)
                        .map(|t| q[qi * dim + t] as f64 * db[j * dim + t] as f64)
                        .sum();
                    (j, s)
                })
                .filter(|&(_, s)| s >= p.delta as f64)
                .collect();
            scored.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            for &(j, _) in scored.iter().take(p.top_n) {
                used[j] = true;
                out.push((qi, j));
            }
        }
        out
    }

    fn pairs(m: &[Match]) -> Vec<(usize, usize)> {
        m.iter().map(|m| (m.generation, m.understanding)).collect()
    }

    #[test]
    fn exact_equals_brute_force_for_several_n_and_deltas() {
        let dim = 24;
        let (q, db) = clustered(300, 200, dim, 0.6, 1);
        for top_n in [1, 2, 3] {
            for delta in [0.3f32, 0.6, 0.8] {
                let p = MatchParams {
                    delta,
                    top_n,
                    seed: 9,
                };
                let got = retrieve_exact(&q, &db, dim, &p);
                assert_eq!(
                    pairs(&got),
                    brute_force(&q, &db, dim, &p),
                    "n={top_n} δ={delta}"
                );
            }
        }
    }

    #[test]
    fn short_candidate_lists_fall_back_to_exact_scan() {
        // cap = 1 forces the fallback for every query whose best row was taken earlier.
        let dim = 16;
        let (q, db) = clustered(150, 60, dim, 0.5, 2);
        let p = MatchParams {
            delta: 0.2,
            top_n: 1,
            seed: 4,
        };
        let cands = exact_candidates(&q, &db, dim, 1, p.delta);
        let got = greedy_match(&q, &db, dim, &cands, 1, &p);
        assert_eq!(pairs(&got), brute_force(&q, &db, dim, &p));
    }

    #[test]
    fn threshold_is_respected() {
        let dim = 2;
        let q = vec![1.0, 0.0, 0.0, 1.0];
        let s = 0.59f32;
        let db = vec![s, (1.0 - s * s).sqrt(), 0.0, 1.0];
        let got = retrieve_exact(
            &q,
            &db,
            dim,
            &MatchParams {
                delta: 0.6,
                top_n: 1,
                seed: 0,
            },
        );
        assert_eq!(pairs(&got), vec![(1, 1)], "cosine 0.59 < δ must not pair");
        assert!(got.iter().all(|m| m.score >= 0.6));
        let got = retrieve_exact(
            &q,
            &db,
            dim,
            &MatchParams {
                delta: 0.5,
                top_n: 1,
                seed: 0,
            },
        );
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn each_understanding_row_is_used_once() {
        let dim = 8;
        let (q, db) = clustered(400, 50, dim, 0.2, 3);
        let got = retrieve_exact(
            &q,
            &db,
            dim,
            &MatchParams {
                delta: 0.0,
                top_n: 2,
                seed: 1,
            },
        );
        let mut seen = std::collections::HashSet::new();
        for m in &got {
            assert!(
                seen.insert(m.understanding),
                "row {} used twice",
                m.understanding
            );
        }
        assert_eq!(got.len(), 50, "with δ = 0 all 50 rows are eventually taken");
        let mut per_q = std::collections::HashMap::new();
        for m in &got {
            *per_q.entry(m.generation).or_insert(0) += 1;
        }
        assert!(per_q.values().all(|&c| c <= 2));
    }

    #[test]
    fn order_depends_on_seed() {
        let dim = 8;
        let (q, db) = clustered(100, 20, dim, 0.1, 5);
        let a = pairs(&retrieve_exact(
            &q,
            &db,
            dim,
            &MatchParams {
                delta: 0.5,
                top_n: 1,
                seed: 1,
            },
        ));
        let b = pairs(&retrieve_exact(
            &q,
            &db,
            dim,
            &MatchParams {
                delta: 0.5,
                top_n: 1,
                seed: 2,
            },
        ));
        assert_ne!(a, b);
    }
}
