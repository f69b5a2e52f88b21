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
mod lora;
mod qmatmul;
mod vecmath;

pub use config::{ModelConfig, RopeStyle};
pub use kv_cache::KvCache;
pub use linear::ProjKind;
pub use load::{load_model, model_id, LoadedModel, ModelSource};
pub use lora::{Lora, LoraSet};

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
    /// Extra output rows (k, hidden), an adapter's steering tokens: the
    /// segment's last row gets its logits against them alone
    /// ([`SegmentLogits::extra`]), whatever `logits` asks of the vocabulary.
    pub extra_head: Option<&'a Tensor>,
    /// Which rows get logits over the vocabulary (branch rows always do).
    pub logits: Logits,
    /// Candidate tokens for the position after this segment's rows, as
    /// (n, hidden) embeddings: each runs as one more row at that position,
    /// attending to the sequence and itself but not to the other candidates.
    /// Their logits follow the segment's; their keys and values are held as
    /// the cache's branches until the caller keeps one
    /// (`KvCache::keep_branch`). A steered sequence runs its K steering
    /// tokens this way with the prompt's last chunk, so the drawn one costs
    /// no forward step of its own.
    pub branches: Option<&'a Tensor>,
}

/// One segment's logits from a step.
pub struct SegmentLogits {
    /// (n, vocab): the rows its `Logits` asks for, then one per branch;
    /// (0, 0) when there are none.
    pub rows: Tensor,
    /// The last row's logits against the segment's `extra_head`, if any.
    pub extra: Option<Vec<f32>>,
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

    /// Runs one step and returns each segment's logits. On error, caches
    /// are rolled back to where they were.
    pub fn forward(&self, segs: &mut [Segment]) -> Result<Vec<SegmentLogits>> {
        let starts: Vec<usize> = segs.iter().map(|s| s.cache.len()).collect();
        let result = self.forward_inner(segs, &starts);
        if result.is_err() {
            for (seg, &start) in segs.iter_mut().zip(&starts) {
                seg.cache.truncate(start);
            }
        }
        result
    }

    fn forward_inner(&self, segs: &mut [Segment], starts: &[usize]) -> Result<Vec<SegmentLogits>> {
        let cfg = &self.config;
        let mut rows = Vec::with_capacity(segs.len());
        for (seg, &start) in segs.iter_mut().zip(starts) {
            seg.cache.clear_branches();
            let r = SegRows {
                start,
                len: seg.embeds.dim(0)?,
                branches: seg.branches.map_or(Ok(0), |b| b.dim(0))?,
            };
            let positions = r.start + r.len + usize::from(r.branches > 0);
            ensure!(
                positions <= self.max_positions(),
                "sequence of {positions} positions exceeds the context of {}",
                self.max_positions()
            );
            rows.push(r);
        }
        // Each segment's rows, then its branch rows.
        let inputs: Vec<&Tensor> = segs
            .iter()
            .flat_map(|s| std::iter::once(&s.embeds).chain(s.branches))
            .collect();
        let mut x = Tensor::cat(&inputs, 0)?;
        let spans: Vec<usize> = rows.iter().map(|r| r.len + r.branches).collect();
        for (l, layer) in self.layers.iter().enumerate() {
            let attn = self.attention(l, layer, &x, segs, &rows, &spans)?;
            x = (x + attn)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, cfg.rms_norm_eps as f32)?;
            let gate_up =
                self.project_many(l, layer, &[ProjKind::Gate, ProjKind::Up], &h, segs, &spans)?;
            let act = vecmath::silu_mul(&gate_up[0], &gate_up[1])?;
            x = (x + self.project(l, layer, ProjKind::Down, &act, segs, &spans)?)?;
        }
        for (seg, r) in segs.iter_mut().zip(&rows) {
            seg.cache.commit(r.len);
        }
        self.logits(&x, segs, &rows)
    }

    /// A projection over all rows, plus each segment's LoRA delta on its rows.
    fn project(
        &self,
        l: usize,
        layer: &Layer,
        kind: ProjKind,
        x: &Tensor,
        segs: &[Segment],
        spans: &[usize],
    ) -> Result<Tensor> {
        Ok(self
            .project_many(l, layer, &[kind], x, segs, spans)?
            .remove(0))
    }

    /// Several projections of the same input (gate/up) in one pass.
    fn project_many(
        &self,
        l: usize,
        layer: &Layer,
        kinds: &[ProjKind],
        x: &Tensor,
        segs: &[Segment],
        spans: &[usize],
    ) -> Result<Vec<Tensor>> {
        if !has_lora(l, segs, kinds) {
            let projs: Vec<&Proj> = kinds.iter().map(|k| &layer.projs[k.index()]).collect();
            return linear::forward_many(&projs, x);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let rows = x.dim(0)?;
        self.project_rows(l, layer, kinds, x, &xs, segs, spans)?
            .into_iter()
            .map(|y| {
                let out = y.len() / rows.max(1);
                Ok(Tensor::from_vec(y, (rows, out), &self.device)?)
            })
            .collect()
    }

    /// Projections of the same input `x` (also as plain rows, `xs`) over
    /// all rows, as plain rows, each segment's LoRA deltas added to its rows.
    ///
    /// The deltas run as one more task of the projections' parallel pass
    /// (see [`qmatmul::forward_rows_beside`]). The thread that starts the
    /// pass takes it first and reads the layer's LoRA weights, a latency-
    /// bound walk, while the other worker streams base weights. No thread
    /// waits on it apart from the pass's own end, as for any task.
    #[allow(clippy::too_many_arguments)]
    fn project_rows(
        &self,
        l: usize,
        layer: &Layer,
        kinds: &[ProjKind],
        x: &Tensor,
        xs: &[f32],
        segs: &[Segment],
        spans: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let projs: Vec<&Proj> = kinds.iter().map(|k| &layer.projs[k.index()]).collect();
        if !has_lora(l, segs, kinds) {
            return linear::forward_many_rows(&projs, x, xs);
        }
        let rows = spans.iter().sum();
        // The deltas' layout is worked out in the task too: its lookups into
        // the adapter's set miss the cache as the weights do, and only the
        // task runs beside the pass.
        let update = || {
            for set in distinct_lora_sets(segs) {
                set.warm(l);
            }
            let parts = delta_parts(l, segs, rows, kinds);
            let deltas = lora_deltas(l, xs, segs, spans, kinds, &parts, SPARE_DELTAS.take());
            (parts, deltas)
        };
        let (mut ys, (parts, deltas)) = linear::forward_many_rows_beside(&projs, x, xs, &update)?;
        for (y, part) in ys.iter_mut().zip(&parts) {
            if let Some(part) = part {
                y.iter_mut()
                    .zip(&deltas[part.clone()])
                    .for_each(|(y, d)| *y += d);
            }
        }
        SPARE_DELTAS.set(deltas);
        Ok(ys)
    }

    /// The attention block on the residual stream `x` (its norm included).
    fn attention(
        &self,
        l: usize,
        layer: &Layer,
        x: &Tensor,
        segs: &mut [Segment],
        rows: &[SegRows],
        spans: &[usize],
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let [mut q, mut k, v] = self.project_qkv(l, layer, x, segs, spans)?;
        let (q_row, kv_row) = (nh * hd, nkv * hd);
        let (mut qo, mut ko) = (0, 0);
        for (seg, r) in segs.iter_mut().zip(rows) {
            let start = r.start;
            let q_rows = &mut q[qo..qo + r.len * q_row];
            self.rope.apply(q_rows, q_row, hd, start);
            let k_rows = &mut k[ko..ko + r.len * kv_row];
            self.rope.apply(k_rows, kv_row, hd, start);
            seg.cache.append(l, k_rows, &v[ko..ko + r.len * kv_row]);
            (qo, ko) = (qo + r.len * q_row, ko + r.len * kv_row);
            // Branch rows all sit at the next position; their keys and
            // values wait beside the cache.
            let next = start + r.len;
            self.rope
                .apply_at(&mut q[qo..qo + r.branches * q_row], hd, next);
            let k_rows = &mut k[ko..ko + r.branches * kv_row];
            self.rope.apply_at(k_rows, hd, next);
            seg.cache
                .append_branches(l, k_rows, &v[ko..ko + r.branches * kv_row]);
            (qo, ko) = (qo + r.branches * q_row, ko + r.branches * kv_row);
        }
        let (mut qo, mut ko) = (0, 0);
        let mut seqs: Vec<AttnSeq> = Vec::with_capacity(segs.len());
        for (seg, r) in segs.iter().zip(rows) {
            let (cache, start) = (seg.cache.layer(l), r.start);
            seqs.push(AttnSeq {
                q: &q[qo..qo + r.len * q_row],
                k: &cache.k,
                v: &cache.v,
                start,
                own: None,
            });
            (qo, ko) = (qo + r.len * q_row, ko + r.len * kv_row);
            for _ in 0..r.branches {
                seqs.push(AttnSeq {
                    q: &q[qo..qo + q_row],
                    k: &cache.k,
                    v: &cache.v,
                    start: start + r.len,
                    own: Some((&k[ko..ko + kv_row], &v[ko..ko + kv_row])),
                });
                (qo, ko) = (qo + q_row, ko + kv_row);
            }
        }
        let mut out = vec![0f32; q.len()];
        let shape = AttnShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            sliding_window: cfg.sliding_window,
        };
        attention::attend(&seqs, shape, &mut out);
        let total: usize = spans.iter().sum();
        let out = Tensor::from_vec(out, (total, nh * hd), &self.device)?;
        self.project(l, layer, ProjKind::O, &out, segs, spans)
    }

    /// q/k/v of the normed `x` as plain rows (RoPE and the caches work on
    /// rows anyway), each segment's LoRA deltas added to its rows.
    fn project_qkv(
        &self,
        l: usize,
        layer: &Layer,
        x: &Tensor,
        segs: &[Segment],
        spans: &[usize],
    ) -> Result<[Vec<f32>; 3]> {
        let kinds = [ProjKind::Q, ProjKind::K, ProjKind::V];
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, self.config.rms_norm_eps as f32)?;
        let hs: Vec<f32> = h.flatten_all()?.to_vec1()?;
        self.project_rows(l, layer, &kinds, &h, &hs, segs, spans)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("q/k/v projection count"))
    }

    /// Final norm and head on the rows that need logits, one matmul for all;
    /// each segment's last row against its extra head, if it has one.
    ///
    /// A steered prompt's last row needs only the steering tokens' logits
    /// (for the prior), so the head, a pass over the whole vocabulary, runs
    /// on its branch rows alone.
    fn logits(&self, x: &Tensor, segs: &[Segment], rows: &[SegRows]) -> Result<Vec<SegmentLogits>> {
        let LogitRows {
            picked,
            spans,
            vocab_rows,
        } = logit_rows(segs, rows)?;
        let empty = || Tensor::zeros((0, 0), DType::F32, &self.device);
        if picked.is_empty() {
            return segs
                .iter()
                .map(|_| {
                    Ok(SegmentLogits {
                        rows: empty()?,
                        extra: None,
                    })
                })
                .collect();
        }
        let idx = Tensor::new(picked.as_slice(), &self.device)?;
        let hidden = x.index_select(&idx, 0)?;
        let hidden =
            candle_nn::ops::rms_norm(&hidden, &self.final_norm, self.config.rms_norm_eps as f32)?;
        let logits = match vocab_rows {
            0 => None,
            n => Some(self.head.forward(&hidden.narrow(0, 0, n)?)?),
        };
        let mut next_extra = vocab_rows;
        let mut result = Vec::with_capacity(segs.len());
        for (seg, (start, n)) in segs.iter().zip(spans) {
            let rows = match &logits {
                Some(logits) if n > 0 => logits.narrow(0, start, n)?,
                _ => empty()?,
            };
            let extra = match seg.extra_head {
                Some(head) => {
                    let h = hidden.narrow(0, next_extra, 1)?;
                    next_extra += 1;
                    Some(h.matmul(&head.t()?)?.flatten_all()?.to_vec1()?)
                }
                None => None,
            };
            result.push(SegmentLogits { rows, extra });
        }
        Ok(result)
    }
}

/// A segment's rows in a step: `len` positions from `start` (the positions
/// its cache held before the step) that it adds to its cache, then
/// `branches` candidate rows for the position after them.
#[derive(Debug, Clone, Copy)]
struct SegRows {
    start: usize,
    len: usize,
    branches: usize,
}

/// The rows of a step that need logits (see [`logit_rows`]).
struct LogitRows {
    /// For the vocabulary, segment after segment (the rows each `Logits`
    /// asks for, then its branches); then each extra head's row.
    picked: Vec<u32>,
    /// Each segment's (start, count) among the vocabulary rows.
    spans: Vec<(usize, usize)>,
    /// How many of `picked` are vocabulary rows.
    vocab_rows: usize,
}

/// The rows of a step that need logits, in the order [`LogitRows`] says.
fn logit_rows(segs: &[Segment], rows: &[SegRows]) -> Result<LogitRows> {
    let (mut picked, mut extra_rows) = (Vec::new(), Vec::new());
    let mut spans = Vec::with_capacity(segs.len());
    let mut offset = 0u32;
    for (seg, r) in segs.iter().zip(rows) {
        let (len, branches) = (r.len as u32, r.branches as u32);
        ensure!(
            len > 0 || (seg.logits != Logits::Last && seg.extra_head.is_none()),
            "logits asked of a segment without rows"
        );
        let mut wanted: Vec<u32> = match seg.logits {
            Logits::None => vec![],
            Logits::Last => vec![offset + len - 1],
            Logits::All => (offset..offset + len).collect(),
        };
        wanted.extend(offset + len..offset + len + branches);
        spans.push((picked.len(), wanted.len()));
        picked.extend(wanted);
        if seg.extra_head.is_some() {
            extra_rows.push(offset + len - 1);
        }
        offset += len + branches;
    }
    let vocab_rows = picked.len();
    picked.extend(extra_rows);
    Ok(LogitRows {
        picked,
        spans,
        vocab_rows,
    })
}

/// Each adapter's LoRA set once, however many segments use it.
fn distinct_lora_sets<'a, 'b>(segs: &'b [Segment<'a>]) -> impl Iterator<Item = &'a LoraSet> + 'b {
    segs.iter().enumerate().filter_map(|(i, seg)| {
        let set = seg.lora?;
        let seen = segs[..i]
            .iter()
            .any(|s| s.lora.is_some_and(|s| std::ptr::eq(s, set)));
        (!seen).then_some(set)
    })
}

/// Whether any segment's adapter has a LoRA on one of these projections.
fn has_lora(l: usize, segs: &[Segment], kinds: &[ProjKind]) -> bool {
    segs.iter().any(|s| {
        s.lora
            .is_some_and(|set| kinds.iter().any(|&k| set.has(l, k)))
    })
}

thread_local! {
    /// The last delta buffer `project_rows` used, for the next one: fresh
    /// allocations cost a decode step's update more than one would think
    /// (see `lora::with_input`). It keeps the size of the largest step
    /// (a prefill chunk), a few megabytes at most.
    static SPARE_DELTAS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Where `lora_deltas` puts each projection's deltas in its flat buffer,
/// by position in `kinds`: rows × out for each kind that some segment's
/// adapter updates, in order; None for the others.
type DeltaParts = [Option<std::ops::Range<usize>>; ProjKind::ALL.len()];

fn delta_parts(l: usize, segs: &[Segment], rows: usize, kinds: &[ProjKind]) -> DeltaParts {
    let mut parts = DeltaParts::default();
    let mut end = 0;
    for (part, &kind) in parts.iter_mut().zip(kinds) {
        let lora = segs
            .iter()
            .find_map(|s| s.lora.and_then(|set| set.get(l, kind)));
        if let Some(lora) = lora {
            *part = Some(end..end + rows * lora.out_dim());
            end += rows * lora.out_dim();
        }
    }
    parts
}

/// Each segment's LoRA deltas on its rows of input `xs` (`spans`: rows per
/// segment, branches included), laid out as `parts` says (zero on other
/// segments' rows), in `buffer`'s memory. Callers run this inside the
/// projections' own parallel pass, so the deltas cost no pass of their
/// own: a pass per layer for a few microseconds of work would let the
/// other compute worker fall asleep and cost more than the deltas.
fn lora_deltas(
    l: usize,
    xs: &[f32],
    segs: &[Segment],
    spans: &[usize],
    kinds: &[ProjKind],
    parts: &DeltaParts,
    mut buffer: Vec<f32>,
) -> Vec<f32> {
    let rows: usize = spans.iter().sum();
    buffer.clear();
    buffer.resize(
        parts.iter().flatten().map(|p| p.end).max().unwrap_or(0),
        0.0,
    );
    let width = xs.len() / rows.max(1);
    let mut offset = 0;
    for (seg, &len) in segs.iter().zip(spans) {
        let update_for = |kind| seg.lora.and_then(|set| set.get(l, kind));
        if kinds.iter().any(|&kind| update_for(kind).is_some()) {
            // Quantized once for every projection that reads these rows;
            // rows without an adapter are left alone.
            lora::with_input(
                &xs[offset * width..(offset + len) * width],
                width,
                |input| {
                    for (&kind, part) in kinds.iter().zip(parts) {
                        if let (Some(lora), Some(part)) = (update_for(kind), part) {
                            let out = lora.out_dim();
                            let delta = &mut buffer[part.clone()];
                            lora.add_quantized(
                                input,
                                &mut delta[offset * out..(offset + len) * out],
                            );
                        }
                    }
                },
            );
        }
        offset += len;
    }
    buffer
}
