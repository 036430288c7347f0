//! Heun (Karras et al. 2022, Algorithm 1 without churn): a second-order method — an Euler
//! step, then a correction averaging the derivatives at both ends. Two model evaluations per step.

use candle_core::Tensor;
use diffuse_core::{NoiseSource, Result};

use crate::common;
use crate::config::{ConfigReader, SchedulerConfig, X0ClipFields};
use crate::scheduler::{check_steps, Scheduler, StepOutput};
use crate::sigma_schedule::{
    derivative, interleave, k_initial, k_scale_input, k_scheduler_common, with_final, KConfig,
    SigmaState,
};

const CLASS: &str = "HeunDiscreteScheduler";

pub struct HeunDiscreteScheduler {
    config: SchedulerConfig,
    k: KConfig,
    clip: Option<f64>,
    state: SigmaState,
    /// The first half of a step: its derivative, dt and starting sample.
    pending: Option<(Tensor, f64, Tensor)>,
}

impl HeunDiscreteScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let k = KConfig::read(&mut r, false, true)?;
        let clip = X0ClipFields::read_simple(&mut r)?;
        let (ts, sig) = k_initial(&k.noise);
        let n_train = k.noise.len();
        let mut s = Self {
            config: r.finish(),
            k,
            clip,
            state: SigmaState::new(ts, sig, false),
            pending: None,
        };
        // diffusers starts from the full training-length schedule.
        s.set_timesteps(n_train)?;
        Ok(s)
    }
}

impl HeunDiscreteScheduler {
    /// Every sigma but the first and last is visited twice (predictor, corrector).
    fn install(&mut self, ts: Vec<f64>, sig: &[f64]) {
        let sig = with_final(sig, 0.0);
        let sigmas = interleave(&sig[..1], &sig[1..sig.len() - 1], &sig[sig.len() - 1..]);
        let timesteps = interleave(&ts[..1], &ts[1..], &[]);
        self.state.reset(timesteps, sigmas);
        self.pending = None;
    }
}

impl Scheduler for HeunDiscreteScheduler {
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

    fn order(&self) -> usize {
        2
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
        _rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.state.step_index(CLASS, t)?;
        let first = self.pending.is_none();
        let (sigma, sigma_next) = if first {
            (self.state.sigma(i), self.state.sigma(i + 1))
        } else {
            (self.state.sigma(i - 1), self.state.sigma(i))
        };
        let sigma_input = if first { sigma } else { sigma_next };
        let mut x0 = common::sigma_denoised(self.k.prediction, model_output, sample, sigma_input)?;
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        let prev = match self.pending.take() {
            None => {
                let d = derivative(sample, &x0, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (sample + d.affine(dt, 0.0)?)?;
                self.pending = Some((d, dt, sample.clone()));
                prev
            }
            Some((d_prev, dt, start)) => {
                let d = ((d_prev + derivative(sample, &x0, sigma_next)?)? / 2.0)?;
                (start + d.affine(dt, 0.0)?)?
            }
        };
        self.state.advance();
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }
}
