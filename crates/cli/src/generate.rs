//! `diffuse generate | img2img | inpaint`: run a pipeline folder and write PNGs.
//!
//! Each PNG carries the settings in an AUTOMATIC1111-style `parameters` text chunk, so tools
//! that read A1111 images show them, and a run can be reproduced from its file.
//!
//! Started by `mpirun -np N` (or `srun`), the ranks split `--num-images`: each makes a
//! contiguous share of the batch, with the noise those images have in the whole batch, and
//! writes its files, so the files are those of a single-process run, byte for byte.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use diffuse_core::BatchShard;
use diffuse_dist::{eprint_line, report, Comm, Dist};
use diffuse_pipelines::png_info::InfoText;
use diffuse_pipelines::{
    load_pipeline, GenerationParams, Img2ImgRequest, InpaintRequest, LoadOptions, Pipeline,
    StableDiffusionPipeline, StepCallback, StepInfo, Text2ImageRequest, Timings,
    UnconditionalPipeline, UnconditionalRequest,
};
use image::DynamicImage;
use indicatif::{ProgressBar, ProgressStyle};

use crate::label_grid::labelled_grid;

/// Weight and compute precision.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Settings shared by every generating subcommand.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Pipeline folder (diffusers layout with model_index.json) or a hub id in the local
    /// Hugging Face cache. Default: the repository's models/fashion-mnist-ddpm for generate
    /// (when it is there), else the tiny Stable Diffusion pipeline bundled with the repository.
    #[arg(long)]
    pub model: Option<String>,
    /// What to draw. For a class-conditional DDPM model: a class name (any case) or index;
    /// without it such a model draws a grid with one labelled row per class.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps. Default: 50 for DDPM/DDIM models, 25 for Stable Diffusion.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; 1 or less disables guidance (and halves the work).
    /// Default: 3 for class-conditional DDPM models, 7.5 for Stable Diffusion.
    #[arg(long, alias = "cfg-scale")]
    pub guidance_scale: Option<f64>,
    /// Scheduler: a diffusers class (EulerDiscreteScheduler) or an A1111 name ("Euler a",
    /// "DPM++ 2M Karras"). Default: the model folder's own.
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
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// `cpu`, or `cuda:N` (needs a build with CUDA support).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the weights and the compute.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// A PNG file, or an existing folder to write `diffuse-<seed>-<n>.png` into. With several
    /// images a file name gets `-<n>` before its extension.
    #[arg(long, short, default_value = "output.png")]
    pub output: PathBuf,
    /// Overwrite existing output files.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub dist: crate::dist::DistArgs,
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
    #[arg(long, default_value_t = 0.75)]
    pub strength: f64,
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
    #[arg(long, default_value_t = 1.0)]
    pub strength: f64,
}

/// Runs a generating command as one rank of its job (of one process when not launched by
/// mpirun/srun); an error on one rank ends the job.
fn as_rank(common: &CommonArgs, run: impl FnOnce(&Dist) -> Result<()>) -> Result<()> {
    let dist = common.dist.init()?;
    let result = run(&dist);
    dist.finish(result)
}

pub fn run_generate(args: GenerateArgs) -> Result<()> {
    as_rank(&args.common, |dist| generate(&args, dist))
}

fn generate(args: &GenerateArgs, dist: &Dist) -> Result<()> {
    let session = Session::open(&args.common, false, dist)?;
    match &session.pipeline {
        Pipeline::Unconditional(p) => generate_unconditional(&session, p, args),
        Pipeline::StableDiffusion(p) => {
            let (dh, dw) = p.default_size();
            let (h, w) = (args.height.unwrap_or(dh), args.width.unwrap_or(dw));
            let outputs = session.output_paths(w, h)?;
            let req = Text2ImageRequest {
                params: session.params(),
                height: Some(h),
                width: Some(w),
                latents: None,
            };
            session.run_sd(p, &outputs, |p, cb| p.text_to_image(&req, cb))
        }
    }
}

/// DDPM/DDIM sampling; a class-conditional model draws the `--prompt` class, or without one
/// a grid with one labelled row per class.
fn generate_unconditional(
    session: &Session,
    p: &UnconditionalPipeline,
    args: &GenerateArgs,
) -> Result<()> {
    let (c, h, w) = p.image_shape();
    if args.width.is_some() || args.height.is_some() {
        bail!(
            "{} generates {w}x{h} images only; drop --width/--height",
            p.class_name
        );
    }
    if c != 1 && c != 3 {
        bail!("the model makes {c}-channel images; only grayscale and RGB can be saved");
    }
    let prompt = session.args.prompt.trim();
    let n = session.num_images;
    let grid = !p.class_names.is_empty() && prompt.is_empty();
    if grid && session.comm.size() > 1 {
        bail!(
            "a class grid is one picture, made by one process: name a class with --prompt to \
             split the images among the ranks, or run without mpirun"
        );
    }
    let rows = session.rows.clone();
    let (class_labels, class_text) = if p.class_names.is_empty() {
        if !prompt.is_empty() {
            eprintln!(
                "note: {} is unconditional; the prompt is ignored",
                p.class_name
            );
        }
        (None, None)
    } else if grid {
        let labels = (0..p.class_names.len())
            .flat_map(|k| std::iter::repeat_n(k, n))
            .collect();
        (Some(labels), Some("all, one row per class".to_string()))
    } else {
        let k = parse_class(&p.class_names, prompt)?;
        (Some(vec![k; rows.len()]), Some(p.class_names[k].clone()))
    };
    let parameters = session.parameters_text(w, h, class_text.as_deref());
    let outputs = session.output_files(if grid { 1 } else { n }, parameters)?;
    if rows.is_empty() {
        return session.done(0);
    }
    let req = UnconditionalRequest {
        batch_size: class_labels.as_ref().map_or(rows.len(), Vec::len),
        steps: session.steps,
        eta: session.args.eta,
        seed: session.seed,
        class_labels,
        guidance_scale: session.guidance_scale,
        shard: session.shard(),
    };
    let bar = session.progress_bar();
    let out = p.generate(&req, Some(&mut step_callback(&bar)))?;
    bar.finish_and_clear();
    let images: Vec<DynamicImage> = if c == 1 {
        out.gray.into_iter().map(DynamicImage::ImageLuma8).collect()
    } else {
        out.rgb.into_iter().map(DynamicImage::ImageRgb8).collect()
    };
    let images = if grid {
        vec![labelled_grid(&p.class_names, &images, n)?]
    } else {
        images
    };
    let made = images.len();
    session.save(images, &outputs)?;
    let timings = Timings {
        denoise: out.denoise,
        ..Default::default()
    };
    session.print_timings(&timings);
    session.done(made)
}

/// The class a `--prompt` names: a class name (any case) or a class index.
fn parse_class(names: &[String], prompt: &str) -> Result<usize> {
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
    bail!(
        "unknown class `{prompt}`; the model's classes are: {}",
        valid.join(", ")
    )
}

pub fn run_img2img(args: Img2ImgArgs) -> Result<()> {
    as_rank(&args.common, |dist| img2img(&args, dist))
}

fn img2img(args: &Img2ImgArgs, dist: &Dist) -> Result<()> {
    let session = Session::open(&args.common, true, dist)?;
    let p = session.stable_diffusion("img2img")?;
    let image = read_image(&args.init_image)?.to_rgb8();
    let f = p.vae_scale_factor() as u32;
    let outputs = session.output_paths(
        (image.width() - image.width() % f) as usize,
        (image.height() - image.height() % f) as usize,
    )?;
    let req = Img2ImgRequest {
        params: session.params(),
        image,
        strength: args.strength,
    };
    session.run_sd(p, &outputs, |p, cb| p.img2img(&req, cb))
}

pub fn run_inpaint(args: InpaintArgs) -> Result<()> {
    as_rank(&args.common, |dist| inpaint(&args, dist))
}

fn inpaint(args: &InpaintArgs, dist: &Dist) -> Result<()> {
    let session = Session::open(&args.common, true, dist)?;
    let p = session.stable_diffusion("inpaint")?;
    let image = read_image(&args.init_image)?.to_rgb8();
    let mask = read_image(&args.mask)?.to_luma8();
    let f = p.vae_scale_factor() as u32;
    let outputs = session.output_paths(
        (image.width() - image.width() % f) as usize,
        (image.height() - image.height() % f) as usize,
    )?;
    let req = InpaintRequest {
        params: session.params(),
        image,
        mask,
        strength: args.strength,
        height: None,
        width: None,
        latents: None,
    };
    session.run_sd(p, &outputs, |p, cb| p.inpaint(&req, cb))
}

/// A loaded pipeline with the settings of one command.
struct Session {
    args: CommonArgs,
    pipeline: Pipeline,
    seed: u64,
    /// `--steps`, `--guidance-scale` and `--num-images` with the pipeline's defaults filled in.
    steps: usize,
    guidance_scale: f64,
    num_images: usize,
    /// Shown in the PNG metadata.
    model_name: String,
    /// The ranks sharing the images, and this rank's share of `0..num_images`.
    comm: Arc<dyn Comm>,
    rows: Range<usize>,
    started: Instant,
}

impl Session {
    /// `image_task`: img2img and inpainting, which need a Stable Diffusion pipeline (and so
    /// default to the tiny one).
    fn open(args: &CommonArgs, image_task: bool, dist: &Dist) -> Result<Self> {
        let comm = dist.comm();
        if args.num_images == Some(0) {
            bail!("--num-images must be at least 1");
        }
        if args.steps == Some(0) {
            bail!("--steps must be at least 1");
        }
        // Fail on a bad output path before the (slow) model load.
        check_output_parent(&args.output)?;
        let device = parse_device(&args.device)?;
        let dir = match &args.model {
            Some(spec) => diffuse_loaders::resolve_model(spec, None)?,
            None => default_model(image_task),
        };
        let opts = LoadOptions {
            dtype: args.dtype.into(),
            device,
            scheduler: args.scheduler.clone(),
            ..Default::default()
        };
        let pipeline = load_pipeline(&dir, &opts)
            .with_context(|| format!("loading the pipeline in {}", dir.display()))?;
        let mut seed = args.seed.unwrap_or_else(random_seed);
        if comm.size() > 1 {
            // Every rank draws from rank 0's seed (each picked its own random one).
            seed = comm.all_gather_u64("the seed", seed)?[0];
        }
        if comm.rank() == 0 {
            eprintln!("seed: {seed}");
        }
        let model_name = match &args.model {
            Some(spec) if !Path::new(spec).is_dir() => spec.clone(),
            _ => dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string()),
        };
        let (uncond, class_grid) = match &pipeline {
            Pipeline::Unconditional(p) => (
                true,
                !p.class_names.is_empty() && args.prompt.trim().is_empty(),
            ),
            Pipeline::StableDiffusion(_) => (false, false),
        };
        let class_cond =
            matches!(&pipeline, Pipeline::Unconditional(p) if !p.class_names.is_empty());
        let num_images = args.num_images.unwrap_or(if class_grid { 8 } else { 1 });
        let rows = if class_grid {
            0..num_images
        } else {
            diffuse_dist::shard(num_images, comm.rank(), comm.size())
        };
        report(
            comm.as_ref(),
            format_args!("images {}..{} of {num_images}", rows.start, rows.end),
        );
        Ok(Self {
            args: args.clone(),
            steps: args.steps.unwrap_or(if uncond { DDPM_STEPS } else { 25 }),
            guidance_scale: args.guidance_scale.unwrap_or(match (uncond, class_cond) {
                (_, true) => CLASS_GUIDANCE,
                (true, false) => 1.0,
                (false, _) => 7.5,
            }),
            num_images,
            pipeline,
            seed,
            model_name,
            comm,
            rows,
            started: Instant::now(),
        })
    }

    /// What the pipeline makes of the batch: this rank's share, when several share it.
    fn shard(&self) -> Option<BatchShard> {
        (self.comm.size() > 1).then_some(BatchShard {
            batch: self.num_images,
            start: self.rows.start,
        })
    }

    /// Rank 0's progress bar; the other ranks run silently.
    fn progress_bar(&self) -> ProgressBar {
        if self.comm.rank() == 0 {
            progress_bar("denoising")
        } else {
            ProgressBar::hidden()
        }
    }

    fn print_timings(&self, t: &Timings) {
        if self.comm.rank() == 0 {
            print_timings(t, self.steps);
        }
    }

    /// Waits for every rank to have written its `made` images; rank 0 then reports the
    /// job's throughput (from model loaded to the last rank done).
    fn done(&self, made: usize) -> Result<()> {
        let comm = self.comm.as_ref();
        let secs = self.started.elapsed().as_secs_f64();
        let all = comm.all_gather_u64("the end of generation", made as u64)?;
        let slowest = comm.all_gather_u64("the end of generation", (secs * 1e6) as u64)?;
        if comm.rank() == 0 {
            let total: u64 = all.iter().sum();
            let secs = slowest.iter().copied().max().unwrap_or(0) as f64 / 1e6;
            eprint_line(format_args!(
                "generated {total} images in {secs:.2}s ({:.2} images/s{})",
                total as f64 / secs.max(1e-9),
                match comm.size() {
                    1 => String::new(),
                    n => format!(", {n} ranks together"),
                }
            ));
        }
        Ok(())
    }

    fn stable_diffusion(&self, task: &str) -> Result<&StableDiffusionPipeline> {
        match &self.pipeline {
            Pipeline::StableDiffusion(p) => Ok(p),
            other => bail!(
                "{task} needs a Stable Diffusion pipeline; this folder holds a {}",
                other.class_name()
            ),
        }
    }

    fn params(&self) -> GenerationParams {
        GenerationParams {
            prompts: vec![self.args.prompt.clone()],
            negative_prompts: vec![self.args.negative_prompt.clone()],
            guidance_scale: self.guidance_scale,
            num_images_per_prompt: self.rows.len(),
            shard: self.shard(),
            steps: self.steps,
            eta: self.args.eta,
            seed: self.seed,
            ..Default::default()
        }
    }

    /// Runs a Stable Diffusion task with a progress bar, then saves and reports.
    fn run_sd(
        &self,
        p: &StableDiffusionPipeline,
        outputs: &[OutputFile],
        run: impl FnOnce(
            &StableDiffusionPipeline,
            Option<&mut StepCallback<'_>>,
        ) -> diffuse_core::Result<diffuse_pipelines::ImageOutput>,
    ) -> Result<()> {
        if self.rows.is_empty() {
            return self.done(0);
        }
        let bar = self.progress_bar();
        let out = run(p, Some(&mut step_callback(&bar)))?;
        bar.finish_and_clear();
        if self.comm.rank() == 0 {
            for w in &out.warnings {
                eprintln!("warning: {w}");
            }
        }
        let made = out.rgb.len();
        self.save(
            out.rgb.into_iter().map(DynamicImage::ImageRgb8).collect(),
            outputs,
        )?;
        self.print_timings(&out.timings);
        self.done(made)
    }

    /// Where this rank's images go, checked before any work: no overwriting without
    /// `--force`.
    fn output_paths(&self, width: usize, height: usize) -> Result<Vec<OutputFile>> {
        self.output_files(self.num_images, self.parameters_text(width, height, None))
    }

    /// The output files of this rank's share of `n` images (all `n` for one file such as a
    /// grid), all with the `parameters` text.
    fn output_files(&self, n: usize, parameters: String) -> Result<Vec<OutputFile>> {
        let out = &self.args.output;
        let paths: Vec<PathBuf> = if out.is_dir() {
            (0..n)
                .map(|i| out.join(format!("diffuse-{}-{i}.png", self.seed)))
                .collect()
        } else if n == 1 {
            vec![out.clone()]
        } else {
            let stem = out.file_stem().unwrap_or_default().to_string_lossy();
            let ext = out
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_else(|| "png".into());
            (0..n)
                .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
                .collect()
        };
        let paths = if n == self.num_images {
            paths[self.rows.clone()].to_vec()
        } else {
            paths
        };
        for p in &paths {
            if p.exists() && !self.args.force {
                bail!("{} exists; pass --force to overwrite it", p.display());
            }
        }
        Ok(paths
            .into_iter()
            .map(|path| OutputFile {
                path,
                parameters: parameters.clone(),
            })
            .collect())
    }

    /// The A1111 `parameters` text; `class` is the class of a class-conditional model.
    fn parameters_text(&self, width: usize, height: usize, class: Option<&str>) -> String {
        let a = &self.args;
        InfoText {
            prompt: a.prompt.clone(),
            negative_prompt: a.negative_prompt.clone(),
            steps: self.steps,
            sampler: a
                .scheduler
                .clone()
                .unwrap_or_else(|| self.pipeline.scheduler_name().to_string()),
            cfg_scale: self.guidance_scale,
            seed: self.seed,
            width,
            height,
            model: self.model_name.clone(),
            extra: class
                .map(|c| vec![("Class".to_string(), c.to_string())])
                .unwrap_or_default(),
        }
        .to_string()
    }

    fn save(&self, images: Vec<DynamicImage>, outputs: &[OutputFile]) -> Result<()> {
        if images.len() != outputs.len() {
            bail!(
                "the pipeline returned {} images, {} were expected",
                images.len(),
                outputs.len()
            );
        }
        for (img, out) in images.iter().zip(outputs) {
            write_png(img, out, self.args.force)?;
            println!("wrote {}", out.path.display());
        }
        Ok(())
    }
}

struct OutputFile {
    path: PathBuf,
    parameters: String,
}

/// The repository's trained Fashion-MNIST model when it is there (and the task is plain
/// generation), else the tiny Stable Diffusion pipeline in its fixtures (both work from a
/// source checkout).
/// Default steps for DDPM/DDIM models (`generate` and `eval`).
pub const DDPM_STEPS: usize = 50;
/// Default guidance scale for class-conditional DDPM models (`generate` and `eval`): for the
/// bundled Fashion-MNIST model, the scale with the lowest Fréchet distance of a sweep over
/// 1–5 (see its README).
pub const CLASS_GUIDANCE: f64 = 3.0;

/// The bundled models (`models/...` in the repository).
pub fn bundled(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name);
    p.canonicalize().unwrap_or(p)
}

fn default_model(image_task: bool) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let trained = repo.join("models/fashion-mnist-ddpm");
    if !image_task && trained.join("model_index.json").is_file() {
        trained
    } else {
        repo.join("fixtures/pipelines/tiny_sd")
    }
}

pub(crate) fn parse_device(spec: &str) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("bad device `{spec}`; use cpu or cuda:N"))?,
        None => bail!("unknown device `{spec}`; use cpu or cuda:N"),
    };
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "device `{spec}`: this diffuse binary was built without CUDA support; use --device cpu"
        );
    }
    Device::new_cuda(ordinal).with_context(|| format!("opening {spec}"))
}

fn check_output_parent(out: &Path) -> Result<()> {
    if out.is_dir() {
        return Ok(());
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "output folder {} does not exist; create it first",
            parent.display()
        );
    }
    Ok(())
}

/// A seed from the OS-seeded hasher (no rand dependency), kept below 2^32 as A1111 seeds are.
fn random_seed() -> u64 {
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

fn read_image(path: &Path) -> Result<image::DynamicImage> {
    image::open(path).with_context(|| format!("reading image {}", path.display()))
}

pub(crate) fn progress_bar(what: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// Advances the bar once per denoising step.
fn step_callback(bar: &ProgressBar) -> impl FnMut(StepInfo<'_>) -> diffuse_core::Result<()> + '_ {
    move |info| {
        bar.set_length(info.num_steps as u64);
        bar.set_position(info.step as u64 + 1);
        Ok(())
    }
}

fn print_timings(t: &Timings, steps: usize) {
    let s = |d: Duration| d.as_secs_f64();
    let rate = if t.denoise.is_zero() {
        0.0
    } else {
        steps as f64 / s(t.denoise)
    };
    eprintln!(
        "time: text encode {:.2}s, image encode {:.2}s, denoise {:.2}s ({rate:.2} it/s), decode {:.2}s",
        s(t.text_encode),
        s(t.image_encode),
        s(t.denoise),
        s(t.decode)
    );
}

/// Writes the PNG with its `parameters` chunk to a temp file, then renames it into place, so
/// an interrupted run never leaves a partial PNG behind.
fn write_png(img: &DynamicImage, out: &OutputFile, force: bool) -> Result<()> {
    let bytes = diffuse_pipelines::png_info::encode_png(img, Some(&out.parameters))?;
    let dir = match out.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output.png".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        let mut file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        if out.path.exists() && !force {
            bail!(
                "{} appeared meanwhile; pass --force to overwrite it",
                out.path.display()
            );
        }
        std::fs::rename(&tmp, &out.path)
            .with_context(|| format!("moving the image to {}", out.path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", out.path.display()))
}
