//! The CLIP tokenizer against open_clip's `SimpleTokenizer` on every `tokenizer` set.

mod common;

use microdit::text::tokenizer::{ClipTokenizer, CONTEXT_LENGTH};

#[test]
fn token_ids_match_open_clip_exactly() {
    let tok = ClipTokenizer::new();
    assert_eq!(tok.vocab_size(), 49408);
    let mut checked = 0;
    let mut failures = Vec::new();
    for dir in common::fixture_sets("tokenizer") {
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        let Some(list) = cases.get("cases").and_then(|c| c.as_array()) else {
            continue;
        };
        if list.first().and_then(|c| c.get("ids")).is_none() {
            continue;
        }
        assert_eq!(
            cases["context_length"].as_u64(),
            Some(CONTEXT_LENGTH as u64)
        );
        for case in list {
            let text = case["text"].as_str().unwrap();
            let expected: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let ours = tok.tokenize(text).0;
            if ours != expected {
                failures.push(format!(
                    "{text:?}\n    ours {ours:?}\n    ref  {expected:?}"
                ));
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no tokenizer cases found");
    assert!(
        failures.is_empty(),
        "{} of {checked} prompts differ:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[test]
fn long_prompts_are_truncated_keeping_the_end_token() {
    let tok = ClipTokenizer::new();
    let (ids, truncated) = tok.tokenize(&"owl ".repeat(200));
    assert!(truncated);
    assert_eq!(ids.len(), CONTEXT_LENGTH);
    assert_eq!(ids[0], tok.start_token);
    assert_eq!(ids[CONTEXT_LENGTH - 1], tok.end_token);
    let (ids, truncated) = tok.tokenize("an owl");
    assert!(!truncated);
    assert_eq!(
        (ids[0], ids[3], ids[4]),
        (tok.start_token, tok.end_token, 0)
    );
}
