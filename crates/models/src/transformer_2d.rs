//! diffusers `Transformer2DModel` for continuous (feature-map) inputs, as used inside the
//! cross-attention UNet blocks.

use crate::ops::conv::Conv2d;
use crate::ops::linear::Linear;
use crate::ops::transpose::batch_transpose;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::attention::BasicTransformerBlock;
use crate::normalization::GroupNorm;

/// Settings of one [`Transformer2DModel`].
#[derive(Clone, Debug)]
pub struct Transformer2DConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub cross_attention_dim: Option<usize>,
    pub norm_num_groups: usize,
    /// SD 2.x: `proj_in`/`proj_out` are linear layers over tokens instead of 1×1 convs.
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

/// `proj_in`/`proj_out`: a 1×1 conv on the feature map or a linear layer on the tokens.
#[derive(Clone, Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(vb: VarBuilder, cin: usize, cout: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Self::Linear(crate::ops::linear::linear(cin, cout, vb)?)
        } else {
            Self::Conv(Conv2d::new(cin, cout, 1, Default::default(), vb)?)
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Conv(c) => c.forward(xs),
            Self::Linear(l) => l.forward(xs),
        }
    }
}

/// GroupNorm → `proj_in` → transformer blocks → `proj_out`, plus the input as residual.
#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
    use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &Transformer2DConfig) -> Result<Self> {
        let inner = cfg.num_attention_heads * cfg.attention_head_dim;
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    cfg.num_attention_heads,
                    cfg.attention_head_dim,
                    cfg.cross_attention_dim,
                    cfg.only_cross_attention,
                    cfg.upcast_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let linear = cfg.use_linear_projection;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), cfg.norm_num_groups, cfg.in_channels, 1e-6)?,
            proj_in: Projection::new(vb.pp("proj_in"), cfg.in_channels, inner, linear)?,
            transformer_blocks,
            proj_out: Projection::new(vb.pp("proj_out"), inner, cfg.in_channels, linear)?,
            use_linear_projection: linear,
        })
    }

    pub fn forward(&self, xs: &Tensor, encoder_hidden_states: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        let to_tokens =
            |t: &Tensor| -> Result<Tensor> { batch_transpose(&t.reshape((b, t.dim(1)?, h * w))?) };
        let to_map =
            |t: &Tensor| -> Result<Tensor> { batch_transpose(t)?.reshape((b, t.dim(2)?, h, w)) };
        let normed = self.norm.forward(xs)?;
        let mut tokens = if self.use_linear_projection {
            self.proj_in.forward(&to_tokens(&normed)?)?
        } else {
            to_tokens(&self.proj_in.forward(&normed)?)?
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, encoder_hidden_states)?;
        }
        let out = if self.use_linear_projection {
            to_map(&self.proj_out.forward(&tokens)?)?
        } else {
            self.proj_out.forward(&to_map(&tokens)?)?
        };
        out + xs
    }
}
