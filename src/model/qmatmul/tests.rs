//! Kernel tests: every kernel and layout against candle and the scalar kernel.

use super::*;

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Dequantization equals candle's; the product equals an f32 matmul on
/// the dequantized weights up to 8-bit activation rounding; and every
/// kernel this CPU has, in both layouts, with 1 to 13 activation rows (so
/// the four- and eight-row tiles, the remainders and the 512-bit pairs all
/// run),
/// gives the scalar kernel's result.
#[test]
fn kernels_agree_with_candle_and_each_other() {
    let dev = Device::Cpu;
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for (n, k) in [(40, 64), (272, 96)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
            let dense_w = m.dequantize(&dev).unwrap();
            assert_eq!(
                to_vec(&q.dequantize(&dev).unwrap()),
                to_vec(&dense_w),
                "{dtype:?}"
            );
            let plain = QMatrix {
                blocks: m.plain(),
                rows: n,
                cols: k,
            };
            let interleaved = plain.clone().interleaved();
            for rows in [1, 3, 5, 9, 13] {
                let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
                let dense = to_vec(&x.matmul(&dense_w.t().unwrap()).unwrap());
                let scalar = to_vec(&forward_many_with(Kernel::Scalar, &[&plain], &x).unwrap()[0]);
                let scale = dense.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, b) in scalar.iter().zip(&dense) {
                    assert!((a - b).abs() < 0.03 * scale, "{dtype:?}: {a} vs {b}");
                }
                for kernel in Kernel::available() {
                    for layout in [&plain, &interleaved] {
                        if !kernel.interleaves() && !std::ptr::eq(layout, &plain) {
                            continue;
                        }
                        let got = to_vec(&forward_many_with(kernel, &[layout], &x).unwrap()[0]);
                        for (a, b) in got.iter().zip(&scalar) {
                            assert!(
                                (a - b).abs() < 1e-4 * scale,
                                "{} {dtype:?} ({n},{k}) x{rows}: {a} vs {b}",
                                kernel.name()
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A CPU with either encoding of the 256-bit integer dot gets a VNNI
/// kernel: AMD's Zen 4 has AVX-512 VNNI but not AVX-VNNI, and without
/// one it ran prefills 2.7× slower.
#[cfg(target_arch = "x86_64")]
#[test]
fn cpus_with_an_integer_dot_get_a_vnni_kernel() {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni");
    let best = *Kernel::available().last().unwrap();
    if avx2 && avx512 {
        assert_eq!(best, Kernel::Avx512Vnni);
    } else if avx2 && is_x86_feature_detected!("avxvnni") {
        assert_eq!(best, Kernel::AvxVnni);
    } else {
        assert!(!best.interleaves(), "{}", best.name());
    }
}

/// The vectorized rounding gives exactly what `f32::round` gives (half
/// away from zero), ties and near-ties included.
#[test]
fn activation_quantization_rounds_like_round() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut blocks: Vec<Vec<f32>> = (0..2000)
        .map(|_| (0..BLOCK).map(|_| rng.random_range(-3.0f32..3.0)).collect())
        .collect();
    // Values landing on and next to .5 once scaled (amax 127 makes id = 1).
    let mut ties: Vec<f32> = vec![127.0];
    for k in -126..126 {
        let h = k as f32 + 0.5;
        ties.extend([
            h,
            f32::from_bits(h.to_bits() - 1),
            f32::from_bits(h.to_bits() + 1),
        ]);
    }
    blocks.extend(ties.chunks(BLOCK - 1).map(|c| {
        let mut b = vec![127.0];
        b.extend(c);
        b.resize(BLOCK, 0.0);
        b
    }));
    for x in &blocks {
        let block = quantize_block(x);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let expected: Vec<i8> = x.iter().map(|v| (v * id).round() as i8).collect();
        assert_eq!(block.qs.to_vec(), expected, "{x:?}");
    }
}
