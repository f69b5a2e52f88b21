//! The report's figures for one window of rounds.

use super::stats;
use super::{MonitorConfig, Round};
use crate::steering::{AdapterConfig, Detected};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// The last N rounds.
    Count,
    /// The rounds of the last T seconds.
    Time,
}

impl WindowKind {
    /// The kinds a report asks for: one, or (None) both.
    pub fn selected(window: Option<WindowKind>) -> Vec<WindowKind> {
        match window {
            Some(k) => vec![k],
            None => vec![WindowKind::Count, WindowKind::Time],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Warn,
    Alert,
    InsufficientData,
}

impl Status {
    /// Gauge value: 0 ok, 1 warn, 2 alert, −1 insufficient data.
    pub fn code(self) -> f64 {
        match self {
            Status::Ok => 0.0,
            Status::Warn => 1.0,
            Status::Alert => 2.0,
            Status::InsufficientData => -1.0,
        }
    }
}

/// A proportion with its Wilson 95% interval.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Proportion {
    pub count: u64,
    pub p: f64,
    pub low: f64,
    pub high: f64,
}

/// How far an observed distribution is from the target.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Divergence {
    /// Mean absolute error over values.
    pub mae: f64,
    /// KL(target ‖ observed), ε = 1e-10, natural log.
    pub kl: f64,
    pub total_variation: f64,
    pub js_distance: f64,
    pub chi_square: f64,
    pub chi_square_df: usize,
    pub chi_square_p: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WindowReport {
    pub window: WindowKind,
    /// Rounds in the window.
    pub n: u64,
    /// The target, averaged over the rounds' contexts.
    pub target: BTreeMap<String, f64>,
    /// Values drawn (steering tokens), with proportions of n.
    pub drawn: BTreeMap<String, Proportion>,
    /// Values detected in the text, with proportions of the rounds that showed one.
    pub detected: BTreeMap<String, Proportion>,
    /// Rounds whose text showed no value, or several.
    pub detected_none: u64,
    pub detected_ambiguous: u64,
    /// Share of rounds with a detected value where it equals the drawn one.
    pub consistency: Option<f64>,
    /// Served (detected) distribution against the target.
    pub detected_metrics: Divergence,
    /// Drawn distribution against the target.
    pub drawn_metrics: Divergence,
    pub status: Status,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterReport {
    pub adapter: String,
    pub attribute: String,
    pub values: Vec<String>,
    /// Over all contexts: one entry per window kind.
    pub aggregate: Vec<WindowReport>,
    /// Per context: one entry per window kind.
    pub contexts: BTreeMap<String, Vec<WindowReport>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Report {
    pub generated_at: u64,
    pub window_rounds: usize,
    pub window_seconds: u64,
    /// Whose rounds: `memory` (this server's), `redis` (the fleet's), or
    /// `degraded` (this replica's only, while Redis is unreachable).
    pub state: String,
    /// With `--state redis://…`: the replicas seen and what is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetStatus>,
    pub adapters: Vec<AdapterReport>,
}

fn divergence(counts: &[u64], target: &[f64]) -> Divergence {
    let n: u64 = counts.iter().sum();
    let observed: Vec<f64> = counts
        .iter()
        .map(|&c| if n > 0 { c as f64 / n as f64 } else { 0.0 })
        .collect();
    let (chi_square, chi_square_df, chi_square_p) = stats::chi_square(counts, target);
    Divergence {
        mae: stats::mae(target, &observed),
        kl: stats::kl(target, &observed),
        total_variation: stats::total_variation(target, &observed),
        js_distance: stats::js_distance(target, &observed),
        chi_square,
        chi_square_df,
        chi_square_p,
    }
}

fn proportions(names: &[String], counts: &[u64]) -> BTreeMap<String, Proportion> {
    let n: u64 = counts.iter().sum();
    names
        .iter()
        .zip(counts)
        .map(|(name, &c)| {
            let (low, high) = stats::wilson(c, n, 1.96);
            let p = if n > 0 { c as f64 / n as f64 } else { 0.0 };
            (
                name.clone(),
                Proportion {
                    count: c,
                    p,
                    low,
                    high,
                },
            )
        })
        .collect()
}

pub fn summarize(
    cfg: &AdapterConfig,
    rounds: &[&Round],
    window: WindowKind,
    mc: &MonitorConfig,
) -> WindowReport {
    let names = cfg.value_names();
    let k = names.len();
    let mut drawn = vec![0u64; k];
    let mut detected = vec![0u64; k];
    let (mut none, mut ambiguous, mut agree) = (0u64, 0u64, 0u64);
    let mut target = vec![0.0; k];
    for r in rounds {
        drawn[r.drawn] += 1;
        for (t, p) in target.iter_mut().zip(cfg.target(&r.context)) {
            *t += p;
        }
        match r.detected {
            Detected::Value(v) => {
                detected[v] += 1;
                agree += u64::from(v == r.drawn);
            }
            Detected::None => none += 1,
            Detected::Ambiguous => ambiguous += 1,
        }
    }
    let n = rounds.len() as u64;
    if n > 0 {
        target.iter_mut().for_each(|t| *t /= n as f64);
    } else {
        target = cfg.target("default");
    }
    let n_detected: u64 = detected.iter().sum();
    let detected_metrics = divergence(&detected, &target);
    let status = if (n_detected as usize) < mc.min_rounds {
        Status::InsufficientData
    } else if detected_metrics.mae > mc.alert_mae {
        Status::Alert
    } else if detected_metrics.mae > mc.warn_mae {
        Status::Warn
    } else {
        Status::Ok
    };
    WindowReport {
        window,
        n,
        target: names.iter().cloned().zip(target.iter().copied()).collect(),
        drawn: proportions(&names, &drawn),
        detected: proportions(&names, &detected),
        detected_none: none,
        detected_ambiguous: ambiguous,
        consistency: (n_detected > 0).then(|| agree as f64 / n_detected as f64),
        detected_metrics,
        drawn_metrics: divergence(&drawn, &target),
        status,
    }
}
