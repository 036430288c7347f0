//! DDIM inversion: deterministic DDIM run backwards (clean sample to noise, timesteps
//! ascending), e.g. to find the latents that regenerate a given image.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{self, mul_s, NoiseSchedule, PredictionType};
use crate::config::{ConfigReader, SchedulerConfig, X0ClipFields};
use crate::scheduler::{check_steps, Scheduler, StepOutput};

const CLASS: &str = "DDIMInverseScheduler";

pub struct DdimInverseScheduler {
    config: SchedulerConfig,
    noise: NoiseSchedule,
    prediction: PredictionType,
    clip: Option<f64>,
    /// alphas_cumprod "before" the first training step: 1, or acp[0].
    initial_alpha_cumprod: f32,
    trailing: bool,
    steps_offset: usize,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
}

impl DdimInverseScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let noise = NoiseSchedule::read(&mut r, 0.0001, 0.02, "linear", true)?;
        let clip = X0ClipFields::read_simple_with_default(&mut r, true)?;
        let set_alpha_to_one = r.bool("set_alpha_to_one", true)?;
        let steps_offset = r.usize("steps_offset", 0)?;
        let prediction = PredictionType::read(&mut r)?;
        let trailing =
            r.choice("timestep_spacing", "leading", &["leading", "trailing"])? == "trailing";
        let initial_alpha_cumprod = if set_alpha_to_one {
            1.0
        } else {
            noise.alphas_cumprod[0]
        };
        let timesteps = (0..noise.len()).map(|t| t as f64).collect();
        Ok(Self {
            config: r.finish(),
            noise,
            prediction,
            clip,
            initial_alpha_cumprod,
            trailing,
            steps_offset,
            timesteps,
            num_inference_steps: None,
        })
    }
}

impl Scheduler for DdimInverseScheduler {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Ascending: the leading or trailing DDIM timesteps in reverse.
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.noise.len())?;
        let n_train = self.noise.len();
        self.timesteps = if self.trailing {
            let mut ts =
                common::int_timesteps(common::Spacing::Trailing, n_train, n, self.steps_offset);
            ts.reverse();
            ts
        } else {
            let ratio = n_train / n;
            (0..n)
                .map(|i| (i * ratio + self.steps_offset) as f64)
                .collect()
        };
        self.num_inference_steps = Some(n);
        Ok(())
    }

    fn scale_model_input(&mut self, sample: &Tensor, _t: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// From the previous (less noisy) timestep t - N/n to `t`.
    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        _rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let n = self
            .num_inference_steps
            .ok_or_else(|| Error::invalid(format!("{CLASS}: call set_timesteps before step")))?;
        let n_train = self.noise.len() as i64;
        let target = common::int_timestep(CLASS, t, self.noise.len())?;
        let from = (target - n_train / n as i64).min(n_train - 1);
        let a_t = self.noise.acp(from, self.initial_alpha_cumprod);
        let a_next = self.noise.acp(target, self.initial_alpha_cumprod);
        let (mut x0, eps) = common::alpha_x0_eps(self.prediction, model_output, sample, a_t)?;
        if let Some(range) = self.clip {
            x0 = x0.clamp(-range, range)?;
        }
        let direction = mul_s(&eps, (1.0 - a_next).sqrt())?;
        let prev = (mul_s(&x0, a_next.sqrt())? + direction)?;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(&self, _original: &Tensor, _noise: &Tensor, _timesteps: &[f64]) -> Result<Tensor> {
        Err(Error::invalid(format!(
            "{CLASS} has no add_noise (it runs sampling backwards; noise with DDIMScheduler)"
        )))
    }

    fn alphas_cumprod(&self) -> Option<&[f32]> {
        Some(&self.noise.alphas_cumprod)
    }

    fn betas(&self) -> Option<Vec<f32>> {
        Some(self.noise.betas.clone())
    }
}
