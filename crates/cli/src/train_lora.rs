//! `diffuse train-lora`: LoRA fine-tuning of a Stable Diffusion UNet on a folder of captioned
//! images (or DreamBooth-style with one instance prompt), saved as a LoRA file that diffuse,
//! diffusers (`load_lora_weights`) and, in Kohya format, A1111 load.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use diffuse_pipelines::task::{model_display_name, run_task, TaskSettings};
use diffuse_pipelines::{load_pipeline, text_encoder_weights, unet_weights, LoadOptions, Pipeline};
use diffuse_training::lora::image_files;
use diffuse_training::{
    AdamWConfig, LoraSaveFormat, LoraTrainConfig, LoraTrainer, LrScheduleKind, PriorPreservation,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::train::{LrScheduleArg, MixedPrecisionArg};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LoraFormatArg {
    /// diffusers / PEFT (`unet.<module>.lora_A.weight`): what diffusers' load_lora_weights and
    /// PEFT read.
    Peft,
    /// Kohya / A1111 (`lora_unet_<module>.lora_down.weight`, `.alpha`).
    Kohya,
}

/// Train a LoRA on a Stable Diffusion model's UNet (the attention projections by default):
/// images from --data with their captions in `<image>.txt`, or one --instance-prompt for all of
/// them (DreamBooth; with --class-data and --class-prompt, prior preservation). The VAE and
/// the UNet's own weights stay frozen; so does the text encoder, unless --train-text-encoder
/// adapts its attention projections too.
#[derive(Args, Debug)]
pub struct TrainLoraArgs {
    /// The model: a Stable Diffusion 1.x/2.x diffusers folder, single file or hub id.
    #[arg(long)]
    pub model: String,
    /// For a single-file --model: a diffusers folder with its component configs.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// Folder of PNG/JPEG images; each `name.png` captioned by `name.txt` next to it.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// DreamBooth: the prompt of every training image (e.g. "a photo of sks dog"); caption
    /// files are then not read.
    #[arg(long, value_name = "PROMPT")]
    pub instance_prompt: Option<String>,
    /// Prior preservation: a folder of images of the class, trained with --class-prompt
    /// (--num-class-images has the model draw the missing ones first).
    #[arg(long, value_name = "DIR", requires = "class_prompt")]
    pub class_data: Option<PathBuf>,
    /// The prompt of the --class-data images.
    #[arg(long, value_name = "PROMPT", requires = "class_data")]
    pub class_prompt: Option<String>,
    /// Weight of the class images' loss.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    /// Top --class-data up to N images first, drawn by the model itself from --class-prompt
    /// (as diffusers' DreamBooth script does), saved there as `class-<k>.png` with seed
    /// --seed + k and the model's default steps.
    #[arg(long, value_name = "N", requires = "class_data")]
    pub num_class_images: Option<usize>,
    /// The LoRA file to write.
    #[arg(long, short, default_value = "lora.safetensors")]
    pub output: PathBuf,
    /// Overwrite --output (and the --save-every files) if they exist.
    #[arg(long)]
    pub force: bool,
    /// The file layout.
    #[arg(long, value_enum, default_value = "peft")]
    pub format: LoraFormatArg,
    /// Rank of the updates.
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
    /// The updates are scaled by alpha / rank. Default: the rank.
    #[arg(value_parser = crate::finite_number, long)]
    pub alpha: Option<f64>,
    /// The layers to adapt, by the last part of their module path, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "to_q,to_k,to_v,to_out.0")]
    pub target_modules: Vec<String>,
    /// Also train a LoRA on the text encoder's attention projections (q_proj, k_proj, v_proj,
    /// out_proj; same rank, alpha and learning rate), saved under `text_encoder.` (PEFT) or
    /// `lora_te_` (Kohya) in the same file. Captions are then encoded at every step.
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Training image size (short side resized to it, then center-cropped). Default: the
    /// model's native size.
    #[arg(long, value_name = "PX")]
    pub resolution: Option<usize>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    /// Images per micro-batch (plus as many class images with prior preservation).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Learning rate.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Learning rate after warm-up.
    #[arg(long, value_enum, default_value = "constant")]
    pub lr_schedule: LrScheduleArg,
    /// AdamW weight decay.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Clip the gradient norm to this; 0 disables clipping.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1.0)]
    pub clip_grad: f64,
    /// Min-SNR-γ loss weighting, as diffusers' --snr_gamma (5 is the paper's choice).
    /// Default: unweighted.
    #[arg(value_parser = crate::finite_number, long, value_name = "GAMMA")]
    pub snr_gamma: Option<f64>,
    /// Mirror images at random (each is encoded both ways once).
    #[arg(long)]
    pub random_flip: bool,
    /// Seed of the adapters' initialisation, the image order and the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the LoRA every N steps, as `<output stem>-<step>.safetensors`.
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// `cpu`, or `cuda:N` (needs a build with CUDA support).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the forward and backward passes; the adapters, their gradients and the
    /// optimizer stay f32 either way. bf16 is CPU autocast: the linear layers, attention and
    /// GEMM convolutions multiply in bf16 on AVX512-BF16 CPUs (elsewhere it is the f32 step).
    #[arg(long, value_enum, default_value = "no")]
    pub mixed_precision: MixedPrecisionArg,
}

pub fn run(args: TrainLoraArgs) -> Result<()> {
    // Everything that can be checked cheaply fails before the (slow) model load.
    crate::generate::check_output_parent(&args.output)?;
    let save_every = save_every(&args)?;
    diffuse_training::loss::check_snr_gamma(args.snr_gamma)?;
    if !args.data.is_dir() {
        bail!("--data {}: no such folder", args.data.display());
    }
    let device = crate::device::parse_device(&args.device)?;
    if matches!(args.mixed_precision, MixedPrecisionArg::Bf16) && !device.is_cpu() {
        bail!(
            "--mixed-precision bf16 is CPU autocast: on {} train in f32",
            args.device
        );
    }
    let path = if Path::new(&args.model).exists() {
        PathBuf::from(&args.model)
    } else {
        diffuse_loaders::resolve_model(&args.model, None)?
    };
    let opts = LoadOptions {
        device,
        config: args.config.clone(),
        ..Default::default()
    };
    let loaded = Instant::now();
    let pipeline = load_pipeline(&path, &opts)
        .with_context(|| format!("loading the model {}", path.display()))?;
    if !matches!(pipeline, Pipeline::StableDiffusion(_)) {
        bail!(
            "train-lora trains Stable Diffusion 1.x/2.x UNets; {} holds a {}",
            path.display(),
            pipeline.class_name()
        );
    }
    if let (Some(n), Some(dir), Some(prompt)) =
        (args.num_class_images, &args.class_data, &args.class_prompt)
    {
        let name = model_display_name(&args.model, &path);
        make_class_images(&pipeline, &name, dir, prompt, n, args.seed)?;
    }
    let Pipeline::StableDiffusion(pipeline) = pipeline else {
        unreachable!("checked above")
    };
    let unet = unet_weights(&path, &opts)?;
    let resolution = args.resolution.unwrap_or_else(|| pipeline.default_size().0);
    let config = LoraTrainConfig {
        rank: args.rank,
        alpha: args.alpha,
        target_modules: args.target_modules.clone(),
        resolution,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        steps: args.steps,
        optimizer: AdamWConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            ..LoraTrainConfig::default().optimizer
        },
        lr_schedule: match args.lr_schedule {
            LrScheduleArg::Cosine => LrScheduleKind::Cosine,
            LrScheduleArg::Constant => LrScheduleKind::Constant,
        },
        warmup_steps: args.warmup,
        clip_grad: (args.clip_grad > 0.0).then_some(args.clip_grad),
        seed: args.seed,
        random_flip: args.random_flip,
        instance_prompt: args.instance_prompt.clone(),
        prior: match (&args.class_data, &args.class_prompt) {
            (Some(dir), Some(prompt)) => Some(PriorPreservation {
                class_data: dir.clone(),
                class_prompt: prompt.clone(),
                weight: args.prior_loss_weight,
            }),
            _ => None,
        },
        snr_gamma: args.snr_gamma,
        mixed_precision: args.mixed_precision.into(),
    };
    let mut trainer = LoraTrainer::new(&pipeline, unet, &args.data, config)
        .with_context(|| format!("preparing the images of {}", args.data.display()))?;
    drop(pipeline);
    if args.train_text_encoder {
        let (cfg, weights) = text_encoder_weights(&path, &opts)?;
        trainer = trainer.with_text_encoder(cfg, weights)?;
    }
    eprintln!(
        "{} images at {resolution}x{resolution}, rank {} on {} layers ({} trained parameters); \
         ready in {:.1}s",
        trainer.num_images(),
        args.rank,
        trainer.modules().len(),
        trainer.num_parameters(),
        loaded.elapsed().as_secs_f64()
    );
    let format = match args.format {
        LoraFormatArg::Peft => LoraSaveFormat::Peft,
        LoraFormatArg::Kohya => LoraSaveFormat::Kohya,
    };
    let bar = ProgressBar::new(args.steps);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut smoothed: Option<f64> = None;
    for _ in 0..args.steps {
        let stats = trainer.train_step()?;
        let s = smoothed.map_or(stats.loss, |s| 0.9 * s + 0.1 * stats.loss);
        smoothed = Some(s);
        bar.set_position(stats.step);
        bar.set_message(format!("loss {:.4} (avg {s:.4})", stats.loss));
        if let Some(every) = save_every {
            if stats.step % every == 0 && stats.step < args.steps {
                let p = step_path(&args.output, stats.step);
                trainer.save(&p, format)?;
                bar.println(format!("wrote {}", p.display()));
            }
        }
    }
    bar.finish_and_clear();
    trainer.save(&args.output, format)?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "trained {} steps in {secs:.1}s ({:.2} s/step), final loss (smoothed) {:.4}{}",
        args.steps,
        secs / args.steps as f64,
        smoothed.unwrap_or(f64::NAN),
        crate::bench::peak_rss_mib()
            .map(|m| format!(", peak memory {m:.0} MiB"))
            .unwrap_or_default()
    );
    println!("wrote {}", args.output.display());
    Ok(())
}

/// Tops the class-image folder up to `n` images drawn by the model from `prompt` (prior
/// preservation's class images, made before training as diffusers' DreamBooth script does):
/// `class-<k>.png` with seed `seed + k`, skipping names already taken.
fn make_class_images(
    pipeline: &Pipeline,
    model_name: &str,
    dir: &Path,
    prompt: &str,
    n: usize,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let have = image_files(dir)?.len();
    if have >= n {
        return Ok(());
    }
    eprintln!(
        "making {} class images of \"{prompt}\" in {}",
        n - have,
        dir.display()
    );
    let bar = ProgressBar::new((n - have) as u64);
    let mut k = 0u64;
    for _ in have..n {
        let path = loop {
            let p = dir.join(format!("class-{k}.png"));
            if !p.exists() {
                break p;
            }
            k += 1;
        };
        let task = TaskSettings {
            prompt: prompt.to_string(),
            seed: seed.wrapping_add(k),
            ..Default::default()
        };
        let out = run_task(pipeline, model_name, &task, None)?;
        let image = out.images.first().context("the pipeline made no image")?;
        crate::generate::write_image(image, &path, &out.infotext, false)?;
        bar.inc(1);
        k += 1;
    }
    bar.finish_and_clear();
    Ok(())
}

/// `--save-every`'s interval, with every file the run will write checked up front.
fn save_every(args: &TrainLoraArgs) -> Result<Option<u64>> {
    let mut finals = vec![args.output.clone()];
    let every = match args.save_every {
        Some(0) => bail!("--save-every must be at least 1"),
        Some(n) => Some(n),
        None => None,
    };
    if let Some(n) = every {
        finals.extend(
            (1..args.steps)
                .filter(|s| s % n == 0)
                .map(|s| step_path(&args.output, s)),
        );
    }
    if !args.force {
        if let Some(p) = finals.iter().find(|p| p.exists()) {
            bail!("{} exists; pass --force to overwrite it", p.display());
        }
    }
    Ok(every)
}

/// `out.safetensors` at step 100: `out-100.safetensors`.
fn step_path(output: &Path, step: u64) -> PathBuf {
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    output.with_file_name(format!("{stem}-{step}.safetensors"))
}
