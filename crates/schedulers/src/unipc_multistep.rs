//! UniPC (Zhao et al. 2023): a multistep predictor (UniP) with a corrector (UniC) that reuses
//! the next model evaluation, in the B(h) variants bh1 / bh2.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{div_s, mul_s, NoiseSchedule, SigmaSpacing, X0Clip};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::multistep::{
    solver_eps, solver_initial, solver_x0, SigmaKind, SolverOptions, SolverPrediction,
    SolverSchedule, SolverSigmas,
};
use crate::scheduler::{check_steps, Scheduler, StepOutput, TimestepsSpec};
use crate::sigma_schedule::{train_sigmas_and_logs, with_final, SigmaState};

const CLASS: &str = "UniPCMultistepScheduler";

pub struct UniPcMultistepScheduler {
    config: SchedulerConfig,
    sched: SolverSchedule,
    prediction: SolverPrediction,
    clip: X0Clip,
    solver_order: usize,
    predict_x0: bool,
    bh2: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    final_sigma_min: bool,
    /// `sigma_min` / `sigma_max`: the ends of respaced schedules, when set.
    sigma_bounds: (Option<f64>, Option<f64>),
    /// Flow sigmas: `use_dynamic_shifting` with the shift applied by `mu` (exponential or linear
    /// `time_shift_type`), and `shift_terminal`.
    dynamic_shifting: bool,
    linear_time_shift: bool,
    shift_terminal: Option<f64>,
    state: SigmaState,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
    /// diffusers' `solver_p`: another scheduler used as the predictor (UniPC then only
    /// corrects). Set with `set_solver_p`.
    solver_p: Option<Box<dyn Scheduler>>,
}

impl UniPcMultistepScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let noise =
            NoiseSchedule::read(&mut r, 0.0001, 0.02, "linear", true)?.finite_terminal_sigma();
        let solver_order = r.usize("solver_order", 2)?;
        r.ensure(solver_order >= 1, "solver_order", "must be at least 1")?;
        let prediction = SolverPrediction::read(&mut r, true)?;
        let clip = X0Clip::read(&mut r, false, false)?;
        let predict_x0 = r.bool("predict_x0", true)?;
        r.ensure(
            predict_x0 || prediction != SolverPrediction::Flow,
            "prediction_type",
            "flow_prediction needs predict_x0",
        )?;
        // diffusers maps DPM-Solver's solver types to bh2 (so a DPM-Solver config works).
        let bh2 = r.choice(
            "solver_type",
            "bh2",
            &["bh1", "bh2", "midpoint", "heun", "logrho"],
        )? != "bh1";
        r.record("solver_type", (if bh2 { "bh2" } else { "bh1" }).into());
        let lower_order_final = r.bool("lower_order_final", true)?;
        let disable_corrector = r.usize_list("disable_corrector")?;
        let sched = SolverSchedule::read(
            &mut r,
            noise,
            SolverOptions {
                lu: false,
                dynamic: false,
                spacing: true,
            },
        )?;
        let final_sigma_min =
            r.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        let dynamic_shifting = r.bool("use_dynamic_shifting", false)?;
        let linear_time_shift =
            r.choice("time_shift_type", "exponential", &["exponential", "linear"])? == "linear";
        let sigma_bounds = (r.opt_f64("sigma_min")?, r.opt_f64("sigma_max")?);
        let shift_terminal = r.opt_f64("shift_terminal")?.filter(|&v| v != 0.0);
        r.ensure(
            shift_terminal.is_none() || sched.flow_sigmas,
            "shift_terminal",
            "is only supported with use_flow_sigmas",
        )?;
        // A predictor scheduler's config (our extension: diffusers cannot serialise `solver_p`)
        // is kept for the registry, which builds it (see `set_solver_p`).
        if let Some(p) = cfg.map.get("solver_p").filter(|v| !v.is_null()) {
            r.record("solver_p", p.clone());
        }
        let (ts, sig) = solver_initial(&sched.noise);
        Ok(Self {
            config: r.finish(),
            sched,
            prediction,
            clip,
            solver_order,
            predict_x0,
            bh2,
            lower_order_final,
            disable_corrector,
            final_sigma_min,
            sigma_bounds,
            dynamic_shifting,
            linear_time_shift,
            shift_terminal,
            state: SigmaState::new(ts, sig, true),
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
            solver_p: None,
        })
    }

    fn kind(&self) -> SigmaKind {
        self.sched.kind()
    }

    /// Uses `p` as the predictor (diffusers' `solver_p`): each step's prediction is `p`'s step
    /// from the raw model output, and UniPC adds its corrector. `p` is given the same number of
    /// steps by `set_timesteps`, so its timesteps should match UniPC's (same training schedule
    /// and spacing).
    pub fn set_solver_p(&mut self, p: Box<dyn Scheduler>) {
        self.solver_p = Some(p);
    }

    fn convert(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        let (a, s, _) = self.kind().alpha_sigma_lambda(sigma);
        if self.predict_x0 {
            self.clip.apply(solver_x0(
                self.prediction,
                model_output,
                sample,
                sigma,
                a,
                s,
            )?)
        } else {
            solver_eps(CLASS, self.prediction, model_output, sample, a, s)
        }
    }

    /// Timesteps and sigmas (with the final one) for `n` steps, or for the given flow sigmas.
    fn schedule(
        &self,
        n: usize,
        custom_sigmas: Option<&[f64]>,
        mu: Option<f64>,
    ) -> Result<(Vec<f64>, Vec<f32>)> {
        let sched = &self.sched;
        let n_train = sched.noise.len();
        let timesteps = sched.base_timesteps(n_train, n);
        let (train, logs) = train_sigmas_and_logs(&sched.noise);
        let last_or_zero = |s: &[f64]| {
            if self.final_sigma_min {
                s[s.len() - 1] as f32
            } else {
                0.0
            }
        };
        match sched.sigmas {
            SolverSigmas::Respaced(spacing) => {
                if custom_sigmas.is_some() {
                    return Err(Error::invalid(format!(
                        "{CLASS}: custom sigmas cannot be respaced (use_karras/exponential/beta_sigmas)"
                    )));
                }
                let min = self.sigma_bounds.0.unwrap_or(train[0] as f64);
                let max = self.sigma_bounds.1.unwrap_or(train[train.len() - 1] as f64);
                let mut s = spacing.between(min, max, n).expect("a respacing");
                let ts: Vec<f64> = if sched.flow_sigmas && spacing == SigmaSpacing::Karras {
                    s = s.iter().map(|&x| x / (x + 1.0)).collect();
                    s.iter().map(|&x| (x * n_train as f64).trunc()).collect()
                } else {
                    let round = spacing == SigmaSpacing::Karras;
                    s.iter()
                        .map(|&x| {
                            let t = crate::common::sigma_to_t(x, &logs);
                            if round {
                                crate::common::round_half_even(t)
                            } else {
                                t.trunc()
                            }
                        })
                        .collect()
                };
                let last = last_or_zero(&s);
                Ok((ts, with_final(&s, last)))
            }
            SolverSigmas::Flow { shift } => {
                let mut s: Vec<f64> = match custom_sigmas {
                    Some(s) => s.to_vec(),
                    None => {
                        let mut v = crate::common::linspace(1.0, 1.0 / n_train as f64, n + 1);
                        v.pop();
                        v
                    }
                };
                s = if self.dynamic_shifting {
                    let mu = mu.ok_or_else(|| {
                        Error::invalid(format!(
                            "{CLASS}: mu must be given to set_timesteps when use_dynamic_shifting is on"
                        ))
                    })?;
                    let m = if self.linear_time_shift { mu } else { mu.exp() };
                    s.iter().map(|&t| m / (m + (1.0 / t - 1.0))).collect()
                } else {
                    s.iter()
                        .map(|&t| shift * t / (1.0 + (shift - 1.0) * t))
                        .collect()
                };
                if let Some(st) = self.shift_terminal {
                    let scale = (1.0 - s[s.len() - 1]) / (1.0 - st);
                    s = s.iter().map(|&t| 1.0 - (1.0 - t) / scale).collect();
                }
                // A first sigma of 1 (alpha 0) would make log(alpha) infinite.
                if (s[0] - 1.0).abs() < 1e-6 {
                    s[0] -= 1e-6;
                }
                let ts = s.iter().map(|&x| (x * n_train as f64).trunc()).collect();
                let last = last_or_zero(&s);
                Ok((ts, with_final(&s, last)))
            }
            _ => {
                let s: Vec<f64> = timesteps
                    .iter()
                    .map(|&t| crate::common::interp_index(t, &train))
                    .collect();
                let last = if self.final_sigma_min {
                    sched.sigma_min()
                } else {
                    0.0
                };
                Ok((timesteps, with_final(&s, last)))
            }
        }
    }

    /// The k-th most recent converted model output (0 = newest).
    fn m(&self, k: usize) -> Result<&Tensor> {
        self.model_outputs[self.solver_order - 1 - k]
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{CLASS}: missing previous model output")))
    }

    /// The shared core of UniP and UniC between sigma indices `s0` and `t`: the first-order
    /// term, B(h) and the right-hand side b of the order conditions, and the differences D1s with
    /// their ratios rks. `hist` gives the sigma index of the k-th older output (k = 1..order).
    #[allow(clippy::type_complexity)]
    fn terms(
        &self,
        order: usize,
        s0: usize,
        t: usize,
        x: &Tensor,
        hist: impl Fn(usize) -> usize,
    ) -> Result<(Tensor, f32, Vec<f64>, Vec<f64>, Vec<Tensor>)> {
        let (alpha_t, sigma_t, lambda_t) = self.kind().alpha_sigma_lambda(self.state.sigmas[t]);
        let (alpha_s0, sigma_s0, lambda_s0) = self.kind().alpha_sigma_lambda(self.state.sigmas[s0]);
        let h = lambda_t - lambda_s0;
        let m0 = self.m(0)?;
        let mut rks = vec![];
        let mut d1s = vec![];
        for k in 1..order {
            let (_, _, lambda_k) = self.kind().alpha_sigma_lambda(self.state.sigmas[hist(k)]);
            let rk = (lambda_k - lambda_s0) / h;
            rks.push(rk as f64);
            d1s.push(div_s(&(self.m(k)? - m0)?, rk)?);
        }
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0f32;
        let mut b = vec![];
        for k in 1..=order {
            b.push((h_phi_k * factorial / b_h) as f64);
            factorial *= (k + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        let (x_ratio, w) = if self.predict_x0 {
            (sigma_t / sigma_s0, alpha_t)
        } else {
            (alpha_t / alpha_s0, sigma_t)
        };
        let base = (mul_s(x, x_ratio)? - mul_s(m0, w * h_phi_1)?)?;
        Ok((base, w * b_h, rks, b, d1s))
    }

    /// The UniP predictor from sigma index `i` to `i + 1`.
    fn predict(&self, order: usize, i: usize, x: &Tensor) -> Result<Tensor> {
        let (base, scale, rks, b, d1s) = self.terms(order, i, i + 1, x, |k| i - k)?;
        if d1s.is_empty() {
            // diffusers subtracts B(h) * 0 here, which is NaN for bh1 on a final sigma of 0
            // (B(h) = h = -inf); we return the finite first-order result.
            return Ok(base);
        }
        let rhos = if order == 2 {
            vec![0.5]
        } else {
            solve(&rks, &b, order - 1)?
        };
        let res = weighted_sum(&rhos, &d1s)?;
        Ok((base - mul_s(&res, scale)?)?)
    }

    /// The UniC corrector of the previous step's prediction, with the new model output.
    fn correct(
        &self,
        order: usize,
        i: usize,
        this_output: &Tensor,
        last_sample: &Tensor,
    ) -> Result<Tensor> {
        let (base, scale, rks, b, d1s) =
            self.terms(order, i - 1, i, last_sample, |k| i - (k + 1))?;
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(&rks, &b, order)?
        };
        let d1_t = (this_output - self.m(0)?)?;
        let mut corr = mul_s(&d1_t, rhos[rhos.len() - 1] as f32)?;
        if !d1s.is_empty() {
            corr = (weighted_sum(&rhos[..rhos.len() - 1], &d1s)? + corr)?;
        }
        Ok((base - mul_s(&corr, scale)?)?)
    }
}

/// Solves R rho = b for the leading `n`×`n` block, with R[k][j] = rks[j]^k.
fn solve(rks: &[f64], b: &[f64], n: usize) -> Result<Vec<f64>> {
    let mut a: Vec<Vec<f64>> = (0..n)
        .map(|k| {
            (0..n)
                .map(|j| rks[j].powi(k as i32))
                .chain([b[k]])
                .collect()
        })
        .collect();
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .ok_or_else(|| Error::invalid("UniPC: empty system"))?;
        a.swap(col, piv);
        if a[col][col] == 0.0 {
            return Err(Error::invalid(
                "UniPC: singular order-condition system (repeated sigmas?)",
            ));
        }
        let pivot_row = a[col].clone();
        for (row, r) in a.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot_row[col];
                for (x, p) in r.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    Ok((0..n).map(|k| a[k][n] / a[k][k]).collect())
}

fn weighted_sum(w: &[f64], ts: &[Tensor]) -> Result<Tensor> {
    let mut acc = mul_s(&ts[0], w[0] as f32)?;
    for (wk, t) in w.iter().zip(ts).skip(1) {
        acc = (acc + mul_s(t, *wk as f32)?)?;
    }
    Ok(acc)
}

impl Scheduler for UniPcMultistepScheduler {
    crate::multistep::solver_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.set_timesteps_with(&TimestepsSpec::steps(n))
    }

    fn set_timesteps_with(&mut self, spec: &TimestepsSpec) -> Result<()> {
        spec.reject_others(CLASS, &["sigmas", "mu"])?;
        if spec.sigmas.is_some() && !self.sched.flow_sigmas {
            return Err(Error::invalid(format!(
                "{CLASS}: custom sigmas need use_flow_sigmas"
            )));
        }
        let n = match (spec.num_inference_steps, &spec.sigmas) {
            (_, Some(s)) => s.len(),
            (Some(n), None) => n,
            (None, None) => {
                return Err(Error::invalid(format!(
                    "{CLASS}: set_timesteps needs num_inference_steps or sigmas"
                )))
            }
        };
        check_steps(CLASS, n, self.sched.noise.len())?;
        let (ts, sig) = self.schedule(n, spec.sigmas.as_deref(), spec.mu)?;
        if let Some(p) = self.solver_p.as_mut() {
            p.set_timesteps(ts.len())?;
        }
        self.state.reset(ts, sig);
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        self.last_sample = None;
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
        let mut sample = sample.clone();
        if i > 0 && !self.disable_corrector.contains(&(i - 1)) {
            if let Some(last) = self.last_sample.as_ref() {
                sample = self.correct(self.this_order, i, &converted, last)?;
            }
        }
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));
        let len = self.state.timesteps.len();
        let order = if self.lower_order_final {
            self.solver_order.min(len - i)
        } else {
            self.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = match self.solver_p.as_mut() {
            // The predictor steps from the raw model output at the current timestep.
            Some(p) => p.step(model_output, t, &sample, rng)?.prev_sample,
            None => self.predict(self.this_order, i, &sample)?,
        };
        self.last_sample = Some(sample);
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
