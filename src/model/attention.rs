//! Rotary embeddings and causal attention on plain f32 slices.
//!
//! Serving attends each sequence against its own cache, with a different
//! length per sequence; doing that with tensor ops would cost a dozen small
//! kernel launches per sequence and layer. Written as loops, it is one pass
//! over the cache, parallel over (row, head).

use super::config::RopeStyle;
use rayon::prelude::*;

/// Precomputed cos/sin for every position up to `max_positions`.
#[derive(Debug, Clone)]
pub struct Rope {
    style: RopeStyle,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(inv_freqs: &[f32], style: RopeStyle, max_positions: usize) -> Self {
        let half = inv_freqs.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for f in inv_freqs {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            style,
            half,
            cos,
            sin,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates every head of `rows` (rows × row_len floats, heads of
    /// `head_dim`), row i being at position `start + i`.
    pub fn apply(&self, rows: &mut [f32], row_len: usize, head_dim: usize, start: usize) {
        for (i, row) in rows.chunks_exact_mut(row_len).enumerate() {
            for head in row.chunks_exact_mut(head_dim) {
                self.rotate(head, start + i);
            }
        }
    }

    /// Rotates every head of `rows` as at position `pos`, all of them (the
    /// candidates of branch rows share one position).
    pub fn apply_at(&self, rows: &mut [f32], head_dim: usize, pos: usize) {
        for head in rows.chunks_exact_mut(head_dim) {
            self.rotate(head, pos);
        }
    }

    fn rotate(&self, head: &mut [f32], pos: usize) {
        let c = &self.cos[pos * self.half..(pos + 1) * self.half];
        let s = &self.sin[pos * self.half..(pos + 1) * self.half];
        match self.style {
            RopeStyle::Interleaved => {
                for j in 0..self.half {
                    let (x0, x1) = (head[2 * j], head[2 * j + 1]);
                    head[2 * j] = x0 * c[j] - x1 * s[j];
                    head[2 * j + 1] = x0 * s[j] + x1 * c[j];
                }
            }
            RopeStyle::Halves => {
                for j in 0..self.half {
                    let (x0, x1) = (head[j], head[j + self.half]);
                    head[j] = x0 * c[j] - x1 * s[j];
                    head[j + self.half] = x0 * s[j] + x1 * c[j];
                }
            }
        }
    }
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
}

/// The rows of one sequence in a step: queries `q` (len × heads × head_dim)
/// at positions `start..start+len`, against cached `k`/`v` that already hold
/// positions `0..start+len`.
pub struct AttnSeq<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub start: usize,
    /// For a branch row (one query at `start`): its own key and value rows,
    /// which stand in for position `start` (the cache holds `0..start`).
    pub own: Option<(&'a [f32], &'a [f32])>,
}

thread_local! {
    /// Attention scores of one (row, head), reused: one allocation per
    /// thread instead of one per row and head.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Computes softmax(q·kᵀ/√d)·v for every (row, head) of every sequence, causal.
/// `out` has the same layout as the concatenated queries.
pub fn attend(seqs: &[AttnSeq], shape: AttnShape, out: &mut [f32]) {
    let AttnShape {
        num_heads,
        num_kv_heads,
        head_dim,
        sliding_window,
    } = shape;
    let group = num_heads / num_kv_heads;
    let kv_row = num_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    // (sequence, row within it) for each output row, so work can be split per head.
    let mut owners = Vec::with_capacity(out.len() / (num_heads * head_dim));
    for (s, seq) in seqs.iter().enumerate() {
        for i in 0..seq.q.len() / (num_heads * head_dim) {
            owners.push((s, i));
        }
    }
    let work = |(item, o): (usize, &mut [f32])| {
        let (s, i) = owners[item / num_heads];
        let h = item % num_heads;
        let seq = &seqs[s];
        let q = &seq.q[(i * num_heads + h) * head_dim..][..head_dim];
        let pos = seq.start + i;
        let lo = sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let g = h / group;
        // Where head group g of position t lies in a cached key or value row.
        let head = |t: usize| {
            let start = t * kv_row + g * head_dim;
            start..start + head_dim
        };
        // Positions lo..=pos come from the cache, except a branch row's own
        // position, whose key and value it brings.
        let cached_end = if seq.own.is_some() { pos } else { pos + 1 };
        let own = seq.own.map(|(k, v)| {
            (
                &k[g * head_dim..][..head_dim],
                &v[g * head_dim..][..head_dim],
            )
        });
        SCORES.with_borrow_mut(|scores| {
            scores.clear();
            scores.extend((lo..cached_end).map(|t| dot(q, &seq.k[head(t)]) * scale));
            if let Some((k, _)) = own {
                scores.push(dot(q, k) * scale);
            }
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for x in scores.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            o.fill(0.0);
            for (t, p) in (lo..cached_end).zip(scores.iter()) {
                axpy(p / sum, &seq.v[head(t)], o);
            }
            if let (Some((_, v)), Some(p)) = (own, scores.last()) {
                axpy(p / sum, v, o);
            }
        });
    };
    // Query rows × keys attended, roughly: below a few thousand, waking
    // another thread costs more than the work.
    let pairs: usize = seqs
        .iter()
        .map(|s| {
            let rows = s.q.len() / (num_heads * head_dim);
            rows * (s.start + rows)
        })
        .sum::<usize>()
        * num_heads;
    if pairs < 4_096 {
        out.chunks_exact_mut(head_dim).enumerate().for_each(work);
    } else {
        out.par_chunks_exact_mut(head_dim)
            .enumerate()
            .with_min_len(4)
            .for_each(work);
    }
}

/// Dot product with eight independent accumulators, so it vectorizes.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// out += alpha · x
#[inline]
fn axpy(alpha: f32, x: &[f32], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention over one key is that key's value; over equal keys, the mean.
    #[test]
    fn attention_averages_equal_keys() {
        let shape = AttnShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
            sliding_window: None,
        };
        let q = [1.0, 0.0, 0.0, 1.0];
        let k = [1.0, 1.0, 1.0, 1.0];
        let v = [2.0, 4.0, 6.0, 8.0];
        let seqs = [AttnSeq {
            q: &q,
            k: &k,
            v: &v,
            start: 1,
            own: None,
        }];
        let mut out = [0.0; 4];
        attend(&seqs, shape, &mut out);
        assert_eq!(out, [4.0, 6.0, 4.0, 6.0]);
    }

    #[test]
    fn rope_keeps_norm_and_position_zero_is_identity() {
        let rope = Rope::new(&[1.0, 0.1], RopeStyle::Halves, 8);
        let mut x = [1.0, 2.0, 3.0, 4.0];
        rope.apply(&mut x, 4, 4, 0);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
        rope.apply(&mut x, 4, 4, 5);
        let norm: f32 = x.iter().map(|v| v * v).sum();
        assert!((norm - 30.0).abs() < 1e-4);
    }
}
