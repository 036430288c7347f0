//! Element-wise activations: `quick_gelu` (CLIP's MLP), the exact GELU and the tanh-approximate
//! GELU (the feed-forwards of DiT, SD3 and Flux; T5's `gelu_new`), each one vectorised pass on
//! every core. candle runs `x·sigmoid(1.702·x)` as three single-threaded passes over
//! the tensor and its GELU with a scalar erf; in the CLIP text encoder that was about a tenth
//! of a forward pass.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::geglu::{gelu as gelu_scalar, gelu_grad};
use super::{exp, f32_input, f32_output, kernel_dtype, output_buffer, simd_fn};

/// `quick_gelu(x) = x·sigmoid(1.702·x)`, as transformers' `QuickGELUActivation`.
const QUICK_GELU_ALPHA: f32 = 1.702;

#[derive(Clone, Copy)]
enum Unary {
    QuickGelu,
    Gelu,
    GeluTanh,
}

/// `√(2/π)`, the slope of the tanh approximation's argument.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh approximation.
const GELU_TANH_CUBIC: f32 = 0.044_715;

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, torch's `gelu(approximate="tanh")`, with
/// `1 + tanh(u) = 2 − 2/(e^{2u} + 1)`: the exponential saturates at e^88, so the tails give
/// exactly 0 and x rather than NaN.
#[inline(always)]
fn gelu_tanh_scalar(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x * x * x);
    x * (1.0 - 1.0 / (exp(2.0 * u) + 1.0))
}

simd_fn! {
    fn quick_gelu_run(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            // exp saturates at e^88, so a very negative x gives a tiny quotient, not NaN.
            *o = x / (1.0 + exp(-QUICK_GELU_ALPHA * x));
        }
    }
}

simd_fn! {
    fn gelu_run(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = gelu_scalar(x);
        }
    }
}

simd_fn! {
    fn gelu_tanh_run(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = gelu_tanh_scalar(x);
        }
    }
}

impl CustomOp1 for Unary {
    fn name(&self) -> &'static str {
        match self {
            Unary::QuickGelu => "quick-gelu",
            Unary::Gelu => "gelu",
            Unary::GeluTanh => "gelu-tanh",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_input(s, l, self.name())?;
        // Every element is written: the chunks cover the output.
        let mut out = output_buffer(x.len());
        let run = match self {
            Unary::QuickGelu => quick_gelu_run,
            Unary::Gelu => gelu_run,
            Unary::GeluTanh => gelu_tanh_run,
        };
        // Chunks of 16 Ki values: enough work per task, and both cores busy from 32 Ki on.
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(o, x)| run(x, o));
        Ok((f32_output(out, s.dtype())?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        crate::profile::timed_backward(self.name(), grad, || {
            let d = match self {
                // With s = sigmoid(αx): s + αx·s·(1 − s).
                Unary::QuickGelu => {
                    let s = candle_nn::ops::sigmoid(&(x * QUICK_GELU_ALPHA as f64)?)?;
                    let slope = ((x * QUICK_GELU_ALPHA as f64)? * (&s * (1.0 - &s)?)?)?;
                    (s + slope)?
                }
                Unary::Gelu => gelu_grad(x)?,
                // With u = c·(x + a·x³), t = tanh(u): ½(1 + t) + ½·x·(1 − t²)·c·(1 + 3a·x²).
                Unary::GeluTanh => {
                    let (c, a) = (SQRT_2_OVER_PI as f64, GELU_TANH_CUBIC as f64);
                    let t = ((x + (x.powf(3.0)? * a)?)? * c)?.tanh()?;
                    let du = ((x.sqr()? * (3.0 * a))? + 1.0)? * c;
                    let slope = ((x * (1.0 - t.sqr()?)?)? * du?)?;
                    (((t + 1.0)? + slope)? * 0.5)?
                }
            };
            Ok(Some((grad * d)?))
        })
    }
}

fn apply(x: &Tensor, op: Unary, reference: fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if x.device().is_cpu() && kernel_dtype(x.dtype()) {
        return x.contiguous()?.apply_op1(op);
    }
    reference(x)
}

/// `x·sigmoid(1.702·x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    apply(x, Unary::QuickGelu, quick_gelu_reference)
}

/// [`quick_gelu`] from generic ops: the reference for the kernel, and the path off the CPU.
pub fn quick_gelu_reference(x: &Tensor) -> Result<Tensor> {
    x.mul(&candle_nn::ops::sigmoid(&(x * QUICK_GELU_ALPHA as f64)?)?)
}

/// The exact (erf) GELU, torch's default.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    apply(x, Unary::Gelu, gelu_reference)
}

/// [`gelu`] by candle's op: the reference for the kernel, and the path off the CPU.
pub fn gelu_reference(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// The tanh-approximate GELU (`nn.GELU(approximate="tanh")`, transformers' `gelu_new`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    apply(x, Unary::GeluTanh, gelu_tanh_reference)
}

/// [`gelu_tanh`] by candle's op: the reference for the kernel, and the path off the CPU.
pub fn gelu_tanh_reference(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}
