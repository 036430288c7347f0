//! The encoder and decoder of `AutoencoderKL` (diffusers `autoencoders/vae.py`).

use crate::ops::conv::Conv2d;
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::activations::Activation;
use crate::normalization::GroupNorm;
use crate::resnet::TimeEmbeddingNorm;
use crate::unet_2d_blocks::{
    BlockConfig, DownBlock, DownBlockType, MidAttention, MidBlock, MidBlockConfig, ResnetSettings,
    UpBlock, UpBlockType,
};

/// What [`Encoder`] and [`Decoder`] share of the VAE config.
#[derive(Clone, Debug)]
pub struct VaeSettings {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub act: Activation,
    pub mid_block_add_attention: bool,
}

impl VaeSettings {
    /// The VAE's ResNets: no time embedding, eps 1e-6.
    fn resnet(&self) -> ResnetSettings {
        ResnetSettings {
            temb_channels: None,
            eps: 1e-6,
            act: self.act,
            groups: self.norm_num_groups,
            time_embedding_norm: TimeEmbeddingNorm::Default,
            output_scale_factor: 1.0,
        }
    }

    fn block(
        &self,
        num_layers: usize,
        in_channels: usize,
        out_channels: usize,
        add_sample: bool,
    ) -> BlockConfig {
        BlockConfig {
            num_layers,
            in_channels,
            out_channels,
            prev_output_channel: in_channels,
            add_sample,
            resnet: self.resnet(),
            downsample_padding: 0,
            resample_with_resnet: false,
            attention_head_dim: out_channels,
            cross: None,
        }
    }

    /// The bottleneck: ResNet, single-head self-attention, ResNet.
    fn mid_block(&self, vb: VarBuilder) -> Result<MidBlock> {
        let c = *self.block_out_channels.last().unwrap_or(&0);
        let attention = if self.mid_block_add_attention {
            MidAttention::Spatial {
                head_dim: c,
                groups: Some(self.norm_num_groups),
            }
        } else {
            MidAttention::None
        };
        let cfg = MidBlockConfig {
            in_channels: c,
            num_layers: 1,
            resnet: self.resnet(),
            attention,
        };
        MidBlock::new(vb, &cfg)
    }
}

fn conv3(vb: VarBuilder, cin: usize, cout: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Conv2d::new(cin, cout, 3, cfg, vb)
}

/// Image → the moments of the latent distribution (`2 * latent_channels` channels).
#[derive(Clone, Debug)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(
        vb: VarBuilder,
        s: &VaeSettings,
        in_channels: usize,
        latent_channels: usize,
    ) -> Result<Self> {
        let ch = &s.block_out_channels;
        let n = ch.len();
        let down_blocks = (0..n)
            .map(|i| {
                let cfg = s.block(
                    s.layers_per_block,
                    ch[i.saturating_sub(1)],
                    ch[i],
                    i + 1 < n,
                );
                DownBlock::new(
                    vb.pp("down_blocks").pp(i),
                    DownBlockType::DownEncoderBlock2D,
                    &cfg,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: conv3(vb.pp("conv_in"), in_channels, ch[0])?,
            down_blocks,
            mid_block: s.mid_block(vb.pp("mid_block"))?,
            conv_norm_out: GroupNorm::new(
                vb.pp("conv_norm_out"),
                s.norm_num_groups,
                ch[n - 1],
                1e-6,
            )?,
            conv_out: conv3(vb.pp("conv_out"), ch[n - 1], 2 * latent_channels)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs, None, None)?.0;
        }
        let xs = self.mid_block.forward(&xs, None, None)?;
        self.conv_out
            .forward(&self.conv_norm_out.forward_act(&xs, Activation::Silu)?)
    }
}

/// Latents → image.
#[derive(Clone, Debug)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(
        vb: VarBuilder,
        s: &VaeSettings,
        latent_channels: usize,
        out_channels: usize,
    ) -> Result<Self> {
        let ch = &s.block_out_channels;
        let n = ch.len();
        let up_blocks = (0..n)
            .map(|i| {
                let prev = ch[n - 1 - i.saturating_sub(1)];
                let cfg = s.block(s.layers_per_block + 1, prev, ch[n - 1 - i], i + 1 < n);
                UpBlock::new(
                    vb.pp("up_blocks").pp(i),
                    UpBlockType::UpDecoderBlock2D,
                    &cfg,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: conv3(vb.pp("conv_in"), latent_channels, ch[n - 1])?,
            mid_block: s.mid_block(vb.pp("mid_block"))?,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), s.norm_num_groups, ch[0], 1e-6)?,
            conv_out: conv3(vb.pp("conv_out"), ch[0], out_channels)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid_block.forward(&xs, None, None)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs, &[], None, None, None)?;
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward_act(&xs, Activation::Silu)?)
    }
}
