//! Operations: models, metrics, OpenAPI, docs, request ids, overload,
//! cancellation and graceful shutdown.

mod common;

use common::server::{Options, TestServer};
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_in_the_openai_shape() {
    let s = TestServer::start(Options::default()).await;
    let v: Value = reqwest::get(s.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "steerling");
    let one: Value = reqwest::get(s.url("/v1/models/tiny"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one, v["data"][0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_tokens_and_latencies() {
    let s = TestServer::start(Options::default()).await;
    let c = reqwest::Client::new();
    for _ in 0..3 {
        c.post(s.url("/v1/completions"))
            .json(&json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}))
            .send()
            .await
            .unwrap();
    }
    c.post(s.url("/v1/completions"))
        .json(&json!({"prompt": "x", "n": 0}))
        .send()
        .await
        .unwrap();
    let text = reqwest::get(s.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert!(
        count("steerling_requests_total{endpoint=\"/v1/completions\",status=\"200\"}") >= 3.0,
        "{text}"
    );
    assert!(count("steerling_requests_total{endpoint=\"/v1/completions\",status=\"400\"}") >= 1.0);
    assert!(count("steerling_generated_tokens_total") >= 12.0);
    assert!(count("steerling_prompt_tokens_total") >= 3.0);
    for name in [
        "steerling_request_duration_seconds_bucket",
        "steerling_queue_time_seconds_bucket",
        "steerling_time_to_first_token_seconds_bucket",
        "steerling_inter_token_latency_seconds_bucket",
        "steerling_batch_size_bucket",
        "steerling_running_sequences",
        "steerling_waiting_sequences",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
}

#[test]
fn committed_openapi_document_is_up_to_date() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .unwrap();
    assert!(
        committed == steerling::api::openapi::document(),
        "openapi/openapi.json is out of date; regenerate it with `cargo run --release -- openapi > openapi/openapi.json`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_and_offline_docs_are_served() {
    let s = TestServer::start(Options::default()).await;
    let spec: Value = reqwest::get(s.url("/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["paths"]["/v1/completions"]["post"].is_object());
    assert!(spec["paths"]["/v1/chat/completions"]["post"].is_object());
    let page = reqwest::get(s.url("/docs/")).await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger"), "{html}");
    assert!(
        !html.contains("https://"),
        "the docs page loads nothing from the network"
    );
    let js = reqwest::get(s.url("/docs/swagger-ui-bundle.js"))
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_generated() {
    let s = TestServer::start(Options::default()).await;
    let c = reqwest::Client::new();
    let r = c
        .get(s.url("/health"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = c.get(s.url("/health")).send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"].to_str().unwrap().len(), 36);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_fast_and_the_rest_is_served() {
    let s = TestServer::start(Options {
        max_batch: 2,
        max_queued: 2,
        ..Options::default()
    })
    .await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = s.url("/v1/completions");
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let r = reqwest::Client::new()
                .post(url)
                .json(&json!({"prompt": "Hello", "max_tokens": 200, "temperature": 0}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = r.json().await.unwrap();
            (status, retry, body, start.elapsed())
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, retry, body, took) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                refused += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert_eq!(body["error"]["code"], "server_overloaded");
                assert!(took < Duration::from_secs(5), "refusals are immediate");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(ok >= 4, "at least the capacity is served ({ok})");
    assert!(refused >= 1, "some requests are refused");
    assert_eq!(ok + refused, 20);
    // Responsive afterwards, and the capacity is back.
    let r = reqwest::get(s.url("/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.state.capacity.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_streaming_clients_free_their_slots() {
    let s = TestServer::start(Options {
        max_batch: 16,
        limits: steerling::api::validation::Limits {
            max_total_tokens: 4000,
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    // End-of-sequence is banned so that no stream ends by itself.
    let eos = s.engine().tokenizer().eos[0];
    let body = json!({"prompt": "Hello", "max_tokens": 3500, "stream": true, "logit_bias": {eos.to_string(): -100}});
    let mut streams = Vec::new();
    for _ in 0..10 {
        let r = reqwest::Client::new()
            .post(s.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let mut body = r.bytes_stream();
        body.next().await.unwrap().unwrap();
        streams.push(body);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.engine().running() < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(s.engine().running(), 10);
    drop(streams);
    while (s.engine().running() > 0 || s.state.capacity.in_flight() > 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.engine().running(), 0);
    assert_eq!(s.state.capacity.in_flight(), 0);
    // A non-streaming client that hangs up (its socket closed) is freed too.
    use tokio::io::AsyncWriteExt;
    let body =
        json!({"prompt": "Hello", "max_tokens": 3500, "logit_bias": {eos.to_string(): -100}})
            .to_string();
    let mut socket = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.engine().running() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(s.engine().running(), 1);
    drop(socket);
    while s.engine().running() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.engine().running(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_in_flight_requests_and_stops_accepting() {
    let mut s = TestServer::start(Options::default()).await;
    let url = s.url("/v1/completions");
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&json!({"prompt": "Hello", "max_tokens": 150, "temperature": 0}))
            .send()
            .await
            .unwrap()
    });
    // Wait until the engine runs it. On a busy machine the whole request can
    // start and finish between two looks; then there is nothing left to wait
    // for (the loop used to spin forever there).
    while s.engine().running() == 0 && !in_flight.is_finished() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    s.shutdown();
    let r = in_flight.await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 150);
    (&mut s.handle).await.unwrap().unwrap();
    assert!(
        reqwest::get(s.url("/health")).await.is_err(),
        "no longer accepting"
    );
}
