//! Pieces shared by the schedulers: noise schedules, timestep spacings, sigma schedules,
//! predictions and small tensor helpers.
//!
//! diffusers mixes float32 torch tensors (betas, alphas_cumprod, sigmas) with float64 numpy
//! and Python arithmetic. We round to f32 exactly where diffusers stores f32 values, and do
//! host-side maths in f64 elsewhere, so schedules match to the last bit or two.

use candle_core::{DType, Tensor};
use diffuse_core::{Error, Result};

use crate::config::ConfigReader;

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    pub fn read(r: &mut ConfigReader) -> Result<Self> {
        Ok(
            match r
                .choice(
                    "prediction_type",
                    "epsilon",
                    &["epsilon", "v_prediction", "sample"],
                )?
                .as_str()
            {
                "v_prediction" => Self::VPrediction,
                "sample" => Self::Sample,
                _ => Self::Epsilon,
            },
        )
    }
}

/// How inference timesteps are spread over the training range (Table 2 of arXiv:2305.08891).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    pub fn read(r: &mut ConfigReader, default: &str) -> Result<Self> {
        Ok(
            match r
                .choice(
                    "timestep_spacing",
                    default,
                    &["linspace", "leading", "trailing"],
                )?
                .as_str()
            {
                "linspace" => Self::Linspace,
                "leading" => Self::Leading,
                _ => Self::Trailing,
            },
        )
    }
}

/// The training noise schedule: betas and alphas_cumprod, both f32 as diffusers stores them.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub betas: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
    /// `beta_schedule == "squaredcos_cap_v2"` (some solvers truncate rather than round their
    /// Karras timesteps then).
    pub cosine: bool,
    /// `rescale_betas_zero_snr` is on.
    pub zero_snr: bool,
}

impl NoiseSchedule {
    /// Reads `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`, `trained_betas`
    /// and `rescale_betas_zero_snr` (when `allow_zero_snr`) with the given class defaults.
    pub fn read(
        r: &mut ConfigReader,
        beta_start: f64,
        beta_end: f64,
        schedule: &str,
        allow_zero_snr: bool,
    ) -> Result<Self> {
        let n = r.usize("num_train_timesteps", 1000)?;
        r.ensure(n >= 2, "num_train_timesteps", "must be at least 2")?;
        let start = r.f64("beta_start", beta_start)?;
        let end = r.f64("beta_end", beta_end)?;
        let kind = r.choice(
            "beta_schedule",
            schedule,
            &["linear", "scaled_linear", "squaredcos_cap_v2"],
        )?;
        let trained = r.opt_f64_list("trained_betas")?;
        let zero_snr = if allow_zero_snr {
            r.bool("rescale_betas_zero_snr", false)?
        } else {
            false
        };
        let mut betas: Vec<f32> = match (&trained, kind.as_str()) {
            (Some(t), _) => {
                r.ensure(
                    t.len() == n,
                    "trained_betas",
                    "length must equal num_train_timesteps",
                )?;
                t.iter().map(|&b| b as f32).collect()
            }
            (None, "linear") => torch_linspace_f32(start as f32, end as f32, n),
            (None, "scaled_linear") => {
                torch_linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, _) => betas_for_alpha_bar(n),
        };
        r.ensure(
            betas.iter().all(|b| b.is_finite() && *b > 0.0 && *b < 1.0) || zero_snr,
            "beta_schedule",
            "betas must lie in (0, 1)",
        )?;
        if zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas_cumprod = cumprod_of_alphas(&betas);
        Ok(Self {
            betas,
            alphas_cumprod,
            cosine: trained.is_none() && kind == "squaredcos_cap_v2",
            zero_snr,
        })
    }

    /// The sigma-based schedulers (Euler, Euler ancestral, DPM-Solver, UniPC) replace a zero
    /// terminal alphas_cumprod by 2^-24 so that the last sigma stays finite.
    pub fn finite_terminal_sigma(mut self) -> Self {
        if self.zero_snr {
            if let Some(last) = self.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        self
    }

    pub fn len(&self) -> usize {
        self.betas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// `alphas_cumprod[t]` for an integer timestep, with `final` for t < 0.
    pub fn acp(&self, t: i64, final_alpha: f32) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            final_alpha
        }
    }

    /// Karras-style sigmas `sqrt((1 - acp) / acp)` per training timestep, as f32 torch computes.
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`: torch fills the two halves from each end.
pub fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=float64)`, halves filled from each end like the f32 one.
pub fn torch_linspace_f64(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f64
            } else {
                end - step * (n - 1 - i) as f64
            }
        })
        .collect()
}

/// torch's CPU cumprod accumulates in double and stores float.
fn cumprod_of_alphas(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// The cosine ("squaredcos_cap_v2") schedule, computed in f64 like diffusers, stored as f32.
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Zero terminal SNR rescaling (arXiv:2305.08891, Algorithm 1), in f32 like diffusers.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let acp = cumprod_of_alphas(betas);
    let mut s: Vec<f32> = acp.iter().map(|a| a.sqrt()).collect();
    let (s0, st) = (s[0], s[s.len() - 1]);
    for v in s.iter_mut() {
        *v = (*v - st) * (s0 / (s0 - st));
    }
    let bar: Vec<f32> = s.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// Integer inference timesteps for the alphas_cumprod schedulers (DDPM, DDIM, PNDM-style),
/// descending.
pub fn int_timesteps(spacing: Spacing, n_train: usize, n: usize, steps_offset: usize) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => linspace(0.0, (n_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(round_half_even)
            .collect(),
        Spacing::Leading => {
            let ratio = n_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        Spacing::Trailing => trailing(n_train, n)
            .into_iter()
            .map(|t| t.round() - 1.0)
            .collect(),
    }
}

/// Float inference timesteps of the sigma schedulers (Euler, Heun, LMS, KDPM2), descending and
/// rounded to f32 like numpy's float32 arrays.
pub fn float_timesteps(
    spacing: Spacing,
    n_train: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    let v: Vec<f64> = match spacing {
        Spacing::Linspace => linspace(0.0, (n_train - 1) as f64, n)
            .into_iter()
            .rev()
            .collect(),
        Spacing::Leading => {
            let ratio = n_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f64 + steps_offset as f64)
                .collect()
        }
        Spacing::Trailing => trailing(n_train, n)
            .into_iter()
            .map(|t| t.round() - 1.0)
            .collect(),
    };
    v.into_iter().map(|t| t as f32 as f64).collect()
}

/// Timesteps of the multistep solvers (DPM-Solver, UniPC): n+1 points, the last dropped.
pub fn solver_timesteps(
    spacing: Spacing,
    last_timestep: usize,
    n_train: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => {
            let mut v: Vec<f64> = linspace(0.0, (last_timestep - 1) as f64, n + 1)
                .into_iter()
                .rev()
                .map(round_half_even)
                .collect();
            v.pop();
            v
        }
        Spacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = n_train as f64 / n as f64;
            let mut v = vec![];
            let mut t = last_timestep as f64;
            while t > 0.0 {
                v.push(round_half_even(t) - 1.0);
                t -= ratio;
            }
            v
        }
    }
}

/// `np.arange(n_train, 0, -n_train / n)`.
fn trailing(n_train: usize, n: usize) -> Vec<f64> {
    let ratio = n_train as f64 / n as f64;
    let count = (n_train as f64 / ratio).ceil() as usize;
    (0..count)
        .map(|i| n_train as f64 - i as f64 * ratio)
        .map(round_half_even)
        .collect()
}

/// numpy rounds half to even.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// `np.linspace(a, b, n)` (float64, endpoint included).
pub fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![a],
        _ => {
            let step = (b - a) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| a + i as f64 * step).collect();
            v[n - 1] = b;
            v
        }
    }
}

/// `np.interp(x, arange(len(fp)), fp)` in f64.
pub fn interp_index(x: f64, fp: &[f32]) -> f64 {
    if x <= 0.0 {
        return fp[0] as f64;
    }
    let last = fp.len() - 1;
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    let (a, b) = (fp[i] as f64, fp[i + 1] as f64);
    // numpy's formula: slope * (x - xp[i]) + fp[i]
    (b - a) * w + a
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of a sigma, by interpolating
/// in log-sigma space (`log_sigmas` ascending with t).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let count = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    // argmax of the cumulative count is the last index where dists >= 0 (first max), 0 if none.
    let low = if count == 0 { 0 } else { count - 1 }.min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Karras et al. (2022) sigmas between `sigma_max` and `sigma_min`, rho = 7.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in log space from `sigma_max` down to `sigma_min`
/// (`use_exponential_sigmas`).
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// Sigmas at the quantiles of a Beta(0.6, 0.6) distribution ("Beta Sampling is All You Need",
/// arXiv:2407.12173; `use_beta_sigmas`): dense near both ends of the range.
pub fn beta_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let (alpha, beta) = (0.6, 0.6);
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| sigma_min + beta_ppf(1.0 - r, alpha, beta) * (sigma_max - sigma_min))
        .collect()
}

/// ln Γ(x) for x > 0 (Lanczos approximation, g = 7; relative error ~1e-15).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    for (i, &c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularised incomplete beta function I_x(a, b), by its continued fraction (evaluated
/// with Lentz's method on the side where it converges fast).
fn beta_cdf(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = a * x.ln() + b * (1.0 - x).ln() - (ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b));
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - beta_cdf(1.0 - x, b, a);
    }
    let tiny = 1e-300;
    let (mut c, mut d) = (1.0, 1.0 - (a + b) * x / (a + 1.0));
    d = 1.0 / if d.abs() < tiny { tiny } else { d };
    let mut f = d;
    for m in 1..500 {
        let m = m as f64;
        // The even and odd terms of the fraction.
        let even = m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m));
        let odd = -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0));
        let mut delta = 1.0;
        for coef in [even, odd] {
            d = 1.0 + coef * d;
            d = 1.0 / if d.abs() < tiny { tiny } else { d };
            c = 1.0 + coef / c;
            if c.abs() < tiny {
                c = tiny;
            }
            delta = c * d;
            f *= delta;
        }
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    ln_front.exp() * f / a
}

/// The quantile function of Beta(a, b) (scipy's `beta.ppf`), by bisection to full f64 precision.
fn beta_ppf(p: f64, a: f64, b: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while hi - lo > f64::EPSILON * hi.max(1e-300) {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if beta_cdf(mid, a, b) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// How the sigmas are redistributed after shifting (`use_karras_sigmas` & co.).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigmaSpacing {
    AsShifted,
    Karras,
    Exponential,
    Beta,
}

impl SigmaSpacing {
    /// Reads the three mutually exclusive `use_*_sigmas` flags.
    pub fn read(r: &mut ConfigReader) -> Result<Self> {
        let karras = r.bool("use_karras_sigmas", false)?;
        let exponential = r.bool("use_exponential_sigmas", false)?;
        let beta = r.bool("use_beta_sigmas", false)?;
        r.ensure(
            [karras, exponential, beta].iter().filter(|&&b| b).count() <= 1,
            "use_karras_sigmas",
            "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set",
        )?;
        Ok(if karras {
            Self::Karras
        } else if exponential {
            Self::Exponential
        } else if beta {
            Self::Beta
        } else {
            Self::AsShifted
        })
    }

    /// `n` sigmas from `max` down to `min` on this spacing (`None` for `AsShifted`, which
    /// keeps the schedule it is given).
    pub fn between(self, min: f64, max: f64, n: usize) -> Option<Vec<f64>> {
        match self {
            Self::AsShifted => None,
            Self::Karras => Some(karras_sigmas(min, max, n)),
            Self::Exponential => Some(exponential_sigmas(min, max, n)),
            Self::Beta => Some(beta_sigmas(min, max, n)),
        }
    }

    /// `n` sigmas between the first and last of `sigmas` (returned unchanged for `AsShifted`).
    pub fn apply(self, sigmas: Vec<f64>, n: usize) -> Vec<f64> {
        let (max, min) = (sigmas[0], sigmas[sigmas.len() - 1]);
        self.between(min, max, n).unwrap_or(sigmas)
    }
}

// ---- tensor helpers -------------------------------------------------------------------------

/// `a * ca + b * cb` with scalar coefficients.
pub fn lin2(a: &Tensor, ca: f64, b: &Tensor, cb: f64) -> Result<Tensor> {
    Ok((a.affine(ca, 0.0)? + b.affine(cb, 0.0)?)?)
}

pub fn scale(a: &Tensor, c: f64) -> Result<Tensor> {
    Ok(a.affine(c, 0.0)?)
}

/// `original * ca[b] + noise * cb[b]` with per-batch-element coefficients (or one pair for the
/// whole batch).
pub fn per_batch_lin2(original: &Tensor, noise: &Tensor, ca: &[f64], cb: &[f64]) -> Result<Tensor> {
    let b = original.dim(0)?;
    // One timestep noises the whole batch, as torch broadcasts a one-element timestep tensor.
    let b = match ca.len() {
        1 => 1,
        n if n == b => b,
        n => {
            return Err(Error::invalid(format!(
                "add_noise: {n} timesteps for a batch of {b}"
            )))
        }
    };
    if noise.dims() != original.dims() {
        return Err(Error::invalid(format!(
            "add_noise: noise shape {:?} differs from sample shape {:?}",
            noise.dims(),
            original.dims()
        )));
    }
    let mut shape = vec![1usize; original.rank()];
    shape[0] = b;
    let dev = original.device();
    let to_t = |v: &[f64]| -> Result<Tensor> {
        Ok(Tensor::from_vec(
            v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            shape.as_slice(),
            dev,
        )?
        .to_dtype(original.dtype())?)
    };
    Ok((original.broadcast_mul(&to_t(ca)?)? + noise.broadcast_mul(&to_t(cb)?)?)?)
}

/// The denoised estimate of k-diffusion style (sigma-parameterised) schedulers.
pub fn sigma_denoised(
    pred: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    match pred {
        PredictionType::Epsilon => lin2(sample, 1.0, model_output, -sigma),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            lin2(model_output, -sigma / s2.sqrt(), sample, 1.0 / s2)
        }
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// `t * c` for an f32 scalar: exactly torch's tensor-times-float32-scalar.
pub fn mul_s(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok(t.affine(c as f64, 0.0)?)
}

/// `t / c` for an f32 scalar, as a true division (multiplying by 1/c rounds differently, and
/// some schedules cancel large terms, so torch's exact operation order matters).
pub fn div_s(t: &Tensor, c: f32) -> Result<Tensor> {
    let c = Tensor::new(c, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&c)?)
}

/// x0 and epsilon predictions of the alphas_cumprod (DDPM-style) schedulers, in torch's
/// operation order with f32 scalars.
pub fn alpha_x0_eps(
    pred: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    acp: f32,
) -> Result<(Tensor, Tensor)> {
    let (a, b) = (acp.sqrt(), (1.0 - acp).sqrt());
    Ok(match pred {
        PredictionType::Epsilon => (
            div_s(&(sample - mul_s(model_output, b)?)?, a)?,
            model_output.clone(),
        ),
        PredictionType::Sample => (
            model_output.clone(),
            div_s(&(sample - mul_s(model_output, a)?)?, b)?,
        ),
        PredictionType::VPrediction => (
            (mul_s(sample, a)? - mul_s(model_output, b)?)?,
            (mul_s(model_output, a)? + mul_s(sample, b)?)?,
        ),
    })
}

/// Clipping or dynamic thresholding (Imagen) of a predicted x0.
#[derive(Clone, Copy, Debug)]
pub struct X0Clip {
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
}

impl X0Clip {
    pub fn read(r: &mut ConfigReader, clip_default: bool, has_clip: bool) -> Result<Self> {
        let clip_sample = if has_clip {
            r.bool("clip_sample", clip_default)?
        } else {
            false
        };
        let clip_sample_range = if has_clip {
            r.f64("clip_sample_range", 1.0)?
        } else {
            1.0
        };
        Ok(Self {
            clip_sample,
            clip_sample_range,
            thresholding: r.bool("thresholding", false)?,
            dynamic_thresholding_ratio: r.f64("dynamic_thresholding_ratio", 0.995)?,
            sample_max_value: r.f64("sample_max_value", 1.0)?,
        })
    }

    pub fn apply(&self, x0: Tensor) -> Result<Tensor> {
        if self.thresholding {
            threshold_sample(&x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        } else if self.clip_sample {
            Ok(x0.clamp(-self.clip_sample_range, self.clip_sample_range)?)
        } else {
            Ok(x0)
        }
    }
}

/// Dynamic thresholding: per sample, clamp to the `ratio` quantile s of |x| (raised to at least
/// 1, then capped at `max_value`), then divide by s.
fn threshold_sample(x: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    let b = dims[0];
    let flat = x.to_dtype(DType::F32)?.reshape((b, ()))?;
    let rows = flat.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(rows.len() * rows.first().map_or(0, |r| r.len()));
    for row in rows {
        let mut abs: Vec<f64> = row.iter().map(|v| v.abs() as f64).collect();
        abs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        // torch.quantile's linear interpolation.
        let pos = ratio * (abs.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        let q = abs[lo] + (abs[hi] - abs[lo]) * (pos - lo as f64);
        // torch.clamp(s, min=1, max=sample_max_value) applies max last: a sample_max_value
        // below 1 wins over the minimum.
        let s = q.max(1.0).min(max_value) as f32;
        out.extend(row.iter().map(|v| v.clamp(-s, s) / s));
    }
    Ok(Tensor::from_vec(out, dims, x.device())?.to_dtype(dtype)?)
}

/// Position of a timestep in a schedule; with duplicates (Heun, KDPM2, PNDM) the second one,
/// so that img2img starting mid-schedule does not skip a step (diffusers' `index_for_timestep`).
pub fn index_for_timestep(timesteps: &[f64], t: f64) -> Option<usize> {
    let mut hits = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &x)| x == t)
        .map(|(i, _)| i);
    let first = hits.next()?;
    Some(hits.next().unwrap_or(first))
}

pub fn timestep_not_found(class: &str, t: f64) -> Error {
    Error::invalid(format!(
        "{class}: timestep {t} is not in the current schedule (call set_timesteps first?)"
    ))
}

/// An integer training timestep from the f64 the trait carries.
pub fn int_timestep(class: &str, t: f64, n_train: usize) -> Result<i64> {
    if t.fract() != 0.0 || t < -1.0 || t >= n_train as f64 {
        return Err(Error::invalid(format!(
            "{class}: timestep {t} is not an integer in [0, {n_train})"
        )));
    }
    Ok(t as i64)
}

/// `sqrt(acp[t]) * x + sqrt(1 - acp[t]) * noise` (variance-preserving forward process).
pub fn add_noise_vp(
    class: &str,
    acp: &[f32],
    original: &Tensor,
    noise: &Tensor,
    timesteps: &[f64],
) -> Result<Tensor> {
    let mut ca = Vec::with_capacity(timesteps.len());
    let mut cb = Vec::with_capacity(timesteps.len());
    for &t in timesteps {
        let a = acp[int_timestep(class, t, acp.len())?.max(0) as usize];
        ca.push(a.sqrt() as f64);
        cb.push((1.0 - a).sqrt() as f64);
    }
    per_batch_lin2(original, noise, &ca, &cb)
}

/// The `Scheduler` methods the alphas_cumprod schedulers (DDPM, DDIM, PNDM, LCM) share: fields
/// `config`, `noise`, `timesteps` and a `CLASS` constant; unit noise and unscaled inputs.
macro_rules! alpha_scheduler_common {
    () => {
        fn class_name(&self) -> &'static str {
            CLASS
        }

        fn config(&self) -> &SchedulerConfig {
            &self.config
        }

        fn timesteps(&self) -> &[f64] {
            &self.timesteps
        }

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
            common::add_noise_vp(
                CLASS,
                &self.noise.alphas_cumprod,
                original,
                noise,
                timesteps,
            )
        }

        fn alphas_cumprod(&self) -> Option<&[f32]> {
            Some(&self.noise.alphas_cumprod)
        }

        fn betas(&self) -> Option<Vec<f32>> {
            Some(self.noise.betas.clone())
        }
    };
}
pub(crate) use alpha_scheduler_common;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_quantiles_match_scipy() {
        // scipy.stats.beta.ppf(p, 0.6, 0.6) (scipy 1.17.1), and one asymmetric case.
        let cases = [
            (0.0, 0.0),
            (0.01, 0.000_861_238_821_542_905_9),
            (0.1, 0.039_584_405_588_780_85),
            (0.3, 0.234_017_003_875_235_72),
            (0.5, 0.500_000_000_000_000_1),
            (0.77, 0.846_162_414_232_350_2),
            (0.95, 0.987_445_543_126_388_5),
            (0.999, 0.999_981_441_261_482_6),
            (1.0, 1.0),
        ];
        for (p, want) in cases {
            let got = beta_ppf(p, 0.6, 0.6);
            assert!(
                (got - want).abs() <= 1e-13 * (1.0 + want),
                "{p}: {got} vs {want}"
            );
        }
        let got = beta_ppf(0.3, 2.5, 0.7);
        assert!((got - 0.709_775_891_214_880_4).abs() < 1e-13, "{got}");
    }
}
