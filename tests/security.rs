//! Keys, hostile input and faults: each auth case, each way out of the
//! adapters folder, input built to overflow or exhaust, a crash of the
//! engine mid-stream and of a training job; keys never reach the log.

mod common;

use common::child::ChildServer;
use common::server::{sse_data, Options, TestServer};
use serde_json::{json, Value};

const INFER: &str = "infer-0123456789abcdef";
const ADMIN: &str = "admin-fedcba9876543210";

/// A completion (to `model`, or the base model) still succeeds.
async fn assert_serving(s: &TestServer, model: Option<&str>) {
    let body = json!({"model": model, "prompt": "Hello", "max_tokens": 3});
    let (status, v) = s.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
}

/// Asserts each `Authorization` value in `bad` gets 401 on the route.
async fn all_refused(s: &TestServer, method: &str, path: &str, bad: &[Option<&str>]) {
    for auth in bad {
        let status = send(s, method, path, *auth).await;
        assert_eq!(status, 401, "{method} {path} with {auth:?}");
    }
}

async fn send(s: &TestServer, method: &str, path: &str, auth: Option<&str>) -> u16 {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut r = reqwest::Client::new().request(method.clone(), s.url(path));
    if let Some(auth) = auth {
        r = r.header("authorization", auth);
    }
    if method == reqwest::Method::POST {
        r = r.json(&json!({"prompt": "Hello", "max_tokens": 2}));
    }
    r.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_opens_its_own_routes_only() {
    let s = TestServer::start(Options {
        api_key: Some(INFER.into()),
        admin_key: Some(ADMIN.into()),
        admin_open: false,
        ..Options::default()
    })
    .await;
    let infer = format!("Bearer {INFER}");
    let admin = format!("Bearer {ADMIN}");
    let inference = [
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/adapters"),
        ("GET", "/distribution/report"),
        ("GET", "/distribution"),
    ];
    for (method, path) in inference {
        let basic = format!("Basic {INFER}");
        let bad = [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer "),
            Some("Bearer wrong"),
            Some(&infer[..infer.len() - 1]),
            Some(basic.as_str()),
            Some(admin.as_str()),
        ];
        all_refused(&s, method, path, &bad).await;
        assert_eq!(
            send(&s, method, path, Some(&infer)).await,
            200,
            "{method} {path}"
        );
        let lower = format!("bearer {INFER}");
        assert_eq!(
            send(&s, method, path, Some(&lower)).await,
            200,
            "scheme is case-insensitive"
        );
    }
    let admin_routes = [
        ("POST", "/distribution/reset", 200),
        ("POST", "/adapters/missing/load", 404),
        ("DELETE", "/adapters/missing", 404),
        ("GET", "/adapters/train/nope", 404),
    ];
    for (method, path, ok) in admin_routes {
        all_refused(
            &s,
            method,
            path,
            &[None, Some("Bearer wrong"), Some(&infer)],
        )
        .await;
        assert_eq!(
            send(&s, method, path, Some(&admin)).await,
            ok,
            "{method} {path}"
        );
    }
    for open in ["/health", "/ready", "/metrics", "/openapi.json", "/docs/"] {
        assert_eq!(send(&s, "GET", open, None).await, 200, "{open}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_key_admin_is_off_unless_on_loopback() {
    let off = TestServer::start(Options {
        admin_open: false,
        ..Options::default()
    })
    .await;
    for (method, path) in [
        ("POST", "/distribution/reset"),
        ("POST", "/adapters/x/load"),
    ] {
        assert_eq!(send(&off, method, path, None).await, 403, "{path}");
        assert_eq!(send(&off, method, path, Some("Bearer anything")).await, 403);
    }
    assert_eq!(send(&off, "POST", "/v1/completions", None).await, 200);
    let local = TestServer::start(Options::default()).await;
    assert_eq!(send(&local, "POST", "/distribution/reset", None).await, 200);
}

#[test]
fn keys_never_reach_the_log() {
    let model = common::tiny_gguf();
    let server = ChildServer::start(
        &[
            "--model",
            model.to_str().unwrap(),
            "--adapters",
            "/nonexistent",
        ],
        &[
            ("STEERLING_API_KEY", INFER),
            ("STEERLING_ADMIN_KEY", ADMIN),
            ("RUST_LOG", "trace"),
        ],
    );
    let guess = "guess-5555555555555555";
    assert_eq!(server.status("GET", "/v1/models", Some(INFER)), Some(200));
    assert_eq!(server.status("GET", "/v1/models", Some(guess)), Some(401));
    assert_eq!(
        server.status("POST", "/distribution/reset", Some(ADMIN)),
        Some(200)
    );
    assert_eq!(
        server.status("POST", "/distribution/reset", Some(INFER)),
        Some(401)
    );
    let log = server.log_text();
    assert!(log.contains("/v1/models"), "requests are logged: {log}");
    for secret in [INFER, ADMIN, guess] {
        assert!(!log.contains(secret), "`{secret}` in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_refused_before_any_work() {
    let s = TestServer::start(Options::default()).await;
    let c = reqwest::Client::new();
    let huge = u64::MAX;
    let cases = [
        // Sizes that overflow a product or a sum.
        (
            json!({"prompt": ["a", "b"], "n": 9223372036854775808u64}),
            "n",
        ),
        (
            json!({"prompt": ["a", "b"], "n": 1, "best_of": 9223372036854775808u64}),
            "best_of",
        ),
        (json!({"prompt": "x", "max_tokens": huge}), "max_tokens"),
        (
            json!({"prompt": "x", "top_k": huge, "max_tokens": 1, "n": huge}),
            "n",
        ),
        // Text far past the prompt limit is not even tokenized.
        (json!({"prompt": "x".repeat(200 * 64 + 1)}), "prompt"),
        (json!({"prompt": [1, 2, 4294967295u32]}), "prompt"),
        (json!({"prompt": [-1]}), "prompt"),
        (json!({"prompt": [[1], []]}), "prompt"),
        (json!({"prompt": vec!["x"; 33]}), "prompt"),
        (
            json!({"prompt": "x", "logit_bias": {"-1": 1}}),
            "logit_bias",
        ),
        (
            json!({"prompt": "x", "logit_bias": {" 1": 1}}),
            "logit_bias",
        ),
        (
            json!({"prompt": "x", "logit_bias": {"1e3": 1}}),
            "logit_bias",
        ),
        (
            json!({"prompt": "x", "logit_bias": {"4294967296": 1}}),
            "logit_bias",
        ),
        (json!({"prompt": "x", "stop": vec!["s"; 5]}), "stop"),
        (json!({"prompt": "x", "stop": "s".repeat(257)}), "stop"),
        (json!({"prompt": "x", "logprobs": 6}), "logprobs"),
        (json!({"prompt": "x", "temperature": 1e39}), "temperature"),
        (json!({"prompt": "x", "seed": -1}), "seed"),
    ];
    for (body, param) in cases {
        let r = c
            .post(s.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 400, "{body:.200}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    let chat = json!({"messages": [{"role": "user", "content": "x".repeat(200 * 64 + 1)}]});
    let r = c
        .post(s.url("/v1/chat/completions"))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Not UTF-8, and nested past any sane depth.
    for raw in [
        b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
        format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        format!(
            "{{\"prompt\": {}\"x\"{}}}",
            "[".repeat(1000),
            "]".repeat(1000)
        )
        .into_bytes(),
    ] {
        let r = c
            .post(s.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    // A model name is never a path.
    for model in [
        "../../etc/passwd",
        "/etc/passwd",
        "tiny/../tiny",
        "tiny\u{0}",
    ] {
        let r = c
            .post(s.url("/v1/completions"))
            .json(&json!({"model": model, "prompt": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{model}");
    }
    // Still serving.
    assert_serving(&s, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_crash_mid_stream_ends_the_stream_with_an_error_and_serving_goes_on() {
    use steerling::engine::{Crash, Event, GenerateRequest, SamplingParams};
    let s = TestServer::start(Options {
        limits: steerling::api::validation::Limits {
            max_total_tokens: 2048,
            max_prompt_tokens: 200,
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    let c = reqwest::Client::new();
    let body = json!({"prompt": "Hello", "max_tokens": 2000, "ignore_eos": true, "stream": true});
    let mut stream = c
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut text = String::from_utf8(stream.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    // The fault strikes while the stream is running.
    let engine = s.state.engine.get().unwrap();
    let ids = engine.tokenizer().encode("Hi", true).unwrap();
    let mut faulty = GenerateRequest::new(ids, 4, SamplingParams::greedy());
    faulty.crash = Some(Crash::OnAdmit);
    let mut faulty = engine.submit(faulty).unwrap();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        text += &String::from_utf8_lossy(&chunk);
    }
    assert!(!matches!(faulty.recv().await, Some(Event::Done { .. })));
    let events = sse_data(&text);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error", "{text:.400}");
    assert!(
        !text.contains("[DONE]"),
        "a failed stream does not claim to be complete"
    );
    assert_serving(&s, None).await;
    let metrics = s.get_text("/metrics").await;
    assert!(
        metrics.contains("steerling_engine_restarts_total"),
        "{metrics:.300}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_training_job_fails_alone_and_the_next_one_trains() {
    use steerling::training::jobs::{JobRequest, JobState};
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(Options {
        adapters: Some(dir.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let jobs = s.state.training.get().unwrap();
    let mut request: JobRequest =
        serde_json::from_value(common::server::tiny_job("broken", 2, 2)).unwrap();
    request.crash = true;
    let broken = jobs.submit(request).unwrap();
    let good = jobs
        .submit(serde_json::from_value(common::server::tiny_job("fine", 2, 2)).unwrap())
        .unwrap();
    let good_id = good.id.clone();
    let broken = common::server::wait_for_job(&s, &broken.id).await;
    assert_eq!(broken["state"], "failed", "{broken}");
    assert_eq!(
        broken["error"],
        "the training job failed with an internal error"
    );
    let good = common::server::wait_for_job(&s, &good_id).await;
    assert_eq!(good["state"], "succeeded", "{good}");
    assert!(!dir.path().join("broken").exists());
    assert_eq!(jobs.status(&good_id).unwrap().state, JobState::Succeeded);
    assert_serving(&s, Some("fine")).await;
}
