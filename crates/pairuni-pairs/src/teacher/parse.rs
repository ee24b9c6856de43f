//! Strict parsers of teacher replies: a JSON object of exactly the asked-for shape, optionally inside one
//! Markdown code fence (many chat models add one). Anything else is an error message, never a panic.

use super::{Completion, McQuestion, Verdict};
use serde::Deserialize;

/// Strips surrounding whitespace and one optional ```/```json fence.
fn unfence(raw: &str) -> &str {
    let t = raw.trim();
    if let Some(rest) = t.strip_prefix("```") {
        let rest = rest.strip_prefix("json").unwrap_or(rest);
        if let Some(body) = rest.trim_end().strip_suffix("```") {
            return body.trim();
        }
    }
    t
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptionReply {
    caption: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuestionReply {
    question: String,
    options: Vec<String>,
    answer: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerdictReply {
    verdict: String,
    #[serde(default)]
    reason: String,
}

/// Parses `{"caption": "..."}` with a non-empty caption.
pub fn parse_caption(raw: &str) -> Result<Completion, String> {
    let r: CaptionReply =
        serde_json::from_str(unfence(raw)).map_err(|e| format!("caption reply: {e}"))?;
    let caption = r.caption.trim();
    if caption.is_empty() {
        return Err("caption reply: empty caption".into());
    }
    Ok(Completion::Caption(caption.to_string()))
}

/// Parses `{"question", "options": [4 distinct non-empty], "answer": "A".."D"}`.
pub fn parse_question(raw: &str) -> Result<Completion, String> {
    let r: QuestionReply =
        serde_json::from_str(unfence(raw)).map_err(|e| format!("question reply: {e}"))?;
    let question = r.question.trim().to_string();
    if question.is_empty() {
        return Err("question reply: empty question".into());
    }
    let options: Vec<String> = r.options.iter().map(|o| o.trim().to_string()).collect();
    if options.len() != 4 {
        return Err(format!(
            "question reply: {} options, expected 4",
            options.len()
        ));
    }
    if options.iter().any(String::is_empty) {
        return Err("question reply: an option is empty".into());
    }
    let mut sorted = options.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != 4 {
        return Err("question reply: options are not distinct".into());
    }
    let answer = r.answer.trim().to_ascii_uppercase();
    if !matches!(answer.as_str(), "A" | "B" | "C" | "D") {
        return Err(format!(
            "question reply: answer {:?} is not one of A-D",
            r.answer
        ));
    }
    Ok(Completion::Question(McQuestion {
        question,
        options,
        answer,
    }))
}

/// Parses `{"verdict": "accept"|"reject", "reason": "..."}`.
pub fn parse_verdict(raw: &str) -> Result<Verdict, String> {
    let r: VerdictReply =
        serde_json::from_str(unfence(raw)).map_err(|e| format!("verdict reply: {e}"))?;
    match r.verdict.trim().to_ascii_lowercase().as_str() {
        "accept" => Ok(Verdict::Accept),
        "reject" => Ok(Verdict::Reject(if r.reason.trim().is_empty() {
            "rejected by the teacher".into()
        } else {
            r.reason.trim().to_string()
        })),
        other => Err(format!(
            "verdict reply: verdict {other:?} is neither accept nor reject"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_and_fenced_replies() {
        assert_eq!(
            parse_caption(r#"{"caption": " a red circle "}"#),
            Ok(Completion::Caption("a red circle".into()))
        );
        let fenced = "```json\n{\"verdict\": \"Reject\", \"reason\": \"wrong colour\"}\n```";
        assert_eq!(
            parse_verdict(fenced),
            Ok(Verdict::Reject("wrong colour".into()))
        );
        let q = parse_question(
            r#"{"question":"What colour?","options":["red","blue","green","yellow"],"answer":"b"}"#,
        )
        .unwrap();
        match q {
            Completion::Question(q) => {
                assert_eq!(q.answer, "B");
                assert_eq!(q.inline(), "What colour? A. red B. blue C. green D. yellow");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_malformed_replies_with_a_message() {
        for bad in [
            "Sure! Here is a caption: a red circle",
            r#"{"caption": ""}"#,
            r#"{"caption": "x", "extra": 1}"#,
            r#"{"caption": 3}"#,
        ] {
            assert!(parse_caption(bad).is_err(), "{bad}");
        }
        for bad in [
            r#"{"question":"q","options":["a","b","c"],"answer":"A"}"#,
            r#"{"question":"q","options":["a","b","c","c"],"answer":"A"}"#,
            r#"{"question":"q","options":["a","b","c","d"],"answer":"E"}"#,
            r#"{"question":"","options":["a","b","c","d"],"answer":"A"}"#,
        ] {
            assert!(parse_question(bad).is_err(), "{bad}");
        }
        assert!(parse_verdict(r#"{"verdict": "maybe"}"#).is_err());
        assert!(parse_verdict("").is_err());
    }
}
