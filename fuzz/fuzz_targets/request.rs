//! Request bodies through the server's own JSON extractor (content type,
//! parsing, the parameter named in errors), then every limit check that
//! needs no model. Nothing may panic; accepted values must be in range.
#![no_main]

use axum::extract::FromRequest;
use libfuzzer_sys::fuzz_target;
use steerling::api::error::Json;
use steerling::api::protocol::{ChatCompletionRequest, CompletionRequest, Prompt, SamplingFields};
use steerling::api::validation::{self, Limits};

const VOCAB: usize = 49_152;

fn extract<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
    let request = axum::http::Request::builder()
        .method("POST")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_vec()))
        .ok()?;
    futures::executor::block_on(Json::<T>::from_request(request, &()))
        .ok()
        .map(|Json(v)| v)
}

fn check_sampling(f: &SamplingFields, prompts: usize, limits: &Limits) {
    if let Ok(p) = validation::sampling_params(f, VOCAB, limits) {
        assert!((0.0..=2.0).contains(&p.temperature));
        assert!(p.top_p > 0.0 && p.top_p <= 1.0);
        assert!(p
            .logit_bias
            .iter()
            .all(|&(id, b)| (id as usize) < VOCAB && b.abs() <= 100.0));
    }
    if let Ok(stops) = validation::stop_strings(f, limits) {
        assert!(stops.len() <= limits.max_stop);
    }
    if let Ok(n) = validation::choices("n", f.n, prompts, limits) {
        assert!(n >= 1 && n * prompts <= limits.max_n);
    }
}

fuzz_target!(|body: &[u8]| {
    let limits = Limits::default();
    if let Some(req) = extract::<CompletionRequest>(body) {
        let prompts = match &req.prompt {
            Prompt::Texts(v) => v.len(),
            Prompt::TokenLists(v) => v.len(),
            _ => 1,
        };
        check_sampling(&req.sampling, prompts, &limits);
        let _ = validation::choices("best_of", req.best_of, prompts, &limits);
        if let Ok(m) = validation::fit_context(100, req.max_tokens, "max_tokens", &limits) {
            assert!(100 + m <= limits.max_total_tokens);
        }
        if let Prompt::Text(t) = &req.prompt {
            let _ = validation::text_can_fit("prompt", t, &limits);
        }
    }
    if let Some(req) = extract::<ChatCompletionRequest>(body) {
        check_sampling(&req.sampling, 1, &limits);
        let _ = validation::fit_context(100, req.max_completion_tokens, "max_tokens", &limits);
    }
});
