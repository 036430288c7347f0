//! Tiny models and datasets shared by the training tests.
#![allow(dead_code)]

use std::path::Path;

use diffuse_models::UNet2DConfig;
use diffuse_training::{Dataset, DatasetKind, DatasetOptions, Fit, TrainConfig};
use image::{GrayImage, Luma};

/// A two-level UNet with attention at the lowest resolution: `[8, 16]` channels, 8×8 images.
pub fn tiny_unet(num_class_embeds: Option<usize>) -> UNet2DConfig {
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    let value = serde_json::json!({
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "attention_head_dim": 8,
    });
    let mut cfg: UNet2DConfig = serde_json::from_value(value).unwrap();
    cfg.down_block_types = s(&["DownBlock2D", "AttnDownBlock2D"]);
    cfg.up_block_types = s(&["AttnUpBlock2D", "UpBlock2D"]);
    cfg.num_class_embeds = num_class_embeds;
    cfg
}

/// Two classes of 8×8 images in class sub-folders: horizontal and vertical stripes, with a
/// per-image phase so that images differ.
pub fn write_stripes(dir: &Path, per_class: usize) {
    for (class, vertical) in [("horizontal", false), ("vertical", true)] {
        let sub = dir.join(class);
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..per_class {
            let img = GrayImage::from_fn(8, 8, |x, y| {
                let k = if vertical { x } else { y } as usize;
                Luma([if (k + i) % 4 < 2 { 255 } else { 0 }])
            });
            img.save(sub.join(format!("{i:03}.png"))).unwrap();
        }
    }
}

pub fn load_folder(dir: &Path) -> Dataset {
    Dataset::load(&DatasetOptions {
        kind: DatasetKind::Folder,
        path: dir.to_path_buf(),
        split: Default::default(),
        resolution: 8,
        channels: 1,
        fit: Fit::Resize,
        max_images: None,
    })
    .unwrap()
}

/// A fast class-conditional run: no periodic sampling, metrics every step.
pub fn tiny_config(steps: u64) -> TrainConfig {
    let mut c = TrainConfig::new(tiny_unet(Some(3)));
    c.batch_size = 4;
    c.steps = steps;
    c.optimizer.lr = 2e-3;
    c.warmup_steps = 2;
    c.checkpoint_every = 3;
    c.checkpoints_total_limit = None;
    c.sample_every = 0;
    c.num_samples = 4;
    c.sample.steps = 3;
    c.log_every = 1;
    c
}
