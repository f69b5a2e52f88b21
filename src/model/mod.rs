//! A llama-family decoder (llama, SmolLM, Qwen2, Mistral) on candle.
//!
//! Serving runs a *step*: any number of sequences, each contributing some
//! rows (a prefill chunk, or one decode token). Projections and the MLP run as
//! one matmul over all rows of the step; attention runs per sequence against
//! its own cache. Inputs are embeddings, not ids, so adapters can add rows.

mod attention;
pub mod config;
mod kv_cache;
pub mod linear;
mod load;
mod qmatmul;

pub use config::{ModelConfig, RopeStyle};
pub use kv_cache::KvCache;
pub use linear::{Lora, LoraSet, ProjKind};
pub use load::{load_model, model_id, LoadedModel, ModelSource};

use anyhow::{bail, ensure, Result};
use attention::{AttnSeq, AttnShape, Rope};
use candle_core::{DType, Device, Tensor};
use linear::Proj;

pub struct Layer {
    pub attn_norm: Tensor,
    /// q, k, v, o, gate, up, down, in `ProjKind` order.
    pub projs: [Proj; 7],
    pub mlp_norm: Tensor,
}

pub struct Model {
    pub config: ModelConfig,
    /// (vocab, hidden) f32.
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    head: Proj,
    rope: Rope,
    device: Device,
}

/// Which positions of a segment need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that is not the last one).
    None,
    /// The last row only (sampling the next token).
    Last,
    /// Every row (prompt log-probabilities).
    All,
}

/// One sequence's part of a step.
pub struct Segment<'a> {
    /// (rows, hidden) input embeddings.
    pub embeds: Tensor,
    pub cache: &'a mut KvCache,
    pub lora: Option<&'a LoraSet>,
    /// Extra output rows (k, hidden) whose logits are appended after the
    /// vocabulary's (an adapter's steering tokens).
    pub extra_head: Option<&'a Tensor>,
    pub logits: Logits,
}

impl Model {
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The longest sequence the rotary table covers.
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.config.num_layers,
            self.config.num_kv_heads * self.config.head_dim,
        )
    }

    /// Embedding rows for token ids (all must be < vocab_size).
    pub fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.config.vocab_size as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            bail!("token id {bad} is outside the vocabulary (size {vocab})");
        }
        let ids = Tensor::new(ids, &self.device)?;
        Ok(self.embed.index_select(&ids, 0)?)
    }

    /// The embedding matrix (vocab, hidden), f32.
    pub fn embeddings(&self) -> &Tensor {
        &self.embed
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn final_norm(&self) -> &Tensor {
        &self.final_norm
    }

    /// The output head as a dense (vocab, hidden) matrix (for training).
    pub fn head_dense(&self) -> Result<Tensor> {
        self.head.weight.to_dense()
    }

    /// Runs one step and returns, per segment, its logits (rows, vocab [+ extra]);
    /// an empty tensor for segments that asked for none. On error, caches are
    /// rolled back to where they were.
    pub fn forward(&self, segs: &mut [Segment]) -> Result<Vec<Tensor>> {
        let starts: Vec<usize> = segs.iter().map(|s| s.cache.len()).collect();
        let result = self.forward_inner(segs, &starts);
        if result.is_err() {
            for (seg, &start) in segs.iter_mut().zip(&starts) {
                seg.cache.truncate(start);
            }
        }
        result
    }

    fn forward_inner(&self, segs: &mut [Segment], starts: &[usize]) -> Result<Vec<Tensor>> {
        let cfg = &self.config;
        let lens: Vec<usize> = segs
            .iter()
            .map(|s| s.embeds.dim(0))
            .collect::<Result<_, _>>()?;
        for (len, start) in lens.iter().zip(starts) {
            ensure!(
                start + len <= self.max_positions(),
                "sequence of {} positions exceeds the context of {}",
                start + len,
                self.max_positions()
            );
        }
        let embeds: Vec<&Tensor> = segs.iter().map(|s| &s.embeds).collect();
        let mut x = Tensor::cat(&embeds, 0)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_norm_eps as f32)?;
            let attn = self.attention(l, layer, &h, segs, &lens, starts)?;
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, cfg.rms_norm_eps as f32)?;
            let gate_up =
                self.project_many(l, layer, &[ProjKind::Gate, ProjKind::Up], &h, segs, &lens)?;
            let act = (candle_nn::ops::silu(&gate_up[0])? * &gate_up[1])?;
            x = (x + self.project(l, layer, ProjKind::Down, &act, segs, &lens)?)?;
        }
        for (seg, &len) in segs.iter_mut().zip(&lens) {
            seg.cache.commit(len);
        }
        self.logits(&x, segs, &lens)
    }

    /// A projection over all rows, plus each segment's LoRA delta on its rows.
    fn project(
        &self,
        l: usize,
        layer: &Layer,
        kind: ProjKind,
        x: &Tensor,
        segs: &[Segment],
        lens: &[usize],
    ) -> Result<Tensor> {
        Ok(self
            .project_many(l, layer, &[kind], x, segs, lens)?
            .remove(0))
    }

    /// Several projections of the same input (q/k/v, gate/up) in one pass.
    fn project_many(
        &self,
        l: usize,
        layer: &Layer,
        kinds: &[ProjKind],
        x: &Tensor,
        segs: &[Segment],
        lens: &[usize],
    ) -> Result<Vec<Tensor>> {
        let projs: Vec<&Proj> = kinds.iter().map(|k| &layer.projs[k.index()]).collect();
        let mut ys = linear::forward_many(&projs, x)?;
        let with_lora = |kind: ProjKind| {
            segs.iter()
                .any(|s| s.lora.and_then(|set| set.get(l, kind)).is_some())
        };
        if !kinds.iter().any(|&k| with_lora(k)) {
            return Ok(ys);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let width = x.dim(1)?;
        for (y, &kind) in ys.iter_mut().zip(kinds) {
            if !with_lora(kind) {
                continue;
            }
            let out = y.dim(1)?;
            let mut yv: Vec<f32> = y.flatten_all()?.to_vec1()?;
            let mut offset = 0;
            for (seg, &len) in segs.iter().zip(lens) {
                if let Some(lora) = seg.lora.and_then(|set| set.get(l, kind)) {
                    lora.add_to(
                        &xs[offset * width..(offset + len) * width],
                        &mut yv[offset * out..(offset + len) * out],
                    );
                }
                offset += len;
            }
            *y = Tensor::from_vec(yv, (offset, out), &self.device)?;
        }
        Ok(ys)
    }

    fn attention(
        &self,
        l: usize,
        layer: &Layer,
        h: &Tensor,
        segs: &mut [Segment],
        lens: &[usize],
        starts: &[usize],
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        // q/k/v become plain rows here anyway (RoPE, the caches): they are
        // computed as rows, and their LoRA deltas added to those rows.
        let qkv: Vec<&Proj> = [ProjKind::Q, ProjKind::K, ProjKind::V]
            .iter()
            .map(|k| &layer.projs[k.index()])
            .collect();
        let hs: Vec<f32> = h.flatten_all()?.to_vec1()?;
        let [mut q, mut k, mut v]: [Vec<f32>; 3] = linear::forward_many_rows(&qkv, h, &hs)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("q/k/v projection count"))?;
        add_lora_rows(
            l,
            &hs,
            segs,
            lens,
            [
                (ProjKind::Q, &mut q),
                (ProjKind::K, &mut k),
                (ProjKind::V, &mut v),
            ],
        );
        let (mut qo, mut ko) = (0, 0);
        for ((seg, &len), &start) in segs.iter_mut().zip(lens).zip(starts) {
            let q_rows = &mut q[qo..qo + len * nh * hd];
            self.rope.apply(q_rows, nh * hd, hd, start);
            let k_rows = &mut k[ko..ko + len * nkv * hd];
            self.rope.apply(k_rows, nkv * hd, hd, start);
            seg.cache.append(l, k_rows, &v[ko..ko + len * nkv * hd]);
            qo += len * nh * hd;
            ko += len * nkv * hd;
        }
        let mut qo = 0;
        let seqs: Vec<AttnSeq> = segs
            .iter()
            .zip(lens)
            .zip(starts)
            .map(|((seg, &len), &start)| {
                let cache = seg.cache.layer(l);
                let s = AttnSeq {
                    q: &q[qo..qo + len * nh * hd],
                    k: &cache.k,
                    v: &cache.v,
                    start,
                };
                qo += len * nh * hd;
                s
            })
            .collect();
        let mut out = vec![0f32; q.len()];
        let shape = AttnShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            sliding_window: cfg.sliding_window,
        };
        attention::attend(&seqs, shape, &mut out);
        let rows: usize = lens.iter().sum();
        let out = Tensor::from_vec(out, (rows, nh * hd), &self.device)?;
        self.project(l, layer, ProjKind::O, &out, segs, lens)
    }

    /// Final norm and head on the rows that need logits, one matmul for all.
    fn logits(&self, x: &Tensor, segs: &[Segment], lens: &[usize]) -> Result<Vec<Tensor>> {
        let mut picked = Vec::new();
        let mut spans = Vec::with_capacity(segs.len());
        let mut offset = 0u32;
        for (seg, &len) in segs.iter().zip(lens) {
            let len = len as u32;
            let rows: Vec<u32> = match seg.logits {
                Logits::None => vec![],
                Logits::Last => vec![offset + len - 1],
                Logits::All => (offset..offset + len).collect(),
            };
            spans.push((picked.len(), rows.len()));
            picked.extend(rows);
            offset += len;
        }
        if picked.is_empty() {
            return Ok(segs
                .iter()
                .map(|_| Tensor::zeros((0, 0), DType::F32, &self.device))
                .collect::<Result<_, _>>()?);
        }
        let idx = Tensor::new(picked.as_slice(), &self.device)?;
        let hidden = x.index_select(&idx, 0)?;
        let hidden =
            candle_nn::ops::rms_norm(&hidden, &self.final_norm, self.config.rms_norm_eps as f32)?;
        let logits = self.head.forward(&hidden)?;
        let mut result = Vec::with_capacity(segs.len());
        for (seg, (start, n)) in segs.iter().zip(spans) {
            if n == 0 {
                result.push(Tensor::zeros((0, 0), DType::F32, &self.device)?);
                continue;
            }
            let mut seg_logits = logits.narrow(0, start, n)?;
            if let Some(extra) = seg.extra_head {
                let h = hidden.narrow(0, start, n)?;
                let more = h.matmul(&extra.t()?)?;
                seg_logits = Tensor::cat(&[&seg_logits, &more], 1)?;
            }
            result.push(seg_logits);
        }
        Ok(result)
    }
}

/// Adds each segment's LoRA deltas to projection outputs held as rows
/// (xs: the projections' input rows).
fn add_lora_rows<const N: usize>(
    l: usize,
    xs: &[f32],
    segs: &[Segment],
    lens: &[usize],
    outputs: [(ProjKind, &mut Vec<f32>); N],
) {
    use rayon::prelude::*;
    let rows: usize = lens.iter().sum();
    let width = xs.len() / rows.max(1);
    // On the compute pool, one projection per worker: serial work here
    // would let the other workers fall asleep between the layer's matmuls,
    // and waking them costs more than the deltas themselves.
    outputs.into_par_iter().for_each(|(kind, y)| {
        let out = y.len() / rows.max(1);
        let mut offset = 0;
        for (seg, &len) in segs.iter().zip(lens) {
            if let Some(lora) = seg.lora.and_then(|set| set.get(l, kind)) {
                lora.add_to(
                    &xs[offset * width..(offset + len) * width],
                    &mut y[offset * out..(offset + len) * out],
                );
            }
            offset += len;
        }
    });
}
