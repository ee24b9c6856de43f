//! Rollout records and the per-row sampling rule (temperature, top-p, greedy) shared by text and image decoding.

use candle_core::Tensor;
use rand::Rng;
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

/// log-softmax of `logits / t` in f64 for numerical headroom, returned as f32.
pub(crate) fn log_softmax_t(logits: &[f32], t: f64) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&l| ((l as f64 - max) / t).exp())
        .sum::<f64>()
        .ln();
    logits
        .iter()
        .map(|&l| ((l as f64 - max) / t - lse) as f32)
        .collect()
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

/// Draws an index from softmax(logits / t) restricted to the top-p nucleus; t ≤ 0 means argmax.
pub(crate) fn sample_index(logits: &[f32], t: f64, top_p: f64, rng: &mut ChaCha8Rng) -> usize {
    if t <= 0.0 {
        return argmax(logits);
    }
    let lp = log_softmax_t(logits, t);
    let probs: Vec<f64> = lp.iter().map(|&l| (l as f64).exp()).collect();
    let u: f64 = rng.random::<f64>();
    if top_p >= 1.0 {
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return i;
            }
        }
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // Stable sort keeps the draw reproducible when probabilities tie.
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

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
}
