//! The backward of a training forward's RMSNorm as one CUDA kernel (`[model] norm_kernel`).
//!
//! [`crate::trained_kernels`] writes the RMSNorm backward out in candle ops: with n = x · r, r = 1/√(mean(x²) + ε)
//! and dn = g ⊙ w, dx = r ⊙ (dn − n ⊙ mean(dn ⊙ n)) and dw = Σ_rows g ⊙ n, all in f32: about 26 tensors and 20
//! passes over an f32 copy of the activations per norm, 49 norms per pass at Janus-Pro-1B's 24 layers. This kernel
//! takes one block per row: it sums x² and dn ⊙ n over the row, writes dx in the activations' dtype and g ⊙ n in
//! f32, which candle then sums over the rows for dw (a fixed order, so runs repeat bit for bit).
//!
//! Like the other kernels it is compiled by NVRTC from a header-free source ([`crate::nvrtc`]); its first call in a
//! process is checked against the composed backward on the same inputs, and a mismatch or a compilation failure
//! turns it off for the process (the composed backward runs instead). The tests run its source on the CPU
//! ([`crate::kernel_emulator`]).

use candle_core::Tensor;

use crate::nvrtc::Trust;

/// Whether the kernel may run, has been checked, or is off (`PAIRUNI_NORM_KERNEL=off` turns it off).
pub static TRUST: Trust = Trust::new("PAIRUNI_NORM_KERNEL", "RMSNorm backward kernel");

/// CUDA source, after [`crate::nvrtc::BF16_PRELUDE`].
pub const SOURCE: &str = r#"
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < nwarps; ++i) t += red[i];
    __syncthreads();
    return t;
}

// One block per row of `cols` values; blockDim.x a multiple of 32.
template <typename T>
__device__ void rms_backward(const T* x, const T* w, const T* g, T* dx, float* gn, int cols, float eps) {
    __shared__ float red[32];
    const long base = (long)blockIdx.x * cols;
    // Unrolled so that each thread has several loads in flight rather than one (the row's reads are
    // latency-bound otherwise).
    float ss = 0.f;
#pragma unroll 4
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = load_val(x, base + c);
        ss += v * v;
    }
    const float r = 1.f / sqrtf(block_sum(ss, red) / cols + eps);
    float dot = 0.f;
#pragma unroll 4
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dot += load_val(g, base + c) * load_val(w, c) * (load_val(x, base + c) * r);
    }
    dot = block_sum(dot, red) / cols;
#pragma unroll 4
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float n = load_val(x, base + c) * r;
        const float gv = load_val(g, base + c);
        store_val(dx, base + c, (gv * load_val(w, c) - n * dot) * r);
        gn[base + c] = gv * n;
    }
}

#define RMS_BACKWARD(NAME, T) \
extern "C" __global__ void NAME(const T* x, const T* w, const T* g, T* dx, float* gn, int cols, float eps) { \
    rms_backward<T>(x, w, g, dx, gn, cols, eps); \
}
RMS_BACKWARD(rms_backward_bf16, bf16_t)
RMS_BACKWARD(rms_backward_f32, float)
"#;

/// The kernel's module.
pub(crate) static MODULE: crate::nvrtc::Module =
    crate::nvrtc::Module::new("pairuni_norm_kernel", SOURCE);

/// The kernel's launch for contiguous `x` (rows × cols), `w` (cols) and `grad` (as `x`) of one dtype, bf16 or
/// f32: one block per row; its outputs are dx (as `x`) and g ⊙ n ([rows, cols], f32). `None` where it does not
/// apply.
pub fn launch_of<'a>(
    x: &'a Tensor,
    w: &'a Tensor,
    grad: &'a Tensor,
    eps: f64,
) -> Option<crate::nvrtc::Launch<'a>> {
    use crate::nvrtc::Arg;
    use candle_core::DType;
    let dtype = x.dtype();
    let cols = w.elem_count();
    let n = x.elem_count();
    if !crate::nvrtc::one_kernel_dtype(&[x, w, grad])
        || cols == 0
        || !n.is_multiple_of(cols)
        || grad.elem_count() != n
        || cols > i32::MAX as usize
        || n / cols > i32::MAX as usize
        || ![x, w, grad].iter().all(|t| t.is_contiguous())
    {
        return None;
    }
    let rows = n / cols;
    let kernel = crate::nvrtc::instantiation(dtype, "rms_backward_bf16", "rms_backward_f32");
    Some(crate::nvrtc::Launch::per_row(
        kernel,
        rows,
        cols,
        vec![
            Arg::Input(x),
            Arg::Input(w),
            Arg::Input(grad),
            Arg::Output(dtype, x.shape().clone()),
            Arg::Output(DType::F32, (rows, cols).into()),
            Arg::I32(cols as i32),
            Arg::F32(eps as f32),
        ],
    ))
}

/// dx and dw of y = RMSNorm(x; w) for the output gradient `grad`, through the kernel: `None` where it does not
/// apply (not a CUDA tensor, another dtype than bf16/f32, or dtypes that differ).
pub(crate) fn backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    if !crate::nvrtc::runs_kernels(x.device()) {
        return Ok(None);
    }
    let (x, w, grad) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
    let Some(launch) = launch_of(&x, &w, &grad, eps) else {
        return Ok(None);
    };
    let Some([dx, gn]) = MODULE
        .launch(&launch)?
        .and_then(|out| <[Tensor; 2]>::try_from(out).ok())
    else {
        return Ok(None);
    };
    let dw = gn.sum(0)?.to_dtype(x.dtype())?.reshape(w.shape())?;
    Ok(Some((dx, dw)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn the_kernel_source_computes_the_composed_backward() {
        // Rows shorter than a warp, between, and long enough for a block's eight warps to loop; both dtypes.
        for (rows, cols, dtype, tolerance) in [
            (6, 40, DType::F32, 1e-5),
            (3, 7, DType::F32, 1e-5),
            (4, 300, DType::F32, 1e-5),
            (2, 2048, DType::F32, 1e-5),
            (4, 300, DType::BF16, 1e-2),
        ] {
            let eps = 1e-6;
            let vals = crate::layers::test_values;
            let cast = |t: Tensor| t.to_dtype(dtype).unwrap();
            let x =
                cast(Tensor::from_vec(vals(rows * cols, 1), (rows, cols), &Device::Cpu).unwrap());
            let w = cast(Tensor::from_vec(vals(cols, 2), cols, &Device::Cpu).unwrap());
            let g =
                cast(Tensor::from_vec(vals(rows * cols, 3), (rows, cols), &Device::Cpu).unwrap());
            // On the CPU the op composes its backward, in f32 from the same (rounded) values: the reference.
            let f32v = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap();
            let (xv, wv) = (f32v(&x), f32v(&w));
            let y = crate::trained_kernels::rms_norm(xv.as_tensor(), wv.as_tensor(), eps, true)
                .unwrap();
            let gf = g.to_dtype(DType::F32).unwrap();
            let grads = (y * &gf).unwrap().sum_all().unwrap().backward().unwrap();
            let launch = launch_of(&x, &w, &g, eps).expect("covered");
            let out = crate::kernel_emulator::emulate(&MODULE, &launch)
                .unwrap_or_else(|e| panic!("{rows}×{cols} {dtype:?}: {e}"));
            let (dx, gn) = (&out.outputs[0], &out.outputs[1]);
            assert_eq!((dx.dtype(), dx.dims()), (dtype, x.dims()));
            let dw = gn.sum(0).unwrap();
            for (got, want) in [
                (dx, grads.get(xv.as_tensor())),
                (&dw, grads.get(wv.as_tensor())),
            ] {
                let err = crate::layers::checked_rel_diff(got, want.unwrap(), 1e-3);
                assert!(err < tolerance, "{rows}×{cols} {dtype:?}: {err}");
            }
        }
        assert!(TRUST.needs_check(), "no kernel ran on the CPU");
    }

    #[test]
    fn cases_the_kernel_does_not_take_are_left_to_candle() {
        let x = Tensor::ones((4, 8), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
        assert!(launch_of(&x, &w, &x, 1e-6).is_some());
        assert!(launch_of(&x.t().unwrap(), &w, &x, 1e-6).is_none());
        assert!(launch_of(&x, &w.to_dtype(DType::BF16).unwrap(), &x, 1e-6).is_none());
        let w3 = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
        assert!(launch_of(&x, &w3, &x, 1e-6).is_none());
        assert!(backward(&x, &w, &x, 1e-6).unwrap().is_none());
    }
}
