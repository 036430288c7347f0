//! diffusers `Attention` (the `AttnProcessor2_0` maths), its feed-forward and the
//! `BasicTransformerBlock` of the cross-attention UNets.

use crate::ops::linear::Linear;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::normalization::{GroupNorm, LayerNorm};

/// `softmax(q·kᵀ·scale)·v` over `(B*heads, N, d)` tensors.
///
/// Every attention of the models goes through here. On the CPU it runs the tiled
/// online-softmax kernel of [`crate::ops::attention`] (half inputs computed in f32), which
/// never builds the `N × M` score matrix; elsewhere [`scaled_dot_product_attention_reference`].
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    attention(q, k, v, scale, false)
}

/// [`scaled_dot_product_attention`] where query `i` attends to keys `0..=i` only
/// (`is_causal=True` in torch; CLIP's text encoder).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention(q, k, v, scale, true)
}

fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (b, n, d) = q.dims3().unwrap_or((q.elem_count(), 1, 1));
    let m = k.dim(k.rank().saturating_sub(2)).unwrap_or(1);
    let dv = v.dims().last().copied().unwrap_or(1);
    profiled((b, n, m, d, dv), causal, || {
        attention_path(q, k, v, scale, causal)
    })
}

/// Runs `f`, an attention of `b` heads of `n` queries over `m` keys (key and value widths `d`,
/// `dv`), under the profiler.
fn profiled(
    (b, n, m, d, dv): (usize, usize, usize, usize, usize),
    causal: bool,
    f: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    // QKᵀ and PV; a causal mask skips about half of both.
    let flops = 2.0 * (b * n * m * (d + dv)) as f64 / if causal { 2.0 } else { 1.0 };
    let name = || format!("attention {b}x{n}x{d} over {m} keys");
    crate::profile::timed(name, flops, f)
}

/// How CUDA attention in f16/bf16 is computed: the score matrix with cuBLAS and the fused
/// softmax ([`softmax_attention`]), or the flash kernel without it. The flash kernel (WMMA,
/// measured on an H200 at 2.2 ms against 1.0 ms for SD 1.5's 16 × 4096² × 40) is the slower of
/// the two, so it is taken only where the score matrix would pass [`FLASH_MIN_SCORE_BYTES`]
/// (SD 1.5 at 1024² would need 8.6 GB per layer). `DIFFUSE_CUDA_ATTENTION=flash` or
/// `=materialized` forces either (for comparing them in `diffuse bench`).
#[derive(Clone, Copy, PartialEq)]
enum CudaAttention {
    BySize,
    Flash,
    Materialized,
}

/// The score-matrix size from which CUDA attention takes the flash kernel.
const FLASH_MIN_SCORE_BYTES: usize = 1 << 30;

/// Whether the CUDA flash-attention kernel takes `q`, `k`, `v` `(B, N|M, heads·d)`: f16/bf16
/// on a CUDA device with nothing tracked, no causal mask, one head size of at most
/// [`CUDA_FLASH_MAX_HEAD`] for all three, some keys, and [`CudaAttention`]'s choice.
///
/// [`CUDA_FLASH_MAX_HEAD`]: crate::ops::attention::CUDA_FLASH_MAX_HEAD
fn cuda_flash(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> bool {
    static MODE: std::sync::OnceLock<CudaAttention> = std::sync::OnceLock::new();
    let mode = *MODE.get_or_init(
        || match std::env::var("DIFFUSE_CUDA_ATTENTION").as_deref() {
            Ok("flash") => CudaAttention::Flash,
            Ok("materialized") => CudaAttention::Materialized,
            _ => CudaAttention::BySize,
        },
    );
    let (Ok((b, n, c)), Ok((_, m, ck)), Ok((_, _, cv))) = (q.dims3(), k.dims3(), v.dims3()) else {
        return false;
    };
    let wanted = match mode {
        CudaAttention::Flash => true,
        CudaAttention::Materialized => false,
        CudaAttention::BySize => {
            b * heads * n * m * q.dtype().size_in_bytes() >= FLASH_MIN_SCORE_BYTES
        }
    };
    wanted && q.device().is_cuda() && !causal && flash_takes(q, k, v, heads, (c, ck, cv, m))
}

/// The shapes and dtypes the CUDA flash kernel handles (see [`cuda_flash`]).
fn flash_takes(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    (c, ck, cv, m): (usize, usize, usize, usize),
) -> bool {
    let half = matches!(q.dtype(), DType::F16 | DType::BF16);
    let same_dtype = q.dtype() == k.dtype() && k.dtype() == v.dtype();
    half && same_dtype
        && heads > 0
        && c % heads == 0
        && (ck, cv) == (c, c)
        && (1..=crate::ops::attention::CUDA_FLASH_MAX_HEAD).contains(&(c / heads))
        && m > 0
        && crate::ops::fused_on(&[q, k, v])
}

/// Multi-head attention by the flash kernels, without the score matrix, whatever the sizes:
/// `q` `(B, N, heads·d)`, `k`, `v` `(B, M, heads·d)` give `(B, N, heads·d)`. On the CPU in
/// f32/f16/bf16; on CUDA in f16/bf16 with heads of at most 128 values. No causal mask and no
/// gradient. [`multi_head_attention`] picks it where it pays; this is for callers (and tests)
/// that want it.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let op = crate::ops::attention::FlashAttention {
        scale,
        causal: false,
        heads,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

fn attention_path(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    if cuda_flash(q, k, v, 1, causal) {
        return flash_attention(q, k, v, 1, scale);
    }
    let same_dtype = q.dtype() == k.dtype() && k.dtype() == v.dtype();
    if q.device().is_cpu() && same_dtype && crate::ops::kernel_dtype(q.dtype()) && q.rank() == 3 {
        let op = crate::ops::attention::FlashAttention {
            scale,
            causal,
            heads: 1,
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    if !causal && q.device().is_cuda() && crate::ops::fused_on(&[q, k, v]) {
        return softmax_attention(q, k, v, scale);
    }
    attention_reference(q, k, v, scale, causal)
}

/// Attention as two batched matmuls with the fused [`ScaledSoftmax`] between them (the path on
/// CUDA): the score matrix is written once and read once, in the input's dtype.
///
/// [`ScaledSoftmax`]: crate::ops::attention::ScaledSoftmax
pub fn softmax_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    // Half-precision scores are rounded as the matmul stores them; scaling q first (N·d values,
    // not N·M) rounds the scaled scores instead, as a GEMM with alpha = scale would.
    let (q, scale) = match q.dtype() {
        DType::F16 | DType::BF16 => ((q * scale)?, 1.0),
        _ => (q.clone(), scale),
    };
    let softmax = crate::ops::attention::ScaledSoftmax { scale };
    let probs = q
        .matmul(&k.t()?)?
        .contiguous()?
        .apply_op1_no_bwd(&softmax)?;
    probs.to_dtype(v.dtype())?.matmul(v)
}

/// Multi-head attention over the projections as they come: `q` `(B, N, heads·d)`, `k`
/// `(B, M, heads·d)`, `v` `(B, M, heads·dv)` give `(B, N, heads·dv)`, the heads merged back
/// (diffusers' `head_to_batch_dim`, attention, `batch_to_head_dim`). On the CPU, when no
/// gradient is tracked, the kernel reads and writes the heads where they are; otherwise they
/// are split into `(B·heads, N, d)` for [`scaled_dot_product_attention`] and merged back.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let (b, n, cq) = q.dims3()?;
    let (m, cv) = (k.dim(1)?, v.dim(2)?);
    let same_dtype = q.dtype() == k.dtype() && k.dtype() == v.dtype();
    let tracked = q.track_op() || k.track_op() || v.track_op();
    let splits = heads > 0 && cq % heads == 0 && cv % heads == 0;
    let cpu = q.device().is_cpu()
        && same_dtype
        && crate::ops::kernel_dtype(q.dtype())
        && !tracked
        && splits
        && k.rank() == 3;
    if cpu || cuda_flash(q, k, v, heads, causal) {
        let op = crate::ops::attention::FlashAttention {
            scale,
            causal,
            heads,
        };
        let shape = (b * heads, n, m, cq / heads, cv / heads);
        return profiled(shape, causal, || {
            q.contiguous()?
                .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
        });
    }
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        t.reshape((b, n, heads, c / heads))?
            .transpose(1, 2)?
            .reshape((b * heads, n, c / heads))
    };
    let out = attention(&split(q)?, &split(k)?, &split(v)?, scale, causal)?;
    let dv = out.dim(2)?;
    out.reshape((b, heads, n, dv))?
        .transpose(1, 2)?
        .reshape((b, n, heads * dv))
}

/// Attention with the full score matrix, from generic ops: the reference for the fused kernel
/// and the path on other devices. The softmax runs in f32 for half inputs.
pub fn scaled_dot_product_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    attention_reference(q, k, v, scale, false)
}

/// The reference of [`causal_attention`]: an additive −∞ mask above the diagonal.
pub fn causal_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    attention_reference(q, k, v, scale, true)
}

fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if matches!(scores.dtype(), DType::F16 | DType::BF16) {
        scores = scores.to_dtype(DType::F32)?;
    }
    if causal {
        let (n, m) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
        scores = scores.broadcast_add(&crate::ops::attention::causal_mask(n, m, q.device())?)?;
    }
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    probs.to_dtype(v.dtype())?.matmul(v)
}

/// Settings of one [`Attention`] layer.
#[derive(Clone, Debug)]
pub struct AttentionConfig {
    pub query_dim: usize,
    /// Width of the key/value input when it differs from `query_dim` (cross-attention).
    pub cross_attention_dim: Option<usize>,
    pub heads: usize,
    pub dim_head: usize,
    /// Bias on `to_q`/`to_k`/`to_v` (`to_out.0` always has one).
    pub bias: bool,
    /// Compute `q·kᵀ` in f32 when running in half precision (SD 2.x).
    pub upcast_attention: bool,
    /// A GroupNorm on the input (the UNet2DModel / VAE attention blocks).
    pub norm_num_groups: Option<usize>,
    pub eps: f64,
    /// Add the input to the output (the UNet2DModel / VAE attention blocks).
    pub residual_connection: bool,
    pub rescale_output_factor: f64,
}

impl AttentionConfig {
    /// The plain attention of a transformer block: no norm, no residual, no q/k/v bias.
    pub fn transformer(
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        upcast_attention: bool,
    ) -> Self {
        Self {
            query_dim,
            cross_attention_dim,
            heads,
            dim_head,
            bias: false,
            upcast_attention,
            norm_num_groups: None,
            eps: 1e-5,
            residual_connection: false,
            rescale_output_factor: 1.0,
        }
    }

    /// The self-attention over feature maps of `AttnDownBlock2D`, `UNetMidBlock2D` and the VAE:
    /// input GroupNorm, biased projections, residual connection.
    pub fn spatial(
        channels: usize,
        head_dim: usize,
        norm_num_groups: Option<usize>,
        eps: f64,
        rescale_output_factor: f64,
    ) -> Self {
        Self {
            query_dim: channels,
            cross_attention_dim: None,
            heads: (channels / head_dim.max(1)).max(1),
            dim_head: head_dim,
            bias: true,
            upcast_attention: false,
            norm_num_groups,
            eps,
            residual_connection: true,
            rescale_output_factor,
        }
    }
}

/// diffusers `Attention` with weights `to_q`, `to_k`, `to_v`, `to_out.0` (and `group_norm`).
#[derive(Clone, Debug)]
pub struct Attention {
    group_norm: Option<GroupNorm>,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    upcast_attention: bool,
    residual_connection: bool,
    rescale_output_factor: f64,
}

impl Attention {
    pub fn new(vb: VarBuilder, cfg: &AttentionConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let kv_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        let group_norm = match cfg.norm_num_groups {
            Some(g) => Some(GroupNorm::new(
                vb.pp("group_norm"),
                g,
                cfg.query_dim,
                cfg.eps,
            )?),
            None => None,
        };
        Ok(Self {
            group_norm,
            to_q: crate::ops::linear::linear_b(cfg.query_dim, inner, cfg.bias, vb.pp("to_q"))?,
            to_k: crate::ops::linear::linear_b(kv_dim, inner, cfg.bias, vb.pp("to_k"))?,
            to_v: crate::ops::linear::linear_b(kv_dim, inner, cfg.bias, vb.pp("to_v"))?,
            to_out: crate::ops::linear::linear(inner, cfg.query_dim, vb.pp("to_out").pp("0"))?,
            heads: cfg.heads,
            scale: 1.0 / (cfg.dim_head as f64).sqrt(),
            upcast_attention: cfg.upcast_attention,
            residual_connection: cfg.residual_connection,
            rescale_output_factor: cfg.rescale_output_factor,
        })
    }

    /// Attends `hidden_states` — `(B, N, C)`, or a `(B, C, H, W)` feature map — to
    /// `encoder_hidden_states` `(B, M, C')`, or to itself when `None`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<Tensor> {
        let residual = hidden_states;
        let spatial = hidden_states.dims().to_vec();
        let mut xs = match spatial.as_slice() {
            [b, c, h, w] => {
                let mut maps = hidden_states.reshape((*b, *c, h * w))?;
                if let Some(norm) = &self.group_norm {
                    maps = norm.forward(&maps)?;
                }
                // Contiguous tokens: candle 0.11 CPU matmul of a transposed batch view by a broadcast
                // weight (what `Linear` does for non-contiguous input) returns wrong values.
                maps.transpose(1, 2)?.contiguous()?
            }
            _ => hidden_states.clone(),
        };
        if let (Some(norm), 3) = (&self.group_norm, spatial.len()) {
            xs = norm
                .forward(&xs.transpose(1, 2)?)?
                .transpose(1, 2)?
                .contiguous()?;
        }
        let context = encoder_hidden_states.unwrap_or(&xs);
        let mut q = self.to_q.forward(&xs)?;
        let mut k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        // (The CPU kernel computes in f32 whatever the input dtype.)
        if self.upcast_attention && !q.device().is_cpu() {
            q = q.to_dtype(DType::F32)?;
            k = k.to_dtype(DType::F32)?;
        }
        let out = multi_head_attention(&q, &k, &v, self.heads, self.scale, false)?;
        let mut out = self.to_out.forward(&out)?;
        if let [b, c, h, w] = spatial.as_slice() {
            out = out.transpose(1, 2)?.reshape((*b, *c, *h, *w))?;
        }
        if self.residual_connection {
            out = (out + residual)?;
        }
        if self.rescale_output_factor != 1.0 {
            out = (out / self.rescale_output_factor)?;
        }
        Ok(out)
    }
}

/// The activation of a diffusers `FeedForward` (`activation_fn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeedForwardActivation {
    /// `"geglu"`: `net.0.proj` makes `[a, gate]`, twice the inner width; `a · gelu(gate)`.
    Geglu,
    /// `"gelu"`: the exact GELU.
    Gelu,
    /// `"gelu-approximate"`: the tanh GELU (DiT, SD3, Flux).
    GeluApproximate,
}

impl FeedForwardActivation {
    /// Parses diffusers' `activation_fn` name, with an error naming the config field.
    pub fn parse(name: &str, context: &str, field: &str) -> diffuse_core::Result<Self> {
        crate::config::choose(
            context,
            field,
            "activation",
            name,
            &[
                ("geglu", Self::Geglu),
                ("gelu", Self::Gelu),
                ("gelu-approximate", Self::GeluApproximate),
            ],
        )
    }
}

/// diffusers `FeedForward`: `net.0.proj` → activation → `net.2`.
#[derive(Clone, Debug)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
    act: FeedForwardActivation,
}

impl FeedForward {
    /// The GEGLU feed-forward of the UNets' transformer blocks.
    pub fn new(vb: VarBuilder, dim: usize, mult: usize) -> Result<Self> {
        Self::with_activation(vb, dim, mult, FeedForwardActivation::Geglu)
    }

    /// Inner width `dim · mult`, output width `dim`.
    pub fn with_activation(
        vb: VarBuilder,
        dim: usize,
        mult: usize,
        act: FeedForwardActivation,
    ) -> Result<Self> {
        let inner = dim * mult;
        let proj_out = match act {
            FeedForwardActivation::Geglu => inner * 2,
            _ => inner,
        };
        Ok(Self {
            proj: crate::ops::linear::linear(dim, proj_out, vb.pp("net.0.proj"))?,
            out: crate::ops::linear::linear(inner, dim, vb.pp("net.2"))?,
            act,
        })
    }
}

/// The feed-forward runs on at most this many bytes of hidden activations at a time.
const FF_CHUNK_BYTES: usize = 16 << 20;

impl FeedForward {
    fn forward_rows(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(xs)?;
        let (kind, f): (_, fn(&Tensor) -> Result<Tensor>) = match self.act {
            FeedForwardActivation::Geglu => ("geglu", crate::ops::geglu::geglu),
            FeedForwardActivation::Gelu => ("gelu", crate::ops::activation::gelu),
            FeedForwardActivation::GeluApproximate => {
                ("gelu-tanh", crate::ops::activation::gelu_tanh)
            }
        };
        let name = || format!("{kind} {:?}", h.dims());
        let h = crate::profile::timed(name, 0.0, || f(&h))?;
        self.out.forward(&h)
    }
}

impl Module for FeedForward {
    /// Tokens are independent here, so on the CPU they go through in chunks: the hidden
    /// activations (8× the input at SD 1.5's 64×64 level, 84 MB) then stay below glibc's mmap
    /// threshold and reuse heap memory instead of faulting in fresh pages on every call.
    /// Chunks are equal, and never fewer tokens than channels: each chunk reads the weights
    /// again, which at the 16×16 level (512 tokens, 79 MB of weights) cost more than the
    /// fresh pages (a 409 + 103 split ran its 103 rows at half speed).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let (c, rows) = (
            dims[dims.len() - 1],
            xs.elem_count() / dims[dims.len() - 1].max(1),
        );
        let hidden = self.proj.weight().dim(0)?;
        let per_chunk = (FF_CHUNK_BYTES / (hidden * xs.dtype().size_in_bytes()).max(1)).max(c);
        if !xs.device().is_cpu() || rows <= per_chunk {
            return self.forward_rows(xs);
        }
        let per_chunk = rows.div_ceil(rows.div_ceil(per_chunk));
        let flat = xs.reshape((rows, c))?;
        let parts = (0..rows)
            .step_by(per_chunk)
            .map(|r| self.forward_rows(&flat.narrow(0, r, per_chunk.min(rows - r))?))
            .collect::<Result<Vec<_>>>()?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = parts[0].dim(1)?;
        Tensor::cat(&parts, 0)?.reshape(out_dims)
    }
}

/// diffusers `BasicTransformerBlock` (layer-norm variant): self-attention, cross-attention,
/// GEGLU feed-forward, each pre-normed and residual.
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    cross: Option<(LayerNorm, Attention)>,
    norm3: LayerNorm,
    ff: FeedForward,
    /// `attn1` attends to the encoder states too (no self-attention at all).
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_attention_dim: Option<usize>,
        only_cross_attention: bool,
        upcast_attention: bool,
    ) -> Result<Self> {
        let attn1_kv = if only_cross_attention {
            cross_attention_dim
        } else {
            None
        };
        let attn1 = Attention::new(
            vb.pp("attn1"),
            &AttentionConfig::transformer(dim, attn1_kv, heads, dim_head, upcast_attention),
        )?;
        let cross = match cross_attention_dim {
            Some(cd) => Some((
                LayerNorm::new(vb.pp("norm2"), dim, 1e-5, true)?,
                Attention::new(
                    vb.pp("attn2"),
                    &AttentionConfig::transformer(dim, Some(cd), heads, dim_head, upcast_attention),
                )?,
            )),
            None => None,
        };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5, true)?,
            attn1,
            cross,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5, true)?,
            ff: FeedForward::new(vb.pp("ff"), dim, 4)?,
            only_cross_attention,
        })
    }

    pub fn forward(&self, xs: &Tensor, encoder_hidden_states: Option<&Tensor>) -> Result<Tensor> {
        let attn1_context = if self.only_cross_attention {
            encoder_hidden_states
        } else {
            None
        };
        let self_attention =
            |xs: &Tensor| self.attn1.forward(&self.norm1.forward(xs)?, attn1_context);
        // A self-attention reads one sample at a time: once for both halves of a guided batch
        // that are still equal (the first block, before any text).
        let attended = match attn1_context {
            None => crate::ops::once_for_equal_halves(xs, None, |xs, _| self_attention(xs))?,
            Some(_) => self_attention(xs)?,
        };
        let xs = (attended + xs)?;
        let xs = match &self.cross {
            Some((norm2, attn2)) => {
                (attn2.forward(&norm2.forward(&xs)?, encoder_hidden_states)? + xs)?
            }
            None => xs,
        };
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Enough tokens that the feed-forward splits them into chunks (three equal ones here),
    /// and the same result as one pass over all of them.
    #[test]
    fn feed_forward_chunks_match_one_pass() -> Result<()> {
        let dev = Device::Cpu;
        // Plain tensors, not variables, so that the linear layers take their inference path.
        let mut ws = std::collections::HashMap::new();
        for (name, shape) in [
            ("net.0.proj.weight", vec![64, 8]),
            ("net.0.proj.bias", vec![64]),
            ("net.2.weight", vec![8, 32]),
            ("net.2.bias", vec![8]),
        ] {
            ws.insert(name.to_string(), Tensor::randn(0f32, 0.3, shape, &dev)?);
        }
        let ff = FeedForward::new(VarBuilder::from_tensors(ws, DType::F32, &dev), 8, 4)?;
        // 64 hidden values per token: 65,536 tokens per 16 MiB chunk.
        let rows = 2 * 65_536 + 1000;
        let xs = Tensor::randn(0f32, 1.0, (1, rows, 8), &dev)?;
        let chunked = ff.forward(&xs)?;
        let whole = ff.forward_rows(&xs)?;
        assert_eq!(chunked.dims(), &[1, rows, 8]);
        let diff = (chunked - whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff == 0.0, "chunked feed-forward differs by {diff}");
        Ok(())
    }
}

/// Settings of a [`JointAttention`].
#[derive(Clone, Debug)]
pub struct JointAttentionConfig {
    pub dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Query/key RMS norms per head (`norm_q`, `norm_k`, and `norm_added_q/k` for the text
    /// stream), with this eps: SD 3.5's `qk_norm="rms_norm"` and every Flux attention.
    pub qk_norm: Option<f64>,
    /// A second (text) stream with its own projections `add_{q,k,v}_proj`.
    pub added_kv: bool,
    /// No `to_add_out`: the text stream's output is not used (SD3's last block).
    pub context_pre_only: bool,
    /// No `to_out`: the attention output is returned as it is (Flux's single blocks).
    pub pre_only: bool,
    /// The text tokens come before the image tokens in the joint sequence (Flux; SD3 puts
    /// them after). With rotary embeddings, the order must match their positions.
    pub context_first: bool,
}

/// The joint attention of SD3's MMDiT and Flux (diffusers `JointAttnProcessor2_0` and
/// `FluxAttnProcessor`): image tokens `x` and text tokens `c` are projected by their own
/// biased q/k/v layers, optionally RMS-normed per head and rotated, attend to each other as
/// one sequence, and are split again and projected out by `to_out.0` and `to_add_out`.
#[derive(Clone, Debug)]
pub struct JointAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Option<Linear>,
    /// `add_q_proj`, `add_k_proj`, `add_v_proj`.
    added: Option<[Linear; 3]>,
    to_add_out: Option<Linear>,
    /// `norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`.
    norms: Option<[crate::normalization::RmsNorm; 4]>,
    heads: usize,
    head_dim: usize,
    context_first: bool,
}

/// Rotary position embeddings for the whole joint sequence: `cos`, `sin` `(tokens, head_dim)`
/// f32, each frequency repeated for the two members of its pair (diffusers'
/// `repeat_interleave_real`).
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RotaryEmbedding {
    /// Rotates the pairs `(x[2i], x[2i+1])` of every head of `x` `(B, N, heads·d)` by the
    /// angles of its token: `x·cos + rot(x)·sin` with `rot(x)[2i] = −x[2i+1]`,
    /// `rot(x)[2i+1] = x[2i]` (diffusers' `apply_rotary_emb`, `use_real_unbind_dim=-1`).
    pub fn apply(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let d = c / heads;
        let pairs = x.reshape((b, n, heads, d / 2, 2))?;
        let (re, im) = (pairs.narrow(4, 0, 1)?, pairs.narrow(4, 1, 1)?);
        let rotated = Tensor::cat(&[&im.neg()?, &re], 4)?.reshape((b, n, heads, d))?;
        let table = |t: &Tensor| -> Result<Tensor> { t.to_dtype(x.dtype())?.reshape((1, n, 1, d)) };
        let x4 = x.reshape((b, n, heads, d))?;
        let out =
            (x4.broadcast_mul(&table(&self.cos)?)? + rotated.broadcast_mul(&table(&self.sin)?)?)?;
        out.reshape((b, n, c))
    }
}

impl JointAttention {
    pub fn new(vb: VarBuilder, cfg: &JointAttentionConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let lin = |name: &str, i: usize, o: usize| crate::ops::linear::linear(i, o, vb.pp(name));
        let added = if cfg.added_kv {
            Some([
                lin("add_q_proj", cfg.dim, inner)?,
                lin("add_k_proj", cfg.dim, inner)?,
                lin("add_v_proj", cfg.dim, inner)?,
            ])
        } else {
            None
        };
        let norms = match cfg.qk_norm {
            Some(eps) => {
                let norm = |name: &str| {
                    crate::normalization::RmsNorm::new(vb.pp(name), cfg.head_dim, eps, true)
                };
                let (q, k) = (norm("norm_q")?, norm("norm_k")?);
                let (aq, ak) = if cfg.added_kv {
                    (norm("norm_added_q")?, norm("norm_added_k")?)
                } else {
                    (q.clone(), k.clone())
                };
                Some([q, k, aq, ak])
            }
            None => None,
        };
        Ok(Self {
            to_q: lin("to_q", cfg.dim, inner)?,
            to_k: lin("to_k", cfg.dim, inner)?,
            to_v: lin("to_v", cfg.dim, inner)?,
            to_out: (!cfg.pre_only)
                .then(|| crate::ops::linear::linear(inner, cfg.dim, vb.pp("to_out").pp("0")))
                .transpose()?,
            to_add_out: (cfg.added_kv && !cfg.context_pre_only)
                .then(|| lin("to_add_out", inner, cfg.dim))
                .transpose()?,
            added,
            norms,
            heads: cfg.heads,
            head_dim: cfg.head_dim,
            context_first: cfg.context_first,
        })
    }

    /// `(B, N, heads·d)` through a per-head RMS norm.
    fn head_norm(&self, t: Tensor, norm: &crate::normalization::RmsNorm) -> Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        norm.forward(&t.reshape((b, n, self.heads, self.head_dim))?)?
            .reshape((b, n, c))
    }

    /// Attends image tokens `x` `(B, N, dim)` and text tokens `context` `(B, M, dim)` (or `x`
    /// alone) jointly; `rope` covers the joint sequence in its order. Returns the image
    /// tokens' output and the text tokens' (projected by `to_add_out` when there is one).
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        rope: Option<&RotaryEmbedding>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let project = |t: &Tensor, layers: [&Linear; 3], norms: Option<[&_; 2]>| -> Result<_> {
            let (mut q, mut k) = (layers[0].forward(t)?, layers[1].forward(t)?);
            if let Some([nq, nk]) = norms {
                q = self.head_norm(q, nq)?;
                k = self.head_norm(k, nk)?;
            }
            Ok((q, k, layers[2].forward(t)?))
        };
        let norms = self.norms.as_ref();
        let (mut q, mut k, mut v) = project(
            x,
            [&self.to_q, &self.to_k, &self.to_v],
            norms.map(|n| [&n[0], &n[1]]),
        )?;
        let n_img = x.dim(1)?;
        let joint = match (context, &self.added) {
            (Some(c), Some([aq, ak, av])) => {
                let (cq, ck, cv) = project(c, [aq, ak, av], norms.map(|n| [&n[2], &n[3]]))?;
                let cat = |img: &Tensor, txt: &Tensor| match self.context_first {
                    true => Tensor::cat(&[txt, img], 1),
                    false => Tensor::cat(&[img, txt], 1),
                };
                q = cat(&q, &cq)?;
                k = cat(&k, &ck)?;
                v = cat(&v, &cv)?;
                true
            }
            (Some(_), None) => {
                candle_core::bail!("this attention has no text-stream projections")
            }
            (None, _) => false,
        };
        if let Some(rope) = rope {
            q = rope.apply(&q, self.heads)?;
            k = rope.apply(&k, self.heads)?;
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = multi_head_attention(&q, &k, &v, self.heads, scale, false)?;
        let total = out.dim(1)?;
        let (img, txt) = match (joint, self.context_first) {
            (false, _) => (out, None),
            (true, true) => (
                out.narrow(1, total - n_img, n_img)?,
                Some(out.narrow(1, 0, total - n_img)?),
            ),
            (true, false) => (
                out.narrow(1, 0, n_img)?,
                Some(out.narrow(1, n_img, total - n_img)?),
            ),
        };
        let img = match &self.to_out {
            Some(l) => l.forward(&img.contiguous()?)?,
            None => img,
        };
        let txt = match (&self.to_add_out, txt) {
            (Some(l), Some(t)) => Some(l.forward(&t.contiguous()?)?),
            (_, t) => t,
        };
        Ok((img, txt))
    }
}
