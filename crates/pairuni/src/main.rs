//! The `pairuni` command line: argument parsing and presentation only; the work lives in the library crates.

// serde_json's `json!` recurses once per key: `bench gpu-step`'s report has more keys than the default allows.
#![recursion_limit = "256"]

mod cmd;
mod config;
mod held_out;
mod pipeline;
mod report;

use clap::{Parser, Subcommand};

/// Pair-aware RL post-training (PairUni / PairGRPO) for unified vision-language models.
#[derive(Parser, Debug)]
#[command(name = "pairuni", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `pairuni_rl=debug`.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The main job: toy world → pairs → SFT → PairGRPO → evaluation → report.html, resumable.
    Demo(cmd::demo::Args),
    /// The paper's ablations in miniature (same budget, several seeds): a table of held-out scores.
    Ablate(cmd::ablate::Args),
    /// Write report.html (charts, benchmark table, sample grids, pair examples) for a run folder.
    Report(cmd::report::Args),
    /// Check pool and PairUG JSONL files: every bad line, field and image, with counts.
    Data(cmd::data::Args),
    /// Inspect configuration files.
    Config(cmd::config::Args),
    /// Build PairUG pairs (teacher, features, K-means, retrieval) and inspect pair files.
    Pairs(cmd::pairs::Args),
    /// The toy world: generate pools and benchmarks, read images with its detector.
    World(cmd::world::Args),
    /// Raw model outputs as JSON (text logits, generation-head logits, decoded pixels).
    Model(cmd::model::Args),
    /// Run a model over benchmark folders (`--model --bench`), or score predictions (`eval score`).
    Eval(cmd::eval::Args),
    /// Supervised warm-up of the toy model (or of `sft.init`): answers, captions and image codes.
    Sft(cmd::train::Args),
    /// PairGRPO from `train.init` (baselines by config: pairing, subset, pair weight).
    Train(cmd::train::Args),
    /// Benchmarks (speed targets are measured here, never in tests).
    Bench(BenchArgs),
}

/// Arguments of `pairuni bench`.
#[derive(clap::Args, Debug)]
struct BenchArgs {
    #[command(subcommand)]
    which: Bench,
}

/// The benchmarks.
#[derive(Subcommand, Debug)]
enum Bench {
    /// PairGRPO steps with the `[train]` config (CPU by default): time breakdown and tokens/s as JSON.
    Step(cmd::train::BenchStepArgs),
    /// One PairGRPO step (rollouts, VQ decode, train) on a device at Janus-Pro-1B shapes, with a time breakdown.
    GpuStep(cmd::gpu::BenchGpuStepArgs),
    /// The committed Janus fixture checkpoint on a device in f32 and bf16 vs its reference outputs.
    GpuParity(cmd::gpu::BenchGpuParityArgs),
    /// Compile the hand-written CUDA kernels with NVRTC as their first launches would (CUDA builds; no GPU needed).
    GpuKernels(cmd::gpu::BenchGpuKernelsArgs),
    /// Exact (blocked GEMM) and approximate (PCA → IVF or HNSW → exact re-rank) retrieval time and recall@1.
    Retrieval(cmd::pairs::BenchRetrievalArgs),
    /// Text and CFG image decode tokens/s over batch sizes (toy; Janus-Pro-1B shapes with --big).
    Decode(cmd::model::BenchDecodeArgs),
    /// Time writing the toy world (10,000 + 10,000 samples and the benchmarks by default).
    World(cmd::world::BenchWorldArgs),
}

fn main() -> std::process::ExitCode {
    pairuni_rl::passes::prepare_cpu_process();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Ablate(args) => cmd::ablate::run(args),
        Command::Report(args) => cmd::report::run(args),
        Command::Data(args) => cmd::data::run(args),
        Command::Config(args) => cmd::config::run(args),
        Command::Pairs(args) => cmd::pairs::run(args),
        Command::World(args) => cmd::world::run(args),
        Command::Model(args) => cmd::model::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Sft(args) => cmd::train::run_sft(args),
        Command::Train(args) => cmd::train::run(args),
        Command::Bench(b) => match b.which {
            Bench::Step(a) => cmd::train::run_bench_step(a),
            Bench::GpuStep(a) => cmd::gpu::run_bench_gpu_step(a),
            Bench::GpuParity(a) => cmd::gpu::run_bench_gpu_parity(a),
            Bench::GpuKernels(a) => cmd::gpu::run_bench_gpu_kernels(a),
            Bench::Retrieval(a) => cmd::pairs::run_bench_retrieval(a),
            Bench::World(a) => cmd::world::run_bench_world(a),
            Bench::Decode(a) => cmd::model::run_bench_decode(a),
        },
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message before it already
/// ends with (the library errors name their file and quote their I/O cause in one line).
fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[test]
    fn error_chain_keeps_context_and_drops_a_cause_already_quoted() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let data = pairuni_data::DataError::io("/x.jsonl", io);
        let err = anyhow::Error::new(data).context("reading pairs");
        assert_eq!(error_chain(&err), "reading pairs: /x.jsonl: No such file");
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&plain), "outer: inner");
    }
}
