//! LayerNorm and GroupNorm written with generic tensor ops.
//!
//! candle's fused `layer_norm`/`rms_norm` kernels have no backward pass (gradients would be
//! silently dropped in training), so the norms here are composed from mean/sub/sqrt ops that
//! autograd understands. Half-precision inputs are normalised in f32, as torch does.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::activations::Activation;

fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// Weights `weight`/`bias` of shape `(dim,)` when `affine`.
    pub fn new(vb: VarBuilder, dim: usize, eps: f64, affine: bool) -> Result<Self> {
        let (weight, bias) = if affine {
            (
                Some(vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?),
                Some(vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    /// The fused kernel of [`crate::ops::group_norm`] where it runs (rows as one-group maps;
    /// without affine parameters, with a unit scale and zero shift).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let inputs: Vec<&Tensor> = [xs]
            .into_iter()
            .chain(&self.weight)
            .chain(&self.bias)
            .collect();
        if crate::ops::fused_on(&inputs) && xs.rank() > 0 {
            let c = xs.dim(D::Minus1)?;
            let param = |p: &Option<Tensor>, fill: f64| match p {
                Some(p) => p.to_dtype(xs.dtype()),
                None => Tensor::full(fill, c, xs.device())?.to_dtype(xs.dtype()),
            };
            let (w, b) = (param(&self.weight, 1.0)?, param(&self.bias, 0.0)?);
            let op = crate::ops::group_norm::GroupNormOp {
                num_groups: 1,
                eps: self.eps,
                silu: false,
            };
            let rows = xs.contiguous()?.reshape(((), c, 1))?;
            return rows.apply_op3(&w, &b, op)?.reshape(xs.shape());
        }
        self.forward_reference(xs)
    }
}

impl LayerNorm {
    /// The norm from generic ops: the reference for the fused kernel and the path on other
    /// devices and without affine parameters.
    pub fn forward_reference(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(compute_dtype(dtype))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let mut y = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        if let Some(w) = &self.weight {
            y = y.broadcast_mul(&w.to_dtype(y.dtype())?)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
        }
        y.to_dtype(dtype)
    }
}

/// `torch.nn.GroupNorm` (affine) over `(B, C, *)` inputs.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || !channels.is_multiple_of(num_groups) {
            candle_core::bail!(
                "GroupNorm `{}`: {num_groups} groups do not divide {channels} channels",
                vb.prefix()
            )
        }
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            num_groups,
            eps,
        })
    }

    /// The norm followed by an activation: the `norm → act` pair every ResNet block starts with.
    /// SiLU is fused into the kernel.
    pub fn forward_act(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        if act == Activation::Silu {
            if let Some(ys) = self.forward_fused(xs, true)? {
                return Ok(ys);
            }
        }
        act.forward(&self.forward(xs)?)
    }

    fn check_input(&self, xs: &Tensor) -> Result<()> {
        let dims = xs.dims();
        if dims.len() < 3 {
            candle_core::bail!("GroupNorm expects (B, C, ...) input, got shape {dims:?}")
        }
        if dims[1] != self.weight.dim(0)? {
            candle_core::bail!(
                "GroupNorm over {} channels got input {dims:?}",
                self.weight.dim(0)?
            )
        }
        Ok(())
    }

    /// The fused kernel ([`crate::ops::group_norm`]); `None` where it does not run.
    fn forward_fused(&self, xs: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        self.check_input(xs)?;
        if !crate::ops::fused_on(&[xs, &self.weight, &self.bias]) {
            return Ok(None);
        }
        let op = crate::ops::group_norm::GroupNormOp {
            num_groups: self.num_groups,
            eps: self.eps,
            silu,
        };
        let (w, b) = (
            self.weight.to_dtype(xs.dtype())?,
            self.bias.to_dtype(xs.dtype())?,
        );
        let name = || {
            let act = if silu { "+silu" } else { "" };
            format!("group_norm{act} {:?}", xs.dims())
        };
        let ys = crate::profile::timed(name, 0.0, || xs.contiguous()?.apply_op3(&w, &b, op))?;
        Ok(Some(ys))
    }

    /// The norm from generic ops: the reference for the fused kernel and the path on other
    /// devices.
    pub fn forward_reference(&self, xs: &Tensor) -> Result<Tensor> {
        self.check_input(xs)?;
        let dims = xs.dims();
        let (b, c) = (dims[0], dims[1]);
        let dtype = xs.dtype();
        let x = xs
            .reshape((b, self.num_groups, ()))?
            .to_dtype(compute_dtype(dtype))?;
        let mean = x.mean_keepdim(2)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(2)?;
        let normed = centered
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .reshape(dims)?;
        let mut affine_shape = vec![1; dims.len()];
        affine_shape[1] = c;
        let w = self
            .weight
            .to_dtype(normed.dtype())?
            .reshape(affine_shape.as_slice())?;
        let bias = self
            .bias
            .to_dtype(normed.dtype())?
            .reshape(affine_shape.as_slice())?;
        normed
            .broadcast_mul(&w)?
            .broadcast_add(&bias)?
            .to_dtype(dtype)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self.forward_fused(xs, false)? {
            Some(ys) => Ok(ys),
            None => self.forward_reference(xs),
        }
    }
}

/// Root-mean-square norm over the last dimension, `x / √(mean(x²) + eps) · weight`: T5's
/// `T5LayerNorm` and `torch.nn.RMSNorm` (the query/key norms of Flux and SD 3.5). The mean runs
/// in f32 for half inputs, as both do.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Option<Tensor>,
    eps: f64,
}

impl RmsNorm {
    /// Weight `weight` `(dim,)` when `affine`.
    pub fn new(vb: VarBuilder, dim: usize, eps: f64, affine: bool) -> Result<Self> {
        let weight = if affine {
            Some(vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?)
        } else {
            None
        };
        Ok(Self { weight, eps })
    }

    /// The norm from generic ops: the reference for the fused path, and the path when gradients
    /// are tracked (candle's fused `rms_norm` has no backward pass).
    pub fn forward_reference(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(compute_dtype(dtype))?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let mut y = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        if let Some(w) = &self.weight {
            y = y.broadcast_mul(&w.to_dtype(y.dtype())?)?;
        }
        y.to_dtype(dtype)
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let tracked = xs.track_op() || self.weight.as_ref().is_some_and(|w| w.track_op());
        if tracked || !xs.device().is_cpu() {
            return self.forward_reference(xs);
        }
        let c = xs.dim(D::Minus1)?;
        let w = match &self.weight {
            Some(w) => w.to_dtype(xs.dtype())?,
            None => Tensor::ones(c, xs.dtype(), xs.device())?,
        };
        candle_nn::ops::rms_norm(&xs.contiguous()?, &w, self.eps as f32)
    }
}

/// `x · (1 + scale) + shift` with `(B, C)` modulation over `(B, N, C)` tokens: how every
/// adaptive norm of the diffusion transformers applies its conditioning (in this order, as
/// diffusers computes it).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `gate · x` with a `(B, C)` gate over `(B, N, C)` tokens (adaLN-zero's residual gates).
pub fn gate(gate: &Tensor, x: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&gate.unsqueeze(1)?)
}

/// diffusers' adaLN-zero norms: `linear(silu(emb))` split into `chunks` `(B, dim)` pieces,
/// and a LayerNorm without affine parameters (eps 1e-6) modulated by the first shift and
/// scale. `AdaLayerNormZero` has 6 chunks (`shift_msa, scale_msa, gate_msa, shift_mlp,
/// scale_mlp, gate_mlp`), `AdaLayerNormZeroSingle` 3 (`shift, scale, gate`) and SD 3.5's
/// `SD35AdaLayerNormZeroX` 9 (the first six, then those of a second attention).
#[derive(Clone, Debug)]
pub struct AdaLayerNormZero {
    linear: crate::ops::linear::Linear,
    norm: LayerNorm,
    chunks: usize,
}

impl AdaLayerNormZero {
    /// Weights `linear.weight` `(chunks·dim, cond_dim)` and `linear.bias` under `vb`.
    pub fn new(vb: VarBuilder, dim: usize, cond_dim: usize, chunks: usize) -> Result<Self> {
        Ok(Self {
            linear: crate::ops::linear::linear(cond_dim, chunks * dim, vb.pp("linear"))?,
            norm: LayerNorm::new(vb.pp("norm"), dim, 1e-6, false)?,
            chunks,
        })
    }

    /// The modulation pieces of a conditioning vector `(B, cond_dim)`.
    pub fn chunks(&self, emb: &Tensor) -> Result<Vec<Tensor>> {
        self.linear.forward(&emb.silu()?)?.chunk(self.chunks, 1)
    }

    /// The norm without modulation (for a second modulation of the same input).
    pub fn norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// `(norm(x) · (1 + chunk 1) + chunk 0, every chunk)`.
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let chunks = self.chunks(emb)?;
        let x = modulate(&self.norm(x)?, &chunks[0], &chunks[1])?;
        Ok((x, chunks))
    }
}

/// diffusers `AdaLayerNormContinuous` with a LayerNorm (no affine, `eps`): `(scale, shift) =
/// linear(silu(cond))`, then `norm(x) · (1 + scale) + shift` (scale first, unlike adaLN-zero).
#[derive(Clone, Debug)]
pub struct AdaLayerNormContinuous {
    linear: crate::ops::linear::Linear,
    norm: LayerNorm,
}

impl AdaLayerNormContinuous {
    pub fn new(vb: VarBuilder, dim: usize, cond_dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            linear: crate::ops::linear::linear(cond_dim, 2 * dim, vb.pp("linear"))?,
            norm: LayerNorm::new(vb.pp("norm"), dim, eps, false)?,
        })
    }

    pub fn forward(&self, x: &Tensor, cond: &Tensor) -> Result<Tensor> {
        let emb = self.linear.forward(&cond.silu()?.to_dtype(x.dtype())?)?;
        let parts = emb.chunk(2, 1)?;
        modulate(&self.norm.forward(x)?, &parts[1], &parts[0])
    }
}
