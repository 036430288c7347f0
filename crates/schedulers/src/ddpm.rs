//! DDPM (Ho et al. 2020): ancestral sampling of the variance-preserving diffusion.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{self, NoiseSchedule, PredictionType, Spacing, X0Clip};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::scheduler::{check_steps, Scheduler, StepOutput};

const CLASS: &str = "DDPMScheduler";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarianceType {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
    Learned,
    LearnedRange,
}

pub struct DdpmScheduler {
    config: SchedulerConfig,
    noise: NoiseSchedule,
    prediction: PredictionType,
    clip: X0Clip,
    variance: VarianceType,
    spacing: Spacing,
    steps_offset: usize,
    timesteps: Vec<f64>,
    /// Set once `set_timesteps` (or custom timesteps) ran: steps then go to the next
    /// scheduled timestep instead of t - 1.
    scheduled: bool,
}

impl DdpmScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let noise = NoiseSchedule::read(&mut r, 0.0001, 0.02, "linear", true)?;
        let variance = match r
            .choice(
                "variance_type",
                "fixed_small",
                &[
                    "fixed_small",
                    "fixed_small_log",
                    "fixed_large",
                    "learned",
                    "learned_range",
                ],
            )?
            .as_str()
        {
            "fixed_small_log" => VarianceType::FixedSmallLog,
            "fixed_large" => VarianceType::FixedLarge,
            "learned" => VarianceType::Learned,
            "learned_range" => VarianceType::LearnedRange,
            _ => VarianceType::FixedSmall,
        };
        let clip = X0Clip::read(&mut r, true, true)?;
        let prediction = PredictionType::read(&mut r)?;
        let spacing = Spacing::read(&mut r, "leading")?;
        let steps_offset = r.usize("steps_offset", 0)?;
        let timesteps = (0..noise.len()).rev().map(|t| t as f64).collect();
        Ok(Self {
            config: r.finish(),
            noise,
            prediction,
            clip,
            variance,
            spacing,
            steps_offset,
            timesteps,
            scheduled: false,
        })
    }

    fn prev_timestep(&self, t: i64) -> Result<i64> {
        if !self.scheduled {
            return Ok(t - 1);
        }
        let i = self
            .timesteps
            .iter()
            .position(|&x| x == t as f64)
            .ok_or_else(|| common::timestep_not_found(CLASS, t as f64))?;
        Ok(self.timesteps.get(i + 1).map_or(-1, |&x| x as i64))
    }

    /// Standard deviation of the noise added at step t (a tensor for learned variances).
    fn noise_std(
        &self,
        t: i64,
        prev_t: i64,
        predicted: Option<&Tensor>,
        like: &Tensor,
    ) -> Result<Tensor> {
        let a_t = self.noise.acp(t, 1.0);
        let a_prev = self.noise.acp(prev_t, 1.0);
        let beta_t = 1.0 - a_t / a_prev;
        let var = ((1.0 - a_prev) / (1.0 - a_t) * beta_t).max(1e-20);
        let constant = |v: f32| -> Result<Tensor> { Ok(like.ones_like()?.affine(v as f64, 0.0)?) };
        match (self.variance, predicted) {
            (VarianceType::FixedSmall, _) => constant(var.sqrt()),
            (VarianceType::FixedSmallLog, _) => constant((0.5 * var.ln()).exp()),
            (VarianceType::FixedLarge, _) => constant(beta_t.sqrt()),
            (VarianceType::Learned, Some(p)) => Ok(p.sqrt()?),
            (VarianceType::LearnedRange, Some(p)) => {
                let (min_log, max_log) = (var.ln() as f64, beta_t.ln() as f64);
                // frac = (p + 1) / 2; log_var = frac * max_log + (1 - frac) * min_log
                let frac = p.affine(0.5, 0.5)?;
                let log_var = frac.affine(max_log - min_log, min_log)?;
                Ok(log_var.affine(0.5, 0.0)?.exp()?)
            }
            (_, None) => Err(Error::invalid(format!(
                "{CLASS}: variance_type learned/learned_range needs a model output with twice the sample's channels"
            ))),
        }
    }
}

impl Scheduler for DdpmScheduler {
    common::alpha_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.noise.len())?;
        self.timesteps =
            common::int_timesteps(self.spacing, self.noise.len(), n, self.steps_offset);
        self.scheduled = true;
        Ok(())
    }

    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        if timesteps.is_empty() || timesteps.windows(2).any(|w| w[1] >= w[0]) {
            return Err(Error::invalid(format!(
                "{CLASS}: custom timesteps must be non-empty and descending"
            )));
        }
        for &t in timesteps {
            common::int_timestep(CLASS, t, self.noise.len())?;
        }
        self.timesteps = timesteps.to_vec();
        self.scheduled = true;
        Ok(())
    }

    fn previous_timestep(&self, t: f64) -> Result<f64> {
        let t = common::int_timestep(CLASS, t, self.noise.len())?;
        Ok(self.prev_timestep(t)? as f64)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let t = common::int_timestep(CLASS, t, self.noise.len())?;
        let prev_t = self.prev_timestep(t)?;
        let c = sample.dim(1)?;
        let learned = matches!(
            self.variance,
            VarianceType::Learned | VarianceType::LearnedRange
        );
        let (model_output, predicted_variance) = if learned && model_output.dim(1)? == 2 * c {
            (
                model_output.narrow(1, 0, c)?,
                Some(model_output.narrow(1, c, c)?),
            )
        } else {
            (model_output.clone(), None)
        };
        let a_t = self.noise.acp(t, 1.0);
        let a_prev = self.noise.acp(prev_t, 1.0);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let (x0, _) = common::alpha_x0_eps(self.prediction, &model_output, sample, a_t)?;
        let x0 = self.clip.apply(x0)?;
        let x0_coeff = (a_prev.sqrt() * cur_beta / b_t) as f64;
        let cur_coeff = (cur_alpha.sqrt() * b_prev / b_t) as f64;
        let mut prev = common::lin2(&x0, x0_coeff, sample, cur_coeff)?;
        if t > 0 {
            let z = rng.randn_like(&model_output)?;
            let std = self.noise_std(t, prev_t, predicted_variance.as_ref(), &model_output)?;
            prev = (prev + std.mul(&z)?)?;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }
}
