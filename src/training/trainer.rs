//! The trainer: stage 1 SFT on steering token + desirable response, stage 2
//! KL + KTO against the frozen stage-1 adapter (DESIGN.md §4), AdamW with
//! linear warm-up and gradient clipping; then the held-out prior is measured
//! and the adapter is written.

use super::data::{DataReport, TrainingData};
use super::losses::{self, LossConfig};
use super::measure::{greedy_consistency, held_out_mae};
use super::model::{forward, FrozenBase, LoraVars, Trainable};
use crate::model::{Model, ProjKind};
use crate::steering::adapter::*;
use crate::steering::detect::Detector;
use crate::tokenizer::Tokenizer;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Optimizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
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

pub struct Trained {
    pub config: AdapterConfig,
    pub tensors: HashMap<String, Tensor>,
    pub data: DataReport,
}

/// One training row: prompt, the value whose token is placed, the response.
struct Row {
    prompt: usize,
    value: usize,
    response: Vec<u32>,
    desirable: bool,
}

pub(super) struct Prepared {
    /// (formatted prompt ids, target) per prompt.
    pub(super) prompts: Vec<(Vec<u32>, Vec<f64>)>,
    pub(super) held_out: Vec<(Vec<u32>, Vec<f64>)>,
    /// responses[value] = tokenized responses (with end-of-sequence).
    pub(super) responses: Vec<Vec<Vec<u32>>>,
    pub(super) steer_ids: Vec<u32>,
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
    let measuring = Progress {
        stage: "measure".into(),
        step: 0,
        total,
        loss: f64::NAN,
        kl: None,
        kto: None,
        elapsed_secs: 0.0,
        eta_secs: f64::NAN,
    };
    if !progress(&measuring) {
        anyhow::bail!("cancelled");
    }
    let served = served_weights(&tr, &config, model)?;
    let prior_before = held_out_mae(model, &served, &prep)?;
    let consistency_before = greedy_consistency(
        model,
        &served,
        &prep,
        tokenizer,
        &detector,
        &config.value_names(),
        cfg.consistency_tokens,
    )?;
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
    let served = served_weights(&tr, &config, model)?;
    let prior_after = held_out_mae(model, &served, &prep)?;
    if !progress(&Progress {
        stage: "measure".into(),
        step: total,
        total,
        loss: last.0,
        kl: None,
        kto: None,
        elapsed_secs: start.elapsed().as_secs_f64(),
        eta_secs: 0.0,
    }) {
        anyhow::bail!("cancelled");
    }
    let consistency = greedy_consistency(
        model,
        &served,
        &prep,
        tokenizer,
        &detector,
        &config.value_names(),
        cfg.consistency_tokens,
    )?;
    config.training = serde_json::json!({
        "method": "SFT, then KL + KTO against the stage-1 adapter (arXiv 2604.05756)",
        "settings": cfg,
        "data": report,
        "final_loss": last.0,
        "final_kl": last.1,
        "final_kto": last.2,
        "held_out_prior_mae_before": prior_before.0,
        "held_out_prior_mae": prior_after.0,
        "held_out_prior_kl_before": prior_before.1,
        "held_out_prior_kl": prior_after.1,
        "greedy_consistency_before": consistency_before,
        "greedy_consistency": consistency,
        "train_seconds": start.elapsed().as_secs_f64(),
    });
    Ok(Trained {
        config,
        tensors: export(&tr, model.config.tie_word_embeddings)?,
        data: report,
    })
}

/// The adapter as the engine would load it, to measure it as served.
fn served_weights(tr: &Trainable, config: &AdapterConfig, model: &Model) -> Result<AdapterWeights> {
    AdapterWeights::from_tensors(
        export(tr, model.config.tie_word_embeddings)?,
        config,
        &model.config,
    )
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
        training: serde_json::Value::Null,
    }
}

fn prepare(
    data: &TrainingData,
    config: &AdapterConfig,
    tok: &Tokenizer,
    vocab: usize,
    max_len: usize,
) -> Result<Prepared> {
    let f = &data.prompt_format;
    let encode_prompt = |p: &super::data::PromptSpec| -> Result<(Vec<u32>, Vec<f64>)> {
        let ids = tok.encode(&format!("{}{}{}", f.prefix, p.text, f.suffix), true)?;
        ensure!(ids.len() + 2 < max_len, "a prompt is longer than max_len");
        Ok((
            ids,
            config.target(p.context.as_deref().unwrap_or("default")),
        ))
    };
    let eos: Vec<u32> = tok.eos.first().copied().into_iter().collect();
    let responses = data
        .value_names()
        .iter()
        .map(|name| {
            data.responses[name]
                .iter()
                .map(|r| Ok([tok.encode(r, false)?, eos.clone()].concat()))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Prepared {
        prompts: data
            .prompts
            .iter()
            .map(encode_prompt)
            .collect::<Result<_>>()?,
        held_out: data
            .held_out
            .iter()
            .map(encode_prompt)
            .collect::<Result<_>>()?,
        responses,
        steer_ids: (0..data.values.len()).map(|k| (vocab + k) as u32).collect(),
    })
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

/// A batch of rows: desirable ones (value v, a response showing v); in
/// stage 2 half are undesirable (value v, a response showing another value).
fn sample_rows(
    prep: &Prepared,
    batch: usize,
    with_undesirable: bool,
    rng: &mut StdRng,
) -> Vec<Row> {
    let k = prep.responses.len();
    (0..batch)
        .map(|i| {
            let prompt = rng.random_range(0..prep.prompts.len());
            let value = rng.random_range(0..k);
            let desirable = !with_undesirable || i % 2 == 0;
            let shown = if desirable {
                value
            } else {
                (value + rng.random_range(1..k)) % k
            };
            let pool = &prep.responses[shown];
            Row {
                prompt,
                value,
                response: pool[rng.random_range(0..pool.len())].clone(),
                desirable,
            }
        })
        .collect()
}

/// Padded tensors for a list of rows: input = prompt + steering token +
/// response; the loss covers the steering token and the response.
struct Batch {
    ids: Tensor,
    targets: Tensor,
    mask: Tensor,
    /// First position whose logits are needed (the earliest steering
    /// position); `targets`, `mask` and `steer_pos` count from it.
    from: usize,
    /// Position whose logits predict the steering token, per row.
    steer_pos: Vec<usize>,
    desirable: Tensor,
    target_dist: Tensor,
}

impl Batch {
    fn new(prep: &Prepared, rows: &[Row]) -> Result<Self> {
        let seqs: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                [
                    prep.prompts[r.prompt].0.clone(),
                    vec![prep.steer_ids[r.value]],
                    r.response.clone(),
                ]
                .concat()
            })
            .collect();
        let t = seqs.iter().map(|s| s.len() - 1).max().unwrap_or(1);
        let plens: Vec<usize> = rows
            .iter()
            .map(|r| prep.prompts[r.prompt].0.len())
            .collect();
        let from = plens.iter().min().map_or(0, |p| p - 1);
        let (mut ids, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for (seq, &plen) in seqs.iter().zip(&plens) {
            for j in 0..t {
                let inside = j + 1 < seq.len();
                ids.push(if j < seq.len() { seq[j] } else { 0 });
                if j >= from {
                    targets.push(if inside { seq[j + 1] } else { 0 });
                    mask.push(if inside && j + 1 >= plen { 1f32 } else { 0.0 });
                }
            }
        }
        let steer_pos = plens.iter().map(|p| p - 1 - from).collect();
        let b = rows.len();
        let dist: Vec<f32> = rows
            .iter()
            .flat_map(|r| prep.prompts[r.prompt].1.iter().map(|&p| p as f32))
            .collect();
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), &Device::Cpu)?,
            targets: Tensor::from_vec(targets, (b, t - from), &Device::Cpu)?,
            mask: Tensor::from_vec(mask, (b, t - from), &Device::Cpu)?,
            from,
            steer_pos,
            desirable: Tensor::from_vec(
                rows.iter()
                    .map(|r| if r.desirable { 1f32 } else { 0.0 })
                    .collect::<Vec<_>>(),
                b,
                &Device::Cpu,
            )?,
            target_dist: Tensor::from_vec(dist, (b, prep.steer_ids.len()), &Device::Cpu)?,
        })
    }
}

/// log p of each steering token at each row's steering position, under the
/// softmax over the whole vocabulary (not renormalized): (b, K).
fn steering_logprobs(logits: &Tensor, batch: &Batch, steer_ids: &[u32]) -> Result<Tensor> {
    let rows = batch
        .steer_pos
        .iter()
        .enumerate()
        .map(|(i, &p)| Ok(logits.narrow(0, i, 1)?.narrow(1, p, 1)?.squeeze(1)?))
        .collect::<Result<Vec<_>>>()?;
    let at = Tensor::cat(&rows, 0)?;
    let logp = candle_nn::ops::log_softmax(&at, D::Minus1)?;
    Ok(logp.index_select(&Tensor::new(steer_ids, &Device::Cpu)?, 1)?)
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

/// The adapter's tensors, named as adapter.safetensors wants them.
fn export(tr: &Trainable, tied: bool) -> Result<HashMap<String, Tensor>> {
    let mut t = HashMap::new();
    t.insert(
        "steering.embed".to_string(),
        tr.steer_embed.as_tensor().to_dtype(DType::F32)?,
    );
    if !tied {
        if let Some(h) = &tr.steer_head {
            t.insert(
                "steering.head".to_string(),
                h.as_tensor().to_dtype(DType::F32)?,
            );
        }
    }
    for (l, row) in tr.lora.iter().enumerate() {
        for kind in ProjKind::ALL {
            if let Some(lv) = &row[kind.index()] {
                t.insert(
                    lora_tensor_name(l, kind, "a"),
                    lv.a.as_tensor().to_dtype(DType::F32)?,
                );
                t.insert(
                    lora_tensor_name(l, kind, "b"),
                    lv.b.as_tensor().to_dtype(DType::F32)?,
                );
            }
        }
    }
    Ok(t)
}

/// Writes the adapter into `dir/<name>/` atomically: everything goes to a
/// temporary folder first, which then replaces the old one by renames, so
/// a crash at any point leaves either the old adapter or the new one.
pub fn write_adapter(
    dir: &std::path::Path,
    name: &str,
    trained: &Trained,
) -> Result<std::path::PathBuf> {
    crate::steering::registry::check_name(name)?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    std::fs::write(
        tmp.join(CONFIG_FILE),
        serde_json::to_string_pretty(&trained.config)?,
    )?;
    candle_core::safetensors::save(&trained.tensors, tmp.join(WEIGHTS_FILE))?;
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    let dest = dir.join(name);
    keep_other_files(&dest, &tmp)?;
    let old = dir.join(format!(".{name}.old-{}", std::process::id()));
    if dest.exists() {
        std::fs::rename(&dest, &old)?;
    }
    std::fs::rename(&tmp, &dest)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(dest)
}

/// Copies the files of an adapter folder that are not the adapter itself
/// (its README, training data) into the replacement, so retraining in place
/// keeps them.
fn keep_other_files(dest: &std::path::Path, tmp: &std::path::Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dest) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let own = name == CONFIG_FILE || name == WEIGHTS_FILE;
        if !own && entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), tmp.join(&name))?;
        }
    }
    Ok(())
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
