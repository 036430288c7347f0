//! ControlNet support for the Stable Diffusion 1.x/2.x and SDXL pipelines (diffusers'
//! `StableDiffusionControlNetPipeline` / `StableDiffusionXLControlNetPipeline`): one or several
//! ControlNets, each with its control image, conditioning scale and guidance window, and guess
//! mode.
//!
//! ```text
//! image_k = resize(control_image_k, height, width) / 255          # RGB in [0, 1]
//! keep_k(i) = 0 if i/n < start_k or (i+1)/n > end_k else 1
//! residuals = sum_k controlnet_k(x, t, embeds, image_k, scale_k * keep_k(i), guess_mode)
//! ```
//!
//! In guess mode with guidance, the ControlNets see only the conditional half of the batch
//! (latents, prompt) and the unconditional half gets zero residuals.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use diffuse_core::{Error, Result};
use diffuse_models::embeddings::TimeConditioning;
use diffuse_models::ModelMixin;
use diffuse_models::{
    ControlInput, ControlNetModel, ControlResiduals, UNet2DConditionConfig, UNet2DConditionModel,
};
use image::RgbImage;

use crate::denoise::cond_half;
use crate::image_processor::{default_size, preprocess_control_image};
use crate::stable_diffusion::{repeat_batch, EncodedPrompt};
use crate::{LoadOptions, Trace};

/// One ControlNet with its control image and settings.
#[derive(Clone, Debug)]
pub struct ControlNetUnit {
    pub model: Arc<ControlNetModel>,
    /// Where the model came from (its folder), for messages.
    pub name: String,
    /// Resized to the output size; RGB.
    pub image: RgbImage,
    /// `controlnet_conditioning_scale`.
    pub scale: f64,
    /// `control_guidance_start` / `control_guidance_end`: the share of the steps, in [0, 1],
    /// during which this ControlNet acts.
    pub guidance_start: f64,
    pub guidance_end: f64,
}

impl ControlNetUnit {
    /// A ControlNet acting over the whole run at scale 1.
    pub fn new(model: Arc<ControlNetModel>, name: impl Into<String>, image: RgbImage) -> Self {
        Self {
            model,
            name: name.into(),
            image,
            scale: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
        }
    }
}

/// The ControlNets of a run.
#[derive(Clone, Debug, Default)]
pub struct ControlNetRequest {
    pub units: Vec<ControlNetUnit>,
    /// The ControlNets steer without the prompt: their residuals are scaled from 0.1 (shallow)
    /// to 1 (bottleneck) and only the conditional half of the guidance batch gets them.
    /// Always on for ControlNets with `global_pool_conditions`.
    pub guess_mode: bool,
}

impl ControlNetRequest {
    /// The default output size: the first control image's, rounded down to a multiple of
    /// `factor` (diffusers takes the size of the prepared control image).
    pub fn default_size(&self, factor: usize) -> Result<Option<(usize, usize)>> {
        match self.units.first() {
            Some(u) => Ok(Some(default_size(
                u.image.width(),
                u.image.height(),
                factor,
            )?)),
            None => Ok(None),
        }
    }
}

/// Loads a `ControlNetModel` folder (`config.json` + weights) with the pipeline's dtype,
/// device and weight variant.
pub fn load_controlnet(dir: &Path, opts: &LoadOptions) -> Result<Arc<ControlNetModel>> {
    let model = ControlNetModel::from_pretrained_variant(
        dir,
        opts.variant.as_deref(),
        opts.dtype,
        &opts.device,
    )?;
    Ok(Arc::new(model))
}

/// "SDXL" or "SD 1.x/2.x", from the conditioning a config asks for.
fn family(addition_embed_type: Option<&str>) -> &'static str {
    match addition_embed_type {
        Some("text_time") => "SDXL",
        _ => "SD 1.x/2.x",
    }
}

/// Errors unless the ControlNet `name` was made for a UNet like `unet` (same text width,
/// block widths, layers and added conditioning); the message names both.
pub fn check_fits(unet: &UNet2DConditionConfig, cn: &ControlNetModel, name: &str) -> Result<()> {
    let c = cn.config();
    let unet_cross = unet.cross_attention_dim.get(0);
    let fits = c.cross_attention_dim == unet_cross
        && c.block_out_channels == unet.block_out_channels
        && unet
            .layers_per_block
            .values()
            .iter()
            .all(|&l| l == c.layers_per_block)
        && c.addition_embed_type == unet.addition_embed_type
        && c.in_channels <= unet.in_channels;
    if fits {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "ControlNet {name} is an {} ControlNet (cross_attention_dim {}, block_out_channels {:?}) \
         but the pipeline's UNet is an {} UNet (cross_attention_dim {unet_cross}, \
         block_out_channels {:?}): they do not fit together",
        family(c.addition_embed_type.as_deref()),
        c.cross_attention_dim,
        c.block_out_channels,
        family(unet.addition_embed_type.as_deref()),
        unet.block_out_channels,
    )))
}

struct PreparedUnit {
    model: Arc<ControlNetModel>,
    /// `(rows, 3, H, W)` in `[0, 1]`, rows as the ControlNet's batch.
    image: Tensor,
    scale: f64,
    start: f64,
    end: f64,
}

/// The ControlNets of a run with their control images ready for the loop.
pub(crate) struct PreparedControl {
    units: Vec<PreparedUnit>,
    guess_mode: bool,
    guided: bool,
    /// The schedule's length before `denoising_end` cut it: diffusers' guidance windows are
    /// shares of the whole schedule.
    schedule_len: Option<usize>,
}

impl PreparedControl {
    /// Checks the ControlNets of a run (if any) against `unet` and prepares the control
    /// images for the prompt's batch of `height` × `width` images (diffusers' `prepare_image`).
    pub(crate) fn prepare(
        req: Option<&ControlNetRequest>,
        unet: &UNet2DConditionModel,
        (height, width): (usize, usize),
        prompt: &EncodedPrompt,
        device: &Device,
    ) -> Result<Option<Self>> {
        let Some(req) = req.filter(|r| !r.units.is_empty()) else {
            return Ok(None);
        };
        let (batch, guided) = (prompt.batch, prompt.guided);
        let guess_mode = req.guess_mode || req.units[0].model.config().global_pool_conditions;
        let mut units = Vec::with_capacity(req.units.len());
        for u in &req.units {
            check_fits(unet.config(), &u.model, &u.name)?;
            crate::check_finite(&[(
                &format!("ControlNet {}: conditioning scale", u.name),
                u.scale,
            )])?;
            if !(0.0..=1.0).contains(&u.guidance_start)
                || !(0.0..=1.0).contains(&u.guidance_end)
                || u.guidance_start >= u.guidance_end
            {
                return Err(Error::invalid(format!(
                    "ControlNet {}: control guidance start {} and end {} must satisfy \
                     0 <= start < end <= 1",
                    u.name, u.guidance_start, u.guidance_end
                )));
            }
            let one = preprocess_control_image(&u.image, height, width, device)?;
            let mut image = repeat_batch(&one, batch)?;
            if guided && !guess_mode {
                image = Tensor::cat(&[&image, &image], 0)?;
            }
            units.push(PreparedUnit {
                model: u.model.clone(),
                image,
                scale: u.scale,
                start: u.guidance_start,
                end: u.guidance_end,
            });
        }
        Ok(Some(Self {
            units,
            guess_mode,
            guided,
            schedule_len: None,
        }))
    }

    /// Sets the length of the whole schedule when the loop runs only its start.
    pub(crate) fn set_schedule_len(&mut self, n: usize) {
        self.schedule_len = Some(n);
    }

    /// The summed residuals of every ControlNet acting at step `i` of `n`, for the UNet input
    /// `scaled`; `cond_input` gives the conditional half's input (guess mode). None when no
    /// ControlNet acts at this step.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn residuals(
        &self,
        (i, n): (usize, usize),
        scaled: &Tensor,
        t: &Tensor,
        prompt: &EncodedPrompt,
        text_time: Option<(&Tensor, &Tensor)>,
        cond_input: impl FnOnce() -> Result<Tensor>,
        trace: Option<&mut Trace>,
    ) -> Result<Option<ControlResiduals>> {
        let split = self.guess_mode && self.guided;
        let (input, embeds, tt) = if split {
            let tt = match text_time {
                Some((a, b)) => Some((cond_half(a, true)?, cond_half(b, true)?)),
                None => None,
            };
            (cond_input()?, cond_half(&prompt.embeds, true)?, tt)
        } else {
            let tt = text_time.map(|(a, b)| (a.clone(), b.clone()));
            (scaled.clone(), prompt.embeds.clone(), tt)
        };
        if let Some(tr) = trace {
            tr.controlnet_inputs.push(input.clone());
        }
        let (fi, fnn) = (i as f64, self.schedule_len.unwrap_or(n) as f64);
        let mut total: Option<ControlResiduals> = None;
        for u in &self.units {
            let keep = !(fi / fnn < u.start || (fi + 1.0) / fnn > u.end);
            if !keep || u.scale == 0.0 {
                // diffusers runs it anyway, scaled by 0: the residuals are zeros.
                continue;
            }
            let text_time = match (&tt, u.model.config().addition_embed_type.is_some()) {
                (Some((a, b)), true) => Some((a, b)),
                _ => None,
            };
            let time = TimeConditioning {
                text_time,
                ..Default::default()
            };
            let control = ControlInput {
                image: &u.image,
                scale: u.scale,
                guess_mode: self.guess_mode,
            };
            let r = u.model.forward(&input, t, &embeds, &control, &time)?;
            total = Some(match total {
                Some(acc) => acc.add(&r)?,
                None => r,
            });
        }
        let Some(total) = total else {
            return Ok(None);
        };
        if !split {
            return Ok(Some(total));
        }
        let pad = |d: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&[&d.zeros_like()?, d], 0)?) };
        Ok(Some(ControlResiduals {
            down: total.down.iter().map(pad).collect::<Result<Vec<_>>>()?,
            mid: pad(&total.mid)?,
        }))
    }
}
