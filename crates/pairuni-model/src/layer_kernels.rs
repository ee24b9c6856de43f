//! Groups of a sampling forward's small kernels as one hand-written kernel each (`[model] layer_kernels`).
//!
//! A decode step at Janus-Pro-1B's shapes is ≈ 550 kernels, most of them tiny: the first lent call's Nsight
//! Compute profile put the residual adds at 52 kernels and 145 µs, the RMSNorms at 49 and 164 µs, SiLU with the
//! gate product at 48 and 148 µs, the rotary embeddings at 48 and 125 µs and the cache writes at 48 and 116 µs
//! (docs/GPU.md). A kernel that small costs its launch and its ramp, whatever it computes, so several in one
//! saves most of the others:
//!
//! - **residual add + RMSNorm**: `s = h + a`, then `RMSNorm(s) · w`, both written. Each layer has two (the
//!   attention's residual with the MLP's norm, and the MLP's residual with the next layer's norm, the last with
//!   the final norm): 48 launches fewer per step.
//! - **SiLU · gate**: `silu(g) ⊙ u`: 24 fewer.
//! - **rotary + cache write** (static decode steps, the CUDA-graph form): the queries and keys rotated, the
//!   keys and values written into the cache at the step's column (read on the device): 72 fewer.
//!
//! They repeat candle's arithmetic: the sum is rounded as candle's add stores it, the norm is candle's `rmsnorm`
//! kernel (candle-kernels' reduce.cu) with its block size, its summation order and its expressions, SiLU's value
//! is rounded as candle's `silu` stores it before the product, and the rotation rounds each product and sum as
//! candle's bf16 `rope` does (where the compiler fuses one of candle's products into a multiply-add, the two can
//! differ by one rounding). So on a GPU their values are meant to be candle's own (the first call in a process
//! compares, and a kernel that differs by more than bf16 rounding is turned off); [`emulate_add_rms_norm`],
//! [`emulate_silu_mul`] and [`emulate_rope_store`] are that arithmetic on the host. Sampling forwards only
//! (candle's fused kernels, no backward).

use candle_core::{DType, Tensor};

use crate::nvrtc::Trust;

/// The residual add + RMSNorm kernel's state (`PAIRUNI_LAYER_KERNELS=off` turns all three layer kernels off).
pub static ADD_NORM: Trust = Trust::new("PAIRUNI_LAYER_KERNELS", "residual add + RMSNorm kernel");

/// The SiLU · gate kernel's state.
pub static SILU_MUL: Trust = Trust::new("PAIRUNI_LAYER_KERNELS", "SiLU · gate kernel");

/// The rotary + cache write kernel's state.
pub static ROPE_STORE: Trust = Trust::new("PAIRUNI_LAYER_KERNELS", "rotary + cache write kernel");

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

// A static decode step's rotary embedding of its queries and keys (candle's rope: rotate-half, one table row per
// batch row) with the rotated keys and the values written into the cache at column *col. One thread per (row,
// head slot, i < dim/2): slots [0, heads) are query heads, then kv_heads key heads, then kv_heads value heads.
// Every product and sum is rounded to T as candle's bf16 arithmetic rounds it.
template <typename T>
__device__ void rope_pair(const T* x, const T* cs, const T* sn, int i, int half, float* y1, float* y2) {
    const float x1 = load_val(x, i), x2 = load_val(x, i + half);
    const float c = load_val(cs, i), s = load_val(sn, i);
    *y1 = rounded(x, rounded(x, x1 * c) - rounded(x, x2 * s));
    *y2 = rounded(x, rounded(x, x1 * s) + rounded(x, x2 * c));
}

template <typename T>
__device__ void rope_store(
    const T* q, const T* k, const T* v, const T* cos_q, const T* sin_q, const T* cos_k, const T* sin_k,
    T* q_out, T* k_out, T* kb, T* vb, const unsigned int* col, int cache_width,
    int rows, int heads, int kv_heads, int dim, long q_b, long k_b, long v_b, long c_b, long c_h, long c_w)
{
    const int half = dim / 2, slots = heads + 2 * kv_heads;
    const long n = (long)rows * slots * half;
    // A column past the cache writes nothing (the host checks the step count first; this keeps a miscount from
    // writing outside the buffers).
    const bool in_cache = *col < (unsigned int)cache_width;
    const long at = (long)(*col) * c_w;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const int slot = (int)((idx / half) % slots);
        const long b = idx / ((long)half * slots);
        float y1, y2;
        if (slot < heads) {
            rope_pair(q + b * q_b + (long)slot * dim, cos_q + b * half, sin_q + b * half, i, half, &y1, &y2);
            T* y = q_out + (b * heads + slot) * dim;
            store_val(y, i, y1);
            store_val(y, i + half, y2);
        } else if (slot < heads + kv_heads) {
            const int h = slot - heads;
            rope_pair(k + b * k_b + (long)h * dim, cos_k + b * half, sin_k + b * half, i, half, &y1, &y2);
            T* y = k_out + (b * kv_heads + h) * dim;
            store_val(y, i, y1);
            store_val(y, i + half, y2);
            if (in_cache) {
                T* cached = kb + b * c_b + h * c_h + at;
                store_val(cached, i, y1);
                store_val(cached, i + half, y2);
            }
        } else if (in_cache) {
            const int h = slot - heads - kv_heads;
            const T* x = v + b * v_b + (long)h * dim;
            T* cached = vb + b * c_b + h * c_h + at;
            cached[i] = x[i];
            cached[i + half] = x[i + half];
        }
    }
}

#define LAYER_KERNELS(SUFFIX, T) \
extern "C" __global__ void add_rms_norm_##SUFFIX(const T* h, const T* a, const T* w, T* sum, T* out, int cols, \
                                                 float eps) { \
    add_rms_norm<T>(h, a, w, sum, out, cols, eps); \
} \
extern "C" __global__ void silu_mul_##SUFFIX(const T* g, const T* u, T* out, long n) { silu_mul<T>(g, u, out, n); } \
extern "C" __global__ void rope_store_##SUFFIX( \
    const T* q, const T* k, const T* v, const T* cos_q, const T* sin_q, const T* cos_k, const T* sin_k, \
    T* q_out, T* k_out, T* kb, T* vb, const unsigned int* col, int cache_width, \
    int rows, int heads, int kv_heads, int dim, long q_b, long k_b, long v_b, long c_b, long c_h, long c_w) { \
    rope_store<T>(q, k, v, cos_q, sin_q, cos_k, sin_k, q_out, k_out, kb, vb, col, cache_width, rows, heads, \
                  kv_heads, dim, q_b, k_b, v_b, c_b, c_h, c_w); \
}
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

/// The residual stream after adding `a` to `h` and its RMSNorm with weight `w` (candle's fused one), through the
/// kernel on a CUDA device when it is trusted (candle's ops otherwise).
pub(crate) fn add_rms_norm(
    h: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let composed = || composed_add_rms_norm(h, a, w, eps);
    if !h.device().is_cuda() {
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

/// What the rotary + cache write kernel is told: sizes, and the operands' element strides and start offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopeStoreArgs {
    /// Rows (batch).
    pub rows: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub dim: usize,
    /// Row strides of the queries, keys and values (their heads follow each other, `dim` apart).
    pub row_strides: [usize; 3],
    /// Start offsets of the queries, keys, values, and the four tables (cos q, sin q, cos k, sin k).
    pub offsets: [usize; 7],
    /// Cache strides (row, head, position; both caches have them) and the caches' start offsets.
    pub cache: (usize, usize, usize, usize, usize),
    /// Positions the caches hold: a column at or past it is not written.
    pub cache_width: usize,
}

impl RopeStoreArgs {
    /// The launch for one decode step: q [B, H, 1, D], k and v [B, KVH, 1, D] (heads `D` apart, unit-stride D),
    /// contiguous tables [B, 1, D/2] and the caches [B, KVH, W, D] (unit-stride D, same strides); `None` when the
    /// kernel does not cover the call.
    pub(crate) fn of(
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        tables: &crate::layers::FusedRotaryTables,
        (kb, vb): (&Tensor, &Tensor),
    ) -> Option<Self> {
        let (rows, heads, t, dim) = q.dims4().ok()?;
        let (_, kv_heads, _, _) = k.dims4().ok()?;
        let dtype = q.dtype();
        let same_dtype = [
            k,
            v,
            kb,
            vb,
            &tables.cos_q,
            &tables.sin_q,
            &tables.cos_k,
            &tables.sin_k,
        ]
        .iter()
        .all(|x| x.dtype() == dtype);
        let heads_packed = |x: &Tensor, n: usize| {
            x.dims() == [rows, n, 1, dim] && x.stride()[1] == dim && x.stride()[3] == 1
        };
        let tables_fit = [&tables.cos_q, &tables.sin_q, &tables.cos_k, &tables.sin_k]
            .iter()
            .all(|x| x.dims() == [rows, 1, dim / 2] && x.is_contiguous());
        let cache_fit = kb.rank() == 4
            && kb.dims() == vb.dims()
            && kb.stride() == vb.stride()
            && kb.dims()[..2] == [rows, kv_heads]
            && kb.dims()[3] == dim
            && kb.stride()[3] == 1
            && kb.dims()[2] <= i32::MAX as usize;
        if t != 1
            || dim % 2 != 0
            || dim == 0
            || !same_dtype
            || !matches!(dtype, DType::BF16 | DType::F32)
            || !heads_packed(q, heads)
            || !heads_packed(k, kv_heads)
            || !heads_packed(v, kv_heads)
            || !tables_fit
            || !cache_fit
        {
            return None;
        }
        let off = |x: &Tensor| x.layout().start_offset();
        let cs = kb.stride();
        Some(Self {
            rows,
            heads,
            kv_heads,
            dim,
            row_strides: [q.stride()[0], k.stride()[0], v.stride()[0]],
            offsets: [
                off(q),
                off(k),
                off(v),
                off(&tables.cos_q),
                off(&tables.sin_q),
                off(&tables.cos_k),
                off(&tables.sin_k),
            ],
            cache: (cs[0], cs[1], cs[2], off(kb), off(vb)),
            cache_width: kb.dims()[2],
        })
    }
}

/// The rotary + cache write kernel's arithmetic on the host, over its launch arguments and the operands' whole
/// storage (f32): the rotated queries [B, H, D] and keys [B, KVH, D], contiguous, with the keys and values written
/// into `kb` and `vb` at column `col`.
pub fn emulate_rope_store(
    a: &RopeStoreArgs,
    (q, k, v): (&[f32], &[f32], &[f32]),
    tables: [&[f32]; 4],
    (kb, vb): (&mut [f32], &mut [f32]),
    col: usize,
) -> (Vec<f32>, Vec<f32>) {
    let half = a.dim / 2;
    let mut q_out = vec![0f32; a.rows * a.heads * a.dim];
    let mut k_out = vec![0f32; a.rows * a.kv_heads * a.dim];
    // Table `t` of row b starts at its offset + b · D/2.
    let rotate = |x: &[f32], base: usize, (cos, sin): (usize, usize), b: usize, i: usize| {
        let (c, s) = (
            tables[cos][a.offsets[3 + cos] + b * half + i],
            tables[sin][a.offsets[3 + sin] + b * half + i],
        );
        let (x1, x2) = (x[base + i], x[base + i + half]);
        (x1 * c - x2 * s, x1 * s + x2 * c)
    };
    let (cb, ch, cw, kb_off, vb_off) = a.cache;
    let in_cache = col < a.cache_width;
    for b in 0..a.rows {
        for h in 0..a.heads {
            let base = a.offsets[0] + b * a.row_strides[0] + h * a.dim;
            for i in 0..half {
                let (y1, y2) = rotate(q, base, (0, 1), b, i);
                let at = (b * a.heads + h) * a.dim;
                (q_out[at + i], q_out[at + i + half]) = (y1, y2);
            }
        }
        for h in 0..a.kv_heads {
            let kbase = a.offsets[1] + b * a.row_strides[1] + h * a.dim;
            let vbase = a.offsets[2] + b * a.row_strides[2] + h * a.dim;
            let cache_at = b * cb + h * ch + col * cw;
            for i in 0..half {
                let (y1, y2) = rotate(k, kbase, (2, 3), b, i);
                let at = (b * a.kv_heads + h) * a.dim;
                (k_out[at + i], k_out[at + i + half]) = (y1, y2);
                if in_cache {
                    (kb[kb_off + cache_at + i], kb[kb_off + cache_at + i + half]) = (y1, y2);
                    vb[vb_off + cache_at + i] = v[vbase + i];
                    vb[vb_off + cache_at + i + half] = v[vbase + i + half];
                }
            }
        }
    }
    (q_out, k_out)
}

/// A static decode step's queries rotated, with its keys rotated and written, and its values written, into the
/// caches `kb` and `vb` at the column held (on the device) in `col` [1] (u32); `write_at` is that column broadcast
/// over [B, KVH, 1, D], which candle's scatter takes. q [B, H, 1, D], k and v [B, KVH, 1, D], unrotated.
/// Through one kernel on a CUDA device when it is trusted; candle's rotary kernel and
/// scatters otherwise. Its first call also reads back the columns it wrote and compares all four outputs with
/// candle's rotations and the values; if they differ, candle's values are written and returned instead.
pub(crate) fn rope_store(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    tables: &crate::layers::FusedRotaryTables,
    (kb, vb): (&Tensor, &Tensor),
    col: &Tensor,
    write_at: &Tensor,
) -> candle_core::Result<Tensor> {
    use crate::layers::apply_rope_fused;
    let rotated = || -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            apply_rope_fused(q, &tables.cos_q, &tables.sin_q)?,
            apply_rope_fused(k, &tables.cos_k, &tables.sin_k)?,
        ))
    };
    let store = |k: &Tensor| -> candle_core::Result<()> {
        kb.scatter_set(write_at, k, 2)?;
        vb.scatter_set(write_at, v, 2)
    };
    let composed = || -> candle_core::Result<(Tensor, Tensor)> {
        let (q, k) = rotated()?;
        store(&k)?;
        Ok((q, k))
    };
    let dev = q.device();
    if !dev.is_cuda()
        || !ROPE_STORE.usable()
        || (ROPE_STORE.needs_check() && crate::nvrtc::capturing(dev)?)
    {
        return Ok(composed()?.0);
    }
    let Some(args) = RopeStoreArgs::of((q, k, v), tables, (kb, vb)) else {
        return Ok(composed()?.0);
    };
    let (ours_q, ours_k) = match launch_rope_store(&args, (q, k, v), tables, (kb, vb), col) {
        Ok(Some(out)) => out,
        Ok(None) => return Ok(composed()?.0),
        Err(e) => {
            ROPE_STORE.record(Err(format!("launch: {e}")));
            return Ok(composed()?.0);
        }
    };
    if !ROPE_STORE.needs_check() {
        return Ok(ours_q);
    }
    let [wk, wv] = [kb.index_select(col, 2)?, vb.index_select(col, 2)?];
    let (q_c, k_c) = rotated()?;
    let passed = ROPE_STORE.check(
        &[ours_q.clone(), ours_k, wk, wv],
        &[q_c.clone(), k_c.clone(), k_c.clone(), v.contiguous()?],
        CHECK_TOLERANCE,
    )?;
    if passed {
        return Ok(ours_q);
    }
    store(&k_c)?;
    Ok(q_c)
}

/// Whether the kernels take these operands: all in one float dtype they have an instantiation for.
#[cfg(feature = "cuda")]
fn kernel_dtype(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    matches!(dtype, DType::BF16 | DType::F32) && ts.iter().all(|t| t.dtype() == dtype)
}

/// The kernels' module.
#[cfg(feature = "cuda")]
static MODULE: crate::nvrtc::Module = crate::nvrtc::Module::new("pairuni_layer_kernels", SOURCE);

#[cfg(feature = "cuda")]
fn launch_add_rms_norm(
    h: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    use crate::nvrtc::{wrap, Operand};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};

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
    let func = dev.get_or_load_custom_func(name, MODULE.name(), MODULE.ptx()?)?;
    let cfg = LaunchConfig {
        grid_dim: ((n / cols) as u32, 1, 1),
        block_dim: (norm_block(cols) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (cols_i, eps_f) = (cols as i32, eps as f32);
    macro_rules! run {
        ($t:ty) => {{
            let (ho, ao, wo) = (Operand::of(&h), Operand::of(&a), Operand::of(&w));
            let (Some(hv), Some(av), Some(wv)) = (ho.view::<$t>()?, ao.view::<$t>()?, wo.view::<$t>()?) else {
                return Ok(None);
            };
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
            (wrap(sum, dev, h.shape().clone()), wrap(out, dev, h.shape().clone()))
        }};
    }
    Ok(Some(match h.dtype() {
        DType::BF16 => run!(half::bf16),
        _ => run!(f32),
    }))
}

#[cfg(feature = "cuda")]
fn launch_silu_mul(g: &Tensor, u: &Tensor) -> candle_core::Result<Option<Tensor>> {
    use crate::nvrtc::{wrap, Operand};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};

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
    let func = dev.get_or_load_custom_func(name, MODULE.name(), MODULE.ptx()?)?;
    const THREADS: usize = 256;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(THREADS).min(1 << 16) as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let len = n as i64;
    macro_rules! run {
        ($t:ty) => {{
            let (go, uo) = (Operand::of(&g), Operand::of(&u));
            let (Some(gv), Some(uv)) = (go.view::<$t>()?, uo.view::<$t>()?) else {
                return Ok(None);
            };
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
            wrap(out, dev, g.shape().clone())
        }};
    }
    Ok(Some(match g.dtype() {
        DType::BF16 => run!(half::bf16),
        _ => run!(f32),
    }))
}

#[cfg(feature = "cuda")]
fn launch_rope_store(
    a: &RopeStoreArgs,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    tables: &crate::layers::FusedRotaryTables,
    (kb, vb): (&Tensor, &Tensor),
    col: &Tensor,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    use crate::nvrtc::{wrap, Operand};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};

    let candle_core::Device::Cuda(dev) = q.device() else {
        return Ok(None);
    };
    if col.dtype() != DType::U32 || col.elem_count() != 1 {
        return Ok(None);
    }
    let col = col.contiguous()?;
    let name = if q.dtype() == DType::BF16 {
        "rope_store_bf16"
    } else {
        "rope_store_f32"
    };
    let func = dev.get_or_load_custom_func(name, MODULE.name(), MODULE.ptx()?)?;
    let n = a.rows * (a.heads + 2 * a.kv_heads) * (a.dim / 2);
    const THREADS: usize = 256;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(THREADS).min(1 << 16) as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let cache_width = a.cache_width as i32;
    let ints = [a.rows, a.heads, a.kv_heads, a.dim].map(|x| x as i32);
    let longs = [
        a.row_strides[0],
        a.row_strides[1],
        a.row_strides[2],
        a.cache.0,
        a.cache.1,
        a.cache.2,
    ]
    .map(|x| x as i64);
    let col_operand = Operand::of(&col);
    let Some(col_view) = col_operand.view::<u32>()? else {
        return Ok(None);
    };
    let inputs = [
        q,
        k,
        v,
        &tables.cos_q,
        &tables.sin_q,
        &tables.cos_k,
        &tables.sin_k,
    ];
    macro_rules! run {
        ($t:ty) => {{
            let operands = inputs.map(Operand::of);
            let mut views = Vec::with_capacity(operands.len());
            for o in &operands {
                let Some(view) = o.view::<$t>()? else {
                    return Ok(None);
                };
                views.push(view);
            }
            let (ko, vo) = (Operand::of(kb), Operand::of(vb));
            let (Some(kb_view), Some(vb_view)) = (ko.view::<$t>()?, vo.view::<$t>()?) else {
                return Ok(None);
            };
            // SAFETY: the kernel writes every element of both outputs.
            let (q_out, k_out) = unsafe {
                (
                    dev.alloc::<$t>(a.rows * a.heads * a.dim)?,
                    dev.alloc::<$t>(a.rows * a.kv_heads * a.dim)?,
                )
            };
            let mut builder = func.builder();
            for view in &views {
                builder.arg(view);
            }
            builder.arg(&q_out);
            builder.arg(&k_out);
            builder.arg(&kb_view);
            builder.arg(&vb_view);
            builder.arg(&col_view);
            builder.arg(&cache_width);
            for x in &ints {
                builder.arg(x);
            }
            for x in &longs {
                builder.arg(x);
            }
            // SAFETY: the arguments match the kernel's signature; the strides and offsets come from the operands'
            // layouts (RopeStoreArgs::of), and the column is below the caches' width (the static decode's
            // counter stays within its reserved steps). The caches are written in place, as candle's scatter
            // writes them.
            unsafe { builder.launch(cfg) }.map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            (
                wrap(q_out, dev, q.shape().clone()),
                wrap(k_out, dev, k.shape().clone()),
            )
        }};
    }
    Ok(Some(match q.dtype() {
        DType::BF16 => run!(half::bf16),
        _ => run!(f32),
    }))
}

#[cfg(not(feature = "cuda"))]
fn launch_rope_store(
    _: &RopeStoreArgs,
    _: (&Tensor, &Tensor, &Tensor),
    _: &crate::layers::FusedRotaryTables,
    _: (&Tensor, &Tensor),
    _: &Tensor,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    Ok(None)
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
    fn the_rope_store_kernels_indexing_and_arithmetic_are_candles_rope_and_scatter() {
        let dev = Device::Cpu;
        let (b, heads, kvh, d, width, col) = (3, 4, 2, 8, 6, 4);
        let vals = crate::layers::test_values;
        let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &dev).unwrap();
        // q from a stacked projection's output (an offset and a row stride of its own), k and v from another.
        let stacked_q = t(vals(2 * b * heads * d, 1), &[2, b, heads * d]);
        let q = stacked_q.get(1).unwrap().reshape((b, 1, heads, d)).unwrap();
        let q = q.transpose(1, 2).unwrap();
        let stacked_kv = t(vals(2 * b * kvh * d, 2), &[2, b, kvh * d]);
        let split = |j: usize| {
            let x = stacked_kv.get(j).unwrap().reshape((b, 1, kvh, d)).unwrap();
            x.transpose(1, 2).unwrap()
        };
        let (k, v) = (split(0), split(1));
        // Tables with offsets (rows 1.. of a longer table).
        let table = |seed| {
            t(vals((b + 1) * d / 2, seed), &[b + 1, 1, d / 2])
                .narrow(0, 1, b)
                .unwrap()
        };
        let tables = crate::layers::FusedRotaryTables {
            cos_q: table(3),
            sin_q: table(4),
            cos_k: table(5),
            sin_k: table(6),
        };
        let cache = |seed| t(vals(b * kvh * width * d, seed), &[b, kvh, width, d]);
        let (kb, vb) = (cache(7), cache(8));
        let args =
            RopeStoreArgs::of((&q, &k, &v), &tables, (&kb, &vb)).expect("the kernel covers it");
        assert_ne!(args.offsets[0], 0, "the queries start inside their buffer");
        assert_ne!(args.offsets[3], 0, "so does a table");
        let storage = |x: &Tensor| {
            let (s, _) = x.storage_and_layout();
            match &*s {
                candle_core::Storage::Cpu(c) => c.as_slice::<f32>().unwrap().to_vec(),
                _ => unreachable!("CPU tensors"),
            }
        };
        // The kernel's arithmetic on copies of the caches, writing at column `at`.
        let emulate_at = |at: usize| {
            let (mut kb_host, mut vb_host) = (storage(&kb), storage(&vb));
            let (q_out, k_out) = emulate_rope_store(
                &args,
                (&storage(&q), &storage(&k), &storage(&v)),
                [
                    &storage(&tables.cos_q),
                    &storage(&tables.sin_q),
                    &storage(&tables.cos_k),
                    &storage(&tables.sin_k),
                ],
                (&mut kb_host, &mut vb_host),
                at,
            );
            (q_out, k_out, kb_host, vb_host)
        };
        let (q_out, k_out, kb_host, vb_host) = emulate_at(col);
        let (_, _, kb_wrong, _) = emulate_at(col - 1);
        let (q_past, _, kb_past, vb_past) = emulate_at(width);
        assert_eq!(q_past, q_out, "the queries do not depend on the column");
        assert_eq!(
            (kb_past, vb_past),
            (storage(&kb), storage(&vb)),
            "nothing written past the cache"
        );
        // candle's ops: its rotary kernel and two scatters.
        let write_at = t(vec![col as f32; b * kvh * d], &[b, kvh, 1, d])
            .to_dtype(DType::U32)
            .unwrap();
        let col_index = Tensor::new(&[col as u32], &dev).unwrap();
        let want_q = rope_store((&q, &k, &v), &tables, (&kb, &vb), &col_index, &write_at).unwrap();
        let want_k = crate::layers::apply_rope_fused(&k, &tables.cos_k, &tables.sin_k).unwrap();
        assert!(rel(&q_out, &flat(&want_q)) < 1e-6, "queries");
        assert!(rel(&k_out, &flat(&want_k)) < 1e-6, "keys");
        assert!(
            rel(&kb_host, &flat(&kb)) < 1e-6,
            "the key cache, written column and all"
        );
        assert_eq!(vb_host, flat(&vb), "the value cache: a copy");
        assert!(ROPE_STORE.needs_check(), "no kernel ran on the CPU");
        // A column off by one would leave the written keys elsewhere.
        assert!(rel(&kb_wrong, &flat(&kb)) > 0.1);
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
        let (s, n) = add_rms_norm(&h, &a, &w, 1e-5).unwrap();
        let (cs, cn) = composed_add_rms_norm(&h, &a, &w, 1e-5).unwrap();
        assert_eq!(flat(&s), flat(&cs));
        assert_eq!(flat(&n), flat(&cn));
        let act = silu_mul(&h, &a, true).unwrap();
        assert_eq!(flat(&act), flat(&(h.silu().unwrap() * &a).unwrap()));
        assert!(ADD_NORM.needs_check() && SILU_MUL.needs_check());
    }
}
