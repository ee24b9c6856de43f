//! Differentiable forwards through candle's fused RMSNorm, rotary and softmax kernels with hand-written backwards
//! (the accelerators' default) score and differentiate as the compositions of basic ops do.

mod common;

use common::{answers_at, rel_err, sample_at, toy};
use pairuni_model::{CfgLogprobPolicy, ImageSampling, Janus, SamplerSite, Tensor, TextSampling};

fn with_fused_training(seed: u64, on: bool) -> Janus {
    let mut m = toy(seed);
    m.set_fused_training(on);
    m
}

/// The gradients of `loss` w.r.t. every weight of `m`, by name.
fn grads(m: &Janus, loss: &Tensor) -> Vec<(String, Tensor)> {
    let g = loss.backward().unwrap();
    let mut out: Vec<(String, Tensor)> = m
        .all_vars()
        .into_iter()
        .filter_map(|(name, v)| g.get(v.as_tensor()).map(|t| (name, t.clone())))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn assert_close(what: &str, a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>(),
        "{what}: the same weights get gradients"
    );
    assert!(a.len() > 10, "{what}: gradients reached the layers");
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // Some gradients are zero up to rounding (a key bias shifts every score of a query alike, which softmax
    // ignores): errors are measured against the largest gradient's scale where a tensor's own is that small.
    let floor = 1e-3 * b.iter().map(|(_, y)| max_abs(y)).fold(0f32, f32::max);
    for ((name, x), (_, y)) in a.iter().zip(b) {
        let d = max_abs(&(x - y).unwrap());
        let e = d / max_abs(y).max(floor);
        assert!(e < 1e-4, "{what}: {name} gradient differs by {e}");
    }
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
    let run = |on: bool| {
        let m = with_fused_training(3, on);
        let (lp, mask, ent) = m.answer_logprobs_entropy(&rollouts, 1.0).unwrap();
        let loss = ((&lp * &mask).unwrap().sum_all().unwrap()
            + (&ent * &mask).unwrap().sum_all().unwrap())
        .unwrap();
        (lp, grads(&m, &loss))
    };
    let (lp_f, g_f) = run(true);
    let (lp_c, g_c) = run(false);
    assert!(rel_err(&lp_f, &lp_c) < 1e-5);
    assert_close("answers", &g_f, &g_c);
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
        (lp, grads(&m, &loss))
    };
    let (lp_f, g_f) = run(true);
    let (lp_c, g_c) = run(false);
    assert!(rel_err(&lp_f, &lp_c) < 1e-5);
    assert_close("images", &g_f, &g_c);
}
