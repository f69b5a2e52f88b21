//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod child;
pub mod server;

use std::path::PathBuf;
use std::sync::OnceLock;
use steerling::engine::{Engine, EngineConfig, Event, FinishReason, GenerateRequest};
use steerling::model::{load_model, KvCache, Logits, LoraSet, Model, ModelSource, Segment};
use steerling::testing::{write_tiny_gguf, TinySpec};

/// A tiny random-weight llama GGUF, written once per test binary.
pub fn tiny_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // Every test binary writes the same bytes; the rename makes it atomic.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join("tiny-llama-q4_1.gguf");
        let tmp = dir.join(format!("tiny-llama-q4_1.gguf.{}", std::process::id()));
        write_tiny_gguf(
            &tmp,
            &TinySpec::default(),
            candle_core::quantized::GgmlDType::Q4_1,
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    })
    .clone()
}

pub fn engine_for(path: &std::path::Path, config: EngineConfig) -> Engine {
    let loaded = load_model(&ModelSource::from_path(path).unwrap(), config.max_context).unwrap();
    Engine::start(loaded, config)
}

/// One sequence's part of a step: `ids` fed, logits for the last row.
pub fn segment<'a>(
    model: &Model,
    ids: &[u32],
    cache: &'a mut KvCache,
    lora: Option<&'a LoraSet>,
) -> Segment<'a> {
    Segment {
        embeds: model.embed_tokens(ids).unwrap(),
        cache,
        lora,
        extra_head: None,
        logits: Logits::Last,
        branches: None,
    }
}

pub fn smollm2() -> PathBuf {
    steerling::fetch::ensure_default_model().unwrap()
}

/// What one request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// Reads a request's events to the end.
pub fn collect(mut events: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Output {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token { id, text: t, .. } => {
                tokens.push(id);
                text += &t;
            }
            Event::Done { reason, tail, .. } => {
                text += &tail;
                return Output {
                    text,
                    tokens,
                    finish: reason,
                };
            }
            Event::Error(e) => panic!("generation failed: {e}"),
            Event::PromptLogprobs(_) | Event::Steering { .. } => {}
        }
    }
    panic!("engine closed the stream without finishing");
}

pub fn run(engine: &Engine, request: GenerateRequest) -> Output {
    collect(engine.submit(request).unwrap())
}
