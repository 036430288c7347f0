//! One generation task as a front end (the `diffuse` CLI, the HTTP server) takes it: the user's
//! settings with the pipeline's defaults filled in, the run, and the images with their A1111
//! infotext. Front ends that go through [`run_task`] write the same PNG bytes for the same seed
//! and settings.
//!
//! [`describe`] reads what a pipeline folder generates (kind, classes, native size) from its
//! configs alone, so a server can check a request before any model is loaded.

use std::ops::Range;
use std::path::Path;

use diffuse_core::{BatchShard, Error, Result};
use image::{DynamicImage, GrayImage, RgbImage};

use crate::png_info::{encode_png, InfoText};
use crate::prompt_weighting::PromptSyntax;
use crate::{
    ControlNetRequest, FlowText2ImageRequest, GenerationParams, ImageOutput, Img2ImgRequest,
    InpaintRequest, ModelIndex, Pipeline, SdxlOptions, StableDiffusionPipeline,
    StableDiffusionXLPipeline, StepCallback, Text2ImageRequest, Timings, UnconditionalRequest,
};

/// Default denoising steps of DDPM/DDIM models sampled with DDPM's ancestral steps or DDIM's.
pub const DDPM_STEPS: usize = 50;
/// Default denoising steps of DDPM/DDIM models sampled with any other scheduler (the
/// multistep solvers, Euler, ...): on the bundled Fashion-MNIST model DPM-Solver++ at 20
/// steps scores as it does at 50 (see its README).
pub const SOLVER_STEPS: usize = 20;

/// Default denoising steps of a DDPM/DDIM pipeline that samples with `scheduler` (a diffusers
/// scheduler class).
pub fn unconditional_steps(scheduler: &str) -> usize {
    match scheduler {
        "DDPMScheduler" | "DDIMScheduler" => DDPM_STEPS,
        _ => SOLVER_STEPS,
    }
}
/// Default denoising steps of Stable Diffusion models.
pub const SD_STEPS: usize = 25;
/// Default guidance of class-conditional DDPM models: scale 5 at timesteps 100 to 550 (of the
/// 1000 of training) only. For the bundled Fashion-MNIST model it has every class's samples
/// classified as that class at least 90% of the time (shirts are the hard case) at a Fréchet
/// distance of 13–14, on three seeds; guiding up to timestep 600 cost 4.8 more in FD for the
/// same accuracy (see its README).
pub const CLASS_GUIDANCE: f64 = 5.0;
pub const CLASS_GUIDANCE_INTERVAL: (f64, f64) = (100.0, 550.0);
/// Default guidance scale of Stable Diffusion models.
pub const SD_GUIDANCE: f64 = 7.5;
/// diffusers' defaults of the transformer pipelines: `(steps, guidance)`.
pub const SD3_DEFAULTS: (usize, f64) = (28, 7.0);
pub const FLUX_DEFAULTS: (usize, f64) = (28, 3.5);
pub const DIT_DEFAULTS: (usize, f64) = (50, 4.0);

/// What kind of pipeline a folder holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipelineKind {
    /// DDPM/DDIM over a `UNet2DModel` (maybe class-conditional); fixed image size.
    Unconditional,
    /// Stable Diffusion (1.x/2.x and SDXL): text-to-image, img2img, inpainting at any
    /// multiple of the VAE factor.
    StableDiffusion,
    /// Stable Diffusion 3: text-to-image.
    StableDiffusion3,
    /// Flux (dev or schnell): text-to-image.
    Flux,
    /// DiT: class-conditional at the native size; the classes are ids or `id2label` names.
    DiT,
}

impl PipelineKind {
    /// `(steps, guidance)` when the user gives none (`class_conditional`: a DDPM model with
    /// classes; `scheduler`: the scheduler class a DDPM model samples with, none: DDPM's).
    pub fn defaults(self, class_conditional: bool, scheduler: Option<&str>) -> (usize, f64) {
        let ddpm_steps = scheduler.map_or(DDPM_STEPS, unconditional_steps);
        match self {
            Self::Unconditional if class_conditional => (ddpm_steps, CLASS_GUIDANCE),
            Self::Unconditional => (ddpm_steps, 1.0),
            Self::StableDiffusion => (SD_STEPS, SD_GUIDANCE),
            Self::StableDiffusion3 => SD3_DEFAULTS,
            Self::Flux => FLUX_DEFAULTS,
            Self::DiT => DIT_DEFAULTS,
        }
    }
}

/// What a pipeline folder generates, read from its configs without loading weights.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineInfo {
    /// `model_index.json`'s `_class_name`.
    pub class_name: String,
    pub kind: PipelineKind,
    /// Class names of a class-conditional model (empty otherwise).
    pub class_names: Vec<String>,
    /// Native `(height, width)`.
    pub size: (usize, usize),
    /// Image sides must be multiples of this (Stable Diffusion); `None`: only the native size.
    pub size_multiple: Option<usize>,
    /// Image channels (1 or 3).
    pub channels: usize,
    /// The scheduler class a DDPM/DDIM folder samples with (none for the other kinds).
    pub scheduler: Option<String>,
}

impl PipelineInfo {
    pub fn default_steps(&self) -> usize {
        self.default_steps_for(None)
    }

    /// The default steps when sampling with `scheduler` (a diffusers class) in place of the
    /// folder's own.
    pub fn default_steps_for(&self, scheduler: Option<&str>) -> usize {
        let scheduler = scheduler.or(self.scheduler.as_deref());
        self.kind
            .defaults(!self.class_names.is_empty(), scheduler)
            .0
    }

    pub fn default_guidance(&self) -> f64 {
        self.kind.defaults(!self.class_names.is_empty(), None).1
    }
}

/// Reads `model_index.json` and the UNet (and VAE) configs of a pipeline folder.
pub fn describe(dir: &Path) -> Result<PipelineInfo> {
    let index = ModelIndex::read(dir)?;
    match index.class.as_str() {
        "DDPMPipeline" | "DDIMPipeline" => {
            let cfg: diffuse_models::UNet2DConfig =
                diffuse_loaders::read_config(&dir.join("unet/config.json"))?;
            // As the loader does: the last class embedding is the null class.
            let class_names = match cfg.num_class_embeds.map(|k| k.saturating_sub(1)) {
                None => Vec::new(),
                Some(k) => index
                    .class_names()?
                    .unwrap_or_else(|| (0..k).map(|i| i.to_string()).collect()),
            };
            // As the loader does: DDIMPipeline samples with DDIM whatever its config names.
            let scheduler = if index.class == "DDIMPipeline" {
                "DDIMScheduler".to_string()
            } else {
                let path = dir.join("scheduler/scheduler_config.json");
                diffuse_schedulers::SchedulerConfig::from_file(&path)?
                    .class_name()
                    .unwrap_or("DDPMScheduler")
                    .to_string()
            };
            Ok(PipelineInfo {
                scheduler: Some(scheduler),
                class_name: index.class,
                kind: PipelineKind::Unconditional,
                class_names,
                size: cfg.sample_size.map(|s| s.hw()).unwrap_or((32, 32)),
                size_multiple: None,
                channels: cfg.in_channels,
            })
        }
        "StableDiffusionPipeline"
        | "StableDiffusionImg2ImgPipeline"
        | "StableDiffusionInpaintPipeline"
        | "StableDiffusionXLPipeline"
        | "StableDiffusionXLImg2ImgPipeline"
        | "StableDiffusionXLInpaintPipeline" => {
            let unet: diffuse_models::UNet2DConditionConfig =
                diffuse_loaders::read_config(&dir.join("unet/config.json"))?;
            let vae: diffuse_models::AutoencoderKLConfig =
                diffuse_loaders::read_config(&dir.join("vae/config.json"))?;
            let f = 1 << vae.block_out_channels.len().saturating_sub(1);
            let (h, w) = unet.sample_size.map(|s| s.hw()).unwrap_or((64, 64));
            Ok(PipelineInfo {
                class_name: index.class,
                kind: PipelineKind::StableDiffusion,
                class_names: Vec::new(),
                size: (h * f, w * f),
                size_multiple: Some(f),
                channels: 3,
                scheduler: None,
            })
        }
        "StableDiffusion3Pipeline" | "FluxPipeline" | "DiTPipeline" => {
            let vae: diffuse_models::AutoencoderKLConfig =
                diffuse_loaders::read_config(&dir.join("vae/config.json"))?;
            let f = 1 << vae.block_out_channels.len().saturating_sub(1);
            let transformer = dir.join("transformer/config.json");
            let (kind, side, multiple, class_names) = match index.class.as_str() {
                "StableDiffusion3Pipeline" => {
                    let cfg: diffuse_models::transformer_sd3::SD3Transformer2DConfig =
                        diffuse_loaders::read_config(&transformer)?;
                    let multiple = Some(f * cfg.patch_size);
                    (
                        PipelineKind::StableDiffusion3,
                        cfg.sample_size,
                        multiple,
                        vec![],
                    )
                }
                // FluxPipeline's default_sample_size.
                "FluxPipeline" => (PipelineKind::Flux, 128, Some(2 * f), vec![]),
                _ => {
                    let cfg: diffuse_models::transformer_dit::DiTTransformer2DConfig =
                        diffuse_loaders::read_config(&transformer)?;
                    let names = crate::dit::class_names(&index.json, cfg.num_classes())
                        .map_err(|e| Error::invalid(format!("{}: {e}", index.path.display())))?;
                    (PipelineKind::DiT, cfg.sample_size, None, names)
                }
            };
            Ok(PipelineInfo {
                class_name: index.class,
                kind,
                class_names,
                size: (side * f, side * f),
                size_multiple: multiple,
                channels: 3,
                scheduler: None,
            })
        }
        _ => Err(index.unsupported()),
    }
}

/// The name a model is shown under (infotext `Model:`, server model lists): a hub id as given,
/// a local folder (or the default model, when `spec` is empty) by its own name.
pub fn model_display_name(spec: &str, dir: &Path) -> String {
    if spec.is_empty() || Path::new(spec).is_dir() {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string())
    } else {
        spec.to_string()
    }
}

/// The class a prompt names for a class-conditional model: a class name (any case) or index.
pub fn parse_class(names: &[String], prompt: &str) -> Result<usize> {
    let prompt = prompt.trim();
    if let Some(k) = names.iter().position(|n| n.eq_ignore_ascii_case(prompt)) {
        return Ok(k);
    }
    if let Some(k) = prompt.parse::<usize>().ok().filter(|&k| k < names.len()) {
        return Ok(k);
    }
    let valid: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{i} {n}"))
        .collect();
    Err(Error::invalid(format!(
        "unknown class `{prompt}`; the model's classes are: {}",
        valid.join(", ")
    )))
}

/// A seed from the OS-seeded hasher (no rand dependency), kept below 2^32 as A1111 seeds are.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() & 0xffff_ffff
}

/// The guidance interval a class-conditional DDPM model samples with: the one asked for, else
/// [`CLASS_GUIDANCE_INTERVAL`]; none when `guidance_scale` turns guidance off.
pub fn class_guidance_interval(
    asked: Option<(f64, f64)>,
    guidance_scale: f64,
) -> Option<(f64, f64)> {
    (guidance_scale > 1.0).then(|| asked.unwrap_or(CLASS_GUIDANCE_INTERVAL))
}

/// The infotext entry of a guidance interval (none without one).
pub fn interval_info(interval: Option<(f64, f64)>) -> Option<(String, String)> {
    interval.map(|(lo, hi)| ("Guidance interval".to_string(), format!("{lo}-{hi}")))
}

/// The image an img2img or inpainting task starts from.
#[derive(Clone, Debug)]
pub struct InitImage {
    pub image: RgbImage,
    /// White = repaint (inpainting); `None`: img2img.
    pub mask: Option<GrayImage>,
    /// img2img: the share of the schedule that runs, in (0, 1]; inpainting: 1 starts from
    /// pure noise under the mask.
    pub strength: f64,
}

/// A1111's hires fix for Stable Diffusion text-to-image: each image is upscaled (Lanczos) by
/// `scale`, to the VAE factor below, and drawn again by img2img at `strength` with `steps`
/// (default: the first pass's). The second pass of image `i` of a batch draws its noise as
/// image `i` of a batch from the task's seed.
#[derive(Clone, Debug, PartialEq)]
pub struct HiresFix {
    pub scale: f64,
    pub steps: Option<usize>,
    pub strength: f64,
}

impl HiresFix {
    /// The upscaler A1111's infotext names (the only one there is here).
    pub const UPSCALER: &'static str = "Lanczos";

    /// The second pass's `(width, height)` after a first pass of `width × height`.
    pub fn size(&self, (width, height): (usize, usize), factor: usize) -> Result<(usize, usize)> {
        if !(self.scale.is_finite() && (1.0..=8.0).contains(&self.scale)) {
            return Err(Error::invalid(format!(
                "the hires scale must be between 1 and 8, got {}",
                self.scale
            )));
        }
        let side = |x: usize| (x as f64 * self.scale) as usize / factor * factor;
        Ok((side(width), side(height)))
    }

    /// The infotext entries A1111 writes for it.
    fn infotext(&self) -> Vec<(String, String)> {
        let mut extra = vec![
            ("Denoising strength".to_string(), self.strength.to_string()),
            ("Hires upscale".to_string(), self.scale.to_string()),
        ];
        if let Some(n) = self.steps {
            extra.push(("Hires steps".to_string(), n.to_string()));
        }
        extra.push(("Hires upscaler".to_string(), Self::UPSCALER.to_string()));
        extra
    }
}

/// The settings of one task; `None` takes the pipeline's default.
#[derive(Clone, Debug)]
pub struct TaskSettings {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    /// Class-conditional DDPM models: guide only at these timesteps
    /// ([`UnconditionalRequest::guidance_interval`]); `None`: every step.
    pub guidance_interval: Option<(f64, f64)>,
    /// The sampler as the user named it, for the infotext (the caller gives the pipeline the
    /// matching scheduler); `None`: the pipeline's own scheduler class.
    pub sampler: Option<String>,
    pub seed: u64,
    /// Images in the one batch drawn from `seed`.
    pub num_images: usize,
    /// Make only these of the task's images (a range of `0..planned_images`, for one of
    /// several processes sharing the batch): the same images, bit for bit, as in the whole
    /// batch, and the same infotext. `None`: all of them.
    pub shard: Option<Range<usize>>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// DDIM's eta.
    pub eta: f64,
    pub init: Option<InitImage>,
    /// How the prompt is read (Stable Diffusion).
    pub prompt_syntax: PromptSyntax,
    /// Use the text encoder's output this many layers before the last (Stable Diffusion).
    pub clip_skip: Option<usize>,
    /// SD3 and Flux: T5 tokens of the prompt (default 256 and 512).
    pub max_sequence_length: Option<usize>,
    /// DiT: the classes to draw (ids or `id2label` names), `num_images` each; empty: the
    /// prompt's comma-separated list.
    pub class_labels: Vec<String>,
    /// ControlNets steering a Stable Diffusion task.
    pub controlnet: Option<ControlNetRequest>,
    /// Stable Diffusion text-to-image: a second, larger pass.
    pub hires: Option<HiresFix>,
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: None,
            guidance_scale: None,
            guidance_interval: None,
            sampler: None,
            seed: 0,
            num_images: 1,
            shard: None,
            width: None,
            height: None,
            eta: 0.0,
            init: None,
            prompt_syntax: PromptSyntax::Plain,
            clip_skip: None,
            max_sequence_length: None,
            class_labels: Vec::new(),
            controlnet: None,
            hires: None,
        }
    }
}

/// The images of one task and their infotext.
pub struct TaskOutput {
    /// 8-bit grayscale (1-channel models) or RGB images.
    pub images: Vec<DynamicImage>,
    /// The A1111 `parameters` text the images share ([`TaskOutput::infotext_of`] adds which
    /// image of the batch each is).
    pub infotext: String,
    /// The images of the batch drawn from the seed (more than `images` in a sharded task).
    pub batch_size: usize,
    /// The place of `images[0]` in that batch.
    pub first: usize,
    pub timings: Timings,
    /// Things the user should know (e.g. a truncated prompt).
    pub warnings: Vec<String>,
}

impl TaskOutput {
    /// The infotext of image `i`. With several images drawn from one seed the seed alone does
    /// not tell them apart: A1111's `Batch size` and (0-based) `Batch pos` do.
    pub fn infotext_of(&self, i: usize) -> String {
        match self.batch_size {
            0 | 1 => self.infotext.clone(),
            n => format!(
                "{}, Batch size: {n}, Batch pos: {}",
                self.infotext,
                self.first + i
            ),
        }
    }

    /// Shows the prompt as the user wrote it (`written`) in the infotext, where the task ran it
    /// without its `<lora:...>` tags (`ran`): A1111 keeps the tags there.
    pub fn show_prompt_as_written(&mut self, ran: &str, written: &str) {
        if let Some(rest) = self.infotext.strip_prefix(ran) {
            self.infotext = format!("{written}{rest}");
        }
    }

    /// Every image as PNG bytes with its infotext.
    pub fn pngs(&self) -> Result<Vec<Vec<u8>>> {
        self.images
            .iter()
            .enumerate()
            .map(|(i, img)| encode_png(img, Some(&self.infotext_of(i))))
            .collect()
    }
}

/// The classes of a DiT task: `class_labels`, else the prompt's comma-separated list.
fn dit_label_items(s: &TaskSettings) -> Vec<String> {
    let given: Vec<String> = if s.class_labels.is_empty() {
        s.prompt.split(',').map(str::to_string).collect()
    } else {
        s.class_labels.clone()
    };
    given
        .iter()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// How many images [`run_task`] will return: `num_images`, times the classes of a DiT task
/// (so that a front end can check its output files before the run).
pub fn planned_images(pipeline: &Pipeline, s: &TaskSettings) -> usize {
    match pipeline {
        Pipeline::DiT(_) => dit_label_items(s).len().max(1) * s.num_images,
        _ => s.num_images,
    }
}

/// Runs one task on a loaded pipeline. `model_name` goes into the infotext.
pub fn run_task(
    pipeline: &Pipeline,
    model_name: &str,
    s: &TaskSettings,
    callback: Option<&mut StepCallback<'_>>,
) -> Result<TaskOutput> {
    if s.num_images == 0 {
        return Err(Error::invalid("the number of images must be at least 1"));
    }
    // (DiT checks its share against its labels below.)
    let planned = planned_images(pipeline, s);
    let rows = s.shard.clone().unwrap_or(0..planned);
    if rows.is_empty() || rows.end > planned {
        return Err(Error::invalid(format!(
            "images {rows:?} are not a part of a batch of {planned}"
        )));
    }
    let shard = s.shard.as_ref().map(|r| BatchShard {
        batch: planned,
        start: r.start,
        len: r.len(),
    });
    let n = rows.len();
    let class_cond = matches!(pipeline, Pipeline::Unconditional(p) if !p.class_names.is_empty());
    let kind = match pipeline {
        Pipeline::Unconditional(_) => PipelineKind::Unconditional,
        Pipeline::StableDiffusion(_) | Pipeline::StableDiffusionXL(_) => {
            PipelineKind::StableDiffusion
        }
        Pipeline::StableDiffusion3(_) => PipelineKind::StableDiffusion3,
        Pipeline::Flux(_) => PipelineKind::Flux,
        Pipeline::DiT(_) => PipelineKind::DiT,
    };
    let scheduler = match pipeline {
        Pipeline::Unconditional(p) => Some(p.scheduler.class_name()),
        _ => None,
    };
    let (default_steps, default_guidance) = kind.defaults(class_cond, scheduler);
    let (steps, guidance) = (
        s.steps.unwrap_or(default_steps),
        s.guidance_scale.unwrap_or(default_guidance),
    );
    let guidance_interval = class_guidance_interval(s.guidance_interval, guidance);
    let transformer = matches!(
        kind,
        PipelineKind::StableDiffusion3 | PipelineKind::Flux | PipelineKind::DiT
    );
    if s.init.is_some() && transformer {
        return Err(Error::invalid(format!(
            "img2img and inpainting need a Stable Diffusion pipeline; this model is a {}",
            pipeline.class_name()
        )));
    }
    if s.max_sequence_length.is_some()
        && !matches!(kind, PipelineKind::StableDiffusion3 | PipelineKind::Flux)
    {
        return Err(Error::invalid(format!(
            "max_sequence_length is for SD3 and Flux (T5 prompts), not {}",
            pipeline.class_name()
        )));
    }
    if s.guidance_interval.is_some() && !class_cond {
        return Err(Error::invalid(format!(
            "a guidance interval is for class-conditional DDPM models, not {}",
            pipeline.class_name()
        )));
    }
    if s.hires.is_some() && (kind != PipelineKind::StableDiffusion || s.init.is_some()) {
        return Err(Error::invalid(format!(
            "the hires fix is for Stable Diffusion text-to-image, not {}",
            match s.init {
                Some(_) => "img2img or inpainting".to_string(),
                None => pipeline.class_name().to_string(),
            }
        )));
    }
    if !s.class_labels.is_empty() && kind != PipelineKind::DiT {
        return Err(Error::invalid(format!(
            "class labels are for DiT models, not {}",
            pipeline.class_name()
        )));
    }
    // (SD3 takes clip skip as diffusers' pipeline does; Flux and DiT have no such setting.)
    if s.clip_skip.is_some() && matches!(kind, PipelineKind::Flux | PipelineKind::DiT) {
        return Err(Error::invalid(format!(
            "clip skip does not apply to {}",
            pipeline.class_name()
        )));
    }
    let info = |width: usize, height: usize, extra: Vec<(String, String)>| {
        InfoText {
            prompt: s.prompt.clone(),
            negative_prompt: s.negative_prompt.clone(),
            steps,
            sampler: s
                .sampler
                .clone()
                .unwrap_or_else(|| pipeline.scheduler_name().to_string()),
            cfg_scale: guidance,
            seed: s.seed,
            width,
            height,
            model: model_name.to_string(),
            extra,
        }
        .to_string()
    };
    match pipeline {
        Pipeline::Unconditional(p) => {
            let (c, h, w) = p.image_shape();
            if s.init.is_some() {
                return Err(Error::invalid(format!(
                    "img2img and inpainting need a Stable Diffusion pipeline; this model is a {}",
                    p.class_name
                )));
            }
            if s.width.is_some_and(|x| x != w) || s.height.is_some_and(|x| x != h) {
                return Err(Error::invalid(format!(
                    "{} generates {w}x{h} images only",
                    p.class_name
                )));
            }
            if c != 1 && c != 3 {
                return Err(Error::invalid(format!(
                    "the model makes {c}-channel images; only grayscale and RGB can be saved"
                )));
            }
            let (class_labels, extra) = if class_cond {
                if s.prompt.trim().is_empty() {
                    return Err(Error::invalid(format!(
                        "the model is class-conditional: name a class in the prompt ({})",
                        p.class_names.join(", ")
                    )));
                }
                let k = parse_class(&p.class_names, &s.prompt)?;
                let class = ("Class".to_string(), p.class_names[k].clone());
                (
                    Some(vec![k; n]),
                    std::iter::once(class)
                        .chain(interval_info(guidance_interval))
                        .collect(),
                )
            } else {
                (None, Vec::new())
            };
            let req = UnconditionalRequest {
                batch_size: n,
                steps,
                eta: s.eta,
                seed: s.seed,
                class_labels,
                guidance_scale: guidance,
                guidance_interval,
                shard,
            };
            let out = p.generate(&req, callback)?;
            let images = if c == 1 {
                out.gray.into_iter().map(DynamicImage::ImageLuma8).collect()
            } else {
                out.rgb.into_iter().map(DynamicImage::ImageRgb8).collect()
            };
            Ok(TaskOutput {
                images,
                infotext: info(w, h, extra),
                batch_size: planned,
                first: rows.start,
                timings: Timings {
                    denoise: out.denoise,
                    ..Default::default()
                },
                warnings: Vec::new(),
            })
        }
        Pipeline::StableDiffusion(_) | Pipeline::StableDiffusionXL(_) => {
            let p = SdFamily::of(pipeline)?;
            let params = GenerationParams {
                prompts: vec![s.prompt.clone()],
                negative_prompts: p.negative_prompts(&s.negative_prompt),
                guidance_scale: guidance,
                num_images_per_prompt: n,
                steps,
                eta: s.eta,
                seed: s.seed,
                prompt_syntax: s.prompt_syntax,
                clip_skip: s.clip_skip,
                controlnet: s.controlnet.clone(),
                shard,
                ..Default::default()
            };
            let (out, (w, h), mut extra) = match &s.init {
                None => {
                    let (dh, dw) = p.default_size(&params)?;
                    let (h, w) = (s.height.unwrap_or(dh), s.width.unwrap_or(dw));
                    let req = Text2ImageRequest {
                        params,
                        height: Some(h),
                        width: Some(w),
                        latents: None,
                    };
                    match &s.hires {
                        None => (p.text_to_image(&req, callback)?, (w, h), Vec::new()),
                        Some(hr) => {
                            let mut callback = callback;
                            let first = p.text_to_image(&req, callback.as_deref_mut())?;
                            let size = hr.size((w, h), p.vae_scale_factor())?;
                            let shard = |i: usize| BatchShard {
                                batch: planned,
                                start: rows.start + i,
                                len: 1,
                            };
                            let out =
                                p.hires_pass(first, &req.params, hr, size, shard, callback)?;
                            // A1111 writes the first pass's size and the upscale.
                            (out, (w, h), hr.infotext())
                        }
                    }
                }
                Some(init) => {
                    let f = p.vae_scale_factor();
                    let (h, w) = crate::image_processor::default_size(
                        init.image.width(),
                        init.image.height(),
                        f,
                    )?;
                    let (h, w) = (s.height.unwrap_or(h), s.width.unwrap_or(w));
                    crate::check_image_size(h, w, f)?;
                    let extra = vec![("Denoising strength".to_string(), init.strength.to_string())];
                    // A1111 resizes the init image to the requested size.
                    let image =
                        if (w, h) != (init.image.width() as usize, init.image.height() as usize) {
                            image::imageops::resize(
                                &init.image,
                                w as u32,
                                h as u32,
                                image::imageops::FilterType::Lanczos3,
                            )
                        } else {
                            init.image.clone()
                        };
                    let out = match &init.mask {
                        None => {
                            let req = Img2ImgRequest {
                                params,
                                image,
                                strength: init.strength,
                            };
                            p.img2img(&req, callback)?
                        }
                        Some(mask) => {
                            let req = InpaintRequest {
                                params,
                                image,
                                mask: mask.clone(),
                                strength: init.strength,
                                height: Some(h),
                                width: Some(w),
                                latents: None,
                            };
                            p.inpaint(&req, callback)?
                        }
                    };
                    (out, (w, h), extra)
                }
            };
            if let Some(k) = s.clip_skip {
                // A1111 counts the last layer as 1.
                extra.push(("Clip skip".to_string(), (k + 1).to_string()));
            }
            Ok(TaskOutput {
                images: out.rgb.into_iter().map(DynamicImage::ImageRgb8).collect(),
                infotext: info(w, h, extra),
                batch_size: planned,
                first: rows.start,
                timings: out.timings,
                warnings: out.warnings,
            })
        }
        Pipeline::StableDiffusion3(_) | Pipeline::Flux(_) => {
            let (dh, dw) = match pipeline {
                Pipeline::StableDiffusion3(p) => p.default_size(),
                Pipeline::Flux(p) => p.default_size(),
                _ => unreachable!("matched above"),
            };
            let (h, w) = (s.height.unwrap_or(dh), s.width.unwrap_or(dw));
            let req = FlowText2ImageRequest {
                prompts: vec![s.prompt.clone()],
                negative_prompts: if s.negative_prompt.is_empty() {
                    vec![]
                } else {
                    vec![s.negative_prompt.clone()]
                },
                guidance_scale: guidance,
                num_images_per_prompt: n,
                steps,
                seed: s.seed,
                shard,
                height: Some(h),
                width: Some(w),
                max_sequence_length: s.max_sequence_length,
                clip_skip: s.clip_skip,
                ..Default::default()
            };
            let out = match pipeline {
                Pipeline::StableDiffusion3(p) => p.text_to_image(&req, callback)?,
                Pipeline::Flux(p) => p.text_to_image(&req, callback)?,
                _ => unreachable!("matched above"),
            };
            let (oh, ow) = (out.images.dim(1)?, out.images.dim(2)?);
            Ok(TaskOutput {
                images: out.rgb.into_iter().map(DynamicImage::ImageRgb8).collect(),
                infotext: info(ow, oh, Vec::new()),
                batch_size: planned,
                first: rows.start,
                timings: out.timings,
                warnings: out.warnings,
            })
        }
        Pipeline::DiT(p) => {
            let side = p.transformer.config().sample_size * p.vae.scale_factor();
            if s.width.is_some_and(|x| x != side) || s.height.is_some_and(|x| x != side) {
                return Err(Error::invalid(format!(
                    "{} generates {side}x{side} images only",
                    p.class_name
                )));
            }
            if !s.negative_prompt.is_empty() {
                return Err(Error::invalid(format!(
                    "{} takes no negative prompt (it guides against the null class)",
                    p.class_name
                )));
            }
            let mut labels = Vec::new();
            for item in dit_label_items(s) {
                match item.parse::<usize>() {
                    Ok(id) => labels.push(id),
                    Err(_) => labels.extend(p.label_ids(&[item])?),
                }
            }
            if labels.is_empty() {
                return Err(Error::invalid(format!(
                    "{} draws classes: give class ids or names, comma-separated, as the class \
                     labels (--class-labels) or the prompt",
                    p.class_name
                )));
            }
            let labels: Vec<usize> = labels
                .iter()
                .flat_map(|&l| std::iter::repeat_n(l, s.num_images))
                .collect();
            let text = labels
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(",");
            if rows.end > labels.len() {
                return Err(Error::invalid(format!(
                    "images {rows:?} are not a part of a batch of {}",
                    labels.len()
                )));
            }
            let req = crate::ClassToImageRequest {
                class_labels: labels[rows.clone()].to_vec(),
                guidance_scale: guidance,
                steps,
                seed: s.seed,
                record_trace: false,
                shard: shard.map(|sh| BatchShard {
                    batch: labels.len(),
                    ..sh
                }),
            };
            let out = p.generate(&req, callback)?;
            Ok(TaskOutput {
                images: out.rgb.into_iter().map(DynamicImage::ImageRgb8).collect(),
                infotext: info(side, side, vec![("Class".to_string(), text)]),
                batch_size: planned,
                first: rows.start,
                timings: out.timings,
                warnings: out.warnings,
            })
        }
    }
}

/// The Stable Diffusion family (1.x/2.x and SDXL): the same three tasks, SDXL's with its
/// default options.
enum SdFamily<'a> {
    Sd(&'a StableDiffusionPipeline),
    Xl(&'a StableDiffusionXLPipeline),
}

impl<'a> SdFamily<'a> {
    fn of(pipeline: &'a Pipeline) -> Result<Self> {
        match pipeline {
            Pipeline::StableDiffusion(p) => Ok(Self::Sd(p)),
            Pipeline::StableDiffusionXL(p) => Ok(Self::Xl(p)),
            other => Err(Error::invalid(format!(
                "{} is not a Stable Diffusion pipeline",
                other.class_name()
            ))),
        }
    }

    /// An empty negative prompt is "none" for SDXL (whose `force_zeros_for_empty_prompt`
    /// then zeroes the unconditional embeddings, as diffusers does without one) and the
    /// empty text for SD.
    fn negative_prompts(&self, negative: &str) -> Vec<String> {
        match self {
            Self::Xl(_) if negative.is_empty() => Vec::new(),
            _ => vec![negative.to_string()],
        }
    }

    fn default_size(&self, p: &GenerationParams) -> Result<(usize, usize)> {
        match self {
            Self::Sd(x) => x.default_size_for(p),
            Self::Xl(x) => x.default_size(p),
        }
    }

    fn vae_scale_factor(&self) -> usize {
        match self {
            Self::Sd(x) => x.vae_scale_factor(),
            Self::Xl(x) => x.vae_scale_factor(),
        }
    }

    fn text_to_image(
        &self,
        req: &Text2ImageRequest,
        cb: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        match self {
            Self::Sd(x) => x.text_to_image(req, cb),
            Self::Xl(x) => x.text_to_image(req, &SdxlOptions::default(), cb),
        }
    }

    fn img2img(
        &self,
        req: &Img2ImgRequest,
        cb: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        match self {
            Self::Sd(x) => x.img2img(req, cb),
            Self::Xl(x) => x.img2img(req, &SdxlOptions::default(), cb),
        }
    }

    /// The hires fix's second pass over `first`: each image upscaled to `(width, height)` and
    /// redrawn by img2img, with the noise of its place in the batch (`shard(i)`).
    fn hires_pass(
        &self,
        first: ImageOutput,
        params: &GenerationParams,
        hr: &HiresFix,
        (width, height): (usize, usize),
        shard: impl Fn(usize) -> BatchShard,
        mut cb: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        crate::check_image_size(height, width, self.vae_scale_factor())?;
        let (mut timings, mut warnings) = (first.timings, first.warnings);
        let (mut images, mut rgb) = (Vec::new(), Vec::new());
        for (i, img) in first.rgb.iter().enumerate() {
            let image = image::imageops::resize(
                img,
                width as u32,
                height as u32,
                image::imageops::FilterType::Lanczos3,
            );
            let req = Img2ImgRequest {
                params: GenerationParams {
                    num_images_per_prompt: 1,
                    steps: hr.steps.unwrap_or(params.steps),
                    shard: Some(shard(i)),
                    ..params.clone()
                },
                image,
                strength: hr.strength,
            };
            let out = self.img2img(&req, cb.as_deref_mut())?;
            timings.text_encode += out.timings.text_encode;
            timings.image_encode += out.timings.image_encode;
            timings.denoise += out.timings.denoise;
            timings.decode += out.timings.decode;
            // (The same prompt warns the same way in every pass.)
            for w in out.warnings {
                if !warnings.contains(&w) {
                    warnings.push(w);
                }
            }
            images.push(out.images);
            rgb.extend(out.rgb);
        }
        Ok(ImageOutput {
            images: candle_core::Tensor::cat(&images, 0)?,
            rgb,
            timings,
            warnings,
            trace: None,
        })
    }

    fn inpaint(
        &self,
        req: &InpaintRequest,
        cb: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        match self {
            Self::Sd(x) => x.inpaint(req, cb),
            Self::Xl(x) => x.inpaint(req, &SdxlOptions::default(), cb),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{load_pipeline, LoadOptions};
    use std::path::PathBuf;

    fn repo(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
    }

    /// What `describe` reads from the configs is what loading the weights gives.
    #[test]
    fn describe_matches_the_loaded_pipelines() {
        let dir = repo("fixtures/pipelines/tiny_sd");
        let info = describe(&dir).unwrap();
        assert_eq!(info.kind, PipelineKind::StableDiffusion);
        let Pipeline::StableDiffusion(p) = load_pipeline(&dir, &LoadOptions::default()).unwrap()
        else {
            panic!("tiny_sd is not a Stable Diffusion pipeline")
        };
        assert_eq!(info.size, p.default_size());
        assert_eq!(info.size_multiple, Some(p.vae_scale_factor()));

        let dir = repo("models/fashion-mnist-ddpm");
        let info = describe(&dir).unwrap();
        let Pipeline::Unconditional(p) = load_pipeline(&dir, &LoadOptions::default()).unwrap()
        else {
            panic!("fashion-mnist-ddpm is not a DDPM pipeline")
        };
        let (c, h, w) = p.image_shape();
        assert_eq!((info.channels, info.size), (c, (h, w)));
        assert_eq!(info.class_names, p.class_names);
        assert_eq!(info.default_guidance(), CLASS_GUIDANCE);
        assert_eq!(info.size_multiple, None);
        // The bundled model samples with DPM-Solver++: 20 steps unless DDPM is asked for.
        assert_eq!(info.scheduler.as_deref(), Some(p.scheduler.class_name()));
        assert_eq!(p.scheduler.class_name(), "DPMSolverMultistepScheduler");
        assert_eq!(info.default_steps(), SOLVER_STEPS);
        assert_eq!(info.default_steps_for(Some("DDPMScheduler")), DDPM_STEPS);
        assert_eq!(info.default_steps_for(Some("DDIMScheduler")), DDPM_STEPS);
        assert_eq!(
            info.default_steps_for(Some("EulerDiscreteScheduler")),
            SOLVER_STEPS
        );
    }

    /// SDXL folders are described like SD ones and run the three tasks through `run_task`.
    #[test]
    fn sdxl_tasks() {
        let dir = repo("fixtures/cases/_models/tiny_sdxl");
        let info = describe(&dir).unwrap();
        let p = load_pipeline(&dir, &LoadOptions::default()).unwrap();
        let Pipeline::StableDiffusionXL(xl) = &p else {
            panic!("tiny_sdxl is not an SDXL pipeline")
        };
        assert_eq!(
            info.size,
            xl.default_size(&GenerationParams::default()).unwrap()
        );
        let mut s = TaskSettings {
            prompt: "a lighthouse".into(),
            steps: Some(2),
            seed: 5,
            ..Default::default()
        };
        let out = run_task(&p, "tiny", &s, None).unwrap();
        assert_eq!((out.images[0].width(), out.images[0].height()), (64, 64));
        let image = out.images[0].to_rgb8();
        s.init = Some(InitImage {
            image: image.clone(),
            mask: None,
            strength: 0.5,
        });
        let out = run_task(&p, "tiny", &s, None).unwrap();
        assert!(
            out.infotext.contains("Denoising strength: 0.5"),
            "{}",
            out.infotext
        );
        s.init = Some(InitImage {
            image,
            mask: Some(GrayImage::from_pixel(64, 64, image::Luma([255]))),
            strength: 1.0,
        });
        assert_eq!(run_task(&p, "tiny", &s, None).unwrap().images.len(), 1);
    }

    /// The hires fix is text-to-image, then each image upscaled (Lanczos, to a multiple of 8
    /// below) and redrawn by img2img with the noise of its place in the batch: the same
    /// pixels as those steps run one by one through the pipeline.
    #[test]
    fn hires_fix_is_txt2img_then_img2img_of_each_image() {
        let p =
            load_pipeline(&repo("fixtures/pipelines/tiny_sd"), &LoadOptions::default()).unwrap();
        let Pipeline::StableDiffusion(sd) = &p else {
            panic!("tiny_sd is an SD pipeline")
        };
        let hr = HiresFix {
            scale: 1.6,
            steps: Some(3),
            strength: 0.6,
        };
        let s = TaskSettings {
            prompt: "a lighthouse".into(),
            steps: Some(2),
            seed: 11,
            num_images: 2,
            width: Some(64),
            height: Some(48),
            hires: Some(hr.clone()),
            ..Default::default()
        };
        let out = run_task(&p, "tiny", &s, None).unwrap();
        assert!(
            out.infotext.ends_with(
                "Size: 64x48, Model: tiny, Denoising strength: 0.6, Hires upscale: 1.6, \
                 Hires steps: 3, Hires upscaler: Lanczos"
            ),
            "{}",
            out.infotext
        );
        let params = GenerationParams {
            prompts: vec!["a lighthouse".into()],
            negative_prompts: vec![String::new()],
            guidance_scale: 7.5,
            num_images_per_prompt: 2,
            steps: 2,
            seed: 11,
            ..Default::default()
        };
        let first = sd
            .text_to_image(
                &Text2ImageRequest {
                    params: params.clone(),
                    height: Some(48),
                    width: Some(64),
                    latents: None,
                },
                None,
            )
            .unwrap();
        assert_eq!(out.images.len(), 2);
        for (i, img) in first.rgb.iter().enumerate() {
            // 64 × 1.6 = 102.4 → 96, 48 × 1.6 = 76.8 → 72.
            let image = image::imageops::resize(img, 96, 72, image::imageops::FilterType::Lanczos3);
            let req = Img2ImgRequest {
                params: GenerationParams {
                    num_images_per_prompt: 1,
                    steps: 3,
                    shard: Some(BatchShard {
                        batch: 2,
                        start: i,
                        len: 1,
                    }),
                    ..params.clone()
                },
                image,
                strength: 0.6,
            };
            let want = &sd.img2img(&req, None).unwrap().rgb[0];
            assert_eq!(&out.images[i].to_rgb8(), want, "image {i}");
        }
        // Not for img2img, nor for other families.
        let with_init = TaskSettings {
            init: Some(InitImage {
                image: first.rgb[0].clone(),
                mask: None,
                strength: 0.5,
            }),
            ..s.clone()
        };
        assert!(run_task(&p, "tiny", &with_init, None).is_err());
        let ddpm =
            load_pipeline(&repo("models/fashion-mnist-ddpm"), &LoadOptions::default()).unwrap();
        let sandal = TaskSettings {
            prompt: "Sandal".into(),
            hires: Some(hr),
            ..Default::default()
        };
        let e = run_task(&ddpm, "fashion", &sandal, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("hires fix is for Stable Diffusion"), "{e}");
    }

    #[test]
    fn classes_by_name_or_index() {
        let names: Vec<String> = ["T-shirt/top", "Trouser", "Sneaker"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(parse_class(&names, " sneaker ").unwrap(), 2);
        assert_eq!(parse_class(&names, "1").unwrap(), 1);
        let err = parse_class(&names, "3").unwrap_err().to_string();
        assert!(err.contains("0 T-shirt/top, 1 Trouser, 2 Sneaker"), "{err}");
    }

    /// A class-conditional model needs a class; the infotext names the class.
    #[test]
    fn class_conditional_task() {
        let dir = repo("models/fashion-mnist-ddpm");
        let p = load_pipeline(&dir, &LoadOptions::default()).unwrap();
        let mut s = TaskSettings {
            steps: Some(2),
            seed: 3,
            ..Default::default()
        };
        let err = run_task(&p, "fm", &s, None).err().unwrap().to_string();
        assert!(err.contains("class-conditional"), "{err}");
        s.prompt = "trouser".into();
        s.num_images = 2;
        let out = run_task(&p, "fm", &s, None).unwrap();
        assert_eq!(out.images.len(), 2);
        assert_eq!(out.images[0].width(), 32);
        assert!(
            out.infotext
                .ends_with("Model: fm, Class: Trouser, Guidance interval: 100-550"),
            "{}",
            out.infotext
        );
        assert!(out
            .infotext
            .contains("Steps: 2, Sampler: DPMSolverMultistepScheduler, CFG scale: 5"));
        // Each image says where it is in the batch drawn from the seed; a shard keeps the
        // whole batch's numbering, and its image is the batch's second bit for bit.
        let tail = |i: usize| format!("Guidance interval: 100-550, Batch size: 2, Batch pos: {i}");
        assert!(
            out.infotext_of(1).ends_with(&tail(1)),
            "{}",
            out.infotext_of(1)
        );
        let second = TaskSettings {
            shard: Some(1..2),
            ..s.clone()
        };
        let shard = run_task(&p, "fm", &second, None).unwrap();
        assert_eq!(shard.infotext_of(0), out.infotext_of(1));
        assert_eq!(shard.images[0], out.images[1]);
        assert_eq!(shard.pngs().unwrap()[0], out.pngs().unwrap()[1]);
        // One image: no batch fields.
        let one = TaskSettings {
            num_images: 1,
            ..s.clone()
        };
        let single = run_task(&p, "fm", &one, None).unwrap();
        assert_eq!(single.infotext_of(0), single.infotext);
        // No guidance, no interval.
        s.guidance_scale = Some(1.0);
        let out = run_task(&p, "fm", &s, None).unwrap();
        assert!(
            !out.infotext.contains("Guidance interval"),
            "{}",
            out.infotext
        );
        s.guidance_scale = None;
        s.width = Some(64);
        assert!(run_task(&p, "fm", &s, None).is_err());
    }
}
