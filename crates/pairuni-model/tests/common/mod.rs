//! Shared helpers for the model tests: a toy model built in memory from a small word list and random scenes.

#![allow(dead_code)]

use pairuni_model::{
    Device, ImageRollout, ImageSampling, Janus, JanusConfig, RgbImage, SamplerSite,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A small word list standing in for `pairuni_toyworld::vocabulary()`.
pub fn words() -> Vec<String> {
    "a an the red green blue yellow circle square triangle circles squares triangles how many are there is \
     what color of left right above below yes no one two three four 0 1 2 3 4 ? . , : A B C D and draw"
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// 32×32 images of flat rectangles on a light background.
pub fn scenes(n: usize, seed: u64) -> Vec<RgbImage> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let palette = [
        [220u8, 40, 40],
        [40, 180, 60],
        [40, 60, 200],
        [230, 210, 40],
    ];
    (0..n)
        .map(|_| {
            let mut img = RgbImage::from_pixel(32, 32, image::Rgb([235, 235, 230]));
            for _ in 0..rng.random_range(1..4) {
                let c = palette[rng.random_range(0..palette.len())];
                let (x0, y0) = (rng.random_range(0..24u32), rng.random_range(0..24u32));
                let (w, h) = (rng.random_range(4..9u32), rng.random_range(4..9u32));
                for y in y0..(y0 + h).min(32) {
                    for x in x0..(x0 + w).min(32) {
                        img.put_pixel(x, y, image::Rgb(c));
                    }
                }
            }
            img
        })
        .collect()
}

/// The toy model (JanusConfig::toy) built from `words()` and 40 scenes.
pub fn toy(seed: u64) -> Janus {
    let w = words();
    let cfg = JanusConfig::toy(w.len() + 8, 512);
    Janus::new_toy(&cfg, &w, &scenes(40, 7), seed, &Device::Cpu).expect("toy model")
}

/// Max |a − b| / max |b| over two f32 tensors of the same shape.
pub fn rel_err(a: &pairuni_model::Tensor, b: &pairuni_model::Tensor) -> f32 {
    let a = a
        .to_dtype(pairuni_model::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .to_dtype(pairuni_model::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a.len(), b.len(), "shape mismatch");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// The gradients of `loss` w.r.t. every weight of `m` that gets one, by name (sorted).
#[allow(dead_code)] // not every test file compares gradients
pub fn weight_grads(
    m: &Janus,
    loss: &pairuni_model::Tensor,
) -> Vec<(String, pairuni_model::Tensor)> {
    let g = loss.backward().unwrap();
    let mut out: Vec<(String, pairuni_model::Tensor)> = m
        .all_vars()
        .into_iter()
        .filter_map(|(name, v)| g.get(v.as_tensor()).map(|t| (name, t.clone())))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The CFG-guided log-probs (weight 3) of image `rollouts` under `m`, teacher-forced, and the gradients of their
/// sum w.r.t. every weight that gets one.
#[allow(dead_code)] // not every test file scores images
pub fn guided_logprobs_and_grads(
    m: &Janus,
    rollouts: &[ImageRollout],
) -> (pairuni_model::Tensor, Vec<(String, pairuni_model::Tensor)>) {
    let lp = m
        .image_logprobs_at(
            rollouts,
            pairuni_model::CfgLogprobPolicy::GuidedMix { cfg_weight: 3.0 },
            1.0,
        )
        .unwrap();
    let loss = lp.sum_all().unwrap();
    let grads = weight_grads(m, &loss);
    (lp, grads)
}

/// Asserts that two sets of weight gradients name the same weights (more than ten) and agree within `tol`,
/// relative to each tensor's largest gradient, or to a thousandth of the largest of all where a tensor's own is
/// smaller: some gradients are zero but for rounding (a key bias shifts every score of a query alike, which
/// softmax cancels).
#[allow(dead_code)]
pub fn assert_grads_close(
    what: &str,
    got: &[(String, pairuni_model::Tensor)],
    want: &[(String, pairuni_model::Tensor)],
    tol: f32,
) {
    let names =
        |g: &[(String, pairuni_model::Tensor)]| g.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(got),
        names(want),
        "{what}: the same weights get gradients"
    );
    assert!(want.len() > 10, "{what}: gradients reached the layers");
    let max_abs = |t: &pairuni_model::Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let global = want.iter().map(|(_, t)| max_abs(t)).fold(0f32, f32::max);
    assert!(global > 0.0, "{what}: all gradients are zero");
    for ((name, a), (_, b)) in got.iter().zip(want) {
        let e = max_abs(&(a - b).unwrap()) / max_abs(b).max(global * 1e-3);
        assert!(e < tol, "{what}: {name} gradient differs by {e}");
    }
}

/// Three toy questions (count, colour, yes/no).
pub fn questions() -> Vec<String> {
    [
        "how many red circles are there ?",
        "what color is the square ?",
        "is there a blue triangle ?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Two generation prompts of different lengths: the shorter is left-padded, and its unconditional row masked.
pub fn gen_prompts(m: &Janus) -> Vec<Vec<u32>> {
    ["a red circle", "two blue squares left of a yellow triangle"]
        .iter()
        .map(|p| m.generation_prompt(p).unwrap())
        .collect()
}

/// Whole image rollouts of `gen_prompts` sampled at `site` from `seed`.
pub fn sample_at(m: &Janus, s: &ImageSampling, site: SamplerSite, seed: u64) -> Vec<ImageRollout> {
    m.sample_image_codes_at(
        &gen_prompts(m),
        s,
        m.image_tokens_per_image(),
        site,
        &mut ChaCha8Rng::seed_from_u64(seed),
    )
    .unwrap()
}

/// Answers to the three `questions()` about three scenes, drawn at `site` from `seed`.
pub fn answers_at(
    m: &Janus,
    s: &pairuni_model::TextSampling,
    site: SamplerSite,
    seed: u64,
) -> Vec<pairuni_model::TextRollout> {
    let pixels: Vec<_> = scenes(3, 4)
        .iter()
        .map(|i| m.preprocess_image(i).unwrap())
        .collect();
    let prompts: Vec<Vec<u32>> = questions()
        .iter()
        .map(|q| m.understanding_prompt(q).unwrap())
        .collect();
    m.sample_answers_ids_at(
        &pixels,
        &prompts,
        s,
        site,
        &mut ChaCha8Rng::seed_from_u64(seed),
    )
    .unwrap()
}
