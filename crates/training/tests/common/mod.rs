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

/// One training step's figures: the step, its loss and its gradient norm.
pub type StepFigures = (u64, f64, f64);

/// Steps an f32 run (`full`) and a bf16 mixed-precision run (`mixed`) of one config side by
/// side, for `steps` steps: same data, noise and timesteps, so their losses and gradient norms
/// must agree within 2% at every step (bf16 keeps 8 bits of mantissa), and differ exactly
/// where the CPU has bf16 dot products (the products did run in bf16); elsewhere autocast
/// changes nothing and the runs are equal bit for bit.
pub fn assert_mixed_follows_f32(
    steps: usize,
    mut full: impl FnMut() -> StepFigures,
    mut mixed: impl FnMut() -> StepFigures,
) {
    use diffuse_models::ops::{kernels, Kernels};
    let mut differ = false;
    for _ in 0..steps {
        let ((step, loss_a, norm_a), (_, loss_b, norm_b)) = (full(), mixed());
        eprintln!("step {step}: loss {loss_a} vs {loss_b}, gradient norm {norm_a} vs {norm_b}");
        let close = |x: f64, y: f64| (x - y).abs() <= 0.02 * x.abs();
        assert!(
            close(loss_a, loss_b) && close(norm_a, norm_b),
            "step {step}: f32 loss {loss_a}, norm {norm_a}; bf16 loss {loss_b}, norm {norm_b}"
        );
        differ |= loss_a != loss_b;
    }
    assert_eq!(
        differ,
        kernels() == Kernels::Avx512Bf16,
        "bf16 and f32 losses differ: {differ}, on the {} kernels",
        kernels().name()
    );
}
