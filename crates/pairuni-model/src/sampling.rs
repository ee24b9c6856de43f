//! Rollout records and the per-row sampling rule (temperature, top-p, greedy) shared by text and image decoding,
//! plus the device-side CFG draw used by image rollouts on an accelerator.

use crate::draw_kernel::{DrawNoise, DrawSpec};
use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Knobs of text answer sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextSampling {
    /// Longest answer in tokens (the stop token counts).
    pub max_new_tokens: usize,
    /// Softmax temperature T (> 0 unless greedy); recorded log-probs use it.
    pub temperature: f64,
    /// Nucleus mass kept (1.0 = off).
    pub top_p: f64,
    /// Argmax decoding (then log-probs are recorded at T = 1).
    pub greedy: bool,
}

impl Default for TextSampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 16,
            temperature: 1.0,
            top_p: 1.0,
            greedy: false,
        }
    }
}

impl TextSampling {
    /// The temperature log-probs are measured at: 1 when greedy, else `temperature`.
    pub fn logprob_temperature(&self) -> f64 {
        if self.greedy {
            1.0
        } else {
            self.temperature
        }
    }
}

/// Knobs of CFG image sampling (METHOD.md §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSampling {
    /// Guidance weight w in l = l_u + w (l_c − l_u) (paper: 5).
    pub cfg_weight: f64,
    /// Softmax temperature T (paper: 1); 0 means argmax.
    pub temperature: f64,
    /// Nucleus mass kept (1.0 = off).
    pub top_p: f64,
}

impl Default for ImageSampling {
    fn default() -> Self {
        Self {
            cfg_weight: 5.0,
            temperature: 1.0,
            top_p: 1.0,
        }
    }
}

/// Which distribution image log-probs are read from under CFG.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub enum CfgLogprobPolicy {
    /// The conditional branch alone (T2I-R1 / CoRL), default.
    #[default]
    Conditional,
    /// The guided mix l_u + w (l_c − l_u) that was sampled from.
    GuidedMix {
        /// Guidance weight w.
        cfg_weight: f64,
    },
}

/// Where a sampler turns logits into tokens: CFG image codes, or answer tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SamplerSite {
    /// [`SamplerSite::Host`] on the CPU; [`SamplerSite::Device`] on an accelerator, with top-p only when the
    /// draw kernel is asked for (without it a nucleus is taken on the host anyway).
    #[default]
    Auto,
    /// Logits go to the host every step; the draw uses the caller's ChaCha stream directly (bit-reproducible,
    /// supports top-p).
    Host,
    /// Gumbel-max draw and log-prob on the device (after the CFG mix, for images). Image codes and log-probs are
    /// read back once at the end; answer tokens each step, as the few bytes the host needs to tell finished rows
    /// (instead of the whole vocabulary's logits). The noise comes from one seed drawn from the caller's stream:
    /// same distribution as the host sampler, different draws. Top-p through the draw kernel's nucleus, or
    /// without it through a host nucleus on the device's scores each step ([`device_cfg_draw_with`]).
    Device,
}

/// Which parameters a trainer updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ParamSelection {
    /// `model.language_model.*` and `lm_head.*` only.
    LanguageModel,
    /// Everything except the frozen image tokenizer (`model.vqmodel.*`).
    All,
    /// Parameters whose name starts with one of these prefixes.
    Custom(Vec<String>),
}

/// One sampled answer: enough to recompute its log-probs by teacher forcing.
#[derive(Debug, Clone)]
pub struct TextRollout {
    /// Preprocessed pixels [3, H, W] (f32, model space).
    pub image: Tensor,
    /// Prompt ids including the image placeholder slots.
    pub prompt_ids: Vec<u32>,
    /// Answer ids; includes the stop token if one was sampled.
    pub answer_ids: Vec<u32>,
    /// Sampling-time log-prob of each answer token under softmax(logits / T) (no top-p truncation).
    pub logprobs: Vec<f32>,
    /// Decoded answer without the stop token.
    pub text: String,
}

/// One sampled image.
#[derive(Debug, Clone)]
pub struct ImageRollout {
    /// Generation prompt ids ending with begin-of-image.
    pub prompt_ids: Vec<u32>,
    /// `image_tokens_per_image` codes.
    pub codes: Vec<u32>,
    /// Conditional-branch log-prob of each code at sampling time, softmax(l_c / T) (no top-p truncation).
    pub logprobs: Vec<f32>,
}

/// log-softmax of `logits / t` in f64 for numerical headroom, returned as f32 (the samplers' reference).
#[cfg(test)]
pub(crate) fn log_softmax_t(logits: &[f32], t: f64) -> Vec<f32> {
    let (max, lse) = max_and_logsumexp_t(logits, t);
    logits
        .iter()
        .map(|&l| ((l as f64 - max) / t - lse) as f32)
        .collect()
}

/// log-softmax(logits / t)[index] alone, with exactly `log_softmax_t`'s arithmetic (so the same bits) but
/// without building the whole vector: the CFG decode loop needs one entry per row and step.
pub(crate) fn log_prob_t(logits: &[f32], t: f64, index: usize) -> f32 {
    let (max, lse) = max_and_logsumexp_t(logits, t);
    ((logits[index] as f64 - max) / t - lse) as f32
}

/// The largest logit and log Σ exp((l − max) / t), in f64.
fn max_and_logsumexp_t(logits: &[f32], t: f64) -> (f64, f64) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&l| ((l as f64 - max) / t).exp())
        .sum::<f64>()
        .ln();
    (max, lse)
}

/// Index of the largest value (first on ties).
pub(crate) fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Draws an index from softmax(logits / t) restricted to the top-p nucleus; t ≤ 0 means argmax (and draws no
/// number from `rng`).
#[cfg(test)]
pub(crate) fn sample_index(logits: &[f32], t: f64, top_p: f64, rng: &mut ChaCha8Rng) -> usize {
    if t <= 0.0 {
        return argmax(logits);
    }
    sample_index_at(logits, t, top_p, rng.random::<f64>())
}

/// [`sample_index`] at the uniform `u` ∈ [0, 1) drawn beforehand (t > 0), so that rows can be drawn on several
/// threads with the numbers a single thread would have drawn in row order.
pub(crate) fn sample_index_at(logits: &[f32], t: f64, top_p: f64, u: f64) -> usize {
    if t <= 0.0 {
        return argmax(logits);
    }
    sample_with_normaliser(logits, t, top_p, u, max_and_logsumexp_t(logits, t))
}

/// [`sample_index_at`] and the drawn entry's [`log_prob_t`] at temperature `t_lp`, sharing one pass over the
/// row when `t_lp` is the sampling temperature (the same bits as the two calls).
pub(crate) fn sample_with_logprob_at(
    logits: &[f32],
    t: f64,
    top_p: f64,
    u: f64,
    t_lp: f64,
) -> (usize, f32) {
    if t <= 0.0 || t != t_lp {
        let i = sample_index_at(logits, t, top_p, u);
        return (i, log_prob_t(logits, t_lp, i));
    }
    let (max, lse) = max_and_logsumexp_t(logits, t);
    let i = sample_with_normaliser(logits, t, top_p, u, (max, lse));
    (i, ((logits[i] as f64 - max) / t - lse) as f32)
}

/// The draw of [`sample_index_at`] (t > 0) given the row's largest logit and log-normaliser.
fn sample_with_normaliser(
    logits: &[f32],
    t: f64,
    top_p: f64,
    u: f64,
    (max, lse): (f64, f64),
) -> usize {
    // Each probability with `log_softmax_t`'s arithmetic (rounded to f32, then exponentiated in f64), computed
    // only as far as the draw needs it.
    let prob = |l: f32| ((((l as f64 - max) / t - lse) as f32) as f64).exp();
    if top_p >= 1.0 {
        let mut acc = 0.0;
        for (i, &l) in logits.iter().enumerate() {
            acc += prob(l);
            if u < acc {
                return i;
            }
        }
        return argmax(logits);
    }
    let probs: Vec<f64> = logits.iter().map(|&l| prob(l)).collect();
    // Descending probability, ties in index order: the draw stays reproducible when probabilities tie.
    let order = heaviest_prefix(
        &probs,
        |a, b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)),
        top_p,
    );
    if order.is_empty() {
        // Only NaN probabilities.
        return argmax(logits);
    }
    let mut kept = 0;
    let mut mass = 0.0;
    for &i in &order {
        mass += probs[i];
        kept += 1;
        if mass >= top_p {
            break;
        }
    }
    let target = u * mass;
    let mut acc = 0.0;
    for &i in &order[..kept] {
        acc += probs[i];
        if target < acc {
            return i;
        }
    }
    order[kept - 1]
}

/// The entries of `0..n` whose weight is a number, in the order `cmp` (a total order, by descending weight), as
/// far as their running sum of weights first reaches `target`, or all of them. A nucleus is usually a small part
/// of a large vocabulary, so only the entries at or above a threshold are sorted, the threshold halving until
/// they hold the target: every entry below it comes after every entry above it in `cmp`'s order, so the sorted
/// candidates are the whole sort's first entries, in its order.
fn heaviest_prefix(
    weights: &[f64],
    cmp: impl Fn(usize, usize) -> std::cmp::Ordering,
    target: f64,
) -> Vec<usize> {
    let top = weights.iter().copied().fold(0.0, f64::max);
    let mut halvings = 1;
    loop {
        // 2^-1075 rounds to 0: every weight that is a number is a candidate.
        let threshold = top * 0.5f64.powi(halvings.min(1075));
        let mut candidates: Vec<usize> = (0..weights.len())
            .filter(|&i| weights[i] >= threshold)
            .collect();
        let last = threshold == 0.0;
        // Summed in index order the weights can differ from their sorted sum by a few roundings.
        let unordered: f64 = candidates.iter().map(|&i| weights[i]).sum();
        if last || unordered >= target * (1.0 - 1e-9) {
            candidates.sort_unstable_by(|&a, &b| cmp(a, b));
            let mut sum = 0.0;
            let reached = candidates.iter().any(|&i| {
                sum += weights[i];
                sum >= target
            });
            if reached || last {
                return candidates;
            }
        }
        halvings += (halvings / 4).max(1);
    }
}

/// Rows × entries below which drawing rows on several threads costs more than it saves.
const PARALLEL_DRAW_WORK: usize = 1 << 16;

/// `draw(row, u)` for each of `rows`, with `u` the next uniform of `rng` for each row in order when
/// `needs_uniform` (else 0). Rows of `width` entries each run on rayon's threads when there is enough work (a
/// Janus-Pro text step: 16 rows × 102,400 logits); the numbers are drawn first, so the result does not depend
/// on the thread count.
pub(crate) fn draw_rows<T: Send>(
    rows: &[usize],
    width: usize,
    needs_uniform: bool,
    rng: &mut ChaCha8Rng,
    draw: impl Fn(usize, f64) -> T + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let uniforms: Vec<(usize, f64)> = rows
        .iter()
        .map(|&r| {
            let u = if needs_uniform {
                rng.random::<f64>()
            } else {
                0.0
            };
            (r, u)
        })
        .collect();
    if rows.len() > 1 && rows.len() * width >= PARALLEL_DRAW_WORK {
        uniforms.par_iter().map(|&(r, u)| draw(r, u)).collect()
    } else {
        uniforms.iter().map(|&(r, u)| draw(r, u)).collect()
    }
}

/// Uniform noise for Gumbel-max draws on the model's device, reproducible from one seed: the device's own
/// generator on an accelerator (seeded once, no host traffic per step), a ChaCha stream uploaded per step on the
/// CPU (where `Device::set_seed` is not supported).
pub struct GumbelNoise {
    device: Device,
    host: Option<ChaCha8Rng>,
    /// The seed, which also keys the draw kernel's own noise ([`crate::draw_kernel`]).
    seed: u64,
    /// Eager draws taken: the draw kernel's step.
    draws: u32,
    /// Whether draws go through the draw kernel where it runs.
    kernel: bool,
}

impl GumbelNoise {
    /// Noise for `device` from `seed`.
    pub fn new(device: &Device, seed: u64) -> candle_core::Result<Self> {
        let host = if device.is_cpu() {
            Some(ChaCha8Rng::seed_from_u64(seed))
        } else {
            device.set_seed(seed)?;
            None
        };
        Ok(Self {
            device: device.clone(),
            host,
            seed,
            draws: 0,
            kernel: false,
        })
    }

    /// The same noise, with draws through the draw kernel ([`crate::draw_kernel`]) where it runs when `on`.
    pub fn with_draw_kernel(mut self, on: bool) -> Self {
        self.kernel = on;
        self
    }

    /// Whether a draw needs noise from here: not when the draw kernel makes its own (asked for, on a CUDA
    /// device, trusted).
    pub(crate) fn needed(&self) -> bool {
        !crate::draw_kernel::ready(&self.device, self.kernel)
    }

    /// The seed, which keys the draw kernel's noise (with a static decode's device step counter).
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    /// The next eager draw's kernel noise key.
    fn next_key(&mut self) -> DrawNoise<'static> {
        let step = self.draws;
        self.draws = self.draws.wrapping_add(1);
        DrawNoise::Counter {
            seed: self.seed,
            step,
            counter: None,
        }
    }

    /// Standard Gumbel noise −ln(−ln u) of `shape` (rows, classes), f32.
    pub(crate) fn sample(&mut self, shape: (usize, usize)) -> candle_core::Result<Tensor> {
        let u = match &mut self.host {
            Some(rng) => {
                let v: Vec<f32> = (0..shape.0 * shape.1)
                    .map(|_| rng.random::<f32>())
                    .collect();
                Tensor::from_vec(v, shape, &self.device)?
            }
            None => Tensor::rand(0f32, 1f32, shape, &self.device)?,
        };
        // u = 1 would give +∞ (a certain win) and u = 0 −∞; generators differ on which end they include, and
        // over 10⁸ draws per rollout both ends occur. Clamping moves 2⁻²⁴ of mass, far below sampling noise.
        let u = u.clamp(f32::MIN_POSITIVE, 1.0 - f32::EPSILON / 2.0)?;
        u.log()?.neg()?.log()?.neg()
    }
}

/// One CFG draw for `p` prompts on the logits' device. `cond`, `uncond`: [p, K] f32 logits of the conditional and
/// unconditional rows; the code is drawn from softmax((l_u + w (l_c − l_u)) / T), restricted to its top-p nucleus,
/// by Gumbel-max (argmax when T ≤ 0). Returns the codes [p, 1] (u32) and their conditional log-probs under
/// softmax(l_c / T') [p, 1] (f32), T' = T, or 1 when T ≤ 0, as the host sampler records them. Nothing is read back
/// unless top-p is on and the draw kernel does not take the draw ([`device_cfg_draw_with`]).
///
/// With the noise's draw kernel asked for ([`GumbelNoise::with_draw_kernel`]) on a CUDA device, the whole draw is
/// one kernel with noise of its own ([`crate::draw_kernel`]).
pub fn device_cfg_draw(
    cond: &Tensor,
    uncond: &Tensor,
    s: &ImageSampling,
    noise: &mut GumbelNoise,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (kernel, key, shape) = (noise.kernel, noise.next_key(), cond.dims2()?);
    cfg_draw(cond, uncond, s, kernel, key, || {
        (s.temperature > 0.0)
            .then(|| noise.sample(shape))
            .transpose()
    })
}

/// A CFG draw ([`device_cfg_draw_with`]) through the draw kernel when `kernel` is asked for and it runs, with the
/// noise `key`; else through candle's ops on the noise `given` produces (asked for only then).
pub(crate) fn cfg_draw(
    cond: &Tensor,
    uncond: &Tensor,
    s: &ImageSampling,
    kernel: bool,
    key: DrawNoise,
    given: impl FnOnce() -> candle_core::Result<Option<Tensor>>,
) -> candle_core::Result<(Tensor, Tensor)> {
    if !(kernel && crate::nvrtc::runs_kernels(cond.device())) {
        return device_cfg_draw_with(cond, uncond, s, given()?.as_ref());
    }
    let (c, u) = (kernel_logits(cond)?, kernel_logits(uncond)?);
    let spec = DrawSpec {
        cond: &c,
        uncond: Some(&u),
        bias: None,
        cfg_weight: s.cfg_weight,
        temperature: s.temperature,
        logprob_temperature: if s.temperature > 0.0 {
            s.temperature
        } else {
            1.0
        },
        top_p: s.top_p,
    };
    crate::draw_kernel::draw(&spec, kernel, key, given, |g| {
        device_cfg_draw_with(cond, uncond, s, g)
    })
}

/// Logits as the draw kernel takes them: contiguous, bf16 or f32 (other dtypes in f32, as candle's draw reads
/// them).
fn kernel_logits(t: &Tensor) -> candle_core::Result<Tensor> {
    match t.dtype() {
        DType::BF16 | DType::F32 => t.contiguous(),
        _ => t.to_dtype(DType::F32),
    }
}

/// [`device_cfg_draw`] with its Gumbel noise [p, K] given (drawn beforehand, or read from a fixed buffer by a
/// captured decode step); `None` only when the temperature is ≤ 0. With top-p the nucleus and the argmax in it
/// are taken on the host ([`nucleus_gumbel_argmax`]): candle has no op for either.
pub fn device_cfg_draw_with(
    cond: &Tensor,
    uncond: &Tensor,
    s: &ImageSampling,
    gumbel: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let cond = cond.to_dtype(DType::F32)?;
    let mixed = draw_logits(&cond, Some(uncond), None, s.cfg_weight)?;
    let draw = match gumbel {
        Some(g) if s.temperature > 0.0 => Some((s.temperature, g)),
        None if s.temperature > 0.0 => {
            candle_core::bail!("a draw at temperature {} needs Gumbel noise", s.temperature)
        }
        _ => None,
    };
    let code = gumbel_argmax(&mixed, draw, s.top_p)?;
    let lp_t = if s.temperature > 0.0 {
        s.temperature
    } else {
        1.0
    };
    let lp = log_prob_at(&cond, lp_t, &code)?;
    Ok((code.detach(), lp.detach()))
}

/// One draw of the next answer token for every row on the logits' device. `logits`: [b, V] f32; `bias` [1, V]
/// is added first (banned tokens). Greedy takes the argmax; otherwise Gumbel-max at `temperature`. Returns the
/// tokens [b, 1] (u32) and their log-probs under softmax((logits + bias) / `logprob_temperature`) [b, 1] (f32).
pub fn device_token_draw(
    logits: &Tensor,
    bias: &Tensor,
    s: &TextSampling,
    noise: &mut GumbelNoise,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (kernel, key, shape) = (noise.kernel, noise.next_key(), logits.dims2()?);
    token_draw(logits, bias, s, kernel, key, || {
        (!s.greedy).then(|| noise.sample(shape)).transpose()
    })
}

/// An answer draw ([`device_token_draw_with`]) through the draw kernel when `kernel` is asked for and it runs,
/// with the noise `key`; else through candle's ops on the noise `given` produces (asked for only then).
pub(crate) fn token_draw(
    logits: &Tensor,
    bias: &Tensor,
    s: &TextSampling,
    kernel: bool,
    key: DrawNoise,
    given: impl FnOnce() -> candle_core::Result<Option<Tensor>>,
) -> candle_core::Result<(Tensor, Tensor)> {
    if !(kernel && crate::nvrtc::runs_kernels(logits.device())) {
        return device_token_draw_with(logits, bias, s, given()?.as_ref());
    }
    let l = kernel_logits(logits)?;
    let spec = DrawSpec {
        cond: &l,
        uncond: None,
        bias: Some(bias),
        cfg_weight: 1.0,
        temperature: if s.greedy { 0.0 } else { s.temperature },
        logprob_temperature: s.logprob_temperature(),
        top_p: s.top_p,
    };
    crate::draw_kernel::draw(&spec, kernel, key, given, |g| {
        device_token_draw_with(logits, bias, s, g)
    })
}

/// [`device_token_draw`] with its Gumbel noise [b, V] given (drawn beforehand, or read from a fixed buffer by a
/// captured decode step); `None` only when greedy. With top-p the draw is taken on the host, as in
/// [`device_cfg_draw_with`].
pub fn device_token_draw_with(
    logits: &Tensor,
    bias: &Tensor,
    s: &TextSampling,
    gumbel: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let biased = draw_logits(logits, None, Some(bias), 1.0)?;
    let draw = match gumbel {
        Some(g) if !s.greedy => Some((s.temperature, g)),
        None if !s.greedy => candle_core::bail!("a sampled answer draw needs Gumbel noise"),
        _ => None,
    };
    let tok = gumbel_argmax(&biased, draw, s.top_p)?;
    let lp = log_prob_at(&biased, s.logprob_temperature(), &tok)?;
    Ok((tok, lp))
}

/// The f32 logits [rows, classes] a device draw is taken from: with CFG the mix u + (c − u)·w of `cond` and
/// `uncond`, else `cond` plus the [1, classes] `bias` when given (the draw kernel's arithmetic, op for op).
pub(crate) fn draw_logits(
    cond: &Tensor,
    uncond: Option<&Tensor>,
    bias: Option<&Tensor>,
    cfg_weight: f64,
) -> candle_core::Result<Tensor> {
    let cond = cond.to_dtype(DType::F32)?;
    match (uncond, bias) {
        (Some(u), _) => {
            let u = u.to_dtype(DType::F32)?;
            &u + ((&cond - &u)? * cfg_weight)?
        }
        (None, Some(b)) => cond.broadcast_add(b),
        (None, None) => Ok(cond),
    }
}

/// The argmax over the last dim [b, 1] (u32) of `scores`, or with `draw` = (T, Gumbel noise) of scores / T + noise:
/// a draw from softmax(scores / T), within its nucleus when `top_p` < 1.
fn gumbel_argmax(
    scores: &Tensor,
    draw: Option<(f64, &Tensor)>,
    top_p: f64,
) -> candle_core::Result<Tensor> {
    match draw {
        Some((t, g)) if top_p < 1.0 => {
            let x = scores.affine(1.0 / t, 0.0)?.to_vec2::<f32>()?;
            let g = g.to_vec2::<f32>()?;
            let codes: Vec<u32> = x
                .iter()
                .zip(&g)
                .map(|(x, g)| nucleus_gumbel_argmax(x, g, top_p) as u32)
                .collect();
            Tensor::from_vec(codes, (x.len(), 1), scores.device())
        }
        Some((t, g)) => (scores.affine(1.0 / t, 0.0)? + g)?.argmax_keepdim(D::Minus1),
        None => scores.argmax_keepdim(D::Minus1),
    }
}

/// A Gumbel-max draw from softmax(`x`) restricted to its top-p nucleus: the index of the largest `x + g` (the
/// lower index on a tie) among the classes of the shortest prefix, in the order of descending `x` and ascending
/// index among equals, whose probability reaches `top_p`. The draw kernel's rule ([`crate::draw_kernel`]), with its
/// f32 scores and the masses in f64; NaN entries are never drawn (a row of them draws 0).
pub(crate) fn nucleus_gumbel_argmax(x: &[f32], g: &[f32], top_p: f64) -> usize {
    nucleus_gumbel_argmaxes(x, g, top_p, top_p)
        .first()
        .copied()
        .unwrap_or(0)
}

/// The draws of [`nucleus_gumbel_argmax`] for every nucleus mass from `low` to `high` (fractions of the whole),
/// each once, in the order the nuclei grow: what a correct draw kernel may give when its f32 masses place the
/// boundary a rounding away from these f64 ones.
pub(crate) fn nucleus_gumbel_argmaxes(x: &[f32], g: &[f32], low: f64, high: f64) -> Vec<usize> {
    let x_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mass = |v: f32| ((v - x_max) as f64).exp();
    // A NaN score has a NaN mass, which `heaviest_prefix` leaves out.
    let masses: Vec<f64> = x.iter().map(|&v| mass(v)).collect();
    let total: f64 = masses.iter().filter(|m| !m.is_nan()).sum();
    // Descending x, equal entries (−0 and +0 too) in index order; the masses descend with x.
    let order = heaviest_prefix(
        &masses,
        |a, b| {
            x[b].partial_cmp(&x[a])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        },
        high * total,
    );
    let mut kept_mass = 0.0;
    let mut best: Option<(f32, usize)> = None;
    let mut draws = Vec::new();
    for &i in &order {
        let score = x[i] + g[i];
        if best.is_none_or(|(s, b)| score > s || (score == s && i < b)) {
            best = Some((score, i));
        }
        kept_mass += masses[i];
        // This prefix is the nucleus of every mass in (the previous prefix's, this one's].
        if kept_mass >= low * total {
            let drawn = best.map_or(0, |(_, i)| i);
            if draws.last() != Some(&drawn) {
                draws.push(drawn);
            }
            if kept_mass >= high * total {
                break;
            }
        }
    }
    draws
}

/// log-softmax(logits / t) [b, V] at the indices `idx` [b, 1].
fn log_prob_at(logits: &Tensor, t: f64, idx: &Tensor) -> candle_core::Result<Tensor> {
    crate::layers::log_softmax_last(&logits.affine(1.0 / t, 0.0)?)?.gather(idx, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises_and_respects_temperature() {
        let l = [1.0f32, 2.0, 3.0];
        let a = log_softmax_t(&l, 1.0);
        let s: f64 = a.iter().map(|&x| (x as f64).exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        let b = log_softmax_t(&l, 0.5);
        // Lower temperature sharpens: the top token gains probability.
        assert!(b[2] > a[2]);
        assert!((b[2] - log_softmax_t(&[2.0, 4.0, 6.0], 1.0)[2]).abs() < 1e-6);
    }

    #[test]
    fn one_log_prob_has_the_same_bits_as_the_whole_vector_entry() {
        let l: Vec<f32> = (0..97)
            .map(|i| ((i * 37) % 23) as f32 * 0.37 - 3.1)
            .collect();
        for t in [0.7, 1.0, 1.3] {
            let all = log_softmax_t(&l, t);
            for (i, want) in all.iter().enumerate() {
                assert_eq!(
                    log_prob_t(&l, t, i).to_bits(),
                    want.to_bits(),
                    "t {t} index {i}"
                );
            }
        }
    }

    /// The full-vector sampler as it was before draws computed probabilities lazily: log-softmax of the whole
    /// row, every probability, then the scan.
    fn eager_sample(logits: &[f32], t: f64, top_p: f64, u: f64) -> usize {
        let probs: Vec<f64> = log_softmax_t(logits, t)
            .iter()
            .map(|&l| (l as f64).exp())
            .collect();
        let mut order: Vec<usize> = (0..probs.len()).collect();
        if top_p < 1.0 {
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        }
        let mut kept = 0;
        let mut mass = 0.0;
        for &i in &order {
            mass += probs[i];
            kept += 1;
            if top_p < 1.0 && mass >= top_p {
                break;
            }
        }
        let target = if top_p < 1.0 { u * mass } else { u };
        let mut acc = 0.0;
        for &i in &order[..kept] {
            acc += probs[i];
            if target < acc {
                return i;
            }
        }
        if top_p < 1.0 {
            order[kept - 1]
        } else {
            argmax(logits)
        }
    }

    #[test]
    fn lazy_draws_pick_what_the_whole_vector_sampler_picked() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        // 5,000 and 20,000 entries: the nucleus is found from a selected prefix, grown once or more.
        for width in [2usize, 7, 512, 5000, 20_000] {
            let logits: Vec<f32> = (0..width)
                .map(|_| rng.random::<f32>() * 12.0 - 6.0)
                .collect();
            for (t, top_p) in [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9), (1.0, 0.3)] {
                for _ in 0..50 {
                    let u = rng.random::<f64>();
                    let want = eager_sample(&logits, t, top_p, u);
                    assert_eq!(
                        sample_index_at(&logits, t, top_p, u),
                        want,
                        "width {width}, t {t}, top-p {top_p}, u {u}"
                    );
                    for t_lp in [t, 1.0, 2.0] {
                        let (i, lp) = sample_with_logprob_at(&logits, t, top_p, u, t_lp);
                        assert_eq!(i, want);
                        assert_eq!(lp.to_bits(), log_prob_t(&logits, t_lp, i).to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn row_draws_take_the_uniforms_in_row_order_on_any_thread_count() {
        // Enough work to run on rayon's threads: the same draws as one thread taking rows in order.
        let width = 40_000;
        let mut gen = ChaCha8Rng::seed_from_u64(9);
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|_| (0..width).map(|_| gen.random::<f32>() * 8.0).collect())
            .collect();
        let active = [0usize, 2, 3, 5];
        let mut parallel_rng = ChaCha8Rng::seed_from_u64(1);
        let got = draw_rows(&active, width, true, &mut parallel_rng, |r, u| {
            sample_index_at(&rows[r], 1.0, 1.0, u)
        });
        let mut serial_rng = ChaCha8Rng::seed_from_u64(1);
        let want: Vec<usize> = active
            .iter()
            .map(|&r| sample_index(&rows[r], 1.0, 1.0, &mut serial_rng))
            .collect();
        assert_eq!(got, want);
        // Both streams are at the same place afterwards.
        assert_eq!(parallel_rng.random::<u64>(), serial_rng.random::<u64>());
        // No uniforms are drawn when none are needed (greedy).
        let mut untouched = ChaCha8Rng::seed_from_u64(1);
        draw_rows(&active, width, false, &mut untouched, |r, _| {
            argmax(&rows[r])
        });
        assert_eq!(
            untouched.random::<u64>(),
            ChaCha8Rng::seed_from_u64(1).random::<u64>()
        );
    }

    #[test]
    #[ignore = "timing: host draws of one Janus-Pro text step (16 rows × 102,400 logits), old vs new"]
    fn host_draw_timing() {
        let (rows_n, width) = (16usize, 102_400usize);
        let mut gen = ChaCha8Rng::seed_from_u64(2);
        let rows: Vec<Vec<f32>> = (0..rows_n)
            .map(|_| (0..width).map(|_| gen.random::<f32>() * 10.0).collect())
            .collect();
        let active: Vec<usize> = (0..rows_n).collect();
        let reps = 20;
        let time = |f: &mut dyn FnMut()| {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() * 1e3 / reps as f64
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let eager = time(&mut || {
            for r in &active {
                let u = rng.random::<f64>();
                let i = eager_sample(&rows[*r], 1.0, 1.0, u);
                std::hint::black_box(log_prob_t(&rows[*r], 1.0, i));
            }
        });
        let lazy = time(&mut || {
            std::hint::black_box(draw_rows(&active, width, true, &mut rng, |r, u| {
                sample_with_logprob_at(&rows[r], 1.0, 1.0, u, 1.0)
            }));
        });
        eprintln!(
            "16 × 102,400 host draw + log-prob per step: whole-vector, one thread {eager:.2} ms; lazy, {} rayon threads {lazy:.2} ms",
            rayon::current_num_threads()
        );
        // Top-p 0.9, one row on one thread: the whole-vector sampler (a sort of the row) against the selected
        // prefix, on rows whose nucleus is a small part (logits spread over 40) or a large one (over 10).
        for spread in [40.0f32, 10.0] {
            let row: Vec<f32> = (0..width).map(|_| gen.random::<f32>() * spread).collect();
            let sorted = time(&mut || {
                std::hint::black_box(eager_sample(&row, 1.0, 0.9, 0.5));
            });
            let selected = time(&mut || {
                std::hint::black_box(sample_index_at(&row, 1.0, 0.9, 0.5));
            });
            eprintln!(
                "top-p 0.9 over 102,400 logits spread over {spread}: whole sort {sorted:.2} ms, selected prefix {selected:.2} ms"
            );
        }
    }

    #[test]
    fn top_p_restricts_to_the_nucleus_and_draws_are_seeded() {
        let l = [0.0f32, 5.0, 4.9, -3.0];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let i = sample_index(&l, 1.0, 0.5, &mut rng);
            assert!(i == 1 || i == 2, "{i}");
        }
        let draws = |seed| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample_index(&l, 1.0, 1.0, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert_eq!(sample_index(&l, 0.0, 1.0, &mut rng), 1);
        // Full sampling reaches the tail token sometimes over many draws.
        let mut r = ChaCha8Rng::seed_from_u64(1);
        let hits = (0..5000)
            .filter(|_| sample_index(&[0.0, 0.0], 1.0, 1.0, &mut r) == 1)
            .count();
        assert!((2200..2800).contains(&hits), "{hits}");
    }
    /// The set of classes the host sampler's inverse-CDF draw can return with `top_p`: those it returns at some
    /// uniform, read off its sorted walk ([`eager_sample`]'s order and stop).
    fn host_nucleus(x: &[f32], top_p: f64) -> Vec<usize> {
        let probs: Vec<f64> = log_softmax_t(x, 1.0)
            .iter()
            .map(|&l| (l as f64).exp())
            .collect();
        let mut order: Vec<usize> = (0..x.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let mut mass = 0.0;
        let mut kept = Vec::new();
        for i in order {
            kept.push(i);
            mass += probs[i];
            if mass >= top_p {
                break;
            }
        }
        kept.sort_unstable();
        kept
    }

    #[test]
    fn the_gumbel_nucleus_is_the_host_samplers_nucleus() {
        let mut gen = ChaCha8Rng::seed_from_u64(8);
        for (width, top_p) in [(50, 0.9), (200, 0.5), (7, 0.2), (1000, 0.95)] {
            for _ in 0..5 {
                let x: Vec<f32> = (0..width)
                    .map(|_| gen.random::<f32>() * 4.0 - 2.0)
                    .collect();
                // Noise that singles out one class: drawn exactly when it is in the nucleus.
                let reached: Vec<usize> = (0..width)
                    .filter(|&j| {
                        let mut g = vec![0f32; width];
                        g[j] = 100.0;
                        nucleus_gumbel_argmax(&x, &g, top_p) == j
                    })
                    .collect();
                assert_eq!(
                    reached,
                    host_nucleus(&x, top_p),
                    "width {width} top-p {top_p}"
                );
                assert!(reached.len() < width, "top-p {top_p} keeps everything");
            }
        }
        // With flat noise the draw is the nucleus's largest entry; NaN entries are never drawn.
        let x = [0.5f32, f32::NAN, 2.0, 1.0];
        assert_eq!(nucleus_gumbel_argmax(&x, &[0.0; 4], 0.9), 2);
        assert_eq!(nucleus_gumbel_argmax(&x, &[0.0, 100.0, 0.0, 0.0], 0.9), 2);
        assert_eq!(nucleus_gumbel_argmax(&[f32::NAN; 3], &[0.0; 3], 0.5), 0);
    }
}

#[cfg(test)]
mod device_draw_tests {
    use super::*;

    fn rows(v: &[f32], n: usize) -> Tensor {
        let flat: Vec<f32> = (0..n).flat_map(|_| v.iter().copied()).collect();
        Tensor::from_vec(flat, (n, v.len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn device_token_draws_follow_the_tempered_softmax_and_skip_banned_tokens() {
        // 20000 identical rows: token frequencies must match softmax((l + bias) / T); token 1 is banned.
        let l = [0.5f32, 3.0, 1.0, -0.5, 1.5];
        let bias = Tensor::from_vec(vec![0f32, -1e9, 0.0, 0.0, 0.0], (1, 5), &Device::Cpu).unwrap();
        let s = TextSampling {
            temperature: 0.7,
            ..TextSampling::default()
        };
        let n = 20000;
        let mut noise = GumbelNoise::new(&Device::Cpu, 5).unwrap();
        let (tok, lp) = device_token_draw(&rows(&l, n), &bias, &s, &mut noise).unwrap();
        let toks = tok.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let lps = lp.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let allowed = [l[0], f32::NEG_INFINITY, l[2], l[3], l[4]];
        let want = log_softmax_t(&allowed, 0.7);
        for (k, w) in want.iter().enumerate() {
            let got = toks.iter().filter(|&&c| c as usize == k).count() as f64 / n as f64;
            // 4σ of a binomial proportion at n = 20000 is at most 0.014.
            assert!(
                (got - (*w as f64).exp()).abs() < 0.015,
                "token {k}: {got} vs {}",
                w.exp()
            );
        }
        assert!(!toks.contains(&1), "a banned token was drawn");
        for (t, l) in toks.iter().zip(&lps) {
            assert!((want[*t as usize] - l).abs() < 1e-5);
        }
    }

    #[test]
    fn gumbel_max_draws_follow_the_guided_softmax() {
        // 20000 identical rows: the code frequencies must match softmax((l_u + w (l_c − l_u)) / T).
        let (lc, lu) = ([0.5f32, 1.0, 2.0, -1.0], [0.0f32, 1.5, 1.0, 0.0]);
        let (w, t) = (2.0, 0.8);
        let n = 20000;
        let mut noise = GumbelNoise::new(&Device::Cpu, 11).unwrap();
        let (code, lp) = device_cfg_draw(
            &rows(&lc, n),
            &rows(&lu, n),
            &ImageSampling {
                cfg_weight: w,
                temperature: t,
                top_p: 1.0,
            },
            &mut noise,
        )
        .unwrap();
        let codes = code.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let mixed: Vec<f32> = lc
            .iter()
            .zip(&lu)
            .map(|(&c, &u)| u + w as f32 * (c - u))
            .collect();
        let want: Vec<f64> = log_softmax_t(&mixed, t)
            .iter()
            .map(|&l| (l as f64).exp())
            .collect();
        for (k, p) in want.iter().enumerate() {
            let got = codes.iter().filter(|&&c| c as usize == k).count() as f64 / n as f64;
            // 4σ of a binomial proportion at n = 20000 is at most 0.014.
            assert!((got - p).abs() < 0.015, "code {k}: {got} vs {p}");
        }
        // Recorded log-probs are the conditional branch's at T, at the drawn code.
        let cond_lp = log_softmax_t(&lc, t);
        let lps = lp.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (c, l) in codes.iter().zip(&lps) {
            assert!((cond_lp[*c as usize] - l).abs() < 1e-6);
        }
    }

    #[test]
    fn zero_temperature_is_argmax_and_noise_is_seeded() {
        let lc = [0.1f32, 0.3, 0.2];
        let lu = [0.0f32, 0.5, 0.0];
        let mut noise = GumbelNoise::new(&Device::Cpu, 1).unwrap();
        let (code, lp) = device_cfg_draw(
            &rows(&lc, 2),
            &rows(&lu, 2),
            &ImageSampling {
                cfg_weight: 5.0,
                temperature: 0.0,
                top_p: 1.0,
            },
            &mut noise,
        )
        .unwrap();
        // Mixed: [0.5, 0.0, 1.0] → code 2; log-prob at T' = 1.
        assert_eq!(
            code.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
            [2, 2]
        );
        let l = lp.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((l - log_softmax_t(&lc, 1.0)[2]).abs() < 1e-6);
        let draw = |seed| {
            let mut g = GumbelNoise::new(&Device::Cpu, seed).unwrap();
            g.sample((2, 5))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(draw(4), draw(4));
        assert_ne!(draw(4), draw(5));
        assert!(draw(4).iter().all(|x| x.is_finite()));
    }
}
