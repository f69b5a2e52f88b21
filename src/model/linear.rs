//! Projections (q/k/v/o/gate/up/down and the head): a quantized or dense
//! weight, an optional bias, and the LoRA delta an adapter may attach.

use super::qmatmul::QMatrix;
use anyhow::Result;
use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

/// The seven projections of a decoder layer, in a fixed order so adapters can
/// index them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProjKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl ProjKind {
    pub const ALL: [ProjKind; 7] = [
        ProjKind::Q,
        ProjKind::K,
        ProjKind::V,
        ProjKind::O,
        ProjKind::Gate,
        ProjKind::Up,
        ProjKind::Down,
    ];

    /// The Hugging Face name (`q_proj` …), used in adapter files and settings.
    pub fn hf_name(self) -> &'static str {
        match self {
            ProjKind::Q => "q_proj",
            ProjKind::K => "k_proj",
            ProjKind::V => "v_proj",
            ProjKind::O => "o_proj",
            ProjKind::Gate => "gate_proj",
            ProjKind::Up => "up_proj",
            ProjKind::Down => "down_proj",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.hf_name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A weight matrix of shape (out, in), stored as the checkpoint gave it.
#[derive(Debug, Clone)]
pub enum Weight {
    /// GGUF block-quantized (or f16/f32 GGUF tensors, which candle keeps dense).
    Quantized(QMatMul),
    /// GGUF Q4_1 or Q8_0, through our batched SIMD kernels.
    Blocks(QMatrix),
    /// f32, from safetensors.
    Dense(Tensor),
}

impl Weight {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Weight::Quantized(w) => w.forward(x)?,
            Weight::Blocks(w) => w.forward(x)?,
            Weight::Dense(w) => x.matmul(&w.t()?)?,
        })
    }

    /// The weight as a dense f32 (out, in) tensor.
    pub fn to_dense(&self) -> Result<Tensor> {
        Ok(match self {
            Weight::Quantized(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.to_dtype(candle_core::DType::F32)?
            }
            Weight::Blocks(w) => w.dequantize(&candle_core::Device::Cpu)?,
            Weight::Dense(t) => t.clone(),
        })
    }

    /// (out, in)
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Weight::Quantized(QMatMul::QTensor(t)) => t.shape().dims().to_vec(),
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims().to_vec(),
            Weight::Blocks(w) => vec![w.shape().0, w.shape().1],
            Weight::Dense(t) => t.dims().to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Proj {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Proj {
    /// x: (rows, in) → (rows, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Projections of the same input: quantized-block weights run as one pass
/// (one quantization of the input, one parallel dispatch), others one by one.
pub fn forward_many(projs: &[&Proj], x: &Tensor) -> Result<Vec<Tensor>> {
    let blocks: Option<Vec<&QMatrix>> = projs
        .iter()
        .map(|p| match &p.weight {
            Weight::Blocks(m) => Some(m),
            _ => None,
        })
        .collect();
    let Some(mats) = blocks.filter(|m| m.len() > 1) else {
        return projs.iter().map(|p| p.forward(x)).collect();
    };
    let ys = super::qmatmul::forward_many(&mats, x)?;
    ys.into_iter()
        .zip(projs)
        .map(|(y, p)| {
            Ok(match &p.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        })
        .collect()
}

/// Projections of the same input, on plain rows (xs: rows × in), returning
/// plain rows: for callers that work on rows anyway (attention), this skips
/// two tensor copies per projection.
pub fn forward_many_rows(projs: &[&Proj], x: &Tensor, xs: &[f32]) -> Result<Vec<Vec<f32>>> {
    let rows = x.dim(0)?;
    let blocks: Option<Vec<&QMatrix>> = projs
        .iter()
        .map(|p| match (&p.weight, &p.bias) {
            (Weight::Blocks(m), None) => Some(m),
            _ => None,
        })
        .collect();
    match blocks {
        Some(mats) => super::qmatmul::forward_rows(&mats, xs, rows),
        None => forward_many(projs, x)?
            .into_iter()
            .map(|t| {
                Ok(t.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?)
            })
            .collect(),
    }
}

/// A low-rank update `scale · B·A` on one projection: y += scale · B (A x).
///
/// A and Bᵀ are kept as 8-bit rows with one scale per 32 values (ggml's Q8_0
/// idea). A decode step at batch 1 is bound by memory traffic, and every
/// LoRA weight is read once per step like the base weights: in f32, rank-8
/// updates on q and v added 2.8% to each layer's bytes and cost 3.3% per
/// step on SmolLM2; in 8 bits they are a quarter of that. The rounding error
/// is about 1% of the update (tested), which is itself a small part of the
/// output: far below the base weights' own 4-bit rounding. Applied to a few
/// rows at a time, plain loops beat tensor ops, whose per-call overhead
/// would dominate.
#[derive(Debug, Clone)]
pub struct Lora {
    /// (rank, in).
    a: Rows8,
    /// Bᵀ: (rank, out), so the update is a sum of scaled rows.
    b_t: Rows8,
    rank: usize,
    scale: f32,
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
        Ok(Self {
            a: Rows8::quantize(&a, input),
            b_t: Rows8::quantize(&b_t, out),
            rank,
            scale: scale as f32,
        })
    }

    /// Reads A and Bᵀ into this core's cache (see [`LoraSet::warm`]);
    /// returns a sum of what it read so the reads are not optimized away.
    fn warm(&self) -> i64 {
        self.a.warm() + self.b_t.warm()
    }

    /// Rows of the projection's output.
    pub fn out_dim(&self) -> usize {
        self.b_t.width
    }

    /// y (rows × out) += scale · B A x for each row of x (rows × in).
    pub fn add_to(&self, x: &[f32], y: &mut [f32]) {
        let mut t = vec![0f32; self.rank];
        for (xr, yr) in x
            .chunks_exact(self.a.width)
            .zip(y.chunks_exact_mut(self.b_t.width))
        {
            self.a.dots(xr, &mut t);
            t.iter_mut().for_each(|t| *t *= self.scale);
            self.b_t.add_combination(&t, yr);
        }
    }
}

const ROW_BLOCK: usize = 32;

/// Rows of `width` values, each stored as i8 with one f32 scale per 32
/// values (the last block of a row may be shorter): value ≈ scale · q.
#[derive(Debug, Clone)]
struct Rows8 {
    q: Vec<i8>,
    scales: Vec<f32>,
    width: usize,
}

impl Rows8 {
    /// `values`: rows × width, row-major.
    fn quantize(values: &[f32], width: usize) -> Self {
        let mut q = Vec::with_capacity(values.len());
        let mut scales = Vec::new();
        for row in values.chunks_exact(width) {
            for block in row.chunks(ROW_BLOCK) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                q.extend(block.iter().map(|v| (v * inv).round() as i8));
                scales.push(d);
            }
        }
        Self { q, scales, width }
    }

    fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let blocks = self.width.div_ceil(ROW_BLOCK);
        (
            &self.q[r * self.width..][..self.width],
            &self.scales[r * blocks..][..blocks],
        )
    }

    /// Loads one value of every cache line of the rows and scales.
    fn warm(&self) -> i64 {
        const LINE: usize = 64;
        let values: i64 = self.q.iter().step_by(LINE).map(|&q| i64::from(q)).sum();
        let scales = self
            .scales
            .iter()
            .step_by(LINE / std::mem::size_of::<f32>())
            .map(|s| s.to_bits() as i64)
            .sum::<i64>();
        values.wrapping_add(scales)
    }

    /// out[r] = row r · x for every row.
    fn dots(&self, x: &[f32], out: &mut [f32]) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        if out.len().is_multiple_of(8) {
            return rows8_avx512::dots(self, x, out);
        }
        for (r, o) in out.iter_mut().enumerate() {
            *o = self.dot(r, x);
        }
    }

    /// y += Σ_r t[r] · row r.
    fn add_combination(&self, t: &[f32], y: &mut [f32]) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
        return rows8_avx512::add_combination(self, t, y);
        #[allow(unreachable_code)]
        for (r, &t) in t.iter().enumerate() {
            self.add_scaled(r, t, y);
        }
    }

    /// Row r · x.
    fn dot(&self, r: usize, x: &[f32]) -> f32 {
        let (q, scales) = self.row(r);
        // 32 independent lanes: four vector registers, no single add chain.
        let mut acc = [0f32; ROW_BLOCK];
        let mut tail = 0f32;
        for ((qb, &d), xb) in q.chunks(ROW_BLOCK).zip(scales).zip(x.chunks(ROW_BLOCK)) {
            match (
                <&[i8; ROW_BLOCK]>::try_from(qb),
                <&[f32; ROW_BLOCK]>::try_from(xb),
            ) {
                (Ok(qb), Ok(xb)) => {
                    for j in 0..ROW_BLOCK {
                        acc[j] = (qb[j] as f32 * d).mul_add(xb[j], acc[j]);
                    }
                }
                _ => {
                    tail += qb
                        .iter()
                        .zip(xb)
                        .map(|(&q, &x)| q as f32 * d * x)
                        .sum::<f32>()
                }
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    /// y += t · row r.
    fn add_scaled(&self, r: usize, t: f32, y: &mut [f32]) {
        let (q, scales) = self.row(r);
        for ((qb, &d), yb) in q.chunks(ROW_BLOCK).zip(scales).zip(y.chunks_mut(ROW_BLOCK)) {
            let s = t * d;
            for (yo, &qv) in yb.iter_mut().zip(qb) {
                *yo = (qv as f32).mul_add(s, *yo);
            }
        }
    }
}

/// `Rows8::dots` and `add_combination` for whole 32-value blocks in 512-bit
/// registers: each block of x (or y) is loaded once for all rows, and the
/// i8 values are widened in registers. Four times faster than the portable
/// loops, which the compiler leaves half scalar.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod rows8_avx512 {
    use super::{Rows8, ROW_BLOCK};
    use std::arch::x86_64::*;

    /// The 32 i8 values of `q` as two 16-float vectors.
    #[inline(always)]
    fn widen(q: &[i8; ROW_BLOCK]) -> [__m512; 2] {
        // SAFETY: two 16-byte loads inside a 32-byte array; AVX-512F is
        // guaranteed by the cfg on this module (as for every intrinsic here).
        unsafe {
            let p = q.as_ptr() as *const __m128i;
            [p, p.add(1)].map(|p| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p))))
        }
    }

    #[inline(always)]
    fn load(x: &[f32; ROW_BLOCK]) -> [__m512; 2] {
        // SAFETY: two 16-float loads inside a 32-float array.
        unsafe {
            [
                _mm512_loadu_ps(x.as_ptr()),
                _mm512_loadu_ps(x.as_ptr().add(16)),
            ]
        }
    }

    /// Row r's block b, and its scale.
    #[inline(always)]
    fn block(rows: &Rows8, r: usize, b: usize) -> (&[i8; ROW_BLOCK], f32) {
        let (q, scales) = rows.row(r);
        let q = q[b * ROW_BLOCK..][..ROW_BLOCK]
            .try_into()
            .expect("whole block");
        (q, scales[b])
    }

    /// out[r] = row r · x; `out.len()` is a multiple of 8.
    pub(super) fn dots(rows: &Rows8, x: &[f32], out: &mut [f32]) {
        let (xs, tail) = x[..rows.width].as_chunks::<ROW_BLOCK>();
        for (first, out) in out.chunks_exact_mut(8).enumerate().map(|(i, o)| (8 * i, o)) {
            let mut acc = [unsafe { _mm512_setzero_ps() }; 8];
            for (b, xb) in xs.iter().enumerate() {
                let [x0, x1] = load(xb);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let (q, d) = block(rows, first + i, b);
                    let [q0, q1] = widen(q);
                    // SAFETY: register arithmetic (see `widen`).
                    unsafe {
                        let t = _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q0, x0));
                        *acc = _mm512_fmadd_ps(t, _mm512_set1_ps(d), *acc);
                    }
                }
            }
            for (i, (o, acc)) in out.iter_mut().zip(acc).enumerate() {
                let (q, scales) = rows.row(first + i);
                let d = scales.last().copied().unwrap_or(0.0);
                let q_tail = &q[xs.len() * ROW_BLOCK..];
                let rest: f32 = q_tail.iter().zip(tail).map(|(&q, &x)| q as f32 * x).sum();
                // SAFETY: register arithmetic.
                *o = unsafe { _mm512_reduce_add_ps(acc) } + d * rest;
            }
        }
    }

    /// y += Σ_r t[r] · row r.
    pub(super) fn add_combination(rows: &Rows8, t: &[f32], y: &mut [f32]) {
        let (ys, tail) = y[..rows.width].as_chunks_mut::<ROW_BLOCK>();
        let whole = ys.len();
        for (b, yb) in ys.iter_mut().enumerate() {
            let [mut y0, mut y1] = load(yb);
            for (r, &t) in t.iter().enumerate() {
                let (q, d) = block(rows, r, b);
                let [q0, q1] = widen(q);
                // SAFETY: register arithmetic.
                unsafe {
                    let s = _mm512_set1_ps(t * d);
                    y0 = _mm512_fmadd_ps(q0, s, y0);
                    y1 = _mm512_fmadd_ps(q1, s, y1);
                }
            }
            // SAFETY: two 16-float stores inside a 32-float array.
            unsafe {
                _mm512_storeu_ps(yb.as_mut_ptr(), y0);
                _mm512_storeu_ps(yb.as_mut_ptr().add(16), y1);
            }
        }
        for (r, &t) in t.iter().enumerate() {
            let (q, scales) = rows.row(r);
            let s = t * scales.last().copied().unwrap_or(0.0);
            for (y, &q) in tail.iter_mut().zip(&q[whole * ROW_BLOCK..]) {
                *y = (q as f32).mul_add(s, *y);
            }
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
    /// pushes these few kilobytes out of every cache. Fetched on demand by
    /// the update's own loads, rank-8 q+v cost 2.5-3.6 µs per layer on
    /// SmolLM2 against 0.9 µs in cache; prefetch instructions did not help (most
    /// were lost: the pages had also left the TLB). Plain loads, one per
    /// cache line, run many misses at once; the worker that will compute
    /// the update runs them while the input is still being normalized.
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

    /// The 8-bit update stays within 1.5% (relative, as a whole) of the
    /// exact f32 product, for widths that are and are not multiples of 32,
    /// and ranks that are and are not multiples of 8; it adds to what y held.
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
                norm > 0.0 && err / norm < 1.5e-2,
                "relative error {} at {input}x{out}",
                err / norm
            );
        }
        Ok(())
    }
}
