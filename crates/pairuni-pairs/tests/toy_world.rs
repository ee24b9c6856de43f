//! End to end on the toy world: generate pools, build pairs with the oracle teacher and the toy descriptor,
//! check the pair invariants and that retrieved pairs share objects far more often than random pairs.

use pairuni_data::PairKind;
use pairuni_pairs::config::PairsConfig;
use pairuni_pairs::setup::{encoder_from_config, teacher_from_config};
use pairuni_pairs::toy::shared_object_rates;
use pairuni_pairs::{build_and_write, BuildPaths};
use pairuni_toyworld::config::WorldConfig;
use std::collections::HashSet;
use std::path::Path;

fn world(dir: &Path, n: usize, seed: u64) {
    let cfg = WorldConfig {
        seed,
        understanding: n,
        generation: n,
        bench: 6,
        ..WorldConfig::default()
    };
    pairuni_toyworld::generate::generate_world(&cfg, dir, &|_| {}).unwrap();
}

struct Outcome {
    pairs: usize,
    aligned: usize,
    retrieved: usize,
    rejected: usize,
    retrieved_rate: f64,
    random_rate: f64,
    seconds: f64,
}

fn build(dir: &Path, error_rate: f64) -> Outcome {
    let mut cfg = PairsConfig::default();
    cfg.teacher.error_rate = error_rate;
    cfg.seed = 3;
    build_with(dir, cfg, "pairs")
}

fn build_with(dir: &Path, cfg: PairsConfig, out_folder: &str) -> Outcome {
    let paths = BuildPaths {
        understanding: dir.join("understanding.jsonl"),
        generation: dir.join("generation.jsonl"),
        out: dir.join(out_folder).join("pairs.jsonl"),
    };
    let teacher = teacher_from_config(&cfg, &paths).unwrap();
    let encoder = encoder_from_config(&cfg.encoder).unwrap();
    let t0 = std::time::Instant::now();
    let out = build_and_write(&cfg, teacher.as_ref(), encoder.as_ref(), &paths, false).unwrap();
    let seconds = t0.elapsed().as_secs_f64();
    let s = &out.stats;

    // Every sample is either completed or rejected.
    let input = s.input["understanding"] + s.input["generation"];
    assert_eq!(
        s.completed["understanding"] + s.completed["generation"] + s.rejections.len(),
        input
    );
    // Pair invariants: each sample used at most once on its own side; aligned pairs are one image with s = 1;
    // retrieved pairs clear δ; one aligned pair per non-empty cluster (≤ K).
    let mut used_u = HashSet::new();
    let mut used_g = HashSet::new();
    let mut aligned = 0;
    for p in &out.pairs {
        match p.effective_kind() {
            PairKind::Aligned => {
                aligned += 1;
                assert_eq!(p.similarity, 1.0);
                assert_eq!(p.generate_ann, p.understand_ann);
                let id = p.generate_ann.id.clone().unwrap();
                assert!(
                    used_u.insert(id.clone()) && used_g.insert(id),
                    "medoid used twice"
                );
            }
            PairKind::Retrieved => {
                assert!(
                    p.similarity >= cfg.delta as f64 - 1e-6,
                    "similarity {} below δ",
                    p.similarity
                );
                assert!(
                    used_g.insert(p.generate_ann.id.clone().unwrap()),
                    "generation sample used twice"
                );
                assert!(
                    used_u.insert(p.understand_ann.id.clone().unwrap()),
                    "understanding sample used twice"
                );
                assert!(
                    p.generate_ann.question.contains(" A. ")
                        && ["A", "B", "C", "D"].contains(&p.generate_ann.answer.as_str())
                );
                assert!(!p.understand_ann.prompt.is_empty(), "caption present");
            }
        }
    }
    assert!(aligned > 0 && aligned <= s.k);
    let written = pairuni_data::jsonl::read_pairs(&paths.out).unwrap();
    assert_eq!(written.len(), out.pairs.len());
    let rates = shared_object_rates(&written, paths.out.parent().unwrap(), 11).unwrap();
    Outcome {
        pairs: out.pairs.len(),
        aligned,
        retrieved: out.pairs.len() - aligned,
        rejected: s.rejections.len(),
        retrieved_rate: rates.retrieved_rate,
        random_rate: rates.random_rate,
        seconds,
    }
}

#[test]
fn small_toy_world_builds_and_retrieval_beats_random() {
    let dir = tempfile::tempdir().unwrap();
    world(dir.path(), 300, 5);
    let o = build(dir.path(), 0.2);
    assert!(o.retrieved > 50, "retrieved {}", o.retrieved);
    assert!(
        o.retrieved_rate > o.random_rate + 0.2,
        "retrieved pairs share an object at {:.3}, random pairs at {:.3}",
        o.retrieved_rate,
        o.random_rate
    );
}

#[test]
fn approximate_retrieval_forms_nearly_the_same_pairs_as_exact() {
    let dir = tempfile::tempdir().unwrap();
    world(dir.path(), 300, 5);
    let mut cfg = PairsConfig {
        seed: 3,
        ..PairsConfig::default()
    };
    let exact = build_with(dir.path(), cfg.clone(), "exact");
    cfg.ann.enabled = true;
    // The toy descriptor has 33 dimensions; the default reduce_dim 256 would be refused.
    cfg.ann.reduce_dim = 16;
    let approx = build_with(dir.path(), cfg.clone(), "approx");
    assert_eq!(
        approx.aligned, exact.aligned,
        "K-means does not depend on the index"
    );
    assert!(
        approx.retrieved as f64 >= 0.95 * exact.retrieved as f64,
        "approximate {} vs exact {} retrieved pairs",
        approx.retrieved,
        exact.retrieved
    );
    assert!(approx.retrieved_rate > approx.random_rate + 0.2);

    cfg.ann.reduce_dim = 256;
    let paths = BuildPaths {
        understanding: dir.path().join("understanding.jsonl"),
        generation: dir.path().join("generation.jsonl"),
        out: dir.path().join("bad/pairs.jsonl"),
    };
    let teacher = teacher_from_config(&cfg, &paths).unwrap();
    let encoder = encoder_from_config(&cfg.encoder).unwrap();
    let Err(err) = build_and_write(&cfg, teacher.as_ref(), encoder.as_ref(), &paths, false) else {
        panic!("reduce_dim above the feature dimension must be refused");
    };
    assert!(err.to_string().contains("ann.reduce_dim"), "{err}");
}

/// The 5,000 + 5,000 run reported in docs/BENCHMARKS.md ("## Pairs").
#[test]
#[ignore = "slow: 10,000 samples; run with --ignored --nocapture to reproduce docs/BENCHMARKS.md"]
fn toy_world_5000_plus_5000() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    world(dir.path(), 5000, 0);
    let gen_s = t0.elapsed().as_secs_f64();
    let o = build(dir.path(), 0.1);
    println!(
        "world {gen_s:.1}s; build {:.1}s: pairs {} (aligned {}, retrieved {}), rejected {}; shared-object rate retrieved {:.4} vs random {:.4}",
        o.seconds, o.pairs, o.aligned, o.retrieved, o.rejected, o.retrieved_rate, o.random_rate
    );
    assert!(o.retrieved_rate > o.random_rate + 0.2);
}
