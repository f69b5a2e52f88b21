//! The engine: one scheduler thread owns the model and runs continuous
//! batching. Callers submit a request and read its events from a channel;
//! dropping the receiver cancels the request at the next step.

pub mod sampling;
mod scheduler;
pub mod stop;

use crate::model::LoadedModel;
use crate::tokenizer::Tokenizer;
pub use sampling::{SamplingParams, TokenLogprob};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Longest sequence (prompt + output) in tokens.
    pub max_context: usize,
    /// Prompt tokens prefilled per step (long prompts are chunked).
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_context: 2048,
            prefill_chunk: 512,
        }
    }
}

/// Chooses a steered round's value from the prior over the K values.
pub type DrawFn = Box<dyn FnMut(&[f64]) -> usize + Send>;

/// A steered request: the adapter applies to the whole sequence, and after
/// the prompt one hidden steering token is drawn and appended.
pub struct Steering {
    pub adapter: Arc<crate::steering::Adapter>,
    pub draw: DrawFn,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("adapter", &self.adapter.name)
            .finish()
    }
}

#[derive(Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Report log-probabilities of the prompt's tokens with this many alternatives.
    pub prompt_logprobs: Option<usize>,
    pub steering: Option<Steering>,
    /// Fault injection for the engine's own tests: make the engine panic
    /// while it serves this request. Nothing in the HTTP API sets it.
    #[doc(hidden)]
    pub crash: Option<Crash>,
}

/// Where an injected engine fault strikes.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// Inside a forward step (the step's own guard catches it).
    InStep,
    /// In the scheduler loop, outside any step (the supervisor restarts the loop).
    OnAdmit,
}

impl GenerateRequest {
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling,
            stop: Vec::new(),
            ignore_eos: false,
            prompt_logprobs: None,
            steering: None,
            crash: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or stop string.
    Stop,
    /// max_tokens or the context limit.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    /// Log-probabilities of the prompt tokens (the first has none).
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// A steered round's draw: the value chosen and the prior it came from.
    /// The steering token itself is never sent.
    Steering {
        value: usize,
        prior: Vec<f64>,
    },
    /// A generated token and the text it released (may be empty while a
    /// multi-byte character or a possible stop string is pending).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        reason: FinishReason,
        /// Text released at the end (held back until then).
        tail: String,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens but the context holds {context}; shorten it")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("token id {0} is outside the vocabulary")]
    InvalidToken(u32),
    #[error("the engine has stopped")]
    Stopped,
}

/// Live counts, readable from any thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
}

/// Runs `f` on a worker of a rayon pool with one thread per core, so the
/// scheduler takes part in its own parallel matmuls instead of sleeping
/// while other threads do them (a wake-up per matmul costs more than the
/// matmul at batch 1).
fn run_on_compute_pool(f: impl FnOnce() + Send) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("steerling-compute-{i}"))
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

pub(crate) struct Submission {
    pub request: GenerateRequest,
    pub events: UnboundedSender<Event>,
    pub submitted: std::time::Instant,
}

/// A handle to the scheduler thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Submission>,
    tokenizer: Arc<Tokenizer>,
    stats: Arc<EngineStats>,
    config: EngineConfig,
    vocab_size: usize,
    model_name: String,
    model_config: crate::model::ModelConfig,
    model_sha256: String,
}

impl Engine {
    /// Starts the scheduler thread, which takes the model.
    pub fn start(loaded: LoadedModel, mut config: EngineConfig) -> Self {
        config.max_context = config.max_context.min(loaded.model.max_positions());
        config.max_batch = config.max_batch.max(1);
        config.prefill_chunk = config.prefill_chunk.max(1);
        let tokenizer = Arc::new(loaded.tokenizer);
        let stats = Arc::new(EngineStats::default());
        let (tx, rx) = mpsc::channel();
        let vocab_size = loaded.model.config.vocab_size;
        let model_config = loaded.model.config.clone();
        let scheduler = scheduler::Scheduler::new(
            loaded.model,
            tokenizer.clone(),
            config.clone(),
            stats.clone(),
        );
        std::thread::Builder::new()
            .name("steerling-engine".into())
            .spawn(move || run_on_compute_pool(move || scheduler.supervise(rx)))
            .expect("cannot spawn the engine thread");
        Self {
            tx,
            tokenizer,
            stats,
            config,
            vocab_size,
            model_name: loaded.name,
            model_config,
            model_sha256: loaded.sha256,
        }
    }

    /// The served model's shape (for checking adapters).
    pub fn model_config(&self) -> &crate::model::ModelConfig {
        &self.model_config
    }

    /// sha256 of the weights.
    pub fn model_sha256(&self) -> &str {
        &self.model_sha256
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn running(&self) -> usize {
        self.stats.running.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> usize {
        self.stats.waiting.load(Ordering::Relaxed)
    }

    /// Queues a request; its events arrive on the returned channel.
    pub fn submit(
        &self,
        request: GenerateRequest,
    ) -> Result<UnboundedReceiver<Event>, SubmitError> {
        if request.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        // A steered round takes one more position, for its hidden token.
        let needed = request.prompt.len() + usize::from(request.steering.is_some());
        if needed >= self.config.max_context {
            return Err(SubmitError::PromptTooLong {
                prompt: request.prompt.len(),
                context: self.config.max_context,
            });
        }
        if let Some(&bad) = request
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(SubmitError::InvalidToken(bad));
        }
        let (events, rx) = unbounded_channel();
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        self.tx
            .send(Submission {
                request,
                events,
                submitted: std::time::Instant::now(),
            })
            .map_err(|_| SubmitError::Stopped)?;
        Ok(rx)
    }
}
