//! Diffusion schedulers at parity with Hugging Face diffusers.
//!
//! One file per scheduler, all behind the [`Scheduler`] trait, so any scheduler plugs into any
//! pipeline. Each is built from a diffusers `scheduler_config.json` (also one saved by another
//! scheduler class, as `from_config` allows) with [`from_config`], or by name — diffusers class
//! names and the usual AUTOMATIC1111 names ("Euler a", "DPM++ 2M Karras", ...) — with
//! [`from_name`].

pub mod common;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpmsolver_multistep;
pub mod euler_ancestral_discrete;
pub mod euler_discrete;
pub mod flow_match_euler_discrete;
pub mod heun_discrete;
pub mod k_dpm_2_discrete;
pub mod lcm;
pub mod lms_discrete;
pub mod pndm;
mod sigma_schedule;
pub mod unipc_multistep;

use candle_core::Tensor;
pub use config::SchedulerConfig;
use diffuse_core::{Error, NoiseSource, Result};

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

/// Every scheduler class this crate implements.
pub const CLASS_NAMES: &[&str] = &[
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
    "FlowMatchEulerDiscreteScheduler",
];

/// Builds the scheduler `class` from a config (of any scheduler class: unknown keys are
/// ignored and absent keys take `class`'s defaults).
pub fn from_config(class: &str, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    Ok(match class {
        "DDPMScheduler" => Box::new(ddpm::DdpmScheduler::new(config)?),
        "DDIMScheduler" => Box::new(ddim::DdimScheduler::new(config)?),
        "PNDMScheduler" => Box::new(pndm::PndmScheduler::new(config)?),
        "EulerDiscreteScheduler" => Box::new(euler_discrete::EulerDiscreteScheduler::new(config)?),
        "EulerAncestralDiscreteScheduler" => {
            Box::new(euler_ancestral_discrete::EulerAncestralDiscreteScheduler::new(config)?)
        }
        "HeunDiscreteScheduler" => Box::new(heun_discrete::HeunDiscreteScheduler::new(config)?),
        "LMSDiscreteScheduler" => Box::new(lms_discrete::LmsDiscreteScheduler::new(config)?),
        "KDPM2DiscreteScheduler" => {
            Box::new(k_dpm_2_discrete::Kdpm2DiscreteScheduler::new(config)?)
        }
        "DPMSolverMultistepScheduler" => Box::new(
            dpmsolver_multistep::DpmSolverMultistepScheduler::new(config)?,
        ),
        "UniPCMultistepScheduler" => {
            Box::new(unipc_multistep::UniPcMultistepScheduler::new(config)?)
        }
        "LCMScheduler" => Box::new(lcm::LcmScheduler::new(config)?),
        "FlowMatchEulerDiscreteScheduler" => {
            Box::new(flow_match_euler_discrete::FlowMatchEulerDiscreteScheduler::new(config)?)
        }
        other => {
            return Err(Error::invalid(format!(
                "unknown scheduler class {other:?}; known: {}",
                CLASS_NAMES.join(", ")
            )))
        }
    })
}

/// Builds the scheduler named in the config's own `_class_name`.
pub fn from_own_config(config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    let class = config
        .class_name()
        .ok_or_else(|| Error::config("scheduler config", "_class_name", "missing"))?
        .to_string();
    from_config(&class, config)
}

/// A scheduler name as users type it: a diffusers class name (with or without the
/// `Scheduler` suffix) or an AUTOMATIC1111 sampler name. Returns the class and the config
/// overrides the name implies.
pub fn resolve_name(name: &str) -> Result<(&'static str, Vec<(&'static str, serde_json::Value)>)> {
    use serde_json::Value;
    let karras = || vec![("use_karras_sigmas", Value::Bool(true))];
    let key: String = name.trim().to_ascii_lowercase();
    let (class, overrides) = match key.as_str() {
        "euler a" | "euler_a" | "euler ancestral" | "k_euler_a" => {
            ("EulerAncestralDiscreteScheduler", vec![])
        }
        "euler" | "k_euler" => ("EulerDiscreteScheduler", vec![]),
        "euler karras" => ("EulerDiscreteScheduler", karras()),
        "heun" | "k_heun" => ("HeunDiscreteScheduler", vec![]),
        "heun karras" => ("HeunDiscreteScheduler", karras()),
        "lms" | "k_lms" => ("LMSDiscreteScheduler", vec![]),
        "lms karras" => ("LMSDiscreteScheduler", karras()),
        "dpm2" | "k_dpm_2" => ("KDPM2DiscreteScheduler", vec![]),
        "dpm2 karras" => ("KDPM2DiscreteScheduler", karras()),
        "dpm++ 2m" | "dpmpp_2m" | "dpm++2m" => ("DPMSolverMultistepScheduler", dpmpp_2m()),
        "dpm++ 2m karras" | "dpmpp_2m_karras" => {
            let mut o = dpmpp_2m();
            o.extend(karras());
            ("DPMSolverMultistepScheduler", o)
        }
        "ddim" => ("DDIMScheduler", vec![]),
        "ddpm" => ("DDPMScheduler", vec![]),
        "plms" | "pndm" => ("PNDMScheduler", vec![]),
        "unipc" => ("UniPCMultistepScheduler", vec![]),
        "lcm" => ("LCMScheduler", vec![]),
        _ => {
            let found = CLASS_NAMES.iter().find(|c| {
                let c = c.to_ascii_lowercase();
                c == key || c.trim_end_matches("scheduler") == key
            });
            match found {
                Some(c) => (*c, vec![]),
                None => {
                    return Err(Error::invalid(format!(
                        "unknown scheduler {name:?}; use a diffusers class ({}) or an A1111 name \
                         (Euler a, Euler, Heun, LMS, DPM2, DPM++ 2M, DPM++ 2M Karras, DDIM, PLMS, UniPC, LCM)",
                        CLASS_NAMES.join(", ")
                    )))
                }
            }
        }
    };
    Ok((class, overrides))
}

fn dpmpp_2m() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("algorithm_type", "dpmsolver++".into()),
        ("solver_order", 2.into()),
    ]
}

/// Builds a scheduler by user-facing name on top of a base config (e.g. the pipeline's own
/// scheduler config), as `Cls.from_config(pipe.scheduler.config)` does in diffusers.
pub fn from_name(name: &str, base: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    let (class, overrides) = resolve_name(name)?;
    let mut cfg = base.clone();
    for (k, v) in overrides {
        cfg.set(k, v);
    }
    from_config(class, &cfg)
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
