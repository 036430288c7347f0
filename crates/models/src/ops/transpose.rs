//! Batched transposes `(B, R, S)` → `(B, S, R)` on every core: the feature-map ↔ token layouts
//! around the transformer blocks (`(B, C, H·W)` ↔ `(B, H·W, C)`). candle's strided copy runs
//! on one thread; in an SD 1.5 UNet step these copies kept one core busy and the other idle
//! for about 1% of the step.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::microkernel::transpose;
use super::{f32_input, f32_output, output_buffer};

/// The op behind [`batch_transpose`] on the CPU.
struct BatchTranspose;

impl CustomOp1 for BatchTranspose {
    fn name(&self) -> &'static str {
        "batch-transpose"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, r, c) = l.shape().dims3()?;
        let x = f32_input(s, l, self.name())?;
        // Every element is written: each matrix is transposed whole.
        let mut out = output_buffer(x.len());
        if r * c > 0 {
            for (src, dst) in x.chunks_exact(r * c).zip(out.chunks_exact_mut(r * c)) {
                transpose(src, (r, c, c), dst);
            }
        }
        Ok((f32_output(out, s.dtype())?, Shape::from((b, c, r))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(batch_transpose(grad)?))
    }
}

/// `x (B, R, S)` as a contiguous `(B, S, R)`: each matrix transposed, on every core for f32 on
/// the CPU; elsewhere candle's transpose and copy.
pub fn batch_transpose(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(BatchTranspose)
    } else {
        x.transpose(1, 2)?.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The op against candle's transpose and copy, on shapes with and without whole blocks of
    /// eight, and its gradient (the transpose of the output's gradient) against candle's.
    #[test]
    fn batch_transpose_matches_candle_with_gradient() -> Result<()> {
        for (b, r, s) in [(2, 320, 64), (1, 13, 70), (3, 8, 1), (2, 77, 9)] {
            let n = b * r * s;
            let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let x = Var::from_vec(values, (b, r, s), &Device::Cpu)?;
            let got = batch_transpose(x.as_tensor())?;
            let want = x.as_tensor().transpose(1, 2)?.contiguous()?;
            assert_eq!(got.dims(), want.dims());
            let (got_v, want_v) = (
                got.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
            );
            assert_eq!(got_v, want_v, "{b}x{r}x{s}");
            let weights = Tensor::arange(0f32, n as f32, &Device::Cpu)?.reshape((b, s, r))?;
            let grads = (got * &weights)?.sum_all()?.backward()?;
            let grad = grads.get(x.as_tensor()).expect("x has a gradient");
            let want_grad = weights.transpose(1, 2)?.contiguous()?;
            assert_eq!(
                grad.flatten_all()?.to_vec1::<f32>()?,
                want_grad.flatten_all()?.to_vec1::<f32>()?,
                "gradient {b}x{r}x{s}"
            );
        }
        Ok(())
    }
}
