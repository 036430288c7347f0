//! diffusers `AutoencoderKL`: the Stable Diffusion VAE.

use std::path::Path;

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
}

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
        })
    }

    /// Loads `config.json` and the safetensors weights of a `vae/` folder (old checkpoints' `query`/`key`/`value`/`proj_attn` attention names are accepted).
    pub fn from_pretrained(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> diffuse_core::Result<Self> {
        Self::from_pretrained_variant(dir, None, dtype, device)
    }

    /// [`AutoencoderKL::from_pretrained`] with a weight variant (`fp16` picks
    /// `diffusion_pytorch_model.fp16.safetensors`).
    pub fn from_pretrained_variant(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> diffuse_core::Result<Self> {
        crate::config::from_pretrained(
            dir,
            variant,
            dtype,
            device,
            AutoencoderKLConfig::validate,
            |vb, cfg| Self::new(vb, cfg),
        )
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

    /// Images `(B, C, H, W)` in `[-1, 1]` → the latent posterior (unscaled latents).
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussian> {
        let h = self.encoder.forward(&xs.to_dtype(self.dtype)?)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&h)?,
            None => h,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Unscaled latents → images in about `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(self.dtype)?;
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(&z)?,
            None => z,
        };
        self.decoder.forward(&z)
    }
}
