//! What every model shares, after diffusers' `ModelMixin` (`modeling_utils.py`): loading a
//! model folder (`config.json` plus its safetensors weights) in one way for all of them.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

/// A model built from a `config.json` and its weights: the UNets, `AutoencoderKL`,
/// `ControlNetModel`, the CLIP and T5 text encoders, the DiT, SD3 and Flux transformers. Bring
/// it into scope (`use diffuse_models::ModelMixin`, or `diffuse::ModelMixin`) to call
/// `from_pretrained`.
pub trait ModelMixin: Sized {
    /// The model's `config.json`, as diffusers/transformers write it.
    type Config: serde::de::DeserializeOwned;

    /// The checks of a parsed config that serde cannot make; the error names the field.
    fn validate_config(config: &Self::Config) -> diffuse_core::Result<()>;

    /// Builds the model from its weights under their diffusers names (`Model::new`).
    fn build(vb: VarBuilder, config: &Self::Config) -> candle_core::Result<Self>;

    /// Loads a model folder (`unet/`, `vae/`, `text_encoder/`, a ControlNet...): its
    /// `config.json` and safetensors weights, converted to `dtype` on `device`.
    fn from_pretrained(dir: &Path, dtype: DType, device: &Device) -> diffuse_core::Result<Self> {
        Self::from_pretrained_variant(dir, None, dtype, device)
    }

    /// [`ModelMixin::from_pretrained`] with a weight variant: `Some("fp16")` picks
    /// `diffusion_pytorch_model.fp16.safetensors` (or `model.fp16.safetensors`). Through the
    /// checked loader: the error names the file and field of a bad config, or lists every
    /// missing, unexpected and mis-shaped tensor.
    fn from_pretrained_variant(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> diffuse_core::Result<Self> {
        let path = dir.join("config.json");
        let config: Self::Config = diffuse_loaders::read_config(&path)?;
        Self::validate_config(&config).map_err(|e| match e {
            diffuse_core::Error::Config { field, message, .. } => {
                diffuse_core::Error::config(path.display().to_string(), field, message)
            }
            other => other,
        })?;
        let files = diffuse_loaders::component_weight_files(dir, variant)?;
        diffuse_loaders::load_model(&files, dtype, device, |vb| Self::build(vb, &config))
    }
}

/// Implements [`ModelMixin`] for a model that `Model::new(vb, &config)` builds and whose config
/// checks itself with `config.validate()` (or with the given `|config| ...` check).
#[macro_export]
#[doc(hidden)]
macro_rules! model_mixin {
    ($model:ty, $config:ty) => {
        $crate::model_mixin!($model, $config, |config: &$config| config.validate());
    };
    ($model:ty, $config:ty, $validate:expr) => {
        impl $crate::ModelMixin for $model {
            type Config = $config;

            fn validate_config(config: &$config) -> diffuse_core::Result<()> {
                ($validate)(config)
            }

            fn build(vb: candle_nn::VarBuilder, config: &$config) -> candle_core::Result<Self> {
                <$model>::new(vb, config)
            }
        }
    };
}
