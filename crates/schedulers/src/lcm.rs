//! LCM (Luo et al. 2023): latent consistency models' multistep sampler — a consistency
//! function (skip/out scalings) then re-noising to the next timestep.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common;
use crate::config::{ConfigReader, SchedulerConfig};
use crate::consistency::{consistency_scheduler_common, ConsistencyState};
use crate::scheduler::{Scheduler, StepOutput};

const CLASS: &str = "LCMScheduler";

pub struct LcmScheduler {
    config: SchedulerConfig,
    c: ConsistencyState,
}

impl LcmScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let c = ConsistencyState::read(&mut r)?;
        Ok(Self {
            config: r.finish(),
            c,
        })
    }

    /// Boundary-condition scalings of the consistency function (sigma_data = 0.5).
    fn scalings(&self, t: f64) -> (f64, f64) {
        let sd2 = 0.25;
        let st = t * self.c.timestep_scaling;
        (sd2 / (st * st + sd2), st / (st * st + sd2).sqrt())
    }
}

impl Scheduler for LcmScheduler {
    consistency_scheduler_common!();

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let n = self
            .c
            .num_inference_steps
            .ok_or_else(|| Error::invalid(format!("{CLASS}: call set_timesteps first")))?;
        let i = self.c.step_index(CLASS, t)?;
        let ti = common::int_timestep(CLASS, t, self.c.noise.len())?;
        let prev_t = self.c.timesteps.get(i + 1).map_or(ti, |&p| p as i64);
        let a_t = self.c.noise.acp(ti, self.c.final_alpha_cumprod);
        let a_prev = self.c.noise.acp(prev_t, self.c.final_alpha_cumprod);
        let (c_skip, c_out) = self.scalings(t);
        let (x0, _) = common::alpha_x0_eps(self.c.prediction, model_output, sample, a_t)?;
        let x0 = self.c.clip.apply(x0)?;
        let denoised = common::lin2(&x0, c_out, sample, c_skip)?;
        let prev_sample = if i + 1 != n {
            let z = rng.randn_like(model_output)?;
            common::lin2(
                &denoised,
                (a_prev as f64).sqrt(),
                &z,
                ((1.0 - a_prev) as f64).sqrt(),
            )?
        } else {
            denoised.clone()
        };
        self.c.step_index = Some(i + 1);
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(denoised),
        })
    }
}
