//! An in-process steerling server on a loopback port, for HTTP tests.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use steerling::api::{self, validation::Limits, AppState, Settings};
use steerling::engine::{Engine, EngineConfig};

pub struct TestServer {
    pub base: String,
    pub state: Arc<AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub struct Options {
    pub model: std::path::PathBuf,
    pub max_batch: usize,
    pub max_queued: usize,
    pub max_body_bytes: usize,
    pub api_key: Option<String>,
    pub load: bool,
    pub limits: Limits,
    pub adapters: Option<std::path::PathBuf>,
    pub admin_key: Option<String>,
    pub admin_open: bool,
    pub monitor: steerling::monitor::MonitorConfig,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            model: super::tiny_gguf(),
            max_batch: 8,
            max_queued: 64,
            max_body_bytes: 1 << 20,
            api_key: None,
            load: true,
            limits: Limits {
                max_total_tokens: 256,
                max_prompt_tokens: 200,
                ..Limits::default()
            },
            adapters: None,
            admin_key: None,
            admin_open: true,
            monitor: Default::default(),
        }
    }
}

impl TestServer {
    pub async fn start(opts: Options) -> Self {
        let state = AppState::new(Settings {
            model_id: "tiny".into(),
            limits: opts.limits.clone(),
            capacity: opts.max_batch + opts.max_queued,
            api_key: opts.api_key.clone(),
            admin_key: opts.admin_key.clone(),
            admin_open: opts.admin_open,
            default_policy: steerling::steering::Policy::Prior,
            monitor: opts.monitor.clone(),
            fleet: None,
        });
        if opts.load {
            let config = EngineConfig {
                max_batch: opts.max_batch,
                max_context: opts.limits.max_total_tokens,
                prefill_chunk: 64,
            };
            let engine = super::engine_for(&opts.model, config);
            let dir = opts
                .adapters
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("steerling-no-adapters"));
            state.set_loaded(
                engine,
                dir,
                Some(steerling::model::ModelSource::from_path(&opts.model).unwrap()),
            );
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = api::router(state.clone(), opts.max_body_bytes);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(api::serve(
            listener,
            app,
            async move {
                let _ = rx.await;
            },
            std::time::Duration::from_secs(10),
        ));
        Self {
            base,
            state,
            shutdown: Some(tx),
            handle,
        }
    }

    pub fn engine(&self) -> &Engine {
        self.state.engine.get().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON; returns the status and the JSON body.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    /// GETs a JSON body (any status).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(self.url(path))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The ids /v1/models lists, in its order.
    pub async fn model_ids(&self) -> Vec<String> {
        let models = self.get_json("/v1/models").await;
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    }

    pub async fn get_text(&self, path: &str) -> String {
        reqwest::get(self.url(path))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Starts graceful shutdown.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// A training job on the tiny model: two values told apart by a marker word.
pub fn tiny_job(name: &str, sft: usize, kl: usize) -> Value {
    json!({
        "name": name,
        "data": {
            "attribute": "letter",
            "values": [{"name": "v0", "patterns": ["alpha0"]}, {"name": "v1", "patterns": ["alpha1"]}],
            "targets": {"default": {"v0": 0.8, "v1": 0.2}},
            "prompts": [{"text": "Tell me about the nurse"}, {"text": "Hello there"}, {"text": "A story about the farmer"}],
            "held_out": [{"text": "The engineer said"}],
            "responses": {"v0": ["alpha0 said hello", "the nurse alpha0"], "v1": ["alpha1 said hello", "the farmer alpha1"]}
        },
        "settings": {"sft_steps": sft, "kl_steps": kl, "batch": 4, "rank": 2, "learning_rate": 0.01, "dropout": 0.0}
    })
}

/// Polls a training job until it ends; its last status.
pub async fn wait_for_job(s: &TestServer, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = reqwest::get(s.url(&format!("/adapters/train/{id}")))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ["succeeded", "failed", "cancelled"].contains(&v["state"].as_str().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "job did not finish: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
