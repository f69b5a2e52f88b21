//! Rotary embeddings and causal attention on plain f32 slices.
//!
//! Serving attends each sequence against its own cache, with a different
//! length per sequence; doing that with tensor ops would cost a dozen small
//! kernel launches per sequence and layer. Written as loops, it is one pass
//! over the cache, parallel over (row, key/value group); for head sizes 64
//! and 128 with AVX-512, each head's query and output stay in registers.

use super::config::RopeStyle;
use super::vecmath::softmax;
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
    /// Attention scores of one (row, key/value group), reused: one
    /// allocation per thread instead of one per row and group.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Computes softmax(q·kᵀ/√d)·v for every (row, head) of every sequence, causal.
/// `out` has the same layout as the concatenated queries.
///
/// Work is split per (row, key/value group): the query heads of a group
/// share each key and value row, so a row of the cache is read once for all
/// of them.
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
    // (sequence, row within it) for each output row, so work can be split per group.
    let mut owners = Vec::with_capacity(out.len() / (num_heads * head_dim));
    for (s, seq) in seqs.iter().enumerate() {
        for i in 0..seq.q.len() / (num_heads * head_dim) {
            owners.push((s, i));
        }
    }
    let work = |(item, o): (usize, &mut [f32])| {
        let (s, i) = owners[item / num_kv_heads];
        let g = item % num_kv_heads;
        let seq = &seqs[s];
        let q = &seq.q[(i * num_heads + g * group) * head_dim..][..group * head_dim];
        let pos = seq.start + i;
        let lo = sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        // Positions lo..=pos come from the cache, except a branch row's own
        // position, whose key and value it brings.
        let cached_end = if seq.own.is_some() { pos } else { pos + 1 };
        let own = seq.own.map(|(k, v)| {
            (
                &k[g * head_dim..][..head_dim],
                &v[g * head_dim..][..head_dim],
            )
        });
        // Group g's part of the cached rows lo..cached_end, then the own row.
        let cached = (lo * kv_row + g * head_dim, cached_end * kv_row);
        let keys = group_rows(seq.k, cached, kv_row, head_dim).chain(own.map(|(k, _)| k));
        let values = group_rows(seq.v, cached, kv_row, head_dim).chain(own.map(|(_, v)| v));
        SCORES.with_borrow_mut(|scores| {
            // The group's heads one after another: the first brings the
            // rows into cache, the others find them there.
            for (qh, oh) in q.chunks_exact(head_dim).zip(o.chunks_exact_mut(head_dim)) {
                let qh = Query { q: qh, scale };
                attend_head(qh, (keys.clone(), values.clone()), scores, oh);
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
    let chunk = group * head_dim;
    if pairs < 4_096 {
        out.chunks_exact_mut(chunk).enumerate().for_each(work);
    } else {
        out.par_chunks_exact_mut(chunk)
            .enumerate()
            .with_min_len(2)
            .for_each(work);
    }
}

/// The `head_dim` floats at `first`, `first + kv_row`, … before `end` of a
/// cache: one key/value head's part of consecutive positions.
fn group_rows(
    cache: &[f32],
    (first, end): (usize, usize),
    kv_row: usize,
    head_dim: usize,
) -> impl Iterator<Item = &[f32]> + Clone {
    cache
        .get(first..end)
        .unwrap_or(&[])
        .chunks(kv_row)
        .map(move |r| &r[..head_dim])
}

/// One query head and its score scale (1/√head_dim).
#[derive(Clone, Copy)]
struct Query<'a> {
    q: &'a [f32],
    scale: f32,
}

/// softmax(q·kᵀ·scale)·v for one query head over key and value rows of its
/// length, written to `out`. `scores` is scratch.
fn attend_head<'a>(
    query: Query,
    rows: (
        impl Iterator<Item = &'a [f32]>,
        impl Iterator<Item = &'a [f32]>,
    ),
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    match query.q.len() {
        64 => return avx512::attend_head::<4>(query, rows, scores, out),
        128 => return avx512::attend_head::<8>(query, rows, scores, out),
        _ => {}
    }
    let (keys, values) = rows;
    scores.clear();
    scores.extend(keys.map(|k| dot(query.q, k) * query.scale));
    softmax(scores);
    out.fill(0.0);
    for (v, &p) in values.zip(scores.iter()) {
        axpy(p, v, out);
    }
}

/// The usual head sizes (16·C floats) with query and output held in
/// registers, so each key and value row costs C loads and C multiply-adds.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod avx512 {
    use super::{softmax, Query};
    use std::arch::x86_64::*;

    /// The C 16-float blocks of a row of at least 16·C floats.
    #[inline(always)]
    fn blocks<const C: usize>(row: &[f32]) -> [__m512; C] {
        let row = &row[..16 * C];
        // SAFETY: block c reads row[16c..16c+16], inside the slice above.
        std::array::from_fn(|c| unsafe { _mm512_loadu_ps(row.as_ptr().add(16 * c)) })
    }

    #[inline]
    pub(super) fn attend_head<'a, const C: usize>(
        query: Query,
        (keys, values): (
            impl Iterator<Item = &'a [f32]>,
            impl Iterator<Item = &'a [f32]>,
        ),
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let q = blocks::<C>(query.q);
        // q·k in 16 lanes, not yet summed.
        let products = |k: &[f32]| {
            let k = blocks::<C>(k);
            // SAFETY (each unsafe block in this module): register-only
            // AVX-512F arithmetic, and the cfg on the module guarantees it.
            let mut acc = unsafe { _mm512_mul_ps(q[0], k[0]) };
            for c in 1..C {
                acc = unsafe { _mm512_fmadd_ps(q[c], k[c], acc) };
            }
            acc
        };
        // Keys four at a time: summing four vectors together takes fewer
        // shuffles than summing each alone.
        scores.clear();
        let mut four: [&[f32]; 4] = [&[]; 4];
        let mut held = 0;
        for k in keys {
            four[held] = k;
            held += 1;
            if held == 4 {
                let sums = sum4(four.map(products));
                scores.extend(sums.map(|s| s * query.scale));
                held = 0;
            }
        }
        for k in &four[..held] {
            scores.push(unsafe { _mm512_reduce_add_ps(products(k)) } * query.scale);
        }
        softmax(scores);
        let mut o = [unsafe { _mm512_setzero_ps() }; C];
        for (v, &p) in values.zip(scores.iter()) {
            let (v, p) = (blocks::<C>(v), unsafe { _mm512_set1_ps(p) });
            for c in 0..C {
                o[c] = unsafe { _mm512_fmadd_ps(p, v[c], o[c]) };
            }
        }
        let out = &mut out[..16 * C];
        for (c, block) in o.iter().enumerate() {
            // SAFETY: block c writes out[16c..16c+16], inside the slice above.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), *block) };
        }
    }

    /// The sums of four 16-lane vectors.
    #[inline(always)]
    fn sum4([a, b, c, d]: [__m512; 4]) -> [f32; 4] {
        // SAFETY: register-only AVX-512F arithmetic (guaranteed by the cfg) and
        // a 4-float store into a 4-float array.
        unsafe {
            // In each 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], and so for c, d.
            let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
            // In each 128-bit lane: partial sums [a, b, c, d].
            let x = _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(ab, cd),
                _mm512_shuffle_ps::<0b11_10_11_10>(ab, cd),
            );
            // Add the four 128-bit lanes: swap halves, then neighbours.
            let x = _mm512_add_ps(x, _mm512_shuffle_f32x4::<0b01_00_11_10>(x, x));
            let x = _mm512_add_ps(x, _mm512_shuffle_f32x4::<0b10_11_00_01>(x, x));
            let mut out = [0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), _mm512_castps512_ps128(x));
            out
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
use lanes_avx2::{axpy, dot};
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
use lanes_portable::{axpy, dot};

/// Dot product and axpy written with AVX2 intrinsics: left to itself the
/// compiler splits an eight-float accumulator into 2-float pieces here.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod lanes_avx2 {
    use std::arch::x86_64::*;

    /// a · b over their common length.
    #[inline]
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut i = 0;
        // SAFETY: every load reads 8 floats at i with i + 8 ≤ n, inside both
        // slices; the cfg above guarantees AVX2 and FMA.
        unsafe {
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            while i + 16 <= n {
                let x0 = _mm256_loadu_ps(pa.add(i));
                let x1 = _mm256_loadu_ps(pa.add(i + 8));
                acc0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(pb.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(pb.add(i + 8)), acc1);
                i += 16;
            }
            if i + 8 <= n {
                let x = _mm256_loadu_ps(pa.add(i));
                acc0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(pb.add(i)), acc0);
                i += 8;
            }
            let s8 = _mm256_add_ps(acc0, acc1);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
            let tail: f32 = a[i..n].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum();
            _mm_cvtss_f32(s1) + tail
        }
    }

    /// out += alpha · x over their common length.
    #[inline]
    pub fn axpy(alpha: f32, x: &[f32], out: &mut [f32]) {
        let n = x.len().min(out.len());
        let mut i = 0;
        // SAFETY: as in `dot`: 8 floats at i with i + 8 ≤ n.
        unsafe {
            let a = _mm256_set1_ps(alpha);
            let (px, po) = (x.as_ptr(), out.as_mut_ptr());
            while i + 8 <= n {
                let o = _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(po.add(i)));
                _mm256_storeu_ps(po.add(i), o);
                i += 8;
            }
        }
        for (o, v) in out[i..n].iter_mut().zip(&x[i..n]) {
            *o += alpha * v;
        }
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
mod lanes_portable {
    /// a · b with eight independent accumulators.
    #[inline]
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let (ca, ta) = a.as_chunks::<8>();
        let (cb, tb) = b.as_chunks::<8>();
        let mut acc = [0f32; 8];
        for (x, y) in ca.iter().zip(cb) {
            for j in 0..8 {
                acc[j] += x[j] * y[j];
            }
        }
        let tail: f32 = ta.iter().zip(tb).map(|(x, y)| x * y).sum();
        acc.iter().sum::<f32>() + tail
    }

    /// out += alpha · x
    #[inline]
    pub fn axpy(alpha: f32, x: &[f32], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(x) {
            *o += alpha * v;
        }
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

    /// Every head size the kernels special-case (64, 128) and some they do
    /// not, GQA groups of 1 and 3, key counts that are and are not multiples
    /// of four, prefill rows, a sliding window, and a branch row with its own
    /// key and value: all against a plain textbook computation.
    #[test]
    fn attention_matches_a_plain_computation() {
        let mut seed = 7u64;
        let mut rand = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
                })
                .collect()
        };
        for (head_dim, heads, kv_heads) in [(64, 9, 3), (128, 4, 4), (48, 6, 2), (16, 2, 1)] {
            for (start, rows, window, branch) in [
                (0, 1, None, false),
                (5, 1, None, false),
                (6, 1, None, true),
                (0, 7, None, false),
                (9, 3, Some(4), false),
            ] {
                let (q_row, kv_row) = (heads * head_dim, kv_heads * head_dim);
                let cached = start + if branch { 0 } else { rows };
                let q = rand(rows * q_row);
                let (k, v) = (rand(cached * kv_row), rand(cached * kv_row));
                let (own_k, own_v) = (rand(kv_row), rand(kv_row));
                let own = branch.then_some((&own_k[..], &own_v[..]));
                let seqs = [AttnSeq {
                    q: &q,
                    k: &k,
                    v: &v,
                    start,
                    own,
                }];
                let shape = AttnShape {
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_dim,
                    sliding_window: window,
                };
                let mut out = vec![0.0; q.len()];
                attend(&seqs, shape, &mut out);
                for i in 0..rows {
                    let pos = start + i;
                    let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    for h in 0..heads {
                        let g = h / (heads / kv_heads);
                        let qh = &q[i * q_row + h * head_dim..][..head_dim];
                        let row = |m: &[f32], t: usize| -> Vec<f32> {
                            match own {
                                Some((ok, ov)) if t == pos => {
                                    let own = if std::ptr::eq(m, &k[..]) { ok } else { ov };
                                    own[g * head_dim..][..head_dim].to_vec()
                                }
                                _ => m[t * kv_row + g * head_dim..][..head_dim].to_vec(),
                            }
                        };
                        let logits: Vec<f64> = (lo..=pos)
                            .map(|t| {
                                let kt = row(&k, t);
                                let d: f64 = qh.iter().zip(&kt).map(|(a, b)| (a * b) as f64).sum();
                                d / (head_dim as f64).sqrt()
                            })
                            .collect();
                        let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                        let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                        let sum: f64 = w.iter().sum();
                        for j in 0..head_dim {
                            let want: f64 = (lo..=pos)
                                .zip(&w)
                                .map(|(t, p)| p / sum * row(&v, t)[j] as f64)
                                .sum();
                            let got = out[i * q_row + h * head_dim + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-5,
                                "head_dim {head_dim}, start {start}, row {i}, head {h}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
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
