//! `diffuse eval`: how well a class-conditional DDPM model draws its classes, measured with a
//! classifier trained by `diffuse classifier`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use diffuse_pipelines::{load_pipeline, LoadOptions, Pipeline, UnconditionalRequest};
use diffuse_training::classifier::Classifier;
use diffuse_training::eval::evaluate;
use diffuse_training::{Dataset, Fit, Split};
use image::DynamicImage;

use crate::classifier::IdxDataArgs;
use crate::generate::{
    bundled, class_guidance_interval, progress_bar, unconditional_steps, CLASS_GUIDANCE,
};
use crate::label_grid::labelled_grid;

/// Generate samples of every class of a class-conditional DDPM model and score them with a
/// classifier: the share classified as the requested class, and the Fréchet distance to the
/// test images in the classifier's feature space, next to the train-vs-test distance (the
/// floor). Defaults: the bundled Fashion-MNIST model and classifier, `generate`'s settings.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model folder or hub id. Default: the bundled models/fashion-mnist-ddpm.
    #[arg(long)]
    pub model: Option<String>,
    /// Classifier folder (from `diffuse classifier`). Default: the bundled
    /// models/fashion-mnist-classifier.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Samples generated per class.
    #[arg(long, default_value_t = 100)]
    pub samples_per_class: usize,
    /// Denoising steps. Default as `generate`: 50 with the DDPM or DDIM scheduler, 20 with
    /// any other.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default as `generate`).
    #[arg(value_parser = crate::finite_number, long, default_value_t = CLASS_GUIDANCE)]
    pub guidance_scale: f64,
    /// Guide only at the timesteps LO to HI (as `generate`; default 100,550; 0,1000 guides
    /// every step).
    #[arg(long, value_name = "LO,HI", value_parser = crate::generate::args::parse_guidance_interval)]
    pub guidance_interval: Option<(f64, f64)>,
    /// Replace the model's scheduler (a diffusers class or an A1111 name).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// DDIM eta.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 0.0)]
    pub eta: f64,
    /// Seed of the first batch; batch k uses seed + k.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images generated at once.
    #[arg(long, default_value_t = 250)]
    pub batch_size: usize,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also save the first 10 samples of each class as a labelled grid PNG here.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    // Last: the options after a flattened group would be listed under its heading.
    #[command(flatten)]
    pub data: IdxDataArgs,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.samples_per_class < 2 || args.batch_size == 0 || args.steps == Some(0) {
        bail!("--samples-per-class must be at least 2, --batch-size and --steps at least 1");
    }
    let device = crate::device::parse_device(&args.device)?;
    let model_dir = match &args.model {
        Some(spec) => diffuse_loaders::resolve_model(spec, None)?,
        None => bundled("fashion-mnist-ddpm"),
    };
    let classifier_dir = args
        .classifier
        .clone()
        .unwrap_or_else(|| bundled("fashion-mnist-classifier"));
    let classifier = Classifier::load(&classifier_dir, &device)
        .with_context(|| format!("loading the classifier in {}", classifier_dir.display()))?;
    let opts = LoadOptions {
        dtype: DType::F32,
        device: device.clone(),
        scheduler: args.scheduler.clone(),
        ..Default::default()
    };
    let pipeline = match load_pipeline(&model_dir, &opts)
        .with_context(|| format!("loading the pipeline in {}", model_dir.display()))?
    {
        Pipeline::Unconditional(p) if !p.class_names.is_empty() => p,
        _ => bail!(
            "{} is not a class-conditional DDPM model (a UNet2DModel with num_class_embeds)",
            model_dir.display()
        ),
    };
    let steps = args
        .steps
        .unwrap_or_else(|| unconditional_steps(pipeline.scheduler.class_name()));
    let interval = class_guidance_interval(args.guidance_interval, args.guidance_scale);
    let names = pipeline.class_names.clone();
    let cc = classifier.config();
    let (c, h, w) = pipeline.image_shape();
    if names.len() != cc.num_classes()
        || (c, h, w) != (cc.in_channels, cc.resolution, cc.resolution)
    {
        bail!(
            "the model makes {c}×{h}×{w} images of {} classes, the classifier takes {}×{r}×{r} images of {} classes",
            names.len(),
            cc.in_channels,
            cc.num_classes(),
            r = cc.resolution
        );
    }
    let test = args.data.load(Split::Test, cc.resolution, cc.in_channels)?;
    let train = args
        .data
        .load(Split::Train, cc.resolution, cc.in_channels)?;

    let labels: Vec<usize> = (0..names.len())
        .flat_map(|k| std::iter::repeat_n(k, args.samples_per_class))
        .collect();
    let batches: Vec<&[usize]> = labels.chunks(args.batch_size).collect();
    let bar = progress_bar("generating");
    bar.set_length((batches.len() * steps) as u64);
    let start = Instant::now();
    let mut images: Vec<DynamicImage> = Vec::with_capacity(labels.len());
    for (k, chunk) in batches.iter().enumerate() {
        let req = UnconditionalRequest {
            batch_size: chunk.len(),
            steps,
            eta: args.eta,
            seed: args.seed + k as u64,
            class_labels: Some(chunk.to_vec()),
            guidance_scale: args.guidance_scale,
            guidance_interval: interval,
            shard: None,
        };
        let mut on_step = |_: diffuse_pipelines::StepInfo<'_>| {
            bar.inc(1);
            Ok(())
        };
        let out = pipeline.generate(&req, Some(&mut on_step))?;
        if c == 1 {
            images.extend(out.gray.into_iter().map(DynamicImage::ImageLuma8));
        } else {
            images.extend(out.rgb.into_iter().map(DynamicImage::ImageRgb8));
        }
    }
    bar.finish_and_clear();
    let gen_seconds = start.elapsed().as_secs_f64();
    if let Some(path) = &args.grid {
        let per = args.samples_per_class.min(10);
        let tiles: Vec<DynamicImage> = images
            .chunks(args.samples_per_class)
            .flat_map(|c| c[..per].to_vec())
            .collect();
        labelled_grid(&names, &tiles, per)?
            .save(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let generated = Dataset::from_images(
        images,
        Some(labels.iter().map(|&l| l as u32).collect()),
        cc.resolution,
        cc.in_channels,
        Fit::Crop,
    )?
    .with_class_names(names.clone())?;
    let report = evaluate(&classifier, &generated, &test, &train, &device)?;

    let at = interval.map_or(String::new(), |(lo, hi)| format!(" at timesteps {lo}-{hi}"));
    println!(
        "model {} ({} steps, guidance {}{at}, seed {}): {} samples in {gen_seconds:.1}s",
        model_dir.display(),
        steps,
        args.guidance_scale,
        args.seed,
        report.generated
    );
    println!(
        "classifier {}: {:.2}% accuracy on the {} test images",
        classifier_dir.display(),
        100.0 * report.classifier_test_accuracy,
        report.test_images
    );
    println!(
        "{:<14} {:>8}  {:>9}  {:>14}",
        "class", "accuracy", "(correct)", "real test imgs"
    );
    for s in &report.per_class {
        println!(
            "{:<14} {:>7.1}%  {:>9}  {:>13.1}%",
            s.class,
            100.0 * s.accuracy(),
            format!("{}/{}", s.correct, s.total),
            100.0 * s.test_accuracy(),
        );
    }
    println!(
        "class accuracy: {:.2}% of {} samples",
        100.0 * report.class_accuracy,
        report.generated
    );
    println!(
        "Fréchet distance (classifier features) to the test set: generated {:.3}, floor (as many training images) {:.3}",
        report.frechet_generated_test, report.frechet_train_test
    );
    if let Some(path) = &args.json {
        let mut v = serde_json::to_value(&report)?;
        v["model"] = model_dir.display().to_string().into();
        v["scheduler"] = pipeline.scheduler.class_name().into();
        v["steps"] = steps.into();
        v["guidance_scale"] = args.guidance_scale.into();
        if let Some((lo, hi)) = interval {
            v["guidance_interval"] = serde_json::json!([lo, hi]);
        }
        v["seed"] = args.seed.into();
        v["generate_seconds"] = gen_seconds.into();
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
