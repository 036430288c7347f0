//! Flow-matching Heun: the second-order version of flow-matching Euler — an Euler step along
//! the predicted velocity, then a correction with the velocity at the end of the step. Two model
//! evaluations per step (the last step is a plain Euler step to sigma 0).

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{mul_s, SigmaSpacing};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::flow_schedule::{finish_schedule, flow_scale_noise, FlowShift};
use crate::scheduler::{check_steps, Scheduler, StepOutput, TimestepsSpec};
use crate::sigma_schedule::{interleave, SigmaState};

const CLASS: &str = "FlowMatchHeunDiscreteScheduler";

pub struct FlowMatchHeunDiscreteScheduler {
    config: SchedulerConfig,
    flow: FlowShift,
    state: SigmaState,
    /// The first half of a step: its derivative, dt and starting sample.
    pending: Option<(Tensor, f32, Tensor)>,
}

impl FlowMatchHeunDiscreteScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let (flow, timesteps, sigmas) = FlowShift::read(&mut r, false)?;
        Ok(Self {
            config: r.finish(),
            flow,
            state: SigmaState::new(timesteps, sigmas, false),
            pending: None,
        })
    }

    /// The forward process `sigma * noise + (1 - sigma) * sample` at the given timesteps.
    pub fn scale_noise(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        noise: &Tensor,
    ) -> Result<Tensor> {
        flow_scale_noise(&self.state, CLASS, sample, timesteps, noise)
    }
}

impl Scheduler for FlowMatchHeunDiscreteScheduler {
    crate::sigma_schedule::sigma_state_accessors!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.flow.n_train)?;
        let (n, shifted) = self.flow.shifted(&TimestepsSpec::steps(n), CLASS)?;
        let (ts, sig) = finish_schedule(&self.flow, SigmaSpacing::AsShifted, false, n, shifted);
        // Every sigma but the first and last is visited twice (predictor, corrector).
        let sigmas = interleave(&sig[..1], &sig[1..sig.len() - 1], &sig[sig.len() - 1..]);
        let timesteps = interleave(&ts[..1], &ts[1..], &[]);
        self.state.reset(timesteps, sigmas);
        self.pending = None;
        Ok(())
    }

    fn order(&self) -> usize {
        2
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
        _rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.state.step_index(CLASS, t)?;
        let sigma_at = |j: usize| -> Result<f32> {
            self.state.sigmas.get(j).copied().ok_or_else(|| {
                Error::invalid(format!("{CLASS}: step called past the end of the schedule"))
            })
        };
        // In torch's order: denoised = x - v * sigma, derivative = (x - denoised) / sigma.
        let prev = match self.pending.take() {
            None => {
                let (sigma, sigma_next) = (sigma_at(i)?, sigma_at(i + 1)?);
                let denoised = (sample - mul_s(model_output, sigma)?)?;
                let d = crate::common::div_s(&(sample - denoised)?, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (sample + mul_s(&d, dt)?)?;
                self.pending = Some((d, dt, sample.clone()));
                prev
            }
            Some((d_prev, dt, start)) => {
                let sigma_next = sigma_at(i)?;
                let denoised = (sample - mul_s(model_output, sigma_next)?)?;
                let d = crate::common::div_s(&(sample - denoised)?, sigma_next)?;
                let d = mul_s(&(d_prev + d)?, 0.5)?;
                (start + mul_s(&d, dt)?)?
            }
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
