//! The pool and benchmark writers: layout, formats, determinism, disjointness.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use pairuni_data::{GenerationSample, UnderstandingSample};
use pairuni_toyworld::config::WorldConfig;
use pairuni_toyworld::generate::{generate_world, McqLine};
use pairuni_toyworld::read_scene;
use serde_json::Value;

fn small() -> WorldConfig {
    WorldConfig {
        understanding: 300,
        generation: 300,
        bench: 120,
        ..WorldConfig::default()
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn shared_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

/// A reader of the real POPE files: JSON Lines with exactly these keys and JSON types.
fn read_pope(path: &Path) -> Vec<(u64, String, String, String)> {
    lines(path)
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
            let o = v.as_object().unwrap();
            let keys: Vec<&str> = o.keys().map(String::as_str).collect();
            let mut sorted = keys.clone();
            sorted.sort();
            assert_eq!(
                sorted,
                ["image", "label", "question_id", "text"],
                "{}:{}",
                path.display(),
                i + 1
            );
            let label = o["label"].as_str().unwrap().to_string();
            assert!(label == "yes" || label == "no");
            (
                o["question_id"].as_u64().unwrap(),
                o["image"].as_str().unwrap().to_string(),
                o["text"].as_str().unwrap().to_string(),
                label,
            )
        })
        .collect()
}

#[test]
fn writes_the_layout_deterministically_and_keeps_pools_and_benchmarks_apart() {
    let cfg = small();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let calls = std::sync::atomic::AtomicU64::new(0);
    let summary = generate_world(&cfg, a.path(), &|p| {
        assert!(p.done <= p.total);
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    generate_world(&cfg, b.path(), &|_| {}).unwrap();
    assert_eq!(calls.into_inner(), (300 + 300 + 120 + 20 + 120) as u64);
    assert_eq!(summary.understanding, 300);
    assert_eq!(summary.geneval, 120);

    let files = [
        "understanding.jsonl",
        "generation.jsonl",
        "bench/geneval/evaluation_metadata.jsonl",
        "bench/pope/toy_pope_random.json",
        "bench/pope/toy_pope_popular.json",
        "bench/pope/toy_pope_adversarial.json",
        "bench/mcq/questions.jsonl",
        "images/u000123.png",
        "bench/geneval/references/00119.png",
    ];
    for f in files {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
            "{f}"
        );
    }

    let u: Vec<UnderstandingSample> = lines(&a.path().join("understanding.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let g: Vec<GenerationSample> = lines(&a.path().join("generation.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!((u.len(), g.len()), (300, 300));
    let kinds: HashSet<&str> = u.iter().map(|s| s.tag.as_str()).collect();
    assert_eq!(kinds.len(), 5);
    let tags: HashSet<&str> = g.iter().map(|s| s.tag.as_str()).collect();
    assert_eq!(tags.len(), 6);

    let scene_key = |p: PathBuf| read_scene(&image::open(&p).unwrap().to_rgb8()).key();
    let mut pool = HashSet::new();
    for s in &u {
        pool.insert(scene_key(a.path().join(&s.image_path)));
    }
    for s in &g {
        pool.insert(scene_key(a.path().join(&s.image_path)));
    }
    let mut bench = Vec::new();
    for dir in [
        "bench/geneval/references",
        "bench/pope/images",
        "bench/mcq/images",
    ] {
        for e in std::fs::read_dir(a.path().join(dir)).unwrap() {
            bench.push(scene_key(e.unwrap().path()));
        }
    }
    assert_eq!(bench.len(), 120 + 20 + 120);
    for k in &bench {
        assert!(!pool.contains(k), "benchmark scene {k} is also in a pool");
    }

    let mcq: Vec<McqLine> = lines(&a.path().join("bench/mcq/questions.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(mcq.len(), 120);
    for m in &mcq {
        assert!(m.question.ends_with(&format!("D. {}", m.options[3])));
        assert!(a.path().join("bench/mcq").join(&m.image).exists());
    }
}

#[test]
fn geneval_metadata_has_the_real_files_shape() {
    let a = tempfile::tempdir().unwrap();
    generate_world(&small(), a.path(), &|_| {}).unwrap();
    let real = lines(&shared_data().join("geneval/evaluation_metadata.jsonl"));
    let ours = lines(&a.path().join("bench/geneval/evaluation_metadata.jsonl"));
    // Per tag, the key order of the line and of its clauses must be the same as in the real file.
    let shape = |l: &str| -> (String, String) {
        let v: Value = serde_json::from_str(l).unwrap();
        let top: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        let mut clause_keys: Vec<String> = Vec::new();
        for c in v["include"].as_array().unwrap().iter().chain(
            v.get("exclude")
                .and_then(Value::as_array)
                .into_iter()
                .flatten(),
        ) {
            clause_keys.push(
                c.as_object()
                    .unwrap()
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        (
            v["tag"].as_str().unwrap().to_string(),
            format!("{top:?} {clause_keys:?}"),
        )
    };
    let real_shapes: BTreeMap<String, HashSet<String>> =
        real.iter()
            .map(|l| shape(l))
            .fold(BTreeMap::new(), |mut m, (t, s)| {
                m.entry(t).or_default().insert(s);
                m
            });
    let mut seen = HashSet::new();
    for l in &ours {
        let (tag, s) = shape(l);
        seen.insert(tag.clone());
        if tag == "position" {
            // Ours add colours to both position clauses (TOYWORLD.md's "a red circle left of a green triangle").
            assert!(s.contains("class,color,count,position"), "{s}");
            assert!(
                l.contains(r#"{"class":"#) && l.contains(r#","count":1,"color":"#),
                "{l}"
            );
        } else {
            assert!(
                real_shapes[&tag].contains(&s),
                "{tag}: {s} not among {:?}",
                real_shapes[&tag]
            );
        }
        // serde_json without preserve_order sorts keys, so compare the raw text order too.
        assert!(l.starts_with("{\"tag\":"), "{l}");
    }
    assert_eq!(seen.len(), 6);
}

#[test]
fn toy_pope_reads_like_the_real_pope_files() {
    let a = tempfile::tempdir().unwrap();
    generate_world(&small(), a.path(), &|_| {}).unwrap();
    for split in ["random", "popular", "adversarial"] {
        let real = read_pope(&shared_data().join(format!("pope/coco_pope_{split}.json")));
        assert_eq!(real.len(), 3000);
        let ours = read_pope(&a.path().join(format!("bench/pope/toy_pope_{split}.json")));
        assert_eq!(ours.len(), 120);
        for (i, (id, img, text, _)) in ours.iter().enumerate() {
            assert_eq!(*id, i as u64 + 1);
            assert!(a.path().join("bench/pope/images").join(img).exists());
            assert!(text.starts_with("Is there a") && text.ends_with(" in the image?"));
        }
        let yes = ours.iter().filter(|q| q.3 == "yes").count();
        assert_eq!(yes, 60);
    }
    // The "popular" negatives concentrate on few kinds; random ones spread out.
    let distinct_negatives = |split: &str| -> usize {
        read_pope(&a.path().join(format!("bench/pope/toy_pope_{split}.json")))
            .into_iter()
            .filter(|q| q.3 == "no")
            .map(|q| q.2)
            .collect::<HashSet<_>>()
            .len()
    };
    assert!(distinct_negatives("popular") < distinct_negatives("random"));
}

#[test]
fn bad_config_is_a_clear_error() {
    let a = tempfile::tempdir().unwrap();
    let cfg = WorldConfig {
        size: 16,
        ..small()
    };
    let err = generate_world(&cfg, a.path(), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("size = 16"), "{err}");
    let cfg = WorldConfig {
        min_objects: 0,
        ..small()
    };
    assert!(generate_world(&cfg, a.path(), &|_| {}).is_err());
}
