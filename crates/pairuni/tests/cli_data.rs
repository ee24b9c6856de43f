//! End-to-end checks of `pairuni data check` and `pairuni config show` through the built binary.

mod common;

use std::path::PathBuf;

use common::pairuni;
use pairuni_data::image::save_png_atomic;
use pairuni_data::RgbImage;

const GOOD_UNDERSTANDING: &str = r#"{"id": "u1", "image_path": "images/a.png", "question": "How many cubes? A. 1 B. 2", "answer": "B", "options": ["1", "2"], "tag": "counting"}"#;

/// A fresh folder under cargo's per-test scratch space, with one decodable image at images/a.png.
fn scratch(name: &str) -> PathBuf {
    let dir = common::scratch("cli_data", name);
    let img = RgbImage::from_pixel(3, 3, pairuni_data::image::Rgb([1, 2, 3]));
    save_png_atomic(dir.join("images/a.png"), &img).unwrap();
    dir
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn data_check_lists_every_bad_line_with_its_number_and_fails() {
    let dir = scratch("bad");
    let lines = [
        GOOD_UNDERSTANDING.to_owned(),
        r#"{"id": "u2", "image_path": "images/a.png", "question": "q""#.to_owned(),
        GOOD_UNDERSTANDING
            .replace(r#""answer": "B", "#, "")
            .replace("u1", "u3"),
        GOOD_UNDERSTANDING
            .replace(r#""images/a.png""#, "17")
            .replace("u1", "u4"),
        GOOD_UNDERSTANDING.replace("u1", "u5"),
    ];
    std::fs::write(dir.join("und.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = pairuni(&["data", "check", "und.jsonl"], &dir);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("und.jsonl:2: malformed JSON: EOF while parsing"),
        "{stdout}"
    );
    assert!(
        stdout.contains("und.jsonl:3: field answer: missing field `answer`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("und.jsonl:4: field image_path: invalid type: integer `17`"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("und.jsonl:1:") && !stdout.contains("und.jsonl:5:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("und.jsonl: understanding, 5 records, 2 ok, 3 problems (malformed-json 1, missing-field 1, invalid-field 1), 1 images checked"),
        "{stdout}"
    );
}

#[test]
fn data_check_passes_a_good_file_and_reports_missing_images_across_files() {
    let dir = scratch("good");
    std::fs::write(dir.join("und.jsonl"), format!("{GOOD_UNDERSTANDING}\n")).unwrap();
    let out = pairuni(&["data", "check", "und.jsonl"], &dir);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("und.jsonl: understanding, 1 records, 1 ok, 0 problems, 1 images checked"),
        "{stdout}"
    );

    let gen = r#"{"id": "g1", "prompt": "a cube", "image_path": "images/missing.png", "tag": "single_object"}"#;
    std::fs::write(dir.join("gen.jsonl"), format!("{gen}\n")).unwrap();
    let out = pairuni(&["data", "check", "und.jsonl", "gen.jsonl"], &dir);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("gen.jsonl:1: field image_path: image not found: images/missing.png"),
        "{stdout}"
    );
    assert!(
        stdout.contains("total: 2 files, 2 records, 1 problems"),
        "{stdout}"
    );

    // Without image checks the same files pass.
    let out = pairuni(
        &["data", "check", "--no-images", "und.jsonl", "gen.jsonl"],
        &dir,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[test]
fn data_check_with_forced_format_reports_the_mismatch() {
    let dir = scratch("forced");
    std::fs::write(dir.join("und.jsonl"), format!("{GOOD_UNDERSTANDING}\n")).unwrap();
    let out = pairuni(&["data", "check", "--format", "pairs", "und.jsonl"], &dir);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // PairUG records tolerate extra keys (official files carry some), so the first problem is the missing one.
    assert!(
        stdout.contains("und.jsonl:1: field similarity: missing field `similarity`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("und.jsonl: pairs, 1 records, 0 ok, 1 problems"),
        "{stdout}"
    );
}

#[test]
fn config_show_resolves_defaults_and_rejects_unknown_keys() {
    let dir = scratch("config");
    std::fs::write(dir.join("ok.toml"), "seed = 42\n").unwrap();
    let out = pairuni(&["config", "show", "ok.toml"], &dir);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.starts_with("seed = 42\n"), "{stdout}");
    for section in [
        "[world]", "[pairs]", "[model]", "[sft]", "[train]", "[eval]",
    ] {
        assert!(stdout.contains(section), "{section} missing from\n{stdout}");
    }

    std::fs::write(
        dir.join("bad.toml"),
        "seed = 42\n\n[train]\nlearning_rat = 1.0\n",
    )
    .unwrap();
    let out = pairuni(&["config", "show", "bad.toml"], &dir);
    let stderr = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("bad.toml:4:1: unknown field `learning_rat`"),
        "{stderr}"
    );
    assert!(stderr.contains("(in [train])"), "{stderr}");
}

#[test]
fn help_explains_the_data_and_config_commands() {
    let dir = scratch("help");
    let out = pairuni(&["data", "check", "--help"], &dir);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains("--no-images") && stdout.contains("--format"),
        "{stdout}"
    );
    let out = pairuni(&["config", "show", "--help"], &dir);
    assert!(
        text(&out.stdout).contains("fully resolved"),
        "{}",
        text(&out.stdout)
    );
}
