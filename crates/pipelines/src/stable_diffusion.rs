//! `StableDiffusionPipeline`: text-to-image with classifier-free guidance, and the pieces the
//! img2img and inpaint pipelines share (prompt encoding, the guided denoising loop, decoding).
//!
//! ```text
//! embeds  = encode_prompt(prompt, negative_prompt)             # [uncond, cond] when CFG
//! latents = randn(B, 4, h/8, w/8) * init_noise_sigma
//! for t in timesteps:
//!     eps = unet(scale_model_input(cat([latents] * 2), t), t, embeds)
//!     eps = eps_uncond + g * (eps_cond - eps_uncond)
//!     latents = scheduler.step(eps, t, latents)
//! image = clamp(vae.decode(latents / scaling_factor) / 2 + 0.5, 0, 1)
//! ```

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use diffuse_core::{BatchShard, Error, Generator, Result};
use diffuse_models::clip_text::ClipTextConfig;
use diffuse_models::clip_text::ClipTextModel;
use diffuse_models::clip_tokenizer::ClipTokenizer;
use diffuse_models::{AutoencoderKL, UNet2DConditionConfig, UNet2DConditionModel};
use diffuse_schedulers::Scheduler;
use image::RgbImage;

use crate::controlnet::{ControlNetRequest, PreparedControl};
use crate::denoise::{guidance_enabled, initial_noise, VaeView};
use crate::prompt_weighting::{self, PromptSyntax};
use crate::sources::{self, Adapters, Source};
use crate::{check_sampling, fresh_scheduler, LoadOptions};
use crate::{StepCallback, Timings, Trace};

/// The Stable Diffusion components; one value serves text2img, img2img and inpainting.
pub struct StableDiffusionPipeline {
    pub class_name: String,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text_encoder: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    /// The configured scheduler; each run works on a fresh copy of it.
    pub scheduler: Box<dyn Scheduler>,
    pub device: Device,
    /// The UNet/text encoder dtype.
    pub dtype: DType,
    /// The VAE's dtype (f32 when the config asks to upcast an f16 pipeline).
    pub vae_dtype: DType,
    /// Textual-inversion tokens with more than one vector, and their vector count: prompts
    /// naming `tok` are expanded to `tok tok_1 ...` before tokenizing.
    pub multi_vector_tokens: Vec<(String, usize)>,
}

/// Precomputed prompt embeddings (`prompt_embeds` / `negative_prompt_embeds` of diffusers),
/// one row per prompt; they are repeated `num_images_per_prompt` times.
#[derive(Clone, Debug)]
pub struct PromptEmbeds {
    pub cond: Tensor,
    /// With guidance and none given, the negative prompts are encoded.
    pub uncond: Option<Tensor>,
    /// SDXL: the pooled embeddings of `cond` (required there) and `uncond`.
    pub pooled: Option<Tensor>,
    pub uncond_pooled: Option<Tensor>,
}

/// Settings every Stable Diffusion task shares.
#[derive(Clone, Debug)]
pub struct GenerationParams {
    pub prompts: Vec<String>,
    /// Empty (= ""), one for all prompts, or one per prompt.
    pub negative_prompts: Vec<String>,
    /// Replaces `prompts` when set.
    pub prompt_embeds: Option<PromptEmbeds>,
    /// Classifier-free guidance is off (no unconditional pass) when <= 1.
    pub guidance_scale: f64,
    pub num_images_per_prompt: usize,
    pub steps: usize,
    /// DDIM's eta (ignored by other schedulers).
    pub eta: f64,
    /// Seed of the torch-compatible generator all noise is drawn from.
    pub seed: u64,
    /// Use the output of the layer `clip_skip` layers before the last (then the final layer norm).
    pub clip_skip: Option<usize>,
    /// Record every loop tensor in [`ImageOutput::trace`].
    pub record_trace: bool,
    /// How prompt text is read: as diffusers does, or with A1111's weights and chunks.
    pub prompt_syntax: PromptSyntax,
    /// ControlNets steering the run.
    pub controlnet: Option<ControlNetRequest>,
    /// Make only images `start..start + len` of a batch of `batch` drawn from `seed`, where
    /// `len` is this request's own batch (prompts × `num_images_per_prompt`, the prompts of
    /// those images): one of several processes sharing the batch gets the same images, bit
    /// for bit, as the whole batch has. `None`: the whole batch.
    pub shard: Option<BatchShard>,
}

impl GenerationParams {
    /// A fresh copy of `template` (no state left from an earlier run) set for these
    /// settings: DDIM's eta, then the step count.
    pub(crate) fn fresh_scheduler(&self, template: &dyn Scheduler) -> Result<Box<dyn Scheduler>> {
        let mut scheduler = fresh_scheduler(template)?;
        scheduler.set_eta(self.eta);
        scheduler.set_timesteps(self.steps)?;
        Ok(scheduler)
    }

    /// The settings [`crate::check_sampling`] checks to be finite.
    pub(crate) fn checked_numbers(&self) -> [(&'static str, f64); 2] {
        [("guidance_scale", self.guidance_scale), ("eta", self.eta)]
    }
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            prompts: vec![String::new()],
            negative_prompts: vec![],
            prompt_embeds: None,
            guidance_scale: 7.5,
            num_images_per_prompt: 1,
            steps: 50,
            eta: 0.0,
            seed: 0,
            clip_skip: None,
            record_trace: false,
            prompt_syntax: PromptSyntax::Plain,
            controlnet: None,
            shard: None,
        }
    }
}

/// A text-to-image request.
#[derive(Clone, Debug, Default)]
pub struct Text2ImageRequest {
    pub params: GenerationParams,
    /// Default: the UNet's `sample_size * 8`; must be a multiple of 8.
    pub height: Option<usize>,
    pub width: Option<usize>,
    /// Initial latents (B, 4, h/8, w/8) instead of drawing them; still scaled by
    /// `init_noise_sigma`.
    pub latents: Option<Tensor>,
}

/// Generated images.
pub struct ImageOutput {
    /// (N, H, W, 3) f32 in [0, 1].
    pub images: Tensor,
    /// The same images as 8-bit RGB (`round(x * 255)`).
    pub rgb: Vec<RgbImage>,
    pub timings: Timings,
    /// Things the user should know (e.g. a truncated prompt).
    pub warnings: Vec<String>,
    pub trace: Option<Trace>,
}

/// Prompt embeddings ready for the UNet: `[uncond; cond]` stacked on the batch when guided
/// (diffusers `encode_prompt` + the concatenation `__call__` does).
pub struct EncodedPrompt {
    pub embeds: Tensor,
    pub guided: bool,
    /// Images in the batch (prompts × images per prompt).
    pub batch: usize,
}

pub(crate) use crate::denoise::LoopExtras;

impl StableDiffusionPipeline {
    /// Loads `unet/`, `vae/`, `text_encoder/`, `tokenizer/` and `scheduler/` of a folder.
    pub fn load(dir: &Path, class_name: String, opts: &LoadOptions) -> Result<Self> {
        Self::load_from(&Source::Folder(dir.to_path_buf()), class_name, opts)
    }

    /// Loads the components from a folder or a single file, with `opts.loras` fused in.
    pub(crate) fn load_from(src: &Source, class_name: String, opts: &LoadOptions) -> Result<Self> {
        let variant = opts.variant.as_deref();
        let (dtype, device) = (opts.dtype, &opts.device);
        let adapters = Adapters::open(&opts.loras)?;
        let scheduler = src.scheduler(opts)?;
        let tokenizer = src.tokenizer("tokenizer")?;
        let te_cfg: ClipTextConfig = src.config("text_encoder")?;
        te_cfg.validate("text_encoder config")?;
        let text_encoder = sources::build(
            src,
            &adapters,
            "text_encoder",
            variant,
            (te_cfg.num_hidden_layers, 0),
            dtype,
            device,
            |vb| ClipTextModel::new(vb, &te_cfg),
        )?;
        let unet_cfg: UNet2DConditionConfig = src.config("unet")?;
        unet_cfg.validate()?;
        let unet = sources::build_unet(src, &adapters, &unet_cfg, opts)?;
        let (vae, vae_dtype) = sources::build_vae(src, &adapters, opts, false)?;
        adapters.finish()?;
        src.check_unclaimed(&[
            diffuse_loaders::single_file::UNET_PREFIX,
            diffuse_loaders::single_file::VAE_PREFIX,
            "cond_stage_model.",
        ])?;
        Ok(Self {
            class_name,
            unet,
            vae,
            text_encoder,
            tokenizer,
            scheduler,
            device: device.clone(),
            dtype,
            vae_dtype,
            multi_vector_tokens: Vec::new(),
        })
    }

    /// Adds a textual-inversion embedding (diffusers' `load_textual_inversion`): its vectors
    /// become new rows of the text encoder's token table, under `token` (default: the token
    /// the file names, else the file stem) and, for n vectors, `token_1 .. token_{n-1}`.
    pub fn load_textual_inversion(
        &mut self,
        path: &Path,
        token: Option<&str>,
    ) -> Result<AddedEmbedding> {
        let ti = diffuse_loaders::textual_inversion::TextualInversion::load(path)?;
        let token = embedding_token(path, token, &ti)?;
        let [vectors] = ti.vectors.as_slice() else {
            return Err(Error::invalid(format!(
                "{}: an embedding with one table per text encoder (SDXL's clip_l/clip_g) does not \
                 fit this single-encoder pipeline",
                path.display()
            )));
        };
        let n = vectors.dim(0)?;
        let tokens = embedding_tokens(&token, n);
        // Check everything before changing anything: a failure leaves the pipeline as it was.
        let mut tokenizer = self.tokenizer.clone();
        for t in &tokens {
            tokenizer
                .add_token(t)
                .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        }
        let mut encoder = self.text_encoder.clone();
        encoder
            .add_token_embeddings(vectors)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        self.tokenizer = tokenizer;
        self.text_encoder = encoder;
        if n > 1 {
            self.multi_vector_tokens.push((token.clone(), n));
        }
        Ok(AddedEmbedding {
            token,
            vectors: n,
            width: vectors.dim(1)?,
        })
    }

    /// diffusers' `maybe_convert_prompt`: every multi-vector token the tokenizer finds in
    /// `text` is replaced (as plain text, case-sensitively) by `tok tok_1 ... tok_{n-1}`.
    pub fn expand_embedding_tokens(&self, text: &str) -> String {
        expand_embedding_tokens(&self.tokenizer, &self.multi_vector_tokens, text)
    }

    /// `2 ** (len(vae.block_out_channels) - 1)`.
    pub fn vae_scale_factor(&self) -> usize {
        1 << self.vae.config().block_out_channels.len().saturating_sub(1)
    }

    /// The UNet's native image size `(height, width)`.
    pub fn default_size(&self) -> (usize, usize) {
        let (h, w) = self
            .unet
            .config()
            .sample_size
            .map(|s| s.hw())
            .unwrap_or((64, 64));
        (h * self.vae_scale_factor(), w * self.vae_scale_factor())
    }

    /// Text-to-image.
    pub fn text_to_image(
        &self,
        req: &Text2ImageRequest,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        let p = &req.params;
        check_sampling(p.steps, &p.checked_numbers())?;
        let (dh, dw) = self.default_size_for(p)?;
        let (height, width) = (req.height.unwrap_or(dh), req.width.unwrap_or(dw));
        self.check_size(height, width)?;
        let mut timings = Timings::default();
        let mut warnings = Vec::new();

        let t0 = Instant::now();
        let prompt = self.encode_prompt(p, &mut warnings)?;
        timings.text_encode = t0.elapsed();

        let mut scheduler = p.fresh_scheduler(self.scheduler.as_ref())?;
        let mut generator = Generator::manual_seed(p.seed).with_shard(p.shard);
        let f = self.vae_scale_factor();
        let shape = (
            prompt.batch,
            self.vae.config().latent_channels,
            height / f,
            width / f,
        );
        // diffusers' prepare_latents: drawn (or given) noise times init_noise_sigma.
        let noise = initial_noise(req.latents.as_ref(), shape, &mut generator, &self.device)?;
        let latents = (noise * scheduler.init_noise_sigma())?;

        let timesteps = scheduler.timesteps().to_vec();
        let t1 = Instant::now();
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
        timings.denoise = t1.elapsed();
        self.finish(latents, timings, warnings, trace)
    }

    /// The output size when none is given: the first control image's with ControlNets (as
    /// diffusers' ControlNet pipelines), else [`Self::default_size`].
    pub fn default_size_for(&self, p: &GenerationParams) -> Result<(usize, usize)> {
        let control = match &p.controlnet {
            Some(c) => c.default_size(self.vae_scale_factor())?,
            None => None,
        };
        Ok(control.unwrap_or(self.default_size()))
    }

    /// The loop extras carrying `p`'s ControlNets, prepared for `size` images.
    pub(crate) fn control_extras(
        &self,
        p: &GenerationParams,
        size: (usize, usize),
        prompt: &EncodedPrompt,
    ) -> Result<LoopExtras<'static>> {
        let control = PreparedControl::prepare(
            p.controlnet.as_ref(),
            &self.unet,
            size,
            prompt,
            &self.device,
        )?;
        Ok(LoopExtras {
            control,
            ..Default::default()
        })
    }

    pub(crate) fn check_size(&self, height: usize, width: usize) -> Result<()> {
        crate::check_image_size(height, width, self.vae_scale_factor())
    }

    /// diffusers `encode_prompt`: token ids padded/truncated to the model length, text encoder
    /// output (or an earlier layer with clip skip), repeated per image, and with guidance the
    /// negative prompts' embeddings stacked before them.
    pub fn encode_prompt(
        &self,
        p: &GenerationParams,
        warnings: &mut Vec<String>,
    ) -> Result<EncodedPrompt> {
        if p.num_images_per_prompt == 0 {
            return Err(Error::invalid("num_images_per_prompt must be at least 1"));
        }
        let guided = guidance_enabled(p.guidance_scale, &self.unet);
        let n = p.num_images_per_prompt;
        if p.prompt_syntax == PromptSyntax::A1111 && p.prompt_embeds.is_none() {
            return self.encode_prompt_a1111(p, guided);
        }
        let cond = match &p.prompt_embeds {
            Some(e) => e.cond.to_device(&self.device)?,
            None => {
                if p.prompts.is_empty() {
                    return Err(Error::invalid("no prompt given"));
                }
                self.embed_texts(&p.prompts, p.clip_skip, warnings)?
            }
        };
        let prompts = cond.dim(0)?;
        if !guided {
            return Ok(EncodedPrompt {
                embeds: repeat_batch(&cond, n)?,
                guided,
                batch: prompts * n,
            });
        }
        let uncond = match p.prompt_embeds.as_ref().and_then(|e| e.uncond.as_ref()) {
            Some(u) => u.to_device(&self.device)?,
            None => {
                let negs = Self::negative_prompts(p, prompts)?;
                // diffusers applies clip skip to the prompt only, not to the negative prompt.
                self.embed_texts(&negs, None, warnings)?
            }
        };
        if uncond.dims() != cond.dims() {
            return Err(Error::invalid(format!(
                "negative prompt embeddings {:?} do not match prompt embeddings {:?}",
                uncond.dims(),
                cond.dims()
            )));
        }
        let (uncond, cond) = (repeat_batch(&uncond, n)?, repeat_batch(&cond, n)?);
        Ok(EncodedPrompt {
            embeds: Tensor::cat(&[&uncond, &cond], 0)?,
            guided,
            batch: prompts * n,
        })
    }

    /// The negative prompts for `prompts` prompts: none (empty), one for all, or one each.
    fn negative_prompts(p: &GenerationParams, prompts: usize) -> Result<Vec<String>> {
        match p.negative_prompts.len() {
            0 => Ok(vec![String::new(); prompts]),
            1 => Ok(vec![p.negative_prompts[0].clone(); prompts]),
            k if k == prompts => Ok(p.negative_prompts.clone()),
            k => Err(Error::invalid(format!(
                "{k} negative prompts for {prompts} prompts; give one or one per prompt"
            ))),
        }
    }

    /// [`Self::encode_prompt`] with AUTOMATIC1111's prompt syntax: weighted chunks of 75
    /// tokens (see [`crate::prompt_weighting`]); prompts and negative prompts are padded with
    /// empty chunks to the same length. Clip skip applies to both, as in A1111.
    fn encode_prompt_a1111(&self, p: &GenerationParams, guided: bool) -> Result<EncodedPrompt> {
        if p.prompts.is_empty() {
            return Err(Error::invalid("no prompt given"));
        }
        let window = self.tokenizer.max_length();
        let mut texts = p.prompts.clone();
        if guided {
            texts = [Self::negative_prompts(p, p.prompts.len())?, texts].concat();
        }
        let chunked: Vec<Vec<prompt_weighting::Chunk>> = texts
            .iter()
            .map(|t| {
                prompt_weighting::chunks(&self.tokenizer, &self.expand_embedding_tokens(t), window)
            })
            .collect();
        let most = chunked.iter().map(Vec::len).max().unwrap_or(1);
        let empty = prompt_weighting::chunks(&self.tokenizer, "", window).remove(0);
        let mut rows = Vec::with_capacity(texts.len());
        for mut chunks in chunked {
            chunks.resize(most, empty.clone());
            let ids: Vec<i64> = chunks
                .iter()
                .flat_map(|c| c.ids.iter().map(|&i| i64::from(i)))
                .collect();
            let ids = Tensor::from_vec(ids, (most, window), &self.device)?;
            let z = self.encode_ids(&ids, p.clip_skip)?;
            let parts = chunks
                .iter()
                .enumerate()
                .map(|(k, c)| prompt_weighting::apply_weights(&z.i(k..k + 1)?, &c.weights))
                .collect::<Result<Vec<_>>>()?;
            rows.push(Tensor::cat(&parts, 1)?);
        }
        let n = p.num_images_per_prompt;
        let b = p.prompts.len();
        let embeds = if guided {
            let uncond = repeat_batch(&Tensor::cat(&rows[..b], 0)?, n)?;
            let cond = repeat_batch(&Tensor::cat(&rows[b..], 0)?, n)?;
            Tensor::cat(&[&uncond, &cond], 0)?
        } else {
            repeat_batch(&Tensor::cat(&rows, 0)?, n)?
        };
        Ok(EncodedPrompt {
            embeds,
            guided,
            batch: b * n,
        })
    }

    /// Text encoder output of token ids (B, T): the last hidden state, or with clip skip `k` the
    /// hidden state `k` layers before the last through the final layer norm.
    fn encode_ids(&self, ids: &Tensor, clip_skip: Option<usize>) -> Result<Tensor> {
        let out = self.text_encoder.forward(ids)?;
        match clip_skip {
            None => Ok(out.last_hidden_state),
            Some(k) => {
                let layers = out.hidden_states.len() - 1;
                if k > layers {
                    return Err(Error::invalid(format!(
                        "clip_skip {k} is more than the text encoder's {layers} layers"
                    )));
                }
                self.text_encoder
                    .final_layer_norm(&out.hidden_states[layers - k])
            }
        }
    }

    /// Text encoder embeddings (B, 77, hidden) of `texts` as diffusers' training scripts
    /// take them: the last layer's output for the padded token ids, nothing else.
    pub fn text_embeddings(&self, texts: &[String]) -> Result<Tensor> {
        self.embed_texts(texts, None, &mut Vec::new())
    }

    /// The padded token ids (B, 77) of `texts` that [`Self::text_embeddings`] encodes (what
    /// text-encoder training feeds its adapted encoder).
    pub fn prompt_token_ids(&self, texts: &[String]) -> Result<Tensor> {
        self.texts_to_ids(texts, &mut Vec::new())
    }

    /// Token ids (B, 77) of `texts`, multi-vector embedding tokens expanded first.
    fn texts_to_ids(&self, texts: &[String], warnings: &mut Vec<String>) -> Result<Tensor> {
        let texts: Vec<String> = texts
            .iter()
            .map(|t| self.expand_embedding_tokens(t))
            .collect();
        token_ids(&self.tokenizer, &texts, &self.device, warnings)
    }

    /// Text encoder embeddings (B, 77, hidden) of `texts` (multi-vector embedding tokens
    /// expanded first).
    fn embed_texts(
        &self,
        texts: &[String],
        clip_skip: Option<usize>,
        warnings: &mut Vec<String>,
    ) -> Result<Tensor> {
        let ids = self.texts_to_ids(texts, warnings)?;
        self.encode_ids(&ids, clip_skip)
    }

    /// The guided denoising loop every Stable Diffusion task runs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn denoise(
        &self,
        scheduler: &mut dyn Scheduler,
        timesteps: &[f64],
        latents: Tensor,
        prompt: &EncodedPrompt,
        guidance_scale: f64,
        extras: LoopExtras<'_>,
        generator: &mut Generator,
        callback: Option<&mut StepCallback<'_>>,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        crate::denoise::denoise(
            &self.unet,
            &self.device,
            scheduler,
            timesteps,
            latents,
            prompt,
            guidance_scale,
            extras,
            generator,
            callback,
            trace,
        )
    }

    /// The VAE as the pipeline runs it.
    pub(crate) fn vae_view(&self) -> VaeView<'_> {
        VaeView {
            vae: &self.vae,
            dtype: self.vae_dtype,
            device: &self.device,
        }
    }

    /// Decodes latents and builds the output (`output_type="np"` and `"pil"` at once).
    pub(crate) fn finish(
        &self,
        latents: Tensor,
        timings: Timings,
        warnings: Vec<String>,
        trace: Option<Trace>,
    ) -> Result<ImageOutput> {
        self.vae_view().finish(latents, timings, warnings, trace)
    }

    /// `scaling_factor * sample(vae.encode(image))` with the posterior noise drawn from
    /// `generator` (diffusers' `retrieve_latents(..., generator)`).
    pub(crate) fn encode_image(&self, image: &Tensor, generator: &mut Generator) -> Result<Tensor> {
        self.vae_view().encode(image, generator)
    }
}

/// Token ids `(texts, max_length)` of `texts`, truncated and padded to the tokenizer's length
/// (diffusers' `padding="max_length", truncation=True`), with diffusers' warning for each
/// truncated text.
pub(crate) fn token_ids(
    tokenizer: &ClipTokenizer,
    texts: &[String],
    device: &Device,
    warnings: &mut Vec<String>,
) -> Result<Tensor> {
    let max_len = tokenizer.max_length();
    let mut rows = Vec::with_capacity(texts.len() * max_len);
    for text in texts {
        let (ids, truncated) = tokenizer.encode_padded(text, max_len)?;
        if truncated {
            let all = tokenizer.encode(text);
            let removed = tokenizer.decode(&all[max_len - 1..all.len() - 1]);
            warnings.push(format!(
                "The following part of your input was truncated because CLIP can only handle \
                 sequences up to {max_len} tokens: {removed}"
            ));
        }
        rows.extend(ids.into_iter().map(i64::from));
    }
    Ok(Tensor::from_vec(rows, (texts.len(), max_len), device)?)
}

/// Each batch row repeated `n` times in place (`repeat(1, n, 1).view(B * n, ...)`).
pub(crate) fn repeat_batch(t: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(t.clone());
    }
    let b = t.dim(0)?;
    let rows: Vec<Tensor> = (0..b)
        .flat_map(|i| std::iter::repeat_n(i, n))
        .map(|i| t.i(i..i + 1))
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// What a textual-inversion file added to a pipeline: its token, its vector count and their
/// width (the first text encoder's, for SDXL files).
#[derive(Clone, Debug, PartialEq)]
pub struct AddedEmbedding {
    pub token: String,
    pub vectors: usize,
    pub width: usize,
}

/// The token an embedding file is added under: `token` if given, else the token the file names,
/// else the file's stem.
pub(crate) fn embedding_token(
    path: &Path,
    token: Option<&str>,
    ti: &diffuse_loaders::textual_inversion::TextualInversion,
) -> Result<String> {
    token
        .map(str::to_string)
        .or(ti.stored_token.clone())
        .or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .ok_or_else(|| Error::invalid(format!("{}: no token given", path.display())))
}

/// The tokens an `n`-vector embedding is added under: `token token_1 ... token_{n-1}`.
pub(crate) fn embedding_tokens(token: &str, n: usize) -> Vec<String> {
    std::iter::once(token.to_string())
        .chain((1..n).map(|i| format!("{token}_{i}")))
        .collect()
}

/// diffusers' `maybe_convert_prompt` over `multi` (token, vectors): each such token that
/// `tokenizer` finds in `text` is replaced (as plain text, case-sensitively) by its
/// [`embedding_tokens`].
pub(crate) fn expand_embedding_tokens(
    tokenizer: &ClipTokenizer,
    multi: &[(String, usize)],
    text: &str,
) -> String {
    let ids = tokenizer.encode(text);
    let mut out = text.to_string();
    for (token, n) in multi {
        let present = tokenizer
            .added_token_id(token)
            .is_some_and(|id| ids.contains(&id));
        if present {
            out = out.replace(token.as_str(), &embedding_tokens(token, *n).join(" "));
        }
    }
    out
}
