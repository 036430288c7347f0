//! `FluxPipeline`: text-to-image with the Flux transformer (dev: guidance-distilled, the
//! guidance scale is a model input and there is no unconditional batch; schnell: neither).
//!
//! ```text
//! pooled = clip.pooler_output(prompt);  embeds = t5(prompt, max_sequence_length)
//! latents = pack(randn(B, C, h/8, w/8))          # 2×2 patches → (B, h/16 · w/16, 4C) tokens
//! ids = (0, row, col) per token; text ids zero
//! sigmas = linspace(1, 1/n, n), shifted by mu(token count)
//! for t in timesteps:
//!     v = transformer(latents, t / 1000, guidance, pooled, embeds, ids)
//!     latents = scheduler.step(v, t, latents)
//! image = vae.decode(unpack(latents) / scaling_factor + shift_factor)
//! ```

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use diffuse_core::{Error, Generator, Result};
use diffuse_models::clip_text::ClipTextModel;
use diffuse_models::clip_tokenizer::ClipTokenizer;
use diffuse_models::t5::T5EncoderModel;
use diffuse_models::t5_tokenizer::T5Tokenizer;
use diffuse_models::transformer_flux::{
    FluxConditioning, FluxTransformer2DConfig, FluxTransformer2DModel,
};
use diffuse_models::ModelMixin;
use diffuse_schedulers::{Scheduler, TimestepsSpec};

use crate::components::{self, Component, Vae};
use crate::stable_diffusion::{repeat_batch, ImageOutput};
use crate::stable_diffusion_3::{dynamic_shift, FlowText2ImageRequest, TextEmbeds};
use crate::{check_sampling, component_dir, fresh_scheduler, load_scheduler, LoadOptions};
use crate::{StepCallback, Timings, Trace};

/// Flux's text encoders: CLIP (pooled output only) and T5.
pub struct FluxTextEncoders {
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: T5EncoderModel,
}

/// The Flux components.
pub struct FluxPipeline {
    pub class_name: String,
    pub transformer: Component<FluxTransformer2DModel>,
    pub transformer_config: FluxTransformer2DConfig,
    pub vae: Vae,
    pub text_encoders: Component<FluxTextEncoders>,
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: T5Tokenizer,
    pub scheduler: Box<dyn Scheduler>,
    pub device: Device,
}

/// `(B, C, H, W)` latents as `(B, H/2 · W/2, 4C)` tokens of 2×2 patches (diffusers'
/// `_pack_latents`).
pub fn pack_latents(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    Ok(latents
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// The inverse of [`pack_latents`] for latents `h × w` (diffusers' `_unpack_latents`).
pub fn unpack_latents(tokens: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c4) = tokens.dims3()?;
    let c = c4 / 4;
    Ok(tokens
        .reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .contiguous()?
        .reshape((b, c, h, w))?)
}

/// Position ids `(rows · cols, 3)` `(0, row, col)` of the packed image tokens (diffusers'
/// `_prepare_latent_image_ids`).
pub fn latent_image_ids(rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    let ids: Vec<f32> = (0..rows)
        .flat_map(|r| (0..cols).flat_map(move |c| [0.0, r as f32, c as f32]))
        .collect();
    Ok(Tensor::from_vec(ids, (rows * cols, 3), device)?)
}

impl FluxPipeline {
    /// Loads the folder's components; with `opts.load_on_demand` the text encoders and the
    /// transformer are read from disk when used and dropped right after.
    pub fn load(dir: &Path, class_name: String, opts: &LoadOptions) -> Result<Self> {
        let scheduler = load_scheduler(dir, opts)?;
        let transformer_dir = component_dir(dir, "transformer")?;
        let transformer_config: FluxTransformer2DConfig =
            diffuse_loaders::read_config(&transformer_dir.join("config.json"))?;
        transformer_config.validate()?;
        let tokenizer = ClipTokenizer::from_dir(&component_dir(dir, "tokenizer")?)?;
        let tokenizer_2 = T5Tokenizer::from_dir(&component_dir(dir, "tokenizer_2")?)?;
        let (te, te2) = (
            component_dir(dir, "text_encoder")?,
            component_dir(dir, "text_encoder_2")?,
        );
        let o = opts.clone();
        let text_encoders = Component::new(opts.load_on_demand, move || {
            let variant = o.variant.as_deref();
            Ok(FluxTextEncoders {
                text_encoder: ClipTextModel::from_pretrained_variant(
                    &te, variant, o.dtype, &o.device,
                )?,
                text_encoder_2: T5EncoderModel::from_pretrained_variant(
                    &te2, variant, o.dtype, &o.device,
                )?,
            })
        })?;
        let transformer = components::component(
            transformer_dir,
            opts,
            FluxTransformer2DModel::from_pretrained_variant,
        )?;
        Ok(Self {
            class_name,
            transformer,
            transformer_config,
            vae: Vae::load(dir, opts)?,
            text_encoders,
            tokenizer,
            tokenizer_2,
            scheduler,
            device: opts.device.clone(),
        })
    }

    /// The native image size `(height, width)` (diffusers' `default_sample_size` 128 × the VAE
    /// scale factor).
    pub fn default_size(&self) -> (usize, usize) {
        let s = 128 * self.vae.scale_factor();
        (s, s)
    }

    /// diffusers `encode_prompt`: CLIP's pooled output and T5's embeddings of each prompt.
    pub fn encode_prompt(
        &self,
        prompts: &[String],
        max_sequence_length: usize,
        warnings: &mut Vec<String>,
    ) -> Result<TextEmbeds> {
        components::check_max_sequence_length(max_sequence_length)?;
        if prompts.is_empty() {
            return Err(Error::invalid("no prompt given"));
        }
        self.text_encoders.with(|enc| {
            let pooled = components::clip_pooled_embeds(
                &self.tokenizer,
                &enc.text_encoder,
                prompts,
                warnings,
            )?;
            let embeds = components::t5_embeds(
                &self.tokenizer_2,
                &enc.text_encoder_2,
                prompts,
                max_sequence_length,
                warnings,
            )?;
            Ok(TextEmbeds {
                embeds,
                pooled,
                negative: None,
            })
        })
    }

    /// Text-to-image.
    pub fn text_to_image(
        &self,
        req: &FlowText2ImageRequest,
        mut callback: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        check_sampling(req.steps, &[("guidance_scale", req.guidance_scale)])?;
        if req.num_images_per_prompt == 0 {
            return Err(Error::invalid("num_images_per_prompt must be at least 1"));
        }
        if !req.negative_prompts.iter().all(|p| p.is_empty()) {
            return Err(Error::invalid(
                "Flux takes no negative prompt: it has no unconditional pass (guidance is \
                 distilled into the model, or absent in schnell)",
            ));
        }
        let (dh, dw) = self.default_size();
        let (height, width) = (req.height.unwrap_or(dh), req.width.unwrap_or(dw));
        let f = self.vae.scale_factor();
        // Latents cover whole 2×2 patches: other sizes are rounded down, as diffusers does.
        let (lh, lw) = (2 * (height / (f * 2)), 2 * (width / (f * 2)));
        if lh == 0 || lw == 0 {
            return Err(Error::invalid(format!(
                "height and width must be at least {}, got {width}x{height}",
                f * 2
            )));
        }
        let mut warnings = Vec::new();
        if (lh * f, lw * f) != (height, width) {
            warnings.push(format!(
                "height and width must be multiples of {}: the image is {}x{} instead of \
                 {width}x{height}",
                f * 2,
                lw * f,
                lh * f
            ));
        }
        let max_len = req.max_sequence_length.unwrap_or(512);
        let mut timings = Timings::default();
        let t0 = Instant::now();
        let text = match &req.prompt_embeds {
            Some(e) => e.clone(),
            None => self.encode_prompt(&req.prompts, max_len, &mut warnings)?,
        };
        timings.text_encode = t0.elapsed();
        let n = req.num_images_per_prompt;
        let (embeds, pooled) = (
            repeat_batch(&text.embeds, n)?,
            repeat_batch(&text.pooled, n)?,
        );
        let batch = embeds.dim(0)?;
        let txt_ids = Tensor::zeros((embeds.dim(1)?, 3), DType::F32, &self.device)?;
        let img_ids = latent_image_ids(lh / 2, lw / 2, &self.device)?;

        let mut scheduler = fresh_scheduler(self.scheduler.as_ref())?;
        let mut generator = Generator::manual_seed(req.seed).with_shard(req.shard);
        let channels = self.transformer_config.in_channels / 4;
        let tokens = (lh / 2) * (lw / 2);
        let mut latents = match &req.latents {
            Some(l) if l.dims() != [batch, tokens, channels * 4] => {
                return Err(Error::invalid(format!(
                    "latents have shape {:?}, expected packed ({batch}, {tokens}, {})",
                    l.dims(),
                    channels * 4
                )))
            }
            Some(l) => l.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => pack_latents(&generator.randn_batch((batch, channels, lh, lw), &self.device)?)?,
        };
        let flow_sigmas = scheduler
            .config()
            .map
            .get("use_flow_sigmas")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut spec = if flow_sigmas {
            TimestepsSpec::steps(req.steps)
        } else {
            TimestepsSpec::sigmas(linspace(1.0, 1.0 / req.steps as f64, req.steps))
        };
        if let Some(mu) = dynamic_shift(scheduler.as_ref(), tokens, 1.15) {
            spec = spec.with_mu(mu);
        }
        scheduler.set_timesteps_with(&spec)?;
        let timesteps = scheduler.timesteps().to_vec();
        let guidance = self
            .transformer_config
            .guidance_embeds
            .then(|| Tensor::full(req.guidance_scale as f32, batch, &self.device))
            .transpose()?;

        let t1 = Instant::now();
        let mut trace = req.record_trace.then(Trace::default);
        if let Some(tr) = trace.as_mut() {
            tr.start_latents = Some(latents.clone());
        }
        let cond = FluxConditioning {
            encoder_hidden_states: &embeds,
            pooled_projections: &pooled,
            txt_ids: &txt_ids,
            img_ids: &img_ids,
            guidance: guidance.as_ref(),
        };
        self.transformer.with(|transformer| {
            for (i, &t) in timesteps.iter().enumerate() {
                // The timestep in f32, divided by 1000 in f32 (the model multiplies it back).
                let t_model = Tensor::new(t as f32 / 1000.0, &self.device)?;
                let out = transformer
                    .forward(&latents, &t_model, &cond)?
                    .to_dtype(DType::F32)?;
                let input = latents.clone();
                latents = scheduler
                    .step(&out, t, &latents, &mut generator)?
                    .prev_sample;
                components::report_step(
                    trace.as_mut(),
                    callback.as_deref_mut(),
                    (input, (t as f32 / 1000.0) as f64, out),
                    (i, timesteps.len(), t),
                    &latents,
                )?;
            }
            Ok(())
        })?;
        timings.denoise = t1.elapsed();
        let z = self.vae.unscale(&unpack_latents(&latents, lh, lw)?)?;
        self.vae.decode(&z, timings, warnings, trace)
    }
}

/// `numpy.linspace(start, end, n)`: `start + i·step`, the last value exactly `end`.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            (0..n)
                .map(|i| {
                    if i + 1 == n {
                        end
                    } else {
                        start + i as f64 * step
                    }
                })
                .collect()
        }
    }
}
