//! The OpenAPI document (generated from the handlers and types by utoipa),
//! served at /openapi.json, with Swagger UI at /docs (assets in the binary).

use super::protocol::*;
use super::AppState;
use axum::Router;
use std::sync::Arc;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "steerling",
        description = "OpenAI-compatible inference that steers, and proves, the distribution of outputs across requests."
    ),
    paths(
        super::completions::create,
        super::chat::create,
        super::models::list,
        super::models::retrieve,
        super::health::health,
        super::health::ready,
        super::health::metrics,
        super::adapters::list,
        super::adapters::load,
        super::adapters::unload,
        super::distribution::report,
        super::distribution::page,
        super::distribution::reset,
        super::training::submit,
        super::training::status,
        super::training::cancel,
        super::training::events,
    ),
    components(schemas(
        CompletionRequest, CompletionResponse, CompletionChoice, CompletionLogprobs, Prompt, Stop, StreamOptions,
        SamplingFields, Usage, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk, ChatMessage,
        MessageContent, ContentPart, ChatChoice, ChatChunkChoice, ChatDelta, ChatResponseMessage, ChatLogprobs,
        ChatTokenLogprob, TopLogprob, Model, ModelList, ErrorResponse, ErrorBody, Health,
        SteeringOptions, SteeringInfo, StreamEvent, crate::steering::Policy,
        super::adapters::AdapterInfo, super::adapters::AdapterList,
        super::distribution::ResetRequest, super::distribution::ResetResponse,
        crate::monitor::report::Report, crate::monitor::report::AdapterReport, crate::monitor::report::WindowReport,
        crate::monitor::report::WindowKind, crate::monitor::report::Status, crate::monitor::report::Proportion,
        crate::monitor::report::Divergence, crate::fleet::FleetStatus, crate::fleet::ReplicaSeen,
        crate::training::jobs::JobRequest, crate::training::jobs::JobStatus, crate::training::jobs::JobState,
        crate::training::trainer::TrainConfig, crate::training::data::TrainingData, crate::training::data::ValueSpec,
        crate::training::data::PromptSpec
    )),
    tags((name = "OpenAI", description = "OpenAI-compatible endpoints"), (name = "Operations", description = "Health and metrics"), (name = "Steering", description = "Adapters and the served distribution")),
    modifiers(&Guards)
)]
pub struct ApiDoc;

/// Which key an operation needs, as `router` wires it.
#[derive(PartialEq)]
enum Guard {
    Open,
    Inference,
    Admin,
}

fn guard_of(path: &str) -> Guard {
    if path.starts_with("/adapters/") || path == "/distribution/reset" {
        Guard::Admin
    } else if ["/v1/", "/adapters", "/distribution"]
        .iter()
        .any(|p| path.starts_with(p))
    {
        Guard::Inference
    } else {
        Guard::Open
    }
}

/// Adds what every operation shares, so no handler can forget it: the key
/// it needs (with 401, and 403 for admin when admin is off), and the body
/// errors of operations that take JSON (400, 413, 415).
struct Guards;

impl Modify for Guards {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |what: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(what.to_string());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme(
            "api_key",
            bearer("The inference key (`--api-key`), when the server sets one"),
        );
        components.add_security_scheme("admin_key", bearer("The admin key (`--admin-key`)"));
        for (path, item) in doc.paths.paths.iter_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.delete] {
                if let Some(op) = op.as_mut() {
                    describe_guard(op, guard_of(path));
                }
            }
        }
    }
}

fn describe_guard(op: &mut Operation, guard: Guard) {
    let mut add = |status: &str, description: &str| {
        op.responses
            .responses
            .entry(status.into())
            .or_insert_with(|| {
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        Content::new(Some(Ref::from_schema_name("ErrorResponse"))),
                    )
                    .build()
                    .into()
            });
    };
    match guard {
        Guard::Open => {}
        Guard::Inference => {
            add("401", "Missing or wrong inference key");
        }
        Guard::Admin => {
            add("401", "Missing or wrong admin key");
            add(
                "403",
                "Admin endpoints are off: no admin key, and not on loopback",
            );
        }
    }
    if op.request_body.is_some() {
        add("400", "Invalid request");
        add("413", "Body too large");
        add("415", "Not JSON");
    }
    let scheme = match guard {
        Guard::Open => return,
        Guard::Inference => "api_key",
        Guard::Admin => "admin_key",
    };
    let required: [&str; 0] = [];
    op.security = Some(vec![SecurityRequirement::new(scheme, required)]);
}

/// The document as committed in openapi/openapi.json.
pub fn document() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new().merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
}
