//! A small toy world with a PairUG file, shared by the integration tests (built once per test binary).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pairuni_data::{GenerationSample, PairKind, PairRecord, Quadruple, UnderstandingSample};
use pairuni_toyworld::config::WorldConfig;
use pairuni_toyworld::oracle::Oracle;

/// Pool sizes of the test world.
pub const POOL: usize = 400;
/// Understanding samples at the end of the pool kept out of SFT and pairs (held-out checks).
pub const HOLDOUT: usize = 64;
/// Pairs are built from the first this many samples of each pool.
pub const PAIRS: usize = 200;

static WORLD_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Removes the test world when the test binary exits: a static is never dropped, and each run of each test
/// binary would otherwise leave ≈ 10 MB in the temp folder.
extern "C" fn remove_world() {
    if let Some(dir) = WORLD_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Builds (once) a toy world under the temp folder, with `pairs.jsonl`: the first half aligned pairs (a generation
/// sample's own quadruple on both sides), the rest retrieved pairs (understanding sample i with generation sample
/// i, similarity = descriptor cosine). It is removed when the test binary exits.
pub fn world() -> &'static Path {
    WORLD_DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pairuni-rl-world-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // SAFETY: registers a plain function that only touches a OnceLock and the file system; libtest ends the
        // process through `exit`, which runs it after every test has finished.
        unsafe {
            libc::atexit(remove_world);
        }
        let cfg = WorldConfig {
            seed: 5,
            understanding: POOL,
            generation: POOL,
            bench: 48,
            ..WorldConfig::default()
        };
        pairuni_toyworld::generate::generate_world(&cfg, &dir, &|_| {}).expect("world");
        write_pairs(&dir);
        dir
    })
}

fn write_pairs(dir: &Path) {
    let und: Vec<UnderstandingSample> =
        pairuni_data::jsonl::read_understanding_pool(dir.join("understanding.jsonl")).unwrap();
    let gen: Vec<GenerationSample> =
        pairuni_data::jsonl::read_generation_pool(dir.join("generation.jsonl")).unwrap();
    let oracle = Oracle::new(0.0, 1);
    let load = |rel: &str| pairuni_data::load_rgb(dir.join(rel)).unwrap();
    let mut pairs = Vec::new();
    for (i, (u, g)) in und.iter().zip(&gen).take(PAIRS).enumerate() {
        let gimg = load(&g.image_path);
        let q = oracle.question_for(g, &gimg).unwrap();
        let gq = Quadruple {
            image_path: g.image_path.clone(),
            prompt: g.prompt.clone(),
            question: q.question,
            answer: q.answer,
            tag: g.tag.clone(),
            id: Some(g.id.clone()),
        };
        if i % 2 == 0 {
            pairs.push(PairRecord {
                similarity: 1.0,
                generate_ann: gq.clone(),
                understand_ann: gq,
                kind: Some(PairKind::Aligned),
                source: None,
            });
        } else {
            let uimg = load(&u.image_path);
            let sim = pairuni_toyworld::descriptor::cosine(
                &pairuni_toyworld::descriptor::descriptor(&uimg),
                &pairuni_toyworld::descriptor::descriptor(&gimg),
            );
            let uq = Quadruple {
                image_path: u.image_path.clone(),
                prompt: oracle.caption(u, &uimg).caption,
                question: u.question.clone(),
                answer: u.answer.clone(),
                tag: u.tag.clone(),
                id: Some(u.id.clone()),
            };
            pairs.push(PairRecord {
                similarity: sim as f64,
                generate_ann: gq,
                understand_ann: uq,
                kind: Some(PairKind::Retrieved),
                source: None,
            });
        }
    }
    pairuni_data::jsonl::write_pairs(dir.join("pairs.jsonl"), &pairs).unwrap();
}

/// A 4-step SFT run on the test world into `out`, batches of 4, a checkpoint every 2 steps (resume tests stop
/// it after 2 and finish it in a second process).
pub fn short_sft(out: &Path) -> pairuni_rl::config::SftConfig {
    let w = world();
    pairuni_rl::config::SftConfig {
        understanding: w.join("understanding.jsonl"),
        generation: w.join("generation.jsonl"),
        out_dir: out.to_path_buf(),
        steps: 4,
        batch_understanding: 4,
        batch_generation: 4,
        checkpoint_every: 2,
        ..Default::default()
    }
}

/// Named tensors as f32 values, sorted by name (to compare two runs' weights exactly).
pub fn f32_values(
    tensors: impl IntoIterator<Item = (String, candle_core::Tensor)>,
) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(name, t)| {
            let values = t
                .to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .unwrap();
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
