//! Diffusion pipelines at parity with Hugging Face diffusers: unconditional DDPM/DDIM,
//! Stable Diffusion text-to-image, image-to-image and inpainting, and the diffusion
//! transformers: Stable Diffusion 3, Flux and DiT.
//!
//! [`load_pipeline`] reads a diffusers folder (`model_index.json` + one folder per component)
//! and returns the [`Pipeline`] its `_class_name` names. Each pipeline is one file whose
//! `__call__`-like method reads as the diffusers loop does.

pub mod canny;
pub mod components;
pub mod controlnet;
pub mod convert;
pub mod ddpm;
pub mod denoise;
pub mod dit;
pub mod flux;
pub mod image_processor;
pub mod img2img;
pub mod inpaint;
pub mod png_info;
pub mod prompt_weighting;
pub(crate) mod sources;
pub mod stable_diffusion;
pub mod stable_diffusion_3;
pub mod stable_diffusion_xl;
pub mod task;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use diffuse_core::{Error, Result};
pub use diffuse_loaders::lora::{find_lora, list_loras, LoraSpec};
use diffuse_models::AutoencoderKL;
use diffuse_schedulers::{Scheduler, SchedulerConfig};

pub use canny::canny;
pub use controlnet::{load_controlnet, ControlNetRequest, ControlNetUnit};
pub use ddpm::{
    check_guidance_interval, ClassGuidance, UnconditionalOutput, UnconditionalPipeline,
    UnconditionalRequest,
};
pub use dit::{ClassToImageRequest, DiTPipeline};
pub use flux::FluxPipeline;
pub use img2img::Img2ImgRequest;
pub use inpaint::InpaintRequest;
pub use sources::{text_encoder_weights, unet_weights};
pub use stable_diffusion::{
    AddedEmbedding, EncodedPrompt, GenerationParams, ImageOutput, PromptEmbeds,
    StableDiffusionPipeline, Text2ImageRequest,
};
pub use stable_diffusion_3::{FlowText2ImageRequest, StableDiffusion3Pipeline, TextEmbeds};
pub use stable_diffusion_xl::{
    InitImage, LatentOutput, SdxlOptions, SdxlPromptEmbeds, StableDiffusionXLPipeline,
};

/// The `_class_name`s [`load_pipeline`] understands.
pub const SUPPORTED_PIPELINES: &[&str] = &[
    "DDPMPipeline",
    "DDIMPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusion3Pipeline",
    "FluxPipeline",
    "DiTPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
];

/// How to load a pipeline folder.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Replaces the folder's scheduler: a diffusers class (`EulerDiscreteScheduler`) or an
    /// AUTOMATIC1111 name (`Euler a`), built on the folder's scheduler config as diffusers'
    /// `Cls.from_config(pipe.scheduler.config)` does.
    pub scheduler: Option<String>,
    /// Weight variant, e.g. `fp16` for `*.fp16.safetensors`.
    pub variant: Option<String>,
    /// Transformer pipelines (SD3, Flux): load the text encoders and the transformer each time
    /// they run and drop them right after, so that they never share memory (the largest one
    /// sets the peak); each run then reads them from disk again.
    pub load_on_demand: bool,
    /// Textual-inversion embeddings to add after loading (Stable Diffusion pipelines).
    pub textual_inversions: Vec<EmbeddingSpec>,
    /// LoRA files fused into the weights as they load, each with its scale.
    pub loras: Vec<LoraSpec>,
    /// For a single-file checkpoint: a diffusers folder whose component configs (and
    /// tokenizer, scheduler) describe it; without one, the architecture is recognised from
    /// the file and built-in configs are used.
    pub config: Option<PathBuf>,
}

/// A textual-inversion file and the token it is used under (default: the token the file
/// names, else its stem).
#[derive(Clone, Debug)]
pub struct EmbeddingSpec {
    pub path: PathBuf,
    pub token: Option<String>,
}

impl EmbeddingSpec {
    /// Every embedding file of `dir` (`.pt`, `.safetensors`, `.bin`), each under its own token,
    /// in file name order.
    pub fn all_in(dir: &Path) -> Result<Vec<Self>> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::invalid(format!(
                "reading the embedding folder {}: {e}",
                dir.display()
            ))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| ["pt", "safetensors", "bin"].contains(&e))
            })
            .collect();
        files.sort();
        Ok(files
            .into_iter()
            .map(|path| EmbeddingSpec { path, token: None })
            .collect())
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            scheduler: None,
            variant: None,
            textual_inversions: Vec::new(),
            loras: Vec::new(),
            config: None,
            load_on_demand: false,
        }
    }
}

/// What a step callback sees after each scheduler step.
pub struct StepInfo<'a> {
    /// 0-based index of the step just done.
    pub step: usize,
    /// Steps in this run (UNet calls, e.g. n+1 for PNDM).
    pub num_steps: usize,
    pub timestep: f64,
    /// Latents after the step (after the mask blend for legacy inpainting).
    pub latents: &'a Tensor,
}

/// Called after every denoising step, for progress bars and previews; an error stops the run.
pub type StepCallback<'a> = dyn FnMut(StepInfo<'_>) -> Result<()> + 'a;

/// Wall-clock time spent in each phase of a run.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub text_encode: Duration,
    /// Image preprocessing and VAE encoding (img2img, inpaint).
    pub image_encode: Duration,
    pub denoise: Duration,
    pub decode: Duration,
}

/// Every tensor that enters and leaves the denoising loop, for parity checks and debugging.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    pub start_latents: Option<Tensor>,
    /// Exact UNet `sample` input per call (with CFG: the `[uncond, cond]` batch).
    pub unet_inputs: Vec<Tensor>,
    pub unet_timesteps: Vec<f64>,
    /// Raw UNet output per call, before guidance.
    pub unet_outputs: Vec<Tensor>,
    /// Latents after each step (the callback's latents).
    pub step_latents: Vec<Tensor>,
    /// The ControlNets' `sample` input per call (with guess mode and guidance: the
    /// conditional half only).
    pub controlnet_inputs: Vec<Tensor>,
}

/// A loaded pipeline, as `DiffusionPipeline.from_pretrained` returns it.
pub enum Pipeline {
    /// `DDPMPipeline` / `DDIMPipeline`: an unconditional `UNet2DModel`.
    Unconditional(Box<UnconditionalPipeline>),
    /// `StableDiffusion{,Img2Img,Inpaint}Pipeline`: the same components, any of the three tasks.
    StableDiffusion(Box<StableDiffusionPipeline>),
    /// `StableDiffusion3Pipeline`: text-to-image with the MMDiT.
    StableDiffusion3(Box<StableDiffusion3Pipeline>),
    /// `FluxPipeline`: text-to-image with Flux (dev or schnell).
    Flux(Box<FluxPipeline>),
    /// `DiTPipeline`: class-conditional generation.
    DiT(Box<DiTPipeline>),
    /// `StableDiffusionXL{,Img2Img,Inpaint}Pipeline` (base or refiner), any of the three tasks.
    StableDiffusionXL(Box<StableDiffusionXLPipeline>),
}

impl Pipeline {
    /// Adds a textual-inversion embedding (Stable Diffusion 1.x/2.x and XL) under `token`
    /// (default: the file's own token, else its stem) and says what it added. A file that does
    /// not fit the model is an error that leaves the pipeline as it was.
    pub fn load_textual_inversion(
        &mut self,
        path: &Path,
        token: Option<&str>,
    ) -> Result<AddedEmbedding> {
        match self {
            Pipeline::StableDiffusion(p) => p.load_textual_inversion(path, token),
            Pipeline::StableDiffusionXL(p) => p.load_textual_inversion(path, token),
            other => Err(Error::invalid(format!(
                "{}: textual-inversion embeddings are for Stable Diffusion pipelines, not {}",
                path.display(),
                other.class_name()
            ))),
        }
    }

    /// The VAE, for settings such as tiling; `None` for pixel-space models.
    pub fn vae_mut(&mut self) -> Option<&mut AutoencoderKL> {
        match self {
            Pipeline::Unconditional(_) => None,
            Pipeline::StableDiffusion(p) => Some(&mut p.vae),
            Pipeline::StableDiffusionXL(p) => Some(&mut p.vae),
            Pipeline::StableDiffusion3(p) => Some(&mut p.vae.model),
            Pipeline::Flux(p) => Some(&mut p.vae.model),
            Pipeline::DiT(p) => Some(&mut p.vae.model),
        }
    }

    /// The `_class_name` of the folder it was loaded from.
    pub fn class_name(&self) -> &str {
        match self {
            Pipeline::Unconditional(p) => &p.class_name,
            Pipeline::StableDiffusion(p) => &p.class_name,
            Pipeline::StableDiffusion3(p) => &p.class_name,
            Pipeline::Flux(p) => &p.class_name,
            Pipeline::DiT(p) => &p.class_name,
            Pipeline::StableDiffusionXL(p) => &p.class_name,
        }
    }

    /// The scheduler in use.
    pub fn scheduler(&self) -> &dyn Scheduler {
        match self {
            Pipeline::Unconditional(p) => p.scheduler.as_ref(),
            Pipeline::StableDiffusion(p) => p.scheduler.as_ref(),
            Pipeline::StableDiffusion3(p) => p.scheduler.as_ref(),
            Pipeline::Flux(p) => p.scheduler.as_ref(),
            Pipeline::DiT(p) => p.scheduler.as_ref(),
            Pipeline::StableDiffusionXL(p) => p.scheduler.as_ref(),
        }
    }

    /// The scheduler class in use.
    pub fn scheduler_name(&self) -> &str {
        self.scheduler().class_name()
    }

    /// Puts in another scheduler (e.g. the sampler one request names) and returns the one that
    /// was in use.
    pub fn replace_scheduler(&mut self, scheduler: Box<dyn Scheduler>) -> Box<dyn Scheduler> {
        match self {
            Pipeline::Unconditional(p) => std::mem::replace(&mut p.scheduler, scheduler),
            Pipeline::StableDiffusion(p) => std::mem::replace(&mut p.scheduler, scheduler),
            Pipeline::StableDiffusion3(p) => std::mem::replace(&mut p.scheduler, scheduler),
            Pipeline::Flux(p) => std::mem::replace(&mut p.scheduler, scheduler),
            Pipeline::DiT(p) => std::mem::replace(&mut p.scheduler, scheduler),
            Pipeline::StableDiffusionXL(p) => std::mem::replace(&mut p.scheduler, scheduler),
        }
    }
}

/// A folder's `model_index.json`: its path, `_class_name`, and the rest.
pub(crate) struct ModelIndex {
    pub path: PathBuf,
    pub class: String,
    json: serde_json::Value,
}

impl ModelIndex {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(format!("{}: not valid JSON: {e}", path.display())))?;
        let class = json
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                Error::config(
                    path.display().to_string(),
                    "_class_name",
                    "missing or not a string",
                )
            })?
            .to_string();
        Ok(Self { path, class, json })
    }

    /// `_class_names`, written by `diffuse train` for class-conditional models (diffusers
    /// ignores underscore keys it does not know).
    pub fn class_names(&self) -> Result<Option<Vec<String>>> {
        match self.json.get("_class_names") {
            None => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                Error::config(
                    self.path.display().to_string(),
                    "_class_names",
                    format!("not a list of strings: {e}"),
                )
            }),
        }
    }

    /// A boolean setting (`force_zeros_for_empty_prompt`, `requires_aesthetics_score`), or
    /// `default` when absent.
    pub fn flag(&self, key: &str, default: bool) -> bool {
        self.json
            .get(key)
            .and_then(|v| v.as_bool())
            .unwrap_or(default)
    }

    /// The error for a `_class_name` no loader handles.
    pub fn unsupported(&self) -> Error {
        Error::invalid(format!(
            "{}: unsupported pipeline class {:?}; supported: {}",
            self.path.display(),
            self.class,
            SUPPORTED_PIPELINES.join(", ")
        ))
    }
}

/// Loads a pipeline, as `DiffusionPipeline.from_pretrained` (a diffusers folder, dispatching on
/// `model_index.json`'s `_class_name`) or `from_single_file` (a `.safetensors`/`.ckpt` file in
/// the original layout, with `opts.config` or the recognised architecture) does.
pub fn load_pipeline(path: &Path, opts: &LoadOptions) -> Result<Pipeline> {
    let src = sources::Source::open(path, opts.config.as_deref())?;
    let class = src.pipeline_class()?;
    let sd = matches!(
        class.as_str(),
        "StableDiffusionPipeline"
            | "StableDiffusionImg2ImgPipeline"
            | "StableDiffusionInpaintPipeline"
    );
    if sd {
        let p = StableDiffusionPipeline::load_from(&src, class, opts)?;
        return with_embeddings(Pipeline::StableDiffusion(Box::new(p)), opts);
    }
    if class.starts_with("StableDiffusionXL") {
        let flags = match &src {
            sources::Source::Folder(dir) => {
                let index = ModelIndex::read(dir)?;
                (
                    index.flag("force_zeros_for_empty_prompt", true),
                    index.flag("requires_aesthetics_score", false),
                )
            }
            // A refiner file is an img2img pipeline with aesthetic-score time ids.
            sources::Source::SingleFile { family, .. } => (
                true,
                *family == diffuse_loaders::single_file::Family::SdxlRefiner,
            ),
        };
        let p = StableDiffusionXLPipeline::load_from(&src, class, flags, opts)?;
        return with_embeddings(Pipeline::StableDiffusionXL(Box::new(p)), opts);
    }
    let sources::Source::Folder(dir) = &src else {
        return Err(Error::invalid(format!(
            "{}: single-file {class} checkpoints are not supported yet",
            path.display()
        )));
    };
    if !opts.loras.is_empty() || !opts.textual_inversions.is_empty() {
        return Err(Error::invalid(format!(
            "{}: LoRAs and embeddings apply to Stable Diffusion pipelines, not to a {class}",
            path.display()
        )));
    }
    let index = ModelIndex::read(dir)?;
    match index.class.as_str() {
        "DDPMPipeline" | "DDIMPipeline" => {
            let class_names = index.class_names()?;
            Ok(Pipeline::Unconditional(Box::new(
                UnconditionalPipeline::load(dir, index.class, class_names, opts)?,
            )))
        }
        "StableDiffusion3Pipeline" => Ok(Pipeline::StableDiffusion3(Box::new(
            StableDiffusion3Pipeline::load(dir, index.class, &index.json, opts)?,
        ))),
        "FluxPipeline" => Ok(Pipeline::Flux(Box::new(FluxPipeline::load(
            dir,
            index.class,
            opts,
        )?))),
        "DiTPipeline" => Ok(Pipeline::DiT(Box::new(DiTPipeline::load(
            dir,
            index.class,
            &index.json,
            opts,
        )?))),
        _ => Err(index.unsupported()),
    }
}

/// Loads a `vae/` folder in the pipeline's dtype, or in f32 when the pipeline runs in f16 and
/// A component folder of a pipeline; its absence is an error naming it.
pub(crate) fn component_dir(dir: &Path, name: &str) -> Result<PathBuf> {
    let d = dir.join(name);
    if d.is_dir() {
        Ok(d)
    } else {
        Err(Error::invalid(format!(
            "{}: component folder `{name}` is missing (the pipeline needs it)",
            dir.display()
        )))
    }
}

/// The folder's scheduler, or the one `opts.scheduler` names built on the folder's config.
pub(crate) fn load_scheduler(dir: &Path, opts: &LoadOptions) -> Result<Box<dyn Scheduler>> {
    let sdir = component_dir(dir, "scheduler")?;
    let cfg = SchedulerConfig::from_file(&sdir.join("scheduler_config.json"))?;
    match &opts.scheduler {
        Some(name) => diffuse_schedulers::from_name(name, &cfg),
        None => diffuse_schedulers::from_own_config(&cfg),
    }
}

/// The scheduler `name` names (a diffusers class or an A1111 name) built on a pipeline
/// folder's scheduler config: what loading the folder with [`LoadOptions::scheduler`] gives.
pub fn named_scheduler(dir: &Path, name: &str) -> Result<Box<dyn Scheduler>> {
    load_scheduler(
        dir,
        &LoadOptions {
            scheduler: Some(name.to_string()),
            ..Default::default()
        },
    )
}

/// A fresh copy of a scheduler (no state left from an earlier run, e.g. PNDM's history).
pub(crate) fn fresh_scheduler(s: &dyn Scheduler) -> Result<Box<dyn Scheduler>> {
    diffuse_schedulers::from_config(s.class_name(), s.config())
}

/// `pipeline` with the textual-inversion embeddings of `opts` added.
fn with_embeddings(mut pipeline: Pipeline, opts: &LoadOptions) -> Result<Pipeline> {
    for e in &opts.textual_inversions {
        pipeline.load_textual_inversion(&e.path, e.token.as_deref())?;
    }
    Ok(pipeline)
}

/// Output sizes must be positive multiples of the VAE's scale factor `f`.
pub(crate) fn check_image_size(height: usize, width: usize, f: usize) -> Result<()> {
    if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
        return Err(Error::invalid(format!(
            "height and width must be positive multiples of {f}, got {width}x{height}"
        )));
    }
    Ok(())
}

/// What every sampling run checks first: at least one step, and the named settings (guidance
/// scale, eta) finite numbers: a NaN or infinite one would run the whole loop to a NaN image.
pub(crate) fn check_sampling(steps: usize, numbers: &[(&str, f64)]) -> Result<()> {
    if steps == 0 {
        return Err(Error::invalid("the number of steps must be at least 1"));
    }
    check_finite(numbers)
}

/// Each named value must be a finite number.
pub(crate) fn check_finite(numbers: &[(&str, f64)]) -> Result<()> {
    match numbers.iter().find(|(_, v)| !v.is_finite()) {
        Some((name, v)) => Err(Error::invalid(format!(
            "{name} must be a finite number, got {v}"
        ))),
        None => Ok(()),
    }
}
