//! Every failure in the OpenAI error envelope, with the right status.

mod common;

use common::server::{Options, TestServer};
use serde_json::{json, Value};

async fn check(
    resp: reqwest::Response,
    status: u16,
    code: Option<&str>,
    param: Option<&str>,
) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    let v: Value = resp.json().await.unwrap();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(
        e.as_object().unwrap().contains_key("param") && e.as_object().unwrap().contains_key("code"),
        "{v}"
    );
    assert_eq!(e["code"].as_str(), code, "{v}");
    assert_eq!(e["param"].as_str(), param, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_envelope() {
    let s = TestServer::start(Options {
        max_body_bytes: 4096,
        ..Options::default()
    })
    .await;
    let c = reqwest::Client::new();
    let url = s.url("/v1/completions");
    let json_post = |body: &'static str| {
        c.post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    check(json_post("{not json").await.unwrap(), 400, None, None).await;
    check(
        json_post("{\"prompt\": \"x\"} trailing").await.unwrap(),
        400,
        None,
        None,
    )
    .await;
    check(
        c.post(&url)
            .body("{\"prompt\":\"x\"}")
            .send()
            .await
            .unwrap(),
        415,
        Some("unsupported_media_type"),
        None,
    )
    .await;
    check(
        c.post(&url)
            .header("content-type", "text/plain")
            .body("{}")
            .send()
            .await
            .unwrap(),
        415,
        Some("unsupported_media_type"),
        None,
    )
    .await;
    let big = json!({"prompt": "x".repeat(10_000)});
    check(
        c.post(&url).json(&big).send().await.unwrap(),
        413,
        Some("request_too_large"),
        None,
    )
    .await;
    check(
        c.get(s.url("/v1/nothing")).send().await.unwrap(),
        404,
        Some("not_found"),
        None,
    )
    .await;
    check(
        c.get(&url).send().await.unwrap(),
        405,
        Some("method_not_allowed"),
        None,
    )
    .await;
    check(
        c.delete(s.url("/health")).send().await.unwrap(),
        405,
        Some("method_not_allowed"),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_names_the_parameter() {
    let s = TestServer::start(Options::default()).await;
    let c = reqwest::Client::new();
    let cases = [
        (json!({}), "prompt"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": [[]]}), "prompt"),
        (json!({"prompt": [99999999]}), "prompt"),
        (json!({"prompt": "x", "max_tokens": -1}), "max_tokens"),
        (json!({"prompt": "x", "max_tokens": 100000}), "max_tokens"),
        (json!({"prompt": "x", "temperature": -0.1}), "temperature"),
        (json!({"prompt": "x", "temperature": "hot"}), "temperature"),
        (json!({"prompt": "x", "top_p": 0}), "top_p"),
        (json!({"prompt": "x", "top_p": 1.5}), "top_p"),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": "x", "n": 17}), "n"),
        (
            json!({"prompt": "x", "presence_penalty": 3}),
            "presence_penalty",
        ),
        (
            json!({"prompt": "x", "frequency_penalty": -3}),
            "frequency_penalty",
        ),
        (
            json!({"prompt": "x", "repetition_penalty": 0}),
            "repetition_penalty",
        ),
        (json!({"prompt": "x", "min_p": 2}), "min_p"),
        (
            json!({"prompt": "x", "logit_bias": {"1": 200}}),
            "logit_bias",
        ),
        (
            json!({"prompt": "x", "logit_bias": {"99999999": 1}}),
            "logit_bias",
        ),
        (json!({"prompt": "x", "stop": 3}), "stop"),
        (json!({"prompt": "x", "echo": "yes"}), "echo"),
        (json!({"prompt": "word ".repeat(300)}), "prompt"),
    ];
    for (body, param) in cases {
        let r = c
            .post(s.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        check(r, 400, r_code(param), Some(param)).await;
    }
    let r = c.post(s.url("/v1/chat/completions")).json(&json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 100000})).send().await.unwrap();
    check(r, 400, Some("invalid_value"), Some("max_completion_tokens")).await;
}

/// Every validation failure carries `invalid_value`.
fn r_code(_param: &str) -> Option<&'static str> {
    Some("invalid_value")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_are_404() {
    let s = TestServer::start(Options::default()).await;
    let c = reqwest::Client::new();
    let r = c
        .post(s.url("/v1/completions"))
        .json(&json!({"model": "gpt-4", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    check(r, 404, Some("model_not_found"), Some("model")).await;
    let r = c
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "nope", "messages": []}))
        .send()
        .await
        .unwrap();
    check(r, 404, Some("model_not_found"), Some("model")).await;
    check(
        c.get(s.url("/v1/models/nope")).send().await.unwrap(),
        404,
        Some("model_not_found"),
        Some("model"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_inference_but_not_health() {
    let s = TestServer::start(Options {
        api_key: Some("sekrit".into()),
        ..Options::default()
    })
    .await;
    let c = reqwest::Client::new();
    let body = json!({"prompt": "x", "max_tokens": 1});
    check(
        c.post(s.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap(),
        401,
        Some("invalid_api_key"),
        None,
    )
    .await;
    let wrong = c
        .post(s.url("/v1/completions"))
        .bearer_auth("sekrit2")
        .json(&body)
        .send()
        .await
        .unwrap();
    check(wrong, 401, Some("invalid_api_key"), None).await;
    check(
        c.get(s.url("/v1/models")).send().await.unwrap(),
        401,
        Some("invalid_api_key"),
        None,
    )
    .await;
    let ok = c
        .post(s.url("/v1/completions"))
        .bearer_auth("sekrit")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    for open in ["/health", "/ready", "/metrics", "/openapi.json"] {
        assert_eq!(
            c.get(s.url(open)).send().await.unwrap().status(),
            200,
            "{open}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_model_loads() {
    let s = TestServer::start(Options {
        load: false,
        ..Options::default()
    })
    .await;
    let c = reqwest::Client::new();
    assert_eq!(c.get(s.url("/health")).send().await.unwrap().status(), 200);
    let r = c.get(s.url("/ready")).send().await.unwrap();
    assert_eq!(r.headers()["retry-after"], "5");
    check(r, 503, Some("not_ready"), None).await;
    check(
        c.post(s.url("/v1/completions"))
            .json(&json!({"prompt": "x"}))
            .send()
            .await
            .unwrap(),
        503,
        Some("not_ready"),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_500_without_details() {
    use axum::routing::get;
    let state = steerling::api::AppState::new(Default::default());
    let routes = axum::Router::new().route(
        "/boom",
        get(|| async { panic!("secret internals") as &str }),
    );
    let app = steerling::api::with_common_layers(routes, 1024).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let r = reqwest::get(format!("http://{addr}/boom")).await.unwrap();
    let v = check(r, 500, Some("internal_error"), None).await;
    assert!(!v.to_string().contains("secret"));
    // The server keeps serving.
    assert_eq!(
        reqwest::get(format!("http://{addr}/nothing"))
            .await
            .unwrap()
            .status(),
        404
    );
}
