//! The world's language: questions, GenEval-style prompts and captions, their parsers, and the vocabulary.
//!
//! Everything here is one small grammar that can be generated and parsed back, so the oracle can verify a
//! completion against the detector's reading of the image. Texts tokenize with the Hugging Face `Whitespace`
//! pre-tokenizer rule (`\w+|[^\w\s]+`, see [`tokenize`]) into words of [`vocabulary`].

use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use serde::Serialize;

use crate::scene::{article, Cell, Colour, Kind, Object, Relation, Scene, Shape};

/// Option letters of a multiple-choice question.
pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// Number words used for counts (0..=9: a 3×3 grid holds at most nine objects).
pub const NUMBERS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// Why a text is not in the world's grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn perr<T>(msg: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(msg.into()))
}

/// Splits text the way the HF `Whitespace` pre-tokenizer does: runs of word characters, or runs of other
/// non-space characters.
pub fn tokenize(text: &str) -> Vec<&str> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut start: Option<(usize, bool)> = None;
    for (i, c) in text.char_indices() {
        let class = if c.is_whitespace() {
            None
        } else {
            Some(is_word(c))
        };
        match (start, class) {
            (Some((s, w)), Some(k)) if w != k => {
                out.push(&text[s..i]);
                start = Some((i, k));
            }
            (Some((s, _)), None) => {
                out.push(&text[s..i]);
                start = None;
            }
            (None, Some(k)) => start = Some((i, k)),
            _ => {}
        }
    }
    if let Some((s, _)) = start {
        out.push(&text[s..]);
    }
    out
}

/// Every token any generated text (questions, options, answers, prompts, captions) can contain, sorted.
pub fn vocabulary() -> Vec<String> {
    let fixed = [
        "A", "B", "C", "D", "?", ".", ",", ":", "a", "an", "photo", "of", "and", "What", "color",
        "is", "the", "shape", "object", "objects", "How", "many", "are", "there", "Is", "There",
        "in", "image", "The", "not", "Which", "none", "yes", "no", "left", "right", "above",
        "below", "top", "middle", "bottom", "center",
    ];
    let mut words: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
    words.extend(Colour::ALL.iter().map(|c| c.name().to_string()));
    words.extend(
        Shape::ALL
            .iter()
            .flat_map(|s| [s.name().to_string(), s.plural().to_string()]),
    );
    words.extend(NUMBERS.iter().map(|s| s.to_string()));
    words.sort();
    words.dedup();
    words
}

fn number_word(n: usize) -> String {
    NUMBERS
        .get(n)
        .map_or_else(|| n.to_string(), |s| s.to_string())
}

fn parse_number(w: &str) -> Option<usize> {
    NUMBERS.iter().position(|n| *n == w)
}

/// A question about a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Question {
    /// "What color is the circle?" (the shape must be unique in the scene).
    ColourOf(Shape),
    /// "What shape is the red object?" (at most one object of that colour; "none" when absent).
    ShapeOf(Colour),
    /// "How many red circles are there?" with optional colour and shape.
    Count {
        /// Colour filter.
        colour: Option<Colour>,
        /// Shape filter.
        shape: Option<Shape>,
    },
    /// "Is there a red circle in the image?" (yes/no).
    Exists(Kind),
    /// "Is the red circle left of the blue square?" (yes/no; both kinds unique in the scene).
    Relation {
        /// Subject.
        a: Kind,
        /// Relation asked about.
        rel: Relation,
        /// Reference object.
        b: Kind,
    },
    /// "Which object is above the blue square?" (exactly one object stands in the relation).
    Which {
        /// Relation asked about.
        rel: Relation,
        /// Reference object.
        b: Kind,
    },
}

impl Question {
    /// Category label: "color", "shape", "count", "exists" or "relation".
    pub fn category(&self) -> &'static str {
        match self {
            Question::ColourOf(_) => "color",
            Question::ShapeOf(_) => "shape",
            Question::Count { .. } => "count",
            Question::Exists(_) => "exists",
            Question::Relation { .. } | Question::Which { .. } => "relation",
        }
    }

    /// Whether it is asked as multiple choice (else yes/no).
    pub fn is_multiple_choice(&self) -> bool {
        !matches!(self, Question::Exists(_) | Question::Relation { .. })
    }

    /// The question text without options.
    pub fn stem(&self) -> String {
        match *self {
            Question::ColourOf(s) => format!("What color is the {}?", s.name()),
            Question::ShapeOf(c) => format!("What shape is the {} object?", c.name()),
            Question::Count { colour, shape } => {
                let c = colour.map(|c| format!("{} ", c.name())).unwrap_or_default();
                let s = shape.map_or("objects", Shape::plural);
                format!("How many {c}{s} are there?")
            }
            Question::Exists(k) => format!("Is there {} in the image?", k.with_article()),
            Question::Relation { a, rel, b } => {
                format!("Is the {} {} the {}?", a.phrase(), rel.phrase(), b.phrase())
            }
            Question::Which { rel, b } => {
                format!("Which object is {} the {}?", rel.phrase(), b.phrase())
            }
        }
    }

    /// The true answer text in `scene` (an option text or "yes"/"no"), or why it has none.
    pub fn truth(&self, scene: &Scene) -> Result<String, String> {
        let unique = |k: Kind| -> Result<Object, String> {
            match scene.matching(Some(k.colour), Some(k.shape)).as_slice() {
                [o] => Ok(*o),
                v => Err(format!(
                    "{} {} in the image (need exactly one)",
                    v.len(),
                    k.phrase()
                )),
            }
        };
        match *self {
            Question::ColourOf(s) => match scene.matching(None, Some(s)).as_slice() {
                [o] => Ok(o.colour.name().to_string()),
                v => Err(format!(
                    "{} {} in the image (need exactly one)",
                    v.len(),
                    s.plural()
                )),
            },
            Question::ShapeOf(c) => match scene.matching(Some(c), None).as_slice() {
                [] => Ok("none".to_string()),
                [o] => Ok(o.shape.name().to_string()),
                v => Err(format!(
                    "{} {} objects in the image (need at most one)",
                    v.len(),
                    c.name()
                )),
            },
            Question::Count { colour, shape } => Ok(number_word(scene.count(colour, shape))),
            Question::Exists(k) => Ok(yes_no(scene.contains(k))),
            Question::Relation { a, rel, b } => {
                let (oa, ob) = (unique(a)?, unique(b)?);
                Ok(yes_no(rel.holds(oa.cell, ob.cell)))
            }
            Question::Which { rel, b } => {
                let ob = unique(b)?;
                let hits: Vec<&Object> = scene
                    .objects()
                    .iter()
                    .filter(|o| rel.holds(o.cell, ob.cell))
                    .collect();
                match hits.as_slice() {
                    [o] => Ok(o.kind().phrase()),
                    v => Err(format!(
                        "{} objects {} the {} (need exactly one)",
                        v.len(),
                        rel.phrase(),
                        b.phrase()
                    )),
                }
            }
        }
    }

    /// Four option texts including `truth`, in random order (multiple-choice questions only).
    pub fn options<R: Rng + ?Sized>(&self, truth: &str, rng: &mut R) -> Vec<String> {
        let mut pool: Vec<String> = match self {
            Question::ColourOf(_) => Colour::ALL.iter().map(|c| c.name().to_string()).collect(),
            Question::ShapeOf(_) => ["circle", "square", "triangle", "none"]
                .map(String::from)
                .to_vec(),
            Question::Count { .. } => {
                let hi = parse_number(truth).unwrap_or(0).max(4);
                (0..=hi).map(number_word).collect()
            }
            _ => Kind::all().map(Kind::phrase).collect(),
        };
        pool.retain(|o| o != truth);
        let mut opts: Vec<String> = pool.choose_multiple(rng, 3).cloned().collect();
        opts.push(truth.to_string());
        opts.shuffle(rng);
        opts
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// A question as asked: stem plus, for multiple choice, inline options; and its gold answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AskedQuestion {
    /// The parsed question.
    pub question: Question,
    /// Full text, options inline: "What color is the circle? A. red B. blue C. green D. yellow".
    pub text: String,
    /// Option texts in letter order (empty for yes/no).
    pub options: Vec<String>,
    /// Gold answer: a letter or "yes"/"no".
    pub answer: String,
}

/// Renders a question with its options and gold answer for `scene`; `Err` when the scene cannot answer it.
pub fn ask<R: Rng + ?Sized>(
    question: Question,
    scene: &Scene,
    rng: &mut R,
) -> Result<AskedQuestion, String> {
    let truth = question.truth(scene)?;
    if !question.is_multiple_choice() {
        return Ok(AskedQuestion {
            question,
            text: question.stem(),
            options: Vec::new(),
            answer: truth,
        });
    }
    let options = question.options(&truth, rng);
    let idx = options
        .iter()
        .position(|o| *o == truth)
        .expect("truth is among the options");
    Ok(AskedQuestion {
        question,
        text: format_mcq(&question.stem(), &options),
        answer: LETTERS[idx].to_string(),
        options,
    })
}

/// "stem A. x B. y C. z D. w".
pub fn format_mcq(stem: &str, options: &[String]) -> String {
    let mut s = stem.to_string();
    for (l, o) in LETTERS.iter().zip(options) {
        s.push_str(&format!(" {l}. {o}"));
    }
    s
}

/// A random question that `scene` answers unambiguously; `mcq_only` restricts to multiple choice.
pub fn random_question<R: Rng + ?Sized>(
    scene: &Scene,
    mcq_only: bool,
    rng: &mut R,
) -> AskedQuestion {
    let rand_kind = |rng: &mut R| Kind {
        colour: Colour::ALL[rng.random_range(0..6)],
        shape: Shape::ALL[rng.random_range(0..3)],
    };
    let present = |rng: &mut R| *scene.objects().choose(rng).expect("scenes have objects");
    loop {
        let kind = if mcq_only {
            [0, 1, 2, 5][rng.random_range(0..4)]
        } else {
            rng.random_range(0..6)
        };
        let q = match kind {
            0 => Question::ColourOf(present(rng).shape),
            // Mostly about a present colour; sometimes an absent one so "none" is a real answer.
            1 => Question::ShapeOf(if rng.random_bool(0.8) {
                present(rng).colour
            } else {
                Colour::ALL[rng.random_range(0..6)]
            }),
            2 => {
                let o = present(rng);
                match rng.random_range(0..3) {
                    0 => Question::Count {
                        colour: Some(o.colour),
                        shape: Some(o.shape),
                    },
                    1 => Question::Count {
                        colour: None,
                        shape: Some(o.shape),
                    },
                    _ => Question::Count {
                        colour: Some(o.colour),
                        shape: None,
                    },
                }
            }
            // Half present, half random (mostly absent) so yes and no are balanced.
            3 => Question::Exists(if rng.random_bool(0.5) {
                present(rng).kind()
            } else {
                rand_kind(rng)
            }),
            4 => {
                let (a, b) = (present(rng), present(rng));
                Question::Relation {
                    a: a.kind(),
                    rel: Relation::ALL[rng.random_range(0..4)],
                    b: b.kind(),
                }
            }
            _ => Question::Which {
                rel: Relation::ALL[rng.random_range(0..4)],
                b: present(rng).kind(),
            },
        };
        if let Question::Relation { a, b, .. } = q {
            if a == b {
                continue;
            }
        }
        if let Ok(asked) = ask(q, scene, rng) {
            return asked;
        }
    }
}

/// Lower-cased tokens of a text.
fn words(text: &str) -> Vec<String> {
    tokenize(text).into_iter().map(str::to_lowercase).collect()
}

fn parse_kind(w: &[String]) -> Option<Kind> {
    match w {
        [c, s] => Some(Kind {
            colour: Colour::from_name(c)?,
            shape: Shape::from_name(s)?,
        }),
        _ => None,
    }
}

fn parse_relation(w: &[String]) -> Option<(Relation, usize)> {
    if w.len() >= 2 {
        if let Some(r) = Relation::from_phrase(&format!("{} {}", w[0], w[1])) {
            return Some((r, 2));
        }
    }
    Relation::from_phrase(w.first()?).map(|r| (r, 1))
}

/// Parses a question, with or without inline options; returns the question and the options (empty if none).
pub fn parse_question(text: &str) -> Result<(Question, Vec<String>), ParseError> {
    let Some(q) = text.find('?') else {
        return perr(format!("no question mark in {text:?}"));
    };
    let (stem, rest) = (&text[..q], text[q + 1..].trim());
    let options = parse_options(rest)?;
    let w = words(stem);
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    let owned: Vec<String> = w.iter().map(|s| s.to_string()).collect();
    let question = match w.as_slice() {
        ["what", "color", "is", "the", s] => Shape::from_name(s).map(Question::ColourOf),
        ["what", "shape", "is", "the", c, "object"] => Colour::from_name(c).map(Question::ShapeOf),
        ["how", "many", mid @ .., "are", "there"] => match mid {
            ["objects"] => Some(Question::Count {
                colour: None,
                shape: None,
            }),
            [c, "objects"] => Colour::from_name(c).map(|c| Question::Count {
                colour: Some(c),
                shape: None,
            }),
            [s] => Shape::from_plural(s).map(|s| Question::Count {
                colour: None,
                shape: Some(s),
            }),
            [c, s] => Colour::from_name(c)
                .zip(Shape::from_plural(s))
                .map(|(c, s)| Question::Count {
                    colour: Some(c),
                    shape: Some(s),
                }),
            _ => None,
        },
        ["is", "there", "a" | "an", c, s, "in", "the", "image"] => {
            parse_kind(&[c.to_string(), s.to_string()]).map(Question::Exists)
        }
        ["is", "the", _, _, ..] => (|| {
            let a = parse_kind(&owned[2..4])?;
            let (rel, n) = parse_relation(&owned[4..])?;
            let tail = &owned[4 + n..];
            if tail.first().map(String::as_str) != Some("the") {
                return None;
            }
            Some(Question::Relation {
                a,
                rel,
                b: parse_kind(&tail[1..])?,
            })
        })(),
        ["which", "object", "is", ..] => (|| {
            let (rel, n) = parse_relation(&owned[3..])?;
            let tail = &owned[3 + n..];
            if tail.first().map(String::as_str) != Some("the") {
                return None;
            }
            Some(Question::Which {
                rel,
                b: parse_kind(&tail[1..])?,
            })
        })(),
        _ => None,
    };
    match question {
        Some(q) => Ok((q, options)),
        None => perr(format!("question {stem:?} is not in the world's grammar")),
    }
}

/// Parses "A. x B. y C. z D. w" (empty input → no options).
pub fn parse_options(rest: &str) -> Result<Vec<String>, ParseError> {
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let mut starts = Vec::new();
    let mut from = 0;
    for (i, l) in LETTERS.iter().enumerate() {
        let pat = format!("{l}. ");
        let found = if i == 0 {
            rest.starts_with(&pat).then_some(0)
        } else {
            rest[from..].find(&format!(" {pat}")).map(|p| from + p + 1)
        };
        let Some(at) = found else {
            return perr(format!("options {rest:?}: no option {l}"));
        };
        starts.push(at);
        from = at + pat.len();
    }
    let mut out = Vec::new();
    for i in 0..4 {
        let s = starts[i] + 3;
        let e = starts.get(i + 1).copied().unwrap_or(rest.len());
        let o = rest[s..e].trim();
        if o.is_empty() {
            return perr(format!("options {rest:?}: option {} is empty", LETTERS[i]));
        }
        out.push(o.to_string());
    }
    Ok(out)
}

/// The six GenEval task tags, in GenEval's order.
pub const TASKS: [&str; 6] = [
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
];

/// A GenEval-style prompt of one of the six tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromptSpec {
    /// "a photo of a circle".
    SingleObject(Shape),
    /// "a photo of a circle and a square" (distinct shapes).
    TwoObject(Shape, Shape),
    /// "a photo of three triangles" (2..=4).
    Counting(Shape, usize),
    /// "a photo of a blue square".
    Colors(Kind),
    /// "a photo of a red circle left of a green triangle" (distinct shapes).
    Position {
        /// Subject.
        a: Kind,
        /// Relation of `a` to `b`.
        rel: Relation,
        /// Reference.
        b: Kind,
    },
    /// "a photo of a purple square and a yellow circle" (distinct shapes).
    ColorAttr(Kind, Kind),
}

/// One include/exclude clause of a GenEval metadata line (field order as in the real file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenevalClause {
    /// Object class: the shape name.
    pub class: String,
    /// Required count (include) or forbidden count (exclude).
    pub count: usize,
    /// Required colour.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
    /// Required position relative to an earlier include clause: `["left of", 0]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<(String, usize)>,
}

/// One line of GenEval's `evaluation_metadata.jsonl` (field order as in the real file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GenevalLine {
    /// Task tag.
    pub tag: String,
    /// Clauses that must hold.
    pub include: Vec<GenevalClause>,
    /// Clauses that must not hold (counting only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<GenevalClause>,
    /// The prompt text.
    pub prompt: String,
}

fn clause(
    shape: Shape,
    count: usize,
    colour: Option<Colour>,
    position: Option<(Relation, usize)>,
) -> GenevalClause {
    GenevalClause {
        class: shape.name().to_string(),
        count,
        color: colour.map(|c| c.name().to_string()),
        position: position.map(|(r, i)| (r.phrase().to_string(), i)),
    }
}

fn a_shape(s: Shape) -> String {
    format!("{} {}", article(s.name()), s.name())
}

impl PromptSpec {
    /// The task tag ("single_object", …).
    pub fn tag(&self) -> &'static str {
        match self {
            PromptSpec::SingleObject(_) => TASKS[0],
            PromptSpec::TwoObject(..) => TASKS[1],
            PromptSpec::Counting(..) => TASKS[2],
            PromptSpec::Colors(_) => TASKS[3],
            PromptSpec::Position { .. } => TASKS[4],
            PromptSpec::ColorAttr(..) => TASKS[5],
        }
    }

    /// The prompt text in GenEval's phrasing.
    pub fn text(&self) -> String {
        let body = match *self {
            PromptSpec::SingleObject(s) => a_shape(s),
            PromptSpec::TwoObject(a, b) => format!("{} and {}", a_shape(a), a_shape(b)),
            PromptSpec::Counting(s, n) => format!("{} {}", number_word(n), s.plural()),
            PromptSpec::Colors(k) => k.with_article(),
            PromptSpec::Position { a, rel, b } => {
                format!("{} {} {}", a.with_article(), rel.phrase(), b.with_article())
            }
            PromptSpec::ColorAttr(a, b) => format!("{} and {}", a.with_article(), b.with_article()),
        };
        format!("a photo of {body}")
    }

    /// The GenEval metadata line for this prompt (position: the reference object is clause 0, as in GenEval).
    pub fn geneval_line(&self) -> GenevalLine {
        let (include, exclude) = match *self {
            PromptSpec::SingleObject(s) => (vec![clause(s, 1, None, None)], vec![]),
            PromptSpec::TwoObject(a, b) => (
                vec![clause(a, 1, None, None), clause(b, 1, None, None)],
                vec![],
            ),
            PromptSpec::Counting(s, n) => (
                vec![clause(s, n, None, None)],
                vec![clause(s, n + 1, None, None)],
            ),
            PromptSpec::Colors(k) => (vec![clause(k.shape, 1, Some(k.colour), None)], vec![]),
            PromptSpec::Position { a, rel, b } => (
                vec![
                    clause(b.shape, 1, Some(b.colour), None),
                    clause(a.shape, 1, Some(a.colour), Some((rel, 0))),
                ],
                vec![],
            ),
            PromptSpec::ColorAttr(a, b) => (
                vec![
                    clause(a.shape, 1, Some(a.colour), None),
                    clause(b.shape, 1, Some(b.colour), None),
                ],
                vec![],
            ),
        };
        GenevalLine {
            tag: self.tag().to_string(),
            include,
            exclude,
            prompt: self.text(),
        }
    }

    /// Every prompt of a task (by tag), in a fixed order; empty for an unknown tag.
    pub fn all_of(tag: &str) -> Vec<PromptSpec> {
        let kinds: Vec<Kind> = Kind::all().collect();
        let mut out = Vec::new();
        match tag {
            "single_object" => out.extend(Shape::ALL.map(PromptSpec::SingleObject)),
            "two_object" => {
                for a in Shape::ALL {
                    for b in Shape::ALL.into_iter().filter(|&b| b != a) {
                        out.push(PromptSpec::TwoObject(a, b));
                    }
                }
            }
            "counting" => {
                for s in Shape::ALL {
                    out.extend((2..=4).map(|n| PromptSpec::Counting(s, n)));
                }
            }
            "colors" => out.extend(kinds.iter().map(|&k| PromptSpec::Colors(k))),
            "position" | "color_attr" => {
                for &a in &kinds {
                    for &b in kinds.iter().filter(|b| b.shape != a.shape) {
                        if tag == "position" {
                            out.extend(Relation::ALL.map(|rel| PromptSpec::Position { a, rel, b }));
                        } else {
                            out.push(PromptSpec::ColorAttr(a, b));
                        }
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// A scene that satisfies the prompt and holds exactly the named objects; positions are pure (same row
    /// for left/right, same column for above/below) so GenEval's box-geometry rule agrees with the cells.
    pub fn reference_scene<R: Rng + ?Sized>(&self, rng: &mut R) -> Scene {
        let mut cells: Vec<Cell> = Cell::all().collect();
        cells.shuffle(rng);
        let rand_colour = |rng: &mut R| Colour::ALL[rng.random_range(0..6)];
        let obj = |k: Kind, cell: Cell| Object {
            shape: k.shape,
            colour: k.colour,
            cell,
        };
        let objects = match *self {
            PromptSpec::SingleObject(s) => vec![obj(
                Kind {
                    colour: rand_colour(rng),
                    shape: s,
                },
                cells[0],
            )],
            PromptSpec::TwoObject(a, b) => vec![
                obj(
                    Kind {
                        colour: rand_colour(rng),
                        shape: a,
                    },
                    cells[0],
                ),
                obj(
                    Kind {
                        colour: rand_colour(rng),
                        shape: b,
                    },
                    cells[1],
                ),
            ],
            PromptSpec::Counting(s, n) => cells[..n]
                .iter()
                .map(|&c| {
                    obj(
                        Kind {
                            colour: rand_colour(rng),
                            shape: s,
                        },
                        c,
                    )
                })
                .collect(),
            PromptSpec::Colors(k) => vec![obj(k, cells[0])],
            PromptSpec::ColorAttr(a, b) => vec![obj(a, cells[0]), obj(b, cells[1])],
            PromptSpec::Position { a, rel, b } => {
                let line = rng.random_range(0..3u8);
                let mut pair = [rng.random_range(0..3u8), 0];
                pair[1] = (pair[0] + rng.random_range(1..3u8)) % 3;
                pair.sort();
                // pair[0] < pair[1]: the first is left of / above the second.
                let (lo, hi) = (pair[0], pair[1]);
                let (ca, cb) = match rel {
                    Relation::LeftOf => ((line, lo), (line, hi)),
                    Relation::RightOf => ((line, hi), (line, lo)),
                    Relation::Above => ((lo, line), (hi, line)),
                    Relation::Below => ((hi, line), (lo, line)),
                };
                vec![
                    obj(
                        a,
                        Cell {
                            row: ca.0,
                            col: ca.1,
                        },
                    ),
                    obj(
                        b,
                        Cell {
                            row: cb.0,
                            col: cb.1,
                        },
                    ),
                ]
            }
        };
        Scene::new(objects).expect("distinct cells by construction")
    }

    /// Parses a prompt produced by [`PromptSpec::text`].
    pub fn parse(text: &str) -> Result<PromptSpec, ParseError> {
        let w = words(text);
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        let Some(body) = w.strip_prefix(&["a", "photo", "of"][..]) else {
            return perr(format!(
                "prompt {text:?} does not start with \"a photo of\""
            ));
        };
        // Noun phrase: (a|an) [colour] shape, or number plural.
        let np = |w: &[&str]| -> Option<(Option<Colour>, Shape, usize, usize)> {
            match w {
                ["a" | "an", c, s, ..]
                    if Colour::from_name(c).is_some() && Shape::from_name(s).is_some() =>
                {
                    Some((Colour::from_name(c), Shape::from_name(s)?, 1, 3))
                }
                ["a" | "an", s, ..] => Some((None, Shape::from_name(s)?, 1, 2)),
                [n, s, ..] => Some((None, Shape::from_plural(s)?, parse_number(n)?, 2)),
                _ => None,
            }
        };
        let bad = || perr(format!("prompt {text:?} is not in the world's grammar"));
        let Some((c1, s1, n1, used)) = np(body) else {
            return bad();
        };
        let rest = &body[used..];
        let kind = |c: Option<Colour>, s: Shape| c.map(|colour| Kind { colour, shape: s });
        if n1 != 1 {
            return if rest.is_empty() && c1.is_none() && (2..=9).contains(&n1) {
                Ok(PromptSpec::Counting(s1, n1))
            } else {
                bad()
            };
        }
        if rest.is_empty() {
            return Ok(match kind(c1, s1) {
                Some(k) => PromptSpec::Colors(k),
                None => PromptSpec::SingleObject(s1),
            });
        }
        let rest_owned: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
        let (second, relation) = if rest[0] == "and" {
            (&rest[1..], None)
        } else if let Some((rel, n)) = parse_relation(&rest_owned) {
            (&rest[n..], Some(rel))
        } else {
            return bad();
        };
        let Some((c2, s2, 1, used2)) = np(second) else {
            return bad();
        };
        if used2 != second.len() || s1 == s2 {
            return bad();
        }
        match (relation, kind(c1, s1), kind(c2, s2)) {
            (None, None, None) if c2.is_none() => Ok(PromptSpec::TwoObject(s1, s2)),
            (None, Some(a), Some(b)) => Ok(PromptSpec::ColorAttr(a, b)),
            (Some(rel), Some(a), Some(b)) => Ok(PromptSpec::Position { a, rel, b }),
            _ => bad(),
        }
    }
}

/// One checkable statement of a caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The complete object listing.
    Listing(Vec<Object>),
    /// Exactly `n` objects match the filters.
    Count {
        /// Colour filter.
        colour: Option<Colour>,
        /// Shape filter.
        shape: Option<Shape>,
        /// Claimed count.
        n: usize,
    },
    /// At least one object of this kind.
    Exists(Kind),
    /// The only object of `shape` has `colour`.
    ColourIs {
        /// Shape.
        shape: Shape,
        /// Colour.
        colour: Colour,
    },
    /// The only object of `colour` has `shape`.
    ShapeIs {
        /// Colour.
        colour: Colour,
        /// Shape.
        shape: Shape,
    },
    /// The unique `a` does (or does not) stand in `rel` to the unique `b`.
    Relation {
        /// Subject.
        a: Kind,
        /// Relation.
        rel: Relation,
        /// Reference.
        b: Kind,
        /// Whether the relation is claimed to hold.
        holds: bool,
    },
}

impl Claim {
    /// The sentence for this claim (with final period).
    pub fn sentence(&self) -> String {
        match self {
            Claim::Listing(objs) => {
                if objs.is_empty() {
                    return "There are no objects.".to_string();
                }
                let items: Vec<String> = objs
                    .iter()
                    .map(|o| format!("{} in the {}", o.kind().with_article(), o.cell.name()))
                    .collect();
                let list = match items.as_slice() {
                    [one] => one.clone(),
                    [init @ .., last] => format!("{} and {last}", init.join(", ")),
                    [] => unreachable!(),
                };
                let (verb, noun) = if objs.len() == 1 {
                    ("is", "object")
                } else {
                    ("are", "objects")
                };
                format!("There {verb} {} {noun}: {list}.", number_word(objs.len()))
            }
            Claim::Count { colour, shape, n } => {
                let c = colour.map(|c| format!("{} ", c.name())).unwrap_or_default();
                let noun = match (shape, *n == 1) {
                    (Some(s), true) => s.name(),
                    (Some(s), false) => s.plural(),
                    (None, true) => "object",
                    (None, false) => "objects",
                };
                let (verb, num) = match n {
                    0 => ("are", "no".to_string()),
                    1 => ("is", "one".to_string()),
                    _ => ("are", number_word(*n)),
                };
                format!("There {verb} {num} {c}{noun}.")
            }
            Claim::Exists(k) => format!("There is {}.", k.with_article()),
            Claim::ColourIs { shape, colour } => {
                format!("The {} is {}.", shape.name(), colour.name())
            }
            Claim::ShapeIs { colour, shape } => {
                format!("The {} object is {}.", colour.name(), a_shape(*shape))
            }
            Claim::Relation { a, rel, b, holds } => {
                let not = if *holds { "" } else { "not " };
                format!(
                    "The {} is {not}{} the {}.",
                    a.phrase(),
                    rel.phrase(),
                    b.phrase()
                )
            }
        }
    }

    /// Checks the claim against a scene; `Err` says what is wrong.
    pub fn check(&self, scene: &Scene) -> Result<(), String> {
        let ok = |b: bool, msg: String| if b { Ok(()) } else { Err(msg) };
        match self {
            Claim::Listing(objs) => ok(
                objs.as_slice() == scene.objects(),
                format!(
                    "listing {:?} does not match the image {:?}",
                    Scene::new(objs.clone()).map(|s| s.key()),
                    scene.key()
                ),
            ),
            Claim::Count { colour, shape, n } => {
                let real = scene.count(*colour, *shape);
                ok(
                    real == *n,
                    format!("claims {n} but the image has {real}: {:?}", self.sentence()),
                )
            }
            Claim::Exists(k) => ok(
                scene.contains(*k),
                format!("claims {} but there is none", k.with_article()),
            ),
            Claim::ColourIs { shape, colour } => ok(
                Question::ColourOf(*shape).truth(scene).as_deref() == Ok(colour.name()),
                format!("false: {:?}", self.sentence()),
            ),
            Claim::ShapeIs { colour, shape } => ok(
                Question::ShapeOf(*colour).truth(scene).as_deref() == Ok(shape.name()),
                format!("false: {:?}", self.sentence()),
            ),
            Claim::Relation { a, rel, b, holds } => ok(
                Question::Relation {
                    a: *a,
                    rel: *rel,
                    b: *b,
                }
                .truth(scene)
                    == Ok(yes_no(*holds)),
                format!("false: {:?}", self.sentence()),
            ),
        }
    }

    /// Parses one sentence (without its final period).
    pub fn parse(sentence: &str) -> Result<Claim, ParseError> {
        let w = words(sentence);
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        let bad = || {
            perr(format!(
                "sentence {sentence:?} is not in the world's grammar"
            ))
        };
        if let Some(colon) = w.iter().position(|t| *t == ":") {
            return parse_listing(&w, colon).map_or_else(bad, |objs| Ok(Claim::Listing(objs)));
        }
        let claim = match w.as_slice() {
            ["there", "are", "no", "objects"] => Some(Claim::Listing(Vec::new())),
            ["there", "is", "a" | "an", c, s] => {
                parse_kind(&[c.to_string(), s.to_string()]).map(Claim::Exists)
            }
            ["there", "is" | "are", num, mid @ ..] => (|| {
                let n = if *num == "no" { 0 } else { parse_number(num)? };
                let (colour, noun) = match mid {
                    [c, noun] => (Some(Colour::from_name(c)?), *noun),
                    [noun] => (None, *noun),
                    _ => return None,
                };
                let shape = match noun {
                    "object" | "objects" => None,
                    s => Some(Shape::from_name(s).or_else(|| Shape::from_plural(s))?),
                };
                Some(Claim::Count { colour, shape, n })
            })(),
            ["the", s, "is", c] => Shape::from_name(s)
                .zip(Colour::from_name(c))
                .map(|(shape, colour)| Claim::ColourIs { shape, colour }),
            ["the", c, "object", "is", "a" | "an", s] => Colour::from_name(c)
                .zip(Shape::from_name(s))
                .map(|(colour, shape)| Claim::ShapeIs { colour, shape }),
            ["the", c, s, "is", tail @ ..] => (|| {
                let a = parse_kind(&[c.to_string(), s.to_string()])?;
                let tail: Vec<String> = tail.iter().map(|t| t.to_string()).collect();
                let (holds, tail) = if tail.first().map(String::as_str) == Some("not") {
                    (false, &tail[1..])
                } else {
                    (true, &tail[..])
                };
                let (rel, n) = parse_relation(tail)?;
                if tail.get(n).map(String::as_str) != Some("the") {
                    return None;
                }
                Some(Claim::Relation {
                    a,
                    rel,
                    b: parse_kind(&tail[n + 1..])?,
                    holds,
                })
            })(),
            _ => None,
        };
        claim.map_or_else(bad, Ok)
    }
}

fn parse_listing(w: &[&str], colon: usize) -> Option<Vec<Object>> {
    let n = match &w[..colon] {
        ["there", "is" | "are", num, "object" | "objects"] => parse_number(num)?,
        _ => return None,
    };
    let mut objs = Vec::new();
    for item in w[colon + 1..].split(|t| *t == "," || *t == "and") {
        match item {
            ["a" | "an", c, s, "in", "the", cell @ ..] => objs.push(Object {
                colour: Colour::from_name(c)?,
                shape: Shape::from_name(s)?,
                cell: Cell::from_name(&cell.join(" "))?,
            }),
            _ => return None,
        }
    }
    if objs.len() != n {
        return None;
    }
    Scene::new(objs).ok().map(|s| s.objects().to_vec())
}

/// Splits a caption into claims; `Err` names the first sentence outside the grammar.
pub fn parse_caption(caption: &str) -> Result<Vec<Claim>, ParseError> {
    caption
        .split('.')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Claim::parse)
        .collect()
}

/// The caption for a scene: the complete listing, then the sentence that answers `question` (if any).
pub fn caption(scene: &Scene, question: Option<&Question>) -> String {
    let mut claims = vec![Claim::Listing(scene.objects().to_vec())];
    if let Some(q) = question {
        if let Some(c) = answer_claim(q, scene) {
            claims.push(c);
        }
    }
    claims
        .iter()
        .map(Claim::sentence)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The claim that states the answer to `q` in `scene` (None when the scene cannot answer it).
pub fn answer_claim(q: &Question, scene: &Scene) -> Option<Claim> {
    let truth = q.truth(scene).ok()?;
    let claim = match *q {
        Question::ColourOf(shape) => Claim::ColourIs {
            shape,
            colour: Colour::from_name(&truth)?,
        },
        Question::ShapeOf(colour) => match Shape::from_name(&truth) {
            Some(shape) => Claim::ShapeIs { colour, shape },
            None => Claim::Count {
                colour: Some(colour),
                shape: None,
                n: 0,
            },
        },
        Question::Count { colour, shape } => Claim::Count {
            colour,
            shape,
            n: parse_number(&truth)?,
        },
        Question::Exists(k) => {
            if truth == "yes" {
                Claim::Exists(k)
            } else {
                Claim::Count {
                    colour: Some(k.colour),
                    shape: Some(k.shape),
                    n: 0,
                }
            }
        }
        Question::Relation { a, rel, b } => Claim::Relation {
            a,
            rel,
            b,
            holds: truth == "yes",
        },
        Question::Which { rel, b } => {
            let (c, s) = truth.split_once(' ')?;
            let a = Kind {
                colour: Colour::from_name(c)?,
                shape: Shape::from_name(s)?,
            };
            Claim::Relation {
                a,
                rel,
                b,
                holds: true,
            }
        }
    };
    // A "which" answer whose kind occurs twice cannot be stated as a checkable sentence: skip it, the listing
    // already carries the evidence.
    claim.check(scene).is_ok().then_some(claim)
}
