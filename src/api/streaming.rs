//! Server-Sent Events shared by the streaming endpoints: one data event per
//! chunk, an error event if generation fails midway, `data: [DONE]` at the end.

use super::error::ApiError;
use super::generate::{self, Choice, Permit};
use crate::engine::Event;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};
use serde::Serialize;
use std::convert::Infallible;

/// How an endpoint turns engine events into chunks.
pub trait ChunkFormat: Send + 'static {
    /// Chunks for one engine event of choice `index`; an error ends the stream.
    fn on_event(&mut self, index: usize, event: Event) -> Result<Vec<SseEvent>, ApiError>;
    /// Chunks after every choice finished (e.g. usage), before `[DONE]`.
    fn on_end(&mut self) -> Vec<SseEvent>;
}

pub fn data<T: Serialize>(value: &T) -> SseEvent {
    SseEvent::default()
        .data(serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")))
}

/// The OpenAI envelope as a data event (what OpenAI's clients look for).
pub fn error_event(err: &ApiError) -> SseEvent {
    data(&err.body())
}

/// Streams all choices. Dropping the response (client gone) drops the
/// engine receivers, which frees their slots at the next step.
pub fn respond<F: ChunkFormat>(choices: Vec<Choice>, format: F, permit: Permit) -> Response {
    let unfinished = choices.len();
    let merged = generate::merged(choices).boxed();
    let start = Some((merged, format, permit, unfinished));
    let chunks = stream::unfold(start, |state| async move {
        let (mut merged, mut format, permit, mut unfinished) = state?;
        match merged.next().await {
            Some((index, event)) => {
                unfinished -= usize::from(matches!(event, Event::Done { .. }));
                match format.on_event(index, event) {
                    Ok(events) => Some((events, Some((merged, format, permit, unfinished)))),
                    Err(err) => {
                        tracing::error!(error = %err.message, "generation failed mid-stream");
                        Some((vec![error_event(&err)], None))
                    }
                }
            }
            // A choice's channel closed without its end: the engine dropped it.
            None if unfinished > 0 => {
                let err = ApiError::internal("the engine stopped before the choice finished");
                tracing::error!(error = %err.message, "generation failed mid-stream");
                Some((vec![error_event(&err)], None))
            }
            None => {
                let mut events = format.on_end();
                events.push(SseEvent::default().data("[DONE]"));
                drop(permit);
                Some((events, None))
            }
        }
    })
    .flat_map(stream::iter)
    .map(Ok::<_, Infallible>);
    Sse::new(chunks)
        .keep_alive(KeepAlive::default())
        .into_response()
}
