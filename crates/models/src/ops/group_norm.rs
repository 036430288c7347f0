//! Fused GroupNorm (+ SiLU) for `(B, C, *)` inputs: per (batch, group) one pass for the mean,
//! one for the variance (f64 accumulators; the group is still in cache), and one that
//! normalises, applies the per-channel affine and the activation — instead of the seven
//! full-tensor passes of the generic version. Groups are contiguous in NCHW, so the tasks
//! write disjoint slices. A LayerNorm over rows of `C` is the same op on `(rows, C, 1)` with
//! one group.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_input, f32_output, silu, simd_fn, LANES};

pub(crate) struct GroupNormOp {
    pub num_groups: usize,
    pub eps: f64,
    /// Apply SiLU after the affine.
    pub silu: bool,
}

simd_fn! {
    /// Mean and `1/sqrt(var + eps)` of one group, accumulated in f64.
    fn stats(xs: &[f32], eps: f64) -> (f32, f32) {
        let n = xs.len().max(1) as f64;
        let lane_sum = |f: &dyn Fn(f32) -> f64| {
            let mut acc = [0f64; LANES];
            let mut chunks = xs.chunks_exact(LANES);
            for c in &mut chunks {
                for i in 0..LANES {
                    acc[i] += f(c[i]);
                }
            }
            acc.iter().sum::<f64>() + chunks.remainder().iter().map(|&x| f(x)).sum::<f64>()
        };
        let mean = lane_sum(&|x| x as f64) / n;
        let var = lane_sum(&|x| {
            let c = x as f64 - mean;
            c * c
        }) / n;
        (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
    }
}

simd_fn! {
    /// `dst = (src − mean)·rstd·w + b` elementwise: one row of a LayerNorm (a GroupNorm whose
    /// channels are single values).
    fn normalise_row(src: &[f32], dst: &mut [f32], w: &[f32], b: &[f32], mean: f32, rstd: f32) {
        for (((d, &x), &w), &b) in dst.iter_mut().zip(src).zip(w).zip(b) {
            *d = (x - mean) * rstd * w + b;
        }
    }
}

simd_fn! {
    /// `dst = act(src · a + b)` for one channel.
    fn affine_act(src: &[f32], dst: &mut [f32], a: f32, b: f32, with_silu: bool) {
        if with_silu {
            dst.iter_mut().zip(src).for_each(|(d, &x)| *d = silu(x * a + b));
        } else {
            dst.iter_mut().zip(src).for_each(|(d, &x)| *d = x * a + b);
        }
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = lx.shape().dims();
        let (c, g) = (dims[1], self.num_groups);
        let hw: usize = dims[2..].iter().product();
        let x = f32_input(sx, lx, "group norm input")?;
        let w = f32_input(sw, lw, "group norm weight")?;
        let b = f32_input(sb, lb, "group norm bias")?;
        let (cg, eps) = (c / g, self.eps);
        let mut out = vec![0f32; x.len()];
        if !out.is_empty() {
            let len = cg * hw;
            out.par_chunks_mut(len)
                .zip(x.par_chunks(len))
                .enumerate()
                // Short groups (LayerNorm rows) are batched into tasks of ≥ 16k elements.
                .with_min_len(16384usize.div_ceil(len))
                .for_each(|(i, (out_g, x_g))| {
                    let (mean, rstd) = stats(x_g, eps);
                    let ch0 = (i % g) * cg;
                    if hw == 1 && !self.silu {
                        let (w, b) = (&w[ch0..ch0 + cg], &b[ch0..ch0 + cg]);
                        return normalise_row(x_g, out_g, w, b, mean, rstd);
                    }
                    for ((o, xc), ch) in out_g.chunks_mut(hw).zip(x_g.chunks(hw)).zip(ch0..) {
                        let a = w[ch] * rstd;
                        affine_act(xc, o, a, b[ch] - mean * a, self.silu);
                    }
                });
        }
        Ok((f32_output(out, sx.dtype())?, lx.shape().clone()))
    }

    /// Gradients from generic ops, recomputing the normalised input: with `x̂` the normalised
    /// group and `dy` the gradient before the affine, `dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))`.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (bsz, c) = (x.dim(0)?, x.dim(1)?);
        let g = self.num_groups;
        let grouped = x.to_dtype(DType::F32)?.reshape((bsz, g, ()))?;
        let centered = grouped.broadcast_sub(&grouped.mean_keepdim(2)?)?;
        let rstd = (centered.sqr()?.mean_keepdim(2)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = centered.broadcast_mul(&rstd)?.reshape((bsz, c, ()))?;
        let w3 = w.to_dtype(DType::F32)?.reshape((1, c, 1))?;
        let mut dy = grad.to_dtype(DType::F32)?.reshape((bsz, c, ()))?;
        if self.silu {
            // silu'(y) = s·(1 + y·(1 − s)), s = sigmoid(y)
            let y = xhat
                .broadcast_mul(&w3)?
                .broadcast_add(&b.to_dtype(DType::F32)?.reshape((1, c, 1))?)?;
            let s = (y.neg()?.exp()? + 1.0)?.recip()?;
            let ds = ((y * (1.0 - &s)?)? + 1.0)?.mul(&s)?;
            dy = (dy * ds)?;
        }
        let grad_w = (&dy * &xhat)?.sum((0, 2))?;
        let grad_b = dy.sum((0, 2))?;
        let dxhat = dy.broadcast_mul(&w3)?.reshape((bsz, g, ()))?;
        let xhat = xhat.reshape((bsz, g, ()))?;
        let grad_x = dxhat
            .broadcast_sub(&dxhat.mean_keepdim(2)?)?
            .sub(&xhat.broadcast_mul(&(&dxhat * &xhat)?.mean_keepdim(2)?)?)?
            .broadcast_mul(&rstd)?
            .reshape(x.shape())?;
        Ok((
            Some(grad_x.to_dtype(x.dtype())?),
            Some(grad_w.to_dtype(w.dtype())?),
            Some(grad_b.to_dtype(b.dtype())?),
        ))
    }
}
