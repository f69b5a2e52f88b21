//! Training jobs over HTTP on the tiny model: 202 with a job, progress,
//! events, the adapter served when done; cancellation; the queue limit;
//! serving stays up while a job trains.

mod common;

use common::server::{sse_data, tiny_job as job, wait_for_job as wait_final, Options, TestServer};
use serde_json::{json, Value};

/// A server on the tiny model whose adapters folder is `dir`.
async fn server_writing_to(dir: &std::path::Path) -> TestServer {
    TestServer::start(Options {
        adapters: Some(dir.to_path_buf()),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_trains_reports_progress_and_its_adapter_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_writing_to(dir.path()).await;
    let c = reqwest::Client::new();
    let r = c
        .post(s.url("/adapters/train"))
        .json(&job("learned", 10, 30))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let queued: Value = r.json().await.unwrap();
    let id = queued["id"].as_str().unwrap().to_string();
    assert_eq!(queued["total"], 40);
    // Serving keeps answering while the job trains.
    let mut served = 0;
    loop {
        let v: Value = c
            .post(s.url("/v1/completions"))
            .json(&json!({"prompt": "Hello", "max_tokens": 4}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            v["usage"]["completion_tokens"].as_u64().unwrap() <= 4,
            "{v}"
        );
        served += 1;
        let st: Value = c
            .get(s.url(&format!("/adapters/train/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if st["state"] != "queued" && st["state"] != "running" || served > 2000 {
            break;
        }
    }
    assert!(served >= 1);
    let done = wait_final(&s, &id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["step"], 40);
    assert!(done["held_out_mae"].as_f64().unwrap() < 0.6);
    assert!(done["kl"].as_f64().is_some() && done["loss"].as_f64().is_some());
    // The events stream replays the final state and ends.
    let body = c
        .get(s.url(&format!("/adapters/train/{id}/events")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let last: Value = serde_json::from_str(sse_data(&body).last().unwrap()).unwrap();
    assert_eq!(last["state"], "succeeded");
    // Served as a model.
    let models: Value = s.get_json("/v1/models").await;
    assert!(models.to_string().contains("\"learned\""));
    let body = json!({"model": "learned", "prompt": "Hello", "max_tokens": 3,
                      "steering": {"return": true}});
    let (_, v) = s.post_json("/v1/completions", &body).await;
    assert!(v["choices"][0]["steering"]["value"].is_string(), "{v}");
    assert!(dir.path().join("learned/adapter.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancellation_leaves_nothing_and_the_queue_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let s = server_writing_to(dir.path()).await;
    let c = reqwest::Client::new();
    let long: Value = c
        .post(s.url("/adapters/train"))
        .json(&job("long", 5000, 5000))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = long["id"].as_str().unwrap().to_string();
    // Four more wait; the sixth is refused.
    let mut queued = Vec::new();
    for i in 0..6 {
        let r = c
            .post(s.url("/adapters/train"))
            .json(&job(&format!("q{i}"), 1, 1))
            .send()
            .await
            .unwrap();
        queued.push(r.status().as_u16());
        if r.status() == 202 {
            let v: Value = r.json().await.unwrap();
            // Cancel queued jobs at once.
            let cancelled: Value = c
                .delete(s.url(&format!("/adapters/train/{}", v["id"].as_str().unwrap())))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(cancelled["state"], "cancelled");
        } else {
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["code"], "server_overloaded");
        }
    }
    assert!(
        queued.iter().all(|&q| q == 202),
        "cancelled jobs leave the queue: {queued:?}"
    );
    let mut waiting = Vec::new();
    for i in 0..5 {
        let r = c
            .post(s.url("/adapters/train"))
            .json(&job(&format!("w{i}"), 1, 1))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), if i < 4 { 202 } else { 429 });
        if r.status() == 202 {
            let v: Value = r.json().await.unwrap();
            waiting.push((i, v["id"].as_str().unwrap().to_string()));
        }
    }
    let r = c
        .delete(s.url(&format!("/adapters/train/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let done = wait_final(&s, &id).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(
        !dir.path().join("long").exists(),
        "a cancelled job writes nothing"
    );
    // The jobs that waited behind it run (and finish before the folder goes).
    for (i, id) in &waiting {
        let done = wait_final(&s, id).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert!(dir.path().join(format!("w{i}/adapter.json")).exists());
    }
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "no temporary folders: {names:?}"
    );
    // Bad jobs are refused before they queue.
    let mut bad = job("bad", 1, 1);
    bad["data"]["targets"]["default"]["v0"] = json!(0.5);
    let r = c
        .post(s.url("/adapters/train"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"].as_str().unwrap().contains("sums to"),
        "{e}"
    );
    let r = c
        .post(s.url("/adapters/train"))
        .json(&job("../escape", 1, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        c.get(s.url("/adapters/train/nope"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}
