//! The diffusers models in Rust: `UNet2DModel`, `UNet2DConditionModel`, `ControlNetModel` and
//! `AutoencoderKL`, with diffusers' config files and weight names.

pub mod activations;
pub mod attention;
pub mod autoencoder_kl;
pub mod clip_text;
pub mod clip_tokenizer;
pub mod config;
pub mod controlnet;
pub mod embeddings;
pub mod modeling_utils;
pub mod normalization;
pub mod ops;
pub mod profile;
pub mod resnet;
pub mod t5;
pub mod t5_tokenizer;
pub mod transformer_2d;
pub mod transformer_dit;
pub mod transformer_flux;
pub mod transformer_sd3;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod vae;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian, VaeTiling};
pub use controlnet::{ControlInput, ControlNetConfig, ControlNetModel};
pub use modeling_utils::ModelMixin;
pub use unet_2d::{UNet2DConfig, UNet2DModel};
pub use unet_2d_condition::{
    ControlResiduals, UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning,
};
