//! DEIS multistep (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential
//! Integrator"), the log-rho variant: the noise prediction is integrated exactly in rho =
//! sigma_t / alpha_t, interpolating past outputs by Lagrange polynomials in log rho. Orders 1–3.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{div_s, mul_s, NoiseSchedule, X0Clip};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::multistep::{
    solver_initial, solver_x0, Algorithm, SigmaKind, SolverOptions, SolverPrediction,
    SolverSchedule, SolverSigmas, UpdateCoefficients,
};
use crate::scheduler::{check_steps, Scheduler, StepOutput, TimestepsSpec};
use crate::sigma_schedule::{with_final, SigmaState};

const CLASS: &str = "DEISMultistepScheduler";

pub struct DeisMultistepScheduler {
    config: SchedulerConfig,
    sched: SolverSchedule,
    prediction: SolverPrediction,
    clip: X0Clip,
    solver_order: usize,
    lower_order_final: bool,
    state: SigmaState,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

/// The integral of the Lagrange basis polynomial (in log rho) of node `b` over the nodes
/// (b, c), from rho = `s` to `t`: `ind(t) - ind(s)` with diffusers' closed form, in float32.
fn coef2(t: f32, s: f32, b: f32, c: f32) -> f32 {
    let ind = |t: f32| t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln());
    ind(t) - ind(s)
}

/// The same over the nodes (b, c, d).
fn coef3(t: f32, s: f32, b: f32, c: f32, d: f32) -> f32 {
    let ind = |t: f32| {
        let (lt, lc, ld, lb) = (t.ln(), c.ln(), d.ln(), b.ln());
        let numerator = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
        numerator / ((lb - lc) * (lb - ld))
    };
    ind(t) - ind(s)
}

impl DeisMultistepScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let noise = NoiseSchedule::read(&mut r, 0.0001, 0.02, "linear", false)?;
        let solver_order = r.usize("solver_order", 2)?;
        r.ensure(
            (1..=3).contains(&solver_order),
            "solver_order",
            "must be 1, 2 or 3",
        )?;
        let prediction = SolverPrediction::read(&mut r, true)?;
        let clip = X0Clip::read(&mut r, false, false)?;
        // diffusers maps DPM-Solver's algorithm and solver types to DEIS's only ones.
        r.choice(
            "algorithm_type",
            "deis",
            &["deis", "dpmsolver", "dpmsolver++"],
        )?;
        r.record("algorithm_type", "deis".into());
        r.choice(
            "solver_type",
            "logrho",
            &["logrho", "midpoint", "heun", "bh1", "bh2"],
        )?;
        r.record("solver_type", "logrho".into());
        let lower_order_final = r.bool("lower_order_final", true)?;
        let sched = SolverSchedule::read(
            &mut r,
            noise,
            SolverOptions {
                lu: false,
                dynamic: true,
                spacing: true,
            },
        )?;
        let (ts, sig) = solver_initial(&sched.noise);
        Ok(Self {
            config: r.finish(),
            sched,
            prediction,
            clip,
            solver_order,
            lower_order_final,
            state: SigmaState::new(ts, sig, true),
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
        })
    }

    fn kind(&self) -> SigmaKind {
        self.sched.kind()
    }

    /// The noise prediction DEIS integrates, through x0 (thresholded if configured).
    fn convert(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        let (a, s, _) = self.kind().alpha_sigma_lambda(sigma);
        let x0 = self.clip.apply(solver_x0(
            self.prediction,
            model_output,
            sample,
            sigma,
            a,
            s,
        )?)?;
        div_s(&(sample - mul_s(&x0, a)?)?, s)
    }

    fn update(&self, order: usize, i: usize, sample: &Tensor) -> Result<Tensor> {
        let m = |k: usize| -> Result<&Tensor> {
            self.model_outputs[self.solver_order - 1 - k]
                .as_ref()
                .ok_or_else(|| Error::invalid(format!("{CLASS}: missing previous model output")))
        };
        let kind = self.kind();
        let sig = &self.state.sigmas;
        let (alpha_t, sigma_t, lambda_t) = kind.alpha_sigma_lambda(sig[i + 1]);
        let (alpha_s0, sigma_s0, lambda_s0) = kind.alpha_sigma_lambda(sig[i]);
        if order == 1 {
            // The first-order DEIS step is DPM-Solver's (noise prediction).
            let c = UpdateCoefficients::new(
                Algorithm::Plain,
                alpha_t,
                sigma_t,
                alpha_s0,
                sigma_s0,
                lambda_t - lambda_s0,
            );
            return Ok((mul_s(sample, c.x)? + mul_s(m(0)?, c.d0)?)?);
        }
        let rho = |j: usize| {
            let (a, s, _) = kind.alpha_sigma_lambda(sig[j]);
            s / a
        };
        let (rho_t, rho_s0, rho_s1) = (sigma_t / alpha_t, sigma_s0 / alpha_s0, rho(i - 1));
        // x_t = alpha_t * (x / alpha_s0 + sum_k coef_k * m_k), summed in diffusers' order.
        let mut acc = div_s(sample, alpha_s0)?;
        if order == 2 {
            acc = (acc + mul_s(m(0)?, coef2(rho_t, rho_s0, rho_s0, rho_s1))?)?;
            acc = (acc + mul_s(m(1)?, coef2(rho_t, rho_s0, rho_s1, rho_s0))?)?;
        } else {
            let rho_s2 = rho(i - 2);
            let c1 = coef3(rho_t, rho_s0, rho_s0, rho_s1, rho_s2);
            let c2 = coef3(rho_t, rho_s0, rho_s1, rho_s2, rho_s0);
            let c3 = coef3(rho_t, rho_s0, rho_s2, rho_s0, rho_s1);
            acc = (acc + mul_s(m(0)?, c1)?)?;
            acc = (acc + mul_s(m(1)?, c2)?)?;
            acc = (acc + mul_s(m(2)?, c3)?)?;
        }
        mul_s(&acc, alpha_t)
    }
}

impl Scheduler for DeisMultistepScheduler {
    crate::multistep::solver_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.set_timesteps_with(&TimestepsSpec::steps(n))
    }

    fn set_timesteps_with(&mut self, spec: &TimestepsSpec) -> Result<()> {
        spec.reject_others(CLASS, &["mu"])?;
        let n = spec.num_inference_steps.ok_or_else(|| {
            Error::invalid(format!("{CLASS}: set_timesteps needs num_inference_steps"))
        })?;
        check_steps(CLASS, n, self.sched.noise.len())?;
        self.sched.apply_mu(CLASS, spec.mu)?;
        let base = self.sched.base_timesteps(self.sched.noise.len(), n);
        let (ts, sig) = self.sched.compute(base, n, true);
        // Respaced and flow schedules end by repeating their last sigma.
        let last = match self.sched.sigmas {
            SolverSigmas::Interp => self.sched.sigma_min(),
            _ => sig[sig.len() - 1] as f32,
        };
        self.state.reset(ts, with_final(&sig, last));
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        _rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.state.step_index(CLASS, t)?;
        let len = self.state.timesteps.len();
        let short = self.lower_order_final && len < 15;
        let lower_final = i + 1 == len && short;
        let lower_second = i + 2 == len && short;
        let converted = self.convert(model_output, sample, self.state.sigmas[i])?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));
        let order = crate::multistep::multistep_order(
            self.solver_order,
            self.lower_order_nums,
            lower_final,
            lower_second,
        );
        let prev = self.update(order, i, sample)?;
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.state.advance();
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: None,
        })
    }
}
