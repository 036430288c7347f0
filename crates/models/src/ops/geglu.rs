//! GEGLU, `a · gelu(g)` with `[a, g]` the two halves of the last dimension: one pass over the
//! rows on every core, instead of two strided views, candle's scalar-erf GELU (one thread) and
//! a multiply. The erf is a polynomial that vectorises (absolute error about 3e-7).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{exp_fused, f32_input, f32_output, output_buffer, simd_fn};

/// erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7 in exact arithmetic), its polynomials
/// in fused multiply-adds: for `simd_fn!` bodies, compiled for FMA.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const A: [f32; 5] = [
        1.061_405_4,
        -1.453_152,
        1.421_413_7,
        -0.284_496_74,
        0.254_829_6,
    ];
    let ax = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(ax, 1.0);
    let poly = t * A[1..].iter().fold(A[0], |p, &c| p.mul_add(t, c));
    (-poly).mul_add(exp_fused(-ax * ax), 1.0).copysign(x)
}

/// The exact (erf) GELU, torch's default.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

simd_fn! {
    /// `out = a · gelu(g)` for one row `[a, g]`.
    fn geglu_row(row: &[f32], out: &mut [f32]) {
        let (a, g) = row.split_at(out.len());
        for ((o, &a), &g) in out.iter_mut().zip(a).zip(g) {
            *o = a * gelu(g);
        }
    }
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let last = dims[dims.len() - 1];
        let f = last / 2;
        let h = f32_input(s, l, "geglu input")?;
        // Every element is written: every row of the output is written by `geglu_row`.
        let mut out = output_buffer(h.len() / 2);
        if f > 0 {
            out.par_chunks_mut(f)
                .zip(h.par_chunks(last))
                .with_min_len(16384usize.div_ceil(f))
                .for_each(|(o, row)| geglu_row(row, o));
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = f;
        Ok((f32_output(out, s.dtype())?, Shape::from(out_dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::geglu(s, l)
    }

    /// `da = dy·gelu(g)`, `dg = dy·a·gelu'(g)`, by generic ops.
    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        crate::profile::timed_backward(self.name(), grad, || {
            let (a, g) = halves(h)?;
            let da = (grad * g.gelu_erf()?)?;
            let dg = ((grad * a)? * gelu_grad(&g)?)?;
            Ok(Some(Tensor::cat(&[da, dg], D::Minus1)?))
        })
    }
}

/// `gelu'(g) = Φ(g) + g·φ(g)` (`Φ`/`φ`: the normal CDF/density), by generic ops.
pub(crate) fn gelu_grad(g: &Tensor) -> Result<Tensor> {
    let cdf = (((g / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5)?;
    let pdf = ((g.sqr()? * -0.5)?.exp()?
        * (0.5 * std::f64::consts::FRAC_2_SQRT_PI / std::f64::consts::SQRT_2))?;
    cdf + (g * pdf)?
}

fn halves(h: &Tensor) -> Result<(Tensor, Tensor)> {
    let f = h.dim(D::Minus1)? / 2;
    Ok((h.narrow(D::Minus1, 0, f)?, h.narrow(D::Minus1, f, f)?))
}

/// `a · gelu(g)` for `[a, g] = h.chunk(2, -1)` (the last dimension must be even).
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if h.dim(D::Minus1)? % 2 != 0 {
        candle_core::bail!("geglu: the last dimension {} is odd", h.dim(D::Minus1)?);
    }
    if super::fused_on(&[h]) {
        return h.contiguous()?.apply_op1(Geglu);
    }
    geglu_reference(h)
}

/// The generic-op GEGLU: the reference for the kernels, and the path where they do not run.
pub fn geglu_reference(h: &Tensor) -> Result<Tensor> {
    let (a, g) = halves(h)?;
    a * g.gelu_erf()?
}
