//! Rewards: rollouts in, one number per rollout out (METHOD.md §3), plus named parts for logging.
//!
//! Understanding rollouts are scored by answer accuracy, with a forgiving letter parser (a model in training
//! writes "B", "(B)", "B.", "The answer is B", `<answer>B</answer>` or the option's text) and a yes/no parser.
//! Generation rollouts are scored by toy-GenEval: the world's detector reads the image and GenEval's rules
//! (`pairuni_eval::geneval`) judge it against the prompt's requirements — the binary verdict or the dense
//! fraction of satisfied clauses. Prompts that are captions (aligned pairs built from understanding samples)
//! are judged by the caption's own claims against the detected scene. [`WeightedSum`] combines terms.

use pairuni_data::RgbImage;
use pairuni_eval::detector::{Detector, ToyDetector};
use pairuni_eval::geneval::{self, Clause, GenevalParams, Position, PromptMeta, Task};
use pairuni_toyworld::text::{parse_caption, Claim, GenevalLine, PromptSpec};

use crate::config::{RewardKind, RewardTerm};

/// Reward failures: a rollout of the wrong modality, or a prompt no rule can judge.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// The reward got a rollout it cannot score.
    #[error("reward `{reward}` cannot score {what}")]
    WrongInput {
        /// Reward name.
        reward: String,
        /// What it got.
        what: &'static str,
    },
    /// The prompt is neither a toy GenEval prompt nor a toy caption.
    #[error("reward `{reward}`: prompt {prompt:?} is neither a GenEval-style prompt nor a caption of the toy world")]
    UnjudgeablePrompt {
        /// Reward name.
        reward: String,
        /// The prompt.
        prompt: String,
    },
}

/// One rollout to score, with what its reward needs to know about the sample.
#[derive(Debug, Clone, Copy)]
pub enum RewardInput<'a> {
    /// A sampled answer to an understanding question.
    Answer {
        /// The decoded answer text.
        completion: &'a str,
        /// The question, options inline ("… A. x B. y C. z D. w") for multiple choice.
        question: &'a str,
        /// The gold answer: a letter or "yes"/"no".
        gold: &'a str,
    },
    /// A sampled image for a prompt.
    Image {
        /// The decoded image.
        image: &'a RgbImage,
        /// The generation prompt.
        prompt: &'a str,
    },
}

/// A reward function.
pub trait Reward: Send + Sync {
    /// Name used in metrics (`rewards/<name>/mean`).
    fn name(&self) -> &str;
    /// One score per input, in order.
    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<f32>, RewardError>;
}

// ---------------------------------------------------------------------------------------------------------
// Answer parsing

/// The option texts of an inline multiple-choice question ("stem A. x B. y C. z D. w"), in letter order.
pub fn inline_options(question: &str) -> Vec<String> {
    let mut starts = Vec::new();
    for (k, letter) in ['A', 'B', 'C', 'D', 'E', 'F'].into_iter().enumerate() {
        let marker = format!("{letter}. ");
        let from = starts.last().map(|&(_, s): &(usize, usize)| s).unwrap_or(0);
        // Each marker must follow a space (or start the text) and come after the previous one.
        let found = question[from..]
            .match_indices(&marker)
            .map(|(i, _)| i + from)
            .find(|&i| i == 0 || question[..i].ends_with(' '));
        match found {
            Some(i) => starts.push((k, i)),
            None => break,
        }
    }
    if starts.len() < 2 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (j, &(_, s)) in starts.iter().enumerate() {
        let end = starts.get(j + 1).map(|&(_, e)| e).unwrap_or(question.len());
        out.push(question[s + 3..end].trim().to_string());
    }
    out
}

fn strip_answer_tags(text: &str) -> &str {
    match (text.find("<answer>"), text.find("</answer>")) {
        (Some(a), Some(b)) if b > a + 8 => &text[a + 8..b],
        (Some(a), None) => &text[a + 8..],
        _ => text,
    }
}

fn is_edge_punct(c: char) -> bool {
    c.is_whitespace() || "()[]{}.,:;!?\"'*".contains(c)
}

/// The option letter a free-form answer chooses among `n_options` (A, B, …), or `None`.
///
/// Accepted, in order: `<answer>…</answer>` contents; a lone letter in any bracket/punctuation ("B", "(B)",
/// "B.", "b"); the exact text of one option; "answer is B" / "answer: B" / "option B"; a leading "B." or "B)";
/// the text of exactly one option contained in the answer; exactly one standalone capital letter.
pub fn parse_letter(text: &str, options: &[String]) -> Option<char> {
    let n = options.len().clamp(2, 26);
    let in_range = |c: char| c.is_ascii_uppercase() && ((c as u8 - b'A') as usize) < n;
    let body = strip_answer_tags(text).trim();
    let core = body.trim_matches(is_edge_punct);
    let mut chars = core.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        let c = c.to_ascii_uppercase();
        return in_range(c).then_some(c);
    }
    let lower = core.to_lowercase();
    let letter_of = |i: usize| char::from(b'A' + i as u8);
    if let Some(i) = options.iter().position(|o| o.to_lowercase() == lower) {
        return Some(letter_of(i));
    }
    let words: Vec<&str> = body
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    for (i, w) in words.iter().enumerate() {
        let lw = w.to_lowercase();
        let next = words.get(i + 1).copied().unwrap_or("");
        let after_answer_is = lw == "is" && i > 0 && words[i - 1].eq_ignore_ascii_case("answer");
        let after_marker =
            lw == "option" || (lw == "answer" && body.to_lowercase().contains("answer:"));
        if !(after_answer_is || after_marker) {
            continue;
        }
        let after = next;
        let mut cs = after.chars();
        if let (Some(c), None) = (cs.next(), cs.next()) {
            let c = c.to_ascii_uppercase();
            if in_range(c) {
                return Some(c);
            }
        }
    }
    let mut lead = body
        .trim_start_matches(|c: char| c == '(' || c.is_whitespace())
        .chars();
    if let (Some(c), Some(p)) = (lead.next(), lead.next()) {
        if in_range(c) && (p == '.' || p == ')' || p == ':') {
            return Some(c);
        }
    }
    let contained: Vec<usize> = options
        .iter()
        .enumerate()
        .filter(|(_, o)| !o.is_empty() && contains_phrase(&lower, &o.to_lowercase()))
        .map(|(i, _)| i)
        .collect();
    if contained.len() == 1 {
        return Some(letter_of(contained[0]));
    }
    let capitals: Vec<char> = words
        .iter()
        .filter(|w| w.len() == 1)
        .filter_map(|w| w.chars().next())
        .filter(|&c| in_range(c))
        .collect();
    match capitals.as_slice() {
        [c] => Some(*c),
        [first, rest @ ..] if rest.iter().all(|c| c == first) => Some(*first),
        _ => None,
    }
}

fn contains_phrase(haystack: &str, needle: &str) -> bool {
    haystack.match_indices(needle).any(|(i, _)| {
        let before = haystack[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric());
        let after = haystack[i + needle.len()..]
            .chars()
            .next()
            .is_none_or(|c| !c.is_alphanumeric());
        before && after
    })
}

/// Yes (`true`) or no (`false`) from a free-form answer: the first word if it is yes/no, else the only one of
/// the two words that occurs; `None` when neither or both occur.
pub fn parse_yes_no(text: &str) -> Option<bool> {
    let lower = strip_answer_tags(text).to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    match words.first() {
        Some(&"yes") => return Some(true),
        Some(&"no") => return Some(false),
        _ => {}
    }
    let yes = words.contains(&"yes");
    let no = words.contains(&"no");
    match (yes, no) {
        (true, false) => Some(true),
        (false, true) => Some(false),
        _ => None,
    }
}

fn is_yes_no(gold: &str) -> Option<bool> {
    match gold.trim().to_lowercase().as_str() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// 1 if `completion` answers `question` with `gold`, else 0 (yes/no or letter, by the gold answer's form).
pub fn answer_correct(completion: &str, question: &str, gold: &str) -> bool {
    if let Some(g) = is_yes_no(gold) {
        return parse_yes_no(completion) == Some(g);
    }
    let options = inline_options(question);
    let gold_letter = gold.trim().chars().next().map(|c| c.to_ascii_uppercase());
    parse_letter(completion, &options).is_some()
        && parse_letter(completion, &options) == gold_letter
}

// ---------------------------------------------------------------------------------------------------------
// Understanding rewards

/// Which gold answers an accuracy reward scores (others get 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    /// Letters and yes/no.
    Any,
    /// Letters only.
    Choice,
    /// Yes/no only.
    YesNo,
}

/// Answer accuracy: 1 for a correct parsed answer, 0 otherwise.
#[derive(Debug, Clone)]
pub struct Accuracy {
    name: String,
    kind: AnswerKind,
}

impl Accuracy {
    /// An accuracy reward over the given answer kind.
    pub fn new(kind: AnswerKind) -> Self {
        let name = match kind {
            AnswerKind::Any => "accuracy",
            AnswerKind::Choice => "mcq_accuracy",
            AnswerKind::YesNo => "yes_no_accuracy",
        };
        Self {
            name: name.into(),
            kind,
        }
    }
}

impl Reward for Accuracy {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<f32>, RewardError> {
        batch
            .iter()
            .map(|input| match *input {
                RewardInput::Answer {
                    completion,
                    question,
                    gold,
                } => {
                    let yn = is_yes_no(gold).is_some();
                    let applies = match self.kind {
                        AnswerKind::Any => true,
                        AnswerKind::Choice => !yn,
                        AnswerKind::YesNo => yn,
                    };
                    Ok(if applies && answer_correct(completion, question, gold) {
                        1.0
                    } else {
                        0.0
                    })
                }
                RewardInput::Image { .. } => Err(RewardError::WrongInput {
                    reward: self.name.clone(),
                    what: "an image rollout",
                }),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Generation reward

/// Toy-GenEval: detector + GenEval rules; binary verdict or dense fraction of satisfied clauses.
pub struct ToyGenEval<D: Detector = ToyDetector> {
    name: String,
    dense: bool,
    detector: D,
    params: GenevalParams,
}

impl ToyGenEval<ToyDetector> {
    /// With the toy world's detector and GenEval's default thresholds.
    pub fn new(dense: bool) -> Self {
        Self::with_detector(dense, ToyDetector)
    }
}

fn position_of(phrase: &str) -> Option<Position> {
    [
        Position::LeftOf,
        Position::RightOf,
        Position::Above,
        Position::Below,
    ]
    .into_iter()
    .find(|p| p.phrase() == phrase)
}

/// The GenEval requirements of a toy prompt line, in `pairuni_eval`'s types.
pub fn prompt_meta(line: &GenevalLine) -> Option<PromptMeta> {
    let clause = |c: &pairuni_toyworld::text::GenevalClause| -> Option<Clause> {
        Some(Clause {
            class: c.class.clone(),
            count: c.count,
            color: c.color.clone(),
            position: match &c.position {
                Some((p, i)) => Some((position_of(p)?, *i)),
                None => None,
            },
        })
    };
    Some(PromptMeta {
        task: Task::from_tag(&line.tag)?,
        include: line
            .include
            .iter()
            .map(clause)
            .collect::<Option<Vec<_>>>()?,
        exclude: line
            .exclude
            .iter()
            .map(clause)
            .collect::<Option<Vec<_>>>()?,
        prompt: line.prompt.clone(),
    })
}

/// Dense and binary score of a caption's claims against the scene read from the image. A complete listing
/// counts as one claim per listed or detected object (matched ones hold), so a near miss earns partial credit.
fn judge_caption(claims: &[Claim], image: &RgbImage) -> (usize, usize) {
    let scene = pairuni_toyworld::read_scene(image);
    let (mut ok, mut total) = (0usize, 0usize);
    for claim in claims {
        match claim {
            Claim::Listing(objs) => {
                let found = scene.objects();
                let matched = objs.iter().filter(|o| found.contains(o)).count();
                ok += matched;
                total += objs.len().max(found.len()).max(1);
                if objs.is_empty() && found.is_empty() {
                    ok += 1;
                }
            }
            other => {
                total += 1;
                ok += usize::from(other.check(&scene).is_ok());
            }
        }
    }
    (ok, total)
}

impl<D: Detector> ToyGenEval<D> {
    /// With any detector.
    pub fn with_detector(dense: bool, detector: D) -> Self {
        let name = if dense { "geneval_dense" } else { "geneval" };
        Self {
            name: name.into(),
            dense,
            detector,
            params: GenevalParams::default(),
        }
    }

    fn score_one(&self, image: &RgbImage, prompt: &str) -> Result<f32, RewardError> {
        let (ok, total) = if let Some(meta) = PromptSpec::parse(prompt)
            .ok()
            .and_then(|s| prompt_meta(&s.geneval_line()))
        {
            let v = geneval::judge(&meta, &self.detector.detect(image), &self.params);
            (v.satisfied, v.clauses)
        } else if let Ok(claims) = parse_caption(prompt) {
            judge_caption(&claims, image)
        } else {
            return Err(RewardError::UnjudgeablePrompt {
                reward: self.name.clone(),
                prompt: prompt.to_string(),
            });
        };
        Ok(if self.dense {
            if total == 0 {
                1.0
            } else {
                ok as f32 / total as f32
            }
        } else if ok == total {
            1.0
        } else {
            0.0
        })
    }
}

impl<D: Detector + Send> Reward for ToyGenEval<D> {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &[RewardInput<'_>]) -> Result<Vec<f32>, RewardError> {
        batch
            .iter()
            .map(|input| match *input {
                RewardInput::Image { image, prompt } => self.score_one(image, prompt),
                RewardInput::Answer { .. } => Err(RewardError::WrongInput {
                    reward: self.name.clone(),
                    what: "a text rollout",
                }),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Sums

/// Scores of a batch: the weighted total per rollout and each term's own scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Σ weight × term, per rollout.
    pub total: Vec<f32>,
    /// (term name, its unweighted scores).
    pub parts: Vec<(String, Vec<f32>)>,
}

/// A weighted sum of rewards.
pub struct WeightedSum {
    terms: Vec<(f32, Box<dyn Reward>)>,
}

impl WeightedSum {
    /// From (weight, reward) terms.
    pub fn new(terms: Vec<(f32, Box<dyn Reward>)>) -> Self {
        Self { terms }
    }

    /// From config terms.
    pub fn from_config(terms: &[RewardTerm]) -> Self {
        Self::new(
            terms
                .iter()
                .map(|t| {
                    let r: Box<dyn Reward> = match t.kind {
                        RewardKind::Accuracy => Box::new(Accuracy::new(AnswerKind::Any)),
                        RewardKind::McqAccuracy => Box::new(Accuracy::new(AnswerKind::Choice)),
                        RewardKind::YesNoAccuracy => Box::new(Accuracy::new(AnswerKind::YesNo)),
                        RewardKind::GenevalBinary => Box::new(ToyGenEval::new(false)),
                        RewardKind::GenevalDense => Box::new(ToyGenEval::new(true)),
                    };
                    (t.weight as f32, r)
                })
                .collect(),
        )
    }

    /// Scores a batch with every term.
    pub fn score(&self, batch: &[RewardInput<'_>]) -> Result<Scored, RewardError> {
        let mut total = vec![0f32; batch.len()];
        let mut parts = Vec::with_capacity(self.terms.len());
        for (w, r) in &self.terms {
            let s = r.score(batch)?;
            for (t, v) in total.iter_mut().zip(&s) {
                *t += w * v;
            }
            parts.push((r.name().to_string(), s));
        }
        Ok(Scored { total, parts })
    }
}

/// True when a reward kind scores text answers (false: images).
pub fn is_understanding_reward(kind: RewardKind) -> bool {
    matches!(
        kind,
        RewardKind::Accuracy | RewardKind::McqAccuracy | RewardKind::YesNoAccuracy
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use pairuni_toyworld::{render, Cell, Colour, Object, Scene, Shape};

    fn opts() -> Vec<String> {
        ["red", "green", "blue", "yellow"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn letter_parser_accepts_the_usual_forms() {
        let o = opts();
        for (text, want) in [
            ("B", Some('B')),
            ("b", Some('B')),
            ("(B)", Some('B')),
            ("B.", Some('B')),
            ("The answer is B", Some('B')),
            ("the answer is (C).", Some('C')),
            ("Answer: D", Some('D')),
            ("<answer>B</answer>", Some('B')),
            ("<answer> (A) </answer>", Some('A')),
            ("green", Some('B')),
            ("It is yellow.", Some('D')),
            ("B) green", Some('B')),
            ("E", None),
            ("", None),
            ("red or blue", None),
            ("A B", None),
        ] {
            assert_eq!(parse_letter(text, &o), want, "{text:?}");
        }
    }

    #[test]
    fn inline_options_are_read_from_the_question() {
        let q = "What color is the circle? A. red B. green C. blue D. yellow";
        assert_eq!(inline_options(q), opts());
        assert!(inline_options("Is there a red circle?").is_empty());
        assert!(answer_correct("green", q, "B"));
        assert!(answer_correct("(B)", q, "B"));
        assert!(!answer_correct("red", q, "B"));
    }

    #[test]
    fn yes_no_parser() {
        for (text, want) in [
            ("yes", Some(true)),
            ("No.", Some(false)),
            ("Yes, there is", Some(true)),
            ("There is no cat", Some(false)),
            ("maybe", None),
            ("yes no", Some(true)),
            ("<answer>no</answer>", Some(false)),
        ] {
            assert_eq!(parse_yes_no(text), want, "{text:?}");
        }
    }

    #[test]
    fn accuracy_rewards_by_kind() {
        let q = "What color is the circle? A. red B. green C. blue D. yellow";
        let batch = [
            RewardInput::Answer {
                completion: "B",
                question: q,
                gold: "B",
            },
            RewardInput::Answer {
                completion: "A",
                question: q,
                gold: "B",
            },
            RewardInput::Answer {
                completion: "yes",
                question: "Is there a red circle?",
                gold: "yes",
            },
            RewardInput::Answer {
                completion: "no",
                question: "Is there a red circle?",
                gold: "yes",
            },
        ];
        assert_eq!(
            Accuracy::new(AnswerKind::Any).score(&batch).unwrap(),
            [1.0, 0.0, 1.0, 0.0]
        );
        assert_eq!(
            Accuracy::new(AnswerKind::Choice).score(&batch).unwrap(),
            [1.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(
            Accuracy::new(AnswerKind::YesNo).score(&batch).unwrap(),
            [0.0, 0.0, 1.0, 0.0]
        );
        let img = RgbImage::new(4, 4);
        let err = Accuracy::new(AnswerKind::Any)
            .score(&[RewardInput::Image {
                image: &img,
                prompt: "x",
            }])
            .unwrap_err();
        assert!(err.to_string().contains("image rollout"));
    }

    fn obj(shape: Shape, colour: Colour, row: u8, col: u8) -> Object {
        Object {
            shape,
            colour,
            cell: Cell::new(row, col).unwrap(),
        }
    }

    #[test]
    fn toy_geneval_binary_and_dense() {
        // "a photo of a red circle and a green square": two include clauses.
        let prompt = "a photo of a red circle and a green square";
        let both = render(
            &Scene::new(vec![
                obj(Shape::Circle, Colour::Red, 0, 0),
                obj(Shape::Square, Colour::Green, 2, 2),
            ])
            .unwrap(),
            32,
        )
        .unwrap();
        let one = render(
            &Scene::new(vec![obj(Shape::Circle, Colour::Red, 0, 0)]).unwrap(),
            32,
        )
        .unwrap();
        let none = render(
            &Scene::new(vec![obj(Shape::Triangle, Colour::Blue, 1, 1)]).unwrap(),
            32,
        )
        .unwrap();
        let batch = [
            RewardInput::Image {
                image: &both,
                prompt,
            },
            RewardInput::Image {
                image: &one,
                prompt,
            },
            RewardInput::Image {
                image: &none,
                prompt,
            },
        ];
        assert_eq!(
            ToyGenEval::new(false).score(&batch).unwrap(),
            [1.0, 0.0, 0.0]
        );
        assert_eq!(
            ToyGenEval::new(true).score(&batch).unwrap(),
            [1.0, 0.5, 0.0]
        );
    }

    #[test]
    fn toy_geneval_judges_caption_prompts() {
        let scene = Scene::new(vec![
            obj(Shape::Circle, Colour::Red, 0, 0),
            obj(Shape::Square, Colour::Blue, 1, 2),
        ])
        .unwrap();
        let caption = pairuni_toyworld::text::caption(&scene, None);
        let exact = render(&scene, 32).unwrap();
        let half = render(
            &Scene::new(vec![obj(Shape::Circle, Colour::Red, 0, 0)]).unwrap(),
            32,
        )
        .unwrap();
        let batch = [
            RewardInput::Image {
                image: &exact,
                prompt: &caption,
            },
            RewardInput::Image {
                image: &half,
                prompt: &caption,
            },
        ];
        assert_eq!(ToyGenEval::new(false).score(&batch).unwrap(), [1.0, 0.0]);
        assert_eq!(ToyGenEval::new(true).score(&batch).unwrap(), [1.0, 0.5]);
        let bad = ToyGenEval::new(true).score(&[RewardInput::Image {
            image: &exact,
            prompt: "a photo of a dog",
        }]);
        assert!(matches!(bad, Err(RewardError::UnjudgeablePrompt { .. })));
    }

    #[test]
    fn weighted_sum_adds_weighted_terms_and_keeps_parts() {
        let q = "Is there a red circle?";
        let batch = [
            RewardInput::Answer {
                completion: "yes",
                question: q,
                gold: "yes",
            },
            RewardInput::Answer {
                completion: "no",
                question: q,
                gold: "yes",
            },
        ];
        let sum = WeightedSum::new(vec![
            (0.5, Box::new(Accuracy::new(AnswerKind::Any))),
            (2.0, Box::new(Accuracy::new(AnswerKind::YesNo))),
        ]);
        let s = sum.score(&batch).unwrap();
        assert_eq!(s.total, [2.5, 0.0]);
        assert_eq!(s.parts[1], ("yes_no_accuracy".to_string(), vec![1.0, 0.0]));
    }
}
