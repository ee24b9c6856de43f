//! Small helpers shared by the readers.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Deserialises an id written either as a JSON string or as an integer (POPE uses integers) into a string.
pub(crate) fn id_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string or an integer id, found {other}"
        ))),
    }
}

/// Like [`id_string`] for an optional field.
pub(crate) fn opt_id_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    id_string(d).map(Some)
}

/// Reads a "yes"/"no" gold label: case-insensitive, surrounding space and a trailing '.' ignored.
pub(crate) fn gold_yes_no(raw: &str) -> Option<bool> {
    match raw.trim().trim_end_matches('.').to_lowercase().as_str() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// Reads a gold option letter ("B", " b ", "(B)") as an upper-case letter.
pub(crate) fn gold_letter(raw: &str) -> Option<char> {
    let t = raw
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .trim();
    let mut chars = t.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_alphabetic() => Some(c.to_ascii_uppercase()),
        _ => None,
    }
}

/// Option texts written as a JSON array, or as a string holding a JSON array or a Python list literal
/// (`"['red', \"it's blue\"]"`, the form of MMMU's `options` column).
pub(crate) fn options_list<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(serde::de::Error::custom(format!(
                    "option is not a string: {other}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Value::String(s) => {
            if let Ok(v) = serde_json::from_str::<Vec<String>>(&s) {
                return Ok(Some(v));
            }
            python_str_list(&s).map(Some).ok_or_else(|| {
                serde::de::Error::custom(format!("not a list of option strings: {s:?}"))
            })
        }
        other => Err(serde::de::Error::custom(format!(
            "expected a list of options, found {other}"
        ))),
    }
}

/// Parses a Python list of string literals (single or double quotes, backslash escapes).
fn python_str_list(text: &str) -> Option<Vec<String>> {
    let mut chars = text.trim().chars().peekable();
    let mut out = Vec::new();
    if chars.next()? != '[' {
        return None;
    }
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next()? {
            ']' if out.is_empty() => break,
            q @ ('\'' | '"') => {
                let mut item = String::new();
                loop {
                    match chars.next()? {
                        '\\' => match chars.next()? {
                            'n' => item.push('\n'),
                            't' => item.push('\t'),
                            c => item.push(c),
                        },
                        c if c == q => break,
                        c => item.push(c),
                    }
                }
                out.push(item);
            }
            _ => return None,
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next()? {
            ',' => continue,
            ']' => break,
            _ => return None,
        }
    }
    chars.all(char::is_whitespace).then_some(out)
}
