//! The variance-preserving multistep solvers' shared pieces (DPM-Solver multistep and
//! singlestep, UniPC, DEIS): their schedules, the alpha/sigma/lambda of a sigma, and the
//! conversions of a model output to the x0 or epsilon they integrate.

use candle_core::Tensor;
use diffuse_core::Result;

use crate::common::{
    self, div_s, karras_sigmas, mul_s, sigma_to_t, NoiseSchedule, PredictionType, Spacing,
};
use crate::sigma_schedule::{train_sigmas_and_logs, SigmaState};

/// alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of a (variance-exploding) sigma, in
/// f32 as diffusers' multistep solvers compute them.
pub(crate) fn vp_alpha_sigma_lambda(sigma: f32) -> (f32, f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

/// The initial state of DPM-Solver and UniPC: every training timestep descending, and the
/// training sigmas in *ascending* order (a diffusers quirk that `add_noise` before
/// `set_timesteps` exposes).
pub(crate) fn solver_initial(noise: &NoiseSchedule) -> (Vec<f64>, Vec<f32>) {
    let n = noise.len();
    let ts = common::linspace(0.0, (n - 1) as f64, n)
        .into_iter()
        .rev()
        .map(|t| t as f32 as f64)
        .collect();
    (ts, noise.train_sigmas())
}

/// Timesteps and sigmas (with the final one) of DPM-Solver and UniPC for `n` steps.
#[allow(clippy::too_many_arguments)]
pub(crate) fn solver_schedule(
    noise: &NoiseSchedule,
    spacing: Spacing,
    last_timestep: usize,
    n: usize,
    steps_offset: usize,
    karras: bool,
    round_karras: bool,
    final_sigma_min: bool,
) -> (Vec<f64>, Vec<f32>) {
    let mut timesteps =
        common::solver_timesteps(spacing, last_timestep, noise.len(), n, steps_offset);
    let (train, logs) = train_sigmas_and_logs(noise);
    let sigmas: Vec<f64> = if karras {
        let ks = karras_sigmas(train[0] as f64, train[train.len() - 1] as f64, n);
        timesteps = ks
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &logs);
                // Stored as int64: rounded, or truncated for the cosine schedule.
                if round_karras {
                    common::round_half_even(t)
                } else {
                    t.trunc()
                }
            })
            .collect();
        ks
    } else {
        timesteps
            .iter()
            .map(|&t| common::interp_index(t, &train))
            .collect()
    };
    let last = if !final_sigma_min {
        0.0
    } else if karras {
        sigmas[sigmas.len() - 1] as f32
    } else {
        let a0 = noise.alphas_cumprod[0];
        ((1.0 - a0) / a0).sqrt()
    };
    (
        timesteps,
        sigmas
            .into_iter()
            .map(|s| s as f32)
            .chain(std::iter::once(last))
            .collect(),
    )
}

/// x0 from a model output at VP coefficients (alpha_t, sigma_t), in torch's operation order.
pub(crate) fn vp_x0(
    pred: PredictionType,
    mo: &Tensor,
    sample: &Tensor,
    a: f32,
    s: f32,
) -> Result<Tensor> {
    match pred {
        PredictionType::Epsilon => div_s(&(sample - mul_s(mo, s)?)?, a),
        PredictionType::Sample => Ok(mo.clone()),
        PredictionType::VPrediction => Ok((mul_s(sample, a)? - mul_s(mo, s)?)?),
    }
}

/// Epsilon from a model output at VP coefficients (alpha_t, sigma_t).
pub(crate) fn vp_eps(
    pred: PredictionType,
    mo: &Tensor,
    sample: &Tensor,
    a: f32,
    s: f32,
) -> Result<Tensor> {
    match pred {
        PredictionType::Epsilon => Ok(mo.clone()),
        PredictionType::Sample => div_s(&(sample - mul_s(mo, a)?)?, s),
        PredictionType::VPrediction => Ok((mul_s(mo, a)? + mul_s(sample, s)?)?),
    }
}

/// `alpha_t * x + sigma_t * noise` with the sigma looked up like the k-diffusion schedulers.
pub(crate) fn vp_add_noise(
    state: &SigmaState,
    class: &str,
    x: &Tensor,
    noise: &Tensor,
    timesteps: &[f64],
) -> Result<Tensor> {
    let sigmas = state.noise_sigmas(class, timesteps)?;
    let (mut ca, mut cb) = (vec![], vec![]);
    for s in sigmas {
        let (a, st, _) = vp_alpha_sigma_lambda(s as f32);
        ca.push(a as f64);
        cb.push(st as f64);
    }
    common::per_batch_lin2(x, noise, &ca, &cb)
}

/// The `Scheduler` methods the multistep solvers (DPM-Solver, UniPC) share: fields `config`,
/// `noise`, `state` and a `CLASS` constant; unit noise and unscaled inputs.
macro_rules! solver_scheduler_common {
    () => {
        $crate::sigma_schedule::sigma_state_accessors!();

        fn init_noise_sigma(&self) -> f64 {
            1.0
        }

        fn scale_model_input(&mut self, sample: &Tensor, _t: f64) -> Result<Tensor> {
            Ok(sample.clone())
        }

        fn add_noise(
            &self,
            original: &Tensor,
            noise: &Tensor,
            timesteps: &[f64],
        ) -> Result<Tensor> {
            $crate::multistep::vp_add_noise(&self.state, CLASS, original, noise, timesteps)
        }

        fn alphas_cumprod(&self) -> Option<&[f32]> {
            Some(&self.noise.alphas_cumprod)
        }
    };
}
pub(crate) use solver_scheduler_common;
