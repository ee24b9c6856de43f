//! `pairuni eval` end to end through the binary: an untrained toy model over a small toy world, then
//! `pairuni eval score` on the written predictions reproduces the run's numbers.

mod common;

use std::fs;
use std::path::Path;

use common::{bin, ok, scratch};
use pairuni_model::{Device, Janus, JanusConfig};

fn save_toy_model(world: &Path, dir: &Path) {
    let images: Vec<_> = (0..8)
        .map(|i| {
            pairuni_data::load_rgb(world.join(format!("bench/geneval/references/{i:05}.png")))
                .unwrap()
        })
        .collect();
    let words = pairuni_toyworld::text::vocabulary();
    let cfg = JanusConfig::toy(words.len(), 32);
    let model = Janus::new_toy(&cfg, &words, &images, 1, &Device::Cpu).unwrap();
    model.save(dir).unwrap();
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn eval_runs_toy_model_and_score_reproduces_it() {
    let tmp = scratch("eval_cli", "run");
    let world = tmp.join("world");
    ok(bin()
        .args([
            "world",
            "generate",
            "--seed",
            "2",
            "--understanding",
            "0",
            "--generation",
            "0",
            "--bench",
            "12",
            "--out",
        ])
        .arg(&world)
        .output()
        .unwrap());
    let model = tmp.join("model");
    save_toy_model(&world, &model);
    let config = tmp.join("eval.toml");
    fs::write(
        &config,
        "[eval]\nimages_per_prompt = 2\nmax_new_tokens = 3\nbatch_size = 6\n[eval.limits]\ngeneval = 2\n",
    )
    .unwrap();
    let out = tmp.join("out");
    let table = ok(bin()
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--bench")
        .arg(&world)
        .arg("--out")
        .arg(&out)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap());
    println!("{table}");
    assert!(table.contains("| MCQ | accuracy % (overall) |"), "{table}");
    for f in [
        "predictions/mcq.jsonl",
        "predictions/pope_random.jsonl",
        "predictions/pope_popular.jsonl",
        "predictions/pope_adversarial.jsonl",
        "geneval/00001/samples/0001.png",
        "geneval/00001/grid.png",
        "metrics.json",
        "results.md",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let metrics = json(&fs::read_to_string(out.join("metrics.json")).unwrap());
    assert_eq!(metrics["recipe"]["images_per_prompt"], 2);

    // Scoring the written predictions without a model gives the run's numbers.
    let mcq = json(&ok(bin()
        .args(["eval", "score", "--bench", "mcq", "--gold"])
        .arg(world.join("bench/mcq/questions.jsonl"))
        .arg("--predictions")
        .arg(out.join("predictions/mcq.jsonl"))
        .output()
        .unwrap()));
    assert_eq!(mcq, metrics["mcq"]);
    let mut cmd = bin();
    cmd.args(["eval", "score", "--bench", "pope", "--gold"]);
    for s in ["adversarial", "popular", "random"] {
        cmd.arg(world.join(format!("bench/pope/toy_pope_{s}.json")));
    }
    cmd.arg("--predictions");
    for s in ["adversarial", "popular", "random"] {
        cmd.arg(out.join(format!("predictions/pope_{s}.jsonl")));
    }
    let pope = json(&ok(cmd.output().unwrap()));
    assert_eq!(pope, metrics["pope"]);

    // GenEval from an images folder: the world's reference renders satisfy every prompt.
    let g = json(&ok(bin()
        .args(["eval", "score", "--bench", "geneval", "--gold"])
        .arg(world.join("bench/geneval/evaluation_metadata.jsonl"))
        .arg("--images")
        .arg(world.join("bench/geneval/references"))
        .output()
        .unwrap()));
    assert_eq!(g["scores"]["overall"], 1.0, "{g}");

    // A malformed gold file: non-zero exit, the message names file and line.
    let bad = tmp.join("bad_pope.json");
    let text = fs::read_to_string(world.join("bench/pope/toy_pope_random.json")).unwrap();
    fs::write(
        &bad,
        text.replacen("\"label\":\"no\"", "\"label\":\"perhaps\"", 1)
            .replacen("\"label\": \"no\"", "\"label\": \"perhaps\"", 1),
    )
    .unwrap();
    let res = bin()
        .args(["eval", "score", "--bench", "pope", "--gold"])
        .arg(&bad)
        .arg("--predictions")
        .arg(out.join("predictions/pope_random.jsonl"))
        .output()
        .unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("bad_pope.json:") && err.contains("field label"),
        "{err}"
    );
    if std::env::var_os("PAIRUNI_KEEP_TEST_OUTPUT").is_none() {
        let _ = fs::remove_dir_all(&tmp);
    }
}
