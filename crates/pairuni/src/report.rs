//! The run report: one self-contained `report.html` (PNG charts and images inlined as data URLs) for a run folder.
//!
//! The report reads what the stages left on disk and never re-runs anything, so it works on a finished demo, a
//! run in progress, or a single `pairuni train` folder. It looks for, relative to the run folder:
//! `sft/metrics.jsonl`, `train/metrics.jsonl` (or `metrics.jsonl` at the top), `eval/<label>/metrics.json`
//! (the SFT checkpoint is labelled `sft`, the final one `final`), PNG grids under `eval/<label>/`, the
//! multiple-choice predictions under `eval/<label>/`, and `pairs/pairs.jsonl` with the world's images.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine as _;
use plotters::prelude::*;
use serde_json::Value;

/// Where the report was written and what it found.
#[derive(Debug)]
pub struct ReportSummary {
    /// The HTML file.
    pub html: PathBuf,
    /// Number of charts drawn.
    pub charts: usize,
    /// Number of sample images inlined.
    pub images: usize,
}

/// Points of one metric over steps.
type Series = Vec<(f64, f64)>;

/// Reads a metrics.jsonl file into metric name → (step, value) points; non-numeric fields are skipped.
pub fn read_metric_series(path: &Path) -> Result<BTreeMap<String, Series>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut series: BTreeMap<String, Series> = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON object", path.display(), index + 1))?;
        let Some(object) = record.as_object() else {
            anyhow::bail!("{}:{}: expected a JSON object", path.display(), index + 1);
        };
        let step = object
            .get("step")
            .and_then(Value::as_f64)
            .unwrap_or(index as f64);
        for (key, value) in object {
            if key == "step" {
                continue;
            }
            if let Some(number) = value.as_f64() {
                if number.is_finite() {
                    series.entry(key.clone()).or_default().push((step, number));
                }
            }
        }
    }
    Ok(series)
}

/// Flattens the numeric leaves of a JSON value into dotted keys (`mcq.overall`, `pope.random.f1`, …).
pub fn flatten_numbers(value: &Value) -> BTreeMap<String, f64> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, f64>) {
        match value {
            Value::Number(number) => {
                if let Some(x) = number.as_f64() {
                    out.insert(prefix.to_string(), x);
                }
            }
            Value::Object(map) => {
                for (key, child) in map {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&name, child, out);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, &mut out);
    out
}

/// Registers a system font for chart text once; returns whether text can be drawn.
fn chart_font_available() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        const CANDIDATES: [&str; 3] = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
        ];
        for candidate in CANDIDATES {
            if let Ok(bytes) = std::fs::read(candidate) {
                // plotters keeps fonts for the life of the process, so the bytes must be 'static.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!(
            "no DejaVuSans.ttf found: charts are drawn without text (install fonts-dejavu-core)"
        );
        false
    })
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws a line chart of several series to a PNG file.
pub fn line_chart(path: &Path, title: &str, series: &[(&str, &Series)]) -> Result<()> {
    let with_text = chart_font_available();
    let points = series.iter().flat_map(|(_, s)| s.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if x_min > x_max {
        anyhow::bail!("chart {title}: no points");
    }
    if x_max - x_min < 1e-12 {
        x_max = x_min + 1.0;
    }
    // A constant series (a fixed learning rate) still needs a visible range around its value.
    let span = y_max - y_min;
    let pad = if span > 1e-12 * y_max.abs().max(1.0) {
        span * 0.05
    } else if y_max.abs() > 0.0 {
        y_max.abs() * 0.5
    } else {
        1.0
    };
    let (y_lo, y_hi) = (y_min - pad, y_max + pad);
    // Enough decimals that ten ticks across the range print as different numbers.
    let decimals = (-((y_hi - y_lo) / 10.0).log10()).ceil().clamp(0.0, 8.0) as usize;
    let y_label = move |y: &f64| format!("{y:.decimals$}");
    {
        let root = BitMapBackend::new(path, (560, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(10);
        if with_text {
            builder
                .caption(title, ("sans-serif", 18))
                .x_label_area_size(28)
                .y_label_area_size(56);
        }
        let mut chart = builder
            .build_cartesian_2d(x_min..x_max, y_lo..y_hi)
            .map_err(plot_err)?;
        if with_text {
            chart
                .configure_mesh()
                .x_desc("step")
                .y_label_formatter(&y_label)
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(plot_err)?;
        } else {
            chart
                .configure_mesh()
                .disable_x_mesh()
                .disable_y_mesh()
                .draw()
                .map_err(plot_err)?;
        }
        for (index, (name, points)) in series.iter().enumerate() {
            let colour = PALETTE[index % PALETTE.len()];
            let drawn = chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(plot_err)?;
            if with_text {
                drawn
                    .label(name.to_string())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
            }
            // A sparse series (evaluations every N steps) marks its points, which are all there is of it.
            if points.len() <= 40 {
                chart
                    .draw_series(
                        points
                            .iter()
                            .map(|&(x, y)| Circle::new((x, y), 3, colour.filled())),
                    )
                    .map_err(plot_err)?;
            }
        }
        if with_text && series.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(())
}

/// The held-out headlines as a table, one row per evaluated step (a blank where a number is missing).
fn held_out_table(html: &mut String, drawn: &[(&str, &str, &Series)]) {
    let steps: std::collections::BTreeSet<u64> = drawn
        .iter()
        .flat_map(|(_, _, points)| points.iter().map(|&(step, _)| step as u64))
        .collect();
    html.push_str("<table><tr><th>step</th>");
    for (key, _, _) in drawn {
        let _ = write!(html, "<th>{}</th>", escape(key));
    }
    html.push_str("</tr>");
    for step in steps {
        let _ = write!(html, "<tr><td>{step}</td>");
        for (_, _, points) in drawn {
            match points.iter().find(|&&(s, _)| s as u64 == step) {
                Some(&(_, value)) => {
                    let _ = write!(html, "<td>{value:.4}</td>");
                }
                None => html.push_str("<td></td>"),
            }
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
}

/// Draws a line chart to `file` and appends it to `html` as an inlined image.
fn inline_chart(
    html: &mut String,
    file: &Path,
    title: &str,
    series: &[(&str, &Series)],
) -> Result<()> {
    line_chart(file, title, series)?;
    let _ = write!(
        html,
        "<img src=\"{}\" alt=\"{}\" title=\"{}\">",
        data_url_png(file)?,
        escape(title),
        escape(title)
    );
    Ok(())
}

fn plot_err<E: std::fmt::Display>(err: E) -> anyhow::Error {
    anyhow::anyhow!("drawing chart: {err}")
}

fn data_url_png(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn png_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| path.extension().is_some_and(|ext| ext == "png"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Reads the eval metrics of each label (`eval/<label>/metrics.json`), flattened.
fn read_eval_metrics(run: &Path) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
    let mut out = BTreeMap::new();
    let eval_dir = run.join("eval");
    let Ok(entries) = std::fs::read_dir(&eval_dir) else {
        return Ok(out);
    };
    for entry in entries.flatten() {
        let metrics = entry.path().join("metrics.json");
        if metrics.is_file() {
            let text = std::fs::read_to_string(&metrics)
                .with_context(|| format!("reading {}", metrics.display()))?;
            let value: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", metrics.display()))?;
            out.insert(
                entry.file_name().to_string_lossy().into_owned(),
                flatten_numbers(&value),
            );
        }
    }
    Ok(out)
}

/// The SFT → final toy-MCQ comparison, judged with the rule and seed the final evaluation recorded.
fn mcq_change(run: &Path) -> Result<Option<pairuni_eval::paired::PairedChange>> {
    let (before, after) = (run.join("eval/sft"), run.join("eval/final"));
    let metrics_path = after.join("metrics.json");
    let Ok(text) = std::fs::read_to_string(&metrics_path) else {
        return Ok(None);
    };
    let metrics: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", metrics_path.display()))?;
    let (Some(bench), Some(mcq)) = (metrics["bench_dir"].as_str(), metrics.get("mcq")) else {
        return Ok(None);
    };
    if mcq.is_null() {
        return Ok(None);
    }
    let rule: pairuni_eval::mcq::ChoiceRule = serde_json::from_value(mcq["rule"].clone())
        .with_context(|| format!("{}: mcq.rule", metrics_path.display()))?;
    let seed = mcq["seed"]
        .as_u64()
        .with_context(|| format!("{}: mcq.seed is not a seed", metrics_path.display()))?;
    crate::pipeline::compare_mcq_files(
        &Path::new(bench).join("mcq/questions.jsonl"),
        &before,
        &after,
        rule,
        seed,
    )
}

/// The held-out numbers charted over training steps (`eval.jsonl` keys) and their chart titles.
const HELD_OUT_HEADLINES: [(&str, &str); 5] = [
    (
        "mcq.overall.accuracy",
        "held-out multiple-choice accuracy (%)",
    ),
    ("pope.overall.f1", "held-out POPE F1 (%)"),
    ("mme.perception", "held-out MME perception"),
    ("mme.cognition", "held-out MME cognition"),
    ("geneval.scores.overall", "held-out GenEval overall"),
];

/// Metric keys worth a chart of their own; rewards go together in one chart.
fn chart_groups(series: &BTreeMap<String, Series>) -> Vec<(String, Vec<String>)> {
    let mut groups = Vec::new();
    let rewards: Vec<String> = ["reward", "reward/und", "reward/gen"]
        .iter()
        .filter(|k| series.contains_key(**k))
        .map(|k| k.to_string())
        .collect();
    if !rewards.is_empty() {
        groups.push(("reward per task".to_string(), rewards.clone()));
    }
    for key in series.keys() {
        if rewards.contains(key) || key.starts_with("time/") && key != "time/step" {
            continue;
        }
        groups.push((key.clone(), vec![key.clone()]));
    }
    groups
}

fn benchmark_table(html: &mut String, evals: &BTreeMap<String, BTreeMap<String, f64>>) {
    if evals.is_empty() {
        html.push_str("<p>No evaluation results found under <code>eval/</code>.</p>");
        return;
    }
    // Preferred order: the SFT checkpoint first, the final one last, anything else between.
    let mut labels: Vec<&String> = evals.keys().collect();
    labels.sort_by_key(|l| match l.as_str() {
        "sft" => 0,
        "final" => 2,
        _ => 1,
    });
    // Scores only: counts, sizes and the recipe (shown beside, from results.md) would bury them.
    const SCORE_SUFFIXES: [&str; 9] = [
        "accuracy",
        "f1",
        "precision",
        "recall",
        "yes_ratio",
        "overall",
        "overall_dense",
        "score",
        "dense",
    ];
    let is_score = |key: &str| {
        !key.starts_with("recipe.")
            && !key.contains(".counts.")
            && SCORE_SUFFIXES
                .iter()
                .any(|suffix| key.rsplit('.').next() == Some(*suffix))
    };
    // Headline numbers first, then the rest alphabetically.
    let headline_rank = |key: &str| match key {
        "mcq.overall.accuracy" => 0,
        "pope.overall.f1" => 1,
        "geneval.scores.overall" => 2,
        _ => 3,
    };
    let mut keys: Vec<&String> = evals
        .values()
        .flat_map(|m| m.keys())
        .filter(|k| is_score(k))
        .collect();
    keys.sort_by(|a, b| headline_rank(a).cmp(&headline_rank(b)).then(a.cmp(b)));
    keys.dedup();
    let _ = write!(html, "<table><tr><th>metric</th>");
    for label in &labels {
        let _ = write!(html, "<th>{}</th>", escape(label));
    }
    let delta = labels.len() == 2;
    if delta {
        html.push_str("<th>Δ</th>");
    }
    html.push_str("</tr>");
    for key in keys {
        let _ = write!(html, "<tr><td>{}</td>", escape(key));
        let values: Vec<Option<f64>> = labels.iter().map(|l| evals[*l].get(key).copied()).collect();
        for value in &values {
            match value {
                Some(x) => {
                    let _ = write!(html, "<td>{x:.4}</td>");
                }
                None => html.push_str("<td>–</td>"),
            }
        }
        if delta {
            match (values[0], values[1]) {
                (Some(a), Some(b)) => {
                    let class = if b > a {
                        "up"
                    } else if b < a {
                        "down"
                    } else {
                        ""
                    };
                    let _ = write!(html, "<td class=\"{class}\">{:+.4}</td>", b - a);
                }
                _ => html.push_str("<td>–</td>"),
            }
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
}

/// Reads the runner's multiple-choice predictions of one checkpoint (`eval/<label>/predictions/mcq.jsonl`) as
/// (question id, raw output) in file order; an absent file is no predictions, a malformed one an error.
fn mcq_predictions(dir: &Path) -> Result<Vec<(String, String)>> {
    let path = dir.join("predictions").join("mcq.jsonl");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let rows = pairuni_data::jsonl::read_jsonl::<pairuni_eval::predictions::Prediction>(&path)?;
    Ok(rows
        .into_iter()
        .map(|p| (p.question_id, p.output))
        .collect())
}

fn answers_section(html: &mut String, run: &Path) -> Result<()> {
    let sft = mcq_predictions(&run.join("eval/sft"))?;
    let last: BTreeMap<String, String> = mcq_predictions(&run.join("eval/final"))?
        .into_iter()
        .collect();
    if sft.is_empty() && last.is_empty() {
        html.push_str("<p>No multiple-choice predictions found (<code>eval/&lt;label&gt;/predictions/mcq.jsonl</code>).</p>");
        return Ok(());
    }
    // The same reader the scorer uses, so the report shows exactly the gold it was scored against.
    let gold_path = run.join("world/bench/mcq/questions.jsonl");
    let gold: BTreeMap<String, (String, String)> = if gold_path.is_file() {
        pairuni_eval::mcq::read_mcq(&gold_path)?
            .questions
            .into_iter()
            .map(|q| (q.question_id, (q.question, q.answer.to_string())))
            .collect()
    } else {
        BTreeMap::new()
    };
    html.push_str(
        "<table><tr><th>question</th><th>gold</th><th>SFT answer</th><th>final answer</th></tr>",
    );
    for (id, sft_output) in sft.iter().take(12) {
        let (question, answer) = gold
            .get(id)
            .cloned()
            .unwrap_or_else(|| (id.clone(), String::new()));
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&question),
            escape(&answer),
            escape(sft_output),
            escape(last.get(id).map(String::as_str).unwrap_or("")),
        );
    }
    html.push_str("</table>");
    Ok(())
}

fn pairs_section(html: &mut String, run: &Path, images: &mut usize) -> Result<()> {
    let pairs_path = run.join("pairs/pairs.jsonl");
    if !pairs_path.is_file() {
        html.push_str("<p>No pairs file found at <code>pairs/pairs.jsonl</code>.</p>");
        return Ok(());
    }
    let records = pairuni_data::jsonl::read_pairs(&pairs_path)?;
    for kind in [
        pairuni_data::PairKind::Aligned,
        pairuni_data::PairKind::Retrieved,
    ] {
        let examples: Vec<_> = records
            .iter()
            .filter(|r| r.effective_kind() == kind)
            .take(3)
            .collect();
        let _ = write!(html, "<h3>{kind:?} pairs</h3>");
        if examples.is_empty() {
            html.push_str("<p>none</p>");
            continue;
        }
        html.push_str("<div class=\"pairs\">");
        for record in examples {
            let _ = write!(
                html,
                "<div class=\"pair\"><div class=\"sim\">similarity {:.3}</div>",
                record.similarity
            );
            for (side, ann) in [
                ("generate", &record.generate_ann),
                ("understand", &record.understand_ann),
            ] {
                let path = pairuni_data::image::resolve(&pairs_path, &ann.image_path);
                let img = data_url_png(&path)
                    .map(|url| {
                        *images += 1;
                        format!("<img class=\"px\" src=\"{url}\" alt=\"{side}\">")
                    })
                    .unwrap_or_else(|_| "<em>(image missing)</em>".to_string());
                let _ = write!(
                    html,
                    "<div class=\"side\"><b>{side}</b>{img}<p>{}</p><p><i>{}</i> → {}</p></div>",
                    escape(&ann.prompt),
                    escape(&ann.question),
                    escape(&ann.answer)
                );
            }
            html.push_str("</div>");
        }
        html.push_str("</div>");
    }
    Ok(())
}

/// Writes `RUN_DIR/report.html` (charts under `RUN_DIR/report/`).
pub fn write_report(run: &Path) -> Result<ReportSummary> {
    anyhow::ensure!(run.is_dir(), "{}: not a run folder", run.display());
    let chart_dir = run.join("report");
    std::fs::create_dir_all(&chart_dir)
        .with_context(|| format!("creating {}", chart_dir.display()))?;
    let mut html = String::new();
    let mut charts = 0;
    let mut images = 0;
    html.push_str(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>pairuni run report</title><style>\
body{font-family:sans-serif;margin:24px;max-width:1200px;color:#222}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}\
td.up{color:#176c17}td.down{color:#b00}.charts img{margin:4px;border:1px solid #eee}\
img.px{image-rendering:pixelated;width:96px;height:96px;display:block;margin:4px 0}\
.grid{display:flex;flex-wrap:wrap}.grid img{image-rendering:pixelated;width:256px;margin:4px;border:1px solid #ddd}.grid figure{margin:4px;width:264px;font-size:12px}\
.pairs{display:flex;flex-wrap:wrap;gap:12px}.pair{border:1px solid #ccc;padding:8px;display:flex;gap:8px;flex-wrap:wrap;max-width:560px}\
.side{width:250px;font-size:12px}.sim{width:100%;font-weight:bold}pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}\
</style></head><body>",
    );
    let _ = write!(
        html,
        "<h1>pairuni run report</h1><p>Run folder: <code>{}</code></p>",
        escape(&run.display().to_string())
    );

    html.push_str("<h2>Benchmarks: SFT checkpoint vs final</h2>");
    let evals = read_eval_metrics(run)?;
    benchmark_table(&mut html, &evals);
    if let Some(change) = mcq_change(run)? {
        let _ = write!(
            html,
            "<p>{}</p>",
            escape(&crate::cmd::demo::change_line(&change))
        );
    }
    for label in ["sft", "final"] {
        let recipe = run.join("eval").join(label).join("results.md");
        if let Ok(text) = std::fs::read_to_string(&recipe) {
            let _ = write!(html, "<details><summary>{label}: results.md (sampling recipe)</summary><pre>{}</pre></details>", escape(&text));
        }
    }

    for (stage, candidates) in [
        (
            "PairGRPO",
            vec![run.join("train/metrics.jsonl"), run.join("metrics.jsonl")],
        ),
        ("SFT", vec![run.join("sft/metrics.jsonl")]),
    ] {
        let Some(path) = candidates.into_iter().find(|p| p.is_file()) else {
            continue;
        };
        let series = read_metric_series(&path)?;
        let _ = write!(html, "<h2>{stage} metrics</h2><div class=\"charts\">");
        for (index, (title, keys)) in chart_groups(&series).into_iter().enumerate() {
            let lines: Vec<(&str, &Series)> = keys
                .iter()
                .filter_map(|k| series.get(k).map(|s| (k.as_str(), s)))
                .filter(|(_, s)| !s.is_empty())
                .collect();
            if lines.is_empty() {
                continue;
            }
            let file = chart_dir.join(format!("{}-{index:02}.png", stage.to_lowercase()));
            inline_chart(&mut html, &file, &title, &lines)?;
            charts += 1;
        }
        html.push_str("</div>");
    }

    for (stage, candidates) in [
        (
            "PairGRPO",
            vec![run.join("train/eval.jsonl"), run.join("eval.jsonl")],
        ),
        ("SFT", vec![run.join("sft/eval.jsonl")]),
    ] {
        let Some(path) = candidates.into_iter().find(|p| p.is_file()) else {
            continue;
        };
        let series = read_metric_series(&path)?;
        let drawn: Vec<(&str, &str, &Series)> = HELD_OUT_HEADLINES
            .iter()
            .filter_map(|(key, title)| series.get(*key).map(|s| (*key, *title, s)))
            .filter(|(_, _, s)| !s.is_empty())
            .collect();
        if drawn.is_empty() {
            continue;
        }
        let _ = write!(
            html,
            "<h2>Held-out benchmarks during {stage}</h2><p>Evaluations of the model as training went \
             (<code>eval_every</code>; every number in <code>{}</code>).</p><div class=\"charts\">",
            escape(&path.display().to_string())
        );
        for (index, (key, title, points)) in drawn.iter().enumerate() {
            let file = chart_dir.join(format!("held-out-{}-{index:02}.png", stage.to_lowercase()));
            inline_chart(&mut html, &file, title, &[(key, points)])?;
            charts += 1;
        }
        html.push_str("</div>");
        held_out_table(&mut html, &drawn);
    }

    html.push_str("<h2>Images drawn for fixed prompts</h2>");
    for label in ["sft", "final"] {
        // The runner writes one grid per GenEval prompt (`geneval/<index>/grid.png`); show the first few.
        let mut grids = png_files(&run.join("eval").join(label));
        if let Ok(entries) = std::fs::read_dir(run.join("eval").join(label).join("geneval")) {
            let mut prompt_dirs: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            prompt_dirs.sort();
            grids.extend(
                prompt_dirs
                    .iter()
                    .map(|d| d.join("grid.png"))
                    .filter(|g| g.is_file()),
            );
        }
        if grids.is_empty() {
            continue;
        }
        let _ = write!(html, "<h3>{label}</h3><div class=\"grid\">");
        for grid in grids.iter().take(6) {
            // The prompt sits beside its grid in the runner's layout (`metadata.jsonl`).
            let caption = grid
                .parent()
                .map(|d| d.join("metadata.jsonl"))
                .and_then(|m| std::fs::read_to_string(m).ok())
                .and_then(|t| serde_json::from_str::<Value>(t.lines().next().unwrap_or("")).ok())
                .and_then(|v| v.get("prompt").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| grid.display().to_string());
            let _ = write!(
                html,
                "<figure><img src=\"{}\"><figcaption>{}</figcaption></figure>",
                data_url_png(grid)?,
                escape(&caption)
            );
            images += 1;
        }
        html.push_str("</div>");
    }

    html.push_str("<h2>Answers to fixed questions</h2>");
    answers_section(&mut html, run)?;
    html.push_str("<h2>Pair examples</h2>");
    pairs_section(&mut html, run, &mut images)?;
    html.push_str("</body></html>");

    let out = run.join("report.html");
    pairuni_data::atomic::write_atomic_bytes(&out, html.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(ReportSummary {
        html: out,
        charts,
        images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn report_draws_a_chart_per_metric_group_and_tabulates_scores_only() {
        let run = tempfile::tempdir().unwrap();
        write(
            &run.path().join("train/metrics.jsonl"),
            "{\"step\":1,\"reward\":0.2,\"reward/und\":0.1,\"reward/gen\":0.3,\"learning_rate\":0.001}\n\
             {\"step\":2,\"reward\":0.4,\"reward/und\":0.3,\"reward/gen\":0.5,\"learning_rate\":0.001}\n",
        );
        write(
            &run.path().join("eval/sft/metrics.json"),
            r#"{"mcq":{"overall":{"accuracy":25.0,"total":8}}}"#,
        );
        write(
            &run.path().join("eval/final/metrics.json"),
            r#"{"mcq":{"overall":{"accuracy":37.5,"total":8}}}"#,
        );
        let summary = write_report(run.path()).unwrap();
        // One chart for the three reward series together, one for the learning rate.
        assert_eq!(summary.charts, 2);
        let html = std::fs::read_to_string(&summary.html).unwrap();
        assert!(
            html.contains("mcq.overall.accuracy") && html.contains("+12.5000"),
            "{html}"
        );
        assert!(
            !html.contains("mcq.overall.total"),
            "counts must not be tabulated"
        );
        assert!(
            html.contains("data:image/png;base64,"),
            "charts are inlined"
        );
    }

    #[test]
    fn report_charts_the_held_out_headlines_of_the_evaluations_during_training() {
        let run = tempfile::tempdir().unwrap();
        // A `pairuni train` run folder: eval.jsonl at its root, the MCQ and GenEval headlines, no POPE.
        write(
            &run.path().join("eval.jsonl"),
            "{\"step\":0,\"mcq.overall.accuracy\":25.0,\"mcq.overall.total\":8,\"geneval.scores.overall\":0.1,\"time/eval\":1.5}\n\
             {\"step\":10,\"mcq.overall.accuracy\":37.5,\"mcq.overall.total\":8,\"geneval.scores.overall\":0.2,\"time/eval\":1.4}\n",
        );
        let summary = write_report(run.path()).unwrap();
        assert_eq!(summary.charts, 2, "one chart per headline present");
        let html = std::fs::read_to_string(&summary.html).unwrap();
        assert!(
            html.contains("Held-out benchmarks during PairGRPO"),
            "{html}"
        );
        assert!(html.contains("held-out multiple-choice accuracy (%)"));
        assert!(html.contains("held-out GenEval overall"));
        assert!(
            !html.contains("held-out POPE F1"),
            "no POPE numbers, no POPE chart"
        );
        // And a table of the same numbers, one row per evaluated step.
        assert!(
            html.contains("<tr><td>10</td><td>37.5000</td><td>0.2000</td></tr>"),
            "{html}"
        );
        assert!(run.path().join("report/held-out-pairgrpo-01.png").is_file());
    }

    #[test]
    fn report_counts_the_mcq_answers_the_final_model_changed() {
        let run = tempfile::tempdir().unwrap();
        let bench = run.path().join("world/bench");
        let q = |id: &str, answer: &str| {
            format!(
                r#"{{"question_id":"{id}","question":"Which? A. x B. y","options":["x","y"],"answer":"{answer}","category":"c"}}"#
            )
        };
        write(
            &bench.join("mcq/questions.jsonl"),
            &[q("a", "A"), q("b", "B"), q("c", "A")].join("\n"),
        );
        let p = |id: &str, out: &str| format!(r#"{{"question_id":"{id}","output":"{out}"}}"#);
        write(
            &run.path().join("eval/sft/predictions/mcq.jsonl"),
            &[p("a", "B"), p("b", "A"), p("c", "A")].join("\n"),
        );
        write(
            &run.path().join("eval/final/predictions/mcq.jsonl"),
            &[p("a", "A"), p("b", "B"), p("c", "A")].join("\n"),
        );
        write(
            &run.path().join("eval/sft/metrics.json"),
            r#"{"mcq":{"overall":{"accuracy":33.3}}}"#,
        );
        let metrics = serde_json::json!({
            "bench_dir": bench.display().to_string(),
            "mcq": {"rule": "mm-star", "seed": 0, "overall": {"accuracy": 100.0}},
        });
        write(
            &run.path().join("eval/final/metrics.json"),
            &metrics.to_string(),
        );
        let html = std::fs::read_to_string(write_report(run.path()).unwrap().html).unwrap();
        // Two answers turned right, none wrong: P(X ≥ 2 | n = 2) = 1/4.
        assert!(
            html.contains("2 wrong → right, 0 right → wrong (one-sided sign test p = 0.250)"),
            "{html}"
        );
    }

    #[test]
    fn a_malformed_pairs_file_is_an_error_naming_file_and_line() {
        let run = tempfile::tempdir().unwrap();
        write(
            &run.path().join("pairs/pairs.jsonl"),
            "{\"similarity\": 1.0}\nnot json\n",
        );
        let err = format!("{:#}", write_report(run.path()).unwrap_err());
        assert!(err.contains("pairs.jsonl:1"), "{err}");
    }
}
