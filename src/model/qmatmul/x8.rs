//! Interleaved kernels for CPUs with VNNI: eight weight rows are stored
//! side by side, four bytes of each per 32-byte register, so one `vpdpbusd`
//! against four broadcast activation bytes advances eight outputs at once.
//! Per 32 weights this needs a third of the instructions of the row-by-row
//! kernel, which is what lets a batch of 16 cost far less than 16 rows.

use super::{BlockQ4_1, BlockQ8, BlockQ8_0};

/// Eight Q4_1 rows, one block each. Byte 4r+i of `qs[g]` holds element 4g+i
/// of row r in its low nibble and element 16+4g+i in its high nibble.
#[derive(Debug, Clone)]
pub(super) struct Q41x8 {
    d: [f32; 8],
    m: [f32; 8],
    qs: [[u8; 32]; 4],
}

/// Eight Q8_0 rows, one block each. Byte 4r+i of `qs[g]` is element 4g+i of
/// row r. `bias` = 128·Σq per row: activations enter as unsigned (q + 128),
/// and this takes the excess back out.
#[derive(Debug, Clone)]
pub(super) struct Q80x8 {
    d: [f32; 8],
    bias: [i32; 8],
    qs: [[i8; 32]; 8],
}

/// Interleaves `blocks` (rows × kb, row-major) into groups of eight rows:
/// the result is [group][block].
pub(super) fn pack_q4_1(blocks: &[BlockQ4_1], rows: usize, kb: usize) -> Vec<Q41x8> {
    let mut out = Vec::with_capacity(rows / 8 * kb);
    for group in 0..rows / 8 {
        for b in 0..kb {
            let src = |r: usize| &blocks[(group * 8 + r) * kb + b];
            let mut packed = Q41x8 {
                d: [0.0; 8],
                m: [0.0; 8],
                qs: [[0; 32]; 4],
            };
            for r in 0..8 {
                let blk = src(r);
                packed.d[r] = blk.d;
                packed.m[r] = blk.m;
                for g in 0..4 {
                    for i in 0..4 {
                        // The ggml block already pairs element j with j+16.
                        packed.qs[g][4 * r + i] = blk.qs[4 * g + i];
                    }
                }
            }
            out.push(packed);
        }
    }
    out
}

pub(super) fn unpack_q4_1(packed: &[Q41x8], rows: usize, kb: usize) -> Vec<BlockQ4_1> {
    let mut out = vec![
        BlockQ4_1 {
            d: 0.0,
            m: 0.0,
            qs: [0; 16]
        };
        rows * kb
    ];
    for (idx, p) in packed.iter().enumerate() {
        let (group, b) = (idx / kb, idx % kb);
        for r in 0..8 {
            let blk = &mut out[(group * 8 + r) * kb + b];
            blk.d = p.d[r];
            blk.m = p.m[r];
            for g in 0..4 {
                for i in 0..4 {
                    blk.qs[4 * g + i] = p.qs[g][4 * r + i];
                }
            }
        }
    }
    out
}

pub(super) fn pack_q8_0(blocks: &[BlockQ8_0], rows: usize, kb: usize) -> Vec<Q80x8> {
    let mut out = Vec::with_capacity(rows / 8 * kb);
    for group in 0..rows / 8 {
        for b in 0..kb {
            let mut packed = Q80x8 {
                d: [0.0; 8],
                bias: [0; 8],
                qs: [[0; 32]; 8],
            };
            for r in 0..8 {
                let blk = &blocks[(group * 8 + r) * kb + b];
                packed.d[r] = blk.d;
                packed.bias[r] = 128 * blk.qs.iter().map(|&q| q as i32).sum::<i32>();
                for g in 0..8 {
                    packed.qs[g][4 * r..4 * r + 4].copy_from_slice(&blk.qs[4 * g..4 * g + 4]);
                }
            }
            out.push(packed);
        }
    }
    out
}

pub(super) fn unpack_q8_0(packed: &[Q80x8], rows: usize, kb: usize) -> Vec<BlockQ8_0> {
    let mut out = vec![
        BlockQ8_0 {
            d: 0.0,
            qs: [0; 32]
        };
        rows * kb
    ];
    for (idx, p) in packed.iter().enumerate() {
        let (group, b) = (idx / kb, idx % kb);
        for r in 0..8 {
            let blk = &mut out[(group * 8 + r) * kb + b];
            blk.d = p.d[r];
            for g in 0..8 {
                blk.qs[4 * g..4 * g + 4].copy_from_slice(&p.qs[g][4 * r..4 * r + 4]);
            }
        }
    }
    out
}

/// Four activation bytes of group `g`, as one i32 to broadcast.
#[inline(always)]
fn group_i32(qs: &[u8; 32], g: usize) -> i32 {
    i32::from_le_bytes([qs[4 * g], qs[4 * g + 1], qs[4 * g + 2], qs[4 * g + 3]])
}

#[inline(always)]
fn group_i32_signed(qs: &[i8; 32], g: usize) -> i32 {
    i32::from_le_bytes([
        qs[4 * g] as u8,
        qs[4 * g + 1] as u8,
        qs[4 * g + 2] as u8,
        qs[4 * g + 3] as u8,
    ])
}

/// The eight-row kernels for one encoding of the 256-bit `vpdpbusd`:
/// AVX-VNNI's, or AVX-512 VNNI's on CPUs that have only that one (AMD Zen
/// 4, Intel's Ice Lake and Cascade Lake servers). Same instruction, same
/// results.
macro_rules! x8_kernels {
    ($q4_1:ident, $q8_0:ident, $features:literal, $dot:path) => {
        /// Outputs of eight Q4_1 rows (one group, `kb` blocks) for R activation rows.
        #[target_feature(enable = $features)]
        unsafe fn $q4_1<const R: usize>(w: &[Q41x8], acts: [&[BlockQ8]; R]) -> [[f32; 8]; R] {
            use std::arch::x86_64::*;
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut mins = [_mm256_setzero_ps(); R];
            for (b, x) in w.iter().enumerate() {
                prefetch_ahead(x, w.len());
                let d = _mm256_loadu_ps(x.d.as_ptr());
                let m = _mm256_loadu_ps(x.m.as_ptr());
                let mut lo = [_mm256_setzero_si256(); 4];
                let mut hi = [_mm256_setzero_si256(); 4];
                for g in 0..4 {
                    let packed = _mm256_loadu_si256(x.qs[g].as_ptr() as *const __m256i);
                    lo[g] = _mm256_and_si256(packed, low);
                    hi[g] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                }
                for r in 0..R {
                    let y = acts[r].get_unchecked(b);
                    let mut sum = _mm256_setzero_si256();
                    for g in 0..4 {
                        sum = $dot(sum, lo[g], _mm256_set1_epi32(group_i32_signed(&y.qs, g)));
                        sum = $dot(
                            sum,
                            hi[g],
                            _mm256_set1_epi32(group_i32_signed(&y.qs, g + 4)),
                        );
                    }
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(y.d));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[r]);
                    mins[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(y.s), mins[r]);
                }
            }
            let mut out = [[0f32; 8]; R];
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr(), _mm256_add_ps(acc[r], mins[r]));
            }
            out
        }

        /// Outputs of eight Q8_0 rows (one group, `kb` blocks) for R activation rows.
        #[target_feature(enable = $features)]
        unsafe fn $q8_0<const R: usize>(w: &[Q80x8], acts: [&[BlockQ8]; R]) -> [[f32; 8]; R] {
            use std::arch::x86_64::*;
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, x) in w.iter().enumerate() {
                prefetch_ahead(x, w.len());
                let d = _mm256_loadu_ps(x.d.as_ptr());
                let bias = _mm256_loadu_si256(x.bias.as_ptr() as *const __m256i);
                let mut qs = [_mm256_setzero_si256(); 8];
                for g in 0..8 {
                    qs[g] = _mm256_loadu_si256(x.qs[g].as_ptr() as *const __m256i);
                }
                for r in 0..R {
                    let y = acts[r].get_unchecked(b);
                    let mut sum = _mm256_setzero_si256();
                    for g in 0..8 {
                        sum = $dot(sum, _mm256_set1_epi32(group_i32(&y.qu, g)), qs[g]);
                    }
                    let sum = _mm256_sub_epi32(sum, bias);
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(y.d));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[r]);
                }
            }
            let mut out = [[0f32; 8]; R];
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
            out
        }
    };
}

x8_kernels!(
    q4_1_x8_vex,
    q8_0_x8_vex,
    "avx2,fma,avxvnni",
    std::arch::x86_64::_mm256_dpbusd_avx_epi32
);
x8_kernels!(
    q4_1_x8_evex,
    q8_0_x8_evex,
    "avx2,fma,avx512vnni,avx512vl",
    std::arch::x86_64::_mm256_dpbusd_epi32
);

/// Outputs of eight Q4_1 rows for R activation rows, in the AVX-512
/// encoding when `evex` (the CPU has AVX-512 VNNI), else AVX-VNNI's.
#[inline(always)]
pub(super) unsafe fn q4_1_x8<const R: usize>(
    evex: bool,
    w: &[Q41x8],
    acts: [&[BlockQ8]; R],
) -> [[f32; 8]; R] {
    if evex {
        q4_1_x8_evex(w, acts)
    } else {
        q4_1_x8_vex(w, acts)
    }
}

/// As [`q4_1_x8`], for eight Q8_0 rows.
#[inline(always)]
pub(super) unsafe fn q8_0_x8<const R: usize>(
    evex: bool,
    w: &[Q80x8],
    acts: [&[BlockQ8]; R],
) -> [[f32; 8]; R] {
    if evex {
        q8_0_x8_evex(w, acts)
    } else {
        q8_0_x8_vex(w, acts)
    }
}

/// Asks for the block `ahead` blocks after `block` to be brought into cache:
/// kernels pass the same block of the next group (or pair of groups), which
/// is stored that far on. Weights stream from memory at every step; without
/// this a kernel waits for each group's first loads instead of computing
/// meanwhile (measured: batch-16 matmuls on weights beyond the last-level
/// cache ran at half the speed of cached ones). The hint is non-temporal:
/// a step uses each weight block once, so it should not push out what is
/// reused (activations, key/value caches). Against the plain hint, in four
/// alternating runs on SmolLM2, batch-1 decode ran 5-7% faster and batch
/// 16 from 1% slower to 6% faster.
#[inline(always)]
fn prefetch_ahead<T>(block: &T, ahead: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_NTA};
    let next = (block as *const T).wrapping_add(ahead) as *const i8;
    for line in (0..std::mem::size_of::<T>()).step_by(64) {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_NTA>(next.wrapping_add(line)) };
    }
}

/// Two 256-bit halves as one 512-bit register.
#[inline(always)]
unsafe fn join_si(a: &[u8; 32], b: &[u8; 32]) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let lo = _mm256_loadu_si256(a.as_ptr() as *const __m256i);
    let hi = _mm256_loadu_si256(b.as_ptr() as *const __m256i);
    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
}

#[inline(always)]
unsafe fn join_ps(a: &[f32; 8], b: &[f32; 8]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let lo = _mm256_castps_pd(_mm256_loadu_ps(a.as_ptr()));
    let hi = _mm256_castps_pd(_mm256_loadu_ps(b.as_ptr()));
    _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(lo), hi, 1))
}

#[inline(always)]
fn as_bytes(qs: &[i8; 32]) -> &[u8; 32] {
    // i8 and u8 have the same size and alignment.
    unsafe { &*(qs as *const [i8; 32] as *const [u8; 32]) }
}

/// Sixteen Q4_1 rows (two adjacent groups) for R activation rows, AVX-512:
/// one `vpdpbusd` advances sixteen outputs.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
pub(super) unsafe fn q4_1_x16<const R: usize>(
    wa: &[Q41x8],
    wb: &[Q41x8],
    acts: [&[BlockQ8]; R],
) -> [[f32; 16]; R] {
    use std::arch::x86_64::*;
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut mins = [_mm512_setzero_ps(); R];
    for (b, (xa, xb)) in wa.iter().zip(wb).enumerate() {
        prefetch_ahead(xa, 2 * wa.len());
        prefetch_ahead(xb, 2 * wa.len());
        let d = join_ps(&xa.d, &xb.d);
        let m = join_ps(&xa.m, &xb.m);
        let mut lo = [_mm512_setzero_si512(); 4];
        let mut hi = [_mm512_setzero_si512(); 4];
        for g in 0..4 {
            let packed = join_si(&xa.qs[g], &xb.qs[g]);
            lo[g] = _mm512_and_si512(packed, low);
            hi[g] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
        }
        for r in 0..R {
            let y = acts[r].get_unchecked(b);
            let mut sum = _mm512_setzero_si512();
            for g in 0..4 {
                sum =
                    _mm512_dpbusd_epi32(sum, lo[g], _mm512_set1_epi32(group_i32_signed(&y.qs, g)));
                sum = _mm512_dpbusd_epi32(
                    sum,
                    hi[g],
                    _mm512_set1_epi32(group_i32_signed(&y.qs, g + 4)),
                );
            }
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(y.d));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r]);
            mins[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(y.s), mins[r]);
        }
    }
    let mut out = [[0f32; 16]; R];
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(acc[r], mins[r]));
    }
    out
}

/// Sixteen Q8_0 rows (two adjacent groups) for R activation rows, AVX-512.
/// Its eight groups are indexed as in the other kernels, where several
/// arrays share the index.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
pub(super) unsafe fn q8_0_x16<const R: usize>(
    wa: &[Q80x8],
    wb: &[Q80x8],
    acts: [&[BlockQ8]; R],
) -> [[f32; 16]; R] {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, (xa, xb)) in wa.iter().zip(wb).enumerate() {
        prefetch_ahead(xa, 2 * wa.len());
        prefetch_ahead(xb, 2 * wa.len());
        let d = join_ps(&xa.d, &xb.d);
        let bias = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(xa.bias.as_ptr() as *const __m256i)),
            _mm256_loadu_si256(xb.bias.as_ptr() as *const __m256i),
            1,
        );
        let mut qs = [_mm512_setzero_si512(); 8];
        for g in 0..8 {
            qs[g] = join_si(as_bytes(&xa.qs[g]), as_bytes(&xb.qs[g]));
        }
        for r in 0..R {
            let y = acts[r].get_unchecked(b);
            let mut sum = _mm512_setzero_si512();
            for g in 0..8 {
                sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi32(group_i32(&y.qu, g)), qs[g]);
            }
            let sum = _mm512_sub_epi32(sum, bias);
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(y.d));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r]);
        }
    }
    let mut out = [[0f32; 16]; R];
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
    }
    out
}
