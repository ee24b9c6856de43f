//! The preallocated KV cache: incremental decoding through it equals the full forward, also when the announced
//! capacity is exceeded and when one cache value is extended twice (a fork), and it matches the growing cache.

mod common;

use common::{rel_err, toy};
use pairuni_model::{Janus, KvCache, Tensor};

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
    let m = toy(1);
    let emb = m.token_embeddings(&rows()).unwrap();
    let (full, _) = m
        .decoder_step(&emb, &vec![vec![true; 10]; 2], &m.empty_cache(2))
        .unwrap();
    let cache = check_stepwise(&m, &emb, &full, 3, m.empty_cache_with_capacity(2, 10));
    assert_eq!((cache.len(), cache.capacity()), (10, Some(10)));
}

#[test]
fn exceeding_the_capacity_reallocates_and_stays_exact() {
    let m = toy(1);
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
    // A cache is a value: extending the same prefix with two different tokens must not let the second write
    // clobber the first branch's keys in the shared buffers.
    let m = toy(2);
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

#[test]
fn preallocated_and_growing_caches_agree_bit_for_bit_with_padding() {
    let m = toy(3);
    let padded = vec![vec![1u32, 9, 10, 11, 12], vec![0u32, 0, 1, 20, 21]];
    let valid = vec![vec![true; 5], vec![false, false, true, true, true]];
    let emb = m.token_embeddings(&padded).unwrap();
    let run = |mut cache: KvCache| {
        let (h, c) = m.decoder_step(&emb, &valid, &cache).unwrap();
        cache = c;
        let mut out = vec![h];
        for tok in [13u32, 14, 15] {
            let e = m.token_embeddings(&[vec![tok], vec![tok + 10]]).unwrap();
            let (h, c) = m.decoder_step(&e, &vec![vec![true]; 2], &cache).unwrap();
            cache = c.detach();
            out.push(h);
        }
        Tensor::cat(&out, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(
        run(m.empty_cache(2)),
        run(m.empty_cache_with_capacity(2, 8))
    );
}
