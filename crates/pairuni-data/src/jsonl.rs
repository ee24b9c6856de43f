//! JSON Lines reading and writing with errors that name file, line and field.
//!
//! Each non-blank line is parsed to a `serde_json::Value` first (so syntax errors and type errors are told
//! apart), then into the record type through `serde_path_to_error`, which gives the dotted path of the field
//! that failed. Blank lines are skipped but still counted, so line numbers match an editor's.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::atomic::write_atomic;
use crate::error::{DataError, FieldProblem};
use crate::records::{GenerationSample, PairRecord, UnderstandingSample};

/// The field label used when the whole record (not one field) has the wrong shape, e.g. a line holding an array.
pub const ROOT_FIELD: &str = "<record>";

/// Iterates the non-blank lines of a JSONL file as JSON values, with their 1-based line numbers.
///
/// Yields `(line, Err(Malformed))` for a line that is not JSON and keeps going; after an I/O error it yields
/// that error once and stops.
pub struct JsonlValues {
    path: PathBuf,
    reader: BufReader<File>,
    line: usize,
    buf: Vec<u8>,
    done: bool,
}

impl JsonlValues {
    /// Opens `path` for reading.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        Ok(JsonlValues {
            path,
            reader: BufReader::new(file),
            line: 0,
            buf: Vec::new(),
            done: false,
        })
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Iterator for JsonlValues {
    type Item = (usize, Result<Value, DataError>);

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => self.done = true,
                Ok(_) => {
                    self.line += 1;
                    let text = match std::str::from_utf8(&self.buf) {
                        Ok(text) => text.trim(),
                        Err(e) => {
                            let message = format!("not UTF-8 (byte {})", e.valid_up_to() + 1);
                            return Some((
                                self.line,
                                Err(malformed(&self.path, self.line, message)),
                            ));
                        }
                    };
                    if text.is_empty() {
                        continue;
                    }
                    let value = serde_json::from_str::<Value>(text).map_err(|e| {
                        let message = format!("{} (column {})", strip_position(&e), e.column());
                        malformed(&self.path, self.line, message)
                    });
                    return Some((self.line, value));
                }
                Err(e) => {
                    self.done = true;
                    return Some((self.line + 1, Err(DataError::io(&self.path, e))));
                }
            }
        }
        None
    }
}

/// Iterates the records of a JSONL file as `(line, record)`; errors are per line (see [`JsonlValues`]).
pub struct JsonlReader<T> {
    values: JsonlValues,
    objects_only: bool,
    _record: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> JsonlReader<T> {
    /// Opens `path` for reading records of type `T`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DataError> {
        Ok(JsonlReader {
            values: JsonlValues::open(path)?,
            objects_only: false,
            _record: PhantomData,
        })
    }

    /// Rejects lines that are not JSON objects. serde would otherwise fill a struct from an array
    /// positionally, silently accepting `["u1", "a.png", …]` as a record.
    pub fn objects_only(mut self) -> Self {
        self.objects_only = true;
        self
    }
}

impl<T: DeserializeOwned> Iterator for JsonlReader<T> {
    type Item = Result<(usize, T), DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (line, value) = self.values.next()?;
        let path = &self.values.path;
        let objects_only = self.objects_only;
        Some(value.and_then(|v| {
            if objects_only {
                require_object(path, line, &v)?;
            }
            parse_value(path, line, v).map(|record| (line, record))
        }))
    }
}

/// Reads every record of `path`, stopping at the first problem.
pub fn read_jsonl<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<Vec<T>, DataError> {
    JsonlReader::open(path)?
        .map(|item| item.map(|(_, record)| record))
        .collect()
}

/// Reads every good record of `path` with its line number, and collects every problem instead of stopping.
pub fn read_jsonl_all<T: DeserializeOwned>(
    path: impl AsRef<Path>,
) -> (Vec<(usize, T)>, Vec<DataError>) {
    let mut records = Vec::new();
    let mut problems = Vec::new();
    match JsonlReader::<T>::open(path) {
        Ok(reader) => {
            for item in reader {
                match item {
                    Ok(record) => records.push(record),
                    Err(e) => problems.push(e),
                }
            }
        }
        Err(e) => problems.push(e),
    }
    (records, problems)
}

/// Errors unless `value` is a JSON object (all record types are objects); names the line.
pub fn require_object(path: &Path, line: usize, value: &Value) -> Result<(), DataError> {
    let found = match value {
        Value::Object(_) => return Ok(()),
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
    };
    Err(DataError::Field {
        path: path.to_path_buf(),
        line,
        field: ROOT_FIELD.to_owned(),
        problem: FieldProblem::Invalid,
        message: format!("expected a JSON object, found {found}"),
    })
}

/// Reads every record of `path` (each line must be a JSON object), stopping at the first problem.
fn read_objects<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<Vec<T>, DataError> {
    JsonlReader::open(path)?
        .objects_only()
        .map(|item| item.map(|(_, record)| record))
        .collect()
}

/// Converts one parsed line into a record; `path` and `line` only label the error.
pub fn parse_value<T: DeserializeOwned>(
    path: &Path,
    line: usize,
    value: Value,
) -> Result<T, DataError> {
    serde_path_to_error::deserialize(value).map_err(|e| field_error(path, line, e))
}

/// Parses one line of text into a record; `path` and `line` only label the error.
pub fn parse_line<T: DeserializeOwned>(
    path: &Path,
    line: usize,
    text: &str,
) -> Result<T, DataError> {
    let value = serde_json::from_str::<Value>(text.trim()).map_err(|e| {
        malformed(
            path,
            line,
            format!("{} (column {})", strip_position(&e), e.column()),
        )
    })?;
    parse_value(path, line, value)
}

/// Writes `records` to `path` atomically, one compact JSON object per line.
pub fn write_jsonl<T: Serialize>(path: impl AsRef<Path>, records: &[T]) -> Result<(), DataError> {
    write_atomic(path, |w| {
        for record in records {
            serde_json::to_writer(&mut *w, record)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// Reads an understanding pool (stops at the first problem).
pub fn read_understanding_pool(
    path: impl AsRef<Path>,
) -> Result<Vec<UnderstandingSample>, DataError> {
    read_objects(path)
}

/// Reads a generation pool (stops at the first problem).
pub fn read_generation_pool(path: impl AsRef<Path>) -> Result<Vec<GenerationSample>, DataError> {
    read_objects(path)
}

/// Reads a PairUG file (official or ours; stops at the first problem).
pub fn read_pairs(path: impl AsRef<Path>) -> Result<Vec<PairRecord>, DataError> {
    read_objects(path)
}

/// Writes an understanding pool atomically.
pub fn write_understanding_pool(
    path: impl AsRef<Path>,
    samples: &[UnderstandingSample],
) -> Result<(), DataError> {
    write_jsonl(path, samples)
}

/// Writes a generation pool atomically.
pub fn write_generation_pool(
    path: impl AsRef<Path>,
    samples: &[GenerationSample],
) -> Result<(), DataError> {
    write_jsonl(path, samples)
}

/// Writes a PairUG file atomically. A non-finite similarity is refused: JSON would store it as `null`,
/// which no reader accepts, so the error names the would-be line instead.
pub fn write_pairs(path: impl AsRef<Path>, pairs: &[PairRecord]) -> Result<(), DataError> {
    let path = path.as_ref();
    if let Some(i) = pairs.iter().position(|p| !p.similarity.is_finite()) {
        return Err(DataError::Field {
            path: path.to_path_buf(),
            line: i + 1,
            field: "similarity".to_owned(),
            problem: FieldProblem::Invalid,
            message: format!("{} cannot be written as JSON", pairs[i].similarity),
        });
    }
    write_jsonl(path, pairs)
}

fn malformed(path: &Path, line: usize, message: String) -> DataError {
    DataError::Malformed {
        path: path.to_path_buf(),
        line,
        message,
    }
}

/// serde_json appends " at line L column C" to its messages; we report our own line, so drop it.
fn strip_position(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match text.rfind(" at line ") {
        Some(i) if err.line() != 0 => text[..i].to_owned(),
        _ => text,
    }
}

/// The name between the backticks of serde's "missing field `x`" / "unknown field `x`, …" messages.
fn backticked_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split('`').next()
}

fn field_error(
    path: &Path,
    line: usize,
    err: serde_path_to_error::Error<serde_json::Error>,
) -> DataError {
    let at = err.path().to_string();
    let message = strip_position(err.inner());
    let join = |name: &str| {
        if at == "." {
            name.to_owned()
        } else {
            format!("{at}.{name}")
        }
    };
    // serde reports a missing or unknown field at its parent; name the field itself.
    let (problem, field) = if let Some(name) = backticked_after(&message, "missing field `") {
        (FieldProblem::Missing, join(name))
    } else if let Some(name) = backticked_after(&message, "unknown field `") {
        let field = if at.rsplit('.').next() == Some(name) {
            at.clone()
        } else {
            join(name)
        };
        (FieldProblem::Unknown, field)
    } else if at == "." {
        (FieldProblem::Invalid, ROOT_FIELD.to_owned())
    } else {
        (FieldProblem::Invalid, at.clone())
    };
    DataError::Field {
        path: path.to_path_buf(),
        line,
        field,
        problem,
        message,
    }
}
