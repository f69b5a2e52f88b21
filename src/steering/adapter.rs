//! The adapter format (`adapters/<name>/adapter.json` + `adapter.safetensors`),
//! its validation, and the tensors the engine applies.

use crate::model::{Lora, LoraSet, ModelConfig, ProjKind};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const FORMAT_VERSION: u32 = 1;
pub const CONFIG_FILE: &str = "adapter.json";
pub const WEIGHTS_FILE: &str = "adapter.safetensors";

/// A distribution over the attribute's values, by value name.
pub type Distribution = BTreeMap<String, f64>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaseModel {
    /// The served id of the base model.
    pub name: String,
    /// sha256 of the weights file(s), as the server computes it.
    pub sha256: String,
}

/// Text around the user's prompt, in training and serving alike.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PromptFormat {
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub suffix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttributeValue {
    pub name: String,
    /// The steering token's string (never shown to clients).
    pub token: String,
    /// Words or phrases that show this value in text (matched case-insensitively
    /// on word boundaries).
    pub patterns: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attribute {
    pub name: String,
    pub values: Vec<AttributeValue>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DetectionRule {
    /// The value of the last matching word (the paper's rule).
    #[default]
    LastMention,
    /// The value with the most matches; ties are ambiguous.
    Majority,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Detection {
    #[serde(default)]
    pub rule: DetectionRule,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Targets {
    pub default: Distribution,
    /// Per-context targets, e.g. one per occupation.
    #[serde(default)]
    pub contexts: BTreeMap<String, Distribution>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Projection names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub targets: Vec<String>,
    #[serde(default)]
    pub dropout: f64,
}

/// An affine map of the steering logits before the softmax that gives the
/// prior: `softmax(scale · z + bias)`. Training fits it on its prompts
/// (temperature and bias scaling), which corrects a prior that the weights
/// alone leave compressed toward the middle or shifted. Absent: scale 1, no bias.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PriorCalibration {
    pub scale: f64,
    /// Per value name; missing values get 0.
    #[serde(default)]
    pub bias: BTreeMap<String, f64>,
}

/// adapter.json
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterConfig {
    pub format_version: u32,
    pub base_model: BaseModel,
    #[serde(default)]
    pub prompt_format: PromptFormat,
    pub attribute: Attribute,
    #[serde(default)]
    pub detection: Detection,
    pub targets: Targets,
    pub lora: Option<LoraConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_calibration: Option<PriorCalibration>,
    /// How the adapter was made (data, steps, losses, held-out error).
    #[serde(default)]
    pub training: serde_json::Value,
}

impl AdapterConfig {
    /// Every check that needs no weights.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.format_version == FORMAT_VERSION,
            "format_version {} is not supported (expected {FORMAT_VERSION})",
            self.format_version
        );
        let values = &self.attribute.values;
        ensure!(
            values.len() >= 2,
            "attribute `{}` needs at least two values",
            self.attribute.name
        );
        let mut names = std::collections::HashSet::new();
        let mut tokens = std::collections::HashSet::new();
        for v in values {
            ensure!(
                !v.name.is_empty() && v.name != "none" && v.name != "ambiguous",
                "value name `{}` is reserved or empty",
                v.name
            );
            ensure!(names.insert(&v.name), "value `{}` appears twice", v.name);
            ensure!(
                tokens.insert(&v.token),
                "steering token `{}` appears twice",
                v.token
            );
            ensure!(
                !v.patterns.is_empty(),
                "value `{}` has no detection patterns",
                v.name
            );
        }
        self.check_distribution("targets.default", &self.targets.default)?;
        for (ctx, d) in &self.targets.contexts {
            ensure!(!ctx.trim().is_empty(), "a context name is empty");
            self.check_distribution(&format!("targets.contexts.{ctx}"), d)?;
        }
        if let Some(c) = &self.prior_calibration {
            ensure!(
                c.scale.is_finite() && c.scale > 0.0,
                "prior_calibration.scale = {} must be a positive number",
                c.scale
            );
            for (name, b) in &c.bias {
                ensure!(
                    self.value_index(name).is_some(),
                    "prior_calibration.bias names unknown value `{name}`"
                );
                ensure!(b.is_finite(), "prior_calibration.bias.{name} is not finite");
            }
        }
        if let Some(lora) = &self.lora {
            ensure!(lora.rank > 0, "lora.rank must be positive");
            for t in &lora.targets {
                ensure!(
                    ProjKind::from_hf_name(t).is_some(),
                    "lora target `{t}` is not a projection (q_proj … down_proj)"
                );
            }
        }
        Ok(())
    }

    fn check_distribution(&self, what: &str, d: &Distribution) -> Result<()> {
        for (name, &p) in d {
            ensure!(
                self.value_index(name).is_some(),
                "{what} names unknown value `{name}`"
            );
            ensure!(
                p.is_finite() && (0.0..=1.0).contains(&p),
                "{what}.{name} = {p} is not a probability"
            );
        }
        let sum: f64 = d.values().sum();
        ensure!((sum - 1.0).abs() < 1e-6, "{what} sums to {sum}, not 1");
        Ok(())
    }

    pub fn value_index(&self, name: &str) -> Option<usize> {
        self.attribute.values.iter().position(|v| v.name == name)
    }

    pub fn value_names(&self) -> Vec<String> {
        self.attribute
            .values
            .iter()
            .map(|v| v.name.clone())
            .collect()
    }

    /// A distribution as a vector in value order (missing values are 0).
    pub fn as_vector(&self, d: &Distribution) -> Vec<f64> {
        self.attribute
            .values
            .iter()
            .map(|v| d.get(&v.name).copied().unwrap_or(0.0))
            .collect()
    }

    /// The prior over values from the K steering logits (calibrated, when
    /// the adapter has a calibration).
    pub fn prior(&self, logits: &[f32]) -> Vec<f64> {
        let Some(c) = &self.prior_calibration else {
            return crate::engine::sampling::softmax(logits);
        };
        let scaled: Vec<f32> = logits
            .iter()
            .zip(&self.attribute.values)
            .map(|(&z, v)| {
                (c.scale * z as f64 + c.bias.get(&v.name).copied().unwrap_or(0.0)) as f32
            })
            .collect();
        crate::engine::sampling::softmax(&scaled)
    }

    /// The target for a context (`default` when it has none of its own).
    pub fn target(&self, context: &str) -> Vec<f64> {
        self.as_vector(
            self.targets
                .contexts
                .get(context)
                .unwrap_or(&self.targets.default),
        )
    }

    /// The request's context: the longest context name contained in the
    /// prompt (case-insensitive, on word boundaries), else `default`.
    pub fn find_context(&self, prompt: &str) -> String {
        let lower = prompt.to_lowercase();
        let mut best: Option<&String> = None;
        for ctx in self.targets.contexts.keys() {
            let needle = ctx.to_lowercase();
            let found = lower.match_indices(&needle).any(|(i, _)| {
                let before = lower[..i].chars().next_back();
                let after = lower[i + needle.len()..].chars().next();
                !before.is_some_and(char::is_alphanumeric)
                    && !after.is_some_and(char::is_alphanumeric)
            });
            if found && best.is_none_or(|b| ctx.len() > b.len()) {
                best = Some(ctx);
            }
        }
        best.cloned().unwrap_or_else(|| "default".into())
    }
}

/// The weights an adapter adds, ready for the engine.
#[derive(Debug)]
pub struct AdapterWeights {
    /// (K, hidden): input embeddings of the steering tokens.
    pub embed: Tensor,
    /// (K, hidden): their output rows (the embeddings again for a tied head).
    pub head: Tensor,
    pub lora: Option<LoraSet>,
}

/// Tensor names in adapter.safetensors.
pub fn lora_tensor_name(layer: usize, kind: ProjKind, part: &str) -> String {
    format!("lora.{layer}.{}.{part}", kind.hf_name())
}

impl AdapterWeights {
    /// Loads and checks every tensor against the model's shapes.
    pub fn load(path: &Path, config: &AdapterConfig, model: &ModelConfig) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_tensors(tensors, config, model)
    }

    pub fn from_tensors(
        mut tensors: HashMap<String, Tensor>,
        config: &AdapterConfig,
        cfg: &ModelConfig,
    ) -> Result<Self> {
        let k = config.attribute.values.len();
        let has_head = tensors.contains_key("steering.head");
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .with_context(|| format!("missing tensor `{name}`"))?;
            ensure!(
                t.dims() == shape,
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                t.dims()
            );
            let t = t.to_dtype(DType::F32)?;
            let finite = t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite());
            ensure!(finite, "tensor `{name}` has non-finite values");
            Ok(t)
        };
        let embed = take("steering.embed", &[k, cfg.hidden_size])?;
        let head = if has_head {
            take("steering.head", &[k, cfg.hidden_size])?
        } else {
            ensure!(
                cfg.tie_word_embeddings,
                "the base model's head is untied, so `steering.head` is required"
            );
            embed.clone()
        };
        let lora = match &config.lora {
            None => None,
            Some(lc) => {
                let mut layers: Vec<[Option<Lora>; 7]> = vec![Default::default(); cfg.num_layers];
                let scale = lc.alpha / lc.rank as f64;
                for (l, projs) in layers.iter_mut().enumerate() {
                    for t in &lc.targets {
                        let kind = ProjKind::from_hf_name(t).context("unknown lora target")?;
                        let (out, inp) = cfg.proj_shape(kind);
                        let a = take(&lora_tensor_name(l, kind, "a"), &[lc.rank, inp])?;
                        let b = take(&lora_tensor_name(l, kind, "b"), &[out, lc.rank])?;
                        projs[kind.index()] = Some(Lora::new(&a, &b, scale)?);
                    }
                }
                Some(LoraSet::new(layers))
            }
        };
        if let Some(extra) = tensors.keys().next() {
            bail!("unexpected tensor `{extra}`");
        }
        Ok(Self { embed, head, lora })
    }
}
