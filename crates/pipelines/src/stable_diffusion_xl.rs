//! `StableDiffusionXLPipeline` and `StableDiffusionXLImg2ImgPipeline` (the refiner is the
//! img2img pipeline with `requires_aesthetics_score`).
//!
//! ```text
//! h1 = clip_l(tokens_1).hidden_states[-2]                  # (B, 77, 768)
//! h2 = clip_bigg(tokens_2).hidden_states[-2]               # (B, 77, 1280)
//! embeds = cat([h1, h2], -1); pooled = clip_bigg.text_embeds  # projected EOS state
//! time_ids = original_size + crop_top_left + target_size   # or + (aesthetic_score,)
//! ... the Stable Diffusion loop, the UNet also taking (pooled, time_ids)
//! ```
//!
//! With no negative prompt and `force_zeros_for_empty_prompt`, the unconditional embeddings
//! are zeros. `denoising_end` stops the schedule early (the base of a base→refiner hand-off,
//! which keeps the latents); `denoising_start` starts the img2img schedule there from latents
//! without adding noise (the refiner).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use diffuse_core::{Error, Generator, Result};
use diffuse_loaders::single_file::Family;
use diffuse_models::clip_text::ClipTextConfig;
use diffuse_models::clip_text::{ClipTextModel, ClipTextModelWithProjection, ClipTextOutput};
use diffuse_models::clip_tokenizer::ClipTokenizer;
use diffuse_models::{AutoencoderKL, UNet2DConditionConfig, UNet2DConditionModel};
use diffuse_schedulers::Scheduler;
use image::RgbImage;

use crate::check_sampling;
use crate::controlnet::PreparedControl;
use crate::denoise::{
    denoise, guidance_enabled, initial_noise, timestep_cutoff, LoopExtras, VaeView,
};
use crate::image_processor::{default_size, preprocess_image};
use crate::img2img::strength_timesteps;
use crate::inpaint::{check_inpaint_unet, prepare_inpaint, InpaintModels};
use crate::sources::{self, Adapters, Source};
use crate::stable_diffusion::{
    embedding_token, embedding_tokens, expand_embedding_tokens, repeat_batch, token_ids,
    AddedEmbedding, EncodedPrompt, GenerationParams, ImageOutput, Text2ImageRequest,
};
use crate::{Img2ImgRequest, InpaintRequest, LoadOptions, StepCallback, Timings, Trace};

/// The SDXL components; one value serves text-to-image and image-to-image.
pub struct StableDiffusionXLPipeline {
    pub class_name: String,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// CLIP ViT-L; absent in the refiner.
    pub text_encoder: Option<ClipTextModel>,
    pub tokenizer: Option<ClipTokenizer>,
    /// OpenCLIP ViT-bigG with its projection.
    pub text_encoder_2: ClipTextModelWithProjection,
    pub tokenizer_2: ClipTokenizer,
    /// The configured scheduler; each run works on a fresh copy of it.
    pub scheduler: Box<dyn Scheduler>,
    pub device: Device,
    pub dtype: DType,
    /// The VAE's dtype (f32 when the config asks to upcast an f16 pipeline).
    pub vae_dtype: DType,
    /// `model_index.json`: no negative prompt means zero unconditional embeddings.
    pub force_zeros_for_empty_prompt: bool,
    /// `model_index.json`: the refiner's time ids end with an aesthetic score instead of the
    /// target size.
    pub requires_aesthetics_score: bool,
    /// Textual-inversion tokens with more than one vector, and how many.
    pub multi_vector_tokens: Vec<(String, usize)>,
}

/// The SDXL-only settings of a run (diffusers' `__call__` arguments of the same names).
#[derive(Clone, Debug)]
pub struct SdxlOptions {
    /// Prompts for the second text encoder; empty: the prompts.
    pub prompts_2: Vec<String>,
    /// Negative prompts for the second text encoder; empty: the negative prompts.
    pub negative_prompts_2: Vec<String>,
    /// `(height, width)`; default: the output size.
    pub original_size: Option<(usize, usize)>,
    /// `(top, left)`.
    pub crops_coords_top_left: (usize, usize),
    /// `(height, width)`; default: the output size.
    pub target_size: Option<(usize, usize)>,
    pub negative_original_size: Option<(usize, usize)>,
    pub negative_crops_coords_top_left: (usize, usize),
    pub negative_target_size: Option<(usize, usize)>,
    /// Refiner (`requires_aesthetics_score`) only.
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
    /// img2img: start at this share of the schedule, from the given latents as they are.
    pub denoising_start: Option<f64>,
    /// Stop at this share of the schedule (then decode, or hand the latents to a refiner).
    pub denoising_end: Option<f64>,
}

impl Default for SdxlOptions {
    fn default() -> Self {
        Self {
            prompts_2: vec![],
            negative_prompts_2: vec![],
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            negative_original_size: None,
            negative_crops_coords_top_left: (0, 0),
            negative_target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
            denoising_start: None,
            denoising_end: None,
        }
    }
}

/// The prompt embeddings of an SDXL run, each repeated per image (diffusers' `encode_prompt`
/// outputs).
#[derive(Clone, Debug)]
pub struct SdxlPromptEmbeds {
    /// `(N, 77, 768 + 1280)`.
    pub prompt_embeds: Tensor,
    /// Only with guidance.
    pub negative_prompt_embeds: Option<Tensor>,
    /// `(N, 1280)`.
    pub pooled_prompt_embeds: Tensor,
    pub negative_pooled_prompt_embeds: Option<Tensor>,
}

impl SdxlPromptEmbeds {
    fn guided(&self) -> bool {
        self.negative_prompt_embeds.is_some()
    }

    fn batch(&self) -> Result<usize> {
        Ok(self.prompt_embeds.dim(0)?)
    }

    /// `[negative; positive]` when guided.
    fn stacked(pos: &Tensor, neg: &Option<Tensor>) -> Result<Tensor> {
        Ok(match neg {
            Some(n) => Tensor::cat(&[n, pos], 0)?,
            None => pos.clone(),
        })
    }

    fn encoded(&self) -> Result<EncodedPrompt> {
        Ok(EncodedPrompt {
            embeds: Self::stacked(&self.prompt_embeds, &self.negative_prompt_embeds)?,
            guided: self.guided(),
            batch: self.batch()?,
        })
    }
}

/// Latents at the end of a run, before decoding (diffusers' `output_type="latent"`).
pub struct LatentOutput {
    pub latents: Tensor,
    pub timings: Timings,
    pub warnings: Vec<String>,
    pub trace: Option<Trace>,
}

/// A run with its prompt encoded.
struct Begun {
    embeds: SdxlPromptEmbeds,
    prompt: EncodedPrompt,
    timings: Timings,
    warnings: Vec<String>,
}

/// A run ready for the denoising loop.
struct LoopRun<'a> {
    scheduler: Box<dyn Scheduler>,
    timesteps: Vec<f64>,
    latents: Tensor,
    prompt: EncodedPrompt,
    extras: LoopExtras<'a>,
    generator: Generator,
    timings: Timings,
    warnings: Vec<String>,
}

/// Where image-to-image starts.
#[derive(Clone, Copy, Debug)]
pub enum InitImage<'a> {
    /// An image, encoded by the VAE.
    Rgb(&'a RgbImage),
    /// Latents already in the UNet's space (a base run's output for the refiner).
    Latents(&'a Tensor),
}

/// Errors unless `v` is in (0, 1).
fn check_fraction(name: &str, v: Option<f64>) -> Result<()> {
    match v {
        Some(x) if !(x > 0.0 && x < 1.0) => Err(Error::invalid(format!(
            "{name} must be between 0 and 1 (exclusive), got {x}"
        ))),
        _ => Ok(()),
    }
}

impl StableDiffusionXLPipeline {
    /// Loads the components from a folder (`text_encoder/` and `tokenizer/` when it has them:
    /// the refiner has not) or an SGM-layout single file, with `opts.loras` fused in. `flags`: `force_zeros_for_empty_prompt`, `requires_aesthetics_score`.
    pub(crate) fn load_from(
        src: &Source,
        class_name: String,
        (force_zeros_for_empty_prompt, requires_aesthetics_score): (bool, bool),
        opts: &LoadOptions,
    ) -> Result<Self> {
        let variant = opts.variant.as_deref();
        let (dtype, device) = (opts.dtype, &opts.device);
        let adapters = Adapters::open(&opts.loras)?;
        let scheduler = src.scheduler(opts)?;
        let clip = |component: &str| -> Result<ClipTextConfig> {
            let cfg: ClipTextConfig = src.config(component)?;
            cfg.validate(&format!("{component} config"))?;
            Ok(cfg)
        };
        // The refiner has only the second (OpenCLIP bigG) encoder.
        let has_first_encoder = match src {
            Source::Folder(dir) => dir.join("text_encoder").is_dir(),
            Source::SingleFile { family, .. } => *family == Family::Sdxl,
        };
        let (text_encoder, tokenizer) = if has_first_encoder {
            let cfg = clip("text_encoder")?;
            let te = sources::build(
                src,
                &adapters,
                "text_encoder",
                variant,
                (cfg.num_hidden_layers, 0),
                dtype,
                device,
                |vb| ClipTextModel::new(vb, &cfg),
            )?;
            (Some(te), Some(src.tokenizer("tokenizer")?))
        } else {
            (None, None)
        };
        let cfg2 = clip("text_encoder_2")?;
        let text_encoder_2 = sources::build(
            src,
            &adapters,
            "text_encoder_2",
            variant,
            (cfg2.num_hidden_layers, 0),
            dtype,
            device,
            |vb| ClipTextModelWithProjection::new(vb, &cfg2),
        )?;
        let tokenizer_2 = src.tokenizer("tokenizer_2")?;
        let unet_cfg: UNet2DConditionConfig = src.config("unet")?;
        unet_cfg.validate()?;
        if unet_cfg.addition_embed_type.as_deref() != Some("text_time") {
            return Err(Error::invalid(format!(
                "{}: an SDXL pipeline needs a UNet with addition_embed_type \"text_time\"",
                src.path().display()
            )));
        }
        let unet = sources::build_unet(src, &adapters, &unet_cfg, opts)?;
        let (vae, vae_dtype) = sources::build_vae(src, &adapters, opts, true)?;
        adapters.finish()?;
        src.check_unclaimed(&[
            diffuse_loaders::single_file::UNET_PREFIX,
            diffuse_loaders::single_file::VAE_PREFIX,
            "conditioner.",
        ])?;
        Ok(Self {
            class_name,
            unet,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            scheduler,
            device: device.clone(),
            dtype,
            vae_dtype,
            force_zeros_for_empty_prompt,
            requires_aesthetics_score,
            multi_vector_tokens: Vec::new(),
        })
    }

    /// diffusers' SDXL textual inversion: a file with a `clip_l` and a `clip_g` table adds
    /// `token` (default: the file's own token, else its stem; `token_1` ... for further
    /// vectors) to both tokenizers and its vectors to the matching encoders (the refiner,
    /// which has only the second encoder, takes `clip_g`).
    pub fn load_textual_inversion(
        &mut self,
        path: &Path,
        token: Option<&str>,
    ) -> Result<AddedEmbedding> {
        let ti = diffuse_loaders::textual_inversion::TextualInversion::load(path)?;
        let token = embedding_token(path, token, &ti)?;
        let [clip_l, clip_g] = ti.vectors.as_slice() else {
            return Err(Error::invalid(format!(
                "{}: an SDXL embedding needs a clip_l and a clip_g table; this file has {}",
                path.display(),
                ti.vectors.len()
            )));
        };
        let n = clip_g.dim(0)?;
        if clip_l.dim(0)? != n {
            return Err(Error::invalid(format!(
                "{}: clip_l has {} vectors, clip_g {n}",
                path.display(),
                clip_l.dim(0)?
            )));
        }
        let tokens = embedding_tokens(&token, n);
        let bad = |e: &dyn std::fmt::Display| Error::invalid(format!("{}: {e}", path.display()));
        // Check everything before changing anything: a failure leaves the pipeline as it was.
        let add = |tok: &ClipTokenizer| -> Result<ClipTokenizer> {
            let mut tok = tok.clone();
            for t in &tokens {
                tok.add_token(t).map_err(|e| bad(&e))?;
            }
            Ok(tok)
        };
        let first = match (&self.text_encoder, &self.tokenizer) {
            (Some(te), Some(tok)) => {
                let mut te = te.clone();
                te.add_token_embeddings(clip_l).map_err(|e| bad(&e))?;
                Some((te, add(tok)?))
            }
            _ => None,
        };
        let mut te2 = self.text_encoder_2.clone();
        te2.add_token_embeddings(clip_g).map_err(|e| bad(&e))?;
        let tok2 = add(&self.tokenizer_2)?;
        if let Some((te, tok)) = first {
            self.text_encoder = Some(te);
            self.tokenizer = Some(tok);
        }
        self.text_encoder_2 = te2;
        self.tokenizer_2 = tok2;
        if n > 1 {
            self.multi_vector_tokens.push((token.clone(), n));
        }
        Ok(AddedEmbedding {
            token,
            vectors: n,
            width: clip_l.dim(1)?,
        })
    }

    /// `2 ** (len(vae.block_out_channels) - 1)`.
    pub fn vae_scale_factor(&self) -> usize {
        1 << self.vae.config().block_out_channels.len().saturating_sub(1)
    }

    /// The native image size `(height, width)` (1024² for SDXL base), or with ControlNets the
    /// first control image's.
    pub fn default_size(&self, p: &GenerationParams) -> Result<(usize, usize)> {
        let f = self.vae_scale_factor();
        if let Some(c) = &p.controlnet {
            if let Some(size) = c.default_size(f)? {
                return Ok(size);
            }
        }
        let (h, w) = self
            .unet
            .config()
            .sample_size
            .map(|s| s.hw())
            .unwrap_or((128, 128));
        Ok((h * f, w * f))
    }

    fn vae_view(&self) -> VaeView<'_> {
        VaeView {
            vae: &self.vae,
            dtype: self.vae_dtype,
            device: &self.device,
        }
    }

    /// The encoders' penultimate hidden states of `texts` (clip skip: `clip_skip` layers
    /// earlier), concatenated over the encoders, and the second encoder's projected pooled
    /// output.
    fn embed_texts(
        &self,
        texts: &[String],
        texts_2: &[String],
        clip_skip: Option<usize>,
        warnings: &mut Vec<String>,
    ) -> Result<(Tensor, Tensor)> {
        let skip = clip_skip.unwrap_or(0);
        let penultimate = |out: &ClipTextOutput| -> Result<Tensor> {
            let n = out.hidden_states.len();
            if skip + 2 > n {
                return Err(Error::invalid(format!(
                    "clip_skip {skip} is more than the text encoder's {} layers allow",
                    n - 1
                )));
            }
            Ok(out.hidden_states[n - 2 - skip].clone())
        };
        // Multi-vector embedding tokens written out, as diffusers' `maybe_convert_prompt`.
        let expand = |tok: &ClipTokenizer, texts: &[String]| -> Vec<String> {
            texts
                .iter()
                .map(|t| expand_embedding_tokens(tok, &self.multi_vector_tokens, t))
                .collect()
        };
        let mut parts = Vec::with_capacity(2);
        if let (Some(te), Some(tok)) = (&self.text_encoder, &self.tokenizer) {
            let ids = token_ids(tok, &expand(tok, texts), &self.device, warnings)?;
            parts.push(penultimate(&te.forward(&ids)?)?);
        }
        let texts_2 = expand(&self.tokenizer_2, texts_2);
        let ids = token_ids(&self.tokenizer_2, &texts_2, &self.device, warnings)?;
        let out = self.text_encoder_2.forward(&ids)?;
        parts.push(penultimate(&out.text)?);
        Ok((Tensor::cat(&parts, 2)?, out.text_embeds))
    }

    /// diffusers' `encode_prompt` of the SDXL pipelines.
    pub fn encode_prompt(
        &self,
        p: &GenerationParams,
        opts: &SdxlOptions,
        warnings: &mut Vec<String>,
    ) -> Result<SdxlPromptEmbeds> {
        if p.num_images_per_prompt == 0 {
            return Err(Error::invalid("num_images_per_prompt must be at least 1"));
        }
        let n = p.num_images_per_prompt;
        let guided = guidance_enabled(p.guidance_scale, &self.unet);
        let given = p.prompt_embeds.as_ref();
        let (cond, pooled) = match given {
            Some(e) => {
                let pooled = e.pooled.as_ref().ok_or_else(|| {
                    Error::invalid("SDXL prompt embeddings need their pooled embeddings too")
                })?;
                (
                    e.cond.to_device(&self.device)?,
                    pooled.to_device(&self.device)?,
                )
            }
            None => {
                if p.prompts.is_empty() {
                    return Err(Error::invalid("no prompt given"));
                }
                let prompts_2 = per_prompt(&opts.prompts_2, &p.prompts, "second prompts")?;
                self.embed_texts(&p.prompts, &prompts_2, p.clip_skip, warnings)?
            }
        };
        let prompts = cond.dim(0)?;
        let mut out = SdxlPromptEmbeds {
            prompt_embeds: repeat_batch(&cond, n)?,
            negative_prompt_embeds: None,
            pooled_prompt_embeds: repeat_batch(&pooled, n)?,
            negative_pooled_prompt_embeds: None,
        };
        if !guided {
            return Ok(out);
        }
        let (uncond, uncond_pooled) = match given.and_then(|e| e.uncond.as_ref()) {
            Some(u) => {
                let up = given
                    .and_then(|e| e.uncond_pooled.as_ref())
                    .ok_or_else(|| {
                        Error::invalid(
                            "SDXL negative prompt embeddings need their pooled embeddings too",
                        )
                    })?;
                (u.to_device(&self.device)?, up.to_device(&self.device)?)
            }
            None if p.negative_prompts.is_empty() && self.force_zeros_for_empty_prompt => {
                (cond.zeros_like()?, pooled.zeros_like()?)
            }
            None => {
                let blank = [String::new()];
                let neg = if p.negative_prompts.is_empty() {
                    &blank[..]
                } else {
                    &p.negative_prompts[..]
                };
                let negs = broadcast_prompts(neg, prompts, "negative prompts")?;
                let negs_2 =
                    per_prompt(&opts.negative_prompts_2, &negs, "second negative prompts")?;
                // diffusers applies clip skip to the prompt only.
                self.embed_texts(&negs, &negs_2, None, warnings)?
            }
        };
        if uncond.dims() != cond.dims() {
            return Err(Error::invalid(format!(
                "negative prompt embeddings {:?} do not match prompt embeddings {:?}",
                uncond.dims(),
                cond.dims()
            )));
        }
        out.negative_prompt_embeds = Some(repeat_batch(&uncond, n)?);
        out.negative_pooled_prompt_embeds = Some(repeat_batch(&uncond_pooled, n)?);
        Ok(out)
    }

    /// Checks that `len` time ids and the pooled width add up to the UNet's added-embedding
    /// input (diffusers' check in `_get_add_time_ids`).
    fn check_time_ids(&self, len: usize, pooled_dim: usize) -> Result<()> {
        let cfg = self.unet.config();
        let per = cfg.addition_time_embed_dim.unwrap_or(0);
        let expected = cfg.projection_class_embeddings_input_dim.unwrap_or(0);
        let passed = per * len + pooled_dim;
        if expected == passed {
            return Ok(());
        }
        let hint = if expected == passed + per {
            " (this UNet takes an aesthetic score: set requires_aesthetics_score in model_index.json)"
        } else if passed == expected + per {
            " (this UNet takes no aesthetic score: unset requires_aesthetics_score in model_index.json)"
        } else {
            " (check the UNet's addition_time_embed_dim and text_encoder_2's projection_dim)"
        };
        Err(Error::invalid(format!(
            "the UNet expects an added time embedding of {expected} values but {passed} were made{hint}"
        )))
    }

    /// `(text_embeds, time_ids)` rows for the UNet: `[negative; positive]` per diffusers'
    /// ordering when guided.
    fn added_conditioning(
        &self,
        embeds: &SdxlPromptEmbeds,
        time_ids: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let text = SdxlPromptEmbeds::stacked(
            &embeds.pooled_prompt_embeds,
            &embeds.negative_pooled_prompt_embeds,
        )?;
        Ok((text, time_ids))
    }

    /// Text-to-image time ids: diffusers concatenates `[negative, positive]` once and repeats
    /// that pair per image.
    fn text2img_time_ids(
        &self,
        (height, width): (usize, usize),
        opts: &SdxlOptions,
        embeds: &SdxlPromptEmbeds,
    ) -> Result<Tensor> {
        let original = opts.original_size.unwrap_or((height, width));
        let target = opts.target_size.unwrap_or((height, width));
        let ids = |o: (usize, usize), c: (usize, usize), t: (usize, usize)| {
            [o.0, o.1, c.0, c.1, t.0, t.1].map(|v| v as f32).to_vec()
        };
        let pos = ids(original, opts.crops_coords_top_left, target);
        let neg = match (opts.negative_original_size, opts.negative_target_size) {
            (Some(o), Some(t)) => ids(o, opts.negative_crops_coords_top_left, t),
            _ => pos.clone(),
        };
        self.check_time_ids(pos.len(), embeds.pooled_prompt_embeds.dim(1)?)?;
        let pair: Vec<Vec<f32>> = if embeds.guided() {
            vec![neg, pos]
        } else {
            vec![pos]
        };
        self.time_ids_tensor(
            std::iter::repeat_n(pair, embeds.batch()?)
                .flatten()
                .collect(),
        )
    }

    /// Image-to-image time ids (with the aesthetic scores for the refiner), `[negative rows;
    /// positive rows]` when guided.
    fn img2img_time_ids(
        &self,
        (height, width): (usize, usize),
        opts: &SdxlOptions,
        embeds: &SdxlPromptEmbeds,
    ) -> Result<Tensor> {
        let original = opts.original_size.unwrap_or((height, width));
        let target = opts.target_size.unwrap_or((height, width));
        let neg_original = opts.negative_original_size.unwrap_or(original);
        let neg_target = opts.negative_target_size.unwrap_or(target);
        let (c, nc) = (
            opts.crops_coords_top_left,
            opts.negative_crops_coords_top_left,
        );
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (pos, neg) = if self.requires_aesthetics_score {
            (
                f(&[
                    original.0 as f64,
                    original.1 as f64,
                    c.0 as f64,
                    c.1 as f64,
                    opts.aesthetic_score,
                ]),
                f(&[
                    neg_original.0 as f64,
                    neg_original.1 as f64,
                    nc.0 as f64,
                    nc.1 as f64,
                    opts.negative_aesthetic_score,
                ]),
            )
        } else {
            let ids = |o: (usize, usize), t: (usize, usize)| {
                // diffusers uses the positive crop for the negative ids here.
                [o.0, o.1, c.0, c.1, t.0, t.1].map(|v| v as f32).to_vec()
            };
            (ids(original, target), ids(neg_original, neg_target))
        };
        self.check_time_ids(pos.len(), embeds.pooled_prompt_embeds.dim(1)?)?;
        let b = embeds.batch()?;
        let mut rows: Vec<Vec<f32>> = Vec::new();
        if embeds.guided() {
            rows.extend(std::iter::repeat_n(neg, b));
        }
        rows.extend(std::iter::repeat_n(pos, b));
        self.time_ids_tensor(rows)
    }

    fn time_ids_tensor(&self, rows: Vec<Vec<f32>>) -> Result<Tensor> {
        let (n, k) = (rows.len(), rows.first().map_or(0, |r| r.len()));
        let data: Vec<f32> = rows.into_iter().flatten().collect();
        Ok(Tensor::from_vec(data, (n, k), &self.device)?)
    }

    fn check_size(&self, height: usize, width: usize) -> Result<()> {
        crate::check_image_size(height, width, self.vae_scale_factor())
    }

    /// The loop extras: added conditioning and the ControlNets.
    fn extras(
        &self,
        p: &GenerationParams,
        size: (usize, usize),
        prompt: &EncodedPrompt,
        text_time: (Tensor, Tensor),
    ) -> Result<LoopExtras<'static>> {
        let control = PreparedControl::prepare(
            p.controlnet.as_ref(),
            &self.unet,
            size,
            prompt,
            &self.device,
        )?;
        Ok(LoopExtras {
            text_time: Some(text_time),
            control,
            ..Default::default()
        })
    }

    /// The checks every task starts with, then the timed prompt encoding.
    fn begin(&self, p: &GenerationParams, opts: &SdxlOptions) -> Result<Begun> {
        check_sampling(p.steps, &p.checked_numbers())?;
        check_fraction("denoising_end", opts.denoising_end)?;
        let mut timings = Timings::default();
        let mut warnings = Vec::new();
        let t0 = Instant::now();
        let embeds = self.encode_prompt(p, opts, &mut warnings)?;
        let prompt = embeds.encoded()?;
        timings.text_encode = t0.elapsed();
        Ok(Begun {
            embeds,
            prompt,
            timings,
            warnings,
        })
    }

    /// Text-to-image up to the final latents (decode them with [`Self::decode`], or hand them
    /// to a refiner after a `denoising_end`).
    pub fn text_to_latents(
        &self,
        req: &Text2ImageRequest,
        opts: &SdxlOptions,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<LatentOutput> {
        let p = &req.params;
        let (dh, dw) = self.default_size(p)?;
        let (height, width) = (req.height.unwrap_or(dh), req.width.unwrap_or(dw));
        self.check_size(height, width)?;
        let Begun {
            embeds,
            prompt,
            timings,
            warnings,
        } = self.begin(p, opts)?;

        let scheduler = p.fresh_scheduler(self.scheduler.as_ref())?;
        let mut generator = Generator::manual_seed(p.seed).with_shard(p.shard);
        let f = self.vae_scale_factor();
        let shape = (
            prompt.batch,
            self.unet.config().in_channels,
            height / f,
            width / f,
        );
        let noise = initial_noise(req.latents.as_ref(), shape, &mut generator, &self.device)?;
        let latents = (noise * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        let time_ids = self.text2img_time_ids((height, width), opts, &embeds)?;
        let text_time = self.added_conditioning(&embeds, time_ids)?;
        let extras = self.extras(p, (height, width), &prompt, text_time)?;
        let run = LoopRun {
            scheduler,
            timesteps,
            latents,
            prompt,
            extras,
            generator,
            timings,
            warnings,
        };
        self.run_loop(p, opts, run, callback)
    }

    /// The denoising loop of a prepared run, stopped at `denoising_end`.
    fn run_loop(
        &self,
        p: &GenerationParams,
        opts: &SdxlOptions,
        mut run: LoopRun<'_>,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<LatentOutput> {
        if let Some(control) = run.extras.control.as_mut() {
            control.set_schedule_len(run.timesteps.len());
        }
        if let Some(end) = opts.denoising_end {
            let cutoff = timestep_cutoff(run.scheduler.as_ref(), end);
            let keep = run.timesteps.iter().filter(|&&t| t >= cutoff).count();
            run.timesteps.truncate(keep);
        }
        let t = Instant::now();
        let mut trace = p.record_trace.then(Trace::default);
        let latents = denoise(
            &self.unet,
            &self.device,
            run.scheduler.as_mut(),
            &run.timesteps,
            run.latents,
            &run.prompt,
            p.guidance_scale,
            run.extras,
            &mut run.generator,
            callback,
            trace.as_mut(),
        )?;
        run.timings.denoise = t.elapsed();
        Ok(LatentOutput {
            latents,
            timings: run.timings,
            warnings: run.warnings,
            trace,
        })
    }

    /// Text-to-image.
    pub fn text_to_image(
        &self,
        req: &Text2ImageRequest,
        opts: &SdxlOptions,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        self.decode(self.text_to_latents(req, opts, callback)?)
    }

    /// Decodes the latents of a run into images (the VAE upcast to f32 when its config asks).
    pub fn decode(&self, out: LatentOutput) -> Result<ImageOutput> {
        self.vae_view()
            .finish(out.latents, out.timings, out.warnings, out.trace)
    }

    /// Image-to-image.
    pub fn img2img(
        &self,
        req: &Img2ImgRequest,
        opts: &SdxlOptions,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        let out = self.img2img_latents(
            &req.params,
            InitImage::Rgb(&req.image),
            req.strength,
            opts,
            callback,
        )?;
        self.decode(out)
    }

    /// Image-to-image up to the final latents. With `denoising_start` the schedule starts
    /// there (`strength` is ignored) and no noise is added: the refiner's half of a
    /// base→refiner hand-off, from the base's latents.
    pub fn img2img_latents(
        &self,
        p: &GenerationParams,
        init: InitImage<'_>,
        strength: f64,
        opts: &SdxlOptions,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<LatentOutput> {
        check_fraction("denoising_start", opts.denoising_start)?;
        if let (Some(s), Some(e)) = (opts.denoising_start, opts.denoising_end) {
            if s >= e {
                return Err(Error::invalid(format!(
                    "denoising_start {s} must be smaller than denoising_end {e}"
                )));
            }
        }
        let Begun {
            embeds,
            prompt,
            mut timings,
            warnings,
        } = self.begin(p, opts)?;

        let t1 = Instant::now();
        let mut scheduler = p.fresh_scheduler(self.scheduler.as_ref())?;
        let timesteps = match opts.denoising_start {
            None => strength_timesteps(scheduler.as_mut(), p.steps, strength)?,
            Some(start) => {
                let cutoff = timestep_cutoff(scheduler.as_ref(), start);
                let all = scheduler.timesteps().to_vec();
                let mut n = all.iter().filter(|&&t| t < cutoff).count();
                // A second-order scheduler must not stop between its two evaluations.
                if scheduler.order() == 2 && n % 2 == 0 {
                    n += 1;
                }
                let begin = all.len().saturating_sub(n);
                if begin >= all.len() {
                    return Err(Error::invalid(format!(
                        "denoising_start {start} with {} steps leaves no denoising step",
                        p.steps
                    )));
                }
                scheduler.set_begin_index(begin);
                all[begin..].to_vec()
            }
        };

        let mut generator = Generator::manual_seed(p.seed).with_shard(p.shard);
        let init_latents = match init {
            InitImage::Latents(l) => {
                let c = self.unet.config().in_channels;
                if l.rank() != 4 || l.dim(1)? != c {
                    return Err(Error::invalid(format!(
                        "init latents must be (batch, {c}, h, w), got {:?}",
                        l.dims()
                    )));
                }
                l.to_device(&self.device)?.to_dtype(DType::F32)?
            }
            InitImage::Rgb(img) => {
                let f = self.vae_scale_factor();
                let (h, w) = default_size(img.width(), img.height(), f)?;
                let image = preprocess_image(img, h, w, &self.device)?;
                self.vae_view().encode(&image, &mut generator)?
            }
        };
        let b = prompt.batch;
        let rows = init_latents.dim(0)?;
        if b % rows != 0 {
            return Err(Error::invalid(format!(
                "{rows} init images cannot be spread over {b} images"
            )));
        }
        let init_latents = Tensor::cat(&vec![&init_latents; b / rows], 0)?;
        let latents = if opts.denoising_start.is_none() {
            let noise = generator.randn_batch(init_latents.shape().clone(), &self.device)?;
            scheduler.add_noise(&init_latents, &noise, &vec![timesteps[0]; b])?
        } else {
            init_latents
        };
        let (_, _, lh, lw) = latents.dims4()?;
        let size = (lh * self.vae_scale_factor(), lw * self.vae_scale_factor());
        let time_ids = self.img2img_time_ids(size, opts, &embeds)?;
        let text_time = self.added_conditioning(&embeds, time_ids)?;
        let extras = self.extras(p, size, &prompt, text_time)?;
        timings.image_encode = t1.elapsed();
        let run = LoopRun {
            scheduler,
            timesteps,
            latents,
            prompt,
            extras,
            generator,
            timings,
            warnings,
        };
        self.run_loop(p, opts, run, callback)
    }

    /// Inpainting (`StableDiffusionXLInpaintPipeline`), with a 9-channel inpainting UNet or any
    /// 4-channel one; the default size is the model's native one, the image resized to it.
    pub fn inpaint(
        &self,
        req: &InpaintRequest,
        opts: &SdxlOptions,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        self.decode(self.inpaint_latents(req, opts, callback)?)
    }

    /// Inpainting up to the final latents.
    pub fn inpaint_latents(
        &self,
        req: &InpaintRequest,
        opts: &SdxlOptions,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<LatentOutput> {
        let p = &req.params;
        if opts.denoising_start.is_some() {
            return Err(Error::invalid(
                "denoising_start is not supported for SDXL inpainting; use strength",
            ));
        }
        check_inpaint_unet(&self.unet, &self.vae)?;
        let Begun {
            embeds,
            prompt,
            mut timings,
            warnings,
        } = self.begin(p, opts)?;

        let t1 = Instant::now();
        let (dh, dw) = self.default_size(p)?;
        let size = (req.height.unwrap_or(dh), req.width.unwrap_or(dw));
        self.check_size(size.0, size.1)?;
        let models = InpaintModels {
            unet: &self.unet,
            vae: self.vae_view(),
            scheduler: self.scheduler.as_ref(),
        };
        let prepared = prepare_inpaint(&models, req, size, &prompt, opts.denoising_end)?;
        let time_ids = self.img2img_time_ids(size, opts, &embeds)?;
        let mut extras = prepared.extras;
        extras.text_time = Some(self.added_conditioning(&embeds, time_ids)?);
        timings.image_encode = t1.elapsed();
        let run = LoopRun {
            scheduler: prepared.scheduler,
            timesteps: prepared.timesteps,
            latents: prepared.latents,
            prompt,
            extras,
            generator: prepared.generator,
            timings,
            warnings,
        };
        self.run_loop(p, opts, run, callback)
    }
}

/// `given` for each of `count` rows: empty → `fallback`, one → repeated, else one per row.
fn per_prompt(given: &[String], fallback: &[String], what: &str) -> Result<Vec<String>> {
    if given.is_empty() {
        return Ok(fallback.to_vec());
    }
    broadcast_prompts(given, fallback.len(), what)
}

/// One text for all `count` rows, or one per row.
fn broadcast_prompts(given: &[String], count: usize, what: &str) -> Result<Vec<String>> {
    match given.len() {
        1 => Ok(vec![given[0].clone(); count]),
        k if k == count => Ok(given.to_vec()),
        k => Err(Error::invalid(format!(
            "{k} {what} for {count} prompts; give one or one per prompt"
        ))),
    }
}
