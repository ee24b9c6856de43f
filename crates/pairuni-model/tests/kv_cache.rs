//! The preallocated KV cache: incremental decoding through it equals the full forward, also when the announced
//! capacity is exceeded and when one cache value is extended twice (a fork), and it matches the growing cache.
//! Each of these also holds with the fused sampling kernels (the accelerators' default), run here on the CPU.

mod common;

use common::{rel_err, toy};
use pairuni_model::{DType, Device, Janus, JanusConfig, KvCache, Tensor};

/// The toy model with the sampling kernels chosen.
fn toy_with(seed: u64, fused: bool) -> Janus {
    let mut m = toy(seed);
    m.set_fused_sampling(fused);
    m
}

fn rows() -> Vec<Vec<u32>> {
    vec![
        vec![1u32, 9, 10, 11, 12, 13, 14, 15, 16, 17],
        vec![1u32, 20, 21, 22, 23, 24, 25, 26, 27, 28],
    ]
}

/// Prefill `prefill` tokens, then one at a time; checks every step against the full forward.
fn check_stepwise(
    m: &Janus,
    emb: &Tensor,
    full: &Tensor,
    prefill: usize,
    mut cache: KvCache,
) -> KvCache {
    let t = emb.dim(1).unwrap();
    let (h, c) = m
        .decoder_step(
            &emb.narrow(1, 0, prefill).unwrap(),
            &vec![vec![true; prefill]; 2],
            &cache,
        )
        .unwrap();
    cache = c;
    assert!(rel_err(&h, &full.narrow(1, 0, prefill).unwrap()) < 1e-5);
    for i in prefill..t {
        let (h, c) = m
            .decoder_step(&emb.narrow(1, i, 1).unwrap(), &vec![vec![true]; 2], &cache)
            .unwrap();
        cache = c.detach();
        let e = rel_err(&h, &full.narrow(1, i, 1).unwrap());
        assert!(e < 1e-5, "step {i}: rel err {e}");
    }
    cache
}

#[test]
fn decoding_through_a_preallocated_cache_equals_the_full_forward() {
    for fused in [false, true] {
        let m = toy_with(1, fused);
        assert_eq!(m.fused_sampling(), fused);
        let emb = m.token_embeddings(&rows()).unwrap();
        let (full, _) = m
            .decoder_step(&emb, &vec![vec![true; 10]; 2], &m.empty_cache(2))
            .unwrap();
        let cache = check_stepwise(&m, &emb, &full, 3, m.empty_cache_with_capacity(2, 10));
        assert_eq!((cache.len(), cache.capacity()), (10, Some(10)));
    }
}

#[test]
fn the_cpu_samples_with_the_composed_kernels_by_default() {
    let m = toy(1);
    assert!(!m.fused_sampling());
    let mut m = m;
    m.set_fused_sampling(true);
    assert!(m.clone_frozen().unwrap().fused_sampling());
}

#[test]
fn exceeding_the_capacity_reallocates_and_stays_exact() {
    for fused in [false, true] {
        exceeding_the_capacity(fused);
    }
}

fn exceeding_the_capacity(fused: bool) {
    let m = toy_with(1, fused);
    let emb = m.token_embeddings(&rows()).unwrap();
    let (full, _) = m
        .decoder_step(&emb, &vec![vec![true; 10]; 2], &m.empty_cache(2))
        .unwrap();
    // Room for 4: the 3-token prefill fits, step 5 doubles to 8, step 9 to 16.
    let cache = check_stepwise(&m, &emb, &full, 3, m.empty_cache_with_capacity(2, 4));
    assert_eq!((cache.len(), cache.capacity()), (10, Some(16)));
    // A prompt longer than the capacity gets buffers of its own length at once.
    let cache = check_stepwise(&m, &emb, &full, 6, m.empty_cache_with_capacity(2, 2));
    assert_eq!(cache.len(), 10);
    assert!(cache.capacity().unwrap() >= 10);
}

#[test]
fn extending_one_cache_value_twice_keeps_both_branches_exact() {
    for fused in [false, true] {
        forked_branches(fused);
    }
}

fn forked_branches(fused: bool) {
    // A cache is a value: extending the same prefix with two different tokens must not let the second write
    // clobber the first branch's keys in the shared buffers.
    let m = toy_with(2, fused);
    let a = vec![
        vec![1u32, 9, 10, 11, 30, 31],
        vec![1u32, 20, 21, 22, 32, 33],
    ];
    let b = vec![
        vec![1u32, 9, 10, 11, 40, 41],
        vec![1u32, 20, 21, 22, 42, 43],
    ];
    let (ea, eb) = (
        m.token_embeddings(&a).unwrap(),
        m.token_embeddings(&b).unwrap(),
    );
    let all = vec![vec![true; 6]; 2];
    let (fa, _) = m.decoder_step(&ea, &all, &m.empty_cache(2)).unwrap();
    let (fb, _) = m.decoder_step(&eb, &all, &m.empty_cache(2)).unwrap();
    let one = vec![vec![true]; 2];
    let (_, prefix) = m
        .decoder_step(
            &ea.narrow(1, 0, 4).unwrap(),
            &vec![vec![true; 4]; 2],
            &m.empty_cache_with_capacity(2, 6),
        )
        .unwrap();
    let (_, ca) = m
        .decoder_step(&ea.narrow(1, 4, 1).unwrap(), &one, &prefix)
        .unwrap();
    let (_, cb) = m
        .decoder_step(&eb.narrow(1, 4, 1).unwrap(), &one, &prefix)
        .unwrap();
    // Continue branch a after branch b was written, then branch b.
    let (ha, _) = m
        .decoder_step(&ea.narrow(1, 5, 1).unwrap(), &one, &ca)
        .unwrap();
    let (hb, _) = m
        .decoder_step(&eb.narrow(1, 5, 1).unwrap(), &one, &cb)
        .unwrap();
    assert!(rel_err(&ha, &fa.narrow(1, 5, 1).unwrap()) < 1e-5);
    assert!(rel_err(&hb, &fb.narrow(1, 5, 1).unwrap()) < 1e-5);
}

/// Hidden states of a left-padded prefill then three decode steps, in which row 1 stops being real after the
/// first (as a finished answer feeds padding), through `cache`.
fn padded_run(m: &Janus, mut cache: KvCache) -> Vec<f32> {
    let padded = vec![vec![1u32, 9, 10, 11, 12], vec![0u32, 0, 1, 20, 21]];
    let valid = vec![vec![true; 5], vec![false, false, true, true, true]];
    let emb = m.token_embeddings(&padded).unwrap();
    let (h, c) = m.decoder_step(&emb, &valid, &cache).unwrap();
    cache = c;
    let mut out = vec![h];
    for (i, tok) in [13u32, 14, 15].into_iter().enumerate() {
        let e = m.token_embeddings(&[vec![tok], vec![tok + 10]]).unwrap();
        let (h, c) = m
            .decoder_step(&e, &[vec![true], vec![i == 0]], &cache)
            .unwrap();
        cache = c.detach();
        out.push(h);
    }
    flat_cat(&out)
}

/// Hidden states [B, t, H] of several calls, concatenated along the positions, as f32 values.
fn flat_cat(states: &[Tensor]) -> Vec<f32> {
    Tensor::cat(states, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn preallocated_and_growing_caches_agree_bit_for_bit_with_padding() {
    let m = toy(3);
    assert_eq!(
        padded_run(&m, m.empty_cache(2)),
        padded_run(&m, m.empty_cache_with_capacity(2, 8))
    );
}

#[test]
fn fused_sampling_kernels_match_the_composed_ones_with_padding() {
    let composed = toy_with(3, false);
    let fused = toy_with(3, true);
    let reference = padded_run(&composed, composed.empty_cache(2));
    // Capacity 6 < 8 positions: the key mask buffer is copied into a bigger one mid-run too.
    for capacity in [8, 6] {
        let got = padded_run(&fused, fused.empty_cache_with_capacity(2, capacity));
        let scale = reference.iter().fold(0f32, |a, x| a.max(x.abs()));
        let err = got
            .iter()
            .zip(&reference)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(scale > 0.1, "degenerate hidden states");
        assert!(
            err / scale < 1e-5,
            "capacity {capacity}: rel err {}",
            err / scale
        );
    }
    // A growing cache is for teacher forcing: it never takes the fused kernels.
    assert_eq!(padded_run(&fused, fused.empty_cache(2)), reference);
}

#[test]
fn fused_sampling_kernels_stay_within_bf16_tolerance() {
    // bf16 is what an accelerator samples in; the CPU runs the same kernels (candle's CPU versions).
    let mut cfg = JanusConfig::toy(64, 32);
    cfg.text_config.num_hidden_layers = 3;
    let run = |fused: bool| {
        let mut m = Janus::new_random(&cfg, None, None, 5, &Device::Cpu, DType::BF16).unwrap();
        m.set_fused_sampling(fused);
        padded_run(&m, m.empty_cache_with_capacity(2, 8))
    };
    let f32_model = Janus::new_random(&cfg, None, None, 5, &Device::Cpu, DType::F32).unwrap();
    let reference = padded_run(&f32_model, f32_model.empty_cache(2));
    let scale = reference.iter().fold(0f32, |a, x| a.max(x.abs()));
    for fused in [false, true] {
        let err = run(fused)
            .iter()
            .zip(&reference)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(err / scale < 3e-2, "fused {fused}: rel err {}", err / scale);
    }
}

/// Hidden states of decoding tokens 13, 14 (plus the row's index) one at a time after `cache` (3 rows).
fn three_row_steps(m: &Janus, mut cache: KvCache) -> Vec<f32> {
    let mut out = Vec::new();
    for tok in [13u32, 14] {
        let e = m
            .token_embeddings(&[vec![tok], vec![tok + 1], vec![tok + 2]])
            .unwrap();
        let (h, c) = m.decoder_step(&e, &vec![vec![true]; 3], &cache).unwrap();
        cache = c.detach();
        out.push(h);
    }
    flat_cat(&out)
}

#[test]
fn selected_rows_continue_the_rows_they_were_taken_from() {
    // Rollouts of one prompt share its prefill: a cache of rows [1, 0, 1] taken from a two-row prefill decodes
    // exactly as a three-row prefill of those prompts does, for a growing and a preallocated cache, with either
    // kernel set, and also when a sibling value has already written past the prefill in the shared buffers.
    let prompts = [vec![1u32, 9, 10, 11, 12], vec![0u32, 0, 1, 20, 21]];
    let valid = [vec![true; 5], vec![false, false, true, true, true]];
    let take = [1usize, 0, 1];
    for fused in [false, true] {
        let m = toy_with(4, fused);
        for capacity in [None, Some(8)] {
            let empty = |b| match capacity {
                Some(c) => m.empty_cache_with_capacity(b, c),
                None => m.empty_cache(b),
            };
            let picked: Vec<Vec<u32>> = take.iter().map(|&r| prompts[r].clone()).collect();
            let picked_valid: Vec<Vec<bool>> = take.iter().map(|&r| valid[r].clone()).collect();
            let emb = m.token_embeddings(&picked).unwrap();
            let (_, direct) = m.decoder_step(&emb, &picked_valid, &empty(3)).unwrap();
            let reference = three_row_steps(&m, direct);

            let emb = m.token_embeddings(&prompts).unwrap();
            let (_, two) = m.decoder_step(&emb, &valid, &empty(2)).unwrap();
            // A sibling extends the prefill first (in place, for a preallocated cache).
            let e = m.token_embeddings(&[vec![30u32], vec![31]]).unwrap();
            let _sibling = m
                .decoder_step(&e, &[vec![true], vec![false]], &two)
                .unwrap();
            let selected = two.select_rows(&take).unwrap();
            assert_eq!((selected.batch(), selected.len()), (3, 5));
            assert_eq!(selected.capacity(), capacity);
            let got = three_row_steps(&m, selected);
            let e = max_abs(&got, &reference);
            assert!(
                e < 1e-5,
                "fused {fused}, capacity {capacity:?}: differs by {e}"
            );
        }
    }
    let m = toy(4);
    let (_, two) = m
        .decoder_step(
            &m.token_embeddings(&prompts).unwrap(),
            &valid,
            &m.empty_cache(2),
        )
        .unwrap();
    let err = two.select_rows(&[0, 2]).unwrap_err().to_string();
    assert!(err.contains("row 2") && err.contains("2 rows"), "{err}");
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}
