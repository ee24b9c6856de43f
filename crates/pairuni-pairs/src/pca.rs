//! Dimension reduction for approximate retrieval: an uncentred PCA fitted on a seeded sample of database rows.
//!
//! Uncentred (the top eigen-subspace of the second-moment matrix XᵀX, i.e. a truncated SVD) rather than
//! centred: retrieval scores are uncentred cosines, and the k-dimensional subspace that best preserves inner
//! products with the rows (least squares) is the top-k eigen-subspace of XᵀX; a dominant mean direction is then
//! simply one of the kept directions.
//!
//! The subspace is found by subspace iteration (power iterations on XᵀX with re-orthonormalisation) and no
//! eigen-decomposition follows: the reduced rows are compared only by dot products after re-normalisation, and
//! those do not change under a rotation inside the subspace, so any orthonormal basis of it serves.

use crate::ann::fast_dot;
use crate::error::{PairsError, Result};
use crate::linalg::{gram, l2_normalize_rows, matmul_abt};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

/// Power iterations of the subspace iteration: enough on the flat spectra of clustered features that the
/// kept energy is within a few percent of the exact top-k subspace's, and each costs one dim² × k GEMM.
const POWER_ITERATIONS: usize = 4;

/// A linear map from `dim` to `out_dim` dimensions with orthonormal rows (identity when they are equal).
#[derive(Debug, Clone)]
pub struct Pca {
    dim: usize,
    out_dim: usize,
    /// out_dim × dim, row-major, orthonormal rows; empty for the identity.
    basis: Vec<f32>,
}

impl Pca {
    /// Fits the top-`out_dim` subspace of the rows of `data` (n × dim) on a seeded sample of at most `sample`
    /// rows. `out_dim` must be in 1..=dim; `out_dim == dim` gives the identity (no reduction, no cost).
    pub fn fit(data: &[f32], dim: usize, out_dim: usize, sample: usize, seed: u64) -> Result<Self> {
        if dim == 0 {
            return Err(PairsError::Config("ann: feature dimension is 0".into()));
        }
        if out_dim == 0 || out_dim > dim {
            return Err(PairsError::Config(format!(
                "ann.reduce_dim must be in 1..={dim} (the feature dimension; equal = no reduction), got {out_dim}"
            )));
        }
        if sample == 0 {
            return Err(PairsError::Config(
                "ann.pca_sample must be at least 1".into(),
            ));
        }
        if out_dim == dim {
            return Ok(Self {
                dim,
                out_dim,
                basis: Vec::new(),
            });
        }
        let n = data.len() / dim;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut picked: Vec<usize> = if n <= sample {
            (0..n).collect()
        } else {
            rand::seq::index::sample(&mut rng, n, sample).into_vec()
        };
        // Sorted so the gather below walks memory forwards.
        picked.sort_unstable();
        let s = picked.len();
        let sample_rows: Vec<f32> = picked
            .iter()
            .flat_map(|&i| data[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        let mut second_moment = vec![0f32; dim * dim];
        gram(&sample_rows, s, dim, &mut second_moment);
        drop(sample_rows);
        let mut basis: Vec<f32> = (0..out_dim * dim)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        orthonormalise_rows(&mut basis, dim, &mut rng);
        let mut next = vec![0f32; out_dim * dim];
        for _ in 0..POWER_ITERATIONS {
            // Rows of Q·M with M symmetric are the columns of M·Qᵀ: one power step for every basis vector.
            matmul_abt(&basis, out_dim, &second_moment, dim, dim, &mut next);
            std::mem::swap(&mut basis, &mut next);
            orthonormalise_rows(&mut basis, dim, &mut rng);
        }
        Ok(Self {
            dim,
            out_dim,
            basis,
        })
    }

    /// Input dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Output dimension.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The orthonormal basis rows (out_dim × dim), empty for the identity.
    pub fn basis(&self) -> &[f32] {
        &self.basis
    }

    /// Projects the rows of `rows` (n × dim) and re-normalises them to unit length (n × out_dim).
    pub fn project(&self, rows: &[f32]) -> Vec<f32> {
        if self.basis.is_empty() {
            return rows.to_vec();
        }
        let n = rows.len() / self.dim;
        let mut out = vec![0f32; n * self.out_dim];
        matmul_abt(rows, n, &self.basis, self.out_dim, self.dim, &mut out);
        l2_normalize_rows(&mut out, self.out_dim);
        out
    }
}

/// Gram–Schmidt applied twice to every row ("twice is enough" for f32 orthogonality). A row that collapses
/// (the sample has lower rank than the basis) is replaced by a fresh random direction, so the result is always
/// an orthonormal basis of the requested size.
fn orthonormalise_rows(rows: &mut [f32], dim: usize, rng: &mut ChaCha8Rng) {
    let k = rows.len() / dim;
    for i in 0..k {
        let (done, rest) = rows.split_at_mut(i * dim);
        let row = &mut rest[..dim];
        let mut attempts = 0;
        loop {
            let before = fast_dot(row, row).sqrt();
            for _ in 0..2 {
                // Classical Gram–Schmidt within a pass (all projections from the same row, computed in
                // parallel); the second pass restores the orthogonality that one classical pass loses.
                let r: Vec<f32> = done
                    .par_chunks(dim)
                    .map(|prev| fast_dot(row, prev))
                    .collect();
                for (prev, &c) in done.chunks(dim).zip(&r) {
                    row.iter_mut().zip(prev).for_each(|(v, p)| *v -= c * p);
                }
            }
            let after = fast_dot(row, row).sqrt();
            if after > 1e-4 * before && after > 0.0 {
                row.iter_mut().for_each(|v| *v /= after);
                break;
            }
            attempts += 1;
            assert!(attempts < 16, "cannot complete an orthonormal basis");
            row.iter_mut()
                .for_each(|v| *v = StandardNormal.sample(&mut *rng));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::dot;

    #[test]
    fn basis_is_orthonormal_and_finds_a_planted_subspace() {
        // Rows live (up to small noise) in the span of the first 4 coordinates of a 32-dim space.
        let (n, dim) = (500, 32);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut data = vec![0f32; n * dim];
        for row in data.chunks_mut(dim) {
            for (t, v) in row.iter_mut().enumerate() {
                let x: f32 = StandardNormal.sample(&mut rng);
                *v = if t < 4 { x } else { 0.01 * x };
            }
        }
        let pca = Pca::fit(&data, dim, 4, 300, 7).unwrap();
        let b = pca.basis();
        for i in 0..4 {
            for j in 0..4 {
                let d = dot(&b[i * dim..(i + 1) * dim], &b[j * dim..(j + 1) * dim]);
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((d - want).abs() < 1e-4, "({i},{j}) {d}");
            }
            let inside: f32 = b[i * dim..i * dim + 4].iter().map(|v| v * v).sum();
            assert!(
                inside > 0.99,
                "basis row {i} keeps only {inside} in the planted span"
            );
        }
        let p = pca.project(&data[..dim]);
        assert_eq!(p.len(), 4);
        assert!((dot(&p, &p) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn rank_deficient_sample_still_gives_a_full_basis() {
        let dim = 8;
        let data = vec![1.0f32; 3 * dim];
        let pca = Pca::fit(&data, dim, 5, 10, 1).unwrap();
        let b = pca.basis();
        for i in 0..5 {
            let r = &b[i * dim..(i + 1) * dim];
            assert!((dot(r, r) - 1.0).abs() < 1e-4);
        }
    }

    #[test]
    fn bad_output_dimensions_are_config_errors() {
        let data = vec![0.5f32; 4 * 6];
        for bad in [0, 7] {
            let e = Pca::fit(&data, 6, bad, 10, 0).unwrap_err();
            assert!(
                matches!(&e, PairsError::Config(m) if m.contains("ann.reduce_dim") && m.contains("1..=6")),
                "{e}"
            );
        }
        let id = Pca::fit(&data, 6, 6, 10, 0).unwrap();
        assert_eq!(id.project(&data), data);
    }
}
