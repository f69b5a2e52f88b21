//! The shipped adapter, adapters/occupation-gender, on SmolLM2 over HTTP:
//! it loads against the real weights, its prior follows the occupation, and
//! answers show the drawn value.

mod common;

use common::server::{Options, TestServer};
use serde_json::json;

async fn shipped() -> TestServer {
    TestServer::start(Options {
        model: common::smollm2(),
        adapters: Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("adapters")),
        max_batch: 16,
        ..Options::default()
    })
    .await
}

fn shows(text: &str, value: &str) -> bool {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .collect();
    let has = |list: &[&str]| words.iter().any(|w| list.contains(&w.as_str()));
    match value {
        "female" => has(&["she", "her", "woman"]) && !has(&["he", "his", "him", "man"]),
        _ => has(&["he", "his", "him", "man"]) && !has(&["she", "her", "woman"]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_adapter_calibrates_smollm2() {
    let s = shipped().await;
    let models = s.get_json("/v1/models").await;
    let entry = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "occupation-gender")
        .cloned()
        .unwrap_or_else(|| panic!("not served: {models}"));
    assert!(entry["parent"].is_string());
    // Prompts the training never saw: the prior follows the occupation's
    // real share of women (0.8% of mechanics, 94% of personal assistants).
    let prior = |prompt: &'static str| {
        let s = &s;
        async move {
            let body = json!({"model": "occupation-gender", "prompt": prompt, "max_tokens": 1,
                              "steering": {"return": true}});
            let (status, v) = s.post_json("/v1/completions", &body).await;
            assert_eq!(status, 200, "{v}");
            v["choices"][0]["steering"]["prior"]["female"]
                .as_f64()
                .unwrap()
        }
    };
    let mechanic = prior("Write a brief story about a mechanic on a busy morning.").await;
    let assistant = prior("Describe a personal assistant you might meet.").await;
    assert!(
        mechanic < 0.25,
        "prior of female for a mechanic: {mechanic}"
    );
    assert!(
        assistant > 0.6,
        "prior of female for a personal assistant: {assistant}"
    );
    // Answers show the value their round drew. The adapter's measured
    // consistency is about 94%; over 32 answers, fewer than 26 (81%) would
    // happen with probability 0.25% at that rate (a single seed's 8
    // answers would miss 7 of 8 about one time in twelve), and steering that
    // did not work would show its value about half the time or less.
    let mut answers = Vec::new();
    for seed in [3, 4] {
        let body = json!({"model": "occupation-gender", "n": 16, "seed": seed, "max_tokens": 40,
                          "temperature": 0.7, "prompt": "Tell me a story about an accountant on their first day.",
                          "steering": {"return": true}});
        let (status, v) = s.post_json("/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        answers.extend(v["choices"].as_array().unwrap().iter().map(|c| {
            (
                c["text"].as_str().unwrap().to_string(),
                c["steering"]["value"].as_str().unwrap().to_string(),
            )
        }));
    }
    assert_eq!(answers.len(), 32);
    let consistent = answers
        .iter()
        .filter(|(text, value)| shows(text, value))
        .count();
    assert!(
        consistent >= 26,
        "{consistent} of 32 answers show their drawn value: {answers:?}"
    );
}
