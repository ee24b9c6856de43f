//! The grammar: every generated text parses back and tokenizes into the vocabulary.

use std::collections::BTreeSet;

use pairuni_toyworld::scene::{Kind, Scene};
use pairuni_toyworld::text::{
    caption, parse_caption, parse_question, random_question, tokenize, vocabulary, PromptSpec,
    TASKS,
};
use rand::SeedableRng;

fn assert_in_vocab(text: &str, vocab: &BTreeSet<String>) {
    for tok in tokenize(text) {
        assert!(
            vocab.contains(tok),
            "token {tok:?} of {text:?} is not in the vocabulary"
        );
    }
}

#[test]
fn tokenize_follows_the_whitespace_rule() {
    assert_eq!(
        tokenize("Is it? A. red, B:x_1  ?!"),
        ["Is", "it", "?", "A", ".", "red", ",", "B", ":", "x_1", "?!"]
    );
    assert!(tokenize("   ").is_empty());
}

#[test]
fn every_generated_text_is_in_the_vocabulary_and_parses_back() {
    let vocab: BTreeSet<String> = vocabulary().into_iter().collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut categories = BTreeSet::new();
    for i in 0..4000 {
        let scene = Scene::random(&mut rng, 1, if i % 10 == 0 { 9 } else { 4 });
        let asked = random_question(&scene, i % 2 == 0, &mut rng);
        categories.insert(asked.question.category());
        assert_in_vocab(&asked.text, &vocab);
        assert_in_vocab(&asked.answer, &vocab);
        for o in &asked.options {
            assert_in_vocab(o, &vocab);
        }
        let (q, opts) = parse_question(&asked.text).unwrap();
        assert_eq!(q, asked.question);
        assert_eq!(opts, asked.options);
        let text = caption(&scene, Some(&asked.question));
        assert_in_vocab(&text, &vocab);
        let claims = parse_caption(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(claims.len() >= 2 || !text.contains(". The"), "{text}");
        for c in claims {
            c.check(&scene).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        }
    }
    assert_eq!(categories.len(), 5, "{categories:?}");
    for tag in TASKS {
        let all = PromptSpec::all_of(tag);
        assert!(!all.is_empty());
        for spec in all {
            let text = spec.text();
            assert_in_vocab(&text, &vocab);
            assert_eq!(PromptSpec::parse(&text), Ok(spec), "{text}");
            assert_eq!(spec.tag(), tag);
        }
    }
    for k in Kind::all() {
        assert_in_vocab(
            &format!("Is there {} in the image?", k.with_article()),
            &vocab,
        );
    }
}

#[test]
fn foreign_text_is_an_error_not_a_panic() {
    for t in [
        "",
        "?",
        "What colour is the dog?",
        "A. B. C. D.",
        "Is the red circle left of?",
        "a photo of",
    ] {
        assert!(parse_question(t).is_err(), "{t}");
        assert!(PromptSpec::parse(t).is_err(), "{t}");
    }
    assert!(parse_caption("There is a dog. It is nice.").is_err());
    assert!(parse_question("What color is the circle? A. red B. blue").is_err());
    assert!(PromptSpec::parse("a photo of a circle and a circle").is_err());
}
