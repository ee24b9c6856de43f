//! Teachers complete samples into quadruples and verify their own completions (METHOD.md §2 step 1).
//!
//! A [`Teacher`] answers two kinds of request: [`Teacher::complete`] (a caption for an understanding sample, a
//! multiple-choice question for a generation sample) and [`Teacher::verify`] (does the completion contradict the
//! sample?). [`complete_and_verify`] runs generate-then-verify with bounded retries; [`complete_all`] runs it
//! over a pool with a bounded number of workers. A teacher's bad reply is never an error: it comes back as a
//! [`Failure`] and ends as a counted [`Rejection`] with the raw text kept.

pub mod cache;
pub mod http;
pub mod oracle;
pub mod parse;
pub mod templates;

use crate::error::Result;
use pairuni_data::{GenerationSample, UnderstandingSample};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The sample a request is about.
#[derive(Debug, Clone, Copy)]
pub enum Sample<'a> {
    /// An understanding sample, to be completed with a caption.
    Understanding(&'a UnderstandingSample),
    /// A generation sample, to be completed with a multiple-choice question.
    Generation(&'a GenerationSample),
}

impl Sample<'_> {
    /// The sample's pool id.
    pub fn id(&self) -> &str {
        match self {
            Sample::Understanding(s) => &s.id,
            Sample::Generation(s) => &s.id,
        }
    }

    /// Which pool the sample comes from.
    pub fn pool(&self) -> Pool {
        match self {
            Sample::Understanding(_) => Pool::Understanding,
            Sample::Generation(_) => Pool::Generation,
        }
    }
}

/// A request to a teacher: the sample, its image on disk and the attempt number (each retry is a new request).
#[derive(Debug, Clone)]
pub struct TeacherInput<'a> {
    /// The sample.
    pub sample: Sample<'a>,
    /// The sample's image, resolved against its pool file's folder.
    pub image: PathBuf,
    /// 0 for the first try; retries after a rejected verification count up.
    pub attempt: u32,
}

/// Which pool a sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The understanding pool.
    Understanding,
    /// The generation pool.
    Generation,
}

/// What a teacher wrote for a sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Completion {
    /// A caption for an understanding sample.
    Caption(String),
    /// A multiple-choice question for a generation sample.
    Question(McQuestion),
}

/// A multiple-choice question with four options and a letter answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McQuestion {
    /// The question without its options.
    pub question: String,
    /// The four option texts, in letter order.
    pub options: Vec<String>,
    /// The correct letter, `A`–`D`.
    pub answer: String,
}

impl McQuestion {
    /// The question with its options inline, as pools and PairUG files store it.
    pub fn inline(&self) -> String {
        let opts: Vec<String> = self
            .options
            .iter()
            .enumerate()
            .map(|(i, o)| format!("{}. {}", (b'A' + i as u8) as char, o))
            .collect();
        format!("{} {}", self.question, opts.join(" "))
    }
}

/// A verification result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The completion is consistent with the sample.
    Accept,
    /// The completion contradicts the sample, with the teacher's reason.
    Reject(String),
}

/// Why a single teacher exchange produced nothing usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The reply came but does not parse; the raw text is kept.
    Unparseable {
        /// What the parser objected to.
        message: String,
        /// The reply as received.
        raw: String,
    },
    /// No reply after every transport retry (timeouts, 429, 5xx, connection errors).
    Unavailable(String),
    /// The teacher cannot complete this sample at all (e.g. the oracle cannot parse the prompt).
    Declined(String),
}

/// A teacher (see the module doc). Implementations must be usable from several threads at once.
pub trait Teacher: Send + Sync {
    /// A short description for logs and stats (model and template versions; never a secret).
    fn describe(&self) -> String;
    /// Counters for the stats file (requests, cache hits…); null when the teacher keeps none.
    fn counters(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Writes the completion for `input`.
    fn complete(
        &self,
        input: &TeacherInput<'_>,
    ) -> Result<std::result::Result<Completion, Failure>>;
    /// Checks `completion` against `input`'s sample.
    fn verify(
        &self,
        input: &TeacherInput<'_>,
        completion: &Completion,
    ) -> Result<std::result::Result<Verdict, Failure>>;
}

/// Why a sample was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Every attempt's completion failed verification.
    FailedVerification,
    /// The last attempt's reply (completion or verdict) did not parse.
    Unparseable,
    /// The teacher could not be reached after all transport retries.
    Unavailable,
    /// The teacher cannot complete the sample (retrying would not help).
    Declined,
}

/// A dropped sample, as listed in the stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    /// The sample's pool id.
    pub id: String,
    /// Its pool.
    pub pool: Pool,
    /// Why it was dropped (the last attempt's reason).
    pub reason: RejectReason,
    /// The teacher's reason or the parser's message.
    pub detail: String,
    /// The raw reply that did not parse, if that was the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// Attempts made.
    pub attempts: u32,
}

/// Generate, then verify; up to `1 + verify_retries` attempts. Transport failure ends the sample at once.
pub fn complete_and_verify(
    teacher: &dyn Teacher,
    sample: Sample<'_>,
    image: PathBuf,
    verify_retries: u32,
) -> Result<std::result::Result<Completion, Rejection>> {
    let mut input = TeacherInput {
        sample,
        image,
        attempt: 0,
    };
    let reject = |reason, detail: String, raw, attempts| Rejection {
        id: sample.id().to_string(),
        pool: sample.pool(),
        reason,
        detail,
        raw,
        attempts,
    };
    let mut last = None;
    for attempt in 0..=verify_retries {
        input.attempt = attempt;
        let n = attempt + 1;
        let completion = match teacher.complete(&input)? {
            Ok(c) => c,
            Err(Failure::Unavailable(msg)) => {
                return Ok(Err(reject(RejectReason::Unavailable, msg, None, n)))
            }
            Err(Failure::Declined(msg)) => {
                return Ok(Err(reject(RejectReason::Declined, msg, None, n)))
            }
            Err(Failure::Unparseable { message, raw }) => {
                last = Some(reject(RejectReason::Unparseable, message, Some(raw), n));
                continue;
            }
        };
        match teacher.verify(&input, &completion)? {
            Ok(Verdict::Accept) => return Ok(Ok(completion)),
            Ok(Verdict::Reject(why)) => {
                last = Some(reject(RejectReason::FailedVerification, why, None, n))
            }
            Err(Failure::Unavailable(msg)) => {
                return Ok(Err(reject(RejectReason::Unavailable, msg, None, n)))
            }
            Err(Failure::Declined(msg)) => {
                return Ok(Err(reject(RejectReason::Declined, msg, None, n)))
            }
            Err(Failure::Unparseable { message, raw }) => {
                last = Some(reject(RejectReason::Unparseable, message, Some(raw), n))
            }
        }
    }
    Ok(Err(last.expect("the loop runs at least once")))
}

/// Runs [`complete_and_verify`] over `jobs` with `concurrency` worker threads; results keep the jobs' order.
///
/// The first fatal error (cache or image IO) stops the workers and is returned. `on_done` is called after each
/// job (progress bars).
pub fn complete_all(
    teacher: &dyn Teacher,
    jobs: &[(Sample<'_>, PathBuf)],
    concurrency: usize,
    verify_retries: u32,
    on_done: &(dyn Fn() + Sync),
) -> Result<Vec<std::result::Result<Completion, Rejection>>> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let slots: Mutex<Vec<Option<std::result::Result<Completion, Rejection>>>> =
        Mutex::new(vec![None; jobs.len()]);
    let fatal = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..concurrency.clamp(1, jobs.len().max(1)) {
            scope.spawn(|| loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((sample, image)) = jobs.get(i) else {
                    return;
                };
                match complete_and_verify(teacher, *sample, image.clone(), verify_retries) {
                    Ok(r) => {
                        slots
                            .lock()
                            .expect("no worker panics while holding the lock")[i] = Some(r);
                        on_done();
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        fatal
                            .lock()
                            .expect("no worker panics while holding the lock")
                            .get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = fatal.into_inner().expect("workers joined") {
        return Err(e);
    }
    Ok(slots
        .into_inner()
        .expect("workers joined")
        .into_iter()
        .map(|s| s.expect("every job ran"))
        .collect())
}
