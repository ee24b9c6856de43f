//! Rollouts of one image and question (a GRPO group) share the prompt's forward: the sampler prefills each distinct
//! prompt once, and the teacher-forced pass runs each distinct prompt once, packed with its answers into one row or
//! before them as a cache. Each must compute what the unshared passes compute: the same draws, log-probs, entropies
//! and gradients.

mod common;

use common::{assert_grads_close, questions, rel_err, scenes, toy, weight_grads};
use pairuni_model::{Janus, SamplerSite, SharedScoring, Tensor, TextRollout, TextSampling};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn sampling(max_new_tokens: usize) -> TextSampling {
    TextSampling {
        max_new_tokens,
        temperature: 1.0,
        top_p: 1.0,
        greedy: false,
    }
}

/// Two questions about two images, each asked `g` times, the groups interleaved (rows a, b, a, b, …) so that a
/// group's rows are not adjacent, plus one question asked once.
fn grouped_inputs(g: usize) -> (Vec<pairuni_model::RgbImage>, Vec<String>) {
    let imgs = scenes(3, 21);
    let qs = questions();
    let (mut images, mut asked) = (Vec::new(), Vec::new());
    for _ in 0..g {
        for k in 0..2 {
            images.push(imgs[k].clone());
            asked.push(qs[k].clone());
        }
    }
    images.push(imgs[2].clone());
    asked.push(qs[2].clone());
    (images, asked)
}

fn with_sharing(seed: u64, on: bool) -> Janus {
    let mut m = toy(seed);
    m.set_prompt_sharing(on);
    m
}

#[test]
fn equal_images_are_preprocessed_once_and_shared() {
    let m = toy(1);
    assert!(
        !m.prompt_sharing(),
        "the CPU keeps the unshared passes by default"
    );
    let (images, _) = grouped_inputs(3);
    let px = m.preprocess_images(&images).unwrap();
    assert_eq!(px.len(), images.len());
    assert_eq!(px[0].id(), px[2].id());
    assert_eq!(px[1].id(), px[3].id());
    assert_ne!(px[0].id(), px[1].id());
    assert_ne!(px[6].id(), px[0].id());
    // Each is the one image's own preprocessing.
    for (img, t) in images.iter().zip(&px) {
        assert_eq!(rel_err(t, &m.preprocess_image(img).unwrap()), 0.0);
    }
}

#[test]
fn shared_prompts_draw_the_unshared_answers_on_every_sampler() {
    let (images, asked) = grouped_inputs(3);
    let plain = with_sharing(2, false);
    let px = plain.preprocess_images(&images).unwrap();
    let prompts: Vec<Vec<u32>> = asked
        .iter()
        .map(|q| plain.understanding_prompt(q).unwrap())
        .collect();
    let s = sampling(5);
    for (site, fixed) in [
        (SamplerSite::Host, false),
        (SamplerSite::Device, false),
        (SamplerSite::Device, true),
    ] {
        let run = |sharing: bool| {
            let mut m = with_sharing(2, sharing);
            m.set_static_decode(fixed);
            m.sample_answers_ids_at(&px, &prompts, &s, site, &mut ChaCha8Rng::seed_from_u64(8))
                .unwrap()
        };
        let (a, b) = (run(false), run(true));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.answer_ids, y.answer_ids, "{site:?} {fixed}: row {i}");
            let d = x
                .logprobs
                .iter()
                .zip(&y.logprobs)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                d < 1e-5,
                "{site:?} {fixed}: row {i} log-probs differ by {d}"
            );
        }
        // Draws differ between rows of one group: each rollout draws for itself.
        assert!(
            (0..3).any(|k| b[2 * k].answer_ids != b[2 * k + 2].answer_ids),
            "{site:?} {fixed}: a group's rollouts all drew the same answer"
        );
    }
}

/// Teacher-forced log-probs, entropies and the gradients of their sum w.r.t. every weight under `m`.
fn scored(m: &Janus, rollouts: &[TextRollout]) -> (Tensor, Tensor, Vec<(String, Tensor)>) {
    let (lp, mask, ent) = m.answer_logprobs_entropy(rollouts, 1.0).unwrap();
    let loss = (&lp * &mask).unwrap().sum_all().unwrap();
    (lp, ent, weight_grads(m, &loss))
}

#[test]
fn shared_prompts_score_and_differentiate_as_the_unshared_pass() {
    let (images, asked) = grouped_inputs(3);
    for max_new in [1, 6] {
        let plain = with_sharing(3, false);
        let rollouts = plain
            .sample_answers(
                &images,
                &asked,
                &sampling(max_new),
                &mut ChaCha8Rng::seed_from_u64(5),
            )
            .unwrap();
        // Answers of several lengths (as rows that stop at eos give), so that some rows carry right padding.
        let rollouts: Vec<TextRollout> = rollouts
            .into_iter()
            .enumerate()
            .map(|(i, mut r)| {
                let n = r.answer_ids.len().min(1 + i % max_new);
                r.answer_ids.truncate(n);
                r.logprobs.truncate(n);
                r
            })
            .collect();
        assert_eq!(
            rollouts.iter().map(|r| r.answer_ids.len()).max(),
            Some(max_new)
        );
        let (lp_a, ent_a, g_a) = scored(&plain, &rollouts);
        for how in [
            SharedScoring::Packed,
            SharedScoring::Cached,
            SharedScoring::Auto,
        ] {
            let mut shared = with_sharing(3, true);
            shared.set_shared_scoring(how);
            let (lp_b, ent_b, g_b) = scored(&shared, &rollouts);
            let err = rel_err(&lp_b, &lp_a);
            assert!(err < 1e-5, "{how:?}, max_new {max_new}: {err}");
            assert!(rel_err(&ent_b, &ent_a) < 1e-5);
            // The recorded sampling log-probs agree too.
            let lp = lp_b.to_vec2::<f32>().unwrap();
            for (row, r) in lp.iter().zip(&rollouts) {
                for (x, y) in row.iter().zip(&r.logprobs) {
                    assert!((x - y).abs() < 2e-4);
                }
            }
            assert_grads_close(&format!("{how:?}, max_new {max_new}"), &g_b, &g_a, 1e-4);
        }
    }
}
