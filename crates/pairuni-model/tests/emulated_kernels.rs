//! The hand-written CUDA kernels through the model's own call sites, their sources run by the CPU emulator
//! (`nvrtc::emulate_on_cpu`): the decode kernels in image and answer rollouts (static decodes, the attention
//! kernel reading the live key count), the training kernels under autograd. Each must give what candle's ops give
//! without them, and each first-call check must pass. The unit tests run each kernel on given launches; these run
//! the integration a GPU would: the arguments the call sites build, the fallbacks, the checks, the in-place
//! cache writes. The checks' state is per process, so this file is a test binary of its own, and each test runs
//! its emulated part on one thread.

mod common;

use common::{
    answers_at, assert_grads_close, gen_prompts, guided_logprobs_and_grads, rel_err, sample_at,
};
use pairuni_model::nvrtc::{emulate_on_cpu, Trust};
use pairuni_model::{
    backward_kernels, decode_attention, draw_kernel, layer_kernels, norm_kernel, CfgLogprobPolicy,
    Device, ImageSampling, Janus, JanusConfig, SamplerSite, TextSampling,
};

/// Runs `f` with this thread's kernels emulated, switching the emulation off after (also on a panic).
fn emulated<T>(f: impl FnOnce() -> T) -> T {
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            emulate_on_cpu(false);
        }
    }
    emulate_on_cpu(true);
    let _off = Off;
    f()
}

fn assert_trusted(what: &str, t: &Trust) {
    assert_eq!(t.status(), "trusted", "{what}: {}", t.report());
}

/// The toy model with heads of 32 (the attention kernel takes 32, 64, 128 or 256; the toy's own are 40) and two
/// layers (each emulated launch is a subprocess).
fn toy32(seed: u64) -> Janus {
    let w = common::words();
    let mut cfg = JanusConfig::toy(w.len() + 8, 512);
    cfg.text_config.head_dim = Some(32);
    cfg.text_config.num_hidden_layers = 2;
    Janus::new_toy(&cfg, &w, &common::scenes(40, 7), seed, &Device::Cpu).unwrap()
}

/// The first `CODES` codes of images for the two generation prompts, drawn at the device from `seed`.
fn images(m: &Janus, s: &ImageSampling, seed: u64) -> Vec<pairuni_model::ImageRollout> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    m.sample_image_codes_at(&gen_prompts(m), s, CODES, SamplerSite::Device, &mut rng)
        .unwrap()
}

/// Codes drawn per image: enough steps for the static decode's warm-up and several steps after it.
const CODES: usize = 5;

/// The toy model with the decode kernels asked for, sampling through static decodes (as on a GPU) or, without
/// `fixed`, through `forward` over a preallocated cache (the attention kernel then reads every key of its width).
fn decoding(seed: u64, kernels: bool, fixed: bool) -> Janus {
    let mut m = toy32(seed);
    m.set_fused_sampling(true);
    m.set_static_decode(fixed);
    m.set_attention_kernel(kernels);
    m.set_layer_kernels(kernels);
    m
}

#[test]
fn decode_kernels_sample_what_candles_ops_sample() {
    let s = ImageSampling {
        cfg_weight: 4.0,
        temperature: 1.0,
        top_p: 1.0,
    };
    for fixed in [true, false] {
        let want = images(&decoding(5, false, fixed), &s, 3);
        let got = emulated(|| images(&decoding(5, true, fixed), &s, 3));
        let mut worst = 0f32;
        for (a, b) in want.iter().zip(&got) {
            assert_eq!(a.codes, b.codes, "static {fixed}");
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                worst = worst.max((x - y).abs());
            }
        }
        assert!(worst < 1e-4, "static {fixed}: max |Δ log-prob| {worst}");
    }
    // Both forms of the attention kernel ran and passed their checks.
    let attention = decode_attention::report();
    assert!(
        attention.calls > 0 && attention.failure.is_none(),
        "{attention:?}"
    );
    assert!(
        attention.check_rel_err.is_some_and(|e| e < 1e-5),
        "{attention:?}"
    );
    for (what, t) in [
        ("add + RMSNorm", &layer_kernels::ADD_NORM),
        ("SiLU · gate", &layer_kernels::SILU_MUL),
        ("rotary + cache write", &layer_kernels::ROPE_STORE),
    ] {
        assert_trusted(what, t);
    }

    // Answers: padded prompts of three lengths, rows that finish early, the same kernels.
    let t = TextSampling {
        max_new_tokens: 4,
        temperature: 1.0,
        top_p: 1.0,
        greedy: false,
    };
    let want = answers_at(&decoding(6, false, true), &t, SamplerSite::Device, 4);
    let got = emulated(|| answers_at(&decoding(6, true, true), &t, SamplerSite::Device, 4));
    for (a, b) in want.iter().zip(&got) {
        assert_eq!(a.answer_ids, b.answer_ids);
    }
}

#[test]
fn the_draw_kernel_draws_codes_whose_logprobs_are_the_teacher_forced_ones() {
    let s = ImageSampling {
        cfg_weight: 3.0,
        temperature: 1.0,
        top_p: 1.0,
    };
    let mut m = decoding(7, true, true);
    m.set_draw_kernel(true);
    // The first call, which checks the kernel, keeps to a nucleus: the kernel's nucleus on the check's noise must
    // draw what the host's nucleus draws on it.
    let nucleus = ImageSampling {
        top_p: 0.9,
        ..s.clone()
    };
    let kept = emulated(|| images(&m, &nucleus, 9));
    assert_trusted("draw", &draw_kernel::TRUST);
    // A nucleus of only the most probable code: the kernel's counter-noise draws are the greedy codes.
    let narrow = ImageSampling {
        top_p: 1e-6,
        ..s.clone()
    };
    let greedy = ImageSampling {
        temperature: 0.0,
        ..s.clone()
    };
    let want = {
        use rand::SeedableRng;
        m.sample_image_codes_at(
            &gen_prompts(&m),
            &greedy,
            CODES,
            SamplerSite::Host,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(1),
        )
        .unwrap()
    };
    let got = emulated(|| images(&m, &narrow, 10));
    for (a, b) in want.iter().zip(&got) {
        assert_eq!(a.codes, b.codes);
    }
    let rollouts = emulated(|| images(&m, &s, 8));
    assert_trusted("draw", &draw_kernel::TRUST);
    let codebook = m.config().vq_config.num_embeddings as u32;
    assert!(rollouts
        .iter()
        .all(|r| r.codes.iter().all(|&c| c < codebook)));
    // Its own noise after that: its codes are not candle's, but their log-probs are what scoring gives them.
    for rollouts in [&rollouts, &kept] {
        let scored = m
            .image_logprobs(rollouts, CfgLogprobPolicy::Conditional)
            .unwrap();
        let sampled = pairuni_model::Tensor::from_vec(
            rollouts.iter().flat_map(|r| r.logprobs.clone()).collect(),
            scored.shape(),
            &Device::Cpu,
        )
        .unwrap();
        assert!(rel_err(&sampled, &scored) < 1e-4);
    }
}

#[test]
fn training_kernels_score_and_differentiate_as_candles_ops() {
    let s = ImageSampling {
        cfg_weight: 3.0,
        temperature: 1.0,
        top_p: 1.0,
    };
    let rollouts = sample_at(&toy32(4), &s, SamplerSite::Host, 11);
    let run = |kernels: bool| {
        let mut m = toy32(4);
        m.set_fused_training(true);
        m.set_norm_kernel(kernels);
        m.set_backward_kernels(kernels);
        guided_logprobs_and_grads(&m, &rollouts)
    };
    let (lp_c, g_c) = run(false);
    let (lp_k, g_k) = emulated(|| run(true));
    for (what, t) in [
        ("RMSNorm backward", &norm_kernel::TRUST),
        ("SiLU · gate backward", &backward_kernels::SILU_MUL),
        ("softmax backward", &backward_kernels::SOFTMAX),
    ] {
        assert_trusted(what, t);
    }
    assert!(rel_err(&lp_k, &lp_c) < 1e-5);
    assert_grads_close("images, training kernels", &g_k, &g_c, 1e-4);
}

#[test]
fn the_conv_kernel_decodes_what_candles_conv2d_decodes() {
    use candle_nn::VarBuilder;
    use pairuni_model::conv_kernel;
    use pairuni_model::vq::{JanusVq, JanusVqConfig};
    // The committed Janus fixture's VQ (docs/FIXTURES.md): 3×3 convolutions at 8² to 32², 32 to 64 channels.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/janus");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let config: JanusVqConfig = serde_json::from_value(config["vq_config"].clone()).unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(weights, pairuni_model::DType::F32, &Device::Cpu);
    let vq = JanusVq::new(&config, vb.pp("model.vqmodel")).unwrap();
    let fixtures =
        candle_core::safetensors::load(dir.join("fixtures.safetensors"), &Device::Cpu).unwrap();
    let codes = &fixtures["vq.decode_codes"];
    let want = vq.decode_codes(codes).unwrap();
    // The switch is the process's: no other test here decodes with the VQ.
    let before = conv_kernel::enabled();
    conv_kernel::set_enabled(true);
    let got = emulated(|| vq.decode_codes(codes));
    conv_kernel::set_enabled(before);
    assert_trusted("im2col", &conv_kernel::IM2COL);
    assert!(rel_err(&got.unwrap(), &want) < 1e-5);
}
