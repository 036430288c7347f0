//! Flow matching's schedule (shared by the flow-matching schedulers): sigmas in [0, 1] shifted
//! towards high noise by a fixed `shift` or by `mu` (`use_dynamic_shifting`), optionally respaced,
//! and the forward process `sigma * noise + (1 - sigma) * sample`.

use candle_core::Tensor;
use diffuse_core::{Error, Result};

use crate::common::{self, SigmaSpacing};
use crate::config::ConfigReader;
use crate::scheduler::TimestepsSpec;
use crate::sigma_schedule::SigmaState;

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
    /// `dynamic_fields`: whether the class has the dynamic-shifting fields (FlowMatchEuler does,
    /// FlowMatchHeun has only `num_train_timesteps` and `shift`).
    pub(crate) fn read(
        r: &mut ConfigReader,
        dynamic_fields: bool,
    ) -> Result<(Self, Vec<f64>, Vec<f32>)> {
        let n_train = r.usize("num_train_timesteps", 1000)?;
        r.ensure(n_train >= 2, "num_train_timesteps", "must be at least 2")?;
        let shift = r.f64("shift", 1.0)?;
        r.ensure(shift > 0.0, "shift", "must be positive")?;
        let (mut dynamic, mut shift_terminal, mut time_shift) =
            (false, None, TimeShift::Exponential);
        if dynamic_fields {
            dynamic = r.bool("use_dynamic_shifting", false)?;
            // Read by the pipelines that compute `mu` (see `calculate_shift`); recorded here.
            r.f64("base_shift", 0.5)?;
            r.f64("max_shift", 1.15)?;
            r.usize("base_image_seq_len", 256)?;
            r.usize("max_image_seq_len", 4096)?;
            shift_terminal = r.opt_f64("shift_terminal")?.filter(|&v| v != 0.0);
            if let Some(st) = shift_terminal {
                r.ensure(st < 1.0, "shift_terminal", "must be below 1")?;
            }
            if r.choice("time_shift_type", "exponential", &["exponential", "linear"])? == "linear" {
                time_shift = TimeShift::Linear;
            }
        }
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
