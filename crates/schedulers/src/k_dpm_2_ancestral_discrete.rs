//! KDPM2 ancestral ("DPM2 a"; k-diffusion's `sample_dpm_2_ancestral`): each step splits the
//! move to the next sigma into a deterministic part down to sigma_down, taken with KDPM2's
//! midpoint method, and fresh noise of sigma_up. Two model evaluations per step.

use candle_core::Tensor;
use diffuse_core::{NoiseSource, Result};

use crate::common::{self, sigma_to_t};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::scheduler::{check_steps, Scheduler, StepOutput};
use crate::sigma_schedule::{
    derivative, interleave, k_initial, k_scale_input, k_scheduler_common, train_sigmas_and_logs,
    KConfig, SigmaState,
};

const CLASS: &str = "KDPM2AncestralDiscreteScheduler";

pub struct Kdpm2AncestralDiscreteScheduler {
    config: SchedulerConfig,
    k: KConfig,
    state: SigmaState,
    /// Per model evaluation (interleaved like the sigmas): the midpoint sigma, and the up / down
    /// split of the step that starts there.
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    /// The sample at the start of a step while its second half is pending.
    pending: Option<Tensor>,
}

impl Kdpm2AncestralDiscreteScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let k = KConfig::read(&mut r, false, true)?;
        r.ensure(
            k.prediction != common::PredictionType::Sample,
            "prediction_type",
            "sample is not supported",
        )?;
        let (ts, sig) = k_initial(&k.noise);
        let n_train = k.noise.len();
        let mut s = Self {
            config: r.finish(),
            k,
            state: SigmaState::new(ts, sig, false),
            sigmas_interpol: vec![],
            sigmas_up: vec![],
            sigmas_down: vec![],
            pending: None,
        };
        // diffusers starts from the full training-length schedule.
        s.set_timesteps(n_train)?;
        Ok(s)
    }
}

/// `cat([x[:1], x[1:].repeat_interleave(2), x[-1:]])`.
fn per_evaluation(x: &[f32]) -> Vec<f32> {
    interleave(&x[..1], &x[1..], &x[x.len() - 1..])
}

impl Scheduler for Kdpm2AncestralDiscreteScheduler {
    k_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.k.noise.len())?;
        let (ts, sig) = self.k.schedule(n, true);
        let len = sig.len();
        // In float32 as torch computes them; the last entries (sigma 0) come out NaN or 0 and
        // are never used but for the final Euler step to 0.
        let mut up = vec![0f32; len];
        let mut down = vec![0f32; len];
        for i in 0..len {
            let (s, next) = (sig[i], if i + 1 < len { sig[i + 1] } else { 0.0 });
            up[i] = (next * next * (s * s - next * next) / (s * s)).sqrt();
            down[i] = (next * next - up[i] * up[i]).sqrt();
        }
        down[len - 1] = 0.0;
        let mut interp: Vec<f32> = (0..len)
            .map(|i| {
                let (a, b) = (sig[i].ln(), down[i].ln());
                (b - (b - a) * 0.5).exp()
            })
            .collect();
        interp[len - 2] = 0.0;
        interp[len - 1] = 0.0;
        let (_, logs) = train_sigmas_and_logs(&self.k.noise);
        let mut timesteps = vec![ts[0]];
        for i in 1..n {
            timesteps.push(sigma_to_t(interp[i - 1] as f64, &logs) as f32 as f64);
            timesteps.push(ts[i]);
        }
        self.sigmas_interpol = per_evaluation(&interp);
        self.sigmas_up = per_evaluation(&up);
        self.sigmas_down = per_evaluation(&down);
        self.state.reset(timesteps, per_evaluation(&sig));
        self.pending = None;
        Ok(())
    }

    fn order(&self) -> usize {
        2
    }

    fn scale_model_input(&mut self, sample: &Tensor, t: f64) -> Result<Tensor> {
        let i = self.state.step_index(CLASS, t)?;
        let sigma = if self.pending.is_none() {
            self.state.sigmas[i]
        } else {
            self.sigmas_interpol[i - 1]
        };
        k_scale_input(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.state.step_index(CLASS, t)?;
        // The first half of a step reads the entries at i, the second those at i - 1.
        let j = if self.pending.is_none() { i } else { i - 1 };
        let sigma = self.state.sigmas[j] as f64;
        let sigma_interpol = self.sigmas_interpol[j] as f64;
        let sigma_input = if self.pending.is_none() {
            sigma
        } else {
            sigma_interpol
        };
        let x0 = common::sigma_denoised(self.k.prediction, model_output, sample, sigma_input)?;
        let prev = match self.pending.take() {
            None => {
                let d = derivative(sample, &x0, sigma)?;
                self.pending = Some(sample.clone());
                (sample + d.affine(sigma_interpol - sigma, 0.0)?)?
            }
            Some(start) => {
                let d = derivative(sample, &x0, sigma_interpol)?;
                let dt = self.sigmas_down[j] as f64 - sigma;
                let z = rng.randn_like(model_output)?;
                ((start + d.affine(dt, 0.0)?)? + z.affine(self.sigmas_up[j] as f64, 0.0)?)?
            }
        };
        self.state.advance();
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }
}
