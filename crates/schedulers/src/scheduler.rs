//! The `Scheduler` trait every scheduler implements, what a step returns, and what
//! `set_timesteps_with` is given.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::config::SchedulerConfig;

/// What one scheduler step returns.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The sample for the next step (x_{t-1}).
    pub prev_sample: Tensor,
    /// The model's estimate of the clean sample, for schedulers that compute one
    /// (LCM: its `denoised` output).
    pub pred_original_sample: Option<Tensor>,
}

/// What [`Scheduler::set_timesteps_with`] is given: diffusers' `set_timesteps(num_inference_steps,
/// timesteps=, sigmas=, mu=)` keyword arguments. Pipelines pass custom sigmas (Flux's
/// `linspace(1, 1/n, n)`) and the resolution-dependent shift `mu` this way.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TimestepsSpec {
    pub num_inference_steps: Option<usize>,
    /// Explicit timesteps, descending.
    pub timesteps: Option<Vec<f64>>,
    /// Explicit sigmas, descending (without the final one the scheduler appends).
    pub sigmas: Option<Vec<f64>>,
    /// The shift of `use_dynamic_shifting` flow-matching schedules.
    pub mu: Option<f64>,
}

impl TimestepsSpec {
    /// A schedule of `n` steps.
    pub fn steps(n: usize) -> Self {
        Self {
            num_inference_steps: Some(n),
            ..Self::default()
        }
    }

    /// A schedule of the given sigmas.
    pub fn sigmas(sigmas: Vec<f64>) -> Self {
        Self {
            sigmas: Some(sigmas),
            ..Self::default()
        }
    }

    /// A schedule of the given timesteps.
    pub fn timesteps(timesteps: Vec<f64>) -> Self {
        Self {
            timesteps: Some(timesteps),
            ..Self::default()
        }
    }

    pub fn with_mu(mut self, mu: f64) -> Self {
        self.mu = Some(mu);
        self
    }

    /// An error naming the first argument given that `class` does not take (`takes` lists the
    /// ones it does: "timesteps", "sigmas", "mu").
    pub fn reject_others(&self, class: &str, takes: &[&str]) -> Result<()> {
        let given = [
            ("timesteps", self.timesteps.is_some()),
            ("sigmas", self.sigmas.is_some()),
            ("mu", self.mu.is_some()),
        ];
        match given.iter().find(|(k, on)| *on && !takes.contains(k)) {
            Some((k, _)) => Err(Error::invalid(format!(
                "{class} does not accept custom {k} in set_timesteps"
            ))),
            None => Ok(()),
        }
    }
}

/// A diffusion scheduler: the noise schedule and the sampler that walks it.
///
/// The pipeline loop is:
/// ```text
/// scheduler.set_timesteps(n)?;
/// let mut x = noise * scheduler.init_noise_sigma();
/// for &t in scheduler.timesteps() {
///     let eps = model(scheduler.scale_model_input(&x, t)?, t);
///     x = scheduler.step(&eps, t, &x, &mut generator)?.prev_sample;
/// }
/// ```
pub trait Scheduler: Send {
    /// The diffusers class name, e.g. `"EulerDiscreteScheduler"`.
    fn class_name(&self) -> &'static str;

    /// The fully resolved config (every field with its value), as `save_config` writes it.
    fn config(&self) -> &SchedulerConfig;

    /// Prepares the schedule for `num_inference_steps` denoising steps.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// Prepares the schedule from diffusers' `set_timesteps` keyword arguments: a step count,
    /// or custom timesteps / sigmas, and `mu` for dynamically shifted flow-matching schedules.
    /// Schedulers that take only some of these refuse the others with an error naming them.
    fn set_timesteps_with(&mut self, spec: &TimestepsSpec) -> Result<()> {
        spec.reject_others(self.class_name(), &["timesteps"])?;
        match (spec.num_inference_steps, &spec.timesteps) {
            (Some(n), None) => self.set_timesteps(n),
            (None, Some(ts)) => self.set_custom_timesteps(ts),
            _ => Err(Error::invalid(format!(
                "{}: set_timesteps needs exactly one of num_inference_steps and timesteps",
                self.class_name()
            ))),
        }
    }

    /// Uses explicit timesteps (descending) where diffusers allows it.
    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        let _ = timesteps;
        Err(Error::invalid(format!(
            "{} does not support custom timesteps",
            self.class_name()
        )))
    }

    /// The timesteps of the current schedule, one per model evaluation.
    fn timesteps(&self) -> &[f64];

    /// The timestep that follows `t` in the current schedule, -1 after the last one
    /// (diffusers' `previous_timestep`).
    fn previous_timestep(&self, t: f64) -> Result<f64> {
        let ts = self.timesteps();
        match ts.iter().position(|&x| x == t) {
            Some(i) => Ok(ts.get(i + 1).copied().unwrap_or(-1.0)),
            None => Err(Error::invalid(format!(
                "{}: timestep {t} is not in the current schedule",
                self.class_name()
            ))),
        }
    }

    /// The sigmas of the current schedule, for sigma-parameterised schedulers.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    /// Standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64;

    /// Model evaluations per "step" in diffusers' sense (2 for Heun and KDPM2), used by img2img to
    /// cut the schedule.
    fn order(&self) -> usize {
        1
    }

    /// Scales the model input as the scheduler needs (k-diffusion samplers divide by
    /// sqrt(sigma² + 1)).
    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor>;

    /// One denoising step. Stochastic schedulers draw their noise from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput>;

    /// Noises `original` to the given timesteps (one per batch element).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor>;

    /// Where img2img starts in the schedule (diffusers' `set_begin_index`).
    fn set_begin_index(&mut self, begin_index: usize) {
        let _ = begin_index;
    }

    /// DDIM's `eta` (the amount of fresh noise per step); ignored by other schedulers.
    fn set_eta(&mut self, eta: f64) {
        let _ = eta;
    }

    /// The training noise schedule (cumulative alphas, one per training timestep); `None` for
    /// schedulers without a discrete variance-preserving schedule (flow matching, EDM).
    fn alphas_cumprod(&self) -> Option<&[f32]>;

    /// The training betas, recovered from `alphas_cumprod` (exact to f32 rounding).
    fn betas(&self) -> Option<Vec<f32>> {
        let acp = self.alphas_cumprod()?;
        Some(
            (0..acp.len())
                .map(|i| {
                    if i == 0 {
                        1.0 - acp[0]
                    } else {
                        1.0 - acp[i] / acp[i - 1]
                    }
                })
                .collect(),
        )
    }
}

/// Checks `num_inference_steps` against the training schedule.
pub(crate) fn check_steps(class: &str, n: usize, n_train: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid(format!(
            "{class}: num_inference_steps must be at least 1"
        )));
    }
    if n > n_train {
        return Err(Error::invalid(format!(
            "{class}: num_inference_steps ({n}) cannot be larger than num_train_timesteps ({n_train})"
        )));
    }
    Ok(())
}
