//! The training objective (DESIGN.md §4): SFT on steering token + desirable
//! response; then KL on the steering position plus KTO against the frozen
//! stage-1 adapter.

use anyhow::Result;
use candle_core::{Tensor, D};

/// Settings of the objective, with the paper's defaults.
#[derive(Debug, Clone)]
pub struct LossConfig {
    pub beta: f64,
    pub lambda_desirable: f64,
    pub lambda_undesirable: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            lambda_desirable: 1.0,
            lambda_undesirable: 1.0,
        }
    }
}

/// A scalar tensor's value, whatever its float type.
fn value(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// log p(target) at every position: logits (b, t, v), targets (b, t) → (b, t).
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?)
}

/// Token-averaged negative log-likelihood over positions where mask = 1.
pub fn sft(logprobs: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let total = (logprobs * mask)?.sum_all()?;
    Ok((total.neg()? / value(&mask.sum_all()?)?.max(1.0))?)
}

/// KL(target ‖ p) per row, where `steer_logprobs` (b, K) are log-probabilities
/// of the K steering tokens under the full-vocabulary softmax (not
/// renormalized, so the term also moves mass onto them). Cells with target 0
/// contribute 0. Mean over rows where `rows` = 1.
pub fn kl(steer_logprobs: &Tensor, target: &Tensor, rows: &Tensor) -> Result<Tensor> {
    let t = target.to_dtype(steer_logprobs.dtype())?;
    let positive = t.gt(0.0)?.to_dtype(t.dtype())?;
    // t·ln t with 0·ln 0 = 0: ln(t + (1 − positive)) is 0 where t = 0.
    let t_ln_t = (&t * (&t + (1.0 - &positive)?)?.log()?)?;
    let per_row = (t_ln_t - (&t * steer_logprobs)?)?.sum(1)?;
    let n = value(&rows.sum_all()?)?.max(1.0);
    Ok(((per_row * rows)?.sum_all()? / n)?)
}

/// KTO: r = Σ log π − Σ log π_ref per row (response tokens incl. the steering
/// token); z0 = the detached batch mean of the mismatched pairs' log-ratio,
/// clamped at 0. Desirable rows: λ_D(1 − σ(β(r − z0))); undesirable rows:
/// λ_U(1 − σ(β(z0 − r))). Returns the mean over rows.
pub fn kto(
    log_ratio: &Tensor,
    desirable: &Tensor,
    mismatched_log_ratio: &Tensor,
    cfg: &LossConfig,
) -> Result<Tensor> {
    let z0 = value(&mismatched_log_ratio.detach().mean_all()?)?.max(0.0);
    let sigmoid = |x: Tensor| -> Result<Tensor> { Ok(candle_nn::ops::sigmoid(&x)?) };
    let good = ((1.0 - sigmoid(((log_ratio - z0)? * cfg.beta)?)?)? * cfg.lambda_desirable)?;
    let bad = ((1.0 - sigmoid(((log_ratio.neg()? + z0)? * cfg.beta)?)?)? * cfg.lambda_undesirable)?;
    let undesirable = (1.0 - desirable)?;
    let per_row = ((good * desirable)? + (bad * undesirable)?)?;
    Ok(per_row.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn token_logprobs_and_sft_by_hand() {
        // One row, two positions, vocabulary 3.
        let logits = Tensor::new(&[[[0f64, 0.0, 0.0], [2.0, 0.0, 0.0]]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[1u32, 0]], &Device::Cpu).unwrap();
        let lp = token_logprobs(&logits, &targets)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let second = 2.0 - (2f64.exp() + 2.0).ln();
        assert!((lp[0][0] - (1.0f64 / 3.0).ln()).abs() < 1e-12);
        assert!((lp[0][1] - second).abs() < 1e-12);
        let mask = Tensor::new(&[[1f64, 1.0]], &Device::Cpu).unwrap();
        let want = -((1.0f64 / 3.0).ln() + second) / 2.0;
        assert!(
            (scalar(&sft(&Tensor::new(lp, &Device::Cpu).unwrap(), &mask).unwrap()) - want).abs()
                < 1e-12
        );
    }

    #[test]
    fn kl_by_hand_with_a_zero_target_and_a_masked_row() {
        // Row 0: target (0.5, 0.5), p = (0.4, 0.4) (the rest of the mass elsewhere).
        // Row 1: target (1, 0), p = (0.5, 0.1). Row 2 is masked out.
        let lp = Tensor::new(
            &[
                [0.4f64.ln(), 0.4f64.ln()],
                [0.5f64.ln(), 0.1f64.ln()],
                [0.0, 0.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let t = Tensor::new(&[[0.5f64, 0.5], [1.0, 0.0], [0.5, 0.5]], &Device::Cpu).unwrap();
        let rows = Tensor::new(&[1f64, 1.0, 0.0], &Device::Cpu).unwrap();
        let r0 = 0.5 * (0.5f64 / 0.4).ln() * 2.0;
        let r1 = (1.0f64 / 0.5).ln();
        assert!((scalar(&kl(&lp, &t, &rows).unwrap()) - (r0 + r1) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn kto_by_hand() {
        let cfg = LossConfig::default();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let r = Tensor::new(&[2.0f64, -1.0, 3.0], &Device::Cpu).unwrap();
        let desirable = Tensor::new(&[1.0f64, 1.0, 0.0], &Device::Cpu).unwrap();
        // Mismatched mean 0.5 → z0 = 0.5.
        let mismatched = Tensor::new(&[1.0f64, 0.0], &Device::Cpu).unwrap();
        let want =
            ((1.0 - sig(0.1 * 1.5)) + (1.0 - sig(0.1 * -1.5)) + (1.0 - sig(0.1 * (0.5 - 3.0))))
                / 3.0;
        assert!((scalar(&kto(&r, &desirable, &mismatched, &cfg).unwrap()) - want).abs() < 1e-12);
        // A negative mismatched mean is clamped to 0.
        let negative = Tensor::new(&[-4.0f64], &Device::Cpu).unwrap();
        let want = ((1.0 - sig(0.2)) + (1.0 - sig(-0.1)) + (1.0 - sig(-0.3))) / 3.0;
        assert!((scalar(&kto(&r, &desirable, &negative, &cfg).unwrap()) - want).abs() < 1e-12);
    }
}
