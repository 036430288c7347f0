//! Euler (Karras et al. 2022, Algorithm 2; no churn by default): the first-order ODE sampler
//! in sigma space.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{self, PredictionType};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::scheduler::{check_steps, Scheduler, StepOutput, TimestepsSpec};
use crate::sigma_schedule::{
    euler_update, k_initial, k_scale_input, k_scheduler_common, train_sigmas_and_logs, with_final,
    KConfig, SigmaState,
};

const CLASS: &str = "EulerDiscreteScheduler";

pub struct EulerDiscreteScheduler {
    config: SchedulerConfig,
    k: KConfig,
    final_sigma_min: bool,
    state: SigmaState,
    /// Stochastic "churn" (Karras et al.'s S_churn, S_tmin, S_tmax, S_noise); off by default.
    pub s_churn: f64,
    pub s_tmin: f64,
    pub s_tmax: f64,
    pub s_noise: f64,
}

impl EulerDiscreteScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let mut k = KConfig::read(&mut r, true, true)?;
        k.log_linear =
            r.choice("interpolation_type", "linear", &["linear", "log_linear"])? == "log_linear";
        k.sigma_bounds = (r.opt_f64("sigma_min")?, r.opt_f64("sigma_max")?);
        r.choice("timestep_type", "discrete", &["discrete"])?;
        let final_sigma_min =
            r.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        let (ts, sig) = k_initial(&k.noise);
        Ok(Self {
            config: r.finish(),
            k,
            final_sigma_min,
            state: SigmaState::new(ts, sig, false),
            s_churn: 0.0,
            s_tmin: 0.0,
            s_tmax: f64::INFINITY,
            s_noise: 1.0,
        })
    }

    /// Installs a schedule whose final sigma is `final_sigmas_type`'s.
    fn install(&mut self, timesteps: Vec<f64>, sigmas: &[f64]) {
        let last = if self.final_sigma_min {
            let a0 = self.k.noise.alphas_cumprod[0];
            ((1.0 - a0) / a0).sqrt()
        } else {
            0.0
        };
        self.state.reset(timesteps, with_final(sigmas, last));
    }

    /// Uses explicit sigmas (descending, ending with the final sigma, usually 0), with timesteps
    /// recovered from them.
    pub fn set_custom_sigmas(&mut self, sigmas: &[f64]) -> Result<()> {
        if sigmas.len() < 2 {
            return Err(Error::invalid(format!(
                "{CLASS}: custom sigmas need at least two values"
            )));
        }
        let (_, logs) = train_sigmas_and_logs(&self.k.noise);
        let sig: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        let ts = sig[..sig.len() - 1]
            .iter()
            .map(|&s| common::sigma_to_t(s as f64, &logs) as f32 as f64)
            .collect();
        self.state.reset(ts, sig);
        Ok(())
    }
}

impl Scheduler for EulerDiscreteScheduler {
    k_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.k.noise.len())?;
        let (ts, sig) = self.k.schedule_raw(CLASS, n, None, false)?;
        self.install(ts, &sig);
        Ok(())
    }

    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        let (ts, sig) = self.k.schedule_raw(CLASS, 0, Some(timesteps), false)?;
        self.install(ts, &sig);
        Ok(())
    }

    fn set_timesteps_with(&mut self, spec: &TimestepsSpec) -> Result<()> {
        spec.reject_others(CLASS, &["timesteps", "sigmas"])?;
        match (spec.num_inference_steps, &spec.timesteps, &spec.sigmas) {
            (Some(n), None, None) => self.set_timesteps(n),
            (None, Some(ts), None) => self.set_custom_timesteps(ts),
            (None, None, Some(sig)) => self.set_custom_sigmas(sig),
            _ => Err(Error::invalid(format!(
                "{CLASS}: set_timesteps takes exactly one of num_inference_steps, timesteps and sigmas"
            ))),
        }
    }

    fn scale_model_input(&mut self, sample: &Tensor, t: f64) -> Result<Tensor> {
        let i = self.state.step_index(CLASS, t)?;
        k_scale_input(sample, self.state.sigmas[i])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.state.step_index(CLASS, t)?;
        let sigma = self.state.sigma(i);
        let gamma = if self.s_tmin <= sigma && sigma <= self.s_tmax {
            (self.s_churn / (self.state.sigmas.len() - 1) as f64).min(2f64.sqrt() - 1.0)
        } else {
            0.0
        };
        let sigma_hat = sigma * (gamma + 1.0);
        let mut sample = sample.clone();
        if gamma > 0.0 {
            let z = rng.randn_like(model_output)?;
            sample = (sample
                + z.affine(
                    self.s_noise * (sigma_hat * sigma_hat - sigma * sigma).sqrt(),
                    0.0,
                )?)?;
        }
        // Epsilon is read at sigma_hat; diffusers reads v-prediction at the unchurned sigma.
        let sigma_pred = if self.k.prediction == PredictionType::Epsilon {
            sigma_hat
        } else {
            sigma
        };
        let x0 = common::sigma_denoised(self.k.prediction, model_output, &sample, sigma_pred)?;
        let prev = euler_update(&sample, &x0, sigma_hat, self.state.sigma(i + 1) - sigma_hat)?;
        self.state.advance();
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }
}
