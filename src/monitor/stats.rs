//! The statistics of the report: Wilson intervals, divergences, and the
//! chi-square goodness-of-fit test.

/// The ε of the paper's KL, so empty observed cells stay finite.
pub const KL_EPSILON: f64 = 1e-10;

/// Wilson score interval for k successes in n trials (95% with z = 1.96).
pub fn wilson(k: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = k as f64 / n;
    let z2 = z * z;
    let center = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// Mean absolute error over values.
pub fn mae(target: &[f64], observed: &[f64]) -> f64 {
    target
        .iter()
        .zip(observed)
        .map(|(t, o)| (t - o).abs())
        .sum::<f64>()
        / target.len().max(1) as f64
}

/// KL(target ‖ observed) = Σ t·ln((t+ε)/(o+ε)), natural log.
pub fn kl(target: &[f64], observed: &[f64]) -> f64 {
    target
        .iter()
        .zip(observed)
        .filter(|(t, _)| **t > 0.0)
        .map(|(t, o)| t * ((t + KL_EPSILON) / (o + KL_EPSILON)).ln())
        .sum()
}

/// Total variation distance: half the L1 distance.
pub fn total_variation(p: &[f64], q: &[f64]) -> f64 {
    0.5 * p.iter().zip(q).map(|(a, b)| (a - b).abs()).sum::<f64>()
}

/// Jensen–Shannon distance (the square root of the divergence, natural log),
/// as scipy's `jensenshannon` computes it.
pub fn js_distance(p: &[f64], q: &[f64]) -> f64 {
    let m: Vec<f64> = p.iter().zip(q).map(|(a, b)| 0.5 * (a + b)).collect();
    let part = |x: &[f64]| -> f64 {
        x.iter()
            .zip(&m)
            .filter(|(a, _)| **a > 0.0)
            .map(|(a, mm)| a * (a / mm).ln())
            .sum()
    };
    (0.5 * part(p) + 0.5 * part(q)).max(0.0).sqrt()
}

/// Pearson's chi-square goodness of fit of counts against target
/// proportions: (statistic, degrees of freedom, p-value). Values with
/// target 0 are left out; if any of them was observed the fit is impossible
/// (statistic ∞, p = 0).
pub fn chi_square(counts: &[u64], target: &[f64]) -> (f64, usize, f64) {
    let n: u64 = counts.iter().sum();
    let cells: Vec<(u64, f64)> = counts.iter().copied().zip(target.iter().copied()).collect();
    let df = cells.iter().filter(|c| c.1 > 0.0).count().saturating_sub(1);
    if n == 0 || df == 0 {
        return (0.0, df, 1.0);
    }
    if cells.iter().any(|c| c.1 <= 0.0 && c.0 > 0) {
        return (f64::INFINITY, df, 0.0);
    }
    let stat: f64 = cells
        .iter()
        .filter(|c| c.1 > 0.0)
        .map(|&(o, t)| {
            let e = n as f64 * t;
            (o as f64 - e).powi(2) / e
        })
        .sum();
    (stat, df, chi_square_survival(stat, df))
}

/// P(X ≥ x) for X ~ χ²(df).
pub fn chi_square_survival(x: f64, df: usize) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    gamma_q(df as f64 / 2.0, x / 2.0)
}

/// ln Γ(x), Lanczos approximation (g = 7, n = 9), x > 0.
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized upper incomplete gamma function Q(a, x).
fn gamma_q(a: f64, x: f64) -> f64 {
    if x < a + 1.0 {
        1.0 - gamma_p_series(a, x)
    } else {
        gamma_q_fraction(a, x)
    }
}

fn gamma_p_series(a: f64, x: f64) -> f64 {
    let mut sum = 1.0 / a;
    let mut term = sum;
    let mut ap = a;
    for _ in 0..1000 {
        ap += 1.0;
        term *= x / ap;
        sum += term;
        if term.abs() < sum.abs() * 1e-15 {
            break;
        }
    }
    sum * (-x + a * x.ln() - ln_gamma(a)).exp()
}

fn gamma_q_fraction(a: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / TINY;
    let mut d = 1.0 / b;
    let mut h = d;
    for i in 1..1000 {
        let an = -(i as f64) * (i as f64 - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < TINY {
            d = TINY;
        }
        c = b + an / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-15 {
            break;
        }
    }
    (-x + a * x.ln() - ln_gamma(a)).exp() * h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() < tol, "{a} vs {b}");
    }

    #[test]
    fn wilson_matches_hand_computed_bounds() {
        // k = 8, n = 10: p = 0.8, z = 1.96 → (0.4902, 0.9433).
        let (lo, hi) = wilson(8, 10, 1.96);
        close(lo, 0.490_16, 1e-4);
        close(hi, 0.943_32, 1e-4);
        // k = 0, n = 5 → (0, 0.4345).
        let (lo, hi) = wilson(0, 5, 1.96);
        close(lo, 0.0, 1e-12);
        close(hi, 0.434_45, 1e-4);
        assert_eq!(wilson(0, 0, 1.96), (0.0, 1.0));
    }

    #[test]
    fn divergences_match_hand_computed_values() {
        let t = [0.5, 0.5];
        let o = [0.8, 0.2];
        close(mae(&t, &o), 0.3, 1e-12);
        // 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) = 0.223144
        close(kl(&t, &o), 0.223_143_55, 1e-7);
        close(total_variation(&t, &o), 0.3, 1e-12);
        // M = (0.65, 0.35); JSD = 0.5·0.047155 + 0.5·0.054189 = 0.0506718; distance = its root.
        close(js_distance(&t, &o), 0.050_671_8_f64.sqrt(), 1e-6);
        // An empty observed cell: ε keeps KL finite (0.5·ln(0.5/1e-10) + 0.5·ln(0.5)).
        let k = kl(&t, &[1.0, 0.0]);
        close(k, 0.5 * (0.5f64 / 1e-10).ln() + 0.5 * 0.5f64.ln(), 1e-6);
        assert_eq!(kl(&t, &t), 0.0);
        assert_eq!(js_distance(&t, &t), 0.0);
    }

    #[test]
    fn chi_square_matches_tables() {
        // 60/40 against 50/50 with n = 100: χ² = 4, df = 1, p = 0.0455.
        let (stat, df, p) = chi_square(&[60, 40], &[0.5, 0.5]);
        close(stat, 4.0, 1e-12);
        assert_eq!(df, 1);
        close(p, 0.045_500_26, 1e-7);
        // df = 2: P(χ² ≥ 5.991) = 0.05; df = 4: P(χ² ≥ 13.277) = 0.01.
        close(chi_square_survival(5.991_464_5, 2), 0.05, 1e-7);
        close(chi_square_survival(13.276_704, 4), 0.01, 1e-6);
        // A perfect fit, no data, and an observed value with target 0.
        close(chi_square(&[50, 50], &[0.5, 0.5]).2, 1.0, 1e-12);
        assert_eq!(chi_square(&[0, 0], &[0.5, 0.5]), (0.0, 1, 1.0));
        assert_eq!(chi_square(&[3, 1, 1], &[0.5, 0.5, 0.0]).2, 0.0);
        assert_eq!(chi_square(&[3, 1, 0], &[0.5, 0.5, 0.0]).1, 1);
    }
}
