//! diffusers `UNet2DConditionModel`: the text-conditioned UNet of Stable Diffusion.

use crate::ops::conv::Conv2d;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use diffuse_core::Error;
use serde::{Deserialize, Serialize};

use crate::activations::Activation;
use crate::config::{block_types, check_block_counts, choose, to_candle, PerBlock, SampleSize};
use crate::embeddings::{
    ClassEmbedding, GaussianFourierProjection, TextTimeEmbedding, TimeConditioning, TimeProjection,
    TimestepEmbedding, Timesteps, UNetTimeEmbedding,
};
use crate::normalization::GroupNorm;
use crate::resnet::TimeEmbeddingNorm;
use crate::unet_2d_blocks::{
    up_block_channels, BlockConfig, CrossAttentionSettings, DownBlock, DownBlockType, MidAttention,
    MidBlock, MidBlockConfig, MidBlockType, ResnetSettings, UNetBlocks, UpBlock, UpBlockType,
};

const CONTEXT: &str = "UNet2DConditionModel config";

/// `config.json` of a `UNet2DConditionModel`; absent fields take the diffusers defaults.
/// Fields that only matter to block types or features this crate does not implement are
/// either rejected by [`UNet2DConditionConfig::validate`] when set, or (when diffusers itself
/// ignores them for the supported blocks) not read at all.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub sample_size: Option<SampleSize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn`, `UNetMidBlock2D` or null.
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    /// Accepted; dropout is not applied.
    pub dropout: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Must be null (asymmetric UNets are not supported).
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    /// Legacy naming: the NUMBER of attention heads per block (unless `num_attention_heads`
    /// is given).
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub dual_cross_attention: bool,
    /// SD 2.x: linear `proj_in`/`proj_out` in the transformers.
    pub use_linear_projection: bool,
    /// null (with `num_class_embeds`: a label table), `timestep`, `identity`, `projection`,
    /// `simple_projection`.
    pub class_embed_type: Option<String>,
    /// null, or `text_time` (SDXL: pooled text embedding + micro-conditioning `time_ids`).
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal projection of each `time_ids` number (`text_time`).
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    /// `positional` or `fourier`.
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    /// Width of the timestep condition (LCM's guidance embedding) added through `cond_proj`.
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub attention_type: String,
    pub class_embeddings_concat: bool,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: PerBlock::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::All(1280),
            transformer_layers_per_block: PerBlock::All(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
        }
    }
}

/// The parsed, checked form of the string-valued settings.
pub(crate) struct Resolved {
    down: Vec<DownBlockType>,
    up: Vec<UpBlockType>,
    mid: Option<MidBlockType>,
    act: Activation,
    time_embedding_act: Option<Activation>,
    timestep_post_act: Option<Activation>,
    time_norm: TimeEmbeddingNorm,
    fourier: bool,
    groups: usize,
}

impl UNet2DConditionConfig {
    /// The number of attention heads of each block (`num_attention_heads`, else the legacy
    /// `attention_head_dim`).
    pub fn heads(&self) -> &PerBlock<usize> {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
    }

    /// Checks every setting this implementation depends on; the error names the field and the
    /// unsupported value.
    pub fn validate(&self) -> diffuse_core::Result<()> {
        self.resolve().map(|_| ())
    }

    pub(crate) fn resolve(&self) -> diffuse_core::Result<Resolved> {
        use DownBlockType::*;
        use UpBlockType::*;
        let n = self.block_out_channels.len();
        check_block_counts(
            CONTEXT,
            &self.block_out_channels,
            &self.down_block_types,
            &self.up_block_types,
        )?;
        let fits = [
            ("only_cross_attention", self.only_cross_attention.fits(n)),
            ("layers_per_block", self.layers_per_block.fits(n)),
            ("cross_attention_dim", self.cross_attention_dim.fits(n)),
            (
                "transformer_layers_per_block",
                self.transformer_layers_per_block.fits(n),
            ),
            ("attention_head_dim", self.attention_head_dim.fits(n)),
            (
                "num_attention_heads",
                self.num_attention_heads.as_ref().is_none_or(|h| h.fits(n)),
            ),
        ];
        if let Some((field, _)) = fits.iter().find(|(_, ok)| !ok) {
            return Err(Error::config(
                CONTEXT,
                *field,
                format!("a per-block list must have {n} entries, one per block"),
            ));
        }
        if self.heads().values().contains(&0) {
            return Err(Error::config(
                CONTEXT,
                "attention_head_dim",
                "the number of heads must be positive",
            ));
        }
        let down = block_types(
            CONTEXT,
            "down_block_types",
            &self.down_block_types,
            &[DownBlock2D, AttnDownBlock2D, CrossAttnDownBlock2D],
            DownBlockType::name,
        )?;
        let up = block_types(
            CONTEXT,
            "up_block_types",
            &self.up_block_types,
            &[UpBlock2D, AttnUpBlock2D, CrossAttnUpBlock2D],
            UpBlockType::name,
        )?;
        let mid_types = MidBlockType::ALL
            .iter()
            .map(|t| (t.name(), *t))
            .collect::<Vec<_>>();
        let mid = self
            .mid_block_type
            .as_deref()
            .map(|name| choose(CONTEXT, "mid_block_type", "block type", name, &mid_types))
            .transpose()?;
        let fourier = choose(
            CONTEXT,
            "time_embedding_type",
            "value",
            &self.time_embedding_type,
            &[("positional", false), ("fourier", true)],
        )?;
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
        let groups = self.norm_num_groups.ok_or_else(|| {
            Error::config(
                CONTEXT,
                "norm_num_groups",
                "null (no output norm) is not supported",
            )
        })?;
        if let Some(kind) = self.class_embed_type.as_deref() {
            let kinds = ["timestep", "identity", "projection", "simple_projection"]
                .map(|k| (k, k.ends_with("projection")));
            let needs_dim = choose(CONTEXT, "class_embed_type", "value", kind, &kinds)?;
            if needs_dim && self.projection_class_embeddings_input_dim.is_none() {
                return Err(Error::config(
                    CONTEXT,
                    "projection_class_embeddings_input_dim",
                    format!("required by class_embed_type `{kind}`"),
                ));
            }
        }
        if self.dual_cross_attention {
            return Err(Error::config(
                CONTEXT,
                "dual_cross_attention",
                "is not supported: must be false",
            ));
        }
        choose(
            CONTEXT,
            "attention_type",
            "value",
            &self.attention_type,
            &[("default", ())],
        )?;
        if let Some(kind) = self.addition_embed_type.as_deref() {
            choose(
                CONTEXT,
                "addition_embed_type",
                "value",
                kind,
                &[("text_time", ())],
            )?;
            for (field, set) in [
                (
                    "addition_time_embed_dim",
                    self.addition_time_embed_dim.is_some(),
                ),
                (
                    "projection_class_embeddings_input_dim",
                    self.projection_class_embeddings_input_dim.is_some(),
                ),
            ] {
                if !set {
                    return Err(Error::config(
                        CONTEXT,
                        field,
                        format!("required by addition_embed_type `{kind}`"),
                    ));
                }
            }
        }
        let must_be_null = [
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type.is_some()),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block.is_some(),
            ),
        ];
        if let Some((field, _)) = must_be_null.iter().find(|(_, set)| *set) {
            return Err(Error::config(
                CONTEXT,
                *field,
                "is not supported: must be null",
            ));
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(Error::config(
                    CONTEXT,
                    field,
                    format!("must be odd, got {k}"),
                ));
            }
        }
        let optional_act = |field: &str, v: &Option<String>| {
            v.as_deref()
                .map(|a| Activation::parse(a, CONTEXT, field))
                .transpose()
        };
        Ok(Resolved {
            down,
            up,
            mid,
            act: Activation::parse(&self.act_fn, CONTEXT, "act_fn")?,
            time_embedding_act: optional_act("time_embedding_act_fn", &self.time_embedding_act_fn)?,
            timestep_post_act: optional_act("timestep_post_act", &self.timestep_post_act)?,
            time_norm,
            fourier,
            groups,
        })
    }
}

/// The residuals a ControlNet adds to a UNet: one per skip state of the down path
/// (`down_block_additional_residuals`) and one to the bottleneck's output
/// (`mid_block_additional_residual`).
#[derive(Clone, Debug)]
pub struct ControlResiduals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl ControlResiduals {
    /// The sum of two ControlNets' residuals (diffusers' `MultiControlNetModel`).
    pub fn add(&self, other: &ControlResiduals) -> Result<ControlResiduals> {
        if self.down.len() != other.down.len() {
            candle_core::bail!(
                "ControlNets give {} and {} down residuals: they do not fit the same UNet",
                self.down.len(),
                other.down.len()
            )
        }
        let down = self
            .down
            .iter()
            .zip(&other.down)
            .map(|(a, b)| a + b)
            .collect::<Result<Vec<_>>>()?;
        Ok(ControlResiduals {
            down,
            mid: (&self.mid + &other.mid)?,
        })
    }
}

/// The optional inputs of [`UNet2DConditionModel::forward_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct UNetConditioning<'a> {
    /// Class labels, LCM's timestep condition, SDXL's `text_embeds`/`time_ids`.
    pub time: TimeConditioning<'a>,
    /// ControlNet residuals.
    pub control: Option<&'a ControlResiduals>,
}

/// The time embedding, `conv_in` and the down path and bottleneck of a `UNet2DConditionModel`
/// config: what a ControlNet shares with the UNet it steers.
pub(crate) struct UNetEncoder {
    pub conv_in: Conv2d,
    pub time: UNetTimeEmbedding,
    pub down: Vec<DownBlock>,
    pub mid: Option<MidBlock>,
    /// Width of the embedding the blocks receive.
    pub temb_channels: usize,
}

/// Per-block settings of block `i`, with `j` the index of the lists diffusers reverses on the
/// way up (it does not reverse `attention_head_dim`, which only the `Attn*` blocks use).
fn block_config(
    cfg: &UNet2DConditionConfig,
    resnet: &ResnetSettings,
    (i, j): (usize, usize),
    num_layers: usize,
    (cin, prev, cout): (usize, usize, usize),
    add_sample: bool,
) -> BlockConfig {
    BlockConfig {
        num_layers,
        in_channels: cin,
        out_channels: cout,
        prev_output_channel: prev,
        add_sample,
        resnet: resnet.clone(),
        downsample_padding: cfg.downsample_padding,
        resample_with_resnet: false,
        attention_head_dim: cfg.attention_head_dim.get(i),
        cross: Some(cross_settings(cfg, j, cfg.only_cross_attention.get(j))),
    }
}

fn cross_settings(
    cfg: &UNet2DConditionConfig,
    i: usize,
    only_cross: bool,
) -> CrossAttentionSettings {
    CrossAttentionSettings {
        num_attention_heads: cfg.heads().get(i),
        cross_attention_dim: cfg.cross_attention_dim.get(i),
        transformer_layers: cfg.transformer_layers_per_block.get(i),
        use_linear_projection: cfg.use_linear_projection,
        only_cross_attention: only_cross,
        upcast_attention: cfg.upcast_attention,
    }
}

fn conv(vb: VarBuilder, cin: usize, cout: usize, k: usize) -> Result<Conv2d> {
    let c = Conv2dConfig {
        padding: (k - 1) / 2,
        ..Default::default()
    };
    Conv2d::new(cin, cout, k, c, vb)
}

fn resnet_settings(cfg: &UNet2DConditionConfig, r: &Resolved, temb: usize) -> ResnetSettings {
    ResnetSettings {
        temb_channels: Some(temb),
        eps: cfg.norm_eps,
        act: r.act,
        groups: r.groups,
        time_embedding_norm: r.time_norm,
        output_scale_factor: 1.0,
    }
}

impl UNetEncoder {
    pub(crate) fn new(vb: &VarBuilder, cfg: &UNet2DConditionConfig, r: &Resolved) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let (time_proj, time_input_dim, time_embed_dim) = if r.fourier {
            let dim = cfg.time_embedding_dim.unwrap_or(ch[0] * 2);
            let p = GaussianFourierProjection::new(
                vb.pp("time_proj"),
                dim / 2,
                false,
                cfg.flip_sin_to_cos,
            )?;
            (TimeProjection::Fourier(p), dim, dim)
        } else {
            let p = Timesteps {
                num_channels: ch[0],
                flip_sin_to_cos: cfg.flip_sin_to_cos,
                downscale_freq_shift: cfg.freq_shift,
            };
            (
                TimeProjection::Positional(p),
                ch[0],
                cfg.time_embedding_dim.unwrap_or(ch[0] * 4),
            )
        };
        let mut time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            time_input_dim,
            time_embed_dim,
            r.act,
            r.timestep_post_act,
        )?;
        if let Some(dim) = cfg.time_cond_proj_dim {
            time_embedding =
                time_embedding.with_condition(vb.pp("time_embedding"), dim, time_input_dim)?;
        }
        let add_embedding = match (
            cfg.addition_time_embed_dim,
            cfg.projection_class_embeddings_input_dim,
        ) {
            (Some(dim), Some(input)) if cfg.addition_embed_type.is_some() => {
                Some(TextTimeEmbedding {
                    add_time_proj: Timesteps {
                        num_channels: dim,
                        flip_sin_to_cos: cfg.flip_sin_to_cos,
                        downscale_freq_shift: cfg.freq_shift,
                    },
                    add_embedding: TimestepEmbedding::new(
                        vb.pp("add_embedding"),
                        input,
                        time_embed_dim,
                        Activation::Silu,
                        None,
                    )?,
                })
            }
            _ => None,
        };
        let time = UNetTimeEmbedding {
            time_proj,
            time_embedding,
            class_embedding: ClassEmbedding::from_config(
                vb.pp("class_embedding"),
                cfg.class_embed_type.as_deref(),
                cfg.num_class_embeds,
                time_input_dim,
                time_embed_dim,
                r.act,
                cfg.projection_class_embeddings_input_dim,
            )?,
            class_embeddings_concat: cfg.class_embeddings_concat,
            add_embedding,
            time_embed_act: r.time_embedding_act,
        };
        let has_class = time.class_embedding.is_some();
        let temb_channels = if cfg.class_embeddings_concat && has_class {
            2 * time_embed_dim
        } else {
            time_embed_dim
        };
        let resnet = resnet_settings(cfg, r, temb_channels);
        let down = r
            .down
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let bcfg = block_config(
                    cfg,
                    &resnet,
                    (i, i),
                    cfg.layers_per_block.get(i),
                    (ch[i.saturating_sub(1)], 0, ch[i]),
                    i + 1 < n,
                );
                DownBlock::new(vb.pp("down_blocks").pp(i), kind, &bcfg)
            })
            .collect::<Result<Vec<_>>>()?;
        let mid = match r.mid {
            None => None,
            Some(kind) => {
                let (num_layers, attention) = match kind {
                    // The attention-free variant: a single ResNet.
                    MidBlockType::UNetMidBlock2D => (0, MidAttention::None),
                    MidBlockType::UNetMidBlock2DCrossAttn => {
                        (1, MidAttention::Cross(cross_settings(cfg, n - 1, false)))
                    }
                };
                let mcfg = MidBlockConfig {
                    in_channels: ch[n - 1],
                    num_layers,
                    resnet: ResnetSettings {
                        output_scale_factor: cfg.mid_block_scale_factor,
                        ..resnet.clone()
                    },
                    attention,
                };
                Some(MidBlock::new(vb.pp("mid_block"), &mcfg)?)
            }
        };
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), cfg.in_channels, ch[0], cfg.conv_in_kernel)?,
            time,
            down,
            mid,
            temb_channels,
        })
    }
}

/// diffusers `UNet2DConditionModel`.
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time: UNetTimeEmbedding,
    blocks: UNetBlocks,
    conv_norm_out: GroupNorm,
    act: Activation,
    conv_out: Conv2d,
    dtype: DType,
    config: UNet2DConditionConfig,
}

crate::model_mixin!(UNet2DConditionModel, UNet2DConditionConfig);

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        let r = cfg.resolve().map_err(to_candle)?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let encoder = UNetEncoder::new(&vb, cfg, &r)?;
        let resnet = resnet_settings(cfg, &r, encoder.temb_channels);
        let up =
            r.up.iter()
                .enumerate()
                .map(|(i, &kind)| {
                    let j = n - 1 - i;
                    let bcfg = block_config(
                        cfg,
                        &resnet,
                        (i, j),
                        cfg.layers_per_block.get(j) + 1,
                        up_block_channels(ch, i),
                        i + 1 < n,
                    );
                    UpBlock::new(vb.pp("up_blocks").pp(i), kind, &bcfg)
                })
                .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: encoder.conv_in,
            time: encoder.time,
            blocks: UNetBlocks::new(encoder.down, encoder.mid, up),
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), r.groups, ch[0], cfg.norm_eps)?,
            act: r.act,
            conv_out: conv(
                vb.pp("conv_out"),
                ch[0],
                cfg.out_channels,
                cfg.conv_out_kernel,
            )?,
            dtype: vb.dtype(),
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// The dtype of the weights; inputs are converted to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.conv_in.weight().device()
    }

    /// `sample` `(B, C, H, W)` (any H, W), `timestep` scalar or `(B,)`, `encoder_hidden_states`
    /// `(B, L, cross_attention_dim)` → the predicted noise (or v), shaped like `sample`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with_class(sample, timestep, encoder_hidden_states, None)
    }

    /// [`UNet2DConditionModel::forward`] with class labels for class-conditional configs.
    pub fn forward_with_class(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        class_labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let cond = UNetConditioning {
            time: TimeConditioning {
                class_labels,
                ..Default::default()
            },
            control: None,
        };
        self.forward_with(sample, timestep, encoder_hidden_states, &cond)
    }

    /// [`UNet2DConditionModel::forward`] with every optional input: class labels, the LCM
    /// timestep condition, SDXL's added conditioning and ControlNet residuals.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        cond: &UNetConditioning<'_>,
    ) -> Result<Tensor> {
        let (b, _, _, _) = sample.dims4()?;
        let mut sample = sample.to_dtype(self.dtype)?;
        if self.config.center_input_sample {
            sample = ((sample * 2.0)? - 1.0)?;
        }
        let ehs = encoder_hidden_states.to_dtype(self.dtype)?;
        let emb = self
            .time
            .forward(timestep, b, &cond.time, self.dtype, sample.device())?;
        let xs = self.conv_in.forward(&sample)?;
        let (mut xs, mut skips) = self.blocks.encode(&xs, &emb, Some(&ehs))?;
        if let Some(control) = cond.control {
            if control.down.len() != skips.len() {
                candle_core::bail!(
                    "the ControlNet gives {} down-block residuals but this UNet has {} skip \
                     states: they are not the same architecture",
                    control.down.len(),
                    skips.len()
                )
            }
            for (skip, res) in skips.iter_mut().zip(&control.down) {
                *skip = (&*skip + res.to_dtype(self.dtype)?)?;
            }
            xs = (xs + control.mid.to_dtype(self.dtype)?)?;
        }
        let xs = self.blocks.decode(&xs, skips, &emb, Some(&ehs))?;
        let xs = self.conv_norm_out.forward_act(&xs, self.act)?;
        self.conv_out.forward(&xs)
    }
}
