//! `pairuni ablate`: the paper's comparisons (its Table 5) in miniature, same budget, several seeds.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use pairuni_rl::config::{PairWeighting, Pairing, Subset, TrainConfig};

use crate::pipeline::{self, Headline, Layout};

/// Arguments of `pairuni ablate`.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "For each seed, generates one toy world, builds one set of pairs and SFTs one model, then \
trains every variant from that same SFT model with the same PairGRPO budget and evaluates it: PairGRPO, no \
weighting, linear weighting, unpaired, random pairs, aligned only, retrieved only. Writes OUT/ablation.md and \
OUT/ablation.json (mean ± sample standard deviation over seeds). Resumable like `pairuni demo`."
)]
pub struct Args {
    /// Configuration file (default: the built-in configs/toy.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of seeds (0, 1, … unless --first-seed is given).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Output folder.
    #[arg(long, default_value = "runs/ablate")]
    out: PathBuf,
    /// Use the CI-sized configuration (configs/toy-quick.toml) when no --config is given.
    #[arg(long)]
    quick: bool,
    /// Only these variants (comma-separated names, e.g. pairgrpo,unpaired).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Device: cpu, cuda or cuda:N (default: the config's `[model] device`, cpu).
    #[arg(long)]
    device: Option<String>,
    /// Weight dtype (f32, bf16, f16) (default: the config's `[model] dtype`, bf16 on CUDA and f32 on CPU).
    #[arg(long)]
    dtype: Option<String>,
}

/// One ablation variant: a name and the one config change it makes.
pub struct Variant {
    /// Short name used for folders and the table.
    pub name: &'static str,
    /// What it is, for the table.
    pub description: &'static str,
    /// The change to the PairGRPO config.
    pub apply: fn(&mut TrainConfig),
}

/// The variants of the paper's ablation, PairGRPO first.
pub fn variants() -> Vec<Variant> {
    vec![
        Variant {
            name: "pairgrpo",
            description: "PairGRPO (paired, √s weight)",
            apply: |_| {},
        },
        Variant {
            name: "no_weight",
            description: "no pair weighting (w = 1)",
            apply: |t| t.pair_weight = PairWeighting::None,
        },
        Variant {
            name: "linear_weight",
            description: "linear weighting (w = s)",
            apply: |t| t.pair_weight = PairWeighting::Linear,
        },
        Variant {
            name: "unpaired",
            description: "unpaired batches",
            apply: |t| t.pairing = Pairing::Unpaired,
        },
        Variant {
            name: "random_pairs",
            description: "random pairs",
            apply: |t| t.pairing = Pairing::Random,
        },
        Variant {
            name: "aligned_only",
            description: "aligned pairs only",
            apply: |t| t.subset = Subset::Aligned,
        },
        Variant {
            name: "retrieved_only",
            description: "retrieved pairs only",
            apply: |t| t.subset = Subset::Retrieved,
        },
    ]
}

/// Mean and sample standard deviation (0 for one value), NaN values excluded.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = finite.len() as f64;
    let mean = finite.iter().sum::<f64>() / n;
    if finite.len() < 2 {
        return (mean, 0.0);
    }
    let var = finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Runs `pairuni ablate`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let base = crate::cmd::demo::load_config(args.config.as_ref(), args.quick)?;
    let placement = base
        .model
        .resolve(args.device.as_deref(), args.dtype.as_deref())?;
    let chosen: Vec<Variant> = variants()
        .into_iter()
        .filter(|v| args.only.is_empty() || args.only.iter().any(|o| o == v.name))
        .collect();
    anyhow::ensure!(
        !chosen.is_empty(),
        "--only names no known variant (known: {})",
        variants()
            .iter()
            .map(|v| v.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    // results[variant][seed]
    let mut results: Vec<Vec<Headline>> = vec![Vec::new(); chosen.len()];
    let mut sft_results: Vec<Headline> = Vec::new();
    for seed in args.first_seed..args.first_seed + args.seeds {
        let mut cfg = base.clone();
        cfg.seed = seed;
        let layout = Layout {
            root: args.out.join(format!("seed-{seed}")),
        };
        pipeline::place(&mut cfg, &layout);
        std::fs::create_dir_all(&layout.root)?;
        pipeline::world_stage(&cfg, &layout)?;
        pipeline::pairs_stage(&cfg, &layout)?;
        let sft_model = pipeline::sft_stage(&cfg, &placement)?;
        let sft_metrics = pipeline::eval_stage(
            &cfg,
            &layout,
            &sft_model,
            &layout.eval("sft"),
            &placement,
            None,
        )?;
        sft_results.push(pipeline::headline(&sft_metrics));
        for (index, variant) in chosen.iter().enumerate() {
            let mut vcfg = cfg.clone();
            (variant.apply)(&mut vcfg.train);
            let vroot = layout.root.join("variants").join(variant.name);
            vcfg.train.out_dir = vroot.join("train");
            // The ablation compares end points: the SFT model is evaluated once above, each variant's final
            // model below; evaluations during each variant's run would cost three more per variant and seed.
            vcfg.train.eval_every = 0;
            tracing::info!(seed, variant = variant.name, "ablation variant");
            let model = pipeline::train_stage(&vcfg, &placement)
                .with_context(|| format!("variant {} seed {seed}", variant.name))?;
            let metrics = pipeline::eval_stage(
                &vcfg,
                &layout,
                &model,
                &vroot.join("eval"),
                &placement,
                None,
            )?;
            results[index].push(pipeline::headline(&metrics));
        }
    }
    let fmt = |values: Vec<f64>| {
        let (m, s) = mean_std(&values);
        format!("{m:.3} ± {s:.3}")
    };
    let mut md = format!(
        "Ablation over seeds {}..{} (mean ± sample std over seeds; same world, pairs, SFT model and PairGRPO budget per seed)\n\n\
| variant | MCQ accuracy | POPE F1 | GenEval overall |\n|---|---|---|---|\n",
        args.first_seed,
        args.first_seed + args.seeds - 1
    );
    md.push_str(&format!(
        "| SFT checkpoint (before RL) | {} | {} | {} |\n",
        fmt(sft_results.iter().map(|h| h.mcq_accuracy).collect()),
        fmt(sft_results.iter().map(|h| h.pope_f1).collect()),
        fmt(sft_results.iter().map(|h| h.geneval_overall).collect())
    ));
    for (variant, rows) in chosen.iter().zip(&results) {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            variant.description,
            fmt(rows.iter().map(|h| h.mcq_accuracy).collect()),
            fmt(rows.iter().map(|h| h.pope_f1).collect()),
            fmt(rows.iter().map(|h| h.geneval_overall).collect())
        ));
    }
    let json = serde_json::json!({
        "seeds": (args.first_seed..args.first_seed + args.seeds).collect::<Vec<_>>(),
        "sft": sft_results,
        "variants": chosen.iter().zip(&results).map(|(v, r)| serde_json::json!({"name": v.name, "description": v.description, "per_seed": r})).collect::<Vec<_>>(),
    });
    pairuni_data::atomic::write_atomic_bytes(args.out.join("ablation.md"), md.as_bytes())?;
    pairuni_data::atomic::write_atomic_bytes(
        args.out.join("ablation.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    print!("{md}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std_by_hand() {
        let (m, s) = mean_std(&[0.5, 0.7, 0.9]);
        assert!((m - 0.7).abs() < 1e-12);
        assert!((s - 0.2).abs() < 1e-12);
        let (m, s) = mean_std(&[0.25, f64::NAN]);
        assert_eq!((m, s), (0.25, 0.0));
        assert!(mean_std(&[]).0.is_nan());
    }

    #[test]
    fn every_variant_changes_exactly_what_its_name_says() {
        let base = TrainConfig::default();
        let names: Vec<_> = variants().iter().map(|v| v.name).collect();
        assert_eq!(names.len(), 7);
        for v in variants() {
            let mut cfg = base.clone();
            (v.apply)(&mut cfg);
            let changed = (cfg.pairing != base.pairing) as u8
                + (cfg.subset != base.subset) as u8
                + (cfg.pair_weight != base.pair_weight) as u8;
            assert_eq!(
                changed,
                if v.name == "pairgrpo" { 0 } else { 1 },
                "{}",
                v.name
            );
        }
    }
}
