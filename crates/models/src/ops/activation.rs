//! Element-wise activations: `quick_gelu` (CLIP's MLP) and the exact GELU, each one vectorised
//! pass on every core. candle runs `x·sigmoid(1.702·x)` as three single-threaded passes over
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

impl CustomOp1 for Unary {
    fn name(&self) -> &'static str {
        match self {
            Unary::QuickGelu => "quick-gelu",
            Unary::Gelu => "gelu",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_input(s, l, self.name())?;
        // SAFETY: the chunks cover the output.
        let mut out = unsafe { output_buffer(x.len()) };
        let run = match self {
            Unary::QuickGelu => quick_gelu_run,
            Unary::Gelu => gelu_run,
        };
        // Chunks of 16 Ki values: enough work per task, and both cores busy from 32 Ki on.
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(o, x)| run(x, o));
        Ok((f32_output(out, s.dtype())?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = match self {
            // With s = sigmoid(αx): s + αx·s·(1 − s).
            Unary::QuickGelu => {
                let s = candle_nn::ops::sigmoid(&(x * QUICK_GELU_ALPHA as f64)?)?;
                let slope = ((x * QUICK_GELU_ALPHA as f64)? * (&s * (1.0 - &s)?)?)?;
                (s + slope)?
            }
            Unary::Gelu => gelu_grad(x)?,
        };
        Ok(Some((grad * d)?))
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
