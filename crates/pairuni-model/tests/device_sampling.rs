//! The device-side CFG image sampler, forced on the CPU: it is seeded, takes exactly one value of the caller's
//! stream, gives the host sampler's argmax at temperature 0 (and near it), and records the conditional log-prob
//! of the code it drew. The host path itself is covered by janus_toy.rs.

mod common;

use common::{gen_prompts as prompts, sample_at as sample, toy};
use pairuni_model::{ImageSamplerSite, ImageSampling};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// log-softmax(logits / t)[i] in f64.
fn log_softmax_at(logits: &[f32], t: f64, i: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits
        .iter()
        .map(|&l| ((l as f64 - max) / t).exp())
        .sum::<f64>()
        .ln();
    (logits[i] as f64 - max) / t - lse
}

#[test]
fn zero_and_near_zero_temperature_give_the_host_argmax() {
    let m = toy(3);
    let greedy = ImageSampling {
        cfg_weight: 5.0,
        temperature: 0.0,
        top_p: 1.0,
    };
    let host = sample(&m, &greedy, ImageSamplerSite::Host, 1);
    let dev = sample(&m, &greedy, ImageSamplerSite::Device, 2);
    let cold = ImageSampling {
        temperature: 1e-6,
        ..greedy.clone()
    };
    let dev_cold = sample(&m, &cold, ImageSamplerSite::Device, 3);
    for ((h, d), c) in host.iter().zip(&dev).zip(&dev_cold) {
        assert_eq!(h.codes, d.codes);
        assert_eq!(h.codes, c.codes);
        for (a, b) in h.logprobs.iter().zip(&d.logprobs) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}

#[test]
fn device_logprobs_are_the_conditional_log_softmax_at_the_drawn_codes() {
    let m = toy(4);
    let s = ImageSampling {
        cfg_weight: 3.0,
        temperature: 0.9,
        top_p: 1.0,
    };
    let rolls = sample(&m, &s, ImageSamplerSite::Device, 7);
    // Teacher forcing of prompt + codes in one pass: position L−1+i predicts code i.
    let n = m.image_tokens_per_image();
    let mut worst = 0f64;
    for r in &rolls {
        assert_eq!((r.codes.len(), r.logprobs.len()), (n, n));
        let logits = m
            .gen_logits(
                std::slice::from_ref(&r.prompt_ids),
                std::slice::from_ref(&r.codes),
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let l = r.prompt_ids.len();
        for (i, (&c, &lp)) in r.codes.iter().zip(&r.logprobs).enumerate() {
            let want = log_softmax_at(&logits[l - 1 + i], 0.9, c as usize);
            worst = worst.max((want - lp as f64).abs());
        }
    }
    assert!(worst < 1e-5, "max |Δ log-prob| {worst}");
    // Sampling at T = 0.9 is not argmax: some code differs from the greedy rollout.
    let greedy = sample(
        &m,
        &ImageSampling {
            temperature: 0.0,
            ..s.clone()
        },
        ImageSamplerSite::Host,
        7,
    );
    assert_ne!(rolls[0].codes, greedy[0].codes);
}

#[test]
fn device_sampling_is_seeded_and_takes_one_value_of_the_stream() {
    let m = toy(5);
    let s = ImageSampling::default();
    let a = sample(&m, &s, ImageSamplerSite::Device, 11);
    let b = sample(&m, &s, ImageSamplerSite::Device, 11);
    let c = sample(&m, &s, ImageSamplerSite::Device, 12);
    assert_eq!(a[1].codes, b[1].codes);
    assert_eq!(a[1].logprobs, b[1].logprobs);
    assert_ne!(a[1].codes, c[1].codes);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    m.sample_image_codes_at(&prompts(&m), &s, 4, ImageSamplerSite::Device, &mut rng)
        .unwrap();
    let mut expect = ChaCha8Rng::seed_from_u64(11);
    expect.next_u64();
    assert_eq!(rng.next_u64(), expect.next_u64());
}

#[test]
fn auto_samples_on_the_host_on_the_cpu_and_device_refuses_top_p() {
    let m = toy(6);
    let s = ImageSampling {
        top_p: 0.9,
        ..ImageSampling::default()
    };
    let auto = m
        .sample_images_ids(&prompts(&m), &s, &mut ChaCha8Rng::seed_from_u64(2))
        .unwrap();
    let host = sample(&m, &s, ImageSamplerSite::Host, 2);
    assert_eq!(auto[0].codes, host[0].codes);
    assert_eq!(auto[1].logprobs, host[1].logprobs);
    let err = m
        .sample_image_codes_at(
            &prompts(&m),
            &s,
            4,
            ImageSamplerSite::Device,
            &mut ChaCha8Rng::seed_from_u64(2),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("top-p"), "{err}");
}
