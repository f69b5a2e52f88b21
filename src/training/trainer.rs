//! The trainer: stage 1 SFT on steering token + desirable response, stage 2
//! KL + KTO against the frozen stage-1 adapter (DESIGN.md §4), AdamW with
//! linear warm-up and gradient clipping; then the held-out prior is measured
//! and the adapter is written.

use super::batch::{prepare, sample_rows, steering_logprobs, Batch, Row};
use super::data::{DataReport, TrainingData};
use super::losses::{self, LossConfig};
use super::measure::Measurement;
use super::model::{forward, FrozenBase, LoraVars, Trainable};
pub use super::output::write_adapter;
use super::output::{export, served_weights};
use crate::model::{Model, ProjKind};
use crate::steering::adapter::*;
use crate::steering::detect::Detector;
use crate::tokenizer::Tokenizer;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor, Var};
use candle_nn::Optimizer;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

/// Training settings, with the paper's defaults.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct TrainConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Projections with LoRA.
    pub targets: Vec<String>,
    pub sft_steps: usize,
    pub kl_steps: usize,
    pub batch: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub clip_norm: f64,
    pub beta: f64,
    pub lambda_desirable: f64,
    pub lambda_undesirable: f64,
    /// Longest training sequence, in tokens.
    pub max_len: usize,
    /// Tokens generated greedily per (held-out prompt, value) to measure
    /// detection consistency after training (0 skips it).
    pub consistency_tokens: usize,
    /// Fit the prior's calibration (a scale and per-value biases on the
    /// steering logits) on the training prompts after stage 2.
    pub calibrate: bool,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: vec!["q_proj".into(), "v_proj".into()],
            sft_steps: 60,
            kl_steps: 120,
            batch: 8,
            learning_rate: 2e-3,
            warmup_steps: 10,
            weight_decay: 0.0,
            clip_norm: 1.0,
            beta: 0.1,
            lambda_desirable: 1.0,
            lambda_undesirable: 1.0,
            max_len: 192,
            consistency_tokens: 48,
            calibrate: true,
            seed: 0,
        }
    }
}

/// Where a job is, reported after every step.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    /// `sft`, `kl_kto`, or `measure`.
    pub stage: String,
    pub step: usize,
    pub total: usize,
    pub loss: f64,
    pub kl: Option<f64>,
    pub kto: Option<f64>,
    pub elapsed_secs: f64,
    pub eta_secs: f64,
}

impl Progress {
    /// The measurement stage (before training at step 0, after it at `total`).
    fn measuring(step: usize, total: usize, loss: f64, elapsed_secs: f64) -> Self {
        Self {
            stage: "measure".into(),
            step,
            total,
            loss,
            kl: None,
            kto: None,
            elapsed_secs,
            eta_secs: if step == 0 { f64::NAN } else { 0.0 },
        }
    }
}

pub struct Trained {
    pub config: AdapterConfig,
    pub tensors: HashMap<String, Tensor>,
    pub data: DataReport,
}

pub fn train(
    model: &Model,
    tokenizer: &Tokenizer,
    mut data: TrainingData,
    cfg: &TrainConfig,
    base_model: BaseModel,
    mut progress: impl FnMut(&Progress) -> bool,
) -> Result<Trained> {
    let targets: Vec<ProjKind> = cfg
        .targets
        .iter()
        .map(|t| ProjKind::from_hf_name(t).with_context(|| format!("unknown LoRA target `{t}`")))
        .collect::<Result<_>>()?;
    ensure!(
        cfg.batch > 0 && cfg.rank > 0,
        "batch and rank must be positive"
    );
    let mut config = adapter_config(&data, cfg, base_model);
    config.validate()?;
    let detector = Detector::new(&config)?;
    let report = data.validate(|t| detector.detect(t))?;
    let _heap = HeapReuse::start();
    let base = FrozenBase::from_model(model, DType::F32, cfg.max_len)?;
    let prep = prepare(
        &data,
        &config,
        tokenizer,
        model.config.vocab_size,
        cfg.max_len,
    )?;
    let init = name_embeddings(&base, tokenizer, &data)?;
    let tr = Trainable::new(
        &base,
        &init,
        cfg.rank,
        cfg.alpha,
        &targets,
        cfg.dropout,
        cfg.seed,
    )?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let total = cfg.sft_steps + cfg.kl_steps;
    // The untrained adapter is measured first, as the baseline.
    let names = config.value_names();
    let measurement = Measurement {
        model,
        prep: &prep,
        tok: tokenizer,
        detector: &detector,
        names: &names,
        max_new: cfg.consistency_tokens,
    };
    if !progress(&Progress::measuring(0, total, f64::NAN, 0.0)) {
        anyhow::bail!("cancelled");
    }
    let before = measurement.run(&served_weights(&tr, &config, model)?, &config)?;
    let start = Instant::now();
    let mut optimizer = candle_nn::AdamW::new(
        tr.vars(),
        candle_nn::ParamsAdamW {
            lr: cfg.learning_rate,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let mut last = (f64::NAN, f64::NAN, f64::NAN);
    for step in 0..cfg.sft_steps {
        let rows = sample_rows(&prep, cfg.batch, false, &mut rng);
        let batch = Batch::new(&prep, &rows)?;
        let logits = forward(&base, &tr, &batch.ids, true, batch.from)?;
        let loss = losses::sft(
            &losses::token_logprobs(&logits, &batch.targets)?,
            &batch.mask,
        )?;
        last.0 = optimize(&mut optimizer, &tr, &loss, cfg, step)?;
        if !report_progress(&mut progress, "sft", step, total, last, start) {
            anyhow::bail!("cancelled");
        }
    }
    // Stage 2: the stage-1 adapter, frozen, is the reference.
    let reference = snapshot(&tr)?;
    let loss_cfg = LossConfig {
        beta: cfg.beta,
        lambda_desirable: cfg.lambda_desirable,
        lambda_undesirable: cfg.lambda_undesirable,
    };
    for step in 0..cfg.kl_steps {
        let rows = sample_rows(&prep, cfg.batch, true, &mut rng);
        let batch = Batch::new(&prep, &rows)?;
        let logits = forward(&base, &tr, &batch.ids, true, batch.from)?;
        let policy = losses::token_logprobs(&logits, &batch.targets)?;
        let ref_lp = losses::token_logprobs(
            &forward(&base, &reference, &batch.ids, false, batch.from)?,
            &batch.targets,
        )?
        .detach();
        let log_ratio = ((policy - ref_lp)? * &batch.mask)?.sum(1)?;
        // Mismatched pairs: prompt i with the response of row i + 1.
        let shifted: Vec<Row> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| Row {
                prompt: r.prompt,
                value: r.value,
                response: rows[(i + 1) % rows.len()].response.clone(),
                desirable: r.desirable,
            })
            .collect();
        let mb = Batch::new(&prep, &shifted)?;
        let m_policy =
            losses::token_logprobs(&forward(&base, &tr, &mb.ids, false, mb.from)?, &mb.targets)?;
        let m_ref = losses::token_logprobs(
            &forward(&base, &reference, &mb.ids, false, mb.from)?,
            &mb.targets,
        )?;
        let mismatched = ((m_policy - m_ref)? * &mb.mask)?.sum(1)?.detach();
        let kto = losses::kto(&log_ratio, &batch.desirable, &mismatched, &loss_cfg)?;
        let steer_lp = steering_logprobs(&logits, &batch, &prep.steer_ids)?;
        let kl = losses::kl(&steer_lp, &batch.target_dist, &batch.desirable)?;
        let loss = (&kto + &kl)?;
        let value = optimize(&mut optimizer, &tr, &loss, cfg, cfg.sft_steps + step)?;
        last = (value, scalar(&kl)?, scalar(&kto)?);
        if !report_progress(
            &mut progress,
            "kl_kto",
            cfg.sft_steps + step,
            total,
            last,
            start,
        ) {
            anyhow::bail!("cancelled");
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if !progress(&Progress::measuring(total, total, last.0, elapsed)) {
        anyhow::bail!("cancelled");
    }
    let weights = served_weights(&tr, &config, model)?;
    if cfg.calibrate {
        config.prior_calibration = Some(calibrate(&measurement, &weights, &prep, &names)?);
    }
    let after = measurement.run(&weights, &config)?;
    config.training = serde_json::json!({
        "method": "SFT, then KL + KTO against the stage-1 adapter (arXiv 2604.05756)",
        "settings": cfg,
        "data": report,
        "final_loss": last.0,
        "final_kl": last.1,
        "final_kto": last.2,
        "held_out_prior_mae_before": before.mae,
        "held_out_prior_mae": after.mae,
        "held_out_prior_mae_uncalibrated": after.uncalibrated_mae,
        "held_out_prior_kl_before": before.kl,
        "held_out_prior_kl": after.kl,
        "greedy_consistency_before": before.consistency,
        "greedy_consistency": after.consistency,
        "train_seconds": start.elapsed().as_secs_f64(),
    });
    Ok(Trained {
        config,
        tensors: export(&tr, model.config.tie_word_embeddings)?,
        data: report,
    })
}

/// The prior's calibration, fitted on the training prompts' steering logits
/// as served (see `calibration`).
fn calibrate(
    measurement: &Measurement,
    weights: &crate::steering::adapter::AdapterWeights,
    prep: &super::batch::Prepared,
    names: &[String],
) -> Result<PriorCalibration> {
    let logits = measurement.steering_logits(weights, &prep.prompts)?;
    let targets: Vec<Vec<f64>> = prep.prompts.iter().map(|(_, t)| t.clone()).collect();
    let (scale, bias) = super::calibration::fit(&logits, &targets);
    Ok(PriorCalibration {
        scale,
        bias: names.iter().cloned().zip(bias).collect(),
    })
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn report_progress(
    progress: &mut impl FnMut(&Progress) -> bool,
    stage: &str,
    step: usize,
    total: usize,
    last: (f64, f64, f64),
    start: Instant,
) -> bool {
    let elapsed = start.elapsed().as_secs_f64();
    let done = step + 1;
    progress(&Progress {
        stage: stage.into(),
        step: done,
        total,
        loss: last.0,
        kl: last.1.is_finite().then_some(last.1),
        kto: last.2.is_finite().then_some(last.2),
        elapsed_secs: elapsed,
        eta_secs: elapsed / done as f64 * (total - done) as f64,
    })
}

pub fn adapter_config(
    data: &TrainingData,
    cfg: &TrainConfig,
    base_model: BaseModel,
) -> AdapterConfig {
    AdapterConfig {
        format_version: FORMAT_VERSION,
        base_model,
        prompt_format: data.prompt_format.clone(),
        attribute: Attribute {
            name: data.attribute.clone(),
            values: data
                .values
                .iter()
                .map(|v| AttributeValue {
                    name: v.name.clone(),
                    token: v
                        .token
                        .clone()
                        .unwrap_or_else(|| format!("<steer:{}>", v.name)),
                    patterns: v.patterns.clone(),
                })
                .collect(),
        },
        detection: Detection::default(),
        targets: data.targets.clone(),
        lora: Some(LoraConfig {
            rank: cfg.rank,
            alpha: cfg.alpha,
            targets: cfg.targets.clone(),
            dropout: cfg.dropout as f64,
        }),
        prior_calibration: None,
        training: serde_json::Value::Null,
    }
}

/// Each steering row starts as the mean embedding of its value's name.
fn name_embeddings(base: &FrozenBase, tok: &Tokenizer, data: &TrainingData) -> Result<Tensor> {
    let rows = data
        .values
        .iter()
        .map(|v| {
            let ids = tok.encode(&format!(" {}", v.name), false)?;
            Ok(base.embed_rows(&ids)?.mean(0)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// One optimizer step: warm-up, backward, global-norm clipping. Returns the loss.
fn optimize(
    opt: &mut candle_nn::AdamW,
    tr: &Trainable,
    loss: &Tensor,
    cfg: &TrainConfig,
    step: usize,
) -> Result<f64> {
    let warm = ((step + 1) as f64 / cfg.warmup_steps.max(1) as f64).min(1.0);
    opt.set_learning_rate(cfg.learning_rate * warm);
    let mut grads = loss.backward()?;
    let vars = tr.vars();
    let mut norm2 = 0f64;
    for v in &vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            norm2 += scalar(&g.sqr()?.sum_all()?)?;
        }
    }
    let norm = norm2.sqrt();
    if norm > cfg.clip_norm && norm.is_finite() {
        let factor = cfg.clip_norm / norm;
        for v in &vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * factor)?);
            }
        }
    }
    opt.step(&grads)?;
    scalar(loss)
}

/// A frozen copy of the trainable tensors (the KTO reference).
fn snapshot(tr: &Trainable) -> Result<Trainable> {
    let copy = |v: &Var| -> Result<Var> { Ok(Var::from_tensor(&v.as_tensor().copy()?.detach())?) };
    Ok(Trainable {
        steer_embed: copy(&tr.steer_embed)?,
        steer_head: tr.steer_head.as_ref().map(copy).transpose()?,
        lora: tr
            .lora
            .iter()
            .map(|row| {
                row.iter()
                    .map(|l| {
                        l.as_ref()
                            .map(|l| {
                                Ok::<_, anyhow::Error>(LoraVars {
                                    a: copy(&l.a)?,
                                    b: copy(&l.b)?,
                                })
                            })
                            .transpose()
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?,
        scale: tr.scale,
        dropout: 0.0,
    })
}

/// While training, glibc keeps freed memory for reuse. Every step allocates
/// and frees tensors of tens of megabytes (logits over the vocabulary and
/// their gradients); by default each is a fresh mmap whose pages the kernel
/// must zero, a quarter of a KL + KTO step. Dropping the guard restores the
/// defaults and hands the memory back.
struct HeapReuse;

impl HeapReuse {
    fn start() -> Self {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator tunables.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
        HeapReuse
    }
}

impl Drop for HeapReuse {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: as above; malloc_trim only releases free memory.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 65536);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
            libc::malloc_trim(0);
        }
    }
}
