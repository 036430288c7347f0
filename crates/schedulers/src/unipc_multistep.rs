//! UniPC (Zhao et al. 2023): a multistep predictor (UniP) with a corrector (UniC) that reuses
//! the next model evaluation, in the B(h) variants bh1 / bh2.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{div_s, mul_s, NoiseSchedule, PredictionType, Spacing, X0Clip};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::multistep::{solver_initial, solver_schedule, vp_alpha_sigma_lambda, vp_eps, vp_x0};
use crate::scheduler::{check_steps, Scheduler, StepOutput};
use crate::sigma_schedule::SigmaState;

const CLASS: &str = "UniPCMultistepScheduler";

pub struct UniPcMultistepScheduler {
    config: SchedulerConfig,
    noise: NoiseSchedule,
    prediction: PredictionType,
    clip: X0Clip,
    solver_order: usize,
    predict_x0: bool,
    bh2: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    use_karras_sigmas: bool,
    final_sigma_min: bool,
    spacing: Spacing,
    steps_offset: usize,
    state: SigmaState,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
}

impl UniPcMultistepScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let noise = NoiseSchedule::read(&mut r, 0.0001, 0.02, "linear", true)?;
        let solver_order = r.usize("solver_order", 2)?;
        r.ensure(solver_order >= 1, "solver_order", "must be at least 1")?;
        let prediction = PredictionType::read(&mut r)?;
        let clip = X0Clip::read(&mut r, false, false)?;
        let predict_x0 = r.bool("predict_x0", true)?;
        let bh2 = r.choice("solver_type", "bh2", &["bh1", "bh2"])? == "bh2";
        let lower_order_final = r.bool("lower_order_final", true)?;
        let disable_corrector = r.usize_list("disable_corrector")?;
        let use_karras_sigmas = r.bool("use_karras_sigmas", false)?;
        for unsupported in [
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_flow_sigmas",
        ] {
            let v = r.bool(unsupported, false)?;
            r.ensure(!v, unsupported, "is not supported")?;
        }
        let spacing = Spacing::read(&mut r, "linspace")?;
        let steps_offset = r.usize("steps_offset", 0)?;
        let final_sigma_min =
            r.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        let (ts, sig) = solver_initial(&noise);
        Ok(Self {
            config: r.finish(),
            noise,
            prediction,
            clip,
            solver_order,
            predict_x0,
            bh2,
            lower_order_final,
            disable_corrector,
            use_karras_sigmas,
            final_sigma_min,
            spacing,
            steps_offset,
            state: SigmaState::new(ts, sig, true),
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
        })
    }

    fn convert(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        let (a, s, _) = vp_alpha_sigma_lambda(sigma);
        if self.predict_x0 {
            self.clip
                .apply(vp_x0(self.prediction, model_output, sample, a, s)?)
        } else {
            vp_eps(self.prediction, model_output, sample, a, s)
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
        let (alpha_t, sigma_t, lambda_t) = vp_alpha_sigma_lambda(self.state.sigmas[t]);
        let (alpha_s0, sigma_s0, lambda_s0) = vp_alpha_sigma_lambda(self.state.sigmas[s0]);
        let h = lambda_t - lambda_s0;
        let m0 = self.m(0)?;
        let mut rks = vec![];
        let mut d1s = vec![];
        for k in 1..order {
            let (_, _, lambda_k) = vp_alpha_sigma_lambda(self.state.sigmas[hist(k)]);
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
        check_steps(CLASS, n, self.noise.len())?;
        let (ts, sig) = solver_schedule(
            &self.noise,
            self.spacing,
            self.noise.len(),
            n,
            self.steps_offset,
            self.use_karras_sigmas,
            true,
            self.final_sigma_min,
        );
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
        _rng: &mut dyn NoiseSource,
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
        let prev = self.predict(self.this_order, i, &sample)?;
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
