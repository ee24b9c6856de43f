//! A decode step's Gumbel-max draw as one CUDA kernel: the CFG mix (or the banned-token bias), the tempered
//! scores, the noise, the argmax and the drawn class's log-prob (`[model] draw_kernel`).
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

// One block per row (gridDim.x rows of `classes` logits, contiguous), any whole number of warps. Greedy when
// inv_t <= 0. `noise` (rows x classes, f32) replaces the counter's noise when given; the step is
// `step + *counter` (counter optional).
template <typename T>
__device__ void gumbel_draw(const T* cond, const T* uncond, const float* bias, const float* noise,
                            const unsigned int* counter, unsigned int step, long seed, int classes,
                            float cfg_weight, float inv_t, float lp_inv_t, unsigned int* codes, float* lps) {
    // Per warp: its best score and index, its largest log-prob logit, its part of the normaliser (an array each:
    // no array is reused, so two barriers suffice).
    __shared__ float s_best[32], s_top[32], s_sum[32];
    __shared__ int s_idx[32];
    const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const long base = (long)row * classes;
    const unsigned long long draw = (unsigned long long)step + (counter ? counter[0] : 0u);
    const unsigned long long first = (draw * gridDim.x + row) * (unsigned long long)classes;
    const float neg_inf = __uint_as_float(0xff800000u);

    // The largest score and the largest log-prob logit.
    float best = neg_inf, top = neg_inf;
    int best_i = classes;  // none yet
    for (int i = tid; i < classes; i += blockDim.x) {
        const float mixed = draw_mixed(cond, uncond, bias, base + i, i, cfg_weight);
        float s = mixed;
        if (inv_t > 0.f) {
            const float g = noise ? noise[base + i]
                                  : -logf(-logf(draw_uniform((unsigned long long)seed, first + i)));
            s = __fadd_rn(__fmul_rn(mixed, inv_t), g);
        }
        take_larger(best, best_i, s, i);
        top = fmaxf(top, __fmul_rn(draw_lp_logit(cond, uncond, bias, base + i, i, cfg_weight), lp_inv_t));
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
        float cfg_weight, float inv_t, float lp_inv_t, unsigned int* codes, float* lps) {                     \
    gumbel_draw<T>(cond, uncond, bias, noise, counter, step, seed, classes, cfg_weight, inv_t, lp_inv_t,      \
                   codes, lps);                                                                               \
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
        && spec.logprob_temperature > 0.0;
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
        if let Some(row) = (0..a.len().max(b.len())).find(|&r| a.get(r) != b.get(r)) {
            trust.record(Err(format!(
                "row {row} drew class {:?} where candle's ops drew {:?} (of {} rows)",
                a.get(row),
                b.get(row),
                b.len()
            )));
            return Ok(theirs);
        }
        if !trust.check(&ours.1, &theirs.1, CHECK_TOLERANCE)? {
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
    use crate::sampling::{device_cfg_draw_with, device_token_draw_with, TextSampling};
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
        values(rows * classes, seed, &[rows, classes], 1.0, DType::F32)
            .affine(0.499, 0.5)
            .unwrap()
            .log()
            .unwrap()
            .neg()
            .unwrap()
            .log()
            .unwrap()
            .neg()
            .unwrap()
    }

    fn run(spec: &DrawSpec, noise: &DrawNoise) -> (Vec<u32>, Tensor) {
        let out = emulate(&MODULE, &launch_of(spec, noise).unwrap()).unwrap();
        let codes = out.outputs[0].flatten_all().unwrap().to_vec1().unwrap();
        (codes, out.outputs[1].clone())
    }

    fn codes(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
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
                let (want, want_lp) = device_cfg_draw_with(&cond, &uncond, w, t, given).unwrap();
                assert_eq!(ours, codes(&want), "{dtype:?} w {w} t {t}");
                let err = crate::layers::rel_diff(&lp, &want_lp).unwrap();
                assert!(err < 1e-5, "{dtype:?} w {w} t {t}: log-probs {err}");
            }
            // A kernel that drew from the conditional logits alone would draw other codes.
            let spec = cfg_spec(&cond, &uncond, 5.0, 1.0);
            let (ours, _) = run(&spec, &DrawNoise::Given(&noise));
            let (unmixed, _) = device_cfg_draw_with(&cond, &cond, 5.0, 1.0, Some(&noise)).unwrap();
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
        let composed = |g: Option<&Tensor>| device_cfg_draw_with(&cond, &uncond, 5.0, 1.0, g);
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
