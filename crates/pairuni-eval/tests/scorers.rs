//! Scorers on hand-made predictions whose scores were computed by hand (the arithmetic is in the comments).

use std::fs;
use std::path::{Path, PathBuf};

use pairuni_eval::mcq::{read_mcq, score_mcq, ChoiceRule};
use pairuni_eval::mme::{read_mme, score_mme, MME_PERCEPTION};
use pairuni_eval::pope::{read_pope, score_pope, YesNoRule};
use pairuni_eval::predictions::{read_predictions, Prediction, Predictions};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

fn preds(pairs: &[(&str, &str)]) -> Predictions {
    Predictions::from_vec(
        "mem.jsonl",
        pairs
            .iter()
            .map(|(q, o)| Prediction {
                question_id: q.to_string(),
                output: o.to_string(),
            })
            .collect(),
    )
    .unwrap()
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-9, "{a} != {b}");
}

const POPE_GOLD: &str = r#"{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}
{"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"}
{"question_id": 3, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes"}
{"question_id": 4, "image": "b.jpg", "text": "Is there a bus in the image?", "label": "no"}
{"question_id": 5, "image": "c.jpg", "text": "Is there a cup in the image?", "label": "yes"}
{"question_id": 6, "image": "c.jpg", "text": "Is there a fork in the image?", "label": "no"}
"#;

const POPE_PRED: &str = r#"{"question_id": 1, "output": "Yes"}
{"question_id": 2, "output": "No"}
{"question_id": 3, "output": "No, there is not."}
{"question_id": 4, "output": "Yes there is"}
{"question_id": 5, "output": "yes"}
{"question_id": 6, "output": "I do not see one."}
"#;

#[test]
fn pope_both_rules_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let gold = read_pope(write(dir.path(), "coco_pope_random.json", POPE_GOLD)).unwrap();
    assert_eq!(gold.name, "random");
    let p = read_predictions(write(dir.path(), "pred.jsonl", POPE_PRED)).unwrap();

    // POPE rule: yes, no, no, yes, yes, no → TP {1,5}, TN {2,6}, FN {3}, FP {4}.
    let m = score_pope(&[(gold.clone(), p.clone())], YesNoRule::PopeExtract).unwrap();
    let s = m.splits["random"];
    assert_eq!(
        (s.counts.tp, s.counts.fp, s.counts.tn, s.counts.fn_),
        (2, 1, 2, 1)
    );
    close(s.accuracy, 400.0 / 6.0);
    close(s.precision, 200.0 / 3.0);
    close(s.recall, 200.0 / 3.0);
    close(s.f1, 200.0 / 3.0);
    close(s.yes_ratio, 50.0);
    assert_eq!(m.overall, s);

    // Exact match: yes, no, ?, ?, yes, ? → TP {1,5}, TN {2}, unparsed 3; P = R = 2/2.
    let m = score_pope(&[(gold, p)], YesNoRule::ExactMatch).unwrap();
    let s = m.splits["random"];
    assert_eq!(
        (
            s.counts.tp,
            s.counts.fp,
            s.counts.tn,
            s.counts.fn_,
            s.counts.unparsed
        ),
        (2, 0, 1, 0, 3)
    );
    close(s.accuracy, 50.0);
    close(s.precision, 100.0);
    close(s.recall, 100.0);
    close(s.f1, 100.0);
    close(s.yes_ratio, 100.0 / 3.0);
}

#[test]
fn pope_pooled_and_mean_over_splits() {
    let dir = tempfile::tempdir().unwrap();
    let a = read_pope(write(dir.path(), "toy_pope_random.json", POPE_GOLD)).unwrap();
    // Second split: the first two questions only, both answered right.
    let two: String = POPE_GOLD
        .lines()
        .take(2)
        .map(|l| format!("{l}\n"))
        .collect();
    let b = read_pope(write(dir.path(), "toy_pope_popular.json", &two)).unwrap();
    let pa = read_predictions(write(dir.path(), "pa.jsonl", POPE_PRED)).unwrap();
    let pb = preds(&[("1", "Yes"), ("2", "No")]);
    let m = score_pope(&[(a, pa), (b, pb)], YesNoRule::PopeExtract).unwrap();
    // Pooled: TP 3, TN 3, FP 1, FN 1 over 8 → accuracy 75, yes-ratio 4/8.
    close(m.overall.accuracy, 75.0);
    close(m.overall.yes_ratio, 50.0);
    close(m.overall.precision, 75.0);
    // Mean over splits: accuracy (66.67 + 100) / 2.
    close(m.mean_over_splits.accuracy, (400.0 / 6.0 + 100.0) / 2.0);
    close(m.splits["popular"].f1, 100.0);
}

/// The real POPE files: every split reads, and two oracle-like prediction sets score as the labels dictate.
#[test]
fn pope_real_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/pope");
    let tmp = tempfile::tempdir().unwrap();
    let mut perfect = Vec::new();
    let mut always_yes = Vec::new();
    let mut yes_total = 0;
    let mut n_total = 0;
    for split in ["random", "popular", "adversarial"] {
        let path = dir.join(format!("coco_pope_{split}.json"));
        let gold = read_pope(&path).unwrap();
        assert_eq!(gold.name, split);
        assert_eq!(gold.questions.len(), 3000);
        // Count gold labels independently of the reader, from the raw lines.
        let yes = fs::read_to_string(&path)
            .unwrap()
            .lines()
            .filter(|l| l.contains(r#""label": "yes""#))
            .count();
        assert_eq!(gold.questions.iter().filter(|q| q.label).count(), yes);
        yes_total += yes;
        n_total += 3000;
        // Predictions written as a file in the documented format, with integer ids like POPE's own.
        let lines: String = gold
            .questions
            .iter()
            .map(|q| {
                format!(
                    "{{\"question_id\": {}, \"output\": \"{}\"}}\n",
                    q.question_id,
                    if q.label {
                        "Yes, there is."
                    } else {
                        "No, there is not."
                    }
                )
            })
            .collect();
        let p = read_predictions(write(tmp.path(), &format!("{split}.jsonl"), &lines)).unwrap();
        perfect.push((gold.clone(), p));
        let yes_lines: String = gold
            .questions
            .iter()
            .map(|q| {
                format!(
                    "{{\"question_id\": {}, \"output\": \"yes\"}}\n",
                    q.question_id
                )
            })
            .collect();
        let p =
            read_predictions(write(tmp.path(), &format!("{split}_yes.jsonl"), &yes_lines)).unwrap();
        always_yes.push((gold, p));
    }
    let m = score_pope(&perfect, YesNoRule::PopeExtract).unwrap();
    for s in m.splits.values().chain([&m.overall]) {
        close(s.accuracy, 100.0);
        close(s.f1, 100.0);
    }
    close(
        m.overall.yes_ratio,
        100.0 * yes_total as f64 / n_total as f64,
    );
    // Exact match cannot read "Yes, there is." — every answer unparsed, accuracy 0.
    let m = score_pope(&perfect, YesNoRule::ExactMatch).unwrap();
    close(m.overall.accuracy, 0.0);
    assert_eq!(m.overall.counts.unparsed, n_total);

    let m = score_pope(&always_yes, YesNoRule::ExactMatch).unwrap();
    close(m.overall.recall, 100.0);
    close(m.overall.yes_ratio, 100.0);
    close(
        m.overall.precision,
        100.0 * yes_total as f64 / n_total as f64,
    );
    close(
        m.overall.accuracy,
        100.0 * yes_total as f64 / n_total as f64,
    );
}

const MME_GOLD: &str = r#"{"question_id": "existence/1.jpg", "image": "1.jpg", "question": "Is there a dog? Please answer yes or no.", "answer": "Yes", "category": "existence"}
{"question_id": "existence/1.jpg", "image": "1.jpg", "question": "Is there a cat? Please answer yes or no.", "answer": "No", "category": "existence"}
{"question_id": "existence/2.jpg", "image": "2.jpg", "question": "Is there a car? Please answer yes or no.", "answer": "Yes", "category": "existence"}
{"question_id": "existence/2.jpg", "image": "2.jpg", "question": "Is there a bus? Please answer yes or no.", "answer": "No", "category": "existence"}
{"question_id": "code_reasoning/3.png", "image": "3.png", "question": "Does it print 3?", "answer": "Yes", "category": "code_reasoning", "id": "c1"}
{"question_id": "code_reasoning/3.png", "image": "3.png", "question": "Does it print 4?", "answer": "No", "category": "code_reasoning", "id": "c2"}
"#;

#[test]
fn mme_acc_plus_pairing_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let gold = read_mme(write(dir.path(), "mme.jsonl", MME_GOLD)).unwrap();
    let p = preds(&[
        ("existence/1.jpg#1", "Yes"),
        ("existence/1.jpg#2", "No."),
        ("existence/2.jpg#1", "Yes, it is."),
        ("existence/2.jpg#2", "Yes"),
        ("c1", "no"),
        ("c2", "Not sure"),
    ]);
    let m = score_mme(&gold, &p).unwrap();
    // existence: 3 of 4 right → 75; image 1 both right, image 2 not → acc+ 50; score 125.
    let e = &m.subtasks["existence"];
    assert_eq!(
        (e.images, e.questions, e.correct, e.both_correct),
        (2, 4, 3, 1)
    );
    close(e.accuracy, 75.0);
    close(e.accuracy_plus, 50.0);
    close(e.score, 125.0);
    // code_reasoning: "no" wrong, "Not sure" → no → right: acc 50, acc+ 0.
    let c = &m.subtasks["code_reasoning"];
    close(c.score, 50.0);
    close(m.perception, 125.0);
    close(m.cognition, 50.0);
    assert_eq!(m.missing_perception.len(), 9);
    assert!(!m.missing_perception.contains(&"existence".to_owned()));
    assert_eq!(m.missing_cognition.len(), 3);
    assert_eq!(m.unparsed, 0);
    assert_eq!(
        MME_PERCEPTION.len() + pairuni_eval::mme::MME_COGNITION.len(),
        14
    );
}

#[test]
fn mme_pairing_errors_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let five: String = MME_GOLD.lines().take(5).map(|l| format!("{l}\n")).collect();
    let err = read_mme(write(dir.path(), "odd.jsonl", &five))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("odd.jsonl:5") && err.contains("exactly two"),
        "{err}"
    );
    let bad_cat = MME_GOLD.replace("\"code_reasoning\"", "\"coding\"");
    let err = read_mme(write(dir.path(), "cat.jsonl", &bad_cat))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cat.jsonl:5: field category"), "{err}");
    let gold = read_mme(write(dir.path(), "mme.jsonl", MME_GOLD)).unwrap();
    let err = score_mme(&gold, &preds(&[("c1", "yes")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mme.jsonl:1") && err.contains("no prediction"),
        "{err}"
    );
}

const MCQ_GOLD: &str = r#"{"question_id": "q1", "image": "images/1.png", "question": "What colour? A. red B. blue C. green D. yellow", "options": ["red", "blue", "green", "yellow"], "answer": "B", "category": "color"}
{"question_id": "q2", "image": "images/2.png", "question": "What colour? A. red B. blue C. green D. yellow", "options": ["red", "blue", "green", "yellow"], "answer": "C", "category": "color"}
{"question_id": "q3", "image": "images/3.png", "question": "Which shape? A. circle B. square C. triangle D. star", "options": ["circle", "square", "triangle", "star"], "answer": "A", "category": "shape"}
{"question_id": "q4", "image": "images/4.png", "question": "Which shape? A. circle B. square C. triangle D. star", "options": ["circle", "square", "triangle", "star"], "answer": "D", "category": "shape"}
"#;

#[test]
fn mcq_mmstar_rule_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let gold = read_mcq(write(dir.path(), "questions.jsonl", MCQ_GOLD)).unwrap();
    let p = preds(&[
        ("q1", "B. blue"),         // first char b → right
        ("q2", "The answer is C"), // "the answer is " + c → right
        ("q3", "Answer: D"),       // first char a → counts as A → right (MMStar quirk)
        ("q4", "(B)"),             // wrong
    ]);
    let m = score_mcq(&gold, &p, ChoiceRule::MmStar, 0).unwrap();
    assert_eq!((m.overall.correct, m.overall.total), (3, 4));
    close(m.overall.accuracy, 75.0);
    close(m.categories["color"].accuracy, 100.0);
    close(m.categories["shape"].accuracy, 50.0);
    assert_eq!(m.random_fallbacks, 0);
}

#[test]
fn mcq_mmmu_rule_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let gold = read_mcq(write(dir.path(), "questions.jsonl", MCQ_GOLD)).unwrap();
    let p = preds(&[
        ("q1", "(B)"),                                           // right
        ("q2", "I am quite sure that the colour is green here"), // option text → C, right
        ("q3", "Answer: D"),                                     // " D " → D, wrong
        ("q4", "C"),                                             // wrong
    ]);
    let m = score_mcq(&gold, &p, ChoiceRule::Mmmu, 0).unwrap();
    assert_eq!((m.overall.correct, m.overall.total), (2, 4));
    close(m.categories["color"].accuracy, 100.0);
    close(m.categories["shape"].accuracy, 0.0);
    assert_eq!(m.random_fallbacks, 0);

    // Unparseable answers fall back to the seeded draw, and are counted.
    let p = preds(&[("q1", "hmm"), ("q2", "hmm"), ("q3", "hmm"), ("q4", "hmm")]);
    let a = score_mcq(&gold, &p, ChoiceRule::Mmmu, 3).unwrap();
    let b = score_mcq(&gold, &p, ChoiceRule::Mmmu, 3).unwrap();
    assert_eq!(a.random_fallbacks, 4);
    assert_eq!(a, b);
}

#[test]
fn mmmu_rows_and_open_questions() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"{"id": "validation_Art_Theory_1", "question": "Q", "options": ["x", "y"], "answer": "B", "question_type": "multiple-choice", "img_type": "['Paintings']"}
{"id": "validation_Art_Theory_2", "question": "Q", "options": [], "answer": "12", "question_type": "open"}
{"id": "validation_Math_3", "question": "Q", "options": "['1', \"it's 2\", '3']", "answer": "A", "question_type": "multiple-choice"}
"#;
    let gold = read_mcq(write(dir.path(), "mmmu.jsonl", text)).unwrap();
    assert_eq!(gold.skipped_open, 1);
    // MMMU's options column is a Python list literal in a string.
    assert_eq!(gold.questions[1].options, vec!["1", "it's 2", "3"]);
    let bad = text.replace(r#"['1', \"it's 2\", '3']"#, "['1', 2]");
    let err = read_mcq(write(dir.path(), "bad.jsonl", &bad))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.jsonl:3") && err.contains("options"),
        "{err}"
    );
    let m = score_mcq(
        &gold,
        &preds(&[
            ("validation_Art_Theory_1", "(B)"),
            ("validation_Math_3", "(C)"),
        ]),
        ChoiceRule::Mmmu,
        0,
    )
    .unwrap();
    close(m.categories["Art_Theory"].accuracy, 100.0);
    close(m.categories["Math"].accuracy, 0.0);
    assert_eq!(m.skipped_open, 1);
}

#[test]
fn malformed_files_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad_json = POPE_GOLD.replacen("\"label\": \"no\"}", "\"label\": \"no\"", 1);
    let err = read_pope(write(dir.path(), "p1.json", &bad_json))
        .unwrap_err()
        .to_string();
    assert!(err.contains("p1.json:2"), "{err}");
    let missing = POPE_GOLD.replacen(", \"label\": \"yes\"", "", 1);
    let err = read_pope(write(dir.path(), "p2.json", &missing))
        .unwrap_err()
        .to_string();
    assert!(err.contains("p2.json:1") && err.contains("label"), "{err}");
    let bad_label = POPE_GOLD.replacen("\"label\": \"no\"", "\"label\": \"maybe\"", 1);
    let err = read_pope(write(dir.path(), "p3.json", &bad_label))
        .unwrap_err()
        .to_string();
    assert!(err.contains("p3.json:2: field label"), "{err}");
    let bad_letter = MCQ_GOLD.replacen("\"answer\": \"C\"", "\"answer\": \"E\"", 1);
    let err = read_mcq(write(dir.path(), "m.jsonl", &bad_letter))
        .unwrap_err()
        .to_string();
    assert!(err.contains("m.jsonl:2: field answer"), "{err}");
    let dup =
        "{\"question_id\": 1, \"output\": \"a\"}\n{\"question_id\": \"1\", \"output\": \"b\"}\n";
    let err = read_predictions(write(dir.path(), "pred.jsonl", dup))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pred.jsonl:2: field question_id") && err.contains("line 1"),
        "{err}"
    );
    let err = read_pope(dir.path().join("absent.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.json"), "{err}");
}
