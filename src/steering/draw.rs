//! The draw: which attribute value a round gets, under each policy.

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// v ~ the adapter's calibrated prior (the paper's method).
    #[default]
    Prior,
    /// v ~ the target for the request's context.
    Target,
    /// A deterministic schedule that keeps counts within one of n·target.
    Balanced,
    /// No steering token and no adapter: the base model.
    Off,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Prior => "prior",
            Policy::Target => "target",
            Policy::Balanced => "balanced",
            Policy::Off => "off",
        }
    }
}

/// Samples an index from probabilities (they need not sum exactly to 1).
pub fn sample(probs: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, &p) in probs.iter().enumerate() {
        u -= p;
        if u < 0.0 {
            return i;
        }
    }
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0)
}

/// Tijdeman's solution of the chairman assignment problem: at round
/// t = n + 1, values with count + 1 − t·target ≤ 1 − a (a = 1/(2K−2)) are
/// eligible; the one with the smallest (count + 1 − a)/target wins (ties at
/// random). Then |count − t·target| ≤ 1 − a for every value at every t,
/// whatever the model does. Values with target 0 are never chosen.
pub fn balanced_choice(counts: &[u64], target: &[f64], rng: &mut StdRng) -> usize {
    let k = target.iter().filter(|&&p| p > 0.0).count();
    if k <= 1 {
        return target.iter().position(|&p| p > 0.0).unwrap_or(0);
    }
    let a = 1.0 / (2.0 * k as f64 - 2.0);
    let t = counts.iter().sum::<u64>() as f64 + 1.0;
    const EPS: f64 = 1e-9;
    let mut best: Vec<usize> = Vec::new();
    let mut best_key = f64::INFINITY;
    for (i, (&c, &p)) in counts.iter().zip(target).enumerate() {
        if p <= 0.0 || c as f64 + 1.0 - t * p > 1.0 - a + EPS {
            continue;
        }
        let key = (c as f64 + 1.0 - a) / p;
        if key < best_key - EPS {
            best_key = key;
            best = vec![i];
        } else if (key - best_key).abs() <= EPS {
            best.push(i);
        }
    }
    if best.is_empty() {
        // Unreachable by the theorem; the largest deficit is the safe fallback.
        return (0..target.len())
            .filter(|&i| target[i] > 0.0)
            .max_by(|&i, &j| {
                (t * target[i] - counts[i] as f64).total_cmp(&(t * target[j] - counts[j] as f64))
            })
            .unwrap_or(0);
    }
    best[rng.random_range(0..best.len())]
}

/// Cumulative counts per (adapter, context) for the balanced policy, since
/// load or reset.
#[derive(Debug, Default)]
pub struct BalancedCounts {
    counts: Mutex<HashMap<(String, String), Vec<u64>>>,
}

impl BalancedCounts {
    /// Chooses the next value and counts it, atomically.
    pub fn next(&self, adapter: &str, context: &str, target: &[f64], rng: &mut StdRng) -> usize {
        let mut all = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let counts = all
            .entry((adapter.to_string(), context.to_string()))
            .or_insert_with(|| vec![0; target.len()]);
        if counts.len() != target.len() {
            *counts = vec![0; target.len()];
        }
        let v = balanced_choice(counts, target, rng);
        counts[v] += 1;
        v
    }

    /// Replaces the counts of (adapter, context), e.g. with the fleet's.
    pub fn set(&self, adapter: &str, context: &str, counts: Vec<u64>) {
        let mut all = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        all.insert((adapter.to_string(), context.to_string()), counts);
    }

    pub fn reset(&self, adapter: Option<&str>) {
        let mut all = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match adapter {
            Some(a) => all.retain(|(name, _), _| name != a),
            None => all.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn random_target(k: usize, rng: &mut StdRng) -> Vec<f64> {
        let raw: Vec<f64> = (0..k).map(|_| rng.random::<f64>() + 0.01).collect();
        let s: f64 = raw.iter().sum();
        raw.iter().map(|x| x / s).collect()
    }

    /// The guarantee: within 1 − 1/(2K−2) (so within 1) of t·target at every
    /// step, for random targets with K = 2, 3, 5, and with a zero target.
    #[test]
    fn balanced_stays_within_one_of_the_target_at_every_step() {
        let mut rng = StdRng::seed_from_u64(11);
        for k in [2usize, 3, 5] {
            for trial in 0..20 {
                let mut target = random_target(k, &mut rng);
                if trial == 0 && k > 2 {
                    target[0] = 0.0;
                    let s: f64 = target.iter().sum();
                    target.iter_mut().for_each(|x| *x /= s);
                }
                let bound = 1.0 - 1.0 / (2.0 * k as f64 - 2.0);
                let mut counts = vec![0u64; k];
                for t in 1..=2000u64 {
                    let v = balanced_choice(&counts, &target, &mut rng);
                    counts[v] += 1;
                    for i in 0..k {
                        let dev = (counts[i] as f64 - t as f64 * target[i]).abs();
                        assert!(
                            dev <= bound + 1e-9,
                            "K={k} t={t} value {i}: |{} - {}| = {dev}",
                            counts[i],
                            t as f64 * target[i]
                        );
                        assert!(dev < 1.0);
                    }
                }
                if target[0] == 0.0 {
                    assert_eq!(counts[0], 0);
                }
            }
        }
    }

    #[test]
    fn sampling_follows_the_probabilities() {
        let mut rng = StdRng::seed_from_u64(5);
        let p = [0.7, 0.2, 0.1];
        let mut c = [0usize; 3];
        for _ in 0..20_000 {
            c[sample(&p, &mut rng)] += 1;
        }
        for i in 0..3 {
            assert!((c[i] as f64 / 20_000.0 - p[i]).abs() < 0.015, "{c:?}");
        }
    }
}
