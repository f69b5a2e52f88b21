//! Elementwise math on f32 slices written so that it vectorizes: libm's
//! `expf` is a call per element, and left-to-right float sums cannot be
//! reordered into vector lanes by the compiler.

use anyhow::Result;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// e^x, branch-free so that loops of it vectorize. x = n·ln2 + r with
/// |r| ≤ ln2/2; e^r from its Taylor series to r⁷ (truncation error below
/// 1e-8 relative); 2^n built in the exponent bits. x is clamped to
/// [−87, 88], the range whose results are normal floats.
#[inline]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // max/min also turn NaN into a number, which the conversion below needs.
    #[allow(clippy::manual_clamp)] // clamp would keep NaN
    let x = x.max(-87.0).min(88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0] {
        p = p * r + 1.0 / c;
    }
    // SAFETY: n is a whole number in −126..=127 (x was clamped above).
    let n = unsafe { n.to_int_unchecked::<i32>() };
    p * f32::from_bits(((n + 127) << 23) as u32)
}

/// In-place softmax, in passes that each vectorize: max, exponentials, sum,
/// scale.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    x.iter_mut().for_each(|v| *v = exp(*v - max));
    let inv = 1.0 / lane_sum(x);
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Sum with sixteen independent accumulators.
pub fn lane_sum(x: &[f32]) -> f32 {
    let (blocks, tail) = x.as_chunks::<16>();
    let mut acc = [0f32; 16];
    for b in blocks {
        for j in 0..16 {
            acc[j] += b[j];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// silu(gate) · up, the SwiGLU activation, in one pass over both (two
/// tensor ops and a temporary otherwise). f32 tensors of one shape; other
/// dtypes go through candle's own ops.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        return Ok((candle_nn::ops::silu(gate)? * up)?);
    }
    Ok(gate.apply_op2_no_bwd(up, &SiluMul)?)
}

struct SiluMul;

impl candle_core::CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(gate), CpuStorage::F32(up)) = (s1, s2) else {
            candle_core::bail!("silu-mul takes f32 tensors");
        };
        let (Some((g0, g1)), Some((u0, u1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("silu-mul takes contiguous tensors");
        };
        if l1.shape() != l2.shape() {
            candle_core::bail!("silu-mul shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let (gate, up) = (&gate[g0..g1], &up[u0..u1]);
        let mut out = vec![0f32; gate.len()];
        // A batch's worth is split across threads; one row is not worth it.
        const CHUNK: usize = 4096;
        let fill = |(o, (g, u)): (&mut [f32], (&[f32], &[f32]))| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + exp(-g)) * u;
            }
        };
        if out.len() >= 2 * CHUNK {
            out.par_chunks_mut(CHUNK)
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
                .for_each(fill);
        } else {
            fill((&mut out, (gate, up)));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_over_its_range() {
        let mut worst = 0f32;
        for i in 0..=17_500 {
            let x = -87.0 + i as f32 * 0.01;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(f32::NAN).is_finite());
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x = vec![
            1.0, 3.0, -2.0, 0.5, 3.0, -40.0, 7.0, 2.0, 0.0, 1.5, -1.0, 4.0, 2.5, 0.1, 0.2, 0.3, 9.0,
        ];
        let want: Vec<f32> = {
            let m = 9.0f32;
            let e: Vec<f32> = x.iter().map(|v: &f32| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        softmax(&mut x);
        for (g, w) in x.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn silu_mul_matches_candle() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        // Large enough to take the parallel path, with a ragged last chunk.
        for n in [7usize, 3 * 4096 + 5] {
            let gate = (Tensor::randn(0f32, 3.0, (1, n), &dev)?).contiguous()?;
            let up = Tensor::randn(0f32, 1.0, (1, n), &dev)?;
            let want: Vec<f32> = (candle_nn::ops::silu(&gate)? * &up)?
                .flatten_all()?
                .to_vec1()?;
            let got: Vec<f32> = silu_mul(&gate, &up)?.flatten_all()?.to_vec1()?;
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
            }
        }
        Ok(())
    }
}
