//! Flow-matching Euler (rectified flow; SD3, Flux, ...): the model predicts the velocity
//! `noise - x0` and each step moves the sample along it, `x += (sigma_next - sigma) * v`, on a
//! sigma schedule in [0, 1] that is shifted towards high noise (a fixed `shift`, or `mu` given by
//! the pipeline from the image size when `use_dynamic_shifting` is on).

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{self, mul_s};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::sigma_schedule::SigmaState;
use crate::{check_steps, Scheduler, StepOutput, TimestepsSpec};

const CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// How the sigmas are redistributed after shifting (`use_karras_sigmas` & co.).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SigmaSpacing {
    AsShifted,
    Karras,
    Exponential,
    Beta,
}

impl SigmaSpacing {
    /// Reads the three mutually exclusive `use_*_sigmas` flags.
    pub(crate) fn read(r: &mut ConfigReader) -> Result<Self> {
        let karras = r.bool("use_karras_sigmas", false)?;
        let exponential = r.bool("use_exponential_sigmas", false)?;
        let beta = r.bool("use_beta_sigmas", false)?;
        r.ensure(
            [karras, exponential, beta].iter().filter(|&&b| b).count() <= 1,
            "use_karras_sigmas",
            "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set",
        )?;
        Ok(if karras {
            Self::Karras
        } else if exponential {
            Self::Exponential
        } else if beta {
            Self::Beta
        } else {
            Self::AsShifted
        })
    }

    /// `n` sigmas between the first and last of `sigmas` (which are returned unchanged for
    /// `AsShifted`).
    pub(crate) fn apply(self, sigmas: Vec<f64>, n: usize) -> Vec<f64> {
        let (max, min) = (sigmas[0], sigmas[sigmas.len() - 1]);
        match self {
            Self::AsShifted => sigmas,
            Self::Karras => common::karras_sigmas(min, max, n),
            Self::Exponential => common::exponential_sigmas(min, max, n),
            Self::Beta => common::beta_sigmas(min, max, n),
        }
    }
}

/// The resolution-dependent shift of `use_dynamic_shifting`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimeShift {
    /// `e^mu / (e^mu + 1/t - 1)`.
    Exponential,
    /// `mu / (mu + 1/t - 1)`.
    Linear,
}

/// The settings that turn raw sigmas in (0, 1] into the shifted schedule; shared with
/// FlowMatchHeun.
#[derive(Clone, Debug)]
pub(crate) struct FlowShift {
    pub n_train: usize,
    pub shift: f64,
    dynamic: bool,
    time_shift: TimeShift,
    shift_terminal: Option<f64>,
    /// The ends of the initial schedule: sigma_max and sigma_min.
    pub sigma_max: f64,
    pub sigma_min: f64,
}

impl FlowShift {
    /// Reads `num_train_timesteps`, `shift` and the dynamic-shifting fields, and builds the
    /// initial (training-length) timesteps and sigmas, descending.
    pub(crate) fn read(r: &mut ConfigReader) -> Result<(Self, Vec<f64>, Vec<f32>)> {
        let n_train = r.usize("num_train_timesteps", 1000)?;
        r.ensure(n_train >= 2, "num_train_timesteps", "must be at least 2")?;
        let shift = r.f64("shift", 1.0)?;
        r.ensure(shift > 0.0, "shift", "must be positive")?;
        let dynamic = r.bool("use_dynamic_shifting", false)?;
        // Read by the pipelines that compute `mu` (see `calculate_shift`); recorded here.
        r.opt_f64("base_shift")?;
        r.opt_f64("max_shift")?;
        r.usize("base_image_seq_len", 256)?;
        r.usize("max_image_seq_len", 4096)?;
        let shift_terminal = r.opt_f64("shift_terminal")?.filter(|&v| v != 0.0);
        if let Some(st) = shift_terminal {
            r.ensure(st < 1.0, "shift_terminal", "must be below 1")?;
        }
        let time_shift = match r
            .choice("time_shift_type", "exponential", &["exponential", "linear"])?
            .as_str()
        {
            "linear" => TimeShift::Linear,
            _ => TimeShift::Exponential,
        };
        // torch f32: t / N, then the fixed shift unless it is applied per call.
        let shift32 = shift as f32;
        let shift_m1 = (shift - 1.0) as f32;
        let sigmas: Vec<f32> = (1..=n_train)
            .rev()
            .map(|t| {
                let s = t as f32 / n_train as f32;
                if dynamic {
                    s
                } else {
                    shift32 * s / (1.0 + shift_m1 * s)
                }
            })
            .collect();
        let timesteps = sigmas
            .iter()
            .map(|&s| (s * n_train as f32) as f64)
            .collect();
        let this = Self {
            n_train,
            shift,
            dynamic,
            time_shift,
            shift_terminal,
            sigma_max: sigmas[0] as f64,
            sigma_min: sigmas[n_train - 1] as f64,
        };
        Ok((this, timesteps, sigmas))
    }

    /// The shifted sigmas for a `set_timesteps` call, before the `use_*_sigmas` respacing.
    /// diffusers works in float64 on its own linspace and in float32 on given sigmas or
    /// timesteps; both are reproduced.
    pub(crate) fn shifted(&self, spec: &TimestepsSpec, class: &str) -> Result<(usize, Shifted)> {
        if self.dynamic && spec.mu.is_none() {
            return Err(Error::invalid(format!(
                "{class}: mu must be given to set_timesteps when use_dynamic_shifting is on"
            )));
        }
        let n = match (&spec.sigmas, &spec.timesteps, spec.num_inference_steps) {
            (Some(s), Some(t), _) if s.len() != t.len() => {
                return Err(Error::invalid(format!(
                    "{class}: sigmas ({}) and timesteps ({}) must have the same length",
                    s.len(),
                    t.len()
                )))
            }
            (s, t, Some(n))
                if s.as_ref().is_some_and(|s| s.len() != n)
                    || t.as_ref().is_some_and(|t| t.len() != n) =>
            {
                return Err(Error::invalid(format!(
                    "{class}: custom sigmas / timesteps must have num_inference_steps ({n}) values"
                )))
            }
            (_, _, Some(n)) => n,
            (Some(s), _, None) => s.len(),
            (None, Some(t), None) => t.len(),
            (None, None, None) => {
                return Err(Error::invalid(format!(
                    "{class}: set_timesteps needs num_inference_steps, sigmas or timesteps"
                )))
            }
        };
        if n == 0 {
            return Err(Error::invalid(format!(
                "{class}: num_inference_steps must be at least 1"
            )));
        }
        let n_train = self.n_train as f64;
        let mu = spec.mu.unwrap_or(0.0);
        let custom_ts = spec
            .timesteps
            .as_ref()
            .map(|t| t.iter().map(|&v| v as f32).collect::<Vec<f32>>());
        let given: Option<Vec<f32>> = match (&spec.sigmas, &custom_ts) {
            (Some(s), _) => Some(s.iter().map(|&v| v as f32).collect()),
            (None, Some(t)) => Some(t.iter().map(|&v| v / self.n_train as f32).collect()),
            (None, None) => None,
        };
        let sigmas = match given {
            // numpy float32 arithmetic (Python scalars are cast to float32 first).
            Some(raw) => {
                let mut s: Vec<f32> = if self.dynamic {
                    raw.iter().map(|&t| self.time_shift_f32(mu, t)).collect()
                } else {
                    self.fixed_shift_f32(&raw)
                };
                if let Some(st) = self.shift_terminal {
                    let scale = (1.0 - s[n - 1]) / (1.0 - st) as f32;
                    s = s.iter().map(|&t| 1.0 - (1.0 - t) / scale).collect();
                }
                s.into_iter().map(f64::from).collect()
            }
            None => {
                let ts = common::linspace(self.sigma_max * n_train, self.sigma_min * n_train, n);
                let mut s: Vec<f64> = ts.iter().map(|&t| t / n_train).collect();
                s = s.into_iter().map(|t| self.shift_one(t, mu)).collect();
                if let Some(st) = self.shift_terminal {
                    let scale = (1.0 - s[n - 1]) / (1.0 - st);
                    s = s.iter().map(|&t| 1.0 - (1.0 - t) / scale).collect();
                }
                s
            }
        };
        Ok((
            n,
            Shifted {
                sigmas,
                timesteps: custom_ts,
            },
        ))
    }

    /// The float64 shift of one raw sigma.
    fn shift_one(&self, t: f64, mu: f64) -> f64 {
        if self.dynamic {
            match self.time_shift {
                TimeShift::Exponential => mu.exp() / (mu.exp() + (1.0 / t - 1.0)),
                TimeShift::Linear => mu / (mu + (1.0 / t - 1.0)),
            }
        } else {
            self.shift * t / (1.0 + (self.shift - 1.0) * t)
        }
    }

    fn time_shift_f32(&self, mu: f64, t: f32) -> f32 {
        let m = match self.time_shift {
            TimeShift::Exponential => mu.exp() as f32,
            TimeShift::Linear => mu as f32,
        };
        m / (m + (1.0 / t - 1.0))
    }

    fn fixed_shift_f32(&self, s: &[f32]) -> Vec<f32> {
        let (a, b) = (self.shift as f32, (self.shift - 1.0) as f32);
        s.iter().map(|&t| a * t / (1.0 + b * t)).collect()
    }
}

/// The shifted sigmas of one `set_timesteps` call, and the custom timesteps if any were given.
pub(crate) struct Shifted {
    pub sigmas: Vec<f64>,
    pub timesteps: Option<Vec<f32>>,
}

/// `mu` for an image of `image_seq_len` latent tokens, interpolated linearly between
/// (`base_seq_len`, `base_shift`) and (`max_seq_len`, `max_shift`), as the Flux / SD3 pipelines
/// compute it.
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: usize,
    max_seq_len: usize,
    base_shift: f64,
    max_shift: f64,
) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

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
        let (flow, timesteps, sigmas) = FlowShift::read(&mut r)?;
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

/// `sigma * noise + (1 - sigma) * sample` with the sigmas looked up like the k-diffusion
/// schedulers' `add_noise`.
pub(crate) fn flow_scale_noise(
    state: &SigmaState,
    class: &str,
    sample: &Tensor,
    timesteps: &[f64],
    noise: &Tensor,
) -> Result<Tensor> {
    let sigmas = state.noise_sigmas(class, timesteps)?;
    let keep: Vec<f64> = sigmas.iter().map(|&s| (1.0 - s as f32) as f64).collect();
    common::per_batch_lin2(sample, noise, &keep, &sigmas)
}

/// The final schedule from shifted sigmas: respaced, float32, timesteps = sigma * N (or the
/// given ones), inverted if asked, with the final sigma appended.
pub(crate) fn finish_schedule(
    flow: &FlowShift,
    spacing: SigmaSpacing,
    invert: bool,
    n: usize,
    shifted: Shifted,
) -> (Vec<f64>, Vec<f32>) {
    let n_train = flow.n_train as f32;
    let mut sigmas: Vec<f32> = spacing
        .apply(shifted.sigmas, n)
        .into_iter()
        .map(|s| s as f32)
        .collect();
    let mut timesteps: Vec<f32> = match shifted.timesteps {
        Some(t) => t,
        None => sigmas.iter().map(|&s| s * n_train).collect(),
    };
    let last = if invert {
        sigmas = sigmas.iter().map(|&s| 1.0 - s).collect();
        timesteps = sigmas.iter().map(|&s| s * n_train).collect();
        1.0
    } else {
        0.0
    };
    sigmas.push(last);
    (timesteps.into_iter().map(f64::from).collect(), sigmas)
}

impl Scheduler for FlowMatchEulerDiscreteScheduler {
    crate::common::sigma_state_accessors!();

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
