//! `diffuse classifier`: train the small CNN that `diffuse eval` scores generators with.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use diffuse_training::classifier::{
    train_classifier, ClassifierConfig, ClassifierEvent, ClassifierTrainConfig,
};
use diffuse_training::{Dataset, DatasetKind, DatasetOptions, Fit, Split};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IdxDatasetArg {
    /// Fashion-MNIST (default folder data/fashion-mnist; scripts/fetch-data.sh).
    FashionMnist,
    /// Any MNIST-format IDX files with labels.
    MnistIdx,
}

/// The labelled IDX dataset both commands read (training and test files).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Data")]
pub struct IdxDataArgs {
    /// Folder with train-* and t10k-* IDX image and label files.
    #[arg(long, default_value = "data/fashion-mnist")]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value = "fashion-mnist")]
    pub dataset: IdxDatasetArg,
    /// Read only the first N images of each split (quick experiments).
    #[arg(long)]
    pub max_images: Option<usize>,
}

impl IdxDataArgs {
    /// One split, 28×28 images padded to `resolution` as for training the generator.
    pub fn load(&self, split: Split, resolution: usize, channels: usize) -> Result<Dataset> {
        let t = Instant::now();
        let ds = Dataset::load(&DatasetOptions {
            kind: match self.dataset {
                IdxDatasetArg::FashionMnist => DatasetKind::FashionMnist,
                IdxDatasetArg::MnistIdx => DatasetKind::MnistIdx,
            },
            path: self.data.clone(),
            split,
            resolution,
            channels,
            fit: Fit::Crop,
            max_images: self.max_images,
        })?;
        if ds.num_classes().is_none() {
            bail!(
                "{}: the {split:?} images have no label file; the classifier needs labels",
                self.data.display()
            );
        }
        eprintln!(
            "{split:?} set: {} images from {} in {:.1}s",
            ds.len(),
            self.data.display(),
            t.elapsed().as_secs_f64()
        );
        Ok(ds)
    }
}

/// Train a small CNN classifier on a labelled IDX dataset (default Fashion-MNIST, padded to
/// 32×32) and report its test accuracy; `diffuse eval` uses it to score class-conditional
/// models. Writes config.json, model.safetensors and training.json.
#[derive(Args, Debug)]
pub struct ClassifierArgs {
    /// Output folder.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Replace an existing classifier in the output folder.
    #[arg(long)]
    pub force: bool,
    /// Image side (the 28×28 images are padded).
    #[arg(long, default_value_t = 32)]
    pub resolution: usize,
    /// Output channels of the conv → ReLU → max-pool stages.
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    pub channels: Vec<usize>,
    /// Width of the hidden layer (the feature space of the Fréchet distance).
    #[arg(long, default_value_t = 128)]
    pub feature_dim: usize,
    /// Passes over the training images.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Images per optimizer step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// AdamW learning rate (constant).
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1e-3)]
    pub lr: f64,
    /// AdamW decoupled weight decay.
    #[arg(value_parser = crate::finite_number, long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Random horizontal flips (true or false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub random_flip: bool,
    /// Seed of the initialisation, batch order and flips.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    // Last: the options after a flattened group would be listed under its heading.
    #[command(flatten)]
    pub data: IdxDataArgs,
}

pub fn run(args: ClassifierArgs) -> Result<()> {
    check_output(&args.output, args.force)?;
    let device = crate::device::parse_device(&args.device)?;
    let train = args.data.load(Split::Train, args.resolution, 1)?;
    let test = args.data.load(Split::Test, args.resolution, 1)?;
    let config = ClassifierConfig {
        in_channels: 1,
        resolution: args.resolution,
        channels: args.channels.clone(),
        feature_dim: args.feature_dim,
        class_names: train.class_names().to_vec(),
    };
    let cfg = ClassifierTrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: args.weight_decay,
        random_flip: args.random_flip,
        seed: args.seed,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let trained = train_classifier(&config, &train, &test, &cfg, &device, |e| match e {
        ClassifierEvent::Step {
            epoch,
            step,
            steps_per_epoch,
            loss,
        } => {
            if *step == 0 {
                bar.reset();
                bar.set_length(*steps_per_epoch as u64);
                bar.set_prefix(format!("epoch {}/{}", epoch + 1, cfg.epochs));
            }
            bar.inc(1);
            if step % 20 == 0 {
                bar.set_message(format!("loss {loss:.4}"));
            }
        }
        ClassifierEvent::Epoch {
            epoch,
            train_loss,
            test_accuracy,
        } => bar.suspend(|| {
            eprintln!(
                "epoch {}: train loss {train_loss:.4}, test accuracy {:.2}% ({:.0}s)",
                epoch + 1,
                100.0 * test_accuracy,
                start.elapsed().as_secs_f64()
            )
        }),
    })?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    trained.save(&args.output)?;
    let acc = trained.test_accuracy.last().copied().unwrap_or(0.0);
    let report = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "train_images": train.len(),
        "test_images": test.len(),
        "epochs": cfg.epochs,
        "test_accuracy_per_epoch": trained.test_accuracy,
        "test_accuracy": acc,
        "seconds": seconds,
    });
    let path = args.output.join("training.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "test accuracy {:.2}% on {} images after {} epochs ({:.0}s); saved to {}",
        100.0 * acc,
        test.len(),
        cfg.epochs,
        seconds,
        args.output.display()
    );
    Ok(())
}

fn check_output(dir: &Path, force: bool) -> Result<()> {
    if dir.join(diffuse_training::classifier::CONFIG_NAME).exists() && !force {
        bail!(
            "{} already holds a classifier; pass --force to replace it",
            dir.display()
        );
    }
    if dir.exists() && !dir.is_dir() {
        bail!("{} exists and is not a folder", dir.display());
    }
    Ok(())
}
