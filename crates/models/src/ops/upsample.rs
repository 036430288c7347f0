//! Nearest-neighbour ×2 upsampling of `(B, C, H, W)` with a backward of its own, for training:
//! each pixel is copied to its 2×2 block, and the gradient of a pixel is the sum of its block.
//! Built from candle ops (a broadcast over two inner axes), the backward ran candle's generic
//! reduction, which divides every index when the summed axes are not the last ones: about 2%
//! of the bundled model's training step.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_input, f32_output, kernel_dtype, output_buffer};

/// `(B, C, H, W)` → `(B, C, 2H, 2W)`.
struct Upsample2x;

/// The backward of [`Upsample2x`]: `(B, C, 2H, 2W)` → `(B, C, H, W)`, each 2×2 block summed.
struct BlockSum2x;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let x = f32_input(s, l, self.name())?;
        // Every element is written: each plane's rows are filled pairwise.
        let mut out = output_buffer(x.len() * 4);
        if !x.is_empty() {
            out.par_chunks_mut(4 * h * w)
                .zip(x.par_chunks(h * w))
                .for_each(|(dst, src)| {
                    for (rows, row) in dst.chunks_exact_mut(4 * w).zip(src.chunks_exact(w)) {
                        let (top, bottom) = rows.split_at_mut(2 * w);
                        for (pair, &v) in top.chunks_exact_mut(2).zip(row) {
                            pair.fill(v);
                        }
                        bottom.copy_from_slice(top);
                    }
                });
        }
        Ok((
            f32_output(out, s.dtype())?,
            Shape::from((b, c, 2 * h, 2 * w)),
        ))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        crate::profile::timed_backward(self.name(), grad, || {
            Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&BlockSum2x)?))
        })
    }
}

impl CustomOp1 for BlockSum2x {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h2, w2) = l.shape().dims4()?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            candle_core::bail!("{}: odd size {h2}×{w2}", self.name())
        }
        let (h, w) = (h2 / 2, w2 / 2);
        let g = f32_input(s, l, self.name())?;
        // Every element is written: one per block.
        let mut out = output_buffer(g.len() / 4);
        if !g.is_empty() {
            out.par_chunks_mut(h * w)
                .zip(g.par_chunks(4 * h * w))
                .for_each(|(dst, src)| {
                    for (row, rows) in dst.chunks_exact_mut(w).zip(src.chunks_exact(4 * w)) {
                        let (top, bottom) = rows.split_at(2 * w);
                        let blocks = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                        for (d, (t, b)) in row.iter_mut().zip(blocks) {
                            // The order of candle's sum over the broadcast axes, so the
                            // gradient is the same to the bit as the op it replaces.
                            *d = t[0] + t[1] + b[0] + b[1];
                        }
                    }
                });
        }
        Ok((f32_output(out, s.dtype())?, Shape::from((b, c, h, w))))
    }
}

/// Nearest ×2 upsampling of a CPU tensor in f32/f16/bf16 by the kernel above; elsewhere the
/// broadcast of each pixel to its block (whose backward is candle's sum).
pub fn upsample_nearest_2x(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && kernel_dtype(xs.dtype()) {
        return xs.contiguous()?.apply_op1(Upsample2x);
    }
    upsample_nearest_2x_reference(xs)
}

/// [`upsample_nearest_2x`] from candle ops: the reference for the kernel.
pub fn upsample_nearest_2x_reference(xs: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    xs.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}
