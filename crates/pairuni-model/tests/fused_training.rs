//! Differentiable forwards through candle's fused RMSNorm, rotary and softmax kernels and the single-node
//! projections, head splits and attention cores, with hand-written backwards (the accelerators' default), score
//! and differentiate as the compositions of basic ops do.

mod common;

use common::{answers_at, assert_grads_close, rel_err, sample_at, toy, weight_grads};
use pairuni_model::{CfgLogprobPolicy, ImageSampling, Janus, SamplerSite, TextSampling};

fn with_fused_training(seed: u64, on: bool) -> Janus {
    let mut m = toy(seed);
    m.set_fused_training(on);
    m
}

#[test]
fn cpu_defaults_to_the_compositions() {
    assert!(!toy(1).fused_training());
}

#[test]
fn answers_score_and_differentiate_as_the_compositions() {
    let s = TextSampling {
        max_new_tokens: 5,
        temperature: 1.0,
        top_p: 1.0,
        greedy: false,
    };
    let rollouts = answers_at(&toy(3), &s, SamplerSite::Host, 9);
    let run = |on: bool, sharing: bool| {
        let mut m = with_fused_training(3, on);
        m.set_prompt_sharing(sharing);
        let (lp, mask, ent) = m.answer_logprobs_entropy(&rollouts, 1.0).unwrap();
        let loss = ((&lp * &mask).unwrap().sum_all().unwrap()
            + (&ent * &mask).unwrap().sum_all().unwrap())
        .unwrap();
        (lp, weight_grads(&m, &loss))
    };
    let (lp_c, g_c) = run(false, false);
    // With prompt sharing the answers attend over the shared prompt pass's keys and values (a second forward
    // through the cache), and the gradient reaches that pass through them: what the GPU step runs.
    for sharing in [false, true] {
        let (lp_f, g_f) = run(true, sharing);
        assert!(rel_err(&lp_f, &lp_c) < 1e-5, "sharing {sharing}");
        assert_grads_close(&format!("answers, sharing {sharing}"), &g_f, &g_c, 1e-4);
    }
}

#[test]
fn image_codes_score_and_differentiate_as_the_compositions() {
    let s = ImageSampling {
        cfg_weight: 3.0,
        temperature: 1.0,
        top_p: 1.0,
    };
    let rollouts = sample_at(&toy(4), &s, SamplerSite::Host, 11);
    let run = |on: bool| {
        let m = with_fused_training(4, on);
        let lp = m
            .image_logprobs_at(
                &rollouts,
                CfgLogprobPolicy::GuidedMix { cfg_weight: 3.0 },
                1.0,
            )
            .unwrap();
        let loss = lp.sum_all().unwrap();
        (lp, weight_grads(&m, &loss))
    };
    let (lp_f, g_f) = run(true);
    let (lp_c, g_c) = run(false);
    assert!(rel_err(&lp_f, &lp_c) < 1e-5);
    assert_grads_close("images", &g_f, &g_c, 1e-4);
}
