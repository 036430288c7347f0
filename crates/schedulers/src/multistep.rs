//! The variance-preserving multistep solvers' shared pieces (DPM-Solver multistep and
//! singlestep, UniPC, DEIS): their schedules, the alpha/sigma/lambda of a sigma, and the
//! conversions of a model output to the x0 or epsilon they integrate.

use candle_core::Tensor;
use diffuse_core::{Error, Result};

use crate::common::{self, div_s, mul_s, sigma_to_t, NoiseSchedule, SigmaSpacing, Spacing};
use crate::config::ConfigReader;
use crate::sigma_schedule::{train_sigmas_and_logs, SigmaState};

/// alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of a (variance-exploding) sigma, in
/// f32 as diffusers' multistep solvers compute them.
pub(crate) fn vp_alpha_sigma_lambda(sigma: f32) -> (f32, f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

/// What a multistep solver's model predicts: diffusers' prediction types plus the velocity of
/// flow matching (`flow_prediction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SolverPrediction {
    Epsilon,
    Sample,
    VPrediction,
    Flow,
}

impl SolverPrediction {
    /// `prediction_type`, with `flow_prediction` where the class accepts it.
    pub fn read(r: &mut ConfigReader, flow: bool) -> Result<Self> {
        let allowed: &[&str] = if flow {
            &["epsilon", "v_prediction", "sample", "flow_prediction"]
        } else {
            &["epsilon", "v_prediction", "sample"]
        };
        Ok(
            match r.choice("prediction_type", "epsilon", allowed)?.as_str() {
                "v_prediction" => Self::VPrediction,
                "sample" => Self::Sample,
                "flow_prediction" => Self::Flow,
                _ => Self::Epsilon,
            },
        )
    }
}

/// The solvers' sigma space: variance preserving (alpha = 1 / sqrt(sigma² + 1), sigma_t =
/// sigma * alpha) or flow matching (`use_flow_sigmas`: alpha = 1 - sigma, sigma_t = sigma).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SigmaKind {
    Vp,
    Flow,
}

impl SigmaKind {
    /// alpha_t, sigma_t and lambda_t = log(alpha_t) - log(sigma_t), in float32.
    pub fn alpha_sigma_lambda(self, sigma: f32) -> (f32, f32, f32) {
        match self {
            Self::Vp => vp_alpha_sigma_lambda(sigma),
            Self::Flow => {
                let alpha = 1.0 - sigma;
                (alpha, sigma, alpha.ln() - sigma.ln())
            }
        }
    }
}

/// How a solver spreads its sigmas.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum SolverSigmas {
    /// The training sigmas at the spaced timesteps.
    Interp,
    /// Karras / exponential / beta sigmas between the training sigmas' ends.
    Respaced(SigmaSpacing),
    /// `use_lu_lambdas`: evenly spaced in log sigma (Lu et al.'s uniform-lambda steps).
    Lu,
    /// `use_flow_sigmas`: flow-matching sigmas `linspace(1, 1/N)` shifted by `flow_shift`.
    Flow { shift: f64 },
}

/// The schedule settings of the VP multistep solvers.
pub(crate) struct SolverSchedule {
    pub noise: NoiseSchedule,
    pub spacing: Spacing,
    pub steps_offset: usize,
    pub sigmas: SolverSigmas,
    /// `use_flow_sigmas` is on (whatever respacing wins): the solver works in flow sigmas.
    pub flow_sigmas: bool,
    /// `use_dynamic_shifting`: `mu` passed to set_timesteps sets the flow shift to e^mu.
    pub dynamic_shifting: bool,
}

impl SolverSchedule {
    /// Reads the sigma options (`use_karras_sigmas`, `use_exponential_sigmas`,
    /// `use_beta_sigmas`, `use_lu_lambdas` where `lu`, `use_flow_sigmas` / `flow_shift`, and
    /// `use_dynamic_shifting` / `time_shift_type` where `dynamic`), spacing and offset.
    pub fn read(
        r: &mut ConfigReader,
        noise: NoiseSchedule,
        lu: bool,
        dynamic: bool,
    ) -> Result<Self> {
        let respacing = SigmaSpacing::read(r)?;
        let lu = lu && r.bool("use_lu_lambdas", false)?;
        let flow = r.bool("use_flow_sigmas", false)?;
        let flow_shift = r.f64("flow_shift", 1.0)?;
        let dynamic_shifting = dynamic && r.bool("use_dynamic_shifting", false)?;
        if dynamic {
            r.choice("time_shift_type", "exponential", &["exponential"])?;
        }
        let spacing = Spacing::read(r, "linspace")?;
        let steps_offset = r.usize("steps_offset", 0)?;
        // diffusers checks them in this order.
        let sigmas = match (respacing, lu, flow) {
            (SigmaSpacing::AsShifted, false, false) => SolverSigmas::Interp,
            (SigmaSpacing::AsShifted, true, _) => SolverSigmas::Lu,
            (SigmaSpacing::AsShifted, false, true) => SolverSigmas::Flow { shift: flow_shift },
            (s, _, _) => SolverSigmas::Respaced(s),
        };
        Ok(Self {
            noise,
            spacing,
            steps_offset,
            sigmas,
            flow_sigmas: flow,
            dynamic_shifting,
        })
    }

    /// The sigma space the solver works in.
    pub fn kind(&self) -> SigmaKind {
        if self.flow_sigmas {
            SigmaKind::Flow
        } else {
            SigmaKind::Vp
        }
    }

    /// The spaced integer timesteps of a solver schedule (before any respacing).
    pub fn base_timesteps(&self, last_timestep: usize, n: usize) -> Vec<f64> {
        common::solver_timesteps(
            self.spacing,
            last_timestep,
            self.noise.len(),
            n,
            self.steps_offset,
        )
    }

    /// Timesteps (integers, as diffusers stores them in int64) and sigmas without the final one,
    /// from the spaced `timesteps`. Karras and Lu timesteps are rounded where `round`, else
    /// truncated like the other respaced ones.
    pub fn compute(&self, timesteps: Vec<f64>, n: usize, round: bool) -> (Vec<f64>, Vec<f64>) {
        let (train, logs) = train_sigmas_and_logs(&self.noise);
        let (min, max) = (train[0] as f64, train[train.len() - 1] as f64);
        let to_int = |sigmas: &[f64], round: bool| -> Vec<f64> {
            sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &logs);
                    if round {
                        common::round_half_even(t)
                    } else {
                        t.trunc()
                    }
                })
                .collect()
        };
        match self.sigmas {
            SolverSigmas::Interp => {
                let s = timesteps
                    .iter()
                    .map(|&t| common::interp_index(t, &train))
                    .collect();
                (timesteps, s)
            }
            SolverSigmas::Respaced(spacing) => {
                let s = spacing.between(min, max, n).expect("a respacing");
                let ts = to_int(&s, round && spacing == SigmaSpacing::Karras);
                (ts, s)
            }
            SolverSigmas::Lu => {
                // log sigmas as numpy float32, evenly spaced from the largest to the smallest.
                let (lmax, lmin) = (logs[logs.len() - 1], logs[0]);
                let s: Vec<f64> = common::linspace(0.0, 1.0, n)
                    .into_iter()
                    .map(|r| (lmax + r * (lmin - lmax)).exp())
                    .collect();
                let ts = to_int(&s, round);
                (ts, s)
            }
            SolverSigmas::Flow { shift } => {
                let n_train = self.noise.len() as f64;
                let mut s: Vec<f64> = common::linspace(1.0, 1.0 / n_train, n + 1)
                    .into_iter()
                    .map(|a| {
                        let s = 1.0 - a;
                        shift * s / (1.0 + (shift - 1.0) * s)
                    })
                    .collect();
                s.reverse();
                s.pop();
                let ts = s.iter().map(|&x| (x * n_train).trunc()).collect();
                (ts, s)
            }
        }
    }

    /// `sqrt((1 - acp[0]) / acp[0])`: the smallest training sigma, `final_sigmas_type="sigma_min"`.
    pub fn sigma_min(&self) -> f32 {
        let a0 = self.noise.alphas_cumprod[0];
        ((1.0 - a0) / a0).sqrt()
    }

    /// Applies `mu` (`flow_shift = e^mu`) where dynamic shifting is on.
    pub fn apply_mu(&mut self, class: &str, mu: Option<f64>) -> Result<()> {
        match (mu, self.dynamic_shifting, &mut self.sigmas) {
            (None, _, _) => Ok(()),
            (Some(mu), true, SolverSigmas::Flow { shift }) => {
                *shift = mu.exp();
                Ok(())
            }
            (Some(_), _, _) => Err(Error::invalid(format!(
                "{class}: mu needs use_dynamic_shifting and use_flow_sigmas"
            ))),
        }
    }
}

/// The initial state of DPM-Solver and UniPC: every training timestep descending, and the
/// training sigmas in *ascending* order (a diffusers quirk that `add_noise` before
/// `set_timesteps` exposes).
pub(crate) fn solver_initial(noise: &NoiseSchedule) -> (Vec<f64>, Vec<f32>) {
    let n = noise.len();
    let ts = common::linspace(0.0, (n - 1) as f64, n)
        .into_iter()
        .rev()
        .map(|t| t as f32 as f64)
        .collect();
    (ts, noise.train_sigmas())
}

/// x0 from a model output at coefficients (alpha_t, sigma_t) of the raw `sigma`, in torch's
/// operation order.
pub(crate) fn solver_x0(
    pred: SolverPrediction,
    mo: &Tensor,
    sample: &Tensor,
    sigma: f32,
    a: f32,
    s: f32,
) -> Result<Tensor> {
    match pred {
        SolverPrediction::Epsilon => div_s(&(sample - mul_s(mo, s)?)?, a),
        SolverPrediction::Sample => Ok(mo.clone()),
        SolverPrediction::VPrediction => Ok((mul_s(sample, a)? - mul_s(mo, s)?)?),
        SolverPrediction::Flow => Ok((sample - mul_s(mo, sigma)?)?),
    }
}

/// Epsilon from a model output at coefficients (alpha_t, sigma_t).
pub(crate) fn solver_eps(
    class: &str,
    pred: SolverPrediction,
    mo: &Tensor,
    sample: &Tensor,
    a: f32,
    s: f32,
) -> Result<Tensor> {
    match pred {
        SolverPrediction::Epsilon => Ok(mo.clone()),
        SolverPrediction::Sample => div_s(&(sample - mul_s(mo, a)?)?, s),
        SolverPrediction::VPrediction => Ok((mul_s(mo, a)? + mul_s(sample, s)?)?),
        SolverPrediction::Flow => Err(Error::invalid(format!(
            "{class}: flow_prediction needs a data-prediction solver (dpmsolver++ / predict_x0)"
        ))),
    }
}

/// `alpha_t * x + sigma_t * noise` with the sigma looked up like the k-diffusion schedulers.
pub(crate) fn solver_add_noise(
    state: &SigmaState,
    class: &str,
    kind: SigmaKind,
    x: &Tensor,
    noise: &Tensor,
    timesteps: &[f64],
) -> Result<Tensor> {
    let sigmas = state.noise_sigmas(class, timesteps)?;
    let (mut ca, mut cb) = (vec![], vec![]);
    for s in sigmas {
        let (a, st, _) = kind.alpha_sigma_lambda(s as f32);
        ca.push(a as f64);
        cb.push(st as f64);
    }
    common::per_batch_lin2(x, noise, &ca, &cb)
}

/// The `Scheduler` methods the multistep solvers share: fields `config`, `sched` (a
/// `SolverSchedule`), `state`, a `kind()` method and a `CLASS` constant; unit noise and
/// unscaled inputs.
macro_rules! solver_scheduler_common {
    () => {
        $crate::sigma_schedule::sigma_state_accessors!();

        fn init_noise_sigma(&self) -> f64 {
            1.0
        }

        fn scale_model_input(&mut self, sample: &Tensor, _t: f64) -> Result<Tensor> {
            Ok(sample.clone())
        }

        fn add_noise(
            &self,
            original: &Tensor,
            noise: &Tensor,
            timesteps: &[f64],
        ) -> Result<Tensor> {
            $crate::multistep::solver_add_noise(
                &self.state,
                CLASS,
                self.kind(),
                original,
                noise,
                timesteps,
            )
        }

        fn alphas_cumprod(&self) -> Option<&[f32]> {
            Some(&self.sched.noise.alphas_cumprod)
        }

        fn betas(&self) -> Option<Vec<f32>> {
            Some(self.sched.noise.betas.clone())
        }
    };
}
pub(crate) use solver_scheduler_common;
