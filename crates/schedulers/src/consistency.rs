//! What the consistency-distilled samplers (LCM, TCD) share: their config, the timestep schedule
//! they were distilled on (a subset of it, or custom timesteps), and the step index.

use diffuse_core::{Error, Result};

use crate::common::{self, NoiseSchedule, PredictionType, X0Clip};
use crate::config::ConfigReader;
use crate::scheduler::check_steps;

pub(crate) struct ConsistencyState {
    pub noise: NoiseSchedule,
    pub prediction: PredictionType,
    pub clip: X0Clip,
    pub final_alpha_cumprod: f32,
    pub original_inference_steps: usize,
    pub timestep_scaling: f64,
    pub timesteps: Vec<f64>,
    pub num_inference_steps: Option<usize>,
    pub step_index: Option<usize>,
    pub begin_index: Option<usize>,
}

impl ConsistencyState {
    pub fn read(r: &mut ConfigReader) -> Result<Self> {
        let noise = NoiseSchedule::read(r, 0.00085, 0.012, "scaled_linear", true)?;
        let original_inference_steps = r.usize("original_inference_steps", 50)?;
        r.ensure(
            original_inference_steps >= 1 && original_inference_steps <= noise.len(),
            "original_inference_steps",
            "must be between 1 and num_train_timesteps",
        )?;
        let clip = X0Clip::read(r, false, true)?;
        let set_alpha_to_one = r.bool("set_alpha_to_one", true)?;
        // Recorded, but the distilled schedule does not use them.
        r.usize("steps_offset", 0)?;
        let prediction = PredictionType::read(r)?;
        r.choice(
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

    fn install(&mut self, timesteps: Vec<f64>) {
        self.num_inference_steps = Some(timesteps.len());
        self.timesteps = timesteps;
        self.step_index = None;
        self.begin_index = None;
    }

    /// The `original_inference_steps`-step schedule the model was distilled on, then `n` of its
    /// timesteps evenly skipping.
    pub fn set_timesteps(&mut self, class: &str, n: usize) -> Result<()> {
        check_steps(class, n, self.noise.len())?;
        let orig = self.original_inference_steps;
        if n > orig {
            return Err(Error::invalid(format!(
                "{class}: num_inference_steps ({n}) cannot be larger than original_inference_steps ({orig})"
            )));
        }
        let k = self.noise.len() / orig;
        let origin: Vec<f64> = (1..=orig).rev().map(|i| (i * k) as f64 - 1.0).collect();
        let ts = common::linspace(0.0, origin.len() as f64, n + 1)[..n]
            .iter()
            .map(|&x| origin[x.floor() as usize])
            .collect();
        self.install(ts);
        Ok(())
    }

    /// Custom timesteps: integers, strictly descending, below `num_train_timesteps`.
    pub fn set_custom_timesteps(&mut self, class: &str, ts: &[f64]) -> Result<()> {
        if ts.is_empty() {
            return Err(Error::invalid(format!(
                "{class}: custom timesteps must not be empty"
            )));
        }
        if ts.windows(2).any(|w| w[1] >= w[0]) {
            return Err(Error::invalid(format!(
                "{class}: custom timesteps must be in descending order"
            )));
        }
        for &t in ts {
            common::int_timestep(class, t, self.noise.len())?;
        }
        self.install(ts.to_vec());
        Ok(())
    }

    /// The index of the current step, found from `t` on the first step of a loop.
    pub fn step_index(&self, class: &str, t: f64) -> Result<usize> {
        match (self.step_index, self.begin_index) {
            (Some(i), _) => Ok(i),
            (None, Some(b)) => Ok(b),
            (None, None) => common::index_for_timestep(&self.timesteps, t)
                .ok_or_else(|| common::timestep_not_found(class, t)),
        }
    }
}

/// The `Scheduler` methods LCM and TCD share (fields `config` and `c`, a `CLASS` constant).
macro_rules! consistency_scheduler_common {
    () => {
        fn class_name(&self) -> &'static str {
            CLASS
        }

        fn config(&self) -> &SchedulerConfig {
            &self.config
        }

        fn timesteps(&self) -> &[f64] {
            &self.c.timesteps
        }

        fn init_noise_sigma(&self) -> f64 {
            1.0
        }

        fn set_timesteps(&mut self, n: usize) -> Result<()> {
            self.c.set_timesteps(CLASS, n)
        }

        fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
            self.c.set_custom_timesteps(CLASS, timesteps)
        }

        fn set_begin_index(&mut self, begin_index: usize) {
            self.c.begin_index = Some(begin_index);
        }

        fn scale_model_input(&mut self, sample: &Tensor, _t: f64) -> Result<Tensor> {
            Ok(sample.clone())
        }

        fn add_noise(
            &self,
            original: &Tensor,
            noise: &Tensor,
            timesteps: &[f64],
        ) -> Result<Tensor> {
            $crate::common::add_noise_vp(
                CLASS,
                &self.c.noise.alphas_cumprod,
                original,
                noise,
                timesteps,
            )
        }

        fn alphas_cumprod(&self) -> Option<&[f32]> {
            Some(&self.c.noise.alphas_cumprod)
        }

        fn betas(&self) -> Option<Vec<f32>> {
            Some(self.c.noise.betas.clone())
        }
    };
}
pub(crate) use consistency_scheduler_common;
