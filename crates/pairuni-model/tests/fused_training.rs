//! Differentiable forwards through candle's fused RMSNorm, rotary and softmax kernels and the single-node
//! projections, head splits and attention cores, with hand-written backwards (the accelerators' default), score
//! and differentiate as the compositions of basic ops do.

mod common;

use common::{
    answers_at, assert_grads_close, guided_logprobs_and_grads, rel_err, sample_at, toy,
    weight_grads,
};
use pairuni_model::{ImageSampling, Janus, SamplerSite, SharedScoring, TextRollout, TextSampling};

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
    // Each question twice with other answers, on the same image tensor: groups of two rollouts sharing a prompt.
    let first = answers_at(&toy(3), &s, SamplerSite::Host, 9);
    let mut rollouts = first.clone();
    for (r, again) in first
        .iter()
        .zip(answers_at(&toy(3), &s, SamplerSite::Host, 10))
    {
        rollouts.push(TextRollout {
            image: r.image.clone(),
            ..again
        });
    }
    assert!(rollouts[..3]
        .iter()
        .zip(&rollouts[3..])
        .any(|(a, b)| a.answer_ids != b.answer_ids));
    let run = |on: bool, sharing: Option<SharedScoring>| {
        let mut m = with_fused_training(3, on);
        m.set_prompt_sharing(sharing.is_some());
        if let Some(how) = sharing {
            m.set_shared_scoring(how);
        }
        let (lp, mask, ent) = m.answer_logprobs_entropy(&rollouts, 1.0).unwrap();
        let loss = ((&lp * &mask).unwrap().sum_all().unwrap()
            + (&ent * &mask).unwrap().sum_all().unwrap())
        .unwrap();
        (lp, weight_grads(&m, &loss))
    };
    let (lp_c, g_c) = run(false, None);
    // With prompt sharing, packed (each answer attends over its prompt's keys in one row) or cached (a second
    // forward over the prompt pass's keys and values), the gradient reaches the shared prompt through the answers:
    // what the GPU step runs.
    for sharing in [
        None,
        Some(SharedScoring::Packed),
        Some(SharedScoring::Cached),
    ] {
        let (lp_f, g_f) = run(true, sharing);
        assert!(rel_err(&lp_f, &lp_c) < 1e-5, "sharing {sharing:?}");
        assert_grads_close(&format!("answers, sharing {sharing:?}"), &g_f, &g_c, 1e-4);
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
    let run = |on: bool| guided_logprobs_and_grads(&with_fused_training(4, on), &rollouts);
    let (lp_f, g_f) = run(true);
    let (lp_c, g_c) = run(false);
    assert!(rel_err(&lp_f, &lp_c) < 1e-5);
    assert_grads_close("images", &g_f, &g_c, 1e-4);
}
