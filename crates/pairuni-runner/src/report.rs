//! `results.md`: one markdown table, the sampling recipe on every row.

use std::fmt::Write;

use crate::EvalReport;

/// Recipe columns of a text-benchmark row.
fn text_recipe(r: &EvalReport) -> String {
    let c = &r.recipe;
    let decoding = if c.greedy_text() {
        "greedy (T=0)".to_owned()
    } else {
        format!("T={} top-p={}", c.text_temperature, c.top_p)
    };
    format!("{} | {} | {} | — | —", c.seed, decoding, c.max_new_tokens)
}

/// Recipe columns of an image-benchmark row.
fn image_recipe(r: &EvalReport) -> String {
    let c = &r.recipe;
    format!(
        "{} | T={} top-p={} | — | {} | {}",
        c.seed, c.image_temperature, c.top_p, c.cfg_weight, c.images_per_prompt
    )
}

/// Renders the report as a markdown document with one row per number.
pub fn markdown(r: &EvalReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Evaluation results\n");
    let _ = writeln!(s, "Model: `{}`  ", r.model);
    let _ = writeln!(s, "Benchmarks: `{}`\n", r.bench_dir.display());
    let _ = writeln!(
        s,
        "| Benchmark | Metric | Value | Parsing / scoring rule | Seed | Decoding | Max new tokens | CFG weight | Images per prompt |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    let mut row = |bench: &str, metric: &str, value: String, rule: &str, recipe: &str| {
        let _ = writeln!(s, "| {bench} | {metric} | {value} | {rule} | {recipe} |");
    };
    if let Some(m) = &r.mcq {
        let t = text_recipe(r);
        let rule = m.rule.name();
        row(
            "MCQ",
            "accuracy % (overall)",
            format!(
                "{:.2} ({}/{})",
                m.overall.accuracy, m.overall.correct, m.overall.total
            ),
            rule,
            &t,
        );
        for (cat, a) in &m.categories {
            row(
                "MCQ",
                &format!("accuracy % ({cat})"),
                format!("{:.2} ({}/{})", a.accuracy, a.correct, a.total),
                rule,
                &t,
            );
        }
        if m.random_fallbacks > 0 {
            row(
                "MCQ",
                "random fallbacks",
                m.random_fallbacks.to_string(),
                rule,
                &t,
            );
        }
    }
    if let Some(m) = &r.pope {
        let t = text_recipe(r);
        let rule = m.rule.name();
        let mut emit = |name: &str, p: &pairuni_eval::pope::PopeScores| {
            row(
                "POPE",
                &format!("accuracy % ({name})"),
                format!("{:.2}", p.accuracy),
                rule,
                &t,
            );
            row(
                "POPE",
                &format!("precision % ({name})"),
                format!("{:.2}", p.precision),
                rule,
                &t,
            );
            row(
                "POPE",
                &format!("recall % ({name})"),
                format!("{:.2}", p.recall),
                rule,
                &t,
            );
            row(
                "POPE",
                &format!("F1 % ({name})"),
                format!("{:.2}", p.f1),
                rule,
                &t,
            );
            row(
                "POPE",
                &format!("yes-ratio % ({name})"),
                format!("{:.2}", p.yes_ratio),
                rule,
                &t,
            );
        };
        for (name, p) in &m.splits {
            emit(name, p);
        }
        emit("all splits pooled", &m.overall);
        row(
            "POPE",
            "F1 % (mean over splits)",
            format!("{:.2}", m.mean_over_splits.f1),
            rule,
            &t,
        );
        row(
            "POPE",
            "accuracy % (mean over splits)",
            format!("{:.2}", m.mean_over_splits.accuracy),
            rule,
            &t,
        );
    }
    if let Some(m) = &r.mme {
        let t = text_recipe(r);
        let rule = "lmms-eval";
        row(
            "MME",
            "Perception (sum of subtask scores)",
            format!("{:.2}", m.perception),
            rule,
            &t,
        );
        row(
            "MME",
            "Cognition (sum of subtask scores)",
            format!("{:.2}", m.cognition),
            rule,
            &t,
        );
        for (cat, st) in &m.subtasks {
            row(
                "MME",
                &format!("{cat}: acc + acc+"),
                format!(
                    "{:.2} ({:.2} + {:.2})",
                    st.score, st.accuracy, st.accuracy_plus
                ),
                rule,
                &t,
            );
        }
    }
    if let Some(g) = &r.geneval {
        let t = image_recipe(r);
        for (metric, value) in g.rows() {
            row("GenEval", &metric, value, &g.scorer, &t);
        }
    }
    s
}
