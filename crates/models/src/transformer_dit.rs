//! diffusers `DiTTransformer2DModel` (Peebles & Xie, DiT): a class-conditional transformer over
//! latent patches with adaLN-zero blocks and a learned variance (`out_channels = 2 ×
//! in_channels`; the pipeline keeps the first half).
//!
//! ```text
//! x = patch_embed(latents) + sincos_pos            # (B, N, D)
//! for block in transformer_blocks:                 # each block embeds (t, label) itself
//!     c = timestep_embedder(proj(t)) + class_table[label]
//!     shift, scale, gate, shift2, scale2, gate2 = norm1.linear(silu(c))
//!     x = x + gate  · attn(layer_norm(x) · (1 + scale) + shift)
//!     x = x + gate2 · ff(norm3(x) · (1 + scale2) + shift2)
//! shift, scale = proj_out_1(silu(c₀))              # c₀: block 0's embedding
//! out = unpatchify(proj_out_2(layer_norm(x) · (1 + scale) + shift))
//! ```

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::attention::{Attention, AttentionConfig, FeedForward, FeedForwardActivation};
use crate::embeddings::{batch_timesteps, unpatchify, CombinedTimestepLabelEmbeddings, PatchEmbed};
use crate::normalization::{gate, modulate, AdaLayerNormZero, LayerNorm};
use crate::ops::linear::{linear, Linear};

const CONTEXT: &str = "DiTTransformer2DModel config";

/// `config.json` of a `DiTTransformer2DModel`; absent fields take the diffusers defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiTTransformer2DConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    /// Defaults to `in_channels`; twice it with a learned variance.
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    /// Training only; accepted.
    pub dropout: f64,
    /// Unused by the model (diffusers accepts it too).
    pub norm_num_groups: usize,
    pub attention_bias: bool,
    /// The latent side the position embeddings were made for.
    pub sample_size: usize,
    pub patch_size: usize,
    /// `gelu-approximate` (DiT), `gelu` or `geglu`.
    pub activation_fn: String,
    /// Number of classes (the label table has one more row, the null class).
    pub num_embeds_ada_norm: Option<usize>,
    /// Accepted; the CPU attention computes in f32 anyway.
    pub upcast_attention: bool,
    /// Only `ada_norm_zero` (as diffusers).
    pub norm_type: String,
    pub norm_elementwise_affine: bool,
    pub norm_eps: f64,
}

impl Default for DiTTransformer2DConfig {
    fn default() -> Self {
        Self {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: None,
            num_layers: 28,
            dropout: 0.0,
            norm_num_groups: 32,
            attention_bias: true,
            sample_size: 32,
            patch_size: 2,
            activation_fn: "gelu-approximate".into(),
            num_embeds_ada_norm: Some(1000),
            upcast_attention: false,
            norm_type: "ada_norm_zero".into(),
            norm_elementwise_affine: false,
            norm_eps: 1e-5,
        }
    }
}

impl DiTTransformer2DConfig {
    /// Checks every setting the model depends on; the error names the field.
    pub fn validate(&self) -> diffuse_core::Result<()> {
        use diffuse_core::Error;
        if self.norm_type != "ada_norm_zero" {
            return Err(Error::config(
                CONTEXT,
                "norm_type",
                format!(
                    "unsupported `{}` (DiT supports ada_norm_zero)",
                    self.norm_type
                ),
            ));
        }
        if self.num_embeds_ada_norm.is_none_or(|n| n == 0) {
            return Err(Error::config(
                CONTEXT,
                "num_embeds_ada_norm",
                "must be a positive number of classes",
            ));
        }
        for (field, v) in [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("in_channels", self.in_channels),
            ("patch_size", self.patch_size),
            ("sample_size", self.sample_size),
        ] {
            if v == 0 {
                return Err(Error::config(CONTEXT, field, "must be positive"));
            }
        }
        if self.out_channels == Some(0) {
            return Err(Error::config(CONTEXT, "out_channels", "must be positive"));
        }
        if !self.sample_size.is_multiple_of(self.patch_size) {
            return Err(Error::config(
                CONTEXT,
                "sample_size",
                format!(
                    "{} is not a multiple of patch_size {}",
                    self.sample_size, self.patch_size
                ),
            ));
        }
        if !self.inner_dim().is_multiple_of(4) {
            return Err(Error::config(
                CONTEXT,
                "attention_head_dim",
                "the width (heads × head dim) must be divisible by 4 for the position embeddings",
            ));
        }
        FeedForwardActivation::parse(&self.activation_fn, CONTEXT, "activation_fn")?;
        Ok(())
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Real classes (label ids `0..n`); id `n` is the null class.
    pub fn num_classes(&self) -> usize {
        self.num_embeds_ada_norm.unwrap_or(0)
    }
}

/// One DiT block: diffusers `BasicTransformerBlock` with `norm_type="ada_norm_zero"` and no
/// cross-attention.
#[derive(Clone, Debug)]
struct DiTBlock {
    emb: CombinedTimestepLabelEmbeddings,
    norm1: AdaLayerNormZero,
    attn1: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl DiTBlock {
    fn new(vb: VarBuilder, cfg: &DiTTransformer2DConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let act = FeedForwardActivation::parse(&cfg.activation_fn, CONTEXT, "activation_fn")
            .map_err(crate::config::to_candle)?;
        let attn = AttentionConfig {
            bias: cfg.attention_bias,
            ..AttentionConfig::transformer(
                dim,
                None,
                cfg.num_attention_heads,
                cfg.attention_head_dim,
                cfg.upcast_attention,
            )
        };
        Ok(Self {
            emb: CombinedTimestepLabelEmbeddings::new(vb.pp("norm1.emb"), cfg.num_classes(), dim)?,
            norm1: AdaLayerNormZero::new(vb.pp("norm1"), dim, dim, 6)?,
            attn1: Attention::new(vb.pp("attn1"), &attn)?,
            norm3: LayerNorm::new(
                vb.pp("norm3"),
                dim,
                cfg.norm_eps,
                cfg.norm_elementwise_affine,
            )?,
            ff: FeedForward::with_activation(vb.pp("ff"), dim, 4, act)?,
        })
    }

    fn forward(&self, x: &Tensor, cond: &Tensor) -> Result<Tensor> {
        let (normed, m) = self.norm1.forward(x, cond)?;
        let x = (gate(&m[2], &self.attn1.forward(&normed, None)?)? + x)?;
        let normed = modulate(&self.norm3.forward(&x)?, &m[3], &m[4])?;
        gate(&m[5], &self.ff.forward(&normed)?)? + x
    }
}

/// diffusers `DiTTransformer2DModel`.
#[derive(Clone, Debug)]
pub struct DiTTransformer2DModel {
    pos_embed: PatchEmbed,
    blocks: Vec<DiTBlock>,
    norm_out: LayerNorm,
    proj_out_1: Linear,
    proj_out_2: Linear,
    config: DiTTransformer2DConfig,
}

crate::model_mixin!(DiTTransformer2DModel, DiTTransformer2DConfig);

impl DiTTransformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &DiTTransformer2DConfig) -> Result<Self> {
        cfg.validate().map_err(crate::config::to_candle)?;
        let dim = cfg.inner_dim();
        let p = cfg.patch_size;
        Ok(Self {
            pos_embed: PatchEmbed::new(
                vb.pp("pos_embed"),
                cfg.sample_size,
                p,
                cfg.in_channels,
                dim,
                None,
            )?,
            blocks: (0..cfg.num_layers)
                .map(|i| DiTBlock::new(vb.pp(format!("transformer_blocks.{i}")), cfg))
                .collect::<Result<_>>()?,
            norm_out: LayerNorm::new(vb.pp("norm_out"), dim, 1e-6, false)?,
            proj_out_1: linear(dim, 2 * dim, vb.pp("proj_out_1"))?,
            proj_out_2: linear(dim, p * p * cfg.out_channels(), vb.pp("proj_out_2"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &DiTTransformer2DConfig {
        &self.config
    }

    /// The noise (and variance) prediction `(B, out_channels, H, W)` for latents `(B, C, H, W)`
    /// (square, sides a multiple of the patch size), a timestep (scalar or `(B,)`) and class
    /// labels `(B,)` (ids below `num_embeds_ada_norm`, or it for the null class). Computes in
    /// the latents' dtype.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        class_labels: &Tensor,
    ) -> Result<Tensor> {
        let (b, _, h, w) = latents.dims4()?;
        if h != w {
            candle_core::bail!("DiT takes square latents, got {h}x{w}")
        }
        if class_labels.dims() != [b] {
            candle_core::bail!(
                "class labels must have shape ({b},), got {:?}",
                class_labels.dims()
            )
        }
        let dtype = latents.dtype();
        let t = batch_timesteps(timestep, b, latents.device())?;
        let labels = class_labels.to_device(latents.device())?;
        let mut x = self.pos_embed.forward(latents)?;
        let mut first_cond = None;
        for block in &self.blocks {
            let cond = block.emb.forward(&t, &labels, dtype)?;
            x = block.forward(&x, &cond)?;
            first_cond.get_or_insert(cond);
        }
        let cond = match first_cond {
            Some(c) => c,
            None => candle_core::bail!("DiT with no transformer blocks"),
        };
        let m = self.proj_out_1.forward(&cond.silu()?)?.chunk(2, 1)?;
        let x = modulate(&self.norm_out.forward(&x)?, &m[0], &m[1])?;
        let p = self.config.patch_size;
        unpatchify(&self.proj_out_2.forward(&x)?, (h / p, w / p), p)
    }
}
