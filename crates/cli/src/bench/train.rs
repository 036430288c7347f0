//! The training line: one optimizer step of the bundled Fashion-MNIST model's recipe, so that
//! `--profile` shows where a training step's time goes (forward layers and the custom ops'
//! backward passes).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffuse_training::{Dataset, Fit, MixedPrecision, TrainConfig, Trainer};

use super::Bench;

/// Images in the random dataset the step draws its batch from.
const IMAGES: usize = 512;

impl Bench<'_> {
    pub(super) fn ddpm_train(&mut self) -> Result<()> {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fashion-mnist-ddpm");
        let path = folder.join(diffuse_training::trainer::TRAIN_CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut config: TrainConfig =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let name = format!("train fmnist step {}", config.batch_size);
        if !self.wanted(&name) {
            return Ok(());
        }
        config.mixed_precision = match self.dtype {
            DType::F32 => MixedPrecision::No,
            DType::BF16 => MixedPrecision::Bf16,
            other => {
                bail!("the training line runs in f32 or bf16 (mixed precision), not {other:?}")
            }
        };
        // Random gray images of the model's size, one class each (the values do not change
        // the step's cost).
        let side = config.unet.sample_size.map_or(32, |s| s.hw().0);
        let pixels = Tensor::rand(0f32, 255.0, (IMAGES, side, side), &Device::Cpu)?
            .to_dtype(DType::U8)?
            .flatten_all()?
            .to_vec1::<u8>()?;
        let images = pixels
            .chunks_exact(side * side)
            .map(|p| {
                let img = image::GrayImage::from_raw(side as u32, side as u32, p.to_vec())
                    .context("image size")?;
                Ok(image::DynamicImage::ImageLuma8(img))
            })
            .collect::<Result<Vec<_>>>()?;
        let classes = config
            .unet
            .num_class_embeds
            .map_or(1, |k| k.saturating_sub(1).max(1));
        let labels = (0..IMAGES).map(|i| (i % classes) as u32).collect();
        let dataset = Dataset::from_images(images, Some(labels), side, 1, Fit::Crop)?;
        let mut trainer = Trainer::new(config, dataset, &self.device)?;
        self.time(&name, None, || {
            let s = trainer.train_step()?;
            Ok(Tensor::new(s.loss as f32, &Device::Cpu)?)
        })
    }
}
