//! The device-side samplers, forced on the CPU. The CFG image sampler is seeded, takes exactly one value of the
//! caller's stream, gives the host sampler's argmax at temperature 0 (and near it), and records the conditional
//! log-prob of the code it drew. The answer sampler likewise: greedy it gives the host's tokens, sampled it
//! records the teacher-forced log-probs and stops rows at eos. Both keep to a top-p nucleus. The host paths themselves are
//! covered by janus_toy.rs.

mod common;

use common::{answers_at as answers, gen_prompts as prompts, sample_at as sample, toy};
use pairuni_model::{ImageSampling, SamplerSite, TextRollout, TextSampling};
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

/// A rollout's drawn tokens and their recorded log-probs.
type Draws<'a> = (&'a [u32], &'a [f32]);

fn image_draws(v: &[pairuni_model::ImageRollout]) -> Vec<Draws<'_>> {
    v.iter().map(|r| (&r.codes[..], &r.logprobs[..])).collect()
}

fn answer_draws(v: &[TextRollout]) -> Vec<Draws<'_>> {
    v.iter()
        .map(|r| (&r.answer_ids[..], &r.logprobs[..]))
        .collect()
}

/// Asserts that each of `got` drew its `want`'s tokens, with log-probs within 1e-5 (`what` names the case).
fn assert_same_draws(want: &[Draws], got: &[Draws], what: &str) {
    assert_eq!(want.len(), got.len(), "{what}");
    for ((want_ids, want_lps), (ids, lps)) in want.iter().zip(got) {
        assert_eq!(want_ids, ids, "{what}");
        for (a, b) in want_lps.iter().zip(lps.iter()) {
            assert!((a - b).abs() < 1e-5, "{what}: {a} vs {b}");
        }
    }
}

/// Asserts that a device image decode takes exactly one value of the caller's stream, whatever it draws.
fn assert_device_images_take_one_stream_value(m: &pairuni_model::Janus, s: &ImageSampling) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    m.sample_image_codes_at(&prompts(m), s, 4, SamplerSite::Device, &mut rng)
        .unwrap();
    let mut expect = ChaCha8Rng::seed_from_u64(11);
    expect.next_u64();
    assert_eq!(rng.next_u64(), expect.next_u64());
}

/// The host's argmax rollouts with `s`'s other settings (log-probs at T = 1).
fn host_greedy(
    m: &pairuni_model::Janus,
    s: &ImageSampling,
    seed: u64,
) -> Vec<pairuni_model::ImageRollout> {
    let greedy = ImageSampling {
        temperature: 0.0,
        ..s.clone()
    };
    sample(m, &greedy, SamplerSite::Host, seed)
}

#[test]
fn zero_and_near_zero_temperature_give_the_host_argmax() {
    let m = toy(3);
    let greedy = ImageSampling {
        cfg_weight: 5.0,
        temperature: 0.0,
        top_p: 1.0,
    };
    let host = sample(&m, &greedy, SamplerSite::Host, 1);
    let dev = sample(&m, &greedy, SamplerSite::Device, 2);
    let cold = ImageSampling {
        temperature: 1e-6,
        ..greedy.clone()
    };
    let dev_cold = sample(&m, &cold, SamplerSite::Device, 3);
    assert_same_draws(&image_draws(&host), &image_draws(&dev), "T = 0");
    for (h, c) in host.iter().zip(&dev_cold) {
        assert_eq!(h.codes, c.codes);
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
    let rolls = sample(&m, &s, SamplerSite::Device, 7);
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
    let greedy = host_greedy(&m, &s, 7);
    assert_ne!(rolls[0].codes, greedy[0].codes);
}

#[test]
fn device_sampling_is_seeded_and_takes_one_value_of_the_stream() {
    let m = toy(5);
    let s = ImageSampling::default();
    let a = sample(&m, &s, SamplerSite::Device, 11);
    let b = sample(&m, &s, SamplerSite::Device, 11);
    let c = sample(&m, &s, SamplerSite::Device, 12);
    assert_eq!(a[1].codes, b[1].codes);
    assert_eq!(a[1].logprobs, b[1].logprobs);
    assert_ne!(a[1].codes, c[1].codes);
    assert_device_images_take_one_stream_value(&m, &s);
}

#[test]
fn auto_samples_on_the_host_on_the_cpu_and_device_draws_keep_to_the_nucleus() {
    let mut m = toy(6);
    let s = ImageSampling {
        top_p: 0.9,
        ..ImageSampling::default()
    };
    let auto = m
        .sample_images_ids(&prompts(&m), &s, &mut ChaCha8Rng::seed_from_u64(2))
        .unwrap();
    let host = sample(&m, &s, SamplerSite::Host, 2);
    assert_eq!(auto[0].codes, host[0].codes);
    assert_eq!(auto[1].logprobs, host[1].logprobs);
    // A nucleus this small holds only the most probable code, so a draw at T = 1 is the greedy draw, whose
    // log-probs are recorded at T = 1 too; without the nucleus the draws differ.
    let greedy = host_greedy(&m, &s, 1);
    let narrow = ImageSampling {
        top_p: 1e-6,
        ..s.clone()
    };
    let full = ImageSampling {
        top_p: 1.0,
        ..s.clone()
    };
    for static_steps in [false, true] {
        m.set_static_decode(static_steps);
        let dev = sample(&m, &narrow, SamplerSite::Device, 3);
        let what = format!("static steps: {static_steps}");
        assert_same_draws(&image_draws(&greedy), &image_draws(&dev), &what);
        let codes = |v: &[pairuni_model::ImageRollout]| {
            v.iter().map(|r| r.codes.clone()).collect::<Vec<_>>()
        };
        assert_ne!(
            codes(&greedy),
            codes(&sample(&m, &full, SamplerSite::Device, 3))
        );
        // Seeded, one value of the caller's stream.
        assert_eq!(
            codes(&sample(&m, &s, SamplerSite::Device, 4)),
            codes(&sample(&m, &s, SamplerSite::Device, 4))
        );
        assert_device_images_take_one_stream_value(&m, &s);
    }
}

#[test]
fn device_answer_draws_are_greedy_exact_and_record_teacher_forced_logprobs() {
    let m = toy(12);
    let greedy = TextSampling {
        max_new_tokens: 6,
        temperature: 1.0,
        top_p: 1.0,
        greedy: true,
    };
    let host = answers(&m, &greedy, SamplerSite::Host, 1);
    let dev = answers(&m, &greedy, SamplerSite::Device, 2);
    assert_same_draws(&answer_draws(&host), &answer_draws(&dev), "greedy");
    let s = TextSampling {
        max_new_tokens: 6,
        temperature: 0.8,
        top_p: 1.0,
        greedy: false,
    };
    let rolls = answers(&m, &s, SamplerSite::Device, 3);
    let (lp, mask) = m.answer_logprobs_at(&rolls, 0.8).unwrap();
    let (lp, mask) = (lp.to_vec2::<f32>().unwrap(), mask.to_vec2::<f32>().unwrap());
    let eos = m.eos_token();
    for (r, roll) in rolls.iter().enumerate() {
        assert_eq!(roll.logprobs.len(), roll.answer_ids.len());
        // Tokens stop at the first eos: a finished row's later draws are dropped.
        if let Some(p) = roll.answer_ids.iter().position(|&t| t == eos) {
            assert_eq!(p + 1, roll.answer_ids.len(), "tokens after eos");
        }
        for (i, &got) in roll.logprobs.iter().enumerate() {
            assert_eq!(mask[r][i], 1.0);
            assert!(
                (lp[r][i] - got).abs() < 1e-5,
                "row {r} token {i}: {} vs {got}",
                lp[r][i]
            );
        }
    }
    // Sampling at T = 0.8 is not the argmax everywhere.
    let drawn: Vec<_> = rolls.iter().map(|r| r.answer_ids.clone()).collect();
    let argmax: Vec<_> = host.iter().map(|r| r.answer_ids.clone()).collect();
    assert_ne!(drawn, argmax);
}

#[test]
fn device_answer_draws_are_seeded_and_take_one_stream_value() {
    let m = toy(13);
    let s = TextSampling {
        max_new_tokens: 5,
        ..TextSampling::default()
    };
    let a = answers(&m, &s, SamplerSite::Device, 21);
    let b = answers(&m, &s, SamplerSite::Device, 21);
    let c = answers(&m, &s, SamplerSite::Device, 22);
    let ids = |v: &[TextRollout]| v.iter().map(|r| r.answer_ids.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&b));
    assert_ne!(ids(&a), ids(&c));
    // On the CPU, auto draws on the host, bit for bit.
    let auto = answers(&m, &s, SamplerSite::Auto, 21);
    let host = answers(&m, &s, SamplerSite::Host, 21);
    assert_eq!(ids(&auto), ids(&host));
    assert_eq!(auto[0].logprobs, host[0].logprobs);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let px = vec![m.preprocess_image(&common::scenes(1, 1)[0]).unwrap()];
    let q = vec![m
        .understanding_prompt("what color is the square ?")
        .unwrap()];
    m.sample_answers_ids_at(&px, &q, &s, SamplerSite::Device, &mut rng)
        .unwrap();
    let mut expect = ChaCha8Rng::seed_from_u64(4);
    expect.next_u64();
    assert_eq!(rng.next_u64(), expect.next_u64());
}

#[test]
fn device_answer_draws_keep_to_the_nucleus() {
    let mut m = toy(14);
    let greedy = TextSampling {
        max_new_tokens: 6,
        greedy: true,
        ..TextSampling::default()
    };
    // Only the most probable token is in so small a nucleus: the greedy answers and their T = 1 log-probs.
    let narrow = TextSampling {
        greedy: false,
        temperature: 1.0,
        top_p: 1e-6,
        ..greedy.clone()
    };
    let host = answers(&m, &greedy, SamplerSite::Host, 1);
    for static_steps in [false, true] {
        m.set_static_decode(static_steps);
        let dev = answers(&m, &narrow, SamplerSite::Device, 2);
        let what = format!("static steps: {static_steps}");
        assert_same_draws(&answer_draws(&host), &answer_draws(&dev), &what);
        let wide = TextSampling {
            top_p: 1.0,
            temperature: 1.5,
            ..narrow.clone()
        };
        let ids = |v: &[TextRollout]| v.iter().map(|r| r.answer_ids.clone()).collect::<Vec<_>>();
        assert_ne!(ids(&host), ids(&answers(&m, &wide, SamplerSite::Device, 2)));
    }
}

/// The draw kernel acts on CUDA devices only: asked for on the CPU, the device samplers (eager and in static
/// steps) draw what they drew without it, from the same noise.
#[test]
fn the_draw_kernel_switch_leaves_the_cpu_samplers_as_they_were() {
    let mut m = toy(17);
    let img = ImageSampling::default();
    let text = TextSampling {
        max_new_tokens: 5,
        ..TextSampling::default()
    };
    let ids = |v: &[TextRollout]| {
        v.iter()
            .map(|r| (r.answer_ids.clone(), r.logprobs.clone()))
            .collect::<Vec<_>>()
    };
    for static_steps in [false, true] {
        m.set_static_decode(static_steps);
        m.set_draw_kernel(false);
        let (codes, answers_off) = (
            sample(&m, &img, SamplerSite::Device, 31),
            answers(&m, &text, SamplerSite::Device, 32),
        );
        m.set_draw_kernel(true);
        let with_kernel = sample(&m, &img, SamplerSite::Device, 31);
        for (a, b) in codes.iter().zip(&with_kernel) {
            assert_eq!(a.codes, b.codes, "static steps: {static_steps}");
            assert_eq!(a.logprobs, b.logprobs);
        }
        assert_eq!(
            ids(&answers_off),
            ids(&answers(&m, &text, SamplerSite::Device, 32))
        );
    }
    assert_eq!(
        pairuni_model::draw_kernel::TRUST.status(),
        "unchecked",
        "nothing launched"
    );
}
