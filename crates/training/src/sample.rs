//! A minimal sampler over the [`Scheduler`] trait (DDPM or DDIM), with classifier-free
//! guidance for class-conditional models, and a PNG writer for grids of samples.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use diffuse_core::{Error, Generator, Result};
use diffuse_models::UNet2DModel;
use diffuse_pipelines::ClassGuidance;
use diffuse_schedulers::{Scheduler, SchedulerConfig};
use image::{GrayImage, Luma, Rgb, RgbImage};
use serde::{Deserialize, Serialize};

/// How samples are drawn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleSettings {
    /// A scheduler class, `DDPMScheduler` or `DDIMScheduler` (any class of the schedulers
    /// crate works), built from the training scheduler config.
    pub scheduler: String,
    pub steps: usize,
    /// Classifier-free guidance scale for class-conditional models (1 or less = no guidance).
    pub guidance_scale: f64,
    pub seed: u64,
}

impl Default for SampleSettings {
    fn default() -> Self {
        Self {
            scheduler: "DDIMScheduler".into(),
            steps: 50,
            guidance_scale: 3.0,
            seed: 0,
        }
    }
}

/// Draws `labels.len()` (class-conditional) or `n` images with `model`, as a `(N, C, H, W)`
/// tensor in `[-1, 1]`. For class-conditional models the null class used by guidance is the
/// last class embedding (`num_class_embeds - 1`).
pub fn sample(
    model: &UNet2DModel,
    scheduler_config: &SchedulerConfig,
    settings: &SampleSettings,
    n: usize,
    labels: Option<&[u32]>,
    device: &Device,
) -> Result<Tensor> {
    let cfg = model.config();
    let (h, w) = cfg
        .sample_size
        .as_ref()
        .map(|s| s.hw())
        .ok_or_else(|| Error::invalid("the UNet config has no sample_size to sample at"))?;
    let n = labels.map_or(n, <[u32]>::len);
    if n == 0 {
        return Err(Error::invalid("no images to sample"));
    }
    let mut scheduler: Box<dyn Scheduler> =
        diffuse_schedulers::from_config(&settings.scheduler, scheduler_config)?;
    scheduler.set_timesteps(settings.steps)?;
    let mut rng = Generator::manual_seed(settings.seed);
    let mut x = (rng.randn((n, cfg.in_channels, h, w), device)? * scheduler.init_noise_sigma())?;

    let labels: Option<Vec<usize>> = labels.map(|l| l.iter().map(|&c| c as usize).collect());
    let guidance =
        ClassGuidance::new(model, labels.as_deref(), n, settings.guidance_scale, device)?;
    let timesteps = scheduler.timesteps().to_vec();
    for t in timesteps {
        let input = scheduler.scale_model_input(&x, t)?;
        let tt = Tensor::new(t as f32, device)?;
        let eps = ClassGuidance::predict(guidance.as_ref(), model, &input, &tt, true)?;
        x = scheduler.step(&eps, t, &x, &mut rng)?.prev_sample;
    }
    Ok(x.clamp(-1.0, 1.0)?)
}

/// Saves `images` `(N, C, H, W)` in `[-1, 1]` (C = 1 or 3) as one PNG grid of `columns`
/// columns, tiles separated by 2 pixels.
pub fn save_grid(images: &Tensor, columns: usize, path: &Path) -> Result<()> {
    let (n, c, h, w) = images.dims4()?;
    if n == 0 || columns == 0 || (c != 1 && c != 3) {
        return Err(Error::invalid(format!(
            "cannot make a grid of {n} images with {c} channels in {columns} columns"
        )));
    }
    let columns = columns.min(n);
    let rows = n.div_ceil(columns);
    let pad = 2;
    let gw = (columns * (w + pad) + pad) as u32;
    let gh = (rows * (h + pad) + pad) as u32;
    // [-1, 1] → [0, 255], then (N, H, W, C) bytes.
    let bytes: Vec<u8> = ((images.to_dtype(DType::F32)? + 1.0)? * 127.5)?
        .clamp(0.0, 255.0)?
        .round()?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_dtype(DType::U8)?
        .to_vec1()?;
    let tile_origin = |i: usize| {
        (
            (i % columns) * (w + pad) + pad,
            (i / columns) * (h + pad) + pad,
        )
    };
    let pixel = |i: usize, y: usize, x: usize| &bytes[((i * h + y) * w + x) * c..][..c];
    if c == 1 {
        let mut grid = GrayImage::from_pixel(gw, gh, Luma([255]));
        for i in 0..n {
            let (ox, oy) = tile_origin(i);
            for y in 0..h {
                for x in 0..w {
                    grid.put_pixel((ox + x) as u32, (oy + y) as u32, Luma([pixel(i, y, x)[0]]));
                }
            }
        }
        save_png(&image::DynamicImage::ImageLuma8(grid), path)
    } else {
        let mut grid = RgbImage::from_pixel(gw, gh, Rgb([255, 255, 255]));
        for i in 0..n {
            let (ox, oy) = tile_origin(i);
            for y in 0..h {
                for x in 0..w {
                    let p = pixel(i, y, x);
                    grid.put_pixel((ox + x) as u32, (oy + y) as u32, Rgb([p[0], p[1], p[2]]));
                }
            }
        }
        save_png(&image::DynamicImage::ImageRgb8(grid), path)
    }
}

/// Writes a PNG next to `path` and renames it into place, so readers never see half a file.
pub(crate) fn save_png(img: &image::DynamicImage, path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::invalid(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// One label per sample: classes in turn, so that each grid column is one class.
pub fn grid_labels(num_classes: usize, n: usize) -> Vec<u32> {
    (0..n).map(|i| (i % num_classes.max(1)) as u32).collect()
}
