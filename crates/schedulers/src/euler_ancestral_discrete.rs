//! Euler ancestral ("Euler a"): an Euler step down to sigma_down, then fresh noise of
//! sigma_up, so each step is stochastic.

use candle_core::Tensor;
use diffuse_core::{NoiseSource, Result};

use crate::common;
use crate::config::{ConfigReader, SchedulerConfig};
use crate::scheduler::{check_steps, Scheduler, StepOutput};
use crate::sigma_schedule::{
    euler_update, k_initial, k_scale_input, k_scheduler_common, KConfig, SigmaState,
};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

pub struct EulerAncestralDiscreteScheduler {
    config: SchedulerConfig,
    k: KConfig,
    state: SigmaState,
}

impl EulerAncestralDiscreteScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let k = KConfig::read(&mut r, true, false)?;
        r.ensure(
            k.prediction != common::PredictionType::Sample,
            "prediction_type",
            "sample is not supported",
        )?;
        let (ts, sig) = k_initial(&k.noise);
        Ok(Self {
            config: r.finish(),
            k,
            state: SigmaState::new(ts, sig, false),
        })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    k_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.k.noise.len())?;
        let (ts, sig) = self.k.schedule(n, false);
        self.state.reset(ts, sig);
        Ok(())
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
        let (sigma_from, sigma_to) = (
            self.state.sigmas[i],
            self.state.sigmas.get(i + 1).copied().unwrap_or(0.0),
        );
        let x0 =
            common::sigma_denoised(self.k.prediction, model_output, sample, sigma_from as f64)?;
        // Split the step into a deterministic part (to sigma_down) and added noise (sigma_up).
        let (f2, t2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (t2 * (f2 - t2) / f2).sqrt();
        let sigma_down = (t2 - sigma_up * sigma_up).sqrt();
        let prev = euler_update(
            sample,
            &x0,
            sigma_from as f64,
            (sigma_down - sigma_from) as f64,
        )?;
        let z = rng.randn_like(model_output)?;
        let prev = (prev + z.affine(sigma_up as f64, 0.0)?)?;
        self.state.advance();
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }
}
