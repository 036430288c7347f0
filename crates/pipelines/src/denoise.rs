//! What every latent-diffusion pipeline with a `UNet2DConditionModel` shares (Stable Diffusion
//! 1.x/2.x and SDXL, each with or without ControlNets): the guided denoising loop, the LCM
//! guidance embedding, and moving images in and out of the VAE's latent space.
//!
//! ```text
//! for i, t in timesteps:
//!     x   = scale_model_input(cat([latents] * 2) if guided else latents, t)
//!     res = sum(controlnet_k(x, t, embeds, control_image_k) * scale_k * keep_k(i))
//!     eps = unet(cat([x, extra_channels]), t, embeds, text_time, timestep_cond, res)
//!     eps = eps_uncond + g * (eps_cond - eps_uncond)          # when guided
//!     latents = post_step(scheduler.step(eps, t, latents))
//! ```

use candle_core::{DType, Device, IndexOp, Tensor};
use diffuse_core::{Error, Generator, Result};
use diffuse_models::embeddings::{guidance_scale_embedding, TimeConditioning};
use diffuse_models::{AutoencoderKL, UNet2DConditionModel, UNetConditioning};
use diffuse_schedulers::Scheduler;

use crate::controlnet::PreparedControl;
use crate::stable_diffusion::{EncodedPrompt, ImageOutput};
use crate::{StepCallback, StepInfo, Timings, Trace};

/// Extra inputs of the loop that differ between the tasks and models.
#[derive(Default)]
pub(crate) struct LoopExtras<'a> {
    /// Concatenated after the (scaled) latents on the channel axis (9-channel inpainting),
    /// already repeated for the guidance batch.
    pub extra_channels: Option<Tensor>,
    /// Applied to the latents after each step: `(step index, latents, scheduler)` (legacy
    /// inpainting's mask blend).
    #[allow(clippy::type_complexity)]
    pub post_step: Option<Box<dyn Fn(usize, &Tensor, &dyn Scheduler) -> Result<Tensor> + 'a>>,
    /// SDXL's added conditioning `(text_embeds, time_ids)`, rows as the UNet's batch.
    pub text_time: Option<(Tensor, Tensor)>,
    /// The ControlNets and their prepared control images.
    pub control: Option<PreparedControl>,
}

/// Whether a run does classifier-free guidance: a scale above 1 on a UNet without a
/// `time_cond_proj_dim` (LCM models take the scale as an embedding instead).
pub fn guidance_enabled(guidance_scale: f64, unet: &UNet2DConditionModel) -> bool {
    guidance_scale > 1.0 && unet.config().time_cond_proj_dim.is_none()
}

/// The training timestep where a fraction of the schedule ends: `round(N - fraction * N)`
/// (Python's round), for `denoising_start`/`denoising_end`.
pub(crate) fn timestep_cutoff(scheduler: &dyn Scheduler, fraction: f64) -> f64 {
    // diffusers reads the config's num_train_timesteps (1000 unless the config says otherwise).
    let n = scheduler
        .config()
        .map
        .get("num_train_timesteps")
        .and_then(|v| v.as_f64())
        .or_else(|| scheduler.alphas_cumprod().map(|a| a.len() as f64))
        .unwrap_or(1000.0);
    diffuse_schedulers::common::round_half_even(n - fraction * n)
}

/// The starting noise of a run: `given` latents (checked against `shape`) or a draw of
/// `shape` from `generator` (diffusers' `prepare_latents` before the `init_noise_sigma` scaling).
pub(crate) fn initial_noise(
    given: Option<&Tensor>,
    shape: (usize, usize, usize, usize),
    generator: &mut Generator,
    device: &Device,
) -> Result<Tensor> {
    match given {
        Some(l) => {
            if l.dims() != [shape.0, shape.1, shape.2, shape.3] {
                return Err(Error::invalid(format!(
                    "latents have shape {:?}, expected {shape:?}",
                    l.dims()
                )));
            }
            Ok(l.to_device(device)?.to_dtype(DType::F32)?)
        }
        None => Ok(generator.randn_batch(shape, device)?),
    }
}

/// The conditional half of a `[uncond; cond]` batch (the whole batch when not guided).
pub(crate) fn cond_half(t: &Tensor, guided: bool) -> Result<Tensor> {
    if !guided {
        return Ok(t.clone());
    }
    let b = t.dim(0)? / 2;
    Ok(t.i(b..)?)
}

/// The guided denoising loop of every Stable Diffusion task.
#[allow(clippy::too_many_arguments)]
pub(crate) fn denoise(
    unet: &UNet2DConditionModel,
    device: &Device,
    scheduler: &mut dyn Scheduler,
    timesteps: &[f64],
    mut latents: Tensor,
    prompt: &EncodedPrompt,
    guidance_scale: f64,
    extras: LoopExtras<'_>,
    generator: &mut Generator,
    mut callback: Option<&mut StepCallback<'_>>,
    mut trace: Option<&mut Trace>,
) -> Result<Tensor> {
    if let Some(tr) = trace.as_deref_mut() {
        tr.start_latents = Some(latents.clone());
    }
    let timestep_cond = match unet.config().time_cond_proj_dim {
        Some(dim) => Some(guidance_scale_embedding(
            guidance_scale - 1.0,
            prompt.batch,
            dim,
            device,
        )?),
        None => None,
    };
    let text_time = extras.text_time.as_ref().map(|(a, b)| (a, b));
    let num_steps = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let doubled = if prompt.guided {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents.clone()
        };
        let scaled = scheduler.scale_model_input(&doubled, t)?;
        let t_tensor = Tensor::new(t as f32, device)?;
        let control = match &extras.control {
            Some(c) => c.residuals(
                (i, num_steps),
                &scaled,
                &t_tensor,
                prompt,
                text_time,
                || scheduler.scale_model_input(&latents, t),
                trace.as_deref_mut(),
            )?,
            None => None,
        };
        let input = match &extras.extra_channels {
            Some(extra) => Tensor::cat(&[&scaled, extra], 1)?,
            None => scaled,
        };
        let cond = UNetConditioning {
            time: TimeConditioning {
                class_labels: None,
                timestep_cond: timestep_cond.as_ref(),
                text_time,
            },
            control: control.as_ref(),
        };
        let out = unet
            .forward_with(&input, &t_tensor, &prompt.embeds, &cond)?
            .to_dtype(DType::F32)?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.unet_inputs.push(input.clone());
            tr.unet_timesteps.push(t);
            tr.unet_outputs.push(out.clone());
        }
        let eps = if prompt.guided {
            let b = prompt.batch;
            let (u, c) = (out.i(..b)?, out.i(b..)?);
            (&u + ((c - &u)? * guidance_scale)?)?
        } else {
            out
        };
        latents = scheduler.step(&eps, t, &latents, generator)?.prev_sample;
        if let Some(post) = &extras.post_step {
            latents = post(i, &latents, scheduler)?;
        }
        if let Some(tr) = trace.as_deref_mut() {
            tr.step_latents.push(latents.clone());
        }
        if let Some(cb) = callback.as_deref_mut() {
            cb(StepInfo {
                step: i,
                num_steps,
                timestep: t,
                latents: &latents,
            })?;
        }
    }
    Ok(latents)
}

/// A VAE with the dtype it runs in, and how its latents are scaled.
#[derive(Clone, Copy)]
pub(crate) struct VaeView<'a> {
    pub vae: &'a AutoencoderKL,
    pub dtype: DType,
    pub device: &'a Device,
}

impl VaeView<'_> {
    /// `latents_mean`/`latents_std` of the config as `(1, C, 1, 1)` tensors, when both are set.
    fn latent_stats(&self) -> Result<Option<(Tensor, Tensor)>> {
        let cfg = self.vae.config();
        match (&cfg.latents_mean, &cfg.latents_std) {
            (Some(mean), Some(std)) => {
                let t = |v: &[f64]| -> Result<Tensor> {
                    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    let n = v.len();
                    if n != cfg.latent_channels {
                        return Err(Error::invalid(format!(
                            "VAE config: latents_mean/latents_std have {n} entries for {} latent channels",
                            cfg.latent_channels
                        )));
                    }
                    Ok(Tensor::from_vec(v, (1, n, 1, 1), self.device)?)
                };
                Ok(Some((t(mean)?, t(std)?)))
            }
            _ => Ok(None),
        }
    }

    /// `scaling_factor * sample(vae.encode(image))` (or `(z - mean) * scaling_factor / std` for
    /// VAEs with latent statistics), the posterior noise drawn from `generator` (diffusers'
    /// `retrieve_latents(..., generator)`).
    pub fn encode(&self, image: &Tensor, generator: &mut Generator) -> Result<Tensor> {
        let posterior = self.vae.encode(&image.to_dtype(self.dtype)?)?;
        let noise = generator.randn(posterior.mean.shape().clone(), self.device)?;
        let z = posterior.sample(&noise)?.to_dtype(DType::F32)?;
        let sf = self.vae.config().scaling_factor;
        Ok(match self.latent_stats()? {
            Some((mean, std)) => (z.broadcast_sub(&mean)? * sf)?.broadcast_div(&std)?,
            None => (z * sf)?,
        })
    }

    /// Latents → images `(N, 3, H, W)` in about `[-1, 1]`, f32.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let sf = self.vae.config().scaling_factor;
        let z = match self.latent_stats()? {
            Some((mean, std)) => (latents.broadcast_mul(&std)? / sf)?.broadcast_add(&mean)?,
            None => (latents / sf)?,
        };
        Ok(self
            .vae
            .decode(&z.to_dtype(self.dtype)?)?
            .to_dtype(DType::F32)?)
    }

    /// Decodes latents and builds the output (`output_type="np"` and `"pil"` at once).
    pub fn finish(
        &self,
        latents: Tensor,
        mut timings: Timings,
        warnings: Vec<String>,
        trace: Option<Trace>,
    ) -> Result<ImageOutput> {
        let t = std::time::Instant::now();
        let decoded = self.decode(&latents)?;
        let (images, rgb) = crate::image_processor::postprocess(&decoded)?;
        timings.decode = t.elapsed();
        Ok(ImageOutput {
            images,
            rgb,
            timings,
            warnings,
            trace,
        })
    }
}
