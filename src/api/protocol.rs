//! The OpenAI wire protocol: every request and response type, in one place.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use utoipa::ToSchema;

/// `prompt`: a string, several strings, token ids, or several lists of ids.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with token usage before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by completions and chat completions.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct SamplingFields {
    /// 0–2; 0 is greedy. Default 1.
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    /// (0, 1]. Default 1.
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    /// Choices per prompt. Default 1.
    #[schema(minimum = 1)]
    pub n: Option<usize>,
    pub stop: Option<Stop>,
    /// Same seed, same output.
    pub seed: Option<u64>,
    /// −2..2.
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f32>,
    /// −2..2.
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string) → bias in −100..100.
    pub logit_bias: Option<HashMap<String, f32>>,
    pub user: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Extension: keep only the k most likely tokens (0 = off).
    pub top_k: Option<usize>,
    /// Extension: keep tokens with p ≥ min_p · p_max.
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f32>,
    /// Extension: > 0; 1 = off.
    #[schema(exclusive_minimum = 0, maximum = 10)]
    pub repetition_penalty: Option<f32>,
    /// Extension: keep generating past end-of-sequence, to `max_tokens`
    /// (for benchmarks, as in vLLM and llama.cpp).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Extension: how a steering adapter draws this request's rounds.
    pub steering: Option<SteeringOptions>,
}

/// The `steering` request extension (ignored by plain OpenAI clients).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct SteeringOptions {
    /// prior (default: the server's setting), target, balanced, or off.
    pub policy: Option<crate::steering::Policy>,
    /// The context whose target applies (default: the longest context name
    /// found in the prompt, else `default`).
    pub context: Option<String>,
    /// Return each choice's drawn value and prior.
    #[serde(default, rename = "return")]
    pub return_draw: bool,
}

/// What a steered choice drew (with `steering.return`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct SteeringInfo {
    pub attribute: String,
    pub value: String,
    /// The adapter's prior over values at this prompt.
    pub prior: BTreeMap<String, f64>,
    pub context: String,
    pub policy: crate::steering::Policy,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CompletionRequest {
    /// The served model's id (see /v1/models). Optional: the default model.
    pub model: Option<String>,
    pub prompt: Prompt,
    /// Refused: the served models have no fill-in-the-middle mode.
    pub suffix: Option<String>,
    /// Default 16.
    pub max_tokens: Option<usize>,
    /// 0–5: return this many alternatives per token with log-probabilities.
    #[schema(maximum = 5)]
    pub logprobs: Option<usize>,
    /// Return the prompt before the completion.
    #[serde(default)]
    pub echo: bool,
    /// Generate this many candidates per prompt and return the `n` with the
    /// highest mean log-probability (not with `stream`).
    #[schema(minimum = 1)]
    pub best_of: Option<usize>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<HashMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; null in stream chunks until the last.
    pub finish_reason: Option<String>,
    /// With `steering.return` (in streams: on the choice's last chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringInfo>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    /// `text_completion`
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// Absent in stream chunks, except the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Message content: a string or a list of text parts.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ContentPart {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatMessage {
    /// system, user, assistant (or tool/developer, passed to the template as is).
    pub role: String,
    pub content: Option<MessageContent>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    /// Default: until end of turn or the context limit.
    pub max_tokens: Option<usize>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub logprobs: bool,
    /// 0–20 alternatives per token (needs `logprobs: true`).
    #[schema(maximum = 20)]
    pub top_logprobs: Option<usize>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatResponseMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatResponseMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionResponse {
    pub id: String,
    /// `chat.completion`
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// `chat.completion.chunk`
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Model {
    pub id: String,
    /// `model`
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// For adapters: the base model they apply to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// `list`
    pub object: String,
    pub data: Vec<Model>,
}

/// The OpenAI error envelope.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`, or `loading` while the model loads.
    pub status: String,
}

/// One Server-Sent Event of a streamed response, as the OpenAPI document
/// describes the `text/event-stream` body event by event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamEvent {
    /// A JSON chunk, an error envelope if generation fails midway, or `[DONE]`.
    pub data: String,
}
