//! The inner loops, in 512-bit registers where the CPU has them.

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

/// y += Σ_i w[i] · b[i][at..at + 32] for each (w, y) of `rows`, with
/// eight rows of `b` (each `width` long), widened once for all of them.
pub(super) fn add_group_rows<'y>(
    b: &[i8],
    width: usize,
    at: usize,
    rows: impl Iterator<Item = ([f32; 8], &'y mut [f32; OUT_STEP])>,
) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    {
        // SAFETY: the cfg guarantees the instructions; the loads are
        // 32 values at `i·width + at` with at + 32 ≤ width.
        return unsafe { add_group_rows_avx512(b, width, at, rows) };
    }
    #[allow(unreachable_code)]
    for (w, y) in rows {
        add_group_portable(b, width, at, &w, y);
    }
}

fn add_group_portable(b: &[i8], width: usize, at: usize, w: &[f32; 8], y: &mut [f32; OUT_STEP]) {
    for (i, &w) in w.iter().enumerate() {
        for (y, &b) in y.iter_mut().zip(&b[i * width + at..][..OUT_STEP]) {
            *y = f32::from(b).mul_add(w, *y);
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
unsafe fn add_group_rows_avx512<'y>(
    b: &[i8],
    width: usize,
    at: usize,
    rows: impl Iterator<Item = ([f32; 8], &'y mut [f32; OUT_STEP])>,
) {
    use std::arch::x86_64::*;
    debug_assert!(at + OUT_STEP <= width && b.len() >= GROUP * width);
    // Sixteen values of row i of b from `half` · 16, as floats. Written out
    // as plain arrays, the 16 registers stay registers (an array built by
    // a closure went through the stack).
    let widen = |i: usize, half: usize| {
        let p = (b.as_ptr().add(i * width + at) as *const __m128i).add(half);
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)))
    };
    let lo_b = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| widen(i, 0));
    let hi_b = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| widen(i, 1));
    for (w, y) in rows {
        let mut lo = _mm512_loadu_ps(y.as_ptr());
        let mut hi = _mm512_loadu_ps(y.as_ptr().add(16));
        for i in 0..GROUP {
            let w = _mm512_set1_ps(w[i]);
            lo = _mm512_fmadd_ps(lo_b[i], w, lo);
            hi = _mm512_fmadd_ps(hi_b[i], w, hi);
        }
        _mm512_storeu_ps(y.as_mut_ptr(), lo);
        _mm512_storeu_ps(y.as_mut_ptr().add(16), hi);
    }
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
        let w: [[f32; 8]; 3] =
            std::array::from_fn(|r| std::array::from_fn(|i| (i + r) as f32 * 0.25 - 1.0));
        let (mut y1, mut y2) = ([[0.5f32; OUT_STEP]; 3], [[0.5f32; OUT_STEP]; 3]);
        add_group_rows(&b, 2 * OUT_STEP, OUT_STEP, w.into_iter().zip(&mut y1));
        for (w, y) in w.iter().zip(&mut y2) {
            add_group_portable(&b, 2 * OUT_STEP, OUT_STEP, w, y);
        }
        let (y1, y2) = (y1.as_flattened(), y2.as_flattened());
        for (p, q) in y1.iter().zip(y2) {
            assert!((p - q).abs() <= 1e-4 * q.abs().max(1.0), "{p} vs {q}");
        }
        assert!(y1.iter().any(|&y| y != 0.5));
    }
}
