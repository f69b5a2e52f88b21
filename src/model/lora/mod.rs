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
//!
//! For the same reason an adapter's updates lie in one block of memory (a
//! [`LoraSet`], see `store`), and the memory an update works in is reused
//! from layer to layer (see [`with_input`]).

mod kernels;
mod store;

use super::linear::ProjKind;
use anyhow::Result;
use candle_core::Tensor;
use std::ops::Range;
use store::Store;

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

/// A low-rank update `scale · B·A` on one projection, quantized; a
/// [`LoraSet`] packs an adapter's updates together.
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

    #[cfg(test)]
    fn view(&self) -> LoraView<'_> {
        LoraView {
            a: &self.a,
            a_scales: &self.a_scales,
            b_t: &self.b_t,
            b_scales: &self.b_scales,
            input: self.input,
            out: self.out,
        }
    }

    /// y (rows × out) += scale · B A x for each row of x (rows × in).
    #[cfg(test)]
    fn add_to(&self, x: &[f32], y: &mut [f32]) {
        self.view().add_quantized(&LoraInput::new(x, self.input), y);
    }
}

/// A [`Lora`]'s quantized matrices wherever they are kept (in the `Lora`,
/// or packed in a [`LoraSet`]): what the kernels read.
#[derive(Debug, Clone, Copy)]
pub struct LoraView<'a> {
    a: &'a [u8],
    a_scales: &'a [f32],
    b_t: &'a [i8],
    b_scales: &'a [f32],
    input: usize,
    out: usize,
}

impl LoraView<'_> {
    /// Rows of the projection's output.
    pub fn out_dim(&self) -> usize {
        self.out
    }

    fn rank_rows(&self) -> usize {
        self.a_scales.len()
    }

    /// y (rows × out) += scale · B A x for each row of an input quantized
    /// once for all the updates that share it.
    pub fn add_quantized(&self, x: &LoraInput, y: &mut [f32]) {
        debug_assert_eq!(x.width, self.input);
        let (rows, rank) = (y.len() / self.out, self.rank_rows());
        // On the stack for a decode step's row at usual ranks: an
        // allocation costs a decode step's update more than one would
        // think (see `with_input`).
        let (mut stack, mut heap) = ([0f32; 64], Vec::new());
        let ts = match rows * rank {
            n if n <= stack.len() => &mut stack[..n],
            n => {
                heap.resize(n, 0.0);
                &mut heap[..]
            }
        };
        for (r, t) in ts.chunks_exact_mut(rank).enumerate() {
            self.down(x.row(r), t);
        }
        self.up(ts, y);
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

    /// y += B t for each row of y and of ts (rows × rank rows): Σ_r t[r] ·
    /// row r of Bᵀ. Each block of Bᵀ is widened to floats once for all the
    /// rows: per row, widening took three instructions for each product's
    /// one. Each output sees the same operations in the same order
    /// whatever the number of rows.
    fn up(&self, ts: &[f32], y: &mut [f32]) {
        let rank = self.rank_rows();
        let width = self.out.next_multiple_of(OUT_STEP);
        let blocks = width / OUT_STEP;
        let whole = self.out / OUT_STEP;
        for g in 0..rank / GROUP {
            let b = &self.b_t[g * GROUP * width..][..GROUP * width];
            let scales = &self.b_scales[g * GROUP * blocks..][..GROUP * blocks];
            // A row's weights for one block of outputs: t times the block's scales.
            let weights = |t: &[f32], i: usize| -> [f32; GROUP] {
                std::array::from_fn(|j| t[g * GROUP + j] * scales[j * blocks + i])
            };
            for i in 0..whole {
                let rows = y.chunks_exact_mut(self.out).zip(ts.chunks_exact(rank));
                let rows = rows.map(|(y, t)| (weights(t, i), &mut y.as_chunks_mut().0[i]));
                kernels::add_group_rows(b, width, i * OUT_STEP, rows);
            }
            if whole < blocks {
                // The partial last block, through a whole one.
                for (y, t) in y.chunks_exact_mut(self.out).zip(ts.chunks_exact(rank)) {
                    let tail = &mut y[whole * OUT_STEP..];
                    let mut last = [0f32; OUT_STEP];
                    last[..tail.len()].copy_from_slice(tail);
                    let row = std::iter::once((weights(t, whole), &mut last));
                    kernels::add_group_rows(b, width, whole * OUT_STEP, row);
                    tail.copy_from_slice(&last[..tail.len()]);
                }
            }
        }
    }
}

/// The scale of symmetric 8-bit values for `values` (their largest
/// magnitude maps to 127), and its inverse (0 when all are 0).
fn i8_scale(values: &[f32]) -> (f32, f32) {
    // A plain comparison, not `f32::max`: its NaN rule made this short
    // loop a long dependency chain.
    let largest = values
        .iter()
        .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
    let d = largest / 127.0;
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

thread_local! {
    /// The last input `with_input` quantized, whose memory the next one
    /// reuses (see there); as large as the largest step (a prefill chunk).
    static SPARE_INPUT: std::cell::Cell<LoraInput> = std::cell::Cell::new(LoraInput::default());
}

/// Runs `f` on `xs` (rows × width, row-major) quantized as a [`LoraInput`],
/// in memory reused from the last call on this thread. A decode step's
/// update runs once per layer, after the layer's weights have streamed
/// through every cache, and fresh allocations come from allocator memory
/// gone cold. Reusing this memory and the deltas' (see
/// `Model::project_rows`) cut what steering adds to a SmolLM2 decode step
/// from 54-57 µs to 33-42 µs (step timings, alternating runs).
pub fn with_input<R>(xs: &[f32], width: usize, f: impl FnOnce(&LoraInput) -> R) -> R {
    let mut input = SPARE_INPUT.take();
    input.fill(xs, width);
    let result = f(&input);
    SPARE_INPUT.set(input);
    result
}

impl LoraInput {
    /// `xs`: rows × width, row-major.
    #[cfg(test)]
    fn new(xs: &[f32], width: usize) -> Self {
        let mut input = Self::default();
        input.fill(xs, width);
        input
    }

    /// Quantizes `xs` (rows × width, row-major) into this input's memory.
    fn fill(&mut self, xs: &[f32], width: usize) {
        let padded = width.next_multiple_of(CHUNK);
        let rows = xs.len() / width.max(1);
        let lanes = padded / CHUNK * LANES;
        self.width = width;
        // Padding must read as zero: cleared, then refilled with zeros.
        self.q.clear();
        self.q.resize(rows * padded, 0);
        self.bias.clear();
        self.bias.resize(rows * lanes, 0);
        self.scales.clear();
        self.scales.resize(rows * lanes, 0.0);
        for (r, x) in xs.chunks_exact(width).enumerate() {
            let blocks = self.q[r * padded..][..padded]
                .chunks_exact_mut(BLOCK)
                .zip(self.bias[r * lanes..][..lanes].chunks_exact_mut(LANES / 2))
                .zip(self.scales[r * lanes..][..lanes].chunks_exact_mut(LANES / 2));
            for (xb, ((q, bias), scales)) in x.chunks(BLOCK).zip(blocks) {
                scales.fill(kernels::quantize_block(xb, q, bias));
            }
        }
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

/// LoRA updates for every layer and projection of one adapter, packed in
/// one block of memory (see the `store` module).
///
/// Every pass of every step asks the set which projections have an update,
/// after the pass before has streamed a megabyte of base weights through
/// the caches. So what those questions read is kept small: 14 bytes per
/// layer, and one or two cache lines for a layer's updates. With a record
/// of 88 bytes per layer and projection, a profile put 18 µs of each
/// steered SmolLM2 decode step in these lookups, nearly all of it waiting
/// on cache misses; with this layout, 4 µs.
#[derive(Debug)]
pub struct LoraSet {
    /// slots[l][ProjKind::index()]: 1 + the index in `updates` of that
    /// projection's update, or 0 where it has none.
    slots: Vec<[u16; 7]>,
    /// Where each update lies in `store`, layer after layer.
    updates: Vec<Packed>,
    store: Store,
}

/// Where one [`Lora`] lies in a [`LoraSet`]'s store, and its shape.
#[derive(Debug, Clone, Copy)]
struct Packed {
    at: usize,
    rank_rows: u32,
    input: u32,
    out: u32,
}

impl Packed {
    /// The byte ranges of A, A's scales, Bᵀ and B's scales, in this order
    /// from `at`, each starting on a cache line.
    fn parts(&self) -> [Range<usize>; 4] {
        // The next part's bytes from `end`, which moves to the next line.
        fn place(end: &mut usize, bytes: usize) -> Range<usize> {
            let start = *end;
            *end = (start + bytes).next_multiple_of(64);
            start..start + bytes
        }
        let rows = self.rank_rows as usize;
        let width = (self.input as usize).next_multiple_of(CHUNK);
        let out_width = (self.out as usize).next_multiple_of(OUT_STEP);
        let mut end = self.at;
        [
            place(&mut end, rows * width),
            place(&mut end, 4 * rows),
            place(&mut end, rows * out_width),
            place(&mut end, 4 * rows * out_width / OUT_STEP),
        ]
    }

    /// Where the next update may start.
    fn end(&self) -> usize {
        self.parts()[3].end.next_multiple_of(64)
    }
}

impl LoraSet {
    /// Packs `layers[l][ProjKind::index()]`, layer after layer.
    pub fn new(layers: Vec<[Option<Lora>; 7]>) -> Self {
        let mut end = 0;
        let (mut slots, mut updates) = (Vec::new(), Vec::new());
        for projs in &layers {
            slots.push(projs.each_ref().map(|lora| {
                let Some(lora) = lora else { return 0 };
                let shape = |n: usize| u32::try_from(n).expect("a LoRA dimension over 2^32");
                let packed = Packed {
                    at: end,
                    rank_rows: shape(lora.a_scales.len()),
                    input: shape(lora.input),
                    out: shape(lora.out),
                };
                end = packed.end();
                updates.push(packed);
                u16::try_from(updates.len()).expect("over 65,535 LoRA updates")
            }));
        }
        let mut store = Store::zeroed(end);
        let bytes = store.bytes_mut();
        let loras = layers.iter().flatten().flatten();
        for (lora, at) in loras.zip(&updates) {
            let [a, a_scales, b_t, b_scales] = at.parts();
            bytes[a].copy_from_slice(&lora.a);
            bytes[a_scales].copy_from_slice(bytemuck::cast_slice(&lora.a_scales));
            bytes[b_t].copy_from_slice(bytemuck::cast_slice(&lora.b_t));
            bytes[b_scales].copy_from_slice(bytemuck::cast_slice(&lora.b_scales));
        }
        Self {
            slots,
            updates,
            store,
        }
    }

    /// Whether this layer's projection has an update (reads 14 bytes).
    pub fn has(&self, layer: usize, kind: ProjKind) -> bool {
        self.slots
            .get(layer)
            .is_some_and(|slots| slots[kind.index()] != 0)
    }

    pub fn get(&self, layer: usize, kind: ProjKind) -> Option<LoraView<'_>> {
        let slot = self.slots.get(layer)?[kind.index()].checked_sub(1)?;
        let at = &self.updates[usize::from(slot)];
        let [a, a_scales, b_t, b_scales] = at.parts();
        let bytes = self.store.bytes();
        Some(LoraView {
            a: &bytes[a],
            a_scales: bytemuck::cast_slice(&bytes[a_scales]),
            b_t: bytemuck::cast_slice(&bytes[b_t]),
            b_scales: bytemuck::cast_slice(&bytes[b_scales]),
            input: at.input as usize,
            out: at.out as usize,
        })
    }

    /// Reads every update of one layer into the calling core's cache.
    ///
    /// Between two steps the stream of base weights (98 MB on SmolLM2)
    /// pushes these few kilobytes (16 KB per layer for rank-8 q and v) out
    /// of every cache. Fetched on demand by the update's own loads, they
    /// cost 2.5-3.6 µs per layer. Plain loads, one per cache line, run many
    /// misses at once; the task that computes the update runs them first.
    /// With each update in allocations of its own, that took 0.54-1.7 µs
    /// per layer; with the set in one block on a huge page, 0.36-0.83 µs.
    /// Prefetch instructions issued earlier (before the layer's norm, or a
    /// layer ahead) made this read faster still, but not the steps: the
    /// same lines still cross the same memory bus.
    pub fn warm(&self, layer: usize) {
        // A layer's updates lie together, in the order of its slots.
        let Some(slots) = self.slots.get(layer) else {
            return;
        };
        let mut packed = slots
            .iter()
            .filter_map(|&slot| Some(&self.updates[usize::from(slot.checked_sub(1)?)]));
        let Some(first) = packed.next() else {
            return;
        };
        let end = packed.next_back().unwrap_or(first).end();
        let bytes = &self.store.bytes()[first.at..end];
        let sum = bytes
            .iter()
            .step_by(64)
            .fold(0u8, |acc, &b| acc.wrapping_add(b));
        std::hint::black_box(sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Packed in a set, every update gives exactly what it gives on its
    /// own, whatever its layer and projection; layers and projections
    /// without one have none, and warming any layer is harmless.
    #[test]
    fn set_views_match_their_updates() -> Result<()> {
        let dev = Device::Cpu;
        let update = |input, out, rank| -> Result<Lora> {
            let a = Tensor::randn(0f32, 0.05, (rank, input), &dev)?;
            let b = Tensor::randn(0f32, 0.02, (out, rank), &dev)?;
            Lora::new(&a, &b, 2.0)
        };
        let mut layers: Vec<[Option<Lora>; 7]> = vec![Default::default(); 3];
        layers[0][ProjKind::Q.index()] = Some(update(96, 96, 8)?);
        layers[0][ProjKind::V.index()] = Some(update(96, 40, 8)?);
        layers[2][ProjKind::Down.index()] = Some(update(70, 96, 5)?);
        let set = LoraSet::new(layers.clone());
        let x = Tensor::randn(0f32, 1.0, (2, 96), &dev)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (l, projs) in layers.iter().enumerate() {
            for kind in ProjKind::ALL {
                assert_eq!(set.has(l, kind), projs[kind.index()].is_some());
                let (Some(lora), Some(view)) = (&projs[kind.index()], set.get(l, kind)) else {
                    assert!(projs[kind.index()].is_none() && set.get(l, kind).is_none());
                    continue;
                };
                let x = &x[..2 * lora.input];
                let (mut alone, mut packed) =
                    (vec![0.5f32; 2 * lora.out], vec![0.5f32; 2 * lora.out]);
                lora.add_to(x, &mut alone);
                view.add_quantized(&LoraInput::new(x, lora.input), &mut packed);
                assert_eq!(alone, packed, "layer {l} {kind:?}");
                assert!(alone.iter().any(|&v| v != 0.5));
            }
            set.warm(l);
        }
        set.warm(3);
        Ok(())
    }

    /// Many rows at once give exactly what each row gives alone: a
    /// prompt's rows and a decode step's row see the same arithmetic,
    /// whether the output ends on a whole block or not, at one group of
    /// rank rows or two.
    #[test]
    fn rows_at_once_match_rows_alone() -> Result<()> {
        let dev = Device::Cpu;
        for (input, out, rank) in [(576, 192, 8), (70, 45, 16)] {
            let a = Tensor::randn(0f32, 0.05, (rank, input), &dev)?;
            let b = Tensor::randn(0f32, 0.02, (out, rank), &dev)?;
            let lora = Lora::new(&a, &b, 2.0)?;
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (11, input), &dev)?
                .flatten_all()?
                .to_vec1()?;
            let mut together = vec![0.25f32; 11 * out];
            lora.add_to(&x, &mut together);
            for (r, expected) in together.chunks_exact(out).enumerate() {
                let mut alone = vec![0.25f32; out];
                lora.add_to(&x[r * input..][..input], &mut alone);
                assert_eq!(alone, expected, "row {r} of {input}x{out}, rank {rank}");
                assert!(alone.iter().any(|&v| v != 0.25));
            }
        }
        Ok(())
    }

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
            assert_eq!(lora.out, out);
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
