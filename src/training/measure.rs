//! What a trained adapter does, measured on the model as it is served (the
//! same weights, quantized or not, and the same forward with a KV cache as
//! the engine): the prior on held-out prompts against the target, and
//! whether greedy answers show the drawn value.

use super::trainer::Prepared;
use crate::model::{Logits, Model, Segment};
use crate::steering::adapter::AdapterWeights;
use crate::steering::detect::Detector;
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use candle_core::Tensor;

/// The prompts measured: the held-out ones, else the training prompts.
fn prompts(prep: &Prepared) -> &[(Vec<u32>, Vec<f64>)] {
    if prep.held_out.is_empty() {
        &prep.prompts
    } else {
        &prep.held_out
    }
}

/// One forward step of one sequence; returns the last row's logits.
fn step(
    model: &Model,
    w: &AdapterWeights,
    cache: &mut crate::model::KvCache,
    embeds: Tensor,
    with_steering_logits: bool,
) -> Result<Vec<f32>> {
    let out = model.forward(&mut [Segment {
        embeds,
        cache,
        lora: w.lora.as_ref(),
        extra_head: with_steering_logits.then_some(&w.head),
        logits: Logits::Last,
    }])?;
    Ok(out[0].flatten_all()?.to_vec1()?)
}

/// The prior over values at each measured prompt: mean MAE and mean KL
/// against the prompts' targets.
pub(super) fn held_out_mae(
    model: &Model,
    w: &AdapterWeights,
    prep: &Prepared,
) -> Result<(f64, f64)> {
    let k = prep.steer_ids.len();
    let (mut mae, mut kl) = (0.0, 0.0);
    for (ids, target) in prompts(prep) {
        let mut cache = model.new_cache();
        let row = step(model, w, &mut cache, model.embed_tokens(ids)?, true)?;
        let steer: Vec<f64> = row[row.len() - k..].iter().map(|&x| x as f64).collect();
        let max = steer.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exp: Vec<f64> = steer.iter().map(|x| (x - max).exp()).collect();
        let sum: f64 = exp.iter().sum();
        let prior: Vec<f64> = exp.iter().map(|e| e / sum).collect();
        mae += crate::monitor::stats::mae(target, &prior);
        kl += crate::monitor::stats::kl(target, &prior);
    }
    let n = prompts(prep).len().max(1) as f64;
    Ok((mae / n, kl / n))
}

/// For each value: the share of greedy answers (steering token placed after
/// each of the first 8 measured prompts) in which the detector finds it.
pub(super) fn greedy_consistency(
    model: &Model,
    w: &AdapterWeights,
    prep: &Prepared,
    tok: &Tokenizer,
    detector: &Detector,
    names: &[String],
    max_new: usize,
) -> Result<serde_json::Value> {
    if max_new == 0 {
        return Ok(serde_json::Value::Null);
    }
    let vocab = model.config.vocab_size;
    let measured = &prompts(prep)[..prompts(prep).len().min(8)];
    let mut per_value = serde_json::Map::new();
    let (mut agree, mut total) = (0usize, 0usize);
    for (value, name) in names.iter().enumerate() {
        let mut hits = 0;
        for (ids, _) in measured {
            let mut cache = model.new_cache();
            let mut embeds =
                Tensor::cat(&[model.embed_tokens(ids)?, w.embed.narrow(0, value, 1)?], 0)?;
            let mut answer = Vec::new();
            for _ in 0..max_new {
                if cache.len() + embeds.dim(0)? > model.max_positions() {
                    break;
                }
                let row = step(model, w, &mut cache, embeds, false)?;
                let next = crate::engine::sampling::argmax(&row[..vocab]);
                if tok.eos.contains(&next) {
                    break;
                }
                answer.push(next);
                embeds = model.embed_tokens(&[next])?;
            }
            if detector.detect(&tok.decode(&answer)?) == crate::steering::Detected::Value(value) {
                hits += 1;
            }
        }
        agree += hits;
        total += measured.len();
        per_value.insert(
            name.clone(),
            serde_json::json!(hits as f64 / measured.len().max(1) as f64),
        );
    }
    Ok(serde_json::json!({"overall": agree as f64 / total.max(1) as f64, "per_value": per_value}))
}
