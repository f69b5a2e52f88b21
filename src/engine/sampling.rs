//! Turning logits into the next token: logit bias, penalties, temperature,
//! top-k, top-p, min-p, a per-sequence seeded RNG, and log-probabilities.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 0 = off. Keeps tokens with p ≥ min_p · p_max.
    pub min_p: f32,
    /// 1 = off. Divides positive logits (multiplies negative ones) of every
    /// token seen in the prompt or output, as Hugging Face and vLLM do.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated (OpenAI).
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a token already generated (OpenAI).
    pub frequency_penalty: f32,
    /// Added to logits before anything else; −100 bans a token.
    pub logit_bias: Vec<(u32, f32)>,
    /// Same seed, same prompt, same output, whatever else is batched.
    pub seed: Option<u64>,
    /// Top-N alternatives to report with each sampled token (None = no logprobs).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// A token's log-probability and the top alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// Most likely tokens first.
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Occurrences of each generated token.
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt and output (for the repetition penalty).
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            rng,
            generated: HashMap::new(),
            seen: if params.repetition_penalty != 1.0 {
                prompt.iter().copied().collect()
            } else {
                Default::default()
            },
            params,
        }
    }

    /// Applies bias and penalties in place: what the sampler and the reported
    /// log-probabilities both see.
    fn adjust(&self, logits: &mut [f32]) {
        for &(tok, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(tok as usize) {
                *l += bias;
            }
        }
        let rp = self.params.repetition_penalty;
        if rp != 1.0 {
            for &tok in &self.seen {
                if let Some(l) = logits.get_mut(tok as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        let (pp, fp) = (self.params.presence_penalty, self.params.frequency_penalty);
        if pp != 0.0 || fp != 0.0 {
            for (&tok, &count) in &self.generated {
                if let Some(l) = logits.get_mut(tok as usize) {
                    *l -= pp + fp * count as f32;
                }
            }
        }
    }

    /// Picks the next token from `logits` (modified in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> (u32, Option<TokenLogprob>) {
        self.adjust(logits);
        let token = if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        let logprob = self.params.logprobs.map(|n| logprob_of(logits, token, n));
        self.observe(token);
        (token, logprob)
    }

    fn observe(&mut self, token: u32) {
        *self.generated.entry(token).or_default() += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let t = self.params.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .filter(|&(_, p)| p > 0.0)
            .collect();
        let k = self.params.top_k;
        if k > 0 && k < probs.len() {
            probs.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            probs.truncate(k);
        }
        if self.params.min_p > 0.0 {
            // The largest weight is exp(0) = 1 before normalization.
            let floor = self.params.min_p * probs.iter().fold(0f32, |m, p| m.max(p.1));
            probs.retain(|p| p.1 >= floor);
        }
        if self.params.top_p < 1.0 {
            probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let total: f32 = probs.iter().map(|p| p.1).sum();
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p.1 / total;
                if cum >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        let total: f64 = probs.iter().map(|p| p.1 as f64).sum();
        let mut u = self.rng.random::<f64>() * total;
        for &(tok, p) in &probs {
            u -= p as f64;
            if u < 0.0 {
                return tok;
            }
        }
        probs.last().map(|p| p.0).unwrap_or(0)
    }
}

/// A seed for stream `stream` of a request seeded with `seed` (splitmix64
/// of both), so choices and draws of nearby seeds never share a stream.
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    splitmix(seed ^ splitmix(stream))
}

/// Probabilities (f64) from logits: the steering prior over K values.
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Index of the largest logit (the lowest id among ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Index of the largest probability.
pub fn argmax_f64(p: &[f64]) -> usize {
    (0..p.len())
        .max_by(|&a, &b| p[a].total_cmp(&p[b]))
        .unwrap_or(0)
}

/// log-softmax over `logits`, reported for `token` plus the top `n`.
pub fn logprob_of(logits: &[f32], token: u32, n: usize) -> TokenLogprob {
    let lse = log_sum_exp(logits);
    let mut top: Vec<(u32, f32)> = Vec::new();
    if n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let n = n.min(idx.len());
        idx.select_nth_unstable_by(n - 1, |&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        idx.truncate(n);
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        top = idx
            .into_iter()
            .map(|i| (i, logits[i as usize] - lse))
            .collect();
    }
    TokenLogprob {
        token,
        logprob: logits[token as usize] - lse,
        top,
    }
}

pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(
            SamplingParams {
                seed: Some(1),
                ..params
            },
            &[],
        );
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            let (t, _) = s.sample(&mut logits.to_vec());
            c[t as usize] += 1;
            s.generated.clear();
        }
        c
    }

    const LOGITS: [f32; 4] = [2.0, 1.0, 0.5, -1.0];

    fn softmax(l: &[f32], t: f32) -> Vec<f64> {
        let e: Vec<f64> = l.iter().map(|x| ((x / t) as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    /// Pearson chi-square statistic of observed counts against probabilities.
    fn chi2(counts: &[usize], probs: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .map(|(&c, &p)| (c as f64 - n as f64 * p).powi(2) / (n as f64 * p))
            .sum()
    }

    #[test]
    fn temperature_one_matches_softmax() {
        let c = counts(SamplingParams::default(), &LOGITS, 20_000);
        // 3 degrees of freedom: p < 0.001 above 16.27.
        assert!(chi2(&c, &softmax(&LOGITS, 1.0)) < 16.27, "{c:?}");
    }

    #[test]
    fn lower_temperature_sharpens() {
        let hot = counts(
            SamplingParams {
                temperature: 2.0,
                ..Default::default()
            },
            &LOGITS,
            10_000,
        );
        let cold = counts(
            SamplingParams {
                temperature: 0.3,
                ..Default::default()
            },
            &LOGITS,
            10_000,
        );
        assert!(chi2(&cold, &softmax(&LOGITS, 0.3)) < 16.27, "{cold:?}");
        assert!(
            cold[0] > 9_000 && hot[0] < 6_000,
            "cold {cold:?} hot {hot:?}"
        );
    }

    #[test]
    fn greedy_takes_argmax() {
        assert_eq!(
            counts(SamplingParams::greedy(), &LOGITS, 50),
            vec![50, 0, 0, 0]
        );
    }

    #[test]
    fn top_k_and_top_p_mask() {
        let k2 = counts(
            SamplingParams {
                top_k: 2,
                ..Default::default()
            },
            &LOGITS,
            5_000,
        );
        assert_eq!((k2[2], k2[3]), (0, 0));
        assert!(k2[1] > 1_000, "{k2:?}");
        // softmax(LOGITS) ≈ [0.61, 0.22, 0.14, 0.03]: top_p 0.8 keeps the first two.
        let p = counts(
            SamplingParams {
                top_p: 0.8,
                ..Default::default()
            },
            &LOGITS,
            5_000,
        );
        assert_eq!((p[2], p[3]), (0, 0), "{p:?}");
        let m = counts(
            SamplingParams {
                min_p: 0.3,
                ..Default::default()
            },
            &LOGITS,
            5_000,
        );
        assert_eq!((m[2], m[3]), (0, 0), "{m:?}");
    }

    #[test]
    fn logit_bias_bans_and_forces() {
        let banned = counts(
            SamplingParams {
                logit_bias: vec![(0, -100.0)],
                ..Default::default()
            },
            &LOGITS,
            5_000,
        );
        assert_eq!(banned[0], 0);
        let forced = counts(
            SamplingParams {
                logit_bias: vec![(3, 100.0)],
                ..Default::default()
            },
            &LOGITS,
            500,
        );
        assert_eq!(forced[3], 500);
    }

    #[test]
    fn penalties_spread_repeated_tokens() {
        let run = |params: SamplingParams| {
            let mut s = Sampler::new(
                SamplingParams {
                    seed: Some(3),
                    ..params
                },
                &[],
            );
            let mut c = [0usize; 4];
            for _ in 0..200 {
                c[s.sample(&mut LOGITS.to_vec()).0 as usize] += 1;
            }
            c
        };
        let plain = run(SamplingParams::greedy());
        assert_eq!(plain[0], 200);
        let freq = run(SamplingParams {
            frequency_penalty: 0.5,
            ..SamplingParams::greedy()
        });
        assert!(freq[0] < 100 && freq[3] > 10, "{freq:?}");
        let presence = run(SamplingParams {
            presence_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert!(presence[0] < 200 && presence[1] > 0, "{presence:?}");
        let rep = run(SamplingParams {
            repetition_penalty: 3.0,
            temperature: 1.0,
            ..Default::default()
        });
        let plain_t = run(SamplingParams::default());
        assert!(rep[0] < plain_t[0], "{rep:?} vs {plain_t:?}");
    }

    #[test]
    fn same_seed_same_draws() {
        let a = counts(
            SamplingParams {
                seed: Some(9),
                ..Default::default()
            },
            &LOGITS,
            100,
        );
        let b = counts(
            SamplingParams {
                seed: Some(9),
                ..Default::default()
            },
            &LOGITS,
            100,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn logprobs_are_normalized_and_sorted() {
        let lp = logprob_of(&LOGITS, 1, 3);
        let p = softmax(&LOGITS, 1.0);
        assert!((lp.logprob as f64 - p[1].ln()).abs() < 1e-5);
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!((lp.top[0].1 as f64 - p[0].ln()).abs() < 1e-5);
    }
}
