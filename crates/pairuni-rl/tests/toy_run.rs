//! SFT then PairGRPO on the toy world: the training reward of both tasks rises.

mod common;

use std::time::Instant;

use pairuni_model::Device;
use pairuni_rl::config::{SftConfig, TrainConfig};
use pairuni_rl::grpo::metric_mean;
use pairuni_rl::RunOptions;

fn sft_cfg(out: &std::path::Path, steps: usize) -> SftConfig {
    let w = common::world();
    SftConfig {
        understanding: w.join("understanding.jsonl"),
        generation: w.join("generation.jsonl"),
        out_dir: out.to_path_buf(),
        codebook_images: 200,
        steps,
        checkpoint_every: 0,
        // One pass per kind, the numerics the learning test's bounds were set with (docs/TRAINING.md): the
        // default micro-batches change the order of the gradient sums, and so the run.
        micro_batch: 0,
        // The schedule the numbers in docs/TRAINING.md were measured with.
        optim: pairuni_rl::config::OptimConfig {
            schedule: pairuni_rl::config::LrSchedule::Cosine,
            warmup_steps: 20,
            ..Default::default()
        },
        ..SftConfig::default()
    }
}

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(d)
}

/// Held-out check: greedy accuracy on the held-out understanding samples and mean dense/binary toy-GenEval
/// of sampled images (2 per prompt) on the world's toy-GenEval prompts.
fn heldout(model: &pairuni_model::Janus, cfg_weight: f64, seed: u64) -> (f64, f64, f64) {
    use pairuni_model::{ImageSampling, TextSampling};
    use pairuni_rl::reward::{answer_correct, Reward, RewardInput, ToyGenEval};
    use rand::SeedableRng;
    let w = common::world();
    let und = pairuni_data::jsonl::read_understanding_pool(w.join("understanding.jsonl")).unwrap();
    let held = &und[und.len() - common::HOLDOUT..];
    let imgs: Vec<_> = held
        .iter()
        .map(|s| pairuni_data::load_rgb(w.join(&s.image_path)).unwrap())
        .collect();
    let qs: Vec<String> = held.iter().map(|s| s.question.clone()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let ts = TextSampling {
        max_new_tokens: 8,
        temperature: 1.0,
        top_p: 1.0,
        greedy: true,
    };
    let outs = model.sample_answers(&imgs, &qs, &ts, &mut rng).unwrap();
    let acc = outs
        .iter()
        .zip(held)
        .filter(|(o, s)| answer_correct(&o.text, &s.question, &s.answer))
        .count() as f64
        / held.len() as f64;
    let meta = std::fs::read_to_string(w.join("bench/geneval/evaluation_metadata.jsonl")).unwrap();
    let prompts: Vec<String> = meta
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let p = v["prompt"].as_str().unwrap().to_string();
            [p.clone(), p]
        })
        .collect();
    let is = ImageSampling {
        cfg_weight,
        temperature: 1.0,
        top_p: 1.0,
    };
    let rolls = model.sample_images(&prompts, &is, &mut rng).unwrap();
    let images = model
        .decode_codes(&rolls.iter().map(|r| r.codes.clone()).collect::<Vec<_>>())
        .unwrap();
    let inputs: Vec<RewardInput> = images
        .iter()
        .zip(&prompts)
        .map(|(image, prompt)| RewardInput::Image { image, prompt })
        .collect();
    let dense = ToyGenEval::new(true).score(&inputs).unwrap();
    let binary = ToyGenEval::new(false).score(&inputs).unwrap();
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    (acc, mean(&dense), mean(&binary))
}

/// SFT briefly from scratch (seed `seed`): the folder holding the run and the final model's directory. With
/// T_SFT_CACHE set (exploration), the run is kept in that folder and a model found there is reused.
fn sft_model(seed: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = match std::env::var("T_SFT_CACHE") {
        Ok(cache) => {
            let out = std::path::PathBuf::from(cache).join(format!("sft-{seed}"));
            if out.join("final").is_dir() {
                return (tmp, out.join("final"));
            }
            out
        }
        Err(_) => tmp.path().join("sft"),
    };
    let mut cfg = sft_cfg(&out, env("T_SFT", 300));
    cfg.batch_understanding = env("T_BU", 8);
    cfg.batch_generation = env("T_BG", 32);
    cfg.codebook_images = 100;
    cfg.optim.lr = env("T_SFT_LR", 2e-3);
    cfg.optim.warmup_steps = 3;
    cfg.optim.schedule = pairuni_rl::config::LrSchedule::Constant;
    let model = pairuni_rl::sft::initial_model(&cfg, seed, &Device::Cpu).unwrap();
    let s = pairuni_rl::sft(&cfg, seed, model, &RunOptions::default()).unwrap();
    let dir = s.final_dir.unwrap();
    (tmp, dir)
}

/// PairGRPO from the model in `model_dir` on a fixed set of pairs (8 unless T_BP says otherwise; every step
/// rolls out the same pairs, so a change in the step reward is learning, not a change of prompts), with the
/// rollouts drawn from `seed`. Returns the per-step (und, gen) rewards.
fn grpo(model_dir: &std::path::Path, seed: u64, grpo_steps: usize) -> Vec<(f64, f64)> {
    let w = common::world();
    let tmp = tempfile::tempdir().unwrap();
    let model =
        pairuni_model::Janus::load(model_dir, &Device::Cpu, pairuni_model::DType::F32).unwrap();
    let pairs = pairuni_data::jsonl::read_pairs(w.join("pairs.jsonl")).unwrap();
    // Image paths are relative to the pairs file: keep it in the world folder.
    let n_pairs = env("T_BP", 8);
    let pairs_file = w.join(format!("pairs{n_pairs}-{seed}.jsonl"));
    pairuni_data::jsonl::write_pairs(&pairs_file, &pairs[..n_pairs]).unwrap();
    let tc = TrainConfig {
        pairs: pairs_file,
        out_dir: tmp.path().join("grpo"),
        steps: grpo_steps,
        batch_pairs: n_pairs,
        group_size_und: env("T_GU", 8),
        group_size_gen: env("T_GG", 8),
        cfg_weight: 3.0,
        checkpoint_every: 0,
        // One pass per modality, as in SFT above.
        micro_batch: 0,
        optim: pairuni_rl::config::OptimConfig {
            lr: env("T_LR", 1e-4),
            ..Default::default()
        },
        ..TrainConfig::default()
    };
    let r = pairuni_rl::train(&tc, seed, model, &RunOptions::default()).unwrap();
    r.metrics
        .iter()
        .map(|m| {
            (
                m["reward/und"].as_f64().unwrap(),
                m["reward/gen"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// SFT from scratch, then PairGRPO, both from `seed`: the per-step (und, gen) rewards.
fn sft_then_grpo(seed: u64, grpo_steps: usize) -> Vec<(f64, f64)> {
    let (_tmp, dir) = sft_model(seed);
    grpo(&dir, seed, grpo_steps)
}

fn window_means(r: &[(f64, f64)], k: usize) -> ((f64, f64), (f64, f64)) {
    let mean = |w: &[(f64, f64)]| {
        let n = w.len() as f64;
        (
            w.iter().map(|x| x.0).sum::<f64>() / n,
            w.iter().map(|x| x.1).sum::<f64>() / n,
        )
    };
    (mean(&r[..k]), mean(&r[r.len() - k..]))
}

/// The training reward of both tasks rises over the first PairGRPO steps.
///
/// 300 SFT steps from scratch weighted towards drawing (8 answers + 32 code sequences a step, lr 2e-3), then
/// three PairGRPO runs of 48 steps from that model, with rollout seeds 1, 2, 3, on 8 fixed pairs (G = 8 per
/// side, lr 1e-4, dense toy-GenEval). The rise of a run is the mean step reward of its last 8 steps against its
/// first 8; the test bounds the mean rise over the three runs (≥ 0.04 understanding, ≥ 0.02 generation).
///
/// Why three runs of small steps and not one run of larger ones (the test until the twelfth session: one run of
/// 24 steps at lr 3e-4): a run's trajectory depends on the last bits of its arithmetic, and those depend on the
/// machine, so a run that rose on one machine need not on another. On the twelfth session's machine that run
/// gave understanding +0.10 but generation −0.004 (earlier machines: +0.14 / +0.08), and two more rollout seeds
/// from the same SFT model took generation down (−0.085, −0.050): at 3e-4 the image side can collapse. At 1e-4
/// over 48 steps every run rose on both tasks (understanding +0.08, +0.09, +0.09; generation +0.13, +0.03, +0.01)
/// and averaging three runs divides one run's spread by √3 (docs/TRAINING.md, "The CI-sized run"). T_RUNS,
/// T_STEPS, T_K and T_LR change the runs, their length, the windows and the learning rate. The three runs go
/// side by side, one thread each. About 6 minutes on 2 cores, so it is ignored in the default suite and
/// `.ci/run` runs it.
#[test]
#[ignore = "≈ 6 minutes on 2 cores: .ci/run runs it (cargo test --release -p pairuni-rl --test toy_run -- --ignored \
            --exact sft_then_pairgrpo_raises_training_reward_of_both_tasks)"]
fn sft_then_pairgrpo_raises_training_reward_of_both_tasks() {
    // As the binary does: the runs below go side by side.
    pairuni_rl::passes::prepare_cpu_process();
    let t = Instant::now();
    let (_tmp, dir) = sft_model(1);
    eprintln!("SFT in {:.1}s", t.elapsed().as_secs_f64());
    let runs: u64 = env("T_RUNS", 3);
    let steps = env("T_STEPS", 48);
    // The runs are independent, so they go side by side the way an update's micro-batch passes do: each on a
    // thread and a one-thread rayon pool of its own, collected in seed order. A run's numbers do not depend on
    // the thread count (train_cli's thread-count test), only the wall time does.
    let mut results: Vec<(Vec<(f64, f64)>, f64)> = Vec::new();
    pairuni_rl::passes::run_in_order::<_, String>(
        runs as usize,
        pairuni_rl::passes::PassThreads::on(&Device::Cpu, runs as usize),
        || Ok(()),
        |index| {
            let t = Instant::now();
            let r = grpo(&dir, index as u64 + 1, steps);
            Ok((r, t.elapsed().as_secs_f64()))
        },
        |_, result| {
            results.push(result);
            Ok(pairuni_rl::passes::Merged::Continue)
        },
    )
    .expect("the PairGRPO runs");
    let (mut und, mut gen) = (0.0, 0.0);
    for (seed, (r, seconds)) in (1..=runs).zip(&results) {
        let ((u0, g0), (u1, g1)) = window_means(r, env("T_K", 8));
        eprintln!(
            "run {seed}: und {u0:.3} -> {u1:.3}, gen {g0:.3} -> {g1:.3} in {seconds:.1}s; steps {r:?}"
        );
        und += (u1 - u0) / runs as f64;
        gen += (g1 - g0) / runs as f64;
    }
    eprintln!("mean rise: und {und:+.3}, gen {gen:+.3}");
    assert!(und >= 0.04, "understanding reward did not rise: {und:+.3}");
    assert!(gen >= 0.02, "generation reward did not rise: {gen:+.3}");
}

#[test]
#[ignore = "exploration: the toy run over several seeds (SEEDS=1,2,3,4 GRPO_STEPS=48 T_K=8)"]
fn toy_run_seeds() {
    let steps = env("GRPO_STEPS", 48);
    for seed in std::env::var("SEEDS")
        .unwrap_or_else(|_| "1,2,3".into())
        .split(',')
    {
        let seed: u64 = seed.parse().unwrap();
        let t = Instant::now();
        let r = sft_then_grpo(seed, steps);
        let ((u0, g0), (u1, g1)) = window_means(&r, env("T_K", 8));
        eprintln!(
            "SEED {seed}: und {u0:.3} -> {u1:.3}, gen {g0:.3} -> {g1:.3} in {:.1}s; steps {r:?}",
            t.elapsed().as_secs_f64()
        );
    }
}

#[test]
#[ignore = "exploration: prints timings and rewards"]
fn explore() {
    let out = std::path::PathBuf::from(
        std::env::var("EXPLORE_OUT").unwrap_or_else(|_| "/tmp/explore".into()),
    );
    std::fs::create_dir_all(&out).unwrap();
    let seed: u64 = env("SEED", 1);
    let cfg_weight: f64 = env("CFG", 3.0);
    let mut cfg = sft_cfg(&out.join("sft"), env("SFT_STEPS", 100));
    cfg.holdout = common::HOLDOUT;
    cfg.optim.lr = env("SFT_LR", 1e-3);
    cfg.batch_understanding = env("SFT_BU", 16);
    cfg.batch_generation = env("SFT_BG", 16);
    let t = Instant::now();
    let model = pairuni_rl::sft::initial_model(&cfg, seed, &Device::Cpu).unwrap();
    let s = pairuni_rl::sft(&cfg, seed, model, &RunOptions::default()).unwrap();
    let sft_s = t.elapsed().as_secs_f64();
    eprintln!("sft {} steps in {sft_s:.2}s", s.steps);
    let model = pairuni_model::Janus::load(
        s.final_dir.as_ref().unwrap(),
        &Device::Cpu,
        pairuni_model::DType::F32,
    )
    .unwrap();
    let before = heldout(&model, cfg_weight, 77);
    eprintln!(
        "held-out after SFT: acc {:.3} geneval dense {:.3} binary {:.3}",
        before.0, before.1, before.2
    );
    let w = common::world();
    let dense = env("DENSE", 1) == 1;
    let tc = TrainConfig {
        pairs: w.join("pairs.jsonl"),
        out_dir: out.join("grpo"),
        steps: env("GRPO_STEPS", 30),
        batch_pairs: env("BP", 4),
        group_size_und: env("GU", 8),
        group_size_gen: env("GG", 8),
        cfg_weight,
        checkpoint_every: 0,
        gen_rewards: vec![pairuni_rl::config::RewardTerm {
            kind: if dense {
                pairuni_rl::config::RewardKind::GenevalDense
            } else {
                pairuni_rl::config::RewardKind::GenevalBinary
            },
            weight: 1.0,
        }],
        optim: pairuni_rl::config::OptimConfig {
            lr: env("LR", 1e-4),
            ..Default::default()
        },
        ..TrainConfig::default()
    };
    let t = Instant::now();
    let r = pairuni_rl::train(&tc, seed, model, &RunOptions::default()).unwrap();
    let grpo_s = t.elapsed().as_secs_f64();
    eprintln!("grpo {} steps in {grpo_s:.2}s", r.steps);
    for m in &r.metrics {
        let g = |k: &str| m.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        eprintln!(
            "step {:3} und {:.3} gen {:.3} zero {:.2} ent {:.3}/{:.3} gn {:.3} len {:.2} t {:.2}/{:.2}/{:.2}",
            g("step"), g("reward/und"), g("reward/gen"), g("frac_reward_zero_std"), g("entropy"), g("entropy/image"),
            g("grad_norm"), g("completions/mean_length"), g("time/rollout"), g("time/reward"), g("time/train")
        );
    }
    let model = pairuni_model::Janus::load(
        r.final_dir.as_ref().unwrap(),
        &Device::Cpu,
        pairuni_model::DType::F32,
    )
    .unwrap();
    let after = heldout(&model, cfg_weight, 77);
    eprintln!(
        "held-out after GRPO: acc {:.3} geneval dense {:.3} binary {:.3}",
        after.0, after.1, after.2
    );
    let n = r.metrics.len();
    let k = (n / 3).max(1);
    let summary = serde_json::json!({
        "sft_s": sft_s, "grpo_s": grpo_s,
        "first_und": metric_mean(&r.metrics[..k], "reward/und"), "first_gen": metric_mean(&r.metrics[..k], "reward/gen"),
        "last_und": metric_mean(&r.metrics[n - k..], "reward/und"), "last_gen": metric_mean(&r.metrics[n - k..], "reward/gen"),
        "heldout_before": before, "heldout_after": after,
    });
    eprintln!("SUMMARY {summary}");
    std::fs::write(out.join("summary.json"), summary.to_string()).unwrap();
}

#[test]
#[ignore = "exploration: time the model calls one trainer step makes"]
fn profile() {
    use pairuni_model::{CfgLogprobPolicy, ImageSampling, TextSampling};
    use rand::SeedableRng;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = sft_cfg(&tmp.path().join("sft"), 1);
    let model = pairuni_rl::sft::initial_model(&cfg, 1, &Device::Cpu).unwrap();
    let w = common::world();
    let und = pairuni_data::jsonl::read_understanding_pool(w.join("understanding.jsonl")).unwrap();
    let n = 16;
    let imgs: Vec<_> = und[..n]
        .iter()
        .map(|s| pairuni_data::load_rgb(w.join(&s.image_path)).unwrap())
        .collect();
    let qs: Vec<String> = und[..n].iter().map(|s| s.question.clone()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let t = Instant::now();
    let ts = TextSampling {
        max_new_tokens: 4,
        temperature: 1.0,
        top_p: 1.0,
        greedy: false,
    };
    let rolls = model.sample_answers(&imgs, &qs, &ts, &mut rng).unwrap();
    eprintln!("sample_answers x{n}: {:.3}s", t.elapsed().as_secs_f64());
    let rolls: Vec<_> = rolls
        .into_iter()
        .filter(|r| r.answer_ids.len() < 5)
        .collect();
    let t = Instant::now();
    let (lp, _m) = model.answer_logprobs(&rolls).unwrap();
    eprintln!(
        "answer_logprobs fwd x{}: {:.3}s",
        rolls.len(),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let _g = lp.sum_all().unwrap().backward().unwrap();
    eprintln!("answer_logprobs bwd: {:.3}s", t.elapsed().as_secs_f64());
    let prompts: Vec<String> = (0..n)
        .map(|_| "a photo of a red circle".to_string())
        .collect();
    let t = Instant::now();
    let irs = model
        .sample_images(
            &prompts,
            &ImageSampling {
                cfg_weight: 3.0,
                temperature: 1.0,
                top_p: 1.0,
            },
            &mut rng,
        )
        .unwrap();
    eprintln!("sample_images x{n}: {:.3}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let lp = model
        .image_logprobs(&irs, CfgLogprobPolicy::Conditional)
        .unwrap();
    eprintln!("image_logprobs fwd x{n}: {:.3}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let _g = lp.sum_all().unwrap().backward().unwrap();
    eprintln!("image_logprobs bwd: {:.3}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let _ = model
        .decode_codes(&irs.iter().map(|r| r.codes.clone()).collect::<Vec<_>>())
        .unwrap();
    eprintln!("decode x{n}: {:.3}s", t.elapsed().as_secs_f64());
}
