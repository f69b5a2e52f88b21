//! The low-rank updates an adapter attaches to projections, applied beside
//! the base matmul: y += scale · B (A x), without touching the base weights.
//!
//! A steered decode step runs them on a handful of rows, so the layout is
//! built for one row at a time: A in 8 bits, multiplied by the input
//! quantized to 8 bits with the CPU's integer dot product (VNNI), and B in
//! 8 bits with one scale per 32 outputs. A decode step streams the base
//! weights through every cache, so each layer's update is read from memory
//! again at every step: its bytes cost more than its arithmetic. The
//! rounding stays near 1% of the update (tested), which is itself a small
//! part of the output: far below the base weights' own 4-bit rounding.

use super::linear::ProjKind;
use anyhow::Result;
use candle_core::Tensor;

/// Input values per integer dot instruction (512 bits of u8).
const CHUNK: usize = 64;
/// i32 lanes of one dot: each sums four neighbouring products.
const LANES: usize = 16;
/// Input values per quantization scale: a chunk's two halves have their own.
const BLOCK: usize = 32;
/// Rank rows per kernel pass; the rank is padded to a multiple (with rows
/// that contribute zero), so the kernels keep eight accumulators in
/// registers and have no remainder loops.
const GROUP: usize = 8;
/// Output values per scale of B, and per step of its kernel.
const OUT_STEP: usize = 32;

/// A low-rank update `scale · B·A` on one projection.
#[derive(Debug, Clone)]
pub struct Lora {
    /// A (rank, in) as i8 + 128, one scale per row: the unsigned side of
    /// the integer dot. Padding (inputs and rank rows) holds 128, i.e. zero.
    a: Vec<u8>,
    /// Per row of A, times the update's scale; 0 on padding rows.
    a_scales: Vec<f32>,
    /// Bᵀ (rank, out) as i8; zero padding.
    b_t: Vec<i8>,
    /// Per row of Bᵀ and 32 outputs.
    b_scales: Vec<f32>,
    input: usize,
    out: usize,
}

impl Lora {
    /// a: (rank, in); b: (out, rank).
    pub fn new(a: &Tensor, b: &Tensor, scale: f64) -> Result<Self> {
        let (rank, input) = a.dims2()?;
        let (out, rank_b) = b.dims2()?;
        anyhow::ensure!(
            rank == rank_b,
            "LoRA ranks differ: A has {rank}, B has {rank_b}"
        );
        let a: Vec<f32> = a
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let b_t: Vec<f32> = b
            .to_dtype(candle_core::DType::F32)?
            .t()?
            .contiguous()?
            .flatten_all()?
            .to_vec1()?;
        let (rows, width, out_width) = (
            rank.next_multiple_of(GROUP),
            input.next_multiple_of(CHUNK),
            out.next_multiple_of(OUT_STEP),
        );
        let mut a_q = vec![128u8; rows * width];
        let mut a_scales = vec![0f32; rows];
        for (r, row) in a.chunks_exact(input).enumerate() {
            let (d, inv) = i8_scale(row);
            for (q, v) in a_q[r * width..].iter_mut().zip(row) {
                *q = ((v * inv).round() as i32 + 128) as u8;
            }
            a_scales[r] = d * scale as f32;
        }
        let mut b_q = vec![0i8; rows * out_width];
        let mut b_scales = vec![0f32; rows * out_width / OUT_STEP];
        for (r, row) in b_t.chunks_exact(out).enumerate() {
            let q = b_q[r * out_width..].chunks_exact_mut(OUT_STEP);
            let blocks = row
                .chunks(OUT_STEP)
                .zip(q)
                .zip(&mut b_scales[r * out_width / OUT_STEP..]);
            for ((values, q), scale) in blocks {
                let inv;
                (*scale, inv) = i8_scale(values);
                for (q, v) in q.iter_mut().zip(values) {
                    *q = (v * inv).round() as i8;
                }
            }
        }
        Ok(Self {
            a: a_q,
            a_scales,
            b_t: b_q,
            b_scales,
            input,
            out,
        })
    }

    /// Rows of the projection's output.
    pub fn out_dim(&self) -> usize {
        self.out
    }

    fn rank_rows(&self) -> usize {
        self.a_scales.len()
    }

    /// y (rows × out) += scale · B A x for each row of x (rows × in).
    #[cfg(test)]
    fn add_to(&self, x: &[f32], y: &mut [f32]) {
        self.add_quantized(&LoraInput::new(x, self.input), y);
    }

    /// y (rows × out) += scale · B A x for each row of an input quantized
    /// once for all the updates that share it.
    pub fn add_quantized(&self, x: &LoraInput, y: &mut [f32]) {
        debug_assert_eq!(x.width, self.input);
        let mut t = vec![0f32; self.rank_rows()];
        for (r, yr) in y.chunks_exact_mut(self.out).enumerate() {
            self.down(x.row(r), &mut t);
            self.up(&t, yr);
        }
    }

    /// t = scale · A x.
    fn down(&self, x: InputRow, t: &mut [f32]) {
        let width = x.q.len();
        for (g, t) in t.chunks_exact_mut(GROUP).enumerate() {
            let a = &self.a[g * GROUP * width..][..GROUP * width];
            let dots = kernels::dots(a, x);
            for ((t, dot), &d) in t.iter_mut().zip(dots).zip(&self.a_scales[g * GROUP..]) {
                *t = dot * d;
            }
        }
    }

    /// y += B t: Σ_r t[r] · row r of Bᵀ.
    fn up(&self, t: &[f32], y: &mut [f32]) {
        let width = self.out.next_multiple_of(OUT_STEP);
        let (whole, tail) = y.as_chunks_mut::<OUT_STEP>();
        let mut last = [0f32; OUT_STEP];
        last[..tail.len()].copy_from_slice(tail);
        let blocks = width / OUT_STEP;
        for (g, t) in t.chunks_exact(GROUP).enumerate() {
            let b = &self.b_t[g * GROUP * width..][..GROUP * width];
            let scales = &self.b_scales[g * GROUP * blocks..][..GROUP * blocks];
            // Each row's weight for one block of outputs: t times the block's scale.
            let weights = |i: usize| -> [f32; GROUP] {
                std::array::from_fn(|j| t[j] * scales[j * blocks + i])
            };
            for (i, y) in whole.iter_mut().enumerate() {
                kernels::add_group(b, width, i * OUT_STEP, &weights(i), y);
            }
            if !tail.is_empty() {
                let i = whole.len();
                kernels::add_group(b, width, i * OUT_STEP, &weights(i), &mut last);
            }
        }
        let n = tail.len();
        tail.copy_from_slice(&last[..n]);
    }

    /// Loads one value of every cache line of A and Bᵀ (see
    /// [`LoraSet::warm`]); returns a sum of what it read so the reads are
    /// not optimized away.
    fn warm(&self) -> i64 {
        let scales = |s: &[f32]| touch(s, |v| i64::from(v.to_bits()));
        touch(&self.a, |&q| i64::from(q))
            .wrapping_add(touch(&self.b_t, |&q| i64::from(q)))
            .wrapping_add(scales(&self.a_scales))
            .wrapping_add(scales(&self.b_scales))
    }
}

/// One value of every 64-byte cache line of `values`, summed.
fn touch<T>(values: &[T], value: impl Fn(&T) -> i64) -> i64 {
    let per_line = (64 / std::mem::size_of::<T>()).max(1);
    values.iter().step_by(per_line).map(value).sum()
}

/// The scale of symmetric 8-bit values for `values` (their largest
/// magnitude maps to 127), and its inverse (0 when all are 0).
fn i8_scale(values: &[f32]) -> (f32, f32) {
    let d = values.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// Rows of a layer's input quantized for the updates' integer dots: i8 per
/// value with one scale per 32, padded to whole chunks, and per chunk the
/// two vectors each dot needs besides A (see [`kernels::dots`]).
#[derive(Debug, Clone, Default)]
pub struct LoraInput {
    width: usize,
    q: Vec<i8>,
    /// Per chunk and lane: −128 · (sum of the lane's four inputs), which
    /// cancels the +128 that makes A unsigned.
    bias: Vec<i32>,
    /// Per chunk and lane: the scale of the lane's block.
    scales: Vec<f32>,
}

/// One row of a [`LoraInput`].
#[derive(Clone, Copy)]
pub struct InputRow<'a> {
    q: &'a [i8],
    bias: &'a [i32],
    scales: &'a [f32],
}

impl LoraInput {
    /// `xs`: rows × width, row-major.
    pub fn new(xs: &[f32], width: usize) -> Self {
        let padded = width.next_multiple_of(CHUNK);
        let rows = xs.len() / width.max(1);
        let chunks = padded / CHUNK;
        let mut input = Self {
            width,
            q: vec![0; rows * padded],
            bias: vec![0; rows * chunks * LANES],
            scales: vec![0.0; rows * chunks * LANES],
        };
        let lanes = chunks * LANES;
        for (r, x) in xs.chunks_exact(width).enumerate() {
            let blocks = input.q[r * padded..][..padded]
                .chunks_exact_mut(BLOCK)
                .zip(input.bias[r * lanes..][..lanes].chunks_exact_mut(LANES / 2))
                .zip(input.scales[r * lanes..][..lanes].chunks_exact_mut(LANES / 2));
            for (xb, ((q, bias), scales)) in x.chunks(BLOCK).zip(blocks) {
                scales.fill(kernels::quantize_block(xb, q, bias));
            }
        }
        input
    }

    fn padded(&self) -> usize {
        self.width.next_multiple_of(CHUNK)
    }

    fn row(&self, r: usize) -> InputRow<'_> {
        let padded = self.padded();
        let lanes = padded / CHUNK * LANES;
        InputRow {
            q: &self.q[r * padded..][..padded],
            bias: &self.bias[r * lanes..][..lanes],
            scales: &self.scales[r * lanes..][..lanes],
        }
    }
}

/// The inner loops, in 512-bit registers where the CPU has them.
mod kernels {
    use super::{InputRow, BLOCK, CHUNK, GROUP, LANES, OUT_STEP};

    /// Quantizes up to 32 values to i8 (symmetric, rounded to nearest even)
    /// and returns the scale; `q` keeps zeros past `x`. `bias` gets, per four
    /// values, −128 · their sum (see [`super::LoraInput`]).
    pub(super) fn quantize_block(x: &[f32], q: &mut [i8], bias: &mut [i32]) -> f32 {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx512f",
            target_feature = "avx512vl",
            target_feature = "avx512vnni"
        ))]
        if let (Ok(x), Ok(q), Ok(bias)) = (x.try_into(), q.try_into(), bias.try_into()) {
            // SAFETY: the cfg guarantees the instructions; fixed-size arrays.
            return unsafe { quantize_block_avx512(x, q, bias) };
        }
        quantize_block_portable(x, q, bias)
    }

    fn quantize_block_portable(x: &[f32], q: &mut [i8], bias: &mut [i32]) -> f32 {
        let (d, inv) = super::i8_scale(x);
        for (q, v) in q.iter_mut().zip(x) {
            *q = (v * inv).round_ties_even() as i8;
        }
        for (b, four) in bias.iter_mut().zip(q.chunks_exact(CHUNK / LANES)) {
            *b = -128 * four.iter().map(|&v| i32::from(v)).sum::<i32>();
        }
        d
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx512f",
        target_feature = "avx512vl",
        target_feature = "avx512vnni"
    ))]
    unsafe fn quantize_block_avx512(
        x: &[f32; BLOCK],
        q: &mut [i8; BLOCK],
        bias: &mut [i32; BLOCK / 4],
    ) -> f32 {
        use std::arch::x86_64::*;
        let (lo, hi) = (
            _mm512_loadu_ps(x.as_ptr()),
            _mm512_loadu_ps(x.as_ptr().add(16)),
        );
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        let d = amax / 127.0;
        let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        // Rounds to nearest even (the default rounding mode), then narrows.
        let narrow = |v| _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)));
        let packed = _mm256_set_m128i(narrow(hi), narrow(lo));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut _, packed);
        let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), packed);
        _mm256_storeu_si256(
            bias.as_mut_ptr() as *mut _,
            _mm256_sub_epi32(_mm256_setzero_si256(), sums),
        );
        d
    }

    /// A · x for eight rows of A (each `x.q.len()` unsigned values), before
    /// A's scales: per chunk and lane, (bias + Σ a·x) · the lane's scale.
    pub(super) fn dots(a: &[u8], x: InputRow) -> [f32; 8] {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx512f",
            target_feature = "avx512vnni"
        ))]
        {
            // SAFETY: the cfg guarantees the instructions; `dots_avx512`
            // reads whole chunks inside `a` (8 × width) and `x`.
            return unsafe { dots_avx512(a, x) };
        }
        #[allow(unreachable_code)]
        dots_portable(a, x)
    }

    fn dots_portable(a: &[u8], x: InputRow) -> [f32; 8] {
        let width = x.q.len();
        std::array::from_fn(|i| {
            let row = &a[i * width..][..width];
            let mut total = 0f32;
            for ((a4, x4), (&bias, &d)) in row
                .chunks_exact(CHUNK / LANES)
                .zip(x.q.chunks_exact(CHUNK / LANES))
                .zip(x.bias.iter().zip(x.scales))
            {
                let dot: i32 = a4
                    .iter()
                    .zip(x4)
                    .map(|(&a, &x)| i32::from(a) * i32::from(x))
                    .sum();
                total += (bias + dot) as f32 * d;
            }
            total
        })
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx512f",
        target_feature = "avx512vnni"
    ))]
    unsafe fn dots_avx512(a: &[u8], x: InputRow) -> [f32; 8] {
        use std::arch::x86_64::*;
        let width = x.q.len();
        debug_assert!(a.len() >= GROUP * width);
        let mut acc = [_mm512_setzero_ps(); GROUP];
        for c in 0..width / CHUNK {
            let xv = _mm512_loadu_si512(x.q.as_ptr().add(c * CHUNK) as *const _);
            let bias = _mm512_loadu_si512(x.bias.as_ptr().add(c * LANES) as *const _);
            let scales = _mm512_loadu_ps(x.scales.as_ptr().add(c * LANES));
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_loadu_si512(a.as_ptr().add(i * width + c * CHUNK) as *const _);
                let dot = _mm512_dpbusd_epi32(bias, av, xv);
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scales, *acc);
            }
        }
        acc.map(|v| _mm512_reduce_add_ps(v))
    }

    /// y += Σ_i w[i] · b[i][at..at + 32], for eight rows of `b` (each
    /// `width` long).
    pub(super) fn add_group(
        b: &[i8],
        width: usize,
        at: usize,
        w: &[f32; 8],
        y: &mut [f32; OUT_STEP],
    ) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        {
            // SAFETY: the cfg guarantees the instructions; the loads are
            // 32 values at `i·width + at` with at + 32 ≤ width.
            return unsafe { add_group_avx512(b, width, at, w, y) };
        }
        #[allow(unreachable_code)]
        add_group_portable(b, width, at, w, y)
    }

    fn add_group_portable(
        b: &[i8],
        width: usize,
        at: usize,
        w: &[f32; 8],
        y: &mut [f32; OUT_STEP],
    ) {
        for (i, &w) in w.iter().enumerate() {
            for (y, &b) in y.iter_mut().zip(&b[i * width + at..][..OUT_STEP]) {
                *y = f32::from(b).mul_add(w, *y);
            }
        }
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    unsafe fn add_group_avx512(
        b: &[i8],
        width: usize,
        at: usize,
        w: &[f32; 8],
        y: &mut [f32; OUT_STEP],
    ) {
        use std::arch::x86_64::*;
        debug_assert!(at + OUT_STEP <= width && b.len() >= GROUP * width);
        let mut lo = _mm512_loadu_ps(y.as_ptr());
        let mut hi = _mm512_loadu_ps(y.as_ptr().add(16));
        for (i, &w) in w.iter().enumerate() {
            let p = b.as_ptr().add(i * width + at) as *const __m128i;
            let widen = |p| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
            let w = _mm512_set1_ps(w);
            lo = _mm512_fmadd_ps(widen(p), w, lo);
            hi = _mm512_fmadd_ps(widen(p.add(1)), w, hi);
        }
        _mm512_storeu_ps(y.as_mut_ptr(), lo);
        _mm512_storeu_ps(y.as_mut_ptr().add(16), hi);
    }

    /// The vector kernels (where this CPU runs them) give what the portable
    /// loops give: the same 8-bit values and sums, and dot products and
    /// updates equal up to float rounding.
    #[cfg(test)]
    mod tests {
        use super::*;

        /// A deterministic spread of values in about −1..1.
        fn values(n: usize, seed: u32) -> Vec<f32> {
            (0..n as u32)
                .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect()
        }

        #[test]
        fn vector_kernels_match_portable_loops() {
            let x = values(BLOCK, 7);
            let (mut q1, mut q2) = ([0i8; BLOCK], [0i8; BLOCK]);
            let (mut b1, mut b2) = ([0i32; BLOCK / 4], [0i32; BLOCK / 4]);
            let d1 = quantize_block(&x, &mut q1, &mut b1);
            let d2 = quantize_block_portable(&x, &mut q2, &mut b2);
            assert_eq!((d1, q1, b1), (d2, q2, b2));
            assert!(q1.iter().any(|&q| q.unsigned_abs() == 127) && b1.iter().any(|&b| b != 0));

            let width = 2 * CHUNK;
            let xq: Vec<i8> = values(width, 3).iter().map(|v| (v * 120.0) as i8).collect();
            let bias: Vec<i32> = (0..width / 4).map(|i| -(i as i32) * 300).collect();
            let scales: Vec<f32> = values(width / 4, 5)
                .iter()
                .map(|v| v.abs() + 0.01)
                .collect();
            let row = InputRow {
                q: &xq,
                bias: &bias,
                scales: &scales,
            };
            let a: Vec<u8> = values(GROUP * width, 9)
                .iter()
                .map(|v| (v * 120.0 + 128.0) as u8)
                .collect();
            let (fast, slow) = (dots(&a, row), dots_portable(&a, row));
            for (f, s) in fast.iter().zip(slow) {
                assert!((f - s).abs() <= 1e-4 * s.abs().max(1.0), "{f} vs {s}");
            }

            let b: Vec<i8> = values(GROUP * 2 * OUT_STEP, 11)
                .iter()
                .map(|v| (v * 127.0) as i8)
                .collect();
            let w: [f32; 8] = std::array::from_fn(|i| i as f32 * 0.25 - 1.0);
            let (mut y1, mut y2) = ([0.5f32; OUT_STEP], [0.5f32; OUT_STEP]);
            add_group(&b, 2 * OUT_STEP, OUT_STEP, &w, &mut y1);
            add_group_portable(&b, 2 * OUT_STEP, OUT_STEP, &w, &mut y2);
            for (p, q) in y1.iter().zip(y2) {
                assert!((p - q).abs() <= 1e-4 * q.abs().max(1.0), "{p} vs {q}");
            }
            assert!(y1.iter().any(|&y| y != 0.5));
        }
    }
}

/// LoRA updates for every layer and projection of one adapter.
#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    /// layers[l][ProjKind::index()]
    pub layers: Vec<[Option<Lora>; 7]>,
}

impl LoraSet {
    pub fn get(&self, layer: usize, kind: ProjKind) -> Option<&Lora> {
        self.layers.get(layer)?[kind.index()].as_ref()
    }

    /// Reads every update of one layer into the calling core's cache.
    ///
    /// Between two steps the stream of base weights (98 MB on SmolLM2)
    /// pushes these few kilobytes (16 KB per layer for rank-8 q and v) out
    /// of every cache. Fetched on demand by the update's own loads, they
    /// cost 2.5-3.6 µs per layer. Plain loads, one per cache line, run many
    /// misses at once; the task that computes the update runs them first
    /// (0.9-1.7 µs per layer). Prefetch instructions issued just before did
    /// not help (most were lost: the pages had also left the TLB); issued a
    /// layer ahead they cut this to 0.9-1.0 µs, but steps were not faster
    /// beyond the noise, so they are not used.
    pub fn warm(&self, layer: usize) {
        let sum = self
            .layers
            .get(layer)
            .into_iter()
            .flatten()
            .flatten()
            .fold(0i64, |acc, lora| acc.wrapping_add(lora.warm()));
        std::hint::black_box(sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The 8-bit update stays within 2.5% (relative, as a whole; about 1%
    /// on average, at most 2% over 1,200 draws) of the
    /// exact f32 product, for widths that are and are not multiples of 64,
    /// ranks that are and are not multiples of 8, and outputs that are and
    /// are not multiples of 16; it adds to what y held.
    #[test]
    fn lora_update_matches_f32_product() -> Result<()> {
        for (input, out, rank) in [(576, 192, 8), (70, 45, 8), (576, 576, 16), (96, 40, 5)] {
            let dev = Device::Cpu;
            let a = Tensor::randn(0f32, 0.05, (rank, input), &dev)?;
            let b = Tensor::randn(0f32, 0.02, (out, rank), &dev)?;
            let x = Tensor::randn(0f32, 1.0, (3, input), &dev)?;
            let exact: Vec<f32> = (x.matmul(&a.t()?)?.matmul(&b.t()?)? * 2.0)?
                .flatten_all()?
                .to_vec1()?;
            let lora = Lora::new(&a, &b, 2.0)?;
            assert_eq!(lora.out_dim(), out);
            let mut y = vec![1f32; 3 * out];
            lora.add_to(&x.flatten_all()?.to_vec1()?, &mut y);
            let err = y
                .iter()
                .zip(&exact)
                .map(|(p, q)| (p - 1.0 - q).powi(2))
                .sum::<f32>()
                .sqrt();
            let norm = exact.iter().map(|q| q * q).sum::<f32>().sqrt();
            assert!(
                norm > 0.0 && err / norm < 2.5e-2,
                "relative error {} at {input}x{out}",
                err / norm
            );
        }
        Ok(())
    }
}
