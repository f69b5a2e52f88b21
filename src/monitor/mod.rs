//! The distribution monitor (DESIGN.md §3): every steered round is recorded
//! in rolling windows per (adapter, context) and over all contexts, and the
//! report compares what was served with the target.

pub mod html;
pub mod report;
pub mod stats;

use crate::steering::{Adapter, Detected};
use report::{AdapterReport, Report, WindowKind};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Window sizes and status thresholds (server settings).
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// The count window: the last N rounds.
    pub window_rounds: usize,
    /// The time window: rounds of the last T.
    pub window_time: Duration,
    /// Below this many rounds with a detected value, the status is insufficient_data.
    pub min_rounds: usize,
    /// MAE (detected vs target) above which the status is warn.
    pub warn_mae: f64,
    /// MAE above which the status is alert.
    pub alert_mae: f64,
    /// Label Prometheus series with contexts too.
    pub context_labels: bool,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            window_rounds: 1000,
            window_time: Duration::from_secs(3600),
            min_rounds: 30,
            warn_mae: 0.05,
            alert_mae: 0.10,
            context_labels: false,
        }
    }
}

/// One steered round.
#[derive(Debug, Clone)]
pub struct Round {
    pub at: Instant,
    pub context: String,
    pub drawn: usize,
    pub detected: Detected,
}

/// Rounds of one (adapter, context), or of all an adapter's contexts.
#[derive(Debug, Default)]
struct Series {
    rounds: VecDeque<Round>,
}

/// Hard cap on rounds kept per series, whatever the time window.
const MAX_KEPT: usize = 200_000;

impl Series {
    fn push(&mut self, round: Round, config: &MonitorConfig) {
        self.rounds.push_back(round);
        // Keep what either window still needs.
        let now = Instant::now();
        while self.rounds.len() > config.window_rounds
            && self
                .rounds
                .front()
                .is_some_and(|r| now.duration_since(r.at) > config.window_time)
        {
            self.rounds.pop_front();
        }
        while self.rounds.len() > MAX_KEPT.max(config.window_rounds) {
            self.rounds.pop_front();
        }
    }

    fn window(&self, kind: WindowKind, config: &MonitorConfig) -> Vec<&Round> {
        match kind {
            WindowKind::Count => {
                let skip = self.rounds.len().saturating_sub(config.window_rounds);
                self.rounds.iter().skip(skip).collect()
            }
            WindowKind::Time => {
                let now = Instant::now();
                self.rounds
                    .iter()
                    .filter(|r| now.duration_since(r.at) <= config.window_time)
                    .collect()
            }
        }
    }
}

/// The rounds of one series in each window, oldest first.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    pub count: Vec<Round>,
    pub time: Vec<Round>,
}

impl Windows {
    fn get(&self, kind: WindowKind) -> Vec<&Round> {
        match kind {
            WindowKind::Count => self.count.iter().collect(),
            WindowKind::Time => self.time.iter().collect(),
        }
    }

    pub fn get_mut(&mut self, kind: WindowKind) -> &mut Vec<Round> {
        match kind {
            WindowKind::Count => &mut self.count,
            WindowKind::Time => &mut self.time,
        }
    }
}

/// One adapter's windows: over all its contexts, and per context.
#[derive(Debug, Clone)]
pub struct AdapterRounds {
    /// For value names and targets.
    pub adapter: Arc<Adapter>,
    pub all: Windows,
    pub contexts: BTreeMap<String, Windows>,
}

impl AdapterRounds {
    pub fn new(adapter: Arc<Adapter>) -> Self {
        Self {
            adapter,
            all: Windows::default(),
            contexts: BTreeMap::new(),
        }
    }
}

/// All series of one adapter.
struct Tracked {
    /// The latest version seen (for value names and targets).
    adapter: Arc<Adapter>,
    all: Series,
    contexts: BTreeMap<String, Series>,
}

pub struct Monitor {
    config: MonitorConfig,
    tracked: Mutex<HashMap<String, Tracked>>,
}

impl Monitor {
    pub fn new(config: MonitorConfig) -> Self {
        Self {
            config,
            tracked: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }

    /// Records a round and counts it in the Prometheus counters.
    pub fn record(
        &self,
        adapter: &Arc<Adapter>,
        context: &str,
        drawn: usize,
        text: &str,
    ) -> Detected {
        let detected = adapter.detector.detect(text);
        let round = Round {
            at: Instant::now(),
            context: context.to_string(),
            drawn,
            detected: detected.clone(),
        };
        self.count_metrics(adapter, context, drawn, &detected);
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        let t = tracked
            .entry(adapter.name.clone())
            .or_insert_with(|| Tracked {
                adapter: adapter.clone(),
                all: Series::default(),
                contexts: BTreeMap::new(),
            });
        if t.adapter.version != adapter.version {
            t.adapter = adapter.clone();
        }
        t.all.push(round.clone(), &self.config);
        t.contexts
            .entry(context.to_string())
            .or_default()
            .push(round, &self.config);
        detected
    }

    fn count_metrics(&self, adapter: &Adapter, context: &str, drawn: usize, detected: &Detected) {
        let names = adapter.config.value_names();
        let attribute = adapter.config.attribute.name.clone();
        let detected = match detected {
            Detected::Value(v) => names[*v].clone(),
            Detected::None => "none".into(),
            Detected::Ambiguous => "ambiguous".into(),
        };
        let mut draw_labels = vec![
            ("adapter", adapter.name.clone()),
            ("attribute", attribute.clone()),
            ("value", names[drawn].clone()),
        ];
        let mut detect_labels = vec![
            ("adapter", adapter.name.clone()),
            ("attribute", attribute),
            ("value", detected),
        ];
        if self.config.context_labels {
            draw_labels.push(("context", context.to_string()));
            detect_labels.push(("context", context.to_string()));
        }
        let to_labels = |l: Vec<(&'static str, String)>| {
            l.into_iter()
                .map(|(k, v)| metrics::Label::new(k, v))
                .collect::<Vec<_>>()
        };
        metrics::counter!(crate::metrics::STEERING_DRAWS, to_labels(draw_labels)).increment(1);
        metrics::counter!(crate::metrics::STEERING_DETECTED, to_labels(detect_labels)).increment(1);
    }

    /// Clears the windows of one adapter, or of all.
    pub fn reset(&self, adapter: Option<&str>) {
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        match adapter {
            Some(name) => {
                tracked.remove(name);
            }
            None => tracked.clear(),
        }
    }

    /// This replica's windows (optionally of one adapter), as the report reads them.
    pub fn snapshot(
        &self,
        adapter: Option<&str>,
        window: Option<WindowKind>,
    ) -> BTreeMap<String, AdapterRounds> {
        let kinds = WindowKind::selected(window);
        let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        // Only the windows the report reads are copied.
        let windows = |s: &Series| {
            let mut w = Windows::default();
            for &kind in &kinds {
                *w.get_mut(kind) = s.window(kind, &self.config).into_iter().cloned().collect();
            }
            w
        };
        tracked
            .iter()
            .filter(|(name, _)| adapter.is_none_or(|a| a == name.as_str()))
            .map(|(name, t)| {
                let rounds = AdapterRounds {
                    adapter: t.adapter.clone(),
                    all: windows(&t.all),
                    contexts: t
                        .contexts
                        .iter()
                        .map(|(c, s)| (c.clone(), windows(s)))
                        .collect(),
                };
                (name.clone(), rounds)
            })
            .collect()
    }

    /// The report of this replica's own rounds, optionally for one adapter,
    /// one context and one window kind.
    pub fn report(
        &self,
        adapter: Option<&str>,
        context: Option<&str>,
        window: Option<WindowKind>,
    ) -> Report {
        self.report_from(&self.snapshot(adapter, window), context, window)
    }

    /// The report of `rounds` (this replica's, or the fleet's).
    pub fn report_from(
        &self,
        rounds: &BTreeMap<String, AdapterRounds>,
        context: Option<&str>,
        window: Option<WindowKind>,
    ) -> Report {
        let kinds = WindowKind::selected(window);
        let adapters = rounds
            .iter()
            .map(|(name, r)| {
                let cfg = &r.adapter.config;
                let summarize = |w: &Windows| {
                    kinds
                        .iter()
                        .map(|&k| report::summarize(cfg, &w.get(k), k, &self.config))
                        .collect::<Vec<_>>()
                };
                let contexts = r
                    .contexts
                    .iter()
                    .filter(|(c, _)| context.is_none_or(|want| want == c.as_str()))
                    .map(|(c, w)| (c.clone(), summarize(w)))
                    .collect();
                AdapterReport {
                    adapter: name.clone(),
                    attribute: cfg.attribute.name.clone(),
                    values: cfg.value_names(),
                    aggregate: summarize(&r.all),
                    contexts,
                }
            })
            .collect();
        Report {
            generated_at: crate::api::unix_now(),
            window_rounds: self.config.window_rounds,
            window_seconds: self.config.window_time.as_secs(),
            state: "memory".into(),
            fleet: None,
            adapters,
        }
    }

    /// Refreshes the divergence and status gauges from the aggregate count window.
    pub fn update_gauges(&self) {
        for a in self.report(None, None, Some(WindowKind::Count)).adapters {
            let Some(w) = a.aggregate.first() else {
                continue;
            };
            let labels = [
                ("adapter", a.adapter.clone()),
                ("attribute", a.attribute.clone()),
            ];
            metrics::gauge!(crate::metrics::STEERING_MAE, &labels).set(w.detected_metrics.mae);
            metrics::gauge!(crate::metrics::STEERING_KL, &labels).set(w.detected_metrics.kl);
            metrics::gauge!(crate::metrics::STEERING_JS, &labels)
                .set(w.detected_metrics.js_distance);
            metrics::gauge!(crate::metrics::STEERING_STATUS, &labels).set(w.status.code());
        }
    }
}
