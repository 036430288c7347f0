//! LMS: the linear multistep method in sigma space (k-diffusion's `sample_lms`), combining up
//! to four past derivatives with weights from integrating their Lagrange basis polynomials.

use std::collections::VecDeque;

use candle_core::Tensor;
use diffuse_core::{NoiseSource, Result};

use crate::common;
use crate::config::{ConfigReader, SchedulerConfig};
use crate::scheduler::{check_steps, Scheduler, StepOutput};
use crate::sigma_schedule::{
    derivative, k_initial, k_scale_input, k_scheduler_common, KConfig, SigmaState,
};

const CLASS: &str = "LMSDiscreteScheduler";
const ORDER: usize = 4;

pub struct LmsDiscreteScheduler {
    config: SchedulerConfig,
    k: KConfig,
    state: SigmaState,
    derivatives: VecDeque<Tensor>,
}

impl LmsDiscreteScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let k = KConfig::read(&mut r, false, true)?;
        let (ts, sig) = k_initial(&k.noise);
        let n_train = k.noise.len();
        let mut s = Self {
            config: r.finish(),
            k,
            state: SigmaState::new(ts, sig, false),
            derivatives: VecDeque::new(),
        };
        // diffusers starts from the full training-length schedule (respaced, if configured).
        s.set_timesteps(n_train)?;
        Ok(s)
    }

    /// ∫ from sigma[i] to sigma[i+1] of the Lagrange basis polynomial of node `j` over the nodes
    /// sigma[i], sigma[i-1], …, sigma[i-order+1]. Exact (diffusers integrates numerically; its
    /// quadrature is exact for these degrees up to rounding).
    fn coefficient(&self, order: usize, i: usize, j: usize) -> f64 {
        let s = |k: usize| self.state.sigma(i - k);
        // Polynomial coefficients, lowest degree first.
        let mut poly = vec![1.0f64];
        for k in (0..order).filter(|&k| k != j) {
            let denom = s(j) - s(k);
            let mut next = vec![0.0; poly.len() + 1];
            for (d, &c) in poly.iter().enumerate() {
                next[d + 1] += c / denom;
                next[d] -= c * s(k) / denom;
            }
            poly = next;
        }
        let antiderivative = |x: f64| {
            poly.iter()
                .enumerate()
                .map(|(d, &c)| c * x.powi(d as i32 + 1) / (d + 1) as f64)
                .sum::<f64>()
        };
        antiderivative(self.state.sigma(i + 1)) - antiderivative(self.state.sigma(i))
    }
}

impl Scheduler for LmsDiscreteScheduler {
    k_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.k.noise.len())?;
        let (ts, sig) = self.k.schedule(n, false);
        self.state.reset(ts, sig);
        self.derivatives.clear();
        Ok(())
    }

    fn scale_model_input(&mut self, sample: &Tensor, t: f64) -> Result<Tensor> {
        let i = self.state.step_index(CLASS, t)?;
        k_scale_input(sample, self.state.sigmas[i])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        _rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.state.step_index(CLASS, t)?;
        let sigma = self.state.sigma(i);
        let x0 = common::sigma_denoised(self.k.prediction, model_output, sample, sigma)?;
        self.derivatives.push_back(derivative(sample, &x0, sigma)?);
        if self.derivatives.len() > ORDER {
            self.derivatives.pop_front();
        }
        // The order follows the step index even when fewer derivatives are stored (a loop started
        // mid-schedule): diffusers then weights the derivatives it has with the coefficients of
        // the higher-order formula.
        let order = (i + 1).min(ORDER);
        let mut prev = sample.clone();
        for (j, d) in self.derivatives.iter().rev().take(order).enumerate() {
            prev = (prev + d.affine(self.coefficient(order, i, j), 0.0)?)?;
        }
        self.state.advance();
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }
}
