//! The flags of `diffuse generate | img2img | inpaint`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::device::DtypeArg;

/// How prompt text is read.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum PromptSyntaxArg {
    /// As diffusers: the text as is, cut at the text encoder's 77 tokens.
    #[default]
    Plain,
    /// AUTOMATIC1111: (word:1.3), (word), [word], \( escapes, BREAK, and prompts of any length
    /// in chunks of 75 tokens.
    A1111,
}

/// Settings shared by every generating subcommand.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// The model: a diffusers folder (with model_index.json), a single-file checkpoint
    /// (.safetensors or .ckpt in the original Stable Diffusion layout) or a hub id in the local
    /// Hugging Face cache. Default: the repository's models/fashion-mnist-ddpm for generate
    /// (when it is there), else the tiny Stable Diffusion pipeline bundled with the repository.
    #[arg(long)]
    pub model: Option<String>,
    /// For a single-file --model: a diffusers folder whose component configs (and tokenizer,
    /// scheduler) describe it. Without it the architecture (SD 1.x and 2.x and their inpainting
    /// models, SDXL base and refiner) is recognised from the file and built-in configs are used.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// What to draw. For a class-conditional DDPM model: a class name (any case) or index;
    /// without it such a model draws a grid with one labelled row per class. With --lora-dir,
    /// `<lora:name:0.8>` tags in it load LoRAs.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// How the prompts are read: `plain` (as diffusers) or `a1111` (weights, long prompts).
    #[arg(long, value_enum, default_value = "plain")]
    pub prompt_syntax: PromptSyntaxArg,
    /// Denoising steps. Default: for DDPM/DDIM models 50 with the DDPM or DDIM scheduler and
    /// 20 with any other (the bundled model's DPM-Solver++); 25 for Stable Diffusion.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; 1 or less disables guidance (and halves the work).
    /// Default: 5 for class-conditional DDPM models (at timesteps 100 to 550: see
    /// --guidance-interval), 7.5 for Stable Diffusion.
    #[arg(value_parser = crate::finite_number, long, alias = "cfg-scale")]
    pub guidance_scale: Option<f64>,
    /// Class-conditional DDPM models: guide only at the timesteps LO to HI (of the 1000 of
    /// training); the other steps take the class's prediction alone, one UNet pass instead of
    /// two. Default 100,550; 0,1000 guides every step.
    #[arg(long, value_name = "LO,HI", value_parser = parse_guidance_interval)]
    pub guidance_interval: Option<(f64, f64)>,
    /// Scheduler: a diffusers class (EulerDiscreteScheduler) or an A1111 name ("Euler a",
    /// "DPM++ 2M Karras"; `diffuse schedulers` lists them). Default: the model's own.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Seed of the torch-compatible generator (same seed, same image as diffusers on CPU).
    /// Random when absent; it is printed either way.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images to generate (per class in a class grid). Default: 8 per class in a class
    /// grid, else 1.
    #[arg(long)]
    pub num_images: Option<usize>,
    /// DDIM eta: 0 is deterministic, 1 adds DDPM-like noise. Other schedulers ignore it.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 0.0)]
    pub eta: f64,
    /// A1111's clip skip: 1 uses the text encoder's last layer, 2 the one before it, ...
    #[arg(long, value_name = "N")]
    pub clip_skip: Option<usize>,
    /// A LoRA to apply, FILE or FILE:SCALE (scale 1 by default); repeat for several. Kohya /
    /// A1111 and diffusers (PEFT) files; fused into the weights once, so it costs nothing per
    /// step.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<String>,
    /// Where `<lora:name:scale>` tags of the prompt look for `name.safetensors`.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// A textual-inversion embedding, FILE or FILE:TOKEN (token: the file stem by default);
    /// repeat for several. A1111 .pt/.safetensors and diffusers learned_embeds files.
    #[arg(long = "embedding", value_name = "FILE[:TOKEN]")]
    pub embeddings: Vec<String>,
    /// Loads every embedding in this folder, each under its file stem.
    #[arg(long, value_name = "DIR")]
    pub embedding_dir: Option<PathBuf>,
    /// `cpu`, or `cuda:N` (needs a build with CUDA support).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the weights and the compute. The SD3, Flux and DiT transformers and the T5
    /// encoder keep bf16/f16 weights and compute in f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// SD3 and Flux: load the text encoders, then the transformer, each only while it runs
    /// (the peak memory is the largest of them, not their sum; the weights are read again
    /// for every run).
    #[arg(long)]
    pub load_on_demand: bool,
    /// A PNG file (or .jpg/.jpeg for JPEG; both keep the generation parameters), or an existing
    /// folder to write `diffuse-<seed>-<n>.png` into. With several images a file name gets
    /// `-<n>` before its extension.
    #[arg(long, short, default_value = "output.png")]
    pub output: PathBuf,
    /// Overwrite existing output files.
    #[arg(long)]
    pub force: bool,
    /// Decode (and encode) images in overlapping tiles of the VAE's native size, blended as
    /// diffusers' enable_tiling does: large images in bounded memory.
    #[arg(long)]
    pub vae_tiling: bool,
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub dist: crate::dist::DistArgs,
}

/// The ControlNet flags: `--controlnet DIR --control-image PNG --controlnet-scale C`, each
/// repeatable (one per ControlNet, in order), and `--control canny:photo.png` for the Canny
/// edges of a photo as the control image.
#[derive(Args, Debug, Clone, Default)]
pub struct ControlArgs {
    /// A ControlNet folder (diffusers `ControlNetModel`) or hub id; repeat for several.
    #[arg(long = "controlnet", value_name = "DIR")]
    pub controlnets: Vec<String>,
    /// The control image of each --controlnet, in the same order: a PNG (resized to the output
    /// size), or `canny:PHOTO` for the Canny edges of a photo (thresholds 100/200).
    #[arg(long = "control-image", alias = "control", value_name = "PNG")]
    pub control_images: Vec<String>,
    /// Conditioning scale: one for every ControlNet or one per ControlNet. Default 1.
    #[arg(value_parser = crate::finite_number, long = "controlnet-scale", value_name = "C")]
    pub scales: Vec<f64>,
    /// Share of the steps after which each ControlNet starts acting (one, or one per
    /// ControlNet). Default 0.
    #[arg(value_parser = crate::finite_number, long = "control-guidance-start", value_name = "F")]
    pub guidance_start: Vec<f64>,
    /// Share of the steps after which each ControlNet stops acting. Default 1.
    #[arg(value_parser = crate::finite_number, long = "control-guidance-end", value_name = "F")]
    pub guidance_end: Vec<f64>,
    /// Guess mode: the ControlNets steer without the prompt's help (scaled from 0.1 at the
    /// shallowest residual to 1 at the bottleneck; only the conditional half of guidance).
    #[arg(long)]
    pub guess_mode: bool,
}

/// `diffuse generate`: text-to-image (or unconditional sampling for DDPM/DDIM folders).
#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Image width in pixels (a multiple of 8). Default: the model's native size.
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (a multiple of 8). Default: the model's native size.
    #[arg(long)]
    pub height: Option<usize>,
    /// SD3 and Flux: T5 tokens the prompt is padded or cut to (1 to 512). Default: 256 for
    /// SD3, 512 for Flux.
    #[arg(long, value_name = "L")]
    pub max_sequence_length: Option<usize>,
    /// DiT: the classes to draw, `--num-images` each, as ids or the model's `id2label` names,
    /// comma-separated (`3,0,9` or `"golden retriever,tabby"`); files `out-0.png`, `out-1.png`, ...
    #[arg(long, value_name = "LIST")]
    pub class_labels: Option<String>,
    /// A text file of prompts, one per line (blank lines and `#` comments skipped), instead of
    /// --prompt: --num-images images of each, the prompt on line k (counting prompts from 0)
    /// with seed --seed + k, so each image is that of `--prompt P --seed S+k`. Into a folder
    /// they are written as `diffuse-<seed+k>-<n>.png`. Under mpirun the ranks split the
    /// images of all the prompts.
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    pub prompts_file: Option<PathBuf>,
    /// Stable Diffusion: A1111's hires fix. Each image is upscaled by this factor (Lanczos, to
    /// a multiple of 8 below) and drawn again by img2img at --hires-strength.
    #[arg(long, value_name = "F", value_parser = crate::finite_number)]
    pub hires_scale: Option<f64>,
    /// Steps of the hires pass (default: --steps).
    #[arg(long, value_name = "N", requires = "hires_scale")]
    pub hires_steps: Option<usize>,
    /// How much the hires pass redraws, in (0, 1].
    #[arg(
        long,
        value_name = "F",
        default_value_t = 0.7,
        value_parser = crate::finite_number,
        requires = "hires_scale"
    )]
    pub hires_strength: f64,
}

/// `diffuse img2img`: redraw an image following a prompt.
#[derive(Args, Debug, Clone)]
pub struct Img2ImgArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The image to start from (its size is rounded down to a multiple of 8).
    #[arg(long)]
    pub init_image: PathBuf,
    /// How much to change it, in (0, 1]: the share of the schedule that runs.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 0.75)]
    pub strength: f64,
    /// Output width (the init image is resized to it). Default: the init image's.
    #[arg(long)]
    pub width: Option<usize>,
    /// Output height. Default: the init image's.
    #[arg(long)]
    pub height: Option<usize>,
}

/// `diffuse inpaint`: repaint the white part of a mask.
#[derive(Args, Debug, Clone)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The image to repaint.
    #[arg(long)]
    pub init_image: PathBuf,
    /// Mask image, white = repaint, black = keep (converted to grayscale, thresholded at 50%).
    #[arg(long)]
    pub mask: PathBuf,
    /// 1 starts from pure noise under the mask; lower keeps more of the original.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1.0)]
    pub strength: f64,
    /// Output width (a multiple of 8; the image and mask are resized to it). Default: the
    /// image's width.
    #[arg(long)]
    pub width: Option<usize>,
    /// Output height, as --width.
    #[arg(long)]
    pub height: Option<usize>,
}

/// `LO,HI` of `--guidance-interval`: two timesteps, the lower first.
pub fn parse_guidance_interval(s: &str) -> Result<(f64, f64), String> {
    let bad = || format!("{s:?}: give two timesteps as LO,HI, e.g. 200,800");
    let (lo, hi) = s.split_once(',').ok_or_else(bad)?;
    let (lo, hi): (f64, f64) = (
        lo.trim().parse().map_err(|_| bad())?,
        hi.trim().parse().map_err(|_| bad())?,
    );
    diffuse_pipelines::check_guidance_interval(Some((lo, hi))).map_err(|e| e.to_string())?;
    Ok((lo, hi))
}
