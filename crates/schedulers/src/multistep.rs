//! The variance-preserving multistep solvers' shared pieces (DPM-Solver multistep and
//! singlestep, UniPC, DEIS): their schedules, the alpha/sigma/lambda of a sigma, and the
//! conversions of a model output to the x0 or epsilon they integrate.

use candle_core::Tensor;
use diffuse_core::{Error, Result};

use crate::common::{self, div_s, mul_s, sigma_to_t, NoiseSchedule, SigmaSpacing, Spacing, X0Clip};
use crate::config::ConfigReader;
use crate::scheduler::{check_steps, TimestepsSpec};
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
    /// EDM's pre-scaled inputs: alpha_t = 1, sigma_t = sigma.
    Edm,
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
            Self::Edm => (1.0, sigma, 0.0 - sigma.ln()),
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

/// Which schedule fields a solver class has.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SolverOptions {
    pub lu: bool,
    pub dynamic: bool,
    pub spacing: bool,
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
    /// `use_beta_sigmas`, `use_lu_lambdas` where `opts.lu`, `use_flow_sigmas` / `flow_shift`,
    /// `use_dynamic_shifting` / `time_shift_type` where `opts.dynamic`), and the spacing and
    /// offset where the class has them (else linspace).
    pub fn read(r: &mut ConfigReader, noise: NoiseSchedule, opts: SolverOptions) -> Result<Self> {
        let respacing = SigmaSpacing::read(r)?;
        let lu = opts.lu && r.bool("use_lu_lambdas", false)?;
        let flow = r.bool("use_flow_sigmas", false)?;
        let flow_shift = r.f64("flow_shift", 1.0)?;
        let dynamic_shifting = opts.dynamic && r.bool("use_dynamic_shifting", false)?;
        if opts.dynamic {
            r.choice("time_shift_type", "exponential", &["exponential"])?;
        }
        let (spacing, steps_offset) = if opts.spacing {
            (Spacing::read(r, "linspace")?, r.usize("steps_offset", 0)?)
        } else {
            (Spacing::Linspace, 0)
        };
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

    /// Timesteps (integers) and sigmas without the final one for the DPM-Solvers'
    /// `set_timesteps(num_inference_steps | timesteps, mu)`: the spaced schedule up to
    /// `lambda_min_clipped`, or custom timesteps (which exclude respaced sigmas). Karras and Lu
    /// timesteps are rounded where `round`.
    pub fn for_spec(
        &mut self,
        class: &str,
        spec: &TimestepsSpec,
        lambda_min_clipped: f64,
        round: bool,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        self.apply_mu(class, spec.mu)?;
        match (spec.num_inference_steps, &spec.timesteps) {
            (Some(n), None) => {
                check_steps(class, n, self.noise.len())?;
                let last = self.clipped_last_timestep(lambda_min_clipped);
                let base = self.base_timesteps(last, n);
                Ok(self.compute(base, n, round))
            }
            (None, Some(ts)) => {
                if self.sigmas != SolverSigmas::Interp {
                    return Err(Error::invalid(format!(
                        "{class}: custom timesteps cannot be used with use_karras_sigmas, \
                         use_lu_lambdas, use_exponential_sigmas, use_beta_sigmas or use_flow_sigmas"
                    )));
                }
                // diffusers stores them as int64.
                let ts: Vec<f64> = ts
                    .iter()
                    .map(|&t| {
                        common::int_timestep(class, t.trunc(), self.noise.len()).map(|t| t as f64)
                    })
                    .collect::<Result<_>>()?;
                let n = ts.len();
                Ok(self.compute(ts, n, round))
            }
            _ => Err(Error::invalid(format!(
                "{class}: set_timesteps needs exactly one of num_inference_steps and timesteps"
            ))),
        }
    }

    /// The training length minus the trailing timesteps whose lambda is below
    /// `lambda_min_clipped` (which cuts the end of cosine schedules).
    pub fn clipped_last_timestep(&self, lambda_min_clipped: f64) -> usize {
        let clipped = self
            .noise
            .alphas_cumprod
            .iter()
            .rev()
            .take_while(|&&a| {
                let lambda = a.sqrt().ln() - (1.0 - a).sqrt().ln();
                (lambda as f64) < lambda_min_clipped
            })
            .count();
        self.noise.len() - clipped
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

    /// diffusers' name of the algorithm.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::PlusPlus => "dpmsolver++",
            Self::Plain => "dpmsolver",
            Self::SdePlusPlus => "sde-dpmsolver++",
            Self::Sde => "sde-dpmsolver",
        }
    }

    /// Whether the model output is converted to x0 (else to epsilon).
    pub(crate) fn data_prediction(self) -> bool {
        matches!(self, Self::PlusPlus | Self::SdePlusPlus)
    }

    pub(crate) fn stochastic(self) -> bool {
        matches!(self, Self::SdePlusPlus | Self::Sde)
    }
}

/// The fields every DPM-Solver class reads: `solver_order` (1–3), `algorithm_type` (of
/// `allowed`; "deis" means dpmsolver++) and `solver_type` (midpoint or heun; the UniPC / DEIS
/// types mean midpoint), recorded as diffusers registers them after mapping.
pub(crate) struct DpmSolverFields {
    pub solver_order: usize,
    pub algo: Algorithm,
    pub heun: bool,
}

impl DpmSolverFields {
    pub fn read(r: &mut ConfigReader, allowed: &[&str]) -> Result<Self> {
        let solver_order = r.usize("solver_order", 2)?;
        r.ensure(
            (1..=3).contains(&solver_order),
            "solver_order",
            "must be 1, 2 or 3",
        )?;
        let algo = Algorithm::read(r, allowed)?;
        r.record("algorithm_type", algo.name().into());
        let solver_type = r.choice(
            "solver_type",
            "midpoint",
            &["midpoint", "heun", "logrho", "bh1", "bh2"],
        )?;
        if !matches!(solver_type.as_str(), "midpoint" | "heun") {
            r.record("solver_type", "midpoint".into());
        }
        Ok(Self {
            solver_order,
            algo,
            heun: solver_type == "heun",
        })
    }
}

/// The fields both DPM-Solver classes read after their schedule: `lambda_min_clipped`,
/// `variance_type` and `final_sigmas_type`, checked against the algorithm and prediction
/// (`zero` needs a data-prediction algorithm, as does flow prediction), and the model output
/// conversion they make.
pub(crate) struct DpmSolverTail {
    pub conv: DpmConversion,
    pub final_sigma_min: bool,
    pub lambda_min_clipped: f64,
}

impl DpmSolverTail {
    pub fn read(
        r: &mut ConfigReader,
        algo: Algorithm,
        prediction: SolverPrediction,
        clip: X0Clip,
    ) -> Result<Self> {
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
            &format!(
                "zero is not supported with algorithm_type {}; use sigma_min",
                algo.name()
            ),
        )?;
        r.ensure(
            prediction != SolverPrediction::Flow || algo.data_prediction(),
            "prediction_type",
            "flow_prediction needs algorithm_type dpmsolver++ or sde-dpmsolver++",
        )?;
        Ok(Self {
            conv: DpmConversion {
                prediction,
                algo,
                clip,
                learned_variance,
            },
            final_sigma_min,
            lambda_min_clipped,
        })
    }
}

/// The order of a multistep update: lower while the history fills up (`warmed_up` previous
/// outputs) and for the last steps when asked.
pub(crate) fn multistep_order(
    solver_order: usize,
    warmed_up: usize,
    lower_final: bool,
    lower_second: bool,
) -> usize {
    if solver_order == 1 || warmed_up < 1 || lower_final {
        1
    } else if solver_order == 2 || warmed_up < 2 || lower_second {
        2
    } else {
        3
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

/// One DPM-Solver multistep update of the given order from sigma index `i` to `i + 1`;
/// `outputs` are the converted model outputs, oldest first (the newest is the current step's).
#[allow(clippy::too_many_arguments)]
pub(crate) fn multistep_update(
    algo: Algorithm,
    heun: bool,
    kind: SigmaKind,
    sigmas: &[f32],
    i: usize,
    order: usize,
    outputs: &[&Tensor],
    sample: &Tensor,
    noise: Option<&Tensor>,
) -> Result<Tensor> {
    let m = |k: usize| outputs[outputs.len() - 1 - k];
    let (alpha_t, sigma_t, lambda_t) = kind.alpha_sigma_lambda(sigmas[i + 1]);
    let (alpha_s0, sigma_s0, lambda_s0) = kind.alpha_sigma_lambda(sigmas[i]);
    let h = lambda_t - lambda_s0;
    let c = UpdateCoefficients::new(algo, alpha_t, sigma_t, alpha_s0, sigma_s0, h);
    let mut x = (mul_s(sample, c.x)? + mul_s(m(0), c.d0)?)?;
    if order >= 2 {
        let (_, _, lambda_s1) = kind.alpha_sigma_lambda(sigmas[i - 1]);
        let r0 = (lambda_s0 - lambda_s1) / h;
        let d1_0 = mul_s(&(m(0) - m(1))?, 1.0 / r0)?;
        if order == 2 {
            let c1 = if heun { c.d1 } else { c.d1_midpoint };
            x = (x + mul_s(&d1_0, c1)?)?;
        } else {
            let (_, _, lambda_s2) = kind.alpha_sigma_lambda(sigmas[i - 2]);
            let r1 = (lambda_s1 - lambda_s2) / h;
            let d1_1 = mul_s(&(m(1) - m(2))?, 1.0 / r1)?;
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

/// How a DPM-Solver turns the model output into what it integrates.
pub(crate) struct DpmConversion {
    pub prediction: SolverPrediction,
    pub algo: Algorithm,
    pub clip: X0Clip,
    /// `variance_type` learned / learned_range: the model also predicts a variance in its extra
    /// channels, which the solver drops.
    pub learned_variance: bool,
}

impl DpmConversion {
    /// x0 for DPM-Solver++, epsilon for DPM-Solver (thresholded through x0 if configured), at
    /// the raw `sigma` in the sigma space `kind`.
    pub fn convert(
        &self,
        class: &str,
        kind: SigmaKind,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> Result<Tensor> {
        let model_output = if self.learned_variance && self.prediction == SolverPrediction::Epsilon
        {
            model_output.narrow(1, 0, sample.dim(1)?)?
        } else {
            model_output.clone()
        };
        let (a, s, _) = kind.alpha_sigma_lambda(sigma);
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
        let eps = solver_eps(class, self.prediction, &model_output, sample, a, s)?;
        if self.clip.thresholding {
            let x0 = self.clip.apply(div_s(&(sample - mul_s(&eps, s)?)?, a)?)?;
            return div_s(&(sample - mul_s(&x0, a)?)?, s);
        }
        Ok(eps)
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
