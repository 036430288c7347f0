//! Where a pipeline's components come from: a diffusers folder, or a single-file checkpoint in
//! the original layout (configs from `--config`'s folder or built in), with LoRA updates fused
//! into the weights as each component is built.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use diffuse_core::{Error, Result};
use diffuse_loaders::lora::{LoraFile, LoraSpec};
use diffuse_loaders::single_file::{Family, SingleFile, TextEncoderLayout};
use diffuse_loaders::CheckedBackend;
use diffuse_models::clip_text::ClipTextConfig;
use diffuse_models::clip_tokenizer::ClipTokenizer;
use diffuse_models::{
    AutoencoderKL, AutoencoderKLConfig, UNet2DConditionConfig, UNet2DConditionModel,
};
use diffuse_schedulers::{Scheduler, SchedulerConfig};
use serde::de::DeserializeOwned;

use crate::LoadOptions;

/// A component's weights and configs.
pub(crate) enum Source {
    Folder(PathBuf),
    SingleFile {
        file: Box<SingleFile>,
        family: Family,
        /// A diffusers folder whose component configs (and tokenizer, scheduler) describe the
        /// file; else the built-in ones of `family`.
        config: Option<PathBuf>,
    },
}

/// Built-in component configs of the families a single file can be (copied from the
/// checkpoints' diffusers folders).
fn builtin(family: Family, component: &str) -> Option<&'static str> {
    macro_rules! set {
        ($dir:literal) => {
            match component {
                "unet" => Some(include_str!(concat!(
                    "../builtin/",
                    $dir,
                    "/unet/config.json"
                ))),
                "vae" => Some(include_str!(concat!(
                    "../builtin/",
                    $dir,
                    "/vae/config.json"
                ))),
                "text_encoder" => Some(include_str!(concat!(
                    "../builtin/",
                    $dir,
                    "/text_encoder/config.json"
                ))),
                "scheduler" => Some(include_str!(concat!(
                    "../builtin/",
                    $dir,
                    "/scheduler/scheduler_config.json"
                ))),
                _ => None,
            }
        };
    }
    match family {
        Family::Sd1 => set!("sd15"),
        Family::Sd1Inpaint => set!("sd15_inpaint"),
        Family::Sd2 | Family::Sd2Inpaint => set!("sd21"),
        Family::Sdxl if component == "text_encoder_2" => {
            Some(include_str!("../builtin/sdxl/text_encoder_2/config.json"))
        }
        Family::Sdxl => set!("sdxl"),
        // (The refiner's architecture differs from the base's; its files need --config.)
        Family::SdxlRefiner => None,
    }
}

impl Source {
    /// A folder, or a file (single-file checkpoint) with an optional config folder.
    pub fn open(path: &Path, config: Option<&Path>) -> Result<Self> {
        if path.is_dir() {
            return Ok(Source::Folder(path.to_path_buf()));
        }
        if !path.is_file() {
            return Err(Error::invalid(format!(
                "{}: no such model folder or checkpoint file",
                path.display()
            )));
        }
        let file = SingleFile::open(path)?;
        let family = file.family()?;
        if let Some(c) = config {
            if !c.join("unet").is_dir() {
                return Err(Error::invalid(format!(
                    "--config {}: not a diffusers folder with a unet/ component",
                    c.display()
                )));
            }
        }
        Ok(Source::SingleFile {
            file: Box::new(file),
            family,
            config: config.map(Path::to_path_buf),
        })
    }

    /// The folder or the file.
    pub fn path(&self) -> &Path {
        match self {
            Source::Folder(dir) => dir,
            Source::SingleFile { file, .. } => file.path(),
        }
    }

    /// The pipeline class the source holds (`model_index.json`'s, or the family's).
    pub fn pipeline_class(&self) -> Result<String> {
        match self {
            Source::Folder(dir) => Ok(crate::ModelIndex::read(dir)?.class),
            Source::SingleFile { family, config, .. } => Ok(match (family, config) {
                (_, Some(c)) if c.join("model_index.json").is_file() => {
                    crate::ModelIndex::read(c)?.class
                }
                (Family::Sd1Inpaint | Family::Sd2Inpaint, _) => {
                    "StableDiffusionInpaintPipeline".to_string()
                }
                (Family::Sdxl, _) => "StableDiffusionXLPipeline".to_string(),
                (Family::SdxlRefiner, _) => "StableDiffusionXLImg2ImgPipeline".to_string(),
                _ => "StableDiffusionPipeline".to_string(),
            }),
        }
    }

    /// A component's config: `<component>/config.json` of the folder (or config folder), else
    /// the built-in one.
    pub fn config<T: DeserializeOwned>(&self, component: &str) -> Result<T> {
        let file = if component == "scheduler" {
            "scheduler_config.json"
        } else {
            "config.json"
        };
        match self {
            Source::Folder(dir) => {
                diffuse_loaders::read_config(&crate::component_dir(dir, component)?.join(file))
            }
            Source::SingleFile {
                config: Some(c), ..
            } => diffuse_loaders::read_config(&crate::component_dir(c, component)?.join(file)),
            Source::SingleFile {
                family,
                config: None,
                file: f,
            } => {
                let text = builtin(*family, component).ok_or_else(|| {
                    Error::invalid(format!(
                        "{}: no built-in `{component}` config for {}; pass --config <diffusers folder>",
                        f.path().display(),
                        family.name()
                    ))
                })?;
                let mut json: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| Error::invalid(format!("built-in {component} config: {e}")))?;
                // SD 2.x inpainting: SD 2.1's architecture with 9 input channels, trained
                // with epsilon prediction at 512 px.
                if *family == Family::Sd2Inpaint {
                    match component {
                        "unet" => {
                            json["in_channels"] = 9.into();
                            json["sample_size"] = 64.into();
                        }
                        "scheduler" => json["prediction_type"] = "epsilon".into(),
                        _ => {}
                    }
                }
                diffuse_loaders::parse_config(
                    &json.to_string(),
                    &format!("built-in {component} config"),
                )
            }
        }
    }

    /// The CLIP tokenizer of `component` (`tokenizer`, `tokenizer_2`).
    pub fn tokenizer(&self, component: &str) -> Result<ClipTokenizer> {
        let dir = match self {
            Source::Folder(d) => Some(crate::component_dir(d, component)?),
            Source::SingleFile {
                config: Some(c), ..
            } if c.join(component).is_dir() => Some(c.join(component)),
            Source::SingleFile { .. } => None,
        };
        match (dir, self) {
            (Some(d), _) => ClipTokenizer::from_dir(&d),
            (None, Source::SingleFile { family, .. }) => {
                // OpenCLIP encoders pad with `!`, OpenAI CLIP with `<|endoftext|>`.
                let open_clip = matches!(family, Family::Sd2 | Family::Sd2Inpaint)
                    || component == "tokenizer_2";
                ClipTokenizer::builtin(if open_clip { "!" } else { "<|endoftext|>" })
            }
            (None, Source::Folder(_)) => unreachable!("a folder always names its tokenizer dir"),
        }
    }

    /// The scheduler: `opts.scheduler` (a class or A1111 name) built on the source's scheduler
    /// config, else the config's own class.
    pub fn scheduler(&self, opts: &LoadOptions) -> Result<Box<dyn Scheduler>> {
        let dir = match self {
            Source::Folder(d) => Some(d.as_path()),
            Source::SingleFile { config, .. } => config.as_deref(),
        };
        let cfg = match dir {
            Some(d) => SchedulerConfig::from_file(
                &crate::component_dir(d, "scheduler")?.join("scheduler_config.json"),
            )?,
            None => {
                let json: serde_json::Value = self.config("scheduler")?;
                SchedulerConfig::from_json_str(&json.to_string())?
            }
        };
        match &opts.scheduler {
            Some(name) => diffuse_schedulers::from_name(name, &cfg),
            None => diffuse_schedulers::from_own_config(&cfg),
        }
    }

    /// The weights of a component. `blocks`/`layers_per_block` place the blocks of a single
    /// file's UNet/VAE; for a text encoder `blocks` is its layer count (the config's: SD 2.x
    /// files store one more OpenCLIP block than the diffusers encoder has).
    pub fn backend(
        &self,
        component: &str,
        variant: Option<&str>,
        blocks: usize,
        layers_per_block: usize,
    ) -> Result<CheckedBackend> {
        match self {
            Source::Folder(dir) => {
                let files = diffuse_loaders::component_weight_files(
                    &crate::component_dir(dir, component)?,
                    variant,
                )?;
                CheckedBackend::open(&files)
            }
            Source::SingleFile { file, family, .. } => match component {
                "unet" => file.unet(blocks, layers_per_block),
                "vae" => file.vae(blocks, layers_per_block),
                "text_encoder" | "text_encoder_2" => {
                    let encoders = file.text_encoders(*family);
                    // SDXL's second encoder is the second entry; the refiner has only it.
                    let i = match (family, component) {
                        (Family::SdxlRefiner, "text_encoder_2") => 0,
                        (Family::SdxlRefiner, _) => usize::MAX,
                        _ => usize::from(component == "text_encoder_2"),
                    };
                    let mut layout: TextEncoderLayout =
                        encoders.get(i).cloned().ok_or_else(|| {
                            Error::invalid(format!(
                                "{}: a {} checkpoint has no {component}",
                                file.path().display(),
                                family.name()
                            ))
                        })?;
                    if let TextEncoderLayout::OpenClip { layers, .. } = &mut layout {
                        *layers = blocks;
                    }
                    file.text_encoder(&layout)
                }
                other => Err(Error::invalid(format!(
                    "{}: a single file holds no `{other}` component",
                    file.path().display()
                ))),
            },
        }
    }

    /// Keys of a single file that no component of `claimed` took (an unknown layout).
    pub fn check_unclaimed(&self, claimed: &[&str]) -> Result<()> {
        if let Source::SingleFile { file, .. } = self {
            let left = file.unclaimed(claimed);
            if !left.is_empty() {
                let shown: Vec<&str> = left.iter().take(20).map(String::as_str).collect();
                return Err(Error::Weights(format!(
                    "{}: {} tensors belong to no component this loader knows (unknown key \
                     layout?): {}{}",
                    file.path().display(),
                    left.len(),
                    shown.join(", "),
                    if left.len() > 20 { ", ..." } else { "" }
                )));
            }
        }
        Ok(())
    }
}

/// The LoRA files of a load, applied component by component; every module must land.
pub(crate) struct Adapters {
    files: Vec<(LoraFile, f64)>,
    /// (file index, module key) of every module that found its weight.
    placed: RefCell<BTreeSet<(usize, String)>>,
}

impl Adapters {
    pub fn open(specs: &[LoraSpec]) -> Result<Self> {
        let files = specs
            .iter()
            .map(|s| Ok((LoraFile::load(&s.path)?, s.scale)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            files,
            placed: RefCell::new(BTreeSet::new()),
        })
    }

    /// Adds every LoRA's updates for `component` to its weights.
    pub fn apply(
        &self,
        component: &str,
        backend: &CheckedBackend,
        ldm: &HashMap<String, String>,
    ) -> Result<()> {
        let names = backend.names();
        for (i, (file, scale)) in self.files.iter().enumerate() {
            let (patches, unmatched) = file.patches(component, *scale, &names, ldm);
            let keys: Vec<String> = file
                .modules
                .iter()
                .filter(|m| m.component == component)
                .map(|m| m.key.clone())
                .collect();
            let unmatched_names = backend
                .add_patches(patches)
                .map_err(|e| Error::Weights(format!("{}: {e}", file.path.display())))?;
            debug_assert!(
                unmatched_names.is_empty(),
                "patch names come from the backend"
            );
            let mut placed = self.placed.borrow_mut();
            for k in keys.into_iter().filter(|k| !unmatched.contains(k)) {
                placed.insert((i, k));
            }
        }
        Ok(())
    }

    /// Fails naming every module of every file that found no weight (a LoRA for another
    /// architecture, or for a component this pipeline lacks).
    pub fn finish(&self) -> Result<()> {
        let placed = self.placed.borrow();
        for (i, (file, _)) in self.files.iter().enumerate() {
            let left: Vec<&str> = file
                .modules
                .iter()
                .filter(|m| !placed.contains(&(i, m.key.clone())))
                .map(|m| m.key.as_str())
                .collect();
            if !left.is_empty() {
                let shown: Vec<&str> = left.iter().take(12).copied().collect();
                return Err(Error::Weights(format!(
                    "{}: {} of its {} LoRA modules match no layer of this model (a LoRA for \
                     another architecture?): {}{}",
                    file.path.display(),
                    left.len(),
                    file.modules.len(),
                    shown.join(", "),
                    if left.len() > 12 { ", ..." } else { "" }
                )));
            }
        }
        Ok(())
    }
}

/// Builds one component from its backend with the LoRA updates for it fused in.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build<M>(
    source: &Source,
    adapters: &Adapters,
    component: &str,
    variant: Option<&str>,
    (blocks, layers_per_block): (usize, usize),
    dtype: DType,
    device: &Device,
    new: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    let backend = source.backend(component, variant, blocks, layers_per_block)?;
    let ldm = match (component, source) {
        ("unet", _) => diffuse_loaders::single_file::unet_original_modules(
            &backend.names(),
            blocks,
            layers_per_block,
        ),
        _ => HashMap::new(),
    };
    adapters.apply(component, &backend, &ldm)?;
    diffuse_loaders::load_with(&backend, dtype, device, new)
}

/// The UNet of a Stable Diffusion family pipeline from its `config` (read and validated by the
/// caller, which may check it first), with the LoRA updates for it fused in.
pub(crate) fn build_unet(
    source: &Source,
    adapters: &Adapters,
    cfg: &UNet2DConditionConfig,
    opts: &LoadOptions,
) -> Result<UNet2DConditionModel> {
    let layout = (cfg.block_out_channels.len(), cfg.layers_per_block.get(0));
    build(
        source,
        adapters,
        "unet",
        opts.variant.as_deref(),
        layout,
        opts.dtype,
        &opts.device,
        |vb| UNet2DConditionModel::new(vb, cfg),
    )
}

/// The UNet weights of a Stable Diffusion model (a diffusers folder or a single file, as
/// [`crate::load_pipeline`] takes it) under their diffusers names, in `opts.dtype` on
/// `opts.device`, with the UNet's config: what adapter training rebuilds the UNet from at each
/// step. (`opts.loras` are not applied.)
pub fn unet_weights(
    path: &Path,
    opts: &LoadOptions,
) -> Result<(UNet2DConditionConfig, HashMap<String, candle_core::Tensor>)> {
    let source = Source::open(path, opts.config.as_deref())?;
    let cfg: UNet2DConditionConfig = source.config("unet")?;
    cfg.validate()?;
    let layout = (cfg.block_out_channels.len(), cfg.layers_per_block.get(0));
    let weights = component_weights(&source, "unet", layout, opts)?;
    Ok((cfg, weights))
}

/// The text encoder weights of a Stable Diffusion model, as [`unet_weights`] reads the UNet's,
/// under transformers' names (`text_model.…`, also for files stored without that prefix).
pub fn text_encoder_weights(
    path: &Path,
    opts: &LoadOptions,
) -> Result<(ClipTextConfig, HashMap<String, candle_core::Tensor>)> {
    let source = Source::open(path, opts.config.as_deref())?;
    let cfg: ClipTextConfig = source.config("text_encoder")?;
    cfg.validate("text_encoder config")?;
    let weights = component_weights(&source, "text_encoder", (cfg.num_hidden_layers, 0), opts)?
        .into_iter()
        .map(|(name, t)| match name.starts_with("text_model.") {
            true => (name, t),
            false => (format!("text_model.{name}"), t),
        })
        .collect();
    Ok((cfg, weights))
}

/// Every tensor of a component, in `opts.dtype` on `opts.device`.
fn component_weights(
    source: &Source,
    component: &str,
    (blocks, layers_per_block): (usize, usize),
    opts: &LoadOptions,
) -> Result<HashMap<String, candle_core::Tensor>> {
    let backend = source.backend(component, opts.variant.as_deref(), blocks, layers_per_block)?;
    backend
        .read_all()?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(opts.dtype)?.to_device(&opts.device)?)))
        .collect()
}

/// The VAE and its dtype: f32 when the pipeline is f16, `upcast` is set and the config asks
/// for it (`force_upcast`: SDXL's VAE overflows in f16). diffusers' SDXL pipelines honour the
/// flag; its SD 1.x/2.x pipelines decode in the pipeline's dtype whatever the flag says (their
/// VAE's config sets it too, by default, and runs fine in f16).
pub(crate) fn build_vae(
    source: &Source,
    adapters: &Adapters,
    opts: &LoadOptions,
    upcast: bool,
) -> Result<(AutoencoderKL, DType)> {
    let cfg: AutoencoderKLConfig = source.config("vae")?;
    cfg.validate()?;
    let dtype = if opts.dtype == DType::F16 && upcast && cfg.force_upcast {
        DType::F32
    } else {
        opts.dtype
    };
    let vae = build(
        source,
        adapters,
        "vae",
        opts.variant.as_deref(),
        (cfg.block_out_channels.len(), cfg.layers_per_block),
        dtype,
        &opts.device,
        |vb| AutoencoderKL::new(vb, &cfg),
    )?;
    Ok((vae, dtype))
}
