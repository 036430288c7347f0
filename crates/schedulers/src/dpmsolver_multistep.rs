//! DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022), orders 1–3: exponential-integrator
//! steps in log-SNR (lambda) time reusing previous model outputs, and their SDE variants, which
//! add fresh noise every step. "DPM++ 2M (SDE) (Karras)" in A1111.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{div_s, mul_s, NoiseSchedule, X0Clip};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::multistep::{
    solver_eps, solver_initial, solver_x0, SigmaKind, SolverPrediction, SolverSchedule,
    SolverSigmas,
};
use crate::scheduler::{check_steps, Scheduler, StepOutput, TimestepsSpec};
use crate::sigma_schedule::SigmaState;

const CLASS: &str = "DPMSolverMultistepScheduler";

/// Which quantity the solver integrates, and whether it adds noise (diffusers' `algorithm_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Algorithm {
    /// DPM-Solver++: the data prediction x0.
    PlusPlus,
    /// DPM-Solver: the noise prediction epsilon.
    Plain,
    /// SDE-DPM-Solver++ (noise every step; orders 1–3).
    SdePlusPlus,
    /// SDE-DPM-Solver (noise every step; orders 1–2).
    Sde,
}

impl Algorithm {
    /// Reads `algorithm_type` ("deis" is mapped to dpmsolver++ as diffusers does).
    pub(crate) fn read(r: &mut ConfigReader, allowed: &[&str]) -> Result<Self> {
        let mut all = allowed.to_vec();
        all.push("deis");
        Ok(
            match r.choice("algorithm_type", "dpmsolver++", &all)?.as_str() {
                "dpmsolver" => Self::Plain,
                "sde-dpmsolver++" => Self::SdePlusPlus,
                "sde-dpmsolver" => Self::Sde,
                _ => Self::PlusPlus,
            },
        )
    }

    /// Whether the model output is converted to x0 (else to epsilon).
    pub(crate) fn data_prediction(self) -> bool {
        matches!(self, Self::PlusPlus | Self::SdePlusPlus)
    }

    pub(crate) fn stochastic(self) -> bool {
        matches!(self, Self::SdePlusPlus | Self::Sde)
    }
}

/// The coefficients of one multistep update `x_t = c_x x + c0 D0 + c1 D1 + c2 D2 + c_z z`, in
/// float32 and in diffusers' operation order (the first steps of a cosine schedule cancel terms
/// thousands of times larger than the result, so the order matters).
pub(crate) struct UpdateCoefficients {
    pub x: f32,
    pub d0: f32,
    /// For the midpoint and heun second-order forms and the third order.
    pub d1_midpoint: f32,
    pub d1: f32,
    pub d2: f32,
    pub noise: f32,
}

impl UpdateCoefficients {
    /// From the alpha / sigma of the target (`t`) and source (`s`) sigmas and h = lambda_t -
    /// lambda_s.
    pub(crate) fn new(
        algo: Algorithm,
        alpha_t: f32,
        sigma_t: f32,
        alpha_s: f32,
        sigma_s: f32,
        h: f32,
    ) -> Self {
        match algo {
            Algorithm::PlusPlus => {
                let em1 = (-h).exp() - 1.0;
                Self {
                    x: sigma_t / sigma_s,
                    d0: -(alpha_t * em1),
                    d1_midpoint: -(0.5 * (alpha_t * em1)),
                    d1: alpha_t * (em1 / h + 1.0),
                    d2: -(alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5)),
                    noise: 0.0,
                }
            }
            Algorithm::Plain => {
                let em1 = h.exp() - 1.0;
                Self {
                    x: alpha_t / alpha_s,
                    d0: -(sigma_t * em1),
                    d1_midpoint: -(0.5 * (sigma_t * em1)),
                    d1: -(sigma_t * (em1 / h - 1.0)),
                    d2: -(sigma_t * ((h.exp() - 1.0 - h) / (h * h) - 0.5)),
                    noise: 0.0,
                }
            }
            Algorithm::SdePlusPlus => {
                let e2 = (-2.0 * h).exp();
                Self {
                    x: sigma_t / sigma_s * (-h).exp(),
                    d0: alpha_t * (1.0 - e2),
                    d1_midpoint: 0.5 * (alpha_t * (1.0 - e2)),
                    d1: alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0),
                    d2: alpha_t * ((1.0 - e2 - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5),
                    noise: sigma_t * (1.0 - e2).sqrt(),
                }
            }
            Algorithm::Sde => {
                let em1 = h.exp() - 1.0;
                Self {
                    x: alpha_t / alpha_s,
                    d0: -(2.0 * (sigma_t * em1)),
                    d1_midpoint: -(sigma_t * em1),
                    d1: -(2.0 * (sigma_t * (em1 / h - 1.0))),
                    d2: f32::NAN,
                    noise: sigma_t * ((2.0 * h).exp() - 1.0).sqrt(),
                }
            }
        }
    }
}

pub struct DpmSolverMultistepScheduler {
    config: SchedulerConfig,
    sched: SolverSchedule,
    prediction: SolverPrediction,
    clip: X0Clip,
    algo: Algorithm,
    solver_order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_min: bool,
    learned_variance: bool,
    lambda_min_clipped: f64,
    state: SigmaState,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

impl DpmSolverMultistepScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let noise =
            NoiseSchedule::read(&mut r, 0.0001, 0.02, "linear", true)?.finite_terminal_sigma();
        let solver_order = r.usize("solver_order", 2)?;
        r.ensure(
            (1..=3).contains(&solver_order),
            "solver_order",
            "must be 1, 2 or 3",
        )?;
        let prediction = SolverPrediction::read(&mut r, true)?;
        let clip = X0Clip::read(&mut r, false, false)?;
        let algo = Algorithm::read(
            &mut r,
            &[
                "dpmsolver++",
                "dpmsolver",
                "sde-dpmsolver++",
                "sde-dpmsolver",
            ],
        )?;
        // diffusers maps the UniPC/DEIS solver types to midpoint.
        let solver_type = r.choice(
            "solver_type",
            "midpoint",
            &["midpoint", "heun", "logrho", "bh1", "bh2"],
        )?;
        // Recorded as diffusers registers them after mapping.
        r.record(
            "algorithm_type",
            (match algo {
                Algorithm::PlusPlus => "dpmsolver++",
                Algorithm::Plain => "dpmsolver",
                Algorithm::SdePlusPlus => "sde-dpmsolver++",
                Algorithm::Sde => "sde-dpmsolver",
            })
            .into(),
        );
        if !matches!(solver_type.as_str(), "midpoint" | "heun") {
            r.record("solver_type", "midpoint".into());
        }
        let lower_order_final = r.bool("lower_order_final", true)?;
        let euler_at_final = r.bool("euler_at_final", false)?;
        let sched = SolverSchedule::read(&mut r, noise, true, true)?;
        let lambda_min_clipped = r.f64("lambda_min_clipped", f64::NEG_INFINITY)?;
        let variance = r.choice(
            "variance_type",
            "none",
            &["none", "learned", "learned_range"],
        );
        let learned_variance = matches!(variance.as_deref(), Ok("learned" | "learned_range"));
        let final_sigma_min =
            r.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        r.ensure(
            algo.data_prediction() || final_sigma_min,
            "final_sigmas_type",
            "zero is not supported with algorithm_type dpmsolver / sde-dpmsolver; use sigma_min",
        )?;
        r.ensure(
            !(algo == Algorithm::Sde && solver_order == 3),
            "solver_order",
            "3 is not supported with algorithm_type sde-dpmsolver",
        )?;
        r.ensure(
            prediction != SolverPrediction::Flow || algo.data_prediction(),
            "prediction_type",
            "flow_prediction needs algorithm_type dpmsolver++ or sde-dpmsolver++",
        )?;
        let (ts, sig) = solver_initial(&sched.noise);
        Ok(Self {
            config: r.finish(),
            sched,
            prediction,
            clip,
            algo,
            solver_order,
            heun: solver_type == "heun",
            lower_order_final,
            euler_at_final,
            final_sigma_min,
            learned_variance,
            lambda_min_clipped,
            state: SigmaState::new(ts, sig, true),
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
        })
    }

    fn kind(&self) -> SigmaKind {
        self.sched.kind()
    }

    /// The model output as the solver uses it: x0 for DPM-Solver++, epsilon for DPM-Solver.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        let model_output = if self.learned_variance && self.prediction == SolverPrediction::Epsilon
        {
            model_output.narrow(1, 0, sample.dim(1)?)?
        } else {
            model_output.clone()
        };
        let (a, s, _) = self.kind().alpha_sigma_lambda(sigma);
        if self.algo.data_prediction() {
            return self.clip.apply(solver_x0(
                self.prediction,
                &model_output,
                sample,
                sigma,
                a,
                s,
            )?);
        }
        let eps = solver_eps(CLASS, self.prediction, &model_output, sample, a, s)?;
        if self.clip.thresholding {
            let x0 = self.clip.apply(div_s(&(sample - mul_s(&eps, s)?)?, a)?)?;
            return div_s(&(sample - mul_s(&x0, a)?)?, s);
        }
        Ok(eps)
    }

    /// One multistep update of the given order from sigma index `i` to `i + 1`.
    fn update(
        &self,
        order: usize,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let m = |k: usize| -> Result<&Tensor> {
            self.model_outputs[self.solver_order - 1 - k]
                .as_ref()
                .ok_or_else(|| Error::invalid(format!("{CLASS}: missing previous model output")))
        };
        let kind = self.kind();
        let (alpha_t, sigma_t, lambda_t) = kind.alpha_sigma_lambda(self.state.sigmas[i + 1]);
        let (alpha_s0, sigma_s0, lambda_s0) = kind.alpha_sigma_lambda(self.state.sigmas[i]);
        let h = lambda_t - lambda_s0;
        let c = UpdateCoefficients::new(self.algo, alpha_t, sigma_t, alpha_s0, sigma_s0, h);
        let mut x = (mul_s(sample, c.x)? + mul_s(m(0)?, c.d0)?)?;
        if order >= 2 {
            let (_, _, lambda_s1) = kind.alpha_sigma_lambda(self.state.sigmas[i - 1]);
            let r0 = (lambda_s0 - lambda_s1) / h;
            let d1_0 = mul_s(&(m(0)? - m(1)?)?, 1.0 / r0)?;
            if order == 2 {
                let c1 = if self.heun { c.d1 } else { c.d1_midpoint };
                x = (x + mul_s(&d1_0, c1)?)?;
            } else {
                let (_, _, lambda_s2) = kind.alpha_sigma_lambda(self.state.sigmas[i - 2]);
                let r1 = (lambda_s1 - lambda_s2) / h;
                let d1_1 = mul_s(&(m(1)? - m(2)?)?, 1.0 / r1)?;
                let diff = (&d1_0 - &d1_1)?;
                let d1 = (&d1_0 + mul_s(&diff, r0 / (r0 + r1))?)?;
                let d2 = mul_s(&diff, 1.0 / (r0 + r1))?;
                x = ((x + mul_s(&d1, c.d1)?)? + mul_s(&d2, c.d2)?)?;
            }
        }
        match noise {
            Some(z) => Ok((x + mul_s(z, c.noise)?)?),
            None => Ok(x),
        }
    }

    fn install(&mut self, timesteps: Vec<f64>, sigmas: &[f64]) {
        let last = if self.final_sigma_min {
            self.sched.sigma_min()
        } else {
            0.0
        };
        let sig = crate::sigma_schedule::with_final(sigmas, last);
        self.state.reset(timesteps, sig);
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    crate::multistep::solver_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.set_timesteps_with(&TimestepsSpec::steps(n))
    }

    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        self.set_timesteps_with(&TimestepsSpec::timesteps(timesteps.to_vec()))
    }

    fn set_timesteps_with(&mut self, spec: &TimestepsSpec) -> Result<()> {
        spec.reject_others(CLASS, &["timesteps", "mu"])?;
        self.sched.apply_mu(CLASS, spec.mu)?;
        match (spec.num_inference_steps, &spec.timesteps) {
            (Some(n), None) => {
                check_steps(CLASS, n, self.sched.noise.len())?;
                // Timesteps whose lambda is below lambda_min_clipped are cut (cosine schedules).
                let clipped = self
                    .sched
                    .noise
                    .alphas_cumprod
                    .iter()
                    .rev()
                    .take_while(|&&a| {
                        let lambda = a.sqrt().ln() - (1.0 - a).sqrt().ln();
                        (lambda as f64) < self.lambda_min_clipped
                    })
                    .count();
                let last_timestep = self.sched.noise.len() - clipped;
                let base = self.sched.base_timesteps(last_timestep, n);
                let (ts, sig) = self.sched.compute(base, n, !self.sched.noise.cosine);
                self.install(ts, &sig);
                Ok(())
            }
            (None, Some(ts)) => {
                if self.sched.sigmas != SolverSigmas::Interp {
                    return Err(Error::invalid(format!(
                        "{CLASS}: custom timesteps cannot be used with use_karras_sigmas, \
                         use_lu_lambdas, use_exponential_sigmas, use_beta_sigmas or use_flow_sigmas"
                    )));
                }
                let ts: Vec<f64> = ts
                    .iter()
                    .map(|&t| {
                        crate::common::int_timestep(CLASS, t.trunc(), self.sched.noise.len())
                            .map(|t| t as f64)
                    })
                    .collect::<Result<_>>()?;
                let n = ts.len();
                let (ts, sig) = self.sched.compute(ts, n, true);
                self.install(ts, &sig);
                Ok(())
            }
            _ => Err(Error::invalid(format!(
                "{CLASS}: set_timesteps needs exactly one of num_inference_steps and timesteps"
            ))),
        }
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.state.step_index(CLASS, t)?;
        let len = self.state.timesteps.len();
        let short = self.lower_order_final && len < 15;
        let lower_final = i + 1 == len && (self.euler_at_final || short || !self.final_sigma_min);
        let lower_second = i + 2 == len && short;
        let converted = self.convert(model_output, sample, self.state.sigmas[i])?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));
        let noise = if self.algo.stochastic() {
            Some(rng.randn_like(model_output)?)
        } else {
            None
        };
        let order = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_final {
            1
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_second {
            2
        } else {
            3
        };
        let prev = self.update(order, i, sample, noise.as_ref())?;
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
