//! The PairGRPO objective, one short function per line of METHOD.md §3:
//! advantages → pair weight → ratio → clip → KL → aggregate.
//!
//! Advantages and weights are plain numbers (no gradient flows through rewards); ratio, clip, KL and the
//! aggregation are candle tensor expressions so that the loss is differentiable in the policy's log-probs.

use candle_core::{DType, Result, Tensor};
use pairuni_data::PairKind;

use crate::config::{KlEstimator, LossAggregation, PairWeighting, RewardScaling};

/// Added to a group's standard deviation before dividing (METHOD.md §3).
pub const STD_EPS: f32 = 1e-4;

/// Advantages of one task's rollouts, with the count of groups whose rewards were all equal.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// One advantage per rollout, in the order of the rewards.
    pub values: Vec<f32>,
    /// Number of groups.
    pub groups: usize,
    /// Groups whose rewards all coincide (zero advantage for every member: no learning signal).
    pub zero_std_groups: usize,
    /// Per-group reward standard deviation (for the `reward_std` metric).
    pub group_std: Vec<f32>,
}

/// Per-group advantages: rewards come in consecutive groups of `group_size` rollouts of the same prompt;
/// A = (r − mean) / (std + 1e-4) with `Std` scaling, A = r − mean with `None`.
///
/// The standard deviation is the unbiased one (n − 1), as in TRL's GRPO; a group of one has std 0.
pub fn group_advantages(rewards: &[f32], group_size: usize, scaling: RewardScaling) -> Advantages {
    let mut out = Advantages {
        values: Vec::with_capacity(rewards.len()),
        groups: 0,
        zero_std_groups: 0,
        group_std: Vec::new(),
    };
    if group_size == 0 {
        return out;
    }
    for group in rewards.chunks(group_size) {
        let n = group.len() as f64;
        let mean = group.iter().map(|&r| r as f64).sum::<f64>() / n;
        let var = if group.len() > 1 {
            group
                .iter()
                .map(|&r| (r as f64 - mean).powi(2))
                .sum::<f64>()
                / (n - 1.0)
        } else {
            0.0
        };
        let std = var.sqrt();
        out.groups += 1;
        out.group_std.push(std as f32);
        // All-equal groups give exactly zero advantage whatever the scaling: count them.
        let all_equal = group.iter().all(|&r| r == group[0]);
        if all_equal {
            out.zero_std_groups += 1;
        }
        for &r in group {
            let centred = if all_equal { 0.0 } else { r as f64 - mean };
            let a = match scaling {
                RewardScaling::Std => centred / (std + STD_EPS as f64),
                RewardScaling::None => centred,
            };
            out.values.push(a as f32);
        }
    }
    out
}

/// Pair weight w_p: 1 for aligned pairs; for retrieved pairs √s, s or 1 (similarity clamped to [0, 1]).
pub fn pair_weight(kind: PairKind, similarity: f64, mode: PairWeighting) -> f32 {
    let s = similarity.clamp(0.0, 1.0);
    let w = match (kind, mode) {
        (PairKind::Aligned, _) | (_, PairWeighting::None) => 1.0,
        (PairKind::Retrieved, PairWeighting::Sqrt) => s.sqrt(),
        (PairKind::Retrieved, PairWeighting::Linear) => s,
    };
    w as f32
}

/// Per-token importance ratio ρ_t = exp(log π_θ − log π_old); `old` carries no gradient.
pub fn ratio(logp: &Tensor, old_logp: &Tensor) -> Result<Tensor> {
    (logp - old_logp.detach())?.exp()
}

/// The clipped surrogate of one modality.
#[derive(Debug)]
pub struct Surrogate {
    /// −min(ρ Ã, clip(ρ, 1−ε_low, 1+ε_high) Ã) per token, [B, T].
    pub loss: Tensor,
    /// 1 where the ratio fell under 1 − ε_low with a negative advantage (clipped from below), [B, T].
    pub clipped_low: Tensor,
    /// 1 where the ratio rose over 1 + ε_high with a positive advantage (clipped from above), [B, T].
    pub clipped_high: Tensor,
}

/// PPO-clipped surrogate loss per token; `ratio` is [B, T], `adv` is [B] (advantage × pair weight).
///
/// Written as "unclipped ρÃ, except where the min picks the clipped branch, whose value is then a constant"
/// — equal to the min form in value and gradient, without halving the gradient at ρ = 1 where candle's
/// `minimum` splits it between two equal operands.
pub fn clipped_surrogate(
    ratio: &Tensor,
    adv: &Tensor,
    eps_low: f64,
    eps_high: f64,
) -> Result<Surrogate> {
    let adv = adv.unsqueeze(1)?.broadcast_as(ratio.shape())?;
    let r = ratio.detach();
    let neg_adv = adv.lt(0.0)?.to_dtype(DType::F32)?;
    let pos_adv = adv.gt(0.0)?.to_dtype(DType::F32)?;
    let clipped_low = (r.lt(1.0 - eps_low)?.to_dtype(DType::F32)? * neg_adv)?;
    let clipped_high = (r.gt(1.0 + eps_high)?.to_dtype(DType::F32)? * pos_adv)?;
    let clipped = (&clipped_low + &clipped_high)?;
    let unclipped_obj = (ratio * &adv)?;
    let clipped_obj = (r.clamp(1.0 - eps_low, 1.0 + eps_high)? * &adv)?;
    let keep = clipped.affine(-1.0, 1.0)?;
    let obj = ((unclipped_obj * keep)? + (clipped_obj * &clipped)?)?;
    Ok(Surrogate {
        loss: obj.neg()?,
        clipped_low,
        clipped_high,
    })
}

/// Per-token KL estimate between the policy and the frozen reference (log-probs of the same tokens).
pub fn kl_per_token(logp: &Tensor, ref_logp: &Tensor, estimator: KlEstimator) -> Result<Tensor> {
    let d = (ref_logp.detach() - logp)?; // log(π_ref / π)
    match estimator {
        KlEstimator::K1 => d.neg(),
        KlEstimator::K2 => d.sqr()?.affine(0.5, 0.0),
        KlEstimator::K3 => (d.exp()? - &d)? - 1.0,
    }
}

/// One modality's per-token values with the mask of real tokens.
#[derive(Debug, Clone)]
pub struct Tokens<'a> {
    /// Per-token values, [B, T] f32.
    pub values: &'a Tensor,
    /// 1 for real tokens, 0 for padding, [B, T] f32.
    pub mask: &'a Tensor,
    /// The modality's maximum sequence length (Dr.GRPO's constant normaliser).
    pub max_len: usize,
}

/// Reduces per-token losses of several modalities (text answers, image codes) to one scalar.
pub fn aggregate(parts: &[Tokens<'_>], mode: LossAggregation) -> Result<Tensor> {
    let live: Vec<&Tokens> = parts
        .iter()
        .filter(|p| p.values.dim(0).unwrap_or(0) > 0)
        .collect();
    let device = match parts.first() {
        Some(p) => p.values.device().clone(),
        None => candle_core::Device::Cpu,
    };
    let mut total = Tensor::zeros((), DType::F32, &device)?;
    match mode {
        LossAggregation::ModalityTokenMean => {
            for p in &live {
                let sum = (p.values * p.mask)?.sum_all()?;
                let n = p.mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
                total = (total + (sum / n as f64)?)?;
            }
        }
        LossAggregation::TokenMean => {
            let mut n = 0f32;
            for p in &live {
                total = (total + (p.values * p.mask)?.sum_all()?)?;
                n += p.mask.sum_all()?.to_scalar::<f32>()?;
            }
            total = (total / n.max(1.0) as f64)?;
        }
        LossAggregation::SequenceMean => {
            let mut seqs = 0usize;
            for p in &live {
                let per_seq = (p.values * p.mask)?.sum(1)?;
                let lens = p.mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
                total = (total + (per_seq / lens)?.sum_all()?)?;
                seqs += p.values.dim(0)?;
            }
            total = (total / seqs.max(1) as f64)?;
        }
        LossAggregation::DrGrpo => {
            for p in &live {
                let sum = (p.values * p.mask)?.sum_all()?;
                let denom = (p.values.dim(0)? * p.max_len.max(1)) as f64;
                total = (total + (sum / denom)?)?;
            }
        }
    }
    Ok(total)
}

/// A batch's real tokens and rows (sequences), of one modality or of all: what fixes a loss's denominators.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    /// Real tokens (the mask's sum).
    pub tokens: f32,
    /// Sequences.
    pub rows: usize,
}

impl Counts {
    /// The tokens and rows of `part`.
    pub fn of(part: &Tokens<'_>) -> Result<Self> {
        Ok(Self {
            tokens: part.mask.sum_all()?.to_scalar::<f32>()?,
            rows: part.values.dim(0)?,
        })
    }
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        Counts {
            tokens: self.tokens + o.tokens,
            rows: self.rows + o.rows,
        }
    }
}

/// The loss of `part`, a micro-batch of one modality, with the denominators of its whole batch, so that the
/// micro-batches' losses (and gradients) add up to [`aggregate`] of the batch: `modality` counts the batch's tokens
/// and rows of the part's modality, `all` those of every modality.
pub fn micro_batch_loss(
    part: &Tokens<'_>,
    mode: LossAggregation,
    modality: Counts,
    all: Counts,
) -> Result<Tensor> {
    let sum = || (part.values * part.mask)?.sum_all();
    match mode {
        LossAggregation::ModalityTokenMean => sum()? / modality.tokens.max(1.0) as f64,
        LossAggregation::TokenMean => sum()? / all.tokens.max(1.0) as f64,
        LossAggregation::SequenceMean => {
            let per_seq = (part.values * part.mask)?.sum(1)?;
            let lens = part.mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
            (per_seq / lens)?.sum_all()? / all.rows.max(1) as f64
        }
        LossAggregation::DrGrpo => sum()? / (modality.rows * part.max_len.max(1)) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t2(rows: &[&[f32]]) -> Tensor {
        let cols = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu).unwrap()
    }
    fn t1(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }
    fn close(a: f32, b: f32) {
        assert!((a - b).abs() < 1e-5, "{a} != {b}");
    }
    fn scalar(t: &Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn advantages_per_group_by_hand() {
        // Group 1: [1, 0, 0, 1] mean .5, unbiased std = sqrt(4·.25/3) = .57735.
        // Group 2: [1, 1, 1, 1] zero std → zero advantages, counted.
        // Group 3: [0, 0, 0, 1] mean .25, std = sqrt((3·.0625 + .5625)/3) = .5.
        let r = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let a = group_advantages(&r, 4, RewardScaling::Std);
        assert_eq!(a.groups, 3);
        assert_eq!(a.zero_std_groups, 1);
        let s1 = 0.5 / (0.577_350_3 + 1e-4);
        for (got, want) in a.values.iter().zip([s1, -s1, -s1, s1, 0.0, 0.0, 0.0, 0.0]) {
            close(*got, want);
        }
        close(a.values[8], -0.25 / (0.5 + 1e-4));
        close(a.values[11], 0.75 / (0.5 + 1e-4));
        close(a.group_std[2], 0.5);
        // Unscaled (Dr.GRPO): just centred.
        let n = group_advantages(&r, 4, RewardScaling::None);
        assert_eq!(&n.values[..4], &[0.5, -0.5, -0.5, 0.5]);
        assert_eq!(n.zero_std_groups, 1);
        close(n.values[11], 0.75);
    }

    #[test]
    fn task_groups_are_separate() {
        // The same rewards in different group sizes give different advantages: groups never mix.
        let a = group_advantages(&[0.0, 1.0, 2.0, 3.0], 2, RewardScaling::None);
        assert_eq!(a.values, vec![-0.5, 0.5, -0.5, 0.5]);
        let dense = group_advantages(&[0.25, 0.25, 0.5], 3, RewardScaling::Std);
        assert_eq!(dense.zero_std_groups, 0);
        close(dense.values.iter().sum::<f32>(), 0.0);
    }

    #[test]
    fn pair_weights() {
        close(
            pair_weight(PairKind::Aligned, 0.3, PairWeighting::Sqrt),
            1.0,
        );
        close(
            pair_weight(PairKind::Retrieved, 0.64, PairWeighting::Sqrt),
            0.8,
        );
        close(
            pair_weight(PairKind::Retrieved, 0.64, PairWeighting::Linear),
            0.64,
        );
        close(
            pair_weight(PairKind::Retrieved, 0.64, PairWeighting::None),
            1.0,
        );
        close(
            pair_weight(PairKind::Retrieved, -0.2, PairWeighting::Sqrt),
            0.0,
        );
    }

    #[test]
    fn clip_low_and_high_by_hand() {
        // Ratios 0.5 (low), 1.0, 1.5 (high); advantages per row +2 and −1.
        let ratio = t2(&[&[0.5, 1.0, 1.5], &[0.5, 1.0, 1.5]]);
        let adv = t1(&[2.0, -1.0]);
        let s = clipped_surrogate(&ratio, &adv, 0.2, 0.28).unwrap();
        // Row A=+2: min(ρA, clip(ρ)A): .5→min(1, 1.6)=1; 1→2; 1.5→min(3, 2.56)=2.56. Loss = −obj.
        // Row A=−1: .5→min(−.5, −.8)=−.8; 1→−1; 1.5→min(−1.5, −1.28)=−1.5.
        let l = s.loss.to_vec2::<f32>().unwrap();
        for (g, w) in l.concat().iter().zip([-1.0, -2.0, -2.56, 0.8, 1.0, 1.5]) {
            close(*g, w);
        }
        assert_eq!(
            s.clipped_high.to_vec2::<f32>().unwrap(),
            vec![vec![0., 0., 1.], vec![0., 0., 0.]]
        );
        assert_eq!(
            s.clipped_low.to_vec2::<f32>().unwrap(),
            vec![vec![0., 0., 0.], vec![1., 0., 0.]]
        );
    }

    #[test]
    fn clipped_tokens_get_no_gradient() {
        let logp = Var::new(&[[(1.5f32).ln(), 0.0]], &Device::Cpu).unwrap();
        let old = t2(&[&[0.0, 0.0]]);
        let r = ratio(logp.as_tensor(), &old).unwrap();
        let s = clipped_surrogate(&r, &t1(&[1.0]), 0.2, 0.28).unwrap();
        let g = s.loss.sum_all().unwrap().backward().unwrap();
        let g = g.get(&logp).unwrap().to_vec2::<f32>().unwrap();
        // Clipped token: 0; on-policy token: d(−ρA)/dlogp = −ρA = −1.
        close(g[0][0], 0.0);
        close(g[0][1], -1.0);
    }

    #[test]
    fn mu_one_ratio_is_one_and_clip_is_inactive() {
        let logp = Var::new(&[[-0.3f32, -2.0, -7.5], [-0.01, -1.0, -4.0]], &Device::Cpu).unwrap();
        let r = ratio(logp.as_tensor(), &logp.as_tensor().detach()).unwrap();
        assert_eq!(r.to_vec2::<f32>().unwrap(), vec![vec![1.0; 3]; 2]);
        let adv = t1(&[1.3, -0.7]);
        let clipped = clipped_surrogate(&r, &adv, 0.2, 0.28).unwrap();
        let unclipped = (&r * adv.unsqueeze(1).unwrap().broadcast_as((2, 3)).unwrap())
            .unwrap()
            .neg()
            .unwrap();
        assert_eq!(
            clipped.loss.to_vec2::<f32>().unwrap(),
            unclipped.to_vec2::<f32>().unwrap()
        );
        let g1 = clipped.loss.sum_all().unwrap().backward().unwrap();
        let g2 = unclipped.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g1.get(&logp).unwrap().to_vec2::<f32>().unwrap(),
            g2.get(&logp).unwrap().to_vec2::<f32>().unwrap()
        );
        assert_eq!(scalar(&clipped.clipped_low.sum_all().unwrap()), 0.0);
        assert_eq!(scalar(&clipped.clipped_high.sum_all().unwrap()), 0.0);
    }

    #[test]
    fn kl_estimators_by_hand() {
        // log π = −1, log π_ref = −2 → d = log(π_ref/π) = −1.
        let logp = t2(&[&[-1.0, -0.5]]);
        let refp = t2(&[&[-2.0, -0.5]]);
        let k1 = kl_per_token(&logp, &refp, KlEstimator::K1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let k2 = kl_per_token(&logp, &refp, KlEstimator::K2)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let k3 = kl_per_token(&logp, &refp, KlEstimator::K3)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        close(k1[0][0], 1.0);
        close(k2[0][0], 0.5);
        close(k3[0][0], (-1f32).exp() + 1.0 - 1.0);
        for k in [k1, k2, k3] {
            close(k[0][1], 0.0); // identical distributions
        }
    }

    #[test]
    fn aggregation_modes_by_hand() {
        // Text: 2 sequences, lengths 1 and 2 (max 3): losses [1,·,·], [2,4,·].
        // Image: 1 sequence of 4 tokens (max 4): [1,1,1,5].
        let tv = t2(&[&[1.0, 9.0, 9.0], &[2.0, 4.0, 9.0]]);
        let tm = t2(&[&[1.0, 0.0, 0.0], &[1.0, 1.0, 0.0]]);
        let iv = t2(&[&[1.0, 1.0, 1.0, 5.0]]);
        let im = t2(&[&[1.0, 1.0, 1.0, 1.0]]);
        let parts = [
            Tokens {
                values: &tv,
                mask: &tm,
                max_len: 3,
            },
            Tokens {
                values: &iv,
                mask: &im,
                max_len: 4,
            },
        ];
        let agg = |m| scalar(&aggregate(&parts, m).unwrap());
        // Per-modality token mean then sum: 7/3 + 8/4.
        close(agg(LossAggregation::ModalityTokenMean), 7.0 / 3.0 + 2.0);
        // Token mean over the batch: 15/7.
        close(agg(LossAggregation::TokenMean), 15.0 / 7.0);
        // Per-sequence mean: (1 + 3 + 2)/3.
        close(agg(LossAggregation::SequenceMean), 2.0);
        // Dr.GRPO: 7/(2·3) + 8/(1·4).
        close(agg(LossAggregation::DrGrpo), 7.0 / 6.0 + 2.0);
    }

    #[test]
    fn micro_batches_add_up_to_the_batch_loss_and_gradient() {
        // Per-token values depend on a variable, so the gradients can be compared too. Text: 3 sequences of
        // lengths 1, 3, 2 (max 3); image: 2 sequences of 4. Micro-batches of 2 rows: text [0..2], [2..3];
        // image [0..2].
        let x = Var::from_vec(
            (0..18).map(|i| 0.3 + 0.1 * i as f32).collect::<Vec<_>>(),
            18,
            &Device::Cpu,
        )
        .unwrap();
        let tv = (x
            .as_tensor()
            .narrow(0, 0, 9)
            .unwrap()
            .reshape((3, 3))
            .unwrap()
            .sqr())
        .unwrap();
        let iv = (x
            .as_tensor()
            .narrow(0, 9, 8)
            .unwrap()
            .reshape((2, 4))
            .unwrap()
            * 3.0)
            .unwrap();
        let tm = t2(&[&[1.0, 0.0, 0.0], &[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]]);
        let im = t2(&[&[1.0; 4], &[1.0; 4]]);
        let text = Tokens {
            values: &tv,
            mask: &tm,
            max_len: 3,
        };
        let image = Tokens {
            values: &iv,
            mask: &im,
            max_len: 4,
        };
        let (ct, ci) = (Counts::of(&text).unwrap(), Counts::of(&image).unwrap());
        assert_eq!(
            ct,
            Counts {
                tokens: 6.0,
                rows: 3
            }
        );
        for mode in [
            LossAggregation::ModalityTokenMean,
            LossAggregation::TokenMean,
            LossAggregation::SequenceMean,
            LossAggregation::DrGrpo,
        ] {
            let whole = aggregate(&[text.clone(), image.clone()], mode).unwrap();
            let chunk = |t: &Tokens, start: usize, len: usize| -> (Tensor, Tensor) {
                (
                    t.values.narrow(0, start, len).unwrap(),
                    t.mask.narrow(0, start, len).unwrap(),
                )
            };
            let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
            for (t, c, start, len) in [(&text, ct, 0, 2), (&text, ct, 2, 1), (&image, ci, 0, 2)] {
                let (v, m) = chunk(t, start, len);
                let part = Tokens {
                    values: &v,
                    mask: &m,
                    max_len: t.max_len,
                };
                total = (total + micro_batch_loss(&part, mode, c, ct + ci).unwrap()).unwrap();
            }
            close(scalar(&total), scalar(&whole));
            let (gw, gm) = (whole.backward().unwrap(), total.backward().unwrap());
            let (gw, gm) = (
                gw.get(x.as_tensor()).unwrap(),
                gm.get(x.as_tensor()).unwrap(),
            );
            let diff = (gw - gm).unwrap().abs().unwrap().max_all().unwrap();
            assert!(scalar(&diff) < 1e-6, "{mode:?}");
            assert!(scalar(&gw.abs().unwrap().max_all().unwrap()) > 0.1);
        }
    }

    #[test]
    fn aggregation_skips_an_empty_modality() {
        let tv = t2(&[&[3.0, 1.0]]);
        let tm = t2(&[&[1.0, 1.0]]);
        let empty = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        let parts = [
            Tokens {
                values: &tv,
                mask: &tm,
                max_len: 2,
            },
            Tokens {
                values: &empty,
                mask: &empty,
                max_len: 4,
            },
        ];
        close(
            scalar(&aggregate(&parts, LossAggregation::ModalityTokenMean).unwrap()),
            2.0,
        );
        close(
            scalar(&aggregate(&parts, LossAggregation::SequenceMean).unwrap()),
            2.0,
        );
    }
}
