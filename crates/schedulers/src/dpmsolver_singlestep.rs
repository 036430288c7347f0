//! DPM-Solver / DPM-Solver++ singlestep (Lu et al. 2022): each order-k block takes k model
//! evaluations from one starting sample and combines them in a single high-order step (orders
//! follow a fixed pattern, e.g. 1, 2, 1, 2, ...). "DPM++ SDE" in diffusers' A1111 table.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{div_s, mul_s, NoiseSchedule, X0Clip};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::multistep::{
    solver_initial, Algorithm, DpmConversion, DpmSolverFields, DpmSolverTail, SigmaKind,
    SolverOptions, SolverPrediction, SolverSchedule, UpdateCoefficients,
};
use crate::scheduler::{Scheduler, StepOutput, TimestepsSpec};
use crate::sigma_schedule::{with_final, SigmaState};

const CLASS: &str = "DPMSolverSinglestepScheduler";

pub struct DpmSolverSinglestepScheduler {
    config: SchedulerConfig,
    sched: SolverSchedule,
    conv: DpmConversion,
    algo: Algorithm,
    solver_order: usize,
    heun: bool,
    /// diffusers turns this on for good once a schedule needs it (uneven step counts, a final
    /// sigma of 0).
    lower_order_final: bool,
    final_sigma_min: bool,
    lambda_min_clipped: f64,
    state: SigmaState,
    order_list: Vec<usize>,
    model_outputs: Vec<Option<Tensor>>,
    /// The sample at the start of the current block.
    block_sample: Option<Tensor>,
}

impl DpmSolverSinglestepScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let noise = NoiseSchedule::read(&mut r, 0.0001, 0.02, "linear", false)?;
        let prediction = SolverPrediction::read(&mut r, true)?;
        let clip = X0Clip::read(&mut r, false, false)?;
        let DpmSolverFields {
            solver_order,
            algo,
            heun,
        } = DpmSolverFields::read(&mut r, &["dpmsolver++", "dpmsolver", "sde-dpmsolver++"])?;
        let lower_order_final = r.bool("lower_order_final", false)?;
        let sched = SolverSchedule::read(
            &mut r,
            noise,
            SolverOptions {
                lu: false,
                dynamic: true,
                spacing: false,
            },
        )?;
        let DpmSolverTail {
            conv,
            final_sigma_min,
            lambda_min_clipped,
        } = DpmSolverTail::read(&mut r, algo, prediction, clip)?;
        let (ts, sig) = solver_initial(&sched.noise);
        Ok(Self {
            config: r.finish(),
            sched,
            conv,
            algo,
            solver_order,
            heun,
            lower_order_final,
            final_sigma_min,
            lambda_min_clipped,
            state: SigmaState::new(ts, sig, true),
            order_list: vec![],
            model_outputs: vec![None; solver_order],
            block_sample: None,
        })
    }

    fn kind(&self) -> SigmaKind {
        self.sched.kind()
    }

    /// The order of each step: blocks 1, 2(, 3) repeated, ending early with lower orders when
    /// `lower_order_final`, and a first-order last step onto a final sigma of 0.
    fn order_list(&self, steps: usize) -> Vec<usize> {
        let k = self.solver_order;
        let block: Vec<usize> = (1..=k).collect();
        let full = steps / k;
        let mut orders: Vec<usize> = Vec::with_capacity(steps);
        if self.lower_order_final && k > 1 {
            let rest = steps % k;
            let blocks = if rest == 0 { full - 1 } else { full };
            for _ in 0..blocks {
                orders.extend(&block);
            }
            match (k, rest) {
                (3, 0) => orders.extend([1, 2, 1]),
                (2, 0) => orders.extend([1, 1]),
                (_, r) => orders.extend(1..=r),
            }
        } else {
            for _ in 0..full {
                orders.extend(&block);
            }
            if k == 1 {
                orders = vec![1; steps];
            }
        }
        if !self.final_sigma_min {
            if let Some(last) = orders.last_mut() {
                *last = 1;
            }
        }
        orders
    }

    /// The model output as the solver uses it: x0 for DPM-Solver++, epsilon for DPM-Solver.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        self.conv
            .convert(CLASS, self.kind(), model_output, sample, sigma)
    }

    /// One singlestep update of order k from the block start (sigma index `i + 1 - k`) to
    /// `i + 1`, with the block's k model outputs.
    fn update(&self, order: usize, i: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        let missing = || Error::invalid(format!("{CLASS}: missing previous model output"));
        let sample = self.block_sample.as_ref().ok_or_else(missing)?;
        let m = |k: usize| -> Result<&Tensor> {
            self.model_outputs[self.solver_order - 1 - k]
                .as_ref()
                .ok_or_else(missing)
        };
        let kind = self.kind();
        let sig = &self.state.sigmas;
        let (alpha_t, sigma_t, lambda_t) = kind.alpha_sigma_lambda(sig[i + 1]);
        // The block starts `order - 1` steps back.
        let (alpha_b, sigma_b, lambda_b) = kind.alpha_sigma_lambda(sig[i + 1 - order]);
        let h = lambda_t - lambda_b;
        let c = UpdateCoefficients::new(self.algo, alpha_t, sigma_t, alpha_b, sigma_b, h);
        let d0 = m(order - 1)?;
        let mut x = (mul_s(sample, c.x)? + mul_s(d0, c.d0)?)?;
        match order {
            1 => {}
            2 => {
                let (_, _, lambda_s0) = kind.alpha_sigma_lambda(sig[i]);
                let r0 = (lambda_s0 - lambda_b) / h;
                let d1 = mul_s(&(m(0)? - m(1)?)?, 1.0 / r0)?;
                let c1 = if self.heun { c.d1 } else { c.d1_midpoint };
                x = (x + mul_s(&d1, c1)?)?;
            }
            _ => {
                let (_, _, lambda_s0) = kind.alpha_sigma_lambda(sig[i]);
                let (_, _, lambda_s1) = kind.alpha_sigma_lambda(sig[i - 1]);
                let (r0, r1) = ((lambda_s0 - lambda_b) / h, (lambda_s1 - lambda_b) / h);
                let d1_0 = mul_s(&(m(1)? - m(2)?)?, 1.0 / r1)?;
                let d1_1 = mul_s(&(m(0)? - m(2)?)?, 1.0 / r0)?;
                if self.heun {
                    let d1 = div_s(&(mul_s(&d1_0, r0)? - mul_s(&d1_1, r1)?)?, r0 - r1)?;
                    let d2 = div_s(&mul_s(&(&d1_1 - &d1_0)?, 2.0)?, r0 - r1)?;
                    x = ((x + mul_s(&d1, c.d1)?)? + mul_s(&d2, c.d2)?)?;
                } else {
                    x = (x + mul_s(&d1_1, c.d1)?)?;
                }
            }
        }
        match noise {
            Some(z) => Ok((x + mul_s(z, c.noise)?)?),
            None => Ok(x),
        }
    }

    fn install(&mut self, timesteps: Vec<f64>, sigmas: &[f64]) {
        let n = timesteps.len();
        let last = if self.final_sigma_min {
            self.sched.sigma_min()
        } else {
            0.0
        };
        self.state.reset(timesteps, with_final(sigmas, last));
        if !self.lower_order_final
            && (!n.is_multiple_of(self.solver_order) || !self.final_sigma_min)
        {
            self.lower_order_final = true;
        }
        self.order_list = self.order_list(n);
        self.model_outputs = vec![None; self.solver_order];
        self.block_sample = None;
    }
}

impl Scheduler for DpmSolverSinglestepScheduler {
    crate::multistep::solver_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.set_timesteps_with(&TimestepsSpec::steps(n))
    }

    fn set_custom_timesteps(&mut self, timesteps: &[f64]) -> Result<()> {
        self.set_timesteps_with(&TimestepsSpec::timesteps(timesteps.to_vec()))
    }

    fn set_timesteps_with(&mut self, spec: &TimestepsSpec) -> Result<()> {
        spec.reject_others(CLASS, &["timesteps", "mu"])?;
        let (ts, sig) = self
            .sched
            .for_spec(CLASS, spec, self.lambda_min_clipped, true)?;
        self.install(ts, &sig);
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let i = self.state.step_index(CLASS, t)?;
        let converted = self.convert(model_output, sample, self.state.sigmas[i])?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));
        let noise = if self.algo.stochastic() {
            Some(rng.randn_like(model_output)?)
        } else {
            None
        };
        let mut order = *self.order_list.get(i).ok_or_else(|| {
            Error::invalid(format!("{CLASS}: step called past the end of the schedule"))
        })?;
        // Lower the order while the outputs it needs are missing (a loop started mid-block).
        while order > 1 && self.model_outputs[self.solver_order - order].is_none() {
            order -= 1;
        }
        if order == 1 {
            self.block_sample = Some(sample.clone());
        }
        let prev = self.update(order, i, noise.as_ref())?;
        self.state.advance();
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: None,
        })
    }
}
