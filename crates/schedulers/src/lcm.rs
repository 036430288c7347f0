//! LCM (Luo et al. 2023): latent consistency models' multistep sampler — a consistency
//! function (skip/out scalings) then re-noising to the next timestep.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{self, NoiseSchedule, PredictionType, X0Clip};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::scheduler::{check_steps, Scheduler, StepOutput};

const CLASS: &str = "LCMScheduler";

pub struct LcmScheduler {
    config: SchedulerConfig,
    noise: NoiseSchedule,
    prediction: PredictionType,
    clip: X0Clip,
    final_alpha_cumprod: f32,
    original_inference_steps: usize,
    timestep_scaling: f64,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

impl LcmScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let noise = NoiseSchedule::read(&mut r, 0.00085, 0.012, "scaled_linear", true)?;
        let original_inference_steps = r.usize("original_inference_steps", 50)?;
        r.ensure(
            original_inference_steps >= 1 && original_inference_steps <= noise.len(),
            "original_inference_steps",
            "must be between 1 and num_train_timesteps",
        )?;
        let clip = X0Clip::read(&mut r, false, true)?;
        let set_alpha_to_one = r.bool("set_alpha_to_one", true)?;
        let _steps_offset = r.usize("steps_offset", 0)?;
        let prediction = PredictionType::read(&mut r)?;
        let _spacing = r.choice(
            "timestep_spacing",
            "leading",
            &["linspace", "leading", "trailing"],
        )?;
        let timestep_scaling = r.f64("timestep_scaling", 10.0)?;
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
            original_inference_steps,
            timestep_scaling,
            timesteps,
            num_inference_steps: None,
            step_index: None,
            begin_index: None,
        })
    }

    /// Boundary-condition scalings of the consistency function (sigma_data = 0.5).
    fn scalings(&self, t: f64) -> (f64, f64) {
        let sd2 = 0.25;
        let st = t * self.timestep_scaling;
        (sd2 / (st * st + sd2), st / (st * st + sd2).sqrt())
    }
}

impl Scheduler for LcmScheduler {
    common::alpha_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.noise.len())?;
        let orig = self.original_inference_steps;
        if n > orig {
            return Err(Error::invalid(format!(
                "{CLASS}: num_inference_steps ({n}) cannot be larger than original_inference_steps ({orig})"
            )));
        }
        // The schedule the LCM was distilled on, then an evenly skipping subset of it.
        let k = self.noise.len() / orig;
        let origin: Vec<f64> = (1..=orig).rev().map(|i| (i * k) as f64 - 1.0).collect();
        self.timesteps = common::linspace(0.0, origin.len() as f64, n + 1)[..n]
            .iter()
            .map(|&x| origin[x.floor() as usize])
            .collect();
        self.num_inference_steps = Some(n);
        self.step_index = None;
        self.begin_index = None;
        Ok(())
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = Some(begin_index);
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let n = self
            .num_inference_steps
            .ok_or_else(|| Error::invalid(format!("{CLASS}: call set_timesteps first")))?;
        let i = match (self.step_index, self.begin_index) {
            (Some(i), _) => i,
            (None, Some(b)) => b,
            (None, None) => common::index_for_timestep(&self.timesteps, t)
                .ok_or_else(|| common::timestep_not_found(CLASS, t))?,
        };
        let ti = common::int_timestep(CLASS, t, self.noise.len())?;
        let prev_t = self.timesteps.get(i + 1).map_or(ti, |&p| p as i64);
        let a_t = self.noise.acp(ti, self.final_alpha_cumprod);
        let a_prev = self.noise.acp(prev_t, self.final_alpha_cumprod);
        let (c_skip, c_out) = self.scalings(t);
        let (x0, _) = common::alpha_x0_eps(self.prediction, model_output, sample, a_t)?;
        let x0 = self.clip.apply(x0)?;
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
        self.step_index = Some(i + 1);
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(denoised),
        })
    }
}
