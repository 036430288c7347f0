//! `StableDiffusionImg2ImgPipeline`: noise an encoded image part-way and denoise it from there.
//!
//! ```text
//! timesteps = set_timesteps(n)[t_start * order:]      # t_start = n - int(n * strength)
//! init      = scaling_factor * vae.encode(image).sample(generator)   # 1st draw
//! latents   = scheduler.add_noise(init, randn(generator), timesteps[0])  # 2nd draw
//! ... the text-to-image loop over the remaining timesteps, then decode
//! ```

use std::time::Instant;

use candle_core::Tensor;
use diffuse_core::{Error, Generator, Result};
use diffuse_schedulers::Scheduler;
use image::RgbImage;

use crate::image_processor::{default_size, preprocess_image};
use crate::stable_diffusion::{GenerationParams, ImageOutput, StableDiffusionPipeline};
use crate::{check_sampling, StepCallback, Timings, Trace};

/// An image-to-image request.
#[derive(Clone, Debug)]
pub struct Img2ImgRequest {
    pub params: GenerationParams,
    pub image: RgbImage,
    /// How much of the schedule to run, in (0, 1]: 1 ignores the image's content.
    pub strength: f64,
}

/// diffusers `get_timesteps`: the tail of the schedule that `strength` keeps, and where it
/// starts. Errors when nothing is left to run.
pub(crate) fn strength_timesteps(
    scheduler: &mut dyn Scheduler,
    steps: usize,
    strength: f64,
) -> Result<Vec<f64>> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::invalid(format!(
            "strength must be in [0, 1], got {strength}"
        )));
    }
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    let t_start = steps - init_timestep;
    let begin = t_start * scheduler.order();
    let all = scheduler.timesteps();
    if init_timestep < 1 || begin >= all.len() {
        return Err(Error::invalid(format!(
            "strength {strength} with {steps} steps leaves no denoising step; raise either"
        )));
    }
    let kept = all[begin..].to_vec();
    scheduler.set_begin_index(begin);
    Ok(kept)
}

impl StableDiffusionPipeline {
    /// Image-to-image.
    pub fn img2img(
        &self,
        req: &Img2ImgRequest,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        let p = &req.params;
        check_sampling(p.steps, &p.checked_numbers())?;
        let mut timings = Timings::default();
        let mut warnings = Vec::new();

        let t0 = Instant::now();
        let prompt = self.encode_prompt(p, &mut warnings)?;
        timings.text_encode = t0.elapsed();

        let t1 = Instant::now();
        let (height, width) = default_size(
            req.image.width(),
            req.image.height(),
            self.vae_scale_factor(),
        )?;
        let image = preprocess_image(&req.image, height, width, &self.device)?;

        let mut scheduler = p.fresh_scheduler(self.scheduler.as_ref())?;
        let timesteps = strength_timesteps(scheduler.as_mut(), p.steps, req.strength)?;

        let mut generator = Generator::manual_seed(p.seed).with_shard(p.shard);
        let init = self.encode_image(&image, &mut generator)?;
        // One image for the whole batch: tile it, as diffusers does.
        let init = Tensor::cat(&vec![&init; prompt.batch], 0)?;
        let noise = generator.randn_batch(init.shape().clone(), &self.device)?;
        let latents = scheduler.add_noise(&init, &noise, &vec![timesteps[0]; prompt.batch])?;
        timings.image_encode = t1.elapsed();

        let t2 = Instant::now();
        let mut trace = p.record_trace.then(Trace::default);
        let latents = self.denoise(
            scheduler.as_mut(),
            &timesteps,
            latents,
            &prompt,
            p.guidance_scale,
            self.control_extras(p, (height, width), &prompt)?,
            &mut generator,
            callback,
            trace.as_mut(),
        )?;
        timings.denoise = t2.elapsed();
        self.finish(latents, timings, warnings, trace)
    }
}
