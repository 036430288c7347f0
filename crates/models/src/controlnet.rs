//! diffusers `ControlNetModel`: a trainable copy of a UNet's down path and bottleneck that
//! reads a control image (edges, depth, pose ...) and returns residuals for the UNet's skip
//! connections and bottleneck.
//!
//! ```text
//! emb     = time_embedding(t) (+ SDXL's text_time embedding)
//! h       = conv_in(sample) + controlnet_cond_embedding(control image)
//! h, skips = down_blocks(h, emb, text); h = mid_block(h, emb, text)
//! down    = [zero_conv_i(skip_i) * scale_i]     # controlnet_down_blocks
//! mid     = controlnet_mid_block(h) * scale
//! ```

use crate::ops::conv::Conv2d;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use diffuse_core::Error;
use serde::{Deserialize, Serialize};

use crate::activations::Activation;
use crate::config::{choose, to_candle, PerBlock};
use crate::embeddings::TimeConditioning;
use crate::unet_2d_blocks::{DownBlock, MidBlock};
use crate::unet_2d_condition::{ControlResiduals, UNet2DConditionConfig, UNetEncoder};

const CONTEXT: &str = "ControlNetModel config";

/// `config.json` of a `ControlNetModel`; absent fields take the diffusers defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlNetConfig {
    pub in_channels: usize,
    /// Channels of the control image.
    pub conditioning_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Must be null.
    pub encoder_hid_dim: Option<usize>,
    /// Must be null.
    pub encoder_hid_dim_type: Option<String>,
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub use_linear_projection: bool,
    /// Must be null (no published ControlNet is class-conditional).
    pub class_embed_type: Option<String>,
    /// null, or `text_time` (SDXL ControlNets).
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    /// Must be null.
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// `rgb` or `bgr` (the control image's channels are flipped).
    pub controlnet_conditioning_channel_order: String,
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Residuals are averaged over the feature map (shuffle ControlNets).
    pub global_pool_conditions: bool,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        let u = UNet2DConditionConfig::default();
        Self {
            in_channels: 4,
            conditioning_channels: 3,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: u.down_block_types,
            mid_block_type: u.mid_block_type,
            only_cross_attention: PerBlock::All(false),
            block_out_channels: u.block_out_channels,
            layers_per_block: 2,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            transformer_layers_per_block: PerBlock::All(1),
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            projection_class_embeddings_input_dim: None,
            controlnet_conditioning_channel_order: "rgb".into(),
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            global_pool_conditions: false,
        }
    }
}

impl ControlNetConfig {
    /// The `UNet2DConditionConfig` whose down path and bottleneck this ControlNet copies (the
    /// up path, which the ControlNet does not have, is plain `UpBlock2D`s).
    pub fn unet_config(&self) -> UNet2DConditionConfig {
        let n = self.block_out_channels.len();
        UNet2DConditionConfig {
            in_channels: self.in_channels,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            down_block_types: self.down_block_types.clone(),
            mid_block_type: self.mid_block_type.clone(),
            up_block_types: vec!["UpBlock2D".into(); n],
            only_cross_attention: self.only_cross_attention.clone(),
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: PerBlock::All(self.layers_per_block),
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            act_fn: self.act_fn.clone(),
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: PerBlock::All(self.cross_attention_dim),
            transformer_layers_per_block: self.transformer_layers_per_block.clone(),
            encoder_hid_dim: self.encoder_hid_dim,
            encoder_hid_dim_type: self.encoder_hid_dim_type.clone(),
            attention_head_dim: self.attention_head_dim.clone(),
            num_attention_heads: self.num_attention_heads.clone(),
            use_linear_projection: self.use_linear_projection,
            addition_embed_type: self.addition_embed_type.clone(),
            addition_time_embed_dim: self.addition_time_embed_dim,
            upcast_attention: self.upcast_attention,
            resnet_time_scale_shift: self.resnet_time_scale_shift.clone(),
            projection_class_embeddings_input_dim: self.projection_class_embeddings_input_dim,
            ..UNet2DConditionConfig::default()
        }
    }

    /// Checks every setting this implementation depends on; the error names the field.
    pub fn validate(&self) -> diffuse_core::Result<()> {
        self.unet_config().validate().map_err(|e| match e {
            // The UNet checks speak of the UNet; the fields have the same names here.
            Error::Config { field, message, .. } => Error::config(CONTEXT, field, message),
            other => other,
        })?;
        for (field, set) in [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
        ] {
            if set {
                return Err(Error::config(
                    CONTEXT,
                    field,
                    "is not supported: must be null",
                ));
            }
        }
        choose(
            CONTEXT,
            "controlnet_conditioning_channel_order",
            "value",
            &self.controlnet_conditioning_channel_order,
            &[("rgb", ()), ("bgr", ())],
        )?;
        if self.conditioning_embedding_out_channels.is_empty() {
            return Err(Error::config(
                CONTEXT,
                "conditioning_embedding_out_channels",
                "must not be empty",
            ));
        }
        Ok(())
    }
}

/// diffusers `ControlNetConditioningEmbedding`: the control image down to the latent size
/// (`conv_in`, pairs of 3×3 convs, the second of each with stride 2, all SiLU, then `conv_out`).
#[derive(Clone, Debug)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, out_channels: usize, cfg: &ControlNetConfig) -> Result<Self> {
        let ch = &cfg.conditioning_embedding_out_channels;
        let conv = |vb: VarBuilder, cin, cout, stride| {
            let c = Conv2dConfig {
                padding: 1,
                stride,
                ..Default::default()
            };
            Conv2d::new(cin, cout, 3, c, vb)
        };
        let mut blocks = Vec::new();
        for (i, pair) in ch.windows(2).enumerate() {
            blocks.push(conv(vb.pp("blocks").pp(2 * i), pair[0], pair[0], 1)?);
            blocks.push(conv(vb.pp("blocks").pp(2 * i + 1), pair[0], pair[1], 2)?);
        }
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), cfg.conditioning_channels, ch[0], 1)?,
            blocks,
            conv_out: conv(vb.pp("conv_out"), ch[ch.len() - 1], out_channels, 1)?,
        })
    }

    fn forward(&self, cond: &Tensor) -> Result<Tensor> {
        let mut xs = Activation::Silu.forward(&self.conv_in.forward(cond)?)?;
        for block in &self.blocks {
            xs = Activation::Silu.forward(&block.forward(&xs)?)?;
        }
        self.conv_out.forward(&xs)
    }
}

/// The control of one ControlNet call.
#[derive(Clone, Copy, Debug)]
pub struct ControlInput<'a> {
    /// `(B, 3, 8h, 8w)` control images in `[0, 1]` (`controlnet_cond`).
    pub image: &'a Tensor,
    /// `conditioning_scale`.
    pub scale: f64,
    /// Residuals scaled by `10^linspace(-1, 0, n + 1)` times `scale`, shallowest first,
    /// the bottleneck last: the ControlNet steers without the prompt's help.
    pub guess_mode: bool,
}

/// diffusers `ControlNetModel`.
#[derive(Clone, Debug)]
pub struct ControlNetModel {
    conv_in: Conv2d,
    time: crate::embeddings::UNetTimeEmbedding,
    cond_embedding: ConditioningEmbedding,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    controlnet_down_blocks: Vec<Conv2d>,
    controlnet_mid_block: Conv2d,
    dtype: DType,
    config: ControlNetConfig,
}

crate::model_mixin!(ControlNetModel, ControlNetConfig);

impl ControlNetModel {
    pub fn new(vb: VarBuilder, cfg: &ControlNetConfig) -> Result<Self> {
        cfg.validate().map_err(to_candle)?;
        let ucfg = cfg.unet_config();
        let r = ucfg.resolve().map_err(to_candle)?;
        let encoder = UNetEncoder::new(&vb, &ucfg, &r)?;
        let ch = &cfg.block_out_channels;
        let zero_conv = |i: usize, c: usize| {
            Conv2d::new(
                c,
                c,
                1,
                Default::default(),
                vb.pp("controlnet_down_blocks").pp(i),
            )
        };
        // One zero conv per skip state: conv_in's output, each layer of each block, and each
        // downsampler.
        let mut widths = vec![ch[0]];
        for (i, &c) in ch.iter().enumerate() {
            widths.extend(std::iter::repeat_n(c, cfg.layers_per_block));
            if i + 1 < ch.len() {
                widths.push(c);
            }
        }
        let controlnet_down_blocks = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| zero_conv(i, c))
            .collect::<Result<Vec<_>>>()?;
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in: encoder.conv_in,
            time: encoder.time,
            cond_embedding: ConditioningEmbedding::new(
                vb.pp("controlnet_cond_embedding"),
                ch[0],
                cfg,
            )?,
            down: encoder.down,
            mid: encoder.mid,
            controlnet_down_blocks,
            controlnet_mid_block: Conv2d::new(
                last,
                last,
                1,
                Default::default(),
                vb.pp("controlnet_mid_block"),
            )?,
            dtype: vb.dtype(),
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `sample` `(B, C, h, w)` latents, `time` SDXL's added conditioning (for `text_time`
    /// ControlNets) → the scaled residuals for the UNet.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        control: &ControlInput<'_>,
        time: &TimeConditioning<'_>,
    ) -> Result<ControlResiduals> {
        let (conditioning_scale, guess_mode) = (control.scale, control.guess_mode);
        let (b, _, _, _) = sample.dims4()?;
        let sample = sample.to_dtype(self.dtype)?;
        let ehs = encoder_hidden_states.to_dtype(self.dtype)?;
        let mut cond = control.image.to_dtype(self.dtype)?;
        if self.config.controlnet_conditioning_channel_order == "bgr" {
            let c = cond.dim(1)?;
            let rev: Vec<u32> = (0..c as u32).rev().collect();
            cond = cond.index_select(&Tensor::new(rev.as_slice(), cond.device())?, 1)?;
        }
        let emb = self
            .time
            .forward(timestep, b, time, self.dtype, sample.device())?;
        let embedded = self.cond_embedding.forward(&cond)?;
        let mut xs = self.conv_in.forward(&sample)?;
        if embedded.dims() != xs.dims() {
            candle_core::bail!(
                "the control image embeds to {:?} but the latents are {:?}: the control image \
                 must be 8 times the latent size",
                embedded.dims(),
                xs.dims()
            )
        }
        xs = (xs + embedded)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            let (out, states) = block.forward(&xs, Some(&emb), Some(&ehs))?;
            xs = out;
            skips.extend(states);
        }
        if let Some(mid) = &self.mid {
            xs = mid.forward(&xs, Some(&emb), Some(&ehs))?;
        }
        let down = skips
            .iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(s, c)| c.forward(s))
            .collect::<Result<Vec<_>>>()?;
        let mid = self.controlnet_mid_block.forward(&xs)?;
        let n = down.len();
        let scales: Vec<f64> = if guess_mode && !self.config.global_pool_conditions {
            // torch.logspace(-1, 0, n + 1) in f32, times the scale.
            (0..=n)
                .map(|i| {
                    let e = -1.0 + i as f32 / n as f32;
                    (10f32.powf(e) * conditioning_scale as f32) as f64
                })
                .collect()
        } else {
            vec![conditioning_scale; n + 1]
        };
        let pool = |t: Tensor| -> Result<Tensor> {
            if self.config.global_pool_conditions {
                t.mean_keepdim(3)?.mean_keepdim(2)
            } else {
                Ok(t)
            }
        };
        let down = down
            .into_iter()
            .zip(&scales)
            .map(|(t, &s)| pool((t * s)?))
            .collect::<Result<Vec<_>>>()?;
        let mid = pool((mid * scales[n])?)?;
        Ok(ControlResiduals { down, mid })
    }
}
