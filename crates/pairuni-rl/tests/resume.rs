//! Run folders: a run stopped after 3 steps ("killed": every in-memory object dropped) and restarted on the
//! same folder ends bit-identical to an uninterrupted 6-step run — weights and every non-timing metric.
//! Also: non-finite steps are skipped and three in a row stop the run; β = 0 builds no reference model.

mod common;

use std::path::Path;

use pairuni_model::{DType, Device, Janus};
use pairuni_rl::config::{OptimConfig, SftConfig, TrainConfig};
use pairuni_rl::{GrpoTrainer, RunOptions, TrainError};
use serde_json::{Map, Value};

/// A deterministic tiny starting model (random init; the resume property does not need a trained one).
fn base_model() -> &'static Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let w = common::world();
        let cfg = SftConfig {
            generation: w.join("generation.jsonl"),
            codebook_images: 64,
            ..SftConfig::default()
        };
        let model = pairuni_rl::sft::initial_model(&cfg, 3, &Device::Cpu).unwrap();
        let dir = w.join("base-model");
        model.save(&dir).unwrap();
        dir
    })
}

fn load() -> Janus {
    Janus::load(base_model(), &Device::Cpu, DType::F32).unwrap()
}

fn grpo_cfg(out: &Path) -> TrainConfig {
    let w = common::world();
    TrainConfig {
        pairs: w.join("pairs.jsonl"),
        out_dir: out.to_path_buf(),
        steps: 6,
        batch_pairs: 2,
        group_size_und: 3,
        group_size_gen: 2,
        updates_per_batch: 2,
        cfg_weight: 3.0,
        checkpoint_every: 3,
        optim: OptimConfig {
            lr: 1e-3,
            warmup_steps: 2,
            schedule: pairuni_rl::config::LrSchedule::Cosine,
            ..Default::default()
        },
        ..TrainConfig::default()
    }
}

fn without_times(ms: &[Map<String, Value>]) -> Vec<Map<String, Value>> {
    ms.iter()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.starts_with("time/"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .collect()
}

fn read_metrics(dir: &Path) -> Vec<Map<String, Value>> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let m = Janus::load(&dir.join("final"), &Device::Cpu, DType::F32).unwrap();
    common::f32_values(
        m.all_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone())),
    )
}

#[test]
fn pairgrpo_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let a = pairuni_rl::train(&grpo_cfg(&straight), 9, load(), &RunOptions::default()).unwrap();
    assert_eq!(a.steps, 6);

    let split = tmp.path().join("split");
    let first = pairuni_rl::train(
        &grpo_cfg(&split),
        9,
        load(),
        &RunOptions {
            stop_after: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((first.steps, first.final_dir.is_none()), (3, true));
    drop(first);
    // A fresh model (random init again): the checkpoint must restore everything.
    let second = pairuni_rl::train(&grpo_cfg(&split), 9, load(), &RunOptions::default()).unwrap();
    assert_eq!(second.resumed_from, 3);
    assert_eq!(second.steps, 6);

    assert_eq!(
        without_times(&read_metrics(&straight)),
        without_times(&read_metrics(&split))
    );
    assert_eq!(read_metrics(&split).len(), 6);
    let (wa, wb) = (weights(&straight), weights(&split));
    assert_eq!(wa.len(), wb.len());
    for ((na, va), (nb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        assert!(va == vb, "weight {na} differs after resume");
    }
    // Training moved the weights at all (the comparison above is not vacuous).
    let init = common::f32_values(
        load()
            .all_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone())),
    );
    // Same names in the same order, so each weight is compared with its own start.
    assert!(init.iter().map(|(n, _)| n).eq(wa.iter().map(|(n, _)| n)));
    assert!(init.iter().zip(&wa).any(|((_, a), (_, b))| a != b));
}

#[test]
fn sft_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::short_sft;
    let straight = tmp.path().join("a");
    pairuni_rl::sft(&cfg(&straight), 2, load(), &RunOptions::default()).unwrap();
    let split = tmp.path().join("b");
    pairuni_rl::sft(
        &cfg(&split),
        2,
        load(),
        &RunOptions {
            stop_after: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    let s = pairuni_rl::sft(&cfg(&split), 2, load(), &RunOptions::default()).unwrap();
    assert_eq!(s.resumed_from, 2);
    assert_eq!(
        without_times(&read_metrics(&straight)),
        without_times(&read_metrics(&split))
    );
    assert_eq!(weights(&straight), weights(&split));
}

#[test]
fn three_non_finite_steps_stop_the_run_with_a_clear_error() {
    let w = common::world();
    let model = load();
    // Poison one trainable weight: every loss is NaN from now on.
    let (name, var) = model
        .trainable_vars(&pairuni_model::ParamSelection::LanguageModel)
        .remove(0);
    var.set(&(var.as_tensor() * f64::NAN).unwrap()).unwrap();
    let pairs = pairuni_data::jsonl::read_pairs(w.join("pairs.jsonl")).unwrap();
    let cfg = TrainConfig {
        batch_pairs: 1,
        group_size_und: 2,
        group_size_gen: 2,
        ..grpo_cfg(w)
    };
    let mut t = GrpoTrainer::new(cfg, 1, model, pairs, w.to_path_buf()).unwrap();
    let r1 = t
        .step()
        .expect("first non-finite step is skipped, not fatal");
    assert!(
        r1.skipped,
        "poisoned weight {name} should make the step non-finite"
    );
    assert_eq!(r1.metrics["nonfinite_skipped"], 1);
    assert!(t.step().unwrap().skipped);
    let err = t.step().unwrap_err();
    assert!(
        matches!(err, TrainError::NonFinite { streak: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("3 consecutive steps"), "{err}");
}

#[test]
fn reference_model_only_when_beta_is_positive() {
    let w = common::world();
    let pairs = pairuni_data::jsonl::read_pairs(w.join("pairs.jsonl")).unwrap();
    let t = GrpoTrainer::new(grpo_cfg(w), 1, load(), pairs.clone(), w.to_path_buf()).unwrap();
    assert!(!t.has_reference());
    let cfg = TrainConfig {
        beta: 0.05,
        batch_pairs: 1,
        group_size_und: 2,
        group_size_gen: 2,
        ..grpo_cfg(w)
    };
    let mut t = GrpoTrainer::new(cfg, 1, load(), pairs, w.to_path_buf()).unwrap();
    assert!(t.has_reference());
    let r = t.step().unwrap();
    // Before the first update policy == reference; with μ = 2 the second pass differs, so KL ≥ 0 is logged.
    let kl = r.metrics["kl"].as_f64().unwrap();
    assert!(kl.is_finite() && kl >= 0.0, "{kl}");
}

/// Every weight of `m`, flattened, by name.
type Weights = Vec<(String, Vec<f32>)>;

fn flat_weights(m: &Janus) -> Weights {
    m.all_vars()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

/// Each of `keys` within 1e-5 (relative, or absolute below 1) in two steps' metrics.
fn assert_metrics_close(a: &Map<String, Value>, b: &Map<String, Value>, keys: &[&str], what: &str) {
    for key in keys {
        let (x, y) = (a[*key].as_f64().unwrap(), b[*key].as_f64().unwrap());
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "{what} {key}: {x} vs {y}"
        );
    }
}

/// One PairGRPO step of `cfg`: its metrics and the policy's weights after it.
fn one_step(cfg: TrainConfig) -> (Map<String, Value>, Weights) {
    let w = common::world();
    let pairs = pairuni_data::jsonl::read_pairs(w.join("pairs.jsonl")).unwrap();
    let mut t = GrpoTrainer::new(cfg, 1, load(), pairs, w.to_path_buf()).unwrap();
    let r = t.step().unwrap();
    assert!(!r.skipped);
    (r.metrics, flat_weights(t.policy()))
}

/// The metrics an update writes (the loss, its gradient, entropies, KL and clipping).
const UPDATE_METRICS: [&str; 6] = [
    "loss",
    "grad_norm",
    "entropy",
    "entropy/image",
    "kl",
    "clip_ratio/region_mean",
];

#[test]
fn micro_batches_take_the_whole_batch_step() {
    // 6 answers and 4 images, scored 2 at a time (each modality in 3 and 2 passes) or all at once: the gradients
    // add up to the same update, under every loss aggregation, with μ = 2 and a KL term (reference log-probs per
    // micro-batch too).
    use pairuni_rl::config::LossAggregation;
    let w = common::world();
    for aggregation in [
        LossAggregation::ModalityTokenMean,
        LossAggregation::TokenMean,
        LossAggregation::SequenceMean,
        LossAggregation::DrGrpo,
    ] {
        let cfg = |micro_batch| TrainConfig {
            steps: 1,
            beta: 0.05,
            micro_batch,
            loss_aggregation: aggregation,
            ..grpo_cfg(w)
        };
        let (m_all, w_all) = one_step(cfg(0));
        let (m_micro, w_micro) = one_step(cfg(2));
        let keys: Vec<&str> = UPDATE_METRICS.iter().copied().chain(["reward"]).collect();
        assert_metrics_close(&m_all, &m_micro, &keys, &format!("{aggregation:?}"));
        // AdamW divides each coordinate's gradient by its own RMS, so where a gradient is near zero a rounding
        // difference moves the update by a visible fraction of one step: bound the weights' difference by 5 % of
        // the most any coordinate can move in μ = 2 steps of lr 1e-3 (2e-3).
        for ((name, a), (_, b)) in w_all.iter().zip(&w_micro) {
            let d = a.iter().zip(b).fold(0f32, |s, (x, y)| s.max((x - y).abs()));
            assert!(d < 1e-4, "{aggregation:?} {name}: {d}");
        }
    }
    // And the update did move the weights (the comparison above is not of two unchanged models).
    let before = flat_weights(&load());
    let (_, after) = one_step(TrainConfig {
        steps: 1,
        micro_batch: 2,
        ..grpo_cfg(w)
    });
    let changed = before
        .iter()
        .zip(&after)
        .filter(|((_, a), (_, b))| a != b)
        .count();
    assert!(changed > 10, "{changed} tensors changed");
}

#[test]
fn concurrent_passes_take_the_step_of_one_thread_bit_for_bit() {
    // Five passes (3 of answers, 2 of images) with a KL term and μ = 2, issued from one, two or three threads:
    // the merge sums in pass order, so metrics and weights are identical, not merely close.
    let w = common::world();
    let cfg = |concurrent_passes| TrainConfig {
        steps: 1,
        beta: 0.05,
        micro_batch: 2,
        updates_per_batch: 2,
        concurrent_passes,
        ..grpo_cfg(w)
    };
    let (m_one, w_one) = one_step(cfg(1));
    for threads in [2, 3] {
        let (m, weights) = one_step(cfg(threads));
        for key in UPDATE_METRICS {
            assert_eq!(m[key], m_one[key], "{key} with {threads} threads");
        }
        assert!(weights == w_one, "weights differ with {threads} threads");
    }
}

#[test]
fn sft_micro_batches_take_the_whole_batch_step() {
    // 5 answers, 3 captions and 5 code sequences a step, scored 2 at a time or all at once: the same losses per
    // kind, the same gradient norm and, up to AdamW's per-coordinate normalisation of rounding, the same weights.
    use pairuni_rl::sft::{SftData, SftTrainer};
    let tmp = tempfile::tempdir().unwrap();
    let run = |micro_batch, concurrent_passes| {
        let cfg = pairuni_rl::config::SftConfig {
            batch_understanding: 5,
            batch_generation: 5,
            micro_batch,
            concurrent_passes,
            ..common::short_sft(tmp.path())
        };
        let data = SftData::load(&cfg).unwrap();
        let mut t = SftTrainer::new(cfg, 2, load(), data).unwrap();
        let m = t.step().unwrap();
        (m, flat_weights(t.model()))
    };
    let (m_all, w_all) = run(0, 1);
    let (m_micro, w_micro) = run(2, 1);
    // Passes from three threads are merged in pass order: the same step, bit for bit.
    let (m_threads, w_threads) = run(2, 3);
    let untimed = |m: &Map<String, Value>| {
        m.iter()
            .filter(|(k, _)| !k.starts_with("time/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(untimed(&m_threads), untimed(&m_micro));
    assert!(w_threads == w_micro, "weights differ with three threads");
    let keys = [
        "loss",
        "loss/answer",
        "loss/caption",
        "loss/image",
        "grad_norm",
    ];
    assert_metrics_close(&m_all, &m_micro, &keys, "sft");
    let lr = pairuni_rl::config::OptimConfig::default().lr as f32;
    let before = flat_weights(&load());
    let mut moved = 0;
    for (((name, a), (_, b)), (_, w0)) in w_all.iter().zip(&w_micro).zip(&before) {
        let d = a.iter().zip(b).fold(0f32, |s, (x, y)| s.max((x - y).abs()));
        assert!(d <= 0.05 * lr, "{name}: {d}");
        moved += usize::from(a != w0);
    }
    assert!(moved > 10, "{moved} tensors moved");
}

/// A held-out evaluation that uses the model as a real one does (it samples answers from a seed of its own) and
/// records which step it saw and a fingerprint of the weights it was given.
struct FingerprintEvaluator {
    seen: std::sync::Mutex<Vec<usize>>,
}

impl pairuni_rl::RunEvaluator for FingerprintEvaluator {
    fn evaluate(
        &self,
        model: &Janus,
        step: usize,
        out_dir: &Path,
    ) -> Result<Map<String, Value>, String> {
        use rand::SeedableRng;
        let w = common::world();
        let und = pairuni_data::jsonl::read_understanding_pool(w.join("understanding.jsonl"))
            .map_err(|e| e.to_string())?;
        let image =
            pairuni_data::load_rgb(w.join(&und[0].image_path)).map_err(|e| e.to_string())?;
        let sampling = pairuni_model::TextSampling {
            max_new_tokens: 4,
            temperature: 1.0,
            top_p: 1.0,
            greedy: false,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(77);
        let answers = model
            .sample_answers(&[image], &[und[0].question.clone()], &sampling, &mut rng)
            .map_err(|e| e.to_string())?;
        std::fs::create_dir_all(out_dir).map_err(|e| e.to_string())?;
        std::fs::write(out_dir.join("answer.txt"), &answers[0].text).map_err(|e| e.to_string())?;
        let sum: f64 = common::f32_values(
            model
                .all_vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone())),
        )
        .iter()
        .flat_map(|(_, v)| v.iter().map(|&x| x as f64))
        .sum();
        self.seen.lock().unwrap().push(step);
        let mut m = Map::new();
        m.insert("weight_sum".into(), Value::from(sum));
        Ok(m)
    }
}

fn read_evals(dir: &Path) -> Vec<Map<String, Value>> {
    std::fs::read_to_string(dir.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn eval_steps(dir: &Path) -> Vec<u64> {
    read_evals(dir)
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn held_out_evaluations_follow_their_schedule_survive_a_kill_and_change_no_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain");
    pairuni_rl::train(&grpo_cfg(&plain), 9, load(), &RunOptions::default()).unwrap();

    let evaluator = std::sync::Arc::new(FingerprintEvaluator {
        seen: Default::default(),
    });
    let opts = |stop_after| RunOptions {
        stop_after,
        evaluator: Some(pairuni_rl::EvalHook(evaluator.clone())),
        ..Default::default()
    };
    // Checkpoints at 3 and 6, evaluations before the first step, after steps 3 and 6.
    let cfg = |out: &Path| TrainConfig {
        eval_every: 3,
        ..grpo_cfg(out)
    };
    let evaluated = tmp.path().join("evaluated");
    let first = pairuni_rl::train(&cfg(&evaluated), 9, load(), &opts(Some(3))).unwrap();
    assert_eq!(first.steps, 3);
    assert_eq!(eval_steps(&evaluated), [0, 3]);
    // Killed while evaluating after step 3: its line never written.
    let text = std::fs::read_to_string(evaluated.join("eval.jsonl")).unwrap();
    let first_line = text.lines().next().unwrap();
    std::fs::write(evaluated.join("eval.jsonl"), format!("{first_line}\n")).unwrap();
    let second = pairuni_rl::train(&cfg(&evaluated), 9, load(), &opts(None)).unwrap();
    assert_eq!(second.resumed_from, 3);
    // Step 3 evaluated again from its checkpoint, then step 6; no step twice in the file.
    assert_eq!(eval_steps(&evaluated), [0, 3, 6]);
    assert_eq!(*evaluator.seen.lock().unwrap(), [0, 3, 3, 6]);
    for step in [0, 3, 6] {
        let answer = evaluated.join(format!("eval/step-{step:06}/answer.txt"));
        assert!(answer.is_file(), "{} missing", answer.display());
    }

    // The evaluations changed nothing in training: same metrics, same weights as the run without them.
    assert_eq!(
        without_times(&read_metrics(&plain)),
        without_times(&read_metrics(&evaluated))
    );
    let (wa, wb) = (weights(&plain), weights(&evaluated));
    assert!(wa == wb, "held-out evaluations changed the trained weights");
    // Each evaluation saw the weights of its step: the one after the last step saw the final model's.
    let evals = read_evals(&evaluated);
    let final_sum: f64 = wb
        .iter()
        .flat_map(|(_, v)| v.iter().map(|&x| x as f64))
        .sum();
    assert_eq!(evals[2]["weight_sum"].as_f64().unwrap(), final_sum);
    assert_ne!(
        evals[0]["weight_sum"].as_f64().unwrap(),
        final_sum,
        "training moved the weights"
    );
    assert!(evals
        .iter()
        .all(|m| m["time/eval"].as_f64().unwrap() >= 0.0));
}

#[test]
fn evaluations_asked_for_without_an_evaluator_are_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        eval_every: 2,
        ..grpo_cfg(tmp.path())
    };
    let err = pairuni_rl::train(&cfg, 9, load(), &RunOptions::default()).unwrap_err();
    assert!(matches!(err, TrainError::Config(_)), "{err}");
    assert!(err.to_string().contains("eval_every"), "{err}");
}
