//! Training jobs next to serving: one runs at a time on its own thread,
//! more wait in a bounded queue; progress is readable and streamable; a job
//! can be cancelled. A finished job writes its adapter atomically and loads
//! it; a failed or cancelled one leaves nothing behind.

use super::data::TrainingData;
use super::trainer::{train, write_adapter, TrainConfig};
use crate::model::{load_model, Model, ModelSource};
use crate::steering::adapter::BaseModel;
use crate::steering::Registry;
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobRequest {
    /// The adapter's name (its folder under the adapters directory).
    pub name: String,
    pub data: TrainingData,
    #[serde(default)]
    pub settings: TrainConfig,
    /// Fault injection for tests: the job panics once its model is loaded.
    /// Never read from a request body.
    #[doc(hidden)]
    #[serde(skip)]
    #[schema(ignore)]
    pub crash: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobStatus {
    pub id: String,
    pub name: String,
    pub state: JobState,
    /// `queued`, `loading`, `sft`, `kl_kto`, `writing`, or `done`.
    pub stage: String,
    pub step: usize,
    pub total: usize,
    pub loss: Option<f64>,
    pub kl: Option<f64>,
    pub kto: Option<f64>,
    /// Mean absolute error of the prior on held-out prompts, once measured.
    pub held_out_mae: Option<f64>,
    pub eta_secs: Option<f64>,
    pub error: Option<String>,
}

struct Job {
    request: JobRequest,
    status: Mutex<JobStatus>,
    cancel: AtomicBool,
    updates: tokio::sync::watch::Sender<JobStatus>,
}

impl Job {
    fn update(&self, f: impl FnOnce(&mut JobStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        // send_replace: the value must change even with nobody watching.
        self.updates.send_replace(s.clone());
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the training queue is full ({0} jobs waiting)")]
    QueueFull(usize),
}

/// Everything a job needs from the server.
pub struct TrainingContext {
    pub source: ModelSource,
    pub max_len: usize,
    pub base: BaseModel,
    pub registry: Arc<Registry>,
}

pub struct Jobs {
    max_queued: usize,
    inner: Mutex<Inner>,
    wake: Condvar,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, Arc<Job>>,
    queue: VecDeque<String>,
}

impl Jobs {
    /// Starts the worker thread.
    pub fn start(context: TrainingContext, max_queued: usize) -> Arc<Self> {
        let jobs = Arc::new(Self {
            max_queued,
            inner: Mutex::new(Inner::default()),
            wake: Condvar::new(),
        });
        let worker = jobs.clone();
        std::thread::Builder::new()
            .name("steerling-train".into())
            .spawn(move || worker.work(context))
            .expect("cannot spawn the training thread");
        jobs
    }

    pub fn submit(&self, request: JobRequest) -> Result<JobStatus, JobError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.queue.len() >= self.max_queued {
            return Err(JobError::QueueFull(inner.queue.len()));
        }
        let id = format!("train-{:016x}", rand::random::<u64>());
        let status = JobStatus {
            id: id.clone(),
            name: request.name.clone(),
            state: JobState::Queued,
            stage: "queued".into(),
            step: 0,
            total: request.settings.sft_steps + request.settings.kl_steps,
            loss: None,
            kl: None,
            kto: None,
            held_out_mae: None,
            eta_secs: None,
            error: None,
        };
        let (updates, _) = tokio::sync::watch::channel(status.clone());
        let job = Arc::new(Job {
            request,
            status: Mutex::new(status.clone()),
            cancel: AtomicBool::new(false),
            updates,
        });
        inner.jobs.insert(id.clone(), job);
        inner.queue.push_back(id);
        self.wake.notify_one();
        Ok(status)
    }

    pub fn status(&self, id: &str) -> Option<JobStatus> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .jobs
            .get(id)
            .map(|j| j.status.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// A receiver of the job's status changes.
    pub fn watch(&self, id: &str) -> Option<tokio::sync::watch::Receiver<JobStatus>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.jobs.get(id).map(|j| j.updates.subscribe())
    }

    /// Cancels a queued job at once, a running one at its next step.
    pub fn cancel(&self, id: &str) -> Option<JobStatus> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let job = inner.jobs.get(id)?.clone();
        job.cancel.store(true, Ordering::Relaxed);
        if let Some(pos) = inner.queue.iter().position(|q| q == id) {
            inner.queue.remove(pos);
            job.update(|s| {
                s.state = JobState::Cancelled;
                s.stage = "done".into();
            });
        }
        drop(inner);
        self.status(id)
    }

    fn next(&self) -> Arc<Job> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(id) = inner.queue.pop_front() {
                if let Some(job) = inner.jobs.get(&id) {
                    return job.clone();
                }
            }
            inner = self.wake.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn work(&self, ctx: TrainingContext) {
        // The trainer's own copy of the weights, loaded on the first job.
        let mut model: Option<(Model, Tokenizer)> = None;
        loop {
            let job = self.next();
            job.update(|s| {
                s.state = JobState::Running;
                s.stage = "loading".into();
            });
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&job, &ctx, &mut model)
            }));
            let outcome = match result {
                Ok(r) => r,
                Err(panic) => {
                    tracing::error!(adapter = %job.request.name, panic = crate::panic_message(&*panic), "training job panicked");
                    // Its copy of the weights may be half-updated: load afresh next time.
                    model = None;
                    Err(anyhow::anyhow!(
                        "the training job failed with an internal error"
                    ))
                }
            };
            job.update(|s| {
                s.stage = "done".into();
                match outcome {
                    Ok(mae) => {
                        s.state = JobState::Succeeded;
                        s.held_out_mae = Some(mae);
                        s.eta_secs = Some(0.0);
                    }
                    Err(_) if job.cancel.load(Ordering::Relaxed) => s.state = JobState::Cancelled,
                    Err(e) => {
                        s.state = JobState::Failed;
                        s.error = Some(format!("{e:#}"));
                    }
                }
            });
        }
    }
}

fn run(job: &Job, ctx: &TrainingContext, model: &mut Option<(Model, Tokenizer)>) -> Result<f64> {
    if model.is_none() {
        let loaded = load_model(&ctx.source, ctx.max_len)?;
        *model = Some((loaded.model, loaded.tokenizer));
    }
    let (m, tok) = model.as_ref().expect("loaded above");
    if job.request.crash {
        panic!("injected training fault");
    }
    let request = job.request.clone();
    let trained = train(
        m,
        tok,
        request.data,
        &request.settings,
        ctx.base.clone(),
        |p| {
            job.update(|s| {
                s.stage = p.stage.clone();
                s.step = p.step;
                s.total = p.total;
                // Measurement reports no losses (NaN before training): keep the last.
                s.loss = Some(p.loss).filter(|l| l.is_finite()).or(s.loss);
                s.kl = p.kl.or(s.kl);
                s.kto = p.kto.or(s.kto);
                s.eta_secs = Some(p.eta_secs).filter(|e| e.is_finite());
            });
            !job.cancel.load(Ordering::Relaxed)
        },
    )?;
    if job.cancel.load(Ordering::Relaxed) {
        anyhow::bail!("cancelled");
    }
    job.update(|s| s.stage = "writing".into());
    write_adapter(ctx.registry.dir(), &request.name, &trained)?;
    ctx.registry.load(&request.name)?;
    Ok(trained.config.training["held_out_prior_mae"]
        .as_f64()
        .unwrap_or(f64::NAN))
}
