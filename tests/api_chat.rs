//! POST /v1/chat/completions over real HTTP.

mod common;

use common::server::{sse_data, Options, TestServer};
use serde_json::{json, Value};

async fn post(s: &TestServer, body: Value) -> (u16, Value) {
    s.post_json("/v1/chat/completions", &body).await
}

fn messages() -> Value {
    json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the nurse."}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_renders_the_template_and_answers_in_chat_shape() {
    let s = TestServer::start(Options::default()).await;
    let (status, v) = post(
        &s,
        json!({"model": "tiny", "messages": messages(), "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // The prompt is exactly the ChatML rendering of the messages.
    let rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTell me about the nurse.<|im_end|>\n<|im_start|>assistant\n";
    let ids = s.engine().tokenizer().encode(rendered, false).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], 6);
    // Same text as a plain completion of the rendered prompt.
    let c: Value = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": ids, "max_tokens": 6, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        c["choices"][0]["text"]
    );
    // Content as text parts works too; other part types are refused.
    let parts = json!([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]);
    assert_eq!(
        post(&s, json!({"messages": parts, "max_tokens": 2}))
            .await
            .0,
        200
    );
    let image =
        json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
    let (status, v) = post(&s, json!({"messages": image})).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("messages[0].content"))
    );
    let (status, v) = post(&s, json!({"messages": []})).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("messages"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs_n_and_streaming() {
    let s = TestServer::start(Options::default()).await;
    let (_, v) = post(&s, json!({"messages": messages(), "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 3, "n": 2})).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    for entry in content {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!(
            (entry["logprob"].as_f64().unwrap() - top[0]["logprob"].as_f64().unwrap()).abs() < 1e-5
        );
        assert!(!entry["bytes"].as_array().unwrap().is_empty());
    }
    let (status, v) = post(&s, json!({"messages": messages(), "top_logprobs": 2})).await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (400, Some("top_logprobs"))
    );
    // Streaming: a role delta first, content deltas, a finish chunk, usage, [DONE].
    let body = json!({"messages": messages(), "max_tokens": 5, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let chunks = sse_data(&r.text().await.unwrap());
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let parsed: Vec<Value> = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    assert!(parsed
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = parsed
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect();
    let whole = post(
        &s,
        json!({"messages": messages(), "max_tokens": 5, "temperature": 0}),
    )
    .await
    .1;
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let finish: Vec<&Value> = parsed
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);
    assert_eq!(parsed.last().unwrap()["usage"], whole["usage"]);
}
