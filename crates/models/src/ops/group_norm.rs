//! Fused GroupNorm (+ SiLU) for `(B, C, *)` inputs: per (batch, group) one pass for the mean,
//! one for the variance (f64 accumulators; the group is still in cache), and one that
//! normalises, applies the per-channel affine and the activation — instead of the seven
//! full-tensor passes of the generic version. Groups are contiguous in NCHW, so the tasks
//! write disjoint slices. A LayerNorm over rows of `C` is the same op on `(rows, C, 1)` with
//! one group.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_input, f32_output, output_buffer, silu, simd_fn, LANES};

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
        // Every element is written: every group of the output is normalised into.
        let mut out = output_buffer(x.len());
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::group_norm((sx, lx), (sw, lw), (sb, lb), self)
    }

    /// Gradients by [`GroupNormGrad`]; the per-batch `dw`/`db` partial sums it returns are
    /// reduced here.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::profile::timed_backward(self.name(), grad, || {
            let (bsz, c) = (x.dim(0)?, x.dim(1)?);
            let g = self.num_groups;
            let op = GroupNormGrad {
                num_groups: g,
                eps: self.eps,
                silu: self.silu,
            };
            let wb = Tensor::stack(&[w, b], 0)?;
            let out = x.apply_op3_no_bwd(&wb, &grad.contiguous()?, &op)?;
            let n = x.elem_count();
            let grad_x = out.narrow(0, 0, n)?.reshape(x.shape())?;
            let dwb = out
                .narrow(0, n, 2 * bsz * c)?
                .reshape((bsz, g, 2, c / g))?
                .sum(0)?
                .transpose(0, 1)?
                .reshape((2, c))?;
            Ok((
                Some(grad_x.to_dtype(x.dtype())?),
                Some(dwb.get(0)?.to_dtype(w.dtype())?),
                Some(dwb.get(1)?.to_dtype(b.dtype())?),
            ))
        })
    }
}

/// The gradients of [`GroupNormOp`] from `(x, [w; b], dy)` in two passes per group instead
/// of some twenty generic full-tensor ops. With `x̂` the normalised group and `dx̂ = w·dy`
/// (`dy` taken through SiLU's derivative first when fused),
/// `dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))`. Output (f32, flat): `dx`, then per
/// (batch, group) the group's `dw` and `db` partial sums, `(B, G, 2, C/G)`.
struct GroupNormGrad {
    num_groups: usize,
    eps: f64,
    silu: bool,
}

simd_fn! {
    /// One channel's `dy` (through SiLU's derivative when fused) into `dst`; returns
    /// `(Σ dy, Σ dy·x̂)`.
    #[allow(clippy::too_many_arguments)]
    fn channel_dy(x: &[f32], grad: &[f32], dst: &mut [f32], mean: f32, rstd: f32, w: f32, b: f32, with_silu: bool) -> (f64, f64) {
        let (mut sdy, mut sdyx) = ([0f32; LANES], [0f32; LANES]);
        // Element `i` is summed in lane `i % LANES`; whole groups of lanes first, so that the
        // loop vectorises.
        let mut step = |i: usize, d: &mut f32, x: f32, g: f32| {
            let xhat = (x - mean) * rstd;
            let dy = if with_silu {
                // silu'(y) = s·(1 + y·(1 − s)), s = sigmoid(y)
                let y = xhat * w + b;
                let s = 1.0 / (1.0 + super::exp(-y));
                g * s * (1.0 + y * (1.0 - s))
            } else {
                g
            };
            *d = dy;
            sdy[i % LANES] += dy;
            sdyx[i % LANES] += dy * xhat;
        };
        let whole = dst.len() / LANES * LANES;
        let (head, tail) = dst.split_at_mut(whole);
        for ((d, x), g) in head.chunks_exact_mut(LANES).zip(x.chunks_exact(LANES)).zip(grad.chunks_exact(LANES)) {
            for l in 0..LANES {
                step(l, &mut d[l], x[l], g[l]);
            }
        }
        for (i, d) in tail.iter_mut().enumerate() {
            step(i, d, x[whole + i], grad[whole + i]);
        }
        let sum = |a: [f32; LANES]| a.iter().map(|&v| v as f64).sum::<f64>();
        (sum(sdy), sum(sdyx))
    }
}

simd_fn! {
    /// `dx = rstd·(w·dy − m1 − x̂·m2)` in place over one channel's `dy`.
    #[allow(clippy::too_many_arguments)]
    fn channel_dx(x: &[f32], dx: &mut [f32], mean: f32, rstd: f32, w: f32, m1: f32, m2: f32) {
        for (d, &x) in dx.iter_mut().zip(x) {
            let xhat = (x - mean) * rstd;
            *d = rstd * (w * *d - m1 - xhat * m2);
        }
    }
}

impl CustomOp3 for GroupNormGrad {
    fn name(&self) -> &'static str {
        "group-norm-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        swb: &CpuStorage,
        lwb: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = lx.shape().dims();
        let (bsz, c, g) = (dims[0], dims[1], self.num_groups);
        let hw: usize = dims[2..].iter().product();
        let x = f32_input(sx, lx, "group norm input")?;
        let wb = f32_input(swb, lwb, "group norm weight and bias")?;
        let grad = f32_input(sg, lg, "group norm output gradient")?;
        let (w, b) = wb.split_at(c);
        let cg = c / g;
        let len = cg * hw;
        let mut out = vec![0f32; x.len() + 2 * bsz * c];
        let (dx, dwb) = out.split_at_mut(x.len());
        if len > 0 {
            dx.par_chunks_mut(len)
                .zip(x.par_chunks(len))
                .zip(grad.par_chunks(len))
                .zip(dwb.par_chunks_mut(2 * cg))
                .enumerate()
                .with_min_len(16384usize.div_ceil(len))
                .for_each(|(i, (((dx_g, x_g), g_g), dwb_g))| {
                    let (mean, rstd) = stats(x_g, self.eps);
                    let ch0 = (i % g) * cg;
                    let (dw_g, db_g) = dwb_g.split_at_mut(cg);
                    let (mut s1, mut s2) = (0f64, 0f64);
                    for k in 0..cg {
                        let at = k * hw..(k + 1) * hw;
                        let (ch, xc) = (ch0 + k, &x_g[at.clone()]);
                        let (sdy, sdyx) = channel_dy(
                            xc,
                            &g_g[at.clone()],
                            &mut dx_g[at],
                            mean,
                            rstd,
                            w[ch],
                            b[ch],
                            self.silu,
                        );
                        (db_g[k], dw_g[k]) = (sdy as f32, sdyx as f32);
                        s1 += w[ch] as f64 * sdy;
                        s2 += w[ch] as f64 * sdyx;
                    }
                    let (m1, m2) = ((s1 / len as f64) as f32, (s2 / len as f64) as f32);
                    for k in 0..cg {
                        let at = k * hw..(k + 1) * hw;
                        let xc = &x_g[at.clone()];
                        channel_dx(xc, &mut dx_g[at], mean, rstd, w[ch0 + k], m1, m2);
                    }
                });
        }
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}
