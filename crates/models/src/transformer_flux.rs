//! diffusers `FluxTransformer2DModel` (Black Forest Labs' Flux.1 dev and schnell): double-stream
//! MMDiT blocks, then single-stream blocks over the joint sequence, with 3-axis rotary position
//! embeddings and, in guidance-distilled models (dev), an embedding of the guidance scale.
//!
//! ```text
//! x = x_embedder(packed_latents); c = context_embedder(t5_embeds)
//! temb = timestep_embedder(proj(1000 t)) [+ guidance_embedder(proj(1000 g))] + text_embedder(pooled)
//! rope = rotary(cat(txt_ids, img_ids))                # (0, row, col) per image token
//! for block in transformer_blocks:                    # as SD3's, text tokens first
//!     c, x = block(x, c, temb, rope)
//! h = [c; x]
//! for block in single_transformer_blocks:
//!     ĥ, gate = norm(h, temb)
//!     h = h + gate · proj_out([attention(ĥ, rope); gelu(proj_mlp(ĥ))])
//! out = proj_out(norm_out(h[text..], temb))
//! ```

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::attention::{
    FeedForward, FeedForwardActivation, JointAttention, JointAttentionConfig, RotaryEmbedding,
};
use crate::embeddings::{batch_timesteps, TimeTextEmbedding};
use crate::normalization::{gate, modulate, AdaLayerNormContinuous, AdaLayerNormZero, LayerNorm};
use crate::ops::linear::{linear, Linear};

const CONTEXT: &str = "FluxTransformer2DModel config";

/// `config.json` of a `FluxTransformer2DModel`; absent fields take the diffusers defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FluxTransformer2DConfig {
    pub patch_size: usize,
    /// Channels of a packed token (4 × the VAE's latent channels).
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    /// Guidance-distilled (Flux-dev): the guidance scale is an input of the model.
    pub guidance_embeds: bool,
    /// Rotary widths of the (index, row, column) axes; they sum to the head width.
    pub axes_dims_rope: Vec<usize>,
}

impl Default for FluxTransformer2DConfig {
    fn default() -> Self {
        Self {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: false,
            axes_dims_rope: vec![16, 56, 56],
        }
    }
}

impl FluxTransformer2DConfig {
    /// Checks every setting the model depends on; the error names the field.
    pub fn validate(&self) -> diffuse_core::Result<()> {
        use diffuse_core::Error;
        for (field, v) in [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
        ] {
            if v == 0 {
                return Err(Error::config(CONTEXT, field, "must be positive"));
            }
        }
        let sum: usize = self.axes_dims_rope.iter().sum();
        if sum != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| !d.is_multiple_of(2))
        {
            return Err(Error::config(
                CONTEXT,
                "axes_dims_rope",
                format!(
                    "{:?} must be even widths summing to attention_head_dim {}",
                    self.axes_dims_rope, self.attention_head_dim
                ),
            ));
        }
        Ok(())
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }
}

/// diffusers `FluxPosEmbed`: for each axis `i` of the position ids `(S, axes)`, angles
/// `pos · θ^(−2k/d_i)` (in f64, as diffusers computes them), their cosines and sines each
/// repeated for both members of a pair, the axes side by side: `(S, head_dim)` tables.
pub fn flux_rotary_embedding(
    ids: &Tensor,
    axes_dims: &[usize],
    theta: f64,
) -> Result<RotaryEmbedding> {
    let (s, axes) = ids.dims2()?;
    if axes != axes_dims.len() {
        candle_core::bail!(
            "position ids have {axes} axes, the model {} (axes_dims_rope)",
            axes_dims.len()
        )
    }
    let ids = ids.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let width: usize = axes_dims.iter().sum();
    let (mut cos, mut sin) = (Vec::with_capacity(s * width), Vec::with_capacity(s * width));
    for row in &ids {
        for (&pos, &d) in row.iter().zip(axes_dims) {
            for k in (0..d).step_by(2) {
                let freq = 1.0 / theta.powf(k as f64 / d as f64);
                let angle = pos as f64 * freq;
                let (c, sn) = (angle.cos() as f32, angle.sin() as f32);
                cos.extend([c, c]);
                sin.extend([sn, sn]);
            }
        }
    }
    let device = Device::Cpu;
    Ok(RotaryEmbedding {
        cos: Tensor::from_vec(cos, (s, width), &device)?,
        sin: Tensor::from_vec(sin, (s, width), &device)?,
    })
}

/// diffusers `FluxTransformerBlock`: SD3's joint block with rotary embeddings, text first.
#[derive(Clone, Debug)]
struct FluxTransformerBlock {
    norm1: AdaLayerNormZero,
    norm1_context: AdaLayerNormZero,
    attn: JointAttention,
    norm2: LayerNorm,
    ff: FeedForward,
    norm2_context: LayerNorm,
    ff_context: FeedForward,
}

fn attention_config(cfg: &FluxTransformer2DConfig, added_kv: bool) -> JointAttentionConfig {
    JointAttentionConfig {
        dim: cfg.inner_dim(),
        heads: cfg.num_attention_heads,
        head_dim: cfg.attention_head_dim,
        qk_norm: Some(1e-6),
        added_kv,
        context_pre_only: false,
        pre_only: !added_kv,
        context_first: true,
    }
}

impl FluxTransformerBlock {
    fn new(vb: VarBuilder, cfg: &FluxTransformer2DConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let ff = |name: &str| {
            FeedForward::with_activation(
                vb.pp(name),
                dim,
                4,
                FeedForwardActivation::GeluApproximate,
            )
        };
        let norm = |name: &str| LayerNorm::new(vb.pp(name), dim, 1e-6, false);
        Ok(Self {
            norm1: AdaLayerNormZero::new(vb.pp("norm1"), dim, dim, 6)?,
            norm1_context: AdaLayerNormZero::new(vb.pp("norm1_context"), dim, dim, 6)?,
            attn: JointAttention::new(vb.pp("attn"), &attention_config(cfg, true))?,
            norm2: norm("norm2")?,
            ff: ff("ff")?,
            norm2_context: norm("norm2_context")?,
            ff_context: ff("ff_context")?,
        })
    }

    /// Returns the new `(context, x)`.
    fn forward(
        &self,
        x: &Tensor,
        c: &Tensor,
        temb: &Tensor,
        rope: &RotaryEmbedding,
    ) -> Result<(Tensor, Tensor)> {
        let (x_hat, m) = self.norm1.forward(x, temb)?;
        let (c_hat, cm) = self.norm1_context.forward(c, temb)?;
        let (a_x, a_c) = self.attn.forward(&x_hat, Some(&c_hat), Some(rope))?;
        let a_c = match a_c {
            Some(a) => a,
            None => candle_core::bail!("the joint attention returned no text output"),
        };
        let stream = |h: &Tensor, a: &Tensor, m: &[Tensor], norm: &LayerNorm, ff: &FeedForward| {
            let h = (h + gate(&m[2], a)?)?;
            let ff_in = modulate(&norm.forward(&h)?, &m[3], &m[4])?;
            &h + gate(&m[5], &ff.forward(&ff_in)?)?
        };
        let x = stream(x, &a_x, &m, &self.norm2, &self.ff)?;
        let c = stream(c, &a_c, &cm, &self.norm2_context, &self.ff_context)?;
        Ok((c, x))
    }
}

/// diffusers `FluxSingleTransformerBlock`: attention and MLP side by side over the joint
/// sequence, one output projection, one gate.
#[derive(Clone, Debug)]
struct FluxSingleTransformerBlock {
    norm: AdaLayerNormZero,
    proj_mlp: Linear,
    attn: JointAttention,
    proj_out: Linear,
}

impl FluxSingleTransformerBlock {
    fn new(vb: VarBuilder, cfg: &FluxTransformer2DConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let mlp = 4 * dim;
        Ok(Self {
            norm: AdaLayerNormZero::new(vb.pp("norm"), dim, dim, 3)?,
            proj_mlp: linear(dim, mlp, vb.pp("proj_mlp"))?,
            attn: JointAttention::new(vb.pp("attn"), &attention_config(cfg, false))?,
            proj_out: linear(dim + mlp, dim, vb.pp("proj_out"))?,
        })
    }

    fn forward(&self, h: &Tensor, temb: &Tensor, rope: &RotaryEmbedding) -> Result<Tensor> {
        let (h_hat, m) = self.norm.forward(h, temb)?;
        let mlp = crate::ops::activation::gelu_tanh(&self.proj_mlp.forward(&h_hat)?)?;
        let (attn, _) = self.attn.forward(&h_hat, None, Some(rope))?;
        let joint = Tensor::cat(&[&attn, &mlp], D::Minus1)?;
        h + gate(&m[2], &self.proj_out.forward(&joint)?)?
    }
}

/// The inputs of one Flux call besides the latents.
#[derive(Clone, Debug)]
pub struct FluxConditioning<'a> {
    /// T5 embeddings `(B, M, joint_attention_dim)`.
    pub encoder_hidden_states: &'a Tensor,
    /// Pooled CLIP embeddings `(B, pooled_projection_dim)`.
    pub pooled_projections: &'a Tensor,
    /// Position ids `(M, 3)` of the text tokens (zeros) and `(N, 3)` of the image tokens.
    pub txt_ids: &'a Tensor,
    pub img_ids: &'a Tensor,
    /// The guidance scale `(B,)` (or scalar) of a guidance-distilled model; `None` otherwise.
    pub guidance: Option<&'a Tensor>,
}

/// diffusers `FluxTransformer2DModel`.
#[derive(Clone, Debug)]
pub struct FluxTransformer2DModel {
    x_embedder: Linear,
    context_embedder: Linear,
    time_text_embed: TimeTextEmbedding,
    blocks: Vec<FluxTransformerBlock>,
    single_blocks: Vec<FluxSingleTransformerBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
    config: FluxTransformer2DConfig,
}

crate::model_mixin!(FluxTransformer2DModel, FluxTransformer2DConfig);

impl FluxTransformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &FluxTransformer2DConfig) -> Result<Self> {
        cfg.validate().map_err(crate::config::to_candle)?;
        let dim = cfg.inner_dim();
        let p = cfg.patch_size;
        Ok(Self {
            x_embedder: linear(cfg.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: linear(cfg.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            time_text_embed: TimeTextEmbedding::new(
                vb.pp("time_text_embed"),
                dim,
                cfg.pooled_projection_dim,
                cfg.guidance_embeds,
            )?,
            blocks: (0..cfg.num_layers)
                .map(|i| FluxTransformerBlock::new(vb.pp(format!("transformer_blocks.{i}")), cfg))
                .collect::<Result<_>>()?,
            single_blocks: (0..cfg.num_single_layers)
                .map(|i| {
                    FluxSingleTransformerBlock::new(
                        vb.pp(format!("single_transformer_blocks.{i}")),
                        cfg,
                    )
                })
                .collect::<Result<_>>()?,
            norm_out: AdaLayerNormContinuous::new(vb.pp("norm_out"), dim, dim, 1e-6)?,
            proj_out: linear(dim, p * p * cfg.out_channels(), vb.pp("proj_out"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &FluxTransformer2DConfig {
        &self.config
    }

    /// The velocity prediction `(B, N, out_channels)` for packed latents `(B, N,
    /// in_channels)` at `timestep` in 0..1 (scalar or `(B,)`; the model scales it by 1000, as
    /// it does the guidance). Computes in the latents' dtype.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        cond: &FluxConditioning<'_>,
    ) -> Result<Tensor> {
        let (b, n, _) = latents.dims3()?;
        let dtype = latents.dtype();
        let device = latents.device();
        let m = cond.encoder_hidden_states.dim(1)?;
        if cond.txt_ids.dims() != [m, 3] || cond.img_ids.dims() != [n, 3] {
            candle_core::bail!(
                "position ids: text {:?} and image {:?}, expected ({m}, 3) and ({n}, 3)",
                cond.txt_ids.dims(),
                cond.img_ids.dims()
            )
        }
        let scaled = |t: &Tensor| -> Result<Tensor> {
            batch_timesteps(t, b, device)?.to_dtype(dtype)? * 1000.0
        };
        let t = scaled(timestep)?;
        let g = cond.guidance.map(scaled).transpose()?;
        let temb = self.time_text_embed.forward(
            &t,
            g.as_ref(),
            &cond.pooled_projections.to_dtype(dtype)?,
        )?;
        let mut x = self.x_embedder.forward(latents)?;
        let mut c = self
            .context_embedder
            .forward(&cond.encoder_hidden_states.to_dtype(dtype)?)?;
        let ids = Tensor::cat(&[cond.txt_ids, cond.img_ids], 0)?;
        let rope = flux_rotary_embedding(&ids, &self.config.axes_dims_rope, 10000.0)?;
        let rope = RotaryEmbedding {
            cos: rope.cos.to_device(device)?,
            sin: rope.sin.to_device(device)?,
        };
        for block in &self.blocks {
            (c, x) = block.forward(&x, &c, &temb, &rope)?;
        }
        let mut h = Tensor::cat(&[&c, &x], 1)?;
        for block in &self.single_blocks {
            h = block.forward(&h, &temb, &rope)?;
        }
        let x = h.narrow(1, m, n)?;
        let x = self.norm_out.forward(&x, &temb)?;
        self.proj_out.forward(&x)
    }
}
