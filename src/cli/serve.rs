//! `steerling serve`: the HTTP server.

use super::ModelArgs;
use crate::api::{self, validation::Limits, AppState};
use crate::engine::{Engine, EngineConfig};
use crate::model::{load_model, ModelSource};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind; use 0.0.0.0 to listen on every interface.
    #[arg(long, env = "STEERLING_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "STEERLING_PORT", default_value_t = 8080)]
    pub port: u16,
    /// The id clients pass as `model` (default: the weights' file or folder name).
    #[arg(long, env = "STEERLING_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Require `Authorization: Bearer <key>` on /v1 endpoints.
    #[arg(long, env = "STEERLING_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequences decoded together (the running batch).
    #[arg(long, env = "STEERLING_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,
    /// Sequences allowed to wait for a batch slot; past this, 429.
    #[arg(long, env = "STEERLING_MAX_QUEUED", default_value_t = 128)]
    pub max_queued: usize,
    /// Longest prompt, in tokens.
    #[arg(long, env = "STEERLING_MAX_PROMPT_TOKENS", default_value_t = 2047)]
    pub max_prompt_tokens: usize,
    /// Most sequences one request may ask for (n or best_of, times prompts).
    #[arg(long, env = "STEERLING_MAX_N", default_value_t = 16)]
    pub max_n: usize,
    /// Most stop strings per request.
    #[arg(long, env = "STEERLING_MAX_STOP", default_value_t = 4)]
    pub max_stop: usize,
    /// Largest request body, in bytes.
    #[arg(long, env = "STEERLING_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Prompt tokens prefilled per engine step.
    #[arg(long, env = "STEERLING_PREFILL_CHUNK", default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Seconds in-flight requests get to finish after SIGTERM/Ctrl-C.
    #[arg(long, env = "STEERLING_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,
}

/// The served id: the file or folder name, without `.gguf`.
fn default_model_id(args: &ServeArgs) -> String {
    if let Some(name) = &args.model_name {
        return name.clone();
    }
    let path = if args.model.model == "default" {
        PathBuf::from(crate::fetch::DEFAULT_MODEL_FILE)
    } else {
        PathBuf::from(&args.model.model)
    };
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(name)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let limits = Limits {
        max_prompt_tokens: args.max_prompt_tokens,
        max_total_tokens: args.model.max_context,
        max_n: args.max_n,
        max_stop: args.max_stop,
        ..Limits::default()
    };
    let state = AppState::new(
        default_model_id(&args),
        limits,
        args.max_batch + args.max_queued,
        args.api_key.clone(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("steerling-http")
        .build()?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(address = %listener.local_addr()?, model = %state.model_id, "listening; loading the model");
        spawn_model_load(state.clone(), &args);
        spawn_metrics_upkeep(state.clone());
        let app = api::router(state, args.max_body_bytes);
        api::serve(listener, app, api::shutdown_signal(), Duration::from_secs(args.shutdown_grace)).await?;
        Ok(())
    })
}

/// Loads (fetching first if needed) off the async threads; /ready turns 200
/// when done. A load failure ends the process: there is nothing to serve.
fn spawn_model_load(state: std::sync::Arc<AppState>, args: &ServeArgs) {
    let model_args = args.model.clone();
    let config = EngineConfig {
        max_batch: args.max_batch,
        max_context: args.model.max_context,
        prefill_chunk: args.prefill_chunk,
    };
    tokio::task::spawn_blocking(move || {
        let loaded = model_args
            .resolve()
            .and_then(|p| ModelSource::from_path(&p))
            .and_then(|s| load_model(&s, config.max_context));
        match loaded {
            Ok(loaded) => {
                let engine = Engine::start(loaded, config);
                let _ = state.engine.set(engine);
                tracing::info!("model loaded; ready");
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "cannot load the model");
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
    });
}

/// The Prometheus exporter needs periodic upkeep to drain its histograms.
fn spawn_metrics_upkeep(state: std::sync::Arc<AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            state.metrics.run_upkeep();
        }
    });
}
