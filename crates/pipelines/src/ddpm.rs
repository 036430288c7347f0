//! `DDPMPipeline` / `DDIMPipeline`: unconditional image generation with a `UNet2DModel`.
//!
//! ```text
//! image = randn(B, C, H, W)
//! for t in timesteps:
//!     image = scheduler.step(unet(image, t), t, image)
//! image = clamp(image / 2 + 0.5, 0, 1)
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use diffuse_core::{Generator, Result};
use diffuse_models::UNet2DModel;
use diffuse_schedulers::Scheduler;
use image::RgbImage;

use crate::{check_steps, component_dir, fresh_scheduler, load_scheduler, LoadOptions};
use crate::{StepCallback, StepInfo};

/// An unconditional pipeline (a DDPM- or DDIM-sampled `UNet2DModel`).
pub struct UnconditionalPipeline {
    pub class_name: String,
    pub unet: UNet2DModel,
    pub scheduler: Box<dyn Scheduler>,
    pub device: Device,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct UnconditionalRequest {
    pub batch_size: usize,
    pub steps: usize,
    /// DDIM's eta (0 = deterministic, 1 = DDPM-like); ignored by other schedulers.
    pub eta: f64,
    pub seed: u64,
}

impl Default for UnconditionalRequest {
    fn default() -> Self {
        Self {
            batch_size: 1,
            steps: 50,
            eta: 0.0,
            seed: 0,
        }
    }
}

/// Generated images and the time the loop took.
pub struct UnconditionalOutput {
    /// (B, H, W, C) f32 in [0, 1].
    pub images: Tensor,
    /// 8-bit RGB images (for 3-channel models).
    pub rgb: Vec<RgbImage>,
    pub denoise: Duration,
}

impl UnconditionalPipeline {
    /// Loads `unet/` and `scheduler/`. `DDIMPipeline` turns any scheduler config into a DDIM
    /// scheduler, as its diffusers constructor does.
    pub fn load(dir: &Path, class_name: String, opts: &LoadOptions) -> Result<Self> {
        let unet_dir = component_dir(dir, "unet")?;
        let mut scheduler = load_scheduler(dir, opts)?;
        if class_name == "DDIMPipeline" && opts.scheduler.is_none() {
            scheduler = diffuse_schedulers::from_config("DDIMScheduler", scheduler.config())?;
        }
        let unet = UNet2DModel::from_pretrained_variant(
            &unet_dir,
            opts.variant.as_deref(),
            opts.dtype,
            &opts.device,
        )?;
        Ok(Self {
            class_name,
            unet,
            scheduler,
            device: opts.device.clone(),
        })
    }

    /// `(channels, height, width)` of the generated images.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        let cfg = self.unet.config();
        let (h, w) = cfg.sample_size.map(|s| s.hw()).unwrap_or((32, 32));
        (cfg.in_channels, h, w)
    }

    pub fn generate(
        &self,
        req: &UnconditionalRequest,
        mut callback: Option<&mut StepCallback<'_>>,
    ) -> Result<UnconditionalOutput> {
        check_steps(req.steps)?;
        if req.batch_size == 0 {
            return Err(diffuse_core::Error::invalid(
                "batch size must be at least 1",
            ));
        }
        let start = Instant::now();
        let mut scheduler = fresh_scheduler(self.scheduler.as_ref())?;
        scheduler.set_eta(req.eta);
        let mut generator = Generator::manual_seed(req.seed);
        let (c, h, w) = self.image_shape();
        let mut image = generator.randn((req.batch_size, c, h, w), &self.device)?;
        scheduler.set_timesteps(req.steps)?;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let t_tensor = Tensor::new(t as f32, &self.device)?;
            let out = self.unet.forward(&image, &t_tensor)?.to_dtype(DType::F32)?;
            image = scheduler.step(&out, t, &image, &mut generator)?.prev_sample;
            if let Some(cb) = callback.as_deref_mut() {
                cb(StepInfo {
                    step: i,
                    num_steps: timesteps.len(),
                    timestep: t,
                    latents: &image,
                })?;
            }
        }
        let denoise = start.elapsed();
        // Same post-processing as the VAE pipelines' decoded images.
        let images = ((image / 2.0)? + 0.5)?
            .clamp(0f32, 1f32)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        let rgb = if c == 3 {
            crate::image_processor::to_rgb_images(&images)?
        } else {
            Vec::new()
        };
        Ok(UnconditionalOutput {
            images,
            rgb,
            denoise,
        })
    }
}
