//! Prometheus metrics: one recorder per process, names in one place.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const REQUESTS: &str = "steerling_requests_total";
pub const REQUEST_DURATION: &str = "steerling_request_duration_seconds";
pub const QUEUE_TIME: &str = "steerling_queue_time_seconds";
pub const TIME_TO_FIRST_TOKEN: &str = "steerling_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "steerling_inter_token_latency_seconds";
pub const PROMPT_TOKENS: &str = "steerling_prompt_tokens_total";
pub const GENERATED_TOKENS: &str = "steerling_generated_tokens_total";
pub const RUNNING: &str = "steerling_running_sequences";
pub const WAITING: &str = "steerling_waiting_sequences";
pub const BATCH_SIZE: &str = "steerling_batch_size";
pub const REJECTED: &str = "steerling_rejected_requests_total";
pub const ENGINE_RESTARTS: &str = "steerling_engine_restarts_total";
pub const FLEET_DEGRADED: &str = "steerling_fleet_degraded";
pub const FLEET_BUFFERED: &str = "steerling_fleet_buffered_rounds";
pub const STEERING_DRAWS: &str = "steerling_steering_draws_total";
pub const STEERING_DETECTED: &str = "steerling_steering_detected_total";
pub const STEERING_MAE: &str = "steerling_steering_mae";
pub const STEERING_KL: &str = "steerling_steering_kl";
pub const STEERING_JS: &str = "steerling_steering_js_distance";
pub const STEERING_STATUS: &str = "steerling_steering_status";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Installs the global recorder the first time; later calls (several
/// servers in one test process) share it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS)
                })
                .expect("bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed by an embedding program;
            // then ours still renders what it records through the handle.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS, "HTTP requests by endpoint and status");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request duration by endpoint"
    );
    describe_histogram!(
        QUEUE_TIME,
        Unit::Seconds,
        "Time a sequence waited before the engine admitted it"
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Time from submission to the first generated token"
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Time between generated tokens of a sequence"
    );
    describe_counter!(PROMPT_TOKENS, "Prompt tokens prefilled");
    describe_counter!(GENERATED_TOKENS, "Tokens generated");
    describe_gauge!(RUNNING, "Sequences in the running batch");
    describe_gauge!(WAITING, "Sequences waiting for a batch slot");
    describe_histogram!(BATCH_SIZE, "Sequences per engine step");
    describe_counter!(
        ENGINE_RESTARTS,
        "Times the engine loop was restarted after an internal error"
    );
    describe_gauge!(
        FLEET_DEGRADED,
        "1 while Redis is unreachable in fleet mode (this replica serves alone)"
    );
    describe_gauge!(
        FLEET_BUFFERED,
        "Rounds waiting to be merged into the fleet's windows"
    );
    describe_counter!(
        REJECTED,
        "Requests refused with 429 because the server was at capacity"
    );
}
