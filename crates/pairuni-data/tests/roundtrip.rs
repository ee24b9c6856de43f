//! Round trips of the three JSONL formats: the issue's PairUG record field for field, and random records.

use pairuni_data::jsonl::{
    parse_line, read_generation_pool, read_pairs, read_understanding_pool, write_generation_pool,
    write_pairs, write_understanding_pool,
};
use pairuni_data::{GenerationSample, PairKind, PairRecord, Quadruple, UnderstandingSample};
use proptest::prelude::*;
use serde_json::Value;
use std::path::Path;

/// The record from issue 2, exactly as given (official PairUG format, with its spacing).
const ISSUE_RECORD: &str = r#"{"similarity": 0.88, "generate_ann": {"image_path": "images/gen_000123.png", "prompt": "a photo of a towel and a zebra", "question": "What covers the animal's coat? A. stripes B. spots C. plain fur D. feathers", "answer": "A", "tag": "geneval_train"}, "understand_ann": {"image_path": "images/und_004567.png", "prompt": "Three zebras graze on dry grass beside a dirt track.", "question": "How many zebras are visible? A. 1 B. 2 C. 3 D. 4", "answer": "C", "tag": "counting"}}"#;

/// The same record as our writer must print it: compact, keys in the official order.
const ISSUE_RECORD_COMPACT: &str = r#"{"similarity":0.88,"generate_ann":{"image_path":"images/gen_000123.png","prompt":"a photo of a towel and a zebra","question":"What covers the animal's coat? A. stripes B. spots C. plain fur D. feathers","answer":"A","tag":"geneval_train"},"understand_ann":{"image_path":"images/und_004567.png","prompt":"Three zebras graze on dry grass beside a dirt track.","question":"How many zebras are visible? A. 1 B. 2 C. 3 D. 4","answer":"C","tag":"counting"}}"#;

#[test]
fn issue_record_round_trips_field_for_field() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, format!("{ISSUE_RECORD}\n")).unwrap();
    let pairs = read_pairs(&input).unwrap();
    assert_eq!(pairs.len(), 1);
    let p = &pairs[0];
    assert_eq!(p.similarity, 0.88);
    assert_eq!(p.generate_ann.image_path, "images/gen_000123.png");
    assert_eq!(p.generate_ann.prompt, "a photo of a towel and a zebra");
    assert_eq!(p.understand_ann.answer, "C");
    assert_eq!(p.understand_ann.tag, "counting");
    assert_eq!(p.kind, None);
    assert_eq!(p.effective_kind(), PairKind::Retrieved);

    let output = dir.path().join("out.jsonl");
    write_pairs(&output, &pairs).unwrap();
    let text = std::fs::read_to_string(&output).unwrap();
    assert_eq!(text, format!("{ISSUE_RECORD_COMPACT}\n"));
    let before: Value = serde_json::from_str(ISSUE_RECORD).unwrap();
    let after: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(before, after);
    assert_eq!(read_pairs(&output).unwrap(), pairs);
}

#[test]
fn official_records_with_extra_keys_read_and_our_optional_fields_round_trip() {
    let extra = ISSUE_RECORD.replacen(
        r#""tag": "counting""#,
        r#""tag": "counting", "source_idx": 17"#,
        1,
    );
    let extra = extra.replacen(
        r#"{"similarity""#,
        r#"{"meta": {"x": [1]}, "similarity""#,
        1,
    );
    let p: PairRecord = parse_line(Path::new("x.jsonl"), 1, &extra).unwrap();
    assert_eq!(p.understand_ann.tag, "counting");

    let ours = PairRecord {
        kind: Some(PairKind::Aligned),
        source: Some("build-7".into()),
        generate_ann: Quadruple {
            id: Some("g1".into()),
            ..p.generate_ann.clone()
        },
        ..p
    };
    let line = serde_json::to_string(&ours).unwrap();
    assert!(line.contains(r#""kind":"aligned""#), "{line}");
    let back: PairRecord = parse_line(Path::new("x.jsonl"), 1, &line).unwrap();
    assert_eq!(back, ours);
}

fn text() -> impl Strategy<Value = String> {
    // Any unicode, including empty strings, quotes, backslashes, control characters and newlines.
    prop_oneof![
        Just(String::new()),
        ".*",
        "[\"\\\\\n\r\t\u{0}\u{2028}é漢😀 ]{0,8}"
    ]
}

fn understanding() -> impl Strategy<Value = UnderstandingSample> {
    (
        text(),
        text(),
        text(),
        text(),
        proptest::option::of(proptest::collection::vec(text(), 0..5)),
        text(),
    )
        .prop_map(
            |(id, image_path, question, answer, options, tag)| UnderstandingSample {
                id,
                image_path,
                question,
                answer,
                options,
                tag,
            },
        )
}

fn generation() -> impl Strategy<Value = GenerationSample> {
    (text(), text(), text(), text()).prop_map(|(id, prompt, image_path, tag)| GenerationSample {
        id,
        prompt,
        image_path,
        tag,
    })
}

fn quadruple() -> impl Strategy<Value = Quadruple> {
    (
        text(),
        text(),
        text(),
        text(),
        text(),
        proptest::option::of(text()),
    )
        .prop_map(
            |(image_path, prompt, question, answer, tag, id)| Quadruple {
                image_path,
                prompt,
                question,
                answer,
                tag,
                id,
            },
        )
}

fn pair() -> impl Strategy<Value = PairRecord> {
    let similarity = prop_oneof![
        -1.0f64..=1.0,
        Just(1.0),
        Just(0.0),
        Just(-0.0),
        proptest::num::f64::NORMAL
    ];
    let kind = proptest::option::of(prop_oneof![
        Just(PairKind::Aligned),
        Just(PairKind::Retrieved)
    ]);
    (
        similarity,
        quadruple(),
        quadruple(),
        kind,
        proptest::option::of(text()),
    )
        .prop_map(
            |(similarity, generate_ann, understand_ann, kind, source)| PairRecord {
                similarity,
                generate_ann,
                understand_ann,
                kind,
                source,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn understanding_pools_round_trip(records in proptest::collection::vec(understanding(), 0..6)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.jsonl");
        write_understanding_pool(&path, &records).unwrap();
        prop_assert_eq!(read_understanding_pool(&path).unwrap(), records);
    }

    #[test]
    fn generation_pools_round_trip(records in proptest::collection::vec(generation(), 0..6)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.jsonl");
        write_generation_pool(&path, &records).unwrap();
        prop_assert_eq!(read_generation_pool(&path).unwrap(), records);
    }

    #[test]
    fn pair_files_round_trip(records in proptest::collection::vec(pair(), 0..6)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        write_pairs(&path, &records).unwrap();
        let back = read_pairs(&path).unwrap();
        prop_assert_eq!(back.len(), records.len());
        for (b, r) in back.iter().zip(&records) {
            // Bit equality, so -0.0 and exact decimal round trips are checked too.
            prop_assert_eq!(b.similarity.to_bits(), r.similarity.to_bits());
        }
        prop_assert_eq!(back, records);
    }

    #[test]
    fn single_lines_round_trip_in_memory(records in proptest::collection::vec(pair(), 1..4), u in understanding()) {
        for r in &records {
            let line = serde_json::to_string(r).unwrap();
            prop_assert!(!line.contains('\n'));
            let back: PairRecord = parse_line(Path::new("m.jsonl"), 1, &line).unwrap();
            prop_assert_eq!(&back, r);
        }
        let line = serde_json::to_string(&u).unwrap();
        let back: UnderstandingSample = parse_line(Path::new("m.jsonl"), 1, &line).unwrap();
        prop_assert_eq!(back, u);
    }
}

#[test]
fn non_finite_similarity_is_refused_not_written_as_null() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    let mut p: PairRecord = parse_line(Path::new("x"), 1, ISSUE_RECORD).unwrap();
    p.similarity = f64::NAN;
    let good: PairRecord = parse_line(Path::new("x"), 1, ISSUE_RECORD).unwrap();
    let err = write_pairs(&path, &[good, p]).unwrap_err();
    assert!(
        err.to_string().contains("p.jsonl:2: field similarity:"),
        "{err}"
    );
    assert!(!path.exists());
}
