//! KDPM2 (k-diffusion's `sample_dpm_2`): a second-order step through the geometric midpoint
//! of consecutive sigmas. Two model evaluations per step.

use candle_core::Tensor;
use diffuse_core::{NoiseSource, Result};

use crate::common::{self, sigma_to_t};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::scheduler::{check_steps, Scheduler, StepOutput};
use crate::sigma_schedule::{
    derivative, interleave, k_initial, k_scale_input, k_scheduler_common, train_sigmas_and_logs,
    KConfig, SigmaState,
};

const CLASS: &str = "KDPM2DiscreteScheduler";

pub struct Kdpm2DiscreteScheduler {
    config: SchedulerConfig,
    k: KConfig,
    state: SigmaState,
    sigmas_interpol: Vec<f32>,
    /// The sample at the start of a step while its second half is pending.
    pending: Option<Tensor>,
}

impl Kdpm2DiscreteScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let k = KConfig::read(&mut r, false, true)?;
        r.ensure(
            k.prediction != common::PredictionType::Sample,
            "prediction_type",
            "sample is not supported",
        )?;
        let (ts, sig) = k_initial(&k.noise);
        let n_train = k.noise.len();
        let mut s = Self {
            config: r.finish(),
            k,
            state: SigmaState::new(ts, sig.clone(), false),
            sigmas_interpol: sig,
            pending: None,
        };
        // diffusers starts from the full training-length schedule.
        s.set_timesteps(n_train)?;
        Ok(s)
    }
}

impl Scheduler for Kdpm2DiscreteScheduler {
    k_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.k.noise.len())?;
        let (ts, sig) = self.k.schedule(n, true);
        // Geometric midpoints exp(lerp(log s[i], log s[i-1], 0.5)), computed as torch.lerp does.
        let interp: Vec<f32> = (0..sig.len())
            .map(|i| {
                let (a, b) = (sig[i].ln(), sig[(i + sig.len() - 1) % sig.len()].ln());
                (b - (b - a) * 0.5).exp()
            })
            .collect();
        let (_, logs) = train_sigmas_and_logs(&self.k.noise);
        let t_interp: Vec<f64> = interp
            .iter()
            .map(|&s| sigma_to_t(s as f64, &logs) as f32 as f64)
            .collect();
        let mut timesteps = vec![ts[0]];
        for i in 1..n {
            timesteps.push(t_interp[i]);
            timesteps.push(ts[i]);
        }
        let last = sig.len() - 1;
        self.sigmas_interpol = interleave(&interp[..1], &interp[1..], &interp[last..]);
        let sigmas = interleave(&sig[..1], &sig[1..], &sig[last..]);
        self.state.reset(timesteps, sigmas);
        self.pending = None;
        Ok(())
    }

    fn order(&self) -> usize {
        2
    }

    fn scale_model_input(&mut self, sample: &Tensor, t: f64) -> Result<Tensor> {
        let i = self.state.step_index(CLASS, t)?;
        let sigma = if self.pending.is_none() {
            self.state.sigmas[i]
        } else {
            self.sigmas_interpol[i]
        };
        k_scale_input(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        _rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.state.step_index(CLASS, t)?;
        let interp = |j: usize| self.sigmas_interpol.get(j).copied().unwrap_or(0.0) as f64;
        let first = self.pending.is_none();
        let (sigma, sigma_mid, sigma_next) = if first {
            (self.state.sigma(i), interp(i + 1), self.state.sigma(i + 1))
        } else {
            (self.state.sigma(i - 1), interp(i), self.state.sigma(i))
        };
        let sigma_input = if first { sigma } else { sigma_mid };
        let x0 = common::sigma_denoised(self.k.prediction, model_output, sample, sigma_input)?;
        let prev = match self.pending.take() {
            None => {
                let d = derivative(sample, &x0, sigma)?;
                self.pending = Some(sample.clone());
                (sample + d.affine(sigma_mid - sigma, 0.0)?)?
            }
            Some(start) => {
                let d = derivative(sample, &x0, sigma_mid)?;
                (start + d.affine(sigma_next - sigma, 0.0)?)?
            }
        };
        self.state.advance();
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }
}
