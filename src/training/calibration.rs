//! Prior calibration, the trainer's last stage: one scale and one bias per
//! value on the steering logits, `prior = softmax(scale · z + bias)`, fitted
//! on the training prompts by minimizing the mean KL(target ‖ prior) — the
//! same objective as stage 2's KL term, over two or three numbers instead of
//! the weights. KL + KTO moves the prior toward the targets but, with a few
//! hundred steps, leaves it compressed toward the middle and shifted; this
//! fixes both without touching the weights (temperature and bias scaling).

/// Mean KL(target ‖ softmax(scale·z + bias)) and its gradient
/// (∂/∂scale, ∂/∂bias).
fn loss_and_gradient(
    logits: &[Vec<f32>],
    targets: &[Vec<f64>],
    scale: f64,
    bias: &[f64],
) -> (f64, f64, Vec<f64>) {
    let n = logits.len().max(1) as f64;
    let (mut loss, mut d_scale) = (0.0, 0.0);
    let mut d_bias = vec![0.0; bias.len()];
    for (z, t) in logits.iter().zip(targets) {
        let u: Vec<f64> = z
            .iter()
            .zip(bias)
            .map(|(&z, b)| scale * z as f64 + b)
            .collect();
        let max = u.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = u.iter().map(|x| (x - max).exp()).sum::<f64>().ln() + max;
        for k in 0..u.len() {
            let log_p = u[k] - log_sum;
            if t[k] > 0.0 {
                loss += t[k] * (t[k].ln() - log_p);
            }
            // d KL / d u_k = p_k − t_k
            let g = log_p.exp() - t[k];
            d_bias[k] += g / n;
            d_scale += g * z[k] as f64 / n;
        }
    }
    (loss / n, d_scale, d_bias)
}

/// Fits (scale, bias) by gradient descent with backtracking; the objective
/// is convex in them. Biases are returned centred (the softmax ignores a
/// common shift). Starts from, and never ends worse than, the identity.
pub fn fit(logits: &[Vec<f32>], targets: &[Vec<f64>]) -> (f64, Vec<f64>) {
    let k = targets.first().map_or(0, Vec::len);
    let (mut scale, mut bias) = (1.0, vec![0.0; k]);
    if logits.is_empty() || k == 0 {
        return (scale, bias);
    }
    let (mut loss, mut g_scale, mut g_bias) = loss_and_gradient(logits, targets, scale, &bias);
    let mut step = 1.0;
    for _ in 0..2_000 {
        let norm2 = g_scale * g_scale + g_bias.iter().map(|g| g * g).sum::<f64>();
        if norm2 < 1e-18 {
            break;
        }
        // Backtrack until the loss falls enough (Armijo); scale stays positive.
        loop {
            let s = (scale - step * g_scale).max(1e-3);
            let b: Vec<f64> = bias
                .iter()
                .zip(&g_bias)
                .map(|(b, g)| b - step * g)
                .collect();
            let (l, gs, gb) = loss_and_gradient(logits, targets, s, &b);
            if l <= loss - 1e-4 * step * norm2 {
                (scale, bias, loss, g_scale, g_bias) = (s, b, l, gs, gb);
                step *= 2.0;
                break;
            }
            step /= 2.0;
            if step < 1e-12 {
                return centred(scale, bias);
            }
        }
    }
    centred(scale, bias)
}

fn centred(scale: f64, bias: Vec<f64>) -> (f64, Vec<f64>) {
    let mean = bias.iter().sum::<f64>() / bias.len().max(1) as f64;
    (scale, bias.into_iter().map(|b| b - mean).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(u: &[f64]) -> Vec<f64> {
        let sum: f64 = u.iter().map(|x| x.exp()).sum();
        u.iter().map(|x| x.exp() / sum).collect()
    }

    /// Targets made by a known map are fitted back to it.
    #[test]
    fn recovers_a_known_scale_and_bias() {
        let logits: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                let x = i as f32 / 10.0 - 2.0;
                vec![x, -0.5 * x, 0.3 * (i % 7) as f32]
            })
            .collect();
        let (true_scale, true_bias) = (1.7, [0.4, -0.1, -0.3]);
        let targets: Vec<Vec<f64>> = logits
            .iter()
            .map(|z| {
                let u: Vec<f64> = z
                    .iter()
                    .zip(true_bias)
                    .map(|(&z, b)| true_scale * z as f64 + b)
                    .collect();
                softmax(&u)
            })
            .collect();
        let (scale, bias) = fit(&logits, &targets);
        assert!((scale - true_scale).abs() < 1e-3, "scale {scale}");
        for (b, t) in bias.iter().zip(true_bias) {
            assert!((b - t).abs() < 1e-3, "bias {bias:?}");
        }
    }

    /// A prior that already matches is left as it is.
    #[test]
    fn calibrated_logits_stay_put() {
        let logits: Vec<Vec<f32>> = (0..10).map(|i| vec![i as f32 * 0.3, 0.0]).collect();
        let targets: Vec<Vec<f64>> = logits
            .iter()
            .map(|z| softmax(&[z[0] as f64, z[1] as f64]))
            .collect();
        let (scale, bias) = fit(&logits, &targets);
        assert!((scale - 1.0).abs() < 1e-4 && bias.iter().all(|b| b.abs() < 1e-4));
    }

    /// The gradient is the loss's own slope (central differences).
    #[test]
    fn gradient_matches_finite_differences() {
        let logits = vec![vec![0.3f32, -1.2], vec![2.0, 0.5], vec![-0.7, 0.1]];
        let targets = vec![vec![0.2, 0.8], vec![0.9, 0.1], vec![0.5, 0.5]];
        let (scale, bias) = (1.3, vec![0.2, -0.1]);
        let (_, g_scale, g_bias) = loss_and_gradient(&logits, &targets, scale, &bias);
        let h = 1e-6;
        let l = |s: f64, b: &[f64]| loss_and_gradient(&logits, &targets, s, b).0;
        let num_scale = (l(scale + h, &bias) - l(scale - h, &bias)) / (2.0 * h);
        assert!((g_scale - num_scale).abs() < 1e-6);
        for k in 0..2 {
            let (mut up, mut down) = (bias.clone(), bias.clone());
            up[k] += h;
            down[k] -= h;
            let num = (l(scale, &up) - l(scale, &down)) / (2.0 * h);
            assert!((g_bias[k] - num).abs() < 1e-6);
        }
    }
}
