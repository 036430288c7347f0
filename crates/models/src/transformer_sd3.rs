//! diffusers `SD3Transformer2DModel`, the MMDiT of Stable Diffusion 3 (and 3.5: query/key
//! RMS norms, a second image-only attention in the first blocks).
//!
//! ```text
//! x = patch_embed(latents) + cropped_pos_embed       # (B, N, D) image tokens
//! c = context_embedder(prompt_embeds)                # (B, M, D) text tokens
//! temb = timestep_embedder(proj(t)) + text_embedder(pooled)
//! for block in transformer_blocks:                   # MMDiT: two streams, one attention
//!     x̂, gates = norm1(x, temb);  ĉ, c_gates = norm1_context(c, temb)
//!     a_x, a_c = joint_attention(x̂, ĉ)               # over [x; c]
//!     x = x + gate·a_x, x = x + gate2·ff(modulate(norm2(x)))      (same for c, but not after
//!                                                                  the last block)
//! out = unpatchify(proj_out(norm_out(x, temb)))
//! ```

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::attention::{FeedForward, FeedForwardActivation, JointAttention, JointAttentionConfig};
use crate::embeddings::{batch_timesteps, unpatchify, PatchEmbed, TimeTextEmbedding};
use crate::normalization::{gate, modulate, AdaLayerNormContinuous, AdaLayerNormZero, LayerNorm};
use crate::ops::linear::{linear, Linear};

const CONTEXT: &str = "SD3Transformer2DModel config";

/// `config.json` of an `SD3Transformer2DModel`; absent fields take the diffusers defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SD3Transformer2DConfig {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    /// Width of the text embeddings (T5's, the CLIP ones padded to it).
    pub joint_attention_dim: usize,
    /// Width of the projected text tokens; must equal heads × head dim.
    pub caption_projection_dim: usize,
    /// Width of the pooled CLIP embeddings.
    pub pooled_projection_dim: usize,
    pub out_channels: usize,
    /// Side of the stored position-embedding grid that inputs are cropped from.
    pub pos_embed_max_size: usize,
    /// Blocks with a second, image-only attention (SD 3.5).
    pub dual_attention_layers: Vec<usize>,
    /// null or `rms_norm` (SD 3.5).
    pub qk_norm: Option<String>,
}

impl Default for SD3Transformer2DConfig {
    fn default() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 18,
            attention_head_dim: 64,
            num_attention_heads: 18,
            joint_attention_dim: 4096,
            caption_projection_dim: 1152,
            pooled_projection_dim: 2048,
            out_channels: 16,
            pos_embed_max_size: 96,
            dual_attention_layers: vec![],
            qk_norm: None,
        }
    }
}

impl SD3Transformer2DConfig {
    /// Checks every setting the model depends on; the error names the field.
    pub fn validate(&self) -> diffuse_core::Result<()> {
        use diffuse_core::Error;
        for (field, v) in [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("pos_embed_max_size", self.pos_embed_max_size),
            ("num_layers", self.num_layers),
        ] {
            if v == 0 {
                return Err(Error::config(CONTEXT, field, "must be positive"));
            }
        }
        if self.caption_projection_dim != self.inner_dim() {
            return Err(Error::config(
                CONTEXT,
                "caption_projection_dim",
                format!(
                    "{} differs from num_attention_heads × attention_head_dim = {}",
                    self.caption_projection_dim,
                    self.inner_dim()
                ),
            ));
        }
        if let Some(&bad) = self
            .dual_attention_layers
            .iter()
            .find(|&&i| i >= self.num_layers)
        {
            return Err(Error::config(
                CONTEXT,
                "dual_attention_layers",
                format!("block {bad} does not exist ({} layers)", self.num_layers),
            ));
        }
        self.qk_norm_eps()?;
        Ok(())
    }

    fn qk_norm_eps(&self) -> diffuse_core::Result<Option<f64>> {
        match self.qk_norm.as_deref() {
            None => Ok(None),
            Some("rms_norm") => Ok(Some(1e-6)),
            Some(other) => Err(diffuse_core::Error::config(
                CONTEXT,
                "qk_norm",
                format!("unsupported `{other}` (supported: null, rms_norm)"),
            )),
        }
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

/// diffusers `JointTransformerBlock`.
#[derive(Clone, Debug)]
struct JointTransformerBlock {
    /// 6 chunks, or 9 with the second attention.
    norm1: AdaLayerNormZero,
    context_norm: ContextNorm,
    attn: JointAttention,
    /// SD 3.5's image-only attention.
    attn2: Option<JointAttention>,
    norm2: LayerNorm,
    ff: FeedForward,
    /// `norm2_context`, `ff_context` (absent in the last block).
    context_ff: Option<(LayerNorm, FeedForward)>,
}

/// `norm1_context`: adaLN-zero, or in the last block (whose text output is dropped) a
/// continuous adaptive norm.
#[derive(Clone, Debug)]
enum ContextNorm {
    Zero(AdaLayerNormZero),
    Last(AdaLayerNormContinuous),
}

impl JointTransformerBlock {
    fn new(vb: VarBuilder, cfg: &SD3Transformer2DConfig, index: usize) -> Result<Self> {
        let dim = cfg.inner_dim();
        let last = index + 1 == cfg.num_layers;
        let dual = cfg.dual_attention_layers.contains(&index);
        let qk_norm = cfg.qk_norm_eps().map_err(crate::config::to_candle)?;
        let attn_cfg = |added_kv| JointAttentionConfig {
            dim,
            heads: cfg.num_attention_heads,
            head_dim: cfg.attention_head_dim,
            qk_norm,
            added_kv,
            context_pre_only: last,
            pre_only: false,
            context_first: false,
        };
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
            norm1: AdaLayerNormZero::new(vb.pp("norm1"), dim, dim, if dual { 9 } else { 6 })?,
            context_norm: if last {
                ContextNorm::Last(AdaLayerNormContinuous::new(
                    vb.pp("norm1_context"),
                    dim,
                    dim,
                    1e-6,
                )?)
            } else {
                ContextNorm::Zero(AdaLayerNormZero::new(vb.pp("norm1_context"), dim, dim, 6)?)
            },
            attn: JointAttention::new(vb.pp("attn"), &attn_cfg(true))?,
            attn2: dual
                .then(|| JointAttention::new(vb.pp("attn2"), &attn_cfg(false)))
                .transpose()?,
            norm2: norm("norm2")?,
            ff: ff("ff")?,
            context_ff: (!last)
                .then(|| -> Result<_> { Ok((norm("norm2_context")?, ff("ff_context")?)) })
                .transpose()?,
        })
    }

    /// Returns the new `(context, x)`; the context is `None` after the last block.
    fn forward(&self, x: &Tensor, c: &Tensor, temb: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        let m = self.norm1.chunks(temb)?;
        let x_normed = self.norm1.norm(x)?;
        let x_hat = modulate(&x_normed, &m[0], &m[1])?;
        let (c_hat, cm) = match &self.context_norm {
            ContextNorm::Zero(n) => {
                let (c_hat, cm) = n.forward(c, temb)?;
                (c_hat, Some(cm))
            }
            ContextNorm::Last(n) => (n.forward(c, temb)?, None),
        };
        let (a_x, a_c) = self.attn.forward(&x_hat, Some(&c_hat), None)?;
        let mut x = (x + gate(&m[2], &a_x)?)?;
        if let Some(attn2) = &self.attn2 {
            let x_hat2 = modulate(&x_normed, &m[6], &m[7])?;
            let (a2, _) = attn2.forward(&x_hat2, None, None)?;
            x = (x + gate(&m[8], &a2)?)?;
        }
        let ff_in = modulate(&self.norm2.forward(&x)?, &m[3], &m[4])?;
        let x = (&x + gate(&m[5], &self.ff.forward(&ff_in)?)?)?;
        let c = match (&self.context_ff, cm, a_c) {
            (Some((norm2, ff)), Some(cm), Some(a_c)) => {
                let c = (c + gate(&cm[2], &a_c)?)?;
                let ff_in = modulate(&norm2.forward(&c)?, &cm[3], &cm[4])?;
                Some((&c + gate(&cm[5], &ff.forward(&ff_in)?)?)?)
            }
            _ => None,
        };
        Ok((c, x))
    }
}

/// diffusers `SD3Transformer2DModel`.
#[derive(Clone, Debug)]
pub struct SD3Transformer2DModel {
    pos_embed: PatchEmbed,
    time_text_embed: TimeTextEmbedding,
    context_embedder: Linear,
    blocks: Vec<JointTransformerBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
    config: SD3Transformer2DConfig,
}

crate::model_mixin!(SD3Transformer2DModel, SD3Transformer2DConfig);

impl SD3Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &SD3Transformer2DConfig) -> Result<Self> {
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
                Some(cfg.pos_embed_max_size),
            )?,
            time_text_embed: TimeTextEmbedding::new(
                vb.pp("time_text_embed"),
                dim,
                cfg.pooled_projection_dim,
                false,
            )?,
            context_embedder: linear(
                cfg.joint_attention_dim,
                cfg.caption_projection_dim,
                vb.pp("context_embedder"),
            )?,
            blocks: (0..cfg.num_layers)
                .map(|i| {
                    JointTransformerBlock::new(vb.pp(format!("transformer_blocks.{i}")), cfg, i)
                })
                .collect::<Result<_>>()?,
            norm_out: AdaLayerNormContinuous::new(vb.pp("norm_out"), dim, dim, 1e-6)?,
            proj_out: linear(dim, p * p * cfg.out_channels, vb.pp("proj_out"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &SD3Transformer2DConfig {
        &self.config
    }

    /// The velocity prediction `(B, out_channels, H, W)` for latents `(B, C, H, W)`, text
    /// embeddings `(B, M, joint_attention_dim)`, pooled embeddings `(B,
    /// pooled_projection_dim)` and a timestep in 0..1000 (scalar or `(B,)`). Computes in the
    /// latents' dtype.
    pub fn forward(
        &self,
        latents: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        timestep: &Tensor,
    ) -> Result<Tensor> {
        let (b, _, h, w) = latents.dims4()?;
        let dtype = latents.dtype();
        let p = self.config.patch_size;
        let t = batch_timesteps(timestep, b, latents.device())?;
        let mut x = self.pos_embed.forward(latents)?;
        let temb = self
            .time_text_embed
            .forward(&t, None, &pooled_projections.to_dtype(dtype)?)?;
        let mut c = self
            .context_embedder
            .forward(&encoder_hidden_states.to_dtype(dtype)?)?;
        for block in &self.blocks {
            let (next_c, next_x) = block.forward(&x, &c, &temb)?;
            x = next_x;
            if let Some(next_c) = next_c {
                c = next_c;
            }
        }
        let x = self.norm_out.forward(&x, &temb)?;
        unpatchify(&self.proj_out.forward(&x)?, (h / p, w / p), p)
    }
}
