//! The answer parsers: documented cases parse as documented (tables), and no input makes any parser panic.

use pairuni_eval::parse::*;
use proptest::prelude::*;

fn opts() -> Vec<String> {
    ["red", "blue", "green", "yellow"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn mme_rule_table() {
    let cases: &[(&str, Option<bool>)] = &[
        ("Yes", Some(true)),
        ("no.", Some(false)),
        ("  YES  ", Some(true)),
        ("Y", Some(true)),
        ("n", Some(false)),
        ("y.", Some(true)),
        ("x", None),
        ("Yes, there is a cat.", Some(true)),
        ("Nope", Some(false)),
        ("Not really", Some(false)),
        // Only the first 4 characters are looked at.
        ("There is no cat", None),
        ("I think yes", None),
        // Quirk of the rule: "know" starts with "kno", which contains "no".
        ("know", Some(false)),
        ("", None),
    ];
    for &(text, want) in cases {
        assert_eq!(parse_yes_no_mme(text), want, "input {text:?}");
        assert_eq!(parse_yes_no(text), want, "input {text:?}");
    }
}

#[test]
fn pope_rule_table() {
    let cases: &[(&str, bool)] = &[
        ("Yes", true),
        ("No", false),
        ("no, there is not.", false),
        ("There is no dog in the image.", false),
        ("The answer is not clear", false),
        // Only the first sentence counts.
        ("Yes. There is not a cat.", true),
        // Case-sensitive words, split on single spaces: quirks of the published rule.
        ("NO", true),
        ("Nope", true),
        ("No\nThere is none", true),
        ("", true),
        ("Yes, there is a dog", true),
    ];
    for &(text, want) in cases {
        assert_eq!(parse_yes_no_pope(text), want, "input {text:?}");
    }
}

#[test]
fn exact_rule_table() {
    let cases: &[(&str, Option<bool>)] = &[
        ("yes", Some(true)),
        (" No \n", Some(false)),
        ("YES", Some(true)),
        ("yes.", None),
        ("Yes, it is", None),
        ("", None),
    ];
    for &(text, want) in cases {
        assert_eq!(parse_yes_no_exact(text), want, "input {text:?}");
    }
}

#[test]
fn mmstar_rule_table() {
    let cases: &[(&str, char, bool)] = &[
        ("B", 'B', true),
        ("b) cat", 'B', true),
        ("(C) dog", 'C', true),
        ("Option D", 'D', true),
        ("The answer is A.", 'A', true),
        ("\n  C", 'C', true),
        ("Answer: B", 'B', false),
        // Quirk: the first character alone decides, so "Answer: B" counts as A and "Both" as B.
        ("Answer: B", 'A', true),
        ("Both", 'B', true),
        ("the answer is", 'A', false),
        ("", 'A', false),
        ("(", 'A', false),
    ];
    for &(text, gold, want) in cases {
        assert_eq!(
            mmstar_matches(text, gold),
            want,
            "input {text:?} gold {gold}"
        );
    }
    assert_eq!(parse_choice_mmstar("(C) dog", 4), Some('C'));
    assert_eq!(parse_choice_mmstar("the answer is d", 4), Some('D'));
    assert_eq!(parse_choice_mmstar("Answer: B", 4), Some('A'));
    assert_eq!(parse_choice_mmstar("E", 4), None);
    assert_eq!(parse_choice_mmstar("", 4), None);
}

#[test]
fn mmmu_rule_table() {
    let cases: &[(&str, Option<char>)] = &[
        ("(B)", Some('B')),
        ("B", Some('B')),
        ("A.", Some('A')),
        ("The answer is (C).", Some('C')),
        // A bracketed letter beats bare ones.
        ("A or B? I pick (D)", Some('D')),
        ("(A) and (C)", Some('C')),
        // Several bare letters: the last one wins.
        ("I think A is wrong, B is right", Some('B')),
        // Long answers fall back to option text; the latest mention wins.
        ("The color of the circle is clearly blue here", Some('B')),
        ("It is red, not blue, definitely red", Some('A')),
        // Short answers never match option text.
        ("blue", None),
        // Letters are case-sensitive.
        ("a", None),
        ("E", None),
        ("", None),
    ];
    for &(text, want) in cases {
        assert_eq!(parse_choice(text, &opts()), want, "input {text:?}");
    }
}

#[test]
fn mmmu_fallback_is_seeded_and_marked() {
    let a = parse_choice_mmmu("no idea", &opts(), 7, "q1").unwrap();
    let b = parse_choice_mmmu("no idea", &opts(), 7, "q1").unwrap();
    assert_eq!(a, b);
    assert!(matches!(a, ChoiceParse::Random(c) if ('A'..='D').contains(&c)));
    assert_eq!(
        parse_choice_mmmu("(C)", &opts(), 7, "q1"),
        Some(ChoiceParse::Parsed('C'))
    );
    assert_eq!(parse_choice_mmmu("(C)", &[], 7, "q1"), None);
    // Different questions draw from different streams: over many ids every letter shows up.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..64 {
        seen.insert(
            parse_choice_mmmu("?", &opts(), 7, &format!("q{i}"))
                .unwrap()
                .letter(),
        );
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
}

proptest! {
    #[test]
    fn no_parser_panics(text in any::<String>(), n in 0usize..30, gold in any::<char>(), seed in any::<u64>()) {
        let options: Vec<String> = (0..n).map(|i| format!("option {i}")).collect();
        let _ = parse_yes_no(&text);
        let _ = parse_yes_no_pope(&text);
        let _ = parse_yes_no_exact(&text);
        let _ = mmstar_matches(&text, gold);
        if let Some(c) = parse_choice_mmstar(&text, n) {
            prop_assert!(option_letters(n).any(|l| l == c));
        }
        if let Some(c) = parse_choice(&text, &options) {
            prop_assert!(option_letters(n).any(|l| l == c));
        }
        let full = parse_choice_mmmu(&text, &options, seed, &text);
        prop_assert_eq!(full.is_some(), n > 0);
    }

    #[test]
    fn no_parser_panics_on_answer_like_text(text in "[ (){}.,:;!?'A-Ea-e\n]{0,40}(yes|no|Yes|No|answer is|option )?[ A-E().]{0,10}") {
        let options = opts();
        let _ = parse_yes_no(&text);
        let _ = parse_yes_no_pope(&text);
        let _ = parse_choice_mmstar(&text, 4);
        let _ = parse_choice(&text, &options);
    }

    #[test]
    fn exact_agrees_with_mme_when_it_parses(text in any::<String>()) {
        if let Some(v) = parse_yes_no_exact(&text) {
            prop_assert_eq!(parse_yes_no_mme(&text), Some(v));
        }
    }

    #[test]
    fn bracketed_letter_always_wins(pre in "[^(]{0,30}", post in "[^(]{0,30}", i in 0usize..4) {
        let letter = option_letters(4).nth(i).unwrap();
        let text = format!("{pre}({letter}){post}");
        prop_assert_eq!(parse_choice(&text, &opts()), Some(letter));
    }
}
