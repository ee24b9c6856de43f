//! Two pairs of a sampling forward's small kernels as one hand-written kernel each (`[model] layer_kernels`).
//!
//! A decode step at Janus-Pro-1B's shapes is ≈ 550 kernels, most of them tiny: the first lent call's Nsight
//! Compute profile put the residual adds at 52 kernels and 145 µs, the RMSNorms at 49 and 164 µs, and SiLU with
//! the gate product at 48 and 148 µs (docs/GPU.md). A kernel that small costs its launch and its ramp, whatever it
//! computes, so two of them in one saves most of one:
//!
//! - **residual add + RMSNorm**: `s = h + a`, then `RMSNorm(s) · w`, both written. Each layer has two (the
//!   attention's residual with the MLP's norm, and the MLP's residual with the next layer's norm, the last with
//!   the final norm): 48 launches fewer per step.
//! - **SiLU · gate**: `silu(g) ⊙ u`: 24 fewer.
//!
//! Both repeat candle's arithmetic: the sum is rounded as candle's add stores it, the norm is candle's `rmsnorm`
//! kernel (candle-kernels' reduce.cu) with its block size, its summation order and its expressions, and SiLU's
//! value is rounded as candle's `silu` stores it before the product. So on a GPU their values are meant to be
//! candle's own, bit for bit (the first call in a process compares, and a kernel that differs by more than bf16
//! rounding is turned off); [`emulate_add_rms_norm`] and [`emulate_silu_mul`] are that arithmetic on the host.
//! Sampling forwards only (candle's fused kernels, no backward).

#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::Tensor;

use crate::nvrtc::Trust;

/// The residual add + RMSNorm kernel's state (`PAIRUNI_LAYER_KERNELS=off` turns both kernels off).
pub static ADD_NORM: Trust = Trust::new("PAIRUNI_LAYER_KERNELS", "residual add + RMSNorm kernel");

/// The SiLU · gate kernel's state.
pub static SILU_MUL: Trust = Trust::new("PAIRUNI_LAYER_KERNELS", "SiLU · gate kernel");

/// Largest relative difference from candle's ops the first-call check accepts: the kernels are meant to equal
/// them; a wrong index gives order one, a summation order of its own one bf16 rounding (≈ 4e-3) here and there.
const CHECK_TOLERANCE: f32 = 1e-2;

/// CUDA source, after [`crate::nvrtc::BF16_PRELUDE`].
pub const SOURCE: &str = r#"
// One block per row of `cols`, blockDim 32 for rows shorter than 1024 and 1024 otherwise, as candle launches its
// rmsnorm; the loops, the reduction and the expressions are that kernel's, applied to the sum as stored.
template <typename T>
__device__ void add_rms_norm(const T* h, const T* a, const T* w, T* sum, T* out, int cols, float eps) {
    const long base = (long)blockIdx.x * cols;
    const int tid = threadIdx.x, block = blockDim.x;
    float tmp = 0.f;
    for (int c = tid; c < cols; c += block) {
        const float s = rounded(sum, load_val(h, base + c) + load_val(a, base + c));
        store_val(sum, base + c, s);
        tmp += s * s;
    }
    tmp = warp_sum(tmp);
    if (block > 32) {
        __shared__ float s_sum[32];
        if ((tid & 31) == 0) s_sum[tid >> 5] = tmp;
        __syncthreads();
        tmp = s_sum[tid & 31];
        tmp = warp_sum(tmp);
    }
    const float mean = tmp / cols;
    const float scale = rsqrtf(mean + eps);
    for (int c = tid; c < cols; c += block) {
        const float a_c = load_val(w, c);
        store_val(out, base + c, scale * load_val(sum, base + c) * a_c);
    }
}

template <typename T>
__device__ void silu_mul(const T* g, const T* u, T* out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float x = load_val(g, i);
        const float s = rounded(out, x / (1.0f + expf(-x)));
        store_val(out, i, s * load_val(u, i));
    }
}

#define LAYER_KERNELS(SUFFIX, T) \
extern "C" __global__ void add_rms_norm_##SUFFIX(const T* h, const T* a, const T* w, T* sum, T* out, int cols, \
                                                 float eps) { \
    add_rms_norm<T>(h, a, w, sum, out, cols, eps); \
} \
extern "C" __global__ void silu_mul_##SUFFIX(const T* g, const T* u, T* out, long n) { silu_mul<T>(g, u, out, n); }
LAYER_KERNELS(bf16, bf16_t)
LAYER_KERNELS(f32, float)
"#;

/// Threads per block of the add + RMSNorm kernel for rows of `cols`: candle's choice for its rmsnorm.
pub fn norm_block(cols: usize) -> usize {
    if cols < 1024 {
        32
    } else {
        1024
    }
}

fn warp_sum(lanes: &mut [f32; 32]) {
    // The shuffle butterfly: at each distance every lane adds its partner's value from before the round.
    let mut o = 16;
    while o > 0 {
        let before = *lanes;
        for (l, v) in lanes.iter_mut().enumerate() {
            *v += before[l ^ o];
        }
        o >>= 1;
    }
}

/// The add + RMSNorm kernel's arithmetic on the host (f32 rows of `cols`): (sum, normed), with each thread's sum
/// of squares, the butterflies and the per-thread scale as the kernel computes them.
pub fn emulate_add_rms_norm(
    h: &[f32],
    a: &[f32],
    w: &[f32],
    cols: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let block = norm_block(cols);
    let sum: Vec<f32> = h.iter().zip(a).map(|(x, y)| x + y).collect();
    let mut out = vec![0f32; sum.len()];
    for (row, s) in sum.chunks(cols).enumerate() {
        let mut partial = vec![0f32; block];
        for (tid, p) in partial.iter_mut().enumerate() {
            for c in (tid..cols).step_by(block) {
                *p = s[c].mul_add(s[c], *p);
            }
        }
        let mut warps: Vec<[f32; 32]> = partial
            .chunks(32)
            .map(|c| c.try_into().expect("32 lanes"))
            .collect();
        warps.iter_mut().for_each(warp_sum);
        let totals: Vec<[f32; 32]> = if block > 32 {
            // Lane l of every warp reads warp l's lane-0 sum, then all sum again.
            let firsts: [f32; 32] = std::array::from_fn(|l| warps[l][0]);
            let mut second = firsts;
            warp_sum(&mut second);
            vec![second; block / 32]
        } else {
            warps
        };
        for tid in 0..block {
            let scale = 1.0 / (totals[tid / 32][tid % 32] / cols as f32 + eps).sqrt();
            for c in (tid..cols).step_by(block) {
                out[row * cols + c] = scale * s[c] * w[c];
            }
        }
    }
    (sum, out)
}

/// The SiLU · gate kernel's arithmetic on the host (f32).
pub fn emulate_silu_mul(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter()
        .zip(u)
        .map(|(&x, &y)| x / (1.0 + (-x).exp()) * y)
        .collect()
}

/// (h + a, RMSNorm(h + a) · w) with candle's ops: the add, then candle-nn's fused RMSNorm.
fn composed_add_rms_norm(
    h: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let sum = (h + a)?;
    let normed = candle_nn::ops::rms_norm(&sum.contiguous()?, w, eps as f32)?;
    Ok((sum, normed))
}

/// The residual stream after adding `a` to `h` and its RMSNorm with weight `w`, through the kernel on a CUDA
/// device when `kernel` is set and it is trusted (candle's ops otherwise).
pub(crate) fn add_rms_norm(
    h: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f64,
    kernel: bool,
) -> candle_core::Result<(Tensor, Tensor)> {
    let composed = || composed_add_rms_norm(h, a, w, eps);
    if !kernel || !h.device().is_cuda() {
        return composed();
    }
    ADD_NORM.run(
        CHECK_TOLERANCE,
        || crate::nvrtc::capturing(h.device()),
        || launch_add_rms_norm(h, a, w, eps),
        composed,
    )
}

/// `silu(g) ⊙ u`, through the kernel on a CUDA device when `kernel` is set and it is trusted.
pub(crate) fn silu_mul(g: &Tensor, u: &Tensor, kernel: bool) -> candle_core::Result<Tensor> {
    let composed = || g.silu()? * u;
    if !kernel || !g.device().is_cuda() {
        return composed();
    }
    SILU_MUL.run(
        CHECK_TOLERANCE,
        || crate::nvrtc::capturing(g.device()),
        || launch_silu_mul(g, u),
        composed,
    )
}

/// Whether the kernels take these operands: all in one float dtype they have an instantiation for.
#[cfg(feature = "cuda")]
fn kernel_dtype(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    matches!(dtype, DType::BF16 | DType::F32) && ts.iter().all(|t| t.dtype() == dtype)
}

/// The module's PTX, compiled once per process.
#[cfg(feature = "cuda")]
fn ptx() -> candle_core::Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    crate::nvrtc::ptx(&PTX, SOURCE).map_err(candle_core::Error::Msg)
}

/// A fresh CUDA tensor of `shape` in `dtype` from the kernel's output buffer.
#[cfg(feature = "cuda")]
fn wrap<T: candle_core::cuda_backend::CudaDType>(
    slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    dev: &candle_core::cuda_backend::CudaDevice,
    shape: &candle_core::Shape,
) -> Tensor {
    use candle_core::{cuda_backend::CudaStorage, op::BackpropOp, Storage};
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape.clone(), BackpropOp::none(), false)
}

#[cfg(feature = "cuda")]
fn launch_add_rms_norm(
    h: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::Storage;

    let candle_core::Device::Cuda(dev) = h.device() else {
        return Ok(None);
    };
    let cols = w.elem_count();
    let n = h.elem_count();
    if !kernel_dtype(&[h, a, w])
        || a.shape() != h.shape()
        || h.dims().last() != Some(&cols)
        || w.rank() != 1
        || cols == 0
        || cols > i32::MAX as usize
        || n / cols > u32::MAX as usize
    {
        return Ok(None);
    }
    let (h, a, w) = (h.contiguous()?, a.contiguous()?, w.contiguous()?);
    let name = if h.dtype() == DType::BF16 {
        "add_rms_norm_bf16"
    } else {
        "add_rms_norm_f32"
    };
    let func = dev.get_or_load_custom_func(name, "pairuni_layer_kernels", ptx()?)?;
    let cfg = LaunchConfig {
        grid_dim: ((n / cols) as u32, 1, 1),
        block_dim: (norm_block(cols) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (cols_i, eps_f) = (cols as i32, eps as f32);
    macro_rules! run {
        ($t:ty) => {{
            let (hs, hl) = h.storage_and_layout();
            let (as_, al) = a.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (Storage::Cuda(hs), Storage::Cuda(as_), Storage::Cuda(ws)) = (&*hs, &*as_, &*ws) else {
                return Ok(None);
            };
            let hv = hs.as_cuda_slice::<$t>()?.slice(hl.start_offset()..);
            let av = as_.as_cuda_slice::<$t>()?.slice(al.start_offset()..);
            let wv = ws.as_cuda_slice::<$t>()?.slice(wl.start_offset()..);
            // SAFETY: the kernel writes every element of both outputs.
            let (sum, out) = unsafe { (dev.alloc::<$t>(n)?, dev.alloc::<$t>(n)?) };
            let mut builder = func.builder();
            builder.arg(&hv);
            builder.arg(&av);
            builder.arg(&wv);
            builder.arg(&sum);
            builder.arg(&out);
            builder.arg(&cols_i);
            builder.arg(&eps_f);
            // SAFETY: the arguments match the kernel's signature; h and a hold `n` contiguous elements from their
            // offsets and w `cols`, and the outputs `n` each.
            unsafe { builder.launch(cfg) }.map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            (wrap(sum, dev, h.shape()), wrap(out, dev, h.shape()))
        }};
    }
    Ok(Some(match h.dtype() {
        DType::BF16 => run!(half::bf16),
        _ => run!(f32),
    }))
}

#[cfg(feature = "cuda")]
fn launch_silu_mul(g: &Tensor, u: &Tensor) -> candle_core::Result<Option<Tensor>> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::Storage;

    let candle_core::Device::Cuda(dev) = g.device() else {
        return Ok(None);
    };
    let n = g.elem_count();
    if !kernel_dtype(&[g, u]) || u.shape() != g.shape() || n == 0 {
        return Ok(None);
    }
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    let name = if g.dtype() == DType::BF16 {
        "silu_mul_bf16"
    } else {
        "silu_mul_f32"
    };
    let func = dev.get_or_load_custom_func(name, "pairuni_layer_kernels", ptx()?)?;
    const THREADS: usize = 256;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(THREADS).min(1 << 16) as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let len = n as i64;
    macro_rules! run {
        ($t:ty) => {{
            let (gs, gl) = g.storage_and_layout();
            let (us, ul) = u.storage_and_layout();
            let (Storage::Cuda(gs), Storage::Cuda(us)) = (&*gs, &*us) else {
                return Ok(None);
            };
            let gv = gs.as_cuda_slice::<$t>()?.slice(gl.start_offset()..);
            let uv = us.as_cuda_slice::<$t>()?.slice(ul.start_offset()..);
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let mut builder = func.builder();
            builder.arg(&gv);
            builder.arg(&uv);
            builder.arg(&out);
            builder.arg(&len);
            // SAFETY: the arguments match the kernel's signature; g, u and the output hold `n` contiguous
            // elements from their offsets.
            unsafe { builder.launch(cfg) }.map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            wrap(out, dev, g.shape())
        }};
    }
    Ok(Some(match g.dtype() {
        DType::BF16 => run!(half::bf16),
        _ => run!(f32),
    }))
}

#[cfg(not(feature = "cuda"))]
fn launch_add_rms_norm(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: f64,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    Ok(None)
}

#[cfg(not(feature = "cuda"))]
fn launch_silu_mul(_: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn rel(got: &[f32], want: &[f32]) -> f32 {
        let m = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(m > 1e-3, "a reference of zeros proves nothing");
        got.iter()
            .zip(want)
            .fold(0f32, |a, (p, q)| a.max((p - q).abs()))
            / m
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn the_add_norm_kernels_arithmetic_is_candles_add_and_rms_norm() {
        // Rows shorter than a block of 1024 (one warp) and longer (32 warps, two values per thread).
        for (rows, cols) in [(3, 40), (2, 2048)] {
            let vals = crate::layers::test_values;
            let (h, a, w) = (vals(rows * cols, 4), vals(rows * cols, 5), vals(cols, 6));
            let (sum, out) = emulate_add_rms_norm(&h, &a, &w, cols, 1e-6);
            let (cs, cn) = composed_add_rms_norm(
                &tensor(&h, &[rows, 1, cols]),
                &tensor(&a, &[rows, 1, cols]),
                &tensor(&w, &[cols]),
                1e-6,
            )
            .unwrap();
            assert_eq!(sum, flat(&cs), "the sum is the add's, bit for bit");
            assert!(rel(&out, &flat(&cn)) < 1e-6, "{}", rel(&out, &flat(&cn)));
            // A kernel that normed the unsummed input would be far off.
            let (_, wrong) = emulate_add_rms_norm(&h, &vec![0.0; h.len()], &w, cols, 1e-6);
            assert!(rel(&wrong, &flat(&cn)) > 0.1);
        }
    }

    #[test]
    fn the_silu_kernels_arithmetic_is_candles_silu_times_up() {
        let vals = crate::layers::test_values;
        let (g, u) = (vals(300, 7), vals(300, 8));
        let want = (tensor(&g, &[3, 100]).silu().unwrap() * tensor(&u, &[3, 100])).unwrap();
        assert!(rel(&emulate_silu_mul(&g, &u), &flat(&want)) < 1e-6);
    }

    #[test]
    fn off_the_gpu_both_run_candles_ops_and_nothing_is_checked() {
        let vals = crate::layers::test_values;
        let (h, a, w) = (vals(64, 1), vals(64, 2), vals(16, 3));
        let (h, a, w) = (
            tensor(&h, &[4, 16]),
            tensor(&a, &[4, 16]),
            tensor(&w, &[16]),
        );
        let (s, n) = add_rms_norm(&h, &a, &w, 1e-5, true).unwrap();
        let (cs, cn) = composed_add_rms_norm(&h, &a, &w, 1e-5).unwrap();
        assert_eq!(flat(&s), flat(&cs));
        assert_eq!(flat(&n), flat(&cn));
        let act = silu_mul(&h, &a, true).unwrap();
        assert_eq!(flat(&act), flat(&(h.silu().unwrap() * &a).unwrap()));
        assert!(ADD_NORM.needs_check() && SILU_MUL.needs_check());
    }
}
