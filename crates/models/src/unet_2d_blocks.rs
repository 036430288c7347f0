//! The down, mid and up blocks of the diffusers UNets and VAE (`unet_2d_blocks.py`).
//!
//! diffusers has one class per block type; they differ only in whether a layer has an attention
//! after its ResNet (none, a spatial self-attention, or a cross-attention transformer) and in how
//! they resample. Here one [`DownBlock`], [`UpBlock`] and [`MidBlock`] cover the supported types
//! ([`DownBlockType`], [`UpBlockType`], [`MidBlockType`]) and keep diffusers' weight names.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::activations::Activation;
use crate::attention::{Attention, AttentionConfig};
use crate::resnet::{
    Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm, Upsample2D,
};
use crate::transformer_2d::{Transformer2DConfig, Transformer2DModel};

macro_rules! block_types {
    ($(#[$doc:meta])* $name:ident { $($variant:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($variant),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The diffusers class name.
            pub fn name(&self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),* }
            }
        }
    };
}

block_types!(
    /// The supported `down_block_types`.
    DownBlockType { DownBlock2D, AttnDownBlock2D, CrossAttnDownBlock2D, DownEncoderBlock2D }
);
block_types!(
    /// The supported `up_block_types`.
    UpBlockType { UpBlock2D, AttnUpBlock2D, CrossAttnUpBlock2D, UpDecoderBlock2D }
);
block_types!(
    /// The supported `mid_block_type`s.
    MidBlockType { UNetMidBlock2D, UNetMidBlock2DCrossAttn }
);

/// Settings shared by every ResNet of a block.
#[derive(Clone, Debug)]
pub struct ResnetSettings {
    pub temb_channels: Option<usize>,
    pub eps: f64,
    pub act: Activation,
    pub groups: usize,
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
}

impl ResnetSettings {
    fn block(&self, in_channels: usize, out_channels: usize) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            time_embedding_norm: self.time_embedding_norm,
            output_scale_factor: self.output_scale_factor,
            ..ResnetBlock2DConfig::new(
                in_channels,
                out_channels,
                self.temb_channels,
                self.groups,
                self.eps,
                self.act,
            )
        }
    }
}

/// Settings of the cross-attention transformers of `CrossAttn*` blocks.
#[derive(Clone, Debug)]
pub struct CrossAttentionSettings {
    pub num_attention_heads: usize,
    pub cross_attention_dim: usize,
    pub transformer_layers: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

impl CrossAttentionSettings {
    fn transformer(&self, channels: usize, groups: usize) -> Transformer2DConfig {
        Transformer2DConfig {
            num_attention_heads: self.num_attention_heads,
            attention_head_dim: channels / self.num_attention_heads.max(1),
            in_channels: channels,
            num_layers: self.transformer_layers,
            cross_attention_dim: Some(self.cross_attention_dim),
            norm_num_groups: groups,
            use_linear_projection: self.use_linear_projection,
            only_cross_attention: self.only_cross_attention,
            upcast_attention: self.upcast_attention,
        }
    }
}

/// The arguments of diffusers `get_down_block` / `get_up_block` that the supported types use.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    pub num_layers: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Up blocks: channels coming from the previous (deeper) block.
    pub prev_output_channel: usize,
    /// `add_downsample` / `add_upsample`.
    pub add_sample: bool,
    pub resnet: ResnetSettings,
    pub downsample_padding: usize,
    /// `downsample_type` / `upsample_type` `"resnet"` (Attn blocks of UNet2DModel): resample with
    /// a ResNet block instead of a conv.
    pub resample_with_resnet: bool,
    /// Per-head width of the spatial attention of `Attn*` blocks.
    pub attention_head_dim: usize,
    /// Required by `CrossAttn*` blocks.
    pub cross: Option<CrossAttentionSettings>,
}

/// What follows the ResNet in each layer of a block.
#[derive(Clone, Debug)]
enum LayerAttention {
    /// Self-attention over the feature map (`AttnDownBlock2D`, `UNetMidBlock2D`, VAE).
    Spatial(Attention),
    /// Cross-attention transformer (`CrossAttn*`, `UNetMidBlock2DCrossAttn`).
    Transformer(Transformer2DModel),
}

impl LayerAttention {
    fn spatial(
        vb: VarBuilder,
        channels: usize,
        head_dim: usize,
        groups: Option<usize>,
        r: &ResnetSettings,
    ) -> Result<Self> {
        let cfg =
            AttentionConfig::spatial(channels, head_dim, groups, r.eps, r.output_scale_factor);
        Ok(Self::Spatial(Attention::new(vb, &cfg)?))
    }

    fn transformer(
        vb: VarBuilder,
        channels: usize,
        groups: usize,
        cross: &CrossAttentionSettings,
    ) -> Result<Self> {
        Ok(Self::Transformer(Transformer2DModel::new(
            vb,
            &cross.transformer(channels, groups),
        )?))
    }

    fn forward(&self, xs: &Tensor, encoder_hidden_states: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Self::Spatial(a) => a.forward(xs, None),
            Self::Transformer(t) => {
                let Some(ehs) = encoder_hidden_states else {
                    candle_core::bail!("cross-attention blocks need encoder_hidden_states")
                };
                t.forward(xs, Some(ehs))
            }
        }
    }
}

fn cross_settings<'a>(cfg: &'a BlockConfig, block: &str) -> Result<&'a CrossAttentionSettings> {
    cfg.cross.as_ref().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{block} needs cross-attention settings (cross_attention_dim)"
        ))
    })
}

/// The attentions of a block, one per layer, named `attentions.{i}`; none for plain blocks.
fn block_attentions(
    vb: &VarBuilder,
    cfg: &BlockConfig,
    spatial: bool,
    cross: bool,
    block: &str,
) -> Result<Vec<LayerAttention>> {
    if !spatial && !cross {
        return Ok(Vec::new());
    }
    let c = cfg.out_channels;
    (0..cfg.num_layers)
        .map(|i| {
            let vb = vb.pp("attentions").pp(i);
            if cross {
                LayerAttention::transformer(vb, c, cfg.resnet.groups, cross_settings(cfg, block)?)
            } else {
                LayerAttention::spatial(
                    vb,
                    c,
                    cfg.attention_head_dim,
                    Some(cfg.resnet.groups),
                    &cfg.resnet,
                )
            }
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Downsampler {
    Conv(Downsample2D),
    Resnet(Box<ResnetBlock2D>),
}

/// One encoder stage: `num_layers` × (ResNet → optional attention), then an optional downsampler.
#[derive(Clone, Debug)]
pub struct DownBlock {
    kind: DownBlockType,
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<LayerAttention>,
    downsampler: Option<Downsampler>,
}

impl DownBlock {
    pub fn new(vb: VarBuilder, kind: DownBlockType, cfg: &BlockConfig) -> Result<Self> {
        use DownBlockType::*;
        let resnets = (0..cfg.num_layers)
            .map(|i| {
                let cin = if i == 0 {
                    cfg.in_channels
                } else {
                    cfg.out_channels
                };
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(i),
                    &cfg.resnet.block(cin, cfg.out_channels),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = block_attentions(
            &vb,
            cfg,
            kind == AttnDownBlock2D,
            kind == CrossAttnDownBlock2D,
            kind.name(),
        )?;
        let downsampler = if !cfg.add_sample {
            None
        } else if cfg.resample_with_resnet && kind == AttnDownBlock2D {
            let rcfg = ResnetBlock2DConfig {
                down: true,
                ..cfg.resnet.block(cfg.out_channels, cfg.out_channels)
            };
            Some(Downsampler::Resnet(Box::new(ResnetBlock2D::new(
                vb.pp("downsamplers.0"),
                &rcfg,
            )?)))
        } else {
            let c = cfg.out_channels;
            Some(Downsampler::Conv(Downsample2D::new(
                vb.pp("downsamplers.0"),
                c,
                true,
                c,
                cfg.downsample_padding,
            )?))
        };
        Ok(Self {
            kind,
            resnets,
            attentions,
            downsampler,
        })
    }

    pub fn kind(&self) -> DownBlockType {
        self.kind
    }

    /// Returns the output and the states kept for the skip connections (one per layer, plus
    /// the downsampled output).
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, encoder_hidden_states)?;
            }
            states.push(xs.clone());
        }
        match &self.downsampler {
            Some(Downsampler::Conv(d)) => xs = d.forward(&xs)?,
            Some(Downsampler::Resnet(r)) => xs = r.forward(&xs, temb)?,
            None => return Ok((xs, states)),
        }
        states.push(xs.clone());
        Ok((xs, states))
    }
}

#[derive(Clone, Debug)]
enum Upsampler {
    Conv(Upsample2D),
    Resnet(Box<ResnetBlock2D>),
}

/// One decoder stage: `num_layers` × (concat skip → ResNet → optional attention), then an
/// optional upsampler. `UpDecoderBlock2D` (VAE) has no skip connections.
#[derive(Clone, Debug)]
pub struct UpBlock {
    kind: UpBlockType,
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<LayerAttention>,
    upsampler: Option<Upsampler>,
}

impl UpBlock {
    pub fn new(vb: VarBuilder, kind: UpBlockType, cfg: &BlockConfig) -> Result<Self> {
        use UpBlockType::*;
        let skips = kind != UpDecoderBlock2D;
        let resnets = (0..cfg.num_layers)
            .map(|i| {
                let cin = if skips {
                    // The last layer takes the skip from the block's input stage.
                    let skip = if i + 1 == cfg.num_layers {
                        cfg.in_channels
                    } else {
                        cfg.out_channels
                    };
                    let prev = if i == 0 {
                        cfg.prev_output_channel
                    } else {
                        cfg.out_channels
                    };
                    prev + skip
                } else if i == 0 {
                    cfg.in_channels
                } else {
                    cfg.out_channels
                };
                ResnetBlock2D::new(
                    vb.pp("resnets").pp(i),
                    &cfg.resnet.block(cin, cfg.out_channels),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = block_attentions(
            &vb,
            cfg,
            kind == AttnUpBlock2D,
            kind == CrossAttnUpBlock2D,
            kind.name(),
        )?;
        let c = cfg.out_channels;
        let upsampler = if !cfg.add_sample {
            None
        } else if cfg.resample_with_resnet && kind == AttnUpBlock2D {
            let rcfg = ResnetBlock2DConfig {
                up: true,
                ..cfg.resnet.block(c, c)
            };
            Some(Upsampler::Resnet(Box::new(ResnetBlock2D::new(
                vb.pp("upsamplers.0"),
                &rcfg,
            )?)))
        } else {
            Some(Upsampler::Conv(Upsample2D::new(
                vb.pp("upsamplers.0"),
                c,
                true,
                c,
            )?))
        };
        Ok(Self {
            kind,
            resnets,
            attentions,
            upsampler,
        })
    }

    pub fn kind(&self) -> UpBlockType {
        self.kind
    }

    /// How many skip states this block consumes.
    pub fn num_skips(&self) -> usize {
        if self.kind == UpBlockType::UpDecoderBlock2D {
            0
        } else {
            self.resnets.len()
        }
    }

    /// `skips` are this block's skip states in the order the down path produced them (the
    /// last one is used first). `upsample_size` forces the upsampled size (that of the next
    /// skip), for inputs whose sides are not multiples of the downsampling factor.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        if skips.len() != self.num_skips() {
            candle_core::bail!(
                "{} expects {} skip states, got {}",
                self.kind.name(),
                self.num_skips(),
                skips.len()
            )
        }
        let mut xs = xs.clone();
        let mut skips = skips.iter().rev();
        for (i, resnet) in self.resnets.iter().enumerate() {
            if let Some(skip) = skips.next() {
                xs = Tensor::cat(&[&xs, skip], 1)?;
            }
            xs = resnet.forward(&xs, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, encoder_hidden_states)?;
            }
        }
        match &self.upsampler {
            Some(Upsampler::Conv(u)) => u.forward(&xs, upsample_size),
            Some(Upsampler::Resnet(r)) => r.forward(&xs, temb),
            None => Ok(xs),
        }
    }
}

/// The attention of the mid block's layers.
#[derive(Clone, Debug)]
pub enum MidAttention {
    /// `UNetMidBlock2D` with `add_attention: false`.
    None,
    /// `UNetMidBlock2D`: self-attention with per-head width `head_dim` and an optional input
    /// GroupNorm.
    Spatial {
        head_dim: usize,
        groups: Option<usize>,
    },
    /// `UNetMidBlock2DCrossAttn`.
    Cross(CrossAttentionSettings),
}

/// Settings of a [`MidBlock`].
#[derive(Clone, Debug)]
pub struct MidBlockConfig {
    pub in_channels: usize,
    /// Layers after the first ResNet (1 everywhere except UNet2DConditionModel's
    /// attention-free `UNetMidBlock2D`, which has 0).
    pub num_layers: usize,
    pub resnet: ResnetSettings,
    pub attention: MidAttention,
}

/// The bottleneck: a ResNet, then `num_layers` × (attention → ResNet).
#[derive(Clone, Debug)]
pub struct MidBlock {
    first: ResnetBlock2D,
    layers: Vec<(Option<LayerAttention>, ResnetBlock2D)>,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, cfg: &MidBlockConfig) -> Result<Self> {
        let c = cfg.in_channels;
        let resnet = |i: usize| ResnetBlock2D::new(vb.pp("resnets").pp(i), &cfg.resnet.block(c, c));
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let vba = vb.pp("attentions").pp(i);
                let attn =
                    match &cfg.attention {
                        MidAttention::None => None,
                        MidAttention::Spatial { head_dim, groups } => Some(
                            LayerAttention::spatial(vba, c, *head_dim, *groups, &cfg.resnet)?,
                        ),
                        MidAttention::Cross(cross) => Some(LayerAttention::transformer(
                            vba,
                            c,
                            cfg.resnet.groups,
                            cross,
                        )?),
                    };
                Ok((attn, resnet(i + 1)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            first: resnet(0)?,
            layers,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut xs = self.first.forward(xs, temb)?;
        for (attn, resnet) in &self.layers {
            if let Some(attn) = attn {
                xs = attn.forward(&xs, encoder_hidden_states)?;
            }
            xs = resnet.forward(&xs, temb)?;
        }
        Ok(xs)
    }
}

/// Channels of up block `i` of a UNet with `block_out_channels` `ch` (as diffusers computes
/// them): `(in_channels, prev_output_channel, out_channels)`.
pub fn up_block_channels(ch: &[usize], i: usize) -> (usize, usize, usize) {
    let n = ch.len();
    let rev = |j: usize| ch[n - 1 - j.min(n - 1)];
    (rev(i + 1), rev(i.saturating_sub(1)), rev(i))
}

/// The down path, bottleneck and up path of a UNet, wired with skip connections.
#[derive(Clone, Debug)]
pub struct UNetBlocks {
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
}

impl UNetBlocks {
    pub fn new(down: Vec<DownBlock>, mid: Option<MidBlock>, up: Vec<UpBlock>) -> Self {
        Self { down, mid, up }
    }

    /// `xs` is the output of `conv_in`; it is also the first skip state.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (xs, skips) = self.encode(xs, temb, encoder_hidden_states)?;
        self.decode(&xs, skips, temb, encoder_hidden_states)
    }

    /// The down path and the bottleneck: returns the bottleneck's output and the skip states
    /// (diffusers' `down_block_res_samples`: `xs` itself, then each down block's states).
    pub fn encode(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut skips = vec![xs.clone()];
        let mut xs = xs.clone();
        for block in &self.down {
            let (out, states) = block.forward(&xs, Some(temb), encoder_hidden_states)?;
            xs = out;
            skips.extend(states);
        }
        if let Some(mid) = &self.mid {
            xs = mid.forward(&xs, Some(temb), encoder_hidden_states)?;
        }
        Ok((xs, skips))
    }

    /// The up path over the bottleneck's output `xs` and the skip states of [`Self::encode`].
    pub fn decode(
        &self,
        xs: &Tensor,
        mut skips: Vec<Tensor>,
        temb: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for block in &self.up {
            let n = block.num_skips();
            if n > skips.len() {
                candle_core::bail!(
                    "{} needs {n} skip states, only {} left",
                    block.kind().name(),
                    skips.len()
                )
            }
            let res = skips.split_off(skips.len() - n);
            // Upsample to the size of the skip the next block concatenates: exact ×2 for
            // sides divisible by the total downsampling, the right odd size otherwise.
            let size = match skips.last() {
                Some(s) => Some((s.dim(2)?, s.dim(3)?)),
                None => None,
            };
            xs = block.forward(&xs, &res, Some(temb), encoder_hidden_states, size)?;
        }
        Ok(xs)
    }
}
