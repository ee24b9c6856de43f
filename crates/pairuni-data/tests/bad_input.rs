//! Bad input of every kind: each error names the file, the 1-based line and the field, and nothing panics.

use std::path::{Path, PathBuf};

use pairuni_data::image::save_png_atomic;
use pairuni_data::jsonl::{
    read_generation_pool, read_jsonl_all, read_pairs, read_understanding_pool,
};
use pairuni_data::{
    validate_file, DataError, Format, PairRecord, ProblemKind, RgbImage, UnderstandingSample,
    ValidateOptions,
};

const GOOD_PAIR: &str = r#"{"similarity": 0.88, "generate_ann": {"image_path": "images/g.png", "prompt": "a red cube", "question": "What colour? A. red B. blue", "answer": "A", "tag": "colors"}, "understand_ann": {"image_path": "images/u.png", "prompt": "two balls", "question": "How many balls? A. 1 B. 2", "answer": "B", "tag": "counting"}}"#;

/// A temp folder with `name` holding `lines` and two decodable images under images/.
fn fixture(name: &str, lines: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let img = RgbImage::from_pixel(4, 4, image_pixel());
    save_png_atomic(dir.path().join("images/g.png"), &img).unwrap();
    save_png_atomic(dir.path().join("images/u.png"), &img).unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    (dir, path)
}

fn image_pixel() -> ::image::Rgb<u8> {
    ::image::Rgb([200, 10, 10])
}

fn first_error<T: serde::de::DeserializeOwned + std::fmt::Debug>(path: &Path) -> DataError {
    pairuni_data::read_jsonl::<T>(path).unwrap_err()
}

fn prefix(path: &Path, line: usize) -> String {
    format!("{}:{line}:", path.display())
}

#[test]
fn malformed_json_line_names_line_and_column() {
    let (_d, path) = fixture(
        "pairs.jsonl",
        &[GOOD_PAIR, "", r#"{"similarity": 0.5, "generate_ann": "#],
    );
    let err = read_pairs(&path).unwrap_err();
    assert_eq!(err.kind(), ProblemKind::MalformedJson);
    assert_eq!(err.line(), Some(3), "blank lines still count");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "{} malformed JSON: EOF while parsing",
            prefix(&path, 3)
        )),
        "{text}"
    );
    assert!(text.contains("(column "), "{text}");
}

#[test]
fn missing_field_names_the_nested_field() {
    let line = GOOD_PAIR.replace(r#""prompt": "a red cube", "#, "");
    let (_d, path) = fixture("pairs.jsonl", &[GOOD_PAIR, &line]);
    let err = read_pairs(&path).unwrap_err();
    assert_eq!(err.kind(), ProblemKind::MissingField);
    assert_eq!(
        err.to_string(),
        format!(
            "{} field generate_ann.prompt: missing field `prompt`",
            prefix(&path, 2)
        )
    );
}

#[test]
fn wrong_type_names_the_field() {
    let line = GOOD_PAIR.replace(r#""similarity": 0.88"#, r#""similarity": "high""#);
    let (_d, path) = fixture("pairs.jsonl", &[&line]);
    let err = read_pairs(&path).unwrap_err();
    assert_eq!(err.kind(), ProblemKind::InvalidField);
    assert_eq!(err.field(), Some("similarity"));
    assert!(
        err.to_string().starts_with(&format!(
            "{} field similarity: invalid type: string \"high\"",
            prefix(&path, 1)
        )),
        "{err}"
    );
}

#[test]
fn nested_wrong_type_in_generate_ann_names_the_dotted_path() {
    let line = GOOD_PAIR.replace(r#""prompt": "a red cube""#, r#""prompt": 5"#);
    let (_d, path) = fixture("pairs.jsonl", &[GOOD_PAIR, GOOD_PAIR, &line]);
    let err = read_pairs(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} field generate_ann.prompt: invalid type: integer `5`, expected a string",
            prefix(&path, 3)
        )
    );
}

#[test]
fn unknown_field_in_a_pool_names_the_key() {
    let (_d, path) = fixture(
        "gen.jsonl",
        &[r#"{"id": "g1", "prompt": "a cube", "image_path": "images/g.png", "tga": "x"}"#],
    );
    let err = read_generation_pool(&path).unwrap_err();
    assert_eq!(err.kind(), ProblemKind::UnknownField);
    assert_eq!(err.field(), Some("tga"));
    assert!(
        err.to_string().starts_with(&format!(
            "{} field tga: unknown field `tga`",
            prefix(&path, 1)
        )),
        "{err}"
    );
}

#[test]
fn wrong_element_type_in_options_names_the_index() {
    let (_d, path) = fixture(
        "und.jsonl",
        &[
            r#"{"id": "u1", "image_path": "images/u.png", "question": "q", "answer": "A", "options": ["a", 2]}"#,
        ],
    );
    let err = read_understanding_pool(&path).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "{} field options[1]: invalid type",
            prefix(&path, 1)
        )),
        "{err}"
    );
}

#[test]
fn a_line_that_is_not_an_object_is_reported_as_a_whole_record_problem() {
    let (_d, path) = fixture("und.jsonl", &[r#"["u1", "images/u.png", "q", "A"]"#]);
    let err = read_understanding_pool(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} field <record>: expected a JSON object, found an array",
            prefix(&path, 1)
        )
    );
    // The generic reader keeps serde's own view: a top-level type mismatch is still located at the line.
    let (_d, path) = fixture("und.jsonl", &["7"]);
    let err = first_error::<UnderstandingSample>(&path);
    assert!(
        err.to_string().starts_with(&format!(
            "{} field <record>: invalid type: integer",
            prefix(&path, 1)
        )),
        "{err}"
    );
}

#[test]
fn invalid_utf8_names_the_line() {
    let (_d, path) = fixture("pairs.jsonl", &[GOOD_PAIR]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"similarity\": \xff}\n");
    std::fs::write(&path, bytes).unwrap();
    let err = read_pairs(&path).unwrap_err();
    assert_eq!(err.kind(), ProblemKind::MalformedJson);
    assert!(
        err.to_string()
            .starts_with(&format!("{} malformed JSON: not UTF-8", prefix(&path, 2))),
        "{err}"
    );
}

#[test]
fn missing_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.jsonl");
    let err = read_pairs(&path).unwrap_err();
    assert_eq!(err.kind(), ProblemKind::Io);
    assert!(
        err.to_string()
            .starts_with(&format!("{}: ", path.display())),
        "{err}"
    );
}

#[test]
fn lenient_reader_collects_every_problem_and_every_good_record() {
    let missing = GOOD_PAIR.replace(r#""answer": "B", "#, "");
    let (_d, path) = fixture(
        "pairs.jsonl",
        &[GOOD_PAIR, "{oops", &missing, "", GOOD_PAIR, "7"],
    );
    let (records, problems) = read_jsonl_all::<PairRecord>(&path);
    assert_eq!(
        records.iter().map(|(line, _)| *line).collect::<Vec<_>>(),
        vec![1, 5]
    );
    let located: Vec<(Option<usize>, ProblemKind)> =
        problems.iter().map(|p| (p.line(), p.kind())).collect();
    assert_eq!(
        located,
        vec![
            (Some(2), ProblemKind::MalformedJson),
            (Some(3), ProblemKind::MissingField),
            (Some(6), ProblemKind::InvalidField)
        ]
    );
    assert_eq!(problems[1].field(), Some("understand_ann.answer"));
}

#[test]
fn validation_reports_missing_and_undecodable_images_with_resolved_paths() {
    let missing = GOOD_PAIR.replace("images/u.png", "images/nope.png");
    let broken = GOOD_PAIR.replace("images/g.png", "images/broken.png");
    let (dir, path) = fixture("pairs.jsonl", &[GOOD_PAIR, &missing, &broken]);
    std::fs::write(
        dir.path().join("images/broken.png"),
        b"\x89PNG\r\n\x1a\ntruncated",
    )
    .unwrap();
    let report = validate_file(&path, &ValidateOptions::default());
    assert_eq!(report.format, Some(Format::Pairs));
    assert_eq!((report.records, report.ok), (3, 1));
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    let first = report.problems[0].to_string();
    assert_eq!(
        first,
        format!(
            "{} field understand_ann.image_path: image not found: {}",
            prefix(&path, 2),
            dir.path().join("images/nope.png").display()
        )
    );
    let second = report.problems[1].to_string();
    assert!(
        second.starts_with(&format!(
            "{} field generate_ann.image_path: cannot read image {}:",
            prefix(&path, 3),
            dir.path().join("images/broken.png").display()
        )),
        "{second}"
    );
    assert_eq!(report.counts[&ProblemKind::MissingImage], 1);
    assert_eq!(report.counts[&ProblemKind::BadImage], 1);

    let no_images = validate_file(
        &path,
        &ValidateOptions {
            check_images: false,
            ..Default::default()
        },
    );
    assert!(no_images.is_ok(), "{:?}", no_images.problems);
    assert_eq!(no_images.images_checked, 0);
}

#[test]
fn unknown_format_is_reported_at_the_first_record() {
    let (_d, path) = fixture("what.jsonl", &["", r#"{"foo": 1, "bar": 2}"#]);
    let report = validate_file(&path, &ValidateOptions::default());
    assert_eq!(report.format, None);
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].kind(), ProblemKind::UnknownFormat);
    let text = report.problems[0].to_string();
    assert!(
        text.starts_with(&format!(
            "{} unknown format: keys bar, foo",
            prefix(&path, 2)
        )),
        "{text}"
    );
}

#[test]
fn validation_collects_empty_fields_duplicates_and_parse_errors_in_one_pass() {
    let lines = [
        r#"{"id": "u1", "image_path": "images/u.png", "question": "How many? A. 1 B. 2", "answer": "B", "options": ["1", "2"], "tag": "counting"}"#,
        r#"{"id": "u2", "image_path": "images/u.png", "question": "", "answer": "A"}"#,
        r#"{"id": "u1", "image_path": "images/u.png", "question": "q", "answer": "A"}"#,
        r#"{"id": "u4", "image_path": "images/u.png", "question": "q", "answer": 1}"#,
        r#"{"id": "u5", "image_path": "images/u.png", "question": "q", "answer": "A", "options": ["x", ""]}"#,
        "not json",
    ];
    let (_d, path) = fixture("und.jsonl", &lines);
    let report = validate_file(&path, &ValidateOptions::default());
    assert_eq!(report.format, Some(Format::Understanding));
    assert_eq!((report.records, report.ok), (6, 1));
    let got: Vec<(usize, ProblemKind, Option<&str>)> = report
        .problems
        .iter()
        .map(|p| (p.line().unwrap(), p.kind(), p.field()))
        .collect();
    assert_eq!(
        got,
        vec![
            (2, ProblemKind::EmptyField, Some("question")),
            (3, ProblemKind::DuplicateId, Some("id")),
            (4, ProblemKind::InvalidField, Some("answer")),
            (5, ProblemKind::EmptyField, Some("options[1]")),
            (6, ProblemKind::MalformedJson, None),
        ]
    );
    assert!(report.problems[1]
        .to_string()
        .contains("first used on line 1"));
    assert_eq!(report.images_checked, 1, "a shared image is decoded once");
}

#[test]
fn forced_format_reports_mismatch_as_field_problems() {
    let (_d, path) = fixture("pairs.jsonl", &[GOOD_PAIR]);
    let report = validate_file(
        &path,
        &ValidateOptions {
            format: Some(Format::Generation),
            check_images: true,
        },
    );
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].kind(), ProblemKind::UnknownField);
    assert!(report.problems[0]
        .to_string()
        .starts_with(&prefix(&path, 1)));
}

#[test]
fn similarity_out_of_range_is_a_field_problem() {
    let line = GOOD_PAIR.replace("0.88", "1.5");
    let (_d, path) = fixture("pairs.jsonl", &[&line]);
    let report = validate_file(&path, &ValidateOptions::default());
    assert_eq!(report.problems.len(), 1);
    assert_eq!(
        report.problems[0].to_string(),
        format!(
            "{} field similarity: 1.5 is outside [-1, 1]",
            prefix(&path, 1)
        )
    );
}
