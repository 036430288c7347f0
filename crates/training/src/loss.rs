//! The denoising loss shared by `diffuse train` and `diffuse train-lora`: what the model is
//! trained to predict at each timestep, and the optional Min-SNR-γ weighting of each image's
//! error (Hang et al. 2023, diffusers' `--snr_gamma`).

use candle_core::{DType, Tensor};
use diffuse_core::{Error, Result};
use diffuse_schedulers::common::{per_batch_lin2, PredictionType};

/// The training target for `x0` noised with `noise` at `timesteps` on the schedule `acp`
/// (alphas_cumprod): the noise, the clean sample, or diffusers' `get_velocity`
/// `sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x₀`.
pub fn prediction_target(
    prediction: PredictionType,
    x0: &Tensor,
    noise: &Tensor,
    acp: &[f32],
    timesteps: &[u64],
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => noise.clone(),
        PredictionType::Sample => x0.clone(),
        PredictionType::VPrediction => {
            let a = cumprod_at(acp, timesteps)?;
            let ca: Vec<f64> = a.iter().map(|a| a.sqrt()).collect();
            let cb: Vec<f64> = a.iter().map(|a| -(1.0 - a).sqrt()).collect();
            per_batch_lin2(noise, x0, &ca, &cb)?
        }
    })
}

/// Min-SNR-γ loss weights, one per timestep: `min(SNR, γ)` divided by what the prediction's
/// error already scales with (SNR for ε, SNR + 1 for v, 1 for x₀), so each is the weight of an
/// x₀ error capped at γ. It lowers the weight of the nearly clean timesteps, whose many small
/// details otherwise pull against the noisy ones that shape the image.
pub fn min_snr_weights(
    prediction: PredictionType,
    acp: &[f32],
    timesteps: &[u64],
    gamma: f64,
) -> Result<Vec<f64>> {
    check_snr_gamma(Some(gamma))?;
    Ok(cumprod_at(acp, timesteps)?
        .into_iter()
        .map(|a| {
            let snr = a / (1.0 - a);
            let capped = snr.min(gamma);
            match prediction {
                PredictionType::Epsilon => capped / snr,
                PredictionType::VPrediction => capped / (snr + 1.0),
                PredictionType::Sample => capped,
            }
        })
        .collect())
}

/// Refuses a Min-SNR γ that is not a positive number.
pub fn check_snr_gamma(gamma: Option<f64>) -> Result<()> {
    match gamma {
        Some(g) if !(g.is_finite() && g > 0.0) => Err(Error::invalid(format!(
            "snr_gamma must be a positive number, not {g}"
        ))),
        _ => Ok(()),
    }
}

/// Per-image mean squared error `(B,)` in f32, each image's scaled by its weight when given.
pub fn per_image_mse(pred: &Tensor, target: &Tensor, weights: Option<&[f64]>) -> Result<Tensor> {
    let err = (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?.sqr()?;
    let per_image = err.flatten_from(1)?.mean(1)?;
    match weights {
        None => Ok(per_image),
        Some(w) => {
            let w: Vec<f32> = w.iter().map(|&w| w as f32).collect();
            let w = Tensor::from_vec(w, per_image.dims1()?, per_image.device())?;
            Ok((per_image * w)?)
        }
    }
}

fn cumprod_at(acp: &[f32], timesteps: &[u64]) -> Result<Vec<f64>> {
    timesteps
        .iter()
        .map(|&t| {
            acp.get(t as usize).map(|&a| a as f64).ok_or_else(|| {
                Error::invalid(format!(
                    "timestep {t} is past the schedule's {} steps",
                    acp.len()
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_snr_caps_the_clean_timesteps_only() {
        // ᾱ = 0.5: SNR 1 (under γ): ε weight 1, v weight 1/2, x₀ weight 1.
        // ᾱ = 0.99: SNR 99: ε weight 5/99, v weight 5/100, x₀ weight 5.
        let acp = [0.5f32, 0.99];
        let snr1 = 0.99f64 as f32 as f64 / (1.0 - 0.99f64 as f32 as f64);
        let eps = min_snr_weights(PredictionType::Epsilon, &acp, &[0, 1], 5.0).unwrap();
        assert!((eps[0] - 1.0).abs() < 1e-12);
        assert!((eps[1] - 5.0 / snr1).abs() < 1e-12);
        let v = min_snr_weights(PredictionType::VPrediction, &acp, &[0, 1], 5.0).unwrap();
        assert!((v[0] - 0.5).abs() < 1e-12);
        assert!((v[1] - 5.0 / (snr1 + 1.0)).abs() < 1e-12);
        let x0 = min_snr_weights(PredictionType::Sample, &acp, &[1, 0], 5.0).unwrap();
        assert_eq!(x0, vec![5.0, 1.0]);
    }

    #[test]
    fn bad_gamma_and_timestep_are_refused() {
        let acp = [0.5f32];
        for g in [0.0, -1.0, f64::NAN] {
            let e = min_snr_weights(PredictionType::Epsilon, &acp, &[0], g).unwrap_err();
            assert!(e.to_string().contains("snr_gamma"), "{e}");
        }
        let e = min_snr_weights(PredictionType::Epsilon, &acp, &[3], 5.0).unwrap_err();
        assert!(e.to_string().contains("timestep 3"), "{e}");
    }

    #[test]
    fn weighted_mse_scales_each_image() {
        let dev = candle_core::Device::Cpu;
        let pred = Tensor::new(&[[1f32, 3.0], [2.0, 2.0]], &dev).unwrap();
        let target = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();
        let plain: Vec<f32> = per_image_mse(&pred, &target, None)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(plain, vec![5.0, 4.0]);
        let w: Vec<f32> = per_image_mse(&pred, &target, Some(&[0.5, 2.0]))
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(w, vec![2.5, 8.0]);
    }
}
