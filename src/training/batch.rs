//! Training data as tensors: prompts and responses tokenized once, rows
//! sampled per step (desirable, and in stage 2 undesirable), and padded
//! batches whose targets start at the first steering position.

use super::data::TrainingData;
use crate::steering::adapter::AdapterConfig;
use crate::tokenizer::Tokenizer;
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor, D};
use rand::rngs::StdRng;
use rand::Rng;

/// One training row: prompt, the value whose token is placed, the response.
pub(super) struct Row {
    pub(super) prompt: usize,
    pub(super) value: usize,
    pub(super) response: Vec<u32>,
    pub(super) desirable: bool,
}

pub(super) struct Prepared {
    /// (formatted prompt ids, target) per prompt.
    pub(super) prompts: Vec<(Vec<u32>, Vec<f64>)>,
    pub(super) held_out: Vec<(Vec<u32>, Vec<f64>)>,
    /// responses[value] = tokenized responses (with end-of-sequence).
    pub(super) responses: Vec<Vec<Vec<u32>>>,
    pub(super) steer_ids: Vec<u32>,
}

pub(super) fn prepare(
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

/// A batch of rows: desirable ones (value v, a response showing v); in
/// stage 2 half are undesirable (value v, a response showing another value).
pub(super) fn sample_rows(
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
pub(super) struct Batch {
    pub(super) ids: Tensor,
    pub(super) targets: Tensor,
    pub(super) mask: Tensor,
    /// First position whose logits are needed (the earliest steering
    /// position); `targets`, `mask` and `steer_pos` count from it.
    pub(super) from: usize,
    /// Position whose logits predict the steering token, per row.
    pub(super) steer_pos: Vec<usize>,
    pub(super) desirable: Tensor,
    pub(super) target_dist: Tensor,
}

impl Batch {
    pub(super) fn new(prep: &Prepared, rows: &[Row]) -> Result<Self> {
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
pub(super) fn steering_logprobs(
    logits: &Tensor,
    batch: &Batch,
    steer_ids: &[u32],
) -> Result<Tensor> {
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
