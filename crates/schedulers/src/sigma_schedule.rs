//! State shared by the sigma-parameterised schedulers (Euler, Euler ancestral, Heun, LMS,
//! KDPM2, DPM-Solver, UniPC): the current timesteps and sigmas and where the loop stands.

use candle_core::Tensor;
use diffuse_core::Result;

use crate::common::{self, sigma_to_t, NoiseSchedule, SigmaSpacing, Spacing};

#[derive(Clone, Debug)]
pub(crate) struct SigmaState {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub step_index: Option<usize>,
    pub begin_index: Option<usize>,
    /// DPM-Solver and UniPC map a timestep that is not in the schedule to the last step.
    pub missing_is_last: bool,
}

impl SigmaState {
    pub fn new(timesteps: Vec<f64>, sigmas: Vec<f32>, missing_is_last: bool) -> Self {
        Self {
            timesteps,
            sigmas,
            step_index: None,
            begin_index: None,
            missing_is_last,
        }
    }

    pub fn reset(&mut self, timesteps: Vec<f64>, sigmas: Vec<f32>) {
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.step_index = None;
        self.begin_index = None;
    }

    fn index_of(&self, class: &str, t: f64) -> Result<usize> {
        match common::index_for_timestep(&self.timesteps, t) {
            Some(i) => Ok(i),
            None if self.missing_is_last => Ok(self.timesteps.len().saturating_sub(1)),
            None => Err(common::timestep_not_found(class, t)),
        }
    }

    /// The current step index, found from the timestep on the first call of a loop.
    pub fn step_index(&mut self, class: &str, t: f64) -> Result<usize> {
        if let Some(i) = self.step_index {
            return Ok(i);
        }
        let i = match self.begin_index {
            Some(b) => b,
            None => self.index_of(class, t)?,
        };
        self.step_index = Some(i);
        Ok(i)
    }

    pub fn advance(&mut self) {
        if let Some(i) = self.step_index.as_mut() {
            *i += 1;
        }
    }

    pub fn sigma(&self, i: usize) -> f64 {
        self.sigmas.get(i).copied().unwrap_or(0.0) as f64
    }

    /// The sigma of each timestep for `add_noise`, as diffusers picks them: by lookup in a fresh
    /// loop, else the current step (inpainting), else the begin index (img2img).
    pub fn noise_sigmas(&self, class: &str, timesteps: &[f64]) -> Result<Vec<f64>> {
        timesteps
            .iter()
            .map(|&t| {
                let i = match (self.begin_index, self.step_index) {
                    (None, _) => self.index_of(class, t)?,
                    (Some(_), Some(s)) => s,
                    (Some(b), None) => b,
                };
                Ok(self.sigma(i))
            })
            .collect()
    }

    /// `x + sigma(t) * noise` (variance-exploding parameterisation).
    pub fn add_noise_ve(
        &self,
        class: &str,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &[f64],
    ) -> Result<Tensor> {
        let s = self.noise_sigmas(class, timesteps)?;
        common::per_batch_lin2(original, noise, &vec![1.0; s.len()], &s)
    }

    /// `init_noise_sigma` of the k-diffusion schedulers.
    pub fn k_init_noise_sigma(&self, spacing: Spacing) -> f64 {
        let max = self.sigmas.iter().copied().fold(f32::MIN, f32::max);
        match spacing {
            Spacing::Linspace | Spacing::Trailing => max as f64,
            Spacing::Leading => (max * max + 1.0).sqrt() as f64,
        }
    }
}

/// The training-timestep sigmas and their logs as numpy computes them (float32 arrays).
pub(crate) fn train_sigmas_and_logs(noise: &NoiseSchedule) -> (Vec<f32>, Vec<f64>) {
    let s = noise.train_sigmas();
    let logs = s.iter().map(|v| v.ln() as f64).collect();
    (s, logs)
}

/// The initial state of the k-diffusion schedulers before `set_timesteps`: every training
/// timestep, descending, with its sigma, and a final 0.
pub(crate) fn k_initial(noise: &NoiseSchedule) -> (Vec<f64>, Vec<f32>) {
    let n = noise.len();
    let ts = common::linspace(0.0, (n - 1) as f64, n)
        .into_iter()
        .rev()
        .map(|t| t as f32 as f64)
        .collect();
    let mut sig: Vec<f32> = noise.train_sigmas().into_iter().rev().collect();
    sig.push(0.0);
    (ts, sig)
}

/// The config fields every k-diffusion scheduler (Euler, Euler ancestral, Heun, LMS, KDPM2,
/// KDPM2 ancestral) reads, and their schedule.
pub(crate) struct KConfig {
    pub noise: NoiseSchedule,
    pub prediction: crate::common::PredictionType,
    pub spacing: Spacing,
    pub steps_offset: usize,
    /// `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas`.
    pub respacing: SigmaSpacing,
    /// Euler's `sigma_min` / `sigma_max`: the ends of a respaced schedule, when set.
    pub sigma_bounds: (Option<f64>, Option<f64>),
    /// Euler's `interpolation_type="log_linear"`: n + 1 sigmas evenly spaced in log sigma.
    pub log_linear: bool,
}

impl KConfig {
    /// Reads the shared fields; `respacing` says whether the class has the `use_*_sigmas` flags.
    pub fn read(
        r: &mut crate::config::ConfigReader,
        zero_snr: bool,
        respacing: bool,
    ) -> Result<Self> {
        let noise =
            NoiseSchedule::read(r, 0.0001, 0.02, "linear", zero_snr)?.finite_terminal_sigma();
        let prediction = crate::common::PredictionType::read(r)?;
        let respacing = if respacing {
            SigmaSpacing::read(r)?
        } else {
            SigmaSpacing::AsShifted
        };
        let spacing = Spacing::read(r, "linspace")?;
        let steps_offset = r.usize("steps_offset", 0)?;
        Ok(Self {
            noise,
            prediction,
            spacing,
            steps_offset,
            respacing,
            sigma_bounds: (None, None),
            log_linear: false,
        })
    }

    /// Timesteps and sigmas (without the final one) for `n` steps, or for the given timesteps:
    /// sigmas interpolated at the (fractional) timesteps, or respaced sigmas whose timesteps are
    /// recovered by interpolation in log-sigma space (rounded for KDPM2's Karras schedules).
    pub fn schedule_raw(
        &self,
        class: &str,
        n: usize,
        given: Option<&[f64]>,
        round_karras_timesteps: bool,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let timesteps = match given {
            Some(ts) => {
                if self.respacing != SigmaSpacing::AsShifted {
                    return Err(diffuse_core::Error::invalid(format!(
                        "{class}: custom timesteps cannot be used with use_karras_sigmas, \
                         use_exponential_sigmas or use_beta_sigmas"
                    )));
                }
                if ts.is_empty() {
                    return Err(diffuse_core::Error::invalid(format!(
                        "{class}: custom timesteps must not be empty"
                    )));
                }
                ts.iter().map(|&t| t as f32 as f64).collect()
            }
            None => common::float_timesteps(self.spacing, self.noise.len(), n, self.steps_offset),
        };
        let n = timesteps.len();
        let (train, logs) = train_sigmas_and_logs(&self.noise);
        let sigmas: Vec<f64> = if self.log_linear {
            let (lo, hi) = (train[0].ln(), train[train.len() - 1].ln());
            common::torch_linspace_f32(hi, lo, n + 1)
                .into_iter()
                .map(|l| l.exp() as f64)
                .collect()
        } else {
            timesteps
                .iter()
                .map(|&t| common::interp_index(t, &train))
                .collect()
        };
        let min = self.sigma_bounds.0.unwrap_or(sigmas[sigmas.len() - 1]);
        let max = self.sigma_bounds.1.unwrap_or(sigmas[0]);
        let Some(respaced) = self.respacing.between(min, max, n) else {
            return Ok((timesteps, sigmas));
        };
        let round = round_karras_timesteps && self.respacing == SigmaSpacing::Karras;
        let ts = respaced
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &logs);
                let t = if round { common::round_half_even(t) } else { t };
                t as f32 as f64
            })
            .collect();
        Ok((ts, respaced))
    }

    /// Timesteps and sigmas (with a final 0) for `n` steps.
    pub fn schedule(&self, n: usize, round_karras_timesteps: bool) -> (Vec<f64>, Vec<f32>) {
        let (ts, sig) = self
            .schedule_raw("", n, None, round_karras_timesteps)
            .expect("a computed schedule");
        (ts, with_final(&sig, 0.0))
    }
}

/// The sigmas as float32 with `last` appended.
pub(crate) fn with_final(sigmas: &[f64], last: f32) -> Vec<f32> {
    sigmas
        .iter()
        .map(|&s| s as f32)
        .chain(std::iter::once(last))
        .collect()
}

/// `cat([head, middle.repeat_interleave(2), tail])`.
pub(crate) fn interleave<T: Copy>(head: &[T], middle: &[T], tail: &[T]) -> Vec<T> {
    head.iter()
        .copied()
        .chain(middle.iter().flat_map(|&x| [x, x]))
        .chain(tail.iter().copied())
        .collect()
}

/// The `Scheduler` methods every k-diffusion scheduler shares (fields `config`, `k`, `state`
/// and a `CLASS` constant), so each file holds only what makes that sampler different.
macro_rules! k_scheduler_common {
    () => {
        $crate::sigma_schedule::sigma_state_accessors!();

        fn init_noise_sigma(&self) -> f64 {
            self.state.k_init_noise_sigma(self.k.spacing)
        }

        fn add_noise(
            &self,
            original: &Tensor,
            noise: &Tensor,
            timesteps: &[f64],
        ) -> Result<Tensor> {
            self.state.add_noise_ve(CLASS, original, noise, timesteps)
        }

        fn alphas_cumprod(&self) -> Option<&[f32]> {
            Some(&self.k.noise.alphas_cumprod)
        }

        fn betas(&self) -> Option<Vec<f32>> {
            Some(self.k.noise.betas.clone())
        }
    };
}
pub(crate) use k_scheduler_common;

/// The `Scheduler` accessors of the schedulers that keep a sigma schedule state (`state` with
/// `timesteps`, `sigmas`, `begin_index`) next to `config` and a `CLASS` constant: the
/// k-diffusion schedulers and the multistep solvers.
macro_rules! sigma_state_accessors {
    () => {
        fn class_name(&self) -> &'static str {
            CLASS
        }

        fn config(&self) -> &SchedulerConfig {
            &self.config
        }

        fn timesteps(&self) -> &[f64] {
            &self.state.timesteps
        }

        fn sigmas(&self) -> Option<&[f32]> {
            Some(&self.state.sigmas)
        }

        fn set_begin_index(&mut self, begin_index: usize) {
            self.state.begin_index = Some(begin_index);
        }
    };
}
pub(crate) use sigma_state_accessors;

/// `sample / sqrt(sigma² + 1)`: the k-diffusion input scaling (sigma as an f32 like diffusers).
pub(crate) fn k_scale_input(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok(sample.affine(1.0 / ((sigma * sigma + 1.0).sqrt() as f64), 0.0)?)
}

/// The derivative d = (x - x0) / sigma.
pub(crate) fn derivative(sample: &Tensor, x0: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(((sample - x0)? / sigma)?)
}

/// One Euler step `x + d * dt` with `d = (x - x0) / sigma`.
pub(crate) fn euler_update(sample: &Tensor, x0: &Tensor, sigma: f64, dt: f64) -> Result<Tensor> {
    Ok((sample + derivative(sample, x0, sigma)?.affine(dt, 0.0)?)?)
}
