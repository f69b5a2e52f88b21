//! The row-by-row dot-product kernels (one weight row against up to four
//! activation rows: scalar, AVX2, VNNI) and the choice of the best
//! kernel this CPU has. The interleaved batch kernels are in `x8`.

use super::{BlockQ4_1, BlockQ8, BlockQ8_0};

/// The best dot-product kernels this CPU has.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    /// AVX-512 VNNI: interleaved pairs of groups in 512-bit registers, and
    /// its encoding of the 256-bit dot for the rest (AVX-VNNI not needed).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

/// Calls the R-row kernel matching `acts.len()` (1..=4).
macro_rules! dispatch_rows {
    ($f:ident, $w:expr, $acts:expr, $outs:expr) => {{
        match $acts.len() {
            4 => $outs.copy_from_slice(&$f::<4>($w, [$acts[0], $acts[1], $acts[2], $acts[3]])),
            3 => $outs.copy_from_slice(&$f::<3>($w, [$acts[0], $acts[1], $acts[2]])),
            2 => $outs.copy_from_slice(&$f::<2>($w, [$acts[0], $acts[1]])),
            _ => $outs.copy_from_slice(&$f::<1>($w, [$acts[0]])),
        }
    }};
}

impl Kernel {
    /// Whether this kernel uses the eight-row interleaved layouts.
    pub(super) fn interleaves(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return matches!(self, Kernel::AvxVnni | Kernel::Avx512Vnni);
        #[allow(unreachable_code)]
        false
    }

    /// The best kernel this CPU has, capped by `STEERLING_KERNEL`
    /// (scalar, avx2, avxvnni, avx512vnni) for benchmarks and comparisons.
    pub(super) fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            let cap = std::env::var("STEERLING_KERNEL").unwrap_or_default();
            let available = Self::available();
            available
                .iter()
                .rev()
                .find(|k| cap.is_empty() || k.name() == cap)
                .or(available.last())
                .copied()
                .unwrap_or(Kernel::Scalar)
        })
    }

    /// Every kernel this CPU can run, slowest first.
    pub(super) fn available() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let vnni = avx2 && is_x86_feature_detected!("avxvnni");
            // Not AVX-VNNI: AMD's Zen 4 has AVX-512 VNNI without it.
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            kernels.extend(
                [
                    (avx2, Kernel::Avx2),
                    (vnni, Kernel::AvxVnni),
                    (avx512, Kernel::Avx512Vnni),
                ]
                .into_iter()
                .filter(|(ok, _)| *ok)
                .map(|(_, k)| k),
            );
        }
        kernels
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => "avxvnni",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => "avx512vnni",
        }
    }

    /// outs[r] = w · acts[r] for up to four activation rows.
    pub(super) fn dot_q4_1(self, w: &[BlockQ4_1], acts: &[&[BlockQ8]], outs: &mut [f32]) {
        match self {
            Kernel::Scalar => {
                for (o, a) in outs.iter_mut().zip(acts) {
                    *o = dot_q4_1_scalar(w, a);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { dispatch_rows!(q4_1_avx2, w, acts, outs) },
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => unsafe { dispatch_rows!(q4_1_vnni, w, acts, outs) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { dispatch_rows!(q4_1_vnni_evex, w, acts, outs) },
        }
    }

    pub(super) fn dot_q8_0(self, w: &[BlockQ8_0], acts: &[&[BlockQ8]], outs: &mut [f32]) {
        match self {
            Kernel::Scalar => {
                for (o, a) in outs.iter_mut().zip(acts) {
                    *o = dot_q8_0_scalar(w, a);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { dispatch_rows!(q8_0_avx2, w, acts, outs) },
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => unsafe { dispatch_rows!(q8_0_vnni, w, acts, outs) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { dispatch_rows!(q8_0_vnni_evex, w, acts, outs) },
        }
    }
}

fn dot_q4_1_scalar(w: &[BlockQ4_1], a: &[BlockQ8]) -> f32 {
    let mut total = 0f32;
    for (x, y) in w.iter().zip(a) {
        let mut acc = 0i32;
        for j in 0..16 {
            acc += (x.qs[j] & 0x0F) as i32 * y.qs[j] as i32;
            acc += (x.qs[j] >> 4) as i32 * y.qs[j + 16] as i32;
        }
        total += x.d * y.d * acc as f32 + x.m * y.s;
    }
    total
}

fn dot_q8_0_scalar(w: &[BlockQ8_0], a: &[BlockQ8]) -> f32 {
    let mut total = 0f32;
    for (x, y) in w.iter().zip(a) {
        let acc: i32 =
            x.qs.iter()
                .zip(&y.qs)
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
        total += x.d * y.d * acc as f32;
    }
    total
}

/// One weight row against R activation rows. `$unpack` turns a weight block
/// into (unsigned bytes, the block's min or 0); `$signed` gives the
/// activation bytes matching those unsigned weights; `$product` sums u8×i8
/// products over groups of four into i32 lanes.
macro_rules! dot_rows_kernel {
    ($name:ident, $block:ty, $features:literal, $unpack:expr, $signed:expr, $product:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(w: &[$block], acts: [&[BlockQ8]; R]) -> [f32; R] {
            use std::arch::x86_64::*;
            let mut acc = [_mm256_setzero_ps(); R];
            let mut mins = [0f32; R];
            for (b, x) in w.iter().enumerate() {
                let (weights, min): (__m256i, f32) = $unpack(x);
                for r in 0..R {
                    let y = acts[r].get_unchecked(b);
                    let q8 = $signed(_mm256_loadu_si256(y.qs.as_ptr() as *const __m256i), x);
                    let sums = _mm256_cvtepi32_ps($product(weights, q8));
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(x.d * y.d), sums, acc[r]);
                    mins[r] += min * y.s;
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                let hi = _mm256_extractf128_ps(acc[r], 1);
                let sum4 = _mm_add_ps(_mm256_castps256_ps128(acc[r]), hi);
                let sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
                let sum1 = _mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1));
                out[r] = _mm_cvtss_f32(sum1) + mins[r];
            }
            out
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    #[inline(always)]
    pub unsafe fn maddubs(x: __m256i, y: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
    }

    #[inline(always)]
    pub unsafe fn vnni(x: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), x, y)
    }

    /// `vnni` in AVX-512 VNNI's encoding.
    #[inline(always)]
    pub unsafe fn vnni_evex(x: __m256i, y: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y)
    }

    #[inline(always)]
    pub unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
        let packed = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
            _mm256_set1_epi8(0x0F),
        )
    }

    /// |w| as unsigned bytes; the activations then take w's sign.
    #[inline(always)]
    pub unsafe fn abs_i8(qs: &[i8; 32]) -> __m256i {
        let w = _mm256_loadu_si256(qs.as_ptr() as *const __m256i);
        _mm256_sign_epi8(w, w)
    }

    #[inline(always)]
    pub unsafe fn sign_like(a: __m256i, qs: &[i8; 32]) -> __m256i {
        _mm256_sign_epi8(a, _mm256_loadu_si256(qs.as_ptr() as *const __m256i))
    }
}

dot_rows_kernel!(
    q4_1_avx2,
    BlockQ4_1,
    "avx2,fma",
    |x: &BlockQ4_1| (simd::nibbles(&x.qs), x.m),
    |a, _| a,
    simd::maddubs
);
dot_rows_kernel!(
    q4_1_vnni,
    BlockQ4_1,
    "avx2,fma,avxvnni",
    |x: &BlockQ4_1| (simd::nibbles(&x.qs), x.m),
    |a, _| a,
    simd::vnni
);
dot_rows_kernel!(
    q4_1_vnni_evex,
    BlockQ4_1,
    "avx2,fma,avx512vnni,avx512vl",
    |x: &BlockQ4_1| (simd::nibbles(&x.qs), x.m),
    |a, _| a,
    simd::vnni_evex
);
dot_rows_kernel!(
    q8_0_avx2,
    BlockQ8_0,
    "avx2,fma",
    |x: &BlockQ8_0| (simd::abs_i8(&x.qs), 0.0),
    |a, x: &BlockQ8_0| simd::sign_like(a, &x.qs),
    simd::maddubs
);
dot_rows_kernel!(
    q8_0_vnni,
    BlockQ8_0,
    "avx2,fma,avxvnni",
    |x: &BlockQ8_0| (simd::abs_i8(&x.qs), 0.0),
    |a, x: &BlockQ8_0| simd::sign_like(a, &x.qs),
    simd::vnni
);
dot_rows_kernel!(
    q8_0_vnni_evex,
    BlockQ8_0,
    "avx2,fma,avx512vnni,avx512vl",
    |x: &BlockQ8_0| (simd::abs_i8(&x.qs), 0.0),
    |a, x: &BlockQ8_0| simd::sign_like(a, &x.qs),
    simd::vnni_evex
);
