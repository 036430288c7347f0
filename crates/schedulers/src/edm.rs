//! What the EDM schedulers (EDM Euler, EDM DPM-Solver multistep) share: the EDM sigma schedule
//! (Karras rho or exponential between `sigma_min` and `sigma_max`) and EDM's preconditioning
//! (Karras et al. 2022, Table 1).

use candle_core::Tensor;
use diffuse_core::Result;

use crate::common::{self, mul_s, PredictionType};
use crate::config::ConfigReader;

pub(crate) struct EdmConfig {
    pub n_train: usize,
    sigma_min: f64,
    sigma_max: f64,
    sigma_data: f64,
    rho: f64,
    exponential: bool,
    pub prediction: PredictionType,
    pub final_sigma_min: bool,
    /// EDM Euler builds its Karras ramp in float64 and ends a `sigma_min` schedule on its last
    /// computed sigma; EDM DPM-Solver works in float32 and ends on the configured `sigma_min`.
    float64_ramp: bool,
}

impl EdmConfig {
    pub fn read(r: &mut ConfigReader, float64_ramp: bool) -> Result<Self> {
        let sigma_min = r.f64("sigma_min", 0.002)?;
        let sigma_max = r.f64("sigma_max", 80.0)?;
        r.ensure(
            0.0 < sigma_min && sigma_min < sigma_max,
            "sigma_min",
            "must be positive and below sigma_max",
        )?;
        let sigma_data = r.f64("sigma_data", 0.5)?;
        let exponential =
            r.choice("sigma_schedule", "karras", &["karras", "exponential"])? == "exponential";
        let n_train = r.usize("num_train_timesteps", 1000)?;
        r.ensure(n_train >= 2, "num_train_timesteps", "must be at least 2")?;
        let prediction = PredictionType::read(r)?;
        r.ensure(
            prediction != PredictionType::Sample,
            "prediction_type",
            "EDM schedulers support epsilon and v_prediction",
        )?;
        let rho = r.f64("rho", 7.0)?;
        let final_sigma_min =
            r.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        Ok(Self {
            n_train,
            sigma_min,
            sigma_max,
            sigma_data,
            rho,
            exponential,
            prediction,
            final_sigma_min,
            float64_ramp,
        })
    }

    /// Timesteps (c_noise = log(sigma) / 4) and sigmas (with the final one) for `n` steps.
    pub fn schedule(&self, n: usize) -> (Vec<f64>, Vec<f32>) {
        let ramp: Vec<f64> = if self.float64_ramp {
            common::torch_linspace_f64(0.0, 1.0, n)
        } else {
            common::torch_linspace_f32(0.0, 1.0, n)
                .into_iter()
                .map(f64::from)
                .collect()
        };
        self.schedule_on(&ramp)
    }

    /// The same on an explicit ramp in [0, 1].
    pub fn schedule_on(&self, ramp: &[f64]) -> (Vec<f64>, Vec<f32>) {
        let sigmas: Vec<f32> = if self.exponential {
            // torch.linspace(log min, log max, n) in float32, exp, flipped.
            let (lo, hi) = (self.sigma_min.ln() as f32, self.sigma_max.ln() as f32);
            let mut s: Vec<f32> = common::torch_linspace_f32(lo, hi, ramp.len())
                .into_iter()
                .map(f32::exp)
                .collect();
            s.reverse();
            s
        } else {
            let (min_inv, max_inv) = (
                self.sigma_min.powf(1.0 / self.rho),
                self.sigma_max.powf(1.0 / self.rho),
            );
            if self.float64_ramp {
                ramp.iter()
                    .map(|&r| (max_inv + r * (min_inv - max_inv)).powf(self.rho) as f32)
                    .collect()
            } else {
                let (max32, diff32, rho32) =
                    (max_inv as f32, (min_inv - max_inv) as f32, self.rho as f32);
                ramp.iter()
                    .map(|&r| (max32 + r as f32 * diff32).powf(rho32))
                    .collect()
            }
        };
        let timesteps = sigmas.iter().map(|&s| (0.25 * s.ln()) as f64).collect();
        let last = match (self.final_sigma_min, self.float64_ramp) {
            (false, _) => 0.0,
            (true, true) => sigmas[sigmas.len() - 1],
            (true, false) => self.sigma_min as f32,
        };
        let mut with_last = sigmas;
        with_last.push(last);
        (timesteps, with_last)
    }

    /// The schedule before `set_timesteps`: EDM Euler's ramp is `arange(N + 1) / N`, DPM-Solver's
    /// `linspace(0, 1, N)`.
    pub fn initial(&self) -> (Vec<f64>, Vec<f32>) {
        if self.float64_ramp {
            let n = self.n_train;
            let ramp: Vec<f64> = (0..=n).map(|i| i as f64 / n as f64).collect();
            self.schedule_on(&ramp)
        } else {
            let (ts, mut sig) = self.schedule(self.n_train);
            // DPM-Solver's initial schedule always ends with 0.
            *sig.last_mut().expect("non-empty") = 0.0;
            (ts, sig)
        }
    }

    pub fn init_noise_sigma(&self) -> f64 {
        (self.sigma_max * self.sigma_max + 1.0).sqrt()
    }

    /// `sample * c_in`, c_in = 1 / sqrt(sigma² + sigma_data²), in float32.
    pub fn precondition_inputs(&self, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        let sd = self.sigma_data as f32;
        mul_s(sample, 1.0 / (sigma * sigma + sd * sd).sqrt())
    }

    /// The denoised estimate c_skip * sample + c_out * model_output, in float32.
    pub fn precondition_outputs(
        &self,
        sample: &Tensor,
        model_output: &Tensor,
        sigma: f32,
    ) -> Result<Tensor> {
        let sd = self.sigma_data as f32;
        let s2 = sigma * sigma + sd * sd;
        let c_skip = sd * sd / s2;
        let c_out = sigma * sd / s2.sqrt();
        let c_out = if self.prediction == PredictionType::VPrediction {
            -c_out
        } else {
            c_out
        };
        Ok((mul_s(sample, c_skip)? + mul_s(model_output, c_out)?)?)
    }
}
