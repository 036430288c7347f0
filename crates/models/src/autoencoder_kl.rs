//! diffusers `AutoencoderKL`: the Stable Diffusion VAE.

use crate::ops::conv::Conv2d;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use diffuse_core::Generator;
use serde::{Deserialize, Serialize};

use crate::activations::Activation;
use crate::config::{block_types, check_block_counts, to_candle, SampleSize};
use crate::unet_2d_blocks::{DownBlockType, UpBlockType};
use crate::vae::{Decoder, Encoder, VaeSettings};

const CONTEXT: &str = "AutoencoderKL config";

/// `config.json` of an `AutoencoderKL`; absent fields take the diffusers defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: Option<SampleSize>,
    /// Latents are `scaling_factor * (z - shift_factor)` in the pipelines.
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    /// Whether the VAE should run in f32 when the rest runs in f16 (a pipeline decision).
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: Some(SampleSize::Square(32)),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Checks every setting this implementation depends on; the error names the field and the
    /// unsupported value.
    pub fn validate(&self) -> diffuse_core::Result<()> {
        self.settings().map(|_| ())
    }

    fn settings(&self) -> diffuse_core::Result<VaeSettings> {
        check_block_counts(
            CONTEXT,
            &self.block_out_channels,
            &self.down_block_types,
            &self.up_block_types,
        )?;
        let encoder_block = DownBlockType::DownEncoderBlock2D;
        block_types(
            CONTEXT,
            "down_block_types",
            &self.down_block_types,
            &[encoder_block],
            DownBlockType::name,
        )?;
        let decoder_block = UpBlockType::UpDecoderBlock2D;
        block_types(
            CONTEXT,
            "up_block_types",
            &self.up_block_types,
            &[decoder_block],
            UpBlockType::name,
        )?;
        Ok(VaeSettings {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            norm_num_groups: self.norm_num_groups,
            act: Activation::parse(&self.act_fn, CONTEXT, "act_fn")?,
            mid_block_add_attention: self.mid_block_add_attention,
        })
    }
}

/// The diagonal Gaussian posterior `q(z | x)` returned by [`AutoencoderKL::encode`].
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to `[-30, 20]`, as diffusers does.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// Splits `moments` `(B, 2C, H, W)` into mean and log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let parts = moments.chunk(2, 1)?;
        let logvar = parts[1].clamp(-30f32, 20f32)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(Self {
            mean: parts[0].clone(),
            logvar,
            std,
        })
    }

    /// `mean + std * noise`, `noise` shaped like the mean.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.std * noise.to_dtype(self.mean.dtype())?)?
    }

    /// A sample with noise drawn as diffusers draws it: one `randn` of the mean's shape.
    pub fn sample_with(&self, generator: &mut Generator) -> Result<Tensor> {
        let noise = generator.randn(self.mean.shape().clone(), self.mean.device())?;
        self.sample(&noise)
    }

    /// The distribution's mode (its mean).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// KL divergence to the standard normal, per batch element: `(B,)`.
    pub fn kl(&self) -> Result<Tensor> {
        let var = self.logvar.exp()?;
        let terms = ((self.mean.sqr()? + var)? - 1.0)?.sub(&self.logvar)?;
        (terms.flatten_from(1)?.sum(1)? * 0.5)?.to_dtype(DType::F32)
    }
}

/// Tiled encoding and decoding (diffusers' `enable_tiling`): inputs larger than a tile are cut
/// into overlapping tiles, each coded on its own, and the overlaps blended linearly, so memory
/// stays that of one tile whatever the image size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VaeTiling {
    /// Tile side in pixels (diffusers: the config's `sample_size`).
    pub tile_sample_min_size: usize,
    /// Tile side in latents (`tile_sample_min_size / 2^(blocks - 1)`).
    pub tile_latent_min_size: usize,
    /// Share of a tile that overlaps its neighbour (0.25).
    pub tile_overlap_factor: f64,
}

/// diffusers `AutoencoderKL`.
#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dtype: DType,
    device: Device,
    config: AutoencoderKLConfig,
    tiling: Option<VaeTiling>,
    slicing: bool,
}

crate::model_mixin!(AutoencoderKL, AutoencoderKLConfig);

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let s = cfg.settings().map_err(to_candle)?;
        let l = cfg.latent_channels;
        let conv1 = |name: &str, c: usize| Conv2d::new(c, c, 1, Default::default(), vb.pp(name));
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), &s, cfg.in_channels, l)?,
            decoder: Decoder::new(vb.pp("decoder"), &s, l, cfg.out_channels)?,
            quant_conv: cfg
                .use_quant_conv
                .then(|| conv1("quant_conv", 2 * l))
                .transpose()?,
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv1("post_quant_conv", l))
                .transpose()?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config: cfg.clone(),
            tiling: None,
            slicing: false,
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// The dtype of the weights; inputs are converted to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// diffusers' tile settings for this config: tiles of `sample_size` pixels (its height
    /// for a rectangular one), overlapping by a quarter.
    pub fn default_tiling(&self) -> VaeTiling {
        let size = self.config.sample_size.map_or(512, |s| s.hw().0);
        let f = 1usize << self.config.block_out_channels.len().saturating_sub(1);
        VaeTiling {
            tile_sample_min_size: size,
            tile_latent_min_size: size / f,
            tile_overlap_factor: 0.25,
        }
    }

    /// Tiled encoding/decoding with [`Self::default_tiling`] (`enable_tiling`).
    pub fn enable_tiling(&mut self) {
        self.tiling = Some(self.default_tiling());
    }

    /// Sets the tiling (None: code every image in one piece).
    pub fn set_tiling(&mut self, tiling: Option<VaeTiling>) {
        self.tiling = tiling;
    }

    pub fn tiling(&self) -> Option<VaeTiling> {
        self.tiling
    }

    /// Code a batch one image at a time (`enable_slicing`): the activations of one image at
    /// a time, whatever the batch.
    pub fn set_slicing(&mut self, slicing: bool) {
        self.slicing = slicing;
    }

    pub fn slicing(&self) -> bool {
        self.slicing
    }

    /// Images `(B, C, H, W)` in `[-1, 1]` → the latent posterior (unscaled latents).
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussian> {
        let xs = xs.to_dtype(self.dtype)?;
        let moments = self.per_slice(&xs, |x| self.encode_moments(x))?;
        DiagonalGaussian::from_moments(&moments)
    }

    /// Unscaled latents → images in about `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(self.dtype)?;
        self.per_slice(&z, |z| self.decode_whole_or_tiled(z))
    }

    /// `f` over the batch, one image at a time when slicing.
    fn per_slice(&self, xs: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let b = xs.dim(0)?;
        if !self.slicing || b <= 1 {
            return f(xs);
        }
        let parts = (0..b)
            .map(|i| f(&xs.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// Encoder + `quant_conv` of one piece.
    fn encode_piece(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.encoder.forward(xs)?;
        match &self.quant_conv {
            Some(c) => c.forward(&h),
            None => Ok(h),
        }
    }

    /// `post_quant_conv` + decoder of one piece.
    fn decode_piece(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    fn encode_moments(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        match self.tiling {
            Some(t) if h > t.tile_sample_min_size || w > t.tile_sample_min_size => tiled(
                xs,
                (t.tile_sample_min_size, t.tile_latent_min_size),
                t.tile_overlap_factor,
                |x| self.encode_piece(x),
            ),
            _ => self.encode_piece(xs),
        }
    }

    fn decode_whole_or_tiled(&self, z: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        match self.tiling {
            Some(t) if h > t.tile_latent_min_size || w > t.tile_latent_min_size => tiled(
                z,
                (t.tile_latent_min_size, t.tile_sample_min_size),
                t.tile_overlap_factor,
                |z| self.decode_piece(z),
            ),
            _ => self.decode_piece(z),
        }
    }
}

/// diffusers' `tiled_encode`/`tiled_decode`: tiles of `tile_in` input pixels every
/// `int(tile_in * (1 - overlap))`, each coded by `code` into `tile_out`-sized outputs (smaller at
/// the far edges); every tile's first `int(tile_out * overlap)` rows and columns are blended
/// linearly with the tile above and the tile to its left (those already blended, as diffusers
/// blends in place), and the top-left `tile_out - blend` of each tile is kept.
fn tiled(
    xs: &Tensor,
    (tile_in, tile_out): (usize, usize),
    overlap: f64,
    code: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    let stride = ((tile_in as f64 * (1.0 - overlap)) as usize).max(1);
    let blend = (tile_out as f64 * overlap) as usize;
    let limit = tile_out - blend;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(stride) {
        let mut row = Vec::new();
        for j in (0..w).step_by(stride) {
            let tile = xs
                .narrow(2, i, tile_in.min(h - i))?
                .narrow(3, j, tile_in.min(w - j))?;
            row.push(code(&tile)?);
        }
        rows.push(row);
    }
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut tile = rows[i][j].clone();
            if i > 0 {
                tile = blend_edge(&rows[i - 1][j], &tile, blend, 2)?;
            }
            if j > 0 {
                tile = blend_edge(&rows[i][j - 1], &tile, blend, 3)?;
            }
            rows[i][j] = tile;
        }
    }
    let kept = rows
        .iter()
        .map(|row| {
            let parts = row
                .iter()
                .map(|t| {
                    let (th, tw) = (t.dim(2)?, t.dim(3)?);
                    t.narrow(2, 0, limit.min(th))?.narrow(3, 0, limit.min(tw))
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 3)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&kept, 2)
}

/// `b` with its first `extent` rows (`dim` 2) or columns (`dim` 3) replaced by
/// `a[-extent + y] * (1 - y / extent) + b[y] * (y / extent)` (diffusers' `blend_v`/`blend_h`).
fn blend_edge(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let weights = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
        let v: Vec<f32> = (0..extent)
            .map(|y| f(y as f64 / extent as f64) as f32)
            .collect();
        let mut shape = vec![1usize; 4];
        shape[dim] = extent;
        Tensor::from_vec(v, shape, b.device())?.to_dtype(b.dtype())
    };
    let from_a = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let head = b.narrow(dim, 0, extent)?;
    let mixed = (from_a.broadcast_mul(&weights(&|r| 1.0 - r)?)?
        + head.broadcast_mul(&weights(&|r| r)?)?)?;
    let rest = b.narrow(dim, extent, b.dim(dim)? - extent)?;
    Tensor::cat(&[&mixed, &rest], dim)
}
