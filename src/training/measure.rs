//! What a trained adapter does, measured on the model as it is served (the
//! same weights, quantized or not, and the same forward with a KV cache as
//! the engine): the prior on held-out prompts against the target, and
//! whether greedy answers show the drawn value.

use super::batch::Prepared;
use crate::engine::sampling::{argmax, softmax};
use crate::model::{KvCache, Logits, Model, Segment};
use crate::steering::adapter::{AdapterConfig, AdapterWeights};
use crate::steering::detect::Detector;
use crate::steering::Detected;
use crate::tokenizer::Tokenizer;
use anyhow::Result;
use candle_core::Tensor;

/// What is measured and on what: everything but the adapter's weights.
pub(super) struct Measurement<'a> {
    pub(super) model: &'a Model,
    pub(super) prep: &'a Prepared,
    pub(super) tok: &'a Tokenizer,
    pub(super) detector: &'a Detector,
    pub(super) names: &'a [String],
    /// Greedy tokens per answer for consistency (0 skips it).
    pub(super) max_new: usize,
}

/// What a measurement found.
pub(super) struct Measured {
    /// Mean MAE and KL of the prior against the targets.
    pub(super) mae: f64,
    pub(super) kl: f64,
    /// The MAE of the softmax of the same logits, without the calibration.
    pub(super) uncalibrated_mae: f64,
    /// Per value and overall (null when no tokens were asked for).
    pub(super) consistency: serde_json::Value,
}

impl Measurement<'_> {
    /// `config` gives the prior's calibration, if any.
    pub(super) fn run(&self, w: &AdapterWeights, config: &AdapterConfig) -> Result<Measured> {
        let logits = self.steering_logits(w, self.prompts())?;
        let (mae, kl) = self.prior_error(&logits, |z| config.prior(z));
        let (uncalibrated_mae, _) = self.prior_error(&logits, softmax);
        Ok(Measured {
            mae,
            kl,
            uncalibrated_mae,
            consistency: self.greedy_consistency(w)?,
        })
    }

    /// The prompts measured: the held-out ones, else the training prompts.
    fn prompts(&self) -> &[(Vec<u32>, Vec<f64>)] {
        if self.prep.held_out.is_empty() {
            &self.prep.prompts
        } else {
            &self.prep.held_out
        }
    }

    /// One forward step of one sequence: the last row's logits over the
    /// vocabulary, or with `steering`, against the steering tokens only.
    fn step(
        &self,
        w: &AdapterWeights,
        cache: &mut KvCache,
        embeds: Tensor,
        steering: bool,
    ) -> Result<Vec<f32>> {
        let mut out = self.model.forward(&mut [Segment {
            embeds,
            cache,
            lora: w.lora.as_ref(),
            extra_head: steering.then_some(&w.head),
            logits: if steering { Logits::None } else { Logits::Last },
            branches: None,
        }])?;
        let out = out.remove(0);
        match out.extra {
            Some(extra) => Ok(extra),
            None => Ok(out.rows.flatten_all()?.to_vec1()?),
        }
    }

    /// Mean MAE and mean KL against the measured prompts' targets of the
    /// prior that `prior` makes from each prompt's steering logits.
    fn prior_error(&self, logits: &[Vec<f32>], prior: impl Fn(&[f32]) -> Vec<f64>) -> (f64, f64) {
        let (mut mae, mut kl) = (0.0, 0.0);
        for (z, (_, target)) in logits.iter().zip(self.prompts()) {
            let prior = prior(z);
            mae += crate::monitor::stats::mae(target, &prior);
            kl += crate::monitor::stats::kl(target, &prior);
        }
        let n = self.prompts().len().max(1) as f64;
        (mae / n, kl / n)
    }

    /// The K steering logits at the end of each prompt.
    pub(super) fn steering_logits(
        &self,
        w: &AdapterWeights,
        prompts: &[(Vec<u32>, Vec<f64>)],
    ) -> Result<Vec<Vec<f32>>> {
        let model = self.model;
        prompts
            .iter()
            .map(|(ids, _)| {
                let mut cache = model.new_cache();
                self.step(w, &mut cache, model.embed_tokens(ids)?, true)
            })
            .collect()
    }

    /// For each value: the share of greedy answers (steering token placed
    /// after each of the first 8 measured prompts) that show it.
    fn greedy_consistency(&self, w: &AdapterWeights) -> Result<serde_json::Value> {
        if self.max_new == 0 {
            return Ok(serde_json::Value::Null);
        }
        let measured = &self.prompts()[..self.prompts().len().min(8)];
        let mut per_value = serde_json::Map::new();
        let mut agree = 0;
        for (value, name) in self.names.iter().enumerate() {
            let mut hits = 0;
            for (ids, _) in measured {
                let answer = self.greedy_answer(w, ids, value)?;
                if self.detector.detect(&self.tok.decode(&answer)?) == Detected::Value(value) {
                    hits += 1;
                }
            }
            agree += hits;
            let share = hits as f64 / measured.len().max(1) as f64;
            per_value.insert(name.clone(), serde_json::json!(share));
        }
        let overall = agree as f64 / (measured.len() * self.names.len()).max(1) as f64;
        Ok(serde_json::json!({"overall": overall, "per_value": per_value}))
    }

    /// Greedy tokens after the prompt and value's steering token.
    fn greedy_answer(&self, w: &AdapterWeights, ids: &[u32], value: usize) -> Result<Vec<u32>> {
        let model = self.model;
        let mut cache = model.new_cache();
        let mut embeds = Tensor::cat(&[model.embed_tokens(ids)?, w.embed.narrow(0, value, 1)?], 0)?;
        let mut answer = Vec::new();
        for _ in 0..self.max_new {
            if cache.len() + embeds.dim(0)? > model.max_positions() {
                break;
            }
            let row = self.step(w, &mut cache, embeds, false)?;
            let next = argmax(&row);
            if self.tok.eos.contains(&next) {
                break;
            }
            answer.push(next);
            embeds = model.embed_tokens(&[next])?;
        }
        Ok(answer)
    }
}
