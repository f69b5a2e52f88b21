//! Loading weights: a GGUF file (quantized matmuls) or a Hugging Face folder
//! (`config.json`, `*.safetensors`, `tokenizer.json`).

use super::attention::Rope;
use super::config::{ModelConfig, RopeScaling};
use super::linear::{Proj, ProjKind, Weight};
use super::{Layer, Model};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where weights come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfFolder(PathBuf),
}

impl ModelSource {
    /// A directory is a Hugging Face folder; a file is GGUF.
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Ok(Self::HfFolder(path.to_path_buf()))
        } else if path.is_file() {
            Ok(Self::Gguf(path.to_path_buf()))
        } else {
            bail!("model not found: {}", path.display())
        }
    }
}

/// A model with its tokenizer and identity.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The name clients use (file or folder stem).
    pub name: String,
    /// sha256 of the weights (for adapters to check they match).
    pub sha256: String,
}

/// Loads a model; `max_context` bounds the positions a sequence may reach.
pub fn load_model(source: &ModelSource, max_context: usize) -> Result<LoadedModel> {
    let device = Device::Cpu;
    match source {
        ModelSource::Gguf(path) => load_gguf(path, max_context, &device)
            .with_context(|| format!("cannot load GGUF model {}", path.display())),
        ModelSource::HfFolder(dir) => load_hf(dir, max_context, &device)
            .with_context(|| format!("cannot load model folder {}", dir.display())),
    }
}

/// The id a model is served under: its file or folder name, without `.gguf`.
pub fn model_id(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(name)
}

fn sha256_files(paths: &[PathBuf]) -> Result<String> {
    let mut hasher = Sha256::new();
    for p in paths {
        let mut f = std::fs::File::open(p)?;
        std::io::copy(&mut f, &mut hasher)?;
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn load_gguf(path: &Path, max_context: usize, device: &Device) -> Result<LoadedModel> {
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file).context("not a readable GGUF file")?;
    let mut config = ModelConfig::from_gguf(&content)?;
    let tokenizer = Tokenizer::from_gguf(&content)?;
    let mut tensor = |name: &str| content.tensor(&mut file, name, device);
    if let Ok(freqs) = tensor("rope_freqs.weight") {
        config.rope_scaling = RopeScaling::Divisors(freqs.dequantize(device)?.to_vec1()?);
    }
    let embed_q = tensor("token_embd.weight")?;
    let embed = embed_q.dequantize(device)?;
    let head_q = if config.tie_word_embeddings {
        embed_q
    } else {
        tensor("output.weight")?
    };
    let qproj =
        |t: &mut dyn FnMut(&str) -> candle_core::Result<candle_core::quantized::QTensor>,
         name: &str|
         -> Result<Proj> {
            let weight = quantized_weight(t(&format!("{name}.weight"))?)?;
            let bias = match t(&format!("{name}.bias")) {
                Ok(b) => Some(b.dequantize(device)?),
                Err(_) => None,
            };
            Ok(Proj { weight, bias })
        };
    let mut layers = Vec::with_capacity(config.num_layers);
    for l in 0..config.num_layers {
        let p = format!("blk.{l}");
        let names = [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ];
        let projs: Vec<Proj> = names
            .iter()
            .map(|n| qproj(&mut tensor, &format!("{p}.{n}")))
            .collect::<Result<_>>()?;
        layers.push(Layer {
            attn_norm: tensor(&format!("{p}.attn_norm.weight"))?.dequantize(device)?,
            projs: projs
                .try_into()
                .map_err(|_| anyhow::anyhow!("projection count"))?,
            mlp_norm: tensor(&format!("{p}.ffn_norm.weight"))?.dequantize(device)?,
        });
    }
    let final_norm = tensor("output_norm.weight")?.dequantize(device)?;
    let head = Proj {
        weight: quantized_weight(head_q)?,
        bias: None,
    };
    let model = assemble(config, embed, layers, final_norm, head, max_context, device)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        name: model_id(path),
        sha256: sha256_files(&[path.to_path_buf()])?,
    })
}

/// Q4_1 and Q8_0 go to our batched kernels; every other GGUF type to
/// candle's QMatMul. CANDLE_DEQUANTIZE_ALL (candle's switch to dense f32
/// weights) applies to both.
fn quantized_weight(q: candle_core::quantized::QTensor) -> Result<Weight> {
    let dequantize_all =
        std::env::var("CANDLE_DEQUANTIZE_ALL").is_ok_and(|v| !v.is_empty() && v != "0");
    if !dequantize_all {
        if let Some(m) = super::qmatmul::QMatrix::from_qtensor(&q)? {
            return Ok(Weight::Blocks(m));
        }
    }
    Ok(Weight::Quantized(QMatMul::from_qtensor(q)?))
}

fn load_hf(dir: &Path, max_context: usize, device: &Device) -> Result<LoadedModel> {
    let config_text =
        std::fs::read_to_string(dir.join("config.json")).context("missing config.json")?;
    let config = ModelConfig::from_hf_json(&config_text)?;
    let tokenizer = Tokenizer::from_hf_folder(dir)?;
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        bail!("no *.safetensors files");
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for shard in &shards {
        tensors.extend(candle_core::safetensors::load(shard, device)?);
    }
    let mut take = |name: &str| -> Result<Tensor> {
        let t = tensors
            .remove(name)
            .with_context(|| format!("missing tensor `{name}`"))?;
        Ok(t.to_dtype(DType::F32)?)
    };
    let embed = take("model.embed_tokens.weight")?;
    let mut layers = Vec::with_capacity(config.num_layers);
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}");
        let mut projs = Vec::with_capacity(7);
        for kind in ProjKind::ALL {
            let module = match kind {
                ProjKind::Q | ProjKind::K | ProjKind::V | ProjKind::O => "self_attn",
                _ => "mlp",
            };
            let name = format!("{p}.{module}.{}", kind.hf_name());
            let weight = Weight::Dense(take(&format!("{name}.weight"))?);
            let bias = take(&format!("{name}.bias")).ok();
            projs.push(Proj { weight, bias });
        }
        layers.push(Layer {
            attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
            projs: projs
                .try_into()
                .map_err(|_| anyhow::anyhow!("projection count"))?,
            mlp_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
        });
    }
    let final_norm = take("model.norm.weight")?;
    let head_weight = match take("lm_head.weight") {
        Ok(w) if !config.tie_word_embeddings => w,
        _ => embed.clone(),
    };
    let head = Proj {
        weight: Weight::Dense(head_weight),
        bias: None,
    };
    let model = assemble(config, embed, layers, final_norm, head, max_context, device)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        name: model_id(dir),
        sha256: sha256_files(&shards)?,
    })
}

fn assemble(
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    head: Proj,
    max_context: usize,
    device: &Device,
) -> Result<Model> {
    check_shapes(&config, &embed, &layers)?;
    let positions = max_context
        .min(config.max_position_embeddings.max(1))
        .max(1);
    let rope = Rope::new(&config.rope_inv_freqs(), config.rope_style, positions);
    Ok(Model {
        config,
        embed,
        layers,
        final_norm,
        head,
        rope,
        device: device.clone(),
    })
}

/// Refuses weights whose shapes disagree with the config, before any forward
/// pass could fail halfway.
fn check_shapes(cfg: &ModelConfig, embed: &Tensor, layers: &[Layer]) -> Result<()> {
    let expect = |what: &str, got: &[usize], want: &[usize]| -> Result<()> {
        if got != want {
            bail!("tensor {what} has shape {got:?}, expected {want:?}");
        }
        Ok(())
    };
    expect(
        "embeddings",
        embed.dims(),
        &[cfg.vocab_size, cfg.hidden_size],
    )?;
    let (h, q, kv, ff) = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    );
    for (l, layer) in layers.iter().enumerate() {
        for kind in ProjKind::ALL {
            let want = match kind {
                ProjKind::Q => [q, h],
                ProjKind::K | ProjKind::V => [kv, h],
                ProjKind::O => [h, q],
                ProjKind::Gate | ProjKind::Up => [ff, h],
                ProjKind::Down => [h, ff],
            };
            let got = layer.projs[kind.index()].weight.shape();
            expect(&format!("layer {l} {}", kind.hf_name()), &got, &want)?;
        }
    }
    Ok(())
}
