//! Paired comparison of two models on the same multiple-choice questions: how many answers a change of model
//! turned right or wrong, and an exact sign test on those discordant questions.
//!
//! A before/after accuracy difference on a few hundred questions says little by itself (one seed's 200
//! questions have a standard error of ≈ 3.5 points); the questions whose answer did not change carry no
//! information about the change, so the discordant ones are what to test (McNemar's exact form).

use serde::Serialize;

use crate::mcq::{judge_choice, ChoiceRule, McqGold};
use crate::predictions::Predictions;

/// Per-question outcome counts of `after` against `before` on the questions both answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PairedChange {
    /// Wrong before, right after.
    pub improved: usize,
    /// Right before, wrong after.
    pub regressed: usize,
    /// Right both times.
    pub both_right: usize,
    /// Wrong both times.
    pub both_wrong: usize,
}

impl PairedChange {
    /// Questions compared.
    pub fn total(&self) -> usize {
        self.improved + self.regressed + self.both_right + self.both_wrong
    }

    /// One-sided exact sign test: the probability of at least `improved` improvements among the discordant
    /// questions if a change were equally likely to go either way. 1 when nothing changed.
    pub fn sign_test_p(&self) -> f64 {
        binomial_upper_tail_half(self.improved, self.improved + self.regressed)
    }
}

/// P(X ≥ k) for X ~ Binomial(n, ½), summed in log space so that large `n` does not underflow.
pub fn binomial_upper_tail_half(k: usize, n: usize) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    // ln C(n, i) for i = k..=n, built up from ln C(n, k).
    let ln_choose_k: f64 = (0..k)
        .map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln())
        .sum();
    let mut terms = Vec::with_capacity(n - k + 1);
    let mut ln_c = ln_choose_k;
    for i in k..=n {
        terms.push(ln_c);
        if i < n {
            ln_c += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
        }
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ln_sum = max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln();
    (ln_sum - n as f64 * std::f64::consts::LN_2).exp().min(1.0)
}

/// Judges both prediction sets under `rule` on every gold question that both answered.
pub fn compare_mcq(
    gold: &McqGold,
    before: &Predictions,
    after: &Predictions,
    rule: ChoiceRule,
    seed: u64,
) -> PairedChange {
    let mut change = PairedChange::default();
    for q in &gold.questions {
        let (Some(b), Some(a)) = (before.get(&q.question_id), after.get(&q.question_id)) else {
            continue;
        };
        match (
            judge_choice(q, b, rule, seed).0,
            judge_choice(q, a, rule, seed).0,
        ) {
            (false, true) => change.improved += 1,
            (true, false) => change.regressed += 1,
            (true, true) => change.both_right += 1,
            (false, false) => change.both_wrong += 1,
        }
    }
    change
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcq::read_mcq;
    use crate::predictions::{Prediction, Predictions};

    #[test]
    fn sign_test_tail_matches_hand_sums() {
        // n = 5: P(X ≥ 5) = 1/32, P(X ≥ 4) = 6/32, P(X ≥ 3) = 16/32.
        assert!((binomial_upper_tail_half(5, 5) - 1.0 / 32.0).abs() < 1e-12);
        assert!((binomial_upper_tail_half(4, 5) - 6.0 / 32.0).abs() < 1e-12);
        assert!((binomial_upper_tail_half(3, 5) - 0.5).abs() < 1e-12);
        assert_eq!(binomial_upper_tail_half(0, 7), 1.0);
        assert_eq!(binomial_upper_tail_half(8, 7), 0.0);
        // n = 33, k = 19: Σ_{i≥19} C(33, i) / 2^33 = 2,091,005,866 / 8,589,934,592 (summed exactly).
        assert!(
            (binomial_upper_tail_half(19, 33) - 2_091_005_866.0 / 8_589_934_592.0).abs() < 1e-12
        );
        // Far past f64's 2^-1074: still finite, and the two tails of a symmetric law add up to 1.
        let upper = binomial_upper_tail_half(1_300, 2_000);
        assert!(upper > 0.0 && upper < 1e-30);
        let sum = binomial_upper_tail_half(1_000, 2_000) + binomial_upper_tail_half(1_001, 2_000);
        assert!((sum - 1.0).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn compare_counts_each_kind_of_change_and_skips_unanswered_questions() {
        let dir = tempfile::tempdir().unwrap();
        let gold_path = dir.path().join("q.jsonl");
        let line = |id: &str, answer: &str| {
            format!(
                r#"{{"question_id":"{id}","question":"Which? A. x B. y","options":["x","y"],"answer":"{answer}","category":"c"}}"#
            )
        };
        let rows = [
            line("q1", "A"),
            line("q2", "A"),
            line("q3", "B"),
            line("q4", "B"),
            line("q5", "A"),
        ];
        std::fs::write(&gold_path, rows.join("\n")).unwrap();
        let gold = read_mcq(&gold_path).unwrap();
        let preds = |name: &str, outs: &[(&str, &str)]| {
            Predictions::from_vec(
                dir.path().join(name),
                outs.iter()
                    .map(|(id, out)| Prediction {
                        question_id: id.to_string(),
                        output: out.to_string(),
                    })
                    .collect(),
            )
            .unwrap()
        };
        let before = preds(
            "b",
            &[
                ("q1", "B"),
                ("q2", "A"),
                ("q3", "B"),
                ("q4", "A"),
                ("q5", "B"),
            ],
        );
        // q5 is missing after, so it is not compared.
        let after = preds("a", &[("q1", "A"), ("q2", "B"), ("q3", "B"), ("q4", "A")]);
        let c = compare_mcq(&gold, &before, &after, ChoiceRule::MmStar, 0);
        assert_eq!(
            c,
            PairedChange {
                improved: 1,
                regressed: 1,
                both_right: 1,
                both_wrong: 1
            }
        );
        assert_eq!(c.total(), 4);
        // One improvement and one regression: P(X ≥ 1 | n = 2) = 3/4.
        assert!((c.sign_test_p() - 0.75).abs() < 1e-12);
    }
}
