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

use crate::controlnet::PreparedControl;
use crate::denoise::{initial_noise, LoopExtras, VaeView};
use crate::image_processor::{
    default_size, interpolate_nearest, preprocess_image, preprocess_mask,
};
use crate::img2img::strength_timesteps;
use crate::stable_diffusion::{
    EncodedPrompt, GenerationParams, ImageOutput, StableDiffusionPipeline,
};
use crate::{check_sampling, StepCallback, Timings, Trace};
use diffuse_models::{AutoencoderKL, UNet2DConditionModel};
use diffuse_schedulers::Scheduler;

/// An inpainting request.
#[derive(Clone, Debug)]
pub struct InpaintRequest {
    pub params: GenerationParams,
    pub image: RgbImage,
    /// White (>= 128) = repaint, black = keep.
    pub mask: GrayImage,
    /// 1 starts from pure noise; lower keeps more of the image under the mask.
    pub strength: f64,
    /// Default: the image's size rounded down to a multiple of 8 (SDXL: the model's native size).
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
        check_sampling(p.steps, &p.checked_numbers())?;
        check_inpaint_unet(&self.unet, &self.vae)?;
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
        let models = InpaintModels {
            unet: &self.unet,
            vae: self.vae_view(),
            scheduler: self.scheduler.as_ref(),
        };
        let mut run = prepare_inpaint(&models, req, (height, width), &prompt, None)?;
        timings.image_encode = t1.elapsed();

        let t2 = Instant::now();
        let mut trace = p.record_trace.then(Trace::default);
        let latents = self.denoise(
            run.scheduler.as_mut(),
            &run.timesteps,
            run.latents,
            &prompt,
            p.guidance_scale,
            run.extras,
            &mut run.generator,
            callback,
            trace.as_mut(),
        )?;
        timings.denoise = t2.elapsed();
        self.finish(latents, timings, warnings, trace)
    }
}

/// Errors unless the UNet takes the latents alone or with a mask and masked-image latents.
pub(crate) fn check_inpaint_unet(unet: &UNet2DConditionModel, vae: &AutoencoderKL) -> Result<()> {
    let unet_channels = unet.config().in_channels;
    let latent_channels = vae.config().latent_channels;
    if unet_channels != latent_channels && unet_channels != 2 * latent_channels + 1 {
        return Err(Error::invalid(format!(
            "inpainting needs a UNet with {latent_channels} or {} input channels, this one has {unet_channels}",
            2 * latent_channels + 1
        )));
    }
    Ok(())
}

/// The models an inpainting run uses, whichever pipeline holds them.
pub(crate) struct InpaintModels<'a> {
    pub unet: &'a UNet2DConditionModel,
    pub vae: VaeView<'a>,
    /// The configured scheduler (the run works on a fresh copy).
    pub scheduler: &'a dyn Scheduler,
}

/// An inpainting run prepared up to the denoising loop.
pub(crate) struct InpaintRun {
    pub scheduler: Box<dyn Scheduler>,
    pub timesteps: Vec<f64>,
    pub latents: Tensor,
    /// The mask channels or the kept-region blend, and the ControlNets.
    pub extras: LoopExtras<'static>,
    pub generator: Generator,
}

/// Everything of diffusers' inpainting `__call__` between the prompt and the loop, for images of
/// `height` × `width`: the timesteps `strength` keeps (cut at `denoising_end`), the starting
/// latents, and the mask inputs of a 9-channel UNet or the blend of a 4-channel one.
pub(crate) fn prepare_inpaint(
    m: &InpaintModels<'_>,
    req: &InpaintRequest,
    (height, width): (usize, usize),
    prompt: &EncodedPrompt,
    denoising_end: Option<f64>,
) -> Result<InpaintRun> {
    let p = &req.params;
    let device = m.vae.device;
    let latent_channels = m.vae.vae.config().latent_channels;
    let nine = m.unet.config().in_channels == 2 * latent_channels + 1;
    let f = 1usize
        << m.vae
            .vae
            .config()
            .block_out_channels
            .len()
            .saturating_sub(1);
    let image = preprocess_image(&req.image, height, width, device)?;
    let mask = preprocess_mask(&req.mask, height, width, device)?;

    let mut scheduler = p.fresh_scheduler(m.scheduler)?;
    let mut timesteps = strength_timesteps(scheduler.as_mut(), p.steps, req.strength)?;
    if let Some(end) = denoising_end {
        let cutoff = crate::denoise::timestep_cutoff(scheduler.as_ref(), end);
        let keep = timesteps.iter().filter(|&&t| t >= cutoff).count();
        timesteps.truncate(keep);
    }
    let strength_max = req.strength == 1.0;
    let b = prompt.batch;
    let tile = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&vec![t; b], 0)?) };

    let mut generator = Generator::manual_seed(p.seed).with_shard(p.shard);
    let shape = (b, latent_channels, height / f, width / f);
    let image_latents = if !nine || (req.latents.is_none() && !strength_max) {
        Some(tile(&m.vae.encode(&image, &mut generator)?)?)
    } else {
        None
    };
    let noise = initial_noise(req.latents.as_ref(), shape, &mut generator, device)?;
    let latents = match (&image_latents, strength_max || req.latents.is_some()) {
        (Some(init), false) => scheduler.add_noise(init, &noise, &vec![timesteps[0]; b])?,
        _ => (&noise * scheduler.init_noise_sigma())?,
    };

    // The masked image is encoded even for a 4-channel UNet: diffusers does, and the draw
    // moves the generator.
    let masked_image = image.broadcast_mul(&mask.lt(0.5)?.to_dtype(DType::F32)?)?;
    let masked_latents = tile(&m.vae.encode(&masked_image, &mut generator)?)?;
    let mask_latent = tile(&interpolate_nearest(&mask, height / f, width / f)?)?;

    let control = PreparedControl::prepare(
        p.controlnet.as_ref(),
        m.unet,
        (height, width),
        prompt,
        device,
    )?;
    let extras = if nine {
        let extra = Tensor::cat(&[&mask_latent, &masked_latents], 1)?;
        let extra = if prompt.guided {
            Tensor::cat(&[&extra, &extra], 0)?
        } else {
            extra
        };
        LoopExtras {
            extra_channels: Some(extra),
            control,
            ..Default::default()
        }
    } else {
        let image_latents = image_latents
            .ok_or_else(|| Error::invalid("internal: image latents were not encoded"))?;
        let keep = (1.0 - &mask_latent)?;
        let ts = timesteps.clone();
        let noise = noise.clone();
        LoopExtras {
            post_step: Some(Box::new(move |i, latents, sched| {
                // The kept region follows the image, noised to where the loop is next.
                let proper = match ts.get(i + 1) {
                    Some(&next) => sched.add_noise(&image_latents, &noise, &vec![next; b])?,
                    None => image_latents.clone(),
                };
                Ok((keep.broadcast_mul(&proper)? + mask_latent.broadcast_mul(latents)?)?)
            })),
            control,
            ..Default::default()
        }
    };
    Ok(InpaintRun {
        scheduler,
        timesteps,
        latents,
        extras,
        generator,
    })
}
