//! POST /v1/chat/completions — messages rendered with the model's own chat
//! template, then generated like a completion.

use super::error::{ApiError, Json};
use super::generate;
use super::protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatMessage, ChatResponseMessage,
    ChatTokenLogprob, ErrorResponse, MessageContent, SteeringInfo, StreamEvent, TopLogprob, Usage,
};
use super::streaming::{self, ChunkFormat};
use super::{new_id, unix_now, AppState};
use crate::engine::{Engine, Event, TokenLogprob};
use crate::tokenizer::Tokenizer;
use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Alternatives per token the chat API allows.
const MAX_TOP_LOGPROBS: usize = 20;

/// Used when a model ships no chat template.
pub const FALLBACK_TEMPLATE: &str = crate::testing::CHATML_TEMPLATE;

/// Renders `messages` with the model's template (Jinja, as Hugging Face does),
/// ending with the assistant turn opened.
pub fn render_chat(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    let mut rendered = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            &format!("messages[{i}].content"),
                            format!(
                                "content parts of type `{}` are not supported; only `text`",
                                p.kind
                            ),
                        ));
                    }
                    text += p.text.as_deref().unwrap_or("");
                }
                text
            }
        };
        rendered.push(minijinja::context! { role => m.role.clone(), content => content, name => m.name.clone() });
    }
    let template = tok.chat_template.as_deref().unwrap_or(FALLBACK_TEMPLATE);
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template).map_err(|e| {
        ApiError::internal(format!("the model's chat template does not parse: {e}"))
    })?;
    let token = |id: Option<u32>| {
        id.and_then(|i| tok.decode_with_special(&[i]).ok())
            .unwrap_or_default()
    };
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => rendered,
                add_generation_prompt => true,
                bos_token => token(tok.bos),
                eos_token => token(tok.eos.first().copied()),
            })
        })
        .map_err(|e| {
            ApiError::invalid(
                "messages",
                format!("the chat template refused these messages: {e}"),
            )
        })
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "OpenAI",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The chat completion, or an SSE stream of `chat.completion.chunk` deltas ending with `data: [DONE]` when `stream` is true",
            content((ChatCompletionResponse = "application/json"), (StreamEvent = "text/event-stream"))),
        (status = 400, description = "Invalid request", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 415, description = "Not JSON", body = ErrorResponse),
        (status = 429, description = "At capacity; see Retry-After", body = ErrorResponse),
        (status = 503, description = "Model still loading", body = ErrorResponse),
    )
)]
pub async fn create(
    State(state): State<Arc<AppState>>,
    Json(req): Json<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let engine = state.engine()?;
    let limits = &state.limits;
    let tok = engine.tokenizer();
    // The context is looked for in what the user wrote.
    let said = || {
        req.messages
            .iter()
            .filter_map(|m| match &m.content {
                Some(MessageContent::Text(t)) => Some(t.clone()),
                Some(MessageContent::Parts(p)) => Some(
                    p.iter()
                        .filter_map(|x| x.text.clone())
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                None => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (model, steer) = super::steering::plan(
        &state,
        req.model.as_deref(),
        req.sampling.steering.as_ref(),
        said,
    )?;
    let text = render_chat(tok, &req.messages)?;
    super::validation::text_can_fit("messages", &text, limits)?;
    // The template writes any BOS itself.
    let prompt = tok
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    if prompt.len() > limits.max_prompt_tokens {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the conversation has {} tokens; this server accepts at most {}",
                prompt.len(),
                limits.max_prompt_tokens
            ),
        ));
    }
    let mut params =
        super::validation::sampling_params(&req.sampling, engine.vocab_size(), limits)?;
    let stop = super::validation::stop_strings(&req.sampling, limits)?;
    let top = match (req.logprobs, req.top_logprobs) {
        (_, Some(n)) if n > MAX_TOP_LOGPROBS => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (true, n) => Some(n.unwrap_or(0)),
        (false, None) => None,
    };
    params.logprobs = top;
    let n = super::validation::choices("n", req.sampling.n, 1, limits)?;
    let requested = req.max_completion_tokens.or(req.max_tokens);
    let param = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    // The steering token goes right after the assistant turn opens: at the
    // end of the rendered prompt, as in training.
    let steered = usize::from(steer.is_some());
    let max_tokens =
        super::validation::fit_context(prompt.len() + steered, requested, param, limits)?;
    let mut requests = (0..n)
        .map(|j| {
            let r = super::validation::engine_request(
                prompt.clone(),
                max_tokens,
                &params,
                &stop,
                req.sampling.ignore_eos,
                j,
            );
            (j, 0, r)
        })
        .collect::<Vec<_>>();
    let permit = state.capacity.try_acquire(n)?;
    if let Some(s) = &steer {
        s.attach_all(&state, &mut requests, req.sampling.seed).await;
    }
    let choices = generate::submit_all(engine, requests)?;
    let id = new_id("chatcmpl");
    if req.sampling.stream {
        let format = ChatChunks {
            id,
            created: unix_now(),
            model,
            engine: engine.clone(),
            logprobs: top.is_some(),
            started: HashSet::new(),
            include_usage: req
                .sampling
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            usage: Usage {
                prompt_tokens: prompt.len(),
                ..Usage::default()
            },
            steering: steer.clone(),
            state: state.clone(),
            texts: HashMap::new(),
            draws: HashMap::new(),
        };
        return Ok(streaming::respond(choices, format, permit));
    }
    let finished = generate::finish_all(choices).await?;
    drop(permit);
    let completion_tokens = finished.iter().map(|f| f.completion_tokens).sum();
    let choices = finished
        .into_iter()
        .map(|f| ChatChoice {
            index: f.index,
            logprobs: top.map(|_| chat_logprobs(tok, &f.tokens, &f.logprobs)),
            finish_reason: Some(f.finish.as_str().into()),
            steering: match (&steer, &f.steering) {
                (Some(p), Some((value, prior))) => p.finish(&state, *value, prior, &f.text),
                _ => None,
            },
            message: ChatResponseMessage {
                role: "assistant".into(),
                content: f.text,
            },
        })
        .collect();
    Ok(axum::Json(ChatCompletionResponse {
        id,
        object: "chat.completion".into(),
        created: unix_now(),
        model,
        choices,
        usage: Usage {
            prompt_tokens: prompt.len(),
            completion_tokens,
            total_tokens: prompt.len() + completion_tokens,
        },
    })
    .into_response())
}

fn top_entry(tok: &Tokenizer, id: u32, logprob: f32) -> TopLogprob {
    TopLogprob {
        token: tok.token_display(id),
        bytes: tok.token_bytes(id),
        logprob,
    }
}

fn chat_logprobs(tok: &Tokenizer, tokens: &[u32], lps: &[Option<TokenLogprob>]) -> ChatLogprobs {
    let content = tokens
        .iter()
        .zip(lps)
        .filter_map(|(&id, lp)| {
            let lp = lp.as_ref()?;
            let entry = top_entry(tok, id, lp.logprob);
            Some(ChatTokenLogprob {
                token: entry.token,
                logprob: entry.logprob,
                bytes: entry.bytes,
                top_logprobs: lp.top.iter().map(|&(t, l)| top_entry(tok, t, l)).collect(),
            })
        })
        .collect();
    ChatLogprobs { content }
}

struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    engine: Engine,
    logprobs: bool,
    /// Choices whose first chunk (with the role) went out.
    started: HashSet<usize>,
    include_usage: bool,
    usage: Usage,
    steering: Option<super::steering::Plan>,
    state: Arc<AppState>,
    /// Per choice: the text so far and the draw (for recording the round).
    texts: HashMap<usize, String>,
    draws: HashMap<usize, (usize, Vec<f64>)>,
}

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> SseEvent {
        streaming::data(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn delta(
        &mut self,
        index: usize,
        content: Option<String>,
        logprobs: Option<ChatLogprobs>,
        finish: Option<&str>,
        steering: Option<SteeringInfo>,
    ) -> SseEvent {
        let role = self.started.insert(index).then(|| "assistant".to_string());
        let content = if role.is_some() {
            Some(content.unwrap_or_default())
        } else {
            content
        };
        self.chunk(
            vec![ChatChunkChoice {
                index,
                delta: ChatDelta { role, content },
                logprobs,
                finish_reason: finish.map(str::to_string),
                steering,
            }],
            None,
        )
    }
}

impl ChunkFormat for ChatChunks {
    fn on_event(&mut self, index: usize, event: Event) -> Result<Vec<SseEvent>, ApiError> {
        Ok(match event {
            Event::PromptLogprobs(_) => vec![],
            Event::Steering { value, prior } => {
                self.draws.insert(index, (value, prior));
                vec![]
            }
            Event::Token { id, text, logprob } => {
                if text.is_empty() && !self.logprobs {
                    return Ok(vec![]);
                }
                self.texts.entry(index).or_default().push_str(&text);
                let lp = self
                    .logprobs
                    .then(|| chat_logprobs(self.engine.tokenizer(), &[id], &[logprob]));
                vec![self.delta(index, Some(text), lp, None, None)]
            }
            Event::Done {
                reason,
                tail,
                completion_tokens,
                ..
            } => {
                self.usage.completion_tokens += completion_tokens;
                let text = self.texts.entry(index).or_default();
                text.push_str(&tail);
                let info = match (&self.steering, self.draws.get(&index)) {
                    (Some(plan), Some((value, prior))) => {
                        plan.finish(&self.state, *value, prior, text)
                    }
                    _ => None,
                };
                let content = (!tail.is_empty()).then_some(tail);
                vec![self.delta(index, content, None, Some(reason.as_str()), info)]
            }
            Event::Error(e) => return Err(ApiError::internal(e)),
        })
    }

    fn on_end(&mut self) -> Vec<SseEvent> {
        if !self.include_usage {
            return vec![];
        }
        let usage = Usage {
            total_tokens: self.usage.prompt_tokens + self.usage.completion_tokens,
            ..self.usage
        };
        vec![self.chunk(vec![], Some(usage))]
    }
}
