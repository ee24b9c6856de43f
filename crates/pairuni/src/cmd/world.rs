//! `pairuni world …` (generate, detect) and `pairuni bench world`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use pairuni_toyworld::config::WorldConfig;
use pairuni_toyworld::generate::{generate_world, Progress, WorldSummary};

/// Arguments of `pairuni world`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: WorldCommand,
}

#[derive(clap::Subcommand, Debug)]
enum WorldCommand {
    /// Write the toy world: understanding and generation pools plus toy-GenEval, toy-POPE and toy-MCQ.
    Generate(GenerateArgs),
    /// Print the detector's reading of images as JSON, one line per image.
    Detect(DetectArgs),
}

/// Arguments of `pairuni world generate`; flags override the `[world]` section of `--config`.
#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// TOML configuration; its `[world]` section gives the defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Seed of every random choice (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// Understanding pool size (default 10000).
    #[arg(long)]
    understanding: Option<usize>,
    /// Generation pool size (default 10000).
    #[arg(long)]
    generation: Option<usize>,
    /// Benchmark size: GenEval prompts, POPE questions per split, MCQ questions (default 600).
    #[arg(long)]
    bench: Option<usize>,
    /// Canvas side in pixels, at least 32 (default 32).
    #[arg(long)]
    size: Option<u32>,
}

/// Arguments of `pairuni world detect`.
#[derive(clap::Args, Debug)]
struct DetectArgs {
    /// Image files (PNG or JPEG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<WorldConfig> {
    let Some(path) = path else {
        return Ok(WorldConfig::default());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: crate::config::PairuniConfig =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(cfg.world)
}

/// Generates with a progress bar on stderr (hidden when stderr is not a terminal).
fn generate_with_bar(cfg: &WorldConfig, out: &Path) -> anyhow::Result<WorldSummary> {
    let bar: OnceLock<ProgressBar> = OnceLock::new();
    let progress = |p: Progress| {
        let bar = bar.get_or_init(|| {
            let b = ProgressBar::new(p.total);
            b.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} items ({per_sec})",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b
        });
        bar.set_position(bar.position().max(p.done));
    };
    let summary = generate_world(cfg, out, &progress)
        .with_context(|| format!("generating into {}", out.display()))?;
    if let Some(b) = bar.get() {
        b.finish_and_clear();
    }
    Ok(summary)
}

/// Runs `pairuni world`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        WorldCommand::Generate(a) => {
            let mut cfg = load_config(a.config.as_ref())?;
            cfg.seed = a.seed.unwrap_or(cfg.seed);
            cfg.understanding = a.understanding.unwrap_or(cfg.understanding);
            cfg.generation = a.generation.unwrap_or(cfg.generation);
            cfg.bench = a.bench.unwrap_or(cfg.bench);
            cfg.size = a.size.unwrap_or(cfg.size);
            let start = Instant::now();
            let s = generate_with_bar(&cfg, &a.out)?;
            println!(
                "wrote {}: {} understanding, {} generation, GenEval {} prompts, POPE {} images / {} questions per split, MCQ {} questions in {:.1}s",
                a.out.display(),
                s.understanding,
                s.generation,
                s.geneval,
                s.pope_images,
                s.pope_questions,
                s.mcq,
                start.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        WorldCommand::Detect(a) => {
            for path in &a.images {
                let img = image::open(path)
                    .with_context(|| format!("reading image {}", path.display()))?
                    .to_rgb8();
                let dets = pairuni_toyworld::detect(&img);
                let scene =
                    pairuni_toyworld::scene_from_detections(&dets, img.width(), img.height());
                let line = serde_json::json!({
                    "image": path.display().to_string(),
                    "width": img.width(),
                    "height": img.height(),
                    "detections": dets,
                    "scene": pairuni_toyworld::text::caption(&scene, None),
                });
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Arguments of `pairuni bench world`: time writing a default-sized world.
#[derive(clap::Args, Debug)]
pub struct BenchWorldArgs {
    /// Understanding samples.
    #[arg(long, default_value_t = 10_000)]
    understanding: usize,
    /// Generation samples.
    #[arg(long, default_value_t = 10_000)]
    generation: usize,
    /// Benchmark size (GenEval prompts, POPE questions per split, MCQ questions).
    #[arg(long, default_value_t = 600)]
    bench: usize,
    /// Canvas side in pixels.
    #[arg(long, default_value_t = 32)]
    size: u32,
    /// Output folder (default: a fresh folder under the system temp dir, removed afterwards).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `pairuni bench world`: generates once and prints wall time and throughput.
pub fn run_bench_world(args: BenchWorldArgs) -> anyhow::Result<ExitCode> {
    let cfg = WorldConfig {
        understanding: args.understanding,
        generation: args.generation,
        bench: args.bench,
        size: args.size,
        ..WorldConfig::default()
    };
    let temp = args.out.is_none();
    let out = args.out.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pairuni-bench-world-{}", std::process::id()))
    });
    let start = Instant::now();
    let s = generate_with_bar(&cfg, &out)?;
    let secs = start.elapsed().as_secs_f64();
    let items = s.understanding + s.generation + s.geneval + s.pope_images + s.mcq;
    println!(
        "bench world: {} understanding + {} generation + {} benchmark items at {} px in {secs:.2}s ({:.0} items/s, {} rayon threads)",
        s.understanding,
        s.generation,
        s.geneval + s.pope_images + s.mcq,
        cfg.size,
        items as f64 / secs,
        pairuni_toyworld::generate::worker_threads()
    );
    if temp {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
