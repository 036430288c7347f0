//! `StableDiffusion3Pipeline`: text-to-image with the SD3 MMDiT, two CLIP text encoders and T5,
//! on a flow-matching schedule, with classifier-free guidance.
//!
//! ```text
//! clip = [clip_l.hidden_states[-2], clip_g.hidden_states[-2]] padded to T5's width
//! embeds = cat([clip, t5(prompt, max_sequence_length)], tokens)   # (B, 77 + L, 4096)
//! pooled = [clip_l.text_embeds, clip_g.text_embeds]                # (B, 2048)
//! latents = randn(B, 16, h/8, w/8)
//! for t in timesteps:                                              # shift (or mu) schedule
//!     v = transformer([latents; latents], t, [neg; embeds], [neg_pooled; pooled])
//!     latents = scheduler.step(v_uncond + g · (v_cond − v_uncond), t, latents)
//! image = vae.decode(latents / scaling_factor + shift_factor)
//! ```

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use diffuse_core::{BatchShard, Error, Generator, Result};
use diffuse_models::clip_text::ClipTextModelWithProjection;
use diffuse_models::clip_tokenizer::ClipTokenizer;
use diffuse_models::t5::T5EncoderModel;
use diffuse_models::t5_tokenizer::T5Tokenizer;
use diffuse_models::transformer_sd3::{SD3Transformer2DConfig, SD3Transformer2DModel};
use diffuse_models::ModelMixin;
use diffuse_schedulers::{Scheduler, TimestepsSpec};

use crate::components::{self, Component, Vae};
use crate::stable_diffusion::{repeat_batch, ImageOutput};
use crate::{check_sampling, component_dir, fresh_scheduler, load_scheduler, LoadOptions};
use crate::{StepCallback, Timings, Trace};

/// Text embeddings of a flow-matching pipeline, one row per prompt (repeated
/// `num_images_per_prompt` times by the pipeline), as diffusers' `prompt_embeds`,
/// `pooled_prompt_embeds` and their negative counterparts.
#[derive(Clone, Debug)]
pub struct TextEmbeds {
    pub embeds: Tensor,
    pub pooled: Tensor,
    /// `(negative_prompt_embeds, negative_pooled_prompt_embeds)`, with guidance.
    pub negative: Option<(Tensor, Tensor)>,
}

/// A text-to-image request to [`StableDiffusion3Pipeline`] or [`crate::flux::FluxPipeline`].
#[derive(Clone, Debug)]
pub struct FlowText2ImageRequest {
    pub prompts: Vec<String>,
    /// Empty (= ""), one for all prompts, or one per prompt (SD3; Flux takes none).
    pub negative_prompts: Vec<String>,
    /// Replaces `prompts` / `negative_prompts` when set.
    pub prompt_embeds: Option<TextEmbeds>,
    /// SD3: classifier-free guidance when > 1. Flux-dev: the guidance the model embeds.
    pub guidance_scale: f64,
    pub num_images_per_prompt: usize,
    pub steps: usize,
    pub seed: u64,
    /// Default: the transformer's `sample_size` × the VAE's scale factor.
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// T5 tokens (1..=512); default 256 (SD3) or 512 (Flux).
    pub max_sequence_length: Option<usize>,
    /// SD3: use the CLIP layer `clip_skip` layers before the penultimate one.
    pub clip_skip: Option<usize>,
    /// Initial latents instead of drawing them (SD3: `(B, C, h/8, w/8)`; Flux: packed).
    pub latents: Option<Tensor>,
    /// Record every loop tensor in [`ImageOutput::trace`].
    pub record_trace: bool,
    /// Make only images `start..start + len` of the batch (prompts ×
    /// `num_images_per_prompt`, where this request holds the prompts and count of those
    /// images) drawn from `seed`: one of several processes sharing the batch gets the same
    /// images, bit for bit, as the whole batch has. `None`: the whole batch.
    pub shard: Option<BatchShard>,
}

impl Default for FlowText2ImageRequest {
    fn default() -> Self {
        Self {
            prompts: vec![String::new()],
            negative_prompts: vec![],
            prompt_embeds: None,
            guidance_scale: 7.0,
            num_images_per_prompt: 1,
            steps: 28,
            seed: 0,
            height: None,
            width: None,
            max_sequence_length: None,
            clip_skip: None,
            latents: None,
            record_trace: false,
            shard: None,
        }
    }
}

/// The three text encoders of SD3 (`text_encoder_3` may be absent: its embeddings are zeros).
pub struct Sd3TextEncoders {
    pub text_encoder: ClipTextModelWithProjection,
    pub text_encoder_2: ClipTextModelWithProjection,
    pub text_encoder_3: Option<T5EncoderModel>,
}

/// The SD3 components.
pub struct StableDiffusion3Pipeline {
    pub class_name: String,
    pub transformer: Component<SD3Transformer2DModel>,
    pub transformer_config: SD3Transformer2DConfig,
    pub vae: Vae,
    pub text_encoders: Component<Sd3TextEncoders>,
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
    pub tokenizer_3: Option<T5Tokenizer>,
    pub scheduler: Box<dyn Scheduler>,
    pub device: Device,
}

/// Whether `model_index.json` names a component (`[library, class]`, not `[null, null]`).
pub(crate) fn has_component(index: &serde_json::Value, name: &str) -> bool {
    index
        .get(name)
        .and_then(|v| v.get(1))
        .is_some_and(|c| !c.is_null())
}

impl StableDiffusion3Pipeline {
    /// Loads the folder's components; with `opts.load_on_demand` the text encoders and the
    /// transformer are read from disk when used and dropped right after.
    pub fn load(
        dir: &Path,
        class_name: String,
        index: &serde_json::Value,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let scheduler = load_scheduler(dir, opts)?;
        let transformer_dir = component_dir(dir, "transformer")?;
        let transformer_config: SD3Transformer2DConfig =
            diffuse_loaders::read_config(&transformer_dir.join("config.json"))?;
        let with_t5 = has_component(index, "text_encoder_3");
        let tokenizer = ClipTokenizer::from_dir(&component_dir(dir, "tokenizer")?)?;
        let tokenizer_2 = ClipTokenizer::from_dir(&component_dir(dir, "tokenizer_2")?)?;
        let tokenizer_3 = with_t5
            .then(|| T5Tokenizer::from_dir(&component_dir(dir, "tokenizer_3")?))
            .transpose()?;
        let (te, te2) = (
            component_dir(dir, "text_encoder")?,
            component_dir(dir, "text_encoder_2")?,
        );
        let te3 = with_t5
            .then(|| component_dir(dir, "text_encoder_3"))
            .transpose()?;
        let o = opts.clone();
        let text_encoders = Component::new(opts.load_on_demand, move || {
            let variant = o.variant.as_deref();
            let clip = |d: &Path| {
                ClipTextModelWithProjection::from_pretrained_variant(d, variant, o.dtype, &o.device)
            };
            Ok(Sd3TextEncoders {
                text_encoder: clip(&te)?,
                text_encoder_2: clip(&te2)?,
                text_encoder_3: te3
                    .as_deref()
                    .map(|d| {
                        T5EncoderModel::from_pretrained_variant(d, variant, o.dtype, &o.device)
                    })
                    .transpose()?,
            })
        })?;
        let transformer = components::component(
            transformer_dir,
            opts,
            SD3Transformer2DModel::from_pretrained_variant,
        )?;
        Ok(Self {
            class_name,
            transformer,
            transformer_config,
            vae: Vae::load(dir, opts)?,
            text_encoders,
            tokenizer,
            tokenizer_2,
            tokenizer_3,
            scheduler,
            device: opts.device.clone(),
        })
    }

    /// The native image size `(height, width)`.
    pub fn default_size(&self) -> (usize, usize) {
        let s = self.transformer_config.sample_size * self.vae.scale_factor();
        (s, s)
    }

    /// diffusers `encode_prompt`: per prompt, the two CLIP encoders' penultimate hidden states
    /// side by side, zero-padded to T5's width and followed by T5's embeddings; the pooled
    /// outputs side by side; with guidance the same for the negative prompts.
    pub fn encode_prompt(
        &self,
        prompts: &[String],
        negative_prompts: &[String],
        guided: bool,
        max_sequence_length: usize,
        clip_skip: Option<usize>,
        warnings: &mut Vec<String>,
    ) -> Result<TextEmbeds> {
        components::check_max_sequence_length(max_sequence_length)?;
        let (prompts, negatives) = components::prompts_and_negatives(prompts, negative_prompts)?;
        self.text_encoders.with(|enc| {
            let mut embed = |texts: &[String], clip_skip| {
                self.embed_texts(enc, texts, max_sequence_length, clip_skip, warnings)
            };
            let (embeds, pooled) = embed(&prompts, clip_skip)?;
            // diffusers applies clip skip to the prompt only.
            let negative = guided.then(|| embed(&negatives, None)).transpose()?;
            Ok(TextEmbeds {
                embeds,
                pooled,
                negative,
            })
        })
    }

    fn embed_texts(
        &self,
        enc: &Sd3TextEncoders,
        texts: &[String],
        max_len: usize,
        clip_skip: Option<usize>,
        warnings: &mut Vec<String>,
    ) -> Result<(Tensor, Tensor)> {
        let (l, l_pooled) = components::clip_projected_embeds(
            &self.tokenizer,
            &enc.text_encoder,
            texts,
            clip_skip,
            warnings,
        )?;
        let (g, g_pooled) = components::clip_projected_embeds(
            &self.tokenizer_2,
            &enc.text_encoder_2,
            texts,
            clip_skip,
            warnings,
        )?;
        let t5 = match (&enc.text_encoder_3, &self.tokenizer_3) {
            (Some(model), Some(tok)) => {
                components::t5_embeds(tok, model, texts, max_len, warnings)?
            }
            _ => Tensor::zeros(
                (
                    texts.len(),
                    max_len,
                    self.transformer_config.joint_attention_dim,
                ),
                DType::F32,
                &self.device,
            )?,
        };
        let clip = Tensor::cat(&[&l, &g], 2)?;
        let (width, clip_width) = (t5.dim(2)?, clip.dim(2)?);
        if clip_width > width {
            return Err(Error::invalid(format!(
                "the CLIP embeddings ({clip_width} wide) are wider than T5's ({width})"
            )));
        }
        let clip = clip.pad_with_zeros(2, 0, width - clip_width)?;
        Ok((
            Tensor::cat(&[&clip, &t5], 1)?,
            Tensor::cat(&[&l_pooled, &g_pooled], 1)?,
        ))
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
        let (dh, dw) = self.default_size();
        let (height, width) = (req.height.unwrap_or(dh), req.width.unwrap_or(dw));
        let f = self.vae.scale_factor();
        let multiple = f * self.transformer_config.patch_size;
        if height == 0 || width == 0 || height % multiple != 0 || width % multiple != 0 {
            return Err(Error::invalid(format!(
                "height and width must be positive multiples of {multiple}, got {width}x{height}"
            )));
        }
        let guided = req.guidance_scale > 1.0;
        let max_len = req.max_sequence_length.unwrap_or(256);
        let mut timings = Timings::default();
        let mut warnings = Vec::new();
        let t0 = Instant::now();
        let text = match &req.prompt_embeds {
            Some(e) => e.clone(),
            None => self.encode_prompt(
                &req.prompts,
                &req.negative_prompts,
                guided,
                max_len,
                req.clip_skip,
                &mut warnings,
            )?,
        };
        timings.text_encode = t0.elapsed();
        let n = req.num_images_per_prompt;
        let (mut embeds, mut pooled) = (
            repeat_batch(&text.embeds, n)?,
            repeat_batch(&text.pooled, n)?,
        );
        let batch = embeds.dim(0)?;
        if guided {
            let (neg, neg_pooled) = text
                .negative
                .as_ref()
                .ok_or_else(|| Error::invalid("guidance needs negative prompt embeddings"))?;
            let (neg, neg_pooled) = (repeat_batch(neg, n)?, repeat_batch(neg_pooled, n)?);
            if neg.dims() != embeds.dims() {
                return Err(Error::invalid(format!(
                    "negative prompt embeddings {:?} do not match prompt embeddings {:?}",
                    neg.dims(),
                    embeds.dims()
                )));
            }
            embeds = Tensor::cat(&[&neg, &embeds], 0)?;
            pooled = Tensor::cat(&[&neg_pooled, &pooled], 0)?;
        }

        let mut scheduler = fresh_scheduler(self.scheduler.as_ref())?;
        let mut generator = Generator::manual_seed(req.seed).with_shard(req.shard);
        let shape = (
            batch,
            self.transformer_config.in_channels,
            height / f,
            width / f,
        );
        let mut latents = match &req.latents {
            Some(l) if l.dims() != [shape.0, shape.1, shape.2, shape.3] => {
                return Err(Error::invalid(format!(
                    "latents have shape {:?}, expected {shape:?}",
                    l.dims()
                )))
            }
            Some(l) => l.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => generator.randn_batch(shape, &self.device)?,
        };
        let p = self.transformer_config.patch_size;
        let seq_len = (shape.2 / p) * (shape.3 / p);
        let spec = TimestepsSpec::steps(req.steps);
        let spec = match dynamic_shift(scheduler.as_ref(), seq_len, 1.16) {
            Some(mu) => spec.with_mu(mu),
            None => spec,
        };
        scheduler.set_timesteps_with(&spec)?;
        let timesteps = scheduler.timesteps().to_vec();

        let t1 = Instant::now();
        let mut trace = req.record_trace.then(Trace::default);
        if let Some(tr) = trace.as_mut() {
            tr.start_latents = Some(latents.clone());
        }
        self.transformer.with(|transformer| {
            for (i, &t) in timesteps.iter().enumerate() {
                let input = if guided {
                    Tensor::cat(&[&latents, &latents], 0)?
                } else {
                    latents.clone()
                };
                let t_tensor = Tensor::new(t as f32, &self.device)?;
                let out = transformer
                    .forward(&input, &embeds, &pooled, &t_tensor)?
                    .to_dtype(DType::F32)?;
                let v = if guided {
                    let (u, c) = (out.narrow(0, 0, batch)?, out.narrow(0, batch, batch)?);
                    (&u + ((c - &u)? * req.guidance_scale)?)?
                } else {
                    out.clone()
                };
                latents = scheduler.step(&v, t, &latents, &mut generator)?.prev_sample;
                components::report_step(
                    trace.as_mut(),
                    callback.as_deref_mut(),
                    (input, t, out),
                    (i, timesteps.len(), t),
                    &latents,
                )?;
            }
            Ok(())
        })?;
        timings.denoise = t1.elapsed();
        let z = self.vae.unscale(&latents)?;
        self.vae.decode(&z, timings, warnings, trace)
    }
}

/// `mu` of a `use_dynamic_shifting` scheduler for `seq_len` image tokens (diffusers'
/// `calculate_shift` with the config's bounds; `max_shift_default` is the pipeline's fallback
/// when the config has none: 1.16 in SD3, 1.15 in Flux). `None` without dynamic shifting.
pub(crate) fn dynamic_shift(
    scheduler: &dyn Scheduler,
    seq_len: usize,
    max_shift_default: f64,
) -> Option<f64> {
    let cfg = &scheduler.config().map;
    if !cfg
        .get("use_dynamic_shifting")
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
    {
        return None;
    }
    let num = |k: &str, d: f64| cfg.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    Some(
        diffuse_schedulers::flow_match_euler_discrete::calculate_shift(
            seq_len,
            num("base_image_seq_len", 256.0) as usize,
            num("max_image_seq_len", 4096.0) as usize,
            num("base_shift", 0.5),
            num("max_shift", max_shift_default),
        ),
    )
}
