//! Answer parsers: raw model output → yes/no or an option letter, following each benchmark's published rule.
//!
//! Harnesses disagree most on parsing, so every rule here is a re-implementation of one named reference and
//! keeps that reference's quirks (documented per function, checked by table tests in `tests/parsers.rs`):
//!
//! | function | reference rule |
//! |---|---|
//! | [`parse_yes_no`] / [`parse_yes_no_mme`] | lmms-eval `tasks/mme/utils.py::parse_pred_ans` (from Otter) |
//! | [`parse_yes_no_pope`] | POPE `evaluate.py` (first sentence; "No"/"not"/"no" word → no, else yes) |
//! | [`parse_yes_no_exact`] | lmms-eval `tasks/pope/utils.py` (lower-cased, trimmed output equals "yes"/"no") |
//! | [`mmstar_matches`] / [`parse_choice_mmstar`] | MMStar's `exact_match` (as carried by lmms-eval `tasks/mmstar`) |
//! | [`parse_choice`] / [`parse_choice_mmmu`] | MMMU `eval/eval_utils.py::parse_multi_choice_response` |
//!
//! No parser panics on any input (property-tested).

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The option letters of a question with `n` options: 'A', 'B', … (at most 26).
pub fn option_letters(n: usize) -> impl Iterator<Item = char> {
    (b'A'..=b'Z').take(n).map(char::from)
}

/// lmms-eval's MME rule (the default yes/no parser, reused by the RL rewards).
///
/// Lower-case, trim, delete every '.'; then: exactly "yes"/"no" → that; a single character → "y"/"n" or
/// unparsed; otherwise look at the first 4 characters: containing "yes" → yes, else containing "no" → no, else
/// unparsed (`None`). So "Nope" and "Not really" are no, "Yes, there is" is yes, "There is no cat" is `None`.
pub fn parse_yes_no(text: &str) -> Option<bool> {
    parse_yes_no_mme(text)
}

/// The MME rule of lmms-eval; see [`parse_yes_no`].
pub fn parse_yes_no_mme(text: &str) -> Option<bool> {
    let cleaned: String = text.to_lowercase().trim().replace('.', "");
    match cleaned.as_str() {
        "yes" => return Some(true),
        "no" => return Some(false),
        _ => {}
    }
    if cleaned.chars().count() == 1 {
        return match cleaned.as_str() {
            "y" => Some(true),
            "n" => Some(false),
            _ => None,
        };
    }
    let prefix: String = cleaned.chars().take(4).collect();
    if prefix.contains("yes") {
        Some(true)
    } else if prefix.contains("no") {
        Some(false)
    } else {
        None
    }
}

/// POPE's official yes/no extraction (its `evaluate.py`); it never fails to decide.
///
/// Keep the text before the first '.', delete commas, split on single spaces (not on other whitespace); if one
/// of the words is exactly "No", "not" or "no" the answer is no, otherwise yes. Case matters: "NO" is yes, and
/// "Nope" is yes — these quirks are the published rule and are kept.
pub fn parse_yes_no_pope(text: &str) -> bool {
    let first_sentence = text.split('.').next().unwrap_or("");
    let without_commas = first_sentence.replace(',', "");
    let says_no = without_commas
        .split(' ')
        .any(|w| w == "No" || w == "not" || w == "no");
    !says_no
}

/// Exact match (lmms-eval's POPE task): the lower-cased, trimmed output must be exactly "yes" or "no".
pub fn parse_yes_no_exact(text: &str) -> Option<bool> {
    match text.to_lowercase().trim() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// MMStar's matching rule: is `text` a correct answer to a question whose gold letter is `gold`?
///
/// Lower-case, trim, newlines → spaces; correct if the first character is the gold letter, or the text starts
/// with "(" and the second character is, or starts with "option " and the 8th is, or starts with
/// "the answer is " and the 15th is. Anything else (including "Answer: B") is wrong.
pub fn mmstar_matches(text: &str, gold: char) -> bool {
    let gold: String = gold.to_lowercase().collect();
    let predict: Vec<char> = text
        .to_lowercase()
        .trim()
        .replace('\n', " ")
        .chars()
        .collect();
    let at = |i: usize| predict.get(i).map(|c| c.to_string());
    let starts = |prefix: &str| {
        let p: Vec<char> = prefix.chars().collect();
        predict.len() >= p.len() && predict[..p.len()] == p[..]
    };
    if predict.is_empty() {
        return false;
    }
    at(0).as_deref() == Some(gold.as_str())
        || (predict[0] == '(' && at(1).as_deref() == Some(gold.as_str()))
        || (starts("option ") && at(7).as_deref() == Some(gold.as_str()))
        || (starts("the answer is ") && at(14).as_deref() == Some(gold.as_str()))
}

/// The letter MMStar's rule reads from `text`, upper-cased, if it is one of the first `n_options` letters.
///
/// Priority: "(X" → X; "option X" → X; "the answer is X" → X; else the first character. This agrees with
/// [`mmstar_matches`] for every gold letter except 'O' and 'T' (where the rule's first-character test also
/// fires on "option …"/"the answer is …"); scoring uses [`mmstar_matches`] itself.
pub fn parse_choice_mmstar(text: &str, n_options: usize) -> Option<char> {
    let predict: Vec<char> = text
        .to_lowercase()
        .trim()
        .replace('\n', " ")
        .chars()
        .collect();
    let starts = |prefix: &str| {
        let p: Vec<char> = prefix.chars().collect();
        predict.len() >= p.len() && predict[..p.len()] == p[..]
    };
    let index = if predict.first() == Some(&'(') {
        1
    } else if starts("option ") {
        7
    } else if starts("the answer is ") {
        14
    } else {
        0
    };
    let c = predict.get(index)?.to_ascii_uppercase();
    option_letters(n_options).find(|&l| l == c)
}

/// MMMU's order without the random fallback: the parsed letter, or `None` when nothing parses.
///
/// This is the parser the RL rewards reuse (an unparseable answer earns nothing instead of a lucky guess).
/// Rule, after stripping each of `, . ! ? ; : '` from both ends in that order and padding with one space:
/// (1) letters written "(A)"; (2) else letters standing alone as " A "; (3) else, only when the response has
/// more than 5 whitespace-separated words, option texts contained in it (case-insensitive). Among several
/// candidates of the winning step the one whose last occurrence starts latest wins (ties: earlier letter).
pub fn parse_choice(text: &str, options: &[String]) -> Option<char> {
    mmmu_candidates(text, options)
}

/// How a multiple-choice answer was obtained under MMMU's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChoiceParse {
    /// Read from the text.
    Parsed(char),
    /// Nothing parsed; a seeded random letter was drawn (MMMU's fallback).
    Random(char),
}

impl ChoiceParse {
    /// The letter, however obtained.
    pub fn letter(self) -> char {
        match self {
            ChoiceParse::Parsed(c) | ChoiceParse::Random(c) => c,
        }
    }
}

/// MMMU's full rule: [`parse_choice`], and when nothing parses a random option letter drawn from a ChaCha8
/// stream seeded by `seed` and `question_id` (so the draw does not depend on question order). `None` only when
/// `options` is empty.
///
/// The draw cannot reproduce MMMU's Python `random.seed(42)` stream; it reproduces the rule, not the luck.
pub fn parse_choice_mmmu(
    text: &str,
    options: &[String],
    seed: u64,
    question_id: &str,
) -> Option<ChoiceParse> {
    if options.is_empty() {
        return None;
    }
    if let Some(c) = mmmu_candidates(text, options) {
        return Some(ChoiceParse::Parsed(c));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(question_id.as_bytes()));
    let n = options.len().min(26);
    let pick = rng.random_range(0..n);
    option_letters(n).nth(pick).map(ChoiceParse::Random)
}

/// 64-bit FNV-1a: a stable hash (std's hasher is not stable across releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn mmmu_candidates(text: &str, options: &[String]) -> Option<char> {
    let mut response: &str = text;
    for c in [',', '.', '!', '?', ';', ':', '\''] {
        response = response.trim_matches(c);
    }
    let response = format!(" {response} ");
    let letters: Vec<char> = option_letters(options.len()).collect();

    // Step 1: "(A)".
    let bracketed: Vec<(char, usize)> = letters
        .iter()
        .filter_map(|&l| response.rfind(&format!("({l})")).map(|i| (l, i)))
        .collect();
    if !bracketed.is_empty() {
        return last_starting(&bracketed);
    }
    // Step 2: " A ".
    let bare: Vec<(char, usize)> = letters
        .iter()
        .filter_map(|&l| response.rfind(&format!(" {l} ")).map(|i| (l, i)))
        .collect();
    if !bare.is_empty() {
        return last_starting(&bare);
    }
    // Step 3: option text, only for long answers (short ones would match by accident).
    if response.split_whitespace().count() > 5 {
        let lower = response.to_lowercase();
        let by_text: Vec<(char, usize)> = letters
            .iter()
            .zip(options)
            .filter_map(|(&l, opt)| lower.rfind(&opt.to_lowercase()).map(|i| (l, i)))
            .collect();
        if !by_text.is_empty() {
            return last_starting(&by_text);
        }
    }
    None
}

/// The candidate whose last occurrence starts latest; the first such in letter order on ties (numpy argmax).
fn last_starting(cands: &[(char, usize)]) -> Option<char> {
    let mut best: Option<(char, usize)> = None;
    for &(l, i) in cands {
        if best.is_none_or(|(_, b)| i > b) {
            best = Some((l, i));
        }
    }
    best.map(|(l, _)| l)
}
