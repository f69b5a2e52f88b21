//! `steerling serve`: the HTTP server.

use super::ModelArgs;
use crate::api::{self, validation::Limits, AppState, Settings};
use crate::engine::{Engine, EngineConfig};
use crate::model::{load_model, ModelSource};
use crate::monitor::MonitorConfig;
use crate::steering::Policy;
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
    /// Folder of steering adapters, loaded at start.
    #[arg(long, env = "STEERLING_ADAPTERS", default_value = "adapters")]
    pub adapters: PathBuf,
    /// Key for admin endpoints (adapter load/unload, training, distribution
    /// reset). Without one they are open on a loopback address and off (403)
    /// on any other.
    #[arg(long, env = "STEERLING_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Policy of steered requests that name none: prior, target, balanced, off.
    #[arg(long, env = "STEERLING_DEFAULT_POLICY", default_value = "prior", value_parser = parse_policy)]
    pub default_policy: Policy,
    /// The report's count window: the last N rounds.
    #[arg(long, env = "STEERLING_WINDOW_ROUNDS", default_value_t = 1000)]
    pub window_rounds: usize,
    /// The report's time window, in seconds.
    #[arg(long, env = "STEERLING_WINDOW_SECONDS", default_value_t = 3600)]
    pub window_seconds: u64,
    /// Rounds with a detected value needed before a status is given.
    #[arg(long, env = "STEERLING_REPORT_MIN_ROUNDS", default_value_t = 30)]
    pub report_min_rounds: usize,
    /// MAE (served vs target) above which the status is warn.
    #[arg(long, env = "STEERLING_WARN_MAE", default_value_t = 0.05)]
    pub warn_mae: f64,
    /// MAE above which the status is alert.
    #[arg(long, env = "STEERLING_ALERT_MAE", default_value_t = 0.10)]
    pub alert_mae: f64,
    /// Label steering metrics with the context too (unbounded label sets: opt in).
    #[arg(long, env = "STEERLING_METRICS_CONTEXT_LABELS")]
    pub metrics_context_labels: bool,
    /// Where the distribution's state lives: `memory` (this server alone), or
    /// `redis://host:port/db`, shared by every replica that names the same Redis.
    #[arg(long, env = "STEERLING_STATE", default_value = "memory")]
    pub state: String,
    /// This replica's name in a fleet's report (default: host name and port).
    #[arg(long, env = "STEERLING_REPLICA_ID")]
    pub replica_id: Option<String>,
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("unknown policy `{s}` (prior, target, balanced, off)"))
}

/// Whether `host` only accepts local connections.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The served id: `--model-name`, else the weights' file or folder name.
fn default_model_id(args: &ServeArgs) -> String {
    if let Some(name) = &args.model_name {
        return name.clone();
    }
    let path = if args.model.model == "default" {
        PathBuf::from(crate::fetch::DEFAULT_MODEL_FILE)
    } else {
        PathBuf::from(&args.model.model)
    };
    crate::model::model_id(&path)
}

/// The fleet's shared state, for `--state redis://…`.
fn fleet(args: &ServeArgs) -> Result<Option<std::sync::Arc<crate::fleet::Fleet>>> {
    if args.state == "memory" {
        return Ok(None);
    }
    let replica = args.replica_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "replica".into());
        format!("{host}-{}", args.port)
    });
    let fleet = crate::fleet::Fleet::new(crate::fleet::FleetConfig {
        url: args.state.clone(),
        replica,
        window_rounds: args.window_rounds.max(1),
        window_time: Duration::from_secs(args.window_seconds.max(1)),
    })
    .context("--state must be `memory` or redis://host:port/db")?;
    Ok(Some(fleet))
}

pub fn run(args: ServeArgs) -> Result<()> {
    let limits = Limits {
        max_prompt_tokens: args.max_prompt_tokens,
        max_total_tokens: args.model.max_context,
        max_n: args.max_n,
        max_stop: args.max_stop,
        ..Limits::default()
    };
    let state = AppState::new(Settings {
        model_id: default_model_id(&args),
        limits,
        capacity: args.max_batch + args.max_queued,
        // An empty key would let an empty `Authorization` through: treat it as none.
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        admin_key: args.admin_key.clone().filter(|k| !k.is_empty()),
        admin_open: is_loopback(&args.host),
        default_policy: args.default_policy,
        monitor: MonitorConfig {
            window_rounds: args.window_rounds.max(1),
            window_time: Duration::from_secs(args.window_seconds.max(1)),
            min_rounds: args.report_min_rounds,
            warn_mae: args.warn_mae,
            alert_mae: args.alert_mae,
            context_labels: args.metrics_context_labels,
        },
        fleet: fleet(&args)?,
    });
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
        if let Some(fleet) = &state.fleet {
            tracing::info!(replica = fleet.replica(), state = %args.state, "fleet mode: the distribution is shared through Redis");
            fleet.start();
        }
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
    let adapters = args.adapters.clone();
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
                let source = model_args
                    .resolve()
                    .and_then(|p| ModelSource::from_path(&p))
                    .ok();
                state.set_loaded(engine, adapters, source);
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
