//! `diffuse generate | img2img | inpaint`: load a model (with LoRAs and embeddings), run one
//! task through `diffuse_pipelines::task::run_task` (the same code path as the server, so the
//! same settings give the same PNG bytes) and write PNGs with A1111 infotext.
//!
//! Started by `mpirun -np N` (or `srun`), the ranks split the task's images: each makes a
//! contiguous share of the batch (`TaskSettings::shard`), with rank 0's seed and the noise
//! those images have in the whole batch, and writes its files, so the files are those of a
//! single-process run, byte for byte.

pub(crate) mod args;
mod control;
mod output;

use std::cell::Cell;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diffuse_dist::{eprint_line, report, Comm, Dist};
use diffuse_pipelines::png_info::InfoText;
use diffuse_pipelines::prompt_weighting::{extract_lora_tags, PromptSyntax};
use diffuse_pipelines::task::{
    interval_info, model_display_name, parse_class, planned_images, random_seed, run_task,
    HiresFix, InitImage, TaskSettings,
};
use diffuse_pipelines::{
    find_lora, load_pipeline, ControlNetRequest, EmbeddingSpec, LoadOptions, LoraSpec, Pipeline,
    StepInfo, Timings, UnconditionalPipeline, UnconditionalRequest,
};
use image::DynamicImage;
use indicatif::{ProgressBar, ProgressStyle};

pub use args::{CommonArgs, GenerateArgs, Img2ImgArgs, InpaintArgs, PromptSyntaxArg};
pub use diffuse_pipelines::task::{class_guidance_interval, unconditional_steps, CLASS_GUIDANCE};
pub use output::{check_output_parent, write_image};

use crate::label_grid::labelled_grid;

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
    // A bad prompts file fails before the (slow) model load.
    let prompts = args.prompts_file.as_deref().map(read_prompts).transpose()?;
    let session = Session::open(&args.common, false, dist)?;
    if let Pipeline::Unconditional(p) = &session.pipeline {
        if !p.class_names.is_empty() && session.prompt.trim().is_empty() && prompts.is_none() {
            if args.width.is_some() || args.height.is_some() {
                let (_, h, w) = p.image_shape();
                bail!(
                    "{} generates {w}x{h} images only; drop --width/--height",
                    p.class_name
                );
            }
            return class_grid(&session, p);
        }
    }
    let class_labels = args
        .class_labels
        .iter()
        .flat_map(|list| list.split(','))
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let hires = args.hires_scale.map(|scale| HiresFix {
        scale,
        steps: args.hires_steps,
        strength: args.hires_strength,
    });
    let task = TaskSettings {
        width: args.width,
        height: args.height,
        max_sequence_length: args.max_sequence_length,
        class_labels,
        hires,
        ..session.settings()
    };
    match prompts {
        None => session.run(&[task]),
        // Prompt k draws from seed + k: its images are those of `--prompt P --seed S+k`.
        Some(prompts) => session.run(
            &prompts
                .into_iter()
                .enumerate()
                .map(|(k, prompt)| TaskSettings {
                    prompt,
                    seed: task.seed.wrapping_add(k as u64),
                    ..task.clone()
                })
                .collect::<Vec<_>>(),
        ),
    }
}

/// The prompts of a `--prompts-file`: one per line, blank lines and `#` comments skipped.
fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the prompts file {}", path.display()))?;
    let mut prompts = Vec::new();
    for (k, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !extract_lora_tags(line)?.1.is_empty() {
            bail!(
                "{} line {}: <lora:...> tags apply to the whole job; load the LoRA with --lora",
                path.display(),
                k + 1
            );
        }
        prompts.push(line.to_string());
    }
    if prompts.is_empty() {
        bail!("the prompts file {} holds no prompts", path.display());
    }
    Ok(prompts)
}

pub fn run_img2img(args: Img2ImgArgs) -> Result<()> {
    as_rank(&args.common, |dist| img2img(&args, dist))
}

fn img2img(args: &Img2ImgArgs, dist: &Dist) -> Result<()> {
    let session = Session::open(&args.common, true, dist)?;
    let image = read_image(&args.init_image, "init image")?.to_rgb8();
    session.run(&[TaskSettings {
        width: args.width,
        height: args.height,
        init: Some(InitImage {
            image,
            mask: None,
            strength: args.strength,
        }),
        ..session.settings()
    }])
}

pub fn run_inpaint(args: InpaintArgs) -> Result<()> {
    as_rank(&args.common, |dist| inpaint(&args, dist))
}

fn inpaint(args: &InpaintArgs, dist: &Dist) -> Result<()> {
    let session = Session::open(&args.common, true, dist)?;
    let image = read_image(&args.init_image, "init image")?.to_rgb8();
    let mask = read_image(&args.mask, "mask")?.to_luma8();
    session.run(&[TaskSettings {
        width: args.width,
        height: args.height,
        init: Some(InitImage {
            image,
            mask: Some(mask),
            strength: args.strength,
        }),
        ..session.settings()
    }])
}

/// A loaded model and the settings of this run.
struct Session {
    args: CommonArgs,
    pipeline: Pipeline,
    seed: u64,
    /// The prompt without its `<lora:...>` tags.
    prompt: String,
    /// Shown in the PNG metadata.
    model_name: String,
    /// `--controlnet` and its settings.
    controlnet: Option<ControlNetRequest>,
    /// The ranks sharing the images.
    comm: Arc<dyn Comm>,
    /// When the model was loaded (the job's throughput counts from there).
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
        output::check_image_output(&args.output)?;
        let device = crate::device::parse_device(&args.device)?;
        let path = match &args.model {
            Some(spec) if Path::new(spec).exists() => PathBuf::from(spec),
            Some(spec) => diffuse_loaders::resolve_model(spec, None)?,
            None => default_model(image_task),
        };
        let (prompt, tags) = extract_lora_tags(&args.prompt)?;
        let mut loras = args
            .loras
            .iter()
            .map(|s| parse_lora(s))
            .collect::<Result<Vec<_>>>()?;
        for (name, scale) in tags {
            let dir = args.lora_dir.as_ref().with_context(|| {
                format!("the prompt names <lora:{name}>; say where LoRAs are with --lora-dir")
            })?;
            loras.push(LoraSpec {
                path: find_lora(dir, &name)?,
                scale,
            });
        }
        let mut textual_inversions = args
            .embeddings
            .iter()
            .map(|s| parse_embedding(s))
            .collect::<Result<Vec<_>>>()?;
        if let Some(dir) = &args.embedding_dir {
            textual_inversions.extend(
                EmbeddingSpec::all_in(dir)
                    .with_context(|| format!("--embedding-dir {}", dir.display()))?,
            );
        }
        let opts = LoadOptions {
            dtype: args.dtype.into(),
            device,
            scheduler: args.scheduler.clone(),
            config: args.config.clone(),
            loras,
            textual_inversions,
            load_on_demand: args.load_on_demand,
            ..Default::default()
        };
        // Read the control images first: a bad path fails before the (slow) model load.
        let control_images = args.control.read_images()?;
        let mut pipeline = load_pipeline(&path, &opts)
            .with_context(|| format!("loading the model {}", path.display()))?;
        let stable_diffusion = matches!(
            pipeline,
            Pipeline::StableDiffusion(_) | Pipeline::StableDiffusionXL(_)
        );
        if image_task && !stable_diffusion {
            bail!(
                "img2img and inpainting need a Stable Diffusion model; {} holds a {}",
                path.display(),
                pipeline.class_name()
            );
        }
        if args.vae_tiling {
            let name = pipeline.class_name().to_string();
            pipeline
                .vae_mut()
                .with_context(|| format!("--vae-tiling: a {name} has no VAE"))?
                .enable_tiling();
        }
        if !stable_diffusion && !args.control.is_empty() {
            bail!(
                "--controlnet needs a Stable Diffusion model; {} holds a {}",
                path.display(),
                pipeline.class_name()
            );
        }
        let controlnet = args.control.request(control_images, &opts)?;
        let mut seed = args.seed.unwrap_or_else(random_seed);
        if comm.size() > 1 {
            // Every rank draws from rank 0's seed (each picked its own random one).
            seed = comm.all_gather_u64("the seed", seed)?[0];
        }
        if comm.rank() == 0 {
            eprintln!("seed: {seed}");
        }
        let spec = args.model.clone().unwrap_or_default();
        Ok(Self {
            args: args.clone(),
            model_name: model_display_name(&spec, &path),
            pipeline,
            seed,
            prompt,
            controlnet,
            comm,
            started: Instant::now(),
        })
    }

    fn settings(&self) -> TaskSettings {
        let a = &self.args;
        TaskSettings {
            prompt: self.prompt.clone(),
            negative_prompt: a.negative_prompt.clone(),
            steps: a.steps,
            guidance_scale: a.guidance_scale,
            guidance_interval: a.guidance_interval,
            sampler: a.scheduler.clone(),
            seed: self.seed,
            num_images: a.num_images.unwrap_or(1),
            eta: a.eta,
            prompt_syntax: match a.prompt_syntax {
                PromptSyntaxArg::Plain => PromptSyntax::Plain,
                PromptSyntaxArg::A1111 => PromptSyntax::A1111,
            },
            clip_skip: a
                .clip_skip
                .and_then(|k| k.checked_sub(1))
                .filter(|&k| k > 0),
            controlnet: self.controlnet.clone(),
            ..Default::default()
        }
    }

    /// Runs this rank's share of a job's tasks, each with a progress bar, then saves and
    /// reports. The job's images (every task's, in order) are split among the ranks.
    fn run(&self, tasks: &[TaskSettings]) -> Result<()> {
        let counts: Vec<usize> = tasks
            .iter()
            .map(|t| planned_images(&self.pipeline, t))
            .collect();
        let images: Vec<(u64, usize)> = tasks
            .iter()
            .zip(&counts)
            .flat_map(|(t, &n)| (0..n).map(move |i| (t.seed, i)))
            .collect();
        let rows = self.share(images.len());
        // Each rank checks and writes its own files.
        let paths =
            output::output_paths(&self.args.output, &images, rows.clone(), self.args.force)?;
        let mut made = 0;
        let mut first = 0;
        for (task, n) in tasks.iter().zip(counts) {
            // This rank's images of this task, numbered within it.
            let mine = rows.start.max(first) - first..rows.end.min(first + n).max(first) - first;
            first += n;
            if mine.is_empty() {
                continue;
            }
            let settings = TaskSettings {
                shard: (self.comm.size() > 1).then(|| mine.clone()),
                ..task.clone()
            };
            let bar = self.progress_bar();
            let steps_run = Cell::new(0);
            let mut out = run_task(
                &self.pipeline,
                &self.model_name,
                &settings,
                Some(&mut step_callback(&bar, &steps_run)),
            )?;
            // The steps the loops ran (the model's default, or fewer for img2img's strength;
            // both passes of a hires fix).
            let steps = steps_run.get();
            bar.finish_and_clear();
            if self.comm.rank() == 0 {
                for w in &out.warnings {
                    eprintln!("warning: {w}");
                }
            }
            out.show_prompt_as_written(&self.prompt, &self.args.prompt);
            let infotexts: Vec<String> =
                (0..out.images.len()).map(|i| out.infotext_of(i)).collect();
            let to = paths
                .get(made..made + out.images.len())
                .context("the pipeline returned more images than planned")?;
            output::save_all(&out.images, to, &infotexts, self.args.force)?;
            made += out.images.len();
            self.print_timings(&out.timings, steps);
        }
        self.done(made)
    }

    /// This rank's images of the task's `n` (all of them in a job of one), said on stderr.
    fn share(&self, n: usize) -> Range<usize> {
        let comm = self.comm.as_ref();
        let rows = diffuse_dist::shard(n, comm.rank(), comm.size());
        report(
            comm,
            format_args!("images {}..{} of {n}", rows.start, rows.end),
        );
        rows
    }

    /// Rank 0's progress bar; the other ranks run silently.
    fn progress_bar(&self) -> ProgressBar {
        if self.comm.rank() == 0 {
            progress_bar("denoising")
        } else {
            ProgressBar::hidden()
        }
    }

    fn print_timings(&self, t: &Timings, steps: usize) {
        if self.comm.rank() == 0 {
            print_timings(t, steps);
        }
    }

    /// Waits for every rank to have written its `made` images; rank 0 then reports the
    /// job's throughput (from the model loaded to the last rank done).
    fn done(&self, made: usize) -> Result<()> {
        let comm = self.comm.as_ref();
        let secs = self.started.elapsed().as_secs_f64();
        let all = comm.all_gather_u64("the end of generation", made as u64)?;
        let slowest = comm.all_gather_u64("the end of generation", (secs * 1e6) as u64)?;
        if comm.rank() == 0 {
            let total: u64 = all.iter().sum();
            let secs = slowest.iter().copied().max().unwrap_or(0) as f64 / 1e6;
            eprint_line(format_args!(
                "generated {total} image{} in {secs:.2}s ({:.2} images/s{})",
                if total == 1 { "" } else { "s" },
                total as f64 / secs.max(1e-9),
                match comm.size() {
                    1 => String::new(),
                    n => format!(", {n} ranks together"),
                }
            ));
        }
        Ok(())
    }
}

/// A class-conditional model without a class: one labelled row of images per class.
fn class_grid(session: &Session, p: &UnconditionalPipeline) -> Result<()> {
    if session.comm.size() > 1 {
        bail!(
            "a class grid is one picture, made by one process: name a class with --prompt to \
             split the images among the ranks, or run without mpirun"
        );
    }
    let (c, h, w) = p.image_shape();
    if c != 1 && c != 3 {
        bail!("the model makes {c}-channel images; only grayscale and RGB can be saved");
    }
    let n = session.args.num_images.unwrap_or(8);
    let steps = session
        .args
        .steps
        .unwrap_or_else(|| unconditional_steps(p.scheduler.class_name()));
    let guidance = session.args.guidance_scale.unwrap_or(CLASS_GUIDANCE);
    let interval = class_guidance_interval(session.args.guidance_interval, guidance);
    let paths = output::output_paths(
        &session.args.output,
        &[(session.seed, 0)],
        0..1,
        session.args.force,
    )?;
    let labels = (0..p.class_names.len())
        .flat_map(|k| std::iter::repeat_n(k, n))
        .collect::<Vec<_>>();
    let req = UnconditionalRequest {
        batch_size: labels.len(),
        steps,
        eta: session.args.eta,
        seed: session.seed,
        class_labels: Some(labels),
        guidance_scale: guidance,
        guidance_interval: interval,
        shard: None,
    };
    let bar = progress_bar("denoising");
    let out = p.generate(&req, Some(&mut step_callback(&bar, &Cell::new(0))))?;
    bar.finish_and_clear();
    let images: Vec<DynamicImage> = if c == 1 {
        out.gray.into_iter().map(DynamicImage::ImageLuma8).collect()
    } else {
        out.rgb.into_iter().map(DynamicImage::ImageRgb8).collect()
    };
    let grid = labelled_grid(&p.class_names, &images, n)?;
    let infotext = InfoText {
        prompt: String::new(),
        negative_prompt: session.args.negative_prompt.clone(),
        steps,
        sampler: session
            .args
            .scheduler
            .clone()
            .unwrap_or_else(|| p.scheduler.class_name().to_string()),
        cfg_scale: guidance,
        seed: session.seed,
        width: w,
        height: h,
        model: session.model_name.clone(),
        extra: std::iter::once(("Class".into(), "all, one row per class".into()))
            .chain(interval_info(interval))
            .collect(),
    }
    .to_string();
    output::save_all(&[grid], &paths, &[infotext], session.args.force)?;
    print_timings(
        &Timings {
            denoise: out.denoise,
            ..Default::default()
        },
        steps,
    );
    let (made, secs) = (images.len(), session.started.elapsed().as_secs_f64());
    eprint_line(format_args!(
        "generated {made} images ({n} per class, in one grid) in {secs:.2}s ({:.2} images/s)",
        made as f64 / secs.max(1e-9)
    ));
    // The class names parse as prompts (checked here so a typo in them shows up early).
    debug_assert!(p
        .class_names
        .iter()
        .all(|n| parse_class(&p.class_names, n).is_ok()));
    Ok(())
}

/// `FILE` or `FILE:SCALE` (the part after the last colon, when it is a number).
fn parse_lora(spec: &str) -> Result<LoraSpec> {
    let (path, scale) = match spec.rsplit_once(':') {
        Some((p, s)) if s.trim().parse::<f64>().is_ok() && !p.is_empty() => {
            (p, s.trim().parse::<f64>().unwrap_or(1.0))
        }
        _ => (spec, 1.0),
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!("--lora {spec}: no such file {}", path.display());
    }
    Ok(LoraSpec { path, scale })
}

/// `FILE` or `FILE:TOKEN` (the part after the last colon, when the part before is a file).
fn parse_embedding(spec: &str) -> Result<EmbeddingSpec> {
    let (path, token) = match spec.rsplit_once(':') {
        Some((p, t)) if Path::new(p).is_file() && !t.is_empty() => (p, Some(t.to_string())),
        _ => (spec, None),
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!("--embedding {spec}: no such file {}", path.display());
    }
    Ok(EmbeddingSpec { path, token })
}

/// The bundled models (`models/...` in the repository).
pub fn bundled(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name);
    p.canonicalize().unwrap_or(p)
}

/// The repository's trained Fashion-MNIST model when it is there (and the task is plain
/// generation), else the tiny Stable Diffusion pipeline in its fixtures (both work from a
/// source checkout).
fn default_model(image_task: bool) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let trained = repo.join("models/fashion-mnist-ddpm");
    if !image_task && trained.join("model_index.json").is_file() {
        trained
    } else {
        repo.join("fixtures/pipelines/tiny_sd")
    }
}

/// Opens an image, naming it as `what` in the error. The decoder's error is flattened into
/// the message: as a context's source it printed its text twice ("Invalid PNG signature.:
/// Invalid PNG signature.").
fn read_image(path: &Path, what: &str) -> Result<DynamicImage> {
    image::open(path).map_err(|e| anyhow::anyhow!("reading {what} {}: {e}", path.display()))
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
/// Shows each denoising loop's progress on `bar` and counts the steps of all of them.
fn step_callback<'a>(
    bar: &'a ProgressBar,
    steps_run: &'a Cell<usize>,
) -> impl FnMut(StepInfo<'_>) -> diffuse_core::Result<()> + 'a {
    move |info| {
        bar.set_length(info.num_steps as u64);
        bar.set_position(info.step as u64 + 1);
        steps_run.set(steps_run.get() + 1);
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
