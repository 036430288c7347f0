//! Flow-matching Euler (rectified flow; SD3, Flux, ...): the model predicts the velocity
//! `noise - x0` and each step moves the sample along it, `x += (sigma_next - sigma) * v`, on a
//! sigma schedule in [0, 1] that is shifted towards high noise (a fixed `shift`, or `mu` given by
//! the pipeline from the image size when `use_dynamic_shifting` is on).

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{mul_s, SigmaSpacing};
use crate::config::{ConfigReader, SchedulerConfig};
pub use crate::flow_schedule::calculate_shift;
use crate::flow_schedule::{finish_schedule, flow_scale_noise, FlowShift};
use crate::scheduler::{check_steps, Scheduler, StepOutput, TimestepsSpec};
use crate::sigma_schedule::SigmaState;

const CLASS: &str = "FlowMatchEulerDiscreteScheduler";

pub struct FlowMatchEulerDiscreteScheduler {
    config: SchedulerConfig,
    flow: FlowShift,
    spacing: SigmaSpacing,
    invert_sigmas: bool,
    stochastic: bool,
    state: SigmaState,
}

impl FlowMatchEulerDiscreteScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let (flow, timesteps, sigmas) = FlowShift::read(&mut r, true)?;
        let invert_sigmas = r.bool("invert_sigmas", false)?;
        let spacing = SigmaSpacing::read(&mut r)?;
        let stochastic = r.bool("stochastic_sampling", false)?;
        Ok(Self {
            config: r.finish(),
            flow,
            spacing,
            invert_sigmas,
            stochastic,
            state: SigmaState::new(timesteps, sigmas, false),
        })
    }

    /// The shift used by later `set_timesteps` calls (diffusers' `set_shift`).
    pub fn set_shift(&mut self, shift: f64) {
        self.flow.shift = shift;
    }

    /// The forward process of flow matching, `sigma * noise + (1 - sigma) * sample`, with the
    /// sigma of each timestep (one per batch element, or one for the whole batch).
    pub fn scale_noise(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        noise: &Tensor,
    ) -> Result<Tensor> {
        flow_scale_noise(&self.state, CLASS, sample, timesteps, noise)
    }
}

impl Scheduler for FlowMatchEulerDiscreteScheduler {
    crate::sigma_schedule::sigma_state_accessors!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.flow.n_train)?;
        self.set_timesteps_with(&TimestepsSpec::steps(n))
    }

    fn set_timesteps_with(&mut self, spec: &TimestepsSpec) -> Result<()> {
        let (n, shifted) = self.flow.shifted(spec, CLASS)?;
        let (ts, sig) = finish_schedule(&self.flow, self.spacing, self.invert_sigmas, n, shifted);
        self.state.reset(ts, sig);
        Ok(())
    }

    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        self.set_timesteps_with(&TimestepsSpec::timesteps(timesteps.to_vec()))
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&mut self, sample: &Tensor, _t: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.state.step_index(CLASS, t)?;
        let sigma = self.state.sigmas[i];
        let sigma_next = *self.state.sigmas.get(i + 1).ok_or_else(|| {
            Error::invalid(format!("{CLASS}: step called past the end of the schedule"))
        })?;
        let prev = if self.stochastic {
            // Jump to the clean estimate, then re-noise it to sigma_next with fresh noise.
            let x0 = (sample - mul_s(model_output, sigma)?)?;
            let z = rng.randn_like(sample)?;
            (mul_s(&x0, 1.0 - sigma_next)? + mul_s(&z, sigma_next)?)?
        } else {
            (sample + mul_s(model_output, sigma_next - sigma)?)?
        };
        self.state.advance();
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: None,
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        self.scale_noise(original, timesteps, noise)
    }

    fn alphas_cumprod(&self) -> Option<&[f32]> {
        None
    }
}
