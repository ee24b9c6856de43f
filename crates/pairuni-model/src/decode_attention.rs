//! One-query attention over a preallocated cache as one CUDA kernel (the decode steps of both rollouts).
//!
//! candle runs a decode step's attention as six launches per layer: q·kᵀ, a cast to f32, the key mask, softmax,
//! a cast back and p·v. At Janus-Pro shapes on an H200 the four in the middle took 14–17 µs of a layer's
//! ≈ 110 µs, for a few hundred kilobytes of data (the first lent call's Nsight Compute profile, docs/GPU.md).
//! This kernel does the whole of it in one launch: one block per (row, head) keeps the query and the scores in
//! shared memory, takes the softmax in f32 and writes the head's output in the activations' dtype.
//!
//! The kernel is compiled at run time by NVRTC (which candle already loads) from [`SOURCE`], which needs no CUDA
//! header, so the build stays what it was. It cannot run without a GPU, so two things keep a wrong kernel from
//! doing harm: the first call in a process (never inside a graph capture), and the first that reads a static
//! decode's live key count, also compute the attention in f32 with candle's ops on the same inputs and compare,
//! and turn the kernel off for the process (falling back to candle's composition) if they differ beyond bf16
//! rounding; and the tests run the kernel's own source on the CPU ([`crate::kernel_emulator`]) over the launch
//! the GPU would be given, on strided views of a cache.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Widest key range the kernel takes (its scores live in shared memory; 48 KiB holds 8192 f32s and the rest).
pub const MAX_WIDTH: usize = 8192;

/// Threads per block: eight warps (with four keys in flight per warp, enough loads to keep the cache reads near
/// the memory's bandwidth with one block per row and head).
const THREADS: usize = 256;

/// CUDA source of the kernel, after [`crate::nvrtc::BF16_PRELUDE`] (bf16 as raw 16-bit words: no header needed).
pub const SOURCE: &str = r#"
// One block per (row b, head h). Shared memory: the query (dim floats), the scores (width floats) and one
// partial output per warp (nwarps * dim floats). dim = 32 * PL, PL in {1, 2, 4, 8}.
//
// Each warp takes KEYS keys at a time, its lanes across the head dimension. A decode step reads the whole cache,
// so the loop keeps KEYS * PL loads per lane independent of each other's sums (with the bounds known at compile
// time and keys past the end reading the last key instead of branching), which lets them all be in flight at
// once: one load at a time per warp would leave the step bound by memory latency.
#define KEYS 4
template <typename T, int PL>
__device__ void decode_attention(
    const T* q, const T* k, const T* v, const float* mask, const unsigned* live, T* out,
    int heads, int rep, int width, int dim,
    long q_b, long q_h, long k_b, long k_h, long k_w, long v_b, long v_h, long v_w, long m_b,
    long o_b, long o_h)
{
    extern __shared__ float smem[];
    __shared__ float red[32];
    float* qs = smem;
    float* scores = smem + dim;
    float* partial = scores + width;
    // A static decode step gives the keys written so far on the device (`live`): the launch, and so a captured
    // graph, is the same at every step, and only the live keys are read. Shared memory is sized by `width`.
    if (live) width = min(width, max(1, (int)live[0]));
    const int b = blockIdx.x / heads, h = blockIdx.x % heads, kvh = h / rep;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;

    for (int d = tid; d < dim; d += blockDim.x) qs[d] = load_val(q, b * q_b + h * q_h + d);
    __syncthreads();

    // Scores.
    const T* kb = k + b * k_b + kvh * k_h;
    for (int w0 = warp * KEYS; w0 < width; w0 += nwarps * KEYS) {
        float dot[KEYS];
#pragma unroll
        for (int j = 0; j < KEYS; ++j) {
            const long row = (long)min(w0 + j, width - 1) * k_w;
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < PL; ++i) acc += qs[lane + 32 * i] * load_val(kb, row + lane + 32 * i);
            dot[j] = acc;
        }
#pragma unroll
        for (int j = 0; j < KEYS; ++j) {
            const float s = warp_sum(dot[j]);
            if (lane == 0 && w0 + j < width) scores[w0 + j] = s + mask[b * m_b + w0 + j];
        }
    }
    __syncthreads();

    // Softmax in f32.
    float mx = -3.402823466e38f;
    for (int w = tid; w < width; w += blockDim.x) mx = fmaxf(mx, scores[w]);
    mx = warp_max(mx);
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = red[0];
    for (int i = 1; i < nwarps; ++i) mx = fmaxf(mx, red[i]);
    __syncthreads();
    float sum = 0.f;
    for (int w = tid; w < width; w += blockDim.x) {
        const float e = __expf(scores[w] - mx);
        scores[w] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    sum = 0.f;
    for (int i = 0; i < nwarps; ++i) sum += red[i];
    const float inv = 1.f / sum;

    // Output: each warp sums its share of the keys, KEYS at a time as above, each lane dims lane, lane + 32, ...
    // A key past the end weighs 0 (and reads the last key, whose values are finite).
    const T* vb = v + b * v_b + kvh * v_h;
    float acc[PL];
#pragma unroll
    for (int j = 0; j < PL; ++j) acc[j] = 0.f;
    for (int w0 = warp * KEYS; w0 < width; w0 += nwarps * KEYS) {
#pragma unroll
        for (int u = 0; u < KEYS; ++u) {
            const int w = min(w0 + u, width - 1);
            const float p = w0 + u < width ? scores[w] : 0.f;
            const long row = (long)w * v_w;
#pragma unroll
            for (int j = 0; j < PL; ++j) acc[j] += p * load_val(vb, row + lane + 32 * j);
        }
    }
#pragma unroll
    for (int j = 0; j < PL; ++j) partial[warp * dim + lane + 32 * j] = acc[j];
    __syncthreads();
    for (int d = tid; d < dim; d += blockDim.x) {
        float o = 0.f;
        for (int i = 0; i < nwarps; ++i) o += partial[i * dim + d];
        store_val(out, b * o_b + h * o_h + d, o * inv);
    }
}

#define DECODE_ATTENTION(NAME, T, PL) \
extern "C" __global__ void NAME( \
    const T* q, const T* k, const T* v, const float* mask, const unsigned* live, T* out, \
    int heads, int rep, int width, int dim, \
    long q_b, long q_h, long k_b, long k_h, long k_w, long v_b, long v_h, long v_w, long m_b, \
    long o_b, long o_h) { \
    decode_attention<T, PL>(q, k, v, mask, live, out, heads, rep, width, dim, \
                            q_b, q_h, k_b, k_h, k_w, v_b, v_h, v_w, m_b, o_b, o_h); \
}
DECODE_ATTENTION(decode_attention_bf16_1, bf16_t, 1)
DECODE_ATTENTION(decode_attention_bf16_2, bf16_t, 2)
DECODE_ATTENTION(decode_attention_bf16_4, bf16_t, 4)
DECODE_ATTENTION(decode_attention_bf16_8, bf16_t, 8)
DECODE_ATTENTION(decode_attention_f32_1, float, 1)
DECODE_ATTENTION(decode_attention_f32_2, float, 2)
DECODE_ATTENTION(decode_attention_f32_4, float, 4)
DECODE_ATTENTION(decode_attention_f32_8, float, 8)
"#;

/// What the kernel is told about one call: sizes, and every operand's element strides and start offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchArgs {
    /// Rows (batch).
    pub rows: usize,
    /// Query heads.
    pub heads: usize,
    /// Query heads per key/value head.
    pub rep: usize,
    /// Keys attended to.
    pub width: usize,
    /// Head dimension.
    pub dim: usize,
    /// Query strides (row, head) and offset.
    pub q: (usize, usize, usize),
    /// Key strides (row, head, position) and offset.
    pub k: (usize, usize, usize, usize),
    /// Value strides (row, head, position) and offset.
    pub v: (usize, usize, usize, usize),
    /// Mask row stride and offset.
    pub mask: (usize, usize),
}

impl LaunchArgs {
    /// The launch for q [B, H, 1, D], k and v [B, H/rep, W, D] (any strides, unit-stride D) and the additive f32
    /// mask [B, 1, 1, W]; `None` when the kernel does not cover the call (candle's ops then run as before).
    pub fn of(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Option<Self> {
        let (b, heads, t, dim) = q.dims4().ok()?;
        let (kb, kv_heads, width, kd) = k.dims4().ok()?;
        if t != 1
            || kb != b
            || kd != dim
            || v.dims() != k.dims()
            || kv_heads == 0
            || heads % kv_heads != 0
            || !matches!(dim, 32 | 64 | 128 | 256)
            || width == 0
            || width > MAX_WIDTH
            || mask.dtype() != DType::F32
            || mask.dims() != [b, 1, 1, width]
            || !crate::nvrtc::one_kernel_dtype(&[q, k, v])
        {
            return None;
        }
        let (qs, ks, vs, ms) = (q.stride(), k.stride(), v.stride(), mask.stride());
        if qs[3] != 1 || ks[3] != 1 || vs[3] != 1 || ms[3] != 1 {
            return None;
        }
        let offset = |t: &Tensor| t.layout().start_offset();
        Some(Self {
            rows: b,
            heads,
            rep: heads / kv_heads,
            width,
            dim,
            q: (qs[0], qs[1], offset(q)),
            k: (ks[0], ks[1], ks[2], offset(k)),
            v: (vs[0], vs[1], vs[2], offset(v)),
            mask: (ms[0], offset(mask)),
        })
    }
}

/// What the kernel has done in this process.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct KernelReport {
    /// Calls that ran the kernel.
    pub calls: u64,
    /// Relative difference (max|Δ|/max|ref|) from the f32 reference at the first calls (the larger of the two
    /// checked forms'), if one ran.
    pub check_rel_err: Option<f32>,
    /// Why the kernel is off for the process, if it is.
    pub failure: Option<String>,
}

/// The process's report so far.
pub fn report() -> KernelReport {
    state().lock().map(|s| s.report.clone()).unwrap_or_default()
}

/// Largest relative difference from the f32 reference the first-call check accepts: the kernel rounds only its
/// output to bf16 (≈ 4e-3); a wrong index gives order one.
const CHECK_TOLERANCE: f32 = 2e-2;

#[derive(Default)]
struct State {
    /// The first call reading every key of its width has been checked.
    checked: bool,
    /// The first call reading a live count of keys (a static decode step) has been checked: the two read the
    /// cache differently, so each is checked once.
    checked_live: bool,
    report: KernelReport,
}

fn state() -> &'static std::sync::Mutex<State> {
    static STATE: std::sync::OnceLock<std::sync::Mutex<State>> = std::sync::OnceLock::new();
    STATE.get_or_init(Default::default)
}

/// Attention of the one-token queries `q` through the kernel when it covers the call and has not been turned
/// off: Some([B, H, 1, D]); `None` sends the caller to candle's composition, which `composed` computes (the
/// first call runs it too, to check the kernel). `live` ([1] u32 on the device), if given, is how many of the
/// keys have been written: the kernel reads only those, and the mask must already cover the rest (a static
/// decode's unwritten columns), so that the composition computes the same.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    live: Option<&Tensor>,
    composed: impl FnOnce() -> candle_core::Result<Tensor>,
) -> Result<Option<Tensor>> {
    if !crate::nvrtc::runs_kernels(q.device()) || switched_off() {
        return Ok(None);
    }
    let Some(args) = LaunchArgs::of(q, k, v, mask) else {
        return Ok(None);
    };
    // Reading every key is still right (the mask covers the unwritten ones), so a count of another form is
    // dropped rather than refused.
    let live = live.filter(|t| t.dtype() == DType::U32 && t.elem_count() == 1);
    let mut st = state()
        .lock()
        .map_err(|_| crate::error::ModelError::Device("decode attention state poisoned".into()))?;
    if st.report.failure.is_some() {
        return Ok(None);
    }
    let checked = if live.is_some() {
        &mut st.checked_live
    } else {
        &mut st.checked
    };
    if !*checked {
        // The check reads back to the host, which a graph capture cannot hold: wait for an eager call.
        if crate::nvrtc::capturing(q.device())? {
            return Ok(None);
        }
        *checked = true;
        let ours = match launch(&args, q, k, v, mask, live) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "decode attention kernel unavailable; using candle's ops");
                st.report.failure = Some(format!("{e}"));
                return Ok(None);
            }
        };
        let reference = reference_f32(q, k, v, mask, args.rep)?;
        let err = crate::layers::rel_diff(&ours, &reference)?;
        // The larger of the two checks' differences (a NaN turns the kernel off below).
        st.report.check_rel_err = Some(st.report.check_rel_err.map_or(err, |e| e.max(err)));
        if err.is_nan() || err > CHECK_TOLERANCE {
            tracing::warn!(
                rel_err = err,
                "decode attention kernel disagrees with the f32 reference; turned off"
            );
            st.report.failure = Some(format!(
                "first-call check: relative difference {err:.3e} from the f32 reference (tolerance \
                 {CHECK_TOLERANCE:.0e}); {}; launch {args:?}",
                crate::nvrtc::describe_difference(&ours, &reference)?
            ));
            return Ok(Some(composed()?));
        }
        st.report.calls += 1;
        return Ok(Some(ours));
    }
    st.report.calls += 1;
    drop(st);
    Ok(Some(launch(&args, q, k, v, mask, live)?))
}

/// Whether a CUDA call of head size `dim`, `width` keys and `dtype` would run the kernel (unless its first-call
/// check, if not yet made, turns it off): a static decode then attends over its whole capacity and lets the
/// kernel read the live keys, so that one captured graph serves every step.
pub(crate) fn would_serve(dim: usize, width: usize, dtype: DType) -> bool {
    matches!(dim, 32 | 64 | 128 | 256)
        && (1..=MAX_WIDTH).contains(&width)
        && matches!(dtype, DType::BF16 | DType::F32)
        && !switched_off()
        && state().lock().is_ok_and(|s| s.report.failure.is_none())
}

/// `PAIRUNI_ATTENTION_KERNEL=off` turns the kernel off for a process whatever the model says: the device
/// scripts' escape hatch for commands without a flag of their own (a kernel fault takes the whole CUDA context).
fn switched_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("PAIRUNI_ATTENTION_KERNEL").is_ok_and(|v| v == "off"))
}

/// The attention in f32 throughout, rounded to the queries' dtype once: what the kernel computes, up to the order
/// of its sums. (candle's bf16 composition also rounds the scores and the probabilities to bf16, which at large
/// attention logits differs from either by more than the kernel's own rounding.)
fn reference_f32(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, rep: usize) -> Result<Tensor> {
    // The cast makes a contiguous f32 copy of the (possibly strided) cache view.
    let expand = |y: &Tensor| crate::trained_kernels::repeat_kv(&y.to_dtype(DType::F32)?, rep);
    let scores = q
        .to_dtype(DType::F32)?
        .matmul(&expand(k)?.t()?)?
        .broadcast_add(mask)?;
    Ok(candle_nn::ops::softmax_last_dim(&scores)?
        .matmul(&expand(v)?)?
        .to_dtype(q.dtype())?)
}

/// The kernel's module.
pub(crate) static MODULE: crate::nvrtc::Module =
    crate::nvrtc::Module::new("pairuni_decode_attention", SOURCE);

/// The kernel's launch for `a` over these operands: one block per (row, head), the output [B, H, 1, D] contiguous
/// in the queries' dtype; with `live`, only that many keys are read.
pub fn launch_of<'a>(
    a: &LaunchArgs,
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    mask: &'a Tensor,
    live: Option<&'a Tensor>,
) -> crate::nvrtc::Launch<'a> {
    use crate::nvrtc::Arg;
    // One instantiation per dtype and head dimension (32 · 1, 2, 4 or 8): the loops' bounds are compile-time.
    // A fixed name per instantiation: this runs at every eager decode step, so no string is built here.
    let kernel = match (q.dtype(), a.dim) {
        (DType::BF16, 32) => "decode_attention_bf16_1",
        (DType::BF16, 64) => "decode_attention_bf16_2",
        (DType::BF16, 128) => "decode_attention_bf16_4",
        (DType::BF16, _) => "decode_attention_bf16_8",
        (_, 32) => "decode_attention_f32_1",
        (_, 64) => "decode_attention_f32_2",
        (_, 128) => "decode_attention_f32_4",
        _ => "decode_attention_f32_8",
    };
    let mut args = vec![
        Arg::Input(q),
        Arg::Input(k),
        Arg::Input(v),
        Arg::Input(mask),
        live.map_or(Arg::NullInput(DType::U32), Arg::Input),
        Arg::Output(q.dtype(), (a.rows, a.heads, 1, a.dim).into()),
    ];
    args.extend([a.heads, a.rep, a.width, a.dim].map(|x| Arg::I32(x as i32)));
    args.extend(
        [
            a.q.0,
            a.q.1,
            a.k.0,
            a.k.1,
            a.k.2,
            a.v.0,
            a.v.1,
            a.v.2,
            a.mask.0,
            a.heads * a.dim,
            a.dim,
        ]
        .map(|x| Arg::I64(x as i64)),
    );
    crate::nvrtc::Launch {
        kernel,
        grid: ((a.rows * a.heads) as u32, 1, 1),
        block: (THREADS as u32, 1, 1),
        shared_bytes: ((a.dim + a.width + (THREADS / 32) * a.dim) * 4) as u32,
        args,
    }
}

fn launch(
    a: &LaunchArgs,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    live: Option<&Tensor>,
) -> Result<Tensor> {
    match MODULE.launch(&launch_of(a, q, k, v, mask, live))? {
        Some(mut out) => Ok(out.remove(0)),
        None => Err(crate::error::ModelError::Device(
            "decode attention: operands are not on a CUDA device".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn filled(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(crate::layers::test_values(n, seed), shape, &Device::Cpu).unwrap()
    }

    /// candle's composition, as `Attention::attend` runs it (scale already in the queries).
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, rep: usize) -> Tensor {
        let expand =
            |y: &Tensor| crate::trained_kernels::repeat_kv(&y.contiguous().unwrap(), rep).unwrap();
        let s = q
            .matmul(&expand(k).t().unwrap())
            .unwrap()
            .broadcast_add(mask)
            .unwrap();
        candle_nn::ops::softmax_last_dim(&s)
            .unwrap()
            .matmul(&expand(v))
            .unwrap()
    }

    /// A preallocated cache [B, KVH, capacity, D] read up to `width`, grouped heads, a sliced mask buffer with
    /// masked keys, and a query view out of a wider buffer, in `dtype`: every stride and offset is exercised.
    fn strided_case(
        (b, kvh, rep, cap, width, dim): (usize, usize, usize, usize, usize, usize),
        dtype: DType,
    ) -> [Tensor; 6] {
        let cast = |t: Tensor| t.to_dtype(dtype).unwrap();
        let kbuf = cast(filled(&[b, kvh, cap, dim], 1));
        let vbuf = cast(filled(&[b, kvh, cap, dim], 2));
        let qbuf = cast(filled(&[b, kvh * rep, 3, dim], 3).affine(4.0, 0.0).unwrap());
        let mut m = vec![0f32; b * cap];
        for (i, x) in m.iter_mut().enumerate() {
            if i % 5 == 3 {
                *x = -1e30;
            }
        }
        let mbuf = Tensor::from_vec(m, (b, 1, 1, cap), &Device::Cpu).unwrap();
        let (k, v) = (
            kbuf.narrow(2, 0, width).unwrap(),
            vbuf.narrow(2, 0, width).unwrap(),
        );
        let q = qbuf.narrow(2, 1, 1).unwrap();
        let mask = mbuf.narrow(3, 0, width).unwrap();
        [q, k, v, mask, vbuf, kbuf]
    }

    #[test]
    fn the_kernel_source_computes_the_f32_reference_on_strided_cache_views() {
        // Every head size the kernel is instantiated for, widths below, at and across its 4-key steps and its
        // eight warps' 32 keys, both dtypes.
        for (shape, dtype, tolerance) in [
            ((3, 2, 2, 12, 7, 64), DType::F32, 1e-5),
            ((2, 1, 4, 40, 33, 32), DType::F32, 1e-5),
            ((2, 2, 1, 80, 70, 128), DType::F32, 1e-5),
            ((1, 1, 2, 6, 1, 256), DType::F32, 1e-5),
            ((3, 2, 2, 12, 7, 64), DType::BF16, 1e-2),
            ((2, 2, 1, 80, 70, 128), DType::BF16, 1e-2),
        ] {
            let [q, k, v, mask, ..] = strided_case(shape, dtype);
            let args = LaunchArgs::of(&q, &k, &v, &mask).expect("covered");
            assert_eq!((args.rep, args.width), (shape.2, shape.4));
            let launch = launch_of(&args, &q, &k, &v, &mask, None);
            let got = crate::kernel_emulator::emulate(&MODULE, &launch)
                .unwrap_or_else(|e| panic!("{shape:?} {dtype:?}: {e}"));
            let want = reference_f32(&q, &k, &v, &mask, args.rep).unwrap();
            let err = crate::layers::checked_rel_diff(&got.outputs[0], &want, 0.05);
            assert!(err <= tolerance, "{shape:?} {dtype:?}: {err}");
            // candle's composition agrees too (f32 only: its bf16 rounds the scores and probabilities).
            if dtype == DType::F32 {
                let c = composed(&q, &k, &v, &mask, args.rep);
                assert!(crate::layers::rel_diff(&got.outputs[0], &c).unwrap() <= tolerance);
            }
        }
    }

    #[test]
    fn a_masked_key_takes_no_weight_and_a_wrong_head_fails_the_check() {
        let shape = (3, 2, 2, 12, 7, 64);
        let [q, k, v, mask, vbuf, _] = strided_case(shape, DType::F32);
        let args = LaunchArgs::of(&q, &k, &v, &mask).unwrap();
        let run = |v: &Tensor| {
            let out =
                crate::kernel_emulator::emulate(&MODULE, &launch_of(&args, &q, &k, v, &mask, None))
                    .unwrap();
            out.outputs[0]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let got = run(&v);
        // Mask index 3 of row 0 is masked: moving that key's value changes nothing in row 0.
        let moved = vbuf
            .slice_assign(
                &[0..1, 0..shape.1, 3..4, 0..shape.5],
                &Tensor::ones((1, shape.1, 1, shape.5), DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let got2 = run(&moved.narrow(2, 0, shape.4).unwrap());
        let row = shape.1 * shape.2 * shape.5;
        assert_eq!(got[..row], got2[..row]);
        // Moving an unmasked key does change it.
        let moved = vbuf
            .slice_assign(
                &[0..1, 0..shape.1, 2..3, 0..shape.5],
                &Tensor::ones((1, shape.1, 1, shape.5), DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let got3 = run(&moved.narrow(2, 0, shape.4).unwrap());
        assert_ne!(got[..row], got3[..row]);
        // A kernel that read the wrong head would be caught by the first-call check's tolerance.
        let want = reference_f32(&q, &k, &v, &mask, args.rep).unwrap();
        let wrong = Tensor::cat(
            &[want.narrow(1, 1, 3).unwrap(), want.narrow(1, 0, 1).unwrap()],
            1,
        )
        .unwrap();
        assert!(crate::layers::rel_diff(&wrong, &want).unwrap() > CHECK_TOLERANCE);
    }

    #[test]
    fn a_live_count_limits_the_keys_read_to_those_written() {
        // A static decode's launch: the whole capacity as the width, the keys written so far on the device. The
        // columns past the count are left unmasked here, so reading any of them would show.
        for (shape, dtype, tolerance) in [
            ((2, 2, 2, 80, 80, 64), DType::F32, 1e-5),
            ((2, 2, 1, 80, 80, 128), DType::BF16, 1e-2),
        ] {
            let [q, k, v, mask, ..] = strided_case(shape, dtype);
            let args = LaunchArgs::of(&q, &k, &v, &mask).unwrap();
            for live in [1usize, 3, 33, 79, 80] {
                let count = Tensor::new(&[live as u32], &Device::Cpu).unwrap();
                let launch = launch_of(&args, &q, &k, &v, &mask, Some(&count));
                let got = crate::kernel_emulator::emulate(&MODULE, &launch).unwrap();
                let first = |t: &Tensor, dim| t.narrow(dim, 0, live).unwrap();
                let want =
                    reference_f32(&q, &first(&k, 2), &first(&v, 2), &first(&mask, 3), args.rep)
                        .unwrap();
                let err = crate::layers::checked_rel_diff(&got.outputs[0], &want, 0.05);
                assert!(err <= tolerance, "{shape:?} {dtype:?} live {live}: {err}");
                // Where most keys go unread, reading them would change the output far beyond the tolerance.
                if 2 * live < shape.4 {
                    let all = reference_f32(&q, &k, &v, &mask, args.rep).unwrap();
                    let seen = crate::layers::rel_diff(&got.outputs[0], &all).unwrap();
                    assert!(
                        seen > 10.0 * tolerance,
                        "live {live}: the unread keys matter"
                    );
                }
            }
        }
    }

    #[test]
    fn calls_outside_the_kernel_are_left_to_candle() {
        let q = filled(&[2, 2, 1, 64], 0);
        let k = filled(&[2, 2, 5, 64], 1);
        let mask = Tensor::zeros((2, 1, 1, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(LaunchArgs::of(&q, &k, &k, &mask).is_some());
        // Two query positions, an odd head size, a mask of the wrong dtype, a transposed head dimension.
        let q2 = filled(&[2, 2, 2, 64], 0);
        assert!(LaunchArgs::of(&q2, &k, &k, &mask).is_none());
        let odd = filled(&[2, 2, 1, 48], 0);
        let kodd = filled(&[2, 2, 5, 48], 0);
        assert!(LaunchArgs::of(&odd, &kodd, &kodd, &mask).is_none());
        let mask16 = mask.to_dtype(DType::BF16).unwrap();
        assert!(LaunchArgs::of(&q, &k, &k, &mask16).is_none());
        let kt = filled(&[2, 2, 64, 5], 1).transpose(2, 3).unwrap();
        assert!(LaunchArgs::of(&q, &kt, &kt, &mask).is_none());
        // On the CPU the caller's composition runs and the kernel is never tried.
        let out = attend(&q, &k, &k, &mask, None, || {
            unreachable!("not asked for on the CPU")
        })
        .unwrap();
        assert!(out.is_none());
    }
}
