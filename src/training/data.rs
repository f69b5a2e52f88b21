//! Training data: prompts with a context, and per value example responses
//! that show it. Checked before any training starts.

use crate::steering::adapter::{Distribution, PromptFormat, Targets};
use crate::steering::Detected;
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ValueSpec {
    pub name: String,
    /// The steering token's string (default `<steer:NAME>`).
    pub token: Option<String>,
    /// Words that show this value in text.
    pub patterns: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PromptSpec {
    pub text: String,
    /// The context whose target applies (default `default`).
    #[serde(default)]
    pub context: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrainingData {
    pub attribute: String,
    pub values: Vec<ValueSpec>,
    #[schema(value_type = Object)]
    pub targets: Targets,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub prompt_format: PromptFormat,
    /// Training prompts.
    pub prompts: Vec<PromptSpec>,
    /// Prompts kept out of training, for measuring the prior afterwards.
    #[serde(default)]
    pub held_out: Vec<PromptSpec>,
    /// Per value, responses that show it.
    pub responses: BTreeMap<String, Vec<String>>,
}

/// What validation found and kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataReport {
    pub prompts: usize,
    pub held_out: usize,
    pub responses: BTreeMap<String, usize>,
    /// Responses whose detected value contradicts their label, dropped.
    pub dropped_contradicting: Vec<String>,
}

impl TrainingData {
    pub fn value_names(&self) -> Vec<String> {
        self.values.iter().map(|v| v.name.clone()).collect()
    }

    /// Checks the data and drops responses whose detection contradicts
    /// their label (reported), using `detect` on each response.
    pub fn validate(&mut self, detect: impl Fn(&str) -> Detected) -> Result<DataReport> {
        ensure!(self.values.len() >= 2, "at least two values are needed");
        ensure!(!self.prompts.is_empty(), "no training prompts");
        let names = self.value_names();
        let check = |what: &str, d: &Distribution| -> Result<()> {
            for (n, p) in d {
                ensure!(names.contains(n), "{what} names unknown value `{n}`");
                ensure!(
                    p.is_finite() && (0.0..=1.0).contains(p),
                    "{what}.{n} = {p} is not a probability"
                );
            }
            let sum: f64 = d.values().sum();
            ensure!((sum - 1.0).abs() < 1e-6, "{what} sums to {sum}, not 1");
            Ok(())
        };
        check("targets.default", &self.targets.default)?;
        for (c, d) in &self.targets.contexts {
            check(&format!("targets.contexts.{c}"), d)?;
        }
        for p in self.prompts.iter().chain(&self.held_out) {
            if let Some(c) = &p.context {
                ensure!(
                    c == "default" || self.targets.contexts.contains_key(c),
                    "prompt context `{c}` has no target"
                );
            }
        }
        for name in self.responses.keys() {
            ensure!(
                names.contains(name),
                "responses name unknown value `{name}`"
            );
        }
        let mut report = DataReport {
            prompts: self.prompts.len(),
            held_out: self.held_out.len(),
            ..Default::default()
        };
        for (i, name) in names.iter().enumerate() {
            let list = self.responses.entry(name.clone()).or_default();
            let (keep, drop): (Vec<String>, Vec<String>) = list
                .drain(..)
                .partition(|r| !matches!(detect(r), Detected::Value(v) if v != i));
            report
                .dropped_contradicting
                .extend(drop.into_iter().map(|r| format!("{name}: {r}")));
            if keep.is_empty() {
                bail!("value `{name}` has no example responses");
            }
            report.responses.insert(name.clone(), keep.len());
            *list = keep;
        }
        Ok(report)
    }
}
