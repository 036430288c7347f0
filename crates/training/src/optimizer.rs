//! AdamW (as `torch.optim.AdamW`), the warm-up + cosine / constant learning-rate schedules of
//! diffusers' `get_scheduler`, and gradient-norm clipping (`torch.nn.utils.clip_grad_norm_`).
//!
//! The optimizer is ours rather than candle-nn's so that its moments can be read out and
//! restored for checkpoints.

use candle_core::{DType, Tensor, Var};
use diffuse_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// `torch.optim.AdamW` hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// diffusers' `train_unconditional.py` defaults.
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.95,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-6,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        let finite = [self.lr, self.eps, self.weight_decay]
            .iter()
            .all(|x| x.is_finite());
        let ok = finite
            && self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.weight_decay >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "invalid AdamW settings {self:?}: need finite numbers, lr >= 0, betas in [0, 1), eps > 0, weight decay >= 0"
            )))
        }
    }
}

/// AdamW with decoupled weight decay and bias correction.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    /// Updates done so far (torch's per-parameter `step`, shared here).
    step: u64,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    /// Zero moments shaped like `params`.
    pub fn new(config: AdamWConfig, params: &[Var]) -> Result<Self> {
        config.validate()?;
        let zeros = params
            .iter()
            .map(|p| p.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            step: 0,
            exp_avg: zeros.clone(),
            exp_avg_sq: zeros,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// First and second moments, in the order of the parameters.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// Restores a checkpointed state; shapes must match the current moments.
    pub fn restore(
        &mut self,
        step: u64,
        exp_avg: Vec<Tensor>,
        exp_avg_sq: Vec<Tensor>,
    ) -> Result<()> {
        for (old, new) in self
            .exp_avg
            .iter()
            .zip(&exp_avg)
            .chain(self.exp_avg_sq.iter().zip(&exp_avg_sq))
        {
            if old.dims() != new.dims() {
                return Err(Error::invalid(format!(
                    "optimizer state shape {:?} does not match parameter shape {:?}",
                    new.dims(),
                    old.dims()
                )));
            }
        }
        if exp_avg.len() != self.exp_avg.len() || exp_avg_sq.len() != self.exp_avg_sq.len() {
            return Err(Error::invalid(format!(
                "optimizer state has {} / {} moments for {} parameters",
                exp_avg.len(),
                exp_avg_sq.len(),
                self.exp_avg.len()
            )));
        }
        self.step = step;
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        Ok(())
    }

    /// One update of every parameter with its gradient, at learning rate `lr`.
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != self.exp_avg.len() || grads.len() != params.len() {
            return Err(Error::invalid(format!(
                "AdamW: {} parameters and {} gradients for an optimizer of {}",
                params.len(),
                grads.len(),
                self.exp_avg.len()
            )));
        }
        self.step += 1;
        let k = Coefficients::new(&self.config, self.step, lr);
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let (m, v) = (&self.exp_avg[i], &self.exp_avg_sq[i]);
            let (param, m, v) = match fused_update(p.as_tensor(), g, m, v, &k)? {
                Some(new) => new,
                None => tensor_update(p.as_tensor(), g, m, v, &k)?,
            };
            p.set(&param)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }
}

/// The scalars of one AdamW step, each as the f32 that candle's `tensor * scalar` (an affine
/// map `x·a + b` in the tensor's dtype) multiplies or adds.
struct Coefficients {
    beta1: f64,
    beta2: f64,
    /// `1 / sqrt(1 − β2ᵗ)`: dividing by a scalar is multiplying by its inverse.
    inv_bias2_sqrt: f64,
    eps: f64,
    /// `1 − lr·wd`
    decay: f64,
    /// `lr / (1 − β1ᵗ)`
    step_size: f64,
}

impl Coefficients {
    fn new(c: &AdamWConfig, step: u64, lr: f64) -> Self {
        let t = step as i32;
        Self {
            beta1: c.beta1,
            beta2: c.beta2,
            inv_bias2_sqrt: 1.0 / (1.0 - c.beta2.powi(t)).sqrt(),
            eps: c.eps,
            decay: 1.0 - lr * c.weight_decay,
            step_size: lr / (1.0 - c.beta1.powi(t)),
        }
    }
}

/// `(p, m, v)` after one step, in candle ops (any device and dtype).
fn tensor_update(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &Coefficients,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let m = (m.affine(k.beta1, 0.0)? + g.affine(1.0 - k.beta1, 0.0)?)?;
    let v = (v.affine(k.beta2, 0.0)? + g.sqr()?.affine(1.0 - k.beta2, 0.0)?)?;
    let denom = v
        .sqrt()?
        .affine(k.inv_bias2_sqrt, 0.0)?
        .affine(1.0, k.eps)?;
    let decayed = p.detach().affine(k.decay, 0.0)?;
    let update = m.div(&denom)?.affine(k.step_size, 0.0)?;
    Ok(((decayed - update)?, m, v))
}

/// [`tensor_update`] in one pass over the values, on every core, for f32 tensors on the CPU
/// (`None` otherwise): the same f32 operations in the same order, so the same bits, where the
/// ten tensor ops per parameter cost more than the rest of a small model's step.
fn fused_update(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &Coefficients,
) -> candle_core::Result<Option<(Tensor, Tensor, Tensor)>> {
    use rayon::prelude::*;
    let f32_cpu = |t: &Tensor| t.dtype() == candle_core::DType::F32 && t.device().is_cpu();
    if ![p, g, m, v].iter().all(|t| f32_cpu(t)) {
        return Ok(None);
    }
    let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let (mut p_new, g) = (values(p)?, values(g)?);
    let (mut m_new, mut v_new) = (values(m)?, values(v)?);
    // As candle's affine map: `x·a + b` with `a`, `b` rounded to f32.
    let affine = |x: f32, a: f64, b: f64| x * a as f32 + b as f32;
    const CHUNK: usize = 1 << 14;
    p_new
        .par_chunks_mut(CHUNK)
        .zip(m_new.par_chunks_mut(CHUNK))
        .zip(v_new.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                *m = affine(*m, k.beta1, 0.0) + affine(g, 1.0 - k.beta1, 0.0);
                *v = affine(*v, k.beta2, 0.0) + affine(g * g, 1.0 - k.beta2, 0.0);
                let denom = affine(affine(v.sqrt(), k.inv_bias2_sqrt, 0.0), 1.0, k.eps);
                let update = affine(*m / denom, k.step_size, 0.0);
                *p = affine(*p, k.decay, 0.0) - update;
            }
        });
    let shaped = |x: Vec<f32>| Tensor::from_vec(x, p.shape(), p.device());
    Ok(Some((shaped(p_new)?, shaped(m_new)?, shaped(v_new)?)))
}

/// The learning-rate curve after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduleKind {
    /// Half a cosine from the peak down to 0 at the last step.
    Cosine,
    Constant,
}

impl LrScheduleKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(Self::Cosine),
            "constant" => Ok(Self::Constant),
            other => Err(Error::invalid(format!(
                "unknown learning-rate schedule {other:?}; expected cosine or constant"
            ))),
        }
    }
}

/// diffusers' `get_cosine_schedule_with_warmup` / `get_constant_schedule_with_warmup`:
/// the learning rate of optimizer step `step` (0-based) is `base * factor(step)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub kind: LrScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    pub fn lr_at(&self, step: usize) -> f64 {
        let s = step as f64;
        let factor = if step < self.warmup_steps {
            s / self.warmup_steps.max(1) as f64
        } else {
            match self.kind {
                LrScheduleKind::Constant => 1.0,
                LrScheduleKind::Cosine => {
                    let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                    let progress = (s - self.warmup_steps as f64) / span;
                    (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
        };
        self.base_lr * factor
    }
}

/// The gradients of `vars` summed over `accum` micro-batches, and their mean loss: each call
/// of `micro_batch_loss` returns one micro-batch's loss (a scalar), whose backward pass runs
/// scaled by `1 / accum`. With `autocast`, both passes run under bf16 CPU autocast (the ops
/// read the setting as they run, so it has to cover the backward pass too).
pub fn accumulate_gradients(
    vars: &[Var],
    accum: usize,
    autocast: bool,
    mut micro_batch_loss: impl FnMut() -> Result<Tensor>,
) -> Result<(Vec<Tensor>, f64)> {
    let mut sum = GradientSum::new(vars);
    let mut loss_sum = 0.0;
    for _ in 0..accum {
        let pass = || -> Result<_> {
            let loss = micro_batch_loss()?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            Ok((value, (loss / accum as f64)?.backward()?))
        };
        let (loss, grads) = diffuse_models::ops::autocast_bf16_if(autocast, pass)?;
        loss_sum += loss;
        sum.add(&grads)?;
    }
    Ok((sum.finish()?, loss_sum / accum as f64))
}

/// The gradients of `vars` over micro-batches: each [`GradientSum::add`] takes the gradient
/// store of one micro-batch's backward pass.
struct GradientSum<'a> {
    vars: &'a [Var],
    sums: Vec<Option<Tensor>>,
}

impl<'a> GradientSum<'a> {
    fn new(vars: &'a [Var]) -> Self {
        Self {
            vars,
            sums: vec![None; vars.len()],
        }
    }

    /// Adds one backward pass's gradients.
    fn add(&mut self, store: &candle_core::backprop::GradStore) -> Result<()> {
        for (sum, var) in self.sums.iter_mut().zip(self.vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                // candle's gradients still reference this step's graph; detached, the
                // optimizer moments built from them don't chain every past step's graph
                // (unbounded memory).
                let g = g.detach();
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// The sums, in the order of `vars`; a variable the loss never reached (an unused
    /// block) gets a zero gradient.
    fn finish(self) -> Result<Vec<Tensor>> {
        Ok(self
            .sums
            .into_iter()
            .zip(self.vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?)
    }
}

/// The checks and clipping between the gradients of optimizer step `step` (1-based) and the
/// update: fails with a hint when `loss` is not finite, then clips `grads` to `max_norm` when
/// given and returns their norm before clipping.
pub fn check_and_clip(
    loss: f64,
    step: u64,
    grads: &mut [Tensor],
    max_norm: Option<f64>,
) -> Result<f64> {
    if !loss.is_finite() {
        return Err(Error::invalid(format!(
            "the loss became {loss} at step {step}; try a lower learning rate or gradient clipping"
        )));
    }
    match max_norm {
        Some(max) => clip_grad_norm(grads, max),
        None => grad_norm(grads),
    }
}

/// Refuses a gradient clipping norm that is not a positive number (a NaN one clipped nothing).
pub fn check_clip_grad(max_norm: Option<f64>) -> Result<()> {
    match max_norm {
        Some(m) if !(m.is_finite() && m > 0.0) => Err(Error::invalid(format!(
            "gradient clipping norm {m} must be a positive number"
        ))),
        _ => Ok(()),
    }
}

/// Scales `grads` in place so that their joint L2 norm is at most `max_norm`; returns the norm
/// before clipping (torch's `clip_grad_norm_`, including its 1e-6 guard).
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// The joint L2 norm of all gradients.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads {
        sum += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass update gives the tensor ops' values bit for bit, over steps whose moments
    /// build up (signed zeros and large and tiny values included).
    #[test]
    fn fused_update_equals_the_tensor_ops() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let cfg = AdamWConfig {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        };
        let mut p = Tensor::randn(0f32, 1.0, 40_000, &dev)?;
        let mut m = p.zeros_like()?;
        let mut v = p.zeros_like()?;
        for step in 1..=5u64 {
            let g = (Tensor::randn(0f32, 1.0, 40_000, &dev)? * 10f64.powi(step as i32 - 3))?;
            let g = g.slice_assign(&[..2], &Tensor::new(&[-0.0f32, 0.0], &dev)?)?;
            let k = Coefficients::new(&cfg, step, cfg.lr);
            let want = tensor_update(&p, &g, &m, &v, &k)?;
            let got = fused_update(&p, &g, &m, &v, &k)?.expect("f32 on the CPU");
            for (a, b) in [(&got.0, &want.0), (&got.1, &want.1), (&got.2, &want.2)] {
                let bits = |t: &Tensor| -> candle_core::Result<Vec<u32>> {
                    Ok(t.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect())
                };
                assert_eq!(bits(a)?, bits(b)?, "step {step}");
            }
            (p, m, v) = want;
        }
        Ok(())
    }

    /// Over three micro-batches: the mean loss, and the gradient of the mean loss (each
    /// backward pass scaled by 1/3) for the variables it reaches; zero for one it does not.
    #[test]
    fn accumulated_gradients_are_those_of_the_mean_loss() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let w = Var::from_slice(&[1f32, -2.0], 2, &dev)?;
        let unused = Var::from_slice(&[5f32], 1, &dev)?;
        let xs = [[1f32, 2.0], [3.0, 0.5], [-1.0, 4.0]];
        let mut i = 0;
        // loss_i = (w · x_i)², whose gradient is 2 (w · x_i) x_i.
        let (grads, loss) = accumulate_gradients(&[w.clone(), unused], 3, false, || {
            let x = Tensor::new(&xs[i], &dev)?;
            i += 1;
            Ok((w.as_tensor() * &x)?.sum_all()?.sqr()?)
        })?;
        let dots: Vec<f32> = xs.iter().map(|x| x[0] - 2.0 * x[1]).collect();
        let want_loss = dots.iter().map(|d| (d * d) as f64).sum::<f64>() / 3.0;
        assert!((loss - want_loss).abs() < 1e-9, "{loss} vs {want_loss}");
        let got = grads[0].to_vec1::<f32>()?;
        for c in 0..2 {
            let want: f32 = xs
                .iter()
                .zip(&dots)
                .map(|(x, d)| 2.0 * d * x[c])
                .sum::<f32>()
                / 3.0;
            assert!((got[c] - want).abs() < 1e-5, "dw[{c}] {} vs {want}", got[c]);
        }
        assert_eq!(grads[1].to_vec1::<f32>()?, [0.0]);
        Ok(())
    }
}
