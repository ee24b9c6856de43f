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
//! turns it off for the process (the composed backward runs instead). [`emulate`] is its arithmetic on the host.

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

/// The kernel's arithmetic on the host for `rows` rows of `cols` values (f32): (dx, g ⊙ n).
pub fn emulate(x: &[f32], w: &[f32], g: &[f32], cols: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let (mut dx, mut gn) = (vec![0f32; x.len()], vec![0f32; x.len()]);
    for (row, (xr, gr)) in x.chunks(cols).zip(g.chunks(cols)).enumerate() {
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let r = 1.0 / (ss / cols as f32 + eps).sqrt();
        let dot: f32 = (0..cols).map(|c| gr[c] * w[c] * (xr[c] * r)).sum::<f32>() / cols as f32;
        for c in 0..cols {
            let n = xr[c] * r;
            dx[row * cols + c] = (gr[c] * w[c] - n * dot) * r;
            gn[row * cols + c] = gr[c] * n;
        }
    }
    (dx, gn)
}

/// dx and dw of y = RMSNorm(x; w) for the output gradient `grad`, through the kernel: `None` where it does not
/// apply (not a CUDA tensor, another dtype than bf16/f32, or dtypes that differ).
#[cfg(feature = "cuda")]
pub(crate) fn backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    use crate::nvrtc::{wrap, Operand};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::DType;

    let candle_core::Device::Cuda(dev) = x.device() else {
        return Ok(None);
    };
    let dtype = x.dtype();
    if !matches!(dtype, DType::BF16 | DType::F32) || w.dtype() != dtype || grad.dtype() != dtype {
        return Ok(None);
    }
    let cols = w.elem_count();
    let n = x.elem_count();
    if cols == 0 || !n.is_multiple_of(cols) || grad.elem_count() != n || cols > i32::MAX as usize {
        return Ok(None);
    }
    let rows = n / cols;
    let (x, w, grad) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
    let name = if dtype == DType::BF16 {
        "rms_backward_bf16"
    } else {
        "rms_backward_f32"
    };
    static MODULE: crate::nvrtc::Module = crate::nvrtc::Module::new("pairuni_norm_kernel", SOURCE);
    let func = dev.get_or_load_custom_func(name, MODULE.name(), MODULE.ptx()?)?;
    let threads = cols.div_ceil(32).clamp(1, 8) as u32 * 32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let (cols_i, eps_f) = (cols as i32, eps as f32);
    // SAFETY: the kernel writes every element of both outputs.
    let gn = unsafe { dev.alloc::<f32>(n)? };
    macro_rules! run {
        ($t:ty) => {{
            let (xo, wo, go) = (Operand::of(&x), Operand::of(&w), Operand::of(&grad));
            let (Some(xv), Some(wv), Some(gv)) = (xo.view::<$t>()?, wo.view::<$t>()?, go.view::<$t>()?) else {
                return Ok(None);
            };
            // SAFETY: the kernel writes every element.
            let dx = unsafe { dev.alloc::<$t>(n)? };
            let mut builder = func.builder();
            builder.arg(&xv);
            builder.arg(&wv);
            builder.arg(&gv);
            builder.arg(&dx);
            builder.arg(&gn);
            builder.arg(&cols_i);
            builder.arg(&eps_f);
            // SAFETY: the arguments match the kernel's signature; x, w and grad are contiguous with `n`, `cols`
            // and `n` elements from their offsets, and the outputs hold `n` elements each.
            unsafe { builder.launch(cfg) }.map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            wrap(dx, dev, x.shape().clone())
        }};
    }
    let dx = match dtype {
        DType::BF16 => run!(half::bf16),
        _ => run!(f32),
    };
    let gn = wrap(gn, dev, (rows, cols));
    let dw = gn.sum(0)?.to_dtype(dtype)?.reshape(w.shape())?;
    Ok(Some((dx, dw)))
}

/// A CPU build has no kernel.
#[cfg(not(feature = "cuda"))]
pub(crate) fn backward(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: f64,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_kernels_arithmetic_is_the_composed_backward() {
        let (rows, cols, eps) = (6, 40, 1e-6);
        let vals = crate::layers::test_values;
        let (x, w, g) = (vals(rows * cols, 1), vals(cols, 2), vals(rows * cols, 3));
        let xv = Var::from_vec(x.clone(), (rows, cols), &Device::Cpu).unwrap();
        let wv = Var::from_vec(w.clone(), cols, &Device::Cpu).unwrap();
        let gt = Tensor::from_vec(g.clone(), (rows, cols), &Device::Cpu).unwrap();
        let y =
            crate::trained_kernels::rms_norm(xv.as_tensor(), wv.as_tensor(), eps, true).unwrap();
        // On the CPU the op composes its backward: the reference.
        let grads = (y * &gt).unwrap().sum_all().unwrap().backward().unwrap();
        let (dx, gn) = emulate(&x, &w, &g, cols, eps as f32);
        let dw: Vec<f32> = (0..cols)
            .map(|c| (0..rows).map(|r| gn[r * cols + c]).sum())
            .collect();
        let close = |got: &[f32], want: &Tensor| {
            let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let m = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!(m > 1e-3, "a reference of zeros proves nothing");
            let d = got
                .iter()
                .zip(&want)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(d / m < 1e-5, "{}", d / m);
        };
        close(&dx, grads.get(xv.as_tensor()).unwrap());
        close(&dw, grads.get(wv.as_tensor()).unwrap());
        assert!(TRUST.needs_check(), "no kernel ran on the CPU");
    }
}
