//! What a trained adapter does, measured on held-out prompts: the prior
//! against the target, and whether greedy answers show the drawn value.

use super::model::{forward, FrozenBase, Trainable};
use super::trainer::Prepared;
use crate::steering::detect::Detector;
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// The prior over values at each held-out prompt (training prompts when
/// none are held out): mean MAE and mean KL against the prompts' targets.
pub(super) fn held_out_mae(
    base: &FrozenBase,
    tr: &Trainable,
    prep: &Prepared,
) -> Result<(f64, f64)> {
    let prompts = if prep.held_out.is_empty() {
        &prep.prompts
    } else {
        &prep.held_out
    };
    let k = prep.steer_ids.len();
    let (mut mae, mut kl) = (0.0, 0.0);
    for (ids, target) in prompts {
        let logits = forward(
            base,
            tr,
            &Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
            false,
        )?;
        let last = logits.narrow(1, ids.len() - 1, 1)?.flatten_all()?;
        let steer = last.narrow(0, last.dim(0)? - k, k)?;
        let prior: Vec<f64> = candle_nn::ops::softmax(&steer, 0)?
            .to_dtype(DType::F64)?
            .to_vec1()?;
        mae += crate::monitor::stats::mae(target, &prior);
        kl += crate::monitor::stats::kl(target, &prior);
    }
    let n = prompts.len().max(1) as f64;
    Ok((mae / n, kl / n))
}

/// For each value: the share of greedy answers (steering token placed after
/// each held-out prompt) in which the detector finds that value.
pub(super) fn greedy_consistency(
    base: &FrozenBase,
    tr: &Trainable,
    prep: &Prepared,
    tok: &Tokenizer,
    detector: &Detector,
    names: &[String],
    max_new: usize,
) -> Result<serde_json::Value> {
    if max_new == 0 {
        return Ok(serde_json::Value::Null);
    }
    let prompts = if prep.held_out.is_empty() {
        &prep.prompts
    } else {
        &prep.held_out
    };
    let vocab = prep.steer_ids[0] as usize;
    let mut per_value = serde_json::Map::new();
    let (mut agree, mut total) = (0usize, 0usize);
    for (value, &steer) in prep.steer_ids.iter().enumerate() {
        let mut hits = 0;
        for (ids, _) in prompts.iter().take(8) {
            let mut seq = [ids.clone(), vec![steer]].concat();
            let mut answer = Vec::new();
            for _ in 0..max_new {
                if seq.len() >= base_len(base) {
                    break;
                }
                let logits = forward(
                    base,
                    tr,
                    &Tensor::new(seq.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
                    false,
                )?;
                let last: Vec<f32> = logits
                    .narrow(1, seq.len() - 1, 1)?
                    .flatten_all()?
                    .narrow(0, 0, vocab)?
                    .to_vec1()?;
                let next = crate::engine::sampling::argmax(&last);
                if tok.eos.contains(&next) {
                    break;
                }
                seq.push(next);
                answer.push(next);
            }
            let text = tok.decode(&answer)?;
            if detector.detect(&text) == crate::steering::Detected::Value(value) {
                hits += 1;
            }
            total += 1;
        }
        agree += hits;
        per_value.insert(
            names[value].clone(),
            serde_json::json!(hits as f64 / prompts.len().min(8).max(1) as f64),
        );
    }
    Ok(serde_json::json!({"overall": agree as f64 / total.max(1) as f64, "per_value": per_value}))
}

fn base_len(base: &FrozenBase) -> usize {
    base.max_len()
}
