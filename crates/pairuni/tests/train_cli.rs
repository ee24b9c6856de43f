//! `pairuni sft` and `pairuni train` through the binary in bf16 (from the config's `[model]` section or from
//! `--dtype`): a tiny toy world, two steps each. The weights come out in bf16 and the optimiser checkpoints keep
//! f32 master copies of them; the command line wins over the config, and `[model] toy_codebook_size` holds.
//! The trainer samples with the fused kernels (`[model] fused_sampling = "on"`), as it does on a GPU.

mod common;

use std::fs;
use std::path::Path;

use candle_core::{DType, Device};
use common::{ok, pairuni, scratch};

fn dtypes(file: &Path) -> Vec<(String, DType)> {
    let mut v: Vec<(String, DType)> = candle_core::safetensors::load(file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.dtype()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `configs/tiny-run.toml` (shared with the device call's smoke run) with this test's `[model]` section.
fn config() -> String {
    let model = "[model]\ndtype = \"bf16\"\ntoy_codebook_size = 16\nfused_sampling = \"on\"\n\n";
    format!("{model}{}", include_str!("../../../configs/tiny-run.toml"))
}

/// A tiny toy world in `dir/w` and its pairs in `dir/p/pairs.jsonl`, as `configs/tiny-run.toml` expects.
fn tiny_world(dir: &Path) {
    ok(pairuni(
        &[
            "world",
            "generate",
            "--out",
            "w",
            "--understanding",
            "60",
            "--generation",
            "60",
            "--bench",
            "12",
        ],
        dir,
    ));
    ok(pairuni(
        &[
            "pairs",
            "build",
            "--understanding",
            "w/understanding.jsonl",
            "--generation",
            "w/generation.jsonl",
            "--out",
            "p/pairs.jsonl",
        ],
        dir,
    ));
}

#[test]
fn sft_and_train_run_in_bf16_with_f32_master_weights() {
    let dir = scratch("train_cli", "bf16");
    tiny_world(&dir);
    fs::write(dir.join("c.toml"), config()).unwrap();
    // SFT takes bf16 from [model]; train is told on the command line too.
    for (stage, out, flags) in [
        ("sft", "sft", &[][..]),
        ("train", "train", &["--dtype", "bf16"][..]),
    ] {
        let mut args = vec![stage, "--config", "c.toml", "--out", out, "--quiet"];
        args.extend_from_slice(flags);
        ok(pairuni(&args, &dir));
        let weights = dtypes(&dir.join(out).join("final/model.safetensors"));
        assert!(!weights.is_empty());
        assert!(
            weights.iter().all(|(_, d)| *d == DType::BF16),
            "{stage}: {weights:?}"
        );
        let optimizer = dtypes(
            &dir.join(out)
                .join("checkpoints/step-2/optimizer.safetensors"),
        );
        let masters: Vec<_> = optimizer
            .iter()
            .filter(|(k, _)| k.starts_with("w."))
            .collect();
        assert!(!masters.is_empty(), "{stage}: no master weights");
        assert!(
            optimizer.iter().all(|(_, d)| *d == DType::F32),
            "{stage}: {optimizer:?}"
        );
    }
    let janus_config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("sft/final/config.json")).unwrap())
            .unwrap();
    let codes = janus_config["vq_config"]["num_embeddings"]
        .as_u64()
        .unwrap();
    assert!((2..=16).contains(&codes), "toy codebook of {codes} codes");
    // The command line wins over [model].
    ok(pairuni(
        &[
            "sft", "--config", "c.toml", "--out", "sft32", "--dtype", "f32", "--quiet",
        ],
        &dir,
    ));
    let weights = dtypes(&dir.join("sft32/final/model.safetensors"));
    assert!(weights.iter().all(|(_, d)| *d == DType::F32));
    // A bad [model] value names its key.
    fs::write(
        dir.join("bad.toml"),
        config().replace("dtype = \"bf16\"", "device = \"gpu\""),
    )
    .unwrap();
    let bad = pairuni(&["sft", "--config", "bad.toml", "--out", "s3"], &dir);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("[model] device"));
    // A dtype or device this build cannot run is a clear error, not a panic.
    let bad = pairuni(
        &[
            "train", "--config", "c.toml", "--out", "t2", "--dtype", "f64",
        ],
        &dir,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("f64"));
    if !cfg!(feature = "cuda") {
        let bad = pairuni(
            &[
                "sft", "--config", "c.toml", "--out", "s2", "--device", "cuda",
            ],
            &dir,
        );
        assert!(!bad.status.success());
        assert!(String::from_utf8_lossy(&bad.stderr).contains("without CUDA"));
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn sft_and_train_through_the_binary_do_not_depend_on_the_thread_count() {
    // With one rayon thread the binary runs one pass at a time; with three, three passes side by side, each on a
    // one-thread pool of its own, with candle's element-wise ops on the calling thread and one glibc arena. The
    // merge in pass order makes the runs equal bit for bit: weights, optimiser state and every logged metric but
    // the timings.
    let dir = scratch("train_cli", "threads");
    tiny_world(&dir);
    let tiny_run = include_str!("../../../configs/tiny-run.toml");
    fs::write(dir.join("c.toml"), tiny_run).unwrap();
    // Both PairGRPO runs start from the same SFT model.
    fs::write(
        dir.join("ct.toml"),
        tiny_run.replace("init = \"sft/final\"", "init = \"sft-1/final\""),
    )
    .unwrap();
    let untimed_metrics = |file: &Path| -> Vec<serde_json::Value> {
        fs::read_to_string(file)
            .unwrap()
            .lines()
            .map(|line| {
                let mut row: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(line).unwrap();
                row.retain(|k, _| !k.starts_with("time/"));
                serde_json::Value::Object(row)
            })
            .collect()
    };
    let mut runs = Vec::new();
    for threads in ["1", "3"] {
        for (stage, config) in [("sft", "c.toml"), ("train", "ct.toml")] {
            let out = format!("{stage}-{threads}");
            let mut cmd = common::bin();
            cmd.args([stage, "--config", config, "--out", &out, "--quiet"])
                .current_dir(&dir)
                .env("RAYON_NUM_THREADS", threads)
                .env_remove("CANDLE_NUM_THREADS");
            ok(cmd.output().unwrap());
            let run = dir.join(&out);
            runs.push((
                out,
                fs::read(run.join("final/model.safetensors")).unwrap(),
                fs::read(run.join("checkpoints/step-2/optimizer.safetensors")).unwrap(),
                untimed_metrics(&run.join("metrics.jsonl")),
            ));
        }
    }
    for (one, three) in runs[..2].iter().zip(&runs[2..]) {
        assert_eq!(one.3.len(), 2, "{}: two steps logged", one.0);
        assert_eq!(one.3, three.3, "{} and {}: metrics differ", one.0, three.0);
        assert!(
            one.1 == three.1,
            "{} and {}: weights differ",
            one.0,
            three.0
        );
        assert!(
            one.2 == three.2,
            "{} and {}: optimiser states differ",
            one.0,
            three.0
        );
    }
    // The three-thread runs did run three passes at once: auto is one pass per rayon thread in the binary.
    for (threads, passes) in [("1", 1), ("3", 3)] {
        let out = ok(common::bin()
            .args(["bench", "step", "--config", "ct.toml", "--steps", "1"])
            .current_dir(&dir)
            .env("RAYON_NUM_THREADS", threads)
            .env_remove("CANDLE_NUM_THREADS")
            .output()
            .unwrap());
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["concurrent_passes"], passes, "{threads} threads");
    }
    let _ = fs::remove_dir_all(&dir);
}

/// The numbers of a runner `metrics.json` by dotted key, without the `model` description.
fn scores(file: &Path) -> Vec<(String, f64)> {
    fn walk(prefix: String, value: &serde_json::Value, out: &mut Vec<(String, f64)>) {
        match value {
            serde_json::Value::Number(n) => out.push((prefix, n.as_f64().unwrap())),
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    walk(format!("{prefix}.{k}"), v, out);
                }
            }
            _ => {}
        }
    }
    let value: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(file).unwrap()).unwrap();
    let mut out = Vec::new();
    walk(String::new(), &value, &mut out);
    out
}

#[test]
fn train_evaluates_on_its_schedule_exactly_as_pairuni_eval_does() {
    let dir = scratch("train_cli", "held_out");
    tiny_world(&dir);
    fs::write(
        dir.join("c.toml"),
        include_str!("../../../configs/tiny-run.toml"),
    )
    .unwrap();
    ok(pairuni(
        &["sft", "--config", "c.toml", "--out", "sft", "--quiet"],
        &dir,
    ));
    // Asked for without a benchmark folder: a clear error before any training step.
    let bad = pairuni(
        &[
            "train",
            "--config",
            "c.toml",
            "--out",
            "t0",
            "--eval-every",
            "1",
        ],
        &dir,
    );
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("`train.eval_bench`"), "{stderr}");
    assert!(
        !dir.join("t0/metrics.jsonl").exists(),
        "trained before failing"
    );

    ok(pairuni(
        &[
            "train",
            "--config",
            "c.toml",
            "--out",
            "t",
            "--quiet",
            "--eval-every",
            "1",
            "--eval-bench",
            "w/bench",
        ],
        &dir,
    ));
    // Before the first step and after each of the two.
    let lines: Vec<serde_json::Value> = fs::read_to_string(dir.join("t/eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 1, 2]);
    for line in &lines {
        for key in [
            "mcq.overall.accuracy",
            "pope.overall.f1",
            "geneval.scores.overall",
            "time/eval",
        ] {
            let value = line[key].as_f64();
            assert!(
                value.is_some_and(f64::is_finite),
                "{key} = {:?} in {line}",
                line[key]
            );
        }
        assert!(
            line.get("recipe.seed").is_none(),
            "the recipe is in config.toml, not on every line"
        );
    }
    // The evaluation after the last step is `pairuni eval` of the final model, to the last bit.
    ok(pairuni(
        &[
            "eval", "--model", "t/final", "--bench", "w/bench", "--config", "c.toml", "--out", "e",
        ],
        &dir,
    ));
    let in_run = dir.join("t/eval/step-000002");
    assert_eq!(
        scores(&in_run.join("metrics.json")),
        scores(&dir.join("e/metrics.json"))
    );
    for predictions in ["mcq.jsonl", "pope_random.jsonl"] {
        assert_eq!(
            fs::read_to_string(in_run.join("predictions").join(predictions)).unwrap(),
            fs::read_to_string(dir.join("e/predictions").join(predictions)).unwrap(),
            "{predictions}"
        );
    }
    let _ = fs::remove_dir_all(&dir);
}
