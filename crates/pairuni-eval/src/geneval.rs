//! GenEval: per-prompt requirements (`evaluation_metadata.jsonl`), the per-image verdict, and the scores.
//!
//! The rules follow GenEval's evaluator (METHOD.md §4). Detections below the confidence threshold (0.3; 0.9
//! for the counting task) are dropped, the rest grouped by class and sorted by confidence (at most
//! `max_objects` per class). Each include clause takes the `count` most confident objects of its class: there
//! must be that many, all of the required colour, and each must stand in the required relation to every
//! object of the referenced earlier clause (which must itself have matched). An exclude clause fails the image
//! when its class has at least `count` detections. An image is correct when every clause holds; the dense
//! variant (the RL reward) is the fraction of clauses that hold. A task's score is the mean over its images
//! and the overall score is the unweighted mean over the tasks present.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::detector::{Detection, Detector};
use crate::error::EvalError;

/// The six GenEval tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// One object.
    SingleObject,
    /// Two different objects.
    TwoObject,
    /// An exact number of one object.
    Counting,
    /// One object of a given colour.
    Colors,
    /// Two objects in a spatial relation.
    Position,
    /// Two objects with given colours.
    ColorAttr,
}

impl Task {
    /// All tasks in GenEval's order.
    pub const ALL: [Task; 6] = [
        Task::SingleObject,
        Task::TwoObject,
        Task::Counting,
        Task::Colors,
        Task::Position,
        Task::ColorAttr,
    ];

    /// The tag as written in the metadata.
    pub fn tag(self) -> &'static str {
        match self {
            Task::SingleObject => "single_object",
            Task::TwoObject => "two_object",
            Task::Counting => "counting",
            Task::Colors => "colors",
            Task::Position => "position",
            Task::ColorAttr => "color_attr",
        }
    }

    /// Parses a tag.
    pub fn from_tag(tag: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.tag() == tag)
    }
}

/// A relation of GenEval's position clauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Position {
    /// "left of".
    LeftOf,
    /// "right of".
    RightOf,
    /// "above".
    Above,
    /// "below".
    Below,
}

impl Position {
    /// The phrase in the metadata.
    pub fn phrase(self) -> &'static str {
        match self {
            Position::LeftOf => "left of",
            Position::RightOf => "right of",
            Position::Above => "above",
            Position::Below => "below",
        }
    }

    fn from_phrase(s: &str) -> Option<Position> {
        [
            Position::LeftOf,
            Position::RightOf,
            Position::Above,
            Position::Below,
        ]
        .into_iter()
        .find(|p| p.phrase() == s)
    }
}

/// One include or exclude clause.
#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    /// Object class.
    pub class: String,
    /// Count (include: at least this many; exclude: fails at this many or more).
    pub count: usize,
    /// Required colour of the `count` most confident objects.
    pub color: Option<String>,
    /// Required relation to the objects of an earlier include clause (by index).
    pub position: Option<(Position, usize)>,
}

/// One metadata line.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptMeta {
    /// Task.
    pub task: Task,
    /// Clauses that must hold.
    pub include: Vec<Clause>,
    /// Clauses that must not hold.
    pub exclude: Vec<Clause>,
    /// Prompt text.
    pub prompt: String,
}

impl PromptMeta {
    /// Number of clauses (the denominator of the dense score).
    pub fn clauses(&self) -> usize {
        self.include.len() + self.exclude.len()
    }
}

fn parse_clause(
    v: &Value,
    field: &str,
    is_include: bool,
    index: usize,
) -> Result<Clause, (String, String)> {
    let bad = |f: &str, m: &str| Err((format!("{field}[{index}].{f}"), m.to_string()));
    let Some(o) = v.as_object() else {
        return bad("", "expected an object");
    };
    for k in o.keys() {
        if !["class", "count", "color", "position"].contains(&k.as_str()) {
            return bad(k, "unknown field (expected class, count, color, position)");
        }
    }
    let Some(class) = o.get("class").and_then(Value::as_str) else {
        return bad("class", "expected a string");
    };
    let Some(count) = o.get("count").and_then(Value::as_u64) else {
        return bad("count", "expected a non-negative integer");
    };
    let color = match o.get("color") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return bad("color", "expected a string"),
    };
    let position = match o.get("position") {
        None => None,
        Some(p) => {
            let arr = p.as_array().filter(|a| a.len() == 2);
            let rel = arr
                .and_then(|a| a[0].as_str())
                .and_then(Position::from_phrase);
            let target = arr.and_then(|a| a[1].as_u64()).map(|t| t as usize);
            match (rel, target) {
                (Some(r), Some(t)) if is_include && t < index => Some((r, t)),
                (Some(_), Some(t)) if is_include => {
                    return bad(
                        "position",
                        &format!("target clause {t} must be an earlier include clause"),
                    )
                }
                (Some(_), Some(_)) => {
                    return bad("position", "exclude clauses cannot have a position")
                }
                _ => {
                    return bad(
                        "position",
                        "expected [\"left of\"|\"right of\"|\"above\"|\"below\", index]",
                    )
                }
            }
        }
    };
    Ok(Clause {
        class: class.to_string(),
        count: count as usize,
        color,
        position,
    })
}

fn parse_line(line: &str) -> Result<PromptMeta, (String, String)> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| (String::new(), format!("invalid JSON: {e}")))?;
    let Some(o) = v.as_object() else {
        return Err((String::new(), "expected a JSON object".into()));
    };
    let tag = o
        .get("tag")
        .and_then(Value::as_str)
        .ok_or(("tag".to_string(), "expected a string".to_string()))?;
    let task = Task::from_tag(tag).ok_or(("tag".to_string(), format!("unknown task {tag:?}")))?;
    let prompt = o
        .get("prompt")
        .and_then(Value::as_str)
        .ok_or(("prompt".to_string(), "expected a string".to_string()))?;
    let clauses = |name: &str, required: bool| -> Result<Vec<Clause>, (String, String)> {
        match o.get(name) {
            None if !required => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, c)| parse_clause(c, name, name == "include", i))
                .collect(),
            _ => Err((name.to_string(), "expected an array of clauses".to_string())),
        }
    };
    Ok(PromptMeta {
        task,
        include: clauses("include", true)?,
        exclude: clauses("exclude", false)?,
        prompt: prompt.into(),
    })
}

/// Reads `evaluation_metadata.jsonl`; errors name file, line and field.
pub fn read_metadata(path: &Path) -> Result<Vec<PromptMeta>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::File {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            parse_line(line)
                .map_err(|(field, message)| EvalError::field(path, i + 1, field, message))?,
        );
    }
    if out.is_empty() {
        return Err(EvalError::File {
            path: path.to_path_buf(),
            message: "no prompts".into(),
        });
    }
    Ok(out)
}

/// Scorer settings; defaults are GenEval's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenevalParams {
    /// Detections at or below this confidence are ignored. Default 0.3.
    pub threshold: f32,
    /// The same, for the counting task. Default 0.9.
    pub counting_threshold: f32,
    /// Box-size fraction by which centre offsets shrink before the direction test. Default 0.1.
    pub position_threshold: f32,
    /// Most detections kept per class. Default 16.
    pub max_objects: usize,
    /// Same-class boxes overlapping a kept one by at least this IoU are dropped; 1 disables. Default 1.
    pub nms_threshold: f32,
}

impl Default for GenevalParams {
    fn default() -> Self {
        GenevalParams {
            threshold: 0.3,
            counting_threshold: 0.9,
            position_threshold: 0.1,
            max_objects: 16,
            nms_threshold: 1.0,
        }
    }
}

/// The verdict on one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Every clause holds.
    pub correct: bool,
    /// Clauses that hold.
    pub satisfied: usize,
    /// Clauses in all.
    pub clauses: usize,
    /// Why clauses failed, one line each.
    pub reasons: Vec<String>,
}

impl Verdict {
    /// Fraction of clauses that hold (1 when there are none): the dense reward.
    pub fn dense(&self) -> f64 {
        if self.clauses == 0 {
            1.0
        } else {
            self.satisfied as f64 / self.clauses as f64
        }
    }
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area = |x: &[f32; 4]| (x[2] - x[0]).max(0.0) * (x[3] - x[1]).max(0.0);
    let inter = area(&[
        a[0].max(b[0]),
        a[1].max(b[1]),
        a[2].min(b[2]),
        a[3].min(b[3]),
    ]);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// The relations that hold of box `a` relative to box `b`, by GenEval's rule: centre offset, each axis shrunk
/// toward zero by `threshold` × (sum of the two boxes' sizes on that axis), then divided by the length of the
/// unshrunk offset; a component beyond ±0.5 gives the relation. Image y grows downward, so negative dy is
/// "above".
pub fn relations(a: &[f32; 4], b: &[f32; 4], threshold: f32) -> Vec<Position> {
    let centre = |x: &[f32; 4]| [(x[0] + x[2]) / 2.0, (x[1] + x[3]) / 2.0];
    let (ca, cb) = (centre(a), centre(b));
    let off = [ca[0] - cb[0], ca[1] - cb[1]];
    let dims = [
        (a[2] - a[0]).abs() + (b[2] - b[0]).abs(),
        (a[3] - a[1]).abs() + (b[3] - b[1]).abs(),
    ];
    let shrunk: Vec<f32> = (0..2)
        .map(|i| (off[i].abs() - threshold * dims[i]).max(0.0) * off[i].signum())
        .collect();
    if shrunk.iter().all(|v| v.abs() < 1e-3) {
        return Vec::new();
    }
    let norm = (off[0] * off[0] + off[1] * off[1]).sqrt();
    let (dx, dy) = (shrunk[0] / norm, shrunk[1] / norm);
    let mut out = Vec::new();
    if dx < -0.5 {
        out.push(Position::LeftOf);
    }
    if dx > 0.5 {
        out.push(Position::RightOf);
    }
    if dy < -0.5 {
        out.push(Position::Above);
    }
    if dy > 0.5 {
        out.push(Position::Below);
    }
    out
}

/// Detections kept per class: above the task's threshold, most confident first, capped, optionally NMS'd.
fn group(
    meta: &PromptMeta,
    detections: &[Detection],
    p: &GenevalParams,
) -> BTreeMap<String, Vec<Detection>> {
    let threshold = if meta.task == Task::Counting {
        p.counting_threshold
    } else {
        p.threshold
    };
    let mut by_class: BTreeMap<String, Vec<Detection>> = BTreeMap::new();
    for d in detections.iter().filter(|d| d.confidence > threshold) {
        by_class.entry(d.class.clone()).or_default().push(d.clone());
    }
    for list in by_class.values_mut() {
        list.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
        list.truncate(p.max_objects);
        if p.nms_threshold < 1.0 {
            let mut kept: Vec<Detection> = Vec::new();
            for d in list.drain(..) {
                if kept.iter().all(|k| iou(&k.bbox, &d.bbox) < p.nms_threshold) {
                    kept.push(d);
                }
            }
            *list = kept;
        }
    }
    by_class
}

/// Judges one image's detections against one prompt's requirements.
pub fn judge(meta: &PromptMeta, detections: &[Detection], params: &GenevalParams) -> Verdict {
    let objects = group(meta, detections, params);
    let empty = Vec::new();
    let mut reasons = Vec::new();
    let mut satisfied = 0;
    let mut matched: Vec<Option<Vec<Detection>>> = Vec::new();
    for req in &meta.include {
        let all = objects.get(&req.class).unwrap_or(&empty);
        let found: Vec<Detection> = all.iter().take(req.count).cloned().collect();
        let mut ok = true;
        if found.len() < req.count {
            ok = false;
            reasons.push(format!(
                "expected {} >= {}, found {}",
                req.class,
                req.count,
                found.len()
            ));
        } else {
            if let Some(colour) = &req.color {
                let n = found
                    .iter()
                    .filter(|d| d.color.as_deref() == Some(colour))
                    .count();
                if n < req.count {
                    ok = false;
                    reasons.push(format!(
                        "expected {colour} {} >= {}, found {n} {colour}",
                        req.class, req.count
                    ));
                }
            }
            if let (Some((rel, target)), true) = (req.position, ok) {
                match matched.get(target).and_then(Option::as_ref) {
                    None => {
                        ok = false;
                        reasons.push(format!(
                            "no target for {} to be {}",
                            req.class,
                            rel.phrase()
                        ));
                    }
                    Some(targets) => {
                        'outer: for d in &found {
                            for t in targets {
                                let rels = relations(&d.bbox, &t.bbox, params.position_threshold);
                                if !rels.contains(&rel) {
                                    ok = false;
                                    let got: Vec<&str> = rels.iter().map(|r| r.phrase()).collect();
                                    reasons.push(format!(
                                        "expected {} {} target, found {:?}",
                                        req.class,
                                        rel.phrase(),
                                        got
                                    ));
                                    break 'outer;
                                }
                            }
                        }
                    }
                }
            }
        }
        satisfied += usize::from(ok);
        matched.push(ok.then_some(found));
    }
    for req in &meta.exclude {
        let n = objects.get(&req.class).map_or(0, Vec::len);
        if n >= req.count {
            reasons.push(format!("expected {} < {}, found {n}", req.class, req.count));
        } else {
            satisfied += 1;
        }
    }
    Verdict {
        correct: reasons.is_empty(),
        satisfied,
        clauses: meta.clauses(),
        reasons,
    }
}

/// Score of one task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TaskScore {
    /// Fraction of its images judged correct.
    pub score: f64,
    /// Mean dense score of its images.
    pub dense: f64,
    /// Number of images.
    pub images: usize,
}

/// Scores of a whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenevalReport {
    /// Per task (only tasks with images).
    pub tasks: BTreeMap<Task, TaskScore>,
    /// Unweighted mean of the task scores.
    pub overall: f64,
    /// Unweighted mean of the task dense scores.
    pub overall_dense: f64,
    /// Images judged.
    pub images: usize,
}

/// Aggregates per-image verdicts into task means and the overall mean over tasks.
pub fn summarize<'a>(results: impl IntoIterator<Item = (Task, &'a Verdict)>) -> GenevalReport {
    let mut acc: BTreeMap<Task, (f64, f64, usize)> = BTreeMap::new();
    let mut images = 0;
    for (task, v) in results {
        let e = acc.entry(task).or_default();
        e.0 += f64::from(u8::from(v.correct));
        e.1 += v.dense();
        e.2 += 1;
        images += 1;
    }
    let tasks: BTreeMap<Task, TaskScore> = acc
        .into_iter()
        .map(|(t, (c, d, n))| {
            (
                t,
                TaskScore {
                    score: c / n as f64,
                    dense: d / n as f64,
                    images: n,
                },
            )
        })
        .collect();
    let mean = |f: fn(&TaskScore) -> f64| {
        if tasks.is_empty() {
            0.0
        } else {
            tasks.values().map(f).sum::<f64>() / tasks.len() as f64
        }
    };
    GenevalReport {
        overall: mean(|t| t.score),
        overall_dense: mean(|t| t.dense),
        tasks,
        images,
    }
}

/// Judges `images[i]` (K images each) against `metas[i]` with `detector`.
pub fn score_images(
    metas: &[PromptMeta],
    images: &[Vec<RgbImage>],
    detector: &dyn Detector,
    params: &GenevalParams,
) -> (Vec<Vec<Verdict>>, GenevalReport) {
    let verdicts: Vec<Vec<Verdict>> = metas
        .iter()
        .zip(images)
        .map(|(m, imgs)| {
            imgs.iter()
                .map(|img| judge(m, &detector.detect(img), params))
                .collect()
        })
        .collect();
    let report = summarize(
        metas
            .iter()
            .zip(&verdicts)
            .flat_map(|(m, vs)| vs.iter().map(move |v| (m.task, v))),
    );
    (verdicts, report)
}

/// The image files of prompt `index` under `folder`: GenEval's `NNNNN/samples/*.png` (sorted; K per prompt),
/// else a single `NNNNN.png` (the toy world's reference renders).
pub fn prompt_images(folder: &Path, index: usize) -> Result<Vec<PathBuf>, EvalError> {
    let samples = folder.join(format!("{index:05}/samples"));
    if samples.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&samples)
            .map_err(|e| EvalError::File {
                path: samples.clone(),
                message: format!("cannot list: {e}"),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("png") || x.eq_ignore_ascii_case("jpg"))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EvalError::File {
                path: samples,
                message: "no images".into(),
            });
        }
        return Ok(files);
    }
    let single = folder.join(format!("{index:05}.png"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(EvalError::File {
        path: folder.to_path_buf(),
        message: format!(
            "no images for prompt {index}: expected {index:05}/samples/*.png or {index:05}.png"
        ),
    })
}

/// Scores a folder of generated images against a metadata file (every prompt must have images).
pub fn score_folder(
    metadata: &Path,
    folder: &Path,
    detector: &dyn Detector,
    params: &GenevalParams,
) -> Result<GenevalReport, EvalError> {
    let metas = read_metadata(metadata)?;
    let mut images = Vec::with_capacity(metas.len());
    for i in 0..metas.len() {
        let mut imgs = Vec::new();
        for p in prompt_images(folder, i)? {
            let img = image::open(&p).map_err(|e| EvalError::File {
                path: p.clone(),
                message: format!("cannot decode image: {e}"),
            })?;
            imgs.push(img.to_rgb8());
        }
        images.push(imgs);
    }
    Ok(score_images(&metas, &images, detector, params).1)
}
