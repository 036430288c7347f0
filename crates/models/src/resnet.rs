//! ResNet block and the down/up samplers of the diffusers UNets and VAE (`resnet.py`,
//! `downsampling.py`, `upsampling.py`).

use crate::ops::conv::Conv2d;
use crate::ops::linear::Linear;
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::activations::Activation;
use crate::normalization::GroupNorm;

fn conv2d(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Conv2d::new(cin, cout, k, cfg, vb)
}

/// How the time embedding conditions a ResNet block (`resnet_time_scale_shift`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// `h = norm2(h + proj(t))`
    Default,
    /// `h = norm2(h) * (1 + scale) + shift` with `(scale, shift) = proj(t)`.
    ScaleShift,
}

/// Nearest-neighbour resize of `(B, C, H, W)` to `(h, w)` with torch's index rule
/// (`src = min(floor(dst * (in / out)), in - 1)`, the ratio in f32).
pub fn interpolate_nearest(xs: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, in_h, in_w) = xs.dims4()?;
    if (h, w) == (in_h * 2, in_w * 2) {
        if xs.track_op() {
            // In training: each pixel copied to its 2×2 block, whose backward sums the
            // blocks (candle's backward of its upsampling kernel is a convolution with a
            // kernel of ones: slower, and with no bf16 on the CPU).
            return crate::ops::upsample::upsample_nearest_2x(xs);
        }
        // The common ×2 case has a dedicated kernel.
        return xs.upsample_nearest2d(h, w);
    }
    let indices = |input: usize, output: usize| -> Result<Tensor> {
        let scale = input as f32 / output as f32;
        let idx: Vec<u32> = (0..output)
            .map(|i| (((i as f32) * scale).floor() as usize).min(input - 1) as u32)
            .collect();
        Tensor::from_vec(idx, output, xs.device())
    };
    let mut out = xs.clone();
    if h != in_h {
        out = out.index_select(&indices(in_h, h)?, 2)?;
    }
    if w != in_w {
        out = out.index_select(&indices(in_w, w)?, 3)?;
    }
    Ok(out)
}

/// diffusers `Downsample2D`: a stride-2 3×3 conv, or 2×2 average pooling without conv.
#[derive(Clone, Debug)]
pub struct Downsample2D {
    conv: Option<Conv2d>,
    /// `padding == 0` means the asymmetric (right/bottom) padding of the original DDPM code.
    padding: usize,
}

impl Downsample2D {
    /// Weights under `vb` (`conv.*`) when `use_conv`.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        use_conv: bool,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let conv = if use_conv {
            Some(conv2d(
                vb.pp("conv"),
                channels,
                out_channels,
                3,
                2,
                padding,
            )?)
        } else {
            if channels != out_channels {
                candle_core::bail!(
                    "Downsample2D without conv cannot change {channels} to {out_channels} channels"
                )
            }
            None
        };
        Ok(Self { conv, padding })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.conv {
            Some(conv) if self.padding == 0 => {
                let xs = xs
                    .pad_with_zeros(D::Minus2, 0, 1)?
                    .pad_with_zeros(D::Minus1, 0, 1)?;
                conv.forward(&xs)
            }
            Some(conv) => conv.forward(xs),
            None => xs.avg_pool2d(2),
        }
    }
}

/// diffusers `Upsample2D`: nearest ×2 (or to an explicit size), then an optional 3×3 conv.
#[derive(Clone, Debug)]
pub struct Upsample2D {
    conv: Option<Conv2d>,
}

impl Upsample2D {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        use_conv: bool,
        out_channels: usize,
    ) -> Result<Self> {
        let conv = if use_conv {
            Some(conv2d(vb.pp("conv"), channels, out_channels, 3, 1, 1)?)
        } else {
            None
        };
        Ok(Self { conv })
    }

    /// `output_size` is the size of the skip connection the result is concatenated with; it
    /// makes inputs whose sides are not multiples of the total downsampling factor work.
    pub fn forward(&self, xs: &Tensor, output_size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (oh, ow) = output_size.unwrap_or((2 * h, 2 * w));
        let xs = interpolate_nearest(xs, oh, ow)?;
        match &self.conv {
            Some(conv) => conv.forward(&xs),
            None => Ok(xs),
        }
    }
}

/// Settings of one [`ResnetBlock2D`].
#[derive(Clone, Debug)]
pub struct ResnetBlock2DConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `None` for blocks without time conditioning (the VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub groups_out: Option<usize>,
    pub eps: f64,
    pub act: Activation,
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
    /// Resample inside the block (UNet2DModel `upsample_type`/`downsample_type` `"resnet"`).
    pub up: bool,
    pub down: bool,
}

impl ResnetBlock2DConfig {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        act: Activation,
    ) -> Self {
        Self {
            in_channels,
            out_channels,
            temb_channels,
            groups,
            groups_out: None,
            eps,
            act,
            time_embedding_norm: TimeEmbeddingNorm::Default,
            output_scale_factor: 1.0,
            up: false,
            down: false,
        }
    }
}

#[derive(Clone, Debug)]
enum Resample {
    Up(Upsample2D),
    Down(Downsample2D),
}

/// diffusers `ResnetBlock2D`.
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    resample: Option<Resample>,
    act: Activation,
    time_embedding_norm: TimeEmbeddingNorm,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: &ResnetBlock2DConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => {
                let n = match cfg.time_embedding_norm {
                    TimeEmbeddingNorm::Default => cout,
                    TimeEmbeddingNorm::ScaleShift => 2 * cout,
                };
                Some(crate::ops::linear::linear(t, n, vb.pp("time_emb_proj"))?)
            }
            None => None,
        };
        let conv_shortcut = if cin != cout {
            Some(conv2d(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
        } else {
            None
        };
        // Resampling without weights: nearest ×2 / average pooling.
        let resample = if cfg.up {
            Some(Resample::Up(Upsample2D { conv: None }))
        } else if cfg.down {
            Some(Resample::Down(Downsample2D {
                conv: None,
                padding: 1,
            }))
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1: conv2d(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(
                vb.pp("norm2"),
                cfg.groups_out.unwrap_or(cfg.groups),
                cout,
                cfg.eps,
            )?,
            conv2: conv2d(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut,
            resample,
            act: cfg.act,
            time_embedding_norm: cfg.time_embedding_norm,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // Once for both halves of a guided step's first block (one latent twice, one time
        // embedding); SDXL's halves differ in their time embeddings, which carry the text.
        crate::ops::once_for_equal_halves(xs, temb, |xs, temb| self.forward_samples(xs, temb))
    }

    fn forward_samples(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // `h` is reassigned rather than shadowed so that each intermediate is freed as soon as
        // the next one exists (a VAE decoder block at 512×512 holds 134 MB per tensor).
        let mut h = self.norm1.forward_act(xs, self.act)?;
        let mut skip = xs.clone();
        match &self.resample {
            Some(Resample::Up(up)) => {
                skip = up.forward(&skip, None)?;
                h = up.forward(&h, None)?;
            }
            Some(Resample::Down(down)) => {
                skip = down.forward(&skip)?;
                h = down.forward(&h)?;
            }
            None => {}
        }
        h = self.conv1.forward(&h)?;
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => Some(
                proj.forward(&self.act.forward(t)?)?
                    .unsqueeze(2)?
                    .unsqueeze(3)?,
            ),
            (Some(_), None) => candle_core::bail!("this ResNet block needs a time embedding"),
            (None, _) => None,
        };
        h = match (self.time_embedding_norm, temb) {
            (TimeEmbeddingNorm::Default, Some(t)) => {
                h = h.broadcast_add(&t)?;
                self.norm2.forward_act(&h, self.act)?
            }
            (TimeEmbeddingNorm::ScaleShift, Some(t)) => {
                let chunks = t.chunk(2, 1)?;
                let scale = (&chunks[0] + 1.0)?;
                h = self.norm2.forward(&h)?;
                h = h.broadcast_mul(&scale)?.broadcast_add(&chunks[1])?;
                self.act.forward(&h)?
            }
            (_, None) => self.norm2.forward_act(&h, self.act)?,
        };
        h = self.conv2.forward(&h)?;
        if let Some(c) = &self.conv_shortcut {
            skip = c.forward(&skip)?;
        }
        let out = (skip + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
