//! Held-out evaluation during `pairuni sft` and `pairuni train` (`eval_every`, `eval_bench`): the benchmarks of a
//! folder, run with the `[eval]` recipe through `pairuni_runner` as `pairuni eval` runs them, each evaluation's
//! full output in the run's `eval/step-NNNNNN/` and its numbers, flattened, in the run's `eval.jsonl`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use pairuni_eval::config::EvalConfig;
use pairuni_model::Janus;
use pairuni_rl::{EvalHook, RunEvaluator};
use serde_json::{Map, Value};

/// Runs the benchmarks of one folder on the model of a run.
struct BenchEvaluator {
    bench: PathBuf,
    recipe: EvalConfig,
    run_dir: PathBuf,
    started_from: Option<PathBuf>,
}

impl RunEvaluator for BenchEvaluator {
    fn evaluate(
        &self,
        model: &Janus,
        step: usize,
        out_dir: &Path,
    ) -> Result<Map<String, Value>, String> {
        // How `metrics.json` and `results.md` name the model.
        let mut name = format!("{} after step {step}", self.run_dir.display());
        if let Some(init) = &self.started_from {
            name.push_str(&format!(" (started from {})", init.display()));
        }
        let report = pairuni_runner::evaluate_named(
            model,
            &name,
            &self.bench,
            out_dir,
            &self.recipe,
            &mut pairuni_runner::NoProgress,
        )
        .map_err(|e| e.to_string())?;
        let value = serde_json::to_value(&report).map_err(|e| e.to_string())?;
        Ok(eval_line(&value))
    }
}

/// The numbers of a runner report as one `eval.jsonl` line: every score under its dotted `metrics.json` key
/// (`mcq.overall.accuracy`, `pope.overall.f1`, `geneval.scores.overall`, …), without the recipe and seeds, which
/// are the same on every line (`config.toml` has them).
fn eval_line(report: &Value) -> Map<String, Value> {
    crate::report::flatten_numbers(report)
        .into_iter()
        .filter(|(key, _)| !key.starts_with("recipe.") && !key.ends_with(".seed"))
        .map(|(key, value)| (key, Value::from(value)))
        .collect()
}

/// The evaluator of a run whose `[section]` asks for one (`eval_every` > 0), checked before training starts: the
/// benchmark folder must hold a benchmark and the recipe must be valid, so that a typo fails now and not after
/// the first `eval_every` steps.
fn evaluator(
    section: &str,
    eval_every: usize,
    eval_bench: Option<&Path>,
    recipe: &EvalConfig,
    run_dir: &Path,
    started_from: Option<&Path>,
) -> anyhow::Result<Option<EvalHook>> {
    if eval_every == 0 {
        return Ok(None);
    }
    let Some(bench) = eval_bench else {
        anyhow::bail!(
            "`{section}.eval_every` = {eval_every} needs `{section}.eval_bench`: a benchmark folder, as \
             `pairuni eval --bench` takes (or set `--eval-bench`)"
        );
    };
    pairuni_runner::bench::discover(bench)
        .with_context(|| format!("`{section}.eval_bench` = {}", bench.display()))?;
    recipe
        .validate()
        .map_err(|e| anyhow::anyhow!("{e} (the recipe of `{section}.eval_every`)"))?;
    Ok(Some(EvalHook(Arc::new(BenchEvaluator {
        bench: bench.to_path_buf(),
        recipe: recipe.clone(),
        run_dir: run_dir.to_path_buf(),
        started_from: started_from.map(Path::to_path_buf),
    }))))
}

/// The evaluator `[sft]` asks for, checked before training starts (as `evaluator` says).
pub fn for_sft(cfg: &crate::config::PairuniConfig) -> anyhow::Result<Option<EvalHook>> {
    let sft = &cfg.sft;
    evaluator(
        "sft",
        sft.eval_every,
        sft.eval_bench.as_deref(),
        &cfg.eval,
        &sft.out_dir,
        sft.init.as_deref(),
    )
}

/// The evaluator `[train]` asks for, checked before training starts (as `evaluator` says).
pub fn for_train(cfg: &crate::config::PairuniConfig) -> anyhow::Result<Option<EvalHook>> {
    let train = &cfg.train;
    evaluator(
        "train",
        train.eval_every,
        train.eval_bench.as_deref(),
        &cfg.eval,
        &train.out_dir,
        Some(&train.init),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eval_line_keeps_the_scores_and_drops_recipe_and_seeds() {
        let report = serde_json::json!({
            "model": "m",
            "recipe": { "seed": 3, "cfg_weight": 5.0 },
            "mcq": { "seed": 3, "overall": { "accuracy": 59.0, "total": 200 } },
            "pope": { "overall": { "f1": 66.5 } },
            "geneval": { "scores": { "overall": 0.25 } },
            "files": ["predictions/mcq.jsonl"],
        });
        let line = eval_line(&report);
        let keys: Vec<&str> = line.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "geneval.scores.overall",
                "mcq.overall.accuracy",
                "mcq.overall.total",
                "pope.overall.f1"
            ]
        );
        assert_eq!(line["mcq.overall.accuracy"], 59.0);
    }

    #[test]
    fn evaluations_need_a_folder_with_a_benchmark() {
        let recipe = EvalConfig::default();
        let run = Path::new("run");
        assert!(evaluator("train", 0, None, &recipe, run, None)
            .unwrap()
            .is_none());
        let err = evaluator("train", 5, None, &recipe, run, None).unwrap_err();
        assert!(format!("{err:#}").contains("`train.eval_bench`"), "{err:#}");
        let empty = tempfile::tempdir().unwrap();
        let err = evaluator("sft", 5, Some(empty.path()), &recipe, run, None).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("`sft.eval_bench`") && text.contains("no benchmark found"),
            "{text}"
        );
    }
}
