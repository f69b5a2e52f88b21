//! Finding the attribute in generated text with the adapter's patterns.

use super::adapter::{AdapterConfig, DetectionRule};
use anyhow::{Context, Result};
use regex::Regex;

/// What the text shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    Value(usize),
    None,
    Ambiguous,
}

#[derive(Debug)]
pub struct Detector {
    /// One regex per value: any of its patterns, on word boundaries.
    patterns: Vec<Regex>,
    rule: DetectionRule,
}

impl Detector {
    pub fn new(config: &AdapterConfig) -> Result<Self> {
        let patterns = config
            .attribute
            .values
            .iter()
            .map(|v| {
                let alternatives: Vec<String> =
                    v.patterns.iter().map(|p| regex::escape(p.trim())).collect();
                Regex::new(&format!(r"(?i)\b(?:{})\b", alternatives.join("|")))
                    .with_context(|| format!("patterns of value `{}` do not compile", v.name))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            patterns,
            rule: config.detection.rule,
        })
    }

    pub fn detect(&self, text: &str) -> Detected {
        self.detect_with(text, self.rule)
    }

    pub fn detect_with(&self, text: &str, rule: DetectionRule) -> Detected {
        match rule {
            DetectionRule::LastMention => {
                // The value whose last match ends last; equal ends are ambiguous.
                let ends: Vec<Option<usize>> = self
                    .patterns
                    .iter()
                    .map(|re| re.find_iter(text).map(|m| m.end()).last())
                    .collect();
                let Some(last) = ends.iter().flatten().max().copied() else {
                    return Detected::None;
                };
                let winners: Vec<usize> =
                    (0..ends.len()).filter(|&i| ends[i] == Some(last)).collect();
                if winners.len() == 1 {
                    Detected::Value(winners[0])
                } else {
                    Detected::Ambiguous
                }
            }
            DetectionRule::Majority => {
                let counts: Vec<usize> = self
                    .patterns
                    .iter()
                    .map(|re| re.find_iter(text).count())
                    .collect();
                let max = counts.iter().copied().max().unwrap_or(0);
                if max == 0 {
                    return Detected::None;
                }
                let winners: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] == max).collect();
                if winners.len() == 1 {
                    Detected::Value(winners[0])
                } else {
                    Detected::Ambiguous
                }
            }
        }
    }
}
