//! PNDM (Liu et al. 2022): pseudo numerical methods — Runge–Kutta warm-up steps (PRK), then
//! linear multistep (PLMS). Stable Diffusion 1.x's default, with `skip_prk_steps`.

use candle_core::Tensor;
use diffuse_core::{Error, NoiseSource, Result};

use crate::common::{self, NoiseSchedule, PredictionType, Spacing};
use crate::config::{ConfigReader, SchedulerConfig};
use crate::scheduler::{check_steps, Scheduler, StepOutput};

const CLASS: &str = "PNDMScheduler";
const PNDM_ORDER: usize = 4;

pub struct PndmScheduler {
    config: SchedulerConfig,
    noise: NoiseSchedule,
    prediction: PredictionType,
    final_alpha_cumprod: f32,
    skip_prk_steps: bool,
    spacing: Spacing,
    steps_offset: usize,
    num_inference_steps: Option<usize>,
    prk_count: usize,
    timesteps: Vec<f64>,
    // Loop state.
    counter: usize,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl PndmScheduler {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let mut r = ConfigReader::new(CLASS, cfg);
        let noise = NoiseSchedule::read(&mut r, 0.0001, 0.02, "linear", false)?;
        let skip_prk_steps = r.bool("skip_prk_steps", false)?;
        let set_alpha_to_one = r.bool("set_alpha_to_one", false)?;
        let prediction = PredictionType::read(&mut r)?;
        r.ensure(
            prediction != PredictionType::Sample,
            "prediction_type",
            "PNDM supports epsilon and v_prediction",
        )?;
        let spacing = Spacing::read(&mut r, "leading")?;
        let steps_offset = r.usize("steps_offset", 0)?;
        let final_alpha_cumprod = if set_alpha_to_one {
            1.0
        } else {
            noise.alphas_cumprod[0]
        };
        Ok(Self {
            config: r.finish(),
            noise,
            prediction,
            final_alpha_cumprod,
            skip_prk_steps,
            spacing,
            steps_offset,
            num_inference_steps: None,
            prk_count: 0,
            timesteps: vec![],
            counter: 0,
            ets: vec![],
            cur_model_output: None,
            cur_sample: None,
        })
    }

    fn stride(&self) -> Result<i64> {
        let n = self
            .num_inference_steps
            .ok_or_else(|| Error::invalid(format!("{CLASS}: call set_timesteps first")))?;
        Ok((self.noise.len() / n) as i64)
    }

    /// Fourth-order Runge–Kutta warm-up: four model evaluations per step.
    fn step_prk(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let half = self.stride()? / 2;
        let prev_t = t - if self.counter % 2 == 1 { 0 } else { half };
        let t = self.timesteps[self.counter / 4 * 4] as i64;
        let acc = |cur: &Option<Tensor>, w: f64| -> Result<Tensor> {
            let term = model_output.affine(w, 0.0)?;
            Ok(match cur {
                Some(c) => (c + term)?,
                None => term,
            })
        };
        let mut eps = model_output.clone();
        match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(acc(&self.cur_model_output, 1.0 / 6.0)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => self.cur_model_output = Some(acc(&self.cur_model_output, 1.0 / 3.0)?),
            _ => {
                eps = acc(&self.cur_model_output, 1.0 / 6.0)?;
                self.cur_model_output = None;
            }
        }
        let cur_sample = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur_sample, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(prev)
    }

    /// Linear multistep: combines up to four past model outputs (Adams–Bashforth weights).
    fn step_plms(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        if !self.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::invalid(format!(
                "{CLASS}: PLMS steps need the PRK warm-up to have run"
            )));
        }
        let stride = self.stride()?;
        let (mut t, mut prev_t) = (t, t - stride);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += stride;
        }
        let e = &self.ets;
        let n = e.len();
        let mut sample = sample.clone();
        let eps = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if n == 1 && self.counter == 1 {
            sample = self.cur_sample.take().unwrap_or(sample);
            ((model_output + &e[0])? / 2.0)?
        } else if n == 2 {
            ((e[1].affine(3.0, 0.0)? - &e[0])? / 2.0)?
        } else if n == 3 {
            ((e[2].affine(23.0, 0.0)? - e[1].affine(16.0, 0.0)?)? + e[0].affine(5.0, 0.0)?)?
                .affine(1.0 / 12.0, 0.0)?
        } else {
            let s = (((e[n - 1].affine(55.0, 0.0)? - e[n - 2].affine(59.0, 0.0)?)?
                + e[n - 3].affine(37.0, 0.0)?)?
                - e[n - 4].affine(9.0, 0.0)?)?;
            s.affine(1.0 / 24.0, 0.0)?
        };
        let prev = self.prev_sample(&sample, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(prev)
    }

    /// Formula (9) of the PNDM paper: x_{t-δ} from x_t and the (combined) epsilon.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, eps: &Tensor) -> Result<Tensor> {
        let a_t = self.noise.acp(t, self.final_alpha_cumprod);
        let a_prev = self.noise.acp(prev_t, self.final_alpha_cumprod);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.prediction {
            PredictionType::VPrediction => {
                common::lin2(eps, a_t.sqrt() as f64, sample, b_t.sqrt() as f64)?
            }
            _ => eps.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt() as f64;
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        common::lin2(sample, sample_coeff, &eps, -((a_prev - a_t) / denom) as f64)
    }
}

impl Scheduler for PndmScheduler {
    common::alpha_scheduler_common!();

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(CLASS, n, self.noise.len())?;
        let n_train = self.noise.len();
        // Ascending base timesteps.
        let mut base = common::int_timesteps(self.spacing, n_train, n, self.steps_offset);
        base.reverse();
        let (prk, plms): (Vec<f64>, Vec<f64>) = if self.skip_prk_steps {
            // The second-to-last timestep is repeated: the first PLMS step needs two evaluations.
            let k = base.len();
            let mut v: Vec<f64> = base[..k - 1].to_vec();
            if k >= 2 {
                v.push(base[k - 2]);
            }
            v.push(base[k - 1]);
            v.reverse();
            (vec![], v)
        } else {
            if n < PNDM_ORDER {
                return Err(Error::invalid(format!(
                    "{CLASS}: PRK steps need at least {PNDM_ORDER} inference steps"
                )));
            }
            let half = (n_train / n / 2) as f64;
            let last: Vec<f64> = base[base.len() - PNDM_ORDER..].to_vec();
            let mut prk = vec![];
            for t in last {
                prk.push(t);
                prk.push(t + half);
            }
            prk.pop();
            let mut doubled: Vec<f64> = prk.iter().flat_map(|&t| [t, t]).collect();
            doubled.remove(0);
            doubled.pop();
            doubled.reverse();
            let mut plms = base[..base.len() - 3].to_vec();
            plms.reverse();
            (doubled, plms)
        };
        self.prk_count = prk.len();
        self.timesteps = prk.into_iter().chain(plms).collect();
        self.num_inference_steps = Some(n);
        self.ets.clear();
        self.counter = 0;
        self.cur_model_output = None;
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        _rng: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let t = common::int_timestep(CLASS, t, self.noise.len())?;
        let prev_sample = if self.counter < self.prk_count && !self.skip_prk_steps {
            self.step_prk(model_output, t, sample)?
        } else {
            self.step_plms(model_output, t, sample)?
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: None,
        })
    }
}
