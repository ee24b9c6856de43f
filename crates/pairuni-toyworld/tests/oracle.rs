//! The oracle teacher and the verifier (issue 3 "done when").

use pairuni_data::{GenerationSample, UnderstandingSample};
use pairuni_toyworld::config::WorldConfig;
use pairuni_toyworld::generate::{generation_sample, understanding_sample};
use pairuni_toyworld::oracle::{verify_caption, verify_question, Oracle};
use pairuni_toyworld::render;

type Understanding = Vec<(UnderstandingSample, image::RgbImage)>;
type Generation = Vec<(GenerationSample, image::RgbImage)>;

fn samples(n: usize) -> (Understanding, Generation) {
    let cfg = WorldConfig::default();
    let u = (0..n)
        .map(|i| {
            let (s, scene) = understanding_sample(&cfg, i).unwrap();
            (s, render(&scene, cfg.size).unwrap())
        })
        .collect();
    let g = (0..n)
        .map(|i| {
            let (s, scene) = generation_sample(&cfg, i).unwrap();
            (s, render(&scene, cfg.size).unwrap())
        })
        .collect();
    (u, g)
}

#[test]
fn error_free_oracle_is_always_accepted() {
    let (u, g) = samples(1500);
    let oracle = Oracle::new(0.0, 1);
    for (s, img) in &u {
        let c = oracle.caption(s, img);
        assert!(c.corruption.is_none());
        verify_caption(s, img, &c.caption).unwrap_or_else(|r| panic!("{s:?} {:?}: {r}", c.caption));
    }
    for (s, img) in &g {
        let q = oracle.question_for(s, img).unwrap();
        assert_eq!(q.options.len(), 4);
        verify_question(s, img, &q.question, &q.answer)
            .unwrap_or_else(|r| panic!("{s:?} {q:?}: {r}"));
    }
}

#[test]
fn corrupted_completions_are_exactly_the_rejected_ones() {
    let (u, g) = samples(1500);
    let oracle = Oracle::new(0.3, 7);
    let mut rejected = 0;
    let mut total = 0;
    for (s, img) in &u {
        let c = oracle.caption(s, img);
        let verdict = verify_caption(s, img, &c.caption);
        assert_eq!(
            verdict.is_err(),
            c.corruption.is_some(),
            "{:?} {:?} {verdict:?}",
            c.caption,
            c.corruption
        );
        rejected += usize::from(verdict.is_err());
        total += 1;
    }
    for (s, img) in &g {
        let q = oracle.question_for(s, img).unwrap();
        let verdict = verify_question(s, img, &q.question, &q.answer);
        assert_eq!(
            verdict.is_err(),
            q.corruption.is_some(),
            "{q:?} {verdict:?}"
        );
        rejected += usize::from(verdict.is_err());
        total += 1;
    }
    // 3000 Bernoulli(0.3) draws: standard deviation ≈ 25, so ±100 is four sigma.
    assert!(
        (800..=1000).contains(&rejected),
        "rejected {rejected} of {total}"
    );
}

#[test]
fn verifier_rejects_foreign_or_wrong_text_with_a_reason() {
    let (u, g) = samples(20);
    let (s, img) = &u[0];
    for bad in [
        "",
        "A dog on a sofa.",
        "There are two objects: a red circle in the center.",
    ] {
        let r = verify_caption(s, img, bad).unwrap_err();
        assert!(!r.reason.is_empty());
    }
    let (s, img) = &g[0];
    assert!(verify_question(s, img, "What is this?", "A").is_err());
    assert!(verify_question(s, img, "Is there a red circle in the image?", "yes").is_err());
    let mut wrong_gold = u[1].0.clone();
    wrong_gold.answer = if wrong_gold.answer == "yes" {
        "no".into()
    } else {
        "yes".into()
    };
    let good = Oracle::new(0.0, 0).caption(&u[1].0, &u[1].1).caption;
    assert!(verify_caption(&wrong_gold, &u[1].1, &good).is_err());
}
