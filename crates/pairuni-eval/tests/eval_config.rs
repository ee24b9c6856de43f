//! The `[eval]` section: documented defaults, partial sections, rule names, rejected typos and bad values.

use pairuni_eval::config::EvalConfig;
use pairuni_eval::mcq::ChoiceRule;
use pairuni_eval::pope::YesNoRule;

#[test]
fn defaults_are_the_documented_ones() {
    let c = EvalConfig::default();
    assert_eq!(c.seed, 0);
    assert_eq!(c.cfg_weight, 5.0);
    assert_eq!(c.text_temperature, 0.0);
    assert!(c.greedy_text());
    assert_eq!(c.image_temperature, 1.0);
    assert_eq!(c.images_per_prompt, 4);
    assert_eq!(c.max_new_tokens, 16);
    assert_eq!(c.pope_rule, YesNoRule::PopeExtract);
    assert_eq!(c.mcq_rule, ChoiceRule::MmStar);
    assert_eq!(c.limits.geneval, None);
    assert!(c.validate().is_ok());
}

#[test]
fn partial_sections_fill_in_defaults_and_typos_are_rejected() {
    let c: EvalConfig = serde_json::from_str(
        r#"{"seed": 7, "pope_rule": "exact-match", "mcq_rule": "mmmu", "limits": {"pope": 10}}"#,
    )
    .unwrap();
    assert_eq!(c.seed, 7);
    assert_eq!(c.pope_rule, YesNoRule::ExactMatch);
    assert_eq!(c.mcq_rule, ChoiceRule::Mmmu);
    assert_eq!(c.limits.pope, Some(10));
    assert_eq!(c.images_per_prompt, 4);
    let err = serde_json::from_str::<EvalConfig>(r#"{"cfg_wieght": 3}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cfg_wieght"), "{err}");
    let err = serde_json::from_str::<EvalConfig>(r#"{"pope_rule": "fuzzy"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fuzzy"), "{err}");
}

#[test]
fn validate_names_the_bad_field() {
    let c = EvalConfig {
        images_per_prompt: 0,
        ..EvalConfig::default()
    };
    assert!(c.validate().unwrap_err().contains("images_per_prompt"));
    let c = EvalConfig {
        top_p: 0.0,
        ..EvalConfig::default()
    };
    assert!(c.validate().unwrap_err().contains("top_p"));
    let c = EvalConfig {
        text_temperature: 0.7,
        ..EvalConfig::default()
    };
    assert!(!c.greedy_text());
}
