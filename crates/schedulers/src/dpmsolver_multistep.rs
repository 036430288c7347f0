//! DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022), orders 1–3: exponential-integrator
//! steps in log-SNR (lambda) time reusing previous model outputs. "DPM++ 2M (Karras)" in A1111.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{div_s, mul_s, NoiseSchedule, PredictionType, Spacing, X0Clip};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::multistep::{solver_initial, solver_schedule, vp_alpha_sigma_lambda, vp_eps, vp_x0};
use crate::scheduler::{check_steps, Scheduler, StepOutput};
use crate::sigma_schedule::SigmaState;

const CLASS: &str = "DPMSolverMultistepScheduler";

pub struct DpmSolverMultistepScheduler {
    config: SchedulerConfig,
    noise: NoiseSchedule,
    prediction: PredictionType,
    clip: X0Clip,
    /// DPM-Solver++ (data prediction) rather than DPM-Solver (noise prediction).
    plus_plus: bool,
    solver_order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_min: bool,
    learned_variance: bool,
    use_karras_sigmas: bool,
    lambda_min_clipped: f64,
    spacing: Spacing,
    steps_offset: usize,
    state: SigmaState,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

impl DpmSolverMultistepScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let noise = NoiseSchedule::read(&mut r, 0.0001, 0.02, "linear", true)?;
        let solver_order = r.usize("solver_order", 2)?;
        r.ensure(
            (1..=3).contains(&solver_order),
            "solver_order",
            "must be 1, 2 or 3",
        )?;
        let prediction = PredictionType::read(&mut r)?;
        let clip = X0Clip::read(&mut r, false, false)?;
        // diffusers maps "deis" to dpmsolver++ and the UniPC/DEIS solver types to midpoint.
        let algo = r.choice(
            "algorithm_type",
            "dpmsolver++",
            &["dpmsolver++", "dpmsolver", "deis"],
        )?;
        let solver_type = r.choice(
            "solver_type",
            "midpoint",
            &["midpoint", "heun", "logrho", "bh1", "bh2"],
        )?;
        let lower_order_final = r.bool("lower_order_final", true)?;
        let euler_at_final = r.bool("euler_at_final", false)?;
        let use_karras_sigmas = r.bool("use_karras_sigmas", false)?;
        for unsupported in [
            "use_lu_lambdas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_flow_sigmas",
        ] {
            let v = r.bool(unsupported, false)?;
            r.ensure(!v, unsupported, "is not supported")?;
        }
        let lambda_min_clipped = r.f64("lambda_min_clipped", f64::NEG_INFINITY)?;
        let variance = r.choice(
            "variance_type",
            "none",
            &["none", "learned", "learned_range"],
        );
        let learned_variance = matches!(variance.as_deref(), Ok("learned" | "learned_range"));
        let spacing = Spacing::read(&mut r, "linspace")?;
        let steps_offset = r.usize("steps_offset", 0)?;
        let final_sigma_min =
            r.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        r.ensure(
            !(final_sigma_min && algo == "dpmsolver"),
            "final_sigmas_type",
            "sigma_min is not supported with algorithm_type dpmsolver",
        )?;
        let (ts, sig) = solver_initial(&noise);
        Ok(Self {
            config: r.finish(),
            noise,
            prediction,
            clip,
            plus_plus: algo != "dpmsolver",
            solver_order,
            heun: solver_type == "heun",
            lower_order_final,
            euler_at_final,
            final_sigma_min,
            learned_variance,
            use_karras_sigmas,
            lambda_min_clipped,
            spacing,
            steps_offset,
            state: SigmaState::new(ts, sig, true),
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
        })
    }

    /// The model output as the solver uses it: x0 for DPM-Solver++, epsilon for DPM-Solver.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        let model_output = if self.learned_variance && self.prediction == PredictionType::Epsilon {
            model_output.narrow(1, 0, sample.dim(1)?)?
        } else {
            model_output.clone()
        };
        let (a, s, _) = vp_alpha_sigma_lambda(sigma);
        if self.plus_plus {
            return self
                .clip
                .apply(vp_x0(self.prediction, &model_output, sample, a, s)?);
        }
        let eps = vp_eps(self.prediction, &model_output, sample, a, s)?;
        if self.clip.thresholding {
            let x0 = self.clip.apply(div_s(&(sample - mul_s(&eps, s)?)?, a)?)?;
            return div_s(&(sample - mul_s(&x0, a)?)?, s);
        }
        Ok(eps)
    }

    /// One multistep update of the given order from sigma index `i` to `i + 1`, with scalars in
    /// f32 and terms combined in diffusers' order (the first steps of a cosine schedule cancel
    /// terms thousands of times larger than the result).
    fn update(&self, order: usize, i: usize, sample: &Tensor) -> Result<Tensor> {
        let m = |k: usize| -> Result<&Tensor> {
            self.model_outputs[self.solver_order - 1 - k]
                .as_ref()
                .ok_or_else(|| Error::invalid(format!("{CLASS}: missing previous model output")))
        };
        let (alpha_t, sigma_t, lambda_t) = vp_alpha_sigma_lambda(self.state.sigmas[i + 1]);
        let (alpha_s0, sigma_s0, lambda_s0) = vp_alpha_sigma_lambda(self.state.sigmas[i]);
        let h = lambda_t - lambda_s0;
        // DPM-Solver++ integrates the data prediction (with alpha_t, e^-h); DPM-Solver the noise
        // prediction (with sigma_t, e^h). All terms are `x_ratio * x - c * D`.
        let (x_ratio, w, em1) = if self.plus_plus {
            (sigma_t / sigma_s0, alpha_t, (-h).exp() - 1.0)
        } else {
            (alpha_t / alpha_s0, sigma_t, h.exp() - 1.0)
        };
        let mut x = (mul_s(sample, x_ratio)? - mul_s(m(0)?, w * em1)?)?;
        if order == 1 {
            return Ok(x);
        }
        let (_, _, lambda_s1) = vp_alpha_sigma_lambda(self.state.sigmas[i - 1]);
        let r0 = (lambda_s0 - lambda_s1) / h;
        let d1_0 = mul_s(&(m(0)? - m(1)?)?, 1.0 / r0)?;
        // The coefficient of the first difference in the heun / third-order forms.
        let c1 = if self.plus_plus {
            -(w * (em1 / h + 1.0))
        } else {
            w * (em1 / h - 1.0)
        };
        if order == 2 {
            let c = if self.heun { c1 } else { 0.5 * (w * em1) };
            return Ok((x - mul_s(&d1_0, c)?)?);
        }
        let (_, _, lambda_s2) = vp_alpha_sigma_lambda(self.state.sigmas[i - 2]);
        let r1 = (lambda_s1 - lambda_s2) / h;
        let d1_1 = mul_s(&(m(1)? - m(2)?)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul_s(&diff, r0 / (r0 + r1))?)?;
        let d2 = mul_s(&diff, 1.0 / (r0 + r1))?;
        let c2 = if self.plus_plus {
            w * ((em1 + h) / (h * h) - 0.5)
        } else {
            w * ((em1 - h) / (h * h) - 0.5)
        };
        x = (x - mul_s(&d1, c1)?)?;
        Ok((x - mul_s(&d2, c2)?)?)
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    crate::multistep::solver_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.noise.len())?;
        // Timesteps whose lambda is below lambda_min_clipped are cut (for cosine schedules).
        let lambdas: Vec<f32> = self
            .noise
            .alphas_cumprod
            .iter()
            .map(|&a| {
                let (at, st) = (a.sqrt(), (1.0 - a).sqrt());
                at.ln() - st.ln()
            })
            .collect();
        let clipped = lambdas
            .iter()
            .rev()
            .take_while(|&&l| (l as f64) < self.lambda_min_clipped)
            .count();
        let last_timestep = self.noise.len() - clipped;
        let (ts, sig) = solver_schedule(
            &self.noise,
            self.spacing,
            last_timestep,
            n,
            self.steps_offset,
            self.use_karras_sigmas,
            true,
            self.final_sigma_min,
        );
        self.state.reset(ts, sig);
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
        let lower_final = i + 1 == len && (self.euler_at_final || short || !self.final_sigma_min);
        let lower_second = i + 2 == len && short;
        let converted = self.convert(model_output, sample, self.state.sigmas[i])?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));
        let order = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_final {
            1
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_second {
            2
        } else {
            3
        };
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
