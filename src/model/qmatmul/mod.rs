//! Quantized matrix multiply for the GGUF block formats of the default model
//! (Q4_1 layers, Q8_0 head), tiled for batches.
//!
//! candle computes Q4_1 with scalar code, and its Q8_0 kernel takes one
//! activation row at a time; either way a batch of 16 rows costs nearly 16×
//! one row, and batching gains little. These kernels follow ggml's (8-bit
//! activations per 32-block, u8×i8 products summed in integer lanes, one
//! scale per block pair) and unpack each weight block once for up to eight
//! activation rows. At batch 16 the weights still come from memory at every
//! step (the model is larger than the last-level cache), so the kernels
//! prefetch the next weight group while computing the current one. Other
//! GGUF types stay on candle's QMatMul.

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

mod kernel;
#[cfg(target_arch = "x86_64")]
mod x8;

use kernel::Kernel;

const BLOCK: usize = 32;

/// Activation rows from which the 512-bit kernels are used.
#[cfg(target_arch = "x86_64")]
const WIDE_FROM_ROWS: usize = 8;

/// ggml's block_q4_1: value = d·q + m, q in 0..16; byte j holds elements j
/// (low nibble) and j+16 (high nibble).
#[derive(Debug, Clone, Copy)]
struct BlockQ4_1 {
    d: f32,
    m: f32,
    qs: [u8; 16],
}

/// ggml's block_q8_0: value = d·q, q in −127..=127.
#[derive(Debug, Clone, Copy)]
struct BlockQ8_0 {
    d: f32,
    qs: [i8; 32],
}

/// An activation block: value ≈ d·q, with s = d·Σq; `qu` = q + 128 for
/// kernels that need the activations unsigned.
#[derive(Debug, Clone, Copy)]
struct BlockQ8 {
    d: f32,
    s: f32,
    qs: [i8; 32],
    qu: [u8; 32],
}

#[derive(Debug, Clone)]
enum Blocks {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
    /// Interleaved by eight rows, for AVX-VNNI.
    #[cfg(target_arch = "x86_64")]
    Q4_1x8(Vec<x8::Q41x8>),
    #[cfg(target_arch = "x86_64")]
    Q8_0x8(Vec<x8::Q80x8>),
}

#[derive(Debug, Clone)]
pub struct QMatrix {
    blocks: Blocks,
    rows: usize,
    cols: usize,
}

fn half(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

impl QMatrix {
    /// Takes a 2-D Q4_1 or Q8_0 tensor; None for other formats.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let [rows, cols] = *q.shape().dims() else {
            return Ok(None);
        };
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        let data = q.data()?;
        let blocks = match q.dtype() {
            GgmlDType::Q4_1 => Blocks::Q4_1(
                data.chunks_exact(20)
                    .map(|b| BlockQ4_1 {
                        d: half(&b[0..2]),
                        m: half(&b[2..4]),
                        qs: b[4..20].try_into().unwrap(),
                    })
                    .collect(),
            ),
            GgmlDType::Q8_0 => Blocks::Q8_0(
                data.chunks_exact(34)
                    .map(|b| BlockQ8_0 {
                        d: half(&b[0..2]),
                        qs: std::array::from_fn(|i| b[2 + i] as i8),
                    })
                    .collect(),
            ),
            _ => return Ok(None),
        };
        let n_blocks = match &blocks {
            Blocks::Q4_1(b) => b.len(),
            Blocks::Q8_0(b) => b.len(),
            #[cfg(target_arch = "x86_64")]
            _ => unreachable!("interleaving happens below"),
        };
        if n_blocks != rows * cols / BLOCK {
            bail!("quantized tensor of shape ({rows}, {cols}) has {n_blocks} blocks");
        }
        let matrix = Self { blocks, rows, cols };
        Ok(Some(if Kernel::detect().interleaves() {
            matrix.interleaved()
        } else {
            matrix
        }))
    }

    /// The same matrix in the eight-row layout, where the CPU has AVX-VNNI.
    fn interleaved(self) -> Self {
        #[cfg(target_arch = "x86_64")]
        if self.rows.is_multiple_of(8) {
            let kb = self.cols / BLOCK;
            let blocks = match &self.blocks {
                Blocks::Q4_1(b) => Blocks::Q4_1x8(x8::pack_q4_1(b, self.rows, kb)),
                Blocks::Q8_0(b) => Blocks::Q8_0x8(x8::pack_q8_0(b, self.rows, kb)),
                _ => return self,
            };
            return Self { blocks, ..self };
        }
        self
    }

    /// The same matrix in ggml's row-by-row layout.
    fn plain(&self) -> Blocks {
        let kb = self.cols / BLOCK;
        match &self.blocks {
            #[cfg(target_arch = "x86_64")]
            Blocks::Q4_1x8(p) => Blocks::Q4_1(x8::unpack_q4_1(p, self.rows, kb)),
            #[cfg(target_arch = "x86_64")]
            Blocks::Q8_0x8(p) => Blocks::Q8_0(x8::unpack_q8_0(p, self.rows, kb)),
            other => other.clone(),
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        match &self.plain() {
            Blocks::Q4_1(blocks) => {
                for b in blocks {
                    out.extend(b.qs.iter().map(|q| b.d * (q & 0x0F) as f32 + b.m));
                    out.extend(b.qs.iter().map(|q| b.d * (q >> 4) as f32 + b.m));
                }
            }
            Blocks::Q8_0(blocks) => {
                for b in blocks {
                    out.extend(b.qs.iter().map(|&q| b.d * q as f32));
                }
            }
            #[cfg(target_arch = "x86_64")]
            _ => unreachable!("plain() returns row-by-row blocks"),
        }
        Ok(Tensor::from_vec(out, (self.rows, self.cols), device)?)
    }

    /// x: (m, cols) f32 → (m, rows).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(forward_many(&[self], x)?.remove(0))
    }

    /// Fills `out` (m × cols, row-major) with the outputs of weight rows
    /// `first..first + cols` for every activation row.
    fn fill(
        &self,
        kernel: Kernel,
        acts: &[&[BlockQ8]],
        first: usize,
        cols: usize,
        out: &mut [f32],
    ) {
        let kb = self.cols / BLOCK;
        // 512-bit kernels pay off from about eight activation rows; below
        // that the 256-bit ones are faster (measured with `steerling bench`).
        #[cfg(target_arch = "x86_64")]
        let evex = kernel == Kernel::Avx512Vnni;
        #[cfg(target_arch = "x86_64")]
        let wide = evex && acts.len() >= WIDE_FROM_ROWS;
        match &self.blocks {
            Blocks::Q4_1(b) => by_row(acts, first, cols, out, |c, a, o| {
                kernel.dot_q4_1(&b[c * kb..][..kb], a, o)
            }),
            Blocks::Q8_0(b) => by_row(acts, first, cols, out, |c, a, o| {
                kernel.dot_q8_0(&b[c * kb..][..kb], a, o)
            }),
            #[cfg(target_arch = "x86_64")]
            Blocks::Q4_1x8(b) => by_group(
                acts,
                first,
                cols,
                out,
                wide.then_some(|g: usize, a: &[&[BlockQ8]]| {
                    x16_dispatch!(q4_1_x16, &b[g * kb..][..kb], &b[(g + 1) * kb..][..kb], a)
                }),
                |g, a| x8_dispatch!(q4_1_x8, evex, &b[g * kb..][..kb], a),
            ),
            #[cfg(target_arch = "x86_64")]
            Blocks::Q8_0x8(b) => by_group(
                acts,
                first,
                cols,
                out,
                wide.then_some(|g: usize, a: &[&[BlockQ8]]| {
                    x16_dispatch!(q8_0_x16, &b[g * kb..][..kb], &b[(g + 1) * kb..][..kb], a)
                }),
                |g, a| x8_dispatch!(q8_0_x8, evex, &b[g * kb..][..kb], a),
            ),
        }
    }
}

/// Several matrices with the same input (q/k/v, gate/up): the input is
/// quantized once and all their work runs as one parallel pass, so the
/// threads meet once instead of once per matrix.
pub fn forward_many(mats: &[&QMatrix], x: &Tensor) -> Result<Vec<Tensor>> {
    forward_many_with(Kernel::detect(), mats, x)
}

fn forward_many_with(kernel: Kernel, mats: &[&QMatrix], x: &Tensor) -> Result<Vec<Tensor>> {
    let (m, _) = x.dims2()?;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let (outs, _) = forward_rows_with(kernel, mats, &xs, m, None::<&Beside<()>>)?;
    outs.into_iter()
        .zip(mats)
        .map(|(o, mat)| Ok(Tensor::from_vec(o, (m, mat.rows), x.device())?))
        .collect()
}

/// As `forward_many`, on plain rows: xs is (m, cols) row-major; each output
/// is (m, rows) row-major.
pub fn forward_rows(mats: &[&QMatrix], xs: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
    let (outs, _) = forward_rows_with(Kernel::detect(), mats, xs, m, None::<&Beside<()>>)?;
    Ok(outs)
}

/// Work that needs the same input as a matmul but not its outputs.
pub type Beside<'a, T> = dyn Fn() -> T + Sync + 'a;

/// As `forward_rows`, with `beside` run as one more task of the same
/// parallel pass, ahead of the matrices' tasks, by whichever thread gets
/// to it: small work (a LoRA update) costs no pass of its own, and no
/// thread waits on it apart from the pass's own end, as for any task.
pub fn forward_rows_beside<T: Send + Sync>(
    mats: &[&QMatrix],
    xs: &[f32],
    m: usize,
    beside: &Beside<T>,
) -> Result<(Vec<Vec<f32>>, T)> {
    let (outs, value) = forward_rows_with(Kernel::detect(), mats, xs, m, Some(beside))?;
    Ok((outs, value.expect("the pass runs every task")))
}

fn forward_rows_with<T: Send + Sync>(
    kernel: Kernel,
    mats: &[&QMatrix],
    xs: &[f32],
    m: usize,
    beside: Option<&Beside<T>>,
) -> Result<(Vec<Vec<f32>>, Option<T>)> {
    let k = xs.len() / m.max(1);
    for mat in mats {
        if k != mat.cols || xs.len() != m * k {
            bail!("matmul input has {k} columns, weight expects {}", mat.cols);
        }
    }
    let acts = quantize_rows(xs);
    let rows: Vec<&[BlockQ8]> = acts.chunks_exact(k / BLOCK).collect();
    // Tasks of up to 256 weight rows (a multiple of 16, so the 512-bit
    // kernels never fall back to eight rows mid-matrix), several per thread;
    // `beside` first (None), so the thread that starts the pass takes it
    // while the others take the matrices.
    let threads = rayon::current_num_threads();
    let mut tasks = Vec::new();
    if beside.is_some() {
        tasks.push(None);
    }
    for (mi, mat) in mats.iter().enumerate() {
        let per_task = (mat.rows / (threads * 8))
            .clamp(16, 256)
            .next_multiple_of(16);
        for first in (0..mat.rows).step_by(per_task) {
            tasks.push(Some((mi, first, per_task.min(mat.rows - first))));
        }
    }
    let mut outs: Vec<Vec<f32>> = mats.iter().map(|mat| vec![0f32; m * mat.rows]).collect();
    let targets: Vec<OutColumns> = outs.iter_mut().map(|o| OutColumns::new(o)).collect();
    // On cache lines of its own: the locals beside it are read by every
    // worker, and setting it is an atomic write that would take their line
    // away from them.
    let beside_out = OwnLines(std::sync::OnceLock::new());
    tasks.par_iter().for_each(|&task| {
        let Some((mi, first, cols)) = task else {
            if let Some(beside) = beside {
                let _ = beside_out.0.set(beside());
            }
            return;
        };
        LOCAL.with_borrow_mut(|local| {
            local.clear();
            local.resize(m * cols, 0.0);
            mats[mi].fill(kernel, &rows, first, cols, local);
            let n = mats[mi].rows;
            for (r, row) in local.chunks_exact(cols).enumerate() {
                // SAFETY: tasks cover disjoint column ranges of each output,
                // so no two write the same floats; r·n + first + cols ≤ m·n.
                unsafe { targets[mi].write(r * n + first, row) };
            }
        });
    });
    Ok((outs, beside_out.0.into_inner()))
}

/// A value alone on its cache lines (two: the CPU's adjacent-line
/// prefetcher pairs them).
#[repr(align(128))]
struct OwnLines<T>(T);

thread_local! {
    /// A task's outputs before they go to their columns, reused.
    static LOCAL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An output matrix that parallel tasks fill, each its own columns: the
/// copy happens inside the tasks instead of after them on one thread.
struct OutColumns {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: see `write`: callers write disjoint ranges while the output is
// borrowed by `forward_rows_with` and nothing reads it.
unsafe impl Sync for OutColumns {}

impl OutColumns {
    fn new(out: &mut [f32]) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// Copies `values` to `at..at + values.len()`.
    ///
    /// # Safety
    /// No other thread may write or read that range meanwhile.
    unsafe fn write(&self, at: usize, values: &[f32]) {
        assert!(at + values.len() <= self.len, "output range out of bounds");
        // SAFETY: in bounds (asserted) and exclusive (the caller's promise).
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.ptr.add(at), values.len()) };
    }
}

/// Quantizes activations block by block; in parallel when there are enough
/// blocks to be worth waking another thread (a batch, not one row).
fn quantize_rows(xs: &[f32]) -> Vec<BlockQ8> {
    const PARALLEL_FROM_BLOCKS: usize = 256;
    if xs.len() / BLOCK < PARALLEL_FROM_BLOCKS {
        return xs.chunks_exact(BLOCK).map(quantize_block).collect();
    }
    xs.par_chunks_exact(BLOCK)
        .with_min_len(PARALLEL_FROM_BLOCKS / 4)
        .map(quantize_block)
        .collect()
}

/// Weight rows one at a time, four activation rows per kernel call.
fn by_row(
    acts: &[&[BlockQ8]],
    first: usize,
    cols: usize,
    out: &mut [f32],
    dot: impl Fn(usize, &[&[BlockQ8]], &mut [f32]),
) {
    let mut four = [0f32; 4];
    for c in 0..cols {
        for (start, group) in (0..acts.len()).step_by(4).zip(acts.chunks(4)) {
            dot(first + c, group, &mut four[..group.len()]);
            for (r, v) in four[..group.len()].iter().enumerate() {
                out[(start + r) * cols + c] = *v;
            }
        }
    }
}

/// Weight rows sixteen (`pair`, when the CPU has it) or eight at a time
/// (`first` is a multiple of 8), eight activation rows per call of the
/// sixteen-row kernels and four per call of the eight-row ones.
#[cfg(target_arch = "x86_64")]
fn by_group(
    acts: &[&[BlockQ8]],
    first: usize,
    cols: usize,
    out: &mut [f32],
    pair: Option<impl Fn(usize, &[&[BlockQ8]]) -> [[f32; 16]; 8]>,
    single: impl Fn(usize, &[&[BlockQ8]]) -> [[f32; 8]; 4],
) {
    let groups = cols / 8;
    let mut g = 0;
    while g < groups {
        let width = if pair.is_some() && g + 1 < groups {
            16
        } else {
            8
        };
        // The sixteen-row kernels take up to eight activation rows per call.
        let per_call = if width == 16 { 8 } else { 4 };
        for (start, rows) in (0..acts.len()).step_by(per_call).zip(acts.chunks(per_call)) {
            let mut lanes = [[0f32; 16]; 8];
            match &pair {
                Some(pair) if width == 16 => lanes = pair(first / 8 + g, rows),
                _ => {
                    for (dst, src) in lanes.iter_mut().zip(single(first / 8 + g, rows)) {
                        dst[..8].copy_from_slice(&src);
                    }
                }
            }
            for (r, row) in lanes[..rows.len()].iter().enumerate() {
                out[(start + r) * cols + 8 * g..][..width].copy_from_slice(&row[..width]);
            }
        }
        g += width / 8;
    }
}

/// Calls an eight-row kernel with 1..=4 activation rows.
#[cfg(target_arch = "x86_64")]
macro_rules! x8_dispatch {
    ($f:ident, $evex:expr, $w:expr, $acts:expr) => {{
        let (a, evex) = ($acts, $evex);
        let mut out = [[0f32; 8]; 4];
        unsafe {
            match a.len() {
                4 => out = x8::$f::<4>(evex, $w, [a[0], a[1], a[2], a[3]]),
                3 => out[..3].copy_from_slice(&x8::$f::<3>(evex, $w, [a[0], a[1], a[2]])),
                2 => out[..2].copy_from_slice(&x8::$f::<2>(evex, $w, [a[0], a[1]])),
                _ => out[..1].copy_from_slice(&x8::$f::<1>(evex, $w, [a[0]])),
            }
        }
        out
    }};
}
#[cfg(target_arch = "x86_64")]
use x8_dispatch;

/// Calls a sixteen-row kernel with 1..=8 activation rows (5..=7 as four
/// and singles: a batch's last few rows).
#[cfg(target_arch = "x86_64")]
macro_rules! x16_dispatch {
    ($f:ident, $wa:expr, $wb:expr, $acts:expr) => {{
        let a = $acts;
        let mut out = [[0f32; 16]; 8];
        unsafe {
            match a.len() {
                8 => out = x8::$f::<8>($wa, $wb, [a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
                5..=7 => {
                    out[..4].copy_from_slice(&x8::$f::<4>($wa, $wb, [a[0], a[1], a[2], a[3]]));
                    for (o, r) in out[4..].iter_mut().zip(&a[4..]) {
                        *o = x8::$f::<1>($wa, $wb, [*r])[0];
                    }
                }
                4 => out[..4].copy_from_slice(&x8::$f::<4>($wa, $wb, [a[0], a[1], a[2], a[3]])),
                3 => out[..3].copy_from_slice(&x8::$f::<3>($wa, $wb, [a[0], a[1], a[2]])),
                2 => out[..2].copy_from_slice(&x8::$f::<2>($wa, $wb, [a[0], a[1]])),
                _ => out[..1].copy_from_slice(&x8::$f::<1>($wa, $wb, [a[0]])),
            }
        }
        out
    }};
}
#[cfg(target_arch = "x86_64")]
use x16_dispatch;

/// Quantizes 32 activations as candle's Q8_1 does: rounding half away from
/// zero, d stored as f16, and s = f16(Σq)·f16(d) rounded to f16 (ggml rounds
/// d·Σq once instead). Matching it keeps our logits within float-summation
/// noise of candle-transformers' on the same file.
fn quantize_block(x: &[f32]) -> BlockQ8 {
    // Written so it vectorizes: lane-wise maxima, and rounding half away
    // from zero (what `f32::round` does) from `trunc`, which has a vector
    // instruction where `round` becomes a call per element.
    let mut lanes = [0f32; 8];
    for chunk in x.chunks_exact(8) {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v.abs());
        }
    }
    let tail = x.chunks_exact(8).remainder();
    let amax = lanes.iter().chain(tail).fold(0f32, |m, &v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut rounded = [0f32; BLOCK];
    for (r, v) in rounded.iter_mut().zip(x) {
        let y = v * id;
        let t = y.trunc();
        *r = if (y - t).abs() >= 0.5 {
            t + 1f32.copysign(y)
        } else {
            t
        };
    }
    let mut qs = [0i8; BLOCK];
    for (q, r) in qs.iter_mut().zip(&rounded) {
        // |r| ≤ 127 already; the clamp also turns NaN into a number, so the
        // unchecked conversion (one vector instruction, where `as` is a
        // saturating scalar sequence per element) is sound.
        #[allow(clippy::manual_clamp)] // clamp would keep NaN
        let r = r.max(-127.0).min(127.0);
        // SAFETY: r is finite and within i32 (see above).
        *q = unsafe { r.to_int_unchecked::<i32>() } as i8;
    }
    let sum: i32 = qs.iter().map(|&q| q as i32).sum();
    let qu = qs.map(|q| (q as i16 + 128) as u8);
    BlockQ8 {
        d: f16::from_f32(d).to_f32(),
        s: (f16::from_f32(sum as f32) * f16::from_f32(d)).to_f32(),
        qs,
        qu,
    }
}

#[cfg(test)]
mod tests;
