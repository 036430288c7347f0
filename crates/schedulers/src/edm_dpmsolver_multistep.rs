//! EDM DPM-Solver multistep: DPM-Solver++ (or its SDE variant) on an EDM schedule with EDM's
//! preconditioning (Karras et al. 2022). The inputs are pre-scaled, so alpha_t = 1 and
//! sigma_t = sigma.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::X0Clip;
use crate::config::{ConfigReader, SchedulerConfig};
use crate::edm::EdmConfig;
use crate::multistep::{multistep_update, Algorithm, DpmSolverFields, SigmaKind};
use crate::scheduler::{check_steps, Scheduler, StepOutput};
use crate::sigma_schedule::SigmaState;

const CLASS: &str = "EDMDPMSolverMultistepScheduler";

pub struct EdmDpmSolverMultistepScheduler {
    config: SchedulerConfig,
    edm: EdmConfig,
    clip: X0Clip,
    algo: Algorithm,
    solver_order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    state: SigmaState,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

impl EdmDpmSolverMultistepScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let edm = EdmConfig::read(&mut r, false)?;
        let clip = X0Clip::read(&mut r, false, false)?;
        let DpmSolverFields {
            solver_order,
            algo,
            heun,
        } = DpmSolverFields::read(&mut r, &["dpmsolver++", "sde-dpmsolver++"])?;
        r.ensure(
            !(algo.stochastic() && solver_order == 3),
            "solver_order",
            "3 is not supported with algorithm_type sde-dpmsolver++",
        )?;
        let lower_order_final = r.bool("lower_order_final", true)?;
        let euler_at_final = r.bool("euler_at_final", false)?;
        let (ts, sig) = edm.initial();
        Ok(Self {
            config: r.finish(),
            edm,
            clip,
            algo,
            solver_order,
            heun,
            lower_order_final,
            euler_at_final,
            state: SigmaState::new(ts, sig, true),
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
        })
    }
}

impl Scheduler for EdmDpmSolverMultistepScheduler {
    crate::sigma_schedule::sigma_state_accessors!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.edm.n_train)?;
        let (ts, sig) = self.edm.schedule(n);
        self.state.reset(ts, sig);
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        Ok(())
    }

    fn init_noise_sigma(&self) -> f64 {
        self.edm.init_noise_sigma()
    }

    fn scale_model_input(&mut self, sample: &Tensor, t: f64) -> Result<Tensor> {
        let i = self.state.step_index(CLASS, t)?;
        self.edm.precondition_inputs(sample, self.state.sigmas[i])
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
        let lower_final =
            i + 1 == len && (self.euler_at_final || short || !self.edm.final_sigma_min);
        let lower_second = i + 2 == len && short;
        let x0 = self
            .edm
            .precondition_outputs(sample, model_output, self.state.sigmas[i])?;
        let x0 = self.clip.apply(x0)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0));
        let noise = if self.algo.stochastic() {
            Some(rng.randn_like(model_output)?)
        } else {
            None
        };
        let order = crate::multistep::multistep_order(
            self.solver_order,
            self.lower_order_nums,
            lower_final,
            lower_second,
        );
        let outputs: Vec<&Tensor> = self.model_outputs.iter().flatten().collect();
        if outputs.len() < order {
            return Err(Error::invalid(format!(
                "{CLASS}: missing previous model output"
            )));
        }
        let prev = multistep_update(
            self.algo,
            self.heun,
            SigmaKind::Edm,
            &self.state.sigmas,
            i,
            order,
            &outputs,
            sample,
            noise.as_ref(),
        )?;
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.state.advance();
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: None,
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        self.state.add_noise_ve(CLASS, original, noise, timesteps)
    }

    fn alphas_cumprod(&self) -> Option<&[f32]> {
        None
    }
}
