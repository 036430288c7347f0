//! DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022), orders 1–3: exponential-integrator
//! steps in log-SNR (lambda) time reusing previous model outputs, and their SDE variants, which
//! add fresh noise every step. "DPM++ 2M (SDE) (Karras)" in A1111.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{NoiseSchedule, X0Clip};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::multistep::{
    multistep_order, multistep_update, solver_initial, Algorithm, DpmConversion, DpmSolverFields,
    DpmSolverTail, SigmaKind, SolverOptions, SolverPrediction, SolverSchedule,
};
use crate::scheduler::{Scheduler, StepOutput, TimestepsSpec};
use crate::sigma_schedule::SigmaState;

const CLASS: &str = "DPMSolverMultistepScheduler";

pub struct DpmSolverMultistepScheduler {
    config: SchedulerConfig,
    sched: SolverSchedule,
    conv: DpmConversion,
    algo: Algorithm,
    solver_order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_min: bool,
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
        let prediction = SolverPrediction::read(&mut r, true)?;
        let clip = X0Clip::read(&mut r, false, false)?;
        let DpmSolverFields {
            solver_order,
            algo,
            heun,
        } = DpmSolverFields::read(
            &mut r,
            &[
                "dpmsolver++",
                "dpmsolver",
                "sde-dpmsolver++",
                "sde-dpmsolver",
            ],
        )?;
        let lower_order_final = r.bool("lower_order_final", true)?;
        let euler_at_final = r.bool("euler_at_final", false)?;
        let sched = SolverSchedule::read(
            &mut r,
            noise,
            SolverOptions {
                lu: true,
                dynamic: true,
                spacing: true,
            },
        )?;
        r.ensure(
            !(algo == Algorithm::Sde && solver_order == 3),
            "solver_order",
            "3 is not supported with algorithm_type sde-dpmsolver",
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
            euler_at_final,
            final_sigma_min,
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
        self.conv
            .convert(CLASS, self.kind(), model_output, sample, sigma)
    }

    /// One multistep update of the given order from sigma index `i` to `i + 1`.
    fn update(
        &self,
        order: usize,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let outputs: Vec<&Tensor> = self.model_outputs.iter().flatten().collect();
        if outputs.len() < order {
            return Err(Error::invalid(format!(
                "{CLASS}: missing previous model output"
            )));
        }
        multistep_update(
            self.algo,
            self.heun,
            self.kind(),
            &self.state.sigmas,
            i,
            order,
            &outputs,
            sample,
            noise,
        )
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
        // Karras and Lu timesteps are truncated, not rounded, on the cosine schedule.
        let round = !self.sched.noise.cosine;
        let (ts, sig) = self
            .sched
            .for_spec(CLASS, spec, self.lambda_min_clipped, round)?;
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
        let order = multistep_order(
            self.solver_order,
            self.lower_order_nums,
            lower_final,
            lower_second,
        );
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
