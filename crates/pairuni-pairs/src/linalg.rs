//! Dense f32 helpers: the one GEMM everything heavy goes through, and row normalisation.

/// `out[i * n + j] = a_i · b_j` for row-major `a` (m × k) and `b` (n × k); `out` is m × n.
///
/// Uses the `gemm` crate (the same kernels candle's CPU backend uses), spread over rayon's threads.
pub fn matmul_abt(a: &[f32], m: usize, b: &[f32], n: usize, k: usize, out: &mut [f32]) {
    assert_eq!(a.len(), m * k, "lhs shape");
    assert_eq!(b.len(), n * k, "rhs shape");
    assert_eq!(out.len(), m * n, "out shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: the asserts above guarantee every strided access stays inside the three slices: lhs is m×k with
    // row stride k, rhs is read as the k×n transpose of b (row stride 1, column stride k), dst is m×n row-major.
    unsafe { gemm_into(out, (m, n, k), (a, 1, k as isize), (b, k as isize, 1)) }
}

/// The `gemm` parallelism for rayon's current pool (serial when it has one thread).
fn gemm_parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}

/// `out = xᵀx` (dim × dim) for row-major `x` (s × dim): the uncentred second-moment matrix of the rows, by GEMM
/// reading `x` in place as both the transposed and the plain operand (no transposed copy).
pub fn gram(x: &[f32], s: usize, dim: usize, out: &mut [f32]) {
    assert_eq!(x.len(), s * dim, "x shape");
    assert_eq!(out.len(), dim * dim, "out shape");
    if dim == 0 {
        return;
    }
    if s == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: the asserts above keep every strided access inside the slices: lhs is xᵀ (dim × s; element (i, t)
    // at t·dim + i, so column stride dim, row stride 1), rhs is x (s × dim; element (t, j) at t·dim + j, column
    // stride 1, row stride dim), dst is dim × dim row-major.
    unsafe {
        gemm_into(
            out,
            (dim, dim, s),
            (x, dim as isize, 1),
            (x, 1, dim as isize),
        )
    }
}

/// `out = lhs · rhs` (m × n, row-major) where each operand is given as (data, column stride, row stride).
///
/// # Safety
/// Every element the strides address for an m × k lhs and a k × n rhs must lie inside its slice, and `out`
/// must hold m × n values.
unsafe fn gemm_into(
    out: &mut [f32],
    (m, n, k): (usize, usize, usize),
    (lhs, lhs_cs, lhs_rs): (&[f32], isize, isize),
    (rhs, rhs_cs, rhs_rs): (&[f32], isize, isize),
) {
    gemm::gemm(
        m,
        n,
        k,
        out.as_mut_ptr(),
        1,
        n as isize,
        false,
        lhs.as_ptr(),
        lhs_cs,
        lhs_rs,
        rhs.as_ptr(),
        rhs_cs,
        rhs_rs,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm_parallelism(),
    );
}

/// Scales every row of the row-major `data` (rows of length `dim`) to unit L2 norm; zero rows stay zero.
pub fn l2_normalize_rows(data: &mut [f32], dim: usize) {
    if dim == 0 {
        return;
    }
    for row in data.chunks_mut(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
}

/// Dot product of two equally long slices.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_naive_products() {
        let (m, n, k) = (7, 5, 13);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
        let b: Vec<f32> = (0..n * k).map(|i| ((i * 17 % 7) as f32) - 3.0).collect();
        let mut out = vec![0.0; m * n];
        matmul_abt(&a, m, &b, n, k, &mut out);
        for i in 0..m {
            for j in 0..n {
                let want = dot(&a[i * k..(i + 1) * k], &b[j * k..(j + 1) * k]);
                assert!(
                    (out[i * n + j] - want).abs() < 1e-3,
                    "({i},{j}) {} vs {want}",
                    out[i * n + j]
                );
            }
        }
    }

    #[test]
    fn gram_matches_naive_products() {
        let (s, dim) = (9, 6);
        let x: Vec<f32> = (0..s * dim).map(|i| ((i * 29 % 13) as f32) - 6.0).collect();
        let mut out = vec![0.0; dim * dim];
        gram(&x, s, dim, &mut out);
        for i in 0..dim {
            for j in 0..dim {
                let want: f32 = (0..s).map(|t| x[t * dim + i] * x[t * dim + j]).sum();
                assert!((out[i * dim + j] - want).abs() < 1e-3, "({i},{j})");
            }
        }
    }

    #[test]
    fn normalised_rows_have_unit_norm() {
        let mut d = vec![3.0, 4.0, 0.0, 0.0, 1.0, 1.0];
        l2_normalize_rows(&mut d, 2);
        assert_eq!(&d[..2], &[0.6, 0.8]);
        assert_eq!(&d[2..4], &[0.0, 0.0]);
        assert!((d[4] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    }
}
