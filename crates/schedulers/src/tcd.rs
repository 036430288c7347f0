//! TCD (Trajectory Consistency Distillation, Zheng et al. 2024): a consistency model's
//! multistep sampler that jumps to an intermediate timestep s = floor((1 - gamma) * t_prev) and
//! re-noises from there; `gamma` (diffusers' `eta`, default 0.3) sets how much fresh noise each
//! step adds (0: deterministic).

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{self, mul_s};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::consistency::{consistency_scheduler_common, ConsistencyState};
use crate::scheduler::{Scheduler, StepOutput};

const CLASS: &str = "TCDScheduler";

pub struct TcdScheduler {
    config: SchedulerConfig,
    c: ConsistencyState,
    gamma: f64,
}

impl TcdScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let c = ConsistencyState::read(&mut r)?;
        Ok(Self {
            config: r.finish(),
            c,
            gamma: 0.3,
        })
    }
}

impl Scheduler for TcdScheduler {
    consistency_scheduler_common!();

    /// TCD's `gamma`, which diffusers passes to `step` as `eta` (default 0.3).
    fn set_eta(&mut self, eta: f64) {
        self.gamma = eta;
    }

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
        if !(0.0..=1.0).contains(&self.gamma) {
            return Err(Error::invalid(format!(
                "{CLASS}: eta (gamma) must be in [0, 1], got {}",
                self.gamma
            )));
        }
        let i = self.c.step_index(CLASS, t)?;
        let ti = common::int_timestep(CLASS, t, self.c.noise.len())?;
        let prev_t = self.c.timesteps.get(i + 1).map_or(0, |&p| p as i64);
        // torch: floor((1 - gamma) * prev_t) with the int tensor promoted to float32.
        let s = ((1.0 - self.gamma) as f32 * prev_t as f32).floor() as i64;
        let a_t = self.c.noise.acp(ti, self.c.final_alpha_cumprod);
        let a_prev = self.c.noise.acp(prev_t, self.c.final_alpha_cumprod);
        let a_s = self.c.noise.acp(s, self.c.final_alpha_cumprod);
        let (x0, eps) = common::alpha_x0_eps(self.c.prediction, model_output, sample, a_t)?;
        let noised = (mul_s(&x0, a_s.sqrt())? + mul_s(&eps, (1.0 - a_s).sqrt())?)?;
        let prev_sample = if self.gamma > 0.0 && i + 1 != n {
            let z = rng.randn_like(model_output)?;
            let ratio = a_prev / a_s;
            (mul_s(&noised, ratio.sqrt())? + mul_s(&z, (1.0 - ratio).sqrt())?)?
        } else {
            noised
        };
        self.c.step_index = Some(i + 1);
        Ok(StepOutput {
            prev_sample,
            // diffusers' TCD returns `pred_noised_sample`, not a clean estimate.
            pred_original_sample: None,
        })
    }
}
