//! `pairuni pairs …` (build, stats) and `pairuni bench retrieval`.

use anyhow::Context;
use pairuni_pairs::ann::ApproxParams;
use pairuni_pairs::bench::{run_retrieval_bench, RetrievalBenchParams};
use pairuni_pairs::config::{AnnIndexKind, PairsConfig};
use pairuni_pairs::setup::{encoder_from_config, teacher_from_config};
use pairuni_pairs::stats::{pair_stats, render_text};
use pairuni_pairs::{build_and_write, BuildPaths};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `pairuni pairs`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: PairsCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PairsCommand {
    /// Complete, cluster and retrieve: write a PairUG JSONL plus <stem>.stats.json and <stem>.similarity.png.
    Build(BuildArgs),
    /// Print counts by kind and tag and the similarity distribution of any PairUG file (official ones too).
    Stats(StatsArgs),
}

/// Arguments of `pairuni pairs build`.
#[derive(clap::Args, Debug)]
struct BuildArgs {
    /// Understanding pool JSONL.
    #[arg(long)]
    understanding: PathBuf,
    /// Generation pool JSONL.
    #[arg(long)]
    generation: PathBuf,
    /// Output PairUG JSONL.
    #[arg(long)]
    out: PathBuf,
    /// TOML configuration; its `[pairs]` section is used (defaults otherwise).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Arguments of `pairuni pairs stats`.
#[derive(clap::Args, Debug)]
struct StatsArgs {
    /// A PairUG JSONL file.
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Reads the `[pairs]` section of a pairuni TOML file.
fn load_config(path: Option<&PathBuf>) -> anyhow::Result<PairsConfig> {
    let Some(path) = path else {
        return Ok(PairsConfig::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: crate::config::PairuniConfig =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(cfg.pairs)
}

/// Runs `pairuni pairs`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        PairsCommand::Build(a) => {
            let cfg = load_config(a.config.as_ref())?;
            let paths = BuildPaths {
                understanding: a.understanding,
                generation: a.generation,
                out: a.out,
            };
            let teacher = teacher_from_config(&cfg, &paths)?;
            let encoder = encoder_from_config(&cfg.encoder)?;
            let out = build_and_write(
                &cfg,
                teacher.as_ref(),
                encoder.as_ref(),
                &paths,
                std::io::stderr().is_terminal(),
            )?;
            print!("{}", render_text(&out.stats.pairs));
            println!(
                "rejected samples: {} {:?}",
                out.stats.rejections.len(),
                out.stats.rejections_by_reason
            );
            println!(
                "wrote {}, {}, {}",
                paths.out.display(),
                paths.stats_path().display(),
                paths.histogram_path().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        PairsCommand::Stats(a) => {
            let pairs = pairuni_data::jsonl::read_pairs(&a.file)?;
            let s = pair_stats(&pairs);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", render_text(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Arguments of `pairuni bench retrieval`.
///
/// The approximate path takes its settings from the `[pairs.ann]` section of `--config` (defaults without
/// one), so the benchmark measures what `pairs build` would run; the flags below override single keys.
#[derive(clap::Args, Debug)]
pub struct BenchRetrievalArgs {
    /// Understanding rows (the database).
    #[arg(long, default_value_t = 50_000)]
    n: usize,
    /// Generation rows (queries); default = n.
    #[arg(long)]
    queries: Option<usize>,
    /// Feature dimension.
    #[arg(long, default_value_t = 2048)]
    dim: usize,
    /// Rows per synthetic cluster.
    #[arg(long, default_value_t = 50)]
    cluster_size: usize,
    /// TOML configuration whose `[pairs.ann]` section sets the approximate path (defaults otherwise).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Skip the approximate path.
    #[arg(long)]
    no_ann: bool,
    /// Index over the reduced rows: `ivf` or `hnsw` (ann.index).
    #[arg(long, value_parser = ["ivf", "hnsw"])]
    index: Option<String>,
    /// PCA output dimension (ann.reduce_dim).
    #[arg(long)]
    reduce_dim: Option<usize>,
    /// Candidates re-scored exactly per query (ann.rerank).
    #[arg(long)]
    rerank: Option<usize>,
    /// Rows sampled to fit the PCA (ann.pca_sample).
    #[arg(long)]
    pca_sample: Option<usize>,
    /// IVF lists (ann.lists; default 4·√n).
    #[arg(long)]
    lists: Option<usize>,
    /// IVF lists probed per query (ann.probes).
    #[arg(long)]
    probes: Option<usize>,
    /// HNSW links per node (ann.max_connections).
    #[arg(long)]
    max_connections: Option<usize>,
    /// HNSW build width (ann.ef_construction).
    #[arg(long)]
    ef_construction: Option<usize>,
    /// HNSW search width (ann.ef_search).
    #[arg(long)]
    ef_search: Option<usize>,
    /// Seed of the synthetic data and of the approximate index.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs `pairuni bench retrieval` and prints a JSON report.
pub fn run_bench_retrieval(a: BenchRetrievalArgs) -> anyhow::Result<ExitCode> {
    let mut ann = load_config(a.config.as_ref())?.ann;
    if let Some(v) = &a.index {
        ann.index = if v == "hnsw" {
            AnnIndexKind::Hnsw
        } else {
            AnnIndexKind::Ivf
        };
    }
    let set = |dst: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *dst = v;
        }
    };
    set(&mut ann.reduce_dim, a.reduce_dim);
    set(&mut ann.rerank, a.rerank);
    set(&mut ann.pca_sample, a.pca_sample);
    set(&mut ann.probes, a.probes);
    set(&mut ann.max_connections, a.max_connections);
    set(&mut ann.ef_construction, a.ef_construction);
    set(&mut ann.ef_search, a.ef_search);
    if a.lists.is_some() {
        ann.lists = a.lists;
    }
    let p = RetrievalBenchParams {
        n: a.n,
        queries: a.queries.unwrap_or(a.n),
        dim: a.dim,
        cluster_size: a.cluster_size,
        seed: a.seed,
        ann: (!a.no_ann).then(|| ApproxParams::from_config(&ann, a.seed)),
        delta: 0.6,
    };
    let r = run_retrieval_bench(&p, &|stage| tracing::info!("{stage}"))?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(ExitCode::SUCCESS)
}
