//! A decode step's Gumbel-max draw as one CUDA kernel: the CFG mix (or the banned-token bias), the tempered
//! scores, the top-p nucleus when asked for, the noise, the argmax and the drawn class's log-prob (`[model]
//! draw_kernel`).
//!
//! With candle's ops a device draw is about 15 small kernels (casts, the mix, the scale, the noise added, the
//! argmax, a five-op log-softmax and a gather), and its noise is drawn by cuRAND and turned into Gumbel noise by
//! five more, each step. cuRAND keeps its offset on the host, so a captured step cannot draw its own noise: the
//! static decode fills a noise buffer outside the graph before every step ([`crate::janus`]). This kernel makes
//! its noise itself from a counter: the uniform of class `i` in row `r` at step `s` is SplitMix64's output at
//! position `(s · rows + r) · classes + i` of the stream seeded per rollout, and the step is read from the static
//! decode's device counter, so a captured step replays with new noise every time and nothing runs between the
//! graphs. One launch per step replaces about twenty.
//!
//! The noise differs from cuRAND's, so the kernel's draws are not candle's draws; they are draws from the same
//! distribution. For its check the kernel also takes the noise as an input: the first call in a process (never
//! inside a capture) runs it on cuRAND's noise and candle's ops on the same noise, and the codes must be equal and
//! the log-probs within f32 rounding, or the kernel is off for the process ([`draw`]). Its f32 operations are
//! candle's, in candle's order and each rounded (no fused multiply-add), so that equal codes are what a correct
//! kernel gives. The tests run the source on the CPU ([`crate::kernel_emulator`]): against candle's ops on given
//! noise, and the counter's noise against the tempered softmax by frequency.
//!
//! With top-p < 1 a sampled draw keeps to the nucleus the host sampler defines, found in the block by bisection
//! over the scores' order-preserving keys (`nucleus` in the source; docs/GPU.md item 22). Candle has no op for a
//! nucleus, so there the composed draw, and the check's reference, is the host's rule on the same scores and
//! noise ([`crate::sampling::device_cfg_draw_with`]).

use candle_core::{DType, Tensor};

use crate::nvrtc::{Arg, Launch, Trust};

/// The kernel's state (`PAIRUNI_DRAW_KERNEL=off` turns it off).
pub static TRUST: Trust = Trust::new("PAIRUNI_DRAW_KERNEL", "Gumbel-max draw kernel");

/// Largest relative difference of the log-probs from candle's that the first-call check accepts (the codes must
/// be equal): the normaliser is summed in another order, which moves a log-prob by a few f32 roundings.
const CHECK_TOLERANCE: f32 = 1e-4;

/// CUDA source, after [`crate::nvrtc::BF16_PRELUDE`].
pub const SOURCE: &str = r#"
// SplitMix64's output at position n of the stream seeded with `seed`, as a uniform in (0, 1): its top 24 bits
// and a half, so neither end is reached (−log(−log u) stays finite).
__device__ __forceinline__ float draw_uniform(unsigned long long seed, unsigned long long n) {
    unsigned long long z = seed + (n + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((float)(z >> 40) + 0.5f) * 5.9604644775390625e-8f;
}

// The logit the draw is taken from, as candle computes it: u + (c − u)·w with CFG, c + bias with a bias.
template <typename T>
__device__ __forceinline__ float draw_mixed(const T* cond, const T* uncond, const float* bias, long at, int i,
                                            float w) {
    const float c = load_val(cond, at);
    if (uncond) {
        const float u = load_val(uncond, at);
        return __fadd_rn(u, __fmul_rn(__fsub_rn(c, u), w));
    }
    return bias ? __fadd_rn(c, bias[i]) : c;
}

// The logit the log-prob is taken of, before its temperature: the conditional one with CFG, else the draw's.
template <typename T>
__device__ __forceinline__ float draw_lp_logit(const T* cond, const T* uncond, const float* bias, long at, int i,
                                               float w) {
    return uncond ? load_val(cond, at) : draw_mixed(cond, uncond, bias, at, i, w);
}

// Keeps the larger score, the lower index on a tie; a NaN never wins.
__device__ __forceinline__ void take_larger(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// The draw's tempered logit x, as candle's `affine(1 / T)` gives it.
template <typename T>
__device__ __forceinline__ float draw_x(const T* cond, const T* uncond, const float* bias, long at, int i, float w,
                                        float inv_t) {
    return __fmul_rn(draw_mixed(cond, uncond, bias, at, i, w), inv_t);
}

// A key that orders floats as their values (−0 as +0); NaN is kept out by the callers.
__device__ __forceinline__ unsigned int order_key(float x) {
    const unsigned int u = __float_as_uint(__fadd_rn(x, 0.f));
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The float of an order key.
__device__ __forceinline__ float key_value(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The block's total of every thread's `v`, the same bits in every thread (warp partials added in warp order).
// `scratch`: 32 floats of shared memory used by nothing else between two calls.
__device__ __forceinline__ float block_total(float v, float* scratch) {
    v = warp_sum(v);
    __syncthreads();  // every thread has read the previous call's partials
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += scratch[w];
    return total;
}

// The block's largest `v`, in every thread (as `block_total`).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float top = v;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) top = fmaxf(top, scratch[w]);
    return top;
}

// The top-p nucleus of one row's softmax(x): the classes of the shortest prefix, in the order of descending x and
// ascending index among equals, whose mass reaches top_p of the whole (as the host sampler takes it). Returned as
// the threshold key `tau` and the last index `cut` kept among the classes whose key is `tau`: a class is in the
// nucleus when its key is above `tau`, or equal and its index at most `cut`. Every thread returns the same.
//
// The threshold is found by bisection over the keys: M(k), the mass of the classes whose key is at least k, falls
// as k rises, and `tau` is the largest k with M(k) >= top_p * M(0), so that it is a class's key. Each step sums
// the row once (32 steps at most); every sum is taken in the same order, so M(0) is exactly the normaliser and the
// mass above `tau` is exactly M(tau + 1). If fewer than all the classes at `tau` are needed, the cut is found by a
// bisection over the index.
template <typename T>
__device__ void nucleus(const T* cond, const T* uncond, const float* bias, long base, int classes, float w,
                        float inv_t, float top_p, unsigned int& tau, int& cut) {
    __shared__ float s_part[32];
    const int tid = threadIdx.x;
    const float neg_inf = __uint_as_float(0xff800000u);
    float x_max = neg_inf;
    for (int i = tid; i < classes; i += blockDim.x) {
        x_max = fmaxf(x_max, draw_x(cond, uncond, bias, base + i, i, w, inv_t));  // fmaxf drops NaN
    }
    x_max = block_max(x_max, s_part);
    // The mass of the classes whose key is at least `k`; with `count_at`, instead the number of classes whose key
    // is `k` and whose index is at most `last`.
    auto mass = [&](unsigned int k, bool count_at, int last) {
        float m = 0.f;
        for (int i = tid; i < classes; i += blockDim.x) {
            const float x = draw_x(cond, uncond, bias, base + i, i, w, inv_t);
            if (x != x) continue;
            const unsigned int key = order_key(x);
            if (count_at) {
                m += (key == k && i <= last) ? 1.f : 0.f;
            } else {
                m += key >= k ? expf(__fsub_rn(x, x_max)) : 0.f;
            }
        }
        return block_total(m, s_part);
    };
    const float target = __fmul_rn(top_p, mass(0u, false, 0));
    unsigned int lo = 0u, hi = order_key(x_max) + 1u;  // M(lo) >= target > M(hi)
    while (hi - lo > 1u) {
        const unsigned int mid = lo + ((hi - lo) >> 1);
        if (mass(mid, false, 0) >= target) lo = mid; else hi = mid;
    }
    tau = lo;
    cut = classes - 1;
    const float at_tau = mass(tau, true, classes - 1);
    // How many classes at `tau`, in index order, take the mass above it to the target.
    const float above = mass(tau + 1u, false, 0);
    const float each = expf(__fsub_rn(key_value(tau), x_max));
    const float needed = fminf(fmaxf(ceilf(__fdiv_rn(__fsub_rn(target, above), each)), 1.f), at_tau);
    if (needed < at_tau) {
        int lo_i = -1, hi_i = classes - 1;  // fewer than `needed` up to lo_i, enough up to hi_i
        while (hi_i - lo_i > 1) {
            const int mid = lo_i + ((hi_i - lo_i) >> 1);
            if (mass(tau, true, mid) >= needed) hi_i = mid; else lo_i = mid;
        }
        cut = hi_i;
    }
}

// One block per row (gridDim.x rows of `classes` logits, contiguous), any whole number of warps. Greedy when
// inv_t <= 0; restricted to the top-p nucleus (`nucleus`) when sampling with top_p < 1. `noise` (rows x classes,
// f32) replaces the counter's noise when given; the step is `step + *counter` (counter optional).
template <typename T>
__device__ void gumbel_draw(const T* cond, const T* uncond, const float* bias, const float* noise,
                            const unsigned int* counter, unsigned int step, long seed, int classes,
                            float cfg_weight, float inv_t, float lp_inv_t, float top_p, unsigned int* codes,
                            float* lps) {
    // Per warp: its best score and index, its largest log-prob logit, its part of the normaliser (an array each:
    // no array is reused, so two barriers suffice).
    __shared__ float s_best[32], s_top[32], s_sum[32];
    __shared__ int s_idx[32];
    const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const long base = (long)row * classes;
    const unsigned long long draw = (unsigned long long)step + (counter ? counter[0] : 0u);
    const unsigned long long first = (draw * gridDim.x + row) * (unsigned long long)classes;
    const float neg_inf = __uint_as_float(0xff800000u);
    const bool restricted = inv_t > 0.f && top_p < 1.f;
    unsigned int tau = 0u;
    int cut = classes - 1;
    if (restricted) nucleus(cond, uncond, bias, base, classes, cfg_weight, inv_t, top_p, tau, cut);

    // The largest score (in the nucleus) and the largest log-prob logit.
    float best = neg_inf, top = neg_inf;
    int best_i = classes;  // none yet
    for (int i = tid; i < classes; i += blockDim.x) {
        top = fmaxf(top, __fmul_rn(draw_lp_logit(cond, uncond, bias, base + i, i, cfg_weight), lp_inv_t));
        const float mixed = draw_mixed(cond, uncond, bias, base + i, i, cfg_weight);
        const float x = inv_t > 0.f ? __fmul_rn(mixed, inv_t) : mixed;
        if (restricted) {
            if (x != x) continue;
            const unsigned int key = order_key(x);
            if (key < tau || (key == tau && i > cut)) continue;
        }
        float s = x;
        if (inv_t > 0.f) {
            const float g = noise ? noise[base + i]
                                  : -logf(-logf(draw_uniform((unsigned long long)seed, first + i)));
            s = __fadd_rn(x, g);
        }
        take_larger(best, best_i, s, i);
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        take_larger(best, best_i, ov, oi);
    }
    top = warp_max(top);
    if (lane == 0) {
        s_best[warp] = best;
        s_idx[warp] = best_i;
        s_top[warp] = top;
    }
    __syncthreads();
    for (int w = 0; w < warps; ++w) top = fmaxf(top, s_top[w]);

    // The normaliser, as candle's log-softmax takes it: Σ exp(x − max).
    float sum = 0.f;
    for (int i = tid; i < classes; i += blockDim.x) {
        const float x = __fmul_rn(draw_lp_logit(cond, uncond, bias, base + i, i, cfg_weight), lp_inv_t);
        sum += expf(__fsub_rn(x, top));
    }
    sum = warp_sum(sum);
    if (lane == 0) s_sum[warp] = sum;
    __syncthreads();
    if (tid == 0) {
        float total = 0.f;
        for (int w = 0; w < warps; ++w) {
            total += s_sum[w];
            take_larger(best, best_i, s_best[w], s_idx[w]);
        }
        const int code = best_i < classes ? best_i : 0;  // a row of NaN scores draws class 0
        const float x = __fmul_rn(draw_lp_logit(cond, uncond, bias, base + code, code, cfg_weight), lp_inv_t);
        codes[row] = (unsigned int)code;
        lps[row] = __fsub_rn(__fsub_rn(x, top), logf(total));
    }
}

#define GUMBEL_DRAW(SUFFIX, T)                                                                                  \
extern "C" __global__ void gumbel_draw_##SUFFIX(const T* cond, const T* uncond, const float* bias,            \
        const float* noise, const unsigned int* counter, unsigned int step, long seed, int classes,            \
        float cfg_weight, float inv_t, float lp_inv_t, float top_p, unsigned int* codes, float* lps) {        \
    gumbel_draw<T>(cond, uncond, bias, noise, counter, step, seed, classes, cfg_weight, inv_t, lp_inv_t,      \
                   top_p, codes, lps);                                                                        \
}
GUMBEL_DRAW(bf16, bf16_t)
GUMBEL_DRAW(f32, float)
"#;

/// The kernel's module.
pub(crate) static MODULE: crate::nvrtc::Module = crate::nvrtc::Module::new("pairuni_draw", SOURCE);

/// What one draw is taken from: `cond` [rows, classes] (bf16 or f32, contiguous), with CFG the unconditional
/// logits `uncond` of the same shape, else optionally a `bias` [1, classes] (f32) added first.
#[derive(Debug, Clone, Copy)]
pub struct DrawSpec<'a> {
    /// The (conditional) logits [rows, classes].
    pub cond: &'a Tensor,
    /// CFG's unconditional logits, as `cond`: the draw is from softmax((u + w (c − u)) / T).
    pub uncond: Option<&'a Tensor>,
    /// Added to `cond` without CFG (banned tokens), [1, classes] f32.
    pub bias: Option<&'a Tensor>,
    /// CFG's weight w.
    pub cfg_weight: f64,
    /// The draw's temperature; ≤ 0 takes the argmax.
    pub temperature: f64,
    /// The temperature of the recorded log-prob: of softmax(c / T_lp) with CFG, of softmax((c + bias) / T_lp)
    /// without.
    pub logprob_temperature: f64,
    /// The nucleus mass a sampled draw is restricted to (1 = off; the log-prob is not truncated).
    pub top_p: f64,
}

/// Where a kernel draw's Gumbel noise comes from.
#[derive(Debug, Clone, Copy)]
pub enum DrawNoise<'a> {
    /// Given, [rows, classes] f32 (the first-call check's: cuRAND's noise, which candle's ops also take).
    Given(&'a Tensor),
    /// SplitMix64 seeded with `seed` at step `step` plus the device counter `counter` ([1] u32) when given.
    Counter {
        /// The rollout's seed.
        seed: u64,
        /// The step (added to the counter's value).
        step: u32,
        /// A static decode's step counter.
        counter: Option<&'a Tensor>,
    },
}

/// The kernel's launch for `spec` with `noise`: one block per row, as many warps as the classes fill, up to 32;
/// its outputs are the codes [rows, 1] (u32) and their log-probs [rows, 1] (f32). `None` where it does not apply.
pub fn launch_of<'a>(spec: &DrawSpec<'a>, noise: &DrawNoise<'a>) -> Option<Launch<'a>> {
    let cond = spec.cond;
    let (rows, classes) = cond.dims2().ok()?;
    let same_as_cond = |t: &Tensor| t.dims() == cond.dims() && t.dtype() == cond.dtype();
    let f32_row = |t: &Tensor| {
        t.dtype() == DType::F32 && t.elem_count() == classes && t.is_contiguous() && t.rank() <= 2
    };
    let applies = matches!(cond.dtype(), DType::BF16 | DType::F32)
        && cond.is_contiguous()
        && rows > 0
        && rows <= u32::MAX as usize
        && classes > 0
        && classes < i32::MAX as usize
        && spec
            .uncond
            .is_none_or(|u| same_as_cond(u) && u.is_contiguous())
        && !(spec.uncond.is_some() && spec.bias.is_some())
        && spec.bias.is_none_or(f32_row)
        && spec.logprob_temperature > 0.0
        && spec.top_p > 0.0
        // The nucleus counts classes in f32, exact below 2^24.
        && (spec.top_p >= 1.0 || classes < 1 << 24);
    if !applies {
        return None;
    }
    let (noise_arg, counter_arg, step, seed) = match *noise {
        DrawNoise::Given(g) => {
            if g.dtype() != DType::F32 || g.dims() != cond.dims() || !g.is_contiguous() {
                return None;
            }
            (Arg::Input(g), Arg::NullInput(DType::U32), 0, 0)
        }
        DrawNoise::Counter {
            seed,
            step,
            counter,
        } => {
            let counter_arg = match counter {
                Some(c) if c.dtype() == DType::U32 && c.elem_count() == 1 && c.is_contiguous() => {
                    Arg::Input(c)
                }
                Some(_) => return None,
                None => Arg::NullInput(DType::U32),
            };
            (Arg::NullInput(DType::F32), counter_arg, step, seed)
        }
    };
    let threads = classes.next_multiple_of(32).min(1024) as u32;
    let inv_t = if spec.temperature > 0.0 {
        (1.0 / spec.temperature) as f32
    } else {
        0.0
    };
    Some(Launch::linear(
        crate::nvrtc::instantiation(cond.dtype(), "gumbel_draw_bf16", "gumbel_draw_f32"),
        rows as u32,
        threads,
        vec![
            Arg::Input(cond),
            spec.uncond.map_or(Arg::NullInput(cond.dtype()), Arg::Input),
            spec.bias.map_or(Arg::NullInput(DType::F32), Arg::Input),
            noise_arg,
            counter_arg,
            Arg::U32(step),
            // The seed's bits, as the kernel's `long`.
            Arg::I64(seed as i64),
            Arg::I32(classes as i32),
            Arg::F32(spec.cfg_weight as f32),
            Arg::F32(inv_t),
            Arg::F32((1.0 / spec.logprob_temperature) as f32),
            Arg::F32(spec.top_p.min(1.0) as f32),
            Arg::Output(DType::U32, (rows, 1).into()),
            Arg::Output(DType::F32, (rows, 1).into()),
        ],
    ))
}

/// The kernel's draw on a CUDA device: codes [rows, 1] (u32) and log-probs [rows, 1] (f32); `None` where it does
/// not apply or nothing launches (no CUDA).
pub fn launch(spec: &DrawSpec, noise: &DrawNoise) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    let Some(l) = launch_of(spec, noise) else {
        return Ok(None);
    };
    Ok(MODULE
        .launch(&l)?
        .and_then(|out| <[Tensor; 2]>::try_from(out).ok())
        .map(|[codes, lps]| (codes, lps)))
}

/// Whether draws on `device`, with the kernel asked for (`kernel`), go through it without a check: then they need
/// no given noise (a static decode stops filling its noise buffer).
pub fn ready(device: &candle_core::Device, kernel: bool) -> bool {
    kernel && crate::nvrtc::runs_kernels(device) && TRUST.usable() && !TRUST.needs_check()
}

/// One device draw: through the kernel when `kernel` is asked for, it runs on this device and it is trusted,
/// with the counter's noise `keyed`; otherwise `composed` (candle's ops) on the noise `given` produces, which is
/// only asked for then. The process's first kernel call (outside a capture) is the check: the kernel and
/// `composed` on the same given noise must draw equal codes with log-probs within [`CHECK_TOLERANCE`], else the
/// kernel is off and candle's draw is returned; when it passes, the draw returned is the kernel's on `keyed`, as
/// every later one will be (so that a run does not differ from the next in its first step only).
pub fn draw(
    spec: &DrawSpec,
    kernel: bool,
    keyed: DrawNoise,
    given: impl FnOnce() -> candle_core::Result<Option<Tensor>>,
    composed: impl Fn(Option<&Tensor>) -> candle_core::Result<(Tensor, Tensor)>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let dev = spec.cond.device();
    if !kernel || !crate::nvrtc::runs_kernels(dev) {
        return composed(given()?.as_ref());
    }
    checked_draw(
        &TRUST,
        spec,
        keyed,
        || crate::nvrtc::capturing(dev),
        launch,
        given,
        composed,
    )
}

/// How far, as a fraction of the whole, a nucleus's mass may be from top-p for the first-call check to accept its
/// draw: the kernel sums a row's masses in f32 (≈ 1e-6 relative, at most ≈ 1e-5 at 102,400 classes) and the host
/// in f64, so the two nuclei can end a class apart, and then draw differently when that class wins the argmax.
/// Rare (none in 80 nearly flat emulated rows of 16,384 classes, the ignored test's kind), but a check must not
/// turn a correct kernel off for it.
const NUCLEUS_SLACK: f64 = 1e-4;

/// Whether each of the `rows` whose kernel code (`ours`) differs from candle's is the draw of a top-p nucleus
/// whose mass is within [`NUCLEUS_SLACK`] of the spec's, on the check's `noise`: `Ok` with the host's log-prob of
/// each such row's code, or `Err` with the first row that is not (every row when the draw has no nucleus).
fn within_nucleus_slack(
    spec: &DrawSpec,
    noise: Option<&Tensor>,
    ours: &[u32],
    rows: &[usize],
) -> candle_core::Result<std::result::Result<Vec<f32>, usize>> {
    let (Some(noise), true) = (noise, spec.top_p < 1.0 && spec.temperature > 0.0) else {
        return Ok(Err(rows[0]));
    };
    // The composed draw's scores and log-prob logits, each tempered.
    let mixed = crate::sampling::draw_logits(spec.cond, spec.uncond, spec.bias, spec.cfg_weight)?;
    let x = mixed
        .affine(1.0 / spec.temperature, 0.0)?
        .to_vec2::<f32>()?;
    let lp_logits = match spec.uncond {
        Some(_) => spec.cond.to_dtype(DType::F32)?,
        None => mixed,
    };
    let y = lp_logits
        .affine(1.0 / spec.logprob_temperature, 0.0)?
        .to_vec2::<f32>()?;
    let noise = noise.to_vec2::<f32>()?;
    let mut lps = Vec::with_capacity(rows.len());
    for &r in rows {
        let near = crate::sampling::nucleus_gumbel_argmaxes(
            &x[r],
            &noise[r],
            (spec.top_p - NUCLEUS_SLACK).max(0.0),
            spec.top_p + NUCLEUS_SLACK,
        );
        let code = ours[r] as usize;
        if !near.contains(&code) {
            return Ok(Err(r));
        }
        lps.push(crate::sampling::log_prob_t(&y[r], 1.0, code));
    }
    Ok(Ok(lps))
}

/// [`draw`] under `trust`, with the kernel's `launch` (a GPU's, or the emulator's in the tests).
fn checked_draw(
    trust: &Trust,
    spec: &DrawSpec,
    keyed: DrawNoise,
    capturing: impl FnOnce() -> candle_core::Result<bool>,
    launch: impl Fn(&DrawSpec, &DrawNoise) -> candle_core::Result<Option<(Tensor, Tensor)>>,
    given: impl FnOnce() -> candle_core::Result<Option<Tensor>>,
    composed: impl Fn(Option<&Tensor>) -> candle_core::Result<(Tensor, Tensor)>,
) -> candle_core::Result<(Tensor, Tensor)> {
    // The noise is asked for at most once, by whichever path needs it.
    let mut given = Some(given);
    let mut noise = || given.take().map_or(Ok(None), |f| f());
    if !trust.usable() || (trust.needs_check() && capturing()?) {
        return composed(noise()?.as_ref());
    }
    // Candle's draw on the check's noise, which a kernel that fails to launch afterwards falls back to.
    let mut checked = None;
    if trust.needs_check() {
        let given = noise()?;
        let theirs = composed(given.as_ref())?;
        // A greedy draw takes no noise.
        let noise_of_check = given.as_ref().map_or(keyed, DrawNoise::Given);
        let ours = match launch(spec, &noise_of_check) {
            Ok(Some(ours)) => ours,
            Ok(None) => return Ok(theirs),
            Err(e) => {
                trust.record(Err(format!("launch: {e}")));
                return Ok(theirs);
            }
        };
        let (a, b) = (
            ours.0.flatten_all()?.to_vec1::<u32>()?,
            theirs.0.flatten_all()?.to_vec1::<u32>()?,
        );
        let differing: Vec<usize> = (0..a.len().max(b.len()))
            .filter(|&r| a.get(r) != b.get(r))
            .collect();
        // The log-probs the kernel's must match: candle's, or at a row whose nucleus ends a rounding away, the
        // host's at the kernel's code.
        let mut their_lps = theirs.1.clone();
        if !differing.is_empty() {
            let tolerated = if a.len() == b.len() {
                within_nucleus_slack(spec, given.as_ref(), &a, &differing)?
            } else {
                Err(differing[0])
            };
            match tolerated {
                Ok(host_lps) => {
                    let mut lps = theirs.1.flatten_all()?.to_vec1::<f32>()?;
                    for (&r, lp) in differing.iter().zip(host_lps) {
                        lps[r] = lp;
                    }
                    their_lps = Tensor::from_vec(lps, theirs.1.shape(), theirs.1.device())?;
                }
                Err(row) => {
                    trust.record(Err(format!(
                        "row {row} drew class {:?} where candle's ops drew {:?} (of {} rows)",
                        a.get(row),
                        b.get(row),
                        b.len()
                    )));
                    return Ok(theirs);
                }
            }
        }
        if !trust.check(&ours.1, &their_lps, CHECK_TOLERANCE)? {
            return Ok(theirs);
        }
        checked = Some(theirs);
    }
    let failed = match launch(spec, &keyed) {
        Ok(Some(out)) => return Ok(out),
        Ok(None) => None,
        Err(e) => Some(format!("launch: {e}")),
    };
    if let Some(reason) = failed {
        trust.record(Err(reason));
    }
    match checked {
        Some(theirs) => Ok(theirs),
        None => composed(noise()?.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_emulator::emulate;
    use crate::sampling::{
        device_cfg_draw_with, device_token_draw_with, ImageSampling, TextSampling,
    };
    use candle_core::Device;

    fn values(n: usize, seed: usize, shape: &[usize], scale: f64, dtype: DType) -> Tensor {
        Tensor::from_vec(crate::layers::test_values(n, seed), shape, &Device::Cpu)
            .unwrap()
            .affine(scale, 0.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Gumbel noise −log(−log u) for u from the test values mapped into (0, 1).
    fn gumbel(rows: usize, classes: usize, seed: usize) -> Tensor {
        gumbel_of(
            &values(rows * classes, seed, &[rows, classes], 1.0, DType::F32)
                .affine(0.499, 0.5)
                .unwrap(),
        )
    }

    /// Gumbel noise −log(−log u) of uniforms `u` in (0, 1).
    fn gumbel_of(u: &Tensor) -> Tensor {
        u.log()
            .unwrap()
            .neg()
            .unwrap()
            .log()
            .unwrap()
            .neg()
            .unwrap()
    }

    /// [rows, classes] f32 values uniform in [lo, hi) from the ChaCha stream of `seed`: independent draws (the
    /// test values' seeds are shifts of one sequence, which would tie noise to logits).
    fn uniform(rows: usize, classes: usize, seed: u64, lo: f32, hi: f32) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..rows * classes)
            .map(|_| rng.random_range(lo..hi))
            .collect();
        Tensor::from_vec(v, (rows, classes), &Device::Cpu).unwrap()
    }

    fn run(spec: &DrawSpec, noise: &DrawNoise) -> (Vec<u32>, Tensor) {
        let out = emulate(&MODULE, &launch_of(spec, noise).unwrap()).unwrap();
        let codes = out.outputs[0].flatten_all().unwrap().to_vec1().unwrap();
        (codes, out.outputs[1].clone())
    }

    /// [`run`] in one thread order, without the race check's second run: for launches of many barriers whose
    /// kind another test runs in both orders.
    fn run_once(spec: &DrawSpec, noise: &DrawNoise) -> (Vec<u32>, Tensor) {
        let out = crate::kernel_emulator::emulate_once(&MODULE, &launch_of(spec, noise).unwrap())
            .unwrap();
        let codes = out.outputs[0].flatten_all().unwrap().to_vec1().unwrap();
        (codes, out.outputs[1].clone())
    }

    fn codes(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// CFG sampling at weight `w` and temperature `t`, without top-p.
    fn guided(w: f64, t: f64) -> ImageSampling {
        ImageSampling {
            cfg_weight: w,
            temperature: t,
            top_p: 1.0,
        }
    }

    /// A CFG draw of `cond` against `uncond` at weight `w` and temperature `t` (log-probs at `t`, or 1 when greedy).
    fn cfg_spec<'a>(cond: &'a Tensor, uncond: &'a Tensor, w: f64, t: f64) -> DrawSpec<'a> {
        DrawSpec {
            cond,
            uncond: Some(uncond),
            bias: None,
            cfg_weight: w,
            temperature: t,
            logprob_temperature: if t > 0.0 { t } else { 1.0 },
            top_p: 1.0,
        }
    }

    #[test]
    fn cfg_draws_on_given_noise_are_candles_draws() {
        // 1000 classes: not a whole number of the block's 1024 threads, and more than 32 warps' first pass.
        let (rows, classes) = (3, 1000);
        for dtype in [DType::F32, DType::BF16] {
            let cond = values(rows * classes, 1, &[rows, classes], 4.0, dtype);
            let uncond = values(rows * classes, 2, &[rows, classes], 4.0, dtype);
            let noise = gumbel(rows, classes, 3);
            for (w, t) in [(5.0, 1.0), (2.0, 0.7), (5.0, 0.0)] {
                let spec = cfg_spec(&cond, &uncond, w, t);
                let (ours, lp) = run(&spec, &DrawNoise::Given(&noise));
                let given = (t > 0.0).then_some(&noise);
                let (want, want_lp) =
                    device_cfg_draw_with(&cond, &uncond, &guided(w, t), given).unwrap();
                assert_eq!(ours, codes(&want), "{dtype:?} w {w} t {t}");
                let err = crate::layers::rel_diff(&lp, &want_lp).unwrap();
                assert!(err < 1e-5, "{dtype:?} w {w} t {t}: log-probs {err}");
            }
            // A kernel that drew from the conditional logits alone would draw other codes.
            let spec = cfg_spec(&cond, &uncond, 5.0, 1.0);
            let (ours, _) = run(&spec, &DrawNoise::Given(&noise));
            let (unmixed, _) =
                device_cfg_draw_with(&cond, &cond, &guided(5.0, 1.0), Some(&noise)).unwrap();
            assert_ne!(ours, codes(&unmixed));
        }
    }

    #[test]
    fn answer_draws_on_given_noise_are_candles_draws_and_skip_banned_tokens() {
        let (rows, classes) = (4, 300);
        let logits = values(rows * classes, 4, &[rows, classes], 3.0, DType::F32);
        // Ban each row's favourite under the noise, so that the bias decides.
        let noise = gumbel(rows, classes, 5);
        let free = (&logits + &noise).unwrap().argmax(1).unwrap();
        let mut bias = vec![0f32; classes];
        for c in codes(&free) {
            bias[c as usize] = crate::janus::BANNED_LOGIT;
        }
        let bias = Tensor::from_vec(bias, (1, classes), &Device::Cpu).unwrap();
        for (greedy, t, t_lp) in [(false, 1.0, 1.0), (false, 0.8, 0.8), (true, 1.0, 1.0)] {
            let s = TextSampling {
                greedy,
                temperature: t,
                ..TextSampling::default()
            };
            let spec = DrawSpec {
                cond: &logits,
                uncond: None,
                bias: Some(&bias),
                cfg_weight: 1.0,
                temperature: if greedy { 0.0 } else { t },
                logprob_temperature: t_lp,
                top_p: 1.0,
            };
            assert_eq!(s.logprob_temperature(), t_lp);
            let (ours, lp) = run(&spec, &DrawNoise::Given(&noise));
            let (want, want_lp) =
                device_token_draw_with(&logits, &bias, &s, (!greedy).then_some(&noise)).unwrap();
            assert_eq!(ours, codes(&want), "greedy {greedy} t {t}");
            assert!(crate::layers::rel_diff(&lp, &want_lp).unwrap() < 1e-5);
            for (r, c) in ours.iter().enumerate() {
                assert_eq!(
                    bias.get(0)
                        .unwrap()
                        .get(*c as usize)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                    0.0,
                    "row {r}"
                );
            }
        }
    }

    #[test]
    fn counter_noise_draws_follow_the_guided_softmax() {
        // Many rows of the same logits: each row's noise is its own, so the codes are independent draws.
        // A low temperature, so that a draw at the wrong one, or without the mix, is far off.
        let (rows, classes, w, t) = (1000, 6, 3.0, 0.5);
        let row_c = [0.5f32, -0.2, 0.1, 0.9, -1.0, 0.3];
        let row_u = [0.2f32, 0.1, 0.4, 0.6, -0.5, 0.0];
        let tile =
            |r: &[f32]| Tensor::from_vec(r.repeat(rows), (rows, classes), &Device::Cpu).unwrap();
        let (cond, uncond) = (tile(&row_c), tile(&row_u));
        let spec = cfg_spec(&cond, &uncond, w, t);
        let keyed = |step, counter| DrawNoise::Counter {
            seed: 42,
            step,
            counter,
        };
        let (drawn, lp) = run(&spec, &keyed(7, None));
        let mixed: Vec<f64> = (0..classes)
            .map(|i| (row_u[i] + (row_c[i] - row_u[i]) * w as f32) as f64 / t)
            .collect();
        let z: f64 = mixed.iter().map(|m| m.exp()).sum();
        for (i, m) in mixed.iter().enumerate() {
            let p = m.exp() / z;
            let f = drawn.iter().filter(|&&c| c as usize == i).count() as f64 / rows as f64;
            // About four standard deviations of a frequency over 3000 draws.
            let sd = (p * (1.0 - p) / rows as f64).sqrt();
            assert!(
                (f - p).abs() < 4.0 * sd + 1e-3,
                "class {i}: {f} drawn, {p} expected"
            );
        }
        // The log-prob is the conditional one at the drawn class.
        let lse = row_c
            .iter()
            .map(|&c| (c as f64 / t).exp())
            .sum::<f64>()
            .ln();
        let lp = lp.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (c, l) in drawn.iter().zip(&lp) {
            let want = row_c[*c as usize] as f64 / t - lse;
            assert!((*l as f64 - want).abs() < 1e-5, "{l} against {want}");
        }
        // The step may come from the device counter: step 2 + counter 5 is step 7 (on fewer rows, for time).
        let few = 200;
        let (cond, uncond) = (
            cond.narrow(0, 0, few).unwrap(),
            uncond.narrow(0, 0, few).unwrap(),
        );
        let spec = DrawSpec {
            cond: &cond,
            uncond: Some(&uncond),
            ..spec
        };
        let drawn = run(&spec, &keyed(7, None)).0;
        let counter = Tensor::new(&[5u32], &Device::Cpu).unwrap();
        assert_eq!(run(&spec, &keyed(2, Some(&counter))).0, drawn);
        // Another step, or another seed, draws other noise.
        let other_step = run(&spec, &keyed(8, None)).0;
        let other_seed = run(
            &spec,
            &DrawNoise::Counter {
                seed: 43,
                step: 7,
                counter: None,
            },
        )
        .0;
        for other in [other_step, other_seed] {
            let same = other.iter().zip(&drawn).filter(|(a, b)| a == b).count();
            assert!(same < few * 2 / 3, "{same} of {few} codes repeated");
        }
    }

    #[test]
    fn greedy_draws_take_the_first_of_equal_maxima() {
        let cond = Tensor::new(
            &[[0.5f32, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]],
            &Device::Cpu,
        )
        .unwrap();
        let spec = DrawSpec {
            cond: &cond,
            uncond: None,
            bias: None,
            cfg_weight: 1.0,
            temperature: 0.0,
            logprob_temperature: 1.0,
            top_p: 1.0,
        };
        let (drawn, lp) = run(
            &spec,
            &DrawNoise::Counter {
                seed: 1,
                step: 0,
                counter: None,
            },
        );
        assert_eq!(drawn, vec![1, 0]);
        let lp = lp.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((lp[1] - (0.25f32).ln()).abs() < 1e-6);
    }

    /// Whether class `c` of `x` (tempered scores) is in the top-p nucleus: the classes more probable than it have
    /// less than `top_p` of the mass (the host sampler's rule, in f64, ties aside).
    fn in_nucleus(x: &[f32], c: usize, top_p: f64) -> bool {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e = |v: f32| (v as f64 - max).exp();
        let total: f64 = x.iter().map(|&v| e(v)).sum();
        let before: f64 = x.iter().filter(|&&v| v > x[c]).map(|&v| e(v)).sum();
        before < top_p * total
    }

    #[test]
    fn nucleus_draws_on_given_noise_are_the_host_nucleus_draws() {
        let (rows, classes) = (2, 300);
        let noise = gumbel_of(&uniform(rows, classes, 23, 1e-6, 1.0));
        for dtype in [DType::F32, DType::BF16] {
            // Flat enough that a nucleus of 0.9 leaves out many classes and one of 0.3 keeps several.
            let cond = uniform(rows, classes, 21, -0.5, 0.5)
                .to_dtype(dtype)
                .unwrap();
            let uncond = uniform(rows, classes, 22, -0.5, 0.5)
                .to_dtype(dtype)
                .unwrap();
            for (w, t, top_p) in [(5.0, 1.0, 0.9), (2.0, 0.7, 0.3), (5.0, 1.0, 0.02)] {
                let s = ImageSampling {
                    cfg_weight: w,
                    temperature: t,
                    top_p,
                };
                let spec = DrawSpec {
                    top_p,
                    ..cfg_spec(&cond, &uncond, w, t)
                };
                let (ours, lp) = run_once(&spec, &DrawNoise::Given(&noise));
                let (want, want_lp) =
                    device_cfg_draw_with(&cond, &uncond, &s, Some(&noise)).unwrap();
                assert_eq!(ours, codes(&want), "{dtype:?} w {w} t {t} top-p {top_p}");
                let err = crate::layers::rel_diff(&lp, &want_lp).unwrap();
                assert!(err < 1e-5, "{dtype:?} top-p {top_p}: log-probs {err}");
                // Each code is in its row's nucleus, and without a small nucleus some row draws outside it.
                let (c, u) = (
                    cond.to_dtype(DType::F32).unwrap(),
                    uncond.to_dtype(DType::F32).unwrap(),
                );
                let mixed = (&u + ((&c - &u).unwrap() * w).unwrap())
                    .unwrap()
                    .affine(1.0 / t, 0.0)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                for (r, &c) in ours.iter().enumerate() {
                    assert!(in_nucleus(&mixed[r], c as usize, top_p), "row {r}");
                }
                if top_p > 0.5 {
                    continue;
                }
                let (free, _) =
                    run_once(&cfg_spec(&cond, &uncond, w, t), &DrawNoise::Given(&noise));
                assert!(
                    free.iter()
                        .enumerate()
                        .any(|(r, &c)| !in_nucleus(&mixed[r], c as usize, top_p)),
                    "top-p {top_p} restricts nothing here"
                );
            }
        }
    }

    #[test]
    fn a_nucleus_that_ends_among_equal_logits_keeps_the_lowest_indices() {
        // Class 0 holds 10 times the mass of each of the other 1099 equal classes: of 110.9 in all, top-p 0.3
        // needs class 0 and 323 of the others (1 + 32.3 ≥ 33.27), which are classes 1 to 323. 1100 classes: more
        // than the block's threads, so that the bisections' sums and counts take several classes per thread.
        let classes = 1100;
        let mut row = vec![0f32; classes];
        row[0] = 10f32.ln();
        let cond = Tensor::from_vec(row.clone(), (1, classes), &Device::Cpu).unwrap();
        let zero = Tensor::zeros((1, classes), DType::F32, &Device::Cpu).unwrap();
        let s = TextSampling {
            top_p: 0.3,
            ..TextSampling::default()
        };
        let spec = DrawSpec {
            cond: &cond,
            uncond: None,
            bias: Some(&zero),
            cfg_weight: 1.0,
            temperature: 1.0,
            logprob_temperature: 1.0,
            top_p: 0.3,
        };
        // Noise that favours one class far above the rest: drawn when it is in the nucleus.
        for (favoured, drawn) in [(323, 323), (324, 0), (1099, 0), (5, 5)] {
            let mut g = vec![0f32; classes];
            g[favoured] = 50.0;
            let g = Tensor::from_vec(g, (1, classes), &Device::Cpu).unwrap();
            // Both thread orders once: the race check of the nucleus's barriers.
            let emulated = if favoured == 323 { run } else { run_once };
            let (ours, _) = emulated(&spec, &DrawNoise::Given(&g));
            let (want, _) = device_token_draw_with(&cond, &zero, &s, Some(&g)).unwrap();
            assert_eq!(ours, vec![drawn], "favoured {favoured}");
            assert_eq!(codes(&want), vec![drawn], "host, favoured {favoured}");
        }
    }

    #[test]
    fn counter_noise_nucleus_draws_follow_the_renormalised_softmax() {
        let (rows, classes, t, top_p) = (500, 6, 1.0, 0.75);
        let row = [0.5f32, -0.2, 0.1, 0.9, -1.0, 0.3];
        let logits = Tensor::from_vec(row.repeat(rows), (rows, classes), &Device::Cpu).unwrap();
        let zero = Tensor::zeros((1, classes), DType::F32, &Device::Cpu).unwrap();
        let spec = DrawSpec {
            cond: &logits,
            uncond: None,
            bias: Some(&zero),
            cfg_weight: 1.0,
            temperature: t,
            logprob_temperature: t,
            top_p,
        };
        // One thread order: the race check is the given-noise tests' (and 500 rows of barriers take a while).
        let l = launch_of(
            &spec,
            &DrawNoise::Counter {
                seed: 5,
                step: 3,
                counter: None,
            },
        )
        .unwrap();
        let out = crate::kernel_emulator::emulate_once(&MODULE, &l).unwrap();
        let drawn: Vec<u32> = codes(&out.outputs[0]);
        // Probabilities in descending order: 0.32, 0.21, 0.17, 0.14, ... The first three hold 0.70 < 0.75 of the
        // mass, so the nucleus is the first four: classes 3, 0, 5, 2.
        let z: f64 = row.iter().map(|&l| (l as f64).exp()).sum();
        let nucleus = [3usize, 0, 5, 2];
        let kept: f64 = nucleus.iter().map(|&i| (row[i] as f64).exp() / z).sum();
        for (i, &l) in row.iter().enumerate() {
            let f = drawn.iter().filter(|&&c| c as usize == i).count() as f64 / rows as f64;
            if !nucleus.contains(&i) {
                assert_eq!(f, 0.0, "class {i} is outside the nucleus");
                continue;
            }
            let p = (l as f64).exp() / z / kept;
            let sd = (p * (1.0 - p) / rows as f64).sqrt();
            assert!(
                (f - p).abs() < 4.0 * sd,
                "class {i}: {f} drawn, {p} expected"
            );
        }
    }

    /// The emulator as the kernel's launch.
    fn emulated(
        spec: &DrawSpec,
        noise: &DrawNoise,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let Some(l) = launch_of(spec, noise) else {
            return Ok(None);
        };
        let out = emulate(&MODULE, &l).map_err(candle_core::Error::Msg)?;
        Ok(Some((out.outputs[0].clone(), out.outputs[1].clone())))
    }

    /// The first-call check on the CPU, with the emulator as the launch: it passes for the kernel and then returns
    /// the counter's draw (every later call needing no given noise); it turns a kernel that draws otherwise off
    /// and returns candle's draw; a launch error turns it off too.
    #[test]
    fn the_first_call_check_trusts_the_kernel_and_turns_a_wrong_one_off() {
        let (rows, classes) = (4, 64);
        let cond = values(rows * classes, 11, &[rows, classes], 4.0, DType::F32);
        let uncond = values(rows * classes, 12, &[rows, classes], 4.0, DType::F32);
        let noise = gumbel(rows, classes, 13);
        let spec = cfg_spec(&cond, &uncond, 5.0, 1.0);
        let key = |step| DrawNoise::Counter {
            seed: 9,
            step,
            counter: None,
        };
        let composed =
            |g: Option<&Tensor>| device_cfg_draw_with(&cond, &uncond, &guided(5.0, 1.0), g);
        let candle = codes(&composed(Some(&noise)).unwrap().0);

        type Launcher<'a> =
            &'a dyn Fn(&DrawSpec, &DrawNoise) -> candle_core::Result<Option<(Tensor, Tensor)>>;
        // A call under `trust` at `step`, with cuRAND's stand-in noise given.
        let call = |trust: &Trust, step, capturing: bool, launch: Launcher| {
            let draw = checked_draw(
                trust,
                &spec,
                key(step),
                || Ok(capturing),
                launch,
                || Ok(Some(noise.clone())),
                composed,
            );
            codes(&draw.unwrap().0)
        };
        let fresh = || Trust::new("PAIRUNI_TEST_UNSET", "test draw kernel");

        let trust = fresh();
        let first = call(&trust, 0, false, &emulated);
        assert_eq!(trust.status(), "trusted");
        assert_eq!(
            first,
            run(&spec, &key(0)).0,
            "the check returns the counter's draw"
        );
        let no_noise = || -> candle_core::Result<Option<Tensor>> { panic!("noise asked for") };
        let second = checked_draw(
            &trust,
            &spec,
            key(1),
            || Ok(false),
            emulated,
            no_noise,
            composed,
        );
        assert_eq!(codes(&second.unwrap().0), run(&spec, &key(1)).0);

        // A kernel that mixes with another weight draws other codes: off, and candle's draw comes back, as it does
        // on every later call.
        let wrong = |s: &DrawSpec, n: &DrawNoise| {
            emulated(
                &DrawSpec {
                    cfg_weight: 1.0,
                    ..*s
                },
                n,
            )
        };
        let trust = fresh();
        assert_eq!(call(&trust, 0, false, &wrong), candle);
        assert_eq!(trust.status(), "off");
        let failure = trust.failure().unwrap();
        assert!(failure.contains("drew class"), "{failure}");
        assert_eq!(call(&trust, 1, false, &emulated), candle);

        // A launch that fails: off, candle's draw.
        let failing =
            |_: &DrawSpec, _: &DrawNoise| -> candle_core::Result<Option<(Tensor, Tensor)>> {
                candle_core::bail!("no device")
            };
        let trust = fresh();
        assert_eq!(call(&trust, 0, false, &failing), candle);
        assert_eq!(trust.status(), "off");

        // The first call inside a capture runs candle's ops and leaves the check for later.
        let trust = fresh();
        assert_eq!(call(&trust, 0, true, &emulated), candle);
        assert_eq!(trust.status(), "unchecked");
    }

    /// The first-call check accepts a nucleus draw whose boundary falls a rounding away from the host's (f32
    /// masses in the kernel, f64 on the host), within [`NUCLEUS_SLACK`], and nothing further.
    #[test]
    fn the_first_call_check_accepts_a_nucleus_boundary_a_rounding_away() {
        // Probabilities 0.4, 0.3, 0.2, 0.1: top-p just below 0.7 keeps classes 0 and 1, just above it also 2.
        let row: Vec<f32> = [4f32, 3.0, 2.0, 1.0].iter().map(|p| p.ln()).collect();
        let logits = Tensor::from_vec(row, (1, 4), &Device::Cpu).unwrap();
        let zero = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
        let top_p = 0.7 - 3e-5;
        let s = TextSampling {
            top_p,
            ..TextSampling::default()
        };
        let spec = DrawSpec {
            cond: &logits,
            uncond: None,
            bias: Some(&zero),
            cfg_weight: 1.0,
            temperature: 1.0,
            logprob_temperature: 1.0,
            top_p,
        };
        // Noise that favours class 2, or class 3.
        let favouring = |c: usize| {
            let mut g = vec![0f32; 4];
            g[c] = 50.0;
            Tensor::from_vec(g, (1, 4), &Device::Cpu).unwrap()
        };
        let composed = |g: Option<&Tensor>| device_token_draw_with(&logits, &zero, &s, g);
        // The kernel run at another top-p, standing in for one whose f32 masses end the nucleus elsewhere.
        let shifted = |by: f64| {
            move |sp: &DrawSpec, n: &DrawNoise| {
                emulated(
                    &DrawSpec {
                        top_p: sp.top_p + by,
                        ..*sp
                    },
                    n,
                )
            }
        };
        let key = DrawNoise::Counter {
            seed: 3,
            step: 0,
            counter: None,
        };
        let check = |launch_by: f64, favoured: usize| {
            let trust = Trust::new("PAIRUNI_TEST_UNSET", "test draw kernel");
            let noise = favouring(favoured);
            let drawn = checked_draw(
                &trust,
                &spec,
                key,
                || Ok(false),
                shifted(launch_by),
                || Ok(Some(noise.clone())),
                composed,
            )
            .unwrap();
            (trust.status(), trust.failure(), codes(&drawn.0))
        };
        assert_eq!(codes(&composed(Some(&favouring(2))).unwrap().0), vec![0]);
        // 5e-5 further: class 2 joins the kernel's nucleus and is drawn; accepted, and the counter's draw returned.
        let (status, failure, _) = check(5e-5, 2);
        assert_eq!(status, "trusted", "{failure:?}");
        // 0.25 further: class 3 joins too, which no nucleus within the slack holds.
        let (status, failure, drawn) = check(0.25, 3);
        assert_eq!(status, "off");
        assert!(failure.unwrap().contains("row 0 drew class Some(3)"));
        assert_eq!(drawn, vec![0], "candle's draw comes back");
    }

    /// Janus-Pro's image rows at random weights: nearly flat over 16,384 codes, where the kernel's f32 masses and
    /// the host's f64 ones end the nucleus a class apart most often. Every row the two draw differently must be
    /// within [`NUCLEUS_SLACK`], as the first-call check requires.
    #[test]
    #[ignore = "emulates 8 rows of 16,384 classes over 1,024 threads (about a minute)"]
    fn flat_rows_differ_from_the_host_nucleus_only_within_the_slack() {
        let (rows, classes) = (8, 16_384);
        let cond = uniform(rows, classes, 31, -0.02, 0.02)
            .to_dtype(DType::BF16)
            .unwrap();
        let uncond = uniform(rows, classes, 32, -0.02, 0.02)
            .to_dtype(DType::BF16)
            .unwrap();
        let noise = gumbel_of(&uniform(rows, classes, 33, 1e-6, 1.0));
        let s = ImageSampling {
            cfg_weight: 5.0,
            temperature: 1.0,
            top_p: 0.9,
        };
        let spec = DrawSpec {
            top_p: 0.9,
            ..cfg_spec(&cond, &uncond, 5.0, 1.0)
        };
        let (ours, _) = run_once(&spec, &DrawNoise::Given(&noise));
        let (want, _) = device_cfg_draw_with(&cond, &uncond, &s, Some(&noise)).unwrap();
        let differing: Vec<usize> = (0..rows).filter(|&r| ours[r] != codes(&want)[r]).collect();
        eprintln!(
            "{} of {rows} rows drew another code than the host nucleus",
            differing.len()
        );
        if !differing.is_empty() {
            let tolerated = within_nucleus_slack(&spec, Some(&noise), &ours, &differing).unwrap();
            assert!(tolerated.is_ok(), "row {tolerated:?} outside the slack");
        }
    }

    #[test]
    fn launches_it_cannot_serve_are_refused() {
        let cond = values(8, 1, &[2, 4], 1.0, DType::F32);
        let base = DrawSpec {
            cond: &cond,
            uncond: None,
            bias: None,
            cfg_weight: 1.0,
            temperature: 1.0,
            logprob_temperature: 1.0,
            top_p: 1.0,
        };
        let keyed = DrawNoise::Counter {
            seed: 0,
            step: 0,
            counter: None,
        };
        assert!(launch_of(&base, &keyed).is_some());
        let strided = values(8, 1, &[4, 2], 1.0, DType::F32).t().unwrap();
        let f16 = cond.to_dtype(DType::F16).unwrap();
        let wrong_noise = values(6, 1, &[2, 3], 1.0, DType::F32);
        for spec in [
            DrawSpec {
                cond: &strided,
                ..base
            },
            DrawSpec { cond: &f16, ..base },
            DrawSpec {
                bias: Some(&wrong_noise),
                ..base
            },
            DrawSpec {
                uncond: Some(&cond),
                bias: Some(&cond.get(0).unwrap()),
                ..base
            },
        ] {
            assert!(launch_of(&spec, &keyed).is_none());
        }
        assert!(launch_of(&base, &DrawNoise::Given(&wrong_noise)).is_none());
    }
}
