//! The shape of a llama-family decoder, read from GGUF metadata or a Hugging
//! Face `config.json`. One struct covers llama, SmolLM, Qwen2 and Mistral: they
//! differ only in the fields below.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::Deserialize;

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): GGUF llama/mistral files (llama.cpp permutes q/k for it).
    Interleaved,
    /// Pairs (i, i + d/2): Hugging Face checkpoints, and Qwen2 everywhere.
    Halves,
}

/// RoPE frequency scaling for long-context checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3.x's per-frequency smoothing.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Explicit per-frequency divisors (GGUF `rope_freqs.weight`).
    Divisors(Vec<f32>),
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rope_style: RopeStyle,
    /// Context length the checkpoint was trained for.
    pub max_position_embeddings: usize,
    /// Mistral's sliding attention window, when the checkpoint has one.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// Qwen2 puts a bias on q/k/v.
    pub attention_bias: bool,
}

/// Architectures whose tensors follow the llama layout.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2"];

impl ModelConfig {
    pub fn check(&self) -> Result<()> {
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            bail!(
                "invalid head counts: {} query heads, {} key/value heads",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            bail!("invalid head dimension {}", self.head_dim);
        }
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            bail!("model has no layers, no hidden size or no vocabulary");
        }
        Ok(())
    }

    /// Reads the `{arch}.*` keys that llama.cpp writes.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = |key: &str| {
            content
                .metadata
                .get(key)
                .with_context(|| format!("GGUF metadata has no `{key}`"))
        };
        let arch = md("general.architecture")?.to_string()?.clone();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            bail!(
                "unsupported architecture `{arch}` (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            );
        }
        let get_u = |k: &str| -> Result<usize> {
            let v = md(&format!("{arch}.{k}"))?;
            Ok(v.to_u32()
                .map(|x| x as usize)
                .or_else(|_| v.to_u64().map(|x| x as usize))?)
        };
        let opt_f = |k: &str| {
            md(&format!("{arch}.{k}"))
                .ok()
                .and_then(|v| v.to_f32().ok())
        };
        let hidden_size = get_u("embedding_length")?;
        let num_heads = get_u("attention.head_count")?;
        let num_kv_heads = get_u("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = get_u("attention.key_length").unwrap_or(hidden_size / num_heads.max(1));
        let embd = content
            .tensor_infos
            .get("token_embd.weight")
            .context("GGUF has no `token_embd.weight` tensor")?;
        let vocab_size = embd.shape.dims()[0];
        let rope_scaling = match md(&format!("{arch}.rope.scaling.type"))
            .ok()
            .and_then(|v| v.to_string().ok().cloned())
            .as_deref()
        {
            Some("linear") => RopeScaling::Linear {
                factor: opt_f("rope.scaling.factor").unwrap_or(1.0),
            },
            _ => RopeScaling::None,
        };
        let config = Self {
            vocab_size,
            hidden_size,
            intermediate_size: get_u("feed_forward_length")?,
            num_layers: get_u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
            rope_theta: opt_f("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            // llama.cpp permutes llama/mistral q/k rows for interleaved RoPE; qwen2 is not permuted.
            rope_style: if arch == "qwen2" {
                RopeStyle::Halves
            } else {
                RopeStyle::Interleaved
            },
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            sliding_window: None,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            architecture: arch,
        };
        config.check()?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).context("config.json is not valid")?;
        let arch = match raw.model_type.as_deref() {
            Some(t @ ("llama" | "mistral" | "qwen2")) => t.to_string(),
            Some(other) => bail!(
                "unsupported architecture `{other}` (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            ),
            None => bail!("config.json has no `model_type`"),
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let rope_scaling = match raw.rope_scaling {
            None => RopeScaling::None,
            Some(s) => match s.kind() {
                "linear" => RopeScaling::Linear {
                    factor: s.factor.unwrap_or(1.0),
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: s.factor.unwrap_or(8.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                },
                "default" => RopeScaling::None,
                other => bail!("unsupported rope_scaling type `{other}`"),
            },
        };
        let config = Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rope_style: RopeStyle::Halves,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            sliding_window: if raw.use_sliding_window.unwrap_or(arch == "mistral") {
                raw.sliding_window
            } else {
                None
            },
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(arch == "qwen2"),
            architecture: arch,
        };
        config.check()?;
        Ok(config)
    }

    /// (out, in) of a projection, the same in every layer.
    pub fn proj_shape(&self, kind: super::ProjKind) -> (usize, usize) {
        let (h, q, kv, ff) = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        );
        use super::ProjKind::*;
        match kind {
            Q => (q, h),
            K | V => (kv, h),
            O => (h, q),
            Gate | Up => (ff, h),
            Down => (h, ff),
        }
    }

    /// Inverse frequencies of the rotary embedding, scaling applied.
    pub fn rope_inv_freqs(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Divisors(div) => base.iter().zip(div).map(|(f, d)| f / d).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
}

#[derive(Deserialize)]
struct HfRopeScaling {
    #[serde(rename = "type")]
    kind_old: Option<String>,
    rope_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

impl HfRopeScaling {
    fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.kind_old.as_deref())
            .unwrap_or("default")
    }
}
