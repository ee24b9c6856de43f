//! Behaviour of the toy model: KV cache, padding, sampling/teacher-forcing alignment, gradients, save/load.

mod common;

use candle_core::backprop::GradStore;
use candle_core::Var;
use common::{questions, rel_err, scenes, toy};
use pairuni_model::{
    CfgLogprobPolicy, DType, Device, ImageSampling, Janus, ParamSelection, Tensor, TextRollout,
    TextSampling,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn incremental_decoding_equals_the_full_forward_with_padding() {
    let m = toy(1);
    let rows = vec![
        vec![1u32, 9, 10, 11, 12, 13, 14, 15],
        vec![1u32, 20, 21, 22, 23, 24, 25, 26],
    ];
    let emb = m.token_embeddings(&rows).unwrap();
    let full_valid = vec![vec![true; 8]; 2];
    let (full, _) = m
        .decoder_step(&emb, &full_valid, &m.empty_cache(2))
        .unwrap();
    // Prefill 3 tokens, then one at a time.
    let (h, mut cache) = m
        .decoder_step(
            &emb.narrow(1, 0, 3).unwrap(),
            &vec![vec![true; 3]; 2],
            &m.empty_cache(2),
        )
        .unwrap();
    assert!(rel_err(&h, &full.narrow(1, 0, 3).unwrap()) < 1e-5);
    for t in 3..8 {
        let (h, c) = m
            .decoder_step(&emb.narrow(1, t, 1).unwrap(), &vec![vec![true]; 2], &cache)
            .unwrap();
        cache = c;
        let e = rel_err(&h, &full.narrow(1, t, 1).unwrap());
        assert!(e < 1e-5, "step {t}: rel err {e}");
    }
    assert_eq!(cache.len(), 8);
    // Row 1 shortened and left-padded by 3 must equal row 1 alone.
    let short = vec![1u32, 20, 21, 22, 23];
    let padded = vec![rows[0].clone(), [vec![0u32; 3], short.clone()].concat()];
    let valid = vec![vec![true; 8], [vec![false; 3], vec![true; 5]].concat()];
    let (hp, _) = m
        .decoder_step(
            &m.token_embeddings(&padded).unwrap(),
            &valid,
            &m.empty_cache(2),
        )
        .unwrap();
    let (alone, _) = m
        .decoder_step(
            &m.token_embeddings(&[short]).unwrap(),
            &[vec![true; 5]],
            &m.empty_cache(1),
        )
        .unwrap();
    let e = rel_err(
        &hp.get(1).unwrap().narrow(0, 3, 5).unwrap(),
        &alone.get(0).unwrap(),
    );
    assert!(e < 1e-5, "left padding changed the result: {e}");
}

#[test]
fn text_sampling_logprobs_equal_teacher_forcing_and_are_seeded() {
    let m = toy(2);
    let imgs = scenes(3, 11);
    let s = TextSampling {
        max_new_tokens: 6,
        temperature: 0.8,
        top_p: 0.95,
        greedy: false,
    };
    let run = |seed| {
        m.sample_answers(
            &imgs,
            &questions(),
            &s,
            &mut ChaCha8Rng::seed_from_u64(seed),
        )
        .unwrap()
    };
    let a = run(5);
    let b = run(5);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.answer_ids, y.answer_ids);
        assert_eq!(x.logprobs, y.logprobs);
    }
    let c = run(6);
    assert_ne!(
        a.iter().map(|r| r.answer_ids.clone()).collect::<Vec<_>>(),
        c.iter().map(|r| r.answer_ids.clone()).collect::<Vec<_>>()
    );
    for r in &a {
        assert!(!r.answer_ids.is_empty() && r.answer_ids.len() <= 6);
        assert_eq!(r.logprobs.len(), r.answer_ids.len());
        let eos = m.eos_token();
        if let Some(p) = r.answer_ids.iter().position(|&t| t == eos) {
            assert_eq!(p + 1, r.answer_ids.len(), "tokens after eos");
        }
    }
    let (lp, mask) = m.answer_logprobs_at(&a, 0.8).unwrap();
    let lp = lp.to_vec2::<f32>().unwrap();
    let mask = mask.to_vec2::<f32>().unwrap();
    for (i, r) in a.iter().enumerate() {
        let n = r.answer_ids.len();
        let d = max_abs_diff(&lp[i][..n], &r.logprobs);
        assert!(
            d < 2e-4,
            "row {i}: teacher-forced vs sampled log-probs differ by {d}"
        );
        assert!(mask[i][..n].iter().all(|&v| v == 1.0) && mask[i][n..].iter().all(|&v| v == 0.0));
        assert!(lp[i][n..].iter().all(|&v| v == 0.0));
    }
    // At another temperature they differ: the check above depends on T.
    let (lp1, _) = m.answer_logprobs(&a).unwrap();
    let lp1 = lp1.to_vec2::<f32>().unwrap();
    assert!(max_abs_diff(&lp1[0][..a[0].logprobs.len()], &a[0].logprobs) > 1e-3);
}

#[test]
fn image_sampling_logprobs_equal_teacher_forcing_and_guided_mix_differs() {
    let m = toy(3);
    let prompts = vec![
        "a red circle".to_string(),
        "two blue squares left of a yellow triangle".to_string(),
    ];
    let s = ImageSampling {
        cfg_weight: 3.0,
        temperature: 0.9,
        top_p: 1.0,
    };
    let a = m
        .sample_images(&prompts, &s, &mut ChaCha8Rng::seed_from_u64(1))
        .unwrap();
    let b = m
        .sample_images(&prompts, &s, &mut ChaCha8Rng::seed_from_u64(1))
        .unwrap();
    assert_eq!(a[0].codes, b[0].codes);
    assert_eq!(a[1].logprobs, b[1].logprobs);
    let n = m.image_tokens_per_image();
    assert_eq!(n, 64);
    for r in &a {
        assert_eq!(r.codes.len(), n);
        assert_eq!(r.logprobs.len(), n);
    }
    let lp = m
        .image_logprobs_at(&a, CfgLogprobPolicy::Conditional, 0.9)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, r) in a.iter().enumerate() {
        let d = max_abs_diff(&lp[i], &r.logprobs);
        assert!(
            d < 2e-4,
            "image row {i}: teacher-forced vs sampling log-probs differ by {d}"
        );
    }
    // Reading log-probs one position late (the known off-by-one) would not match.
    let shifted = max_abs_diff(&lp[0][1..], &a[0].logprobs[..n - 1]);
    assert!(shifted > 1e-3);
    let mix = m
        .image_logprobs_at(&a, CfgLogprobPolicy::GuidedMix { cfg_weight: 3.0 }, 0.9)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(max_abs_diff(&mix[0], &lp[0]) > 1e-3);
    let imgs = m
        .decode_codes(&a.iter().map(|r| r.codes.clone()).collect::<Vec<_>>())
        .unwrap();
    assert_eq!((imgs[0].width(), imgs[0].height()), (32, 32));
}

#[test]
fn cfg_weight_one_samples_the_conditional_distribution_exactly() {
    // With w = 1 the mix is l_c, so GuidedMix{1} log-probs equal the conditional ones.
    let m = toy(4);
    let s = ImageSampling {
        cfg_weight: 1.0,
        temperature: 1.0,
        top_p: 1.0,
    };
    let a = m
        .sample_images(
            &["a green square".to_string()],
            &s,
            &mut ChaCha8Rng::seed_from_u64(2),
        )
        .unwrap();
    let c = m.image_logprobs(&a, CfgLogprobPolicy::Conditional).unwrap();
    let g = m
        .image_logprobs(&a, CfgLogprobPolicy::GuidedMix { cfg_weight: 1.0 })
        .unwrap();
    assert!(rel_err(&g, &c) < 1e-5);
}

/// Gradients of the summed log-probs of two sampled answers and one CFG image of `m` (seeded).
fn rollout_gradients(m: &Janus) -> GradStore {
    let imgs = scenes(2, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let s = TextSampling {
        max_new_tokens: 3,
        temperature: 1.0,
        top_p: 1.0,
        greedy: false,
    };
    let text = m
        .sample_answers(&imgs, &questions()[..2], &s, &mut rng)
        .unwrap();
    let img = m
        .sample_images(
            &["a red circle".to_string()],
            &ImageSampling::default(),
            &mut rng,
        )
        .unwrap();
    let (lp, mask) = m.answer_logprobs(&text).unwrap();
    let ilp = m
        .image_logprobs(&img, CfgLogprobPolicy::GuidedMix { cfg_weight: 5.0 })
        .unwrap();
    let loss = ((lp * mask).unwrap().sum_all().unwrap() + ilp.sum_all().unwrap()).unwrap();
    loss.backward().unwrap()
}

/// Whether `g` holds a gradient for `v` that is not all zeros.
fn has_gradient(g: &GradStore, v: &Var) -> bool {
    g.get(v.as_tensor()).is_some_and(|t| {
        t.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    })
}

#[test]
fn every_trainable_parameter_gets_a_gradient() {
    let m = toy(5);
    let grads = rollout_gradients(&m);
    let vars = m.trainable_vars(&ParamSelection::All);
    assert_eq!(
        vars.len(),
        m.all_vars().len(),
        "toy has no frozen VQ weights"
    );
    let missing: Vec<_> = vars
        .iter()
        .filter(|(_, v)| !has_gradient(&grads, v))
        .map(|(n, _)| n.clone())
        .collect();
    assert!(missing.is_empty(), "no gradient for {missing:?}");
    let lm = m.trainable_vars(&ParamSelection::LanguageModel);
    assert!(!lm.is_empty() && lm.len() < vars.len());
    assert!(lm
        .iter()
        .all(|(n, _)| n.starts_with("model.language_model.") || n.starts_with("lm_head.")));
    let custom = m.trainable_vars(&ParamSelection::Custom(vec![
        "model.generation_head.".into()
    ]));
    assert_eq!(custom.len(), 4);
}

#[test]
fn training_the_language_model_stops_backward_at_the_frozen_encoders() {
    // Two copies of one toy model: everything differentiated, and the language model selected for training.
    let reference = toy(5);
    let full = rollout_gradients(&reference);
    let full_vars = reference.all_vars();
    let mut m = toy(5);
    let lm = m.select_trained(&ParamSelection::LanguageModel);
    assert_eq!(
        lm.len(),
        m.trainable_vars(&ParamSelection::LanguageModel).len()
    );
    let frozen = rollout_gradients(&m);
    let twin = |n: &str| &full_vars.iter().find(|(k, _)| k == n).unwrap().1;
    // The trained variables get the gradients they get when everything is differentiated.
    for (name, v) in &lm {
        let (a, b) = (full.get(twin(name).as_tensor()), frozen.get(v.as_tensor()));
        let (Some(a), Some(b)) = (a, b) else {
            assert_eq!(a.is_some(), b.is_some(), "{name}");
            continue;
        };
        assert!(rel_err(b, a) < 1e-6, "{name}: {}", rel_err(b, a));
    }
    // Nothing is computed for the encoders whose outputs enter the language model.
    let encoders = [
        "model.vision_model.",
        "model.aligner.",
        "model.generation_embeddings.",
        "model.generation_aligner.",
    ];
    let mut checked = 0;
    for (name, v) in m.all_vars() {
        if encoders.iter().any(|p| name.starts_with(p)) {
            assert!(
                has_gradient(&full, twin(&name)),
                "{name} has a gradient when trained"
            );
            assert!(
                frozen.get(v.as_tensor()).is_none(),
                "{name} was differentiated"
            );
            checked += 1;
        }
    }
    assert!(checked >= 4);
    // Selecting every parameter again differentiates them again.
    let vars = m.select_trained(&ParamSelection::All);
    let again = rollout_gradients(&m);
    assert!(vars.iter().all(|(_, v)| has_gradient(&again, v)));
}

#[test]
fn toy_checkpoint_saves_reloads_answers_and_draws() {
    let m = toy(6);
    let dir = tempfile::tempdir().unwrap();
    m.save(dir.path()).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "patch_codebook.safetensors",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    let r = Janus::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(r.config(), m.config());
    let ids = vec![r
        .understanding_prompt("how many red circles are there ?")
        .unwrap()];
    let px = Tensor::stack(&[r.preprocess_image(&scenes(1, 1)[0]).unwrap()], 0).unwrap();
    assert_eq!(
        rel_err(
            &r.text_logits(&ids, Some(&px)).unwrap(),
            &m.text_logits(&ids, Some(&px)).unwrap()
        ),
        0.0
    );
    let greedy = TextSampling {
        max_new_tokens: 5,
        temperature: 1.0,
        top_p: 1.0,
        greedy: true,
    };
    let a = r
        .sample_answers(
            &scenes(1, 1),
            &questions()[..1],
            &greedy,
            &mut ChaCha8Rng::seed_from_u64(0),
        )
        .unwrap();
    let b = m
        .sample_answers(
            &scenes(1, 1),
            &questions()[..1],
            &greedy,
            &mut ChaCha8Rng::seed_from_u64(1),
        )
        .unwrap();
    assert_eq!(
        a[0].answer_ids, b[0].answer_ids,
        "greedy answers depend on the seed or the reload"
    );
    let img = r
        .sample_images(
            &["a red circle".to_string()],
            &ImageSampling::default(),
            &mut ChaCha8Rng::seed_from_u64(0),
        )
        .unwrap();
    let pics = r.decode_codes(&[img[0].codes.clone()]).unwrap();
    assert_eq!(pics[0].dimensions(), (32, 32));
    // The codebook round-trips a world image exactly (toy renders have few distinct patches).
    let scene = &scenes(1, 7)[0];
    assert_eq!(
        &r.decode_codes(&[r.encode_image_codes(scene).unwrap()])
            .unwrap()[0],
        scene
    );
    // Load errors name the folder.
    let err = Janus::load(&dir.path().join("nope"), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn frozen_clone_does_not_follow_updates() {
    let m = toy(7);
    let f = m.clone_frozen().unwrap();
    let (name, v) = &m.trainable_vars(&ParamSelection::All)[0];
    v.set(&v.as_tensor().ones_like().unwrap()).unwrap();
    let g = f.all_vars().into_iter().find(|(n, _)| n == name).unwrap().1;
    assert!(rel_err(g.as_tensor(), v.as_tensor()) > 0.0);
}

#[test]
fn bad_rollouts_are_rejected_with_a_message() {
    let m = toy(8);
    let px = m.preprocess_image(&scenes(1, 2)[0]).unwrap();
    let r = TextRollout {
        image: px,
        prompt_ids: vec![1, 9],
        answer_ids: vec![9],
        logprobs: vec![],
        text: String::new(),
    };
    // Prompt without the image placeholder run.
    let e = m
        .answer_logprobs(std::slice::from_ref(&r))
        .unwrap_err()
        .to_string();
    assert!(e.contains("image placeholder"), "{e}");
    // An answer with the placeholder id, with and without prompt sharing.
    let placeholder = m.config().image_token_id;
    let bad = TextRollout {
        prompt_ids: m.understanding_prompt("how many ?").unwrap(),
        answer_ids: vec![9, placeholder],
        ..r
    };
    let mut m = m;
    for sharing in [false, true] {
        m.set_prompt_sharing(sharing);
        let e = m
            .answer_logprobs(&[bad.clone(), bad.clone()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rollout 0") && e.contains("placeholder id"),
            "{e}"
        );
    }
    let e = m
        .image_logprobs(
            &[pairuni_model::ImageRollout {
                prompt_ids: vec![1, 5],
                codes: vec![100000; 64],
                logprobs: vec![],
            }],
            CfgLogprobPolicy::Conditional,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("codebook"), "{e}");
}

#[test]
fn answers_never_contain_special_tokens_but_eos() {
    let m = toy(11);
    let banned = m.banned_answer_tokens();
    let eos = m.eos_token();
    assert!(!banned.contains(&eos));
    // Every toy special but eos: pad, bos, unk, image, begin/end of image, sep.
    assert_eq!(banned.len(), 7, "{banned:?}");
    let imgs = scenes(4, 12);
    let qs: Vec<String> = questions().into_iter().cycle().take(4).collect();
    // A random model at a high temperature draws from an almost flat distribution: over 4 × 12 tokens
    // unmasked, 7 specials among ~70 words would appear with probability ≈ 1 − 0.9^48 > 0.99.
    let s = TextSampling {
        max_new_tokens: 12,
        temperature: 5.0,
        top_p: 1.0,
        greedy: false,
    };
    let a = m
        .sample_answers(&imgs, &qs, &s, &mut ChaCha8Rng::seed_from_u64(4))
        .unwrap();
    let drawn: usize = a.iter().map(|r| r.answer_ids.len()).sum();
    assert!(
        drawn >= 8,
        "too few tokens drawn ({drawn}) for the check to mean anything"
    );
    for r in &a {
        assert!(
            r.answer_ids.iter().all(|t| !banned.contains(t)),
            "special token in {:?}",
            r.answer_ids
        );
    }
    // The teacher-forced policy is the masked one too: its log-probs still match the sampled ones.
    let (lp, _) = m.answer_logprobs_at(&a, 5.0).unwrap();
    let lp = lp.to_vec2::<f32>().unwrap();
    for (i, r) in a.iter().enumerate() {
        let d = max_abs_diff(&lp[i][..r.answer_ids.len()], &r.logprobs);
        assert!(d < 2e-4, "row {i}: {d}");
    }
}
