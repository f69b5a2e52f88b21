//! The differentiable forward for training: the same decoder as
//! `model::Model`, written with ops that have a backward pass (candle's fast
//! kernels have none and would silently stop gradients), on dense weights.
//! The base is frozen; the steering rows and LoRA matrices are `Var`s.

use crate::model::{Model, ModelConfig, ProjKind, RopeStyle};
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var, D};

/// The base model's weights, dense and frozen.
pub struct FrozenBase {
    pub config: ModelConfig,
    embed: Tensor,
    layers: Vec<FrozenLayer>,
    final_norm: Tensor,
    head: Tensor,
    cos: Tensor,
    sin: Tensor,
}

struct FrozenLayer {
    attn_norm: Tensor,
    mlp_norm: Tensor,
    /// (out, in) per projection, in ProjKind order.
    weights: Vec<Tensor>,
    biases: Vec<Option<Tensor>>,
}

impl FrozenBase {
    /// Dequantizes every weight to `dtype` (f32 for training, f64 for
    /// gradient checks); `max_len` bounds the sequence length.
    pub fn from_model(model: &Model, dtype: DType, max_len: usize) -> Result<Self> {
        let conv = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?) };
        let mut layers = Vec::new();
        for layer in model.layers() {
            let mut weights = Vec::new();
            let mut biases = Vec::new();
            for p in &layer.projs {
                weights.push(conv(&p.weight.to_dense()?)?);
                biases.push(p.bias.as_ref().map(conv).transpose()?);
            }
            layers.push(FrozenLayer {
                attn_norm: conv(&layer.attn_norm)?,
                mlp_norm: conv(&layer.mlp_norm)?,
                weights,
                biases,
            });
        }
        let config = model.config.clone();
        let inv: Vec<f32> = config.rope_inv_freqs();
        let positions: Vec<f32> = (0..max_len).map(|p| p as f32).collect();
        let pos = Tensor::from_vec(positions, (max_len, 1), &Device::Cpu)?;
        let freqs = pos.matmul(&Tensor::from_vec(
            inv.clone(),
            (1, inv.len()),
            &Device::Cpu,
        )?)?;
        Ok(Self {
            embed: conv(model.embeddings())?,
            head: conv(&model.head_dense()?)?,
            final_norm: conv(model.final_norm())?,
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            layers,
            config,
        })
    }

    /// Longest sequence the rotary tables cover.
    pub fn max_len(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Embedding rows of vocabulary tokens (for initialising steering rows).
    pub fn embed_rows(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(self
            .embed
            .index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?)
    }
}

/// One LoRA pair being trained.
pub struct LoraVars {
    /// (rank, in)
    pub a: Var,
    /// (out, rank)
    pub b: Var,
}

/// What training changes: steering rows and LoRA matrices.
pub struct Trainable {
    /// (K, hidden): input rows of the steering tokens.
    pub steer_embed: Var,
    /// (K, hidden): output rows, when the base head is untied.
    pub steer_head: Option<Var>,
    /// lora[layer][ProjKind::index()]
    pub lora: Vec<Vec<Option<LoraVars>>>,
    pub scale: f64,
    pub dropout: f32,
}

impl Trainable {
    /// Steering rows from `init` (K, hidden); LoRA A small random, B zero
    /// (so training starts from the base model, as peft does).
    pub fn new(
        base: &FrozenBase,
        init: &Tensor,
        rank: usize,
        alpha: f64,
        targets: &[ProjKind],
        dropout: f32,
        seed: u64,
    ) -> Result<Self> {
        let dtype = base.dtype();
        let cfg = &base.config;
        let mut state = seed.max(1);
        let mut uniform = |n: usize, bound: f64| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound
                })
                .collect()
        };
        let mut lora = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            let mut row: Vec<Option<LoraVars>> = (0..7).map(|_| None).collect();
            for &kind in targets {
                let (out, inp) = cfg.proj_shape(kind);
                let bound = 1.0 / (inp as f64).sqrt();
                let a = Tensor::from_vec(uniform(rank * inp, bound), (rank, inp), &Device::Cpu)?
                    .to_dtype(dtype)?;
                let b = Tensor::zeros((out, rank), dtype, &Device::Cpu)?;
                row[kind.index()] = Some(LoraVars {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                });
            }
            lora.push(row);
        }
        let steer_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Var::from_tensor(&init.to_dtype(dtype)?)?)
        };
        Ok(Self {
            steer_embed: Var::from_tensor(&init.to_dtype(dtype)?)?,
            steer_head,
            lora,
            scale: alpha / rank as f64,
            dropout,
        })
    }

    /// Every trainable tensor, for the optimizer.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.steer_embed.clone()];
        v.extend(self.steer_head.clone());
        for row in &self.lora {
            for l in row.iter().flatten() {
                v.push(l.a.clone());
                v.push(l.b.clone());
            }
        }
        v
    }
}

/// Logits (batch, time, vocab + K) for token ids (batch, time); ids ≥ vocab
/// are steering tokens. `train` turns LoRA dropout on.
/// Logits (b, t - from, vocab + K) for positions `from..t` of `ids` (b, t):
/// positions before `from` are only context, and the head over the whole
/// vocabulary is a fifth of a small model's compute.
pub fn forward(
    base: &FrozenBase,
    tr: &Trainable,
    ids: &Tensor,
    train: bool,
    from: usize,
) -> Result<Tensor> {
    let cfg = &base.config;
    let (b, t) = ids.dims2()?;
    ensure!(
        t <= base.cos.dim(0)?,
        "sequence of {t} tokens is longer than the training limit"
    );
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let table = Tensor::cat(&[&base.embed, tr.steer_embed.as_tensor()], 0)?;
    let mut x = table
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, cfg.hidden_size))?;
    let mask = causal_mask(t, base.dtype())?;
    let (cos, sin) = (base.cos.narrow(0, 0, t)?, base.sin.narrow(0, 0, t)?);
    let eps = cfg.rms_norm_eps as f32;
    for (l, layer) in base.layers.iter().enumerate() {
        let h = candle_nn::ops::rms_norm_slow(&x, &layer.attn_norm, eps)?;
        let proj =
            |kind: ProjKind, input: &Tensor| project(layer, &tr.lora[l], kind, input, tr, train);
        let q = proj(ProjKind::Q, &h)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = proj(ProjKind::K, &h)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = proj(ProjKind::V, &h)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k) = match cfg.rope_style {
            RopeStyle::Interleaved => (
                candle_nn::rotary_emb::rope_i_slow(&q, &cos, &sin)?,
                candle_nn::rotary_emb::rope_i_slow(&k, &cos, &sin)?,
            ),
            RopeStyle::Halves => (
                candle_nn::rotary_emb::rope_slow(&q, &cos, &sin)?,
                candle_nn::rotary_emb::rope_slow(&k, &cos, &sin)?,
            ),
        };
        let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?);
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&mask)?;
        let attn = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
        let attn = attn.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        x = (x + proj(ProjKind::O, &attn)?)?;
        let h = candle_nn::ops::rms_norm_slow(&x, &layer.mlp_norm, eps)?;
        let act = (candle_nn::ops::silu(&proj(ProjKind::Gate, &h)?)? * proj(ProjKind::Up, &h)?)?;
        x = (x + proj(ProjKind::Down, &act)?)?;
    }
    ensure!(from < t, "logits from position {from} of {t}");
    let x = x.narrow(1, from, t - from)?;
    let h = candle_nn::ops::rms_norm_slow(&x, &base.final_norm, eps)?;
    let steer_head = tr.steer_head.as_ref().unwrap_or(&tr.steer_embed);
    let vocab = frozen_matmul(&h, &base.head)?;
    let steer = h.broadcast_matmul(&steer_head.as_tensor().t()?)?;
    Ok(Tensor::cat(&[vocab, steer], D::Minus1)?)
}

/// x @ wᵀ for a frozen w. candle's matmul backward computes the gradient of
/// both operands — for a frozen weight, a second matmul as large as the
/// forward that is thrown away; this op's backward gives the input's only.
fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })?)
}

struct FrozenMatmul {
    /// (out, in)
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-matmul: input not contiguous".into()))?;
        let x = match storage {
            CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], layout.shape(), &Device::Cpu)?,
            CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], layout.shape(), &Device::Cpu)?,
            _ => {
                return Err(candle_core::Error::Msg(
                    "frozen-matmul: f32 or f64 only".into(),
                ))
            }
        };
        let y = x.broadcast_matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        let flat = y.flatten_all()?;
        let out = match flat.dtype() {
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            _ => CpuStorage::F32(flat.to_vec1()?),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.broadcast_matmul(&self.w)?))
    }
}

/// x (b, t, in) → (b, t, out): frozen weight plus the LoRA delta.
fn project(
    layer: &FrozenLayer,
    lora: &[Option<LoraVars>],
    kind: ProjKind,
    x: &Tensor,
    tr: &Trainable,
    train: bool,
) -> Result<Tensor> {
    let mut y = frozen_matmul(x, &layer.weights[kind.index()])?;
    if let Some(bias) = &layer.biases[kind.index()] {
        y = y.broadcast_add(bias)?;
    }
    if let Some(l) = &lora[kind.index()] {
        let input = if train && tr.dropout > 0.0 {
            candle_nn::ops::dropout(x, tr.dropout)?
        } else {
            x.clone()
        };
        let delta = input
            .broadcast_matmul(&l.a.as_tensor().t()?)?
            .broadcast_matmul(&l.b.as_tensor().t()?)?;
        y = (y + (delta * tr.scale)?)?;
    }
    Ok(y)
}

fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, hd))?
        .reshape((b, kv * n, t, hd))?)
}

/// 0 on and below the diagonal, a large negative number above.
fn causal_mask(t: usize, dtype: DType) -> Result<Tensor> {
    let v: Vec<f32> = (0..t * t)
        .map(|i| if i % t > i / t { -1e9 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(v, (t, t), &Device::Cpu)?.to_dtype(dtype)?)
}
