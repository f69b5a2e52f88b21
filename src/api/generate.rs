//! Running choices on the engine for the endpoints: admission against the
//! capacity limit, collecting whole results, and merging streams.

use super::error::ApiError;
use crate::engine::{Engine, Event, FinishReason, GenerateRequest, SubmitError, TokenLogprob};
use futures::stream::{self, Stream, StreamExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Sequences admitted (running or queued in the engine), bounded: past the
/// bound a request is refused at once with 429, never queued without limit.
#[derive(Debug)]
pub struct Capacity {
    in_flight: AtomicUsize,
    limit: usize,
}

/// Holds `n` units of capacity until dropped.
#[derive(Debug)]
pub struct Permit {
    capacity: Arc<Capacity>,
    n: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.capacity.in_flight.fetch_sub(self.n, Ordering::AcqRel);
    }
}

impl Capacity {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            limit,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// No room for even one more sequence.
    pub fn is_full(&self) -> bool {
        self.in_flight() >= self.limit
    }

    pub fn try_acquire(self: &Arc<Self>, n: usize) -> Result<Permit, ApiError> {
        let mut current = self.in_flight.load(Ordering::Acquire);
        loop {
            if current + n > self.limit {
                return Err(ApiError::overloaded(1));
            }
            match self.in_flight.compare_exchange(
                current,
                current + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(Permit {
                        capacity: self.clone(),
                        n,
                    })
                }
                Err(now) => current = now,
            }
        }
    }
}

/// One submitted choice.
pub struct Choice {
    pub index: usize,
    pub prompt_index: usize,
    pub events: UnboundedReceiver<Event>,
}

/// A choice run to the end.
#[derive(Debug, Clone)]
pub struct Finished {
    pub index: usize,
    pub prompt_index: usize,
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<Option<TokenLogprob>>,
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// A steered round's draw: (value, prior).
    pub steering: Option<(usize, Vec<f64>)>,
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Stopped => ApiError::internal("the engine has stopped"),
        other => ApiError::invalid("prompt", other.to_string()),
    }
}

/// Submits every choice: (choice index, prompt index, request).
pub fn submit_all(
    engine: &Engine,
    requests: Vec<(usize, usize, GenerateRequest)>,
) -> Result<Vec<Choice>, ApiError> {
    requests
        .into_iter()
        .map(|(index, prompt_index, request)| {
            let events = engine.submit(request).map_err(submit_error)?;
            Ok(Choice {
                index,
                prompt_index,
                events,
            })
        })
        .collect()
}

/// Reads one choice to its end.
pub async fn finish(mut choice: Choice) -> Result<Finished, ApiError> {
    let mut out = Finished {
        index: choice.index,
        prompt_index: choice.prompt_index,
        text: String::new(),
        tokens: Vec::new(),
        logprobs: Vec::new(),
        prompt_logprobs: None,
        finish: FinishReason::Stop,
        prompt_tokens: 0,
        completion_tokens: 0,
        steering: None,
    };
    while let Some(event) = choice.events.recv().await {
        match event {
            Event::PromptLogprobs(lp) => out.prompt_logprobs = Some(lp),
            Event::Steering { value, prior } => out.steering = Some((value, prior)),
            Event::Token { id, text, logprob } => {
                out.tokens.push(id);
                out.text += &text;
                out.logprobs.push(logprob);
            }
            Event::Done {
                reason,
                tail,
                prompt_tokens,
                completion_tokens,
            } => {
                out.text += &tail;
                out.finish = reason;
                out.prompt_tokens = prompt_tokens;
                out.completion_tokens = completion_tokens;
                return Ok(out);
            }
            Event::Error(e) => return Err(ApiError::internal(e)),
        }
    }
    Err(ApiError::internal(
        "the engine stopped before the choice finished",
    ))
}

/// Runs all choices concurrently and returns them ordered by index.
pub async fn finish_all(choices: Vec<Choice>) -> Result<Vec<Finished>, ApiError> {
    let mut done = futures::future::try_join_all(choices.into_iter().map(finish)).await?;
    done.sort_by_key(|f| f.index);
    Ok(done)
}

/// All choices' events as one stream, tagged with the choice index.
pub fn merged(choices: Vec<Choice>) -> impl Stream<Item = (usize, Event)> + Send {
    stream::select_all(choices.into_iter().map(|c| {
        let index = c.index;
        UnboundedReceiverStream::new(c.events)
            .map(move |e| (index, e))
            .boxed()
    }))
}
