//! The toy world's oracle as a [`Teacher`]: completions from the detector's reading of the image, optionally
//! wrong on purpose (`error_rate`), verified by the world's exact verifier.

use super::{Completion, Failure, McQuestion, Sample, Teacher, TeacherInput, Verdict};
use crate::encoder::load_rgb;
use crate::error::Result;
use pairuni_toyworld::oracle::{verify_caption, verify_question, Oracle};
use pairuni_toyworld::text::format_mcq;

/// Adapter from `pairuni_toyworld::oracle` to [`Teacher`].
#[derive(Debug, Clone, Copy)]
pub struct OracleTeacher {
    error_rate: f64,
    seed: u64,
}

impl OracleTeacher {
    /// An oracle wrong on purpose with probability `error_rate`; `seed` drives its mistakes.
    pub fn new(error_rate: f64, seed: u64) -> Self {
        Self { error_rate, seed }
    }

    /// The oracle for one attempt: the world's oracle draws its mistakes from (seed, sample id) only, so a
    /// retry needs its own seed or it would repeat the same mistake.
    fn oracle(&self, attempt: u32) -> Oracle {
        Oracle::new(
            self.error_rate,
            self.seed ^ (u64::from(attempt)).wrapping_mul(0xd6e8_feb8_6659_fd93),
        )
    }
}

impl Teacher for OracleTeacher {
    fn describe(&self) -> String {
        format!(
            "toy-oracle error_rate={} seed={}",
            self.error_rate, self.seed
        )
    }

    fn complete(
        &self,
        input: &TeacherInput<'_>,
    ) -> Result<std::result::Result<Completion, Failure>> {
        let img = load_rgb(&input.image)?;
        let oracle = self.oracle(input.attempt);
        Ok(match input.sample {
            Sample::Understanding(s) => Ok(Completion::Caption(oracle.caption(s, &img).caption)),
            Sample::Generation(s) => match oracle.question_for(s, &img) {
                Ok(q) => {
                    let suffix = format_mcq("", &q.options);
                    let stem = q
                        .question
                        .strip_suffix(&suffix)
                        .unwrap_or(&q.question)
                        .to_string();
                    Ok(Completion::Question(McQuestion {
                        question: stem,
                        options: q.options,
                        answer: q.answer,
                    }))
                }
                Err(e) => Err(Failure::Declined(e.to_string())),
            },
        })
    }

    fn verify(
        &self,
        input: &TeacherInput<'_>,
        completion: &Completion,
    ) -> Result<std::result::Result<Verdict, Failure>> {
        let img = load_rgb(&input.image)?;
        let verdict = match (input.sample, completion) {
            (Sample::Understanding(s), Completion::Caption(c)) => verify_caption(s, &img, c),
            (Sample::Generation(s), Completion::Question(q)) => {
                verify_question(s, &img, &q.inline(), &q.answer)
            }
            _ => {
                return Ok(Ok(Verdict::Reject(
                    "completion kind does not match the sample's pool".into(),
                )))
            }
        };
        Ok(Ok(match verdict {
            Ok(()) => Verdict::Accept,
            Err(r) => Verdict::Reject(r.reason),
        }))
    }
}
