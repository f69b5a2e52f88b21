//! The scheduler loop: admit waiting sequences, plan a step (one token for
//! each decoding sequence, prompt chunks for the rest within a token
//! budget), run it as one batched forward, sample, and stream events.

use super::sampling::{logprob_of, Sampler, TokenLogprob};
use super::stop::StopMatcher;
use super::{Crash, EngineConfig, EngineStats, Event, FinishReason, GenerateRequest, Submission};
use crate::metrics as m;
use crate::model::{KvCache, Logits, Model, Segment};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use anyhow::Context;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

struct Sequence {
    request: GenerateRequest,
    events: UnboundedSender<Event>,
    cache: KvCache,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    /// Tokens already in the cache.
    fed: usize,
    prompt_len: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    finished: bool,
    submitted: Instant,
    /// When the last token was sent (for inter-token latency).
    last_token: Option<Instant>,
    /// Hidden tokens in `tokens` (the steering token once drawn).
    hidden: usize,
}

impl Sequence {
    /// Visible tokens generated so far.
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len - self.hidden
    }

    /// Steered and not yet drawn: the next logits hold the prior.
    fn awaiting_draw(&self) -> bool {
        self.request.steering.is_some() && self.hidden == 0
    }

    fn finish(&mut self, tokenizer: &Tokenizer, mut reason: FinishReason) {
        let mut tail = String::new();
        if reason == FinishReason::Length {
            // Text held back (an incomplete character) may still hold a stop string.
            let rest = self.decoder.flush(tokenizer).unwrap_or_default();
            let (text, hit) = self.stop.push(&rest);
            tail = text;
            if hit {
                reason = FinishReason::Stop;
            } else {
                tail += &self.stop.flush();
            }
        }
        let _ = self.events.send(Event::Done {
            reason,
            tail,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
        });
        self.finished = true;
    }
}

/// Input rows for token ids: the base embedding, or an adapter's steering
/// token row for ids past the vocabulary.
fn embed(
    model: &Model,
    adapter: Option<&crate::steering::Adapter>,
    ids: &[u32],
) -> anyhow::Result<candle_core::Tensor> {
    let vocab = model.config.vocab_size as u32;
    let Some(adapter) = adapter.filter(|_| ids.iter().any(|&t| t >= vocab)) else {
        return model.embed_tokens(ids);
    };
    let mut parts = Vec::new();
    let mut start = 0;
    while start < ids.len() {
        let steering = ids[start] >= vocab;
        let end = (start..ids.len())
            .find(|&i| (ids[i] >= vocab) != steering)
            .unwrap_or(ids.len());
        parts.push(if steering {
            let rows: Vec<u32> = ids[start..end].iter().map(|&t| t - vocab).collect();
            adapter.weights.embed.index_select(
                &candle_core::Tensor::new(rows.as_slice(), model.device())?,
                0,
            )?
        } else {
            model.embed_tokens(&ids[start..end])?
        });
        start = end;
    }
    Ok(candle_core::Tensor::cat(&parts, 0)?)
}

/// A steered sequence runs its steering tokens as branches of the prompt's
/// last chunk (see `Segment::branches`) when the adapter has at most this
/// many: each is one more row of that step, and past a few rows they cost
/// more than the forward step of its own that the drawn token needs otherwise.
const MAX_BRANCHES: usize = 4;

/// One sequence's logits from a step, as plain rows.
struct StepOutput {
    /// Over the vocabulary: the rows its `Logits` asked for, then one per
    /// branch.
    rows: Vec<Vec<f32>>,
    /// The steering tokens' logits at the prompt's end, when it drew.
    steering_logits: Option<Vec<f32>>,
}

/// One sequence's share of a step.
struct Planned {
    index: usize,
    rows: usize,
    logits: Logits,
}

pub(crate) struct Scheduler {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    waiting: VecDeque<Submission>,
    running: Vec<Sequence>,
}

impl Scheduler {
    pub fn new(
        model: Model,
        tokenizer: Arc<Tokenizer>,
        config: EngineConfig,
        stats: Arc<EngineStats>,
    ) -> Self {
        Self {
            model,
            tokenizer,
            config,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// Runs the loop until every engine handle is gone. A panic outside a
    /// step (inside one, `run` handles it) ends the loop; the supervisor then
    /// fails the sequences that were running, keeps the queue, and starts the
    /// loop again on the same weights (they are never written while serving).
    pub fn supervise(mut self, rx: mpsc::Receiver<Submission>) {
        loop {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(&rx)));
            if ran.is_ok() {
                return;
            }
            tracing::error!(
                failed = self.running.len(),
                queued = self.waiting.len(),
                "the engine loop panicked; failing its running requests and restarting"
            );
            metrics::counter!(m::ENGINE_RESTARTS).increment(1);
            self.fail_running("the engine restarted after an internal error");
            self.publish_counts();
        }
    }

    fn run(&mut self, rx: &mpsc::Receiver<Submission>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish_counts();
                match rx.recv() {
                    Ok(s) => self.waiting.push_back(s),
                    Err(_) => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.waiting.push_back(s);
            }
            self.admit();
            self.running.retain(|s| !s.events.is_closed());
            self.publish_counts();
            if !self.running.is_empty() {
                // A panic in a step fails the sequences of that step, not the engine.
                let stepped =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
                if stepped.is_err() {
                    tracing::error!("engine step panicked; failing its sequences and going on");
                    self.fail_running("internal error during generation");
                }
                self.running.retain(|s| !s.finished);
            }
        }
    }

    /// Ends every running sequence with an error event (its caches go with it).
    fn fail_running(&mut self, message: &str) {
        for seq in self.running.drain(..) {
            let _ = seq.events.send(Event::Error(message.into()));
        }
    }

    fn publish_counts(&self) {
        self.stats
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch {
            let Some(Submission {
                request,
                events,
                submitted,
            }) = self.waiting.pop_front()
            else {
                break;
            };
            if events.is_closed() {
                continue;
            }
            if request.crash == Some(Crash::OnAdmit) {
                panic!("injected engine fault on admission");
            }
            let prompt_len = request.prompt.len();
            metrics::histogram!(m::QUEUE_TIME).record(submitted.elapsed().as_secs_f64());
            metrics::counter!(m::PROMPT_TOKENS).increment(prompt_len as u64);
            self.running.push(Sequence {
                sampler: Sampler::new(request.sampling.clone(), &request.prompt),
                tokens: request.prompt.clone(),
                stop: StopMatcher::new(request.stop.clone()),
                request,
                events,
                cache: self.model.new_cache(),
                fed: 0,
                prompt_len,
                decoder: StreamDecoder::new(),
                prompt_logprobs: vec![None],
                finished: false,
                submitted,
                last_token: None,
                hidden: 0,
            });
        }
    }

    /// Decoding sequences get one row each; prompts share what is left of
    /// the token budget, oldest first.
    fn plan(&self) -> Vec<Planned> {
        let mut budget = self.config.prefill_chunk.max(self.running.len());
        let mut plan = Vec::new();
        for (index, seq) in self.running.iter().enumerate() {
            if seq.fed >= seq.prompt_len {
                plan.push(Planned {
                    index,
                    rows: 1,
                    logits: Logits::Last,
                });
                budget -= 1;
            }
        }
        for (index, seq) in self.running.iter().enumerate() {
            if seq.fed >= seq.prompt_len || budget == 0 {
                continue;
            }
            let rows = (seq.prompt_len - seq.fed).min(budget);
            budget -= rows;
            let completes = seq.fed + rows == seq.prompt_len;
            let logits = match (seq.request.prompt_logprobs.is_some(), completes) {
                (true, _) => Logits::All,
                (false, true) => Logits::Last,
                (false, false) => Logits::None,
            };
            plan.push(Planned {
                index,
                rows,
                logits,
            });
        }
        plan.sort_by_key(|p| p.index);
        plan
    }

    fn step(&mut self) {
        let plan = self.plan();
        if plan
            .iter()
            .any(|p| self.running[p.index].request.crash == Some(Crash::InStep))
        {
            panic!("injected engine fault in a step");
        }
        metrics::histogram!(m::BATCH_SIZE).record(plan.len() as f64);
        let outputs = match self.forward(&plan) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "engine step failed");
                for p in &plan {
                    let seq = &mut self.running[p.index];
                    let _ = seq
                        .events
                        .send(Event::Error(format!("generation failed: {e}")));
                    seq.finished = true;
                }
                return;
            }
        };
        for (p, logits) in plan.iter().zip(outputs) {
            let seq = &mut self.running[p.index];
            let start = seq.fed;
            seq.fed += p.rows;
            if let Err(e) = self.consume(p, start, logits) {
                let seq = &mut self.running[p.index];
                let _ = seq
                    .events
                    .send(Event::Error(format!("generation failed: {e}")));
                seq.finished = true;
            }
        }
    }

    fn forward(&mut self, plan: &[Planned]) -> anyhow::Result<Vec<StepOutput>> {
        let model = &self.model;
        let mut segments = Vec::with_capacity(plan.len());
        let mut next = plan.iter().peekable();
        for (index, seq) in self.running.iter_mut().enumerate() {
            let Some(p) = next.next_if(|p| p.index == index) else {
                continue;
            };
            let adapter = seq.request.steering.as_ref().map(|s| &s.adapter);
            let embeds = embed(
                model,
                adapter.map(|a| a.as_ref()),
                &seq.tokens[seq.fed..seq.fed + p.rows],
            )?;
            // The steering tokens' logits are needed once: where the prompt ends.
            let completes_prompt = seq.fed + p.rows == seq.tokens.len();
            let drawing = adapter.filter(|_| completes_prompt && seq.awaiting_draw());
            let extra_head = drawing.map(|a| &a.weights.head);
            let branches = drawing
                .filter(|a| a.config.attribute.values.len() <= MAX_BRANCHES)
                .map(|a| &a.weights.embed);
            // The row that completes a steered prompt only draws; the
            // first answer token comes from the drawn value's branch row
            // or, without branches, from the step that feeds its token.
            let logits = match p.logits {
                Logits::Last if drawing.is_some() => Logits::None,
                other => other,
            };
            segments.push(Segment {
                embeds,
                cache: &mut seq.cache,
                lora: adapter.and_then(|a| a.weights.lora.as_ref()),
                extra_head,
                logits,
                branches,
            });
        }
        let logits = model.forward(&mut segments)?;
        logits
            .into_iter()
            .map(|out| {
                let rows = if out.rows.elem_count() == 0 {
                    Vec::new()
                } else {
                    out.rows.to_vec2::<f32>()?
                };
                Ok(StepOutput {
                    rows,
                    steering_logits: out.extra,
                })
            })
            .collect()
    }

    /// Handles one sequence's logits: prompt log-probabilities, then the
    /// next token if the whole prompt is in.
    fn consume(&mut self, p: &Planned, start: usize, out: StepOutput) -> anyhow::Result<()> {
        let StepOutput {
            mut rows,
            steering_logits,
        } = out;
        let tokenizer = self.tokenizer.clone();
        let max_context = self.config.max_context;
        let seq = &mut self.running[p.index];
        // The steering tokens' rows, when they ran as branches of this step.
        let mut branch_rows = rows.split_off(rows.len() - seq.cache.branch_count());
        if let (Some(n), Logits::All) = (seq.request.prompt_logprobs, p.logits) {
            for (i, row) in rows.iter().enumerate() {
                let target = start + i + 1;
                if target < seq.prompt_len {
                    seq.prompt_logprobs
                        .push(Some(logprob_of(row, seq.tokens[target], n)));
                }
            }
            if seq.fed == seq.prompt_len {
                let lps = std::mem::take(&mut seq.prompt_logprobs);
                let _ = seq.events.send(Event::PromptLogprobs(lps));
            }
        }
        if seq.fed < seq.tokens.len() {
            return Ok(());
        }
        if seq.request.max_tokens == 0 {
            seq.finish(&tokenizer, FinishReason::Length);
            return Ok(());
        }
        let mut last = if seq.awaiting_draw() {
            let logits = steering_logits.context("no steering-token logits for the draw")?;
            let steering = seq.request.steering.as_mut().expect("steered");
            let prior = steering.adapter.config.prior(&logits);
            let value = (steering.draw)(&prior);
            seq.tokens.push(steering.adapter.token_id(value));
            seq.hidden += 1;
            let _ = seq.events.send(Event::Steering { value, prior });
            if branch_rows.is_empty() {
                // Fed as the next step's row.
                return Ok(());
            }
            seq.cache.keep_branch(value)?;
            seq.fed += 1;
            branch_rows.swap_remove(value)
        } else {
            let Some(last) = rows.pop() else {
                return Ok(());
            };
            last
        };
        let (token, logprob) = seq.sampler.sample(&mut last);
        seq.tokens.push(token);
        let now = Instant::now();
        match seq.last_token {
            None => metrics::histogram!(m::TIME_TO_FIRST_TOKEN)
                .record((now - seq.submitted).as_secs_f64()),
            Some(prev) => {
                metrics::histogram!(m::INTER_TOKEN_LATENCY).record((now - prev).as_secs_f64())
            }
        }
        seq.last_token = Some(now);
        metrics::counter!(m::GENERATED_TOKENS).increment(1);
        let is_eos = tokenizer.eos.contains(&token) && !seq.request.ignore_eos;
        if is_eos {
            seq.finish(&tokenizer, FinishReason::Stop);
            return Ok(());
        }
        let delta = seq.decoder.push(&tokenizer, token)?;
        let (text, hit) = seq.stop.push(&delta);
        let _ = seq.events.send(Event::Token {
            id: token,
            text,
            logprob,
        });
        if hit {
            seq.finish(&tokenizer, FinishReason::Stop);
        } else if seq.generated() >= seq.request.max_tokens || seq.tokens.len() >= max_context {
            seq.finish(&tokenizer, FinishReason::Length);
        }
        Ok(())
    }
}
