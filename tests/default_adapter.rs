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
    // Each answer shows the value its round drew.
    let body = json!({"model": "occupation-gender", "n": 8, "seed": 3, "max_tokens": 40,
                      "temperature": 0.7, "prompt": "Tell me a story about an accountant on their first day.",
                      "steering": {"return": true}});
    let (status, v) = s.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    let consistent = choices
        .iter()
        .filter(|c| {
            shows(
                c["text"].as_str().unwrap(),
                c["steering"]["value"].as_str().unwrap(),
            )
        })
        .count();
    assert!(
        consistent >= 7,
        "{consistent} of 8 answers show their drawn value: {v}"
    );
}
