//! Two backwards of a training forward's layer as one CUDA kernel each (`[model] backward_kernels`).
//!
//! With [`crate::trained_kernels`] a layer's backward on a GPU is about 54 launches, and two pieces of it are
//! elementwise or row-wise work spread over many small kernels:
//!
//! - **SiLU · gate**: y = silu(g) ⊙ u went through candle's autograd as a multiplication and a SiLU, whose backward
//!   is eight ops (σ from a negation, an exponential, an addition and a reciprocal, then the derivative's products
//!   and sums) and the multiplication's two: ten launches, each a pass over the MLP's widest activations. One
//!   kernel reads g, u and the output gradient once and writes du = dy ⊙ silu(g) and
//!   dg = dy ⊙ u ⊙ σ(g) (1 + g (1 − σ(g))).
//! - **the attention's softmax**: ds = p ⊙ (dp − Σ dp ⊙ p) over each row of scores was six ops (a cast of dp to
//!   f32, a product, a row sum, a subtraction, a product, a cast back), each a pass over the [B, heads, T, keys]
//!   scores (≈ 80 MB per layer in f32 for a packed row of 1,112 tokens). One kernel per row reads dp and p once
//!   and writes ds in the queries' dtype.
//!
//! Like the other kernels they are compiled by NVRTC from header-free sources ([`crate::nvrtc`]); the first call
//! of each in a process is checked against the composed backward on the same inputs and a mismatch turns it off
//! (the composed backward runs instead). The tests run their sources on the CPU ([`crate::kernel_emulator`]).

use candle_core::{DType, Tensor};

use crate::nvrtc::{instantiation, one_kernel_dtype, Arg, Launch, Trust};

/// The SiLU · gate backward kernel's state (`PAIRUNI_BACKWARD_KERNELS=off` turns both kernels off).
pub static SILU_MUL: Trust = Trust::new("PAIRUNI_BACKWARD_KERNELS", "SiLU · gate backward kernel");

/// The softmax backward kernel's state.
pub static SOFTMAX: Trust = Trust::new("PAIRUNI_BACKWARD_KERNELS", "softmax backward kernel");

/// Largest relative difference from the composed backward that the first-call check accepts: bf16 outputs differ
/// by their rounding (the kernels compute in f32 and round once), a wrong index or formula by order one.
pub const CHECK_TOLERANCE: f32 = 2e-2;

/// CUDA source, after [`crate::nvrtc::BF16_PRELUDE`].
pub const SOURCE: &str = r#"
// Elementwise over n values (a grid-stride loop): du = dy * silu(g), dg = dy * u * sigma(g) * (1 + g * (1 - sigma(g))).
template <typename T>
__device__ void silu_mul_backward(const T* g, const T* u, const T* dy, T* dg, T* du, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float x = load_val(g, i), up = load_val(u, i), d = load_val(dy, i);
        const float sig = 1.f / (1.f + expf(-x));
        store_val(du, i, d * (x * sig));
        store_val(dg, i, d * up * sig * (1.f + x * (1.f - sig)));
    }
}

// One block per row of `cols` scores (blockDim.x a whole number of warps): ds = p * (dp - sum(dp * p)).
template <typename T>
__device__ void softmax_backward(const T* dp, const float* p, T* ds, int cols) {
    __shared__ float red[32];
    const long base = (long)blockIdx.x * cols;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float dot = 0.f;
#pragma unroll 4
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dot += load_val(dp, base + c) * p[base + c];
    dot = warp_sum(dot);
    if (lane == 0) red[warp] = dot;
    __syncthreads();
    dot = 0.f;
    for (int w = 0; w < warps; ++w) dot += red[w];
#pragma unroll 4
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        store_val(ds, base + c, p[base + c] * (load_val(dp, base + c) - dot));
    }
}

#define BACKWARD_KERNELS(SUFFIX, T)                                                                               \
extern "C" __global__ void silu_mul_backward_##SUFFIX(const T* g, const T* u, const T* dy, T* dg, T* du, long n) { \
    silu_mul_backward<T>(g, u, dy, dg, du, n);                                                                  \
}                                                                                                               \
extern "C" __global__ void softmax_backward_##SUFFIX(const T* dp, const float* p, T* ds, int cols) {            \
    softmax_backward<T>(dp, p, ds, cols);                                                                       \
}
BACKWARD_KERNELS(bf16, bf16_t)
BACKWARD_KERNELS(f32, float)
"#;

/// The kernels' module.
pub(crate) static MODULE: crate::nvrtc::Module =
    crate::nvrtc::Module::new("pairuni_backward_kernels", SOURCE);

/// The SiLU · gate backward's launch for contiguous `g`, `u` and `dy` of one shape and dtype (bf16 or f32): its
/// outputs are dg and du (as `g`). `None` where it does not apply.
pub fn silu_mul_launch<'a>(g: &'a Tensor, u: &'a Tensor, dy: &'a Tensor) -> Option<Launch<'a>> {
    let n = g.elem_count();
    if !one_kernel_dtype(&[g, u, dy])
        || u.shape() != g.shape()
        || dy.shape() != g.shape()
        || n == 0
        || ![g, u, dy].iter().all(|t| t.is_contiguous())
    {
        return None;
    }
    Some(Launch::grid_stride(
        instantiation(g.dtype(), "silu_mul_backward_bf16", "silu_mul_backward_f32"),
        n,
        vec![
            Arg::Input(g),
            Arg::Input(u),
            Arg::Input(dy),
            Arg::Output(g.dtype(), g.shape().clone()),
            Arg::Output(g.dtype(), g.shape().clone()),
            Arg::I64(n as i64),
        ],
    ))
}

/// The softmax backward's launch for contiguous `dp` (bf16 or f32) and probabilities `p` (f32) of one shape, rows
/// along the last dimension: one block per row; its output is ds (as `dp`). `None` where it does not apply.
pub fn softmax_launch<'a>(dp: &'a Tensor, p: &'a Tensor) -> Option<Launch<'a>> {
    let cols = dp.dims().last().copied().unwrap_or(0);
    let n = dp.elem_count();
    if !matches!(dp.dtype(), DType::BF16 | DType::F32)
        || p.dtype() != DType::F32
        || p.shape() != dp.shape()
        || cols == 0
        || cols > i32::MAX as usize
        || n / cols > u32::MAX as usize
        || !dp.is_contiguous()
        || !p.is_contiguous()
    {
        return None;
    }
    Some(Launch::per_row(
        instantiation(dp.dtype(), "softmax_backward_bf16", "softmax_backward_f32"),
        n / cols,
        cols,
        vec![
            Arg::Input(dp),
            Arg::Input(p),
            Arg::Output(dp.dtype(), dp.shape().clone()),
            Arg::I32(cols as i32),
        ],
    ))
}

/// The composed SiLU · gate backward: (dg, du) of y = silu(g) ⊙ u for the output gradient `dy`, in the inputs'
/// dtype as candle's own backward computes it.
pub(crate) fn silu_mul_composed(
    g: &Tensor,
    u: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let sig = (g.neg()?.exp()? + 1.0)?.recip()?;
    let du = (dy * (g * &sig)?)?;
    let slope = ((g * (1.0 - &sig)?)? + 1.0)?;
    let dg = ((dy * u)? * (sig * slope)?)?;
    Ok((dg, du))
}

/// (dg, du) of y = silu(g) ⊙ u for `dy`, through the kernel on a CUDA device when `kernel` is set and it is trusted
/// (its first call checked against [`silu_mul_composed`]), else composed.
pub(crate) fn silu_mul_backward(
    g: &Tensor,
    u: &Tensor,
    dy: &Tensor,
    kernel: bool,
) -> candle_core::Result<(Tensor, Tensor)> {
    let composed = || silu_mul_composed(g, u, dy);
    if !kernel || !crate::nvrtc::runs_kernels(g.device()) {
        return composed();
    }
    SILU_MUL.run(
        CHECK_TOLERANCE,
        // Training is never captured.
        || Ok(false),
        || {
            let (g, u, dy) = (g.contiguous()?, u.contiguous()?, dy.contiguous()?);
            let Some(l) = silu_mul_launch(&g, &u, &dy) else {
                return Ok(None);
            };
            Ok(MODULE
                .launch(&l)?
                .and_then(|out| <[Tensor; 2]>::try_from(out).ok())
                .map(|[dg, du]| (dg, du)))
        },
        composed,
    )
}

/// The composed softmax backward: ds = p ⊙ (dp − Σ dp ⊙ p) over the last dimension in f32, in `dtype`.
pub(crate) fn softmax_composed(
    dp: &Tensor,
    p: &Tensor,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let dp = dp.to_dtype(DType::F32)?;
    let dot = (&dp * p)?.sum_keepdim(candle_core::D::Minus1)?;
    dp.broadcast_sub(&dot)?.mul(p)?.to_dtype(dtype)
}

/// ds for the probabilities `p` (f32) and their gradient `dp`, in `dp`'s dtype, through the kernel on a CUDA device
/// when `kernel` is set and it is trusted (its first call checked against [`softmax_composed`]), else composed.
pub(crate) fn softmax_backward(
    dp: &Tensor,
    p: &Tensor,
    kernel: bool,
) -> candle_core::Result<Tensor> {
    let composed = || softmax_composed(dp, p, dp.dtype());
    if !kernel || !crate::nvrtc::runs_kernels(dp.device()) {
        return composed();
    }
    SOFTMAX.run(
        CHECK_TOLERANCE,
        || Ok(false),
        || {
            let (dp, p) = (dp.contiguous()?, p.contiguous()?);
            let Some(l) = softmax_launch(&dp, &p) else {
                return Ok(None);
            };
            Ok(MODULE.launch(&l)?.and_then(|mut out| out.pop()))
        },
        composed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_emulator::emulate;
    use candle_core::Device;

    fn values(n: usize, seed: usize, shape: &[usize], dtype: DType) -> Tensor {
        Tensor::from_vec(crate::layers::test_values(n, seed), shape, &Device::Cpu)
            .unwrap()
            .affine(3.0, 0.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        crate::layers::checked_rel_diff(a, b, 1e-3)
    }

    /// The gradients candle's autograd takes through silu(g) ⊙ u, for a loss Σ dy ⊙ y.
    fn autograd_silu_mul(g: &Tensor, u: &Tensor, dy: &Tensor) -> (Tensor, Tensor) {
        let (gv, uv) = (
            candle_core::Var::from_tensor(g).unwrap(),
            candle_core::Var::from_tensor(u).unwrap(),
        );
        let y = (gv.as_tensor().silu().unwrap() * uv.as_tensor()).unwrap();
        let grads = (y * dy).unwrap().sum_all().unwrap().backward().unwrap();
        (
            grads.get(gv.as_tensor()).unwrap().clone(),
            grads.get(uv.as_tensor()).unwrap().clone(),
        )
    }

    #[test]
    fn the_composed_silu_mul_backward_is_autograds() {
        let shape = [3, 5, 40];
        let (g, u, dy) = (
            values(600, 1, &shape, DType::F32),
            values(600, 2, &shape, DType::F32),
            values(600, 3, &shape, DType::F32),
        );
        let (dg, du) = silu_mul_composed(&g, &u, &dy).unwrap();
        let (want_g, want_u) = autograd_silu_mul(&g, &u, &dy);
        assert!(rel(&dg, &want_g) < 1e-6, "{}", rel(&dg, &want_g));
        assert!(rel(&du, &want_u) < 1e-6);
    }

    #[test]
    fn the_silu_mul_backward_kernel_source_computes_autograds_gradients() {
        let shape = [3, 5, 70];
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let (g, u, dy) = (
                values(1050, 4, &shape, dtype),
                values(1050, 5, &shape, dtype),
                values(1050, 6, &shape, dtype),
            );
            let out = emulate(&MODULE, &silu_mul_launch(&g, &u, &dy).unwrap()).unwrap();
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let (want_g, want_u) = autograd_silu_mul(&f32(&g), &f32(&u), &f32(&dy));
            let (eg, eu) = (rel(&out.outputs[0], &want_g), rel(&out.outputs[1], &want_u));
            assert!(
                eg < tolerance && eu < tolerance,
                "{dtype:?}: dg {eg}, du {eu}"
            );
            // A kernel that swapped g and u would be far off.
            let swapped = emulate(&MODULE, &silu_mul_launch(&u, &g, &dy).unwrap()).unwrap();
            assert!(rel(&swapped.outputs[0], &want_g) > 0.1);
        }
    }

    /// Probabilities [rows, cols] (f32): softmax of test values.
    fn probs(shape: &[usize], seed: usize) -> Tensor {
        let n = shape.iter().product();
        candle_nn::ops::softmax_last_dim(&values(n, seed, shape, DType::F32)).unwrap()
    }

    #[test]
    fn the_softmax_backward_kernel_source_computes_the_composition() {
        // Rows shorter than a warp, longer than the block, and not a whole number of either.
        for shape in [[2usize, 3, 7], [2, 2, 300], [1, 4, 1112]] {
            let n: usize = shape.iter().product();
            let p = probs(&shape, 7);
            for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
                let dp = values(n, 8, &shape, dtype);
                let out = emulate(&MODULE, &softmax_launch(&dp, &p).unwrap()).unwrap();
                let want =
                    softmax_composed(&dp.to_dtype(DType::F32).unwrap(), &p, DType::F32).unwrap();
                let err = rel(&out.outputs[0], &want);
                assert!(err < tolerance, "{shape:?} {dtype:?}: {err}");
                // Without the row's sum the result is far off.
                let plain = (dp.to_dtype(DType::F32).unwrap() * &p).unwrap();
                assert!(rel(&plain, &want) > 0.05);
            }
        }
    }

    #[test]
    fn launches_the_kernels_cannot_serve_are_refused() {
        let a = values(12, 1, &[3, 4], DType::F32);
        let b = values(12, 2, &[4, 3], DType::F32);
        assert!(silu_mul_launch(&a, &a, &a).is_some());
        assert!(silu_mul_launch(&a, &b, &a).is_none(), "shapes differ");
        assert!(silu_mul_launch(&a, &a.to_dtype(DType::BF16).unwrap(), &a).is_none());
        assert!(
            silu_mul_launch(&b.t().unwrap(), &a, &a).is_none(),
            "strided"
        );
        let p = probs(&[3, 4], 3);
        assert!(softmax_launch(&a, &p).is_some());
        assert!(softmax_launch(&a, &p.to_dtype(DType::BF16).unwrap()).is_none());
        assert!(
            softmax_launch(&b, &probs(&[3, 4], 3).t().unwrap()).is_none(),
            "strided"
        );
    }
}
