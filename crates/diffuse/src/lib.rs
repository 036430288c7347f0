//! **diffuse**: diffusion models in Rust, numerically at parity with Hugging Face diffusers.
//!
//! This crate is the one to depend on. It re-exports the member crates
//! ([`schedulers`], [`models`], [`pipelines`], [`loaders`], [`training`], [`core`]) and offers
//! diffusers' entry point, [`DiffusionPipeline::from_pretrained`], which loads any supported
//! diffusers folder, single-file checkpoint or Hugging Face cache entry, and
//! [`DiffusionPipeline::generate`]:
//!
//! ```
//! use diffuse::{DiffusionPipeline, LoadOptions, Params};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/tiny_sd");
//! let pipe = DiffusionPipeline::from_pretrained(model, &LoadOptions::default())?;
//! let params = Params { prompt: "a red fox in the snow".into(), steps: Some(4), seed: 42, ..Default::default() };
//! let images = pipe.generate(&params)?;
//! assert_eq!((images[0].width(), images[0].height()), (64, 64)); // the tiny model's size
//! # Ok(())
//! # }
//! ```
//!
//! Names: the types re-exported at this level carry diffusers' and transformers' class names
//! exactly (`DDIMScheduler`, `UNet2DConditionModel`, `CLIPTextModel`), so that Python code
//! maps over word for word; the member crates use Rust's casing for the same types
//! (`DdimScheduler`, `ClipTextModel`).

// The README's library example, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExample;

pub use diffuse_core as core;
pub use diffuse_loaders as loaders;
pub use diffuse_models as models;
pub use diffuse_pipelines as pipelines;
pub use diffuse_schedulers as schedulers;
pub use diffuse_training as training;

pub use candle_core::{DType, Device, Tensor};
pub use diffuse_core::{Error, Generator, Result};
pub use diffuse_pipelines::task::{TaskOutput, TaskSettings as Params};
pub use diffuse_pipelines::{LoadOptions, Pipeline};
pub use diffuse_schedulers::{Scheduler, SchedulerConfig};
pub use image::DynamicImage;

// Pipelines, under diffusers' names.
pub use diffuse_pipelines::{
    DiTPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
    StableDiffusionXLPipeline, UnconditionalPipeline as DDPMPipeline,
};

// Models, under diffusers' and transformers' names.
pub use diffuse_models::clip_text::{
    ClipTextModel as CLIPTextModel, ClipTextModelWithProjection as CLIPTextModelWithProjection,
};
pub use diffuse_models::clip_tokenizer::ClipTokenizer as CLIPTokenizer;
pub use diffuse_models::t5::T5EncoderModel;
pub use diffuse_models::transformer_dit::DiTTransformer2DModel;
pub use diffuse_models::transformer_flux::FluxTransformer2DModel;
pub use diffuse_models::transformer_sd3::SD3Transformer2DModel;
/// Brings `from_pretrained` / `from_pretrained_variant` of every model into scope.
pub use diffuse_models::ModelMixin;
pub use diffuse_models::{AutoencoderKL, ControlNetModel, UNet2DConditionModel, UNet2DModel};

// Schedulers, under diffusers' names.
pub use diffuse_schedulers::ddim::DdimScheduler as DDIMScheduler;
pub use diffuse_schedulers::ddim_inverse::DdimInverseScheduler as DDIMInverseScheduler;
pub use diffuse_schedulers::ddpm::DdpmScheduler as DDPMScheduler;
pub use diffuse_schedulers::deis_multistep::DeisMultistepScheduler as DEISMultistepScheduler;
pub use diffuse_schedulers::dpmsolver_multistep::DpmSolverMultistepScheduler as DPMSolverMultistepScheduler;
pub use diffuse_schedulers::dpmsolver_singlestep::DpmSolverSinglestepScheduler as DPMSolverSinglestepScheduler;
pub use diffuse_schedulers::edm_dpmsolver_multistep::EdmDpmSolverMultistepScheduler as EDMDPMSolverMultistepScheduler;
pub use diffuse_schedulers::edm_euler::EdmEulerScheduler as EDMEulerScheduler;
pub use diffuse_schedulers::euler_ancestral_discrete::EulerAncestralDiscreteScheduler;
pub use diffuse_schedulers::euler_discrete::EulerDiscreteScheduler;
pub use diffuse_schedulers::flow_match_euler_discrete::FlowMatchEulerDiscreteScheduler;
pub use diffuse_schedulers::flow_match_heun_discrete::FlowMatchHeunDiscreteScheduler;
pub use diffuse_schedulers::heun_discrete::HeunDiscreteScheduler;
pub use diffuse_schedulers::k_dpm_2_ancestral_discrete::Kdpm2AncestralDiscreteScheduler as KDPM2AncestralDiscreteScheduler;
pub use diffuse_schedulers::k_dpm_2_discrete::Kdpm2DiscreteScheduler as KDPM2DiscreteScheduler;
pub use diffuse_schedulers::lcm::LcmScheduler as LCMScheduler;
pub use diffuse_schedulers::lms_discrete::LmsDiscreteScheduler as LMSDiscreteScheduler;
pub use diffuse_schedulers::pndm::PndmScheduler as PNDMScheduler;
pub use diffuse_schedulers::tcd::TcdScheduler as TCDScheduler;
pub use diffuse_schedulers::unipc_multistep::UniPcMultistepScheduler as UniPCMultistepScheduler;

/// Any pipeline diffuse runs, loaded as diffusers' `DiffusionPipeline.from_pretrained` does:
/// the class comes from the folder's `model_index.json` (or, for a single-file checkpoint,
/// from its tensors).
pub struct DiffusionPipeline {
    pipeline: Pipeline,
    /// What the user named (for the PNG infotext's `Model:`).
    name: String,
}

impl DiffusionPipeline {
    /// Loads `model`: a diffusers folder, a single-file checkpoint (`.safetensors` / `.ckpt`),
    /// or a Hugging Face id (`owner/name`) already in the cache (`HF_HOME`).
    pub fn from_pretrained(model: &str, opts: &LoadOptions) -> Result<Self> {
        let path = diffuse_loaders::hub::resolve_model(model, None)?;
        let pipeline = diffuse_pipelines::load_pipeline(&path, opts)?;
        Ok(Self {
            pipeline,
            name: model.to_string(),
        })
    }

    /// Wraps a pipeline built by hand.
    pub fn new(pipeline: Pipeline, name: impl Into<String>) -> Self {
        Self {
            pipeline,
            name: name.into(),
        }
    }

    /// The images of one run (`params.num_images` of them).
    pub fn generate(&self, params: &Params) -> Result<Vec<DynamicImage>> {
        Ok(self.run(params)?.images)
    }

    /// One run with everything it reports: images, the A1111 infotext (written into PNGs by
    /// [`TaskOutput::pngs`]), timings and warnings.
    pub fn run(&self, params: &Params) -> Result<TaskOutput> {
        diffuse_pipelines::task::run_task(&self.pipeline, &self.name, params, None)
    }

    /// Replaces the scheduler: a diffusers class (`EulerDiscreteScheduler`) or an A1111 name
    /// (`DPM++ 2M Karras`), built on the current scheduler's config as diffusers'
    /// `Cls.from_config(pipe.scheduler.config)` does.
    pub fn set_scheduler(&mut self, name: &str) -> Result<()> {
        let scheduler = diffuse_schedulers::from_name(name, self.pipeline.scheduler().config())?;
        self.pipeline.replace_scheduler(scheduler);
        Ok(())
    }

    /// The `_class_name` of the loaded pipeline.
    pub fn class_name(&self) -> &str {
        self.pipeline.class_name()
    }

    /// The pipeline, for its components and its own request types.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// The pipeline, mutably (e.g. [`Pipeline::vae_mut`] to enable VAE tiling).
    pub fn pipeline_mut(&mut self) -> &mut Pipeline {
        &mut self.pipeline
    }
}
