//! Limits and validation: every request field is checked here, before any
//! work, and turned into engine requests.

use super::error::ApiError;
use super::protocol::{Prompt, SamplingFields};
use crate::engine::{GenerateRequest, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Operator-set limits (CLI flags and environment).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Longest prompt + completion, in tokens (the context).
    pub max_total_tokens: usize,
    /// Most choices per request (n × prompts, or best_of × prompts).
    pub max_n: usize,
    /// Most stop strings.
    pub max_stop: usize,
    /// Longest stop string, in bytes.
    pub max_stop_len: usize,
    /// Most prompts in one request.
    pub max_prompts: usize,
    /// Most logit_bias entries.
    pub max_logit_bias: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_tokens: 4096,
            max_total_tokens: 2048,
            max_n: 16,
            max_stop: 4,
            max_stop_len: 256,
            max_prompts: 32,
            max_logit_bias: 300,
        }
    }
}

fn in_range(param: &str, value: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => Err(ApiError::invalid(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {v}"),
        )),
        _ => Ok(()),
    }
}

/// Checks the sampling fields and builds the engine's parameters.
pub fn sampling_params(
    f: &SamplingFields,
    vocab: usize,
    limits: &Limits,
) -> Result<SamplingParams, ApiError> {
    in_range("temperature", f.temperature, 0.0, 2.0)?;
    in_range("top_p", f.top_p, 0.0, 1.0)?;
    if f.top_p == Some(0.0) {
        return Err(ApiError::invalid("top_p", "`top_p` must be greater than 0"));
    }
    in_range("presence_penalty", f.presence_penalty, -2.0, 2.0)?;
    in_range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)?;
    in_range("min_p", f.min_p, 0.0, 1.0)?;
    if let Some(r) = f.repetition_penalty {
        if !(r > 0.0 && r <= 10.0) {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("`repetition_penalty` must be in (0, 10], got {r}"),
            ));
        }
    }
    let mut logit_bias = Vec::new();
    if let Some(bias) = &f.logit_bias {
        if bias.len() > limits.max_logit_bias {
            return Err(ApiError::invalid(
                "logit_bias",
                format!(
                    "`logit_bias` has {} entries; at most {}",
                    bias.len(),
                    limits.max_logit_bias
                ),
            ));
        }
        for (key, &value) in bias {
            let id: u32 = key.parse().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` key `{key}` is not a token id"),
                )
            })?;
            if id as usize >= vocab {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` token id {id} is outside the vocabulary (size {vocab})"),
                ));
            }
            if !(-100.0..=100.0).contains(&value) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` values must be between -100 and 100, got {value}"),
                ));
            }
            logit_bias.push((id, value));
        }
        logit_bias.sort_by_key(|b| b.0);
    }
    Ok(SamplingParams {
        temperature: f.temperature.unwrap_or(1.0),
        top_p: f.top_p.unwrap_or(1.0),
        top_k: f.top_k.unwrap_or(0),
        min_p: f.min_p.unwrap_or(0.0),
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        logit_bias,
        seed: f.seed,
        logprobs: None,
    })
}

pub fn stop_strings(f: &SamplingFields, limits: &Limits) -> Result<Vec<String>, ApiError> {
    let stops = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > limits.max_stop {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "`stop` has {} strings; at most {}",
                stops.len(),
                limits.max_stop
            ),
        ));
    }
    if let Some(long) = stops.iter().find(|s| s.len() > limits.max_stop_len) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "a stop string is {} bytes; at most {}",
                long.len(),
                limits.max_stop_len
            ),
        ));
    }
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

/// `n` (default 1) within limits, counted over all prompts.
pub fn choices(
    param: &str,
    n: Option<usize>,
    prompts: usize,
    limits: &Limits,
) -> Result<usize, ApiError> {
    let n = n.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be at least 1"),
        ));
    }
    if n.checked_mul(prompts)
        .is_none_or(|total| total > limits.max_n)
    {
        return Err(ApiError::invalid(param, format!("{n} choices × {prompts} prompts exceeds this server's limit of {} sequences per request", limits.max_n)));
    }
    Ok(n)
}

/// Text past this many bytes per allowed prompt token is refused untokenized.
const MAX_BYTES_PER_TOKEN: usize = 64;

/// No token spans more than a few dozen bytes: text far longer than the
/// prompt limit cannot fit, and is refused before the tokenizer spends
/// time on it.
pub fn text_can_fit(param: &str, text: &str, limits: &Limits) -> Result<(), ApiError> {
    let max_bytes = limits.max_prompt_tokens.saturating_mul(MAX_BYTES_PER_TOKEN);
    if text.len() > max_bytes {
        return Err(ApiError::invalid(
            param,
            format!(
                "`{param}` is {} bytes, far past this server's limit of {} tokens",
                text.len(),
                limits.max_prompt_tokens
            ),
        ));
    }
    Ok(())
}

/// Tokenizes `prompt` into one or more prompts of token ids.
pub fn prompts(
    prompt: &Prompt,
    tok: &Tokenizer,
    vocab: usize,
    limits: &Limits,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |s: &str| {
        text_can_fit("prompt", s, limits)?;
        tok.encode(s, true)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))
    };
    let list: Vec<Vec<u32>> = match prompt {
        Prompt::Text(s) => vec![encode(s)?],
        Prompt::Texts(v) => v.iter().map(|s| encode(s)).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![ids.clone()],
        Prompt::TokenLists(lists) => lists.clone(),
    };
    if list.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` has no prompts"));
    }
    if list.len() > limits.max_prompts {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "`prompt` has {} prompts; at most {}",
                list.len(),
                limits.max_prompts
            ),
        ));
    }
    for ids in &list {
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "a prompt is empty"));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::invalid(
                "prompt",
                format!("token id {bad} is outside the vocabulary (size {vocab})"),
            ));
        }
        if ids.len() > limits.max_prompt_tokens {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "the prompt has {} tokens; this server accepts at most {}",
                    ids.len(),
                    limits.max_prompt_tokens
                ),
            ));
        }
    }
    Ok(list)
}

/// Checks prompt + completion against the context, as OpenAI words it.
pub fn fit_context(
    prompt_tokens: usize,
    max_tokens: Option<usize>,
    param: &str,
    limits: &Limits,
) -> Result<usize, ApiError> {
    let context = limits.max_total_tokens;
    if prompt_tokens >= context {
        return Err(ApiError::invalid(
            "prompt",
            format!("This model's maximum context length is {context} tokens, but the prompt has {prompt_tokens} tokens"),
        ));
    }
    match max_tokens {
        Some(m) if prompt_tokens.saturating_add(m) > context => Err(ApiError::invalid(
            param,
            format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt_tokens} in the prompt, {m} for the completion)",
                prompt_tokens.saturating_add(m)
            ),
        )),
        Some(m) => Ok(m),
        None => Ok(context - prompt_tokens),
    }
}

/// One engine request per choice; choice j of a seeded request gets its own
/// seed derived from (seed, j), so `n` seeded choices differ from each other
/// but reproduce.
pub fn engine_request(
    prompt: Vec<u32>,
    max_tokens: usize,
    params: &SamplingParams,
    stop: &[String],
    ignore_eos: bool,
    choice: usize,
) -> GenerateRequest {
    let mut params = params.clone();
    params.seed = params
        .seed
        .map(|s| crate::engine::sampling::derive_seed(s, choice as u64));
    let mut r = GenerateRequest::new(prompt, max_tokens, params);
    r.stop = stop.to_vec();
    r.ignore_eos = ignore_eos;
    r
}
