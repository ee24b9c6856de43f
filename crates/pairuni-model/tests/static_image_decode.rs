//! The static image decode (fixed-shape steps, the form a CUDA graph captures), run on the CPU: from the same
//! seed it samples the codes of the device sampler with the same log-probs, with left-padded prompts, across an
//! attention-width boundary, with either kernel set, and greedily it gives the host's argmax. On the CPU no
//! graph is captured: every step runs eagerly, and the report says so.

mod common;

use common::{gen_prompts as prompts, sample_at as sample, toy};
use pairuni_model::graphs::GraphReport;
use pairuni_model::{ImageSampling, SamplerSite};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn static_steps_sample_what_the_device_sampler_samples() {
    let s = ImageSampling {
        cfg_weight: 4.0,
        temperature: 1.0,
        top_p: 1.0,
    };
    for fused in [false, true] {
        let mut m = toy(8);
        m.set_fused_sampling(fused);
        let plain = sample(&m, &s, SamplerSite::Device, 21);
        m.set_static_decode(true);
        let fixed = sample(&m, &s, SamplerSite::Device, 21);
        let n = m.image_tokens_per_image();
        // The toy's prompts plus 64 codes cross the first width (64 keys), so two step shapes ran.
        assert!(prompts(&m)[1].len() + n > 64);
        assert_eq!(
            m.last_graph_report(),
            Some(GraphReport {
                eager: n,
                ..GraphReport::default()
            })
        );
        let mut worst = 0f32;
        for (a, b) in plain.iter().zip(&fixed) {
            assert_eq!(a.codes, b.codes, "fused {fused}");
            assert_eq!(b.logprobs.len(), n);
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                worst = worst.max((x - y).abs());
            }
        }
        assert!(worst < 1e-5, "fused {fused}: max |Δ log-prob| {worst}");
    }
}

#[test]
fn greedy_static_steps_give_the_host_argmax() {
    let mut m = toy(9);
    let greedy = ImageSampling {
        cfg_weight: 5.0,
        temperature: 0.0,
        top_p: 1.0,
    };
    let host = sample(&m, &greedy, SamplerSite::Host, 1);
    m.set_static_decode(true);
    let fixed = sample(&m, &greedy, SamplerSite::Device, 2);
    for (h, f) in host.iter().zip(&fixed) {
        assert_eq!(h.codes, f.codes);
    }
}

#[test]
fn the_static_decode_is_seeded_and_leaves_the_caller_stream_as_the_device_sampler_does() {
    use rand::RngCore;
    let mut m = toy(10);
    m.set_static_decode(true);
    let s = ImageSampling::default();
    let a = sample(&m, &s, SamplerSite::Device, 5);
    let b = sample(&m, &s, SamplerSite::Device, 5);
    let c = sample(&m, &s, SamplerSite::Device, 6);
    assert_eq!(a[0].codes, b[0].codes);
    assert_ne!(a[0].codes, c[0].codes);
    let mut with_static = ChaCha8Rng::seed_from_u64(3);
    m.sample_image_codes_at(&prompts(&m), &s, 4, SamplerSite::Device, &mut with_static)
        .unwrap();
    m.set_static_decode(false);
    let mut plain = ChaCha8Rng::seed_from_u64(3);
    m.sample_image_codes_at(&prompts(&m), &s, 4, SamplerSite::Device, &mut plain)
        .unwrap();
    assert_eq!(with_static.next_u64(), plain.next_u64());
}

/// What the static steps cost eagerly, against the device sampler's `forward` steps (a timing, not a check:
/// `cargo test --release -p pairuni-model --test static_image_decode -- --ignored --nocapture`). On the CPU
/// nothing is captured, so this measures only the price of fixed shapes; what graphs buy is a GPU measurement.
#[test]
#[ignore]
fn static_decode_timing() {
    let mut m = toy(11);
    let s = ImageSampling::default();
    let many: Vec<Vec<u32>> = prompts(&m).into_iter().cycle().take(16).collect();
    let n = m.image_tokens_per_image();
    for round in 0..3 {
        for fixed in [false, true] {
            m.set_static_decode(fixed);
            let t0 = std::time::Instant::now();
            let reps = 5u64;
            for r in 0..reps {
                m.sample_image_codes_at(
                    &many,
                    &s,
                    n,
                    SamplerSite::Device,
                    &mut ChaCha8Rng::seed_from_u64(r),
                )
                .unwrap();
            }
            let per = t0.elapsed().as_secs_f64() * 1e3 / (reps as usize * n) as f64;
            println!("round {round} static {fixed}: {per:.3} ms per code (16 prompts, CFG batch 32, {n} codes)");
        }
    }
}
