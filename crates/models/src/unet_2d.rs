//! diffusers `UNet2DModel`: the unconditional (optionally class-conditional) DDPM UNet.

use crate::ops::conv::Conv2d;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use diffuse_core::Error;
use serde::{Deserialize, Serialize};

use crate::activations::Activation;
use crate::config::{block_types, check_block_counts, choose, to_candle, SampleSize};
use crate::embeddings::{
    batch_timesteps, ClassEmbedding, GaussianFourierProjection, TimeConditioning, TimeProjection,
    TimestepEmbedding, Timesteps, UNetTimeEmbedding,
};
use crate::normalization::GroupNorm;
use crate::resnet::TimeEmbeddingNorm;
use crate::unet_2d_blocks::{
    up_block_channels, BlockConfig, DownBlock, DownBlockType, MidAttention, MidBlock,
    MidBlockConfig, ResnetSettings, UNetBlocks, UpBlock, UpBlockType,
};

const CONTEXT: &str = "UNet2DModel config";

/// `config.json` of a `UNet2DModel`; absent fields take the diffusers defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DConfig {
    pub sample_size: Option<SampleSize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    /// `positional` or `fourier`.
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub freq_shift: f64,
    pub flip_sin_to_cos: bool,
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2D`, or null for none.
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub mid_block_scale_factor: f64,
    pub downsample_padding: usize,
    /// `conv` or `resnet` (resampling of the `Attn*` blocks).
    pub downsample_type: String,
    pub upsample_type: String,
    /// Only used in training, which this crate does not do with dropout; accepted.
    pub dropout: f64,
    pub act_fn: String,
    /// Width of one attention head; null means one head over all channels.
    pub attention_head_dim: Option<usize>,
    pub norm_num_groups: usize,
    pub attn_norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    /// `default` or `scale_shift`.
    pub resnet_time_scale_shift: String,
    pub add_attention: bool,
    /// null (with `num_class_embeds`: a label table), `timestep` or `identity`.
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub num_train_timesteps: Option<usize>,
}

impl Default for UNet2DConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: s(&[
                "DownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2D".into()),
            up_block_types: s(&[
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "UpBlock2D",
            ]),
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            dropout: 0.0,
            act_fn: "silu".into(),
            attention_head_dim: Some(8),
            norm_num_groups: 32,
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".into(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }
}

/// The parsed, checked form of the string-valued settings.
struct Resolved {
    down: Vec<DownBlockType>,
    up: Vec<UpBlockType>,
    act: Activation,
    time_norm: TimeEmbeddingNorm,
    fourier: bool,
    resample_with_resnet: (bool, bool),
}

impl UNet2DConfig {
    /// Checks every setting this implementation depends on; the error names the field and the
    /// unsupported value.
    pub fn validate(&self) -> diffuse_core::Result<()> {
        self.resolve().map(|_| ())
    }

    fn resolve(&self) -> diffuse_core::Result<Resolved> {
        use DownBlockType::*;
        use UpBlockType::*;
        let ch = &self.block_out_channels;
        check_block_counts(CONTEXT, ch, &self.down_block_types, &self.up_block_types)?;
        let down = block_types(
            CONTEXT,
            "down_block_types",
            &self.down_block_types,
            &[DownBlock2D, AttnDownBlock2D],
            DownBlockType::name,
        )?;
        let up = block_types(
            CONTEXT,
            "up_block_types",
            &self.up_block_types,
            &[UpBlock2D, AttnUpBlock2D],
            UpBlockType::name,
        )?;
        if let Some(mid) = &self.mid_block_type {
            choose(
                CONTEXT,
                "mid_block_type",
                "block type",
                mid,
                &[("UNetMidBlock2D", ())],
            )?;
        }
        let value = |field: &str, v: &str, options: &[(&str, bool)]| {
            choose(CONTEXT, field, "value", v, options)
        };
        let fourier = value(
            "time_embedding_type",
            &self.time_embedding_type,
            &[("positional", false), ("fourier", true)],
        )?;
        let resample = [("conv", false), ("resnet", true)];
        let time_norm = choose(
            CONTEXT,
            "resnet_time_scale_shift",
            "value",
            &self.resnet_time_scale_shift,
            &[
                ("default", TimeEmbeddingNorm::Default),
                ("scale_shift", TimeEmbeddingNorm::ScaleShift),
            ],
        )?;
        if let Some(kind) = &self.class_embed_type {
            value(
                "class_embed_type",
                kind,
                &[("timestep", true), ("identity", true)],
            )?;
        }
        if self.attention_head_dim == Some(0) {
            return Err(Error::config(
                CONTEXT,
                "attention_head_dim",
                "must be positive",
            ));
        }
        Ok(Resolved {
            down,
            up,
            act: Activation::parse(&self.act_fn, CONTEXT, "act_fn")?,
            time_norm,
            fourier,
            resample_with_resnet: (
                value("downsample_type", &self.downsample_type, &resample)?,
                value("upsample_type", &self.upsample_type, &resample)?,
            ),
        })
    }
}

/// diffusers `UNet2DModel`.
#[derive(Clone, Debug)]
pub struct UNet2DModel {
    conv_in: Conv2d,
    time: UNetTimeEmbedding,
    blocks: UNetBlocks,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
    config: UNet2DConfig,
}

crate::model_mixin!(UNet2DModel, UNet2DConfig);

impl UNet2DModel {
    pub fn new(vb: VarBuilder, cfg: &UNet2DConfig) -> Result<Self> {
        let r = cfg.resolve().map_err(to_candle)?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let time_embed_dim = cfg.time_embedding_dim.unwrap_or(ch[0] * 4);
        let (time_proj, time_input_dim) = if r.fourier {
            let p = GaussianFourierProjection::new(vb.pp("time_proj"), ch[0], true, false)?;
            (TimeProjection::Fourier(p), 2 * ch[0])
        } else {
            let p = Timesteps {
                num_channels: ch[0],
                flip_sin_to_cos: cfg.flip_sin_to_cos,
                downscale_freq_shift: cfg.freq_shift,
            };
            (TimeProjection::Positional(p), ch[0])
        };
        let time = UNetTimeEmbedding {
            time_proj,
            time_embedding: TimestepEmbedding::new(
                vb.pp("time_embedding"),
                time_input_dim,
                time_embed_dim,
                Activation::Silu,
                None,
            )?,
            class_embedding: ClassEmbedding::from_config(
                vb.pp("class_embedding"),
                cfg.class_embed_type.as_deref(),
                cfg.num_class_embeds,
                time_input_dim,
                time_embed_dim,
                Activation::Silu,
                None,
            )?,
            class_embeddings_concat: false,
            add_embedding: None,
            time_embed_act: None,
        };

        let resnet = ResnetSettings {
            temb_channels: Some(time_embed_dim),
            eps: cfg.norm_eps,
            act: r.act,
            groups: cfg.norm_num_groups,
            time_embedding_norm: r.time_norm,
            output_scale_factor: 1.0,
        };
        let block = |num_layers,
                     (cin, prev, cout): (usize, usize, usize),
                     add_sample,
                     resample_with_resnet| BlockConfig {
            num_layers,
            in_channels: cin,
            out_channels: cout,
            prev_output_channel: prev,
            add_sample,
            resnet: resnet.clone(),
            downsample_padding: cfg.downsample_padding,
            resample_with_resnet,
            attention_head_dim: cfg.attention_head_dim.unwrap_or(cout),
            cross: None,
        };
        let down = r
            .down
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let cin = ch[i.saturating_sub(1)];
                let bcfg = block(
                    cfg.layers_per_block,
                    (cin, 0, ch[i]),
                    i + 1 < n,
                    r.resample_with_resnet.0,
                );
                DownBlock::new(vb.pp("down_blocks").pp(i), kind, &bcfg)
            })
            .collect::<Result<Vec<_>>>()?;
        let mid = match cfg.mid_block_type {
            None => None,
            Some(_) => {
                let c = ch[n - 1];
                let attention = if cfg.add_attention {
                    // Under scale_shift diffusers gives the mid attention no norm unless asked.
                    let default_groups =
                        (r.time_norm == TimeEmbeddingNorm::Default).then_some(cfg.norm_num_groups);
                    MidAttention::Spatial {
                        head_dim: cfg.attention_head_dim.unwrap_or(c),
                        groups: cfg.attn_norm_num_groups.or(default_groups),
                    }
                } else {
                    MidAttention::None
                };
                let mcfg = MidBlockConfig {
                    in_channels: c,
                    num_layers: 1,
                    resnet: ResnetSettings {
                        output_scale_factor: cfg.mid_block_scale_factor,
                        ..resnet.clone()
                    },
                    attention,
                };
                Some(MidBlock::new(vb.pp("mid_block"), &mcfg)?)
            }
        };
        let up =
            r.up.iter()
                .enumerate()
                .map(|(i, &kind)| {
                    let bcfg = block(
                        cfg.layers_per_block + 1,
                        up_block_channels(ch, i),
                        i + 1 < n,
                        r.resample_with_resnet.1,
                    );
                    UpBlock::new(vb.pp("up_blocks").pp(i), kind, &bcfg)
                })
                .collect::<Result<Vec<_>>>()?;
        let conv3 = |vb: VarBuilder, cin, cout| {
            let c = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            Conv2d::new(cin, cout, 3, c, vb)
        };
        Ok(Self {
            conv_in: conv3(vb.pp("conv_in"), cfg.in_channels, ch[0])?,
            time,
            blocks: UNetBlocks::new(down, mid, up),
            conv_norm_out: GroupNorm::new(
                vb.pp("conv_norm_out"),
                cfg.norm_num_groups,
                ch[0],
                cfg.norm_eps,
            )?,
            conv_out: conv3(vb.pp("conv_out"), ch[0], cfg.out_channels)?,
            dtype: vb.dtype(),
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UNet2DConfig {
        &self.config
    }

    /// The dtype of the weights; inputs are converted to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.conv_in.weight().device()
    }

    /// `sample` `(B, C, H, W)`, `timestep` scalar or `(B,)` (fractional values allowed) →
    /// the model output, shaped like `sample`.
    pub fn forward(&self, sample: &Tensor, timestep: &Tensor) -> Result<Tensor> {
        self.forward_with_class(sample, timestep, None)
    }

    /// [`UNet2DModel::forward`] for class-conditional models: `class_labels` `(B,)` integer ids
    /// (or `(B, dim)` embeddings for `class_embed_type: identity`).
    pub fn forward_with_class(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        class_labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, _, _, _) = sample.dims4()?;
        let mut sample = sample.to_dtype(self.dtype)?;
        if self.config.center_input_sample {
            sample = ((sample * 2.0)? - 1.0)?;
        }
        let cond = TimeConditioning {
            class_labels,
            ..Default::default()
        };
        let emb = self
            .time
            .forward(timestep, b, &cond, self.dtype, sample.device())?;
        let xs = self.conv_in.forward(&sample)?;
        let xs = self.blocks.forward(&xs, &emb, None)?;
        let xs = self.conv_norm_out.forward_act(&xs, Activation::Silu)?;
        let out = self.conv_out.forward(&xs)?;
        if let TimeProjection::Fourier(_) = self.time.time_proj {
            // Score-SDE models predict score / sigma.
            let t = batch_timesteps(timestep, b, sample.device())?.to_dtype(out.dtype())?;
            return out.broadcast_div(&t.reshape((b, 1, 1, 1))?);
        }
        Ok(out)
    }
}
