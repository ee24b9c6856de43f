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
//! compares, and a kernel that differs by more than bf16 rounding is turned off), and the tests run their source
//! on the CPU ([`crate::kernel_emulator`]) against candle's ops. Sampling forwards only (candle's fused kernels, no
//! backward).

use candle_core::{DType, Tensor};

use crate::nvrtc::{instantiation, one_kernel_dtype, Trust};

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
    if !crate::nvrtc::runs_kernels(h.device()) {
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
    if !kernel || !crate::nvrtc::runs_kernels(g.device()) {
        return composed();
    }
    SILU_MUL.run(
        CHECK_TOLERANCE,
        || crate::nvrtc::capturing(g.device()),
        || launch_silu_mul(g, u),
        composed,
    )
}

/// What the rotary + cache write kernel is told: sizes and the operands' element strides (each operand is
/// passed from its start offset).
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
    /// Cache strides (row, head, position; both caches have them).
    pub cache: (usize, usize, usize),
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
        let cs = kb.stride();
        Some(Self {
            rows,
            heads,
            kv_heads,
            dim,
            row_strides: [q.stride()[0], k.stride()[0], v.stride()[0]],
            cache: (cs[0], cs[1], cs[2]),
            cache_width: kb.dims()[2],
        })
    }
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
    if !crate::nvrtc::runs_kernels(dev)
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

/// The kernels' module.
pub(crate) static MODULE: crate::nvrtc::Module =
    crate::nvrtc::Module::new("pairuni_layer_kernels", SOURCE);

/// The add + RMSNorm kernel's launch for contiguous `h` and `a` (rows of `w`'s length) and `w`, one dtype: one
/// block per row; its outputs are the sum and the normed sum (as `h`). `None` where it does not apply.
pub fn add_rms_norm_launch<'a>(
    h: &'a Tensor,
    a: &'a Tensor,
    w: &'a Tensor,
    eps: f64,
) -> Option<crate::nvrtc::Launch<'a>> {
    use crate::nvrtc::Arg;
    let cols = w.elem_count();
    let n = h.elem_count();
    if !one_kernel_dtype(&[h, a, w])
        || a.shape() != h.shape()
        || h.dims().last() != Some(&cols)
        || w.rank() != 1
        || cols == 0
        || cols > i32::MAX as usize
        || n / cols > u32::MAX as usize
        || ![h, a, w].iter().all(|t| t.is_contiguous())
    {
        return None;
    }
    let kernel = instantiation(h.dtype(), "add_rms_norm_bf16", "add_rms_norm_f32");
    Some(crate::nvrtc::Launch::linear(
        kernel,
        (n / cols) as u32,
        norm_block(cols) as u32,
        vec![
            Arg::Input(h),
            Arg::Input(a),
            Arg::Input(w),
            Arg::Output(h.dtype(), h.shape().clone()),
            Arg::Output(h.dtype(), h.shape().clone()),
            Arg::I32(cols as i32),
            Arg::F32(eps as f32),
        ],
    ))
}

fn launch_add_rms_norm(
    h: &Tensor,
    a: &Tensor,
    w: &Tensor,
    eps: f64,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    let (h, a, w) = (h.contiguous()?, a.contiguous()?, w.contiguous()?);
    let Some(launch) = add_rms_norm_launch(&h, &a, &w, eps) else {
        return Ok(None);
    };
    Ok(MODULE
        .launch(&launch)?
        .and_then(|out| <[Tensor; 2]>::try_from(out).ok())
        .map(|[sum, normed]| (sum, normed)))
}

/// The SiLU · gate kernel's launch for contiguous `g` and `u` of one shape and dtype: its output is as `g`.
pub fn silu_mul_launch<'a>(g: &'a Tensor, u: &'a Tensor) -> Option<crate::nvrtc::Launch<'a>> {
    use crate::nvrtc::Arg;
    let n = g.elem_count();
    if !one_kernel_dtype(&[g, u])
        || u.shape() != g.shape()
        || n == 0
        || !g.is_contiguous()
        || !u.is_contiguous()
    {
        return None;
    }
    Some(crate::nvrtc::Launch::grid_stride(
        instantiation(g.dtype(), "silu_mul_bf16", "silu_mul_f32"),
        n,
        vec![
            Arg::Input(g),
            Arg::Input(u),
            Arg::Output(g.dtype(), g.shape().clone()),
            Arg::I64(n as i64),
        ],
    ))
}

fn launch_silu_mul(g: &Tensor, u: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    let Some(launch) = silu_mul_launch(&g, &u) else {
        return Ok(None);
    };
    Ok(MODULE.launch(&launch)?.and_then(|mut out| out.pop()))
}

/// The rotary + cache write kernel's launch for `a` (from [`RopeStoreArgs::of`] on these operands) and the
/// column `col` ([1], u32, contiguous): one thread per (row, head slot, i < D/2); its outputs are the rotated
/// queries and keys (shaped as `q` and `k`), and it writes the caches in place.
pub(crate) fn rope_store_launch<'a>(
    a: &RopeStoreArgs,
    (q, k, v): (&'a Tensor, &'a Tensor, &'a Tensor),
    tables: &'a crate::layers::FusedRotaryTables,
    (kb, vb): (&'a Tensor, &'a Tensor),
    col: &'a Tensor,
) -> Option<crate::nvrtc::Launch<'a>> {
    use crate::nvrtc::Arg;
    if col.dtype() != DType::U32 || col.elem_count() != 1 || !col.is_contiguous() {
        return None;
    }
    let n = a.rows * (a.heads + 2 * a.kv_heads) * (a.dim / 2);
    let mut args: Vec<Arg<'a>> = [
        q,
        k,
        v,
        &tables.cos_q,
        &tables.sin_q,
        &tables.cos_k,
        &tables.sin_k,
    ]
    .into_iter()
    .map(Arg::Input)
    .collect();
    args.extend([
        Arg::Output(q.dtype(), q.shape().clone()),
        Arg::Output(k.dtype(), k.shape().clone()),
        Arg::InPlace(kb),
        Arg::InPlace(vb),
        Arg::Input(col),
        Arg::I32(a.cache_width as i32),
    ]);
    args.extend([a.rows, a.heads, a.kv_heads, a.dim].map(|x| Arg::I32(x as i32)));
    args.extend(
        [
            a.row_strides[0],
            a.row_strides[1],
            a.row_strides[2],
            a.cache.0,
            a.cache.1,
            a.cache.2,
        ]
        .map(|x| Arg::I64(x as i64)),
    );
    Some(crate::nvrtc::Launch::grid_stride(
        instantiation(q.dtype(), "rope_store_bf16", "rope_store_f32"),
        n,
        args,
    ))
}

fn launch_rope_store(
    a: &RopeStoreArgs,
    qkv: (&Tensor, &Tensor, &Tensor),
    tables: &crate::layers::FusedRotaryTables,
    caches: (&Tensor, &Tensor),
    col: &Tensor,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    let col = col.contiguous()?;
    let Some(launch) = rope_store_launch(a, qkv, tables, caches, &col) else {
        return Ok(None);
    };
    Ok(MODULE
        .launch(&launch)?
        .and_then(|out| <[Tensor; 2]>::try_from(out).ok())
        .map(|[q, k]| (q, k)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_emulator::emulate;
    use candle_core::Device;

    fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// max|Δ| / max|want|, with a guard against a reference of zeros.
    fn rel(got: &Tensor, want: &Tensor) -> f32 {
        crate::layers::checked_rel_diff(got, want, 1e-3)
    }

    fn values(n: usize, seed: usize, shape: &[usize], dtype: DType) -> Tensor {
        tensor(&crate::layers::test_values(n, seed), shape)
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn the_add_norm_kernel_source_computes_candles_add_and_rms_norm() {
        // Rows shorter than a block of 1024 (one warp) and longer (32 warps, two values per thread).
        for dtype in [DType::F32, DType::BF16] {
            for (rows, cols) in [(3, 40), (2, 2048)] {
                let h = values(rows * cols, 4, &[rows, 1, cols], dtype);
                let a = values(rows * cols, 5, &[rows, 1, cols], dtype);
                let w = values(cols, 6, &[cols], dtype);
                let launch = add_rms_norm_launch(&h, &a, &w, 1e-6).expect("covered");
                let out = emulate(&MODULE, &launch)
                    .unwrap_or_else(|e| panic!("{rows}×{cols} {dtype:?}: {e}"));
                let (cs, cn) = composed_add_rms_norm(&h, &a, &w, 1e-6).unwrap();
                assert_eq!(
                    flat(&out.outputs[0]),
                    flat(&cs),
                    "the sum is the add's, bit for bit"
                );
                let tolerance = if dtype == DType::F32 { 1e-6 } else { 8e-3 };
                let err = rel(&out.outputs[1], &cn);
                assert!(err < tolerance, "{rows}×{cols} {dtype:?}: {err}");
                // A kernel that normed the unsummed input would be far off.
                let zeros = a.zeros_like().unwrap();
                let wrong =
                    emulate(&MODULE, &add_rms_norm_launch(&h, &zeros, &w, 1e-6).unwrap()).unwrap();
                assert!(rel(&wrong.outputs[1], &cn) > 0.1);
            }
        }
    }

    #[test]
    fn the_silu_kernel_source_computes_candles_silu_times_up() {
        for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 8e-3)] {
            let (g, u) = (
                values(700, 7, &[7, 100], dtype),
                values(700, 8, &[7, 100], dtype),
            );
            let out = emulate(&MODULE, &silu_mul_launch(&g, &u).unwrap()).unwrap();
            let want = (g.silu().unwrap() * &u).unwrap();
            let err = rel(&out.outputs[0], &want);
            assert!(err < tolerance, "{dtype:?}: {err}");
        }
    }

    #[test]
    fn the_rope_store_kernel_source_computes_candles_rope_and_scatter() {
        let dev = Device::Cpu;
        for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 8e-3)] {
            let (b, heads, kvh, d, width, col) = (3, 4, 2, 8, 6, 4);
            let t = |n: usize, seed: usize, shape: &[usize]| values(n, seed, shape, dtype);
            // q from a stacked projection's output (an offset and a row stride of its own), k and v from another.
            let stacked_q = t(2 * b * heads * d, 1, &[2, b, heads * d]);
            let q = stacked_q.get(1).unwrap().reshape((b, 1, heads, d)).unwrap();
            let q = q.transpose(1, 2).unwrap();
            let stacked_kv = t(2 * b * kvh * d, 2, &[2, b, kvh * d]);
            let split = |j: usize| {
                let x = stacked_kv.get(j).unwrap().reshape((b, 1, kvh, d)).unwrap();
                x.transpose(1, 2).unwrap()
            };
            let (k, v) = (split(0), split(1));
            // Tables with offsets (rows 1.. of a longer table).
            let table = |seed| {
                t((b + 1) * d / 2, seed, &[b + 1, 1, d / 2])
                    .narrow(0, 1, b)
                    .unwrap()
            };
            let tables = crate::layers::FusedRotaryTables {
                cos_q: table(3),
                sin_q: table(4),
                cos_k: table(5),
                sin_k: table(6),
            };
            assert_ne!(
                q.layout().start_offset(),
                0,
                "the queries start inside their buffer"
            );
            assert_ne!(tables.cos_q.layout().start_offset(), 0, "so does a table");
            // The caches start inside their buffers (candle's scatter takes contiguous caches only), so the
            // writes must land at their offset.
            let cache = |seed| {
                t((b + 1) * kvh * width * d, seed, &[b + 1, kvh, width, d])
                    .narrow(0, 1, b)
                    .unwrap()
            };
            let (kb, vb) = (cache(7), cache(8));
            let args =
                RopeStoreArgs::of((&q, &k, &v), &tables, (&kb, &vb)).expect("the kernel covers it");
            // The kernel writing at column `at`: (q, k, the caches' storage from their offsets).
            let run_at = |at: u32| {
                let col = Tensor::new(&[at], &dev).unwrap();
                let launch =
                    rope_store_launch(&args, (&q, &k, &v), &tables, (&kb, &vb), &col).unwrap();
                let out = emulate(&MODULE, &launch).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
                let [q_out, k_out] = <[Tensor; 2]>::try_from(out.outputs).unwrap();
                let [kb_out, vb_out] = <[Tensor; 2]>::try_from(out.in_place).unwrap();
                (q_out, k_out, kb_out, vb_out)
            };
            let bytes = |x: &Tensor| crate::kernel_emulator::storage_bytes(x).unwrap();
            let (kb0, vb0) = (bytes(&kb), bytes(&vb));
            let (q_out, k_out, kb_out, vb_out) = run_at(col as u32);
            let (q_past, _, kb_past, vb_past) = run_at(width as u32);
            assert_eq!(
                flat(&q_past),
                flat(&q_out),
                "the queries do not depend on the column"
            );
            assert_eq!(
                (bytes(&kb_past), bytes(&vb_past)),
                (kb0, vb0),
                "nothing written past the cache"
            );
            // candle's ops: its rotary kernel and two scatters, into the caches themselves.
            let write_at = Tensor::full(col as u32, (b, kvh, 1, d), &dev).unwrap();
            let col_index = Tensor::new(&[col as u32], &dev).unwrap();
            let want_q =
                rope_store((&q, &k, &v), &tables, (&kb, &vb), &col_index, &write_at).unwrap();
            let want_k = crate::layers::apply_rope_fused(&k, &tables.cos_k, &tables.sin_k).unwrap();
            assert!(rel(&q_out, &want_q) < tolerance, "queries");
            assert!(rel(&k_out, &want_k) < tolerance, "keys");
            let (kb_now, vb_now) = (from_storage(&kb), from_storage(&vb));
            assert!(
                rel(&kb_out, &kb_now) < tolerance,
                "the key cache, written column and all"
            );
            assert_eq!(flat(&vb_out), flat(&vb_now), "the value cache: a copy");
            // A column off by one leaves the written keys elsewhere.
            let (_, _, kb_wrong, _) = run_at(col as u32 - 1);
            assert!(rel(&kb_wrong, &kb_now) > 0.1);
            assert!(ROPE_STORE.needs_check(), "no kernel ran on the CPU");
        }
    }

    /// `x`'s storage from its start offset, 1-D.
    fn from_storage(x: &Tensor) -> Tensor {
        let bytes = crate::kernel_emulator::storage_bytes(x).unwrap();
        crate::kernel_emulator::tensor_from_bytes(&bytes, x.dtype()).unwrap()
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
