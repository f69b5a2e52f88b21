//! The HTTP API: OpenAI-compatible endpoints on axum, one file per endpoint
//! family, protocol types in `protocol`, errors in `error`, limits in
//! `validation`.

mod adapters;
mod chat;
mod completions;
mod distribution;
pub mod error;
mod generate;
mod health;
mod models;
pub mod openapi;
pub mod protocol;
pub mod steering;
mod streaming;
mod training;
pub mod validation;

use crate::engine::Engine;
use crate::fleet::Fleet;
use crate::monitor::{Monitor, MonitorConfig};
use crate::steering::{BalancedCounts, BaseIdentity, Policy, Registry};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
pub use generate::Capacity;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use validation::Limits;

/// Server settings that shape the API.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The id clients use in `model` for the base model.
    pub model_id: String,
    pub limits: Limits,
    /// Sequences admitted at once (running + queued); past it, 429.
    pub capacity: usize,
    pub api_key: Option<String>,
    /// Key for training, adapter load/unload and distribution reset.
    pub admin_key: Option<String>,
    /// Without an admin key, allow admin calls (the server listens on loopback only).
    pub admin_open: bool,
    /// Policy for steered requests that name none.
    pub default_policy: Policy,
    pub monitor: MonitorConfig,
    /// Shared state for a fleet of replicas (`--state redis://…`); None: in memory.
    pub fleet: Option<Arc<Fleet>>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model_id: "model".into(),
            limits: Limits::default(),
            capacity: 160,
            api_key: None,
            admin_key: None,
            admin_open: true,
            default_policy: Policy::Prior,
            monitor: MonitorConfig::default(),
            fleet: None,
        }
    }
}

/// What every handler sees.
pub struct AppState {
    /// Set once the model has loaded; until then inference answers 503.
    pub engine: OnceLock<Engine>,
    /// Adapters, set together with the engine.
    pub registry: OnceLock<Arc<Registry>>,
    /// Training jobs (when the server knows where its weights are).
    pub training: OnceLock<Arc<crate::training::jobs::Jobs>>,
    pub model_id: String,
    pub limits: Limits,
    pub capacity: Arc<Capacity>,
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    pub admin_open: bool,
    pub default_policy: Policy,
    pub monitor: Monitor,
    /// Counts behind the balanced policy (in memory mode).
    pub balanced: Arc<BalancedCounts>,
    pub fleet: Option<Arc<Fleet>>,
    pub metrics: PrometheusHandle,
    /// Unix time the server started (the `created` of its models).
    pub started: u64,
}

impl AppState {
    pub fn new(settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            engine: OnceLock::new(),
            registry: OnceLock::new(),
            training: OnceLock::new(),
            model_id: settings.model_id,
            limits: settings.limits,
            capacity: Capacity::new(settings.capacity),
            api_key: settings.api_key,
            admin_key: settings.admin_key,
            admin_open: settings.admin_open,
            default_policy: settings.default_policy,
            monitor: Monitor::new(settings.monitor),
            balanced: Arc::new(BalancedCounts::default()),
            fleet: settings.fleet,
            metrics: crate::metrics::install(),
            started: unix_now(),
        })
    }

    /// Makes the server ready: the engine, and adapters from `adapters_dir`
    /// (a damaged one is skipped with an error; the rest load).
    /// With `source` (where the weights are), training jobs are accepted.
    pub fn set_loaded(
        &self,
        engine: Engine,
        adapters_dir: std::path::PathBuf,
        source: Option<crate::model::ModelSource>,
    ) {
        let base = BaseIdentity {
            name: self.model_id.clone(),
            sha256: engine.model_sha256().to_string(),
        };
        for done in crate::training::recover_interrupted_writes(&adapters_dir) {
            tracing::warn!(dir = %adapters_dir.display(), "{done}");
        }
        let registry = Registry::new(adapters_dir, base, engine.model_config().clone());
        for (name, result) in registry.load_all() {
            match result {
                Ok(()) => tracing::info!(adapter = %name, "adapter loaded"),
                Err(e) => {
                    tracing::error!(adapter = %name, error = format!("{e:#}"), "adapter skipped")
                }
            }
        }
        let registry = Arc::new(registry);
        if let Some(source) = source {
            let context = crate::training::jobs::TrainingContext {
                source,
                max_len: engine.config().max_context,
                base: crate::steering::adapter::BaseModel {
                    name: self.model_id.clone(),
                    sha256: engine.model_sha256().to_string(),
                },
                registry: registry.clone(),
            };
            let _ = self
                .training
                .set(crate::training::jobs::Jobs::start(context, 4));
        }
        let _ = self.registry.set(registry);
        let _ = self.engine.set(engine);
    }

    /// The engine, or 503 while loading.
    pub fn engine(&self) -> Result<&Engine, ApiError> {
        self.engine.get().ok_or_else(ApiError::not_ready)
    }

    pub fn registry(&self) -> Result<&Registry, ApiError> {
        self.registry
            .get()
            .map(|r| r.as_ref())
            .ok_or_else(ApiError::not_ready)
    }

    /// The balanced policy's next value for (adapter, context): from the
    /// fleet's shared counts in fleet mode, else from this server's.
    pub async fn draw_balanced(
        &self,
        adapter: &str,
        context: &str,
        target: &[f64],
        rng: &mut rand::rngs::StdRng,
    ) -> usize {
        match &self.fleet {
            Some(fleet) => fleet.balanced_next(adapter, context, target, rng).await,
            None => self.balanced.next(adapter, context, target, rng),
        }
    }

    /// The distribution report: the fleet's rounds in fleet mode (this
    /// replica's own, marked `degraded`, while Redis is unreachable).
    pub async fn report(
        &self,
        adapter: Option<&str>,
        context: Option<&str>,
        window: Option<crate::monitor::report::WindowKind>,
    ) -> crate::monitor::report::Report {
        let Some(fleet) = &self.fleet else {
            return self.monitor.report(adapter, context, window);
        };
        let shared = match self.registry.get() {
            Some(registry) => fleet.snapshot(registry, adapter, window).await.ok(),
            // Still loading: no adapter, nothing to report yet.
            None => Some(Default::default()),
        };
        let mut report = match &shared {
            Some(rounds) => self.monitor.report_from(rounds, context, window),
            None => self.monitor.report(adapter, context, window),
        };
        report.state = if shared.is_some() {
            "redis"
        } else {
            "degraded"
        }
        .into();
        report.fleet = Some(fleet.status().await);
        report
    }

    /// Clears the windows and balanced counts (of the fleet, in fleet mode).
    pub async fn reset_distribution(&self, adapter: Option<&str>) -> Result<(), ApiError> {
        if let Some(fleet) = &self.fleet {
            fleet.reset(adapter).await.map_err(|e| {
                ApiError::unavailable(format!("cannot reset the fleet's distribution: {e:#}"))
            })?;
        }
        self.monitor.reset(adapter);
        self.balanced.reset(adapter);
        Ok(())
    }

    /// The request's `model`: absent or the base id = the base model; an
    /// adapter's name = that adapter.
    pub fn resolve_model(&self, model: Option<&str>) -> Result<steering::Served, ApiError> {
        match model {
            None => Ok(steering::Served::Base),
            Some(m) if m == self.model_id => Ok(steering::Served::Base),
            Some(m) => self
                .registry()?
                .get(m)
                .map(steering::Served::Adapter)
                .ok_or_else(|| ApiError::model_not_found(m)),
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh id with a prefix, e.g. `cmpl-3f2a…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

/// The whole router: inference behind the optional key, health and docs open.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let generation = Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            shed_when_full,
        ));
    let inference = Router::new()
        .merge(generation)
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::retrieve))
        .route("/adapters", get(adapters::list))
        .route("/distribution/report", get(distribution::report))
        .route("/distribution", get(distribution::page))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let admin = Router::new()
        .route("/adapters/{name}/load", post(adapters::load))
        .route("/adapters/{name}", axum::routing::delete(adapters::unload))
        .route("/distribution/reset", post(distribution::reset))
        .route("/adapters/train", post(training::submit))
        .route(
            "/adapters/train/{id}",
            get(training::status).delete(training::cancel),
        )
        .route("/adapters/train/{id}/events", get(training::events))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let open = Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(health::metrics));
    let routes = Router::new()
        .merge(inference)
        .merge(admin)
        .merge(open)
        .merge(openapi::routes());
    with_common_layers(routes, max_body_bytes).with_state(state)
}

/// Fallbacks, metrics, body limit, panic catching, tracing and request ids:
/// what every route gets.
pub fn with_common_layers(
    routes: Router<Arc<AppState>>,
    max_body_bytes: usize,
) -> Router<Arc<AppState>> {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(record_request))
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), uri = %req.uri().path(), request_id = %id)
        })
        .on_response(log_response))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// One log line per response. Refusals at capacity go at debug level: under
/// a flood, writing a line for each would take CPU from decoding (they are
/// counted in `steerling_rejected_requests_total`).
fn log_response(response: &Response, latency: Duration, _: &tracing::Span) {
    let status = response.status().as_u16();
    let ms = latency.as_secs_f64() * 1e3;
    if status == 429 {
        tracing::debug!(status, latency_ms = ms, "refused at capacity");
    } else {
        tracing::info!(status, latency_ms = ms, "finished processing request");
    }
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("No route for {method} {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// A panic in a handler becomes a 500 in the envelope; the detail stays in the log.
fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = crate::panic_message(&*err);
    tracing::error!(panic = detail, "handler panicked");
    ApiError::internal("Internal error").into_response()
}

/// Bearer-token check for inference routes, when a key is configured.
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        if !constant_time_eq(bearer(&req).as_bytes(), key.as_bytes()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// At capacity, a generation request is refused before its body is read
/// or parsed: under overload, refusing must cost next to nothing, or the
/// refusals themselves slow the requests being served.
async fn shed_when_full(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.capacity.is_full() {
        return ApiError::overloaded(1).into_response();
    }
    next.run(req).await
}

/// Admin routes: the admin key when one is set; without one, only when the
/// server listens on loopback, else 403.
async fn require_admin(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match &state.admin_key {
        Some(key) if !constant_time_eq(bearer(&req).as_bytes(), key.as_bytes()) => {
            return ApiError::unauthorized().into_response();
        }
        None if !state.admin_open => return ApiError::admin_disabled().into_response(),
        _ => {}
    }
    next.run(req).await
}

/// The token of `Authorization: Bearer <token>` ("" when absent).
fn bearer(req: &Request) -> &str {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim())
}

/// Compares without an early exit, so timing does not reveal the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= (x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// Counts requests by endpoint and status, and times them.
async fn record_request(req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    if response.status() == axum::http::StatusCode::TOO_MANY_REQUESTS {
        metrics::counter!(crate::metrics::REJECTED).increment(1);
    }
    metrics::counter!(crate::metrics::REQUESTS, "endpoint" => endpoint.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(crate::metrics::REQUEST_DURATION, "endpoint" => endpoint)
        .record(start.elapsed().as_secs_f64());
    response
}

/// Serves until `shutdown` resolves, then stops accepting and gives
/// in-flight requests up to `grace` to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = tx.send(());
    });
    let mut server = std::pin::pin!(std::future::IntoFuture::into_future(server));
    tokio::select! {
        result = &mut server => result,
        _ = async { let _ = rx.await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_secs = grace.as_secs(), "in-flight requests did not finish in time; stopping");
            Ok(())
        }
    }
}

/// SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
}
