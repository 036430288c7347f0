//! DDIM (Song et al. 2020): deterministic (eta = 0) or partly stochastic sampling.

use candle_core::Tensor;
use diffuse_core::{NoiseSource, Result};

use crate::common::{self, NoiseSchedule, PredictionType, Spacing, X0Clip};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::scheduler::{check_steps, Scheduler, StepOutput};

const CLASS: &str = "DDIMScheduler";

pub struct DdimScheduler {
    config: SchedulerConfig,
    noise: NoiseSchedule,
    prediction: PredictionType,
    clip: X0Clip,
    /// alphas_cumprod "before" the first training step: 1, or acp[0] (SD's set_alpha_to_one=false).
    final_alpha_cumprod: f32,
    spacing: Spacing,
    steps_offset: usize,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    eta: f64,
}

impl DdimScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let noise = NoiseSchedule::read(&mut r, 0.0001, 0.02, "linear", true)?;
        let clip = X0Clip::read(&mut r, true, true)?;
        let set_alpha_to_one = r.bool("set_alpha_to_one", true)?;
        let steps_offset = r.usize("steps_offset", 0)?;
        let prediction = PredictionType::read(&mut r)?;
        let spacing = Spacing::read(&mut r, "leading")?;
        let final_alpha_cumprod = if set_alpha_to_one {
            1.0
        } else {
            noise.alphas_cumprod[0]
        };
        let timesteps = (0..noise.len()).rev().map(|t| t as f64).collect();
        Ok(Self {
            config: r.finish(),
            noise,
            prediction,
            clip,
            final_alpha_cumprod,
            spacing,
            steps_offset,
            timesteps,
            num_inference_steps: None,
            eta: 0.0,
        })
    }

    pub fn with_eta(mut self, eta: f64) -> Self {
        self.eta = eta;
        self
    }
}

impl Scheduler for DdimScheduler {
    common::alpha_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.noise.len())?;
        self.timesteps =
            common::int_timesteps(self.spacing, self.noise.len(), n, self.steps_offset);
        self.num_inference_steps = Some(n);
        Ok(())
    }

    fn set_eta(&mut self, eta: f64) {
        self.eta = eta;
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let n = self.num_inference_steps.ok_or_else(|| {
            diffuse_core::Error::invalid(format!("{CLASS}: call set_timesteps before step"))
        })?;
        let t = common::int_timestep(CLASS, t, self.noise.len())?;
        let prev_t = t - (self.noise.len() / n) as i64;
        let a_t = self.noise.acp(t, self.final_alpha_cumprod);
        let a_prev = self.noise.acp(prev_t, self.final_alpha_cumprod);
        let b_t = 1.0 - a_t;
        let (x0, eps) = common::alpha_x0_eps(self.prediction, model_output, sample, a_t)?;
        let x0 = self.clip.apply(x0)?;
        // Scalars in f32 and in diffusers' order: with eta = 1 and a cosine schedule,
        // 1 - a_prev - std² cancels almost completely at the first step.
        let variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let direction = common::mul_s(&eps, (1.0 - a_prev - std_dev * std_dev).sqrt())?;
        let mut prev = (common::mul_s(&x0, a_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let z = rng.randn_like(model_output)?;
            prev = (prev + common::mul_s(&z, std_dev)?)?;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }
}
