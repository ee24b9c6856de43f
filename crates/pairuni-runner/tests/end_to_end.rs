//! `evaluate` end to end: an untrained toy model over a small toy world's benchmarks (plus a small MME file),
//! every output written, scores consistent with the written predictions, and bad benchmark files rejected with
//! file and line.

use std::fs;
use std::path::Path;

use pairuni_eval::config::EvalConfig;
use pairuni_eval::mcq::{read_mcq, score_mcq};
use pairuni_eval::predictions::read_predictions;
use pairuni_model::{Device, Janus, JanusConfig};
use pairuni_runner::{evaluate, NoProgress};
use pairuni_toyworld::config::WorldConfig;
use pairuni_toyworld::generate::generate_world;

fn world(dir: &Path) {
    let cfg = WorldConfig {
        seed: 3,
        understanding: 0,
        generation: 0,
        bench: 12,
        ..WorldConfig::default()
    };
    generate_world(&cfg, dir, &|_| {}).expect("toy world");
    // A small MME file over two toy images (MME is not part of the toy world).
    let mme = dir.join("bench/mme");
    fs::create_dir_all(mme.join("images")).unwrap();
    for i in 0..2 {
        fs::copy(
            dir.join(format!("bench/pope/images/{i:05}.png")),
            mme.join(format!("images/{i}.png")),
        )
        .unwrap();
    }
    let mut lines = String::new();
    for i in 0..2 {
        for (q, a) in [
            ("is there a red circle ?", "Yes"),
            ("is there a blue square ?", "No"),
        ] {
            lines.push_str(&format!(
                "{{\"question_id\": \"existence/{i}.png\", \"image\": \"images/{i}.png\", \"question\": \"{q}\", \"answer\": \"{a}\", \"category\": \"existence\"}}\n"
            ));
        }
    }
    fs::write(mme.join("questions.jsonl"), lines).unwrap();
}

fn toy_model(dir: &Path) -> Janus {
    let images: Vec<_> = (0..8)
        .map(|i| {
            pairuni_data::load_rgb(dir.join(format!("bench/geneval/references/{i:05}.png")))
                .unwrap()
        })
        .collect();
    let words = pairuni_toyworld::text::vocabulary();
    let cfg = JanusConfig::toy(words.len(), 32);
    Janus::new_toy(&cfg, &words, &images, 1, &Device::Cpu).expect("toy model")
}

fn recipe() -> EvalConfig {
    let mut r = EvalConfig {
        images_per_prompt: 2,
        max_new_tokens: 3,
        batch_size: 4,
        ..EvalConfig::default()
    };
    r.limits.mcq = Some(5);
    r.limits.pope = Some(4);
    r.limits.geneval = Some(3);
    r
}

fn lines(path: &Path) -> usize {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn toy_model_over_toy_benchmarks_writes_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().join("world");
    world(&w);
    let model = toy_model(&w);
    let out = tmp.path().join("out");
    let report = evaluate(&model, &w, &out, &recipe(), &mut NoProgress).expect("evaluate");

    // Predictions, one per question run.
    assert_eq!(lines(&out.join("predictions/mcq.jsonl")), 5);
    for split in ["random", "popular", "adversarial"] {
        assert_eq!(
            lines(&out.join(format!("predictions/pope_{split}.jsonl"))),
            4,
            "{split}"
        );
    }
    assert_eq!(lines(&out.join("predictions/mme.jsonl")), 4);
    // GenEval images in GenEval's layout, a grid and the metadata line per prompt.
    for p in 0..3 {
        for k in 0..2 {
            let img =
                pairuni_data::load_rgb(out.join(format!("geneval/{p:05}/samples/{k:04}.png")))
                    .unwrap();
            assert_eq!((img.width(), img.height()), (32, 32));
        }
        let grid = pairuni_data::load_rgb(out.join(format!("geneval/{p:05}/grid.png"))).unwrap();
        assert_eq!((grid.width(), grid.height()), (2 * 32 + 2, 32));
        assert_eq!(
            lines(&out.join(format!("geneval/{p:05}/metadata.jsonl"))),
            1
        );
    }

    // Scores cover what ran.
    let mcq = report.mcq.as_ref().unwrap();
    assert_eq!(mcq.overall.total, 5);
    let pope = report.pope.as_ref().unwrap();
    assert_eq!(pope.splits.len(), 3);
    assert_eq!(pope.overall.counts.total(), 12);
    let mme = report.mme.as_ref().unwrap();
    assert_eq!(mme.subtasks["existence"].images, 2);
    let g = report.geneval.as_ref().unwrap();
    assert_eq!((g.prompts, g.images_per_prompt), (3, 2));
    assert_eq!(g.scores["images"], 6);

    // The written predictions re-score to the same numbers (the CLI's `eval score` path).
    let gold = read_mcq(w.join("bench/mcq/questions.jsonl")).unwrap();
    let mut gold5 = gold.clone();
    gold5.questions.truncate(5);
    let again = score_mcq(
        &gold5,
        &read_predictions(out.join("predictions/mcq.jsonl")).unwrap(),
        mcq.rule,
        0,
    )
    .unwrap();
    assert_eq!(&again, mcq);

    // metrics.json holds the recipe and the scores; results.md puts the recipe on every row.
    let metrics: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["recipe"]["images_per_prompt"], 2);
    assert_eq!(metrics["recipe"]["cfg_weight"], 5.0);
    assert_eq!(metrics["mcq"]["overall"]["total"], 5);
    let md = fs::read_to_string(out.join("results.md")).unwrap();
    let rows: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| Benchmark"))
        .collect();
    assert!(rows.len() > 20, "{md}");
    for row in &rows {
        assert_eq!(
            row.matches(" | ").count(),
            8,
            "row without the recipe columns: {row}"
        );
    }
    assert!(md.contains("| GenEval | overall | "), "{md}");
    assert!(
        rows.iter()
            .filter(|r| r.starts_with("| GenEval"))
            .all(|r| r.contains("| 5 | 2 |")),
        "{md}"
    );

    // Same seed, same outputs.
    let out2 = tmp.path().join("out2");
    evaluate(&model, &w, &out2, &recipe(), &mut NoProgress).unwrap();
    for f in [
        "predictions/mcq.jsonl",
        "predictions/pope_random.jsonl",
        "geneval/00002/samples/0001.png",
    ] {
        assert_eq!(
            fs::read(out.join(f)).unwrap(),
            fs::read(out2.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn bad_benchmark_files_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().join("world");
    world(&w);
    let model = toy_model(&w);
    let mut r = recipe();
    r.limits.geneval = Some(1);

    // A missing image: the error names the gold file, the line and the image.
    let q = w.join("bench/mcq/questions.jsonl");
    let first: serde_json::Value =
        serde_json::from_str(fs::read_to_string(&q).unwrap().lines().next().unwrap()).unwrap();
    fs::remove_file(w.join("bench/mcq").join(first["image"].as_str().unwrap())).unwrap();
    let err = evaluate(&model, &w, &tmp.path().join("o1"), &r, &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("questions.jsonl:1") && err.contains("image"),
        "{err}"
    );

    // A malformed line.
    let text = fs::read_to_string(&q).unwrap();
    let broken: String = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 2 {
                format!("{}\n", &l[..l.len() / 2])
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(&q, broken).unwrap();
    let err = evaluate(&model, &w, &tmp.path().join("o2"), &r, &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("questions.jsonl:3"), "{err}");

    // No benchmark at all.
    let empty = tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let err = evaluate(&model, &empty, &tmp.path().join("o3"), &r, &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no benchmark found"), "{err}");
}
