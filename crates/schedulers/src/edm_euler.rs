//! EDM Euler (Karras et al. 2022, "Elucidating the Design Space"): Euler steps in sigma on an
//! EDM schedule (Karras rho or exponential between `sigma_min` and `sigma_max`), with EDM's
//! preconditioning — inputs scaled by c_in, the denoiser c_skip x + c_out F(x), timesteps
//! c_noise = log(sigma) / 4.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::config::{ConfigReader, SchedulerConfig};
use crate::edm::EdmConfig;
use crate::scheduler::{check_steps, Scheduler, StepOutput};
use crate::sigma_schedule::{derivative, SigmaState};

const CLASS: &str = "EDMEulerScheduler";

pub struct EdmEulerScheduler {
    config: SchedulerConfig,
    edm: EdmConfig,
    state: SigmaState,
}

impl EdmEulerScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let edm = EdmConfig::read(&mut r, true)?;
        let (ts, sig) = edm.initial();
        Ok(Self {
            config: r.finish(),
            edm,
            state: SigmaState::new(ts, sig, false),
        })
    }
}

impl Scheduler for EdmEulerScheduler {
    crate::sigma_schedule::sigma_state_accessors!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.edm.n_train)?;
        let (ts, sig) = self.edm.schedule(n);
        self.state.reset(ts, sig);
        Ok(())
    }

    fn init_noise_sigma(&self) -> f64 {
        self.edm.init_noise_sigma()
    }

    fn scale_model_input(&mut self, sample: &Tensor, t: f64) -> Result<Tensor> {
        let i = self.state.step_index(CLASS, t)?;
        self.edm.precondition_inputs(sample, self.state.sigmas[i])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        _rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.state.step_index(CLASS, t)?;
        let sigma = self.state.sigmas[i];
        let sigma_next = *self.state.sigmas.get(i + 1).ok_or_else(|| {
            Error::invalid(format!("{CLASS}: step called past the end of the schedule"))
        })?;
        let x0 = self.edm.precondition_outputs(sample, model_output, sigma)?;
        let d = derivative(sample, &x0, sigma as f64)?;
        let prev = (sample + d.affine((sigma_next - sigma) as f64, 0.0)?)?;
        self.state.advance();
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        self.state.add_noise_ve(CLASS, original, noise, timesteps)
    }

    fn alphas_cumprod(&self) -> Option<&[f32]> {
        None
    }
}
