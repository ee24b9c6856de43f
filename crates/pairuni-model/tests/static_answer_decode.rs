//! The static answer decode (fixed-shape steps, the form a CUDA graph captures), run on the CPU: from the same
//! seed it draws the device sampler's tokens with the same log-probs, across an attention-width boundary, with
//! rows that finish at different steps and either kernel set; greedily it gives the host's tokens. On the CPU
//! no graph is captured: every step runs eagerly, and the report says so.

mod common;

use common::{answers_at as answers, toy};
use pairuni_model::graphs::GraphReport;
use pairuni_model::llama::WIDTH_STEP;
use pairuni_model::{SamplerSite, TextSampling};

fn sampled(max_new_tokens: usize) -> TextSampling {
    TextSampling {
        max_new_tokens,
        temperature: 1.0,
        top_p: 1.0,
        greedy: false,
    }
}

#[test]
fn static_steps_draw_what_the_device_sampler_draws() {
    let s = sampled(48);
    let (mut early, mut full, mut crossed) = (0, 0, false);
    for (seed, fused) in [(1, false), (2, true), (3, false), (4, true)] {
        let mut m = toy(20 + seed);
        m.set_fused_sampling(fused);
        let plain = answers(&m, &s, SamplerSite::Device, seed);
        assert_eq!(m.last_answer_graph_report(), None);
        m.set_static_decode(true);
        let fixed = answers(&m, &s, SamplerSite::Device, seed);
        let mut worst = 0f32;
        for (a, b) in plain.iter().zip(&fixed) {
            assert_eq!(a.answer_ids, b.answer_ids, "seed {seed} fused {fused}");
            assert_eq!(b.logprobs.len(), b.answer_ids.len());
            assert_eq!(a.text, b.text);
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                worst = worst.max((x - y).abs());
            }
        }
        assert!(worst < 1e-5, "seed {seed}: max |Δ log-prob| {worst}");
        // Steps run until every row has finished; a finished row's later draws are dropped.
        let longest = fixed.iter().map(|r| r.answer_ids.len()).max().unwrap();
        assert_eq!(
            m.last_answer_graph_report(),
            Some(GraphReport {
                eager: longest,
                ..GraphReport::default()
            })
        );
        let eos = m.eos_token();
        for r in &fixed {
            if r.answer_ids.len() < s.max_new_tokens {
                assert_eq!(r.answer_ids.last(), Some(&eos));
                early += 1;
            } else {
                full += 1;
            }
        }
        let past = common::questions()
            .iter()
            .map(|q| m.understanding_prompt(q).unwrap().len())
            .max()
            .unwrap();
        crossed |= past < WIDTH_STEP && past + longest > WIDTH_STEP;
    }
    // The seeds cover rows that stop at eos and rows that run to the limit, and decodes whose keys outgrow the
    // first attention width (two step shapes).
    assert!(early > 0 && full > 0, "early {early}, full {full}");
    assert!(crossed);
}

#[test]
fn greedy_static_steps_give_the_host_tokens() {
    let mut m = toy(30);
    let greedy = TextSampling {
        greedy: true,
        ..sampled(40)
    };
    let host = answers(&m, &greedy, SamplerSite::Host, 1);
    m.set_static_decode(true);
    let fixed = answers(&m, &greedy, SamplerSite::Device, 2);
    for (h, f) in host.iter().zip(&fixed) {
        assert_eq!(h.answer_ids, f.answer_ids);
        for (a, b) in h.logprobs.iter().zip(&f.logprobs) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
    // The host path runs no static decode, whatever the setting.
    answers(&m, &greedy, SamplerSite::Host, 1);
    assert_eq!(m.last_answer_graph_report(), None);
}

#[test]
fn no_new_tokens_give_empty_answers_on_every_path() {
    let mut m = toy(31);
    m.set_static_decode(true);
    for site in [SamplerSite::Host, SamplerSite::Device] {
        let rolls = answers(&m, &sampled(0), site, 1);
        assert_eq!(rolls.len(), 3);
        assert!(rolls
            .iter()
            .all(|r| r.answer_ids.is_empty() && r.logprobs.is_empty()));
    }
}
