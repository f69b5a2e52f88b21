//! The engine on real models: batching changes nothing in the output, seeds
//! reproduce, cancellation frees slots, bad input gets clear errors.

mod common;

use common::*;
use std::time::{Duration, Instant};
use steerling::engine::{
    Crash, EngineConfig, Event, FinishReason, GenerateRequest, SamplingParams, SubmitError,
};

const PROMPTS: [&str; 8] = [
    "Hello",
    "The nurse said that",
    "What is the capital of France? Paris is",
    "A teacher and a doctor went to the hospital with their children and",
    "She",
    "They wrote a story about the farmer and his family, and the story was long and full of",
    "The engineer said that he would fix the machine before",
    "Hello world, hello there! The manager",
];

fn greedy(engine: &steerling::engine::Engine, prompt: &str, tokens: usize) -> GenerateRequest {
    let ids = engine.tokenizer().encode(prompt, true).unwrap();
    let mut r = GenerateRequest::new(ids, tokens, SamplingParams::greedy());
    r.ignore_eos = true;
    r
}

/// Eight prompts of different lengths, run together, give exactly what each
/// gives alone — with prefill chunks small enough to interleave with decoding.
fn batching_parity(path: &std::path::Path, tokens: usize) {
    let config = EngineConfig {
        max_batch: 8,
        max_context: 512,
        prefill_chunk: 7,
    };
    let engine = engine_for(path, config);
    let alone: Vec<Output> = PROMPTS
        .iter()
        .map(|p| run(&engine, greedy(&engine, p, tokens)))
        .collect();
    let streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| engine.submit(greedy(&engine, p, tokens)).unwrap())
        .collect();
    let together: Vec<Output> = streams.into_iter().map(collect).collect();
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.tokens.len(), tokens);
        assert_eq!(a.tokens, t.tokens, "prompt {i} differs when batched");
    }
}

#[test]
fn batching_matches_single_runs_on_tiny_model() {
    batching_parity(&tiny_gguf(), 24);
}

#[test]
fn batching_matches_single_runs_on_smollm2() {
    batching_parity(&smollm2(), 16);
}

fn sampled(engine: &steerling::engine::Engine, prompt: &str, seed: u64) -> GenerateRequest {
    let ids = engine.tokenizer().encode(prompt, true).unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..Default::default()
    };
    let mut r = GenerateRequest::new(ids, 24, params);
    r.ignore_eos = true;
    r
}

#[test]
fn same_seed_same_text_alone_or_batched_and_different_seeds_differ() {
    let engine = engine_for(
        &smollm2(),
        EngineConfig {
            max_batch: 8,
            ..Default::default()
        },
    );
    let prompt = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n";
    let alone = run(&engine, sampled(&engine, prompt, 42));
    let again = run(&engine, sampled(&engine, prompt, 42));
    assert_eq!(alone, again);
    // The same request among others with other seeds and prompts.
    let mut streams = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        streams.push(engine.submit(sampled(&engine, p, i as u64)).unwrap());
    }
    let batched = collect(engine.submit(sampled(&engine, prompt, 42)).unwrap());
    streams.into_iter().for_each(|s| drop(collect(s)));
    assert_eq!(alone, batched);
    let other = run(&engine, sampled(&engine, prompt, 43));
    assert_ne!(alone.tokens, other.tokens);
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let engine = engine_for(&smollm2(), EngineConfig::default());
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = engine.tokenizer().encode(prompt, true).unwrap();
    let out = run(
        &engine,
        GenerateRequest::new(ids, 32, SamplingParams::greedy()),
    );
    assert!(out.text.contains("Paris"), "{:?}", out.text);
    assert_eq!(out.finish, FinishReason::Stop, "should end with <|im_end|>");
    assert!(!out.text.contains("<|im_end|>"));
}

#[test]
fn stop_strings_cut_the_text_exactly() {
    let engine = engine_for(&smollm2(), EngineConfig::default());
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = engine.tokenizer().encode(prompt, true).unwrap();
    let full = run(
        &engine,
        GenerateRequest::new(ids.clone(), 32, SamplingParams::greedy()),
    );
    let cut_at = full
        .text
        .find("Paris")
        .expect("greedy answer mentions Paris");
    let mut r = GenerateRequest::new(ids, 32, SamplingParams::greedy());
    r.stop = vec!["aris".into()];
    let stopped = run(&engine, r);
    assert_eq!(stopped.text, full.text[..cut_at + 1]);
    assert_eq!(stopped.finish, FinishReason::Stop);
}

#[test]
fn max_tokens_ends_with_length() {
    let engine = engine_for(&tiny_gguf(), EngineConfig::default());
    let out = run(&engine, greedy(&engine, "Hello", 5));
    assert_eq!((out.tokens.len(), out.finish), (5, FinishReason::Length));
}

#[test]
fn context_limit_ends_generation() {
    let engine = engine_for(
        &tiny_gguf(),
        EngineConfig {
            max_context: 32,
            ..Default::default()
        },
    );
    let mut r = greedy(&engine, "Hello world", 1000);
    r.ignore_eos = true;
    let out = run(&engine, r);
    let prompt_len = engine
        .tokenizer()
        .encode("Hello world", true)
        .unwrap()
        .len();
    assert_eq!(out.tokens.len() + prompt_len, 32);
    assert_eq!(out.finish, FinishReason::Length);
}

#[test]
fn dropped_receivers_free_their_slots() {
    let engine = engine_for(
        &tiny_gguf(),
        EngineConfig {
            max_batch: 4,
            ..Default::default()
        },
    );
    let streams: Vec<_> = (0..6)
        .map(|_| engine.submit(greedy(&engine, "Hello", 100_000)).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.running() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(engine.running(), 4, "four should run, two wait");
    drop(streams);
    while (engine.running() > 0 || engine.waiting() > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!((engine.running(), engine.waiting()), (0, 0));
}

#[test]
fn bad_requests_are_refused_clearly() {
    let engine = engine_for(
        &tiny_gguf(),
        EngineConfig {
            max_context: 64,
            ..Default::default()
        },
    );
    let long = vec![5u32; 64];
    let err = engine
        .submit(GenerateRequest::new(long, 4, SamplingParams::greedy()))
        .unwrap_err();
    assert_eq!(
        err,
        SubmitError::PromptTooLong {
            prompt: 64,
            context: 64
        }
    );
    assert!(err.to_string().contains("64 tokens"));
    let err = engine
        .submit(GenerateRequest::new(vec![], 4, SamplingParams::greedy()))
        .unwrap_err();
    assert_eq!(err, SubmitError::EmptyPrompt);
    let err = engine
        .submit(GenerateRequest::new(
            vec![1_000_000],
            4,
            SamplingParams::greedy(),
        ))
        .unwrap_err();
    assert_eq!(err, SubmitError::InvalidToken(1_000_000));
    // The engine still serves.
    assert_eq!(run(&engine, greedy(&engine, "Hello", 3)).tokens.len(), 3);
}

#[test]
fn prompt_logprobs_cover_every_prompt_token_but_the_first() {
    let engine = engine_for(
        &tiny_gguf(),
        EngineConfig {
            prefill_chunk: 3,
            ..Default::default()
        },
    );
    let mut r = greedy(&engine, "The nurse said that she would help", 2);
    r.prompt_logprobs = Some(2);
    let n = r.prompt.len();
    let mut events = engine.submit(r).unwrap();
    let mut seen = None;
    while let Some(e) = events.blocking_recv() {
        if let steerling::engine::Event::PromptLogprobs(lp) = e {
            seen = Some(lp);
        }
    }
    let lp = seen.expect("prompt logprobs event");
    assert_eq!(lp.len(), n);
    assert!(lp[0].is_none());
    for entry in &lp[1..] {
        let e = entry.as_ref().unwrap();
        assert!(e.logprob <= 0.0 && e.top.len() == 2 && e.top[0].1 >= e.logprob - 1e-6);
    }
}

/// Reads a request's events to the end: its output, or why it failed.
fn outcome(mut events: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Result<Vec<u32>, String> {
    let mut tokens = Vec::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token { id, .. } => tokens.push(id),
            Event::Done { .. } => return Ok(tokens),
            Event::Error(e) => return Err(e),
            _ => {}
        }
    }
    Err("closed without an end".into())
}

/// Waits for a request's first generated token, so it is surely running.
fn first_token(events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> u32 {
    loop {
        match events.blocking_recv() {
            Some(Event::Token { id, .. }) => return id,
            Some(Event::PromptLogprobs(_) | Event::Steering { .. }) => {}
            other => panic!("expected a token, got {other:?}"),
        }
    }
}

#[test]
fn an_engine_crash_fails_running_requests_cleanly_and_the_engine_goes_on() {
    for crash in [Crash::InStep, Crash::OnAdmit] {
        let engine = engine_for(
            &tiny_gguf(),
            EngineConfig {
                max_batch: 2,
                max_context: 2048,
                prefill_chunk: 64,
            },
        );
        let reference = run(&engine, greedy(&engine, PROMPTS[3], 40));
        // One request mid-generation, the faulty one beside it, and a third
        // waiting for a slot when the fault strikes.
        let mut running = engine.submit(greedy(&engine, PROMPTS[1], 1900)).unwrap();
        first_token(&mut running);
        let mut faulty = greedy(&engine, PROMPTS[2], 8);
        faulty.crash = Some(crash);
        let faulty = engine.submit(faulty).unwrap();
        let queued = engine.submit(greedy(&engine, PROMPTS[3], 40)).unwrap();
        let failed = outcome(running).expect_err("the running request fails");
        assert!(
            failed.contains("internal error"),
            "{crash:?}: a clear reason, got {failed:?}"
        );
        assert!(outcome(faulty).is_err(), "{crash:?}");
        assert_eq!(
            outcome(queued).unwrap(),
            reference.tokens,
            "{crash:?}: the waiting request is served as if nothing happened"
        );
        let after = run(&engine, greedy(&engine, PROMPTS[3], 40));
        assert_eq!(after.tokens, reference.tokens, "{crash:?}");
    }
}
