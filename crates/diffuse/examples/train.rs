//! Training a DDPM model from scratch with the library: a tiny class-conditional UNet on
//! generated 8×8 stripes (two classes), a few hundred AdamW steps, then the model saved as a
//! diffusers `DDPMPipeline` folder that `diffuse generate` and Python diffusers load.
//!
//! ```text
//! cargo run --release --example train -- [steps] [output folder]
//! ```

use diffuse::models::UNet2DConfig;
use diffuse::training::{Dataset, Fit, TrainConfig, Trainer};
use diffuse::Device;
use image::{DynamicImage, GrayImage, Luma};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps: u64 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let output = args.get(1).map_or("train-example", String::as_str);

    // Horizontal (class 0) and vertical (class 1) stripes with a per-image phase.
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for class in 0..2u32 {
        for phase in 0..16 {
            let img = GrayImage::from_fn(8, 8, |x, y| {
                let k = if class == 1 { x } else { y } as usize;
                Luma([if (k + phase) % 4 < 2 { 255 } else { 0 }])
            });
            images.push(DynamicImage::ImageLuma8(img));
            labels.push(class);
        }
    }
    let dataset = Dataset::from_images(images, Some(labels), 8, 1, Fit::Resize)?
        .with_class_names(vec!["horizontal".into(), "vertical".into()])?;

    // A two-level UNet with attention at the lowest resolution; one extra class embedding for
    // the unconditional ("no class") input of classifier-free guidance.
    let mut unet: UNet2DConfig = serde_json::from_value(serde_json::json!({
        "sample_size": 8, "in_channels": 1, "out_channels": 1,
        "block_out_channels": [16, 32], "layers_per_block": 1,
        "norm_num_groups": 8, "attention_head_dim": 8,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    }))?;
    unet.num_class_embeds = Some(3);
    let mut config = TrainConfig::new(unet);
    config.steps = steps;
    config.batch_size = 8;
    config.optimizer.lr = 2e-3;
    config.warmup_steps = 10;
    config.sample_every = 0;
    config.checkpoint_every = 0;

    let mut trainer = Trainer::new(config, dataset, &Device::Cpu)?;
    while trainer.step() < steps {
        let stats = trainer.train_step()?;
        if trainer.step() % 50 == 0 || trainer.step() == steps {
            println!("step {:>4}: loss {:.4}", trainer.step(), stats.loss);
        }
    }
    trainer.save_pipeline(std::path::Path::new(output))?;
    println!("saved {output}/ (try: diffuse generate --model {output} --prompt vertical)");
    Ok(())
}
