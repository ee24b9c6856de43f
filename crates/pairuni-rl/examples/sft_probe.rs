//! Scratch probe (tuning): SFT step by step, held-out answer accuracy per tag. Not part of the crate.
use pairuni_model::{Device, TextSampling};
use pairuni_rl::config::{LrSchedule, OptimConfig, SftConfig};
use pairuni_rl::reward::answer_correct;
use pairuni_rl::sft::{initial_model, SftData, SftTrainer};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(d)
}

fn main() {
    let w = PathBuf::from(env("W", "/tmp/w".to_string()));
    let holdout: usize = env("HOLD", 300);
    let steps: usize = env("STEPS", 150);
    let every: usize = env("EVERY", 50);
    let cfg = SftConfig {
        understanding: w.join("understanding.jsonl"),
        generation: w.join("generation.jsonl"),
        out_dir: "/tmp/probe-sft".into(),
        codebook_images: 300,
        steps,
        holdout,
        batch_understanding: env("BU", 16),
        batch_generation: env("BG", 16),
        caption_weight: env("CW", 0.5),
        image_weight: env("IW", 1.0),
        optim: OptimConfig {
            lr: env("LR", 1e-3),
            schedule: if env("COS", 1) == 1 {
                LrSchedule::Cosine
            } else {
                LrSchedule::Constant
            },
            warmup_steps: env("WU", 20),
            ..Default::default()
        },
        ..SftConfig::default()
    };
    let seed: u64 = env("SEED", 0);
    let dev = Device::Cpu;
    let model = initial_model(&cfg, seed, &dev).unwrap();
    let mut data = SftData::load(&cfg).unwrap();
    let perms: usize = env("PERMS", 0);
    let stems: usize = env("STEMS", 0);
    {
        use rand::seq::SliceRandom;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(77);
        let mut extra = Vec::new();
        for (img, q, a) in &data.answers {
            let opts = pairuni_rl::reward::inline_options(q);
            if opts.len() != 4 || a.len() != 1 {
                continue;
            }
            let k = (a.as_bytes()[0] - b'A') as usize;
            let stem = q[..q.find(" A. ").unwrap()].to_string();
            if stems > 0 {
                extra.push((img.clone(), stem.clone(), opts[k].clone()));
            }
            for _ in 0..perms {
                let mut idx: Vec<usize> = (0..4).collect();
                idx.shuffle(&mut rng);
                let mut nq = stem.clone();
                let mut na = String::new();
                for (j, &i) in idx.iter().enumerate() {
                    let l = (b'A' + j as u8) as char;
                    nq.push_str(&format!(" {l}. {}", opts[i]));
                    if i == k {
                        na = l.to_string();
                    }
                }
                extra.push((img.clone(), nq, na));
            }
        }
        eprintln!("augmented: +{}", extra.len());
        data.answers.extend(extra);
    }
    let und = pairuni_data::jsonl::read_understanding_pool(&cfg.understanding).unwrap();
    let held = und[und.len() - holdout..].to_vec();
    let train_s = und[..200].to_vec();
    let bench: Vec<serde_json::Value> =
        std::fs::read_to_string(w.join("bench/mcq/questions.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let mut tr = SftTrainer::new(cfg.clone(), seed, model, data).unwrap();
    let ts = TextSampling {
        max_new_tokens: 4,
        temperature: 1.0,
        top_p: 1.0,
        greedy: true,
    };
    let eval = |m: &pairuni_model::Janus, set: &[(PathBuf, String, String, String)]| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut outs: BTreeMap<String, usize> = BTreeMap::new();
        for chunk in set.chunks(32) {
            let imgs: Vec<_> = chunk
                .iter()
                .map(|s| pairuni_data::load_rgb(&s.0).unwrap())
                .collect();
            let qs: Vec<String> = chunk.iter().map(|s| s.1.clone()).collect();
            let o = m.sample_answers(&imgs, &qs, &ts, &mut rng).unwrap();
            for (r, s) in o.iter().zip(chunk) {
                let e = per.entry(s.3.clone()).or_default();
                e.1 += 1;
                if answer_correct(&r.text, &s.1, &s.2) {
                    e.0 += 1;
                }
                *outs.entry(r.text.clone()).or_default() += 1;
            }
        }
        let (c, n) = per.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let mcq: (usize, usize) = per
            .iter()
            .filter(|(k, _)| *k != "exists" && *k != "relation")
            .fold((0, 0), |a, b| (a.0 + b.1 .0, a.1 + b.1 .1));
        format!(
            "all {:.3} mcq-ish {:.3} | {} | outs {:?}",
            c as f64 / n as f64,
            mcq.0 as f64 / mcq.1.max(1) as f64,
            per.iter()
                .map(|(k, v)| format!("{k} {}/{}", v.0, v.1))
                .collect::<Vec<_>>()
                .join(" "),
            outs.iter().take(8).collect::<Vec<_>>()
        )
    };
    let to = |v: &[pairuni_data::UnderstandingSample]| -> Vec<(PathBuf, String, String, String)> {
        v.iter()
            .map(|s| {
                (
                    w.join(&s.image_path),
                    s.question.clone(),
                    s.answer.clone(),
                    s.tag.clone(),
                )
            })
            .collect()
    };
    let held_v = to(&held);
    let train_v = to(&train_s);
    let bench_v: Vec<_> = bench
        .iter()
        .map(|b| {
            (
                w.join("bench/mcq").join(b["image"].as_str().unwrap()),
                b["question"].as_str().unwrap().to_string(),
                b["answer"].as_str().unwrap().to_string(),
                b["category"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let t0 = Instant::now();
    for s in 1..=steps {
        let m = tr.step().unwrap();
        if s % 10 == 0 {
            eprintln!(
                "step {s} t {:.0}s loss {:?} ans {:?} cap {:?} img {:?} gn {:?}",
                t0.elapsed().as_secs_f64(),
                m.get("loss"),
                m.get("loss/answer"),
                m.get("loss/caption"),
                m.get("loss/image"),
                m.get("grad_norm")
            );
        }
        if s % every == 0 || s == steps {
            eprintln!("  [{s}] train: {}", eval(tr.model(), &train_v));
            eprintln!("  [{s}] held : {}", eval(tr.model(), &held_v));
            eprintln!("  [{s}] bench: {}", eval(tr.model(), &bench_v));
        }
    }
}
