//! Records that flow through the pairuni pipeline, and their files.
//!
//! Understanding pools, generation pools and PairUG pair files are JSON Lines. This crate holds their record
//! types ([`records`]), readers that report bad input with file, line and field ([`jsonl`], errors in
//! [`error`]), atomic writers that every stage uses for every file ([`atomic`]), image path resolution and
//! RGB loading ([`image`]) and the whole-file validation behind `pairuni data check` ([`validate`]). It has no
//! tensor dependency so every stage can use it cheaply.

pub mod atomic;
pub mod error;
pub mod image;
pub mod jsonl;
pub mod records;
pub mod validate;

pub use atomic::{write_atomic, write_atomic_bytes};
pub use error::{DataError, FieldProblem, ProblemKind};
pub use image::{load_rgb, RgbImage};
pub use jsonl::{read_jsonl, read_jsonl_all, write_jsonl};
pub use records::*;
pub use validate::{validate_file, Format, ValidateOptions, ValidationReport};
