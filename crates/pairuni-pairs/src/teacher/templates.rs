//! Versioned prompt templates (`prompts/teacher/*.txt`): a first line `version: <string>`, then the text with
//! `{placeholder}`s. The version enters every cache key, so editing a template's text without bumping its
//! version is the one way to get stale cache hits — bump it.

use crate::error::{PairsError, Result};
use std::path::Path;

/// One loaded template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The template's name (file stem).
    pub name: String,
    /// Its version string.
    pub version: String,
    /// The text after the version line.
    pub body: String,
}

impl Template {
    /// Parses a template file's text.
    pub fn parse(name: &str, text: &str) -> Result<Self> {
        let err = |message: String| PairsError::Template {
            name: name.to_string(),
            message,
        };
        let (first, body) = text
            .split_once('\n')
            .ok_or_else(|| err("no version line".into()))?;
        let version = first
            .strip_prefix("version:")
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| err(format!("line 1 must be `version: <string>`, got {first:?}")))?;
        Ok(Self {
            name: name.into(),
            version: version.into(),
            body: body.trim().to_string(),
        })
    }

    /// Substitutes `{key}` for each (key, value); a placeholder left unfilled is an error.
    pub fn render(&self, vars: &[(&str, &str)]) -> Result<String> {
        let mut out = self.body.clone();
        for (k, v) in vars {
            out = out.replace(&format!("{{{k}}}"), v);
        }
        for known in [
            "question",
            "answer",
            "prompt",
            "caption",
            "completion_question",
            "completion_options",
            "completion_answer",
        ] {
            if out.contains(&format!("{{{known}}}")) {
                return Err(PairsError::Template {
                    name: self.name.clone(),
                    message: format!("placeholder {{{known}}} is not available in this template"),
                });
            }
        }
        Ok(out)
    }
}

/// The four templates a teacher needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templates {
    /// Caption for an understanding sample.
    pub caption: Template,
    /// Multiple-choice question for a generation sample.
    pub question: Template,
    /// Verification of a caption.
    pub verify_caption: Template,
    /// Verification of a question.
    pub verify_question: Template,
}

const BUILTIN: [(&str, &str); 4] = [
    (
        "caption",
        include_str!("../../../../prompts/teacher/caption.txt"),
    ),
    (
        "question",
        include_str!("../../../../prompts/teacher/question.txt"),
    ),
    (
        "verify_caption",
        include_str!("../../../../prompts/teacher/verify_caption.txt"),
    ),
    (
        "verify_question",
        include_str!("../../../../prompts/teacher/verify_question.txt"),
    ),
];

impl Templates {
    /// The templates compiled into the binary (the repository's `prompts/teacher/`).
    pub fn builtin() -> Self {
        Self::from_texts(|name| {
            Ok(BUILTIN
                .iter()
                .find(|(n, _)| *n == name)
                .expect("known name")
                .1
                .to_string())
        })
        .expect("built-in templates parse (checked by a test)")
    }

    /// Loads `<dir>/{caption,question,verify_caption,verify_question}.txt`.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::from_texts(|name| {
            let path = dir.join(format!("{name}.txt"));
            std::fs::read_to_string(&path).map_err(|e| PairsError::io(path, e))
        })
    }

    fn from_texts(read: impl Fn(&str) -> Result<String>) -> Result<Self> {
        let get = |name: &str| Template::parse(name, &read(name)?);
        Ok(Self {
            caption: get("caption")?,
            question: get("question")?,
            verify_caption: get("verify_caption")?,
            verify_question: get("verify_question")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_templates_parse_and_render() {
        let t = Templates::builtin();
        assert_eq!(t.caption.version, "caption-v1");
        let text = t
            .caption
            .render(&[("question", "What colour?"), ("answer", "B")])
            .unwrap();
        assert!(text.contains("What colour?") && !text.contains("{question}"));
        assert!(
            t.question.render(&[]).is_err(),
            "missing {{prompt}} must be an error"
        );
    }

    #[test]
    fn template_without_version_line_is_an_error() {
        let e = Template::parse("x", "Describe the image\n").unwrap_err();
        assert!(e.to_string().contains("version"), "{e}");
    }
}
