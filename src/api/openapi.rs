//! The OpenAPI document (generated from the handlers and types by utoipa),
//! served at /openapi.json, with Swagger UI at /docs (assets in the binary).

use super::protocol::*;
use super::AppState;
use axum::Router;
use std::sync::Arc;
use utoipa::OpenApi;
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
        SteeringOptions, SteeringInfo, crate::steering::Policy,
        super::adapters::AdapterInfo, super::adapters::AdapterList,
        super::distribution::ResetRequest, super::distribution::ResetResponse,
        crate::monitor::report::Report, crate::monitor::report::AdapterReport, crate::monitor::report::WindowReport,
        crate::monitor::report::WindowKind, crate::monitor::report::Status, crate::monitor::report::Proportion,
        crate::monitor::report::Divergence,
        crate::training::jobs::JobRequest, crate::training::jobs::JobStatus, crate::training::jobs::JobState,
        crate::training::trainer::TrainConfig, crate::training::data::TrainingData, crate::training::data::ValueSpec,
        crate::training::data::PromptSpec
    )),
    tags((name = "OpenAI", description = "OpenAI-compatible endpoints"), (name = "Operations", description = "Health and metrics"), (name = "Steering", description = "Adapters and the served distribution"))
)]
pub struct ApiDoc;

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
