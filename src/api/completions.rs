//! POST /v1/completions — the OpenAI legacy completions API.

use super::error::{ApiError, Json};
use super::generate::{self, Finished};
use super::protocol::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, ErrorResponse,
    Prompt, SteeringInfo, StreamEvent, Usage,
};
use super::steering;
use super::streaming::{self, ChunkFormat};
use super::validation;
use super::{new_id, unix_now, AppState};
use crate::engine::{Engine, Event, TokenLogprob};
use crate::tokenizer::Tokenizer;
use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::Arc;

/// Alternatives per token the completions API allows.
const MAX_LOGPROBS: usize = 5;

/// A checked request, ready for the engine.
struct Plan {
    model: String,
    steering: Option<steering::Plan>,
    prompts: Vec<Vec<u32>>,
    prompt_texts: Vec<String>,
    n: usize,
    best_of: usize,
    requests: Vec<(usize, usize, crate::engine::GenerateRequest)>,
}

/// The user's prompt as text (for finding the steering context).
fn prompt_text(prompt: &Prompt, tok: &Tokenizer) -> String {
    let decode = |ids: &Vec<u32>| tok.decode(ids).unwrap_or_default();
    match prompt {
        Prompt::Text(s) => s.clone(),
        Prompt::Texts(v) => v.join("\n"),
        Prompt::Tokens(ids) => decode(ids),
        Prompt::TokenLists(l) => l.iter().map(decode).collect::<Vec<_>>().join("\n"),
    }
}

/// The prompt wrapped in the adapter's prompt format, when steered.
fn formatted(
    prompt: &Prompt,
    steer: Option<&steering::Plan>,
    tok: &Tokenizer,
) -> Result<Prompt, ApiError> {
    let Some(plan) = steer else {
        return Ok(prompt.clone());
    };
    let encode = |s: &str| {
        tok.encode(s, false)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))
    };
    let f = &plan.adapter.config.prompt_format;
    let wrap = |ids: &Vec<u32>| -> Result<Vec<u32>, ApiError> {
        Ok([encode(&f.prefix)?, ids.clone(), encode(&f.suffix)?].concat())
    };
    Ok(match prompt {
        Prompt::Text(s) => Prompt::Text(plan.format_prompt(s)),
        Prompt::Texts(v) => Prompt::Texts(v.iter().map(|s| plan.format_prompt(s)).collect()),
        Prompt::Tokens(ids) => Prompt::Tokens(wrap(ids)?),
        Prompt::TokenLists(l) => Prompt::TokenLists(l.iter().map(wrap).collect::<Result<_, _>>()?),
    })
}

fn plan(req: &CompletionRequest, state: &AppState, engine: &Engine) -> Result<Plan, ApiError> {
    let limits = &state.limits;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "`suffix` is not supported: the served model has no fill-in-the-middle mode",
        ));
    }
    let tok = engine.tokenizer();
    let vocab = engine.vocab_size();
    let (model, steer) = steering::plan(
        state,
        req.model.as_deref(),
        req.sampling.steering.as_ref(),
        || prompt_text(&req.prompt, tok),
    )?;
    let prompt = formatted(&req.prompt, steer.as_ref(), tok)?;
    let prompts = validation::prompts(&prompt, tok, vocab, limits)?;
    let mut params = validation::sampling_params(&req.sampling, vocab, limits)?;
    let stop = validation::stop_strings(&req.sampling, limits)?;
    if let Some(n) = req.logprobs.filter(|&n| n > MAX_LOGPROBS) {
        return Err(ApiError::invalid(
            "logprobs",
            format!("`logprobs` must be between 0 and {MAX_LOGPROBS}, got {n}"),
        ));
    }
    let n = validation::choices("n", req.sampling.n, prompts.len(), limits)?;
    let best_of = req.best_of.unwrap_or(n);
    if best_of < n {
        return Err(ApiError::invalid(
            "best_of",
            format!("`best_of` ({best_of}) must be at least `n` ({n})"),
        ));
    }
    if best_of > n && req.sampling.stream {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` cannot be used with `stream`",
        ));
    }
    if best_of > n && steer.is_some() {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` cannot be used with a steering adapter: choosing among draws would bias the served distribution",
        ));
    }
    validation::choices("best_of", Some(best_of), prompts.len(), limits)?;
    let max_tokens = req.max_tokens.unwrap_or(16);
    for p in &prompts {
        // A steered round also takes one position for its hidden token.
        validation::fit_context(
            p.len() + usize::from(steer.is_some()),
            Some(max_tokens),
            "max_tokens",
            limits,
        )?;
    }
    // Ranking best_of candidates needs the sampled tokens' log-probabilities.
    params.logprobs = req.logprobs.or((best_of > n).then_some(0));
    let mut requests = Vec::new();
    for (pi, prompt) in prompts.iter().enumerate() {
        for j in 0..best_of {
            let mut r = validation::engine_request(
                prompt.clone(),
                max_tokens,
                &params,
                &stop,
                req.sampling.ignore_eos,
                j,
            );
            if req.echo {
                r.prompt_logprobs = req.logprobs;
            }
            requests.push((pi * best_of + j, pi, r));
        }
    }
    let prompt_texts = match &prompt {
        Prompt::Text(s) => vec![s.clone()],
        Prompt::Texts(v) => v.clone(),
        _ => prompts
            .iter()
            .map(|p| tok.decode_with_special(p).unwrap_or_default())
            .collect(),
    };
    Ok(Plan {
        model,
        steering: steer,
        prompts,
        prompt_texts,
        n,
        best_of,
        requests,
    })
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "OpenAI",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or an SSE stream of `text_completion` chunks ending with `data: [DONE]` when `stream` is true",
            content((CompletionResponse = "application/json"), (StreamEvent = "text/event-stream"))),
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
    Json(req): Json<CompletionRequest>,
) -> Result<Response, ApiError> {
    let engine = state.engine()?;
    let mut plan = plan(&req, &state, engine)?;
    let model = plan.model.clone();
    let permit = state.capacity.try_acquire(plan.requests.len())?;
    if let Some(steer) = &plan.steering {
        steer
            .attach_all(&state, &mut plan.requests, req.sampling.seed)
            .await;
    }
    let choices = generate::submit_all(engine, plan.requests)?;
    let id = new_id("cmpl");
    if req.sampling.stream {
        let format = CompletionChunks {
            id,
            created: unix_now(),
            model,
            tokenizer: engine.clone(),
            echo: req.echo.then(|| plan.prompt_texts.clone()),
            prompt_ids: plan.prompts.clone(),
            n: plan.n,
            logprobs: req.logprobs,
            choice_state: HashMap::new(),
            include_usage: req
                .sampling
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            usage: Usage::default(),
            steering: plan.steering.clone(),
            state: state.clone(),
        };
        return Ok(streaming::respond(choices, format, permit));
    }
    let finished = generate::finish_all(choices).await?;
    drop(permit);
    let usage = Usage {
        prompt_tokens: plan.prompts.iter().map(Vec::len).sum(),
        completion_tokens: finished.iter().map(|f| f.completion_tokens).sum(),
        total_tokens: 0,
    };
    let kept = best_of_each_prompt(finished, plan.best_of, plan.n);
    let tok = engine.tokenizer();
    let choices = kept
        .into_iter()
        .enumerate()
        .map(|(index, f)| {
            let prompt_text = req.echo.then(|| plan.prompt_texts[f.prompt_index].as_str());
            let prompt = req.echo.then(|| {
                (
                    plan.prompts[f.prompt_index].as_slice(),
                    f.prompt_logprobs.as_deref(),
                )
            });
            let logprobs = req
                .logprobs
                .map(|_| completion_logprobs(tok, prompt, &f.tokens, &f.logprobs));
            let steering = match (&plan.steering, &f.steering) {
                (Some(p), Some((value, prior))) => p.finish(&state, *value, prior, &f.text),
                _ => None,
            };
            CompletionChoice {
                index,
                text: format!("{}{}", prompt_text.unwrap_or(""), f.text),
                logprobs,
                finish_reason: Some(f.finish.as_str().into()),
                steering,
            }
        })
        .collect();
    let usage = Usage {
        total_tokens: usage.prompt_tokens + usage.completion_tokens,
        ..usage
    };
    Ok(axum::Json(CompletionResponse {
        id,
        object: "text_completion".into(),
        created: unix_now(),
        model,
        choices,
        usage: Some(usage),
    })
    .into_response())
}

/// For each prompt, the `n` candidates of `best_of` with the highest mean
/// token log-probability, in prompt order.
fn best_of_each_prompt(finished: Vec<Finished>, best_of: usize, n: usize) -> Vec<Finished> {
    if best_of == n {
        return finished;
    }
    let mean = |f: &Finished| {
        let lps: Vec<f32> = f.logprobs.iter().flatten().map(|l| l.logprob).collect();
        if lps.is_empty() {
            f32::NEG_INFINITY
        } else {
            lps.iter().sum::<f32>() / lps.len() as f32
        }
    };
    let mut out = Vec::new();
    for group in finished.chunks(best_of) {
        let mut ranked: Vec<&Finished> = group.iter().collect();
        ranked.sort_by(|a, b| mean(b).total_cmp(&mean(a)));
        out.extend(ranked.into_iter().take(n).cloned());
    }
    out
}

fn top_map(tok: &Tokenizer, lp: &TokenLogprob) -> HashMap<String, f32> {
    lp.top
        .iter()
        .map(|&(id, l)| (tok.token_display(id), l))
        .collect()
}

/// An echoed prompt's token ids, and their log-probabilities where they
/// were computed.
type EchoedPrompt<'a> = (&'a [u32], Option<&'a [Option<TokenLogprob>]>);

/// The legacy logprobs object; with echo, the prompt's tokens come first
/// (the very first has no log-probability).
fn completion_logprobs(
    tok: &Tokenizer,
    prompt: Option<EchoedPrompt>,
    tokens: &[u32],
    lps: &[Option<TokenLogprob>],
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = 0;
    let mut push = |out: &mut CompletionLogprobs, id: u32, lp: Option<&TokenLogprob>| {
        let text = tok.token_display(id);
        out.text_offset.push(offset);
        offset += text.chars().count();
        out.tokens.push(text);
        out.token_logprobs.push(lp.map(|l| l.logprob));
        out.top_logprobs.push(lp.map(|l| top_map(tok, l)));
    };
    if let Some((ids, plps)) = prompt {
        for (i, &id) in ids.iter().enumerate() {
            push(
                &mut out,
                id,
                plps.and_then(|p| p.get(i)).and_then(|l| l.as_ref()),
            );
        }
    }
    for (&id, lp) in tokens.iter().zip(lps) {
        push(&mut out, id, lp.as_ref());
    }
    out
}

/// Per-choice streaming state.
#[derive(Default)]
struct ChoiceStream {
    echoed: bool,
    /// Characters sent so far (for text_offset).
    offset: usize,
    /// The generated text (for recording the steered round).
    text: String,
    draw: Option<(usize, Vec<f64>)>,
}

struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    tokenizer: Engine,
    echo: Option<Vec<String>>,
    prompt_ids: Vec<Vec<u32>>,
    n: usize,
    logprobs: Option<usize>,
    choice_state: HashMap<usize, ChoiceStream>,
    include_usage: bool,
    usage: Usage,
    steering: Option<steering::Plan>,
    state: Arc<AppState>,
}

impl CompletionChunks {
    fn chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<&str>,
    ) -> SseEvent {
        self.chunk_with(index, text, logprobs, finish, None)
    }

    fn chunk_with(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<&str>,
        steering: Option<SteeringInfo>,
    ) -> SseEvent {
        streaming::data(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![CompletionChoice {
                index,
                text,
                logprobs,
                finish_reason: finish.map(str::to_string),
                steering,
            }],
            usage: None,
        })
    }

    /// With echo, the prompt goes out first (with its log-probabilities when
    /// asked, which arrive with the PromptLogprobs event).
    fn echo_chunk(
        &mut self,
        index: usize,
        prompt_lps: Option<&[Option<TokenLogprob>]>,
    ) -> Option<SseEvent> {
        let texts = self.echo.as_ref()?;
        let state = self.choice_state.entry(index).or_default();
        if state.echoed {
            return None;
        }
        state.echoed = true;
        let text = texts[index / self.n].clone();
        let ids = &self.prompt_ids[index / self.n];
        let logprobs = self.logprobs.map(|_| {
            completion_logprobs(
                self.tokenizer.tokenizer(),
                Some((ids, prompt_lps)),
                &[],
                &[],
            )
        });
        let state = self.choice_state.entry(index).or_default();
        state.offset += text.chars().count();
        Some(self.chunk(index, text, logprobs, None))
    }
}

impl ChunkFormat for CompletionChunks {
    fn on_event(&mut self, index: usize, event: Event) -> Result<Vec<SseEvent>, ApiError> {
        let mut out = Vec::new();
        match event {
            Event::PromptLogprobs(lps) => out.extend(self.echo_chunk(index, Some(&lps))),
            Event::Steering { value, prior } => {
                self.choice_state.entry(index).or_default().draw = Some((value, prior))
            }
            Event::Token { id, text, logprob } => {
                if self.logprobs.is_none() {
                    out.extend(self.echo_chunk(index, None));
                }
                if text.is_empty() && self.logprobs.is_none() {
                    return Ok(out);
                }
                let tok = self.tokenizer.tokenizer();
                let state = self.choice_state.entry(index).or_default();
                state.text += &text;
                let logprobs = self.logprobs.map(|_| {
                    let mut lp = completion_logprobs(tok, None, &[id], &[logprob]);
                    lp.text_offset = vec![state.offset];
                    lp
                });
                state.offset += text.chars().count();
                out.push(self.chunk(index, text, logprobs, None));
            }
            Event::Done {
                reason,
                tail,
                prompt_tokens,
                completion_tokens,
            } => {
                out.extend(self.echo_chunk(index, None));
                if index.is_multiple_of(self.n) {
                    self.usage.prompt_tokens += prompt_tokens;
                }
                self.usage.completion_tokens += completion_tokens;
                let choice = self.choice_state.entry(index).or_default();
                choice.text += &tail;
                let info = match (&self.steering, &choice.draw) {
                    (Some(plan), Some((value, prior))) => {
                        plan.finish(&self.state, *value, prior, &choice.text)
                    }
                    _ => None,
                };
                out.push(self.chunk_with(index, tail, None, Some(reason.as_str()), info));
            }
            Event::Error(e) => return Err(ApiError::internal(e)),
        }
        Ok(out)
    }

    fn on_end(&mut self) -> Vec<SseEvent> {
        if !self.include_usage {
            return vec![];
        }
        let usage = Usage {
            total_tokens: self.usage.prompt_tokens + self.usage.completion_tokens,
            ..self.usage
        };
        vec![streaming::data(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![],
            usage: Some(usage),
        })]
    }
}
