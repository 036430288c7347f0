//! `StableDiffusionInpaintPipeline`: repaint the white part of a mask.
//!
//! Two kinds of UNet:
//! * 9 input channels (inpainting checkpoints): the UNet sees
//!   `cat([scaled latents, mask at latent size, latents of the masked image])`;
//! * 4 input channels (any SD checkpoint, "legacy" inpainting): after every step the kept
//!   region is replaced by the image's latents noised to the next timestep:
//!   `latents = (1 - mask) * add_noise(image_latents, noise, t_next) + mask * latents`.
//!
//! Generator draws, in order: the image's posterior noise (4-channel UNet, or strength < 1),
//! the initial noise (unless latents are given), the masked image's posterior noise.

use std::time::Instant;

use candle_core::{DType, Tensor};
use diffuse_core::{Error, Generator, Result};
use image::{GrayImage, RgbImage};

use crate::image_processor::{
    default_size, interpolate_nearest, preprocess_image, preprocess_mask,
};
use crate::img2img::strength_timesteps;
use crate::stable_diffusion::{GenerationParams, ImageOutput, LoopExtras, StableDiffusionPipeline};
use crate::{check_steps, fresh_scheduler, StepCallback, Timings, Trace};

/// An inpainting request.
#[derive(Clone, Debug)]
pub struct InpaintRequest {
    pub params: GenerationParams,
    pub image: RgbImage,
    /// White (>= 128) = repaint, black = keep.
    pub mask: GrayImage,
    /// 1 starts from pure noise; lower keeps more of the image under the mask.
    pub strength: f64,
    /// Default: the image's size rounded down to a multiple of 8.
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// Initial noise (B, 4, h/8, w/8) instead of drawing it.
    pub latents: Option<Tensor>,
}

impl StableDiffusionPipeline {
    /// Inpainting, with a 9-channel inpainting UNet or any 4-channel one.
    pub fn inpaint(
        &self,
        req: &InpaintRequest,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        let p = &req.params;
        check_steps(p.steps)?;
        let unet_channels = self.unet.config().in_channels;
        let latent_channels = self.vae.config().latent_channels;
        let nine = unet_channels == 2 * latent_channels + 1;
        if !nine && unet_channels != latent_channels {
            return Err(Error::invalid(format!(
                "inpainting needs a UNet with {latent_channels} or {} input channels, this one has {unet_channels}",
                2 * latent_channels + 1
            )));
        }
        let mut timings = Timings::default();
        let mut warnings = Vec::new();

        let t0 = Instant::now();
        let prompt = self.encode_prompt(p, &mut warnings)?;
        timings.text_encode = t0.elapsed();

        let t1 = Instant::now();
        let f = self.vae_scale_factor();
        let (dh, dw) = default_size(req.image.width(), req.image.height(), f)?;
        let (height, width) = (req.height.unwrap_or(dh), req.width.unwrap_or(dw));
        self.check_size(height, width)?;
        let image = preprocess_image(&req.image, height, width, &self.device)?;
        let mask = preprocess_mask(&req.mask, height, width, &self.device)?;

        let mut scheduler = fresh_scheduler(self.scheduler.as_ref())?;
        scheduler.set_eta(p.eta);
        scheduler.set_timesteps(p.steps)?;
        let timesteps = strength_timesteps(scheduler.as_mut(), p.steps, req.strength)?;
        let strength_max = req.strength == 1.0;
        let b = prompt.batch;
        let tile = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&vec![t; b], 0)?) };

        let mut generator = Generator::manual_seed(p.seed).with_shard(p.shard);
        let shape = (b, latent_channels, height / f, width / f);
        let image_latents = if !nine || (req.latents.is_none() && !strength_max) {
            Some(tile(&self.encode_image(&image, &mut generator)?)?)
        } else {
            None
        };
        let noise = match &req.latents {
            Some(l) => {
                if l.dims() != [shape.0, shape.1, shape.2, shape.3] {
                    return Err(Error::invalid(format!(
                        "latents have shape {:?}, expected {shape:?}",
                        l.dims()
                    )));
                }
                l.to_device(&self.device)?.to_dtype(DType::F32)?
            }
            None => generator.randn_batch(shape, &self.device)?,
        };
        let latents = match (&image_latents, strength_max || req.latents.is_some()) {
            (Some(init), false) => scheduler.add_noise(init, &noise, &vec![timesteps[0]; b])?,
            _ => (&noise * scheduler.init_noise_sigma())?,
        };

        // The masked image is encoded even for a 4-channel UNet: diffusers does, and the draw
        // moves the generator.
        let masked_image = image.broadcast_mul(&mask.lt(0.5)?.to_dtype(DType::F32)?)?;
        let masked_latents = tile(&self.encode_image(&masked_image, &mut generator)?)?;
        let mask_latent = tile(&interpolate_nearest(&mask, height / f, width / f)?)?;
        timings.image_encode = t1.elapsed();

        let guided_rows = |t: &Tensor| -> Result<Tensor> {
            Ok(if prompt.guided {
                Tensor::cat(&[t, t], 0)?
            } else {
                t.clone()
            })
        };
        let extras = if nine {
            let extra = Tensor::cat(&[&mask_latent, &masked_latents], 1)?;
            LoopExtras {
                extra_channels: Some(guided_rows(&extra)?),
                post_step: None,
            }
        } else {
            let image_latents = image_latents
                .ok_or_else(|| Error::invalid("internal: image latents were not encoded"))?;
            let keep = (1.0 - &mask_latent)?;
            let ts = timesteps.clone();
            let noise = noise.clone();
            let mask_latent = mask_latent.clone();
            LoopExtras {
                extra_channels: None,
                post_step: Some(Box::new(move |i, latents, sched| {
                    // The kept region follows the image, noised to where the loop is next.
                    let proper = match ts.get(i + 1) {
                        Some(&next) => sched.add_noise(&image_latents, &noise, &vec![next; b])?,
                        None => image_latents.clone(),
                    };
                    Ok((keep.broadcast_mul(&proper)? + mask_latent.broadcast_mul(latents)?)?)
                })),
            }
        };

        let t2 = Instant::now();
        let mut trace = p.record_trace.then(Trace::default);
        let latents = self.denoise(
            scheduler.as_mut(),
            &timesteps,
            latents,
            &prompt,
            p.guidance_scale,
            extras,
            &mut generator,
            callback,
            trace.as_mut(),
        )?;
        timings.denoise = t2.elapsed();
        self.finish(latents, timings, warnings, trace)
    }
}
