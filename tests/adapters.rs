//! Adapter loading at run time: damaged or mismatched adapters are refused
//! with a clear error and never half-loaded; swaps never disturb requests in
//! flight; admin endpoints are guarded; the report reflects served rounds.

mod common;

use common::server::{Options, TestServer};
use serde_json::{json, Value};
use steerling::model::{load_model, ModelSource};
use steerling::testing::{write_test_adapter, TestAdapter};

struct Fixture {
    server: TestServer,
    dir: tempfile::TempDir,
    config: steerling::model::ModelConfig,
    sha: String,
}

async fn fixture(tweak: impl FnOnce(&mut Options)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_model(&ModelSource::Gguf(common::tiny_gguf()), 256).unwrap();
    write_test_adapter(
        dir.path(),
        "good",
        &loaded.model.config,
        &loaded.sha256,
        &TestAdapter::default(),
    )
    .unwrap();
    let mut opts = Options {
        adapters: Some(dir.path().to_path_buf()),
        max_batch: 16,
        ..Options::default()
    };
    tweak(&mut opts);
    Fixture {
        server: TestServer::start(opts).await,
        dir,
        config: loaded.model.config,
        sha: loaded.sha256,
    }
}

impl Fixture {
    fn write(&self, name: &str, spec: &TestAdapter) -> std::path::PathBuf {
        write_test_adapter(self.dir.path(), name, &self.config, &self.sha, spec).unwrap();
        self.dir.path().join(name)
    }

    async fn load(&self, name: &str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(self.server.url(&format!("/adapters/{name}/load")))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }
}

fn edit_json(path: &std::path::Path, f: impl FnOnce(&mut Value)) {
    let file = path.join("adapter.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(file, serde_json::to_string(&v).unwrap()).unwrap();
}

fn edit_tensors(
    path: &std::path::Path,
    f: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) {
    let file = path.join("adapter.safetensors");
    let mut t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    f(&mut t);
    candle_core::safetensors::save(&t, &file).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_adapters_are_refused_with_the_reason() {
    let fx = fixture(|_| {}).await;
    type Damage = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "badjson",
            Box::new(|p| std::fs::write(p.join("adapter.json"), "{not json").unwrap()),
            "adapter.json is not valid",
        ),
        (
            "notensor",
            Box::new(|p| {
                edit_tensors(p, |t| {
                    t.remove("steering.embed");
                })
            }),
            "missing tensor `steering.embed`",
        ),
        (
            "noweights",
            Box::new(|p| std::fs::remove_file(p.join("adapter.safetensors")).unwrap()),
            "cannot read",
        ),
        (
            "shape",
            Box::new(|p| {
                edit_tensors(p, |t| {
                    t.insert(
                        "steering.head".into(),
                        candle_core::Tensor::zeros(
                            (2, 7),
                            candle_core::DType::F32,
                            &candle_core::Device::Cpu,
                        )
                        .unwrap(),
                    );
                })
            }),
            "has shape [2, 7], expected [2, 64]",
        ),
        (
            "sha",
            Box::new(|p| edit_json(p, |v| v["base_model"]["sha256"] = json!("0000"))),
            "sha256 0000",
        ),
        (
            "sum",
            Box::new(|p| edit_json(p, |v| v["targets"]["default"]["v0"] = json!(0.9))),
            "targets.default sums to 1.4",
        ),
        (
            "unknown",
            Box::new(|p| {
                edit_json(p, |v| {
                    v["targets"]["contexts"] = json!({"nurse": {"v0": 0.5, "v9": 0.5}})
                })
            }),
            "names unknown value `v9`",
        ),
        (
            "lora",
            Box::new(|p| {
                edit_tensors(p, |t| {
                    t.remove("lora.1.v_proj.b");
                })
            }),
            "missing tensor `lora.1.v_proj.b`",
        ),
        (
            "calscale",
            Box::new(|p| edit_json(p, |v| v["prior_calibration"] = json!({"scale": -1.0}))),
            "prior_calibration.scale = -1 must be a positive number",
        ),
        (
            "calbias",
            Box::new(|p| {
                edit_json(p, |v| {
                    v["prior_calibration"] = json!({"scale": 1.0, "bias": {"v9": 0.5}})
                })
            }),
            "prior_calibration.bias names unknown value `v9`",
        ),
    ];
    for (name, damage, expect) in cases {
        let path = fx.write(name, &TestAdapter::default());
        damage(&path);
        let (status, v) = fx.load(name).await;
        assert_eq!(status, 400, "{name}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(expect), "{name}: {msg}");
        let models: Value = reqwest::get(fx.server.url("/v1/models"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            !models.to_string().contains(name),
            "{name} must not be listed"
        );
    }
    // Reloading a damaged version of a loaded adapter keeps the old one serving.
    let (status, v) = fx.load("good").await;
    assert_eq!(status, 200, "{v}");
    let version = v["version"].as_u64().unwrap();
    edit_json(&fx.dir.path().join("good"), |v| {
        v["targets"]["default"]["v0"] = json!(2.0)
    });
    assert_eq!(fx.load("good").await.0, 400);
    let list: Value = reqwest::get(fx.server.url("/adapters"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["version"].as_u64().unwrap(), version);
    let r = reqwest::Client::new()
        .post(fx.server.url("/v1/completions"))
        .json(&json!({"model": "good", "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Names that could leave the adapters folder are refused.
    for bad in ["..", ".hidden", "a%2Fb", "%2Fetc"] {
        let (status, _) = fx.load(bad).await;
        assert!(status == 400 || status == 404, "{bad}: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_adapters_at_start_are_skipped_and_the_rest_load() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_model(&ModelSource::Gguf(common::tiny_gguf()), 256).unwrap();
    write_test_adapter(
        dir.path(),
        "fine",
        &loaded.model.config,
        &loaded.sha256,
        &TestAdapter::default(),
    )
    .unwrap();
    write_test_adapter(
        dir.path(),
        "broken",
        &loaded.model.config,
        &loaded.sha256,
        &TestAdapter::default(),
    )
    .unwrap();
    std::fs::write(dir.path().join("broken/adapter.json"), "[]").unwrap();
    let s = TestServer::start(Options {
        adapters: Some(dir.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    let list: Value = reqwest::get(s.url("/adapters"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["fine"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swaps_and_unloads_never_disturb_requests_in_flight() {
    let fx = fixture(|o| o.max_batch = 32).await;
    let eos = fx.server.engine().tokenizer().eos[0].to_string();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let url = fx.server.url("/v1/completions");
        let eos = eos.clone();
        tasks.push(tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"model": "good", "prompt": "The nurse", "max_tokens": 60, "seed": i, "logit_bias": {eos: -100}}))
                .send()
                .await
                .unwrap()
        }));
    }
    // Reload (a new version) and unload while those run.
    for _ in 0..3 {
        assert_eq!(fx.load("good").await.0, 200);
    }
    assert_eq!(
        status(fx.server.url("/adapters/good"), "DELETE", None).await,
        200
    );
    for t in tasks {
        let r = t.await.unwrap();
        // Requests admitted before the unload finish; later ones get 404, never 5xx.
        assert!(r.status() == 200 || r.status() == 404, "{}", r.status());
        if r.status() == 200 {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["usage"]["completion_tokens"], 60);
        }
    }
    let r = reqwest::Client::new()
        .post(fx.server.url("/v1/completions"))
        .json(&json!({"model": "good", "prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        status(fx.server.url("/adapters/good"), "DELETE", None).await,
        404
    );
    assert_eq!(fx.load("good").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_are_guarded() {
    let closed = fixture(|o| o.admin_open = false).await;
    let r = reqwest::Client::new()
        .post(closed.server.url("/adapters/good/load"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "admin_disabled");
    assert_eq!(
        status(closed.server.url("/distribution/reset"), "POST", None).await,
        403
    );
    let keyed = fixture(|o| {
        o.admin_open = false;
        o.admin_key = Some("root".into());
    })
    .await;
    let load = keyed.server.url("/adapters/good/load");
    assert_eq!(status(load.clone(), "POST", None).await, 401);
    assert_eq!(status(load.clone(), "POST", Some("wrong")).await, 401);
    assert_eq!(status(load, "POST", Some("root")).await, 200);
    let unload = keyed.server.url("/adapters/good");
    assert_eq!(status(unload, "DELETE", Some("root")).await, 200);
}

/// The status of an empty-bodied request, with a bearer key or none.
async fn status(url: String, method: &str, key: Option<&str>) -> u16 {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_counts_served_rounds_and_resets() {
    let fx = fixture(|o| o.monitor.min_rounds = 10).await;
    let fx2 = &fx;
    let mut drawn = std::collections::BTreeMap::<String, u64>::new();
    for seed in 0..10 {
        let v: Value = reqwest::Client::new()
            .post(fx2.server.url("/v1/completions"))
            .json(&json!({"model": "good", "prompt": "The nurse", "max_tokens": 4, "n": 4, "seed": seed, "steering": {"return": true}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for c in v["choices"].as_array().unwrap() {
            *drawn
                .entry(c["steering"]["value"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let report: Value = reqwest::get(fx.server.url("/distribution/report?adapter=good"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let a = &report["adapters"][0];
    assert_eq!(a["adapter"], "good");
    assert_eq!(a["values"], json!(["v0", "v1"]));
    let count = &a["aggregate"][0];
    assert_eq!(count["window"], "count");
    assert_eq!(count["n"], 40);
    for (value, n) in &drawn {
        assert_eq!(count["drawn"][value]["count"].as_u64().unwrap(), *n);
        let p = count["drawn"][value]["p"].as_f64().unwrap();
        assert!(
            count["drawn"][value]["low"].as_f64().unwrap() <= p
                && p <= count["drawn"][value]["high"].as_f64().unwrap()
        );
    }
    assert_eq!(count["target"], json!({"v0": 0.5, "v1": 0.5}));
    // The tiny model never writes the detection words: every round is `none`.
    assert_eq!(count["detected_none"], 40);
    assert_eq!(count["status"], "insufficient_data");
    assert!(a["contexts"]["default"].is_array());
    let time_only: Value = reqwest::get(fx.server.url("/distribution/report?window=time"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        time_only["adapters"][0]["aggregate"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(time_only["adapters"][0]["aggregate"][0]["window"], "time");
    // The page: inline SVG, nothing fetched from elsewhere.
    let html = reqwest::Client::new()
        .get(fx.server.url("/distribution/report"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("<svg") && html.contains("good"));
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script"));
    let page = reqwest::get(fx.server.url("/distribution"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<svg"));
    // Prometheus counters per drawn value.
    let metrics = reqwest::get(fx.server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "steerling_steering_draws_total{adapter=\"good\",attribute=\"letter\",value=\"v0\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        "steerling_steering_detected_total{adapter=\"good\",attribute=\"letter\",value=\"none\"}"
    ));
    assert!(metrics.contains("steerling_steering_status{adapter=\"good\",attribute=\"letter\"} -1"));
    // Reset clears the windows.
    let r = reqwest::Client::new()
        .post(fx.server.url("/distribution/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let report: Value = reqwest::get(fx.server.url("/distribution/report"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(report["adapters"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_names_and_links_cannot_escape_the_adapters_folder() {
    let fx = fixture(|_| {}).await;
    let outside = tempfile::tempdir().unwrap();
    let good = fx.dir.path().join("good");
    // A whole folder linked from elsewhere, and a real folder whose files are links.
    let elsewhere = outside.path().join("good-copy");
    std::fs::create_dir(&elsewhere).unwrap();
    for f in ["adapter.json", "adapter.safetensors"] {
        std::fs::copy(good.join(f), elsewhere.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(&elsewhere, fx.dir.path().join("linked-folder")).unwrap();
    let linked_files = fx.dir.path().join("linked-files");
    std::fs::create_dir(&linked_files).unwrap();
    for f in ["adapter.json", "adapter.safetensors"] {
        std::os::unix::fs::symlink(elsewhere.join(f), linked_files.join(f)).unwrap();
    }
    let (status, v) = fx.load("linked-folder").await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("outside"),
        "{v}"
    );
    let (status, v) = fx.load("linked-files").await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("links are refused"),
        "{v}"
    );
    for name in [
        "..",
        "%2e%2e",
        "..%2Fgood",
        "%2E%2E%2Fgood",
        "%2Fetc",
        ".hidden",
        "good%00",
        "good%2F..%2Fgood",
        &"a".repeat(65),
    ] {
        let (status, v) = fx.load(name).await;
        assert!(matches!(status, 400 | 404), "{name}: {status} {v}");
        let r = reqwest::Client::new()
            .delete(fx.server.url(&format!("/adapters/{name}")))
            .send()
            .await
            .unwrap();
        assert!(matches!(r.status().as_u16(), 400 | 404), "{name}");
    }
    assert_eq!(
        fx.server.model_ids().await,
        ["tiny", "good"],
        "only the real adapter is served"
    );
    // The same at start: the links are skipped, the real adapter loads.
    let restarted = TestServer::start(Options {
        adapters: Some(fx.dir.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    assert_eq!(restarted.model_ids().await, ["tiny", "good"]);
}
